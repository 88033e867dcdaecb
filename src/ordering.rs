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
//! that could have drawn a smaller one has ended. Only a transaction holding a
//! `ROW EXCLUSIVE` lock on `webhook_ordering_log` can have drawn a number it has not
//! committed yet: the producers' trigger and [`STRAYS`] draw inside an insert into the
//! log, whose lock is taken before the draw and held to the end of the transaction. So
//! each run first asks [`HORIZON`] for the largest number in the log, its own xid, and
//! the xids of the transactions holding that lock; the sequencer keeps a [`Horizon`] of
//! such pairs (number, xid), and a pair is final once no holder's xid is older than its
//! own (docs/ordering.md, section 1, gives the argument and why `xmax`-based rules are
//! not enough). A producer holds the lock only from its commit's numbering to its end,
//! so an ordered event waits only for the ordered producers committing beside it, and
//! usually goes out in the first run after its commit; a transaction left open elsewhere
//! holds nothing back unless it has drawn a number.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_postgres::GenericClient;
use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;

use crate::db::{Connector, Pool};
use crate::error::Result;

/// Fans out, in number order, the ordered events whose numbers are final. Parameters:
/// `$1` the largest final number (the [`Horizon`]'s floor, as [`HORIZON`] found it in a
/// statement that ended before this one's snapshot), `$2` the most log rows to take.
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
///
/// Returns one row: how many log rows it took, how many heads it made (`pending`, due
/// now or at their `deliver_after`), whether rows are left in the log, and whether some
/// up to the horizon may be among them (`behind`: a full run, or a key's rows left after
/// a gap; rows another sequencer holds are not counted, they are its to take).
pub const SEQUENCE: &str = concat!(
    "
WITH ocand_upto AS (
    SELECT $1::int8 AS upto
), ocand AS (
    SELECT l.seq, l.event_id, l.ordering_key
    FROM webhook_ordering_log l
    WHERE l.seq <= (SELECT upto FROM ocand_upto)
    ORDER BY l.seq
    LIMIT $2
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
SELECT (SELECT count(*) FROM admitted) AS taken,
       (SELECT count(*) FROM inserted WHERE state = 'pending') AS heads,
       (SELECT count(*) FROM (SELECT 1 FROM webhook_ordering_log LIMIT $2 + 1) AS l)
           > (SELECT count(*) FROM admitted) AS waiting,
       (SELECT count(*) FROM ocand) >= $2
           OR (SELECT count(*) FROM admitted) < (SELECT count(*) FROM ocand) AS behind"
);

/// The most pairs a [`Horizon`] keeps. A pair waits in it only while a transaction
/// that drew a number before its run is still open; past this many, the newest but one
/// is dropped (its numbers wait for the newest pair instead: later, never lost). The
/// oldest are kept because they are the first to become final: dropping them instead
/// starved the horizon when runs came faster than producers committed (every pair left
/// was younger than some producer still committing, and the floor never rose).
const MAX_PAIRS: usize = 32;

/// What a sequencer run asks first, in a statement of its own that ends before
/// [`SEQUENCE`]'s snapshot is taken: `seen`, the largest number in the log (NULL if the
/// log is empty: nothing to do), this statement's xid (assigned only then) and
/// `holders`, the xids (as `int8`, 32 bits) of the transactions holding a
/// `ROW EXCLUSIVE` lock on `webhook_ordering_log` at a moment after this statement's
/// snapshot.
///
/// Why that pair makes every number up to `seen` final once no holder's xid is older
/// than its own (docs/ordering.md, section 1): `seen` was committed before the snapshot,
/// so every smaller number was drawn before it; every transaction that draws (the
/// producers' trigger, after its outbox insert, and [`STRAYS`], which assigns its xid
/// first) has its xid before it draws, hence older than this statement's, assigned after
/// the snapshot; and it draws inside an insert into the log, whose lock it takes before
/// the draw and holds until it has ended (committed and out of the snapshots' running
/// set, or aborted), across `PREPARE TRANSACTION` too. A transaction that still holds
/// the lock and has an older xid may have drawn such a number; one that does not hold it
/// has ended, or drew nothing up to `seen`. So a pair whose holders this statement, or a
/// later one, finds gone is final for every statement that starts afterwards.
///
/// * `locks`: one read of the lock table (each reference to `pg_locks` reads it anew,
///   and the join below must see one state), only when the log holds something.
/// * A holder's xids come from its `transactionid` locks (its own xid and its
///   subtransactions'; the top-level one, the oldest, is what counts). A holder with no
///   xid drew nothing (every drawer has its xid first) and drops out of the join.
/// * The relation is matched with its database: OIDs repeat across databases.
pub(crate) const HORIZON: &str = "
WITH seen AS (
    SELECT max(seq) AS seen FROM webhook_ordering_log
), locks AS MATERIALIZED (
    SELECT l.locktype, l.database, l.relation, l.virtualtransaction, l.transactionid, l.mode
    FROM pg_locks l
    WHERE l.granted AND l.locktype IN ('relation', 'transactionid')
      AND (SELECT seen FROM seen) IS NOT NULL
)
SELECT s.seen,
       CASE WHEN s.seen IS NOT NULL THEN pg_current_xact_id()::text::int8 END AS xid,
       ARRAY(SELECT DISTINCT t.transactionid::text::int8
             FROM locks r
             JOIN locks t ON t.virtualtransaction = r.virtualtransaction
                         AND t.locktype = 'transactionid' AND t.mode = 'ExclusiveLock'
             WHERE r.locktype = 'relation' AND r.mode = 'RowExclusiveLock'
               AND r.relation = 'webhook_ordering_log'::regclass
               AND r.database = (SELECT d.oid FROM pg_database d
                                 WHERE d.datname = current_database())) AS holders
FROM seen s";

/// Whether anything waits in the log: what a sequencer that found it empty asks first
/// when poked, instead of planning and running [`HORIZON`] (a claim pokes it each time,
/// and most claims of most deployments have no ordered event to wait for: this keeps
/// their cost what it was before ordered delivery had a horizon of its own).
pub(crate) const PEEK: &str = "SELECT EXISTS (SELECT 1 FROM webhook_ordering_log) AS waiting";

/// Numbers the ordered events that have none: committed with a key, not fanned out, and
/// no row in the log. The producers' trigger did not fire for them (a session with
/// `session_replication_role = replica`, as logical replication's apply and some
/// restores run) or the key was set by a later `UPDATE`. Late, in the order found, but
/// never lost. Safe beside the sequencer and itself: an event numbered twice is fanned
/// out once ([`SEQUENCE`] consumes a number whose event is already processed).
///
/// The transaction's xid is assigned before its first draw (`nextval`'s argument is
/// evaluated first), as [`HORIZON`]'s argument needs: an insert gets its xid only when
/// it writes its first row, after that row's number is drawn.
pub(crate) const STRAYS: &str = "
INSERT INTO webhook_ordering_log (seq, event_id, ordering_key)
SELECT nextval(CASE WHEN pg_current_xact_id() IS NOT NULL
                    THEN 'webhook_ordering_seq'::regclass END),
       o.id, o.ordering_key
FROM (SELECT id, ordering_key FROM webhook_outbox
      WHERE processed_at IS NULL AND ordering_key IS NOT NULL
      ORDER BY id) AS o
WHERE NOT EXISTS (SELECT 1 FROM webhook_ordering_log l WHERE l.event_id = o.id)";

/// Numbers the strays ([`STRAYS`]); returns how many.
pub(crate) async fn number_strays(client: &impl GenericClient) -> Result<u64> {
    Ok(client.execute_typed(STRAYS, &[]).await?)
}

/// Whether transaction id `a` is older than `b`, compared as PostgreSQL compares 32-bit
/// xids (modulo 2^32, as `pg_locks` shows them): exact while the two are less than 2^31
/// apart, which PostgreSQL's wraparound protection guarantees for running transactions.
fn precedes(a: i64, b: i64) -> bool {
    // Truncation to the low 32 bits is the point: both are compared as 32-bit xids.
    let diff = (a as u32).wrapping_sub(b as u32) as i32;
    diff < 0
}

/// What the sequencer knows of which numbers are final: the largest number known final
/// (the floor, 0 at first), and pairs (largest number a run of [`HORIZON`] saw, that
/// run's xid) waiting for the transactions that held the log's lock then, oldest first.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Horizon {
    floor: i64,
    pairs: Vec<(i64, i64)>,
    /// The floor the last [`SEQUENCE`] ran up to when it left nothing up to it, and
    /// when: a run whose floor has not risen since need not run it again (see
    /// [`Horizon::settled`]).
    sequenced: Option<(i64, Instant)>,
}

impl Horizon {
    /// Every number up to this one is final.
    fn upto(&self) -> i64 {
        self.floor
    }

    /// Whether [`SEQUENCE`] would find nothing to take: it last ran up to the same floor
    /// and left nothing up to it, less than `again` ago. (Rows another dispatcher's
    /// sequencer held then are its to take; should it fail, the run after `again` takes
    /// them.) A sequencer waiting for a producer's commit then runs only [`HORIZON`].
    fn settled(&self, again: Duration) -> bool {
        self.sequenced
            .is_some_and(|(upto, at)| upto == self.floor && at.elapsed() < again)
    }

    /// After a run of [`HORIZON`] that saw `pair` and found `holders` holding the log's
    /// lock: adds the pair, then raises the floor to the largest number of the pairs no
    /// holder is older than, and drops those. (Finality runs in pair order: a holder
    /// older than a pair is older than every later pair, whose xid is larger.)
    fn advance(&mut self, holders: &[i64], pair: Option<(i64, i64)>) {
        match (pair, self.pairs.last()) {
            // Nothing new seen: the older pair stands for the same numbers, and its
            // older xid makes it final sooner.
            (Some((seen, _)), Some(&(last, _))) if seen <= last => {}
            (Some((seen, _)), None) if seen <= self.floor => {}
            (Some(pair), _) => self.pairs.push(pair),
            (None, _) => {}
        }
        let pending = |xid: i64| holders.iter().any(|&h| precedes(h, xid));
        let done = self.pairs.iter().take_while(|&&(_, xid)| !pending(xid)).count();
        if let Some(&(seen, _)) = self.pairs[..done].iter().max_by_key(|&&(seen, _)| seen) {
            self.floor = self.floor.max(seen);
        }
        self.pairs.drain(..done);
        if self.pairs.len() > MAX_PAIRS {
            // The newest pair stands for every number the one before it did.
            self.pairs.remove(self.pairs.len() - 2);
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

/// Nothing done, nothing left.
const IDLE: Sequenced = Sequenced {
    taken: 0,
    heads: 0,
    waiting: false,
};

/// Runs [`HORIZON`] on `client` and moves `horizon` on; then, if the log holds
/// anything, [`SEQUENCE`] up to the horizon, taking at most `limit` rows, unless the
/// horizon has not moved since a run that left nothing up to it, less than `again` ago.
pub(crate) async fn sequence(
    client: &impl GenericClient,
    horizon: &mut Horizon,
    limit: i64,
    again: Duration,
) -> Result<Sequenced> {
    let row = client.query_typed_one(HORIZON, &[]).await?;
    let Some(seen) = row.try_get::<_, Option<i64>>("seen")? else {
        // An empty log: nothing to take, and nothing learnt about the pairs (the
        // holders were not read); they are checked when the log next holds something.
        return Ok(IDLE);
    };
    let xid: i64 = row.try_get("xid")?;
    let holders: Vec<i64> = row.try_get("holders")?;
    horizon.advance(&holders, Some((seen, xid)));
    if horizon.settled(again) {
        return Ok(Sequenced {
            taken: 0,
            heads: 0,
            waiting: true,
        });
    }
    let upto = horizon.upto();
    let started = Instant::now();
    let row = client
        .query_typed_one(SEQUENCE, &[(&upto, Type::INT8), (&limit, Type::INT8)])
        .await?;
    let behind: bool = row.try_get("behind")?;
    horizon.sequenced = (!behind).then_some((upto, started));
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
/// final yet (a producer that drew a number before the last pair is still committing)
/// or are locked by another dispatcher's sequencer: looked at again at once (the usual
/// case: a producer's commit was all that the last pair waited for), then less and less
/// often, up to [`MAX_RECHECK`] (a run costs a round trip, an xid and a read of the lock
/// table; [`SEQUENCE`] runs only once the horizon has moved). A failure backs off like
/// the claim loop's.
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
/// The longest wait while rows wait in the log: what the last producers still
/// committing add at most to an ordered event's latency once they have ended. (Under
/// the first horizon, which waited for every writing transaction, it was 50 ms.)
const MAX_RECHECK: Duration = Duration::from_millis(10);
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
    /// by `stop` is cancelled in the server ([`SEQUENCE`] is one statement: all or
    /// nothing; [`HORIZON`] writes nothing), and anything it left is taken by the next
    /// run of any dispatcher.
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

    /// One run ([`sequence`]: a run that finds the log empty ends after [`HORIZON`]),
    /// after a [`PEEK`] if `peek` (a run that finds nothing to do then says so without
    /// running [`HORIZON`]); `None` once `stop` has ended it.
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
                return Ok(IDLE);
            }
            sequence(&*client, horizon, self.limit, self.poll_interval).await
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
    fn a_pair_counts_once_no_holder_of_the_logs_lock_is_older_than_its_run() {
        let mut h = Horizon::default();
        // Nobody holds the lock: the run's own pair is final at once.
        h.advance(&[], Some((7, 105)));
        assert_eq!((h.upto(), h.pairs.len()), (7, 0));
        // A producer with xid 104 holds it (it may have drawn 8 or 9): not yet.
        h.advance(&[104], Some((9, 110)));
        assert_eq!((h.upto(), h.pairs.clone()), (7, vec![(9, 110)]));
        // Holders younger than the pair (they drew after it) do not hold it back.
        h.advance(&[111, 112], Some((12, 113)));
        assert_eq!((h.upto(), h.pairs.clone()), (9, vec![(12, 113)]));
        // A holder older than a later pair holds that one and every one after it.
        h.advance(&[112], Some((15, 120)));
        assert_eq!((h.upto(), h.pairs.clone()), (9, vec![(12, 113), (15, 120)]));
        h.advance(&[], None);
        assert_eq!((h.upto(), h.pairs.len()), (15, 0));
    }

    #[test]
    fn sequence_runs_again_only_once_the_floor_rises_or_after_a_while() {
        let mut h = Horizon::default();
        h.advance(&[], Some((7, 105)));
        assert!(!h.settled(Duration::from_secs(60)), "never sequenced");
        h.sequenced = Some((7, Instant::now()));
        assert!(h.settled(Duration::from_secs(60)));
        assert!(!h.settled(Duration::ZERO), "a while later: again");
        h.advance(&[], Some((9, 110)));
        assert!(!h.settled(Duration::from_secs(60)), "the floor rose");
    }

    #[test]
    fn xids_compare_as_postgresql_compares_them_across_the_32_bit_wrap() {
        // pg_locks shows 32-bit xids; the pairs' are 64-bit (epoch above).
        let epoch = 3_i64 << 32;
        assert!(precedes(100, epoch + 200));
        assert!(!precedes(300, epoch + 200));
        assert!(!precedes(200, epoch + 200));
        // Just before the wrap, against a pair just after it.
        assert!(precedes(i64::from(u32::MAX) - 5, (4_i64 << 32) + 3));
        assert!(!precedes(3, (4_i64 << 32) - 5));
    }

    #[test]
    fn a_long_holder_keeps_the_oldest_pairs_and_the_newest() {
        let mut h = Horizon::default();
        h.advance(&[], Some((1, 11)));
        for i in 0..100 {
            // A producer with xid 12 drew a number and never ends.
            h.advance(&[12], Some((100 + i, 20 + i)));
        }
        assert_eq!(h.upto(), 1);
        assert_eq!(h.pairs.len(), MAX_PAIRS);
        assert_eq!(h.pairs.first(), Some(&(100, 20)));
        assert_eq!(h.pairs.last(), Some(&(199, 119)));
        // Once it ends, the newest pair's number is final.
        h.advance(&[], None);
        assert_eq!((h.upto(), h.pairs.len()), (199, 0));
    }

    #[test]
    fn runs_faster_than_commits_still_move_the_floor() {
        // Four producers, each always in a transaction lasting 100 xids (its xid the
        // oldest of them while it commits); a run every xid. Keeping the newest pairs
        // left only pairs younger than some producer still committing.
        let mut h = Horizon::default();
        let mut seen = 0;
        for xid in 1_000..3_000_i64 {
            seen += 1;
            let holders: Vec<i64> = (0..4).map(|p| xid - (xid + p * 25) % 100).collect();
            h.advance(&holders, Some((seen, xid)));
        }
        assert!(h.upto() > 1_800, "the floor stalled at {}", h.upto());
    }

    #[test]
    fn a_run_that_sees_nothing_new_adds_no_pair() {
        let mut h = Horizon::default();
        h.advance(&[100], Some((5, 110)));
        h.advance(&[100], Some((5, 120)));
        assert_eq!(h.pairs, vec![(5, 110)]);
        h.advance(&[], Some((5, 130)));
        assert_eq!((h.upto(), h.pairs.len()), (5, 0));
        h.advance(&[], Some((5, 140)));
        assert_eq!((h.upto(), h.pairs.len()), (5, 0));
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
        assert_eq!(seen, [0, 1, 2, 4, 8, 10, 10, 10, 10, 10]);
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
