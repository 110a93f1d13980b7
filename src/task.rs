//! Supervision of long-lived background tasks that must not silently stop.
//!
//! [`restart_on_failure`] runs a task and, if it ends while it was not asked to stop (a panic, or
//! a return), logs the panic message at ERROR, counts it in `pgleader_task_restarts_total{task}`,
//! waits a backoff (raced with the stop token), and starts it again. Health checkers run under
//! it: a checker that dies would otherwise leave its backend stale for good. Tasks whose end is
//! fatal (the accept loop, the elector, the admin server) are joined by `app` instead, which
//! drains and exits non-zero so the orchestrator restarts the process.

use std::any::Any;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// The first pause before a restart; doubled per consecutive failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest pause between restarts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A run this long resets the backoff: the task was healthy in between.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

/// The text of a panic payload (`panic!` with a literal or a formatted message).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

/// Runs `make()` in its own task until `stop` is cancelled, restarting it whenever it ends on
/// its own. `task` is the metric label (one of `metrics::RESTARTED_TASKS`), `what` names the
/// instance in logs (a backend name). `on_restart` is told why, before the pause.
///
/// Returns when `stop` is cancelled (the running instance is aborted).
pub async fn restart_on_failure<F, Fut>(
    task: &'static str,
    what: String,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    mut make: F,
    mut on_restart: impl FnMut(&str),
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = FIRST_BACKOFF;
    loop {
        let started = tokio::time::Instant::now();
        let mut handle = tokio::spawn(make());
        let ended = tokio::select! {
            () = stop.cancelled() => {
                handle.abort();
                return;
            }
            r = &mut handle => r,
        };
        if stop.is_cancelled() {
            return;
        }
        let why = match ended {
            Ok(()) => "it returned".to_owned(),
            Err(e) if e.is_panic() => format!("it panicked: {}", panic_message(e.into_panic().as_ref())),
            Err(e) => format!("it was cancelled: {e}"),
        };
        if started.elapsed() >= HEALTHY_RUN {
            backoff = FIRST_BACKOFF;
        }
        tracing::error!(task, instance = %what, why, retry_in = ?backoff, "background task stopped unexpectedly; restarting it");
        metrics.task_restarts.with_label_values(&[task]).inc();
        on_restart(&why);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Sleeps until `at`, or forever without one (a deadline that may not exist, in a `select!`).
pub async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_restarted_counted_and_stops_with_the_token() {
        let metrics = Arc::new(Metrics::new(&[]));
        let stop = CancellationToken::new();
        let runs = Arc::new(AtomicU32::new(0));
        let reasons = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (r, m, s, why) = (Arc::clone(&runs), Arc::clone(&metrics), stop.clone(), Arc::clone(&reasons));
        let supervisor = tokio::spawn(async move {
            restart_on_failure(
                "health_checker",
                "a".to_owned(),
                m,
                s,
                move || {
                    let n = r.fetch_add(1, Ordering::SeqCst);
                    async move {
                        if n < 2 {
                            panic!("checker bug {n}");
                        }
                        std::future::pending::<()>().await;
                    }
                },
                move |w| why.lock().unwrap().push(w.to_owned()),
            )
            .await;
        });
        while runs.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(metrics.task_restarts.with_label_values(&["health_checker"]).get(), 2);
        assert_eq!(
            *reasons.lock().unwrap(),
            vec!["it panicked: checker bug 0".to_owned(), "it panicked: checker bug 1".to_owned()]
        );
        stop.cancel();
        supervisor.await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3, "no restart after the stop");
    }

    #[test]
    fn panic_messages_are_read_from_both_payload_kinds() {
        assert_eq!(panic_message(&"literal"), "literal");
        assert_eq!(panic_message(&String::from("formatted 1")), "formatted 1");
        assert_eq!(panic_message(&7u8), "a panic without a message");
    }
}
