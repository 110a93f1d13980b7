//! The decision's table-driven and property tests.

use super::*;
use proptest::prelude::*;

const POLICY: Policy = Policy { rise: 1, fall: 3, stale_after: Duration::from_secs(10), fence: None, read: None };

fn addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 5432))
}
fn primary(tl: u32, sys: u64) -> Observation {
    Observation::Checked(Probe {
        address: addr(),
        in_recovery: false,
        timeline: Some(tl),
        system_id: Some(sys),
        wal: None,
    })
}
fn replica(sys: u64) -> Observation {
    Observation::Checked(Probe { address: addr(), in_recovery: true, timeline: None, system_id: Some(sys), wal: None })
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
            member: format!("m{i}"),
            verify_conn_url: true,
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
        table = decide(&table, &states, None, policy, at);
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
                        wal: None,
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
    assert!(t.admits(leader, epoch, Instant::now()));
    assert!(!t.admits(BackendId(1), epoch, Instant::now()), "not the leader");
    assert!(!t.admits(leader, epoch + 1, Instant::now()), "another epoch");
    let later = run(2, &POLICY, &[(0, primary(1, 7)), (1, replica(7)), (0, lost()), (0, primary(1, 7))]);
    assert_eq!(later.leader, Some(leader));
    assert!(!later.admits(leader, epoch, Instant::now()), "the same backend re-elected is a new epoch: retry");
    assert_eq!(t.leader_target(), Some((leader, addr())));
}

#[test]
fn stale_observations_are_not_routable() {
    let t0 = Instant::now();
    let mut s = backends(1);
    s[0].state = s[0].state.observe(&primary(1, 7), t0);
    let fresh = decide(&RoutingTable::initial(), &s, None, &POLICY, t0 + Duration::from_secs(1));
    assert_eq!(fresh.leader, Some(BackendId(0)));
    let stale = decide(&fresh, &s, None, &POLICY, t0 + Duration::from_secs(11));
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
        let policy = Policy { rise, fall, stale_after: Duration::from_secs(60), fence: None, read: None };
        let t0 = Instant::now();
        let mut states = backends(3);
        let mut table = RoutingTable::initial();
        for (i, (b, obs)) in events.iter().enumerate() {
            let now = t0 + Duration::from_millis(i as u64);
            states[*b].state = states[*b].state.observe(obs, now);
            let next = decide(&table, &states, None, &policy, now);
            // Determinism.
            prop_assert_eq!(&next, &decide(&table, &states, None, &policy, now));
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
                prop_assert_eq!(next.admits(b.id, next.epoch, Instant::now()), next.leader == Some(b.id));
                prop_assert!(!next.admits(b.id, next.epoch + 1, Instant::now()));
            }
            // The leader's own sessions are never cut.
            if let Some(l) = next.leader {
                prop_assert!(next.session_allowed(l));
            }
            // The epoch moves exactly when the leader does.
            prop_assert_eq!(next.epoch != table.epoch, next.leader != table.leader);
            // No change without an input change.
            let again = decide(&next, &states, None, &policy, now);
            prop_assert!(!again.routing_differs(&next));
            table = next;
        }
    }
}

mod fencing {
    use super::*;
    use crate::topology::lease::{LeaderLease, LeaseEvent, LeaseRead, LeaseView, MemberEntry, PatroniConfig};

    const STALE: Duration = Duration::from_secs(3);

    fn policy(mode: FenceMode) -> Policy {
        Policy { fence: Some(FencePolicy { mode, max_staleness: STALE }), ..POLICY }
    }

    /// Every member registered with a conn_url matching its backend ("h:<i>").
    fn members(n: u32) -> Vec<MemberEntry> {
        (0..n)
            .map(|i| MemberEntry { name: format!("m{i}"), conn_url: Some(format!("postgres://h:{i}/postgres")) })
            .collect()
    }

    fn read_at(at: Instant, revision: i64, holder: Option<&str>, failsafe: bool) -> LeaseEvent {
        LeaseEvent::Read(LeaseRead {
            read_start: at,
            revision,
            endpoint: "http://e:2379".into(),
            leader: holder.map(|m| LeaderLease { member: m.into(), remaining: Some(Duration::from_secs(30)) }),
            patroni: Some(PatroniConfig {
                ttl: Some(30),
                loop_wait: Some(10),
                failsafe_mode: failsafe,
                ..Default::default()
            }),
            members: members(2),
        })
    }

    /// b0 primary and b1 replica, checked at `t0`.
    fn two(t0: Instant) -> Vec<Backend> {
        let mut b = backends(2);
        b[0].state = b[0].state.observe(&primary(1, 7), t0);
        b[1].state = b[1].state.observe(&replica(7), t0);
        b
    }

    #[test]
    fn the_sql_leader_leads_only_while_its_lease_is_confirmed() {
        let t0 = Instant::now();
        let b = two(t0);
        let p = policy(FenceMode::Enforce);
        let view = LeaseView::default().observe(&read_at(t0, 5, Some("m0"), false), STALE);
        let t = decide(&RoutingTable::initial(), &b, Some(&view), &p, t0);
        assert_eq!((t.leader, t.reason), (Some(BackendId(0)), Reason::SolePrimary));
        assert_eq!(t.valid_until(), Some(t0 + STALE));
        assert!(t.admits(BackendId(0), t.epoch, t0 + STALE - Duration::from_millis(1)));
        assert!(!t.admits(BackendId(0), t.epoch, t0 + STALE), "admission ends at valid_until");
        assert_eq!(t.cut_reason_at(BackendId(0), t0 + STALE), Some(CutReason::Lease), "sessions end at valid_until");
        assert_eq!(t.next_expiry(), Some(t0 + STALE), "the elector wakes then");
        let later = decide(&t, &b, Some(&view), &p, t0 + STALE);
        assert_eq!((later.leader, later.reason), (None, Reason::EtcdUnreachable), "no fresh read: lapsed");
        assert_eq!(later.cut_reason(BackendId(0)), Some(CutReason::Lease));
        let renewed = view.observe(&read_at(t0 + Duration::from_secs(1), 6, Some("m0"), false), STALE);
        let t = decide(&later, &b, Some(&renewed), &p, t0 + STALE);
        assert_eq!(t.leader, Some(BackendId(0)));
        assert_eq!(t.valid_until(), Some(t0 + Duration::from_secs(1) + STALE));
    }

    #[test]
    fn a_primary_whose_member_does_not_hold_the_key_is_never_the_leader() {
        let t0 = Instant::now();
        let b = two(t0);
        let p = policy(FenceMode::Enforce);
        for holder in [Some("m1"), None] {
            let view = LeaseView::default().observe(&read_at(t0, 5, holder, false), STALE);
            let t = decide(&RoutingTable::initial(), &b, Some(&view), &p, t0);
            assert_eq!((t.leader, t.reason), (None, Reason::LeaseNotConfirmed), "{holder:?}");
            assert_eq!(t.cut_reason(BackendId(0)), Some(CutReason::Lease), "its sessions are cut too");
            assert!(!t.backends[0].routable);
        }
        let t = decide(&RoutingTable::initial(), &b, None, &p, t0);
        assert_eq!((t.leader, t.reason), (None, Reason::EtcdUnreachable), "no read yet: fail closed");
    }

    #[test]
    fn unknown_members_and_mismatched_conn_urls_are_never_confirmed() {
        let t0 = Instant::now();
        let p = policy(FenceMode::Enforce);
        let mut b = two(t0);
        b[0].member = "ghost".into();
        let view = LeaseView::default().observe(&read_at(t0, 5, Some("ghost"), false), STALE);
        let t = decide(&RoutingTable::initial(), &b, Some(&view), &p, t0);
        assert_eq!((t.leader, t.reason), (None, Reason::MemberNotVerified));
        assert!(t.backends[0].member_problem.as_deref().unwrap().contains("no member `ghost`"));

        let mut b = two(t0);
        b[0].address = "other:0".into();
        let view = LeaseView::default().observe(&read_at(t0, 5, Some("m0"), false), STALE);
        let t = decide(&RoutingTable::initial(), &b, Some(&view), &p, t0);
        assert_eq!((t.leader, t.reason), (None, Reason::MemberNotVerified));
        assert!(t.backends[0].member_problem.as_deref().unwrap().contains("postgres://h:0/postgres"));
        b[0].verify_conn_url = false;
        let t = decide(&RoutingTable::initial(), &b, Some(&view), &p, t0);
        assert_eq!(t.leader, Some(BackendId(0)), "verify_conn_url = false accepts it");
    }

    #[test]
    fn the_failsafe_fallback_needs_patronis_failsafe_every_backend_healthy_and_the_same_member() {
        let t0 = Instant::now();
        let p = policy(FenceMode::Enforce);
        let after = t0 + STALE + Duration::from_secs(1);
        let down = LeaseEvent::ReadFailed { at: after, error: "no endpoint answered".into() };
        let view = LeaseView::default().observe(&read_at(t0, 5, Some("m0"), true), STALE).observe(&down, STALE);
        let mut b = backends(2);
        b[0].state = b[0].state.observe(&primary(1, 7), after);
        b[1].state = b[1].state.observe(&replica(7), after);
        let t = decide(&RoutingTable::initial(), &b, Some(&view), &p, after);
        assert_eq!((t.leader, t.reason), (Some(BackendId(0)), Reason::FailsafeFallback));
        assert!(t.fence.as_ref().unwrap().failsafe);
        assert_eq!(t.valid_until(), None, "no confirmation to end it");
        assert!(t.session_allowed(BackendId(0)));

        let off = LeaseView::default().observe(&read_at(t0, 5, Some("m0"), false), STALE).observe(&down, STALE);
        let t = decide(&RoutingTable::initial(), &b, Some(&off), &p, after);
        assert_eq!((t.leader, t.reason), (None, Reason::EtcdUnreachable), "failsafe_mode off: fail closed");

        let mut sick = b.clone();
        sick[1].state = sick[1].state.observe(&failed(), after);
        let t = decide(&RoutingTable::initial(), &sick, Some(&view), &p, after);
        assert_eq!((t.leader, t.reason), (None, Reason::EtcdUnreachable), "a backend unreachable: maybe a minority");
        assert_eq!(t.cut_reason(BackendId(0)), Some(CutReason::Lease));

        let revoked = view.observe(&LeaseEvent::Changed { revision: 6, member: None }, STALE);
        let t = decide(&RoutingTable::initial(), &b, Some(&revoked), &p, after);
        assert_eq!(t.leader, None, "etcd said the key went away: no fallback");
    }

    #[test]
    fn observe_mode_routes_as_sql_and_reports_what_enforcing_would_do() {
        let t0 = Instant::now();
        let b = two(t0);
        let view = LeaseView::default().observe(&read_at(t0, 5, Some("m1"), false), STALE);
        let t = decide(&RoutingTable::initial(), &b, Some(&view), &policy(FenceMode::Observe), t0);
        assert_eq!((t.leader, t.reason), (Some(BackendId(0)), Reason::SolePrimary));
        let f = t.fence.as_ref().unwrap();
        assert_eq!((f.leader, f.reason, f.mode), (None, Reason::LeaseNotConfirmed, FenceMode::Observe));
        assert_eq!(t.valid_until(), None);
        assert!(t.session_allowed(BackendId(0)));
    }

    fn arb_lease(t0: Instant) -> impl Strategy<Value = LeaseEvent> {
        let holder = prop_oneof![Just(None), Just(Some("m0")), Just(Some("m1")), Just(Some("m2"))];
        prop_oneof![
            (0u64..20_000, 1i64..30, holder.clone(), any::<bool>(), 0u64..40).prop_map(move |(ms, rev, h, fs, ttl)| {
                match read_at(t0 + Duration::from_millis(ms), rev, h, fs) {
                    LeaseEvent::Read(mut r) => {
                        if let Some(l) = &mut r.leader {
                            l.remaining = Some(Duration::from_secs(ttl));
                        }
                        LeaseEvent::Read(r)
                    }
                    other => other,
                }
            }),
            Just(LeaseEvent::ReadFailed { at: t0, error: "down".into() }),
            (1i64..30, holder).prop_map(|(revision, h)| LeaseEvent::Changed { revision, member: h.map(str::to_owned) }),
        ]
    }

    #[derive(Debug, Clone)]
    enum Step {
        Health(usize, Observation),
        Lease(LeaseEvent),
        Wait(u64),
    }

    fn arb_step(t0: Instant) -> impl Strategy<Value = Step> {
        prop_oneof![
            (0usize..3, arb_obs()).prop_map(|(b, o)| Step::Health(b, o)),
            arb_lease(t0).prop_map(Step::Lease),
            (0u64..4000).prop_map(Step::Wait),
        ]
    }

    proptest! {
        #[test]
        fn fencing_invariants(steps in proptest::collection::vec(arb_step(Instant::now()), 0..50), observe in any::<bool>()) {
            let t0 = Instant::now();
            let mode = if observe { FenceMode::Observe } else { FenceMode::Enforce };
            let p = policy(mode);
            let sql_only = Policy { fence: None, ..p };
            let mut states = backends(3);
            let mut view = LeaseView::default();
            let (mut table, mut plain) = (RoutingTable::initial(), RoutingTable::initial());
            let mut now = t0;
            for step in &steps {
                now += Duration::from_millis(1);
                match step {
                    Step::Health(b, o) => states[*b].state = states[*b].state.observe(o, now),
                    Step::Lease(e) => view = view.observe(e, STALE),
                    Step::Wait(ms) => now += Duration::from_millis(*ms),
                }
                let next = decide(&table, &states, Some(&view), &p, now);
                plain = decide(&plain, &states, None, &sql_only, now);
                prop_assert_eq!(&next, &decide(&table, &states, Some(&view), &p, now), "deterministic");
                if mode == FenceMode::Observe {
                    prop_assert_eq!(next.leader, plain.leader, "observe routes as SQL alone");
                    prop_assert_eq!(next.valid_until(), None);
                } else if let Some(l) = next.leader {
                    let b = next.backend(l).expect("the leader is listed");
                    // Never a leader SQL would not pick, nor one the latest read does not name.
                    prop_assert_eq!(plain.leader, Some(l));
                    prop_assert_eq!(view.named(), Some(b.member.as_str()));
                    prop_assert!(b.member_problem.is_none());
                    let f = next.fence.as_ref().expect("fencing state");
                    match view.confirmed(&b.member, now) {
                        Some(c) => {
                            prop_assert_eq!(next.valid_until(), Some(c.valid_until));
                            prop_assert!(c.valid_until <= c.read_start + STALE);
                            prop_assert!(!f.failsafe);
                        }
                        None => {
                            prop_assert!(f.failsafe && !view.reachable && view.patroni.is_some_and(|c| c.failsafe_mode));
                            prop_assert!(states.iter().all(|s| s.state.passes(&p, now)));
                        }
                    }
                    prop_assert!(next.admits(l, next.epoch, now));
                }
                if mode == FenceMode::Enforce {
                    // No session stays on a primary without a valid confirmation (or the fallback).
                    for b in &next.backends {
                        let primary = b.state.last_probe.is_some_and(|p| !p.in_recovery);
                        let covered = b.member_problem.is_none() && view.confirmed(&b.member, now).is_some();
                        let fallback = next.leader == Some(b.id) && next.fence.as_ref().is_some_and(|f| f.failsafe);
                        if primary && !covered && !fallback {
                            prop_assert!(next.cut_reason_at(b.id, now).is_some(), "a session stays on an unconfirmed primary");
                        }
                        if let Some(until) = b.lease_until {
                            prop_assert!(next.cut_reason_at(b.id, until).is_some(), "sessions end at lease_until");
                        }
                    }
                }
                prop_assert_eq!(next.epoch != table.epoch, next.leader != table.leader);
                table = next;
            }
        }
    }
}

/// Rule 10: lag and the read target, against a model of one primary and two replicas whose true
/// WAL positions the test keeps itself.
mod reads {
    use super::*;
    use crate::topology::read::{Lag, ReadFallback, ReadPolicy, Wal};

    const SYS: u64 = 7;

    fn read_policy(fallback: ReadFallback) -> Policy {
        Policy { read: Some(ReadPolicy { max_lag_bytes: 1000, max_lag: Duration::from_secs(2), fallback }), ..POLICY }
    }

    fn primary_at(lsn: u64) -> Observation {
        let wal = Some(Wal { lsn, streaming: false, receive_timeline: None });
        Observation::Checked(Probe {
            address: addr(),
            in_recovery: false,
            timeline: Some(1),
            system_id: Some(SYS),
            wal,
        })
    }

    fn replica_at(lsn: u64, streaming: bool, timeline: u32, sys: u64) -> Observation {
        let wal = Some(Wal { lsn, streaming, receive_timeline: Some(timeline) });
        Observation::Checked(Probe { address: addr(), in_recovery: true, timeline: None, system_id: Some(sys), wal })
    }

    /// Feeds (backend, observation) pairs 100 ms apart; returns the final table and its instant.
    fn feed(policy: &Policy, events: &[(usize, Observation)]) -> (RoutingTable, Instant) {
        let t0 = Instant::now();
        let mut states = backends(3);
        let mut table = RoutingTable::initial();
        let mut at = t0;
        for (i, (b, obs)) in events.iter().enumerate() {
            at = t0 + Duration::from_millis(100 * i as u64);
            states[*b].state = states[*b].state.observe(obs, at);
            table = decide(&table, &states, None, policy, at);
        }
        (table, at)
    }

    #[test]
    fn an_idle_primary_does_not_make_a_caught_up_replica_look_behind() {
        let mut events = Vec::new();
        for _ in 0..50 {
            events.push((0, primary_at(5000)));
            events.push((1, replica_at(5000, true, 1, SYS)));
        }
        let (table, now) = feed(&read_policy(ReadFallback::Refuse), &events);
        let r = table.backend(BackendId(1)).unwrap();
        assert_eq!(r.lag, Some(Lag { bytes: Some(0), time: Duration::ZERO }));
        assert!(r.readable, "{r:?}");
        assert_eq!(table.target(Route::Read, |_| 0, now).map(|t| t.id), Some(BackendId(1)));
    }

    #[test]
    fn a_replica_behind_takes_no_reads_and_loses_its_sessions_after_fall_checks() {
        let policy = read_policy(ReadFallback::Leader);
        let mut events = vec![(0, primary_at(100)), (1, replica_at(100, true, 1, SYS)), (0, primary_at(100))];
        let (table, now) = feed(&policy, &events);
        assert_eq!(table.target(Route::Read, |_| 0, now).map(|t| t.id), Some(BackendId(1)));
        // Replay stops while the primary writes 10 kB.
        for _ in 0..3 {
            events.push((1, replica_at(100, true, 1, SYS)));
            events.push((0, primary_at(10_100)));
        }
        let (table, now) = feed(&policy, &events);
        let r = table.backend(BackendId(1)).unwrap();
        assert_eq!(r.read_block, Some(ReadBlock::LagBytes));
        assert!(!r.readable);
        assert_eq!(r.read_cut, Some(CutReason::Lag), "out of bounds for fall = 3 checks");
        // Reads fall back to the leader; its own read sessions obey the leader's rules.
        assert_eq!(table.target(Route::Read, |_| 0, now).map(|t| t.id), Some(BackendId(0)));
        assert_eq!(table.cut_reason_for(Route::Read, BackendId(0), now), None);
        assert_eq!(table.cut_reason_for(Route::Read, BackendId(1), now), Some(CutReason::Lag));
        // Refuse: nowhere to go, and the reason names the lag.
        let (table, now) = feed(&read_policy(ReadFallback::Refuse), &events);
        assert_eq!(table.target(Route::Read, |_| 0, now), None);
        assert!(table.read_refusal().contains("more than max_lag_bytes behind"), "{}", table.read_refusal());
    }

    #[test]
    fn reads_need_streaming_the_leaders_timeline_and_system_and_pick_the_least_loaded() {
        let policy = read_policy(ReadFallback::Refuse);
        let base = vec![(0, primary_at(100)), (1, replica_at(100, true, 1, SYS)), (2, replica_at(100, true, 1, SYS))];
        let with = |extra: (usize, Observation)| {
            let mut e = base.clone();
            e.push(extra);
            e.push((0, primary_at(100)));
            feed(&policy, &e)
        };
        let (t, now) = with((2, replica_at(100, true, 1, SYS)));
        assert_eq!(
            t.target(Route::Read, |id| if id == BackendId(1) { 5 } else { 1 }, now).map(|t| t.id),
            Some(BackendId(2))
        );
        assert_eq!(
            t.target(Route::Read, |id| if id == BackendId(1) { 0 } else { 1 }, now).map(|t| t.id),
            Some(BackendId(1))
        );
        for (obs, block) in [
            (replica_at(100, false, 1, SYS), ReadBlock::NotStreaming),
            (replica_at(100, true, 2, SYS), ReadBlock::OtherTimeline),
            (replica_at(100, true, 1, 8), ReadBlock::OtherSystem),
            (failed(), ReadBlock::CheckFailed),
        ] {
            let (t, _) = with((2, obs));
            assert_eq!(t.backend(BackendId(2)).unwrap().read_block, Some(block));
        }
        let (t, now) = with((2, replica_at(100, true, 1, 8)));
        assert_eq!(t.cut_reason_for(Route::Read, BackendId(2), now), Some(CutReason::OtherSystem));
        // An unknown system identifier (its query failed) blocks new reads but cuts nothing.
        let unknown = Observation::Checked(Probe {
            address: addr(),
            in_recovery: true,
            timeline: None,
            system_id: None,
            wal: Some(Wal { lsn: 100, streaming: true, receive_timeline: Some(1) }),
        });
        let (t, now) = with((2, unknown));
        assert_eq!(t.backend(BackendId(2)).unwrap().read_block, Some(ReadBlock::OtherSystem));
        assert_eq!(t.cut_reason_for(Route::Read, BackendId(2), now), None);
    }

    #[test]
    fn a_promoted_replica_keeps_its_read_sessions() {
        let policy = read_policy(ReadFallback::Refuse);
        let events = vec![
            (0, primary_at(100)),
            (1, replica_at(100, true, 1, SYS)),
            (0, failed()),
            (0, failed()),
            (0, failed()),
            (
                1,
                Observation::Checked(Probe {
                    address: addr(),
                    in_recovery: false,
                    timeline: Some(2),
                    system_id: Some(SYS),
                    wal: None,
                }),
            ),
        ];
        let (t, now) = feed(&policy, &events);
        assert_eq!(t.leader, Some(BackendId(1)));
        assert_eq!(t.cut_reason_for(Route::Read, BackendId(1), now), None);
        assert_eq!(t.cut_reason_for(Route::Write, BackendId(0), now), Some(CutReason::Down));
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// The primary writes this many bytes (nobody checks).
        Write(u16),
        /// Replica `i` replays this many bytes of what it lacks.
        Replay(bool, u16),
        CheckPrimary,
        /// Replica `i` is checked (streaming or not).
        CheckReplica(bool, bool),
        Fail(u8),
    }

    fn arb_step() -> impl Strategy<Value = Step> {
        prop_oneof![
            any::<u16>().prop_map(Step::Write),
            (any::<bool>(), any::<u16>()).prop_map(|(i, n)| Step::Replay(i, n)),
            Just(Step::CheckPrimary),
            (any::<bool>(), prop::bool::weighted(0.9)).prop_map(|(i, s)| Step::CheckReplica(i, s)),
            (0u8..3).prop_map(Step::Fail),
        ]
    }

    proptest! {
        #[test]
        fn read_invariants(steps in proptest::collection::vec(arb_step(), 0..120), refuse in any::<bool>()) {
            let fallback = if refuse { ReadFallback::Refuse } else { ReadFallback::Leader };
            let policy = read_policy(fallback);
            let bounds = policy.read.unwrap();
            let t0 = Instant::now();
            let mut states = backends(3);
            let mut table = RoutingTable::initial();
            let mut leader_lsn = 0u64;
            let mut replay = [0u64; 2];
            // Per replica: its latest check (replay it reported, the primary's true position then,
            // and whether a primary check has followed it).
            let mut checks: [Option<(u64, u64, bool)>; 2] = [None; 2];
            // The first primary check that saw a position each replica's report had not reached.
            let mut seen: Vec<(u64, Instant)> = Vec::new();
            for (i, step) in steps.iter().enumerate() {
                let now = t0 + Duration::from_millis(100 * i as u64);
                let observed = match step {
                    Step::Write(n) => { leader_lsn += u64::from(*n); None }
                    Step::Replay(r, n) => {
                        let r = usize::from(*r);
                        replay[r] = (replay[r] + u64::from(*n)).min(leader_lsn);
                        None
                    }
                    Step::CheckPrimary => {
                        for c in checks.iter_mut().flatten() { c.2 = true; }
                        seen.push((leader_lsn, now));
                        Some((0, primary_at(leader_lsn)))
                    }
                    Step::CheckReplica(r, streaming) => {
                        let r = usize::from(*r);
                        checks[r] = Some((replay[r], leader_lsn, false));
                        Some((r + 1, replica_at(replay[r], *streaming, 1, SYS)))
                    }
                    Step::Fail(b) => Some((usize::from(*b), failed())),
                };
                if let Some((b, obs)) = observed {
                    states[b].state = states[b].state.observe(&obs, now);
                }
                let next = decide(&table, &states, None, &policy, now);
                for r in 0..2 {
                    let v = next.backend(BackendId(r as u32 + 1)).unwrap();
                    if v.readable {
                        let lag = v.lag.unwrap();
                        prop_assert!(lag.bytes.is_some_and(|b| b <= bounds.max_lag_bytes), "{lag:?}");
                        prop_assert!(lag.time <= bounds.max_lag);
                        prop_assert!(v.state.last_probe.is_some_and(|p| p.in_recovery) && v.state.fail_streak == 0);
                    }
                    // Bytes: never below the true lag at the replica's latest check once a primary
                    // check has followed it (the estimate it is paired with).
                    if let (Some(lag), Some((reported, truth, paired)), Some(0)) =
                        (v.lag, checks[r], next.leader.map(|l| l.0))
                    {
                        if paired && states[r + 1].state.fail_streak == 0 {
                            prop_assert!(lag.bytes.is_some_and(|b| b >= truth - reported), "{lag:?} vs {truth} - {reported}");
                        }
                        // Time: at least as long as since the first primary position above it.
                        if let Some(&(_, since)) = seen.iter().find(|(lsn, _)| *lsn > reported) {
                            prop_assert!(lag.time >= now - since);
                        } else {
                            prop_assert_eq!(lag.time, Duration::ZERO);
                        }
                    }
                }
                // The target: a replica in bounds, or the leader under fallback = "leader";
                // never a backend out of recovery otherwise.
                if let Some(t) = next.target(Route::Read, |_| 0, now) {
                    let v = next.backend(t.id).unwrap();
                    let leader_fallback = fallback == ReadFallback::Leader && next.leader == Some(t.id);
                    prop_assert!(v.readable || leader_fallback);
                    prop_assert!(leader_fallback || v.state.last_probe.is_some_and(|p| p.in_recovery));
                    prop_assert!(next.admits_route(Route::Read, &t, now));
                }
                table = next;
            }
        }
    }
}
