//! The circuit breaker per endpoint (issue 16, sql/0011): consecutive failures of the
//! kinds that signal an unhealthy consumer (5xx, timeouts, refused connections) open it;
//! while open nothing is sent and no attempt is spent; then a single probe goes out, a
//! success closes it and the backlog flows, a failure re-opens it for longer. A
//! `Retry-After` on 429/503 pauses the whole endpoint. Each opening and closing is an
//! operational event, delivered to the endpoints subscribed to `outboxd.*` and never to
//! the endpoint it is about.
//!
//! Real `outboxd run` processes, configured as an operator would
//! (`WEBHOOK_CIRCUIT_FAILURES`, `WEBHOOK_CIRCUIT_OPEN_MS`, `WEBHOOK_CIRCUIT_MAX_OPEN_MS`),
//! with small intervals and generous waits.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use crate::harness::{Receiver, Reply, Spawned, TestDb, WAIT, eventually};
use crate::noisy_neighbour::{cli, dispatcher, stop, update_endpoint};

/// A port nothing listens on (bound to 127.0.0.1:0, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local address")
        .port()
}

/// An endpoint's circuit columns.
#[derive(Debug, Clone, PartialEq)]
struct Circuit {
    failures: i32,
    opens: i32,
    open_until: Option<SystemTime>,
    probe_until: Option<SystemTime>,
    /// `circuit_open_until > now()` by the database's clock.
    open_now: bool,
}

impl Circuit {
    fn closed(&self) -> bool {
        self.failures == 0
            && self.opens == 0
            && self.open_until.is_none()
            && self.probe_until.is_none()
    }
}

async fn circuit(db: &TestDb, endpoint: i64) -> Circuit {
    let row = db
        .client
        .query_one(
            "SELECT circuit_failures, circuit_opens, circuit_open_until, circuit_probe_until,
                    coalesce(circuit_open_until > now(), false)
             FROM webhook_endpoints WHERE id = $1",
            &[&endpoint],
        )
        .await
        .expect("the endpoint's circuit");
    Circuit {
        failures: row.get(0),
        opens: row.get(1),
        open_until: row.get(2),
        probe_until: row.get(3),
        open_now: row.get(4),
    }
}

/// The sum of the attempts of an endpoint's deliveries, and its attempt rows.
async fn attempts(db: &TestDb, endpoint: i64) -> (i64, i64) {
    let row = db
        .client
        .query_one(
            "SELECT (SELECT coalesce(sum(attempts), 0)::int8 FROM webhook_deliveries
                     WHERE endpoint_id = $1),
                    (SELECT count(*) FROM webhook_attempts WHERE endpoint_id = $1)",
            &[&endpoint],
        )
        .await
        .expect("attempts");
    (row.get(0), row.get(1))
}

/// Waits until `endpoint`'s circuit is open and what was sent before it opened has been
/// answered (or timed out) and settled, so that no stale failure re-opens it later.
async fn wait_opened_and_unleased(db: &TestDb, endpoint: i64) {
    db.wait_until(&format!(
        "SELECT circuit_open_until IS NOT NULL FROM webhook_endpoints WHERE id = {endpoint}"
    ))
    .await;
    wait_unleased(db, &[endpoint]).await;
}

/// Waits until none of `endpoints`' deliveries is leased: every request sent has been
/// answered (or timed out) and settled.
async fn wait_unleased(db: &TestDb, endpoints: &[i64]) {
    let list = endpoints
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    db.wait_until(&format!(
        "SELECT count(*) = 0 FROM webhook_deliveries
         WHERE endpoint_id IN ({list}) AND locked_by IS NOT NULL"
    ))
    .await;
}

/// One sample from the dispatcher's `/metrics` (`None` if the series is absent).
async fn metric(port: u16, series: &str) -> Option<f64> {
    let body = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

const OPENED: &str = "outboxd_circuit_transitions_total{transition=\"opened\"}";
const CLOSED: &str = "outboxd_circuit_transitions_total{transition=\"closed\"}";
const OPEN_GAUGE: &str = "outboxd_endpoints_circuit_open";

/// Three consecutive failures open the circuit, whatever their kind: a 500, a request
/// that times out, a connection refused. While it is open the receivers get nothing and
/// the deliveries' attempts stay as they are (8 s open, 2.5 s watched); an endpoint
/// beside them is served throughout. The gauge counts the three open circuits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_failures_open_the_circuit_and_spend_no_attempts_while_open() {
    let db = TestDb::new("circuit_open").await;
    let receiver = Receiver::start().await;
    receiver.always("/error", Reply::status(500));
    receiver.always("/hang", Reply::hang());
    let (error, _) = db.add_endpoint(&receiver.url("/error"), &[]).await;
    let (hang, _) = db.add_endpoint(&receiver.url("/hang"), &[]).await;
    let refused_url = format!("http://127.0.0.1:{}/hook", free_port());
    let (refused, _) = db.add_endpoint(&refused_url, &[]).await;
    let (healthy, _) = db.add_endpoint(&receiver.url("/healthy"), &[]).await;
    let outboxd = dispatcher(
        &db,
        "circuit_open",
        &[
            ("WEBHOOK_HTTP_TIMEOUT_MS", "1000"),
            ("WEBHOOK_CIRCUIT_FAILURES", "3"),
            ("WEBHOOK_CIRCUIT_OPEN_MS", "8000"),
            ("WEBHOOK_CIRCUIT_MAX_OPEN_MS", "60000"),
            ("METRICS_ADDR", "127.0.0.1:0"),
        ],
    );
    let metrics_port = outboxd.served_port("serving /metrics").await;
    for n in 0..6 {
        db.enqueue("order.created", &json!({ "n": n })).await;
    }
    let failing = [error, hang, refused];
    db.wait_until(&format!(
        "SELECT count(*) = 3 FROM webhook_endpoints
         WHERE id IN ({error}, {hang}, {refused}) AND circuit_open_until > now()"
    ))
    .await;
    for endpoint in failing {
        let c = circuit(&db, endpoint).await;
        assert!(c.opens >= 1, "an open circuit counts its opening: {c:?}");
    }
    let listed: serde_json::Value =
        serde_json::from_str(cli(&db, &["endpoint", "list", "--json"]).await.trim())
            .expect("endpoint list --json");
    for endpoint in listed.as_array().expect("a list") {
        let state = &endpoint["circuit"]["state"];
        if endpoint["id"] == healthy {
            assert_eq!(state, "closed", "{endpoint}");
        } else {
            assert_eq!(state, "open", "endpoint list shows the circuit: {endpoint}");
        }
    }
    // What was in flight when the circuits opened settles first.
    wait_unleased(&db, &failing).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut before = Vec::new();
    for endpoint in failing {
        before.push(attempts(&db, endpoint).await);
    }
    let requests_before = (receiver.count_to("/error"), receiver.count_to("/hang"));
    eventually("the healthy endpoint gets everything", WAIT, || async {
        receiver.count_to("/healthy") >= 6
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    for (endpoint, before) in failing.iter().zip(&before) {
        let c = circuit(&db, *endpoint).await;
        assert!(
            c.open_now,
            "endpoint {endpoint}: the 8 s open interval was over before the watch ended, \
             the watch proves nothing (a slow machine?): {c:?}"
        );
        assert_eq!(
            attempts(&db, *endpoint).await,
            *before,
            "endpoint {endpoint}: attempts spent while its circuit was open"
        );
    }
    assert_eq!(
        (receiver.count_to("/error"), receiver.count_to("/hang")),
        requests_before,
        "requests sent while the circuit was open"
    );
    let pending: i64 = db
        .scalar(&format!(
            "SELECT count(*) FROM webhook_deliveries
             WHERE endpoint_id IN ({error}, {hang}, {refused}) AND state = 'pending'"
        ))
        .await;
    assert_eq!(pending, 18, "nothing is lost or given up while open");
    assert_eq!(
        db.scalar::<i64>(&format!(
            "SELECT count(*) FROM webhook_deliveries WHERE endpoint_id = {healthy} AND state = 'delivered'"
        ))
        .await,
        6
    );
    eventually("the gauge shows the three open circuits", WAIT, || async {
        metric(metrics_port, OPEN_GAUGE).await == Some(3.0)
    })
    .await;
    assert_eq!(
        metric(metrics_port, OPENED).await,
        Some(3.0),
        "one opening each"
    );
    stop(outboxd).await;
}

/// After the open interval, one probe goes out (two dispatchers, and the receiver takes
/// 800 ms to answer it: nothing else arrives meanwhile); its success closes the circuit
/// (the columns back to NULL and 0) and the rest of the backlog flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_probe_closes_the_circuit_and_the_backlog_flows() {
    const EVENTS: usize = 20;
    let db = TestDb::new("circuit_probe").await;
    let receiver = Receiver::start().await;
    receiver.always("/flaky", Reply::status(503));
    let (flaky, _) = db.add_endpoint(&receiver.url("/flaky"), &[]).await;
    let env = [
        ("WEBHOOK_CIRCUIT_FAILURES", "3"),
        ("WEBHOOK_CIRCUIT_OPEN_MS", "2000"),
        ("WEBHOOK_CIRCUIT_MAX_OPEN_MS", "60000"),
    ];
    let dispatchers: Vec<Spawned> = (0..2)
        .map(|i| dispatcher(&db, &format!("circuit_probe{i}"), &env))
        .collect();
    for n in 0..EVENTS {
        db.enqueue("order.created", &json!({ "n": n })).await;
    }
    wait_opened_and_unleased(&db, flaky).await;
    // From now on the receiver is healthy again, and slow to answer the first request
    // it sees healthy (the probe), so that a second request sent before the probe's
    // answer would be seen. The script itself notes which request that was.
    let healthy = Arc::new(AtomicBool::new(false));
    let probe_index = Arc::new(AtomicUsize::new(usize::MAX));
    receiver.script("/flaky", {
        let (healthy, probe_index) = (Arc::clone(&healthy), Arc::clone(&probe_index));
        move |n| {
            if !healthy.load(Ordering::SeqCst) {
                return Reply::status(503);
            }
            match probe_index.compare_exchange(usize::MAX, n, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => Reply::ok().delay(Duration::from_millis(800)),
                Err(_) => Reply::ok(),
            }
        }
    });
    healthy.store(true, Ordering::SeqCst);
    db.wait_until_within(
        &format!("SELECT count(*) = {EVENTS} FROM webhook_deliveries WHERE state = 'delivered'"),
        Duration::from_secs(60),
    )
    .await;
    for d in dispatchers {
        stop(d).await;
    }
    let first_healthy = probe_index.load(Ordering::SeqCst);
    let after: Vec<_> = receiver.requests_to("/flaky")[first_healthy..].to_vec();
    let probe = &after[0];
    let answered = probe.answered_at.expect("the probe was answered");
    let overlapping: Vec<_> = after[1..].iter().filter(|r| r.arrived < answered).collect();
    assert!(
        overlapping.is_empty(),
        "{} requests arrived while the half-open probe was still unanswered",
        overlapping.len()
    );
    let c = circuit(&db, flaky).await;
    assert!(c.closed(), "a successful probe closes the circuit: {c:?}");
    let mut ids: Vec<i64> = receiver
        .requests_to("/flaky")
        .iter()
        .filter(|r| r.answered == Some(200))
        .map(|r| r.event_id())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), EVENTS, "every event arrived once answered 200");
}

/// A probe answered with a 4xx closes the circuit: the consumer answers, and refuses
/// that one event (it ends dead, as any 4xx does); the rest of the backlog flows at once.
/// Before, a 4xx said nothing of the endpoint's health, and the next probe waited for
/// the first one's lease (60 s by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_refused_with_a_4xx_closes_the_circuit() {
    const EVENTS: i64 = 10;
    let db = TestDb::new("circuit_probe4xx").await;
    let receiver = Receiver::start().await;
    receiver.always("/flaky", Reply::status(503));
    let (flaky, _) = db.add_endpoint(&receiver.url("/flaky"), &[]).await;
    let env = [
        ("WEBHOOK_CIRCUIT_FAILURES", "3"),
        ("WEBHOOK_CIRCUIT_OPEN_MS", "1000"),
        ("WEBHOOK_CIRCUIT_MAX_OPEN_MS", "60000"),
    ];
    let outboxd = dispatcher(&db, "circuit_probe4xx", &env);
    for n in 0..EVENTS {
        db.enqueue("order.created", &json!({ "n": n })).await;
    }
    wait_opened_and_unleased(&db, flaky).await;
    // The consumer is back, and refuses the first event it sees (the probe's).
    let refused = Arc::new(AtomicBool::new(false));
    receiver.script("/flaky", {
        let refused = Arc::clone(&refused);
        move |_| match refused.swap(true, Ordering::SeqCst) {
            false => Reply::status(400),
            true => Reply::ok(),
        }
    });
    db.wait_until_within(
        &format!(
            "SELECT count(*) FILTER (WHERE state = 'delivered') = {EVENTS} - 1
                AND count(*) FILTER (WHERE state = 'dead') = 1
             FROM webhook_deliveries"
        ),
        Duration::from_secs(30),
    )
    .await;
    stop(outboxd).await;
    assert!(
        circuit(&db, flaky).await.closed(),
        "the probe's answer closed it"
    );
}

/// Once a timing-out endpoint recovers and its probe closes the circuit, its backlog goes
/// at the receiver's pace, not at the pace its timeouts set while it was failing (a request's time over the endpoint's cap per delivery:
/// 5 s / 16 here; with the defaults, 15 s / 64). 1,000 events wait while requests time
/// out; the receiver recovers once nothing is in flight, and after the close it takes
/// them in seconds; the bound is 45 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_recovery_the_backlog_flows_at_the_receivers_pace() {
    const EVENTS: i32 = 1_000;
    let db = TestDb::new("circuit_recovery").await;
    let receiver = Receiver::start().await;
    receiver.always("/recovering", Reply::hang());
    let (recovering, _) = db.add_endpoint(&receiver.url("/recovering"), &[]).await;
    let outboxd = dispatcher(
        &db,
        "circuit_recovery",
        &[
            ("WEBHOOK_HTTP_TIMEOUT_MS", "5000"),
            ("WEBHOOK_ENDPOINT_MAX_IN_FLIGHT", "16"),
            ("WEBHOOK_CIRCUIT_FAILURES", "3"),
            ("WEBHOOK_CIRCUIT_OPEN_MS", "1000"),
            ("WEBHOOK_CIRCUIT_MAX_OPEN_MS", "60000"),
        ],
    );
    db.enqueue_series(1, EVENTS).await;
    wait_opened_and_unleased(&db, recovering).await;
    receiver.always("/recovering", Reply::ok());
    db.wait_until_within(
        &format!(
            "SELECT circuit_open_until IS NULL FROM webhook_endpoints WHERE id = {recovering}"
        ),
        Duration::from_secs(30),
    )
    .await;
    let closed = Instant::now();
    let at_close: i64 = db
        .scalar(&format!(
            "SELECT count(*) FROM webhook_deliveries WHERE endpoint_id = {recovering} AND state = 'delivered'"
        ))
        .await;
    // Seen taking 5.7 to over 15 s on a loaded machine (see the note on issue 16); the
    // pace its timeouts set took 2 to 3 minutes.
    let bound = Duration::from_secs(45);
    // When the pending ones (not in flight) were due, as seconds from the close: p50,
    // p90, last.
    let spread: Vec<Option<f64>> = db
        .client
        .query_one(
            "SELECT percentile_cont(ARRAY[0.5, 0.9, 1.0]) WITHIN GROUP (ORDER BY
                        extract(epoch FROM next_attempt_at - now())::float8)
             FROM webhook_deliveries
             WHERE endpoint_id = $1 AND state = 'pending' AND locked_by IS NULL",
            &[&recovering],
        )
        .await
        .expect("the backlog's schedule")
        .get::<_, Option<Vec<Option<f64>>>>(0)
        .unwrap_or_default();
    loop {
        let delivered: i64 = db
            .scalar(&format!(
                "SELECT count(*) FROM webhook_deliveries WHERE endpoint_id = {recovering} AND state = 'delivered'"
            ))
            .await;
        if delivered == i64::from(EVENTS) {
            break;
        }
        assert!(
            closed.elapsed() < bound,
            "{delivered} of {EVENTS} delivered {bound:?} after the circuit closed ({at_close} \
             at the close; the pending ones were then due, p50/p90/last, {spread:?} s later): \
             the backlog trickles at the pace set while the endpoint timed out"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "circuit_recovery: the backlog ({} at the close) delivered {:?} after it",
        i64::from(EVENTS) - at_close,
        closed.elapsed()
    );
    stop(outboxd).await;
}

/// A failed probe re-opens the circuit for longer: with a 500 ms interval, the second
/// opening lasts about a second, the third about two, and the fourth is held to
/// `WEBHOOK_CIRCUIT_MAX_OPEN_MS` (2 s); between openings exactly one attempt (the probe)
/// is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_probe_reopens_for_longer_up_to_the_cap() {
    let db = TestDb::new("circuit_backoff").await;
    let receiver = Receiver::start().await;
    receiver.always("/down", Reply::status(500));
    let (down, _) = db.add_endpoint(&receiver.url("/down"), &[]).await;
    let outboxd = dispatcher(
        &db,
        "circuit_backoff",
        &[
            ("WEBHOOK_CIRCUIT_FAILURES", "3"),
            ("WEBHOOK_CIRCUIT_OPEN_MS", "500"),
            ("WEBHOOK_CIRCUIT_MAX_OPEN_MS", "2000"),
        ],
    );
    for n in 0..5 {
        db.enqueue("order.created", &json!({ "n": n })).await;
    }
    // For each opening k: how long it lasts from the start of the attempt that caused
    // it (the latest one), and the attempts made so far.
    let mut openings: Vec<(i32, Duration, (i64, i64))> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut seen = 0;
    while seen < 4 {
        assert!(
            Instant::now() < deadline,
            "the circuit opened {seen} times within 40 s; {:?}",
            circuit(&db, down).await
        );
        let row = db
            .client
            .query_one(
                "SELECT e.circuit_opens,
                        (extract(epoch FROM e.circuit_open_until - a.started_at) * 1000)::int8
                 FROM webhook_endpoints e,
                      (SELECT max(started_at) AS started_at FROM webhook_attempts
                       WHERE endpoint_id = $1) a
                 WHERE e.id = $1 AND e.circuit_open_until IS NOT NULL",
                &[&down],
            )
            .await;
        if let Ok(row) = row {
            let opens: i32 = row.get(0);
            if opens > seen {
                let ms: i64 = row.get(1);
                openings.push((
                    opens,
                    Duration::from_millis(ms.max(0) as u64),
                    attempts(&db, down).await,
                ));
                seen = opens;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop(outboxd).await;
    eprintln!("circuit_backoff: openings {openings:?}");
    let numbers: Vec<i32> = openings.iter().map(|o| o.0).collect();
    assert_eq!(numbers, [1, 2, 3, 4], "each re-opening is counted");
    let interval = |k: usize| openings[k].1;
    assert!(
        interval(1) >= Duration::from_millis(900),
        "the second opening lasts twice the first (500 ms): {:?}",
        interval(1)
    );
    assert!(
        interval(2) >= Duration::from_millis(1_800),
        "the third twice the second: {:?}",
        interval(2)
    );
    assert!(
        interval(3) >= Duration::from_millis(1_800) && interval(3) <= Duration::from_millis(3_000),
        "the fourth held to the 2 s cap: {:?}",
        interval(3)
    );
    for k in 1..3 {
        let (sum_a, rows_a) = openings[k].2;
        let (sum_b, rows_b) = openings[k + 1].2;
        assert_eq!(
            (sum_b - sum_a, rows_b - rows_a),
            (1, 1),
            "one probe, one attempt, between openings {} and {}",
            k + 1,
            k + 2
        );
    }
}

/// A 429 or 503 with `Retry-After: 3` pauses the whole endpoint: events committed after
/// it are not attempted until the 3 s have passed (the endpoint beside it gets them at
/// once), then everything arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_pauses_the_whole_endpoint() {
    for status in [429, 503] {
        retry_after_pauses(status).await;
    }
}

async fn retry_after_pauses(status: u16) {
    let db = TestDb::new(&format!("circuit_retry_after_{status}")).await;
    let receiver = Receiver::start().await;
    receiver.sequence(
        "/busy",
        vec![
            Reply::status(status).header("retry-after", "3"),
            Reply::ok(),
        ],
    );
    let (busy, _) = db.add_endpoint(&receiver.url("/busy"), &["order.*"]).await;
    db.add_endpoint(&receiver.url("/other"), &["order.*"]).await;
    let outboxd = dispatcher(
        &db,
        &format!("circuit_retry_after_{status}"),
        &[
            // Retry-After is capped by the backoff ceiling: let 3 s through.
            ("WEBHOOK_BACKOFF_MAX_MS", "10000"),
            ("WEBHOOK_CIRCUIT_FAILURES", "3"),
            ("WEBHOOK_CIRCUIT_OPEN_MS", "500"),
            ("WEBHOOK_CIRCUIT_MAX_OPEN_MS", "60000"),
        ],
    );
    db.enqueue("order.created", &json!({ "n": 0 })).await;
    eventually("the busy endpoint is tried", WAIT, || async {
        receiver.count_to("/busy") >= 1
    })
    .await;
    let first = receiver.requests_to("/busy")[0].clone();
    db.wait_until(&format!(
        "SELECT circuit_open_until > now() + interval '1 second' FROM webhook_endpoints WHERE id = {busy}"
    ))
    .await;
    for n in 1..=5 {
        db.enqueue("order.created", &json!({ "n": n })).await;
    }
    eventually("the endpoint beside it gets every event", WAIT, || async {
        receiver.count_to("/other") >= 6
    })
    .await;
    let quiet_until = first.arrived + Duration::from_millis(2_500);
    while Instant::now() < quiet_until {
        assert_eq!(
            receiver.count_to("/busy"),
            1,
            "{status} Retry-After: 3, yet another request went to the endpoint {:?} later",
            first.arrived.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    db.wait_until_within(
        &format!(
            "SELECT count(*) = 6 FROM webhook_deliveries WHERE endpoint_id = {busy} AND state = 'delivered'"
        ),
        Duration::from_secs(30),
    )
    .await;
    stop(outboxd).await;
    let requests = receiver.requests_to("/busy");
    let early: Vec<Duration> = requests[1..]
        .iter()
        .map(|r| r.arrived - first.arrived)
        .filter(|d| *d < Duration::from_millis(2_500))
        .collect();
    assert!(
        early.is_empty(),
        "{status}: requests {early:?} after the Retry-After"
    );
}

/// An opening and a closing are announced once each, with the endpoint's id, to the
/// endpoint subscribed to `outboxd.*`, not to the endpoint they are about (though its
/// filter names them) nor to one taking every event. The transitions are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transitions_are_announced_to_subscribers_not_to_their_subject() {
    let db = TestDb::new("circuit_events").await;
    let receiver = Receiver::start().await;
    receiver.always("/sick", Reply::status(502));
    let (watcher, _) = db
        .add_endpoint(&receiver.url("/watch"), &["outboxd.*"])
        .await;
    let (sick, _) = db
        .add_endpoint(&receiver.url("/sick"), &["order.*", "outboxd.*"])
        .await;
    db.add_endpoint(&receiver.url("/everything"), &[]).await;
    let outboxd = dispatcher(
        &db,
        "circuit_events",
        &[
            ("WEBHOOK_CIRCUIT_FAILURES", "3"),
            // Long enough that the receiver is healed before the probe: one opening.
            ("WEBHOOK_CIRCUIT_OPEN_MS", "3000"),
            ("WEBHOOK_CIRCUIT_MAX_OPEN_MS", "60000"),
            ("METRICS_ADDR", "127.0.0.1:0"),
        ],
    );
    let metrics_port = outboxd.served_port("serving /metrics").await;
    for n in 0..5 {
        db.enqueue("order.created", &json!({ "n": n })).await;
    }
    db.wait_until(&format!(
        "SELECT circuit_open_until IS NOT NULL FROM webhook_endpoints WHERE id = {sick}"
    ))
    .await;
    receiver.always("/sick", Reply::ok());
    db.wait_until_within(
        &format!(
            "SELECT count(*) = 5 FROM webhook_deliveries d JOIN webhook_outbox o ON o.id = d.event_id
             WHERE d.endpoint_id = {sick} AND o.event_type = 'order.created' AND d.state = 'delivered'"
        ),
        Duration::from_secs(30),
    )
    .await;
    db.wait_until(&format!(
        "SELECT circuit_open_until IS NULL FROM webhook_endpoints WHERE id = {sick}"
    ))
    .await;
    db.wait_until(&format!(
        "SELECT count(*) = 2 FROM webhook_deliveries d JOIN webhook_outbox o ON o.id = d.event_id
         WHERE d.endpoint_id = {watcher} AND d.state = 'delivered'
           AND o.event_type IN ('outboxd.endpoint.circuit_opened', 'outboxd.endpoint.circuit_closed')"
    ))
    .await;
    eventually("both transitions counted", WAIT, || async {
        metric(metrics_port, OPENED).await == Some(1.0)
            && metric(metrics_port, CLOSED).await == Some(1.0)
    })
    .await;
    eventually("the gauge back to none open", WAIT, || async {
        metric(metrics_port, OPEN_GAUGE).await == Some(0.0)
    })
    .await;
    stop(outboxd).await;

    for (event_type, count) in [
        ("outboxd.endpoint.circuit_opened", 1),
        ("outboxd.endpoint.circuit_closed", 1),
    ] {
        assert_eq!(
            db.scalar::<i64>(&format!(
                "SELECT count(*) FROM webhook_outbox WHERE event_type = '{event_type}'"
            ))
            .await,
            count,
            "{event_type}: one per transition"
        );
    }
    let elsewhere: i64 = db
        .scalar(&format!(
            "SELECT count(*) FROM webhook_deliveries d JOIN webhook_outbox o ON o.id = d.event_id
             WHERE o.event_type LIKE 'outboxd.%' AND d.endpoint_id <> {watcher}"
        ))
        .await;
    assert_eq!(elsewhere, 0, "announced only to the subscriber");
    let announced: Vec<serde_json::Value> = receiver
        .requests_to("/watch")
        .iter()
        .map(|r| r.json())
        .collect();
    let opened = announced
        .iter()
        .find(|b| b["type"] == "outboxd.endpoint.circuit_opened")
        .expect("the opening announced");
    assert_eq!(opened["data"]["endpoint_id"], sick);
    assert!(
        opened["data"]["open_until"].is_string(),
        "open_until in {opened}"
    );
    assert_eq!(opened["data"]["description"], "integration test");
    let closed = announced
        .iter()
        .find(|b| b["type"] == "outboxd.endpoint.circuit_closed")
        .expect("the closing announced");
    assert_eq!(closed["data"]["endpoint_id"], sick);
    assert_eq!(closed["data"]["description"], "integration test");
    assert!(
        receiver
            .requests_to("/sick")
            .iter()
            .chain(receiver.requests_to("/everything").iter())
            .all(|r| r.json()["type"] == "order.created"),
        "neither the subject nor a take-everything endpoint hears of the circuit"
    );
}

/// What does not signal an unhealthy consumer leaves the circuit closed: 4xx answers
/// (the delivery is dead, the endpoint is fine), and failures that never run three in a
/// row (500, 500, 200, ... sent one at a time with `max_in_flight` = 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_and_broken_runs_of_failures_leave_it_closed() {
    let db = TestDb::new("circuit_closed").await;
    let receiver = Receiver::start().await;
    receiver.always("/rejects", Reply::status(400));
    receiver.script("/wobbly", |n| {
        if n % 3 == 2 {
            Reply::ok()
        } else {
            Reply::status(500)
        }
    });
    let (rejects, _) = db.add_endpoint(&receiver.url("/rejects"), &[]).await;
    let (wobbly, _) = db.add_endpoint(&receiver.url("/wobbly"), &[]).await;
    update_endpoint(&db, wobbly, &["--max-in-flight", "1"]).await;
    let outboxd = dispatcher(
        &db,
        "circuit_closed",
        &[
            ("WEBHOOK_CIRCUIT_FAILURES", "3"),
            ("WEBHOOK_CIRCUIT_OPEN_MS", "60000"),
        ],
    );
    for n in 0..10 {
        db.enqueue("order.created", &json!({ "n": n })).await;
    }
    db.wait_until_within(
        &format!(
            "SELECT count(*) = 10 FROM webhook_deliveries WHERE endpoint_id = {rejects} AND state = 'dead'"
        ),
        Duration::from_secs(30),
    )
    .await;
    db.wait_until_within(
        &format!(
            "SELECT count(*) = 10 FROM webhook_deliveries WHERE endpoint_id = {wobbly} AND state = 'delivered'"
        ),
        Duration::from_secs(60),
    )
    .await;
    stop(outboxd).await;
    assert_eq!(
        receiver.count_to("/wobbly"),
        30,
        "two failures before each success"
    );
    for endpoint in [rejects, wobbly] {
        let c = circuit(&db, endpoint).await;
        assert!(
            c.opens == 0 && c.open_until.is_none() && c.failures < 3,
            "endpoint {endpoint}: {c:?}"
        );
    }
    let opened: i64 = db
        .scalar("SELECT count(*) FROM webhook_outbox WHERE event_type = 'outboxd.endpoint.circuit_opened'")
        .await;
    assert_eq!(opened, 0, "never opened");
}
