//! Loopback throughput and round-trip latency through `pgleader::pump::pump_both`, the byte pump
//! every session runs after its startup phase: client → pump → in-process echo backend → pump →
//! client, all on 127.0.0.1 in one multi-threaded tokio runtime.
//!
//! - `splice/bulk/*`: one session streams a large payload while reading its echo concurrently
//!   (COPY-like traffic); throughput in bytes moved one way.
//! - `splice/pingpong/*`: one session sends a small message and waits for its echo before the next
//!   (pgbench `-S`-like traffic); the time per round trip, which is mostly wakeups and syscalls.
//! - `splice/pingpong/direct/*`: the same round trip straight to the echo backend, so the pump's
//!   cost is the difference.

use std::sync::atomic::AtomicU64;

use pgleader::pump::Tally;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pgleader::ShardedCounter;
use prometheus::IntCounter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

/// An echo server: every accepted connection gets its bytes back until EOF.
async fn echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A proxy that runs `pump_both` between each accepted client and a new connection to `backend`.
async fn pump_proxy(backend: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let addr = listener.local_addr().expect("proxy addr");
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(backend).await else { return };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let up = ShardedCounter::new(IntCounter::new("up", "bytes up").expect("counter"));
                let down = ShardedCounter::new(IntCounter::new("down", "bytes down").expect("counter"));
                let (session_up, session_down) = (AtomicU64::new(0), AtomicU64::new(0));
                let up = Tally { global: &up, session: &session_up };
                let down = Tally { global: &down, session: &session_down };
                let _ = pgleader::pump::pump_both(&client, &server, up, down).await;
            });
        }
    });
    addr
}

async fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s
}

/// Sends `total` bytes in `chunk`-sized writes while reading the echo back; returns when all is back.
async fn bulk(stream: &mut TcpStream, total: usize, chunk: &[u8]) {
    let (mut r, mut w) = stream.split();
    let writer = async {
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk.len());
            w.write_all(&chunk[..n]).await.expect("write");
            left -= n;
        }
    };
    let reader = async {
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0;
        while got < total {
            let n = r.read(&mut buf).await.expect("read");
            assert!(n > 0, "echo closed early");
            got += n;
        }
    };
    tokio::join!(writer, reader);
}

async fn pingpong(stream: &mut TcpStream, msg: &[u8], rounds: u64) {
    let mut buf = vec![0u8; msg.len()];
    for _ in 0..rounds {
        stream.write_all(msg).await.expect("write");
        stream.read_exact(&mut buf).await.expect("read");
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let (echo, proxy) = rt.block_on(async {
        let echo = echo_backend().await;
        (echo, pump_proxy(echo).await)
    });
    rt.block_on(report_future_size(echo));

    let mut group = c.benchmark_group("splice/bulk");
    group.sample_size(20).measurement_time(Duration::from_secs(5));
    const TOTAL: usize = 32 * 1024 * 1024;
    for chunk in [16 * 1024, 256 * 1024] {
        let payload = vec![0x5au8; chunk];
        group.throughput(Throughput::Bytes(TOTAL as u64));
        group.bench_with_input(BenchmarkId::from_parameter(chunk), &payload, |b, payload| {
            let mut s = rt.block_on(connect(proxy));
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        bulk(&mut s, TOTAL, payload).await;
                    }
                    start.elapsed()
                })
            });
        });
    }
    group.finish();

    let mut group = c.benchmark_group("splice/pingpong");
    group.sample_size(20).measurement_time(Duration::from_secs(4));
    // 48 bytes ~ a simple-protocol SELECT; 4 KiB ~ a small result set.
    for size in [48usize, 4096] {
        let msg = vec![0x51u8; size];
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::new("pump", size), &msg, |b, msg| {
            let mut s = rt.block_on(connect(proxy));
            b.iter_custom(|iters| timed(&rt, pingpong(&mut s, msg, iters)));
        });
        group.bench_with_input(BenchmarkId::new("direct", size), &msg, |b, msg| {
            let mut s = rt.block_on(connect(echo));
            b.iter_custom(|iters| timed(&rt, pingpong(&mut s, msg, iters)));
        });
    }
    group.finish();
}

/// What one idle session's pump costs in its task: the size of the `pump_both` future.
async fn report_future_size(echo: SocketAddr) {
    let (a, b) = (connect(echo).await, connect(echo).await);
    let counter = ShardedCounter::new(IntCounter::new("c", "c").expect("counter"));
    let session = AtomicU64::new(0);
    let tally = Tally { global: &counter, session: &session };
    let pump = pgleader::pump::pump_both(&a, &b, tally, tally);
    eprintln!("pump_both future: {} bytes", std::mem::size_of_val(&pump));
}

/// Runs `f` to completion on the runtime and returns the wall time.
fn timed(rt: &Runtime, f: impl std::future::Future<Output = ()>) -> Duration {
    rt.block_on(async {
        let start = Instant::now();
        f.await;
        start.elapsed()
    })
}

criterion_group!(benches, bench);
criterion_main!(benches);
