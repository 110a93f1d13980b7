//! The integration-test harness shared by every test binary (rathole's `tests/common` shape).
//!
//! - [`pg`]: real PostgreSQL primaries and streaming replicas in temp dirs.
//! - [`proxy`]: pgleader running in-process on `127.0.0.1:0`, plus a tiny HTTP client for admin.
//!
//! Policy for a missing PostgreSQL: the tests FAIL with the install command (`apt-get install
//! postgresql`); `scripts/test` installs it first, so a skip could only hide a broken setup.
//! No fixed ports: every listener binds port 0 or a port just found free.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod etcd;
pub mod patroni;
pub mod pg;
pub mod proxy;
pub mod workload;

use std::future::Future;
use std::time::Duration;

/// A loopback port that was free a moment ago (for servers that cannot bind port 0 themselves).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Polls `check` every 50 ms until it holds, panicking with `what` after `patience`.
pub fn eventually_blocking(patience: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + patience;
    while !check() {
        assert!(std::time::Instant::now() < deadline, "timed out after {patience:?} waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Async version of [`eventually_blocking`]: polls `check` until it returns `Some`.
pub async fn eventually<T, F, Fut>(patience: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {patience:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
