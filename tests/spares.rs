//! Spare backend connections (`[proxy] spare_connections`, issue 15), against real PostgreSQL.
//! The server is the oracle: a spare is a postmaster child that has not read a startup packet
//! yet (it still carries the postmaster's own command line), and every client session is one
//! "connection authorized" line of `log_connections`. Expectations are counts and states.

mod common;

use std::time::Duration;

use common::eventually;
use common::pg::{authorized, blocking, PgCluster, PgNode};
use common::proxy::{connect_via, metric, wait_leader, ProxyBuilder};

/// The postmaster's children that have not read a startup packet: a forked backend sets its
/// process title only after it has one, so until then it shows the postmaster's command line.
fn waiting_backends(node: &PgNode) -> usize {
    let Some(postmaster) = node.postmaster_pid() else { return 0 };
    let cmdline = |pid: &str| std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let own = cmdline(&postmaster.to_string());
    let Ok(procs) = std::fs::read_dir("/proc") else { return 0 };
    procs
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // pid (comm) state ppid ...: the fields after the last ')'.
            let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_owned));
            ppid.as_deref() == Some(&postmaster.to_string()) && cmdline(pid) == own
        })
        .count()
}

async fn spares(admin: std::net::SocketAddr, event: &str) -> f64 {
    metric(admin, &format!("pgleader_spare_connections_total{{event=\"{event}\"}}")).await.unwrap_or(-1.0)
}

/// Waits until pgleader holds `n` spares and `node`'s server shows exactly `n` waiting backends.
async fn spares_on(admin: std::net::SocketAddr, node: &PgNode, n: usize) {
    eventually(Duration::from_secs(20), &format!("{n} spares waiting on {}", node.name), || async {
        let ready = metric(admin, "pgleader_spare_connections").await == Some(n as f64);
        (ready && waiting_backends(node) == n).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spares_wait_on_the_leader_carry_sessions_and_follow_a_failover() {
    let cluster = blocking(|| {
        let cluster = PgCluster::start();
        cluster.primary.sql_ok("postgres", "CREATE DATABASE counted");
        cluster.primary.wait_for_catchup(&cluster.replica);
        for node in [&cluster.primary, &cluster.replica] {
            node.append_conf("log_connections = on\n");
            node.sql_ok("postgres", "SELECT pg_reload_conf()");
        }
        cluster
    })
    .await;
    let proxy = ProxyBuilder::new(&[&cluster.primary, &cluster.replica]).proxy("spare_connections", "3").start().await;
    let admin = proxy.admin_addr;
    wait_leader(admin, Some("primary")).await;
    spares_on(admin, &cluster.primary, 3).await;
    assert_eq!(waiting_backends(&cluster.replica), 0, "never a spare on a replica");

    // Each client is one backend session: a spare carries its startup, and no spare adds one.
    let before = authorized(&cluster.primary.logfile(), "counted");
    for _ in 0..5 {
        let client = connect_via(proxy.proxy_addr, "counted").await.expect("a session through a spare");
        let port: String = client.query_one("SELECT current_setting('port')", &[]).await.unwrap().get(0);
        assert_eq!(port, cluster.primary.port().to_string());
    }
    assert!(spares(admin, "used").await >= 1.0, "at least the first client started on a spare");
    assert_eq!(authorized(&cluster.primary.logfile(), "counted") - before, 5, "one backend session per client");
    spares_on(admin, &cluster.primary, 3).await;

    // The leader goes: its spares are closed; none is opened anywhere while there is no leader.
    let mut cluster = cluster;
    // Each goes either as dropped (the leader changed) or as dead (the server closed it first).
    let gone = |admin| async move { spares(admin, "dropped").await + spares(admin, "dead").await };
    let before_stop = gone(admin).await;
    let cluster = blocking(move || {
        cluster.primary.stop();
        cluster
    })
    .await;
    wait_leader(admin, None).await;
    eventually(Duration::from_secs(10), "the old leader's spares dropped", || async {
        (metric(admin, "pgleader_spare_connections").await == Some(0.0)).then_some(())
    })
    .await;
    assert!(gone(admin).await >= before_stop + 3.0, "the three spares are closed");
    assert_eq!(waiting_backends(&cluster.replica), 0, "no spare on a replica while there is no leader");

    // The promoted replica gets spares, and the next client lands there.
    let cluster = blocking(move || {
        cluster.replica.promote();
        cluster
    })
    .await;
    wait_leader(admin, Some("replica")).await;
    spares_on(admin, &cluster.replica, 3).await;
    let client = connect_via(proxy.proxy_addr, "counted").await.expect("a session on the new leader");
    let port: String = client.query_one("SELECT current_setting('port')", &[]).await.unwrap().get(0);
    assert_eq!(port, cluster.replica.port().to_string());
    drop(client);

    // The drain closes them all, without a session.
    proxy.begin_shutdown();
    eventually(Duration::from_secs(10), "spares closed by the drain", || async {
        (waiting_backends(&cluster.replica) == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spares_the_server_closed_are_never_shown_to_a_client() {
    let cluster = blocking(|| {
        let cluster = PgCluster::start();
        // Every spare older than a second is closed by the server itself.
        cluster.primary.append_conf("authentication_timeout = '1s'\n");
        cluster.primary.sql_ok("postgres", "SELECT pg_reload_conf()");
        cluster
    })
    .await;
    let proxy = ProxyBuilder::new(&[&cluster.primary, &cluster.replica])
        .proxy("spare_connections", "4")
        .proxy("spare_max_age", "5m")
        .start()
        .await;
    let admin = proxy.admin_addr;
    wait_leader(admin, Some("primary")).await;
    spares_on(admin, &cluster.primary, 4).await;
    eventually(Duration::from_secs(20), "pgleader saw that the server closed its spares", || async {
        (spares(admin, "dead").await >= 4.0).then_some(())
    })
    .await;
    let changes = metric(admin, "pgleader_leader_changes_total").await;
    for i in 0..20 {
        let client = connect_via(proxy.proxy_addr, "postgres").await.unwrap_or_else(|e| panic!("client {i}: {e}"));
        client.simple_query("SELECT 1").await.unwrap();
    }
    assert_eq!(
        metric(admin, "pgleader_leader_changes_total").await,
        changes,
        "a dead spare is not news about the leader: it stayed routable throughout"
    );
    assert_eq!(metric(admin, "pgleader_sessions_total{result=\"no_leader\"}").await, Some(0.0));
}
