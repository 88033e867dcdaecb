//! The push path's receiving end: a dedicated session that LISTENs for the doorbell
//! and wakes the claim loop.
//!
//! It must be a connection of its own, never a pooled one: a pooled connection is
//! driven by a task that discards notifications, and LISTEN is session state that a
//! pool (or a transaction-mode pgbouncer) would hand to someone else. The connection
//! is driven here with `Connection::poll_message`, which yields notifications.
//!
//! Notifications are hints. While the connection is down they are lost, so every
//! (re)connect wakes the claim loop for a catch-up pass, and the poll tick remains.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::StreamExt as _;
use tokio::sync::{Notify, mpsc};
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use crate::db::Connector;
use crate::error::Result;
use crate::metrics::Metrics;

/// The channel the insert trigger notifies.
pub const CHANNEL: &str = "outboxd_wakeup";

/// Keeps a LISTEN session up until `shutdown`, calling `wake.notify_one()` on every
/// notification and after every (re)connect. Reconnects with capped exponential
/// backoff (100 ms to 10 s, jittered) for as long as it takes. Its state shows in
/// `metrics` (connected, reconnects, notifications). The session is opened by
/// `connector` (the dispatcher's: its TLS and session settings), as `outboxd-listener`
/// with TCP keepalives of its own.
pub async fn run(
    connector: Connector,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    // Keepalives notice a half-open socket (a dead server or a dropped NAT entry)
    // that would otherwise leave us listening to nothing.
    let connector = connector
        .with_application_name("outboxd-listener")
        .with_keepalives(Duration::from_secs(15), Duration::from_secs(5), 3);
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times();
    let mut delays = backoff.build();
    let mut lost_before = false;
    while !shutdown.is_cancelled() {
        let session = tokio::select! {
            s = listen(&connector, &wake, &metrics) => s,
            _ = shutdown.cancelled() => return,
        };
        match session {
            Ok(mut session) => {
                metrics.set_listener_connected(true);
                if lost_before {
                    metrics.listener_reconnected();
                }
                delays = backoff.build();
                tracing::info!(channel = CHANNEL, "listen connection established");
                // Catch up on whatever was committed while we were not listening.
                wake.notify_one();
                let lost = tokio::select! {
                    e = session.closed() => e,
                    _ = shutdown.cancelled() => None,
                };
                metrics.set_listener_connected(false);
                if shutdown.is_cancelled() {
                    return;
                }
                lost_before = true;
                match lost {
                    Some(e) => tracing::warn!(error = %e, "listen connection lost; reconnecting"),
                    None => tracing::warn!("listen connection closed; reconnecting"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "listen connection failed; retrying"),
        }
        let delay = delays.next().unwrap_or(Duration::from_secs(10));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// A live LISTEN session.
struct Session {
    // Dropping the client would close the connection.
    _client: tokio_postgres::Client,
    errors: mpsc::UnboundedReceiver<Option<tokio_postgres::Error>>,
}

impl Session {
    /// Waits until the connection ends; returns its error, if any.
    async fn closed(&mut self) -> Option<tokio_postgres::Error> {
        self.errors.recv().await.flatten()
    }
}

async fn listen(
    connector: &Connector,
    wake: &Arc<Notify>,
    metrics: &Arc<Metrics>,
) -> Result<Session> {
    let (client, mut connection) = connector.connect_raw().await?;
    let (tx, errors) = mpsc::unbounded_channel();
    let wake = Arc::clone(wake);
    let metrics = Arc::clone(metrics);
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(_)) => {
                    metrics.notification();
                    wake.notify_one();
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Some(e));
                    return;
                }
            }
        }
        let _ = tx.send(None);
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    Ok(Session {
        _client: client,
        errors,
    })
}
