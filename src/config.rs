//! The dispatcher's configuration: every setting, its default ([`defaults`]) and the
//! checks it must pass before anything starts. The `outboxd` command reads the settings
//! from environment variables or matching flags; an error names the variable.

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
    /// Requests in progress from this dispatcher to an endpoint that sets no
    /// `max_in_flight` of its own, at which claims take nothing more for it (it holds
    /// at most this plus a claim's batch): a slow endpoint never holds every send slot.
    pub endpoint_max_in_flight: u32,
    /// When an endpoint's circuit opens and for how long.
    pub circuit: crate::circuit::CircuitPolicy,
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
    /// What becomes of an ordering key whose head delivery ends dead, for endpoints
    /// that do not say (their `ordering_dead_head`).
    pub ordering_dead_head: DeadHead,
}

/// `WEBHOOK_ORDERING_DEAD_HEAD`: what happens to the events of an ordering key behind a
/// delivery that ended dead. In JSON (an endpoint's `ordering_dead_head`): `"block"`,
/// `"skip"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeadHead {
    /// The key stops for that endpoint until an operator re-drives or discards the dead
    /// delivery: a consumer that asked for order never gets an event after a lost one.
    /// Only that key waits; it shows in `stats`, the admin API and a metric.
    #[default]
    Block,
    /// The next event of the key proceeds: for consumers that only want the newest
    /// state to win.
    Skip,
}

impl DeadHead {
    /// As stored in `webhook_endpoints.ordering_dead_head` and passed to the settle.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Block => "block",
            Self::Skip => "skip",
        }
    }
}

impl std::str::FromStr for DeadHead {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "block" => Ok(Self::Block),
            "skip" => Ok(Self::Skip),
            other => Err(format!("expected block or skip, got {other:?}")),
        }
    }
}

impl std::fmt::Display for DeadHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
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

/// The default of every setting, in the unit its environment variable takes. They are
/// defined here and nowhere else: [`Config::default`] is made of them, and the `outboxd`
/// command line shows them as its flags' defaults (`outboxd run --help`).
pub mod defaults {
    use super::{DeadHead, PreparedStatements};

    /// `WEBHOOK_LISTEN`.
    pub const LISTEN: bool = true;
    /// `WEBHOOK_POLL_INTERVAL_MS`.
    pub const POLL_INTERVAL_MS: u64 = 1_000;
    /// `WEBHOOK_BATCH_SIZE`.
    pub const BATCH_SIZE: u32 = 200;
    /// `WEBHOOK_LEASE_MS`.
    pub const LEASE_MS: u64 = 60_000;
    /// `WEBHOOK_HTTP_TIMEOUT_MS`.
    pub const HTTP_TIMEOUT_MS: u64 = 15_000;
    /// `WEBHOOK_CONCURRENCY`.
    pub const CONCURRENCY: u32 = 256;
    /// `WEBHOOK_ENDPOINT_MAX_IN_FLIGHT`: a quarter of the send slots, so that a
    /// timing-out endpoint leaves three quarters to the others.
    pub const ENDPOINT_MAX_IN_FLIGHT: u32 = 64;
    /// `WEBHOOK_CIRCUIT_FAILURES`.
    pub const CIRCUIT_FAILURES: u32 = 5;
    /// `WEBHOOK_CIRCUIT_OPEN_MS`.
    pub const CIRCUIT_OPEN_MS: u64 = 5_000;
    /// `WEBHOOK_CIRCUIT_MAX_OPEN_MS` (5 minutes).
    pub const CIRCUIT_MAX_OPEN_MS: u64 = 300_000;
    /// `WEBHOOK_BACKOFF_BASE_MS`.
    pub const BACKOFF_BASE_MS: u64 = 5_000;
    /// `WEBHOOK_BACKOFF_MAX_MS` (10 hours).
    pub const BACKOFF_MAX_MS: u64 = 36_000_000;
    /// `WEBHOOK_MAX_ATTEMPTS`.
    pub const MAX_ATTEMPTS: u32 = 15;
    /// `WEBHOOK_DRAIN_TIMEOUT_MS`.
    pub const DRAIN_TIMEOUT_MS: u64 = 20_000;
    /// `WEBHOOK_ALLOW_PRIVATE_TARGETS`.
    pub const ALLOW_PRIVATE_TARGETS: bool = false;
    /// `WEBHOOK_POOL_SIZE`.
    pub const POOL_SIZE: u32 = 4;
    /// `WEBHOOK_RETENTION_HOURS`.
    pub const RETENTION_HOURS: u64 = 72;
    /// `WEBHOOK_DEAD_RETENTION_HOURS`.
    pub const DEAD_RETENTION_HOURS: u64 = 720;
    /// `WEBHOOK_ENDPOINT_DISABLE_AFTER_HOURS`.
    pub const ENDPOINT_DISABLE_AFTER_HOURS: u64 = 120;
    /// `WEBHOOK_MAX_PAYLOAD_BYTES` (4 MiB).
    pub const MAX_PAYLOAD_BYTES: u64 = 4 * 1024 * 1024;
    /// `WEBHOOK_PAYLOAD_BUDGET_BYTES` (64 MiB).
    pub const PAYLOAD_BUDGET_BYTES: u64 = 64 * 1024 * 1024;
    /// `WEBHOOK_PREPARED_STATEMENTS`.
    pub const PREPARED_STATEMENTS: PreparedStatements = PreparedStatements::Auto;
    /// `WEBHOOK_DATABASE_WAIT_MS`.
    pub const DATABASE_WAIT_MS: u64 = 300_000;
    /// `WEBHOOK_DB_LOCK_TIMEOUT_MS`.
    pub const DB_LOCK_TIMEOUT_MS: u64 = 5_000;
    /// `WEBHOOK_DB_STATEMENT_TIMEOUT_MS`.
    pub const DB_STATEMENT_TIMEOUT_MS: u64 = 30_000;
    /// `WEBHOOK_ORDERING_DEAD_HEAD`.
    pub const ORDERING_DEAD_HEAD: DeadHead = DeadHead::Block;
}

/// `hours` as a `Duration`.
const fn hours(hours: u64) -> Duration {
    Duration::from_secs(hours * 3600)
}

impl Default for Config {
    /// Every setting at its default ([`defaults`]), the worker id from
    /// [`default_worker_id`].
    fn default() -> Self {
        use defaults::*;
        Self {
            worker_id: default_worker_id(),
            listen: LISTEN,
            poll_interval: Duration::from_millis(POLL_INTERVAL_MS),
            batch_size: BATCH_SIZE,
            lease: Duration::from_millis(LEASE_MS),
            http_timeout: Duration::from_millis(HTTP_TIMEOUT_MS),
            concurrency: CONCURRENCY,
            endpoint_max_in_flight: ENDPOINT_MAX_IN_FLIGHT,
            circuit: crate::circuit::CircuitPolicy::default(),
            backoff_base: Duration::from_millis(BACKOFF_BASE_MS),
            backoff_max: Duration::from_millis(BACKOFF_MAX_MS),
            max_attempts: MAX_ATTEMPTS,
            drain_timeout: Duration::from_millis(DRAIN_TIMEOUT_MS),
            allow_private_targets: ALLOW_PRIVATE_TARGETS,
            pool_size: POOL_SIZE,
            retention: hours(RETENTION_HOURS),
            dead_retention: hours(DEAD_RETENTION_HOURS),
            endpoint_disable_after: hours(ENDPOINT_DISABLE_AFTER_HOURS),
            max_payload_bytes: MAX_PAYLOAD_BYTES,
            payload_budget_bytes: PAYLOAD_BUDGET_BYTES,
            prepared_statements: PREPARED_STATEMENTS,
            database_wait: Duration::from_millis(DATABASE_WAIT_MS),
            db_lock_timeout: Duration::from_millis(DB_LOCK_TIMEOUT_MS),
            db_statement_timeout: Duration::from_millis(DB_STATEMENT_TIMEOUT_MS),
            ordering_dead_head: ORDERING_DEAD_HEAD,
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
        range(
            "WEBHOOK_ENDPOINT_MAX_IN_FLIGHT",
            self.endpoint_max_in_flight,
            1,
            10_000,
        )?;
        range(
            "WEBHOOK_CIRCUIT_FAILURES",
            self.circuit.failures,
            1,
            1_000_000,
        )?;
        range_ms("WEBHOOK_CIRCUIT_OPEN_MS", self.circuit.open, 10, 86_400_000)?;
        range_ms(
            "WEBHOOK_CIRCUIT_MAX_OPEN_MS",
            self.circuit.max_open,
            10,
            86_400_000,
        )?;
        if self.circuit.max_open < self.circuit.open {
            return Err(ConfigError::new(
                "WEBHOOK_CIRCUIT_MAX_OPEN_MS",
                "must not be smaller than WEBHOOK_CIRCUIT_OPEN_MS",
            ));
        }
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
            (
                Config {
                    backoff_max: Duration::from_secs(31 * 86_400),
                    ..Config::default()
                },
                "WEBHOOK_BACKOFF_MAX_MS",
            ),
            (
                Config {
                    retention: Duration::from_secs(60),
                    ..Config::default()
                },
                "WEBHOOK_RETENTION_HOURS",
            ),
            (
                Config {
                    dead_retention: HOUR * 100_001,
                    ..Config::default()
                },
                "WEBHOOK_DEAD_RETENTION_HOURS",
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
    fn prepared_statements_parse() {
        assert_eq!("AUTO".parse(), Ok(PreparedStatements::Auto));
        assert_eq!("on".parse(), Ok(PreparedStatements::On));
        assert_eq!(" off".parse(), Ok(PreparedStatements::Off));
        assert!("sometimes".parse::<PreparedStatements>().is_err());
        // What `--help` shows as the default is a value the parser takes back.
        for mode in [
            PreparedStatements::Auto,
            PreparedStatements::On,
            PreparedStatements::Off,
        ] {
            assert_eq!(mode.to_string().parse(), Ok(mode));
        }
    }
}
