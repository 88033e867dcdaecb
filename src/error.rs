//! The library's error type.

use crate::config::ConfigError;
use crate::endpoint::InvalidEndpoint;

/// Everything the library can fail with.
///
/// Database and pool errors pass through unchanged so callers can inspect the
/// PostgreSQL error code; input errors carry a message fit to show a user.
#[derive(Debug, thiserror::Error)]
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
    /// A migration file failed to apply.
    #[error("migration {name} failed: {source}")]
    Migration {
        /// The file name, such as `0001_schema.sql`.
        name: &'static str,
        /// What PostgreSQL said.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The HTTP client could not be built.
    #[error("http client error: {0}")]
    HttpClient(#[from] reqwest::Error),
}

impl Error {
    /// Whether PostgreSQL received the statement and refused it (a constraint, bad
    /// data, a missing table), as opposed to a connection problem: repeating the same
    /// statement would fail the same way.
    pub fn is_rejected_by_database(&self) -> bool {
        matches!(self, Error::Db(e) if e.as_db_error().is_some())
    }
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
