//! The dispatcher: one claim loop feeding a bounded pool of HTTP sends, one settler
//! writing outcomes back, one listener waking the loop.
//!
//! ```text
//!  listener ──wake──▶ claim loop ──Delivery──▶ send tasks (≤ concurrency) ──Outcome──▶ settler
//!   (LISTEN)          (claim.rs)               (deliver.rs, retry.rs)                  (settle.rs)
//! ```
//!
//! The claim loop is made of parts: [`wakeup`] decides when to claim, arm the doorbell
//! and sleep (no I/O), [`session`] runs the loop's statements, and [`send`] takes what
//! a claim brought into send slots. The loop in this module only strings them together.
//!
//! No transaction is ever held across an HTTP request: a claim commits before the
//! sends start, and outcomes are written by a later statement.

mod load;
mod send;
mod session;
mod wakeup;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::claim;
use crate::config::{Config, ConfigError};
use crate::db;
use crate::deliver::Sender;
use crate::error::{Error, Result};
use crate::housekeeping::{self, Housekeeping};
use crate::listener;
use crate::metrics::Metrics;
use crate::ordering::Sequencer;
use crate::pooler;
use crate::retention::RetentionPolicy;
use crate::settle::{self, SettleTotals};
use crate::shutdown::{self, Drained};

use send::SendSide;
use session::Session;
use wakeup::{Action, Wake, Wakeup};

/// How long the settler may keep trying to write the last outcomes at shutdown.
const FINAL_SETTLE_BOUND: Duration = Duration::from_secs(10);
/// How long a background task told to stop may take to do so once the outcomes are
/// written; it had the drain's time already.
const TASK_STOP_BOUND: Duration = Duration::from_secs(2);

/// What a dispatcher did before it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Outcome counts written by the settler.
    pub totals: SettleTotals,
    /// How the drain ended.
    pub drained: Drained,
}

/// A webhook dispatcher. Any number may run against one database.
///
/// Its `Debug` output shows where it connects without the password.
#[derive(Clone)]
pub struct Dispatcher {
    database_url: String,
    listen_database_url: Option<String>,
    config: Config,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("database", &shown_database_url(&self.database_url))
            .field(
                "listen_database",
                &self.listen_database_url.as_deref().map(shown_database_url),
            )
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A connection string as it may be shown: a URL without its password and its query
/// (where libpq parameters such as `sslpassword` may be), any other form not at all,
/// since its `password=` could be written in several ways.
fn shown_database_url(database_url: &str) -> String {
    match url::Url::parse(database_url) {
        Ok(mut url) if matches!(url.scheme(), "postgres" | "postgresql") => {
            if url.password().is_some() {
                // Fails only for URLs that cannot have a password, which this has.
                let _ = url.set_password(Some("redacted"));
            }
            url.set_query(None);
            url.set_fragment(None);
            url.to_string()
        }
        _ => "(a key=value connection string, not shown)".to_owned(),
    }
}

impl Dispatcher {
    /// A dispatcher for the database at `database_url`; fails if `config` is invalid.
    pub fn new(database_url: impl Into<String>, config: Config) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            database_url: database_url.into(),
            listen_database_url: None,
            config,
            metrics: Arc::new(Metrics::default()),
        })
    }

    /// Opens the LISTEN session with `url` instead of the main connection string: the
    /// pool may then go through a transaction-mode pooler, where LISTEN hears nothing,
    /// while the one LISTEN session goes straight to PostgreSQL. It must reach the same
    /// database, since a notification reaches only sessions of the database it was sent
    /// in.
    ///
    /// Fails with a [`ConfigError`] naming `WEBHOOK_LISTEN_DATABASE_URL` if `url` is not
    /// a connection string libpq would accept.
    pub fn with_listen_database_url(mut self, url: impl Into<String>) -> Result<Self> {
        let url = url.into();
        db::conninfo::ConnInfo::parse(&url).map_err(|e| ConfigError {
            variable: "WEBHOOK_LISTEN_DATABASE_URL",
            message: e.to_string(),
        })?;
        self.listen_database_url = Some(url);
        Ok(self)
    }

    /// The name this dispatcher records in `locked_by`.
    pub fn worker_id(&self) -> &str {
        &self.config.worker_id
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
        // Every dispatcher session, pooled or LISTEN, comes from a connector like this.
        let session = db::Session::dispatcher(&cfg);
        let sessions = db::Connector::new(&self.database_url, session.clone())?;
        let listen_sessions = match &self.listen_database_url {
            Some(url) => db::Connector::new(url, session.clone()).map_err(|e| match e {
                Error::Config(c) => Error::Config(ConfigError {
                    variable: "WEBHOOK_LISTEN_DATABASE_URL",
                    message: c.message,
                }),
                other => other,
            })?,
            None => sessions.clone(),
        };
        let statements = pooler::start(
            &sessions,
            cfg.prepared_statements,
            cfg.listen && self.listen_database_url.is_none(),
        )
        .await?;
        let pool = db::pool(&sessions, cfg.pool_size).await?;
        pooler::check_settings(&*pool.get().await?, &session.settings()).await?;
        // Fail fast on an unreachable database rather than looping on warnings, and on
        // one that could not record what is delivered.
        settle::probe(&*pool.get().await?).await?;
        let sender = Sender::new(&cfg)?;

        let wake = Arc::new(Notify::new());
        let listener_stop = CancellationToken::new();
        let listener = cfg.listen.then(|| {
            tokio::spawn(listener::run(
                listen_sessions,
                Arc::clone(&wake),
                Arc::clone(&self.metrics),
                listener_stop.clone(),
            ))
        });

        let housekeeping_stop = CancellationToken::new();
        let housekeeping = tokio::spawn(housekeeping::run(
            pool.clone(),
            sessions.clone(),
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

        // Ordered events: fanned out in commit order, poked by every claim.
        let sequencer_poke = Arc::new(Notify::new());
        let sequencer_stop = CancellationToken::new();
        let sequencer = tokio::spawn(
            Sequencer {
                pool: pool.clone(),
                connector: sessions.clone(),
                poke: Arc::clone(&sequencer_poke),
                claims: Arc::clone(&wake),
                limit: i64::from(cfg.batch_size),
                poll_interval: cfg.poll_interval,
            }
            .run(sequencer_stop.clone()),
        );

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
                circuit: cfg.circuit,
                dead_head: cfg.ordering_dead_head,
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

        let mut claim_loop = ClaimLoop {
            payload_budget: claim::PayloadBudget::from_config(&cfg),
            fast_ok: true,
            session: Session::new(pool, sessions, statements),
            send: SendSide::new(
                &cfg,
                sender,
                settle_tx,
                settle_stalled_rx,
                Arc::clone(&self.metrics),
            ),
            wake,
            sequencer: sequencer_poke,
            metrics: Arc::clone(&self.metrics),
            cfg,
        };
        claim_loop.run(&shutdown).await;
        // Nothing is woken or kept any more; both stop while the drain runs.
        listener_stop.cancel();
        housekeeping_stop.cancel();
        sequencer_stop.cancel();
        let ClaimLoop {
            mut session,
            send,
            cfg,
            ..
        } = claim_loop;
        session.finish_gate_close().await;

        let drained = shutdown::drain(&send.tracker, cfg.drain_timeout, &send.abort).await;
        // Every send task has finished and dropped its sender; dropping ours lets the
        // settler flush the rest and stop.
        drop(send);
        let totals = match tokio::time::timeout(FINAL_SETTLE_BOUND, &mut settler).await {
            Ok(totals) => totals.unwrap_or_default(),
            Err(_) => {
                settle_give_up.cancel();
                // Giving up ends a flush; anything else it might wait on is cut short.
                match tokio::time::timeout(TASK_STOP_BOUND, &mut settler).await {
                    Ok(totals) => totals.unwrap_or_default(),
                    Err(_) => {
                        tracing::warn!("the settler did not stop in time at shutdown; aborted");
                        settler.abort();
                        SettleTotals::default()
                    }
                }
            }
        };
        // Only now do the loop's connections go back to the pool: one may still run a
        // statement abandoned at shutdown, and the settler's writes must not queue
        // behind it.
        drop(session);
        stop_task(housekeeping, "housekeeping").await;
        stop_task(sequencer, "sequencer").await;
        if let Some(listener) = listener {
            stop_task(listener, "listener").await;
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

/// Waits for `task`, told to stop, for at most [`TASK_STOP_BOUND`], then aborts it:
/// one of its statements may wait on a lock. Housekeeping's steps are safe to
/// interrupt (each runs again at its next period), and the listener holds no work.
async fn stop_task(task: tokio::task::JoinHandle<()>, name: &'static str) {
    let abort = task.abort_handle();
    if tokio::time::timeout(TASK_STOP_BOUND, task).await.is_err() {
        tracing::warn!(
            task = name,
            "a task did not stop in time at shutdown; aborted"
        );
        abort.abort();
    }
}

/// After a statement of the claim loop failed: logs it and backs off, or at shutdown
/// (when the failure is most likely the statement's cancel) stops.
fn failed(
    wakeup: &mut Wakeup,
    shutdown: &CancellationToken,
    what: &str,
    e: &crate::Error,
) -> Option<Action> {
    if shutdown.is_cancelled() {
        return None;
    }
    tracing::warn!(error = %e, "{what} failed; retrying");
    Some(wakeup.failed())
}

/// The claim loop: claims while there is work and send slots to take it, and otherwise
/// waits as [`Wakeup`] decides.
struct ClaimLoop {
    cfg: Config,
    session: Session,
    send: SendSide,
    /// Payload bytes held by claimed, unsent deliveries; claims wait for room in it.
    payload_budget: Arc<claim::PayloadBudget>,
    /// The last claim found no endpoint that needs the limits' part of the full claim
    /// (see [`claim::CLAIM_FAST`]); until a claim says otherwise, assumed.
    fast_ok: bool,
    wake: Arc<Notify>,
    /// The sequencer's wake-up ([`crate::ordering`]): poked after every claim, since the
    /// loop is what notifications and the poll tick wake.
    sequencer: Arc<Notify>,
    metrics: Arc<Metrics>,
}

impl ClaimLoop {
    /// Runs until `shutdown`. Every wait in it ends on shutdown, statements included
    /// (see [`session`]).
    async fn run(&mut self, shutdown: &CancellationToken) {
        let mut wakeup = Wakeup::new(self.cfg.listen, self.cfg.poll_interval);
        let mut action = Action::Claim;
        // A statement that ended after shutdown (a claim whose rows were handed back)
        // still yields an action: none is started.
        while !shutdown.is_cancelled() {
            match self.step(action, &mut wakeup, shutdown).await {
                Some(next) => action = next,
                None => return,
            }
        }
    }

    /// Does `action` and tells `wakeup` how it went; returns what follows, or `None` on
    /// shutdown.
    async fn step(
        &mut self,
        action: Action,
        wakeup: &mut Wakeup,
        shutdown: &CancellationToken,
    ) -> Option<Action> {
        Some(match action {
            Action::Claim => return self.claim(wakeup, shutdown).await,
            Action::Arm => match self.session.arm(shutdown).await? {
                Ok(()) => wakeup.armed(),
                Err(e) => return failed(wakeup, shutdown, "arming the doorbell", &e),
            },
            Action::ReadNextDue => match self.session.next_due(shutdown).await? {
                Ok(due) => wakeup.next_due(due),
                Err(e) => return failed(wakeup, shutdown, "reading the next due time", &e),
            },
            Action::Pause(duration) | Action::Backoff(duration) => {
                wakeup.woke(self.pause(duration, shutdown).await)
            }
            Action::Sleep {
                duration,
                poll_tick,
            } => {
                let wake = self.pause(duration, shutdown).await;
                if wake == Wake::Timer && poll_tick {
                    self.metrics.poll_tick();
                }
                wakeup.woke(wake)
            }
            Action::Stop => return None,
        })
    }

    /// Claims as many deliveries as the send slots can take and hands them to the send
    /// side; returns what to do next, or `None` on shutdown.
    async fn claim(&mut self, wakeup: &mut Wakeup, shutdown: &CancellationToken) -> Option<Action> {
        let free = self.send.wait_for_capacity(shutdown).await?;
        if !self.send.wait_while_settle_stalled(shutdown).await {
            return None;
        }
        if !self.payload_budget.wait_for_room(shutdown).await {
            return None;
        }
        let want = self.send.claim_size(free);
        let loads = self.send.load.snapshot();
        let claimed_at = tokio::time::Instant::now();
        let mut form = claim::Form::choose(self.fast_ok, &loads);
        let batch = loop {
            let batch = match self
                .session
                .claim(
                    &self.cfg.worker_id,
                    self.cfg.lease,
                    want,
                    (&self.payload_budget, &loads),
                    form,
                    shutdown,
                )
                .await?
            {
                Ok(batch) => batch,
                Err(e) => return failed(wakeup, shutdown, "claiming", &e),
            };
            self.fast_ok = batch.fast_ok.unwrap_or(self.fast_ok);
            match (batch.refused, form) {
                (true, claim::Form::Fast) => form = claim::Form::Full,
                _ => break batch,
            }
        };
        let got = batch.claimed.len();
        let after = wakeup.claimed(got, want, batch.more, claimed_at);
        // The sends go first: the gate close and the sequencer's run are statements on
        // other connections, and on a small machine they would compete with the first
        // request for the CPU. Neither is urgent (the gate only spares producers the
        // ring function; the sequencer's horizon needs runs, not their order).
        if got > 0 {
            self.metrics.claim_batch_size.observe(got as f64);
            tracing::info!(claimed = got, "batch claimed");
            self.send
                .dispatch(batch.claimed, claimed_at, shutdown)
                .await;
        }
        if after.close_gate {
            self.session.close_gate(shutdown);
        }
        self.sequencer.notify_one();
        Some(after.next)
    }

    /// Waits for `duration`, a wake-up or shutdown, whichever comes first.
    async fn pause(&self, duration: Duration, shutdown: &CancellationToken) -> Wake {
        tokio::select! {
            _ = shutdown.cancelled() => Wake::Shutdown,
            _ = self.wake.notified() => Wake::Woken,
            _ = tokio::time::sleep(duration) => Wake::Timer,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn debug(database_url: &str) -> String {
        let dispatcher = Dispatcher::new(database_url, Config::default()).unwrap();
        format!("{dispatcher:?}")
    }

    #[test]
    fn debug_output_never_shows_the_password() {
        let shown = debug(
            "postgres://app:hunter2@db.example:5433/orders?sslmode=require&sslpassword=hunter3",
        );
        assert!(
            shown.contains("postgres://app:redacted@db.example:5433/orders"),
            "{shown}"
        );
        for secret in ["hunter2", "hunter3"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        let shown = debug("postgresql://app:hun%40ter2@db.example/orders");
        assert!(!shown.contains("hun"), "{shown}");
        let shown = debug("host=db.example password=hunter2 dbname=orders");
        assert!(!shown.contains("hunter2"), "{shown}");
        let shown = debug("postgres://db.example/orders");
        assert!(shown.contains("postgres://db.example/orders"), "{shown}");
    }
}
