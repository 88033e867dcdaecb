-- The ordered part of the claim (claim::CLAIM), as a function so that scripts can call
-- it from several sessions; the builder writes it into CLAIM's CTEs (docs/ordering.md).
-- $1/$2: the horizon pairs the dispatcher kept from earlier claims (largest number
-- seen, that claim's xid); $3 worker; $4 lease ms; $5 most events.
-- Returns the deliveries written, with the pair this claim adds (seen, xid).
CREATE OR REPLACE FUNCTION proto_fanout_ordered(int8[], xid8[], text, int, int)
RETURNS TABLE (event_id bigint, endpoint_id bigint, state text, seq bigint,
               seen bigint, xid xid8)
LANGUAGE plpgsql
AS $f$
BEGIN
    RETURN QUERY
    WITH horizon AS (
        -- Every transaction that drew a number up to `w` has ended: a pair whose claim
        -- saw `w` and whose xid (assigned after that claim's snapshot) is older than
        -- every transaction running now.
        SELECT coalesce(max(p.seen), 0) AS w
        FROM unnest($1, $2) AS p(seen, xid)
        WHERE p.xid < pg_snapshot_xmin(pg_current_snapshot())
    ), pair AS (
        -- This claim's pair, for a later claim: only while ordered events wait (the
        -- xid is assigned here, after this statement's snapshot).
        SELECT m.seen, CASE WHEN m.seen IS NOT NULL THEN pg_current_xact_id() END AS xid
        FROM (SELECT max(l.seq) AS seen FROM webhook_ordering_log l) m
    ), ocand AS (
        SELECT l.seq, l.event_id, l.ordering_key
        FROM webhook_ordering_log l
        WHERE l.seq <= (SELECT h.w FROM horizon h)
        ORDER BY l.seq
        LIMIT $5
        FOR UPDATE SKIP LOCKED
    ), odue AS (
        -- A probe by primary key per event (OFFSET 0 keeps the planner from turning it
        -- back into a hash join over a scan of the whole outbox).
        SELECT c.seq, c.event_id, c.ordering_key, o.event_type, o.id IS NULL AS gone
        FROM ocand c
        LEFT JOIN LATERAL (SELECT x.id, x.event_type, x.deliver_after
                           FROM webhook_outbox x WHERE x.id = c.event_id OFFSET 0) o ON true
        WHERE o.id IS NULL OR o.deliver_after <= now()
    ), oadmitted AS (
        -- A prefix of each key: nothing of its key with a smaller number stays behind
        -- (locked by another claim, not due yet).
        SELECT d.* FROM odue d
        WHERE NOT EXISTS (SELECT 1 FROM webhook_ordering_log l
                          WHERE l.ordering_key = d.ordering_key AND l.seq < d.seq
                            AND NOT EXISTS (SELECT 1 FROM odue x WHERE x.seq = l.seq))
    ), consumed AS (
        DELETE FROM webhook_ordering_log l
        WHERE l.seq = ANY (ARRAY(SELECT a.seq FROM oadmitted a))
    ), processed AS (
        UPDATE webhook_outbox o SET processed_at = now()
        WHERE o.id = ANY (ARRAY(SELECT a.event_id FROM oadmitted a WHERE NOT a.gone))
    ), ofan AS (
        SELECT a.event_id, a.seq, a.ordering_key, ep.id AS endpoint_id, ep.active AS open
        FROM oadmitted a
        JOIN webhook_endpoints ep
          ON ep.deleted_at IS NULL AND NOT a.gone
         AND (cardinality(ep.event_types) = 0 OR a.event_type = ANY (ep.event_types))
    ), keyed AS (
        -- Locks (or creates) each (endpoint, key) row, in key order like the settle.
        -- A fresh row names this claim's first event of the key as its head; a row
        -- that exists keeps its head (DO UPDATE only to lock it, and to read its latest
        -- version whatever this statement's snapshot).
        INSERT INTO webhook_ordering_keys AS k (endpoint_id, ordering_key, head_event_id, head_seq)
        SELECT DISTINCT ON (f.endpoint_id, f.ordering_key)
               f.endpoint_id, f.ordering_key, f.event_id, f.seq
        FROM ofan f
        ORDER BY f.endpoint_id, f.ordering_key, f.seq
        ON CONFLICT ON CONSTRAINT webhook_ordering_keys_pkey
        DO UPDATE SET head_seq = k.head_seq
        RETURNING k.endpoint_id, k.ordering_key, k.head_seq
    ), inserted AS (
        INSERT INTO webhook_deliveries AS d
            (event_id, endpoint_id, state, attempts, next_attempt_at, locked_by, locked_until,
             ordering_key, ordering_seq)
        SELECT f.event_id, f.endpoint_id,
               CASE WHEN f.seq <> k.head_seq THEN 'queued'
                    WHEN f.open THEN 'pending' ELSE 'parked' END,
               CASE WHEN f.seq = k.head_seq AND f.open THEN 1 ELSE 0 END,
               CASE WHEN f.seq = k.head_seq AND f.open
                    THEN now() + $4 * interval '1 millisecond' ELSE now() END,
               CASE WHEN f.seq = k.head_seq AND f.open THEN $3 END,
               CASE WHEN f.seq = k.head_seq AND f.open
                    THEN now() + $4 * interval '1 millisecond' END,
               f.ordering_key, f.seq
        FROM ofan f
        JOIN keyed k ON k.endpoint_id = f.endpoint_id AND k.ordering_key = f.ordering_key
        ON CONFLICT ON CONSTRAINT webhook_deliveries_pkey DO NOTHING
        RETURNING d.event_id, d.endpoint_id, d.state, d.ordering_seq
    )
    SELECT i.event_id, i.endpoint_id, i.state, i.ordering_seq, p.seen, p.xid
    FROM pair p LEFT JOIN inserted i ON true;
END
$f$;
