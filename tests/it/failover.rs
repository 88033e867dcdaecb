//! Managed databases fail over: a replica is refused at start by name, the same
//! dispatcher process follows a failover to the new primary, and a pooled session that
//! finds its server read-only is dropped, not reused forever.
//!
//! These tests start clusters of their own ([`Cluster`]): a primary, and a hot standby
//! made from it with `pg_basebackup -R`.

use std::time::Duration;

use tokio_postgres::NoTls;

use crate::cluster::{Cluster, ClusterSpec};
use crate::harness::{Receiver, RunningDispatcher, TestDb, eventually, test_config};

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    tokio::spawn(connection);
    client
}

/// A database `outboxd` on `cluster`, migrated, with one endpoint at `receiver`.
async fn prepare(cluster: &Cluster, receiver: &Receiver) -> tokio_postgres::Client {
    let admin = connect(&cluster.url("postgres")).await;
    admin
        .batch_execute("CREATE DATABASE outboxd")
        .await
        .expect("create the database");
    let mut client = connect(&cluster.url("outboxd")).await;
    outboxd::schema::migrate(&mut client)
        .await
        .expect("migrate");
    outboxd::endpoint::add(
        &client,
        outboxd::NewEndpoint {
            url: receiver.url("/hook"),
            event_types: vec![],
            secret: None,
            description: "failover".to_owned(),
            ..Default::default()
        },
    )
    .await
    .expect("register the endpoint");
    client
}

async fn enqueue(client: &tokio_postgres::Client, n: i32) {
    outboxd::enqueue(
        client,
        &outboxd::NewEvent::new("order.created", &serde_json::json!({ "n": n })),
    )
    .await
    .expect("enqueue");
}

/// Waits until `standby` has replayed everything `primary` has written so far.
async fn caught_up(primary: &tokio_postgres::Client, standby: &tokio_postgres::Client) {
    let lsn: String = primary
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("primary LSN")
        .get(0);
    eventually("the standby caught up", Duration::from_secs(30), || async {
        standby
            .query_one(
                "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                &[&lsn],
            )
            .await
            .is_ok_and(|row| row.get::<_, bool>(0))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_is_refused_at_start_by_name() {
    let receiver = Receiver::start().await;
    let primary = Cluster::start(&ClusterSpec::plain());
    let primary_client = prepare(&primary, &receiver).await;
    let standby = Cluster::standby_of(&primary);
    caught_up(&primary_client, &connect(&standby.url("outboxd")).await).await;

    let dispatcher = outboxd::Dispatcher::new(standby.url("outboxd"), test_config("standby"))
        .expect("valid config");
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        dispatcher.run(tokio_util::sync::CancellationToken::new()),
    )
    .await
    .expect("refused at start, not left running")
    .expect_err("a standby cannot record outcomes");
    let message = err.to_string();
    assert!(
        matches!(err, outboxd::Error::ReadOnlyDatabase(_)),
        "{message}"
    );
    assert!(message.contains("standby"), "{message}");
    assert!(
        message.contains("target_session_attrs=read-write"),
        "{message}"
    );
}

#[tokio::test]
async fn read_only_sessions_are_refused_at_start_by_name() {
    let db = TestDb::new("readonlydb").await;
    db.client
        .batch_execute(&format!(
            "ALTER DATABASE {} SET default_transaction_read_only = on",
            db.name
        ))
        .await
        .expect("make the database read-only by default");
    let dispatcher =
        outboxd::Dispatcher::new(db.url.clone(), test_config("readonly")).expect("valid config");
    let err = dispatcher
        .run(tokio_util::sync::CancellationToken::new())
        .await
        .expect_err("read-only sessions cannot record outcomes");
    let message = err.to_string();
    assert!(
        matches!(err, outboxd::Error::ReadOnlyDatabase(_)),
        "{message}"
    );
    assert!(
        message.contains("default_transaction_read_only"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_dispatcher_delivers_on_the_new_primary_after_a_failover() {
    let receiver = Receiver::start().await;
    let primary = Cluster::start(&ClusterSpec::plain());
    let primary_client = prepare(&primary, &receiver).await;
    let standby = Cluster::standby_of(&primary);

    // Both hosts, the primary first; only a writable one is taken.
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/outboxd?target_session_attrs=read-write",
        primary.port, standby.port
    );
    let dispatcher = RunningDispatcher::start(&url, test_config("failover"));
    enqueue(&primary_client, 1).await;
    receiver.wait_for(1).await;
    let standby_client = connect(&standby.url("outboxd")).await;
    caught_up(&primary_client, &standby_client).await;

    primary.kill();
    drop(primary_client);
    standby.promote();
    let new_primary = connect(&standby.url("outboxd")).await;
    for n in 2..=4 {
        enqueue(&new_primary, n).await;
    }
    // The pool's and the LISTEN session's connections to the old primary broke; their
    // replacements, and the claims, go to the new one.
    let failed_over = std::time::Instant::now();
    receiver.wait_for_within(4, Duration::from_secs(60)).await;
    eprintln!(
        "delivered on the new primary after {:?}",
        failed_over.elapsed()
    );
    eventually(
        "the outcomes are written on the new primary",
        Duration::from_secs(60),
        || async {
            new_primary
                .query_one(
                    "SELECT count(*) >= 3 FROM webhook_deliveries WHERE state = 'delivered'",
                    &[],
                )
                .await
                .is_ok_and(|row| row.get::<_, bool>(0))
        },
    )
    .await;
    eprintln!(
        "settled on the new primary after {:?}",
        failed_over.elapsed()
    );
    dispatcher.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_finds_its_server_read_only_is_dropped() {
    // Two primaries; the dispatcher starts on the first. Fencing it (read-only by
    // default, reloaded: sessions already open turn read-only too, as some failover
    // tools do to an old primary) must send the dispatcher to the second.
    let receiver = Receiver::start().await;
    let fenced = Cluster::start(&ClusterSpec::plain());
    let fenced_client = prepare(&fenced, &receiver).await;
    let other = Cluster::start(&ClusterSpec::plain());
    let other_client = prepare(&other, &receiver).await;
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/outboxd?target_session_attrs=read-write",
        fenced.port, other.port
    );
    let dispatcher = RunningDispatcher::start(
        &url,
        outboxd::Config {
            listen: false,
            ..test_config("fence")
        },
    );
    enqueue(&fenced_client, 1).await;
    receiver.wait_for(1).await;

    for statement in [
        "ALTER SYSTEM SET default_transaction_read_only = on",
        "SELECT pg_reload_conf()",
    ] {
        fenced_client
            .batch_execute(statement)
            .await
            .expect("fence the first server");
    }
    enqueue(&other_client, 2).await;
    receiver.wait_for_within(2, Duration::from_secs(30)).await;
    dispatcher.stop().await;
}
