//! The partition scenarios of issue 12 on a [`super::partition::Lab`], what each run records,
//! and the measures computed from the records (used by `tests/partitions.rs` and by
//! `examples/partition_report.rs`, so the suite and the report count the same way).
//!
//! A run: the lab comes up (optiplex leads); every front end's writers start on both database
//! nodes and warm up ([`super::partition::ACKS_TO_COUNT`] acknowledged writes each); the fault; the heal; then the
//! run waits (bounded) for the cluster to recover by itself (one leader, the other member
//! streaming) and then, for [`RECOVERY_WINDOW`], for every writer of each front end to write
//! again. Nothing is restarted by hand at any point.
//!
//! Measures, per front end (its four writers: two on each database node):
//! - *lost*: acknowledged ids missing on the final leader after the heal and Patroni's rejoin;
//! - *read-only hits*: attempts that reached a node in recovery (identity query or 25006);
//! - *longest outage* per writer: the longest time without an acknowledged write;
//! - *overlapping primaries*: acknowledged writes of each node are split into primary terms
//!   (a gap over [`TERM_GAP_MS`] between two of them starts a new term); two primaries
//!   acknowledged writes at overlapping times when terms of different nodes intersect, and the
//!   overlap is the total length of the intersections (client-side times: an ack is somewhere in
//!   its attempt's interval, so the measure errs towards reporting an overlap);
//! - *recovered by itself*: every writer of the front end wrote again within
//!   [`RECOVERY_WINDOW`] of the cluster's recovery, and none of its attempts failed in the
//!   window's last [`STABLE_TAIL`].

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::partition::{
    pg_port, FrontEnd, FrontEndKind, Lab, Writers, DB_NODES, ETCD_ELECTION_MS, ETCD_HEARTBEAT_MS, PATIENCE,
    RECOVERY_WINDOW, STABLE_TAIL, TERM_GAP_MS,
};
use super::patroni::{Replication, LOOP_WAIT_SECS, RETRY_TIMEOUT_SECS, TTL_SECS};
use super::workload::{Attempt, Mark, Outcome, Run};

/// The node that leads when a run starts (it bootstraps the cluster).
pub const FIRST_LEADER: &str = "optiplex";
/// How long a fault that should not move the leader is held.
pub const HOLD: Duration = Duration::from_secs(30);
/// How long a leader-side fault is held after Patroni has promoted the other node.
pub const HOLD_AFTER_FAILOVER: Duration = Duration::from_secs(10);
/// Flapping: the leader's link toggles every `FLAP_EVERY` for `HOLD`.
pub const FLAP_EVERY: Duration = Duration::from_secs(2);
/// Added latency, each way, on every node's link (a round trip between two nodes gains twice).
pub const ONE_WAY_DELAY: Duration = Duration::from_millis(100);
/// How long the added latency stays.
pub const LATENCY_HOLD: Duration = Duration::from_secs(40);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    IsolateLeader,
    IsolateReplica,
    IsolateWitness,
    AsymmetricLoss,
    Flapping,
    Latency,
}

impl Scenario {
    pub const ALL: [Scenario; 6] = [
        Scenario::IsolateLeader,
        Scenario::IsolateReplica,
        Scenario::IsolateWitness,
        Scenario::AsymmetricLoss,
        Scenario::Flapping,
        Scenario::Latency,
    ];

    pub fn slug(self) -> &'static str {
        match self {
            Scenario::IsolateLeader => "isolate-leader",
            Scenario::IsolateReplica => "isolate-replica",
            Scenario::IsolateWitness => "isolate-witness",
            Scenario::AsymmetricLoss => "asymmetric-loss",
            Scenario::Flapping => "flapping",
            Scenario::Latency => "latency",
        }
    }

    pub fn from_slug(s: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|x| x.slug() == s)
    }

    pub fn title(self) -> &'static str {
        match self {
            Scenario::IsolateLeader => "Isolate the leader's node (optiplex's link down)",
            Scenario::IsolateReplica => "Isolate the replica's node (epyc's link down)",
            Scenario::IsolateWitness => "Isolate the witness (mac's link down)",
            Scenario::AsymmetricLoss => "Asymmetric loss on the leader's link (everything to optiplex dropped)",
            Scenario::Flapping => "Flapping link (optiplex's link down/up every 2 s for 30 s)",
            Scenario::Latency => "Latency (200 ms added to every round trip between nodes)",
        }
    }
}

/// One workload's record (the attempts go to a CSV of their own).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WriterRecord {
    pub front_end: FrontEndKind,
    pub node: String,
    /// The workload's start on the lab's clock; its attempt times are relative to it.
    pub offset_ms: f64,
    pub started_unix_ms: u128,
    pub duration_ms: f64,
    /// Acknowledged ids missing on the final leader (empty when there was none to read).
    pub lost: Vec<i64>,
    #[serde(skip)]
    pub attempts: Vec<Attempt>,
}

impl WriterRecord {
    pub fn csv_name(&self, scenario: Scenario, replication: &str) -> String {
        format!("{}-{replication}-{}-{}.csv", scenario.slug(), self.front_end.slug(), self.node)
    }

    fn run(&self) -> Run {
        Run {
            started_unix_ms: self.started_unix_ms,
            duration_ms: self.duration_ms,
            attempts: self.attempts.clone(),
            marks: Vec::new(),
        }
    }
}

/// Everything one run recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioResult {
    pub scenario: Scenario,
    pub replication: String,
    pub front_ends: Vec<FrontEnd>,
    /// Patroni and etcd timings of the run, spelled out.
    pub timings: String,
    /// Every configuration file of the run (Patroni, pgleader, HAProxy), by file name.
    pub configs: BTreeMap<String, String>,
    /// Node name to PostgreSQL port (how attempts name their node).
    pub node_ports: BTreeMap<String, u16>,
    pub marks: Vec<Mark>,
    pub fault_ms: f64,
    pub heal_ms: f64,
    /// When the harness first saw the other node as Patroni's primary after the fault.
    pub new_leader_ms: Option<f64>,
    /// When the cluster was healthy again after the heal (None: not within the patience).
    pub cluster_recovered_ms: Option<f64>,
    /// The single primary at the end (None: none or two).
    pub final_leader: Option<String>,
    /// Per front end slug: when (lab clock) all its writers had written again, if they did.
    pub front_end_writing_again_ms: BTreeMap<String, Option<f64>>,
    /// Per front end slug: recovered by itself (see the module doc).
    pub front_end_recovered: BTreeMap<String, bool>,
    pub writers: Vec<WriterRecord>,
}

/// A front end's numbers in one run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Measures {
    pub lost: usize,
    /// Lost ids by the node that acknowledged them.
    pub lost_by_node: BTreeMap<String, usize>,
    pub read_only_hits: usize,
    /// Longest outage (ms) per `node/writer`.
    pub outage_ms: BTreeMap<String, f64>,
    /// Failed attempts by class, over the four writers.
    pub failed: BTreeMap<String, usize>,
    pub overlap_ms: f64,
    pub overlapping_primaries: bool,
    pub recovered: bool,
    /// Acknowledged writes per node, over the four writers.
    pub acked_by_node: BTreeMap<String, usize>,
}

impl ScenarioResult {
    fn node_of(&self, a: &Attempt) -> Option<String> {
        let port = a.node_port?;
        self.node_ports.iter().find(|(_, p)| **p == port).map(|(n, _)| n.clone())
    }

    /// The numbers of `kind` in this run.
    pub fn measures(&self, kind: FrontEndKind) -> Measures {
        let mut m = Measures {
            recovered: self.front_end_recovered.get(kind.slug()).copied().unwrap_or(false),
            ..Measures::default()
        };
        let mut acks: Vec<(String, f64, f64)> = Vec::new();
        for w in self.writers.iter().filter(|w| w.front_end == kind) {
            let summary = w.run().summary(w.lost.clone());
            for (writer, s) in &summary.per_writer {
                m.outage_ms.insert(format!("{}/{writer}", w.node), s.longest_gap_ms);
                m.read_only_hits += s.read_only_hits;
                for (k, v) in &s.errors {
                    *m.failed.entry(k.clone()).or_default() += v;
                }
            }
            m.lost += w.lost.len();
            for a in &w.attempts {
                let Some(node) = self.node_of(a) else { continue };
                if a.outcome == Outcome::Ok {
                    *m.acked_by_node.entry(node.clone()).or_default() += 1;
                    if w.lost.binary_search(&a.id).is_ok() {
                        *m.lost_by_node.entry(node.clone()).or_default() += 1;
                    }
                    acks.push((node, a.start_ms + w.offset_ms, a.end_ms + w.offset_ms));
                }
            }
        }
        m.overlap_ms = overlap_ms(&acks);
        m.overlapping_primaries = m.overlap_ms > 0.0;
        m
    }

    /// Overlap of primary terms over every front end's acknowledged writes.
    pub fn overlap_all_ms(&self) -> f64 {
        let mut acks = Vec::new();
        for w in &self.writers {
            for a in w.attempts.iter().filter(|a| a.outcome == Outcome::Ok) {
                if let Some(node) = self.node_of(a) {
                    acks.push((node, a.start_ms + w.offset_ms, a.end_ms + w.offset_ms));
                }
            }
        }
        overlap_ms(&acks)
    }

    /// Front-end kinds of the run, in its order.
    pub fn kinds(&self) -> Vec<FrontEndKind> {
        self.front_ends.iter().map(|f| f.kind).collect()
    }
}

/// Total length of the intersections between primary terms of different nodes (see the module
/// doc). `acks` are (node, start, end) of acknowledged writes.
pub fn overlap_ms(acks: &[(String, f64, f64)]) -> f64 {
    let mut terms: Vec<(String, f64, f64)> = Vec::new();
    let mut by_node: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for (n, s, e) in acks {
        by_node.entry(n).or_default().push((*s, *e));
    }
    for (node, mut list) in by_node {
        list.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut cur: Option<(f64, f64)> = None;
        for (s, e) in list {
            cur = match cur {
                Some((cs, ce)) if s - ce <= TERM_GAP_MS => Some((cs, ce.max(e))),
                Some(done) => {
                    terms.push((node.to_owned(), done.0, done.1));
                    Some((s, e))
                }
                None => Some((s, e)),
            };
        }
        if let Some((s, e)) = cur {
            terms.push((node.to_owned(), s, e));
        }
    }
    let mut total = 0.0;
    for (i, a) in terms.iter().enumerate() {
        for b in &terms[i + 1..] {
            if a.0 != b.0 {
                total += (a.2.min(b.2) - a.1.max(b.1)).max(0.0);
            }
        }
    }
    total
}

/// The timings written into every result.
pub fn timings(replication: Replication) -> String {
    format!(
        "Patroni ttl {TTL_SECS} s, loop_wait {LOOP_WAIT_SECS} s, retry_timeout {RETRY_TIMEOUT_SECS} s, \
         {replication} replication, use_pg_rewind; etcd heartbeat {ETCD_HEARTBEAT_MS} ms, election timeout \
         {ETCD_ELECTION_MS} ms"
    )
}

async fn wait_all_writing(writers: &[Writers], since_ms: f64, what: &str) {
    let deadline = Instant::now() + PATIENCE;
    while !writers.iter().all(|w| w.writing_since(since_ms)) {
        assert!(Instant::now() < deadline, "timed out after {PATIENCE:?} waiting until every writer {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Holds until `node` is Patroni's primary (or [`PATIENCE`] passed), then `after` more.
/// Returns when it became primary.
async fn hold_until_primary(lab: &mut Lab, node: &str, after: Duration) -> Option<f64> {
    let deadline = Instant::now() + PATIENCE;
    let mut seen = None;
    while Instant::now() < deadline {
        if lab.says_primary(node).await {
            seen = Some(lab.mark(&format!("Patroni: {node} is primary")));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if seen.is_none() {
        lab.mark(&format!("no failover to {node} within {PATIENCE:?}"));
    }
    tokio::time::sleep(after).await;
    seen
}

/// Holds for `d`, noting the first time `node` is seen as primary meanwhile (polled).
async fn hold_watching(lab: &mut Lab, node: &str, d: Duration) -> Option<f64> {
    let until = Instant::now() + d;
    let mut seen = None;
    while Instant::now() < until {
        if seen.is_none() && lab.says_primary(node).await {
            seen = Some(lab.mark(&format!("Patroni: {node} is primary")));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    seen
}

/// Runs one scenario with `front_ends` side by side; `pgleader` is the binary to run.
pub async fn run(
    scenario: Scenario,
    replication: Replication,
    front_ends: Vec<FrontEnd>,
    pgleader: &Path,
) -> ScenarioResult {
    eprintln!("=== {} ({replication})", scenario.title());
    let mut lab = Lab::start(replication, front_ends.clone(), pgleader).await;
    assert_eq!(lab.primaries().await, vec![FIRST_LEADER.to_owned()], "{FIRST_LEADER} leads at the start");
    let other = "epyc";
    let writers = lab.start_writers().await;
    let begin = lab.mark("writers start");
    wait_all_writing(&writers, begin, "warmed up").await;

    let (fault_ms, new_leader_ms) = match scenario {
        Scenario::IsolateLeader => {
            lab.net.cut(FIRST_LEADER);
            let at = lab.mark(&format!("{FIRST_LEADER}'s link down"));
            (at, hold_until_primary(&mut lab, other, HOLD_AFTER_FAILOVER).await)
        }
        Scenario::IsolateReplica => {
            lab.net.cut(other);
            let at = lab.mark(&format!("{other}'s link down"));
            (at, hold_watching(&mut lab, other, HOLD).await)
        }
        Scenario::IsolateWitness => {
            lab.net.cut("mac");
            let at = lab.mark("mac's link down");
            (at, hold_watching(&mut lab, other, HOLD).await)
        }
        Scenario::AsymmetricLoss => {
            lab.net.drop_incoming(FIRST_LEADER);
            let at = lab.mark(&format!("everything to {FIRST_LEADER} dropped"));
            (at, hold_until_primary(&mut lab, other, HOLD_AFTER_FAILOVER).await)
        }
        Scenario::Flapping => {
            let at = lab.mark(&format!("{FIRST_LEADER}'s link starts flapping"));
            let until = Instant::now() + HOLD;
            let mut down = false;
            let mut seen = None;
            while Instant::now() < until {
                down = !down;
                if down {
                    lab.net.cut(FIRST_LEADER);
                } else {
                    lab.net.reconnect(FIRST_LEADER);
                }
                let next = Instant::now() + FLAP_EVERY;
                while Instant::now() < next {
                    if seen.is_none() && lab.says_primary(other).await {
                        seen = Some(lab.mark(&format!("Patroni: {other} is primary")));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            if down {
                lab.net.reconnect(FIRST_LEADER);
            }
            (at, seen)
        }
        Scenario::Latency => {
            lab.net.delay(ONE_WAY_DELAY);
            let at = lab.mark("+200 ms round trip between nodes");
            (at, hold_watching(&mut lab, other, LATENCY_HOLD).await)
        }
    };
    match scenario {
        Scenario::IsolateLeader | Scenario::Flapping => {
            if scenario == Scenario::IsolateLeader {
                lab.net.reconnect(FIRST_LEADER);
            }
        }
        Scenario::IsolateReplica => lab.net.reconnect(other),
        Scenario::IsolateWitness => lab.net.reconnect("mac"),
        Scenario::AsymmetricLoss => lab.net.accept_incoming(FIRST_LEADER),
        Scenario::Latency => lab.net.undelay(),
    }
    let heal_ms = lab.mark("healed");

    let deadline = Instant::now() + PATIENCE;
    let mut cluster_recovered_ms = None;
    while Instant::now() < deadline {
        if lab.cluster_healthy().await {
            cluster_recovered_ms = Some(lab.mark("cluster recovered (leader + streaming replica)"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if cluster_recovered_ms.is_none() {
        lab.mark("cluster did not recover");
    }
    let since = cluster_recovered_ms.unwrap_or(heal_ms);
    let mut writing_again: BTreeMap<String, Option<f64>> =
        front_ends.iter().map(|f| (f.kind.slug().to_owned(), None)).collect();
    let window_end = Instant::now() + RECOVERY_WINDOW;
    while Instant::now() < window_end {
        for fe in &front_ends {
            let done = writers.iter().filter(|w| w.front_end == fe.kind).all(|w| w.writing_since(since));
            if done && writing_again[fe.kind.slug()].is_none() {
                let at = lab.mark(&format!("{} writes again", fe.kind.slug()));
                writing_again.insert(fe.kind.slug().to_owned(), Some(at));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tail_from = lab.now_ms() - STABLE_TAIL.as_secs_f64() * 1000.0;
    let recovered: BTreeMap<String, bool> = front_ends
        .iter()
        .map(|fe| {
            let mine = writers.iter().filter(|w| w.front_end == fe.kind);
            let stable = mine.clone().all(|w| w.no_failure_since(tail_from));
            (fe.kind.slug().to_owned(), stable && writing_again[fe.kind.slug()].is_some())
        })
        .collect();
    lab.mark("writers stop");

    let mut records = Vec::new();
    for w in writers {
        let run = w.workload.stop().await;
        records.push(WriterRecord {
            front_end: w.front_end,
            node: w.node,
            offset_ms: w.offset_ms,
            started_unix_ms: run.started_unix_ms,
            duration_ms: run.duration_ms,
            lost: Vec::new(),
            attempts: run.attempts,
        });
    }
    let primaries = lab.primaries().await;
    let final_leader = match primaries.as_slice() {
        [one] => Some(one.clone()),
        _ => None,
    };
    if let Some(leader) = &final_leader {
        let present = lab.ids_on(leader).await;
        for r in &mut records {
            let mut lost: Vec<i64> = r
                .attempts
                .iter()
                .filter(|a| a.outcome == Outcome::Ok && !present.contains(&a.id))
                .map(|a| a.id)
                .collect();
            lost.sort_unstable();
            r.lost = lost;
        }
    }
    let result = ScenarioResult {
        scenario,
        replication: replication.to_string(),
        front_ends,
        timings: timings(replication),
        configs: lab.configs.clone(),
        node_ports: DB_NODES.iter().map(|n| ((*n).to_owned(), pg_port(n))).collect(),
        marks: lab.marks.clone(),
        fault_ms,
        heal_ms,
        new_leader_ms,
        cluster_recovered_ms,
        final_leader,
        front_end_writing_again_ms: writing_again,
        front_end_recovered: recovered,
        writers: records,
    };
    drop(lab);
    print_summary(&result);
    result
}

/// The run's numbers on stderr, one line per front end.
pub fn print_summary(r: &ScenarioResult) {
    eprintln!(
        "--- {} ({}): new leader after {}, cluster recovered {} after the heal, final leader {:?}, overlap over all {:.0} ms",
        r.scenario.slug(),
        r.replication,
        r.new_leader_ms.map_or("-".to_owned(), |t| format!("{:.1} s", (t - r.fault_ms) / 1000.0)),
        r.cluster_recovered_ms.map_or("never".to_owned(), |t| format!("{:.1} s", (t - r.heal_ms) / 1000.0)),
        r.final_leader,
        r.overlap_all_ms()
    );
    for kind in r.kinds() {
        let m = r.measures(kind);
        eprintln!(
            "  {:<16} lost {:>4} {:?}  read-only hits {:>4}  overlap {:.0} ms  recovered {}  outages {:?}  failed {:?}  acked {:?}",
            kind.slug(),
            m.lost,
            m.lost_by_node,
            m.read_only_hits,
            m.overlap_ms,
            m.recovered,
            m.outage_ms.iter().map(|(k, v)| format!("{k} {:.1}s", v / 1000.0)).collect::<Vec<_>>(),
            m.failed,
            m.acked_by_node
        );
    }
}

/// Acknowledged writes of `kind`'s writers (lab clock), for checks.
pub fn acked(r: &ScenarioResult, kind: FrontEndKind) -> impl Iterator<Item = (&WriterRecord, &Attempt)> {
    r.writers
        .iter()
        .filter(move |w| w.front_end == kind)
        .flat_map(|w| w.attempts.iter().filter(|a| a.outcome == Outcome::Ok).map(move |a| (w, a)))
}
