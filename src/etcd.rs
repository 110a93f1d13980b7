//! The etcd reader (issue 11): reads Patroni's keys of one scope from etcd and reports what it
//! saw as [`EtcdReport`]s. It decides nothing: whether a read confirms a backend, and until
//! when, is the pure decision's business (DESIGN.md rule 9). It never writes to etcd.
//!
//! The task ([`EtcdWatcher::run`]) runs two loops that never wait for one another:
//! - **reads**: one at a time, every `interval` (every `fast_interval` while the routing table
//!   has no leader, and at once when the leader disappears, as `health` does), and at once after
//!   a watch event. One read is one read-only txn (leader key, `config`, `members/`) at a single
//!   revision, linearizable (never serializable), then LeaseTimeToLive of the leader key's lease.
//!   `timeout` bounds the whole attempt across endpoints: an endpoint that fails is left for the
//!   next at once, the round starts again after a short pause while time is left, and the one
//!   that answered is tried first next time. Each endpoint may spend at most its share of what
//!   is left (left / endpoints not yet tried; the last one all of it), so one frozen member that
//!   accepts connections and never answers cannot eat the budget of every read. A member
//!   without a raft leader answers "no leader" at once (require-leader). Authenticating, when a
//!   token is needed, comes first and has its own 5 s bound.
//! - **the watch** of the leader key, from the revision after the latest successful read's, with
//!   require-leader semantics (see `etcd/gateway.rs`). Each event is reported at once and wakes
//!   the reader. A watch that cannot be opened, fails, is cancelled (no leader, compacted start
//!   revision) or ends is reported as [`WatchEvent::Ended`]; it is restarted from the next read's
//!   revision + 1, and that read is taken at once unless the previous watch already failed
//!   without ever being created (so a broken endpoint cannot make the two loops spin).
//!
//! Why etcd's v3 JSON gateway over hyper rather than the `etcd-client` crate (issue 11 item 7):
//! it is etcd's official v3 API (grpc-gateway over the same gRPC services; Patroni's own etcd3
//! client uses it too), needs no protoc, tonic or prost, and pgleader already links hyper. The
//! require-leader watch works through it: the header `Grpc-Metadata-Hasleader: true` becomes
//! the gRPC metadata `hasleader=true` (measured numbers in `etcd/gateway.rs`).
//!
//! `read_start` is taken just before the txn is sent to the endpoint that answered (after
//! connecting and authenticating), so everything the read learnt is at least that recent; the
//! lease's remaining TTL is measured by etcd's leader later still, and truncated to whole seconds
//! (`etcd/decode.rs` `decode_lease`), so `read_start + lease_remaining` never over-states the
//! lease.
//!
//! Auth: with `username`/`password` the task authenticates (`/v3/auth/authenticate`) and sends
//! the token on every request; when etcd calls it invalid or stale it authenticates again once
//! and retries. When etcd refuses the credentials, that answer stands for 5 s without asking
//! again (each check costs etcd a bcrypt). The password is never part of a message or log.

// Layout: `decode` (the JSON both ways, pure), `gateway` (HTTP/1.1 and TLS to the v3 gateway),
// `leader_watch` (the watch loop); the settings, reports, client and read loop are here.
mod decode;
mod gateway;
mod leader_watch;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;

use crate::config::Secret;
use crate::topology::RoutingTable;
use decode::{decode_lease, decode_token, decode_txn, ScopeKeys};
use gateway::{CallError, Conn, Endpoint, Transport};
use leader_watch::WatchLoop;

/// Settings, built by `app` from the `[etcd]` section (and `[health]`'s intervals).
#[derive(Debug, Clone)]
pub struct EtcdSettings {
    /// `http://host:port` or `https://host:port`, in the order to try them first.
    pub endpoints: Vec<String>,
    /// Patroni's namespace: `service` and `/service/` mean the same.
    pub namespace: String,
    /// Patroni's scope: the keys are under `/<namespace>/<scope>/`.
    pub scope: String,
    /// One read attempt, across endpoints, everything included.
    pub timeout: Duration,
    /// Between reads while the routing table has a leader.
    pub interval: Duration,
    /// Between reads while it has none.
    pub fast_interval: Duration,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// PEM CA certificate(s) for https endpoints; the system roots when unset.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and its PKCS#8 PEM key, for etcd's `--client-cert-auth`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl EtcdSettings {
    /// Checks what the task would otherwise only find out when it starts: the endpoints, the
    /// credentials pair, the TLS files (read here).
    ///
    /// # Errors
    /// The first problem, as an operator sentence.
    pub fn validate(&self) -> Result<(), String> {
        Client::new(self).map(|_| ())
    }
}

/// The key prefix Patroni uses for `namespace` and `scope`, ending in `/`: `("service",
/// "vietmarket")` and `("/service/", "vietmarket")` both give `/service/vietmarket/`. It is
/// Patroni's own rule (`dcs/__init__.py`: `'/'.join(['', namespace, scope])` with runs of `/`
/// collapsed, then `/` and the key name), so even odd names map to the keys Patroni writes.
pub fn normalise_prefix(namespace: &str, scope: &str) -> String {
    let mut prefix = String::with_capacity(namespace.len() + scope.len() + 3);
    for ch in format!("/{namespace}/{scope}").chars() {
        if ch != '/' || !prefix.ends_with('/') {
            prefix.push(ch);
        }
    }
    prefix.push('/');
    prefix
}

/// One successful linearizable read of the scope: every key at one revision.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdRead {
    /// pgleader's monotonic clock just before the txn was sent (see the module doc).
    pub read_start: Instant,
    /// From `read_start` to the last answer (txn and LeaseTimeToLive).
    pub duration: Duration,
    /// The txn response header's revision.
    pub revision: i64,
    /// The endpoint that answered, as configured.
    pub endpoint: String,
    /// `/<ns>/<scope>/leader`; `None` when the key is absent.
    pub leader: Option<LeaderKey>,
    /// `/<ns>/<scope>/config`; `None` when absent or not parsable.
    pub config: Option<DynamicConfig>,
    /// The key is present but its value is not a JSON object.
    pub config_error: Option<String>,
    /// `/<ns>/<scope>/members/<name>`, in key order (at most 256).
    pub members: Vec<MemberInfo>,
}

/// Patroni's leader key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderKey {
    /// The value: the leader's member name.
    pub member: String,
    pub mod_revision: i64,
    /// 0 when the key has no lease.
    pub lease_id: i64,
    /// LeaseTimeToLive, whole seconds rounded down; `None` without a lease, or when it is gone.
    pub lease_remaining: Option<Duration>,
}

/// What pgleader uses of Patroni's dynamic configuration (the `config` key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicConfig {
    pub ttl: Option<u64>,
    pub loop_wait: Option<u64>,
    pub retry_timeout: Option<u64>,
    pub failsafe_mode: bool,
    /// Maintenance mode: a manual promotion does not move the leader key.
    pub pause: bool,
}

/// A `members/<name>` key, its JSON value read leniently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    pub name: String,
    pub conn_url: Option<String>,
    pub role: Option<String>,
    pub state: Option<String>,
    pub timeline: Option<u64>,
    /// The value is not a JSON object (the fields above are then all `None`).
    pub data_error: Option<String>,
}

impl MemberInfo {
    fn named(name: String) -> MemberInfo {
        MemberInfo { name, conn_url: None, role: None, state: None, timeline: None, data_error: None }
    }
}

/// What the watch of the leader key saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The leader key was written, with this value.
    Put { revision: i64, member: String },
    /// The leader key was deleted (a switchover does this first).
    Delete { revision: i64 },
    /// The watch is over (no leader, compacted, closed, an error); a read follows.
    Ended { reason: String },
}

/// What the task reports, in the order it happened within each loop.
#[derive(Debug, Clone, PartialEq)]
pub enum EtcdReport {
    Read(EtcdRead),
    /// No endpoint answered within `timeout`; `error` names each endpoint and its failure.
    ReadFailed {
        read_start: Instant,
        error: String,
    },
    Watch(WatchEvent),
}

/// The task: reads and watches until cancelled, or until `reports` is closed.
pub struct EtcdWatcher {
    pub settings: EtcdSettings,
    /// To the elector; closed means nobody listens, and the task ends.
    pub reports: mpsc::Sender<EtcdReport>,
    /// Read for the pace only: reads are fast while the table has no leader.
    pub routing: watch::Receiver<Arc<RoutingTable>>,
    /// Stops the task (shutdown, or new settings on reload).
    pub cancel: CancellationToken,
}

/// A successful read, for the watch to start after: the `seq`-th read saw `revision` on
/// endpoint number `endpoint`.
#[derive(Debug, Clone, Copy)]
struct ReadMark {
    seq: u64,
    revision: i64,
    endpoint: usize,
}

/// The pause between reads never goes below this, whatever the settings say.
const MIN_PAUSE: Duration = Duration::from_millis(10);
/// Within one read, the first pause before going round the endpoints again (doubling, at most
/// four times this): about a raft election on a LAN.
const ROUND_PAUSE: Duration = Duration::from_millis(25);

impl EtcdWatcher {
    /// Runs until `cancel` fires or `reports` is closed. Cancel safe. With settings that cannot
    /// work (a bad URL, an unreadable TLS file) it reports that as a failed read every
    /// `interval`, so the operator sees why the lease is never confirmed.
    pub async fn run(self) {
        let EtcdWatcher { settings, reports, routing, cancel } = self;
        let stop = cancel.child_token();
        let client = match Client::new(&settings) {
            Ok(c) => Arc::new(c),
            Err(error) => {
                tracing::error!(%error, "etcd settings are not usable; the leader lease cannot be confirmed");
                loop {
                    let failed = EtcdReport::ReadFailed { read_start: Instant::now(), error: error.clone() };
                    if !send(&reports, &stop, failed).await {
                        return;
                    }
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = sleep(settings.interval.max(MIN_PAUSE)) => {}
                    }
                }
            }
        };
        let trigger = Arc::new(Notify::new());
        let (marks_tx, marks_rx) = watch::channel(None);
        let conns = (0..client.endpoints.len()).map(|_| None).collect();
        let reads = ReadLoop {
            client: Arc::clone(&client),
            settings: settings.clone(),
            conns,
            preferred: 0,
            reports: reports.clone(),
            seen: {
                let table = routing.borrow();
                (table.leader.is_some(), table.epoch)
            },
            routing,
            routing_open: true,
            trigger: Arc::clone(&trigger),
            marks: marks_tx,
            stop: stop.clone(),
        };
        let watches = WatchLoop { client, reports, trigger, marks: marks_rx, stop };
        tokio::join!(Box::pin(reads.run()), Box::pin(watches.run()));
    }
}

/// Sends one report unless stopped; `false` when the task should end (it also stops the other
/// loop).
async fn send(reports: &mpsc::Sender<EtcdReport>, stop: &CancellationToken, report: EtcdReport) -> bool {
    let sent = tokio::select! {
        () = stop.cancelled() => false,
        r = reports.send(report) => r.is_ok(),
    };
    if !sent {
        stop.cancel();
    }
    sent
}

/// What both loops share: the endpoints, how to reach them, and the auth token.
struct Client {
    endpoints: Vec<Endpoint>,
    transport: Transport,
    keys: ScopeKeys,
    timeout: Duration,
    credentials: Option<(String, Secret)>,
    /// The current auth token, if any; never held across an await.
    token: Mutex<Option<Arc<str>>>,
    /// After etcd refused the credentials: its answer, repeated without asking again until then.
    refused: Mutex<Option<(Instant, String)>>,
}

/// How long a refusal of the credentials is reused. etcd checks a password with bcrypt (tens of
/// milliseconds of its CPU), and the same wrong password cannot start to work by itself, so
/// pgleader asks at most this often, not once per endpoint, round and read.
const AUTH_BACKOFF: Duration = Duration::from_secs(5);
/// Authenticating (a bcrypt check and a raft write on etcd) has this bound of its own, apart
/// from `timeout`: it comes before a read, whose `read_start` is taken after it.
const AUTH_TIMEOUT: Duration = Duration::from_secs(5);

impl Client {
    fn new(s: &EtcdSettings) -> Result<Client, String> {
        if s.endpoints.is_empty() {
            return Err("etcd: no endpoints; list every member's client URL in [etcd] endpoints".to_owned());
        }
        if s.scope.trim_matches('/').is_empty() {
            return Err("etcd: the scope is empty; use Patroni's scope (the cluster name)".to_owned());
        }
        let endpoints = s.endpoints.iter().map(|e| Endpoint::parse(e)).collect::<Result<Vec<_>, _>>()?;
        let credentials = match (&s.username, &s.password) {
            (Some(u), Some(p)) if !u.is_empty() => Some((u.clone(), p.clone())),
            (None, None) => None,
            (Some(_), None) => return Err("etcd: username is set without a password".to_owned()),
            (None, Some(_)) => return Err("etcd: a password is set without a username".to_owned()),
            (Some(_), Some(_)) => return Err("etcd: the username is empty".to_owned()),
        };
        Ok(Client {
            transport: Transport::new(s, &endpoints)?,
            endpoints,
            keys: ScopeKeys::new(normalise_prefix(&s.namespace, &s.scope)),
            timeout: s.timeout,
            credentials,
            token: Mutex::new(None),
            refused: Mutex::new(None),
        })
    }

    fn current_token(&self) -> Option<Arc<str>> {
        self.token.lock().map(|t| t.clone()).unwrap_or(None)
    }

    /// Credentials are configured and there is no token yet.
    fn needs_token(&self) -> bool {
        self.credentials.is_some() && self.current_token().is_none()
    }

    /// Forgets `stale` unless another loop has already replaced it.
    fn forget_token(&self, stale: &Arc<str>) {
        if let Ok(mut t) = self.token.lock() {
            if t.as_ref().is_some_and(|cur| Arc::ptr_eq(cur, stale)) {
                *t = None;
            }
        }
    }

    /// Authenticates on `conn` and keeps the token. A refusal of the credentials is kept for
    /// [`AUTH_BACKOFF`] and answered from memory meanwhile.
    async fn authenticate(&self, conn: &mut Conn, ep: &Endpoint) -> Result<(), Refusal> {
        let Some((user, password)) = &self.credentials else { return Ok(()) };
        let refused = self.refused.lock().ok().and_then(|r| r.clone());
        if let Some((until, message)) = refused.filter(|(until, _)| Instant::now() < *until) {
            let wait = until.saturating_duration_since(Instant::now());
            return Err(Refusal::Final(format!("{message} (not asked again for another {wait:.1?})")));
        }
        let body = decode::auth_body(user, password.expose());
        let answer = match conn.call(ep, "/v3/auth/authenticate", body, None).await {
            Ok(answer) => answer,
            Err(CallError::Etcd { message }) if message.contains("authentication failed") => {
                let message = format!("etcd refused the credentials of user `{user}`: {message}");
                if let Ok(mut r) = self.refused.lock() {
                    *r = Some((Instant::now() + AUTH_BACKOFF, message.clone()));
                }
                return Err(Refusal::Final(message));
            }
            Err(e) => return Err(Refusal::Failed(e.text())),
        };
        let token: Arc<str> = decode_token(&answer).map_err(Refusal::Failed)?.into();
        if let Ok(mut t) = self.token.lock() {
            *t = Some(token);
        }
        Ok(())
    }

    /// One unary call with the current token. A token etcd calls invalid or stale is forgotten
    /// and the call fails with [`ReadError::StaleToken`].
    async fn call(&self, conn: &mut Conn, ep: &Endpoint, path: &str, body: Vec<u8>) -> Result<Bytes, ReadError> {
        let token = self.current_token();
        match conn.call(ep, path, body, token.as_deref()).await {
            Err(e) if e.wants_new_token() && self.credentials.is_some() => {
                if let Some(t) = &token {
                    self.forget_token(t);
                }
                Err(ReadError::StaleToken(e.text()))
            }
            Err(e) => Err(ReadError::Failed(e.text())),
            Ok(answer) => Ok(answer),
        }
    }
}

/// Why authenticating did not work.
enum Refusal {
    /// etcd refused the credentials: no other endpoint will take them either.
    Final(String),
    /// This endpoint could not be asked (connection, no leader, ...).
    Failed(String),
}

/// Why a read on one endpoint did not work.
enum ReadError {
    /// etcd rejected the token: authenticate again, then read.
    StaleToken(String),
    Failed(String),
}

impl From<String> for ReadError {
    fn from(s: String) -> ReadError {
        ReadError::Failed(s)
    }
}

/// The read loop's state.
struct ReadLoop {
    client: Arc<Client>,
    settings: EtcdSettings,
    /// One kept-alive connection per endpoint, dropped after any failure on it.
    conns: Vec<Option<Conn>>,
    /// The endpoint that answered last: tried first.
    preferred: usize,
    reports: mpsc::Sender<EtcdReport>,
    routing: watch::Receiver<Arc<RoutingTable>>,
    /// False once the routing table's sender is gone (then only the timer paces).
    routing_open: bool,
    /// The table as this loop last saw it: (has a leader, epoch).
    seen: (bool, u64),
    /// Poked by the watch loop: read now.
    trigger: Arc<Notify>,
    /// Each successful read, for the watch loop.
    marks: watch::Sender<Option<ReadMark>>,
    stop: CancellationToken,
}

impl ReadLoop {
    async fn run(mut self) {
        let mut seq = 0;
        loop {
            let attempt_start = Instant::now();
            let stop = self.stop.clone();
            let outcome = tokio::select! {
                () = stop.cancelled() => return,
                r = self.read() => r,
            };
            let report = match outcome {
                Ok((read, endpoint)) => {
                    seq += 1;
                    self.marks.send_replace(Some(ReadMark { seq, revision: read.revision, endpoint }));
                    EtcdReport::Read(read)
                }
                Err(error) => {
                    tracing::debug!(%error, "etcd read failed");
                    EtcdReport::ReadFailed { read_start: attempt_start, error }
                }
            };
            if !send(&self.reports, &self.stop, report).await {
                return;
            }
            if !self.pause().await {
                return;
            }
        }
    }

    /// Waits `interval` (`fast_interval` while the table has no leader), or until a watch event
    /// asks for a read, or until the table loses its leader; `false` when stopped. "Loses" is
    /// judged against what this loop saw last, by leader and epoch (which moves on every leader
    /// change), so a leader that came and went while a read was in flight, coalesced by the
    /// watch channel, still brings the fast read.
    async fn pause(&mut self) -> bool {
        if self.observe_loss() {
            return true;
        }
        let s = &self.settings;
        let pause = if self.seen.0 { s.interval } else { s.fast_interval.min(s.interval) };
        let until = Instant::now() + pause.max(MIN_PAUSE);
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return false,
                () = sleep_until(until) => return true,
                () = self.trigger.notified() => return true,
                changed = self.routing.changed(), if self.routing_open => {
                    if changed.is_err() {
                        self.routing_open = false;
                    } else if self.observe_loss() {
                        return true;
                    }
                }
            }
        }
    }

    /// Takes in the current table: whether a leader was lost since the last look.
    fn observe_loss(&mut self) -> bool {
        let (had_leader, epoch) = self.seen;
        let table = self.routing.borrow_and_update();
        let has_leader = table.leader.is_some();
        self.seen = (has_leader, table.epoch);
        !has_leader && (had_leader || table.epoch != epoch)
    }

    /// One read: a token first if one is needed, then [`ReadLoop::rounds`]; when etcd calls the
    /// token stale, once more with a new one. The read and the endpoint that answered.
    async fn read(&mut self) -> Result<(EtcdRead, usize), String> {
        let mut renewed = false;
        loop {
            if self.client.needs_token() {
                self.authenticate().await?;
            }
            match self.rounds().await {
                Ok(read) => return Ok(read),
                Err(ReadError::StaleToken(_)) if !renewed => renewed = true,
                Err(ReadError::StaleToken(e)) => return Err(format!("etcd rejected a new auth token too: {e}")),
                Err(ReadError::Failed(e)) => return Err(e),
            }
        }
    }

    /// Connection `i`, kept alive or made anew.
    async fn conn(&mut self, i: usize) -> Result<&mut Conn, String> {
        if !self.conns[i].as_ref().is_some_and(Conn::is_open) {
            self.conns[i] = Some(self.client.transport.connect(&self.client.endpoints[i]).await?);
        }
        self.conns[i].as_mut().ok_or_else(|| "no connection".to_owned())
    }

    /// Gets a token: the endpoints in turn, within [`AUTH_TIMEOUT`].
    async fn authenticate(&mut self) -> Result<(), String> {
        let client = Arc::clone(&self.client);
        let n = client.endpoints.len();
        let deadline = Instant::now() + AUTH_TIMEOUT.max(client.timeout);
        let mut failures = Vec::new();
        for k in 0..n {
            let i = (self.preferred + k) % n;
            let left = deadline.saturating_duration_since(Instant::now());
            let share = left / u32::try_from(n - k).unwrap_or(u32::MAX);
            let attempt = timeout(share, async {
                let conn = self.conn(i).await.map_err(Refusal::Failed)?;
                client.authenticate(conn, &client.endpoints[i]).await
            });
            let url = &client.endpoints[i].url;
            match attempt.await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(Refusal::Final(e))) => return Err(e),
                Ok(Err(Refusal::Failed(e))) => failures.push(format!("{url}: {e}")),
                Err(_) => failures.push(format!("{url}: no answer within {share:?}")),
            }
            self.conns[i] = None;
        }
        Err(format!("cannot authenticate to etcd: {}", failures.join("; ")))
    }

    /// Within `timeout`: the endpoints in turn, the preferred one first, and again round them
    /// after a short pause while time is left. Fast failures are common and brief: while a
    /// stopping etcd leader hands its leadership over, every member answers "no leader"
    /// (require-leader) for a moment.
    async fn rounds(&mut self) -> Result<(EtcdRead, usize), ReadError> {
        let client = Arc::clone(&self.client);
        let n = client.endpoints.len();
        let deadline = Instant::now() + client.timeout;
        let mut last_error: Vec<Option<String>> = vec![None; n];
        let mut pause = ROUND_PAUSE;
        let mut rounds = 0;
        loop {
            rounds += 1;
            for k in 0..n {
                let i = (self.preferred + k) % n;
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                let share = left / u32::try_from(n - k).unwrap_or(u32::MAX);
                match timeout(share, self.read_from(i)).await {
                    Ok(Ok(read)) => {
                        if i != self.preferred {
                            tracing::info!(endpoint = %client.endpoints[i].url, "etcd reads now go to this endpoint");
                            self.preferred = i;
                        }
                        return Ok((read, i));
                    }
                    Ok(Err(ReadError::StaleToken(e))) => return Err(ReadError::StaleToken(e)),
                    Ok(Err(ReadError::Failed(e))) => last_error[i] = Some(e),
                    // A short share in a later round says less than an earlier answer.
                    Err(_) if last_error[i].is_some() => {}
                    Err(_) => last_error[i] = Some(format!("no answer within its {share:?} share of the budget")),
                }
                self.conns[i] = None;
            }
            if deadline.saturating_duration_since(Instant::now()) <= pause {
                break;
            }
            sleep(pause).await;
            pause = (pause * 2).min(ROUND_PAUSE * 4);
        }
        let failures: Vec<String> = client
            .endpoints
            .iter()
            .zip(last_error)
            .map(|(ep, e)| format!("{}: {}", ep.url, e.unwrap_or_else(|| "not tried (no time left)".to_owned())))
            .collect();
        let tries = if rounds > 1 { format!(" ({rounds} rounds)") } else { String::new() };
        Err(ReadError::Failed(format!(
            "no etcd endpoint answered a linearizable read within {:?}{tries}: {}",
            client.timeout,
            failures.join("; ")
        )))
    }

    /// The read on endpoint `i`. Not cancel safe as to its connection (the caller drops it).
    async fn read_from(&mut self, i: usize) -> Result<EtcdRead, ReadError> {
        let client = Arc::clone(&self.client);
        let ep = &client.endpoints[i];
        let conn = self.conn(i).await?;
        let read_start = Instant::now();
        let answer = client.call(conn, ep, "/v3/kv/txn", decode::txn_body(&client.keys)).await?;
        let snapshot = decode_txn(&client.keys, &answer)?;
        let mut leader = snapshot.leader;
        if let Some(l) = leader.as_mut().filter(|l| l.lease_id != 0) {
            let answer = client.call(conn, ep, "/v3/lease/timetolive", decode::lease_body(l.lease_id)).await?;
            l.lease_remaining = decode_lease(&answer)?;
        }
        Ok(EtcdRead {
            read_start,
            duration: read_start.elapsed(),
            revision: snapshot.revision,
            endpoint: ep.url.clone(),
            leader,
            config: snapshot.config,
            config_error: snapshot.config_error,
            members: snapshot.members,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> EtcdSettings {
        EtcdSettings {
            endpoints: vec!["http://127.0.0.1:1".into()],
            namespace: "service".into(),
            scope: "vm".into(),
            timeout: Duration::from_millis(100),
            interval: Duration::from_millis(100),
            fast_interval: Duration::from_millis(10),
            username: None,
            password: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }

    #[test]
    fn prefixes_follow_patroni() {
        assert_eq!(normalise_prefix("service", "vietmarket"), "/service/vietmarket/");
        assert_eq!(normalise_prefix("/service/", "vietmarket"), "/service/vietmarket/");
        assert_eq!(normalise_prefix("//a//b/", "/c"), "/a/b/c/");
        assert_eq!(normalise_prefix("", "vm"), "/vm/");
        // Patroni keeps a scope's trailing slash and then adds its own: `/service/vm//leader`.
        assert_eq!(normalise_prefix("service", "vm/"), "/service/vm//");
    }

    #[test]
    fn settings_are_validated_with_operator_sentences() {
        assert_eq!(settings().validate(), Ok(()));
        let check = |f: &dyn Fn(&mut EtcdSettings), want: &str| {
            let mut s = settings();
            f(&mut s);
            let e = s.validate().unwrap_err();
            assert!(e.contains(want), "{e}");
        };
        check(&|s| s.endpoints.clear(), "no endpoints");
        check(&|s| s.endpoints.push("127.0.0.1:2379".into()), "scheme must be http or https");
        check(&|s| s.scope = "/".into(), "scope is empty");
        check(&|s| s.username = Some("u".into()), "without a password");
        check(&|s| s.password = Some(Secret::new("pw")), "without a username");
        check(&|s| s.ca_file = Some("/nonexistent".into()), "no endpoint is https");
        check(
            &|s| {
                s.endpoints = vec!["https://127.0.0.1:1".into()];
                s.ca_file = Some("/nonexistent/ca.pem".into());
            },
            "etcd ca_file: cannot read /nonexistent/ca.pem",
        );
        check(
            &|s| {
                s.endpoints = vec!["https://127.0.0.1:1".into()];
                s.cert_file = Some("/nonexistent/c.pem".into());
            },
            "go together",
        );
    }

    #[test]
    fn errors_never_carry_the_password() {
        let mut s = settings();
        s.username = Some("u".into());
        s.password = Some(Secret::new("hunter2-secret"));
        assert!(!format!("{s:?}").contains("hunter2"));
        s.endpoints = vec!["http://u:hunter2-secret@127.0.0.1:1".into()];
        assert!(!s.validate().unwrap_err().contains("hunter2"));
    }

    /// With no etcd at all, each attempt is one ReadFailed naming the endpoint, the reads
    /// follow one another, and the task stops on cancel.
    #[tokio::test]
    async fn unreachable_etcd_is_reported_per_attempt_and_cancel_stops_it() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut s = settings();
        s.endpoints = vec![format!("http://127.0.0.1:{port}")];
        let (tx, mut rx) = mpsc::channel(8);
        let (_routing_tx, routing) = watch::channel(Arc::new(RoutingTable::initial()));
        let cancel = CancellationToken::new();
        let task = tokio::spawn(EtcdWatcher { settings: s, reports: tx, routing, cancel: cancel.clone() }.run());
        let mut starts = Vec::new();
        for _ in 0..3 {
            match rx.recv().await.unwrap() {
                EtcdReport::ReadFailed { read_start, error } => {
                    assert!(error.contains(&format!("http://127.0.0.1:{port}: cannot connect")), "{error}");
                    starts.push(read_start);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(starts.windows(2).all(|w| w[0] < w[1]));
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn unusable_settings_are_reported_as_failed_reads() {
        let mut s = settings();
        s.endpoints = vec!["nonsense".into()];
        let (tx, mut rx) = mpsc::channel(8);
        let (_routing_tx, routing) = watch::channel(Arc::new(RoutingTable::initial()));
        let task =
            tokio::spawn(EtcdWatcher { settings: s, reports: tx, routing, cancel: CancellationToken::new() }.run());
        match rx.recv().await.unwrap() {
            EtcdReport::ReadFailed { error, .. } => assert!(error.contains("etcd endpoint `nonsense`"), "{error}"),
            other => panic!("unexpected {other:?}"),
        }
        drop(rx);
        task.await.unwrap();
    }
}
