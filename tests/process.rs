//! The `pgleader` binary as an operator runs it: `check-config` on the shipped and on broken
//! files, and the SIGTERM drain of a real process in front of a real PostgreSQL.

#![allow(clippy::unwrap_used, reason = "in tests a panic is the failure report")]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::pg::PgNode;
use common::proxy::{connect_via, get, worker_connections};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_pgleader");

fn check_config(path: &Path) -> (i32, String, String) {
    let out = Command::new(BIN).arg("check-config").arg("--config").arg(path).output().expect("run pgleader");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write_temp(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
    f
}

#[test]
fn every_shipped_config_passes_check_config() {
    let mut seen = 0;
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/config")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (code, stdout, stderr) = check_config(&path);
            assert_eq!(code, 0, "{}: {stderr}", path.display());
            assert!(stdout.contains("[[backend]]"), "prints the effective config");
            seen += 1;
        }
    }
    assert!(seen >= 2, "config/pgleader.toml and config/local.toml");
}

#[test]
fn check_config_names_the_file_the_key_and_the_line() {
    let typo = write_temp("[proxy]\nlisten = \"0.0.0.0:5433\"\nleader_wait_timout = \"10s\"\n[[backend]]\nname = \"a\"\naddress = \"h:1\"\n");
    let (code, _, stderr) = check_config(typo.path());
    assert_eq!(code, 2);
    assert!(stderr.contains(&typo.path().display().to_string()), "{stderr}");
    assert!(stderr.contains("leader_wait_timout") && stderr.contains("line 3"), "{stderr}");

    let duration =
        write_temp("[health]\ninterval = \"1 fortnight-ish\"\n[[backend]]\nname = \"a\"\naddress = \"h:1\"\n");
    let (code, _, stderr) = check_config(duration.path());
    assert_eq!(code, 2);
    assert!(stderr.contains("interval") && stderr.contains("line 2"), "{stderr}");

    // Past their bounds (README's configuration table): each key is named with its line.
    let huge = write_temp(
        "[proxy]\nmax_connections = 3000000\n[health]\ninterval = \"2h\"\nrise = 0\n[[backend]]\nname = \"a\"\naddress = \"h:1\"\n",
    );
    let (code, _, stderr) = check_config(huge.path());
    assert_eq!(code, 2);
    for want in [
        "proxy.max_connections (line 2): 3000000 is above the maximum of 262143",
        "health.interval (line 4): 2h is above the maximum of 1m",
        "health.rise (line 5): must be at least 1",
    ] {
        assert!(stderr.contains(want), "wanted {want:?} in: {stderr}");
    }

    let secret = write_temp("[health]\npassword = \"hunter2\"\n[[backend]]\nname = \"a\"\naddress = \"h:1\"\n");
    let (code, stdout, _) = check_config(secret.path());
    assert_eq!(code, 0);
    assert!(!stdout.contains("hunter2") && stdout.contains("********"), "{stdout}");

    let out = Command::new(BIN).arg("check-config").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"));
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("pgleader "));
}

/// A pgleader process; killed on drop if a test fails midway.
struct Process {
    child: Child,
    proxy: SocketAddr,
    admin: SocketAddr,
    /// Every JSON log line so far.
    logs: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    /// The thread reading stderr into `logs`; it ends at EOF, once the process has exited.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    /// Starts the binary and reads the bound addresses from its JSON startup log line.
    fn start(config: &Path) -> Process {
        Process::start_logging(config, "info")
    }

    /// [`Process::start`] with `filter` as `RUST_LOG`.
    fn start_logging(config: &Path, filter: &str) -> Process {
        let mut child = Command::new(BIN)
            .args(["--log-format", "json", "--config"])
            .arg(config)
            .env("RUST_LOG", filter)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start pgleader");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&logs);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("pgleader: {line}");
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if let (Some(p), Some(a)) = (v["fields"]["proxy"].as_str(), v["fields"]["admin"].as_str()) {
                        let _ = tx.send((p.parse().unwrap(), a.parse().unwrap()));
                    }
                    sink.lock().unwrap().push(v);
                }
            }
        });
        let (proxy, admin) = rx.recv_timeout(Duration::from_secs(30)).expect("pgleader logged its addresses");
        Process { child, proxy, admin, logs, reader: Some(reader) }
    }

    /// SIGTERM, then waits until the drain shows: `/readyz` says draining and new connections
    /// are refused.
    async fn sigterm_and_wait_draining(&self) {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).unwrap();
        common::eventually(Duration::from_secs(10), "not ready while draining", || async {
            let (code, body) = get(self.admin, "/readyz").await;
            (code == 503 && body.contains("draining")).then_some(())
        })
        .await;
        common::eventually(Duration::from_secs(10), "new connections refused", || async {
            tokio::net::TcpStream::connect(self.proxy).await.is_err().then_some(())
        })
        .await;
    }

    /// Polls (without blocking the runtime) until the process exits; its exit code. Returns once
    /// every line it wrote is in `logs`.
    async fn wait_exit_async(&mut self, patience: Duration) -> i32 {
        let child = &mut self.child;
        let code = common::eventually(patience, "pgleader exits", || {
            let code = child.try_wait().unwrap().map(|s| s.code().unwrap_or(-1));
            async move { code }
        })
        .await;
        if let Some(reader) = self.reader.take() {
            common::pg::blocking(move || reader.join().expect("the log reader")).await;
        }
        code
    }
}

fn config_for(node: &PgNode, grace: &str) -> tempfile::NamedTempFile {
    config_with(node, grace, "")
}

/// `proxy_extra`: more `[proxy]` lines (such as `workers = 2`).
fn config_with(node: &PgNode, grace: &str, proxy_extra: &str) -> tempfile::NamedTempFile {
    write_temp(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"{grace}\"\n{proxy_extra}[admin]\nlisten = \"127.0.0.1:0\"\n\
         [health]\nuser = \"postgres\"\npassword = \"hunter2\"\ninterval = \"200ms\"\n[[backend]]\nname = \"db\"\naddress = \"{}\"\n",
        node.addr()
    ))
}

async fn wait_ready(admin: SocketAddr) {
    common::eventually(Duration::from_secs(30), "ready", || async {
        (get(admin, "/readyz").await.0 == 200).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_open_sessions_then_exits_zero() {
    drains_open_sessions("drain", "").await;
}

/// The same drain with thread-per-core workers: the session lives on a worker thread, whose
/// runtime must outlive the accept loop until the session ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_open_sessions_on_worker_threads() {
    drains_open_sessions("drain-workers", "workers = 2\n").await;
}

async fn drains_open_sessions(name: &str, proxy_extra: &str) {
    let primary = PgNode::start_primary(name);
    let config = config_with(&primary, "30s", proxy_extra);
    let mut pgleader = Process::start(config.path());
    wait_ready(pgleader.admin).await;
    let session = connect_via(pgleader.proxy, "postgres").await.unwrap();

    pgleader.sigterm_and_wait_draining().await;
    // The open session keeps working through the drain.
    let row = session.query_one("SELECT 42", &[]).await.expect("the session survives the drain");
    assert_eq!(row.get::<_, i32>(0), 42);
    assert!(pgleader.child.try_wait().unwrap().is_none(), "pgleader waits for the open session");
    drop(session);
    assert_eq!(pgleader.wait_exit_async(Duration::from_secs(20)).await, 0);

    // One access-log line per session: the client's address, the backend, bytes, how it ended.
    let access: Vec<serde_json::Value> =
        pgleader.logs.lock().unwrap().iter().filter(|v| v["target"] == "pgleader::access").cloned().collect();
    let spliced = access.iter().find(|v| v["fields"]["backend"] == "db").expect("an access line for the session");
    let f = &spliced["fields"];
    assert!(f["client"].as_str().unwrap().starts_with("127.0.0.1:"), "{f}");
    assert_eq!(f["result"], "ok");
    assert!(f["bytes_up"].as_u64().unwrap() > 0 && f["bytes_down"].as_u64().unwrap() > 0, "{f}");
    assert!(f["duration_ms"].is_u64());
    let logged = serde_json::to_string(&*pgleader.logs.lock().unwrap()).unwrap();
    assert!(!logged.contains("hunter2"), "no secret in the logs");
}

/// At debug, an admitted session logs how long its set-up took and how much of that was spent
/// waiting on PostgreSQL (the runbook's "New connections are slow"); the part is never more than
/// the whole, and connecting to a real server takes some of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admitted_session_logs_its_set_up_time_and_the_part_spent_on_postgres() {
    let primary = PgNode::start_primary("setup-timing");
    let config = config_with(&primary, "30s", "");
    let pgleader = Process::start_logging(config.path(), "info,pgleader::proxy=debug");
    wait_ready(pgleader.admin).await;
    let session = connect_via(pgleader.proxy, "postgres").await.unwrap();
    session.query_one("SELECT 1", &[]).await.expect("the session works");
    let lines = || -> Vec<serde_json::Value> {
        let logs = pgleader.logs.lock().unwrap();
        logs.iter().filter(|v| v["fields"]["message"] == "admitted").map(|v| v["fields"].clone()).collect()
    };
    // The line is written before the first reply is relayed; the reader thread may not have
    // parsed it yet.
    common::eventually(Duration::from_secs(10), "the admitted line", || async { (!lines().is_empty()).then_some(()) })
        .await;
    let admitted = lines();
    assert_eq!(admitted.len(), 1, "one admitted line for the one session: {admitted:?}");
    assert_eq!(admitted[0]["tls"], false, "a plaintext session: {}", admitted[0]);
    let (setup, backend) = (admitted[0]["setup_us"].as_u64(), admitted[0]["backend_us"].as_u64());
    let (Some(setup), Some(backend)) = (setup, backend) else { panic!("both timings: {}", admitted[0]) };
    assert!(backend > 0 && backend <= setup, "0 < backend_us {backend} <= setup_us {setup}");
}

/// With workers, connections are spread evenly over them whichever worker's listener the kernel
/// hashed each one to (`proxy::balance`): 32 clients opened one after another run 16 on each of
/// the 2 workers, every one of them works, and the counts go back to zero as they close. (Without
/// the balancing, the kernel's hash splits 32 evenly in about 1 run of 7.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_spread_evenly_over_the_workers() {
    let primary = PgNode::start_primary("balance");
    let config = config_with(&primary, "30s", "workers = 2\n");
    let pgleader = Process::start(config.path());
    wait_ready(pgleader.admin).await;
    let mut sessions = Vec::new();
    for _ in 0..32 {
        sessions.push(connect_via(pgleader.proxy, "postgres").await.expect("a session through pgleader"));
    }
    for (i, session) in (0..32).zip(&sessions) {
        let row = session.query_one("SELECT $1::int", &[&i]).await.expect("every session works");
        assert_eq!(row.get::<_, i32>(0), i);
    }
    assert_eq!(worker_connections(pgleader.admin).await, [16, 16], "connections per worker");
    drop(sessions);
    common::eventually(Duration::from_secs(20), "every connection closed", || async {
        (worker_connections(pgleader.admin).await == [0, 0]).then_some(())
    })
    .await;
}

/// A session left open at SIGTERM keeps working while pgleader drains (not ready, refusing new
/// connections), and is closed when `shutdown_grace` ends; pgleader then exits 0. The grace is
/// long (8 s) so the steps inside it are not a race on a loaded machine; how long the session
/// actually lasted is printed, not asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_cuts_sessions_left_at_the_end_of_the_grace_period() {
    cuts_sessions_at_the_end_of_the_grace("grace", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_cuts_sessions_on_worker_threads_at_the_end_of_the_grace_period() {
    cuts_sessions_at_the_end_of_the_grace("grace-workers", "workers = 2\n").await;
}

async fn cuts_sessions_at_the_end_of_the_grace(name: &str, proxy_extra: &str) {
    let primary = PgNode::start_primary(name);
    let config = config_with(&primary, "8s", proxy_extra);
    let mut pgleader = Process::start(config.path());
    wait_ready(pgleader.admin).await;
    let session = connect_via(pgleader.proxy, "postgres").await.unwrap();
    session.batch_execute("CREATE TEMP TABLE during_grace (n int)").await.unwrap();

    let sigterm = std::time::Instant::now();
    pgleader.sigterm_and_wait_draining().await;
    // Inside the grace period: draining and refusing, yet the open session still runs queries.
    for n in 1..=3 {
        let row = session
            .query_one("INSERT INTO during_grace VALUES ($1) RETURNING n", &[&n])
            .await
            .expect("the open session works during the grace period");
        assert_eq!(row.get::<_, i32>(0), n);
    }
    assert!(pgleader.child.try_wait().unwrap().is_none(), "pgleader still runs: those queries were inside the grace");
    assert!(tokio::net::TcpStream::connect(pgleader.proxy).await.is_err(), "still no new connections");

    // After it: the session is closed and pgleader exits 0.
    assert_eq!(pgleader.wait_exit_async(Duration::from_secs(30)).await, 0);
    assert!(session.simple_query("SELECT 1").await.is_err(), "the session was closed at the end of the grace period");
    assert!(session.is_closed());
    eprintln!("the session lasted {:?} after SIGTERM (shutdown_grace 8s)", sigterm.elapsed());
    let access: Vec<serde_json::Value> =
        pgleader.logs.lock().unwrap().iter().filter(|v| v["target"] == "pgleader::access").cloned().collect();
    let cut = access.iter().find(|v| v["fields"]["result"] == "shutdown").expect("an access line for the cut session");
    eprintln!("the cut session's access line: {cut}");
    assert_eq!(cut["fields"]["backend"], "db", "a session closed by the grace timer names its backend");
    assert!(cut["fields"]["bytes_up"].as_u64().is_some_and(|b| b > 0), "and counts its bytes: {cut}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config_file() {
    let primary = PgNode::start_primary("hup");
    let config = config_for(&primary, "1s");
    let pgleader = Process::start(config.path());
    wait_ready(pgleader.admin).await;
    let session = connect_via(pgleader.proxy, "postgres").await.unwrap();
    let extra = format!("[[backend]]\nname = \"spare\"\naddress = \"127.0.0.1:{}\"\n", common::free_port());
    let text = std::fs::read_to_string(config.path()).unwrap() + &extra;
    std::fs::write(config.path(), text).unwrap();
    kill(Pid::from_raw(pgleader.child.id() as i32), Signal::SIGHUP).unwrap();
    common::eventually(Duration::from_secs(20), "spare backend listed", || async {
        let s = common::proxy::status(pgleader.admin).await;
        (s["backends"][1]["name"] == "spare").then_some(())
    })
    .await;
    assert_eq!(common::proxy::metric(pgleader.admin, "pgleader_config_reloads_total{result=\"ok\"}").await, Some(1.0));
    session.simple_query("SELECT 1").await.expect("the session survives the reload");
    assert!(get(pgleader.admin, "/readyz").await.0 == 200);
}

/// Thread-per-core binds every listener with `SO_REUSEPORT`, which would let a second pgleader
/// share a port and take half its clients unnoticed: the second one must fail to start instead,
/// naming the address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_pgleader_on_the_same_port_fails_to_start() {
    let dead = common::free_port();
    let builder = common::proxy::ProxyBuilder::with_addresses(vec![("nobody".into(), format!("127.0.0.1:{dead}"))])
        .proxy("workers", "2");
    let first = builder.start().await;
    let taken = first.proxy_addr.to_string();
    let second = builder.clone().proxy("listen", &taken).config();
    let err = pgleader::start(second).await.err().expect("the port is taken: the second pgleader must not start");
    let text = format!("{err:#}");
    assert!(text.contains(&format!("bind proxy listener {taken}")) && text.contains("in use"), "{text}");
    first.shutdown().await.unwrap();
}

/// The same overlap inside one pgleader: the read-only listener on 127.0.0.1:P while the main
/// listener holds 0.0.0.0:P would be refused without `SO_REUSEPORT`, and is refused with it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_listeners_of_one_pgleader_fail_to_start() {
    let (dead, port) = (common::free_port(), common::free_port());
    let config = common::proxy::ProxyBuilder::with_addresses(vec![("nobody".into(), format!("127.0.0.1:{dead}"))])
        .proxy("workers", "2")
        .proxy("listen", &format!("0.0.0.0:{port}"))
        .section(&format!("[read_only]\nlisten = \"127.0.0.1:{port}\"\n"))
        .config();
    let err = pgleader::start(config).await.err().expect("the two listeners overlap: pgleader must not start");
    let text = format!("{err:#}");
    assert!(text.contains(&format!("bind read-only listener 127.0.0.1:{port}")) && text.contains("in use"), "{text}");
}
