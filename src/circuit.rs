//! The circuit breaker per endpoint: which attempts say a consumer is unhealthy, how
//! long an open circuit pauses it, and what a settle reports of its transitions.
//!
//! The state lives on the endpoint row (`sql/0011_endpoint_limits_and_circuit.sql`), so
//! every dispatcher sees the same circuit: the settle function counts consecutive
//! unhealthy failures and opens, re-opens or closes it in the transaction that records
//! the attempts, and the claim takes none of an open endpoint's deliveries (a half-open
//! one gets a single probe). This module decides what each attempt contributes.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::deliver::{AttemptResult, ErrorKind};

/// When a circuit opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitPolicy {
    /// Consecutive unhealthy failures that open a closed circuit
    /// (`WEBHOOK_CIRCUIT_FAILURES`).
    pub failures: u32,
    /// How long the first opening lasts (`WEBHOOK_CIRCUIT_OPEN_MS`); each consecutive
    /// opening (a failed probe) doubles it.
    pub open: Duration,
    /// The longest an opening lasts, a `Retry-After` pause included
    /// (`WEBHOOK_CIRCUIT_MAX_OPEN_MS`).
    pub max_open: Duration,
}

impl Default for CircuitPolicy {
    fn default() -> Self {
        use crate::config::defaults;
        Self {
            failures: defaults::CIRCUIT_FAILURES,
            open: Duration::from_millis(defaults::CIRCUIT_OPEN_MS),
            max_open: Duration::from_millis(defaults::CIRCUIT_MAX_OPEN_MS),
        }
    }
}

/// What one attempt says about its endpoint's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// An answer that is neither a server error nor a 429 (a 2xx; a 3xx or 4xx refuses
    /// the event, it does not fail): the endpoint works. It breaks a run of failures and
    /// closes a half-open circuit.
    Healthy,
    /// A timeout, a connection that failed or broke, a 5xx: counts toward opening.
    Unhealthy,
    /// A 429 or 503 with `Retry-After`: the consumer asked for a pause. A 503 counts as
    /// unhealthy as well.
    Pause {
        /// How long it asked for.
        wait: Duration,
        /// Whether it is also a failure that counts (a 503).
        unhealthy: bool,
    },
    /// Anything else (a 429 without `Retry-After`, a refused target, a request that
    /// could not be built, a bug in outboxd): the consumer's health is not in question.
    Neutral,
}

/// What `result` says about the endpoint's health.
pub fn signal(result: &AttemptResult) -> Signal {
    match result {
        AttemptResult::Response { status, .. } if (200..500).contains(status) && *status != 429 => {
            Signal::Healthy
        }
        AttemptResult::Response {
            status: status @ (429 | 503),
            retry_after: Some(wait),
            ..
        } => Signal::Pause {
            wait: *wait,
            unhealthy: *status == 503,
        },
        AttemptResult::Response { status, .. } if (500..600).contains(status) => Signal::Unhealthy,
        AttemptResult::Response { .. } => Signal::Neutral,
        AttemptResult::Failed { kind, .. } => match kind {
            ErrorKind::Timeout | ErrorKind::Connect | ErrorKind::Network => Signal::Unhealthy,
            ErrorKind::RefusedTarget
            | ErrorKind::InvalidEndpoint
            | ErrorKind::Unbuildable
            | ErrorKind::Internal => Signal::Neutral,
        },
    }
}

/// What a batch of attempts tells the circuits, per endpoint, as the settle function
/// takes it.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    /// Endpoints with at least one success in the batch.
    pub healthy: Vec<i64>,
    /// Endpoints with unhealthy failures and no success in the batch, with their count.
    pub unhealthy: Vec<(i64, i32)>,
    /// Endpoints that asked for a pause, with the longest wait asked (milliseconds).
    pub pauses: Vec<(i64, i64)>,
}

impl Tally {
    /// Tallies `(endpoint, signal)` pairs. A success anywhere in the batch wins over its
    /// failures: the outcomes of one batch carry no order, and the circuit must not open
    /// on an endpoint that has just answered.
    pub fn of(signals: impl IntoIterator<Item = (i64, Signal)>) -> Self {
        let mut healthy = BTreeMap::new();
        let mut failures: BTreeMap<i64, i32> = BTreeMap::new();
        let mut pauses: BTreeMap<i64, i64> = BTreeMap::new();
        for (endpoint, signal) in signals {
            match signal {
                Signal::Healthy => {
                    healthy.insert(endpoint, ());
                }
                Signal::Unhealthy => *failures.entry(endpoint).or_default() += 1,
                Signal::Pause { wait, unhealthy } => {
                    let ms = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
                    let longest = pauses.entry(endpoint).or_default();
                    *longest = (*longest).max(ms);
                    if unhealthy {
                        *failures.entry(endpoint).or_default() += 1;
                    }
                }
                Signal::Neutral => {}
            }
        }
        failures.retain(|endpoint, _| !healthy.contains_key(endpoint));
        Self {
            healthy: healthy.into_keys().collect(),
            unhealthy: failures.into_iter().collect(),
            pauses: pauses.into_iter().collect(),
        }
    }

    /// The part of it about `endpoint`.
    pub fn only(&self, endpoint: i64) -> Self {
        Self {
            healthy: self
                .healthy
                .iter()
                .copied()
                .filter(|&e| e == endpoint)
                .collect(),
            unhealthy: self
                .unhealthy
                .iter()
                .copied()
                .filter(|&(e, _)| e == endpoint)
                .collect(),
            pauses: self
                .pauses
                .iter()
                .copied()
                .filter(|&(e, _)| e == endpoint)
                .collect(),
        }
    }
}

/// Each endpoint's run of consecutive unhealthy failures, as one dispatcher sees them.
///
/// Kept in the dispatcher, not in the endpoint row: a write per failure would make
/// dispatchers settling for one failing endpoint queue on its row. The row is written
/// when a run reaches the threshold (the circuit opens). With several dispatchers each
/// counts its own attempts, so a circuit opens after the threshold in a row at one of
/// them.
#[derive(Debug, Default)]
pub(crate) struct Runs {
    runs: std::collections::HashMap<i64, i32>,
}

impl Runs {
    /// Adds a batch's tally; returns it with each endpoint's unhealthy failures replaced
    /// by its run so far, as the settle function takes them. A success ends an
    /// endpoint's run; a run that reaches `threshold` starts over, since the circuit it
    /// opens stops its attempts (and a half-open probe's failure re-opens whatever its
    /// run).
    pub fn add(&mut self, mut tally: Tally, threshold: u32) -> Tally {
        for endpoint in &tally.healthy {
            self.runs.remove(endpoint);
        }
        let threshold = i32::try_from(threshold).unwrap_or(i32::MAX);
        let runs = tally
            .unhealthy
            .iter()
            .map(|&(endpoint, failures)| {
                let run = self.runs.entry(endpoint).or_default();
                *run = run.saturating_add(failures);
                let reported = (endpoint, *run);
                if *run >= threshold {
                    self.runs.remove(&endpoint);
                }
                reported
            })
            .collect();
        // Endpoints that failed once and never again are not kept forever.
        if self.runs.len() > 10_000 {
            self.runs.clear();
        }
        tally.unhealthy = runs;
        tally
    }
}

/// The circuits a settle opened (from closed) and closed; each transition happens in
/// exactly one settle, so logging here logs it once.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Transitions {
    /// Endpoints whose circuit opened.
    pub opened: Vec<i64>,
    /// Endpoints whose circuit closed after a successful probe.
    pub closed: Vec<i64>,
}

impl Transitions {
    /// Logs each transition and counts it.
    pub(crate) fn report(&self, metrics: &crate::metrics::Metrics) {
        for &endpoint_id in &self.opened {
            metrics.circuit_transition(true);
            tracing::warn!(
                endpoint_id,
                "endpoint circuit opened: its deliveries wait, unattempted, until a probe succeeds"
            );
        }
        for &endpoint_id in &self.closed {
            metrics.circuit_transition(false);
            tracing::info!(endpoint_id, "endpoint circuit closed: a probe was answered");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, retry_after: Option<u64>) -> AttemptResult {
        AttemptResult::Response {
            status: code,
            retry_after: retry_after.map(Duration::from_secs),
            excerpt: String::new(),
        }
    }

    fn failed(kind: ErrorKind) -> AttemptResult {
        AttemptResult::Failed {
            kind,
            message: String::new(),
        }
    }

    #[test]
    fn only_signs_of_an_unhealthy_consumer_count() {
        assert_eq!(signal(&status(200, None)), Signal::Healthy);
        assert_eq!(signal(&status(204, None)), Signal::Healthy);
        for code in [500, 502, 503, 504] {
            assert_eq!(signal(&status(code, None)), Signal::Unhealthy, "{code}");
        }
        for kind in [ErrorKind::Timeout, ErrorKind::Connect, ErrorKind::Network] {
            assert_eq!(signal(&failed(kind)), Signal::Unhealthy, "{kind:?}");
        }
        // The consumer answers and refuses the event: it works.
        for code in [301, 400, 401, 404, 410, 422] {
            assert_eq!(signal(&status(code, None)), Signal::Healthy, "{code}");
        }
        assert_eq!(signal(&status(429, None)), Signal::Neutral);
        for kind in [
            ErrorKind::RefusedTarget,
            ErrorKind::InvalidEndpoint,
            ErrorKind::Unbuildable,
            ErrorKind::Internal,
        ] {
            assert_eq!(signal(&failed(kind)), Signal::Neutral, "{kind:?}");
        }
    }

    #[test]
    fn retry_after_on_429_and_503_asks_for_a_pause() {
        assert_eq!(
            signal(&status(429, Some(30))),
            Signal::Pause {
                wait: Duration::from_secs(30),
                unhealthy: false
            }
        );
        assert_eq!(
            signal(&status(503, Some(5))),
            Signal::Pause {
                wait: Duration::from_secs(5),
                unhealthy: true
            }
        );
        // Elsewhere a Retry-After asks nothing of the circuit.
        assert_eq!(signal(&status(500, Some(5))), Signal::Unhealthy);
    }

    #[test]
    fn runs_add_up_across_batches_until_a_success_or_the_threshold() {
        let mut runs = Runs::default();
        let failing = |n| Tally {
            unhealthy: vec![(7, n)],
            ..Tally::default()
        };
        let mut add = |tally| runs.add(tally, 5).unhealthy;
        assert_eq!(add(failing(2)), [(7, 2)]);
        assert_eq!(add(failing(2)), [(7, 4)]);
        let healthy = Tally {
            healthy: vec![7],
            ..Tally::default()
        };
        assert_eq!(add(healthy), []);
        assert_eq!(add(failing(1)), [(7, 1)], "a success ended the run");
        assert_eq!(add(failing(4)), [(7, 5)], "the run opens the circuit");
        assert_eq!(add(failing(1)), [(7, 1)], "and starts over");
    }

    #[test]
    fn a_success_in_the_batch_wins_over_its_failures() {
        let tally = Tally::of([
            (1, Signal::Unhealthy),
            (1, Signal::Healthy),
            (2, Signal::Unhealthy),
            (2, Signal::Unhealthy),
            (3, Signal::Neutral),
            (
                4,
                Signal::Pause {
                    wait: Duration::from_millis(100),
                    unhealthy: false,
                },
            ),
            (
                4,
                Signal::Pause {
                    wait: Duration::from_millis(900),
                    unhealthy: true,
                },
            ),
        ]);
        assert_eq!(
            tally,
            Tally {
                healthy: vec![1],
                unhealthy: vec![(2, 2), (4, 1)],
                pauses: vec![(4, 900)],
            }
        );
    }
}
