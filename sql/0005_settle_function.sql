-- Settling outcomes through a function, so that a session plans the statement once.
--
-- A dispatcher writes its outcomes in batches (settle::flush): one statement updates
-- the deliveries, records the attempts and moves the endpoints' failure clocks. Sent as
-- text, it was planned on every flush: 0.3-0.6 ms of PostgreSQL time each
-- (pg_stat_statements with track_planning), a fixed cost per flush on top of its rows.
-- PL/pgSQL keeps each statement's plan for the rest of the session, and with
-- plan_cache_mode = force_generic_plan it plans once instead of planning the first five
-- calls for their own arguments. The statement itself is the one settle.rs sent.
--
-- The other settings hold the planner to primary-key probes. The deliveries to settle
-- are a few hundred rows of a table that may have grown by tens of thousands since its
-- last ANALYZE (a burst on a young table); on such stale statistics PostgreSQL
-- hash-joined the outcomes against a sequential scan of the whole table (10-15 ms
-- instead of ~3 ms for 300 rows of 60,000). A probe per outcome is right at any size.
-- A function's SET clauses last for the call, so they apply when its statement is
-- planned, and end with it.
--
-- Arguments, one element per outcome for $2-$9 and per attempt made for $10-$18:
--   $1  the worker id; only deliveries it still holds at the claimed attempt change.
--   $2-$9   event_id, endpoint_id, attempt, state, delay_ms, uncount, last_status,
--           last_error of each outcome;
--   $10-$18 event_id, endpoint_id, attempt, started_at, duration_ms, status_code,
--           error_kind, error, response_excerpt of each attempt;
--   $19 endpoints that answered with a success, $20 endpoints that failed.
-- Returns how many deliveries were settled.
--
-- The UPDATE only matches rows this worker still holds at the attempt it claimed
-- (locked_by = $1 AND attempts = o.attempt): if the lease ran out and another worker
-- reclaimed the row (bumping attempts), the stale outcome changes nothing. Attempts are
-- recorded either way, since the request really happened; ON CONFLICT DO NOTHING makes a
-- flush retried after an ambiguous connection error harmless.
CREATE OR REPLACE FUNCTION webhook_settle(
    text,
    bigint[], bigint[], int[], text[], bigint[], int[], int[], text[],
    bigint[], bigint[], int[], timestamptz[], int[], int[], text[], text[], text[],
    bigint[], bigint[]
) RETURNS bigint
LANGUAGE plpgsql
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
SET plan_cache_mode = force_generic_plan
AS $settle$
DECLARE
    n bigint;
BEGIN
    WITH outcome AS (
        SELECT *
        FROM unnest($2::bigint[], $3::bigint[], $4::int[], $5::text[], $6::bigint[],
                    $7::int[], $8::int[], $9::text[])
          AS o(event_id, endpoint_id, attempt, state, delay_ms, uncount, last_status, last_error)
    ), settled AS (
        UPDATE webhook_deliveries d
        -- A park is written only if the endpoint is still closed: an enable that
        -- committed since the claim saw it closed must not strand the delivery.
        SET state = CASE WHEN o.state = 'parked' AND o.uncount = 1 AND EXISTS (
                             SELECT 1 FROM webhook_endpoints e
                             WHERE e.id = d.endpoint_id AND e.active AND e.deleted_at IS NULL)
                         THEN 'pending' ELSE o.state END,
            attempts = d.attempts - o.uncount,
            next_attempt_at = CASE WHEN o.state IN ('pending', 'parked')
                                   THEN now() + o.delay_ms * interval '1 millisecond'
                                   ELSE d.next_attempt_at END,
            locked_by = NULL,
            locked_until = NULL,
            last_status = CASE WHEN o.uncount = 1 THEN d.last_status ELSE o.last_status END,
            last_error = CASE WHEN o.uncount = 1 THEN d.last_error ELSE o.last_error END,
            delivered_at = CASE WHEN o.state = 'delivered' THEN now() END,
            updated_at = now()
        FROM outcome o
        WHERE d.event_id = o.event_id AND d.endpoint_id = o.endpoint_id
          AND d.locked_by = $1 AND d.attempts = o.attempt
        RETURNING 1
    ), recorded AS (
        INSERT INTO webhook_attempts
            (event_id, endpoint_id, attempt, started_at, duration_ms, status_code,
             error_kind, error, response_excerpt, worker_id)
        SELECT a.*, $1
        FROM unnest($10::bigint[], $11::bigint[], $12::int[], $13::timestamptz[], $14::int[],
                    $15::int[], $16::text[], $17::text[], $18::text[]) AS a
        ON CONFLICT DO NOTHING
        RETURNING 1
    ), healthy AS (
        -- Any success resets the endpoint's failure clock. Only transitions write, so
        -- dispatchers settling for one endpoint do not queue on its row.
        UPDATE webhook_endpoints SET failing_since = NULL
        WHERE id = ANY ($19::bigint[]) AND failing_since IS NOT NULL
    ), failing AS (
        UPDATE webhook_endpoints SET failing_since = now()
        WHERE id = ANY ($20::bigint[]) AND failing_since IS NULL
    )
    SELECT count(*) INTO n FROM settled;
    RETURN n;
END
$settle$;
