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

const BACKEND_PID: &str = "SELECT pg_backend_pid()";

/// Looks for a transaction-mode pooler between outboxd and `database_url`'s server:
/// opens two connections and asks each, in turn, which backend serves it. Two
/// connections that are both open can share a backend only through a pooler that
/// reassigns server sessions per transaction, so [`Sessions::Shared`] is proof;
/// [`Sessions::Separate`] is the absence of proof. The connections carry no startup
/// `options` (which pgbouncer refuses by default) and their statements are unnamed, so
/// the look works either way.
pub async fn look_at_sessions(database_url: &str) -> Result<Sessions> {
    let first = crate::db::connect(database_url).await?;
    let second = crate::db::connect(database_url).await?;
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
    Ok(client.query_typed_one(BACKEND_PID, &[]).await?.get(0))
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

/// Decides at start how the claim is sent, and logs the decision with its reason:
/// [`StatementMode::Unnamed`] also means a transaction-mode pooler is in between, so
/// the dispatcher's session settings cannot travel as startup `options`.
/// `listen_through_pool` says the LISTEN session would use the pool's connection
/// string: behind a transaction-mode pooler it would hear nothing, so that is refused
/// (a [`ConfigError`] naming `WEBHOOK_LISTEN_DATABASE_URL`) rather than left to fall
/// back silently on the poll tick.
pub async fn start(
    database_url: &str,
    setting: PreparedStatements,
    listen_through_pool: bool,
) -> Result<StatementMode> {
    let sessions = look_at_sessions(database_url).await?;
    if let (true, Sessions::Shared(pid)) = (listen_through_pool, sessions) {
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
    let (mode, reason) = decide(setting, sessions);
    let prepared = mode == StatementMode::Prepared;
    tracing::info!(prepared, %reason, "claim statement mode decided");
    Ok(mode)
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
}
