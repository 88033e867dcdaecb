//! Per-endpoint limits, as an operator sets and reads them: the `max_in_flight` and
//! `rate_limit` of `outboxd endpoint add/update` and of the admin API, refused out of
//! range naming the field.

use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::harness::{TestDb, outboxd_command, run_to_end};

const TOKEN: &str = "endpoint-limits-admin-token-0123";

/// `outboxd ARGS` against `db`; asserts the exit status, returns `(stdout, stderr)`.
async fn cli(db: &TestDb, args: &[&str], expected: i32) -> (String, String) {
    let mut command = outboxd_command();
    command.args(args).env("DATABASE_URL", &db.url);
    let finished = run_to_end(command).await;
    assert_eq!(
        finished.code,
        Some(expected),
        "outboxd {args:?}: {}{}",
        finished.stdout,
        finished.stderr
    );
    (finished.stdout, finished.stderr)
}

/// `outboxd ARGS --json`, parsed.
async fn cli_json(db: &TestDb, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let (stdout, _) = cli(db, &args, 0).await;
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
    let id = added["id"].as_i64().expect("an id");
    let id_text = id.to_string();
    assert_eq!(stored_limits(&db, id).await, (Some(8), Some(50)));

    let (shown, _) = cli(&db, &["endpoint", "show", &id_text], 0).await;
    assert_eq!(field(&shown, "max_in_flight"), Some("8"), "{shown}");
    assert_eq!(field(&shown, "rate_limit"), Some("50/s"), "{shown}");
    let (listed, _) = cli(&db, &["endpoint", "list"], 0).await;
    let mut lines = listed.lines();
    let header = lines.next().expect("a header");
    for column in ["IN FLIGHT", "RATE/S"] {
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
    let (shown, _) = cli(&db, &["endpoint", "show", &id_text], 0).await;
    assert_eq!(field(&shown, "max_in_flight"), None, "{shown}");
    assert_eq!(field(&shown, "rate_limit"), Some("100000/s"), "{shown}");
    let (listed, _) = cli(&db, &["endpoint", "list"], 0).await;
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
        let (_, stderr) = cli(
            &db,
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
    let (_, stderr) = cli(
        &db,
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
    cli(
        &db,
        &["endpoint", "update", &id_text, "--max-in-flight", "5"],
        0,
    )
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
        let (_, stderr) = cli(&db, &command, 2).await;
        assert!(
            stderr.contains(args[0]) && stderr.contains(says),
            "{args:?}: {stderr}"
        );
    }
    assert_eq!(stored_limits(&db, id).await, (Some(5), None), "unchanged");
}

/// The API takes the limits at creation, changes one leaving the other, removes one
/// with `null` (absent leaves it), and answers them in every endpoint.
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
