//! One bad endpoint never holds up the others (issue 16): a neighbour that times out
//! on every request, a backlog for one endpoint, and the per-endpoint limits
//! (`max_in_flight`, `rate_limit`, the per-dispatcher cap) held across several
//! dispatchers, counted at the receiver.
//!
//! The dispatchers are real `outboxd run` processes configured through the environment,
//! and the limits are set with `outboxd endpoint update`, as an operator does. Bounds are generous (tens of seconds): how fast the healthy
//! endpoint drains beside the bad one is the benchmark's business (`BENCH_SCENARIOS=noisy`);
//! these tests fail only where one endpoint holds another up by an order of magnitude.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{
    Receiver, Reply, Spawned, TestDb, eventually, outboxd_command, sigterm, unique,
};

/// `outboxd run` on `db`: loopback allowed, quick polls, quick retries that never run
/// out (so a failing neighbour keeps coming back, as it would for hours in production),
/// a short drain, and `env` on top.
pub fn dispatcher(db: &TestDb, label: &str, env: &[(&str, &str)]) -> Spawned {
    let mut command = outboxd_command();
    command
        .arg("run")
        .env("DATABASE_URL", &db.url)
        .env("WEBHOOK_ALLOW_PRIVATE_TARGETS", "true")
        .env("WEBHOOK_POLL_INTERVAL_MS", "100")
        .env("WEBHOOK_BACKOFF_BASE_MS", "50")
        .env("WEBHOOK_BACKOFF_MAX_MS", "200")
        .env("WEBHOOK_MAX_ATTEMPTS", "1000")
        .env("WEBHOOK_DRAIN_TIMEOUT_MS", "2000")
        .env("WEBHOOK_WORKER_ID", unique(label));
    for (name, value) in env {
        command.env(name, value);
    }
    Spawned::start(command)
}

/// SIGTERM, and the exit within a bound.
pub async fn stop(dispatcher: Spawned) {
    sigterm(dispatcher.pid());
    dispatcher.finish(Duration::from_secs(60)).await;
}

/// Delivered rows of one endpoint.
async fn delivered(db: &TestDb, endpoint: i64) -> i64 {
    db.scalar(&format!(
        "SELECT count(*) FROM webhook_deliveries WHERE endpoint_id = {endpoint} AND state = 'delivered'"
    ))
    .await
}

/// `outboxd ARGS` against `db`, as an operator runs it; asserts success, returns stdout.
pub async fn cli(db: &TestDb, args: &[&str]) -> String {
    db.cli(args, 0).await.0
}

/// Sets an endpoint's limits with `outboxd endpoint update ID ARGS`.
pub async fn update_endpoint(db: &TestDb, endpoint: i64, args: &[&str]) {
    let id = endpoint.to_string();
    let mut all = vec!["endpoint", "update", id.as_str()];
    all.extend_from_slice(args);
    cli(db, &all).await;
}

/// A neighbour that never answers within the HTTP timeout (1 s), taking every event as
/// the healthy endpoint does, with retries that come back at once and never run out.
/// Before per-endpoint isolation its deliveries filled every claim and held the send
/// slots a second at a time: 10,000 events took minutes to reach the healthy endpoint.
/// Now the healthy endpoint receives all 2,000 within a bound that is tens of times what
/// it needs alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timing_out_neighbour_does_not_hold_up_a_healthy_endpoint() {
    const EVENTS: i64 = 2_000;
    let db = TestDb::new("noisy_timeout").await;
    let receiver = Receiver::start().await;
    receiver.always("/slow", Reply::hang());
    let (healthy, _) = db.add_endpoint(&receiver.url("/healthy"), &[]).await;
    let (slow, _) = db.add_endpoint(&receiver.url("/slow"), &[]).await;
    let outboxd = dispatcher(&db, "noisy_timeout", &[("WEBHOOK_HTTP_TIMEOUT_MS", "1000")]);

    let started = Instant::now();
    db.enqueue_series(1, EVENTS as i32).await;
    let bound = Duration::from_secs(30);
    let deadline = started + bound;
    loop {
        let got = delivered(&db, healthy).await;
        if got == EVENTS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the healthy endpoint got {got} of {EVENTS} deliveries within {bound:?} beside a \
             neighbour that times out ({} requests to it so far)",
            receiver.count_to("/slow")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "noisy_timeout: {EVENTS} to the healthy endpoint in {:?}; {} requests to the slow one",
        started.elapsed(),
        receiver.count_to("/slow")
    );
    let healthy_requests = receiver.count_to("/healthy");
    assert!(
        healthy_requests >= EVENTS as usize,
        "{healthy_requests} requests"
    );
    // The neighbour was tried (it is not simply ignored), and nothing of it was lost.
    assert!(receiver.count_to("/slow") > 0);
    let slow_lost: i64 = db
        .scalar(&format!(
            "SELECT count(*) FROM webhook_deliveries WHERE endpoint_id = {slow} AND state <> 'pending'"
        ))
        .await;
    assert_eq!(slow_lost, 0, "the neighbour's deliveries wait, none dead");
    stop(outboxd).await;
}

/// `max_in_flight` = 3 on an endpoint whose receiver takes 100 ms per request, three
/// dispatchers: the receiver never handles more than 3 of its requests at once, and
/// every event arrives. An endpoint beside it, without a limit, is not held to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_is_held_across_three_dispatchers() {
    const EVENTS: i32 = 60;
    let db = TestDb::new("noisy_inflight").await;
    let receiver = Receiver::start().await;
    let slowish = Reply::ok().delay(Duration::from_millis(100));
    receiver.always("/capped", slowish.clone());
    receiver.always("/free", slowish);
    let (capped, _) = db.add_endpoint(&receiver.url("/capped"), &[]).await;
    let (free, _) = db.add_endpoint(&receiver.url("/free"), &[]).await;
    update_endpoint(&db, capped, &["--max-in-flight", "3"]).await;

    let dispatchers: Vec<Spawned> = (0..3)
        .map(|i| dispatcher(&db, &format!("noisy_inflight{i}"), &[]))
        .collect();
    db.enqueue_series(1, EVENTS).await;
    db.wait_all_in_state_within(i64::from(EVENTS) * 2, "delivered", Duration::from_secs(90))
        .await;
    for d in dispatchers {
        stop(d).await;
    }
    let max = receiver.max_in_flight_to("/capped");
    eprintln!(
        "noisy_inflight: at most {max} at once to the capped endpoint, {} to the free one",
        receiver.max_in_flight_to("/free")
    );
    assert!(
        max <= 3,
        "the receiver handled {max} requests to the endpoint with max_in_flight = 3 at once"
    );
    assert!(max >= 1);
    assert_eq!(receiver.count_to("/capped"), EVENTS as usize);
    assert!(
        receiver.max_in_flight_to("/free") > 3,
        "the unlimited endpoint beside it is not held to its neighbour's limit"
    );
    assert_eq!(delivered(&db, free).await, i64::from(EVENTS));
}

/// A limit set while dispatchers run holds from their next claim: before it, with no
/// endpoint limited, they claim with the fast statement (`claim::CLAIM_FAST`), which
/// must see the new limit and leave the decision to the full one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_set_while_dispatchers_run_holds_from_their_next_claim() {
    const EVENTS: i32 = 40;
    let db = TestDb::new("noisy_setlimit").await;
    let receiver = Receiver::start().await;
    receiver.always("/hook", Reply::ok().delay(Duration::from_millis(100)));
    let (endpoint, _) = db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let dispatchers: Vec<Spawned> = (0..2)
        .map(|i| dispatcher(&db, &format!("noisy_setlimit{i}"), &[]))
        .collect();
    db.enqueue("order.created", &json!({ "n": 0 })).await;
    db.wait_all_in_state_within(1, "delivered", Duration::from_secs(30))
        .await;

    update_endpoint(&db, endpoint, &["--max-in-flight", "2"]).await;
    db.enqueue_series(1, EVENTS).await;
    db.wait_all_in_state_within(i64::from(EVENTS) + 1, "delivered", Duration::from_secs(90))
        .await;
    for d in dispatchers {
        stop(d).await;
    }
    let max = receiver.max_in_flight_to("/hook");
    assert!(
        max <= 2,
        "the receiver handled {max} requests at once after max_in_flight = 2 was set"
    );
    assert_eq!(receiver.count_to("/hook"), EVENTS as usize + 1);
}

/// An endpoint without `max_in_flight` is held by each dispatcher to
/// `WEBHOOK_ENDPOINT_MAX_IN_FLIGHT` (4 here): once it has that many requests in progress
/// to the endpoint, its claims take nothing more for it until some end. A claim made
/// below the cap takes what it finds (a batch, 10 here), so the endpoint holds at most
/// the cap plus a batch, far below the dispatcher's `WEBHOOK_CONCURRENCY` (64): one
/// endpoint can never take all of a dispatcher's slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_dispatcher_caps_an_endpoint_without_a_limit() {
    const EVENTS: i32 = 60;
    let db = TestDb::new("noisy_cap").await;
    let receiver = Receiver::start().await;
    receiver.always("/hook", Reply::ok().delay(Duration::from_millis(100)));
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let outboxd = dispatcher(
        &db,
        "noisy_cap",
        &[
            ("WEBHOOK_ENDPOINT_MAX_IN_FLIGHT", "4"),
            ("WEBHOOK_BATCH_SIZE", "10"),
            ("WEBHOOK_CONCURRENCY", "64"),
        ],
    );
    db.enqueue_series(1, EVENTS).await;
    db.wait_all_in_state_within(i64::from(EVENTS), "delivered", Duration::from_secs(60))
        .await;
    stop(outboxd).await;
    let max = receiver.max_in_flight_to("/hook");
    eprintln!("noisy_cap: at most {max} at once");
    assert!(
        max <= 4 + 10,
        "one dispatcher sent {max} requests at once to an endpoint (cap 4, batch 10)"
    );
    assert_eq!(receiver.count_to("/hook"), EVENTS as usize);
}

/// The most requests seen in any window of the arrivals (sorted `Instant`s), against
/// `limit` per second with a 20% margin and one second's burst: every window of
/// `span` seconds (at least one) may hold `limit * span * 1.2 + limit`. Returns the
/// worst window as `(requests, span)` when one exceeds it.
fn over_rate(arrivals: &[Instant], limit: f64) -> Option<(usize, f64)> {
    let mut worst: Option<(usize, f64, f64)> = None;
    for i in 0..arrivals.len() {
        for j in i..arrivals.len() {
            let n = j - i + 1;
            let span = (arrivals[j] - arrivals[i]).as_secs_f64().max(1.0);
            let allowed = limit * span * 1.2 + limit;
            let excess = n as f64 / allowed;
            if excess > 1.0 && worst.is_none_or(|(_, _, e)| excess > e) {
                worst = Some((n, span, excess));
            }
        }
    }
    worst.map(|(n, span, _)| (n, span))
}

/// `rate_limit` = 20/s on an endpoint, three dispatchers, 120 events: the arrivals at the
/// receiver never exceed 20/s (with a second's burst and a 20% margin) over any window,
/// and all of them arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_is_held_across_dispatchers() {
    const EVENTS: i32 = 120;
    const LIMIT: i32 = 20;
    let db = TestDb::new("noisy_rate").await;
    let receiver = Receiver::start().await;
    let (limited, _) = db.add_endpoint(&receiver.url("/limited"), &[]).await;
    update_endpoint(&db, limited, &["--rate-limit", &LIMIT.to_string()]).await;
    let dispatchers: Vec<Spawned> = (0..3)
        .map(|i| dispatcher(&db, &format!("noisy_rate{i}"), &[]))
        .collect();
    db.enqueue_series(1, EVENTS).await;
    // 120 at 20/s is 5-6 s; the bound is for a loaded machine.
    db.wait_all_in_state_within(i64::from(EVENTS), "delivered", Duration::from_secs(60))
        .await;
    for d in dispatchers {
        stop(d).await;
    }
    let mut arrivals: Vec<Instant> = receiver
        .requests_to("/limited")
        .iter()
        .map(|r| r.arrived)
        .collect();
    arrivals.sort_unstable();
    assert_eq!(arrivals.len(), EVENTS as usize);
    let took = (arrivals[arrivals.len() - 1] - arrivals[0]).as_secs_f64();
    eprintln!(
        "noisy_rate: {} requests in {took:.2} s = {:.1}/s (limit {LIMIT}/s)",
        arrivals.len(),
        (arrivals.len() - 1) as f64 / took.max(1e-6)
    );
    if let Some((n, span)) = over_rate(&arrivals, f64::from(LIMIT)) {
        panic!(
            "{n} requests arrived within {span:.2} s at an endpoint limited to {LIMIT}/s \
             (all {} in {took:.2} s)",
            arrivals.len()
        );
    }
}

/// The checker itself: a steady 20/s passes, a burst of 120 in a second does not.
#[test]
fn over_rate_tells_a_burst_from_a_steady_flow() {
    let t0 = Instant::now();
    let steady: Vec<Instant> = (0..120)
        .map(|i| t0 + Duration::from_millis(50 * i))
        .collect();
    assert_eq!(over_rate(&steady, 20.0), None);
    let mut burst_then_steady: Vec<Instant> = (0..20).map(|_| t0).collect();
    burst_then_steady.extend((1..100).map(|i| t0 + Duration::from_millis(50 * i)));
    assert_eq!(over_rate(&burst_then_steady, 20.0), None);
    let burst: Vec<Instant> = (0..120)
        .map(|i| t0 + Duration::from_millis(8 * i))
        .collect();
    assert!(over_rate(&burst, 20.0).is_some());
}

/// A backlog of 20,000 deliveries for one endpoint whose receiver takes half a second per
/// request: fresh events for another endpoint, committed while the backlog drains, each
/// arrive within seconds, long before the backlog is gone (oldest-first claims sent them
/// only after the whole backlog), and the slow endpoint never holds all of the
/// dispatcher's send slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_does_not_keep_fresh_events_waiting() {
    const BACKLOG: i32 = 20_000;
    const FRESH: usize = 10;
    let db = TestDb::new("noisy_backlog").await;
    let receiver = Receiver::start().await;
    receiver.always("/backlog", Reply::ok().delay(Duration::from_millis(500)));
    let (backlogged, _) = db
        .add_endpoint(&receiver.url("/backlog"), &["backlog.*"])
        .await;
    db.add_endpoint(&receiver.url("/fresh"), &["order.*"]).await;
    // The backlog as fan-out leaves it: events processed, deliveries pending and due.
    db.client
        .execute(
            "WITH ev AS (
                 INSERT INTO webhook_outbox (event_type, payload, processed_at)
                 SELECT 'backlog.item', jsonb_build_object('n', g), now()
                 FROM generate_series(1, $1::int) AS g
                 RETURNING id
             )
             INSERT INTO webhook_deliveries (event_id, endpoint_id) SELECT id, $2 FROM ev",
            &[&BACKLOG, &backlogged],
        )
        .await
        .expect("the backlog");
    let outboxd = dispatcher(
        &db,
        "noisy_backlog",
        &[
            ("WEBHOOK_CONCURRENCY", "256"),
            ("WEBHOOK_ENDPOINT_MAX_IN_FLIGHT", "64"),
        ],
    );
    eventually(
        "the backlog starts flowing",
        Duration::from_secs(20),
        || async { receiver.count_to("/backlog") > 0 },
    )
    .await;

    let mut committed = Vec::new();
    for n in 0..FRESH {
        let at = Instant::now();
        let id = db.enqueue("order.created", &json!({ "n": n })).await;
        committed.push((id, at));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let bound = Duration::from_secs(10);
    let deadline = committed[FRESH - 1].1 + bound;
    while receiver.count_to("/fresh") < FRESH {
        assert!(
            Instant::now() < deadline,
            "{} of {FRESH} fresh events arrived within {bound:?} of the last commit, beside a \
             backlog ({} of its requests made)",
            receiver.count_to("/fresh"),
            receiver.count_to("/backlog")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let waits: Vec<Duration> = committed
        .iter()
        .map(|(id, at)| {
            let request = receiver
                .requests_to("/fresh")
                .into_iter()
                .find(|r| r.event_id() == *id)
                .expect("each fresh event arrived");
            request.arrived - *at
        })
        .collect();
    let left: i64 = db
        .scalar(&format!(
            "SELECT count(*) FROM webhook_deliveries WHERE endpoint_id = {backlogged} AND state = 'pending'"
        ))
        .await;
    eprintln!(
        "noisy_backlog: fresh waits {waits:?}; {left} backlog deliveries still pending; at most \
         {} backlog requests at once",
        receiver.max_in_flight_to("/backlog")
    );
    assert!(
        left > 0,
        "the backlog drained before the fresh events arrived: nothing was shown"
    );
    let worst = waits.iter().max().copied().unwrap_or_default();
    assert!(
        worst < bound,
        "a fresh event waited {worst:?} behind the backlog"
    );
    let held = receiver.max_in_flight_to("/backlog");
    assert!(
        held < 256,
        "the slow endpoint held {held} requests at once: every one of the dispatcher's 256 \
         send slots (its cap is 64)"
    );
    stop(outboxd).await;
}

/// One claim of up to 200 deliveries by a worker that sends nothing (its lease is short,
/// so a dispatcher takes the healthy endpoint's deliveries over), with `loads` as the
/// dispatcher's in-flight counts; returns how many deliveries to `endpoint` it brought.
async fn claim_for(db: &TestDb, loads: &outboxd::claim::Loads, endpoint: i64) -> usize {
    use outboxd::claim::{self, Claimed, Form, PayloadBudget};
    let budget = PayloadBudget::new(64 << 20, 4 << 20);
    let batch = claim::claim_unnamed(
        &db.client,
        "w",
        Duration::from_millis(500),
        200,
        (&budget, loads),
        Form::Full,
    )
    .await
    .expect("claim");
    batch
        .claimed
        .iter()
        .filter(|c| matches!(c, Claimed::Send(d) if d.endpoint_id == endpoint))
        .count()
}

/// This dispatcher has its cap of requests out to `endpoint` (64, as in
/// `Loads::idle(64)`), none answered in a second.
fn at_its_cap(loads: &mut outboxd::claim::Loads, endpoint: i64) {
    loads.endpoints = vec![endpoint];
    loads.in_flight = vec![64];
    loads.request_ms = vec![1_000.0];
}

/// A neighbour that can be sent nothing now, its circuit open or this dispatcher's
/// requests to it at its cap, takes no share of a claim: beside it a claim of 200 brings
/// 200 of the healthy endpoint's deliveries, where it brought 100 (sized as if both took
/// every event, half of every claim went to rows nobody sends now). The neighbour's
/// deliveries are still written, in its line, their attempts untouched, and once it can
/// take them every one of them arrives, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_neighbour_that_can_take_nothing_takes_no_share_of_a_claim() {
    for circuit_open in [true, false] {
        takes_no_share(circuit_open).await;
    }
}

async fn takes_no_share(circuit_open: bool) {
    const EVENTS: i32 = 400;
    let case = if circuit_open {
        "open circuit"
    } else {
        "at its cap"
    };
    let db = TestDb::new("noisy_share").await;
    let receiver = Receiver::start().await;
    let (healthy, _) = db.add_endpoint(&receiver.url("/healthy"), &[]).await;
    let (neighbour, _) = db.add_endpoint(&receiver.url("/neighbour"), &[]).await;
    db.enqueue_series(1, EVENTS).await;
    let mut loads = outboxd::claim::Loads::idle(64);
    if circuit_open {
        db.client
            .execute(
                "UPDATE webhook_endpoints SET circuit_open_until = now() + interval '1 hour'
                 WHERE id = $1",
                &[&neighbour],
            )
            .await
            .expect("open the circuit");
    } else {
        at_its_cap(&mut loads, neighbour);
    }
    let got = claim_for(&db, &loads, healthy).await;
    assert_eq!(
        got, 200,
        "{case}: a claim of 200 beside the neighbour brought {got} deliveries to the healthy one"
    );
    let waiting: i64 = db
        .scalar(&format!(
            "SELECT count(*) FROM webhook_deliveries
             WHERE endpoint_id = {neighbour} AND state = 'pending' AND attempts = 0
               AND locked_by IS NULL"
        ))
        .await;
    assert_eq!(
        waiting, 200,
        "{case}: the neighbour's deliveries wait in its line"
    );

    // Nothing lost: once it can take them, a dispatcher delivers all of it, each once.
    if circuit_open {
        cli(&db, &["endpoint", "close-circuit", &neighbour.to_string()]).await;
    }
    let outboxd = dispatcher(&db, "noisy_share", &[]);
    db.wait_all_in_state_within(i64::from(EVENTS) * 2, "delivered", Duration::from_secs(60))
        .await;
    stop(outboxd).await;
    for path in ["/healthy", "/neighbour"] {
        let mut events: Vec<i64> = receiver
            .requests_to(path)
            .iter()
            .map(|r| r.event_id())
            .collect();
        events.sort_unstable();
        events.dedup();
        assert_eq!(events.len(), EVENTS as usize, "{case}, {path}: every event");
        assert_eq!(
            receiver.count_to(path),
            EVENTS as usize,
            "{case}, {path}: each once"
        );
    }
}

/// Nor do the neighbour's due deliveries, which a claim can only move along its line:
/// with 150 of them due (from events fanned out earlier) and 400 fresh events, a claim
/// of 200 beside a neighbour whose circuit is open, or whose half-open probe is out, or
/// to which this dispatcher has its cap of requests out, brings 200 of the healthy
/// endpoint's deliveries, where it brought 50 (its room for fresh events was its size
/// less every due row, sent or not). The neighbour's due deliveries are moved along its
/// line, their attempts untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_neighbours_due_deliveries_take_no_share_of_a_claim() {
    for case in ["open circuit", "probe out", "at its cap"] {
        let db = TestDb::new("noisy_due_share").await;
        let (healthy, _) = db.add_endpoint("https://example.com/healthy", &[]).await;
        let (neighbour, _) = db.add_endpoint("https://example.com/neighbour", &[]).await;
        db.client
            .execute(
                "WITH e AS (
                     INSERT INTO webhook_outbox (event_type, payload, processed_at)
                     SELECT 'order.created', jsonb_build_object('n', n), now()
                     FROM generate_series(1, 150) n
                     RETURNING id)
                 INSERT INTO webhook_deliveries
                     (event_id, endpoint_id, state, attempts, next_attempt_at)
                 SELECT id, $1, 'pending', 0, now() - interval '1 minute' FROM e",
                &[&neighbour],
            )
            .await
            .expect("the neighbour's due deliveries");
        db.enqueue_series(151, 550).await;
        let mut loads = outboxd::claim::Loads::idle(64);
        let circuit = match case {
            "open circuit" => {
                Some("circuit_open_until = now() + interval '1 hour', circuit_probe_until = NULL")
            }
            "probe out" => Some(
                "circuit_open_until = now() - interval '1 second',
                 circuit_probe_until = now() + interval '1 hour'",
            ),
            _ => {
                at_its_cap(&mut loads, neighbour);
                None
            }
        };
        if let Some(set) = circuit {
            db.client
                .execute(
                    &format!("UPDATE webhook_endpoints SET {set} WHERE id = $1"),
                    &[&neighbour],
                )
                .await
                .expect("the neighbour's circuit");
        }
        let got = claim_for(&db, &loads, healthy).await;
        assert_eq!(
            got, 200,
            "{case}: a claim of 200 beside the neighbour's due deliveries brought {got} to the healthy endpoint"
        );
        let moved: i64 = db
            .scalar(&format!(
                "SELECT count(*) FROM webhook_deliveries
                 WHERE endpoint_id = {neighbour} AND event_id <= 150 AND state = 'pending'
                   AND attempts = 0 AND locked_by IS NULL
                   AND next_attempt_at > now() - interval '10 seconds'"
            ))
            .await;
        assert_eq!(
            moved, 150,
            "{case}: its due deliveries moved along its line"
        );
    }
}

/// A claim whose due deliveries fill it (a backlog due for another endpoint that has room
/// for it) still takes the first fresh event's deliveries. Left over, they were inserted
/// due now, behind the whole due backlog, and waited until claims had walked past all of
/// it: under a starved CPU that took `a_backlog_does_not_keep_fresh_events_waiting`'s
/// fresh events 10 s. Both claim statements.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_filled_by_due_work_still_takes_a_fresh_event() {
    use outboxd::claim::{self, Claimed, Form, PayloadBudget};
    for form in [Form::Full, Form::Fast] {
        let db = TestDb::new("noisy_filled").await;
        let (backlogged, _) = db
            .add_endpoint("https://example.com/backlog", &["backlog.*"])
            .await;
        let (fresh, _) = db
            .add_endpoint("https://example.com/fresh", &["order.*"])
            .await;
        db.client
            .execute(
                "WITH ev AS (
                     INSERT INTO webhook_outbox (event_type, payload, processed_at)
                     SELECT 'backlog.item', jsonb_build_object('n', g), now()
                     FROM generate_series(1, 1000) AS g
                     RETURNING id
                 )
                 INSERT INTO webhook_deliveries (event_id, endpoint_id) SELECT id, $1 FROM ev",
                &[&backlogged],
            )
            .await
            .expect("the backlog");
        let event = db.enqueue("order.created", &json!({ "n": 0 })).await;
        let budget = PayloadBudget::new(64 << 20, 4 << 20);
        let batch = claim::claim_unnamed(
            &db.client,
            "w",
            Duration::from_secs(60),
            200,
            (&budget, &claim::Loads::idle(64)),
            form,
        )
        .await
        .expect("claim");
        assert!(!batch.refused, "{form:?}");
        let taken = |endpoint: i64| {
            batch
                .claimed
                .iter()
                .filter(|c| matches!(c, Claimed::Send(d) if d.endpoint_id == endpoint))
                .count()
        };
        assert_eq!(
            taken(backlogged),
            200,
            "{form:?}: the due backlog fills the claim"
        );
        assert_eq!(
            taken(fresh),
            1,
            "{form:?}: the fresh event {event} was fanned out but not claimed: it waits behind \
             the due backlog"
        );
    }
}
