//! The settings of `outboxd run`: the dispatcher's ([`RunArgs`], defaults from
//! `outboxd::config::defaults`) and those of the servers beside it ([`ServeArgs`]).
//! Each is a flag and an environment variable; `outboxd run --help` shows them with
//! their defaults, and the README's Settings table states the same (checked by a test).

use std::net::SocketAddr;
use std::time::Duration;

use outboxd::ConfigError;
use outboxd::config::{Config, DeadHead, PreparedStatements, default_worker_id, defaults};

/// `WEBHOOK_SECRET_ROTATION_GRACE`'s default, also `endpoint rotate-secret --grace`'s.
pub const DEFAULT_ROTATION_GRACE: &str = "24h";

/// The dispatcher's settings as command-line flags, each also read from its
/// environment variable. `outboxd --help` prints them with their defaults.
#[derive(Clone, clap::Args)]
pub struct RunArgs {
    /// Unique name of this dispatcher process, recorded on the rows it claims [default: hostname-pid]
    #[arg(long, env = "WEBHOOK_WORKER_ID", value_name = "WEBHOOK_WORKER_ID")]
    pub worker_id: Option<String>,
    /// LISTEN for insert notifications; false means pure polling (e.g. behind a transaction-mode pgbouncer)
    #[arg(long, env = "WEBHOOK_LISTEN", value_name = "WEBHOOK_LISTEN", default_value_t = defaults::LISTEN, action = clap::ArgAction::Set, value_parser = parse_bool)]
    pub listen: bool,
    /// Poll tick in milliseconds: the safety net under push, the only wake-up without it
    #[arg(
        long,
        env = "WEBHOOK_POLL_INTERVAL_MS",
        value_name = "WEBHOOK_POLL_INTERVAL_MS",
        default_value_t = defaults::POLL_INTERVAL_MS
    )]
    pub poll_interval_ms: u64,
    /// Most deliveries claimed per round trip
    #[arg(
        long,
        env = "WEBHOOK_BATCH_SIZE",
        value_name = "WEBHOOK_BATCH_SIZE",
        default_value_t = defaults::BATCH_SIZE
    )]
    pub batch_size: u32,
    /// Lease on claimed rows in milliseconds; a crashed worker's rows come back after it
    #[arg(
        long,
        env = "WEBHOOK_LEASE_MS",
        value_name = "WEBHOOK_LEASE_MS",
        default_value_t = defaults::LEASE_MS
    )]
    pub lease_ms: u64,
    /// Per-request HTTP timeout in milliseconds; must be shorter than the lease
    #[arg(
        long,
        env = "WEBHOOK_HTTP_TIMEOUT_MS",
        value_name = "WEBHOOK_HTTP_TIMEOUT_MS",
        default_value_t = defaults::HTTP_TIMEOUT_MS
    )]
    pub http_timeout_ms: u64,
    /// Most HTTP requests in flight at once, across all endpoints
    #[arg(
        long,
        env = "WEBHOOK_CONCURRENCY",
        value_name = "WEBHOOK_CONCURRENCY",
        default_value_t = defaults::CONCURRENCY
    )]
    pub concurrency: u32,
    /// Requests in progress from this dispatcher to an endpoint that sets no max_in_flight of its own, at which claims take nothing more for it (it may hold this plus one claim's batch), so that a slow endpoint never holds every send slot
    #[arg(
        long,
        env = "WEBHOOK_ENDPOINT_MAX_IN_FLIGHT",
        value_name = "WEBHOOK_ENDPOINT_MAX_IN_FLIGHT",
        default_value_t = defaults::ENDPOINT_MAX_IN_FLIGHT
    )]
    pub endpoint_max_in_flight: u32,
    /// Consecutive unhealthy failures (timeouts, connection errors, 5xx) that open an endpoint's circuit: its deliveries then wait, unattempted
    #[arg(
        long,
        env = "WEBHOOK_CIRCUIT_FAILURES",
        value_name = "WEBHOOK_CIRCUIT_FAILURES",
        default_value_t = defaults::CIRCUIT_FAILURES
    )]
    pub circuit_failures: u32,
    /// How long an endpoint's circuit first stays open, in milliseconds, before one probe is sent; doubled each time the probe fails
    #[arg(
        long,
        env = "WEBHOOK_CIRCUIT_OPEN_MS",
        value_name = "WEBHOOK_CIRCUIT_OPEN_MS",
        default_value_t = defaults::CIRCUIT_OPEN_MS
    )]
    pub circuit_open_ms: u64,
    /// The longest an endpoint's circuit stays open at a time, in milliseconds, a pause asked by Retry-After included
    #[arg(
        long,
        env = "WEBHOOK_CIRCUIT_MAX_OPEN_MS",
        value_name = "WEBHOOK_CIRCUIT_MAX_OPEN_MS",
        default_value_t = defaults::CIRCUIT_MAX_OPEN_MS
    )]
    pub circuit_max_open_ms: u64,
    /// First retry delay in milliseconds, doubled per attempt (with ±20% jitter)
    #[arg(
        long,
        env = "WEBHOOK_BACKOFF_BASE_MS",
        value_name = "WEBHOOK_BACKOFF_BASE_MS",
        default_value_t = defaults::BACKOFF_BASE_MS
    )]
    pub backoff_base_ms: u64,
    /// Ceiling on any retry delay in milliseconds, Retry-After included (default 10 h)
    #[arg(
        long,
        env = "WEBHOOK_BACKOFF_MAX_MS",
        value_name = "WEBHOOK_BACKOFF_MAX_MS",
        default_value_t = defaults::BACKOFF_MAX_MS
    )]
    pub backoff_max_ms: u64,
    /// Attempts before a delivery is parked as dead
    #[arg(
        long,
        env = "WEBHOOK_MAX_ATTEMPTS",
        value_name = "WEBHOOK_MAX_ATTEMPTS",
        default_value_t = defaults::MAX_ATTEMPTS
    )]
    pub max_attempts: u32,
    /// After SIGTERM/SIGINT, how long in-flight deliveries may finish, in milliseconds
    #[arg(
        long,
        env = "WEBHOOK_DRAIN_TIMEOUT_MS",
        value_name = "WEBHOOK_DRAIN_TIMEOUT_MS",
        default_value_t = defaults::DRAIN_TIMEOUT_MS
    )]
    pub drain_timeout_ms: u64,
    /// Allow loopback/private/link-local targets (local development and tests only)
    #[arg(long, env = "WEBHOOK_ALLOW_PRIVATE_TARGETS", value_name = "WEBHOOK_ALLOW_PRIVATE_TARGETS", default_value_t = defaults::ALLOW_PRIVATE_TARGETS, action = clap::ArgAction::Set, value_parser = parse_bool)]
    pub allow_private_targets: bool,
    /// PostgreSQL connections in the dispatcher's pool (the LISTEN connection is extra)
    #[arg(
        long,
        env = "WEBHOOK_POOL_SIZE",
        value_name = "WEBHOOK_POOL_SIZE",
        default_value_t = defaults::POOL_SIZE
    )]
    pub pool_size: u32,
    /// Hours delivered deliveries and their attempt history are kept
    #[arg(
        long,
        env = "WEBHOOK_RETENTION_HOURS",
        value_name = "WEBHOOK_RETENTION_HOURS",
        default_value_t = defaults::RETENTION_HOURS
    )]
    pub retention_hours: u64,
    /// Hours dead deliveries are kept (unless re-driven first)
    #[arg(
        long,
        env = "WEBHOOK_DEAD_RETENTION_HOURS",
        value_name = "WEBHOOK_DEAD_RETENTION_HOURS",
        default_value_t = defaults::DEAD_RETENTION_HOURS
    )]
    pub dead_retention_hours: u64,
    /// Hours an endpoint may fail every attempt before it is disabled automatically
    #[arg(
        long,
        env = "WEBHOOK_ENDPOINT_DISABLE_AFTER_HOURS",
        value_name = "WEBHOOK_ENDPOINT_DISABLE_AFTER_HOURS",
        default_value_t = defaults::ENDPOINT_DISABLE_AFTER_HOURS
    )]
    pub endpoint_disable_after_hours: u64,
    /// Largest payload delivered, in bytes of its JSON text; a larger event's deliveries end dead with the reason, unsent
    #[arg(
        long,
        env = "WEBHOOK_MAX_PAYLOAD_BYTES",
        value_name = "WEBHOOK_MAX_PAYLOAD_BYTES",
        default_value_t = defaults::MAX_PAYLOAD_BYTES
    )]
    pub max_payload_bytes: u64,
    /// Most payload bytes held at once by claimed, unsent deliveries (each event's payload counts once)
    #[arg(
        long,
        env = "WEBHOOK_PAYLOAD_BUDGET_BYTES",
        value_name = "WEBHOOK_PAYLOAD_BUDGET_BYTES",
        default_value_t = defaults::PAYLOAD_BUDGET_BYTES
    )]
    pub payload_budget_bytes: u64,
    /// Prepare the claim statement once per connection (on), send every statement unnamed (off, for transaction-mode poolers such as pgbouncer before 1.21), or decide at start (auto)
    #[arg(long, env = "WEBHOOK_PREPARED_STATEMENTS", value_name = "WEBHOOK_PREPARED_STATEMENTS", default_value_t = defaults::PREPARED_STATEMENTS, value_parser = clap::value_parser!(PreparedStatements))]
    pub prepared_statements: PreparedStatements,
    /// PostgreSQL connection string for the LISTEN session alone [default: DATABASE_URL]; point it at PostgreSQL directly when DATABASE_URL goes through a transaction-mode pooler
    #[arg(
        long,
        env = "WEBHOOK_LISTEN_DATABASE_URL",
        value_name = "WEBHOOK_LISTEN_DATABASE_URL",
        hide_env_values = true
    )]
    pub listen_database_url: Option<String>,
    /// At start, how long to wait for PostgreSQL to accept connections, in milliseconds (0: give up at once)
    #[arg(
        long,
        env = "WEBHOOK_DATABASE_WAIT_MS",
        value_name = "WEBHOOK_DATABASE_WAIT_MS",
        default_value_t = defaults::DATABASE_WAIT_MS
    )]
    pub database_wait_ms: u64,
    /// Longest wait for a lock by any dispatcher statement, in milliseconds (its sessions' lock_timeout; 0: no limit)
    #[arg(
        long,
        env = "WEBHOOK_DB_LOCK_TIMEOUT_MS",
        value_name = "WEBHOOK_DB_LOCK_TIMEOUT_MS",
        default_value_t = defaults::DB_LOCK_TIMEOUT_MS
    )]
    pub db_lock_timeout_ms: u64,
    /// Longest run of any dispatcher statement, in milliseconds (its sessions' statement_timeout; 0: no limit)
    #[arg(
        long,
        env = "WEBHOOK_DB_STATEMENT_TIMEOUT_MS",
        value_name = "WEBHOOK_DB_STATEMENT_TIMEOUT_MS",
        default_value_t = defaults::DB_STATEMENT_TIMEOUT_MS
    )]
    pub db_statement_timeout_ms: u64,
    /// When an ordering key's head delivery ends dead: block the key until an operator re-drives or discards it, or skip to the next event (an endpoint's own setting wins)
    #[arg(long, env = "WEBHOOK_ORDERING_DEAD_HEAD", value_name = "WEBHOOK_ORDERING_DEAD_HEAD", default_value_t = defaults::ORDERING_DEAD_HEAD, value_parser = clap::value_parser!(DeadHead))]
    pub ordering_dead_head: DeadHead,
}

/// Hours as a `Duration`, saturating so that absurd values fail validation instead of
/// wrapping.
fn hours(hours: u64) -> Duration {
    Duration::from_secs(hours.saturating_mul(3600))
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        other => Err(format!("expected true or false, got {other:?}")),
    }
}

impl RunArgs {
    /// Converts the flags into a validated [`Config`].
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let config = Config {
            worker_id: self.worker_id.unwrap_or_else(default_worker_id),
            listen: self.listen,
            poll_interval: Duration::from_millis(self.poll_interval_ms),
            batch_size: self.batch_size,
            lease: Duration::from_millis(self.lease_ms),
            http_timeout: Duration::from_millis(self.http_timeout_ms),
            concurrency: self.concurrency,
            endpoint_max_in_flight: self.endpoint_max_in_flight,
            circuit: outboxd::circuit::CircuitPolicy {
                failures: self.circuit_failures,
                open: Duration::from_millis(self.circuit_open_ms),
                max_open: Duration::from_millis(self.circuit_max_open_ms),
            },
            backoff_base: Duration::from_millis(self.backoff_base_ms),
            backoff_max: Duration::from_millis(self.backoff_max_ms),
            max_attempts: self.max_attempts,
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
            allow_private_targets: self.allow_private_targets,
            pool_size: self.pool_size,
            retention: hours(self.retention_hours),
            dead_retention: hours(self.dead_retention_hours),
            endpoint_disable_after: hours(self.endpoint_disable_after_hours),
            max_payload_bytes: self.max_payload_bytes,
            payload_budget_bytes: self.payload_budget_bytes,
            prepared_statements: self.prepared_statements,
            database_wait: Duration::from_millis(self.database_wait_ms),
            ordering_dead_head: self.ordering_dead_head,
            db_lock_timeout: Duration::from_millis(self.db_lock_timeout_ms),
            db_statement_timeout: Duration::from_millis(self.db_statement_timeout_ms),
        };
        config.validate()?;
        Ok(config)
    }
}

/// Settings of the servers that run beside the dispatcher.
#[derive(Clone, clap::Args)]
pub struct ServeArgs {
    /// Serve /metrics, /healthz and /readyz on this address (off when unset); a bare port such as 9090 means 127.0.0.1:9090
    #[arg(long, env = "METRICS_ADDR", value_name = "METRICS_ADDR", value_parser = parse_addr)]
    pub metrics_addr: Option<SocketAddr>,
    /// Serve the admin API on this address (off when unset); a bare port such as 8080 means 127.0.0.1:8080
    #[arg(long, env = "ADMIN_ADDR", value_name = "ADMIN_ADDR", value_parser = parse_addr)]
    pub admin_addr: Option<SocketAddr>,
    /// Bearer token the admin API requires: at least 16 printable ASCII characters, no spaces (surrounding whitespace, such as a file's final newline, is not part of it); required when ADMIN_ADDR is set
    #[arg(
        long,
        env = "ADMIN_TOKEN",
        value_name = "ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// How long a rotated-out secret keeps signing beside the new one, e.g. 24h or 30m
    #[arg(long, env = "WEBHOOK_SECRET_ROTATION_GRACE", value_name = "WEBHOOK_SECRET_ROTATION_GRACE", default_value = DEFAULT_ROTATION_GRACE, value_parser = parse_grace)]
    pub secret_rotation_grace: Duration,
    /// Runtime threads [default: the CPUs available to the process]; several dispatchers on one host each do best with their share of its cores
    #[arg(long, env = "WEBHOOK_WORKER_THREADS", value_name = "WEBHOOK_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
}

/// Parses a listen address; a bare port binds loopback, so nothing is exposed beyond
/// the host unless an address is spelled out.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.trim().parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.trim()
        .parse()
        .map_err(|_| format!("expected HOST:PORT or a port, got {s:?}"))
}

/// Parses `WEBHOOK_SECRET_ROTATION_GRACE` (humantime: `24h`, `30m`, `1h 30m`).
pub fn parse_grace(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected a duration such as 24h)"))
}

/// The token is never shown: only whether one is set.
impl std::fmt::Debug for ServeArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeArgs")
            .field("metrics_addr", &self.metrics_addr)
            .field("admin_addr", &self.admin_addr)
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "<redacted>"),
            )
            .field("secret_rotation_grace", &self.secret_rotation_grace)
            .field("worker_threads", &self.worker_threads)
            .finish()
    }
}

/// [`ServeArgs`] checked as a whole.
#[derive(Clone)]
pub struct Serve {
    /// Where the status server listens, if it runs.
    pub metrics_addr: Option<SocketAddr>,
    /// The admin API's address and its token, trimmed.
    pub admin: Option<(SocketAddr, String)>,
    /// `WEBHOOK_SECRET_ROTATION_GRACE`.
    pub rotation_grace: Duration,
}

/// The token is never shown.
impl std::fmt::Debug for Serve {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serve")
            .field("metrics_addr", &self.metrics_addr)
            .field("admin_addr", &self.admin.as_ref().map(|(addr, _)| addr))
            .field("rotation_grace", &self.rotation_grace)
            .finish_non_exhaustive()
    }
}

/// The fewest characters an admin token may have.
const MIN_TOKEN_CHARS: usize = 16;

/// What `ADMIN_TOKEN` means: the value without surrounding whitespace (a token read from
/// a file usually ends in a newline, which no client sends). What is left must be one
/// bearer credential a client can send as it is: printable ASCII without spaces.
fn admin_token(raw: &str) -> Result<String, ConfigError> {
    let refuse = |message: &str| ConfigError {
        variable: "ADMIN_TOKEN",
        message: message.to_owned(),
    };
    let token = raw.trim();
    if token.len() < MIN_TOKEN_CHARS {
        return Err(refuse(
            "must be at least 16 characters, not counting surrounding whitespace",
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(refuse(
            "must be printable ASCII without spaces (it is sent in an Authorization header)",
        ));
    }
    Ok(token.to_owned())
}

impl ServeArgs {
    /// Checks that the admin API has a usable token when it is on, and settles what the
    /// token is (see [`admin_token`]): the admin API compares requests with exactly that.
    pub fn validate(self) -> Result<Serve, ConfigError> {
        let admin = match (self.admin_addr, self.admin_token) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(ConfigError {
                    variable: "ADMIN_TOKEN",
                    message: "is required when ADMIN_ADDR is set".to_owned(),
                });
            }
            (Some(addr), Some(token)) => Some((addr, admin_token(&token)?)),
        };
        Ok(Serve {
            metrics_addr: self.metrics_addr,
            admin,
            rotation_grace: self.secret_rotation_grace,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flags' defaults are the library's: `outboxd run` with nothing set runs the
    /// dispatcher `Config::default()` describes.
    #[test]
    fn flags_default_to_the_library_defaults() {
        #[derive(clap::Parser)]
        struct Run {
            #[command(flatten)]
            args: RunArgs,
        }
        let run = <Run as clap::Parser>::try_parse_from(["run", "--worker-id", "w"]).unwrap();
        let config = run.args.into_config().unwrap();
        let expected = Config {
            worker_id: "w".to_owned(),
            ..Config::default()
        };
        assert_eq!(format!("{config:?}"), format!("{expected:?}"));
    }

    #[test]
    fn booleans_accept_the_usual_spellings() {
        for t in ["true", "1", "YES", "on"] {
            assert_eq!(parse_bool(t), Ok(true));
        }
        for f in ["false", "0", "no", "Off"] {
            assert_eq!(parse_bool(f), Ok(false));
        }
        assert!(parse_bool("maybe").is_err());
    }

    #[test]
    fn admin_token_is_the_trimmed_value() {
        let token = "0123456789abcdef-token";
        for raw in [
            token.to_owned(),
            format!("{token}\n"),
            format!("{token}\r\n"),
            format!("  {token}\t "),
        ] {
            assert_eq!(admin_token(&raw).unwrap(), token, "{raw:?}");
        }
        for (raw, word) in [
            ("", "16"),
            ("short-token\n\n\n\n\n\n\n", "16"),
            ("                        ", "16"),
            ("0123456789 abcdef-token", "printable"),
            ("0123456789abcdef-tökén", "printable"),
            ("0123456789abcdef\0token", "printable"),
        ] {
            let e = admin_token(raw).unwrap_err();
            assert_eq!(e.variable, "ADMIN_TOKEN");
            assert!(e.message.contains(word), "{raw:?}: {e}");
        }
    }

    #[test]
    fn debug_hides_the_token() {
        let secret = "0123456789abcdef-token";
        let args = ServeArgs {
            metrics_addr: None,
            admin_addr: Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
            admin_token: Some(secret.to_owned()),
            secret_rotation_grace: Duration::from_secs(60),
            worker_threads: None,
        };
        let shown = format!("{args:?}");
        assert!(!shown.contains(secret), "{shown}");
        let serve = args.validate().unwrap();
        let shown = format!("{serve:?} {serve:#?}");
        assert!(!shown.contains(secret), "{shown}");
        assert!(shown.contains("127.0.0.1:8080"), "{shown}");
    }
}
