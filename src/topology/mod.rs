//! The leader decision: observations in, a [`RoutingTable`] out. Pure: no I/O, no clock reads
//! (callers pass `now`), no logging, no tokio.
//!
//! Rules (DESIGN.md "Leader decision rules"):
//! 1. A backend is a *routable primary* when its latest check succeeded and said
//!    `pg_is_in_recovery() = false`, it has had `rise` such checks in a row, and its health
//!    connection has not been lost since.
//! 2. A failed check counts toward `fall`. A lost connection ([`Observation::Lost`]) makes the
//!    backend non-routable at once without counting toward `fall`; the next good check clears it.
//! 3. Sessions on a backend are cut when another backend is the leader, when it reports
//!    recovery, when it is a primary below the highest timeline seen for its system, or when it
//!    reaches `fall` failed checks ([`RoutingTable::cut_reason`] says which).
//! 4. One routable primary: the leader. None: no leader. Several: see below.
//! 8. Admission is atomic with the route: a client connected to the leader of epoch `e` is
//!    admitted only while the current table still names that leader in epoch `e` and, with
//!    fencing, its confirmation is still valid ([`RoutingTable::admits`]); otherwise it is a
//!    retry the client never sees.
//! 9. Fencing (`[etcd]`, [`FencePolicy`]): in `enforce` mode the SQL leader of rules 1-4 leads
//!    only while it holds a valid confirmation of Patroni's leader lease ([`lease::LeaseView`]):
//!    the latest read named its member, the member is registered with a matching `conn_url`, and
//!    `now < valid_until`. The table carries that `valid_until`; past it the leader is gone and
//!    its sessions are cut ([`CutReason::Lease`]), as are the sessions of any primary that holds
//!    no valid confirmation. One exception, Patroni's fail-safe: etcd unreachable, Patroni's
//!    configuration (read since start) has `failsafe_mode: true`, every backend passes its SQL
//!    check, and the last read named the SQL leader's member: then the SQL leader leads without a
//!    confirmation ([`Reason::FailsafeFallback`]). In `observe` mode the table routes as without
//!    fencing and reports, in [`FenceState`], what enforcing would do.
//!
//! 10. Reads (`[read_only]`, [`read`]): a read session goes to a replica *in bounds* (its check
//!     succeeded, it streams from the SQL leader's system and timeline, and its over-estimated lag
//!     is within `max_lag_bytes` and `max_lag`), the one with the fewest read sessions; with none,
//!     to the table's leader under `fallback = "leader"`, else it is refused. Never to a backend
//!     out of recovery but that leader ([`RoutingTable::target`]). A read session on a replica is
//!     cut when the replica is down, follows another system, or has been out of bounds for `fall`
//!     checks in a row; on a primary it obeys rules 3 and 9 like any session
//!     ([`RoutingTable::cut_reason_for`]), so a promoted replica keeps its read sessions.
//!
//! Addresses: each successful check carries the socket address the checker resolved and used
//! ([`Probe::address`]); clients are connected to exactly that address, never to a fresh
//! resolution of the configured name.
//!
//! Timelines: the table remembers the highest timeline it has ever seen a primary of each system
//! (`system_identifier`) report. A primary below that is *stale* (a demoted leader that thawed, or
//! a node that has not yet learned it lost a failover) and is never elected — so two primaries
//! resolve to the strictly newer timeline, and the older one stays excluded even if the newer one
//! then disappears. Routable primaries of different (or unknown) systems are a misconfiguration,
//! and several primaries left on the same newest timeline is split brain: no leader either way. The memory resets only when pgleader restarts, so
//! restoring a cluster onto an *older* timeline needs a restart (see README, troubleshooting).

pub mod lease;
pub mod read;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A backend's identity: allocated once per configured (name, address) and never reused, so a
/// reload that adds or removes backends cannot make a session's id point at another server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendId(pub u32);

/// The knobs of the decision, from `[health]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Consecutive primary checks before a backend becomes routable.
    pub rise: u32,
    /// Consecutive failed checks before a backend is down and its sessions are cut.
    pub fall: u32,
    /// A backend with no observation for this long is not routable (its checker is stuck).
    pub stale_after: Duration,
    /// Fencing with Patroni's leader lease (`[etcd]`); `None`: SQL only.
    pub fence: Option<FencePolicy>,
    /// The read-only listener's bounds (`[read_only]`); `None`: no read routing.
    pub read: Option<read::ReadPolicy>,
}

/// How the leader lease is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FencePolicy {
    pub mode: FenceMode,
    /// How long one read's confirmation lasts at most.
    pub max_staleness: Duration,
}

/// `[etcd] mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceMode {
    /// Route only to a confirmed leader.
    Enforce,
    /// Decide and report, but route as without fencing (a safe rollout).
    Observe,
}

impl FenceMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FenceMode::Enforce => "enforce",
            FenceMode::Observe => "observe",
        }
    }
}

/// What one successful check saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// The address the check resolved and ran on: the only address clients are sent to.
    pub address: SocketAddr,
    /// `pg_is_in_recovery()`.
    pub in_recovery: bool,
    /// The current timeline of a primary; `None` for a replica.
    pub timeline: Option<u32>,
    /// `pg_control_system().system_identifier`, read once per health connection.
    pub system_id: Option<u64>,
    /// Where its WAL is (lag, rule 10); `None` if the check could not read it.
    pub wal: Option<read::Wal>,
}

/// One event about one backend, from its health checker or from a failed client connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// A check succeeded.
    Checked(Probe),
    /// A check failed (error or timeout); counts toward `fall`.
    Failed { error: String },
    /// The health connection was lost, or a client could not be connected: definitive, so the
    /// backend is not routable until the next good check; does not count toward `fall`.
    Lost { error: String },
}

/// An observation of one backend at one moment, as sent to the elector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub backend: BackendId,
    pub observation: Observation,
    pub at: Instant,
    /// How long a successful check took (for `/status`).
    pub latency: Option<Duration>,
    pub source: Source,
}

/// Who made an observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The backend's own health checker.
    HealthCheck,
    /// A client connection that the backend refused, reset or answered 57P03: the checker must
    /// re-check on a *new* connection, since its established one can outlive what clients see
    /// (a smart shutdown keeps existing sessions while refusing new ones).
    Client,
}

/// One leader change, kept in the table's recent history for `/status` and the status page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderChange {
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    pub epoch: u64,
    pub from: Option<String>,
    pub to: Option<String>,
    pub reason: Reason,
}

/// How many leader changes the table remembers.
pub const HISTORY_LEN: usize = 20;

/// The role a backend shows in `/status` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Unknown,
    Primary,
    Replica,
    Down,
}

impl Role {
    /// Every role, for pre-initialised metrics.
    pub const ALL: [Role; 4] = [Role::Unknown, Role::Primary, Role::Replica, Role::Down];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Unknown => "unknown",
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Down => "down",
        }
    }
}

/// What is known about one backend: folded from its observations by [`BackendState::observe`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BackendState {
    /// The latest successful check, kept through failures until the backend is down.
    pub last_probe: Option<Probe>,
    /// Consecutive successful checks that said primary.
    pub primary_streak: u32,
    /// Consecutive successful checks (any role).
    pub ok_streak: u32,
    /// Consecutive failed checks.
    pub fail_streak: u32,
    /// Lost since the last successful check.
    pub lost: bool,
    pub checks_total: u64,
    pub failures_total: u64,
    /// The latest failure, phrased for an operator.
    pub last_error: Option<String>,
    pub observed_at: Option<Instant>,
    /// Duration of the latest successful check.
    pub last_check_latency: Option<Duration>,
    /// When the latest successful check was made.
    pub probed_at: Option<Instant>,
}

impl BackendState {
    /// Folds one observation made at `at` into the state.
    #[must_use]
    pub fn observe(&self, obs: &Observation, at: Instant) -> BackendState {
        let mut next = self.clone();
        next.observed_at = Some(at);
        match obs {
            Observation::Checked(probe) => {
                next.checks_total += 1;
                next.ok_streak = next.ok_streak.saturating_add(1);
                next.fail_streak = 0;
                next.lost = false;
                next.primary_streak = if probe.in_recovery { 0 } else { next.primary_streak.saturating_add(1) };
                next.last_probe = Some(*probe);
                next.probed_at = Some(at);
            }
            Observation::Failed { error } => {
                next.checks_total += 1;
                next.failures_total += 1;
                next.ok_streak = 0;
                next.primary_streak = 0;
                next.fail_streak = next.fail_streak.saturating_add(1);
                next.last_error = Some(error.clone());
            }
            Observation::Lost { error } => {
                next.lost = true;
                next.ok_streak = 0;
                next.primary_streak = 0;
                next.last_error = Some(error.clone());
            }
        }
        next
    }

    /// The role to show: `down` after `fall` failures, else what the latest check saw.
    pub fn role(&self, policy: &Policy) -> Role {
        match self.last_probe {
            _ if self.fail_streak >= policy.fall => Role::Down,
            Some(p) if p.in_recovery => Role::Replica,
            Some(_) => Role::Primary,
            None => Role::Unknown,
        }
    }

    /// Its latest check succeeded recently and the health connection is up (any role): what
    /// "passes its SQL check" means for the fail-safe fallback.
    fn passes(&self, policy: &Policy, now: Instant) -> bool {
        let fresh = self.observed_at.is_some_and(|t| now.saturating_duration_since(t) <= policy.stale_after);
        fresh && self.last_probe.is_some() && self.fail_streak == 0 && !self.lost
    }

    /// Rule 1, plus freshness.
    fn is_routable_primary(&self, policy: &Policy, now: Instant) -> bool {
        let fresh = self.observed_at.is_some_and(|t| now.saturating_duration_since(t) <= policy.stale_after);
        let primary = self.last_probe.is_some_and(|p| !p.in_recovery);
        primary && fresh && !self.lost && self.fail_streak == 0 && self.primary_streak >= policy.rise.max(1)
    }

    /// Rule 3, the backend's own half: why its sessions must go, if they must. `newest` is the
    /// highest timeline seen for the backend's system.
    fn own_cut(&self, policy: &Policy, newest: Option<u32>) -> Option<CutReason> {
        match self.last_probe {
            _ if self.fail_streak >= policy.fall => Some(CutReason::Down),
            Some(p) if p.in_recovery => Some(CutReason::Recovery),
            Some(p) if p.timeline < newest => Some(CutReason::OlderTimeline),
            _ => None,
        }
    }
}

/// Why a session must be closed (rule 3). Every variant is a cut the client sees as a closed
/// connection; the access log and `pgleader_sessions_total` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CutReason {
    /// Another backend is the leader now.
    LeaderChanged,
    /// The backend reports `pg_is_in_recovery() = true`: it was demoted.
    Recovery,
    /// The backend is a primary below the highest timeline seen for its system.
    OlderTimeline,
    /// The backend reached `fall` failed checks.
    Down,
    /// A reload removed the backend (or changed its address).
    Removed,
    /// Fencing: the backend holds no valid confirmation of Patroni's leader lease.
    Lease,
    /// A read session's replica was out of the lag bounds for `fall` checks in a row.
    Lag,
    /// A read session's replica follows another system than the leader's.
    OtherSystem,
}

impl CutReason {
    /// A stable identifier for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CutReason::LeaderChanged => "leader_changed",
            CutReason::Recovery => "recovery",
            CutReason::OlderTimeline => "older_timeline",
            CutReason::Down => "down",
            CutReason::Removed => "removed",
            CutReason::Lease => "lease",
            CutReason::Lag => "lag",
            CutReason::OtherSystem => "other_system",
        }
    }
}

/// Why the table has (or has not) a leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No decision yet: no backend has been checked.
    Starting,
    /// Exactly one routable primary.
    SolePrimary,
    /// Other primaries are routable but on an older timeline of the same system.
    NewestTimeline,
    /// No routable primary.
    NoPrimary,
    /// The only routable primaries are on a timeline older than one already seen.
    StaleTimeline,
    /// Two or more primaries of one system on the same (highest) timeline.
    SplitBrainSameTimeline,
    /// Two or more primaries of different (or unknown) systems: a misconfiguration.
    SplitBrainDifferentSystems,
    /// Fencing: the SQL leader's lease is not confirmed (the key names another member, is absent,
    /// or its lease ran out) while etcd answers.
    LeaseNotConfirmed,
    /// Fencing: no recent etcd read confirms the SQL leader (reads fail, or none has succeeded
    /// yet) and its last confirmation has lapsed.
    EtcdUnreachable,
    /// Fencing: the SQL leader's member is not registered in Patroni's scope, or its `conn_url`
    /// does not match the backend's address.
    MemberNotVerified,
    /// Fencing: etcd unreachable, Patroni's fail-safe mode on and every backend healthy: the SQL
    /// leader leads without a confirmation.
    FailsafeFallback,
}

impl Reason {
    /// A sentence for `/status`, `/readyz` and the client's error message.
    pub fn describe(self) -> &'static str {
        match self {
            Reason::Starting => "no health check has completed yet",
            Reason::SolePrimary => "the only routable primary",
            Reason::NewestTimeline => "the primary on the newest timeline; other primaries are stale",
            Reason::NoPrimary => "no backend is a healthy primary (failover in progress, or all primaries down)",
            Reason::StaleTimeline => {
                "the only primaries are on a timeline older than one already seen (a demoted leader)"
            }
            Reason::SplitBrainSameTimeline => {
                "split brain: several primaries on the same timeline; refusing to pick one"
            }
            Reason::SplitBrainDifferentSystems => {
                "split brain: primaries belong to different database systems (misconfigured backends)"
            }
            Reason::LeaseNotConfirmed => {
                "the leader lease is not confirmed by etcd: Patroni's leader key names another member, or none"
            }
            Reason::EtcdUnreachable => {
                "the leader lease is not confirmed by etcd: no recent quorum read of etcd confirms it (etcd unreachable?)"
            }
            Reason::MemberNotVerified => {
                "the primary's Patroni member is not registered in etcd with a conn_url matching its address"
            }
            Reason::FailsafeFallback => {
                "etcd is unreachable; Patroni's failsafe_mode is on and every backend is healthy: routing on SQL alone"
            }
        }
    }

    /// A stable identifier for JSON and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Starting => "starting",
            Reason::SolePrimary => "sole_primary",
            Reason::NewestTimeline => "newest_timeline",
            Reason::NoPrimary => "no_primary",
            Reason::StaleTimeline => "stale_timeline",
            Reason::SplitBrainSameTimeline => "split_brain_same_timeline",
            Reason::SplitBrainDifferentSystems => "split_brain_different_systems",
            Reason::LeaseNotConfirmed => "lease_not_confirmed",
            Reason::EtcdUnreachable => "etcd_unreachable",
            Reason::MemberNotVerified => "member_not_verified",
            Reason::FailsafeFallback => "failsafe_fallback",
        }
    }

    /// A refusal caused by fencing (the client's 57P03 is counted as `no_lease`).
    pub fn is_lease(self) -> bool {
        matches!(self, Reason::LeaseNotConfirmed | Reason::EtcdUnreachable | Reason::MemberNotVerified)
    }

    pub fn is_split_brain(self) -> bool {
        matches!(self, Reason::SplitBrainSameTimeline | Reason::SplitBrainDifferentSystems)
    }
}

/// A configured backend and what is known about it: the input of [`decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub id: BackendId,
    pub name: String,
    /// `host:port` as configured; the checker resolves it at each check.
    pub address: String,
    /// Patroni's member name (fencing).
    pub member: String,
    /// Fencing: the member's `conn_url` must match `address`.
    pub verify_conn_url: bool,
    pub state: BackendState,
}

/// One backend as the decision saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendView {
    pub id: BackendId,
    pub name: String,
    pub address: String,
    pub state: BackendState,
    pub role: Role,
    /// New sessions may be routed here (rule 1, not stale).
    pub routable: bool,
    /// Why existing sessions here must go, as far as this backend's own state goes (rules 3 and
    /// 9); `None`: they may stay.
    pub cut: Option<CutReason>,
    /// Patroni's member name.
    pub member: String,
    /// Fencing: why this backend can never be confirmed (member unknown, `conn_url` mismatch).
    pub member_problem: Option<String>,
    /// Fencing: sessions here must end at this instant unless a newer table extends it (the
    /// backend's confirmation); `None` without fencing, or under the fail-safe fallback.
    pub lease_until: Option<Instant>,
    /// A replica's lag behind the SQL leader (rule 10); `None` for a primary, or with no leader.
    pub lag: Option<read::Lag>,
    /// A replica in bounds: it may take new read sessions (only with `[read_only]`).
    pub readable: bool,
    /// Why a replica is not in bounds, if it is not.
    pub read_block: Option<ReadBlock>,
    /// Why read sessions on this replica must go (rule 10), if they must.
    pub read_cut: Option<CutReason>,
    /// Consecutive measured checks that found this replica out of bounds.
    pub out_of_bounds_streak: u32,
    /// The replica check (`checks_total`) the streak last counted: each check counts once, when
    /// its lag is measured (a leader check has followed it).
    pub counted_check: u64,
}

/// Why a replica takes no new read sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadBlock {
    /// No SQL leader to measure against.
    NoLeader,
    /// Its latest check failed, is stale, or its health connection is lost.
    CheckFailed,
    /// Its WAL receiver is not streaming (or the health user cannot see it: grant pg_monitor).
    NotStreaming,
    /// It follows another system than the leader's.
    OtherSystem,
    /// It streams another timeline than the leader's.
    OtherTimeline,
    /// Its lag is not known yet (no leader check has followed its check).
    LagUnknown,
    /// Further behind than `max_lag_bytes`.
    LagBytes,
    /// Behind for longer than `max_lag`.
    LagTime,
}

impl ReadBlock {
    pub fn as_str(self) -> &'static str {
        match self {
            ReadBlock::NoLeader => "no leader to measure its lag against",
            ReadBlock::CheckFailed => "its latest health check failed",
            ReadBlock::NotStreaming => "its WAL receiver is not streaming",
            ReadBlock::OtherSystem => "it follows another database system (or a system identifier is unknown)",
            ReadBlock::OtherTimeline => "it streams another timeline than the leader's",
            ReadBlock::LagUnknown => "its lag is not measured yet",
            ReadBlock::LagBytes => "more than max_lag_bytes behind",
            ReadBlock::LagTime => "behind for longer than max_lag",
        }
    }
}

/// Which listener a session came in on: the decision differs per route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// The main listener: the leader only.
    Write,
    /// The read-only listener (rule 10).
    Read,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Write => "main",
            Route::Read => "read_only",
        }
    }
}

/// Where a new session goes: a backend, the epoch it was chosen in, and its checked address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub id: BackendId,
    pub epoch: u64,
    pub address: SocketAddr,
}

impl BackendView {
    /// The address the latest successful check used: where clients are connected.
    pub fn resolved(&self) -> Option<SocketAddr> {
        self.state.last_probe.map(|p| p.address)
    }
}

/// The published routing state: the only thing sessions, the admin server and checkers read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingTable {
    pub leader: Option<BackendId>,
    pub reason: Reason,
    /// Increases whenever `leader` changes.
    pub epoch: u64,
    /// In configuration order.
    pub backends: Vec<BackendView>,
    /// The highest timeline seen per system identifier; carried from table to table.
    pub max_timelines: BTreeMap<Option<u64>, u32>,
    /// Recent leader changes, oldest first; appended by the elector, carried by [`decide`].
    pub history: Vec<LeaderChange>,
    /// The fencing decision and the etcd view it was made from; `None` without `[etcd]`.
    pub fence: Option<FenceState>,
    /// `[read_only]`'s bounds; `None`: no read routing.
    pub read: Option<read::ReadPolicy>,
    /// The SQL leader's recent WAL positions (rule 10); carried from table to table.
    pub lag: read::LagTracker,
}

/// What fencing decided, for `/status` and for `observe` mode's report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceState {
    pub mode: FenceMode,
    pub view: lease::LeaseView,
    /// Where enforcing routes (in `observe` mode: would route).
    pub leader: Option<BackendId>,
    pub reason: Reason,
    /// The fail-safe fallback is in effect.
    pub failsafe: bool,
}

impl RoutingTable {
    /// The table before any check: no leader.
    pub fn initial() -> RoutingTable {
        RoutingTable {
            leader: None,
            reason: Reason::Starting,
            epoch: 0,
            backends: Vec::new(),
            max_timelines: BTreeMap::new(),
            history: Vec::new(),
            fence: None,
            read: None,
            lag: read::LagTracker::default(),
        }
    }

    /// The leader's view, if there is a leader.
    pub fn leader_view(&self) -> Option<&BackendView> {
        self.leader.and_then(|id| self.backend(id))
    }

    /// The view of one backend; `None` once a reload removed it.
    pub fn backend(&self, id: BackendId) -> Option<&BackendView> {
        self.backends.iter().find(|b| b.id == id)
    }

    /// Rule 3: why a session on `backend` must be closed now, or `None` if it may stay. The
    /// backend's own state is named first (it says more than "another leader"). With no leader
    /// sessions stay unless their own backend condemns them: one lost health connection must
    /// not kill a healthy primary's sessions.
    pub fn cut_reason(&self, backend: BackendId) -> Option<CutReason> {
        let Some(view) = self.backend(backend) else { return Some(CutReason::Removed) };
        view.cut.or_else(|| self.leader.filter(|l| *l != backend).map(|_| CutReason::LeaderChanged))
    }

    /// [`RoutingTable::cut_reason`] at `now`: also a lapsed confirmation (rule 9), without
    /// waiting for the elector to notice.
    pub fn cut_reason_at(&self, backend: BackendId, now: Instant) -> Option<CutReason> {
        self.cut_reason(backend).or_else(|| {
            let lapsed = self.backend(backend)?.lease_until.is_some_and(|v| now >= v);
            lapsed.then_some(CutReason::Lease)
        })
    }

    /// When sessions on `backend` must be re-examined at the latest (its confirmation's end).
    pub fn lease_until(&self, backend: BackendId) -> Option<Instant> {
        self.backend(backend)?.lease_until
    }

    /// Rule 3 as a yes/no: may a session on `backend` stay open?
    pub fn session_allowed(&self, backend: BackendId) -> bool {
        self.cut_reason(backend).is_none()
    }

    /// Rule 8: may a client connected to `backend` while it led epoch `epoch` see its first byte
    /// from it now? Only while this table still names that leader in that epoch, and (rule 9)
    /// before its confirmation ends.
    pub fn admits(&self, backend: BackendId, epoch: u64, now: Instant) -> bool {
        self.epoch == epoch && self.leader == Some(backend) && self.lease_until(backend).is_none_or(|v| now < v)
    }

    /// The leader's `valid_until` (rule 9), if it leads on a confirmation.
    pub fn valid_until(&self) -> Option<Instant> {
        self.leader.and_then(|l| self.lease_until(l))
    }

    /// The earliest instant at which this table stops being true by itself (a confirmation
    /// ending): the elector re-decides then.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.backends.iter().filter_map(|b| b.lease_until).min()
    }

    /// The leader and the address clients are connected to, if there is a leader.
    pub fn leader_target(&self) -> Option<(BackendId, SocketAddr)> {
        let view = self.leader_view()?;
        Some((view.id, view.resolved()?))
    }

    /// Where a new session on `route` goes now (rules 8 and 10), if anywhere. Reads: the replica
    /// in bounds with the fewest read sessions (`read_sessions`; ties in configuration order),
    /// else the leader under `fallback = "leader"`.
    pub fn target(&self, route: Route, read_sessions: impl Fn(BackendId) -> usize, now: Instant) -> Option<Target> {
        let write = || {
            let (id, address) = self.leader_target()?;
            self.admits(id, self.epoch, now).then_some(Target { id, epoch: self.epoch, address })
        };
        match route {
            Route::Write => write(),
            Route::Read => {
                let replica = self
                    .backends
                    .iter()
                    .filter(|b| b.readable)
                    .filter_map(|b| Some((b.id, b.resolved()?)))
                    .min_by_key(|(id, _)| read_sessions(*id));
                match replica {
                    Some((id, address)) => Some(Target { id, epoch: self.epoch, address }),
                    None if self.falls_back_to_leader() => write(),
                    None => None,
                }
            }
        }
    }

    fn falls_back_to_leader(&self) -> bool {
        self.read.is_some_and(|r| r.fallback == read::ReadFallback::Leader)
    }

    /// Rule 8 per route: may a client connected to `target` see its first byte from it now?
    pub fn admits_route(&self, route: Route, target: &Target, now: Instant) -> bool {
        let leads = self.admits(target.id, target.epoch, now);
        match route {
            Route::Write => leads,
            Route::Read => {
                let replica =
                    self.backend(target.id).is_some_and(|b| b.readable && b.resolved() == Some(target.address));
                replica || (self.falls_back_to_leader() && leads)
            }
        }
    }

    /// Rules 3, 9 and 10 per route: why a session on `backend` must close now, if it must.
    pub fn cut_reason_for(&self, route: Route, backend: BackendId, now: Instant) -> Option<CutReason> {
        let Some(view) = self.backend(backend) else { return Some(CutReason::Removed) };
        let primary = view.state.last_probe.is_none_or(|p| !p.in_recovery);
        match route {
            Route::Read if !primary => view.read_cut,
            _ => self.cut_reason_at(backend, now),
        }
    }

    /// Why no replica takes read sessions, for the client's 57P03 and logs.
    pub fn read_refusal(&self) -> String {
        let blocked: Vec<String> = self
            .backends
            .iter()
            .filter(|b| b.state.last_probe.is_some_and(|p| p.in_recovery) || b.read_block.is_some())
            .map(|b| {
                let lag = b.lag.map_or(String::new(), |l| {
                    let bytes = l.bytes.map_or_else(|| "? bytes".to_owned(), |n| format!("{n} bytes"));
                    format!(", lag {bytes} / {:.1} s", l.time.as_secs_f64())
                });
                format!("{}: {}{lag}", b.name, b.read_block.map_or("in bounds", ReadBlock::as_str))
            })
            .collect();
        let bounds = self
            .read
            .map_or(String::new(), |r| format!(" (max_lag_bytes {}, max_lag {:?})", r.max_lag_bytes, r.max_lag));
        if blocked.is_empty() {
            format!("no replica is checked and streaming{bounds}")
        } else {
            format!("no replica within the lag bounds{bounds}: {}", blocked.join("; "))
        }
    }

    /// Whether anything that sessions or checkers act on differs (counters and errors do not).
    pub fn routing_differs(&self, other: &RoutingTable) -> bool {
        self.leader != other.leader
            || self.epoch != other.epoch
            || self.reason != other.reason
            || self.backends.len() != other.backends.len()
            || self.backends.iter().zip(&other.backends).any(|(a, b)| {
                // `lease_until` moves with every etcd read: sessions re-read it when their own
                // timer fires, so a renewal wakes no one.
                a.id != b.id
                    || a.routable != b.routable
                    || a.cut != b.cut
                    || a.role != b.role
                    || a.resolved() != b.resolved()
                    || a.member_problem != b.member_problem
                    || a.readable != b.readable
                    || a.read_cut != b.read_cut
            })
    }
}

/// Decides the leader from every backend's state and, with fencing, the etcd view (`lease`;
/// `None` is the same as a view with no read yet). Deterministic: same inputs, same table.
pub fn decide(
    prev: &RoutingTable,
    backends: &[Backend],
    lease: Option<&lease::LeaseView>,
    policy: &Policy,
    now: Instant,
) -> RoutingTable {
    let states: Vec<&BackendState> = backends.iter().map(|b| &b.state).collect();
    let mut max_timelines = prev.max_timelines.clone();
    for probe in states.iter().filter_map(|s| s.last_probe) {
        if let (false, Some(tl)) = (probe.in_recovery, probe.timeline) {
            let seen = max_timelines.entry(probe.system_id).or_insert(tl);
            *seen = (*seen).max(tl);
        }
    }
    let newest = |s: &BackendState| s.last_probe.and_then(|p| max_timelines.get(&p.system_id).copied());
    let is_current = |s: &BackendState| s.last_probe.is_some_and(|p| p.timeline.is_some() && p.timeline == newest(s));

    let mut views: Vec<BackendView> = backends
        .iter()
        .map(|b| BackendView {
            id: b.id,
            name: b.name.clone(),
            address: b.address.clone(),
            state: b.state.clone(),
            role: b.state.role(policy),
            routable: b.state.is_routable_primary(policy, now) && is_current(&b.state),
            cut: b.state.own_cut(policy, newest(&b.state)),
            member: b.member.clone(),
            member_problem: None,
            lease_until: None,
            lag: None,
            readable: false,
            read_block: None,
            read_cut: None,
            out_of_bounds_streak: 0,
            counted_check: 0,
        })
        .collect();

    let primaries: Vec<usize> = (0..states.len()).filter(|&i| states[i].is_routable_primary(policy, now)).collect();
    let current: Vec<usize> = primaries.iter().copied().filter(|&i| views[i].routable).collect();
    let system = |i: usize| states[i].last_probe.and_then(|p| p.system_id);
    let one_system = primaries
        .first()
        .is_some_and(|&first| system(first).is_some() && primaries.iter().all(|&i| system(i) == system(first)));
    let (sql_leader, sql_reason) = match current.as_slice() {
        _ if primaries.len() > 1 && !one_system => (None, Reason::SplitBrainDifferentSystems),
        [] if states.iter().all(|s| s.observed_at.is_none()) => (None, Reason::Starting),
        [] if primaries.is_empty() => (None, Reason::NoPrimary),
        [] => (None, Reason::StaleTimeline),
        [only] if primaries.len() == 1 => (Some(*only), Reason::SolePrimary),
        [only] => (Some(*only), Reason::NewestTimeline),
        _ => (None, Reason::SplitBrainSameTimeline),
    };

    let (leader, reason, fence) = match policy.fence {
        None => (sql_leader, sql_reason, None),
        Some(fp) => {
            let empty = lease::LeaseView::default();
            let view = lease.unwrap_or(&empty);
            let all_healthy = states.iter().all(|s| s.passes(policy, now));
            let fenced = fence(view, backends, sql_leader, sql_reason, all_healthy, now);
            for (v, b) in views.iter_mut().zip(backends) {
                v.member_problem = member_problem(view, b);
            }
            if fp.mode == FenceMode::Enforce {
                for (i, v) in views.iter_mut().enumerate() {
                    let primary = v.state.last_probe.is_some_and(|p| !p.in_recovery);
                    let held = Some(i) == fenced.leader && fenced.failsafe;
                    let confirmed = if v.member_problem.is_none() { view.confirmed(&v.member, now) } else { None };
                    v.lease_until = confirmed.map(|c| c.valid_until).filter(|_| !held);
                    if primary && confirmed.is_none() && !held {
                        v.cut = v.cut.or(Some(CutReason::Lease));
                    }
                }
            }
            let state = FenceState {
                mode: fp.mode,
                view: view.clone(),
                leader: fenced.leader.map(|i| backends[i].id),
                reason: fenced.reason,
                failsafe: fenced.failsafe,
            };
            match fp.mode {
                FenceMode::Enforce => (fenced.leader, fenced.reason, Some(state)),
                FenceMode::Observe => (sql_leader, sql_reason, Some(state)),
            }
        }
    };
    let lag = reads(prev, backends, &mut views, sql_leader, policy, now);
    let leader = leader.map(|i| backends[i].id);
    if leader.is_none() {
        for v in &mut views {
            v.routable = false;
        }
    }
    let epoch = if leader != prev.leader { prev.epoch + 1 } else { prev.epoch };
    RoutingTable {
        leader,
        reason,
        epoch,
        backends: views,
        max_timelines,
        history: prev.history.clone(),
        fence,
        read: policy.read,
        lag,
    }
}

/// Rule 10: every replica's lag against the SQL leader (`reference`, an index into
/// `backends`), whether it is in bounds, and whether its read sessions must go. Returns the
/// tracker for the next table.
fn reads(
    prev: &RoutingTable,
    backends: &[Backend],
    views: &mut [BackendView],
    reference: Option<usize>,
    policy: &Policy,
    now: Instant,
) -> read::LagTracker {
    let leader = reference.map(|i| &backends[i]);
    let leader_probe = leader.and_then(|b| b.state.last_probe);
    // The leader's position as of the start of its check (`probed_at` is its end): a replica's
    // check that ended before it really was read before the leader's (see `read`).
    let sample = leader.and_then(|b| {
        let started = b.state.probed_at?.checked_sub(b.state.last_check_latency.unwrap_or_default())?;
        Some((b.state.last_probe?.wal?.lsn, started))
    });
    let tracker = prev.lag.with_sample(leader.map(|b| b.id), sample);
    let same_reference = prev.lag.reference() == tracker.reference();
    for (v, b) in views.iter_mut().zip(backends) {
        let Some(probe) = b.state.last_probe.filter(|p| p.in_recovery) else { continue };
        let before = prev.backend(b.id);
        let wal = probe.wal;
        if let (Some(w), Some(checked), Some(_)) = (wal, b.state.probed_at, leader) {
            let previous = before.and_then(|p| p.lag).filter(|_| same_reference);
            v.lag = Some(tracker.lag(w.lsn, checked, previous, now));
        }
        // A system that differs is a cut; one that is not known (its query failed) only blocks.
        let unknown_system = leader_probe.is_some_and(|l| l.system_id.is_none() || probe.system_id.is_none());
        let other_system = leader_probe.is_some_and(|l| l.system_id != probe.system_id) && !unknown_system;
        let block = match (leader_probe, wal, v.lag) {
            (None, _, _) => Some(ReadBlock::NoLeader),
            _ if !b.state.passes(policy, now) => Some(ReadBlock::CheckFailed),
            _ if other_system || unknown_system => Some(ReadBlock::OtherSystem),
            (_, None, _) => Some(ReadBlock::NotStreaming),
            (_, Some(w), _) if !w.streaming => Some(ReadBlock::NotStreaming),
            (Some(l), Some(w), _) if w.receive_timeline.is_none() || w.receive_timeline != l.timeline => {
                Some(ReadBlock::OtherTimeline)
            }
            (_, _, None | Some(read::Lag { bytes: None, .. })) => Some(ReadBlock::LagUnknown),
            (_, _, Some(lag)) => policy.read.and_then(|r| {
                if lag.bytes.is_some_and(|n| n > r.max_lag_bytes) {
                    Some(ReadBlock::LagBytes)
                } else if lag.time > r.max_lag {
                    Some(ReadBlock::LagTime)
                } else {
                    None
                }
            }),
        };
        v.read_block = block;
        v.readable = policy.read.is_some() && block.is_none();
        // Out of bounds counts once per successful check, when its lag is measured, and only
        // against a leader: a failed check counts toward `fall` instead, and with no leader there
        // is nothing to lag behind.
        let (streak, counted) = before.map_or((0, 0), |p| (p.out_of_bounds_streak, p.counted_check));
        let measured = b.state.probed_at.is_some_and(|at| tracker.paired(at));
        let count = measured && counted != b.state.checks_total && b.state.fail_streak == 0 && leader.is_some();
        (v.out_of_bounds_streak, v.counted_check) = match block {
            _ if !count => (streak, counted),
            Some(_) => (streak.saturating_add(1), b.state.checks_total),
            None => (0, b.state.checks_total),
        };
        v.read_cut = if b.state.fail_streak >= policy.fall {
            Some(CutReason::Down)
        } else if other_system {
            Some(CutReason::OtherSystem)
        } else if policy.read.is_some() && v.out_of_bounds_streak >= policy.fall {
            Some(CutReason::Lag)
        } else {
            None
        };
    }
    tracker
}

/// Rule 9's verdict on the SQL leader (an index into `backends`).
struct Fenced {
    leader: Option<usize>,
    reason: Reason,
    failsafe: bool,
}

fn fence(
    view: &lease::LeaseView,
    backends: &[Backend],
    sql_leader: Option<usize>,
    sql_reason: Reason,
    all_healthy: bool,
    now: Instant,
) -> Fenced {
    let refuse = |reason| Fenced { leader: None, reason, failsafe: false };
    let Some(i) = sql_leader else { return refuse(sql_reason) };
    let b = &backends[i];
    if view.read.is_none() {
        return refuse(Reason::EtcdUnreachable);
    }
    if member_problem(view, b).is_some() {
        return refuse(Reason::MemberNotVerified);
    }
    if view.confirmed(&b.member, now).is_some() {
        return Fenced { leader: Some(i), reason: sql_reason, failsafe: false };
    }
    // Patroni's fail-safe: it keeps its primary while it sees every member, and so can we
    // while we see every backend; never after etcd itself said the key moved.
    let failsafe = !view.reachable
        && view.patroni.is_some_and(|p| p.failsafe_mode)
        && all_healthy
        && view.revoked.is_none()
        && view.named() == Some(b.member.as_str());
    if failsafe {
        return Fenced { leader: Some(i), reason: Reason::FailsafeFallback, failsafe: true };
    }
    // The key names another member (or none): etcd's answer. It names this one but no fresh
    // read confirms it: reads fail or stopped.
    let elsewhere = view.reachable && view.named() != Some(b.member.as_str());
    refuse(if elsewhere { Reason::LeaseNotConfirmed } else { Reason::EtcdUnreachable })
}

/// Why `backend` can never be confirmed by the latest read, if it cannot.
fn member_problem(view: &lease::LeaseView, backend: &Backend) -> Option<String> {
    let read = view.read.as_ref()?;
    let Some(entry) = read.members.iter().find(|m| m.name == backend.member) else {
        return Some(format!("Patroni lists no member `{}` in its scope", backend.member));
    };
    if !backend.verify_conn_url {
        return None;
    }
    let (host, port) = backend.address.rsplit_once(':')?;
    let ours = (host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase(), port.parse::<u16>().ok()?);
    match entry.conn_url.as_deref() {
        None => Some(format!("member `{}` has no conn_url in etcd", backend.member)),
        Some(url) => match lease::conn_url_host_port(url) {
            Some(theirs) if theirs == ours => None,
            _ => Some(format!(
                "member `{}` advertises conn_url {url}, not this backend's address {} \
                 (set verify_conn_url = false if that is intended)",
                backend.member, backend.address
            )),
        },
    }
}

#[cfg(test)]
mod tests;
