//! When outcomes cannot be written: a dispatcher does not deliver what it could not
//! record, so a database that refuses the settle statement costs no repeated deliveries.

use std::collections::BTreeMap;
use std::time::Duration;

use outboxd::Error;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::harness::{Receiver, Reply, RunningDispatcher, TestDb, eventually, test_config};

const HIDE_SETTLE: &str = "ALTER FUNCTION webhook_settle RENAME TO webhook_settle_hidden";
const RESTORE_SETTLE: &str = "ALTER FUNCTION webhook_settle_hidden RENAME TO webhook_settle";

/// Hides the settle function, commits `n` events and waits until they have been sent
/// and a flush of their outcomes has failed. The events are committed in one
/// transaction, so one claim takes them all: a claim after the first failed flush
/// would wait for the stall to end.
async fn stall_after_sending(
    db: &TestDb,
    receiver: &Receiver,
    dispatcher: &RunningDispatcher,
    n: i32,
) {
    let sent_before = receiver.count();
    db.client.batch_execute(HIDE_SETTLE).await.unwrap();
    db.enqueue_series(1, n).await;
    receiver.wait_for(sent_before + n as usize).await;
    eventually("a flush fails", Duration::from_secs(10), || async {
        dispatcher.metrics.settle_failures_total() > 0
    })
    .await;
}

/// Asserts the receiver got `n` events, each exactly once; returns requests per event.
fn each_received_once(receiver: &Receiver, n: usize) -> BTreeMap<i64, usize> {
    let mut received = BTreeMap::new();
    for request in receiver.requests() {
        *received.entry(request.event_id()).or_insert(0) += 1;
    }
    assert_eq!(received.len(), n, "{received:?}");
    assert!(received.values().all(|&n| n == 1), "{received:?}");
    received
}

/// A test configuration whose lease runs out after three seconds, so that a dispatcher
/// that went on claiming during a stall would soon send a leased row again, while a
/// loaded machine still has ample time between a claim and its failed flush.
fn short_lease(label: &str) -> outboxd::Config {
    let mut config = test_config(label);
    config.lease = Duration::from_millis(3_000);
    config.http_timeout = Duration::from_millis(2_000);
    config
}

/// Runs a dispatcher that should refuse to start; returns its error.
async fn start_error(url: &str, label: &str) -> Error {
    let dispatcher = outboxd::Dispatcher::new(url, test_config(label)).unwrap();
    let run = dispatcher.run(CancellationToken::new());
    match tokio::time::timeout(Duration::from_secs(30), run).await {
        Ok(Err(e)) => e,
        Ok(Ok(report)) => panic!("the dispatcher ran and stopped: {report:?}"),
        Err(_) => panic!("the dispatcher started instead of refusing"),
    }
}

/// Before claiming anything, a dispatcher checks that it could record what it delivers:
/// a settle function missing from its search path (with PostgreSQL's reason) and a
/// read-only database (a standby after a failover, named as such) each stop it at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatcher_refuses_to_start_when_outcomes_could_not_be_written() {
    let db = TestDb::new("settleprobe").await;
    let receiver = Receiver::start().await;
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    db.enqueue("order.created", &json!({})).await;

    db.client.batch_execute(HIDE_SETTLE).await.unwrap();
    let e = start_error(&db.url, "settleprobe").await;
    assert!(matches!(e, Error::CannotSettle(_)), "{e:?}");
    let message = e.to_string();
    assert!(
        message.contains("webhook_settle") && message.contains("42883"),
        "{message}"
    );
    db.client.batch_execute(RESTORE_SETTLE).await.unwrap();

    db.client
        .batch_execute(&format!(
            "ALTER DATABASE {} SET default_transaction_read_only = on",
            db.name
        ))
        .await
        .unwrap();
    let e = start_error(&db.url, "settleprobe").await;
    assert!(matches!(e, Error::ReadOnlyDatabase(_)), "{e:?}");
    assert!(
        e.to_string().contains("default_transaction_read_only"),
        "{e}"
    );
    db.client
        .batch_execute(&format!(
            "ALTER DATABASE {} RESET default_transaction_read_only",
            db.name
        ))
        .await
        .unwrap();

    assert_eq!(
        receiver.count(),
        0,
        "nothing is delivered by a refused start"
    );
    let dispatcher = RunningDispatcher::start(&db.url, test_config("settleprobe"));
    receiver.wait_for(1).await;
    dispatcher.stop().await;
}

/// While the settle statement fails, the deliveries already made wait, leased, for their
/// outcomes to be written, and nothing more is sent: not the leased rows once their
/// lease runs out, and not new events, not even one taken by a claim that was already
/// running when the stall began. Once the database takes outcomes again, every event
/// ends delivered, each received once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claiming_stops_while_outcomes_cannot_be_written() {
    let db = TestDb::new("settlestall").await;
    let receiver = Receiver::start().await;
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let config = short_lease("settlestall");
    let dispatcher = RunningDispatcher::start(&db.url, config);
    db.enqueue("order.created", &json!({ "n": 0 })).await;
    db.wait_all_in_state(1, "delivered").await;

    stall_after_sending(&db, &receiver, &dispatcher, 3).await;
    // Delivered but not recorded: a dispatcher that went on claiming would take these
    // rows back when their three-second lease ran out, and send them again.
    let late = db.enqueue("order.created", &json!({ "n": 4 })).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        receiver.count(),
        4,
        "nothing is sent while outcomes cannot be written"
    );
    // A claim already running when the first flush failed may have leased the late
    // event as well (the loop looks at the settler before it claims): it must not be
    // sent either, which the count above says.
    let leased: i64 = db
        .scalar(&format!(
            "SELECT count(*) FROM webhook_deliveries
             WHERE state = 'pending' AND locked_by = '{}' AND event_id <> {late}",
            dispatcher.worker_id
        ))
        .await;
    assert_eq!(
        leased, 3,
        "the unrecorded deliveries stay with their worker"
    );

    db.client.batch_execute(RESTORE_SETTLE).await.unwrap();
    db.wait_all_in_state(5, "delivered").await;
    let received = each_received_once(&receiver, 5);
    assert_eq!(received.get(&late), Some(&1));
    let attempts: i64 = db.scalar("SELECT count(*) FROM webhook_attempts").await;
    assert_eq!(attempts, 5, "each attempt is recorded once");
    let report = dispatcher.stop().await;
    assert_eq!(report.totals.delivered, 5);
    assert_eq!(report.totals.lease_lost, 0);
}

/// A claim that was already running when the settler stalled sends nothing of what it
/// took until outcomes can be written again. The claim is held in the server by a lock
/// on the deliveries table while an earlier delivery's outcome fails to be written;
/// the lock then goes, and the claim returns a later event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_running_when_the_stall_begins_sends_nothing() {
    let db = TestDb::new("stallclaim").await;
    let receiver = Receiver::start().await;
    // The first request (the first event's) is answered after a second: its outcome
    // is written, and fails, while the claim of the second event waits on the lock.
    receiver.script("/hook", |n| match n {
        0 => Reply::ok().delay(Duration::from_millis(1_000)),
        _ => Reply::ok(),
    });
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let config = outboxd::Config {
        // Only the doorbell starts a claim.
        poll_interval: Duration::from_secs(600),
        // The claim must still be waiting for the lock when the flush fails, however
        // slowly a loaded machine gets there: with the default 5 s it once timed out
        // first (CI), was retried only after the stall, and never ran.
        db_lock_timeout: Duration::from_secs(30),
        ..test_config("stallclaim")
    };
    let dispatcher = RunningDispatcher::start(&db.url, config);
    eventually("the LISTEN session is up", Duration::from_secs(20), || {
        let metrics = dispatcher.metrics.clone();
        async move { metrics.listener_connected() }
    })
    .await;
    db.client.batch_execute(HIDE_SETTLE).await.unwrap();
    let first = db.enqueue("order.created", &json!({ "n": 1 })).await;
    receiver.wait_for(1).await;

    let locker = db.connect().await;
    locker
        .batch_execute("BEGIN; LOCK TABLE webhook_deliveries IN EXCLUSIVE MODE")
        .await
        .unwrap();
    // The claim that waits on the lock may be one the loop began before this insert
    // (a recheck after arming): its `now()` is older than the event. Due a minute ago,
    // the event is taken by whichever claim waits, and that claim is not the next one,
    // which the stall would hold back (CI saw it: the test waited on itself).
    let second: i64 = db
        .scalar(
            "INSERT INTO webhook_outbox (event_type, payload, deliver_after)
             VALUES ('order.created', '{\"n\": 2}', now() - interval '1 minute')
             RETURNING id",
        )
        .await;
    // The claim waiting on the lock, not autovacuum or retention.
    db.wait_until(
        "SELECT count(*) > 0 FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock'
           AND query LIKE '%WITH due AS%'",
    )
    .await;
    eventually("a flush fails", Duration::from_secs(10), || async {
        dispatcher.metrics.settle_failures_total() > 0
    })
    .await;
    locker.batch_execute("ROLLBACK").await.unwrap();
    db.wait_until(&format!(
        "SELECT count(*) = 1 FROM webhook_deliveries WHERE event_id = {second} AND attempts = 1"
    ))
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        receiver.count(),
        1,
        "nothing is sent while outcomes cannot be written"
    );

    db.client.batch_execute(RESTORE_SETTLE).await.unwrap();
    db.wait_all_in_state(2, "delivered").await;
    let received = each_received_once(&receiver, 2);
    assert_eq!((received[&first], received[&second]), (1, 1));
    let report = dispatcher.stop().await;
    assert_eq!(report.totals.delivered, 2);
    assert_eq!(report.totals.lease_lost, 0);
}

/// Deliveries a claim brought beyond the free send slots wait for a slot; once the
/// settler cannot write outcomes, a slot that frees does not start one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_waiting_for_a_slot_are_not_sent_while_outcomes_cannot_be_written() {
    let db = TestDb::new("stallwait").await;
    let receiver = Receiver::start().await;
    // Two slots, four deliveries in one claim. The first request to end (after 1 s)
    // frees a slot for the third delivery, and its outcome's flush fails: the stall
    // begins. When the other two end (after 3 s), the fourth must not start.
    // (Request 0 is a first event, delivered once the dispatcher is up.)
    receiver.script("/hook", |n| match n {
        1 => Reply::ok().delay(Duration::from_millis(1_000)),
        2 => Reply::ok().delay(Duration::from_millis(3_000)),
        3 => Reply::ok().delay(Duration::from_millis(2_000)),
        _ => Reply::ok(),
    });
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let config = outboxd::Config {
        concurrency: 2,
        ..test_config("stallwait")
    };
    let dispatcher = RunningDispatcher::start(&db.url, config);
    db.enqueue("order.created", &json!({ "n": 0 })).await;
    db.wait_all_in_state(1, "delivered").await;
    db.client.batch_execute(HIDE_SETTLE).await.unwrap();
    db.enqueue_series(1, 4).await;
    receiver.wait_for(4).await;
    eventually("a flush fails", Duration::from_secs(10), || async {
        dispatcher.metrics.settle_failures_total() > 0
    })
    .await;
    let claimed: i64 = db
        .scalar("SELECT count(*) FROM webhook_deliveries WHERE state = 'pending' AND attempts = 1")
        .await;
    assert_eq!(claimed, 4, "one claim took all four");
    // The slowest request ends 3 s after the claim; give the fourth time to start.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        receiver.count(),
        4,
        "nothing waiting is sent while outcomes cannot be written"
    );

    db.client.batch_execute(RESTORE_SETTLE).await.unwrap();
    db.wait_all_in_state(5, "delivered").await;
    each_received_once(&receiver, 5);
    let report = dispatcher.stop().await;
    assert_eq!(report.totals.delivered, 5);
    assert_eq!(report.totals.lease_lost, 0);
}

/// The grants docs/operations.md lists for a separate dispatcher role are enough to
/// deliver, and without EXECUTE on `webhook_settle` the dispatcher refuses to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatcher_role_needs_the_documented_grants() {
    let db = TestDb::new("dispatcherrole").await;
    if !db.may_create_roles().await {
        eprintln!("skipped: the test database user cannot create roles");
        return;
    }
    let receiver = Receiver::start().await;
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let role = format!("{}_dispatcher", db.name);
    let password = "dispatcher-password";
    db.client
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{password}';
             DO $$
             DECLARE t text;
             BEGIN
                 FOR t IN SELECT tablename FROM pg_tables
                          WHERE schemaname = 'public' AND tablename LIKE 'webhook\\_%'
                 LOOP
                     EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I TO {role}', t);
                 END LOOP;
             END $$;
             GRANT UPDATE ON SEQUENCE webhook_doorbell_gate TO {role};
             GRANT SELECT ON outboxd_migrations TO {role};
             REVOKE EXECUTE ON FUNCTION webhook_settle FROM PUBLIC;"
        ))
        .await
        .unwrap();
    let url = if db.url.contains("://") {
        let mut url = url::Url::parse(&db.url).unwrap();
        url.set_username(&role).unwrap();
        url.set_password(Some(password)).unwrap();
        url.to_string()
    } else {
        format!("{} user={role} password={password}", db.url)
    };

    // `outboxd run` and /readyz check the migrations first.
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let pending = outboxd::schema::pending_migrations(&client).await.unwrap();
    assert!(pending.is_empty(), "{pending:?}");
    drop(client);

    let e = start_error(&url, "dispatcherrole").await;
    assert!(
        matches!(e, Error::CannotSettle(_)) && e.to_string().contains("42501"),
        "without EXECUTE: {e:?}"
    );

    db.client
        .batch_execute(&format!(
            "GRANT EXECUTE ON FUNCTION webhook_settle TO {role}"
        ))
        .await
        .unwrap();
    // A closed gate and a disarmed bell, as a notification leaves them: the dispatcher
    // must open the gate (a setval) when it arms the bell.
    db.client
        .batch_execute(
            "UPDATE webhook_doorbell SET armed = false;
             SELECT setval('webhook_doorbell_gate', 1, true);",
        )
        .await
        .unwrap();
    let dispatcher = RunningDispatcher::start(&url, test_config("dispatcherrole"));
    let event = db.enqueue("order.created", &json!({})).await;
    assert_eq!(receiver.wait_for(1).await[0].event_id(), event);
    db.wait_all_in_state(1, "delivered").await;
    // Idle, it arms the doorbell and opens the gate.
    db.wait_until(
        "SELECT armed AND pg_sequence_last_value('webhook_doorbell_gate') IS NULL
         FROM webhook_doorbell",
    )
    .await;
    dispatcher.stop().await;
    // Left behind if an assertion above fails: roles outlive the test's database.
    db.client
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role};"))
        .await
        .unwrap();
}

/// A shutdown during a stall ends: the claim loop leaves its wait, the settler gives up
/// after its bound, and the unwritten deliveries come back to the next dispatcher when
/// their lease runs out (delivered twice, which is what at-least-once allows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_while_outcomes_cannot_be_written() {
    let db = TestDb::new("settlestop").await;
    let receiver = Receiver::start().await;
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let mut config = short_lease("settlestop");
    let dispatcher = RunningDispatcher::start(&db.url, config.clone());
    db.wait_until("SELECT armed FROM webhook_doorbell").await;

    stall_after_sending(&db, &receiver, &dispatcher, 2).await;
    let report = dispatcher.stop().await;
    assert_eq!(report.totals.delivered, 0, "{report:?}");

    db.client.batch_execute(RESTORE_SETTLE).await.unwrap();
    config.worker_id = format!("{}-next", config.worker_id);
    let next = RunningDispatcher::start(&db.url, config);
    db.wait_all_in_state(2, "delivered").await;
    assert_eq!(receiver.count(), 4, "each event once per dispatcher");
    next.stop().await;
}

/// An outcome the database refuses for its values (here a constraint, through a test
/// trigger on one event's attempt rows) fails its whole batch's statement: the batch
/// is written again one outcome at a time, so the others settle, and the refused one
/// is retried when its lease ends, until it can be written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_refused_for_its_values_does_not_hold_back_its_batch() {
    let db = TestDb::new("settle_baddata").await;
    let receiver = Receiver::start().await;
    receiver.always("/hook", Reply::ok());
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    db.client
        .batch_execute(
            "CREATE FUNCTION test_refuse_attempt() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF (SELECT payload->>'n' FROM webhook_outbox WHERE id = NEW.event_id) = '2' THEN
                     RAISE EXCEPTION 'test fault: attempt refused'
                         USING ERRCODE = 'check_violation';
                 END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER test_refuse_attempt BEFORE INSERT ON webhook_attempts
                 FOR EACH ROW EXECUTE FUNCTION test_refuse_attempt();",
        )
        .await
        .expect("install the fault");
    let mut config = test_config("settle_baddata");
    config.http_timeout = Duration::from_millis(1_000);
    config.lease = Duration::from_millis(2_000);
    let dispatcher = RunningDispatcher::start(&db.url, config);
    // One transaction: one claim, one batch of outcomes.
    db.enqueue_series(1, 3).await;
    db.wait_until(
        "SELECT count(*) = 2 FROM webhook_deliveries d JOIN webhook_outbox o ON o.id = d.event_id
         WHERE d.state = 'delivered' AND o.payload->>'n' IN ('1', '3')",
    )
    .await;
    // The refused one is sent again after its lease, and refused again, while the fault
    // lasts: it is never recorded as delivered.
    eventually(
        "the refused outcome is sent again",
        Duration::from_secs(20),
        || async { receiver.count() >= 4 },
    )
    .await;
    let delivered: i64 = db
        .scalar("SELECT count(*) FROM webhook_deliveries WHERE state = 'delivered'")
        .await;
    assert_eq!(delivered, 2);

    db.client
        .batch_execute("DROP TRIGGER test_refuse_attempt ON webhook_attempts")
        .await
        .expect("remove the fault");
    db.wait_all_in_state(3, "delivered").await;
    dispatcher.stop().await;
}
