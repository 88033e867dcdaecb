//! What this dispatcher is sending to each endpoint: requests in flight and how long
//! they take, for the claim to take no more than each endpoint may be sent now (its
//! in-flight cap) and to place what it holds back where its turn may come.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::claim::Loads;

/// Endpoints kept once nothing is in flight to them, so that a claim still knows how
/// long their requests take; beyond this, idle ones are forgotten.
const REMEMBERED: usize = 1_024;
/// Weight of the newest request in the moving average of request times.
const WEIGHT: f64 = 0.2;

#[derive(Debug, Clone, Copy)]
struct Load {
    in_flight: u32,
    /// Moving average of request times, in milliseconds; `None` before the first.
    request_ms: Option<f64>,
}

/// Requests in flight per endpoint, from claim to outcome. Cheap to update from every
/// send task: one short lock per request start and end.
#[derive(Debug)]
pub(super) struct EndpointLoad {
    cap: u32,
    loads: Mutex<HashMap<i64, Load>>,
}

impl EndpointLoad {
    /// No request in flight; `cap` per endpoint without a `max_in_flight` of its own.
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

    /// A claimed delivery to `endpoint` is about to be sent.
    pub(super) fn started(&self, endpoint: i64) {
        self.with(|loads| {
            loads
                .entry(endpoint)
                .or_insert(Load {
                    in_flight: 0,
                    request_ms: None,
                })
                .in_flight += 1;
        });
    }

    /// A delivery to `endpoint` is done with: its request took `took`, or none was
    /// made (handed back, parked, aborted).
    pub(super) fn finished(&self, endpoint: i64, took: Option<Duration>) {
        self.with(|loads| {
            if let Some(load) = loads.get_mut(&endpoint) {
                load.in_flight = load.in_flight.saturating_sub(1);
                if let Some(took) = took {
                    let ms = took.as_secs_f64() * 1_000.0;
                    load.request_ms = Some(match load.request_ms {
                        Some(average) => average + WEIGHT * (ms - average),
                        None => ms,
                    });
                }
            }
            if loads.len() > REMEMBERED {
                loads.retain(|_, load| load.in_flight > 0);
            }
        });
    }

    /// The claim's view of it.
    pub(super) fn snapshot(&self) -> Loads {
        let mut snapshot = Loads::idle(self.cap);
        self.with(|loads| {
            for (&endpoint, load) in loads.iter() {
                snapshot.endpoints.push(endpoint);
                snapshot
                    .in_flight
                    .push(i32::try_from(load.in_flight).unwrap_or(i32::MAX));
                // Unknown: the claim's own guess (10 ms).
                snapshot.request_ms.push(load.request_ms.unwrap_or(10.0));
            }
        });
        snapshot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(load: &EndpointLoad, endpoint: i64) -> Option<(i32, f64)> {
        let s = load.snapshot();
        let i = s.endpoints.iter().position(|&e| e == endpoint)?;
        Some((s.in_flight[i], s.request_ms[i]))
    }

    #[test]
    fn counts_requests_in_flight_and_averages_their_time() {
        let load = EndpointLoad::new(64);
        assert_eq!(load.snapshot().cap, 64);
        assert_eq!(of(&load, 7), None);
        load.started(7);
        load.started(7);
        load.started(8);
        assert_eq!(of(&load, 7), Some((2, 10.0)));
        load.finished(7, Some(Duration::from_millis(100)));
        assert_eq!(of(&load, 7), Some((1, 100.0)));
        load.finished(7, Some(Duration::from_millis(200)));
        let (n, ms) = of(&load, 7).unwrap();
        assert_eq!(n, 0);
        assert!((ms - 120.0).abs() < 1e-9, "{ms}");
        // Handed back unsent: no time to learn from.
        load.finished(8, None);
        assert_eq!(of(&load, 8), Some((0, 10.0)));
        // More done than started (never expected) stays at zero.
        load.finished(8, None);
        assert_eq!(of(&load, 8), Some((0, 10.0)));
    }

    #[test]
    fn idle_endpoints_are_forgotten_beyond_a_bound() {
        let load = EndpointLoad::new(4);
        load.started(-1);
        for endpoint in 0..=REMEMBERED as i64 {
            load.started(endpoint);
            load.finished(endpoint, Some(Duration::from_millis(1)));
        }
        let s = load.snapshot();
        assert!(s.endpoints.len() <= REMEMBERED, "{}", s.endpoints.len());
        assert_eq!(of(&load, -1), Some((1, 10.0)), "busy ones are kept");
    }
}
