//! Running behind a connection pooler: whether the claim may be a named prepared
//! statement, and dropping pooled connections that landed on a read-only server.
//!
//! A transaction-mode pooler (pgbouncer, RDS Proxy, Supavisor) hands each transaction
//! whichever server session is free. A named statement prepared in one transaction is
//! then missing in the next, or its name (tokio-postgres numbers them `s0`, `s1`, ... per
//! connection) clashes with another client's on the same server session. Statements
//! sent unnamed, with their parameter types (`query_typed`: Parse, Bind and Execute in
//! one round trip), carry nothing from one transaction to the next, so they work
//! through any pooler. Every statement of the dispatcher is sent that way except the
//! claim, which is prepared once per connection when nothing forbids it, because its
//! planning costs more than running it on an idle queue.

use tokio_postgres::Client;

use crate::config::{ConfigError, PreparedStatements};
use crate::db::Connector;
use crate::db::session::Settings;
use crate::error::{Error, Result};

/// How the claim statement is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatementMode {
    /// Prepared once on each connection the claim loop holds.
    Prepared,
    /// Parsed and planned on every call, as an unnamed statement.
    Unnamed,
}

/// What the start-up look at the pool's sessions found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sessions {
    /// Two connections held at the same time were served in turn by the same
    /// PostgreSQL backend (its pid): their transactions share server sessions, which
    /// only a transaction- or statement-mode pooler does.
    Shared(i32),
    /// Each connection had a backend of its own (their pids) every time it was looked
    /// at. That is a direct connection or a session-mode pool, or a transaction-mode
    /// pooler that happened to hand out different server sessions.
    Separate(i32, i32),
}

/// How many times [`look_at_sessions`] compares two connections' backends. A busy
/// pooler may hand the released server session to another client in between; one
/// shared sighting is proof, so a few tries make a miss unlikely.
const SESSION_LOOKS: usize = 3;

pub(crate) const BACKEND_PID: &str = "SELECT pg_backend_pid() AS pid";

/// Looks for a transaction-mode pooler between outboxd and `database_url`'s server:
/// opens two connections and asks each, in turn, which backend serves it. Two
/// connections that are both open can share a backend only through a pooler that
/// reassigns server sessions per transaction, so [`Sessions::Shared`] is proof;
/// [`Sessions::Separate`] is the absence of proof. Their statements are unnamed, so the
/// look works either way.
pub async fn look_at_sessions(sessions: &Connector) -> Result<Sessions> {
    let first = sessions.connect().await?;
    let second = sessions.connect().await?;
    let mut last = (0, 0);
    for _ in 0..SESSION_LOOKS {
        let a = backend_pid(&first).await?;
        let b = backend_pid(&second).await?;
        if a == b {
            return Ok(Sessions::Shared(a));
        }
        last = (a, b);
    }
    Ok(Sessions::Separate(last.0, last.1))
}

async fn backend_pid(client: &Client) -> Result<i32> {
    Ok(client
        .query_typed_one(BACKEND_PID, &[])
        .await?
        .try_get("pid")?)
}

/// The claim's statement mode for `setting`, given what the pool's sessions showed, and
/// the reason to log with it.
pub fn decide(setting: PreparedStatements, sessions: Sessions) -> (StatementMode, String) {
    match (setting, sessions) {
        (PreparedStatements::On, _) => (
            StatementMode::Prepared,
            "WEBHOOK_PREPARED_STATEMENTS=on".to_owned(),
        ),
        (PreparedStatements::Off, _) => (
            StatementMode::Unnamed,
            "WEBHOOK_PREPARED_STATEMENTS=off".to_owned(),
        ),
        (PreparedStatements::Auto, Sessions::Shared(pid)) => (
            StatementMode::Unnamed,
            format!(
                "WEBHOOK_PREPARED_STATEMENTS=auto: two open connections were served in turn \
                 by the same PostgreSQL backend (pid {pid}), so a transaction-mode pooler is \
                 in between"
            ),
        ),
        (PreparedStatements::Auto, Sessions::Separate(a, b)) => (
            StatementMode::Prepared,
            format!(
                "WEBHOOK_PREPARED_STATEMENTS=auto: each connection had a backend of its own \
                 (pids {a} and {b}), as directly or through a session-mode pool; behind a \
                 transaction-mode pooler that does not track prepared statements, set \
                 WEBHOOK_PREPARED_STATEMENTS=off"
            ),
        ),
    }
}

/// Decides at start how the claim is sent, and logs the decision with its reason.
/// `listen_through_pool` says the LISTEN session would use the pool's connection
/// string: behind a transaction-mode pooler it would hear nothing, so that is refused
/// (a [`ConfigError`] naming `WEBHOOK_LISTEN_DATABASE_URL`) rather than left to fall
/// back silently on the poll tick.
pub async fn start(
    sessions: &Connector,
    setting: PreparedStatements,
    listen_through_pool: bool,
) -> Result<StatementMode> {
    let found = look_at_sessions(sessions).await?;
    if let (true, Sessions::Shared(pid)) = (listen_through_pool, found) {
        return Err(ConfigError {
            variable: "WEBHOOK_LISTEN_DATABASE_URL",
            message: format!(
                "is needed: DATABASE_URL goes through a transaction-mode pooler (two open \
                 connections were served in turn by PostgreSQL backend {pid}), where a \
                 LISTEN session hears nothing; set it to a connection string that reaches \
                 PostgreSQL directly, or set WEBHOOK_LISTEN=false to poll"
            ),
        }
        .into());
    }
    let (mode, reason) = decide(setting, found);
    let prepared = mode == StatementMode::Prepared;
    tracing::info!(prepared, %reason, "claim statement mode decided");
    Ok(mode)
}

/// One session setting that is not what outboxd sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The parameter.
    pub name: &'static str,
    /// What the session has, in the parameter's base unit (milliseconds for times).
    pub found: String,
    /// What outboxd sets.
    pub expected: String,
}

/// The session's own value of each named parameter, in its base unit, as `pg_settings`
/// shows it (`lock_timeout` 5000, not `5s`), so that values compare as numbers do.
pub(crate) const CURRENT_SETTINGS: &str = "SELECT current_user::text AS role, \
    array(SELECT coalesce((SELECT setting FROM pg_settings WHERE name = n), '') \
          FROM unnest($1::text[]) WITH ORDINALITY AS s(n, i) ORDER BY i) AS settings";

/// Compares what `client`'s session runs with to `expected`; returns the role and what
/// differs.
pub async fn compare_settings(
    client: &Client,
    expected: &[(&'static str, String)],
) -> Result<(String, Vec<Mismatch>)> {
    let names: Vec<&str> = expected.iter().map(|(name, _)| *name).collect();
    let params: [(
        &(dyn tokio_postgres::types::ToSql + Sync),
        tokio_postgres::types::Type,
    ); 1] = [(&names, tokio_postgres::types::Type::TEXT_ARRAY)];
    let row = client.query_typed_one(CURRENT_SETTINGS, &params).await?;
    let role: String = row.try_get("role")?;
    let found: Vec<String> = row.try_get("settings")?;
    let mismatches = expected
        .iter()
        .zip(found)
        .filter(|((_, want), found)| found != want)
        .map(|((name, want), found)| Mismatch {
            name,
            found,
            expected: want.clone(),
        })
        .collect();
    Ok((role, mismatches))
}

/// Checks, on one of the dispatcher's sessions, that the settings outboxd sets at
/// connect time arrived. On a direct connection they always do; behind a pooler that
/// refuses or drops startup `options` they must come from the role instead
/// (`ALTER ROLE ... SET`, which PostgreSQL applies to every server session the pooler
/// opens, at no cost per transaction). A wrong `default_transaction_isolation` is
/// refused (claims and the doorbell rely on READ COMMITTED), as a [`ConfigError`] of
/// `DATABASE_URL` that gives the statement to run; any other missing setting is logged
/// with its statement.
pub async fn check_settings(client: &Client, settings: &Settings) -> Result<()> {
    let (role, mismatches) = compare_settings(client, &settings.required).await?;
    for m in &mismatches {
        let fix = alter_role(&role, m.name, &m.expected);
        if m.name == "default_transaction_isolation" {
            return Err(ConfigError {
                variable: "DATABASE_URL",
                message: format!(
                    "the dispatcher's sessions run at {} isolation, not {} (a pooler in \
                     between refuses or drops the startup options that set it): run {fix}",
                    m.found, m.expected
                ),
            }
            .into());
        }
        tracing::warn!(
            setting = m.name,
            found = %m.found,
            expected = %m.expected,
            fix = %fix,
            "a session setting of the dispatcher did not arrive (a pooler in between \
             refuses or drops startup options): set it for the role"
        );
    }
    if mismatches.is_empty() {
        tracing::debug!("the dispatcher's session settings are in place");
    }
    Ok(())
}

/// `ALTER ROLE "role" SET name = 'value'`, quoted for PostgreSQL.
pub fn alter_role(role: &str, name: &str, value: &str) -> String {
    format!(
        "ALTER ROLE \"{}\" SET {name} = '{}'",
        role.replace('"', "\"\""),
        value.replace('\'', "''")
    )
}

/// Whether `error` says the server refused a write because it is read-only: a standby,
/// or `default_transaction_read_only` turned on (as some failover tools fence an old
/// primary, and some managed services do when the disk is full).
pub fn is_read_only(error: &Error) -> bool {
    match error {
        Error::Db(e) => {
            e.code() == Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION)
        }
        _ => false,
    }
}

/// Closes a pooled connection after `error` if the error says its server is read-only,
/// so the pool opens a fresh one (which a multi-host URL with
/// `target_session_attrs=read-write` points at the new primary) instead of handing the
/// same session out again, where every write would fail. Other errors leave it alone:
/// a broken connection is noticed by the pool itself.
pub fn discard_if_read_only(client: &mut Client, error: &Error) {
    if is_read_only(error) {
        tracing::warn!(
            "a database session is read-only (a standby, or a fenced primary): closing it"
        );
        // The pool drops a connection whose channel is closed when it is given back
        // (bb8-postgres's `has_broken` is `is_closed`); tokio-postgres exposes this close
        // only under this name (the synchronous `postgres` crate's `close` uses it).
        client.__private_api_close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_follows_the_evidence_and_the_others_do_not() {
        let shared = Sessions::Shared(7);
        let separate = Sessions::Separate(7, 8);
        assert_eq!(
            decide(PreparedStatements::Auto, shared).0,
            StatementMode::Unnamed
        );
        assert_eq!(
            decide(PreparedStatements::Auto, separate).0,
            StatementMode::Prepared
        );
        for sessions in [shared, separate] {
            assert_eq!(
                decide(PreparedStatements::On, sessions).0,
                StatementMode::Prepared
            );
            assert_eq!(
                decide(PreparedStatements::Off, sessions).0,
                StatementMode::Unnamed
            );
        }
        assert!(decide(PreparedStatements::Auto, shared).1.contains("pid 7"));
    }

    #[test]
    fn alter_role_quotes() {
        assert_eq!(
            alter_role("out\"boxd", "lock_timeout", "5000"),
            "ALTER ROLE \"out\"\"boxd\" SET lock_timeout = '5000'"
        );
    }
}
