//! The claim loop's statements: the claim on a connection of its own, where the claim
//! statement is prepared once, the doorbell's arm and gate close, and the next due time.

use std::time::Duration;

use tokio::task::JoinHandle;

use crate::claim;
use crate::db::Pool;
use crate::error::Result;

/// A pooled connection held by the claim loop, with the claim statement prepared on it.
struct Prepared {
    conn: bb8::PooledConnection<
        'static,
        bb8_postgres::PostgresConnectionManager<tokio_postgres::NoTls>,
    >,
    claim: tokio_postgres::Statement,
}

/// The claim loop's connection and statements.
pub(super) struct Session {
    pool: Pool,
    /// Given back to the pool after any error; a fresh one is prepared at the next claim.
    prepared: Option<Prepared>,
    /// The doorbell gate's last close (see [`Session::close_gate`]).
    gate_closer: Option<JoinHandle<()>>,
}

impl Session {
    pub(super) fn new(pool: Pool) -> Self {
        Self {
            pool,
            prepared: None,
            gate_closer: None,
        }
    }

    /// Claims at most `limit` deliveries for `worker_id`, leased for `lease`.
    pub(super) async fn claim(
        &mut self,
        worker_id: &str,
        lease: Duration,
        limit: u32,
    ) -> Result<claim::Batch> {
        let current = match self.prepared.take() {
            Some(current) => current,
            None => {
                let conn = self.pool.get_owned().await?;
                let claim = conn.prepare_typed(claim::CLAIM, claim::CLAIM_TYPES).await?;
                Prepared { conn, claim }
            }
        };
        let batch =
            claim::claim_prepared(&current.conn, &current.claim, worker_id, lease, limit).await?;
        self.prepared = Some(current);
        Ok(batch)
    }

    /// Arms the doorbell.
    pub(super) async fn arm(&self) -> Result<()> {
        let client = self.pool.get().await?;
        claim::arm_doorbell(&*client).await
    }

    /// How long until the next known work falls due.
    pub(super) async fn next_due(&self) -> Result<Option<Duration>> {
        let client = self.pool.get().await?;
        claim::next_due(&*client).await
    }

    /// Closes the doorbell's gate in a task of its own, on another pooled connection:
    /// the close takes the doorbell's row lock and commits, and the claimed deliveries
    /// need not wait for that. Skipped while the last close still runs (it closes the
    /// same gate).
    pub(super) fn close_gate(&mut self) {
        if self
            .gate_closer
            .as_ref()
            .is_some_and(|task| !task.is_finished())
        {
            return;
        }
        let pool = self.pool.clone();
        self.gate_closer = Some(tokio::spawn(async move {
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
    pub(super) async fn finish_gate_close(&mut self) {
        if let Some(task) = self.gate_closer.take() {
            let _ = task.await;
        }
    }
}
