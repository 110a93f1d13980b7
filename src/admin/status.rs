//! The `/status` document (and the status page's data): one snapshot of the routing table, the
//! per-backend state it was decided from, and, with `[etcd]`, the etcd view. No secret is ever
//! part of it. Instants are shown relative to the moment of the snapshot, in milliseconds.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::AdminState;
use crate::topology::{FenceState, Route, RoutingTable};

/// Everything `/status` and the status page show, taken from one table snapshot.
#[derive(Serialize)]
pub struct Status {
    pub leader: Option<String>,
    pub reason: &'static str,
    pub reason_text: &'static str,
    pub split_brain: bool,
    pub epoch: u64,
    pub draining: bool,
    pub config_generation: u64,
    pub backends: Vec<BackendStatus>,
    /// Recent leader changes, oldest first.
    pub events: Vec<Event>,
    /// The leader lease as etcd shows it; absent without `[etcd]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd: Option<EtcdStatus>,
    /// The read-only listener; absent without `[read_only]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_only: Option<ReadOnlyStatus>,
}

/// Where read-only sessions go.
#[derive(Serialize)]
pub struct ReadOnlyStatus {
    pub listen: Option<String>,
    /// Where a new read session would go now (the replica in bounds with the fewest read
    /// sessions, or the leader as the fallback).
    pub target: Option<String>,
    /// `leader` or `refuse`.
    pub fallback: &'static str,
    pub max_lag_bytes: u64,
    pub max_lag_ms: u64,
    pub replicas_in_bounds: usize,
    /// Why no replica is in bounds, when none is.
    pub reason: Option<String>,
}

/// What fencing sees and decides.
#[derive(Serialize)]
pub struct EtcdStatus {
    /// `enforce` or `observe`.
    pub mode: &'static str,
    /// The latest read attempt succeeded.
    pub reachable: bool,
    /// The member Patroni's leader key names in the latest read.
    pub leader_member: Option<String>,
    pub revision: Option<i64>,
    pub endpoint: Option<String>,
    /// The current confirmation, if any.
    pub confirmation: Option<ConfirmationStatus>,
    /// Milliseconds since the read that last confirmed a leader.
    pub last_confirmed_age_ms: Option<u64>,
    pub revoked: Option<String>,
    pub last_error: Option<String>,
    /// The fail-safe fallback routes on SQL alone.
    pub failsafe_fallback: bool,
    /// Patroni's maintenance mode: a manual promotion does not move the leader key.
    pub paused: bool,
    pub patroni_failsafe_mode: Option<bool>,
    pub patroni_ttl: Option<u64>,
    pub patroni_loop_wait: Option<u64>,
    /// Where enforcing routes (in `observe` mode: would route), and why.
    pub enforced_leader: Option<String>,
    pub enforced_reason: &'static str,
    pub reads_ok: u64,
    pub reads_failed: u64,
}

#[derive(Serialize)]
pub struct ConfirmationStatus {
    pub member: String,
    pub revision: i64,
    pub age_ms: u64,
    /// Until `valid_until`; negative once it has passed.
    pub valid_for_ms: i64,
}

#[derive(Serialize)]
pub struct BackendStatus {
    pub name: String,
    pub address: String,
    pub role: &'static str,
    pub routable: bool,
    pub leader: bool,
    pub timeline: Option<u32>,
    /// A string: 64-bit identifiers do not fit a JSON number safely.
    pub system_identifier: Option<String>,
    pub last_error: Option<String>,
    pub last_check_ms: Option<f64>,
    pub checks_total: u64,
    pub failures_total: u64,
    pub consecutive_successes: u32,
    pub consecutive_failures: u32,
    pub connection_lost: bool,
    pub sessions_active: i64,
    /// The address the latest successful check resolved and ran on (clients go there).
    pub resolved_address: Option<String>,
    /// Patroni's member name.
    pub member: String,
    /// Fencing: why this backend can never be confirmed, if it cannot.
    pub member_problem: Option<String>,
    /// Fencing: milliseconds until its sessions end unless a read renews the confirmation.
    pub lease_valid_for_ms: Option<i64>,
    /// A replica's lag behind the leader (over-estimated); absent for primaries.
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
    /// A replica within `[read_only]`'s bounds.
    pub in_read_bounds: bool,
    /// Why a replica is not in bounds.
    pub read_block: Option<&'static str>,
    pub read_sessions_active: i64,
}

#[derive(Serialize)]
pub struct Event {
    pub at_unix_ms: u64,
    pub epoch: u64,
    pub from: Option<String>,
    pub to: Option<String>,
    pub reason: &'static str,
    pub reason_text: &'static str,
}

/// Reads the current table once and assembles the status.
pub fn snapshot(state: &AdminState) -> Status {
    let table: Arc<RoutingTable> = state.routing.borrow().clone();
    let now = tokio::time::Instant::now().into_std();
    Status {
        leader: table.leader_view().map(|b| b.name.clone()),
        reason: table.reason.as_str(),
        reason_text: table.reason.describe(),
        split_brain: table.reason.is_split_brain(),
        epoch: table.epoch,
        draining: state.draining.is_cancelled(),
        config_generation: state.config_generation.load(Ordering::Relaxed),
        backends: table
            .backends
            .iter()
            .map(|b| BackendStatus {
                name: b.name.clone(),
                address: b.address.clone(),
                role: b.role.as_str(),
                routable: b.routable,
                leader: table.leader == Some(b.id),
                timeline: b.state.last_probe.and_then(|p| p.timeline),
                system_identifier: b.state.last_probe.and_then(|p| p.system_id).map(|s| s.to_string()),
                last_error: b.state.last_error.clone(),
                last_check_ms: b.state.last_check_latency.map(|d| d.as_secs_f64() * 1000.0),
                checks_total: b.state.checks_total,
                failures_total: b.state.failures_total,
                consecutive_successes: b.state.ok_streak,
                consecutive_failures: b.state.fail_streak,
                connection_lost: b.state.lost,
                sessions_active: state.metrics.sessions_active.with_label_values(&[&b.name]).get(),
                resolved_address: b.resolved().map(|a| a.to_string()),
                member: b.member.clone(),
                member_problem: b.member_problem.clone(),
                lease_valid_for_ms: b.lease_until.map(|v| signed_ms(now, v)),
                lag_bytes: b.lag.and_then(|l| l.bytes),
                lag_seconds: b.lag.map(|l| l.time.as_secs_f64()),
                in_read_bounds: b.readable,
                read_block: b.read_block.map(|r| r.as_str()),
                read_sessions_active: state.metrics.read_sessions_active.with_label_values(&[&b.name]).get(),
            })
            .collect(),
        events: table
            .history
            .iter()
            .map(|e| Event {
                at_unix_ms: e.at_unix_ms,
                epoch: e.epoch,
                from: e.from.clone(),
                to: e.to.clone(),
                reason: e.reason.as_str(),
                reason_text: e.reason.describe(),
            })
            .collect(),
        etcd: table.fence.as_ref().map(|f| etcd_status(f, &table, now)),
        read_only: read_only_status(state, &table, now),
    }
}

fn read_only_status(state: &AdminState, table: &RoutingTable, now: Instant) -> Option<ReadOnlyStatus> {
    let policy = table.read?;
    let reads = |id| {
        let name = table.backend(id).map(|b| b.name.as_str()).unwrap_or_default();
        usize::try_from(state.metrics.read_sessions_active.with_label_values(&[name]).get()).unwrap_or(0)
    };
    let in_bounds = table.backends.iter().filter(|b| b.readable).count();
    Some(ReadOnlyStatus {
        listen: state.read_only_listen.map(|a| a.to_string()),
        target: table.target(Route::Read, reads, now).and_then(|t| table.backend(t.id)).map(|b| b.name.clone()),
        fallback: policy.fallback.as_str(),
        max_lag_bytes: policy.max_lag_bytes,
        max_lag_ms: u64::try_from(policy.max_lag.as_millis()).unwrap_or(u64::MAX),
        replicas_in_bounds: in_bounds,
        reason: (in_bounds == 0).then(|| table.read_refusal()),
    })
}

fn etcd_status(f: &FenceState, table: &RoutingTable, now: Instant) -> EtcdStatus {
    let v = &f.view;
    let ms = |since: Instant| u64::try_from(now.saturating_duration_since(since).as_millis()).unwrap_or(u64::MAX);
    EtcdStatus {
        mode: f.mode.as_str(),
        reachable: v.reachable,
        leader_member: v.named().map(str::to_owned),
        revision: v.read.as_ref().map(|r| r.revision),
        endpoint: v.read.as_ref().map(|r| r.endpoint.clone()),
        confirmation: v.confirmation.as_ref().map(|c| ConfirmationStatus {
            member: c.member.clone(),
            revision: c.revision,
            age_ms: ms(c.read_start),
            valid_for_ms: signed_ms(now, c.valid_until),
        }),
        last_confirmed_age_ms: v.last_confirmed.map(ms),
        revoked: v.revoked.clone(),
        last_error: v.last_error.clone(),
        failsafe_fallback: f.failsafe,
        paused: v.patroni.is_some_and(|p| p.pause),
        patroni_failsafe_mode: v.patroni.map(|p| p.failsafe_mode),
        patroni_ttl: v.patroni.and_then(|p| p.ttl),
        patroni_loop_wait: v.patroni.and_then(|p| p.loop_wait),
        enforced_leader: f.leader.and_then(|id| table.backend(id)).map(|b| b.name.clone()),
        enforced_reason: f.reason.as_str(),
        reads_ok: v.reads_ok,
        reads_failed: v.reads_failed,
    }
}

/// Milliseconds from `now` to `at`, negative when `at` has passed.
fn signed_ms(now: Instant, at: Instant) -> i64 {
    match at.checked_duration_since(now) {
        Some(ahead) => i64::try_from(ahead.as_millis()).unwrap_or(i64::MAX),
        None => -i64::try_from(now.duration_since(at).as_millis()).unwrap_or(i64::MAX),
    }
}
