//! The watch loop of the etcd task: one watch of the leader key at a time, from the revision
//! after the latest successful read, each event reported at once and a read asked for; an end
//! of any kind reported as [`WatchEvent::Ended`] (see the parent module's doc for the rules).

use std::sync::Arc;

use tokio::sync::{mpsc, watch, Notify};
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

use super::decode::{self, decode_watch_line, WatchMessage};
use super::gateway::Lines;
use super::{send, Client, EtcdReport, ReadMark, WatchEvent};

/// The watch loop's state.
pub(super) struct WatchLoop {
    pub(super) client: Arc<Client>,
    pub(super) reports: mpsc::Sender<EtcdReport>,
    /// Pokes the read loop.
    pub(super) trigger: Arc<Notify>,
    pub(super) marks: watch::Receiver<Option<ReadMark>>,
    pub(super) stop: CancellationToken,
}

/// How one watch ended: whether etcd had created it, and why it is over.
struct Over {
    created: bool,
    reason: String,
}

impl WatchLoop {
    pub(super) async fn run(mut self) {
        let mut used_seq = 0;
        // Watches in a row that ended without ever being created.
        let mut stillborn: u32 = 0;
        loop {
            let mark = tokio::select! {
                () = self.stop.cancelled() => return,
                m = self.marks.wait_for(|m| m.is_some_and(|m| m.seq > used_seq)) => match m {
                    Ok(m) => *m,
                    Err(_) => return,
                },
            };
            let Some(mark) = mark else { continue };
            used_seq = mark.seq;
            let Some(over) = self.watch(mark).await else { return };
            tracing::debug!(reason = %over.reason, "etcd watch ended");
            if !send(&self.reports, &self.stop, EtcdReport::Watch(WatchEvent::Ended { reason: over.reason })).await {
                return;
            }
            stillborn = if over.created { 0 } else { stillborn.saturating_add(1) };
            if stillborn <= 1 {
                self.trigger.notify_one();
            }
        }
    }

    /// One watch from `mark.revision + 1`, on the endpoint of that read first; `None` when the
    /// task is stopping.
    async fn watch(&mut self, mark: ReadMark) -> Option<Over> {
        let client = Arc::clone(&self.client);
        let n = client.endpoints.len();
        let deadline = Instant::now() + client.timeout;
        let mut failures = Vec::new();
        let mut opened = None;
        for k in 0..n {
            let i = (mark.endpoint + k) % n;
            let url = &client.endpoints[i].url;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let share = left / u32::try_from(n - k).unwrap_or(u32::MAX);
            let attempt = tokio::select! {
                () = self.stop.cancelled() => return None,
                r = timeout(share, self.open(i, mark.revision.saturating_add(1))) => r,
            };
            match attempt {
                Ok(Ok(lines)) => {
                    opened = Some((url, lines));
                    break;
                }
                Ok(Err(e)) => failures.push(format!("{url}: {e}")),
                Err(_) => failures.push(format!("{url}: no answer within its {share:?} share of the budget")),
            }
        }
        let Some((url, mut lines)) = opened else {
            let reason =
                format!("cannot open a watch of {} on any endpoint: {}", client.keys.leader, failures.join("; "));
            return Some(Over { created: false, reason });
        };
        let mut created = false;
        loop {
            let line = tokio::select! {
                () = self.stop.cancelled() => return None,
                l = lines.next() => l,
            };
            let message = match line {
                Ok(Some(line)) => decode_watch_line(&client.keys.leader, &line),
                Ok(None) => return Some(Over { created, reason: format!("{url} closed the watch stream") }),
                Err(e) => return Some(Over { created, reason: format!("{url}: {e}") }),
            };
            match message {
                Ok(WatchMessage::Created) => created = true,
                Ok(WatchMessage::Other) => {}
                Ok(WatchMessage::Events(events)) => {
                    for event in events {
                        if !send(&self.reports, &self.stop, EtcdReport::Watch(event)).await {
                            return None;
                        }
                    }
                    self.trigger.notify_one();
                }
                Ok(WatchMessage::Canceled(reason)) => {
                    return Some(Over { created, reason: format!("{url}: {reason}") })
                }
                Err(e) => return Some(Over { created, reason: format!("{url} ended the watch: {e}") }),
            }
        }
    }

    /// Connects to endpoint `i` and opens the watch stream.
    async fn open(&self, i: usize, start_revision: i64) -> Result<Lines, String> {
        let client = &self.client;
        let ep = &client.endpoints[i];
        let conn = client.transport.connect(ep).await?;
        // The reader authenticated before the read this watch starts after.
        let token = client.current_token();
        let body = decode::watch_body(&client.keys.leader, start_revision);
        conn.stream(ep, "/v3/watch", body, token.as_deref()).await.map_err(|e| e.text())
    }
}
