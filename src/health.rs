//! Endpoint health: endpoints that fail every attempt for too long are disabled, so a
//! dead consumer stops costing attempts; enabling one resumes its parked deliveries.
//!
//! The failure clock (`webhook_endpoints.failing_since`) is kept by the settle
//! statement: set at the first failure after a success, cleared by any success. A 410
//! Gone disables the endpoint at once (see `settle.rs`).

use std::time::{Duration, SystemTime};

use tokio_postgres::GenericClient;
use tokio_postgres::types::Type;

use crate::endpoint;
use crate::error::Result;

/// Active endpoints whose failure clock started more than `$1` milliseconds ago.
pub const FAILING_TOO_LONG: &str = "SELECT id, failing_since
    FROM webhook_endpoints
    WHERE active AND deleted_at IS NULL
      AND failing_since < now() - $1 * interval '1 millisecond'";

/// Disables every endpoint that has failed every attempt for longer than `after`,
/// parking its pending deliveries, and returns their ids.
pub async fn disable_failing(client: &impl GenericClient, after: Duration) -> Result<Vec<i64>> {
    let after_ms = after.as_millis() as i64;
    let rows = client
        .query_typed(FAILING_TOO_LONG, &[(&after_ms, Type::INT8)])
        .await?;
    let mut disabled = Vec::with_capacity(rows.len());
    for row in rows {
        let id: i64 = row.try_get("id")?;
        let since: SystemTime = row.try_get("failing_since")?;
        let reason = format!(
            "failing every attempt since {}",
            humantime::format_rfc3339_seconds(since)
        );
        let parked = endpoint::disable(client, id, &reason).await?;
        tracing::warn!(endpoint_id = id, parked, %reason, "endpoint disabled automatically");
        disabled.push(id);
    }
    Ok(disabled)
}

/// Parked deliveries whose endpoint is active again. Enabling an endpoint resumes its
/// parked deliveries in the same statement, and a park is written only while the
/// endpoint is closed, but a park committed in the instant between the two can still
/// slip through; this sweep (run every few seconds, through the small parked index)
/// makes sure no delivery stays parked under an open endpoint. A delivery parked by a
/// 410 Gone is not stranded: its endpoint is being disabled by the settler right after,
/// and only an explicit enable resumes it.
pub const RESUME_STRANDED: &str = "UPDATE webhook_deliveries d
    SET state = 'pending', next_attempt_at = now(), updated_at = now()
    FROM webhook_endpoints e
    WHERE d.state = 'parked' AND d.last_status IS DISTINCT FROM 410
      AND e.id = d.endpoint_id AND e.active AND e.deleted_at IS NULL";

/// Resumes deliveries left parked under an active endpoint; returns how many.
pub async fn resume_stranded(client: &impl GenericClient) -> Result<u64> {
    Ok(client.execute_typed(RESUME_STRANDED, &[]).await?)
}
