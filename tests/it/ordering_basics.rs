//! Ordered delivery's basic promise through a real dispatcher: per (endpoint, key), one
//! request at a time, in order, retries included; events without a key unchanged.

use std::collections::HashMap;

use serde_json::json;

use crate::harness::{Receiver, Reply, RunningDispatcher, TestDb, test_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_key_arrives_in_order_one_at_a_time_through_retries() {
    let db = TestDb::new("ordering_basics").await;
    let receiver = Receiver::start().await;
    // Every third request fails once: retries must not let a later event overtake.
    receiver.script("/hook", |n| {
        if n % 3 == 1 {
            Reply::status(500)
        } else {
            Reply::ok()
        }
    });
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let dispatcher = RunningDispatcher::start(&db.url, test_config("ordering_basics"));

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
