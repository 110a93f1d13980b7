//! The single writer of the routing state: folds every [`Report`] into its backend's
//! [`BackendState`], runs [`topology::decide`], then logs, updates metrics and publishes.
//!
//! Publication uses `watch::Sender::send_if_modified`: the new table is always stored (so
//! `/status` sees fresh counters), but receivers are woken only when something they act on
//! changed ([`RoutingTable::routing_differs`]) — sessions are not woken by every health check.
//!
//! With fencing, what the etcd watcher sees arrives as [`LeaseEvent`]s, folded into the
//! [`LeaseView`] that `decide` takes as one more input; the elector also wakes by itself at the
//! instant the table's earliest confirmation ends ([`RoutingTable::next_expiry`]), so a lapsed
//! lease takes effect on time without waiting for a check or a tick.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::task::sleep_until_some;
use crate::topology::lease::{LeaseEvent, LeaseView};
use crate::topology::{
    self, Backend, BackendId, BackendState, FenceMode, LeaderChange, Policy, Report, Role, RoutingTable, Source,
    HISTORY_LEN,
};

/// One backend the elector knows.
#[derive(Debug, Clone)]
pub struct Member {
    pub id: BackendId,
    pub name: String,
    pub address: String,
    /// Patroni's member name (fencing).
    pub member: String,
    pub verify_conn_url: bool,
    /// Poked when a client connect failed, so the checker re-checks at once.
    pub recheck: Arc<Notify>,
}

impl Member {
    pub fn new(id: BackendId, name: &str, address: &str, member: &str, verify_conn_url: bool) -> Member {
        Member {
            id,
            name: name.to_owned(),
            address: address.to_owned(),
            member: member.to_owned(),
            verify_conn_url,
            recheck: Arc::new(Notify::new()),
        }
    }
}

/// The backend set and policy; a reload publishes a new one (latest wins, never queued).
#[derive(Debug)]
pub struct Membership {
    pub members: Vec<Member>,
    pub policy: Policy,
    /// Changes when pgleader reads another etcd cluster (other endpoints, namespace or scope):
    /// the etcd view starts over.
    pub etcd_generation: u64,
}

/// A [`LeaseEvent`] with the etcd generation of the reader that saw it. After a reload to another
/// cluster, what the old reader still had in flight is dropped rather than folded into the new
/// view: two clusters' revisions do not compare, and an old one's high revision would hide every
/// read of the new one.
#[derive(Debug)]
pub struct EtcdEvent {
    pub generation: u64,
    pub event: LeaseEvent,
}

pub struct Elector {
    /// The current membership, copied from `membership` whenever it changes.
    members: Vec<Member>,
    policy: Policy,
    membership: watch::Receiver<Arc<Membership>>,
    reports: mpsc::Receiver<Report>,
    /// From the etcd watcher (nothing arrives without `[etcd]`).
    lease_events: mpsc::Receiver<EtcdEvent>,
    etcd_generation: u64,
    /// The one writer of the routing table.
    table_tx: watch::Sender<Arc<RoutingTable>>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
}

impl Elector {
    pub fn new(
        mut membership: watch::Receiver<Arc<Membership>>,
        reports: mpsc::Receiver<Report>,
        lease_events: mpsc::Receiver<EtcdEvent>,
        table_tx: watch::Sender<Arc<RoutingTable>>,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
    ) -> Elector {
        let current = membership.borrow_and_update().clone();
        Elector {
            members: current.members.clone(),
            policy: current.policy,
            etcd_generation: current.etcd_generation,
            membership,
            reports,
            lease_events,
            table_tx,
            metrics,
            cancel,
        }
    }

    /// Runs until cancelled. Re-decides every second as well, so stale observations expire, and
    /// at the instant a confirmation ends.
    pub async fn run(mut self) {
        let mut states: HashMap<BackendId, BackendState> = HashMap::new();
        let mut lease = LeaseView::default();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let expiry = self.table_tx.borrow().next_expiry().map(Instant::from_std);
            tokio::select! {
                () = self.cancel.cancelled() => return,
                Some(EtcdEvent { generation, event }) = self.lease_events.recv() => {
                    // From a reader replaced by a reload to another cluster. (One from a newer
                    // reader cannot come first: the reload publishes the membership before the
                    // main runtime runs anything else; were it to, it would cost one read.)
                    if generation != self.etcd_generation {
                        continue;
                    }
                    let staleness = self.policy.fence.map_or(Duration::ZERO, |f| f.max_staleness);
                    let next = lease.observe(&event, staleness);
                    self.log_lease(&lease, &next, &event);
                    lease = next;
                }
                () = sleep_until_some(expiry) => {}
                Some(report) = self.reports.recv() => {
                    let Some(member) = self.members.iter().find(|m| m.id == report.backend) else { continue };
                    if report.source == Source::Client {
                        member.recheck.notify_one();
                    }
                    let state = states.entry(report.backend).or_default();
                    let mut next = state.observe(&report.observation, report.at);
                    if report.latency.is_some() {
                        next.last_check_latency = report.latency;
                    }
                    self.log_flip(member, state, &next);
                    *state = next;
                }
                Ok(()) = self.membership.changed() => {
                    let current = self.membership.borrow_and_update().clone();
                    // The series of a backend no longer configured go here, not in the reload:
                    // this task writes them from each table, so a publish with the old members
                    // could otherwise bring them back after they were dropped.
                    for gone in self.members.iter().filter(|m| !current.members.iter().any(|n| n.name == m.name)) {
                        self.metrics.remove_backend(&gone.name);
                    }
                    for gone in self.members.iter().filter(|m| !current.members.iter().any(|n| n.member == m.member)) {
                        self.metrics.remove_member(&gone.member);
                    }
                    self.members = current.members.clone();
                    self.policy = current.policy;
                    if current.etcd_generation != self.etcd_generation {
                        self.etcd_generation = current.etcd_generation;
                        lease = LeaseView::default();
                    }
                    states.retain(|id, _| self.members.iter().any(|m| m.id == *id));
                }
                _ = tick.tick() => {}
            }
            self.publish(&states, &lease);
        }
    }

    fn publish(&self, states: &HashMap<BackendId, BackendState>, lease: &LeaseView) {
        let ordered: Vec<Backend> = self
            .members
            .iter()
            .map(|m| Backend {
                id: m.id,
                name: m.name.clone(),
                address: m.address.clone(),
                member: m.member.clone(),
                verify_conn_url: m.verify_conn_url,
                state: states.get(&m.id).cloned().unwrap_or_default(),
            })
            .collect();
        let prev = self.table_tx.borrow().clone();
        let now = Instant::now().into_std();
        let mut next = topology::decide(&prev, &ordered, Some(lease), &self.policy, now);
        self.log_decision(&prev, &next);
        if prev.leader != next.leader || prev.reason != next.reason {
            next.history.push(LeaderChange {
                at_unix_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
                epoch: next.epoch,
                from: prev.leader_view().map(|b| b.name.clone()),
                to: next.leader_view().map(|b| b.name.clone()),
                reason: next.reason,
            });
            let excess = next.history.len().saturating_sub(HISTORY_LEN);
            next.history.drain(..excess);
        }
        self.log_fence(&prev, &next);
        self.update_metrics(&next, now);
        self.table_tx.send_if_modified(|current| {
            let wake = current.routing_differs(&next);
            *current = Arc::new(next);
            wake
        });
    }

    fn name(&self, id: Option<BackendId>) -> &str {
        id.and_then(|id| self.members.iter().find(|m| m.id == id)).map_or("none", |m| m.name.as_str())
    }

    fn log_flip(&self, member: &Member, before: &BackendState, after: &BackendState) {
        let (was, now) = (before.role(&self.policy), after.role(&self.policy));
        if was != now {
            let error = after.last_error.as_deref().unwrap_or("");
            match now {
                Role::Down => tracing::warn!(backend = %member.name, from = was.as_str(), %error, "backend is down"),
                _ => {
                    tracing::info!(backend = %member.name, from = was.as_str(), to = now.as_str(), "backend role changed")
                }
            }
        }
    }

    fn log_decision(&self, prev: &RoutingTable, next: &RoutingTable) {
        if prev.leader == next.leader && prev.reason == next.reason {
            return;
        }
        let (from, to, reason) = (self.name(prev.leader), self.name(next.leader), next.reason.describe());
        if next.reason.is_split_brain() {
            tracing::error!(
                previous = from,
                reason,
                "no leader: split brain; check which node Patroni considers primary"
            );
        } else if next.leader.is_some() && next.leader == prev.leader {
            tracing::info!(leader = to, reason, "leader unchanged; the reason for it changed");
        } else if next.leader.is_some() {
            tracing::warn!(leader = to, previous = from, epoch = next.epoch, reason, "leader elected");
        } else if prev.leader.is_some() {
            tracing::warn!(previous = from, reason, "no leader; new clients wait for one");
        } else {
            tracing::info!(reason, "still no leader");
        }
    }

    /// What fencing changed, said once per change: the fail-safe fallback, and (in `observe`
    /// mode) a disagreement with what SQL alone routes to.
    fn log_fence(&self, prev: &RoutingTable, next: &RoutingTable) {
        let (Some(was), Some(now)) = (prev.fence.as_ref(), next.fence.as_ref()) else {
            if let Some(f) = &next.fence {
                tracing::info!(mode = f.mode.as_str(), "fencing with Patroni's leader lease in etcd");
            }
            return;
        };
        if now.failsafe && !was.failsafe {
            tracing::warn!(
                leader = self.name(next.leader),
                "etcd is unreachable: Patroni's failsafe_mode is on and every backend is healthy, so pgleader \
                 routes on SQL alone until etcd answers again"
            );
        } else if was.failsafe && !now.failsafe {
            tracing::warn!(reason = now.reason.describe(), "the fail-safe fallback ended");
        }
        if now.mode == FenceMode::Observe && (now.leader != was.leader || now.reason != was.reason) {
            if now.leader != next.leader {
                tracing::warn!(
                    routed = self.name(next.leader),
                    enforced = self.name(now.leader),
                    reason = now.reason.describe(),
                    "observe mode: enforcing the leader lease would route differently"
                );
            } else {
                tracing::info!(leader = self.name(now.leader), "observe mode: the leader lease agrees with SQL");
            }
        }
    }

    /// etcd reachability flips and what the leader key says, at INFO/WARN on change only.
    fn log_lease(&self, before: &LeaseView, after: &LeaseView, event: &LeaseEvent) {
        if before.reachable && !after.reachable {
            let error = after.last_error.as_deref().unwrap_or("");
            tracing::warn!(%error, "etcd reads fail; the leader lease is confirmed only until the last confirmation ends");
        } else if !before.reachable && after.reachable {
            tracing::info!("etcd reads succeed");
        }
        if before.named() != after.named() {
            tracing::info!(member = after.named().unwrap_or("none"), "Patroni's leader key names a new holder");
        }
        if before.confirmation.is_some() && after.confirmation.is_none() {
            if let Some(why) = &after.revoked {
                tracing::warn!(why, "the leader lease confirmation was revoked by an etcd watch event");
            }
        }
        if let (LeaseEvent::Read(_), Some(p), Some(f)) = (event, after.patroni, self.policy.fence) {
            let changed = before.patroni.map(|b| (b.ttl, b.loop_wait)) != Some((p.ttl, p.loop_wait));
            if let (true, Some(ttl), Some(loop_wait)) = (changed, p.ttl, p.loop_wait) {
                let window = Duration::from_secs(ttl.saturating_sub(loop_wait));
                if f.max_staleness >= window {
                    tracing::warn!(
                        max_staleness = ?f.max_staleness,
                        ttl, loop_wait,
                        "[etcd] max_staleness is not below Patroni's ttl - loop_wait: fencing will not stop writes on \
                         an isolated leader sooner than Patroni's own demotion; lower max_staleness"
                    );
                }
            }
            if p.pause && !before.patroni.is_some_and(|b| b.pause) {
                tracing::warn!("Patroni is paused (maintenance mode): a manual promotion does not move the leader key");
            }
        }
    }

    fn update_metrics(&self, table: &RoutingTable, now: std::time::Instant) {
        let m = &self.metrics;
        for view in &table.backends {
            let name = view.name.as_str();
            let up = view.state.fail_streak == 0 && !view.state.lost && view.state.last_probe.is_some();
            m.backend_up.with_label_values(&[name]).set(i64::from(up));
            for role in Role::ALL {
                m.backend_role.with_label_values(&[name, role.as_str()]).set(i64::from(view.role == role));
            }
            m.leader.with_label_values(&[name]).set(i64::from(table.leader == Some(view.id)));
            m.set_replica_lag(name, view.lag.map(|l| (l.bytes, l.time.as_secs_f64())));
        }
        m.replicas_in_bounds.set(table.backends.iter().filter(|b| b.readable).count() as i64);
        m.split_brain.set(i64::from(table.reason.is_split_brain()));
        if let Some(f) = &table.fence {
            m.etcd_up.set(i64::from(f.view.reachable));
            m.etcd_failsafe_fallback.set(i64::from(f.failsafe));
            let named = f.view.named();
            let known = |n: &str| self.members.iter().any(|b| b.member == n);
            for b in &self.members {
                m.etcd_leader.with_label_values(&[&b.member]).set(i64::from(named == Some(b.member.as_str())));
            }
            m.etcd_leader.with_label_values(&["other"]).set(i64::from(named.is_some_and(|n| !known(n))));
            let age = f.view.confirmation.as_ref().map(|c| now.saturating_duration_since(c.read_start));
            m.etcd_confirmation_age.set(age.map_or(f64::NAN, |a| a.as_secs_f64()));
        }
        if table.epoch != self.table_tx.borrow().epoch {
            m.leader_changes.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::lease::{LeaderLease, LeaseRead};
    use crate::topology::FencePolicy;

    fn read(revision: i64) -> LeaseEvent {
        LeaseEvent::Read(LeaseRead {
            read_start: std::time::Instant::now(),
            revision,
            endpoint: "http://e:2379".into(),
            leader: Some(LeaderLease { member: "m0".into(), remaining: Some(Duration::from_secs(30)) }),
            patroni: None,
            members: Vec::new(),
        })
    }

    /// A read the reader of the old cluster still had in flight when a reload moved pgleader to
    /// another etcd cluster is not folded into the new view: its revision, from the old cluster,
    /// is higher than any the new cluster has, and would hide every read of it as older.
    #[tokio::test]
    async fn events_of_a_reader_replaced_by_another_cluster_are_dropped() {
        let fence = FencePolicy { mode: FenceMode::Enforce, max_staleness: Duration::from_secs(3) };
        let policy = Policy { rise: 1, fall: 1, stale_after: Duration::from_secs(10), fence: Some(fence), read: None };
        let membership = Membership { members: Vec::new(), policy, etcd_generation: 1 };
        let (_membership_tx, membership_rx) = watch::channel(Arc::new(membership));
        let (_reports_tx, reports_rx) = mpsc::channel(8);
        let (lease_tx, lease_rx) = mpsc::channel(8);
        let (table_tx, table_rx) = watch::channel(Arc::new(RoutingTable::initial()));
        let cancel = CancellationToken::new();
        let metrics = Arc::new(Metrics::new(&[]));
        let elector = Elector::new(membership_rx, reports_rx, lease_rx, table_tx, metrics, cancel.clone());
        let task = tokio::spawn(elector.run());
        lease_tx.send(EtcdEvent { generation: 0, event: read(5_000_000) }).await.unwrap();
        lease_tx.send(EtcdEvent { generation: 1, event: read(1_000) }).await.unwrap();
        let revision = loop {
            let read = table_rx.borrow().fence.as_ref().and_then(|f| f.view.read.as_ref().map(|r| r.revision));
            if let Some(revision) = read {
                break revision;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert_eq!(revision, 1_000, "the new cluster's read is the view's, the old one's dropped");
        assert_eq!(table_rx.borrow().fence.as_ref().map(|f| f.view.reads_ok), Some(1));
        cancel.cancel();
        task.await.unwrap();
    }
}
