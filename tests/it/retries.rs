//! What an answer means: retry with backoff, give up, honour Retry-After.

use std::time::Duration;

use serde_json::json;

use crate::harness::{Receiver, Reply, RunningDispatcher, TestDb, test_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_error_is_retried_then_delivered() {
    let db = TestDb::new("retry500").await;
    let receiver = Receiver::start().await;
    receiver.sequence("/hook", vec![Reply::status(500), Reply::ok()]);
    let (endpoint_id, secret) = db.add_endpoint(&receiver.url("/hook"), &[]).await;
    // A long first backoff (2.4 to 3 s with jitter and the cap) leaves time to look at
    // the row between the two attempts.
    let base = Duration::from_millis(3_000);
    let dispatcher = RunningDispatcher::start(
        &db.url,
        outboxd::Config {
            backoff_base: base,
            backoff_max: base,
            ..test_config("retry500")
        },
    );
    let event_id = db.enqueue("order.created", &json!({"n": 1})).await;

    // After the first attempt is settled: pending, one attempt, 500, due later.
    // (The attempt row is written by the statement that settles the delivery.)
    db.wait_until("SELECT count(*) >= 1 FROM webhook_attempts")
        .await;
    let d = db.delivery(event_id, endpoint_id).await;
    let first = db.attempts().await.remove(0);
    assert_eq!(d.state, "pending", "{d:?}");
    assert_eq!(d.attempts, 1, "{d:?}");
    assert_eq!(d.last_status, Some(500), "{d:?}");
    assert!(d.last_error.is_some(), "{d:?}");
    assert_eq!(first.status_code, Some(500));
    assert_eq!(first.error_kind.as_deref(), Some("http_status"));
    assert!(
        d.next_attempt_at > first.started_at,
        "next_attempt_at {:?} must be later than the attempt's start {:?}",
        d.next_attempt_at,
        first.started_at
    );
    // At least the jittered first backoff (-20%), minus a little clock slack.
    let gap = d
        .next_attempt_at
        .duration_since(first.started_at)
        .unwrap_or_default();
    assert!(
        gap >= base.mul_f64(0.8) - Duration::from_millis(100),
        "{gap:?}"
    );
    assert_eq!(receiver.count(), 1, "the retry must wait for its backoff");

    db.wait_all_in_state(1, "delivered").await;
    dispatcher.stop().await;
    let d = db.delivery(event_id, endpoint_id).await;
    assert_eq!(d.attempts, 2);
    assert_eq!(d.last_status, Some(200));
    let attempts = db.attempts().await;
    let numbers: Vec<(i32, Option<i32>)> = attempts
        .iter()
        .map(|a| (a.attempt, a.status_code))
        .collect();
    assert_eq!(numbers, [(1, Some(500)), (2, Some(200))]);

    let requests = receiver.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].webhook_id(), event_id.to_string());
    assert_eq!(requests[0].webhook_id(), requests[1].webhook_id());
    assert_eq!(requests[0].body, requests[1].body, "the body never changes");
    for r in &requests {
        r.verify(&secret).expect("every attempt is signed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_error_is_terminal() {
    let db = TestDb::new("dead400").await;
    let receiver = Receiver::start().await;
    let excerpt = "{\"error\":\"unknown field order_id\"}";
    receiver.always("/hook", Reply::status(400).body(excerpt));
    let (endpoint_id, _) = db.add_endpoint(&receiver.url("/hook"), &["order.*"]).await;
    let dispatcher = RunningDispatcher::start(&db.url, test_config("dead400"));
    let event_id = db.enqueue("order.created", &json!({"n": 1})).await;

    db.wait_all_in_state(1, "dead").await;
    // A second, healthy event proves the dispatcher kept running after the dead one.
    let (ok_endpoint, _) = db.add_endpoint(&receiver.url("/ok"), &["probe.*"]).await;
    let probe = db.enqueue("probe.sent", &json!({})).await;
    db.wait_until(&format!(
        "SELECT count(*) = 1 AND bool_and(state = 'delivered') FROM webhook_deliveries
         WHERE event_id = {probe}"
    ))
    .await;
    dispatcher.stop().await;

    let d = db.delivery(event_id, endpoint_id).await;
    assert_eq!(d.attempts, 1);
    assert_eq!(d.last_status, Some(400));
    assert!(
        d.last_error.as_deref().is_some_and(|e| e.contains("400")),
        "{d:?}"
    );
    assert_eq!(d.locked_by, None);
    let attempts: Vec<_> = db
        .attempts()
        .await
        .into_iter()
        .filter(|a| a.endpoint_id == endpoint_id)
        .collect();
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!(attempts[0].status_code, Some(400));
    assert_eq!(attempts[0].error_kind.as_deref(), Some("http_status"));
    assert_eq!(attempts[0].response_excerpt.as_deref(), Some(excerpt));
    assert_eq!(receiver.count_to("/hook"), 1, "a 400 is never retried");
    assert_eq!(db.delivery(probe, ok_endpoint).await.state, "delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gives_up_after_max_attempts() {
    let db = TestDb::new("maxattempts").await;
    let receiver = Receiver::start().await;
    receiver.always("/hook", Reply::status(500));
    let (endpoint_id, _) = db.add_endpoint(&receiver.url("/hook"), &["order.*"]).await;
    let dispatcher = RunningDispatcher::start(
        &db.url,
        outboxd::Config {
            max_attempts: 3,
            ..test_config("maxattempts")
        },
    );
    let event_id = db.enqueue("order.created", &json!({"n": 1})).await;

    db.wait_all_in_state(1, "dead").await;
    // Probe: a later delivery through the same dispatcher goes through, so the dead row
    // had every chance to be (wrongly) claimed again meanwhile.
    let (probe_endpoint, _) = db.add_endpoint(&receiver.url("/probe"), &["probe.*"]).await;
    receiver.sequence("/probe", vec![Reply::status(500), Reply::ok()]);
    let probe = db.enqueue("probe.sent", &json!({})).await;
    db.wait_until(&format!(
        "SELECT count(*) = 1 AND bool_and(state = 'delivered') FROM webhook_deliveries
         WHERE event_id = {probe}"
    ))
    .await;
    dispatcher.stop().await;

    assert_eq!(
        receiver.count_to("/hook"),
        3,
        "exactly max_attempts requests"
    );
    let d = db.delivery(event_id, endpoint_id).await;
    assert_eq!(d.state, "dead");
    assert_eq!(d.attempts, 3);
    assert_eq!(d.last_status, Some(500));
    let numbers: Vec<i32> = db
        .attempts()
        .await
        .iter()
        .filter(|a| a.endpoint_id == endpoint_id)
        .map(|a| a.attempt)
        .collect();
    assert_eq!(numbers, [1, 2, 3]);
    assert_eq!(db.delivery(probe, probe_endpoint).await.attempts, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_on_429_is_honoured() {
    let db = TestDb::new("retryafter").await;
    let receiver = Receiver::start().await;
    receiver.sequence(
        "/hook",
        vec![Reply::status(429).header("retry-after", "1"), Reply::ok()],
    );
    let (endpoint_id, _) = db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let dispatcher = RunningDispatcher::start(
        &db.url,
        outboxd::Config {
            // Without Retry-After the retry would come after about 50 ms.
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_secs(3_600),
            ..test_config("retryafter")
        },
    );
    let event_id = db.enqueue("order.created", &json!({"n": 1})).await;
    db.wait_all_in_state(1, "delivered").await;
    dispatcher.stop().await;

    let requests = receiver.requests();
    assert_eq!(requests.len(), 2);
    let gap = requests[1].arrived.duration_since(requests[0].arrived);
    assert!(
        gap >= Duration::from_millis(900),
        "the retry came {gap:?} after the 429, before its Retry-After of 1 s"
    );
    let d = db.delivery(event_id, endpoint_id).await;
    assert_eq!(d.attempts, 2);
    let statuses: Vec<Option<i32>> = db.attempts().await.iter().map(|a| a.status_code).collect();
    assert_eq!(statuses, [Some(429), Some(200)]);
}

/// An endpoint whose stored secret or URL cannot be used (written by other tooling,
/// bypassing `endpoint add`'s validation) fails without a request, and docs/webhooks.md
/// says: "endpoint URL or secret unusable at delivery time: `dead` at once with
/// `invalid_endpoint`".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_endpoint_is_dead_at_once() {
    let db = TestDb::new("badsecret").await;
    let receiver = Receiver::start().await;
    let insert = |url: String, secret: &str| {
        format!(
            "INSERT INTO webhook_endpoints (url, secret) VALUES ('{url}', '{secret}') RETURNING id"
        )
    };
    let bad_secret: i64 = db
        .scalar(&insert(receiver.url("/hook"), "not-a-whsec-secret"))
        .await;
    let bad_url: i64 = db
        .scalar(&insert(
            "::not a url::".into(),
            &outboxd::sign::Secret::generate(),
        ))
        .await;
    let dispatcher = RunningDispatcher::start(
        &db.url,
        outboxd::Config {
            max_attempts: 5,
            ..test_config("badsecret")
        },
    );
    let event_id = db.enqueue("order.created", &json!({"n": 1})).await;
    db.wait_until("SELECT count(*) = 2 AND bool_and(state <> 'pending') FROM webhook_deliveries")
        .await;
    dispatcher.stop().await;

    assert_eq!(
        receiver.count(),
        0,
        "nothing can be sent to an unusable endpoint"
    );
    let attempts = db.attempts().await;
    assert!(
        attempts
            .iter()
            .all(|a| a.error_kind.as_deref() == Some("invalid_endpoint")),
        "{attempts:?}"
    );
    for endpoint_id in [bad_secret, bad_url] {
        let d = db.delivery(event_id, endpoint_id).await;
        assert_eq!(
            (d.state.as_str(), d.attempts),
            ("dead", 1),
            "an unusable endpoint is terminal, yet it was retried: {d:?}"
        );
    }
}

/// README: "Retries and `deliver_after` times wake the dispatcher on their own" — also
/// when the poll tick is long. The first answer is slow, so the dispatcher has gone to
/// sleep (until the in-flight row's lease end or the poll tick) before the retry is
/// scheduled; the retry must still go out after its short backoff, not after the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_wakes_a_sleeping_dispatcher() {
    let db = TestDb::new("retrywake").await;
    let receiver = Receiver::start().await;
    receiver.sequence(
        "/hook",
        vec![
            Reply::status(500).delay(Duration::from_millis(300)),
            Reply::ok(),
        ],
    );
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let dispatcher = RunningDispatcher::start(
        &db.url,
        outboxd::Config {
            poll_interval: Duration::from_millis(3_600_000),
            lease: Duration::from_secs(120),
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_millis(200),
            ..test_config("retrywake")
        },
    );
    db.enqueue("order.created", &json!({"n": 1})).await;
    // The retry is due ~50 ms after the first answer; the lease would end after 120 s.
    db.wait_all_in_state(1, "delivered").await;
    dispatcher.stop().await;
    assert_eq!(receiver.count(), 2);
}

/// Redirects are never followed (the Location could point anywhere, the SSRF guard
/// included); a 3xx is retried like a server error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_not_followed() {
    let db = TestDb::new("redirect").await;
    let receiver = Receiver::start().await;
    receiver.always(
        "/moved",
        Reply::status(302).header("location", &receiver.url("/target")),
    );
    let (endpoint_id, _) = db.add_endpoint(&receiver.url("/moved"), &[]).await;
    let dispatcher = RunningDispatcher::start(
        &db.url,
        outboxd::Config {
            max_attempts: 2,
            ..test_config("redirect")
        },
    );
    let event_id = db.enqueue("order.created", &json!({})).await;
    db.wait_all_in_state(1, "dead").await;
    dispatcher.stop().await;

    assert_eq!(receiver.count_to("/target"), 0, "the redirect was followed");
    assert_eq!(receiver.count_to("/moved"), 2, "a 3xx is retried");
    let d = db.delivery(event_id, endpoint_id).await;
    assert_eq!((d.attempts, d.last_status), (2, Some(302)), "{d:?}");
}

/// Only the first 1 KiB of a response is kept, whatever the receiver sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_excerpt_is_capped() {
    let db = TestDb::new("excerpt").await;
    let receiver = Receiver::start().await;
    let long = "0123456789abcdef".repeat(4096); // 64 KiB
    receiver.always("/hook", Reply::status(422).body(&long));
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let dispatcher = RunningDispatcher::start(&db.url, test_config("excerpt"));
    db.enqueue("order.created", &json!({})).await;
    db.wait_all_in_state(1, "dead").await;
    dispatcher.stop().await;

    let attempts = db.attempts().await;
    assert_eq!(attempts.len(), 1);
    let excerpt = attempts[0].response_excerpt.clone().unwrap_or_default();
    assert_eq!(excerpt.len(), outboxd::deliver::EXCERPT_BYTES);
    assert!(long.starts_with(&excerpt));
}
