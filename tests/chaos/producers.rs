//! Producers: applications writing events inside their own transactions, continuously,
//! while the faults run. Each event's payload carries a unique `uid`; each producer
//! keeps a ledger of what it knows became of every uid it wrote:
//!
//! * **committed**: its COMMIT (or autocommit INSERT) returned success;
//! * **rolled back**: the producer rolled the transaction back on purpose;
//! * **failed**: the transaction failed before its COMMIT was sent (never committed);
//! * **ambiguous**: the connection was lost while the COMMIT was in flight, so it may or
//!   may not have committed. The database decides those at the end.
//!
//! Actions, each at a random isolation level (READ COMMITTED, REPEATABLE READ or
//! SERIALIZABLE, since the trigger must never fail a producer at any of them): a single
//! INSERT in autocommit, a single INSERT in a transaction, a multi-row INSERT (sometimes
//! two statements) in a transaction, a transaction that inserts and rolls back, an
//! event delayed by `deliver_after` by up to three seconds, and now and then a burst of
//! 50 to 200 events in one INSERT (a backlog for the faults to strike in).
//!
//! **Ordered events.** A share of the actions ([`Ordering::share`]) write events with an
//! `ordering_key`, so that the order each key's events must arrive in is known without
//! asking outboxd. Most keys belong to one producer (`p<k>-<i>`): it writes them one
//! action at a time on one connection, so its commit order is its write order, and each
//! event carries `key` and `n`, that key's counter, drawn in write order (several
//! events of a key in one transaction go in insert order, which is also their order).
//! A few keys are shared by two producers (`s<j>`, written by producers `j % P + 1` and
//! `(j + 1) % P + 1` at once): their order is the commit order, which only the database
//! knows (the deliveries' `ordering_seq`, drawn at commit); `n` then counts the writing
//! producer's own events of the key, which its commits keep in order. A transaction
//! with a shared key stays open up to [`SHARED_HOLD_MS`] after its insert, so that the
//! two producers' transactions overlap and one that inserted later often commits first.
//! Rolled-back and failed transactions leave gaps in `n`, nothing else.
//!
//! Producers connect as `chaos-producer-N`, so faults aimed at outboxd's backends never
//! hit them; only a PostgreSQL restart does, and they reconnect.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio_postgres::{Client, IsolationLevel};

use crate::observer::{connect, is_connection_error};

/// The event types producers write; endpoints subscribe to some of them.
pub const EVENT_TYPES: [&str; 5] = [
    "order.created",
    "order.paid",
    "customer.updated",
    "invoice.sent",
    "audit.entry",
];

/// A transaction that writes a shared key waits up to this long (uniformly drawn)
/// between its insert and its COMMIT.
pub const SHARED_HOLD_MS: u64 = 300;
/// The share of a producer's ordered events that go to its shared keys.
const SHARED_SHARE: f64 = 0.5;

/// Uids of producer `k` are `k * UID_SPACE + n`.
pub const UID_SPACE: i64 = 1_000_000_000;

/// Which keys ordered events use, and how many events get one.
#[derive(Debug, Clone, Copy)]
pub struct Ordering {
    /// The share of actions whose events carry an `ordering_key` (0 to 1).
    pub share: f64,
    /// Keys owned by one producer, per producer.
    pub owned_per_producer: usize,
    /// Keys shared by two producers, in all.
    pub shared: usize,
    /// Producers writing at once (who shares which key).
    pub producers: usize,
}

impl Ordering {
    /// The shared keys producer `k` (1-based) writes.
    fn shared_of(&self, k: usize) -> Vec<String> {
        (0..self.shared)
            .filter(|j| j % self.producers + 1 == k || (j + 1) % self.producers + 1 == k)
            .map(shared_key)
            .collect()
    }
}

/// The name of the `j`th shared key.
pub fn shared_key(j: usize) -> String {
    format!("s{j}")
}

/// Whether `key` is shared by two producers (its order is then the commit order).
pub fn is_shared(key: &str) -> bool {
    key.starts_with('s')
}

#[derive(Debug, Default)]
pub struct Ledger {
    pub committed: Vec<i64>,
    pub rolled_back: Vec<i64>,
    pub failed: Vec<i64>,
    pub ambiguous: Vec<i64>,
    /// Transactions that failed, by cause: `connection` and `57P0x`/`08xxx` codes are
    /// the injected PostgreSQL restarts; any other SQLSTATE is outboxd (its trigger)
    /// breaking a producer.
    pub errors: BTreeMap<String, u64>,
    /// The first few messages of errors that were not connection losses.
    pub harmful: Vec<String>,
    /// Committed transactions by action.
    pub actions: BTreeMap<&'static str, u64>,
    /// Committed transactions whose events carry an ordering key.
    pub ordered_transactions: u64,
}

impl Ledger {
    pub fn merge(&mut self, other: Ledger) {
        self.committed.extend(other.committed);
        self.rolled_back.extend(other.rolled_back);
        self.failed.extend(other.failed);
        self.ambiguous.extend(other.ambiguous);
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for m in other.harmful {
            if self.harmful.len() < 10 {
                self.harmful.push(m);
            }
        }
        for (k, v) in other.actions {
            *self.actions.entry(k).or_default() += v;
        }
        self.ordered_transactions += other.ordered_transactions;
    }
}

#[derive(Debug, Clone, Copy)]
enum Action {
    Autocommit,
    Single,
    Multi,
    Rollback,
    Delayed,
    Burst,
}

impl Action {
    fn label(self) -> &'static str {
        match self {
            Self::Autocommit => "autocommit insert",
            Self::Single => "single insert in a transaction",
            Self::Multi => "multi-row transaction",
            Self::Rollback => "rolled back",
            Self::Delayed => "delayed (deliver_after)",
            Self::Burst => "burst (one multi-row insert)",
        }
    }
}

/// Where a failure happened: before COMMIT was sent, or while it was in flight.
enum Failure {
    Before(tokio_postgres::Error),
    AtCommit(tokio_postgres::Error),
}

struct Producer {
    k: i64,
    url: String,
    rng: StdRng,
    next: i64,
    client: Option<Client>,
    /// The last error said the connection is gone: reconnect before the next action.
    lost: bool,
    ledger: Ledger,
    ordering: Ordering,
    /// This producer's own keys, and the shared keys it writes.
    owned: Vec<String>,
    shared: Vec<String>,
    /// The next `n` of each key (this producer's own count for a shared key).
    counters: HashMap<String, i64>,
}

/// One event to write: type, payload, ordering key.
type Row = (String, String, Option<String>);

/// Runs producer `k` until `until`, writing about `rate` events a second.
pub async fn run(
    k: usize,
    url: String,
    seed: u64,
    until: Instant,
    rate: f64,
    ordering: Ordering,
) -> Ledger {
    let mut p = Producer {
        k: k as i64,
        url,
        rng: StdRng::seed_from_u64(seed),
        next: 0,
        client: None,
        lost: false,
        ledger: Ledger::default(),
        ordering,
        owned: (0..ordering.owned_per_producer)
            .map(|i| format!("p{k}-{i}"))
            .collect(),
        shared: ordering.shared_of(k),
        counters: HashMap::new(),
    };
    while Instant::now() < until {
        let Some(client) = p.client.take() else {
            match connect(&p.url, &format!("chaos-producer-{k}")).await {
                Ok(client) => p.client = Some(client),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
            continue;
        };
        let action = match p.rng.random_range(0..200) {
            0..60 => Action::Autocommit,
            60..110 => Action::Single,
            110..158 => Action::Multi,
            158..182 => Action::Rollback,
            182..198 => Action::Delayed,
            _ => Action::Burst,
        };
        p.lost = false;
        let written = p.act(&client, action).await;
        if !p.lost && !client.is_closed() {
            p.client = Some(client);
        }
        let pause = written.max(1) as f64 / rate * p.rng.random_range(0.5..1.5);
        tokio::time::sleep(Duration::from_secs_f64(pause)).await;
    }
    p.ledger
}

impl Producer {
    fn uids(&mut self, n: usize) -> Vec<i64> {
        (0..n)
            .map(|_| {
                self.next += 1;
                self.k * UID_SPACE + self.next
            })
            .collect()
    }

    /// An event with this uid; with `ordered`, one of this producer's keys (a shared
    /// one with [`SHARED_SHARE`]) and that key's next `n`.
    fn event(&mut self, uid: i64, ordered: bool) -> Row {
        let event_type = EVENT_TYPES[self.rng.random_range(0..EVENT_TYPES.len())];
        let pad = if self.rng.random_bool(0.1) {
            "x".repeat(self.rng.random_range(100..4000))
        } else {
            String::new()
        };
        let mut payload = serde_json::json!({"uid": uid, "producer": self.k, "pad": pad});
        let key = self.key(ordered);
        if let Some(key) = &key {
            let n = self.counters.entry(key.clone()).or_insert(0);
            *n += 1;
            payload["key"] = serde_json::json!(key);
            payload["n"] = serde_json::json!(*n);
        }
        (event_type.to_owned(), payload.to_string(), key)
    }

    fn key(&mut self, ordered: bool) -> Option<String> {
        if !ordered {
            return None;
        }
        let keys = if !self.shared.is_empty()
            && (self.owned.is_empty() || self.rng.random_bool(SHARED_SHARE))
        {
            &self.shared
        } else {
            &self.owned
        };
        if keys.is_empty() {
            return None;
        }
        Some(keys[self.rng.random_range(0..keys.len())].clone())
    }

    fn isolation(&mut self) -> IsolationLevel {
        match self.rng.random_range(0..4) {
            0 => IsolationLevel::RepeatableRead,
            1 => IsolationLevel::Serializable,
            _ => IsolationLevel::ReadCommitted,
        }
    }

    /// Performs one action; returns how many events it wrote (committed or not).
    async fn act(&mut self, client: &Client, action: Action) -> usize {
        let n = match action {
            Action::Multi => self.rng.random_range(2..=12),
            Action::Rollback => self.rng.random_range(1..=5),
            Action::Burst => self.rng.random_range(50..=200),
            _ => 1,
        };
        let uids = self.uids(n);
        let ordered = self.rng.random_bool(self.ordering.share.clamp(0.0, 1.0));
        let events: Vec<Row> = uids.iter().map(|&u| self.event(u, ordered)).collect();
        let delay_ms: i32 = match action {
            Action::Delayed => self.rng.random_range(200..3000),
            _ => 0,
        };
        let isolation = self.isolation();
        let split = self.rng.random_bool(0.3);
        let result = match action {
            Action::Autocommit => insert(client, &events, delay_ms)
                .await
                .map_err(Failure::AtCommit),
            _ => {
                self.in_transaction(client, isolation, &events, delay_ms, split, action)
                    .await
            }
        };
        match result {
            Ok(()) if matches!(action, Action::Rollback) => self.ledger.rolled_back.extend(uids),
            Ok(()) => {
                self.ledger.committed.extend(uids);
                *self.ledger.actions.entry(action.label()).or_default() += 1;
                if events.iter().any(|e| e.2.is_some()) {
                    self.ledger.ordered_transactions += 1;
                }
            }
            Err(Failure::Before(e)) => {
                self.error(&e, action, isolation);
                self.ledger.failed.extend(uids);
            }
            Err(Failure::AtCommit(e)) => {
                self.error(&e, action, isolation);
                if is_connection_error(&e) {
                    self.ledger.ambiguous.extend(uids);
                } else {
                    self.ledger.failed.extend(uids);
                }
            }
        }
        n
    }

    async fn in_transaction(
        &mut self,
        client: &Client,
        isolation: IsolationLevel,
        events: &[Row],
        delay_ms: i32,
        split: bool,
        action: Action,
    ) -> Result<(), Failure> {
        let begin = match isolation {
            IsolationLevel::RepeatableRead => "BEGIN ISOLATION LEVEL REPEATABLE READ",
            IsolationLevel::Serializable => "BEGIN ISOLATION LEVEL SERIALIZABLE",
            _ => "BEGIN ISOLATION LEVEL READ COMMITTED",
        };
        client.batch_execute(begin).await.map_err(Failure::Before)?;
        // Some business work first, so the snapshot predates the insert (what makes
        // a REPEATABLE READ producer see a doorbell changed since).
        let work = async {
            client
                .query_one("SELECT count(*) FROM webhook_endpoints", &[])
                .await?;
            if split {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if split && events.len() > 1 {
                let (a, b) = events.split_at(events.len() / 2);
                insert(client, a, delay_ms).await?;
                insert(client, b, delay_ms).await
            } else {
                insert(client, events, delay_ms).await
            }
        };
        if let Err(e) = work.await {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(Failure::Before(e));
        }
        if events.iter().any(|e| e.2.as_deref().is_some_and(is_shared)) {
            let hold = self.rng.random_range(0..SHARED_HOLD_MS);
            tokio::time::sleep(Duration::from_millis(hold)).await;
        }
        if matches!(action, Action::Rollback) {
            return client
                .batch_execute("ROLLBACK")
                .await
                .map_err(Failure::Before);
        }
        client
            .batch_execute("COMMIT")
            .await
            .map_err(Failure::AtCommit)
    }

    fn error(&mut self, e: &tokio_postgres::Error, action: Action, isolation: IsolationLevel) {
        let key = match e.code() {
            Some(code) => code.code().to_owned(),
            None => "connection".to_owned(),
        };
        *self.ledger.errors.entry(key).or_default() += 1;
        if !is_connection_error(e) && self.ledger.harmful.len() < 10 {
            let detail = e
                .as_db_error()
                .map(|db| format!("{}: {}", db.code().code(), db.message()))
                .unwrap_or_else(|| e.to_string());
            self.ledger.harmful.push(format!(
                "producer {} ({}, {:?}): {detail}",
                self.k,
                action.label(),
                isolation
            ));
        }
        self.lost |= is_connection_error(e);
    }
}

async fn insert(
    client: &Client,
    events: &[Row],
    delay_ms: i32,
) -> Result<(), tokio_postgres::Error> {
    let types: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    let payloads: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
    let keys: Vec<Option<&str>> = events.iter().map(|e| e.2.as_deref()).collect();
    // WITH ORDINALITY ... ORDER BY: the rows are inserted (their ids drawn, their
    // ordering numbers queued) in the order the producer wrote them.
    client
        .execute(
            "INSERT INTO webhook_outbox (event_type, payload, deliver_after, ordering_key)
             SELECT t, p::jsonb, now() + $3::int * interval '1 millisecond', k
             FROM unnest($1::text[], $2::text[], $4::text[]) WITH ORDINALITY AS u(t, p, k, i)
             ORDER BY i",
            &[&types, &payloads, &delay_ms, &keys],
        )
        .await?;
    Ok(())
}
