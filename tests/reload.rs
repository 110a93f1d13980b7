//! Live reload on real PostgreSQL: backends added, removed and re-addressed and timeouts changed
//! without dropping sessions to a leader that stays the leader; invalid files rejected with the
//! old config kept; `POST /reload` from loopback; SIGHUP on the real binary.

#![allow(clippy::unwrap_used, reason = "in tests a panic is the failure report")]

mod common;

use std::time::Duration;

use common::pg::PgCluster;
use common::proxy::{connect_via, http, metric, status, wait_leader, ProxyBuilder};

fn names(s: &serde_json::Value) -> Vec<String> {
    s["backends"].as_array().unwrap().iter().map(|b| b["name"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_change_without_dropping_sessions_to_the_leader() {
    let cluster = PgCluster::start();
    let nowhere = format!("127.0.0.1:{}", common::free_port());
    let proxy = ProxyBuilder::with_addresses(vec![("primary".into(), cluster.primary.addr())]).start().await;
    wait_leader(proxy.admin_addr, Some("primary")).await;
    let session = connect_via(proxy.proxy_addr, "postgres").await.unwrap();

    // Add the replica, and a backend at a wrong address; change timeouts and the check interval.
    let grown = ProxyBuilder::with_addresses(vec![
        ("primary".into(), cluster.primary.addr()),
        ("replica".into(), cluster.replica.addr()),
        ("moved".into(), nowhere),
    ])
    .proxy("leader_wait_timeout", "3s")
    .health("interval", "300ms");
    let diff = proxy.reload(grown.config()).await.expect("reload applies");
    assert!(diff.hot.contains(&"backend") && diff.hot.contains(&"health") && diff.hot.contains(&"proxy"), "{diff:?}");
    let s = common::eventually(Duration::from_secs(20), "replica checked", || async {
        let s = status(proxy.admin_addr).await;
        (names(&s) == ["primary", "replica", "moved"] && s["backends"][1]["role"] == "replica").then_some(s)
    })
    .await;
    assert_eq!(s["leader"], "primary");
    assert_eq!(s["config_generation"], 2);
    session.simple_query("SELECT 1").await.expect("the session to the unchanged leader survives");

    // Re-address `moved` to the replica's address and drop `replica`.
    let readdressed = ProxyBuilder::with_addresses(vec![
        ("primary".into(), cluster.primary.addr()),
        ("moved".into(), cluster.replica.addr()),
    ]);
    proxy.reload(readdressed.config()).await.unwrap();
    // Until the new table is published, /status still shows `replica` as backend 1, a replica.
    let s = common::eventually(Duration::from_secs(20), "moved is the replica now", || async {
        let s = status(proxy.admin_addr).await;
        (names(&s) == ["primary", "moved"] && s["backends"][1]["role"] == "replica").then_some(s)
    })
    .await;
    assert_eq!(s["backends"][1]["address"], cluster.replica.addr());
    assert_eq!(metric(proxy.admin_addr, "pgleader_backend_up{backend=\"replica\"}").await, None, "its series is gone");
    session.simple_query("SELECT 1").await.expect("still connected after the second reload");
    assert_eq!(metric(proxy.admin_addr, "pgleader_config_reloads_total{result=\"ok\"}").await, Some(2.0));
    assert_eq!(metric(proxy.admin_addr, "pgleader_sessions_total{result=\"cut\"}").await, Some(0.0));

    // Removing the leader itself cuts its sessions: nothing routes there any more.
    proxy.reload(ProxyBuilder::with_addresses(vec![("moved".into(), cluster.replica.addr())]).config()).await.unwrap();
    common::eventually(Duration::from_secs(10), "session on a removed backend cut", || async {
        session.is_closed().then_some(())
    })
    .await;
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_reload_rereads_the_file_and_rejects_an_invalid_one() {
    let cluster = PgCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgleader.toml");
    let one = ProxyBuilder::new(&[&cluster.primary]);
    std::fs::write(&path, one.toml()).unwrap();
    common::proxy::init_test_tracing();
    let proxy = pgleader::app::start_with_file(one.config(), path.clone()).await.unwrap();
    wait_leader(proxy.admin_addr, Some("primary")).await;

    std::fs::write(&path, one.toml().replace("[health]", "[health]\nintervall = \"1s\"")).unwrap();
    let (code, body) = http("POST", proxy.admin_addr, "/reload").await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("intervall"), "the error names the key: {body}");
    assert_eq!(metric(proxy.admin_addr, "pgleader_config_reloads_total{result=\"error\"}").await, Some(1.0));
    let s = status(proxy.admin_addr).await;
    assert_eq!((s["config_generation"].as_u64(), s["leader"].as_str()), (Some(1), Some("primary")), "unchanged");

    // A value past its bound (this one used to panic in the semaphore resize) is rejected with
    // its key and line, and the running configuration stays.
    let huge = one.clone().proxy("max_connections", "9223372036854775807").health("fall", "4294967295");
    std::fs::write(&path, huge.toml()).unwrap();
    let line = |key: &str| huge.toml().lines().position(|l| l.starts_with(key)).unwrap() + 1;
    let (code, body) = http("POST", proxy.admin_addr, "/reload").await;
    assert_eq!(code, 400, "{body}");
    for want in [
        format!(
            "proxy.max_connections (line {}): 9223372036854775807 is above the maximum of 262143",
            line("max_connections")
        ),
        format!("health.fall (line {}): 4294967295 is above the maximum of 100", line("fall")),
    ] {
        assert!(body.contains(&want), "wanted {want:?} in: {body}");
    }
    assert_eq!(metric(proxy.admin_addr, "pgleader_config_reloads_total{result=\"error\"}").await, Some(2.0));
    let s = status(proxy.admin_addr).await;
    assert_eq!((s["config_generation"].as_u64(), s["leader"].as_str()), (Some(1), Some("primary")), "unchanged");
    connect_via(proxy.proxy_addr, "postgres").await.expect("still serving on the old configuration");

    std::fs::write(&path, ProxyBuilder::new(&[&cluster.primary, &cluster.replica]).toml()).unwrap();
    let (code, body) = http("POST", proxy.admin_addr, "/reload").await;
    assert_eq!(code, 200, "{body}");
    // The reload has applied; the elector publishes the table a moment later.
    common::eventually(Duration::from_secs(10), "the backends of the rewritten file", || async {
        (names(&status(proxy.admin_addr).await) == ["primary", "replica"]).then_some(())
    })
    .await;
    assert_eq!(http("GET", proxy.admin_addr, "/reload").await.0, 405, "reload is POST only");
    proxy.shutdown().await.unwrap();
}
