//! The status server on `METRICS_ADDR`: Prometheus metrics, liveness and readiness.
//!
//! `/metrics` renders counters kept in memory and never queries the database, so a
//! scrape costs the database nothing. `/readyz` does check the database, since that is
//! what readiness means: reachable, migrated, able to record outcomes, and (in push
//! mode) listening. The server comes up before the database does, so that a start
//! waiting for it answers "not ready" with the reason rather than not at all.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::db::Pool;
use crate::metrics::Metrics;
use crate::schema;

/// How long `/readyz` waits for the database before answering 503: a probe stuck
/// behind a lock must not hold the health checker's request open.
const READINESS_BOUND: std::time::Duration = std::time::Duration::from_secs(5);

/// What the process still waits for before it can work: `/readyz` answers 503 with
/// it meanwhile. [`Startup::default`] waits for nothing.
#[derive(Debug, Default)]
pub struct Startup {
    waiting: Mutex<Option<String>>,
}

impl Startup {
    /// A start that is waiting for `what`.
    pub fn waiting_for(what: impl Into<String>) -> Self {
        Self {
            waiting: Mutex::new(Some(what.into())),
        }
    }

    /// Records what the start is waiting for now.
    pub fn set_waiting(&self, what: impl Into<String>) {
        *self.waiting.lock().unwrap_or_else(|e| e.into_inner()) = Some(what.into());
    }

    /// Records that the start no longer waits.
    pub fn done(&self) {
        *self.waiting.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// What the start is waiting for, if it still is.
    pub fn waiting(&self) -> Option<String> {
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// What the status routes read.
#[derive(Debug, Clone)]
pub struct StatusState {
    /// The dispatcher's metrics.
    pub metrics: Arc<Metrics>,
    /// For the readiness check.
    pub pool: Pool,
    /// Whether the dispatcher runs in push mode (then readiness needs the listener).
    pub listen: bool,
    /// What the start still waits for (the database, at first): not ready meanwhile.
    pub startup: Arc<Startup>,
}

/// `/metrics`, `/healthz` and `/readyz`.
pub fn router(state: StatusState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(state)
}

/// Serves [`router`] on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: StatusState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn metrics(State(state): State<StatusState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, Metrics::CONTENT_TYPE)],
        state.metrics.render(),
    )
}

async fn ready(State(state): State<StatusState>) -> (StatusCode, String) {
    let checked = tokio::time::timeout(READINESS_BOUND, readiness(&state))
        .await
        .unwrap_or_else(|_| Err("the database did not answer in time".to_owned()));
    match checked {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

async fn readiness(state: &StatusState) -> Result<(), String> {
    if let Some(what) = state.startup.waiting() {
        return Err(what);
    }
    let client = state
        .pool
        .get()
        .await
        .map_err(|_| "database unreachable".to_owned())?;
    let pending = schema::pending_migrations(&client)
        .await
        .map_err(|e| match e {
            // Reachable, but not the schema this build expects: say which file.
            crate::Error::MigrationChanged { .. } => e.to_string(),
            _ => "database unreachable".to_owned(),
        })?;
    if !pending.is_empty() {
        return Err(format!("migrations pending: {}", pending.join(", ")));
    }
    crate::settle::probe(&*client)
        .await
        .map_err(|e| e.to_string())?;
    if state.listen && !state.metrics.listener_connected() {
        return Err("LISTEN session not connected".to_owned());
    }
    Ok(())
}
