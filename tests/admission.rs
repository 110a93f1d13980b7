//! Admission at the edges (issue 10), against real PostgreSQL: clients that give up while they
//! wait, a burst of `max_connections` connects, cancel requests while there is no leader, and an
//! older-timeline primary's sessions. Expectations are counts and states; durations are printed.

mod common;

use std::time::Duration;

use common::pg::{authorized, blocking, PgCluster, PgNode};
use common::proxy::{connect_via, metric, metric_at_least, wait_leader, ProxyBuilder};
use common::{eventually, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A StartupMessage for protocol 3.0, written out byte by byte from the protocol docs.
fn startup(user: &str, database: &str) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for (k, v) in [("user", user), ("database", database)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    msg
}

/// The SQLSTATE of an ErrorResponse ('E', length, fields, each a tag byte and a C string).
fn sqlstate_of(msg: &[u8]) -> Option<String> {
    if msg.first() != Some(&b'E') {
        return None;
    }
    msg.get(5..)?.split(|&b| b == 0).find_map(|f| f.strip_prefix(b"C")).map(|c| String::from_utf8_lossy(c).into())
}

fn raise_nofile(want: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if soft < want {
        assert!(hard >= want, "need {want} open files, the hard limit is {hard}: raise it (ulimit -Hn)");
        setrlimit(Resource::RLIMIT_NOFILE, want, hard).expect("setrlimit");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_leave_while_waiting_free_their_slots_and_open_no_backend_session() {
    let cluster = blocking(|| {
        let cluster = PgCluster::start();
        cluster.primary.sql_ok("postgres", "CREATE DATABASE counted");
        cluster.primary.wait_for_catchup(&cluster.replica);
        cluster.replica.append_conf("log_connections = on\n");
        cluster.replica.sql_ok("postgres", "SELECT pg_reload_conf()");
        cluster
    })
    .await;
    // Only the replica is configured: there is no leader until it is promoted.
    let proxy = ProxyBuilder::new(&[&cluster.replica])
        .proxy("max_connections", "5")
        .proxy("leader_wait_timeout", "60s")
        .start()
        .await;
    let admin = proxy.admin_addr;
    wait_leader(admin, None).await;

    let mut leaving = Vec::new();
    for _ in 0..5 {
        let mut s = TcpStream::connect(proxy.proxy_addr).await.unwrap();
        s.write_all(&startup("postgres", "counted")).await.unwrap();
        leaving.push(s);
    }
    eventually(Duration::from_secs(10), "5 clients waiting", || async {
        (metric(admin, "pgleader_clients_waiting").await == Some(5.0)).then_some(())
    })
    .await;
    drop(leaving);
    metric_at_least(admin, "pgleader_sessions_total{result=\"abandoned\"}", 5.0).await;
    assert_eq!(metric(admin, "pgleader_clients_waiting").await, Some(0.0));

    // A sixth client is held, not refused: the five slots were freed when their clients left.
    let sixth = tokio::spawn(async move {
        let client = connect_via(proxy.proxy_addr, "counted").await?;
        client.simple_query("SELECT 1").await?;
        Ok::<_, tokio_postgres::Error>(client)
    });
    eventually(Duration::from_secs(10), "the sixth client waiting", || async {
        (metric(admin, "pgleader_clients_waiting").await == Some(1.0)).then_some(())
    })
    .await;
    assert_eq!(metric(admin, "pgleader_sessions_total{result=\"refused_limit\"}").await, Some(0.0));
    let log = cluster.replica.logfile();
    let before = authorized(&log, "counted");

    let cluster = blocking(move || {
        cluster.replica.promote();
        cluster
    })
    .await;
    let client = sixth.await.unwrap().expect("the held client is served once a leader appears");
    let port: String = client.query_one("SELECT current_setting('port')", &[]).await.unwrap().get(0);
    assert_eq!(port, cluster.replica.port().to_string());
    assert_eq!(
        authorized(&log, "counted") - before,
        1,
        "exactly one new backend session: none for the clients that left"
    );
    drop(client);
    proxy.shutdown().await.unwrap();
}

/// The real binary with its JSON log lines collected (killed on drop).
struct Binary {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    /// The thread reading stderr into `lines`; it ends at EOF, once the process has exited.
    reader: Option<std::thread::JoinHandle<()>>,
    _config: tempfile::NamedTempFile,
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Binary {
    /// Starts `pgleader --config` on `config` and returns once it logged that it started.
    fn start(config: &str) -> Binary {
        use std::io::{BufRead, Write};
        let mut file = tempfile::NamedTempFile::new().expect("temp config");
        file.write_all(config.as_bytes()).expect("write config");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pgleader"))
            .args(["--log-format", "json", "--config"])
            .arg(file.path())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start pgleader");
        let stderr = std::io::BufReader::new(child.stderr.take().expect("piped stderr"));
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (sink, (started_tx, started_rx)) = (std::sync::Arc::clone(&lines), std::sync::mpsc::channel());
        let reader = std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if line.contains("pgleader started") {
                    let _ = started_tx.send(());
                }
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    sink.lock().expect("log lines").push(v);
                }
            }
        });
        started_rx.recv_timeout(Duration::from_secs(30)).expect("pgleader started");
        Binary { child, lines, reader: Some(reader), _config: file }
    }

    /// Waits (blocking) for the process to exit: its exit code and every line it logged.
    fn wait_exit(&mut self) -> (Option<i32>, Vec<serde_json::Value>) {
        let code = self.child.wait().expect("wait").code();
        if let Some(reader) = self.reader.take() {
            reader.join().expect("the log reader");
        }
        (code, self.lines.lock().expect("log lines").clone())
    }

    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_max_connections_connects_is_queued_by_the_kernel_and_answered_in_full() {
    use nix::sys::signal::{kill, Signal};
    const BURST: usize = 1500;
    raise_nofile(8192);
    // No server behind the one backend: every client is held, then answered 57P03, which proves
    // pgleader accepted every connection of the burst. While pgleader is stopped (SIGSTOP) only
    // the kernel's accept queue holds the connections, as when it is busy while every pool
    // reconnects at once.
    let (port, admin_port) = (free_port(), free_port());
    let binary = Binary::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:{port}\"\nmax_connections = {BURST}\nleader_wait_timeout = \"2s\"\n\
         client_hello_timeout = \"60s\"\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n[log]\naccess = false\n\
         [[backend]]\nname = \"gone\"\naddress = \"127.0.0.1:{}\"\n",
        free_port()
    ));
    let pid = binary.pid();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    kill(pid, Signal::SIGSTOP).unwrap();
    let mut burst = tokio::task::JoinSet::new();
    let (connected_tx, mut connected_rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..BURST {
        let connected = connected_tx.clone();
        burst.spawn(async move {
            let mut s = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
            let _ = connected.send(());
            s.write_all(&startup("app", "app")).await.map_err(|e| format!("send: {e}"))?;
            let mut reply = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(120), s.read_to_end(&mut reply)).await;
            match read {
                Ok(Ok(_)) => Ok(sqlstate_of(&reply).unwrap_or_else(|| format!("no error: {reply:?}"))),
                Ok(Err(e)) => Err(format!("read: {e}")),
                Err(_) => Err("no answer within 120 s".to_owned()),
            }
        });
    }
    drop(connected_tx);
    // While pgleader is stopped, a connect completes only if the kernel queued it.
    let mut queued = 0;
    while queued < BURST {
        match tokio::time::timeout(Duration::from_secs(10), connected_rx.recv()).await {
            Ok(Some(())) => queued += 1,
            _ => break,
        }
    }
    kill(pid, Signal::SIGCONT).unwrap();
    eprintln!("connects completed while pgleader was stopped: {queued} of {BURST}");
    assert_eq!(queued, BURST, "the listen backlog dropped part of the burst");
    let mut answers = std::collections::BTreeMap::new();
    while let Some(r) = burst.join_next().await {
        let key = r.unwrap().unwrap_or_else(|e| e);
        *answers.entry(key).or_insert(0usize) += 1;
    }
    eprintln!("answers: {answers:?}");
    assert_eq!(answers, [("57P03".to_owned(), BURST)].into_iter().collect());
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    metric_at_least(admin, "pgleader_sessions_total{result=\"no_leader\"}", BURST as f64).await;
    drop(binary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_a_session_kept_while_there_is_no_leader() {
    let primary = blocking(|| {
        let primary = PgNode::start_primary("cancel");
        primary.sql_ok("postgres", "CREATE DATABASE hc");
        primary
    })
    .await;
    // Checks use their own database, so they can be broken without touching the session's.
    let proxy = ProxyBuilder::new(&[&primary])
        .health("database", "hc")
        .health("fall", "100")
        .health("fast_interval", "200ms")
        .start()
        .await;
    let admin = proxy.admin_addr;
    wait_leader(admin, Some("cancel")).await;
    let (client, conn) =
        tokio_postgres::connect(&common::proxy::via(proxy.proxy_addr, "postgres", "postgres"), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(conn);
    let token = client.cancel_token();

    // No leader, but the session is kept (one failure is far from `fall`).
    let p = primary.port();
    blocking(move || {
        let node = format!("host=127.0.0.1 port={p} user=postgres dbname=postgres");
        let sql = "ALTER DATABASE hc ALLOW_CONNECTIONS false; \
                   SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'hc'";
        let out = std::process::Command::new(common::pg::pg_bin().join("psql"))
            .args(["-X", "-v", "ON_ERROR_STOP=1", "-d", &node, "-c", sql])
            .output()
            .expect("psql");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    })
    .await;
    wait_leader(admin, None).await;
    assert_eq!(client.simple_query("SELECT 1").await.map(|_| ()).ok(), Some(()), "the session is kept");

    let sleeping = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(60)").await.map(|_| ()) });
    // Until the backend runs the query, a cancel has nothing to cancel; wait for it to start.
    let p = primary.port();
    eventually(Duration::from_secs(10), "the query running", || async move {
        let node = format!("host=127.0.0.1 port={p} user=postgres dbname=postgres");
        let (c, conn) = tokio_postgres::connect(&node, tokio_postgres::NoTls).await.ok()?;
        tokio::spawn(conn);
        let row = c.query_one("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'", &[]).await;
        (row.ok()?.get::<_, i64>(0) == 1).then_some(())
    })
    .await;
    let started = tokio::time::Instant::now();
    token.cancel_query(tokio_postgres::NoTls).await.expect("send the cancel through pgleader");
    let result = tokio::time::timeout(Duration::from_secs(30), sleeping).await.expect("the query ended").unwrap();
    eprintln!("query cancelled {:?} after the cancel request", started.elapsed());
    let err = result.expect_err("the query was cancelled");
    assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err}");
    metric_at_least(admin, "pgleader_sessions_total{result=\"cancel_forwarded\"}", 1.0).await;
    assert_eq!(metric(admin, "pgleader_sessions_total{result=\"no_leader\"}").await, Some(0.0));
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_timeline_loses_its_sessions_while_the_newer_primary_is_still_rising() {
    let cluster = blocking(PgCluster::start).await;
    let proxy = ProxyBuilder::new(&[&cluster.primary, &cluster.replica]).start().await;
    let admin = proxy.admin_addr;
    wait_leader(admin, Some("primary")).await;
    let old = connect_via(proxy.proxy_addr, "postgres").await.unwrap();
    old.simple_query("SELECT 1").await.unwrap();
    // rise 100 (the maximum) at 200 ms from now on: the promoted node cannot become routable
    // for 20 s, far longer than this test needs.
    let mut config = ProxyBuilder::new(&[&cluster.primary, &cluster.replica])
        .health("rise", "100")
        .health("fast_interval", "200ms")
        .config();
    config.proxy.listen = proxy.proxy_addr;
    config.admin.listen = proxy.admin_addr;
    proxy.reload(config).await.expect("reload rise");

    let cluster = blocking(move || {
        cluster.replica.promote();
        cluster
    })
    .await;
    eventually(Duration::from_secs(10), "old session cut", || async { old.is_closed().then_some(()) }).await;
    assert_eq!(metric(admin, "pgleader_sessions_cut_total{reason=\"older_timeline\"}").await, Some(1.0));
    let s = common::proxy::status(admin).await;
    assert_eq!(s["leader"], serde_json::Value::Null, "the newer primary has not risen, the old one is stale");
    assert_eq!(s["backends"][0]["role"], "primary", "the old primary still runs");
    drop(cluster);
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_closed_by_the_grace_timer_are_logged_with_their_backend_and_bytes() {
    use nix::sys::signal::{kill, Signal};
    let primary = blocking(|| PgNode::start_primary("grace")).await;
    let (port, admin_port) = (free_port(), free_port());
    let binary = Binary::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace = \"1s\"\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\
         [health]\nuser = \"postgres\"\ninterval = \"200ms\"\n[[backend]]\nname = \"grace\"\naddress = \"{}\"\n",
        primary.addr()
    ));
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    wait_leader(admin, Some("grace")).await;
    let client = connect_via(format!("127.0.0.1:{port}").parse().unwrap(), "postgres").await.unwrap();
    client.simple_query("SELECT repeat('x', 1000)").await.unwrap();
    kill(binary.pid(), Signal::SIGTERM).unwrap();
    let mut binary = binary;
    let (code, lines) = blocking(move || binary.wait_exit()).await;
    assert_eq!(code, Some(0), "a drain exits 0");
    let access: Vec<&serde_json::Value> = lines.iter().filter(|l| l["target"] == "pgleader::access").collect();
    assert_eq!(access.len(), 1, "one access line: {access:?}");
    let f = &access[0]["fields"];
    assert_eq!(f["result"], "shutdown");
    assert_eq!(f["backend"], "grace");
    assert!(f["bytes_up"].as_u64().unwrap() > 0 && f["bytes_down"].as_u64().unwrap() > 1000, "{f}");
    assert!(client.simple_query("SELECT 1").await.is_err(), "the session was closed");
}
