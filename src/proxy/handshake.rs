//! The per-connection startup state machine: from the client's first byte to the moment the
//! client is *admitted* to a backend, or refused. Generic over the client stream and over the
//! way backends are reached ([`Connect`]), so unit tests drive it with `tokio::io::duplex` and
//! paused time; `proxy` runs it on TCP sockets.
//!
//! Phases (the steps that talk to a backend or relay its bytes are [`Phase`]s in errors and logs):
//! 1. `first_packet`: one first packet within `client_hello_timeout` (10,000-byte limit, parsed by
//!    `pgwire`). GSSENCRequest is answered `N` once; a CancelRequest is handed back to the caller
//!    ([`Outcome::Cancel`]); SSLRequest and StartupMessage are routed; garbage gets 08P01 (0A000
//!    for a protocol major version other than 3). A zero-byte connection is a TCP probe.
//! 2. `wait_leader`: wait (bounded by `leader_wait_timeout`) for a table with a leader. The client
//!    is watched while it waits: if it closes, the session ends at once
//!    ([`SessionResult::Abandoned`]) and no backend connection is ever opened for it. No leader in time: 57P03 with the reason
//!    (after an `N` for an SSLRequest, so the client can read it).
//! 3. `connect`, `ssl_answer`, `startup_after_n`, `first_reply`: one attempt at the leader's checked
//!    address (never a fresh name resolution), within `connect_timeout` per step. On plaintext the
//!    backend's first reply is vetted: refused, reset, silent, or 57P03 is never shown to the
//!    client — the backend is reported lost and the same bytes are replayed on the next route
//!    (DESIGN.md rule 7).
//! 4. Admission (DESIGN.md rule 8): the backend's first byte — its `S` or `N` to an SSLRequest,
//!    or its first reply to the StartupMessage — is relayed only if the *current* table still
//!    names that backend as the leader of the epoch it was chosen in. Otherwise the attempt is
//!    dropped silently and retried on the next route: the client has seen nothing. After a
//!    relayed `S` (TLS end to end) or the first reply, the session is admitted: a later change
//!    of leader is a cut, never a retry.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, timeout_at, Instant};

use crate::metrics::{Metrics, SessionResult};
use crate::pgwire::{self, sqlstate, BackendReply, FirstPacket, StartupError};
use crate::topology::{BackendId, Observation, Report, Route, RoutingTable, Source, Target};

use super::{ProxySettings, Sessions};

/// How the handshake reaches a backend: TCP in production, in-memory pipes in unit tests.
pub(crate) trait Connect {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send;
    /// A new connection to `address` (the caller bounds it with `connect_timeout`).
    fn connect(&self, address: SocketAddr) -> impl Future<Output = io::Result<Self::Stream>> + Send;

    /// A connection to `target` opened ahead of time (a spare, see `proxy::spares`), if one is
    /// ready; the handshake treats it as a fresh connect.
    fn spare(&self, _target: &Target) -> Option<Self::Stream> {
        None
    }

    /// A spare from [`Connect::spare`] failed before the client saw anything from it.
    fn spare_failed(&self) {}
}

/// The step of the handshake an error happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Connect,
    SslAnswer,
    StartupAfterN,
    FirstReply,
    Relay,
}

impl Phase {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Phase::Connect => "connect",
            Phase::SslAnswer => "ssl_answer",
            Phase::StartupAfterN => "startup_after_n",
            Phase::FirstReply => "first_reply",
            Phase::Relay => "relay",
        }
    }
}

/// Which peer an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peer {
    Client,
    Backend,
}

/// What went wrong.
#[derive(Debug)]
pub(crate) enum Cause {
    Io(io::Error),
    /// The peer closed the connection.
    Closed,
    /// The step's timeout passed.
    Timeout,
    /// The backend answered 57P03 (starting up or shutting down).
    CannotConnectNow,
    /// The backend answered an SSLRequest with neither `S` nor `N`.
    BadSslAnswer(u8),
    /// The client broke the protocol (already answered, when the protocol allows).
    Protocol(StartupError),
}

/// A failed step: which peer, in which phase, and why. Backend errors are retried on the next
/// route; client errors end the connection.
#[derive(Debug)]
pub(crate) struct HandshakeError {
    pub(crate) peer: Peer,
    pub(crate) phase: Phase,
    pub(crate) cause: Cause,
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let peer = match self.peer {
            Peer::Client => "client",
            Peer::Backend => "backend",
        };
        write!(f, "{peer} failed in {}: ", self.phase.as_str())?;
        match &self.cause {
            Cause::Io(e) => write!(f, "{e}"),
            Cause::Closed => f.write_str("connection closed"),
            Cause::Timeout => f.write_str("no answer in time"),
            Cause::CannotConnectNow => f.write_str("answered 57P03 (starting up or shutting down)"),
            Cause::BadSslAnswer(b) => write!(f, "answered the SSLRequest with byte {b:#04x}"),
            Cause::Protocol(e) => write!(f, "{e}"),
        }
    }
}

fn on_backend(phase: Phase, cause: Cause) -> HandshakeError {
    HandshakeError { peer: Peer::Backend, phase, cause }
}

fn on_client(phase: Phase, cause: Cause) -> HandshakeError {
    HandshakeError { peer: Peer::Client, phase, cause }
}

/// A client admitted to a backend: the backend's first byte has been relayed.
pub(crate) struct Admitted<B> {
    pub(crate) backend: B,
    pub(crate) id: BackendId,
    pub(crate) address: SocketAddr,
    /// TLS now runs end to end between client and backend.
    pub(crate) tls: bool,
}

/// How a handshake ended.
pub(crate) enum Outcome<B> {
    /// Splice from here. The `u32`: microseconds spent waiting on backends before admission,
    /// every attempt included (connects, the waits for an SSL answer and a first reply; not the
    /// waits for the client). Beside `Admitted`, not in it: `splice` keeps that for the whole
    /// session.
    Admitted(Admitted<B>, u32),
    /// A CancelRequest (its raw bytes); never answered.
    Cancel(Vec<u8>),
    /// Ended before any splice, already answered where the protocol allows; `None`: a TCP
    /// probe, not counted.
    Ended(Option<SessionResult>),
}

/// Why a client is refused before it is routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    OverLimit,
    Address,
}

impl Refusal {
    pub(crate) fn result(self) -> SessionResult {
        match self {
            Refusal::OverLimit => SessionResult::RefusedLimit,
            Refusal::Address => SessionResult::RefusedAddress,
        }
    }

    fn answer(self) -> (&'static str, &'static str) {
        match self {
            Refusal::OverLimit => (
                sqlstate::TOO_MANY_CONNECTIONS,
                "pgleader: too many client connections (max_connections reached); retry later",
            ),
            Refusal::Address => (
                sqlstate::INVALID_AUTHORIZATION,
                "pgleader: this client address is not allowed to connect (see [proxy] allow)",
            ),
        }
    }
}

/// Bytes a client may send while its startup is pending (normally none); more stay unread in
/// the socket and follow in order once the session is spliced.
const MAX_EARLY_BYTES: usize = pgwire::MAX_STARTUP_PACKET_LENGTH;

/// What the client has sent that must be replayed to each backend tried.
struct Hello {
    /// The client is waiting for the answer to an SSLRequest.
    ssl_request: bool,
    /// The StartupMessage (after an `N`: the one that followed), then any bytes the client sent
    /// before it was answered. Empty while `ssl_request` is pending.
    startup: Vec<u8>,
}

/// What the handshake needs from the world; handles only, no locks.
pub(crate) struct Context<'a, K> {
    /// Which listener the client came in on.
    pub(crate) route: Route,
    /// Open sessions (a read session goes to the replica with the fewest).
    pub(crate) sessions: &'a Sessions,
    pub(crate) routing: watch::Receiver<Arc<RoutingTable>>,
    pub(crate) settings: &'a ProxySettings,
    /// To the elector: a backend a client could not be connected to.
    pub(crate) reports: &'a mpsc::Sender<Report>,
    pub(crate) metrics: &'a Metrics,
    pub(crate) connector: &'a K,
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

/// What the client did while it was only being watched.
enum ClientEvent {
    /// Closed or failed: nobody is waiting for an answer any more.
    Gone,
    /// Sent bytes before being answered (kept in the early buffer).
    Data,
}

/// The handshake of one client connection.
pub(crate) struct Handshake<'a, C, K> {
    pub(crate) client: C,
    pub(crate) ctx: Context<'a, K>,
}

impl<C, K> Handshake<'_, C, K>
where
    C: AsyncRead + AsyncWrite + Unpin,
    K: Connect,
{
    /// Runs the handshake of an admitted client (one that holds a `max_connections` slot).
    /// Cancel safe only in that dropping it drops the connection attempt.
    pub(crate) async fn run(&mut self) -> Outcome<K::Stream> {
        let deadline = Instant::now() + self.ctx.settings.client_hello_timeout;
        let mut tried_gss = false;
        let (packet, raw) = loop {
            match self.read_packet(deadline).await {
                Ok((FirstPacket::GssEncRequest, _)) if !tried_gss => {
                    tried_gss = true;
                    if self.client.write_all(b"N").await.is_err() {
                        return Outcome::Ended(Some(SessionResult::ClientError));
                    }
                }
                Ok(first) => break first,
                Err(e) => return Outcome::Ended(self.read_failed(e).await),
            }
        };
        let hello = match packet {
            FirstPacket::CancelRequest { .. } => return Outcome::Cancel(raw),
            FirstPacket::SslRequest => Hello { ssl_request: true, startup: Vec::new() },
            FirstPacket::Startup { .. } => Hello { ssl_request: false, startup: raw },
            FirstPacket::GssEncRequest => {
                let message = "pgleader: GSSENCRequest sent twice";
                self.send_error(sqlstate::PROTOCOL_VIOLATION, message).await;
                return Outcome::Ended(Some(SessionResult::RefusedProtocol));
            }
        };
        self.route(hello).await
    }

    /// A client refused before routing (over `max_connections`, or outside `[proxy] allow`): its
    /// first packet is read and answered with the refusal's SQLSTATE, then the connection closes.
    /// Logged at DEBUG: under a flood, the metric and its alert speak, not one line per client.
    pub(crate) async fn refuse(&mut self, refusal: Refusal) -> Option<SessionResult> {
        let result = refusal.result();
        let (code, message) = refusal.answer();
        let deadline = Instant::now() + self.ctx.settings.client_hello_timeout;
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
                tracing::debug!(timeout = ?self.ctx.settings.client_hello_timeout, "no startup packet in time");
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

    /// Answers encryption requests with `N` until the StartupMessage, then sends the error.
    async fn refuse_after(&mut self, mut packet: FirstPacket, code: &str, message: &str) {
        let deadline = Instant::now() + self.ctx.settings.client_hello_timeout;
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

    /// Steps 2-4: find a leader that takes this client and admit it there.
    async fn route(&mut self, mut hello: Hello) -> Outcome<K::Stream> {
        let deadline = Instant::now() + self.ctx.settings.leader_wait_timeout;
        let mut after_failure = false;
        // After a spare has failed, this client gets fresh connections only.
        let mut spares_ok = true;
        let mut backend_wait = Duration::ZERO;
        loop {
            let waited = {
                let Self { client, ctx } = self;
                let (route, sessions) = (ctx.route, ctx.sessions);
                let wait = wait_for_target(&mut ctx.routing, route, sessions, ctx.metrics, deadline, after_failure);
                // A leader at hand wins over anything the client did: it is only watched while
                // it actually waits (a client that half-closes after its StartupMessage is still
                // served when there is a leader to serve it).
                tokio::select! {
                    biased;
                    target = wait => Ok(target),
                    event = watch_client(client, &mut hello) => Err(event),
                }
            };
            let target = match waited {
                Ok(Some(target)) => target,
                Ok(None) => return self.no_target(hello).await,
                Err(event) => match self.client_event(event, &hello).await {
                    Some(ended) => return ended,
                    None => continue,
                },
            };
            let spare = spares_ok.then(|| self.ctx.connector.spare(&target)).flatten();
            let from_spare = spare.is_some();
            let backend = match spare {
                Some(b) => b,
                None => match timed(&mut backend_wait, connect(&self.ctx, target.address)).await {
                    Ok(b) => b,
                    Err(e) => {
                        self.report_failed(target, &e);
                        after_failure = true;
                        continue;
                    }
                },
            };
            // Boxed: the attempt's state is needed once, not for the session's whole life.
            match Box::pin(self.attempt(backend, target, &mut hello, &mut backend_wait)).await {
                Ok(Some(admitted)) => return Outcome::Admitted(admitted, micros(backend_wait)),
                // The table moved on while we were connecting: nothing was shown to the client.
                Ok(None) => after_failure = false,
                // A spare the server closed (it timed out, or the server restarted) is not news
                // about the leader: retry at once on a fresh connection, reported if it fails
                // too. A spare that answers 57P03 or nothing in time is reported like a fresh one.
                Err(e) if e.peer == Peer::Backend && from_spare && matches!(e.cause, Cause::Closed | Cause::Io(_)) => {
                    tracing::debug!(error = %e, "a spare connection failed; retrying on a fresh one");
                    self.ctx.connector.spare_failed();
                    spares_ok = false;
                    after_failure = false;
                }
                Err(e) if e.peer == Peer::Backend => {
                    self.report_failed(target, &e);
                    after_failure = true;
                }
                Err(e) => return Outcome::Ended(Some(self.client_failed(e).await)),
            }
        }
    }

    /// What a client that acted while only being watched leads to: `Some` ends the handshake.
    async fn client_event(&mut self, event: ClientEvent, hello: &Hello) -> Option<Outcome<K::Stream>> {
        match event {
            ClientEvent::Gone => {
                tracing::debug!("the client left while waiting for a leader; no backend connection was opened");
                Some(Outcome::Ended(Some(SessionResult::Abandoned)))
            }
            ClientEvent::Data if hello.ssl_request => {
                // Bytes before the answer to an SSLRequest: refuse as PostgreSQL does (CVE-2021-23214).
                let e = StartupError::BadParams("data after an encryption request");
                let _ = self.client.write_all(b"N").await;
                self.send_error(e.sqlstate(), &format!("pgleader: {e}")).await;
                Some(Outcome::Ended(Some(SessionResult::RefusedProtocol)))
            }
            ClientEvent::Data => None,
        }
    }

    /// Nothing to route to within `leader_wait_timeout`: 57P03 with the reason (for the read-only
    /// listener: each replica's lag or state).
    async fn no_target(&mut self, hello: Hello) -> Outcome<K::Stream> {
        let waited = self.ctx.settings.leader_wait_timeout;
        let (message, result) = {
            let table = self.ctx.routing.borrow();
            let reason = table.reason.describe();
            match self.ctx.route {
                Route::Write => {
                    tracing::info!(reason, "no leader within leader_wait_timeout; refusing the client");
                    let message = format!(
                        "pgleader: no leader available after waiting {waited:?}: {reason}; retry shortly, and if this \
                         persists check the cluster (patronictl list) and GET /status on the pgleader admin port"
                    );
                    let lease = table.reason.is_lease();
                    (message, if lease { SessionResult::NoLease } else { SessionResult::NoLeader })
                }
                Route::Read => {
                    let replicas = table.read_refusal();
                    tracing::info!(replicas, "no replica for a read-only session within leader_wait_timeout; refusing");
                    let fallback = match table.read.map(|r| r.fallback) {
                        Some(crate::topology::read::ReadFallback::Leader) => format!(" and no leader ({reason})"),
                        _ => String::new(),
                    };
                    let message = format!(
                        "pgleader: no server for read-only sessions after waiting {waited:?}: {replicas}{fallback}; \
                         retry shortly, or use the main port; see GET /status on the pgleader admin port"
                    );
                    (message, SessionResult::NoReplica)
                }
            }
        };
        let packet =
            if hello.ssl_request { FirstPacket::SslRequest } else { FirstPacket::Startup { minor: 0, params: vec![] } };
        self.refuse_after(packet, sqlstate::CANNOT_CONNECT_NOW, &message).await;
        Outcome::Ended(Some(result))
    }

    /// Tells the elector that a backend did not take a client (rule 7): it is not routable until
    /// re-checked on a new connection. Never blocks: with a full queue, checks catch up.
    fn report_failed(&self, target: Target, e: &HandshakeError) {
        let name = self.ctx.routing.borrow().backend(target.id).map(|b| b.name.clone()).unwrap_or_default();
        let address = target.address;
        tracing::info!(backend = %name, %address, error = %e, "backend did not take the client; retrying on the next route");
        let report = Report {
            backend: target.id,
            observation: Observation::Lost { error: format!("a client could not be connected: {e}") },
            at: Instant::now().into_std(),
            latency: None,
            source: Source::Client,
        };
        let _ = self.ctx.reports.try_send(report);
    }

    /// A client failure during an attempt: answered already where needed; counted.
    async fn client_failed(&mut self, e: HandshakeError) -> SessionResult {
        match e.cause {
            Cause::Protocol(err) => {
                self.send_error(err.sqlstate(), &format!("pgleader: {err}")).await;
                SessionResult::RefusedProtocol
            }
            Cause::Timeout => SessionResult::ClientTimeout,
            _ => {
                tracing::debug!(error = %e, "client failed while being connected");
                SessionResult::ClientError
            }
        }
    }

    /// Does the current table still route this client to `target` (rules 8 and 10)?
    fn admits(&self, target: &Target) -> bool {
        self.ctx.routing.borrow().admits_route(self.ctx.route, target, Instant::now().into_std())
    }

    /// One try at a connected backend: replay the client's bytes, vet the first reply, and admit
    /// the client if the table still allows it. `Ok(None)`: the table moved on; retry.
    async fn attempt(
        &mut self,
        mut backend: K::Stream,
        target: Target,
        hello: &mut Hello,
        backend_wait: &mut Duration,
    ) -> Result<Option<Admitted<K::Stream>>, HandshakeError> {
        let Target { id, address, .. } = target;
        let connect_timeout = self.ctx.settings.connect_timeout;
        if hello.ssl_request {
            let limit = Instant::now() + connect_timeout;
            let mut request = 8u32.to_be_bytes().to_vec();
            request.extend_from_slice(&pgwire::SSL_REQUEST_CODE.to_be_bytes());
            let mut answer = [0u8; 1];
            let exchanged = timed(
                backend_wait,
                timeout_at(limit, async {
                    backend.write_all(&request).await?;
                    backend.read_exact(&mut answer).await
                }),
            )
            .await;
            match exchanged {
                Ok(Ok(_)) if matches!(answer[0], b'S' | b'N') => {}
                Ok(Ok(_)) => return Err(on_backend(Phase::SslAnswer, Cause::BadSslAnswer(answer[0]))),
                Ok(Err(e)) => return Err(on_backend(Phase::SslAnswer, io_cause(e))),
                Err(_) => return Err(on_backend(Phase::SslAnswer, Cause::Timeout)),
            }
            if !self.admits(&target) {
                return Ok(None);
            }
            self.client.write_all(&answer).await.map_err(|e| on_client(Phase::Relay, Cause::Io(e)))?;
            if answer[0] == b'S' {
                return Ok(Some(Admitted { backend, id, address, tls: true }));
            }
            // `N`: from here on this client is plaintext, whichever backend serves it.
            hello.ssl_request = false;
            let hello_deadline = Instant::now() + self.ctx.settings.client_hello_timeout;
            match self.read_packet(hello_deadline).await {
                Ok((FirstPacket::Startup { .. }, raw)) => hello.startup = raw,
                Ok(_) => {
                    let e = StartupError::BadParams("expected a StartupMessage after the SSLRequest was answered N");
                    return Err(on_client(Phase::StartupAfterN, Cause::Protocol(e)));
                }
                Err(ReadError::Protocol(e)) => return Err(on_client(Phase::StartupAfterN, Cause::Protocol(e))),
                Err(ReadError::Timeout) => return Err(on_client(Phase::StartupAfterN, Cause::Timeout)),
                Err(ReadError::Io(e)) => return Err(on_client(Phase::StartupAfterN, Cause::Io(e))),
                Err(ReadError::Closed | ReadError::ClosedEmpty) => {
                    return Err(on_client(Phase::StartupAfterN, Cause::Closed))
                }
            }
        }
        let limit = Instant::now() + connect_timeout;
        let mut reply = Vec::with_capacity(512);
        let vetted = timed(
            backend_wait,
            timeout_at(limit, async {
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
            }),
        )
        .await;
        match vetted {
            Ok(Ok(BackendReply::Proceed)) => {}
            Ok(Ok(_)) => return Err(on_backend(Phase::FirstReply, Cause::CannotConnectNow)),
            Ok(Err(e)) => return Err(on_backend(Phase::FirstReply, io_cause(e))),
            Err(_) => return Err(on_backend(Phase::FirstReply, Cause::Timeout)),
        }
        if !self.admits(&target) {
            return Ok(None);
        }
        self.client.write_all(&reply).await.map_err(|e| on_client(Phase::Relay, Cause::Io(e)))?;
        Ok(Some(Admitted { backend, id, address, tls: false }))
    }
}

/// Awaits `step`, adding the time it took to `total`.
async fn timed<T>(total: &mut Duration, step: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let out = step.await;
    *total += started.elapsed();
    out
}

/// `d` in whole microseconds, saturating (71 minutes).
pub(crate) fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

fn io_cause(e: io::Error) -> Cause {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        Cause::Closed
    } else {
        Cause::Io(e)
    }
}

/// Connects to `address` within `connect_timeout`.
async fn connect<K: Connect>(ctx: &Context<'_, K>, address: SocketAddr) -> Result<K::Stream, HandshakeError> {
    match tokio::time::timeout(ctx.settings.connect_timeout, ctx.connector.connect(address)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(on_backend(Phase::Connect, Cause::Io(e))),
        Err(_) => Err(on_backend(Phase::Connect, Cause::Timeout)),
    }
}

/// Waits until the table has a target for `route` with a checked address (the leader, or a
/// replica in bounds), up to `deadline`; with `after_failure`, first waits for the table to
/// change (the failed backend is being re-checked). A closed table (the elector is gone) counts
/// as "nothing to route to" until the deadline, never as a reason to spin. Cancel safe.
async fn wait_for_target(
    routing: &mut watch::Receiver<Arc<RoutingTable>>,
    route: Route,
    sessions: &Sessions,
    metrics: &Metrics,
    deadline: Instant,
    after_failure: bool,
) -> Option<Target> {
    let target = |t: &RoutingTable| t.target(route, |id| sessions.reads(id), Instant::now().into_std());
    if !after_failure {
        if let Some(found) = target(&routing.borrow_and_update()) {
            return Some(found);
        }
    }
    let _waiting = Waiting::start(metrics);
    loop {
        match timeout_at(deadline, routing.changed()).await {
            Err(_) => return None,
            Ok(Err(_)) => {
                // No elector: nothing will ever change. Hold the client to its deadline.
                sleep_until(deadline).await;
                return None;
            }
            Ok(Ok(())) => {
                if let Some(found) = target(&routing.borrow_and_update()) {
                    return Some(found);
                }
            }
        }
    }
}

/// Raises `pgleader_clients_waiting` while it lives and records the wait when dropped, however
/// the wait ends (a leader, the deadline, the client leaving, a cancelled task).
struct Waiting<'a> {
    metrics: &'a Metrics,
    since: Instant,
}

impl<'a> Waiting<'a> {
    fn start(metrics: &'a Metrics) -> Waiting<'a> {
        metrics.clients_waiting.inc();
        Waiting { metrics, since: Instant::now() }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.metrics.clients_waiting.dec();
        self.metrics.leader_wait.observe(self.since.elapsed().as_secs_f64());
    }
}

/// Completes when the client closes or fails, or sends bytes, while it is only being watched
/// (it should be waiting for our answer). Bytes are kept at the end of `hello.startup` to be
/// replayed in order; past `MAX_EARLY_BYTES` it stops reading (the rest waits in the socket and
/// follows once spliced). Cancel safe: `read_buf` loses nothing when dropped.
async fn watch_client<C: AsyncRead + Unpin>(client: &mut C, hello: &mut Hello) -> ClientEvent {
    if hello.startup.len() >= MAX_EARLY_BYTES + pgwire::MAX_STARTUP_PACKET_LENGTH {
        return std::future::pending().await;
    }
    match client.read_buf(&mut hello.startup).await {
        Ok(0) | Err(_) => ClientEvent::Gone,
        Ok(_) => ClientEvent::Data,
    }
}

/// Forwards a CancelRequest to every address in `targets` (the backends that hold sessions of
/// this pgleader: the session to cancel can only be on one of them), each within `limit`.
/// `CancelForwarded` if at least one backend read it, `CancelFailed` if none could,
/// `CancelUnmatched` if no backend holds a session. Never answered, as PostgreSQL does.
pub(crate) async fn forward_cancel<K: Connect>(
    connector: &K,
    raw: &[u8],
    targets: &[SocketAddr],
    limit: Duration,
) -> SessionResult {
    if targets.is_empty() {
        tracing::debug!("cancel request for no session: no backend holds a session of this pgleader");
        return SessionResult::CancelUnmatched;
    }
    let sends = targets.iter().map(|&address| async move {
        let sent = tokio::time::timeout(limit, async {
            let mut backend = connector.connect(address).await?;
            backend.write_all(raw).await?;
            // Wait for the server to close: it has then read the request.
            let mut sink = [0u8; 64];
            while backend.read(&mut sink).await? > 0 {}
            io::Result::Ok(())
        })
        .await;
        let ok = matches!(sent, Ok(Ok(())));
        if !ok {
            tracing::info!(%address, "could not forward a cancel request");
        }
        ok
    });
    let delivered = futures_util::future::join_all(sends).await.into_iter().filter(|ok| *ok).count();
    if delivered > 0 {
        SessionResult::CancelForwarded
    } else {
        SessionResult::CancelFailed
    }
}

#[cfg(test)]
mod tests;
