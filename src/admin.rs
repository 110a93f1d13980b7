//! The admin HTTP server (hyper 1, HTTP/1.1), separate from the proxy listener.
//!
//! Endpoints (GET only):
//! - `/healthz`: liveness, 200 while the process and its event loop answer.
//! - `/readyz`: readiness, 200 when a leader is routable and pgleader is not draining; else 503
//!   with the reason as the body.
//! - `/readyz/read`: the read-only listener's readiness, 200 while a read session can be served
//!   (a replica in bounds, or the leader under `fallback = "leader"`); else 503 with the reason;
//!   404 without `[read_only]`.
//! - `/status`: JSON of the routing table: `leader`, `reason`, `epoch`, `draining`,
//!   `config_generation`, and per backend its role, routability, timeline, system identifier,
//!   check counters and last error. No secrets are ever part of it.
//! - `/metrics`: the Prometheus text format.
//! - `/`: an HTML status page (the HAProxy stats page equivalent), rendered on the server from the
//!   same snapshot as `/status` and refreshing itself; see `admin/page.rs`.
//! - `POST /reload`: re-read the config file; loopback peers only.
//!
//! Readiness is derived (table has a leader, drain token not cancelled), never stored. Handlers
//! hold only read-only handles; the server runs on the main runtime, and each connection is raced
//! against the stop token so a drain ends cleanly.
//!
//! In production the admin port listens on the node's tailnet address, so a slow or flooding
//! HTTP client must not be able to hold it:
//! - a request's headers must arrive within [`HEADER_READ_TIMEOUT`] (hyper's header timer, which
//!   also closes a kept-alive connection idle that long);
//! - at most [`MAX_CONNECTIONS`] connections are open at once. At the cap a new connection takes
//!   the slot of the oldest one with no request being handled (it is closed: an idle or
//!   slow-headers client), so a flood of idle sockets cannot keep `/readyz` from a Nomad check;
//!   when every connection has a request in flight, the new one is closed at once. Both are
//!   logged at DEBUG with running totals;
//! - a failed `accept` (EMFILE, ...) backs off from 10 ms doubling to 1 s, raced with `stop`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::topology::{Route, RoutingTable};

/// A reload request from `POST /reload`: the reply is a summary or the error.
pub type AdminReload = oneshot::Sender<Result<String, String>>;

/// What the handlers read.
pub struct AdminState {
    pub routing: watch::Receiver<Arc<RoutingTable>>,
    pub metrics: Arc<Metrics>,
    /// Cancelled when a drain starts: readiness turns 503.
    pub draining: CancellationToken,
    /// Increases with every applied reload.
    pub config_generation: Arc<AtomicU64>,
    /// To the supervisor, which re-reads the config file.
    pub reload: mpsc::Sender<AdminReload>,
    /// The read-only listener's address, with `[read_only]`.
    pub read_only_listen: Option<SocketAddr>,
}

/// The admin listener's accept loop.
pub struct Admin {
    pub listener: TcpListener,
    pub state: Arc<AdminState>,
    /// Stops the server (the last step of shutdown).
    pub stop: CancellationToken,
}

/// How long a client may take to send a request's headers (and how long a kept-alive connection
/// may sit idle): longer than Prometheus' scrape interval (5 s in `deploy/prometheus`), so its
/// kept-alive connection is reused.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Admin connections open at once. Prometheus, the Nomad check and an operator need a handful.
pub const MAX_CONNECTIONS: usize = 64;
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

impl Admin {
    /// Serves until `stop` is cancelled. Cancel safe.
    pub async fn run(self) {
        let slots = Arc::new(Slots::new(MAX_CONNECTIONS));
        let mut backoff = ACCEPT_BACKOFF_MIN;
        loop {
            let accepted = tokio::select! {
                () = self.stop.cancelled() => return,
                r = self.listener.accept() => r,
            };
            let (stream, peer) = match accepted {
                Ok(a) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    a
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "admin accept failed");
                    tokio::select! {
                        () = self.stop.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            };
            let Some(slot) = slots.take(peer) else { continue };
            let state = Arc::clone(&self.state);
            let stop = self.stop.clone();
            tokio::spawn(async move {
                let busy = Arc::clone(&slot.busy);
                let service = hyper::service::service_fn(move |req| {
                    let state = Arc::clone(&state);
                    let in_flight = InFlight::new(&busy);
                    async move {
                        let rsp = handle(&state, &req, peer).await;
                        drop(in_flight);
                        Ok::<_, Infallible>(rsp)
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    r = conn => if let Err(e) = r { tracing::debug!(%peer, error = %e, "admin connection closed") },
                    () = slot.evicted.cancelled() => {}
                    () = stop.cancelled() => {}
                }
                drop(slot);
            });
        }
    }
}

/// The open admin connections, in accept order, for the cap.
struct Slots {
    max: usize,
    open: Mutex<BTreeMap<u64, (Arc<AtomicUsize>, CancellationToken)>>,
    next_id: AtomicU64,
    /// Running totals for the DEBUG lines.
    evicted: AtomicU64,
    refused: AtomicU64,
}

/// One open connection's place in [`Slots`]; dropping it (when the connection ends) frees it.
struct Slot {
    id: u64,
    slots: Arc<Slots>,
    /// Requests being handled on this connection: a connection with one is never evicted.
    busy: Arc<AtomicUsize>,
    /// Cancelled when a newer connection takes this slot.
    evicted: CancellationToken,
}

impl Slots {
    fn new(max: usize) -> Slots {
        Slots {
            max: max.max(1),
            open: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// A slot for a new connection from `peer`: a free one, or the oldest idle connection's
    /// (which is closed); `None` when every connection has a request in flight.
    fn take(self: &Arc<Slots>, peer: SocketAddr) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if open.len() >= self.max {
            let idle = open.iter().find(|(_, (busy, _))| busy.load(Ordering::SeqCst) == 0).map(|(id, _)| *id);
            match idle.and_then(|id| open.remove(&id)) {
                Some((_, evicted)) => {
                    evicted.cancel();
                    let total = self.evicted.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::debug!(%peer, max = self.max, evicted_total = total,
                        "admin connections at the cap: closed the oldest idle one for this one");
                }
                None => {
                    let total = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::debug!(%peer, max = self.max, refused_total = total,
                        "admin connections at the cap, every one busy: closed this one at once");
                    return None;
                }
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (busy, evicted) = (Arc::new(AtomicUsize::new(0)), CancellationToken::new());
        open.insert(id, (Arc::clone(&busy), evicted.clone()));
        Some(Slot { id, slots: Arc::clone(self), busy, evicted })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&self.id);
    }
}

/// Counts a request as being handled while it lives (also when its future is dropped).
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(busy: &Arc<AtomicUsize>) -> InFlight {
        busy.fetch_add(1, Ordering::SeqCst);
        InFlight(Arc::clone(busy))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Routes one request; tests call it without a socket through [`route`] and [`reload`].
pub async fn handle(state: &AdminState, req: &Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/reload") => reload(state, peer).await,
        (method, path) => route(state, method, path),
    }
}

/// `POST /reload`: re-reads the config file. Mutating, so loopback peers only: the admin port may
/// listen on a routable address for Prometheus and Nomad checks.
pub async fn reload(state: &AdminState, peer: SocketAddr) -> Response<Full<Bytes>> {
    if !peer.ip().to_canonical().is_loopback() {
        return text(StatusCode::FORBIDDEN, "forbidden: /reload is accepted from loopback only; use SIGHUP\n");
    }
    let (tx, rx) = oneshot::channel();
    if state.reload.send(tx).await.is_err() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    match rx.await {
        Ok(Ok(summary)) => text(StatusCode::OK, &format!("reloaded: {summary}\n")),
        Ok(Err(e)) => {
            text(StatusCode::BAD_REQUEST, &format!("reload rejected, the previous configuration stays: {e}\n"))
        }
        Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
    }
}

/// `/readyz/read`: can the read-only listener serve a session now?
fn read_ready(state: &AdminState) -> Response<Full<Bytes>> {
    let table = state.routing.borrow().clone();
    if table.read.is_none() {
        return text(StatusCode::NOT_FOUND, "no [read_only] listener is configured\n");
    }
    if state.draining.is_cancelled() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "not ready: draining (shutting down)\n");
    }
    let now = tokio::time::Instant::now().into_std();
    match table.target(Route::Read, |_| 0, now).and_then(|t| table.backend(t.id)) {
        Some(b) if table.leader == Some(b.id) => {
            text(StatusCode::OK, &format!("ready: no replica in bounds, fallback to the leader {}\n", b.name))
        }
        Some(b) => text(StatusCode::OK, &format!("ready: replica {} in bounds\n", b.name)),
        None => text(StatusCode::SERVICE_UNAVAILABLE, &format!("not ready: {}\n", table.read_refusal())),
    }
}

/// The read-only endpoints.
pub fn route(state: &AdminState, method: &Method, path: &str) -> Response<Full<Bytes>> {
    if path == "/reload" {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed: use POST /reload\n");
    }
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            let table = state.routing.borrow().clone();
            match (state.draining.is_cancelled(), table.leader_view()) {
                (true, _) => text(StatusCode::SERVICE_UNAVAILABLE, "not ready: draining (shutting down)\n"),
                (false, Some(leader)) => text(StatusCode::OK, &format!("ready: leader {}\n", leader.name)),
                (false, None) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("not ready: no leader: {}\n", table.reason.describe()),
                ),
            }
        }
        "/readyz/read" => read_ready(state),
        "/status" => with_type(StatusCode::OK, status_json(state), "application/json"),
        "/" => with_type(StatusCode::OK, crate::admin::page::render(&snapshot(state)), "text/html; charset=utf-8"),
        "/metrics" => with_type(StatusCode::OK, state.metrics.encode(), "text/plain; version=0.0.4"),
        _ => text(StatusCode::NOT_FOUND, "not found: try /status, /metrics, /healthz or /readyz\n"),
    }
}

/// The `/status` document.
pub fn status_json(state: &AdminState) -> Vec<u8> {
    let mut body =
        serde_json::to_vec_pretty(&snapshot(state)).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}").into_bytes());
    body.push(b'\n');
    body
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    with_type(status, body.as_bytes().to_vec(), "text/plain; charset=utf-8")
}

fn with_type(status: StatusCode, body: Vec<u8>, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    rsp
}

mod page;
mod status;

pub use status::{snapshot, Status};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{decide, Backend, BackendId, BackendState, Observation, Policy, Probe};
    use std::time::{Duration, Instant};

    fn state_with(table: RoutingTable) -> AdminState {
        let (_tx, rx) = watch::channel(Arc::new(table));
        AdminState {
            routing: rx,
            metrics: Arc::new(Metrics::new(&["a".to_owned()])),
            draining: CancellationToken::new(),
            config_generation: Arc::new(AtomicU64::new(1)),
            reload: mpsc::channel(1).0,
            read_only_listen: None,
        }
    }

    fn with_leader() -> RoutingTable {
        let now = Instant::now();
        let address = "127.0.0.1:5432".parse().unwrap();
        let probe = Probe { address, in_recovery: false, timeline: Some(3), system_id: Some(u64::MAX), wal: None };
        let backends = [Backend {
            id: BackendId(0),
            name: "a".into(),
            address: "127.0.0.1:5432".into(),
            member: "a".into(),
            verify_conn_url: true,
            state: BackendState::default().observe(&Observation::Checked(probe), now),
        }];
        let policy = Policy { rise: 1, fall: 3, stale_after: Duration::from_secs(10), fence: None, read: None };
        decide(&RoutingTable::initial(), &backends, None, &policy, now)
    }

    fn body(rsp: Response<Full<Bytes>>) -> (StatusCode, String) {
        use http_body_util::BodyExt;
        let status = rsp.status();
        let bytes = block_on(rsp.into_body().collect()).unwrap().to_bytes();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    #[test]
    fn readiness_follows_leader_and_drain() {
        let s = state_with(RoutingTable::initial());
        let (code, text) = body(route(&s, &Method::GET, "/readyz"));
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(text.contains("no leader"), "{text}");
        let s = state_with(with_leader());
        assert_eq!(body(route(&s, &Method::GET, "/readyz")).0, StatusCode::OK);
        s.draining.cancel();
        let (code, text) = body(route(&s, &Method::GET, "/readyz"));
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(text.contains("draining"));
        assert_eq!(body(route(&s, &Method::GET, "/healthz")).0, StatusCode::OK);
    }

    #[test]
    fn status_and_page_show_the_etcd_view_with_fencing() {
        use crate::topology::lease::{LeaderLease, LeaseEvent, LeaseRead, LeaseView, MemberEntry, PatroniConfig};
        use crate::topology::{FenceMode, FencePolicy};
        let now = Instant::now();
        let address = "127.0.0.1:5432".parse().unwrap();
        let probe = Probe { address, in_recovery: false, timeline: Some(3), system_id: Some(7), wal: None };
        let backends = [Backend {
            id: BackendId(0),
            name: "a".into(),
            address: "127.0.0.1:5432".into(),
            member: "node-a".into(),
            verify_conn_url: true,
            state: BackendState::default().observe(&Observation::Checked(probe), now),
        }];
        let read = LeaseRead {
            read_start: now,
            revision: 42,
            endpoint: "http://e:2379".into(),
            leader: Some(LeaderLease { member: "node-a".into(), remaining: Some(Duration::from_secs(20)) }),
            patroni: Some(PatroniConfig { failsafe_mode: true, pause: true, ..Default::default() }),
            members: vec![MemberEntry {
                name: "node-a".into(),
                conn_url: Some("postgres://127.0.0.1:5432/postgres".into()),
            }],
        };
        let view = LeaseView::default().observe(&LeaseEvent::Read(read), Duration::from_secs(3));
        let fence = Some(FencePolicy { mode: FenceMode::Enforce, max_staleness: Duration::from_secs(3) });
        let policy = Policy { rise: 1, fall: 3, stale_after: Duration::from_secs(10), fence, read: None };
        let table = decide(&RoutingTable::initial(), &backends, Some(&view), &policy, now);
        let s = state_with(table);
        let (_, text) = body(route(&s, &Method::GET, "/status"));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["leader"], "a");
        let e = &v["etcd"];
        assert_eq!((e["mode"].as_str(), e["leader_member"].as_str()), (Some("enforce"), Some("node-a")));
        assert_eq!(e["confirmation"]["revision"], 42);
        assert!(e["confirmation"]["valid_for_ms"].as_i64().unwrap() <= 3000);
        assert_eq!((e["paused"].as_bool(), e["failsafe_fallback"].as_bool()), (Some(true), Some(false)));
        assert_eq!(v["backends"][0]["member"], "node-a");
        assert_eq!(v["backends"][0]["resolved_address"], "127.0.0.1:5432");
        let (_, html) = body(route(&s, &Method::GET, "/"));
        assert!(html.contains("Leader lease (etcd, enforce mode)") && html.contains("paused"), "{html}");
        let plain = state_with(with_leader());
        let (_, text) = body(route(&plain, &Method::GET, "/status"));
        assert!(!text.contains("\"etcd\""), "no etcd section without [etcd]");
    }

    #[test]
    fn status_is_json_with_backends() {
        let s = state_with(with_leader());
        let (code, text) = body(route(&s, &Method::GET, "/status"));
        assert_eq!(code, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["leader"], "a");
        assert_eq!(v["backends"][0]["role"], "primary");
        assert_eq!(v["backends"][0]["timeline"], 3);
        assert_eq!(v["backends"][0]["system_identifier"], u64::MAX.to_string());
        assert_eq!(v["config_generation"], 1);
        assert_eq!(v["backends"][0]["sessions_active"], 0);
        assert_eq!(v["events"].as_array().unwrap().len(), 0);
        let (code, html) = body(route(&s, &Method::GET, "/"));
        assert_eq!(code, StatusCode::OK);
        assert!(html.contains("Leader: a") && html.contains("127.0.0.1:5432"), "{html}");
    }

    #[tokio::test]
    async fn reload_is_refused_from_non_loopback_peers() {
        let s = state_with(RoutingTable::initial());
        let remote: SocketAddr = "100.83.150.39:40000".parse().unwrap();
        let rsp = reload(&s, remote).await;
        let (code, text) = tokio::task::spawn_blocking(move || body(rsp)).await.unwrap();
        assert_eq!(code, StatusCode::FORBIDDEN, "{text}");
        let (tx, mut rx) = mpsc::channel::<AdminReload>(1);
        let s = AdminState { reload: tx, ..s };
        tokio::spawn(async move {
            if let Some(reply) = rx.recv().await {
                let _ = reply.send(Err("bad key".into()));
            }
        });
        let rsp = reload(&s, "127.0.0.1:1".parse().unwrap()).await;
        let (code, text) = tokio::task::spawn_blocking(move || body(rsp)).await.unwrap();
        assert_eq!(code, StatusCode::BAD_REQUEST);
        assert!(text.contains("bad key"));
    }

    #[test]
    fn at_the_cap_a_new_connection_takes_the_oldest_idle_slot_or_is_refused() {
        let slots = Arc::new(Slots::new(2));
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let (a, b) = (slots.take(peer).unwrap(), slots.take(peer).unwrap());
        let busy_a = InFlight::new(&a.busy);
        let c = slots.take(peer).expect("b is idle: c takes its slot");
        assert!(b.evicted.is_cancelled() && !a.evicted.is_cancelled(), "the idle one is closed, not the busy one");
        let busy_c = InFlight::new(&c.busy);
        assert!(slots.take(peer).is_none(), "every connection busy: the new one is refused");
        assert_eq!((slots.evicted.load(Ordering::Relaxed), slots.refused.load(Ordering::Relaxed)), (1, 1));
        drop(b);
        assert_eq!(slots.open.lock().unwrap().len(), 2, "an evicted slot is already free");
        drop(busy_a);
        let d = slots.take(peer).expect("a is idle again");
        assert!(a.evicted.is_cancelled());
        drop((a, c, d, busy_c));
        assert!(slots.open.lock().unwrap().is_empty(), "every ended connection frees its slot");
    }

    #[test]
    fn unknown_paths_and_methods() {
        let s = state_with(RoutingTable::initial());
        assert_eq!(body(route(&s, &Method::GET, "/nope")).0, StatusCode::NOT_FOUND);
        assert_eq!(body(route(&s, &Method::DELETE, "/status")).0, StatusCode::METHOD_NOT_ALLOWED);
        let (code, text) = body(route(&s, &Method::GET, "/metrics"));
        assert_eq!(code, StatusCode::OK);
        assert!(text.contains("pgleader_split_brain 0"));
    }
}
