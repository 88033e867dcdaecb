//! Start-up order, with the real binary: `outboxd run` started before its PostgreSQL
//! waits for it, says so on `/readyz` (503, then 200), and delivers once it is up; so it
//! does for a role at its connection limit. A zero `WEBHOOK_DATABASE_WAIT_MS` fails fast
//! instead, an invalid one is named, and an error waiting cannot cure (an unknown
//! database, an unreadable root certificate) ends the start at once.

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

    let mut command = outboxd_command();
    command
        .arg("run")
        .env("DATABASE_URL", cluster.url("postgres"))
        .env("METRICS_ADDR", "0")
        .env("WEBHOOK_ALLOW_PRIVATE_TARGETS", "true")
        .env("WEBHOOK_POLL_INTERVAL_MS", "100")
        .env("WEBHOOK_WORKER_ID", unique("late"));
    let outboxd = Spawned::start(command);
    let metrics_port = outboxd.served_port("serving /metrics").await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_waiting_cannot_cure_ends_the_start_at_once() {
    let db = crate::harness::TestDb::new("start_final").await;
    let missing = db.url.replace(&db.name, &format!("{}_missing", db.name));
    // A long wait is allowed, but an unknown database (the server's answer to this
    // login) or an unreadable root certificate will not change by waiting.
    for (url, code, says) in [
        (missing, 1, "does not exist"),
        (
            format!(
                "{}?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem",
                db.url
            ),
            2,
            "sslrootcert",
        ),
    ] {
        let started = Instant::now();
        let mut command = outboxd_command();
        command
            .arg("run")
            .env("DATABASE_URL", &url)
            .env("WEBHOOK_DATABASE_WAIT_MS", "600000");
        let finished = run_to_end(command).await;
        assert_eq!(finished.code, Some(code), "{url}: {}", finished.stderr);
        assert!(finished.stderr.contains(says), "{url}: {}", finished.stderr);
        assert!(
            !finished
                .stderr
                .contains("waiting for the database to accept connections"),
            "no wait for {url}: {}",
            finished.stderr
        );
        assert!(started.elapsed() < Duration::from_secs(60));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_at_its_connection_limit_is_waited_for() {
    let db = crate::harness::TestDb::new("start_limit").await;
    if !db.may_create_roles().await {
        eprintln!("skipped: the test user may not create roles");
        return;
    }
    // Superusers ignore connection limits: the dispatcher logs in as a plain role with
    // the rights it needs, and a limit of 0 sessions, as when its slots are all taken.
    let role = unique("limited").to_lowercase();
    db.client
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN CONNECTION LIMIT 0;
             GRANT ALL ON ALL TABLES IN SCHEMA public TO {role};
             GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role};
             GRANT ALL ON ALL FUNCTIONS IN SCHEMA public TO {role};"
        ))
        .await
        .expect("create the role");
    let mut url = url::Url::parse(&db.url).expect("the test URL is a URL");
    url.set_username(&role).expect("user");
    url.set_password(None).expect("no password");

    let mut command = outboxd_command();
    command
        .arg("run")
        .env("DATABASE_URL", url.as_str())
        .env("METRICS_ADDR", "0")
        .env("WEBHOOK_DATABASE_WAIT_MS", "600000")
        .env("WEBHOOK_WORKER_ID", unique("limited"));
    let outboxd = Spawned::start(command);
    let metrics_port = outboxd.served_port("serving /metrics").await;
    let readyz = format!("http://127.0.0.1:{metrics_port}/readyz");
    let body = wait_for_status(&readyz, 503, &outboxd).await;
    assert!(body.contains("waiting for the database"), "{body}");
    outboxd.wait_for_stderr("too many connections").await;

    db.client
        .batch_execute(&format!("ALTER ROLE {role} CONNECTION LIMIT -1"))
        .await
        .expect("lift the limit");
    wait_for_status(&readyz, 200, &outboxd).await;
    outboxd
        .wait_for_stderr("the database accepts connections")
        .await;
    crate::harness::sigterm(outboxd.pid());
    let finished = outboxd.finish(Duration::from_secs(60)).await;
    assert_eq!(finished.code, Some(0), "{}", finished.stderr);
    db.client
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await
        .expect("drop the role");
}
