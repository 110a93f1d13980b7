//! Sick backends beside a real primary (issue 7, item 2), and health checks over TLS (item 3).
//!
//! The sick ones are test listeners in this process: one accepts TCP and never answers, one
//! answers one byte every 100 ms (a valid but endless startup reply), one resets every
//! connection (SO_LINGER 0), plus a DNS name that does not resolve. Each must be marked down with
//! a reason while the real primary stays the leader, clients keep being routed, the admin port
//! keeps answering, and nothing grows: pgleader runs in-process, so this process's file
//! descriptors, threads and RSS are pgleader's (plus the test's few), read from /proc/self
//! after a few check cycles and again after many more. Descriptors and the sick backends' open
//! connections are asserted as states reached (a leak never gets back to them); threads (tokio's
//! blocking pool for DNS lookups comes and goes) and RSS are printed, not asserted.

#![allow(clippy::unwrap_used, reason = "in tests a panic is the failure report")]

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::eventually;
use common::pg::PgNode;
use common::proxy::{connect_via, get, metric, status, wait_leader, ProxyBuilder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The tests sample this process's descriptors and threads: they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Debug, Clone, Copy)]
enum Sickness {
    /// Accepts and reads, never writes.
    Silent,
    /// Answers one byte every 100 ms: AuthenticationOk, then ParameterStatus messages forever.
    Dribble,
    /// Reads the first bytes, then resets the connection.
    Reset,
}

/// A sick backend: its address, how many of its connections are open now, and in total.
struct SickBackend {
    addr: SocketAddr,
    open: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for SickBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A guard that counts a connection as open while it lives.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn sick_backend(kind: Sickness) -> SickBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let open = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(AtomicUsize::new(0));
    let (o, a) = (Arc::clone(&open), Arc::clone(&accepted));
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { continue };
            a.fetch_add(1, Ordering::SeqCst);
            o.fetch_add(1, Ordering::SeqCst);
            let guard = Open(Arc::clone(&o));
            tokio::spawn(async move {
                let _guard = guard;
                let mut buf = [0u8; 1024];
                match kind {
                    Sickness::Silent => while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {},
                    Sickness::Reset => {
                        let _ = s.read(&mut buf).await;
                        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
                    }
                    Sickness::Dribble => {
                        let mut reply = b"R\0\0\0\x08\0\0\0\0".to_vec();
                        let status = b"S\0\0\0\x19server_version\x0015.0\0";
                        let mut tick = tokio::time::interval(Duration::from_millis(100));
                        let mut i = 0;
                        loop {
                            tokio::select! {
                                r = s.read(&mut buf) => if !matches!(r, Ok(n) if n > 0) { break },
                                _ = tick.tick() => {
                                    if i == reply.len() {
                                        reply.extend_from_slice(status);
                                    }
                                    if s.write_all(&reply[i..=i]).await.is_err() { break }
                                    i += 1;
                                }
                            }
                        }
                    }
                }
            });
        }
    });
    SickBackend { addr, open, accepted, task }
}

/// What this process holds: pgleader's tasks' sockets and threads are part of it.
#[derive(Debug, Clone, Copy)]
struct Usage {
    fds: usize,
    threads: usize,
    rss_kib: u64,
}

fn usage() -> Usage {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    Usage {
        fds: std::fs::read_dir("/proc/self/fd").unwrap().count(),
        threads: field("Threads:") as usize,
        rss_kib: field("VmRSS:"),
    }
}

/// Waits until every named backend has at least `n` failed checks; returns the last /status.
async fn failures_at_least(admin: SocketAddr, names: &[&str], n: u64) -> serde_json::Value {
    eventually(Duration::from_secs(60), &format!("{n} failed checks of each sick backend"), || async {
        let s = status(admin).await;
        let done = names.iter().all(|name| {
            s["backends"]
                .as_array()
                .unwrap()
                .iter()
                .any(|b| b["name"] == *name && b["failures_total"].as_u64() >= Some(n))
        });
        done.then_some(s)
    })
    .await
}

fn backend<'a>(s: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    s["backends"].as_array().unwrap().iter().find(|b| b["name"] == name).unwrap()
}

/// A session through the proxy lands on `primary`.
async fn routed_to(proxy: SocketAddr, primary: &PgNode) {
    let client = connect_via(proxy, "postgres").await.expect("a client is routed beside sick backends");
    let port: i32 = client.query_one("SELECT inet_server_port()", &[]).await.unwrap().get(0);
    assert_eq!(port, i32::from(primary.port()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sick_backends_are_marked_down_while_the_primary_keeps_serving_and_nothing_grows() {
    let _serial = SERIAL.lock().await;
    let primary = PgNode::start_primary("healthy");
    let silent = sick_backend(Sickness::Silent).await;
    let slow = sick_backend(Sickness::Dribble).await;
    let reset = sick_backend(Sickness::Reset).await;
    let proxy = ProxyBuilder::with_addresses(vec![
        ("healthy".into(), primary.addr()),
        ("silent".into(), silent.addr.to_string()),
        ("slow".into(), slow.addr.to_string()),
        ("reset".into(), reset.addr.to_string()),
        ("nxdomain".into(), "no-such-host.invalid:5432".into()),
    ])
    .health("interval", "100ms")
    .health("fast_interval", "50ms")
    .health("timeout", "300ms")
    .health("fall", "2")
    .start()
    .await;
    let admin = proxy.admin_addr;
    let first = wait_leader(admin, Some("healthy")).await;
    let epoch = first["epoch"].as_u64().unwrap();
    let sick = ["silent", "slow", "reset", "nxdomain"];

    // A few cycles in: every sick backend is down, with a reason an operator can act on.
    let s = failures_at_least(admin, &sick, 5).await;
    let early = usage();
    for name in sick {
        let b = backend(&s, name);
        assert_eq!(b["role"], "down", "{b}");
        assert_eq!(b["routable"], false);
        assert!(b["consecutive_failures"].as_u64().unwrap() >= 2, "{b}");
        assert_eq!(metric(admin, &format!("pgleader_backend_up{{backend=\"{name}\"}}")).await, Some(0.0));
    }
    let error = |name: &str| backend(&s, name)["last_error"].as_str().unwrap().to_owned();
    eprintln!("last errors: {:#?}", sick.iter().map(|n| (n, error(n))).collect::<Vec<_>>());
    assert!(error("silent").contains("timed out"), "{}", error("silent"));
    assert!(error("slow").contains("timed out"), "{}", error("slow"));
    assert!(error("reset").contains("cannot connect"), "{}", error("reset"));
    assert!(error("nxdomain").contains("cannot resolve no-such-host.invalid"), "{}", error("nxdomain"));
    assert!(reset.accepted.load(Ordering::SeqCst) >= 5);

    // Many more cycles, with clients routed and the admin port polled all along.
    let polls = AtomicUsize::new(0);
    let most_open = AtomicUsize::new(0);
    eventually(Duration::from_secs(90), "30 failed checks of each sick backend", || async {
        routed_to(proxy.proxy_addr, &primary).await;
        assert_eq!(get(admin, "/healthz").await.0, 200);
        let s = status(admin).await;
        polls.fetch_add(1, Ordering::Relaxed);
        assert_eq!(s["leader"], "healthy", "the primary stays the leader: {s}");
        assert_eq!(s["epoch"].as_u64(), Some(epoch), "no leader change: {s}");
        for b in [&silent, &slow] {
            most_open.fetch_max(b.open.load(Ordering::SeqCst), Ordering::Relaxed);
        }
        sick.iter().all(|n| backend(&s, n)["failures_total"].as_u64() >= Some(30)).then_some(())
    })
    .await;
    // A timed-out check closes its connection: at most the one check in progress stays open
    // (a check that leaked its connection would keep the count above that for good).
    eventually(Duration::from_secs(30), "at most one open connection to each hanging backend", || async {
        (silent.open.load(Ordering::SeqCst) <= 1 && slow.open.load(Ordering::SeqCst) <= 1).then_some(())
    })
    .await;
    let fds_back = eventually(Duration::from_secs(30), "file descriptors back to the early count", || async {
        let now = usage();
        (now.fds <= early.fds + 8).then_some(now)
    })
    .await;
    let late = usage();
    eprintln!(
        "after 5 failed checks each -> after 30: fds {} -> {} (back to {} at most), threads {} -> {}, \
         RSS {} -> {} KiB; {} client rounds; at most {} connections seen open to one hanging backend",
        early.fds,
        late.fds,
        fds_back.fds,
        early.threads,
        late.threads,
        early.rss_kib,
        late.rss_kib,
        polls.load(Ordering::Relaxed),
        most_open.load(Ordering::Relaxed)
    );
    assert!(silent.accepted.load(Ordering::SeqCst) >= 30 && slow.accepted.load(Ordering::SeqCst) >= 30);
    for name in sick {
        let failed =
            metric(admin, &format!("pgleader_health_checks_total{{backend=\"{name}\",result=\"failed\"}}")).await;
        assert!(failed.unwrap() >= 30.0, "{name}: {failed:?}");
    }
    assert_eq!(metric(admin, "pgleader_leader_changes_total").await, Some(1.0));

    proxy.shutdown().await.unwrap();
    // After shutdown pgleader holds no connection to any sick backend.
    eventually(Duration::from_secs(10), "sick backends' connections closed", || async {
        (silent.open.load(Ordering::SeqCst) == 0 && slow.open.load(Ordering::SeqCst) == 0).then_some(())
    })
    .await;
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out =
        Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl (apt-get install openssl)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A self-signed CA certificate `<name>.crt` with its key `<name>.key`.
fn self_signed_ca(dir: &std::path::Path, subject: &str, name: &str) {
    let (key, crt) = (format!("{name}.key"), format!("{name}.crt"));
    openssl(dir, &["req", "-new", "-x509", "-days", "2", "-nodes", "-subj", subject, "-keyout", &key, "-out", &crt]);
}

/// A primary that takes TCP clients only over TLS (hostssl trust, hostnossl reject), with a
/// server certificate for IP 127.0.0.1 signed by `ca.crt`; `other-ca.crt` signed nothing here.
fn tls_only_primary(name: &str, certs: &std::path::Path) -> PgNode {
    self_signed_ca(certs, "/CN=pgleader test CA", "ca");
    self_signed_ca(certs, "/CN=someone else", "other-ca");
    openssl(certs, &["req", "-new", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr"]);
    std::fs::write(certs.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        certs,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ],
    );
    let mut node = PgNode::start_primary(name);
    let data = node.datadir();
    for f in ["server.crt", "server.key"] {
        std::fs::copy(certs.join(f), data.join(f)).unwrap();
        let chown = Command::new("chown").arg("--reference").arg(data.join("PG_VERSION")).arg(data.join(f)).status();
        assert!(chown.unwrap().success());
    }
    std::fs::set_permissions(data.join("server.key"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    // Rewritten in place (the file keeps its owner): the first matching line wins.
    std::fs::write(
        data.join("pg_hba.conf"),
        "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
    )
    .unwrap();
    node.append_conf("ssl = on\n");
    node.stop();
    node.start();
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_use_tls_as_configured() {
    let _serial = SERIAL.lock().await;
    let certs = tempfile::tempdir().unwrap();
    let primary = tls_only_primary("tls-only", certs.path());
    let ca = certs.path().join("ca.crt").display().to_string();
    let other_ca = certs.path().join("other-ca.crt").display().to_string();
    let by_name = format!("localhost:{}", primary.port());
    // (sslmode, ca_file, address, whether the backend must become the leader)
    let cases = [
        ("disable", None, primary.addr(), false),
        ("prefer", None, primary.addr(), true),
        ("require", None, primary.addr(), true),
        ("verify-full", Some(&ca), primary.addr(), true),
        ("verify-full", Some(&other_ca), primary.addr(), false),
        ("verify-full", Some(&ca), by_name, false),
    ];
    let mut running = Vec::new();
    for (mode, ca_file, address, _) in &cases {
        let mut b = ProxyBuilder::with_addresses(vec![("db".into(), address.clone())]).health("sslmode", mode);
        if let Some(ca_file) = ca_file {
            b = b.health("ca_file", ca_file);
        }
        running.push(b.start().await);
    }
    for ((mode, ca_file, address, leads), proxy) in cases.iter().zip(&running) {
        let case = format!("sslmode={mode} ca_file={ca_file:?} address={address}");
        if *leads {
            wait_leader(proxy.admin_addr, Some("db")).await;
        } else {
            let s = eventually(Duration::from_secs(30), &format!("{case}: down"), || async {
                let s = status(proxy.admin_addr).await;
                (s["backends"][0]["role"] == "down").then_some(s)
            })
            .await;
            let error = s["backends"][0]["last_error"].as_str().unwrap().to_owned();
            eprintln!("{case}: {error}");
            let why = match (*mode, ca_file.is_some()) {
                ("disable", _) => "28000",
                _ => "certificate",
            };
            assert!(error.contains(why), "{case}: {error}");
            assert_eq!(s["leader"], serde_json::Value::Null);
        }
    }
    // The checks that succeed are encrypted (three proxies: prefer, require, verify-full).
    let encrypted = primary
        .sql_ok_async(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity JOIN pg_stat_ssl USING (pid) \
             WHERE application_name = 'pgleader-health' AND ssl",
        )
        .await;
    assert_eq!(encrypted, "3");
    for proxy in running {
        proxy.shutdown().await.unwrap();
    }
}

/// A TCP relay to `target` that, once `hang` is set, accepts new connections and never answers
/// them (connections relayed before keep working): a leader whose new sessions hang.
async fn relay(target: SocketAddr, hang: Arc<std::sync::atomic::AtomicBool>) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { continue };
            let hang = hang.load(Ordering::SeqCst);
            tokio::spawn(async move {
                if hang {
                    let mut buf = [0u8; 1024];
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                } else if let Ok(mut up) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_new_connections_hang_is_marked_down_and_new_clients_get_57p03() {
    a_leader_whose_new_connections_hang(0).await;
}

/// The same with spare connections: spares opened before the hang are working connections to a
/// leader whose checks pass, and may serve clients; the first spare opened after it hangs like
/// a fresh connection, is reported like one, and the client gets 57P03 all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_spares_a_hanging_leader_serves_at_most_its_earlier_spares_then_57p03() {
    a_leader_whose_new_connections_hang(2).await;
}

async fn a_leader_whose_new_connections_hang(spares: usize) {
    let _serial = SERIAL.lock().await;
    let primary = PgNode::start_primary("hanging");
    let hang = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (addr, task) = relay(primary.addr().parse().unwrap(), Arc::clone(&hang)).await;
    let proxy = ProxyBuilder::with_addresses(vec![("hanging".into(), addr.to_string())])
        .health("interval", "100ms")
        .health("timeout", "300ms")
        .health("fall", "2")
        .proxy("leader_wait_timeout", "3s")
        .proxy("spare_connections", &spares.to_string())
        .start()
        .await;
    wait_leader(proxy.admin_addr, Some("hanging")).await;
    let old = connect_via(proxy.proxy_addr, "postgres").await.unwrap();
    assert_eq!(old.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    eventually(Duration::from_secs(10), "the spares opened", || async {
        (metric(proxy.admin_addr, "pgleader_spare_connections").await == Some(spares as f64)).then_some(())
    })
    .await;

    // The health connection still works; only new connections hang. A new client must not hang
    // with them: the failed attempt is reported, the fresh re-check times out, and the client
    // gets 57P03 at leader_wait_timeout.
    hang.store(true, Ordering::SeqCst);
    let mut served = Vec::new();
    let err = loop {
        match connect_via(proxy.proxy_addr, "postgres").await {
            Ok(client) => {
                assert!(served.len() < spares, "served more clients than there were spares before the hang");
                served.push(client);
            }
            Err(e) => break e,
        }
    };
    assert_eq!(err.code().map(|c| c.code()), Some("57P03"), "{err}");
    let s = status(proxy.admin_addr).await;
    assert_eq!(s["leader"], serde_json::Value::Null, "{s}");
    // Down after `fall` failed checks (how soon is the scheduler's business: wait for the state).
    let s = eventually(Duration::from_secs(30), "the hanging leader down", || async {
        let s = status(proxy.admin_addr).await;
        (s["backends"][0]["role"] == "down").then_some(s)
    })
    .await;
    let b = &s["backends"][0];
    assert!(b["last_error"].as_str().unwrap().contains("timed out"), "{b}");
    // The open session is cut too (DESIGN rule 3).
    eventually(Duration::from_secs(10), "the session on the down backend cut", || async {
        old.is_closed().then_some(())
    })
    .await;
    old.query_one("SELECT 2", &[]).await.expect_err("the session on a down backend is cut");
    assert_eq!(get(proxy.admin_addr, "/healthz").await.0, 200);

    // Healed: checks pass again and clients are routed.
    hang.store(false, Ordering::SeqCst);
    wait_leader(proxy.admin_addr, Some("hanging")).await;
    routed_to(proxy.proxy_addr, &primary).await;
    proxy.shutdown().await.unwrap();
    task.abort();
}
