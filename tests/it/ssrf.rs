//! The SSRF guard, end to end: internal targets are never contacted.

use std::time::Duration;

use serde_json::json;

use crate::harness::{
    Receiver, Reply, RunningDispatcher, Spawned, TestDb, outboxd_command, sigterm, test_config,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_targets_are_refused() {
    let db = TestDb::new("ssrf").await;
    let receiver = Receiver::start().await;
    let port = receiver.port();
    // The two the brief names, then spellings that reach the same loopback listener or
    // would on a looser guard: 0.0.0.0 connects to the local host on Linux, an
    // IPv4-mapped IPv6 literal reaches the IPv4 listener, the URL parser turns the
    // decimal and short forms into 127.0.0.1. Last, IPv6 forms that a translator on the
    // path would forward into the local network: IPv4-translated (SIIT) and the local-use
    // NAT64 prefix, which are refused before any connection is tried.
    let hosts = [
        "127.0.0.1",
        "localhost",
        "0.0.0.0",
        "[::ffff:127.0.0.1]",
        "[::1]",
        "2130706433",
        "127.1",
        "[::ffff:0:7f00:1]",
        "[64:ff9b:1::7f00:1]",
        "[64:ff9b:1::808:808]",
    ];
    let mut endpoints = Vec::new();
    for host in hosts {
        let url = format!("http://{host}:{port}/hook");
        let (id, _) = db.add_endpoint(&url, &[]).await;
        endpoints.push((id, url));
    }
    let dispatcher = RunningDispatcher::start(
        &db.url,
        outboxd::Config {
            allow_private_targets: false,
            ..test_config("ssrf")
        },
    );
    let event_id = db.enqueue("order.created", &json!({"n": 1})).await;

    let total = endpoints.len();
    db.wait_until(&format!(
        "SELECT count(*) = {total} AND bool_and(state <> 'pending') FROM webhook_deliveries"
    ))
    .await;
    dispatcher.stop().await;

    assert_eq!(receiver.count(), 0, "{:?}", receiver.requests());
    let attempts = db.attempts().await;
    for (endpoint_id, url) in &endpoints {
        let d = db.delivery(event_id, *endpoint_id).await;
        assert_eq!(d.state, "dead", "{url}: {d:?}");
        assert_eq!(
            d.attempts, 1,
            "{url}: a refused target is not retried: {d:?}"
        );
        let mine: Vec<_> = attempts
            .iter()
            .filter(|a| a.endpoint_id == *endpoint_id)
            .collect();
        assert_eq!(mine.len(), 1, "{url}: {mine:?}");
        assert_eq!(
            mine[0].error_kind.as_deref(),
            Some("refused_target"),
            "{url}: {mine:?}"
        );
        assert_eq!(mine[0].status_code, None, "{url}");
    }
}

/// Proxies from the environment are ignored (a proxy would connect on our behalf and
/// bypass the address guard), and nothing sensitive reaches the logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_ignores_env_proxies_and_keeps_secrets_out_of_logs() {
    let db = TestDb::new("proxy").await;
    let proxy = Receiver::start().await;
    let target = Receiver::start().await;
    target.always("/hook", Reply::ok().body("response-marker-b81f"));
    let (_, secret) = db.add_endpoint(&target.url("/hook"), &[]).await;
    db.enqueue("order.created", &json!({"marker": "payload-marker-4c2e"}))
        .await;

    let mut command = outboxd_command();
    command
        .arg("run")
        .env("DATABASE_URL", &db.url)
        .env("WEBHOOK_ALLOW_PRIVATE_TARGETS", "true")
        .env("WEBHOOK_POLL_INTERVAL_MS", "100");
    for var in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        command.env(var, proxy.url(""));
    }
    let outboxd = Spawned::start(command);
    db.wait_all_in_state(1, "delivered").await;
    sigterm(outboxd.pid());
    let finished = outboxd.finish(Duration::from_secs(60)).await;
    assert_eq!(finished.code, Some(0), "{}", finished.stderr);

    assert_eq!(
        proxy.count(),
        0,
        "the request went through the environment's proxy"
    );
    assert_eq!(target.count_to("/hook"), 1);
    let signature = target.requests()[0].header("webhook-signature").to_owned();
    let key = secret.trim_start_matches("whsec_");
    for (what, needle) in [
        ("the secret", key),
        ("the signature", signature.trim_start_matches("v1,")),
        ("the payload", "payload-marker-4c2e"),
        ("the response body", "response-marker-b81f"),
        ("the endpoint URL", &target.url("/hook")),
        (
            "the endpoint's address",
            &format!("127.0.0.1:{}", target.port()),
        ),
    ] {
        assert!(
            !finished.stderr.contains(needle) && !finished.stdout.contains(needle),
            "{what} appears in the logs:\n{}",
            finished.stderr
        );
    }
}

/// Every type that holds a secret, a payload, a receiver's answer or an endpoint URL
/// prints ids and sizes in its `Debug` output, never those contents: a `{:?}` in a log
/// line must not leak them. The values come from a real claim and a real attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_output_shows_no_secret_payload_or_answer() {
    let db = TestDb::new("debug_redaction").await;
    let receiver = Receiver::start().await;
    receiver.always("/hook", Reply::ok().body("response-marker-77d1"));
    let url = receiver.url("/hook?token=url-marker-0c3a");
    let (endpoint_id, secret) = db.add_endpoint(&url, &[]).await;
    let payload = json!({"marker": "payload-marker-5e9b"});
    let event_id = db.enqueue("order.created", &payload).await;
    // Rotate, so the claim carries a previous secret as well.
    let client = db.connect().await;
    let new_secret = outboxd::endpoint::rotate_secret(
        &client,
        endpoint_id,
        Some("whsec_QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3".to_owned()),
        Duration::from_secs(3600),
    )
    .await
    .expect("rotate");
    let key = |s: &str| s.trim_start_matches("whsec_").to_owned();
    let needles = [
        ("the secret", key(&secret)),
        ("the new secret", key(&new_secret)),
        ("the payload", "payload-marker-5e9b".to_owned()),
        ("the response body", "response-marker-77d1".to_owned()),
        ("the endpoint URL", "url-marker-0c3a".to_owned()),
    ];

    let claimed = outboxd::claim::claim(&client, "debug-test", Duration::from_secs(60), 10)
        .await
        .expect("claim");
    let Some(outboxd::claim::Claimed::Send(delivery)) = claimed.first() else {
        panic!("nothing to send: {claimed:?}");
    };
    assert!(delivery.previous_secret.is_some(), "{delivery:?}");
    let sender = outboxd::deliver::Sender::new(&test_config("debug_redaction")).expect("sender");
    let attempt = sender.send(delivery).await;
    assert!(
        matches!(&attempt.result, outboxd::deliver::AttemptResult::Response { excerpt, .. }
            if excerpt.contains("response-marker-77d1")),
        "the receiver answered"
    );
    let outcome = outboxd::settle::Outcome {
        event_id,
        endpoint_id,
        attempt: delivery.attempt,
        next: outboxd::settle::Next::Verdict(outboxd::retry::Verdict::Delivered),
        record: Some(attempt.clone()),
        ordered: false,
    };
    let event = outboxd::inspect::get_event(&client, event_id)
        .await
        .expect("the event");
    assert_eq!(event.payload, payload);
    let attempt_view = outboxd::inspect::AttemptView {
        attempt: 1,
        started_at: std::time::SystemTime::now(),
        duration_ms: 1,
        status_code: Some(200),
        error_kind: None,
        error: None,
        response_excerpt: Some("response-marker-77d1".to_owned()),
        worker_id: "w".to_owned(),
    };
    let new_event = outboxd::NewEvent::new("order.created", &payload);
    let new_endpoint = outboxd::NewEndpoint {
        url: url.clone(),
        event_types: vec![],
        secret: Some(secret.clone()),
        description: String::new(),
        ..Default::default()
    };
    let admin = outboxd::admin::AdminState::new(db.pool().await, secret.clone(), Duration::ZERO);

    let shown = [
        format!("{claimed:?}"),
        format!("{delivery:#?}"),
        format!("{attempt:?}"),
        format!("{outcome:#?}"),
        format!("{sender:?}"),
        format!("{event:?}"),
        format!("{attempt_view:?}"),
        format!("{new_event:?}"),
        format!("{new_endpoint:?}"),
        format!("{admin:?}"),
    ];
    for text in &shown {
        for (what, needle) in &needles {
            assert!(!text.contains(needle.as_str()), "{what} is shown: {text}");
        }
    }
    // What is shown is still useful: the ids.
    assert!(
        shown[1].contains(&format!("event_id: {event_id}")),
        "{}",
        shown[1]
    );
}
