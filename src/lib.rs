//! pgleader: a leader-aware PostgreSQL TCP proxy.
//!
//! # Layout
//! ```text
//!             main ─► app ─┬─► proxy ──┐      proxy:   accept, first packet, wait for a leader,
//!                          ├─► admin ──┤               connect, replay, splice, cut
//!                          ├─► health ─┤      health:  one SQL checker task per backend
//!                          ├─► elector ┤      elector: folds observations through topology::decide
//!                          └─► signals │      admin:   /metrics /healthz /readyz /status
//!                                      ▼
//!             leaf layer:  config   pgwire   topology   metrics
//! ```
//! Middle-layer modules never import one another: `app` builds the channels and hands each task
//! its halves. The routing state is one `watch` of an immutable [`topology::RoutingTable`] with a
//! single writer (the elector).

pub mod app;
pub mod cli;
pub mod config;
pub mod pgwire;
pub mod pump;
pub mod topology;

mod admin;
mod elector;
mod etcd;
mod health;
mod metrics;
mod proxy;
mod signals;
mod task;

pub use app::{start, Running};
pub use config::Config;
/// The etcd reader's task and what it reports, public so that `tests/etcd.rs` can drive it
/// against a real etcd; `app` is its only caller inside the crate.
pub use etcd::{
    normalise_prefix, DynamicConfig, EtcdRead, EtcdReport, EtcdSettings, EtcdWatcher, LeaderKey, MemberInfo, WatchEvent,
};
pub use metrics::ShardedCounter;
