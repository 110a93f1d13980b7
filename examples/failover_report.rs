//! The failover report of issue 3: the same scenarios against pgleader and against HAProxy
//! configured twice, on a loopback Patroni + etcd cluster, and the rendering of the raw
//! per-attempt logs into `docs/failover.md` and one SVG timeline per scenario.
//!
//! ```text
//! failover_report collect --out docs/failover [--window 45] [--scenarios switchover,crash,hang]
//!                         [--frontends pgleader,pgleader-fenced,haproxy-tcp,haproxy-rest] [--append]
//! failover_report render  --from docs/failover --doc docs/failover.md
//! ```
//! `scripts/failover-report` runs both (release build). `collect` writes, per run, the raw
//! attempts as CSV (`<scenario>-<frontend>.csv`) and everything else (marks, node ports, lost
//! ids, configs, machine) in `runs.json`; `render` reads only those files, so the report can be
//! regenerated from the committed logs.
//!
//! Each run gets a fresh cluster (asynchronous replication, as the runbook's cluster), the front
//! end, and the workload of `tests/common/workload.rs` (a new connection every 50 ms plus one
//! long-lived connection) for `--window` seconds; the fault comes at 5 s:
//! - switchover: `patronictl switchover` to node1;
//! - crash: kill -9 node0's Patroni and PostgreSQL; restarted once Patroni has a new leader;
//! - hang: SIGSTOP node0's Patroni and PostgreSQL; SIGCONT once Patroni has a new leader.
//!
//! Front ends (all on 127.0.0.1, the apps' `sslmode=disable` plaintext):
//! - `pgleader`: in-process, the shipped production settings (deploy/nomad/jobs/pgleader.nomad.hcl)
//!   without `[etcd]` (SQL only).
//! - `pgleader-fenced`: the same with the job's `[etcd]` section (fencing with Patroni's leader
//!   lease, `enforce`, timeout 500 ms, max_staleness 3 s) pointed at the cluster's etcd.
//!
//! `--append` adds runs to an existing `runs.json` (replacing runs of the same scenario and front
//! end), so one front end can be measured without repeating the others.
//! - `haproxy-tcp`: the runbook's HAProxy, plain TCP checks (`check`, HAProxy's default inter 2s
//!   fall 3 rise 2), `balance first` so node0 takes every connection while its port is open and
//!   node1 only while node0's is not, and no `shutdown-sessions`. The runbook's exact file is not
//!   in this repository: this is our reading of "TCP checks, keeps sessions on a demoted node".
//! - `haproxy-rest`: Patroni's recommended config (its docs' haproxy.cfg): `option httpchk
//!   OPTIONS /primary`, `inter 3s fall 3 rise 2 on-marked-down shutdown-sessions`.

// Test-harness code shared with tests/failover_patroni.rs: one cluster implementation, not two.
#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use common::patroni::{PatroniCluster, Replication, APP_DB, APP_PASSWORD, APP_USER};
use common::workload::{self, Attempt, Mark, Outcome, Run, Workload, WorkloadOptions, Writer};

const SCENARIOS: [&str; 3] = ["switchover", "crash", "hang"];
const FRONTENDS: [&str; 4] = ["pgleader", "pgleader-fenced", "haproxy-tcp", "haproxy-rest"];
const FAULT_AT: Duration = Duration::from_secs(5);
/// Above pgleader's leader_wait_timeout (10 s), so a held client is not counted as a timeout.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);

/// The pgleader config, as in deploy/nomad/jobs/pgleader.nomad.hcl (listen addresses aside).
const PGLEADER_TOML: &str = r#"[proxy]
listen = "127.0.0.1:0"
leader_wait_timeout = "10s"
connect_timeout = "2s"
client_hello_timeout = "10s"
max_connections = 2000
shutdown_grace = "20s"

[admin]
listen = "127.0.0.1:0"

[health]
interval = "1s"
fast_interval = "100ms"
timeout = "800ms"
rise = 1
fall = 3
database = "postgres"
"#;

const HAPROXY_DEFAULTS: &str = "global
    maxconn 4000

defaults
    mode tcp
    retries 2
    timeout connect 4s
    timeout client 30m
    timeout server 30m
    timeout check 5s
";

/// One run's record in `runs.json` (the attempts are in the CSV next to it).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunMeta {
    scenario: String,
    frontend: String,
    csv: String,
    started_unix_ms: u128,
    duration_ms: f64,
    /// Node name to PostgreSQL port.
    nodes: BTreeMap<String, u16>,
    /// The leader when the fault came (the node the fault hit).
    old_leader: String,
    fault_ms: f64,
    marks: Vec<Mark>,
    /// Acknowledged ids missing on the final leader.
    lost: Vec<i64>,
    /// The front end's configuration, verbatim (ports as in this run).
    frontend_config: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Report {
    machine: BTreeMap<String, String>,
    window_s: u64,
    interval_ms: u64,
    patroni: String,
    runs: Vec<RunMeta>,
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    match args.first().map(String::as_str) {
        Some("collect") => {
            let out = PathBuf::from(opt("--out").unwrap_or_else(|| "docs/failover".to_owned()));
            let window: u64 = opt("--window").map_or(Ok(45), |w| w.parse()).map_err(|e| format!("--window: {e}"))?;
            let scenarios = list(opt("--scenarios"), &SCENARIOS)?;
            let frontends = list(opt("--frontends"), &FRONTENDS)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| format!("build runtime: {e}"))?;
            let append = args.iter().any(|a| a == "--append");
            rt.block_on(collect(&out, Duration::from_secs(window), &scenarios, &frontends, append))
        }
        Some("render") => {
            let from = PathBuf::from(opt("--from").unwrap_or_else(|| "docs/failover".to_owned()));
            let doc = PathBuf::from(opt("--doc").unwrap_or_else(|| "docs/failover.md".to_owned()));
            render(&from, &doc)
        }
        _ => Err("usage: failover_report collect --out DIR [--window S] [--scenarios a,b] [--frontends a,b] | \
                  render --from DIR --doc FILE"
            .to_owned()),
    }
}

fn list(arg: Option<String>, all: &[&str]) -> Result<Vec<String>, String> {
    let Some(arg) = arg else { return Ok(all.iter().map(|s| (*s).to_owned()).collect()) };
    let items: Vec<String> = arg.split(',').map(str::to_owned).collect();
    match items.iter().find(|i| !all.contains(&i.as_str())) {
        Some(bad) => Err(format!("unknown `{bad}`; one of {all:?}")),
        None => Ok(items),
    }
}

async fn collect(
    out: &Path,
    window: Duration,
    scenarios: &[String],
    frontends: &[String],
    append: bool,
) -> Result<(), String> {
    std::fs::create_dir_all(out).map_err(|e| format!("create {}: {e}", out.display()))?;
    let earlier: Vec<RunMeta> = if append {
        let text = std::fs::read_to_string(out.join("runs.json")).map_err(|e| format!("--append: runs.json: {e}"))?;
        let old: Report = serde_json::from_str(&text).map_err(|e| format!("--append: runs.json: {e}"))?;
        old.runs.into_iter().filter(|r| !(scenarios.contains(&r.scenario) && frontends.contains(&r.frontend))).collect()
    } else {
        Vec::new()
    };
    let mut report = Report {
        machine: machine(),
        window_s: window.as_secs(),
        interval_ms: 50,
        patroni: format!(
            "ttl {} s, loop_wait {} s, retry_timeout {} s, asynchronous replication, use_pg_rewind",
            common::patroni::TTL_SECS,
            common::patroni::LOOP_WAIT_SECS,
            common::patroni::RETRY_TIMEOUT_SECS
        ),
        runs: earlier,
    };
    // Scenario-major, front ends interleaved, so slow drift of the machine spreads evenly.
    for scenario in scenarios {
        for frontend in frontends {
            eprintln!("== {scenario} via {frontend} ({} s)", window.as_secs());
            let (meta, run) = run_one(scenario, frontend, window).await;
            std::fs::write(out.join(&meta.csv), run.to_csv()).map_err(|e| format!("write csv: {e}"))?;
            eprintln!("{}", run.summary(meta.lost.clone()));
            report.runs.push(meta);
            let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
            std::fs::write(out.join("runs.json"), json).map_err(|e| format!("write runs.json: {e}"))?;
        }
    }
    Ok(())
}

/// A front end in front of the cluster.
enum FrontEnd {
    Pgleader(pgleader::Running),
    Haproxy(Haproxy),
}

/// An HAProxy child process; killed (by PID) on drop.
struct Haproxy {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn haproxy_config(kind: &str, port: u16, cluster: &PatroniCluster) -> String {
    let mut cfg = format!("{HAPROXY_DEFAULTS}\nlisten postgres\n    bind 127.0.0.1:{port}\n");
    if kind == "haproxy-tcp" {
        cfg.push_str("    balance first\n    default-server inter 2s fall 3 rise 2\n");
        for n in &cluster.nodes {
            let _ = writeln!(cfg, "    server {} {} check", n.name, n.pg_addr());
        }
    } else {
        cfg.push_str(
            "    option httpchk OPTIONS /primary\n    http-check expect status 200\n    \
             default-server inter 3s fall 3 rise 2 on-marked-down shutdown-sessions\n",
        );
        for n in &cluster.nodes {
            let _ = writeln!(cfg, "    server {} {} maxconn 100 check port {}", n.name, n.pg_addr(), n.api_port);
        }
    }
    cfg
}

impl FrontEnd {
    async fn start(kind: &str, cluster: &PatroniCluster) -> (FrontEnd, String) {
        if kind == "pgleader" || kind == "pgleader-fenced" {
            let mut toml = format!("{PGLEADER_TOML}{}", cluster.pgleader_toml().replacen("[health]\n", "", 1));
            if kind == "pgleader-fenced" {
                let endpoints =
                    cluster.etcd_endpoints().iter().map(|e| format!("{e:?}")).collect::<Vec<_>>().join(", ");
                toml += &format!(
                    "\n[etcd]\nendpoints = [{endpoints}]\nnamespace = \"service\"\nscope = {:?}\ntimeout = \"500ms\"\n\
                     max_staleness = \"3s\"\nmode = \"enforce\"\n",
                    cluster.scope
                );
            }
            let config = pgleader::Config::from_toml(&toml, "<failover-report>").expect("valid pgleader config");
            let running = pgleader::start(config).await.expect("start pgleader");
            return (FrontEnd::Pgleader(running), toml);
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let port = common::free_port();
        let cfg = haproxy_config(kind, port, cluster);
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, &cfg).expect("write haproxy.cfg");
        let check = Command::new("haproxy").arg("-c").arg("-q").arg("-f").arg(&path).output().expect("run haproxy -c");
        assert!(check.status.success(), "haproxy -c: {}", String::from_utf8_lossy(&check.stderr));
        let log = std::fs::File::create(dir.path().join("haproxy.log")).expect("haproxy log");
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn haproxy (apt-get install haproxy)");
        (FrontEnd::Haproxy(Haproxy { child, port, _dir: dir }), cfg)
    }

    fn addr(&self) -> SocketAddr {
        match self {
            FrontEnd::Pgleader(r) => r.proxy_addr,
            FrontEnd::Haproxy(h) => SocketAddr::from(([127, 0, 0, 1], h.port)),
        }
    }

    /// Waits until 30 connections in a row through the front end reach a writable node: HAProxy
    /// starts with every server up and needs its first checks to drop the replica.
    async fn wait_ready(&self) {
        let addr = self.addr();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        let mut in_a_row = 0;
        while in_a_row < 30 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the front end never reached the primary 30 times in a row"
            );
            if probe(addr).await {
                in_a_row += 1;
            } else {
                in_a_row = 0;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    async fn stop(self) {
        match self {
            FrontEnd::Pgleader(r) => {
                let _ = r.shutdown().await;
            }
            FrontEnd::Haproxy(h) => drop(h),
        }
    }
}

/// One connection through `addr`: did it reach a node out of recovery?
async fn probe(addr: SocketAddr) -> bool {
    let mut c = tokio_postgres::Config::new();
    c.host(addr.ip().to_string())
        .port(addr.port())
        .user(APP_USER)
        .password(APP_PASSWORD)
        .dbname(APP_DB)
        .ssl_mode(tokio_postgres::config::SslMode::Disable)
        .connect_timeout(Duration::from_secs(2));
    let attempt = async {
        let (client, conn) = c.connect(tokio_postgres::NoTls).await.ok()?;
        tokio::spawn(conn);
        let row = client.query_one("SELECT pg_is_in_recovery()", &[]).await.ok()?;
        Some(!row.get::<_, bool>(0))
    };
    tokio::time::timeout(Duration::from_secs(5), attempt).await.ok().flatten().unwrap_or(false)
}

async fn run_one(scenario: &str, frontend: &str, window: Duration) -> (RunMeta, Run) {
    let mut cluster = PatroniCluster::start(Replication::Async).await;
    workload::prepare(&cluster.leader_app_client().await).await.expect("create the workload table");
    let (fe, frontend_config) = FrontEnd::start(frontend, &cluster).await;
    fe.wait_ready().await;
    let old_leader = cluster.leader().await.expect("a leader");
    let other = cluster.other(&old_leader).name.clone();

    let addr = fe.addr();
    let mut opts = WorkloadOptions::new(&addr.ip().to_string(), addr.port(), APP_USER, APP_PASSWORD, APP_DB);
    opts.attempt_timeout = ATTEMPT_TIMEOUT;
    let w = Workload::start(opts);
    tokio::time::sleep(FAULT_AT).await;
    let fault_ms = match scenario {
        "switchover" => {
            let at = w.mark(&format!("patronictl switchover to {other}"));
            cluster.switchover(&other).await;
            at
        }
        "crash" => {
            cluster.crash(&old_leader);
            w.mark(&format!("kill -9 {old_leader}"))
        }
        _ => {
            cluster.freeze(&old_leader);
            w.mark(&format!("SIGSTOP {old_leader}"))
        }
    };
    cluster.wait_new_leader(&old_leader).await;
    w.mark(&format!("Patroni: {other} leads"));
    match scenario {
        "crash" => {
            cluster.start_node(&old_leader);
            w.mark(&format!("{old_leader}'s Patroni restarted"));
        }
        "hang" => {
            cluster.thaw(&old_leader);
            w.mark(&format!("SIGCONT {old_leader}"));
        }
        _ => {}
    }
    let left = window.saturating_sub(Duration::from_secs_f64(w.now_ms() / 1000.0));
    tokio::time::sleep(left).await;
    let run = w.stop().await;
    let nodes = cluster.nodes.iter().map(|n| (n.name.clone(), n.pg_port)).collect();
    let lost = run.missing_on(&cluster.leader_client().await).await.expect("read back from the final leader");
    fe.stop().await;
    drop(cluster);
    let meta = RunMeta {
        scenario: scenario.to_owned(),
        frontend: frontend.to_owned(),
        csv: format!("{scenario}-{frontend}.csv"),
        started_unix_ms: run.started_unix_ms,
        duration_ms: run.duration_ms,
        nodes,
        old_leader,
        fault_ms,
        marks: run.marks.clone(),
        lost,
        frontend_config,
    };
    (meta, run)
}

/// Filled in by `collect` for the report's "produced on" line.
fn machine() -> BTreeMap<String, String> {
    let sh = |cmd: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let mut m = BTreeMap::new();
    m.insert("cpu".to_owned(), sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'"));
    m.insert("cores".to_owned(), sh("nproc"));
    m.insert("memory".to_owned(), sh("awk '/MemTotal/ {printf \"%.1f GiB\", $2/1048576}' /proc/meminfo"));
    m.insert("kernel".to_owned(), sh("uname -sr"));
    m.insert("os".to_owned(), sh(". /etc/os-release && echo \"$PRETTY_NAME\""));
    m.insert("postgresql".to_owned(), sh("/usr/lib/postgresql/15/bin/postgres --version"));
    m.insert("patroni".to_owned(), sh(&format!("{}/bin/patroni --version", common::patroni::patroni_venv().display())));
    m.insert("etcd".to_owned(), sh("etcd --version | head -1"));
    m.insert("haproxy".to_owned(), sh("haproxy -v | head -1"));
    m.insert("pgleader".to_owned(), sh("git rev-parse --short HEAD 2>/dev/null"));
    m.insert("date".to_owned(), sh("date -u +%Y-%m-%dT%H:%MZ"));
    m
}

/// The numbers of one run that go in the table.
struct Row {
    frontend: String,
    new_conn: common::workload::WriterSummary,
    long_lived: common::workload::WriterSummary,
    /// Attempts the old leader answered after the fault as a primary while another node led.
    stale: usize,
    lost: usize,
    /// p50 and p99 of the new-connection writer's attempt time before the fault (machine noise).
    before_fault_ms: (f64, f64),
    /// From the fault to the harness seeing Patroni's new leader writable (REST poll + connect).
    patroni_ms: f64,
}

fn row(meta: &RunMeta, attempts: &[Attempt], run: &Run) -> Row {
    let summary = run.summary(meta.lost.clone());
    let old_port = meta.nodes.get(&meta.old_leader).copied();
    let new_leader_ms = meta.marks.iter().find(|m| m.label.starts_with("Patroni:")).map_or(f64::MAX, |m| m.at_ms);
    // After Patroni has a new leader, the old node answering as a primary is a stale primary.
    let stale = attempts
        .iter()
        .filter(|a| {
            a.start_ms > new_leader_ms
                && old_port.is_some()
                && a.node_port == old_port
                && a.in_recovery == Some(false)
                && (a.connected || a.outcome == Outcome::Ok)
        })
        .count();
    let mut before: Vec<f64> = attempts
        .iter()
        .filter(|a| a.writer == Writer::NewConn && a.end_ms < meta.fault_ms)
        .map(|a| a.end_ms - a.start_ms)
        .collect();
    before.sort_by(f64::total_cmp);
    let pct = |p: f64| before.get(((before.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0.0);
    Row {
        patroni_ms: new_leader_ms - meta.fault_ms,
        before_fault_ms: (pct(0.5), pct(0.99)),
        frontend: meta.frontend.clone(),
        new_conn: summary.writer(Writer::NewConn),
        long_lived: summary.writer(Writer::LongLived),
        stale,
        lost: summary.lost.len(),
    }
}

fn errors(e: &BTreeMap<String, usize>) -> String {
    if e.is_empty() {
        return "0".to_owned();
    }
    let total: usize = e.values().sum();
    let parts: Vec<String> = e.iter().map(|(k, v)| format!("{v} {k}")).collect();
    format!("{total} ({})", parts.join(", "))
}

fn render(from: &Path, doc: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(from.join("runs.json")).map_err(|e| format!("read runs.json: {e}"))?;
    let report: Report = serde_json::from_str(&text).map_err(|e| format!("parse runs.json: {e}"))?;
    let rel = from.strip_prefix(doc.parent().unwrap_or(Path::new(""))).unwrap_or(from);
    let mut md = String::new();
    let m = &report.machine;
    let get = |k: &str| m.get(k).cloned().unwrap_or_default();
    let _ = writeln!(md, "# Failover report: pgleader vs HAProxy on a Patroni cluster\n");
    let _ = writeln!(
        md,
        "Generated by `scripts/failover-report` from the raw per-attempt logs in `{}/` (one CSV per run, \
         plus `runs.json` with the marks, node ports, lost ids and each front end's exact configuration). \
         Produced on {} ({} cores, {}), {}, {}, on {}; {}, {}, {}, {}; pgleader commit {}.\n",
        rel.display(),
        get("cpu"),
        get("cores"),
        get("memory"),
        get("os"),
        get("kernel"),
        get("date"),
        get("postgresql"),
        get("patroni"),
        get("etcd"),
        get("haproxy"),
        get("pgleader"),
    );
    let _ = writeln!(
        md,
        "Setup: 3 etcd members and 2 PostgreSQL nodes under Patroni ({}) on loopback; a fresh cluster per \
         run. Workload for {} s per run: writer `new_conn` opens a new plaintext connection every {} ms and \
         inserts the next id; writer `long_lived` keeps one connection and reconnects after an error; an \
         attempt is abandoned after {} s. The fault comes at {} s. Front ends: **pgleader** with the shipped \
         production settings, SQL only; **pgleader fenced** with the same and the job's `[etcd]` section \
         (the leader lease, `enforce`, max_staleness 3 s); **HAProxy TCP** as the runbook had it (TCP `check`, inter 2s fall 3 rise 2, \
         `balance first`, no `shutdown-sessions`; the runbook's exact file is not in this repository); \
         **HAProxy REST** as Patroni recommends (`option httpchk OPTIONS /primary`, `inter 3s fall 3 rise 2 \
         on-marked-down shutdown-sessions`).\n",
        report.patroni,
        report.window_s,
        report.interval_ms,
        ATTEMPT_TIMEOUT.as_secs(),
        FAULT_AT.as_secs(),
    );
    let starts: Vec<u128> = report.runs.iter().map(|r| r.started_unix_ms).collect();
    let span_h = (starts.iter().max().unwrap_or(&0) - starts.iter().min().unwrap_or(&0)) as f64 / 3_600_000.0;
    if span_h > 1.0 {
        let _ = writeln!(
            md,
            "The runs were not collected in one sitting: they span {span_h:.1} hours (`--append` measures a front \
             end later; the machine line above is the latest collect's, each run's start is in `runs.json`). \
             Compare front ends within a scenario with that in mind.\n"
        );
    }
    let _ = writeln!(
        md,
        "Columns: *Patroni's new leader after* is the time from the fault until the harness saw \
         the new leader in Patroni's REST API (polled every 50 ms) and had written to it directly: Patroni's own \
         failover time plus the harness's polling, so a front end can show a shorter outage (it was the same \
         cluster, not the same observer); *outage* is the longest time without an acknowledged write of that writer; *failed* counts \
         failed attempts by class (`57P03` cannot_connect_now, `25006` read-only transaction, `57P01` \
         terminated by the server, `closed`/`reset`/`refused`/`timeout` at the socket); *read-only hits* are \
         attempts that reached a node in recovery (both writers); *stale hits* are attempts the old leader \
         served as a primary after Patroni had elected another node; *lost* are acknowledged ids missing on \
         the final leader (asynchronous replication); the last column, the new-connection writer's attempt \
         time before the fault, shows how loaded the machine was during that run.\n"
    );
    for scenario in SCENARIOS {
        let runs: Vec<&RunMeta> = report.runs.iter().filter(|r| r.scenario == scenario).collect();
        if runs.is_empty() {
            continue;
        }
        let mut rows = Vec::new();
        let mut series = Vec::new();
        for meta in runs {
            let csv = std::fs::read_to_string(from.join(&meta.csv)).map_err(|e| format!("read {}: {e}", meta.csv))?;
            let attempts = Run::attempts_from_csv(&csv).map_err(|e| format!("{}: {e}", meta.csv))?;
            let run = Run {
                started_unix_ms: meta.started_unix_ms,
                duration_ms: meta.duration_ms,
                attempts: attempts.clone(),
                marks: meta.marks.clone(),
            };
            rows.push(row(meta, &attempts, &run));
            series.push((meta.clone(), attempts));
        }
        let _ = writeln!(md, "## {}\n", title(scenario));
        let _ = writeln!(
            md,
            "| front end | Patroni's new leader after | outage, new conn | failed, new conn | outage, long-lived | failed, long-lived | read-only hits | stale hits | lost | attempt p50 / p99 before the fault |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|");
        for r in &rows {
            let _ = writeln!(
                md,
                "| {} | {:.1} s | {:.1} s | {} | {:.1} s | {} | {} | {} | {} | {:.0} / {:.0} ms |",
                label(&r.frontend),
                r.patroni_ms / 1000.0,
                r.new_conn.longest_gap_ms / 1000.0,
                errors(&r.new_conn.errors),
                r.long_lived.longest_gap_ms / 1000.0,
                errors(&r.long_lived.errors),
                r.new_conn.read_only_hits + r.long_lived.read_only_hits,
                r.stale,
                r.lost,
                r.before_fault_ms.0,
                r.before_fault_ms.1
            );
        }
        let svg = format!("{scenario}.svg");
        std::fs::write(from.join(&svg), plot(scenario, &series, report.window_s))
            .map_err(|e| format!("write {svg}: {e}"))?;
        let _ = writeln!(md, "\n![{scenario} timeline]({}/{svg})\n", rel.display());
    }
    md.push_str(NOTES);
    std::fs::write(doc, md).map_err(|e| format!("write {}: {e}", doc.display()))
}

/// Fixed text after the tables: what holds by construction, not what one run measured.
const NOTES: &str = "## Notes

- **Patroni's floor.** Patroni 4 refuses a `ttl` under 20 s (it raises it silently), so after a crash or
  a hang the leader key expires 20 s after the last renewal and the replica promotes then: about
  20-23 s here. The issue's anchors (ttl 10) had a floor of about 10 s. No front end can beat the
  floor; pgleader's outage in those scenarios is the floor plus its detection of the promotion
  (`fast_interval`, 100 ms), while HAProxy adds its check interval times `rise`.
- **Clients held, not failed.** While there is no leader, pgleader holds new clients for up to
  `leader_wait_timeout` (10 s) and releases them to the new leader; only a client that waits longer
  than that gets 57P03. A crash or hang gap of about 20 s therefore shows as one or two 57P03 per
  writer, and a switchover gap (about 2.5 s) as none.
- **The one broken session of a switchover.** Patroni's switchover stops the old primary with a fast
  shutdown, which terminates every backend, including a session that is authenticating or running a
  statement at that instant (PostgreSQL closes it with 57P01, or without a message while
  authentication is in progress). A proxy that does not terminate authentication cannot replay it
  (SCRAM is nonce-based), so each writer can lose the one attempt in flight at that instant; every
  client that arrives later waits and is released to the new leader.
- **Frozen is not down for a TCP check.** A SIGSTOPped PostgreSQL still completes TCP handshakes
  (the kernel accepts), so a TCP check passes and HAProxy keeps sending clients into the frozen node;
  they hang until the client gives up. Patroni's REST check fails (its REST API is frozen too), after
  `fall` x `inter`. pgleader's SQL check times out after 800 ms.
- **After a failover HAProxy TCP goes back to node0.** With `balance first`, once the old primary
  rejoins as a replica its port is open again and it takes every connection: writes fail with 25006
  until someone edits HAProxy. The REST check follows Patroni's leader, but only after `fall` x
  `inter` (about 9 s) of sending writes to the demoted node.
";

fn title(scenario: &str) -> &'static str {
    match scenario {
        "switchover" => "Planned switchover (`patronictl switchover`)",
        "crash" => "Crash of the leader (kill -9 of Patroni and PostgreSQL)",
        _ => "Hang of the leader (SIGSTOP of Patroni and PostgreSQL, SIGCONT after the failover)",
    }
}

fn label(frontend: &str) -> &'static str {
    match frontend {
        "pgleader" => "pgleader (SQL only)",
        "pgleader-fenced" => "pgleader fenced (etcd lease)",
        "haproxy-tcp" => "HAProxy TCP check (runbook)",
        _ => "HAProxy REST check (Patroni's recommendation)",
    }
}

/// One SVG per scenario: a panel per front end, successful writes per 250 ms upwards (green),
/// failed attempts downwards (red; read-only or stale hits orange), the marks as dashed lines.
fn plot(scenario: &str, series: &[(RunMeta, Vec<Attempt>)], window_s: u64) -> String {
    const W: f64 = 960.0;
    const LEFT: f64 = 60.0;
    const PANEL: f64 = 150.0;
    const BUCKET_MS: f64 = 250.0;
    let width = W - LEFT - 20.0;
    let buckets = ((window_s as f64 * 1000.0) / BUCKET_MS).ceil() as usize + 1;
    let height = 56.0 + PANEL * series.len() as f64 + 30.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{LEFT}\" y=\"20\" font-size=\"14\">{}</text>\n\
         <text x=\"{LEFT}\" y=\"38\">Attempts per 250 ms. Up, green: acknowledged writes. Down, red: failed attempts; \
         orange: attempts that reached a read-only node or the stale old leader.</text>\n",
        escape(&title(scenario).replace('`', ""))
    );
    let x_of = |ms: f64| LEFT + width * ms / (window_s as f64 * 1000.0);
    for (i, (meta, attempts)) in series.iter().enumerate() {
        let top = 56.0 + PANEL * i as f64;
        let mid = top + PANEL * 0.62;
        let mut ok = vec![0usize; buckets];
        let mut bad = vec![0usize; buckets];
        let mut wrong = vec![0usize; buckets];
        let old_port = meta.nodes.get(&meta.old_leader).copied();
        let new_leader_ms = meta.marks.iter().find(|m| m.label.starts_with("Patroni:")).map_or(f64::MAX, |m| m.at_ms);
        for a in attempts {
            let b = ((a.end_ms / BUCKET_MS) as usize).min(buckets - 1);
            let misrouted = a.in_recovery == Some(true)
                || a.outcome == Outcome::ReadOnly
                || (a.start_ms > new_leader_ms
                    && old_port.is_some()
                    && a.node_port == old_port
                    && a.in_recovery == Some(false));
            if misrouted {
                wrong[b] += 1;
            } else if a.outcome == Outcome::Ok {
                ok[b] += 1;
            } else {
                bad[b] += 1;
            }
        }
        let max_up = 12.0_f64.max(ok.iter().copied().max().unwrap_or(0) as f64);
        let up_scale = (PANEL * 0.55) / max_up;
        let down_scale =
            (PANEL * 0.3) / 12.0_f64.max(bad.iter().zip(&wrong).map(|(a, b)| a + b).max().unwrap_or(0) as f64);
        let bw = (width / buckets as f64).max(1.0);
        let _ = writeln!(
            svg,
            "<text x=\"{LEFT}\" y=\"{}\" font-weight=\"bold\">{}</text>",
            top + 12.0,
            label(&meta.frontend)
        );
        let _ = writeln!(
            svg,
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{mid}\" y2=\"{mid}\" stroke=\"#888\" stroke-width=\"0.5\"/>",
            LEFT + width
        );
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{max_up:.0}</text>",
            LEFT - 4.0,
            mid - max_up * up_scale + 4.0
        );
        let _ = writeln!(svg, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">0</text>", LEFT - 4.0, mid + 4.0);
        for b in 0..buckets {
            let x = LEFT + bw * b as f64;
            if ok[b] > 0 {
                let h = ok[b] as f64 * up_scale;
                let _ = writeln!(
                    svg,
                    "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{bw:.1}\" height=\"{h:.1}\" fill=\"#2a9d3a\"/>",
                    mid - h
                );
            }
            if bad[b] > 0 {
                let h = bad[b] as f64 * down_scale;
                let _ = writeln!(
                    svg,
                    "<rect x=\"{x:.1}\" y=\"{mid:.1}\" width=\"{bw:.1}\" height=\"{h:.1}\" fill=\"#d62728\"/>"
                );
            }
            if wrong[b] > 0 {
                let h = wrong[b] as f64 * down_scale;
                let y = mid + bad[b] as f64 * down_scale;
                let _ = writeln!(
                    svg,
                    "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bw:.1}\" height=\"{h:.1}\" fill=\"#ff8c00\"/>"
                );
            }
        }
        for (j, mark) in meta.marks.iter().enumerate() {
            let x = x_of(mark.at_ms);
            let _ = writeln!(
                svg,
                "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{}\" y2=\"{}\" stroke=\"#333\" stroke-dasharray=\"4,3\"/>\
                 <text x=\"{:.1}\" y=\"{}\" fill=\"#333\">{}</text>",
                top + 16.0,
                top + PANEL - 8.0,
                x + 3.0,
                top + 26.0 + 11.0 * j as f64,
                escape(&mark.label)
            );
        }
    }
    let axis_y = 56.0 + PANEL * series.len() as f64 + 4.0;
    for s in (0..=window_s).step_by(5) {
        let x = x_of(s as f64 * 1000.0);
        let _ = writeln!(svg, "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{s} s</text>", axis_y + 12.0);
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
