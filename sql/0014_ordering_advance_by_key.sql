-- The settle's promotion (webhook_ordering_advance, sql/0013) finds each ended head's
-- key row by its whole primary key (issue 15).
--
-- 0013's version joined the outcomes with the key rows before the deliveries, so the
-- key row could be probed by its endpoint alone, its name not known yet: each ended head
-- walked every key row of its endpoint (1,000 at 1,000 keys, ~135 us a delivery in an
-- ordered burst; tests/it/plans.rs, promotion_probes_one_key_row_per_ended_head). Only
-- `ended`, in the function's second statement, changes: the deliveries are read first,
-- in a sub-query, and each key row is then one probe. Same signature, same results, so
-- dispatchers of this version and the previous one work alike before and after it.

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
        -- Key rows whose head is one of these deliveries and has ended: each delivery
        -- by primary key first (OFFSET 0 keeps it a sub-query the planner cannot take
        -- apart), then its key row by the whole primary key, the key's name coming from
        -- the delivery. Planned in one piece, the key row was read before the delivery
        -- and could be found by its endpoint alone: every key row of the endpoint
        -- walked for each head, 1,000 of them a head at 1,000 keys.
        SELECT k.endpoint_id, k.ordering_key,
               d.state = 'dead' AND coalesce(ep.ordering_dead_head, $3) = 'block' AS block,
               coalesce(ep.active AND ep.deleted_at IS NULL, false) AS open
        FROM (SELECT d.event_id, d.endpoint_id, d.ordering_key, d.state
              FROM unnest($1, $2) AS o(event_id, endpoint_id)
              JOIN webhook_deliveries d
                ON d.event_id = o.event_id AND d.endpoint_id = o.endpoint_id
              WHERE d.state IN ('delivered', 'dead', 'discarded')
                AND d.ordering_key IS NOT NULL
              OFFSET 0) d
        JOIN webhook_ordering_keys k
          ON k.endpoint_id = d.endpoint_id AND k.ordering_key = d.ordering_key
         AND k.head_event_id = d.event_id
        LEFT JOIN webhook_endpoints ep ON ep.id = d.endpoint_id
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
