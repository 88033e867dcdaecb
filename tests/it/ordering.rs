//! Ordered delivery per key (issue 15), through real `outboxd run` processes, real
//! PostgreSQL and a receiver on 127.0.0.1 that checks the contract itself.
//!
//! The contract (docs/ordering.md, section 1): for each endpoint and key, deliveries go
//! one at a time, in the order the producers' transactions committed (events of one
//! transaction in insert order). What every test asserts of what the receiver saw, per
//! (endpoint, key), is [`check`]'s list:
//!
//! - never two requests of one (endpoint, key) in flight at once (the receiver notes
//!   every request that arrives while another of its key is still being answered);
//! - the *line* is the order of first arrivals. It must agree with the producers' commit
//!   order as the producers saw it: if the `COMMIT` of B's transaction returned before
//!   the `COMMIT` of A's was sent, B's events come before A's; in one transaction, insert
//!   order. (It must also follow the numbers the database drew, `ordering_seq`: the same
//!   order for every endpoint.) This is measured producer-side, not read back from the
//!   runtime, so it holds the runtime to the contract rather than to itself;
//! - an event is sent for the first time only after the one before it in the line was
//!   answered 2xx (or, where a test lets it end dead, after its last attempt);
//! - a duplicate (at-least-once: a lease taken over after a crash, an outcome lost) may
//!   only be a re-send of the key's current event, the last one that went out: once the
//!   next one has arrived, nothing earlier may arrive again. A re-send of an older event
//!   would reach the consumer after a newer one, which is exactly the disorder the
//!   contract forbids;
//! - every expected event arrives, answered 2xx (or ended dead where allowed).
//!
//! Each of these fails on a dispatcher that ignores the order (how each test was checked
//! against one is in its comment): the receiver answers slowly enough, or fails enough,
//! that concurrent or reordered sends show.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use crate::harness::{Spawned, TestDb, WAIT, eventually, unique};
use crate::noisy_neighbour::{dispatcher, stop};

// ---------------------------------------------------------------------------------------
// A receiver that knows about keys
// ---------------------------------------------------------------------------------------

/// One request as the receiver sees it when deciding its answer.
pub struct Incoming<'a> {
    pub path: &'a str,
    /// `data.k` of the payload: the event's ordering key (the tests put it there).
    pub key: Option<&'a str>,
    pub event_id: i64,
}

/// How to answer one request.
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    pub status: u16,
    pub delay: Duration,
}

impl Answer {
    pub fn ok(delay: Duration) -> Self {
        Self { status: 200, delay }
    }

    pub fn fail(delay: Duration) -> Self {
        Self { status: 500, delay }
    }
}

type Rule = Box<dyn FnMut(&Incoming<'_>) -> Answer + Send>;

/// A request as recorded, on one clock shared by arrivals and answers.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub path: String,
    pub key: Option<String>,
    pub event_id: i64,
    pub arrived: u64,
    /// (clock, status) once answered; `None` while held or if abandoned.
    pub answered: Option<(u64, u16)>,
}

struct KeyState {
    clock: u64,
    arrivals: Vec<Arrival>,
    per_event: HashMap<(String, i64), usize>,
    in_flight: HashMap<(String, String), usize>,
    /// Requests that arrived while another of their (path, key) was in flight.
    overlaps: Vec<String>,
    rule: Rule,
}

/// Counts a keyed request in flight until its handler ends (answered or dropped).
struct KeyGuard {
    state: Arc<Mutex<KeyState>>,
    slot: Option<(String, String)>,
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            if let Ok(mut s) = self.state.lock() {
                if let Some(n) = s.in_flight.get_mut(&slot) {
                    *n = n.saturating_sub(1);
                }
            }
        }
    }
}

/// An HTTP server on 127.0.0.1 that records (path, key, event) of every request in
/// arrival order, notes overlapping requests of one (path, key), and answers by a rule
/// the test can change while it runs. Stops when dropped.
pub struct KeyReceiver {
    addr: std::net::SocketAddr,
    state: Arc<Mutex<KeyState>>,
    server: JoinHandle<()>,
}

impl KeyReceiver {
    pub async fn start(rule: impl FnMut(&Incoming<'_>) -> Answer + Send + 'static) -> Self {
        let state = Arc::new(Mutex::new(KeyState {
            clock: 0,
            arrivals: Vec::new(),
            per_event: HashMap::new(),
            in_flight: HashMap::new(),
            overlaps: Vec::new(),
            rule: Box::new(rule),
        }));
        let app = Router::new()
            .fallback(receive_keyed)
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let addr = listener.local_addr().expect("receiver address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            state,
            server,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn arrivals(&self) -> Vec<Arrival> {
        self.state.lock().unwrap().arrivals.clone()
    }

    pub fn overlaps(&self) -> Vec<String> {
        self.state.lock().unwrap().overlaps.clone()
    }

    /// Requests of (path, event) so far.
    pub fn requests_of(&self, path: &str, event_id: i64) -> usize {
        self.state
            .lock()
            .unwrap()
            .per_event
            .get(&(path.to_owned(), event_id))
            .copied()
            .unwrap_or(0)
    }

    /// Whether (path, event) was answered 2xx.
    pub fn delivered(&self, path: &str, event_id: i64) -> bool {
        self.state.lock().unwrap().arrivals.iter().any(|a| {
            a.path == path
                && a.event_id == event_id
                && a.answered.is_some_and(|(_, s)| (200..300).contains(&s))
        })
    }

    /// Waits until `done` holds of the arrivals.
    pub async fn wait(&self, what: &str, bound: Duration, done: impl Fn(&[Arrival]) -> bool) {
        eventually(what, bound, || {
            let ok = done(&self.state.lock().unwrap().arrivals);
            async move { ok }
        })
        .await
    }
}

impl Drop for KeyReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn receive_keyed(
    State(state): State<Arc<Mutex<KeyState>>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let event_id: i64 = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("webhook-id is the event id");
    let payload: serde_json::Value = serde_json::from_slice(&body).expect("body is JSON");
    let key = payload["data"]["k"].as_str().map(str::to_owned);
    let (index, answer, _guard) = {
        let mut s = state.lock().unwrap();
        s.clock += 1;
        let arrived = s.clock;
        let mut guard = KeyGuard {
            state: Arc::clone(&state),
            slot: None,
        };
        if let Some(key) = &key {
            let slot = (path.clone(), key.clone());
            let now = s.in_flight.entry(slot.clone()).or_insert(0);
            *now += 1;
            if *now > 1 {
                let n = *now;
                s.overlaps.push(format!(
                    "event {event_id} of key {key} arrived at {path} while {} other(s) of the \
                     key were in flight",
                    n - 1
                ));
            }
            guard.slot = Some(slot);
        }
        *s.per_event.entry((path.clone(), event_id)).or_insert(0) += 1;
        let answer = (s.rule)(&Incoming {
            path: &path,
            key: key.as_deref(),
            event_id,
        });
        s.arrivals.push(Arrival {
            path: path.clone(),
            key,
            event_id,
            arrived,
            answered: None,
        });
        (s.arrivals.len() - 1, answer, guard)
    };
    if !answer.delay.is_zero() {
        tokio::time::sleep(answer.delay).await;
    }
    {
        let mut s = state.lock().unwrap();
        s.clock += 1;
        let clock = s.clock;
        s.arrivals[index].answered = Some((clock, answer.status));
    }
    (
        StatusCode::from_u16(answer.status).expect("valid status"),
        "answer",
    )
        .into_response()
}

/// 200 after `delay`.
fn always_ok(delay: Duration) -> impl FnMut(&Incoming<'_>) -> Answer + Send + 'static {
    move |_| Answer::ok(delay)
}

/// A share of requests answered 500, drawn from a seeded generator (the same draws in
/// every run, though which request gets which depends on arrival order), after `delay`.
fn failing_share(
    share: f64,
    seed: u64,
    delay: Duration,
) -> impl FnMut(&Incoming<'_>) -> Answer + Send + 'static {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    move |_| {
        if rng.random_bool(share) {
            Answer::fail(delay)
        } else {
            Answer::ok(delay)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Producers, and what they committed
// ---------------------------------------------------------------------------------------

/// An event as its producer committed it.
#[derive(Debug, Clone)]
pub struct Produced {
    pub key: Option<String>,
    /// Its transaction (an index into [`Committed::commits`]) and place in it.
    pub tx: usize,
    pub idx: usize,
}

/// Everything the producers committed, with when each `COMMIT` was sent and returned.
#[derive(Debug, Default)]
pub struct Committed {
    pub events: HashMap<i64, Produced>,
    pub commits: Vec<(Instant, Instant)>,
}

pub type Log = Arc<Mutex<Committed>>;

const INSERT: &str = "INSERT INTO webhook_outbox (event_type, payload, ordering_key)
     VALUES ('ordered.test', jsonb_build_object('k', $1::text), $1::text) RETURNING id";

/// One producer transaction: `begin`, one event per entry of `keys` in that order,
/// `business` (if any), a `pause` (so that transactions overlap), and the commit, timed. On an
/// error the transaction is rolled back and the error returned; nothing is logged.
async fn produce(
    client: &Client,
    begin: &str,
    business: Option<&str>,
    keys: &[Option<String>],
    pause: Duration,
    log: &Log,
) -> Result<Vec<i64>, tokio_postgres::Error> {
    let attempt = async {
        client.batch_execute(begin).await?;
        let mut ids = Vec::new();
        for key in keys {
            let id: i64 = client.query_one(INSERT, &[key]).await?.get(0);
            ids.push(id);
        }
        if let Some(sql) = business {
            client.batch_execute(sql).await?;
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        let sent = Instant::now();
        client.batch_execute("COMMIT").await?;
        Ok::<_, tokio_postgres::Error>((ids, sent, Instant::now()))
    };
    match attempt.await {
        Ok((ids, sent, returned)) => {
            committed(
                log,
                (sent, returned),
                ids.iter().copied().zip(keys.iter().cloned()),
            );
            Ok(ids)
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

/// One ordered event of `key`, committed on its own.
async fn one(client: &Client, key: &str, log: &Log) -> i64 {
    produce(
        client,
        "BEGIN",
        None,
        &[Some(key.to_owned())],
        Duration::ZERO,
        log,
    )
    .await
    .expect("produce")[0]
}

/// Ordered events `keys` (None: unordered), one transaction each, in that order.
async fn each(client: &Client, keys: &[Option<&str>], log: &Log) -> Vec<i64> {
    let mut ids = Vec::new();
    for key in keys {
        let keys = [key.map(str::to_owned)];
        ids.extend(
            produce(client, "BEGIN", None, &keys, Duration::ZERO, log)
                .await
                .expect("produce"),
        );
    }
    ids
}

/// How many events the producers committed.
fn produced(log: &Log) -> i64 {
    log.lock().unwrap().events.len() as i64
}

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect a producer");
    tokio::spawn(connection);
    client
}

// ---------------------------------------------------------------------------------------
// The check
// ---------------------------------------------------------------------------------------

/// What the test expects of the receiver at the end.
struct Expect<'a> {
    /// (path, endpoint id) of the endpoints that take every event.
    endpoints: &'a [(&'a str, i64)],
    /// (path, event) that may end dead instead of delivered.
    may_die: HashSet<(String, i64)>,
    /// (path, event) that must never have been sent (behind a blocked head).
    never: HashSet<(String, i64)>,
}

/// Every violation of the contract in what `receiver` saw of `log`'s events (see the
/// module's comment for the list). Empty when all is well.
async fn violations(
    db: &TestDb,
    receiver: &KeyReceiver,
    log: &Log,
    expect: &Expect<'_>,
) -> Vec<String> {
    let mut bad: Vec<String> = receiver.overlaps();
    let arrivals = receiver.arrivals();
    let seqs: HashMap<(i64, i64), Option<i64>> = db
        .client
        .query(
            "SELECT endpoint_id, event_id, ordering_seq FROM webhook_deliveries
             WHERE ordering_key IS NOT NULL OR event_id IN (
                 SELECT id FROM webhook_outbox WHERE ordering_key IS NOT NULL)",
            &[],
        )
        .await
        .expect("read ordering_seq")
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect();
    let log = log.lock().unwrap();

    for &(path, endpoint) in expect.endpoints {
        let here: Vec<&Arrival> = arrivals.iter().filter(|a| a.path == path).collect();
        // Completeness: every event once at least, answered 2xx, unless it may die.
        for (id, _) in log.events.iter() {
            let slot = (path.to_owned(), *id);
            let sent = here.iter().any(|a| a.event_id == *id);
            if expect.never.contains(&slot) {
                if sent {
                    bad.push(format!("{path}: event {id} was sent behind a blocked head"));
                }
                continue;
            }
            let ok = here.iter().any(|a| {
                a.event_id == *id && a.answered.is_some_and(|(_, s)| (200..300).contains(&s))
            });
            if !(ok || (sent && expect.may_die.contains(&slot))) {
                bad.push(format!(
                    "{path}: event {id} never delivered ({} requests)",
                    here.iter().filter(|a| a.event_id == *id).count()
                ));
            }
        }
        for a in &here {
            match log.events.get(&a.event_id) {
                None => bad.push(format!("{path}: event {} was never produced", a.event_id)),
                Some(p) if p.key != a.key => bad.push(format!(
                    "{path}: event {} arrived with key {:?}, produced with {:?}",
                    a.event_id, a.key, p.key
                )),
                Some(_) => {}
            }
        }

        let mut keys: BTreeMap<&str, Vec<&Arrival>> = BTreeMap::new();
        for a in &here {
            if let Some(key) = &a.key {
                keys.entry(key.as_str()).or_default().push(a);
            }
        }
        for (key, arrivals) in keys {
            let mut line: Vec<i64> = Vec::new();
            for a in &arrivals {
                let at = line.iter().position(|e| *e == a.event_id);
                match at {
                    // A re-send of the current event: a retry, or after a lost outcome.
                    Some(i) if i + 1 == line.len() => {}
                    Some(_) => bad.push(format!(
                        "{path} key {key}: event {} was sent again after {} had gone out",
                        a.event_id,
                        line.last().copied().unwrap_or_default()
                    )),
                    None => {
                        if let Some(&previous) = line.last() {
                            let slot = (path.to_owned(), previous);
                            let before: Vec<&&Arrival> = arrivals
                                .iter()
                                .filter(|p| p.event_id == previous && p.arrived < a.arrived)
                                .collect();
                            let delivered = before.iter().any(|p| {
                                p.answered.is_some_and(|(clock, s)| {
                                    clock < a.arrived && (200..300).contains(&s)
                                })
                            });
                            let ended = before
                                .iter()
                                .all(|p| p.answered.is_some_and(|(clock, _)| clock < a.arrived));
                            let may_die = expect.may_die.contains(&slot);
                            if !(delivered || (may_die && ended)) {
                                bad.push(format!(
                                    "{path} key {key}: event {} was sent before event \
                                     {previous} was delivered",
                                    a.event_id
                                ));
                            }
                        }
                        line.push(a.event_id);
                    }
                }
            }
            // The line against the producers' commit order, and the database's numbers.
            for (i, first) in line.iter().enumerate() {
                let Some(p) = log.events.get(first) else {
                    continue;
                };
                for later in &line[i + 1..] {
                    let Some(q) = log.events.get(later) else {
                        continue;
                    };
                    let wrong = if p.tx == q.tx {
                        q.idx < p.idx
                    } else {
                        // q's COMMIT returned before p's was sent: q committed first.
                        log.commits[q.tx].1 < log.commits[p.tx].0
                    };
                    if wrong {
                        bad.push(format!(
                            "{path} key {key}: event {later} committed before event {first} \
                             but arrived after it"
                        ));
                    }
                }
            }
            let numbers: Vec<Option<i64>> = line
                .iter()
                .map(|e| seqs.get(&(endpoint, *e)).copied().flatten())
                .collect();
            if numbers.iter().any(Option::is_none) {
                bad.push(format!(
                    "{path} key {key}: deliveries without an ordering_seq: {line:?} {numbers:?}"
                ));
            } else if numbers.windows(2).any(|w| w[0] >= w[1]) {
                bad.push(format!(
                    "{path} key {key}: arrived out of ordering_seq order: {line:?} {numbers:?}"
                ));
            }
        }
    }
    bad
}

/// Asserts [`violations`] is empty, showing the first few.
async fn check(db: &TestDb, receiver: &KeyReceiver, log: &Log, expect: &Expect<'_>) {
    let bad = violations(db, receiver, log, expect).await;
    assert!(
        bad.is_empty(),
        "{} violations of the ordering contract, the first ones:\n{}",
        bad.len(),
        bad.iter().take(25).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// Every endpoint takes every event, and all must be delivered.
fn everything<'a>(endpoints: &'a [(&'a str, i64)]) -> Expect<'a> {
    Expect {
        endpoints,
        may_die: HashSet::new(),
        never: HashSet::new(),
    }
}

/// Delivery rows per state.
async fn states(db: &TestDb) -> BTreeMap<String, i64> {
    db.client
        .query(
            "SELECT state, count(*) FROM webhook_deliveries GROUP BY state",
            &[],
        )
        .await
        .expect("count states")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Waits until every one of `total` deliveries is delivered.
async fn all_delivered(db: &TestDb, total: i64, bound: Duration) {
    let deadline = Instant::now() + bound;
    loop {
        let now = states(db).await;
        if now.get("delivered").copied() == Some(total) && now.values().sum::<i64>() == total {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not all {total} deliveries delivered within {bound:?}: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Nothing left in any line: no key rows, no log rows, no queued deliveries.
async fn lines_empty(db: &TestDb) {
    let left: (i64, i64, i64) = {
        let row = db
            .client
            .query_one(
                "SELECT (SELECT count(*) FROM webhook_ordering_keys),
                        (SELECT count(*) FROM webhook_ordering_log),
                        (SELECT count(*) FROM webhook_deliveries WHERE state = 'queued')",
                &[],
            )
            .await
            .expect("read the lines");
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!(
        left,
        (0, 0, 0),
        "(key rows, log rows, queued deliveries) left"
    );
}

/// How long an ordered event may take to arrive. Longer than [`WAIT`]: a producer of
/// the same database that has drawn its number and not committed holds every later
/// ordered event back (the horizon), and the machine is shared with other tests.
const ORDERED_WAIT: Duration = Duration::from_secs(60);

/// Dispatcher settings of these tests: a circuit that never opens (the failures here
/// are injected on purpose, and a paused endpoint only slows the test), on top of
/// `noisy_neighbour::dispatcher`'s quick polls and quick, unending retries.
const NO_CIRCUIT: (&str, &str) = ("WEBHOOK_CIRCUIT_FAILURES", "1000000");

// ---------------------------------------------------------------------------------------
// 1. Crashes, failures and concurrent producers
// ---------------------------------------------------------------------------------------

/// Four dispatchers, two endpoints whose receiver fails 30% of requests, 2,000 events
/// (a tenth unordered) over 200 keys from six producers writing the same keys at once
/// (a fifth of their transactions on five hot keys, held open a moment so that they
/// overlap), and one dispatcher killed with SIGKILL mid-run and restarted:
/// every event arrives, each (endpoint, key) in commit order, one at a time, duplicates
/// only of a key's current event. Fails on a dispatcher that ignores the order: with 30%
/// of first attempts failing, a key's next event goes out before its retried one is
/// delivered (checked against main before the runtime: thousands of violations).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_failures_and_concurrent_producers_keep_each_key_in_order() {
    const PRODUCERS: usize = 6;
    const EVENTS_PER_PRODUCER: usize = 333;
    const KEYS: usize = 200;
    let db = TestDb::new("ord_crash").await;
    let receiver = KeyReceiver::start(failing_share(0.3, 15, Duration::from_millis(3))).await;
    let (a, _) = db.add_endpoint(&receiver.url("/a"), &[]).await;
    let (b, _) = db.add_endpoint(&receiver.url("/b"), &[]).await;
    let endpoints = [("/a", a), ("/b", b)];
    let env = [
        NO_CIRCUIT,
        // A lease a killed dispatcher's heads are taken over after, within the test.
        ("WEBHOOK_LEASE_MS", "4000"),
        ("WEBHOOK_HTTP_TIMEOUT_MS", "2000"),
        ("WEBHOOK_BATCH_SIZE", "100"),
    ];
    let victim_id = unique("ord_crash_victim");
    let mut victim_env = env.to_vec();
    victim_env.push(("WEBHOOK_WORKER_ID", victim_id.as_str()));
    let victim = dispatcher(&db, "ord_crash", &victim_env);
    let others: Vec<Spawned> = (1..4)
        .map(|i| dispatcher(&db, &format!("ord_crash{i}"), &env))
        .collect();

    let log: Log = Arc::default();
    let producers: Vec<JoinHandle<Vec<String>>> = (0..PRODUCERS)
        .map(|p| {
            let url = db.url.clone();
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let client = connect(&url).await;
                let mut rng = rand::rngs::StdRng::seed_from_u64(p as u64);
                let mut made = 0;
                let mut errors = Vec::new();
                while made < EVENTS_PER_PRODUCER {
                    let keys: Vec<Option<String>> = if rng.random_bool(0.1) {
                        vec![None]
                    } else {
                        let hot = rng.random_bool(0.2);
                        (0..rng.random_range(1..=3))
                            .map(|_| {
                                let k = if hot {
                                    rng.random_range(0..5)
                                } else {
                                    rng.random_range(0..KEYS)
                                };
                                Some(format!("key-{k}"))
                            })
                            .collect()
                    };
                    let pause = Duration::from_millis(rng.random_range(0..3));
                    match produce(&client, "BEGIN", None, &keys, pause, &log).await {
                        Ok(ids) => made += ids.len(),
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                errors
            })
        })
        .collect();

    // Mid-run (requests for a third of the deliveries), SIGKILL one dispatcher, and
    // start it again with the same worker id.
    let total_events = PRODUCERS * EVENTS_PER_PRODUCER;
    receiver
        .wait(
            "a third of the first deliveries",
            Duration::from_secs(120),
            |arrivals| arrivals.len() > total_events * 2 / 3,
        )
        .await;
    let mut victim = victim;
    victim.child.start_kill().expect("SIGKILL the dispatcher");
    let killed = victim.finish(Duration::from_secs(30)).await;
    assert_eq!(killed.code, None, "killed by a signal");
    let restarted = dispatcher(&db, "ord_crash", &victim_env);

    let mut errors = Vec::new();
    for producer in producers {
        errors.extend(producer.await.expect("producer task"));
    }
    assert!(errors.is_empty(), "producers failed: {errors:?}");
    let events = produced(&log);
    assert!(events >= total_events as i64);
    all_delivered(&db, events * 2, Duration::from_secs(300)).await;
    for d in others {
        stop(d).await;
    }
    stop(restarted).await;

    check(&db, &receiver, &log, &everything(&endpoints)).await;
    lines_empty(&db).await;
    let arrivals = receiver.arrivals();
    let mut delivered_at: HashMap<(&str, i64), u64> = HashMap::new();
    let mut resent = 0;
    for a in &arrivals {
        if delivered_at
            .get(&(a.path.as_str(), a.event_id))
            .is_some_and(|at| *at < a.arrived)
        {
            resent += 1;
        }
        if let Some((at, 200..=299)) = a.answered {
            delivered_at
                .entry((a.path.as_str(), a.event_id))
                .or_insert(at);
        }
    }
    // Re-sent after a 2xx: the at-least-once duplicates the kill caused (an outcome
    // lost with its dispatcher), each checked above to be its key's current event.
    eprintln!(
        "ord_crash: {events} events, {} deliveries, {} requests, {resent} re-sent after a 2xx",
        events * 2,
        arrivals.len()
    );
}

// ---------------------------------------------------------------------------------------
// 2. Producers at every isolation level
// ---------------------------------------------------------------------------------------

/// `producers` connections per `begin`, all at once, each committing `txs` transactions
/// of a business insert and one to three events of ten shared keys, held open a moment.
/// Returns every producer error.
async fn isolation_producers(
    url: &str,
    begins: &[&'static str],
    producers: usize,
    txs: usize,
    log: &Log,
) -> Vec<String> {
    let mut tasks = Vec::new();
    for (g, begin) in begins.iter().enumerate() {
        for p in 0..producers {
            let url = url.to_owned();
            let log = Arc::clone(log);
            let begin = *begin;
            tasks.push(tokio::spawn(async move {
                let client = connect(&url).await;
                let mut rng = rand::rngs::StdRng::seed_from_u64((g * 100 + p) as u64);
                let mut errors = Vec::new();
                for _ in 0..txs {
                    let keys: Vec<Option<String>> = (0..rng.random_range(1..=3))
                        .map(|_| Some(format!("key-{}", rng.random_range(0..10))))
                        .collect();
                    let pause = Duration::ZERO;
                    if let Err(e) = produce(
                        &client,
                        begin,
                        Some("INSERT INTO test_orders (note) VALUES ('business')"),
                        &keys,
                        pause,
                        &log,
                    )
                    .await
                    {
                        errors.push(format!(
                            "{begin}: {e} {:?}",
                            e.as_db_error().map(|d| (d.code().code(), d.message()))
                        ));
                    }
                }
                errors
            }));
        }
    }
    let mut errors = Vec::new();
    for task in tasks {
        errors.extend(task.await.expect("producer task"));
    }
    errors
}

/// Runs `begins` producers against `db` beside one dispatcher, a receiver failing a
/// fifth of requests, and checks that no producer failed and every key is in order.
async fn isolation_scenario(db: &TestDb, producer_url: &str, begins: &[&'static str], label: &str) {
    db.client
        .batch_execute(
            "CREATE TABLE test_orders (id bigserial PRIMARY KEY, note text);
             CREATE FUNCTION test_orders_check() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN PERFORM pg_sleep(0.002); RETURN NULL; END $$;
             CREATE CONSTRAINT TRIGGER test_orders_check AFTER INSERT ON test_orders
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION test_orders_check();",
        )
        .await
        .expect("business table");
    let receiver = KeyReceiver::start(failing_share(0.2, 2, Duration::from_millis(2))).await;
    let (hook, _) = db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let outboxd = dispatcher(db, label, &[NO_CIRCUIT]);
    let log: Log = Arc::default();
    let errors = isolation_producers(producer_url, begins, 4, 60, &log).await;
    assert!(
        errors.is_empty(),
        "{} producer transactions failed: {errors:#?}",
        errors.len()
    );
    let events = produced(&log);
    all_delivered(db, events, Duration::from_secs(120)).await;
    stop(outboxd).await;
    check(db, &receiver, &log, &everything(&[("/hook", hook)])).await;
    lines_empty(db).await;
}

/// Producers at READ COMMITTED, REPEATABLE READ and SERIALIZABLE at once, on the same
/// ten keys, each transaction with a business insert beside its events: none fails (the
/// numbering trigger reads nothing and waits for nothing; the variant that numbered the
/// producer's own row failed 90% of SERIALIZABLE producers), and every key arrives in
/// commit order. Fails on a dispatcher that ignores order: a fifth of the requests fail,
/// and a key's later events overtake the retried one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_at_every_isolation_level_never_fail_and_stay_in_order() {
    let db = TestDb::new("ord_iso").await;
    isolation_scenario(
        &db,
        &db.url.clone(),
        &[
            "BEGIN ISOLATION LEVEL READ COMMITTED",
            "BEGIN ISOLATION LEVEL REPEATABLE READ",
            "BEGIN ISOLATION LEVEL SERIALIZABLE",
        ],
        "ord_iso",
    )
    .await;
}

/// The same in a database whose `default_transaction_isolation` is `serializable`, with
/// producers that only say BEGIN (nine of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_in_a_serializable_database_never_fail_and_stay_in_order() {
    let db = TestDb::new("ord_serdb").await;
    db.client
        .batch_execute(&format!(
            "ALTER DATABASE {} SET default_transaction_isolation = 'serializable'",
            db.name
        ))
        .await
        .unwrap();
    let check_level = connect(&db.url).await;
    let level: String = check_level
        .query_one("SHOW transaction_isolation", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(level, "serializable");
    drop(check_level);
    isolation_scenario(
        &db,
        &db.url.clone(),
        &["BEGIN", "BEGIN", "BEGIN"],
        "ord_serdb",
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// 3, 4. Commit order, and the horizon
// ---------------------------------------------------------------------------------------

/// Waits until an unordered event committed now has arrived: the dispatcher is up and
/// claiming.
async fn unordered_arrives(db: &TestDb, receiver: &KeyReceiver, path: &'static str, log: &Log) {
    let id = each(&db.client, &[None], log).await[0];
    receiver
        .wait("an unordered event is delivered", WAIT, move |arrivals| {
            arrivals.iter().any(|a| a.event_id == id && a.path == path)
        })
        .await;
}

/// Records a committed transaction (when its COMMIT was sent, and returned) and its
/// events, in insert order.
fn committed(
    log: &Log,
    commit: (Instant, Instant),
    events: impl IntoIterator<Item = (i64, Option<String>)>,
) {
    let mut log = log.lock().unwrap();
    log.commits.push(commit);
    let tx = log.commits.len() - 1;
    for (idx, (id, key)) in events.into_iter().enumerate() {
        log.events.insert(id, Produced { key, tx, idx });
    }
}

/// Waits until two events of key K have arrived.
async fn both_of_k_arrive(receiver: &KeyReceiver) {
    receiver
        .wait("K's two events arrive", ORDERED_WAIT, |arrivals| {
            arrivals
                .iter()
                .filter(|a| a.key.as_deref() == Some("K"))
                .count()
                >= 2
        })
        .await;
}

/// What arrived of `key`, in arrival order.
fn arrived_of(receiver: &KeyReceiver, key: &str) -> Vec<i64> {
    receiver
        .arrivals()
        .into_iter()
        .filter(|a| a.key.as_deref() == Some(key))
        .map(|a| a.event_id)
        .collect()
}

/// docs/ordering.md section 1: B inserts an event of key K first and stays open; A
/// inserts one of K and commits. The order is the commits': A's event first. B has
/// drawn no number yet (that happens in its commit), so A's event goes while B is still
/// open, as an unordered event would. Once B commits, K arrives A then B. Fails on order
/// = insert order (B's event has the smaller id: B then A), and on a horizon that waits
/// for every transaction with an xid (A's event waited for B: the rule before 2026-12-07).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_is_the_commit_order_not_the_insert_order() {
    let db = TestDb::new("ord_commit").await;
    let receiver = KeyReceiver::start(always_ok(Duration::ZERO)).await;
    let (hook, _) = db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let outboxd = dispatcher(&db, "ord_commit", &[]);
    let log: Log = Arc::default();
    unordered_arrives(&db, &receiver, "/hook", &log).await;

    let tx_b = connect(&db.url).await;
    tx_b.batch_execute("BEGIN").await.unwrap();
    let b: i64 = tx_b.query_one(INSERT, &[&Some("K")]).await.unwrap().get(0);
    let a = one(&connect(&db.url).await, "K", &log).await;
    assert!(b < a, "B inserted first: its id is the smaller");

    receiver
        .wait(
            "A's event arrives while B, which drew no number, is open",
            ORDERED_WAIT,
            |arrivals| arrivals.iter().any(|x| x.event_id == a),
        )
        .await;
    assert_eq!(arrived_of(&receiver, "K"), vec![a], "B has not committed");

    let sent = Instant::now();
    tx_b.batch_execute("COMMIT").await.unwrap();
    committed(&log, (sent, Instant::now()), [(b, Some("K".to_owned()))]);
    both_of_k_arrive(&receiver).await;
    assert_eq!(arrived_of(&receiver, "K"), vec![a, b], "A committed first");
    all_delivered(&db, produced(&log), ORDERED_WAIT).await;
    stop(outboxd).await;
    check(&db, &receiver, &log, &everything(&[("/hook", hook)])).await;
    lines_empty(&db).await;
}

/// A writing transaction held open (an insert into an unrelated table) and a
/// REPEATABLE READ reader holding its snapshot hold nothing back: an ordered event
/// committed meanwhile goes. Fails on a horizon that waits for every transaction with an
/// xid (the rule before 2026-12-07: the event waited for the writer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_that_drew_no_number_holds_nothing_back() {
    let db = TestDb::new("ord_horizon").await;
    db.client
        .batch_execute("CREATE TABLE unrelated (n int)")
        .await
        .unwrap();
    let receiver = KeyReceiver::start(always_ok(Duration::ZERO)).await;
    let (hook, _) = db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let outboxd = dispatcher(&db, "ord_horizon", &[]);
    let log: Log = Arc::default();
    unordered_arrives(&db, &receiver, "/hook", &log).await;

    let writer = connect(&db.url).await;
    writer
        .batch_execute("BEGIN; INSERT INTO unrelated VALUES (1)")
        .await
        .unwrap();
    let reader = connect(&db.url).await;
    reader
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM unrelated")
        .await
        .unwrap();
    let xid: Option<String> = reader
        .query_one("SELECT pg_current_xact_id_if_assigned()::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(xid, None, "the reader has no xid");
    let free = one(&db.client, "free", &log).await;
    receiver
        .wait(
            "an ordered event goes while a writer and a reader are open",
            ORDERED_WAIT,
            |a| a.iter().any(|a| a.event_id == free),
        )
        .await;
    writer.batch_execute("COMMIT").await.unwrap();
    reader.batch_execute("COMMIT").await.unwrap();

    all_delivered(&db, produced(&log), ORDERED_WAIT).await;
    stop(outboxd).await;
    check(&db, &receiver, &log, &everything(&[("/hook", hook)])).await;
    lines_empty(&db).await;
}

/// docs/ordering.md section 1, the edge of the horizon: B inserts an event of key K,
/// and its commit draws K's number, then waits in a slower deferred trigger of its own
/// (here on an advisory lock the test holds), still uncommitted. A then inserts an
/// event of K and commits: A's number is the larger, and A's event is visible first.
/// Neither it nor an event of another key committed after it may go while B is
/// committing (unordered events do); once B commits, K arrives B then A. Fails on a
/// sequencer without a horizon (A's event goes first) and on a horizon that does not
/// wait for the transactions holding the log's lock (checked: with `holders` always
/// empty in `ordering::HORIZON`, A's event went while B was committing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_that_drew_its_number_holds_later_numbers_until_it_commits() {
    let db = TestDb::new("ord_drawn").await;
    db.client
        .batch_execute(
            "CREATE TABLE slow_check (n int);
             CREATE FUNCTION slow_check() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN PERFORM pg_advisory_xact_lock(4215); RETURN NULL; END $$;
             CREATE CONSTRAINT TRIGGER slow_check AFTER INSERT ON slow_check
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_check();",
        )
        .await
        .unwrap();
    let receiver = KeyReceiver::start(always_ok(Duration::ZERO)).await;
    let (hook, _) = db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let outboxd = dispatcher(&db, "ord_drawn", &[]);
    let log: Log = Arc::default();
    unordered_arrives(&db, &receiver, "/hook", &log).await;

    let gate = connect(&db.url).await;
    gate.batch_execute("SELECT pg_advisory_lock(4215)")
        .await
        .unwrap();
    let tx_b = connect(&db.url).await;
    let b_pid: i32 = tx_b
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    tx_b.batch_execute("BEGIN").await.unwrap();
    let b: i64 = tx_b.query_one(INSERT, &[&Some("K")]).await.unwrap().get(0);
    // The outbox row's trigger was queued first, so it numbers B's event before the
    // slow check waits.
    tx_b.batch_execute("INSERT INTO slow_check VALUES (1)")
        .await
        .unwrap();
    let b_sent = Instant::now();
    let commit_b = tokio::spawn(async move {
        tx_b.batch_execute("COMMIT").await.unwrap();
        Instant::now()
    });
    eventually("B waits in its commit, its number drawn", WAIT, || async {
        db.client
            .query_one(
                "SELECT count(*) = 2 FROM pg_locks
                 WHERE pid = $1 AND ((locktype = 'relation' AND granted
                         AND relation = 'webhook_ordering_log'::regclass)
                     OR (locktype = 'advisory' AND NOT granted))",
                &[&b_pid],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
    })
    .await;
    let a = one(&db.client, "K", &log).await;
    let other = one(&db.client, "other", &log).await;
    unordered_arrives(&db, &receiver, "/hook", &log).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        (
            receiver.requests_of("/hook", a),
            receiver.requests_of("/hook", other)
        ),
        (0, 0),
        "a number after B's went out while B, which drew its number first, was committing"
    );

    gate.batch_execute("SELECT pg_advisory_unlock(4215)")
        .await
        .unwrap();
    let b_returned = commit_b.await.unwrap();
    committed(&log, (b_sent, b_returned), [(b, Some("K".to_owned()))]);
    both_of_k_arrive(&receiver).await;
    assert_eq!(arrived_of(&receiver, "K"), vec![b, a], "B drew first");
    all_delivered(&db, produced(&log), ORDERED_WAIT).await;
    stop(outboxd).await;
    check(&db, &receiver, &log, &everything(&[("/hook", hook)])).await;
    lines_empty(&db).await;
}

// ---------------------------------------------------------------------------------------
// 5. A head retried for a long time
// ---------------------------------------------------------------------------------------

/// The receiver answers 500 for key A only, and retries back off for seconds (3 s, then
/// 6 s...). While A's head is retried, the four other keys and the unordered events are
/// all delivered, in order, and A's later events are never sent (they stay `queued`).
/// Once the receiver takes A again, A's line follows in order. Fails on a dispatcher
/// that ignores order (A's later events go while its head retries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_retried_for_long_holds_back_only_its_key() {
    let db = TestDb::new("ord_retry").await;
    let healed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let receiver = {
        let healed = Arc::clone(&healed);
        KeyReceiver::start(move |r: &Incoming<'_>| {
            let delay = Duration::from_millis(5);
            if r.key == Some("A") && !healed.load(std::sync::atomic::Ordering::SeqCst) {
                Answer::fail(delay)
            } else {
                Answer::ok(delay)
            }
        })
        .await
    };
    let (hook, _) = db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let outboxd = dispatcher(
        &db,
        "ord_retry",
        &[
            NO_CIRCUIT,
            ("WEBHOOK_BACKOFF_BASE_MS", "3000"),
            ("WEBHOOK_BACKOFF_MAX_MS", "60000"),
        ],
    );
    let log: Log = Arc::default();
    let head = one(&db.client, "A", &log).await;
    let plan: Vec<Option<&str>> = (0..4)
        .flat_map(|_| [Some("A"), Some("B"), Some("C"), None, Some("D"), Some("E")])
        .collect();
    let ids = each(&db.client, &plan, &log).await;
    let later_a: Vec<i64> = ids
        .iter()
        .zip(&plan)
        .filter(|(_, k)| **k == Some("A"))
        .map(|(id, _)| *id)
        .collect();
    let others = ids.len() - later_a.len();

    // Everything but A, while A's head is retried.
    receiver
        .wait(
            "every other key and the unordered events",
            ORDERED_WAIT,
            |arrivals| {
                arrivals
                    .iter()
                    .filter(|a| {
                        a.key.as_deref() != Some("A") && a.answered.is_some_and(|(_, s)| s == 200)
                    })
                    .map(|a| a.event_id)
                    .collect::<HashSet<_>>()
                    .len()
                    == others
            },
        )
        .await;
    receiver
        .wait("A's head retried", 3 * WAIT, |arrivals| {
            arrivals.iter().filter(|a| a.event_id == head).count() >= 2
        })
        .await;
    let later_sent: Vec<i64> = later_a
        .iter()
        .copied()
        .filter(|id| receiver.requests_of("/hook", *id) > 0)
        .collect();
    assert_eq!(later_sent, Vec::<i64>::new(), "A's later events went out");
    let queued: i64 = db
        .scalar(&format!(
            "SELECT count(*) FROM webhook_deliveries WHERE state = 'queued' AND ordering_key = 'A'
               AND event_id <> {head}"
        ))
        .await;
    assert_eq!(queued, later_a.len() as i64, "A's later events are queued");

    healed.store(true, std::sync::atomic::Ordering::SeqCst);
    all_delivered(&db, produced(&log), Duration::from_secs(90)).await;
    stop(outboxd).await;
    check(&db, &receiver, &log, &everything(&[("/hook", hook)])).await;
    lines_empty(&db).await;
}

// ---------------------------------------------------------------------------------------
// 6. A dead head: block, skip, and the endpoint's own policy
// ---------------------------------------------------------------------------------------

/// Keys K (whose first event always fails) and L, three events each, to two endpoints:
/// `/global` follows the dispatcher's setting, `/own` has `ordering_dead_head = own`.
/// Two attempts at most. Checks each endpoint by its effective policy.
async fn dead_head(global: Option<&str>, own: &str, label: &str) {
    let db = TestDb::new(label).await;
    let doomed = Arc::new(Mutex::new(None::<i64>));
    let receiver = {
        let doomed = Arc::clone(&doomed);
        KeyReceiver::start(move |r: &Incoming<'_>| {
            let delay = Duration::from_millis(5);
            if Some(r.event_id) == *doomed.lock().unwrap() {
                Answer::fail(delay)
            } else {
                Answer::ok(delay)
            }
        })
        .await
    };
    let (global_ep, _) = db.add_endpoint(&receiver.url("/global"), &[]).await;
    let (own_ep, _) = db.add_endpoint(&receiver.url("/own"), &[]).await;
    db.client
        .execute(
            "UPDATE webhook_endpoints SET ordering_dead_head = $1 WHERE id = $2",
            &[&own, &own_ep],
        )
        .await
        .expect("set the endpoint's policy");
    let mut env = vec![NO_CIRCUIT, ("WEBHOOK_MAX_ATTEMPTS", "2")];
    if let Some(policy) = global {
        env.push(("WEBHOOK_ORDERING_DEAD_HEAD", policy));
    }
    let log: Log = Arc::default();
    // The head of K is committed before the dispatcher starts, so that the rule knows
    // its id before any request.
    let head = one(&db.client, "K", &log).await;
    *doomed.lock().unwrap() = Some(head);
    let outboxd = dispatcher(&db, label, &env);
    let ids = each(
        &db.client,
        &[Some("L"), Some("K"), Some("L"), Some("K"), Some("L")],
        &log,
    )
    .await;
    let behind = [ids[1], ids[3]];
    let effective = global.unwrap_or("block");

    // Both endpoints: the head ends dead after its two attempts, L is delivered.
    let l_count = 3;
    for (path, endpoint) in [("/global", global_ep), ("/own", own_ep)] {
        let policy = if path == "/own" { own } else { effective };
        db.wait_until_within(
            &format!(
                "SELECT count(*) FILTER (WHERE event_id = {head} AND state = 'dead') = 1
                    AND count(*) FILTER (WHERE ordering_key = 'L' AND state = 'delivered') = {l_count}
                 FROM webhook_deliveries WHERE endpoint_id = {endpoint}"
            ),
            ORDERED_WAIT,
        )
        .await;
        if policy == "skip" {
            db.wait_until_within(
                &format!(
                    "SELECT count(*) = 2 FROM webhook_deliveries WHERE endpoint_id = {endpoint}
                       AND event_id IN ({}, {}) AND state = 'delivered'",
                    behind[0], behind[1]
                ),
                ORDERED_WAIT,
            )
            .await;
        }
    }
    // Time for a wrong send to show on the blocking endpoint.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop(outboxd).await;

    let mut may_die = HashSet::new();
    let mut never = HashSet::new();
    for (path, endpoint) in [("/global", global_ep), ("/own", own_ep)] {
        let policy = if path == "/own" { own } else { effective };
        may_die.insert((path.to_owned(), head));
        assert_eq!(
            receiver.requests_of(path, head),
            2,
            "{path}: the head's two attempts"
        );
        let row: Option<(i64, bool)> = db
            .client
            .query_opt(
                "SELECT head_event_id, blocked_since IS NOT NULL FROM webhook_ordering_keys
                 WHERE endpoint_id = $1 AND ordering_key = 'K'",
                &[&endpoint],
            )
            .await
            .unwrap()
            .map(|r| (r.get(0), r.get(1)));
        let behind_states: Vec<String> = db
            .client
            .query(
                "SELECT state FROM webhook_deliveries WHERE endpoint_id = $1
                   AND event_id = ANY($2) ORDER BY event_id",
                &[&endpoint, &behind.to_vec()],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        if policy == "block" {
            assert_eq!(row, Some((head, true)), "{path}: K is blocked at its head");
            assert_eq!(
                behind_states,
                ["queued", "queued"],
                "{path}: K's line waits"
            );
            for id in behind {
                never.insert((path.to_owned(), id));
            }
        } else {
            assert_eq!(row, None, "{path}: K's line moved on and emptied");
            assert_eq!(behind_states, ["delivered", "delivered"], "{path}");
        }
    }
    check(
        &db,
        &receiver,
        &log,
        &Expect {
            endpoints: &[("/global", global_ep), ("/own", own_ep)],
            may_die,
            never,
        },
    )
    .await;
}

/// The default policy (`block`) on one endpoint, `skip` set on the other by SQL: the
/// first stops K at its dead head (later events `queued`, never sent, `blocked_since`
/// set) while L flows; the second sends K's next events after the dead head's last
/// attempt. Fails on a dispatcher that ignores order (K's later events go to both at
/// once, and before the head's retry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_head_blocks_its_key_by_default_and_an_endpoint_may_skip() {
    dead_head(None, "skip", "ord_block").await;
}

/// `WEBHOOK_ORDERING_DEAD_HEAD=skip` on the dispatcher, `block` set on one endpoint:
/// the other endpoint skips the dead head, this one blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_head_is_skipped_by_the_global_setting_and_an_endpoint_may_block() {
    dead_head(Some("skip"), "block", "ord_skip").await;
}

// ---------------------------------------------------------------------------------------
// 7. Fan-out: each endpoint its own line
// ---------------------------------------------------------------------------------------

/// Two endpoints take every event of six keys (five each); `/bad` answers 500 until
/// `/good` has all of them. `/good` gets every key in order without waiting for `/bad`
/// (none of `/bad`'s is delivered meanwhile); then `/bad` recovers and gets every key in
/// order too. Fails on a dispatcher that ignores order (`/bad`'s later events go before
/// their predecessors are delivered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_keeps_an_independent_order_per_endpoint() {
    let db = TestDb::new("ord_fanout").await;
    let bad_ok = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let receiver = {
        let bad_ok = Arc::clone(&bad_ok);
        KeyReceiver::start(move |r: &Incoming<'_>| {
            let delay = Duration::from_millis(5);
            if r.path == "/bad" && !bad_ok.load(std::sync::atomic::Ordering::SeqCst) {
                Answer::fail(delay)
            } else {
                Answer::ok(delay)
            }
        })
        .await
    };
    let (good, _) = db.add_endpoint(&receiver.url("/good"), &[]).await;
    let (bad, _) = db.add_endpoint(&receiver.url("/bad"), &[]).await;
    let outboxd = dispatcher(&db, "ord_fanout", &[NO_CIRCUIT]);
    let log: Log = Arc::default();
    let keys = ["k1", "k2", "k3", "k4", "k5", "k6"];
    let plan: Vec<Option<&str>> = (0..5).flat_map(|_| keys.map(Some)).collect();
    let ids = each(&db.client, &plan, &log).await;

    let all = ids.len();
    receiver
        .wait("/good has every event", ORDERED_WAIT, |arrivals| {
            arrivals
                .iter()
                .filter(|a| a.path == "/good" && a.answered.is_some_and(|(_, s)| s == 200))
                .map(|a| a.event_id)
                .collect::<HashSet<_>>()
                .len()
                == all
        })
        .await;
    let bad_delivered = ids
        .iter()
        .filter(|id| receiver.delivered("/bad", **id))
        .count();
    assert_eq!(bad_delivered, 0, "/bad delivered nothing meanwhile");
    assert!(
        ids.iter().any(|id| receiver.requests_of("/bad", *id) > 0),
        "/bad was tried"
    );

    bad_ok.store(true, std::sync::atomic::Ordering::SeqCst);
    all_delivered(&db, 2 * all as i64, Duration::from_secs(60)).await;
    stop(outboxd).await;
    check(
        &db,
        &receiver,
        &log,
        &everything(&[("/good", good), ("/bad", bad)]),
    )
    .await;
    lines_empty(&db).await;
}

// ---------------------------------------------------------------------------------------
// 8. Drain
// ---------------------------------------------------------------------------------------

/// SIGTERM while heads are in flight to a slow receiver (0.5 s a request; key k0's take
/// 5 s, longer than the 1 s drain, so they are cut off), then a restart: everything
/// arrives in order, one at a time per key, and nothing stays queued. Fails on a
/// dispatcher that ignores order (a key's five events are in flight together).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_with_heads_in_flight_keeps_every_key_in_order() {
    let db = TestDb::new("ord_drain").await;
    let receiver = KeyReceiver::start(|r: &Incoming<'_>| {
        if r.key == Some("k0") {
            Answer::ok(Duration::from_secs(5))
        } else {
            Answer::ok(Duration::from_millis(500))
        }
    })
    .await;
    let (hook, _) = db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let env = [
        NO_CIRCUIT,
        ("WEBHOOK_DRAIN_TIMEOUT_MS", "1000"),
        // The cut-off request of k0 outlives the drain, not its lease.
        ("WEBHOOK_LEASE_MS", "8000"),
        ("WEBHOOK_HTTP_TIMEOUT_MS", "7000"),
    ];
    let outboxd = dispatcher(&db, "ord_drain", &env);
    let log: Log = Arc::default();
    let keys = ["k0", "k1", "k2", "k3", "k4"];
    let plan: Vec<Option<&str>> = (0..4).flat_map(|_| keys.map(Some)).collect();
    let ids = each(&db.client, &plan, &log).await;

    receiver
        .wait("every key's head in flight", ORDERED_WAIT, |arrivals| {
            keys.iter().all(|k| {
                arrivals
                    .iter()
                    .any(|a| a.key.as_deref() == Some(*k) && a.answered.is_none())
            })
        })
        .await;
    stop(outboxd).await;
    let after_drain = states(&db).await;
    eprintln!("ord_drain: after the drain {after_drain:?}");
    assert!(
        after_drain.get("delivered").copied().unwrap_or(0) < ids.len() as i64,
        "the drain came before the end"
    );

    let restarted = dispatcher(&db, "ord_drain", &env);
    all_delivered(&db, ids.len() as i64, Duration::from_secs(90)).await;
    stop(restarted).await;
    check(&db, &receiver, &log, &everything(&[("/hook", hook)])).await;
    lines_empty(&db).await;
}

// ---------------------------------------------------------------------------------------
// A delayed head, and an event no endpoint takes
// ---------------------------------------------------------------------------------------

/// Key K: a first event delayed by `deliver_after` (3 s), a second of a type the
/// endpoint does not take, a third it takes. The order is strict: the third waits for
/// the delayed first (an unordered event goes meanwhile), and the one nobody takes does
/// not leave the line without a head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_head_holds_its_key_and_an_untaken_event_leaves_no_gap() {
    let db = TestDb::new("ord_delayed").await;
    let receiver = KeyReceiver::start(always_ok(Duration::from_millis(5))).await;
    db.add_endpoint(&receiver.url("/hook"), &["ordered.test"])
        .await;
    let outboxd = dispatcher(&db, "ord_delayed", &[]);
    let insert = |event_type: &'static str, delay_ms: i32| {
        let client = &db.client;
        async move {
            let id: i64 = client
                .query_one(
                    "INSERT INTO webhook_outbox (event_type, payload, ordering_key, deliver_after)
                     VALUES ($1, '{\"k\": \"K\"}', 'K', now() + $2::int * interval '1 ms')
                     RETURNING id",
                    &[&event_type, &delay_ms],
                )
                .await
                .expect("insert")
                .get(0);
            id
        }
    };
    let first = insert("ordered.test", 3000).await;
    let _untaken = insert("ignored.type", 0).await;
    let third = insert("ordered.test", 0).await;
    let log: Log = Arc::default();
    unordered_arrives(&db, &receiver, "/hook", &log).await;
    assert_eq!(
        receiver.requests_of("/hook", third),
        0,
        "the third event of K went before the delayed first"
    );
    both_of_k_arrive(&receiver).await;
    assert_eq!(arrived_of(&receiver, "K"), vec![first, third]);
    all_delivered(&db, 3, ORDERED_WAIT).await;
    stop(outboxd).await;
    assert!(receiver.overlaps().is_empty(), "{:?}", receiver.overlaps());
    lines_empty(&db).await;
}
