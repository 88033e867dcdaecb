//! One event, every subscribed endpoint, and no other.

use std::collections::{BTreeSet, HashMap};

use serde_json::json;

use crate::harness::{Receiver, RunningDispatcher, TestDb, test_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fans_out_by_event_type_filters() {
    let db = TestDb::new("fanout").await;
    let receiver = Receiver::start().await;
    let endpoints = [
        ("/orders-all", vec!["order.*"]),
        ("/orders-created", vec!["order.created"]),
        ("/customers", vec!["customer.updated"]),
        ("/everything", vec![]),
    ];
    let mut secrets = HashMap::new();
    let mut ids = HashMap::new();
    for (path, filters) in &endpoints {
        let (id, secret) = db.add_endpoint(&receiver.url(path), filters).await;
        secrets.insert(*path, secret);
        ids.insert(*path, id);
    }
    let dispatcher = RunningDispatcher::start(&db.url, test_config("fanout"));

    let created = db.enqueue("order.created", &json!({"n": 1})).await;
    let paid = db.enqueue("order.paid", &json!({"n": 2})).await;
    let customer = db.enqueue("customer.updated", &json!({"n": 3})).await;
    // "orderly.created" must not match "order.*" (prefix match is per dot segment).
    let lookalike = db.enqueue("orderly.created", &json!({"n": 4})).await;

    let expected: BTreeSet<(i64, &str)> = [
        (created, "/orders-all"),
        (created, "/orders-created"),
        (created, "/everything"),
        (paid, "/orders-all"),
        (paid, "/everything"),
        (customer, "/customers"),
        (customer, "/everything"),
        (lookalike, "/everything"),
    ]
    .into_iter()
    .collect();
    let n = expected.len() as i64;
    db.wait_all_in_state(n, "delivered").await;
    // Every event is fanned out, including those only one endpoint wants.
    db.wait_until("SELECT bool_and(processed_at IS NOT NULL) FROM webhook_outbox")
        .await;
    dispatcher.stop().await;

    let requests = receiver.requests();
    let seen: Vec<(i64, &str)> = requests
        .iter()
        .map(|r| (r.event_id(), r.path.as_str()))
        .collect();
    assert_eq!(seen.len(), expected.len(), "one request per pair: {seen:?}");
    assert_eq!(
        seen.iter().copied().collect::<BTreeSet<_>>(),
        expected,
        "(event, endpoint) pairs"
    );

    // The database agrees.
    let in_db: BTreeSet<(i64, i64)> = db
        .deliveries()
        .await
        .iter()
        .map(|d| (d.event_id, d.endpoint_id))
        .collect();
    let expected_ids: BTreeSet<(i64, i64)> =
        expected.iter().map(|(e, path)| (*e, ids[path])).collect();
    assert_eq!(in_db, expected_ids);

    // Each body verifies with its own endpoint's secret and no other endpoint's.
    for r in &requests {
        r.verify(&secrets[r.path.as_str()])
            .unwrap_or_else(|e| panic!("{} on {}: {e}", r.webhook_id(), r.path));
        for (path, secret) in &secrets {
            if *path != r.path {
                assert!(r.verify(secret).is_err(), "{path}'s secret verified {r:?}");
            }
        }
        assert_eq!(r.json()["id"], json!(r.webhook_id()));
    }

    // One event, one webhook-id and one body on every endpoint.
    let mut per_event: HashMap<i64, BTreeSet<(String, Vec<u8>)>> = HashMap::new();
    for r in &requests {
        per_event
            .entry(r.event_id())
            .or_default()
            .insert((r.webhook_id().to_owned(), r.body.to_vec()));
    }
    for (event, variants) in &per_event {
        assert_eq!(variants.len(), 1, "event {event} differs between endpoints");
    }
}
