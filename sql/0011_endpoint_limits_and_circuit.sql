-- Per-endpoint limits and a circuit breaker: one bad endpoint never holds up the others.
--
-- `max_in_flight`: most concurrent requests to the endpoint across all dispatchers.
-- NULL (the default) leaves each dispatcher to its own per-endpoint cap,
-- WEBHOOK_ENDPOINT_MAX_IN_FLIGHT: a slow endpoint can never take all of a dispatcher's
-- send slots either way, and the common case pays for no coordination.
--
-- `rate_limit`: most requests per second across all dispatchers (NULL: none), kept as a
-- token bucket (`rate_tokens` as of `rate_refilled_at`, at most a second's worth) that
-- claims spend under the endpoint's advisory lock (webhook_endpoint_grant below).
--
-- The circuit: consecutive failures of the kinds that signal an unhealthy consumer
-- (timeouts, connection errors, 5xx) are counted by each dispatcher; when a run reaches
-- the threshold the circuit opens (`circuit_failures` keeps the run that opened it):
-- `circuit_open_until` is set, claims take nothing for the endpoint and spend none of
-- its deliveries' attempts until then. Once
-- it has passed the circuit is half-open: a single probe goes out (`circuit_probe_until`
-- is the probe's lease), a success closes the circuit (both NULL again) and a failure
-- opens it for longer (`circuit_opens` consecutive openings double the interval, up to
-- a cap). A Retry-After on 429/503 opens it for the time asked. Auto-disable (sql/0006)
-- stays as the last resort above it.
--
-- Every column is nullable or has a constant default: adding them rewrites nothing, and
-- dispatchers of the previous version, which do not read them, keep running.
ALTER TABLE webhook_endpoints
    ADD COLUMN IF NOT EXISTS max_in_flight integer CHECK (max_in_flight BETWEEN 1 AND 10000),
    ADD COLUMN IF NOT EXISTS rate_limit integer CHECK (rate_limit BETWEEN 1 AND 100000),
    ADD COLUMN IF NOT EXISTS rate_tokens double precision,
    ADD COLUMN IF NOT EXISTS rate_refilled_at timestamptz,
    ADD COLUMN IF NOT EXISTS circuit_failures integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS circuit_opens integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS circuit_open_until timestamptz,
    ADD COLUMN IF NOT EXISTS circuit_probe_until timestamptz;

-- How many requests an endpoint has in flight, for `max_in_flight`: its leased rows.
-- Partial on the lease, so it holds only deliveries being sent right now (settling
-- clears `locked_by`), however large the backlog or the history. `state = 'pending'`
-- is in the predicate so that the settle (whose rows it finds by `locked_by = $1` and
-- the primary key, with no condition on the state) can never use it: believed small on
-- stale statistics, it would lead the settle to read every leased row per outcome.
CREATE INDEX IF NOT EXISTS webhook_deliveries_leased_idx
    ON webhook_deliveries (endpoint_id)
    WHERE state = 'pending' AND locked_by IS NOT NULL;

-- What the claim (src/claim.rs) decides for an endpoint outside the common case: one
-- with `max_in_flight`, `rate_limit` or a circuit that is not closed, or one that has
-- more work than this dispatcher's cap leaves room for. `allowed`: how many of `want`
-- requests may start now, NULL when another claim is deciding for the endpoint right
-- now (this claim then takes none of its deliveries and leaves them due). `resume_at`:
-- where the deliveries held back start, one per `step_ms` after it.
-- (A DO block: CREATE TYPE has no IF NOT EXISTS, and the file must apply twice.)
DO $migrate$
BEGIN
    CREATE TYPE webhook_grant AS (allowed integer, resume_at timestamptz);
EXCEPTION WHEN duplicate_object THEN
    NULL;
END
$migrate$;

-- `held_until`: the end of the line of deliveries held back for the endpoint. Each
-- claim that holds some back puts them at its end and moves it, so that a backlog is
-- spread over the time the endpoint needs for it, each delivery moved once, instead of
-- every claim moving the same deliveries a little further.
ALTER TABLE webhook_endpoints ADD COLUMN IF NOT EXISTS held_until timestamptz;

-- The decision is exact across dispatchers because it is serialized and reads fresh
-- data: the per-endpoint advisory lock is held until the claim commits, and each
-- statement of a VOLATILE function takes its own snapshot, taken after the lock, so it
-- sees every lease a previous holder granted. `try`, never wait: a claim never queues
-- behind another, and two claims taking several endpoints' locks cannot deadlock.
--
-- * Open circuit (open_until ahead): none, resuming when it ends. Half-open
--   (open_until passed): one probe, unless one is already out (`circuit_probe_until`,
--   the probe's lease); the others wait at least a second for its answer.
-- * `in_flight_here` against `max_in_flight` or, without one, `local_cap`.
-- * `max_in_flight`: also what its leased rows, across dispatchers, leave free.
-- * `rate_limit`: a token bucket holding at most a tenth of a second's worth, so that
--   the rate holds over short windows too; refilled by the time since the last grant.
CREATE OR REPLACE FUNCTION webhook_endpoint_grant(
    endpoint bigint, want integer, in_flight_here integer, local_cap integer,
    lease_ms bigint, step_ms double precision
) RETURNS webhook_grant
LANGUAGE plpgsql
VOLATILE
AS $grant$
DECLARE
    ep record;
    at timestamptz := clock_timestamp();
    granted integer;
    leased integer;
    capacity double precision;
    tokens double precision;
    resume timestamptz;
BEGIN
    -- 0x6f62 ("ob"): the class of outboxd's per-endpoint locks.
    IF NOT pg_try_advisory_xact_lock(28514, hashint8(endpoint)) THEN
        RETURN ROW(NULL, NULL)::webhook_grant;
    END IF;
    SELECT max_in_flight, rate_limit, rate_tokens, rate_refilled_at,
           circuit_open_until, circuit_probe_until, held_until
    INTO ep
    FROM webhook_endpoints
    WHERE id = endpoint;
    IF NOT FOUND THEN
        RETURN ROW(want, at)::webhook_grant;
    END IF;
    IF ep.circuit_open_until > at THEN
        RETURN ROW(0, ep.circuit_open_until)::webhook_grant;
    END IF;
    granted := greatest(0, least(want, coalesce(ep.max_in_flight, local_cap) - in_flight_here));
    IF ep.circuit_open_until IS NOT NULL THEN
        granted := CASE WHEN ep.circuit_probe_until > at THEN 0 ELSE least(granted, 1) END;
    END IF;
    IF ep.max_in_flight IS NOT NULL AND granted > 0 THEN
        SELECT count(*) INTO leased
        FROM webhook_deliveries
        WHERE endpoint_id = endpoint AND state = 'pending' AND locked_by IS NOT NULL
          AND locked_until > at;
        granted := least(granted, greatest(0, ep.max_in_flight - leased));
    END IF;
    IF ep.rate_limit IS NOT NULL AND granted > 0 THEN
        capacity := greatest(1.0, ep.rate_limit / 10.0);
        tokens := least(capacity,
                        coalesce(ep.rate_tokens, capacity)
                        + greatest(0.0, extract(epoch FROM at - coalesce(ep.rate_refilled_at, at)))
                          * ep.rate_limit);
        granted := least(granted, floor(tokens)::integer);
        UPDATE webhook_endpoints
        SET rate_tokens = tokens - granted, rate_refilled_at = at
        WHERE id = endpoint;
    END IF;
    IF ep.circuit_open_until IS NOT NULL AND granted > 0 THEN
        UPDATE webhook_endpoints
        SET circuit_probe_until = at + lease_ms * interval '1 millisecond'
        WHERE id = endpoint;
    END IF;
    IF granted >= want THEN
        RETURN ROW(granted, at)::webhook_grant;
    END IF;
    resume := greatest(CASE WHEN ep.circuit_open_until IS NOT NULL
                            THEN at + interval '1 second' ELSE at END,
                       coalesce(ep.held_until, at));
    UPDATE webhook_endpoints
    SET held_until = resume + (want - granted) * step_ms * interval '1 millisecond'
    WHERE id = endpoint;
    RETURN ROW(granted, resume)::webhook_grant;
END
$grant$;

-- The settle this version's dispatchers call: the settle of 0006 (called as it is, for
-- the deliveries and the failure clock, and kept for dispatchers of the previous
-- version during a rolling upgrade), then the circuit, in the same transaction. A new
-- name rather than an overload: `GRANT EXECUTE ON FUNCTION webhook_settle` and other
-- statements that name the function without its arguments stay unambiguous. Its
-- caller needs EXECUTE on both (PUBLIC has it unless revoked).
--
-- * $28, the endpoints that answered in the batch (a 2xx, or a 3xx/4xx that refuses
--   the event: the consumer works), a superset of $19 (the deliveries that succeeded,
--   which reset the failure clock): a half-open circuit closes, and what was held back
--   for it is due at once. An open one stays open until its time (a success of a request sent before it opened
--   does not cut a pause short).
-- * $21/$22, the endpoints with unhealthy failures in the batch (and no success in it),
--   each with its run of consecutive unhealthy failures as this dispatcher counts it
--   (the run is counted in the dispatcher, not in the row: a write per failure would
--   make dispatchers settling for one failing endpoint queue on its row). A run
--   reaching $25 opens a closed circuit for $26 ms; a failure while half-open (the
--   probe's) re-opens it, the interval doubling with each consecutive opening up to
--   $27 ms.
-- * $23/$24, endpoints that answered 429 or 503 with a Retry-After, and the longest
--   wait each asked for: the circuit is open at least that long (capped at $27).
--
-- The endpoint row is written only on those transitions (and when a Retry-After moves
-- an opening later by more than a second). Only endpoints to be written are locked, in
-- id order, so settles of dispatchers sharing endpoints cannot deadlock, and the usual
-- success on a closed circuit locks and writes nothing. Returns the endpoints whose
-- circuit this settle opened (from closed) and closed, for the dispatcher to log once
-- and count; the operational events come from the triggers below.
CREATE OR REPLACE FUNCTION webhook_settle_outcomes(
    text,
    bigint[], bigint[], int[], text[], bigint[], int[], int[], text[],
    bigint[], bigint[], int[], timestamptz[], int[], int[], text[], text[], text[],
    bigint[], bigint[],
    bigint[], int[], bigint[], bigint[], int, bigint, bigint, bigint[]
) RETURNS TABLE (settled bigint, opened bigint[], closed bigint[])
LANGUAGE plpgsql
AS $settle$
DECLARE
    n bigint;
    opening bigint[];
    closing bigint[];
BEGIN
    n := webhook_settle($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
                        $11, $12, $13, $14, $15, $16, $17, $18, $19, $20);

    -- The rows to write, locked in id order; nothing else is touched.
    PERFORM 1
    FROM webhook_endpoints e
    LEFT JOIN unnest($21, $22) AS t(id, failures) ON t.id = e.id
    LEFT JOIN (SELECT id, max(wait_ms) AS wait_ms
               FROM unnest($23, $24) AS p(id, wait_ms) GROUP BY id) p ON p.id = e.id
    WHERE e.id = ANY ($28 || $21 || $23)
      AND ((e.id = ANY ($28) AND e.circuit_open_until <= now())
           OR (t.id IS NOT NULL AND ((e.circuit_open_until IS NULL AND t.failures >= $25)
                                     OR e.circuit_open_until <= now()))
           OR (p.id IS NOT NULL
               AND coalesce(e.circuit_open_until, now()) + interval '1 second'
                   < now() + least(p.wait_ms, $27) * interval '1 millisecond'))
    ORDER BY e.id
    FOR NO KEY UPDATE OF e;
    IF NOT FOUND THEN
        RETURN QUERY SELECT n, '{}'::bigint[], '{}'::bigint[];
        RETURN;
    END IF;

    -- Each statement below reads the rows as locked above.
    -- A closing circuit also releases what the claims held back for the endpoint while
    -- it failed (placed up to the end of the opening or of its line, at the pace its
    -- timeouts set): due now, to go at the pace the endpoint answers at again. Found
    -- through the due index; a close is rare.
    WITH was AS (
        SELECT id, greatest(circuit_open_until, held_until) AS held
        FROM webhook_endpoints
        WHERE id = ANY ($28) AND circuit_open_until <= now()
    ), closed AS (
        UPDATE webhook_endpoints e
        SET circuit_failures = 0, circuit_opens = 0,
            circuit_open_until = NULL, circuit_probe_until = NULL, held_until = NULL
        FROM was
        WHERE e.id = was.id
        RETURNING e.id, was.held
    ), released AS (
        UPDATE webhook_deliveries d
        SET next_attempt_at = now(), updated_at = now()
        FROM closed c
        WHERE d.endpoint_id = c.id AND d.state = 'pending'
          AND d.next_attempt_at > now() AND d.next_attempt_at <= c.held
          AND NOT (d.locked_by IS NOT NULL AND d.locked_until > now())
    )
    SELECT coalesce(array_agg(id ORDER BY id), '{}') INTO closing FROM closed;

    SELECT coalesce(array_agg(e.id ORDER BY e.id), '{}') INTO opening
    FROM webhook_endpoints e
    JOIN unnest($21, $22) AS t(id, failures) ON t.id = e.id
    WHERE e.circuit_open_until IS NULL AND t.failures >= $25
      AND e.active AND e.deleted_at IS NULL;
    UPDATE webhook_endpoints e
    SET circuit_failures = CASE WHEN e.circuit_open_until IS NULL THEN t.failures
                                ELSE e.circuit_failures + t.failures END,
        circuit_open_until = now() + least($27, $26 * power(2, least(e.circuit_opens, 30)))
                                     * interval '1 millisecond',
        circuit_opens = e.circuit_opens + 1,
        circuit_probe_until = NULL
    FROM unnest($21, $22) AS t(id, failures)
    WHERE e.id = t.id AND e.active AND e.deleted_at IS NULL
      AND ((e.circuit_open_until IS NULL AND t.failures >= $25)
           OR e.circuit_open_until <= now());

    SELECT opening || coalesce(array_agg(e.id ORDER BY e.id), '{}') INTO opening
    FROM webhook_endpoints e
    WHERE e.id = ANY ($23) AND e.circuit_open_until IS NULL AND NOT e.id = ANY (opening)
      AND e.active AND e.deleted_at IS NULL;
    UPDATE webhook_endpoints e
    SET circuit_open_until = now() + least(p.wait_ms, $27) * interval '1 millisecond',
        circuit_probe_until = NULL
    FROM (SELECT id, max(wait_ms) AS wait_ms FROM unnest($23, $24) AS p(id, wait_ms) GROUP BY id) p
    WHERE e.id = p.id AND e.active AND e.deleted_at IS NULL
      AND coalesce(e.circuit_open_until, now()) + interval '1 second'
          < now() + least(p.wait_ms, $27) * interval '1 millisecond';

    RETURN QUERY SELECT n, opening, closing;
END
$settle$;

-- The circuit's operational events (see sql/0010), in the transaction that opens or
-- closes it: a settle, or an operator closing it by hand. Never sent to the endpoint
-- they are about.
DO $migrate$
BEGIN
    EXECUTE format($function$
        CREATE OR REPLACE FUNCTION %1$I.webhook_announce_circuit() RETURNS trigger
        LANGUAGE plpgsql
        SECURITY DEFINER
        SET search_path = pg_catalog, %1$I, pg_temp
        AS $body$
        BEGIN
            IF NEW.circuit_open_until IS NOT NULL THEN
                INSERT INTO %1$I.webhook_outbox (event_type, payload, about_endpoint_id)
                VALUES ('outboxd.endpoint.circuit_opened',
                        pg_catalog.jsonb_build_object(
                            'endpoint_id', NEW.id,
                            'open_until', NEW.circuit_open_until,
                            'consecutive_failures', NEW.circuit_failures,
                            'description', NEW.description),
                        NEW.id);
            ELSE
                INSERT INTO %1$I.webhook_outbox (event_type, payload, about_endpoint_id)
                VALUES ('outboxd.endpoint.circuit_closed',
                        pg_catalog.jsonb_build_object(
                            'endpoint_id', NEW.id,
                            'description', NEW.description),
                        NEW.id);
            END IF;
            RETURN NULL;
        END
        $body$
    $function$, current_schema());
END
$migrate$;

DROP TRIGGER IF EXISTS webhook_endpoints_announce_circuit ON webhook_endpoints;
CREATE TRIGGER webhook_endpoints_announce_circuit
    AFTER UPDATE OF circuit_open_until ON webhook_endpoints
    FOR EACH ROW
    WHEN ((OLD.circuit_open_until IS NULL) <> (NEW.circuit_open_until IS NULL)
          AND NEW.deleted_at IS NULL)
    EXECUTE FUNCTION webhook_announce_circuit();
