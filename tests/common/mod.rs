//! The integration-test harness shared by every test binary (rathole's `tests/common` shape).
//!
//! - [`pg`]: real PostgreSQL primaries and streaming replicas in temp dirs.
//! - [`proxy`]: pgleader running in-process on `127.0.0.1:0`, plus a tiny HTTP client for admin.
//! - [`netns`], [`partition`]: the runbook's three nodes in network namespaces, for the partition suite.
//!
//! Policy for a missing PostgreSQL: the tests FAIL with the install command (`apt-get install
//! postgresql`); `scripts/test` installs it first, so a skip could only hide a broken setup.
//! No fixed ports: every listener binds port 0 or a port just found free.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod etcd;
pub mod netns;
pub mod partition;
pub mod patroni;
pub mod pg;
pub mod proxy;
pub mod scenario;
pub mod wire;
pub mod workload;

use std::future::Future;
use std::time::Duration;

/// A loopback port that was free a moment ago (for servers that cannot bind port 0 themselves).
///
/// It is picked below the kernel's ephemeral range (`ip_local_port_range`), where outgoing
/// connections and `bind(0)` never take their ports, so the usual thief of a port between this
/// check and the server's bind is gone; never the same port twice in one process. Another process
/// can still take it: the servers that use these ports (`PgNode::start`, the Patroni harness's
/// etcd and Patroni) retry with a new port when the bind fails with EADDRINUSE.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQ: AtomicU32 = AtomicU32::new(0);
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u32, u32::from(ephemeral_low.max(10_100)));
    // A different walk through [low, high) for every process: start at a pid-derived offset.
    let start = std::process::id().wrapping_mul(2_654_435_761) % (high - low);
    let mut given = GIVEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for _ in 0..2000 {
        let step = SEQ.fetch_add(1, Ordering::Relaxed).wrapping_mul(7919);
        let port = (low + (start + step) % (high - low)) as u16;
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Whether a server's log says its listen port was taken (EADDRINUSE), so a retry with another
/// port from [`free_port`] is the fix.
pub fn port_was_taken(log: &str) -> bool {
    log.contains("Address already in use") || log.contains("address already in use")
}

/// Panics on tokio worker threads, where an in-process pgleader's tasks run: tokio would
/// swallow them (a task's panic only ends that task). Counted from [`watch_worker_panics`] on.
pub static WORKER_PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Installs (once per test binary) the panic hook that counts [`WORKER_PANICS`].
pub fn watch_worker_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name().is_some_and(|n| n.starts_with("tokio-runtime-worker")) {
                WORKER_PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            previous(info);
        }));
    });
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

/// What a connection holds at this instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketNow {
    /// Open, nothing to read.
    Silent,
    /// Bytes are waiting.
    Bytes,
    /// The peer closed it (EOF, nothing before it).
    Closed,
    /// Reset, or another error.
    Failed,
}

/// Looks at `s` without waiting and without consuming anything: a non-blocking peek, a system
/// call every time (tokio's `try_read` trusts its last readiness event and can miss an EOF).
pub fn socket_now(s: &tokio::net::TcpStream) -> SocketNow {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
    match socket2::SockRef::from(s).peek(&mut byte) {
        Ok(0) => SocketNow::Closed,
        Ok(_) => SocketNow::Bytes,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => SocketNow::Silent,
        Err(_) => SocketNow::Failed,
    }
}
