//! The deployment files, checked with the real tools that exist here.
//!
//! Neither Nomad nor a Docker engine runs where these tests run, so each file is checked as far
//! as honest tools allow:
//! - `deploy/nomad/jobs/*.hcl`: parsed with hcl-rs; the structure that matters is asserted per job
//!   (pgleader: system job, static ports, `/readyz` check, SIGTERM + kill_timeout against the
//!   rendered `shutdown_grace`, a linux constraint, one-at-a-time updates, no password literal);
//!   pgleader's config template is rendered from an explicit substitution table (no template
//!   engine) and validated by `Config::from_toml` and by the real `pgleader check-config`.
//! - timescaledb-ha: the Patroni config goes through `patroni --validate-config` (Patroni from
//!   `scripts/patroni-venv`) with the job's PATRONI_* environment, and `post_bootstrap.sh` runs
//!   against a real PostgreSQL, after which the roles it made log in with their passwords.
//! - `deploy/prometheus/`: `promtool check config`, `check rules`, `test rules`; every alert must
//!   have a firing case and a later resolved one, and link a section that exists in the runbook.
//! - `deploy/grafana/pgleader.json`: parses; every metric it queries is one pgleader exports
//!   ([`grafana::dashboard_metric_names`] is the reusable extractor for a live `/metrics` comparison).
//! - `Dockerfile`: its shape (stages, copied paths vs `.dockerignore`, non-root uid matching the
//!   job's secret file owner, config volume, Rust version vs the locked dependencies).

mod common;
// One test binary; its parts live in tests/deploy_files/.
#[path = "deploy_files/docker.rs"]
mod docker;
#[path = "deploy_files/grafana.rs"]
mod grafana;
#[path = "deploy_files/hcl_job.rs"]
mod hcl_job;
#[path = "deploy_files/nomad.rs"]
mod nomad;
#[path = "deploy_files/prometheus.rs"]
mod prometheus;
#[path = "deploy_files/timescaledb.rs"]
mod timescaledb;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

fn duration(s: &str) -> Duration {
    humantime::parse_duration(s).unwrap_or_else(|e| panic!("`{s}` is not a duration: {e}"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn assert_success(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const OPTIPLEX: &str = "100.83.150.39";
const EPYC: &str = "100.103.201.10";
const MACMINI: &str = "100.100.5.40";
