//! Sequencing ordered events: fanning the events that carry an `ordering_key` out to
//! their endpoints in the order their producers' transactions committed, one line per
//! (endpoint, key) with only its head deliverable.
//!
//! The producers' deferred trigger (`sql/0013_ordered_delivery.sql`) numbers each
//! ordered event at commit into `webhook_ordering_log`. The sequencer, a task of every
//! dispatcher, takes those rows in number order with [`SEQUENCE`]: a key's first event
//! for an endpoint becomes the line's head, an ordinary `pending` delivery that the
//! claim loop claims like any other; the rest are `queued` behind it, outside the due
//! index. When a head ends, the settle promotes the next (`webhook_ordering_advance`).
//!
//! A number is final (its event visible, or never to be) only once every transaction
//! that could have drawn a smaller one has ended. The sequencer keeps a [`Horizon`]: the
//! largest number each of its recent runs saw, with that run's transaction id; a later
//! run whose snapshot's xmin is past that id knows every number up to it is final
//! (docs/ordering.md, section 1, shows why `xmax`-based rules are not enough). So an
//! ordered event goes out at the earliest in the sequencer's second run after its
//! commit, and a transaction with an xid left open anywhere in the cluster holds every
//! ordered event back until it ends.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_postgres::GenericClient;
use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;

use crate::db::{Connector, Pool};
use crate::error::Result;

/// Fans out, in number order, the ordered events whose numbers are final. Parameters:
/// `$1`/`$2` the [`Horizon`]'s pairs (largest number a run saw, that run's xid), `$3`
/// the most log rows to take.
///
/// * `ocand` walks the log's primary key up to the horizon, `FOR UPDATE SKIP LOCKED`:
///   sequencers of several dispatchers share the log without waiting for each other.
/// * `admitted` keeps a prefix of each key: a row goes only if no row of its key with a
///   smaller number is left behind (locked by another sequencer), so two sequencers
///   never split a key's events between them out of order. `gaps` finds the first row
///   left behind per key through the log's key index.
/// * `keyed` locks (or creates) the row of each (endpoint, key), in (endpoint, key)
///   order as the settle takes them: `INSERT ... ON CONFLICT DO UPDATE` reads the row's
///   latest committed version whatever this statement's snapshot, so a settle that just
///   emptied a line and deleted its row is seen, and a fresh row names this run's first
///   event of the key as the head. Every other delivery of the key is `queued`.
/// * `pair` is this run's contribution to the horizon: the largest number in the log
///   and the run's own xid, assigned here, after its snapshot (only while the log holds
///   something: an xid costs a little, and an empty log needs no horizon).
///
/// Returns one row: the pair, the snapshot's xmin (as `int8`), how many log rows it
/// took, how many heads it made (`pending`, due now or at their `deliver_after`), and
/// whether rows are left in the log.
pub const SEQUENCE: &str = concat!(
    "
WITH snap AS (
    SELECT pg_snapshot_xmin(pg_current_snapshot())::text::int8 AS xmin
), horizon AS (
    SELECT coalesce(max(p.seen), 0) AS upto
    FROM unnest($1::int8[], $2::int8[]) AS p(seen, xid)
    WHERE p.xid < (SELECT xmin FROM snap)
), pair AS (
    SELECT m.seen,
           CASE WHEN m.seen IS NOT NULL THEN pg_current_xact_id()::text::int8 END AS xid
    FROM (SELECT max(seq) AS seen FROM webhook_ordering_log) AS m
), ocand AS (
    SELECT l.seq, l.event_id, l.ordering_key
    FROM webhook_ordering_log l
    WHERE l.seq <= (SELECT upto FROM horizon)
    ORDER BY l.seq
    LIMIT $3
    FOR UPDATE SKIP LOCKED
), odue AS (
    -- A probe by primary key per row (OFFSET 0 keeps the planner from turning it into
    -- a hash join over a scan of the whole outbox). An event deleted by hand is gone:
    -- its row is consumed, nothing is fanned out. An event already fanned out
    -- (numbered twice by STRAYS racing the trigger's row) is gone as well: a line must
    -- never get a head that will not come back to it. A `deliver_after` in the future
    -- is not waited for here (rows waiting in the log would fill every run's LIMIT and
    -- hold back other keys): the event joins its line, and as its head it is due then.
    SELECT c.seq, c.event_id, c.ordering_key, o.event_type, o.deliver_after,
           o.id IS NULL OR o.processed_at IS NOT NULL AS gone
    FROM ocand c
    LEFT JOIN LATERAL (SELECT x.id, x.event_type, x.deliver_after, x.processed_at
                       FROM webhook_outbox x WHERE x.id = c.event_id OFFSET 0) o ON true
), okeys AS (
    SELECT d.ordering_key, max(d.seq) AS upto, array_agg(d.seq) AS seqs
    FROM odue d
    GROUP BY d.ordering_key
), gaps AS (
    -- Each key's first number this run did not take (locked by another sequencer, or
    -- deleted by one since this statement's snapshot): a probe of the key's index
    -- entries, per key. (As NOT EXISTS per row, the planner hashed the whole log on
    -- every run: a burst of 20,000 cost 23 ms a run.)
    SELECT k.ordering_key,
           (SELECT l.seq FROM webhook_ordering_log l
            WHERE l.ordering_key = k.ordering_key AND l.seq < k.upto
              AND l.seq <> ALL (k.seqs)
            ORDER BY l.seq
            LIMIT 1) AS gap
    FROM okeys k
), admitted AS (
    -- A prefix of each key: what lies before its first gap.
    SELECT d.*
    FROM odue d
    JOIN gaps g ON g.ordering_key = d.ordering_key
    WHERE g.gap IS NULL OR d.seq < g.gap
), consumed AS (
    DELETE FROM webhook_ordering_log l
    WHERE l.seq = ANY (ARRAY(SELECT a.seq FROM admitted a))
), events AS (
    SELECT a.event_id AS id, a.event_type FROM admitted a WHERE NOT a.gone
), processed AS (
    UPDATE webhook_outbox o
    SET processed_at = now()
    WHERE o.id = ANY (ARRAY(SELECT id FROM events))
",
    crate::claim::claim_fanout_joined!(),
    "), ofan AS (
    SELECT f.event_id, f.endpoint_id, f.open, a.seq, a.ordering_key, a.deliver_after
    FROM fanout f
    JOIN admitted a ON a.event_id = f.event_id
), keyed AS (
    INSERT INTO webhook_ordering_keys AS k (endpoint_id, ordering_key, head_event_id, head_seq)
    SELECT DISTINCT ON (f.endpoint_id, f.ordering_key)
           f.endpoint_id, f.ordering_key, f.event_id, f.seq
    FROM ofan f
    ORDER BY f.endpoint_id, f.ordering_key, f.seq
    ON CONFLICT (endpoint_id, ordering_key) DO UPDATE SET head_seq = k.head_seq
    RETURNING k.endpoint_id, k.ordering_key, k.head_seq
), inserted AS (
    -- A head is due now, or at its event's `deliver_after` (parked if its endpoint is
    -- disabled: enable resumes it); the claim takes it like any due delivery.
    INSERT INTO webhook_deliveries
        (event_id, endpoint_id, state, next_attempt_at, ordering_key, ordering_seq)
    SELECT f.event_id, f.endpoint_id,
           CASE WHEN f.seq <> k.head_seq THEN 'queued'
                WHEN f.open THEN 'pending'
                ELSE 'parked' END,
           greatest(now(), f.deliver_after), f.ordering_key, f.seq
    FROM ofan f
    JOIN keyed k ON k.endpoint_id = f.endpoint_id AND k.ordering_key = f.ordering_key
    ON CONFLICT (event_id, endpoint_id) DO NOTHING
    RETURNING state
)
SELECT p.seen, p.xid, (SELECT xmin FROM snap) AS xmin,
       (SELECT count(*) FROM admitted) AS taken,
       (SELECT count(*) FROM inserted WHERE state = 'pending') AS heads,
       (SELECT count(*) FROM (SELECT 1 FROM webhook_ordering_log LIMIT $3 + 1) AS l)
           > (SELECT count(*) FROM admitted) AS waiting
FROM pair p"
);

/// The most pairs a [`Horizon`] keeps. A pair waits in it only while a transaction
/// older than its run is open; past this many, the oldest waiting pairs are dropped:
/// their numbers wait for a later pair instead (later, never lost).
const MAX_PAIRS: usize = 32;

/// Whether anything waits in the log: what a sequencer that found it empty asks first
/// when poked, instead of planning and running [`SEQUENCE`] (a claim pokes it each time,
/// and most claims of most deployments have no ordered event to wait for).
pub(crate) const PEEK: &str = "SELECT EXISTS (SELECT 1 FROM webhook_ordering_log) AS waiting";

/// Numbers the ordered events that have none: committed with a key, not fanned out, and
/// no row in the log. The producers' trigger did not fire for them (a session with
/// `session_replication_role = replica`, as logical replication's apply and some
/// restores run) or the key was set by a later `UPDATE`. Late, in the order found, but
/// never lost. Safe beside the sequencer and itself: an event numbered twice is fanned
/// out once ([`SEQUENCE`] consumes a number whose event is already processed).
pub(crate) const STRAYS: &str = "
INSERT INTO webhook_ordering_log (seq, event_id, ordering_key)
SELECT nextval('webhook_ordering_seq'), o.id, o.ordering_key
FROM (SELECT id, ordering_key FROM webhook_outbox
      WHERE processed_at IS NULL AND ordering_key IS NOT NULL
      ORDER BY id) AS o
WHERE NOT EXISTS (SELECT 1 FROM webhook_ordering_log l WHERE l.event_id = o.id)";

/// Numbers the strays ([`STRAYS`]); returns how many.
pub(crate) async fn number_strays(client: &impl GenericClient) -> Result<u64> {
    Ok(client.execute_typed(STRAYS, &[]).await?)
}

/// What the sequencer knows of which numbers are final: pairs (largest number a run
/// saw, that run's xid), oldest first. A pair whose xid is older than a snapshot's xmin
/// makes every number up to its own final; the largest such number is kept as a floor
/// (with xid 0, older than any snapshot), the pairs before it dropped.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Horizon {
    pairs: Vec<(i64, i64)>,
}

impl Horizon {
    /// The pairs as [`SEQUENCE`]'s `$1` and `$2`.
    fn arrays(&self) -> (Vec<i64>, Vec<i64>) {
        self.pairs.iter().copied().unzip()
    }

    /// After a run whose snapshot had `xmin`, and which saw `pair` (if the log held
    /// anything): drops the pairs that run could use, keeping the largest number among
    /// them as the floor, then adds the run's own.
    fn advance(&mut self, xmin: i64, pair: Option<(i64, i64)>) {
        let floor = self
            .pairs
            .iter()
            .filter(|&&(_, xid)| xid < xmin)
            .map(|&(seen, _)| seen)
            .max();
        if let Some(floor) = floor {
            self.pairs.retain(|&(_, xid)| xid >= xmin);
            self.pairs.insert(0, (floor, 0));
        }
        if let Some(pair) = pair {
            self.pairs.push(pair);
        }
        if self.pairs.len() > MAX_PAIRS {
            // Keep the floor (first) and the newest pairs.
            let excess = self.pairs.len() - MAX_PAIRS;
            let keep_floor = usize::from(self.pairs.first().is_some_and(|&(_, xid)| xid == 0));
            self.pairs.drain(keep_floor..keep_floor + excess);
        }
    }
}

/// What one run of [`SEQUENCE`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sequenced {
    /// Log rows taken (fanned out, or consumed for an event that is gone).
    pub taken: i64,
    /// Heads made due: the claim loop has work.
    pub heads: i64,
    /// Rows are left in the log (not final yet, not due yet, or more than one run takes).
    pub waiting: bool,
}

/// Runs [`SEQUENCE`] once on `client` with `horizon`, taking at most `limit` rows, and
/// moves the horizon on.
pub(crate) async fn sequence(
    client: &impl GenericClient,
    horizon: &mut Horizon,
    limit: i64,
) -> Result<Sequenced> {
    let (seen, xids) = horizon.arrays();
    let row = client
        .query_typed_one(
            SEQUENCE,
            &[
                (&seen, Type::INT8_ARRAY),
                (&xids, Type::INT8_ARRAY),
                (&limit, Type::INT8),
            ],
        )
        .await?;
    let pair = match (
        row.try_get::<_, Option<i64>>("seen")?,
        row.try_get::<_, Option<i64>>("xid")?,
    ) {
        (Some(seen), Some(xid)) => Some((seen, xid)),
        _ => None,
    };
    horizon.advance(row.try_get("xmin")?, pair);
    Ok(Sequenced {
        taken: row.try_get("taken")?,
        heads: row.try_get("heads")?,
        waiting: row.try_get("waiting")?,
    })
}

/// How long the sequencer waits before its next run, given what the last one did (or
/// `None` if it failed) and how long it waited last time. `None`: until poked.
///
/// Progress means more may be ready at once. Rows waiting without progress are not
/// final yet (a transaction older than the last pair is still open) or are locked by
/// another dispatcher's sequencer: looked at again at once (the usual case: the
/// producer's commit was all that the last pair waited for), then less and less often
/// (a run costs a round trip and, while the log holds rows, an xid). A failure backs
/// off like the claim loop's.
fn next_wait(last: Option<Sequenced>, waited: Option<Duration>) -> Option<Duration> {
    match last {
        Some(s) if s.taken > 0 && s.waiting => Some(Duration::ZERO),
        Some(s) if s.waiting => Some(match waited {
            None => Duration::ZERO,
            Some(w) if w.is_zero() => FIRST_RECHECK,
            Some(w) => (w * 2).min(MAX_RECHECK),
        }),
        Some(_) => None,
        None => Some(
            waited
                .filter(|w| *w >= FIRST_ERROR_DELAY)
                .map_or(FIRST_ERROR_DELAY, |w| (w * 2).min(MAX_ERROR_DELAY)),
        ),
    }
}

/// The first wait after a run that found rows it could not take yet and a re-run at
/// once that could not either: about what a producer's commit takes.
const FIRST_RECHECK: Duration = Duration::from_millis(1);
/// The longest wait while rows wait in the log.
const MAX_RECHECK: Duration = Duration::from_millis(50);
const FIRST_ERROR_DELAY: Duration = Duration::from_millis(100);
const MAX_ERROR_DELAY: Duration = Duration::from_secs(5);

/// The sequencer task's collaborators.
#[derive(Debug)]
pub(crate) struct Sequencer {
    /// Where it runs [`SEQUENCE`], one pooled connection per run.
    pub pool: Pool,
    /// The pool's connector: a run still waiting (on a lock) at shutdown is cancelled
    /// in the server, so that no session of a stopped dispatcher is left behind.
    pub connector: Connector,
    /// Woken by the claim loop whenever it claims (new ordered events may have
    /// committed; the claim loop wakes on notifications and its poll tick).
    pub poke: Arc<Notify>,
    /// The claim loop's wake-up: notified when heads were made due.
    pub claims: Arc<Notify>,
    /// Most log rows per run.
    pub limit: i64,
    /// Runs at least this often even if never poked.
    pub poll_interval: Duration,
}

impl Sequencer {
    /// Runs until `stop`. Errors are logged and retried with backoff; a run cut short
    /// by `stop` is cancelled in the server (it is one statement: all or nothing), and
    /// anything it left is taken by the next run of any dispatcher.
    pub(crate) async fn run(self, stop: CancellationToken) {
        let mut horizon = Horizon::default();
        let mut wait: Option<Duration> = Some(Duration::ZERO);
        // The last run left the log empty: peek before the next.
        let mut empty = false;
        loop {
            let limit = wait.unwrap_or(self.poll_interval);
            if !limit.is_zero() {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = self.poke.notified() => {}
                    _ = tokio::time::sleep(limit) => {}
                }
            } else if stop.is_cancelled() {
                return;
            }
            let Some(ran) = self.run_once(&mut horizon, empty, &stop).await else {
                return;
            };
            let last = match ran {
                Ok(s) => {
                    if s.heads > 0 {
                        self.claims.notify_one();
                    }
                    empty = !s.waiting;
                    Some(s)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "sequencing ordered events failed; retrying");
                    None
                }
            };
            wait = next_wait(last, wait);
        }
    }

    /// One run, after a [`PEEK`] if `peek` (a run that finds nothing to do then says
    /// so without running [`SEQUENCE`]); `None` once `stop` has ended it.
    async fn run_once(
        &self,
        horizon: &mut Horizon,
        peek: bool,
        stop: &CancellationToken,
    ) -> Option<Result<Sequenced>> {
        let client = tokio::select! {
            biased;
            _ = stop.cancelled() => return None,
            client = self.pool.get() => match client {
                Ok(client) => client,
                Err(e) => return Some(Err(e.into())),
            },
        };
        let run = async {
            if peek && !client.query_typed_one(PEEK, &[]).await?.try_get("waiting")? {
                return Ok(Sequenced {
                    taken: 0,
                    heads: 0,
                    waiting: false,
                });
            }
            sequence(&*client, horizon, self.limit).await
        };
        self.connector.finish_or_cancel(&client, stop, run).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ran(taken: i64, waiting: bool) -> Option<Sequenced> {
        Some(Sequenced {
            taken,
            heads: taken,
            waiting,
        })
    }

    #[test]
    fn a_pair_counts_only_once_its_run_is_older_than_every_open_transaction() {
        let mut h = Horizon::default();
        h.advance(100, Some((7, 105)));
        assert_eq!(h.arrays(), (vec![7], vec![105]));
        // A transaction older than the run (xid 104) is still open: not yet.
        h.advance(104, Some((9, 110)));
        assert_eq!(h.arrays(), (vec![7, 9], vec![105, 110]));
        // Everything before 106 has ended: 7 is final, kept as the floor.
        h.advance(106, None);
        assert_eq!(h.arrays(), (vec![7, 9], vec![0, 110]));
        // Past 110 too: the floor rises to 9, the older floor goes.
        h.advance(111, Some((12, 120)));
        assert_eq!(h.arrays(), (vec![9, 12], vec![0, 120]));
    }

    #[test]
    fn an_empty_log_adds_no_pair_and_keeps_the_floor() {
        let mut h = Horizon::default();
        h.advance(50, None);
        assert_eq!(h, Horizon::default());
        h.advance(50, Some((3, 60)));
        h.advance(61, None);
        h.advance(70, None);
        assert_eq!(h.arrays(), (vec![3], vec![0]));
    }

    #[test]
    fn a_long_transaction_keeps_the_newest_pairs_and_the_floor() {
        let mut h = Horizon::default();
        h.advance(10, Some((1, 11)));
        h.advance(12, None);
        for i in 0..100 {
            // xmin stays at 12: a transaction with xid 12 never ends.
            h.advance(12, Some((100 + i, 20 + i)));
        }
        let (seen, xids) = h.arrays();
        assert_eq!(seen.len(), MAX_PAIRS);
        assert_eq!((seen[0], xids[0]), (1, 0));
        assert_eq!(*seen.last().unwrap(), 199);
        // Once it ends, the newest pair's number is final.
        h.advance(1_000, None);
        assert_eq!(h.arrays(), (vec![199], vec![0]));
    }

    #[test]
    fn progress_runs_again_at_once_and_an_empty_log_waits_for_a_poke() {
        assert_eq!(next_wait(ran(5, true), Some(MAX_RECHECK)), Some(Duration::ZERO));
        assert_eq!(next_wait(ran(5, false), Some(Duration::ZERO)), None);
        assert_eq!(next_wait(ran(0, false), None), None);
    }

    #[test]
    fn rows_that_are_not_final_yet_are_looked_at_again_less_and_less_often() {
        let mut wait = None;
        let mut seen = Vec::new();
        for _ in 0..10 {
            wait = next_wait(ran(0, true), wait);
            seen.push(wait.unwrap().as_millis());
        }
        assert_eq!(seen, [0, 1, 2, 4, 8, 16, 32, 50, 50, 50]);
    }

    #[test]
    fn failures_back_off_to_a_ceiling() {
        let mut wait = Some(Duration::ZERO);
        let mut seen = Vec::new();
        for _ in 0..8 {
            wait = next_wait(None, wait);
            seen.push(wait.unwrap().as_millis());
        }
        assert_eq!(seen, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }
}
