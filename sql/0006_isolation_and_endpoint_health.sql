-- The doorbell rung at every isolation level, and endpoint health that drops nothing.
--
-- Safe to apply while dispatchers of the previous version run (see "Upgrading" in
-- docs/operations.md): it adds a sequence, two defaulted or nullable columns, widens a
-- CHECK constraint without scanning the table, and replaces two functions' bodies
-- under their old signatures. The brief locks it takes: ACCESS EXCLUSIVE on the one-row
-- webhook_doorbell and on webhook_endpoints (ADD COLUMN, catalog only) and on
-- webhook_deliveries (the CHECK constraint, NOT VALID so no scan).

-- ---------------------------------------------------------------------------------------
-- 1. The ring at REPEATABLE READ and SERIALIZABLE
-- ---------------------------------------------------------------------------------------
--
-- The ring of 0002/0004 locks the bell's row (FOR UPDATE SKIP LOCKED) and disarms it.
-- A producer at REPEATABLE READ or SERIALIZABLE reads the row as of its snapshot, and
-- a row lock on a row that changed after that snapshot (a ring, an arm) is refused with
-- 40001: the producer's business transaction was rolled back. Reading the row without
-- a lock is no better: a snapshot older than the dispatcher's arm sees the bell
-- disarmed, and the ring is skipped while the dispatcher sleeps. At SERIALIZABLE even a
-- plain read would give SSI a rw-edge towards any serializable writer of the row.
--
-- So at those levels the ring reads, locks and writes no table row. It numbers itself
-- in a sequence (webhook_doorbell_rings) and notifies: sequences are neither versioned
-- by snapshots nor watched by SSI, and advisory locks are not either, so nothing it
-- does can fail its transaction. READ COMMITTED producers (and READ UNCOMMITTED, which
-- PostgreSQL runs as READ COMMITTED) keep the ring of 0004 unchanged: the first one
-- disarms, the others skip.
--
-- Such a ring cannot disarm the bell, so every insert statement that finds the gate
-- open rings, until a woken dispatcher closes the gate (below): that is the only way
-- not to make one producer rely on another's commit, whose notification may come long
-- before its own. But while no dispatcher answers (none runs, or all died asleep, the
-- gate open), that would make every such commit notify, and notifying commits are
-- serialized (PreCommit_Notify): 16 REPEATABLE READ producers (pgbench, durable
-- commits) ran at ~450-520 commits/s against ~1,900-2,300 when only the first one
-- notified. So once 1,000 rings have gone unanswered since a dispatcher last armed or
-- closed (the gate's last_value, see below), only one such producer at a time
-- notifies, the one holding a transaction-level advisory lock; the others rely on its
-- commit, as concurrent READ COMMITTED producers rely on the one holding the bell's row
-- lock. A dispatcher that answers within a thousand rings never sees that mode.
--
-- The bell stays armed after such a ring, so the close of 0004 ("close only a disarmed
-- bell") would leave the gate open and every later insert statement would ring. A
-- woken dispatcher may disarm it only if that cannot shut out a dispatcher asleep on
-- it. The bell's row records, at each arm, the number of the latest such ring
-- (rings_seen). The close (claim::CLOSE_DOORBELL_GATE) disarms an armed bell only when a
-- ring numbered higher was made, i.e. after the latest arm: that ring's notification,
-- sent at its commit, reaches every dispatcher that armed before it. A ring that rolled
-- back was numbered but never notified, a ring may have left the notifying to another,
-- and a dispatcher of the previous version arms without recording rings_seen; so the
-- close that disarms an armed bell also notifies, in its own transaction: every
-- dispatcher asleep at its commit wakes and arms again before it sleeps, which opens
-- the gate again. The close records the ring number as seen, so a re-arm by a woken
-- dispatcher is never closed again for the same rings: each ring causes at most one
-- such close, and closes cannot wake each other in a loop. The arm and the close still
-- exclude each other through the row lock (see 0004): an arm that must record a ring
-- updates the row, as a close does.
--
-- The gate's last_value (unused by 0004, whose arm and close set it to 1; the trigger's
-- WHEN condition reads only whether it is called) carries the number of the latest
-- ring a dispatcher had seen when it last armed or closed, for producers to read: it is
-- not transactional either. Only how eagerly producers notify depends on it, never
-- whether the gate closes. A dispatcher of the previous version resets it to 1, which
-- makes rings look unanswered: producers then notify one at a time, as above.

-- Ring numbers start at 2: 1, the gate's initial last_value and rings_seen's default,
-- stands for "no ring yet".
CREATE SEQUENCE IF NOT EXISTS webhook_doorbell_rings START WITH 2;
-- Dispatchers compare it with the bell (pg_sequence_last_value needs SELECT); the
-- count reveals nothing.
GRANT SELECT ON SEQUENCE webhook_doorbell_rings TO PUBLIC;

-- The number of the latest ring when the bell was last armed or closed.
ALTER TABLE webhook_doorbell ADD COLUMN IF NOT EXISTS rings_seen bigint NOT NULL DEFAULT 1;

-- The function of 0004 with the branch above first. It stays SECURITY DEFINER with the
-- owner's schema pinned (see 0004): producers need no privilege on the sequences.
-- 8026380636457233767 is "obxdring" in ASCII: advisory locks are per database, and the
-- channel is shared by every outboxd schema of a database anyway.
DO $migrate$
BEGIN
    EXECUTE format($function$
        CREATE OR REPLACE FUNCTION %1$I.webhook_outbox_ring_doorbell() RETURNS trigger
        LANGUAGE plpgsql
        SECURITY DEFINER
        SET search_path = pg_catalog, %1$I, pg_temp
        AS $body$
        DECLARE
            unanswered bigint;
        BEGIN
            IF pg_catalog.current_setting('transaction_isolation')
                   IN ('repeatable read', 'serializable') THEN
                -- No row read, lock or write: number the ring and notify, unless too
                -- many rings have gone unanswered and another producer is notifying.
                -- Separate steps: SQL does not promise to evaluate OR left to right,
                -- and the ring must be numbered every time.
                unanswered := pg_catalog.nextval(%2$L::regclass)
                    - (SELECT last_value FROM %1$I.webhook_doorbell_gate);
                IF unanswered <= 1000 THEN
                    PERFORM pg_catalog.pg_notify('outboxd_wakeup', '');
                ELSIF pg_catalog.pg_try_advisory_xact_lock(8026380636457233767) THEN
                    PERFORM pg_catalog.pg_notify('outboxd_wakeup', '');
                END IF;
                RETURN NULL;
            END IF;
            IF EXISTS (SELECT 1 FROM %1$I.webhook_doorbell WHERE id = 1 AND armed) THEN
                -- SKIP LOCKED: if another producer is ringing right now, it notifies
                -- for us. The row is re-checked after the lock, so a bell disarmed
                -- meanwhile is left.
                PERFORM 1 FROM %1$I.webhook_doorbell WHERE id = 1 AND armed
                    FOR UPDATE SKIP LOCKED;
                IF FOUND THEN
                    UPDATE %1$I.webhook_doorbell SET armed = false WHERE id = 1;
                    PERFORM pg_catalog.pg_notify('outboxd_wakeup', '');
                END IF;
            END IF;
            RETURN NULL;
        END
        $body$
    $function$, current_schema(), format('%I.webhook_doorbell_rings', current_schema()));
END
$migrate$;

-- ---------------------------------------------------------------------------------------
-- 2. Endpoint health
-- ---------------------------------------------------------------------------------------

-- Until when the endpoint's run of failures counts as ongoing: its latest scheduled
-- retry, plus twelve hours. A failure after it (a silence: no attempt was due, or every
-- delivery had died) starts a new run; housekeeping disables an endpoint only while it
-- lies ahead, so an old run with no recent attempt never disables. Twelve hours: more
-- than any delay in claiming a due retry, and more than the default backoff cap (10 h),
-- so that failures scheduling no retry (a 4xx, a last attempt) still make one run when
-- events come about as often as retries would. NULL while healthy, and on endpoints
-- last failing before this migration, whose next failure starts a run.
ALTER TABLE webhook_endpoints ADD COLUMN IF NOT EXISTS failing_until timestamptz;

-- `discarded`: a parked delivery an operator chose not to send (enabling its endpoint
-- with the backlog discarded). Final like `delivered`, and kept apart from `dead` so a
-- bulk re-drive of dead deliveries, the dead-letter gauge and its alerts never see it.
-- NOT VALID: rows already there satisfy the narrower check, and validating would scan
-- the table under this migration's exclusive lock; new writes are checked either way.
DO $migrate$
DECLARE
    check_name name;
BEGIN
    FOR check_name IN
        SELECT c.conname
        FROM pg_catalog.pg_constraint c
        JOIN pg_catalog.pg_attribute a
          ON a.attrelid = c.conrelid AND a.attname = 'state' AND c.conkey = ARRAY[a.attnum]
        WHERE c.conrelid = 'webhook_deliveries'::regclass AND c.contype = 'c'
          AND pg_catalog.pg_get_constraintdef(c.oid) NOT LIKE '%discarded%'
    LOOP
        EXECUTE format('ALTER TABLE webhook_deliveries DROP CONSTRAINT %I', check_name);
    END LOOP;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint
                   WHERE conrelid = 'webhook_deliveries'::regclass
                     AND conname = 'webhook_deliveries_state_check') THEN
        ALTER TABLE webhook_deliveries ADD CONSTRAINT webhook_deliveries_state_check
            CHECK (state IN ('pending', 'delivered', 'dead', 'parked', 'discarded')) NOT VALID;
    END IF;
END
$migrate$;

-- The settle of 0005, same signature (dispatchers of the previous version call it too)
-- and same statement, with two changes:
--
-- * The failure clock follows the attempts. A failure starts a run when none is
--   ongoing (failing_until passed or unknown), and moves failing_until to the latest
--   retry it schedules (delay_ms; a dead or parked outcome schedules none) plus twelve
--   hours. The endpoint row is written only on those transitions, or when failing_until
--   moves by more than a minute: at most about once a minute per failing endpoint, so
--   dispatchers settling for one endpoint do not queue on its row.
-- * A 410 Gone disables the endpoint in the same transaction that parks the delivery
--   (before, a separate statement did it after the settle, and a failure between the
--   two left the delivery parked under an active endpoint, excluded from the sweep
--   that resumes stranded parks). A 410 is the only outcome written as `parked` that
--   counts as an attempt (uncount = 0; a park of a closed endpoint's delivery has
--   uncount = 1). The endpoint's other pending deliveries are parked with it, as
--   endpoint::disable does, in a second statement that sees the first one's writes.
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
    gone bigint[];
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
        -- Any success ends the run. Only transitions write.
        UPDATE webhook_endpoints SET failing_since = NULL, failing_until = NULL
        WHERE id = ANY ($19::bigint[]) AND failing_since IS NOT NULL
    ), failed AS (
        -- $20 holds the endpoints with a failed attempt and no success in this batch;
        -- their attempts are the outcomes that count (uncount = 0).
        SELECT o.endpoint_id,
               now() + max(CASE WHEN o.state = 'pending' THEN o.delay_ms ELSE 0 END)
                       * interval '1 millisecond'
                     + interval '12 hours' AS until
        FROM outcome o
        WHERE o.uncount = 0 AND o.endpoint_id = ANY ($20::bigint[])
        GROUP BY o.endpoint_id
    ), failing AS (
        UPDATE webhook_endpoints e
        SET failing_since = CASE WHEN e.failing_since IS NOT NULL AND e.failing_until >= now()
                                 THEN e.failing_since ELSE now() END,
            failing_until = f.until
        FROM failed f
        WHERE e.id = f.endpoint_id
          AND (e.failing_since IS NULL OR e.failing_until IS NULL OR e.failing_until < now()
               OR f.until > e.failing_until + interval '1 minute')
    )
    SELECT count(*) INTO n FROM settled;

    SELECT array_agg(DISTINCT o.endpoint_id) INTO gone
    FROM unnest($3::bigint[], $5::text[], $7::int[]) AS o(endpoint_id, state, uncount)
    WHERE o.state = 'parked' AND o.uncount = 0;
    IF gone IS NOT NULL THEN
        WITH off AS (
            UPDATE webhook_endpoints
            SET active = false, disabled_reason = 'endpoint answered 410 Gone',
                updated_at = now()
            WHERE id = ANY (gone) AND active AND deleted_at IS NULL
            RETURNING id
        )
        UPDATE webhook_deliveries d
        SET state = 'parked', updated_at = now()
        FROM off
        WHERE d.endpoint_id = off.id AND d.state = 'pending' AND d.locked_by IS NULL;
    END IF;
    RETURN n;
END
$settle$;
