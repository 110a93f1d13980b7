//! The partition lab of issue 12: the runbook's cluster laid out in the namespaces of
//! [`super::netns`], every front end side by side, and the scenarios and measures of the
//! partition suite (`tests/partitions.rs`) and report (`examples/partition_report.rs`).
//!
//! Topology (fixed ports are fine: every namespace has its own port space):
//!
//! | namespace | address | runs |
//! |---|---|---|
//! | optiplex | 198.51.100.1 | etcd :2379/:2380, Patroni :8008 + PostgreSQL 15 :5441, every front end, writers |
//! | epyc | 198.51.100.2 | etcd, Patroni :8008 + PostgreSQL 15 :5442, every front end, writers |
//! | mac | 198.51.100.3 | etcd only (the witness) |
//!
//! The two PostgreSQL nodes listen on different ports (production uses 5432 on both) because
//! the workload tells nodes apart by `inet_server_port()`.
//!
//! Front ends are data ([`FrontEnd`]): on each database node one process of each kind, on its own
//! port, with its own workload (the two writers of `super::workload`) connecting to its own
//! node's address. The fenced pgleader of issue 11 is a config change ([`FrontEndKind::PgleaderFenced`]:
//! an `[etcd]` section and `member` keys).
//!
//! Timing (written down in every report): Patroni `ttl 20, loop_wait 1, retry_timeout 5` (the
//! harness's, see `super::patroni`: Patroni 4 raises a ttl under 20 silently); etcd heartbeat
//! 100 ms, election timeout 1000 ms.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::netns::{Net, Netns};
use super::patroni::{
    etcd_bin, http_get, patroni_venv, Replication, APP_DB, APP_PASSWORD, APP_USER, HEALTH_PASSWORD, HEALTH_USER,
    LOOP_WAIT_SECS, RETRY_TIMEOUT_SECS, SUPERUSER, SUPERUSER_PASSWORD, TTL_SECS,
};
use super::pg::{chown_tree, pg_bin, run_as};
use super::workload::{self, Mark, Workload, WorkloadOptions, Writer};

/// The nodes that run PostgreSQL (and front ends and writers); `mac` is the witness.
pub const DB_NODES: [&str; 2] = ["optiplex", "epyc"];
pub const ETCD_CLIENT_PORT: u16 = 2379;
pub const ETCD_PEER_PORT: u16 = 2380;
pub const PATRONI_API_PORT: u16 = 8008;
pub const ETCD_HEARTBEAT_MS: u64 = 100;
pub const ETCD_ELECTION_MS: u64 = 1000;
/// Bound on waits for things the cluster does by itself (bootstrap, failover, rejoin).
pub const PATIENCE: Duration = Duration::from_secs(120);
/// How long the run goes on after the cluster recovered: a front end has "recovered by itself"
/// when every one of its writers wrote again in that window and none failed in its last
/// [`STABLE_TAIL`] (so a front end that works for a moment and then sends writes to the
/// rejoined replica does not count).
pub const RECOVERY_WINDOW: Duration = Duration::from_secs(30);
pub const STABLE_TAIL: Duration = Duration::from_secs(5);
/// Acknowledged writes that count as "writes again": new-connection writer, long-lived writer.
pub const ACKS_TO_COUNT: (usize, usize) = (20, 10);
/// A workload's attempt is abandoned after this (above pgleader's `leader_wait_timeout`, 10 s).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);
/// Two acknowledged writes of one node further apart than this belong to different primary terms.
pub const TERM_GAP_MS: f64 = 1000.0;

/// PostgreSQL's port on a database node.
pub fn pg_port(node: &str) -> u16 {
    match node {
        "optiplex" => 5441,
        "epyc" => 5442,
        other => panic!("{other} runs no PostgreSQL"),
    }
}

fn addr_of(node: &str) -> Ipv4Addr {
    super::netns::NODES.iter().find(|(n, _)| *n == node).map(|(_, a)| *a).unwrap_or_else(|| panic!("no node {node}"))
}

/// The kinds of front end compared side by side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FrontEndKind {
    /// pgleader as today: SQL checks only, the shipped settings.
    PgleaderSql,
    /// pgleader with the etcd fencing of issue 11 (`[etcd]`, `member`).
    PgleaderFenced,
    /// HAProxy with Patroni's REST check (Patroni's own template).
    HaproxyRest,
    /// HAProxy with the runbook's TCP check.
    HaproxyTcp,
}

impl FrontEndKind {
    pub const ALL: [FrontEndKind; 4] =
        [FrontEndKind::PgleaderSql, FrontEndKind::PgleaderFenced, FrontEndKind::HaproxyRest, FrontEndKind::HaproxyTcp];

    pub fn slug(self) -> &'static str {
        match self {
            FrontEndKind::PgleaderSql => "pgleader",
            FrontEndKind::PgleaderFenced => "pgleader-fenced",
            FrontEndKind::HaproxyRest => "haproxy-rest",
            FrontEndKind::HaproxyTcp => "haproxy-tcp",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            FrontEndKind::PgleaderSql => "pgleader (SQL only)",
            FrontEndKind::PgleaderFenced => "pgleader fenced with etcd",
            FrontEndKind::HaproxyRest => "HAProxy REST check (Patroni's template)",
            FrontEndKind::HaproxyTcp => "HAProxy TCP check (runbook)",
        }
    }

    pub fn from_slug(slug: &str) -> Option<FrontEndKind> {
        FrontEndKind::ALL.into_iter().find(|k| k.slug() == slug)
    }
}

/// One front end: its kind and the ports it uses in each database node's namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontEnd {
    pub kind: FrontEndKind,
    /// Where the apps (writers) connect, on the node's own address.
    pub port: u16,
    /// pgleader's admin port on 127.0.0.1 (unused by HAProxy).
    pub admin_port: u16,
}

/// Every front end, fenced pgleader included.
pub fn all_front_ends() -> Vec<FrontEnd> {
    vec![
        FrontEnd { kind: FrontEndKind::PgleaderSql, port: 5433, admin_port: 9543 },
        FrontEnd { kind: FrontEndKind::HaproxyRest, port: 6433, admin_port: 0 },
        FrontEnd { kind: FrontEndKind::HaproxyTcp, port: 7433, admin_port: 0 },
        FrontEnd { kind: FrontEndKind::PgleaderFenced, port: 8433, admin_port: 9544 },
    ]
}

/// The default list: every front end, the fenced pgleader included. `PGLEADER_PARTITIONS_FENCED=0`
/// leaves it out (to compare with runs made before fencing existed).
pub fn default_front_ends() -> Vec<FrontEnd> {
    let fenced = std::env::var("PGLEADER_PARTITIONS_FENCED").map_or(true, |v| v != "0");
    all_front_ends().into_iter().filter(|f| fenced || f.kind != FrontEndKind::PgleaderFenced).collect()
}

/// pgleader's settings: the shipped defaults (deploy/nomad/jobs/pgleader.nomad.hcl), spelled out.
const PGLEADER_SETTINGS: &str = "leader_wait_timeout = \"10s\"\nconnect_timeout = \"2s\"\n\
client_hello_timeout = \"10s\"\nmax_connections = 2000\nshutdown_grace = \"20s\"\n";
const PGLEADER_HEALTH: &str =
    "interval = \"1s\"\nfast_interval = \"100ms\"\ntimeout = \"800ms\"\nrise = 1\nfall = 3\ndatabase = \"postgres\"\n";
const HAPROXY_DEFAULTS: &str = "global\n    maxconn 4000\n\ndefaults\n    mode tcp\n    retries 2\n    \
timeout connect 4s\n    timeout client 30m\n    timeout server 30m\n    timeout check 5s\n";

impl FrontEnd {
    /// The front end's configuration file for `node` (the node it runs on).
    pub fn config(&self, node: &str, scope: &str) -> String {
        let addr = addr_of(node);
        match self.kind {
            FrontEndKind::PgleaderSql | FrontEndKind::PgleaderFenced => {
                let fenced = self.kind == FrontEndKind::PgleaderFenced;
                let mut s = format!(
                    "[proxy]\nlisten = \"{addr}:{}\"\n{PGLEADER_SETTINGS}\n[admin]\nlisten = \"127.0.0.1:{}\"\n\n\
                     [health]\nuser = \"{HEALTH_USER}\"\npassword = \"{HEALTH_PASSWORD}\"\n{PGLEADER_HEALTH}",
                    self.port, self.admin_port
                );
                if fenced {
                    let endpoints: Vec<String> =
                        super::netns::NODES.iter().map(|(_, a)| format!("\"http://{a}:{ETCD_CLIENT_PORT}\"")).collect();
                    s.push_str(&format!(
                        "\n[etcd]\nendpoints = [{}]\nnamespace = \"service\"\nscope = \"{scope}\"\ntimeout = \"500ms\"\n\
                         max_staleness = \"3s\"\nmode = \"enforce\"\n",
                        endpoints.join(", ")
                    ));
                }
                for n in DB_NODES {
                    s.push_str(&format!(
                        "\n[[backend]]\nname = \"{n}\"\naddress = \"{}:{}\"\n",
                        addr_of(n),
                        pg_port(n)
                    ));
                    if fenced {
                        s.push_str(&format!("member = \"{n}\"\n"));
                    }
                }
                s
            }
            FrontEndKind::HaproxyRest => {
                let mut s = format!(
                    "{HAPROXY_DEFAULTS}\nlisten postgres\n    bind {addr}:{}\n    option httpchk OPTIONS /primary\n    \
                     http-check expect status 200\n    default-server inter 3s fall 3 rise 2 on-marked-down shutdown-sessions\n",
                    self.port
                );
                for n in DB_NODES {
                    s.push_str(&format!(
                        "    server {n} {}:{} maxconn 100 check port {PATRONI_API_PORT}\n",
                        addr_of(n),
                        pg_port(n)
                    ));
                }
                s
            }
            FrontEndKind::HaproxyTcp => {
                let mut s = format!(
                    "{HAPROXY_DEFAULTS}\nlisten postgres\n    bind {addr}:{}\n    balance first\n    \
                     default-server inter 2s fall 3 rise 2\n",
                    self.port
                );
                for n in DB_NODES {
                    s.push_str(&format!("    server {n} {}:{} check\n", addr_of(n), pg_port(n)));
                }
                s
            }
        }
    }

    fn file_name(&self, node: &str) -> String {
        let ext =
            if matches!(self.kind, FrontEndKind::HaproxyRest | FrontEndKind::HaproxyTcp) { "cfg" } else { "toml" };
        format!("{node}-{}.{ext}", self.kind.slug())
    }
}

/// A process the lab started (inside a namespace); killed and reaped on drop.
struct Spawned {
    what: String,
    child: Child,
    log: PathBuf,
}

/// The running lab. Field order matters for drop: processes, then namespaces, then files.
pub struct Lab {
    pub replication: Replication,
    pub scope: String,
    pub front_ends: Vec<FrontEnd>,
    /// Every config file written, by file name (for the report's raw data).
    pub configs: BTreeMap<String, String>,
    /// The lab's clock: marks and workload offsets are milliseconds since this.
    started: Instant,
    pub marks: Vec<Mark>,
    children: Vec<Spawned>,
    pub net: Net,
    dir: tempfile::TempDir,
}

impl Lab {
    /// Namespaces, etcd, Patroni (optiplex bootstraps and leads, epyc replicates), the roles and
    /// the workload table, and every front end on both database nodes, each routing to the leader.
    pub async fn start(replication: Replication, front_ends: Vec<FrontEnd>, pgleader: &Path) -> Lab {
        // Processes run in the lab's temp dir: a relative path would not name the binary there.
        let pgleader = &std::fs::canonicalize(pgleader)
            .unwrap_or_else(|e| panic!("{}: {e} (cargo build --bin pgleader)", pgleader.display()));
        let net = Net::create();
        let dir = tempfile::Builder::new().prefix("pgleader-partitions-").tempdir().expect("tempdir");
        let scope = format!("pgl-{}", std::process::id());
        let mut lab = Lab {
            replication,
            scope,
            front_ends,
            configs: BTreeMap::new(),
            started: Instant::now(),
            marks: Vec::new(),
            children: Vec::new(),
            net,
            dir,
        };
        let t0 = Instant::now();
        lab.start_etcd();
        lab.write_patroni_configs();
        // Patroni runs as the server user: it must enter the lab's dir and own its node dirs.
        // (Not the whole tree: etcd, started above as root, creates and removes files in it.)
        if let Some((uid, gid)) = run_as() {
            std::os::unix::fs::chown(lab.dir.path(), Some(uid), Some(gid)).expect("chown the lab's dir");
        }
        for node in DB_NODES {
            chown_tree(&lab.node_dir(node));
        }
        lab.start_patroni("optiplex");
        lab.wait_until("optiplex leads", |lab| Box::pin(lab.is_writable_primary("optiplex"))).await;
        lab.start_patroni("epyc");
        lab.wait_until("epyc replicates", |lab| Box::pin(lab.cluster_healthy())).await;
        lab.create_roles().await;
        eprintln!("[{replication}] etcd and Patroni up in {:.1} s", t0.elapsed().as_secs_f64());
        for fe in lab.front_ends.clone() {
            for node in DB_NODES {
                lab.start_front_end(&fe, node, pgleader);
            }
        }
        for fe in lab.front_ends.clone() {
            for node in DB_NODES {
                lab.wait_front_end_ready(&fe, node).await;
            }
        }
        eprintln!("[{replication}] lab up in {:.1} s", t0.elapsed().as_secs_f64());
        lab
    }

    /// Milliseconds on the lab's clock.
    pub fn now_ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1000.0
    }

    /// Records a named moment on the lab's clock (also printed).
    pub fn mark(&mut self, label: &str) -> f64 {
        let at_ms = self.now_ms();
        eprintln!("  {:>7.2} s  {label}", at_ms / 1000.0);
        self.marks.push(Mark { at_ms, label: label.to_owned() });
        at_ms
    }

    fn ns(&self, node: &str) -> &Netns {
        self.net.node(node)
    }

    fn spawn(&mut self, what: &str, node: &str, program: &Path, args: &[String], as_user: Option<(u32, u32)>) {
        let log = self.dir.path().join(format!("{what}.log"));
        let file = File::create(&log).expect("log file");
        if let Some((uid, gid)) = as_user {
            let _ = std::os::unix::fs::chown(&log, Some(uid), Some(gid));
        }
        let mut cmd = self.ns(node).command(program, as_user);
        cmd.args(args)
            .current_dir(self.dir.path())
            .env_remove("PGHOST")
            .env_remove("PGPORT")
            .env_remove("PGUSER")
            .env_remove("PGDATABASE")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup log"))
            .stderr(file);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what} ({}): {e}", program.display()));
        self.children.push(Spawned { what: what.to_owned(), child, log });
    }

    fn start_etcd(&mut self) {
        let etcd = etcd_bin();
        let peers: Vec<String> =
            super::netns::NODES.iter().map(|(n, a)| format!("{n}=http://{a}:{ETCD_PEER_PORT}")).collect();
        for (node, addr) in super::netns::NODES {
            let args = vec![
                format!("--name={node}"),
                format!("--data-dir={}", self.dir.path().join(format!("etcd-{node}")).display()),
                format!("--listen-client-urls=http://{addr}:{ETCD_CLIENT_PORT}"),
                format!("--advertise-client-urls=http://{addr}:{ETCD_CLIENT_PORT}"),
                format!("--listen-peer-urls=http://{addr}:{ETCD_PEER_PORT}"),
                format!("--initial-advertise-peer-urls=http://{addr}:{ETCD_PEER_PORT}"),
                format!("--initial-cluster={}", peers.join(",")),
                "--initial-cluster-state=new".to_owned(),
                format!("--initial-cluster-token={}", self.scope),
                format!("--heartbeat-interval={ETCD_HEARTBEAT_MS}"),
                format!("--election-timeout={ETCD_ELECTION_MS}"),
            ];
            self.spawn(&format!("etcd-{node}"), node, &etcd, &args, None);
        }
    }

    fn node_dir(&self, node: &str) -> PathBuf {
        self.dir.path().join(node)
    }

    fn write_patroni_configs(&mut self) {
        let hosts: Vec<String> = super::netns::NODES.iter().map(|(_, a)| format!("{a}:{ETCD_CLIENT_PORT}")).collect();
        for node in DB_NODES {
            let dir = self.node_dir(node);
            std::fs::create_dir_all(&dir).expect("node dir");
            let yaml = patroni_yaml(node, &self.scope, self.replication, &hosts.join(","), &dir);
            std::fs::write(dir.join("patroni.yml"), &yaml).expect("write patroni.yml");
            self.configs.insert(format!("{node}-patroni.yml"), yaml);
        }
    }

    fn start_patroni(&mut self, node: &str) {
        let patroni = patroni_venv().join("bin/patroni");
        let cfg = self.node_dir(node).join("patroni.yml").display().to_string();
        self.spawn(&format!("patroni-{node}"), node, &patroni, &[cfg], run_as());
    }

    fn start_front_end(&mut self, fe: &FrontEnd, node: &str, pgleader: &Path) {
        let text = fe.config(node, &self.scope);
        let name = fe.file_name(node);
        let path = self.dir.path().join(&name);
        std::fs::write(&path, &text).expect("write front-end config");
        self.configs.insert(name.clone(), text);
        let what = format!("{node}-{}", fe.kind.slug());
        match fe.kind {
            FrontEndKind::PgleaderSql | FrontEndKind::PgleaderFenced => {
                let check = Command::new(pgleader).arg("check-config").arg("--config").arg(&path).output();
                let check = check.unwrap_or_else(|e| panic!("run {} check-config: {e}", pgleader.display()));
                assert!(
                    check.status.success(),
                    "{what}: pgleader rejects its config:\n{}",
                    String::from_utf8_lossy(&check.stderr)
                );
                let args = vec!["--config".to_owned(), path.display().to_string()];
                self.spawn(&what, node, pgleader, &args, None);
            }
            FrontEndKind::HaproxyRest | FrontEndKind::HaproxyTcp => {
                let check = Command::new("haproxy").arg("-c").arg("-q").arg("-f").arg(&path).output();
                let check = check.expect("run haproxy -c (apt-get install haproxy)");
                assert!(check.status.success(), "haproxy -c {name}: {}", String::from_utf8_lossy(&check.stderr));
                let args = vec!["-db".to_owned(), "-f".to_owned(), path.display().to_string()];
                self.spawn(&what, node, Path::new("/usr/sbin/haproxy"), &args, None);
            }
        }
    }

    /// Polls `check` every 100 ms for [`PATIENCE`]; panics naming `what` (and a process that
    /// exited, if one did).
    async fn wait_until(
        &mut self,
        what: &str,
        check: impl for<'a> Fn(&'a Lab) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + 'a>>,
    ) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if check(self).await {
                return;
            }
            self.assert_all_running(what);
            assert!(Instant::now() < deadline, "timed out after {PATIENCE:?} waiting until {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Panics if a process the lab started has exited (while waiting until `what`).
    fn assert_all_running(&mut self, what: &str) {
        for s in &mut self.children {
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!("{} exited ({status}) while waiting until {what}", s.what);
            }
        }
    }

    /// `GET path` on `node`'s Patroni REST API, from inside `node`.
    async fn patroni_get(&self, node: &str, path: &'static str) -> Option<serde_json::Value> {
        let addr = SocketAddr::from((addr_of(node), PATRONI_API_PORT));
        let answer = self
            .ns(node)
            .rt
            .run(async move { tokio::time::timeout(Duration::from_secs(1), http_get(addr, path)).await })
            .await;
        let Ok(Ok((_, body))) = answer else { return None };
        serde_json::from_str(&body).ok()
    }

    /// Does `node`'s own Patroni say it runs as the primary?
    pub async fn says_primary(&self, node: &str) -> bool {
        let Some(p) = self.patroni_get(node, "/patroni").await else { return false };
        matches!(p["role"].as_str(), Some("primary" | "master")) && p["state"] == "running"
    }

    /// `node`'s Patroni says primary and its PostgreSQL takes writes.
    pub async fn is_writable_primary(&self, node: &str) -> bool {
        if !self.says_primary(node).await {
            return false;
        }
        let config = superuser_config(node, "postgres");
        self.ns(node)
            .rt
            .run(async move {
                let Ok((client, conn)) = config.connect(tokio_postgres::NoTls).await else { return false };
                tokio::spawn(conn);
                client.query_one("SELECT pg_is_in_recovery()", &[]).await.is_ok_and(|r| !r.get::<_, bool>(0))
            })
            .await
    }

    /// The database nodes whose own Patroni says "primary".
    pub async fn primaries(&self) -> Vec<String> {
        let mut out = Vec::new();
        for node in DB_NODES {
            if self.says_primary(node).await {
                out.push(node.to_owned());
            }
        }
        out
    }

    /// One leader running and the other member streaming from it (in sync mode: as the
    /// synchronous standby), as the leader's Patroni reports `/cluster`.
    pub async fn cluster_healthy(&self) -> bool {
        let primaries = self.primaries().await;
        let [leader] = primaries.as_slice() else { return false };
        let Some(c) = self.patroni_get(leader, "/cluster").await else { return false };
        let Some(members) = c["members"].as_array() else { return false };
        let want = match self.replication {
            Replication::Async => "replica",
            Replication::Sync => "sync_standby",
        };
        let leader_ok = members.iter().any(|m| m["name"] == leader.as_str() && m["role"] == "leader");
        let replica_ok =
            members.iter().any(|m| m["name"] != leader.as_str() && m["role"] == want && m["state"] == "streaming");
        leader_ok && replica_ok
    }

    async fn create_roles(&mut self) {
        let config = superuser_config("optiplex", "postgres");
        self.ns("optiplex")
            .rt
            .run(async move {
                let (client, conn) = config.connect(tokio_postgres::NoTls).await.expect("connect to optiplex");
                tokio::spawn(conn);
                // One statement per call: CREATE DATABASE cannot run in a transaction.
                for sql in [
                    format!("CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}'"),
                    format!("CREATE DATABASE {APP_DB} OWNER {APP_USER}"),
                    format!("CREATE ROLE {HEALTH_USER} LOGIN PASSWORD '{HEALTH_PASSWORD}' IN ROLE pg_monitor"),
                ] {
                    client.batch_execute(&sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
                }
            })
            .await;
        let app = app_config("optiplex", pg_port("optiplex"));
        self.ns("optiplex")
            .rt
            .run(async move {
                let (client, conn) = app.connect(tokio_postgres::NoTls).await.expect("connect as the app role");
                tokio::spawn(conn);
                workload::prepare(&client).await.expect("create the workload table");
            })
            .await;
        // The replica must have replayed the roles before a health check logs in there.
        let replayed = |node: &'static str| {
            let mut c = app_config(node, pg_port(node));
            c.user(HEALTH_USER).password(HEALTH_PASSWORD).dbname("postgres");
            c
        };
        for node in DB_NODES {
            let config = replayed(node);
            let deadline = Instant::now() + PATIENCE;
            while !self.ns(node).rt.run(connects(config.clone())).await {
                assert!(Instant::now() < deadline, "{node} never knew the {HEALTH_USER} role");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Waits until 30 connections in a row through `fe` on `node` reach a writable node (HAProxy
    /// starts with every server up and needs its first checks to drop the replica).
    async fn wait_front_end_ready(&mut self, fe: &FrontEnd, node: &str) {
        let config = app_config(node, fe.port);
        let deadline = Instant::now() + PATIENCE;
        let mut in_a_row = 0;
        while in_a_row < 30 {
            assert!(
                Instant::now() < deadline,
                "{} on {node} never reached the primary 30 times in a row",
                fe.kind.slug()
            );
            if self.ns(node).rt.run(reaches_primary(config.clone())).await {
                in_a_row += 1;
            } else {
                in_a_row = 0;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Starts the workload of every front end on both database nodes, inside the node's
    /// namespace, each on its own id range.
    pub async fn start_writers(&self) -> Vec<Writers> {
        let mut out = Vec::new();
        for (i, fe) in self.front_ends.iter().enumerate() {
            for (j, node) in DB_NODES.iter().enumerate() {
                let mut opts =
                    WorkloadOptions::new(&addr_of(node).to_string(), fe.port, APP_USER, APP_PASSWORD, APP_DB);
                opts.attempt_timeout = ATTEMPT_TIMEOUT;
                opts.first_id = 1 + 10_000_000 * (2 * i + j) as i64;
                let offset_ms = self.now_ms();
                let workload = self.ns(node).rt.run(async move { Workload::start(opts) }).await;
                out.push(Writers { front_end: fe.kind, node: (*node).to_owned(), offset_ms, workload });
            }
        }
        out
    }

    /// Ids present on `node` (the final leader), read from inside its namespace.
    pub async fn ids_on(&self, node: &str) -> HashSet<i64> {
        let config = superuser_config(node, APP_DB);
        self.ns(node)
            .rt
            .run(async move {
                let (client, conn) = config.connect(tokio_postgres::NoTls).await.expect("connect to the final leader");
                tokio::spawn(conn);
                let rows = client.query(&format!("SELECT id FROM {}", workload::TABLE), &[]).await.expect("read back");
                rows.iter().map(|r| r.get::<_, i64>(0)).collect()
            })
            .await
    }

    /// The last lines of every log, for a failure message.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut s = String::new();
        for c in &self.children {
            let text = std::fs::read_to_string(&c.log).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            s.push_str(&format!(
                "----- {} (last {lines} lines)\n{}\n",
                c.what,
                all[all.len().saturating_sub(lines)..].join("\n")
            ));
        }
        s
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails(30));
        }
        for s in &mut self.children {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
        // Then `net` kills whatever is left inside (postmasters) and removes the namespaces.
    }
}

async fn connects(config: tokio_postgres::Config) -> bool {
    let attempt = async { config.connect(tokio_postgres::NoTls).await.is_ok() };
    tokio::time::timeout(Duration::from_secs(3), attempt).await.unwrap_or(false)
}

async fn reaches_primary(config: tokio_postgres::Config) -> bool {
    let attempt = async {
        let (client, conn) = config.connect(tokio_postgres::NoTls).await.ok()?;
        tokio::spawn(conn);
        let row = client.query_one("SELECT pg_is_in_recovery()", &[]).await.ok()?;
        Some(!row.get::<_, bool>(0))
    };
    tokio::time::timeout(Duration::from_secs(5), attempt).await.ok().flatten().unwrap_or(false)
}

fn pg_config(node: &str, port: u16, user: &str, password: &str, dbname: &str) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host(addr_of(node).to_string())
        .port(port)
        .user(user)
        .password(password)
        .dbname(dbname)
        .ssl_mode(tokio_postgres::config::SslMode::Disable)
        .connect_timeout(Duration::from_secs(3));
    c
}

fn superuser_config(node: &str, dbname: &str) -> tokio_postgres::Config {
    pg_config(node, pg_port(node), SUPERUSER, SUPERUSER_PASSWORD, dbname)
}

/// The app role at `node`'s address on `port` (PostgreSQL's own or a front end's).
fn app_config(node: &str, port: u16) -> tokio_postgres::Config {
    pg_config(node, port, APP_USER, APP_PASSWORD, APP_DB)
}

/// Patroni's configuration for a database node (JSON is YAML).
fn patroni_yaml(node: &str, scope: &str, replication: Replication, etcd_hosts: &str, dir: &Path) -> String {
    let addr = addr_of(node);
    let port = pg_port(node);
    let yaml = serde_json::json!({
        "scope": scope,
        "name": node,
        "log": { "level": "INFO", "format": "%(asctime)s %(levelname)s: %(message)s" },
        "restapi": {
            "listen": format!("{addr}:{PATRONI_API_PORT}"),
            "connect_address": format!("{addr}:{PATRONI_API_PORT}"),
        },
        "etcd3": { "hosts": etcd_hosts },
        "bootstrap": {
            "dcs": {
                "ttl": TTL_SECS,
                "loop_wait": LOOP_WAIT_SECS,
                "retry_timeout": RETRY_TIMEOUT_SECS,
                "maximum_lag_on_failover": 1_048_576,
                "synchronous_mode": replication == Replication::Sync,
                "postgresql": {
                    "use_pg_rewind": true,
                    "use_slots": true,
                    "parameters": {
                        "wal_level": "replica", "hot_standby": "on", "wal_log_hints": "on",
                        "max_wal_senders": 10, "max_replication_slots": 10, "max_connections": 300,
                        "wal_keep_size": "128MB",
                    },
                },
            },
            "initdb": [ { "encoding": "UTF8" }, { "auth-local": "trust" }, { "auth-host": "md5" } ],
            "pg_hba": [
                "local all all trust",
                "host replication replicator 198.51.100.0/24 md5",
                "host all all 198.51.100.0/24 md5",
            ],
        },
        "postgresql": {
            "listen": format!("{addr}:{port}"),
            "connect_address": format!("{addr}:{port}"),
            "data_dir": dir.join("data"),
            "bin_dir": pg_bin(),
            "pgpass": dir.join("pgpass"),
            "authentication": {
                "superuser": { "username": SUPERUSER, "password": SUPERUSER_PASSWORD },
                "replication": { "username": "replicator", "password": "replicator-secret" },
                "rewind": { "username": "rewinder", "password": "rewinder-secret" },
            },
            "parameters": {
                "unix_socket_directories": dir,
                "fsync": "off",
                "shared_buffers": "32MB",
                "log_line_prefix": "%m [%p] ",
            },
        },
    });
    serde_json::to_string_pretty(&yaml).expect("yaml")
}

/// One front end's workload on one node.
pub struct Writers {
    pub front_end: FrontEndKind,
    pub node: String,
    /// When the workload started on the lab's clock (its own times are relative to that).
    pub offset_ms: f64,
    pub workload: Workload,
}

impl Writers {
    /// Acknowledged writes of `writer` that started at or after `since_ms` on the lab's clock.
    pub fn ok_since(&self, writer: Writer, since_ms: f64) -> usize {
        self.workload.ok_since(writer, since_ms - self.offset_ms)
    }

    /// Has each writer [`ACKS_TO_COUNT`] acknowledged writes since `since_ms` (lab clock)?
    pub fn writing_since(&self, since_ms: f64) -> bool {
        self.ok_since(Writer::NewConn, since_ms) >= ACKS_TO_COUNT.0
            && self.ok_since(Writer::LongLived, since_ms) >= ACKS_TO_COUNT.1
    }

    /// Did no attempt of either writer fail since `since_ms` (lab clock)?
    pub fn no_failure_since(&self, since_ms: f64) -> bool {
        [Writer::NewConn, Writer::LongLived]
            .iter()
            .all(|w| self.workload.failed_since(*w, since_ms - self.offset_ms) == 0)
    }
}
