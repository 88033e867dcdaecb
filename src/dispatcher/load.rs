//! What this dispatcher is sending to each endpoint: requests in progress and how long
//! they take, for the claim to take nothing more for an endpoint that already holds
//! its cap of send slots, and to place what it holds back where its turn may come.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::claim::Loads;

/// Endpoints kept once nothing is in progress to them, so that a claim still knows how
/// long their requests take; beyond this, idle ones are forgotten.
const REMEMBERED: usize = 1_024;
/// Weight of the newest request in the moving average of request times.
const WEIGHT: f64 = 0.2;
/// A request's time before any is known, in milliseconds.
const UNKNOWN_MS: f64 = 10.0;
/// Requests that take less than this free their send slots faster than claims come:
/// holding such an endpoint's work back would only cost writes and claims, so its
/// requests in progress are not held against its cap. An endpoint counts as slow
/// before its first answer, and as soon as a request has been out this long.
const SLOW_MS: f64 = 50.0;

#[derive(Debug, Default)]
struct Load {
    /// When each request in progress started (a handful per endpoint; at most the
    /// dispatcher's send slots in all).
    started: Vec<Instant>,
    /// Moving average of finished requests' times, in milliseconds.
    request_ms: Option<f64>,
}

/// Requests in progress per endpoint, each from the moment it holds a send slot until
/// it ends. Cheap to update from every send task: one short lock per request start and
/// end.
#[derive(Debug)]
pub(super) struct EndpointLoad {
    cap: u32,
    loads: Mutex<HashMap<i64, Load>>,
}

impl EndpointLoad {
    /// Nothing in progress; `cap` per endpoint without a `max_in_flight` of its own.
    pub(super) fn new(cap: u32) -> Self {
        Self {
            cap,
            loads: Mutex::new(HashMap::new()),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut HashMap<i64, Load>) -> R) -> R {
        // A panic while holding the lock leaves counts that are still counts.
        let mut loads = self.loads.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut loads)
    }

    /// A request to `endpoint` starts now; pass what this returns to [`Self::finished`].
    pub(super) fn started(&self, endpoint: i64) -> Instant {
        let now = Instant::now();
        self.with(|loads| loads.entry(endpoint).or_default().started.push(now));
        now
    }

    /// The request to `endpoint` that started at `started` has ended; it was answered
    /// after `took` (`None`: no answer, a timeout or an error, or aborted).
    pub(super) fn finished(&self, endpoint: i64, started: Instant, took: Option<Duration>) {
        self.with(|loads| {
            if let Some(load) = loads.get_mut(&endpoint) {
                if let Some(i) = load.started.iter().position(|s| *s == started) {
                    load.started.swap_remove(i);
                }
                if let Some(took) = took {
                    let ms = took.as_secs_f64() * 1_000.0;
                    load.request_ms = Some(match load.request_ms {
                        Some(average) => average + WEIGHT * (ms - average),
                        None => ms,
                    });
                }
            }
            if loads.len() > REMEMBERED {
                loads.retain(|_, load| !load.started.is_empty());
            }
        });
    }

    /// The claim's view of it: each endpoint's requests in progress, reported only while
    /// it is slow (see [`SLOW_MS`]: the longer of its answers' recent average and the age
    /// of its oldest request in progress decides), and its answers' recent average, which
    /// spaces what a claim holds back. One request stuck until its timeout makes the
    /// endpoint slow, but does not set the pace of its whole backlog.
    pub(super) fn snapshot(&self) -> Loads {
        self.snapshot_at(Instant::now())
    }

    fn snapshot_at(&self, now: Instant) -> Loads {
        let mut snapshot = Loads::idle(self.cap);
        self.with(|loads| {
            for (&endpoint, load) in loads.iter() {
                let oldest = load
                    .started
                    .iter()
                    .map(|s| now.duration_since(*s).as_secs_f64() * 1_000.0)
                    .fold(0.0, f64::max);
                let answers_ms = load.request_ms.unwrap_or(UNKNOWN_MS);
                let slow = load.request_ms.is_none() || answers_ms.max(oldest) >= SLOW_MS;
                let counted = if slow { load.started.len() } else { 0 };
                snapshot.endpoints.push(endpoint);
                snapshot
                    .in_flight
                    .push(i32::try_from(counted).unwrap_or(i32::MAX));
                snapshot.request_ms.push(answers_ms);
            }
        });
        snapshot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(load: &EndpointLoad, endpoint: i64) -> Option<(i32, f64)> {
        at(load, endpoint, Instant::now())
    }

    fn at(load: &EndpointLoad, endpoint: i64, now: Instant) -> Option<(i32, f64)> {
        let s = load.snapshot_at(now);
        let i = s.endpoints.iter().position(|&e| e == endpoint)?;
        Some((s.in_flight[i], s.request_ms[i]))
    }

    #[test]
    fn counts_requests_in_progress_and_how_long_they_take() {
        let load = EndpointLoad::new(64);
        assert_eq!(load.snapshot().cap, 64);
        assert_eq!(of(&load, 7), None);
        let a = load.started(7);
        let b = load.started(7);
        let c = load.started(8);
        assert_eq!(at(&load, 7, b).map(|(n, _)| n), Some(2), "no answer yet: slow");
        // Not answered for a second: slow, and the pace is still the guess.
        let later = a + Duration::from_secs(1);
        assert_eq!(at(&load, 7, later), Some((2, UNKNOWN_MS)));
        load.finished(7, a, Some(Duration::from_millis(100)));
        assert_eq!(at(&load, 7, later), Some((1, 100.0)), "b is still out");
        load.finished(7, b, Some(Duration::from_millis(200)));
        let (n, ms) = of(&load, 7).unwrap();
        assert_eq!(n, 0);
        assert!((ms - 120.0).abs() < 1e-9, "{ms}");
        // Answering fast: its requests in progress are not held against its cap...
        let d = load.started(9);
        load.finished(9, d, Some(Duration::from_millis(2)));
        let e = load.started(9);
        assert_eq!(at(&load, 9, e).map(|(n, _)| n), Some(0));
        // ...until one has been out for SLOW_MS.
        let stuck = e + Duration::from_millis(SLOW_MS as u64);
        assert_eq!(at(&load, 9, stuck).map(|(n, _)| n), Some(1));
        // Aborted: no time to learn from.
        load.finished(8, c, None);
        assert_eq!(at(&load, 8, c), Some((0, UNKNOWN_MS)));
        // Finished twice (never expected) stays at zero.
        load.finished(8, c, None);
        assert_eq!(at(&load, 8, c), Some((0, UNKNOWN_MS)));
    }

    #[test]
    fn idle_endpoints_are_forgotten_beyond_a_bound() {
        let load = EndpointLoad::new(4);
        load.started(-1);
        for endpoint in 0..=REMEMBERED as i64 {
            let at = load.started(endpoint);
            load.finished(endpoint, at, Some(Duration::from_millis(1)));
        }
        let s = load.snapshot();
        assert!(s.endpoints.len() <= REMEMBERED, "{}", s.endpoints.len());
        assert_eq!(of(&load, -1).map(|(n, _)| n), Some(1), "busy ones are kept");
    }
}
