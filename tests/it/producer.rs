//! The producer side: idempotency keys, transactions, delayed events.

use std::time::{Duration, SystemTime};

use serde_json::json;

use crate::harness::{Receiver, RunningDispatcher, TestDb, test_config};
use crate::wakeups::push_only;

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

// ---------------------------------------------------------------------------------------
// Producers at every isolation level (the insert trigger must never fail one)
// ---------------------------------------------------------------------------------------

/// Producers per scenario: each holds a transaction open, so they run at once.
const PRODUCERS: usize = 20;

/// Whether a dispatcher is asleep on the doorbell: bell armed, gate open.
const ASLEEP: &str = "SELECT armed AND pg_sequence_last_value('webhook_doorbell_gate') IS NULL
     FROM webhook_doorbell";

/// Waits until the push-only dispatcher sleeps on the bell, past the rechecks it makes
/// after arming (~100 ms): from then on only a notification wakes it.
async fn until_asleep(db: &TestDb) {
    db.wait_until(ASLEEP).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    db.wait_until(ASLEEP).await;
}

/// `PRODUCERS` connections to `url`, each in a transaction at `isolation` (`None`: the
/// session's default) whose snapshot is taken now.
async fn producers_with_snapshots(
    url: &str,
    isolation: Option<&str>,
) -> Vec<tokio_postgres::Client> {
    let begin = match isolation {
        Some(level) => format!("BEGIN ISOLATION LEVEL {level}; SELECT 1"),
        None => "BEGIN; SELECT 1".to_owned(),
    };
    let mut producers = Vec::new();
    for _ in 0..PRODUCERS {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect a producer");
        tokio::spawn(connection);
        client.batch_execute(&begin).await.expect("begin");
        producers.push(client);
    }
    producers
}

/// Every producer inserts one event and commits, all at once. Returns the ids of the
/// committed events; panics with every error if any producer failed.
async fn produce_and_commit(producers: Vec<tokio_postgres::Client>) -> Vec<i64> {
    let tasks: Vec<_> = producers
        .into_iter()
        .enumerate()
        .map(|(n, client)| {
            tokio::spawn(async move {
                let id: i64 = client
                    .query_one(
                        "INSERT INTO webhook_outbox (event_type, payload)
                         VALUES ('order.created', jsonb_build_object('n', $1::int)) RETURNING id",
                        &[&(n as i32)],
                    )
                    .await?
                    .get(0);
                client.batch_execute("COMMIT").await?;
                Ok::<_, tokio_postgres::Error>(id)
            })
        })
        .collect();
    let mut ids = Vec::new();
    let mut errors = Vec::new();
    for task in tasks {
        match task.await.expect("producer task") {
            Ok(id) => ids.push(id),
            Err(e) => errors.push(format!("{e} {:?}", e.as_db_error().map(|d| d.message()))),
        }
    }
    assert!(
        errors.is_empty(),
        "{} of {PRODUCERS} producers failed: {errors:#?}",
        errors.len()
    );
    ids.sort_unstable();
    ids
}

/// Waits until the receiver has every event in `ids`, once each.
async fn delivered_by_push(receiver: &Receiver, ids: &[i64], before: usize) {
    let requests = receiver.wait_for(before + ids.len()).await;
    let mut got: Vec<i64> = requests[before..].iter().map(|r| r.event_id()).collect();
    got.sort_unstable();
    assert_eq!(got, ids);
}

/// Producers whose snapshot predates the dispatcher's first arm: the bell they would
/// read is stale (disarmed), yet their commits must wake the sleeping dispatcher.
async fn snapshot_before_the_arm(isolation: &str, label: &str) {
    let db = TestDb::new(label).await;
    let receiver = Receiver::start().await;
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let producers = producers_with_snapshots(&db.url, Some(isolation)).await;
    let dispatcher = push_only(&db.url, label);
    until_asleep(&db).await;

    let ids = produce_and_commit(producers).await;
    delivered_by_push(&receiver, &ids, 0).await;
    dispatcher.stop().await;
}

/// Producers whose snapshot predates a ring and the dispatcher's re-arm: the bell row
/// changed after their snapshot, which a row lock at this level refuses with 40001.
async fn snapshot_before_a_ring(url: &str, db: &TestDb, isolation: Option<&str>, label: &str) {
    let receiver = Receiver::start().await;
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let dispatcher = push_only(&db.url, label);
    until_asleep(db).await;
    let producers = producers_with_snapshots(url, isolation).await;

    // A READ COMMITTED producer rings (disarming the bell); the dispatcher delivers and
    // arms again.
    let first = db.enqueue("order.first", &json!({})).await;
    delivered_by_push(&receiver, &[first], 0).await;
    until_asleep(db).await;

    let ids = produce_and_commit(producers).await;
    delivered_by_push(&receiver, &ids, 1).await;
    dispatcher.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeatable_read_producers_with_a_snapshot_before_the_arm() {
    snapshot_before_the_arm("REPEATABLE READ", "rr_arm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serializable_producers_with_a_snapshot_before_the_arm() {
    snapshot_before_the_arm("SERIALIZABLE", "ser_arm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeatable_read_producers_with_a_snapshot_before_a_ring() {
    let db = TestDb::new("rr_ring").await;
    snapshot_before_a_ring(&db.url, &db, Some("REPEATABLE READ"), "rr_ring").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serializable_producers_with_a_snapshot_before_a_ring() {
    let db = TestDb::new("ser_ring").await;
    snapshot_before_a_ring(&db.url, &db, Some("SERIALIZABLE"), "ser_ring").await;
}

/// A database whose `default_transaction_isolation` is `serializable`: producers that
/// just `BEGIN` run serializable. They connect as a producer role with only the grants
/// the README lists; the dispatcher sets READ COMMITTED on its own sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_in_a_serializable_database() {
    let db = TestDb::new("ser_db").await;
    if !db.may_create_roles().await {
        eprintln!("skipped: the test database user cannot create roles");
        return;
    }
    let role = format!("{}_producer", db.name);
    let password = "producer-password";
    db.client
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{password}';
             GRANT INSERT, SELECT (id) ON webhook_outbox TO {role};
             ALTER DATABASE {name} SET default_transaction_isolation = 'serializable';",
            name = db.name
        ))
        .await
        .unwrap();
    let producer_url = if db.url.contains("://") {
        let mut url = url::Url::parse(&db.url).unwrap();
        url.set_username(&role).unwrap();
        url.set_password(Some(password)).unwrap();
        url.to_string()
    } else {
        format!("{} user={role} password={password}", db.url)
    };
    let (check, connection) = tokio_postgres::connect(&producer_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let level: String = check
        .query_one("SHOW transaction_isolation", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(level, "serializable");
    drop(check);

    snapshot_before_a_ring(&producer_url, &db, None, "ser_db").await;
    db.client
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role};"))
        .await
        .unwrap();
}
