//! Crashes and restarts: leases bring abandoned work back, retries survive a restart.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use outboxd::claim::{self, Claimed};
use outboxd::deliver::{Attempt, AttemptResult};
use outboxd::retry::Verdict;
use outboxd::settle::{self, Next, Outcome};
use serde_json::json;

use crate::harness::{Receiver, Reply, RunningDispatcher, TestDb, test_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_lease_is_reclaimed() {
    let db = TestDb::new("lease").await;
    let receiver = Receiver::start().await;
    let (endpoint_id, _) = db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let mut events = Vec::new();
    for n in 0..3 {
        events.push(db.enqueue("order.created", &json!({ "n": n })).await);
    }

    // A worker claims the rows and dies without settling them.
    let claimed = claim::claim(&db.client, "dead-worker", Duration::from_millis(1_000), 10)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 3, "{claimed:?}");
    for c in &claimed {
        match c {
            Claimed::Send(d) => assert_eq!(d.attempt, 1),
            Claimed::Park { .. } => panic!("nothing to park: {c:?}"),
        }
    }
    let leased = db.deliveries().await;
    assert!(
        leased
            .iter()
            .all(|d| d.locked_by.as_deref() == Some("dead-worker") && d.attempts == 1),
        "{leased:?}"
    );
    let lease_end = leased
        .iter()
        .filter_map(|d| d.locked_until)
        .min()
        .expect("locked_until is set");

    let dispatcher = RunningDispatcher::start(&db.url, test_config("lease"));
    db.wait_all_in_state(3, "delivered").await;
    let report = dispatcher.stop().await;
    assert_eq!(report.totals.delivered, 3);

    for d in db.deliveries().await {
        assert_eq!(d.attempts, 2, "the lost claim counts as attempt 1: {d:?}");
        assert_eq!(d.locked_by, None);
        assert_eq!(d.locked_until, None);
    }
    let requests = receiver.requests();
    assert_eq!(requests.len(), 3);
    for r in &requests {
        assert!(
            r.arrived_at >= lease_end,
            "sent at {:?}, before the dead worker's lease ended at {lease_end:?}",
            r.arrived_at
        );
    }
    let ids: BTreeSet<i64> = requests.iter().map(|r| r.event_id()).collect();
    assert_eq!(ids, events.iter().copied().collect());

    // The dead worker comes back and settles its stale claims: nothing changes.
    let before = db.deliveries().await;
    let outcomes: Vec<Outcome> = claimed
        .iter()
        .map(|c| match c {
            Claimed::Send(d) => Outcome {
                event_id: d.event_id,
                endpoint_id: d.endpoint_id,
                attempt: d.attempt,
                next: Next::Verdict(Verdict::Dead),
                record: Some(Attempt {
                    started_at: SystemTime::now(),
                    duration: Duration::from_millis(5),
                    result: AttemptResult::Response {
                        status: 500,
                        retry_after: None,
                        excerpt: "stale".into(),
                    },
                }),
                ordered: false,
            },
            Claimed::Park { .. } => unreachable!(),
        })
        .collect();
    let pool = db.pool().await;
    let settled = settle::flush(&pool, "dead-worker", &outcomes)
        .await
        .expect("flush");
    assert_eq!(settled, 0, "a stale settle must not match any row");
    let after = db.deliveries().await;
    assert_eq!(
        format!("{before:?}"),
        format!("{after:?}"),
        "rows unchanged"
    );
    assert!(after.iter().all(|d| d.endpoint_id == endpoint_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_loses_nothing() {
    let db = TestDb::new("restart").await;
    let receiver = Receiver::start().await;
    receiver.always("/hook", Reply::status(500));
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let backoff = Duration::from_millis(300);
    let config = |label: &str| outboxd::Config {
        backoff_base: backoff,
        backoff_max: backoff,
        max_attempts: 50,
        ..test_config(label)
    };
    const N: i64 = 5;
    for n in 0..N {
        db.enqueue("order.created", &json!({ "n": n })).await;
    }

    // A fails every first attempt, then stops.
    let a = RunningDispatcher::start(&db.url, config("restart-a"));
    db.wait_until(&format!(
        "SELECT count(*) = {N} AND bool_and(attempts >= 1 AND last_status = 500)
         FROM webhook_deliveries"
    ))
    .await;
    let report_a = a.stop().await;
    assert_eq!(report_a.totals.delivered, 0);
    let after_a = db.deliveries().await;
    assert!(
        after_a
            .iter()
            .all(|d| d.state == "pending" && d.locked_by.is_none()),
        "A must leave every row pending and unlocked: {after_a:?}"
    );

    // B starts against a healthy receiver and finishes the job.
    receiver.always("/hook", Reply::ok());
    let b = RunningDispatcher::start(&db.url, config("restart-b"));
    db.wait_all_in_state(N, "delivered").await;
    let report_b = b.stop().await;
    assert_eq!(report_b.totals.delivered, N as u64);

    // Every event was answered 200 exactly once.
    let mut ok: BTreeMap<i64, usize> = BTreeMap::new();
    for r in receiver.requests() {
        if r.answered == Some(200) {
            *ok.entry(r.event_id()).or_default() += 1;
        }
    }
    assert_eq!(ok.len() as i64, N, "{ok:?}");
    assert!(ok.values().all(|n| *n == 1), "{ok:?}");

    // Attempt numbers are contiguous and match the row's count.
    let attempts = db.attempts().await;
    for d in db.deliveries().await {
        assert!(d.attempts >= 2, "{d:?}");
        assert_eq!(d.locked_by, None);
        let numbers: Vec<i32> = attempts
            .iter()
            .filter(|a| a.event_id == d.event_id)
            .map(|a| a.attempt)
            .collect();
        assert_eq!(numbers, (1..=d.attempts).collect::<Vec<_>>(), "{d:?}");
    }
}

/// The attempt number is the lease token: a worker whose outcome is late (its lease ran
/// out and it has since claimed the row again itself) cannot settle the newer claim with
/// the older outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_outcome_after_own_reclaim_changes_nothing() {
    let db = TestDb::new("leasetoken").await;
    db.add_endpoint("https://example.com/hook", &[]).await;
    let event_id = db.enqueue("order.created", &json!({})).await;
    let worker = "slow-worker";

    let first = claim::claim(&db.client, worker, Duration::from_millis(1_000), 10)
        .await
        .expect("claim");
    assert_eq!(first.len(), 1, "{first:?}");
    // Once the lease has run out the same worker claims the row again.
    let mut second = Vec::new();
    let deadline = std::time::Instant::now() + crate::harness::WAIT;
    while second.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the lease never ran out"
        );
        tokio::time::sleep(crate::harness::POLL_EVERY).await;
        second = claim::claim(&db.client, worker, Duration::from_secs(60), 10)
            .await
            .expect("claim");
    }
    let attempt_of = |c: &Claimed| match c {
        Claimed::Send(d) => (d.event_id, d.endpoint_id, d.attempt),
        Claimed::Park { .. } => panic!("nothing to park: {c:?}"),
    };
    let (e1, ep1, a1) = attempt_of(&first[0]);
    let (e2, ep2, a2) = attempt_of(&second[0]);
    assert_eq!((e1, ep1, e2, ep2), (event_id, ep1, event_id, ep1));
    assert_eq!((a1, a2), (1, 2));

    let delivered = |attempt| Outcome {
        event_id,
        endpoint_id: ep1,
        attempt,
        next: Next::Verdict(Verdict::Delivered),
        record: None,
        ordered: false,
    };
    let pool = db.pool().await;
    let late = settle::flush(&pool, worker, &[delivered(1)]).await.unwrap();
    assert_eq!(
        late, 0,
        "the outcome of attempt 1 must not settle attempt 2"
    );
    let d = db.delivery(event_id, ep1).await;
    assert_eq!(
        (d.state.as_str(), d.attempts, d.locked_by.as_deref()),
        ("pending", 2, Some(worker)),
        "{d:?}"
    );
    let current = settle::flush(&pool, worker, &[delivered(2)]).await.unwrap();
    assert_eq!(current, 1);
    let d = db.delivery(event_id, ep1).await;
    assert_eq!(
        (d.state.as_str(), d.locked_by.as_deref()),
        ("delivered", None),
        "{d:?}"
    );
    // Another worker cannot settle it either.
    let foreign = settle::flush(&pool, "another-worker", &[delivered(2)])
        .await
        .unwrap();
    assert_eq!(foreign, 0);
}

/// A claim may bring more deliveries than there are free send slots. One that waited
/// for a slot so long that its request could outlast the lease is handed back unsent
/// (another dispatcher may claim it once the lease runs out), and sent by a later claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_that_waited_too_long_for_a_slot_is_released_not_sent_late() {
    let db = TestDb::new("slotwait").await;
    let receiver = Receiver::start().await;
    // One slot and 1.8 s per request: a delivery behind another waits at least 1.8 s,
    // more than half of the lease's 3 s of spare time (5.5 s less a 2.5 s timeout).
    receiver.always("/hook", Reply::ok().delay(Duration::from_millis(1_800)));
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    const N: usize = 3;
    for n in 0..N {
        db.enqueue("order.created", &json!({ "n": n })).await;
    }

    let dispatcher = RunningDispatcher::start(
        &db.url,
        outboxd::Config {
            concurrency: 1,
            lease: Duration::from_millis(5_500),
            http_timeout: Duration::from_millis(2_500),
            ..test_config("slotwait")
        },
    );
    db.wait_all_in_state(N as i64, "delivered").await;
    let report = dispatcher.stop().await;

    // The second delivery is handed back, and the third with it: it would have waited
    // as long (it must not take the slot the second gave up, unchecked).
    assert!(report.totals.released >= 2, "{report:?}");
    let requests = receiver.requests();
    let sent: BTreeSet<i64> = requests.iter().map(|r| r.event_id()).collect();
    assert_eq!(
        (requests.len(), sent.len()),
        (N, N),
        "each sent exactly once"
    );
    for d in db.deliveries().await {
        // A release does not count as an attempt.
        assert_eq!((d.state.as_str(), d.attempts), ("delivered", 1), "{d:?}");
    }
    let recorded: i64 = db.scalar("SELECT count(*) FROM webhook_attempts").await;
    assert_eq!(recorded, N as i64);
}

/// After a delivery waited long for a send slot, claims take only the free slots for a
/// while: a dispatcher whose slots turn over slowly does not hold rows that another
/// dispatcher could send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_take_only_free_slots_after_a_long_wait_for_one() {
    let db = TestDb::new("scarceslots").await;
    let receiver = Receiver::start().await;
    receiver.always("/hook", Reply::ok().delay(Duration::from_millis(1_500)));
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    for n in 0..2 {
        db.enqueue("order.created", &json!({ "n": n })).await;
    }
    // One slot: the first claim takes both events, and the second waits 1.5 s.
    let dispatcher = RunningDispatcher::start(
        &db.url,
        outboxd::Config {
            concurrency: 1,
            ..test_config("scarceslots")
        },
    );
    receiver.wait_for(2).await;
    db.enqueue_series(2, 4).await;
    // The next claim, once the second request has ended, takes one event of the three.
    receiver.wait_for(3).await;
    // (Deliveries are made as their events are claimed.)
    let claimed: i64 = db
        .scalar(
            "SELECT count(*) FROM webhook_deliveries d JOIN webhook_outbox o ON o.id = d.event_id
             WHERE (o.payload->>'n')::int >= 2",
        )
        .await;
    assert_eq!(claimed, 1, "a claim took more than the free slot");
    db.wait_all_in_state(5, "delivered").await;
    dispatcher.stop().await;
}
