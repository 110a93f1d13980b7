//! The decision's table-driven and property tests.

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
