//! `outboxd run`: the dispatcher, and beside it the status server (metrics, health) and
//! the admin API when their addresses are set.

use std::sync::Arc;

use anyhow::Context as _;
use outboxd::status::Startup;
use outboxd::{Config, Dispatcher, db, schema, status};
use tokio_util::sync::CancellationToken;

use crate::settings::Serve;
use crate::signals;
use crate::startup;

/// Runs the dispatcher until SIGTERM/SIGINT and a drain, with the servers beside it.
///
/// The servers come up first; then the start waits for the database (up to
/// `WEBHOOK_DATABASE_WAIT_MS`), with `/readyz` saying so, and checks it is migrated.
/// `listen_database_url` is the LISTEN session's own connection string, if set.
pub async fn run(
    database_url: String,
    listen_database_url: Option<String>,
    config: Config,
    serve: Serve,
) -> anyhow::Result<()> {
    let listen = config.listen;
    let database_wait = config.database_wait;
    let mut dispatcher = Dispatcher::new(database_url.clone(), config)?;
    if let Some(url) = listen_database_url {
        dispatcher = dispatcher.with_listen_database_url(url)?;
        if !listen {
            tracing::info!("WEBHOOK_LISTEN=false: WEBHOOK_LISTEN_DATABASE_URL is not used");
        }
    }
    let shutdown = CancellationToken::new();
    signals::cancel_on_signals(shutdown.clone()).context("cannot install signal handlers")?;
    let startup = Arc::new(Startup::waiting_for("waiting for the database"));

    // The servers stop only after the dispatcher has drained, so health checks and
    // metrics stay up during the drain.
    let servers_stop = CancellationToken::new();
    let mut servers = Vec::new();
    if serve.metrics_addr.is_some() || serve.admin.is_some() {
        let pool = db::admin_pool_lazy(&database_url)?;
        if let Some(addr) = serve.metrics_addr {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot bind METRICS_ADDR {addr}"))?;
            // The address bound: with port 0, the one the system chose.
            let addr = listener.local_addr().unwrap_or(addr);
            tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
            let state = status::StatusState {
                metrics: dispatcher.metrics(),
                pool: pool.clone(),
                listen,
                startup: Arc::clone(&startup),
            };
            servers.push(tokio::spawn(status::serve(
                listener,
                state,
                servers_stop.clone(),
            )));
        }
        if let Some((addr, token)) = serve.admin {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot bind ADMIN_ADDR {addr}"))?;
            let addr = listener.local_addr().unwrap_or(addr);
            tracing::info!(%addr, "serving the admin API");
            let state = outboxd::admin::AdminState::new(pool, token, serve.rotation_grace);
            servers.push(tokio::spawn(outboxd::admin::serve(
                listener,
                state,
                servers_stop.clone(),
            )));
        }
    }

    let result = async {
        let client = tokio::select! {
            client = startup::wait_for_database(&database_url, database_wait, &startup) => {
                client.with_context(|| {
                    format!(
                        "the database did not accept a connection within \
                         WEBHOOK_DATABASE_WAIT_MS ({} ms), or refused it for good",
                        database_wait.as_millis()
                    )
                })?
            }
            _ = shutdown.cancelled() => return Ok(()),
        };
        let pending = schema::pending_migrations(&client).await?;
        if !pending.is_empty() {
            anyhow::bail!(
                "the database is not migrated (pending: {}); run `outboxd migrate` first",
                pending.join(", ")
            );
        }
        drop(client);
        startup.done();
        dispatcher.run(shutdown).await?;
        Ok(())
    }
    .await;
    servers_stop.cancel();
    for server in servers {
        if let Ok(Err(e)) = server.await {
            tracing::warn!(error = %e, "a server stopped with an error");
        }
    }
    result
}
