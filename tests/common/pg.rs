//! Real PostgreSQL servers for tests, with the semantics of PostgreSQL's `Cluster.pm`:
//! `initdb` into a temp dir, a free loopback port, `pg_basebackup -R` replicas, `promote`,
//! `stop` (fast/immediate), `freeze`/`thaw` (SIGSTOP/SIGCONT of the postmaster and children).
//!
//! Binaries come from `PG_BIN`, else `/usr/lib/postgresql/15/bin`, else `pg_config --bindir`.
//! When the effective uid is 0 the server runs as the `postgres` user (PostgreSQL refuses root).
//! `Drop` stops the server immediately and removes its directory, also when a test panics.
//! A missing PostgreSQL is a hard failure with the install command, never a silent skip.
//! A start whose port was taken in the meantime (EADDRINUSE in the server log) is retried with
//! a new port from [`free_port`].
//!
//! Blocking and async: the plain methods run their commands with `std::process` and poll with
//! `thread::sleep`, for setup before anything async runs. Inside an async test that hosts an
//! in-process pgleader, use the `*_async` twins (`tokio::process`, `tokio::time::sleep`), so
//! the harness never blocks a thread the runtime needs.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{eventually, eventually_blocking, free_port, port_was_taken};

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
    check_ok(cmd, out)
}

/// [`run_ok`] on tokio's process driver: the calling task waits, no thread blocks.
async fn run_ok_async(cmd: Command) -> Output {
    let what = format!("{cmd:?}");
    let out = tokio::process::Command::from(cmd).output().await.unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    check_ok(&what, out)
}

fn check_ok(cmd: &dyn std::fmt::Debug, out: Output) -> Output {
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// How many times a start is retried with a new port after EADDRINUSE.
const PORT_ATTEMPTS: u32 = 5;

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

    /// Starts the server and waits until it accepts connections. If its port was taken since
    /// it was picked, moves to a new one (a later `port` line wins) and starts again.
    pub fn start(&mut self) {
        for attempt in 1..=PORT_ATTEMPTS {
            let out = self.start_cmd().output().expect("spawn pg_ctl start");
            if out.status.success() {
                self.running = true;
                self.wait_ready();
                return;
            }
            self.retry_on_another_port(attempt, &out);
        }
    }

    /// [`PgNode::start`] without blocking the runtime.
    pub async fn start_async(&mut self) {
        for attempt in 1..=PORT_ATTEMPTS {
            let out = tokio::process::Command::from(self.start_cmd()).output().await.expect("spawn pg_ctl start");
            if out.status.success() {
                self.running = true;
                self.wait_ready_async().await;
                return;
            }
            self.retry_on_another_port(attempt, &out);
        }
    }

    fn start_cmd(&self) -> Command {
        let mut cmd = pg_command("pg_ctl");
        cmd.args(["-w", "-t", "60", "-l"]).arg(self.logfile()).arg("-D").arg(self.datadir()).arg("start");
        cmd.stdout(Stdio::null());
        cmd
    }

    /// After a failed `pg_ctl start`: a new port if the old one was taken, else the failure.
    fn retry_on_another_port(&mut self, attempt: u32, out: &Output) {
        let log = std::fs::read_to_string(self.logfile()).unwrap_or_default();
        assert!(
            port_was_taken(&log) && attempt < PORT_ATTEMPTS,
            "{}: pg_ctl start failed (attempt {attempt}): {}\n{}\nserver log:\n{log}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        eprintln!("{}: port {} was taken before the server bound it; retrying on {port}", self.name, self.port);
        self.port = port;
        // Truncated, so the next failure is judged on its own log lines.
        let _ = std::fs::write(self.logfile(), "");
        self.append_conf(&format!("port = {port}\n"));
    }

    fn isready_cmd(&self) -> Command {
        let mut cmd = pg_command("pg_isready");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres"]).stdout(Stdio::null());
        cmd
    }

    /// Polls `pg_isready` until the server answers (no fixed sleep).
    pub fn wait_ready(&self) {
        eventually_blocking(Duration::from_secs(60), &format!("{} accepts connections", self.name), || {
            self.isready_cmd().status().is_ok_and(|s| s.success())
        });
    }

    /// [`PgNode::wait_ready`] without blocking the runtime.
    pub async fn wait_ready_async(&self) {
        eventually(Duration::from_secs(60), &format!("{} accepts connections", self.name), || async {
            let status = tokio::process::Command::from(self.isready_cmd()).status().await;
            status.is_ok_and(|s| s.success()).then_some(())
        })
        .await;
    }

    /// `pg_ctl stop -m fast`.
    pub fn stop(&mut self) {
        self.stop_mode("fast");
    }

    /// `pg_ctl stop -m immediate` (a crash, from the clients' point of view).
    pub fn stop_immediate(&mut self) {
        self.stop_mode("immediate");
    }

    /// [`PgNode::stop`] without blocking the runtime.
    pub async fn stop_async(&mut self) {
        self.stop_mode_async("fast").await;
    }

    /// [`PgNode::stop_immediate`] without blocking the runtime.
    pub async fn stop_immediate_async(&mut self) {
        self.stop_mode_async("immediate").await;
    }

    fn stop_cmd(&self, mode: &str) -> Command {
        let mut cmd = pg_command("pg_ctl");
        cmd.args(["-w", "-t", "60", "-m", mode, "-D"]).arg(self.datadir()).arg("stop");
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        cmd
    }

    fn stop_mode(&mut self, mode: &str) {
        if !self.running {
            return;
        }
        self.thaw();
        let _ = self.stop_cmd(mode).status();
        self.running = false;
    }

    async fn stop_mode_async(&mut self, mode: &str) {
        if !self.running {
            return;
        }
        self.thaw();
        let _ = tokio::process::Command::from(self.stop_cmd(mode)).status().await;
        self.running = false;
    }

    fn pg_ctl(&self, args: &[&str], action: &str) -> Command {
        let mut cmd = pg_command("pg_ctl");
        cmd.args(args).arg("-D").arg(self.datadir()).arg(action);
        cmd
    }

    /// Starts a *smart* shutdown and returns at once: the server refuses new connections with
    /// 57P03 ("the database system is shutting down") while existing sessions go on.
    pub fn begin_smart_shutdown(&self) {
        run_ok(&mut self.pg_ctl(&["-W", "-m", "smart"], "stop"));
    }

    /// [`PgNode::begin_smart_shutdown`] without blocking the runtime.
    pub async fn begin_smart_shutdown_async(&self) {
        run_ok_async(self.pg_ctl(&["-W", "-m", "smart"], "stop")).await;
    }

    /// `pg_ctl promote` without waiting for it to finish.
    pub fn promote_nowait(&self) {
        run_ok(&mut self.pg_ctl(&["-W"], "promote"));
    }

    /// [`PgNode::promote_nowait`] without blocking the runtime.
    pub async fn promote_nowait_async(&self) {
        run_ok_async(self.pg_ctl(&["-W"], "promote")).await;
    }

    /// `pg_ctl promote` and wait until the server is out of recovery.
    pub fn promote(&self) {
        run_ok(&mut self.pg_ctl(&["-w", "-t", "60"], "promote"));
        eventually_blocking(Duration::from_secs(60), &format!("{} promoted", self.name), || {
            self.sql("postgres", "SELECT pg_is_in_recovery()").is_some_and(|s| s == "f")
        });
    }

    /// [`PgNode::promote`] without blocking the runtime.
    pub async fn promote_async(&self) {
        run_ok_async(self.pg_ctl(&["-w", "-t", "60"], "promote")).await;
        eventually(Duration::from_secs(60), &format!("{} promoted", self.name), || async {
            (self.sql_async("postgres", "SELECT pg_is_in_recovery()").await.as_deref() == Some("f")).then_some(())
        })
        .await;
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

    fn psql_cmd(&self, dbname: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(pg_bin().join("psql"));
        cmd.args(["-X", "-v", "ON_ERROR_STOP=1", "-At", "-d", &self.connstr(dbname)]).args(args);
        cmd
    }

    /// Runs psql against this server as `postgres` (ON_ERROR_STOP, no psqlrc).
    pub fn psql(&self, dbname: &str, args: &[&str]) -> Output {
        self.psql_cmd(dbname, args).output().expect("run psql")
    }

    /// [`PgNode::psql`] without blocking the runtime.
    pub async fn psql_async(&self, dbname: &str, args: &[&str]) -> Output {
        tokio::process::Command::from(self.psql_cmd(dbname, args)).output().await.expect("run psql")
    }

    /// One value from a query via psql, or `None` if it failed.
    pub fn sql(&self, dbname: &str, query: &str) -> Option<String> {
        stdout_if_ok(&self.psql(dbname, &["-c", query]))
    }

    /// [`PgNode::sql`] without blocking the runtime.
    pub async fn sql_async(&self, dbname: &str, query: &str) -> Option<String> {
        stdout_if_ok(&self.psql_async(dbname, &["-c", query]).await)
    }

    /// Like [`PgNode::sql`] but panics with psql's error.
    pub fn sql_ok(&self, dbname: &str, query: &str) -> String {
        expect_stdout(query, &self.psql(dbname, &["-c", query]))
    }

    /// [`PgNode::sql_ok`] without blocking the runtime.
    pub async fn sql_ok_async(&self, dbname: &str, query: &str) -> String {
        expect_stdout(query, &self.psql_async(dbname, &["-c", query]).await)
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

    /// [`PgNode::wait_for_catchup`] without blocking the runtime.
    pub async fn wait_for_catchup_async(&self, replica: &PgNode) {
        let lsn = self.sql_ok_async("postgres", "SELECT pg_current_wal_lsn()").await;
        let query = format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn");
        eventually(Duration::from_secs(60), &format!("{} caught up", replica.name), || async {
            (replica.sql_async("postgres", &query).await.as_deref() == Some("t")).then_some(())
        })
        .await;
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

fn stdout_if_ok(out: &Output) -> Option<String> {
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn expect_stdout(query: &str, out: &Output) -> String {
    assert!(out.status.success(), "{query}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
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

/// Runs blocking harness work (psql, pg_ctl) off the runtime that hosts the in-process proxy.
#[allow(dead_code, reason = "not every suite runs harness work from async code")]
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking harness step")
}

/// Lines of a server log that record a connection authorized for `database` (`log_connections`).
#[allow(dead_code, reason = "used by the suites that count backend sessions")]
pub fn authorized(node_log: &Path, database: &str) -> usize {
    let log = std::fs::read_to_string(node_log).unwrap_or_default();
    let needle = format!("database={database}");
    log.lines().filter(|l| l.contains("connection authorized") && l.contains(&needle)).count()
}
