//! Real PostgreSQL servers for tests, with the semantics of PostgreSQL's `Cluster.pm`:
//! `initdb` into a temp dir, a free loopback port, `pg_basebackup -R` replicas, `promote`,
//! `stop` (fast/immediate), `freeze`/`thaw` (SIGSTOP/SIGCONT of the postmaster and children).
//!
//! Binaries come from `PG_BIN`, else `/usr/lib/postgresql/15/bin`, else `pg_config --bindir`.
//! When the effective uid is 0 the server runs as the `postgres` user (PostgreSQL refuses root).
//! `Drop` stops the server immediately and removes its directory, also when a test panics.
//! A missing PostgreSQL is a hard failure with the install command, never a silent skip.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{eventually_blocking, free_port};

/// Where the PostgreSQL server binaries are.
pub fn pg_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return PathBuf::from(dir);
    }
    let debian = PathBuf::from("/usr/lib/postgresql/15/bin");
    if debian.join("initdb").exists() {
        return debian;
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    panic!("PostgreSQL server binaries not found: run `apt-get install postgresql` or set PG_BIN");
}

/// The uid/gid to run servers as (PostgreSQL, Patroni): `postgres` when we are root, else
/// ourselves (`None`).
pub fn run_as() -> Option<(u32, u32)> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let user = nix::unistd::User::from_name("postgres")
        .expect("read passwd")
        .expect("running as root needs the `postgres` user (apt-get install postgresql)");
    Some((user.uid.as_raw(), user.gid.as_raw()))
}

/// Gives a directory tree to the server user (see [`run_as`]).
pub fn chown_tree(path: &Path) {
    if let Some((uid, gid)) = run_as() {
        let status = Command::new("chown").arg("-R").arg(format!("{uid}:{gid}")).arg(path).status().expect("chown");
        assert!(status.success(), "chown {}", path.display());
    }
}

/// A command from the PostgreSQL bin dir, run as the server user.
fn pg_command(program: &str) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(pg_bin().join(program));
    if let Some((uid, gid)) = run_as() {
        cmd.uid(uid).gid(gid);
    }
    cmd.env_remove("PGHOST").env_remove("PGPORT").env_remove("PGDATABASE").env_remove("PGUSER");
    cmd
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// One PostgreSQL server on 127.0.0.1.
pub struct PgNode {
    pub name: String,
    port: u16,
    /// Owns the directory; removed on drop after the server is stopped.
    dir: tempfile::TempDir,
    running: bool,
}

impl PgNode {
    /// `initdb` a new, empty data directory with test-friendly settings.
    pub fn init(name: &str) -> PgNode {
        let dir = tempfile::Builder::new().prefix(&format!("pgleader-{name}-")).tempdir().expect("tempdir");
        chown_tree(dir.path());
        let node = PgNode { name: name.to_owned(), port: free_port(), dir, running: false };
        run_ok(
            pg_command("initdb")
                .args(["-A", "trust", "-N", "-U", "postgres", "--no-instructions", "-D"])
                .arg(node.datadir()),
        );
        node.append_conf(&node.base_conf());
        node
    }

    fn base_conf(&self) -> String {
        format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\nfsync = off\n\
             full_page_writes = off\nwal_level = replica\nhot_standby = on\nmax_wal_senders = 10\n\
             wal_keep_size = '128MB'\nmax_connections = 300\nshared_buffers = '32MB'\nlog_line_prefix = '%m [%p] '\n\
             logging_collector = off\nwal_log_hints = on\n",
            self.port,
            self.dir.path().display()
        )
    }

    /// `initdb` and start: a primary.
    pub fn start_primary(name: &str) -> PgNode {
        let mut node = PgNode::init(name);
        node.append_hba("host replication all 127.0.0.1/32 trust\n");
        node.start();
        node
    }

    /// A streaming replica of `primary` via `pg_basebackup -R`, started and caught up.
    pub fn start_replica(primary: &PgNode, name: &str) -> PgNode {
        let dir = tempfile::Builder::new().prefix(&format!("pgleader-{name}-")).tempdir().expect("tempdir");
        chown_tree(dir.path());
        let mut node = PgNode { name: name.to_owned(), port: free_port(), dir, running: false };
        run_ok(
            pg_command("pg_basebackup")
                .args(["-h", "127.0.0.1", "-U", "postgres", "-R", "-X", "stream", "--checkpoint=fast", "-p"])
                .arg(primary.port.to_string())
                .arg("-D")
                .arg(node.datadir()),
        );
        node.append_conf(&node.base_conf());
        node.start();
        primary.wait_for_catchup(&node);
        node
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn datadir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn logfile(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    pub fn connstr(&self, dbname: &str) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname={dbname} connect_timeout=5", self.port)
    }

    pub fn url(&self, dbname: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{dbname}?sslmode=disable", self.port)
    }

    pub fn append_conf(&self, text: &str) {
        append(&self.datadir().join("postgresql.conf"), text);
    }

    pub fn append_hba(&self, text: &str) {
        append(&self.datadir().join("pg_hba.conf"), text);
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&mut self) {
        run_ok(
            pg_command("pg_ctl")
                .args(["-w", "-t", "60", "-l"])
                .arg(self.logfile())
                .arg("-D")
                .arg(self.datadir())
                .arg("start")
                .stdout(Stdio::null()),
        );
        self.running = true;
        self.wait_ready();
    }

    /// Polls `pg_isready` until the server answers (no fixed sleep).
    pub fn wait_ready(&self) {
        let port = self.port.to_string();
        eventually_blocking(Duration::from_secs(60), &format!("{} accepts connections", self.name), || {
            pg_command("pg_isready")
                .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
    }

    /// `pg_ctl stop -m fast`.
    pub fn stop(&mut self) {
        self.stop_mode("fast");
    }

    /// `pg_ctl stop -m immediate` (a crash, from the clients' point of view).
    pub fn stop_immediate(&mut self) {
        self.stop_mode("immediate");
    }

    fn stop_mode(&mut self, mode: &str) {
        if !self.running {
            return;
        }
        self.thaw();
        let _ = pg_command("pg_ctl")
            .args(["-w", "-t", "60", "-m", mode, "-D"])
            .arg(self.datadir())
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        self.running = false;
    }

    /// Starts a *smart* shutdown and returns at once: the server refuses new connections with
    /// 57P03 ("the database system is shutting down") while existing sessions go on.
    pub fn begin_smart_shutdown(&self) {
        run_ok(pg_command("pg_ctl").args(["-W", "-m", "smart", "-D"]).arg(self.datadir()).arg("stop"));
    }

    /// `pg_ctl promote` without waiting for it to finish.
    pub fn promote_nowait(&self) {
        run_ok(pg_command("pg_ctl").args(["-W", "-D"]).arg(self.datadir()).arg("promote"));
    }

    /// `pg_ctl promote` and wait until the server is out of recovery.
    pub fn promote(&self) {
        run_ok(pg_command("pg_ctl").args(["-w", "-t", "60", "-D"]).arg(self.datadir()).arg("promote"));
        eventually_blocking(Duration::from_secs(60), &format!("{} promoted", self.name), || {
            self.sql("postgres", "SELECT pg_is_in_recovery()").is_some_and(|s| s == "f")
        });
    }

    /// The postmaster's pid, from `postmaster.pid`.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.datadir().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// SIGSTOP the postmaster and every child: the server hangs with its sockets open.
    pub fn freeze(&self) {
        for pid in self.process_tree() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGSTOP);
        }
    }

    /// SIGCONT what `freeze` stopped.
    pub fn thaw(&self) {
        for pid in self.process_tree() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
        }
    }

    fn process_tree(&self) -> Vec<i32> {
        let Some(root) = self.postmaster_pid() else { return Vec::new() };
        let mut pids = vec![root];
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
                let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
                // Fields after the parenthesised command: state, ppid, ...
                let ppid =
                    stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok());
                if ppid == Some(root) {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    /// Runs psql against this server as `postgres` (ON_ERROR_STOP, no psqlrc).
    pub fn psql(&self, dbname: &str, args: &[&str]) -> Output {
        Command::new(pg_bin().join("psql"))
            .args(["-X", "-v", "ON_ERROR_STOP=1", "-At", "-d", &self.connstr(dbname)])
            .args(args)
            .output()
            .expect("run psql")
    }

    /// One value from a query via psql, or `None` if it failed.
    pub fn sql(&self, dbname: &str, query: &str) -> Option<String> {
        let out = self.psql(dbname, &["-c", query]);
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Like [`PgNode::sql`] but panics with psql's error.
    pub fn sql_ok(&self, dbname: &str, query: &str) -> String {
        let out = self.psql(dbname, &["-c", query]);
        assert!(out.status.success(), "{query}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A tokio-postgres client; the connection task is spawned on the current runtime.
    pub async fn connect(&self, dbname: &str) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.connstr(dbname), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.name));
        tokio::spawn(conn);
        client
    }

    /// Waits until `replica` has replayed everything this primary has written.
    pub fn wait_for_catchup(&self, replica: &PgNode) {
        let lsn = self.sql_ok("postgres", "SELECT pg_current_wal_lsn()");
        let query = format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn");
        eventually_blocking(Duration::from_secs(60), &format!("{} caught up", replica.name), || {
            replica.sql("postgres", &query).is_some_and(|s| s == "t")
        });
    }

    /// The primary's current timeline (DESIGN rule 6).
    pub fn timeline(&self) -> u32 {
        let hex = self.sql_ok("postgres", "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)");
        u32::from_str_radix(&hex, 16).expect("hex timeline")
    }

    pub fn system_identifier(&self) -> u64 {
        self.sql_ok("postgres", "SELECT system_identifier FROM pg_control_system()").parse().expect("system id")
    }
}

impl Drop for PgNode {
    fn drop(&mut self) {
        self.stop_mode("immediate");
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f =
        std::fs::OpenOptions::new().append(true).open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.write_all(text.as_bytes()).expect("append");
}

/// A primary and one streaming replica.
pub struct PgCluster {
    pub primary: PgNode,
    pub replica: PgNode,
}

impl PgCluster {
    pub fn start() -> PgCluster {
        let primary = PgNode::start_primary("primary");
        let replica = PgNode::start_replica(&primary, "replica");
        PgCluster { primary, replica }
    }
}
