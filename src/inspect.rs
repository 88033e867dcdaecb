//! Read-only views for operators: deliveries and events with filters and keyset
//! pagination, one delivery with its attempt history, and queue statistics. Shared by
//! the admin API and the CLI.

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use serde::Serialize;
use tokio_postgres::GenericClient;
use tokio_postgres::types::Type;

use crate::error::{Error, Result};

/// Largest page a list returns.
pub const MAX_PAGE: u32 = 1000;
/// Page size when none is asked for.
pub const DEFAULT_PAGE: u32 = 50;

/// A delivery's identity: its event and its endpoint, written `EVENT:ENDPOINT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeliveryId {
    /// The event.
    pub event_id: i64,
    /// The endpoint.
    pub endpoint_id: i64,
}

impl fmt::Display for DeliveryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.event_id, self.endpoint_id)
    }
}

impl FromStr for DeliveryId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad =
            || Error::InvalidInput(format!("{s:?} is not a delivery id (EVENT_ID:ENDPOINT_ID)"));
        let (event, endpoint) = s.split_once(':').ok_or_else(bad)?;
        Ok(Self {
            event_id: event.trim().parse().map_err(|_| bad())?,
            endpoint_id: endpoint.trim().parse().map_err(|_| bad())?,
        })
    }
}

impl Serialize for DeliveryId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The states a delivery can be in, as filters accept them. `inflight` is `pending`
/// with a live lease; `queued` is an ordered delivery waiting behind its key's head.
pub const DELIVERY_STATES: &[&str] = &[
    "pending",
    "inflight",
    "delivered",
    "dead",
    "parked",
    "discarded",
    "queued",
];

/// Reads a time as the filters' `since` and `until` are written in the admin API's
/// query strings and on the `outboxd` command line: RFC 3339, `YYYY-MM-DDTHH:MM:SS`,
/// optional fraction, then `Z` or a numeric offset such as `+02:00` (a space where an
/// unencoded `+` of a query string arrived). `None` for anything else, or a time
/// before 1970.
///
/// ```
/// let t = outboxd::inspect::parse_time("2030-01-01T01:00:00+01:00").unwrap();
/// assert_eq!(t, outboxd::inspect::parse_time("2030-01-01T00:00:00Z").unwrap());
/// assert!(outboxd::inspect::parse_time("2030-01-01").is_none());
/// ```
pub fn parse_time(text: &str) -> Option<SystemTime> {
    crate::time_format::parse_rfc3339(text)
}

/// Checks a page size: 1 to [`MAX_PAGE`], [`DEFAULT_PAGE`] when absent.
pub(crate) fn page_size(limit: Option<u32>) -> Result<u32> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(n) => Err(Error::InvalidInput(format!(
            "limit must be between 1 and {MAX_PAGE}, got {n}"
        ))),
    }
}

/// Filters for [`list_deliveries`]; every field is optional.
#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    /// One of [`DELIVERY_STATES`].
    pub state: Option<String>,
    /// Only this endpoint's deliveries.
    pub endpoint_id: Option<i64>,
    /// Only this event type (exact).
    pub event_type: Option<String>,
    /// Created at or after.
    pub since: Option<SystemTime>,
    /// Created before.
    pub until: Option<SystemTime>,
    /// Continue after this delivery (the previous page's `next_cursor`).
    pub after: Option<DeliveryId>,
    /// Page size: 1 to [`MAX_PAGE`], [`DEFAULT_PAGE`] when `None`.
    pub limit: Option<u32>,
}

/// A page of results, newest first, and the cursor of the next page if there is one.
#[derive(Debug, Clone, Serialize)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// Pass as `after` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// Builds a page from up to `limit + 1` rows: the extra row only tells that a next
    /// page exists, and the cursor is the last kept item's key.
    fn cut(mut items: Vec<T>, limit: u32, key: impl Fn(&T) -> String) -> Self {
        let next_cursor = if items.len() > limit as usize {
            items.truncate(limit as usize);
            items.last().map(key)
        } else {
            None
        };
        Self { items, next_cursor }
    }
}

/// A delivery as listed.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryView {
    /// `EVENT:ENDPOINT`.
    pub id: DeliveryId,
    /// The event.
    pub event_id: i64,
    /// The endpoint.
    pub endpoint_id: i64,
    /// The event's type.
    pub event_type: String,
    /// pending, inflight, delivered, dead, parked, discarded or queued.
    pub state: String,
    /// The event's ordering key, if it has one.
    pub ordering_key: Option<String>,
    /// Its number in its key's order (the producers' commit order); ordered deliveries
    /// only.
    pub ordering_seq: Option<i64>,
    /// Attempts made so far.
    pub attempts: i32,
    /// When the next attempt is due (pending only).
    #[serde(with = "crate::time_format::option")]
    pub next_attempt_at: Option<SystemTime>,
    /// The last HTTP status received.
    pub last_status: Option<i32>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When the delivery was created (fan-out).
    #[serde(with = "crate::time_format")]
    pub created_at: SystemTime,
    /// When it last changed.
    #[serde(with = "crate::time_format")]
    pub updated_at: SystemTime,
    /// When a 2xx was received.
    #[serde(with = "crate::time_format::option")]
    pub delivered_at: Option<SystemTime>,
}

/// One HTTP attempt. Its `Debug` output gives the response excerpt's length only.
#[derive(Clone, Serialize)]
pub struct AttemptView {
    /// Its number (1-based, counting every attempt ever made for the delivery).
    pub attempt: i32,
    /// When it started.
    #[serde(with = "crate::time_format")]
    pub started_at: SystemTime,
    /// How long it took.
    pub duration_ms: i32,
    /// The HTTP status, if the receiver answered.
    pub status_code: Option<i32>,
    /// `http_status`, `timeout`, `connect`, `network`, `refused_target`, `invalid_endpoint`; none on a 2xx.
    pub error_kind: Option<String>,
    /// A description of the failure.
    pub error: Option<String>,
    /// The first bytes of the response body.
    pub response_excerpt: Option<String>,
    /// The dispatcher that made it.
    pub worker_id: String,
}

impl fmt::Debug for AttemptView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AttemptView")
            .field("attempt", &self.attempt)
            .field("started_at", &self.started_at)
            .field("duration_ms", &self.duration_ms)
            .field("status_code", &self.status_code)
            .field("error_kind", &self.error_kind)
            .field("error", &self.error)
            .field(
                "response_excerpt_bytes",
                &self.response_excerpt.as_ref().map(String::len),
            )
            .field("worker_id", &self.worker_id)
            .finish()
    }
}

/// A delivery with its attempt history.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryDetail {
    /// The delivery.
    #[serde(flatten)]
    pub delivery: DeliveryView,
    /// Every attempt, oldest first.
    pub attempt_history: Vec<AttemptView>,
}

pub(crate) const DELIVERY_COLUMNS: &str = "d.event_id, d.endpoint_id, o.event_type,
    CASE WHEN d.state = 'pending' AND d.locked_by IS NOT NULL AND d.locked_until > now()
         THEN 'inflight' ELSE d.state END AS state,
    d.attempts,
    CASE WHEN d.state = 'pending' THEN d.next_attempt_at END AS next_attempt_at,
    d.last_status, d.last_error, d.created_at, d.updated_at, d.delivered_at,
    d.ordering_key, d.ordering_seq";

/// Newest first by (event, endpoint), which the primary key serves; each filter is
/// skipped when its parameter is NULL.
pub(crate) const LIST_DELIVERIES: &str = "SELECT {COLUMNS}
    FROM webhook_deliveries d
    JOIN webhook_outbox o ON o.id = d.event_id
    WHERE ($1::text IS NULL
           OR ($1 = 'inflight' AND d.state = 'pending' AND d.locked_by IS NOT NULL AND d.locked_until > now())
           OR ($1 = 'pending' AND d.state = 'pending' AND NOT (d.locked_by IS NOT NULL AND d.locked_until > now()))
           OR ($1 NOT IN ('inflight', 'pending') AND d.state = $1))
      AND ($2::bigint IS NULL OR d.endpoint_id = $2)
      AND ($3::text IS NULL OR o.event_type = $3)
      AND ($4::timestamptz IS NULL OR d.created_at >= $4)
      AND ($5::timestamptz IS NULL OR d.created_at < $5)
      AND ($6::bigint IS NULL OR (d.event_id, d.endpoint_id) < ($6, $7::bigint))
    ORDER BY d.event_id DESC, d.endpoint_id DESC
    LIMIT $8";

fn delivery_from_row(row: &tokio_postgres::Row) -> Result<DeliveryView> {
    let id = DeliveryId {
        event_id: row.try_get("event_id")?,
        endpoint_id: row.try_get("endpoint_id")?,
    };
    Ok(DeliveryView {
        id,
        event_id: id.event_id,
        endpoint_id: id.endpoint_id,
        event_type: row.try_get("event_type")?,
        state: row.try_get("state")?,
        ordering_key: row.try_get("ordering_key")?,
        ordering_seq: row.try_get("ordering_seq")?,
        attempts: row.try_get("attempts")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        last_status: row.try_get("last_status")?,
        last_error: row.try_get("last_error")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        delivered_at: row.try_get("delivered_at")?,
    })
}

/// Lists deliveries matching `filter`, newest first.
pub async fn list_deliveries(
    client: &impl GenericClient,
    filter: &DeliveryFilter,
) -> Result<Page<DeliveryView>> {
    if let Some(state) = &filter.state
        && !DELIVERY_STATES.contains(&state.as_str())
    {
        return Err(Error::InvalidInput(format!(
            "state must be one of {}, got {state:?}",
            DELIVERY_STATES.join(", ")
        )));
    }
    let limit = page_size(filter.limit)?;
    let sql = LIST_DELIVERIES.replace("{COLUMNS}", DELIVERY_COLUMNS);
    let (after_event, after_endpoint) = match filter.after {
        Some(id) => (Some(id.event_id), Some(id.endpoint_id)),
        None => (None, None),
    };
    let fetch = i64::from(limit) + 1;
    let rows = client
        .query_typed(
            &sql,
            &[
                (&filter.state, Type::TEXT),
                (&filter.endpoint_id, Type::INT8),
                (&filter.event_type, Type::TEXT),
                (&filter.since, Type::TIMESTAMPTZ),
                (&filter.until, Type::TIMESTAMPTZ),
                (&after_event, Type::INT8),
                (&after_endpoint, Type::INT8),
                (&fetch, Type::INT8),
            ],
        )
        .await?;
    let items = rows.iter().map(delivery_from_row).collect::<Result<_>>()?;
    Ok(Page::cut(items, limit, |d| d.id.to_string()))
}

pub(crate) const GET_DELIVERY: &str = "SELECT {COLUMNS}
    FROM webhook_deliveries d
    JOIN webhook_outbox o ON o.id = d.event_id
    WHERE d.event_id = $1 AND d.endpoint_id = $2";

pub(crate) const ATTEMPTS: &str =
    "SELECT attempt, started_at, duration_ms, status_code, error_kind, error,
           response_excerpt, worker_id
    FROM webhook_attempts
    WHERE event_id = $1 AND endpoint_id = $2
    ORDER BY attempt";

/// One delivery and its attempts.
pub async fn get_delivery(client: &impl GenericClient, id: DeliveryId) -> Result<DeliveryDetail> {
    let sql = GET_DELIVERY.replace("{COLUMNS}", DELIVERY_COLUMNS);
    let row = client
        .query_typed_opt(
            &sql,
            &[(&id.event_id, Type::INT8), (&id.endpoint_id, Type::INT8)],
        )
        .await?
        .ok_or_else(|| Error::NotFound(format!("delivery {id}")))?;
    let attempts = client
        .query_typed(
            ATTEMPTS,
            &[(&id.event_id, Type::INT8), (&id.endpoint_id, Type::INT8)],
        )
        .await?;
    Ok(DeliveryDetail {
        delivery: delivery_from_row(&row)?,
        attempt_history: attempts
            .iter()
            .map(|r| {
                Ok(AttemptView {
                    attempt: r.try_get("attempt")?,
                    started_at: r.try_get("started_at")?,
                    duration_ms: r.try_get("duration_ms")?,
                    status_code: r.try_get("status_code")?,
                    error_kind: r.try_get("error_kind")?,
                    error: r.try_get("error")?,
                    response_excerpt: r.try_get("response_excerpt")?,
                    worker_id: r.try_get("worker_id")?,
                })
            })
            .collect::<Result<_>>()?,
    })
}

/// Filters for [`list_events`].
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Only this event type (exact).
    pub event_type: Option<String>,
    /// Created at or after.
    pub since: Option<SystemTime>,
    /// Created before.
    pub until: Option<SystemTime>,
    /// Continue after this event id (the previous page's `next_cursor`).
    pub after: Option<i64>,
    /// Page size: 1 to [`MAX_PAGE`], [`DEFAULT_PAGE`] when `None`.
    pub limit: Option<u32>,
}

/// An event as stored. Its `Debug` output leaves out the payload.
#[derive(Clone, Serialize)]
pub struct EventView {
    /// Its id (the `webhook-id` header).
    pub id: i64,
    /// Its type.
    pub event_type: String,
    /// Its payload.
    pub payload: serde_json::Value,
    /// Its idempotency key, if it has one.
    pub idempotency_key: Option<String>,
    /// When it was written.
    #[serde(with = "crate::time_format")]
    pub created_at: SystemTime,
    /// Not delivered before this.
    #[serde(with = "crate::time_format")]
    pub deliver_after: SystemTime,
    /// When it was fanned out; absent while pending.
    #[serde(with = "crate::time_format::option")]
    pub processed_at: Option<SystemTime>,
}

impl fmt::Debug for EventView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventView")
            .field("id", &self.id)
            .field("event_type", &self.event_type)
            .field("payload", &"<redacted>")
            .field("idempotency_key", &self.idempotency_key)
            .field("created_at", &self.created_at)
            .field("deliver_after", &self.deliver_after)
            .field("processed_at", &self.processed_at)
            .finish()
    }
}

pub(crate) const LIST_EVENTS: &str =
    "SELECT id, event_type, payload, idempotency_key, created_at, deliver_after,
           processed_at
    FROM webhook_outbox
    WHERE ($1::text IS NULL OR event_type = $1)
      AND ($2::timestamptz IS NULL OR created_at >= $2)
      AND ($3::timestamptz IS NULL OR created_at < $3)
      AND ($4::bigint IS NULL OR id < $4)
    ORDER BY id DESC
    LIMIT $5";

fn event_from_row(r: &tokio_postgres::Row) -> Result<EventView> {
    Ok(EventView {
        id: r.try_get("id")?,
        event_type: r.try_get("event_type")?,
        payload: r.try_get("payload")?,
        idempotency_key: r.try_get("idempotency_key")?,
        created_at: r.try_get("created_at")?,
        deliver_after: r.try_get("deliver_after")?,
        processed_at: r.try_get("processed_at")?,
    })
}

/// Lists events matching `filter`, newest first.
pub async fn list_events(
    client: &impl GenericClient,
    filter: &EventFilter,
) -> Result<Page<EventView>> {
    let limit = page_size(filter.limit)?;
    let fetch = i64::from(limit) + 1;
    let rows = client
        .query_typed(
            LIST_EVENTS,
            &[
                (&filter.event_type, Type::TEXT),
                (&filter.since, Type::TIMESTAMPTZ),
                (&filter.until, Type::TIMESTAMPTZ),
                (&filter.after, Type::INT8),
                (&fetch, Type::INT8),
            ],
        )
        .await?;
    let items = rows.iter().map(event_from_row).collect::<Result<_>>()?;
    Ok(Page::cut(items, limit, |e| e.id.to_string()))
}

pub(crate) const GET_EVENT: &str =
    "SELECT id, event_type, payload, idempotency_key, created_at, deliver_after, processed_at
     FROM webhook_outbox WHERE id = $1";

/// One event.
pub async fn get_event(client: &impl GenericClient, id: i64) -> Result<EventView> {
    let row = client
        .query_typed_opt(GET_EVENT, &[(&id, Type::INT8)])
        .await?
        .ok_or_else(|| Error::NotFound(format!("event {id}")))?;
    event_from_row(&row)
}

/// Queue statistics, as `outboxd stats` shows them.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// Deliveries by state (`pending`, `inflight`, `parked`, `dead`, `delivered`,
    /// `queued`) and `unprocessed` outbox rows not yet fanned out.
    pub depth: std::collections::BTreeMap<String, i64>,
    /// Age of the oldest event still waiting for fan-out or delivery, in seconds.
    pub oldest_pending_age_seconds: f64,
    /// Attempts in the last hour that succeeded.
    pub delivered_last_hour: i64,
    /// Attempts in the last hour that failed.
    pub failed_last_hour: i64,
    /// The same per endpoint.
    pub endpoints: Vec<EndpointStats>,
}

/// Per-endpoint statistics.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointStats {
    /// The endpoint.
    pub endpoint_id: i64,
    /// Its URL.
    pub url: String,
    /// Whether it is active.
    pub active: bool,
    /// Deliveries waiting (including in flight).
    pub pending: i64,
    /// Dead deliveries.
    pub dead: i64,
    /// Parked deliveries.
    pub parked: i64,
    /// Successful attempts in the last hour.
    pub delivered_last_hour: i64,
    /// Failed attempts in the last hour.
    pub failed_last_hour: i64,
    /// Ordered deliveries waiting behind their key's head.
    pub queued: i64,
    /// Ordered keys with a line for it (a head pending, in flight, parked or blocked).
    pub ordering_keys: i64,
    /// Ordered keys blocked behind a dead head (the `block` policy), waiting for an
    /// operator to re-drive or discard it.
    pub blocked_keys: i64,
    /// When the longest-blocked of them was blocked.
    #[serde(with = "crate::time_format::option")]
    pub oldest_blocked_since: Option<SystemTime>,
}

pub(crate) const STATS_DEPTH: &str = "SELECT
    count(*) FILTER (WHERE state = 'pending' AND NOT (locked_by IS NOT NULL AND locked_until > now()))
        AS pending,
    count(*) FILTER (WHERE state = 'pending' AND locked_by IS NOT NULL AND locked_until > now())
        AS inflight,
    count(*) FILTER (WHERE state = 'parked') AS parked,
    count(*) FILTER (WHERE state = 'dead') AS dead,
    count(*) FILTER (WHERE state = 'delivered') AS delivered,
    count(*) FILTER (WHERE state = 'queued') AS queued,
    -- Ordered events wait in the sequencer's log until fanned out.
    (SELECT count(*) FROM webhook_outbox WHERE processed_at IS NULL AND ordering_key IS NULL)
        + (SELECT count(*) FROM webhook_ordering_log) AS unprocessed,
    extract(epoch FROM now() - least(
        min(created_at) FILTER (WHERE state = 'pending'),
        (SELECT min(created_at) FROM webhook_outbox
          WHERE processed_at IS NULL AND ordering_key IS NULL AND deliver_after <= now()),
        (SELECT o.created_at FROM webhook_ordering_log l
          JOIN webhook_outbox o ON o.id = l.event_id ORDER BY l.seq LIMIT 1)))::float8
        AS oldest_pending_age_seconds
    FROM webhook_deliveries";

// Last-hour attempts through the BRIN index on started_at; per-endpoint queue counts
// through the partial indexes on pending, parked and dead.
pub(crate) const STATS_ENDPOINTS: &str = "WITH recent AS (
        SELECT endpoint_id,
               count(*) FILTER (WHERE error_kind IS NULL) AS ok,
               count(*) FILTER (WHERE error_kind IS NOT NULL) AS failed
        FROM webhook_attempts
        WHERE started_at > now() - interval '1 hour'
        GROUP BY endpoint_id
    ), open AS (
        SELECT endpoint_id,
               count(*) FILTER (WHERE state = 'pending') AS pending,
               count(*) FILTER (WHERE state = 'parked') AS parked,
               count(*) FILTER (WHERE state = 'dead') AS dead,
               count(*) FILTER (WHERE state = 'queued') AS queued
        FROM webhook_deliveries
        WHERE state IN ('pending', 'parked', 'dead', 'queued')
        GROUP BY endpoint_id
    ), lines AS (
        -- A row per key with a line; the blocked ones are few and indexed apart.
        SELECT endpoint_id, count(*) AS keys,
               count(*) FILTER (WHERE blocked_since IS NOT NULL) AS blocked,
               min(blocked_since) AS oldest_blocked_since
        FROM webhook_ordering_keys
        GROUP BY endpoint_id
    )
    SELECT e.id, e.url, e.active,
           coalesce(open.pending, 0) AS pending, coalesce(open.dead, 0) AS dead,
           coalesce(open.parked, 0) AS parked, coalesce(open.queued, 0) AS queued,
           coalesce(recent.ok, 0) AS delivered_last_hour,
           coalesce(recent.failed, 0) AS failed_last_hour,
           coalesce(lines.keys, 0) AS ordering_keys, coalesce(lines.blocked, 0) AS blocked_keys,
           lines.oldest_blocked_since
    FROM webhook_endpoints e
    LEFT JOIN open ON open.endpoint_id = e.id
    LEFT JOIN recent ON recent.endpoint_id = e.id
    LEFT JOIN lines ON lines.endpoint_id = e.id
    WHERE e.deleted_at IS NULL
    ORDER BY e.id";

/// Reads the queue statistics. Counts every delivery row, so on a very large history it
/// takes as long as a scan of the deliveries table: meant for operators, not scrapes.
pub async fn stats(client: &impl GenericClient) -> Result<Stats> {
    let row = client.query_typed_one(STATS_DEPTH, &[]).await?;
    let mut depth = std::collections::BTreeMap::new();
    for state in [
        "pending",
        "inflight",
        "parked",
        "dead",
        "delivered",
        "queued",
        "unprocessed",
    ] {
        depth.insert(state.to_owned(), row.try_get::<_, i64>(state)?);
    }
    let oldest: Option<f64> = row.try_get("oldest_pending_age_seconds")?;
    let oldest = oldest.unwrap_or(0.0).max(0.0);
    let endpoints = client
        .query_typed(STATS_ENDPOINTS, &[])
        .await?
        .iter()
        .map(|r| {
            Ok(EndpointStats {
                endpoint_id: r.try_get("id")?,
                url: r.try_get("url")?,
                active: r.try_get("active")?,
                pending: r.try_get("pending")?,
                dead: r.try_get("dead")?,
                parked: r.try_get("parked")?,
                delivered_last_hour: r.try_get("delivered_last_hour")?,
                failed_last_hour: r.try_get("failed_last_hour")?,
                queued: r.try_get("queued")?,
                ordering_keys: r.try_get("ordering_keys")?,
                blocked_keys: r.try_get("blocked_keys")?,
                oldest_blocked_since: r.try_get("oldest_blocked_since")?,
            })
        })
        .collect::<Result<Vec<EndpointStats>>>()?;
    Ok(Stats {
        depth,
        oldest_pending_age_seconds: oldest,
        delivered_last_hour: endpoints.iter().map(|e| e.delivered_last_hour).sum(),
        failed_last_hour: endpoints.iter().map(|e| e.failed_last_hour).sum(),
        endpoints,
    })
}

/// Which blocked keys [`list_blocked`] lists.
#[derive(Debug, Clone, Default)]
pub struct BlockedFilter {
    /// The endpoint.
    pub endpoint_id: i64,
    /// Continue after this key (the previous page's `next_cursor`).
    pub after: Option<String>,
    /// Page size: 1 to [`MAX_PAGE`], [`DEFAULT_PAGE`] when `None`.
    pub limit: Option<u32>,
}

/// An ordered key blocked behind a dead head, for one endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct BlockedKey {
    /// The key.
    pub ordering_key: String,
    /// Its dead head: re-drive it or discard it to move the key on.
    pub head: DeliveryId,
    /// The head's event.
    pub head_event_id: i64,
    /// The head's number in the key's order.
    pub head_seq: i64,
    /// When the head ended dead and the key stopped.
    #[serde(with = "crate::time_format")]
    pub blocked_since: SystemTime,
    /// Deliveries of the key waiting behind the head.
    pub queued: i64,
}

/// By key, from the key table's primary key (endpoint, key); the queued count through the
/// queued index, one range per key listed.
pub(crate) const LIST_BLOCKED: &str = "SELECT k.ordering_key, k.head_event_id, k.head_seq,
           k.blocked_since,
           (SELECT count(*) FROM webhook_deliveries d
            WHERE d.state = 'queued' AND d.endpoint_id = k.endpoint_id
              AND d.ordering_key = k.ordering_key) AS queued
    FROM webhook_ordering_keys k
    WHERE k.endpoint_id = $1 AND k.blocked_since IS NOT NULL
      AND ($2::text IS NULL OR k.ordering_key > $2)
    ORDER BY k.ordering_key
    LIMIT $3";

/// An endpoint's blocked keys, by key. NotFound if the endpoint does not exist.
pub async fn list_blocked(
    client: &impl GenericClient,
    filter: &BlockedFilter,
) -> Result<Page<BlockedKey>> {
    let limit = page_size(filter.limit)?;
    crate::endpoint::get(client, filter.endpoint_id).await?;
    let fetch = i64::from(limit) + 1;
    let rows = client
        .query_typed(
            LIST_BLOCKED,
            &[
                (&filter.endpoint_id, Type::INT8),
                (&filter.after, Type::TEXT),
                (&fetch, Type::INT8),
            ],
        )
        .await?;
    let items = rows
        .iter()
        .map(|r| {
            let head_event_id: i64 = r.try_get("head_event_id")?;
            Ok(BlockedKey {
                ordering_key: r.try_get("ordering_key")?,
                head: DeliveryId {
                    event_id: head_event_id,
                    endpoint_id: filter.endpoint_id,
                },
                head_event_id,
                head_seq: r.try_get("head_seq")?,
                blocked_since: r.try_get("blocked_since")?,
                queued: r.try_get("queued")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Page::cut(items, limit, |k| k.ordering_key.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_ids_round_trip() {
        let id: DeliveryId = "42:7".parse().unwrap();
        assert_eq!(
            id,
            DeliveryId {
                event_id: 42,
                endpoint_id: 7
            }
        );
        assert_eq!(id.to_string(), "42:7");
        for bad in ["", "42", "42:", ":7", "a:b", "42:7:1"] {
            assert!(bad.parse::<DeliveryId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn page_sizes_are_bounded() {
        assert_eq!(page_size(None).unwrap(), DEFAULT_PAGE);
        assert_eq!(page_size(Some(1)).unwrap(), 1);
        assert_eq!(page_size(Some(MAX_PAGE)).unwrap(), MAX_PAGE);
        assert!(page_size(Some(0)).is_err());
        assert!(page_size(Some(MAX_PAGE + 1)).is_err());
    }
}
