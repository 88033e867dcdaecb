//! How a dispatcher learns about new events: push (LISTEN/NOTIFY through the
//! doorbell), reconnect catch-up, and plain polling.

use std::time::Duration;

use serde_json::json;

use crate::harness::{Receiver, RunningDispatcher, TestDb, eventually, test_config};

/// Longer than any test: only a push or a reconnect can wake the dispatcher.
const ONE_HOUR: Duration = Duration::from_millis(3_600_000);

const LISTENER_PIDS: &str = "SELECT pid FROM pg_stat_activity
     WHERE application_name = 'outboxd-listener' AND datname = current_database()";

async fn listener_pids(db: &TestDb) -> Vec<i32> {
    db.client
        .query(LISTENER_PIDS, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_delivers_without_polling() {
    let mut db = TestDb::new("push").await;
    let receiver = Receiver::start().await;
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let dispatcher = RunningDispatcher::start(
        &db.url,
        outboxd::Config {
            poll_interval: ONE_HOUR,
            listen: true,
            ..test_config("push")
        },
    );

    // Idle: the listener is subscribed and the claim loop armed the doorbell.
    db.wait_until(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
             WHERE application_name = 'outboxd-listener' AND datname = current_database()
               AND state = 'idle' AND query ILIKE 'LISTEN%')",
    )
    .await;
    db.wait_until("SELECT armed FROM webhook_doorbell").await;

    let tx = db.client.transaction().await.unwrap();
    let event_id = outboxd::enqueue(&tx, &outboxd::NewEvent::new("order.created", &json!({})))
        .await
        .unwrap()
        .unwrap();
    // The insert trigger found the bell armed, disarmed it and notified.
    let armed: bool = tx
        .query_one("SELECT armed FROM webhook_doorbell", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!armed, "the insert must ring (and disarm) the doorbell");
    tx.commit().await.unwrap();

    db.wait_until_within(
        "SELECT count(*) = 1 AND bool_and(state = 'delivered') FROM webhook_deliveries",
        Duration::from_secs(10),
    )
    .await;
    dispatcher.stop().await;
    let requests = receiver.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].event_id(), event_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_reconnects_after_termination() {
    let db = TestDb::new("reconnect").await;
    let receiver = Receiver::start().await;
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let dispatcher = RunningDispatcher::start(
        &db.url,
        outboxd::Config {
            poll_interval: ONE_HOUR,
            listen: true,
            ..test_config("reconnect")
        },
    );

    db.wait_until(&format!("SELECT count(*) = 1 FROM ({LISTENER_PIDS}) l"))
        .await;
    let old = listener_pids(&db).await;
    assert_eq!(old.len(), 1, "{old:?}");
    let old_pid = old[0];
    let terminated: bool = db
        .client
        .query_one("SELECT pg_terminate_backend($1)", &[&old_pid])
        .await
        .unwrap()
        .get(0);
    assert!(terminated);
    db.wait_until(&format!(
        "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = {old_pid})"
    ))
    .await;

    let event_id = db.enqueue("order.created", &json!({})).await;
    db.wait_until_within(
        "SELECT count(*) = 1 AND bool_and(state = 'delivered') FROM webhook_deliveries",
        Duration::from_secs(15),
    )
    .await;

    // A new listener session replaced the terminated one.
    eventually(
        "a new listener backend exists",
        crate::harness::WAIT,
        || {
            let db = &db;
            async move {
                let pids = listener_pids(db).await;
                pids.len() == 1 && pids[0] != old_pid
            }
        },
    )
    .await;

    // And it works: the next event is pushed too.
    db.wait_until("SELECT armed FROM webhook_doorbell").await;
    let second = db.enqueue("order.paid", &json!({})).await;
    db.wait_until_within(
        "SELECT count(*) = 2 AND bool_and(state = 'delivered') FROM webhook_deliveries",
        Duration::from_secs(15),
    )
    .await;
    dispatcher.stop().await;
    let ids: Vec<i64> = receiver.requests().iter().map(|r| r.event_id()).collect();
    assert_eq!(ids, [event_id, second]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_delivers_without_listen() {
    let db = TestDb::new("polling").await;
    let receiver = Receiver::start().await;
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let dispatcher = RunningDispatcher::start(
        &db.url,
        outboxd::Config {
            poll_interval: Duration::from_millis(200),
            listen: false,
            ..test_config("polling")
        },
    );

    let first = db.enqueue("order.created", &json!({"n": 1})).await;
    db.wait_all_in_state(1, "delivered").await;
    let second = db.enqueue("order.created", &json!({"n": 2})).await;
    db.wait_all_in_state(2, "delivered").await;

    // Pure polling: no LISTEN session, and the doorbell is never armed.
    assert!(listener_pids(&db).await.is_empty());
    let armed: bool = db.scalar("SELECT armed FROM webhook_doorbell").await;
    assert!(!armed, "a polling dispatcher must not arm the doorbell");
    dispatcher.stop().await;
    let ids: Vec<i64> = receiver.requests().iter().map(|r| r.event_id()).collect();
    assert_eq!(ids, [first, second]);
}
