//! Routing through a running pgleader to real PostgreSQL servers with real clients
//! (tokio-postgres and psql): the session lands on the primary, TLS passes through, cancel
//! requests reach the leader, and clients the proxy must refuse get a proper ErrorResponse.

#![allow(clippy::unwrap_used, reason = "in tests a panic is the failure report")]

mod common;

use std::process::Command;
use std::time::Duration;

use common::pg::{PgCluster, PgNode};
use common::proxy::{
    connect_via, get, metric, metric_at_least, psql_via, status, wait_connections, wait_leader, ProxyBuilder,
};
use common::wire;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until EOF (or 10 s) and returns what the server sent.
async fn read_all(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_land_on_the_primary_and_writes_succeed() {
    let cluster = PgCluster::start();
    // The health check runs as an unprivileged pg_monitor role, as in production.
    cluster.primary.sql_ok("postgres", "CREATE ROLE pgleader LOGIN IN ROLE pg_monitor");
    cluster.primary.wait_for_catchup(&cluster.replica);
    let system_identifier = cluster.primary.system_identifier();
    let proxy = ProxyBuilder::new(&[&cluster.replica, &cluster.primary]).health("user", "pgleader").start().await;
    wait_leader(proxy.admin_addr, Some("primary")).await;
    // The leader can be elected before the replica's first check has completed.
    let s = common::eventually(Duration::from_secs(30), "the replica checked", || async {
        let s = status(proxy.admin_addr).await;
        (s["backends"][0]["role"] != "unknown").then_some(s)
    })
    .await;
    let primary = &s["backends"][1];
    assert_eq!(primary["role"], "primary");
    assert_eq!(primary["timeline"], 1);
    assert_eq!(primary["system_identifier"], system_identifier.to_string());
    assert_eq!(s["backends"][0]["role"], "replica");
    assert_eq!(s["backends"][0]["routable"], false);

    let client = connect_via(proxy.proxy_addr, "postgres").await.expect("connect through pgleader");
    let row = client.query_one("SELECT pg_is_in_recovery(), current_setting('port')", &[]).await.unwrap();
    assert!(!row.get::<_, bool>(0));
    assert_eq!(row.get::<_, String>(1), cluster.primary.port().to_string());
    client.batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)").await.expect("write through pgleader");
    drop(client);

    let out = psql_via(proxy.proxy_addr, "sslmode=disable", "SELECT count(*) FROM t").await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    // libpq's default sslmode=prefer: the SSLRequest is answered N by this server, then plaintext.
    let out = psql_via(proxy.proxy_addr, "", "SELECT pg_is_in_recovery()").await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "f", "{}", String::from_utf8_lossy(&out.stderr));

    let (code, body) = get(proxy.admin_addr, "/readyz").await;
    assert_eq!((code, body.trim()), (200, "ready: leader primary"));
    assert_eq!(metric(proxy.admin_addr, "pgleader_leader{backend=\"primary\"}").await, Some(1.0));
    assert_eq!(metric(proxy.admin_addr, "pgleader_leader{backend=\"replica\"}").await, Some(0.0));
    assert_eq!(
        metric(proxy.admin_addr, "pgleader_backend_role{backend=\"replica\",role=\"replica\"}").await,
        Some(1.0)
    );
    metric_at_least(proxy.admin_addr, "pgleader_sessions_total{result=\"ok\"}", 3.0).await;
    assert!(
        metric(proxy.admin_addr, "pgleader_session_bytes_total{direction=\"backend_to_client\"}").await.unwrap() > 0.0
    );
    assert!(
        metric(proxy.admin_addr, "pgleader_health_check_duration_seconds_count{backend=\"primary\"}").await.unwrap()
            > 0.0
    );
    proxy.shutdown().await.unwrap();
}

/// A self-signed certificate for 127.0.0.1 in `dir` (server.crt, server.key), owned like the
/// data directory so the server can read it.
fn self_signed(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let (crt, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    let made = Command::new("openssl")
        .args(["req", "-new", "-x509", "-days", "1", "-nodes", "-subj", "/CN=127.0.0.1"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-out"])
        .arg(&crt)
        .arg("-keyout")
        .arg(&key)
        .output()
        .expect("run openssl (apt-get install openssl)");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let chown = Command::new("chown").arg("--reference").arg(dir.join("PG_VERSION")).arg(&crt).arg(&key).status();
    assert!(chown.unwrap().success());
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    crt
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_runs_end_to_end_and_health_checks_can_verify_the_server() {
    let mut primary = PgNode::start_primary("tls");
    let dir = primary.datadir();
    let ca = self_signed(&dir, "server");
    let other_ca = self_signed(&dir, "other");
    primary.append_conf("ssl = on\n");
    primary.stop();
    primary.start();

    // Health checks over verified TLS; the client's TLS runs end to end through the splice.
    let proxy = ProxyBuilder::new(&[&primary])
        .health("sslmode", "verify-full")
        .health("ca_file", ca.to_str().unwrap())
        .start()
        .await;
    wait_leader(proxy.admin_addr, Some("tls")).await;
    let out =
        psql_via(proxy.proxy_addr, "sslmode=require", "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "t", "the session must be encrypted end to end");
    let health_ssl = primary
        .sql_ok_async(
            "postgres",
            "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'pgleader-health'",
        )
        .await;
    assert_eq!(health_ssl, "t", "the health connection is encrypted");
    proxy.shutdown().await.unwrap();

    // A server whose certificate the CA did not sign is never trusted, so never routed.
    let proxy = ProxyBuilder::new(&[&primary])
        .health("sslmode", "verify-full")
        .health("ca_file", other_ca.to_str().unwrap())
        .start()
        .await;
    let s = common::eventually(Duration::from_secs(20), "untrusted backend down", || async {
        let s = status(proxy.admin_addr).await;
        (s["backends"][0]["role"] == "down").then_some(s)
    })
    .await;
    let error = s["backends"][0]["last_error"].as_str().unwrap();
    assert!(error.contains("certificate"), "{error}");
    assert_eq!(s["leader"], serde_json::Value::Null);
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_outside_the_allow_list_get_28000() {
    let primary = PgNode::start_primary("allow");
    let proxy = ProxyBuilder::new(&[&primary]).proxy("allow", "[\"10.0.0.0/8\"]").start().await;
    wait_leader(proxy.admin_addr, Some("allow")).await;
    let err = connect_via(proxy.proxy_addr, "postgres").await.expect_err("127.0.0.1 is not allowed");
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "28000");
    let out = psql_via(proxy.proxy_addr, "", "SELECT 1").await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("not allowed"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        metric_at_least(proxy.admin_addr, "pgleader_sessions_total{result=\"refused_address\"}", 2.0).await,
        2.0
    );
    proxy.shutdown().await.unwrap();

    let proxy = ProxyBuilder::new(&[&primary]).proxy("allow", "[\"10.0.0.0/8\", \"127.0.0.1/32\"]").start().await;
    wait_leader(proxy.admin_addr, Some("allow")).await;
    connect_via(proxy.proxy_addr, "postgres").await.expect("127.0.0.1/32 is allowed");
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_requests_reach_the_leader() {
    let primary = PgNode::start_primary("cancel");
    let proxy = ProxyBuilder::new(&[&primary]).start().await;
    wait_leader(proxy.admin_addr, Some("cancel")).await;
    let client = connect_via(proxy.proxy_addr, "postgres").await.unwrap();
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(60)").await });
    // Cancel once the query is running on the server.
    common::eventually(Duration::from_secs(20), "pg_sleep running", || async {
        (primary
            .sql_async(
                "postgres",
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'",
            )
            .await
            .as_deref()
            == Some("1"))
        .then_some(())
    })
    .await;
    token.cancel_query(tokio_postgres::NoTls).await.expect("send cancel through pgleader");
    let err = sleeper.await.unwrap().expect_err("the query was cancelled");
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::QUERY_CANCELED), "{err}");
    metric_at_least(proxy.admin_addr, "pgleader_sessions_total{result=\"cancel_forwarded\"}", 1.0).await;
    proxy.shutdown().await.unwrap();
}

/// Sends raw bytes as a first packet and returns the ErrorResponse fields the proxy answered.
async fn first_packet_reply(proxy: std::net::SocketAddr, bytes: &[u8]) -> Option<wire::ErrorFields> {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let reply = read_all(&mut s).await;
    wire::error_response(&reply)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_first_packets_get_an_error_and_the_proxy_keeps_serving() {
    let primary = PgNode::start_primary("garbage");
    let proxy = ProxyBuilder::new(&[&primary]).proxy("client_hello_timeout", "300ms").start().await;
    wait_leader(proxy.admin_addr, Some("garbage")).await;
    let healthy = connect_via(proxy.proxy_addr, "postgres").await.unwrap();

    let http =
        first_packet_reply(proxy.proxy_addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("an ErrorResponse");
    assert_eq!((http.severity.as_str(), http.code.as_str()), ("FATAL", "08P01"));
    let mut oversized = 20_000u32.to_be_bytes().to_vec();
    oversized.extend_from_slice(&196_608u32.to_be_bytes());
    let big = first_packet_reply(proxy.proxy_addr, &oversized).await.expect("an ErrorResponse");
    assert_eq!(big.code, "08P01");
    assert!(big.message.contains("10000"), "{}", big.message);
    let short = first_packet_reply(proxy.proxy_addr, &[0, 0, 0, 4]).await.expect("an ErrorResponse");
    assert_eq!(short.code, "08P01");
    let v4 = wire::startup_message(4 << 16, &[("user", "postgres")]);
    let version = first_packet_reply(proxy.proxy_addr, &v4).await.expect("an ErrorResponse");
    assert_eq!(version.code, "0A000");
    // A TLS ClientHello without SSLRequest: closed without a plaintext reply.
    assert!(first_packet_reply(proxy.proxy_addr, &[0x16, 3, 1, 0, 5, 1, 0, 0, 1, 0]).await.is_none());

    // Silent client: closed at client_hello_timeout, counted, and it used no backend connection
    // (the health check's connection is left out: it may reconnect meanwhile).
    let backends = "SELECT count(*) FROM pg_stat_activity WHERE client_port IS NOT NULL \
                    AND application_name IS DISTINCT FROM 'pgleader-health'";
    let before = primary.sql_ok_async("postgres", backends).await;
    let mut silent = TcpStream::connect(proxy.proxy_addr).await.unwrap();
    assert!(read_all(&mut silent).await.is_empty(), "closed without a reply");
    // Counted a moment after the client saw the close: wait for it, then check it is exact.
    let timeouts = "pgleader_sessions_total{result=\"client_timeout\"}";
    assert_eq!(metric_at_least(proxy.admin_addr, timeouts, 1.0).await, 1.0);
    let after = primary.sql_ok_async("postgres", backends).await;
    assert_eq!(before, after);
    // Truncated packet: the length promises more than arrives before the timeout.
    let mut s = TcpStream::connect(proxy.proxy_addr).await.unwrap();
    s.write_all(&[0, 0, 0, 40, 0, 3]).await.unwrap();
    assert!(read_all(&mut s).await.is_empty());

    metric_at_least(proxy.admin_addr, "pgleader_sessions_total{result=\"refused_protocol\"}", 5.0).await;
    let row = healthy.query_one("SELECT 1", &[]).await.expect("an established session is unaffected");
    assert_eq!(row.get::<_, i32>(0), 1);
    connect_via(proxy.proxy_addr, "postgres").await.expect("new sessions still work");
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_max_connections_clients_get_53300() {
    let primary = PgNode::start_primary("limit");
    let proxy =
        ProxyBuilder::new(&[&primary]).proxy("max_connections", "2").proxy("client_hello_timeout", "60s").start().await;
    wait_leader(proxy.admin_addr, Some("limit")).await;
    let first = connect_via(proxy.proxy_addr, "postgres").await.unwrap();
    // A client still in its startup phase holds a slot too, once pgleader has accepted it.
    let _starting = TcpStream::connect(proxy.proxy_addr).await.unwrap();
    wait_connections(proxy.admin_addr, 2).await;
    let refused = connect_via(proxy.proxy_addr, "postgres").await.expect_err("a third client is refused");
    let db = refused.as_db_error().expect("a Postgres error, not a reset");
    assert_eq!(db.code().code(), "53300");
    assert!(db.message().contains("max_connections"), "{}", db.message());
    // psql with the default sslmode=prefer sees the same error after pgleader answers N.
    let out = psql_via(proxy.proxy_addr, "", "SELECT 1").await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("too many client connections"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    metric_at_least(proxy.admin_addr, "pgleader_sessions_total{result=\"refused_limit\"}", 2.0).await;
    assert_eq!(first.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_every_backend_with_counters() {
    let primary = PgNode::start_primary("solo");
    let proxy = ProxyBuilder::with_addresses(vec![
        ("solo".into(), primary.addr()),
        ("nowhere".into(), format!("127.0.0.1:{}", common::free_port())),
    ])
    .start()
    .await;
    wait_leader(proxy.admin_addr, Some("solo")).await;
    let s = common::eventually(Duration::from_secs(20), "nowhere marked down", || async {
        let s = status(proxy.admin_addr).await;
        (s["backends"][1]["role"] == "down").then_some(s)
    })
    .await;
    let down = &s["backends"][1];
    assert_eq!(down["routable"], false);
    assert!(down["consecutive_failures"].as_u64().unwrap() >= 3);
    assert!(down["last_error"].as_str().unwrap().contains("connect"), "{down}");
    let up = &s["backends"][0];
    assert!(up["checks_total"].as_u64().unwrap() >= 1);
    assert_eq!(up["consecutive_failures"], 0);
    assert_eq!(s["reason"], "sole_primary");
    assert_eq!(metric(proxy.admin_addr, "pgleader_backend_up{backend=\"nowhere\"}").await, Some(0.0));
    assert_eq!(metric(proxy.admin_addr, "pgleader_backend_role{backend=\"nowhere\",role=\"down\"}").await, Some(1.0));
    proxy.shutdown().await.unwrap();
}
