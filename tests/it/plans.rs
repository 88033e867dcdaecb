//! Query plans the hot path depends on, checked with EXPLAIN on a table whose
//! statistics are stale, as they are during a burst on a young table.

use tokio_postgres::types::{ToSql, Type};

use crate::harness::TestDb;

/// The settle statement finds its rows through the primary key even when the planner
/// believes the deliveries table is tiny. Without the planner settings of
/// `SETTLE_BEGIN` it hash-joined against a sequential scan of the whole table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_uses_the_primary_key_on_stale_statistics() {
    let mut db = TestDb::new("settleplan").await;
    // Analyzed while nearly empty, then grown 1000-fold, with autovacuum kept from
    // analyzing it again: the planner's estimates are built on a 20-row sample.
    db.client
        .batch_execute(
            "ALTER TABLE webhook_deliveries SET (autovacuum_enabled = off);
             INSERT INTO webhook_deliveries (event_id, endpoint_id, state, attempts)
                 SELECT i, 1, 'delivered', 1 FROM generate_series(1, 20) i;
             ANALYZE webhook_deliveries;
             INSERT INTO webhook_deliveries (event_id, endpoint_id, state, attempts, locked_by)
                 SELECT i, 1, 'pending', 1, 'w' FROM generate_series(21, 20000) i;",
        )
        .await
        .unwrap();
    let ids: Vec<i64> = (1000..1300).collect();
    let ones64 = vec![1_i64; ids.len()];
    let ones32 = vec![1_i32; ids.len()];
    let states = vec!["delivered"; ids.len()];
    let zeros64 = vec![0_i64; ids.len()];
    let zeros32 = vec![0_i32; ids.len()];
    let statuses = vec![200_i32; ids.len()];
    let nulls: Vec<Option<String>> = vec![None; ids.len()];
    let started = vec![std::time::SystemTime::now(); ids.len()];
    let empty: Vec<i64> = Vec::new();
    let params: [(&(dyn ToSql + Sync), Type); 20] = [
        (&"w", Type::TEXT),
        (&ids, Type::INT8_ARRAY),
        (&ones64, Type::INT8_ARRAY),
        (&ones32, Type::INT4_ARRAY),
        (&states, Type::TEXT_ARRAY),
        (&zeros64, Type::INT8_ARRAY),
        (&zeros32, Type::INT4_ARRAY),
        (&statuses, Type::INT4_ARRAY),
        (&nulls, Type::TEXT_ARRAY),
        (&ids, Type::INT8_ARRAY),
        (&ones64, Type::INT8_ARRAY),
        (&ones32, Type::INT4_ARRAY),
        (&started, Type::TIMESTAMPTZ_ARRAY),
        (&zeros32, Type::INT4_ARRAY),
        (&statuses, Type::INT4_ARRAY),
        (&nulls, Type::TEXT_ARRAY),
        (&nulls, Type::TEXT_ARRAY),
        (&nulls, Type::TEXT_ARRAY),
        (&ones64, Type::INT8_ARRAY),
        (&empty, Type::INT8_ARRAY),
    ];
    let explain = format!("EXPLAIN {}", outboxd::settle::SETTLE);
    let plan = |rows: Vec<tokio_postgres::Row>| -> String {
        rows.iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("\n")
    };

    // The premise: left to itself, the planner scans the whole table.
    let bare = plan(db.client.query_typed(&explain, &params).await.unwrap());
    assert!(
        bare.contains("Seq Scan on webhook_deliveries"),
        "stale statistics no longer mislead the planner; this test needs a new premise:\n{bare}"
    );

    let tx = db.client.transaction().await.unwrap();
    tx.batch_execute(
        outboxd::settle::SETTLE_BEGIN
            .trim_start_matches("BEGIN;")
            .trim(),
    )
    .await
    .unwrap();
    let steered = plan(tx.query_typed(&explain, &params).await.unwrap());
    tx.rollback().await.unwrap();
    assert!(
        steered.contains("Index Scan using webhook_deliveries_pkey"),
        "{steered}"
    );
    assert!(
        !steered.contains("Seq Scan on webhook_deliveries"),
        "{steered}"
    );
}
