//! Operational events (`sql/0010_operational_events.sql`): an endpoint disabled and a
//! delivery gone dead become events in the outbox, committed with their change,
//! delivered to the endpoints that name them, never to the endpoint they are about,
//! and never announcing their own failures.

use serde_json::json;

use crate::harness::{Receiver, Reply, RunningDispatcher, TestDb, test_config};

async fn count(db: &TestDb, event_type: &str) -> i64 {
    db.scalar(&format!(
        "SELECT count(*) FROM webhook_outbox WHERE event_type = '{event_type}'"
    ))
    .await
}

/// A disable rolled back leaves no event; one committed leaves exactly one, delivered
/// to the endpoint that subscribed to `outboxd.*`, and not to an endpoint that takes
/// every event nor to the disabled endpoint itself (though its filter names it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disable_is_announced_with_its_transaction() {
    let db = TestDb::new("opsdisable").await;
    let receiver = Receiver::start().await;
    let (watcher, _) = db.add_endpoint(&receiver.url("/ops"), &["outboxd.*"]).await;
    let (everything, _) = db.add_endpoint(&receiver.url("/all"), &[]).await;
    let (star, _) = db.add_endpoint(&receiver.url("/star"), &["*"]).await;
    let (subject, _) = db
        .add_endpoint(&receiver.url("/subject"), &["order.*", "outboxd.*"])
        .await;

    let mut client = db.connect().await;
    let tx = client.transaction().await.unwrap();
    outboxd::endpoint::disable(&tx, subject, "maintenance")
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(count(&db, "outboxd.endpoint.disabled").await, 0);

    let tx = client.transaction().await.unwrap();
    outboxd::endpoint::disable(&tx, subject, "maintenance")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(count(&db, "outboxd.endpoint.disabled").await, 1);
    // Removing an endpoint is not disabling it.
    outboxd::endpoint::remove(&client, star).await.unwrap();
    assert_eq!(count(&db, "outboxd.endpoint.disabled").await, 1);

    let dispatcher = RunningDispatcher::start(&db.url, test_config("opsdisable"));
    db.wait_until(&format!(
        "SELECT count(*) = 1 FROM webhook_deliveries d
         JOIN webhook_outbox o ON o.id = d.event_id
         WHERE o.event_type = 'outboxd.endpoint.disabled' AND d.state = 'delivered'
           AND d.endpoint_id = {watcher}"
    ))
    .await;
    // An ordinary event still reaches the endpoints that take everything.
    db.enqueue("order.created", &json!({})).await;
    db.wait_until(&format!(
        "SELECT count(*) = 1 FROM webhook_deliveries
         WHERE endpoint_id = {everything} AND state = 'delivered'"
    ))
    .await;
    dispatcher.stop().await;

    let announced = receiver.requests_to("/ops");
    assert_eq!(announced.len(), 1);
    let body = announced[0].json();
    assert_eq!(body["type"], "outboxd.endpoint.disabled");
    assert_eq!(body["data"]["endpoint_id"], subject);
    assert_eq!(body["data"]["reason"], "maintenance");
    let elsewhere: i64 = db
        .scalar(&format!(
            "SELECT count(*) FROM webhook_deliveries d
             JOIN webhook_outbox o ON o.id = d.event_id
             WHERE o.event_type LIKE 'outboxd.%' AND d.endpoint_id <> {watcher}"
        ))
        .await;
    assert_eq!(
        elsewhere, 0,
        "no delivery to the endpoint it is about, nor to those without an outboxd filter"
    );
    assert!(receiver.requests_to("/all").iter().all(|r| {
        r.json()["type"]
            .as_str()
            .is_some_and(|t| !t.starts_with("outboxd."))
    }));
}

/// A delivery gone dead is announced once, to the endpoints that name the event, not to
/// the endpoint that failed; an announcement that itself goes dead announces nothing,
/// and a 410 Gone's disable is announced too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_delivery_is_announced_once_and_never_loops() {
    let db = TestDb::new("opsdead").await;
    let receiver = Receiver::start().await;
    // 400 is a permanent failure: the first attempt ends dead.
    receiver.always("/broken", Reply::status(400).body("no such order"));
    receiver.always("/refuses-all", Reply::status(400));
    receiver.always("/gone", Reply::status(410));
    let (broken, _) = db
        .add_endpoint(&receiver.url("/broken"), &["order.*", "outboxd.*"])
        .await;
    let (refuses, _) = db
        .add_endpoint(&receiver.url("/refuses-all"), &["outboxd.delivery.*"])
        .await;
    let (watcher, _) = db.add_endpoint(&receiver.url("/ops"), &["outboxd.*"]).await;
    let (gone, _) = db
        .add_endpoint(&receiver.url("/gone"), &["invoice.*"])
        .await;

    let dispatcher = RunningDispatcher::start(&db.url, test_config("opsdead"));
    let order = db.enqueue("order.created", &json!({ "order_id": 7 })).await;
    db.enqueue("invoice.paid", &json!({})).await;
    // Settled: the announcement of the dead order delivered to the watcher, and dead at
    // the endpoint that refuses everything; the 410's disable delivered to the watcher.
    db.wait_until(&format!(
        "SELECT count(*) = 1 FROM webhook_deliveries d
         JOIN webhook_outbox o ON o.id = d.event_id
         WHERE o.event_type = 'outboxd.delivery.dead' AND d.endpoint_id = {refuses}
           AND d.state = 'dead'"
    ))
    .await;
    db.wait_until(&format!(
        "SELECT count(*) = 2 FROM webhook_deliveries d
         JOIN webhook_outbox o ON o.id = d.event_id
         WHERE o.event_type LIKE 'outboxd.%' AND d.endpoint_id = {watcher}
           AND d.state = 'delivered'"
    ))
    .await;
    dispatcher.stop().await;

    // One announcement of a death: the order's. The deaths of announcements (at the
    // refusing endpoint, and of the 410's announcement at the broken one) made none.
    assert_eq!(count(&db, "outboxd.delivery.dead").await, 1);
    assert_eq!(count(&db, "outboxd.endpoint.disabled").await, 1);
    let to_broken: i64 = db
        .scalar(&format!(
            "SELECT count(*) FROM webhook_deliveries d
             JOIN webhook_outbox o ON o.id = d.event_id
             WHERE o.about_endpoint_id = {broken} AND d.endpoint_id = {broken}"
        ))
        .await;
    assert_eq!(
        to_broken, 0,
        "the failed endpoint is not sent its own death"
    );

    let announced: Vec<serde_json::Value> = receiver
        .requests_to("/ops")
        .iter()
        .map(|r| r.json())
        .collect();
    let dead = announced
        .iter()
        .find(|b| b["type"] == "outboxd.delivery.dead")
        .expect("the death announced to the watcher");
    assert_eq!(dead["data"]["event_id"], order);
    assert_eq!(dead["data"]["endpoint_id"], broken);
    assert_eq!(dead["data"]["event_type"], "order.created");
    assert_eq!(dead["data"]["last_status"], 400);
    let disabled = announced
        .iter()
        .find(|b| b["type"] == "outboxd.endpoint.disabled")
        .expect("the 410's disable announced to the watcher");
    assert_eq!(disabled["data"]["endpoint_id"], gone);
}
