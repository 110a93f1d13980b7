//! Prometheus metrics: one owned [`Registry`] (not the process-global default) and typed handles,
//! built once by `app` and shared as `Arc<Metrics>`.
//!
//! Labels come only from closed sets: configured backend names and the fixed enums below, never
//! from client input. Per-backend and per-result series are pre-initialised so dashboards have no
//! gaps. This module must not depend on any other module of the crate.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// How a client connection ended: the `result` label of `pgleader_sessions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionResult {
    /// Spliced to the leader and closed by either side.
    Ok,
    /// Closed by pgleader under DESIGN rule 3; `pgleader_sessions_cut_total{reason}` says why.
    Cut,
    /// No leader within `leader_wait_timeout`: 57P03.
    NoLeader,
    /// No leader within `leader_wait_timeout` because the leader lease is not confirmed by etcd
    /// (fencing): 57P03.
    NoLease,
    /// Over `max_connections`: 53300.
    RefusedLimit,
    /// Not a PostgreSQL first packet: 08P01 / 0A000.
    RefusedProtocol,
    /// The client's address is not in `[proxy] allow`: 28000.
    RefusedAddress,
    /// No first packet within `client_hello_timeout`.
    ClientTimeout,
    /// The backend failed after the splice began.
    BackendError,
    /// The client failed (reset, closed before startup) outside a clean close.
    ClientError,
    /// The client left while it waited for a leader; no backend connection was opened for it.
    Abandoned,
    /// Closed by the end of the shutdown grace period.
    Shutdown,
    /// A CancelRequest delivered to at least one backend that holds sessions.
    CancelForwarded,
    /// A CancelRequest that no backend holding sessions could be sent.
    CancelFailed,
    /// A CancelRequest while no backend holds a session of this pgleader: nothing to cancel.
    CancelUnmatched,
    /// The read-only listener had no replica in bounds (and no fallback) in time: 57P03.
    NoReplica,
    /// Closed before a byte was read because the accepted socket could not move between
    /// pgleader's workers (a runtime registration error; the client sees a closed connection).
    HandoffFailed,
}

impl SessionResult {
    pub const ALL: [SessionResult; 17] = [
        SessionResult::Ok,
        SessionResult::Cut,
        SessionResult::NoLeader,
        SessionResult::NoLease,
        SessionResult::RefusedLimit,
        SessionResult::RefusedProtocol,
        SessionResult::RefusedAddress,
        SessionResult::ClientTimeout,
        SessionResult::BackendError,
        SessionResult::ClientError,
        SessionResult::Abandoned,
        SessionResult::Shutdown,
        SessionResult::CancelForwarded,
        SessionResult::CancelFailed,
        SessionResult::CancelUnmatched,
        SessionResult::NoReplica,
        SessionResult::HandoffFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SessionResult::Ok => "ok",
            SessionResult::Cut => "cut",
            SessionResult::NoLeader => "no_leader",
            SessionResult::NoLease => "no_lease",
            SessionResult::RefusedLimit => "refused_limit",
            SessionResult::RefusedProtocol => "refused_protocol",
            SessionResult::RefusedAddress => "refused_address",
            SessionResult::ClientTimeout => "client_timeout",
            SessionResult::BackendError => "backend_error",
            SessionResult::ClientError => "client_error",
            SessionResult::Abandoned => "abandoned",
            SessionResult::Shutdown => "shutdown",
            SessionResult::CancelForwarded => "cancel_forwarded",
            SessionResult::CancelFailed => "cancel_failed",
            SessionResult::CancelUnmatched => "cancel_unmatched",
            SessionResult::NoReplica => "no_replica",
            SessionResult::HandoffFailed => "handoff_failed",
        }
    }
}

/// The `result` label of `pgleader_health_checks_total`.
pub const CHECK_RESULTS: [&str; 3] = ["ok", "failed", "lost"];
/// Roles, as `topology::Role::as_str` spells them (this module may not import topology).
pub const ROLES: [&str; 4] = ["unknown", "primary", "replica", "down"];
/// The `reason` label of `pgleader_sessions_cut_total`, as `topology::CutReason::as_str` spells them.
pub const CUT_REASONS: [&str; 8] =
    ["leader_changed", "recovery", "older_timeline", "down", "removed", "lease", "lag", "other_system"];
/// The `task` label of `pgleader_task_restarts_total`: background tasks restarted after a panic.
pub const RESTARTED_TASKS: [&str; 3] = ["health_checker", "etcd_reader", "spare_filler"];

/// What happened to spare connections (`proxy::spares`), for `pgleader_spare_connections_total{event}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpareEvent {
    /// Connected and put in the pool.
    Opened,
    /// Carried a client's startup packet.
    Used,
    /// Found closed when taken, or failed during a handshake (the client was retried fresh).
    Dead,
    /// Closed unused at `spare_max_age`.
    Expired,
    /// Closed because the leader, epoch or address changed, the pool shrank, or the drain began.
    Dropped,
    /// A connect to the leader failed.
    Failed,
}

impl SpareEvent {
    pub const ALL: [SpareEvent; 6] = [
        SpareEvent::Opened,
        SpareEvent::Used,
        SpareEvent::Dead,
        SpareEvent::Expired,
        SpareEvent::Dropped,
        SpareEvent::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SpareEvent::Opened => "opened",
            SpareEvent::Used => "used",
            SpareEvent::Dead => "dead",
            SpareEvent::Expired => "expired",
            SpareEvent::Dropped => "dropped",
            SpareEvent::Failed => "failed",
        }
    }
}

/// Every metric pgleader exports.
pub struct Metrics {
    registry: Registry,
    pub backend_up: IntGaugeVec,
    pub backend_role: IntGaugeVec,
    pub leader: IntGaugeVec,
    pub leader_changes: IntCounter,
    pub split_brain: IntGauge,
    pub clients_waiting: IntGauge,
    /// Sessions of the main listener.
    pub sessions_active: IntGaugeVec,
    /// Sessions of the read-only listener.
    pub read_sessions_active: IntGaugeVec,
    /// Client connections each worker thread runs (`proxy::balance`).
    pub worker_connections: IntGaugeVec,
    /// A replica's lag behind the leader, as pgleader over-estimates it (rule 10); only replicas
    /// with a measured lag have a series.
    pub replica_lag_bytes: IntGaugeVec,
    pub replica_lag_seconds: prometheus::GaugeVec,
    /// Replicas that may take new read sessions; exported only with `[read_only]`.
    pub replicas_in_bounds: IntGauge,
    read_registered: AtomicBool,
    pub sessions: IntCounterVec,
    pub sessions_cut: IntCounterVec,
    pub task_restarts: IntCounterVec,
    /// `pgleader_session_bytes_total`, sharded by thread (the byte pump adds to them per message).
    pub bytes_client_to_backend: ShardedCounter,
    pub bytes_backend_to_client: ShardedCounter,
    pub health_checks: IntCounterVec,
    pub health_check_duration: HistogramVec,
    pub leader_wait: Histogram,
    pub config_reloads: IntCounterVec,
    /// 1 while etcd reads succeed. The `etcd_*` metrics are exported only with `[etcd]`
    /// ([`Metrics::set_etcd_enabled`]), so an SQL-only pgleader raises no etcd alert.
    pub etcd_up: IntGauge,
    /// 1 for the member Patroni's leader key names (`other` for a member not configured here).
    pub etcd_leader: IntGaugeVec,
    /// Seconds since the read that last confirmed a leader (NaN before the first).
    pub etcd_confirmation_age: Gauge,
    pub etcd_read_duration: Histogram,
    /// 1 while the fail-safe fallback routes on SQL alone.
    pub etcd_failsafe_fallback: IntGauge,
    etcd_registered: AtomicBool,
    /// Spare connections to the leader ready for a new session (`[proxy] spare_connections`).
    pub spares_ready: IntGauge,
    /// What happened to spare connections, by event (see `proxy::spares::SpareEvent`).
    pub spare_events: IntCounterVec,
}

impl Metrics {
    /// Registers every metric and pre-initialises the series of `backends`.
    pub fn new(backends: &[String]) -> Metrics {
        let bytes = IntCounterVec::new(
            Opts::new("pgleader_session_bytes_total", "Bytes spliced, by direction"),
            &["direction"],
        )
        .expect("valid metric");
        let build_info = gauge_vec("pgleader_build_info", "Always 1; the version label is pgleader's", &["version"]);
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let m = Metrics {
            registry: Registry::new(),
            backend_up: gauge_vec(
                "pgleader_backend_up",
                "1 if the backend's latest health check succeeded",
                &["backend"],
            ),
            backend_role: gauge_vec(
                "pgleader_backend_role",
                "1 for the backend's current role (unknown, primary, replica, down)",
                &["backend", "role"],
            ),
            leader: gauge_vec("pgleader_leader", "1 for the backend new sessions are routed to", &["backend"]),
            leader_changes: IntCounter::new("pgleader_leader_changes_total", "Times the routed leader changed")
                .expect("valid metric"),
            split_brain: IntGauge::new(
                "pgleader_split_brain",
                "1 while several primaries are routable and none is strictly newer (no leader)",
            )
            .expect("valid metric"),
            clients_waiting: IntGauge::new("pgleader_clients_waiting", "Clients waiting for a leader")
                .expect("valid metric"),
            sessions_active: gauge_vec(
                "pgleader_sessions_active",
                "Client sessions spliced to a backend",
                &["backend"],
            ),
            read_sessions_active: gauge_vec(
                "pgleader_read_sessions_active",
                "Client sessions of the read-only listener spliced to a backend",
                &["backend"],
            ),
            worker_connections: gauge_vec(
                "pgleader_worker_connections",
                "Client connections run by each worker thread, from accept to close (both listeners)",
                &["worker"],
            ),
            replica_lag_bytes: gauge_vec(
                "pgleader_replica_lag_bytes",
                "Bytes of WAL a replica's replay is behind the leader (over-estimated, never under)",
                &["backend"],
            ),
            replica_lag_seconds: prometheus::GaugeVec::new(
                Opts::new(
                    "pgleader_replica_lag_seconds",
                    "How long a replica's replay has stayed behind a leader position pgleader saw (0: caught up)",
                ),
                &["backend"],
            )
            .expect("valid metric"),
            replicas_in_bounds: IntGauge::new(
                "pgleader_replicas_in_bounds",
                "Replicas within [read_only]'s lag bounds: they take new read-only sessions",
            )
            .expect("valid metric"),
            read_registered: AtomicBool::new(false),
            sessions: IntCounterVec::new(
                Opts::new("pgleader_sessions_total", "Client connections by how they ended"),
                &["result"],
            )
            .expect("valid metric"),
            sessions_cut: IntCounterVec::new(
                Opts::new("pgleader_sessions_cut_total", "Sessions closed by pgleader (result cut), by reason"),
                &["reason"],
            )
            .expect("valid metric"),
            task_restarts: IntCounterVec::new(
                Opts::new(
                    "pgleader_task_restarts_total",
                    "Background tasks that ended unexpectedly (a panic) and were restarted",
                ),
                &["task"],
            )
            .expect("valid metric"),
            bytes_client_to_backend: ShardedCounter::new(bytes.with_label_values(&["client_to_backend"])),
            bytes_backend_to_client: ShardedCounter::new(bytes.with_label_values(&["backend_to_client"])),
            health_checks: IntCounterVec::new(
                Opts::new("pgleader_health_checks_total", "Health checks by result (ok, failed, lost)"),
                &["backend", "result"],
            )
            .expect("valid metric"),
            health_check_duration: HistogramVec::new(
                HistogramOpts::new("pgleader_health_check_duration_seconds", "Duration of successful health checks")
                    .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]),
                &["backend"],
            )
            .expect("valid metric"),
            leader_wait: Histogram::with_opts(
                HistogramOpts::new("pgleader_leader_wait_seconds", "Time new clients waited for a leader")
                    .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            )
            .expect("valid metric"),
            config_reloads: IntCounterVec::new(
                Opts::new("pgleader_config_reloads_total", "Configuration reloads by result (ok, error)"),
                &["result"],
            )
            .expect("valid metric"),
            etcd_up: IntGauge::new("pgleader_etcd_up", "1 while linearizable reads of Patroni's keys in etcd succeed")
                .expect("valid metric"),
            etcd_leader: gauge_vec(
                "pgleader_etcd_leader",
                "1 for the member Patroni's leader key in etcd names (other: a member not configured here)",
                &["member"],
            ),
            etcd_confirmation_age: Gauge::new(
                "pgleader_etcd_confirmation_age_seconds",
                "Seconds since the etcd read that last confirmed a leader's lease (NaN before the first)",
            )
            .expect("valid metric"),
            etcd_read_duration: Histogram::with_opts(
                HistogramOpts::new("pgleader_etcd_read_duration_seconds", "Duration of successful etcd reads")
                    .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]),
            )
            .expect("valid metric"),
            etcd_failsafe_fallback: IntGauge::new(
                "pgleader_etcd_failsafe_fallback",
                "1 while etcd is unreachable and Patroni's fail-safe mode lets pgleader route on SQL alone",
            )
            .expect("valid metric"),
            etcd_registered: AtomicBool::new(false),
            spares_ready: IntGauge::new(
                "pgleader_spare_connections",
                "Spare connections to the leader, opened ahead of time, ready for a new session",
            )
            .expect("valid metric"),
            spare_events: IntCounterVec::new(
                Opts::new(
                    "pgleader_spare_connections_total",
                    "Spare connections by event (opened, used, dead, expired, dropped, failed)",
                ),
                &["event"],
            )
            .expect("valid metric"),
        };
        m.etcd_confirmation_age.set(f64::NAN);
        let collectors: [Box<dyn prometheus::core::Collector>; 22] = [
            Box::new(m.backend_up.clone()),
            Box::new(m.backend_role.clone()),
            Box::new(m.leader.clone()),
            Box::new(m.leader_changes.clone()),
            Box::new(m.split_brain.clone()),
            Box::new(m.clients_waiting.clone()),
            Box::new(m.sessions_active.clone()),
            Box::new(m.read_sessions_active.clone()),
            Box::new(m.worker_connections.clone()),
            Box::new(m.replica_lag_bytes.clone()),
            Box::new(m.replica_lag_seconds.clone()),
            Box::new(m.sessions.clone()),
            Box::new(m.sessions_cut.clone()),
            Box::new(m.task_restarts.clone()),
            Box::new(bytes),
            Box::new(m.health_checks.clone()),
            Box::new(m.health_check_duration.clone()),
            Box::new(m.leader_wait.clone()),
            Box::new(m.config_reloads.clone()),
            Box::new(build_info),
            Box::new(m.spares_ready.clone()),
            Box::new(m.spare_events.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        for r in SessionResult::ALL {
            m.sessions.with_label_values(&[r.as_str()]);
        }
        for r in ["ok", "error"] {
            m.config_reloads.with_label_values(&[r]);
        }
        for r in CUT_REASONS {
            m.sessions_cut.with_label_values(&[r]);
        }
        for t in RESTARTED_TASKS {
            m.task_restarts.with_label_values(&[t]);
        }
        for e in SpareEvent::ALL {
            m.spare_events.with_label_values(&[e.as_str()]);
        }
        m.add_backends(backends);
        m
    }

    /// Pre-initialises the series of newly configured backends.
    pub fn add_backends(&self, backends: &[String]) {
        for b in backends {
            self.backend_up.with_label_values(&[b]);
            self.leader.with_label_values(&[b]);
            self.sessions_active.with_label_values(&[b]);
            self.read_sessions_active.with_label_values(&[b]);
            self.health_check_duration.with_label_values(&[b]);
            for role in ROLES {
                self.backend_role.with_label_values(&[b, role]);
            }
            for r in CHECK_RESULTS {
                self.health_checks.with_label_values(&[b, r]);
            }
        }
    }

    /// Drops the series of a backend removed from the config.
    pub fn remove_backend(&self, backend: &str) {
        let _ = self.backend_up.remove_label_values(&[backend]);
        let _ = self.leader.remove_label_values(&[backend]);
        let _ = self.sessions_active.remove_label_values(&[backend]);
        let _ = self.read_sessions_active.remove_label_values(&[backend]);
        let _ = self.replica_lag_bytes.remove_label_values(&[backend]);
        let _ = self.replica_lag_seconds.remove_label_values(&[backend]);
        let _ = self.health_check_duration.remove_label_values(&[backend]);
        for role in ROLES {
            let _ = self.backend_role.remove_label_values(&[backend, role]);
        }
        for r in CHECK_RESULTS {
            let _ = self.health_checks.remove_label_values(&[backend, r]);
        }
    }

    /// Drops the `pgleader_etcd_leader` series of a Patroni member no backend names any more.
    pub fn remove_member(&self, member: &str) {
        let _ = self.etcd_leader.remove_label_values(&[member]);
    }

    /// Exports (or stops exporting) the `pgleader_etcd_*` metrics, as `[etcd]` is configured.
    pub fn set_etcd_enabled(&self, enabled: bool, members: &[String]) {
        let collectors = || -> [Box<dyn prometheus::core::Collector>; 5] {
            [
                Box::new(self.etcd_up.clone()),
                Box::new(self.etcd_leader.clone()),
                Box::new(self.etcd_confirmation_age.clone()),
                Box::new(self.etcd_read_duration.clone()),
                Box::new(self.etcd_failsafe_fallback.clone()),
            ]
        };
        let was = self.etcd_registered.swap(enabled, Ordering::SeqCst);
        match (was, enabled) {
            (false, true) => collectors().into_iter().for_each(|c| {
                let _ = self.registry.register(c);
            }),
            (true, false) => collectors().into_iter().for_each(|c| {
                let _ = self.registry.unregister(c);
            }),
            _ => {}
        }
        self.etcd_leader.reset();
        for m in members.iter().map(String::as_str).chain(["other"]) {
            self.etcd_leader.with_label_values(&[m]);
        }
    }

    /// Exports (or stops exporting) `pgleader_replicas_in_bounds`, as `[read_only]` is configured.
    pub fn set_read_enabled(&self, enabled: bool) {
        let was = self.read_registered.swap(enabled, Ordering::SeqCst);
        let c = || Box::new(self.replicas_in_bounds.clone());
        match (was, enabled) {
            (false, true) => drop(self.registry.register(c())),
            (true, false) => drop(self.registry.unregister(c())),
            _ => {}
        }
    }

    /// Sets one backend's lag series; `None` removes them (not a replica, or not measured).
    pub fn set_replica_lag(&self, backend: &str, lag: Option<(Option<u64>, f64)>) {
        match lag {
            Some((bytes, seconds)) => {
                match bytes {
                    Some(b) => {
                        self.replica_lag_bytes.with_label_values(&[backend]).set(i64::try_from(b).unwrap_or(i64::MAX))
                    }
                    None => drop(self.replica_lag_bytes.remove_label_values(&[backend])),
                }
                self.replica_lag_seconds.with_label_values(&[backend]).set(seconds);
            }
            None => {
                let _ = self.replica_lag_bytes.remove_label_values(&[backend]);
                let _ = self.replica_lag_seconds.remove_label_values(&[backend]);
            }
        }
    }

    /// Counts one finished client connection.
    pub fn session_ended(&self, result: SessionResult) {
        self.sessions.with_label_values(&[result.as_str()]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        self.bytes_client_to_backend.export();
        self.bytes_backend_to_client.export();
        let mut out = Vec::with_capacity(8 * 1024);
        // Encoding into a Vec cannot fail for I/O reasons; a failure would be a registry bug.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            out.extend_from_slice(format!("# encode error: {e}\n").as_bytes());
        }
        out
    }
}

/// Shards of a [`ShardedCounter`]: threads beyond this many share shards (round robin).
const SHARDS: usize = 16;

/// A counter added to from every runtime thread per message: each thread adds to its own shard,
/// on its own cache line, so the threads never contend for one line; a scrape sums the shards
/// into the exported Prometheus counter.
pub struct ShardedCounter {
    shards: Box<[Shard]>,
    exported: IntCounter,
    /// Serialises [`ShardedCounter::export`], so two scrapes cannot both add the same bytes.
    exporting: Mutex<()>,
}

/// One cache line (two, against adjacent-line prefetch) per shard.
#[repr(align(128))]
#[derive(Default)]
struct Shard(AtomicU64);

thread_local! {
    /// This thread's shard, assigned round robin on first use.
    static SHARD: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS
    };
}

impl ShardedCounter {
    /// Sums into `exported`, which must not be added to otherwise.
    pub fn new(exported: IntCounter) -> ShardedCounter {
        ShardedCounter { shards: (0..SHARDS).map(|_| Shard::default()).collect(), exported, exporting: Mutex::new(()) }
    }

    /// Adds `n` to this thread's shard.
    pub fn inc_by(&self, n: u64) {
        let i = SHARD.with(|i| *i);
        self.shards[i].0.fetch_add(n, Ordering::Relaxed);
    }

    /// The total so far.
    pub fn get(&self) -> u64 {
        self.shards.iter().map(|s| s.0.load(Ordering::Relaxed)).fold(0, u64::wrapping_add)
    }

    /// Brings the exported counter up to the total.
    fn export(&self) {
        let _one_at_a_time = self.exporting.lock();
        let (total, exported) = (self.get(), self.exported.get());
        if total > exported {
            self.exported.inc_by(total - exported);
        }
    }
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_preinitialised_and_encoded() {
        let m = Metrics::new(&["a".to_owned()]);
        m.bytes_client_to_backend.inc_by(5);
        m.session_ended(SessionResult::Cut);
        let text = String::from_utf8(m.encode()).unwrap();
        for line in [
            "pgleader_backend_up{backend=\"a\"} 0",
            "pgleader_backend_role{backend=\"a\",role=\"down\"} 0",
            "pgleader_sessions_total{result=\"cut\"} 1",
            "pgleader_sessions_total{result=\"no_leader\"} 0",
            "pgleader_session_bytes_total{direction=\"client_to_backend\"} 5",
            "pgleader_leader_wait_seconds_count 0",
            "pgleader_split_brain 0",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        m.remove_backend("a");
        assert!(!String::from_utf8(m.encode()).unwrap().contains("backend=\"a\""));
    }

    #[test]
    fn sharded_bytes_are_summed_once_per_scrape() {
        let m = std::sync::Arc::new(Metrics::new(&[]));
        let threads: Vec<_> = (0..20)
            .map(|_| {
                let m = std::sync::Arc::clone(&m);
                std::thread::spawn(move || (0..100).for_each(|_| m.bytes_backend_to_client.inc_by(3)))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let line = "pgleader_session_bytes_total{direction=\"backend_to_client\"} 6000\n";
        assert!(String::from_utf8(m.encode()).unwrap().contains(line));
        assert!(String::from_utf8(m.encode()).unwrap().contains(line), "a second scrape adds nothing");
    }
}
