//! The etcd reader against a real 3-member etcd 3.4 (tests/common/etcd.rs: heartbeat 100 ms,
//! election timeout 1000 ms), with keys written by etcdctl the way Patroni writes them: the
//! leader key and each member key on a lease, `config` as JSON without one.
//!
//! Most tests set the read interval to an hour, so every read after the first one is one that a
//! watch event (or a watch's end) asked for: the order of reports is then fully determined and
//! asserted as a sequence. The tests run one at a time (`SERIAL`): they restart etcd members
//! with 1 s election timeouts, and two clusters competing for 2 cores would make spurious
//! elections. Durations are printed (stderr), never asserted.

#![allow(clippy::unwrap_used, reason = "in tests a panic is the failure report")]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::etcd::EtcdCluster;
use common::eventually;
use pgleader::config::Secret;
use pgleader::topology::{BackendId, RoutingTable};
use pgleader::{EtcdRead, EtcdReport, EtcdSettings, EtcdWatcher, WatchEvent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::block_in_place;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const LEADER: &str = "/service/vm/leader";
/// How long any one report may take to come (a bound on waiting, not an assertion).
const PATIENCE: Duration = Duration::from_secs(30);
const HOUR: Duration = Duration::from_secs(3600);

fn settings(endpoints: Vec<String>) -> EtcdSettings {
    EtcdSettings {
        endpoints,
        namespace: "/service/".into(),
        scope: "vm".into(),
        timeout: Duration::from_millis(500),
        interval: HOUR,
        fast_interval: HOUR,
        username: None,
        password: None,
        ca_file: None,
        cert_file: None,
        key_file: None,
    }
}

/// Writes a scope as Patroni 4 does: `config`, two members (each on its node's lease), the
/// leader key on node0's lease, and keys pgleader does not read. Returns node0's lease.
fn write_scope(c: &EtcdCluster) -> i64 {
    c.put(
        "/service/vm/config",
        r#"{"ttl":20,"loop_wait":1,"retry_timeout":5,"failsafe_mode":true,"postgresql":{"use_pg_rewind":true}}"#,
    );
    let (lease0, lease1) = (c.grant_lease(20), c.grant_lease(20));
    c.put_with_lease(
        "/service/vm/members/node0",
        r#"{"conn_url":"postgres://127.0.0.1:5432/postgres","api_url":"http://127.0.0.1:8008/patroni","state":"running","role":"primary","version":"4.1.5","xlog_location":50331648,"timeline":2}"#,
        lease0,
    );
    c.put_with_lease(
        "/service/vm/members/node1",
        r#"{"conn_url":"postgres://127.0.0.1:5433/postgres","state":"streaming","role":"replica","timeline":2}"#,
        lease1,
    );
    c.put_with_lease(LEADER, "node0", lease0);
    c.put("/service/vm/status", r#"{"optime":50331648,"slots":{}}"#);
    c.put("/service/vm/history", r#"[[1,25165984,"no recovery target specified"]]"#);
    lease0
}

/// The task under test and every report it made, in order.
struct Task {
    rx: mpsc::Receiver<EtcdReport>,
    cancel: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
    /// The routing table the task paces itself by ("no leader" unless a test sets one).
    routing: watch::Sender<Arc<RoutingTable>>,
    started: Instant,
    seen: Vec<EtcdReport>,
}

impl Task {
    fn spawn(settings: EtcdSettings) -> Task {
        let (tx, rx) = mpsc::channel(64);
        let (routing_tx, routing) = watch::channel(Arc::new(RoutingTable::initial()));
        let cancel = CancellationToken::new();
        let handle = tokio::spawn(EtcdWatcher { settings, reports: tx, routing, cancel: cancel.clone() }.run());
        Task { rx, cancel, handle, routing: routing_tx, started: Instant::now(), seen: Vec::new() }
    }

    async fn next(&mut self) -> EtcdReport {
        let r = tokio::time::timeout(PATIENCE, self.rx.recv()).await;
        let r = r.unwrap_or_else(|_| panic!("no report within {PATIENCE:?}; so far: {:#?}", self.seen));
        let r = r.expect("the task ended");
        self.seen.push(r.clone());
        r
    }

    async fn read(&mut self) -> EtcdRead {
        match self.next().await {
            EtcdReport::Read(r) => r,
            other => panic!("expected a read, got {other:#?}; so far: {:#?}", self.seen),
        }
    }

    async fn failed_read(&mut self) -> String {
        match self.next().await {
            EtcdReport::ReadFailed { error, .. } => error,
            other => panic!("expected a failed read, got {other:#?}"),
        }
    }

    async fn watch_event(&mut self) -> WatchEvent {
        match self.next().await {
            EtcdReport::Watch(e) => e,
            other => panic!("expected a watch event, got {other:#?}; so far: {:#?}", self.seen),
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(PATIENCE, self.handle).await.expect("the task stops on cancel").expect("no panic");
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_sees_every_key_at_one_revision_with_the_lease_ttl() {
    let _serial = SERIAL.lock().await;
    let c = block_in_place(|| EtcdCluster::start(3));
    let lease = write_scope(&c);
    let revision = c.revision();
    let mut t = Task::spawn(settings(c.endpoints()));
    let read = t.read().await;
    let later_ttl = c.lease_ttl(lease).expect("the lease is alive");
    eprintln!("first read took {} (txn + LeaseTimeToLive) on {}", ms(read.duration), read.endpoint);

    // Nothing else wrote, so one revision for all keys is the cluster's revision.
    assert_eq!(read.revision, revision);
    assert_eq!(read.endpoint, c.endpoint(0));
    let leader = read.leader.expect("leader key");
    assert_eq!((leader.member.as_str(), leader.lease_id), ("node0", lease));
    assert_eq!(leader.mod_revision, revision - 2, "the leader key is the last write before status and history");
    // Taken before etcdctl's look and truncated: never above the grant, never below a later look.
    let remaining = leader.lease_remaining.expect("lease remaining").as_secs();
    assert!(remaining <= 20 && remaining >= later_ttl, "ours {remaining} s, etcdctl's later {later_ttl} s");
    let config = read.config.expect("config");
    assert_eq!(
        (config.ttl, config.loop_wait, config.retry_timeout, config.failsafe_mode, config.pause),
        (Some(20), Some(1), Some(5), true, false)
    );
    assert_eq!(read.config_error, None);
    let members: Vec<_> = read.members.iter().map(|m| (m.name.as_str(), m.conn_url.as_deref(), m.timeline)).collect();
    assert_eq!(
        members,
        [
            ("node0", Some("postgres://127.0.0.1:5432/postgres"), Some(2)),
            ("node1", Some("postgres://127.0.0.1:5433/postgres"), Some(2))
        ]
    );
    assert_eq!(read.members[0].role.as_deref(), Some("primary"));
    t.stop().await;

    // Steady state, for the record: 100 reads 10 ms apart on a kept-alive connection.
    let mut s = settings(c.endpoints());
    (s.interval, s.fast_interval) = (Duration::from_millis(10), Duration::from_millis(10));
    let mut t = Task::spawn(s);
    let mut durations = Vec::new();
    for _ in 0..100 {
        durations.push(t.read().await.duration);
    }
    durations.sort();
    eprintln!(
        "100 reads (txn + LeaseTimeToLive) on loopback: min {}, median {}, p99 {}, max {}",
        ms(durations[0]),
        ms(durations[50]),
        ms(durations[98]),
        ms(durations[99])
    );
    assert_eq!(t.seen.len(), 100);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_disappears_from_the_routing_table_brings_a_read_at_once() {
    let _serial = SERIAL.lock().await;
    let c = block_in_place(|| EtcdCluster::start(3));
    write_scope(&c);
    let mut t = Task::spawn(settings(c.endpoints()));
    t.read().await;
    // Published as the elector does: the epoch moves with every change of leader. Both
    // intervals are an hour, so each read below can only come from a leader going away.
    let mut epoch = 0;
    let mut publish = |t: &Task, leader| {
        epoch += 1;
        t.routing.send_replace(Arc::new(RoutingTable { leader, epoch, ..RoutingTable::initial() }));
    };
    publish(&t, Some(BackendId(0)));
    let gone = Instant::now();
    publish(&t, None);
    t.read().await;
    eprintln!("read {} after the leader disappeared", ms(gone.elapsed()));
    // A leader that comes and goes at once, both coalesced into one change of the channel.
    publish(&t, Some(BackendId(0)));
    publish(&t, None);
    t.read().await;
    assert_eq!(t.seen.len(), 3, "{:#?}", t.seen);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_and_a_change_of_the_leader_key_are_watch_events_that_trigger_reads() {
    let _serial = SERIAL.lock().await;
    let c = block_in_place(|| EtcdCluster::start(3));
    write_scope(&c);
    let mut t = Task::spawn(settings(c.endpoints()));
    let first = t.read().await;

    let at = Instant::now();
    c.delete(LEADER);
    let deleted_at = c.revision();
    assert_eq!(t.watch_event().await, WatchEvent::Delete { revision: deleted_at });
    eprintln!("delete seen by the watch {} after etcdctl started", ms(at.elapsed()));
    let after_delete = t.read().await;
    assert!(after_delete.revision >= deleted_at && after_delete.leader.is_none(), "{after_delete:#?}");

    let lease = c.grant_lease(20);
    c.put_with_lease(LEADER, "node1", lease);
    let put_at = c.revision();
    assert_eq!(t.watch_event().await, WatchEvent::Put { revision: put_at, member: "node1".into() });
    let after_put = t.read().await;
    let leader = after_put.leader.expect("leader key");
    assert_eq!((leader.member.as_str(), leader.lease_id, leader.mod_revision), ("node1", lease, put_at));
    assert!(first.revision < after_delete.revision && after_delete.revision < after_put.revision);
    // With an hour between reads, each read after the first was asked for by an event.
    assert_eq!(t.seen.len(), 5);
    t.stop().await;
}

/// A TCP relay to `target` that holds back its `hold`-th connection (0-based) until released.
struct Gate {
    addr: SocketAddr,
    arrived: Arc<AtomicUsize>,
    release: Arc<Notify>,
}

impl Gate {
    async fn start(target: SocketAddr, hold: usize) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let arrived = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(Notify::new());
        let (a, r) = (Arc::clone(&arrived), Arc::clone(&release));
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let n = a.fetch_add(1, Ordering::SeqCst);
                let r = Arc::clone(&r);
                tokio::spawn(async move {
                    if n == hold {
                        r.notified().await;
                    }
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Gate { addr, arrived, release }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_a_compacted_revision_ends_and_falls_back_to_a_read() {
    let _serial = SERIAL.lock().await;
    let c = block_in_place(|| EtcdCluster::start(3));
    write_scope(&c);
    // Connection 0 is the reader's (kept alive), connection 1 the first watch: held back until
    // the history it starts from is compacted away.
    let target: SocketAddr = format!("127.0.0.1:{}", c.client_port(0)).parse().unwrap();
    let gate = Gate::start(target, 1).await;
    let mut s = settings(vec![format!("http://{}", gate.addr)]);
    s.timeout = Duration::from_secs(10);
    let mut t = Task::spawn(s);
    let first = t.read().await;
    let arrived = Arc::clone(&gate.arrived);
    eventually(PATIENCE, "the watch connects", move || {
        let n = arrived.load(Ordering::SeqCst);
        async move { (n >= 2).then_some(()) }
    })
    .await;
    c.put(LEADER, "node1");
    for i in 0..3 {
        c.put("/service/vm/status", &format!(r#"{{"optime":{i}}}"#));
    }
    let compacted = c.compact();
    assert!(compacted > first.revision + 1);
    gate.release.notify_one();

    match t.watch_event().await {
        WatchEvent::Ended { reason } => assert!(reason.contains("compacted"), "{reason}"),
        other => panic!("expected the compacted watch to end, got {other:?}"),
    }
    let fallback = t.read().await;
    assert!(fallback.revision >= compacted, "{} < {compacted}", fallback.revision);
    assert_eq!(fallback.leader.expect("leader").member, "node1", "the read has what the lost watch missed");
    // The watch restarted from the fallback read's revision + 1: a delete is seen.
    c.delete(LEADER);
    assert_eq!(t.watch_event().await, WatchEvent::Delete { revision: c.revision() });
    assert!(t.read().await.leader.is_none());
    assert_eq!(gate.arrived.load(Ordering::SeqCst), 3, "reader, the compacted watch, the restarted watch");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_and_a_refusing_endpoint_are_skipped_within_the_budget() {
    let _serial = SERIAL.lock().await;
    let c = block_in_place(|| EtcdCluster::start(3));
    write_scope(&c);
    // Accepts TCP (the kernel's backlog) and never answers, like a frozen member.
    let frozen = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let refusing = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let frozen_url = format!("http://{}", frozen.local_addr().unwrap());
    let mut s = settings(vec![frozen_url, format!("http://{refusing}"), c.endpoint(0)]);
    s.timeout = Duration::from_millis(900);
    let mut t = Task::spawn(s);
    let first = t.read().await;
    eprintln!(
        "first read answered {} after the task started (frozen endpoint's share 300 ms, then refused); the read itself took {}",
        ms(t.started.elapsed()),
        ms(first.duration)
    );
    assert_eq!(first.endpoint, c.endpoint(0));
    assert_eq!(first.leader.expect("leader").member, "node0");

    // The endpoint that answered is remembered: the next read goes straight to it.
    let before = Instant::now();
    c.delete(LEADER);
    assert!(matches!(t.watch_event().await, WatchEvent::Delete { .. }));
    let second = t.read().await;
    eprintln!("second read answered {} after the delete started", ms(before.elapsed()));
    assert_eq!(second.endpoint, c.endpoint(0));
    assert_eq!(t.seen.len(), 3, "{:#?}", t.seen);
    t.stop().await;
    drop(frozen);
}

/// Opens a watch of `key` on `addr` through the gateway WITHOUT the require-leader header, and
/// reads up to its `created` message: the control for the require-leader test.
async fn plain_watch(addr: SocketAddr, key: &str) -> TcpStream {
    use base64::Engine as _;
    let key = base64::engine::general_purpose::STANDARD.encode(key);
    let body = format!(r#"{{"create_request":{{"key":"{key}"}}}}"#);
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST /v3/watch HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(r#""created":true"#) {
        let n = tokio::time::timeout(PATIENCE, s.read(&mut buf)).await.expect("watch answer").unwrap();
        assert!(n > 0, "the plain watch closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    s
}

/// Still open and silent: no bytes and no EOF waiting.
fn still_open(s: &TcpStream) -> bool {
    common::socket_now(s) == common::SocketNow::Silent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_of_three_members_stopped_reads_fail_and_the_watch_ends_with_no_leader() {
    let _serial = SERIAL.lock().await;
    let mut c = block_in_place(|| EtcdCluster::start(3));
    write_scope(&c);
    let mut s = settings(c.endpoints());
    (s.interval, s.fast_interval) = (Duration::from_millis(200), Duration::from_millis(200));
    let mut t = Task::spawn(s);
    let first = t.read().await;
    assert_eq!(first.endpoint, c.endpoint(0), "reads and the watch are on member 0");
    let control = plain_watch(format!("127.0.0.1:{}", c.client_port(0)).parse().unwrap(), LEADER).await;

    block_in_place(|| {
        c.stop(1);
        c.stop(2);
    });
    let quorum_lost = Instant::now();
    // The watch ends, and every read from then on fails. On the way the watch may end more than
    // once: stopping member 1 can take the raft leader with it, member 0 has no leader until it
    // and member 2 elect one, a read then succeeds and the watch is opened again, and only the
    // stop of member 2 loses quorum. So: the last end after the last successful read, and three
    // failed reads after that read.
    let mut ended: Option<(String, Duration)> = None;
    let mut errors = Vec::new();
    while ended.is_none() || errors.len() < 3 {
        assert!(quorum_lost.elapsed() < PATIENCE, "reads did not keep failing after quorum was lost: {:#?}", t.seen);
        match t.next().await {
            EtcdReport::Watch(WatchEvent::Ended { reason }) => ended = Some((reason, quorum_lost.elapsed())),
            EtcdReport::Watch(other) => panic!("unexpected watch event {other:?}"),
            EtcdReport::Read(_) => (ended, errors) = (None, Vec::new()),
            EtcdReport::ReadFailed { error, .. } => errors.push(error),
        }
    }
    let (reason, after) = ended.expect("the loop ends only with the watch ended");
    eprintln!("watch ended {} after quorum was lost: {reason}", ms(after));
    assert!(reason.contains("no leader") && reason.contains(&c.endpoint(0)), "{reason}");
    assert!(still_open(&control), "the same watch without the require-leader header is still open");
    // Member 0 itself says why the reads fail.
    eprintln!("a failed read: {}", errors[0]);
    assert!(errors.iter().any(|e| e.contains(&format!("{}: etcdserver: no leader", c.endpoint(0)))), "{errors:#?}");
    assert!(errors.iter().all(|e| e.contains(&format!("{}: cannot connect", c.endpoint(1)))), "{errors:#?}");
    assert!(still_open(&control));
    let reads_before_loss = t.seen.iter().filter(|r| matches!(r, EtcdReport::Read(_))).count();
    eprintln!("{reads_before_loss} successful reads before the watch ended");

    // Quorum back: reads succeed again and the watch is back.
    block_in_place(|| c.restart(1));
    loop {
        if let EtcdReport::Read(_) = t.next().await {
            break;
        }
    }
    c.put(LEADER, "node1");
    loop {
        match t.next().await {
            EtcdReport::Watch(WatchEvent::Put { member, .. }) => break assert_eq!(member, "node1"),
            EtcdReport::Watch(other) => panic!("unexpected watch event {other:?}"),
            _ => {}
        }
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_sigterm_restart_of_every_member_keeps_reads_succeeding() {
    let _serial = SERIAL.lock().await;
    let c = block_in_place(|| EtcdCluster::start(3));
    write_scope(&c);
    let mut s = settings(c.endpoints());
    (s.interval, s.fast_interval) = (Duration::from_millis(100), Duration::from_millis(100));
    let mut t = Task::spawn(s);
    t.read().await;
    let rolling = tokio::task::spawn_blocking(move || {
        let mut c = c;
        // Pacing only (nothing is asserted on it): reads run while each member is down.
        for i in 0..3 {
            c.stop(i);
            std::thread::sleep(Duration::from_millis(300));
            c.restart(i);
        }
        c
    });
    tokio::pin!(rolling);
    let c = loop {
        tokio::select! {
            done = &mut rolling => break done.expect("rolling restart"),
            _ = t.next() => {}
        }
    };
    // A few reads after the last restart, to see the cluster settle with every member back.
    for _ in 0..5 {
        t.next().await;
    }
    let reads: Vec<&EtcdRead> =
        t.seen.iter().filter_map(|r| if let EtcdReport::Read(r) = r { Some(r) } else { None }).collect();
    let failures: Vec<&String> = t
        .seen
        .iter()
        .filter_map(|r| if let EtcdReport::ReadFailed { error, .. } = r { Some(error) } else { None })
        .collect();
    let ended: Vec<&String> = t
        .seen
        .iter()
        .filter_map(|r| if let EtcdReport::Watch(WatchEvent::Ended { reason }) = r { Some(reason) } else { None })
        .collect();
    let mut per_endpoint = std::collections::BTreeMap::new();
    for r in &reads {
        *per_endpoint.entry(r.endpoint.as_str()).or_insert(0) += 1;
    }
    let slowest = reads.iter().map(|r| r.duration).max().unwrap_or_default();
    eprintln!(
        "rolling restart: {} reads ({per_endpoint:?}), {} failed, {} watch ends {ended:#?}; slowest read {}",
        reads.len(),
        failures.len(),
        ended.len(),
        ms(slowest)
    );
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(reads.len() >= 10, "reads kept coming: {}", reads.len());
    assert!(reads.windows(2).all(|w| w[0].revision <= w[1].revision), "linearizable reads never go back");
    assert!(reads.iter().all(|r| r.leader.as_ref().is_some_and(|l| l.member == "node0")));
    assert!(per_endpoint.len() >= 2, "reads moved off a stopped member: {per_endpoint:?}");
    t.stop().await;
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_with_a_read_only_user_and_a_stale_token_renewed() {
    let _serial = SERIAL.lock().await;
    let mut c = block_in_place(|| EtcdCluster::start(3));
    write_scope(&c);
    c.enable_auth("pgleader", "pgleader-etcd-pw", "/service/vm/", "root-etcd-pw");

    let mut s = settings(c.endpoints());
    s.username = Some("pgleader".into());
    s.password = Some(Secret::new("pgleader-etcd-pw"));
    let mut t = Task::spawn(s.clone());
    let first = t.read().await;
    assert_eq!(first.leader.expect("leader").member, "node0");
    assert_eq!(first.members.len(), 2);

    // Any change to users or roles makes every token stale ("revision of auth store is old").
    c.ctl(&["role", "grant-permission", "pgleader-read", "read", "/unrelated"]);
    c.put(LEADER, "node1");
    assert!(matches!(t.watch_event().await, WatchEvent::Put { ref member, .. } if member == "node1"));
    let renewed = t.read().await;
    assert_eq!(renewed.leader.expect("leader").member, "node1", "authenticated again and read");
    t.stop().await;

    let mut wrong = s.clone();
    wrong.password = Some(Secret::new("Wr0ngPassw0rd-xyz"));
    (wrong.interval, wrong.fast_interval) = (Duration::from_millis(100), Duration::from_millis(100));
    let mut t = Task::spawn(wrong);
    let error = t.failed_read().await;
    eprintln!("wrong password: {error}");
    assert!(error.contains("authentication failed") && !error.contains("Wr0ngPassw0rd"), "{error}");
    // The next reads, 100 ms apart, reuse the refusal instead of asking etcd (a bcrypt) again.
    for _ in 0..2 {
        let again = t.failed_read().await;
        assert!(again.contains("authentication failed") && again.contains("not asked again"), "{again}");
    }
    t.stop().await;

    let mut anonymous = s;
    (anonymous.username, anonymous.password) = (None, None);
    let mut t = Task::spawn(anonymous);
    let error = t.failed_read().await;
    assert!(error.contains("set username and password"), "{error}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_self_signed_ca_and_a_client_certificate() {
    let _serial = SERIAL.lock().await;
    let c = block_in_place(|| EtcdCluster::start_tls(3));
    write_scope(&c);
    let files = c.tls().expect("tls").clone();
    let mut s = settings(c.endpoints());
    s.ca_file = Some(files.ca.clone());
    s.cert_file = Some(files.client_cert.clone());
    s.key_file = Some(files.client_key.clone());
    assert!(s.endpoints[0].starts_with("https://"));
    let mut t = Task::spawn(s.clone());
    let first = t.read().await;
    eprintln!("first read over TLS took {}", ms(first.duration));
    assert_eq!(
        (first.endpoint.as_str(), first.leader.expect("leader").member.as_str()),
        (s.endpoints[0].as_str(), "node0")
    );
    c.delete(LEADER);
    assert!(matches!(t.watch_event().await, WatchEvent::Delete { .. }), "the watch runs over TLS too");
    assert!(t.read().await.leader.is_none());
    t.stop().await;

    let mut no_cert = s.clone();
    (no_cert.cert_file, no_cert.key_file) = (None, None);
    let mut t = Task::spawn(no_cert);
    let error = t.failed_read().await;
    eprintln!("without a client certificate: {error}");
    assert!(error.contains(&s.endpoints[0]) && error.contains("bad certificate"), "etcd's TLS alert is named: {error}");
    t.stop().await;

    // A key in the traditional format (BEGIN RSA PRIVATE KEY) is refused up front, with the fix.
    let dir = files.ca.parent().unwrap();
    let made = std::process::Command::new("openssl")
        .args(["genrsa", "-traditional", "-out"])
        .arg(dir.join("rsa.key"))
        .arg("2048")
        .output()
        .expect("run openssl");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let mut pkcs1 = s.clone();
    pkcs1.key_file = Some(dir.join("rsa.key"));
    let e = pkcs1.validate().unwrap_err();
    assert!(e.contains("PKCS#8") && e.contains("openssl pkcs8 -topk8"), "{e}");
    assert_eq!(s.validate(), Ok(()));

    let mut wrong_ca = s;
    wrong_ca.ca_file = Some(files.other_ca);
    let mut t = Task::spawn(wrong_ca.clone());
    let error = t.failed_read().await;
    eprintln!("with a CA that signed nothing: {error}");
    assert!(error.contains("TLS handshake failed") && error.contains(&wrong_ca.endpoints[0]), "{error}");
    t.stop().await;
}
