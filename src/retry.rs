//! What happens after an attempt: delivered, retried later, or dead.
//!
//! Pure functions, so the schedule can be tested exhaustively. The time they return is
//! stored in the database (`next_attempt_at`), which is what makes retries survive
//! restarts: a retry is only a row with a later due time.

use std::time::Duration;

use crate::deliver::{AttemptResult, ErrorKind};

/// The retry schedule: `base × 2^(attempt−1)`, ±20% jitter, capped at `max`, and at
/// most `max_attempts` attempts in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay after the first failed attempt (before jitter).
    pub base: Duration,
    /// Ceiling on every delay, jitter and `Retry-After` included.
    pub max: Duration,
    /// Attempts in all; a failure of the last one makes the delivery dead.
    pub max_attempts: u32,
}

/// The next state of a delivery after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A 2xx: done.
    Delivered,
    /// Try again after this delay.
    Retry(Duration),
    /// Terminal: the answer cannot improve by retrying, or attempts are exhausted.
    Dead,
    /// 410 Gone: the endpoint asked not to be called again. The delivery is parked and
    /// the endpoint disabled, as the Standard Webhooks spec recommends; enabling the
    /// endpoint resumes it.
    Gone,
}

impl RetryPolicy {
    /// Delay before the attempt after `attempt` (1-based) failed. `jitter` is a
    /// uniform sample in `[0, 1)`, spreading retries of a burst over ±20%.
    pub fn backoff(&self, attempt: u32, jitter: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(62);
        let base_ms = self.base.as_millis().min(u128::from(u64::MAX)) as f64;
        let exponential = base_ms * f64::powi(2.0, exponent as i32);
        let factor = 0.8 + 0.4 * jitter.clamp(0.0, 1.0);
        let max_ms = self.max.as_millis() as f64;
        Duration::from_millis((exponential * factor).min(max_ms) as u64)
    }

    /// Decides what an attempt's result means for the delivery.
    ///
    /// 2xx is delivered. 408, 429, 5xx, 3xx (redirects are never followed, and the
    /// consumer may fix the URL's server), timeouts and connection errors are retried.
    /// Any other 4xx, and a target refused by the SSRF guard, is dead at once: retrying
    /// cannot change the answer; 410 is [`Verdict::Gone`]. On 429 and 503 a `Retry-After` replaces the backoff,
    /// capped at `max`.
    pub fn decide(&self, attempt: u32, result: &AttemptResult, jitter: f64) -> Verdict {
        let retryable = match result {
            AttemptResult::Response { status, .. } if (200..300).contains(status) => {
                return Verdict::Delivered;
            }
            AttemptResult::Response { status: 410, .. } => return Verdict::Gone,
            AttemptResult::Response { status, .. } => is_retryable_status(*status),
            // Terminal (docs/webhooks.md): a refused target, an unusable URL or secret, a
            // request that cannot be built, a bug in outboxd.
            AttemptResult::Failed { kind, .. } => !matches!(
                kind,
                ErrorKind::RefusedTarget
                    | ErrorKind::InvalidEndpoint
                    | ErrorKind::Unbuildable
                    | ErrorKind::Internal
            ),
        };
        if !retryable || attempt >= self.max_attempts {
            return Verdict::Dead;
        }
        let delay = match result {
            AttemptResult::Response {
                status: 429 | 503,
                retry_after: Some(after),
                ..
            } => (*after).min(self.max),
            _ => self.backoff(attempt, jitter),
        };
        Verdict::Retry(delay)
    }
}

/// Whether a non-2xx status may succeed later.
pub fn is_retryable_status(status: u16) -> bool {
    matches!(status, 300..=399 | 408 | 429 | 500..=599)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            base: Duration::from_secs(5),
            max: Duration::from_secs(3600),
            max_attempts: 5,
        }
    }

    fn status(code: u16) -> AttemptResult {
        AttemptResult::Response {
            status: code,
            retry_after: None,
            excerpt: String::new(),
        }
    }

    #[test]
    fn backoff_doubles_then_caps() {
        let p = policy();
        let mid = |n| p.backoff(n, 0.5);
        assert_eq!(mid(1), Duration::from_secs(5));
        assert_eq!(mid(2), Duration::from_secs(10));
        assert_eq!(mid(3), Duration::from_secs(20));
        assert_eq!(mid(10), Duration::from_secs(2560));
        assert_eq!(mid(11), Duration::from_secs(3600));
        assert_eq!(mid(u32::MAX), Duration::from_secs(3600));
    }

    #[test]
    fn jitter_stays_within_twenty_percent_and_under_the_cap() {
        let p = policy();
        for n in 1..=40 {
            for j in [0.0, 0.25, 0.5, 0.999, 1.0, -3.0, 7.0] {
                let d = p.backoff(n, j);
                let nominal = p.backoff(n, 0.5).as_millis() as f64;
                assert!(d <= p.max);
                if nominal < p.max.as_millis() as f64 / 1.2 {
                    let ratio = d.as_millis() as f64 / nominal;
                    assert!(
                        (0.799..=1.201).contains(&ratio),
                        "n={n} j={j} ratio={ratio}"
                    );
                }
            }
        }
    }

    #[test]
    fn classifies_answers() {
        let p = policy();
        assert_eq!(p.decide(1, &status(200), 0.5), Verdict::Delivered);
        assert_eq!(p.decide(1, &status(204), 0.5), Verdict::Delivered);
        for code in [301, 408, 429, 500, 502, 503, 504] {
            assert_eq!(
                p.decide(1, &status(code), 0.5),
                Verdict::Retry(Duration::from_secs(5)),
                "{code}"
            );
        }
        for code in [400, 401, 403, 404, 413, 422] {
            assert_eq!(p.decide(1, &status(code), 0.5), Verdict::Dead, "{code}");
        }
        assert_eq!(p.decide(1, &status(410), 0.5), Verdict::Gone);
        assert_eq!(p.decide(9, &status(410), 0.5), Verdict::Gone);
        let timeout = AttemptResult::Failed {
            kind: ErrorKind::Timeout,
            message: String::new(),
        };
        assert!(matches!(p.decide(2, &timeout, 0.5), Verdict::Retry(_)));
        for kind in [
            ErrorKind::RefusedTarget,
            ErrorKind::InvalidEndpoint,
            ErrorKind::Internal,
        ] {
            let terminal = AttemptResult::Failed {
                kind,
                message: String::new(),
            };
            assert_eq!(p.decide(1, &terminal, 0.5), Verdict::Dead, "{kind:?}");
        }
    }

    #[test]
    fn the_last_attempt_is_dead() {
        let p = policy();
        assert!(matches!(p.decide(4, &status(500), 0.5), Verdict::Retry(_)));
        assert_eq!(p.decide(5, &status(500), 0.5), Verdict::Dead);
        assert_eq!(p.decide(6, &status(500), 0.5), Verdict::Dead);
        assert_eq!(p.decide(5, &status(200), 0.5), Verdict::Delivered);
    }

    #[test]
    fn retry_after_replaces_backoff_on_429_and_503_only() {
        let p = policy();
        let with_after = |code, secs| AttemptResult::Response {
            status: code,
            retry_after: Some(Duration::from_secs(secs)),
            excerpt: String::new(),
        };
        assert_eq!(
            p.decide(1, &with_after(429, 120), 0.5),
            Verdict::Retry(Duration::from_secs(120))
        );
        assert_eq!(
            p.decide(1, &with_after(503, 99_999), 0.5),
            Verdict::Retry(Duration::from_secs(3600))
        );
        assert_eq!(
            p.decide(1, &with_after(500, 120), 0.5),
            Verdict::Retry(Duration::from_secs(5))
        );
    }
}
