//! How a dispatcher learns about new events: push (LISTEN/NOTIFY through the
//! doorbell), reconnect catch-up, and plain polling.

use std::time::Duration;

use serde_json::json;

use crate::harness::{Receiver, RunningDispatcher, TestDb, eventually, test_config};

/// Longer than any test: only a push or a reconnect can wake the dispatcher.
const ONE_HOUR: Duration = Duration::from_millis(3_600_000);

const LISTENER_PIDS: &str = "SELECT pid FROM pg_stat_activity
     WHERE application_name = 'outboxd-listener' AND datname = current_database()";

/// Whether inserts call the ring function (sql/0004).
const GATE_OPEN: &str = "SELECT pg_sequence_last_value('webhook_doorbell_gate') IS NULL";
/// Whether a dispatcher is waiting for a ring (sql/0002).
const ARMED: &str = "SELECT armed FROM webhook_doorbell";

async fn listener_pids(db: &TestDb) -> Vec<i32> {
    db.client
        .query(LISTENER_PIDS, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A dispatcher that listens and whose poll tick is an hour away: only a push (or a
/// reconnect's catch-up) can wake it within a test.
pub(crate) fn push_only(url: &str, label: &str) -> RunningDispatcher {
    RunningDispatcher::start(
        url,
        outboxd::Config {
            poll_interval: ONE_HOUR,
            listen: true,
            ..test_config(label)
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_delivers_without_polling() {
    let mut db = TestDb::new("push").await;
    let receiver = Receiver::start().await;
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let dispatcher = push_only(&db.url, "push");

    // Idle: the listener is subscribed and the claim loop armed the doorbell.
    db.wait_until(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
             WHERE application_name = 'outboxd-listener' AND datname = current_database()
               AND state = 'idle' AND query ILIKE 'LISTEN%')",
    )
    .await;
    db.wait_until(ARMED).await;

    let tx = db.client.transaction().await.unwrap();
    let event_id = outboxd::enqueue(&tx, &outboxd::NewEvent::new("order.created", &json!({})))
        .await
        .unwrap()
        .unwrap();
    // The insert trigger found the bell armed, disarmed it and notified.
    let armed: bool = tx.query_one(ARMED, &[]).await.unwrap().get(0);
    assert!(!armed, "the insert must ring (and disarm) the doorbell");
    tx.commit().await.unwrap();

    db.wait_all_in_state_within(1, "delivered", Duration::from_secs(10))
        .await;
    dispatcher.stop().await;
    let requests = receiver.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].event_id(), event_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_reconnects_after_termination() {
    let db = TestDb::new("reconnect").await;
    let receiver = Receiver::start().await;
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let dispatcher = push_only(&db.url, "reconnect");

    db.wait_until(&format!("SELECT count(*) = 1 FROM ({LISTENER_PIDS}) l"))
        .await;
    let old = listener_pids(&db).await;
    assert_eq!(old.len(), 1, "{old:?}");
    let old_pid = old[0];
    let terminated: bool = db
        .client
        .query_one("SELECT pg_terminate_backend($1)", &[&old_pid])
        .await
        .unwrap()
        .get(0);
    assert!(terminated);
    db.wait_until(&format!(
        "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = {old_pid})"
    ))
    .await;

    let event_id = db.enqueue("order.created", &json!({})).await;
    db.wait_all_in_state_within(1, "delivered", Duration::from_secs(15))
        .await;

    // A new listener session replaced the terminated one.
    eventually(
        "a new listener backend exists",
        crate::harness::WAIT,
        || {
            let db = &db;
            async move {
                let pids = listener_pids(db).await;
                pids.len() == 1 && pids[0] != old_pid
            }
        },
    )
    .await;

    // And it works: the next event is pushed too.
    db.wait_until(ARMED).await;
    let second = db.enqueue("order.paid", &json!({})).await;
    db.wait_all_in_state_within(2, "delivered", Duration::from_secs(15))
        .await;
    dispatcher.stop().await;
    let ids: Vec<i64> = receiver.requests().iter().map(|r| r.event_id()).collect();
    assert_eq!(ids, [event_id, second]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_delivers_without_listen() {
    let db = TestDb::new("polling").await;
    let receiver = Receiver::start().await;
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let dispatcher = RunningDispatcher::start(
        &db.url,
        outboxd::Config {
            poll_interval: Duration::from_millis(200),
            listen: false,
            ..test_config("polling")
        },
    );

    let first = db.enqueue("order.created", &json!({"n": 1})).await;
    db.wait_all_in_state(1, "delivered").await;
    let second = db.enqueue("order.created", &json!({"n": 2})).await;
    db.wait_all_in_state(2, "delivered").await;

    // Pure polling: no LISTEN session, and the doorbell is never armed.
    assert!(listener_pids(&db).await.is_empty());
    let armed: bool = db.scalar(ARMED).await;
    assert!(!armed, "a polling dispatcher must not arm the doorbell");
    dispatcher.stop().await;
    let ids: Vec<i64> = receiver.requests().iter().map(|r| r.event_id()).collect();
    assert_eq!(ids, [first, second]);
}

/// The gate in front of the doorbell (sql/0004): while it is closed an insert does not
/// call the ring function; opened, the next insert rings. The statements are the ones
/// the claim loop sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doorbell_gate_decides_whether_inserts_ring() {
    let db = TestDb::new("gate").await;
    // A fresh gate is open: failing safe means ringing.
    assert!(db.scalar::<bool>(GATE_OPEN).await);

    // Closed by hand over an armed bell (the claim loop never leaves this state, see
    // the next test), to see the trigger's condition alone.
    outboxd::claim::arm_doorbell(&db.client).await.unwrap();
    db.client
        .execute("SELECT setval('webhook_doorbell_gate', 1, true)", &[])
        .await
        .unwrap();
    db.enqueue("order.created", &json!({})).await;
    assert!(
        db.scalar::<bool>(ARMED).await,
        "with the gate closed the insert must not ring"
    );

    // Arming an armed bell still opens the gate.
    outboxd::claim::arm_doorbell(&db.client).await.unwrap();
    assert!(db.scalar::<bool>(GATE_OPEN).await);
    assert!(db.scalar::<bool>(ARMED).await);
    db.enqueue("order.created", &json!({})).await;
    assert!(
        !db.scalar::<bool>(ARMED).await,
        "with the gate open the insert must ring"
    );
    // Rung, so a close closes; closing twice and arming twice are harmless.
    outboxd::claim::close_doorbell_gate(&db.client)
        .await
        .unwrap();
    assert!(!db.scalar::<bool>(GATE_OPEN).await);
    outboxd::claim::close_doorbell_gate(&db.client)
        .await
        .unwrap();
    assert!(!db.scalar::<bool>(GATE_OPEN).await);
    outboxd::claim::arm_doorbell(&db.client).await.unwrap();
    outboxd::claim::arm_doorbell(&db.client).await.unwrap();
    assert!(db.scalar::<bool>(GATE_OPEN).await && db.scalar::<bool>(ARMED).await);
}

/// Closes the gate as the claim loop does; a close that waited for another session's
/// lock would stall the claim loop behind it.
async fn close_without_waiting(client: &tokio_postgres::Client) {
    tokio::time::timeout(
        Duration::from_secs(10),
        outboxd::claim::close_doorbell_gate(client),
    )
    .await
    .expect("a close must skip a locked bell, not wait for its holder")
    .unwrap();
}

/// With several dispatchers, one may close the gate (after a ring woke it) while another
/// has just armed the bell to sleep. The close must then leave the gate open, or the
/// sleeper would not hear the next insert and would wait for its poll tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_stays_open_while_a_dispatcher_sleeps() {
    let db = TestDb::new("gatesleeper").await;
    let awake = db.connect().await;

    // The sleeper's arm has committed: an armed bell keeps the gate open.
    outboxd::claim::arm_doorbell(&db.client).await.unwrap();
    outboxd::claim::close_doorbell_gate(&awake).await.unwrap();
    assert!(
        db.scalar::<bool>(GATE_OPEN).await,
        "a close must not shut out an armed sleeper"
    );
    db.enqueue("order.created", &json!({})).await;
    assert!(!db.scalar::<bool>(ARMED).await, "the insert must ring");
    outboxd::claim::close_doorbell_gate(&awake).await.unwrap();
    assert!(
        !db.scalar::<bool>(GATE_OPEN).await,
        "rung: the close closes"
    );

    // The sleeper's arm has not committed yet (it holds the bell's row): the close
    // neither waits for it nor closes the gate the arm has just opened.
    let mut sleeper = db.connect().await;
    let tx = sleeper.transaction().await.unwrap();
    outboxd::claim::arm_doorbell(&tx).await.unwrap();
    close_without_waiting(&awake).await;
    tx.commit().await.unwrap();
    assert!(db.scalar::<bool>(GATE_OPEN).await && db.scalar::<bool>(ARMED).await);

    // A producer has rung in a transaction that is still open: the close sees the bell
    // as committed, still armed, and leaves the gate open without waiting; the ring
    // wakes every dispatcher at its commit.
    let mut producer = db.connect().await;
    let tx = producer.transaction().await.unwrap();
    outboxd::enqueue(&tx, &outboxd::NewEvent::new("order.created", &json!({})))
        .await
        .unwrap();
    close_without_waiting(&awake).await;
    assert!(db.scalar::<bool>(GATE_OPEN).await);
    tx.commit().await.unwrap();
    assert!(!db.scalar::<bool>(ARMED).await);
}

/// An arm that finds a close holding the bell's row waits for it, then opens the gate
/// that close has just shut: the arm updates the row before it looks at the gate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arm_reopens_a_gate_closed_while_it_waited() {
    let db = TestDb::new("armwaits").await;
    // A fresh doorbell: disarmed, gate open, as after a ring.
    assert!(!db.scalar::<bool>(ARMED).await && db.scalar::<bool>(GATE_OPEN).await);

    // A close that has locked the bell's row and not yet closed the gate.
    let mut closer = db.connect().await;
    let tx = closer.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM webhook_doorbell WHERE id = 1 AND NOT armed FOR UPDATE",
        &[],
    )
    .await
    .unwrap();
    let sleeper = db.connect().await;
    let arm = tokio::spawn(async move { outboxd::claim::arm_doorbell(&sleeper).await });
    db.wait_until(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
            WHERE datname = current_database() AND pid <> pg_backend_pid()
              AND wait_event_type = 'Lock' AND query LIKE '%SET armed = true%')",
    )
    .await;
    tx.execute("SELECT setval('webhook_doorbell_gate', 1, true)", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    arm.await.unwrap().unwrap();
    assert!(
        db.scalar::<bool>(ARMED).await && db.scalar::<bool>(GATE_OPEN).await,
        "an armed bell behind a closed gate is never rung"
    );
}

/// A producer that rings the doorbell and then rolls back must not leave a sleeping
/// dispatcher deaf: the disarm rolls back with it and the gate stays open, so the next
/// producer's commit wakes the dispatcher (the poll tick is an hour away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_ring_leaves_the_doorbell_armed() {
    let mut db = TestDb::new("ringrollback").await;
    let receiver = Receiver::start().await;
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let dispatcher = push_only(&db.url, "ringrollback");
    db.wait_until(&format!(
        "SELECT count(*) = 1 FROM ({LISTENER_PIDS}) l WHERE (SELECT armed FROM webhook_doorbell)
            AND ({GATE_OPEN})"
    ))
    .await;
    // Past the claim loop's rechecks after arming: from here only a push wakes it.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let tx = db.client.transaction().await.unwrap();
    outboxd::enqueue(&tx, &outboxd::NewEvent::new("order.created", &json!({})))
        .await
        .unwrap();
    let armed: bool = tx.query_one(ARMED, &[]).await.unwrap().get(0);
    assert!(!armed, "the insert must ring the doorbell");
    tx.rollback().await.unwrap();
    assert!(db.scalar::<bool>(ARMED).await);
    assert!(db.scalar::<bool>(GATE_OPEN).await);

    let event_id = db.enqueue("order.paid", &json!({})).await;
    db.wait_all_in_state_within(1, "delivered", Duration::from_secs(10))
        .await;
    dispatcher.stop().await;
    let ids: Vec<i64> = receiver.requests().iter().map(|r| r.event_id()).collect();
    assert_eq!(ids, [event_id]);
}

/// Producers need only INSERT on the outbox (and SELECT on `id` for `RETURNING id`, as
/// `outboxd::enqueue` does): the gate is readable by every role and the ring function runs
/// with its owner's rights. It resolves names through a pinned path, so a producer's
/// temporary table named like the doorbell cannot stand in for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_role_needs_only_insert() {
    let db = TestDb::new("producerrole").await;
    let role = format!("{}_producer", db.name);
    if !db.may_create_roles().await {
        eprintln!("skipped: the test database user cannot create roles");
        return;
    }
    db.client
        .batch_execute(&format!(
            "CREATE ROLE {role};
             GRANT INSERT, SELECT (id) ON webhook_outbox TO {role};"
        ))
        .await
        .unwrap();
    outboxd::claim::arm_doorbell(&db.client).await.unwrap();
    let produced = async {
        db.client
            .batch_execute(&format!(
                "SET ROLE {role};
                 CREATE TEMP TABLE webhook_doorbell (id integer, armed boolean);
                 INSERT INTO webhook_doorbell VALUES (1, false);"
            ))
            .await?;
        let tx_result = db
            .client
            .query_one(
                "INSERT INTO webhook_outbox (event_type, payload)
                 VALUES ('order.created', '{}') RETURNING id",
                &[],
            )
            .await;
        db.client
            .batch_execute("DROP TABLE pg_temp.webhook_doorbell; RESET ROLE;")
            .await?;
        tx_result
    }
    .await;
    let cleanup = db
        .client
        .batch_execute(&format!(
            "RESET ROLE; DROP OWNED BY {role}; DROP ROLE {role};"
        ))
        .await;
    let row = produced.unwrap();
    cleanup.unwrap();
    assert!(row.get::<_, i64>(0) > 0);
    assert!(
        !db.scalar::<bool>("SELECT armed FROM public.webhook_doorbell")
            .await,
        "the producer's insert must ring the real doorbell"
    );
}

/// A fresh database starts with the doorbell's gate open (it fails safe), and only a
/// dispatcher woken by a ring closed it: with pure polling, every insert statement ran
/// the ring function for nothing. A polling dispatcher closes it; a push-mode one
/// asleep beside it keeps it open (its armed bell).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_dispatcher_closes_the_gate_unless_a_bell_is_armed() {
    let db = TestDb::new("pollgate").await;
    let open: bool = db.scalar(GATE_OPEN).await;
    assert!(open, "a fresh database starts with the gate open");
    let polling = RunningDispatcher::start(
        &db.url,
        outboxd::Config {
            listen: false,
            ..test_config("pollgate")
        },
    );
    db.wait_until(&format!("SELECT NOT ({GATE_OPEN})")).await;

    // A push-mode dispatcher arms the bell and opens the gate to sleep; the poller's
    // later closes leave it open.
    let push = RunningDispatcher::start(
        &db.url,
        outboxd::Config {
            poll_interval: ONE_HOUR,
            ..test_config("pushgate")
        },
    );
    db.wait_until(&format!("SELECT ({GATE_OPEN}) AND ({ARMED})"))
        .await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let open: bool = db.scalar(GATE_OPEN).await;
    assert!(
        open,
        "the gate stays open while a dispatcher sleeps on the bell"
    );
    push.stop().await;
    polling.stop().await;
}

// ---------------------------------------------------------------------------------------
// Rings at REPEATABLE READ and SERIALIZABLE (sql/0006)
// ---------------------------------------------------------------------------------------

/// The number of the latest REPEATABLE READ / SERIALIZABLE ring (1: none yet).
const RING: &str = "SELECT coalesce(pg_sequence_last_value('webhook_doorbell_rings'), 1)";
/// The ring number the bell last recorded (at an arm or a close that disarmed it).
const RINGS_SEEN: &str = "SELECT rings_seen FROM webhook_doorbell";
/// The ring number producers read as answered (the gate's last_value).
const RINGS_ANSWERED: &str = "SELECT last_value FROM webhook_doorbell_gate";

/// A LISTEN session on the doorbell's channel that collects notifications.
struct Listener {
    notifications: tokio::sync::mpsc::UnboundedReceiver<()>,
    _client: tokio_postgres::Client,
}

impl Listener {
    async fn start(db: &TestDb) -> Self {
        use futures_util::StreamExt as _;
        let (client, mut connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        let (tx, notifications) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let tokio_postgres::AsyncMessage::Notification(_) = message {
                    let _ = tx.send(());
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {}", outboxd::listener::CHANNEL))
            .await
            .unwrap();
        Self {
            notifications,
            _client: client,
        }
    }

    /// Waits (boundedly) for one notification.
    async fn notified(&mut self, what: &str) {
        tokio::time::timeout(crate::harness::WAIT, self.notifications.recv())
            .await
            .unwrap_or_else(|_| panic!("no notification: {what}"))
            .expect("the listener is running");
    }

    /// Asserts that no notification arrives for a while.
    async fn quiet(&mut self, what: &str) {
        let got = tokio::time::timeout(Duration::from_millis(300), self.notifications.recv()).await;
        assert!(got.is_err(), "unexpected notification: {what}");
    }
}

/// A transaction at `isolation` that took its snapshot before anything else happens.
async fn producer_at(db: &TestDb, isolation: &str) -> tokio_postgres::Client {
    let client = db.connect().await;
    client
        .batch_execute(&format!("BEGIN ISOLATION LEVEL {isolation}; SELECT 1"))
        .await
        .unwrap();
    client
}

async fn insert_event(client: &tokio_postgres::Client) {
    client
        .batch_execute(
            "INSERT INTO webhook_outbox (event_type, payload) VALUES ('order.created', '{}')",
        )
        .await
        .unwrap();
}

/// A ring at REPEATABLE READ or SERIALIZABLE touches no row: the bell stays armed, the
/// ring is numbered and notified at commit. A woken dispatcher's close then disarms the
/// bell, closes the gate and notifies in its turn; the re-arm that follows is not closed
/// again for the same rings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_isolated_ring_counts_and_the_close_disarms() {
    let db = TestDb::new("rrring").await;
    let mut listener = Listener::start(&db).await;
    outboxd::claim::arm_doorbell(&db.client).await.unwrap();
    assert_eq!(db.scalar::<i64>(RING).await, 1);

    for (n, isolation) in [(2, "REPEATABLE READ"), (3, "SERIALIZABLE")] {
        let producer = producer_at(&db, isolation).await;
        insert_event(&producer).await;
        assert!(
            db.scalar::<bool>(ARMED).await,
            "a {isolation} ring must not disarm the bell"
        );
        assert_eq!(db.scalar::<i64>(RING).await, n);
        listener
            .quiet("nothing is notified before the commit")
            .await;
        producer.batch_execute("COMMIT").await.unwrap();
        listener.notified(isolation).await;
        assert!(db.scalar::<bool>(ARMED).await && db.scalar::<bool>(GATE_OPEN).await);
    }

    // A woken dispatcher closes: rings counted since the arm let it disarm the bell; it
    // notifies, for a ring that rolled back or a sleeper that did not record the count.
    outboxd::claim::close_doorbell_gate(&db.client)
        .await
        .unwrap();
    assert!(!db.scalar::<bool>(ARMED).await);
    assert!(!db.scalar::<bool>(GATE_OPEN).await);
    assert_eq!(db.scalar::<i64>(RINGS_SEEN).await, 3);
    assert_eq!(db.scalar::<i64>(RINGS_ANSWERED).await, 3);
    listener.notified("the close that disarms notifies").await;
    outboxd::claim::close_doorbell_gate(&db.client)
        .await
        .unwrap();
    listener.quiet("closing a closed gate is a read").await;

    // The woken dispatchers arm again; that arm is not closed for the same rings.
    outboxd::claim::arm_doorbell(&db.client).await.unwrap();
    assert_eq!(db.scalar::<i64>(RINGS_SEEN).await, 3);
    outboxd::claim::close_doorbell_gate(&db.client)
        .await
        .unwrap();
    assert!(
        db.scalar::<bool>(ARMED).await && db.scalar::<bool>(GATE_OPEN).await,
        "no ring since the arm: the sleeper keeps its open gate"
    );
    listener
        .quiet("a close that does nothing notifies nobody")
        .await;

    // With the gate closed the trigger does not call the ring function at all.
    db.client
        .execute("SELECT setval('webhook_doorbell_gate', 1, true)", &[])
        .await
        .unwrap();
    let producer = producer_at(&db, "REPEATABLE READ").await;
    insert_event(&producer).await;
    producer.batch_execute("COMMIT").await.unwrap();
    assert_eq!(db.scalar::<i64>(RING).await, 3);
    listener.quiet("a closed gate does not ring").await;
}

/// While rings go unanswered (more than a thousand since a dispatcher last armed or
/// closed: none is running, or all died asleep), REPEATABLE READ and SERIALIZABLE
/// producers notify one at a time: one holding the advisory lock notifies, the others
/// rely on its commit. Once a dispatcher answers, each notifies again, even while
/// another holds the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_rings_fall_back_to_one_notifier_at_a_time() {
    const RING_LOCK: i64 = 8_026_380_636_457_233_767;
    let db = TestDb::new("rrunanswered").await;
    let mut listener = Listener::start(&db).await;
    outboxd::claim::arm_doorbell(&db.client).await.unwrap();
    assert_eq!(db.scalar::<i64>(RINGS_ANSWERED).await, 1);

    // Within the allowance, a producer notifies even while another holds the lock.
    let other = db.connect().await;
    other
        .execute("SELECT pg_advisory_lock($1)", &[&RING_LOCK])
        .await
        .unwrap();
    let producer = producer_at(&db, "REPEATABLE READ").await;
    insert_event(&producer).await;
    producer.batch_execute("COMMIT").await.unwrap();
    listener.notified("a ring within the allowance").await;
    other
        .execute("SELECT pg_advisory_unlock($1)", &[&RING_LOCK])
        .await
        .unwrap();

    // 5,000 rings nobody answered.
    db.client
        .execute("SELECT setval('webhook_doorbell_rings', 5000)", &[])
        .await
        .unwrap();
    let holder = producer_at(&db, "REPEATABLE READ").await;
    insert_event(&holder).await;
    let skipper = producer_at(&db, "SERIALIZABLE").await;
    insert_event(&skipper).await;
    skipper.batch_execute("COMMIT").await.unwrap();
    listener
        .quiet("the producer that found another notifying relies on it")
        .await;
    holder.batch_execute("COMMIT").await.unwrap();
    listener.notified("the producer holding the lock").await;
    let alone = producer_at(&db, "REPEATABLE READ").await;
    insert_event(&alone).await;
    alone.batch_execute("COMMIT").await.unwrap();
    listener.notified("a producer alone takes the lock").await;

    // A dispatcher answers (its close disarms the bell, and notifies), then arms: the
    // rings are answered, and producers notify each on its own again.
    outboxd::claim::close_doorbell_gate(&db.client)
        .await
        .unwrap();
    listener.notified("the close").await;
    outboxd::claim::arm_doorbell(&db.client).await.unwrap();
    assert_eq!(
        db.scalar::<i64>(RINGS_ANSWERED).await,
        db.scalar::<i64>(RING).await
    );
    other
        .execute("SELECT pg_advisory_lock($1)", &[&RING_LOCK])
        .await
        .unwrap();
    let producer = producer_at(&db, "SERIALIZABLE").await;
    insert_event(&producer).await;
    producer.batch_execute("COMMIT").await.unwrap();
    listener
        .notified("answered: within the allowance again")
        .await;
}

/// A close may disarm an armed bell only for a ring after the latest arm: an arm after
/// the ring records it, and the close leaves the gate open for that sleeper. The arm
/// and the close exclude each other through the bell's row in this case too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_never_shuts_out_an_arm_after_the_ring() {
    let db = TestDb::new("rrlatearm").await;
    let awake = db.connect().await;
    outboxd::claim::arm_doorbell(&db.client).await.unwrap();
    let producer = producer_at(&db, "REPEATABLE READ").await;
    insert_event(&producer).await;
    producer.batch_execute("COMMIT").await.unwrap();

    // Another dispatcher armed after the ring (it records the count): a late close by
    // the one the ring woke must leave it its gate.
    let sleeper = db.connect().await;
    outboxd::claim::arm_doorbell(&sleeper).await.unwrap();
    assert_eq!(db.scalar::<i64>(RINGS_SEEN).await, 2);
    outboxd::claim::close_doorbell_gate(&awake).await.unwrap();
    assert!(db.scalar::<bool>(ARMED).await && db.scalar::<bool>(GATE_OPEN).await);

    // A ring, then an arm that has not committed yet (it holds the bell's row): the
    // close neither waits for it nor closes.
    let producer = producer_at(&db, "SERIALIZABLE").await;
    insert_event(&producer).await;
    producer.batch_execute("COMMIT").await.unwrap();
    let mut sleeper = sleeper;
    let tx = sleeper.transaction().await.unwrap();
    outboxd::claim::arm_doorbell(&tx).await.unwrap();
    close_without_waiting(&awake).await;
    tx.commit().await.unwrap();
    assert!(db.scalar::<bool>(ARMED).await && db.scalar::<bool>(GATE_OPEN).await);
    assert_eq!(db.scalar::<i64>(RINGS_SEEN).await, 3);

    // A ring, and a close that has disarmed the bell but not committed: an arm waits for
    // it, then arms and reopens the gate the close shut.
    let producer = producer_at(&db, "REPEATABLE READ").await;
    insert_event(&producer).await;
    producer.batch_execute("COMMIT").await.unwrap();
    let mut closer = db.connect().await;
    let tx = closer.transaction().await.unwrap();
    outboxd::claim::close_doorbell_gate(&tx).await.unwrap();
    let late = db.connect().await;
    let arm = tokio::spawn(async move { outboxd::claim::arm_doorbell(&late).await });
    db.wait_until(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
            WHERE datname = current_database() AND pid <> pg_backend_pid()
              AND wait_event_type = 'Lock' AND query LIKE '%SET armed = true%')",
    )
    .await;
    tx.commit().await.unwrap();
    arm.await.unwrap().unwrap();
    assert!(
        db.scalar::<bool>(ARMED).await && db.scalar::<bool>(GATE_OPEN).await,
        "an arm that waited for a close reopens its gate"
    );
}

/// Only REPEATABLE READ producers, two push-only dispatchers asleep on the bell: every
/// event is pushed, including after a ring that rolled back (counted, never notified).
/// The dispatchers close the gate behind the rings and open it again to sleep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_isolated_producers_wake_every_sleeping_dispatcher() {
    let db = TestDb::new("rrfleet").await;
    let receiver = Receiver::start().await;
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let first = push_only(&db.url, "rrfleet_a");
    let second = push_only(&db.url, "rrfleet_b");
    let asleep = format!("SELECT ({ARMED}) AND ({GATE_OPEN})");
    let mut sent = 0;
    for round in 0..3 {
        db.wait_until(&asleep).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        db.wait_until(&asleep).await;
        let doomed = producer_at(&db, "REPEATABLE READ").await;
        insert_event(&doomed).await;
        doomed.batch_execute("ROLLBACK").await.unwrap();
        let isolation = if round % 2 == 0 {
            "REPEATABLE READ"
        } else {
            "SERIALIZABLE"
        };
        let producer = producer_at(&db, isolation).await;
        insert_event(&producer).await;
        producer.batch_execute("COMMIT").await.unwrap();
        sent += 1;
        receiver.wait_for(sent).await;
    }
    db.wait_all_in_state(sent as i64, "delivered").await;
    first.stop().await;
    second.stop().await;
    assert_eq!(receiver.count(), sent);
}

/// Every backend of the test database whose session outboxd opened (its pool and its
/// listener).
const OUTBOXD_BACKENDS: &str = "SELECT pid FROM pg_stat_activity
     WHERE application_name LIKE 'outboxd%' AND datname = current_database()";

/// Terminates every backend of the dispatcher, as a PostgreSQL restart or a network cut
/// would; returns how many there were.
async fn terminate_outboxd_backends(db: &TestDb) -> i64 {
    db.scalar(&format!(
        "SELECT count(pg_terminate_backend(pid)) FROM ({OUTBOXD_BACKENDS}) b"
    ))
    .await
}

/// Commits `n` events one by one, `every` apart, on a connection of its own.
fn produce(db: &TestDb, n: i32, every: Duration) -> tokio::task::JoinHandle<()> {
    let url = db.url.clone();
    tokio::spawn(async move {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("producer connection");
        tokio::spawn(connection);
        for i in 0..n {
            outboxd::enqueue(
                &client,
                &outboxd::NewEvent::new("order.created", &json!({ "i": i })),
            )
            .await
            .expect("enqueue");
            tokio::time::sleep(every).await;
        }
    })
}

/// After a connection loss the claim loop must arm the doorbell again before it sleeps:
/// with a poll tick an hour away, an unarmed bell means no later insert is delivered.
/// Every backend of the dispatcher is terminated, in turn while it sleeps and while
/// events keep arriving, and a producer commits while the listener is down (its ring is
/// lost: only the listener's reconnect can bring the claim loop to it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_survives_losing_every_connection() {
    let db = TestDb::new("pushloss").await;
    let receiver = Receiver::start().await;
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let dispatcher = push_only(&db.url, "pushloss");
    let listening = format!("SELECT count(*) = 1 FROM ({LISTENER_PIDS}) l");

    let mut sent = 0;
    for round in 0..6 {
        db.wait_until(&listening).await;
        db.wait_until(ARMED).await;
        if round % 2 == 0 {
            // Asleep on the bell: the fault, then an event while the listener is down.
            assert!(terminate_outboxd_backends(&db).await > 0);
            db.enqueue("order.created", &json!({ "round": round }))
                .await;
            sent += 1;
        } else {
            // Busy: events keep arriving through the fault.
            let producer = produce(&db, 20, Duration::from_millis(10));
            tokio::time::sleep(Duration::from_millis(60)).await;
            assert!(terminate_outboxd_backends(&db).await > 0);
            producer.await.unwrap();
            sent += 20;
        }
        db.wait_all_in_state(sent, "delivered").await;

        // The loop's view of the bell did not drift from the database's: it armed the
        // bell again before sleeping, so the next insert is pushed.
        db.wait_until(&listening).await;
        db.wait_until(ARMED).await;
        db.enqueue("order.paid", &json!({ "round": round })).await;
        sent += 1;
        db.wait_all_in_state(sent, "delivered").await;
    }
    dispatcher.stop().await;
}

/// An arm that fails is not an arm. Here it times out on the doorbell's row, which a
/// producer holds in an idle transaction: the claim loop must retry it, not sleep as if
/// the bell were armed, or nothing is pushed once the producer lets go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_arm_is_retried() {
    let db = TestDb::new("armfails").await;
    let receiver = Receiver::start().await;
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let mut producer = db.connect().await;
    let tx = producer.transaction().await.unwrap();
    tx.execute("SELECT * FROM webhook_doorbell FOR UPDATE", &[])
        .await
        .unwrap();

    let dispatcher = RunningDispatcher::start(
        &db.url,
        outboxd::Config {
            poll_interval: ONE_HOUR,
            db_lock_timeout: Duration::from_millis(100),
            ..test_config("armfails")
        },
    );
    db.wait_until(&format!("SELECT count(*) = 1 FROM ({LISTENER_PIDS}) l"))
        .await;
    // Long enough for arms to time out (the first one comes at once).
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(!db.scalar::<bool>(ARMED).await);
    tx.commit().await.unwrap();

    db.wait_until(ARMED).await;
    let event_id = db.enqueue("order.created", &json!({})).await;
    db.wait_all_in_state_within(1, "delivered", Duration::from_secs(10))
        .await;
    dispatcher.stop().await;
    let ids: Vec<i64> = receiver.requests().iter().map(|r| r.event_id()).collect();
    assert_eq!(ids, [event_id]);
}
