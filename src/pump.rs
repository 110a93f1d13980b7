//! The byte pump: the hot path of every session, after the startup phase.
//!
//! It holds no buffer while idle: it waits for readiness, then moves bytes through the worker
//! thread's scratch buffer in a synchronous step (so the buffer is not part of the session's
//! future); only bytes the destination cannot take yet are copied to the heap, and that copy is
//! freed once written. No locks, no logging, no allocation per message; the byte counters are
//! atomics.
//!
//! Per message, in each direction, it costs one `recv` and one `send`: a short read proves the
//! socket drained (epoll is edge-triggered), so the read readiness is cleared without the extra
//! `recv` that would only return `EAGAIN` — what tokio's own `poll_read` does. The scratch buffer
//! is allocated and zeroed once per worker thread, not per step. Profiles and the measurements
//! behind these choices are in docs/performance.md.

use std::cell::RefCell;
use std::io::{self, Read};

use prometheus::IntCounter;
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes moved per synchronous pump step.
const PUMP_CHUNK: usize = 64 * 1024;

thread_local! {
    /// The scratch buffer of one runtime worker thread; borrowed only inside `step`, which never
    /// awaits, so one per thread is enough and no session holds it while idle.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; PUMP_CHUNK].into_boxed_slice());
}

/// Which side of the splice failed.
#[derive(Debug)]
pub enum Side {
    Client(io::Error),
    Backend(io::Error),
}

/// Moves bytes both ways until both directions reach EOF, or one fails.
///
/// `up` and `down` count the bytes moved client to backend and back. Cancel safe: dropping the
/// future loses at most bytes read but not yet written, which only matters when the session is
/// being closed anyway.
///
/// # Errors
/// The first I/O error, with the side it happened on.
pub async fn pump_both(
    client: &TcpStream,
    backend: &TcpStream,
    up: &IntCounter,
    down: &IntCounter,
) -> Result<(), Side> {
    let up = pump(client, backend, up, Side::Client, Side::Backend);
    let down = pump(backend, client, down, Side::Backend, Side::Client);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            r = &mut up, if !up_done => { r?; up_done = true; }
            r = &mut down, if !down_done => { r?; down_done = true; }
        }
    }
    Ok(())
}

/// Bytes read but not yet written: only while the destination is backed up.
#[derive(Default)]
struct Backlog {
    bytes: Vec<u8>,
    /// How much of `bytes` is already written.
    sent: usize,
}

/// One direction. Holds no buffer while idle: see the module docs.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    counter: &IntCounter,
    src_err: fn(io::Error) -> Side,
    dst_err: fn(io::Error) -> Side,
) -> Result<(), Side> {
    let mut backlog = Backlog::default();
    loop {
        if !backlog.bytes.is_empty() {
            dst.writable().await.map_err(dst_err)?;
            match write_some(dst, &backlog.bytes[backlog.sent..]) {
                Ok(n) => {
                    backlog.sent += n;
                    if backlog.sent == backlog.bytes.len() {
                        backlog = Backlog::default();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(dst_err(e)),
            }
            continue;
        }
        src.readable().await.map_err(src_err)?;
        match step(src, dst, &mut backlog.bytes, counter) {
            Ok(Step::Moved) => {}
            Ok(Step::Eof) => {
                let _ = SockRef::from(dst).shutdown(std::net::Shutdown::Write);
                return Ok(());
            }
            Err(StepError::Read(e)) => return Err(src_err(e)),
            Err(StepError::Write(e)) => return Err(dst_err(e)),
        }
    }
}

enum Step {
    Moved,
    Eof,
}

enum StepError {
    Read(io::Error),
    Write(io::Error),
}

/// One read from `src` and as much of it written to `dst` as it takes now; the rest goes to
/// `backlog`. Synchronous, so the scratch buffer is never held across an await.
fn step(src: &TcpStream, dst: &TcpStream, backlog: &mut Vec<u8>, counter: &IntCounter) -> Result<Step, StepError> {
    SCRATCH.with(|scratch| {
        let mut buf = scratch.borrow_mut();
        let n = match read_some(src, &mut buf) {
            Ok(0) => return Ok(Step::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Moved),
            Err(e) => return Err(StepError::Read(e)),
        };
        counter.inc_by(n as u64);
        let mut sent = 0;
        while sent < n {
            match write_some(dst, &buf[sent..n]) {
                Ok(k) => sent += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    backlog.extend_from_slice(&buf[sent..n]);
                    break;
                }
                Err(e) => return Err(StepError::Write(e)),
            }
        }
        Ok(Step::Moved)
    })
}

/// One `recv`. A short read means the socket is drained (edge-triggered epoll), so the read
/// readiness is cleared now instead of by a further `recv` returning `EAGAIN`: tokio's
/// `PollEvented::poll_read` relies on the same fact. A FIN or an event that arrives after the
/// `recv` sets the readiness again (tokio clears only the readiness it had observed, and keeps
/// the closed state).
fn read_some(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = None;
    let r = src.try_io(Interest::READABLE, || {
        let n = (&*SockRef::from(src)).read(buf)?;
        got = Some(n);
        if 0 < n && n < buf.len() {
            // Not an error: tells try_io to clear the read readiness (see above).
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (r, got) {
        (Err(e), Some(n)) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
        (r, _) => r,
    }
}

/// One `send`. A short write means the send buffer is full, so the write readiness is cleared at
/// once, as tokio's `poll_write` does.
fn write_some(dst: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    let mut put = None;
    let r = dst.try_io(Interest::WRITABLE, || {
        let n = io::Write::write(&mut &*SockRef::from(dst), buf)?;
        put = Some(n);
        if 0 < n && n < buf.len() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (r, put) {
        (Err(e), Some(n)) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
        (r, _) => r,
    }
}
