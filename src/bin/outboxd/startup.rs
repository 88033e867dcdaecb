//! Start-up order: waiting for PostgreSQL to accept connections.
//!
//! In compose or Kubernetes the dispatcher often starts before its database does. It
//! waits, retrying with a capped backoff and saying what it waits for, rather than
//! exiting and leaving the retry to a restart policy; the status server is already up
//! meanwhile and `/readyz` says what is awaited.

use std::time::{Duration, Instant};

use outboxd::Error;
use outboxd::status::Startup;
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

/// The first pause between attempts; doubled after each, up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(100);
/// The longest pause between attempts: a database that comes up is noticed within it.
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// Connects to `database_url`, retrying for up to `bound` while the database is not
/// accepting connections yet: nothing listening, a timeout, "the database system is
/// starting up", a shutdown in progress, too many connections, or (with
/// `target_session_attrs=read-write`) no writable host yet. Each failed attempt is
/// logged and recorded in `startup`. An error that waiting cannot cure, such as a
/// refused password or a database that does not exist, is returned at once, and so is
/// the last error once `bound` has passed (a zero `bound` makes one attempt).
pub async fn wait_for_database(
    database_url: &str,
    bound: Duration,
    startup: &Startup,
) -> Result<Client, Error> {
    let deadline = Instant::now() + bound;
    let mut pause = FIRST_PAUSE;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let error = match outboxd::db::connect(database_url).await {
            Ok(client) => {
                if attempts > 1 {
                    tracing::info!(attempts, "the database accepts connections");
                }
                return Ok(client);
            }
            Err(e) => e,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if !worth_waiting(&error) || left.is_zero() {
            return Err(error);
        }
        let pause_now = pause.min(left);
        tracing::warn!(
            error = %error,
            retry_in_ms = pause_now.as_millis() as u64,
            gives_up_in_s = left.as_secs(),
            "waiting for the database to accept connections"
        );
        startup.set_waiting(format!("waiting for the database: {error}"));
        tokio::time::sleep(pause_now).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// Whether a failed connection attempt may succeed later without anyone changing the
/// configuration: the server is not reachable yet, or not ready. Errors the server
/// sent for this login (authentication, an unknown database or role, a refused
/// parameter) are final.
fn worth_waiting(error: &Error) -> bool {
    let Error::Db(e) = error else {
        return matches!(error, Error::Pool(bb8::RunError::TimedOut));
    };
    match e.code() {
        // No SQLSTATE: nothing listening, a name that does not resolve yet, a timeout,
        // or a host list with no writable host yet (failover) are I/O errors. A
        // certificate that does not verify, or a malformed connection string, is not.
        None => std::error::Error::source(e)
            .and_then(|source| source.downcast_ref::<std::io::Error>())
            .is_some_and(|io| {
                !matches!(
                    io.kind(),
                    std::io::ErrorKind::InvalidData
                        | std::io::ErrorKind::InvalidInput
                        | std::io::ErrorKind::Unsupported
                )
            }),
        Some(code) => {
            *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::TOO_MANY_CONNECTIONS
                || code.code().starts_with("08")
        }
    }
}
