//! The faults, drawn from a seeded generator, and what each one put at risk.
//!
//! Two streams run side by side until the end of the fault period:
//!
//! * **process faults**, one at a time: `kill -9` of a dispatcher (restarted after a
//!   pause), SIGTERM of a dispatcher (its drain must end within a bound; restarted),
//!   `pg_terminate_backend` of every backend of one dispatcher or of all of them, and a
//!   PostgreSQL restart, fast or immediate (a crash), with the server down for a while;
//! * **receiver faults**, each for one endpoint or all of them for a few seconds:
//!   500, 503 with and without `Retry-After`, 429 with `Retry-After`, connections
//!   dropped without an answer, and answers stalled past the HTTP timeout.
//!
//! Each stream deals its kinds from a shuffled deck, so every kind happens once before
//! any happens twice and a run of a minute sees them all. Half of the process faults
//! strike at a random moment, the other half wait (up to 3 s) until their target holds
//! a lease, so that they find work in flight.
//!
//! **What a fault puts at risk.** A consumer may see a webhook twice only if the outcome
//! of a request it processed was not written in time: that request's delivery was
//! leased at the moment of the fault. So each process fault records the deliveries
//! leased to the dispatchers it hit, read from the database right after the fault (for
//! a kill, once more after the dead process's backends are gone; for a restart, just
//! before the stop and just after the start). A crash can also take back the
//! dispatchers' last asynchronous commits (claims and outcomes of the last
//! ~3 × `wal_writer_delay`), and while the server is down nothing can be written, so a
//! restart also puts at risk every delivery the consumer processed from one second
//! before the stop to one second after the server was back. A stalled answer puts its
//! own delivery at risk (the receiver knows which). Receiver faults that refuse or drop
//! a request put nothing at risk: the consumer did not process it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};

use crate::Clock;
use crate::cluster::{Cluster, StopMode, WAL_WRITER_DELAY};
use crate::fleet::{self, Fleet};
use crate::observer::{Observer, Pair};
use crate::receiver::{self, Receiver};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Kill9,
    Sigterm,
    TerminateOne,
    TerminateAll,
    RestartFast,
    RestartImmediate,
    Http500,
    Http503RetryAfter,
    Http503,
    Http429RetryAfter,
    Close,
    Stall,
}

const PROCESS_KINDS: [Kind; 6] = [
    Kind::Kill9,
    Kind::Sigterm,
    Kind::TerminateOne,
    Kind::TerminateAll,
    Kind::RestartFast,
    Kind::RestartImmediate,
];

const RECEIVER_KINDS: [Kind; 6] = [
    Kind::Http500,
    Kind::Http503RetryAfter,
    Kind::Http503,
    Kind::Http429RetryAfter,
    Kind::Close,
    Kind::Stall,
];

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Self::Kill9 => "kill -9 a dispatcher",
            Self::Sigterm => "SIGTERM a dispatcher",
            Self::TerminateOne => "terminate one dispatcher's backends",
            Self::TerminateAll => "terminate all dispatchers' backends",
            Self::RestartFast => "PostgreSQL restart (fast)",
            Self::RestartImmediate => "PostgreSQL restart (immediate)",
            Self::Http500 => "receiver 500",
            Self::Http503RetryAfter => "receiver 503 + Retry-After",
            Self::Http503 => "receiver 503",
            Self::Http429RetryAfter => "receiver 429 + Retry-After",
            Self::Close => "receiver drops connections",
            Self::Stall => "receiver stalls past the timeout",
        }
    }
}

/// One fault as it happened.
#[derive(Debug, Clone)]
pub struct Fault {
    pub kind: Kind,
    pub start_ms: u64,
    pub end_ms: u64,
    pub detail: String,
    /// Deliveries leased to the dispatchers it hit, at the fault.
    pub at_risk: Vec<Pair>,
    /// Deliveries the consumer processed within this window (ms) are at risk too.
    pub window: Option<(u64, u64)>,
    /// Something that must not happen (a drain that did not end, a failed exit).
    pub finding: Option<String>,
}

pub struct Ctx {
    pub fleet: Arc<Fleet>,
    pub cluster: Arc<Cluster>,
    pub observer: Arc<Observer>,
    pub receiver: Arc<Receiver>,
    pub clock: Clock,
    pub endpoints: usize,
    pub faults: Mutex<Vec<Fault>>,
}

impl Ctx {
    fn record(&self, fault: Fault) {
        let mut line = format!(
            "fault: {} ({} ms): {}",
            fault.kind.label(),
            fault.end_ms.saturating_sub(fault.start_ms),
            fault.detail
        );
        if let Some(finding) = &fault.finding {
            line.push_str(&format!(" -- FINDING: {finding}"));
        }
        crate::note_at(fault.start_ms, &line);
        self.faults.lock().expect("faults").push(fault);
    }
}

/// Process faults until `until`; an error (PostgreSQL would not start again) ends the
/// run.
pub async fn process_stream(ctx: Arc<Ctx>, seed: u64, until: Instant) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut deck: Vec<Kind> = Vec::new();
    loop {
        let gap = Duration::from_millis(rng.random_range(1_500..5_000));
        tokio::time::sleep_until((Instant::now() + gap).min(until).into()).await;
        if Instant::now() >= until {
            return Ok(());
        }
        if deck.is_empty() {
            deck = PROCESS_KINDS.to_vec();
            deck.shuffle(&mut rng);
        }
        let kind = deck.pop().expect("a full deck");
        let slot = rng.random_range(0..ctx.fleet.slots.len());
        let pause = Duration::from_millis(rng.random_range(200..3_000));
        let busy = rng.random_bool(0.5);
        let fault = match kind {
            Kind::Kill9 => kill9(&ctx, slot, pause, busy).await?,
            Kind::Sigterm => sigterm(&ctx, slot, pause, busy).await?,
            Kind::TerminateOne => terminate_one(&ctx, slot, busy).await?,
            Kind::TerminateAll => terminate_all(&ctx, busy).await?,
            Kind::RestartFast => restart(&ctx, StopMode::Fast, pause, busy).await?,
            Kind::RestartImmediate => restart(&ctx, StopMode::Immediate, pause, busy).await?,
            _ => unreachable!("not a process fault"),
        };
        if let Some(fault) = fault {
            ctx.record(fault);
        }
    }
}

/// With `busy`, waits (up to [`BUSY_WAIT`]) until the given workers (`None`: anyone)
/// hold a lease, so that half of the process faults strike while work is in flight
/// rather than wherever the clock happens to fall. Returns a note for the log.
async fn wait_busy(
    ctx: &Ctx,
    workers: Option<&[String]>,
    busy: bool,
) -> anyhow::Result<&'static str> {
    if !busy {
        return Ok("at a random moment");
    }
    let deadline = Instant::now() + BUSY_WAIT;
    while Instant::now() < deadline {
        if !ctx.observer.leased(workers).await?.is_empty() {
            return Ok("while busy");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok("(found idle)")
}

/// How long a fault aimed at busy dispatchers waits for one to hold a lease.
const BUSY_WAIT: Duration = Duration::from_secs(3);

fn dedup(mut pairs: Vec<Pair>) -> Vec<Pair> {
    pairs.sort_unstable();
    pairs.dedup();
    pairs
}

async fn kill9(
    ctx: &Ctx,
    index: usize,
    pause: Duration,
    busy: bool,
) -> anyhow::Result<Option<Fault>> {
    let mut slot = ctx.fleet.slots[index].lock().await;
    let Some(pid) = slot.pid() else {
        return Ok(None);
    };
    let worker = slot.worker_id.clone();
    let when = wait_busy(ctx, Some(std::slice::from_ref(&worker)), busy).await?;
    let ports = ctx.fleet.backend_ports(&slot);
    let start_ms = ctx.clock.ms();
    ctx.fleet.kill9(&mut slot).await;
    let workers = [worker.clone()];
    let mut at_risk = ctx.observer.leased(Some(&workers)).await?;
    // Its backends may still be finishing a statement it sent (a claim or a settle
    // commits without it): look again once they are gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let rows = ctx
            .observer
            .query(
                "SELECT count(*) FROM pg_stat_activity WHERE client_port = ANY($1)",
                &[&ports],
            )
            .await?;
        if rows[0].get::<_, i64>(0) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    at_risk.extend(ctx.observer.leased(Some(&workers)).await?);
    let at_risk = dedup(at_risk);
    tokio::time::sleep(pause).await;
    ctx.fleet.spawn(&mut slot)?;
    Ok(Some(Fault {
        kind: Kind::Kill9,
        start_ms,
        end_ms: ctx.clock.ms(),
        detail: format!(
            "{worker} (pid {pid}) {when}: {} deliveries leased at its death; restarted after {} ms as {}",
            at_risk.len(),
            pause.as_millis(),
            slot.worker_id
        ),
        at_risk,
        window: None,
        finding: None,
    }))
}

async fn sigterm(
    ctx: &Ctx,
    index: usize,
    pause: Duration,
    busy: bool,
) -> anyhow::Result<Option<Fault>> {
    let mut slot = ctx.fleet.slots[index].lock().await;
    let Some(pid) = slot.pid() else {
        return Ok(None);
    };
    let worker = slot.worker_id.clone();
    let when = wait_busy(ctx, Some(std::slice::from_ref(&worker)), busy).await?;
    let start_ms = ctx.clock.ms();
    // The drain may take DRAIN_TIMEOUT, then the settler up to 10 s to write the last
    // outcomes (FINAL_SETTLE_BOUND in src/dispatcher.rs); 5 s more for a loaded machine.
    let bound = fleet::DRAIN_TIMEOUT + Duration::from_secs(15);
    let (finding, how) = match ctx.fleet.sigterm(&mut slot, bound).await {
        Ok((Some(0), took)) => (None, format!("exited 0 after {} ms", took.as_millis())),
        Ok((code, took)) => (
            Some(format!(
                "{worker} exited with {code:?} after SIGTERM (expected 0); log {}",
                slot.log.display()
            )),
            format!("exited with {code:?} after {} ms", took.as_millis()),
        ),
        Err(waited) => (
            Some(format!(
                "{worker} had not exited {} ms after SIGTERM (drain bound {} ms): killed; log {}",
                waited.as_millis(),
                bound.as_millis(),
                slot.log.display()
            )),
            "did not exit in time".to_owned(),
        ),
    };
    let at_risk = dedup(
        ctx.observer
            .leased(Some(std::slice::from_ref(&worker)))
            .await?,
    );
    tokio::time::sleep(pause).await;
    ctx.fleet.spawn(&mut slot)?;
    Ok(Some(Fault {
        kind: Kind::Sigterm,
        start_ms,
        end_ms: ctx.clock.ms(),
        detail: format!(
            "{worker} (pid {pid}) {when}: {how}; {} deliveries still leased to it; restarted after {} ms as {}",
            at_risk.len(),
            pause.as_millis(),
            slot.worker_id
        ),
        at_risk,
        window: None,
        finding,
    }))
}

async fn terminate_one(ctx: &Ctx, index: usize, busy: bool) -> anyhow::Result<Option<Fault>> {
    // Held so the process cannot be replaced while its backends are found and ended.
    let slot = ctx.fleet.slots[index].lock().await;
    if slot.pid().is_none() {
        return Ok(None);
    }
    let worker = slot.worker_id.clone();
    let when = wait_busy(ctx, Some(std::slice::from_ref(&worker)), busy).await?;
    let ports = ctx.fleet.backend_ports(&slot);
    let start_ms = ctx.clock.ms();
    let rows = ctx
        .observer
        .query(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE client_port = ANY($1) AND application_name LIKE 'outboxd%'",
            &[&ports],
        )
        .await?;
    let ended: i64 = rows[0].get(0);
    let at_risk = dedup(
        ctx.observer
            .leased(Some(std::slice::from_ref(&worker)))
            .await?,
    );
    Ok(Some(Fault {
        kind: Kind::TerminateOne,
        start_ms,
        end_ms: ctx.clock.ms(),
        detail: format!(
            "{worker} {when}: {ended} of its {} connections' backends terminated; {} deliveries leased to it",
            ports.len(),
            at_risk.len()
        ),
        at_risk,
        window: None,
        finding: None,
    }))
}

async fn terminate_all(ctx: &Ctx, busy: bool) -> anyhow::Result<Option<Fault>> {
    let when = wait_busy(ctx, None, busy).await?;
    let start_ms = ctx.clock.ms();
    let rows = ctx
        .observer
        .query(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE application_name LIKE 'outboxd%' AND datname = current_database()",
            &[],
        )
        .await?;
    let ended: i64 = rows[0].get(0);
    let at_risk = dedup(ctx.observer.leased(None).await?);
    Ok(Some(Fault {
        kind: Kind::TerminateAll,
        start_ms,
        end_ms: ctx.clock.ms(),
        detail: format!(
            "{when}: {ended} backends terminated; {} deliveries leased",
            at_risk.len()
        ),
        at_risk,
        window: None,
        finding: None,
    }))
}

/// How far before a stop the consumer's processed deliveries count as at risk: an
/// immediate stop can take back asynchronous commits up to 3 × `wal_writer_delay` old;
/// the rest is margin for the time between a request being processed and its outcome
/// reaching the settler.
const BEFORE_STOP: Duration = Duration::from_millis(3 * WAL_WRITER_DELAY.as_millis() as u64 + 400);
/// How long after the server is back the consumer's processed deliveries count as at
/// risk (outcomes of requests made while it was down are written once it is back).
const AFTER_START: Duration = Duration::from_secs(1);

async fn restart(
    ctx: &Ctx,
    mode: StopMode,
    down: Duration,
    busy: bool,
) -> anyhow::Result<Option<Fault>> {
    let when = wait_busy(ctx, None, busy).await?;
    let mut at_risk = ctx.observer.leased(None).await?;
    let before = at_risk.len();
    let start_ms = ctx.clock.ms();
    ctx.cluster.stop(mode).await?;
    tokio::time::sleep(down).await;
    ctx.cluster.start().await?;
    let up_ms = ctx.clock.ms();
    let after = ctx.observer.leased(None).await?;
    let after_count = after.len();
    at_risk.extend(after);
    Ok(Some(Fault {
        kind: if mode == StopMode::Fast {
            Kind::RestartFast
        } else {
            Kind::RestartImmediate
        },
        start_ms,
        end_ms: up_ms,
        detail: format!(
            "stop -m {} {when}, down {} ms; {before} deliveries leased before the stop, {after_count} after the start",
            mode.label(),
            up_ms - start_ms
        ),
        at_risk: dedup(at_risk),
        window: Some((
            start_ms.saturating_sub(BEFORE_STOP.as_millis() as u64),
            up_ms + AFTER_START.as_millis() as u64,
        )),
        finding: None,
    }))
}

/// Receiver faults until `until`.
pub async fn receiver_stream(ctx: Arc<Ctx>, seed: u64, until: Instant) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut deck: Vec<Kind> = Vec::new();
    loop {
        let gap = Duration::from_millis(rng.random_range(500..4_000));
        tokio::time::sleep_until((Instant::now() + gap).min(until).into()).await;
        if Instant::now() >= until {
            return;
        }
        if deck.is_empty() {
            deck = RECEIVER_KINDS.to_vec();
            deck.shuffle(&mut rng);
        }
        let kind = deck.pop().expect("a full deck");
        let eps: Vec<usize> = if rng.random_bool(0.5) {
            (0..ctx.endpoints).collect()
        } else {
            vec![rng.random_range(0..ctx.endpoints)]
        };
        let duration = Duration::from_millis(rng.random_range(1_000..4_000));
        let share = rng.random_range(0.3..1.0);
        let status = |status, retry_after| receiver::Fault::Status {
            status,
            retry_after,
            share,
        };
        let fault = match kind {
            Kind::Http500 => status(500, None),
            Kind::Http503RetryAfter => status(503, Some(1)),
            Kind::Http503 => status(503, None),
            Kind::Http429RetryAfter => status(429, Some(1)),
            Kind::Close => receiver::Fault::Close { share },
            Kind::Stall => receiver::Fault::Stall {
                delay: fleet::HTTP_TIMEOUT + Duration::from_millis(1_500),
            },
            _ => unreachable!("not a receiver fault"),
        };
        let start_ms = ctx.clock.ms();
        ctx.receiver.set_fault(&eps, fault, duration);
        let what = match fault {
            receiver::Fault::Stall { delay } => {
                format!("every answer after {} ms", delay.as_millis())
            }
            _ => format!("{:.0}% of requests", share * 100.0),
        };
        ctx.record(Fault {
            kind,
            start_ms,
            end_ms: start_ms + duration.as_millis() as u64,
            detail: format!("endpoints {eps:?}, {what}"),
            at_risk: Vec::new(),
            window: None,
            finding: None,
        });
        tokio::time::sleep(duration).await;
    }
}
