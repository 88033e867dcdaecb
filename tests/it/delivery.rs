//! The happy path: nothing to do, and one signed delivery.

use std::time::{Duration, SystemTime};

use serde_json::json;

use crate::harness::{Receiver, Reply, RunningDispatcher, TestDb, test_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_outbox_is_a_noop() {
    let db = TestDb::new("empty").await;
    let receiver = Receiver::start().await;
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let dispatcher = RunningDispatcher::start(
        &db.url,
        outboxd::Config {
            poll_interval: Duration::from_millis(100),
            ..test_config("empty")
        },
    );

    // Each time the dispatcher finds nothing it arms the doorbell before sleeping. Disarm
    // it and wait for the re-arm, three times over: three poll ticks that found nothing.
    for _ in 0..3 {
        db.wait_until("SELECT armed FROM webhook_doorbell").await;
        db.client
            .execute("UPDATE webhook_doorbell SET armed = false", &[])
            .await
            .unwrap();
    }
    db.wait_until("SELECT armed FROM webhook_doorbell").await;

    let report = dispatcher.stop().await;
    assert_eq!(receiver.count(), 0, "no request may be made");
    for table in ["webhook_outbox", "webhook_deliveries", "webhook_attempts"] {
        let rows: i64 = db.scalar(&format!("SELECT count(*) FROM {table}")).await;
        assert_eq!(rows, 0, "{table} must stay empty");
    }
    assert_eq!(report.totals, outboxd::SettleTotals::default());
    assert_eq!(report.drained, outboxd::Drained::Completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_a_signed_event() {
    let db = TestDb::new("delivered").await;
    let receiver = Receiver::start().await;
    let (endpoint_id, secret) = db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let dispatcher = RunningDispatcher::start(&db.url, test_config("delivered"));

    let payload = json!({"order_id": 42, "total": "19.99", "items": [1, 2, 3], "note": "é \"q\""});
    let event_id = db.enqueue("order.created", &payload).await;
    db.wait_all_in_state(1, "delivered").await;
    let worker = dispatcher.worker_id.clone();
    let report = dispatcher.stop().await;
    assert_eq!(report.totals.delivered, 1);

    // The delivery row.
    let d = db.delivery(event_id, endpoint_id).await;
    assert_eq!(d.state, "delivered");
    assert_eq!(d.attempts, 1);
    assert_eq!(d.locked_by, None);
    assert_eq!(d.locked_until, None);
    assert!(matches!(d.last_status, Some(200..=299)), "{d:?}");
    assert!(d.delivered_at.is_some());

    // The outbox row is marked fanned out.
    let row = db
        .client
        .query_one(
            "SELECT processed_at, created_at FROM webhook_outbox WHERE id = $1",
            &[&event_id],
        )
        .await
        .unwrap();
    let processed_at: Option<SystemTime> = row.get(0);
    let created_at: SystemTime = row.get(1);
    assert!(processed_at.is_some(), "processed_at must be set");

    // One attempt, successful.
    let attempts = db.attempts().await;
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    let a = &attempts[0];
    assert_eq!(
        (a.event_id, a.endpoint_id, a.attempt),
        (event_id, endpoint_id, 1)
    );
    assert!(matches!(a.status_code, Some(200..=299)), "{a:?}");
    assert_eq!(a.error_kind, None);
    assert_eq!(a.worker_id, worker);

    // The request.
    let requests = receiver.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(r.method, axum::http::Method::POST);
    assert_eq!(r.path, "/hook");
    assert_eq!(r.header("content-type"), "application/json");
    assert_eq!(r.webhook_id(), event_id.to_string());
    let body = r.json();
    let object = body.as_object().expect("body is an object");
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["data", "id", "timestamp", "type"]);
    assert_eq!(body["id"], json!(event_id.to_string()));
    assert_eq!(body["type"], json!("order.created"));
    assert_eq!(body["data"], payload);
    let timestamp = body["timestamp"].as_str().expect("timestamp is a string");
    let parsed = humantime::parse_rfc3339(timestamp)
        .unwrap_or_else(|e| panic!("timestamp {timestamp:?} is not RFC 3339: {e}"));
    assert_eq!(
        parsed, created_at,
        "timestamp must be the event's created_at"
    );

    // The signature, checked by an independent implementation.
    r.verify(&secret)
        .unwrap_or_else(|e| panic!("signature does not verify: {e}"));
    let other = outboxd::sign::Secret::generate();
    assert!(r.verify(&other).is_err(), "another secret must not verify");
}

/// A receiver's answer is recorded as an excerpt; whatever bytes it contains (here a
/// NUL, which PostgreSQL text cannot hold) must not keep the outcome from being written,
/// nor hold up the outcomes of other deliveries behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_response_body_does_not_block_settling() {
    let db = TestDb::new("nulbody").await;
    let receiver = Receiver::start().await;
    receiver.always("/binary", Reply::ok().body("ok\u{0}\u{1}\u{0}binary"));
    let (binary, _) = db
        .add_endpoint(&receiver.url("/binary"), &["order.*"])
        .await;
    let (plain, _) = db.add_endpoint(&receiver.url("/plain"), &["later.*"]).await;
    let dispatcher = RunningDispatcher::start(&db.url, test_config("nulbody"));

    let first = db.enqueue("order.created", &json!({"n": 1})).await;
    receiver.wait_for(1).await;
    // Sent after the binary answer came back: its outcome queues behind that one.
    let second = db.enqueue("later.created", &json!({"n": 2})).await;
    db.wait_all_in_state(2, "delivered").await;
    dispatcher.stop().await;

    assert_eq!(db.delivery(first, binary).await.attempts, 1);
    assert_eq!(db.delivery(second, plain).await.attempts, 1);
    let attempts = db.attempts().await;
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    let excerpt = attempts
        .iter()
        .find(|a| a.endpoint_id == binary)
        .and_then(|a| a.response_excerpt.clone())
        .unwrap_or_default();
    assert!(excerpt.starts_with("ok"), "{excerpt:?}");
    assert_eq!(receiver.count_to("/binary"), 1, "delivered once, not again");
}
