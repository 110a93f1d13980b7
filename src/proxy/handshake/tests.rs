//! The handshake driven over in-memory pipes with paused time: the client is a `duplex` half,
//! each backend connection another, played by the test. Expected bytes are written out from the
//! protocol (PostgreSQL's message formats), never computed by `pgwire`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tokio::io::{duplex, DuplexStream};

use super::*;
use crate::proxy::test_support::settings;
use crate::proxy::Sessions;

const BACKENDS: u32 = 2;
/// A StartupMessage for protocol 3.0 with `user=app`: length 18, code 196608, "user\0app\0\0".
const STARTUP: &[u8] = b"\0\0\0\x12\0\x03\0\0user\0app\0\0";
/// SSLRequest: length 8, code 80877103.
const SSL_REQUEST: &[u8] = &[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
/// CancelRequest: length 16, code 80877102, pid 7, secret 9.
const CANCEL: &[u8] = &[0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e, 0, 0, 0, 7, 0, 0, 0, 9];
/// AuthenticationOk ('R', length 8, 0): a backend's first reply.
const AUTH_OK: &[u8] = b"R\0\0\0\x08\0\0\0\0";

fn addr(i: u32) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1 + i as u8], 5432))
}

/// A table naming `leader` in `epoch` over [`BACKENDS`] backends at [`addr`].
fn table(leader: Option<u32>, epoch: u64) -> Arc<RoutingTable> {
    let addresses: Vec<SocketAddr> = (0..BACKENDS).map(addr).collect();
    crate::proxy::test_support::table(&addresses, leader, epoch)
}

/// Backends as in-memory pipes: every connect hands the server half to the test.
#[derive(Default)]
struct Pipes {
    connects: AtomicUsize,
    accepted: Mutex<Vec<(SocketAddr, DuplexStream)>>,
    refused: HashSet<SocketAddr>,
    hang: HashSet<SocketAddr>,
    /// Spares handed out for exactly their target, once each.
    spares: Mutex<Vec<(Target, DuplexStream)>>,
    spare_failures: AtomicUsize,
}

impl Connect for Pipes {
    type Stream = DuplexStream;
    async fn connect(&self, address: SocketAddr) -> io::Result<DuplexStream> {
        self.connects.fetch_add(1, Ordering::SeqCst);
        if self.refused.contains(&address) {
            return Err(io::ErrorKind::ConnectionRefused.into());
        }
        if self.hang.contains(&address) {
            std::future::pending::<()>().await;
        }
        let (ours, theirs) = duplex(64 * 1024);
        self.accepted.lock().unwrap().push((address, theirs));
        Ok(ours)
    }

    fn spare(&self, target: &Target) -> Option<DuplexStream> {
        let mut spares = self.spares.lock().unwrap();
        let i = spares.iter().position(|(t, _)| t == target)?;
        Some(spares.remove(i).1)
    }

    fn spare_failed(&self) {
        self.spare_failures.fetch_add(1, Ordering::SeqCst);
    }
}

impl Pipes {
    /// Waits for the next backend connection the handshake makes (a minute of virtual time at
    /// most: a test waiting for a connection that never comes fails instead of spinning).
    async fn next(&self) -> (SocketAddr, DuplexStream) {
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(c) = self.accepted.lock().unwrap().pop() {
                return c;
            }
            assert!(Instant::now() < give_up, "the handshake never connected to a backend");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// Everything one test needs; the handshake runs in a spawned task over `client`.
struct Rig {
    table_tx: watch::Sender<Arc<RoutingTable>>,
    reports_rx: mpsc::Receiver<Report>,
    pipes: Arc<Pipes>,
    metrics: Arc<Metrics>,
    /// The application's end of the client connection.
    app: DuplexStream,
    task: tokio::task::JoinHandle<Outcome<DuplexStream>>,
}

fn rig(first: Arc<RoutingTable>, pipes: Pipes) -> Rig {
    let (table_tx, routing) = watch::channel(first);
    let (reports_tx, reports_rx) = mpsc::channel(16);
    let pipes = Arc::new(pipes);
    let metrics = Arc::new(Metrics::new(&["b0".to_owned(), "b1".to_owned()]));
    let (app, proxy_side) = duplex(64 * 1024);
    let (p, m) = (Arc::clone(&pipes), Arc::clone(&metrics));
    let task = tokio::spawn(async move {
        let settings = settings();
        let sessions = Sessions::default();
        let ctx = Context {
            route: Route::Write,
            sessions: &sessions,
            routing,
            settings: &settings,
            reports: &reports_tx,
            metrics: &m,
            connector: &*p,
        };
        let mut hs = Handshake { client: proxy_side, ctx };
        hs.run().await
    });
    Rig { table_tx, reports_rx, pipes, metrics, app, task }
}

async fn read_n(s: &mut DuplexStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    s.read_exact(&mut buf).await.expect("read");
    buf
}

/// Everything until EOF.
async fn read_to_end(s: &mut DuplexStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    buf
}

/// The SQLSTATE of an ErrorResponse, read from its 'C' field.
fn sqlstate_of(msg: &[u8]) -> Option<String> {
    if msg.first() != Some(&b'E') {
        return None;
    }
    msg.get(5..)?.split(|&b| b == 0).find_map(|f| f.strip_prefix(b"C")).map(|c| String::from_utf8_lossy(c).into())
}

fn admitted(outcome: Outcome<DuplexStream>) -> Admitted<DuplexStream> {
    match outcome {
        Outcome::Admitted(a, _) => a,
        Outcome::Cancel(_) => panic!("expected admission, got a cancel"),
        Outcome::Ended(r) => panic!("expected admission, got {r:?}"),
    }
}

fn ended(outcome: Outcome<DuplexStream>) -> Option<SessionResult> {
    match outcome {
        Outcome::Ended(r) => r,
        _ => panic!("expected the handshake to end without a session"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_startup_reaches_the_leader_verbatim_and_its_reply_admits_the_client() {
    let mut r = rig(table(Some(0), 1), Pipes::default());
    r.app.write_all(STARTUP).await.unwrap();
    let (address, mut backend) = r.pipes.next().await;
    assert_eq!(address, addr(0), "the leader's checked address");
    assert_eq!(read_n(&mut backend, STARTUP.len()).await, STARTUP);
    backend.write_all(AUTH_OK).await.unwrap();
    assert_eq!(read_n(&mut r.app, AUTH_OK.len()).await, AUTH_OK);
    let a = admitted(r.task.await.unwrap());
    assert_eq!((a.id, a.address, a.tls), (BackendId(0), addr(0), false));
    assert_eq!(r.pipes.connects.load(Ordering::SeqCst), 1);
}

/// The wait on backends counts the backend's answers, never the client's: here the backend takes
/// 1 s for its `N` and 1.5 s for its first reply (under the 2 s `connect_timeout`), and the
/// client 4 s for its StartupMessage (under the 5 s `client_hello_timeout`).
#[tokio::test(start_paused = true)]
async fn the_backend_wait_counts_the_backends_answers_and_not_the_clients() {
    let mut r = rig(table(Some(0), 1), Pipes::default());
    r.app.write_all(SSL_REQUEST).await.unwrap();
    let (_, mut b0) = r.pipes.next().await;
    assert_eq!(read_n(&mut b0, 8).await, SSL_REQUEST);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    b0.write_all(b"N").await.unwrap();
    assert_eq!(read_n(&mut r.app, 1).await, b"N");
    tokio::time::sleep(Duration::from_secs(4)).await;
    r.app.write_all(STARTUP).await.unwrap();
    assert_eq!(read_n(&mut b0, STARTUP.len()).await, STARTUP);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    b0.write_all(AUTH_OK).await.unwrap();
    assert_eq!(read_n(&mut r.app, AUTH_OK.len()).await, AUTH_OK);
    let Outcome::Admitted(_, backend_us) = r.task.await.unwrap() else { panic!("expected admission") };
    // 2.5 s of the backend's, plus the virtual millisecond `Pipes::next` polls in; not the 4 s.
    assert!((2_500_000..2_600_000).contains(&backend_us), "backend_us {backend_us}");
}

/// A spare for `target`, and the backend's end of it.
fn spare(pipes: &Pipes, target: Target) -> DuplexStream {
    let (ours, theirs) = duplex(64 * 1024);
    pipes.spares.lock().unwrap().push((target, ours));
    theirs
}

#[tokio::test(start_paused = true)]
async fn a_spare_for_the_leader_carries_the_startup_and_no_connect_is_made() {
    let pipes = Pipes::default();
    let mut b0 = spare(&pipes, Target { id: BackendId(0), epoch: 1, address: addr(0) });
    let mut r = rig(table(Some(0), 1), pipes);
    r.app.write_all(STARTUP).await.unwrap();
    assert_eq!(read_n(&mut b0, STARTUP.len()).await, STARTUP);
    b0.write_all(AUTH_OK).await.unwrap();
    assert_eq!(read_n(&mut r.app, AUTH_OK.len()).await, AUTH_OK);
    assert_eq!(admitted(r.task.await.unwrap()).id, BackendId(0));
    assert_eq!(r.pipes.connects.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn a_spare_of_another_epoch_is_never_used() {
    let pipes = Pipes::default();
    let _old = spare(&pipes, Target { id: BackendId(0), epoch: 1, address: addr(0) });
    let mut r = rig(table(Some(0), 2), pipes);
    r.app.write_all(STARTUP).await.unwrap();
    let (_, mut b0) = r.pipes.next().await;
    assert_eq!(read_n(&mut b0, STARTUP.len()).await, STARTUP, "a fresh connection");
    b0.write_all(AUTH_OK).await.unwrap();
    assert_eq!(admitted(r.task.await.unwrap()).id, BackendId(0));
    assert_eq!(r.pipes.spares.lock().unwrap().len(), 1, "the old epoch's spare is still unused");
}

#[tokio::test(start_paused = true)]
async fn a_dead_spare_is_a_fresh_retry_the_client_never_sees_and_nobody_is_reported() {
    let pipes = Pipes::default();
    drop(spare(&pipes, Target { id: BackendId(0), epoch: 1, address: addr(0) }));
    let mut r = rig(table(Some(0), 1), pipes);
    r.app.write_all(STARTUP).await.unwrap();
    let (address, mut b0) = r.pipes.next().await;
    assert_eq!(address, addr(0), "the same leader, on a fresh connection");
    assert_eq!(read_n(&mut b0, STARTUP.len()).await, STARTUP, "the startup replayed verbatim");
    b0.write_all(AUTH_OK).await.unwrap();
    assert_eq!(read_n(&mut r.app, AUTH_OK.len()).await, AUTH_OK);
    assert_eq!(admitted(r.task.await.unwrap()).id, BackendId(0));
    assert_eq!(r.pipes.spare_failures.load(Ordering::SeqCst), 1);
    assert!(r.reports_rx.try_recv().is_err(), "a dead spare says nothing about the leader");
}

#[tokio::test(start_paused = true)]
async fn without_a_leader_the_client_gets_57p03_at_the_deadline_and_no_backend_is_tried() {
    let mut r = rig(table(None, 1), Pipes::default());
    let start = Instant::now();
    r.app.write_all(STARTUP).await.unwrap();
    let reply = read_to_end(&mut r.app).await;
    assert_eq!(sqlstate_of(&reply).as_deref(), Some("57P03"));
    assert_eq!(start.elapsed(), settings().leader_wait_timeout, "held for exactly leader_wait_timeout (paused clock)");
    assert_eq!(ended(r.task.await.unwrap()), Some(SessionResult::NoLeader));
    assert_eq!(r.pipes.connects.load(Ordering::SeqCst), 0);
    assert_eq!(r.metrics.clients_waiting.get(), 0);
    assert_eq!(r.metrics.leader_wait.get_sample_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_ssl_request_without_a_leader_is_answered_n_then_57p03() {
    let mut r = rig(table(None, 1), Pipes::default());
    r.app.write_all(SSL_REQUEST).await.unwrap();
    assert_eq!(read_n(&mut r.app, 1).await, b"N");
    r.app.write_all(STARTUP).await.unwrap();
    assert_eq!(sqlstate_of(&read_to_end(&mut r.app).await).as_deref(), Some("57P03"));
    assert_eq!(ended(r.task.await.unwrap()), Some(SessionResult::NoLeader));
}

#[tokio::test(start_paused = true)]
async fn a_57p03_reply_is_hidden_reported_and_the_same_bytes_go_to_the_next_leader() {
    let mut r = rig(table(Some(0), 1), Pipes::default());
    r.app.write_all(STARTUP).await.unwrap();
    let (_, mut b0) = r.pipes.next().await;
    assert_eq!(read_n(&mut b0, STARTUP.len()).await, STARTUP);
    // ErrorResponse: 'E', length, S FATAL, C 57P03, M text, terminator.
    let mut e = b"E\0\0\0\0SFATAL\0C57P03\0Mthe database system is shutting down\0\0".to_vec();
    let len = (e.len() - 1) as u32;
    e[1..5].copy_from_slice(&len.to_be_bytes());
    b0.write_all(&e).await.unwrap();
    let report = r.reports_rx.recv().await.expect("the backend is reported");
    assert_eq!(report.backend, BackendId(0));
    assert_eq!(report.source, Source::Client);
    assert!(matches!(report.observation, Observation::Lost { .. }));
    r.table_tx.send_replace(table(Some(1), 2));
    let (address, mut b1) = r.pipes.next().await;
    assert_eq!(address, addr(1));
    assert_eq!(read_n(&mut b1, STARTUP.len()).await, STARTUP, "the buffered startup is replayed verbatim");
    b1.write_all(AUTH_OK).await.unwrap();
    assert_eq!(read_n(&mut r.app, AUTH_OK.len()).await, AUTH_OK, "the client saw only the second backend");
    assert_eq!(admitted(r.task.await.unwrap()).id, BackendId(1));
}

#[tokio::test(start_paused = true)]
async fn a_reply_from_a_backend_that_stopped_leading_meanwhile_is_never_relayed() {
    let mut r = rig(table(Some(0), 1), Pipes::default());
    r.app.write_all(STARTUP).await.unwrap();
    let (_, mut b0) = r.pipes.next().await;
    assert_eq!(read_n(&mut b0, STARTUP.len()).await, STARTUP);
    // The leader changes while backend 0 is still answering.
    r.table_tx.send_replace(table(Some(1), 2));
    b0.write_all(b"R\0\0\0\x08\0\0\0\x05").await.unwrap(); // from b0: must not reach the client
    let (address, mut b1) = r.pipes.next().await;
    assert_eq!(address, addr(1));
    assert_eq!(read_to_end(&mut b0).await, b"", "backend 0's attempt was dropped");
    assert_eq!(read_n(&mut b1, STARTUP.len()).await, STARTUP);
    b1.write_all(AUTH_OK).await.unwrap();
    assert_eq!(read_n(&mut r.app, AUTH_OK.len()).await, AUTH_OK);
    assert_eq!(admitted(r.task.await.unwrap()).id, BackendId(1));
    assert!(r.reports_rx.try_recv().is_err(), "a backend that did nothing wrong is not reported");
}

#[tokio::test(start_paused = true)]
async fn the_same_leader_in_a_new_epoch_is_a_retry_too() {
    let mut r = rig(table(Some(0), 1), Pipes::default());
    r.app.write_all(STARTUP).await.unwrap();
    let (_, mut first) = r.pipes.next().await;
    read_n(&mut first, STARTUP.len()).await;
    r.table_tx.send_replace(table(None, 2));
    r.table_tx.send_replace(table(Some(0), 3));
    first.write_all(AUTH_OK).await.unwrap();
    let (_, mut second) = r.pipes.next().await;
    read_n(&mut second, STARTUP.len()).await;
    second.write_all(AUTH_OK).await.unwrap();
    assert_eq!(read_n(&mut r.app, AUTH_OK.len()).await, AUTH_OK);
    admitted(r.task.await.unwrap());
    assert_eq!(r.pipes.connects.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn ssl_s_is_the_admission_point_for_tls() {
    let mut r = rig(table(Some(0), 1), Pipes::default());
    r.app.write_all(SSL_REQUEST).await.unwrap();
    let (_, mut b0) = r.pipes.next().await;
    assert_eq!(read_n(&mut b0, 8).await, SSL_REQUEST);
    r.table_tx.send_replace(table(Some(1), 2));
    b0.write_all(b"S").await.unwrap(); // too late: b0 no longer leads
    let (_, mut b1) = r.pipes.next().await;
    assert_eq!(read_n(&mut b1, 8).await, SSL_REQUEST, "the SSLRequest is replayed to the new leader");
    b1.write_all(b"S").await.unwrap();
    assert_eq!(read_n(&mut r.app, 1).await, b"S");
    let a = admitted(r.task.await.unwrap());
    assert_eq!((a.id, a.tls), (BackendId(1), true));
}

#[tokio::test(start_paused = true)]
async fn after_a_relayed_n_the_client_is_plaintext_on_every_later_backend() {
    let mut r = rig(table(Some(0), 1), Pipes::default());
    r.app.write_all(SSL_REQUEST).await.unwrap();
    let (_, mut b0) = r.pipes.next().await;
    read_n(&mut b0, 8).await;
    b0.write_all(b"N").await.unwrap();
    assert_eq!(read_n(&mut r.app, 1).await, b"N");
    r.app.write_all(STARTUP).await.unwrap();
    assert_eq!(read_n(&mut b0, STARTUP.len()).await, STARTUP);
    r.table_tx.send_replace(table(Some(1), 2));
    b0.write_all(AUTH_OK).await.unwrap();
    let (_, mut b1) = r.pipes.next().await;
    assert_eq!(read_n(&mut b1, STARTUP.len()).await, STARTUP, "no second SSLRequest: the client is plaintext");
    b1.write_all(AUTH_OK).await.unwrap();
    assert_eq!(read_n(&mut r.app, AUTH_OK.len()).await, AUTH_OK);
    let a = admitted(r.task.await.unwrap());
    assert_eq!((a.id, a.tls), (BackendId(1), false));
}

#[tokio::test(start_paused = true)]
async fn a_client_that_leaves_while_waiting_frees_everything_and_no_backend_is_opened() {
    let r = rig(table(None, 1), Pipes::default());
    let Rig { mut app, task, table_tx, pipes, metrics, .. } = r;
    app.write_all(STARTUP).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(metrics.clients_waiting.get(), 1);
    drop(app);
    assert_eq!(ended(task.await.unwrap()), Some(SessionResult::Abandoned));
    assert_eq!(metrics.clients_waiting.get(), 0);
    table_tx.send_replace(table(Some(0), 2));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(pipes.connects.load(Ordering::SeqCst), 0, "no backend connection for a client that left");
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_handshake_lowers_the_waiting_gauge() {
    let r = rig(table(None, 1), Pipes::default());
    let mut app = r.app;
    app.write_all(STARTUP).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(r.metrics.clients_waiting.get(), 1);
    r.task.abort();
    let _ = r.task.await;
    assert_eq!(r.metrics.clients_waiting.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_refused_connect_is_reported_and_retried_after_the_table_changes() {
    let pipes = Pipes { refused: [addr(0)].into(), ..Pipes::default() };
    let mut r = rig(table(Some(0), 1), pipes);
    r.app.write_all(STARTUP).await.unwrap();
    let report = r.reports_rx.recv().await.unwrap();
    assert_eq!(report.backend, BackendId(0));
    r.table_tx.send_replace(table(Some(1), 2));
    let (_, mut b1) = r.pipes.next().await;
    read_n(&mut b1, STARTUP.len()).await;
    b1.write_all(AUTH_OK).await.unwrap();
    assert_eq!(admitted(r.task.await.unwrap()).id, BackendId(1));
}

#[tokio::test(start_paused = true)]
async fn a_connect_that_hangs_times_out_and_the_client_gets_57p03_when_no_leader_remains() {
    let pipes = Pipes { hang: [addr(0)].into(), ..Pipes::default() };
    let mut r = rig(table(Some(0), 1), pipes);
    r.app.write_all(STARTUP).await.unwrap();
    let report = r.reports_rx.recv().await.unwrap();
    assert!(matches!(report.observation, Observation::Lost { ref error } if error.contains("connect")), "{report:?}");
    r.table_tx.send_replace(table(None, 2));
    assert_eq!(sqlstate_of(&read_to_end(&mut r.app).await).as_deref(), Some("57P03"));
    assert_eq!(ended(r.task.await.unwrap()), Some(SessionResult::NoLeader));
}

#[tokio::test(start_paused = true)]
async fn with_the_elector_gone_a_waiting_client_gets_57p03_at_its_deadline_without_spinning() {
    let pipes = Pipes { refused: [addr(0)].into(), ..Pipes::default() };
    let mut r = rig(table(Some(0), 1), pipes);
    let start = Instant::now();
    r.app.write_all(STARTUP).await.unwrap();
    r.reports_rx.recv().await.unwrap();
    drop(r.table_tx); // the elector is gone; the stale table still names backend 0
    assert_eq!(sqlstate_of(&read_to_end(&mut r.app).await).as_deref(), Some("57P03"));
    assert_eq!(start.elapsed(), settings().leader_wait_timeout);
    assert_eq!(r.pipes.connects.load(Ordering::SeqCst), 1, "no retry loop against the stale table");
}

#[tokio::test(start_paused = true)]
async fn bytes_sent_while_waiting_follow_the_startup_in_order() {
    let mut r = rig(table(None, 1), Pipes::default());
    r.app.write_all(STARTUP).await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    r.app.write_all(b"p\0\0\0\x05x").await.unwrap(); // an early PasswordMessage
    tokio::time::sleep(Duration::from_millis(10)).await;
    r.table_tx.send_replace(table(Some(0), 2));
    let (_, mut b0) = r.pipes.next().await;
    let mut want = STARTUP.to_vec();
    want.extend_from_slice(b"p\0\0\0\x05x");
    assert_eq!(read_n(&mut b0, want.len()).await, want);
    b0.write_all(AUTH_OK).await.unwrap();
    admitted(r.task.await.unwrap());
}

#[tokio::test(start_paused = true)]
async fn data_before_the_answer_to_an_ssl_request_is_refused() {
    let mut r = rig(table(None, 1), Pipes::default());
    r.app.write_all(SSL_REQUEST).await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    r.app.write_all(b"\x16\x03\x01").await.unwrap();
    let reply = read_to_end(&mut r.app).await;
    assert_eq!(reply.first(), Some(&b'N'));
    assert_eq!(sqlstate_of(&reply[1..]).as_deref(), Some("08P01"));
    assert_eq!(ended(r.task.await.unwrap()), Some(SessionResult::RefusedProtocol));
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_times_out_and_a_closed_one_is_a_probe() {
    let r = rig(table(Some(0), 1), Pipes::default());
    let start = Instant::now();
    assert_eq!(ended(r.task.await.unwrap()), Some(SessionResult::ClientTimeout));
    assert_eq!(start.elapsed(), settings().client_hello_timeout);
    drop(r.app);
    let r = rig(table(Some(0), 1), Pipes::default());
    drop(r.app);
    assert_eq!(ended(r.task.await.unwrap()), None, "zero bytes then close: not counted");
}

#[tokio::test(start_paused = true)]
async fn a_cancel_request_is_handed_back_verbatim() {
    let mut r = rig(table(Some(0), 1), Pipes::default());
    r.app.write_all(CANCEL).await.unwrap();
    match r.task.await.unwrap() {
        Outcome::Cancel(raw) => assert_eq!(raw, CANCEL),
        _ => panic!("expected a cancel"),
    }
    assert_eq!(r.pipes.connects.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn cancels_go_to_every_backend_holding_sessions_and_are_counted_truthfully() {
    let pipes = Arc::new(Pipes::default());
    let p = Arc::clone(&pipes);
    let sent =
        tokio::spawn(async move { forward_cancel(&*p, CANCEL, &[addr(0), addr(1)], Duration::from_secs(2)).await });
    for _ in 0..2 {
        let (_, mut b) = pipes.next().await;
        assert_eq!(read_n(&mut b, CANCEL.len()).await, CANCEL);
    } // both dropped: the servers closed after reading
    assert_eq!(sent.await.unwrap(), SessionResult::CancelForwarded);
    assert_eq!(pipes.connects.load(Ordering::SeqCst), 2);

    let refused = Pipes { refused: [addr(0), addr(1)].into(), ..Pipes::default() };
    assert_eq!(
        forward_cancel(&refused, CANCEL, &[addr(0), addr(1)], Duration::from_secs(2)).await,
        SessionResult::CancelFailed
    );
    let one_up = Pipes { refused: [addr(0)].into(), ..Pipes::default() };
    let one_up = Arc::new(one_up);
    let p = Arc::clone(&one_up);
    let sent =
        tokio::spawn(async move { forward_cancel(&*p, CANCEL, &[addr(0), addr(1)], Duration::from_secs(2)).await });
    let (address, mut b) = one_up.next().await;
    assert_eq!(address, addr(1));
    read_n(&mut b, CANCEL.len()).await;
    drop(b);
    assert_eq!(sent.await.unwrap(), SessionResult::CancelForwarded);
    assert_eq!(
        forward_cancel(&Pipes::default(), CANCEL, &[], Duration::from_secs(2)).await,
        SessionResult::CancelUnmatched
    );
}

#[tokio::test(start_paused = true)]
async fn an_over_limit_client_gets_53300_after_n_to_its_ssl_request() {
    let (_tx, routing) = watch::channel(table(Some(0), 1));
    let (reports_tx, _rx) = mpsc::channel(1);
    let pipes = Arc::new(Pipes::default());
    let (mut app, proxy_side) = duplex(4096);
    let p = Arc::clone(&pipes);
    let refused = tokio::spawn(async move {
        let (metrics, settings) = (Metrics::new(&[]), settings());
        let sessions = Sessions::default();
        let ctx = Context {
            route: Route::Write,
            sessions: &sessions,
            routing,
            settings: &settings,
            reports: &reports_tx,
            metrics: &metrics,
            connector: &*p,
        };
        Handshake { client: proxy_side, ctx }.refuse(Refusal::OverLimit).await
    });
    app.write_all(SSL_REQUEST).await.unwrap();
    assert_eq!(read_n(&mut app, 1).await, b"N");
    app.write_all(STARTUP).await.unwrap();
    assert_eq!(sqlstate_of(&read_to_end(&mut app).await).as_deref(), Some("53300"));
    assert_eq!(refused.await.unwrap(), Some(SessionResult::RefusedLimit));
    assert_eq!(pipes.connects.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn a_spare_that_answers_nothing_is_reported_like_a_fresh_connection() {
    let pipes = Pipes::default();
    let _silent = spare(&pipes, Target { id: BackendId(0), epoch: 1, address: addr(0) });
    let mut r = rig(table(Some(0), 1), pipes);
    r.app.write_all(STARTUP).await.unwrap();
    let report = r.reports_rx.recv().await.expect("the silent leader is reported");
    assert_eq!(report.backend, BackendId(0));
    assert!(matches!(report.observation, Observation::Lost { .. }));
    assert_eq!(r.pipes.spare_failures.load(Ordering::SeqCst), 0, "not a dead spare: a silent backend");
}
