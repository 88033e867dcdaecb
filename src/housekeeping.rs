//! Periodic work beside the claim loop: sampling the queue for metrics, disabling
//! endpoints that fail for too long, numbering ordered events that missed their number,
//! and pruning finished history. Every dispatcher
//! runs it; each step is safe to run concurrently with itself.

use std::sync::Arc;
use std::time::Duration;

use std::future::Future;
use std::pin::Pin;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::db::{Connector, Pool};
use crate::error::Result;
use crate::metrics::{self, Metrics};
use crate::ordering;
use crate::retention::{self, RetentionPolicy};
use crate::{health, retention::Pruned};

/// How often endpoint health is checked.
pub const HEALTH_EVERY: Duration = Duration::from_secs(60);
/// How often history is pruned, and the most time one pass may take.
pub const PRUNE_EVERY: Duration = Duration::from_secs(30);
const PRUNE_BUDGET: Duration = Duration::from_secs(5);

/// What housekeeping needs to know.
#[derive(Debug, Clone, Copy)]
pub struct Housekeeping {
    /// Retention of finished rows.
    pub retention: RetentionPolicy,
    /// Disable an endpoint whose attempts keep failing for this long.
    pub disable_failing_after: Duration,
}

/// Runs until `stop`. Errors are logged and retried at the next period. Each step runs
/// on a connection of `pool` (opened by `connector`) and ends on `stop`: a statement
/// still running then (one may wait on a lock without bound, say behind an operator's
/// `LOCK TABLE`) is cancelled in the server, so that no session of a stopped dispatcher
/// is left waiting there, to take effect later.
pub async fn run(
    pool: Pool,
    connector: Connector,
    metrics: Arc<Metrics>,
    settings: Housekeeping,
    stop: CancellationToken,
) {
    let mut sample = tokio::time::interval(metrics::SAMPLE_EVERY);
    let mut health = tokio::time::interval(HEALTH_EVERY);
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    for timer in [&mut sample, &mut health, &mut prune] {
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    let steps = Steps {
        pool,
        connector,
        stop,
    };
    loop {
        // In this order when several are due, as all are at the start: the queue's
        // gauges are then there for the first scrapes.
        tokio::select! {
            biased;
            _ = steps.stop.cancelled() => return,
            _ = sample.tick() => {
                match steps.run(|c| Box::pin(async move { metrics::sample_queue(&*c).await })).await {
                    Some(Ok(queue)) => metrics.set_queue(queue),
                    Some(Err(e)) => tracing::warn!(error = %e, "sampling the queue failed"),
                    None => return,
                }
                match steps.run(|c| Box::pin(async move { health::resume_stranded(&*c).await })).await {
                    Some(Ok(0)) => {}
                    Some(Ok(n)) => tracing::info!(resumed = n, "resumed deliveries parked under an active endpoint"),
                    Some(Err(e)) => tracing::warn!(error = %e, "resuming stranded deliveries failed"),
                    None => return,
                }
            }
            _ = health.tick() => {
                let after = settings.disable_failing_after;
                match steps.run(|c| Box::pin(async move { health::disable_failing(&*c, after).await })).await {
                    Some(Ok(check)) => {
                        check.disabled.iter().for_each(|_| metrics.endpoint_disabled());
                        if !check.failed.is_empty() {
                            tracing::warn!(failed = check.failed.len(), "some failing endpoints could not be disabled");
                        }
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, "checking endpoint health failed"),
                    None => return,
                }
                match steps.run(|c| Box::pin(async move { ordering::number_strays(&*c).await })).await {
                    Some(Ok(0)) => {}
                    Some(Ok(n)) => tracing::warn!(numbered = n, "numbered ordered events the producers' trigger had not (see ordering::STRAYS)"),
                    Some(Err(e)) => tracing::warn!(error = %e, "numbering stray ordered events failed"),
                    None => return,
                }
            }
            _ = prune.tick() => {
                let policy = settings.retention;
                match steps.run(|c| Box::pin(async move { retention::prune_on(c, policy, PRUNE_BUDGET).await })).await {
                    Some(Ok(Pruned { deliveries, attempts, events, scanned })) if deliveries + events > 0 => {
                        tracing::info!(deliveries, attempts, events, scanned, "pruned finished history");
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => tracing::warn!(error = %e, "pruning history failed"),
                    None => return,
                }
            }
        }
    }
}

/// Where housekeeping's steps run, and what stops them.
struct Steps {
    pool: Pool,
    connector: Connector,
    stop: CancellationToken,
}

/// One step's work on a connection it may use as it likes (transactions included).
type Step<'c, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'c>>;

impl Steps {
    /// Runs `step` on a pooled connection; `None` once `stop` has ended it (its
    /// statement, if one was running, cancelled in the server).
    async fn run<T>(
        &self,
        step: impl for<'c> FnOnce(&'c mut Client) -> Step<'c, T>,
    ) -> Option<Result<T>> {
        let mut conn = tokio::select! {
            biased;
            _ = self.stop.cancelled() => return None,
            conn = self.pool.get() => match conn {
                Ok(conn) => conn,
                Err(e) => return Some(Err(e.into())),
            },
        };
        // The cancel needs only the connection's token, taken before the step borrows
        // the connection.
        let token = conn.cancel_token();
        let work = step(&mut conn);
        self.connector
            .finish_or_cancel_token(&token, &self.stop, work)
            .await
    }
}
