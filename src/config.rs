//! Dispatcher configuration: read from the environment (or matching `--flags`),
//! validated as a whole before anything starts.

use std::time::Duration;

/// A configuration value that cannot be used, with the environment variable that
/// carries it so the operator knows exactly what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {variable}: {message}")]
pub struct ConfigError {
    /// The environment variable, such as `WEBHOOK_BATCH_SIZE`.
    pub variable: &'static str,
    /// What is wrong with its value.
    pub message: String,
}

impl ConfigError {
    fn new(variable: &'static str, message: impl Into<String>) -> Self {
        Self {
            variable,
            message: message.into(),
        }
    }
}

/// Everything the dispatcher needs besides the database connection.
///
/// Build one with [`Config::default`] and adjust fields, then call
/// [`Config::validate`] (the dispatcher does so again before it starts).
#[derive(Debug, Clone)]
pub struct Config {
    /// Names this process in `locked_by`; must be unique among running dispatchers.
    pub worker_id: String,
    /// LISTEN for the insert trigger's notifications (push); `false` means pure polling.
    pub listen: bool,
    /// The safety-net poll tick (and, with `listen = false`, the only wake-up).
    pub poll_interval: Duration,
    /// Most deliveries claimed per claim statement.
    pub batch_size: u32,
    /// How long a claim holds its rows before another worker may take them.
    pub lease: Duration,
    /// Per-request timeout; shorter than the lease so a finished attempt can still settle.
    pub http_timeout: Duration,
    /// Most HTTP requests in flight in total.
    pub concurrency: u32,
    /// First retry delay; doubled per attempt.
    pub backoff_base: Duration,
    /// Ceiling on any retry delay, `Retry-After` included.
    pub backoff_max: Duration,
    /// After this many failed attempts a delivery is dead.
    pub max_attempts: u32,
    /// How long in-flight deliveries may run after a shutdown signal.
    pub drain_timeout: Duration,
    /// Allow loopback, private, link-local and other internal targets (development only).
    pub allow_private_targets: bool,
    /// Connections in the dispatcher's pool.
    pub pool_size: u32,
    /// Delivered deliveries and their attempts are deleted after this.
    pub retention: Duration,
    /// Dead deliveries are deleted after this, unless re-driven first.
    pub dead_retention: Duration,
    /// An endpoint failing every attempt for this long is disabled.
    pub endpoint_disable_after: Duration,
    /// The largest payload sent, in bytes of its JSON text; a delivery of a larger one
    /// ends dead with the reason, without a request.
    pub max_payload_bytes: u64,
    /// Most payload bytes a dispatcher holds at once, claimed and not yet sent (a claim
    /// always takes at least one event, however large).
    pub payload_budget_bytes: u64,
    /// `lock_timeout` of the dispatcher's sessions: no statement waits longer for a
    /// lock (zero: no limit). A timed-out statement is retried like any failed one.
    pub db_lock_timeout: Duration,
    /// `statement_timeout` of the dispatcher's sessions (zero: no limit); must leave
    /// room for a claim of a whole batch and a write of its outcomes.
    pub db_statement_timeout: Duration,
    /// Whether the claim is prepared once per connection or sent unnamed every time
    /// (see [`PreparedStatements`]).
    pub prepared_statements: PreparedStatements,
    /// How long `outboxd run` waits for PostgreSQL to accept connections at start
    /// before giving up; zero gives up at the first refusal.
    pub database_wait: Duration,
}

/// `WEBHOOK_PREPARED_STATEMENTS`: whether the claim statement may be a named prepared
/// statement. Every other statement outboxd's dispatcher sends is unnamed already.
///
/// A transaction-mode pooler without prepared-statement support (pgbouncer before
/// 1.21, or without `max_prepared_statements`) hands each transaction whichever server
/// session is free, so a statement prepared on one is missing on the next, or its name
/// clashes with another client's (`prepared statement "s0" already exists`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PreparedStatements {
    /// Decide at start: unnamed when two of the dispatcher's connections are served by
    /// the same PostgreSQL session in turn (a transaction-mode pooler), prepared
    /// otherwise. The decision and its evidence are logged.
    #[default]
    Auto,
    /// Prepare the claim once per connection: for direct connections, session-mode
    /// pools and poolers that track prepared statements.
    On,
    /// Send every statement unnamed: for transaction-mode poolers.
    Off,
}

impl std::str::FromStr for PreparedStatements {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "on" | "true" => Ok(Self::On),
            "off" | "false" => Ok(Self::Off),
            other => Err(format!("expected auto, on or off, got {other:?}")),
        }
    }
}

impl std::fmt::Display for PreparedStatements {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::On => "on",
            Self::Off => "off",
        })
    }
}

const HOUR: Duration = Duration::from_secs(3600);
const MIB: u64 = 1024 * 1024;
/// PostgreSQL's limit on any one value (1 GB): no payload's text is longer.
const MAX_VALUE_BYTES: u64 = (1 << 30) - 1;

impl Default for Config {
    fn default() -> Self {
        Self {
            worker_id: default_worker_id(),
            listen: true,
            poll_interval: Duration::from_millis(1_000),
            batch_size: 200,
            lease: Duration::from_millis(60_000),
            http_timeout: Duration::from_millis(15_000),
            concurrency: 256,
            backoff_base: Duration::from_millis(5_000),
            backoff_max: Duration::from_millis(36_000_000),
            max_attempts: 15,
            drain_timeout: Duration::from_millis(20_000),
            allow_private_targets: false,
            pool_size: 4,
            retention: 72 * HOUR,
            dead_retention: 720 * HOUR,
            endpoint_disable_after: 120 * HOUR,
            max_payload_bytes: 4 * MIB,
            payload_budget_bytes: 64 * MIB,
            prepared_statements: PreparedStatements::Auto,
            database_wait: Duration::from_secs(300),
            db_lock_timeout: Duration::from_millis(5_000),
            db_statement_timeout: Duration::from_millis(30_000),
        }
    }
}

/// `hostname-pid`: unique per process on one host, and readable in `locked_by`.
pub fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "outboxd".to_owned());
    format!("{host}-{}", std::process::id())
}

impl Config {
    /// Checks every value and how they relate; the error names the variable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn range_ms(var: &'static str, d: Duration, min: u64, max: u64) -> Result<(), ConfigError> {
            let ms = d.as_millis();
            if ms < u128::from(min) || ms > u128::from(max) {
                return Err(ConfigError::new(
                    var,
                    format!("must be between {min} and {max} milliseconds, got {ms}"),
                ));
            }
            Ok(())
        }
        fn range(var: &'static str, v: u32, min: u32, max: u32) -> Result<(), ConfigError> {
            if v < min || v > max {
                return Err(ConfigError::new(
                    var,
                    format!("must be between {min} and {max}, got {v}"),
                ));
            }
            Ok(())
        }
        if self.worker_id.trim().is_empty() || self.worker_id.len() > 200 {
            return Err(ConfigError::new(
                "WEBHOOK_WORKER_ID",
                "must be 1 to 200 characters",
            ));
        }
        range_ms(
            "WEBHOOK_POLL_INTERVAL_MS",
            self.poll_interval,
            10,
            86_400_000,
        )?;
        range("WEBHOOK_BATCH_SIZE", self.batch_size, 1, 10_000)?;
        range_ms("WEBHOOK_LEASE_MS", self.lease, 1_000, 86_400_000)?;
        range_ms("WEBHOOK_HTTP_TIMEOUT_MS", self.http_timeout, 100, 3_600_000)?;
        if self.http_timeout >= self.lease {
            return Err(ConfigError::new(
                "WEBHOOK_HTTP_TIMEOUT_MS",
                format!(
                    "must be shorter than WEBHOOK_LEASE_MS ({} ms), got {} ms; otherwise a slow \
                     request could outlive its lease and be delivered twice",
                    self.lease.as_millis(),
                    self.http_timeout.as_millis()
                ),
            ));
        }
        range("WEBHOOK_CONCURRENCY", self.concurrency, 1, 100_000)?;
        range_ms("WEBHOOK_BACKOFF_BASE_MS", self.backoff_base, 1, 86_400_000)?;
        range_ms(
            "WEBHOOK_BACKOFF_MAX_MS",
            self.backoff_max,
            1,
            30 * 86_400_000,
        )?;
        if self.backoff_max < self.backoff_base {
            return Err(ConfigError::new(
                "WEBHOOK_BACKOFF_MAX_MS",
                "must not be smaller than WEBHOOK_BACKOFF_BASE_MS",
            ));
        }
        range("WEBHOOK_MAX_ATTEMPTS", self.max_attempts, 1, 1_000)?;
        range_ms("WEBHOOK_DRAIN_TIMEOUT_MS", self.drain_timeout, 0, 3_600_000)?;
        range("WEBHOOK_POOL_SIZE", self.pool_size, 2, 1_000)?;
        let hours = |var, d: Duration| {
            if d < HOUR || d > 100_000 * HOUR {
                return Err(ConfigError::new(var, "must be between 1 and 100000 hours"));
            }
            Ok(())
        };
        hours("WEBHOOK_RETENTION_HOURS", self.retention)?;
        hours("WEBHOOK_DEAD_RETENTION_HOURS", self.dead_retention)?;
        hours(
            "WEBHOOK_ENDPOINT_DISABLE_AFTER_HOURS",
            self.endpoint_disable_after,
        )?;
        let bytes = |var, v: u64, min: u64, max: u64| {
            if v < min || v > max {
                return Err(ConfigError::new(
                    var,
                    format!("must be between {min} and {max} bytes, got {v}"),
                ));
            }
            Ok(())
        };
        bytes(
            "WEBHOOK_MAX_PAYLOAD_BYTES",
            self.max_payload_bytes,
            1024,
            MAX_VALUE_BYTES,
        )?;
        bytes(
            "WEBHOOK_PAYLOAD_BUDGET_BYTES",
            self.payload_budget_bytes,
            MIB,
            1 << 40,
        )?;
        range_ms(
            "WEBHOOK_DATABASE_WAIT_MS",
            self.database_wait,
            0,
            86_400_000,
        )?;
        // Zero turns a limit off, as in PostgreSQL; otherwise at least 100 ms, since a
        // shorter wait would fail ordinary statements on a busy database.
        let limit = |var, d: Duration, max| {
            if !d.is_zero() {
                range_ms(var, d, 100, max)?;
            }
            Ok::<_, ConfigError>(())
        };
        limit(
            "WEBHOOK_DB_LOCK_TIMEOUT_MS",
            self.db_lock_timeout,
            3_600_000,
        )?;
        limit(
            "WEBHOOK_DB_STATEMENT_TIMEOUT_MS",
            self.db_statement_timeout,
            86_400_000,
        )?;
        if !self.db_statement_timeout.is_zero() && self.db_lock_timeout > self.db_statement_timeout
        {
            return Err(ConfigError::new(
                "WEBHOOK_DB_LOCK_TIMEOUT_MS",
                format!(
                    "must not exceed WEBHOOK_DB_STATEMENT_TIMEOUT_MS ({} ms), got {} ms; the \
                     statement timeout would end the wait first",
                    self.db_statement_timeout.as_millis(),
                    self.db_lock_timeout.as_millis()
                ),
            ));
        }
        Ok(())
    }
}

/// The dispatcher's settings as command-line flags, each also read from its
/// environment variable. `outboxd --help` prints them with their defaults.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Unique name of this dispatcher process, recorded on the rows it claims [default: host-pid]
    #[arg(long, env = "WEBHOOK_WORKER_ID", value_name = "WEBHOOK_WORKER_ID")]
    pub worker_id: Option<String>,
    /// LISTEN for insert notifications; false means pure polling (e.g. behind a transaction-mode pgbouncer)
    #[arg(long, env = "WEBHOOK_LISTEN", value_name = "WEBHOOK_LISTEN", default_value_t = true, action = clap::ArgAction::Set, value_parser = parse_bool)]
    pub listen: bool,
    /// Poll tick in milliseconds: the safety net under push, the only wake-up without it
    #[arg(
        long,
        env = "WEBHOOK_POLL_INTERVAL_MS",
        value_name = "WEBHOOK_POLL_INTERVAL_MS",
        default_value_t = 1_000
    )]
    pub poll_interval_ms: u64,
    /// Most deliveries claimed per round trip
    #[arg(
        long,
        env = "WEBHOOK_BATCH_SIZE",
        value_name = "WEBHOOK_BATCH_SIZE",
        default_value_t = 200
    )]
    pub batch_size: u32,
    /// Lease on claimed rows in milliseconds; a crashed worker's rows come back after it
    #[arg(
        long,
        env = "WEBHOOK_LEASE_MS",
        value_name = "WEBHOOK_LEASE_MS",
        default_value_t = 60_000
    )]
    pub lease_ms: u64,
    /// Per-request HTTP timeout in milliseconds; must be shorter than the lease
    #[arg(
        long,
        env = "WEBHOOK_HTTP_TIMEOUT_MS",
        value_name = "WEBHOOK_HTTP_TIMEOUT_MS",
        default_value_t = 15_000
    )]
    pub http_timeout_ms: u64,
    /// Most HTTP requests in flight at once, across all endpoints
    #[arg(
        long,
        env = "WEBHOOK_CONCURRENCY",
        value_name = "WEBHOOK_CONCURRENCY",
        default_value_t = 256
    )]
    pub concurrency: u32,
    /// First retry delay in milliseconds, doubled per attempt (with ±20% jitter)
    #[arg(
        long,
        env = "WEBHOOK_BACKOFF_BASE_MS",
        value_name = "WEBHOOK_BACKOFF_BASE_MS",
        default_value_t = 5_000
    )]
    pub backoff_base_ms: u64,
    /// Ceiling on any retry delay in milliseconds, Retry-After included (default 10 h)
    #[arg(
        long,
        env = "WEBHOOK_BACKOFF_MAX_MS",
        value_name = "WEBHOOK_BACKOFF_MAX_MS",
        default_value_t = 36_000_000
    )]
    pub backoff_max_ms: u64,
    /// Attempts before a delivery is parked as dead
    #[arg(
        long,
        env = "WEBHOOK_MAX_ATTEMPTS",
        value_name = "WEBHOOK_MAX_ATTEMPTS",
        default_value_t = 15
    )]
    pub max_attempts: u32,
    /// After SIGTERM/SIGINT, how long in-flight deliveries may finish, in milliseconds
    #[arg(
        long,
        env = "WEBHOOK_DRAIN_TIMEOUT_MS",
        value_name = "WEBHOOK_DRAIN_TIMEOUT_MS",
        default_value_t = 20_000
    )]
    pub drain_timeout_ms: u64,
    /// Allow loopback/private/link-local targets (local development and tests only)
    #[arg(long, env = "WEBHOOK_ALLOW_PRIVATE_TARGETS", value_name = "WEBHOOK_ALLOW_PRIVATE_TARGETS", default_value_t = false, action = clap::ArgAction::Set, value_parser = parse_bool)]
    pub allow_private_targets: bool,
    /// PostgreSQL connections in the dispatcher's pool (the LISTEN connection is extra)
    #[arg(
        long,
        env = "WEBHOOK_POOL_SIZE",
        value_name = "WEBHOOK_POOL_SIZE",
        default_value_t = 4
    )]
    pub pool_size: u32,
    /// Hours delivered deliveries and their attempt history are kept
    #[arg(
        long,
        env = "WEBHOOK_RETENTION_HOURS",
        value_name = "WEBHOOK_RETENTION_HOURS",
        default_value_t = 72
    )]
    pub retention_hours: u64,
    /// Hours dead deliveries are kept (unless re-driven first)
    #[arg(
        long,
        env = "WEBHOOK_DEAD_RETENTION_HOURS",
        value_name = "WEBHOOK_DEAD_RETENTION_HOURS",
        default_value_t = 720
    )]
    pub dead_retention_hours: u64,
    /// Hours an endpoint may fail every attempt before it is disabled automatically
    #[arg(
        long,
        env = "WEBHOOK_ENDPOINT_DISABLE_AFTER_HOURS",
        value_name = "WEBHOOK_ENDPOINT_DISABLE_AFTER_HOURS",
        default_value_t = 120
    )]
    pub endpoint_disable_after_hours: u64,
    /// Largest payload delivered, in bytes of its JSON text; a larger event's deliveries end dead with the reason, unsent
    #[arg(
        long,
        env = "WEBHOOK_MAX_PAYLOAD_BYTES",
        value_name = "WEBHOOK_MAX_PAYLOAD_BYTES",
        default_value_t = 4 * MIB
    )]
    pub max_payload_bytes: u64,
    /// Most payload bytes held at once by claimed, unsent deliveries (each event's payload counts once)
    #[arg(
        long,
        env = "WEBHOOK_PAYLOAD_BUDGET_BYTES",
        value_name = "WEBHOOK_PAYLOAD_BUDGET_BYTES",
        default_value_t = 64 * MIB
    )]
    pub payload_budget_bytes: u64,
    /// Prepare the claim statement once per connection (on), send every statement unnamed (off, for transaction-mode poolers such as pgbouncer before 1.21), or decide at start (auto)
    #[arg(long, env = "WEBHOOK_PREPARED_STATEMENTS", value_name = "WEBHOOK_PREPARED_STATEMENTS", default_value = "auto", value_parser = clap::value_parser!(PreparedStatements))]
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
        default_value_t = 300_000
    )]
    pub database_wait_ms: u64,
    /// Longest wait for a lock by any dispatcher statement, in milliseconds (its sessions' lock_timeout; 0: no limit)
    #[arg(
        long,
        env = "WEBHOOK_DB_LOCK_TIMEOUT_MS",
        value_name = "WEBHOOK_DB_LOCK_TIMEOUT_MS",
        default_value_t = 5_000
    )]
    pub db_lock_timeout_ms: u64,
    /// Longest run of any dispatcher statement, in milliseconds (its sessions' statement_timeout; 0: no limit)
    #[arg(
        long,
        env = "WEBHOOK_DB_STATEMENT_TIMEOUT_MS",
        value_name = "WEBHOOK_DB_STATEMENT_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub db_statement_timeout_ms: u64,
}

/// Hours as a `Duration` multiplier, saturating so absurd values fail validation
/// instead of wrapping.
fn hours(h: u64) -> u32 {
    u32::try_from(h).unwrap_or(u32::MAX)
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
            backoff_base: Duration::from_millis(self.backoff_base_ms),
            backoff_max: Duration::from_millis(self.backoff_max_ms),
            max_attempts: self.max_attempts,
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
            allow_private_targets: self.allow_private_targets,
            pool_size: self.pool_size,
            retention: HOUR.saturating_mul(hours(self.retention_hours)),
            dead_retention: HOUR.saturating_mul(hours(self.dead_retention_hours)),
            endpoint_disable_after: HOUR.saturating_mul(hours(self.endpoint_disable_after_hours)),
            max_payload_bytes: self.max_payload_bytes,
            payload_budget_bytes: self.payload_budget_bytes,
            prepared_statements: self.prepared_statements,
            database_wait: Duration::from_millis(self.database_wait_ms),
            db_lock_timeout: Duration::from_millis(self.db_lock_timeout_ms),
            db_statement_timeout: Duration::from_millis(self.db_statement_timeout_ms),
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn errors_name_the_variable() {
        let bad = [
            (
                Config {
                    batch_size: 0,
                    ..Config::default()
                },
                "WEBHOOK_BATCH_SIZE",
            ),
            (
                Config {
                    http_timeout: Duration::from_secs(70),
                    ..Config::default()
                },
                "WEBHOOK_HTTP_TIMEOUT_MS",
            ),
            (
                Config {
                    backoff_max: Duration::from_millis(1),
                    ..Config::default()
                },
                "WEBHOOK_BACKOFF_MAX_MS",
            ),
            (
                Config {
                    worker_id: " ".into(),
                    ..Config::default()
                },
                "WEBHOOK_WORKER_ID",
            ),
            (
                Config {
                    poll_interval: Duration::ZERO,
                    ..Config::default()
                },
                "WEBHOOK_POLL_INTERVAL_MS",
            ),
            (
                Config {
                    max_payload_bytes: 1023,
                    ..Config::default()
                },
                "WEBHOOK_MAX_PAYLOAD_BYTES",
            ),
            (
                Config {
                    max_payload_bytes: 1 << 30,
                    ..Config::default()
                },
                "WEBHOOK_MAX_PAYLOAD_BYTES",
            ),
            (
                Config {
                    payload_budget_bytes: 1000,
                    ..Config::default()
                },
                "WEBHOOK_PAYLOAD_BUDGET_BYTES",
            ),
            (
                Config {
                    database_wait: Duration::from_secs(86_401),
                    ..Config::default()
                },
                "WEBHOOK_DATABASE_WAIT_MS",
            ),
            (
                Config {
                    db_lock_timeout: Duration::from_millis(5),
                    ..Config::default()
                },
                "WEBHOOK_DB_LOCK_TIMEOUT_MS",
            ),
            (
                Config {
                    db_statement_timeout: Duration::from_millis(50),
                    ..Config::default()
                },
                "WEBHOOK_DB_STATEMENT_TIMEOUT_MS",
            ),
            (
                Config {
                    db_lock_timeout: Duration::from_secs(60),
                    ..Config::default()
                },
                "WEBHOOK_DB_LOCK_TIMEOUT_MS",
            ),
        ];
        for (config, variable) in bad {
            let err = config.validate().unwrap_err();
            assert_eq!(err.variable, variable);
            assert!(err.to_string().contains(variable), "{err}");
        }
    }

    #[test]
    fn database_limits_may_be_off() {
        Config {
            db_lock_timeout: Duration::ZERO,
            db_statement_timeout: Duration::ZERO,
            ..Config::default()
        }
        .validate()
        .unwrap();
        Config {
            db_statement_timeout: Duration::ZERO,
            ..Config::default()
        }
        .validate()
        .unwrap();
        Config {
            db_lock_timeout: Duration::ZERO,
            ..Config::default()
        }
        .validate()
        .unwrap();
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
    fn prepared_statements_parse() {
        assert_eq!("AUTO".parse(), Ok(PreparedStatements::Auto));
        assert_eq!("on".parse(), Ok(PreparedStatements::On));
        assert_eq!(" off".parse(), Ok(PreparedStatements::Off));
        assert!("sometimes".parse::<PreparedStatements>().is_err());
    }
}
