//! SIGTERM to the real binary: drain what is in flight, release what cannot finish,
//! exit 0.

use std::time::Duration;

use serde_json::json;

use crate::harness::{
    Receiver, Reply, RunningDispatcher, Spawned, TestDb, WAIT, eventually, outboxd_command,
    sigterm, test_config, unique, wait_child,
};

fn run_command(db: &TestDb, drain_timeout_ms: u64) -> tokio::process::Command {
    let mut command = outboxd_command();
    command
        .arg("run")
        .env("DATABASE_URL", &db.url)
        .env("WEBHOOK_ALLOW_PRIVATE_TARGETS", "true")
        .env("WEBHOOK_POLL_INTERVAL_MS", "100")
        .env("WEBHOOK_DRAIN_TIMEOUT_MS", drain_timeout_ms.to_string())
        .env("WEBHOOK_WORKER_ID", unique("it-binary"));
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_and_exits_zero() {
    drains_in_flight_and_exits_zero("sigterm", None).await;
}

/// One runtime thread is tokio's current-thread scheduler, not a one-worker pool: the
/// same drain must hold on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_and_exits_zero_on_one_thread() {
    let stderr = drains_in_flight_and_exits_zero("sigterm_one_thread", Some(1)).await;
    assert!(stderr.contains("current_thread"), "stderr:\n{stderr}");
}

/// Returns the process's stderr.
async fn drains_in_flight_and_exits_zero(name: &str, worker_threads: Option<u16>) -> String {
    let db = TestDb::new(name).await;
    let receiver = Receiver::start().await;
    receiver.always("/hook", Reply::ok().delay(Duration::from_millis(1_500)));
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    for n in 0..10 {
        db.enqueue("order.created", &json!({ "n": n })).await;
    }

    let mut command = run_command(&db, 10_000);
    if let Some(threads) = worker_threads {
        command.env("WEBHOOK_WORKER_THREADS", threads.to_string());
    }
    let child = command.spawn().expect("spawn outboxd");
    let pid = child.id().expect("a running child has a pid");
    // At least one request is in flight (the receiver holds each for 1.5 s).
    receiver.wait_for(1).await;
    sigterm(pid);
    let finished = wait_child(child, Duration::from_secs(60)).await;
    assert_eq!(
        finished.code,
        Some(0),
        "outboxd must exit 0 after a drain; stderr:\n{}",
        finished.stderr
    );

    let requests = receiver.requests();
    assert!(!requests.is_empty());
    let deliveries = db.deliveries().await;
    for r in &requests {
        assert_eq!(
            r.answered,
            Some(200),
            "request for event {} was started but not answered before exit",
            r.event_id()
        );
        let d = deliveries
            .iter()
            .find(|d| d.event_id == r.event_id())
            .expect("a delivery row");
        assert_eq!(d.state, "delivered", "{d:?}\nstderr:\n{}", finished.stderr);
        assert_eq!(d.attempts, 1, "{d:?}");
    }
    for d in &deliveries {
        assert_eq!(d.locked_by, None, "left locked: {d:?}");
        if d.state != "delivered" {
            // Never started: untouched and due.
            assert_eq!((d.state.as_str(), d.attempts), ("pending", 0), "{d:?}");
            assert!(requests.iter().all(|r| r.event_id() != d.event_id));
        }
    }
    finished.stderr
}

/// A claim may take more deliveries than there are free send slots; at shutdown those
/// still waiting for a slot are released unsent, due again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_deliveries_waiting_for_a_send_slot() {
    let db = TestDb::new("sigtermqueued").await;
    let receiver = Receiver::start().await;
    receiver.always("/hook", Reply::ok().delay(Duration::from_millis(1_500)));
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    const N: usize = 10;
    for n in 0..N {
        db.enqueue("order.created", &json!({ "n": n })).await;
    }

    let mut command = run_command(&db, 10_000);
    command.env("WEBHOOK_CONCURRENCY", "2");
    let child = command.spawn().expect("spawn outboxd");
    let pid = child.id().expect("a running child has a pid");
    receiver.wait_for(2).await;
    // The claim committed before its sends began: it took more than the two free slots
    // (up to twice as many), and they stay claimed until they are settled.
    let claimed: i64 = db
        .scalar("SELECT count(*) FROM webhook_deliveries WHERE attempts = 1")
        .await;
    assert!(
        claimed > 2,
        "a claim takes more than the free slots: {claimed}"
    );
    sigterm(pid);
    let finished = wait_child(child, Duration::from_secs(60)).await;
    assert_eq!(finished.code, Some(0), "stderr:\n{}", finished.stderr);

    let requests = receiver.requests();
    let deliveries = db.deliveries().await;
    let mut released = 0;
    for d in &deliveries {
        assert_eq!(d.locked_by, None, "left locked: {d:?}");
        if requests.iter().any(|r| r.event_id() == d.event_id) {
            assert_eq!((d.state.as_str(), d.attempts), ("delivered", 1), "{d:?}");
        } else {
            assert_eq!((d.state.as_str(), d.attempts), ("pending", 0), "{d:?}");
            released += 1;
        }
    }
    assert!(
        released > 0,
        "some deliveries were still waiting at SIGTERM"
    );
    let due: bool = db
        .scalar("SELECT bool_and(next_attempt_at <= now()) FROM webhook_deliveries WHERE state = 'pending'")
        .await;
    assert!(due, "released rows are due again at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drain_timeout_releases_rows() {
    let db = TestDb::new("sigtermhang").await;
    let receiver = Receiver::start().await;
    receiver.always("/hook", Reply::hang());
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    const N: usize = 3;
    for n in 0..N {
        db.enqueue("order.created", &json!({ "n": n })).await;
    }

    let child = run_command(&db, 300).spawn().expect("spawn outboxd");
    let pid = child.id().expect("a running child has a pid");
    // Every delivery is in flight and hanging.
    receiver.wait_for(N).await;
    sigterm(pid);
    let finished = wait_child(child, Duration::from_secs(30)).await;
    assert_eq!(
        finished.code,
        Some(0),
        "outboxd must exit 0 after a timed-out drain; stderr:\n{}",
        finished.stderr
    );

    assert!(receiver.requests().iter().all(|r| r.answered.is_none()));
    let deliveries = db.deliveries().await;
    assert_eq!(deliveries.len(), N);
    for d in &deliveries {
        assert_eq!(d.state, "pending", "{d:?}");
        assert_eq!(d.locked_by, None, "{d:?}");
        assert_eq!(d.locked_until, None, "{d:?}");
        assert_eq!(d.attempts, 0, "an abandoned attempt does not count: {d:?}");
    }
    let due: bool = db
        .scalar("SELECT bool_and(next_attempt_at <= now()) FROM webhook_deliveries")
        .await;
    assert!(due, "released rows are due again at once");
    let recorded: i64 = db.scalar("SELECT count(*) FROM webhook_attempts").await;
    assert_eq!(recorded, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigterm_exits_at_once() {
    let db = TestDb::new("sigterm2").await;
    let receiver = Receiver::start().await;
    receiver.always("/hook", Reply::hang());
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    db.enqueue("order.created", &json!({})).await;

    // A drain that would outlast the test's patience: only the second signal ends it.
    let outboxd = Spawned::start(run_command(&db, 600_000));
    receiver.wait_for(1).await;
    sigterm(outboxd.pid());
    outboxd.wait_for_stderr("shutdown requested").await;
    sigterm(outboxd.pid());
    let finished = outboxd.finish(Duration::from_secs(30)).await;
    assert_eq!(
        finished.code,
        Some(130),
        "a second signal exits at once with the forced-exit status (130, docs/webhooks.md); \
         stderr:\n{}",
        finished.stderr
    );
}

/// Whether a session the dispatcher opened waits for a lock in the test's database, in
/// a statement whose text contains `query_part`.
fn waiting_for_a_lock(query_part: &str) -> String {
    format!(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
             WHERE datname = current_database() AND application_name LIKE 'outboxd%'
               AND wait_event_type = 'Lock' AND query LIKE '%{query_part}%')"
    )
}

/// No session of the dispatcher is left in the test's database.
const NO_OUTBOXD_SESSION: &str = "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity
     WHERE datname = current_database() AND application_name LIKE 'outboxd%')";

/// Waits until `sql` is true. Unlike `TestDb::wait_until`, a timeout does not read the
/// delivery tables for its message: the test holds a lock on them.
async fn wait_while_locked(db: &TestDb, sql: &str) {
    eventually(sql, WAIT, || db.scalar::<bool>(sql)).await
}

/// A test configuration whose sessions wait for locks without limit: the drain must be
/// bounded without a `lock_timeout`.
fn no_lock_timeout(label: &str) -> outboxd::Config {
    outboxd::Config {
        db_lock_timeout: Duration::ZERO,
        ..test_config(label)
    }
}

/// A producer holding the doorbell's row in an idle transaction makes the claim loop's
/// arm wait for the lock. SIGTERM must still end the process within its drain bound,
/// and the arm it gave up must be cancelled in the server, not left to wait there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_while_an_arm_waits_for_the_doorbell() {
    let db = TestDb::new("sigtermarm").await;
    // A fresh doorbell is disarmed, so the first arm must lock its row.
    let mut producer = db.connect().await;
    let tx = producer.transaction().await.unwrap();
    tx.execute("SELECT * FROM webhook_doorbell FOR UPDATE", &[])
        .await
        .unwrap();

    // No lock_timeout: the drain must be bounded without one.
    let mut command = run_command(&db, 1_000);
    command.env("WEBHOOK_DB_LOCK_TIMEOUT_MS", "0");
    let outboxd = Spawned::start(command);
    wait_while_locked(&db, &waiting_for_a_lock("SET armed = true")).await;
    sigterm(outboxd.pid());
    let finished = outboxd.finish(Duration::from_secs(20)).await;
    assert_eq!(finished.code, Some(0), "stderr:\n{}", finished.stderr);
    wait_while_locked(&db, NO_OUTBOXD_SESSION).await;

    tx.commit().await.unwrap();
    let armed: bool = db.scalar("SELECT armed FROM webhook_doorbell").await;
    assert!(
        !armed,
        "the abandoned arm must not run once the row is free"
    );
}

/// A claim waiting for a table lock (an operator's `LOCK TABLE`, a migration) does not
/// hold up a shutdown either; cancelled in the server, it leases nothing, and the event
/// it would have claimed is delivered by the next dispatcher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_while_a_claim_waits_for_a_lock() {
    let db = TestDb::new("stopclaim").await;
    let receiver = Receiver::start().await;
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let dispatcher = RunningDispatcher::start(&db.url, no_lock_timeout("stopclaim"));
    db.wait_until("SELECT armed FROM webhook_doorbell").await;

    let mut operator = db.connect().await;
    let tx = operator.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE webhook_deliveries IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let event_id = db.enqueue("order.created", &json!({})).await;
    wait_while_locked(&db, &waiting_for_a_lock("WITH due AS")).await;
    tokio::time::timeout(Duration::from_secs(20), dispatcher.stop())
        .await
        .expect("the dispatcher stops while its claim waits for a lock");
    wait_while_locked(&db, NO_OUTBOXD_SESSION).await;
    tx.commit().await.unwrap();

    let processed: bool = db
        .scalar(&format!(
            "SELECT processed_at IS NOT NULL FROM webhook_outbox WHERE id = {event_id}"
        ))
        .await;
    assert!(
        !processed,
        "the cancelled claim must not have taken the event"
    );
    assert!(db.deliveries().await.is_empty());
    let next = RunningDispatcher::start(&db.url, test_config("stopclaim2"));
    db.wait_all_in_state(1, "delivered").await;
    next.stop().await;
    let ids: Vec<i64> = receiver.requests().iter().map(|r| r.event_id()).collect();
    assert_eq!(ids, [event_id]);
}

/// An operator's `SELECT ... FOR UPDATE` on a delivery whose outcome is being written
/// makes the settle statement wait. The drain still ends: the settler gives up after its
/// bound, and the delivery is not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_while_an_outcome_waits_for_a_row_lock() {
    let db = TestDb::new("stopsettle").await;
    let receiver = Receiver::start().await;
    receiver.always("/hook", Reply::ok().delay(Duration::from_millis(1_000)));
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let event_id = db.enqueue("order.created", &json!({})).await;
    let dispatcher = RunningDispatcher::start(&db.url, no_lock_timeout("stopsettle"));
    receiver.wait_for(1).await;

    let mut operator = db.connect().await;
    let tx = operator.transaction().await.unwrap();
    tx.execute("SELECT * FROM webhook_deliveries FOR UPDATE", &[])
        .await
        .unwrap();
    wait_while_locked(&db, &waiting_for_a_lock("webhook_settle")).await;
    tokio::time::timeout(Duration::from_secs(30), dispatcher.stop())
        .await
        .expect("the dispatcher stops while an outcome waits for a lock");
    tx.commit().await.unwrap();

    let next = RunningDispatcher::start(&db.url, test_config("stopsettle2"));
    db.wait_all_in_state_within(1, "delivered", Duration::from_secs(40))
        .await;
    next.stop().await;
    assert!(receiver.requests().iter().all(|r| r.event_id() == event_id));
}

/// Housekeeping's statements end on stop as well: a queue sample waiting behind an
/// operator's `LOCK TABLE` is cancelled in the server when housekeeping is told to stop,
/// so no session of a stopped dispatcher stays behind, waiting to take effect later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn housekeeping_stops_while_a_statement_waits_for_a_lock() {
    let db = TestDb::new("stophouse").await;
    let mut operator = db.connect().await;
    let tx = operator.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE webhook_deliveries IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();

    let config = no_lock_timeout("stophouse");
    let connector =
        outboxd::db::Connector::new(&db.url, outboxd::db::Session::dispatcher(&config)).unwrap();
    let pool = outboxd::db::pool(&connector, 2).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let housekeeping = tokio::spawn(outboxd::housekeeping::run(
        pool,
        connector,
        std::sync::Arc::new(outboxd::metrics::Metrics::default()),
        outboxd::housekeeping::Housekeeping {
            retention: outboxd::retention::RetentionPolicy {
                delivered: config.retention,
                dead: config.dead_retention,
            },
            disable_failing_after: config.endpoint_disable_after,
        },
        stop.clone(),
    ));
    // The first queue sample runs at once and waits for the table.
    wait_while_locked(&db, &waiting_for_a_lock("webhook_deliveries")).await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(20), housekeeping)
        .await
        .expect("housekeeping stops while its statement waits for a lock")
        .expect("housekeeping does not panic");
    wait_while_locked(&db, NO_OUTBOXD_SESSION).await;
    tx.commit().await.unwrap();
}
