//! The byte pump: the hot path of every session, after the startup phase.
//!
//! It holds no buffer while idle: it waits for readiness, then moves bytes through the worker
//! thread's scratch buffer in a synchronous step (so the buffer is not part of the session's
//! future); only bytes the destination cannot take yet are copied to the heap, and that copy is
//! freed once written. No locks, no logging, no allocation per message; the byte counters are
//! atomics, the global ones sharded by thread so the runtime threads do not contend for them.
//!
//! Per message, in each direction, it costs one `recv` and one `send`: a short read proves the
//! socket drained (epoll is edge-triggered), so the read readiness is cleared without the extra
//! `recv` that would only return `EAGAIN` — what tokio's own `poll_read` does. The scratch buffer
//! is allocated and zeroed once per worker thread, not per step. Both directions are one poll
//! function waiting through the sockets' `poll_*_ready` waker slots, so an idle session's pump is
//! about 200 bytes of its task. Profiles and the measurements behind these choices are in
//! docs/performance.md.

use std::cell::RefCell;
use std::io::{self, Read};
use std::task::{ready, Context, Poll};

use std::sync::atomic::{AtomicU64, Ordering};

use crate::metrics::ShardedCounter;
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
/// `up` and `down` count the bytes moved client to backend and back, in the global metric and
/// the session's own total (read by the access log, also after the pump is dropped). Cancel safe: dropping the
/// future loses at most bytes read but not yet written, which only matters when the session is
/// being closed anyway.
///
/// # Errors
/// The first I/O error, with the side it happened on.
pub async fn pump_both(client: &TcpStream, backend: &TcpStream, up: Tally<'_>, down: Tally<'_>) -> Result<(), Side> {
    // One poll function for both directions, waiting through `poll_{read,write}_ready` (the
    // socket's own waker slots) rather than `readable()` futures: the whole pump is two small
    // structs in the session's task, not four readiness futures with their waiter nodes.
    let mut to_backend = Direction::new(client, backend, up, Side::Client, Side::Backend);
    let mut to_client = Direction::new(backend, client, down, Side::Backend, Side::Client);
    std::future::poll_fn(|cx| {
        let a = to_backend.poll(cx)?;
        let b = to_client.poll(cx)?;
        if a.is_ready() && b.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// Where one direction's byte counts go.
#[derive(Clone, Copy)]
pub struct Tally<'a> {
    /// The process-wide metric (`pgleader_session_bytes_total{direction}`).
    pub global: &'a ShardedCounter,
    /// This session's total.
    pub session: &'a AtomicU64,
}

impl Tally<'_> {
    fn add(self, n: u64) {
        self.global.inc_by(n);
        self.session.fetch_add(n, Ordering::Relaxed);
    }
}

/// Steps one direction takes per poll before it yields to other tasks (tokio's cooperative
/// budget usually yields first).
const STEPS_PER_POLL: usize = 32;

/// One direction of the pump. Holds no buffer while idle: see the module docs.
struct Direction<'a> {
    src: &'a TcpStream,
    dst: &'a TcpStream,
    counter: Tally<'a>,
    src_err: fn(io::Error) -> Side,
    dst_err: fn(io::Error) -> Side,
    /// Bytes read but not yet written: only while the destination is backed up.
    backlog: Vec<u8>,
    /// How much of `backlog` is already written.
    sent: usize,
    /// EOF seen and forwarded.
    done: bool,
}

impl<'a> Direction<'a> {
    fn new(
        src: &'a TcpStream,
        dst: &'a TcpStream,
        counter: Tally<'a>,
        src_err: fn(io::Error) -> Side,
        dst_err: fn(io::Error) -> Side,
    ) -> Self {
        Direction { src, dst, counter, src_err, dst_err, backlog: Vec::new(), sent: 0, done: false }
    }

    /// Ready(Ok) once EOF was forwarded; Pending while waiting for a socket.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Side>> {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        for _ in 0..STEPS_PER_POLL {
            if !self.backlog.is_empty() {
                ready!(self.dst.poll_write_ready(cx)).map_err(self.dst_err)?;
                match write_some(self.dst, &self.backlog[self.sent..]) {
                    Ok(n) => {
                        self.sent += n;
                        if self.sent == self.backlog.len() {
                            self.backlog = Vec::new();
                            self.sent = 0;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err((self.dst_err)(e))),
                }
                continue;
            }
            ready!(self.src.poll_read_ready(cx)).map_err(self.src_err)?;
            match step(self.src, self.dst, &mut self.backlog, self.counter) {
                Ok(Step::Moved) => {}
                Ok(Step::Eof) => {
                    let _ = SockRef::from(self.dst).shutdown(std::net::Shutdown::Write);
                    self.done = true;
                    return Poll::Ready(Ok(()));
                }
                Err(StepError::Read(e)) => return Poll::Ready(Err((self.src_err)(e))),
                Err(StepError::Write(e)) => return Poll::Ready(Err((self.dst_err)(e))),
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
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
fn step(src: &TcpStream, dst: &TcpStream, backlog: &mut Vec<u8>, counter: Tally<'_>) -> Result<Step, StepError> {
    SCRATCH.with(|scratch| {
        let mut buf = scratch.borrow_mut();
        let n = match read_some(src, &mut buf) {
            Ok(0) => return Ok(Step::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Moved),
            Err(e) => return Err(StepError::Read(e)),
        };
        counter.add(n as u64);
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
