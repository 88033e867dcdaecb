//! Several dispatchers on one database: every delivery exactly once.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::harness::{Receiver, RunningDispatcher, TestDb, test_config};

const EVENTS: i64 = 2_000;
const PATHS: [&str; 2] = ["/a", "/b"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_dispatchers_deliver_each_exactly_once() {
    let mut db = TestDb::new("fourworkers").await;
    let receiver = Receiver::start().await;
    for path in PATHS {
        db.add_endpoint(&receiver.url(path), &[]).await;
    }
    let dispatchers: Vec<RunningDispatcher> = (0..4)
        .map(|i| {
            RunningDispatcher::start(
                &db.url,
                outboxd::Config {
                    batch_size: 50,
                    concurrency: 32,
                    // Generous: a lease running out on a loaded machine would be a
                    // legitimate redelivery, not the duplicate this test looks for.
                    lease: Duration::from_secs(60),
                    http_timeout: Duration::from_secs(20),
                    ..test_config(&format!("four{i}"))
                },
            )
        })
        .collect();

    // A few producer transactions, several events each.
    for chunk in 0..4 {
        let tx = db.client.transaction().await.unwrap();
        tx.execute(
            "INSERT INTO webhook_outbox (event_type, payload)
             SELECT 'bulk.created', jsonb_build_object('chunk', $1::int, 'n', g)
             FROM generate_series(1, $2::int) AS g",
            &[&chunk, &((EVENTS / 4) as i32)],
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }

    let total = EVENTS * PATHS.len() as i64;
    db.wait_until_within(
        &format!(
            "SELECT count(*) FILTER (WHERE state = 'delivered') = {total} FROM webhook_deliveries"
        ),
        Duration::from_secs(120),
    )
    .await;
    let mut lost = 0;
    let worker_ids: Vec<String> = dispatchers.iter().map(|d| d.worker_id.clone()).collect();
    for dispatcher in dispatchers {
        lost += dispatcher.stop().await.totals.lease_lost;
    }
    assert_eq!(lost, 0, "no outcome may find its lease taken");

    // The receiver saw each (webhook-id, endpoint) exactly once.
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    for r in receiver.requests() {
        *seen
            .entry((r.webhook_id().to_owned(), r.path.clone()))
            .or_default() += 1;
    }
    let duplicates: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        duplicates.is_empty(),
        "{} duplicated deliveries, e.g. {:?}",
        duplicates.len(),
        duplicates.iter().take(5).collect::<Vec<_>>()
    );
    assert_eq!(
        seen.len() as i64,
        total,
        "every (event, endpoint) pair arrived"
    );
    let event_ids: i64 = db
        .scalar("SELECT count(*) FROM webhook_outbox WHERE processed_at IS NOT NULL")
        .await;
    assert_eq!(event_ids, EVENTS);

    // Every delivery: delivered on its first attempt, unlocked, one attempt row.
    let summary: (i64, i64, i64, i64) = {
        let row = db
            .client
            .query_one(
                "SELECT count(*),
                        count(*) FILTER (WHERE state = 'delivered'),
                        count(*) FILTER (WHERE attempts = 1),
                        count(*) FILTER (WHERE locked_by IS NULL)
                 FROM webhook_deliveries",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2), row.get(3))
    };
    assert_eq!(summary, (total, total, total, total));
    let attempt_rows: i64 = db.scalar("SELECT count(*) FROM webhook_attempts").await;
    assert_eq!(attempt_rows, total);

    // The work really was shared (the claim path under contention was exercised).
    let per_worker: BTreeMap<String, i64> = db
        .client
        .query(
            "SELECT worker_id, count(*) FROM webhook_attempts GROUP BY worker_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    eprintln!("deliveries per worker: {per_worker:?}");
    assert!(
        per_worker.keys().all(|w| worker_ids.contains(w)),
        "{per_worker:?}"
    );
    assert!(
        per_worker.len() >= 2,
        "expected the work to be shared: {per_worker:?}"
    );
}
