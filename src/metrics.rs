//! Prometheus metrics, kept in atomics so recording costs one `fetch_add` on the hot
//! path, and encoded on scrape by `prometheus-client` in the Prometheus text format
//! (version 0.0.4), which escapes label values and spells numbers as the Go client does.
//!
//! A scrape takes a [`Snapshot`] first: each histogram's `_count` and `+Inf` bucket are
//! the sum of its buckets as read, so a scrape never shows `+Inf` below another bucket,
//! even while observations land.
//!
//! Queue depth and the oldest pending age are sampled by a background task (see
//! [`sample_queue`]), never queried per scrape: a scrape must not load the database.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet, prometheus_text};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

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

/// A fixed-bucket histogram: an observation is one `fetch_add` on its bucket and one
/// on the sum, with no lock and no shared count to keep in step.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One counter per bound (observations `<=` it and above the previous one), then
    /// one for observations above every bound (or NaN).
    buckets: Box<[AtomicU64]>,
    sum_micros: AtomicU64,
}

/// What a scrape reads from a [`Histogram`]: per-bucket counts (not cumulative) and a
/// count that is their sum, overflow included.
#[derive(Debug, Clone, PartialEq)]
struct HistogramSnapshot {
    buckets: Vec<(f64, u64)>,
    count: u64,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Records one observation (in the histogram's unit, seconds or items).
    pub fn observe(&self, value: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((value.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }

    /// Each bucket read once; the count derives from those reads, so the cumulative
    /// buckets never decrease and `+Inf` equals `_count`. The sum is read separately
    /// and may include an observation or two the buckets do not (Prometheus tolerates
    /// that; it cannot tolerate buckets above the count).
    fn snapshot(&self) -> HistogramSnapshot {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        HistogramSnapshot {
            buckets: self
                .bounds
                .iter()
                .copied()
                .zip(counts.iter().copied())
                .collect(),
            count: counts.iter().sum(),
            sum: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
        }
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
    /// Deliveries by state: `pending`, `inflight`, `parked`, `dead`, `queued`, plus
    /// `unprocessed` for outbox rows not yet fanned out.
    pub depth: BTreeMap<&'static str, i64>,
    /// Age of the oldest event still waiting for fan-out or delivery, in seconds.
    pub oldest_pending_age_seconds: f64,
    /// Endpoints (enabled) whose circuit is open or half-open.
    pub circuits_open: i64,
    /// `(endpoint, keys)`: ordered keys blocked behind a dead head, for the endpoints
    /// that have any (at most [`MAX_LABELLED_ENDPOINTS`], those with the most first).
    pub blocked_keys: Vec<(i64, i64)>,
    /// Age of the oldest ordered event not fanned out yet (0 when none waits): what a
    /// long writing transaction anywhere in the cluster holds back.
    pub ordering_horizon_wait_seconds: f64,
}

/// Every metric a [`Dispatcher`](crate::Dispatcher) records ([`Dispatcher::metrics`]):
/// deliveries by outcome (in total, and per endpoint for the first 200 endpoints seen,
/// so that many tenants cannot blow up a scrape), attempt durations, commit-to-delivery latency,
/// claim sizes, requests in flight, the LISTEN session's state, the sampled queue depth.
/// Recording is a few atomic operations; [`Metrics::render`] reads them without
/// touching the database.
///
/// [`Dispatcher::metrics`]: crate::Dispatcher::metrics
#[derive(Debug)]
pub struct Metrics {
    deliveries: [AtomicU64; 4],
    /// Read-locked on the hot path (a shared lock, then a `fetch_add`); write-locked
    /// only the first time an endpoint is seen, while fewer than
    /// [`MAX_LABELLED_ENDPOINTS`] are tracked.
    per_endpoint: RwLock<HashMap<i64, [AtomicU64; 4]>>,
    /// Duration of each HTTP attempt.
    pub(crate) attempt_duration: Histogram,
    /// From the event's creation to its 2xx.
    pub(crate) commit_to_delivery: Histogram,
    /// Deliveries per claim.
    pub(crate) claim_batch_size: Histogram,
    inflight: AtomicI64,
    listener_connected: AtomicBool,
    listener_reconnects: AtomicU64,
    notifications: AtomicU64,
    poll_ticks: AtomicU64,
    endpoints_disabled: AtomicU64,
    /// Circuit transitions: opened, closed.
    circuit_transitions: [AtomicU64; 2],
    settle_failures: AtomicU64,
    queue: Mutex<Option<QueueSample>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            deliveries: Default::default(),
            per_endpoint: RwLock::new(HashMap::new()),
            attempt_duration: Histogram::new(SECONDS),
            commit_to_delivery: Histogram::new(SECONDS),
            claim_batch_size: Histogram::new(BATCH),
            inflight: AtomicI64::new(0),
            listener_connected: AtomicBool::new(false),
            listener_reconnects: AtomicU64::new(0),
            notifications: AtomicU64::new(0),
            poll_ticks: AtomicU64::new(0),
            endpoints_disabled: AtomicU64::new(0),
            circuit_transitions: Default::default(),
            settle_failures: AtomicU64::new(0),
            queue: Mutex::new(None),
        }
    }
}

impl Metrics {
    /// The `Content-Type` of [`Metrics::render`]'s output.
    pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

    /// Counts one attempt's outcome, in total and for its endpoint (bounded).
    pub(crate) fn delivery(&self, endpoint_id: i64, outcome: DeliveryOutcome) {
        let i = outcome as usize;
        self.deliveries[i].fetch_add(1, Ordering::Relaxed);
        if let Ok(map) = self.per_endpoint.read() {
            if let Some(counts) = map.get(&endpoint_id) {
                counts[i].fetch_add(1, Ordering::Relaxed);
                return;
            }
            if map.len() >= MAX_LABELLED_ENDPOINTS {
                return;
            }
        }
        if let Ok(mut map) = self.per_endpoint.write() {
            // Another thread may have added it, or filled the map, meanwhile.
            if map.len() < MAX_LABELLED_ENDPOINTS || map.contains_key(&endpoint_id) {
                map.entry(endpoint_id).or_default()[i].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Total deliveries with this outcome so far.
    #[cfg(test)]
    pub(crate) fn deliveries_total(&self, outcome: DeliveryOutcome) -> u64 {
        self.deliveries[outcome as usize].load(Ordering::Relaxed)
    }

    /// A request started (`+1`) or finished (`-1`).
    pub(crate) fn inflight_add(&self, delta: i64) {
        self.inflight.fetch_add(delta, Ordering::Relaxed);
    }

    /// The LISTEN session came up or went down.
    pub(crate) fn set_listener_connected(&self, connected: bool) {
        self.listener_connected.store(connected, Ordering::Relaxed);
    }

    /// Whether the LISTEN session is up.
    pub fn listener_connected(&self) -> bool {
        self.listener_connected.load(Ordering::Relaxed)
    }

    /// The LISTEN session had to reconnect.
    pub(crate) fn listener_reconnected(&self) {
        self.listener_reconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// A notification arrived.
    pub(crate) fn notification(&self) {
        self.notifications.fetch_add(1, Ordering::Relaxed);
    }

    /// The poll tick woke the claim loop.
    pub(crate) fn poll_tick(&self) {
        self.poll_ticks.fetch_add(1, Ordering::Relaxed);
    }

    /// An endpoint was disabled automatically (410 Gone, or failing too long).
    pub(crate) fn endpoint_disabled(&self) {
        self.endpoints_disabled.fetch_add(1, Ordering::Relaxed);
    }

    /// A flush of outcomes failed and will be retried.
    /// Counts a circuit that opened (`true`) or closed.
    pub(crate) fn circuit_transition(&self, opened: bool) {
        self.circuit_transitions[usize::from(!opened)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn settle_failed(&self) {
        self.settle_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Flushes of outcomes that failed so far.
    pub fn settle_failures_total(&self) -> u64 {
        self.settle_failures.load(Ordering::Relaxed)
    }

    /// Replaces the sampled queue state.
    pub(crate) fn set_queue(&self, sample: QueueSample) {
        if let Ok(mut queue) = self.queue.lock() {
            *queue = Some(sample);
        }
    }

    /// Every metric's current value, read once.
    fn snapshot(&self) -> Snapshot {
        let per_endpoint = self
            .per_endpoint
            .read()
            .map(|map| {
                let mut rows: Vec<(i64, [u64; 4])> = map
                    .iter()
                    .map(|(id, counts)| (*id, counts.each_ref().map(|c| c.load(Ordering::Relaxed))))
                    .collect();
                rows.sort_unstable_by_key(|(id, _)| *id);
                rows
            })
            .unwrap_or_default();
        Snapshot {
            deliveries: self
                .deliveries
                .each_ref()
                .map(|c| c.load(Ordering::Relaxed)),
            per_endpoint,
            attempt_duration: self.attempt_duration.snapshot(),
            commit_to_delivery: self.commit_to_delivery.snapshot(),
            claim_batch_size: self.claim_batch_size.snapshot(),
            inflight: self.inflight.load(Ordering::Relaxed),
            listener_connected: self.listener_connected(),
            listener_reconnects: self.listener_reconnects.load(Ordering::Relaxed),
            notifications: self.notifications.load(Ordering::Relaxed),
            poll_ticks: self.poll_ticks.load(Ordering::Relaxed),
            endpoints_disabled: self.endpoints_disabled.load(Ordering::Relaxed),
            circuit_transitions: self
                .circuit_transitions
                .each_ref()
                .map(|c| c.load(Ordering::Relaxed)),
            settle_failures: self.settle_failures_total(),
            queue: self.queue.lock().ok().and_then(|q| q.clone()),
        }
    }

    /// The Prometheus text exposition (version 0.0.4, [`Metrics::CONTENT_TYPE`]) of every
    /// metric, as `/metrics` serves it.
    pub fn render(&self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self.snapshot()));
        let mut out = String::with_capacity(8192);
        if prometheus_text::encode(&mut out, &registry).is_err() {
            // Writing to a String cannot fail, and the collector only passes the
            // encoder's own errors on: reaching this is a bug, not a runtime condition.
            tracing::error!("the metrics exposition could not be encoded");
        }
        out
    }
}

/// Every metric's value at one scrape; encoded by `prometheus-client`.
#[derive(Debug)]
struct Snapshot {
    deliveries: [u64; 4],
    per_endpoint: Vec<(i64, [u64; 4])>,
    attempt_duration: HistogramSnapshot,
    commit_to_delivery: HistogramSnapshot,
    claim_batch_size: HistogramSnapshot,
    inflight: i64,
    listener_connected: bool,
    listener_reconnects: u64,
    notifications: u64,
    poll_ticks: u64,
    endpoints_disabled: u64,
    circuit_transitions: [u64; 2],
    settle_failures: u64,
    queue: Option<QueueSample>,
}

type Encoded = std::result::Result<(), std::fmt::Error>;

/// Counters are named without `_total`: the encoder appends it to the samples and to
/// the `# HELP`/`# TYPE` lines, so the exported names are `outboxd_..._total`.
fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> Encoded {
    encoder
        .encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&value, None)
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: V,
) -> Encoded {
    encoder
        .encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&value)
}

fn histogram(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    h: &HistogramSnapshot,
) -> Encoded {
    encoder
        .encode_descriptor(name, help, None, MetricType::Histogram)?
        .encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)
}

fn labelled_counter(
    family: &mut MetricEncoder,
    labels: &impl prometheus_client::encoding::EncodeLabelSet,
    value: u64,
) -> Encoded {
    family
        .encode_family(labels)?
        .encode_counter::<NoLabelSet, _, u64>(&value, None)
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Encoded {
        let e = &mut encoder;
        let mut family = e.encode_descriptor(
            "outboxd_deliveries",
            "Delivery attempts by outcome (delivered, retried, dead, refused by the SSRF guard).",
            None,
            MetricType::Counter,
        )?;
        for outcome in DeliveryOutcome::ALL {
            let labels = [("outcome", outcome.label())];
            labelled_counter(&mut family, &labels, self.deliveries[outcome as usize])?;
        }
        let mut family = e.encode_descriptor(
            "outboxd_endpoint_deliveries",
            "Delivery attempts by endpoint and outcome (at most 200 endpoints are labelled).",
            None,
            MetricType::Counter,
        )?;
        for (endpoint, counts) in &self.per_endpoint {
            for outcome in DeliveryOutcome::ALL {
                let labels = ([("endpoint", *endpoint)], [("outcome", outcome.label())]);
                labelled_counter(&mut family, &labels, counts[outcome as usize])?;
            }
        }
        for (name, help, h) in [
            (
                "outboxd_attempt_duration_seconds",
                "Duration of each HTTP attempt.",
                &self.attempt_duration,
            ),
            (
                "outboxd_commit_to_delivery_seconds",
                "From the event's creation (its transaction's start) to a 2xx from the endpoint.",
                &self.commit_to_delivery,
            ),
            (
                "outboxd_claim_batch_size",
                "Deliveries claimed per claim statement.",
                &self.claim_batch_size,
            ),
        ] {
            histogram(e, name, help, h)?;
        }
        for (name, help, value) in [
            (
                "outboxd_inflight_requests",
                "HTTP requests in flight.",
                self.inflight,
            ),
            (
                "outboxd_listener_connected",
                "1 while the LISTEN session is up.",
                i64::from(self.listener_connected),
            ),
        ] {
            gauge(e, name, help, value)?;
        }
        for (name, help, value) in [
            (
                "outboxd_listener_reconnects",
                "Times the LISTEN session was re-established after a loss.",
                self.listener_reconnects,
            ),
            (
                "outboxd_notifications",
                "Notifications received on the LISTEN session.",
                self.notifications,
            ),
            (
                "outboxd_poll_ticks",
                "Times the poll tick (not a notification) woke the claim loop.",
                self.poll_ticks,
            ),
            (
                "outboxd_endpoints_disabled",
                "Endpoints disabled automatically (410 Gone or failing too long).",
                self.endpoints_disabled,
            ),
            (
                "outboxd_settle_failures",
                "Flushes of outcomes the database could not take; claiming stops until one succeeds.",
                self.settle_failures,
            ),
        ] {
            counter(e, name, help, value)?;
        }
        let mut family = e.encode_descriptor(
            "outboxd_circuit_transitions",
            "Endpoint circuits opened (unhealthy failures in a row, or a Retry-After) and closed (a probe was answered), counted by the dispatcher whose settle made the change.",
            None,
            MetricType::Counter,
        )?;
        for (transition, value) in ["opened", "closed"].iter().zip(self.circuit_transitions) {
            labelled_counter(&mut family, &[("transition", *transition)], value)?;
        }
        if let Some(queue) = &self.queue {
            let mut family = e.encode_descriptor(
                "outboxd_queue_depth",
                "Deliveries by state, and outbox rows not yet fanned out (sampled).",
                None,
                MetricType::Gauge,
            )?;
            for (state, n) in &queue.depth {
                family
                    .encode_family(&[("state", *state)])?
                    .encode_gauge(n)?;
            }
            gauge(
                e,
                "outboxd_endpoints_circuit_open",
                "Endpoints whose circuit is open or half-open: their deliveries wait (sampled).",
                queue.circuits_open,
            )?;
            gauge(
                e,
                "outboxd_oldest_pending_age_seconds",
                "Age of the oldest event still waiting for fan-out or delivery (sampled).",
                queue.oldest_pending_age_seconds,
            )?;
            let mut family = e.encode_descriptor(
                "outboxd_ordering_blocked_keys",
                "Ordered keys blocked behind a dead head, by endpoint; endpoints without any are left out (sampled).",
                None,
                MetricType::Gauge,
            )?;
            for (endpoint, keys) in &queue.blocked_keys {
                family
                    .encode_family(&[("endpoint", *endpoint)])?
                    .encode_gauge(keys)?;
            }
            gauge(
                e,
                "outboxd_ordering_horizon_wait_seconds",
                "Age of the oldest ordered event not fanned out yet: a writing transaction still open holds every ordered event back (sampled).",
                queue.ordering_horizon_wait_seconds,
            )?;
        }
        Ok(())
    }
}

/// Counts the queue by state. Reads the pending and parked sets through their partial
/// indexes; `dead` and `queued` through their own partial indexes, the blocked keys
/// through the key table's partial index on them.
pub const QUEUE_SAMPLE: &str = "
WITH blocked AS (
    SELECT endpoint_id, count(*) AS keys
    FROM webhook_ordering_keys
    WHERE blocked_since IS NOT NULL
    GROUP BY endpoint_id
    ORDER BY count(*) DESC, endpoint_id
    LIMIT 200
)
SELECT
    (SELECT count(*) FROM webhook_deliveries
      WHERE state = 'pending' AND NOT (locked_by IS NOT NULL AND locked_until > now()))
      AS pending,
    (SELECT count(*) FROM webhook_deliveries
      WHERE state = 'pending' AND locked_by IS NOT NULL AND locked_until > now())
      AS inflight,
    (SELECT count(*) FROM webhook_deliveries WHERE state = 'parked') AS parked,
    (SELECT count(*) FROM webhook_deliveries WHERE state = 'dead') AS dead,
    (SELECT count(*) FROM webhook_deliveries WHERE state = 'queued') AS queued,
    ARRAY(SELECT endpoint_id FROM blocked ORDER BY endpoint_id) AS blocked_endpoints,
    ARRAY(SELECT keys FROM blocked ORDER BY endpoint_id) AS blocked_keys,
    -- The log has no time of its own: its oldest event's creation (the producer's
    -- transaction's start) stands for it.
    extract(epoch FROM now() - (SELECT o.created_at FROM webhook_ordering_log l
                                JOIN webhook_outbox o ON o.id = l.event_id
                                ORDER BY l.seq LIMIT 1))::float8 AS ordering_horizon_wait_seconds,
    -- Ordered events wait in the sequencer's log until fanned out.
    (SELECT count(*) FROM webhook_outbox WHERE processed_at IS NULL AND ordering_key IS NULL)
        + (SELECT count(*) FROM webhook_ordering_log) AS unprocessed,
    (SELECT count(*) FROM webhook_endpoints
      WHERE circuit_open_until IS NOT NULL AND active AND deleted_at IS NULL) AS circuits_open,
    extract(epoch FROM now() - least(
        (SELECT min(created_at) FROM webhook_deliveries WHERE state = 'pending'),
        (SELECT min(created_at) FROM webhook_outbox
          WHERE processed_at IS NULL AND ordering_key IS NULL AND deliver_after <= now()),
        (SELECT o.created_at FROM webhook_ordering_log l
          JOIN webhook_outbox o ON o.id = l.event_id ORDER BY l.seq LIMIT 1)
    ))::float8 AS oldest_pending_age_seconds";

/// Reads one [`QueueSample`].
pub async fn sample_queue(client: &impl tokio_postgres::GenericClient) -> Result<QueueSample> {
    let row = client.query_typed_one(QUEUE_SAMPLE, &[]).await?;
    let mut depth = BTreeMap::new();
    for state in ["pending", "inflight", "parked", "dead", "queued", "unprocessed"] {
        depth.insert(state, row.try_get::<_, i64>(state)?);
    }
    let age: Option<f64> = row.try_get("oldest_pending_age_seconds")?;
    let horizon: Option<f64> = row.try_get("ordering_horizon_wait_seconds")?;
    let endpoints: Vec<i64> = row.try_get("blocked_endpoints")?;
    let keys: Vec<i64> = row.try_get("blocked_keys")?;
    Ok(QueueSample {
        depth,
        circuits_open: row.try_get("circuits_open")?,
        oldest_pending_age_seconds: age.unwrap_or(0.0).max(0.0),
        blocked_keys: endpoints.into_iter().zip(keys).collect(),
        ordering_horizon_wait_seconds: horizon.unwrap_or(0.0).max(0.0),
    })
}

/// How often the queue is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    /// One sample line: its name, its labels (unescaped) and its value.
    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: Vec<(String, String)>,
        value: f64,
    }

    /// An exposition parsed back as a scraper reads the text format: every line a
    /// comment, a `# HELP`/`# TYPE` declaration or a well-formed sample, and every
    /// sample's family declared before it.
    #[derive(Debug)]
    struct Parsed {
        types: BTreeMap<String, String>,
        samples: Vec<Sample>,
    }

    impl Parsed {
        fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
            self.samples
                .iter()
                .find(|s| {
                    s.name == name
                        && s.labels.len() == labels.len()
                        && s.labels
                            .iter()
                            .zip(labels)
                            .all(|(a, b)| a.0 == b.0 && a.1 == b.1)
                })
                .unwrap_or_else(|| panic!("no {name}{labels:?} in {:#?}", self.samples))
                .value
        }

        /// Checks a histogram's buckets (cumulative, ascending `le`, `+Inf` last and
        /// equal to `_count`); returns the count.
        fn histogram(&self, name: &str) -> u64 {
            assert_eq!(self.types[name], "histogram");
            let bucket = format!("{name}_bucket");
            let buckets: Vec<(f64, f64)> = self
                .samples
                .iter()
                .filter(|s| s.name == bucket)
                .map(|s| {
                    assert_eq!(s.labels.len(), 1, "{s:?}");
                    assert_eq!(s.labels[0].0, "le");
                    let le = match s.labels[0].1.as_str() {
                        "+Inf" => f64::INFINITY,
                        le => le.parse().expect("le is a number"),
                    };
                    (le, s.value)
                })
                .collect();
            assert!(buckets.len() > 2, "{name}: {buckets:?}");
            assert!(
                buckets
                    .windows(2)
                    .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
                "{name}: buckets ascend and are cumulative: {buckets:?}"
            );
            let (last_le, inf) = buckets[buckets.len() - 1];
            assert_eq!(last_le, f64::INFINITY, "{name}: +Inf comes last");
            let count = self.value(&format!("{name}_count"), &[]);
            assert_eq!(inf, count, "{name}: +Inf is the count");
            assert!(self.value(&format!("{name}_sum"), &[]) >= 0.0);
            count as u64
        }
    }

    fn parse(text: &str) -> Parsed {
        let mut types = BTreeMap::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(declared) = line.strip_prefix("# TYPE ") {
                let (name, kind) = declared.split_once(' ').expect("# TYPE name kind");
                assert!(
                    types.insert(name.to_owned(), kind.to_owned()).is_none(),
                    "{name} declared twice"
                );
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            assert!(!line.is_empty(), "no blank lines in:\n{text}");
            let sample = parse_sample(line);
            let family = types
                .keys()
                .filter(|f| sample.name.starts_with(f.as_str()))
                .max_by_key(|f| f.len())
                .unwrap_or_else(|| panic!("{line:?}: no # TYPE before it"));
            let suffix = &sample.name[family.len()..];
            let allowed: &[&str] = match types[family].as_str() {
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            assert!(allowed.contains(&suffix), "{line:?} under {family}");
            samples.push(sample);
        }
        Parsed { types, samples }
    }

    fn parse_sample(line: &str) -> Sample {
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("{line:?}: no value"));
        let name = &line[..name_end];
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line:?}: a metric name"
        );
        let mut rest = line[name_end..].chars().peekable();
        let mut labels = Vec::new();
        if rest.peek() == Some(&'{') {
            rest.next();
            loop {
                let key: String = rest.by_ref().take_while(|c| *c != '=').collect();
                assert!(
                    !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{line:?}: a label name, not {key:?}"
                );
                assert_eq!(rest.next(), Some('"'), "{line:?}");
                let mut value = String::new();
                loop {
                    match rest
                        .next()
                        .unwrap_or_else(|| panic!("{line:?}: unterminated"))
                    {
                        '"' => break,
                        '\\' => match rest.next() {
                            Some('\\') => value.push('\\'),
                            Some('"') => value.push('"'),
                            Some('n') => value.push('\n'),
                            other => panic!("{line:?}: bad escape {other:?}"),
                        },
                        '\n' => panic!("{line:?}: raw newline in a label value"),
                        c => value.push(c),
                    }
                }
                labels.push((key, value));
                match rest.next() {
                    Some(',') => continue,
                    Some('}') => break,
                    other => panic!("{line:?}: expected , or }} after a label, got {other:?}"),
                }
            }
        }
        assert_eq!(rest.next(), Some(' '), "{line:?}");
        let value: String = rest.collect();
        let value = match value.as_str() {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("{line:?}: {v:?} is not a number")),
        };
        Sample {
            name: name.to_owned(),
            labels,
            value,
        }
    }

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::default();
        m.delivery(7, DeliveryOutcome::Delivered);
        m.delivery(7, DeliveryOutcome::Delivered);
        m.delivery(8, DeliveryOutcome::Dead);
        m.attempt_duration.observe(0.003);
        m.attempt_duration.observe(42.0);
        m.attempt_duration.observe(7200.0);
        let text = m.render();
        let p = parse(&text);
        let total = "outboxd_deliveries_total";
        assert_eq!(p.value(total, &[("outcome", "delivered")]), 2.0);
        assert_eq!(p.value(total, &[("outcome", "dead")]), 1.0);
        assert_eq!(p.value(total, &[("outcome", "refused")]), 0.0);
        let per = "outboxd_endpoint_deliveries_total";
        assert_eq!(
            p.value(per, &[("endpoint", "7"), ("outcome", "delivered")]),
            2.0
        );
        assert_eq!(p.value(per, &[("endpoint", "8"), ("outcome", "dead")]), 1.0);
        // Bounds are spelled as before (and as the Go client spells them).
        assert!(text.contains("outboxd_attempt_duration_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("outboxd_attempt_duration_seconds_bucket{le=\"60\"} 2\n"));
        assert!(text.contains("outboxd_attempt_duration_seconds_bucket{le=\"3600\"} 2\n"));
        // Above every bound: only in +Inf and the count.
        assert_eq!(p.histogram("outboxd_attempt_duration_seconds"), 3);
        let sum = p.value("outboxd_attempt_duration_seconds_sum", &[]);
        assert!((sum - 7242.003).abs() < 1e-3, "{sum}");
        assert_eq!(p.histogram("outboxd_claim_batch_size"), 0);
        assert!(!text.contains("outboxd_queue_depth"), "no sample yet");
    }

    /// Every name and type docs/operations.md lists, exactly once, and nothing else.
    #[test]
    fn exports_every_metric_with_its_type() {
        let m = Metrics::default();
        m.set_queue(QueueSample {
            depth: [("pending", 3), ("dead", 1)].into_iter().collect(),
            oldest_pending_age_seconds: 1.5,
            circuits_open: 1,
            blocked_keys: vec![(7, 2)],
            ordering_horizon_wait_seconds: 0.25,
        });
        m.inflight_add(2);
        m.circuit_transition(true);
        m.set_listener_connected(true);
        let p = parse(&m.render());
        let expected: BTreeMap<String, String> = [
            ("outboxd_deliveries_total", "counter"),
            ("outboxd_endpoint_deliveries_total", "counter"),
            ("outboxd_attempt_duration_seconds", "histogram"),
            ("outboxd_commit_to_delivery_seconds", "histogram"),
            ("outboxd_claim_batch_size", "histogram"),
            ("outboxd_inflight_requests", "gauge"),
            ("outboxd_listener_connected", "gauge"),
            ("outboxd_listener_reconnects_total", "counter"),
            ("outboxd_notifications_total", "counter"),
            ("outboxd_poll_ticks_total", "counter"),
            ("outboxd_endpoints_disabled_total", "counter"),
            ("outboxd_settle_failures_total", "counter"),
            ("outboxd_circuit_transitions_total", "counter"),
            ("outboxd_queue_depth", "gauge"),
            ("outboxd_endpoints_circuit_open", "gauge"),
            ("outboxd_oldest_pending_age_seconds", "gauge"),
            ("outboxd_ordering_blocked_keys", "gauge"),
            ("outboxd_ordering_horizon_wait_seconds", "gauge"),
        ]
        .into_iter()
        .map(|(n, t)| (n.to_owned(), t.to_owned()))
        .collect();
        assert_eq!(p.types, expected);
        assert_eq!(p.value("outboxd_inflight_requests", &[]), 2.0);
        assert_eq!(p.value("outboxd_listener_connected", &[]), 1.0);
        assert_eq!(p.value("outboxd_queue_depth", &[("state", "pending")]), 3.0);
        assert_eq!(p.value("outboxd_oldest_pending_age_seconds", &[]), 1.5);
        assert_eq!(p.value("outboxd_endpoints_circuit_open", &[]), 1.0);
        assert_eq!(
            p.value("outboxd_ordering_blocked_keys", &[("endpoint", "7")]),
            2.0
        );
        assert_eq!(p.value("outboxd_ordering_horizon_wait_seconds", &[]), 0.25);
        assert_eq!(
            p.value("outboxd_circuit_transitions_total", &[("transition", "opened")]),
            1.0
        );
    }

    /// A scrape racing observations still reads a valid histogram: the old encoder
    /// read the buckets and the count at different moments, so a bucket could exceed
    /// `+Inf`.
    #[test]
    fn histograms_stay_consistent_while_observed() {
        let m = Arc::new(Metrics::default());
        let stop = Arc::new(AtomicBool::new(false));
        let observers: Vec<_> = (0..2)
            .map(|t| {
                let (m, stop) = (Arc::clone(&m), Arc::clone(&stop));
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) && n < 50_000_000 {
                        // Spread over every bucket, the overflow included.
                        let value = SECONDS[(n as usize + t) % SECONDS.len()] * 1.5;
                        m.attempt_duration.observe(value);
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        for _ in 0..500 {
            let p = parse(&m.render());
            p.histogram("outboxd_attempt_duration_seconds");
        }
        stop.store(true, Ordering::Relaxed);
        let observed: u64 = observers.into_iter().map(|o| o.join().unwrap()).sum();
        let p = parse(&m.render());
        assert_eq!(p.histogram("outboxd_attempt_duration_seconds"), observed);
    }

    /// No label value outboxd exports today is free text, but whatever reaches a label
    /// must come back unchanged, not break the line.
    #[test]
    fn label_values_are_escaped() {
        let odd = "a \"quoted\" \\ back\\slash\nand a newline";
        let m = Metrics::default();
        m.set_queue(QueueSample {
            depth: [(odd, 5)].into_iter().collect(),
            oldest_pending_age_seconds: 0.0,
            circuits_open: 0,
            ..QueueSample::default()
        });
        let text = m.render();
        assert!(
            text.contains(
                r#"outboxd_queue_depth{state="a \"quoted\" \\ back\\slash\nand a newline"} 5"#
            ),
            "{text}"
        );
        let p = parse(&text);
        assert_eq!(p.value("outboxd_queue_depth", &[("state", odd)]), 5.0);
    }

    #[test]
    fn endpoint_labels_are_bounded() {
        let m = Metrics::default();
        for id in 0..(MAX_LABELLED_ENDPOINTS as i64 * 10) {
            m.delivery(id, DeliveryOutcome::Delivered);
        }
        m.delivery(0, DeliveryOutcome::Retried);
        let labelled = m.per_endpoint.read().unwrap().len();
        assert_eq!(labelled, MAX_LABELLED_ENDPOINTS);
        assert_eq!(
            m.deliveries_total(DeliveryOutcome::Delivered),
            MAX_LABELLED_ENDPOINTS as u64 * 10
        );
        let p = parse(&m.render());
        let per = "outboxd_endpoint_deliveries_total";
        assert_eq!(
            p.samples.iter().filter(|s| s.name == per).count(),
            MAX_LABELLED_ENDPOINTS * DeliveryOutcome::ALL.len()
        );
        assert_eq!(
            p.value(per, &[("endpoint", "0"), ("outcome", "retried")]),
            1.0
        );
        assert!(
            !p.samples
                .iter()
                .any(|s| s.name == per && s.labels[0].1 == MAX_LABELLED_ENDPOINTS.to_string())
        );
    }

    /// Endpoints seen for the first time from many threads at once: each counted once,
    /// never more endpoints than the cap.
    #[test]
    fn concurrent_first_deliveries_are_all_counted() {
        let m = Arc::new(Metrics::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m = Arc::clone(&m);
                std::thread::spawn(move || {
                    for id in 0..(MAX_LABELLED_ENDPOINTS as i64 + 50) {
                        m.delivery(id, DeliveryOutcome::Delivered);
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let map = m.per_endpoint.read().unwrap();
        assert_eq!(map.len(), MAX_LABELLED_ENDPOINTS);
        for counts in map.values() {
            assert_eq!(counts[0].load(Ordering::Relaxed), 4);
        }
    }
}
