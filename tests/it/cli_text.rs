//! What an operator reads: the text (not `--json`) output of the real binary's endpoint,
//! delivery and replay commands, with the paging cursor and the attempt history.

use serde_json::{Value, json};

use crate::harness::{
    Finished, Receiver, Reply, RunningDispatcher, TestDb, outboxd_command, run_to_end, test_config,
};

/// Runs `outboxd ARGS` against `db` and asserts its exit status.
async fn outboxd(db: &TestDb, args: &[&str], code: i32) -> Finished {
    let mut command = outboxd_command();
    command.args(args).env("DATABASE_URL", &db.url);
    let finished = run_to_end(command).await;
    assert_eq!(
        finished.code,
        Some(code),
        "`outboxd {}` must exit {code}: {finished:#?}",
        args.join(" ")
    );
    finished
}

/// The value of a `key: value` line.
fn field<'a>(stdout: &'a str, key: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(": "))
        .unwrap_or_else(|| panic!("no `{key}:` line in {stdout:?}"))
        .trim()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_text_output_shows_endpoints_deliveries_and_their_history() {
    let db = TestDb::new("cli_text").await;
    let receiver = Receiver::start().await;
    receiver.always("/hook", Reply::status(500));
    let url = receiver.url("/hook");

    let added = outboxd(
        &db,
        &[
            "endpoint",
            "add",
            "--url",
            &url,
            "--description",
            "billing",
            "--json",
        ],
        0,
    )
    .await;
    let added: Value = serde_json::from_str(added.stdout.trim()).expect("JSON");
    let endpoint = added["id"]
        .as_i64()
        .unwrap_or_else(|| panic!("an id in {added}"));

    // An event type the library refuses: exit 2 and the reason, nothing enqueued.
    let refused = outboxd(&db, &["enqueue", "--event-type", "", "--payload", "{}"], 2).await;
    assert!(
        refused.stderr.contains("event_type must be 1 to 255 bytes"),
        "{refused:?}"
    );
    for n in 1..=2 {
        let payload = json!({ "n": n }).to_string();
        let enqueued = outboxd(
            &db,
            &[
                "enqueue",
                "--event-type",
                "order.created",
                "--payload",
                &payload,
            ],
            0,
        )
        .await;
        assert!(enqueued.stdout.starts_with("id: "), "{enqueued:?}");
    }
    let events: i64 = db.scalar("SELECT count(*) FROM webhook_outbox").await;
    assert_eq!(events, 2);

    // Two attempts each, both 500: dead, with a history and a failing endpoint.
    let mut config = test_config("cli_text");
    config.max_attempts = 2;
    let dispatcher = RunningDispatcher::start(&db.url, config);
    db.wait_all_in_state(2, "dead").await;
    dispatcher.stop().await;

    // One page at a time: a table, then the cursor to the next page.
    let first = outboxd(&db, &["deliveries", "list", "--limit", "1"], 0).await;
    let lines: Vec<&str> = first.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "header, one row, cursor: {}", first.stdout);
    for column in [
        "ID",
        "EVENT TYPE",
        "STATE",
        "ATTEMPTS",
        "STATUS",
        "LAST ERROR",
    ] {
        assert!(lines[0].contains(column), "{}", lines[0]);
    }
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        &row[1..5],
        ["order.created", "dead", "2", "500"],
        "{}",
        lines[1]
    );
    let cursor = lines[2]
        .strip_prefix("more: --after ")
        .unwrap_or_else(|| panic!("a cursor line: {}", lines[2]));
    let second = outboxd(
        &db,
        &["deliveries", "list", "--limit", "1", "--after", cursor],
        0,
    )
    .await;
    let second_row = second.stdout.lines().nth(1).expect("a row");
    assert_ne!(
        second_row, lines[1],
        "the next page holds the other delivery"
    );
    let id = row[0].to_owned();

    // One delivery's history, a line per attempt with why it failed.
    let shown = outboxd(&db, &["deliveries", "show", &id], 0).await;
    let out = &shown.stdout;
    assert!(
        out.starts_with(&format!("delivery {id}  (order.created, dead)\n")),
        "{out}"
    );
    assert_eq!(field(out, "attempts"), "2");
    let attempts: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.contains("ATTEMPT"))
        .skip(1)
        .collect();
    assert_eq!(attempts.len(), 2, "{out}");
    for (n, line) in attempts.iter().enumerate() {
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells[0], (n + 1).to_string(), "{line}");
        assert_eq!(cells[3], "500", "{line}");
        assert!(line.ends_with("receiver answered HTTP 500"), "{line}");
    }

    // Re-driven, it is pending again and says when it is next due.
    outboxd(&db, &["dead", "retry", &id], 0).await;
    let shown = outboxd(&db, &["deliveries", "show", &id], 0).await;
    assert!(
        shown.stdout.contains("(order.created, pending)"),
        "{shown:?}"
    );
    assert!(!field(&shown.stdout, "next attempt").is_empty());
    // Replay needs a final delivery: the pending one has nothing to replay (exit 4).
    let event = id.split(':').next().expect("EVENT:ENDPOINT");
    let nothing = outboxd(&db, &["replay", event], 4).await;
    assert!(nothing.stdout.contains("nothing to replay"), "{nothing:?}");
    let other_event = second_row.split(':').next().expect("EVENT:ENDPOINT");
    let replayed = outboxd(&db, &["replay", other_event, "--json"], 0).await;
    let replayed: Value = serde_json::from_str(replayed.stdout.trim()).expect("JSON");
    assert_eq!(
        replayed,
        json!({ "deliveries": [format!("{other_event}:{endpoint}")] })
    );

    // The endpoint as text: failing since the first 500, disabled with its reason, and
    // the previous secret's end after a rotation.
    let endpoint = endpoint.to_string();
    outboxd(
        &db,
        &[
            "endpoint",
            "disable",
            &endpoint,
            "--reason",
            "maintenance window",
        ],
        0,
    )
    .await;
    outboxd(
        &db,
        &["endpoint", "rotate-secret", &endpoint, "--grace", "2h"],
        0,
    )
    .await;
    let shown = outboxd(&db, &["endpoint", "show", &endpoint], 0).await;
    let out = &shown.stdout;
    assert_eq!(field(out, "id"), endpoint);
    assert_eq!(field(out, "url"), url);
    assert_eq!(field(out, "event_types"), "*");
    assert_eq!(field(out, "description"), "billing");
    assert_eq!(field(out, "active"), "false");
    assert_eq!(field(out, "disabled_reason"), "maintenance window");
    for key in ["failing_since", "previous_secret_signs_until"] {
        let at = field(out, key);
        assert!(
            humantime::parse_rfc3339(at).is_ok(),
            "{key}: {at:?} is an RFC 3339 time"
        );
    }
    assert!(
        !out.contains("whsec_"),
        "no secret in `endpoint show`: {out}"
    );
}
