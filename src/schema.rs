//! Migrations: the plain SQL files in `sql/`, applied once each, in order, and checked
//! against what was applied.
//!
//! The files are embedded in the binary, so `outboxd migrate` needs nothing on disk.
//! Each file is idempotent on its own (`IF NOT EXISTS`, `CREATE OR REPLACE`), so
//! applying it by hand with `psql -f` before or after `outboxd migrate` is harmless.
//!
//! `outboxd_migrations` records each applied file's SHA-256. A released file never
//! changes (a change is a new file), so a recorded checksum that differs from this
//! build's file means the schema is not the one this build expects: [`migrate`] and
//! [`pending_migrations`] (which `outboxd run` and `/readyz` call) refuse it with
//! [`Error::MigrationChanged`], naming the file.
//!
//! Databases migrated before checksums were recorded have none: the next [`migrate`]
//! records this build's checksums for them, trusting that the files applied then were
//! these (it cannot know better: nothing recorded what was applied), and logs which
//! ones it trusted. A file applied by hand is recorded by the next `migrate` the same
//! way. From then on any change is caught.

use sha2::{Digest, Sha256};
use tokio_postgres::Client;
use tokio_postgres::types::Type;

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
    (
        "0009_endpoint_headers_timeout.sql",
        include_str!("../sql/0009_endpoint_headers_timeout.sql"),
    ),
    (
        "0010_operational_events.sql",
        include_str!("../sql/0010_operational_events.sql"),
    ),
    (
        "0011_endpoint_limits_and_circuit.sql",
        include_str!("../sql/0011_endpoint_limits_and_circuit.sql"),
    ),
    (
        "0012_endpoint_routing.sql",
        include_str!("../sql/0012_endpoint_routing.sql"),
    ),
    (
        "0013_ordered_delivery.sql",
        include_str!("../sql/0013_ordered_delivery.sql"),
    ),
    (
        "0014_ordering_advance_by_key.sql",
        include_str!("../sql/0014_ordering_advance_by_key.sql"),
    ),
];

/// The SHA-256 of a migration's text as recorded in `outboxd_migrations.checksum`
/// (lowercase hex of the file's bytes, exactly as embedded).
pub(crate) fn checksum(sql: &str) -> String {
    Sha256::digest(sql.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Serializes concurrent `migrate` runs across processes: any constant works as
/// long as every outboxd uses the same one ("outboxd" in ASCII).
const MIGRATION_LOCK_KEY: i64 = 0x006f_7574_626f_7864;

/// Held until the transaction ends; a second migrator waits here, then finds the file
/// recorded and skips it.
pub(crate) const LOCK_MIGRATIONS: &str = "SELECT pg_advisory_xact_lock($1)";

/// `checksum` is nullable and has no default: rows written by an older outboxd (which
/// inserts only the name) stay valid, and adding the column to an existing table is a
/// catalog change that rewrites nothing.
pub(crate) const CREATE_MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS outboxd_migrations (
    name       text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now(),
    checksum   text
)";

/// Whether the table (created by an older outboxd) still lacks the column. Checked
/// first because even `ADD COLUMN IF NOT EXISTS` takes an ACCESS EXCLUSIVE lock, which
/// would queue the readiness checks of running dispatchers on every `migrate`.
pub(crate) const HAS_CHECKSUM_COLUMN: &str = "SELECT EXISTS (
    SELECT 1 FROM pg_attribute
     WHERE attrelid = to_regclass('outboxd_migrations')
       AND attname = 'checksum' AND NOT attisdropped
) AS present";

/// Older dispatchers keep working: they never name the column.
pub(crate) const ADD_CHECKSUM_COLUMN: &str =
    "ALTER TABLE outboxd_migrations ADD COLUMN IF NOT EXISTS checksum text";

pub(crate) const RECORDED_CHECKSUM: &str =
    "SELECT checksum FROM outboxd_migrations WHERE name = $1";

pub(crate) const RECORD_MIGRATION: &str =
    "INSERT INTO outboxd_migrations (name, checksum) VALUES ($1, $2)";

/// Only where none was recorded: a recorded checksum is never overwritten.
pub(crate) const RECORD_MISSING_CHECKSUM: &str =
    "UPDATE outboxd_migrations SET checksum = $2 WHERE name = $1 AND checksum IS NULL";

pub(crate) const MIGRATIONS_TABLE_EXISTS: &str =
    "SELECT to_regclass('outboxd_migrations') IS NOT NULL AS present";

/// Through `to_jsonb` so that it reads a table an older outboxd created, without the
/// column (the checksum is then NULL), with nothing more than SELECT on the table.
pub(crate) const APPLIED_MIGRATIONS: &str =
    "SELECT name, to_jsonb(m) ->> 'checksum' AS checksum FROM outboxd_migrations m";

/// Applies every migration not yet recorded, each in its own transaction, under a
/// transaction-level advisory lock: two processes migrating at once apply each file
/// exactly once. Returns the names it applied (empty when already up to date).
///
/// Refuses with [`Error::MigrationChanged`], before applying anything after it, a file
/// whose recorded checksum differs from this build's; records the checksum of files
/// applied before checksums existed.
pub async fn migrate(client: &mut Client) -> Result<Vec<&'static str>> {
    {
        let tx = client.transaction().await?;
        tx.execute_typed(LOCK_MIGRATIONS, &[(&MIGRATION_LOCK_KEY, Type::INT8)])
            .await?;
        tx.batch_execute(CREATE_MIGRATIONS_TABLE).await?;
        let present: bool = tx
            .query_typed_one(HAS_CHECKSUM_COLUMN, &[])
            .await?
            .try_get("present")?;
        if !present {
            tx.batch_execute(ADD_CHECKSUM_COLUMN).await?;
        }
        tx.commit().await?;
    }
    let mut applied = Vec::new();
    let mut trusted = Vec::new();
    for &(name, sql) in MIGRATIONS {
        let embedded = checksum(sql);
        let tx = client.transaction().await?;
        tx.execute_typed(LOCK_MIGRATIONS, &[(&MIGRATION_LOCK_KEY, Type::INT8)])
            .await?;
        let recorded = tx
            .query_typed_opt(RECORDED_CHECKSUM, &[(&name, Type::TEXT)])
            .await?;
        if let Some(row) = recorded {
            match row.try_get::<_, Option<String>>("checksum")? {
                Some(recorded) if recorded == embedded => {}
                Some(recorded) => {
                    return Err(Error::MigrationChanged {
                        name,
                        recorded,
                        embedded,
                    });
                }
                None => {
                    tx.execute_typed(
                        RECORD_MISSING_CHECKSUM,
                        &[(&name, Type::TEXT), (&embedded, Type::TEXT)],
                    )
                    .await?;
                    trusted.push(name);
                }
            }
            tx.commit().await?;
            continue;
        }
        tx.batch_execute(sql)
            .await
            .map_err(|source| Error::Migration { name, source })?;
        tx.execute_typed(
            RECORD_MIGRATION,
            &[(&name, Type::TEXT), (&embedded, Type::TEXT)],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(migration = name, "applied migration");
        applied.push(name);
    }
    if !trusted.is_empty() {
        tracing::warn!(
            migrations = trusted.join(", "),
            "recorded the checksums of migrations applied without one (by an older outboxd \
             or by hand), trusting that they were this build's files"
        );
    }
    Ok(applied)
}

/// Names of the embedded migrations not yet applied to this database.
///
/// Fails with [`Error::MigrationChanged`] when an applied file's recorded checksum
/// differs from this build's (a file recorded without one is not checked: see the
/// module's documentation). Reads only, so a dispatcher role with SELECT on
/// `outboxd_migrations` can call it; its statements are unnamed, so it works through a
/// transaction-mode pooler (`outboxd run` and `/readyz` call it).
pub async fn pending_migrations(client: &Client) -> Result<Vec<&'static str>> {
    let exists: bool = client
        .query_typed_one(MIGRATIONS_TABLE_EXISTS, &[])
        .await?
        .try_get("present")?;
    if !exists {
        return Ok(MIGRATIONS.iter().map(|(name, _)| *name).collect());
    }
    let mut recorded = std::collections::HashMap::new();
    for row in client.query_typed(APPLIED_MIGRATIONS, &[]).await? {
        let name: String = row.try_get("name")?;
        let checksum: Option<String> = row.try_get("checksum")?;
        recorded.insert(name, checksum);
    }
    let mut pending = Vec::new();
    for &(name, sql) in MIGRATIONS {
        match recorded.get(name) {
            None => pending.push(name),
            Some(Some(recorded)) => {
                let embedded = checksum(sql);
                if *recorded != embedded {
                    return Err(Error::MigrationChanged {
                        name,
                        recorded: recorded.clone(),
                        embedded,
                    });
                }
            }
            Some(None) => {}
        }
    }
    Ok(pending)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The released files, as released: the checksums an older outboxd's databases
    /// are backfilled with are trusted only because these cannot change unnoticed. A
    /// new migration joins this list when it is released.
    const RELEASED: &[(&str, &str)] = &[
        (
            "0001_schema.sql",
            "e51ad17f754eb037f81fb0482eeb8ba252f6e12adffb05efb7c548f6deee7680",
        ),
        (
            "0002_notify.sql",
            "c3810375880a8e82199f5cc6bad2251d0ad790d6a3b416b953dad42ff77a9a99",
        ),
        (
            "0003_operations.sql",
            "c4acfe5831c6b4356360aa2990cd3683d55b4904ac58f5ed41538d26bc016e65",
        ),
        (
            "0004_doorbell_gate.sql",
            "cbfbed86161a180a2d56691de0d831087c8a6c0a3ac1dd5d195125138e184cec",
        ),
        (
            "0005_settle_function.sql",
            "724c3de404b8680b26d0bdfbf16fb7a3803369210c85335b657efb7b7e602664",
        ),
    ];

    #[test]
    fn released_migrations_never_change() {
        for (name, released) in RELEASED {
            let (_, sql) = MIGRATIONS
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("{name} was released: it stays in MIGRATIONS"));
            assert_eq!(
                checksum(sql),
                *released,
                "{name} changed after its release: restore it and put the change in a new file"
            );
        }
        let names: Vec<&str> = MIGRATIONS.iter().map(|(n, _)| *n).collect();
        assert!(
            names.windows(2).all(|w| w[0] < w[1]),
            "migrations apply in name order: {names:?}"
        );
    }

    #[test]
    fn checksum_is_sha256_hex() {
        assert_eq!(
            checksum(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
