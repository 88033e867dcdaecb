//! Per-endpoint limits and the circuit breaker, as an operator sets and reads them: the
//! `max_in_flight` and `rate_limit` of `outboxd endpoint add/update` and of the admin
//! API, refused out of range naming the field; the circuit's state (closed, open until,
//! half-open) as the CLI and the API show it; closing it by hand.
//!
//! The circuit columns are set here with SQL, as a dispatcher would leave them: these
//! tests are about what an operator sees and does, not about when a circuit opens.

use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::harness::TestDb;

const TOKEN: &str = "endpoint-limits-admin-token-0123";

/// `outboxd ARGS --json`, parsed.
async fn cli_json(db: &TestDb, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let (stdout, _) = db.cli(&args, 0).await;
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// The value of a `key: value` line of `endpoint show`.
fn field<'a>(stdout: &'a str, key: &str) -> Option<&'a str> {
    stdout
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(": "))
        .map(str::trim)
}

/// `(max_in_flight, rate_limit)` as stored.
async fn stored_limits(db: &TestDb, id: i64) -> (Option<i32>, Option<i32>) {
    let row = db
        .client
        .query_one(
            "SELECT max_in_flight, rate_limit FROM webhook_endpoints WHERE id = $1",
            &[&id],
        )
        .await
        .expect("the endpoint's row");
    (row.get(0), row.get(1))
}

/// The admin API served in this process, on a loopback port.
struct Api {
    base: String,
    http: reqwest::Client,
    stop: CancellationToken,
}

impl Api {
    async fn start(db: &TestDb) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the admin API");
        let base = format!("http://{}", listener.local_addr().expect("its address"));
        let state = outboxd::admin::AdminState::new(db.pool().await, TOKEN, Duration::ZERO);
        let stop = CancellationToken::new();
        tokio::spawn(outboxd::admin::serve(listener, state, stop.clone()));
        Self {
            base,
            http: reqwest::Client::new(),
            stop,
        }
    }

    /// `METHOD path` with the token and, if given, a JSON body; `(status, body)`.
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(TOKEN);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request.send().await.expect("the admin API answers");
        let status = response.status().as_u16();
        let text = response.text().await.expect("a body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
        };
        (status, body)
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The limits set with `endpoint add`, changed and cleared one at a time with `endpoint
/// update` (the other kept), shown by `show` and `list` in text and JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_round_trip_through_the_cli() {
    let db = TestDb::new("limits_cli").await;
    let added = cli_json(
        &db,
        &[
            "endpoint",
            "add",
            "--url",
            "https://example.com/hook",
            "--max-in-flight",
            "8",
            "--rate-limit",
            "50",
        ],
    )
    .await;
    assert_eq!(added["max_in_flight"], json!(8), "{added}");
    assert_eq!(added["rate_limit"], json!(50), "{added}");
    assert_eq!(added["circuit"], json!({ "state": "closed" }), "{added}");
    assert_eq!(added["circuit_failures"], json!(0), "{added}");
    let id = added["id"].as_i64().expect("an id");
    let id_text = id.to_string();
    assert_eq!(stored_limits(&db, id).await, (Some(8), Some(50)));

    let (shown, _) = db.cli(&["endpoint", "show", &id_text], 0).await;
    assert_eq!(field(&shown, "max_in_flight"), Some("8"), "{shown}");
    assert_eq!(field(&shown, "rate_limit"), Some("50/s"), "{shown}");
    assert_eq!(field(&shown, "circuit"), Some("closed"), "{shown}");
    let (listed, _) = db.cli(&["endpoint", "list"], 0).await;
    let mut lines = listed.lines();
    let header = lines.next().expect("a header");
    for column in ["IN FLIGHT", "RATE/S", "CIRCUIT"] {
        assert!(header.contains(column), "{listed}");
    }
    let row: Vec<&str> = lines.next().expect("a row").split_whitespace().collect();
    assert_eq!(
        row,
        [
            &id_text,
            "active",
            "*",
            "8",
            "50",
            // No dead-head policy of its own.
            "-",
            "closed",
            "https://example.com/hook"
        ],
        "{listed}"
    );
    let listed = cli_json(&db, &["endpoint", "list"]).await;
    assert_eq!(
        listed[0],
        added.as_object().map_or(Value::Null, |added| {
            let mut added = added.clone();
            added.remove("secret");
            Value::Object(added)
        })
    );

    // One limit changed: the other stays.
    let updated = cli_json(
        &db,
        &["endpoint", "update", &id_text, "--max-in-flight", "3"],
    )
    .await;
    assert_eq!(
        (&updated["max_in_flight"], &updated["rate_limit"]),
        (&json!(3), &json!(50))
    );
    // An update of something else leaves both.
    let updated = cli_json(&db, &["endpoint", "update", &id_text, "--description", "x"]).await;
    assert_eq!(
        (&updated["max_in_flight"], &updated["rate_limit"]),
        (&json!(3), &json!(50))
    );
    let updated = cli_json(&db, &["endpoint", "update", &id_text, "--clear-rate-limit"]).await;
    assert_eq!(
        (&updated["max_in_flight"], &updated["rate_limit"]),
        (&json!(3), &Value::Null)
    );
    assert_eq!(stored_limits(&db, id).await, (Some(3), None));
    let updated = cli_json(
        &db,
        &[
            "endpoint",
            "update",
            &id_text,
            "--clear-max-in-flight",
            "--rate-limit",
            "100000",
        ],
    )
    .await;
    assert_eq!(
        (&updated["max_in_flight"], &updated["rate_limit"]),
        (&Value::Null, &json!(100_000))
    );
    assert_eq!(stored_limits(&db, id).await, (None, Some(100_000)));
    let (shown, _) = db.cli(&["endpoint", "show", &id_text], 0).await;
    assert_eq!(field(&shown, "max_in_flight"), None, "{shown}");
    assert_eq!(field(&shown, "rate_limit"), Some("100000/s"), "{shown}");
    let (listed, _) = db.cli(&["endpoint", "list"], 0).await;
    let row: Vec<&str> = listed
        .lines()
        .nth(1)
        .expect("a row")
        .split_whitespace()
        .collect();
    assert_eq!(row[3..5], ["-", "100000"], "{listed}");
}

/// Out-of-range and malformed limits are refused by `add` and `update` with exit status
/// 2 and a message naming the option; nothing is stored or changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_refuses_limits_out_of_range() {
    let db = TestDb::new("limits_cli_bad").await;
    for (option, value) in [
        ("--max-in-flight", "0"),
        ("--max-in-flight", "10001"),
        ("--max-in-flight", "-1"),
        ("--max-in-flight", "4294967297"),
        ("--max-in-flight", "many"),
        ("--rate-limit", "0"),
        ("--rate-limit", "100001"),
        ("--rate-limit", "1.5"),
    ] {
        let (_, stderr) = db
            .cli(
                &[
                    "endpoint",
                    "add",
                    "--url",
                    "https://example.com/hook",
                    option,
                    value,
                ],
                2,
            )
            .await;
        let field = option.trim_start_matches("--").replace('-', "_");
        assert!(
            stderr.contains(&format!("invalid value '{value}' for '{option}"))
                && stderr.contains(&field),
            "{option} {value}: {stderr}"
        );
    }
    let (_, stderr) = db
        .cli(
            &[
                "endpoint",
                "add",
                "--url",
                "https://example.com/hook",
                "--rate-limit",
                "0",
            ],
            2,
        )
        .await;
    assert!(
        stderr.contains("rate_limit") && stderr.contains("between 1 and 100000"),
        "{stderr}"
    );
    let stored: i64 = db.scalar("SELECT count(*) FROM webhook_endpoints").await;
    assert_eq!(stored, 0, "nothing refused was stored");

    let (id, _) = db.add_endpoint("https://example.com/hook", &[]).await;
    let id_text = id.to_string();
    db.cli(&["endpoint", "update", &id_text, "--max-in-flight", "5"], 0)
        .await;
    for (args, says) in [
        (&["--max-in-flight", "10001"][..], "between 1 and 10000"),
        (&["--rate-limit", "0"], "between 1 and 100000"),
        (
            &["--max-in-flight", "6", "--clear-max-in-flight"],
            "cannot be used with",
        ),
        (
            &["--rate-limit", "6", "--clear-rate-limit"],
            "cannot be used with",
        ),
    ] {
        let mut command = vec!["endpoint", "update", &id_text];
        command.extend_from_slice(args);
        let (_, stderr) = db.cli(&command, 2).await;
        assert!(
            stderr.contains(args[0]) && stderr.contains(says),
            "{args:?}: {stderr}"
        );
    }
    assert_eq!(stored_limits(&db, id).await, (Some(5), None), "unchanged");
}

/// The API takes the limits at creation, changes one leaving the other, removes one
/// with `null` (absent leaves it), and answers them with the circuit in every endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_round_trip_through_the_api() {
    let db = TestDb::new("limits_api").await;
    let api = Api::start(&db).await;
    use reqwest::Method;

    let (status, created) = api
        .call(
            Method::POST,
            "/v1/endpoints",
            Some(json!({
                "url": "https://example.com/hook",
                "max_in_flight": 5,
                "rate_limit": 20,
            })),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(
        (&created["max_in_flight"], &created["rate_limit"]),
        (&json!(5), &json!(20))
    );
    assert_eq!(created["circuit"], json!({ "state": "closed" }));
    assert_eq!(created["circuit_failures"], json!(0));
    let id = created["id"].as_i64().expect("an id");
    let path = format!("/v1/endpoints/{id}");
    assert_eq!(stored_limits(&db, id).await, (Some(5), Some(20)));

    // Absent or null at creation: no limit.
    let (status, plain) = api
        .call(
            Method::POST,
            "/v1/endpoints",
            Some(json!({ "url": "https://example.com/b", "max_in_flight": null })),
        )
        .await;
    assert_eq!(status, 201, "{plain}");
    assert_eq!(
        (&plain["max_in_flight"], &plain["rate_limit"]),
        (&Value::Null, &Value::Null)
    );

    for (body, expected) in [
        (json!({ "max_in_flight": 10000 }), (Some(10_000), Some(20))),
        (json!({ "description": "x" }), (Some(10_000), Some(20))),
        (json!({}), (Some(10_000), Some(20))),
        (json!({ "rate_limit": null }), (Some(10_000), None)),
        (
            json!({ "max_in_flight": null, "rate_limit": 1 }),
            (None, Some(1)),
        ),
    ] {
        let (status, patched) = api.call(Method::PATCH, &path, Some(body.clone())).await;
        assert_eq!(status, 200, "{body}: {patched}");
        assert_eq!(stored_limits(&db, id).await, expected, "{body}");
        assert_eq!(patched["max_in_flight"], json!(expected.0), "{body}");
        assert_eq!(patched["rate_limit"], json!(expected.1), "{body}");
        let (_, got) = api.call(Method::GET, &path, None).await;
        assert_eq!(got, patched, "GET agrees with PATCH's answer");
    }
    let (_, listed) = api.call(Method::GET, "/v1/endpoints", None).await;
    assert_eq!(listed["items"][0]["rate_limit"], json!(1), "{listed}");
    assert_eq!(listed["items"][0]["circuit"], json!({ "state": "closed" }));
}

/// Limits out of range, negative, fractional or not numbers are a 400 naming the
/// field, at creation and in an update; nothing is stored or changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_refuses_limits_out_of_range() {
    let db = TestDb::new("limits_api_bad").await;
    let api = Api::start(&db).await;
    use reqwest::Method;

    let bad = [
        ("max_in_flight", json!(0)),
        ("max_in_flight", json!(10_001)),
        ("max_in_flight", json!(-1)),
        ("max_in_flight", json!(4_294_967_297_u64)),
        ("max_in_flight", json!(2.5)),
        ("max_in_flight", json!("8")),
        ("rate_limit", json!(0)),
        ("rate_limit", json!(100_001)),
        ("rate_limit", json!(true)),
    ];
    for (field, value) in &bad {
        let (status, body) = api
            .call(
                Method::POST,
                "/v1/endpoints",
                Some(json!({ "url": "https://example.com/hook", *field: value })),
            )
            .await;
        assert_eq!(status, 400, "{field} {value}: {body}");
        assert_eq!(body["error"]["code"], json!("invalid_input"), "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(field), "{field} {value}: {message}");
    }
    let stored: i64 = db.scalar("SELECT count(*) FROM webhook_endpoints").await;
    assert_eq!(stored, 0, "nothing refused was stored");

    let (id, _) = db.add_endpoint("https://example.com/hook", &[]).await;
    let path = format!("/v1/endpoints/{id}");
    let (status, _) = api
        .call(Method::PATCH, &path, Some(json!({ "rate_limit": 7 })))
        .await;
    assert_eq!(status, 200);
    for (field, value) in &bad {
        // The description would change too, were the limit taken.
        let (status, body) = api
            .call(
                Method::PATCH,
                &path,
                Some(json!({ "description": "changed", *field: value })),
            )
            .await;
        assert_eq!(status, 400, "{field} {value}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(field), "{field} {value}: {message}");
    }
    let (_, got) = api.call(Method::GET, &path, None).await;
    assert_eq!(got["rate_limit"], json!(7), "{got}");
    assert_eq!(got["description"], json!("integration test"), "{got}");
    let (status, body) = api
        .call(Method::PATCH, &path, Some(json!({ "max_in_flight": 0 })))
        .await;
    assert_eq!(status, 400, "0 is not 'no limit': {body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("between 1 and 10000"), "{message}");
}

/// Three endpoints whose circuits are closed, open and half-open (set by hand, as a
/// dispatcher leaves them): `list` and `show`, text and JSON, and the API show each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_circuit_state_is_shown() {
    let db = TestDb::new("circuit_shown").await;
    let (closed, _) = db.add_endpoint("https://example.com/closed", &[]).await;
    let (open, _) = db.add_endpoint("https://example.com/open", &[]).await;
    let (half_open, _) = db.add_endpoint("https://example.com/half", &[]).await;
    db.client
        .execute(
            "UPDATE webhook_endpoints
             SET circuit_open_until = '2999-01-02T03:04:05.5Z', circuit_failures = 5,
                 circuit_opens = 2
             WHERE id = $1",
            &[&open],
        )
        .await
        .expect("open a circuit");
    db.client
        .execute(
            "UPDATE webhook_endpoints
             SET circuit_open_until = now() - interval '1 second', circuit_failures = 7,
                 circuit_opens = 1, circuit_probe_until = now() + interval '1 minute'
             WHERE id = $1",
            &[&half_open],
        )
        .await
        .expect("make a circuit half-open");

    let expected = [
        (closed, json!({ "state": "closed" }), 0, "closed"),
        (
            open,
            json!({ "state": "open", "until": "2999-01-02T03:04:05.500000Z" }),
            5,
            "open until 2999-01-02T03:04:05.500000Z",
        ),
        (half_open, json!({ "state": "half_open" }), 7, "half-open"),
    ];
    let listed = cli_json(&db, &["endpoint", "list"]).await;
    let (text, _) = db.cli(&["endpoint", "list"], 0).await;
    let api = Api::start(&db).await;
    let (_, from_api) = api.call(reqwest::Method::GET, "/v1/endpoints", None).await;
    for (n, (id, circuit, failures, shown)) in expected.iter().enumerate() {
        assert_eq!(listed[n]["id"], json!(id));
        assert_eq!(listed[n]["circuit"], *circuit, "{listed}");
        assert_eq!(listed[n]["circuit_failures"], json!(failures), "{listed}");
        assert_eq!(from_api["items"][n]["circuit"], *circuit, "{from_api}");
        let line = text
            .lines()
            .find(|line| line.trim_start().starts_with(&format!("{id} ")))
            .unwrap_or_else(|| panic!("endpoint {id} in {text}"));
        assert!(line.contains(&format!("  {shown}  ")), "{text}");
        let id = id.to_string();
        let (one, _) = db.cli(&["endpoint", "show", &id], 0).await;
        assert_eq!(field(&one, "circuit"), Some(*shown), "{one}");
        let failures_line = (*failures > 0).then(|| failures.to_string());
        assert_eq!(
            field(&one, "circuit_failures"),
            failures_line.as_deref(),
            "{one}"
        );
        let one = cli_json(&db, &["endpoint", "show", &id]).await;
        assert_eq!(one["circuit"], *circuit, "{one}");
        let (_, got) = api
            .call(reqwest::Method::GET, &format!("/v1/endpoints/{id}"), None)
            .await;
        assert_eq!(got["circuit"], *circuit, "{got}");
    }
}

/// The state a circuit's columns are in: `(open_until is set, probe_until is set,
/// failures, opens)`.
async fn circuit_columns(db: &TestDb, id: i64) -> (bool, bool, i32, i32) {
    let row = db
        .client
        .query_one(
            "SELECT circuit_open_until IS NOT NULL, circuit_probe_until IS NOT NULL,
                    circuit_failures, circuit_opens
             FROM webhook_endpoints WHERE id = $1",
            &[&id],
        )
        .await
        .expect("the endpoint's row");
    (row.get(0), row.get(1), row.get(2), row.get(3))
}

/// The payload of the next notification on the doorbell's channel.
async fn next_ring(rings: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(Duration::from_secs(20), rings.recv())
        .await
        .ok()
        .flatten()
        .expect("a notification on outboxd_wakeup")
}

/// Rings the doorbell with a marker and asserts it is the next notification: nothing
/// rang since the last one was read (notifications arrive in commit order).
async fn ring_marker(db: &TestDb, rings: &mut tokio::sync::mpsc::UnboundedReceiver<String>) {
    db.client
        .batch_execute("NOTIFY outboxd_wakeup, 'marker'")
        .await
        .expect("NOTIFY");
    assert_eq!(next_ring(rings).await, "marker", "nothing else rang");
}

const OPEN: &str = "UPDATE webhook_endpoints
    SET circuit_open_until = now() + interval '1 hour', circuit_failures = 5, circuit_opens = 3
    WHERE id = $1";
const HALF_OPEN: &str = "UPDATE webhook_endpoints
    SET circuit_open_until = now() - interval '1 second', circuit_failures = 6,
        circuit_opens = 4, circuit_probe_until = now() + interval '1 minute'
    WHERE id = $1";

/// `endpoint close-circuit` and `POST /v1/endpoints/{id}/circuit/close` close an open or
/// half-open circuit as a success would (every circuit column reset), ring the
/// dispatchers' doorbell, say whether it was open, and refuse an unknown endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_circuit_by_hand_resets_it() {
    use futures_util::StreamExt as _;
    let db = TestDb::new("circuit_close").await;
    let (id, _) = db.add_endpoint("https://example.com/hook", &[]).await;
    let (other, _) = db.add_endpoint("https://example.com/other", &[]).await;
    let id_text = id.to_string();
    for endpoint in [id, other] {
        db.client.execute(OPEN, &[&endpoint]).await.expect("open");
    }

    // A session listening on the doorbell's channel, as a dispatcher does.
    let (listener, mut connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .expect("a listening session");
    let (rang, mut rings) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                let _ = rang.send(n.payload().to_owned());
            }
        }
    });
    listener
        .batch_execute("LISTEN outboxd_wakeup")
        .await
        .expect("LISTEN");

    let (said, _) = db.cli(&["endpoint", "close-circuit", &id_text], 0).await;
    assert!(said.contains("circuit closed"), "{said}");
    assert_eq!(circuit_columns(&db, id).await, (false, false, 0, 0));
    assert_eq!(
        circuit_columns(&db, other).await,
        (true, false, 5, 3),
        "another endpoint's circuit is left alone"
    );
    assert_eq!(next_ring(&mut rings).await, "", "the dispatchers are woken");
    let shown = cli_json(&db, &["endpoint", "show", &id_text]).await;
    assert_eq!(shown["circuit"], json!({ "state": "closed" }), "{shown}");
    assert_eq!(shown["circuit_failures"], json!(0), "{shown}");

    // Closed already: it says so, resets the failures, and rings nobody.
    db.client
        .execute(
            "UPDATE webhook_endpoints SET circuit_failures = 2 WHERE id = $1",
            &[&id],
        )
        .await
        .expect("count failures");
    let (said, _) = db.cli(&["endpoint", "close-circuit", &id_text], 0).await;
    assert!(said.contains("already closed"), "{said}");
    assert_eq!(circuit_columns(&db, id).await, (false, false, 0, 0));
    ring_marker(&db, &mut rings).await;
    db.cli(&["endpoint", "close-circuit", "999999"], 3).await;

    // Half-open, through the API.
    db.client
        .execute(HALF_OPEN, &[&id])
        .await
        .expect("half-open");
    let api = Api::start(&db).await;
    let close = format!("/v1/endpoints/{id}/circuit/close");
    let (status, body) = api.call(reqwest::Method::POST, &close, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["was_open"], json!(true), "{body}");
    assert_eq!(body["endpoint"]["id"], json!(id), "{body}");
    assert_eq!(body["endpoint"]["circuit"], json!({ "state": "closed" }));
    assert_eq!(body["endpoint"]["circuit_failures"], json!(0));
    assert_eq!(circuit_columns(&db, id).await, (false, false, 0, 0));
    assert_eq!(next_ring(&mut rings).await, "", "the dispatchers are woken");
    let (status, body) = api.call(reqwest::Method::POST, &close, None).await;
    assert_eq!((status, &body["was_open"]), (200, &json!(false)), "{body}");
    ring_marker(&db, &mut rings).await;

    // The same token as every other route; 404 for an unknown or removed endpoint.
    let unauthorized = api
        .http
        .post(format!("{}{close}", api.base))
        .send()
        .await
        .expect("an answer");
    assert_eq!(unauthorized.status(), 401);
    let (status, _) = api
        .call(
            reqwest::Method::POST,
            "/v1/endpoints/999999/circuit/close",
            None,
        )
        .await;
    assert_eq!(status, 404);
    outboxd::endpoint::remove(&db.client, other)
        .await
        .expect("remove");
    let (status, _) = api
        .call(
            reqwest::Method::POST,
            &format!("/v1/endpoints/{other}/circuit/close"),
            None,
        )
        .await;
    assert_eq!(status, 404);
}

/// Closing a circuit by hand makes the deliveries the claims held back for it due at
/// once: those placed up to the end of the opening or of the endpoint's line. A retry
/// its backoff put later keeps its time, and so do other endpoints' deliveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_circuit_by_hand_releases_what_it_held() {
    let db = TestDb::new("circuit_release").await;
    let (id, _) = db.add_endpoint("https://example.com/hook", &[]).await;
    let (other, _) = db.add_endpoint("https://example.com/other", &[]).await;
    db.client
        .batch_execute(&format!(
            "UPDATE webhook_endpoints
             SET circuit_open_until = now() + interval '1 hour',
                 held_until = now() + interval '1 hour 10 seconds'
             WHERE id IN ({id}, {other});
             INSERT INTO webhook_outbox (id, event_type, payload, processed_at)
                 SELECT g, 'order.created', '{{}}', now() FROM generate_series(101, 104) g;
             INSERT INTO webhook_deliveries (event_id, endpoint_id, next_attempt_at) VALUES
                 (101, {id}, now() + interval '1 hour'),
                 (102, {id}, now() + interval '1 hour 5 seconds'),
                 (103, {id}, now() + interval '3 hours'),
                 (104, {other}, now() + interval '1 hour');"
        ))
        .await
        .expect("held deliveries");

    db.cli(&["endpoint", "close-circuit", &id.to_string()], 0)
        .await;

    let due: Vec<(i64, bool)> = db
        .client
        .query(
            "SELECT event_id, next_attempt_at <= now() FROM webhook_deliveries
             WHERE event_id > 100 ORDER BY event_id",
            &[],
        )
        .await
        .expect("deliveries")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(due, [(101, true), (102, true), (103, false), (104, false)]);
    let held: Option<std::time::SystemTime> = db
        .client
        .query_one(
            "SELECT held_until FROM webhook_endpoints WHERE id = $1",
            &[&id],
        )
        .await
        .expect("endpoint")
        .get(0);
    assert_eq!(held, None, "its line starts over");
}
