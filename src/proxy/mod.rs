//! The client-facing side: the accept loop and the per-connection state machine.
//!
//! Each accepted connection runs in its own task (the accept loop never awaits a client):
//! 1. Admission: a permit from the `max_connections` semaphore; without one the client's first
//!    packet is answered with 53300 (at most `REFUSALS_IN_FLIGHT` such answers at once; past that
//!    the connection is closed unanswered). Clients still in the startup phase hold a permit.
//! 2. First packet within `client_hello_timeout` (10,000-byte limit, parsed by `pgwire`):
//!    GSSENCRequest is answered `N` once; CancelRequest is forwarded to the current leader and
//!    the connection closed; SSLRequest and StartupMessage are routed. Garbage gets 08P01
//!    (0A000 for a protocol major version other than 3). A zero-byte connection is a TCP probe:
//!    logged at DEBUG, not counted.
//! 3. Route: wait (bounded by `leader_wait_timeout`) for a table with a leader, connect within
//!    `connect_timeout`, replay the buffered packet. SSLRequest: the backend's `S` starts TLS end
//!    to end; its `N` is relayed and the handshake followed in plaintext. On plaintext the
//!    backend's first reply is inspected: a refused or reset connect, a silent backend, or a 57P03
//!    ErrorResponse is never shown to the client — the backend is reported lost (not routable
//!    until re-checked) and the same bytes are replayed on the next route (DESIGN.md rule 7).
//!    No leader in time: 57P03 with the reason. Clients with `sslmode=require` see their own
//!    "server does not support SSL" error instead, since the refusal must answer `N` first.
//! 4. Splice both ways until both sides close, racing the routing table (DESIGN.md rule 3 cuts
//!    the session) and the shutdown token. After splicing starts no byte is ever injected.
//!
//! The byte pump itself is in `pump`.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::{timeout, timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::metrics::{Metrics, SessionResult};
use crate::pgwire::{self, sqlstate, BackendReply, FirstPacket, StartupError};
use crate::pump::{pump_both, Side, Tally};
use crate::topology::{BackendId, Observation, Report, RoutingTable, Source};

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
}

/// Clients over `max_connections` that are read and answered 53300 at the same time; more are
/// closed without a word, so a flood cannot grow the task count without bound.
const REFUSALS_IN_FLIGHT: usize = 256;

/// What a connection was admitted as; the permit is held for the connection's life.
enum Admission {
    /// Counts toward `max_connections`.
    Client(OwnedSemaphorePermit),
    /// Only answered with the refusal's SQLSTATE (a `REFUSALS_IN_FLIGHT` permit).
    Refused(OwnedSemaphorePermit, Refusal),
}

/// Everything connection tasks share; cloned handles only, no locks.
pub struct Shared {
    pub routing: watch::Receiver<Arc<RoutingTable>>,
    pub settings: watch::Receiver<Arc<ProxySettings>>,
    /// To the elector: a backend a client could not be connected to.
    pub reports: mpsc::Sender<Report>,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the shutdown grace period ends: open sessions close.
    pub hard_stop: CancellationToken,
}

/// The accept loop.
pub struct Proxy {
    pub listener: TcpListener,
    pub shared: Arc<Shared>,
    /// `max_connections`; a reload resizes it.
    pub limit: Arc<Semaphore>,
    /// Cancelled at the start of a drain: stop accepting.
    pub stop_accepting: CancellationToken,
    /// Tracks connection tasks so the drain can wait for them.
    pub tracker: TaskTracker,
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
    pub async fn run(self) {
        let next_id = AtomicU64::new(1);
        let mut backoff = Duration::from_millis(10);
        let refusals = Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT));
        loop {
            let accepted = tokio::select! {
                () = self.stop_accepting.cancelled() => return,
                r = self.listener.accept() => r,
            };
            match accepted {
                Ok((socket, peer)) => {
                    backoff = Duration::from_millis(10);
                    let Some(admission) = self.admit(peer, &refusals) else { continue };
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    let span = tracing::debug_span!("conn", id, %peer);
                    let shared = Arc::clone(&self.shared);
                    self.tracker.spawn(handle(shared, socket, peer, admission).instrument(span));
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

/// One client connection, start to finish; counts its result.
async fn handle(shared: Arc<Shared>, client: TcpStream, peer: SocketAddr, admission: Admission) {
    let started = Instant::now();
    tune(&client);
    let settings = shared.settings.borrow().clone();
    let hard_stop = shared.hard_stop.clone();
    let mut conn = Conn { client, routing: shared.routing.clone(), settings, shared, backend: None, bytes: (0, 0) };
    let work = async {
        match admission {
            Admission::Client(_permit) => conn.serve().await,
            Admission::Refused(_permit, why) => conn.refuse_new(why).await,
        }
    };
    // The splice races `hard_stop` itself; this covers clients still in their startup phase.
    let result = tokio::select! {
        r = work => r,
        () = hard_stop.cancelled() => Some(SessionResult::Shutdown),
    };
    if let Some(result) = result {
        conn.shared.metrics.session_ended(result);
        if conn.settings.access_log {
            tracing::info!(
                target: "pgleader::access",
                client = %peer,
                backend = conn.backend.as_deref().unwrap_or("-"),
                bytes_up = conn.bytes.0,
                bytes_down = conn.bytes.1,
                duration_ms = started.elapsed().as_millis() as u64,
                result = result.as_str(),
                "session"
            );
        }
    }
}

/// TCP_NODELAY and keepalive: the proxy must not add latency, and dead peers must be noticed.
fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = TcpKeepalive::new().with_time(Duration::from_secs(60)).with_interval(Duration::from_secs(10));
    let _ = SockRef::from(stream).set_tcp_keepalive(&keepalive);
}

/// Why a client is refused before it is routed.
#[derive(Clone, Copy)]
enum Refusal {
    OverLimit,
    Address,
}

impl Refusal {
    fn result(self) -> SessionResult {
        match self {
            Refusal::OverLimit => SessionResult::RefusedLimit,
            Refusal::Address => SessionResult::RefusedAddress,
        }
    }
}

/// Why reading a client's packet ended without one.
enum ReadError {
    /// Closed before sending a byte: a TCP health probe.
    ClosedEmpty,
    Closed,
    Timeout,
    Io(io::Error),
    Protocol(StartupError),
}

/// A client connection.
struct Conn {
    client: TcpStream,
    routing: watch::Receiver<Arc<RoutingTable>>,
    settings: Arc<ProxySettings>,
    shared: Arc<Shared>,
    /// The backend the session was spliced to, for the access log.
    backend: Option<String>,
    /// Bytes spliced (client to backend, backend to client), for the access log.
    bytes: (u64, u64),
}

/// What the client has sent that must be replayed to each backend tried.
struct Hello {
    /// The client is waiting for the answer to an SSLRequest.
    ssl_request: bool,
    /// The StartupMessage (after an `N`), or empty while `ssl_request` is pending.
    startup: Vec<u8>,
}

impl Conn {
    /// `None`: nothing worth counting (a TCP probe).
    async fn serve(&mut self) -> Option<SessionResult> {
        let deadline = Instant::now() + self.settings.client_hello_timeout;
        let mut tried_gss = false;
        let (packet, raw) = loop {
            match self.read_packet(deadline).await {
                Ok((FirstPacket::GssEncRequest, _)) if !tried_gss => {
                    tried_gss = true;
                    if self.client.write_all(b"N").await.is_err() {
                        return Some(SessionResult::ClientError);
                    }
                }
                Ok(first) => break first,
                Err(e) => return self.read_failed(e).await,
            }
        };
        let hello = match packet {
            FirstPacket::CancelRequest { .. } => return Some(self.forward_cancel(&raw).await),
            FirstPacket::SslRequest => Hello { ssl_request: true, startup: Vec::new() },
            FirstPacket::Startup { .. } => Hello { ssl_request: false, startup: raw },
            FirstPacket::GssEncRequest => {
                return self.refuse(sqlstate::PROTOCOL_VIOLATION, "pgleader: GSSENCRequest sent twice").await;
            }
        };
        self.route(hello).await
    }

    /// Reads one first packet (exactly its bytes: the client waits for an answer after it).
    async fn read_packet(&mut self, deadline: Instant) -> Result<(FirstPacket, Vec<u8>), ReadError> {
        let mut buf = Vec::with_capacity(256);
        loop {
            match pgwire::parse_first_packet(&buf) {
                Ok(Some((packet, used))) => {
                    let pipelined = used < buf.len();
                    // Bytes after an SSL/GSS request would be processed as if they had been
                    // encrypted (CVE-2021-23214): refuse. After a StartupMessage they are replayed.
                    if pipelined && matches!(packet, FirstPacket::SslRequest | FirstPacket::GssEncRequest) {
                        return Err(ReadError::Protocol(StartupError::BadParams("data after an encryption request")));
                    }
                    return Ok((packet, buf));
                }
                Ok(None) => {}
                Err(e) => return Err(ReadError::Protocol(e)),
            }
            match timeout_at(deadline, self.client.read_buf(&mut buf)).await {
                Err(_) => return Err(ReadError::Timeout),
                Ok(Ok(0)) if buf.is_empty() => return Err(ReadError::ClosedEmpty),
                Ok(Ok(0)) => return Err(ReadError::Closed),
                Ok(Ok(_)) => {}
                Ok(Err(e)) if buf.is_empty() && e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(ReadError::ClosedEmpty)
                }
                Ok(Err(e)) => return Err(ReadError::Io(e)),
            }
        }
    }

    async fn read_failed(&mut self, e: ReadError) -> Option<SessionResult> {
        match e {
            ReadError::ClosedEmpty => {
                tracing::debug!("closed before sending anything (a TCP health check?)");
                None
            }
            ReadError::Closed => Some(SessionResult::ClientError),
            ReadError::Io(e) => {
                tracing::debug!(error = %e, "client connection failed during startup");
                Some(SessionResult::ClientError)
            }
            ReadError::Timeout => {
                tracing::debug!(timeout = ?self.settings.client_hello_timeout, "no startup packet in time");
                Some(SessionResult::ClientTimeout)
            }
            ReadError::Protocol(err) => {
                tracing::info!(error = %err, "refused a client that does not speak the PostgreSQL protocol");
                if !matches!(err, StartupError::DirectTls) {
                    self.send_error(err.sqlstate(), &format!("pgleader: {err}")).await;
                }
                Some(SessionResult::RefusedProtocol)
            }
        }
    }

    /// A client refused before routing (over `max_connections`, or outside `[proxy] allow`): its
    /// first packet is read and answered with the refusal's SQLSTATE, then the connection closes.
    /// Logged at DEBUG: under a flood, the metric and its alert speak, not one line per client.
    async fn refuse_new(&mut self, refusal: Refusal) -> Option<SessionResult> {
        let result = refusal.result();
        let (code, message) = match refusal {
            Refusal::OverLimit => (
                sqlstate::TOO_MANY_CONNECTIONS,
                "pgleader: too many client connections (max_connections reached); retry later",
            ),
            Refusal::Address => (
                sqlstate::INVALID_AUTHORIZATION,
                "pgleader: this client address is not allowed to connect (see [proxy] allow)",
            ),
        };
        let deadline = Instant::now() + self.settings.client_hello_timeout;
        match self.read_packet(deadline).await {
            Ok((FirstPacket::CancelRequest { .. }, _)) => Some(result),
            Ok((packet, _)) => {
                tracing::debug!(result = result.as_str(), "refused a client");
                self.refuse_after(packet, code, message).await;
                Some(result)
            }
            Err(e) => self.read_failed(e).await,
        }
    }

    /// Refuses a client whose first packet was already consumed.
    async fn refuse(&mut self, code: &str, message: &str) -> Option<SessionResult> {
        self.send_error(code, message).await;
        Some(SessionResult::RefusedProtocol)
    }

    /// Answers encryption requests with `N` until the StartupMessage, then sends the error.
    async fn refuse_after(&mut self, mut packet: FirstPacket, code: &str, message: &str) {
        let deadline = Instant::now() + self.settings.client_hello_timeout;
        for _ in 0..2 {
            if !matches!(packet, FirstPacket::SslRequest | FirstPacket::GssEncRequest) {
                break;
            }
            if self.client.write_all(b"N").await.is_err() {
                return;
            }
            match self.read_packet(deadline).await {
                Ok((next, _)) => packet = next,
                Err(ReadError::Protocol(e)) => return self.send_error(e.sqlstate(), &format!("pgleader: {e}")).await,
                Err(_) => return,
            }
        }
        self.send_error(code, message).await;
    }

    /// One FATAL ErrorResponse, then close; write errors are irrelevant at this point.
    async fn send_error(&mut self, code: &str, message: &str) {
        let _ = self.client.write_all(&pgwire::error_response(code, message)).await;
        let _ = self.client.shutdown().await;
    }

    /// Waits until the table has a leader, up to `deadline`; with `after_failure`, first waits
    /// for the table to change (the failed backend is being re-checked).
    async fn wait_for_leader(&mut self, deadline: Instant, after_failure: bool) -> Option<Arc<RoutingTable>> {
        if after_failure && timeout_at(deadline, self.routing.changed()).await.is_err() {
            return None;
        }
        let table = self.routing.borrow_and_update().clone();
        if table.leader.is_some() {
            return Some(table);
        }
        let metrics = &self.shared.metrics;
        metrics.clients_waiting.inc();
        let started = Instant::now();
        let found = timeout_at(deadline, self.routing.wait_for(|t| t.leader.is_some())).await;
        metrics.clients_waiting.dec();
        metrics.leader_wait.observe(started.elapsed().as_secs_f64());
        match found {
            Ok(Ok(table)) => Some(table.clone()),
            _ => None,
        }
    }

    /// Steps 3 and 4: find a leader that accepts this client, then splice.
    async fn route(&mut self, mut hello: Hello) -> Option<SessionResult> {
        let deadline = Instant::now() + self.settings.leader_wait_timeout;
        let mut after_failure = false;
        loop {
            let Some(table) = self.wait_for_leader(deadline, after_failure).await else {
                let reason = self.routing.borrow().reason.describe();
                tracing::info!(reason, "no leader within leader_wait_timeout; refusing the client");
                let message = format!(
                    "pgleader: no leader available after waiting {:?}: {reason}; retry shortly, and if this persists \
                     check the cluster (patronictl list) and GET /status on the pgleader admin port",
                    self.settings.leader_wait_timeout
                );
                let packet = if hello.ssl_request {
                    FirstPacket::SslRequest
                } else {
                    FirstPacket::Startup { minor: 0, params: vec![] }
                };
                self.refuse_after(packet, sqlstate::CANNOT_CONNECT_NOW, &message).await;
                return Some(SessionResult::NoLeader);
            };
            let Some(leader) = table.leader_view() else {
                // Cannot happen (decide lists its leader); waiting for the next table is safe.
                after_failure = true;
                continue;
            };
            let (id, address) = (leader.id, leader.address.clone());
            // Boxed: the connect phase's state is needed once, not for the session's whole life.
            match Box::pin(self.attempt(&address, &mut hello)).await {
                Attempt::Spliced(backend, tls) => {
                    drop(hello); // the replayed startup bytes are not needed while splicing
                    return Some(self.splice(backend, id, &address, tls).await);
                }
                Attempt::ClientGone => return Some(SessionResult::ClientError),
                Attempt::ClientRefused(result) => return Some(result),
                Attempt::BackendFailed(error) => {
                    tracing::info!(backend = %leader.name, %error, "leader did not take the client; retrying on the next route");
                    let report = Report {
                        backend: id,
                        observation: Observation::Lost { error },
                        at: Instant::now().into_std(),
                        latency: None,
                        source: Source::Client,
                    };
                    // Never block a client on the elector: if its queue is full, checks catch up.
                    let _ = self.shared.reports.try_send(report);
                    after_failure = true;
                }
            }
        }
    }

    /// One try at `address`: connect, replay the client's bytes, and vet the first reply.
    async fn attempt(&mut self, address: &str, hello: &mut Hello) -> Attempt {
        // Each attempt has its own connect_timeout; leader_wait_timeout bounds only the waiting.
        let limit = Instant::now() + self.settings.connect_timeout;
        let mut backend = match timeout_at(limit, TcpStream::connect(address)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Attempt::BackendFailed(format!("connect to {address}: {e}")),
            Err(_) => return Attempt::BackendFailed(format!("connect to {address}: timed out")),
        };
        tune(&backend);
        if hello.ssl_request {
            let request =
                8u32.to_be_bytes().into_iter().chain(pgwire::SSL_REQUEST_CODE.to_be_bytes()).collect::<Vec<_>>();
            let mut answer = [0u8; 1];
            let exchanged = timeout_at(limit, async {
                backend.write_all(&request).await?;
                backend.read_exact(&mut answer).await
            })
            .await;
            match exchanged {
                Ok(Ok(_)) if answer[0] == b'S' => {
                    if self.client.write_all(b"S").await.is_err() {
                        return Attempt::ClientGone;
                    }
                    return Attempt::Spliced(backend, true);
                }
                Ok(Ok(_)) if answer[0] == b'N' => {
                    // From here on this client is plaintext, whichever backend serves it.
                    if self.client.write_all(b"N").await.is_err() {
                        return Attempt::ClientGone;
                    }
                    hello.ssl_request = false;
                    let hello_deadline = Instant::now() + self.settings.client_hello_timeout;
                    match self.read_packet(hello_deadline).await {
                        Ok((FirstPacket::Startup { .. }, raw)) => hello.startup = raw,
                        Ok(_) => {
                            let message = "pgleader: expected a StartupMessage after the SSLRequest was answered N";
                            self.send_error(sqlstate::PROTOCOL_VIOLATION, message).await;
                            return Attempt::ClientRefused(SessionResult::RefusedProtocol);
                        }
                        Err(e) => {
                            return Attempt::ClientRefused(
                                self.read_failed(e).await.unwrap_or(SessionResult::ClientError),
                            )
                        }
                    }
                }
                Ok(Ok(_)) => {
                    return Attempt::BackendFailed(format!("{address} answered SSLRequest with {:?}", answer[0]))
                }
                Ok(Err(e)) => return Attempt::BackendFailed(format!("SSLRequest to {address}: {e}")),
                Err(_) => return Attempt::BackendFailed(format!("SSLRequest to {address}: no answer in time")),
            }
        }
        let mut reply = Vec::with_capacity(512);
        let vetted = timeout(self.settings.connect_timeout, async {
            backend.write_all(&hello.startup).await?;
            loop {
                match pgwire::classify_backend_reply(&reply) {
                    BackendReply::Incomplete => {
                        if backend.read_buf(&mut reply).await? == 0 {
                            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before answering"));
                        }
                    }
                    verdict => return Ok(verdict),
                }
            }
        })
        .await;
        match vetted {
            Ok(Ok(BackendReply::Proceed)) => {
                if self.client.write_all(&reply).await.is_err() {
                    return Attempt::ClientGone;
                }
                Attempt::Spliced(backend, false)
            }
            Ok(Ok(_)) => Attempt::BackendFailed(format!("{address} answered 57P03 (starting up or shutting down)")),
            Ok(Err(e)) => Attempt::BackendFailed(format!("startup at {address}: {e}")),
            Err(_) => Attempt::BackendFailed(format!("startup at {address}: no answer in time")),
        }
    }

    /// Step 4: splice until both sides close, the session is cut, or the grace period ends.
    async fn splice(&mut self, backend: TcpStream, id: BackendId, address: &str, tls: bool) -> SessionResult {
        let metrics = Arc::clone(&self.shared.metrics);
        let name = self.routing.borrow().backend(id).map(|b| b.name.clone()).unwrap_or_default();
        let active = metrics.sessions_active.with_label_values(&[&name]);
        active.inc();
        tracing::debug!(backend = %name, %address, tls, "spliced");
        // This session's totals, for the access log; the pump also feeds the global metric.
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let pump = pump_both(
            &self.client,
            &backend,
            Tally { global: &metrics.bytes_client_to_backend, session: &up },
            Tally { global: &metrics.bytes_backend_to_client, session: &down },
        );
        let outcome = tokio::select! {
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
            () = session_cut(&mut self.routing, id) => {
                tracing::info!(backend = %name, "session cut: its backend is no longer the leader");
                SessionResult::Cut
            }
            () = self.shared.hard_stop.cancelled() => SessionResult::Shutdown,
        };
        active.dec();
        self.backend = Some(name);
        self.bytes = (up.load(Ordering::Relaxed), down.load(Ordering::Relaxed));
        outcome
    }

    /// Forwards a CancelRequest to the current leader (sessions live only there); never answered.
    async fn forward_cancel(&mut self, raw: &[u8]) -> SessionResult {
        let leader = self.routing.borrow().leader_view().map(|b| b.address.clone());
        let Some(address) = leader else { return SessionResult::NoLeader };
        let sent = timeout(self.settings.connect_timeout, async {
            let mut backend = TcpStream::connect(&address).await?;
            backend.write_all(raw).await?;
            // Wait for the server to close: it has then read the request.
            let mut sink = [0u8; 64];
            while backend.read(&mut sink).await? > 0 {}
            io::Result::Ok(())
        })
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            tracing::info!(%address, "could not forward a cancel request to the leader");
        }
        SessionResult::CancelForwarded
    }
}

/// The outcome of one backend attempt.
enum Attempt {
    /// Connected and vetted; `true` when TLS now runs end to end.
    Spliced(TcpStream, bool),
    /// The client closed or failed while we were talking to the backend.
    ClientGone,
    /// The client's second packet was refused (already answered, if the protocol allows).
    ClientRefused(SessionResult),
    /// This backend did not take the client: report it and try the next route.
    BackendFailed(String),
}

/// Completes when the routing table no longer allows a session on `id` (DESIGN.md rule 3).
/// Cancel safe. Pending forever if the elector is gone (shutdown handles that case).
async fn session_cut(routing: &mut watch::Receiver<Arc<RoutingTable>>, id: BackendId) {
    loop {
        if !routing.borrow_and_update().session_allowed(id) {
            return;
        }
        if routing.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}
