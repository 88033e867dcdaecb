//! What operators watch, from the real binary: `/metrics`, `/healthz` and `/readyz` on
//! `METRICS_ADDR`, the listener's reconnect counted after its backend is killed, and
//! JSON logs with `LOG_FORMAT=json`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{
    Receiver, Reply, Spawned, TestDb, WAIT, eventually, outboxd_command, run_to_end, sigterm,
    unique,
};

/// `outboxd run` against `db`, quick to poll, loopback allowed, with `env` on top.
fn outboxd_run(db: &TestDb, env: &[(&str, &str)]) -> tokio::process::Command {
    let mut command = outboxd_command();
    command
        .arg("run")
        .env("DATABASE_URL", &db.url)
        .env("WEBHOOK_ALLOW_PRIVATE_TARGETS", "true")
        .env("WEBHOOK_POLL_INTERVAL_MS", "100")
        .env("WEBHOOK_BACKOFF_BASE_MS", "50")
        .env("WEBHOOK_BACKOFF_MAX_MS", "200")
        .env("WEBHOOK_WORKER_ID", unique("observed"));
    for (name, value) in env {
        command.env(name, value);
    }
    command
}

/// A client for the status server.
struct Status {
    base: String,
    http: reqwest::Client,
}

/// One answer from the status server.
#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: String,
    body: String,
}

impl Status {
    fn new(port: u16) -> Self {
        Self {
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("an HTTP client"),
        }
    }

    /// `None` while nothing answers (not started yet).
    async fn try_get(&self, path: &str) -> Option<Answer> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .ok()?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = response.text().await.ok()?;
        Some(Answer {
            status,
            content_type,
            body,
        })
    }

    async fn get(&self, path: &str) -> Answer {
        self.try_get(path)
            .await
            .unwrap_or_else(|| panic!("GET {path}: no answer"))
    }

    /// Waits until `path` answers `status`; returns that answer.
    async fn wait_for(&self, path: &str, status: u16, outboxd: &Spawned) -> Answer {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let answer = self.try_get(path).await;
            if let Some(answer) = answer {
                if answer.status == status {
                    return answer;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "GET {path} still answers {answer:?}; stderr:\n{}",
                    outboxd.stderr()
                );
            } else {
                assert!(
                    std::time::Instant::now() < deadline,
                    "GET {path}: nothing answers; stderr:\n{}",
                    outboxd.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The current samples, after checking the exposition's content type.
    async fn metrics(&self) -> Samples {
        let answer = self.get("/metrics").await;
        assert_eq!(answer.status, 200, "{answer:?}");
        assert!(
            answer.content_type.starts_with("text/plain"),
            "the Prometheus text format: {answer:?}"
        );
        Samples::parse(&answer.body)
    }

    /// Waits until the sample `series` is at least `min`.
    async fn wait_for_sample(&self, series: &str, min: f64) -> Samples {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let samples = self.metrics().await;
            if samples.get(series).is_some_and(|v| v >= min) {
                return samples;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{series} did not reach {min} within {WAIT:?}:\n{}",
                samples.text
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A parsed exposition: series (name with labels) to value, and the declared types.
struct Samples {
    text: String,
    values: BTreeMap<String, f64>,
    types: BTreeMap<String, String>,
}

impl Samples {
    fn parse(text: &str) -> Self {
        let mut values = BTreeMap::new();
        let mut types = BTreeMap::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if let Some(declared) = line.strip_prefix("# TYPE ") {
                let (name, kind) = declared.split_once(' ').expect("# TYPE name kind");
                types.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample line: {line:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("not a number in {line:?}"));
            assert!(
                values.insert(series.to_owned(), value).is_none(),
                "{series} appears twice"
            );
        }
        Self {
            text: text.to_owned(),
            values,
            types,
        }
    }

    fn get(&self, series: &str) -> Option<f64> {
        self.values.get(series).copied()
    }

    fn value(&self, series: &str) -> f64 {
        self.get(series)
            .unwrap_or_else(|| panic!("no sample {series} in:\n{}", self.text))
    }

    fn kind(&self, name: &str) -> &str {
        self.types
            .get(name)
            .unwrap_or_else(|| panic!("no # TYPE for {name} in:\n{}", self.text))
    }

    /// Checks a histogram: cumulative buckets that never decrease, `+Inf` equal to
    /// `_count`; returns the count.
    fn histogram(&self, name: &str) -> f64 {
        assert_eq!(self.kind(name), "histogram");
        let prefix = format!("{name}_bucket{{le=\"");
        let buckets: Vec<f64> = self
            .text
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .map(|l| l.rsplit_once(' ').unwrap().1.parse().unwrap())
            .collect();
        assert!(buckets.len() > 2, "{name} has buckets:\n{}", self.text);
        assert!(
            buckets.windows(2).all(|w| w[0] <= w[1]),
            "{name} buckets are cumulative: {buckets:?}"
        );
        let count = self.value(&format!("{name}_count"));
        assert_eq!(
            self.value(&format!("{name}_bucket{{le=\"+Inf\"}}")),
            count,
            "{name}: +Inf is the count"
        );
        assert!(self.value(&format!("{name}_sum")) >= 0.0);
        count
    }
}

/// Terminates the dispatcher's LISTEN backend; returns how many were terminated.
async fn kill_listener(db: &TestDb) -> usize {
    db.client
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = 'outboxd-listener' AND datname = current_database()",
            &[],
        )
        .await
        .expect("terminate the listener")
        .iter()
        .filter(|r| r.get::<_, bool>(0))
        .count()
}

async fn listener_backends(db: &TestDb) -> i64 {
    db.scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE application_name = 'outboxd-listener' AND datname = current_database()",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_readiness_of_the_running_binary() {
    let db = TestDb::new("metrics").await;
    let receiver = Receiver::start().await;
    // One failure, then success: a retried and a delivered outcome.
    receiver.sequence(
        "/hook",
        vec![
            Reply::status(500).body("response-body-marker-7f3a"),
            Reply::ok(),
        ],
    );
    let (endpoint, secret) = db.add_endpoint(&receiver.url("/hook"), &[]).await;
    // An endpoint failing for 200 hours (and still: a retry is due), subscribed to
    // nothing: housekeeping disables it at start-up, which the endpoints_disabled counter
    // must show.
    let (failing, _) = db
        .add_endpoint(&receiver.url("/failing"), &["never.sent"])
        .await;
    db.client
        .execute(
            "UPDATE webhook_endpoints SET failing_since = now() - interval '200 hours',
                 failing_until = now() + interval '1 hour'
             WHERE id = $1",
            &[&failing],
        )
        .await
        .unwrap();

    let outboxd = Spawned::start(outboxd_run(&db, &[("METRICS_ADDR", "127.0.0.1:0")]));
    let status = Status::new(outboxd.served_port("serving /metrics").await);

    let health = status.wait_for("/healthz", 200, &outboxd).await;
    assert_eq!(health.body.trim(), "ok");
    let ready = status.wait_for("/readyz", 200, &outboxd).await;
    assert_eq!(ready.body.trim(), "ready");
    assert_eq!(listener_backends(&db).await, 1, "ready means listening");

    let event = db
        .enqueue(
            "order.created",
            &json!({"order_id": 1, "note": "payload-marker-91c2"}),
        )
        .await;
    let requests = receiver.wait_for(2).await;
    assert_eq!(requests[1].event_id(), event);
    requests[1].verify(&secret).expect("signed");
    db.wait_all_in_state(1, "delivered").await;

    let m = status
        .wait_for_sample("outboxd_deliveries_total{outcome=\"delivered\"}", 1.0)
        .await;
    assert_eq!(m.kind("outboxd_deliveries_total"), "counter");
    assert_eq!(
        m.value("outboxd_deliveries_total{outcome=\"delivered\"}"),
        1.0
    );
    assert_eq!(
        m.value("outboxd_deliveries_total{outcome=\"retried\"}"),
        1.0
    );
    for outcome in ["dead", "refused"] {
        assert_eq!(
            m.value(&format!(
                "outboxd_deliveries_total{{outcome=\"{outcome}\"}}"
            )),
            0.0
        );
    }
    assert_eq!(m.kind("outboxd_endpoint_deliveries_total"), "counter");
    assert_eq!(
        m.value(&format!(
            "outboxd_endpoint_deliveries_total{{endpoint=\"{endpoint}\",outcome=\"delivered\"}}"
        )),
        1.0
    );
    assert_eq!(
        m.value(&format!(
            "outboxd_endpoint_deliveries_total{{endpoint=\"{endpoint}\",outcome=\"retried\"}}"
        )),
        1.0
    );
    assert_eq!(m.histogram("outboxd_attempt_duration_seconds"), 2.0);
    assert_eq!(m.histogram("outboxd_commit_to_delivery_seconds"), 1.0);
    assert!(m.histogram("outboxd_claim_batch_size") >= 1.0);
    assert_eq!(m.kind("outboxd_inflight_requests"), "gauge");
    assert_eq!(m.value("outboxd_inflight_requests"), 0.0);
    // The queue's gauges come with housekeeping's first sample, which a loaded
    // machine may not have taken yet.
    let m = status
        .wait_for_sample("outboxd_queue_depth{state=\"pending\"}", 0.0)
        .await;
    assert_eq!(m.kind("outboxd_queue_depth"), "gauge");
    for state in ["pending", "inflight", "parked", "dead", "unprocessed"] {
        let depth = m.value(&format!("outboxd_queue_depth{{state=\"{state}\"}}"));
        assert!(depth >= 0.0, "{state}: {depth}");
    }
    assert!(m.value("outboxd_oldest_pending_age_seconds") >= 0.0);
    assert_eq!(m.value("outboxd_listener_connected"), 1.0);
    assert_eq!(m.value("outboxd_listener_reconnects_total"), 0.0);
    assert_eq!(m.kind("outboxd_notifications_total"), "counter");
    assert_eq!(m.kind("outboxd_poll_ticks_total"), "counter");
    assert_eq!(m.kind("outboxd_endpoints_disabled_total"), "counter");
    assert_eq!(m.kind("outboxd_settle_failures_total"), "counter");

    // The counters count.
    status
        .wait_for_sample("outboxd_endpoints_disabled_total", 1.0)
        .await;
    let active: bool = db
        .scalar(&format!(
            "SELECT active FROM webhook_endpoints WHERE id = {failing}"
        ))
        .await;
    assert!(!active, "the failing endpoint was disabled");
    status
        .wait_for_sample("outboxd_poll_ticks_total", 1.0)
        .await;
    let before = status.metrics().await.value("outboxd_notifications_total");
    db.client
        .batch_execute("SELECT pg_notify('outboxd_wakeup', '')")
        .await
        .unwrap();
    status
        .wait_for_sample("outboxd_notifications_total", before + 1.0)
        .await;

    // The LISTEN session is killed: it comes back, and says so.
    assert_eq!(kill_listener(&db).await, 1, "one listener backend");
    let m = status
        .wait_for_sample("outboxd_listener_reconnects_total", 1.0)
        .await;
    assert_eq!(m.value("outboxd_listener_reconnects_total"), 1.0);
    status
        .wait_for_sample("outboxd_listener_connected", 1.0)
        .await;
    status.wait_for("/readyz", 200, &outboxd).await;
    eventually("a new listener backend", WAIT, || async {
        listener_backends(&db).await == 1
    })
    .await;
    let second = db.enqueue("order.created", &json!({"order_id": 2})).await;
    let requests = receiver.wait_for(3).await;
    assert_eq!(requests[2].event_id(), second);
    status
        .wait_for_sample("outboxd_deliveries_total{outcome=\"delivered\"}", 2.0)
        .await;

    sigterm(outboxd.pid());
    let finished = outboxd.finish(Duration::from_secs(60)).await;
    assert_eq!(finished.code, Some(0), "{finished:?}");
    for line in [
        "dispatcher stopped cleanly",
        "endpoint disabled automatically",
    ] {
        assert!(
            finished.stderr.contains(line),
            "{line:?} is logged: {}",
            finished.stderr
        );
    }
    // Logs never carry payloads, secrets, response bodies or endpoint URLs.
    let receiver_addr = format!("127.0.0.1:{}", receiver.port());
    for secret_thing in [
        "payload-marker-91c2",
        "response-body-marker-7f3a",
        secret.as_str(),
        receiver_addr.as_str(),
    ] {
        assert!(
            !finished.stderr.contains(secret_thing),
            "the log shows {secret_thing:?}: {}",
            finished.stderr
        );
    }
    assert!(
        status.try_get("/healthz").await.is_none(),
        "the status server stops with the process"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_without_listen_needs_no_listener_but_a_migrated_database() {
    let db = TestDb::new("ready_poll").await;
    let receiver = Receiver::start().await;
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let outboxd = Spawned::start(outboxd_run(
        &db,
        &[("METRICS_ADDR", "127.0.0.1:0"), ("WEBHOOK_LISTEN", "false")],
    ));
    let status = Status::new(outboxd.served_port("serving /metrics").await);

    status.wait_for("/readyz", 200, &outboxd).await;
    assert_eq!(
        listener_backends(&db).await,
        0,
        "polling mode does not LISTEN"
    );
    assert_eq!(
        status.metrics().await.value("outboxd_listener_connected"),
        0.0
    );
    // Polling delivers.
    let event = db.enqueue("order.created", &json!({})).await;
    assert_eq!(receiver.wait_for(1).await[0].event_id(), event);

    // Readiness checks the schema: a migration missing makes it 503, with the reason.
    db.client
        .batch_execute("DELETE FROM outboxd_migrations WHERE name = '0003_operations.sql'")
        .await
        .unwrap();
    let not_ready = status.wait_for("/readyz", 503, &outboxd).await;
    assert!(
        not_ready.body.contains("0003_operations.sql"),
        "{not_ready:?}"
    );
    assert_eq!(status.get("/healthz").await.status, 200, "still alive");
    db.client
        .batch_execute("INSERT INTO outboxd_migrations (name) VALUES ('0003_operations.sql')")
        .await
        .unwrap();
    status.wait_for("/readyz", 200, &outboxd).await;

    // A released file that differs from the one applied: 503, naming the file.
    db.client
        .batch_execute(
            "UPDATE outboxd_migrations SET checksum = repeat('0', 64)
             WHERE name = '0002_notify.sql'",
        )
        .await
        .unwrap();
    let not_ready = status.wait_for("/readyz", 503, &outboxd).await;
    assert!(
        not_ready.body.contains("0002_notify.sql") && not_ready.body.contains("new migration"),
        "{not_ready:?}"
    );
    db.client
        .batch_execute(
            "UPDATE outboxd_migrations SET checksum = NULL WHERE name = '0002_notify.sql'",
        )
        .await
        .unwrap();
    status.wait_for("/readyz", 200, &outboxd).await;

    // And that outcomes could be written: a settle function gone from the search path
    // makes it 503, with PostgreSQL's reason (undefined function).
    db.client
        .batch_execute("ALTER FUNCTION webhook_settle RENAME TO webhook_settle_hidden")
        .await
        .unwrap();
    let not_ready = status.wait_for("/readyz", 503, &outboxd).await;
    assert!(not_ready.body.contains("42883"), "{not_ready:?}");
    db.client
        .batch_execute("ALTER FUNCTION webhook_settle_hidden RENAME TO webhook_settle")
        .await
        .unwrap();
    status.wait_for("/readyz", 200, &outboxd).await;

    sigterm(outboxd.pid());
    let finished = outboxd.finish(Duration::from_secs(60)).await;
    assert_eq!(finished.code, Some(0), "{finished:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_format_writes_one_json_object_per_line() {
    let db = TestDb::new("json_logs").await;
    let worker_id = unique("json-logs");
    let mut command = outboxd_run(&db, &[("LOG_FORMAT", "json")]);
    command.env("WEBHOOK_WORKER_ID", &worker_id);
    let outboxd = Spawned::start(command);
    outboxd.wait_for_stderr("dispatcher started").await;
    sigterm(outboxd.pid());
    let finished = outboxd.finish(Duration::from_secs(60)).await;
    assert_eq!(finished.code, Some(0), "{finished:?}");

    let lines = json_lines(&finished.stderr);
    let message = |m: &str| {
        lines
            .iter()
            .find(|l| l["fields"]["message"] == json!(m))
            .unwrap_or_else(|| panic!("no {m:?} line in {lines:#?}"))
    };
    let started = message("dispatcher started");
    assert_eq!(started["level"], json!("INFO"), "{started}");
    assert_eq!(
        started["fields"]["worker_id"],
        json!(worker_id),
        "{started}"
    );
    assert!(started["timestamp"].is_string(), "{started}");
    message("dispatcher stopped cleanly");
}

/// Every non-empty line of `stderr`, each parsed as a JSON object.
fn json_lines(stderr: &str) -> Vec<Value> {
    stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let value: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
            assert!(value.is_object(), "not an object: {line:?}");
            value
        })
        .collect()
}

/// With `LOG_FORMAT=json` the error that ends the process must be a JSON line too: it is
/// the one line an operator needs, and a pipeline parsing JSON would drop or mangle it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_format_covers_the_fatal_error() {
    let db = TestDb::empty("json_fatal").await;
    let finished = run_to_end(outboxd_run(&db, &[("LOG_FORMAT", "json")])).await;
    assert_eq!(finished.code, Some(1), "{finished:?}");
    assert!(finished.stderr.contains("outboxd migrate"), "{finished:?}");
    let lines = json_lines(&finished.stderr);
    assert!(
        lines.iter().any(|l| l["level"] == json!("ERROR")),
        "{lines:#?}"
    );
}
