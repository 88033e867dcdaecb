//! Ordered delivery's basic promise through a real dispatcher: per (endpoint, key), one
//! request at a time, in order, retries included; events without a key unchanged.

use std::collections::HashMap;

use outboxd::Config;
use serde_json::json;

use crate::harness::{Receiver, Reply, RunningDispatcher, TestDb, test_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_key_arrives_in_order_one_at_a_time_through_retries() {
    let db = TestDb::new("ordering_basics").await;
    let receiver = Receiver::start().await;
    // Every third of the first requests fails: retries must not let a later event
    // overtake. (Bounded, and with attempts to spare, so that no delivery lands on the
    // failing turn until it is dead.)
    receiver.script("/hook", |n| {
        if n < 90 && n % 3 == 1 {
            Reply::status(500)
        } else {
            Reply::ok()
        }
    });
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let config = Config {
        max_attempts: 30,
        ..test_config("ordering_basics")
    };
    let dispatcher = RunningDispatcher::start(&db.url, config);

    let client = db.connect().await;
    let keys = ["a", "b", "c"];
    let per_key = 15;
    for n in 0..per_key {
        for key in keys {
            client
                .execute(
                    "INSERT INTO webhook_outbox (event_type, payload, ordering_key)
                     VALUES ('order.updated', jsonb_build_object('key', $1::text, 'n', $2::int), $1)",
                    &[&key, &n],
                )
                .await
                .unwrap();
        }
        // And unordered ones beside them.
        db.enqueue("order.viewed", &json!({"n": n})).await;
    }
    let total = (keys.len() as i64 + 1) * i64::from(per_key);
    db.wait_all_in_state(total, "delivered").await;
    dispatcher.stop().await;

    let mut seen: HashMap<String, Vec<i64>> = HashMap::new();
    for r in receiver.requests() {
        let data = r.json()["data"].clone();
        if let Some(key) = data["key"].as_str() {
            seen.entry(key.to_owned())
                .or_default()
                .push(data["n"].as_i64().unwrap());
        }
    }
    for key in keys {
        let arrivals = &seen[key];
        // First arrivals in order (a failed request is re-sent, never overtaken).
        let mut firsts = arrivals.clone();
        firsts.dedup();
        assert_eq!(
            firsts,
            (0..i64::from(per_key)).collect::<Vec<_>>(),
            "key {key} arrived as {arrivals:?}"
        );
    }
    assert_eq!(
        db.scalar::<i64>("SELECT count(*) FROM webhook_ordering_keys")
            .await,
        0,
        "no line is left with a head"
    );
    assert_eq!(
        db.scalar::<i64>("SELECT count(*) FROM webhook_ordering_log")
            .await,
        0
    );
}

/// An ordered event the producers' trigger did not number (a session replaying with
/// `session_replication_role = replica`, a key set by a later UPDATE) is numbered by
/// housekeeping and delivered, in order with the rest of its key, never stranded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_the_trigger_did_not_number_are_delivered_all_the_same() {
    let db = TestDb::new("ordering_strays").await;
    let receiver = Receiver::start().await;
    receiver.always("/hook", Reply::ok());
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let client = db.connect().await;
    client
        .batch_execute(
            "BEGIN;
             SET LOCAL session_replication_role = replica;
             INSERT INTO webhook_outbox (event_type, payload, ordering_key)
             VALUES ('order.updated', '{\"n\": 0}', 'k');
             COMMIT;
             INSERT INTO webhook_outbox (event_type, payload)
             VALUES ('order.updated', '{\"n\": 1}');
             UPDATE webhook_outbox SET ordering_key = 'k' WHERE payload = '{\"n\": 1}';",
        )
        .await
        .unwrap();
    assert_eq!(
        db.scalar::<i64>("SELECT count(*) FROM webhook_ordering_log")
            .await,
        0,
        "neither was numbered by the trigger"
    );
    // Housekeeping's first round runs as the dispatcher starts.
    let dispatcher = RunningDispatcher::start(&db.url, test_config("ordering_strays"));
    db.wait_all_in_state(2, "delivered").await;
    dispatcher.stop().await;
    let order: Vec<i64> = receiver
        .requests()
        .iter()
        .map(|r| r.json()["data"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(order, [0, 1]);
}

/// Events of a key delayed by `deliver_after` hold back their own key only: many of them
/// ahead of other keys in commit order must not stop the other keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_key_holds_back_only_itself() {
    let db = TestDb::new("ordering_delayed").await;
    let receiver = Receiver::start().await;
    receiver.always("/hook", Reply::ok());
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let client = db.connect().await;
    // More delayed events than a sequencer run takes (test_config's batch of 100).
    client
        .batch_execute(
            "INSERT INTO webhook_outbox (event_type, payload, ordering_key, deliver_after)
             SELECT 'order.reminder', jsonb_build_object('n', g), 'later', now() + interval '1 hour'
             FROM generate_series(1, 250) AS g;
             INSERT INTO webhook_outbox (event_type, payload, ordering_key)
             SELECT 'order.updated', jsonb_build_object('n', g), 'now-' || (g % 3)
             FROM generate_series(1, 30) AS g;",
        )
        .await
        .unwrap();
    let dispatcher = RunningDispatcher::start(&db.url, test_config("ordering_delayed"));
    db.wait_until("SELECT count(*) = 30 FROM webhook_deliveries WHERE state = 'delivered'")
        .await;
    dispatcher.stop().await;
    let late: Vec<(String, i64)> = client
        .query(
            "SELECT state, count(*) FROM webhook_deliveries
             WHERE ordering_key = 'later' GROUP BY state ORDER BY state",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        late,
        [("pending".to_owned(), 1), ("queued".to_owned(), 249)],
        "the delayed key waits, its head due in an hour"
    );
    assert_eq!(receiver.count_to("/hook"), 30);
}
