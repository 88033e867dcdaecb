//! The database going away under a running outboxd: the admin API answers a generic 500
//! (the detail goes to the log, never to the client) while it is away, `/readyz` says
//! the database is unreachable, and both serve again once it is back, without a
//! restart; the dispatcher delivers what was enqueued meanwhile.

use std::time::Duration;

use outboxd::admin::AdminState;
use reqwest::StatusCode;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::harness::{
    Receiver, Spawned, TestDb, WAIT, admin_url, eventually, outboxd_command, sigterm, unique,
};

const TOKEN: &str = "outage-admin-token-0123456789abcdef";

/// Stops new sessions to `db` and ends the ones it has, as a failover or a restart does.
async fn take_away(db: &TestDb) {
    let admin = outboxd::db::connect(&admin_url()).await.expect("connect");
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {0} ALLOW_CONNECTIONS false;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{0}';",
            db.name
        ))
        .await
        .expect("take the database away");
}

async fn bring_back(db: &TestDb) {
    let admin = outboxd::db::connect(&admin_url()).await.expect("connect");
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS true",
            db.name
        ))
        .await
        .expect("bring the database back");
}

async fn call(http: &reqwest::Client, method: reqwest::Method, url: &str) -> (StatusCode, Value) {
    let response = http
        .request(method, url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("the admin API answers");
    let status = response.status();
    let text = response.text().await.expect("read the answer");
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_answers_500_while_the_database_is_away_and_recovers() {
    let db = TestDb::new("outage_admin").await;
    let (id, _) = db
        .add_endpoint("http://127.0.0.1:9/hook", &["order.created"])
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    let state = AdminState::new(db.pool().await, TOKEN, Duration::from_secs(60));
    let stop = CancellationToken::new();
    let server = tokio::spawn(outboxd::admin::serve(listener, state, stop.clone()));
    let http = reqwest::Client::new();
    let endpoints = format!("{base}/v1/endpoints");
    let (status, body) = call(&http, reqwest::Method::GET, &endpoints).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    take_away(&db).await;
    // The pooled sessions are gone (the transaction cannot begin, the query fails), then
    // no new one can be opened (the pool gives up after its bound): each is a 500 that
    // says where to look, and nothing of the database's own message.
    for (method, url) in [
        (reqwest::Method::DELETE, format!("{endpoints}/{id}")),
        (reqwest::Method::GET, endpoints.clone()),
        (reqwest::Method::GET, endpoints.clone()),
    ] {
        let (status, body) = call(&http, method.clone(), &url).await;
        assert_eq!(
            status,
            StatusCode::INTERNAL_SERVER_ERROR,
            "{method} {url}: {body}"
        );
        assert_eq!(body["error"]["code"], "internal", "{body}");
        assert_eq!(
            body["error"]["message"], "internal error; the server log has the details",
            "{body}"
        );
    }

    bring_back(&db).await;
    eventually("the admin API serves again", WAIT, || async {
        call(&http, reqwest::Method::GET, &endpoints).await.0 == StatusCode::OK
    })
    .await;
    // Nothing was lost: the DELETE that failed deleted nothing.
    let (status, body) = call(&http, reqwest::Method::GET, &format!("{endpoints}/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    stop.cancel();
    server
        .await
        .expect("join")
        .expect("the server stops cleanly");
}

/// `/readyz`'s status and body.
async fn readyz(http: &reqwest::Client, url: &str) -> Option<(u16, String)> {
    let response = http.get(url).send().await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.unwrap_or_default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_database_away_and_back_and_nothing_is_lost() {
    let db = TestDb::new("outage_ready").await;
    let receiver = Receiver::start().await;
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut command = outboxd_command();
    command
        .arg("run")
        .env("DATABASE_URL", &db.url)
        .env("METRICS_ADDR", metrics_port.to_string())
        .env("WEBHOOK_ALLOW_PRIVATE_TARGETS", "true")
        .env("WEBHOOK_POLL_INTERVAL_MS", "200")
        .env("WEBHOOK_WORKER_ID", unique("outage"));
    let outboxd = Spawned::start(command);
    let url = format!("http://127.0.0.1:{metrics_port}/readyz");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("an HTTP client");
    eventually("ready", WAIT, || async {
        readyz(&http, &url).await.is_some_and(|(s, _)| s == 200)
    })
    .await;

    take_away(&db).await;
    eventually("/readyz says the database is unreachable", WAIT, || async {
        readyz(&http, &url)
            .await
            .is_some_and(|(s, body)| s == 503 && body.contains("database unreachable"))
    })
    .await;

    // Longer than the pool's bound on opening a session: the claim loop's pool gives
    // up, says so, and keeps trying.
    outboxd.wait_for_stderr("database pool error").await;
    assert!(
        readyz(&http, &url).await.is_some_and(|(s, _)| s == 503),
        "not ready while the database is away"
    );

    bring_back(&db).await;
    eventually("ready again", WAIT, || async {
        readyz(&http, &url).await.is_some_and(|(s, _)| s == 200)
    })
    .await;
    // The dispatcher reconnected too: an event enqueued now is delivered.
    let producer = outboxd::db::connect(&db.url).await.expect("connect");
    outboxd::enqueue(
        &producer,
        &outboxd::NewEvent::new("order.created", &serde_json::json!({"n": 1})),
    )
    .await
    .expect("enqueue")
    .expect("a new event");
    receiver.wait_for(1).await;
    // (The test's own session to the database was ended with the others.)
    eventually("the delivery is recorded", WAIT, || async {
        producer
            .query_one(
                "SELECT count(*) = 1 FROM webhook_deliveries WHERE state = 'delivered'",
                &[],
            )
            .await
            .is_ok_and(|r| r.get::<_, bool>(0))
    })
    .await;
    sigterm(outboxd.pid());
    let finished = outboxd.finish(Duration::from_secs(60)).await;
    assert_eq!(finished.code, Some(0), "{}", finished.stderr);
}
