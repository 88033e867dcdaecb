//! The operator commands of the real binary against a real database and receiver:
//! endpoints, enqueue, dead letters and their re-drive, replay, stats, secret rotation
//! and test events, with their `--json` output and documented exit statuses (0 ok,
//! 2 invalid input, 3 not found, 4 nothing to do).

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::harness::{
    Finished, Receiver, Reply, RunningDispatcher, TestDb, WAIT, eventually, outboxd_command,
    run_to_end, test_config,
};

const SECRET_A: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SECRET_B: &str = "whsec_QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3";

/// Runs `outboxd ARGS` against `db` to the end.
async fn outboxd(db: &TestDb, args: &[&str]) -> Finished {
    let mut command = outboxd_command();
    command.args(args).env("DATABASE_URL", &db.url);
    run_to_end(command).await
}

/// Runs `outboxd ARGS` and asserts its exit status.
async fn outboxd_exits(db: &TestDb, args: &[&str], code: i32) -> Finished {
    let finished = outboxd(db, args).await;
    assert_eq!(
        finished.code,
        Some(code),
        "`outboxd {}` must exit {code}: {finished:#?}",
        args.join(" ")
    );
    finished
}

/// Runs `outboxd ARGS`, asserts exit 0, and parses stdout as JSON.
async fn outboxd_json(db: &TestDb, args: &[&str]) -> Value {
    let finished = outboxd_exits(db, args, 0).await;
    serde_json::from_str(finished.stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "`outboxd {}` did not print JSON ({e}): {finished:#?}",
            args.join(" ")
        )
    })
}

/// The value of a `key: value` line in text output.
fn field(stdout: &str, key: &str) -> String {
    stdout
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{key}: ")))
        .unwrap_or_else(|| panic!("no `{key}:` line in {stdout:?}"))
        .trim()
        .to_owned()
}

/// The `id` of a listed item.
fn item_ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items: {page}"))
        .iter()
        .map(|item| item["id"].as_str().expect("a string id").to_owned())
        .collect()
}

async fn wait_for_count_to(receiver: &Receiver, path: &str, n: usize) {
    eventually(&format!("{n} requests to {path}"), WAIT, || async {
        receiver.count_to(path) >= n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_endpoint_commands_show_and_change_endpoints() {
    let db = TestDb::new("cli_endpoints").await;

    let added = outboxd_json(
        &db,
        &[
            "endpoint",
            "add",
            "--url",
            "https://example.com/hooks",
            "--event-type",
            "order.created",
            "--event-type",
            "invoice.*",
            "--description",
            "billing",
            "--json",
        ],
    )
    .await;
    let id = added["id"]
        .as_i64()
        .unwrap_or_else(|| panic!("an id: {added}"));
    let secret = added["secret"].as_str().expect("the secret").to_owned();
    assert!(secret.starts_with("whsec_"), "{added}");
    outboxd::sign::Secret::parse(&secret).expect("a usable generated secret");
    assert_eq!(added["url"], json!("https://example.com/hooks"));
    assert_eq!(added["event_types"], json!(["order.created", "invoice.*"]));
    assert_eq!(added["description"], json!("billing"));
    assert_eq!(added["active"], json!(true));
    let stored: String = db
        .scalar(&format!(
            "SELECT secret FROM webhook_endpoints WHERE id = {id}"
        ))
        .await;
    assert_eq!(stored, secret, "the printed secret is the one that signs");

    // Text output, with a given secret.
    let second = outboxd_exits(
        &db,
        &[
            "endpoint",
            "add",
            "--url",
            "https://example.net/in",
            "--secret",
            SECRET_A,
        ],
        0,
    )
    .await;
    let second_id: i64 = field(&second.stdout, "id").parse().expect("numeric id");
    assert_eq!(field(&second.stdout, "secret"), SECRET_A);
    assert_eq!(field(&second.stdout, "event_types"), "*");

    // Listing and showing never print a secret.
    let list = outboxd(&db, &["endpoint", "list", "--json"]).await;
    assert_eq!(list.code, Some(0), "{list:?}");
    assert!(
        !list.stdout.contains(&secret) && !list.stdout.contains(SECRET_A),
        "secrets are shown only at registration: {}",
        list.stdout
    );
    let list: Value = serde_json::from_str(list.stdout.trim()).expect("JSON");
    let listed: Vec<i64> = list
        .as_array()
        .expect("an array")
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert_eq!(listed, [id, second_id]);
    let shown = outboxd_json(&db, &["endpoint", "show", &id.to_string(), "--json"]).await;
    assert_eq!(shown, list[0], "show and list agree");
    assert!(shown.get("secret").is_none(), "{shown}");
    let text = outboxd_exits(&db, &["endpoint", "list"], 0).await;
    assert!(
        text.stdout.contains("https://example.net/in") && !text.stdout.contains(SECRET_A),
        "{text:?}"
    );

    // Update: the change is printed and persisted; untouched fields stay.
    let updated = outboxd_json(
        &db,
        &[
            "endpoint",
            "update",
            &id.to_string(),
            "--url",
            "https://example.org/new",
            "--event-type",
            "a.*",
            "--json",
        ],
    )
    .await;
    assert_eq!(updated["url"], json!("https://example.org/new"));
    assert_eq!(updated["event_types"], json!(["a.*"]));
    assert_eq!(updated["description"], json!("billing"));
    let shown = outboxd_json(&db, &["endpoint", "show", &id.to_string(), "--json"]).await;
    assert_eq!(shown, updated);
    let all = outboxd_json(
        &db,
        &[
            "endpoint",
            "update",
            &id.to_string(),
            "--all-event-types",
            "--json",
        ],
    )
    .await;
    assert_eq!(all["event_types"], json!([]));

    // Invalid input is refused with 2, and changes nothing.
    let bad_url = outboxd_exits(
        &db,
        &["endpoint", "update", &id.to_string(), "--url", "ftp://x/y"],
        2,
    )
    .await;
    assert!(bad_url.stderr.contains("http or https"), "{bad_url:?}");
    outboxd_exits(
        &db,
        &[
            "endpoint",
            "update",
            &id.to_string(),
            "--event-type",
            "order*",
        ],
        2,
    )
    .await;
    let shown = outboxd_json(&db, &["endpoint", "show", &id.to_string(), "--json"]).await;
    assert_eq!(shown["url"], json!("https://example.org/new"));
    assert_eq!(shown["event_types"], json!([]));

    // Unknown ids are 3.
    let missing = outboxd_exits(&db, &["endpoint", "show", "99999", "--json"], 3).await;
    assert!(missing.stderr.contains("endpoint 99999"), "{missing:?}");
    assert!(missing.stdout.is_empty(), "{missing:?}");
    outboxd_exits(
        &db,
        &["endpoint", "update", "99999", "--description", "x"],
        3,
    )
    .await;
    outboxd_exits(&db, &["endpoint", "disable", "99999"], 3).await;
    outboxd_exits(&db, &["endpoint", "rotate-secret", "99999"], 3).await;

    // Disable, enable, remove.
    outboxd_exits(
        &db,
        &["endpoint", "disable", &id.to_string(), "--reason", "upkeep"],
        0,
    )
    .await;
    let shown = outboxd_json(&db, &["endpoint", "show", &id.to_string(), "--json"]).await;
    assert_eq!(shown["active"], json!(false));
    assert_eq!(shown["disabled_reason"], json!("upkeep"));
    outboxd_exits(&db, &["endpoint", "enable", &id.to_string()], 0).await;
    let shown = outboxd_json(&db, &["endpoint", "show", &id.to_string(), "--json"]).await;
    assert_eq!(shown["active"], json!(true));
    assert_eq!(shown["disabled_reason"], Value::Null);
    outboxd_exits(&db, &["endpoint", "remove", &second_id.to_string()], 0).await;
    outboxd_exits(&db, &["endpoint", "show", &second_id.to_string()], 3).await;
    outboxd_exits(&db, &["endpoint", "remove", &second_id.to_string()], 3).await;
    let list = outboxd_json(&db, &["endpoint", "list", "--json"]).await;
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");

    // Enqueue prints the new event's id.
    let enqueued = outboxd_exits(
        &db,
        &[
            "enqueue",
            "--event-type",
            "order.created",
            "--payload",
            r#"{"order_id": 7}"#,
            "--idempotency-key",
            "order-7",
        ],
        0,
    )
    .await;
    let event: i64 = field(&enqueued.stdout, "id").parse().expect("numeric id");
    let row = db
        .client
        .query_one(
            "SELECT event_type, payload, processed_at IS NULL FROM webhook_outbox WHERE id = $1",
            &[&event],
        )
        .await
        .expect("the enqueued row");
    assert_eq!(row.get::<_, String>(0), "order.created");
    assert_eq!(row.get::<_, Value>(1), json!({"order_id": 7}));
    assert!(row.get::<_, bool>(2), "waits for fan-out");
    let duplicate = outboxd_exits(
        &db,
        &[
            "enqueue",
            "--event-type",
            "order.created",
            "--payload",
            "{}",
            "--idempotency-key",
            "order-7",
        ],
        0,
    )
    .await;
    assert!(duplicate.stdout.contains("duplicate"), "{duplicate:?}");
    outboxd_exits(
        &db,
        &["enqueue", "--event-type", "x", "--payload", "{not json"],
        2,
    )
    .await;
    let events: i64 = db
        .scalar("SELECT count(*) FROM webhook_outbox WHERE event_type NOT LIKE 'outboxd.%'")
        .await;
    assert_eq!(events, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_dead_deliveries_are_listed_shown_retried_and_replayed() {
    let db = TestDb::new("cli_dead").await;
    let receiver = Receiver::start().await;
    receiver.always("/hook", Reply::status(400).body("no such order"));
    receiver.always("/other", Reply::status(400));
    let (a, secret_a) = db.add_endpoint(&receiver.url("/hook"), &["order.*"]).await;
    let (b, _) = db.add_endpoint(&receiver.url("/other"), &["audit.*"]).await;
    let dispatcher = RunningDispatcher::start(&db.url, test_config("cli_dead"));

    let enqueued = outboxd_exits(
        &db,
        &[
            "enqueue",
            "--event-type",
            "order.created",
            "--payload",
            r#"{"order_id": 1}"#,
        ],
        0,
    )
    .await;
    let event: i64 = field(&enqueued.stdout, "id").parse().expect("numeric id");
    let id = format!("{event}:{a}");
    db.wait_until(&format!(
        "SELECT state = 'dead' FROM webhook_deliveries WHERE event_id = {event} AND endpoint_id = {a}"
    ))
    .await;
    assert_eq!(receiver.count_to("/hook"), 1, "a 400 is not retried");

    // The dead delivery as the listings and the detail show it.
    let dead = outboxd_json(&db, &["dead", "list", "--json"]).await;
    assert_eq!(item_ids(&dead), std::slice::from_ref(&id), "{dead}");
    let item = &dead["items"][0];
    assert_eq!(item["state"], json!("dead"));
    assert_eq!(item["event_id"], json!(event));
    assert_eq!(item["endpoint_id"], json!(a));
    assert_eq!(item["event_type"], json!("order.created"));
    assert_eq!(item["last_status"], json!(400));
    assert_eq!(item["attempts"], json!(1));
    assert_eq!(dead["next_cursor"], Value::Null);
    let by_state = outboxd_json(&db, &["deliveries", "list", "--state", "dead", "--json"]).await;
    assert_eq!(by_state, dead);
    let delivered = outboxd_json(
        &db,
        &["deliveries", "list", "--state", "delivered", "--json"],
    )
    .await;
    assert!(item_ids(&delivered).is_empty(), "{delivered}");
    outboxd_exits(&db, &["deliveries", "list", "--state", "bogus"], 2).await;
    let text = outboxd_exits(&db, &["dead", "list"], 0).await;
    assert!(text.stdout.contains(&id), "{text:?}");

    let detail = outboxd_json(&db, &["deliveries", "show", &id, "--json"]).await;
    assert_eq!(detail["id"], json!(id));
    assert_eq!(detail["state"], json!("dead"));
    let history = detail["attempt_history"].as_array().expect("a history");
    assert_eq!(history.len(), 1, "{detail}");
    assert_eq!(history[0]["attempt"], json!(1));
    assert_eq!(history[0]["status_code"], json!(400));
    assert_eq!(history[0]["error_kind"], json!("http_status"));
    assert_eq!(history[0]["response_excerpt"], json!("no such order"));
    assert_eq!(history[0]["worker_id"], json!(dispatcher.worker_id));

    // The receiver is fixed: a retry delivers the same event (same webhook-id).
    receiver.always("/hook", Reply::ok());
    let retried = outboxd_exits(&db, &["dead", "retry", &id], 0).await;
    assert!(
        retried.stdout.contains(&format!("retrying {id}")),
        "{retried:?}"
    );
    wait_for_count_to(&receiver, "/hook", 2).await;
    let again = &receiver.requests_to("/hook")[1];
    assert_eq!(again.webhook_id(), event.to_string());
    again.verify(&secret_a).expect("signed");
    db.wait_until(&format!(
        "SELECT state = 'delivered' FROM webhook_deliveries WHERE event_id = {event} AND endpoint_id = {a}"
    ))
    .await;
    let detail = outboxd_json(&db, &["deliveries", "show", &id, "--json"]).await;
    let statuses: Vec<&Value> = detail["attempt_history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["status_code"])
        .collect();
    assert_eq!(statuses, [&json!(400), &json!(200)], "{detail}");

    // Not dead any more: nothing to do.
    let nothing = outboxd_exits(&db, &["dead", "retry", &id], 4).await;
    assert!(nothing.stderr.contains(&id), "{nothing:?}");
    outboxd_exits(&db, &["deliveries", "retry", &id], 4).await;

    // Two more dead on `a`, one dead on `b`; a bulk retry of `a`'s takes only those.
    receiver.always("/hook", Reply::status(400));
    let more = [
        db.enqueue("order.created", &json!({"order_id": 2})).await,
        db.enqueue("order.updated", &json!({"order_id": 3})).await,
    ];
    let audit = db.enqueue("audit.logged", &json!({})).await;
    db.wait_until("SELECT count(*) FILTER (WHERE state = 'dead') = 3 FROM webhook_deliveries")
        .await;
    let of_a = outboxd_json(
        &db,
        &["dead", "list", "--endpoint", &a.to_string(), "--json"],
    )
    .await;
    assert_eq!(
        item_ids(&of_a),
        [format!("{}:{a}", more[1]), format!("{}:{a}", more[0])],
        "newest first"
    );
    receiver.always("/hook", Reply::ok());
    let bulk = outboxd_exits(
        &db,
        &["dead", "retry", "--all", "--endpoint", &a.to_string()],
        0,
    )
    .await;
    assert!(
        bulk.stdout.contains("retrying 2 dead deliveries"),
        "{bulk:?}"
    );
    wait_for_count_to(&receiver, "/hook", 6).await;
    let redelivered: BTreeSet<i64> = receiver.requests_to("/hook")[4..]
        .iter()
        .map(|r| r.event_id())
        .collect();
    assert_eq!(redelivered, more.into_iter().collect());
    db.wait_until(&format!(
        "SELECT count(*) = 3 FROM webhook_deliveries WHERE endpoint_id = {a} AND state = 'delivered'"
    ))
    .await;
    assert_eq!(
        db.delivery(audit, b).await.state,
        "dead",
        "other endpoints' stay dead"
    );
    outboxd_exits(
        &db,
        &["dead", "retry", "--all", "--endpoint", &a.to_string()],
        4,
    )
    .await;

    // Replay: the delivered event goes out again, same webhook-id.
    let replayed = outboxd_exits(&db, &["replay", &event.to_string()], 0).await;
    assert!(
        replayed.stdout.contains(&format!("replaying {id}")),
        "{replayed:?}"
    );
    wait_for_count_to(&receiver, "/hook", 7).await;
    assert_eq!(receiver.requests_to("/hook")[6].event_id(), event);
    db.wait_until(&format!(
        "SELECT state = 'delivered' AND attempts = 3 FROM webhook_deliveries
         WHERE event_id = {event} AND endpoint_id = {a}"
    ))
    .await;
    let replayed = outboxd_json(&db, &["replay", &event.to_string(), "--json"]).await;
    assert_eq!(replayed, json!({ "deliveries": [id] }));
    wait_for_count_to(&receiver, "/hook", 8).await;
    assert_eq!(receiver.requests_to("/hook")[7].event_id(), event);
    db.wait_until(&format!(
        "SELECT state = 'delivered' AND attempts = 4 FROM webhook_deliveries
         WHERE event_id = {event} AND endpoint_id = {a}"
    ))
    .await;
    outboxd_exits(&db, &["replay", "99999"], 3).await;

    // Stats agree with the tables.
    let stats = outboxd_json(&db, &["stats", "--json"]).await;
    let depth = &stats["depth"];
    assert_eq!(depth["delivered"], json!(3), "{stats}");
    assert_eq!(depth["dead"], json!(1), "{stats}");
    for state in ["pending", "inflight", "parked", "unprocessed"] {
        assert_eq!(depth[state], json!(0), "{state}: {stats}");
    }
    let ok: i64 = db
        .scalar("SELECT count(*) FROM webhook_attempts WHERE error_kind IS NULL")
        .await;
    let failed: i64 = db
        .scalar("SELECT count(*) FROM webhook_attempts WHERE error_kind IS NOT NULL")
        .await;
    assert_eq!((ok, failed), (5, 4));
    assert_eq!(stats["delivered_last_hour"], json!(ok), "{stats}");
    assert_eq!(stats["failed_last_hour"], json!(failed), "{stats}");
    let endpoints = stats["endpoints"].as_array().expect("endpoints");
    assert_eq!(endpoints.len(), 2, "{stats}");
    assert_eq!(endpoints[0]["endpoint_id"], json!(a));
    assert_eq!(endpoints[0]["delivered_last_hour"], json!(5));
    assert_eq!(endpoints[0]["dead"], json!(0));
    assert_eq!(endpoints[1]["endpoint_id"], json!(b));
    assert_eq!(endpoints[1]["dead"], json!(1));
    assert_eq!(endpoints[1]["failed_last_hour"], json!(1));
    let text = outboxd_exits(&db, &["stats"], 0).await;
    assert!(text.stdout.contains("queue:"), "{text:?}");

    // An event scheduled for later is not fanned out yet: nothing to replay (2).
    let later = outboxd_exits(
        &db,
        &[
            "enqueue",
            "--event-type",
            "order.created",
            "--payload",
            "{}",
            "--deliver-after",
            "2999-01-01T00:00:00Z",
        ],
        0,
    )
    .await;
    let later = field(&later.stdout, "id");
    let refused = outboxd_exits(&db, &["replay", &later], 2).await;
    assert!(refused.stderr.contains("fanned out"), "{refused:?}");
    let stats = outboxd_json(&db, &["stats", "--json"]).await;
    assert_eq!(stats["depth"]["unprocessed"], json!(1), "{stats}");
    outboxd_exits(
        &db,
        &[
            "enqueue",
            "--event-type",
            "x",
            "--payload",
            "{}",
            "--deliver-after",
            "tomorrow",
        ],
        2,
    )
    .await;

    // Malformed and unknown delivery ids.
    let malformed = outboxd_exits(&db, &["deliveries", "show", "1:x"], 2).await;
    assert!(
        malformed.stderr.contains("EVENT_ID:ENDPOINT_ID"),
        "{malformed:?}"
    );
    outboxd_exits(&db, &["dead", "retry", "12"], 2).await;
    outboxd_exits(&db, &["deliveries", "show", "99999:1"], 3).await;
    dispatcher.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_rotated_secret_signs_beside_the_old_one_and_test_events_arrive() {
    let db = TestDb::new("cli_rotate").await;
    let receiver = Receiver::start().await;
    let added = outboxd_json(
        &db,
        &[
            "endpoint",
            "add",
            "--url",
            &receiver.url("/hook"),
            "--secret",
            SECRET_A,
            "--json",
        ],
    )
    .await;
    let id = added["id"].as_i64().expect("an id");
    assert_eq!(added["secret"], json!(SECRET_A));
    assert_eq!(added["previous_secret_expires_at"], Value::Null);
    // A second endpoint taking every event: test events must not reach it.
    let (other, _) = db.add_endpoint(&receiver.url("/other"), &[]).await;

    let rotated = outboxd_exits(&db, &["endpoint", "rotate-secret", &id.to_string()], 0).await;
    let new = field(&rotated.stdout, "secret");
    assert!(new.starts_with("whsec_") && new != SECRET_A, "{rotated:?}");
    outboxd::sign::Secret::parse(&new).expect("a usable secret");
    let shown = outboxd_json(&db, &["endpoint", "show", &id.to_string(), "--json"]).await;
    assert!(
        shown["previous_secret_expires_at"].is_string(),
        "the old secret signs for a while: {shown}"
    );

    let dispatcher = RunningDispatcher::start(&db.url, test_config("cli_rotate"));
    let event = db.enqueue("order.created", &json!({"order_id": 1})).await;
    wait_for_count_to(&receiver, "/hook", 1).await;
    let request = &receiver.requests_to("/hook")[0];
    assert_eq!(request.event_id(), event);
    request
        .verify(SECRET_A)
        .expect("verifies with the old secret");
    request.verify(&new).expect("verifies with the new secret");
    assert!(request.verify(SECRET_B).is_err(), "not with another secret");

    // A test event: to this endpoint only, signed, of type outboxd.test.
    let tested = outboxd_exits(&db, &["endpoint", "test", &id.to_string()], 0).await;
    let queued = tested
        .stdout
        .split_whitespace()
        .find(|w| w.contains(':'))
        .unwrap_or_else(|| panic!("no delivery id: {tested:?}"))
        .to_owned();
    let (test_event, endpoint) = queued.split_once(':').unwrap();
    assert_eq!(endpoint, id.to_string());
    let test_event: i64 = test_event.parse().expect("numeric event id");
    wait_for_count_to(&receiver, "/hook", 2).await;
    let request = &receiver.requests_to("/hook")[1];
    assert_eq!(request.event_id(), test_event);
    let body = request.json();
    assert_eq!(body["type"], json!("outboxd.test"), "{body}");
    assert_eq!(body["data"]["endpoint_id"], json!(id), "{body}");
    request.verify(&new).expect("signed with the new secret");
    db.wait_until(&format!(
        "SELECT bool_and(state = 'delivered') AND count(*) = 1 FROM webhook_deliveries
         WHERE event_id = {test_event}"
    ))
    .await;
    // The ordinary event reached the other endpoint, the test event did not.
    db.wait_until(&format!(
        "SELECT state = 'delivered' FROM webhook_deliveries WHERE event_id = {event} AND endpoint_id = {other}"
    ))
    .await;
    assert!(
        receiver
            .requests_to("/other")
            .iter()
            .all(|r| r.event_id() != test_event),
        "a test event goes to its endpoint only"
    );

    // A rotation without grace: only the newest secret signs.
    let rotated = outboxd_exits(
        &db,
        &[
            "endpoint",
            "rotate-secret",
            &id.to_string(),
            "--secret",
            SECRET_B,
            "--grace",
            "0s",
        ],
        0,
    )
    .await;
    assert_eq!(field(&rotated.stdout, "secret"), SECRET_B);
    db.enqueue("order.created", &json!({"order_id": 2})).await;
    wait_for_count_to(&receiver, "/hook", 3).await;
    let request = &receiver.requests_to("/hook")[2];
    request.verify(SECRET_B).expect("the newest secret");
    assert!(request.verify(&new).is_err(), "no grace: the old one stops");

    outboxd_exits(&db, &["endpoint", "test", "99999"], 3).await;
    outboxd_exits(&db, &["endpoint", "disable", &id.to_string()], 0).await;
    let refused = outboxd_exits(&db, &["endpoint", "test", &id.to_string()], 2).await;
    assert!(refused.stderr.contains("disabled"), "{refused:?}");
    dispatcher.stop().await;
}
