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

pub(crate) const RETRY_DEAD: &str = "UPDATE webhook_deliveries d
    SET state = 'pending', next_attempt_at = now(), attempt_base = d.attempts,
        locked_by = NULL, locked_until = NULL, updated_at = now()
    FROM unnest($1::bigint[], $2::bigint[]) AS r(event_id, endpoint_id)
    WHERE d.event_id = r.event_id AND d.endpoint_id = r.endpoint_id AND d.state = 'dead'
    RETURNING d.event_id, d.endpoint_id";

/// Makes the given dead deliveries due again; returns those that were dead (others
/// are left as they are).
pub async fn retry_dead(
    client: &impl GenericClient,
    ids: &[DeliveryId],
) -> Result<Vec<DeliveryId>> {
    let events: Vec<i64> = ids.iter().map(|id| id.event_id).collect();
    let endpoints: Vec<i64> = ids.iter().map(|id| id.endpoint_id).collect();
    let rows = client
        .query_typed(
            RETRY_DEAD,
            &[(&events, Type::INT8_ARRAY), (&endpoints, Type::INT8_ARRAY)],
        )
        .await?;
    wake(client, rows.len()).await?;
    rows.iter().map(delivery_id).collect()
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

pub(crate) const RETRY_DEAD_MATCHING: &str = "UPDATE webhook_deliveries d
    SET state = 'pending', next_attempt_at = now(), attempt_base = d.attempts,
        locked_by = NULL, locked_until = NULL, updated_at = now()
    FROM webhook_outbox o
    WHERE o.id = d.event_id AND d.state = 'dead'
      AND ($1::bigint IS NULL OR d.endpoint_id = $1)
      AND ($2::text IS NULL OR o.event_type = $2)
      AND ($3::timestamptz IS NULL OR d.updated_at >= $3)
      AND ($4::timestamptz IS NULL OR d.updated_at < $4)
    RETURNING d.event_id, d.endpoint_id";

/// Makes every dead delivery matching `filter` due again; returns them.
pub async fn retry_dead_matching(
    client: &impl GenericClient,
    filter: &DeadFilter,
) -> Result<Vec<DeliveryId>> {
    let rows = client
        .query_typed(
            RETRY_DEAD_MATCHING,
            &[
                (&filter.endpoint_id, Type::INT8),
                (&filter.event_type, Type::TEXT),
                (&filter.since, Type::TIMESTAMPTZ),
                (&filter.until, Type::TIMESTAMPTZ),
            ],
        )
        .await?;
    wake(client, rows.len()).await?;
    rows.iter().map(delivery_id).collect()
}

// A finished delivery (delivered, dead, or discarded with its endpoint's backlog)
// starts over; one still pending, in flight or parked is left alone, since it will be
// sent anyway. For a named endpoint without a
// delivery of this event (e.g. registered later), one is created.
pub(crate) const REPLAY_ONE: &str = "INSERT INTO webhook_deliveries (event_id, endpoint_id)
    SELECT $1, $2
    FROM webhook_outbox o
    WHERE o.id = $1 AND o.processed_at IS NOT NULL
    ON CONFLICT (event_id, endpoint_id) DO UPDATE
    SET state = 'pending', next_attempt_at = now(), attempt_base = webhook_deliveries.attempts,
        locked_by = NULL, locked_until = NULL, delivered_at = NULL, updated_at = now()
    WHERE webhook_deliveries.state IN ('delivered', 'dead', 'discarded')
    RETURNING event_id, endpoint_id";

pub(crate) const REPLAY_ALL: &str = "UPDATE webhook_deliveries d
    SET state = 'pending', next_attempt_at = now(), attempt_base = d.attempts,
        locked_by = NULL, locked_until = NULL, delivered_at = NULL, updated_at = now()
    WHERE d.event_id = $1 AND d.state IN ('delivered', 'dead', 'discarded')
    RETURNING d.event_id, d.endpoint_id";

/// Delivers an event again (same `webhook-id`) to one endpoint, or to every endpoint
/// it was delivered to. Returns the deliveries that were restarted.
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
    let rows = match endpoint_id {
        Some(endpoint_id) => {
            endpoint::get(client, endpoint_id).await?;
            client
                .query_typed(
                    REPLAY_ONE,
                    &[(&event_id, Type::INT8), (&endpoint_id, Type::INT8)],
                )
                .await?
        }
        None => {
            client
                .query_typed(REPLAY_ALL, &[(&event_id, Type::INT8)])
                .await?
        }
    };
    wake(client, rows.len()).await?;
    rows.iter().map(delivery_id).collect()
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
