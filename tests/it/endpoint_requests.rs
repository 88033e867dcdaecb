//! Per-endpoint request settings: static headers (sent with every request, their
//! values secret-like: never shown or logged) and a timeout override.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{
    Receiver, Reply, RunningDispatcher, Spawned, TestDb, eventually, outboxd_command, sigterm,
    test_config, unique,
};

/// Values that must reach the receiver and never appear anywhere else.
const API_KEY: &str = "Bearer sk-live-4c0ffee-static-header-value";
const TENANT: &str = "tenant-value-91ab27";

const ADMIN_TOKEN: &str = "0123456789abcdef-headers";

fn assert_hidden(what: &str, text: &str) {
    for value in [API_KEY, "sk-live-4c0ffee", TENANT] {
        assert!(!text.contains(value), "{what} shows a header value: {text}");
    }
}

/// The headers registered with the CLI go out with every request, after outboxd's
/// own; their values show in no output of the CLI or the admin API, and in no log line
/// of a dispatcher logging at debug level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_headers_are_sent_and_never_shown() {
    let db = TestDb::new("hdrsent").await;
    let receiver = Receiver::start().await;
    let url = receiver.url("/hook");
    let authorization = format!("Authorization: {API_KEY}");
    let tenant = format!("X-Tenant: {TENANT}");
    let (added, stderr) = db
        .cli(
            &[
                "endpoint",
                "add",
                "--url",
                &url,
                "--header",
                &authorization,
                "--header",
                &tenant,
                "--json",
            ],
            0,
        )
        .await;
    assert_hidden("endpoint add", &format!("{added}{stderr}"));
    let added: Value = serde_json::from_str(&added).expect("JSON");
    assert_eq!(added["headers"], json!(["Authorization", "X-Tenant"]));
    let id = added["id"].as_i64().expect("an id").to_string();

    // A dispatcher process with the admin API, logging at debug level.
    let admin_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut command = outboxd_command();
    command
        .arg("run")
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "debug")
        .env("ADMIN_ADDR", format!("127.0.0.1:{admin_port}"))
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .env("WEBHOOK_ALLOW_PRIVATE_TARGETS", "true")
        .env("WEBHOOK_POLL_INTERVAL_MS", "100")
        .env("WEBHOOK_WORKER_ID", unique("it-headers"));
    let outboxd = Spawned::start(command);
    for n in 0..3 {
        db.enqueue("order.created", &json!({ "n": n })).await;
    }
    db.wait_all_in_state(3, "delivered").await;
    let requests = receiver.requests_to("/hook");
    assert_eq!(requests.len(), 3);
    for request in &requests {
        assert_eq!(request.header("authorization"), API_KEY);
        assert_eq!(request.header("x-tenant"), TENANT);
        // outboxd's own headers are untouched, and the signature still verifies.
        assert_eq!(request.header("content-type"), "application/json");
        assert!(!request.webhook_id().is_empty());
    }

    let (shown, _) = db.cli(&["endpoint", "show", &id], 0).await;
    assert!(
        shown.contains("headers: Authorization, X-Tenant"),
        "{shown}"
    );
    assert_hidden("endpoint show", &shown);
    for args in [
        &["endpoint", "show", &id, "--json"][..],
        &["endpoint", "list"],
        &["endpoint", "list", "--json"],
    ] {
        let (out, err) = db.cli(args, 0).await;
        assert_hidden(&format!("{args:?}"), &format!("{out}{err}"));
    }

    let http = reqwest::Client::new();
    let admin = format!("http://127.0.0.1:{admin_port}");
    let mut bodies = Vec::new();
    eventually("the admin API answers", Duration::from_secs(30), || {
        let request = http
            .get(format!("{admin}/v1/endpoints/{id}"))
            .bearer_auth(ADMIN_TOKEN)
            .send();
        async move { request.await.is_ok_and(|r| r.status().is_success()) }
    })
    .await;
    for path in [format!("/v1/endpoints/{id}"), "/v1/endpoints".to_owned()] {
        let body = http
            .get(format!("{admin}{path}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("the admin API answers")
            .text()
            .await
            .expect("a body");
        assert_hidden(&path, &body);
        bodies.push(body);
    }
    let one: Value = serde_json::from_str(&bodies[0]).expect("JSON");
    assert_eq!(one["headers"], json!(["Authorization", "X-Tenant"]));
    assert_eq!(one["timeout_ms"], Value::Null);

    // Replaced through the API: the new set goes out; the answer hides it too.
    let patched = http
        .patch(format!("{admin}/v1/endpoints/{id}"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body(json!({ "headers": [{ "name": "X-Api-Key", "value": TENANT }] }).to_string())
        .send()
        .await
        .expect("the admin API answers");
    assert_eq!(patched.status(), 200);
    let patched = patched.text().await.expect("a body");
    assert_hidden("PATCH", &patched);
    db.enqueue("order.paid", &json!({})).await;
    db.wait_all_in_state(4, "delivered").await;
    let last = receiver.requests_to("/hook").pop().expect("a request");
    assert_eq!(last.header("x-api-key"), TENANT);
    assert!(last.headers.get("authorization").is_none());

    sigterm(outboxd.pid());
    let finished = outboxd.finish(Duration::from_secs(60)).await;
    assert_eq!(finished.code, Some(0), "{}", finished.stderr);
    assert!(
        finished.stderr.contains("DEBUG"),
        "the dispatcher logged at debug level"
    );
    assert_hidden("the dispatcher's log", &finished.stderr);
}

/// The headers outboxd sets itself, and headers that cannot be sent, are refused at
/// registration by the CLI and the admin API, with a message naming the header and
/// not repeating the value; nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owned_and_malformed_headers_are_refused() {
    let db = TestDb::new("hdrrefused").await;
    for header in [
        format!("webhook-signature: {TENANT}"),
        format!("Content-Type: {TENANT}"),
        format!("HOST: {TENANT}"),
        format!("content-length: {TENANT}"),
        format!("X Bad Name: {TENANT}"),
        format!("no-colon-{TENANT}"),
    ] {
        let (_, stderr) = db
            .cli(
                &[
                    "endpoint",
                    "add",
                    "--url",
                    "https://example.com/hook",
                    "--header",
                    &header,
                ],
                2,
            )
            .await;
        assert!(stderr.contains("header"), "{header}: {stderr}");
        assert_hidden(&header, &stderr);
    }
    let (_, stderr) = db
        .cli(
            &[
                "endpoint",
                "add",
                "--url",
                "https://example.com/hook",
                "--header",
                "X-Token: line\u{7f}break",
            ],
            2,
        )
        .await;
    assert!(stderr.contains("X-Token"), "{stderr}");
    assert!(!stderr.contains("line"), "{stderr}");

    let api = crate::admin::start_binary_api(&db, ADMIN_TOKEN).await;
    let http = reqwest::Client::new();
    for name in ["Webhook-Id", "content-type", "Transfer-Encoding", "x y"] {
        let response = http
            .post(format!("{}/v1/endpoints", api.1))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "application/json")
            .body(
                json!({
                    "url": "https://example.com/hook",
                    "headers": [{ "name": name, "value": TENANT }],
                })
                .to_string(),
            )
            .send()
            .await
            .expect("the admin API answers");
        assert_eq!(response.status(), 400, "{name}");
        let body = response.text().await.expect("a body");
        assert_hidden(name, &body);
    }
    for timeout in [json!(0), json!(3_600_001), json!(-1), json!(1.5)] {
        let response = http
            .post(format!("{}/v1/endpoints", api.1))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "application/json")
            .body(json!({ "url": "https://example.com/hook", "timeout_ms": timeout }).to_string())
            .send()
            .await
            .expect("the admin API answers");
        assert_eq!(response.status(), 400, "timeout_ms {timeout}");
    }
    crate::admin::stop_binary(api.0).await;
    let stored: i64 = db.scalar("SELECT count(*) FROM webhook_endpoints").await;
    assert_eq!(stored, 0, "nothing refused was stored");
}

/// An endpoint's timeout override ends its requests, whatever the dispatcher's
/// `WEBHOOK_HTTP_TIMEOUT_MS`; another endpoint keeps the dispatcher's timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeout_override_ends_a_slow_endpoints_requests() {
    let db = TestDb::new("hdrtimeout").await;
    let receiver = Receiver::start().await;
    // Answers after 4 s: within the dispatcher's timeout (15 s here), not the override.
    receiver.always("/slow", Reply::ok().delay(Duration::from_secs(4)));
    receiver.always("/patient", Reply::ok().delay(Duration::from_secs(4)));
    let (slow, _) = db.add_endpoint(&receiver.url("/slow"), &[]).await;
    let (patient, _) = db.add_endpoint(&receiver.url("/patient"), &[]).await;
    db.cli(
        &[
            "endpoint",
            "update",
            &slow.to_string(),
            "--timeout-ms",
            "300",
        ],
        0,
    )
    .await;
    let dispatcher = RunningDispatcher::start(
        &db.url,
        outboxd::Config {
            http_timeout: Duration::from_secs(15),
            lease: Duration::from_secs(30),
            ..test_config("hdrtimeout")
        },
    );
    let event = db.enqueue("order.created", &json!({})).await;
    db.wait_until(&format!(
        "SELECT count(*) = 1 FROM webhook_attempts
         WHERE event_id = {event} AND endpoint_id = {slow}"
    ))
    .await;
    db.wait_until(&format!(
        "SELECT state = 'delivered' FROM webhook_deliveries
         WHERE event_id = {event} AND endpoint_id = {patient}"
    ))
    .await;
    dispatcher.stop().await;
    let attempts = db.attempts().await;
    let slow_attempt = attempts
        .iter()
        .find(|a| a.endpoint_id == slow)
        .expect("the slow endpoint's attempt");
    assert_eq!(slow_attempt.error_kind.as_deref(), Some("timeout"));
    let patient_attempt = attempts
        .iter()
        .find(|a| a.endpoint_id == patient)
        .expect("the patient endpoint's attempt");
    assert_eq!(patient_attempt.status_code, Some(200));

    // 0 removes the override.
    let (shown, _) = db
        .cli(
            &[
                "endpoint",
                "update",
                &slow.to_string(),
                "--timeout-ms",
                "0",
                "--json",
            ],
            0,
        )
        .await;
    let shown: Value = serde_json::from_str(&shown).expect("JSON");
    assert_eq!(shown["timeout_ms"], Value::Null);
}

/// A header row edited by hand past the registration's checks is never sent: the
/// endpoint's deliveries end dead with the reason, naming the header and not its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_header_that_cannot_be_sent_makes_its_deliveries_dead() {
    let db = TestDb::new("hdrbadrow").await;
    let receiver = Receiver::start().await;
    let (endpoint, _) = db.add_endpoint(&receiver.url("/hook"), &[]).await;
    db.client
        .batch_execute(&format!(
            "UPDATE webhook_endpoints
             SET headers = '[{{\"name\": \"Host\", \"value\": \"{TENANT}\"}}]'
             WHERE id = {endpoint}"
        ))
        .await
        .unwrap();
    let dispatcher = RunningDispatcher::start(&db.url, test_config("hdrbadrow"));
    let event = db.enqueue("order.created", &json!({})).await;
    db.wait_all_in_state(1, "dead").await;
    dispatcher.stop().await;
    assert_eq!(receiver.count(), 0, "no request was made");
    let attempt = db.attempts().await.pop().expect("an attempt");
    assert_eq!(attempt.event_id, event);
    assert_eq!(attempt.error_kind.as_deref(), Some("unbuildable"));
    let reason = attempt.error.unwrap_or_default();
    assert!(reason.contains("Host"), "{reason}");
    assert_hidden("the recorded reason", &reason);
}
