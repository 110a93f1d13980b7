//! Leader changes on a real primary + streaming replica (no Patroni): promotion after a stop,
//! promotion beside a running old primary (newer timeline wins, old sessions are cut), split
//! brain, a frozen primary, and clients waiting through a leaderless gap.
//! Every test that changes the topology owns its cluster.

#![allow(clippy::unwrap_used, reason = "in tests a panic is the failure report")]

mod common;

use std::time::{Duration, Instant};

use common::pg::{PgCluster, PgNode};
use common::proxy::{connect_via, metric, metric_at_least, psql_via, status, wait_leader, ProxyBuilder};

fn checks(status: &serde_json::Value, backend: usize) -> u64 {
    status["backends"][backend]["checks_total"].as_u64().expect("checks_total")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_sessions_follow_a_promotion_after_the_primary_stops() {
    let mut cluster = PgCluster::start();
    let proxy = ProxyBuilder::new(&[&cluster.primary, &cluster.replica]).start().await;
    wait_leader(proxy.admin_addr, Some("primary")).await;
    let old = connect_via(proxy.proxy_addr, "postgres").await.unwrap();
    old.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    cluster.primary.wait_for_catchup_async(&cluster.replica).await;

    cluster.primary.stop_async().await;
    wait_leader(proxy.admin_addr, None).await;
    assert!(old.simple_query("SELECT 1").await.is_err(), "the stopped primary's session is gone");
    // Watch the replica itself and /status side by side, to see how soon after the server
    // leaves recovery pgleader routes to it.
    let direct = cluster.replica.connect("postgres").await;
    cluster.replica.promote_nowait_async().await;
    let issued = Instant::now();
    let (mut promoted, mut checks_at_promotion) = (None, 0);
    let s = loop {
        let s = status(proxy.admin_addr).await;
        if promoted.is_none() && !direct.query_one("SELECT pg_is_in_recovery()", &[]).await.unwrap().get::<_, bool>(0) {
            promoted = Some(issued.elapsed());
            checks_at_promotion = checks(&s, 1);
        }
        if s["leader"] == "replica" {
            break s;
        }
        assert!(issued.elapsed() < Duration::from_secs(60), "no failover: {s}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let elected = issued.elapsed();
    let promoted = promoted.unwrap_or(elected);
    let taken = checks(&s, 1).saturating_sub(checks_at_promotion);
    // A measurement, not an assertion: how many checks it took is a matter of scheduling on a
    // shared 2-core machine. What is certain is asserted: the promoted replica leads, on the
    // new timeline.
    eprintln!(
        "failover detection: server out of recovery {promoted:?} after pg_ctl promote, leader in /status {elected:?} \
         ({:?} later, {taken} check(s) after the test saw the promotion)",
        elected.saturating_sub(promoted)
    );
    assert_eq!(s["backends"][1]["timeline"], 2);

    let new = connect_via(proxy.proxy_addr, "postgres").await.expect("new sessions reach the new primary");
    new.batch_execute("INSERT INTO t VALUES (1)").await.expect("writes succeed on the new primary");
    let port: String = new.query_one("SELECT current_setting('port')", &[]).await.unwrap().get(0);
    assert_eq!(port, cluster.replica.port().to_string());
    assert!(metric(proxy.admin_addr, "pgleader_leader_changes_total").await.unwrap() >= 3.0);
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_replica_takes_over_from_a_running_primary_and_old_sessions_are_cut() {
    let cluster = PgCluster::start();
    let proxy = ProxyBuilder::new(&[&cluster.primary, &cluster.replica]).start().await;
    wait_leader(proxy.admin_addr, Some("primary")).await;
    let old = connect_via(proxy.proxy_addr, "postgres").await.unwrap();
    old.simple_query("SELECT 1").await.unwrap();

    cluster.replica.promote_async().await;
    let s = wait_leader(proxy.admin_addr, Some("replica")).await;
    assert_eq!(s["reason"], "newest_timeline");
    assert_eq!(s["backends"][0]["role"], "primary", "the old primary still runs and says so");
    assert_eq!(s["backends"][0]["routable"], false);
    common::eventually(Duration::from_secs(10), "old session cut", || async { old.is_closed().then_some(()) }).await;
    assert!(old.simple_query("SELECT 1").await.is_err());
    // Counted a moment after the client saw the cut: wait for it, then check it is exact.
    let cut = "pgleader_sessions_total{result=\"cut\"}";
    assert_eq!(metric_at_least(proxy.admin_addr, cut, 1.0).await, 1.0);
    let new = connect_via(proxy.proxy_addr, "postgres").await.unwrap();
    let port: String = new.query_one("SELECT current_setting('port')", &[]).await.unwrap().get(0);
    assert_eq!(port, cluster.replica.port().to_string());
    // Still running, the old primary is checked on and on and never routed to.
    let before = checks(&status(proxy.admin_addr).await, 0);
    common::eventually(Duration::from_secs(10), "more checks of the old primary", || async {
        (checks(&status(proxy.admin_addr).await, 0) >= before + 3).then_some(())
    })
    .await;
    assert_eq!(status(proxy.admin_addr).await["leader"], "replica");
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_independent_primaries_are_split_brain_and_refused() {
    let a = PgNode::start_primary("a");
    let b = PgNode::start_primary("b");
    let proxy = ProxyBuilder::new(&[&a, &b]).proxy("leader_wait_timeout", "500ms").start().await;
    let s = common::eventually(Duration::from_secs(20), "split brain", || async {
        let s = status(proxy.admin_addr).await;
        (s["split_brain"] == true).then_some(s)
    })
    .await;
    assert_eq!(s["leader"], serde_json::Value::Null);
    assert_eq!(s["reason"], "split_brain_different_systems");
    assert_eq!(metric(proxy.admin_addr, "pgleader_split_brain").await, Some(1.0));
    let err = connect_via(proxy.proxy_addr, "postgres").await.expect_err("no leader");
    let db = err.as_db_error().expect("an ErrorResponse, not a reset");
    assert_eq!(db.code().code(), "57P03");
    assert!(db.message().contains("split brain"), "{}", db.message());
    assert_eq!(metric_at_least(proxy.admin_addr, "pgleader_sessions_total{result=\"no_leader\"}", 1.0).await, 1.0);
    proxy.shutdown().await.unwrap();
}

/// DESIGN rules 2 and 3 on a hung primary: after ONE failed check new sessions are held (there
/// is no leader) while the open session stays; at `fall` failed checks the backend is down and
/// the session is cut; after the thaw the held client is released to it.
///
/// `fall = 5` with a 1 s check timeout leaves about four seconds between the first failed check
/// and the fifth, so the state "no leader, fewer than `fall` failures, session open" is observed
/// by polling `/status`, and the client is seen held inside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_is_marked_down_after_fall_failed_checks() {
    const FALL: u64 = 5;
    let cluster = PgCluster::start();
    let proxy = ProxyBuilder::new(&[&cluster.primary, &cluster.replica])
        .health("fall", &FALL.to_string())
        .health("timeout", "1s")
        .proxy("leader_wait_timeout", "60s")
        .start()
        .await;
    wait_leader(proxy.admin_addr, Some("primary")).await;
    let session = connect_via(proxy.proxy_addr, "postgres").await.unwrap();
    let failures_before = status(proxy.admin_addr).await["backends"][0]["failures_total"].as_u64().unwrap();

    cluster.primary.freeze();
    // The first failed check takes the leader away.
    let s = wait_leader(proxy.admin_addr, None).await;
    let frozen = &s["backends"][0];
    let streak = frozen["consecutive_failures"].as_u64().unwrap();
    assert!((1..FALL).contains(&streak), "no leader after 1 failed check, before fall ({FALL}): {frozen}");
    assert_ne!(frozen["role"], "down", "{frozen}");
    assert!(!session.is_closed(), "the open session stays after one failed check");
    // A new client is held, not refused and not sent to the frozen primary.
    let addr = proxy.proxy_addr;
    let held = tokio::spawn(async move { connect_via(addr, "postgres").await });
    common::eventually(Duration::from_secs(10), "the new client held", || async {
        (metric(proxy.admin_addr, "pgleader_clients_waiting").await == Some(1.0)).then_some(())
    })
    .await;
    let s = status(proxy.admin_addr).await;
    let streak = s["backends"][0]["consecutive_failures"].as_u64().unwrap();
    assert!(streak < FALL, "the client was held before fall, with {streak} failures");
    assert!(!session.is_closed(), "the open session stays until fall");
    assert!(!held.is_finished(), "the new client is still held");

    let s = common::eventually(Duration::from_secs(60), "frozen primary down", || async {
        let s = status(proxy.admin_addr).await;
        (s["backends"][0]["role"] == "down").then_some(s)
    })
    .await;
    let failed = s["backends"][0]["failures_total"].as_u64().unwrap() - failures_before;
    assert!(failed >= FALL, "down only after fall failed checks, saw {failed}");
    assert!(s["backends"][0]["last_error"].as_str().unwrap().contains("timed out"), "{}", s["backends"][0]);
    assert_eq!(s["leader"], serde_json::Value::Null, "the replica was not promoted: no leader");
    assert_eq!(s["backends"][1]["role"], "replica");
    // The session on the frozen primary is cut at `fall`, so it cannot resume on a stale primary.
    common::eventually(Duration::from_secs(10), "session cut", || async { session.is_closed().then_some(()) }).await;

    cluster.primary.thaw();
    wait_leader(proxy.admin_addr, Some("primary")).await;
    let released = held.await.unwrap().expect("the held client is released once the primary answers again");
    assert_eq!(released.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    connect_via(proxy.proxy_addr, "postgres").await.expect("routing resumes after the thaw");
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_leader_clients_wait_then_get_57p03_and_a_leader_that_appears_releases_them() {
    let cluster = PgCluster::start();
    // Only the replica is a backend: no leader.
    let proxy = ProxyBuilder::new(&[&cluster.replica]).proxy("leader_wait_timeout", "1s").start().await;
    common::eventually(Duration::from_secs(20), "replica checked", || async {
        (status(proxy.admin_addr).await["backends"][0]["role"] == "replica").then_some(())
    })
    .await;
    let out = psql_via(proxy.proxy_addr, "sslmode=disable", "SELECT 1").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("pgleader: no leader available") && stderr.contains("no backend is a healthy primary"),
        "{stderr}"
    );
    metric_at_least(proxy.admin_addr, "pgleader_leader_wait_seconds_count", 1.0).await;
    let (code, body) = common::proxy::get(proxy.admin_addr, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    proxy.shutdown().await.unwrap();

    // With a longer wait, a client that arrives before the promotion connects after it.
    let proxy = ProxyBuilder::new(&[&cluster.replica]).proxy("leader_wait_timeout", "60s").start().await;
    let addr = proxy.proxy_addr;
    let waiting = tokio::spawn(async move { connect_via(addr, "postgres").await });
    common::eventually(Duration::from_secs(20), "client waiting", || async {
        (metric(proxy.admin_addr, "pgleader_clients_waiting").await == Some(1.0)).then_some(())
    })
    .await;
    cluster.replica.promote_async().await;
    let client = waiting.await.unwrap().expect("the waiting client is released to the new leader");
    let row = client.query_one("SELECT pg_is_in_recovery()", &[]).await.unwrap();
    assert!(!row.get::<_, bool>(0));
    common::eventually(Duration::from_secs(10), "no client waiting", || async {
        (metric(proxy.admin_addr, "pgleader_clients_waiting").await == Some(0.0)).then_some(())
    })
    .await;
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_refuses_new_connections_with_57p03_is_skipped_without_the_client_noticing() {
    refusing_leader_is_skipped(0).await;
}

/// With spares, PostgreSQL decided admission when it forked each spare's backend: the spares
/// opened before the smart shutdown still carry a session each (exactly as a client that had
/// connected then), and the first spare opened after it answers 57P03 like a fresh connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_spares_a_57p03_leader_is_skipped_after_at_most_the_spares_opened_before() {
    refusing_leader_is_skipped(2).await;
}

async fn refusing_leader_is_skipped(spares: usize) {
    let cluster = PgCluster::start();
    let proxy = ProxyBuilder::new(&[&cluster.primary, &cluster.replica])
        .proxy("leader_wait_timeout", "60s")
        .proxy("spare_connections", &spares.to_string())
        .start()
        .await;
    wait_leader(proxy.admin_addr, Some("primary")).await;
    common::eventually(Duration::from_secs(20), "the spares ready", || async {
        (metric(proxy.admin_addr, "pgleader_spare_connections").await == Some(spares as f64)).then_some(())
    })
    .await;
    // An open session keeps the smart shutdown pending; pgleader's health connection, opened
    // before it, keeps answering "primary" too — only new connections meet 57P03.
    let session = connect_via(proxy.proxy_addr, "postgres").await.unwrap();
    cluster.primary.begin_smart_shutdown_async().await;
    let refused = cluster.primary.psql_async("postgres", &["-c", "SELECT 1"]).await;
    assert!(String::from_utf8_lossy(&refused.stderr).contains("shutting down"), "the server refuses new clients");
    assert_eq!(status(proxy.admin_addr).await["leader"], "primary", "pgleader has not noticed yet");

    // New clients, one at a time: each is routed to the primary; the first to meet 57P03 there
    // waits instead of failing. Before it, only clients on spares opened before the shutdown.
    let addr = proxy.proxy_addr;
    let mut on_old_primary = Vec::new();
    let waiting = loop {
        let mut client = tokio::spawn(async move { connect_via(addr, "postgres").await });
        tokio::select! {
            done = &mut client => {
                let c = done.unwrap().expect("a client on a spare opened before the shutdown gets a session");
                on_old_primary.push(c);
                assert!(on_old_primary.len() <= spares, "more sessions on a refusing leader than spares opened before");
            }
            _ = wait_leader(proxy.admin_addr, None) => break client,
        }
    };
    if spares > 0 {
        // `session` took one spare; the other, opened before the shutdown, carried the first client.
        assert!(!on_old_primary.is_empty(), "a spare opened before the shutdown was used");
    }
    let s = status(proxy.admin_addr).await;
    assert!(s["backends"][0]["last_error"].as_str().unwrap().contains("57P03"), "{}", s["backends"][0]);
    common::eventually(Duration::from_secs(10), "the client waiting again", || async {
        (metric(proxy.admin_addr, "pgleader_clients_waiting").await == Some(1.0)).then_some(())
    })
    .await;
    common::eventually(Duration::from_secs(10), "no spares without a leader", || async {
        (metric(proxy.admin_addr, "pgleader_spare_connections").await == Some(0.0)).then_some(())
    })
    .await;
    cluster.replica.promote_async().await;
    let client = waiting.await.unwrap().expect("released to the new leader, never shown the 57P03");
    let port: String = client.query_one("SELECT current_setting('port')", &[]).await.unwrap().get(0);
    assert_eq!(port, cluster.replica.port().to_string());
    assert_eq!(metric(proxy.admin_addr, "pgleader_sessions_total{result=\"no_leader\"}").await, Some(0.0));
    drop((session, on_old_primary));
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_arriving_during_a_crash_are_held_and_released_to_the_promoted_replica() {
    let mut cluster = PgCluster::start();
    let proxy =
        ProxyBuilder::new(&[&cluster.primary, &cluster.replica]).proxy("leader_wait_timeout", "60s").start().await;
    wait_leader(proxy.admin_addr, Some("primary")).await;
    cluster.primary.stop_immediate_async().await;
    wait_leader(proxy.admin_addr, None).await;
    let addr = proxy.proxy_addr;
    let clients: Vec<_> = (0..5).map(|_| tokio::spawn(async move { connect_via(addr, "postgres").await })).collect();
    common::eventually(Duration::from_secs(20), "clients waiting", || async {
        (metric(proxy.admin_addr, "pgleader_clients_waiting").await == Some(5.0)).then_some(())
    })
    .await;
    cluster.replica.promote_async().await;
    for c in clients {
        let client = c.await.unwrap().expect("every held client connects");
        assert!(!client.query_one("SELECT pg_is_in_recovery()", &[]).await.unwrap().get::<_, bool>(0));
    }
    proxy.shutdown().await.unwrap();
}
