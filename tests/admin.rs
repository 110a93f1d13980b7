//! The admin server under hostile HTTP clients (issue 10, item 11), in front of a real
//! PostgreSQL: a flood of idle connections three times the connection cap and a client that
//! sends its headers a few bytes a second must not keep `/readyz` from answering a well-behaved
//! client; the slow one is closed before it finishes its headers, the flood is closed (the excess
//! at the cap, the rest by the header timer), and pgleader's DEBUG lines count the cap's
//! evictions.

#![allow(clippy::unwrap_used, reason = "in tests a panic is the failure report")]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pg::PgNode;
use common::proxy::{get, wait_leader, ProxyBuilder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tracing_subscriber::layer::SubscriberExt;

/// The admin server's connection cap (`admin::MAX_CONNECTIONS`, written here as the oracle).
const CAP: usize = 64;
/// Its header-read timeout (`admin::HEADER_READ_TIMEOUT`).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Counts pgleader's "admin connections at the cap" DEBUG lines.
struct CapEvents(Arc<AtomicUsize>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CapEvents {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message(bool);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 |= format!("{value:?}").contains("admin connections at the cap");
                }
            }
        }
        let mut m = Message(false);
        event.record(&mut m);
        if m.0 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Installs the counting layer (and test output at INFO, DEBUG for the admin server).
fn count_cap_events() -> Arc<AtomicUsize> {
    let count = Arc::new(AtomicUsize::new(0));
    let filter = tracing_subscriber::EnvFilter::new("pgleader=info,pgleader::admin=debug");
    let subscriber = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_test_writer())
        .with(CapEvents(Arc::clone(&count)));
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber of this test binary");
    count
}

/// Server-side connections of `port` in ESTABLISHED state, from /proc/net/tcp (pgleader runs in
/// this process, so its sockets are there; a client socket has the port as its remote end).
fn server_established(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&local) && f[3] == "01"
        })
        .count()
}

/// Reads until the server closes the connection; returns what it sent.
async fn read_until_closed(mut s: TcpStream) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return seen,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_headers_client_and_an_idle_flood_do_not_hold_the_admin_port() {
    let cap_events = count_cap_events();
    let primary = PgNode::start_primary("admin-flood");
    let proxy = pgleader::start(ProxyBuilder::new(&[&primary]).config()).await.unwrap();
    let admin = proxy.admin_addr;
    wait_leader(admin, Some("admin-flood")).await;

    // The flood: three times the cap, connected and silent.
    let flood_started = Instant::now();
    let mut flood = Vec::new();
    for _ in 0..3 * CAP {
        flood.push(TcpStream::connect(admin).await.unwrap());
    }
    let flood: JoinSet<Vec<u8>> = flood.into_iter().map(read_until_closed).collect();
    // Every connection past the cap took the slot of an idle one, which was closed.
    let evicted = common::eventually(Duration::from_secs(30), "the flood's excess closed at the cap", || async {
        let n = cap_events.load(Ordering::SeqCst);
        (n >= 2 * CAP).then_some(n)
    })
    .await;
    let held = common::eventually(Duration::from_secs(30), "at most the cap held", || async {
        let n = server_established(admin.port());
        (n <= CAP).then_some(n)
    })
    .await;
    eprintln!(
        "flood of {}: {evicted} closed at the cap, {held} held by the server, {:?} after the flood began",
        3 * CAP,
        flood_started.elapsed()
    );

    // The slow client: a valid request, a few bytes a second (it would need ~20 s).
    let request = b"GET /readyz HTTP/1.1\r\nHost: pgleader\r\nUser-Agent: slow-client/1.0\r\n\r\n";
    let (progress_tx, mut progress) = tokio::sync::watch::channel(0usize);
    let slow = tokio::spawn(async move {
        let mut s = TcpStream::connect(admin).await.unwrap();
        let mut answer = Vec::new();
        let mut sent = 0;
        let mut buf = [0u8; 1024];
        'send: for b in request {
            if s.write_all(&[*b]).await.is_err() {
                break;
            }
            sent += 1;
            progress_tx.send_replace(sent);
            // A pause between bytes, ended early only by the server closing (or answering).
            if let Ok(r) = tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
                match r {
                    Ok(0) | Err(_) => break 'send,
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                }
            }
        }
        (sent, answer)
    });

    // The well-behaved client, each time the slow one has sent five more bytes.
    let mut answered = 0;
    loop {
        let sent = *progress.borrow_and_update();
        if slow.is_finished() {
            break;
        }
        let (code, body) = get(admin, "/readyz").await;
        assert_eq!((code, body.trim()), (200, "ready: leader admin-flood"), "after the slow client sent {sent} bytes");
        answered += 1;
        let next = sent + 5;
        if progress.wait_for(|n| *n >= next).await.is_err() {
            break;
        }
    }
    let (sent, answer) = slow.await.unwrap();
    eprintln!("/readyz answered {answered} times while the slow client sent {sent} of {} bytes", request.len());
    assert!(answered >= 2, "the well-behaved client was served during the slow one");
    assert!(sent < request.len(), "the slow client was closed before it finished its headers ({sent} bytes sent)");
    assert!(
        !answer.starts_with(b"HTTP/1.1 200"),
        "the slow client got no answer: {:?}",
        String::from_utf8_lossy(&answer)
    );

    // The flood is gone: the excess at the cap, the rest at the header timeout.
    let closed =
        tokio::time::timeout(HEADER_TIMEOUT * 6, flood.join_all()).await.expect("every flood connection closed");
    assert_eq!(closed.len(), 3 * CAP);
    assert!(closed.iter().all(Vec::is_empty), "no flood connection got a byte");
    eprintln!("every flood connection closed {:?} after the flood began", flood_started.elapsed());
    assert_eq!(get(admin, "/readyz").await.0, 200);
    assert_eq!(server_established(admin.port()), 0, "nothing left open on the admin port");
    proxy.shutdown().await.unwrap();
}
