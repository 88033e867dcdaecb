//! Endpoint health: endpoints whose attempts keep failing for too long are disabled, so
//! a dead consumer stops costing attempts; enabling one resumes its parked deliveries.
//!
//! The failure clock is kept by the settle statement (`webhook_settle`, see
//! `sql/0006_isolation_and_endpoint_health.sql`): `failing_since` is when the current
//! run of failed attempts began, `failing_until` until when that run counts as
//! ongoing: the latest retry it has scheduled, plus twelve hours. Any success ends the
//! run; a failure after `failing_until` (a silence: no attempt was due, or every
//! delivery had died) starts a new one. So `failing_since` older than the threshold
//! with `failing_until` still ahead means: no success since then, no silence, and the
//! last failure recent. Only then is an endpoint disabled; an old failure followed by
//! silence never disables.
//!
//! A 410 Gone disables the endpoint at once, in the transaction that parks the
//! delivery (see `settle.rs`).

use std::time::{Duration, SystemTime};

use tokio_postgres::GenericClient;
use tokio_postgres::types::Type;

use crate::error::Result;

/// Active endpoints whose run of failures began more than `$1` milliseconds ago and is
/// still ongoing, oldest run first.
pub const FAILING_TOO_LONG: &str = "SELECT id, failing_since
    FROM webhook_endpoints
    WHERE active AND deleted_at IS NULL
      AND failing_since < now() - $1 * interval '1 millisecond'
      AND failing_until > now()
    ORDER BY failing_since, id";

/// Disables endpoint `$1` with reason `$3` if it is still failing as
/// [`FAILING_TOO_LONG`] found it (a success or a silence since then keeps it), and
/// parks its pending deliveries, in one statement as `endpoint::disable` does. Returns
/// `(endpoints disabled, deliveries parked)`.
pub(crate) const DISABLE_IF_STILL_FAILING: &str = "WITH ep AS (
        UPDATE webhook_endpoints
        SET active = false, disabled_reason = $3, updated_at = now()
        WHERE id = $1 AND active AND deleted_at IS NULL
          AND failing_since < now() - $2 * interval '1 millisecond'
          AND failing_until > now()
        RETURNING id
    ), parked AS (
        UPDATE webhook_deliveries d
        SET state = 'parked', updated_at = now()
        FROM ep
        WHERE d.endpoint_id = ep.id AND d.state = 'pending' AND d.locked_by IS NULL
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM ep) AS disabled, (SELECT count(*) FROM parked) AS parked";

/// What one health check did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Endpoints disabled.
    pub disabled: Vec<i64>,
    /// Endpoints that were due to be disabled but could not be (each logged); the next
    /// check tries them again.
    pub failed: Vec<i64>,
}

/// Disables every endpoint whose attempts have kept failing for longer than `after`,
/// parking its pending deliveries. Each endpoint is disabled on its own: one that
/// cannot be (a lock timeout, a trigger of the operator's) is logged and reported in
/// [`HealthCheck::failed`], and the others are still disabled. Fails only if the
/// endpoints to check cannot be read.
pub async fn disable_failing(client: &impl GenericClient, after: Duration) -> Result<HealthCheck> {
    let after_ms = after.as_millis() as i64;
    let rows = client
        .query_typed(FAILING_TOO_LONG, &[(&after_ms, Type::INT8)])
        .await?;
    let mut check = HealthCheck::default();
    for row in rows {
        let id: i64 = row.try_get("id")?;
        let since: SystemTime = row.try_get("failing_since")?;
        let reason = format!(
            "failing every attempt since {}",
            humantime::format_rfc3339_seconds(since)
        );
        let disabled = client
            .query_typed_one(
                DISABLE_IF_STILL_FAILING,
                &[
                    (&id, Type::INT8),
                    (&after_ms, Type::INT8),
                    (&reason, Type::TEXT),
                ],
            )
            .await;
        let counts = disabled.and_then(|row| {
            Ok((
                row.try_get::<_, i64>("disabled")?,
                row.try_get::<_, i64>("parked")?,
            ))
        });
        match counts {
            Ok((disabled, parked)) if disabled > 0 => {
                tracing::warn!(endpoint_id = id, parked, %reason, "endpoint disabled automatically");
                check.disabled.push(id);
            }
            // A success, a silence or an operator got there first.
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(endpoint_id = id, error = %e, "disabling a failing endpoint failed; the next check tries again");
                check.failed.push(id);
            }
        }
    }
    Ok(check)
}

/// Parked deliveries whose endpoint is active again. Enabling an endpoint resumes its
/// parked deliveries in the same statement, and a park is written only while the
/// endpoint is closed, but a park committed in the instant between the two (a claim
/// that fanned out to the endpoint while it was disabled, a settle that parked a
/// delivery) can still slip through; this sweep (run every few seconds, through the
/// small parked index) makes sure no delivery stays parked under an open endpoint. A
/// delivery parked by a 410 Gone is no exception: its endpoint was disabled in the same
/// transaction, so an active endpoint over it has been enabled since.
pub const RESUME_STRANDED: &str = "UPDATE webhook_deliveries d
    SET state = 'pending', next_attempt_at = now(), updated_at = now()
    FROM webhook_endpoints e
    WHERE d.state = 'parked'
      AND e.id = d.endpoint_id AND e.active AND e.deleted_at IS NULL";

/// Resumes deliveries left parked under an active endpoint; returns how many.
pub async fn resume_stranded(client: &impl GenericClient) -> Result<u64> {
    Ok(client.execute_typed(RESUME_STRANDED, &[]).await?)
}
