-- Prototype of sql/0013_ordered_delivery.sql (docs/ordering.md): the schema, the
-- producers' trigger and the settle's promotion. Applied on top of 0001-0011 by the
-- scripts in this directory; the builder moves it to sql/ with the claim changes.

-- ---------------------------------------------------------------------------------------
-- 1. Producers: a key, and a number drawn at commit
-- ---------------------------------------------------------------------------------------
ALTER TABLE webhook_outbox
    ADD COLUMN IF NOT EXISTS ordering_key text
        CHECK (ordering_key <> '' AND length(ordering_key) <= 255);

-- Ordered events not fanned out yet, numbered in the producers' commit order: the claim
-- fans them out from here, in number order, and deletes their rows. A table of its own,
-- written only by inserts: the trigger below reads no row (an UPDATE of the producer's
-- own outbox row reads it through the primary key, and at SERIALIZABLE that read's
-- page-level predicate lock made 92% of concurrent ordered producers fail, see
-- docs/ordering.md), and the outbox and its indexes are left as they are, so unordered
-- producers pay nothing.
CREATE SEQUENCE IF NOT EXISTS webhook_ordering_seq AS bigint;
CREATE TABLE IF NOT EXISTS webhook_ordering_log (
    -- The claim's scan: in number order, up to the horizon.
    seq          bigint PRIMARY KEY,
    event_id     bigint NOT NULL,
    ordering_key text   NOT NULL
);
-- "Nothing of this key with a smaller number is left behind": a probe per key.
CREATE INDEX IF NOT EXISTS webhook_ordering_log_key_idx
    ON webhook_ordering_log (ordering_key, seq);

-- Writes one row and draws a number from a sequence (neither versioned by snapshots nor
-- watched by SSI): nothing here reads a row, waits or can fail a serialization check.
DO $migrate$
BEGIN
    EXECUTE format($function$
        CREATE OR REPLACE FUNCTION %1$I.webhook_outbox_draw_ordering_seq() RETURNS trigger
        LANGUAGE plpgsql
        SECURITY DEFINER
        SET search_path = pg_catalog, %1$I, pg_temp
        AS $body$
        BEGIN
            INSERT INTO %1$I.webhook_ordering_log (seq, event_id, ordering_key)
            VALUES (pg_catalog.nextval(%2$L::regclass), NEW.id, NEW.ordering_key);
            RETURN NULL;
        END
        $body$
    $function$, current_schema(), format('%I.webhook_ordering_seq', current_schema()));
END
$migrate$;

DROP TRIGGER IF EXISTS webhook_outbox_ordering_seq ON webhook_outbox;
CREATE CONSTRAINT TRIGGER webhook_outbox_ordering_seq
    AFTER INSERT ON webhook_outbox
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (NEW.ordering_key IS NOT NULL)
    EXECUTE FUNCTION webhook_outbox_draw_ordering_seq();

-- ---------------------------------------------------------------------------------------
-- 2. Deliveries: one head per (endpoint, key), the rest queued
-- ---------------------------------------------------------------------------------------
ALTER TABLE webhook_deliveries
    ADD COLUMN IF NOT EXISTS ordering_key text,
    ADD COLUMN IF NOT EXISTS ordering_seq bigint;

-- `queued`: an ordered delivery behind its key's head. Not claimable: the claim's due
-- index (state = 'pending') never holds it, however long the line.
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
          AND pg_catalog.pg_get_constraintdef(c.oid) NOT LIKE '%queued%'
    LOOP
        EXECUTE format('ALTER TABLE webhook_deliveries DROP CONSTRAINT %I', check_name);
    END LOOP;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint
                   WHERE conrelid = 'webhook_deliveries'::regclass
                     AND conname = 'webhook_deliveries_state_check') THEN
        ALTER TABLE webhook_deliveries ADD CONSTRAINT webhook_deliveries_state_check
            CHECK (state IN ('pending', 'delivered', 'dead', 'parked', 'discarded', 'queued'))
            NOT VALID;
    END IF;
END
$migrate$;

-- The next in line: the settle's promotion reads the first entry per (endpoint, key).
CREATE INDEX IF NOT EXISTS webhook_deliveries_queued_idx
    ON webhook_deliveries (endpoint_id, ordering_key, ordering_seq)
    WHERE state = 'queued';

-- A row per (endpoint, key) that has a head: a delivery pending, in flight, parked, or
-- dead under the `block` policy. No row: nothing of the key is in line for the endpoint.
-- The fan-out and the settle serialize on it: the fan-out locks it (or creates it) with
-- INSERT ... ON CONFLICT DO UPDATE, which takes the latest committed version even in a
-- statement whose snapshot is older; the settle locks it, then decides in a later
-- statement that sees what a fan-out holding the lock committed.
CREATE TABLE IF NOT EXISTS webhook_ordering_keys (
    endpoint_id   bigint NOT NULL,
    ordering_key  text   NOT NULL,
    head_event_id bigint NOT NULL,
    head_seq      bigint NOT NULL,
    -- The head ended dead and the endpoint's policy is `block`.
    blocked_since timestamptz,
    PRIMARY KEY (endpoint_id, ordering_key)
);
-- stats, the admin API and the metric count blocked keys without reading the others.
CREATE INDEX IF NOT EXISTS webhook_ordering_keys_blocked_idx
    ON webhook_ordering_keys (endpoint_id)
    WHERE blocked_since IS NOT NULL;

-- NULL: the dispatcher's WEBHOOK_ORDERING_DEAD_HEAD (default `block`).
ALTER TABLE webhook_endpoints
    ADD COLUMN IF NOT EXISTS ordering_dead_head text CHECK (ordering_dead_head IN ('block', 'skip'));

-- ---------------------------------------------------------------------------------------
-- 3. The settle's promotion
-- ---------------------------------------------------------------------------------------
-- Called by webhook_settle_outcomes after webhook_settle, in its transaction, with the
-- outcomes' (event, endpoint) pairs and the global dead-head policy. Two statements on
-- purpose: the first locks the key rows (in (endpoint, key) order, as the fan-out takes
-- them, so the two cannot deadlock), waiting for a fan-out that holds one; the second,
-- with a snapshot taken after the wait, sees the deliveries that fan-out queued. One
-- statement would decide on its own snapshot and could drop the key row under a
-- delivery queued meanwhile (docs/ordering/race.sh shows it).
CREATE OR REPLACE FUNCTION webhook_ordering_advance(bigint[], bigint[], text)
RETURNS bigint
LANGUAGE plpgsql
-- Primary-key and queued-index probes at any size, planned once (see sql/0005): on
-- stale statistics the planner hash-joined the outcomes against a scan of every key row.
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
SET plan_cache_mode = force_generic_plan
AS $advance$
DECLARE
    n bigint;
BEGIN
    PERFORM 1
    FROM webhook_ordering_keys k
    JOIN (SELECT DISTINCT d.endpoint_id, d.ordering_key
          FROM unnest($1, $2) AS o(event_id, endpoint_id)
          JOIN webhook_deliveries d ON d.event_id = o.event_id AND d.endpoint_id = o.endpoint_id
          WHERE d.ordering_key IS NOT NULL) s
      ON s.endpoint_id = k.endpoint_id AND s.ordering_key = k.ordering_key
    ORDER BY k.endpoint_id, k.ordering_key
    FOR UPDATE OF k;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;

    WITH ended AS (
        -- Key rows whose head is one of these outcomes' deliveries and has ended.
        SELECT k.endpoint_id, k.ordering_key,
               d.state = 'dead' AND coalesce(ep.ordering_dead_head, $3) = 'block' AS block,
               ep.active AND ep.deleted_at IS NULL AS open
        FROM unnest($1, $2) AS o(event_id, endpoint_id)
        JOIN webhook_deliveries d ON d.event_id = o.event_id AND d.endpoint_id = o.endpoint_id
        -- By primary key: head_event_id has no index.
        JOIN webhook_ordering_keys k
          ON k.endpoint_id = d.endpoint_id AND k.ordering_key = d.ordering_key
         AND k.head_event_id = d.event_id
        LEFT JOIN webhook_endpoints ep ON ep.id = o.endpoint_id
        WHERE d.state IN ('delivered', 'dead', 'discarded')
    ), step AS (
        -- Each with the next in its line, if any and if the line moves on.
        SELECT e.*, q.event_id AS next_event, q.ordering_seq AS next_seq
        FROM ended e
        LEFT JOIN LATERAL (
            SELECT d.event_id, d.ordering_seq
            FROM webhook_deliveries d
            WHERE d.state = 'queued' AND d.endpoint_id = e.endpoint_id
              AND d.ordering_key = e.ordering_key
            ORDER BY d.ordering_seq
            LIMIT 1
        ) q ON NOT e.block
    ), blocked AS (
        UPDATE webhook_ordering_keys k
        SET blocked_since = now()
        FROM step s
        WHERE s.block AND k.endpoint_id = s.endpoint_id AND k.ordering_key = s.ordering_key
          AND k.blocked_since IS NULL
    ), promoted AS (
        -- Due now; parked instead if its endpoint is closed (enable resumes it).
        UPDATE webhook_deliveries d
        SET state = CASE WHEN s.open THEN 'pending' ELSE 'parked' END,
            next_attempt_at = now(), updated_at = now()
        FROM step s
        WHERE d.event_id = s.next_event AND d.endpoint_id = s.endpoint_id AND d.state = 'queued'
        RETURNING 1
    ), moved AS (
        UPDATE webhook_ordering_keys k
        SET head_event_id = s.next_event, head_seq = s.next_seq, blocked_since = NULL
        FROM step s
        WHERE s.next_event IS NOT NULL
          AND k.endpoint_id = s.endpoint_id AND k.ordering_key = s.ordering_key
    ), emptied AS (
        DELETE FROM webhook_ordering_keys k
        USING step s
        WHERE NOT s.block AND s.next_event IS NULL
          AND k.endpoint_id = s.endpoint_id AND k.ordering_key = s.ordering_key
    )
    SELECT count(*) INTO n FROM promoted;
    RETURN n;
END
$advance$;
