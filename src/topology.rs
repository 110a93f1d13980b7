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
mod tests {
    use super::*;
    use proptest::prelude::*;

    const POLICY: Policy = Policy { rise: 1, fall: 3, stale_after: Duration::from_secs(10) };

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 5432))
    }
    fn primary(tl: u32, sys: u64) -> Observation {
        Observation::Checked(Probe { address: addr(), in_recovery: false, timeline: Some(tl), system_id: Some(sys) })
    }
    fn replica(sys: u64) -> Observation {
        Observation::Checked(Probe { address: addr(), in_recovery: true, timeline: None, system_id: Some(sys) })
    }
    fn failed() -> Observation {
        Observation::Failed { error: "timeout".into() }
    }
    fn lost() -> Observation {
        Observation::Lost { error: "connection reset".into() }
    }

    fn backends(n: u32) -> Vec<Backend> {
        (0..n)
            .map(|i| Backend {
                id: BackendId(i),
                name: format!("b{i}"),
                address: format!("h:{i}"),
                state: BackendState::default(),
            })
            .collect()
    }

    /// Feeds observations in order and returns the final table.
    fn run(n: u32, policy: &Policy, events: &[(usize, Observation)]) -> RoutingTable {
        let t0 = Instant::now();
        let mut states = backends(n);
        let mut table = RoutingTable::initial();
        for (i, (b, obs)) in events.iter().enumerate() {
            let at = t0 + Duration::from_millis(i as u64);
            states[*b].state = states[*b].state.observe(obs, at);
            table = decide(&table, &states, policy, at);
        }
        table
    }

    #[test]
    fn table_driven() {
        struct Case {
            name: &'static str,
            events: Vec<(usize, Observation)>,
            leader: Option<usize>,
            reason: Reason,
        }
        let cases = vec![
            Case { name: "nothing checked yet", events: vec![], leader: None, reason: Reason::Starting },
            Case {
                name: "primary and replica",
                events: vec![(0, primary(1, 7)), (1, replica(7))],
                leader: Some(0),
                reason: Reason::SolePrimary,
            },
            Case {
                name: "two replicas",
                events: vec![(0, replica(7)), (1, replica(7))],
                leader: None,
                reason: Reason::NoPrimary,
            },
            Case {
                name: "promoted replica beside a running old primary",
                events: vec![(0, primary(1, 7)), (1, replica(7)), (1, primary(2, 7))],
                leader: Some(1),
                reason: Reason::NewestTimeline,
            },
            Case {
                name: "same timeline twice is split brain",
                events: vec![(0, primary(1, 7)), (1, primary(1, 7))],
                leader: None,
                reason: Reason::SplitBrainSameTimeline,
            },
            Case {
                name: "different systems is split brain",
                events: vec![(0, primary(1, 7)), (1, primary(5, 8))],
                leader: None,
                reason: Reason::SplitBrainDifferentSystems,
            },
            Case {
                name: "unknown system is split brain",
                events: vec![
                    (0, primary(1, 7)),
                    (
                        1,
                        Observation::Checked(Probe {
                            address: addr(),
                            in_recovery: false,
                            timeline: Some(2),
                            system_id: None,
                        }),
                    ),
                ],
                leader: None,
                reason: Reason::SplitBrainDifferentSystems,
            },
            Case {
                name: "one failed check holds new sessions",
                events: vec![(0, primary(1, 7)), (0, failed())],
                leader: None,
                reason: Reason::NoPrimary,
            },
            Case {
                name: "a lost connection holds new sessions at once",
                events: vec![(0, primary(1, 7)), (0, lost())],
                leader: None,
                reason: Reason::NoPrimary,
            },
            Case {
                name: "a good check after a loss restores routing",
                events: vec![(0, primary(1, 7)), (0, lost()), (0, primary(1, 7))],
                leader: Some(0),
                reason: Reason::SolePrimary,
            },
            Case {
                name: "an older timeline stays excluded after the newer primary vanishes",
                events: vec![(0, primary(1, 7)), (1, primary(2, 7)), (1, lost()), (0, primary(1, 7))],
                leader: None,
                reason: Reason::StaleTimeline,
            },
        ];
        for case in cases {
            let table = run(2, &POLICY, &case.events);
            assert_eq!(table.leader, case.leader.map(|i| BackendId(i as u32)), "{}", case.name);
            assert_eq!(table.reason, case.reason, "{}", case.name);
        }
    }

    #[test]
    fn rise_needs_consecutive_primary_checks() {
        let policy = Policy { rise: 2, ..POLICY };
        assert_eq!(run(1, &policy, &[(0, primary(1, 7))]).leader, None);
        assert_eq!(run(1, &policy, &[(0, primary(1, 7)), (0, primary(1, 7))]).leader, Some(BackendId(0)));
        assert_eq!(run(1, &policy, &[(0, primary(1, 7)), (0, failed()), (0, primary(1, 7))]).leader, None);
    }

    #[test]
    fn sessions_are_cut_by_fall_recovery_or_another_leader_but_not_by_a_lost_connection() {
        let a = BackendId(0);
        let t = run(2, &POLICY, &[(0, primary(1, 7)), (0, lost())]);
        assert!(t.session_allowed(a), "one lost health connection must not cut sessions");
        let t = run(2, &POLICY, &[(0, primary(1, 7)), (0, failed()), (0, failed())]);
        assert!(t.session_allowed(a));
        let t = run(2, &POLICY, &[(0, primary(1, 7)), (0, failed()), (0, failed()), (0, failed())]);
        assert!(!t.session_allowed(a), "fall failures cut sessions");
        assert_eq!(t.backends[0].role, Role::Down);
        let t = run(2, &POLICY, &[(0, primary(1, 7)), (0, replica(7))]);
        assert!(!t.session_allowed(a), "a demoted node's sessions are cut");
        let t = run(2, &POLICY, &[(0, primary(1, 7)), (1, primary(2, 7))]);
        assert_eq!(t.cut_reason(a), Some(CutReason::OlderTimeline), "an older timeline cuts sessions");
        assert!(t.session_allowed(BackendId(1)));
        let t = run(2, &POLICY, &[(0, primary(1, 7)), (1, primary(2, 7)), (1, lost())]);
        assert_eq!(t.leader, None);
        assert_eq!(t.cut_reason(a), Some(CutReason::OlderTimeline), "also when the newer primary glitches");
        let t = run(2, &POLICY, &[(0, primary(1, 7)), (1, replica(7))]);
        assert_eq!(t.cut_reason(BackendId(1)), Some(CutReason::Recovery));
        let t = run(2, &POLICY, &[(0, primary(1, 7)), (1, replica(7)), (0, failed()), (0, failed()), (0, failed())]);
        assert_eq!(t.cut_reason(a), Some(CutReason::Down));
        assert_eq!(t.cut_reason(BackendId(9)), Some(CutReason::Removed));
    }

    #[test]
    fn sessions_on_an_older_timeline_are_cut_while_the_newer_primary_is_still_rising() {
        let policy = Policy { rise: 3, ..POLICY };
        let a = BackendId(0);
        let t = run(2, &policy, &[(0, primary(1, 7)), (0, primary(1, 7)), (0, primary(1, 7))]);
        assert_eq!(t.leader, Some(a));
        let t = run(2, &policy, &[(0, primary(1, 7)), (0, primary(1, 7)), (0, primary(1, 7)), (1, primary(2, 7))]);
        assert_eq!(t.leader, None, "the newer primary has not risen yet, and the old one is stale");
        assert_eq!(t.cut_reason(a), Some(CutReason::OlderTimeline));
    }

    #[test]
    fn admission_needs_the_same_leader_in_the_same_epoch() {
        let t = run(2, &POLICY, &[(0, primary(1, 7)), (1, replica(7))]);
        let (leader, epoch) = (t.leader.unwrap(), t.epoch);
        assert!(t.admits(leader, epoch));
        assert!(!t.admits(BackendId(1), epoch), "not the leader");
        assert!(!t.admits(leader, epoch + 1), "another epoch");
        let later = run(2, &POLICY, &[(0, primary(1, 7)), (1, replica(7)), (0, lost()), (0, primary(1, 7))]);
        assert_eq!(later.leader, Some(leader));
        assert!(!later.admits(leader, epoch), "the same backend re-elected is a new epoch: retry");
        assert_eq!(t.leader_target(), Some((leader, addr())));
    }

    #[test]
    fn stale_observations_are_not_routable() {
        let t0 = Instant::now();
        let mut s = backends(1);
        s[0].state = s[0].state.observe(&primary(1, 7), t0);
        let fresh = decide(&RoutingTable::initial(), &s, &POLICY, t0 + Duration::from_secs(1));
        assert_eq!(fresh.leader, Some(BackendId(0)));
        let stale = decide(&fresh, &s, &POLICY, t0 + Duration::from_secs(11));
        assert_eq!(stale.leader, None);
        assert_eq!(stale.epoch, fresh.epoch + 1);
    }

    fn arb_obs() -> impl Strategy<Value = Observation> {
        prop_oneof![
            (1u32..4, 1u64..3).prop_map(|(tl, sys)| primary(tl, sys)),
            (1u64..3).prop_map(replica),
            Just(failed()),
            Just(lost()),
        ]
    }

    proptest! {
        #[test]
        fn safety_invariants(
            events in proptest::collection::vec((0usize..3, arb_obs()), 0..40),
            rise in 1u32..3,
            fall in 1u32..4,
        ) {
            let policy = Policy { rise, fall, stale_after: Duration::from_secs(60) };
            let t0 = Instant::now();
            let mut states = backends(3);
            let mut table = RoutingTable::initial();
            for (i, (b, obs)) in events.iter().enumerate() {
                let now = t0 + Duration::from_millis(i as u64);
                states[*b].state = states[*b].state.observe(obs, now);
                let next = decide(&table, &states, &policy, now);
                // Determinism.
                prop_assert_eq!(&next, &decide(&table, &states, &policy, now));
                if let Some(l) = next.leader {
                    let s = &states[l.0 as usize].state;
                    let probe = s.last_probe.expect("a leader has been checked");
                    // Never a leader that is not a routable primary.
                    prop_assert!(!probe.in_recovery && s.fail_streak == 0 && !s.lost && s.primary_streak >= rise);
                    // Never a leader when another routable primary shares its timeline or differs in system.
                    for other in &states {
                        let (id, other) = (other.id, &other.state);
                        if id == l || !other.is_routable_primary(&policy, now) { continue; }
                        let op = other.last_probe.expect("checked");
                        prop_assert_eq!(op.system_id, probe.system_id);
                        prop_assert!(op.timeline < probe.timeline);
                    }
                    // The leader's timeline is the highest ever seen for its system.
                    prop_assert_eq!(next.max_timelines.get(&probe.system_id).copied(), probe.timeline);
                }
                // No session stays on a primary below the highest timeline seen for its system.
                for b in &next.backends {
                    if let Some(p) = b.state.last_probe.filter(|p| !p.in_recovery) {
                        let newest = next.max_timelines.get(&p.system_id).copied();
                        if p.timeline < newest {
                            prop_assert!(!next.session_allowed(b.id), "a session stays on an older timeline");
                        }
                    }
                }
                // Admission: only the leader, only in its own epoch.
                for b in &next.backends {
                    prop_assert_eq!(next.admits(b.id, next.epoch), next.leader == Some(b.id));
                    prop_assert!(!next.admits(b.id, next.epoch + 1));
                }
                // The leader's own sessions are never cut.
                if let Some(l) = next.leader {
                    prop_assert!(next.session_allowed(l));
                }
                // The epoch moves exactly when the leader does.
                prop_assert_eq!(next.epoch != table.epoch, next.leader != table.leader);
                // No change without an input change.
                let again = decide(&next, &states, &policy, now);
                prop_assert!(!again.routing_differs(&next));
                table = next;
            }
        }
    }
}
