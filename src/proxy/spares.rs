//! Spare backend connections (`[proxy] spare_connections`): a few TCP connections to the current
//! leader, opened ahead of time, so that a new client's startup packet goes into a backend
//! process PostgreSQL has already forked (it forks when it accepts, before it reads a byte).
//!
//! The rules, so that a spare is never more than a fresh connect made earlier:
//! - a spare belongs to one [`Target`] — the leader of the table it was opened in, its epoch and
//!   its checked address — and is only handed to a handshake routed to exactly that target;
//!   the handshake then vets the backend's first reply and checks admission (DESIGN.md rules 7
//!   and 8) as it does for a fresh connection;
//! - all spares are closed as soon as the table's leader, epoch or address changes (or the
//!   leader's confirmation lapses), and when the drain begins;
//! - a spare is closed, never having sent a byte, once it is `spare_max_age` old (well before
//!   PostgreSQL's `authentication_timeout`, 1 minute by default): PostgreSQL logs nothing for a
//!   connection that sends nothing (with `log_connections = on`, one "connection received"
//!   line), and the filler opens a new one;
//! - a spare that turns out dead (closed by the server, a restarted postmaster) is dropped when it
//!   is taken, or, if it is closed or reset during the handshake, the client is retried on a
//!   fresh connection at once: the client never sees it, and the leader is not reported lost for
//!   it. A spare that answers 57P03, or nothing within `connect_timeout`, is a backend that does
//!   not take clients: reported as a fresh connection would be (DESIGN.md rule 7);
//! - PostgreSQL decides admission when it forks: a spare opened before a smart shutdown still
//!   carries a session, as a client connected then would; the first one opened after it answers
//!   57P03 (tests/failover.rs has the bound: at most `spare_connections` such sessions).
//!
//! The pool is per process (the workers share it). Spares are kept as std sockets, detached from
//! any runtime, so the worker that takes one registers it with its own.

use std::collections::VecDeque;
use std::net::TcpStream as StdStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, SpareEvent};
use crate::task::sleep_until_some;
use crate::topology::{Route, RoutingTable, Target};

use super::ProxySettings;

/// After a failed connect the filler waits this long before the next one (the health checks,
/// not the filler, decide whether the leader is lost).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// The filler looks at its spares at least this often, so spares the server has closed are
/// replaced (and the gauge does not count them) before a client would meet them. After a spare
/// found closed younger than this the filler waits as after a failed connect, so a server that
/// closes every connection at once is not met with a loop of connects.
const SWEEP: Duration = Duration::from_secs(1);

/// The pool of spares and its metrics. Its lock is held for a few pointer moves, never across
/// an await.
pub struct Spares {
    pool: Mutex<Pool>,
    /// A spare was taken (or the pool emptied): the filler tops it up.
    taken: Notify,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Pool {
    /// The target every spare in `ready` is connected to.
    key: Option<Target>,
    /// Oldest first.
    ready: VecDeque<Spare>,
}

struct Spare {
    stream: StdStream,
    opened: Instant,
}

/// A spare is alive while reading it would block: the server has neither closed it nor (as it
/// never does before a startup packet) sent anything.
fn alive(stream: &StdStream) -> bool {
    matches!(stream.peek(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

impl Spares {
    pub fn new(metrics: Arc<Metrics>) -> Spares {
        Spares { pool: Mutex::new(Pool::default()), taken: Notify::new(), metrics }
    }

    fn count(&self, event: SpareEvent, n: usize) {
        if n > 0 {
            self.metrics.spare_events.with_label_values(&[event.as_str()]).inc_by(n as u64);
        }
    }

    /// A live spare connected to exactly `target`, registered with the caller's runtime; `None`
    /// if there is none (the caller connects afresh). Spares past `max_age` or found closed are
    /// dropped on the way.
    pub(crate) fn take(&self, target: &Target, max_age: Duration) -> Option<TcpStream> {
        let (found, expired, dead) = {
            let Ok(mut pool) = self.pool.lock() else { return None };
            if pool.key.as_ref() != Some(target) || pool.ready.is_empty() {
                return None;
            }
            let (mut expired, mut dead, now) = (0, 0, Instant::now());
            let mut found = None;
            while let Some(spare) = pool.ready.pop_front() {
                if now.saturating_duration_since(spare.opened) >= max_age {
                    expired += 1;
                } else if !alive(&spare.stream) {
                    dead += 1;
                } else {
                    found = Some(spare.stream);
                    break;
                }
            }
            self.metrics.spares_ready.set(pool.ready.len() as i64);
            (found, expired, dead)
        };
        self.count(SpareEvent::Expired, expired);
        self.count(SpareEvent::Dead, dead);
        self.taken.notify_one();
        let Ok(stream) = TcpStream::from_std(found?) else {
            self.count(SpareEvent::Dead, 1);
            return None;
        };
        self.count(SpareEvent::Used, 1);
        Some(stream)
    }

    /// A taken spare failed during a handshake: counted; the handshake retries fresh.
    pub(crate) fn failed_in_use(&self) {
        self.count(SpareEvent::Dead, 1);
    }

    /// Brings the pool in line with `key` and `wanted`: everything goes if the key changed;
    /// spares past `max_age`, closed ones and the excess go. Returns when the oldest expires,
    /// and whether a spare was found closed younger than [`SWEEP`].
    fn settle(&self, key: Option<Target>, wanted: usize, max_age: Duration) -> (Option<Instant>, bool) {
        let (mut dropped, mut expired, mut dead, now) = (0, 0, 0, Instant::now());
        let mut died_young = false;
        let oldest = {
            let Ok(mut pool) = self.pool.lock() else { return (None, false) };
            if pool.key != key {
                dropped += pool.ready.len();
                pool.ready.clear();
                pool.key = key;
            }
            pool.ready.retain(|s| {
                let age = now.saturating_duration_since(s.opened);
                let young = age < max_age;
                let live = young && alive(&s.stream);
                expired += usize::from(!young);
                dead += usize::from(young && !live);
                died_young |= young && !live && age < SWEEP;
                live
            });
            while pool.ready.len() > wanted {
                pool.ready.pop_back();
                dropped += 1;
            }
            self.metrics.spares_ready.set(pool.ready.len() as i64);
            pool.ready.front().map(|s| s.opened + max_age)
        };
        self.count(SpareEvent::Dropped, dropped);
        self.count(SpareEvent::Expired, expired);
        self.count(SpareEvent::Dead, dead);
        (oldest, died_young)
    }

    /// How many spares the pool holds for `key`.
    fn ready_for(&self, key: &Target) -> usize {
        self.pool.lock().map(|p| if p.key.as_ref() == Some(key) { p.ready.len() } else { 0 }).unwrap_or(0)
    }

    /// Adds a spare connected to `target`, unless the pool has moved on to another key.
    fn add(&self, target: &Target, stream: StdStream) {
        let kept = match self.pool.lock() {
            Ok(mut pool) if pool.key.as_ref() == Some(target) => {
                pool.ready.push_back(Spare { stream, opened: Instant::now() });
                self.metrics.spares_ready.set(pool.ready.len() as i64);
                true
            }
            _ => false,
        };
        self.count(SpareEvent::Opened, 1);
        if !kept {
            self.count(SpareEvent::Dropped, 1);
        }
    }

    /// Closes every spare (the drain, or the filler stopping).
    pub fn clear(&self) {
        self.settle(None, 0, Duration::ZERO);
    }

    /// The filler: keeps `spare_connections` spares to the table's write target, replacing them
    /// as they are taken or expire, and dropping them when the target changes. Ends when `stop`
    /// is cancelled or the elector is gone (closing every spare).
    pub async fn fill(
        self: Arc<Self>,
        mut routing: watch::Receiver<Arc<RoutingTable>>,
        mut settings: watch::Receiver<Arc<ProxySettings>>,
        stop: CancellationToken,
    ) {
        // When the next connect may be tried after a failed one, and to which target.
        let mut retry_at: Option<(Target, Instant)> = None;
        loop {
            let (wanted, max_age, connect_timeout) = {
                let s = settings.borrow_and_update();
                (s.spare_connections, s.spare_max_age, s.connect_timeout)
            };
            let (key, lease_until) = write_target(&mut routing);
            let (expires, died_young) = self.settle(key, wanted, max_age);
            let now = Instant::now();
            // Counted as dead already; the filler waits as after a failed connect.
            if let Some(target) = key.filter(|_| died_young) {
                retry_at = Some((target, now + RETRY_AFTER_FAILURE));
            }
            // A failure of an old target does not delay the spares of a new one.
            let backoff = retry_at.filter(|(t, _)| Some(*t) == key).map(|(_, at)| at);
            let short = key.filter(|k| self.ready_for(k) < wanted);
            if let Some(target) = short.filter(|_| backoff.is_none_or(|at| now >= at)) {
                retry_at = None;
                let mut connect =
                    std::pin::pin!(tokio::time::timeout(connect_timeout, TcpStream::connect(target.address)));
                // The spares of an old target go at once, even while a connect is pending.
                let connected = loop {
                    tokio::select! {
                        biased;
                        () = stop.cancelled() => break None,
                        changed = routing.changed() => {
                            if changed.is_err() {
                                break None;
                            }
                            let (now, _) = write_target(&mut routing);
                            if now != Some(target) {
                                self.settle(now, wanted, max_age);
                                break Some(None);
                            }
                        }
                        r = &mut connect => break Some(Some(r)),
                    }
                };
                let connected = match connected {
                    None => break,
                    Some(None) => continue,
                    Some(Some(r)) => r,
                };
                let opened = match connected {
                    Ok(Ok(stream)) => stream.into_std().map_err(|e| e.to_string()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("no answer within connect_timeout".to_owned()),
                };
                match opened {
                    Ok(std) => {
                        super::tune(&std);
                        self.add(&target, std);
                    }
                    Err(error) => {
                        tracing::debug!(address = %target.address, %error, "cannot open a spare connection to the leader");
                        self.count(SpareEvent::Failed, 1);
                        retry_at = Some((target, Instant::now() + RETRY_AFTER_FAILURE));
                    }
                }
                continue;
            }
            let sweep = Some(now + SWEEP).filter(|_| key.is_some() && wanted > 0);
            let wake = [expires, lease_until, short.and(backoff), sweep].into_iter().flatten().min();
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                changed = routing.changed() => if changed.is_err() { break },
                changed = settings.changed() => if changed.is_err() { break },
                () = self.taken.notified() => {}
                () = sleep_until_some(wake) => {}
            }
        }
        self.clear();
    }
}

/// The target a new write session would get now, and when its confirmation (fencing) lapses.
fn write_target(routing: &mut watch::Receiver<Arc<RoutingTable>>) -> (Option<Target>, Option<Instant>) {
    let table = routing.borrow_and_update();
    let key = table.target(Route::Write, |_| 0, Instant::now().into_std());
    let lease_until = key.and_then(|k| table.lease_until(k.id)).map(Instant::from_std);
    (key, lease_until)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::BackendId;
    use std::net::{SocketAddr, TcpListener};

    fn target(address: SocketAddr, epoch: u64) -> Target {
        Target { id: BackendId(0), epoch, address }
    }

    fn spares() -> Spares {
        Spares::new(Arc::new(Metrics::new(&[])))
    }

    fn event(s: &Spares, e: SpareEvent) -> u64 {
        s.metrics.spare_events.with_label_values(&[e.as_str()]).get()
    }

    /// A connected spare, and the server's end of it.
    fn pair(listener: &TcpListener) -> (StdStream, StdStream) {
        let client = StdStream::connect(listener.local_addr().unwrap()).unwrap();
        client.set_nonblocking(true).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn a_spare_goes_only_to_its_own_target() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let at = listener.local_addr().unwrap();
        let s = spares();
        let key = target(at, 3);
        s.settle(Some(key), 2, Duration::from_secs(60));
        let (a, _server_a) = pair(&listener);
        s.add(&key, a);
        // Another epoch of the same backend and address, or another backend: nothing.
        assert!(s.take(&target(at, 4), Duration::from_secs(60)).is_none());
        assert!(s.take(&Target { id: BackendId(1), ..key }, Duration::from_secs(60)).is_none());
        assert!(s.take(&key, Duration::from_secs(60)).is_some());
        assert!(s.take(&key, Duration::from_secs(60)).is_none(), "one spare, used once");
        assert_eq!(event(&s, SpareEvent::Used), 1);
    }

    #[tokio::test]
    async fn a_change_of_target_closes_every_spare_without_a_byte() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let at = listener.local_addr().unwrap();
        let s = spares();
        let key = target(at, 1);
        s.settle(Some(key), 2, Duration::from_secs(60));
        let (a, mut server) = pair(&listener);
        s.add(&key, a);
        s.settle(Some(target(at, 2)), 2, Duration::from_secs(60));
        assert_eq!(event(&s, SpareEvent::Dropped), 1);
        assert_eq!(s.metrics.spares_ready.get(), 0);
        // The server sees a clean close, with no byte sent.
        let mut buf = Vec::new();
        assert_eq!(std::io::Read::read_to_end(&mut server, &mut buf).unwrap(), 0);
        assert!(s.take(&key, Duration::from_secs(60)).is_none());
    }

    #[tokio::test]
    async fn closed_and_old_spares_are_never_handed_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let at = listener.local_addr().unwrap();
        let s = spares();
        let key = target(at, 1);
        s.settle(Some(key), 4, Duration::from_secs(60));
        let (a, server_a) = pair(&listener);
        let (b, _server_b) = pair(&listener);
        s.add(&key, a);
        s.add(&key, b);
        drop(server_a);
        // The server's close needs a moment to arrive; wait for the state, not for a time.
        while s.pool.lock().is_ok_and(|pool| alive(&pool.ready[0].stream)) {
            tokio::task::yield_now().await;
        }
        assert!(s.take(&key, Duration::from_secs(60)).is_some(), "the live one");
        assert_eq!(event(&s, SpareEvent::Dead), 1);
        let (c, _server_c) = pair(&listener);
        s.add(&key, c);
        assert!(s.take(&key, Duration::ZERO).is_none(), "past max_age");
        assert_eq!(event(&s, SpareEvent::Expired), 1);
    }

    #[tokio::test]
    async fn shrinking_the_pool_drops_the_excess() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let key = target(listener.local_addr().unwrap(), 1);
        let s = spares();
        s.settle(Some(key), 3, Duration::from_secs(60));
        let servers: Vec<_> = (0..3)
            .map(|_| {
                let (c, server) = pair(&listener);
                s.add(&key, c);
                server
            })
            .collect();
        assert_eq!(s.ready_for(&key), 3);
        s.settle(Some(key), 1, Duration::from_secs(60));
        assert_eq!(s.ready_for(&key), 1);
        assert_eq!(event(&s, SpareEvent::Dropped), 2);
        drop(servers);
    }

    /// Spares that reach `spare_max_age` are expired, not closed by the server: no back-off.
    #[tokio::test]
    async fn expiry_is_not_a_failure() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let key = target(listener.local_addr().unwrap(), 1);
        let s = spares();
        s.settle(Some(key), 2, Duration::from_secs(60));
        let (a, _server) = pair(&listener);
        s.add(&key, a);
        let (_, died_young) = s.settle(Some(key), 2, Duration::ZERO);
        assert!(!died_young);
        assert_eq!((event(&s, SpareEvent::Expired), event(&s, SpareEvent::Dead)), (1, 0));
    }

    /// A server that closes every connection at once: the filler backs off after each spare it
    /// finds closed young, instead of reconnecting as fast as the server answers.
    #[tokio::test]
    async fn a_server_that_closes_every_spare_is_not_met_with_a_loop_of_connects() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                drop(stream);
            }
        });
        let s = Arc::new(spares());
        let (_table_tx, routing) = watch::channel(crate::proxy::test_support::table(&[at], Some(0), 1));
        let wanted = 4;
        let settings = ProxySettings { spare_connections: wanted, ..crate::proxy::test_support::settings() };
        let (_settings_tx, settings) = watch::channel(Arc::new(settings));
        let stop = CancellationToken::new();
        let filler = tokio::spawn(Arc::clone(&s).fill(routing, settings, stop.clone()));
        // Two back-offs of RETRY_AFTER_FAILURE: each round opens at most `wanted` spares before
        // it sees one closed and waits, so the connects stay within three rounds' worth.
        tokio::time::sleep(RETRY_AFTER_FAILURE * 2).await;
        stop.cancel();
        filler.await.unwrap();
        let opened = accepted.load(std::sync::atomic::Ordering::Relaxed);
        assert!(event(&s, SpareEvent::Dead) >= 1, "the filler saw its spares closed");
        assert!(opened <= 4 * wanted, "{opened} connects in two back-offs");
    }
}
