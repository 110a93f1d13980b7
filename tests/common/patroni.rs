//! A miniature of the production topology on loopback: 3 etcd members and 2 PostgreSQL 15 nodes
//! managed by Patroni (etcd3 API), for the failover scenarios of issue 3.
//!
//! What it owns: every process it starts (etcd, Patroni, and the postmasters Patroni spawns),
//! one temp dir holding their data, configs and logs. `Drop` kills all of them (SIGCONT first
//! for frozen ones) and removes the dir, also when a test panics; on a panic it prints the tail
//! of every log first. It never signals a process it did not start: postmaster PIDs come from
//! `postmaster.pid` and are checked against `/proc/<pid>/cmdline` (our data dir) before any kill.
//!
//! Versions and where they come from:
//! - Patroni from PyPI, pinned in `scripts/patroni-venv` (4.1.5), in a venv at
//!   `/opt/pgleader-patroni-venv` (override: `PGLEADER_PATRONI_VENV`). Not Debian's 3.0.2: it
//!   has the resumed-hung-leader bug (fixed in 3.0.3, PR #2689) that drops acknowledged writes.
//! - etcd 3.4 from Debian `etcd-server` (v2 API off, hence Patroni's `etcd3` section).
//! - PostgreSQL 15 binaries as found by [`super::pg::pg_bin`].
//!
//! A missing piece is a hard failure that names the install step, never a skip (CI installs them).
//!
//! Timing choices (Patroni DCS): `ttl: 20`, `loop_wait: 1`, `retry_timeout: 5`. Patroni 4 refuses
//! a ttl under 20 s (it silently raises it, see `Config._validate_and_adjust_timeouts`), so the
//! `ttl 10` of the anchors is not reachable with a fixed Patroni; 20 is the floor, and a
//! crash or hang of the leader therefore takes about 20-23 s to fail over here.
//! `loop_wait + 2 * retry_timeout = 11 <= ttl` as Patroni requires.
//!
//! Roles: Patroni creates only its superuser (`postgres`), `replicator` and `rewinder`. After the
//! cluster is up the harness creates, via the leader, the app role and database
//! `vietmarket`/`vietmarket` and the `pgleader` health-check role (LOGIN, member of pg_monitor).
//! `pg_hba` asks for passwords (md5, which accepts SCRAM) on 127.0.0.1, so the proxy path is
//! exercised with real authentication.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::pg::{chown_tree, run_as};
use super::{eventually, free_port};

/// The app role, its password and its database (the runbook's names).
pub const APP_USER: &str = "vietmarket";
pub const APP_PASSWORD: &str = "vietmarket-secret";
pub const APP_DB: &str = "vietmarket";
/// The role pgleader's health checker logs in as.
pub const HEALTH_USER: &str = "pgleader";
pub const HEALTH_PASSWORD: &str = "pgleader-secret";
/// Patroni's superuser (the harness uses it for setup and read-backs).
pub const SUPERUSER: &str = "postgres";
pub const SUPERUSER_PASSWORD: &str = "postgres-secret";

/// Patroni DCS timing, written down in the module doc.
pub const TTL_SECS: u64 = 20;
pub const LOOP_WAIT_SECS: u64 = 1;
pub const RETRY_TIMEOUT_SECS: u64 = 5;
/// etcd's raft timings for every member (ms): heartbeat and election timeout.
pub const ETCD_HEARTBEAT_MS: u64 = 100;
pub const ETCD_ELECTION_MS: u64 = 1000;

/// How long to wait for things Patroni does on its own (bootstrap, failover, rejoin).
pub const PATIENCE: Duration = Duration::from_secs(90);

/// Asynchronous streaming replication (the runbook's cluster) or Patroni `synchronous_mode: true`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replication {
    Async,
    Sync,
}

impl fmt::Display for Replication {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Replication::Async => "async",
            Replication::Sync => "sync",
        })
    }
}

/// The venv made by `scripts/patroni-venv`.
pub fn patroni_venv() -> PathBuf {
    let venv = std::env::var_os("PGLEADER_PATRONI_VENV")
        .map_or_else(|| PathBuf::from("/opt/pgleader-patroni-venv"), PathBuf::from);
    assert!(
        venv.join("bin/patroni").exists() && venv.join("bin/patronictl").exists(),
        "Patroni not found in {}: run `scripts/patroni-venv` (it installs the pinned Patroni from PyPI; \
         .ci/run and scripts/test do this), or set PGLEADER_PATRONI_VENV",
        venv.display()
    );
    venv
}

/// The `etcd` server binary (Debian `etcd-server`).
pub fn etcd_bin() -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| panic!("etcd not found: run `apt-get install -y etcd-server etcd-client` (.ci/run does)"))
}

/// One etcd member we started.
struct EtcdMember {
    client_port: u16,
    peer_port: u16,
    /// Our child while it runs; killed and reaped on drop of the cluster.
    child: Option<Child>,
}

/// One Patroni-managed PostgreSQL node.
pub struct PatroniNode {
    pub name: String,
    /// PostgreSQL's port on 127.0.0.1.
    pub pg_port: u16,
    /// Patroni's REST API port on 127.0.0.1.
    pub api_port: u16,
    dir: PathBuf,
    /// The running Patroni daemon, if any; `None` after a crash or stop until [`PatroniCluster::start_node`].
    patroni: Option<Child>,
    /// PIDs we SIGSTOPped and owe a SIGCONT.
    frozen: Vec<i32>,
}

impl PatroniNode {
    pub fn pg_addr(&self) -> String {
        format!("127.0.0.1:{}", self.pg_port)
    }

    pub fn api_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.api_port))
    }

    pub fn datadir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("patroni.yml")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("patroni.log")
    }

    /// A tokio-postgres config for this node directly (no proxy).
    pub fn pg_config(&self, user: &str, password: &str, dbname: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(self.pg_port)
            .user(user)
            .password(password)
            .dbname(dbname)
            .ssl_mode(tokio_postgres::config::SslMode::Disable)
            .connect_timeout(Duration::from_secs(3));
        c
    }

    /// Connects as the superuser; the connection task runs on the current runtime.
    ///
    /// # Errors
    /// Whatever the connect returns.
    pub async fn connect_superuser(&self, dbname: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) =
            self.pg_config(SUPERUSER, SUPERUSER_PASSWORD, dbname).connect(tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// The postmaster's PID, only if `postmaster.pid` names a live process running on our data dir.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.datadir().join("postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let datadir = self.datadir();
        let ours = String::from_utf8_lossy(&cmdline).contains(&*datadir.to_string_lossy());
        ours.then_some(pid)
    }

    /// Sends `signal` to every PostgreSQL process of this node, atomically with respect to forks:
    /// the postmaster is stopped first (so it cannot fork a backend we would miss), then its
    /// children are signalled until no new one shows up, then the postmaster itself (unless the
    /// signal is SIGSTOP, which it already has). Returns the PIDs signalled.
    fn signal_postgres(&self, signal: Signal) -> Vec<i32> {
        let Some(root) = self.postmaster_pid() else { return Vec::new() };
        let _ = kill(Pid::from_raw(root), Signal::SIGSTOP);
        let mut done = vec![root];
        loop {
            let new: Vec<i32> = children_of(root).into_iter().filter(|p| !done.contains(p)).collect();
            if new.is_empty() {
                break;
            }
            for &pid in &new {
                let _ = kill(Pid::from_raw(pid), signal);
            }
            done.extend(new);
        }
        if signal != Signal::SIGSTOP {
            let _ = kill(Pid::from_raw(root), signal);
            let _ = kill(Pid::from_raw(root), Signal::SIGCONT);
        }
        done
    }

    /// The Patroni daemon's PID, if it runs (and is still our unreaped child).
    fn patroni_pid(&mut self) -> Option<i32> {
        let child = self.patroni.as_mut()?;
        match child.try_wait() {
            Ok(None) => i32::try_from(child.id()).ok(),
            _ => None,
        }
    }

    /// SIGKILL Patroni, then the postmaster and its children: a crash of the whole node.
    fn kill_all(&mut self) {
        self.thaw();
        if let Some(mut child) = self.patroni.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let pids = self.signal_postgres(Signal::SIGKILL);
        if let Some(&root) = pids.first() {
            wait_gone(root, Duration::from_secs(10));
        }
    }

    fn thaw(&mut self) {
        for pid in self.frozen.drain(..) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path(), lines)
    }
}

/// PIDs whose parent is `parent`, from `/proc/*/stat`.
fn children_of(parent: i32) -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return pids };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // Fields after the parenthesised command: state, ppid, ...
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok());
        if ppid == Some(parent) {
            pids.push(pid);
        }
    }
    pids
}

/// Polls until `/proc/<pid>` is gone (bounded; a zombie of someone else's counts as gone enough).
fn wait_gone(pid: i32, patience: Duration) {
    let deadline = std::time::Instant::now() + patience;
    while std::time::Instant::now() < deadline {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
        let alive =
            state.is_some_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')));
        if !alive {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// One member as Patroni's REST `GET /cluster` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    /// `leader`, `replica`, `sync_standby`, ...
    pub role: String,
    /// `running`, `streaming`, `stopped`, `starting`, ...
    pub state: String,
    pub timeline: Option<u64>,
}

/// The cluster: etcd, two Patroni nodes, and the temp dir that holds them.
pub struct PatroniCluster {
    pub replication: Replication,
    pub scope: String,
    pub nodes: Vec<PatroniNode>,
    etcd: Vec<EtcdMember>,
    venv: PathBuf,
    /// Owns every data dir, config and log; removed after all processes are dead (field order).
    dir: tempfile::TempDir,
}

impl PatroniCluster {
    /// Starts etcd (3 members) and Patroni on two nodes, node0 first so it bootstraps and leads,
    /// waits for a streaming (in sync mode: synchronous) replica, then creates the roles and the
    /// app database via the leader.
    ///
    /// Ports are picked free just before use (below the ephemeral range, see [`free_port`]), so
    /// another process can still take one in between and PostgreSQL, Patroni or etcd then fails
    /// to bind. etcd members are restarted on new ports at once when one cannot bind; a bootstrap
    /// that fails (a Patroni exits, a log says "Address already in use", or no leader within
    /// [`PATIENCE`]) is retried from scratch with new ports, up to 3 times, printing the logs of
    /// each failed attempt.
    pub async fn start(replication: Replication) -> PatroniCluster {
        const ATTEMPTS: u32 = 3;
        let mut attempt = 1;
        loop {
            let mut cluster = PatroniCluster::spawn(replication).await;
            match cluster.bootstrap().await {
                Ok(()) => {
                    cluster.create_roles().await;
                    return cluster;
                }
                Err(why) => {
                    eprintln!(
                        "Patroni bootstrap attempt {attempt}/{ATTEMPTS} failed: {why}\n{}",
                        cluster.log_tails(80)
                    );
                    assert!(attempt < ATTEMPTS, "the Patroni cluster did not come up in {ATTEMPTS} attempts: {why}");
                    attempt += 1;
                }
            }
        }
    }

    /// etcd running and both nodes' configs written; no Patroni yet.
    async fn spawn(replication: Replication) -> PatroniCluster {
        let venv = patroni_venv();
        let etcd_bin = etcd_bin();
        let pg_bin = super::pg::pg_bin();
        let dir = tempfile::Builder::new().prefix("pgleader-patroni-").tempdir().expect("tempdir");
        let scope = format!("pgl-{}", std::process::id());
        let mut cluster = PatroniCluster { replication, scope, nodes: Vec::new(), etcd: Vec::new(), venv, dir };

        cluster.start_etcd(&etcd_bin).await;
        let hosts = cluster.etcd.iter().map(|m| format!("127.0.0.1:{}", m.client_port)).collect::<Vec<_>>().join(",");
        for i in 0..2 {
            let node_dir = cluster.dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir).expect("node dir");
            let node = PatroniNode {
                name: format!("node{i}"),
                pg_port: free_port(),
                api_port: free_port(),
                dir: node_dir,
                patroni: None,
                frozen: Vec::new(),
            };
            std::fs::write(node.config_path(), cluster.patroni_yaml(&node, &hosts, &pg_bin))
                .expect("write patroni.yml");
            cluster.nodes.push(node);
        }
        chown_tree(cluster.dir.path());
        cluster
    }

    /// node0 bootstraps and leads, then node1 joins; fails fast if a Patroni exits.
    async fn bootstrap(&mut self) -> Result<(), String> {
        self.start_node("node0");
        self.bootstrap_step("node0 leads", |c| Box::pin(c.is_writable_leader("node0"))).await?;
        self.start_node("node1");
        self.bootstrap_step("node1 replicates", |c| Box::pin(c.is_ready_replica("node1"))).await
    }

    async fn bootstrap_step(
        &mut self,
        what: &str,
        check: impl for<'a> Fn(&'a PatroniCluster) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + 'a>>,
    ) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if check(self).await {
                return Ok(());
            }
            for node in &mut self.nodes {
                if node.patroni.is_some() && node.patroni_pid().is_none() {
                    return Err(format!("{}'s Patroni exited while waiting until {what}", node.name));
                }
                // PostgreSQL's and Patroni's own output both go to this log.
                if super::port_was_taken(&node.log_tail(200)) {
                    return Err(format!("a port of {} was taken before it was bound", node.name));
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!("timed out after {PATIENCE:?} waiting until {what}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts the 3 etcd members and waits until each listens; when one cannot bind its port
    /// (taken since it was picked), all are restarted on new ports.
    async fn start_etcd(&mut self, etcd_bin: &Path) {
        const ATTEMPTS: u32 = 5;
        for attempt in 1..=ATTEMPTS {
            self.spawn_etcd(etcd_bin);
            match self.wait_etcd_listening().await {
                Ok(()) => return,
                Err(log) => {
                    for m in &mut self.etcd {
                        if let Some(mut c) = m.child.take() {
                            let _ = c.kill();
                            let _ = c.wait();
                        }
                    }
                    self.etcd.clear();
                    assert!(
                        super::port_was_taken(&log) && attempt < ATTEMPTS,
                        "etcd did not start (attempt {attempt}/{ATTEMPTS}):\n{log}"
                    );
                    eprintln!("an etcd port was taken before etcd bound it; restarting etcd on new ports");
                }
            }
        }
    }

    fn spawn_etcd(&mut self, etcd_bin: &Path) {
        self.etcd =
            (0..3).map(|_| EtcdMember { client_port: free_port(), peer_port: free_port(), child: None }).collect();
        for (i, _) in (0..3).enumerate() {
            let _ = std::fs::remove_dir_all(self.dir.path().join(format!("etcd{i}")));
            self.spawn_etcd_member(etcd_bin, i);
        }
    }

    /// Starts member `i` on its ports and data dir (a restart keeps both).
    fn spawn_etcd_member(&mut self, etcd_bin: &Path, i: usize) {
        let initial = self
            .etcd
            .iter()
            .enumerate()
            .map(|(j, m)| format!("e{j}=http://127.0.0.1:{}", m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let (client, peer) = (self.etcd[i].client_port, self.etcd[i].peer_port);
        let data_dir = self.dir.path().join(format!("etcd{i}"));
        let log = File::options().create(true).append(true).open(self.etcd_log(i)).expect("etcd log");
        let child = Command::new(etcd_bin)
            .arg("--name")
            .arg(format!("e{i}"))
            .arg("--data-dir")
            .arg(data_dir)
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!("--initial-cluster={initial}"))
            .arg("--initial-cluster-state=new")
            .arg(format!("--initial-cluster-token={}", self.scope))
            // Small intervals: a loopback cluster elects its raft leader in well under a second.
            .args([
                format!("--heartbeat-interval={ETCD_HEARTBEAT_MS}"),
                format!("--election-timeout={ETCD_ELECTION_MS}"),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn etcd: {e} (apt-get install -y etcd-server)"));
        self.etcd[i].child = Some(child);
    }

    /// The etcd client URLs, member 0 first (for pgleader's `[etcd] endpoints`).
    pub fn etcd_endpoints(&self) -> Vec<String> {
        self.etcd.iter().map(|m| format!("http://127.0.0.1:{}", m.client_port)).collect()
    }

    /// Stops etcd member `i` with SIGTERM (a leader hands its leadership over) and waits until it
    /// has exited.
    pub async fn stop_etcd(&mut self, i: usize) {
        let Some(mut child) = self.etcd[i].child.take() else { return };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while child.try_wait().expect("wait etcd").is_none() {
            if tokio::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("etcd member e{i} did not stop within {PATIENCE:?} of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL etcd member `i` (a crash: no leadership handover).
    pub fn kill_etcd(&mut self, i: usize) {
        if let Some(mut child) = self.etcd[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The index of the member that is etcd's raft leader, as the members themselves say.
    pub async fn etcd_leader(&self) -> Option<usize> {
        for (i, m) in self.etcd.iter().enumerate().filter(|(_, m)| m.child.is_some()) {
            let endpoint = format!("127.0.0.1:{}", m.client_port);
            let Ok(out) = etcdctl(&endpoint, &["endpoint", "status", "-w", "json", "--command-timeout=1s"]).await
            else {
                continue;
            };
            let Ok(json) = serde_json::from_str::<serde_json::Value>(&out) else { continue };
            let status = &json[0]["Status"];
            if status["leader"].as_u64().is_some() && status["leader"] == status["header"]["member_id"] {
                return Some(i);
            }
        }
        None
    }

    /// Starts etcd member `i` again after [`PatroniCluster::stop_etcd`] (same ports, same data) and waits until it answers a quorum
    /// read.
    pub async fn restart_etcd(&mut self, i: usize) {
        assert!(self.etcd[i].child.is_none(), "etcd member e{i} runs");
        self.spawn_etcd_member(&etcd_bin(), i);
        let endpoint = format!("127.0.0.1:{}", self.etcd[i].client_port);
        eventually(PATIENCE, &format!("etcd member e{i} healthy"), || async {
            let out = etcdctl(&endpoint, &["endpoint", "health", "--command-timeout=1s"]).await;
            out.ok().map(|_| ())
        })
        .await;
    }

    /// The value of Patroni's leader key (`/service/<scope>/leader`) by a quorum read through
    /// any member that answers, or `None` when the key is absent or no member answers.
    pub async fn leader_key(&self) -> Option<String> {
        let endpoints = self.etcd.iter().map(|m| format!("127.0.0.1:{}", m.client_port)).collect::<Vec<_>>().join(",");
        let key = format!("/service/{}/leader", self.scope);
        let out = etcdctl(&endpoints, &["get", &key, "--print-value-only", "--command-timeout=1s"]).await.ok()?;
        Some(out.trim().to_owned()).filter(|v| !v.is_empty())
    }

    fn etcd_log(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("etcd{i}.log"))
    }

    /// Waits until every member accepts TCP on its client port (etcd binds its peer port
    /// first); `Err` with the logs when a member exits first.
    async fn wait_etcd_listening(&mut self) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let mut listening = 0;
            for (i, m) in self.etcd.iter_mut().enumerate() {
                if !m.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None))) {
                    let logs: Vec<String> =
                        (0..3).map(|j| tail(&self.dir.path().join(format!("etcd{j}.log")), 20)).collect();
                    return Err(format!("etcd member e{i} exited:\n{}", logs.join("\n")));
                }
                if tokio::net::TcpStream::connect(("127.0.0.1", m.client_port)).await.is_ok() {
                    listening += 1;
                }
            }
            if listening == self.etcd.len() {
                return Ok(());
            }
            assert!(tokio::time::Instant::now() < deadline, "etcd did not listen within {PATIENCE:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn patroni_yaml(&self, node: &PatroniNode, etcd_hosts: &str, pg_bin: &Path) -> String {
        let sync = self.replication == Replication::Sync;
        // JSON is YAML: serde_json builds it, so no quoting mistakes.
        let yaml = serde_json::json!({
            "scope": self.scope,
            "name": node.name,
            "log": { "level": "INFO", "format": "%(asctime)s %(levelname)s: %(message)s" },
            "restapi": {
                "listen": format!("127.0.0.1:{}", node.api_port),
                "connect_address": format!("127.0.0.1:{}", node.api_port),
            },
            "etcd3": { "hosts": etcd_hosts },
            "bootstrap": {
                "dcs": {
                    "ttl": TTL_SECS,
                    "loop_wait": LOOP_WAIT_SECS,
                    "retry_timeout": RETRY_TIMEOUT_SECS,
                    "maximum_lag_on_failover": 1_048_576,
                    "synchronous_mode": sync,
                    "postgresql": {
                        "use_pg_rewind": true,
                        "use_slots": true,
                        "parameters": {
                            "wal_level": "replica",
                            "hot_standby": "on",
                            "wal_log_hints": "on",
                            "max_wal_senders": 10,
                            "max_replication_slots": 10,
                            "max_connections": 200,
                            "wal_keep_size": "128MB",
                        },
                    },
                },
                "initdb": [ { "encoding": "UTF8" }, { "auth-local": "trust" }, { "auth-host": "md5" } ],
                "pg_hba": [
                    "local all all trust",
                    "host replication replicator 127.0.0.1/32 md5",
                    "host all all 127.0.0.1/32 md5",
                ],
            },
            "postgresql": {
                "listen": format!("127.0.0.1:{}", node.pg_port),
                "connect_address": format!("127.0.0.1:{}", node.pg_port),
                "data_dir": node.datadir(),
                "bin_dir": pg_bin,
                "pgpass": node.dir.join("pgpass"),
                "authentication": {
                    "superuser": { "username": SUPERUSER, "password": SUPERUSER_PASSWORD },
                    "replication": { "username": "replicator", "password": "replicator-secret" },
                    "rewind": { "username": "rewinder", "password": "rewinder-secret" },
                },
                "parameters": {
                    "unix_socket_directories": node.dir,
                    // Test data only: a kill -9 of processes keeps the OS page cache, so no loss.
                    "fsync": "off",
                    "shared_buffers": "32MB",
                    "log_line_prefix": "%m [%p] ",
                },
            },
        });
        serde_json::to_string_pretty(&yaml).expect("yaml")
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> &PatroniNode {
        self.nodes.iter().find(|n| n.name == name).unwrap_or_else(|| panic!("no node {name}"))
    }

    fn node_mut(&mut self, name: &str) -> &mut PatroniNode {
        self.nodes.iter_mut().find(|n| n.name == name).unwrap_or_else(|| panic!("no node {name}"))
    }

    /// The other node of the two.
    pub fn other(&self, name: &str) -> &PatroniNode {
        self.nodes.iter().find(|n| n.name != name).expect("two nodes")
    }

    /// The node whose PostgreSQL listens on `port`.
    pub fn node_by_port(&self, port: u16) -> Option<&PatroniNode> {
        self.nodes.iter().find(|n| n.pg_port == port)
    }

    /// Starts (or restarts) the Patroni daemon of `name`, as the `postgres` user.
    pub fn start_node(&mut self, name: &str) {
        use std::os::unix::process::CommandExt;
        let patroni = self.venv.join("bin/patroni");
        let node = self.node_mut(name);
        assert!(node.patroni_pid().is_none(), "{name}: Patroni already runs");
        let log = File::options().create(true).append(true).open(node.log_path()).expect("patroni log");
        if let Some((uid, gid)) = run_as() {
            let _ = std::os::unix::fs::chown(node.log_path(), Some(uid), Some(gid));
        }
        let mut cmd = Command::new(&patroni);
        cmd.arg(node.config_path())
            .current_dir(&node.dir)
            .env_remove("PGHOST")
            .env_remove("PGPORT")
            .env_remove("PGUSER")
            .env_remove("PGDATABASE")
            .env("HOME", &node.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        if let Some((uid, gid)) = run_as() {
            cmd.uid(uid).gid(gid);
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {}: {e}", patroni.display()));
        node.patroni = Some(child);
    }

    /// Crash: SIGKILL the node's Patroni and every PostgreSQL process of it. Its leader key (if
    /// any) stays in etcd until the ttl runs out, as after a real crash.
    pub fn crash(&mut self, name: &str) {
        self.node_mut(name).kill_all();
    }

    /// Graceful stop: SIGTERM to Patroni, which stops PostgreSQL (fast shutdown) and releases
    /// its leader key. Waits (async, bounded) for Patroni to exit, then kills whatever is left.
    pub async fn stop_node(&mut self, name: &str) {
        let node = self.node_mut(name);
        node.thaw();
        if let Some(pid) = node.patroni_pid() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while node.patroni_pid().is_some() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        node.kill_all(); // whatever is left (nothing, normally)
    }

    /// Hang: SIGSTOP the node's Patroni, its postmaster and every child. Sockets stay open;
    /// nothing answers. [`PatroniCluster::thaw`] resumes them.
    pub fn freeze(&mut self, name: &str) {
        let node = self.node_mut(name);
        // Patroni first, so it cannot react to its PostgreSQL stopping.
        if let Some(pid) = node.patroni_pid() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGSTOP);
            node.frozen.push(pid);
        }
        let pids = node.signal_postgres(Signal::SIGSTOP);
        node.frozen.extend(pids);
    }

    /// SIGCONT what [`PatroniCluster::freeze`] or [`PatroniCluster::freeze_postgres`] stopped.
    pub fn thaw(&mut self, name: &str) {
        self.node_mut(name).thaw();
    }

    /// Patroni dies (SIGKILL: an OOM kill, a crash) while its PostgreSQL keeps running: the
    /// leader key is no longer renewed and expires after `ttl`.
    pub fn kill_patroni(&mut self, name: &str) {
        let node = self.node_mut(name);
        if let Some(mut child) = node.patroni.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP the node's PostgreSQL only (Patroni and its REST API keep answering).
    pub fn freeze_postgres(&mut self, name: &str) {
        let node = self.node_mut(name);
        let pids = node.signal_postgres(Signal::SIGSTOP);
        node.frozen.extend(pids);
    }

    /// Changes Patroni's dynamic configuration (`PATCH /config` on a node's REST API), e.g.
    /// `{"failsafe_mode": true}`, and waits until the leader's `GET /config` shows it.
    pub async fn patch_config(&self, patch: serde_json::Value) {
        let node = &self.nodes[0];
        let body = patch.to_string();
        let mut stream = tokio::net::TcpStream::connect(node.api_addr()).await.expect("connect to Patroni's REST API");
        let request = format!(
            "PATCH /config HTTP/1.0\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            node.api_addr(),
            body.len()
        );
        stream.write_all(request.as_bytes()).await.expect("send PATCH /config");
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer).await;
        assert!(answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"), "PATCH /config: {answer}");
        let want = patch.as_object().expect("a JSON object").clone();
        eventually(PATIENCE, "Patroni's dynamic configuration changed", || async {
            let (code, text) = http_get(node.api_addr(), "/config").await.ok()?;
            let config: serde_json::Value = serde_json::from_str(&text).ok()?;
            (code == 200 && want.iter().all(|(k, v)| &config[k] == v)).then_some(())
        })
        .await;
    }

    /// `patronictl switchover --leader <current> --candidate <candidate> --force`.
    pub async fn switchover(&self, candidate: &str) {
        let leader = self.leader().await.expect("a leader before the switchover");
        let out = tokio::process::Command::new(self.venv.join("bin/patronictl"))
            .arg("-c")
            .arg(self.node(candidate).config_path())
            .args(["switchover", "--leader", &leader, "--candidate", candidate, "--force", &self.scope])
            .output()
            .await
            .expect("run patronictl");
        assert!(
            out.status.success(),
            "patronictl switchover failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The members as seen by the first node whose REST API answers within a short timeout.
    pub async fn members(&self) -> Option<Vec<Member>> {
        for node in &self.nodes {
            if !node.frozen.is_empty() {
                continue;
            }
            let Ok(Ok((200, body))) =
                tokio::time::timeout(Duration::from_secs(1), http_get(node.api_addr(), "/cluster")).await
            else {
                continue;
            };
            let Ok(json) = serde_json::from_str::<serde_json::Value>(&body) else { continue };
            let members = json["members"].as_array()?;
            return Some(
                members
                    .iter()
                    .map(|m| Member {
                        name: m["name"].as_str().unwrap_or_default().to_owned(),
                        role: m["role"].as_str().unwrap_or_default().to_owned(),
                        state: m["state"].as_str().unwrap_or_default().to_owned(),
                        timeline: m["timeline"].as_u64(),
                    })
                    .collect(),
            );
        }
        None
    }

    /// The name of the member holding the leader key with PostgreSQL running, if any.
    pub async fn leader(&self) -> Option<String> {
        let members = self.members().await?;
        members.into_iter().find(|m| m.role == "leader" && m.state == "running").map(|m| m.name)
    }

    /// Is `name` Patroni's leader, and does its PostgreSQL take writes (out of recovery)?
    pub async fn is_writable_leader(&self, name: &str) -> bool {
        if self.leader().await.as_deref() != Some(name) {
            return false;
        }
        let Ok(client) = self.node(name).connect_superuser("postgres").await else { return false };
        client.query_one("SELECT pg_is_in_recovery()", &[]).await.is_ok_and(|row| !row.get::<_, bool>(0))
    }

    /// Waits until `name` is Patroni's leader and its PostgreSQL is out of recovery.
    pub async fn wait_leader(&self, name: &str) {
        eventually(PATIENCE, &format!("{name} is the Patroni leader and writable"), || async {
            self.is_writable_leader(name).await.then_some(())
        })
        .await;
    }

    /// Waits until some node other than `old` leads; returns its name.
    pub async fn wait_new_leader(&self, old: &str) -> String {
        let name = eventually(PATIENCE, &format!("a leader other than {old}"), || async {
            self.leader().await.filter(|l| l != old)
        })
        .await;
        self.wait_leader(&name).await;
        name
    }

    /// Does `name` stream from the leader (in sync mode: as the synchronous standby)?
    pub async fn is_ready_replica(&self, name: &str) -> bool {
        let want_role = match self.replication {
            Replication::Async => "replica",
            Replication::Sync => "sync_standby",
        };
        let Some(members) = self.members().await else { return false };
        members.iter().any(|m| m.name == name && m.role == want_role && m.state == "streaming")
    }

    /// Waits until `name` streams from the leader (in sync mode: is the synchronous standby).
    pub async fn wait_replica_ready(&self, name: &str) {
        eventually(PATIENCE, &format!("{name} is a streaming replica ({} replication)", self.replication), || async {
            self.is_ready_replica(name).await.then_some(())
        })
        .await;
    }

    /// Creates the app role and database and the health-check role via the leader.
    async fn create_roles(&self) {
        let leader = self.leader().await.expect("a leader");
        let client = self.node(&leader).connect_superuser("postgres").await.expect("connect to the leader");
        // One statement per call: CREATE DATABASE cannot run in a (multi-statement) transaction.
        for sql in [
            format!("CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}'"),
            format!("CREATE DATABASE {APP_DB} OWNER {APP_USER}"),
            format!("CREATE ROLE {HEALTH_USER} LOGIN PASSWORD '{HEALTH_PASSWORD}' IN ROLE pg_monitor"),
        ] {
            client.batch_execute(&sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        // The replica must have replayed the roles before anyone logs in there (pgleader's
        // health check would otherwise start with a 28P01 on it).
        for node in &self.nodes {
            eventually(PATIENCE, &format!("{} knows the {HEALTH_USER} role", node.name), || async {
                let (c, conn) = node
                    .pg_config(HEALTH_USER, HEALTH_PASSWORD, "postgres")
                    .connect(tokio_postgres::NoTls)
                    .await
                    .ok()?;
                drop(c);
                drop(conn);
                Some(())
            })
            .await;
        }
    }

    /// A superuser client on the current leader's app database, directly (no proxy).
    pub async fn leader_client(&self) -> tokio_postgres::Client {
        let leader = self.leader().await.expect("a leader");
        self.node(&leader).connect_superuser(APP_DB).await.expect("connect to the leader")
    }

    /// The app role's client on the current leader's app database, directly (no proxy).
    pub async fn leader_app_client(&self) -> tokio_postgres::Client {
        let leader = self.leader().await.expect("a leader");
        let node = self.node(&leader);
        let (client, conn) = node
            .pg_config(APP_USER, APP_PASSWORD, APP_DB)
            .connect(tokio_postgres::NoTls)
            .await
            .expect("connect to the leader as the app role");
        tokio::spawn(conn);
        client
    }

    /// The `[health]` and `[[backend]]` sections of a pgleader config for this cluster.
    pub fn pgleader_toml(&self) -> String {
        let mut s = format!("[health]\nuser = \"{HEALTH_USER}\"\npassword = \"{HEALTH_PASSWORD}\"\n");
        for n in &self.nodes {
            s.push_str(&format!("\n[[backend]]\nname = \"{}\"\naddress = \"{}\"\n", n.name, n.pg_addr()));
        }
        s
    }

    /// Ports to node names, for the workload's per-node counts.
    pub fn port_names(&self) -> BTreeMap<u16, String> {
        self.nodes.iter().map(|n| (n.pg_port, n.name.clone())).collect()
    }

    /// The last lines of every log, for a failure message.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            s.push_str(&format!("----- {} patroni.log (last {lines} lines)\n{}\n", n.name, n.log_tail(lines)));
            let pglog = n.datadir().join("log");
            if let Ok(entries) = std::fs::read_dir(&pglog) {
                for e in entries.flatten() {
                    s.push_str(&format!("----- {} {}\n{}\n", n.name, e.path().display(), tail(&e.path(), lines)));
                }
            }
        }
        s
    }
}

impl Drop for PatroniCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails(40));
        }
        for node in &mut self.nodes {
            node.kill_all();
        }
        for m in &mut self.etcd {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // Anything still running from our dir (a postmaster Patroni was starting when it was
        // killed, before it wrote postmaster.pid; a pg_rewind) would keep writing into it while
        // the TempDir is removed. Only our processes name this unique dir on their command line.
        let dir = self.dir.path().to_string_lossy().into_owned();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let strays = processes_mentioning(&dir);
            if strays.is_empty() || std::time::Instant::now() > deadline {
                break;
            }
            for pid in strays {
                let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Live (non-zombie) processes whose command line contains `needle`.
fn processes_mentioning(needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return pids };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        // Zombies have an empty cmdline, so they never match.
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

/// A minimal HTTP/1.0 GET on loopback: status code and body. Enough for Patroni's REST API and
/// pgleader's admin endpoints, without an HTTP client dependency.
///
/// # Errors
/// Connect, I/O, or a response that is not HTTP.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not an HTTP response: {text:.200}"));
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(bad)?;
    Ok((code, body.to_owned()))
}

/// `etcdctl` (v3 API) against `endpoints` (`host:port`, comma-separated); stdout.
///
/// # Errors
/// etcdctl failed: its stderr.
pub async fn etcdctl(endpoints: &str, args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .arg("--dial-timeout=1s")
        .args(args)
        .output()
        .await
        .map_err(|e| format!("run etcdctl: {e} (apt-get install -y etcd-client)"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}
