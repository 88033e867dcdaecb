//! The quickstart's consumer (`demo-receiver`) as a process: it accepts what outboxd
//! signs, refuses what it should, says why, and stops on Ctrl-C.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outboxd::sign::{Secret, signature_header};

use crate::harness::{
    RunningDispatcher, Spawned, TestDb, WAIT, eventually, package_binary, run_to_end, test_config,
};

fn demo_receiver() -> tokio::process::Command {
    package_binary(env!("CARGO_BIN_EXE_demo-receiver"))
}

/// Sends SIGINT (what Ctrl-C sends) to `pid`.
fn sigint(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -INT {pid} failed");
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_receiver_verifies_what_outboxd_sends_and_refuses_the_rest() {
    let db = TestDb::new("demo_receiver").await;
    let secret = Secret::generate();
    let mut command = demo_receiver();
    command
        .env("DEMO_RECEIVER_ADDR", "127.0.0.1:0")
        .env("DEMO_RECEIVER_SECRET", &secret);
    let receiver = Spawned::start(command);
    // It takes a free port and says which: one picked here and released could be taken
    // by anything else before it bound it.
    let mut url = String::new();
    eventually("demo-receiver says where it listens", WAIT, || {
        let stdout = receiver.stdout();
        let said = stdout
            .lines()
            .find_map(|l| l.strip_prefix("demo-receiver: listening on "))
            .map(str::to_owned);
        if let Some(said) = &said {
            url.clone_from(said);
        }
        async move { said.is_some() }
    })
    .await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("an HTTP client");
    eventually("demo-receiver listens", WAIT, || async {
        http.post(&url).send().await.is_ok()
    })
    .await;

    // The quickstart: an endpoint with the receiver's secret, an event, a dispatcher.
    db.client
        .execute(
            "INSERT INTO webhook_endpoints (url, secret) VALUES ($1, $2)",
            &[&url, &secret],
        )
        .await
        .unwrap();
    let dispatcher = RunningDispatcher::start(&db.url, test_config("demo_receiver"));
    let event = db
        .enqueue("order.created", &serde_json::json!({"order_id": 7}))
        .await;
    db.wait_all_in_state(1, "delivered").await;
    dispatcher.stop().await;

    // What it refuses, and the status it answers with.
    let body = br#"{"forged":true}"#;
    let signer = Secret::parse(&secret).expect("a valid secret");
    let other = Secret::parse(&Secret::generate()).expect("a valid secret");
    let cases: [(&str, Option<i64>, &Secret, u16); 3] = [
        ("msg_no_timestamp", None, &signer, 400),
        ("msg_stale", Some(now() - 3_600), &signer, 400),
        ("msg_forged", Some(now()), &other, 401),
    ];
    for (id, timestamp, key, expected) in cases {
        let mut request = http.post(&url).header("webhook-id", id).body(&body[..]);
        if let Some(ts) = timestamp {
            request = request.header("webhook-timestamp", ts.to_string()).header(
                "webhook-signature",
                signature_header(std::slice::from_ref(key), id, ts, body),
            );
        }
        let status = request.send().await.expect("an answer").status().as_u16();
        assert_eq!(status, expected, "{id}");
    }
    // Signed correctly by hand: accepted, 204.
    let ts = now();
    let status = http
        .post(&url)
        .header("webhook-id", "msg_by_hand")
        .header("webhook-timestamp", ts.to_string())
        .header(
            "webhook-signature",
            signature_header(std::slice::from_ref(&signer), "msg_by_hand", ts, body),
        )
        .body(&body[..])
        .send()
        .await
        .expect("an answer")
        .status()
        .as_u16();
    assert_eq!(status, 204);

    sigint(receiver.pid());
    let finished = receiver.finish(Duration::from_secs(30)).await;
    assert_eq!(
        finished.code,
        Some(0),
        "Ctrl-C stops it cleanly: {finished:?}"
    );
    let out = &finished.stdout;
    assert!(
        url.starts_with("http://127.0.0.1:") && !url.starts_with("http://127.0.0.1:0/"),
        "it names the port it bound, not the one asked for: {out}"
    );
    let outboxd_id = format!("verified webhook-id {event}: ");
    assert!(
        out.lines()
            .any(|l| l.contains(&outboxd_id) && l.contains("order.created")),
        "the delivery from outboxd is verified and printed: {out}"
    );
    for line in [
        "rejected a request without a valid webhook-timestamp",
        "rejected webhook-id msg_stale: timestamp too far from now",
        "rejected webhook-id msg_forged: bad signature",
        "verified webhook-id msg_by_hand",
    ] {
        assert!(out.contains(line), "{line:?} in {out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_receiver_needs_a_valid_secret() {
    let missing = run_to_end(demo_receiver()).await;
    assert_ne!(missing.code, Some(0), "{missing:?}");
    assert!(
        missing.stderr.contains("DEMO_RECEIVER_SECRET is not set"),
        "{missing:?}"
    );

    let mut command = demo_receiver();
    command.env("DEMO_RECEIVER_SECRET", "not-a-secret");
    let invalid = run_to_end(command).await;
    assert_ne!(invalid.code, Some(0), "{invalid:?}");
    assert!(
        invalid.stderr.contains("invalid DEMO_RECEIVER_SECRET"),
        "{invalid:?}"
    );
    assert!(
        !invalid.stderr.contains("not-a-secret"),
        "the secret is not echoed: {invalid:?}"
    );
}
