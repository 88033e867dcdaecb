//! The claim loop's statements: the claim, the doorbell's arm and the next due time on
//! a connection the loop holds (the claim statement is prepared on it once, unless
//! statements go unnamed behind a transaction-mode pooler), and the gate close beside
//! them on another.
//!
//! Each of them, and each wait for a connection, ends on shutdown: a statement may wait
//! on a lock without bound (a producer holding the doorbell's row in an idle
//! transaction, an operator's `LOCK TABLE`), and the drain must not wait with it. A
//! statement still running at shutdown is cancelled in the server, so that it neither
//! takes effect later (a claim would lease rows to a dispatcher that is gone) nor keeps
//! its connection busy for whoever uses it next.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::claim;
use crate::db::{Connector, Pool, PooledConnection as Conn};
use crate::error::Result;
use crate::pooler::{self, StatementMode};

/// The loop's connection, with the claim statement prepared on it unless statements
/// are sent unnamed.
struct Prepared {
    conn: Conn,
    /// [`claim::CLAIM`] and [`claim::CLAIM_FAST`].
    claims: Option<[tokio_postgres::Statement; 2]>,
}

/// The claim loop's connection and statements.
pub(super) struct Session {
    pool: Pool,
    /// The pool's connector: it sends cancel requests as it connects (TLS included).
    connector: Connector,
    /// Whether the claim is prepared on the loop's connection or sent unnamed.
    statements: StatementMode,
    /// Given back to the pool after any error; a fresh one is prepared at the next claim.
    prepared: Option<Prepared>,
    /// Connections whose statement was abandoned at shutdown and did not end: kept out
    /// of the pool until the dispatcher ends, so that the settler's last writes do not
    /// queue behind a statement still waiting in the server.
    abandoned: Vec<Conn>,
    /// The doorbell gate's last close (see [`Session::close_gate`]); it returns its
    /// connection if it abandoned a statement.
    gate_closer: Option<JoinHandle<Option<Conn>>>,
}

impl Session {
    pub(super) fn new(pool: Pool, connector: Connector, statements: StatementMode) -> Self {
        Self {
            pool,
            connector,
            statements,
            prepared: None,
            abandoned: Vec::new(),
            gate_closer: None,
        }
    }

    /// Claims at most `limit` deliveries for `worker_id`, leased for `lease`. `None` on
    /// shutdown, unless the claim had already committed: its rows must be handed back.
    pub(super) async fn claim(
        &mut self,
        worker_id: &str,
        lease: Duration,
        limit: u32,
        (budget, loads): (&Arc<claim::PayloadBudget>, &claim::Loads),
        form: claim::Form,
        shutdown: &CancellationToken,
    ) -> Option<Result<claim::Batch>> {
        let (connector, p) = match self.open(shutdown).await? {
            Ok(opened) => opened,
            Err(e) => return Some(Err(e)),
        };
        let batch = match &p.claims {
            Some([full, fast]) => {
                let statement = match form {
                    claim::Form::Full => full,
                    claim::Form::Fast => fast,
                };
                let claim = claim::claim_prepared(
                    &p.conn,
                    statement,
                    worker_id,
                    lease,
                    limit,
                    (budget, loads),
                    form,
                );
                connector.finish_or_cancel(&p.conn, shutdown, claim).await
            }
            None => {
                let claim = claim::claim_unnamed(
                    &*p.conn,
                    worker_id,
                    lease,
                    limit,
                    (budget, loads),
                    form,
                );
                connector.finish_or_cancel(&p.conn, shutdown, claim).await
            }
        };
        self.after(batch)
    }

    /// Arms the doorbell. `None` on shutdown.
    pub(super) async fn arm(&mut self, shutdown: &CancellationToken) -> Option<Result<()>> {
        let (connector, p) = match self.open(shutdown).await? {
            Ok(opened) => opened,
            Err(e) => return Some(Err(e)),
        };
        let armed = connector
            .finish_or_cancel(&p.conn, shutdown, claim::arm_doorbell(&*p.conn))
            .await;
        self.after(armed)
    }

    /// How long until the next known work falls due. `None` on shutdown.
    pub(super) async fn next_due(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Option<Result<Option<Duration>>> {
        let (connector, p) = match self.open(shutdown).await? {
            Ok(opened) => opened,
            Err(e) => return Some(Err(e)),
        };
        let due = connector
            .finish_or_cancel(&p.conn, shutdown, claim::next_due(&*p.conn))
            .await;
        self.after(due)
    }

    /// The loop's connection, taken from the pool and the claim prepared on it if there
    /// is none, with the connector that cancels its statements. `None` on shutdown.
    async fn open(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Option<Result<(&Connector, &Prepared)>> {
        let prepared = match self.prepared.take() {
            Some(prepared) => prepared,
            None => {
                let conn = match until_cancelled(shutdown, self.pool.get_owned()).await? {
                    Ok(conn) => conn,
                    Err(e) => return Some(Err(e.into())),
                };
                if self.statements == StatementMode::Unnamed {
                    Prepared { conn, claims: None }
                } else {
                    // The two named statements, where nothing in between forbids them.
                    #[allow(clippy::disallowed_methods, reason = "prepared on purpose")]
                    let prepare = async {
                        let full = conn.prepare_typed(claim::CLAIM, claim::CLAIM_TYPES);
                        let fast =
                            conn.prepare_typed(claim::CLAIM_FAST, claim::CLAIM_FAST_TYPES);
                        Ok::<_, tokio_postgres::Error>([full.await?, fast.await?])
                    };
                    match self
                        .connector
                        .finish_or_cancel(&conn, shutdown, prepare)
                        .await
                    {
                        Some(Ok(claims)) => Prepared {
                            conn,
                            claims: Some(claims),
                        },
                        Some(Err(e)) => return Some(Err(e.into())),
                        None => {
                            self.abandoned.push(conn);
                            return None;
                        }
                    }
                }
            }
        };
        Some(Ok((&self.connector, self.prepared.insert(prepared))))
    }

    /// After a statement on the loop's connection: an error gives the connection back
    /// to the pool (it may be broken), or closes it if its server is read-only (see
    /// [`pooler::discard_if_read_only`]); an abandoned statement sets it aside.
    fn after<T>(&mut self, result: Option<Result<T>>) -> Option<Result<T>> {
        match &result {
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                if let Some(mut p) = self.prepared.take() {
                    pooler::discard_if_read_only(&mut p.conn, e);
                }
            }
            None => self.abandoned.extend(self.prepared.take().map(|p| p.conn)),
        }
        result
    }

    /// Closes the doorbell's gate in a task of its own, on another pooled connection:
    /// the close takes the doorbell's row lock and commits, and the claimed deliveries
    /// need not wait for that. Skipped while the last close still runs (it closes the
    /// same gate), and after shutdown.
    pub(super) fn close_gate(&mut self, shutdown: &CancellationToken) {
        let running = self
            .gate_closer
            .as_ref()
            .is_some_and(|task| !task.is_finished());
        if running || shutdown.is_cancelled() {
            return;
        }
        let pool = self.pool.clone();
        let connector = self.connector.clone();
        let shutdown = shutdown.clone();
        self.gate_closer = Some(tokio::spawn(async move {
            let conn = match until_cancelled(&shutdown, pool.get_owned()).await? {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "closing the doorbell gate failed");
                    return None;
                }
            };
            let close = claim::close_doorbell_gate(&*conn);
            match connector.finish_or_cancel(&conn, &shutdown, close).await {
                Some(Ok(())) => None,
                Some(Err(e)) => {
                    // Only an optimisation for producers: the next arm resets the gate.
                    tracing::warn!(error = %e, "closing the doorbell gate failed");
                    None
                }
                None => Some(conn),
            }
        }));
    }

    /// Waits for a gate close still running (it ends on shutdown, see
    /// [`Connector::finish_or_cancel`]), so none outlives the dispatcher.
    pub(super) async fn finish_gate_close(&mut self) {
        if let Some(task) = self.gate_closer.take() {
            if let Ok(Some(conn)) = task.await {
                self.abandoned.push(conn);
            }
        }
    }
}

/// Awaits `wait` unless `shutdown` comes first (`None`). For waits that can simply be
/// dropped, such as for a pooled connection.
async fn until_cancelled<T>(
    shutdown: &CancellationToken,
    wait: impl Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        biased;
        done = wait => Some(done),
        _ = shutdown.cancelled() => None,
    }
}
