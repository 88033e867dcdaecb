//! Retention: delivered deliveries and their attempt history are deleted after
//! `WEBHOOK_RETENTION_HOURS`, dead ones after `WEBHOOK_DEAD_RETENTION_HOURS` (unless
//! re-driven first), and an event once none of its deliveries remain.
//!
//! Pruning walks the outbox from its oldest id in small batches, each its own short
//! transaction, so it never holds long locks or pins vacuum. It only deletes final rows
//! (`delivered`, `discarded`, `dead`): pending, in-flight and parked work is never
//! touched, nor an event that has not been fanned out.

use std::time::{Duration, Instant};

use tokio_postgres::types::Type;

use crate::db::Pool;
use crate::error::Result;

/// How long finished rows are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Delivered deliveries, their attempts, and fully finished events.
    pub delivered: Duration,
    /// Dead deliveries and their attempts.
    pub dead: Duration,
}

/// Events per batch: small enough that each transaction is a few milliseconds.
pub const BATCH: i64 = 500;

/// The next batch of events, oldest first, after the cursor `$1`.
pub const NEXT_EVENTS: &str = "SELECT id, created_at < now() - $3 * interval '1 millisecond' AS old
    FROM webhook_outbox
    WHERE id > $1
    ORDER BY id
    LIMIT $2";

/// Deletes the batch's final deliveries that are past retention, then their attempts.
/// `$2`/`$3` are the delivered/dead retentions in milliseconds; a discarded delivery is
/// kept as long as a delivered one.
pub const DELETE_DELIVERIES: &str = "
WITH gone AS (
    DELETE FROM webhook_deliveries
    WHERE event_id = ANY ($1::bigint[])
      AND ((state IN ('delivered', 'discarded') AND updated_at < now() - $2 * interval '1 millisecond')
        OR (state = 'dead' AND updated_at < now() - $3 * interval '1 millisecond'))
    RETURNING event_id, endpoint_id
), attempts AS (
    DELETE FROM webhook_attempts a
    USING gone
    WHERE a.event_id = gone.event_id AND a.endpoint_id = gone.endpoint_id
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS deliveries, (SELECT count(*) FROM attempts) AS attempts";

/// Deletes the batch's events that were fanned out, are past the shorter retention, and
/// have no delivery left. A separate statement so it sees the deletes above.
pub const DELETE_EVENTS: &str = "DELETE FROM webhook_outbox o
    WHERE o.id = ANY ($1::bigint[])
      AND o.processed_at IS NOT NULL
      AND o.created_at < now() - $2 * interval '1 millisecond'
      AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = o.id)";

/// What one pruning pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    /// Deliveries deleted.
    pub deliveries: u64,
    /// Attempt rows deleted.
    pub attempts: u64,
    /// Outbox rows deleted.
    pub events: u64,
}

/// Prunes from the oldest event until it reaches events younger than the shorter
/// retention, or `budget` has been spent.
pub async fn prune(pool: &Pool, policy: RetentionPolicy, budget: Duration) -> Result<Pruned> {
    let started = Instant::now();
    let shorter_ms = policy.delivered.min(policy.dead).as_millis() as i64;
    let delivered_ms = policy.delivered.as_millis() as i64;
    let dead_ms = policy.dead.as_millis() as i64;
    let mut cursor = 0i64;
    let mut pruned = Pruned::default();
    while started.elapsed() < budget {
        let mut client = pool.get().await?;
        let tx = client.transaction().await?;
        let rows = tx
            .query_typed(
                NEXT_EVENTS,
                &[
                    (&cursor, Type::INT8),
                    (&BATCH, Type::INT8),
                    (&shorter_ms, Type::INT8),
                ],
            )
            .await?;
        // Event ids grow with time, so the walk ends at the first event too young.
        let mut old: Vec<i64> = Vec::with_capacity(rows.len());
        for row in &rows {
            if !row.try_get::<_, bool>("old")? {
                break;
            }
            old.push(row.try_get("id")?);
        }
        let Some(&last) = old.last() else {
            tx.commit().await?;
            break;
        };
        let counts = tx
            .query_typed_one(
                DELETE_DELIVERIES,
                &[
                    (&old, Type::INT8_ARRAY),
                    (&delivered_ms, Type::INT8),
                    (&dead_ms, Type::INT8),
                ],
            )
            .await?;
        pruned.deliveries += counts.try_get::<_, i64>("deliveries")? as u64;
        pruned.attempts += counts.try_get::<_, i64>("attempts")? as u64;
        pruned.events += tx
            .execute_typed(
                DELETE_EVENTS,
                &[(&old, Type::INT8_ARRAY), (&shorter_ms, Type::INT8)],
            )
            .await?;
        tx.commit().await?;
        cursor = last;
        if old.len() < rows.len() || (rows.len() as i64) < BATCH {
            break;
        }
    }
    Ok(pruned)
}
