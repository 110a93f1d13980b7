//! Fencing with Patroni's leader lease (issue 11), against real etcd and real Patroni: the
//! loopback cluster of `tests/common/patroni.rs` (3 etcd members at heartbeat 100 ms / election
//! 1000 ms; Patroni ttl 20 s, loop_wait 1 s, retry_timeout 5 s) with pgleaders in-process.
//!
//! Each scenario asserts counts and the order of events; durations are printed. The fenced
//! pgleader runs pgleader's defaults for `[etcd]` (timeout 500 ms, max_staleness 3 s) and
//! `[health]` (interval 1 s).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::eventually;
use common::patroni::{PatroniCluster, Replication, APP_DB, APP_PASSWORD, APP_USER};
use common::proxy::{init_test_tracing, metric, metric_at_least, status};
use common::workload::{self, Attempt, Outcome, Run, Workload, WorkloadOptions, Writer};
use tokio::sync::Mutex;

/// One scenario at a time: each runs a Patroni cluster, and they share 2 cores.
static SERIAL: Mutex<()> = Mutex::const_new(());
const PATIENCE: Duration = Duration::from_secs(90);

/// An `[etcd]` section, with `extra` lines.
fn etcd_section(endpoints: &[String], scope: &str, extra: &str) -> String {
    let endpoints = endpoints.iter().map(|e| format!("{e:?}")).collect::<Vec<_>>().join(", ");
    format!("[etcd]\nendpoints = [{endpoints}]\nscope = {scope:?}\n{extra}")
}

/// Starts a pgleader in front of `cluster` with `etcd` (an `[etcd]` section or "") and the
/// backends `backends` (a `[[backend]]` list, or the cluster's own when empty).
async fn pgleader(cluster: &PatroniCluster, etcd: &str, backends: &str, leader_wait: &str) -> pgleader::Running {
    init_test_tracing();
    common::watch_worker_panics();
    let mut base = cluster.pgleader_toml();
    if !backends.is_empty() {
        base = base[..base.find("\n[[backend]]").unwrap_or(base.len())].to_owned() + "\n" + backends;
    }
    let toml = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nleader_wait_timeout = \"{leader_wait}\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n{etcd}\n{base}"
    );
    let config = pgleader::Config::from_toml(&toml, "<fencing-test>").unwrap_or_else(|e| panic!("{e}\n{toml}"));
    pgleader::start(config).await.expect("start pgleader")
}

/// The cluster's `[etcd]` as production would write it.
fn fenced(cluster: &PatroniCluster) -> String {
    etcd_section(&cluster.etcd_endpoints(), &cluster.scope, "")
}

fn workload_via(proxy: &pgleader::Running, first_id: i64) -> Workload {
    let addr = proxy.proxy_addr;
    let mut opts = WorkloadOptions::new(&addr.ip().to_string(), addr.port(), APP_USER, APP_PASSWORD, APP_DB);
    opts.attempt_timeout = Duration::from_secs(30);
    opts.first_id = first_id;
    Workload::start(opts)
}

async fn wait_routed(admin: SocketAddr, leader: Option<&str>) -> serde_json::Value {
    eventually(PATIENCE, &format!("pgleader routes to {leader:?}"), || async {
        let s = status(admin).await;
        (s["leader"].as_str() == leader).then_some(s)
    })
    .await
}

/// Waits until `/status` satisfies `check`.
async fn wait_status(admin: SocketAddr, what: &str, check: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    eventually(PATIENCE, what, || async {
        let s = status(admin).await;
        check(&s).then_some(s)
    })
    .await
}

/// The app role's session through pgleader.
async fn connect_app(proxy: SocketAddr) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let url = format!(
        "host={} port={} user={APP_USER} password={APP_PASSWORD} dbname={APP_DB} sslmode=disable connect_timeout=30",
        proxy.ip(),
        proxy.port()
    );
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// A client through pgleader that must be refused: its SQLSTATE and message.
async fn refused(proxy: SocketAddr) -> (String, String) {
    let conn = connect_app(proxy).await;
    let Err(err) = conn else { panic!("the client was admitted; it should have been refused") };
    let db = err.as_db_error().unwrap_or_else(|| panic!("a PostgreSQL error, got {err}"));
    (db.code().code().to_owned(), db.message().to_owned())
}

fn assert_no_panics() {
    assert_eq!(common::WORKER_PANICS.load(std::sync::atomic::Ordering::SeqCst), 0, "a pgleader task panicked");
}

fn acked_by(run: &Run, port: u16) -> impl Iterator<Item = &Attempt> {
    run.acked().filter(move |a| a.node_port == Some(port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_state_observe_mode_and_bad_surroundings() {
    let _serial = SERIAL.lock().await;
    let cluster = PatroniCluster::start(Replication::Async).await;
    workload::prepare(&cluster.leader_app_client().await).await.expect("workload table");
    let (p0, p1) = (cluster.node("node0").pg_port, cluster.node("node1").pg_port);

    // The member the key names takes the sessions.
    let good = pgleader(&cluster, &fenced(&cluster), "", "10s").await;
    let s = wait_routed(good.admin_addr, Some("node0")).await;
    assert_eq!(s["etcd"]["leader_member"], "node0");
    assert_eq!(s["etcd"]["confirmation"]["member"], "node0");
    assert_eq!(s["etcd"]["mode"], "enforce");
    let client = connect_app(good.proxy_addr).await.expect("a session via the fenced pgleader");
    let port: i32 = client.query_one("SELECT inet_server_port()", &[]).await.unwrap().get(0);
    assert_eq!(port, i32::from(p0));
    assert_eq!(metric(good.admin_addr, "pgleader_etcd_up").await, Some(1.0));
    assert_eq!(metric(good.admin_addr, "pgleader_etcd_leader{member=\"node0\"}").await, Some(1.0));

    // A reload of [health] (a new timeout here; a password rotation is the same) restarts the etcd
    // reader at the new pace and keeps its view: the session on the leader is not cut for the
    // lease, and the leader never changes. (Before, the view started over, and in enforce mode
    // the first table after the reload had no confirmation: every session was cut at once.)
    let before = status(good.admin_addr).await;
    let reads = before["etcd"]["reads_ok"].as_u64().unwrap();
    let mut config = pgleader::Config::from_toml(
        &format!(
            "[proxy]\nlisten = \"{}\"\nleader_wait_timeout = \"10s\"\n[admin]\nlisten = \"{}\"\n{}\n{}",
            good.proxy_addr,
            good.admin_addr,
            fenced(&cluster),
            cluster.pgleader_toml()
        ),
        "<reload>",
    )
    .expect("reload config");
    config.health.timeout += Duration::from_millis(100);
    let diff = good.reload(config).await.expect("reload of [health]");
    assert!(diff.hot.contains(&"health"), "{diff:?}");
    let after = wait_status(good.admin_addr, "two etcd reads after the reload", |s| {
        s["etcd"]["reads_ok"].as_u64().is_some_and(|n| n >= reads + 2)
    })
    .await;
    assert_eq!((after["leader"].as_str(), &after["epoch"]), (Some("node0"), &before["epoch"]), "{after:#}");
    let port: i32 = client.query_one("SELECT inet_server_port()", &[]).await.expect("not cut by the reload").get(0);
    assert_eq!(port, i32::from(p0));
    assert_eq!(metric(good.admin_addr, "pgleader_sessions_cut_total{reason=\"lease\"}").await, Some(0.0));

    // A backend whose member does not hold the key is never the leader, whatever SQL says.
    let swapped = format!(
        "[[backend]]\nname = \"node0\"\naddress = \"127.0.0.1:{p0}\"\nmember = \"node1\"\nverify_conn_url = false\n\
         [[backend]]\nname = \"node1\"\naddress = \"127.0.0.1:{p1}\"\nmember = \"node0\"\nverify_conn_url = false\n"
    );
    let wrong = pgleader(&cluster, &fenced(&cluster), &swapped, "1s").await;
    let s = wait_status(wrong.admin_addr, "a fenced verdict", |s| s["reason"] == "lease_not_confirmed").await;
    assert_eq!(s["leader"], serde_json::Value::Null);
    assert_eq!(s["backends"][0]["role"], "primary", "SQL says primary");
    let (code, message) = refused(wrong.proxy_addr).await;
    assert_eq!(code, "57P03");
    assert!(message.contains("not confirmed by etcd"), "{message}");
    metric_at_least(wrong.admin_addr, "pgleader_sessions_total{result=\"no_lease\"}", 1.0).await;

    // observe: route as SQL alone, report what enforcing would do.
    let observe = etcd_section(&cluster.etcd_endpoints(), &cluster.scope, "mode = \"observe\"\n");
    let watching = pgleader(&cluster, &observe, &swapped, "10s").await;
    let s = wait_routed(watching.admin_addr, Some("node0")).await;
    let s = if s["etcd"]["enforced_reason"] == "lease_not_confirmed" {
        s
    } else {
        wait_status(watching.admin_addr, "observe verdict", |s| s["etcd"]["enforced_reason"] == "lease_not_confirmed")
            .await
    };
    assert_eq!(s["etcd"]["mode"], "observe");
    assert_eq!(s["etcd"]["enforced_leader"], serde_json::Value::Null);
    let c = connect_app(watching.proxy_addr).await.expect("observe mode routes");
    c.simple_query("SELECT 1").await.unwrap();
    // A reload to enforce (SIGHUP does the same from the file) applies at once: that session is
    // cut for the lease, and no leader remains.
    let enforce = etcd_section(&cluster.etcd_endpoints(), &cluster.scope, "mode = \"enforce\"\n");
    let mut config = pgleader::Config::from_toml(
        &format!(
            "[proxy]\nlisten = \"{}\"\n[admin]\nlisten = \"{}\"\n{enforce}\n{}",
            watching.proxy_addr,
            watching.admin_addr,
            cluster.pgleader_toml().split("\n[[backend]]").next().unwrap_or_default().to_owned() + "\n" + &swapped
        ),
        "<reload>",
    )
    .expect("reload config");
    config.proxy.leader_wait_timeout = Duration::from_secs(10);
    let diff = watching.reload(config).await.expect("reload to enforce");
    assert!(diff.hot.contains(&"etcd"), "{diff:?}");
    let s = wait_routed(watching.admin_addr, None).await;
    assert_eq!((s["etcd"]["mode"].as_str(), s["reason"].as_str()), (Some("enforce"), Some("lease_not_confirmed")));
    assert!(s["etcd"]["reads_ok"].as_u64() > Some(0), "a change of mode keeps the etcd view");
    eventually(PATIENCE, "the observed session cut on reload", || async { c.is_closed().then_some(()) }).await;

    // Bad surroundings: each fails closed with a reason in /status and in the client's error.
    let nowhere = vec![format!("http://127.0.0.1:{}", common::free_port())];
    let cases = [
        ("unreachable endpoints", etcd_section(&nowhere, &cluster.scope, ""), String::new(), "etcd_unreachable"),
        (
            "a wrong scope",
            etcd_section(&cluster.etcd_endpoints(), "no-such-cluster", ""),
            String::new(),
            "member_not_verified",
        ),
        (
            "a member Patroni does not know",
            fenced(&cluster),
            format!(
                "[[backend]]\nname = \"node0\"\naddress = \"127.0.0.1:{p0}\"\nmember = \"ghost\"\n\
                 [[backend]]\nname = \"node1\"\naddress = \"127.0.0.1:{p1}\"\n"
            ),
            "member_not_verified",
        ),
        (
            "a conn_url that does not match",
            fenced(&cluster),
            format!(
                "[[backend]]\nname = \"node0\"\naddress = \"localhost:{p0}\"\n\
                 [[backend]]\nname = \"node1\"\naddress = \"127.0.0.1:{p1}\"\n"
            ),
            "member_not_verified",
        ),
    ];
    for (what, etcd, backends, reason) in cases {
        let p = pgleader(&cluster, &etcd, &backends, "1s").await;
        let detail = |s: &serde_json::Value| match reason {
            "etcd_unreachable" => s["etcd"]["last_error"].as_str().unwrap_or_default().to_owned(),
            _ => s["backends"][0]["member_problem"].as_str().unwrap_or_default().to_owned(),
        };
        // /status says why, once the first read has been tried.
        let s = wait_status(p.admin_addr, what, |s| {
            s["reason"] == reason && s["backends"][0]["role"] == "primary" && !detail(s).is_empty()
        })
        .await;
        eprintln!("{what}: reason {reason}: {}", detail(&s));
        let (code, message) = refused(p.proxy_addr).await;
        assert_eq!(code, "57P03", "{what}");
        assert!(message.contains(s["reason_text"].as_str().unwrap()), "{what}: {message}");
        p.shutdown().await.unwrap();
    }
    assert_no_panics();
    for p in [good, wrong, watching] {
        p.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_patroni_died_is_fenced_off_when_the_key_moves_while_sql_alone_keeps_writing() {
    let _serial = SERIAL.lock().await;
    let mut cluster = PatroniCluster::start(Replication::Async).await;
    workload::prepare(&cluster.leader_app_client().await).await.expect("workload table");
    let p0 = cluster.node("node0").pg_port;
    // What node0's pgleaders see in a partition: node0 alone. One fenced, one SQL-only.
    let only_node0 = format!("[[backend]]\nname = \"node0\"\naddress = \"127.0.0.1:{p0}\"\n");
    let fenced_proxy = pgleader(&cluster, &fenced(&cluster), &only_node0, "10s").await;
    let sql_proxy = pgleader(&cluster, "", &only_node0, "10s").await;
    wait_routed(fenced_proxy.admin_addr, Some("node0")).await;
    wait_routed(sql_proxy.admin_addr, Some("node0")).await;
    let (fw, sw) = (workload_via(&fenced_proxy, 1), workload_via(&sql_proxy, 10_000_000));
    fw.wait_ok_since(Writer::NewConn, 0.0, 20, PATIENCE).await;
    sw.wait_ok_since(Writer::NewConn, 0.0, 20, PATIENCE).await;

    let killed = fw.mark("patroni of node0 killed");
    sw.mark("patroni of node0 killed");
    cluster.kill_patroni("node0");
    // The moment the key names another member: observed by quorum reads every 50 ms.
    eventually(Duration::from_secs(120), "node1 holds the leader key", || async {
        (cluster.leader_key().await.as_deref() == Some("node1")).then_some(())
    })
    .await;
    let moved = fw.mark("node1 holds the key");
    sw.mark("node1 holds the key");
    cluster.wait_leader("node1").await;
    // Keep both workloads running a while after the new leader took over.
    sw.wait_ok_since(Writer::NewConn, moved, 20, PATIENCE).await;
    let s = wait_routed(fenced_proxy.admin_addr, None).await;
    let (frun, srun) = (fw.stop().await, sw.stop().await);

    let fenced_after: Vec<&Attempt> = acked_by(&frun, p0).filter(|a| a.end_ms > moved).collect();
    let sql_after = acked_by(&srun, p0).filter(|a| a.end_ms > moved).count();
    let last_fenced = acked_by(&frun, p0).map(|a| a.end_ms).fold(0.0, f64::max);
    eprintln!(
        "Patroni killed at {:.1} s; node1 held the key {:.1} s later; the fenced pgleader's last write on node0 \
         {:.1} s after the kill; the SQL-only pgleader acknowledged {sql_after} writes on node0 after the key moved \
         (baseline); fenced status: {} ({})",
        killed / 1000.0,
        (moved - killed) / 1000.0,
        (last_fenced - killed) / 1000.0,
        s["reason"],
        s["reason_text"]
    );
    assert!(fenced_after.is_empty(), "writes acknowledged by the old primary after the key moved: {fenced_after:#?}");
    assert!(sql_after > 0, "the baseline: SQL alone keeps writing to the old primary");
    assert!(
        metric(fenced_proxy.admin_addr, "pgleader_sessions_cut_total{reason=\"lease\"}").await >= Some(1.0),
        "the long-lived session on node0 was cut for the lease"
    );
    assert_no_panics();
    fenced_proxy.shutdown().await.unwrap();
    sql_proxy.shutdown().await.unwrap();
}

/// When the fenced pgleader's last confirmation ends, in workload time: `/status` gives what is
/// left of it when pgleader answers, some instant between the request sent and the answer read.
#[derive(Debug, Clone, Copy)]
struct ValidUntil {
    earliest: f64,
    latest: f64,
}

/// Stops etcd members 1 and 2 (quorum lost) and returns the fenced pgleader's `valid_until`.
async fn lose_quorum(cluster: &mut PatroniCluster, admin: SocketAddr, w: &Workload) -> ValidUntil {
    w.mark("etcd quorum lost");
    cluster.stop_etcd(1).await;
    cluster.stop_etcd(2).await;
    eventually(PATIENCE, "etcd unreachable", || async {
        let sent = w.now_ms();
        let s = status(admin).await;
        let read = w.now_ms();
        let valid_for = s["etcd"]["confirmation"]["valid_for_ms"].as_i64().unwrap_or(0) as f64;
        (s["etcd"]["reachable"] == false).then_some(ValidUntil { earliest: sent + valid_for, latest: read + valid_for })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_lost_new_sessions_held_then_refused_and_open_sessions_cut_at_valid_until() {
    let _serial = SERIAL.lock().await;
    let mut cluster = PatroniCluster::start(Replication::Async).await;
    workload::prepare(&cluster.leader_app_client().await).await.expect("workload table");
    let proxy = pgleader(&cluster, &fenced(&cluster), "", "3s").await;
    wait_routed(proxy.admin_addr, Some("node0")).await;
    let w = workload_via(&proxy, 1);
    w.wait_ok_since(Writer::LongLived, 0.0, 10, PATIENCE).await;
    let lost_at = w.now_ms();
    let valid_until = lose_quorum(&mut cluster, proxy.admin_addr, &w).await;
    let s = wait_routed(proxy.admin_addr, None).await;
    assert_eq!(s["reason"], "etcd_unreachable", "{s:#}");
    // Held clients get their 57P03 after leader_wait_timeout.
    eventually(PATIENCE, "held clients refused", || async {
        (w.count_since(Writer::NewConn, Outcome::CannotConnectNow, valid_until.earliest) >= 3).then_some(())
    })
    .await;
    let run = w.stop().await;

    let acked_after: Vec<&Attempt> = run.acked().filter(|a| a.end_ms > valid_until.latest + 50.0).collect();
    let last_ack = run.acked().map(|a| a.end_ms).fold(0.0, f64::max);
    let long_lived_broken = run
        .of(Writer::LongLived)
        .filter(|a| a.outcome != Outcome::Ok && a.end_ms >= valid_until.earliest - 50.0)
        .map(|a| a.end_ms)
        .fold(f64::INFINITY, f64::min);
    let first_refusal = run
        .of(Writer::NewConn)
        .filter(|a| a.outcome == Outcome::CannotConnectNow)
        .map(|a| a.end_ms)
        .fold(f64::INFINITY, f64::min);
    eprintln!(
        "quorum lost at {:.2} s; valid_until {:.2} s; last acknowledged write {:.2} s; open session cut {:.2} s; \
         first held client refused {:.2} s",
        lost_at / 1000.0,
        valid_until.latest / 1000.0,
        last_ack / 1000.0,
        long_lived_broken / 1000.0,
        first_refusal / 1000.0
    );
    // 50 ms: the two clocks read one after the other (a sampling error, not a timing target).
    assert!(acked_after.is_empty(), "writes acknowledged after valid_until: {acked_after:#?}");
    assert!(last_ack <= long_lived_broken && long_lived_broken <= first_refusal, "order: last write, cut, refusal");
    let refused: Vec<&Attempt> = run.of(Writer::NewConn).filter(|a| a.outcome == Outcome::CannotConnectNow).collect();
    assert!(refused.iter().all(|a| a.sqlstate.as_deref() == Some("57P03")));
    assert!(metric(proxy.admin_addr, "pgleader_sessions_cut_total{reason=\"lease\"}").await >= Some(1.0));
    assert!(metric(proxy.admin_addr, "pgleader_sessions_total{result=\"no_lease\"}").await >= Some(1.0));
    assert_eq!(metric(proxy.admin_addr, "pgleader_etcd_up").await, Some(0.0));
    assert_no_panics();
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_lost_under_patronis_failsafe_keeps_serving_while_every_backend_is_healthy() {
    let _serial = SERIAL.lock().await;
    let mut cluster = PatroniCluster::start(Replication::Async).await;
    workload::prepare(&cluster.leader_app_client().await).await.expect("workload table");
    cluster.patch_config(serde_json::json!({ "failsafe_mode": true })).await;
    let proxy = pgleader(&cluster, &fenced(&cluster), "", "3s").await;
    wait_status(proxy.admin_addr, "the fail-safe setting read", |s| {
        s["leader"] == "node0" && s["etcd"]["patroni_failsafe_mode"] == true
    })
    .await;
    let w = workload_via(&proxy, 1);
    w.wait_ok_since(Writer::NewConn, 0.0, 10, PATIENCE).await;
    let valid_until = lose_quorum(&mut cluster, proxy.admin_addr, &w).await;
    let s = wait_status(proxy.admin_addr, "the fail-safe fallback", |s| s["etcd"]["failsafe_fallback"] == true).await;
    assert_eq!((s["leader"].as_str(), s["reason"].as_str()), (Some("node0"), Some("failsafe_fallback")));
    assert_eq!(metric(proxy.admin_addr, "pgleader_etcd_failsafe_fallback").await, Some(1.0));
    w.wait_ok_since(Writer::NewConn, valid_until.latest + 2000.0, 20, PATIENCE).await;
    w.wait_ok_since(Writer::LongLived, valid_until.latest + 2000.0, 10, PATIENCE).await;
    let serving = w.mark("served past valid_until under fail-safe");

    // One backend stops answering SQL (its Patroni still answers Patroni's fail-safe probe): pgleader
    // can no longer tell it is not on a minority side, and fails closed.
    cluster.freeze_postgres("node1");
    let frozen = w.mark("node1's PostgreSQL frozen");
    let s = wait_routed(proxy.admin_addr, None).await;
    // Patroni may also demote node0 now (if node1's Patroni cannot answer its fail-safe probe
    // without PostgreSQL); either way pgleader no longer falls back.
    eprintln!("after node1 froze: {} ({}), node0 {}", s["reason"], s["reason_text"], s["backends"][0]["role"]);
    assert_eq!(s["etcd"]["failsafe_fallback"], false);
    let closed = w.mark("pgleader fails closed");
    tokio::time::sleep(Duration::from_secs(2)).await; // let the workload record what follows
    let thawed = w.mark("node1 thawed");
    cluster.thaw("node1");
    let run = w.stop().await;
    let acked_late: Vec<&Attempt> = run.acked().filter(|a| a.start_ms > closed + 100.0 && a.end_ms < thawed).collect();
    eprintln!(
        "fail-safe: valid_until {:.1} s, still serving at {:.1} s; node1 frozen at {:.1} s, no leader at {:.1} s",
        valid_until.latest / 1000.0,
        serving / 1000.0,
        frozen / 1000.0,
        closed / 1000.0
    );
    assert!(acked_late.is_empty(), "writes admitted after pgleader failed closed: {acked_late:#?}");
    assert!(metric(proxy.admin_addr, "pgleader_sessions_cut_total{reason=\"lease\"}").await >= Some(1.0));
    assert_no_panics();
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_etcd_restart_and_an_etcd_election_go_unnoticed_and_a_switchover_refuses_no_client_fenced_or_not() {
    let _serial = SERIAL.lock().await;
    let mut cluster = PatroniCluster::start(Replication::Async).await;
    workload::prepare(&cluster.leader_app_client().await).await.expect("workload table");
    // An etcd leader election must fit, with the time since the last read, in max_staleness:
    // election timeout 1 s, then the next read. At a load average of about 20 reads failed for
    // 1.7 s and the default 3 s lapsed 0.2 s before a read succeeded again, cutting the session. This test is about churn being absorbed, so it gives it the 5 s the runbook
    // recommends for riding out an election ("Sizing [etcd] timeout and max_staleness").
    let section = etcd_section(&cluster.etcd_endpoints(), &cluster.scope, "max_staleness = \"5s\"\n");
    let fenced_proxy = pgleader(&cluster, &section, "", "10s").await;
    let sql_proxy = pgleader(&cluster, "", "", "10s").await;
    wait_routed(fenced_proxy.admin_addr, Some("node0")).await;
    wait_routed(sql_proxy.admin_addr, Some("node0")).await;
    let w = workload_via(&fenced_proxy, 1);
    w.wait_ok_since(Writer::LongLived, 0.0, 10, PATIENCE).await;
    let postmaster = cluster.node("node0").postmaster_pid();
    assert!(postmaster.is_some(), "node0's PostgreSQL runs");

    // One member at a time, SIGTERM (a leader hands over), back before the next.
    let reads = |s: &serde_json::Value| s["etcd"]["reads_ok"].as_u64().unwrap_or(0);
    for i in 0..3 {
        let before = reads(&status(fenced_proxy.admin_addr).await);
        let at = w.mark(&format!("etcd e{i} restart"));
        cluster.stop_etcd(i).await;
        // A few reads while the member is down, then a few after it is back.
        wait_status(fenced_proxy.admin_addr, "reads with a member down", |s| reads(s) >= before + 3).await;
        cluster.restart_etcd(i).await;
        let back = reads(&status(fenced_proxy.admin_addr).await);
        wait_status(fenced_proxy.admin_addr, "reads after the restart", |s| reads(s) >= back + 2).await;
        w.wait_ok_since(Writer::NewConn, at, 10, PATIENCE).await;
    }
    // One etcd leader election at etcd's default timings (the harness's are the defaults):
    // SIGKILL the raft leader, so the others elect one after an election timeout.
    let leader = eventually(PATIENCE, "etcd has a leader", || cluster.etcd_leader()).await;
    let killed = w.mark(&format!("etcd leader e{leader} killed"));
    cluster.kill_etcd(leader);
    let after_kill = reads(&status(fenced_proxy.admin_addr).await);
    wait_status(fenced_proxy.admin_addr, "reads after the election", |s| reads(s) >= after_kill + 3).await;
    w.wait_ok_since(Writer::NewConn, killed, 20, PATIENCE).await;
    cluster.restart_etcd(leader).await;
    w.wait_ok_since(Writer::LongLived, w.now_ms(), 10, PATIENCE).await;
    let rolled = w.stop().await;
    let failures: Vec<&Attempt> = rolled.attempts.iter().filter(|a| a.outcome != Outcome::Ok).collect();
    // Patroni itself may restart its primary during the churn: once in CI a leader-key update
    // that failed against the member being stopped made it demote node0 at once (restarted as a
    // replica 70 ms after e2's SIGTERM, then promoted itself again). No proxy can keep the
    // sessions PostgreSQL's own shutdown ends, so then the step is held to the switchover rule
    // (only the live attempt of each writer broken, by the shutdown), and pgleader must still cut
    // nothing for the lease. The oracle is PostgreSQL's own: node0's postmaster changed.
    if cluster.node("node0").postmaster_pid() == postmaster {
        assert!(failures.is_empty(), "client errors during the rolling etcd restart or the election: {failures:#?}");
        assert_eq!(metric(fenced_proxy.admin_addr, "pgleader_sessions_total{result=\"cut\"}").await, Some(0.0));
    } else {
        eprintln!("Patroni restarted node0's PostgreSQL during the etcd churn: held to the switchover rule");
        for writer in [Writer::NewConn, Writer::LongLived] {
            if let Err(e) = rolled.only_the_shutdown_broke(writer) {
                panic!("while Patroni restarted node0 during the etcd churn: {e}");
            }
        }
        let lease_cuts = metric(fenced_proxy.admin_addr, "pgleader_sessions_cut_total{reason=\"lease\"}").await;
        assert_eq!(lease_cuts, Some(0.0), "a session cut for the lease during the etcd churn");
    }
    assert!(rolled.acked().all(|a| a.in_recovery != Some(true)), "a write reached a replica during the churn");
    let s = status(fenced_proxy.admin_addr).await;
    eprintln!(
        "rolling restart and a leader election: {} reads ok, {} failed; no client error, no session cut",
        s["etcd"]["reads_ok"], s["etcd"]["reads_failed"]
    );

    // A switchover, both pgleaders side by side.
    let (fw, sw) = (workload_via(&fenced_proxy, 1_000_000), workload_via(&sql_proxy, 2_000_000));
    fw.wait_ok_since(Writer::NewConn, 0.0, 20, PATIENCE).await;
    sw.wait_ok_since(Writer::NewConn, 0.0, 20, PATIENCE).await;
    let start = fw.mark("switchover");
    sw.mark("switchover");
    cluster.switchover("node1").await;
    cluster.wait_leader("node1").await;
    wait_routed(fenced_proxy.admin_addr, Some("node1")).await;
    wait_routed(sql_proxy.admin_addr, Some("node1")).await;
    let after = fw.now_ms();
    fw.wait_ok_since(Writer::NewConn, after, 20, PATIENCE).await;
    sw.wait_ok_since(Writer::NewConn, after, 20, PATIENCE).await;
    let (frun, srun) = (fw.stop().await, sw.stop().await);
    // Clients that arrive while the old primary stops are held and released to node1: none is
    // refused, answered 57P03 or timed out, in any phase. The one attempt live at the instant the
    // fast shutdown terminates its backend (authenticating, or running its statements) breaks,
    // fenced or not: the same rule as failover_patroni.rs's switchover, and docs/failover.md's
    // "The one broken session of a switchover". Attempts are sequential: at most one per writer.
    for (name, run) in [("fenced", &frun), ("sql-only", &srun)] {
        let gap = write_gap(run, start);
        eprintln!("switchover, {name}: longest gap between acknowledged new-connection writes {gap:.2} s");
        for writer in [Writer::NewConn, Writer::LongLived] {
            if let Err(e) = run.only_the_shutdown_broke(writer) {
                panic!("{name} {e}");
            }
        }
        assert!(run.acked().all(|a| a.in_recovery != Some(true)), "{name}: a write reached a replica");
    }
    assert_no_panics();
    fenced_proxy.shutdown().await.unwrap();
    sql_proxy.shutdown().await.unwrap();
}

/// The longest gap (seconds) between consecutive acknowledged new-connection writes after `since`.
fn write_gap(run: &Run, since: f64) -> f64 {
    let mut ends: Vec<f64> = run.of(Writer::NewConn).filter(|a| a.outcome == Outcome::Ok).map(|a| a.end_ms).collect();
    ends.sort_by(f64::total_cmp);
    ends.windows(2).filter(|w| w[1] > since).map(|w| w[1] - w[0]).fold(0.0, f64::max) / 1000.0
}
