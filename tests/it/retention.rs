//! Retention: `retention::prune` deletes exactly the final history past its retention
//! (delivered after the delivered retention, dead after the dead one, with their
//! attempts, a removed endpoint's parked deliveries after the dead retention, and
//! events once no delivery remains) and never touches pending, in-flight or parked work
//! of an endpoint that can still be enabled, nor events not yet fanned out; in batches,
//! so a large backlog takes several; and a pass walks what it keeps only once.
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

/// What a pass deleted: deliveries, attempts, events.
fn deleted(pruned: Pruned) -> (u64, u64, u64) {
    (pruned.deliveries, pruned.attempts, pruned.events)
}

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
    assert_eq!(deleted(pruned), (5, 10, 3));
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
        deleted(prune(&pool, POLICY, BUDGET).await.unwrap()),
        (0, 0, 0)
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
    assert_eq!(deleted(pruned), (2, 4, 2));
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
    assert_eq!(deleted(pruned), (gone, gone, gone));
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
        deleted(
            prune(&pool, POLICY, Duration::from_secs(120))
                .await
                .unwrap()
        ),
        (0, 0, 0)
    );
}

/// Parked deliveries of a removed endpoint can never be sent: they go once the endpoint
/// has been removed for the dead retention, with their attempts and their events if
/// nothing else is left, wherever the walk is. A disabled endpoint's parked deliveries
/// stay, however old: enabling it resumes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_endpoints_parked_deliveries_go_after_the_dead_retention() {
    let db = TestDb::new("retention_removed").await;
    let (disabled, _) = db.add_endpoint("https://example.com/disabled", &[]).await;
    let (removed_long_ago, _) = db.add_endpoint("https://example.com/long-ago", &[]).await;
    let (removed_lately, _) = db.add_endpoint("https://example.com/lately", &[]).await;
    let (active, _) = db.add_endpoint("https://example.com/active", &[]).await;
    outboxd::endpoint::disable(&db.client, disabled, "paused")
        .await
        .unwrap();
    for endpoint in [removed_long_ago, removed_lately] {
        outboxd::endpoint::remove(&db.client, endpoint)
            .await
            .unwrap();
    }
    db.client
        .execute(
            "UPDATE webhook_endpoints SET deleted_at = now() - interval '1 hour' WHERE id = $1",
            &[&removed_lately],
        )
        .await
        .unwrap();
    // Only parked under the endpoint removed long ago: the event goes with it.
    let lost = event(&db, 900, true).await;
    delivery(&db, lost, removed_long_ago, Kind::Parked, 900).await;
    // Also delivered elsewhere lately: the event stays for that delivery.
    let shared = event(&db, 900, true).await;
    delivery(&db, shared, removed_long_ago, Kind::Parked, 900).await;
    delivery(&db, shared, active, Kind::Delivered, 1).await;
    let paused = event(&db, 900, true).await;
    delivery(&db, paused, disabled, Kind::Parked, 900).await;
    let lately = event(&db, 900, true).await;
    delivery(&db, lately, removed_lately, Kind::Parked, 900).await;

    let pool = db.pool().await;
    // The walk passes them all first; the endpoint is removed "long ago" only then, so
    // its parked deliveries are found behind the frontier.
    assert_eq!(
        deleted(prune(&pool, POLICY, BUDGET).await.unwrap()),
        (0, 0, 0)
    );
    let before = Snapshot::take(&db).await;
    db.client
        .execute(
            "UPDATE webhook_endpoints SET deleted_at = now() - interval '721 hours' WHERE id = $1",
            &[&removed_long_ago],
        )
        .await
        .unwrap();
    assert_eq!(
        deleted(prune(&pool, POLICY, BUDGET).await.unwrap()),
        (2, 4, 1)
    );
    assert_eq!(
        Snapshot::take(&db).await,
        before.without(
            &[(lost, removed_long_ago), (shared, removed_long_ago)],
            &[lost]
        )
    );
    assert_eq!(db.delivery(paused, disabled).await.state, "parked");
    assert_eq!(db.delivery(lately, removed_lately).await.state, "parked");
    assert_eq!(
        deleted(prune(&pool, POLICY, BUDGET).await.unwrap()),
        (0, 0, 0)
    );
}

/// Inserts `n` events created `age_hours` ago, fanned out, each with a delivery to
/// `endpoint` in `state` last changed `age_hours` ago (and one attempt if it is
/// delivered); returns the first and last ids.
async fn bulk(db: &TestDb, n: i32, age_hours: i32, endpoint: i64, state: &str) -> (i64, i64) {
    let row = db
        .client
        .query_one(
            "WITH ev AS (
                 INSERT INTO webhook_outbox (event_type, payload, created_at, deliver_after, processed_at)
                 SELECT 'bulk.event', '{}', t, t, t
                 FROM generate_series(1, $1::int) AS g,
                      (SELECT now() - $2::int * interval '1 hour' AS t) AS at
                 ORDER BY g
                 RETURNING id, created_at
             ), dl AS (
                 INSERT INTO webhook_deliveries
                     (event_id, endpoint_id, state, attempts, next_attempt_at, created_at, updated_at)
                 SELECT id, $3, $4::text, 1,
                        CASE WHEN $4 = 'pending' THEN now() + interval '1 day' ELSE created_at END,
                        created_at, created_at
                 FROM ev
             ), at AS (
                 INSERT INTO webhook_attempts
                     (event_id, endpoint_id, attempt, started_at, duration_ms, status_code, worker_id)
                 SELECT id, $3, 1, created_at, 5, 200, 'bulk' FROM ev WHERE $4 = 'delivered'
             )
             SELECT min(id), max(id) FROM ev",
            &[&n, &age_hours, &endpoint, &state],
        )
        .await
        .expect("bulk insert");
    (row.get(0), row.get(1))
}

/// A pass reaches the expired rows behind those it must keep, and later passes do not
/// walk the kept ones again: the walk goes on from where it stopped, what it passed is
/// found by index once it expires, and the sweep visits a fixed number of events per
/// pass (counts, not timings).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_costs_what_it_prunes_not_what_it_keeps() {
    use outboxd::retention::{BATCH, SWEEP_BATCHES};
    let db = TestDb::new("retention_frontier").await;
    let (endpoint, _) = db.add_endpoint("https://example.com/hook", &[]).await;
    let sweep = u64::from(SWEEP_BATCHES) * BATCH as u64;
    const KEPT: i32 = 12_000;
    // Kept: dead within the dead retention, and retries still pending.
    let (first_dead, _) = bulk(&db, KEPT / 2, 100, endpoint, "dead").await;
    let (first_pending, _) = bulk(&db, KEPT / 2, 100, endpoint, "pending").await;
    let _ = bulk(&db, 300, 100, endpoint, "delivered").await;
    let pool = db.pool().await;

    // The first pass walks the kept rows once, and reaches the expired ones behind.
    let first = prune(&pool, POLICY, Duration::from_secs(300))
        .await
        .unwrap();
    assert_eq!(deleted(first), (300, 300, 300));
    assert!(first.scanned >= KEPT as u64 + 300, "{first:?}");

    // More history expires behind them: the next pass deletes it and walks little else.
    let _ = bulk(&db, 300, 100, endpoint, "delivered").await;
    let second = prune(&pool, POLICY, Duration::from_secs(300))
        .await
        .unwrap();
    assert_eq!(deleted(second), (300, 300, 300));
    assert!(second.scanned <= 300 + sweep, "{second:?}");

    // A thousand dead deliveries the walk passed reach the end of their retention: the
    // dead index finds them.
    db.client
        .execute(
            "UPDATE webhook_deliveries SET updated_at = now() - interval '721 hours'
             WHERE event_id >= $1 AND event_id < $1 + 1000",
            &[&first_dead],
        )
        .await
        .unwrap();
    let third = prune(&pool, POLICY, Duration::from_secs(300))
        .await
        .unwrap();
    assert_eq!(deleted(third), (1_000, 0, 1_000));
    assert!(third.scanned <= sweep, "{third:?}");

    // A retry the walk passed is delivered at last, and its retention runs out: the
    // sweep finds it within a round of the events below the frontier.
    db.client
        .execute(
            "UPDATE webhook_deliveries SET state = 'delivered', updated_at = now() - interval '73 hours'
             WHERE event_id = $1::int8 + 10",
            &[&first_pending],
        )
        .await
        .unwrap();
    let below = u64::try_from(KEPT - 1_000).unwrap();
    let mut passes = 0;
    let mut found = (0, 0, 0);
    while found == (0, 0, 0) {
        passes += 1;
        assert!(
            passes <= below.div_ceil(sweep) + 1,
            "the sweep did not come round in {passes} passes"
        );
        let pass = prune(&pool, POLICY, Duration::from_secs(300))
            .await
            .unwrap();
        assert!(pass.scanned <= sweep, "{pass:?}");
        found = deleted(pass);
    }
    assert_eq!(found, (1, 0, 1));
    let kept: i64 = db.scalar("SELECT count(*) FROM webhook_deliveries").await;
    assert_eq!(kept, i64::from(KEPT) - 1_001);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_dispatcher_prunes_history_past_its_retention() {
    let db = TestDb::new("retention_run").await;
    let (endpoint, _) = db.add_endpoint("https://example.com/hook", &[]).await;
    let old = event(&db, 100, true).await;
    delivery(&db, old, endpoint, Kind::Delivered, 100).await;
    let recent = event(&db, 1, true).await;
    delivery(&db, recent, endpoint, Kind::Delivered, 1).await;
    // Housekeeping prunes at its first tick, as the dispatcher starts, with the
    // configured retention (WEBHOOK_RETENTION_HOURS).
    let mut config = crate::harness::test_config("retention_run");
    config.retention = POLICY.delivered;
    config.dead_retention = POLICY.dead;
    let dispatcher = crate::harness::RunningDispatcher::start(&db.url, config);
    db.wait_until(&format!(
        "SELECT NOT EXISTS (SELECT FROM webhook_outbox WHERE id = {old})"
    ))
    .await;
    dispatcher.stop().await;
    let snapshot = Snapshot::take(&db).await;
    assert_eq!(snapshot.events, BTreeSet::from([recent]), "{snapshot:?}");
    assert_eq!(snapshot.attempts.len(), 1, "{snapshot:?}");
}
