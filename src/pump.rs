//! The byte pump: the hot path of every session, after the startup phase.
//!
//! It holds no buffer while idle: it waits for readiness, then moves bytes through a stack buffer
//! in a synchronous step (so the buffer is not part of the session's future); only bytes the
//! destination cannot take yet are copied to the heap, and that copy is freed once written.
//! No locks, no logging, no allocation per message; the byte counters are atomics.

use std::io;

use prometheus::IntCounter;
use socket2::SockRef;
use tokio::net::TcpStream;

/// Bytes moved per synchronous pump step (a stack buffer, never held while idle).
const PUMP_CHUNK: usize = 64 * 1024;

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

/// One direction. Holds no buffer while idle: see the module docs.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    counter: &IntCounter,
    src_err: fn(io::Error) -> Side,
    dst_err: fn(io::Error) -> Side,
) -> Result<(), Side> {
    let mut backlog: Vec<u8> = Vec::new();
    loop {
        if !backlog.is_empty() {
            dst.writable().await.map_err(dst_err)?;
            match dst.try_write(&backlog) {
                Ok(n) => {
                    backlog.drain(..n);
                    if backlog.is_empty() {
                        backlog = Vec::new();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(dst_err(e)),
            }
            continue;
        }
        src.readable().await.map_err(src_err)?;
        match step(src, dst, &mut backlog, counter) {
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

/// Synchronous, so its buffer lives on the thread's stack, not in the session's future.
fn step(src: &TcpStream, dst: &TcpStream, backlog: &mut Vec<u8>, counter: &IntCounter) -> Result<Step, StepError> {
    let mut buf = [0u8; PUMP_CHUNK];
    let n = match src.try_read(&mut buf) {
        Ok(0) => return Ok(Step::Eof),
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Moved),
        Err(e) => return Err(StepError::Read(e)),
    };
    counter.inc_by(n as u64);
    let mut sent = 0;
    while sent < n {
        match dst.try_write(&buf[sent..n]) {
            Ok(k) => sent += k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                backlog.extend_from_slice(&buf[sent..n]);
                break;
            }
            Err(e) => return Err(StepError::Write(e)),
        }
    }
    Ok(Step::Moved)
}
