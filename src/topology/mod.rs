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
//!    admitted only while the current table still names that leader in epoch `e`
//!    ([`RoutingTable::admits`]); otherwise it is a retry the client never sees.
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
        }
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
    /// Why existing sessions here must go, as far as this backend's own state goes (rule 3);
    /// `None`: they may stay.
    pub cut: Option<CutReason>,
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

    /// Rule 3 as a yes/no: may a session on `backend` stay open?
    pub fn session_allowed(&self, backend: BackendId) -> bool {
        self.cut_reason(backend).is_none()
    }

    /// Rule 8: may a client connected to `backend` while it led epoch `epoch` see its first byte
    /// from it now? Only while this table still names that leader in that epoch.
    pub fn admits(&self, backend: BackendId, epoch: u64) -> bool {
        self.epoch == epoch && self.leader == Some(backend)
    }

    /// The leader and the address clients are connected to, if there is a leader.
    pub fn leader_target(&self) -> Option<(BackendId, SocketAddr)> {
        let view = self.leader_view()?;
        Some((view.id, view.resolved()?))
    }

    /// Whether anything that sessions or checkers act on differs (counters and errors do not).
    pub fn routing_differs(&self, other: &RoutingTable) -> bool {
        self.leader != other.leader
            || self.epoch != other.epoch
            || self.reason != other.reason
            || self.backends.len() != other.backends.len()
            || self.backends.iter().zip(&other.backends).any(|(a, b)| {
                a.id != b.id
                    || a.routable != b.routable
                    || a.cut != b.cut
                    || a.role != b.role
                    || a.resolved() != b.resolved()
            })
    }
}

/// Decides the leader from every backend's state. Deterministic: same inputs, same table.
pub fn decide(prev: &RoutingTable, backends: &[Backend], policy: &Policy, now: Instant) -> RoutingTable {
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

    let views: Vec<BackendView> = backends
        .iter()
        .map(|b| BackendView {
            id: b.id,
            name: b.name.clone(),
            address: b.address.clone(),
            state: b.state.clone(),
            role: b.state.role(policy),
            routable: b.state.is_routable_primary(policy, now) && is_current(&b.state),
            cut: b.state.own_cut(policy, newest(&b.state)),
        })
        .collect();

    let primaries: Vec<usize> = (0..states.len()).filter(|&i| states[i].is_routable_primary(policy, now)).collect();
    let current: Vec<usize> = primaries.iter().copied().filter(|&i| views[i].routable).collect();
    let system = |i: usize| states[i].last_probe.and_then(|p| p.system_id);
    let one_system = primaries
        .first()
        .is_some_and(|&first| system(first).is_some() && primaries.iter().all(|&i| system(i) == system(first)));
    let (leader, reason) = match current.as_slice() {
        _ if primaries.len() > 1 && !one_system => (None, Reason::SplitBrainDifferentSystems),
        [] if states.iter().all(|s| s.observed_at.is_none()) => (None, Reason::Starting),
        [] if primaries.is_empty() => (None, Reason::NoPrimary),
        [] => (None, Reason::StaleTimeline),
        [only] if primaries.len() == 1 => (Some(backends[*only].id), Reason::SolePrimary),
        [only] => (Some(backends[*only].id), Reason::NewestTimeline),
        _ => (None, Reason::SplitBrainSameTimeline),
    };
    let mut views = views;
    if leader.is_none() {
        for v in &mut views {
            v.routable = false;
        }
    }
    let epoch = if leader != prev.leader { prev.epoch + 1 } else { prev.epoch };
    RoutingTable { leader, reason, epoch, backends: views, max_timelines, history: prev.history.clone() }
}

#[cfg(test)]
mod tests;
