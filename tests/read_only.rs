//! The read-only listener (issue 13, DESIGN.md rule 10) against a real primary and streaming
//! replica: reads land on the replica, a replica behind the bounds (replay paused while the
//! primary writes) sends reads to the fallback or refuses them and comes back when it catches
//! up, an idle primary does not make a replica look behind, a frozen replica loses its read
//! sessions after `fall`, and a promoted replica keeps them. Counters and states, never time.

#![allow(clippy::unwrap_used, reason = "in tests a panic is the failure report")]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::eventually;
use common::pg::PgCluster;
use common::proxy::{connect_via, get, metric, metric_at_least, status, wait_leader, ProxyBuilder};

const PATIENCE: Duration = Duration::from_secs(60);

fn read_only(fallback: &str) -> String {
    format!(
        "[read_only]\nlisten = \"127.0.0.1:0\"\nmax_lag_bytes = 1048576\nmax_lag = \"5s\"\nfallback = \"{fallback}\"\n"
    )
}

fn backend<'a>(s: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    s["backends"].as_array().unwrap().iter().find(|b| b["name"] == name).unwrap()
}

/// Waits until `/status` shows the replica in bounds (or not).
async fn wait_in_bounds(admin: SocketAddr, want: bool) -> serde_json::Value {
    eventually(PATIENCE, &format!("replica in bounds = {want}"), || async {
        let s = status(admin).await;
        (backend(&s, "replica")["in_read_bounds"] == want).then_some(s)
    })
    .await
}

/// Where a new session on `addr` lands: (in recovery, server port).
async fn lands(addr: SocketAddr) -> Result<(bool, u16), tokio_postgres::Error> {
    let client = connect_via(addr, "postgres").await?;
    let row = client.query_one("SELECT pg_is_in_recovery(), current_setting('port')::int", &[]).await?;
    Ok((row.get(0), u16::try_from(row.get::<_, i32>(1)).unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_land_on_the_replica_and_an_idle_primary_does_not_make_it_look_behind() {
    let cluster = PgCluster::start();
    // pg_stat_wal_receiver's state is visible to pg_monitor, as in production.
    cluster.primary.sql_ok("postgres", "CREATE ROLE pgleader LOGIN IN ROLE pg_monitor");
    cluster.primary.wait_for_catchup(&cluster.replica);
    let proxy = ProxyBuilder::new(&[&cluster.primary, &cluster.replica])
        .health("user", "pgleader")
        .section(&read_only("refuse"))
        .start()
        .await;
    let (admin, reads) = (proxy.admin_addr, proxy.read_only_addr.unwrap());
    wait_leader(admin, Some("primary")).await;
    wait_in_bounds(admin, true).await;
    let (code, body) = get(admin, "/readyz/read").await;
    assert_eq!((code, body.trim()), (200, "ready: replica replica in bounds"));

    assert_eq!(lands(reads).await.unwrap(), (true, cluster.replica.port()));
    assert_eq!(lands(proxy.proxy_addr).await.unwrap(), (false, cluster.primary.port()));
    // One session open on each listener: counted per listener (once pgleader has finished with
    // the two closed above).
    let read = connect_via(reads, "postgres").await.unwrap();
    let write = connect_via(proxy.proxy_addr, "postgres").await.unwrap();
    let s = eventually(PATIENCE, "one session per listener", || async {
        let s = status(admin).await;
        let counts = (
            backend(&s, "replica")["read_sessions_active"].as_i64(),
            backend(&s, "replica")["sessions_active"].as_i64(),
            backend(&s, "primary")["sessions_active"].as_i64(),
            backend(&s, "primary")["read_sessions_active"].as_i64(),
        );
        (counts == (Some(1), Some(0), Some(1), Some(0))).then_some(s)
    })
    .await;
    assert_eq!(metric(admin, "pgleader_read_sessions_active{backend=\"replica\"}").await, Some(1.0));
    assert_eq!(s["read_only"]["target"], "replica");

    // The primary is idle: through 20 more checks of each, the replica stays in bounds with
    // no time lag, and its read session stays.
    let checks = |s: &serde_json::Value| backend(s, "replica")["checks_total"].as_u64().unwrap();
    let from = checks(&s);
    let mut polls = 0;
    loop {
        let s = status(admin).await;
        let r = backend(&s, "replica");
        assert_eq!(r["in_read_bounds"], true, "an idle primary made the replica look behind: {r}");
        assert!(r["lag_bytes"].is_u64(), "the replica's lag is measured: {r}");
        polls += 1;
        if checks(&s) >= from + 20 && polls >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    read.simple_query("SELECT 1").await.expect("the read session stays");
    write.simple_query("SELECT 1").await.unwrap();
    assert_eq!(metric(admin, "pgleader_sessions_cut_total{reason=\"lag\"}").await, Some(0.0));
    assert_eq!(metric(admin, "pgleader_replicas_in_bounds").await, Some(1.0));
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_sends_reads_to_the_fallback_or_refuses_them_and_gets_them_back() {
    let cluster = PgCluster::start();
    cluster.primary.sql_ok("postgres", "CREATE TABLE filler (v text)");
    cluster.primary.wait_for_catchup(&cluster.replica);
    let builder = ProxyBuilder::new(&[&cluster.primary, &cluster.replica]);
    let proxy = builder.clone().section(&read_only("leader")).start().await;
    let (admin, reads) = (proxy.admin_addr, proxy.read_only_addr.unwrap());
    wait_leader(admin, Some("primary")).await;
    wait_in_bounds(admin, true).await;
    let before = connect_via(reads, "postgres").await.unwrap();
    assert!(before.query_one("SELECT pg_is_in_recovery()", &[]).await.unwrap().get::<_, bool>(0));

    // Replay paused; the primary writes about 8 MB of WAL, over the 1 MiB bound.
    cluster.replica.sql_ok("postgres", "SELECT pg_wal_replay_pause()");
    cluster.primary.sql_ok("postgres", "INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 8000)");
    // Counted from the write's commit, not from before it: the INSERT's own time is not pgleader's.
    let checked = backend(&status(admin).await, "replica")["checks_total"].as_u64().unwrap();
    let s = wait_in_bounds(admin, false).await;
    let r = backend(&s, "replica");
    assert_eq!(r["read_block"], "more than max_lag_bytes behind", "{r}");
    assert!(r["lag_bytes"].as_u64().unwrap() > 1_048_576, "{r}");
    // Within two of the replica's checks of the commit: the next primary check measures the lag
    // against the replica's last replay position (1 in every run here, loaded or not).
    let took = r["checks_total"].as_u64().unwrap() - checked;
    eprintln!("the replica's checks from the write's commit to out of bounds: {took}");
    assert!(took <= 2, "took {took} checks: {r}");
    assert_eq!(metric(admin, "pgleader_replicas_in_bounds").await, Some(0.0));

    // New read sessions go to the leader (the fallback)...
    assert_eq!(lands(reads).await.unwrap(), (false, cluster.primary.port()));
    let (code, body) = get(admin, "/readyz/read").await;
    assert_eq!((code, body.trim()), (200, "ready: no replica in bounds, fallback to the leader primary"));
    // ...and the session on the replica is cut after `fall` measured checks out of bounds.
    metric_at_least(admin, "pgleader_sessions_cut_total{reason=\"lag\"}", 1.0).await;
    assert!(before.simple_query("SELECT 1").await.is_err(), "the read session on the lagging replica was cut");

    // fallback = "refuse": 57P03, naming the lag.
    let mut config = builder.clone().section(&read_only("refuse")).config();
    config.proxy.listen = proxy.proxy_addr;
    config.admin.listen = admin;
    config.read_only.as_mut().unwrap().listen = reads;
    proxy.reload(config).await.expect("reload fallback = refuse");
    let err = lands(reads).await.unwrap_err();
    let db = err.as_db_error().unwrap_or_else(|| panic!("not an ErrorResponse: {err}"));
    assert_eq!(db.code().code(), "57P03", "{db}");
    assert!(db.message().contains("replica: more than max_lag_bytes behind"), "{}", db.message());
    assert!(db.message().contains("max_lag_bytes 1048576"), "{}", db.message());
    metric_at_least(admin, "pgleader_sessions_total{result=\"no_replica\"}", 1.0).await;
    assert_eq!(get(admin, "/readyz/read").await.0, 503);
    // The main listener is not affected.
    assert_eq!(lands(proxy.proxy_addr).await.unwrap(), (false, cluster.primary.port()));

    // Replay resumed: reads return to the replica.
    cluster.replica.sql_ok("postgres", "SELECT pg_wal_replay_resume()");
    wait_in_bounds(admin, true).await;
    assert_eq!(lands(reads).await.unwrap(), (true, cluster.replica.port()));
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_replica_loses_its_read_sessions_after_fall_and_reads_fall_back() {
    let cluster = PgCluster::start();
    let proxy = ProxyBuilder::new(&[&cluster.primary, &cluster.replica]).section(&read_only("leader")).start().await;
    let (admin, reads) = (proxy.admin_addr, proxy.read_only_addr.unwrap());
    wait_leader(admin, Some("primary")).await;
    wait_in_bounds(admin, true).await;
    let session = connect_via(reads, "postgres").await.unwrap();
    assert!(session.query_one("SELECT pg_is_in_recovery()", &[]).await.unwrap().get::<_, bool>(0));

    // Frozen, the server keeps the session's socket open: only pgleader can end it.
    cluster.replica.freeze();
    metric_at_least(admin, "pgleader_sessions_cut_total{reason=\"down\"}", 1.0).await;
    let s = status(admin).await;
    assert!(backend(&s, "replica")["consecutive_failures"].as_u64().unwrap() >= 3, "cut only after fall");
    let query = tokio::time::timeout(PATIENCE, session.simple_query("SELECT 1")).await;
    assert!(matches!(query, Ok(Err(_))), "the session on the frozen replica was closed: {query:?}");
    assert_eq!(lands(reads).await.unwrap(), (false, cluster.primary.port()));
    cluster.replica.thaw();
    wait_in_bounds(admin, true).await;
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_replica_keeps_its_read_sessions_and_the_main_listener_follows_it() {
    let mut cluster = PgCluster::start();
    let proxy = ProxyBuilder::new(&[&cluster.primary, &cluster.replica]).section(&read_only("refuse")).start().await;
    let (admin, reads) = (proxy.admin_addr, proxy.read_only_addr.unwrap());
    wait_leader(admin, Some("primary")).await;
    wait_in_bounds(admin, true).await;
    let session = connect_via(reads, "postgres").await.unwrap();
    assert!(session.query_one("SELECT pg_is_in_recovery()", &[]).await.unwrap().get::<_, bool>(0));

    cluster.primary.stop_immediate_async().await;
    cluster.replica.promote_async().await;
    wait_leader(admin, Some("replica")).await;
    assert_eq!(lands(proxy.proxy_addr).await.unwrap(), (false, cluster.replica.port()));
    let row = session.query_one("SELECT pg_is_in_recovery()", &[]).await.expect("the read session stays");
    assert!(!row.get::<_, bool>(0), "it is on the promoted primary now");
    for reason in ["lag", "down", "other_system", "recovery", "leader_changed"] {
        let series = format!("pgleader_sessions_cut_total{{reason=\"{reason}\"}}");
        assert_eq!(metric(admin, &series).await, Some(0.0), "{series}");
    }
    proxy.shutdown().await.unwrap();
}
