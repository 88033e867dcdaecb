//! The bounded drain: once the dispatcher's shutdown token is cancelled (by a signal in
//! `outboxd run`), in-flight deliveries may finish within a bound; the rest are told to
//! release their rows.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every in-flight delivery finished in time.
    Completed,
    /// The bound ran out; unfinished deliveries were told to release their rows.
    TimedOut {
        /// Deliveries still running when the bound ran out.
        unfinished: usize,
    },
}

/// Waits up to `timeout` for the tasks in `tracker`; when it runs out, cancels `abort`,
/// which makes each remaining send task give up its request and release its row (due
/// again at once, the attempt not counted) so another worker can take it immediately.
pub async fn drain(tracker: &TaskTracker, timeout: Duration, abort: &CancellationToken) -> Drained {
    tracker.close();
    let inflight = tracker.len();
    if inflight > 0 {
        tracing::info!(
            inflight,
            timeout_ms = timeout.as_millis() as u64,
            "waiting for in-flight deliveries"
        );
    }
    if tokio::time::timeout(timeout, tracker.wait()).await.is_ok() {
        return Drained::Completed;
    }
    let unfinished = tracker.len();
    tracing::warn!(
        unfinished,
        "drain timeout reached: releasing unfinished deliveries"
    );
    abort.cancel();
    tracker.wait().await;
    Drained::TimedOut { unfinished }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_quick_tasks() {
        let tracker = TaskTracker::new();
        let abort = CancellationToken::new();
        tracker.spawn(tokio::time::sleep(Duration::from_millis(20)));
        let drained = drain(&tracker, Duration::from_secs(10), &abort).await;
        assert_eq!(drained, Drained::Completed);
        assert!(!abort.is_cancelled());
    }

    #[tokio::test]
    async fn drain_aborts_what_outlives_the_bound() {
        let tracker = TaskTracker::new();
        let abort = CancellationToken::new();
        let token = abort.clone();
        tracker.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
                _ = token.cancelled() => {}
            }
        });
        let drained = drain(&tracker, Duration::from_millis(20), &abort).await;
        assert_eq!(drained, Drained::TimedOut { unfinished: 1 });
        assert!(abort.is_cancelled());
    }
}
