//! The producer side: idempotency keys, transactions, delayed events.

use std::time::{Duration, SystemTime};

use serde_json::json;

use crate::harness::{Receiver, RunningDispatcher, TestDb, test_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_deduplicates() {
    let mut db = TestDb::new("idempotency").await;
    let receiver = Receiver::start().await;
    let (endpoint_id, _) = db.add_endpoint(&receiver.url("/hook"), &[]).await;

    // First insert through the library, in a transaction.
    let payload = json!({"order_id": 7});
    let tx = db.client.transaction().await.unwrap();
    let first = outboxd::enqueue(
        &tx,
        &outboxd::NewEvent {
            idempotency_key: Some("order-7-created"),
            ..outboxd::NewEvent::new("order.created", &payload)
        },
    )
    .await
    .unwrap()
    .expect("the first insert creates the event");
    tx.commit().await.unwrap();

    // Second insert with the same key, through the library: a no-op.
    let tx = db.client.transaction().await.unwrap();
    let second = outboxd::enqueue(
        &tx,
        &outboxd::NewEvent {
            idempotency_key: Some("order-7-created"),
            ..outboxd::NewEvent::new("order.created", &json!({"order_id": 7, "dup": true}))
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(second, None, "a duplicate key reports None");

    // Third, as a producer would write it in plain SQL.
    let tx = db.client.transaction().await.unwrap();
    let inserted = tx
        .execute(
            "INSERT INTO webhook_outbox (event_type, payload, idempotency_key)
             VALUES ('order.created', '{\"order_id\": 7, \"sql\": true}', 'order-7-created')
             ON CONFLICT DO NOTHING",
            &[],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(inserted, 0, "ON CONFLICT DO NOTHING inserts nothing");

    let dispatcher = RunningDispatcher::start(&db.url, test_config("idempotency"));
    // A later event without a key, delivered after the keyed one, bounds the wait.
    let later = db.enqueue("order.paid", &json!({"order_id": 7})).await;
    db.wait_all_in_state(2, "delivered").await;
    dispatcher.stop().await;

    let events: i64 = db
        .scalar("SELECT count(*) FROM webhook_outbox WHERE idempotency_key = 'order-7-created'")
        .await;
    assert_eq!(events, 1);
    let keyed: Vec<_> = receiver
        .requests()
        .into_iter()
        .filter(|r| r.event_id() == first)
        .collect();
    assert_eq!(keyed.len(), 1, "one delivery for the keyed event");
    assert_eq!(keyed[0].json()["data"], payload, "the first insert wins");
    assert_eq!(receiver.count(), 2);
    assert_eq!(db.delivery(first, endpoint_id).await.state, "delivered");
    assert_eq!(db.delivery(later, endpoint_id).await.state, "delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_event_is_never_delivered() {
    let mut db = TestDb::new("rollback").await;
    let receiver = Receiver::start().await;
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let dispatcher = RunningDispatcher::start(&db.url, test_config("rollback"));

    let payload = json!({"order_id": 9});
    let tx = db.client.transaction().await.unwrap();
    let doomed = outboxd::enqueue(&tx, &outboxd::NewEvent::new("order.doomed", &payload))
        .await
        .unwrap()
        .expect("an id inside the transaction");
    tx.rollback().await.unwrap();

    // An event committed after the rollback: once it is delivered the dispatcher has
    // looked at the outbox after the rolled-back one would have been there.
    let after = db.enqueue("order.created", &payload).await;
    db.wait_all_in_state(1, "delivered").await;
    dispatcher.stop().await;

    let requests = receiver.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].event_id(), after);
    assert_ne!(after, doomed);
    let ghosts: i64 = db
        .scalar("SELECT count(*) FROM webhook_outbox WHERE event_type = 'order.doomed'")
        .await;
    assert_eq!(ghosts, 0);
    let deliveries = db.deliveries().await;
    assert!(
        deliveries.iter().all(|d| d.event_id != doomed),
        "{deliveries:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliver_after_delays_delivery() {
    let db = TestDb::new("deliverafter").await;
    let receiver = Receiver::start().await;
    let (endpoint_id, _) = db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let dispatcher = RunningDispatcher::start(&db.url, test_config("deliverafter"));

    let payload = json!({"remind": true});
    let delayed = outboxd::enqueue(
        &db.client,
        &outboxd::NewEvent {
            deliver_after: Some(SystemTime::now() + Duration::from_secs(2)),
            ..outboxd::NewEvent::new("order.reminder", &payload)
        },
    )
    .await
    .unwrap()
    .expect("a new event");
    // An immediate event shows the dispatcher is up and sending meanwhile.
    let immediate = db.enqueue("order.created", &json!({})).await;

    db.wait_until(&format!(
        "SELECT count(*) = 1 FROM webhook_deliveries WHERE event_id = {delayed} AND state = 'delivered'"
    ))
    .await;
    db.wait_all_in_state(2, "delivered").await;
    dispatcher.stop().await;

    let deliver_after: SystemTime = db
        .client
        .query_one(
            "SELECT deliver_after FROM webhook_outbox WHERE id = $1",
            &[&delayed],
        )
        .await
        .unwrap()
        .get(0);
    let requests = receiver.requests();
    assert_eq!(requests.len(), 2);
    let delayed_request = requests
        .iter()
        .find(|r| r.event_id() == delayed)
        .expect("the delayed event was delivered");
    assert!(
        delayed_request.arrived_at >= deliver_after,
        "delivered at {:?}, {:?} before its deliver_after {deliver_after:?}",
        delayed_request.arrived_at,
        deliver_after
            .duration_since(delayed_request.arrived_at)
            .unwrap_or(Duration::ZERO)
    );
    let d = db.delivery(delayed, endpoint_id).await;
    assert_eq!(d.attempts, 1);
    assert!(requests.iter().any(|r| r.event_id() == immediate));
}
