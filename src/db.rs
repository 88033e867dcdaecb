//! Connections: the bb8 pool every query goes through, and plain connections for the
//! few places that must not share a pooled session (the LISTEN connection, migrations).

use std::time::Duration;

use bb8_postgres::PostgresConnectionManager;
use tokio_postgres::{Client, NoTls};

use crate::error::Result;

/// The connection pool the dispatcher and the admin functions use.
pub type Pool = bb8::Pool<PostgresConnectionManager<NoTls>>;

/// Parses a `DATABASE_URL` (URL or key=value form).
pub fn parse_url(database_url: &str) -> Result<tokio_postgres::Config> {
    Ok(database_url.parse::<tokio_postgres::Config>()?)
}

/// A pool for the dispatcher's own work.
///
/// Its sessions run with `synchronous_commit = off`: losing the last few claims or
/// outcomes in a database crash means a redelivery (at-least-once allows it), never a
/// lost event, because the producers' commits keep their own durability. Connections
/// are not tested on checkout (that would cost a round trip per query); a broken one is
/// noticed by the query that uses it and replaced.
///
/// Without `startup_options` (behind a transaction-mode pooler, which refuses or drops
/// them) the settings must come from the role or database (`ALTER ROLE ... SET`):
/// [`crate::session::check`] says which are missing.
pub async fn dispatcher_pool(database_url: &str, size: u32, startup_options: bool) -> Result<Pool> {
    let mut config = parse_url(database_url)?;
    if startup_options {
        config.options("-c synchronous_commit=off");
    }
    config.application_name("outboxd");
    build_pool(config, size).await
}

/// A small pool for administrative commands; default session settings.
pub async fn admin_pool(database_url: &str) -> Result<Pool> {
    let mut config = parse_url(database_url)?;
    config.application_name("outboxd-admin");
    build_pool(config, 2).await
}

/// [`admin_pool`] that opens its connections when they are first needed, so that it
/// can be made while the database is not up yet (the status server starts first).
pub fn admin_pool_lazy(database_url: &str) -> Result<Pool> {
    let mut config = parse_url(database_url)?;
    config.application_name("outboxd-admin");
    config.connect_timeout(Duration::from_secs(10));
    config.keepalives_idle(Duration::from_secs(30));
    Ok(bb8::Pool::builder()
        .max_size(2)
        .test_on_check_out(false)
        .connection_timeout(Duration::from_secs(10))
        .build_unchecked(PostgresConnectionManager::new(config, NoTls)))
}

async fn build_pool(mut config: tokio_postgres::Config, size: u32) -> Result<Pool> {
    config.connect_timeout(Duration::from_secs(10));
    config.keepalives_idle(Duration::from_secs(30));
    let manager = PostgresConnectionManager::new(config, NoTls);
    let pool = bb8::Pool::builder()
        .max_size(size)
        .test_on_check_out(false)
        .connection_timeout(Duration::from_secs(10))
        .build(manager)
        .await?;
    Ok(pool)
}

/// One unpooled connection, driven by a background task that ends with it.
pub async fn connect(database_url: &str) -> Result<Client> {
    let mut config = parse_url(database_url)?;
    config.connect_timeout(Duration::from_secs(10));
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "database connection closed");
        }
    });
    Ok(client)
}
