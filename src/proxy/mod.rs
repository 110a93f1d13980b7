//! The client-facing side: the listeners, the accept loop with admission, and the life of each
//! session after its handshake.
//!
//! Two listeners run the same code: the main one (sessions go to the leader) and, with
//! `[read_only]`, the read-only one (sessions go to a replica in bounds, DESIGN.md rule 10).
//! Each accept loop carries its [`Route`]; the handshake asks the table for a target of that
//! route and splice asks it whether a session of that route may stay. Both share one
//! `max_connections`, one allow-list, one drain and one access log (with `listener=`).
//!
//! Each accepted connection runs in its own task (the accept loop never awaits a client):
//! 1. Admission, in the accept loop: a client outside `[proxy] allow` is refused with 28000 and
//!    never takes a `max_connections` slot; otherwise a slot (a semaphore permit held for the
//!    connection's life, startup phase included) or, without one, a 53300 refusal. At most
//!    `REFUSALS_IN_FLIGHT` refusals are answered at once; past that the connection is closed
//!    unanswered (and counted).
//! 2. The handshake ([`handshake`]): first packet, wait for a leader, connect, vet, admit (DESIGN.md
//!    rules 7 and 8), or refuse with the right SQLSTATE.
//! 3. A CancelRequest goes to every backend that holds sessions of this pgleader ([`Sessions`]).
//! 4. Splice both ways until both sides close, racing, in this order of priority, the routing
//!    table (rule 3 cuts the session: [`RoutingTable::cut_reason`] says why), the shutdown grace
//!    timer, and the byte pump. A cut always wins over a pending byte. After splicing starts no
//!    byte is ever injected.
//!
//! Gauges are raised by guards that lower them on drop, so a cancelled task cannot leave them
//! raised, and every session — also one closed by the grace timer — gets its access-log line with
//! its backend and byte counts.
//!
//! The listen backlog is twice `max_connections`, and at least 1024 (PostgreSQL sizes its own the
//! same way): a burst of reconnecting pools, including the clients that will be refused, is queued
//! by the kernel rather than dropped half-open. The kernel caps it at `net.core.somaxconn`, and a
//! lower cap is warned about at start and on reload.

pub(crate) mod balance;
pub(crate) mod handshake;
pub mod spares;
#[cfg(test)]
mod test_support;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::metrics::{Metrics, SessionResult};
use crate::pump::{pump_both, Side, Tally};
use crate::task::sleep_until_some;
use crate::topology::{BackendId, CutReason, Report, Route, RoutingTable, Target};

use balance::{Balance, Handoff, Held};
use handshake::{forward_cancel, Admitted, Connect, Context, Handshake, Outcome, Refusal};
use spares::Spares;

/// The `[proxy]` settings a connection uses, read once when it is accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxySettings {
    pub leader_wait_timeout: Duration,
    pub connect_timeout: Duration,
    pub client_hello_timeout: Duration,
    /// Client networks allowed in; others get 28000.
    pub allow: Vec<IpNet>,
    /// Write one `pgleader::access` line per session.
    pub access_log: bool,
    /// `max_connections`: also sizes the listen backlog.
    pub max_connections: usize,
    /// Spare connections kept open to the leader ([`spares`]).
    pub spare_connections: usize,
    /// A spare older than this is closed unused and replaced.
    pub spare_max_age: Duration,
}

/// Clients over `max_connections` that are read and answered 53300 at the same time; more are
/// closed without a word, so a flood cannot grow the task count without bound.
const REFUSALS_IN_FLIGHT: usize = 256;

/// Binds the client listener with the backlog for `max_connections` (see the module docs). The socket is not registered with a runtime yet: the runtime that accepts on it does that (a
/// worker's, with `[proxy] workers`). With `reuse_port`, `SO_REUSEPORT` lets one listener per
/// worker bind the same address, and the kernel spreads new connections over them.
///
/// # Errors
/// The address cannot be bound.
pub fn bind_std(address: SocketAddr, max_connections: usize, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    let backlog = backlog_for(max_connections);
    socket.listen(backlog_value(backlog))?;
    warn_if_capped(backlog);
    Ok(socket.into())
}

/// The listen backlog for a `max_connections`.
pub fn backlog_for(max_connections: usize) -> usize {
    max_connections.saturating_mul(2).max(1024)
}

fn backlog_value(backlog: usize) -> i32 {
    i32::try_from(backlog).unwrap_or(i32::MAX)
}

/// The kernel silently caps a listen backlog at `net.core.somaxconn`: say so when it does.
fn warn_if_capped(backlog: usize) {
    let cap = std::fs::read_to_string("/proc/sys/net/core/somaxconn").ok().and_then(|s| s.trim().parse::<usize>().ok());
    if let Some(cap) = cap.filter(|&cap| cap < backlog) {
        tracing::warn!(
            backlog,
            somaxconn = cap,
            "the kernel caps the listen backlog below max_connections: a burst of connects larger than \
             net.core.somaxconn can be dropped by the kernel; raise it (sysctl -w net.core.somaxconn={backlog})"
        );
    }
}

/// What a connection was admitted as; the permit is held for the connection's life.
pub(crate) enum Admission {
    /// Counts toward `max_connections`.
    Client(OwnedSemaphorePermit),
    /// Only answered with the refusal's SQLSTATE (a `REFUSALS_IN_FLIGHT` permit).
    Refused(OwnedSemaphorePermit, Refusal),
}

/// Everything connection tasks share; cloned handles only.
pub struct Shared {
    pub routing: watch::Receiver<Arc<RoutingTable>>,
    pub settings: watch::Receiver<Arc<ProxySettings>>,
    /// To the elector: a backend a client could not be connected to.
    pub reports: mpsc::Sender<Report>,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the shutdown grace period ends: open sessions close.
    pub hard_stop: CancellationToken,
    /// Where sessions are open, for cancel requests.
    pub sessions: Sessions,
    /// Connections to the leader opened ahead of time.
    pub spares: Arc<Spares>,
    /// The next accepted connection's number, for its span: one sequence for the process, so no
    /// two connections of different workers or listeners share one.
    pub next_id: AtomicU64,
}

/// Open sessions per backend address (a cancel request can only concern one of them) and read
/// sessions per backend (a new read session goes to the replica with the fewest). A tiny
/// critical section per session start and end, never held across an await.
#[derive(Default)]
pub struct Sessions(Mutex<SessionCounts>);

#[derive(Default)]
struct SessionCounts {
    by_address: HashMap<SocketAddr, usize>,
    reads: HashMap<BackendId, usize>,
}

impl Sessions {
    /// The addresses that hold at least one session now.
    fn addresses(&self) -> Vec<SocketAddr> {
        self.0.lock().map(|m| m.by_address.keys().copied().collect()).unwrap_or_default()
    }

    /// Open read sessions on `backend`.
    pub(crate) fn reads(&self, backend: BackendId) -> usize {
        self.0.lock().map(|m| m.reads.get(&backend).copied().unwrap_or(0)).unwrap_or(0)
    }

    fn change(&self, address: SocketAddr, read: Option<BackendId>, open: bool) {
        fn step<K: std::hash::Hash + Eq + Copy>(m: &mut HashMap<K, usize>, key: K, open: bool) {
            let n = m.entry(key).or_insert(0);
            *n = if open { *n + 1 } else { n.saturating_sub(1) };
            if *n == 0 {
                m.remove(&key);
            }
        }
        if let Ok(mut m) = self.0.lock() {
            step(&mut m.by_address, address, open);
            if let Some(id) = read {
                step(&mut m.reads, id, open);
            }
        }
    }
}

/// One spliced session: raises its listener's `sessions_active{backend}` gauge and registers
/// it in [`Sessions`] while it lives.
struct Active<'a> {
    shared: &'a Shared,
    gauge: prometheus::IntGauge,
    address: SocketAddr,
    read: Option<BackendId>,
}

impl<'a> Active<'a> {
    fn open(shared: &'a Shared, route: Route, id: BackendId, backend: &str, address: SocketAddr) -> Active<'a> {
        let gauges = match route {
            Route::Write => &shared.metrics.sessions_active,
            Route::Read => &shared.metrics.read_sessions_active,
        };
        let gauge = gauges.with_label_values(&[backend]);
        gauge.inc();
        let read = (route == Route::Read).then_some(id);
        shared.sessions.change(address, read, true);
        Active { shared, gauge, address, read }
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.gauge.dec();
        self.shared.sessions.change(self.address, self.read, false);
    }
}

/// One listener's accept loop.
pub struct Proxy {
    pub listener: TcpListener,
    /// Where its sessions go: the leader, or a replica in bounds.
    pub route: Route,
    pub shared: Arc<Shared>,
    /// `max_connections`; a reload resizes it.
    pub limit: Arc<Semaphore>,
    /// Cancelled at the start of a drain: stop accepting.
    pub stop_accepting: CancellationToken,
    /// Tracks connection tasks so the drain can wait for them.
    pub tracker: TaskTracker,
    /// Refusals answered at once, across every accept loop of the process ([`refusals_in_flight`]).
    pub refusals: Arc<Semaphore>,
    /// This worker's share of the connections ([`balance`]).
    pub balance: Arc<Balance>,
}

/// The bound on refusals answered at once, shared by every accept loop (workers included).
pub fn refusals_in_flight() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT))
}

impl Proxy {
    /// Decides what an accepted connection is admitted as; `None`: close it at once (counted).
    /// Clients outside `allow` never take a `max_connections` slot, and refusals of either kind
    /// are bounded by `refusals`.
    fn admit(&self, peer: SocketAddr, refusals: &Arc<Semaphore>) -> Option<Admission> {
        let allowed = self.shared.settings.borrow().allow.iter().any(|net| net.contains(&peer.ip().to_canonical()));
        let refused = |why: Refusal| match Arc::clone(refusals).try_acquire_owned() {
            Ok(p) => Some(Admission::Refused(p, why)),
            Err(_) => {
                self.shared.metrics.session_ended(why.result());
                None
            }
        };
        if !allowed {
            return refused(Refusal::Address);
        }
        match Arc::clone(&self.limit).try_acquire_owned() {
            Ok(p) => Some(Admission::Client(p)),
            Err(_) => refused(Refusal::OverLimit),
        }
    }

    /// Accepts until `stop_accepting`; accept errors (EMFILE and the like) back off and continue.
    /// A reload of `max_connections` resizes the listen backlog.
    pub async fn run(&self) {
        let mut backoff = Duration::from_millis(10);
        let refusals = Arc::clone(&self.refusals);
        let mut settings = self.shared.settings.clone();
        let mut backlog = backlog_for(settings.borrow_and_update().max_connections);
        loop {
            let accepted = tokio::select! {
                () = self.stop_accepting.cancelled() => return,
                Ok(()) = settings.changed() => {
                    let wanted = backlog_for(settings.borrow_and_update().max_connections);
                    if wanted != backlog {
                        backlog = wanted;
                        if let Err(e) = SockRef::from(&self.listener).listen(backlog_value(backlog)) {
                            tracing::warn!(error = %e, backlog, "cannot resize the listen backlog");
                        }
                        warn_if_capped(backlog);
                    }
                    continue;
                }
                r = self.listener.accept() => r,
            };
            match accepted {
                Ok((socket, peer)) => {
                    backoff = Duration::from_millis(10);
                    let Some(admission) = self.admit(peer, &refusals) else { continue };
                    let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
                    let (socket, admission, held) = match self.balance.elsewhere() {
                        // A refusal is answered where it was accepted: it is over at once.
                        Some(worker) if matches!(admission, Admission::Client(_)) => {
                            let Some(back) = self.hand_off(worker, socket, peer, admission, id) else { continue };
                            back
                        }
                        _ => (socket, admission, self.balance.here()),
                    };
                    self.serve(socket, peer, self.route, admission, held, id);
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "accept failed; backing off (raise the file descriptor limit if this is EMFILE)");
                    tokio::select! {
                        () = self.stop_accepting.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

impl Proxy {
    /// Runs one client's connection on this worker until it ends.
    fn serve(&self, socket: TcpStream, peer: SocketAddr, route: Route, admission: Admission, held: Held, id: u64) {
        let span = tracing::debug_span!("conn", id, %peer, listener = route.as_str());
        let shared = Arc::clone(&self.shared);
        self.tracker.spawn(handle(shared, route, socket, peer, admission, held).instrument(span));
    }

    /// Sends an accepted connection to `worker`; what comes back (that worker takes no more)
    /// runs here. A socket that cannot leave or rejoin this runtime is closed.
    fn hand_off(
        &self,
        worker: usize,
        socket: TcpStream,
        peer: SocketAddr,
        admission: Admission,
        id: u64,
    ) -> Option<(TcpStream, Admission, Held)> {
        let socket = match socket.into_std() {
            Ok(s) => s,
            // Not seen in practice: into_std only fails if the socket cannot be deregistered,
            // and then it is gone; the client sees a closed connection, as for any accept error.
            Err(e) => {
                tracing::warn!(error = %e, %peer, "cannot move an accepted connection to another worker; closing it");
                self.shared.metrics.session_ended(SessionResult::HandoffFailed);
                return None;
            }
        };
        let handoff = Handoff { socket, peer, route: self.route, admission, held: self.balance.hold(worker), id };
        // Sent: nothing comes back.
        let Handoff { socket, admission, held, .. } = self.balance.send(worker, handoff).err()?;
        drop(held);
        match TcpStream::from_std(socket) {
            Ok(socket) => Some((socket, admission, self.balance.here())),
            Err(e) => {
                tracing::warn!(error = %e, %peer, "cannot take back an accepted connection; closing it");
                self.shared.metrics.session_ended(SessionResult::HandoffFailed);
                None
            }
        }
    }

    /// Runs the connections other workers hand to this one, until `inbox` is closed and every
    /// send begun before that has been taken.
    pub(crate) async fn take_handoffs(&self, inbox: &mut mpsc::UnboundedReceiver<Handoff>) {
        while let Some(h) = inbox.recv().await {
            self.take(h);
        }
    }

    /// After this worker's accept loops ended: no more handoffs, and the ones in flight run here.
    /// `recv` after `close`, not `try_recv`: a send that had begun when the inbox closed has
    /// already told its sender it arrived, and `try_recv` reports it as not there yet.
    pub(crate) async fn close_inbox(&self, inbox: &mut mpsc::UnboundedReceiver<Handoff>) {
        inbox.close();
        self.take_handoffs(inbox).await;
    }

    fn take(&self, h: Handoff) {
        match TcpStream::from_std(h.socket) {
            Ok(socket) => self.serve(socket, h.peer, h.route, h.admission, h.held, h.id),
            Err(e) => {
                tracing::warn!(error = %e, peer = %h.peer, "cannot register a connection handed from another worker; closing it");
                self.shared.metrics.session_ended(SessionResult::HandoffFailed);
            }
        }
    }
}

/// Backends reached over TCP, tuned like client sockets; with `spares`, a new session to the
/// leader starts on a spare when one is ready (never a cancel request).
pub(crate) struct TcpConnector<'a> {
    spares: Option<(&'a Spares, Duration)>,
}

impl Connect for TcpConnector<'_> {
    type Stream = TcpStream;
    async fn connect(&self, address: SocketAddr) -> io::Result<TcpStream> {
        let stream = TcpStream::connect(address).await?;
        tune(&stream);
        Ok(stream)
    }

    fn spare(&self, target: &Target) -> Option<TcpStream> {
        let (spares, max_age) = self.spares?;
        spares.take(target, max_age)
    }

    fn spare_failed(&self) {
        if let Some((spares, _)) = self.spares {
            spares.failed_in_use();
        }
    }
}

/// What the access log says about one connection.
struct AccessLine {
    backend: Option<String>,
    /// Bytes spliced (client to backend, backend to client).
    bytes: (u64, u64),
    cut: Option<&'static str>,
}

/// One client connection, start to finish; counts its result and logs it. `_held` counts it on
/// its worker until it ends (a parameter, not a wrapping `async` block, whose captured arguments
/// would stay in the task beside this future's: measured, 0.13 KiB more per idle session).
async fn handle(
    shared: Arc<Shared>,
    route: Route,
    client: TcpStream,
    peer: SocketAddr,
    admission: Admission,
    _held: Held,
) {
    let started = Instant::now();
    tune(&client);
    let settings = shared.settings.borrow().clone();
    let connector = TcpConnector { spares: Some((&shared.spares, settings.spare_max_age)) };
    let ctx = Context {
        route,
        sessions: &shared.sessions,
        routing: shared.routing.clone(),
        settings: &settings,
        reports: &shared.reports,
        metrics: &shared.metrics,
        connector: &connector,
    };
    let mut handshake = Handshake { client, ctx };
    let mut line = AccessLine { backend: None, bytes: (0, 0), cut: None };
    let stopped = || Some(SessionResult::Shutdown);
    let result = match admission {
        Admission::Refused(_permit, why) => tokio::select! {
            biased;
            () = shared.hard_stop.cancelled() => stopped(),
            r = handshake.refuse(why) => r,
        },
        Admission::Client(_permit) => {
            let outcome = tokio::select! {
                biased;
                () = shared.hard_stop.cancelled() => Outcome::Ended(stopped()),
                o = handshake.run() => o,
            };
            match outcome {
                Outcome::Ended(r) => r,
                Outcome::Cancel(raw) => {
                    let targets = shared.sessions.addresses();
                    let direct = TcpConnector { spares: None };
                    Some(forward_cancel(&direct, &raw, &targets, settings.connect_timeout).await)
                }
                Outcome::Admitted(admitted, backend_us) => {
                    // From the session task's start to the backend's first byte relayed, and the
                    // part of it spent waiting on backends (the rest: the client's packets, a
                    // leader wait, pgleader's own steps). With TLS the first byte is the `S`:
                    // the TLS handshake and the startup come later, inside the splice. Logged
                    // here: `splice` keeps its arguments for the whole session.
                    tracing::debug!(
                        setup_us = handshake::micros(started.elapsed()),
                        backend_us,
                        tls = admitted.tls,
                        "admitted"
                    );
                    Some(splice(&shared, route, &handshake.client, admitted, &mut line).await)
                }
            }
        }
    };
    let Some(result) = result else { return };
    shared.metrics.session_ended(result);
    if settings.access_log {
        tracing::info!(
            target: "pgleader::access",
            client = %peer,
            listener = route.as_str(),
            backend = line.backend.as_deref().unwrap_or("-"),
            bytes_up = line.bytes.0,
            bytes_down = line.bytes.1,
            duration_ms = started.elapsed().as_millis() as u64,
            result = result.as_str(),
            cut = line.cut.unwrap_or("-"),
            "session"
        );
    }
}

/// TCP_NODELAY and keepalive: the proxy must not add latency, and dead peers must be noticed.
fn tune(stream: &impl std::os::fd::AsFd) {
    let socket = SockRef::from(stream);
    let _ = socket.set_nodelay(true);
    let keepalive = TcpKeepalive::new().with_time(Duration::from_secs(60)).with_interval(Duration::from_secs(10));
    let _ = socket.set_tcp_keepalive(&keepalive);
}

/// Step 4: splice until both sides close, the session is cut, or the grace period ends.
async fn splice(
    shared: &Shared,
    route: Route,
    client: &TcpStream,
    admitted: Admitted<TcpStream>,
    line: &mut AccessLine,
) -> SessionResult {
    let Admitted { backend, id, address, tls, .. } = admitted;
    let mut routing = shared.routing.clone();
    let name = routing.borrow().backend(id).map(|b| b.name.clone()).unwrap_or_default();
    let _active = Active::open(shared, route, id, &name, address);
    tracing::debug!(backend = %name, %address, tls, "spliced");
    // This session's totals, for the access log; the pump also feeds the global metric.
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let metrics = &shared.metrics;
    let pump = pump_both(
        client,
        &backend,
        Tally { global: &metrics.bytes_client_to_backend, session: &up },
        Tally { global: &metrics.bytes_backend_to_client, session: &down },
    );
    let outcome = tokio::select! {
        biased;
        reason = session_cut(&mut routing, route, id) => {
            tracing::info!(backend = %name, reason = reason.as_str(), "session cut");
            metrics.sessions_cut.with_label_values(&[reason.as_str()]).inc();
            line.cut = Some(reason.as_str());
            SessionResult::Cut
        }
        () = shared.hard_stop.cancelled() => SessionResult::Shutdown,
        r = pump => match r {
            Ok(()) => SessionResult::Ok,
            Err(Side::Client(e)) => {
                tracing::debug!(error = %e, "client connection failed");
                SessionResult::ClientError
            }
            Err(Side::Backend(e)) => {
                tracing::info!(backend = %name, error = %e, "backend connection failed");
                SessionResult::BackendError
            }
        },
    };
    line.backend = Some(name);
    line.bytes = (up.load(Ordering::Relaxed), down.load(Ordering::Relaxed));
    outcome
}

/// Completes, with the reason, when the routing table no longer allows a session of `route` on
/// `id` (DESIGN.md rules 3 and 10). Cancel safe. Pending forever if the elector is gone (its end is fatal,
/// and the drain that follows closes sessions).
/// With fencing, it also completes at the end of the backend's confirmation (rule 9) — on its
/// own clock, not when the elector gets round to it — unless a newer table has extended it.
async fn session_cut(routing: &mut watch::Receiver<Arc<RoutingTable>>, route: Route, id: BackendId) -> CutReason {
    loop {
        let lease_until = {
            let table = routing.borrow_and_update();
            if let Some(reason) = table.cut_reason_for(route, id, Instant::now().into_std()) {
                return reason;
            }
            table.lease_until(id).map(Instant::from_std)
        };
        tokio::select! {
            biased;
            changed = routing.changed() => if changed.is_err() {
                return std::future::pending().await;
            },
            () = sleep_until_some(lease_until) => {}
        }
    }
}
