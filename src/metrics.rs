//! Prometheus metrics, kept in atomics so recording costs nothing measurable on the hot
//! path, and rendered in the text exposition format on scrape.
//!
//! Queue depth and the oldest pending age are sampled by a background task (see
//! [`sample_queue`]), never queried per scrape: a scrape must not load the database.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::db::Pool;
use crate::error::Result;

/// How a delivery attempt ended, as the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// 2xx.
    Delivered,
    /// Failed; another attempt is scheduled.
    Retried,
    /// Failed for good.
    Dead,
    /// The SSRF guard refused the target (also terminal).
    Refused,
}

impl DeliveryOutcome {
    const ALL: [Self; 4] = [Self::Delivered, Self::Retried, Self::Dead, Self::Refused];

    fn label(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Retried => "retried",
            Self::Dead => "dead",
            Self::Refused => "refused",
        }
    }
}

/// Most endpoints tracked with their own `endpoint` label; beyond this, outcomes are
/// only counted in the unlabelled totals, so a large tenant count cannot blow up the
/// scrape.
pub const MAX_LABELLED_ENDPOINTS: usize = 200;

/// A fixed-bucket histogram.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation (in the histogram's unit, seconds or items).
    pub fn observe(&self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros
            .fetch_add((value.max(0.0) * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str) {
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let total = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {total}");
    }
}

const SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 3600.0,
];
const BATCH: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0,
];

/// Sampled queue state.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct QueueSample {
    /// Deliveries by state: `pending`, `inflight`, `parked`, `dead`, plus `unprocessed`
    /// for outbox rows not yet fanned out.
    pub depth: BTreeMap<&'static str, i64>,
    /// Age of the oldest event still waiting for fan-out or delivery, in seconds.
    pub oldest_pending_age_seconds: f64,
}

/// Every metric outboxd exports. Shared by the dispatcher, the listener and the
/// metrics server.
#[derive(Debug)]
pub struct Metrics {
    deliveries: [AtomicU64; 4],
    per_endpoint: Mutex<HashMap<i64, [u64; 4]>>,
    /// Duration of each HTTP attempt.
    pub attempt_duration: Histogram,
    /// From the event's creation to its 2xx.
    pub commit_to_delivery: Histogram,
    /// Deliveries per claim.
    pub claim_batch_size: Histogram,
    inflight: AtomicI64,
    listener_connected: AtomicBool,
    listener_reconnects: AtomicU64,
    notifications: AtomicU64,
    poll_ticks: AtomicU64,
    endpoints_disabled: AtomicU64,
    settle_failures: AtomicU64,
    queue: Mutex<Option<QueueSample>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            deliveries: Default::default(),
            per_endpoint: Mutex::new(HashMap::new()),
            attempt_duration: Histogram::new(SECONDS),
            commit_to_delivery: Histogram::new(SECONDS),
            claim_batch_size: Histogram::new(BATCH),
            inflight: AtomicI64::new(0),
            listener_connected: AtomicBool::new(false),
            listener_reconnects: AtomicU64::new(0),
            notifications: AtomicU64::new(0),
            poll_ticks: AtomicU64::new(0),
            endpoints_disabled: AtomicU64::new(0),
            settle_failures: AtomicU64::new(0),
            queue: Mutex::new(None),
        }
    }
}

impl Metrics {
    /// Counts one attempt's outcome, in total and for its endpoint (bounded).
    pub fn delivery(&self, endpoint_id: i64, outcome: DeliveryOutcome) {
        self.deliveries[outcome as usize].fetch_add(1, Ordering::Relaxed);
        if let Ok(mut map) = self.per_endpoint.lock() {
            let len = map.len();
            match map.get_mut(&endpoint_id) {
                Some(counts) => counts[outcome as usize] += 1,
                None if len < MAX_LABELLED_ENDPOINTS => {
                    let mut counts = [0; 4];
                    counts[outcome as usize] = 1;
                    map.insert(endpoint_id, counts);
                }
                None => {}
            }
        }
    }

    /// Total deliveries with this outcome so far.
    pub fn deliveries_total(&self, outcome: DeliveryOutcome) -> u64 {
        self.deliveries[outcome as usize].load(Ordering::Relaxed)
    }

    /// A request started (`+1`) or finished (`-1`).
    pub fn inflight_add(&self, delta: i64) {
        self.inflight.fetch_add(delta, Ordering::Relaxed);
    }

    /// The LISTEN session came up or went down.
    pub fn set_listener_connected(&self, connected: bool) {
        self.listener_connected.store(connected, Ordering::Relaxed);
    }

    /// Whether the LISTEN session is up.
    pub fn listener_connected(&self) -> bool {
        self.listener_connected.load(Ordering::Relaxed)
    }

    /// The LISTEN session had to reconnect.
    pub fn listener_reconnected(&self) {
        self.listener_reconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// A notification arrived.
    pub fn notification(&self) {
        self.notifications.fetch_add(1, Ordering::Relaxed);
    }

    /// The poll tick woke the claim loop.
    pub fn poll_tick(&self) {
        self.poll_ticks.fetch_add(1, Ordering::Relaxed);
    }

    /// An endpoint was disabled automatically (410 Gone, or failing too long).
    pub fn endpoint_disabled(&self) {
        self.endpoints_disabled.fetch_add(1, Ordering::Relaxed);
    }

    /// A flush of outcomes failed and will be retried.
    pub fn settle_failed(&self) {
        self.settle_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Flushes of outcomes that failed so far.
    pub fn settle_failures_total(&self) -> u64 {
        self.settle_failures.load(Ordering::Relaxed)
    }

    /// Replaces the sampled queue state.
    pub fn set_queue(&self, sample: QueueSample) {
        if let Ok(mut queue) = self.queue.lock() {
            *queue = Some(sample);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let header = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        header(
            &mut out,
            "outboxd_deliveries_total",
            "counter",
            "Delivery attempts by outcome (delivered, retried, dead, refused by the SSRF guard).",
        );
        for outcome in DeliveryOutcome::ALL {
            let _ = writeln!(
                out,
                "outboxd_deliveries_total{{outcome=\"{}\"}} {}",
                outcome.label(),
                self.deliveries_total(outcome)
            );
        }
        header(
            &mut out,
            "outboxd_endpoint_deliveries_total",
            "counter",
            "Delivery attempts by endpoint and outcome (at most 200 endpoints are labelled).",
        );
        if let Ok(map) = self.per_endpoint.lock() {
            let sorted: BTreeMap<_, _> = map.iter().collect();
            for (endpoint, counts) in sorted {
                for outcome in DeliveryOutcome::ALL {
                    let _ = writeln!(
                        out,
                        "outboxd_endpoint_deliveries_total{{endpoint=\"{endpoint}\",outcome=\"{}\"}} {}",
                        outcome.label(),
                        counts[outcome as usize]
                    );
                }
            }
        }
        header(
            &mut out,
            "outboxd_attempt_duration_seconds",
            "histogram",
            "Duration of each HTTP attempt.",
        );
        self.attempt_duration
            .render(&mut out, "outboxd_attempt_duration_seconds");
        header(
            &mut out,
            "outboxd_commit_to_delivery_seconds",
            "histogram",
            "From the event's creation (its transaction's start) to a 2xx from the endpoint.",
        );
        self.commit_to_delivery
            .render(&mut out, "outboxd_commit_to_delivery_seconds");
        header(
            &mut out,
            "outboxd_claim_batch_size",
            "histogram",
            "Deliveries claimed per claim statement.",
        );
        self.claim_batch_size
            .render(&mut out, "outboxd_claim_batch_size");
        let gauge = |out: &mut String, name: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        gauge(
            &mut out,
            "outboxd_inflight_requests",
            "HTTP requests in flight.",
            self.inflight.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut out,
            "outboxd_listener_connected",
            "1 while the LISTEN session is up.",
            u8::from(self.listener_connected()).to_string(),
        );
        counter(
            &mut out,
            "outboxd_listener_reconnects_total",
            "Times the LISTEN session was re-established after a loss.",
            self.listener_reconnects.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "outboxd_notifications_total",
            "Notifications received on the LISTEN session.",
            self.notifications.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "outboxd_poll_ticks_total",
            "Times the poll tick (not a notification) woke the claim loop.",
            self.poll_ticks.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "outboxd_endpoints_disabled_total",
            "Endpoints disabled automatically (410 Gone or failing too long).",
            self.endpoints_disabled.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "outboxd_settle_failures_total",
            "Flushes of outcomes the database could not take; claiming stops until one succeeds.",
            self.settle_failures.load(Ordering::Relaxed),
        );
        let queue = self.queue.lock().ok().and_then(|q| q.clone());
        if let Some(queue) = queue {
            header(
                &mut out,
                "outboxd_queue_depth",
                "gauge",
                "Deliveries by state, and outbox rows not yet fanned out (sampled).",
            );
            for (state, n) in &queue.depth {
                let _ = writeln!(out, "outboxd_queue_depth{{state=\"{state}\"}} {n}");
            }
            gauge(
                &mut out,
                "outboxd_oldest_pending_age_seconds",
                "Age of the oldest event still waiting for fan-out or delivery (sampled).",
                queue.oldest_pending_age_seconds.to_string(),
            );
        }
        out
    }
}

/// Counts the queue by state. Reads the pending and parked sets through their partial
/// indexes; `dead` through its own partial index.
pub const QUEUE_SAMPLE: &str = "
SELECT
    (SELECT count(*) FROM webhook_deliveries
      WHERE state = 'pending' AND NOT (locked_by IS NOT NULL AND locked_until > now())),
    (SELECT count(*) FROM webhook_deliveries
      WHERE state = 'pending' AND locked_by IS NOT NULL AND locked_until > now()),
    (SELECT count(*) FROM webhook_deliveries WHERE state = 'parked'),
    (SELECT count(*) FROM webhook_deliveries WHERE state = 'dead'),
    (SELECT count(*) FROM webhook_outbox WHERE processed_at IS NULL),
    extract(epoch FROM now() - least(
        (SELECT min(created_at) FROM webhook_deliveries WHERE state = 'pending'),
        (SELECT min(created_at) FROM webhook_outbox
          WHERE processed_at IS NULL AND deliver_after <= now())
    ))::float8";

/// Reads one [`QueueSample`].
pub async fn sample_queue(pool: &Pool) -> Result<QueueSample> {
    let client = pool.get().await?;
    let row = client.query_typed_one(QUEUE_SAMPLE, &[]).await?;
    let mut depth = BTreeMap::new();
    for (i, state) in ["pending", "inflight", "parked", "dead", "unprocessed"]
        .into_iter()
        .enumerate()
    {
        depth.insert(state, row.get::<_, i64>(i));
    }
    Ok(QueueSample {
        depth,
        oldest_pending_age_seconds: row.get::<_, Option<f64>>(5).unwrap_or(0.0).max(0.0),
    })
}

/// How often the queue is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::default();
        m.delivery(7, DeliveryOutcome::Delivered);
        m.delivery(7, DeliveryOutcome::Delivered);
        m.delivery(8, DeliveryOutcome::Dead);
        m.attempt_duration.observe(0.003);
        m.attempt_duration.observe(42.0);
        let text = m.render();
        assert!(text.contains("outboxd_deliveries_total{outcome=\"delivered\"} 2"));
        assert!(text.contains("outboxd_deliveries_total{outcome=\"dead\"} 1"));
        assert!(
            text.contains(
                "outboxd_endpoint_deliveries_total{endpoint=\"7\",outcome=\"delivered\"} 2"
            )
        );
        assert!(text.contains("outboxd_attempt_duration_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("outboxd_attempt_duration_seconds_bucket{le=\"60\"} 2"));
        assert!(text.contains("outboxd_attempt_duration_seconds_count 2"));
        assert!(!text.contains("outboxd_queue_depth{"), "no sample yet");
    }

    #[test]
    fn endpoint_labels_are_bounded() {
        let m = Metrics::default();
        for id in 0..(MAX_LABELLED_ENDPOINTS as i64 * 10) {
            m.delivery(id, DeliveryOutcome::Delivered);
        }
        let labelled = m.per_endpoint.lock().unwrap().len();
        assert_eq!(labelled, MAX_LABELLED_ENDPOINTS);
        assert_eq!(
            m.deliveries_total(DeliveryOutcome::Delivered),
            MAX_LABELLED_ENDPOINTS as u64 * 10
        );
    }
}
