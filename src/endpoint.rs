//! The endpoint registry: where events go, with which secret, for which event types.
//!
//! Input is validated here, before it reaches the table, so a bad URL or secret is
//! refused at registration rather than discovered at delivery time.

use std::ops::RangeInclusive;
use std::time::{Duration, SystemTime};

use tokio_postgres::GenericClient;
use tokio_postgres::types::Type;

pub use crate::error::InvalidEndpoint;
use crate::error::{Error, Result};
use crate::sign::Secret;

/// Longest URL accepted; longer ones are almost certainly a mistake.
pub const MAX_URL_LEN: usize = 2048;

/// Most static headers on one endpoint.
pub const MAX_HEADERS: usize = 20;
/// Longest static header name, in bytes.
pub const MAX_HEADER_NAME_LEN: usize = 256;
/// Longest static header value, in bytes.
pub const MAX_HEADER_VALUE_LEN: usize = 4096;
/// Longest per-endpoint timeout (an hour, as `WEBHOOK_HTTP_TIMEOUT_MS`).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// The values `max_in_flight` may take: concurrent requests across all dispatchers.
pub const MAX_IN_FLIGHT_RANGE: RangeInclusive<u32> = 1..=10_000;
/// The values `rate_limit` may take: requests per second across all dispatchers.
pub const RATE_LIMIT_RANGE: RangeInclusive<u32> = 1..=100_000;

/// What happens to an ordered key whose head delivery ends dead: per endpoint, it
/// overrides the dispatchers' `WEBHOOK_ORDERING_DEAD_HEAD` (docs/ordering.md, section 3).
pub use crate::config::DeadHead;

/// A header sent with every request to an endpoint, such as an API key the consumer
/// demands. Its value is treated as a secret: it is stored, sent, and never shown
/// ([`Endpoint`] carries only the names; `Debug` leaves the value out).
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticHeader {
    /// An HTTP field name (a token); not one outboxd sets (see [`is_owned_header`]).
    pub name: String,
    /// Visible ASCII, spaces and tabs.
    pub value: String,
}

impl StaticHeader {
    /// Parses `Name: value`, as the command line takes it.
    pub fn parse(text: &str) -> Result<Self, InvalidEndpoint> {
        // Without a colon, the text may be a value alone: none of it is repeated.
        let Some((name, value)) = text.split_once(':') else {
            return Err(InvalidEndpoint::Header {
                name: String::new(),
                reason: "no colon found; write it as 'Name: value'".to_owned(),
            });
        };
        Ok(Self {
            name: name.trim().to_owned(),
            value: value.trim().to_owned(),
        })
    }
}

impl std::fmt::Debug for StaticHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticHeader")
            .field("name", &self.name)
            .field("value", &"<redacted>")
            .finish()
    }
}

/// Whether outboxd sets this header itself (or HTTP framing depends on it), so that an
/// endpoint may not: the `webhook-*` signature headers, `content-type`,
/// `content-length`, `host`, `transfer-encoding` and `connection`. Case-insensitive.
pub fn is_owned_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name.starts_with("webhook-")
        || matches!(
            name.as_str(),
            "content-type" | "content-length" | "host" | "transfer-encoding" | "connection"
        )
}

/// Checks static headers: at most [`MAX_HEADERS`], each name an HTTP token of at most
/// [`MAX_HEADER_NAME_LEN`] bytes that outboxd does not own, each value visible ASCII,
/// spaces and tabs, at most [`MAX_HEADER_VALUE_LEN`] bytes. Messages name the header,
/// never the value. [`add`] and [`update`] check them; a caller may check first, to
/// refuse them before it connects.
pub fn validate_headers(headers: &[StaticHeader]) -> Result<(), InvalidEndpoint> {
    let bad = |name: &str, reason: &str| {
        Err(InvalidEndpoint::Header {
            name: name.chars().take(MAX_HEADER_NAME_LEN).collect(),
            reason: reason.to_owned(),
        })
    };
    if headers.len() > MAX_HEADERS {
        return bad(
            &headers[MAX_HEADERS].name,
            &format!("at most {MAX_HEADERS} headers per endpoint"),
        );
    }
    for StaticHeader { name, value } in headers {
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if name.is_empty() || name.len() > MAX_HEADER_NAME_LEN || !name.bytes().all(token) {
            return bad(
                name,
                "a name is 1 to 256 letters, digits or !#$%&'*+-.^_`|~",
            );
        }
        if is_owned_header(name) {
            return bad(name, "outboxd sets this header itself");
        }
        if value.len() > MAX_HEADER_VALUE_LEN {
            return bad(name, "the value is longer than 4096 bytes");
        }
        if !value
            .bytes()
            .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
        {
            return bad(
                name,
                "the value may hold only visible ASCII characters, spaces and tabs",
            );
        }
    }
    Ok(())
}

/// Checks a per-endpoint timeout: 1 ms to [`MAX_TIMEOUT`].
pub(crate) fn validate_timeout(timeout: Duration) -> Result<(), InvalidEndpoint> {
    if timeout < Duration::from_millis(1) || timeout > MAX_TIMEOUT {
        return Err(InvalidEndpoint::Timeout(format!(
            "{} ms; it must be between 1 and 3600000 ms",
            timeout.as_millis()
        )));
    }
    Ok(())
}

/// Checks a per-endpoint limit (`field` names it in the message, as the API and the
/// column do) against its range ([`MAX_IN_FLIGHT_RANGE`], [`RATE_LIMIT_RANGE`]), and
/// returns it as stored. Takes any integer so that a caller parsing one may check it
/// before narrowing it.
pub fn validate_limit(
    field: &'static str,
    value: u64,
    range: &RangeInclusive<u32>,
) -> Result<u32, InvalidEndpoint> {
    match u32::try_from(value) {
        Ok(value) if range.contains(&value) => Ok(value),
        _ => Err(InvalidEndpoint::Limit {
            field,
            value,
            min: *range.start(),
            max: *range.end(),
        }),
    }
}

/// Checks both limits of a registration or an update.
fn validate_limits(
    max_in_flight: Option<u32>,
    rate_limit: Option<u32>,
) -> Result<(), InvalidEndpoint> {
    if let Some(n) = max_in_flight {
        validate_limit("max_in_flight", n.into(), &MAX_IN_FLIGHT_RANGE)?;
    }
    if let Some(n) = rate_limit {
        validate_limit("rate_limit", n.into(), &RATE_LIMIT_RANGE)?;
    }
    Ok(())
}

/// A limit as the column stores it (validated first, so it fits).
fn limit_column(limit: u32) -> i32 {
    i32::try_from(limit).unwrap_or(i32::MAX)
}

/// `headers` as the column stores them.
fn headers_json(headers: &[StaticHeader]) -> serde_json::Value {
    headers
        .iter()
        .map(|h| serde_json::json!({ "name": h.name, "value": h.value }))
        .collect()
}

/// A timeout in whole milliseconds, as the column stores it (validated first).
fn timeout_ms(timeout: Duration) -> i32 {
    i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX)
}

/// A registered endpoint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Endpoint {
    /// Its id.
    pub id: i64,
    /// Where deliveries are POSTed.
    pub url: String,
    /// Event-type filters; empty means every event.
    pub event_types: Vec<String>,
    /// Free text for operators.
    pub description: String,
    /// Whether deliveries are sent. A disabled endpoint still gets a delivery of each
    /// new event it matches, parked until it is enabled.
    pub active: bool,
    /// Why it was disabled, if it was.
    pub disabled_reason: Option<String>,
    /// When it was registered.
    #[serde(with = "crate::time_format")]
    pub created_at: SystemTime,
    /// When its current run of failed attempts began; `None` while healthy.
    #[serde(with = "crate::time_format::option")]
    pub failing_since: Option<SystemTime>,
    /// Until when the previous secret still signs beside the current one.
    #[serde(with = "crate::time_format::option")]
    pub previous_secret_expires_at: Option<SystemTime>,
    /// The names of its static headers, in the order they are sent. Their values are
    /// never read back.
    pub headers: Vec<String>,
    /// Its request timeout in milliseconds, when it overrides `WEBHOOK_HTTP_TIMEOUT_MS`.
    pub timeout_ms: Option<u32>,
    /// Most concurrent requests to it across all dispatchers; `None`: each dispatcher
    /// sends it at most `WEBHOOK_ENDPOINT_MAX_IN_FLIGHT` at a time.
    pub max_in_flight: Option<u32>,
    /// Most requests per second to it across all dispatchers; `None`: no limit.
    pub rate_limit: Option<u32>,
    /// Its circuit breaker, as of the database's clock when it was read.
    pub circuit: Circuit,
    /// Consecutive failures of the kinds that open the circuit (timeouts, connection
    /// errors, 5xx); a success resets it.
    pub circuit_failures: u32,
    /// What a dead head of an ordered key does for this endpoint; `None`: the
    /// dispatchers' `WEBHOOK_ORDERING_DEAD_HEAD`.
    pub ordering_dead_head: Option<DeadHead>,
}

/// The state of an endpoint's circuit breaker. In JSON an object tagged by `state`:
/// `{"state":"closed"}`, `{"state":"open","until":"2026-…Z"}`, `{"state":"half_open"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Circuit {
    /// Deliveries go out as usual.
    Closed,
    /// Paused after consecutive failures (or a `Retry-After`): none of its deliveries
    /// are claimed, and none of their attempts spent, until `until`.
    Open {
        /// When the pause ends and a single probe may go out.
        #[serde(with = "crate::time_format")]
        until: SystemTime,
    },
    /// The pause is over: a single probe goes out; an answer (a 2xx, or a 4xx refusing
    /// the event) closes the circuit, an unhealthy failure opens it again for longer.
    HalfOpen,
}

/// `closed`, `open until 2026-…Z`, `half-open`: as the CLI shows it.
impl std::fmt::Display for Circuit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Closed => f.write_str("closed"),
            // PgTimestamp spells every time PostgreSQL can store (an `infinity` set by
            // hand included), where humantime's formatter would panic.
            Self::Open { until } => write!(
                f,
                "open until {}",
                crate::time_format::PgTimestamp::from_system_time(*until)
            ),
            Self::HalfOpen => f.write_str("half-open"),
        }
    }
}

/// Changes to an endpoint; `None` leaves a field as it is. `Debug` leaves out the
/// headers' values.
#[derive(Debug, Clone, Default)]
pub struct EndpointUpdate {
    /// A new URL.
    pub url: Option<String>,
    /// New filters (empty means every event).
    pub event_types: Option<Vec<String>>,
    /// A new description.
    pub description: Option<String>,
    /// Enable (`true`, resuming parked deliveries) or disable (`false`, parking them and
    /// parking the deliveries of events fanned out while it stays disabled).
    pub active: Option<bool>,
    /// New static headers, replacing all of them (empty removes them).
    pub headers: Option<Vec<StaticHeader>>,
    /// A new timeout override (`Some(None)` removes it: `WEBHOOK_HTTP_TIMEOUT_MS` applies).
    pub timeout: Option<Option<Duration>>,
    /// A new concurrency limit (`Some(None)` removes it: each dispatcher's
    /// `WEBHOOK_ENDPOINT_MAX_IN_FLIGHT` applies).
    pub max_in_flight: Option<Option<u32>>,
    /// A new rate limit in requests per second (`Some(None)` removes it).
    pub rate_limit: Option<Option<u32>>,
    /// A new dead-head policy for ordered keys (`Some(None)` removes the override:
    /// `WEBHOOK_ORDERING_DEAD_HEAD` applies). It applies to heads that end dead from
    /// now on; keys already blocked stay blocked until re-driven or discarded.
    pub ordering_dead_head: Option<Option<DeadHead>>,
}

/// What registering an endpoint takes. Its `Debug` output leaves out the secret and
/// the URL (which may carry a token of the consumer's).
#[derive(Clone, Default)]
pub struct NewEndpoint {
    /// `http` or `https` URL with a host.
    pub url: String,
    /// Event-type filters; empty means every event.
    pub event_types: Vec<String>,
    /// `whsec_…`; generated when `None`.
    pub secret: Option<String>,
    /// Free text for operators.
    pub description: String,
    /// Headers sent with every request (see [`StaticHeader`]).
    pub headers: Vec<StaticHeader>,
    /// Overrides `WEBHOOK_HTTP_TIMEOUT_MS` for this endpoint (a dispatcher still keeps
    /// every request shorter than its lease).
    pub timeout: Option<Duration>,
    /// Most concurrent requests to it across all dispatchers, in
    /// [`MAX_IN_FLIGHT_RANGE`]; `None`: each dispatcher's `WEBHOOK_ENDPOINT_MAX_IN_FLIGHT`.
    pub max_in_flight: Option<u32>,
    /// Most requests per second to it across all dispatchers, in [`RATE_LIMIT_RANGE`];
    /// `None`: no limit.
    pub rate_limit: Option<u32>,
    /// What a dead head of an ordered key does; `None`: `WEBHOOK_ORDERING_DEAD_HEAD`.
    pub ordering_dead_head: Option<DeadHead>,
}

impl std::fmt::Debug for NewEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewEndpoint")
            .field("url_bytes", &self.url.len())
            .field("event_types", &self.event_types)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("description", &self.description)
            .field("headers", &self.headers)
            .field("timeout", &self.timeout)
            .field("max_in_flight", &self.max_in_flight)
            .field("rate_limit", &self.rate_limit)
            .field("ordering_dead_head", &self.ordering_dead_head)
            .finish()
    }
}

/// Checks an endpoint URL: absolute `http`/`https` with a host, no credentials (they
/// would be stored and shown in clear), at most [`MAX_URL_LEN`] bytes.
pub(crate) fn validate_url(url: &str) -> Result<(), InvalidEndpoint> {
    let bad = |m: &str| Err(InvalidEndpoint::Url(m.to_owned()));
    if url.len() > MAX_URL_LEN {
        return bad("longer than 2048 bytes");
    }
    let parsed = match url::Url::parse(url) {
        Ok(parsed) => parsed,
        Err(e) => return Err(InvalidEndpoint::Url(format!("{e}: {url:?}"))),
    };
    if !matches!(parsed.scheme(), "http" | "https") {
        return bad("the scheme must be http or https");
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return bad("the URL has no host");
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return bad("credentials in the URL are not accepted; use the signature to authenticate");
    }
    if parsed.fragment().is_some() {
        return bad("a fragment (#...) is never sent to the server; remove it");
    }
    Ok(())
}

/// Checks an event-type filter: `*`, an exact name, or a prefix ending in `.*`. Names
/// use letters, digits and `._-:`; at most 255 bytes.
pub(crate) fn validate_filter(filter: &str) -> Result<(), InvalidEndpoint> {
    let name = filter.strip_suffix(".*").unwrap_or(filter);
    let valid_name = !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
        && !name.starts_with('.')
        && !name.ends_with('.');
    if filter == "*" || valid_name {
        Ok(())
    } else {
        Err(InvalidEndpoint::Filter(filter.to_owned()))
    }
}

pub(crate) const INSERT_ENDPOINT: &str = "INSERT INTO webhook_endpoints
         (url, secret, event_types, description, headers, timeout_ms, max_in_flight, rate_limit,
          ordering_dead_head)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
     RETURNING id";

/// A secret the caller gave, once it is known to parse, or a fresh one.
fn given_or_generated(secret: Option<String>) -> Result<String, InvalidEndpoint> {
    match secret {
        Some(secret) => {
            Secret::parse(&secret)?;
            Ok(secret)
        }
        None => Ok(Secret::generate()),
    }
}

pub(crate) const SELECT_ENDPOINTS: &str =
    "SELECT id, url, event_types, description, active, disabled_reason, created_at,
            failing_since,
            CASE WHEN previous_secret_expires_at > now() THEN previous_secret_expires_at END
                AS previous_secret_expires_at,
            -- The names only: a header's value is never read back.
            ARRAY(SELECT h->>'name' FROM jsonb_array_elements(headers) h) AS header_names,
            timeout_ms, max_in_flight, rate_limit, circuit_failures, circuit_open_until,
            ordering_dead_head,
            -- Open or half-open by the database's clock, the one the claims go by;
            -- NULL while closed.
            circuit_open_until > now() AS circuit_open
     FROM webhook_endpoints
     WHERE deleted_at IS NULL";

/// Registers an endpoint; returns it with its secret (generated when not given). The
/// secret is shown only here, so the caller must hand it to the consumer now.
pub async fn add(client: &impl GenericClient, new: NewEndpoint) -> Result<(Endpoint, String)> {
    validate_url(&new.url)?;
    for filter in &new.event_types {
        validate_filter(filter)?;
    }
    validate_headers(&new.headers)?;
    if let Some(timeout) = new.timeout {
        validate_timeout(timeout)?;
    }
    validate_limits(new.max_in_flight, new.rate_limit)?;
    let secret = given_or_generated(new.secret)?;
    let row = client
        .query_typed_one(
            INSERT_ENDPOINT,
            &[
                (&new.url, Type::TEXT),
                (&secret, Type::TEXT),
                (&new.event_types, Type::TEXT_ARRAY),
                (&new.description, Type::TEXT),
                (&headers_json(&new.headers), Type::JSONB),
                (&new.timeout.map(timeout_ms), Type::INT4),
                (&new.max_in_flight.map(limit_column), Type::INT4),
                (&new.rate_limit.map(limit_column), Type::INT4),
                (&new.ordering_dead_head.map(DeadHead::as_str), Type::TEXT),
            ],
        )
        .await?;
    let id: i64 = row.try_get("id")?;
    Ok((get(client, id).await?, secret))
}

/// One endpoint that has not been removed.
pub async fn get(client: &impl GenericClient, id: i64) -> Result<Endpoint> {
    let sql = format!("{SELECT_ENDPOINTS} AND id = $1");
    let row = client
        .query_typed_opt(&sql, &[(&id, Type::INT8)])
        .await?
        .ok_or_else(|| Error::NotFound(format!("endpoint {id}")))?;
    from_row(&row)
}

/// Every endpoint that has not been removed, oldest first.
pub async fn list(client: &impl GenericClient) -> Result<Vec<Endpoint>> {
    let sql = format!("{SELECT_ENDPOINTS} ORDER BY id");
    let rows = client.query_typed(&sql, &[]).await?;
    rows.iter().map(from_row).collect()
}

fn from_row(row: &tokio_postgres::Row) -> Result<Endpoint> {
    Ok(Endpoint {
        id: row.try_get("id")?,
        url: row.try_get("url")?,
        event_types: row.try_get("event_types")?,
        description: row.try_get("description")?,
        active: row.try_get("active")?,
        disabled_reason: row.try_get("disabled_reason")?,
        created_at: row.try_get("created_at")?,
        failing_since: row.try_get("failing_since")?,
        previous_secret_expires_at: row.try_get("previous_secret_expires_at")?,
        headers: row.try_get("header_names")?,
        timeout_ms: row
            .try_get::<_, Option<i32>>("timeout_ms")?
            .map(|ms| ms.unsigned_abs()),
        max_in_flight: row
            .try_get::<_, Option<i32>>("max_in_flight")?
            .map(i32::unsigned_abs),
        rate_limit: row
            .try_get::<_, Option<i32>>("rate_limit")?
            .map(i32::unsigned_abs),
        circuit: match (
            row.try_get::<_, Option<SystemTime>>("circuit_open_until")?,
            row.try_get::<_, Option<bool>>("circuit_open")?,
        ) {
            (None, _) => Circuit::Closed,
            (Some(until), Some(true)) => Circuit::Open { until },
            (Some(_), _) => Circuit::HalfOpen,
        },
        circuit_failures: row
            .try_get::<_, i32>("circuit_failures")?
            .try_into()
            .unwrap_or(0),
        ordering_dead_head: row
            .try_get::<_, Option<&str>>("ordering_dead_head")?
            .map(str::parse::<DeadHead>)
            .transpose()
            .map_err(Error::InvalidInput)?,
    })
}

// Disabling parks the endpoint's pending deliveries (and the dispatcher parks any it
// had claimed when it sees the endpoint closed), so they stop being claimed; while it is
// disabled, new events are fanned out to it as parked deliveries (claim::CLAIM).
// Enabling makes parked deliveries due at once, and rings the dispatchers' channel so
// they go out without waiting for a poll tick (delivered at commit, like any NOTIFY).
// Each runs in one statement so a concurrent claim sees either the old state or the
// new, never a mix; a park that slips in between is resumed by health::RESUME_STRANDED.
pub(crate) const DISABLE: &str = "WITH ep AS (
        UPDATE webhook_endpoints
        SET active = false, disabled_reason = $2, updated_at = now()
        WHERE id = $1 AND deleted_at IS NULL
        RETURNING id
    ), parked AS (
        UPDATE webhook_deliveries d
        SET state = 'parked', updated_at = now()
        FROM ep
        WHERE d.endpoint_id = ep.id AND d.state = 'pending' AND d.locked_by IS NULL
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM ep) AS endpoints, (SELECT count(*) FROM parked) AS deliveries";

pub(crate) const ENABLE: &str = "WITH ep AS (
        UPDATE webhook_endpoints
        SET active = true, disabled_reason = NULL, failing_since = NULL,
            failing_until = NULL, updated_at = now()
        WHERE id = $1 AND deleted_at IS NULL
        RETURNING id
    ), resumed AS (
        UPDATE webhook_deliveries d
        SET state = 'pending', next_attempt_at = now(), updated_at = now()
        FROM ep
        WHERE d.endpoint_id = ep.id AND d.state = 'parked'
        RETURNING 1
    ), woken AS (
        SELECT pg_notify('outboxd_wakeup', '') WHERE EXISTS (SELECT 1 FROM resumed)
    )
    SELECT (SELECT count(*) FROM ep) AS endpoints, (SELECT count(*) FROM resumed) AS deliveries,
           (SELECT count(*) FROM woken) AS woken";

// Enabling without the backlog: the endpoint's parked deliveries become `discarded`
// (final, kept apart from `dead` so that re-driving dead deliveries, the dead-letter
// gauge and its alerts never pick them up) in the statement that enables it, so none
// of them is sent, and every event fanned out after it is. The ordered deliveries
// waiting behind their key's head (`queued`) are discarded with them, and the lines'
// key rows deleted, or they would strand: a key row whose head is discarded is never
// moved on. A key row whose head is still pending (in flight when the endpoint was
// disabled, or re-driven) is kept: that head still goes out, and its settle ends the
// line. A blocked key's row goes too: its dead head stays dead (a re-drive makes it the
// head of a new line) and the key's next events flow.
//
// Two statements in one transaction, as the settle's advance: the first locks the
// endpoint's key rows in key order (the order the sequencer takes them, so the two
// cannot deadlock), waiting for a sequencer that is queueing behind one; the second,
// whose snapshot is taken after the wait, then sees every delivery that sequencer
// queued. One statement would miss them and leave them `queued` without a line.
pub(crate) const LOCK_ENDPOINT_KEYS: &str = "SELECT 1 FROM webhook_ordering_keys
    WHERE endpoint_id = $1
    ORDER BY ordering_key
    FOR UPDATE";

// The parked and the queued deliveries in two parts, each through its own partial
// index (parked, queued): one condition on both states would read neither index.
pub(crate) const ENABLE_DISCARDING_BACKLOG: &str = "WITH ep AS (
        UPDATE webhook_endpoints
        SET active = true, disabled_reason = NULL, failing_since = NULL,
            failing_until = NULL, updated_at = now()
        WHERE id = $1 AND deleted_at IS NULL
        RETURNING id
    ), discarded AS (
        UPDATE webhook_deliveries d
        SET state = 'discarded', updated_at = now()
        FROM ep
        WHERE d.endpoint_id = ep.id AND d.state = 'parked'
        RETURNING 1
    ), dropped AS (
        UPDATE webhook_deliveries d
        SET state = 'discarded', updated_at = now()
        FROM ep
        WHERE d.endpoint_id = ep.id AND d.state = 'queued'
        RETURNING 1
    ), freed AS (
        DELETE FROM webhook_ordering_keys k
        USING ep
        WHERE k.endpoint_id = ep.id
          AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d
                          WHERE d.event_id = k.head_event_id AND d.endpoint_id = k.endpoint_id
                            AND d.state = 'pending')
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM ep) AS endpoints,
           (SELECT count(*) FROM discarded) + (SELECT count(*) FROM dropped) AS deliveries,
           (SELECT count(*) FROM freed) AS keys";

pub(crate) const REMOVE: &str = "UPDATE webhook_endpoints
    SET active = false, deleted_at = now(), disabled_reason = 'removed', updated_at = now()
    WHERE id = $1 AND deleted_at IS NULL
    RETURNING id";

pub(crate) const PARK_ALL: &str = "UPDATE webhook_deliveries
    SET state = 'parked', updated_at = now()
    WHERE endpoint_id = $1 AND state = 'pending' AND locked_by IS NULL";

/// Stops deliveries to an endpoint; its pending deliveries are parked until it is
/// enabled again. Returns how many were parked.
pub async fn disable(client: &impl GenericClient, id: i64, reason: &str) -> Result<u64> {
    let row = client
        .query_typed_one(DISABLE, &[(&id, Type::INT8), (&reason, Type::TEXT)])
        .await?;
    counted(row, id)
}

/// Resumes an endpoint; its parked deliveries become due at once: those parked when it
/// was disabled (or by its 410 Gone) and those of every event fanned out to it while it
/// was disabled. Returns how many were resumed.
pub async fn enable(client: &impl GenericClient, id: i64) -> Result<u64> {
    let row = client.query_typed_one(ENABLE, &[(&id, Type::INT8)]).await?;
    counted(row, id)
}

/// Resumes an endpoint without its backlog: its parked deliveries, and the ordered
/// deliveries queued behind their keys' heads, become `discarded` and are never sent
/// (unless replayed one by one); events fanned out from now on are delivered, ordered
/// keys starting new lines. Returns how many deliveries were discarded. Runs in a
/// transaction of its own (a savepoint when `client` is a transaction).
pub async fn enable_discarding_backlog(client: &mut impl GenericClient, id: i64) -> Result<u64> {
    let tx = client.transaction().await?;
    tx.execute_typed(LOCK_ENDPOINT_KEYS, &[(&id, Type::INT8)])
        .await?;
    let row = tx
        .query_typed_one(ENABLE_DISCARDING_BACKLOG, &[(&id, Type::INT8)])
        .await?;
    let discarded = counted(row, id)?;
    tx.commit().await?;
    Ok(discarded)
}

// Closing a circuit by hand: the state a success would leave (no failures counted, no
// opening to lengthen the next one), in one statement. The row is read locked first for
// the state it leaves (PostgreSQL 15's RETURNING has only the new row); the dispatchers
// are rung when it was open or half-open, so its deliveries go out without waiting for a
// poll tick.
pub(crate) const CLOSE_CIRCUIT: &str = "WITH old AS (
        SELECT id, circuit_open_until, held_until FROM webhook_endpoints
        WHERE id = $1 AND deleted_at IS NULL
        FOR UPDATE
    ), closed AS (
        UPDATE webhook_endpoints e
        SET circuit_open_until = NULL, circuit_probe_until = NULL,
            circuit_failures = 0, circuit_opens = 0, held_until = NULL, updated_at = now()
        FROM old
        WHERE e.id = old.id
        RETURNING old.circuit_open_until AS was_open_until, old.held_until AS was_held_until
    ), released AS (
        -- The deliveries the claims held back for the circuit or the endpoint's limits
        -- (placed up to the end of the opening, or of the endpoint's line): due now.
        -- Found through the due index: an operator's command, not the hot path.
        UPDATE webhook_deliveries d
        SET next_attempt_at = now(), updated_at = now()
        FROM closed c
        WHERE d.endpoint_id = $1 AND d.state = 'pending'
          AND d.next_attempt_at > now()
          AND d.next_attempt_at <= greatest(c.was_open_until, c.was_held_until)
          AND NOT (d.locked_by IS NOT NULL AND d.locked_until > now())
        RETURNING 1
    ), woken AS (
        SELECT pg_notify('outboxd_wakeup', '')
        WHERE EXISTS (SELECT 1 FROM closed WHERE was_open_until IS NOT NULL)
           OR EXISTS (SELECT 1 FROM released)
    )
    SELECT (SELECT count(*) FROM closed) AS endpoints,
           (SELECT was_open_until IS NOT NULL FROM closed) AS was_open,
           (SELECT count(*) FROM woken) AS woken";

/// Closes an endpoint's circuit by hand, as if a probe had succeeded: its deliveries
/// held back for the circuit (or for its limits) are due again at once, and its count
/// of failures and of openings starts over. Retries scheduled later by their backoff
/// keep their time. Returns whether it was open or half-open.
pub async fn close_circuit(client: &impl GenericClient, id: i64) -> Result<bool> {
    let row = client
        .query_typed_one(CLOSE_CIRCUIT, &[(&id, Type::INT8)])
        .await?;
    let found: i64 = row.try_get("endpoints")?;
    if found == 0 {
        return Err(Error::NotFound(format!("endpoint {id}")));
    }
    Ok(row.try_get::<_, Option<bool>>("was_open")? == Some(true))
}

/// Reads `(endpoints touched, deliveries touched)` from DISABLE or ENABLE.
fn counted(row: tokio_postgres::Row, id: i64) -> Result<u64> {
    let found: i64 = row.try_get("endpoints")?;
    let deliveries: i64 = row.try_get("deliveries")?;
    if found == 0 {
        return Err(Error::NotFound(format!("endpoint {id}")));
    }
    Ok(deliveries as u64)
}

/// Removes an endpoint. Its row stays (soft delete) so delivery history keeps its
/// reference; its pending deliveries are parked for good.
pub async fn remove(client: &impl GenericClient, id: i64) -> Result<()> {
    let removed = client.query_typed_opt(REMOVE, &[(&id, Type::INT8)]).await?;
    if removed.is_none() {
        return Err(Error::NotFound(format!("endpoint {id}")));
    }
    client.execute_typed(PARK_ALL, &[(&id, Type::INT8)]).await?;
    Ok(())
}

pub(crate) const UPDATE_FIELDS: &str = "UPDATE webhook_endpoints
    SET url = coalesce($2, url),
        event_types = coalesce($3, event_types),
        description = coalesce($4, description),
        headers = coalesce($5, headers),
        -- NULL leaves the timeout as it is; 0 removes the override.
        timeout_ms = CASE WHEN $6::int4 IS NULL THEN timeout_ms ELSE nullif($6::int4, 0) END,
        -- The same for the limits (0 is never a limit: the caller has checked).
        max_in_flight = CASE WHEN $7::int4 IS NULL THEN max_in_flight
                             ELSE nullif($7::int4, 0) END,
        rate_limit = CASE WHEN $8::int4 IS NULL THEN rate_limit ELSE nullif($8::int4, 0) END,
        -- NULL leaves the policy; 'default' removes the override.
        ordering_dead_head = CASE WHEN $9::text IS NULL THEN ordering_dead_head
                                  ELSE nullif($9::text, 'default') END,
        updated_at = now()
    WHERE id = $1 AND deleted_at IS NULL
    RETURNING id";

/// Applies an update after validating it, and returns the endpoint as it now is.
/// When `active` changes too, pass a transaction to make the two steps atomic.
pub async fn update(
    client: &impl GenericClient,
    id: i64,
    change: EndpointUpdate,
) -> Result<Endpoint> {
    if let Some(url) = &change.url {
        validate_url(url)?;
    }
    for filter in change.event_types.iter().flatten() {
        validate_filter(filter)?;
    }
    if let Some(headers) = &change.headers {
        validate_headers(headers)?;
    }
    if let Some(Some(timeout)) = change.timeout {
        validate_timeout(timeout)?;
    }
    validate_limits(change.max_in_flight.flatten(), change.rate_limit.flatten())?;
    let timeout = change.timeout.map(|t| t.map_or(0, timeout_ms));
    let max_in_flight = change.max_in_flight.map(|n| n.map_or(0, limit_column));
    let rate_limit = change.rate_limit.map(|n| n.map_or(0, limit_column));
    let dead_head = change
        .ordering_dead_head
        .map(|p| p.map_or("default", DeadHead::as_str));
    let found = client
        .query_typed_opt(
            UPDATE_FIELDS,
            &[
                (&id, Type::INT8),
                (&change.url, Type::TEXT),
                (&change.event_types, Type::TEXT_ARRAY),
                (&change.description, Type::TEXT),
                (&change.headers.as_deref().map(headers_json), Type::JSONB),
                (&timeout, Type::INT4),
                (&max_in_flight, Type::INT4),
                (&rate_limit, Type::INT4),
                (&dead_head, Type::TEXT),
            ],
        )
        .await?;
    if found.is_none() {
        return Err(Error::NotFound(format!("endpoint {id}")));
    }
    match change.active {
        Some(true) => {
            enable(client, id).await?;
        }
        Some(false) => {
            disable(client, id, "disabled by operator").await?;
        }
        None => {}
    }
    get(client, id).await
}

pub(crate) const ROTATE: &str = "UPDATE webhook_endpoints
    SET previous_secret = secret,
        previous_secret_expires_at = now() + $3::bigint * interval '1 millisecond',
        secret = $2,
        updated_at = now()
    WHERE id = $1 AND deleted_at IS NULL
    RETURNING id";

/// Replaces an endpoint's secret (generating one when `new_secret` is `None`) and
/// returns it. For `grace` the old secret keeps signing beside the new one, so a
/// consumer can switch without rejecting a single delivery.
pub async fn rotate_secret(
    client: &impl GenericClient,
    id: i64,
    new_secret: Option<String>,
    grace: std::time::Duration,
) -> Result<String> {
    let secret = given_or_generated(new_secret)?;
    let grace_ms = grace.as_millis() as i64;
    let found = client
        .query_typed_opt(
            ROTATE,
            &[
                (&id, Type::INT8),
                (&secret, Type::TEXT),
                (&grace_ms, Type::INT8),
            ],
        )
        .await?;
    if found.is_none() {
        return Err(Error::NotFound(format!("endpoint {id}")));
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_urls() {
        for url in [
            "https://example.com/webhooks",
            "http://127.0.0.1:8080/hook?token=abc",
            "https://[2001:db8::1]/x",
        ] {
            validate_url(url).unwrap();
        }
    }

    #[test]
    fn refuses_unusable_urls() {
        for url in [
            "",
            "example.com/hook",
            "ftp://example.com/x",
            "file:///etc/passwd",
            "https://user:pass@example.com/",
            "https://example.com/#frag",
            "http://",
        ] {
            assert!(validate_url(url).is_err(), "{url:?} should be refused");
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN));
        assert!(validate_url(&long).is_err());
    }

    fn header(name: &str, value: &str) -> StaticHeader {
        StaticHeader {
            name: name.to_owned(),
            value: value.to_owned(),
        }
    }

    #[test]
    fn headers() {
        validate_headers(&[
            header("Authorization", "Bearer abc.def"),
            header("X-Api-Key", "k e\ty"),
            header("user-agent", ""),
        ])
        .unwrap();
        for (name, value) in [
            ("Webhook-Id", "1"),
            ("WEBHOOK-SIGNATURE", "x"),
            ("content-type", "text/plain"),
            ("Content-Length", "1"),
            ("Host", "example.com"),
            ("transfer-encoding", "chunked"),
            ("Connection", "close"),
            ("", "x"),
            ("a b", "x"),
            ("x:y", "x"),
            ("x-token", "line\r\nInjected: 1"),
            ("x-token", "caf\u{e9}"),
        ] {
            let refused = validate_headers(&[header(name, value)]).unwrap_err();
            let message = refused.to_string();
            assert!(
                value.is_empty() || value.len() < 2 || !message.contains(value),
                "{message}"
            );
        }
        let long = header("x-long", &"v".repeat(MAX_HEADER_VALUE_LEN + 1));
        assert!(validate_headers(&[long]).is_err());
        let many: Vec<_> = (0..=MAX_HEADERS)
            .map(|i| header(&format!("x-{i}"), "v"))
            .collect();
        assert!(validate_headers(&many).is_err());
        assert!(validate_headers(&many[..MAX_HEADERS]).is_ok());
    }

    #[test]
    fn headers_from_the_command_line() {
        let parsed = StaticHeader::parse("Authorization: Bearer a:b ").unwrap();
        assert_eq!(parsed, header("Authorization", "Bearer a:b"));
        assert!(StaticHeader::parse("no colon here").is_err());
        let shown = format!("{parsed:?}");
        assert!(!shown.contains("Bearer"), "{shown}");
    }

    #[test]
    fn timeouts() {
        validate_timeout(Duration::from_millis(1)).unwrap();
        validate_timeout(MAX_TIMEOUT).unwrap();
        assert!(validate_timeout(Duration::ZERO).is_err());
        assert!(validate_timeout(MAX_TIMEOUT + Duration::from_millis(1)).is_err());
    }

    #[test]
    fn limits() {
        for (field, range) in [
            ("max_in_flight", &MAX_IN_FLIGHT_RANGE),
            ("rate_limit", &RATE_LIMIT_RANGE),
        ] {
            let (min, max) = (*range.start(), *range.end());
            assert_eq!(validate_limit(field, min.into(), range), Ok(min));
            assert_eq!(validate_limit(field, max.into(), range), Ok(max));
            for bad in [0, u64::from(max) + 1, u64::from(u32::MAX) + 2, u64::MAX] {
                let refused = validate_limit(field, bad, range).unwrap_err().to_string();
                assert_eq!(
                    refused,
                    format!("invalid {field}: {bad}; it must be between {min} and {max}")
                );
            }
        }
        assert!(validate_limits(Some(10_000), Some(100_000)).is_ok());
        assert!(validate_limits(None, None).is_ok());
        assert!(validate_limits(Some(10_001), None).is_err());
        assert!(validate_limits(None, Some(0)).is_err());
    }

    #[test]
    fn circuits_in_json_and_text() {
        let until = std::time::UNIX_EPOCH + Duration::from_micros(1_800_000_000_123_456);
        for (circuit, json, text) in [
            (
                Circuit::Closed,
                serde_json::json!({ "state": "closed" }),
                "closed",
            ),
            (
                Circuit::Open { until },
                serde_json::json!({ "state": "open", "until": "2027-01-15T08:00:00.123456Z" }),
                "open until 2027-01-15T08:00:00.123456Z",
            ),
            (
                Circuit::HalfOpen,
                serde_json::json!({ "state": "half_open" }),
                "half-open",
            ),
        ] {
            assert_eq!(serde_json::to_value(circuit).unwrap(), json);
            assert_eq!(circuit.to_string(), text);
        }
        // A time set by hand past what humantime writes is still shown.
        let far = std::time::UNIX_EPOCH + Duration::from_secs(400_000_000_000);
        assert!(
            Circuit::Open { until: far }
                .to_string()
                .starts_with("open until +")
        );
    }

    #[test]
    fn filters() {
        for ok in [
            "*",
            "order.created",
            "order.*",
            "a",
            "billing:v2.invoice_paid",
        ] {
            validate_filter(ok).unwrap();
        }
        for bad in [
            "",
            ".*",
            "order.",
            ".order",
            "order*",
            "order.*.*",
            "a b",
            "é",
        ] {
            assert!(validate_filter(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
