//! Claiming work: fan new events out to their endpoints and lease due deliveries, in
//! one statement and one round trip, bounded by rows and by payload bytes.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::TryStreamExt;
use tokio::sync::Notify;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, GenericClient, Row, RowStream, Statement};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::deliver::{self, Delivery, StaticHeaders, Unbuildable};
use crate::error::{Error, Result};
use crate::time_format::PgTimestamp;

/// `due` of [`CLAIM`] and [`CLAIM_FAST`].
macro_rules! claim_due {
    () => {
        "
WITH due AS (
    SELECT event_id, endpoint_id, next_attempt_at
    FROM webhook_deliveries
    WHERE state = 'pending' AND next_attempt_at <= now()
    ORDER BY next_attempt_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
"
    };
}

/// `candidates` of [`CLAIM`] and [`CLAIM_FAST`] (sized by their own `cap`).
macro_rules! claim_candidates {
    () => {
        "), candidates AS (
    SELECT id, event_type, deliver_after, pg_column_size(payload) AS stored,
           pg_column_compression(payload) IS NOT NULL AS compressed
    FROM webhook_outbox
    -- Unordered events only (the partial index of sql/0013): ordered ones are fanned
    -- out by the sequencer (ordering::SEQUENCE), in their commit order.
    WHERE processed_at IS NULL AND ordering_key IS NULL AND deliver_after <= now()
    ORDER BY deliver_after, id
    LIMIT (SELECT events_limit FROM cap)
    FOR UPDATE SKIP LOCKED
"
    };
}

macro_rules! claim_lease {
    () => {
        "), reclaimed AS (
    UPDATE webhook_deliveries d
    SET attempts = d.attempts + 1,
        locked_by = $1,
        locked_until = now() + $2 * interval '1 millisecond',
        next_attempt_at = now() + $2 * interval '1 millisecond',
        updated_at = now()"
    };
}

/// `processed` of [`CLAIM`] and [`CLAIM_FAST`]: the fresh events taken (`events`).
macro_rules! claim_processed {
    () => {
        "), processed AS (
    UPDATE webhook_outbox o
    SET processed_at = now()
    WHERE o.id = ANY (ARRAY(SELECT id FROM events))
"
    };
}

/// `fanout` of [`CLAIM_FAST`], and of [`CLAIM`] while it joins (up to 16 endpoints):
/// each fresh event's endpoints, its filters tested in place.
macro_rules! claim_fanout_joined {
    () => {
        "), fanout AS (
    -- Every endpoint not removed: a disabled one gets its deliveries parked, and its
    -- enable resumes them.
    SELECT e.id AS event_id, ep.id AS endpoint_id, ep.active AS open
    FROM events e
    JOIN webhook_endpoints ep
      ON ep.deleted_at IS NULL
     AND CASE WHEN starts_with(e.event_type, 'outboxd.')
         -- outboxd's own events (sql/0010): only to endpoints whose filters name them,
         -- never `*` or none, and never to the endpoint they are about. CASE keeps the
         -- lookup of the latter off every other event's path.
         THEN EXISTS (SELECT 1 FROM unnest(ep.event_types) AS f
                      WHERE f = e.event_type
                         OR (right(f, 2) = '.*' AND starts_with(e.event_type, left(f, -1))))
              -- A scalar sub-select, read by primary key: as `NOT EXISTS` it could
              -- be planned as a hash of the whole outbox.
              AND ep.id IS DISTINCT FROM (SELECT x.about_endpoint_id FROM webhook_outbox x
                                          WHERE x.id = e.id)
         ELSE cardinality(ep.event_types) = 0
              OR e.event_type = ANY (ep.event_types)
              OR EXISTS (SELECT 1 FROM unnest(ep.event_types) AS f
                         WHERE f = '*'
                            OR (right(f, 2) = '.*' AND starts_with(e.event_type, left(f, -1))))
         END
"
    };
}

// The sequencer fans ordered events out with the same filters.
pub(crate) use claim_fanout_joined;

/// `inserted` of [`CLAIM`] and [`CLAIM_FAST`]: the fresh deliveries (`placed`).
macro_rules! claim_inserted {
    () => {
        "), inserted AS (
    INSERT INTO webhook_deliveries
        (event_id, endpoint_id, state, attempts, next_attempt_at, locked_by, locked_until)
    SELECT event_id,
           endpoint_id,
           CASE WHEN open THEN 'pending' ELSE 'parked' END,
           CASE WHEN claim_now THEN 1 ELSE 0 END,
           CASE WHEN claim_now THEN now() + $2 * interval '1 millisecond' ELSE due_at END,
           CASE WHEN claim_now THEN $1 END,
           CASE WHEN claim_now THEN now() + $2 * interval '1 millisecond' END
    FROM placed
    ON CONFLICT (event_id, endpoint_id) DO NOTHING
    RETURNING event_id, endpoint_id, attempts, attempt_base
"
    };
}

/// The columns [`CLAIM`] and [`CLAIM_FAST`] return ([`CLAIM_COLUMNS`]), from `claimed`,
/// `more` and `verdict`, before the endpoint (`ep`) is joined.
macro_rules! claim_result {
    () => {
        "
SELECT c.event_id, c.endpoint_id, c.attempts AS attempt,
       c.attempts - c.attempt_base AS tries,
       ep.url, ep.secret, ep.active AND ep.deleted_at IS NULL AS open,
       CASE WHEN ep.previous_secret_expires_at > now() THEN ep.previous_secret END
           AS previous_secret,
       ep.id IS NOT NULL AS endpoint_present, c.nth = 1 AS carries_event,
       e.event_type, e.created_at,
       CASE WHEN octet_length(e.text) <= $5 THEN e.text END AS payload,
       octet_length(e.text)::int8 AS payload_bytes,
       (SELECT more FROM more) AS more,
       -- Most endpoints have none: NULL then, nothing to decode.
       CASE WHEN ep.headers <> '[]'::jsonb THEN ep.headers END AS headers,
       ep.timeout_ms,
       (SELECT fast_ok FROM verdict) AS fast_ok,
       -- A key's head (sql/0013): its outcome moves its line on.
       c.ordered
FROM (SELECT claimed.*, row_number() OVER (PARTITION BY event_id) AS nth FROM claimed) c
"
    };
}

/// The event (`e`) of the first row of each claimed event, with its payload's text.
macro_rules! claim_result_event {
    () => {
        "LEFT JOIN LATERAL (
    SELECT o.event_type, o.created_at, o.payload::text AS text
    FROM webhook_outbox o
    WHERE o.id = c.event_id AND c.nth = 1
    OFFSET 0
) e ON true"
    };
}

/// Fans out and claims, under a lease, in one statement. Parameters: `$1` worker id,
/// `$2` lease in milliseconds, `$3` most deliveries to claim, `$4` budget of payload
/// bytes, `$5` largest payload sent (`WEBHOOK_MAX_PAYLOAD_BYTES`), `$6` to `$9` what
/// this dispatcher has in flight per endpoint ([`Loads`]).
///
/// * `due` takes retries, resumed deliveries and expired leases first, oldest due first,
///   so fresh traffic can never starve them. `FOR UPDATE SKIP LOCKED` lets any number
///   of dispatchers claim side by side: rows another claim has locked are skipped, not
///   waited for. The CTE form matters: PostgreSQL never inlines a CTE that locks rows,
///   so the LIMIT bounds what is locked (the `WHERE id IN (SELECT … LIMIT n FOR UPDATE)`
///   form can lock and update more than n rows, PostgreSQL bug #15715).
/// * `mode` chooses how events find their endpoints: joined with each endpoint, the
///   filters tested in place, while there are at most 16 endpoints (not removed);
///   routed by index past that (sql/0012), so that a delivery's cost does not grow with
///   the endpoints that do not receive it. The choice reads at most 17 rows, and every
///   part of the other way sits under a one-time filter on it, so it never runs (an
///   `EXPLAIN ANALYZE` shows it "never executed"): a few endpoints pay for the routing
///   only the plan's size, and many pay nothing per endpoint left out.
/// * `candidates` takes unprocessed, due outbox rows (`SKIP LOCKED` again, so each event
///   is fanned out by exactly one dispatcher), as many as fill the remaining capacity
///   when each goes to every endpoint that takes every event (`cap`: joined, every
///   active endpoint that can be sent something now, as if none had filters; routed,
///   those with no filter or `*`), and no more than about a batch of rows in all when
///   disabled endpoints add parked ones (and another for held endpoints' lines):
///   fanning out more would insert deliveries only to claim them with a second write
///   later. Joined, an endpoint whose circuit is open, whose half-open probe is out, or
///   to which this dispatcher has its cap of requests in progress (`$6`, `$7` against
///   `$9` or its `max_in_flight`) is left out of that count, and so are its due
///   deliveries: its fresh rows are only inserted and its due ones moved along its
///   line, so a healthy endpoint beside a timing-out one keeps whole claims (routed,
///   it still counts). Routed, `routes` then looks up each distinct event type's
///   endpoints (two index lookups per type, however many endpoints there are), and
///   `reach` keeps the candidates, in order, while the deliveries they make fit in the
///   remaining capacity (the first always goes, whatever its fan-out); the others stay
///   unprocessed for the next claim. So a claim over a thousand endpoints filtered to one customer each
///   fans out a batch of events, not one.
/// * `offered` to `admitted` bound the claim by payload bytes as well as rows: each
///   event counts once, however many of its deliveries come along, the due deliveries'
///   events first (in the order of their first due delivery), then the fresh ones; an
///   event is taken while the bytes before it are under `$4`, and the first of each kind
///   always is, so a payload larger than the budget still goes, and neither kind can
///   starve the other. The size is the payload's `jsonb` size before compression (close
///   to its JSON text): the stored size when PostgreSQL did not compress it, which costs
///   nothing to read; a compressed payload is decompressed to measure it, and only when
///   the stored sizes before it (a lower bound) leave it a chance. When everything
///   offered fits (no payload compressed, the stored sizes under the budget: every
///   claim of small events), `fits` takes it all without sorting it. Due deliveries of
///   an event not taken stay pending for the next claim (their locks go at commit), and
///   so do fresh events not taken.
/// * `allowance` decides, per endpoint the claim would send to, how many requests it
///   may start now (sql/0011): none while its circuit is open; for an endpoint with no
///   limit of its own and a closed circuit (the common case, decided in place, no lock)
///   all it wants while this dispatcher has fewer requests in progress to it (`$7`)
///   than its cap (`$9`, `WEBHOOK_ENDPOINT_MAX_IN_FLIGHT`), none once it holds that
///   many; otherwise what `webhook_endpoint_grant` allows across all dispatchers
///   (`max_in_flight`, `rate_limit`, the half-open probe). Due
///   deliveries go first, oldest first, then fresh ones. What an endpoint cannot take
///   now is `deferred` (a due one) or inserted (a fresh one) due when its turn may
///   come: after the open circuit, or one place in line per `step_ms` (its requests'
///   recent time over its cap, `$8`, or a request's share of its rate), its attempts
///   untouched. So a slow, failing or limited endpoint's backlog leaves the head of the
///   due index instead of filling every claim, and other endpoints' work goes by it;
///   a claim never takes work it cannot send now.
/// * Claiming sets `next_attempt_at` to the lease end: if this worker dies, the row is
///   due again when the lease runs out and the same index finds it. `attempts` is bumped
///   at claim time, which makes it the lease token that settling checks.
/// * `events` (the fresh events taken) are marked processed and fanned out; the
///   deliveries `inserted` for active endpoints are claimed at once up to the remaining
///   capacity and each endpoint's allowance (`placed`); a rest over the capacity is
///   inserted due now for the next claim, one over an allowance due at its turn. A disabled (not removed) endpoint gets its
///   deliveries parked, so enabling it resumes what it missed; a park that races an
///   enable is resumed by the stranded-park sweep (`health::RESUME_STRANDED`).
///   `ON CONFLICT DO NOTHING` on the (event, endpoint) key makes fan-out idempotent.
///   Joined and routed, an event goes to the same endpoints: those with no filter, `*`,
///   its name or a `prefix.*` of it, and for outboxd's own events (`outboxd.`, sql/0010)
///   only those whose filters name them, never the endpoint they are about. The joined
///   filter match is written out here rather than in a SQL function: a function whose
///   body has a sub-select is never inlined, and calling it cost ~10 us per (event,
///   endpoint) pair; inline, the common cases (no filter, exact name) short-circuit
///   before the sub-select runs.
/// * The result has a row per claimed delivery, with its endpoint (the endpoint's
///   previous secret comes along while its rotation grace period lasts, and `attempts -
///   attempt_base` is the count the retry budget is judged by, as a re-drive resets it).
///   The first row of each event carries the event and its payload's text, read by
///   primary key and converted once (`OFFSET 0` keeps the sub-select from being
///   flattened): a payload crosses the wire once, however many endpoints it goes to.
///   Routed, endpoints are read by primary key, only those of the claim (here and in
///   `allowance`): a hash of the whole table would cost every endpoint each claim.
///   Joined, there are a few, and hashing them all costs less than looking each up.
///   Every claimed delivery comes back, even one whose event or endpoint row is gone
///   (outer joins: no event type, no endpoint id) or whose payload is over `$5` (no
///   text, only its size): those can never be sent, and the dispatcher records them
///   dead rather than leave them leased to come back every lease. An endpoint that was
///   disabled or removed after the delivery was made comes back with `open = false`,
///   and the dispatcher parks that delivery instead of sending it.
/// * Each row also carries `verdict`'s `fast_ok`: whether the next claim may be
///   [`CLAIM_FAST`], i.e. no endpoint needs `allowance`'s limits (`limits`, read
///   through the partial index of limited endpoints, sql/0012) and the fan-out joins
///   (`mode`).
pub const CLAIM: &str = concat!(
    claim_due!(),
    "), mode AS (
    -- Route by index past 16 endpoints (sql/0012); up to there the join below costs
    -- less. Reads at most 17 rows.
    SELECT count(*) > 16 AS routed
    FROM (SELECT FROM webhook_endpoints WHERE deleted_at IS NULL LIMIT 17) AS n
), cap AS (
    -- Sized as if each event went to every endpoint that takes every event: all of
    -- them when joined, those with no filter or `*` when routed (`reach` then stops at
    -- the real count). An endpoint that can be sent nothing now (`held`: its circuit
    -- open or its half-open probe out, or this dispatcher's requests in progress to it,
    -- `$6`/`$7`, at its cap) only gets rows inserted in its line, claimed by no one: it
    -- does not count against the claim's deliveries, and neither do its due ones, which
    -- the claim only moves along its line (`deferred`), so a healthy endpoint beside a
    -- timing-out one keeps whole claims. Disabled endpoints get parked rows too, so the
    -- rows written for the endpoints not held are held to about a batch as well, and
    -- those for the held ones to about another. Only one branch of `w` runs.
    SELECT greatest(1, least(($3 - n.due) / greatest(1, n.open),
                             $3 / greatest(1, n.kept - n.held),
                             $3 / greatest(1, n.held))) AS events_limit,
           greatest(1, $3 - n.due) AS rows_limit
    FROM (SELECT count(*) FILTER (WHERE w.active AND NOT w.held) AS open,
                 count(*) FILTER (WHERE w.active AND w.held) AS held, count(*) AS kept,
                 (SELECT count(*) FROM due
                  WHERE due.endpoint_id <> ALL (coalesce(array_agg(w.id) FILTER (WHERE w.held),
                                                         '{}'))) AS due
          FROM (SELECT ep.id, ep.active,
                       coalesce(ep.circuit_open_until > now(), false)
                       OR coalesce(ep.circuit_open_until <= now()
                                   AND ep.circuit_probe_until > now(), false)
                       OR coalesce((SELECT h.n FROM unnest($6::int8[], $7::int4[]) AS h(id, n)
                                    WHERE h.id = ep.id), 0)
                          >= coalesce(ep.max_in_flight, $9) AS held
                FROM webhook_endpoints ep
                WHERE ep.deleted_at IS NULL AND NOT (SELECT routed FROM mode)
                UNION ALL
                SELECT id, active, false FROM webhook_endpoints
                WHERE deleted_at IS NULL AND cardinality(event_types) = 0
                  AND (SELECT routed FROM mode)
                UNION ALL
                SELECT id, active, false FROM webhook_endpoints
                WHERE deleted_at IS NULL AND event_types @> '{*}'
                  AND (SELECT routed FROM mode)) AS w) AS n
), limits AS (
    -- Whether any endpoint needs the limits' part of this statement; the fast claim
    -- (CLAIM_FAST) decides alike only while none does. Read through the partial index
    -- of limited endpoints (sql/0012): nothing to read in the common case.
    SELECT EXISTS (SELECT 1 FROM webhook_endpoints
                   WHERE deleted_at IS NULL
                     AND (max_in_flight IS NOT NULL OR rate_limit IS NOT NULL
                          OR circuit_open_until IS NOT NULL)) AS limited
",
    claim_candidates!(),
    "), routes AS (
    -- Routed: each event type among the candidates, with the endpoints it goes to.
    -- `patterns` are the filters that match the type `a.b.c`: itself, `*` (but for
    -- outboxd's own events, see `fanout`), `a.*` and `a.b.*`; a filter `p.*` matches
    -- the types starting with `p.`, so there is one per dot. Two index lookups per
    -- type, however many endpoints there are.
    SELECT t.event_type, ep.id AS endpoint_id, ep.active AS open
    FROM (SELECT c.event_type,
                 ARRAY[c.event_type]
                 || CASE WHEN starts_with(c.event_type, 'outboxd.') THEN '{}' ELSE '{*}' END::text[]
                 || ARRAY(SELECT left(c.event_type, i) || '*'
                          FROM generate_series(1, length(c.event_type)) AS i
                          WHERE substr(c.event_type, i, 1) = '.') AS patterns
          FROM (SELECT DISTINCT event_type FROM candidates WHERE (SELECT routed FROM mode)) c
         ) AS t
    CROSS JOIN LATERAL (
        SELECT id, active FROM webhook_endpoints
        WHERE deleted_at IS NULL AND event_types && t.patterns
        UNION ALL
        SELECT id, active FROM webhook_endpoints
        WHERE deleted_at IS NULL AND cardinality(event_types) = 0
          AND NOT starts_with(t.event_type, 'outboxd.')
    ) AS ep
), reach AS (
    -- Routed: the candidates, in order, while their deliveries fit in the claim (the
    -- first always does, whatever its fan-out).
    SELECT c.id
    FROM (SELECT c.id, row_number() OVER w AS nth, sum(coalesce(r.n, 0)) OVER w AS rows
          FROM candidates c
          LEFT JOIN (SELECT event_type, count(*) AS n FROM routes GROUP BY event_type) r
            ON r.event_type = c.event_type
          WINDOW w AS (ORDER BY c.deliver_after, c.id)) c
    WHERE c.nth = 1 OR c.rows <= (SELECT rows_limit FROM cap)
), offered AS (
    SELECT false AS fresh, d.at, d.event_id AS id, NULL AS event_type,
           coalesce(pg_column_size(o.payload), 0) AS stored,
           pg_column_compression(o.payload) IS NOT NULL AS compressed
    FROM (SELECT event_id, min(next_attempt_at) AS at FROM due GROUP BY event_id) d
    LEFT JOIN webhook_outbox o ON o.id = d.event_id
    UNION ALL
    SELECT true, deliver_after, id, event_type, stored, compressed FROM candidates
    WHERE NOT (SELECT routed FROM mode) OR id IN (SELECT id FROM reach)
), fits AS (
    SELECT coalesce(sum(stored) < $4 AND NOT bool_or(compressed), true) AS fits FROM offered
), admitted AS (
    SELECT fresh, id, event_type FROM offered WHERE (SELECT fits FROM fits)
    UNION ALL
    SELECT fresh, id, event_type
    FROM (SELECT s.*, sum(s.bytes) OVER (ORDER BY s.fresh, s.at, s.id) - s.bytes AS before
          FROM (SELECT o.*,
                       CASE WHEN NOT o.compressed THEN o.stored
                            ELSE (SELECT pg_column_size(jsonb_path_query_first(p.payload, '$'))
                                  FROM webhook_outbox p WHERE p.id = o.id) END AS bytes
                FROM (SELECT o.*,
                             row_number() OVER (PARTITION BY o.fresh ORDER BY o.at, o.id) AS nth,
                             sum(o.stored) OVER (ORDER BY o.fresh, o.at, o.id) - o.stored
                                 AS stored_before
                      FROM offered o
                      WHERE NOT (SELECT fits FROM fits)) o
                WHERE o.stored_before < $4 OR o.nth = 1) s) s
    WHERE s.before < $4 OR s.nth = 1
), taken AS (
    -- The due deliveries whose events the payload bound admitted.
    SELECT due.event_id, due.endpoint_id, due.next_attempt_at
    FROM due
    WHERE (SELECT fits FROM fits) OR due.event_id IN (SELECT id FROM admitted WHERE NOT fresh)
), events AS (
    SELECT id, event_type FROM admitted WHERE fresh
",
    claim_processed!(),
    claim_fanout_joined!(),
    "    WHERE NOT (SELECT routed FROM mode)
    UNION ALL
    -- Routed: the same endpoints, found by `routes`.
    SELECT e.id, r.endpoint_id, r.open
    FROM events e
    JOIN routes r ON r.event_type = e.event_type
    WHERE (SELECT routed FROM mode)
      AND (NOT starts_with(e.event_type, 'outboxd.')
           OR r.endpoint_id IS DISTINCT FROM (SELECT x.about_endpoint_id FROM webhook_outbox x
                                              WHERE x.id = e.id))
), wants AS (
    SELECT endpoint_id, count(*)::int AS want
    FROM (SELECT endpoint_id FROM taken UNION ALL SELECT endpoint_id FROM fanout WHERE open) w
    GROUP BY endpoint_id
), allowance AS (
    -- How many requests each endpoint may be sent now, and where what is held back goes.
    SELECT x.endpoint_id, (x.g).allowed, (x.g).resume_at, x.step_ms
    FROM (SELECT w.endpoint_id, s.step_ms, CASE
              -- A closed or missing endpoint's deliveries are parked or end dead: no request.
              WHEN ep.id IS NULL OR NOT ep.active OR ep.deleted_at IS NOT NULL
                  THEN ROW(w.want, now())::webhook_grant
              -- The common case, decided in place: no limit of its own, a closed
              -- circuit, and fewer requests in progress here than this dispatcher's
              -- cap. It takes what it wants: a burst to one fast endpoint keeps whole
              -- claims, and an endpoint holds at most its cap plus one claim's share.
              WHEN ep.circuit_open_until IS NULL AND ep.max_in_flight IS NULL
                   AND ep.rate_limit IS NULL AND coalesce(h.in_flight, 0) < $9
                  THEN ROW(w.want, now())::webhook_grant
              ELSE webhook_endpoint_grant(ep.id, w.want, coalesce(h.in_flight, 0), $9, $2,
                                          s.step_ms)
              END AS g
          FROM wants w
          LEFT JOIN (SELECT * FROM webhook_endpoints WHERE NOT (SELECT routed FROM mode)
                     UNION ALL
                     SELECT * FROM webhook_endpoints
                     WHERE (SELECT routed FROM mode)
                       AND id = ANY (ARRAY(SELECT endpoint_id FROM wants))) ep
            ON ep.id = w.endpoint_id
          LEFT JOIN unnest($6::int8[], $7::int4[], $8::float8[])
                 AS h(endpoint_id, in_flight, request_ms)
            ON h.endpoint_id = w.endpoint_id
          -- One place in line: a request's time over the endpoint's cap, or its share
          -- of the endpoint's rate, whichever is longer. Behind an open circuit, none:
          -- all wait for its end, where the probe decides.
          CROSS JOIN LATERAL (
              SELECT CASE WHEN ep.circuit_open_until > now() THEN 0.0
                     ELSE greatest(coalesce(h.request_ms, 10.0) / coalesce(ep.max_in_flight, $9),
                                   coalesce(1000.0 / ep.rate_limit, 0.0)) END AS step_ms
          ) s
          -- Keeps the CASE from being copied into each use of its fields, which would
          -- call the function once per field.
          OFFSET 0) x
), ranked AS (
    SELECT taken.*,
           row_number() OVER (PARTITION BY taken.endpoint_id
                              ORDER BY taken.next_attempt_at, taken.event_id) AS nth
    FROM taken
",
    claim_lease!(),
    "
    FROM ranked r
    JOIN allowance a ON a.endpoint_id = r.endpoint_id
    WHERE d.event_id = r.event_id AND d.endpoint_id = r.endpoint_id AND r.nth <= a.allowed
    RETURNING d.event_id, d.endpoint_id, d.attempts, d.attempt_base,
              d.ordering_key IS NOT NULL AS ordered
), deferred AS (
    -- Held back by its endpoint (an open circuit, its in-flight cap, its rate): moved to
    -- when its turn may come, its attempts untouched, so that it leaves the head of the
    -- due index to other endpoints' work. A delivery whose endpoint another claim is
    -- deciding for (allowed NULL) is left as it is.
    UPDATE webhook_deliveries d
    SET next_attempt_at = a.resume_at
                          + (r.nth - a.allowed - 1) * a.step_ms * interval '1 millisecond',
        -- An expired lease moved here is no lease at all.
        locked_by = NULL,
        locked_until = NULL,
        updated_at = now()
    FROM ranked r
    JOIN allowance a ON a.endpoint_id = r.endpoint_id
    WHERE d.event_id = r.event_id AND d.endpoint_id = r.endpoint_id AND r.nth > a.allowed
    RETURNING 1
), placed AS (
    -- Each fresh delivery is claimed now if its endpoint has room left after its due
    -- deliveries, and the claim has capacity; one held back by its endpoint is inserted
    -- due when its turn may come, in line behind the due ones held back (`over` counts
    -- the places: its rank beyond the endpoint's allowance, after its due deliveries).
    -- The first event's deliveries are claimed even past the capacity (by its
    -- fan-out at most): one left over would be inserted due now, behind every older
    -- due delivery, and a backlog due for another endpoint would keep it waiting
    -- until every claim had walked past that backlog.
    SELECT p.event_id, p.endpoint_id, p.open,
           p.room AND (row_number() OVER (PARTITION BY p.room ORDER BY p.event_id, p.endpoint_id)
                           <= $3 - (SELECT count(*) FROM reclaimed)
                       OR p.event_id = (SELECT min(id) FROM events)) AS claim_now,
           CASE WHEN p.open AND p.over > 0
                THEN p.resume_at + (p.over - 1) * p.step_ms * interval '1 millisecond'
                ELSE now() END AS due_at
    FROM (SELECT f.event_id, f.endpoint_id, f.open, a.resume_at, a.step_ms,
                 f.nth - (a.allowed - coalesce(t.taken, 0)) AS over,
                 coalesce(f.open AND f.nth <= a.allowed - coalesce(t.taken, 0), false) AS room
          FROM (SELECT fanout.*,
                       row_number() OVER (PARTITION BY fanout.endpoint_id
                                          ORDER BY fanout.event_id) AS nth
                FROM fanout) f
          LEFT JOIN allowance a ON a.endpoint_id = f.endpoint_id
          LEFT JOIN (SELECT endpoint_id, count(*) AS taken FROM taken GROUP BY endpoint_id) t
            ON t.endpoint_id = f.endpoint_id) p
",
    claim_inserted!(),
    "), claimed AS (
    SELECT event_id, endpoint_id, attempts, attempt_base, ordered FROM reclaimed
    UNION ALL
    SELECT event_id, endpoint_id, attempts, attempt_base, false FROM inserted WHERE attempts > 0
), more AS (
    SELECT (SELECT count(*) FROM candidates) = (SELECT events_limit FROM cap)
        OR (SELECT count(*) FROM reclaimed) + (SELECT count(*) FROM deferred)
           < (SELECT count(*) FROM due)
        OR ((SELECT count(*) FROM due) = $3 AND EXISTS (SELECT 1 FROM deferred))
        OR (SELECT count(*) FROM events) < (SELECT count(*) FROM candidates) AS more
), verdict AS (
    -- Whether the next claim may be the fast one (CLAIM_FAST): no limited endpoint,
    -- and few enough endpoints to join with each event.
    SELECT NOT (SELECT limited FROM limits) AND NOT (SELECT routed FROM mode) AS fast_ok
)",
    claim_result!(),
    "-- Routed, only the claim's endpoints, by primary key: a hash of every endpoint would
-- cost what the endpoints that receive nothing number. Joined (a few), the hash is cheaper.
LEFT JOIN (SELECT * FROM webhook_endpoints WHERE NOT (SELECT routed FROM mode)
           UNION ALL
           SELECT * FROM webhook_endpoints
           WHERE (SELECT routed FROM mode)
             AND id = ANY (ARRAY(SELECT DISTINCT endpoint_id FROM claimed))) ep
  ON ep.id = c.endpoint_id
",
    claim_result_event!()
);

/// The claim when every endpoint it may send to would be decided in place by
/// [`CLAIM`]'s `allowance` (the wake-up path of a quiet dispatcher, and most bursts):
/// the same `due`, `candidates`, fan-out and rows, without the payload bound's ranking
/// or the per-endpoint limits, whose plan nodes cost an idle claim about a third of its
/// time. `guard` checks that the shortcut decides as [`CLAIM`] would: no endpoint has
/// a limit of its own or a circuit that is not closed, and there are no more than 16
/// (read in the scan `cap` makes anyway; past 16, [`CLAIM`] routes events by index
/// instead of joining them with every endpoint), and all the payloads offered fit in
/// `$4` uncompressed (`fits`). If not, it
/// takes and changes nothing (every write below is conditioned on it; the rows `due`
/// and `candidates` locked are released at commit) and returns a single row with no
/// delivery and `fast_ok` false: the dispatcher then runs [`CLAIM`] at once. The
/// dispatcher runs it only while it has fewer requests in progress to every endpoint
/// than `WEBHOOK_ENDPOINT_MAX_IN_FLIGHT` (the third condition of the in-place case),
/// and while the last full claim found no limited endpoint ([`Batch::fast_ok`]).
/// Parameters `$1` to `$5` as in [`CLAIM`].
pub const CLAIM_FAST: &str = concat!(
    claim_due!(),
    "), cap AS (
    -- Disabled endpoints get parked rows too, so the rows written in all are held to
    -- about a batch as well.
    SELECT greatest(1, least(($3 - (SELECT count(*) FROM due)) / greatest(1, n.open),
                             $3 / greatest(1, n.kept))) AS events_limit,
           -- What only the full claim decides: an endpoint with limits of its own or a
           -- circuit, or more endpoints than it joins with each event (it routes them).
           n.limited OR n.kept > 16 AS full_only
    FROM (SELECT count(*) FILTER (WHERE active) AS open, count(*) AS kept,
                 coalesce(bool_or(max_in_flight IS NOT NULL OR rate_limit IS NOT NULL
                                  OR circuit_open_until IS NOT NULL), false) AS limited
          FROM webhook_endpoints WHERE deleted_at IS NULL) AS n
",
    claim_candidates!(),
    "), guard AS (
    SELECT NOT (SELECT full_only FROM cap)
           AND coalesce((SELECT sum(x.stored) < $4 AND NOT bool_or(x.compressed)
                         FROM (SELECT coalesce(pg_column_size(o.payload), 0) AS stored,
                                      pg_column_compression(o.payload) IS NOT NULL AS compressed
                               FROM (SELECT DISTINCT event_id FROM due) d
                               LEFT JOIN webhook_outbox o ON o.id = d.event_id
                               UNION ALL
                               SELECT stored, compressed FROM candidates) x),
                        true) AS ok
",
    claim_lease!(),
    "
    FROM due
    WHERE d.event_id = due.event_id AND d.endpoint_id = due.endpoint_id
      AND (SELECT ok FROM guard)
    RETURNING d.event_id, d.endpoint_id, d.attempts, d.attempt_base,
              d.ordering_key IS NOT NULL AS ordered
), events AS (
    SELECT id, event_type FROM candidates WHERE (SELECT ok FROM guard)",
    claim_processed!(),
    claim_fanout_joined!(),
    "), placed AS (
    -- Each fresh delivery to an open endpoint is claimed now while the claim has
    -- capacity; the rest is inserted due now for the next claim.
    -- (The first event's are claimed even past the capacity, as in CLAIM's `placed`.)
    SELECT f.event_id, f.endpoint_id, f.open,
           f.open AND (row_number() OVER (PARTITION BY f.open ORDER BY f.event_id, f.endpoint_id)
                           <= $3 - (SELECT count(*) FROM reclaimed)
                       OR f.event_id = (SELECT min(id) FROM events)) AS claim_now,
           now() AS due_at
    FROM fanout f
",
    claim_inserted!(),
    "), claimed AS (
    SELECT event_id, endpoint_id, attempts, attempt_base, ordered FROM reclaimed
    UNION ALL
    SELECT event_id, endpoint_id, attempts, attempt_base, false FROM inserted WHERE attempts > 0
    UNION ALL
    -- Refused: a row with no delivery says so.
    SELECT NULL, NULL, NULL, NULL, NULL WHERE NOT (SELECT ok FROM guard)
), more AS (
    SELECT (SELECT count(*) FROM candidates) = (SELECT events_limit FROM cap) AS more
), verdict AS (
    SELECT ok AS fast_ok FROM guard
)",
    claim_result!(),
    "LEFT JOIN webhook_endpoints ep ON ep.id = c.endpoint_id
",
    claim_result_event!()
);

/// The parameter types of [`CLAIM_FAST`], for preparing it: the first five of
/// [`CLAIM_TYPES`].
pub const CLAIM_FAST_TYPES: &[Type] = &[Type::TEXT, Type::INT8, Type::INT8, Type::INT8, Type::INT8];

/// Arms the doorbell and opens its gate before sleeping (see `sql/0002_notify.sql`,
/// `sql/0004_doorbell_gate.sql` and `sql/0006_isolation_and_endpoint_health.sql`).
///
/// The bell row is updated, and so locked, before the gate is tested and opened: the
/// `FROM` sub-select must be computed before the `setval` in the target list, and the
/// volatile gate test cannot be hoisted above it. With the row lock that
/// [`CLOSE_DOORBELL_GATE`] takes, an arm that updates the row and a close exclude each
/// other: no close lands between this statement's opening of the gate and its commit,
/// and an arm that waited for a close reopens the gate it shut. An arm that updates
/// nothing found the bell armed with no ring numbered since (`rings_seen`): it still
/// is, and no close will shut the gate until a ring that wakes this dispatcher too; or
/// a READ COMMITTED ring has disarmed it since, and that ring's notification wakes this
/// dispatcher.
///
/// A ring at REPEATABLE READ or SERIALIZABLE leaves the bell armed and numbers itself
/// in `webhook_doorbell_rings`. An arm after such a ring records its number (a write, so
/// it locks the row): the close disarms an armed bell only for a ring numbered after
/// the latest arm, whose notification reaches every dispatcher that armed before it,
/// so it never shuts out this one. The condition is the close's own, so whenever a
/// close may disarm, an arm writes and waits for it. An arm that writes also stores the
/// number in the gate's `last_value`, where producers read how many rings have gone
/// unanswered. Otherwise `AND NOT armed`, the number comparison and the gate test make
/// re-arming an armed bell a read, not a write (each `setval` is a WAL record).
pub const ARM_DOORBELL: &str = "
WITH armed AS (
    UPDATE webhook_doorbell
    SET armed = true,
        rings_seen = coalesce(pg_sequence_last_value('webhook_doorbell_rings'), 1)
    WHERE id = 1
      AND (NOT armed
           OR rings_seen < coalesce(pg_sequence_last_value('webhook_doorbell_rings'), 1))
    RETURNING rings_seen
)
SELECT setval('webhook_doorbell_gate',
              coalesce(arming.seen,
                       coalesce(pg_sequence_last_value('webhook_doorbell_rings'), 1)),
              false)
FROM (SELECT max(rings_seen) AS seen FROM armed) AS arming
WHERE arming.seen IS NOT NULL
   OR pg_sequence_last_value('webhook_doorbell_gate') IS NOT NULL";

/// Closes the doorbell's gate: sent by a dispatcher woken by a notification, beside
/// its next claim. Once the bell has rung, an open gate would only make every insert
/// statement call the ring function for nothing until a dispatcher is about to sleep
/// again.
///
/// The gate closes only while nobody holds the bell's row and either the bell is
/// disarmed (a READ COMMITTED ring disarmed it, and its notification woke every
/// dispatcher asleep on it) or it is armed and a REPEATABLE READ or SERIALIZABLE ring
/// has been numbered in `webhook_doorbell_rings` since the latest arm or close
/// (`rings_seen`). In the second case the close also disarms the bell, records the
/// ring number as seen, and notifies in its own transaction: the ring's own
/// notification reaches every dispatcher that armed before it, but that ring may have
/// rolled back or left the notifying to another producer, and a dispatcher of the
/// previous version arms without recording the number; the close's notification wakes
/// every dispatcher asleep at its commit, and each arms again (reopening the gate)
/// before it sleeps. Recording the number means those re-arms are not closed again:
/// each ring causes at most one such close, and closes never wake each other in a
/// loop. The gate's `last_value` gets the number too: the rings up to it are answered.
///
/// An armed bell with no ring numbered since its arm means a dispatcher is asleep
/// waiting for a ring (or a READ COMMITTED producer is ringing it right now); a locked
/// row may be a dispatcher arming it. In each case the gate stays open (a ring in
/// flight wakes every dispatcher at its commit, and their next claims close the gate):
/// `SKIP LOCKED`, so a close never waits for another session, and leaves the gate open
/// rather than wait to find out. The `setval` is projected from the locked row, so it
/// runs only after the lock is held. The gate test sits in the scan's filter, below
/// the lock: closing an already closed gate is a read.
pub const CLOSE_DOORBELL_GATE: &str = "
WITH bell AS (
    SELECT armed FROM webhook_doorbell
    WHERE id = 1
      AND pg_sequence_last_value('webhook_doorbell_gate') IS NULL
      AND (NOT armed
           OR rings_seen < coalesce(pg_sequence_last_value('webhook_doorbell_rings'), 1))
    FOR UPDATE SKIP LOCKED
), disarmed AS (
    UPDATE webhook_doorbell
    SET armed = false,
        rings_seen = coalesce(pg_sequence_last_value('webhook_doorbell_rings'), 1)
    WHERE id = 1 AND (SELECT armed FROM bell)
    RETURNING pg_notify('outboxd_wakeup', '')
)
SELECT setval('webhook_doorbell_gate',
              coalesce(pg_sequence_last_value('webhook_doorbell_rings'), 1), true),
       (SELECT count(*) FROM disarmed)
FROM bell";

/// When the next piece of work becomes due: the earliest pending delivery (a retry or
/// a lease end) or delayed unordered event. Each side reads the first entry of its
/// partial index. (A delayed ordered event is the sequencer's to wait for.)
pub const NEXT_DUE: &str = "
SELECT extract(epoch FROM least(
    (SELECT next_attempt_at FROM webhook_deliveries
      WHERE state = 'pending' ORDER BY next_attempt_at LIMIT 1),
    (SELECT deliver_after FROM webhook_outbox
      WHERE processed_at IS NULL AND ordering_key IS NULL ORDER BY deliver_after, id LIMIT 1)
) - now())::float8";

/// A claimed delivery, or one whose endpoint closed after it was made.
///
/// A delivery that can never be sent (its event's or endpoint's row is gone, or its
/// payload is over the limit) comes as [`Claimed::Send`] with its body
/// `Err(`[`Unbuildable`]`)`: the sender makes no request and it ends dead, with the
/// reason recorded as an attempt (`error_kind` `unbuildable`).
#[derive(Debug)]
pub enum Claimed {
    /// Send it.
    Send(Delivery),
    /// Its endpoint is disabled or removed: park it without sending.
    Park {
        /// The event.
        event_id: i64,
        /// The closed endpoint.
        endpoint_id: i64,
        /// The attempt number the claim took (the lease token).
        attempt: i32,
    },
}

/// The result columns of [`CLAIM`], in order. Its rows are read by position (the
/// claim is the hot path: a name lookup per column per row costs more than the read),
/// so the columns are checked against this list once per claim ([`check_columns`]),
/// and `make test` checks the prepared statement's (`src/sql_check.rs`).
pub(crate) const CLAIM_COLUMNS: [(&str, Type); 19] = [
    ("event_id", Type::INT8),
    ("endpoint_id", Type::INT8),
    ("attempt", Type::INT4),
    ("tries", Type::INT4),
    ("url", Type::TEXT),
    ("secret", Type::TEXT),
    ("open", Type::BOOL),
    ("previous_secret", Type::TEXT),
    ("endpoint_present", Type::BOOL),
    ("carries_event", Type::BOOL),
    ("event_type", Type::TEXT),
    ("created_at", Type::TIMESTAMPTZ),
    ("payload", Type::TEXT),
    ("payload_bytes", Type::INT8),
    ("more", Type::BOOL),
    ("headers", Type::JSONB),
    ("timeout_ms", Type::INT4),
    ("fast_ok", Type::BOOL),
    ("ordered", Type::BOOL),
];

/// Fails unless `columns` are [`CLAIM_COLUMNS`], names and types, in order.
pub(crate) fn check_columns(columns: &[tokio_postgres::Column]) -> Result<()> {
    let same = columns.len() == CLAIM_COLUMNS.len()
        && columns
            .iter()
            .zip(&CLAIM_COLUMNS)
            .all(|(c, (name, ty))| c.name() == *name && c.type_() == ty);
    if same {
        return Ok(());
    }
    let list = |cols: &mut dyn Iterator<Item = (&str, &Type)>| {
        cols.map(|(n, t)| format!("{n} {t}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(Error::RowShape {
        statement: "claim",
        expected: list(&mut CLAIM_COLUMNS.iter().map(|(n, t)| (*n, t))),
        found: list(&mut columns.iter().map(|c| (c.name(), c.type_()))),
    })
}

/// The parameter types of [`CLAIM`], for preparing it.
pub const CLAIM_TYPES: &[Type] = &[
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8_ARRAY,
    Type::INT4_ARRAY,
    Type::FLOAT8_ARRAY,
    Type::INT4,
];

/// What a dispatcher is sending to each endpoint right now, for a claim to take no more
/// than each endpoint may be sent ([`CLAIM`]'s `$6` to `$9`).
#[derive(Debug, Clone, Default)]
pub struct Loads {
    /// Endpoints this dispatcher has sent to lately.
    pub endpoints: Vec<i64>,
    /// Requests in progress to each (holding a send slot).
    pub in_flight: Vec<i32>,
    /// How long a request to each takes, in milliseconds: its answers' recent average
    /// (a guess of 10 ms before the first).
    pub request_ms: Vec<f64>,
    /// The most requests in flight to one endpoint without a `max_in_flight` of its own
    /// (`WEBHOOK_ENDPOINT_MAX_IN_FLIGHT`).
    pub cap: i32,
}

impl Loads {
    /// Nothing in flight, under `cap`.
    pub fn idle(cap: u32) -> Self {
        Self {
            cap: i32::try_from(cap).unwrap_or(i32::MAX),
            ..Self::default()
        }
    }
}

/// Payload bytes held by a dispatcher's claimed, unsent deliveries, against a limit.
///
/// Each claimed event's request body is built once and shared by its deliveries; it
/// counts here, at its length, from its claim until the last of its deliveries is done
/// with it. A claim asks for no more than what is [`available`](Self::available) (it
/// always takes at least one event, so one larger than the whole budget still goes), and
/// a claim loop waits for room before claiming: what a dispatcher holds stays under the
/// limit plus an event or two.
#[derive(Debug)]
pub struct PayloadBudget {
    limit: u64,
    max_payload: u64,
    held: AtomicU64,
    released: Notify,
}

impl PayloadBudget {
    /// A budget of `limit` bytes, for claims that send payloads up to `max_payload`
    /// bytes (`WEBHOOK_PAYLOAD_BUDGET_BYTES`, `WEBHOOK_MAX_PAYLOAD_BYTES`).
    pub fn new(limit: u64, max_payload: u64) -> Arc<Self> {
        Arc::new(Self {
            limit,
            max_payload,
            held: AtomicU64::new(0),
            released: Notify::new(),
        })
    }

    /// The budget `config` sets.
    pub fn from_config(config: &Config) -> Arc<Self> {
        Self::new(config.payload_budget_bytes, config.max_payload_bytes)
    }

    /// Bytes of request bodies held now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Acquire)
    }

    /// What the next claim may bring.
    pub fn available(&self) -> u64 {
        self.limit.saturating_sub(self.held())
    }

    /// Waits until some of the budget is free; `false` if `shutdown` came first.
    pub async fn wait_for_room(&self, shutdown: &CancellationToken) -> bool {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if self.available() > 0 {
                return true;
            }
            tokio::select! {
                _ = &mut released => {}
                _ = shutdown.cancelled() => return false,
            }
        }
    }

    /// `body` as shared bytes that count against this budget until the last clone is
    /// dropped.
    fn hold(self: &Arc<Self>, body: Vec<u8>) -> Bytes {
        self.held.fetch_add(body.len() as u64, Ordering::AcqRel);
        Bytes::from_owner(HeldBody {
            body,
            budget: Arc::clone(self),
        })
    }
}

/// A request body counted against a [`PayloadBudget`].
struct HeldBody {
    body: Vec<u8>,
    budget: Arc<PayloadBudget>,
}

impl AsRef<[u8]> for HeldBody {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}

impl Drop for HeldBody {
    fn drop(&mut self) {
        self.budget
            .held
            .fetch_sub(self.body.len() as u64, Ordering::AcqRel);
        self.budget.released.notify_waiters();
    }
}

/// Runs [`CLAIM`] once: at most `limit` deliveries, leased to `worker_id` for `lease`,
/// with the default payload limits. Parses and plans the statement on every call; a
/// claim loop should prepare it once per connection and use [`claim_prepared`].
#[cfg_attr(
    not(feature = "internals"),
    allow(dead_code, reason = "tests and tools that claim by hand")
)]
pub async fn claim(
    client: &impl GenericClient,
    worker_id: &str,
    lease: Duration,
    limit: u32,
) -> Result<Vec<Claimed>> {
    let config = Config::default();
    let budget = PayloadBudget::from_config(&config);
    let loads = Loads::idle(config.endpoint_max_in_flight);
    Ok(
        claim_unnamed(client, worker_id, lease, limit, (&budget, &loads), Form::Full)
            .await?
            .claimed,
    )
}

/// Runs [`CLAIM`] (or [`CLAIM_FAST`], as `form` says) as an unnamed statement, parsed
/// and planned on every call, within `budget`: payloads come to no more than what it has available (but at least one
/// event), and count against it while they are held. This is the form that works
/// through a transaction-mode pooler, which keeps no prepared statement from one
/// transaction to the next. It costs a parse and a plan per call more than
/// [`claim_prepared`]: what that means for latency and throughput is measured by the
/// `statements` bench scenario (docs/operations.md, "Behind pgbouncer").
pub async fn claim_unnamed(
    client: &impl GenericClient,
    worker_id: &str,
    lease: Duration,
    limit: u32,
    (budget, loads): (&Arc<PayloadBudget>, &Loads),
    form: Form,
) -> Result<Batch> {
    let (lease_ms, limit) = (lease.as_millis() as i64, i64::from(limit));
    let (bytes, max_payload) = payload_limits(budget);
    let params: [(&(dyn ToSql + Sync), Type); 9] = [
        (&worker_id, Type::TEXT),
        (&lease_ms, Type::INT8),
        (&limit, Type::INT8),
        (&bytes, Type::INT8),
        (&max_payload, Type::INT8),
        (&loads.endpoints, Type::INT8_ARRAY),
        (&loads.in_flight, Type::INT4_ARRAY),
        (&loads.request_ms, Type::FLOAT8_ARRAY),
        (&loads.cap, Type::INT4),
    ];
    let params = params.into_iter().take(form.types().len());
    let rows = client.query_typed_raw(form.sql(), params).await?;
    parse(rows, budget).await
}

/// Runs `statement`, [`CLAIM`] or [`CLAIM_FAST`] (as `form` says) prepared with its
/// types ([`Form::types`]), on `client`, within `budget` (see [`claim_unnamed`]). Parsing and planning this statement costs more than running it
/// on an idle queue (~0.6 ms against ~0.3 ms), so the prepared form is what keeps the
/// wake-up path short. Its cached generic plan has the same shape as the custom one
/// (partial-index scans, primary-key lookups).
#[allow(
    clippy::disallowed_methods,
    reason = "runs the statement prepared on purpose (WEBHOOK_PREPARED_STATEMENTS)"
)]
pub async fn claim_prepared(
    client: &Client,
    statement: &Statement,
    worker_id: &str,
    lease: Duration,
    limit: u32,
    (budget, loads): (&Arc<PayloadBudget>, &Loads),
    form: Form,
) -> Result<Batch> {
    let (lease_ms, limit) = (lease.as_millis() as i64, i64::from(limit));
    let (bytes, max_payload) = payload_limits(budget);
    let params: [&(dyn ToSql + Sync); 9] = [
        &worker_id,
        &lease_ms,
        &limit,
        &bytes,
        &max_payload,
        &loads.endpoints,
        &loads.in_flight,
        &loads.request_ms,
        &loads.cap,
    ];
    let rows = client
        .query_raw(statement, params[..form.types().len()].iter().copied())
        .await?;
    parse(rows, budget).await
}

/// `$4` and `$5` of [`CLAIM`]; at least one byte, so a claim always takes an event.
fn payload_limits(budget: &PayloadBudget) -> (i64, i64) {
    let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    (clamp(budget.available().max(1)), clamp(budget.max_payload))
}

/// What one claim took.
#[derive(Debug)]
pub struct Batch {
    /// The deliveries claimed.
    pub claimed: Vec<Claimed>,
    /// The claim fanned out as many events as it could take, or left some for want of
    /// payload budget: more are probably waiting even if fewer deliveries than asked
    /// came back (narrow filters).
    pub more: bool,
    /// What the claim found for the next one: `Some(true)` while no endpoint needs the
    /// limits' part of [`CLAIM`], so that [`CLAIM_FAST`] decides as it would; `None`
    /// when no row came back.
    pub fast_ok: Option<bool>,
    /// [`CLAIM_FAST`] refused (see there): it claimed and changed nothing, and
    /// [`CLAIM`] is to be run instead.
    pub refused: bool,
}

/// Which of the two claim statements to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// [`CLAIM`].
    Full,
    /// [`CLAIM_FAST`].
    Fast,
}

impl Form {
    /// [`Form::Fast`] when the last claim found no endpoint that needs the limits'
    /// part of [`CLAIM`] (`fast_ok`) and this dispatcher has fewer requests in progress
    /// to every endpoint than its cap (`loads`): then both statements decide alike.
    pub fn choose(fast_ok: bool, loads: &Loads) -> Self {
        if fast_ok && loads.in_flight.iter().all(|&n| n < loads.cap) {
            Self::Fast
        } else {
            Self::Full
        }
    }

    /// The statement's text.
    pub fn sql(self) -> &'static str {
        match self {
            Self::Full => CLAIM,
            Self::Fast => CLAIM_FAST,
        }
    }

    /// The statement's parameter types.
    pub fn types(self) -> &'static [Type] {
        match self {
            Self::Full => CLAIM_TYPES,
            Self::Fast => CLAIM_FAST_TYPES,
        }
    }
}

/// A claimed event as its deliveries need it.
struct ClaimedEvent {
    created_at: SystemTime,
    body: std::result::Result<Bytes, Unbuildable>,
}

/// A claimed delivery's row, without its event.
struct DeliveryRow {
    event_id: i64,
    endpoint_id: i64,
    attempt: i32,
    tries: i32,
    url: Option<String>,
    secret: Option<String>,
    open: Option<bool>,
    previous_secret: Option<String>,
    endpoint_present: bool,
    timeout_ms: Option<i32>,
    ordered: bool,
}

/// The claim's rows, as they arrive. The first row of each event carries its payload:
/// the body is built from it once, into `budget`, and the row (the payload's text)
/// dropped at once. The deliveries, which share the bodies, are made at the end.
async fn parse(rows: RowStream, budget: &Arc<PayloadBudget>) -> Result<Batch> {
    futures_util::pin_mut!(rows);
    let (mut more, mut fast_ok, mut refused) = (false, None, false);
    let mut events = HashMap::new();
    // Each endpoint's static headers, decoded once per claim.
    let mut headers: HashMap<i64, std::result::Result<StaticHeaders, Unbuildable>> =
        HashMap::new();
    let mut deliveries = Vec::new();
    while let Some(row) = rows.try_next().await? {
        if deliveries.is_empty() {
            check_columns(row.columns())?;
        }
        // By position, in the order of CLAIM_COLUMNS (checked above).
        more |= row.try_get::<_, Option<bool>>(14)? == Some(true);
        fast_ok = row.try_get::<_, Option<bool>>(17)?;
        if row.try_get::<_, Option<i64>>(0)?.is_none() {
            // CLAIM_FAST's refusal: no delivery on this row.
            refused = true;
            continue;
        }
        let delivery = DeliveryRow {
            event_id: row.try_get(0)?,
            endpoint_id: row.try_get(1)?,
            attempt: row.try_get(2)?,
            tries: row.try_get(3)?,
            url: row.try_get(4)?,
            secret: row.try_get(5)?,
            open: row.try_get(6)?,
            previous_secret: row.try_get(7)?,
            endpoint_present: row.try_get(8)?,
            timeout_ms: row.try_get(16)?,
            ordered: row.try_get(18)?,
        };
        if let std::collections::hash_map::Entry::Vacant(entry) =
            headers.entry(delivery.endpoint_id)
        {
            entry.insert(match row.try_get::<_, Option<serde_json::Value>>(15)? {
                Some(stored) => deliver::static_headers(&stored).map_err(unbuildable),
                None => Ok(Arc::from([])),
            });
        }
        if row.try_get::<_, bool>(9)? {
            events.insert(delivery.event_id, event(&row, delivery.event_id, budget)?);
        }
        deliveries.push(delivery);
    }
    let claimed = deliveries
        .into_iter()
        .map(|row| delivery(row, &events, &headers))
        .collect();
    Ok(Batch {
        claimed,
        more,
        fast_ok,
        refused,
    })
}

/// The event carried by `row`, the first claimed delivery of event `id`.
fn event(row: &Row, id: i64, budget: &Arc<PayloadBudget>) -> Result<ClaimedEvent> {
    let Some(event_type) = row.try_get::<_, Option<String>>(10)? else {
        return Ok(ClaimedEvent {
            created_at: UNIX_EPOCH,
            body: Err(unbuildable(format!(
                "its event {id} no longer exists in webhook_outbox"
            ))),
        });
    };
    let created_at: PgTimestamp = row.try_get(11)?;
    let body = match row.try_get::<_, Option<&str>>(12)? {
        Some(payload) => Ok(budget.hold(deliver::body(id, &event_type, created_at, payload))),
        None => Err(unbuildable(format!(
            "its payload is {} bytes, more than WEBHOOK_MAX_PAYLOAD_BYTES ({})",
            row.try_get::<_, Option<i64>>(13)?.unwrap_or_default(),
            budget.max_payload
        ))),
    };
    Ok(ClaimedEvent {
        created_at: created_at.to_system_time(),
        body,
    })
}

fn delivery(
    row: DeliveryRow,
    events: &HashMap<i64, ClaimedEvent>,
    headers: &HashMap<i64, std::result::Result<StaticHeaders, Unbuildable>>,
) -> Claimed {
    let DeliveryRow {
        event_id,
        endpoint_id,
        attempt,
        ..
    } = row;
    let (created_at, body) = match events.get(&event_id) {
        Some(event) => (event.created_at, event.body.clone()),
        // The statement marks one row of each claimed event; this is only a guard.
        None => (
            UNIX_EPOCH,
            Err(unbuildable(format!("its event {event_id} was not read"))),
        ),
    };
    let (body, headers) = match headers.get(&endpoint_id) {
        _ if !row.endpoint_present => (
            Err(unbuildable(format!(
                "its endpoint {endpoint_id} no longer exists in webhook_endpoints"
            ))),
            Arc::from([]),
        ),
        Some(Ok(headers)) => (body, Arc::clone(headers)),
        Some(Err(why)) => (Err(why.clone()), Arc::from([])),
        // Decoded for every endpoint of the claim above; this is only a guard.
        None => (body, Arc::from([])),
    };
    // One that can never be sent ends dead now, even under a closed endpoint: parked,
    // it would only come back unbuildable when the endpoint opens.
    if body.is_ok() && row.open != Some(true) {
        return Claimed::Park {
            event_id,
            endpoint_id,
            attempt,
        };
    }
    Claimed::Send(Delivery {
        event_id,
        endpoint_id,
        attempt,
        created_at,
        body,
        url: row.url.unwrap_or_default(),
        secret: row.secret.unwrap_or_default(),
        previous_secret: row.previous_secret,
        tries: row.tries,
        ordered: row.ordered,
        headers,
        timeout: row
            .timeout_ms
            .map(|ms| Duration::from_millis(u64::from(ms.unsigned_abs()))),
    })
}

fn unbuildable(reason: String) -> Unbuildable {
    Unbuildable(reason.into())
}

/// Arms the doorbell so the next insert notifies.
pub async fn arm_doorbell(client: &impl GenericClient) -> Result<()> {
    client.query_typed(ARM_DOORBELL, &[]).await?;
    Ok(())
}

/// Closes the doorbell's gate while this dispatcher is awake (see
/// [`CLOSE_DOORBELL_GATE`]). Harmless at any time: the next arm opens it again.
pub async fn close_doorbell_gate(client: &impl GenericClient) -> Result<()> {
    client.query_typed(CLOSE_DOORBELL_GATE, &[]).await?;
    Ok(())
}

/// How long until the next known work is due: `None` when nothing is waiting,
/// `Some(ZERO)` when something is due already.
pub async fn next_due(client: &impl GenericClient) -> Result<Option<Duration>> {
    let row = client.query_typed_one(NEXT_DUE, &[]).await?;
    let seconds: Option<f64> = row.get(0);
    Ok(seconds.map(|s| Duration::from_secs_f64(s.max(0.0))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loads(in_flight: &[i32]) -> Loads {
        Loads {
            endpoints: (1..).take(in_flight.len()).collect(),
            in_flight: in_flight.to_vec(),
            request_ms: vec![10.0; in_flight.len()],
            cap: 4,
        }
    }

    #[test]
    fn the_fast_claim_runs_only_where_the_full_one_would_decide_in_place() {
        assert_eq!(Form::choose(true, &loads(&[])), Form::Fast);
        assert_eq!(Form::choose(true, &loads(&[0, 3])), Form::Fast);
        // One endpoint at this dispatcher's cap: the full claim holds it back.
        assert_eq!(Form::choose(true, &loads(&[0, 4])), Form::Full);
        // The last claim found an endpoint with limits or a circuit.
        assert_eq!(Form::choose(false, &loads(&[])), Form::Full);
    }
}
