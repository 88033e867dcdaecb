//! The dispatcher: one claim loop feeding a bounded pool of HTTP sends, one settler
//! writing outcomes back, one listener waking the loop.
//!
//! ```text
//!  listener ──wake──▶ claim loop ──Delivery──▶ send tasks (≤ concurrency) ──Outcome──▶ settler
//!   (LISTEN)          (claim.rs)               (deliver.rs, retry.rs)                  (settle.rs)
//! ```
//!
//! No transaction is ever held across an HTTP request: a claim commits before the
//! sends start, and outcomes are written by a later statement.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::claim::{self, Claimed};
use crate::config::Config;
use crate::db::{self, Pool};
use crate::deliver::{AttemptResult, Delivery, ErrorKind, Sender};
use crate::error::Result;
use crate::housekeeping::{self, Housekeeping};
use crate::listener;
use crate::metrics::{DeliveryOutcome, Metrics};
use crate::retention::RetentionPolicy;
use crate::retry::{RetryPolicy, Verdict};
use crate::settle::{self, Next, Outcome, SettleTotals};
use crate::shutdown::{self, Drained};

/// After a claim that came back short but not empty: wait this long (or for a wake-up)
/// before claiming again, so a steady trickle is claimed in batches rather than one
/// round trip per event.
const SHORT_CLAIM_PAUSE: Duration = Duration::from_millis(2);
/// After arming the doorbell and finding nothing: look again after each of these
/// pauses before sleeping. A producer whose INSERT read the doorbell before it was armed
/// but whose COMMIT (a WAL flush, a few ms, more under load) lands after the last look
/// would otherwise wait for the poll tick; a schedule of cheap empty claims catches
/// commits up to ~100 ms late at a small latency cost, and costs producers nothing.
const RECHECKS: [Duration; 5] = [
    Duration::from_millis(2),
    Duration::from_millis(5),
    Duration::from_millis(10),
    Duration::from_millis(25),
    Duration::from_millis(60),
];
/// A claimed delivery still waiting for a send slot this long after its claim went out
/// marks the slots as scarce: for [`SCARCE_SLOTS_FOR`], claims take no more than the
/// free slots. In a burst, a whole batch finds slots within milliseconds.
const SCARCE_SLOT_WAIT: Duration = Duration::from_secs(1);
/// How long claims stay sized to the free slots after a long wait for one.
const SCARCE_SLOTS_FOR: Duration = Duration::from_secs(10);
/// How long the settler may keep trying to write the last outcomes at shutdown.
const FINAL_SETTLE_BOUND: Duration = Duration::from_secs(10);

/// What a dispatcher did before it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Outcome counts written by the settler.
    pub totals: SettleTotals,
    /// How the drain ended.
    pub drained: Drained,
}

/// A webhook dispatcher. Any number may run against one database.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    database_url: String,
    config: Config,
    metrics: Arc<Metrics>,
}

impl Dispatcher {
    /// A dispatcher for the database at `database_url`; fails if `config` is invalid.
    pub fn new(database_url: impl Into<String>, config: Config) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            database_url: database_url.into(),
            config,
            metrics: Arc::new(Metrics::default()),
        })
    }

    /// The metrics this dispatcher records into, for a metrics endpoint to render.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// Delivers until `shutdown` is cancelled, then drains: stops claiming, lets
    /// in-flight deliveries finish for up to `drain_timeout`, releases what is
    /// unfinished, writes every outcome back and returns.
    ///
    /// Returns an error only if it cannot start (database unreachable, outcomes could
    /// not be recorded, HTTP client unavailable); once running, database errors are
    /// logged and retried, and claiming stops while outcomes cannot be written.
    pub async fn run(self, shutdown: CancellationToken) -> Result<Report> {
        let cfg = self.config;
        let pool = db::dispatcher_pool(&self.database_url, cfg.pool_size).await?;
        // Fail fast on an unreachable database rather than looping on warnings, and on
        // one that could not record what is delivered.
        settle::probe(&*pool.get().await?).await?;
        let sender = Sender::new(&cfg)?;

        let wake = Arc::new(Notify::new());
        let listener_stop = CancellationToken::new();
        let listener = cfg.listen.then(|| {
            tokio::spawn(listener::run(
                self.database_url.clone(),
                Arc::clone(&wake),
                Arc::clone(&self.metrics),
                listener_stop.clone(),
            ))
        });

        let housekeeping_stop = CancellationToken::new();
        let housekeeping = tokio::spawn(housekeeping::run(
            pool.clone(),
            Arc::clone(&self.metrics),
            Housekeeping {
                retention: RetentionPolicy {
                    delivered: cfg.retention,
                    dead: cfg.dead_retention,
                },
                disable_failing_after: cfg.endpoint_disable_after,
            },
            housekeeping_stop.clone(),
        ));

        let (settle_tx, settle_rx) = mpsc::channel(cfg.concurrency as usize + settle::MAX_BATCH);
        let settle_give_up = CancellationToken::new();
        let (settle_stalled, settle_stalled_rx) = tokio::sync::watch::channel(false);
        let mut settler = tokio::spawn(
            settle::Settler {
                pool: pool.clone(),
                worker_id: cfg.worker_id.clone(),
                metrics: Arc::clone(&self.metrics),
                wake: Arc::clone(&wake),
                give_up: settle_give_up.clone(),
                stalled: settle_stalled,
            }
            .run(settle_rx),
        );

        tracing::info!(
            worker_id = %cfg.worker_id,
            listen = cfg.listen,
            poll_interval_ms = cfg.poll_interval.as_millis() as u64,
            batch_size = cfg.batch_size,
            concurrency = cfg.concurrency,
            "dispatcher started"
        );

        let claim_loop = ClaimLoop {
            session: tokio::sync::Mutex::new(None),
            gate_closer: tokio::sync::Mutex::new(None),
            policy: RetryPolicy {
                base: cfg.backoff_base,
                max: cfg.backoff_max,
                max_attempts: cfg.max_attempts,
            },
            permits: Arc::new(Semaphore::new(cfg.concurrency as usize)),
            payload_budget: claim::PayloadBudget::from_config(&cfg),
            tracker: TaskTracker::new(),
            abort: CancellationToken::new(),
            sender: Arc::new(sender),
            settle_tx,
            settle_stalled: settle_stalled_rx,
            pool,
            wake,
            metrics: Arc::clone(&self.metrics),
            cfg,
        };
        claim_loop.run(&shutdown).await;
        claim_loop.finish_gate_close().await;

        let drained = shutdown::drain(
            &claim_loop.tracker,
            claim_loop.cfg.drain_timeout,
            &claim_loop.abort,
        )
        .await;
        // Every send task has finished and dropped its sender; dropping ours lets the
        // settler flush the rest and stop.
        drop(claim_loop);
        let totals = match tokio::time::timeout(FINAL_SETTLE_BOUND, &mut settler).await {
            Ok(totals) => totals,
            Err(_) => {
                settle_give_up.cancel();
                settler.await
            }
        }
        .unwrap_or_default();
        listener_stop.cancel();
        housekeeping_stop.cancel();
        let _ = housekeeping.await;
        if let Some(listener) = listener {
            let _ = listener.await;
        }
        tracing::info!(
            delivered = totals.delivered,
            retried = totals.retried,
            dead = totals.dead,
            released = totals.released,
            "dispatcher stopped cleanly"
        );
        Ok(Report { totals, drained })
    }
}

/// What ended a pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    Shutdown,
    Notified,
    Timer,
}

/// A pooled connection held by the claim loop, with the claim statement prepared on it.
struct ClaimSession {
    conn: bb8::PooledConnection<
        'static,
        bb8_postgres::PostgresConnectionManager<tokio_postgres::NoTls>,
    >,
    statement: tokio_postgres::Statement,
}

struct ClaimLoop {
    session: tokio::sync::Mutex<Option<ClaimSession>>,
    /// The doorbell gate's last close (see [`ClaimLoop::close_gate`]).
    gate_closer: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    cfg: Config,
    pool: Pool,
    policy: RetryPolicy,
    sender: Arc<Sender>,
    wake: Arc<Notify>,
    permits: Arc<Semaphore>,
    /// Payload bytes held by claimed, unsent deliveries; claims wait for room in it.
    payload_budget: Arc<claim::PayloadBudget>,
    tracker: TaskTracker,
    abort: CancellationToken,
    settle_tx: mpsc::Sender<Outcome>,
    /// Set by the settler while outcomes cannot be written.
    settle_stalled: tokio::sync::watch::Receiver<bool>,
    metrics: Arc<Metrics>,
}

impl ClaimLoop {
    async fn run(&self, shutdown: &CancellationToken) {
        // Whether this worker armed the doorbell since it last woke, and how many of the
        // rechecks after arming it has made.
        let mut armed = false;
        let mut rechecks = 0;
        // Woken by a notification: the doorbell's gate is open for nothing (the bell
        // was rung), so it is closed once the next claim has succeeded.
        let mut close_gate = false;
        // When a polling loop last closed the gate.
        let mut gate_closed_at: Option<tokio::time::Instant> = None;
        let mut error_delay = Duration::from_millis(100);
        // Until when claims take no more than the free send slots (see below).
        let mut slots_scarce_until: Option<tokio::time::Instant> = None;
        loop {
            let Some(free) = self.wait_for_capacity(shutdown).await else {
                return;
            };
            if !self.wait_while_settle_stalled(shutdown).await {
                return;
            }
            if !self.payload_budget.wait_for_room(shutdown).await {
                return;
            }
            // A whole batch, however few slots are free: the rest wait in `dispatch`
            // for a slot. Sized to the free slots, claims were a third to a half of a
            // batch in bursts (smaller with several dispatchers), each paying a commit
            // and a round trip for fewer rows. But for a while after a delivery waited
            // long for a slot (timing-out endpoints hold them), claims take only the
            // free slots again, so that a dispatcher whose slots turn over slowly does
            // not keep holding rows that another could send.
            // With little spare time in the lease, a delivery could wait only briefly
            // before being handed back: claim no more than can be sent at once.
            let scarce = slots_scarce_until
                .is_some_and(|until| tokio::time::Instant::now() < until)
                || self.cfg.lease.saturating_sub(self.cfg.http_timeout) / 2 < SCARCE_SLOT_WAIT;
            let want = if scarce {
                free.min(self.cfg.batch_size)
            } else {
                self.cfg.batch_size
            };
            let claimed_at = tokio::time::Instant::now();
            let claim::Batch { claimed, more } = match self.claim(want).await {
                Ok(batch) => {
                    if close_gate {
                        self.close_gate().await;
                        close_gate = false;
                    } else if !self.cfg.listen
                        && gate_closed_at.is_none_or(|at| at.elapsed() >= self.cfg.poll_interval)
                    {
                        // Polling, nothing opens the gate, but a fresh database starts
                        // with it open, and the ring function would run for every
                        // insert statement. Close it (a read once it is closed) at most
                        // once per tick; an armed bell (a push-mode dispatcher asleep
                        // beside this one) keeps it open.
                        self.close_gate().await;
                        gate_closed_at = Some(tokio::time::Instant::now());
                    }
                    batch
                }
                Err(e) => {
                    tracing::warn!(error = %e, "claim failed; retrying");
                    if self.pause(error_delay, shutdown).await == Wake::Shutdown {
                        return;
                    }
                    error_delay = (error_delay * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            error_delay = Duration::from_millis(100);
            let got = claimed.len();
            if got > 0 {
                self.metrics.claim_batch_size.observe(got as f64);
                tracing::info!(claimed = got, "batch claimed");
                if self.dispatch(claimed, claimed_at, shutdown).await {
                    slots_scarce_until = Some(tokio::time::Instant::now() + SCARCE_SLOTS_FOR);
                }
            }
            // A full batch (or a full fan-out of events) means more is probably
            // waiting: claim again at once, whatever the mode.
            if got as u32 == want || more {
                continue;
            }
            let pause = if got > 0 {
                // Fresh activity: a later sleep gets the full recheck schedule again.
                rechecks = 0;
                SHORT_CLAIM_PAUSE
            } else if self.cfg.listen && !armed {
                // About to sleep: arm the doorbell, then look again at once so nothing
                // committed before the arm is left waiting for the poll tick.
                if let Err(e) = self.arm().await {
                    tracing::warn!(error = %e, "arming the doorbell failed");
                }
                armed = true;
                continue;
            } else if self.cfg.listen && rechecks < RECHECKS.len() {
                rechecks += 1;
                RECHECKS[rechecks - 1]
            } else {
                // Sleep until woken, the poll tick, or the next retry or delayed event
                // falls due, whichever is first.
                let next_due = match self.next_due().await {
                    Ok(due) => due,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the next due time failed");
                        None
                    }
                };
                armed = false;
                rechecks = 0;
                next_due.map_or(self.cfg.poll_interval, |d| {
                    d.min(self.cfg.poll_interval).max(Duration::from_millis(1))
                })
            };
            match self.pause(pause, shutdown).await {
                Wake::Shutdown => return,
                Wake::Timer if !armed && rechecks == 0 && pause >= self.cfg.poll_interval => {
                    self.metrics.poll_tick();
                }
                // A notification means a producer rang, and so disarmed, the doorbell:
                // it must be armed again before the next sleep, or that sleep would last
                // until the poll tick.
                Wake::Notified => {
                    armed = false;
                    rechecks = 0;
                    close_gate = self.cfg.listen;
                }
                Wake::Timer => {}
            }
        }
    }

    /// Sleeps for `duration` or until woken.
    async fn pause(&self, duration: Duration, shutdown: &CancellationToken) -> Wake {
        tokio::select! {
            _ = shutdown.cancelled() => Wake::Shutdown,
            _ = self.wake.notified() => Wake::Notified,
            _ = tokio::time::sleep(duration) => Wake::Timer,
        }
    }

    /// Waits while the settler cannot write outcomes: a delivery made now could not be
    /// recorded, and would be made again when its lease ran out. Returns `false` on
    /// shutdown.
    async fn wait_while_settle_stalled(&self, shutdown: &CancellationToken) -> bool {
        if !*self.settle_stalled.borrow() {
            return true;
        }
        let mut stalled = self.settle_stalled.clone();
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = stalled.wait_for(|stalled| !stalled) => true,
        }
    }

    /// Waits until a useful number of send slots is free and returns how many are.
    /// Claiming a single row each time one slot frees would make every round trip carry
    /// one delivery, so it waits briefly for a quarter of a batch. Returns `None` on
    /// shutdown.
    async fn wait_for_capacity(&self, shutdown: &CancellationToken) -> Option<u32> {
        let enough = (self.cfg.batch_size.min(self.cfg.concurrency) / 4).max(1);
        loop {
            if shutdown.is_cancelled() {
                return None;
            }
            let free = self.permits.available_permits() as u32;
            if free >= enough {
                return Some(free);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = self.permits.acquire_many(enough) => {}
                _ = tokio::time::sleep(SHORT_CLAIM_PAUSE) => {
                    if free > 0 {
                        return Some(self.permits.available_permits() as u32);
                    }
                }
            }
        }
    }

    /// Claims on the loop's own pooled connection, where the claim statement is
    /// prepared once; after any error the connection is given back and a fresh one
    /// prepared at the next claim.
    async fn claim(&self, limit: u32) -> Result<claim::Batch> {
        let mut session = self.session.lock().await;
        let current = match session.take() {
            Some(current) => current,
            None => {
                let conn = self.pool.get_owned().await?;
                let statement = conn.prepare_typed(claim::CLAIM, claim::CLAIM_TYPES).await?;
                ClaimSession { conn, statement }
            }
        };
        let batch = claim::claim_prepared(
            &current.conn,
            &current.statement,
            &self.cfg.worker_id,
            self.cfg.lease,
            limit,
            &self.payload_budget,
        )
        .await?;
        *session = Some(current);
        Ok(batch)
    }

    /// Closes the doorbell's gate in a task of its own, on another pooled connection:
    /// the close takes the doorbell's row lock and commits, and the claimed deliveries
    /// need not wait for that. Skipped while the last close still runs (it closes the
    /// same gate).
    async fn close_gate(&self) {
        let mut closer = self.gate_closer.lock().await;
        if closer.as_ref().is_some_and(|task| !task.is_finished()) {
            return;
        }
        let pool = self.pool.clone();
        *closer = Some(tokio::spawn(async move {
            let closed = match pool.get().await {
                Ok(client) => claim::close_doorbell_gate(&*client).await,
                Err(e) => Err(e.into()),
            };
            if let Err(e) = closed {
                // Only an optimisation for producers: the next arm resets the gate.
                tracing::warn!(error = %e, "closing the doorbell gate failed");
            }
        }));
    }

    /// Waits for a gate close still running, so none outlives the dispatcher (and
    /// holds a connection to its database).
    async fn finish_gate_close(&self) {
        if let Some(task) = self.gate_closer.lock().await.take() {
            let _ = task.await;
        }
    }

    async fn arm(&self) -> Result<()> {
        let client = self.pool.get().await?;
        claim::arm_doorbell(&*client).await
    }

    async fn next_due(&self) -> Result<Option<Duration>> {
        let client = self.pool.get().await?;
        claim::next_due(&*client).await
    }

    /// Starts a send task for each claimed delivery as send slots free up, and parks
    /// what must be parked. A claim may bring more deliveries than there are free slots:
    /// the rest wait here, and the loop does not claim again until each has a slot or
    /// has been handed back. Once one delivery of the claim has had to wait, each later
    /// one is sent only while the settler can write outcomes, and only if at least half
    /// of the lease's spare time (the lease less the request timeout) is left for
    /// writing its outcome, as a delivery sent at once has all of it. Otherwise it and
    /// the rest of the claim are handed back unsent: due again at once, the claim not
    /// counted (parks are still written). So is everything left at shutdown. Returns
    /// whether send slots were scarce: a delivery was still waiting for one
    /// [`SCARCE_SLOT_WAIT`] after the claim went out, or was handed back for time.
    async fn dispatch(
        &self,
        claimed: Vec<Claimed>,
        claimed_at: tokio::time::Instant,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut unsent = Vec::new();
        let mut waited = false;
        let mut scarce = false;
        let mut items = claimed.into_iter();
        while let Some(item) = items.next() {
            if shutdown.is_cancelled() {
                unsent.push(unsent_outcome(item));
                unsent.extend(items.map(unsent_outcome));
                break;
            }
            let delivery = match item {
                Claimed::Send(delivery) => delivery,
                Claimed::Park {
                    event_id,
                    endpoint_id,
                    attempt,
                } => {
                    let outcome = Outcome {
                        event_id,
                        endpoint_id,
                        attempt,
                        next: Next::Park,
                        record: None,
                    };
                    // Like a send task's outcome, but the claim loop must notice a
                    // shutdown; the queue's slot is reserved first, so that the
                    // outcome is either queued or handed back.
                    tokio::select! {
                        biased;
                        slot = self.settle_tx.reserve() => {
                            if let Ok(slot) = slot {
                                slot.send(outcome);
                            }
                            continue;
                        }
                        _ = shutdown.cancelled() => {
                            unsent.push(outcome);
                            unsent.extend(items.map(unsent_outcome));
                            break;
                        }
                    }
                }
            };
            // Only this loop takes permits, so the first `free` deliveries of a claim
            // never wait.
            let permit = match Arc::clone(&self.permits).try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    waited = true;
                    let permit = tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => None,
                        permit = Arc::clone(&self.permits).acquire_owned() => permit.ok(),
                    };
                    scarce |= claimed_at.elapsed() > SCARCE_SLOT_WAIT;
                    permit
                }
            };
            let sendable = match permit {
                // Shutdown (the semaphore is never closed).
                None => false,
                Some(_) if !waited => true,
                Some(_) => {
                    self.wait_while_settle_stalled(shutdown).await
                        && may_send_after_waiting(
                            claimed_at.elapsed(),
                            self.cfg.http_timeout,
                            self.cfg.lease,
                        )
                }
            };
            let (Some(permit), true) = (permit, sendable) else {
                // Later deliveries of the claim would have waited at least as long.
                scarce |= !shutdown.is_cancelled();
                unsent.push(unsent_outcome(Claimed::Send(delivery)));
                unsent.extend(items.map(unsent_outcome));
                break;
            };
            let task = SendTask {
                sender: Arc::clone(&self.sender),
                policy: self.policy,
                abort: self.abort.clone(),
                settle_tx: self.settle_tx.clone(),
                metrics: Arc::clone(&self.metrics),
            };
            self.tracker.spawn(async move {
                task.run(delivery).await;
                drop(permit);
            });
        }
        if !unsent.is_empty() {
            self.hand_back(unsent);
        }
        scarce
    }

    /// Queues outcomes for deliveries not sent, from a task the drain waits for (and
    /// bounds): the outcome queue may be full while the settler cannot write, and the
    /// claim loop must still stop. What cannot be queued before the drain ends is
    /// dropped; the lease brings those deliveries back.
    fn hand_back(&self, outcomes: Vec<Outcome>) {
        tracing::debug!(
            count = outcomes.len(),
            "handing back claimed deliveries unsent"
        );
        let settle_tx = self.settle_tx.clone();
        let abort = self.abort.clone();
        self.tracker.spawn(async move {
            for outcome in outcomes {
                tokio::select! {
                    biased;
                    _ = settle_tx.send(outcome) => {}
                    _ = abort.cancelled() => return,
                }
            }
        });
    }
}

/// The outcome for a claimed delivery that is not sent: released, or parked.
fn unsent_outcome(item: Claimed) -> Outcome {
    let (event_id, endpoint_id, attempt, next) = match item {
        Claimed::Send(d) => (d.event_id, d.endpoint_id, d.attempt, Next::Release),
        Claimed::Park {
            event_id,
            endpoint_id,
            attempt,
        } => (event_id, endpoint_id, attempt, Next::Park),
    };
    Outcome {
        event_id,
        endpoint_id,
        attempt,
        next,
        record: None,
    }
}

/// Whether a delivery that waited for a send slot may still be sent, `waited` after
/// its claim went out. Its request ends within `http_timeout`; what is left of the
/// lease then is the time to write its outcome before another dispatcher may claim it
/// again. A delivery sent at once has `lease - http_timeout` for that; one that waited
/// must keep at least half of it.
fn may_send_after_waiting(waited: Duration, http_timeout: Duration, lease: Duration) -> bool {
    waited < lease.saturating_sub(http_timeout) / 2
}

struct SendTask {
    sender: Arc<Sender>,
    policy: RetryPolicy,
    abort: CancellationToken,
    settle_tx: mpsc::Sender<Outcome>,
    metrics: Arc<Metrics>,
}

impl SendTask {
    async fn run(self, delivery: Delivery) {
        self.metrics.inflight_add(1);
        let (next, record) = tokio::select! {
            biased;
            _ = self.abort.cancelled() => (Next::Release, None),
            attempt = self.sender.send(&delivery) => {
                let tries = u32::try_from(delivery.tries).unwrap_or(1).max(1);
                let verdict = self.policy.decide(tries, &attempt.result, rand::random());
                if verdict == Verdict::Dead {
                    tracing::warn!(
                        event_id = delivery.event_id,
                        endpoint_id = delivery.endpoint_id,
                        attempt = delivery.attempt,
                        reason = %reason(&attempt.result),
                        "delivery dead"
                    );
                }
                self.record_metrics(&delivery, &attempt.result, attempt.duration, &verdict);
                (Next::Verdict(verdict), Some(attempt))
            }
        };
        self.metrics.inflight_add(-1);
        let outcome = Outcome {
            event_id: delivery.event_id,
            endpoint_id: delivery.endpoint_id,
            attempt: delivery.attempt,
            next,
            record,
        };
        // Fails only if the settler is gone, i.e. the process is going down. The queue
        // can be full only while the settler cannot write (a stall), and then the drain
        // must still end: once it has run out of time, the outcome is dropped. Either
        // way the lease brings the delivery back.
        tokio::select! {
            biased;
            _ = self.settle_tx.send(outcome) => {}
            _ = self.abort.cancelled() => {
                tracing::warn!(
                    event_id = delivery.event_id,
                    endpoint_id = delivery.endpoint_id,
                    "an outcome could not be queued before the drain ended; the delivery comes back when its lease runs out"
                );
            }
        }
    }
}

impl SendTask {
    fn record_metrics(
        &self,
        delivery: &Delivery,
        result: &AttemptResult,
        duration: Duration,
        verdict: &Verdict,
    ) {
        self.metrics
            .attempt_duration
            .observe(duration.as_secs_f64());
        let refused = matches!(
            result,
            AttemptResult::Failed {
                kind: ErrorKind::RefusedTarget,
                ..
            }
        );
        let outcome = match verdict {
            Verdict::Delivered => {
                if let Ok(age) = std::time::SystemTime::now().duration_since(delivery.created_at) {
                    self.metrics.commit_to_delivery.observe(age.as_secs_f64());
                }
                DeliveryOutcome::Delivered
            }
            Verdict::Retry(_) => DeliveryOutcome::Retried,
            _ if refused => DeliveryOutcome::Refused,
            Verdict::Dead | Verdict::Gone => DeliveryOutcome::Dead,
        };
        self.metrics.delivery(delivery.endpoint_id, outcome);
    }
}

/// A log-safe reason: the status code or the error kind, never bodies or URLs.
fn reason(result: &AttemptResult) -> String {
    match result {
        AttemptResult::Response { status, .. } => format!("HTTP {status}"),
        AttemptResult::Failed { kind, .. } => kind.as_str().to_owned(),
    }
}
