//! Migrations: the plain SQL files in `sql/`, applied once each, in order.
//!
//! The files are embedded in the binary, so `outboxd migrate` needs nothing on disk.
//! Each file is idempotent on its own (`IF NOT EXISTS`, `CREATE OR REPLACE`), so
//! applying it by hand with `psql -f` before or after `outboxd migrate` is harmless.

use tokio_postgres::Client;

use crate::error::{Error, Result};

/// The migrations in the order they apply. Forward-only: a released file never changes,
/// a later change is a new file.
pub const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_schema.sql", include_str!("../sql/0001_schema.sql")),
    ("0002_notify.sql", include_str!("../sql/0002_notify.sql")),
    (
        "0003_operations.sql",
        include_str!("../sql/0003_operations.sql"),
    ),
    (
        "0004_doorbell_gate.sql",
        include_str!("../sql/0004_doorbell_gate.sql"),
    ),
    (
        "0005_settle_function.sql",
        include_str!("../sql/0005_settle_function.sql"),
    ),
    (
        "0006_isolation_and_endpoint_health.sql",
        include_str!("../sql/0006_isolation_and_endpoint_health.sql"),
    ),
    (
        "0007_retention_frontier.sql",
        include_str!("../sql/0007_retention_frontier.sql"),
    ),
];

/// Serializes concurrent `migrate` runs across processes: any constant works as
/// long as every outboxd uses the same one ("outboxd" in ASCII).
const MIGRATION_LOCK_KEY: i64 = 0x006f_7574_626f_7864;

const CREATE_MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS outboxd_migrations (
    name       text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

/// Applies every migration not yet recorded, each in its own transaction, under a
/// transaction-level advisory lock: two processes migrating at once apply each file
/// exactly once. Returns the names it applied (empty when already up to date).
pub async fn migrate(client: &mut Client) -> Result<Vec<&'static str>> {
    let mut applied = Vec::new();
    for &(name, sql) in MIGRATIONS {
        let tx = client.transaction().await?;
        // Held until this transaction ends; a second migrator waits here, then
        // finds the file recorded and skips it.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
            .await?;
        tx.batch_execute(CREATE_MIGRATIONS_TABLE).await?;
        let done = tx
            .query_opt("SELECT 1 FROM outboxd_migrations WHERE name = $1", &[&name])
            .await?
            .is_some();
        if done {
            tx.commit().await?;
            continue;
        }
        tx.batch_execute(sql)
            .await
            .map_err(|source| Error::Migration { name, source })?;
        tx.execute(
            "INSERT INTO outboxd_migrations (name) VALUES ($1)",
            &[&name],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(migration = name, "applied migration");
        applied.push(name);
    }
    Ok(applied)
}

/// Names of the embedded migrations not yet applied to this database. Its statements
/// are unnamed, so it works through a transaction-mode pooler (`outboxd run` and
/// `/readyz` call it).
pub async fn pending_migrations(client: &Client) -> Result<Vec<&'static str>> {
    let exists: bool = client
        .query_typed_one("SELECT to_regclass('outboxd_migrations') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(MIGRATIONS.iter().map(|(name, _)| *name).collect());
    }
    let rows = client
        .query_typed("SELECT name FROM outboxd_migrations", &[])
        .await?;
    let done: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    Ok(MIGRATIONS
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !done.iter().any(|d| d == name))
        .collect())
}
