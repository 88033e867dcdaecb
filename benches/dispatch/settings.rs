//! What a run measures, read from the environment (`BENCH_*`): which scenarios, how many
//! events, for how long. The knobs that set how long a run takes have a smaller default
//! under `BENCH_QUICK=1`; the whole set is written into the report's JSON header so a
//! figure can always be read with the counts that produced it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::scenarios::ALL;
use crate::{dispatcher, sys};

/// What the run measures, from the environment (`BENCH_*`), with quick-mode defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    pub quick: bool,
    pub scenarios: Vec<String>,
    pub payload_bytes: usize,
    pub burst_events: u64,
    pub burst_repeats: u64,
    pub backlog_events: u64,
    pub poll_interval_ms: u64,
    pub steady_rates: Vec<u64>,
    pub steady_secs: u64,
    pub idle_events: u64,
    pub idle_gap_ms: u64,
    pub fanout_events: u64,
    pub fanout_endpoints: u64,
    pub producer_conns: u64,
    pub producer_rounds: u64,
    pub producer_secs: u64,
    pub scaleout_procs: Vec<u64>,
    /// A second `outboxd` binary to compare in scale-out, round by round.
    pub scaleout_ab_bin: Option<PathBuf>,
    pub ceiling_conns: u64,
    pub ceiling_secs: u64,
    pub history_rows: u64,
    pub retention_kept: u64,
    pub retention_expired: u64,
    pub retention_bulk: u64,
    /// Noisy neighbour: the healthy endpoint's burst, its rounds, the bound on its drain
    /// beside an endpoint that times out, the HTTP timeout there, the other endpoint's backlog, the
    /// fresh events sent beside it, and the seconds a rate limit is watched.
    pub noisy_events: u64,
    pub noisy_rounds: u64,
    pub noisy_bound_secs: u64,
    pub noisy_timeout_ms: u64,
    pub noisy_backlog: u64,
    pub noisy_fresh_events: u64,
    pub noisy_rate_secs: u64,
    /// Ordered delivery: the burst (and its unordered twin), the key counts, the events a
    /// key at most (the 10- and 1-key bursts go at one key's pace); the steady rate, its
    /// seconds, keys and rounds.
    pub ordered_events: u64,
    pub ordered_keys: Vec<u64>,
    pub ordered_per_key: u64,
    pub ordered_steady_rate: u64,
    pub ordered_steady_secs: u64,
    pub ordered_steady_keys: u64,
    pub ordered_steady_rounds: u64,
    pub dispatcher_threads: u64,
    pub receiver_threads: u64,
    pub max_seconds: u64,
}

fn env_u64(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .with_context(|| format!("{name} must be a whole number, got {v:?}")),
        _ => Ok(default),
    }
}

fn env_list(name: &str, default: &[u64]) -> anyhow::Result<Vec<u64>> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .split(',')
            .map(|x| {
                x.trim()
                    .parse()
                    .with_context(|| format!("{name}: bad number {x:?}"))
            })
            .collect(),
        _ => Ok(default.to_vec()),
    }
}

impl Settings {
    /// Reads the settings.
    pub fn from_env() -> anyhow::Result<Self> {
        let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| !matches!(v.trim(), "" | "0"));
        let q = |full: u64, quick_value: u64| if quick { quick_value } else { full };
        let scenarios: Vec<String> = match std::env::var("BENCH_SCENARIOS") {
            Ok(v) if !v.trim().is_empty() && v.trim() != "all" => v
                .split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .filter(|s| !s.is_empty())
                .collect(),
            _ => ALL.iter().map(|s| (*s).to_owned()).collect(),
        };
        for s in &scenarios {
            if !ALL.contains(&s.as_str()) {
                bail!(
                    "unknown scenario {s:?} in BENCH_SCENARIOS (known: {})",
                    ALL.join(",")
                );
            }
        }
        Ok(Self {
            quick,
            scenarios,
            payload_bytes: env_u64("BENCH_PAYLOAD_BYTES", 500)? as usize,
            burst_events: env_u64("BENCH_BURST_EVENTS", q(20_000, 2_000))?,
            burst_repeats: env_u64("BENCH_BURST_REPEATS", q(3, 1))?.max(1),
            backlog_events: env_u64("BENCH_BACKLOG_EVENTS", q(200_000, 40_000))?,
            poll_interval_ms: env_u64("BENCH_POLL_INTERVAL_MS", 1_000)?,
            steady_rates: env_list("BENCH_STEADY_RATES", &[500, 2_000])?,
            steady_secs: env_u64("BENCH_STEADY_SECS", q(20, 4))?,
            idle_events: env_u64("BENCH_IDLE_EVENTS", q(200, 40))?,
            idle_gap_ms: env_u64("BENCH_IDLE_GAP_MS", 50)?,
            fanout_events: env_u64("BENCH_FANOUT_EVENTS", q(5_000, 500))?,
            fanout_endpoints: env_u64("BENCH_FANOUT_ENDPOINTS", 10)?,
            producer_conns: env_u64("BENCH_PRODUCER_CONNS", 16)?,
            producer_rounds: env_u64("BENCH_PRODUCER_ROUNDS", q(6, 2))?.max(1),
            producer_secs: env_u64("BENCH_PRODUCER_SECS", q(5, 2))?.max(1),
            scaleout_procs: {
                let mut procs = env_list("BENCH_SCALEOUT_PROCS", &[1, 2, 4])?;
                if procs.contains(&0) {
                    bail!("BENCH_SCALEOUT_PROCS: process counts start at 1");
                }
                procs.sort_unstable();
                procs.dedup();
                procs
            },
            scaleout_ab_bin: std::env::var_os("BENCH_AB_BIN")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            ceiling_conns: env_u64("BENCH_CEILING_CONNS", 128)?.max(1),
            ceiling_secs: env_u64("BENCH_CEILING_SECS", q(5, 2))?.max(1),
            history_rows: env_u64("BENCH_HISTORY_ROWS", q(1_000_000, 100_000))?,
            retention_kept: env_u64("BENCH_RETENTION_KEPT", q(10_000_000, 1_000_000))?,
            retention_expired: env_u64("BENCH_RETENTION_EXPIRED", 1_000)?.max(1),
            retention_bulk: env_u64("BENCH_RETENTION_BULK", q(400_000, 40_000))?,
            noisy_events: env_u64("BENCH_NOISY_EVENTS", q(10_000, 2_000))?.max(1),
            noisy_rounds: env_u64("BENCH_NOISY_ROUNDS", q(3, 1))?.max(1),
            noisy_bound_secs: env_u64("BENCH_NOISY_BOUND_SECS", q(60, 20))?.max(1),
            noisy_timeout_ms: env_u64("BENCH_NOISY_TIMEOUT_MS", 1_000)?.max(100),
            noisy_backlog: env_u64("BENCH_NOISY_BACKLOG", q(100_000, 20_000))?,
            noisy_fresh_events: env_u64("BENCH_NOISY_FRESH_EVENTS", q(200, 60))?.max(1),
            noisy_rate_secs: env_u64("BENCH_NOISY_RATE_SECS", q(10, 4))?.max(1),
            ordered_events: env_u64("BENCH_ORDERED_EVENTS", q(20_000, 2_000))?.max(1),
            ordered_keys: {
                let keys = env_list("BENCH_ORDERED_KEYS", &[1_000, 10, 1])?;
                if keys.is_empty() || keys.contains(&0) {
                    bail!("BENCH_ORDERED_KEYS: key counts of 1 or more");
                }
                keys
            },
            ordered_per_key: env_u64("BENCH_ORDERED_PER_KEY", q(2_000, 200))?.max(1),
            ordered_steady_rate: env_u64("BENCH_ORDERED_STEADY_RATE", 2_000)?.max(1),
            ordered_steady_secs: env_u64("BENCH_ORDERED_STEADY_SECS", q(10, 4))?.max(1),
            ordered_steady_keys: env_u64("BENCH_ORDERED_STEADY_KEYS", 1_000)?.max(1),
            ordered_steady_rounds: env_u64("BENCH_ORDERED_STEADY_ROUNDS", q(2, 1))?.max(1),
            dispatcher_threads: env_u64("BENCH_DISPATCHER_THREADS", sys::nproc() as u64)?,
            receiver_threads: env_u64("BENCH_RECEIVER_THREADS", 1)?,
            max_seconds: env_u64("BENCH_MAX_SECONDS", 1_800)?,
        })
    }

    /// The ordered scenarios' settings (a macro's recursion limit keeps them apart).
    fn ordered_json(&self) -> Value {
        json!({
            "events": self.ordered_events,
            "keys": self.ordered_keys,
            "per_key": self.ordered_per_key,
            "steady_rate": self.ordered_steady_rate,
            "steady_secs": self.ordered_steady_secs,
            "steady_keys": self.ordered_steady_keys,
            "steady_rounds": self.ordered_steady_rounds,
        })
    }

    /// As JSON, for the report.
    pub fn json(&self) -> Value {
        let cfg = dispatcher::config(true, Duration::from_millis(self.poll_interval_ms));
        let mut settings = json!({
            "quick": self.quick,
            "scenarios": self.scenarios,
            "payload_bytes": self.payload_bytes,
            "burst_events": self.burst_events,
            "burst_repeats": self.burst_repeats,
            "backlog_events": self.backlog_events,
            "poll_interval_ms": self.poll_interval_ms,
            "steady_rates": self.steady_rates,
            "steady_secs": self.steady_secs,
            "idle_events": self.idle_events,
            "idle_gap_ms": self.idle_gap_ms,
            "fanout_events": self.fanout_events,
            "fanout_endpoints": self.fanout_endpoints,
            "producer_conns": self.producer_conns,
            "producer_rounds": self.producer_rounds,
            "producer_secs": self.producer_secs,
            "scaleout_procs": self.scaleout_procs,
            "scaleout_ab_binary": self.scaleout_ab_bin.as_ref().map(|p| p.display().to_string()),
            "ceiling_conns": self.ceiling_conns,
            "ceiling_secs": self.ceiling_secs,
            "history_rows": self.history_rows,
            "retention_kept": self.retention_kept,
            "retention_expired": self.retention_expired,
            "retention_bulk": self.retention_bulk,
            "noisy_events": self.noisy_events,
            "noisy_rounds": self.noisy_rounds,
            "noisy_bound_secs": self.noisy_bound_secs,
            "noisy_timeout_ms": self.noisy_timeout_ms,
            "noisy_backlog": self.noisy_backlog,
            "noisy_fresh_events": self.noisy_fresh_events,
            "noisy_rate_secs": self.noisy_rate_secs,
            "dispatcher_runtime_threads": self.dispatcher_threads,
            "receiver_runtime_threads": self.receiver_threads,
            "dispatcher_config": {
                "batch_size": cfg.batch_size,
                "concurrency": cfg.concurrency,
                "pool_size": cfg.pool_size,
                "lease_ms": cfg.lease.as_millis() as u64,
                "http_timeout_ms": cfg.http_timeout.as_millis() as u64,
                "allow_private_targets": cfg.allow_private_targets,
                "tracing": "no subscriber in-process; RUST_LOG=warn for outboxd run",
            },
        });
        settings["ordered"] = self.ordered_json();
        settings
    }
}
