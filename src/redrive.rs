//! Repair after the fact: send dead deliveries again, replay an event, send a test
//! event. Each change makes rows due now and rings the dispatchers' channel, so they
//! go out at once rather than at the next poll tick.
//!
//! A re-driven delivery keeps its history (attempt numbers continue) but gets a fresh
//! retry budget: `attempt_base` is set to the attempts made so far.

use std::time::SystemTime;

use tokio_postgres::GenericClient;
use tokio_postgres::types::Type;

use crate::endpoint;
use crate::error::{Error, Result};
use crate::inspect::DeliveryId;

/// Tells listening dispatchers that work is due. Delivered at commit, like any NOTIFY.
pub(crate) const WAKE: &str = "SELECT pg_notify('outboxd_wakeup', '')";

/// Starts the given deliveries over if they are in one of the states `$3`: due now,
/// with a fresh retry budget. Returns each with the state it is now in.
///
/// An ordered delivery goes through its key's line, as the sequencer's fan-out does
/// (docs/ordering.md, section 3): the key row is locked, or created, with `INSERT ... ON
/// CONFLICT DO UPDATE`, which waits for a settle moving the line on and then reads the
/// row as that settle committed it (a row deleted meanwhile makes the insert go through).
/// If the line's head is this delivery (a blocked key's dead head), it is `pending`
/// again and the key no longer blocked; if the line has another head, it is `queued`,
/// and since its number is older than every one queued behind that head it goes next;
/// if the key had no line, it is the head of a new one, `pending`. Several deliveries of
/// one key: the oldest is the candidate head, the others queue behind it. Unordered
/// deliveries are simply `pending`.
pub(crate) const RESTART: &str = "
WITH targets AS (
    SELECT d.event_id, d.endpoint_id, d.ordering_key, coalesce(d.ordering_seq, 0) AS ordering_seq
    FROM unnest($1::bigint[], $2::bigint[]) AS r(event_id, endpoint_id)
    JOIN webhook_deliveries d ON d.event_id = r.event_id AND d.endpoint_id = r.endpoint_id
    WHERE d.state = ANY ($3::text[])
), lines AS (
    -- In (endpoint, key) order, the order in which the sequencer and the settle lock
    -- key rows: none of them can deadlock with another.
    INSERT INTO webhook_ordering_keys AS k (endpoint_id, ordering_key, head_event_id, head_seq)
    SELECT DISTINCT ON (t.endpoint_id, t.ordering_key)
           t.endpoint_id, t.ordering_key, t.event_id, t.ordering_seq
    FROM targets t
    WHERE t.ordering_key IS NOT NULL
    ORDER BY t.endpoint_id, t.ordering_key, t.ordering_seq, t.event_id
    ON CONFLICT (endpoint_id, ordering_key) DO UPDATE
    SET blocked_since = CASE WHEN EXISTS (SELECT 1 FROM targets t
                                          WHERE t.endpoint_id = k.endpoint_id
                                            AND t.ordering_key = k.ordering_key
                                            AND t.event_id = k.head_event_id)
                             THEN NULL ELSE k.blocked_since END
    RETURNING k.endpoint_id, k.ordering_key, k.head_event_id
), restarted AS (
    UPDATE webhook_deliveries d
    SET state = CASE WHEN d.ordering_key IS NULL OR l.head_event_id = d.event_id
                     THEN 'pending' ELSE 'queued' END,
        next_attempt_at = now(), attempt_base = d.attempts,
        locked_by = NULL, locked_until = NULL, delivered_at = NULL, updated_at = now()
    FROM targets t
    LEFT JOIN lines l ON l.endpoint_id = t.endpoint_id AND l.ordering_key = t.ordering_key
    WHERE d.event_id = t.event_id AND d.endpoint_id = t.endpoint_id
      AND d.state = ANY ($3::text[])
    RETURNING d.event_id, d.endpoint_id, d.state
)
SELECT event_id, endpoint_id, state FROM restarted";

/// A delivery started over, and where it went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Restarted {
    /// The delivery.
    pub id: DeliveryId,
    /// `false`: an ordered delivery now `queued` behind its key's head (it goes next);
    /// `true`: due now.
    pub due: bool,
}

async fn restart(
    client: &impl GenericClient,
    ids: &[DeliveryId],
    from: &[&str],
) -> Result<Vec<Restarted>> {
    let events: Vec<i64> = ids.iter().map(|id| id.event_id).collect();
    let endpoints: Vec<i64> = ids.iter().map(|id| id.endpoint_id).collect();
    let rows = client
        .query_typed(
            RESTART,
            &[
                (&events, Type::INT8_ARRAY),
                (&endpoints, Type::INT8_ARRAY),
                (&from, Type::TEXT_ARRAY),
            ],
        )
        .await?;
    let restarted = rows
        .iter()
        .map(|row| {
            Ok(Restarted {
                id: delivery_id(row)?,
                due: row.try_get::<_, &str>("state")? == "pending",
            })
        })
        .collect::<Result<Vec<_>>>()?;
    wake(client, restarted.iter().filter(|r| r.due).count()).await?;
    Ok(restarted)
}

/// Makes the given dead deliveries due again; returns those that were dead (others
/// are left as they are). An ordered one keeps its key's order: the dead head of a
/// blocked key is due again (the key no longer blocked); another is `queued` to go
/// right after its key's current head (see [`Restarted`]).
pub async fn retry_dead(
    client: &impl GenericClient,
    ids: &[DeliveryId],
) -> Result<Vec<DeliveryId>> {
    let restarted = restart(client, ids, &["dead"]).await?;
    Ok(restarted.iter().map(|r| r.id).collect())
}

/// Which dead deliveries a bulk retry takes; every field is optional.
#[derive(Debug, Clone, Default)]
pub struct DeadFilter {
    /// Only this endpoint's.
    pub endpoint_id: Option<i64>,
    /// Only this event type's (exact).
    pub event_type: Option<String>,
    /// Only those that died at or after this time.
    pub since: Option<SystemTime>,
    /// Only those that died before this time.
    pub until: Option<SystemTime>,
}

/// The dead deliveries a bulk retry takes; [`RESTART`] re-checks that they are dead.
pub(crate) const DEAD_MATCHING: &str = "SELECT d.event_id, d.endpoint_id
    FROM webhook_deliveries d
    JOIN webhook_outbox o ON o.id = d.event_id
    WHERE d.state = 'dead'
      AND ($1::bigint IS NULL OR d.endpoint_id = $1)
      AND ($2::text IS NULL OR o.event_type = $2)
      AND ($3::timestamptz IS NULL OR d.updated_at >= $3)
      AND ($4::timestamptz IS NULL OR d.updated_at < $4)";

/// Makes every dead delivery matching `filter` due again (ordered ones as
/// [`retry_dead`] does); returns them.
pub async fn retry_dead_matching(
    client: &impl GenericClient,
    filter: &DeadFilter,
) -> Result<Vec<DeliveryId>> {
    let rows = client
        .query_typed(
            DEAD_MATCHING,
            &[
                (&filter.endpoint_id, Type::INT8),
                (&filter.event_type, Type::TEXT),
                (&filter.since, Type::TIMESTAMPTZ),
                (&filter.until, Type::TIMESTAMPTZ),
            ],
        )
        .await?;
    let ids = rows.iter().map(delivery_id).collect::<Result<Vec<_>>>()?;
    retry_dead(client, &ids).await
}

/// The states a replay starts over from: a finished delivery (delivered, dead, or
/// discarded with its endpoint's backlog). One still pending, in flight, parked or
/// queued is left alone, since it will be sent anyway.
const FINISHED: &[&str] = &["delivered", "dead", "discarded"];

/// An event's deliveries that a replay to every endpoint starts over.
pub(crate) const FINISHED_OF_EVENT: &str = "SELECT event_id, endpoint_id
    FROM webhook_deliveries
    WHERE event_id = $1 AND state IN ('delivered', 'dead', 'discarded')";

// For a named endpoint without a delivery of this event (e.g. registered later), one is
// created. An ordered event's goes through the key's line as in RESTART, with the
// number its other deliveries carry (the number itself left the log at the fan-out); if
// it has none left, 0: older than any, so it goes next in the line, as a replay does.
pub(crate) const ADD_MISSING: &str = "
WITH event AS (
    SELECT o.id, o.ordering_key,
           coalesce((SELECT d.ordering_seq FROM webhook_deliveries d
                     WHERE d.event_id = o.id AND d.ordering_seq IS NOT NULL LIMIT 1), 0) AS seq
    FROM webhook_outbox o
    WHERE o.id = $1 AND o.processed_at IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d
                      WHERE d.event_id = $1 AND d.endpoint_id = $2)
), line AS (
    INSERT INTO webhook_ordering_keys AS k (endpoint_id, ordering_key, head_event_id, head_seq)
    SELECT $2, e.ordering_key, e.id, e.seq
    FROM event e
    WHERE e.ordering_key IS NOT NULL
    ON CONFLICT (endpoint_id, ordering_key) DO UPDATE SET head_seq = k.head_seq
    RETURNING k.head_event_id
)
INSERT INTO webhook_deliveries (event_id, endpoint_id, state, ordering_key, ordering_seq)
SELECT e.id, $2,
       CASE WHEN e.ordering_key IS NULL OR (SELECT head_event_id FROM line) = e.id
            THEN 'pending' ELSE 'queued' END,
       e.ordering_key,
       CASE WHEN e.ordering_key IS NOT NULL THEN e.seq END
FROM event e
ON CONFLICT (event_id, endpoint_id) DO NOTHING
RETURNING event_id, endpoint_id, state";

/// Delivers an event again (same `webhook-id`) to one endpoint, or to every endpoint
/// it was delivered to. Returns the deliveries that were restarted. An ordered event
/// keeps its key's order: where its key has a line for the endpoint, it is `queued` to
/// go right after the current head (before every later event of the key); where it has
/// none, it goes at once as the head of a new line. It is never sent beside its key's
/// head.
pub async fn replay(
    client: &impl GenericClient,
    event_id: i64,
    endpoint_id: Option<i64>,
) -> Result<Vec<DeliveryId>> {
    let event = crate::inspect::get_event(client, event_id).await?;
    if event.processed_at.is_none() {
        return Err(Error::InvalidInput(format!(
            "event {event_id} has not been fanned out yet; it will be delivered anyway"
        )));
    }
    let mut restarted = Vec::new();
    let ids = match endpoint_id {
        Some(endpoint_id) => {
            endpoint::get(client, endpoint_id).await?;
            let added = client
                .query_typed(
                    ADD_MISSING,
                    &[(&event_id, Type::INT8), (&endpoint_id, Type::INT8)],
                )
                .await?;
            for row in &added {
                restarted.push(delivery_id(row)?);
            }
            wake(client, added.len()).await?;
            vec![DeliveryId {
                event_id,
                endpoint_id,
            }]
        }
        None => client
            .query_typed(FINISHED_OF_EVENT, &[(&event_id, Type::INT8)])
            .await?
            .iter()
            .map(delivery_id)
            .collect::<Result<Vec<_>>>()?,
    };
    if !ids.is_empty() {
        let again = restart(client, &ids, FINISHED).await?;
        restarted.extend(again.iter().map(|r| r.id));
    }
    Ok(restarted)
}

/// What an operator's action on a blocked key did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAction {
    /// Done, to this delivery (the key's head).
    Done(DeliveryId),
    /// The key has a line for the endpoint but is not blocked (its head is pending, in
    /// flight or parked): nothing was changed.
    NotBlocked,
}

/// The line of a key for an endpoint: no row if the endpoint does not exist (or was
/// removed); a NULL head if the key has no line for it.
pub(crate) const KEY_LINE: &str = "SELECT k.head_event_id, k.blocked_since IS NOT NULL AS blocked
    FROM webhook_endpoints ep
    LEFT JOIN webhook_ordering_keys k ON k.endpoint_id = ep.id AND k.ordering_key = $2
    WHERE ep.id = $1 AND ep.deleted_at IS NULL";

/// The dead head of `key`'s line for the endpoint if the key is blocked, `None` if its
/// line is not blocked; NotFound for a missing endpoint or a key without a line.
async fn blocked_head(
    client: &impl GenericClient,
    endpoint_id: i64,
    key: &str,
) -> Result<Option<DeliveryId>> {
    let row = client
        .query_typed_opt(KEY_LINE, &[(&endpoint_id, Type::INT8), (&key, Type::TEXT)])
        .await?
        .ok_or_else(|| Error::NotFound(format!("endpoint {endpoint_id}")))?;
    let Some(head) = row.try_get::<_, Option<i64>>("head_event_id")? else {
        return Err(Error::NotFound(format!(
            "ordering key {key:?} has no line for endpoint {endpoint_id}"
        )));
    };
    let blocked: Option<bool> = row.try_get("blocked")?;
    Ok((blocked == Some(true)).then_some(DeliveryId {
        event_id: head,
        endpoint_id,
    }))
}

/// Re-drives the dead head of a blocked key: it is due now with a fresh retry budget,
/// the key no longer blocked, and the deliveries queued behind it follow it in order.
pub async fn redrive_blocked(
    client: &impl GenericClient,
    endpoint_id: i64,
    key: &str,
) -> Result<KeyAction> {
    let Some(head) = blocked_head(client, endpoint_id, key).await? else {
        return Ok(KeyAction::NotBlocked);
    };
    // The restart re-checks that the head is still dead: a discard or re-drive that
    // got there first leaves nothing to do.
    let restarted = restart(client, &[head], &["dead"]).await?;
    Ok(match restarted.first() {
        Some(r) if r.due => KeyAction::Done(head),
        _ => KeyAction::NotBlocked,
    })
}

/// Ends a blocked key's dead head as `discarded`, if it still is the head of a blocked
/// line.
pub(crate) const DISCARD_BLOCKED: &str = "UPDATE webhook_deliveries d
    SET state = 'discarded', updated_at = now()
    FROM webhook_ordering_keys k
    WHERE k.endpoint_id = $1 AND k.ordering_key = $2 AND k.blocked_since IS NOT NULL
      AND d.event_id = k.head_event_id AND d.endpoint_id = k.endpoint_id AND d.state = 'dead'
    RETURNING d.event_id, d.endpoint_id";

/// Moves the line of a head that ended on (sql/0013). The policy is the one a dead head
/// would need; a discarded head moves on under either.
pub(crate) const ADVANCE: &str =
    "SELECT webhook_ordering_advance($1::bigint[], $2::bigint[], 'block') AS due";

/// Discards the dead head of a blocked key (`discarded`: never sent, unless replayed)
/// and moves its line on in the same transaction: the next queued delivery of the key
/// is due now (parked if the endpoint is disabled), or the line ends. Runs in a
/// transaction of its own (a savepoint when `client` is a transaction).
pub async fn discard_blocked(
    client: &mut impl GenericClient,
    endpoint_id: i64,
    key: &str,
) -> Result<KeyAction> {
    let tx = client.transaction().await?;
    if blocked_head(&tx, endpoint_id, key).await?.is_none() {
        return Ok(KeyAction::NotBlocked);
    }
    let Some(row) = tx
        .query_typed_opt(
            DISCARD_BLOCKED,
            &[(&endpoint_id, Type::INT8), (&key, Type::TEXT)],
        )
        .await?
    else {
        return Ok(KeyAction::NotBlocked);
    };
    let head = delivery_id(&row)?;
    let due: i64 = tx
        .query_typed_one(
            ADVANCE,
            &[
                (&vec![head.event_id], Type::INT8_ARRAY),
                (&vec![head.endpoint_id], Type::INT8_ARRAY),
            ],
        )
        .await?
        .try_get("due")?;
    wake(&tx, usize::try_from(due).unwrap_or(0)).await?;
    tx.commit().await?;
    Ok(KeyAction::Done(head))
}

/// The event type of test events.
pub const TEST_EVENT_TYPE: &str = "outboxd.test";

pub(crate) const TEST_EVENT: &str = "WITH event AS (
        INSERT INTO webhook_outbox (event_type, payload, processed_at)
        VALUES ($1, $2, now())
        RETURNING id
    )
    INSERT INTO webhook_deliveries (event_id, endpoint_id)
    SELECT id, $3 FROM event
    RETURNING event_id, endpoint_id";

/// Sends a test event (`outboxd.test`) to one endpoint only, whatever its filters.
pub async fn send_test(client: &impl GenericClient, endpoint_id: i64) -> Result<DeliveryId> {
    let endpoint = endpoint::get(client, endpoint_id).await?;
    if !endpoint.active {
        return Err(Error::InvalidInput(format!(
            "endpoint {endpoint_id} is disabled; enable it first"
        )));
    }
    let payload = serde_json::json!({"test": true, "endpoint_id": endpoint_id});
    let row = client
        .query_typed_one(
            TEST_EVENT,
            &[
                (&TEST_EVENT_TYPE, Type::TEXT),
                (&payload, Type::JSONB),
                (&endpoint_id, Type::INT8),
            ],
        )
        .await?;
    wake(client, 1).await?;
    delivery_id(&row)
}

fn delivery_id(row: &tokio_postgres::Row) -> Result<DeliveryId> {
    Ok(DeliveryId {
        event_id: row.try_get("event_id")?,
        endpoint_id: row.try_get("endpoint_id")?,
    })
}

async fn wake(client: &impl GenericClient, changed: usize) -> Result<()> {
    if changed > 0 {
        client.execute_typed(WAKE, &[]).await?;
    }
    Ok(())
}
