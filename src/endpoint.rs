//! The endpoint registry: where events go, with which secret, for which event types.
//!
//! Input is validated here, before it reaches the table, so a bad URL or secret is
//! refused at registration rather than discovered at delivery time.

use std::time::SystemTime;

use tokio_postgres::GenericClient;
use tokio_postgres::types::Type;

pub use crate::error::InvalidEndpoint;
use crate::error::{Error, Result};
use crate::sign::Secret;

/// Longest URL accepted; longer ones are almost certainly a mistake.
pub const MAX_URL_LEN: usize = 2048;

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
}

/// Changes to an endpoint; `None` leaves a field as it is.
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
}

impl std::fmt::Debug for NewEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewEndpoint")
            .field("url_bytes", &self.url.len())
            .field("event_types", &self.event_types)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("description", &self.description)
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

pub(crate) const INSERT_ENDPOINT: &str =
    "INSERT INTO webhook_endpoints (url, secret, event_types, description)
     VALUES ($1, $2, $3, $4)
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
                AS previous_secret_expires_at
     FROM webhook_endpoints
     WHERE deleted_at IS NULL";

/// Registers an endpoint; returns it with its secret (generated when not given). The
/// secret is shown only here, so the caller must hand it to the consumer now.
pub async fn add(client: &impl GenericClient, new: NewEndpoint) -> Result<(Endpoint, String)> {
    validate_url(&new.url)?;
    for filter in &new.event_types {
        validate_filter(filter)?;
    }
    let secret = given_or_generated(new.secret)?;
    let row = client
        .query_typed_one(
            INSERT_ENDPOINT,
            &[
                (&new.url, Type::TEXT),
                (&secret, Type::TEXT),
                (&new.event_types, Type::TEXT_ARRAY),
                (&new.description, Type::TEXT),
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
// of them is sent, and every event fanned out after it is.
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
    )
    SELECT (SELECT count(*) FROM ep) AS endpoints, (SELECT count(*) FROM discarded) AS deliveries";

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

/// Resumes an endpoint without its backlog: its parked deliveries become `discarded`
/// and are never sent (unless replayed one by one); events fanned out from now on are
/// delivered. Returns how many deliveries were discarded.
pub async fn enable_discarding_backlog(client: &impl GenericClient, id: i64) -> Result<u64> {
    let row = client
        .query_typed_one(ENABLE_DISCARDING_BACKLOG, &[(&id, Type::INT8)])
        .await?;
    counted(row, id)
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
    let found = client
        .query_typed_opt(
            UPDATE_FIELDS,
            &[
                (&id, Type::INT8),
                (&change.url, Type::TEXT),
                (&change.event_types, Type::TEXT_ARRAY),
                (&change.description, Type::TEXT),
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
