//! Routing by filters at scale: an event costs the endpoints that receive it, not the
//! endpoints registered, and each endpoint gets exactly the events its filters select.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use outboxd::claim::{self, Claimed};

use crate::harness::{Receiver, RunningDispatcher, TestDb, test_config};

/// Registers `n` endpoints at `url_of(i)`, the i-th (from 1) subscribed to `tenant.i.*`,
/// in one statement; returns their ids in order.
async fn tenants(db: &TestDb, n: i64, url_of: impl Fn(i64) -> String) -> Vec<i64> {
    let urls: Vec<String> = (1..=n).map(url_of).collect();
    let rows = db
        .client
        .query(
            "INSERT INTO webhook_endpoints (url, secret, event_types)
             SELECT u, 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw', ARRAY['tenant.' || i || '.*']
             FROM unnest($1::text[]) WITH ORDINALITY AS t(u, i)
             ORDER BY i
             RETURNING id",
            &[&urls],
        )
        .await
        .expect("register endpoints");
    rows.iter().map(|r| r.get(0)).collect()
}

/// Commits `per_tenant` events for each of tenants 1..=n (`tenant.i.created`, payload
/// `{"tenant": i}`), interleaved, in one transaction.
async fn enqueue_per_tenant(db: &TestDb, n: i64, per_tenant: i64) {
    db.client
        .execute(
            "INSERT INTO webhook_outbox (event_type, payload)
             SELECT 'tenant.' || i || '.created', jsonb_build_object('tenant', i)
             FROM generate_series(1, $2::int8) AS k, generate_series(1, $1::int8) AS i
             ORDER BY k, i",
            &[&n, &per_tenant],
        )
        .await
        .expect("enqueue");
}

/// With a thousand endpoints each subscribed to its own events, one claim fans out a
/// whole batch of events (each to its one endpoint). The claim used to size its fan-out
/// as if every event went to every endpoint: one event per claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_claim_takes_a_batch_across_a_thousand_filtered_endpoints() {
    let db = TestDb::new("routing_batch").await;
    let ids = tenants(&db, 1000, |i| format!("http://127.0.0.1:9/t{i}")).await;
    enqueue_per_tenant(&db, 1000, 1).await;

    let claimed = claim::claim(&db.client, "w", Duration::from_secs(60), 200)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 200, "one claim, a full batch");
    for c in &claimed {
        let Claimed::Send(d) = c else {
            panic!("an open endpoint's delivery was parked: {c:?}")
        };
        // Event k (from 1) is tenant k's.
        let tenant = d.event_id;
        assert_eq!(d.endpoint_id, ids[(tenant - 1) as usize], "{d:?}");
    }
    // Exactly the events claimed were fanned out, each to one endpoint.
    let made: i64 = db.scalar("SELECT count(*) FROM webhook_deliveries").await;
    let processed: i64 = db
        .scalar("SELECT count(*) FROM webhook_outbox WHERE processed_at IS NOT NULL")
        .await;
    assert_eq!((made, processed), (200, 200));
}

/// The index lookup selects exactly what the filters say, for every kind of filter and
/// awkward event names, disabled endpoints included (their deliveries are parked) and
/// removed ones excluded. The reference is the match the claim used before it looked
/// endpoints up by index, written out here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_lookup_matches_exactly_what_the_filters_say() {
    let db = TestDb::new("routing_exact").await;
    let filters: &[&[&str]] = &[
        &[],
        &["*"],
        &["a"],
        &["a.*"],
        &["a.b"],
        &["a.b.*"],
        &["a.b.c"],
        &["a.b.*", "x.y"],
        &["ab.*"],
        &["b.*", "a.b.c.d"],
        &["x.*"],
        &["a.*", "a.b.*", "*"],
    ];
    for (i, f) in filters.iter().enumerate() {
        let f: Vec<String> = f.iter().map(|s| (*s).to_owned()).collect();
        db.client
            .execute(
                "INSERT INTO webhook_endpoints (url, secret, event_types, active, deleted_at)
                 VALUES ('http://127.0.0.1:9/', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw', $1,
                         $2, CASE WHEN $3 THEN now() END)",
                &[&f, &(i % 5 != 4), &(i % 7 == 6)],
            )
            .await
            .expect("endpoint");
    }
    let types = [
        "a", "a.b", "a.b.c", "a.b.c.d", "ab", "ab.c", "a.bc", "b.a", "x.y", "x.y.z", "a.", "a..b",
        ".a", "abc.d", "*", "a.*",
    ];
    for t in types {
        db.client
            .execute(
                "INSERT INTO webhook_outbox (event_type, payload) VALUES ($1, '{}')",
                &[&t],
            )
            .await
            .expect("event");
    }
    for _ in 0..100 {
        claim::claim(&db.client, "w", Duration::from_secs(60), 10)
            .await
            .expect("claim");
        let left: i64 = db
            .scalar("SELECT count(*) FROM webhook_outbox WHERE processed_at IS NULL")
            .await;
        if left == 0 {
            break;
        }
    }
    let client = &db.client;
    let pairs = |sql: &'static str| async move {
        client
            .query(sql, &[])
            .await
            .expect(sql)
            .iter()
            .map(|r| {
                (
                    (r.get::<_, i64>(0), r.get::<_, i64>(1)),
                    r.get::<_, String>(2),
                )
            })
            .collect::<BTreeMap<(i64, i64), String>>()
    };
    let made = pairs(
        "SELECT event_id, endpoint_id, CASE WHEN state = 'parked' THEN 'parked' ELSE 'open' END
         FROM webhook_deliveries",
    )
    .await;
    let expected = pairs(
        "SELECT e.id, ep.id, CASE WHEN ep.active THEN 'open' ELSE 'parked' END
         FROM webhook_outbox e
         JOIN webhook_endpoints ep
           ON ep.deleted_at IS NULL
          AND (cardinality(ep.event_types) = 0
               OR e.event_type = ANY (ep.event_types)
               OR EXISTS (SELECT 1 FROM unnest(ep.event_types) AS f
                          WHERE f = '*'
                             OR (right(f, 2) = '.*'
                                 AND starts_with(e.event_type, left(f, -1)))))",
    )
    .await;
    assert!(
        expected.len() > 50,
        "a meaningful sample: {}",
        expected.len()
    );
    assert_eq!(made, expected);
}

/// End to end: a thousand endpoints, each subscribed to its own events, each receives
/// exactly its events and no other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_filtered_endpoints_each_receive_exactly_their_events() {
    let db = TestDb::new("routing_e2e").await;
    let receiver = Receiver::start().await;
    let ids = tenants(&db, 1000, |i| receiver.url(&format!("/t{i}"))).await;
    assert_eq!(ids.len(), 1000);
    enqueue_per_tenant(&db, 1000, 3).await;
    let dispatcher = RunningDispatcher::start(&db.url, test_config("routing_e2e"));
    let requests = receiver
        .wait_for_within(3000, Duration::from_secs(120))
        .await;
    db.wait_all_in_state(3000, "delivered").await;
    dispatcher.stop().await;

    let mut per_path: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
    for r in &requests {
        assert_eq!(
            r.json()["data"]["tenant"]
                .as_i64()
                .map(|t| format!("/t{t}")),
            Some(r.path.clone()),
            "{} went to the wrong endpoint",
            r.webhook_id()
        );
        per_path
            .entry(r.path.clone())
            .or_default()
            .insert(r.event_id());
    }
    assert_eq!(per_path.len(), 1000, "every endpoint received");
    for (path, events) in &per_path {
        assert_eq!(events.len(), 3, "{path}: {events:?}");
    }
    assert_eq!(requests.len(), 3000, "no event twice");
}
