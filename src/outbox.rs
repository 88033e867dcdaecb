//! The producer side: putting an event into `webhook_outbox` inside the caller's own
//! transaction, so the event exists if and only if the business change committed.

use std::time::SystemTime;

use tokio_postgres::GenericClient;
use tokio_postgres::types::Type;

use crate::error::{Error, Result};

/// An event to enqueue. Its `Debug` output leaves out the payload.
#[derive(Clone)]
pub struct NewEvent<'a> {
    /// Such as `order.created`; endpoints filter on it.
    pub event_type: &'a str,
    /// Delivered verbatim as the body's `data`.
    pub payload: &'a serde_json::Value,
    /// A second event with the same key is ignored (`ON CONFLICT DO NOTHING`).
    pub idempotency_key: Option<&'a str>,
    /// Not delivered before this time.
    pub deliver_after: Option<SystemTime>,
    /// Events with the same key are delivered to each endpoint one at a time, in the
    /// order their transactions committed (see the README, "Ordered delivery"). `None`:
    /// no order, delivered as soon as possible.
    pub ordering_key: Option<&'a str>,
}

impl std::fmt::Debug for NewEvent<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewEvent")
            .field("event_type", &self.event_type)
            .field("payload", &"<redacted>")
            .field("idempotency_key", &self.idempotency_key)
            .field("deliver_after", &self.deliver_after)
            .field("ordering_key", &self.ordering_key)
            .finish()
    }
}

impl<'a> NewEvent<'a> {
    /// An event with no idempotency key, deliverable at once.
    pub fn new(event_type: &'a str, payload: &'a serde_json::Value) -> Self {
        Self {
            event_type,
            payload,
            idempotency_key: None,
            deliver_after: None,
            ordering_key: None,
        }
    }

    /// The same event, delivered in order with the other events of `key`.
    pub fn with_ordering_key(mut self, key: &'a str) -> Self {
        self.ordering_key = Some(key);
        self
    }
}

// The same statement the README shows producers; ON CONFLICT DO NOTHING makes an
// idempotency key's second insert a silent no-op.
pub(crate) const INSERT_EVENT: &str =
    "INSERT INTO webhook_outbox (event_type, payload, idempotency_key, deliver_after, ordering_key)
     VALUES ($1, $2, $3, coalesce($4, now()), $5)
     ON CONFLICT DO NOTHING
     RETURNING id";

/// Enqueues an event through `client`, which may be a transaction: the event then
/// commits or rolls back with it. Returns the new event's id, or `None` when an event
/// with the same idempotency key already exists.
///
/// ```no_run
/// # async fn example(client: &mut tokio_postgres::Client) -> Result<(), outboxd::Error> {
/// let tx = client.transaction().await?;
/// // ... the business change, on the same transaction ...
/// let payload = serde_json::json!({"order_id": 42});
/// outboxd::enqueue(&tx, &outboxd::NewEvent::new("order.created", &payload)).await?;
/// tx.commit().await?;
/// # Ok(()) }
/// ```
pub async fn enqueue(client: &impl GenericClient, event: &NewEvent<'_>) -> Result<Option<i64>> {
    if event.event_type.is_empty() || event.event_type.len() > 255 {
        return Err(Error::InvalidEvent(
            "event_type must be 1 to 255 bytes".to_owned(),
        ));
    }
    if event
        .ordering_key
        .is_some_and(|key| key.is_empty() || key.chars().count() > 255)
    {
        return Err(Error::InvalidEvent(
            "ordering_key must be 1 to 255 characters".to_owned(),
        ));
    }
    let row = client
        .query_typed_opt(
            INSERT_EVENT,
            &[
                (&event.event_type, Type::TEXT),
                (event.payload, Type::JSONB),
                (&event.idempotency_key, Type::TEXT),
                (&event.deliver_after, Type::TIMESTAMPTZ),
                (&event.ordering_key, Type::TEXT),
            ],
        )
        .await?;
    Ok(row.map(|r| r.try_get("id")).transpose()?)
}
