//! Fuzz target `decide`: the leader decision under arbitrary sequences of health observations.
//!
//! The input decodes (via `arbitrary`) into a policy, 2 or 3 backends, and a sequence of steps:
//! an observation of one backend (primary on a timeline of a system, replica, failed, lost) made
//! some milliseconds after the previous step, or time passing with no observation (so staleness
//! is exercised). Each step is folded with `BackendState::observe` and `topology::decide`, the
//! way the elector does it, and the published table is checked against the safety rules:
//! - a leader is a routable primary in the table's own view (routable, role primary, keeps its
//!   sessions) with a fresh observation and the highest timeline seen for its system;
//! - never two backends routable at once; no leader means none routable;
//! - a split-brain reason never has a leader; a leader always has a leader reason;
//! - the epoch moves exactly when the leader does; remembered timelines never decrease;
//! - the same inputs decide the same table, and deciding again changes no routing.

#![no_main]

use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pgleader::topology::{
    decide, Backend, BackendId, BackendState, Observation, Policy, Probe, Reason, Role, RoutingTable,
};

#[derive(Debug, Arbitrary)]
struct Input {
    three_backends: bool,
    rise: u8,
    fall: u8,
    /// In units of 10 ms, so staleness is reachable within a short input.
    stale_after: u8,
    steps: Vec<Step>,
}

#[derive(Debug, Arbitrary)]
struct Step {
    backend: u8,
    /// Milliseconds since the previous step.
    advance_ms: u8,
    /// How much later than the observation the elector decides.
    decide_lag_ms: u8,
    event: Event,
}

#[derive(Debug, Arbitrary)]
enum Event {
    Primary {
        timeline: u8,
        system: Option<u8>,
    },
    Replica {
        system: Option<u8>,
    },
    Failed,
    Lost,
    /// No observation: only time passes before the next decision.
    Tick,
}

/// Where every check ran; the decision does not look at it.
const ADDRESS: std::net::SocketAddr =
    std::net::SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 5432));

fn observation(event: &Event) -> Option<Observation> {
    // Few distinct values, so collisions (same timeline, same system) are common.
    let system = |s: &Option<u8>| s.map(|s| u64::from(s % 3));
    Some(match event {
        Event::Primary { timeline, system: s } => Observation::Checked(Probe {
            address: ADDRESS,
            in_recovery: false,
            timeline: Some(u32::from(timeline % 5) + 1),
            system_id: system(s),
            wal: None,
        }),
        Event::Replica { system: s } => {
            Observation::Checked(Probe {
                address: ADDRESS,
                in_recovery: true,
                timeline: None,
                system_id: system(s),
                wal: None,
            })
        }
        Event::Failed => Observation::Failed { error: "health check timed out".to_owned() },
        Event::Lost => Observation::Lost { error: "health connection lost".to_owned() },
        Event::Tick => return None,
    })
}

fuzz_target!(|input: Input| {
    let policy = Policy {
        rise: u32::from(input.rise % 4),
        fall: u32::from(input.fall % 4).max(1),
        stale_after: Duration::from_millis(10 * u64::from(input.stale_after)),
        // Fencing and reads are property-tested in topology's own tests (`fencing_invariants`,
        // `read_invariants`).
        fence: None,
        read: None,
    };
    let n = if input.three_backends { 3 } else { 2 };
    let mut backends: Vec<Backend> = (0..n)
        .map(|i| Backend {
            id: BackendId(i),
            name: format!("b{i}"),
            address: format!("10.0.0.{i}:5432"),
            member: format!("b{i}"),
            verify_conn_url: true,
            state: BackendState::default(),
        })
        .collect();
    let t0 = Instant::now();
    let mut clock = t0;
    let mut table = RoutingTable::initial();
    for step in input.steps.iter().take(200) {
        clock += Duration::from_millis(u64::from(step.advance_ms));
        if let Some(obs) = observation(&step.event) {
            let which = usize::from(step.backend) % backends.len();
            let b = &mut backends[which];
            b.state = b.state.observe(&obs, clock);
        }
        let now = clock + Duration::from_millis(u64::from(step.decide_lag_ms));
        let next = decide(&table, &backends, None, &policy, now);
        check(&table, &next, &backends, &policy, now);
        table = next;
    }
});

fn check(prev: &RoutingTable, next: &RoutingTable, backends: &[Backend], policy: &Policy, now: Instant) {
    // Same inputs, same table; and a second decision on unchanged inputs changes no routing.
    assert_eq!(next, &decide(prev, backends, None, policy, now), "decide is not deterministic");
    let again = decide(next, backends, None, policy, now);
    assert!(!again.routing_differs(next), "re-deciding unchanged inputs changed routing");
    assert_eq!(again.leader, next.leader);

    let ids: Vec<BackendId> = next.backends.iter().map(|v| v.id).collect();
    let want: Vec<BackendId> = backends.iter().map(|b| b.id).collect();
    assert_eq!(ids, want, "views are in configuration order");

    let routable: Vec<&_> = next.backends.iter().filter(|v| v.routable).collect();
    assert!(routable.len() <= 1, "two backends routable at once: {next:#?}");
    match next.leader {
        Some(id) => {
            let view = next.backend(id).expect("the leader is a configured backend");
            assert!(view.routable, "leader not routable: {next:#?}");
            assert_eq!(view.role, Role::Primary, "leader is not a primary: {next:#?}");
            assert!(view.cut.is_none() && next.session_allowed(id), "the leader's own sessions would be cut");
            assert!(next.admits(id, next.epoch, now), "the leader does not admit in its own epoch");
            assert!(matches!(next.reason, Reason::SolePrimary | Reason::NewestTimeline), "{:?}", next.reason);
            let s = &view.state;
            let probe = s.last_probe.expect("a leader has been checked");
            assert!(!probe.in_recovery && !s.lost && s.fail_streak == 0);
            assert!(s.primary_streak >= policy.rise.max(1), "leader before `rise` primary checks");
            let at = s.observed_at.expect("a leader has an observation");
            assert!(now.saturating_duration_since(at) <= policy.stale_after, "leader on a stale observation");
            assert_eq!(next.max_timelines.get(&probe.system_id).copied(), probe.timeline, "leader not newest");
            for other in next.backends.iter().filter(|v| v.id != id) {
                assert!(!next.session_allowed(other.id), "sessions on a non-leader would be kept");
            }
        }
        None => {
            assert!(routable.is_empty(), "a routable backend without a leader");
            assert!(!matches!(next.reason, Reason::SolePrimary | Reason::NewestTimeline), "{:?}", next.reason);
        }
    }
    if next.reason.is_split_brain() {
        assert!(next.leader.is_none());
    }
    assert_eq!(next.epoch != prev.epoch, next.leader != prev.leader, "epoch moves exactly with the leader");
    assert!(next.epoch >= prev.epoch);
    for (system, tl) in &prev.max_timelines {
        assert!(next.max_timelines.get(system).is_some_and(|n| n >= tl), "a remembered timeline went down");
    }
    for (view, b) in next.backends.iter().zip(backends) {
        if let Some(p) = view.state.last_probe.filter(|p| !p.in_recovery) {
            if p.timeline < next.max_timelines.get(&p.system_id).copied() {
                assert!(!next.session_allowed(view.id), "a session stays on a primary below the newest timeline");
            }
        }
        assert_eq!(view.state, b.state, "the view shows the state decided on");
        assert_eq!(view.role, b.state.role(policy));
    }
}
