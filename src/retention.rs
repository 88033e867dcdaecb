//! Retention: delivered and discarded deliveries and their attempt history are deleted
//! after `WEBHOOK_RETENTION_HOURS`, dead ones after `WEBHOOK_DEAD_RETENTION_HOURS` (unless
//! re-driven first), the parked deliveries of a removed endpoint that long after its
//! removal (they can never be sent), and an event once none of its deliveries remain.
//! Pending, in-flight, parked and queued work (of an endpoint that can be enabled again)
//! is never touched, nor an event that has not been fanned out, nor a dead delivery that
//! a blocked ordered key still has as its head.
//!
//! A pass costs what it prunes, not what it keeps. Each is a series of short
//! transactions (batches of [`BATCH`] events), so it never holds long locks or pins
//! vacuum:
//!
//! 1. The walk: from the frontier where the last pass stopped (`webhook_retention`,
//!    `sql/0007_retention_frontier.sql`), through events older than the delivered
//!    retention and [`WALK_LAG`], deleting their expired deliveries and the events left
//!    without any. It passes what it must keep and never walks it again: each event is
//!    walked once. By then most deliveries have expired, since most are delivered
//!    within [`WALK_LAG`] of their event.
//! 2. Expired dead deliveries, wherever they are, through the dead index (endpoint by
//!    endpoint, oldest first): dead deliveries kept for their longer retention are the
//!    bulk of what the walk passes.
//! 3. Parked and queued deliveries of endpoints removed longer ago than the dead
//!    retention, through the parked and queued indexes, then their ordered lines' key
//!    rows.
//! 4. The sweep: [`SWEEP_BATCHES`] batches of events below the frontier per pass,
//!    round and round, for what finished after the walk passed it (a delivery retried
//!    for hours, resumed from a park or re-driven, a parked backlog discarded; an event
//!    fanned out late). It is the only part of a pass that visits kept rows, a fixed
//!    number per pass.
//!
//! The frontier's row is locked (`FOR UPDATE SKIP LOCKED`) by each transaction of a
//! pass, so one dispatcher prunes at a time and the others skip their turn.

use std::time::{Duration, Instant};

use tokio_postgres::types::Type;
use tokio_postgres::{Client, Transaction};

use crate::db::Pool;
use crate::error::Result;

/// How long finished rows are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Delivered and discarded deliveries, their attempts, and fully finished events.
    pub delivered: Duration,
    /// Dead deliveries and their attempts, and a removed endpoint's parked deliveries
    /// (counted from its removal).
    pub dead: Duration,
}

/// Events (or deliveries) per batch: small enough that each transaction is a few
/// milliseconds.
pub const BATCH: i64 = 500;

/// How much older than the delivered retention an event must be before the walk
/// passes it: deliveries made within this long of their event have expired by then, so
/// the walk deletes them rather than leave them to the sweep.
pub const WALK_LAG: Duration = Duration::from_secs(3600);

/// Batches of events the sweep visits per pass.
pub const SWEEP_BATCHES: u32 = 4;

/// Takes the pass's turn: the frontier and the sweep's place, or no row if another
/// dispatcher is pruning right now.
///
/// It also sets `synchronous_commit = off` for the transaction: every batch moves the
/// frontier, a write, so each commit of a long walk would otherwise wait for a WAL
/// flush, even in batches that delete nothing (a read-only commit waits for none). A
/// crash can lose only the last moves and deletes, which the next pass makes again. The
/// dispatcher's own sessions run so anyway; this covers a pool without that setting.
pub(crate) const LOCK: &str =
    "SELECT frontier, sweep, set_config('synchronous_commit', 'off', true) AS synchronous_commit
    FROM webhook_retention WHERE id = 1 FOR UPDATE SKIP LOCKED";

/// Puts the frontier's row back if it was deleted by hand. A no-op otherwise, and one
/// that never waits: the `NOT EXISTS` reads the row as committed, so there is no insert
/// to check against another pass's update of it.
pub(crate) const RESTORE: &str = "INSERT INTO webhook_retention (id)
    SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM webhook_retention)
    ON CONFLICT (id) DO NOTHING";

pub(crate) const SET_FRONTIER: &str = "UPDATE webhook_retention SET frontier = $1 WHERE id = 1";
pub(crate) const SET_SWEEP: &str = "UPDATE webhook_retention SET sweep = $1 WHERE id = 1";

/// The next batch of events after `$1` and up to `$4`, oldest first, each with whether
/// it is older than `$3` milliseconds.
pub(crate) const NEXT_EVENTS: &str =
    "SELECT id, created_at < now() - $3 * interval '1 millisecond' AS old
    FROM webhook_outbox
    WHERE id > $1 AND id <= $4
    ORDER BY id
    LIMIT $2";

/// Deletes the batch's final deliveries that are past retention, then their attempts.
/// `$2`/`$3` are the delivered/dead retentions in milliseconds; a discarded delivery is
/// kept as long as a delivered one. A dead delivery that is still the head of its
/// ordered key's line (the key blocked behind it, waiting for an operator) is kept
/// whatever its age: deleting it would leave the line with a head that no longer
/// exists, and the key blocked for good. `queued` deliveries are never final.
pub(crate) const DELETE_DELIVERIES: &str = "
WITH gone AS (
    DELETE FROM webhook_deliveries d
    WHERE d.event_id = ANY ($1::bigint[])
      AND ((d.state IN ('delivered', 'discarded')
            AND d.updated_at < now() - $2 * interval '1 millisecond')
        OR (d.state = 'dead' AND d.updated_at < now() - $3 * interval '1 millisecond'
            AND NOT EXISTS (SELECT 1 FROM webhook_ordering_keys k
                            WHERE k.endpoint_id = d.endpoint_id AND k.ordering_key = d.ordering_key
                              AND k.head_event_id = d.event_id)))
    RETURNING d.event_id, d.endpoint_id
), attempts AS (
    DELETE FROM webhook_attempts a
    USING gone
    WHERE a.event_id = gone.event_id AND a.endpoint_id = gone.endpoint_id
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS deliveries, (SELECT count(*) FROM attempts) AS attempts";

/// Deletes the batch's events that were fanned out, are past the shorter retention, and
/// have no delivery left. A separate statement so it sees the deletes above.
pub(crate) const DELETE_EVENTS: &str = "DELETE FROM webhook_outbox o
    WHERE o.id = ANY ($1::bigint[])
      AND o.processed_at IS NOT NULL
      AND o.created_at < now() - $2 * interval '1 millisecond'
      AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = o.id)";

/// Deletes up to `$2` dead deliveries older than `$1` milliseconds, with their
/// attempts; returns the counts and the events they belonged to.
///
/// The dead index is ordered by (endpoint, time of death), so each endpoint's expired
/// deliveries are the start of its range, and the endpoints themselves are read off the
/// index one probe each (a loose index scan: the recursive step asks for the next
/// endpoint id after the last). Dead deliveries within their retention are never read.
/// The delete repeats the conditions: a re-drive that committed since the read made the
/// row pending, and it stays. A blocked key's dead head is skipped (see
/// [`DELETE_DELIVERIES`]) in the read, so that a few of them, oldest of an endpoint,
/// cannot hide the expired deliveries behind them from every batch.
pub const DELETE_EXPIRED_DEAD: &str = "
WITH RECURSIVE endpoints(id) AS (
    (SELECT endpoint_id FROM webhook_deliveries
     WHERE state = 'dead' ORDER BY endpoint_id LIMIT 1)
    UNION ALL
    SELECT (SELECT d.endpoint_id FROM webhook_deliveries d
            WHERE d.state = 'dead' AND d.endpoint_id > e.id
            ORDER BY d.endpoint_id LIMIT 1)
    FROM endpoints e
    WHERE e.id IS NOT NULL
), expired AS (
    SELECT x.event_id, x.endpoint_id
    FROM endpoints e
    CROSS JOIN LATERAL (
        SELECT d.event_id, d.endpoint_id
        FROM webhook_deliveries d
        WHERE d.state = 'dead' AND d.endpoint_id = e.id
          AND d.updated_at < now() - $1 * interval '1 millisecond'
          AND NOT EXISTS (SELECT 1 FROM webhook_ordering_keys k
                          WHERE k.endpoint_id = d.endpoint_id AND k.ordering_key = d.ordering_key
                            AND k.head_event_id = d.event_id)
        ORDER BY d.updated_at
        LIMIT $2
    ) x
    LIMIT $2
), gone AS (
    DELETE FROM webhook_deliveries d
    USING expired x
    WHERE d.event_id = x.event_id AND d.endpoint_id = x.endpoint_id
      AND d.state = 'dead' AND d.updated_at < now() - $1 * interval '1 millisecond'
      AND NOT EXISTS (SELECT 1 FROM webhook_ordering_keys k
                      WHERE k.endpoint_id = d.endpoint_id AND k.ordering_key = d.ordering_key
                        AND k.head_event_id = d.event_id)
    RETURNING d.event_id, d.endpoint_id
), attempts AS (
    DELETE FROM webhook_attempts a
    USING gone
    WHERE a.event_id = gone.event_id AND a.endpoint_id = gone.endpoint_id
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS deliveries, (SELECT count(*) FROM attempts) AS attempts,
       ARRAY(SELECT DISTINCT event_id FROM gone) AS events";

/// Deletes up to `$2` parked deliveries of endpoints removed more than `$1`
/// milliseconds ago, with their attempts; returns the counts and their events.
///
/// A removed endpoint can never be enabled again, so its parked deliveries can never
/// be sent; they are kept as long as dead deliveries, from the removal, then deleted.
/// Parked rows are few and indexed by endpoint (`webhook_deliveries_parked_idx`); a
/// disabled endpoint's are never touched, since enabling it resumes them.
pub const DELETE_REMOVED_PARKED: &str = "
WITH expired AS (
    SELECT d.event_id, d.endpoint_id
    FROM webhook_endpoints ep
    JOIN webhook_deliveries d ON d.endpoint_id = ep.id AND d.state = 'parked'
    WHERE ep.deleted_at < now() - $1 * interval '1 millisecond'
    LIMIT $2
), gone AS (
    DELETE FROM webhook_deliveries d
    USING expired x
    WHERE d.event_id = x.event_id AND d.endpoint_id = x.endpoint_id AND d.state = 'parked'
    RETURNING d.event_id, d.endpoint_id
), attempts AS (
    DELETE FROM webhook_attempts a
    USING gone
    WHERE a.event_id = gone.event_id AND a.endpoint_id = gone.endpoint_id
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS deliveries, (SELECT count(*) FROM attempts) AS attempts,
       ARRAY(SELECT DISTINCT event_id FROM gone) AS events";

/// [`DELETE_REMOVED_PARKED`] for the ordered deliveries `queued` behind their keys'
/// heads, through the queued index: a removed endpoint's lines never move again.
pub const DELETE_REMOVED_QUEUED: &str = "
WITH expired AS (
    SELECT d.event_id, d.endpoint_id
    FROM webhook_endpoints ep
    JOIN webhook_deliveries d ON d.endpoint_id = ep.id AND d.state = 'queued'
    WHERE ep.deleted_at < now() - $1 * interval '1 millisecond'
    LIMIT $2
), gone AS (
    DELETE FROM webhook_deliveries d
    USING expired x
    WHERE d.event_id = x.event_id AND d.endpoint_id = x.endpoint_id AND d.state = 'queued'
    RETURNING d.event_id, d.endpoint_id
), attempts AS (
    DELETE FROM webhook_attempts a
    USING gone
    WHERE a.event_id = gone.event_id AND a.endpoint_id = gone.endpoint_id
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS deliveries, (SELECT count(*) FROM attempts) AS attempts,
       ARRAY(SELECT DISTINCT event_id FROM gone) AS events";

/// Deletes up to `$2` key rows (ordered lines) of endpoints removed more than `$1`
/// milliseconds ago (their parked and queued deliveries go by [`DELETE_REMOVED_PARKED`]
/// and [`DELETE_REMOVED_QUEUED`]); a blocked line's dead head is then an ordinary dead
/// delivery, pruned by its own retention.
pub const DELETE_REMOVED_KEYS: &str = "
WITH expired AS (
    SELECT k.endpoint_id, k.ordering_key
    FROM webhook_endpoints ep
    JOIN webhook_ordering_keys k ON k.endpoint_id = ep.id
    WHERE ep.deleted_at < now() - $1 * interval '1 millisecond'
    LIMIT $2
), gone AS (
    DELETE FROM webhook_ordering_keys k
    USING expired x
    WHERE k.endpoint_id = x.endpoint_id AND k.ordering_key = x.ordering_key
    RETURNING 1
)
SELECT count(*) AS keys FROM gone";

/// What one pruning pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    /// Deliveries deleted.
    pub deliveries: u64,
    /// Attempt rows deleted.
    pub attempts: u64,
    /// Outbox rows deleted.
    pub events: u64,
    /// Outbox rows the walk and the sweep looked at: what the pass cost besides what it
    /// deleted.
    pub scanned: u64,
}

/// Prunes what is past its retention: the walk from the frontier, expired dead
/// deliveries, removed endpoints' parked deliveries, then a turn of the sweep, until
/// each is done or `budget` has been spent. Does nothing while another dispatcher is
/// pruning.
#[cfg_attr(
    not(feature = "internals"),
    allow(dead_code, reason = "tests and the bench prune on a pool")
)]
pub async fn prune(pool: &Pool, policy: RetentionPolicy, budget: Duration) -> Result<Pruned> {
    let mut client = pool.get().await?;
    prune_on(&mut client, policy, budget).await
}

/// [`prune`] on a connection the caller holds (so that the caller can cancel the
/// statement running on it); each batch is a transaction of its own on it.
pub(crate) async fn prune_on(
    client: &mut Client,
    policy: RetentionPolicy,
    budget: Duration,
) -> Result<Pruned> {
    let mut pass = Pass {
        policy,
        started: Instant::now(),
        budget,
        pruned: Pruned::default(),
        yielded: false,
    };
    pass.walk(client).await?;
    let dead_ms = millis(policy.dead);
    pass.delete_directly(client, DELETE_EXPIRED_DEAD, dead_ms)
        .await?;
    pass.delete_directly(client, DELETE_REMOVED_PARKED, dead_ms)
        .await?;
    pass.delete_directly(client, DELETE_REMOVED_QUEUED, dead_ms)
        .await?;
    pass.delete_removed_keys(client, dead_ms).await?;
    pass.sweep(client).await?;
    Ok(pass.pruned)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The position a transaction holds the frontier's row at.
struct Cursor {
    frontier: i64,
    sweep: i64,
}

struct Pass {
    policy: RetentionPolicy,
    started: Instant,
    budget: Duration,
    pruned: Pruned,
    /// Another dispatcher held the frontier: the rest of this pass is skipped.
    yielded: bool,
}

impl Pass {
    fn may_go_on(&self) -> bool {
        !self.yielded && self.started.elapsed() < self.budget
    }

    /// Takes the frontier's row in `tx`, or notes that another dispatcher has it.
    async fn lock(&mut self, tx: &Transaction<'_>) -> Result<Option<Cursor>> {
        match tx.query_typed_opt(LOCK, &[]).await? {
            Some(row) => Ok(Some(Cursor {
                frontier: row.try_get("frontier")?,
                sweep: row.try_get("sweep")?,
            })),
            None => {
                self.yielded = true;
                tx.execute_typed(RESTORE, &[]).await?;
                Ok(None)
            }
        }
    }

    /// Walks from the frontier through events old enough, one batch per transaction.
    async fn walk(&mut self, client: &mut Client) -> Result<()> {
        let old_ms = millis(self.policy.delivered.saturating_add(WALK_LAG));
        while self.may_go_on() {
            let tx = client.transaction().await?;
            let Some(cursor) = self.lock(&tx).await? else {
                return Ok(tx.commit().await?);
            };
            let rows = tx
                .query_typed(
                    NEXT_EVENTS,
                    &[
                        (&cursor.frontier, Type::INT8),
                        (&BATCH, Type::INT8),
                        (&old_ms, Type::INT8),
                        (&i64::MAX, Type::INT8),
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
            self.delete_events(&tx, &old).await?;
            tx.execute_typed(SET_FRONTIER, &[(&last, Type::INT8)]).await?;
            tx.commit().await?;
            self.pruned.scanned += old.len() as u64;
            if old.len() < rows.len() || (rows.len() as i64) < BATCH {
                break;
            }
        }
        Ok(())
    }

    /// Visits [`SWEEP_BATCHES`] batches below the frontier, from where the sweep was.
    async fn sweep(&mut self, client: &mut Client) -> Result<()> {
        for _ in 0..SWEEP_BATCHES {
            if !self.may_go_on() {
                break;
            }
            let tx = client.transaction().await?;
            let Some(cursor) = self.lock(&tx).await? else {
                return Ok(tx.commit().await?);
            };
            let rows = tx
                .query_typed(
                    NEXT_EVENTS,
                    &[
                        (&cursor.sweep, Type::INT8),
                        (&BATCH, Type::INT8),
                        (&0_i64, Type::INT8),
                        (&cursor.frontier, Type::INT8),
                    ],
                )
                .await?;
            let ids = rows
                .iter()
                .map(|r| r.try_get("id"))
                .collect::<std::result::Result<Vec<i64>, _>>()?;
            self.delete_events(&tx, &ids).await?;
            // At the frontier, it starts over from the first event.
            let wrapped = (ids.len() as i64) < BATCH;
            let next = match ids.last() {
                Some(&last) if !wrapped => last,
                _ => 0,
            };
            if next != cursor.sweep {
                tx.execute_typed(SET_SWEEP, &[(&next, Type::INT8)]).await?;
            }
            tx.commit().await?;
            self.pruned.scanned += ids.len() as u64;
            if wrapped {
                break;
            }
        }
        Ok(())
    }

    /// Runs `statement` (which deletes deliveries older than `$1` and returns their
    /// events) batch by batch until it finds fewer than a batch, deleting the events it
    /// left without deliveries.
    async fn delete_directly(
        &mut self,
        client: &mut Client,
        statement: &str,
        older_than_ms: i64,
    ) -> Result<()> {
        while self.may_go_on() {
            let tx = client.transaction().await?;
            if self.lock(&tx).await?.is_none() {
                return Ok(tx.commit().await?);
            }
            let row = tx
                .query_typed_one(
                    statement,
                    &[(&older_than_ms, Type::INT8), (&BATCH, Type::INT8)],
                )
                .await?;
            let deliveries: i64 = row.try_get("deliveries")?;
            let attempts: i64 = row.try_get("attempts")?;
            let events: Vec<i64> = row.try_get("events")?;
            self.pruned.deliveries += deliveries as u64;
            self.pruned.attempts += attempts as u64;
            self.delete_empty_events(&tx, &events).await?;
            tx.commit().await?;
            if deliveries < BATCH {
                break;
            }
        }
        Ok(())
    }

    /// Deletes the key rows of removed endpoints, batch by batch.
    async fn delete_removed_keys(&mut self, client: &mut Client, older_than_ms: i64) -> Result<()> {
        while self.may_go_on() {
            let tx = client.transaction().await?;
            if self.lock(&tx).await?.is_none() {
                return Ok(tx.commit().await?);
            }
            let keys: i64 = tx
                .query_typed_one(
                    DELETE_REMOVED_KEYS,
                    &[(&older_than_ms, Type::INT8), (&BATCH, Type::INT8)],
                )
                .await?
                .try_get("keys")?;
            tx.commit().await?;
            if keys < BATCH {
                break;
            }
        }
        Ok(())
    }

    /// Deletes the expired deliveries of `events`, then those of `events` left without
    /// any.
    async fn delete_events(&mut self, tx: &Transaction<'_>, events: &[i64]) -> Result<()> {
        let counts = tx
            .query_typed_one(
                DELETE_DELIVERIES,
                &[
                    (&events, Type::INT8_ARRAY),
                    (&millis(self.policy.delivered), Type::INT8),
                    (&millis(self.policy.dead), Type::INT8),
                ],
            )
            .await?;
        self.pruned.deliveries += counts.try_get::<_, i64>("deliveries")? as u64;
        self.pruned.attempts += counts.try_get::<_, i64>("attempts")? as u64;
        self.delete_empty_events(tx, events).await
    }

    async fn delete_empty_events(&mut self, tx: &Transaction<'_>, events: &[i64]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let shorter_ms = millis(self.policy.delivered.min(self.policy.dead));
        self.pruned.events += tx
            .execute_typed(
                DELETE_EVENTS,
                &[(&events, Type::INT8_ARRAY), (&shorter_ms, Type::INT8)],
            )
            .await?;
        Ok(())
    }
}
