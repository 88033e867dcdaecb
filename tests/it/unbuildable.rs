//! Rows that can never be sent end dead with their reason, at once and without a
//! request, instead of coming back every lease; and an event's body can be built for
//! any `created_at` PostgreSQL can store.

use std::time::Duration;

use serde_json::json;

use crate::harness::{Receiver, RunningDispatcher, TestDb, test_config};

/// A short lease, so that a row left leased would come back (and its attempt count
/// climb) several times within the harness's wait.
fn short_lease(label: &str) -> outboxd::Config {
    outboxd::Config {
        lease: Duration::from_millis(2_000),
        http_timeout: Duration::from_millis(1_000),
        ..test_config(label)
    }
}

/// Inserts an event that is already fanned out, and its delivery to `endpoint`, due now:
/// what the dispatcher leaves behind after a first attempt failed.
async fn fanned_out(db: &TestDb, endpoint: i64) -> i64 {
    let event: i64 = db
        .client
        .query_one(
            "INSERT INTO webhook_outbox (event_type, payload, processed_at)
             VALUES ('order.created', '{\"n\": 1}', now()) RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    db.client
        .execute(
            "INSERT INTO webhook_deliveries (event_id, endpoint_id) VALUES ($1, $2)",
            &[&event, &endpoint],
        )
        .await
        .unwrap();
    event
}

/// The delivery ended dead with one attempt, recorded as `unbuildable` with `reason`
/// in its error, and stays so: no lease brings it back.
async fn assert_dead_for_good(db: &TestDb, event: i64, endpoint: i64, reason: &str) {
    db.wait_until(&format!(
        "SELECT state = 'dead' FROM webhook_deliveries
         WHERE event_id = {event} AND endpoint_id = {endpoint}"
    ))
    .await;
    let check = || async {
        let d = db.delivery(event, endpoint).await;
        assert_eq!((d.state.as_str(), d.attempts), ("dead", 1), "{d:?}");
        assert_eq!(d.locked_by, None, "{d:?}");
        let error = d.last_error.unwrap_or_default();
        assert!(error.contains(reason), "{error:?} should say {reason:?}");
        let attempts: Vec<_> = db
            .attempts()
            .await
            .into_iter()
            .filter(|a| a.event_id == event && a.endpoint_id == endpoint)
            .collect();
        assert_eq!(attempts.len(), 1, "{attempts:?}");
        assert_eq!(attempts[0].error_kind.as_deref(), Some("unbuildable"));
        assert_eq!(attempts[0].status_code, None);
        assert!(
            attempts[0].error.as_deref().unwrap_or("").contains(reason),
            "{attempts:?}"
        );
    };
    check().await;
    // Longer than the lease: a row left leased would have been claimed again by now.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_whose_event_row_is_gone_ends_dead() {
    let db = TestDb::new("gone_event").await;
    let receiver = Receiver::start().await;
    let (endpoint, _) = db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let orphan = fanned_out(&db, endpoint).await;
    db.client
        .execute("DELETE FROM webhook_outbox WHERE id = $1", &[&orphan])
        .await
        .unwrap();
    let dispatcher = RunningDispatcher::start(&db.url, short_lease("gone_event"));
    // Other work goes on around it.
    let fine = db.enqueue("order.created", &json!({"fine": true})).await;

    assert_dead_for_good(&db, orphan, endpoint, "event").await;
    db.wait_until(&format!(
        "SELECT state = 'delivered' FROM webhook_deliveries WHERE event_id = {fine}"
    ))
    .await;
    dispatcher.stop().await;
    let requests = receiver.requests();
    assert_eq!(requests.len(), 1, "only the healthy event is sent");
    assert_eq!(requests[0].event_id(), fine);
    // The event's fault is not the endpoint's: its failure clock did not start.
    let failing: bool = db
        .scalar("SELECT failing_since IS NOT NULL FROM webhook_endpoints")
        .await;
    assert!(
        !failing,
        "an unbuildable delivery counted against its endpoint"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_whose_endpoint_row_is_gone_ends_dead() {
    let db = TestDb::new("gone_endpoint").await;
    let receiver = Receiver::start().await;
    let (gone, _) = db.add_endpoint(&receiver.url("/gone"), &[]).await;
    let (kept, _) = db.add_endpoint(&receiver.url("/kept"), &[]).await;
    let event = fanned_out(&db, gone).await;
    db.client
        .execute(
            "INSERT INTO webhook_deliveries (event_id, endpoint_id) VALUES ($1, $2)",
            &[&event, &kept],
        )
        .await
        .unwrap();
    db.client
        .execute("DELETE FROM webhook_endpoints WHERE id = $1", &[&gone])
        .await
        .unwrap();
    let dispatcher = RunningDispatcher::start(&db.url, short_lease("gone_endpoint"));

    assert_dead_for_good(&db, event, gone, "endpoint").await;
    assert_eq!(db.delivery(event, kept).await.state, "delivered");
    dispatcher.stop().await;
    assert_eq!(receiver.count_to("/gone"), 0);
    assert_eq!(receiver.count_to("/kept"), 1);
}

/// PostgreSQL stores `timestamptz` from 4714 BC to 294276 AD, and ±infinity. Each
/// event is delivered once, its body's `timestamp` in RFC 3339 where RFC 3339 reaches
/// (years 0000-9999) and in ISO 8601's expanded years beyond, and the infinities as
/// PostgreSQL writes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_created_at_postgres_can_store_is_delivered() {
    let db = TestDb::new("timestamps").await;
    let receiver = Receiver::start().await;
    let (_, secret) = db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let cases = [
        ("1960-03-01 12:00:00.25+00", "1960-03-01T12:00:00.250000Z"),
        (
            "1969-12-31 23:59:59.999999+00",
            "1969-12-31T23:59:59.999999Z",
        ),
        ("0001-01-01 00:00:00+00 BC", "0000-01-01T00:00:00.000000Z"),
        ("4714-11-24 00:00:00+00 BC", "-4713-11-24T00:00:00.000000Z"),
        (
            "9999-12-31 23:59:59.999999+00",
            "9999-12-31T23:59:59.999999Z",
        ),
        ("10000-01-01 00:00:00+00", "+10000-01-01T00:00:00.000000Z"),
        (
            "294276-12-31 23:59:59.999999+00",
            "+294276-12-31T23:59:59.999999Z",
        ),
        ("infinity", "infinity"),
        ("-infinity", "-infinity"),
    ];
    let mut expected = std::collections::HashMap::new();
    for (stored, written) in cases {
        let id: i64 = db
            .client
            .query_one(
                "INSERT INTO webhook_outbox (event_type, payload, created_at)
                 VALUES ('order.created', '{}', $1::text::timestamptz) RETURNING id",
                &[&stored],
            )
            .await
            .unwrap()
            .get(0);
        expected.insert(id, written);
    }
    let dispatcher = RunningDispatcher::start(&db.url, short_lease("timestamps"));
    db.wait_all_in_state(cases.len() as i64, "delivered").await;
    dispatcher.stop().await;

    let requests = receiver.requests();
    assert_eq!(requests.len(), cases.len());
    for request in &requests {
        request.verify(&secret).expect("a valid signature");
        let body = request.json();
        assert_eq!(body["timestamp"], expected[&request.event_id()], "{body}");
    }
    let attempts: i64 = db
        .scalar("SELECT max(attempts)::int8 FROM webhook_deliveries")
        .await;
    assert_eq!(attempts, 1);

    // Inspection shows such events too.
    for (&id, &written) in &expected {
        let event = outboxd::inspect::get_event(&db.client, id).await.unwrap();
        let shown = serde_json::to_value(&event).unwrap();
        assert_eq!(shown["created_at"], written, "{shown}");
    }
}
