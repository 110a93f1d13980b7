//! Hostile and broken clients against a pgleader in front of real PostgreSQL (issue 7, items 1 and
//! 3): garbage first packets, 2,000 silent or dribbling clients, a flood past `max_connections`,
//! file-descriptor exhaustion of the real binary, and clients outside `[proxy] allow`. Every test
//! also keeps a well-behaved client connected and checks that it is unaffected, and none of them
//! may make pgleader panic (a panic hook counts panics on the runtime's worker threads).
//!
//! What each bad input must get is written next to it in `garbage_first_packets_*`, as literal
//! expectations from the protocol (PostgreSQL's own startup-packet rules, `ProcessStartupPacket`
//! in `src/backend/postmaster/postmaster.c`), never computed by `pgleader::pgwire`: packets are
//! built and answers read with `common::wire`, written from the protocol documentation. The test
//! prints the table of what the client saw (`cargo test --test hostile -- --nocapture`).

#![allow(clippy::unwrap_used, reason = "in tests a panic is the failure report")]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::pg::PgNode;
use common::proxy::{connect_via, get, metric, metric_at_least, wait_connections, wait_leader, ProxyBuilder};
use common::wire::{self, ErrorFields};
use common::{eventually, SocketNow};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;

fn assert_no_panics() {
    assert_eq!(common::WORKER_PANICS.load(Ordering::SeqCst), 0, "a task panicked (see the output above)");
}

/// Makes sure this process may open `want` files (the in-process tests hold both ends of every
/// connection). Uses util-linux `prlimit` on our own pid: raising the soft limit up to the hard
/// one needs no privilege, and std has no setrlimit.
fn raise_nofile(want: u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    let soft: u64 = nums[0].parse().unwrap_or(u64::MAX);
    let hard: u64 = nums[1].parse().unwrap_or(u64::MAX);
    if soft >= want {
        return;
    }
    assert!(hard >= want, "need {want} open files, the hard limit is {hard}: raise it (ulimit -Hn)");
    let status = Command::new("prlimit")
        .args(["--pid", &std::process::id().to_string(), &format!("--nofile={want}:{hard}")])
        .status()
        .expect("run prlimit (util-linux)");
    assert!(status.success(), "prlimit --nofile={want}");
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// What a raw client saw after its bytes, until the proxy closed the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// A complete ErrorResponse (after any single-byte `N` answers), then the close.
    Error { answers: String, code: String, message: String },
    /// Closed (EOF) without a byte.
    Closed,
    /// Reset without a byte.
    Reset,
    /// Anything else (e.g. a backend's reply), raw.
    Bytes(Vec<u8>),
}

impl Seen {
    fn code(&self) -> &str {
        match self {
            Seen::Error { code, .. } => code,
            _ => "",
        }
    }
}

/// Reads until the proxy closes (bounded: a proxy that never closes fails the test); `true` if
/// the close was a reset.
async fn read_raw_to_close(s: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await;
        match read.expect("pgleader closes the connection (30 s)") {
            Ok(0) => return (out, false),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (out, true),
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// Whether pgleader has closed `s` without a byte, seen now; a byte there is a bug.
fn closed_now(s: &TcpStream) -> bool {
    match common::socket_now(s) {
        SocketNow::Closed => true,
        SocketNow::Silent => false,
        other => panic!("a connection pgleader should leave silent or close is {other:?}"),
    }
}

async fn read_to_close(s: &mut TcpStream) -> Seen {
    let (out, reset) = read_raw_to_close(s).await;
    classify(&out, reset)
}

fn classify(out: &[u8], reset: bool) -> Seen {
    if out.is_empty() {
        return if reset { Seen::Reset } else { Seen::Closed };
    }
    let answers: String = out.iter().take_while(|&&b| b == b'N' || b == b'S').map(|&b| b as char).collect();
    // Exactly one ErrorResponse after the answers, then the close; anything else is raw bytes.
    match wire::error_response(&out[answers.len()..]) {
        Some(ErrorFields { code, message, severity }) => {
            assert_eq!(severity, "FATAL");
            Seen::Error { answers, code, message }
        }
        None => Seen::Bytes(out.to_vec()),
    }
}

/// Connects, sends `packets` one write each, waiting for the proxy's one-byte answer (`N`)
/// between them as a real client does; half-closes if asked, and reads to the close.
async fn exchange(proxy: SocketAddr, packets: &[&[u8]], half_close: bool) -> Seen {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let mut seen = Vec::new();
    for (i, p) in packets.iter().enumerate() {
        if s.write_all(p).await.is_err() {
            break;
        }
        if i + 1 < packets.len() {
            let mut one = [0u8; 1];
            match s.read(&mut one).await {
                Ok(1) => seen.push(one[0]),
                _ => return classify(&seen, false),
            }
        }
    }
    if half_close {
        let _ = s.shutdown().await;
    }
    let (rest, reset) = read_raw_to_close(&mut s).await;
    seen.extend(rest);
    classify(&seen, reset)
}

/// A xorshift64* stream: the "random bytes" are the same on every run.
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// A StartupMessage of exactly `total` bytes (padding in application_name).
fn startup_of_length(total: usize) -> Vec<u8> {
    let with = |pad: &str| {
        wire::startup_message(
            wire::PROTOCOL_3_0,
            &[("user", "postgres"), ("database", "postgres"), ("application_name", pad)],
        )
    };
    let pad = "x".repeat(total - with("").len());
    let p = with(&pad);
    assert_eq!(p.len(), total);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_first_packets_get_08p01_or_0a000_and_a_clean_close() {
    common::watch_worker_panics();
    let primary = PgNode::start_primary("garbage2");
    let proxy = ProxyBuilder::new(&[&primary]).proxy("client_hello_timeout", "1s").start().await;
    wait_leader(proxy.admin_addr, Some("garbage2")).await;
    let addr = proxy.proxy_addr;
    // The well-behaved client: connected before, inside an open transaction throughout.
    let healthy = connect_via(addr, "postgres").await.unwrap();
    healthy.batch_execute("BEGIN; CREATE TEMP TABLE seen (n int)").await.unwrap();

    let startup = wire::startup("postgres", "postgres");
    let with_version = |code: u32| {
        let mut p = startup.clone();
        p[4..8].copy_from_slice(&code.to_be_bytes());
        p
    };
    let mut no_terminator = startup.clone();
    *no_terminator.last_mut().unwrap() = b'x';
    let mut bad_utf8 = wire::startup_message(wire::PROTOCOL_3_0, &[("user", "p\u{e9}")]);
    let at = bad_utf8.iter().position(|&b| b == 0xc3).unwrap();
    bad_utf8[at] = 0xff;
    let mut after_terminator = wire::startup_message(wire::PROTOCOL_3_0, &[("user", "postgres")]);
    after_terminator.extend_from_slice(b"zz");
    let n = after_terminator.len() as u32;
    after_terminator[..4].copy_from_slice(&n.to_be_bytes());
    let ssl = wire::header(8, wire::SSL_REQUEST_CODE);
    let gss = wire::header(8, wire::GSSENC_REQUEST_CODE);
    let tls_hello = {
        // A TLS 1.2 ClientHello record as `openssl s_client` would start it, 200 bytes.
        let mut h = vec![0x16, 0x03, 0x01, 0x00, 0xc3, 0x01, 0x00, 0x00, 0xbf, 0x03, 0x03];
        h.extend(random_bytes(7, 189));
        h
    };
    let http: &[u8] = b"GET / HTTP/1.1\r\nHost: pgleader\r\nUser-Agent: curl/7.88\r\n\r\n";

    // (name, packets sent one at a time, half-close after sending, what the client must see)
    let mut cases: Vec<(String, Vec<Vec<u8>>, bool, &str)> = vec![
        ("HTTP GET".into(), vec![http.to_vec()], false, "08P01"),
        ("HTTP/2 preface".into(), vec![b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()], false, "08P01"),
        (
            "PROXY protocol v1 header".into(),
            vec![b"PROXY TCP4 10.1.2.3 10.0.0.1 5555 5432\r\n".to_vec()],
            false,
            "08P01",
        ),
        ("SSH banner".into(), vec![b"SSH-2.0-OpenSSH_9.2p1\r\n".to_vec()], false, "08P01"),
        ("TLS ClientHello without SSLRequest".into(), vec![tls_hello], false, "close"),
        ("length 0".into(), vec![vec![0; 8]], false, "08P01"),
        ("length 4".into(), vec![wire::header(4, 196_608)], false, "08P01"),
        ("length 7".into(), vec![vec![0, 0, 0, 7, 0, 3, 0]], false, "08P01"),
        ("length 10,001".into(), vec![wire::header(10_001, 196_608)], false, "08P01"),
        ("length 2^32-1".into(), vec![wire::header(u32::MAX, 196_608)], false, "08P01"),
        ("length 10,000 (the limit) and valid".into(), vec![startup_of_length(10_000)], true, "accepted"),
        ("truncated, then silent".into(), vec![vec![0, 0, 0, 40, 0, 3, 0, 0, b'u']], false, "close"),
        ("truncated, then half-closed".into(), vec![startup[..startup.len() - 3].to_vec()], true, "close"),
        ("only 3 bytes, then half-closed".into(), vec![vec![0, 0, 0]], true, "close"),
        ("protocol 4.0".into(), vec![with_version(4 << 16)], false, "0A000"),
        ("protocol 2.0".into(), vec![with_version(2 << 16)], false, "0A000"),
        ("protocol 1234.5681 (an unknown request code)".into(), vec![with_version(80_877_105)], false, "0A000"),
        (
            "SSLRequest with length 12".into(),
            vec![[wire::header(12, wire::SSL_REQUEST_CODE), vec![0; 4]].concat()],
            false,
            "08P01",
        ),
        (
            "CancelRequest with no secret".into(),
            vec![[wire::header(12, wire::CANCEL_REQUEST_CODE), vec![0; 4]].concat()],
            false,
            "08P01",
        ),
        (
            "CancelRequest with a 300-byte secret".into(),
            vec![[wire::header(312, wire::CANCEL_REQUEST_CODE), vec![1; 304]].concat()],
            false,
            "08P01",
        ),
        ("StartupMessage without its final NUL".into(), vec![no_terminator], false, "08P01"),
        ("StartupMessage with non-UTF-8 parameter".into(), vec![bad_utf8], false, "08P01"),
        ("StartupMessage with bytes after the terminator".into(), vec![after_terminator], false, "08P01"),
        (
            "SSLRequest with pipelined bytes (CVE-2021-23214)".into(),
            vec![[ssl.clone(), startup.clone()].concat()],
            false,
            "08P01",
        ),
        ("GSSENCRequest twice".into(), vec![gss.clone(), gss.clone()], false, "N+08P01"),
        ("GSSENCRequest, then HTTP".into(), vec![gss.clone(), http.to_vec()], false, "N+08P01"),
        ("GSSENCRequest, then SSLRequest, then StartupMessage".into(), vec![gss.clone(), ssl.clone()], false, "NN"),
    ];
    // Random bytes (the same on every run), with what the protocol says about each. PostgreSQL
    // reads a 4-byte length first: under 8 or over 10,000 is "invalid length of startup packet"
    // (08P01) at once; fewer than 4 bytes, or fewer than the length promises, is an incomplete
    // packet: the proxy waits for the rest and closes at client_hello_timeout without a reply.
    let random_cases: [(u64, usize, &str, &str); 7] = [
        (1, 1, "close", "1 byte (0x47): no length yet, closed at the hello timeout"),
        (2, 3, "close", "3 bytes: no length yet, closed at the hello timeout"),
        (3, 7, "08P01", "length 0xd7037ef3 > 10,000"),
        (4, 64, "08P01", "length 0x44b17b62 > 10,000"),
        (5, 1000, "08P01", "length 0x42968a75 > 10,000"),
        (6, 9000, "08P01", "length 0xd4098ff6 > 10,000"),
        (7, 20_000, "08P01", "length 0xd1ed161b > 10,000"),
    ];
    for (seed, len, expect, why) in random_cases {
        let bytes = random_bytes(seed, len);
        cases.push((format!("{len} random bytes (seed {seed}: {why})"), vec![bytes], false, expect));
    }
    // Random bytes behind a valid length of 100: the request code is the body's first 4 bytes.
    // None is a special code (SSL, GSSENC, cancel), so each is a protocol version whose major
    // is not 3: "unsupported frontend protocol" (0A000).
    for (seed, code) in [(11u64, "0xccd7455d"), (12, "0xce15d214"), (13, "0xcbf997af")] {
        let body = random_bytes(seed, 96);
        let bytes = [100u32.to_be_bytes().to_vec(), body].concat();
        cases.push((
            format!("random body of a 100-byte packet (seed {seed}: code {code})"),
            vec![bytes],
            false,
            "0A000",
        ));
    }
    // A 3.0 StartupMessage header with 52 random bytes of parameters: neither ends in the 0
    // terminator (the last bytes are 0xf0 and 0xeb), which PostgreSQL rejects as "invalid
    // startup packet layout: expected terminator as last byte" (08P01).
    for (seed, last) in [(21u64, "0xf0"), (22, "0xeb")] {
        let body = random_bytes(seed, 52);
        let bytes = [wire::header(60, wire::PROTOCOL_3_0), body].concat();
        cases.push((
            format!("3.0 StartupMessage with random parameters (seed {seed}, ends {last})"),
            vec![bytes],
            false,
            "08P01",
        ));
    }
    // The literal expectations above are about these exact bytes: the generator must not drift.
    assert_eq!(random_bytes(1, 1), [0x47]);
    assert_eq!(random_bytes(3, 4), [0xd7, 0x03, 0x7e, 0xf3]);
    assert_eq!(random_bytes(11, 4), [0xcc, 0xd7, 0x45, 0x5d]);
    assert_eq!(random_bytes(21, 52).last(), Some(&0xf0));
    assert_eq!(random_bytes(22, 52).last(), Some(&0xeb));

    let mut table = Vec::new();
    let mut failures = Vec::new();
    for (name, packets, half_close, want) in &cases {
        let refs: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
        let seen = exchange(addr, &refs, *half_close).await;
        let ok = match (*want, &seen) {
            ("close", Seen::Closed) => true,
            ("accepted", Seen::Bytes(b)) => b.first() == Some(&b'R'),
            ("N+08P01", Seen::Error { answers, code, .. }) => answers == "N" && code == "08P01",
            ("NN", Seen::Bytes(b)) => b == b"NN",
            (code, Seen::Error { answers, code: got, .. }) => answers.is_empty() && got == code,
            _ => false,
        };
        let shown = match &seen {
            Seen::Error { answers, code, message } => {
                format!("{answers}{}{code} {message:?}", if answers.is_empty() { "" } else { " then " })
            }
            Seen::Bytes(b) if b.first() == Some(&b'R') => "the backend's AuthenticationOk (spliced)".to_owned(),
            Seen::Bytes(b) => format!("bytes {:?}", &b[..b.len().min(16)]),
            other => format!("{other:?}"),
        };
        table.push(format!("{name:<55} -> {shown}"));
        if !ok {
            failures.push(format!("{name}: wanted {want}, saw {seen:?}"));
        }
        // After every bad client: the open session still works, and a new one can start.
        let row = healthy.query_one("INSERT INTO seen VALUES (1) RETURNING 1", &[]).await;
        assert!(row.is_ok(), "the established session broke after {name}: {row:?}");
        connect_via(addr, "postgres").await.unwrap_or_else(|e| panic!("a new client failed after {name}: {e}"));
    }
    eprintln!("what each bad first packet got:\n  {}", table.join("\n  "));
    assert!(failures.is_empty(), "wrong answers:\n{}", failures.join("\n"));

    // The last case stopped after the second `N`; a real client then sends its StartupMessage.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut one = [0u8; 1];
    s.write_all(&gss).await.unwrap();
    s.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"N");
    s.write_all(&ssl).await.unwrap();
    s.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"N", "the backend has no TLS, so the SSLRequest is answered N");
    s.write_all(&startup).await.unwrap();
    s.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"R", "a client that tried GSS and then SSL gets its session");

    // A probe that connects and closes, and one that resets, are not counted as sessions. Each
    // is waited for in and out of pgleader (its result is counted before it leaves the count),
    // with only `healthy` and `s` open besides.
    wait_connections(proxy.admin_addr, 2).await;
    let before = metric(proxy.admin_addr, "pgleader_sessions_total{result=\"client_error\"}").await;
    let probe = TcpStream::connect(addr).await.unwrap();
    wait_connections(proxy.admin_addr, 3).await;
    drop(probe);
    wait_connections(proxy.admin_addr, 2).await;
    let rst = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    rst.connect(&addr.into()).unwrap();
    wait_connections(proxy.admin_addr, 3).await;
    rst.set_linger(Some(Duration::ZERO)).unwrap();
    drop(rst);
    wait_connections(proxy.admin_addr, 2).await;
    let refused = cases.iter().filter(|c| c.3 != "close" && c.3 != "accepted" && c.3 != "NN").count() as f64;
    metric_at_least(proxy.admin_addr, "pgleader_sessions_total{result=\"refused_protocol\"}", refused).await;
    connect_via(addr, "postgres").await.unwrap();
    assert_eq!(metric(proxy.admin_addr, "pgleader_sessions_total{result=\"client_error\"}").await, before);

    healthy.batch_execute("COMMIT").await.expect("the transaction open through all of this commits");
    assert_no_panics();
    proxy.shutdown().await.unwrap();
}

/// The PostgreSQL sessions of clients (not the health checker, not the asking connection).
async fn client_backends(node: &PgNode) -> usize {
    node.sql_ok_async(
        "postgres",
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
         AND pid <> pg_backend_pid() AND application_name <> 'pgleader-health'",
    )
    .await
    .parse()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_silent_clients_are_closed_at_the_hello_timeout_and_block_no_one() {
    const SILENT: usize = 2000;
    const DRIBBLERS: usize = 10;
    common::watch_worker_panics();
    raise_nofile(3 * SILENT as u64 + 1024);
    let primary = PgNode::start_primary("silent");
    let proxy = ProxyBuilder::new(&[&primary])
        .proxy("max_connections", "2100")
        .proxy("client_hello_timeout", "4s")
        .start()
        .await;
    wait_leader(proxy.admin_addr, Some("silent")).await;
    let addr = proxy.proxy_addr;
    let healthy = connect_via(addr, "postgres").await.unwrap();
    let fds_before = open_fds();
    assert_eq!(client_backends(&primary).await, 1);

    // Connect in batches, so the kernel's accept queue never overflows into SYN retries.
    let mut silent = Vec::with_capacity(SILENT);
    for _ in 0..SILENT / 200 {
        let mut batch = JoinSet::new();
        for _ in 0..200 {
            batch.spawn(TcpStream::connect(addr));
        }
        while let Some(s) = batch.join_next().await {
            silent.push(s.unwrap().expect("connect a silent client"));
        }
    }
    // Dribblers send a valid StartupMessage one byte at a time, far too slowly to finish in time.
    let startup = wire::startup("postgres", "postgres");
    let mut dribblers = JoinSet::new();
    for _ in 0..DRIBBLERS {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let packet = startup.clone();
        dribblers.spawn(async move {
            let mut sent = 0;
            let mut probe = [0u8; 1];
            for b in &packet {
                if s.write_all(&[*b]).await.is_err() {
                    break;
                }
                sent += 1;
                // One byte every 500 ms, or stop as soon as the proxy closes.
                if let Ok(r) = tokio::time::timeout(Duration::from_millis(500), s.read(&mut probe)).await {
                    assert!(matches!(r, Ok(0) | Err(_)), "the proxy answered a half-sent packet: {r:?}");
                    break;
                }
            }
            (sent, packet.len())
        });
    }

    // Meanwhile a normal client connects (it queued behind all of them) and works.
    let newcomer = connect_via(addr, "postgres").await.expect("a new client gets through beside 2,000 silent ones");
    assert_eq!(newcomer.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    assert_eq!(healthy.query_one("SELECT 2", &[]).await.unwrap().get::<_, i32>(0), 2);
    assert_eq!(client_backends(&primary).await, 2, "silent clients must not consume backend connections");
    drop(newcomer);

    // Every silent client is closed at client_hello_timeout, without a byte.
    let mut readers = JoinSet::new();
    for mut s in silent {
        readers.spawn(async move { read_to_close(&mut s).await });
    }
    let mut closed = 0;
    while let Some(seen) = readers.join_next().await {
        assert_eq!(seen.unwrap(), Seen::Closed, "a silent client is closed without a reply");
        closed += 1;
    }
    assert_eq!(closed, SILENT);
    while let Some(r) = dribblers.join_next().await {
        let (sent, total) = r.unwrap();
        assert!(sent < total, "the dribbler finished its packet ({sent}/{total}): the deadline must be absolute");
    }
    let timeouts = (SILENT + DRIBBLERS) as f64;
    metric_at_least(proxy.admin_addr, "pgleader_sessions_total{result=\"client_timeout\"}", timeouts).await;
    assert_eq!(metric(proxy.admin_addr, "pgleader_sessions_total{result=\"client_timeout\"}").await, Some(timeouts));
    // Their sockets are gone on pgleader's side too (both ends live in this process).
    eventually(Duration::from_secs(10), "file descriptors back to the baseline", || async {
        (open_fds() <= fds_before + 16).then_some(())
    })
    .await;
    assert_eq!(healthy.query_one("SELECT 3", &[]).await.unwrap().get::<_, i32>(0), 3);
    assert_eq!(client_backends(&primary).await, 1);
    assert_no_panics();
    proxy.shutdown().await.unwrap();
}

/// What a client of the flood saw.
#[derive(Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum FloodOutcome {
    Connected,
    Sqlstate(String),
    Closed,
    Other(String),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_past_max_connections_gets_53300_and_service_continues() {
    const MAX: usize = 25;
    common::watch_worker_panics();
    raise_nofile(4096);
    let primary = PgNode::start_primary("flood");
    let proxy = ProxyBuilder::new(&[&primary])
        .proxy("max_connections", &MAX.to_string())
        .proxy("client_hello_timeout", "2s")
        .start()
        .await;
    wait_leader(proxy.admin_addr, Some("flood")).await;
    let addr = proxy.proxy_addr;
    let mut held = Vec::new();
    for _ in 0..MAX {
        held.push(connect_via(addr, "postgres").await.unwrap());
    }

    // The flood: real clients, libpq-style SSLRequest clients, cancel requests, silent sockets.
    let mut flood = JoinSet::new();
    for _ in 0..150 {
        flood.spawn(async move {
            match connect_via(addr, "postgres").await {
                Ok(_) => FloodOutcome::Connected,
                Err(e) => match e.as_db_error() {
                    Some(db) => FloodOutcome::Sqlstate(db.code().code().to_owned()),
                    None => FloodOutcome::Other(e.to_string()),
                },
            }
        });
    }
    let ssl = wire::header(8, wire::SSL_REQUEST_CODE);
    let startup = wire::startup("postgres", "postgres");
    for _ in 0..50 {
        let (ssl, startup) = (ssl.clone(), startup.clone());
        flood.spawn(async move {
            match exchange(addr, &[&ssl, &startup], false).await {
                Seen::Error { answers, code, .. } if answers == "N" => FloodOutcome::Sqlstate(format!("N+{code}")),
                other => FloodOutcome::Other(format!("{other:?}")),
            }
        });
    }
    let cancel = [wire::header(16, wire::CANCEL_REQUEST_CODE), vec![0, 0, 0, 1, 0, 0, 0, 2]].concat();
    for _ in 0..25 {
        let cancel = cancel.clone();
        flood.spawn(async move {
            match exchange(addr, &[&cancel], false).await {
                Seen::Closed => FloodOutcome::Closed,
                other => FloodOutcome::Other(format!("{other:?}")),
            }
        });
    }
    for _ in 0..25 {
        flood.spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            match read_to_close(&mut s).await {
                Seen::Closed => FloodOutcome::Closed,
                other => FloodOutcome::Other(format!("{other:?}")),
            }
        });
    }
    let mut outcomes = std::collections::BTreeMap::new();
    while let Some(o) = flood.join_next().await {
        *outcomes.entry(o.unwrap()).or_insert(0) += 1;
    }
    eprintln!("flood outcomes: {outcomes:?}");
    let want: std::collections::BTreeMap<FloodOutcome, i32> = [
        (FloodOutcome::Sqlstate("53300".into()), 150),
        (FloodOutcome::Sqlstate("N+53300".into()), 50),
        (FloodOutcome::Closed, 50),
    ]
    .into_iter()
    .collect();
    assert_eq!(outcomes, want, "every surplus client is refused with 53300 (cancels and silent ones closed)");
    assert_eq!(client_backends(&primary).await, MAX, "no surplus client reached PostgreSQL");
    metric_at_least(proxy.admin_addr, "pgleader_sessions_total{result=\"refused_limit\"}", 225.0).await;

    // Service continues: the held sessions work, and freed slots are taken by new clients.
    for (i, c) in held.iter().enumerate() {
        assert_eq!(c.query_one("SELECT $1::int", &[&(i as i32)]).await.unwrap().get::<_, i32>(0), i as i32);
    }
    held.truncate(MAX - 5);
    let mut fresh = Vec::new();
    for _ in 0..5 {
        // A slot is free once pgleader has seen the session end; retry refusals until then.
        let c =
            eventually(Duration::from_secs(10), "a freed slot", || async { connect_via(addr, "postgres").await.ok() })
                .await;
        fresh.push(c);
    }
    let refused = connect_via(addr, "postgres").await.expect_err("full again");
    assert_eq!(refused.code().map(|c| c.code()), Some("53300"));
    assert_eq!(fresh[4].query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    assert_no_panics();
    proxy.shutdown().await.unwrap();
}

/// The real binary, run under `prlimit`, with its JSON log lines collected.
struct Binary {
    child: Child,
    proxy: SocketAddr,
    admin: SocketAddr,
    log: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Binary {
    fn start(config: &str, nofile: Option<u32>) -> (Binary, tempfile::NamedTempFile) {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut file, config.as_bytes()).unwrap();
        let bin = env!("CARGO_BIN_EXE_pgleader");
        let mut cmd = match nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let mut child = cmd
            .args(["--log-format", "json", "--config"])
            .arg(file.path())
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .expect("start pgleader");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("pgleader: {line}");
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
                if let (Some(p), Some(a)) = (v["fields"]["proxy"].as_str(), v["fields"]["admin"].as_str()) {
                    let _ = tx.send((p.parse().unwrap(), a.parse().unwrap()));
                }
                sink.lock().unwrap().push(v);
            }
        });
        let (proxy, admin) = rx.recv_timeout(Duration::from_secs(30)).expect("pgleader logged its addresses");
        (Binary { child, proxy, admin, log }, file)
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Log lines whose message contains `text`.
    fn lines(&self, text: &str) -> Vec<serde_json::Value> {
        let log = self.log.lock().unwrap();
        log.iter().filter(|v| v["fields"]["message"].as_str().is_some_and(|m| m.contains(text))).cloned().collect()
    }
}

fn binary_config(node: &PgNode, extra_proxy: &str, extra: &str) -> String {
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"1s\"\n{extra_proxy}\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [health]\nuser = \"postgres\"\ninterval = \"200ms\"\n{extra}\n[[backend]]\nname = \"db\"\naddress = \"{}\"\n",
        node.addr()
    )
}

fn millis(d: &str) -> f64 {
    // tracing's Debug of a Duration: "10ms", "1.28s", "640ms".
    if let Some(ms) = d.strip_suffix("ms") {
        ms.parse().unwrap()
    } else {
        d.strip_suffix('s').unwrap().parse::<f64>().unwrap() * 1000.0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fd_exhaustion_is_logged_and_backed_off_and_the_binary_recovers() {
    const NOFILE: u32 = 64;
    let primary = PgNode::start_primary("emfile");
    // One worker: the backoff sequence asserted below is one accept loop's (each worker's loop
    // backs off on its own).
    let config = binary_config(&primary, "client_hello_timeout = \"60s\"\nworkers = 1", "");
    let (mut pgleader, _file) = Binary::start(&config, Some(NOFILE));
    eventually(Duration::from_secs(30), "ready", || async {
        (get(pgleader.admin, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    let healthy = connect_via(pgleader.proxy, "postgres").await.unwrap();

    // More silent clients than the process has descriptors: the surplus waits in the backlog.
    let mut silent = Vec::new();
    for _ in 0..2 * NOFILE {
        silent.push(TcpStream::connect(pgleader.proxy).await.unwrap());
    }
    let warnings = eventually(Duration::from_secs(20), "accept errors logged", || async {
        let w = pgleader.lines("accept failed");
        (w.len() >= 5).then_some(w)
    })
    .await;
    assert!(pgleader.alive(), "pgleader survives EMFILE");
    let first = &warnings[0]["fields"];
    assert!(first["error"].as_str().unwrap().contains("Too many open files"), "{first}");
    assert_eq!(warnings[0]["level"], "WARN");
    let delays: Vec<f64> = warnings.iter().map(|w| millis(w["fields"]["retry_in"].as_str().unwrap())).collect();
    assert!(delays.windows(2).all(|d| d[1] >= d[0]), "the backoff never shrinks while EMFILE lasts: {delays:?}");
    assert!(delays[4] >= 8.0 * delays[0], "the backoff grows: {delays:?}");
    assert!(delays.iter().all(|&d| d <= 1000.0), "the backoff is capped at 1 s: {delays:?}");
    // The established session is unaffected while accept fails.
    assert_eq!(healthy.query_one("SELECT 7", &[]).await.unwrap().get::<_, i32>(0), 7);

    // Once the silent clients go away, descriptors come back and pgleader serves again.
    drop(silent);
    let client = eventually(Duration::from_secs(30), "a new client after recovery", || async {
        connect_via(pgleader.proxy, "postgres").await.ok()
    })
    .await;
    assert_eq!(client.query_one("SELECT 8", &[]).await.unwrap().get::<_, i32>(0), 8);
    assert_eq!(get(pgleader.admin, "/healthz").await.0, 200);
    assert_eq!(healthy.query_one("SELECT 9", &[]).await.unwrap().get::<_, i32>(0), 9);
    assert!(pgleader.alive());
    assert!(pgleader.lines("panicked").is_empty());
}

/// A TCP connection to `to` from a chosen loopback source address.
async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = if to.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.unwrap();
    socket.bind(SocketAddr::new(source.parse().unwrap(), 0)).unwrap();
    socket.connect(to).await.unwrap()
}

/// tokio-postgres over a stream we connected ourselves (to pick the source address).
async fn pg_over(stream: TcpStream) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config.user("postgres").dbname("postgres");
    let (client, conn) = config.connect_raw(stream, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// Starts a raw session (trust auth) and returns its BackendKeyData (pid, secret).
async fn raw_session(s: &mut TcpStream) -> (u32, u32) {
    s.write_all(&wire::startup("postgres", "postgres")).await.unwrap();
    let mut key = None;
    loop {
        let (tag, body) = read_message(s).await;
        match tag {
            b'K' => {
                key = Some((
                    u32::from_be_bytes(body[..4].try_into().unwrap()),
                    u32::from_be_bytes(body[4..8].try_into().unwrap()),
                ))
            }
            b'Z' => return key.expect("BackendKeyData before ReadyForQuery"),
            b'E' => panic!(
                "startup failed: {:?}",
                wire::error_response(&[&[tag][..], &(body.len() as u32 + 4).to_be_bytes(), &body].concat())
            ),
            _ => {}
        }
    }
}

async fn read_message(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).await.unwrap();
    let len = u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
    let mut body = vec![0; len - 4];
    s.read_exact(&mut body).await.unwrap();
    (head[0], body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_outside_allow_get_28000_and_cannot_cancel() {
    common::watch_worker_panics();
    let primary = PgNode::start_primary("allow");
    // Dual-stack listener: an IPv4 client arrives as ::ffff:127.0.0.x and must still match.
    let mut config = ProxyBuilder::new(&[&primary]).proxy("allow", "[\"127.0.0.2/32\", \"::1/128\"]").config();
    config.proxy.listen = "[::]:0".parse().unwrap();
    common::proxy::init_test_tracing();
    let proxy = pgleader::start(config).await.unwrap();
    wait_leader(proxy.admin_addr, Some("allow")).await;
    let v4 = SocketAddr::from(([127, 0, 0, 1], proxy.proxy_addr.port()));
    let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, proxy.proxy_addr.port()));

    let allowed = pg_over(connect_from("127.0.0.2", v4).await).await.expect("127.0.0.2 is allowed");
    assert_eq!(allowed.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    pg_over(connect_from("::1", v6).await).await.expect("::1 is allowed");

    let refused = pg_over(connect_from("127.0.0.1", v4).await).await.expect_err("127.0.0.1 is not allowed");
    let db = refused.as_db_error().expect("an ErrorResponse, not a reset");
    assert_eq!(db.code().code(), "28000");
    assert!(db.message().contains("not allowed"), "{}", db.message());
    // libpq-style: SSLRequest answered N, then the refusal; garbage from outside is refused too.
    let ssl = wire::header(8, wire::SSL_REQUEST_CODE);
    let startup = wire::startup_message(wire::PROTOCOL_3_0, &[("user", "postgres")]);
    let mut s = connect_from("127.0.0.1", v4).await;
    s.write_all(&ssl).await.unwrap();
    let mut one = [0u8; 1];
    s.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"N");
    s.write_all(&startup).await.unwrap();
    assert_eq!(read_to_close(&mut s).await.code(), "28000");

    // A refused client must not be able to cancel an allowed client's query.
    let mut session = connect_from("127.0.0.2", v4).await;
    let (pid, secret) = raw_session(&mut session).await;
    let query = b"SELECT pg_sleep(2)\0";
    session.write_all(&[&[b'Q'][..], &(query.len() as u32 + 4).to_be_bytes(), query].concat()).await.unwrap();
    eventually(Duration::from_secs(10), "the query runs", || async {
        let active = primary
            .sql_ok_async(
                "postgres",
                &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid} AND state = 'active'"),
            )
            .await;
        (active == "1").then_some(())
    })
    .await;
    let cancel =
        [wire::header(16, wire::CANCEL_REQUEST_CODE), pid.to_be_bytes().to_vec(), secret.to_be_bytes().to_vec()]
            .concat();
    let mut outsider = connect_from("127.0.0.1", v4).await;
    outsider.write_all(&cancel).await.unwrap();
    assert_eq!(read_to_close(&mut outsider).await, Seen::Closed, "a refused cancel is dropped silently");
    let mut tags = Vec::new();
    loop {
        let (tag, body) = read_message(&mut session).await;
        tags.push(tag);
        if tag == b'E' {
            panic!("the query was cancelled by a client outside allow: {body:?}");
        }
        if tag == b'Z' {
            break;
        }
    }
    assert!(tags.contains(&b'C'), "the query completed: {tags:?}");

    assert_eq!(metric(proxy.admin_addr, "pgleader_sessions_total{result=\"refused_address\"}").await, Some(3.0));
    assert_eq!(allowed.query_one("SELECT 2", &[]).await.unwrap().get::<_, i32>(0), 2);
    assert_no_panics();
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_one_line_per_session_and_can_be_turned_off() {
    let primary = PgNode::start_primary("access");
    let (on, _f1) = Binary::start(&binary_config(&primary, "", ""), None);
    let (off, _f2) = Binary::start(&binary_config(&primary, "", "[log]\naccess = false"), None);
    for p in [&on, &off] {
        eventually(Duration::from_secs(30), "ready", || async {
            (get(p.admin, "/readyz").await.0 == 200).then_some(())
        })
        .await;
    }
    let access_lines = |b: &Binary| -> Vec<serde_json::Value> {
        b.log.lock().unwrap().iter().filter(|v| v["target"] == "pgleader::access").cloned().collect()
    };

    let mut stream = TcpStream::connect(on.proxy).await.unwrap();
    let local = stream.local_addr().unwrap();
    stream.shutdown().await.unwrap();
    drop(stream);
    let client = connect_via(on.proxy, "postgres").await.unwrap();
    client.query_one("SELECT repeat('x', 5000)", &[]).await.unwrap();
    drop(client);
    let mut bad = TcpStream::connect(on.proxy).await.unwrap();
    let bad_local = bad.local_addr().unwrap();
    bad.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    assert_eq!(read_to_close(&mut bad).await.code(), "08P01");

    let lines = eventually(Duration::from_secs(10), "two access lines", || async {
        let l = access_lines(&on);
        (l.len() >= 2).then_some(l)
    })
    .await;
    assert_eq!(lines.len(), 2, "a TCP probe is not a session: {lines:?}");
    assert!(lines.iter().all(|l| l["fields"]["client"] != local.to_string()));
    let ok = lines.iter().find(|l| l["fields"]["result"] == "ok").expect("the session's line");
    let f = &ok["fields"];
    assert_eq!(ok["level"], "INFO");
    assert_eq!(f["backend"], "db");
    assert!(f["client"].as_str().unwrap().starts_with("127.0.0.1:"), "{f}");
    assert!(f["bytes_up"].as_u64().unwrap() > 0, "{f}");
    assert!(f["bytes_down"].as_u64().unwrap() > 5000, "{f}");
    assert!(f["duration_ms"].as_u64().is_some(), "{f}");
    let refused = lines.iter().find(|l| l["fields"]["result"] == "refused_protocol").expect("the refusal's line");
    assert_eq!(refused["fields"]["client"], bad_local.to_string());
    assert_eq!(refused["fields"]["backend"], "-");

    let client = connect_via(off.proxy, "postgres").await.unwrap();
    client.query_one("SELECT 1", &[]).await.unwrap();
    drop(client);
    metric_at_least(off.admin, "pgleader_sessions_total{result=\"ok\"}", 1.0).await;
    assert!(access_lines(&off).is_empty(), "[log] access = false writes no access lines");
}

/// After a plaintext `N` to its SSLRequest the client's next packet is plaintext, so a garbage
/// StartupMessage there can be answered like a garbage first packet (08P01 / 0A000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_after_an_ssl_request_answered_n_gets_an_error_too() {
    common::watch_worker_panics();
    let primary = PgNode::start_primary("ssl-garbage");
    let proxy = ProxyBuilder::new(&[&primary]).proxy("client_hello_timeout", "1s").start().await;
    wait_leader(proxy.admin_addr, Some("ssl-garbage")).await;
    let healthy = connect_via(proxy.proxy_addr, "postgres").await.unwrap();
    let ssl = wire::header(8, wire::SSL_REQUEST_CODE);
    let mut v4 = wire::startup_message(wire::PROTOCOL_3_0, &[("user", "postgres")]);
    v4[4..8].copy_from_slice(&(4u32 << 16).to_be_bytes());
    let http: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
    let mut wrong = Vec::new();
    for (name, second, want) in [("HTTP", http, "08P01"), ("protocol 4.0", &v4[..], "0A000")] {
        let seen = exchange(proxy.proxy_addr, &[&ssl, second], false).await;
        eprintln!("SSLRequest, N, then {name} -> {seen:?}");
        if !matches!(&seen, Seen::Error { answers, code, .. } if answers == "N" && code == want) {
            wrong.push(format!("{name}: wanted N then {want}, saw {seen:?}"));
        }
    }
    assert_eq!(healthy.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    assert_no_panics();
    proxy.shutdown().await.unwrap();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// A client outside `allow` is refused whatever it sends, so while it sits silent it must not
/// hold one of the `max_connections` slots that allowed clients need.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_outside_allow_do_not_take_the_slots_of_allowed_ones() {
    common::watch_worker_panics();
    let primary = PgNode::start_primary("allow-slots");
    let proxy = ProxyBuilder::new(&[&primary])
        .proxy("allow", "[\"127.0.0.2/32\"]")
        .proxy("max_connections", "10")
        .proxy("client_hello_timeout", "10s")
        .start()
        .await;
    wait_leader(proxy.admin_addr, Some("allow-slots")).await;
    let mut outsiders = Vec::new();
    for _ in 0..20 {
        outsiders.push(connect_from("127.0.0.1", proxy.proxy_addr).await);
    }
    // Every outsider admitted (as a refusal waiting for its first packet) before the allowed one.
    wait_connections(proxy.admin_addr, 20).await;
    let allowed = pg_over(connect_from("127.0.0.2", proxy.proxy_addr).await).await;
    let allowed = allowed.expect("an allowed client gets in while 20 refused ones sit silent");
    assert_eq!(allowed.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    drop(outsiders);
    assert_no_panics();
    proxy.shutdown().await.unwrap();
}

/// Refusals are bounded too: past 256 over-limit connections waiting for their first packet, more
/// are closed at once (counted as refused), so a flood cannot grow pgleader's tasks and sockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_limit_connections_past_the_refusal_bound_are_closed_at_once() {
    const IN_FLIGHT: usize = 256;
    common::watch_worker_panics();
    raise_nofile(4096);
    let primary = PgNode::start_primary("bound");
    let proxy =
        ProxyBuilder::new(&[&primary]).proxy("max_connections", "2").proxy("client_hello_timeout", "60s").start().await;
    wait_leader(proxy.admin_addr, Some("bound")).await;
    let held = [
        connect_via(proxy.proxy_addr, "postgres").await.unwrap(),
        connect_via(proxy.proxy_addr, "postgres").await.unwrap(),
    ];
    let mut waiting = Vec::new();
    for _ in 0..IN_FLIGHT + 40 {
        waiting.push(TcpStream::connect(proxy.proxy_addr).await.unwrap());
    }
    // 256 wait for a first packet (for up to 60 s); the other 40 are closed at once. Which ones
    // is the workers' accept order, not the order of the connects.
    let series = "pgleader_sessions_total{result=\"refused_limit\"}";
    metric_at_least(proxy.admin_addr, series, 40.0).await;
    assert_eq!(metric(proxy.admin_addr, series).await, Some(40.0));
    let closed = eventually(Duration::from_secs(10), "40 connections closed", || async {
        let closed = waiting.iter().filter(|s| closed_now(s)).count();
        (closed >= 40).then_some(closed)
    })
    .await;
    assert_eq!(closed, 40, "closed at once: exactly the refusals past the bound");
    let mut one_more = TcpStream::connect(proxy.proxy_addr).await.unwrap();
    assert_eq!(read_to_close(&mut one_more).await, Seen::Closed);
    // Counted a moment after the client saw the close: wait for it, then check it is exact.
    metric_at_least(proxy.admin_addr, series, 41.0).await;
    assert_eq!(metric(proxy.admin_addr, series).await, Some(41.0));
    for c in &held {
        assert_eq!(c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    }
    // The waiting ones still get their answer when they speak.
    let first = waiting.iter_mut().find(|s| !closed_now(s)).expect("256 still open");
    first.write_all(&wire::startup_message(wire::PROTOCOL_3_0, &[("user", "postgres")])).await.unwrap();
    assert_eq!(read_to_close(first).await.code(), "53300");
    drop(waiting);
    assert_no_panics();
    proxy.shutdown().await.unwrap();
}
