//! Writing outcomes back: many deliveries per statement, guarded by the lease.
//!
//! Outcomes are queued by the send tasks and flushed by one settler task once a few
//! hundred have gathered or 15 ms after the first, whichever comes first: one round trip
//! and one commit for a whole batch instead of one per delivery.

use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio_postgres::GenericClient;
use tokio_postgres::types::{ToSql, Type};

use crate::circuit::{self, CircuitPolicy, Runs, Tally, Transitions};
use crate::config::DeadHead;
use crate::db::Pool;
use crate::deliver::{Attempt, AttemptResult, ErrorKind};
use crate::error::{Error, Result};
use crate::retry::Verdict;

/// Most outcomes per flush.
pub const MAX_BATCH: usize = 500;
/// A batch this large is flushed at once; a smaller one waits up to [`LINGER`] for more.
///
/// Each flush has a fixed cost in PostgreSQL besides its rows: a statement to execute,
/// its relations to lock, a transaction to commit. At a burst's rate one dispatcher
/// gathers this many outcomes during the previous flush, so it never waits; one that
/// sees a few thousand outcomes a second (one of several sharing a burst, or a steady
/// stream) waits for more, and writes fewer, larger batches (docs/performance.md,
/// "Changes that moved these figures").
pub const FLUSH_AT: usize = 200;
/// How long the settler waits for more outcomes before flushing a batch smaller than
/// [`FLUSH_AT`]. Only the recorded state waits: a send slot is freed when its request
/// ends, and a crash redelivers at most this much more than it would otherwise.
pub const LINGER: Duration = Duration::from_millis(15);

/// Settles deliveries and records attempts in one statement. `$1` is the worker id.
///
/// The statement is the function `webhook_settle` (`sql/0005_settle_function.sql`,
/// redefined by `sql/0006_isolation_and_endpoint_health.sql`), which each session plans
/// once, held to primary-key probes whatever the table's statistics say. Only
/// deliveries this worker still holds at the attempt it claimed change: an outcome
/// whose lease was lost to another worker changes nothing. Attempts are recorded either
/// way, and repeating a flush after an ambiguous connection error is harmless.
///
/// In the same transaction it keeps each endpoint's failure clock (see
/// [`crate::health`]) and disables every endpoint that answered 410 Gone, parking its
/// pending deliveries: the delivery parked by the 410 and its endpoint's disable land
/// together or not at all. The function tells a 410 from the other outcomes written as
/// `parked` by `uncount`: a 410 is an attempt (0), a park of a closed endpoint's
/// delivery is not (1). See [`Outcome`]'s `state` and the `uncount` column.
///
/// The function this statement calls, `webhook_settle_outcomes`
/// (`sql/0011_endpoint_limits_and_circuit.sql`), calls `webhook_settle` for that, and
/// then keeps each endpoint's circuit (see [`crate::circuit`]): `$21`/`$22` the unhealthy failures per
/// endpoint, `$23`/`$24` the pauses asked by a `Retry-After`, `$25` to `$27` the
/// [`CircuitPolicy`], `$28` the endpoints that answered (a half-open circuit closes);
/// it returns the circuits it opened and closed.
pub const SETTLE: &str = "SELECT settled, opened, closed
FROM webhook_settle_outcomes($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
    $11, $12, $13, $14, $15, $16, $17, $18, $19, $20,
    $21, $22, $23, $24, $25, $26, $27, $28)";

/// [`SETTLE`] for a batch with ordered deliveries in it: `webhook_settle_ordered`
/// (`sql/0013_ordered_delivery.sql`) settles them alike, then moves on the lines whose
/// heads ended (`$29`/`$30`, the ordered outcomes; `$31`, the global dead-head policy,
/// which an endpoint's `ordering_dead_head` overrides), in the same transaction.
/// `promoted`: how many deliveries became due.
pub const SETTLE_ORDERED: &str = "SELECT settled, opened, closed, promoted
FROM webhook_settle_ordered($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
    $11, $12, $13, $14, $15, $16, $17, $18, $19, $20,
    $21, $22, $23, $24, $25, $26, $27, $28, $29, $30, $31)";

/// What to write for one delivery.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The event.
    pub event_id: i64,
    /// The endpoint.
    pub endpoint_id: i64,
    /// The attempt number the claim took (the lease token).
    pub attempt: i32,
    /// What becomes of the delivery.
    pub next: Next,
    /// The HTTP attempt to record, if one was made.
    pub record: Option<Attempt>,
    /// The head of an ordered line ([`crate::deliver::Delivery::ordered`]): written at
    /// once, and its line moved on in the same transaction if it ended.
    pub ordered: bool,
}

/// The state a delivery moves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Decided from an attempt.
    Verdict(Verdict),
    /// Its endpoint is closed: park it; the claim does not count as an attempt.
    Park,
    /// Not attempted (a shutdown, a settler stall or a wait for a send slot that used
    /// up half of the lease's spare time): due again now; the claim does not count.
    Release,
}

impl Outcome {
    /// The state written. `parked` is written for two outcomes, told apart by
    /// [`Outcome::uncount`]: the settle function disables the endpoint of a `parked`
    /// outcome that counts as an attempt, which only a 410 Gone is.
    fn state(&self) -> &'static str {
        match self.next {
            Next::Verdict(Verdict::Delivered) => "delivered",
            Next::Verdict(Verdict::Dead) => "dead",
            Next::Verdict(Verdict::Retry(_)) | Next::Release => "pending",
            Next::Park | Next::Verdict(Verdict::Gone) => "parked",
        }
    }

    /// 1 when the claim does not count as an attempt (nothing was sent), else 0.
    fn uncount(&self) -> i32 {
        i32::from(matches!(self.next, Next::Park | Next::Release))
    }
}

/// A summary of an attempt for the delivery row: `(status, error)`.
pub fn summarize(result: &AttemptResult) -> (Option<i32>, Option<String>) {
    match result {
        AttemptResult::Response { status, .. } if (200..300).contains(status) => {
            (Some(i32::from(*status)), None)
        }
        AttemptResult::Response { status, .. } => (
            Some(i32::from(*status)),
            Some(format!("receiver answered HTTP {status}")),
        ),
        AttemptResult::Failed { kind, message } => {
            (None, Some(format!("{}: {message}", kind.as_str())))
        }
    }
}

/// What the attempts among `outcomes` say of their endpoints' health.
fn tally(outcomes: &[Outcome]) -> Tally {
    Tally::of(outcomes.iter().filter_map(|o| {
        let attempt = o.record.as_ref()?;
        Some((o.endpoint_id, circuit::signal(&attempt.result)))
    }))
}

/// Column arrays for one [`SETTLE`] execution.
#[derive(Default)]
struct Columns {
    event_id: Vec<i64>,
    endpoint_id: Vec<i64>,
    attempt: Vec<i32>,
    state: Vec<&'static str>,
    delay_ms: Vec<i64>,
    uncount: Vec<i32>,
    last_status: Vec<Option<i32>>,
    last_error: Vec<Option<String>>,
    a_event_id: Vec<i64>,
    a_endpoint_id: Vec<i64>,
    a_attempt: Vec<i32>,
    a_started_at: Vec<SystemTime>,
    a_duration_ms: Vec<i32>,
    a_status: Vec<Option<i32>>,
    a_error_kind: Vec<Option<&'static str>>,
    a_error: Vec<Option<String>>,
    a_excerpt: Vec<Option<String>>,
    healthy: Vec<i64>,
    failing: Vec<i64>,
    unhealthy_endpoint: Vec<i64>,
    unhealthy_count: Vec<i32>,
    pause_endpoint: Vec<i64>,
    pause_ms: Vec<i64>,
    /// The endpoints that answered (2xx, or a 3xx/4xx refusing the event): a half-open
    /// circuit closes. Not `healthy`, which resets the auto-disable clock (a refusal
    /// must not).
    answered: Vec<i64>,
}

impl Columns {
    /// The columns of `outcomes`, with `signals`, what their attempts say of the
    /// endpoints' health, each endpoint's unhealthy failures counted as its run
    /// ([`circuit::Runs`]).
    fn from_outcomes(outcomes: &[Outcome], signals: &Tally) -> Self {
        let mut c = Columns::default();
        (c.unhealthy_endpoint, c.unhealthy_count) = signals.unhealthy.iter().copied().unzip();
        (c.pause_endpoint, c.pause_ms) = signals.pauses.iter().copied().unzip();
        c.answered.clone_from(&signals.healthy);
        for o in outcomes {
            let (status, error) = o
                .record
                .as_ref()
                .map(|a| summarize(&a.result))
                .unwrap_or((None, None));
            c.event_id.push(o.event_id);
            c.endpoint_id.push(o.endpoint_id);
            c.attempt.push(o.attempt);
            c.state.push(o.state());
            c.delay_ms.push(match &o.next {
                Next::Verdict(Verdict::Retry(delay)) => delay.as_millis() as i64,
                _ => 0,
            });
            c.uncount.push(o.uncount());
            c.last_status.push(status);
            c.last_error.push(error.clone());
            if let Some(attempt) = &o.record {
                let (kind, message, excerpt) = match &attempt.result {
                    AttemptResult::Response { excerpt, .. } => {
                        let kind = error.is_some().then_some("http_status");
                        (kind, error, Some(excerpt.clone()))
                    }
                    AttemptResult::Failed { kind, message } => {
                        (Some(kind.as_str()), Some(message.clone()), None)
                    }
                };
                c.a_event_id.push(o.event_id);
                c.a_endpoint_id.push(o.endpoint_id);
                c.a_attempt.push(o.attempt);
                c.a_started_at.push(attempt.started_at);
                c.a_duration_ms
                    .push(attempt.duration.as_millis().min(i32::MAX as u128) as i32);
                c.a_status.push(status);
                c.a_error_kind.push(kind);
                c.a_error.push(message);
                c.a_excerpt.push(excerpt);
                if matches!(o.next, Next::Verdict(Verdict::Delivered)) {
                    c.healthy.push(o.endpoint_id);
                } else if !matches!(
                    attempt.result,
                    AttemptResult::Failed {
                        kind: ErrorKind::Unbuildable,
                        ..
                    }
                ) {
                    // A request that could not be built says nothing of the endpoint.
                    c.failing.push(o.endpoint_id);
                }
            }
        }
        c.healthy.sort_unstable();
        c.healthy.dedup();
        c.failing.sort_unstable();
        c.failing.dedup();
        c.failing.retain(|id| c.healthy.binary_search(id).is_err());
        c
    }
}

/// Writes a batch of outcomes; returns how many deliveries were settled (fewer than
/// given when a lease was lost to another worker).
///
/// A connection whose server turned read-only is closed rather than given back: while
/// outcomes cannot be written the claim loop waits, so this is the one place where the
/// pool's sessions on a fenced or demoted server can be weeded out.
#[cfg_attr(
    not(feature = "internals"),
    allow(dead_code, reason = "tests and tools that settle by hand")
)]
pub async fn flush(pool: &Pool, worker_id: &str, outcomes: &[Outcome]) -> Result<u64> {
    let circuit = CircuitPolicy::default();
    let signals = Runs::default().add(tally(outcomes), circuit.failures);
    let policy = Policy {
        circuit: &circuit,
        dead_head: DeadHead::default(),
    };
    let flushed = flush_with(pool, worker_id, outcomes, policy, &signals).await?;
    Ok(flushed.settled)
}

/// What a flush decides by besides its outcomes.
#[derive(Debug, Clone, Copy)]
struct Policy<'a> {
    circuit: &'a CircuitPolicy,
    dead_head: DeadHead,
}

/// What one flush wrote.
#[derive(Debug, Default)]
struct Written {
    /// Deliveries settled (fewer than the outcomes when a lease was lost).
    settled: u64,
    /// Circuits opened and closed.
    transitions: Transitions,
    /// Ordered deliveries made due by their heads' end.
    promoted: u64,
}

/// [`flush`] under `policy`, with the `signals` of [`Columns::from_outcomes`].
async fn flush_with(
    pool: &Pool,
    worker_id: &str,
    outcomes: &[Outcome],
    policy: Policy<'_>,
    signals: &Tally,
) -> Result<Written> {
    let mut client = pool.get().await?;
    let flushed = flush_on(&*client, worker_id, outcomes, policy, signals).await;
    if let Err(e) = &flushed {
        crate::pooler::discard_if_read_only(&mut client, e);
    }
    flushed
}

/// [`flush_with`] on a connection the caller holds.
async fn flush_on(
    client: &impl GenericClient,
    worker_id: &str,
    outcomes: &[Outcome],
    policy: Policy<'_>,
    signals: &Tally,
) -> Result<Written> {
    let circuit = policy.circuit;
    let c = Columns::from_outcomes(outcomes, signals);
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let (failures, open_ms, max_open_ms) = (
        i32::try_from(circuit.failures).unwrap_or(i32::MAX),
        ms(circuit.open),
        ms(circuit.max_open),
    );
    let params: [(&(dyn ToSql + Sync), Type); 28] = [
        (&worker_id, Type::TEXT),
        (&c.event_id, Type::INT8_ARRAY),
        (&c.endpoint_id, Type::INT8_ARRAY),
        (&c.attempt, Type::INT4_ARRAY),
        (&c.state, Type::TEXT_ARRAY),
        (&c.delay_ms, Type::INT8_ARRAY),
        (&c.uncount, Type::INT4_ARRAY),
        (&c.last_status, Type::INT4_ARRAY),
        (&c.last_error, Type::TEXT_ARRAY),
        (&c.a_event_id, Type::INT8_ARRAY),
        (&c.a_endpoint_id, Type::INT8_ARRAY),
        (&c.a_attempt, Type::INT4_ARRAY),
        (&c.a_started_at, Type::TIMESTAMPTZ_ARRAY),
        (&c.a_duration_ms, Type::INT4_ARRAY),
        (&c.a_status, Type::INT4_ARRAY),
        (&c.a_error_kind, Type::TEXT_ARRAY),
        (&c.a_error, Type::TEXT_ARRAY),
        (&c.a_excerpt, Type::TEXT_ARRAY),
        (&c.healthy, Type::INT8_ARRAY),
        (&c.failing, Type::INT8_ARRAY),
        (&c.unhealthy_endpoint, Type::INT8_ARRAY),
        (&c.unhealthy_count, Type::INT4_ARRAY),
        (&c.pause_endpoint, Type::INT8_ARRAY),
        (&c.pause_ms, Type::INT8_ARRAY),
        (&failures, Type::INT4),
        (&open_ms, Type::INT8),
        (&max_open_ms, Type::INT8),
        (&c.answered, Type::INT8_ARRAY),
    ];
    let (ordered_event, ordered_endpoint): (Vec<i64>, Vec<i64>) = outcomes
        .iter()
        .filter(|o| o.ordered)
        .map(|o| (o.event_id, o.endpoint_id))
        .unzip();
    let row = if ordered_event.is_empty() {
        client.query_typed_one(SETTLE, &params).await?
    } else {
        let dead_head = policy.dead_head.as_str();
        let mut all = params.to_vec();
        all.extend([
            (&ordered_event as &(dyn ToSql + Sync), Type::INT8_ARRAY),
            (&ordered_endpoint, Type::INT8_ARRAY),
            (&dead_head, Type::TEXT),
        ]);
        client.query_typed_one(SETTLE_ORDERED, &all).await?
    };
    let settled: i64 = row.try_get("settled")?;
    let promoted: i64 = if ordered_event.is_empty() {
        0
    } else {
        row.try_get("promoted")?
    };
    Ok(Written {
        settled: settled as u64,
        transitions: Transitions {
            opened: row.try_get("opened")?,
            closed: row.try_get("closed")?,
        },
        promoted: promoted as u64,
    })
}

/// Checks that outcomes can be recorded through `client`: `webhook_settle` resolves
/// on the connection's search path, its role may execute it and write every table it
/// writes, and the database accepts writes (it is not a standby). It runs the settle
/// statement on no outcomes, so it changes nothing. Those refusals (SQLSTATE class 42,
/// 3F000 or 25006) are [`Error::CannotSettle`]; any other error is returned as it is.
///
/// A read-only server is named as such first, as [`Error::ReadOnlyDatabase`]: a hot
/// standby (`pg_is_in_recovery()`), or a session that is read-only by default
/// (`default_transaction_read_only`, which some failover tools set to fence an old
/// primary and some managed services set when the disk is full).
pub async fn probe(client: &impl GenericClient) -> Result<()> {
    let row = client.query_typed_one(READ_ONLY, &[]).await?;
    if row.try_get::<_, bool>("standby")? {
        return Err(Error::ReadOnlyDatabase(
            "the server is a standby (pg_is_in_recovery() is true)".to_owned(),
        ));
    }
    if row.try_get::<_, bool>("read_only")? {
        return Err(Error::ReadOnlyDatabase(
            "its sessions are read-only (default_transaction_read_only is on)".to_owned(),
        ));
    }
    let policy = Policy {
        circuit: &CircuitPolicy::default(),
        dead_head: DeadHead::default(),
    };
    match flush_on(client, "", &[], policy, &Tally::default()).await {
        Err(Error::Db(e)) if e.as_db_error().is_some_and(|db| refuses_setup(db.code())) => {
            Err(Error::CannotSettle(e))
        }
        other => other.map(drop),
    }
}

/// Whether the server is a standby, and whether this session is read-only by default.
pub(crate) const READ_ONLY: &str = "SELECT pg_is_in_recovery() AS standby, \
    current_setting('default_transaction_read_only')::bool OR current_setting('transaction_read_only')::bool \
    AS read_only";

/// Errors that say the session is not set up to write outcomes, rather than that the
/// database is busy or going away: a missing object or privilege, an unknown schema, a
/// read-only transaction.
fn refuses_setup(code: &tokio_postgres::error::SqlState) -> bool {
    code.code().starts_with("42")
        || *code == tokio_postgres::error::SqlState::INVALID_SCHEMA_NAME
        || *code == tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION
}

/// The settler task's collaborators.
#[derive(Debug, Clone)]
pub struct Settler {
    /// Where outcomes are written.
    pub pool: Pool,
    /// The lease holder the outcomes belong to.
    pub worker_id: String,
    /// Counts endpoints disabled by a 410, and failed flushes.
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// Woken after a flush that scheduled retries or released deliveries, so a
    /// sleeping claim loop recomputes when it must wake up next.
    pub wake: std::sync::Arc<tokio::sync::Notify>,
    /// Stops retrying a failing flush (at the end of a shutdown).
    pub give_up: tokio_util::sync::CancellationToken,
    /// When endpoints' circuits open, and for how long.
    pub circuit: CircuitPolicy,
    /// What a dead head does to its ordering key, where its endpoint does not say.
    pub dead_head: DeadHead,
    /// `true` from a failed flush until every outcome queued by then is written: the
    /// claim loop stops claiming meanwhile, since what it delivered could not be
    /// recorded, and a lease that ran out during the stall would let it claim again a
    /// row whose outcome is still queued.
    pub stalled: tokio::sync::watch::Sender<bool>,
}

/// How one flush ended.
enum Flushed {
    /// Written.
    Settled(Written),
    /// Refused for the values it carried (see [`Error::is_bad_data`]).
    BadData(Error),
    /// Still failing when `give_up` fired.
    GaveUp,
}

impl Settler {
    /// Batches outcomes from `rx` and writes them until the channel closes and is
    /// empty. A flush the database cannot take (a lost connection, a missing privilege,
    /// a standby after a failover) is retried with backoff (the statement is safe to
    /// repeat) until it succeeds or `give_up` fires, and `stalled` keeps the claim loop
    /// from delivering more until the outcomes queued behind it are written too. A
    /// batch refused for its values is written one outcome at a time, so one bad
    /// outcome cannot block the rest. Whatever stays unwritten stays leased and comes
    /// back when the lease runs out: nothing is lost, at worst delivered twice.
    pub async fn run(self, mut rx: mpsc::Receiver<Outcome>) -> SettleTotals {
        let mut totals = SettleTotals::default();
        let mut runs = Runs::default();
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
                return totals;
            }
            // Catching up after a stall, the backlog is flushed without waiting; so is a
            // batch with an ordered head in it: the rest of its key's line waits for it.
            if !*self.stalled.borrow() {
                let deadline = tokio::time::Instant::now() + LINGER;
                while batch.len() < FLUSH_AT && !batch.iter().any(|o| o.ordered) {
                    let room = MAX_BATCH - batch.len();
                    tokio::select! {
                        n = rx.recv_many(&mut batch, room) => if n == 0 { break },
                        _ = tokio::time::sleep_until(deadline) => break,
                    }
                }
            }
            let written = self.write(&batch, &mut totals, &mut runs).await;
            batch.clear();
            if written && *self.stalled.borrow() && rx.is_empty() {
                self.set_stalled(false);
            }
        }
    }

    /// Writes `batch`; returns `false` if it gave up.
    async fn write(&self, batch: &[Outcome], totals: &mut SettleTotals, runs: &mut Runs) -> bool {
        let signals = runs.add(tally(batch), self.circuit.failures);
        let mut promoted = 0;
        match self.flush_retrying(batch, &signals).await {
            Flushed::Settled(written) => {
                totals.record(batch, written.settled);
                promoted += written.promoted;
            }
            Flushed::GaveUp => return false,
            Flushed::BadData(e) => {
                tracing::warn!(error = %e, outcomes = batch.len(), "a batch of outcomes was refused for its values; writing them one by one");
                for outcome in batch {
                    let one = std::slice::from_ref(outcome);
                    let signal = signals.only(outcome.endpoint_id);
                    match self.flush_retrying(one, &signal).await {
                        Flushed::Settled(written) => {
                            totals.record(one, written.settled);
                            promoted += written.promoted;
                        }
                        Flushed::BadData(e) => tracing::error!(
                            event_id = outcome.event_id,
                            endpoint_id = outcome.endpoint_id,
                            error = %e,
                            "an outcome could not be written; the delivery will be retried when its lease ends"
                        ),
                        Flushed::GaveUp => return false,
                    }
                }
            }
        }
        report_gone(batch, &self.metrics);
        // Work due again (a retry, a delivery handed back unsent, the next of an
        // ordered line) may be due before the claim loop's next look.
        if promoted > 0
            || batch
                .iter()
                .any(|o| matches!(o.next, Next::Verdict(Verdict::Retry(_)) | Next::Release))
        {
            self.wake.notify_one();
        }
        true
    }

    /// Flushes `outcomes`, retrying with backoff while the database cannot take them,
    /// until `give_up` fires (which also ends a flush that hangs).
    async fn flush_retrying(&self, outcomes: &[Outcome], signals: &Tally) -> Flushed {
        let mut delay = Duration::from_millis(50);
        loop {
            let policy = Policy {
                circuit: &self.circuit,
                dead_head: self.dead_head,
            };
            let flushed = tokio::select! {
                flushed = flush_with(&self.pool, &self.worker_id, outcomes, policy, signals) => flushed,
                _ = self.give_up.cancelled() => return self.gave_up(outcomes),
            };
            let e = match flushed {
                Ok(written) => {
                    written.transitions.report(&self.metrics);
                    return Flushed::Settled(written);
                }
                Err(e) if e.is_bad_data() => return Flushed::BadData(e),
                Err(e) => e,
            };
            let first = self.set_stalled(true);
            self.metrics.settle_failed();
            if first {
                tracing::error!(error = %e, outcomes = outcomes.len(), "settling outcomes failed; claiming stops until they are written");
            } else {
                tracing::warn!(error = %e, outcomes = outcomes.len(), "settling outcomes failed again; retrying");
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.give_up.cancelled() => return self.gave_up(outcomes),
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    fn gave_up(&self, outcomes: &[Outcome]) -> Flushed {
        tracing::error!(
            outcomes = outcomes.len(),
            "gave up settling outcomes; their leases will expire and they will be retried"
        );
        Flushed::GaveUp
    }

    /// Sets the stall flag; returns whether it changed.
    fn set_stalled(&self, stalled: bool) -> bool {
        let changed = self
            .stalled
            .send_if_modified(|s| std::mem::replace(s, stalled) != stalled);
        if changed && !stalled {
            tracing::info!("outcomes are being written again; claiming resumes");
        }
        changed
    }
}

/// Reports the endpoints that answered 410 Gone in a written batch: the settle
/// statement disabled them (and parked their pending deliveries) in the transaction
/// that parked the delivery, so nothing is left to do but say so. An endpoint already
/// disabled by an earlier batch is reported again, as before.
fn report_gone(batch: &[Outcome], metrics: &crate::metrics::Metrics) {
    let mut gone: Vec<i64> = batch
        .iter()
        .filter(|o| o.next == Next::Verdict(Verdict::Gone))
        .map(|o| o.endpoint_id)
        .collect();
    gone.sort_unstable();
    gone.dedup();
    for endpoint_id in gone {
        metrics.endpoint_disabled();
        tracing::warn!(endpoint_id, "endpoint answered 410 Gone: disabled");
    }
}

/// Counts kept by the settler, reported at shutdown.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SettleTotals {
    /// Deliveries that reached `delivered`.
    pub delivered: u64,
    /// Deliveries scheduled for another attempt.
    pub retried: u64,
    /// Deliveries that became `dead`.
    pub dead: u64,
    /// Deliveries handed back unattempted: at shutdown, or after waiting for a send
    /// slot (see `Next::Release`).
    pub released: u64,
    /// Outcomes that found their lease taken by another worker.
    pub lease_lost: u64,
}

impl SettleTotals {
    fn record(&mut self, batch: &[Outcome], settled: u64) {
        for o in batch {
            match o.next {
                Next::Verdict(Verdict::Delivered) => self.delivered += 1,
                Next::Verdict(Verdict::Retry(_)) => self.retried += 1,
                Next::Verdict(Verdict::Dead) => self.dead += 1,
                Next::Release => self.released += 1,
                Next::Park | Next::Verdict(Verdict::Gone) => {}
            }
        }
        let lost = (batch.len() as u64).saturating_sub(settled);
        if lost > 0 {
            tracing::warn!(
                lost,
                "some outcomes found their lease taken by another worker (lease too short?)"
            );
            self.lease_lost += lost;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(next: Next) -> Outcome {
        Outcome {
            event_id: 1,
            endpoint_id: 2,
            attempt: 1,
            next,
            record: None,
            ordered: false,
        }
    }

    /// The settle function disables the endpoint of a `parked` outcome that counts as an
    /// attempt: that must be a 410 Gone and nothing else.
    #[test]
    fn only_a_gone_is_a_counted_park() {
        let counted_parks: Vec<Next> = [
            Next::Verdict(Verdict::Delivered),
            Next::Verdict(Verdict::Retry(Duration::from_secs(1))),
            Next::Verdict(Verdict::Dead),
            Next::Verdict(Verdict::Gone),
            Next::Park,
            Next::Release,
        ]
        .into_iter()
        .filter(|next| {
            let o = outcome(next.clone());
            o.state() == "parked" && o.uncount() == 0
        })
        .collect();
        assert_eq!(counted_parks, [Next::Verdict(Verdict::Gone)]);
        let park = outcome(Next::Park);
        assert_eq!((park.state(), park.uncount()), ("parked", 1));
    }
}
