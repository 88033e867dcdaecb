-- Ordered delivery per key (issue 15; the measured design is docs/ordering.md).
--
-- A producer may give an event an `ordering_key`. For each endpoint and key, deliveries
-- go one at a time, in the order the producers' transactions committed: the key's
-- *head* is a delivery like any other (`pending`, retried, parked, dead); the ones
-- behind it are `queued`, outside the due index, and the next is promoted when the
-- head ends. Events without a key are not touched by anything here.
--
-- Upgrading: dispatchers of the previous version fan ordered events out as unordered
-- ones (their claim does not know the key), so produce ordered events only once every
-- dispatcher runs this version. Their claim also read the index this file replaces
-- (webhook_outbox_pending_idx) and falls back to a scan of the outbox without it: stop
-- them before migrating, or expect slow claims from them until they are replaced.

-- ---------------------------------------------------------------------------------------
-- 1. Producers: a key, and a number drawn at commit
-- ---------------------------------------------------------------------------------------
ALTER TABLE webhook_outbox
    ADD COLUMN IF NOT EXISTS ordering_key text
        CONSTRAINT webhook_outbox_ordering_key_check
        CHECK (ordering_key <> '' AND length(ordering_key) <= 255);

-- The claim's fan-out scan (claim::CLAIM's `candidates`) takes only unordered events:
-- ordered ones are fanned out by the sequencer (ordering::SEQUENCE) in commit order, and
-- a burst of them waiting there must not be walked past by every claim. It replaces
-- 0001's webhook_outbox_pending_idx rather than joining it: a second index on every
-- producer's insert would cost producers what they were promised not to pay.
CREATE INDEX IF NOT EXISTS webhook_outbox_unordered_idx
    ON webhook_outbox (deliver_after, id)
    WHERE processed_at IS NULL AND ordering_key IS NULL;
DROP INDEX IF EXISTS webhook_outbox_pending_idx;

-- Ordered events not fanned out yet, for housekeeping to find the strays among them
-- (ordering::STRAYS: an event that has a key but no number, because the trigger did not
-- fire or the key was set by an UPDATE). Nearly empty: the sequencer marks ordered
-- events processed within milliseconds of their commit.
CREATE INDEX IF NOT EXISTS webhook_outbox_ordered_idx
    ON webhook_outbox (id)
    WHERE processed_at IS NULL AND ordering_key IS NOT NULL;

-- Ordered events not fanned out yet, numbered in the producers' commit order; the
-- sequencer fans them out from here in number order and deletes their rows. A table of
-- its own, written only by inserts: the trigger below reads no row. (Numbering the
-- producer's own outbox row instead reads it through the primary key, and at
-- SERIALIZABLE that read's page-level predicate lock made 90% of concurrent ordered
-- producers fail: docs/ordering.md.) CACHE 1, the default, is what keeps the numbers in
-- the order they are drawn: with a cache each session would draw from its own block.
CREATE SEQUENCE IF NOT EXISTS webhook_ordering_seq AS bigint CACHE 1;
CREATE TABLE IF NOT EXISTS webhook_ordering_log (
    -- The sequencer's scan: in number order, up to its horizon.
    seq          bigint PRIMARY KEY,
    event_id     bigint NOT NULL,
    ordering_key text   NOT NULL
);
-- "Nothing of this key with a smaller number is left behind": a probe per key.
CREATE INDEX IF NOT EXISTS webhook_ordering_log_key_idx
    ON webhook_ordering_log (ordering_key, seq);

-- Writes one row and draws a number from a sequence, which neither snapshots nor SSI
-- watch: nothing here reads a row, waits, or can fail a producer's serialization check,
-- at any isolation level. SECURITY DEFINER so that producers need no privilege on the
-- log, with the search path pinned as for the doorbell (sql/0004).
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

-- Deferred to the producer's commit, so the numbers follow the commit order (a producer
-- that runs SET CONSTRAINTS ALL IMMEDIATE numbers its events at that point instead:
-- still safe, the order is then that point's). WHEN keeps it off unordered inserts
-- entirely. With session_replication_role = replica (logical replication's apply, some
-- restores) it does not fire, nor does it for a key set later by an UPDATE:
-- housekeeping numbers such events late (ordering::STRAYS), never loses them.
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

-- `queued`: an ordered delivery behind its key's head. Not claimable: the due index
-- (state = 'pending') never holds it, however long the line.
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

-- The next in line: the promotion reads the first entry per (endpoint, key); discarding
-- an endpoint's backlog reads its part.
CREATE INDEX IF NOT EXISTS webhook_deliveries_queued_idx
    ON webhook_deliveries (endpoint_id, ordering_key, ordering_seq)
    WHERE state = 'queued';

-- A row per (endpoint, key) that has a head: a delivery pending, in flight, parked, or
-- dead under the `block` policy. No row: nothing of the key is in line for the endpoint.
-- The sequencer and the settle serialize on it: the sequencer locks it (or creates it)
-- with INSERT ... ON CONFLICT DO UPDATE, which takes the latest committed version even
-- in a statement whose snapshot is older; the settle locks it, then decides in a later
-- statement that sees what a sequencer holding the lock committed.
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

-- What happens to a key whose head ends dead, for this endpoint; NULL: the dispatcher's
-- WEBHOOK_ORDERING_DEAD_HEAD (default `block`).
ALTER TABLE webhook_endpoints
    ADD COLUMN IF NOT EXISTS ordering_dead_head text
        CONSTRAINT webhook_endpoints_ordering_dead_head_check
        CHECK (ordering_dead_head IN ('block', 'skip'));

-- ---------------------------------------------------------------------------------------
-- 3. Moving a line on when its head ends
-- ---------------------------------------------------------------------------------------
-- Called in the transaction that ended the heads (the settle below, an operator's
-- discard), with their (event, endpoint) pairs and the global dead-head policy. Two
-- statements on purpose: the first locks the key rows (in (endpoint, key) order, as the
-- sequencer takes them, so the two cannot deadlock), waiting for a sequencer that holds
-- one; the second, with a snapshot taken after the wait, sees the deliveries that
-- sequencer queued. One statement would decide on its own snapshot and could delete the
-- key row under a delivery queued meanwhile (docs/ordering/race.sh shows it). Keyed on
-- the deliveries' states, not on the call: a call repeated after an ambiguous error, or
-- for an outcome whose lease was taken over, changes nothing. Returns how many
-- deliveries it made due.
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
        -- Key rows whose head is one of these deliveries and has ended.
        SELECT k.endpoint_id, k.ordering_key,
               d.state = 'dead' AND coalesce(ep.ordering_dead_head, $3) = 'block' AS block,
               coalesce(ep.active AND ep.deleted_at IS NULL, false) AS open
        FROM unnest($1, $2) AS o(event_id, endpoint_id)
        JOIN webhook_deliveries d ON d.event_id = o.event_id AND d.endpoint_id = o.endpoint_id
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
        -- Due now, or at its event's deliver_after; parked instead if its endpoint is
        -- closed (enable resumes it).
        UPDATE webhook_deliveries d
        SET state = CASE WHEN s.open THEN 'pending' ELSE 'parked' END,
            next_attempt_at = greatest(now(), (SELECT o.deliver_after FROM webhook_outbox o
                                               WHERE o.id = s.next_event)),
            updated_at = now()
        FROM step s
        -- The whole key of the queued index as well as the primary key: whichever the
        -- plan takes is one probe. (With the primary key's columns alone, a plan made
        -- on fresh statistics took the queued index by endpoint and walked the
        -- endpoint's whole line for each row: 1 ms a row with 19,000 queued.)
        WHERE d.event_id = s.next_event AND d.endpoint_id = s.endpoint_id
          AND d.ordering_key = s.ordering_key AND d.ordering_seq = s.next_seq
          AND d.state = 'queued'
        RETURNING d.state
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
    SELECT count(*) FILTER (WHERE state = 'pending') INTO n FROM promoted;
    RETURN n;
END
$advance$;

-- The settle of this version's dispatchers for a batch with ordered deliveries in it:
-- webhook_settle_outcomes (sql/0011), then the lines of the heads it ended move on, in
-- the same transaction. Batches without one still call webhook_settle_outcomes alone,
-- so unordered delivery pays nothing for this. A new name rather than an overload, as in
-- 0011. $29/$30: the outcomes' ordered (event, endpoint) pairs; $31: the global
-- dead-head policy. Returns the settle's row with how many deliveries were made due.
CREATE OR REPLACE FUNCTION webhook_settle_ordered(
    text,
    bigint[], bigint[], int[], text[], bigint[], int[], int[], text[],
    bigint[], bigint[], int[], timestamptz[], int[], int[], text[], text[], text[],
    bigint[], bigint[],
    bigint[], int[], bigint[], bigint[], int, bigint, bigint, bigint[],
    bigint[], bigint[], text
) RETURNS TABLE (settled bigint, opened bigint[], closed bigint[], promoted bigint)
LANGUAGE plpgsql
AS $settle$
DECLARE
    r record;
BEGIN
    SELECT * INTO r
    FROM webhook_settle_outcomes($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
                                 $11, $12, $13, $14, $15, $16, $17, $18, $19, $20,
                                 $21, $22, $23, $24, $25, $26, $27, $28);
    RETURN QUERY SELECT r.settled, r.opened, r.closed, webhook_ordering_advance($29, $30, $31);
END
$settle$;
