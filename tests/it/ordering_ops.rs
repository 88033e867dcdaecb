//! The operator surface of ordered delivery (docs/ordering.md, section 3): re-drive,
//! discard, replay, enabling without the backlog, retention, and what `stats`, the
//! admin API and the metrics show, each keeping every key's order. Lines are built by
//! hand in SQL where the runtime's part is not what is tested, and through a real
//! dispatcher where it is.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use outboxd::admin::AdminState;
use outboxd::endpoint::{self, DeadHead, EndpointUpdate};
use outboxd::inspect::{self, DeliveryId};
use outboxd::redrive::{self, KeyAction};
use outboxd::retention::{RetentionPolicy, prune};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::harness::{Receiver, Reply, RunningDispatcher, TestDb, eventually, test_config};

/// An ordered event, fanned out by hand: its log row (written at commit by the trigger)
/// is taken away, as the sequencer does.
async fn ordered_event(db: &TestDb, key: &str, n: i32) -> i64 {
    let id: i64 = db
        .client
        .query_one(
            "INSERT INTO webhook_outbox (event_type, payload, ordering_key, processed_at)
             VALUES ('order.updated', jsonb_build_object('n', $2::int), $1, now())
             RETURNING id",
            &[&key, &n],
        )
        .await
        .expect("insert an ordered event")
        .get(0);
    db.client
        .execute(
            "DELETE FROM webhook_ordering_log WHERE event_id = $1",
            &[&id],
        )
        .await
        .expect("take its log row");
    id
}

/// A delivery of `event` in `state`, numbered `seq` in its key's line.
async fn delivery(db: &TestDb, event: i64, endpoint: i64, key: &str, seq: i64, state: &str) {
    db.client
        .execute(
            "INSERT INTO webhook_deliveries (event_id, endpoint_id, state, ordering_key, ordering_seq)
             VALUES ($1, $2, $3, $4, $5)",
            &[&event, &endpoint, &state, &key, &seq],
        )
        .await
        .expect("insert a delivery");
}

/// The key row naming `head` (numbered `seq`) as the line's head.
async fn line(db: &TestDb, endpoint: i64, key: &str, head: i64, seq: i64, blocked: bool) {
    db.client
        .execute(
            "INSERT INTO webhook_ordering_keys
                 (endpoint_id, ordering_key, head_event_id, head_seq, blocked_since)
             VALUES ($1, $2, $3, $4, CASE WHEN $5 THEN now() END)",
            &[&endpoint, &key, &head, &seq, &blocked],
        )
        .await
        .expect("insert a key row");
}

async fn state(db: &TestDb, event: i64, endpoint: i64) -> String {
    db.delivery(event, endpoint).await.state
}

/// The line's head, if the key has a line.
async fn head(db: &TestDb, endpoint: i64, key: &str) -> Option<i64> {
    db.client
        .query_opt(
            "SELECT head_event_id FROM webhook_ordering_keys
             WHERE endpoint_id = $1 AND ordering_key = $2",
            &[&endpoint, &key],
        )
        .await
        .expect("read the key row")
        .map(|r| r.get(0))
}

/// What the settle does when a head ends: its state, then the line moves on.
async fn end_head(db: &TestDb, event: i64, endpoint: i64, how: &str) {
    db.client
        .execute(
            "UPDATE webhook_deliveries SET state = $3, locked_by = NULL, locked_until = NULL
             WHERE event_id = $1 AND endpoint_id = $2",
            &[&event, &endpoint, &how],
        )
        .await
        .expect("end the head");
    db.client
        .execute(
            "SELECT webhook_ordering_advance(ARRAY[$1::bigint], ARRAY[$2::bigint], 'block')",
            &[&event, &endpoint],
        )
        .await
        .expect("advance");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_an_old_ordered_delivery_goes_next_not_beside_the_head() {
    let db = TestDb::new("ordering_ops_replay").await;
    let (ep, _) = db.add_endpoint("http://127.0.0.1:9/hook", &[]).await;
    let old = ordered_event(&db, "k", 1).await;
    let current = ordered_event(&db, "k", 2).await;
    let later = ordered_event(&db, "k", 3).await;
    delivery(&db, old, ep, "k", 1, "delivered").await;
    delivery(&db, current, ep, "k", 2, "pending").await;
    delivery(&db, later, ep, "k", 3, "queued").await;
    line(&db, ep, "k", current, 2, false).await;

    let replayed = redrive::replay(&db.client, old, None).await.unwrap();
    assert_eq!(
        replayed,
        [DeliveryId {
            event_id: old,
            endpoint_id: ep
        }]
    );
    // Not beside the head: queued behind it (the old statement made it pending, a
    // second request of the key in flight).
    assert_eq!(state(&db, old, ep).await, "queued");
    assert_eq!(head(&db, ep, "k").await, Some(current));
    // Next, before the later event.
    end_head(&db, current, ep, "delivered").await;
    assert_eq!(state(&db, old, ep).await, "pending");
    assert_eq!(state(&db, later, ep).await, "queued");
    end_head(&db, old, ep, "delivered").await;
    assert_eq!(state(&db, later, ep).await, "pending");

    // A key without a line: the replay is its head, at once.
    let alone = ordered_event(&db, "alone", 1).await;
    delivery(&db, alone, ep, "alone", 7, "delivered").await;
    redrive::replay(&db.client, alone, Some(ep)).await.unwrap();
    assert_eq!(state(&db, alone, ep).await, "pending");
    assert_eq!(head(&db, ep, "alone").await, Some(alone));

    // An endpoint registered after the fan-out gets a delivery in the key's line, with
    // the event's number.
    let (late_ep, _) = db.add_endpoint("http://127.0.0.1:9/late", &[]).await;
    let busy = ordered_event(&db, "k", 4).await;
    delivery(&db, busy, late_ep, "k", 4, "pending").await;
    line(&db, late_ep, "k", busy, 4, false).await;
    redrive::replay(&db.client, old, Some(late_ep))
        .await
        .unwrap();
    let added = db.delivery(old, late_ep).await;
    assert_eq!(added.state, "queued");
    let seq: Option<i64> = db
        .client
        .query_one(
            "SELECT ordering_seq FROM webhook_deliveries WHERE event_id = $1 AND endpoint_id = $2",
            &[&old, &late_ep],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(seq, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrying_dead_ordered_deliveries_keeps_each_line() {
    let db = TestDb::new("ordering_ops_retry").await;
    let (ep, _) = db.add_endpoint("http://127.0.0.1:9/hook", &[]).await;
    // A blocked key: its dead head, two behind it.
    let dead_head = ordered_event(&db, "blocked", 1).await;
    let behind = ordered_event(&db, "blocked", 2).await;
    delivery(&db, dead_head, ep, "blocked", 1, "dead").await;
    delivery(&db, behind, ep, "blocked", 2, "queued").await;
    line(&db, ep, "blocked", dead_head, 1, true).await;
    // A key that skipped a dead delivery and has moved on to another head.
    let skipped = ordered_event(&db, "skipped", 1).await;
    let moved_on = ordered_event(&db, "skipped", 2).await;
    delivery(&db, skipped, ep, "skipped", 1, "dead").await;
    delivery(&db, moved_on, ep, "skipped", 2, "pending").await;
    line(&db, ep, "skipped", moved_on, 2, false).await;

    let retried = redrive::retry_dead_matching(&db.client, &Default::default())
        .await
        .unwrap();
    assert_eq!(retried.len(), 2);
    // The blocked head is due again and the key no longer blocked.
    assert_eq!(state(&db, dead_head, ep).await, "pending");
    assert_eq!(state(&db, behind, ep).await, "queued");
    let blocked: bool = db
        .scalar("SELECT blocked_since IS NOT NULL FROM webhook_ordering_keys WHERE ordering_key = 'blocked'")
        .await;
    assert!(!blocked);
    // The skipped one waits for the current head, then goes before anything later.
    assert_eq!(state(&db, skipped, ep).await, "queued");
    assert_eq!(
        db.scalar::<i64>("SELECT count(*) FROM webhook_deliveries WHERE state = 'pending' AND ordering_key = 'skipped'")
            .await,
        1,
        "one request of a key at a time"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enable_discarding_the_backlog_leaves_nothing_queued() {
    let db = TestDb::new("ordering_ops_enable").await;
    let (ep, _) = db.add_endpoint("http://127.0.0.1:9/hook", &[]).await;
    endpoint::disable(&db.client, ep, "test").await.unwrap();
    let parked = ordered_event(&db, "a", 1).await;
    let queued = ordered_event(&db, "a", 2).await;
    delivery(&db, parked, ep, "a", 1, "parked").await;
    delivery(&db, queued, ep, "a", 2, "queued").await;
    line(&db, ep, "a", parked, 1, false).await;
    // A head still in flight when the endpoint was disabled, one behind it.
    let flying = ordered_event(&db, "b", 3).await;
    let waiting = ordered_event(&db, "b", 4).await;
    delivery(&db, flying, ep, "b", 3, "pending").await;
    db.client
        .execute(
            "UPDATE webhook_deliveries SET locked_by = 'w', locked_until = now() + interval '1 minute'
             WHERE event_id = $1",
            &[&flying],
        )
        .await
        .unwrap();
    delivery(&db, waiting, ep, "b", 4, "queued").await;
    line(&db, ep, "b", flying, 3, false).await;

    let mut client = db.connect().await;
    let discarded = endpoint::enable_discarding_backlog(&mut client, ep)
        .await
        .unwrap();
    assert_eq!(discarded, 3);
    assert_eq!(
        db.scalar::<i64>("SELECT count(*) FROM webhook_deliveries WHERE state = 'queued'")
            .await,
        0,
        "nothing left queued"
    );
    assert_eq!(head(&db, ep, "a").await, None, "the discarded line is gone");
    // The head in flight still goes; its settle ends the line.
    assert_eq!(head(&db, ep, "b").await, Some(flying));
    assert_eq!(state(&db, flying, ep).await, "pending");
    end_head(&db, flying, ep, "delivered").await;
    assert_eq!(head(&db, ep, "b").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_enable_resumes_parked_heads_and_leaves_their_lines() {
    let db = TestDb::new("ordering_ops_resume").await;
    let (ep, _) = db.add_endpoint("http://127.0.0.1:9/hook", &[]).await;
    endpoint::disable(&db.client, ep, "test").await.unwrap();
    let parked = ordered_event(&db, "a", 1).await;
    let queued = ordered_event(&db, "a", 2).await;
    delivery(&db, parked, ep, "a", 1, "parked").await;
    delivery(&db, queued, ep, "a", 2, "queued").await;
    line(&db, ep, "a", parked, 1, false).await;
    assert_eq!(endpoint::enable(&db.client, ep).await.unwrap(), 1);
    assert_eq!(state(&db, parked, ep).await, "pending");
    assert_eq!(state(&db, queued, ep).await, "queued");
    assert_eq!(head(&db, ep, "a").await, Some(parked));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_blocked_heads_and_prunes_removed_endpoints_lines() {
    let db = TestDb::new("ordering_ops_retention").await;
    let (kept_ep, _) = db.add_endpoint("http://127.0.0.1:9/kept", &[]).await;
    let (gone_ep, _) = db.add_endpoint("http://127.0.0.1:9/gone", &[]).await;
    // A blocked key, long dead, with one behind it; and a dead delivery no line names.
    let blocked = ordered_event(&db, "k", 1).await;
    let behind = ordered_event(&db, "k", 2).await;
    let stray = ordered_event(&db, "other", 3).await;
    delivery(&db, blocked, kept_ep, "k", 1, "dead").await;
    delivery(&db, behind, kept_ep, "k", 2, "queued").await;
    delivery(&db, stray, kept_ep, "other", 3, "dead").await;
    line(&db, kept_ep, "k", blocked, 1, true).await;
    // A removed endpoint's line: its parked head and one queued.
    delivery(&db, blocked, gone_ep, "k", 1, "parked").await;
    delivery(&db, behind, gone_ep, "k", 2, "queued").await;
    line(&db, gone_ep, "k", blocked, 1, false).await;
    endpoint::remove(&db.client, gone_ep).await.unwrap();
    db.client
        .batch_execute(
            "UPDATE webhook_deliveries SET updated_at = now() - interval '30 days';
             UPDATE webhook_outbox SET created_at = now() - interval '30 days';
             UPDATE webhook_endpoints SET deleted_at = now() - interval '30 days'
             WHERE deleted_at IS NOT NULL;",
        )
        .await
        .unwrap();

    let policy = RetentionPolicy {
        delivered: Duration::from_secs(3600),
        dead: Duration::from_secs(86_400),
    };
    prune(&db.pool().await, policy, Duration::from_secs(30))
        .await
        .unwrap();

    let left: Vec<(i64, i64, String)> = db
        .client
        .query(
            "SELECT event_id, endpoint_id, state FROM webhook_deliveries ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        left,
        [
            (blocked, kept_ep, "dead".to_owned()),
            (behind, kept_ep, "queued".to_owned())
        ],
        "the blocked head and its line stay; the stray dead one and the removed endpoint's line go"
    );
    assert_eq!(head(&db, kept_ep, "k").await, Some(blocked));
    assert_eq!(head(&db, gone_ep, "k").await, None);
}

/// An admin API on a loopback port, stopped on drop.
struct Api {
    base: String,
    http: reqwest::Client,
    stop: CancellationToken,
}

const TOKEN: &str = "ordering-ops-admin-token-0123456789";

impl Api {
    async fn start(db: &TestDb) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = AdminState::new(db.pool().await, TOKEN, Duration::from_secs(60));
        let stop = CancellationToken::new();
        tokio::spawn(outboxd::admin::serve(listener, state, stop.clone()));
        Self {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            stop,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(TOKEN);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request.send().await.expect("the admin API answers");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap()
        };
        (status, value)
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_head_policy_per_endpoint() {
    let db = TestDb::new("ordering_ops_policy").await;
    let api = Api::start(&db).await;
    let (status, created) = api
        .call(
            reqwest::Method::POST,
            "/v1/endpoints",
            Some(json!({"url": "http://127.0.0.1:9/a", "ordering_dead_head": "skip"})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["ordering_dead_head"], "skip");
    let id = created["id"].as_i64().unwrap();
    let (status, patched) = api
        .call(
            reqwest::Method::PATCH,
            &format!("/v1/endpoints/{id}"),
            Some(json!({"ordering_dead_head": null})),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["ordering_dead_head"], Value::Null);
    let (status, refused) = api
        .call(
            reqwest::Method::PATCH,
            &format!("/v1/endpoints/{id}"),
            Some(json!({"ordering_dead_head": "drop"})),
        )
        .await;
    assert_eq!(status, 400, "{refused}");

    // The library and the CLI.
    let e = endpoint::update(
        &db.client,
        id,
        EndpointUpdate {
            ordering_dead_head: Some(Some(DeadHead::Block)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(e.ordering_dead_head, Some(DeadHead::Block));
    let id_text = id.to_string();
    db.cli(
        &[
            "endpoint",
            "update",
            &id_text,
            "--ordering-dead-head",
            "skip",
        ],
        0,
    )
    .await;
    let (shown, _) = db.cli(&["endpoint", "show", &id_text], 0).await;
    assert!(shown.contains("ordering_dead_head: skip"), "{shown}");
    db.cli(
        &[
            "endpoint",
            "update",
            &id_text,
            "--ordering-dead-head",
            "default",
        ],
        0,
    )
    .await;
    let (shown, _) = db.cli(&["endpoint", "show", &id_text], 0).await;
    assert!(!shown.contains("ordering_dead_head"), "{shown}");
    db.cli(
        &[
            "endpoint",
            "update",
            &id_text,
            "--ordering-dead-head",
            "later",
        ],
        2,
    )
    .await;
}

/// A dispatcher whose receiver fails every request while `failing` is set; endpoints
/// block dead heads, and one attempt is all a delivery gets.
async fn blocked_key_scene(
    label: &str,
) -> (
    TestDb,
    Receiver,
    Arc<AtomicBool>,
    RunningDispatcher,
    i64,
    Vec<i64>,
) {
    let db = TestDb::new(label).await;
    let receiver = Receiver::start().await;
    let failing = Arc::new(AtomicBool::new(true));
    let fail = Arc::clone(&failing);
    receiver.script("/hook", move |_| {
        if fail.load(Ordering::SeqCst) {
            Reply::status(500)
        } else {
            Reply::ok()
        }
    });
    let (ep, _) = db.add_endpoint(&receiver.url("/hook"), &[]).await;
    endpoint::update(
        &db.client,
        ep,
        EndpointUpdate {
            ordering_dead_head: Some(Some(DeadHead::Block)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut config = test_config(label);
    config.max_attempts = 1;
    config.ordering_dead_head = DeadHead::Skip;
    let dispatcher = RunningDispatcher::start(&db.url, config);
    let mut client = db.connect().await;
    let tx = client.transaction().await.unwrap();
    let mut events = Vec::new();
    for n in 0..3 {
        let id: i64 = tx
            .query_one(
                "INSERT INTO webhook_outbox (event_type, payload, ordering_key)
                 VALUES ('order.updated', jsonb_build_object('n', $1::int), 'k') RETURNING id",
                &[&n],
            )
            .await
            .unwrap()
            .get(0);
        events.push(id);
    }
    tx.commit().await.unwrap();
    // The endpoint's own policy, not the dispatcher's: the key stops at its dead head.
    db.wait_until("SELECT count(*) = 1 FROM webhook_ordering_keys WHERE blocked_since IS NOT NULL")
        .await;
    failing.store(false, Ordering::SeqCst);
    (db, receiver, failing, dispatcher, ep, events)
}

/// The `n` of each successful request, in arrival order.
fn delivered_in_order(receiver: &Receiver, failures: usize) -> Vec<i64> {
    receiver
        .requests()
        .iter()
        .skip(failures)
        .map(|r| r.json()["data"]["n"].as_i64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_of_a_blocked_head_resumes_the_key_in_order() {
    let (db, receiver, _failing, dispatcher, ep, events) =
        blocked_key_scene("ordering_ops_redrive").await;
    assert_eq!(state(&db, events[0], ep).await, "dead");
    assert_eq!(state(&db, events[1], ep).await, "queued");
    assert_eq!(receiver.count(), 1, "nothing behind the dead head was sent");

    // Visible: stats, the metric's sample, the admin API, the CLI.
    let stats = inspect::stats(&db.client).await.unwrap();
    let mine = stats
        .endpoints
        .iter()
        .find(|e| e.endpoint_id == ep)
        .unwrap();
    assert_eq!(
        (mine.blocked_keys, mine.ordering_keys, mine.queued),
        (1, 1, 2)
    );
    assert!(mine.oldest_blocked_since.is_some());
    assert_eq!(stats.depth["queued"], 2);
    let sample = outboxd::metrics::sample_queue(&db.client).await.unwrap();
    assert_eq!(sample.blocked_keys, [(ep, 1)]);
    // The dispatcher's own sample, taken every 10 s.
    let line = format!("outboxd_ordering_blocked_keys{{endpoint=\"{ep}\"}} 1\n");
    let metrics = Arc::clone(&dispatcher.metrics);
    eventually(
        "the gauge shows the blocked key",
        Duration::from_secs(30),
        || {
            let shown = metrics.render().contains(&line);
            async move { shown }
        },
    )
    .await;
    let api = Api::start(&db).await;
    let (status, page) = api
        .call(
            reqwest::Method::GET,
            &format!("/v1/endpoints/{ep}/ordering/blocked"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["items"][0]["ordering_key"], "k");
    assert_eq!(page["items"][0]["head_event_id"], events[0]);
    assert_eq!(page["items"][0]["queued"], 2);
    let (listed, _) = db
        .cli(&["ordering", "blocked", "--endpoint", &ep.to_string()], 0)
        .await;
    assert!(listed.contains(&format!("{}:{ep}", events[0])), "{listed}");

    let (status, answer) = api
        .call(
            reqwest::Method::POST,
            &format!("/v1/endpoints/{ep}/ordering/blocked/k/redrive"),
            None,
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    db.wait_all_in_state(3, "delivered").await;
    dispatcher.stop().await;
    assert_eq!(delivered_in_order(&receiver, 1), [0, 1, 2]);
    assert_eq!(head(&db, ep, "k").await, None);
    // Nothing blocked now: a second re-drive is refused.
    let (status, _) = api
        .call(
            reqwest::Method::POST,
            &format!("/v1/endpoints/{ep}/ordering/blocked/k/redrive"),
            None,
        )
        .await;
    assert_eq!(status, 404, "the key has no line any more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_of_a_blocked_head_moves_the_key_on() {
    let (db, receiver, _failing, dispatcher, ep, events) =
        blocked_key_scene("ordering_ops_discard").await;
    let mut client = db.connect().await;
    let done = redrive::discard_blocked(&mut client, ep, "k")
        .await
        .unwrap();
    assert_eq!(
        done,
        KeyAction::Done(DeliveryId {
            event_id: events[0],
            endpoint_id: ep
        })
    );
    db.wait_until(&format!(
        "SELECT count(*) = 2 FROM webhook_deliveries WHERE endpoint_id = {ep} AND state = 'delivered'"
    ))
    .await;
    dispatcher.stop().await;
    assert_eq!(state(&db, events[0], ep).await, "discarded");
    assert_eq!(delivered_in_order(&receiver, 1), [1, 2]);
    assert_eq!(head(&db, ep, "k").await, None);
    assert_eq!(
        redrive::redrive_blocked(&db.client, ep, "k").await.ok(),
        None,
        "no line: not found"
    );
    // A key that is in line but not blocked: nothing to do.
    let head_event = ordered_event(&db, "busy", 1).await;
    delivery(&db, head_event, ep, "busy", 1, "parked").await;
    line(&db, ep, "busy", head_event, 1, false).await;
    let mut client = db.connect().await;
    assert_eq!(
        redrive::discard_blocked(&mut client, ep, "busy")
            .await
            .unwrap(),
        KeyAction::NotBlocked
    );
    db.cli(
        &[
            "ordering",
            "redrive",
            "--endpoint",
            &ep.to_string(),
            "--key",
            "busy",
        ],
        4,
    )
    .await;
    assert_eq!(state(&db, head_event, ep).await, "parked");
}

/// Which of the two a re-drive and a settle ending the head take the key row first
/// must not matter: the line keeps exactly one head and loses no delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_racing_the_settle_of_the_head_keeps_one_head() {
    let db = TestDb::new("ordering_ops_race").await;
    let (ep, _) = db.add_endpoint("http://127.0.0.1:9/hook", &[]).await;
    for settle_first in [true, false] {
        let key = if settle_first { "settle" } else { "replay" };
        let old = ordered_event(&db, key, 1).await;
        let current = ordered_event(&db, key, 2).await;
        delivery(&db, old, ep, key, 1, "delivered").await;
        delivery(&db, current, ep, key, 2, "pending").await;
        line(&db, ep, key, current, 2, false).await;
        let mut settler = db.connect().await;
        let mut operator = db.connect().await;
        let end = "UPDATE webhook_deliveries SET state = 'delivered'
                   WHERE event_id = $1 AND endpoint_id = $2";
        let advance =
            "SELECT webhook_ordering_advance(ARRAY[$1::bigint], ARRAY[$2::bigint], 'block')";
        if settle_first {
            // The settle ends the head and, nothing being queued, deletes the line;
            // the replay waits for it, then starts a line of its own.
            let tx = settler.transaction().await.unwrap();
            tx.execute(end, &[&current, &ep]).await.unwrap();
            tx.execute(advance, &[&current, &ep]).await.unwrap();
            let replay = tokio::spawn(async move {
                redrive::replay(&operator, old, Some(ep)).await.unwrap();
            });
            db.wait_until(
                "SELECT count(*) > 0 FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .await;
            tx.commit().await.unwrap();
            replay.await.unwrap();
            assert_eq!(state(&db, old, ep).await, "pending");
            assert_eq!(head(&db, ep, key).await, Some(old));
        } else {
            // The replay queues behind the head; the settle waits for it, then sees it
            // queued and makes it the head.
            let tx = operator.transaction().await.unwrap();
            redrive::replay(&tx, old, Some(ep)).await.unwrap();
            let settle = tokio::spawn(async move {
                let tx = settler.transaction().await.unwrap();
                tx.execute(end, &[&current, &ep]).await.unwrap();
                tx.execute(advance, &[&current, &ep]).await.unwrap();
                tx.commit().await.unwrap();
            });
            db.wait_until(
                "SELECT count(*) > 0 FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .await;
            tx.commit().await.unwrap();
            settle.await.unwrap();
            assert_eq!(state(&db, old, ep).await, "pending");
            assert_eq!(head(&db, ep, key).await, Some(old));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_keys_page_and_take_any_key_in_the_path() {
    let db = TestDb::new("ordering_ops_paths").await;
    let (ep, _) = db.add_endpoint("http://127.0.0.1:9/hook", &[]).await;
    let keys = ["a/b c", "order-42", "é?#%"];
    for (n, key) in keys.iter().enumerate() {
        let seq = n as i64 + 1;
        let dead = ordered_event(&db, key, 1).await;
        let next = ordered_event(&db, key, 2).await;
        delivery(&db, dead, ep, key, seq, "dead").await;
        delivery(&db, next, ep, key, seq + 10, "queued").await;
        line(&db, ep, key, dead, seq, true).await;
    }
    let api = Api::start(&db).await;
    let mut listed = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut path = format!("/v1/endpoints/{ep}/ordering/blocked?limit=2");
        if let Some(cursor) = &after {
            path.push_str(&format!("&after={}", encode(cursor)));
        }
        let (status, page) = api.call(reqwest::Method::GET, &path, None).await;
        assert_eq!(status, 200, "{page}");
        for item in page["items"].as_array().unwrap() {
            assert_eq!(item["queued"], 1);
            listed.push(item["ordering_key"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => after = Some(cursor.to_owned()),
            None => break,
        }
    }
    let mut expected: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
    expected.sort();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(
        sorted, expected,
        "every blocked key once, over pages: {listed:?}"
    );

    for key in keys {
        let (status, answer) = api
            .call(
                reqwest::Method::POST,
                &format!(
                    "/v1/endpoints/{ep}/ordering/blocked/{}/discard",
                    encode(key)
                ),
                None,
            )
            .await;
        assert_eq!(status, 200, "{key}: {answer}");
        assert_eq!(
            db.scalar::<i64>(&format!(
                "SELECT count(*) FROM webhook_deliveries
                 WHERE endpoint_id = {ep} AND ordering_key = '{}' AND state = 'pending'",
                key.replace('\'', "''")
            ))
            .await,
            1,
            "{key}: the next one is due"
        );
    }
    for (path, expected) in [
        (
            format!("/v1/endpoints/{ep}/ordering/blocked/order-42/discard"),
            409,
        ),
        (
            format!("/v1/endpoints/{ep}/ordering/blocked/nothing/redrive"),
            404,
        ),
        (
            format!("/v1/endpoints/{ep}/ordering/blocked/a%00b/redrive"),
            400,
        ),
        (
            "/v1/endpoints/999/ordering/blocked/k/redrive".to_owned(),
            404,
        ),
    ] {
        let (status, answer) = api.call(reqwest::Method::POST, &path, None).await;
        assert_eq!(status, expected, "{path}: {answer}");
        assert!(answer["error"]["code"].is_string(), "{answer}");
    }
    let (status, _) = api
        .call(
            reqwest::Method::GET,
            "/v1/endpoints/999/ordering/blocked",
            None,
        )
        .await;
    assert_eq!(status, 404);
}

/// Percent-encodes everything but unreserved characters, as a path segment or query
/// value needs.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
