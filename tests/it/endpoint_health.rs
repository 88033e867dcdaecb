//! Endpoint health: the failure clock (`failing_since`) kept by the dispatcher, endpoints
//! failing too long disabled with their pending deliveries parked, enabling resuming
//! them, and the sweep that resumes deliveries stranded parked under an active endpoint.

use std::time::{Duration, SystemTime};

use serde_json::json;

use crate::harness::{Receiver, Reply, RunningDispatcher, TestDb, WAIT, eventually, test_config};

const DISABLE_AFTER: Duration = Duration::from_secs(120 * 3600);

/// Inserts pending deliveries of every event to each of `endpoints` and marks the
/// events fanned out, as a claim would, without sending anything.
async fn fan_out_by_sql(db: &TestDb, endpoints: &[i64]) {
    db.client
        .execute(
            "INSERT INTO webhook_deliveries (event_id, endpoint_id)
             SELECT o.id, e FROM webhook_outbox o, unnest($1::bigint[]) AS e
             ON CONFLICT DO NOTHING",
            &[&endpoints],
        )
        .await
        .expect("insert deliveries");
    db.client
        .execute(
            "UPDATE webhook_outbox SET processed_at = now() WHERE processed_at IS NULL",
            &[],
        )
        .await
        .expect("mark fanned out");
}

/// `(active, disabled_reason, failing_since)` of an endpoint.
async fn health(db: &TestDb, endpoint: i64) -> (bool, Option<String>, Option<SystemTime>) {
    let row = db
        .client
        .query_one(
            "SELECT active, disabled_reason, failing_since FROM webhook_endpoints WHERE id = $1",
            &[&endpoint],
        )
        .await
        .expect("the endpoint");
    (row.get(0), row.get(1), row.get(2))
}

/// The states of an endpoint's deliveries, by event.
async fn states(db: &TestDb, endpoint: i64) -> Vec<String> {
    db.deliveries()
        .await
        .into_iter()
        .filter(|d| d.endpoint_id == endpoint)
        .map(|d| d.state)
        .collect()
}

/// A run of failures that began `hours_ago` and is still going: its last failure
/// scheduled a retry that is not overdue (`failing_until` ahead).
async fn set_failing_since(db: &TestDb, endpoint: i64, hours_ago: i32) {
    set_failure_run(db, endpoint, hours_ago, -1).await;
}

/// A run of failures that began `since_hours_ago` and counts as ongoing until
/// `until_hours_ago` (negative: in the future).
async fn set_failure_run(db: &TestDb, endpoint: i64, since_hours_ago: i32, until_hours_ago: i32) {
    db.client
        .execute(
            "UPDATE webhook_endpoints
             SET failing_since = now() - $2::int * interval '1 hour',
                 failing_until = now() - $3::int * interval '1 hour'
             WHERE id = $1",
            &[&endpoint, &since_hours_ago, &until_hours_ago],
        )
        .await
        .expect("set the failure clock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_too_long_disables_and_enable_resumes() {
    let db = TestDb::new("health_disable").await;
    let receiver = Receiver::start().await;
    let (failing, _) = db.add_endpoint(&receiver.url("/failing"), &[]).await;
    let (healthy, _) = db.add_endpoint(&receiver.url("/healthy"), &[]).await;
    let (recent, _) = db.add_endpoint(&receiver.url("/recent"), &[]).await;
    let mut events = Vec::new();
    for n in 0..3 {
        events.push(db.enqueue("order.created", &json!({ "n": n })).await);
    }
    fan_out_by_sql(&db, &[failing, healthy, recent]).await;
    set_failing_since(&db, failing, 200).await;
    set_failing_since(&db, recent, 1).await;
    let (_, _, recent_since) = health(&db, recent).await;

    let disabled = outboxd::health::disable_failing(&db.client, DISABLE_AFTER)
        .await
        .expect("disable_failing");
    assert_eq!(
        disabled.disabled,
        [failing],
        "only the endpoint failing for too long"
    );
    assert!(disabled.failed.is_empty(), "{disabled:?}");

    let (active, reason, _) = health(&db, failing).await;
    assert!(!active, "disabled");
    let reason = reason.expect("a disabled_reason");
    assert!(reason.contains("failing"), "{reason:?}");
    assert_eq!(states(&db, failing).await, ["parked"; 3]);
    assert_eq!(health(&db, healthy).await, (true, None, None));
    assert_eq!(health(&db, recent).await, (true, None, recent_since));
    assert_eq!(states(&db, healthy).await, ["pending"; 3]);
    assert_eq!(states(&db, recent).await, ["pending"; 3]);

    // Already disabled: a second pass finds nothing.
    let again = outboxd::health::disable_failing(&db.client, DISABLE_AFTER)
        .await
        .unwrap();
    assert_eq!(again, outboxd::health::HealthCheck::default());

    // A dispatcher sends the others' deliveries, not the parked ones.
    let dispatcher = RunningDispatcher::start(&db.url, test_config("health_disable"));
    db.wait_until(&format!(
        "SELECT count(*) = 6 FROM webhook_deliveries
         WHERE endpoint_id IN ({healthy}, {recent}) AND state = 'delivered'"
    ))
    .await;
    assert_eq!(receiver.count_to("/failing"), 0, "parked deliveries wait");
    assert_eq!(states(&db, failing).await, ["parked"; 3]);

    // Enabled: the clock is reset and the parked deliveries go out.
    let resumed = outboxd::endpoint::enable(&db.client, failing)
        .await
        .expect("enable");
    assert_eq!(resumed, 3);
    assert_eq!(health(&db, failing).await, (true, None, None));
    eventually("the resumed deliveries arrive", WAIT, || async {
        receiver.count_to("/failing") >= 3
    })
    .await;
    let mut arrived: Vec<i64> = receiver
        .requests_to("/failing")
        .iter()
        .map(|r| r.event_id())
        .collect();
    arrived.sort_unstable();
    assert_eq!(arrived, events);
    db.wait_all_in_state(9, "delivered").await;
    assert_eq!(health(&db, failing).await, (true, None, None));
    dispatcher.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_start_the_clock_and_any_success_resets_it() {
    let db = TestDb::new("health_clock").await;
    let receiver = Receiver::start().await;
    receiver.always("/hook", Reply::status(500));
    let (endpoint, _) = db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let (other, _) = db.add_endpoint(&receiver.url("/other"), &[]).await;
    let mut config = test_config("health_clock");
    config.max_attempts = 1000;
    let dispatcher = RunningDispatcher::start(&db.url, config);

    let event = db.enqueue("order.created", &json!({})).await;
    db.wait_until(&format!(
        "SELECT failing_since IS NOT NULL FROM webhook_endpoints WHERE id = {endpoint}"
    ))
    .await;
    let (_, _, started) = health(&db, endpoint).await;
    // More failures do not move the clock: it runs from the first failure.
    db.wait_until(&format!(
        "SELECT attempts >= 4 FROM webhook_deliveries
         WHERE event_id = {event} AND endpoint_id = {endpoint}"
    ))
    .await;
    assert_eq!(health(&db, endpoint).await, (true, None, started));
    // The other endpoint, answering 200, never started one.
    db.wait_until(&format!(
        "SELECT state = 'delivered' FROM webhook_deliveries
         WHERE event_id = {event} AND endpoint_id = {other}"
    ))
    .await;
    assert_eq!(health(&db, other).await, (true, None, None));

    receiver.always("/hook", Reply::ok());
    db.wait_until(&format!(
        "SELECT state = 'delivered' FROM webhook_deliveries
         WHERE event_id = {event} AND endpoint_id = {endpoint}"
    ))
    .await;
    db.wait_until(&format!(
        "SELECT failing_since IS NULL FROM webhook_endpoints WHERE id = {endpoint}"
    ))
    .await;

    // A new run of failures starts a new clock.
    receiver.always("/hook", Reply::status(503));
    db.enqueue("order.created", &json!({})).await;
    db.wait_until(&format!(
        "SELECT failing_since IS NOT NULL FROM webhook_endpoints WHERE id = {endpoint}"
    ))
    .await;
    let (_, _, restarted) = health(&db, endpoint).await;
    assert!(
        restarted.unwrap() > started.unwrap(),
        "a later failure run starts later"
    );
    receiver.always("/hook", Reply::ok());
    db.wait_until(&format!(
        "SELECT failing_since IS NULL FROM webhook_endpoints WHERE id = {endpoint}"
    ))
    .await;
    dispatcher.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn housekeeping_disables_an_endpoint_failing_too_long() {
    let db = TestDb::new("health_housekeeping").await;
    let receiver = Receiver::start().await;
    // Still failing: whether the claim or the health check comes first, the delivery
    // ends up parked and the clock keeps running.
    receiver.always("/failing", Reply::status(500));
    let (failing, _) = db.add_endpoint(&receiver.url("/failing"), &[]).await;
    db.enqueue("order.created", &json!({})).await;
    fan_out_by_sql(&db, &[failing]).await;
    set_failing_since(&db, failing, 200).await;
    // Started with a 120-hour threshold, the dispatcher's first health check (at
    // start-up) disables the endpoint and parks its delivery.
    let mut config = test_config("health_housekeeping");
    config.endpoint_disable_after = DISABLE_AFTER;
    let dispatcher = RunningDispatcher::start(&db.url, config);
    db.wait_until(&format!(
        "SELECT NOT active FROM webhook_endpoints WHERE id = {failing}"
    ))
    .await;
    let (_, reason, _) = health(&db, failing).await;
    assert!(reason.is_some_and(|r| r.contains("failing")));
    db.wait_all_in_state(1, "parked").await;
    dispatcher.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_stranded_parked_under_an_active_endpoint_are_resumed() {
    let db = TestDb::new("health_stranded").await;
    let receiver = Receiver::start().await;
    let (open, _) = db.add_endpoint(&receiver.url("/open"), &[]).await;
    let (closed, _) = db.add_endpoint(&receiver.url("/closed"), &[]).await;
    let (removed, _) = db.add_endpoint(&receiver.url("/removed"), &[]).await;
    let event = db.enqueue("order.created", &json!({})).await;
    fan_out_by_sql(&db, &[open, closed, removed]).await;
    outboxd::endpoint::disable(&db.client, closed, "operator")
        .await
        .unwrap();
    outboxd::endpoint::remove(&db.client, removed)
        .await
        .unwrap();
    // The race the sweep exists for: a park written under an endpoint that is active.
    let park_open =
        format!("UPDATE webhook_deliveries SET state = 'parked' WHERE endpoint_id = {open}");
    db.client.batch_execute(&park_open).await.unwrap();
    assert_eq!(states(&db, closed).await, ["parked"]);
    assert_eq!(states(&db, removed).await, ["parked"]);

    let resumed = outboxd::health::resume_stranded(&db.client).await.unwrap();
    assert_eq!(resumed, 1);
    assert_eq!(states(&db, open).await, ["pending"]);
    assert_eq!(
        states(&db, closed).await,
        ["parked"],
        "a disabled endpoint's stay"
    );
    assert_eq!(
        states(&db, removed).await,
        ["parked"],
        "a removed endpoint's stay"
    );
    assert_eq!(
        outboxd::health::resume_stranded(&db.client).await.unwrap(),
        0
    );

    // A running dispatcher's housekeeping does the same, and the delivery goes out;
    // also one parked by a 410 Gone: that park disabled its endpoint in the same
    // transaction, so an active endpoint over it was enabled since.
    db.client
        .batch_execute(&format!(
            "UPDATE webhook_deliveries SET state = 'parked', last_status = 410
             WHERE endpoint_id = {open}"
        ))
        .await
        .unwrap();
    let dispatcher = RunningDispatcher::start(&db.url, test_config("health_stranded"));
    eventually("the stranded delivery arrives", WAIT, || async {
        receiver.count_to("/open") >= 1
    })
    .await;
    assert_eq!(receiver.requests_to("/open")[0].event_id(), event);
    db.wait_until(&format!(
        "SELECT state = 'delivered' FROM webhook_deliveries
         WHERE event_id = {event} AND endpoint_id = {open}"
    ))
    .await;
    assert_eq!(states(&db, closed).await, ["parked"]);
    assert_eq!(
        receiver.count_to("/closed") + receiver.count_to("/removed"),
        0
    );
    dispatcher.stop().await;
}

// ---------------------------------------------------------------------------------------
// The failure clock follows the attempts
// ---------------------------------------------------------------------------------------

/// A run of failures that began long ago but went silent (no failure since its last
/// scheduled retry fell due, or a clock from before `failing_until` existed) is not
/// "failing every attempt": it never disables. One still going does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_failure_followed_by_silence_never_disables() {
    let db = TestDb::new("health_silence").await;
    let (silent, _) = db.add_endpoint("https://example.com/silent", &[]).await;
    let (legacy, _) = db.add_endpoint("https://example.com/legacy", &[]).await;
    let (going, _) = db.add_endpoint("https://example.com/going", &[]).await;
    set_failure_run(&db, silent, 200, 150).await;
    db.client
        .execute(
            "UPDATE webhook_endpoints SET failing_since = now() - interval '200 hours'
             WHERE id = $1",
            &[&legacy],
        )
        .await
        .unwrap();
    set_failing_since(&db, going, 200).await;

    let check = outboxd::health::disable_failing(&db.client, DISABLE_AFTER)
        .await
        .unwrap();
    assert_eq!(check.disabled, [going], "{check:?}");
    assert!(
        health(&db, silent).await.0,
        "a silent run keeps its endpoint"
    );
    assert!(
        health(&db, legacy).await.0,
        "an unknown run keeps its endpoint"
    );
}

/// A failure after a silence starts a new run: the old `failing_since` no longer
/// counts. Failures while a run goes on write the endpoint row only on transitions or
/// when `failing_until` moves by more than a minute: not on every failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_after_a_silence_starts_a_new_run() {
    let db = TestDb::new("health_newrun").await;
    let receiver = Receiver::start().await;
    receiver.always("/hook", Reply::status(500));
    let (endpoint, _) = db.add_endpoint(&receiver.url("/hook"), &[]).await;
    set_failure_run(&db, endpoint, 200, 10).await;
    let mut config = test_config("health_newrun");
    config.max_attempts = 1000;
    // The circuit would open (a transition, written) and stop the attempts.
    config.circuit.failures = 1_000_000;
    let dispatcher = RunningDispatcher::start(&db.url, config);

    let event = db.enqueue("order.created", &json!({})).await;
    db.wait_until(&format!(
        "SELECT failing_since > now() - interval '1 minute'
                AND failing_until > now() + interval '11 hours'
         FROM webhook_endpoints WHERE id = {endpoint}"
    ))
    .await;
    let row_version = format!(
        "SELECT xmin::text || failing_since::text FROM webhook_endpoints WHERE id = {endpoint}"
    );
    let started: String = db.scalar(&row_version).await;
    let check = outboxd::health::disable_failing(&db.client, DISABLE_AFTER)
        .await
        .unwrap();
    assert!(check.disabled.is_empty(), "a new run: {check:?}");

    // More failures (retries every 50-200 ms) leave the row alone.
    db.wait_until(&format!(
        "SELECT attempts >= 5 FROM webhook_deliveries
         WHERE event_id = {event} AND endpoint_id = {endpoint}"
    ))
    .await;
    assert_eq!(
        db.scalar::<String>(&row_version).await,
        started,
        "the endpoint row was rewritten"
    );
    dispatcher.stop().await;
}

/// One endpoint that cannot be disabled (here a trigger refuses it) is reported and
/// the others are still disabled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failed_disable_does_not_stop_the_others() {
    let db = TestDb::new("health_onefails").await;
    let (stuck, _) = db.add_endpoint("https://example.com/stuck", &[]).await;
    let (other, _) = db.add_endpoint("https://example.com/other", &[]).await;
    set_failing_since(&db, stuck, 300).await;
    set_failing_since(&db, other, 200).await;
    refuse_disabling(&db, &format!("OLD.id = {stuck}")).await;

    let check = outboxd::health::disable_failing(&db.client, DISABLE_AFTER)
        .await
        .expect("a failed disable is reported, not returned");
    assert_eq!(check.disabled, [other]);
    assert_eq!(check.failed, [stuck]);
    assert!(!health(&db, other).await.0);
    assert!(health(&db, stuck).await.0);
}

/// Makes PostgreSQL refuse to disable an endpoint matching `condition` (on `OLD`): a
/// real failure of the statement that disables it.
async fn refuse_disabling(db: &TestDb, condition: &str) {
    db.client
        .batch_execute(&format!(
            "CREATE FUNCTION test_refuse_disable() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 RAISE EXCEPTION 'test fault: disabling endpoint % refused', OLD.id;
             END $$;
             CREATE TRIGGER test_refuse_disable BEFORE UPDATE ON webhook_endpoints
                 FOR EACH ROW WHEN (OLD.active AND NOT NEW.active AND {condition})
                 EXECUTE FUNCTION test_refuse_disable();"
        ))
        .await
        .unwrap();
}

/// A 410 Gone parks the delivery and disables its endpoint in one transaction: while
/// the disable cannot be written, neither is the park (the outcome is retried), so the
/// delivery is never left parked under an active endpoint; once it can, both land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_parks_and_disables_together() {
    let db = TestDb::new("health_gone").await;
    let receiver = Receiver::start().await;
    receiver.always("/gone", Reply::status(410));
    let (gone, _) = db.add_endpoint(&receiver.url("/gone"), &[]).await;
    refuse_disabling(&db, "true").await;
    let dispatcher = RunningDispatcher::start(&db.url, test_config("health_gone"));
    let event = db.enqueue("order.created", &json!({})).await;
    receiver.wait_for(1).await;

    let stranded = format!(
        "SELECT count(*) > 0 FROM webhook_deliveries d JOIN webhook_endpoints e
           ON e.id = d.endpoint_id
         WHERE d.endpoint_id = {gone} AND d.state = 'parked' AND e.active"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        assert!(
            !db.scalar::<bool>(&stranded).await,
            "parked under an active endpoint: {:#?}",
            db.deliveries().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    db.client
        .batch_execute("DROP TRIGGER test_refuse_disable ON webhook_endpoints")
        .await
        .unwrap();
    db.wait_until(&format!(
        "SELECT NOT active AND disabled_reason LIKE '%410%'
         FROM webhook_endpoints WHERE id = {gone}"
    ))
    .await;
    db.wait_all_in_state(1, "parked").await;
    assert_eq!(db.delivery(event, gone).await.last_status, Some(410));
    dispatcher.stop().await;
    assert_eq!(receiver.count_to("/gone"), 1, "a 410 is not retried");
}

// ---------------------------------------------------------------------------------------
// Disabled, not removed: new events are kept for the endpoint
// ---------------------------------------------------------------------------------------

/// Events enqueued while an endpoint is disabled are fanned out to it as parked
/// deliveries (if its filter matches), and enabling it sends them, waking a dispatcher
/// that only listens. A removed endpoint gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_enqueued_while_disabled_are_delivered_on_enable() {
    let db = TestDb::new("health_backlog").await;
    let receiver = Receiver::start().await;
    let (active, _) = db.add_endpoint(&receiver.url("/active"), &[]).await;
    let (paused, secret) = db
        .add_endpoint(&receiver.url("/paused"), &["order.*"])
        .await;
    let (unmatched, _) = db
        .add_endpoint(&receiver.url("/unmatched"), &["invoice.*"])
        .await;
    let (removed, _) = db.add_endpoint(&receiver.url("/removed"), &[]).await;
    for id in [paused, unmatched] {
        outboxd::endpoint::disable(&db.client, id, "paused by its owner")
            .await
            .unwrap();
    }
    outboxd::endpoint::remove(&db.client, removed)
        .await
        .unwrap();
    let dispatcher = RunningDispatcher::start(
        &db.url,
        outboxd::Config {
            poll_interval: Duration::from_secs(3600),
            ..test_config("health_backlog")
        },
    );

    let mut events = Vec::new();
    for n in 0..3 {
        events.push(db.enqueue("order.created", &json!({ "n": n })).await);
    }
    db.wait_until(&format!(
        "SELECT count(*) = 3 FROM webhook_deliveries
         WHERE endpoint_id = {active} AND state = 'delivered'"
    ))
    .await;
    assert_eq!(states(&db, paused).await, ["parked"; 3]);
    assert!(states(&db, unmatched).await.is_empty());
    assert!(states(&db, removed).await.is_empty());
    assert_eq!(receiver.count_to("/paused"), 0);

    let resumed = outboxd::endpoint::enable(&db.client, paused).await.unwrap();
    assert_eq!(resumed, 3);
    eventually("the backlog arrives", WAIT, || async {
        receiver.count_to("/paused") >= 3
    })
    .await;
    let mut arrived: Vec<i64> = receiver
        .requests_to("/paused")
        .iter()
        .map(|r| {
            r.verify(&secret).expect("signed");
            r.event_id()
        })
        .collect();
    arrived.sort_unstable();
    assert_eq!(arrived, events);
    db.wait_all_in_state(6, "delivered").await;
    dispatcher.stop().await;
    assert_eq!(
        receiver.count_to("/unmatched") + receiver.count_to("/removed"),
        0
    );
}

/// With many disabled endpoints, a claim still writes about a batch of rows: parked
/// ones count towards it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_writes_about_a_batch_with_many_disabled_endpoints() {
    let db = TestDb::new("health_claimcap").await;
    db.add_endpoint("https://example.com/active", &[]).await;
    for n in 0..9 {
        let (id, _) = db
            .add_endpoint(&format!("https://example.com/disabled{n}"), &[])
            .await;
        outboxd::endpoint::disable(&db.client, id, "paused")
            .await
            .unwrap();
    }
    // The disables were announced (sql/0010); this claim is about the events below.
    db.client
        .batch_execute("DELETE FROM webhook_outbox WHERE event_type LIKE 'outboxd.%'")
        .await
        .unwrap();
    db.enqueue_series(1, 50).await;
    let claimed = outboxd::claim::claim(&db.client, "w", Duration::from_secs(60), 20)
        .await
        .unwrap();
    let (rows, parked): (i64, i64) = {
        let row = db
            .client
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE state = 'parked')
                 FROM webhook_deliveries",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(claimed.len(), 2, "two events, one active endpoint");
    assert_eq!((rows, parked), (20, 18));
}

/// Enabling with the backlog discarded: the parked deliveries become `discarded`, are
/// never sent, are not dead (a bulk re-drive leaves them alone), and a replay can still
/// send one; later events are delivered. Through the CLI and the admin API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enable_can_discard_the_backlog() {
    let db = TestDb::new("health_discard").await;
    let receiver = Receiver::start().await;
    let (cli, _) = db.add_endpoint(&receiver.url("/cli"), &[]).await;
    let (api, _) = db.add_endpoint(&receiver.url("/api"), &[]).await;
    for id in [cli, api] {
        outboxd::endpoint::disable(&db.client, id, "paused")
            .await
            .unwrap();
    }
    let dispatcher = RunningDispatcher::start(&db.url, test_config("health_discard"));
    let old = db.enqueue("order.created", &json!({"old": true})).await;
    db.enqueue("order.created", &json!({"old": true})).await;
    db.wait_until("SELECT count(*) = 4 AND bool_and(state = 'parked') FROM webhook_deliveries")
        .await;

    // The CLI.
    let mut command = crate::harness::outboxd_command();
    command
        .args(["endpoint", "enable", &cli.to_string(), "--discard-backlog"])
        .env("DATABASE_URL", &db.url);
    let finished = crate::harness::run_to_end(command).await;
    assert_eq!(finished.code, Some(0), "{finished:#?}");
    assert!(
        finished.stdout.contains("2 parked deliveries discarded"),
        "{finished:#?}"
    );
    assert_eq!(states(&db, cli).await, ["discarded"; 2]);
    assert!(health(&db, cli).await.0);

    // The admin API.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let token = "test-admin-token-0123456789abcdef";
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(outboxd::admin::serve(
        listener,
        outboxd::admin::AdminState::new(db.pool().await, token, Duration::from_secs(60)),
        stop.clone(),
    ));
    let http = reqwest::Client::new();
    let call = |method: reqwest::Method, path: String, body: Option<serde_json::Value>| {
        let mut request = http
            .request(method, format!("{base}{path}"))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        async move {
            let answer = request.send().await.expect("the admin API answers");
            let status = answer.status().as_u16();
            let text = answer.text().await.expect("a body");
            (
                status,
                serde_json::from_str::<serde_json::Value>(&text).unwrap_or_default(),
            )
        }
    };
    let enable = format!("/v1/endpoints/{api}/enable");
    let post = reqwest::Method::POST;
    let (status, _) = call(
        post.clone(),
        enable.clone(),
        Some(json!({"discard_backlog": "yes"})),
    )
    .await;
    assert_eq!(status, 400);
    let answer = call(
        post.clone(),
        enable.clone(),
        Some(json!({"discard_backlog": true})),
    )
    .await;
    assert_eq!(answer, (200, json!({"resumed": 0, "discarded": 2})));
    assert_eq!(states(&db, api).await, ["discarded"; 2]);
    let (status, listed) = call(
        reqwest::Method::GET,
        "/v1/deliveries?state=discarded".to_owned(),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        listed["items"].as_array().map(Vec::len),
        Some(4),
        "{listed}"
    );

    // Not dead: a bulk re-drive finds nothing.
    let retried = outboxd::redrive::retry_dead_matching(&db.client, &Default::default())
        .await
        .unwrap();
    assert!(retried.is_empty(), "{retried:?}");

    // New events are delivered; a replay sends a discarded one again.
    let new = db.enqueue("order.created", &json!({"new": true})).await;
    outboxd::redrive::replay(&db.client, old, Some(api))
        .await
        .unwrap();
    eventually("the new event and the replay arrive", WAIT, || async {
        receiver.count_to("/cli") >= 1 && receiver.count_to("/api") >= 2
    })
    .await;
    let cli_got: Vec<i64> = receiver
        .requests_to("/cli")
        .iter()
        .map(|r| r.event_id())
        .collect();
    assert_eq!(cli_got, [new]);
    let mut api_got: Vec<i64> = receiver
        .requests_to("/api")
        .iter()
        .map(|r| r.event_id())
        .collect();
    api_got.sort_unstable();
    assert_eq!(api_got, [old, new]);

    // Enabling without discarding: an empty body resumes (here nothing is parked).
    let answer = call(post.clone(), enable, None).await;
    assert_eq!(answer, (200, json!({"resumed": 0, "discarded": 0})));
    let (status, _) = call(post, "/v1/endpoints/999999/enable".to_owned(), None).await;
    assert_eq!(status, 404);
    stop.cancel();
    let _ = server.await;
    dispatcher.stop().await;
}

/// The same through a running dispatcher: housekeeping's check disables the others and
/// keeps running; the refused endpoint stays active, to be tried at the next check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn housekeeping_goes_on_past_a_refused_disable() {
    let db = TestDb::new("health_hk_refused").await;
    let (stuck, _) = db.add_endpoint("https://example.com/stuck", &[]).await;
    let (other, _) = db.add_endpoint("https://example.com/other", &[]).await;
    set_failing_since(&db, stuck, 300).await;
    set_failing_since(&db, other, 200).await;
    refuse_disabling(&db, &format!("OLD.id = {stuck}")).await;
    let mut config = test_config("health_hk_refused");
    config.endpoint_disable_after = DISABLE_AFTER;
    let dispatcher = RunningDispatcher::start(&db.url, config);
    db.wait_until(&format!(
        "SELECT NOT active FROM webhook_endpoints WHERE id = {other}"
    ))
    .await;
    assert!(
        health(&db, stuck).await.0,
        "the refused endpoint is still active"
    );
    dispatcher.stop().await;
}
