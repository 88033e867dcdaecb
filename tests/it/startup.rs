//! Start-up order, with the real binary: `outboxd run` started before its PostgreSQL
//! waits for it, says so on `/readyz` (503, then 200), and delivers once it is up; a
//! zero `WEBHOOK_DATABASE_WAIT_MS` fails fast instead, and an invalid one is named.

use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

use crate::cluster::{Cluster, ClusterSpec};
use crate::harness::{Receiver, Spawned, outboxd_command, run_to_end, unique};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Polls `url` until it answers `status`; returns the body.
async fn wait_for_status(url: &str, status: u16, outboxd: &Spawned) -> String {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("an HTTP client");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(response) = http.get(url).send().await {
            if response.status().as_u16() == status {
                return response.text().await.unwrap_or_default();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{url} did not answer {status} within 60 s; stderr:\n{}",
            outboxd.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_started_before_postgres_delivers_once_it_is_up() {
    let receiver = Receiver::start().await;
    // Ready the database, with an event waiting, then stop the server.
    let cluster = Cluster::start(&ClusterSpec::plain());
    {
        let (mut client, connection) = tokio_postgres::connect(&cluster.url("postgres"), NoTls)
            .await
            .expect("connect");
        tokio::spawn(connection);
        outboxd::schema::migrate(&mut client)
            .await
            .expect("migrate");
        outboxd::endpoint::add(
            &client,
            outboxd::NewEndpoint {
                url: receiver.url("/hook"),
                event_types: vec![],
                secret: None,
                description: "late".to_owned(),
                ..Default::default()
            },
        )
        .await
        .expect("register the endpoint");
        outboxd::enqueue(
            &client,
            &outboxd::NewEvent::new("order.created", &serde_json::json!({"n": 1})),
        )
        .await
        .expect("enqueue");
    }
    cluster.kill();

    let metrics_port = free_port();
    let mut command = outboxd_command();
    command
        .arg("run")
        .env("DATABASE_URL", cluster.url("postgres"))
        .env("METRICS_ADDR", metrics_port.to_string())
        .env("WEBHOOK_ALLOW_PRIVATE_TARGETS", "true")
        .env("WEBHOOK_POLL_INTERVAL_MS", "100")
        .env("WEBHOOK_WORKER_ID", unique("late"));
    let outboxd = Spawned::start(command);
    let readyz = format!("http://127.0.0.1:{metrics_port}/readyz");
    let body = wait_for_status(&readyz, 503, &outboxd).await;
    assert!(body.contains("waiting for the database"), "{body}");
    outboxd
        .wait_for_stderr("waiting for the database to accept connections")
        .await;
    assert_eq!(receiver.count(), 0);

    cluster.restart();
    let deadline = Instant::now() + Duration::from_secs(60);
    while receiver.count() == 0 {
        assert!(
            Instant::now() < deadline,
            "nothing delivered within 60 s of the start; stderr:\n{}",
            outboxd.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for_status(&readyz, 200, &outboxd).await;
    crate::harness::sigterm(outboxd.pid());
    let finished = outboxd.finish(Duration::from_secs(60)).await;
    assert_eq!(finished.code, Some(0), "{}", finished.stderr);
}

#[tokio::test]
async fn a_zero_wait_fails_fast_and_a_bad_one_is_named() {
    // Nothing listens on this port.
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", free_port());
    let mut command = outboxd_command();
    command
        .arg("run")
        .env("DATABASE_URL", &url)
        .env("WEBHOOK_DATABASE_WAIT_MS", "0");
    let finished = run_to_end(command).await;
    assert_eq!(finished.code, Some(1), "{}", finished.stderr);
    assert!(
        finished.stderr.contains("WEBHOOK_DATABASE_WAIT_MS"),
        "{}",
        finished.stderr
    );

    let mut command = outboxd_command();
    command
        .arg("run")
        .env("DATABASE_URL", &url)
        .env("WEBHOOK_DATABASE_WAIT_MS", "90000000");
    let finished = run_to_end(command).await;
    assert_eq!(finished.code, Some(2), "{}", finished.stderr);
    assert!(
        finished.stderr.contains("invalid WEBHOOK_DATABASE_WAIT_MS"),
        "{}",
        finished.stderr
    );
}
