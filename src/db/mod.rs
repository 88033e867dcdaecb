//! Connections to PostgreSQL. Every connection outboxd opens, pooled or not,
//! dispatcher or operator, is opened as libpq would open it from the same connection
//! string (URL or key=value form, TLS with libpq's `sslmode`, several hosts), with the
//! session settings outboxd relies on.
//!
//! Public: [`connect`] for one connection (migrations, producers, the operator
//! operations), [`admin_pool`] for a small pool of them (the admin API, the status
//! server). The dispatcher opens its own pool and LISTEN session.

internal!(conninfo, connector, session, tls);
internal_use!(connector::{Connector, pool}, session::Session);

use std::time::Duration;

use tokio_postgres::Client;

use crate::error::Result;

/// A pool of operator connections, as [`admin_pool`] makes.
pub type Pool = bb8::Pool<Manager>;

/// A connection checked out of a [`Pool`] for as long as its holder likes.
pub(crate) type PooledConnection = bb8::PooledConnection<'static, Manager>;

/// Makes a [`Pool`]'s connections. A connection is checked only by
/// the query that uses it (no round trip on checkout); a broken one is replaced.
#[derive(Debug, Clone)]
pub struct Manager(Connector);

impl bb8::ManageConnection for Manager {
    type Connection = Client;
    type Error = tokio_postgres::Error;

    async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        self.0.connect().await
    }

    async fn is_valid(&self, conn: &mut Client) -> Result<(), tokio_postgres::Error> {
        conn.simple_query("").await.map(|_| ())
    }

    fn has_broken(&self, conn: &mut Client) -> bool {
        conn.is_closed()
    }
}

/// A small pool for administrative work (the admin API, the status server), with
/// operator session settings.
pub async fn admin_pool(database_url: &str) -> Result<Pool> {
    let connector = Connector::new(database_url, Session::Operator)?;
    pool(&connector, 2).await
}

/// [`admin_pool`] that opens its connections when they are first needed, so that it
/// can be made while the database is not up yet (the status server starts first).
pub fn admin_pool_lazy(database_url: &str) -> Result<Pool> {
    let connector = Connector::new(database_url, Session::Operator)?;
    Ok(bb8::Pool::builder()
        .max_size(2)
        .test_on_check_out(false)
        .connection_timeout(Duration::from_secs(10))
        .build_unchecked(Manager(connector)))
}

/// One unpooled operator connection (migrations, the CLI, an application enqueueing),
/// driven by a background task that ends with it.
pub async fn connect(database_url: &str) -> Result<Client> {
    let connector = Connector::new(database_url, Session::Operator)?;
    Ok(connector.connect().await?)
}
