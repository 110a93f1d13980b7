//! The single writer of the routing state: folds every [`Report`] into its backend's
//! [`BackendState`], runs [`topology::decide`], then logs, updates metrics and publishes.
//!
//! Publication uses `watch::Sender::send_if_modified`: the new table is always stored (so
//! `/status` sees fresh counters), but receivers are woken only when something they act on
//! changed ([`RoutingTable::routing_differs`]) — sessions are not woken by every health check.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::topology::{
    self, Backend, BackendId, BackendState, LeaderChange, Policy, Report, Role, RoutingTable, Source, HISTORY_LEN,
};

/// One backend the elector knows.
#[derive(Debug, Clone)]
pub struct Member {
    pub id: BackendId,
    pub name: String,
    pub address: String,
    /// Poked when a client connect failed, so the checker re-checks at once.
    pub recheck: Arc<Notify>,
}

impl Member {
    pub fn new(id: BackendId, name: &str, address: &str) -> Member {
        Member { id, name: name.to_owned(), address: address.to_owned(), recheck: Arc::new(Notify::new()) }
    }
}

/// The backend set and policy; a reload publishes a new one (latest wins, never queued).
#[derive(Debug)]
pub struct Membership {
    pub members: Vec<Member>,
    pub policy: Policy,
}

pub struct Elector {
    /// The current membership, copied from `membership` whenever it changes.
    members: Vec<Member>,
    policy: Policy,
    membership: watch::Receiver<Arc<Membership>>,
    reports: mpsc::Receiver<Report>,
    /// The one writer of the routing table.
    table_tx: watch::Sender<Arc<RoutingTable>>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
}

impl Elector {
    pub fn new(
        mut membership: watch::Receiver<Arc<Membership>>,
        reports: mpsc::Receiver<Report>,
        table_tx: watch::Sender<Arc<RoutingTable>>,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
    ) -> Elector {
        let current = membership.borrow_and_update().clone();
        Elector {
            members: current.members.clone(),
            policy: current.policy,
            membership,
            reports,
            table_tx,
            metrics,
            cancel,
        }
    }

    /// Runs until cancelled. Re-decides every second as well, so stale observations expire.
    pub async fn run(mut self) {
        let mut states: HashMap<BackendId, BackendState> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.cancel.cancelled() => return,
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
                    self.members = current.members.clone();
                    self.policy = current.policy;
                    states.retain(|id, _| self.members.iter().any(|m| m.id == *id));
                }
                _ = tick.tick() => {}
            }
            self.publish(&states);
        }
    }

    fn publish(&self, states: &HashMap<BackendId, BackendState>) {
        let ordered: Vec<Backend> = self
            .members
            .iter()
            .map(|m| Backend {
                id: m.id,
                name: m.name.clone(),
                address: m.address.clone(),
                state: states.get(&m.id).cloned().unwrap_or_default(),
            })
            .collect();
        let prev = self.table_tx.borrow().clone();
        let mut next = topology::decide(&prev, &ordered, &self.policy, Instant::now().into_std());
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
        self.update_metrics(&next);
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

    fn update_metrics(&self, table: &RoutingTable) {
        let m = &self.metrics;
        for view in &table.backends {
            let name = view.name.as_str();
            let up = view.state.fail_streak == 0 && !view.state.lost && view.state.last_probe.is_some();
            m.backend_up.with_label_values(&[name]).set(i64::from(up));
            for role in Role::ALL {
                m.backend_role.with_label_values(&[name, role.as_str()]).set(i64::from(view.role == role));
            }
            m.leader.with_label_values(&[name]).set(i64::from(table.leader == Some(view.id)));
        }
        m.split_brain.set(i64::from(table.reason.is_split_brain()));
        if table.epoch != self.table_tx.borrow().epoch {
            m.leader_changes.inc();
        }
    }
}
