//! Big payloads: each is held once per event however many endpoints it goes to, claims
//! are bounded by payload bytes (fresh fan-out and retries alike, at least one event
//! each), and an event over `WEBHOOK_MAX_PAYLOAD_BYTES` ends dead with the reason, while
//! its producer's insert succeeds.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use outboxd::claim::{self, Claimed, PayloadBudget};
use outboxd::deliver::Delivery;
use serde_json::json;

use crate::harness::{
    Receiver, RunningDispatcher, TestDb, WAIT, outboxd_command, test_config, unique,
};

const LEASE: Duration = Duration::from_secs(60);

/// Inserts `n` events, each with a payload of about `bytes` bytes of JSON text:
/// `compressible` ones repeat one character (PostgreSQL compresses them to a few KB),
/// the others are random hex (stored as they are).
async fn big_events(db: &TestDb, n: i32, bytes: i32, compressible: bool) -> Vec<i64> {
    let pad = if compressible {
        "repeat('x', $2)"
    } else {
        "(SELECT string_agg(md5(random()::text || i), '') FROM generate_series(1, $2 / 32) i
          WHERE g > 0)"
    };
    db.client
        .query(
            &format!(
                "INSERT INTO webhook_outbox (event_type, payload)
                 SELECT 'big.event', jsonb_build_object('n', g, 'pad', {pad})
                 FROM generate_series(1, $1) g
                 RETURNING id"
            ),
            &[&n, &bytes],
        )
        .await
        .expect("insert big events")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn sent(claimed: &[Claimed]) -> Vec<&Delivery> {
    claimed
        .iter()
        .map(|c| match c {
            Claimed::Send(d) => d,
            Claimed::Park { .. } => panic!("nothing to park: {c:?}"),
        })
        .collect()
}

/// The claimed deliveries' events, each with the distinct body buffers its deliveries
/// hold.
fn bodies(deliveries: &[&Delivery]) -> BTreeMap<i64, BTreeSet<(usize, usize)>> {
    let mut events: BTreeMap<i64, BTreeSet<(usize, usize)>> = BTreeMap::new();
    for d in deliveries {
        let body = d.body.as_ref().expect("a body");
        events
            .entry(d.event_id)
            .or_default()
            .insert((body.as_ptr() as usize, body.len()));
    }
    events
}

/// One claim (`form`) of up to 100 deliveries by worker `w`, within `budget`.
async fn claim_within(db: &TestDb, budget: &Arc<PayloadBudget>, form: claim::Form) -> claim::Batch {
    claim::claim_unnamed(
        &db.client,
        "w",
        LEASE,
        100,
        (budget, &claim::Loads::idle(64)),
        form,
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_holds_each_payload_once_however_many_endpoints() {
    for form in [claim::Form::Full, claim::Form::Fast] {
        holds_each_payload_once(form).await;
    }
}

async fn holds_each_payload_once(form: claim::Form) {
    let db = TestDb::new("payload_once").await;
    for i in 0..8 {
        db.add_endpoint(&format!("https://example.com/{i}"), &[])
            .await;
    }
    let events = big_events(&db, 3, 20_000, false).await;
    let budget = PayloadBudget::new(64 << 20, 4 << 20);

    let batch = claim_within(&db, &budget, form).await;
    assert!(!batch.refused, "{form:?}");
    let deliveries = sent(&batch.claimed);
    assert_eq!(deliveries.len(), 24);
    let bodies = bodies(&deliveries);
    assert_eq!(bodies.keys().copied().collect::<Vec<_>>(), events);
    let mut held = 0;
    for (event, buffers) in &bodies {
        assert_eq!(
            buffers.len(),
            1,
            "event {event}: one body for its 8 deliveries"
        );
        held += buffers.iter().next().unwrap().1 as u64;
        assert!(held > 20_000);
    }
    // The budget counts each body once, until the last delivery is done with it.
    assert_eq!(budget.held(), held);
    let one = deliveries[0].clone();
    drop(batch);
    assert_eq!(budget.held(), one.body.as_ref().unwrap().len() as u64);
    drop(one);
    assert_eq!(budget.held(), 0);
}

/// Fresh events and retries are taken while the payload bytes before them are under
/// the budget, at least one of each kind; payloads PostgreSQL compressed count at
/// their size before compression.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_are_bounded_by_payload_bytes() {
    for compressible in [false, true] {
        let db = TestDb::new("payload_budget").await;
        db.add_endpoint("https://example.com/hook", &[]).await;
        let events = big_events(&db, 10, 100_000, compressible).await;
        let stored: i64 = db
            .scalar("SELECT max(pg_column_size(payload))::int8 FROM webhook_outbox")
            .await;
        assert_eq!(stored < 50_000, compressible, "stored as {stored} bytes");
        // Room for two events and a bit: a third starts under the budget.
        let budget = PayloadBudget::new(250_000, 4 << 20);

        // The fast claim does not bound by bytes: it refuses, and changes nothing.
        let refused = claim_within(&db, &budget, claim::Form::Fast).await;
        assert!(refused.refused && refused.claimed.is_empty());
        assert_eq!(refused.fast_ok, Some(false));
        let untouched: i64 = db
            .scalar(
                "SELECT (SELECT count(*) FROM webhook_outbox WHERE processed_at IS NULL)
                      - (SELECT count(*) FROM webhook_deliveries)",
            )
            .await;
        assert_eq!(untouched, 10);

        let first = claim_within(&db, &budget, claim::Form::Full).await;
        let taken: Vec<i64> = bodies(&sent(&first.claimed)).into_keys().collect();
        assert_eq!(taken, events[..3], "compressible: {compressible}");
        assert!(first.more, "more events are waiting");
        // Those not taken were left as they were: not fanned out.
        let unprocessed: i64 = db
            .scalar("SELECT count(*) FROM webhook_outbox WHERE processed_at IS NULL")
            .await;
        assert_eq!(unprocessed, 7);

        // While the budget is spent, a claim still takes one event.
        assert_eq!(budget.available(), 0, "held {}", budget.held());
        let second = claim_within(&db, &budget, claim::Form::Full).await;
        let taken: Vec<i64> = bodies(&sent(&second.claimed)).into_keys().collect();
        assert_eq!(taken, events[3..4]);
        drop((first, second));
        assert_eq!(budget.held(), 0);

        // Retries of old events are bounded the same way: the four claimed deliveries
        // fall due again (a lease ran out), one event's first.
        db.client
            .execute(
                "UPDATE webhook_deliveries
                 SET next_attempt_at = now() - (5 - event_id + $1) * interval '1 second'",
                &[&events[0]],
            )
            .await
            .unwrap();
        let retries = claim_within(&db, &budget, claim::Form::Full).await;
        let mut taken: Vec<(i64, i32)> = sent(&retries.claimed)
            .iter()
            .map(|d| (d.event_id, d.attempt))
            .collect();
        taken.sort_unstable();
        // The three oldest retries, and one fresh event (the first of its kind).
        assert_eq!(
            taken,
            vec![
                (events[0], 2),
                (events[1], 2),
                (events[2], 2),
                (events[4], 1)
            ]
        );
        // The fourth retry waits, its attempt not counted.
        let left = db.delivery(events[3], endpoint(&db).await).await;
        assert_eq!(left.attempts, 1, "{left:?}");
        assert!(
            left.next_attempt_at < std::time::SystemTime::now(),
            "{left:?}"
        );
    }
}

async fn endpoint(db: &TestDb) -> i64 {
    db.scalar("SELECT min(id) FROM webhook_endpoints").await
}

/// A retry that goes to many endpoints counts its event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fanned_out_retry_counts_its_payload_once() {
    let db = TestDb::new("payload_fanout_retry").await;
    for i in 0..20 {
        db.add_endpoint(&format!("https://example.com/{i}"), &[])
            .await;
    }
    let events = big_events(&db, 2, 100_000, false).await;
    // Room for the first event and the start of the second; a payload counted per
    // delivery would fill it with two deliveries.
    let budget = PayloadBudget::new(150_000, 4 << 20);
    let first = claim_within(&db, &budget, claim::Form::Full).await;
    let deliveries = sent(&first.claimed);
    assert_eq!(deliveries.len(), 40);
    assert_eq!(bodies(&deliveries).into_keys().collect::<Vec<_>>(), events);
    drop(first);
    db.client
        .execute(
            "UPDATE webhook_deliveries SET next_attempt_at = now() - interval '1 second'",
            &[],
        )
        .await
        .unwrap();
    let retries = claim_within(&db, &budget, claim::Form::Full).await;
    let deliveries = sent(&retries.claimed);
    assert_eq!(deliveries.len(), 40);
    assert!(deliveries.iter().all(|d| d.attempt == 2));
    assert_eq!(bodies(&deliveries).len(), 2);
    assert!(budget.held() < 220_000, "held {}", budget.held());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_over_the_payload_limit_ends_dead_with_the_reason() {
    let db = TestDb::new("payload_limit").await;
    let receiver = Receiver::start().await;
    let (one, _) = db.add_endpoint(&receiver.url("/one"), &[]).await;
    let (two, _) = db.add_endpoint(&receiver.url("/two"), &[]).await;
    // The producer's insert succeeds, whatever the size.
    let big = db
        .enqueue("order.created", &json!({"pad": "y".repeat(3_000)}))
        .await;
    let small = db.enqueue("order.created", &json!({"pad": "small"})).await;
    let dispatcher = RunningDispatcher::start(
        &db.url,
        outboxd::Config {
            max_payload_bytes: 2_048,
            ..test_config("payload_limit")
        },
    );
    db.wait_until(
        "SELECT count(*) FILTER (WHERE state = 'dead') = 2
            AND count(*) FILTER (WHERE state = 'delivered') = 2
         FROM webhook_deliveries",
    )
    .await;
    let report = dispatcher.stop().await;
    assert_eq!(report.totals.dead, 2);
    for endpoint in [one, two] {
        let d = db.delivery(big, endpoint).await;
        assert_eq!(d.attempts, 1, "{d:?}");
        let error = d.last_error.unwrap_or_default();
        assert!(
            error.contains("3011 bytes") && error.contains("WEBHOOK_MAX_PAYLOAD_BYTES (2048)"),
            "{error}"
        );
    }
    let kinds: Vec<_> = db
        .attempts()
        .await
        .into_iter()
        .filter(|a| a.event_id == big)
        .map(|a| a.error_kind)
        .collect();
    assert_eq!(
        kinds,
        [Some("unbuildable".into()), Some("unbuildable".into())]
    );
    let received: BTreeSet<i64> = receiver.requests().iter().map(|r| r.event_id()).collect();
    assert_eq!(received, BTreeSet::from([small]));
    assert_eq!(receiver.count(), 2);
}

/// A receiver that reads and drops request bodies, counting them.
async fn sink() -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let count = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&count);
    let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
        let counted = Arc::clone(&counted);
        async move {
            drop(body);
            counted.fetch_add(1, Ordering::Relaxed);
            axum::http::StatusCode::NO_CONTENT
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, count, server)
}

/// The real binary fanning big payloads out to many endpoints holds each payload about
/// once: its peak RSS stays far below what a copy per delivery took (221 MiB here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_payloads_fanned_out_stay_within_memory() {
    const EVENTS: i32 = 20;
    const ENDPOINTS: usize = 15;
    const BYTES: i32 = 400_000;
    const PEAK_MIB: u64 = 96;
    let db = TestDb::new("payload_rss").await;
    let (url, count, server) = sink().await;
    for i in 0..ENDPOINTS {
        db.add_endpoint(&format!("{url}/{i}"), &[]).await;
    }
    let mut command = outboxd_command();
    command
        .arg("run")
        .env("DATABASE_URL", &db.url)
        .env("WEBHOOK_ALLOW_PRIVATE_TARGETS", "true")
        .env("WEBHOOK_WORKER_ID", unique("it-rss"))
        .env("RUST_LOG", "warn");
    let mut child = command.spawn().expect("spawn outboxd");
    let pid = child.id().expect("running");
    big_events(&db, EVENTS, BYTES, false).await;
    let expected = EVENTS as usize * ENDPOINTS;
    let deadline = std::time::Instant::now() + 6 * WAIT;
    while count.load(Ordering::Relaxed) < expected {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {expected} deliveries arrived",
            count.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM in /proc/PID/status");
    child.kill().await.unwrap();
    server.abort();
    assert!(
        peak_kib < PEAK_MIB * 1024,
        "peak RSS {} MiB delivering {EVENTS} events of {BYTES} bytes to {ENDPOINTS} endpoints",
        peak_kib / 1024
    );
}
