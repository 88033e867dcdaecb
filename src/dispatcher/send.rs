//! The send side: claimed deliveries into a bounded number of send slots, each send's
//! outcome to the settler, and what is not sent handed back.
//!
//! A send task always ends with an outcome for its delivery, a panic included: a panic
//! that unwound out of the task would leave the delivery leased with no outcome, to be
//! claimed again at every lease's end, its attempt count climbing with no attempt
//! recorded. A panic is recorded instead as an attempt that failed with
//! [`ErrorKind::Internal`], and the delivery ends `dead`: a bug does not heal by
//! retrying, and an operator can re-drive the delivery after an upgrade.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::FutureExt as _;

use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::claim::Claimed;
use crate::config::Config;
use crate::deliver::{Attempt, AttemptResult, Delivery, ErrorKind, Sender};
use crate::metrics::{DeliveryOutcome, Metrics};
use crate::retry::{RetryPolicy, Verdict};
use crate::settle::{Next, Outcome};

use super::load::EndpointLoad;

/// A claimed delivery still waiting for a send slot this long after its claim went out
/// marks the slots as scarce: for [`SCARCE_SLOTS_FOR`], claims take no more than the
/// free slots. In a burst, a whole batch finds slots within milliseconds.
const SCARCE_SLOT_WAIT: Duration = Duration::from_secs(1);
/// How long claims stay sized to the free slots after a long wait for one.
const SCARCE_SLOTS_FOR: Duration = Duration::from_secs(10);
/// How long the claim loop waits for more send slots when fewer than a useful number
/// are free (see [`SendSide::wait_for_capacity`]).
const CAPACITY_WAIT: Duration = Duration::from_millis(2);
/// The error recorded for an attempt that panicked. The panic's own message is kept
/// nowhere: it may quote whatever the panicking code held, a payload or a secret
/// included (a string slicing panic quotes the string).
const PANICKED: &str = "the attempt panicked: a bug in outboxd, not in the endpoint;      re-drive the delivery after upgrading";

/// Makes one HTTP attempt: the real [`Sender`] in production, and in tests an attempt
/// that fails in a chosen way (a panic, say).
pub(super) trait Attempter: Send + Sync + 'static {
    /// Attempts `delivery` once.
    fn attempt(&self, delivery: &Delivery) -> impl Future<Output = Attempt> + Send;
}

impl Attempter for Sender {
    fn attempt(&self, delivery: &Delivery) -> impl Future<Output = Attempt> + Send {
        self.send(delivery)
    }
}

/// Send slots, send tasks and the way to the settler.
pub(super) struct SendSide<A: Attempter = Sender> {
    sender: Arc<A>,
    policy: RetryPolicy,
    batch_size: u32,
    concurrency: u32,
    lease: Duration,
    http_timeout: Duration,
    permits: Arc<Semaphore>,
    /// Every send task, and the hand-backs; the drain waits for them.
    pub(super) tracker: TaskTracker,
    /// Cancelled when the drain runs out of time: each send task gives up its request.
    pub(super) abort: CancellationToken,
    settle_tx: mpsc::Sender<Outcome>,
    /// Set by the settler while outcomes cannot be written.
    settle_stalled: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    /// Until when claims take no more than the free send slots.
    scarce_until: Option<Instant>,
    /// Requests in flight per endpoint, for the claim.
    pub(super) load: Arc<EndpointLoad>,
}

impl<A: Attempter> SendSide<A> {
    /// `cfg.concurrency` send slots, sending with `sender`, outcomes to `settle_tx`.
    pub(super) fn new(
        cfg: &Config,
        sender: A,
        settle_tx: mpsc::Sender<Outcome>,
        settle_stalled: watch::Receiver<bool>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            sender: Arc::new(sender),
            policy: RetryPolicy {
                base: cfg.backoff_base,
                max: cfg.backoff_max,
                max_attempts: cfg.max_attempts,
            },
            batch_size: cfg.batch_size,
            concurrency: cfg.concurrency,
            lease: cfg.lease,
            http_timeout: cfg.http_timeout,
            permits: Arc::new(Semaphore::new(cfg.concurrency as usize)),
            tracker: TaskTracker::new(),
            abort: CancellationToken::new(),
            settle_tx,
            settle_stalled,
            metrics,
            scarce_until: None,
            load: Arc::new(EndpointLoad::new(cfg.endpoint_max_in_flight)),
        }
    }

    /// Waits until a useful number of send slots is free and returns how many are.
    /// Claiming a single row each time one slot frees would make every round trip carry
    /// one delivery, so it waits briefly for a quarter of a batch. Returns `None` on
    /// shutdown.
    pub(super) async fn wait_for_capacity(&self, shutdown: &CancellationToken) -> Option<u32> {
        let enough = (self.batch_size.min(self.concurrency) / 4).max(1);
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
                _ = tokio::time::sleep(CAPACITY_WAIT) => {
                    if free > 0 {
                        return Some(self.permits.available_permits() as u32);
                    }
                }
            }
        }
    }

    /// Waits while the settler cannot write outcomes: a delivery made now could not be
    /// recorded, and would be made again when its lease ran out. Returns `false` on
    /// shutdown.
    pub(super) async fn wait_while_settle_stalled(&self, shutdown: &CancellationToken) -> bool {
        if !*self.settle_stalled.borrow() {
            return true;
        }
        let mut stalled = self.settle_stalled.clone();
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = stalled.wait_for(|stalled| !stalled) => true,
        }
    }

    /// How many deliveries to claim with `free` send slots free.
    ///
    /// A whole batch, however few slots are free: the rest wait in [`SendSide::dispatch`]
    /// for a slot. Sized to the free slots, claims were a third to a half of a batch in
    /// bursts (smaller with several dispatchers), each paying a commit and a round trip
    /// for fewer rows. But for a while after a delivery waited long for a slot
    /// (timing-out endpoints hold them), claims take only the free slots again, so that
    /// a dispatcher whose slots turn over slowly does not keep holding rows that another
    /// could send. With little spare time in the lease, a delivery could wait only
    /// briefly before being handed back: claim no more than can be sent at once.
    pub(super) fn claim_size(&self, free: u32) -> u32 {
        let scarce = self
            .scarce_until
            .is_some_and(|until| Instant::now() < until)
            || self.lease.saturating_sub(self.http_timeout) / 2 < SCARCE_SLOT_WAIT;
        if scarce {
            free.min(self.batch_size)
        } else {
            self.batch_size
        }
    }

    /// Starts a send task for each claimed delivery as send slots free up, and parks
    /// what must be parked. A claim may bring more deliveries than there are free slots:
    /// the rest wait here, and the loop does not claim again until each has a slot or
    /// has been handed back. No delivery is sent while the settler cannot write
    /// outcomes: the loop checks before it claims, but a stall may begin while the
    /// claim runs, and what the claim took must then wait for it to end. A delivery
    /// that had to wait, for a slot or for the settler, and once one has waited for a
    /// slot each later one, is sent only if at least half of the lease's spare time
    /// (the lease less the request timeout) is left for writing its outcome, as a
    /// delivery sent at once has all of it. Otherwise it and the rest of the claim are
    /// handed back unsent: due again at once, the claim not counted (parks are still
    /// written). So is everything left at shutdown. Send slots count as scarce (see
    /// [`SendSide::claim_size`]) when a delivery was still waiting for one
    /// [`SCARCE_SLOT_WAIT`] after the claim went out, or was handed back for time after
    /// waiting for one.
    pub(super) async fn dispatch(
        &mut self,
        claimed: Vec<Claimed>,
        claimed_at: Instant,
        shutdown: &CancellationToken,
    ) {
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
                        // A parked head is still its line's head.
                        ordered: false,
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
                Some(_) if !waited && !*self.settle_stalled.borrow() => true,
                Some(_) => {
                    self.wait_while_settle_stalled(shutdown).await
                        && may_send_after_waiting(
                            claimed_at.elapsed(),
                            self.http_timeout,
                            self.lease,
                        )
                }
            };
            let (Some(permit), true) = (permit, sendable) else {
                // Later deliveries of the claim would have waited at least as long.
                scarce |= waited && !shutdown.is_cancelled();
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
                load: Arc::clone(&self.load),
            };
            // In progress from here, before the task first runs: the next claim must
            // see it.
            let started = self.load.started(delivery.endpoint_id);
            self.tracker.spawn(async move {
                task.run(delivery, started).await;
                drop(permit);
            });
        }
        if !unsent.is_empty() {
            self.hand_back(unsent);
        }
        if scarce {
            self.scarce_until = Some(Instant::now() + SCARCE_SLOTS_FOR);
        }
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
        // Not sent: a head stays its line's head.
        ordered: false,
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

/// One delivery's send: the attempt, its verdict, its outcome queued for the settler.
struct SendTask<A> {
    sender: Arc<A>,
    policy: RetryPolicy,
    abort: CancellationToken,
    settle_tx: mpsc::Sender<Outcome>,
    metrics: Arc<Metrics>,
    load: Arc<EndpointLoad>,
}

impl<A: Attempter> SendTask<A> {
    async fn run(self, delivery: Delivery, started: std::time::Instant) {
        self.metrics.inflight_add(1);
        let (next, record) = tokio::select! {
            biased;
            _ = self.abort.cancelled() => (Next::Release, None),
            attempt = self.attempt(&delivery) => {
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
        // Only an answer says how fast the endpoint answers: a timeout, a refused
        // connection, says it is failing, and the age of what is still in progress
        // covers that while it lasts. Once it answers again, its pace is its answers'.
        let answered = record
            .as_ref()
            .filter(|a| matches!(a.result, AttemptResult::Response { .. }))
            .map(|a| a.duration);
        self.load.finished(delivery.endpoint_id, started, answered);
        let outcome = Outcome {
            event_id: delivery.event_id,
            endpoint_id: delivery.endpoint_id,
            attempt: delivery.attempt,
            next,
            record,
            ordered: delivery.ordered,
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

    /// The attempt, or, if it panicked, an attempt that failed with
    /// [`ErrorKind::Internal`], started when the panic was caught (the clock is not
    /// read for every attempt to date a rare failure).
    async fn attempt(&self, delivery: &Delivery) -> Attempt {
        // The attempt's future is made inside the caught future too: an attempter may
        // panic before its future first runs.
        let attempt = async { self.sender.attempt(delivery).await };
        match AssertUnwindSafe(attempt).catch_unwind().await {
            Ok(attempt) => attempt,
            Err(_panic) => {
                tracing::error!(
                    event_id = delivery.event_id,
                    endpoint_id = delivery.endpoint_id,
                    attempt = delivery.attempt,
                    "a send panicked (a bug in outboxd); the delivery is dead, re-drive it after upgrading"
                );
                Attempt {
                    started_at: SystemTime::now(),
                    duration: Duration::ZERO,
                    result: AttemptResult::Failed {
                        kind: ErrorKind::Internal,
                        message: PANICKED.to_owned(),
                    },
                }
            }
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    /// Event 13's attempt panics once it runs, quoting what it held; event 15's panics
    /// before its future exists; every other is answered 200.
    struct Buggy;

    impl Attempter for Buggy {
        fn attempt(&self, delivery: &Delivery) -> impl Future<Output = Attempt> + Send {
            let body = delivery
                .body
                .as_ref()
                .map(|b| b.to_vec())
                .unwrap_or_default();
            let (event_id, payload) = (
                delivery.event_id,
                String::from_utf8_lossy(&body).into_owned(),
            );
            if event_id == 15 {
                panic!("cannot build the request for {payload}");
            }
            async move {
                if event_id == 13 {
                    panic!("cannot sign {payload}");
                }
                answered_200()
            }
        }
    }

    const PAYLOAD: &str = r#"{"card":"4242 4242 4242 4242"}"#;

    fn delivery(event_id: i64) -> Claimed {
        Claimed::Send(Delivery {
            event_id,
            endpoint_id: 7,
            attempt: 1,
            created_at: SystemTime::now(),
            body: Ok(bytes::Bytes::from_static(PAYLOAD.as_bytes())),
            url: "http://127.0.0.1:9/hook".into(),
            secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
            previous_secret: None,
            tries: 1,
            headers: std::sync::Arc::from([]),
            timeout: None,
            ordered: false,
        })
    }

    /// Sends `claimed` through a send side of two slots and returns the outcomes by
    /// event, once every send task has ended, with the send side.
    async fn send(claimed: Vec<Claimed>) -> (Vec<Outcome>, SendSide<Buggy>, Arc<Metrics>) {
        let cfg = Config {
            concurrency: 2,
            batch_size: 10,
            ..Config::default()
        };
        let (settle_tx, mut settle_rx) = mpsc::channel(16);
        let (_stalled, stalled_rx) = watch::channel(false);
        let metrics = Arc::new(Metrics::default());
        let mut side = SendSide::new(&cfg, Buggy, settle_tx, stalled_rx, Arc::clone(&metrics));
        let n = claimed.len();
        side.dispatch(claimed, Instant::now(), &CancellationToken::new())
            .await;
        side.tracker.close();
        side.tracker.wait().await;
        let mut outcomes = Vec::new();
        settle_rx.recv_many(&mut outcomes, n + 1).await;
        outcomes.sort_by_key(|o| o.event_id);
        (outcomes, side, metrics)
    }

    /// An attempt answered 200 at once.
    fn answered_200() -> Attempt {
        Attempt {
            started_at: SystemTime::now(),
            duration: Duration::ZERO,
            result: AttemptResult::Response {
                status: 200,
                retry_after: None,
                excerpt: String::new(),
            },
        }
    }

    /// Counts its attempts, each answered 200.
    struct Counting(Arc<std::sync::atomic::AtomicUsize>);

    impl Attempter for Counting {
        fn attempt(&self, _delivery: &Delivery) -> impl Future<Output = Attempt> + Send {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async {
                answered_200()
            }
        }
    }

    /// Dispatches events 1 and 2, claimed while the settler was writing, through a send
    /// side whose settler stalls as the claim returns and recovers after `stall`, with
    /// `lease` (and no request timeout). Returns how many attempts had started when the
    /// stall ended, and the outcomes by event.
    async fn dispatch_into_a_stall(lease: Duration, stall: Duration) -> (usize, Vec<Outcome>) {
        let cfg = Config {
            concurrency: 4,
            batch_size: 10,
            lease,
            http_timeout: Duration::ZERO,
            ..Config::default()
        };
        let (settle_tx, mut settle_rx) = mpsc::channel(16);
        let (stalled_tx, stalled_rx) = watch::channel(true);
        let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let metrics = Arc::new(Metrics::default());
        let mut side = SendSide::new(
            &cfg,
            Counting(Arc::clone(&attempts)),
            settle_tx,
            stalled_rx,
            metrics,
        );
        let stall_ends = async {
            tokio::time::sleep(stall).await;
            let during = attempts.load(std::sync::atomic::Ordering::SeqCst);
            stalled_tx.send_replace(false);
            during
        };
        let claimed = vec![delivery(1), delivery(2)];
        let shutdown = CancellationToken::new();
        let ((), during) = tokio::join!(
            side.dispatch(claimed, Instant::now(), &shutdown),
            stall_ends
        );
        side.tracker.close();
        side.tracker.wait().await;
        let mut outcomes = Vec::new();
        settle_rx.recv_many(&mut outcomes, 3).await;
        outcomes.sort_by_key(|o| o.event_id);
        (during, outcomes)
    }

    /// A claim that was running when the settler stalled sends nothing until outcomes
    /// can be written again: what it sent could not be recorded.
    #[tokio::test]
    async fn a_claim_that_returns_during_a_settle_stall_sends_nothing_until_it_ends() {
        let (during, outcomes) =
            dispatch_into_a_stall(Duration::from_secs(60), Duration::from_millis(200)).await;
        assert_eq!(during, 0, "nothing is sent while outcomes cannot be written");
        let next: Vec<&Next> = outcomes.iter().map(|o| &o.next).collect();
        assert_eq!(
            next,
            [&Next::Verdict(Verdict::Delivered); 2],
            "sent once the stall ends"
        );
    }

    /// A stall that outlasts half the lease's spare time hands the claim back unsent.
    #[tokio::test]
    async fn a_claim_held_by_a_long_settle_stall_is_handed_back() {
        let (during, outcomes) =
            dispatch_into_a_stall(Duration::from_millis(200), Duration::from_millis(300)).await;
        assert_eq!(during, 0, "nothing is sent while outcomes cannot be written");
        let events: Vec<(i64, &Next, bool)> = outcomes
            .iter()
            .map(|o| (o.event_id, &o.next, o.record.is_some()))
            .collect();
        assert_eq!(
            events,
            [(1, &Next::Release, false), (2, &Next::Release, false)]
        );
    }

    #[tokio::test]
    async fn a_send_that_panics_ends_dead_with_a_reason_and_frees_its_slot() {
        let claimed = [12, 13, 14, 15, 16].map(delivery).into();
        let (outcomes, side, metrics) = send(claimed).await;
        let events: Vec<i64> = outcomes.iter().map(|o| o.event_id).collect();
        assert_eq!(events, [12, 13, 14, 15, 16], "one outcome per delivery");
        for outcome in &outcomes {
            let record = outcome.record.as_ref().expect("an attempt is recorded");
            if matches!(outcome.event_id, 13 | 15) {
                assert_eq!(outcome.next, Next::Verdict(Verdict::Dead), "{outcome:?}");
                assert_eq!(
                    record.result,
                    AttemptResult::Failed {
                        kind: ErrorKind::Internal,
                        message: PANICKED.to_owned(),
                    }
                );
                // What the settler stores for the attempt and the delivery.
                assert_eq!(ErrorKind::Internal.as_str(), "internal");
                let (status, error) = crate::settle::summarize(&record.result);
                assert_eq!(status, None);
                assert!(error.is_some_and(|e| e.starts_with("internal: ")));
            } else {
                assert_eq!(outcome.next, Next::Verdict(Verdict::Delivered));
            }
            // Neither the payload nor the panic's message is kept.
            assert!(!format!("{outcome:?}").contains("4242"), "{outcome:?}");
        }
        // Every slot is free again, and the panics count as dead deliveries.
        assert_eq!(side.permits.available_permits(), 2);
        assert_eq!(metrics.deliveries_total(DeliveryOutcome::Dead), 2);
        assert_eq!(metrics.deliveries_total(DeliveryOutcome::Delivered), 3);
    }
}
