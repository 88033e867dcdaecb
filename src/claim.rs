//! Claiming work: fan new events out to their endpoints and lease due deliveries, in
//! one statement and one round trip.

use std::time::{Duration, SystemTime};

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, GenericClient, Row, Statement};

use crate::deliver::Delivery;
use crate::error::Result;

/// Fans out and claims, under a lease, in one statement. Parameters: `$1` worker id,
/// `$2` lease in milliseconds, `$3` most deliveries to claim.
///
/// * `due` takes retries, resumed deliveries and expired leases first, oldest due first,
///   so fresh traffic can never starve them. `FOR UPDATE SKIP LOCKED` lets any number
///   of dispatchers claim side by side: rows another claim has locked are skipped, not
///   waited for. The CTE form matters: PostgreSQL never inlines a CTE that locks rows,
///   so the LIMIT bounds what is locked (the `WHERE id IN (SELECT … LIMIT n FOR UPDATE)`
///   form can lock and update more than n rows, PostgreSQL bug #15715).
/// * Claiming sets `next_attempt_at` to the lease end: if this worker dies, the row is
///   due again when the lease runs out and the same index finds it. `attempts` is bumped
///   at claim time, which makes it the lease token that settling checks.
/// * `events` takes unprocessed, due outbox rows (`SKIP LOCKED` again, so each event is
///   fanned out by exactly one dispatcher), as many as fill the remaining capacity when
///   each goes to every active endpoint (and no more than about a batch of rows in all
///   when disabled endpoints add parked ones), and marks them processed; the deliveries
///   it inserts for active endpoints are claimed at once up to the remaining capacity,
///   and any rest (possible only when the due retries took the capacity) is inserted due
///   now for the next claim. A disabled (not removed) endpoint gets its deliveries
///   parked, so enabling it resumes what it missed; a park that races an enable is
///   resumed by the stranded-park sweep (`health::RESUME_STRANDED`).
///   `ON CONFLICT DO NOTHING` on the (event, endpoint) key
///   makes fan-out idempotent. The filter match is written out here rather than in a SQL
///   function: a function whose body has a sub-select is never inlined, and calling it
///   cost ~10 us per (event, endpoint) pair; inline, the common cases (no filter, exact
///   name) short-circuit before the sub-select runs.
/// * The final join reads each claimed delivery's event and endpoint. An endpoint that
///   was disabled or removed after the delivery was made comes back with `open = false`,
///   and the dispatcher parks that delivery instead of sending it. The endpoint's previous
///   secret comes along while its rotation grace period lasts, and `attempts -
///   attempt_base` is the count the retry budget is judged by (a re-drive resets it).
pub const CLAIM: &str = "
WITH due AS (
    SELECT event_id, endpoint_id
    FROM webhook_deliveries
    WHERE state = 'pending' AND next_attempt_at <= now()
    ORDER BY next_attempt_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
), reclaimed AS (
    UPDATE webhook_deliveries d
    SET attempts = d.attempts + 1,
        locked_by = $1,
        locked_until = now() + $2 * interval '1 millisecond',
        next_attempt_at = now() + $2 * interval '1 millisecond',
        updated_at = now()
    FROM due
    WHERE d.event_id = due.event_id AND d.endpoint_id = due.endpoint_id
    RETURNING d.event_id, d.endpoint_id, d.attempts, d.attempt_base
), cap AS (
    -- Enough events to fill the remaining capacity if each goes to every active
    -- endpoint: fanning out more would insert deliveries only to claim them with a
    -- second write later. Disabled endpoints get parked rows too, so the rows written
    -- in all are held to about a batch as well.
    SELECT greatest(1, least(($3 - (SELECT count(*) FROM reclaimed)) / greatest(1, n.open),
                             $3 / greatest(1, n.kept))) AS events_limit
    FROM (SELECT count(*) FILTER (WHERE active) AS open, count(*) AS kept
          FROM webhook_endpoints WHERE deleted_at IS NULL) AS n
), events AS (
    SELECT id, event_type
    FROM webhook_outbox
    WHERE processed_at IS NULL AND deliver_after <= now()
    ORDER BY deliver_after, id
    LIMIT (SELECT events_limit FROM cap)
    FOR UPDATE SKIP LOCKED
), processed AS (
    UPDATE webhook_outbox o
    SET processed_at = now()
    WHERE o.id = ANY (ARRAY(SELECT id FROM events))
), fanout AS (
    -- Every endpoint not removed: a disabled one gets its deliveries parked, and its
    -- enable resumes them.
    SELECT e.id AS event_id,
           ep.id AS endpoint_id,
           ep.active AS open,
           ep.active AND row_number() OVER (PARTITION BY ep.active ORDER BY e.id, ep.id)
                         <= $3 - (SELECT count(*) FROM reclaimed)
               AS claim_now
    FROM events e
    JOIN webhook_endpoints ep
      ON ep.deleted_at IS NULL
     AND (cardinality(ep.event_types) = 0
          OR e.event_type = ANY (ep.event_types)
          OR EXISTS (SELECT 1 FROM unnest(ep.event_types) AS f
                     WHERE f = '*'
                        OR (right(f, 2) = '.*' AND starts_with(e.event_type, left(f, -1)))))
), inserted AS (
    INSERT INTO webhook_deliveries
        (event_id, endpoint_id, state, attempts, next_attempt_at, locked_by, locked_until)
    SELECT event_id,
           endpoint_id,
           CASE WHEN open THEN 'pending' ELSE 'parked' END,
           CASE WHEN claim_now THEN 1 ELSE 0 END,
           CASE WHEN claim_now THEN now() + $2 * interval '1 millisecond' ELSE now() END,
           CASE WHEN claim_now THEN $1 END,
           CASE WHEN claim_now THEN now() + $2 * interval '1 millisecond' END
    FROM fanout
    ON CONFLICT (event_id, endpoint_id) DO NOTHING
    RETURNING event_id, endpoint_id, attempts, attempt_base
), claimed AS (
    SELECT event_id, endpoint_id, attempts, attempt_base FROM reclaimed
    UNION ALL
    SELECT event_id, endpoint_id, attempts, attempt_base FROM inserted WHERE attempts > 0
)
SELECT c.event_id, c.endpoint_id, c.attempts, o.event_type, o.payload::text, o.created_at,
       ep.url, ep.secret, (ep.active AND ep.deleted_at IS NULL) AS open,
       CASE WHEN ep.previous_secret_expires_at > now() THEN ep.previous_secret END,
       c.attempts - c.attempt_base,
       (SELECT count(*) FROM events) = (SELECT events_limit FROM cap) AS more_events
FROM claimed c
JOIN webhook_outbox o ON o.id = c.event_id
JOIN webhook_endpoints ep ON ep.id = c.endpoint_id";

/// Arms the doorbell and opens its gate before sleeping (see `sql/0002_notify.sql`,
/// `sql/0004_doorbell_gate.sql` and `sql/0006_isolation_and_endpoint_health.sql`).
///
/// The bell row is updated, and so locked, before the gate is tested and opened: the
/// `FROM` sub-select must be computed before the `setval` in the target list, and the
/// volatile gate test cannot be hoisted above it. With the row lock that
/// [`CLOSE_DOORBELL_GATE`] takes, an arm that updates the row and a close exclude each
/// other: no close lands between this statement's opening of the gate and its commit,
/// and an arm that waited for a close reopens the gate it shut. An arm that updates
/// nothing found the bell armed with no ring numbered since (`rings_seen`): it still
/// is, and no close will shut the gate until a ring that wakes this dispatcher too; or
/// a READ COMMITTED ring has disarmed it since, and that ring's notification wakes this
/// dispatcher.
///
/// A ring at REPEATABLE READ or SERIALIZABLE leaves the bell armed and numbers itself
/// in `webhook_doorbell_rings`. An arm after such a ring records its number (a write, so
/// it locks the row): the close disarms an armed bell only for a ring numbered after
/// the latest arm, whose notification reaches every dispatcher that armed before it,
/// so it never shuts out this one. The condition is the close's own, so whenever a
/// close may disarm, an arm writes and waits for it. An arm that writes also stores the
/// number in the gate's `last_value`, where producers read how many rings have gone
/// unanswered. Otherwise `AND NOT armed`, the number comparison and the gate test make
/// re-arming an armed bell a read, not a write (each `setval` is a WAL record).
pub const ARM_DOORBELL: &str = "
WITH armed AS (
    UPDATE webhook_doorbell
    SET armed = true,
        rings_seen = coalesce(pg_sequence_last_value('webhook_doorbell_rings'), 1)
    WHERE id = 1
      AND (NOT armed
           OR rings_seen < coalesce(pg_sequence_last_value('webhook_doorbell_rings'), 1))
    RETURNING rings_seen
)
SELECT setval('webhook_doorbell_gate',
              coalesce(arming.seen,
                       coalesce(pg_sequence_last_value('webhook_doorbell_rings'), 1)),
              false)
FROM (SELECT max(rings_seen) AS seen FROM armed) AS arming
WHERE arming.seen IS NOT NULL
   OR pg_sequence_last_value('webhook_doorbell_gate') IS NOT NULL";

/// Closes the doorbell's gate: sent by a dispatcher woken by a notification, beside
/// its next claim. Once the bell has rung, an open gate would only make every insert
/// statement call the ring function for nothing until a dispatcher is about to sleep
/// again.
///
/// The gate closes only while nobody holds the bell's row and either the bell is
/// disarmed (a READ COMMITTED ring disarmed it, and its notification woke every
/// dispatcher asleep on it) or it is armed and a REPEATABLE READ or SERIALIZABLE ring
/// has been numbered in `webhook_doorbell_rings` since the latest arm or close
/// (`rings_seen`). In the second case the close also disarms the bell, records the
/// ring number as seen, and notifies in its own transaction: the ring's own
/// notification reaches every dispatcher that armed before it, but that ring may have
/// rolled back or left the notifying to another producer, and a dispatcher of the
/// previous version arms without recording the number; the close's notification wakes
/// every dispatcher asleep at its commit, and each arms again (reopening the gate)
/// before it sleeps. Recording the number means those re-arms are not closed again:
/// each ring causes at most one such close, and closes never wake each other in a
/// loop. The gate's `last_value` gets the number too: the rings up to it are answered.
///
/// An armed bell with no ring numbered since its arm means a dispatcher is asleep
/// waiting for a ring (or a READ COMMITTED producer is ringing it right now); a locked
/// row may be a dispatcher arming it. In each case the gate stays open (a ring in
/// flight wakes every dispatcher at its commit, and their next claims close the gate):
/// `SKIP LOCKED`, so a close never waits for another session, and leaves the gate open
/// rather than wait to find out. The `setval` is projected from the locked row, so it
/// runs only after the lock is held. The gate test sits in the scan's filter, below
/// the lock: closing an already closed gate is a read.
pub const CLOSE_DOORBELL_GATE: &str = "
WITH bell AS (
    SELECT armed FROM webhook_doorbell
    WHERE id = 1
      AND pg_sequence_last_value('webhook_doorbell_gate') IS NULL
      AND (NOT armed
           OR rings_seen < coalesce(pg_sequence_last_value('webhook_doorbell_rings'), 1))
    FOR UPDATE SKIP LOCKED
), disarmed AS (
    UPDATE webhook_doorbell
    SET armed = false,
        rings_seen = coalesce(pg_sequence_last_value('webhook_doorbell_rings'), 1)
    WHERE id = 1 AND (SELECT armed FROM bell)
    RETURNING pg_notify('outboxd_wakeup', '')
)
SELECT setval('webhook_doorbell_gate',
              coalesce(pg_sequence_last_value('webhook_doorbell_rings'), 1), true),
       (SELECT count(*) FROM disarmed)
FROM bell";

/// When the next piece of work becomes due: the earliest pending delivery (a retry or
/// a lease end) or delayed event. Each side reads the first entry of its partial index.
pub const NEXT_DUE: &str = "
SELECT extract(epoch FROM least(
    (SELECT next_attempt_at FROM webhook_deliveries
      WHERE state = 'pending' ORDER BY next_attempt_at LIMIT 1),
    (SELECT deliver_after FROM webhook_outbox
      WHERE processed_at IS NULL ORDER BY deliver_after, id LIMIT 1)
) - now())::float8";

/// A claimed delivery, or one whose endpoint closed after it was made.
#[derive(Debug)]
pub enum Claimed {
    /// Send it.
    Send(Delivery),
    /// Its endpoint is disabled or removed: park it without sending.
    Park {
        /// The event.
        event_id: i64,
        /// The closed endpoint.
        endpoint_id: i64,
        /// The attempt number the claim took (the lease token).
        attempt: i32,
    },
}

/// The parameter types of [`CLAIM`], for preparing it.
pub const CLAIM_TYPES: &[Type] = &[Type::TEXT, Type::INT8, Type::INT8];

/// Runs [`CLAIM`] once: at most `limit` deliveries, leased to `worker_id` for `lease`.
/// Parses and plans the statement on every call; a claim loop should prepare it once
/// per connection and use [`claim_prepared`].
#[cfg_attr(
    not(feature = "internals"),
    allow(dead_code, reason = "tests and tools that claim by hand")
)]
pub async fn claim(
    client: &impl GenericClient,
    worker_id: &str,
    lease: Duration,
    limit: u32,
) -> Result<Vec<Claimed>> {
    let (lease_ms, limit) = (lease.as_millis() as i64, i64::from(limit));
    let params: [(&(dyn ToSql + Sync), Type); 3] = [
        (&worker_id, Type::TEXT),
        (&lease_ms, Type::INT8),
        (&limit, Type::INT8),
    ];
    let rows = client.query_typed(CLAIM, &params).await?;
    Ok(rows.into_iter().map(claimed).collect())
}

/// Runs [`CLAIM`] prepared (with [`CLAIM_TYPES`]) on `client`. Parsing and planning
/// this statement costs more than running it on an idle queue (~0.6 ms against
/// ~0.3 ms), so the prepared form is what keeps the wake-up path short. Its cached
/// generic plan has the same shape as the custom one (partial-index scans, primary-key
/// lookups).
#[allow(
    clippy::disallowed_methods,
    reason = "runs the statement prepared on purpose (WEBHOOK_PREPARED_STATEMENTS)"
)]
pub async fn claim_prepared(
    client: &Client,
    statement: &Statement,
    worker_id: &str,
    lease: Duration,
    limit: u32,
) -> Result<Batch> {
    let (lease_ms, limit) = (lease.as_millis() as i64, i64::from(limit));
    let rows = client
        .query(statement, &[&worker_id, &lease_ms, &limit])
        .await?;
    Ok(batch(rows))
}

/// Runs [`CLAIM`] as an unnamed statement, parsed and planned on every call: the form
/// that works through a transaction-mode pooler, which keeps no prepared statement from
/// one transaction to the next. On an idle queue it cost 0.7 to 2.0 ms more per call
/// than [`claim_prepared`] (the `statements` bench scenario, on a loaded machine); on
/// full batches of 200, 2% to 17% more.
pub async fn claim_unnamed(
    client: &impl GenericClient,
    worker_id: &str,
    lease: Duration,
    limit: u32,
) -> Result<Batch> {
    let (lease_ms, limit) = (lease.as_millis() as i64, i64::from(limit));
    let params: [(&(dyn ToSql + Sync), Type); 3] = [
        (&worker_id, Type::TEXT),
        (&lease_ms, Type::INT8),
        (&limit, Type::INT8),
    ];
    Ok(batch(client.query_typed(CLAIM, &params).await?))
}

fn batch(rows: Vec<Row>) -> Batch {
    let more = rows.first().is_some_and(|row| row.get::<_, bool>(11));
    Batch {
        claimed: rows.into_iter().map(claimed).collect(),
        more,
    }
}

/// What one claim took.
#[derive(Debug)]
pub struct Batch {
    /// The deliveries claimed.
    pub claimed: Vec<Claimed>,
    /// The claim fanned out as many events as it could take: more are probably
    /// waiting even if fewer deliveries than asked came back (narrow filters).
    pub more: bool,
}

fn claimed(row: Row) -> Claimed {
    let (event_id, endpoint_id, attempt) = (row.get(0), row.get(1), row.get(2));
    if row.get::<_, bool>(8) {
        Claimed::Send(Delivery {
            event_id,
            endpoint_id,
            attempt,
            event_type: row.get(3),
            payload: row.get(4),
            created_at: row.get::<_, SystemTime>(5),
            url: row.get(6),
            secret: row.get(7),
            previous_secret: row.get(9),
            tries: row.get(10),
        })
    } else {
        Claimed::Park {
            event_id,
            endpoint_id,
            attempt,
        }
    }
}

/// Arms the doorbell so the next insert notifies.
pub async fn arm_doorbell(client: &impl GenericClient) -> Result<()> {
    client.query_typed(ARM_DOORBELL, &[]).await?;
    Ok(())
}

/// Closes the doorbell's gate while this dispatcher is awake (see
/// [`CLOSE_DOORBELL_GATE`]). Harmless at any time: the next arm opens it again.
pub async fn close_doorbell_gate(client: &impl GenericClient) -> Result<()> {
    client.query_typed(CLOSE_DOORBELL_GATE, &[]).await?;
    Ok(())
}

/// How long until the next known work is due: `None` when nothing is waiting,
/// `Some(ZERO)` when something is due already.
pub async fn next_due(client: &impl GenericClient) -> Result<Option<Duration>> {
    let row = client.query_typed_one(NEXT_DUE, &[]).await?;
    let seconds: Option<f64> = row.get(0);
    Ok(seconds.map(|s| Duration::from_secs_f64(s.max(0.0))))
}
