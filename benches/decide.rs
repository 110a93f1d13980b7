//! The leader decision, run by the elector after every health report: two and three backends,
//! with one primary, and with two primaries on different timelines.

use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use pgleader::topology::lease::{LeaderLease, LeaseEvent, LeaseRead, LeaseView, MemberEntry, PatroniConfig};
use pgleader::topology::{
    decide, Backend, BackendId, BackendState, FenceMode, FencePolicy, Observation, Policy, Probe, RoutingTable,
};

fn backend(i: u32, in_recovery: bool, timeline: u32, now: Instant) -> Backend {
    let address = std::net::SocketAddr::from(([10, 0, 0, i as u8], 5432));
    let probe =
        Probe { address, in_recovery, timeline: (!in_recovery).then_some(timeline), system_id: Some(42), wal: None };
    Backend {
        id: BackendId(i),
        name: format!("node{i}"),
        address: format!("10.0.0.{i}:5432"),
        member: format!("node{i}"),
        verify_conn_url: true,
        state: BackendState::default().observe(&Observation::Checked(probe), now),
    }
}

fn bench(c: &mut Criterion) {
    let now = Instant::now();
    let policy = Policy { rise: 1, fall: 3, stale_after: Duration::from_secs(10), fence: None, read: None };
    let pair = vec![backend(0, false, 1, now), backend(1, true, 0, now)];
    let three = vec![backend(0, false, 1, now), backend(1, true, 0, now), backend(2, true, 0, now)];
    let two_primaries = vec![backend(0, false, 1, now), backend(1, false, 2, now)];
    let prev = decide(&RoutingTable::initial(), &pair, None, &policy, now);
    c.bench_function("decide/pair", |b| b.iter(|| decide(black_box(&prev), black_box(&pair), None, &policy, now)));
    c.bench_function("decide/three", |b| b.iter(|| decide(black_box(&prev), black_box(&three), None, &policy, now)));
    c.bench_function("decide/two_primaries", |b| {
        b.iter(|| decide(black_box(&prev), black_box(&two_primaries), None, &policy, now))
    });
    // With fencing: a read confirming node0, its members registered.
    let fenced = Policy {
        fence: Some(FencePolicy { mode: FenceMode::Enforce, max_staleness: Duration::from_secs(3) }),
        ..policy
    };
    let members = (0..3)
        .map(|i| MemberEntry {
            name: format!("node{i}"),
            conn_url: Some(format!("postgres://10.0.0.{i}:5432/postgres")),
        })
        .collect();
    let read = LeaseRead {
        read_start: now,
        revision: 9,
        endpoint: "http://e:2379".into(),
        leader: Some(LeaderLease { member: "node0".into(), remaining: Some(Duration::from_secs(30)) }),
        patroni: Some(PatroniConfig::default()),
        members,
    };
    let view = LeaseView::default().observe(&LeaseEvent::Read(read), Duration::from_secs(3));
    c.bench_function("decide/pair_fenced", |b| {
        b.iter(|| decide(black_box(&prev), black_box(&pair), Some(&view), &fenced, now))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
