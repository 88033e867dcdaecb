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
//! Producers connect as `chaos-producer-N`, so faults aimed at outboxd's backends never
//! hit them; only a PostgreSQL restart does, and they reconnect.

use std::collections::BTreeMap;
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

/// Uids of producer `k` are `k * UID_SPACE + n`.
pub const UID_SPACE: i64 = 1_000_000_000;

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
}

/// Runs producer `k` until `until`, writing about `rate` events a second.
pub async fn run(k: usize, url: String, seed: u64, until: Instant, rate: f64) -> Ledger {
    let mut p = Producer {
        k: k as i64,
        url,
        rng: StdRng::seed_from_u64(seed),
        next: 0,
        client: None,
        lost: false,
        ledger: Ledger::default(),
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

    fn event(&mut self, uid: i64) -> (String, String) {
        let event_type = EVENT_TYPES[self.rng.random_range(0..EVENT_TYPES.len())];
        let pad = if self.rng.random_bool(0.1) {
            "x".repeat(self.rng.random_range(100..4000))
        } else {
            String::new()
        };
        let payload = serde_json::json!({"uid": uid, "producer": self.k, "pad": pad});
        (event_type.to_owned(), payload.to_string())
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
        let events: Vec<(String, String)> = uids.iter().map(|&u| self.event(u)).collect();
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
        events: &[(String, String)],
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
    events: &[(String, String)],
    delay_ms: i32,
) -> Result<(), tokio_postgres::Error> {
    let (types, payloads): (Vec<&str>, Vec<&str>) =
        events.iter().map(|(t, p)| (t.as_str(), p.as_str())).unzip();
    client
        .execute(
            "INSERT INTO webhook_outbox (event_type, payload, deliver_after)
             SELECT t, p::jsonb, now() + $3::int * interval '1 millisecond'
             FROM unnest($1::text[], $2::text[]) AS u(t, p)",
            &[&types, &payloads, &delay_ms],
        )
        .await?;
    Ok(())
}
