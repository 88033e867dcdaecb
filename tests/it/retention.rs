//! Retention: `retention::prune` deletes exactly the final history past its retention
//! (delivered after the delivered retention, dead after the dead one, with their
//! attempts, and events once no delivery remains) and never touches pending, in-flight
//! or parked work, nor events not yet fanned out; in batches, so a large backlog takes
//! several.
//!
//! The rows are written by SQL, as the dispatcher would have left them, and aged by
//! setting their timestamps.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use outboxd::retention::{Pruned, RetentionPolicy, prune};

use crate::harness::TestDb;

const HOUR: Duration = Duration::from_secs(3600);
const POLICY: RetentionPolicy = RetentionPolicy {
    delivered: Duration::from_secs(72 * 3600),
    dead: Duration::from_secs(720 * 3600),
};
const BUDGET: Duration = Duration::from_secs(10);

/// Inserts an event created `age_hours` ago, fanned out a second later unless
/// `processed` is false; returns its id.
async fn event(db: &TestDb, age_hours: i32, processed: bool) -> i64 {
    db.client
        .query_one(
            "INSERT INTO webhook_outbox (event_type, payload, created_at, deliver_after, processed_at)
             SELECT 'order.created', '{}', t, t, CASE WHEN $2 THEN t + interval '1 second' END
             FROM (SELECT now() - $1::int * interval '1 hour' AS t) AS at
             RETURNING id",
            &[&age_hours, &processed],
        )
        .await
        .expect("insert an event")
        .get(0)
}

async fn set_key(db: &TestDb, event: i64, key: &str) {
    db.client
        .execute(
            "UPDATE webhook_outbox SET idempotency_key = $2 WHERE id = $1",
            &[&event, &key],
        )
        .await
        .expect("set an idempotency key");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Delivered,
    Dead,
    Pending,
    InFlight,
    Parked,
}

/// Inserts a delivery last changed `age_hours` ago, with two attempt rows (a failure,
/// then a success if it was delivered).
async fn delivery(db: &TestDb, event: i64, endpoint: i64, kind: Kind, age_hours: i32) {
    let state = match kind {
        Kind::Delivered => "delivered",
        Kind::Dead => "dead",
        Kind::Pending | Kind::InFlight => "pending",
        Kind::Parked => "parked",
    };
    let locked = kind == Kind::InFlight;
    let delivered = kind == Kind::Delivered;
    db.client
        .execute(
            "INSERT INTO webhook_deliveries
                 (event_id, endpoint_id, state, attempts, next_attempt_at, locked_by,
                  locked_until, last_status, last_error, created_at, updated_at, delivered_at)
             SELECT $1, $2, $3::text, 2,
                    CASE WHEN $4 THEN now() + interval '1 minute'
                         WHEN $3 = 'pending' THEN now() + interval '1 hour'
                         ELSE t END,
                    CASE WHEN $4 THEN 'another-worker' END,
                    CASE WHEN $4 THEN now() + interval '1 minute' END,
                    CASE WHEN $6 THEN 200 ELSE 500 END,
                    CASE WHEN $6 THEN NULL ELSE 'receiver answered HTTP 500' END,
                    t - interval '1 minute', t, CASE WHEN $6 THEN t END
             FROM (SELECT now() - $5::int * interval '1 hour' AS t) AS at",
            &[&event, &endpoint, &state, &locked, &age_hours, &delivered],
        )
        .await
        .expect("insert a delivery");
    db.client
        .execute(
            "INSERT INTO webhook_attempts
                 (event_id, endpoint_id, attempt, started_at, duration_ms, status_code,
                  error_kind, error, worker_id)
             SELECT $1, $2, n, now() - $3::int * interval '1 hour' - (3 - n) * interval '10 seconds',
                    12,
                    CASE WHEN n = 2 AND $4 THEN 200 ELSE 500 END,
                    CASE WHEN n = 2 AND $4 THEN NULL ELSE 'http_status' END,
                    CASE WHEN n = 2 AND $4 THEN NULL ELSE 'receiver answered HTTP 500' END,
                    'retention-test'
             FROM generate_series(1, 2) AS n",
            &[&event, &endpoint, &age_hours, &delivered],
        )
        .await
        .expect("insert attempts");
}

/// Everything in the three tables, keyed for comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot {
    events: BTreeSet<i64>,
    /// (event, endpoint) -> state.
    deliveries: BTreeMap<(i64, i64), String>,
    /// (event, endpoint) -> number of attempt rows.
    attempts: BTreeMap<(i64, i64), i64>,
}

impl Snapshot {
    async fn take(db: &TestDb) -> Self {
        let events = db
            .client
            .query("SELECT id FROM webhook_outbox", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let deliveries = db
            .client
            .query(
                "SELECT event_id, endpoint_id, state FROM webhook_deliveries",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| ((r.get(0), r.get(1)), r.get(2)))
            .collect();
        let attempts = db
            .client
            .query(
                "SELECT event_id, endpoint_id, count(*) FROM webhook_attempts
                 GROUP BY event_id, endpoint_id",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| ((r.get(0), r.get(1)), r.get(2)))
            .collect();
        Self {
            events,
            deliveries,
            attempts,
        }
    }

    /// This snapshot without the given deliveries (and their attempts) and events.
    fn without(&self, deliveries: &[(i64, i64)], events: &[i64]) -> Self {
        let mut expected = self.clone();
        for key in deliveries {
            assert!(expected.deliveries.remove(key).is_some(), "{key:?} exists");
            assert!(
                expected.attempts.remove(key).is_some(),
                "{key:?} has attempts"
            );
        }
        for event in events {
            assert!(expected.events.remove(event), "event {event} exists");
        }
        expected
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_deletes_only_final_history_past_its_retention() {
    let db = TestDb::new("retention").await;
    let (e1, _) = db.add_endpoint("https://example.com/one", &[]).await;
    let (e2, _) = db.add_endpoint("https://example.com/two", &[]).await;
    let old = 100;
    assert!(POLICY.delivered < old as u32 * HOUR && old as u32 * HOUR < POLICY.dead);

    // Old events (older than the delivered retention, younger than the dead one).
    let all_delivered = event(&db, old, true).await;
    set_key(&db, all_delivered, "key-of-a-pruned-event").await;
    delivery(&db, all_delivered, e1, Kind::Delivered, old).await;
    delivery(&db, all_delivered, e2, Kind::Delivered, old).await;
    let delivered_and_pending = event(&db, old, true).await;
    delivery(&db, delivered_and_pending, e1, Kind::Delivered, old).await;
    delivery(&db, delivered_and_pending, e2, Kind::Pending, old).await;
    let delivered_and_dead = event(&db, old, true).await;
    delivery(&db, delivered_and_dead, e1, Kind::Delivered, old).await;
    delivery(&db, delivered_and_dead, e2, Kind::Dead, old).await;
    let replayed_lately = event(&db, old, true).await;
    delivery(&db, replayed_lately, e1, Kind::Delivered, 1).await;
    let dead = event(&db, old, true).await;
    delivery(&db, dead, e1, Kind::Dead, old).await;
    let pending = event(&db, old, true).await;
    set_key(&db, pending, "key-of-a-kept-event").await;
    delivery(&db, pending, e1, Kind::Pending, old).await;
    let in_flight = event(&db, old, true).await;
    delivery(&db, in_flight, e1, Kind::InFlight, old).await;
    let parked = event(&db, old, true).await;
    delivery(&db, parked, e1, Kind::Parked, old).await;
    let unprocessed = event(&db, old, false).await;
    let matched_nobody = event(&db, old, true).await;
    // Older than the dead retention.
    let ancient_dead = event(&db, 800, true).await;
    delivery(&db, ancient_dead, e1, Kind::Dead, 800).await;
    // Recent.
    let recent = event(&db, 1, true).await;
    delivery(&db, recent, e1, Kind::Delivered, 1).await;
    delivery(&db, recent, e2, Kind::Delivered, 1).await;
    let recent_unprocessed = event(&db, 0, false).await;

    let pool = outboxd::db::admin_pool(&db.url).await.expect("a pool");
    let before = Snapshot::take(&db).await;

    // No budget, no work.
    let pruned = prune(&pool, POLICY, Duration::ZERO).await.unwrap();
    assert_eq!(pruned, Pruned::default());
    assert_eq!(Snapshot::take(&db).await, before);

    let pruned = prune(&pool, POLICY, BUDGET).await.expect("prune");
    let expected = before.without(
        &[
            (all_delivered, e1),
            (all_delivered, e2),
            (delivered_and_pending, e1),
            (delivered_and_dead, e1),
            (ancient_dead, e1),
        ],
        &[all_delivered, matched_nobody, ancient_dead],
    );
    let after = Snapshot::take(&db).await;
    assert_eq!(after, expected, "before: {before:#?}");
    assert_eq!(
        pruned,
        Pruned {
            deliveries: 5,
            attempts: 10,
            events: 3,
        }
    );
    for kept in [
        pending,
        in_flight,
        parked,
        unprocessed,
        dead,
        replayed_lately,
        recent,
        recent_unprocessed,
    ] {
        assert!(after.events.contains(&kept), "event {kept} is kept");
    }
    let in_flight_row = db.delivery(in_flight, e1).await;
    assert_eq!(in_flight_row.locked_by.as_deref(), Some("another-worker"));
    // A pruned event's idempotency key is free again; a kept one's still deduplicates.
    let payload = serde_json::json!({});
    let mut event = outboxd::NewEvent::new("order.created", &payload);
    event.idempotency_key = Some("key-of-a-kept-event");
    assert_eq!(outboxd::enqueue(&db.client, &event).await.unwrap(), None);
    event.idempotency_key = Some("key-of-a-pruned-event");
    let reused = outboxd::enqueue(&db.client, &event).await.unwrap();
    assert!(reused.is_some(), "the key was released");
    db.client
        .execute("DELETE FROM webhook_outbox WHERE id = $1", &[&reused])
        .await
        .unwrap();

    // Nothing more is due: a second pass changes nothing.
    assert_eq!(
        prune(&pool, POLICY, BUDGET).await.unwrap(),
        Pruned::default()
    );
    assert_eq!(Snapshot::take(&db).await, expected);

    // The dead deliveries age past the dead retention: they go, and so do their events,
    // now without deliveries.
    db.client
        .execute(
            "UPDATE webhook_deliveries SET updated_at = now() - interval '800 hours'
             WHERE state = 'dead' AND event_id = ANY ($1)",
            &[&vec![dead, delivered_and_dead]],
        )
        .await
        .unwrap();
    let pruned = prune(&pool, POLICY, BUDGET).await.unwrap();
    assert_eq!(
        pruned,
        Pruned {
            deliveries: 2,
            attempts: 4,
            events: 2,
        }
    );
    assert_eq!(
        Snapshot::take(&db).await,
        expected.without(
            &[(dead, e1), (delivered_and_dead, e2)],
            &[dead, delivered_and_dead]
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_walks_a_large_backlog_in_batches() {
    let db = TestDb::new("retention_batches").await;
    let (endpoint, _) = db.add_endpoint("https://example.com/hook", &[]).await;
    let old_events = 1_200i64;
    assert!(old_events > 2 * outboxd::retention::BATCH);
    db.client
        .execute(
            "INSERT INTO webhook_outbox (event_type, payload, created_at, deliver_after, processed_at)
             SELECT 'bulk.event', jsonb_build_object('n', n), t, t, t + interval '1 second'
             FROM generate_series(1, $1::int) AS n,
                  (SELECT now() - interval '100 hours' AS t) AS at
             ORDER BY n",
            &[&(old_events as i32)],
        )
        .await
        .unwrap();
    db.client
        .execute(
            "INSERT INTO webhook_deliveries
                 (event_id, endpoint_id, state, attempts, last_status, created_at, updated_at,
                  delivered_at)
             SELECT id, $1, 'delivered', 1, 200, created_at, created_at + interval '2 seconds',
                    created_at + interval '2 seconds'
             FROM webhook_outbox",
            &[&endpoint],
        )
        .await
        .unwrap();
    db.client
        .execute(
            "INSERT INTO webhook_attempts
                 (event_id, endpoint_id, attempt, started_at, duration_ms, status_code, worker_id)
             SELECT event_id, endpoint_id, 1, created_at + interval '1 second', 5, 200, 'bulk'
             FROM webhook_deliveries",
            &[],
        )
        .await
        .unwrap();
    // Ten in the second batch are still waiting (their endpoint is slow to recover).
    let waiting: Vec<i64> = db
        .client
        .query(
            "UPDATE webhook_deliveries
             SET state = 'pending', delivered_at = NULL, next_attempt_at = now() + interval '1 hour'
             WHERE event_id IN (SELECT id FROM webhook_outbox ORDER BY id OFFSET 595 LIMIT 10)
             RETURNING event_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(waiting.len(), 10);
    let mut recent = Vec::new();
    for _ in 0..5 {
        let id = event(&db, 1, true).await;
        delivery(&db, id, endpoint, Kind::Delivered, 1).await;
        recent.push(id);
    }

    let pool = db.pool().await;
    let pruned = prune(&pool, POLICY, Duration::from_secs(120))
        .await
        .expect("prune");
    let gone = (old_events - 10) as u64;
    assert_eq!(
        pruned,
        Pruned {
            deliveries: gone,
            attempts: gone,
            events: gone,
        }
    );
    let after = Snapshot::take(&db).await;
    let kept: BTreeSet<i64> = waiting.iter().chain(&recent).copied().collect();
    assert_eq!(after.events, kept);
    assert_eq!(
        after
            .deliveries
            .keys()
            .map(|k| k.0)
            .collect::<BTreeSet<_>>(),
        kept
    );
    assert_eq!(after.attempts.len(), kept.len());
    for id in &waiting {
        assert_eq!(after.deliveries[&(*id, endpoint)], "pending");
    }
    assert_eq!(
        prune(&pool, POLICY, Duration::from_secs(120))
            .await
            .unwrap(),
        Pruned::default()
    );
}
