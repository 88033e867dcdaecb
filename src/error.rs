//! The library's error type.

use crate::config::ConfigError;
use crate::sign::InvalidSecret;

/// Everything the library can fail with.
///
/// Database and pool errors pass through unchanged so callers can inspect the
/// PostgreSQL error code (a failed start-up check wraps its error in
/// [`Error::CannotSettle`]); input errors carry a message fit to show a user. New
/// variants may be added.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A statement failed or the connection broke.
    #[error("database error: {}", describe_db(.0))]
    Db(#[from] tokio_postgres::Error),
    /// No pooled connection could be had.
    #[error("database pool error: {0}")]
    Pool(#[from] bb8::RunError<tokio_postgres::Error>),
    /// A configuration value is out of range or malformed.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// An endpoint registration or update was refused.
    #[error(transparent)]
    InvalidEndpoint(#[from] InvalidEndpoint),
    /// An event could not be enqueued as given.
    #[error("invalid event: {0}")]
    InvalidEvent(String),
    /// A request's arguments are malformed (a filter, a page size, an id).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The named row does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// This database session cannot record delivery outcomes (the dispatcher checks at
    /// start, and `/readyz` on every call): a dispatcher that delivered anyway would
    /// deliver again at every lease expiry.
    #[error(
        "cannot record delivery outcomes: {}; the dispatcher's role needs EXECUTE on \
         webhook_settle and write access to webhook_deliveries, webhook_attempts and \
         webhook_endpoints, on a primary",
        describe_db(.0)
    )]
    CannotSettle(#[source] tokio_postgres::Error),
    /// The database refuses writes here: a standby, or read-only sessions. The dispatcher
    /// cannot record what it delivers there, so it does not start.
    #[error(
        "the database is read-only: {0}; point DATABASE_URL at the primary (with several \
         hosts, add target_session_attrs=read-write so that a failover is followed)"
    )]
    ReadOnlyDatabase(String),
    /// A statement's result columns are not the ones its reader expects: the code and
    /// the SQL disagree (a bug, caught before any value is read).
    #[error("the {statement} statement returns ({found}); its reader expects ({expected})")]
    RowShape {
        /// The statement's name.
        statement: &'static str,
        /// The columns the reader expects, `name type` each.
        expected: String,
        /// The columns the statement returned.
        found: String,
    },
    /// A migration file failed to apply.
    #[error("migration {name} failed: {source}")]
    Migration {
        /// The file name, such as `0001_schema.sql`.
        name: &'static str,
        /// What PostgreSQL said.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A migration file differs from the one applied to this database: a released
    /// migration must never change, so outboxd refuses to guess which schema it faces.
    #[error(
        "migration {name} differs from the file applied to this database (recorded \
         sha256 {recorded}, this build's is {embedded}): a released migration never \
         changes; restore {name} as it was released and put the change in a new \
         migration file"
    )]
    MigrationChanged {
        /// The file name, such as `0001_schema.sql`.
        name: &'static str,
        /// The SHA-256 recorded when the file was applied (lowercase hex).
        recorded: String,
        /// The SHA-256 of this build's file.
        embedded: String,
    },
    /// The HTTP client could not be built.
    #[error("http client error: {0}")]
    HttpClient(#[from] reqwest::Error),
}

impl Error {
    /// Whether PostgreSQL refused the statement for the values it carried: SQLSTATE
    /// class 22 (data exception, such as a NUL byte in text) or 23 (a constraint). The
    /// same values would be refused again; other values may not be. Anything else, a
    /// broken connection, a missing function or privilege, a read-only standby, a full
    /// disk, is a condition of the database that can clear, and is worth retrying.
    pub(crate) fn is_bad_data(&self) -> bool {
        match self {
            Error::Db(e) => e
                .as_db_error()
                .is_some_and(|db| matches!(db.code().code().get(..2), Some("22" | "23"))),
            _ => false,
        }
    }
}

/// Why an endpoint was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEndpoint {
    /// The URL cannot be used.
    #[error("invalid endpoint URL: {0}")]
    Url(String),
    /// The secret is malformed.
    #[error("invalid signing secret: {0}")]
    Secret(#[from] InvalidSecret),
    /// An event-type filter is malformed.
    #[error(
        "invalid event-type filter {0:?}: use an exact name such as order.created, a prefix such as order.*, or *"
    )]
    Filter(String),
    /// A static header cannot be sent, or is one outboxd sets itself. The message names
    /// the header, never its value.
    #[error("invalid header {name:?}: {reason}")]
    Header {
        /// The header's name, as given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The timeout is out of range.
    #[error("invalid timeout: {0}")]
    Timeout(String),
    /// A limit (`max_in_flight`, `rate_limit`) is out of range.
    #[error("invalid {field}: {value}; it must be between {min} and {max}")]
    Limit {
        /// The limit, as the API and the column name it.
        field: &'static str,
        /// The value given.
        value: u64,
        /// Its least value.
        min: u32,
        /// Its greatest value.
        max: u32,
    },
}

/// tokio-postgres's own message is only "db error"; show PostgreSQL's words and code.
fn describe_db(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refused_values_are_bad_data() {
        // A pool that cannot hand out a connection is a condition of the database that
        // can clear: the batch is retried whole, not split outcome by outcome.
        assert!(!Error::Pool(bb8::RunError::TimedOut).is_bad_data());
        assert!(!Error::NotFound("endpoint 1".to_owned()).is_bad_data());
    }
}
