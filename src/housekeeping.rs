//! Periodic work beside the claim loop: sampling the queue for metrics, disabling
//! endpoints that fail for too long, and pruning finished history. Every dispatcher
//! runs it; each step is safe to run concurrently with itself.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::db::Pool;
use crate::metrics::{self, Metrics};
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

/// Runs until `stop`. Errors are logged and retried at the next period.
pub async fn run(
    pool: Pool,
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
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = sample.tick() => {
                match metrics::sample_queue(&pool).await {
                    Ok(queue) => metrics.set_queue(queue),
                    Err(e) => tracing::warn!(error = %e, "sampling the queue failed"),
                }
                let resumed = match pool.get().await {
                    Ok(client) => health::resume_stranded(&*client).await,
                    Err(e) => Err(e.into()),
                };
                match resumed {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(resumed = n, "resumed deliveries parked under an active endpoint"),
                    Err(e) => tracing::warn!(error = %e, "resuming stranded deliveries failed"),
                }
            }
            _ = health.tick() => {
                let disabled = match pool.get().await {
                    Ok(client) => health::disable_failing(&*client, settings.disable_failing_after).await,
                    Err(e) => Err(e.into()),
                };
                match disabled {
                    Ok(check) => {
                        check.disabled.iter().for_each(|_| metrics.endpoint_disabled());
                        if !check.failed.is_empty() {
                            tracing::warn!(failed = check.failed.len(), "some failing endpoints could not be disabled");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "checking endpoint health failed"),
                }
            }
            _ = prune.tick() => match retention::prune(&pool, settings.retention, PRUNE_BUDGET).await {
                Ok(Pruned { deliveries, attempts, events, scanned }) if deliveries + events > 0 => {
                    tracing::info!(deliveries, attempts, events, scanned, "pruned finished history");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "pruning history failed"),
            },
        }
    }
}
