//! Spreads client connections evenly over the worker threads.
//!
//! Each worker accepts on its own `SO_REUSEPORT` listener, and the kernel picks the listener by a
//! hash of the client's address and port, so 32 clients can land 19 on one worker and 13 on the
//! other; the two threads get equal CPU, so each client of the fuller one gets less of it. A worker
//! that accepts a client while it runs more connections than another worker hands the socket,
//! before reading a byte of it, to the worker running the fewest, which runs the session as if it
//! had accepted it. The counts are the `pgleader_worker_connections` gauges.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::IntGauge;
use tokio::sync::mpsc;

use super::Admission;
use crate::metrics::Metrics;
use crate::topology::Route;

/// A connection on its way to another worker: accepted, admitted, not yet read from.
pub(crate) struct Handoff {
    pub socket: std::net::TcpStream,
    pub peer: SocketAddr,
    pub route: Route,
    pub admission: Admission,
    pub held: Held,
    /// The accepting loop's connection number, for the span.
    pub id: u64,
}

/// Counts one connection on one worker until dropped.
pub(crate) struct Held(IntGauge);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One worker's view of every worker's count and inbox.
pub(crate) struct Balance {
    me: usize,
    counts: Arc<[IntGauge]>,
    inboxes: Arc<[mpsc::UnboundedSender<Handoff>]>,
}

impl Balance {
    /// One per worker, each with the receiving end of its own inbox.
    pub fn for_workers(metrics: &Metrics, workers: usize) -> Vec<(Balance, mpsc::UnboundedReceiver<Handoff>)> {
        let counts: Arc<[IntGauge]> =
            (0..workers).map(|i| metrics.worker_connections.with_label_values(&[&i.to_string()])).collect();
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..workers).map(|_| mpsc::unbounded_channel()).unzip();
        let inboxes: Arc<[_]> = senders.into();
        receivers
            .into_iter()
            .enumerate()
            .map(|(me, rx)| (Balance { me, counts: Arc::clone(&counts), inboxes: Arc::clone(&inboxes) }, rx))
            .collect()
    }

    /// The worker a connection accepted here now should run on, if not this one: the one running
    /// the fewest, when that is fewer than this worker runs. Ties stay.
    pub fn elsewhere(&self) -> Option<usize> {
        let mine = self.counts[self.me].get();
        let (least, count) = self.counts.iter().map(IntGauge::get).enumerate().min_by_key(|&(_, c)| c)?;
        (count < mine).then_some(least)
    }

    /// Counts a connection on `worker` (this one for [`Balance::here`]).
    pub fn hold(&self, worker: usize) -> Held {
        let gauge = self.counts[worker].clone();
        gauge.inc();
        Held(gauge)
    }

    pub fn here(&self) -> Held {
        self.hold(self.me)
    }

    /// Sends `handoff` to `worker`'s inbox; a worker no longer taking them (its accept loops
    /// ended) gives it back.
    pub fn send(&self, worker: usize, handoff: Handoff) -> Result<(), Handoff> {
        self.inboxes[worker].send(handoff).map_err(|e| e.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_goes_to_the_worker_running_the_fewest_and_ties_stay() {
        let metrics = Metrics::new(&[]);
        let mut workers = Balance::for_workers(&metrics, 3);
        let (b0, _rx0) = workers.remove(0);
        assert_eq!(b0.elsewhere(), None, "all at zero: stay");
        let a = b0.here();
        assert_eq!(b0.elsewhere(), Some(1), "one here, none on 1 and 2: the first of the least");
        let b = b0.hold(1);
        let c = b0.hold(2);
        assert_eq!(b0.elsewhere(), None, "one each: stay");
        let d = b0.hold(2);
        assert_eq!(b0.elsewhere(), None, "1, 1, 2: worker 0 is among the least");
        drop((a, b));
        assert_eq!(b0.elsewhere(), None, "0, 0, 2: stay, a tie with worker 1");
        drop((c, d));
        let gauge = |i: &str| metrics.worker_connections.with_label_values(&[i]).get();
        assert_eq!((gauge("0"), gauge("1"), gauge("2")), (0, 0, 0), "every hold ended");
    }

    #[test]
    fn a_closed_inbox_gives_the_connection_back() {
        let metrics = Metrics::new(&[]);
        let mut workers = Balance::for_workers(&metrics, 2);
        let (b1, rx1) = workers.remove(1);
        let (b0, _rx0) = workers.remove(0);
        drop(rx1);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let socket = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let peer = socket.local_addr().unwrap();
        let permit = Arc::new(tokio::sync::Semaphore::new(1)).try_acquire_owned().unwrap();
        let handoff = Handoff {
            socket,
            peer,
            route: Route::Write,
            admission: Admission::Client(permit),
            held: b0.hold(1),
            id: 1,
        };
        let back = b0.send(1, handoff).expect_err("worker 1 takes no more");
        assert_eq!(back.peer, peer);
        drop(back);
        assert_eq!(metrics.worker_connections.with_label_values(&["1"]).get(), 0);
        drop(b1);
    }
}
