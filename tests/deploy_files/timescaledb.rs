//! The timescaledb-ha job: structure, `patroni --validate-config`, and post_bootstrap.sh run
//! against a real PostgreSQL.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use hcl::{Block, Expression};

use crate::common;
use crate::hcl_job::*;
use crate::{assert_success, duration, read, repo, run, EPYC, MACMINI, OPTIPLEX};

const TIMESCALE_JOB: &str = "deploy/nomad/jobs/timescaledb-ha.nomad.hcl";

struct TimescaleJob {
    job: Block,
}

impl TimescaleJob {
    fn load() -> TimescaleJob {
        TimescaleJob { job: job(TIMESCALE_JOB) }
    }
    fn group(&self) -> &Block {
        one(&self.job.body, "group")
    }
    fn task(&self) -> &Block {
        one(&self.group().body, "task")
    }
    /// The task's `env` block, as written.
    fn env(&self) -> BTreeMap<String, String> {
        one(&self.task().body, "env")
            .body
            .attributes()
            .map(|a| (a.key.to_string(), expr_text(&a.expr).expect("env values are strings")))
            .collect()
    }
    fn patroni_yml(&self) -> String {
        text(&template(self.task(), "local/postgres.yml").body, "data")
    }
}

const PATRONI_SECRETS: [&str; 3] =
    ["PATRONI_SUPERUSER_PASSWORD", "PATRONI_REPLICATION_PASSWORD", "PATRONI_RESTAPI_PASSWORD"];

#[test]
fn timescaledb_ha_job_structure() {
    let j = TimescaleJob::load();
    assert_eq!(label(&j.job), "timescaledb-ha");
    assert_eq!(number(&j.group().body, "count"), 2, "two Patroni members");
    let cons = constraints(&j.group().body);
    assert!(cons.contains(&("${node.unique.name}".into(), "regexp".into(), "^(optiplex|epyc)$".into())), "{cons:?}");
    assert!(cons.iter().any(|(_, op, v)| op == "distinct_hosts" && v == "true"), "one member per node: {cons:?}");
    assert_eq!(static_port(j.group(), "pg"), 5432);
    assert_eq!(static_port(j.group(), "patroni"), 8008);

    // Data on the host volume, where the image keeps PGDATA's parent.
    let volume = labeled(&j.group().body, "volume", "pgdata");
    assert_eq!(text(&volume.body, "type"), "host");
    assert_eq!(text(&volume.body, "source"), "timescaledb-ha");
    let mount = one(&j.task().body, "volume_mount");
    assert_eq!(text(&mount.body, "volume"), "pgdata");
    assert_eq!(text(&mount.body, "destination"), "/home/postgres/pgdata");

    // The image's Timescale entrypoint, which execs `patroni /home/postgres/postgres.yml`.
    let config = one(&j.task().body, "config");
    assert!(text(&config.body, "image").starts_with("timescale/timescaledb-ha:"));
    assert_eq!(string_list(&config.body, "entrypoint"), ["/timescaledb_entrypoint.sh"]);
    let bind = one(&config.body, "mount");
    assert_eq!(text(&bind.body, "source"), "local/postgres.yml");
    assert_eq!(text(&bind.body, "target"), "/home/postgres/postgres.yml");
    template(j.task(), "local/postgres.yml");

    // The PATRONI_* environment: per-node values interpolated by Nomad, etcd v3 on all three.
    let env = j.env();
    for key in [
        "PATRONI_SCOPE",
        "PATRONI_NAME",
        "PATRONI_ETCD3_HOSTS",
        "PATRONI_RESTAPI_LISTEN",
        "PATRONI_RESTAPI_CONNECT_ADDRESS",
        "PATRONI_POSTGRESQL_LISTEN",
        "PATRONI_POSTGRESQL_CONNECT_ADDRESS",
        "PATRONI_POSTGRESQL_DATA_DIR",
        "PATRONI_SUPERUSER_USERNAME",
        "PATRONI_REPLICATION_USERNAME",
    ] {
        assert!(env.contains_key(key), "env lacks {key}");
    }
    assert_eq!(env["PATRONI_SCOPE"], "vietmarket", "the existing cluster's scope (its keys in etcd)");
    assert_eq!(env["PATRONI_NAME"], "${node.unique.name}");
    assert_eq!(env["PATRONI_ETCD3_HOSTS"], format!("{OPTIPLEX}:2379,{EPYC}:2379,{MACMINI}:2379"));
    assert_eq!(env["PATRONI_POSTGRESQL_CONNECT_ADDRESS"], "${NOMAD_IP_pg}:5432");
    assert_eq!(env["PATRONI_POSTGRESQL_DATA_DIR"], "/home/postgres/pgdata/data");
    assert!(env.keys().all(|k| !k.contains("PASSWORD")), "passwords only through the Nomad Variable template");

    // Secrets: one env template reading the job's own Nomad Variable.
    let secrets = template(j.task(), "secrets/patroni.env");
    assert!(boolean(&secrets.body, "env"));
    assert_eq!(text(&secrets.body, "change_mode"), "noop", "never restart a database on a variable change");
    let data = text(&secrets.body, "data");
    assert_eq!(template_expressions(&data)[0], r#"with nomadVar "nomad/jobs/timescaledb-ha""#);
    for key in PATRONI_SECRETS.iter().chain(&["VIETMARKET_PASSWORD", "PGLEADER_PASSWORD"]) {
        assert!(data.lines().any(|l| l.starts_with(&format!("{key}={{{{ ."))), "secrets template lacks {key}");
    }

    // Roles: the pgleader health-check role is created by post_bootstrap.
    let yml = j.patroni_yml();
    assert!(yml.contains("post_bootstrap: /local/post_bootstrap.sh"), "{yml}");
    assert!(yml.contains("shared_preload_libraries: timescaledb"));
    let script = template(j.task(), "local/post_bootstrap.sh");
    assert_eq!(text(&script.body, "perms"), "0755");
    match attr(&script.body, "data") {
        Some(Expression::FuncCall(f)) => {
            assert_eq!(f.name.name.as_str(), "file");
            assert_eq!(f.args.first().and_then(expr_text).as_deref(), Some(POST_BOOTSTRAP));
        }
        other => panic!("post_bootstrap template data should be file(\"{POST_BOOTSTRAP}\"): {other:?}"),
    }
    let body = read(POST_BOOTSTRAP);
    assert!(!body.contains("{{"), "the script goes through Nomad's template engine: no {{{{ allowed");
    assert!(body.contains("GRANT pg_monitor TO pgleader"));
    assert_eq!(text(&j.task().body, "kill_signal"), "SIGTERM");
    assert!(duration(&text(&j.task().body, "kill_timeout")) <= Duration::from_secs(30));
}

const POST_BOOTSTRAP: &str = "deploy/timescaledb-ha/post_bootstrap.sh";

/// Patroni from the repository's pinned venv (`scripts/patroni-venv` creates or reuses it).
fn patroni_bin() -> PathBuf {
    let out = run(Command::new("bash").arg(repo().join("scripts/patroni-venv")));
    assert_success("scripts/patroni-venv (installs the pinned Patroni from PyPI)", &out);
    let venv = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    PathBuf::from(venv).join("bin/patroni")
}

#[test]
fn timescaledb_ha_patroni_config_passes_patroni_validation() {
    let j = TimescaleJob::load();
    let yml = j.patroni_yml();
    assert!(!yml.contains("{{"), "postgres.yml is rendered verbatim; per-node values belong in PATRONI_* env");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("postgres.yml");
    std::fs::write(&file, &yml).expect("write postgres.yml");

    // The job's environment as Nomad would interpolate it on Optiplex, plus the secrets.
    let interpolations =
        [("${node.unique.name}", "optiplex"), ("${NOMAD_IP_pg}", OPTIPLEX), ("${NOMAD_IP_patroni}", OPTIPLEX)];
    let mut cmd = Command::new(patroni_bin());
    cmd.env_clear();
    let path = format!("{}:/usr/bin:/bin", common::pg::pg_bin().display());
    cmd.env("PATH", path);
    for (key, value) in j.env() {
        let value = interpolations.iter().fold(value, |v, (from, to)| v.replace(from, to));
        assert!(!value.contains("${"), "{key}: uninterpolated value {value}");
        cmd.env(key, value);
    }
    for key in PATRONI_SECRETS {
        cmd.env(key, "validate-only");
    }
    let out = run(cmd.args(["--validate-config", "--ignore-listen-port"]).arg(&file));
    assert_success("patroni --validate-config on the timescaledb-ha job's config", &out);

    // The validator must be able to fail: the same config with a broken value is refused.
    std::fs::write(&file, yml.replace("ttl: 30", "ttl: soon")).expect("write broken copy");
    let out = run(&mut cmd);
    assert!(!out.status.success(), "patroni --validate-config accepted `ttl: soon`");
}

#[test]
fn post_bootstrap_creates_the_roles_on_a_real_postgres() {
    let node = common::pg::PgNode::start_primary("post-bootstrap");
    // Password logins for everyone but the superuser, so the roles' passwords are really checked.
    std::fs::write(
        node.datadir().join("pg_hba.conf"),
        "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n",
    )
    .expect("write pg_hba.conf");
    node.sql_ok("postgres", "SELECT pg_reload_conf()");

    let bootstrap = || {
        let path = format!("{}:{}", common::pg::pg_bin().display(), std::env::var("PATH").unwrap_or_default());
        run(Command::new(repo().join(POST_BOOTSTRAP))
            .arg(node.url("postgres"))
            .env("PATH", path)
            .env("VIETMARKET_PASSWORD", "app'pw")
            .env("PGLEADER_PASSWORD", "health\"pw"))
    };
    assert_success("post_bootstrap.sh", &bootstrap());
    assert_success("post_bootstrap.sh, run again (idempotent)", &bootstrap());

    let login = |user: &str, password: &str, db: &str, sql: &str| {
        run(Command::new(common::pg::pg_bin().join("psql"))
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", &node.port().to_string()])
            .args(["-U", user, "-d", db, "-c", sql])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "5"))
    };
    // pgleader's probe, as pgleader: recovery state, timeline source, system identifier.
    let probe = "SELECT pg_is_in_recovery(), pg_walfile_name(pg_current_wal_lsn()) IS NOT NULL, \
                 (pg_control_system()).system_identifier > 0";
    let out = login("pgleader", "health\"pw", "postgres", probe);
    assert_success("the health probe as pgleader", &out);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "f|t|t");
    assert!(!login("pgleader", "wrong", "postgres", "SELECT 1").status.success(), "a wrong password was accepted");
    assert_eq!(
        node.sql_ok(
            "postgres",
            "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, pg_has_role('pgleader', 'pg_monitor', 'member') \
             FROM pg_roles WHERE rolname = 'pgleader'"
        ),
        "t|f|f|f|t",
        "pgleader: login and pg_monitor, nothing more"
    );
    // The app role owns its database and can create tables in it.
    let out = login("vietmarket", "app'pw", "vietmarket", "CREATE TABLE t (x int); DROP TABLE t; SELECT current_user");
    assert_success("vietmarket creating a table in its database", &out);
    assert_eq!(
        node.sql_ok("postgres", "SELECT datdba::regrole FROM pg_database WHERE datname = 'vietmarket'"),
        "vietmarket"
    );
}
