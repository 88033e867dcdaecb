//! Disabling, enabling and removing endpoints while deliveries are under way.

use std::time::Duration;

use serde_json::json;

use crate::harness::{Receiver, Reply, RunningDispatcher, TestDb, test_config};

const BACKOFF: Duration = Duration::from_millis(300);

fn config(label: &str) -> outboxd::Config {
    outboxd::Config {
        backoff_base: BACKOFF,
        backoff_max: BACKOFF,
        max_attempts: 100,
        ..test_config(label)
    }
}

/// Proves the dispatcher has been through several retry rounds since now: a control
/// endpoint fails twice with the same backoff, then succeeds. Anything that should
/// have been retried meanwhile would have been.
async fn control_round(db: &TestDb, receiver: &Receiver, tag: &str) {
    let path = format!("/control-{tag}");
    receiver.sequence(
        &path,
        vec![Reply::status(500), Reply::status(500), Reply::ok()],
    );
    let (endpoint_id, _) = db
        .add_endpoint(&receiver.url(&path), &[&format!("control.{tag}")])
        .await;
    let event_id = db.enqueue(&format!("control.{tag}"), &json!({})).await;
    db.wait_until(&format!(
        "SELECT state = 'delivered' AND attempts = 3 FROM webhook_deliveries
         WHERE event_id = {event_id} AND endpoint_id = {endpoint_id}"
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_parks_and_enable_resumes() {
    let db = TestDb::new("disable").await;
    let receiver = Receiver::start().await;
    receiver.always("/hook", Reply::status(500));
    let (endpoint_id, secret) = db.add_endpoint(&receiver.url("/hook"), &["order.*"]).await;
    let dispatcher = RunningDispatcher::start(&db.url, config("disable"));
    const N: i64 = 3;
    for n in 0..N {
        db.enqueue("order.created", &json!({ "n": n })).await;
    }
    let order_rows = format!("FROM webhook_deliveries WHERE endpoint_id = {endpoint_id}");
    db.wait_until(&format!(
        "SELECT count(*) = {N} AND bool_and(attempts >= 1) {order_rows}"
    ))
    .await;

    outboxd::endpoint::disable(&db.client, endpoint_id, "consumer asked for a pause")
        .await
        .expect("disable");
    // Rows in flight at that moment are parked by the dispatcher when it next claims them.
    db.wait_until(&format!(
        "SELECT count(*) = {N} AND bool_and(state = 'parked' AND locked_by IS NULL) {order_rows}"
    ))
    .await;
    let requests_when_parked = receiver.count_to("/hook");
    let parked = db.deliveries().await;

    // Several retry rounds later: no request, and the rows are untouched.
    control_round(&db, &receiver, "a").await;
    assert_eq!(
        receiver.count_to("/hook"),
        requests_when_parked,
        "a parked delivery must not be sent"
    );
    let still: Vec<_> = db
        .deliveries()
        .await
        .into_iter()
        .filter(|d| d.endpoint_id == endpoint_id)
        .collect();
    for (before, after) in parked
        .iter()
        .filter(|d| d.endpoint_id == endpoint_id)
        .zip(&still)
    {
        assert_eq!(after.state, "parked");
        assert_eq!(after.attempts, before.attempts, "parking is not an attempt");
    }
    // New events for a disabled endpoint are fanned out to it parked, and not sent.
    let while_disabled = db.enqueue("order.created", &json!({"late": true})).await;
    control_round(&db, &receiver, "b").await;
    let late: String = db
        .scalar(&format!(
            "SELECT state FROM webhook_deliveries WHERE event_id = {while_disabled}"
        ))
        .await;
    assert_eq!(late, "parked");
    assert_eq!(receiver.count_to("/hook"), requests_when_parked);

    // Fixed and enabled: the parked deliveries go out, the late one too.
    receiver.always("/hook", Reply::ok());
    let resumed = outboxd::endpoint::enable(&db.client, endpoint_id)
        .await
        .expect("enable");
    assert_eq!(resumed, N as u64 + 1);
    db.wait_until(&format!(
        "SELECT count(*) = {N} + 1 AND bool_and(state = 'delivered') {order_rows}"
    ))
    .await;
    dispatcher.stop().await;

    for r in receiver.requests_to("/hook") {
        if r.answered == Some(200) {
            r.verify(&secret).expect("signed");
        }
    }
    let ok: usize = receiver
        .requests_to("/hook")
        .iter()
        .filter(|r| r.answered == Some(200))
        .count();
    assert_eq!(ok as i64, N + 1);
    let ep = outboxd::endpoint::get(&db.client, endpoint_id)
        .await
        .unwrap();
    assert!(ep.active);
    assert_eq!(ep.disabled_reason, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_endpoint_is_parked() {
    let db = TestDb::new("remove").await;
    let receiver = Receiver::start().await;
    receiver.always("/hook", Reply::status(500));
    let (endpoint_id, _) = db.add_endpoint(&receiver.url("/hook"), &["order.*"]).await;
    let dispatcher = RunningDispatcher::start(&db.url, config("remove"));
    const N: i64 = 3;
    for n in 0..N {
        db.enqueue("order.created", &json!({ "n": n })).await;
    }
    let order_rows = format!("FROM webhook_deliveries WHERE endpoint_id = {endpoint_id}");
    db.wait_until(&format!(
        "SELECT count(*) = {N} AND bool_and(attempts >= 1) {order_rows}"
    ))
    .await;

    outboxd::endpoint::remove(&db.client, endpoint_id)
        .await
        .expect("remove");
    db.wait_until(&format!(
        "SELECT count(*) = {N} AND bool_and(state = 'parked' AND locked_by IS NULL) {order_rows}"
    ))
    .await;
    let requests_when_parked = receiver.count_to("/hook");

    control_round(&db, &receiver, "a").await;
    let after_event = db.enqueue("order.created", &json!({"late": true})).await;
    control_round(&db, &receiver, "b").await;
    dispatcher.stop().await;

    assert_eq!(
        receiver.count_to("/hook"),
        requests_when_parked,
        "a removed endpoint's delivery must not be retried"
    );
    let rows: Vec<_> = db
        .deliveries()
        .await
        .into_iter()
        .filter(|d| d.endpoint_id == endpoint_id)
        .collect();
    assert_eq!(
        rows.len() as i64,
        N,
        "no new delivery for a removed endpoint"
    );
    assert!(rows.iter().all(|d| d.state == "parked"), "{rows:?}");
    assert!(rows.iter().all(|d| d.event_id != after_event));
    assert!(
        outboxd::endpoint::get(&db.client, endpoint_id)
            .await
            .is_err()
    );
    // The history keeps pointing at a real (soft-deleted) row.
    let kept: i64 = db
        .scalar(&format!(
            "SELECT count(*) FROM webhook_endpoints WHERE id = {endpoint_id} AND deleted_at IS NOT NULL"
        ))
        .await;
    assert_eq!(kept, 1);
}

/// Enabling an endpoint while a dispatcher is parking one of its deliveries (the claim
/// saw the endpoint closed, the park outcome is not written yet) must not leave that
/// delivery parked under an active endpoint. The dispatcher's steps are replayed through
/// the library so the interleaving is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enable_racing_a_park_does_not_strand_the_delivery() {
    use outboxd::claim::{self, Claimed};
    use outboxd::retry::Verdict;
    use outboxd::settle::{self, Next, Outcome};

    let db = TestDb::new("enablerace").await;
    let receiver = Receiver::start().await;
    let (endpoint_id, _) = db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let event_id = db.enqueue("order.created", &json!({})).await;
    let pool = db.pool().await;
    let worker = "replayed-worker";
    let lease = Duration::from_secs(60);
    let outcome = |attempt, next| Outcome {
        event_id,
        endpoint_id,
        attempt,
        next,
        record: None,
        ordered: false,
    };

    // Attempt 1 is in flight when the endpoint is disabled (so the row is not parked by
    // the disable itself), and fails.
    let first = claim::claim(&db.client, worker, lease, 10).await.unwrap();
    assert!(matches!(first[..], [Claimed::Send(_)]), "{first:?}");
    outboxd::endpoint::disable(&db.client, endpoint_id, "pause")
        .await
        .unwrap();
    let retry = outcome(1, Next::Verdict(Verdict::Retry(Duration::ZERO)));
    assert_eq!(settle::flush(&pool, worker, &[retry]).await.unwrap(), 1);

    // The next claim sees the endpoint closed: the dispatcher is about to park it...
    let second = claim::claim(&db.client, worker, lease, 10).await.unwrap();
    assert!(
        matches!(second[..], [Claimed::Park { attempt: 2, .. }]),
        "{second:?}"
    );
    // ...when the operator enables the endpoint again...
    outboxd::endpoint::enable(&db.client, endpoint_id)
        .await
        .unwrap();
    // ...and then the park outcome lands.
    settle::flush(&pool, worker, &[outcome(2, Next::Park)])
        .await
        .unwrap();

    // The endpoint is active; a dispatcher must deliver the event.
    let dispatcher = RunningDispatcher::start(&db.url, test_config("enablerace"));
    db.wait_until_within(
        "SELECT state = 'delivered' FROM webhook_deliveries",
        Duration::from_secs(10),
    )
    .await;
    dispatcher.stop().await;
    assert_eq!(receiver.count(), 1);
}

/// 410 Gone: the consumer asks never to be called again. The delivery is parked and the
/// endpoint disabled (Standard Webhooks' recommendation); later events are parked for it
/// too, never sent; other endpoints are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_disables_the_endpoint() {
    let db = TestDb::new("gone").await;
    let receiver = Receiver::start().await;
    receiver.always("/gone", Reply::status(410));
    let (gone, _) = db.add_endpoint(&receiver.url("/gone"), &[]).await;
    let (fine, _) = db.add_endpoint(&receiver.url("/fine"), &[]).await;
    let dispatcher = RunningDispatcher::start(&db.url, config("gone"));
    let first = db.enqueue("order.created", &json!({})).await;
    db.wait_until(&format!(
        "SELECT NOT active AND disabled_reason IS NOT NULL FROM webhook_endpoints WHERE id = {gone}"
    ))
    .await;
    db.wait_until(&format!(
        "SELECT state = 'parked' FROM webhook_deliveries WHERE endpoint_id = {gone}"
    ))
    .await;
    // Later events are kept for it, parked, not sent.
    let second = db.enqueue("order.created", &json!({})).await;
    db.wait_until(&format!(
        "SELECT count(*) = 2 AND bool_and(state = 'delivered') FROM webhook_deliveries
         WHERE endpoint_id = {fine}"
    ))
    .await;
    dispatcher.stop().await;

    assert_eq!(receiver.count_to("/gone"), 1, "a 410 is not retried");
    let to_gone: Vec<(i64, String)> = db
        .deliveries()
        .await
        .into_iter()
        .filter(|d| d.endpoint_id == gone)
        .map(|d| (d.event_id, d.state))
        .collect();
    assert_eq!(
        to_gone,
        [(first, "parked".to_owned()), (second, "parked".to_owned())]
    );
}
