-- The hand-off variant measured in docs/ordering.md ("Costs"): the settle leases each
-- promoted delivery to the dispatcher that settled its predecessor and returns it with
-- its payload, so that the next of a key needs no claim. $4 worker, $5 lease ms.
CREATE OR REPLACE FUNCTION proto_ordering_handoff(bigint[], bigint[], text, text, bigint)
RETURNS TABLE (event_id bigint, endpoint_id bigint, attempt int, payload text)
LANGUAGE plpgsql
-- Primary-key and queued-index probes at any size, planned once (see sql/0005): on
-- stale statistics the planner hash-joined the outcomes against a scan of every key row.
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
SET plan_cache_mode = force_generic_plan
AS $handoff$
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
        RETURN;
    END IF;

    RETURN QUERY
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
        -- Leased at once to the settling dispatcher ($4, lease $5 ms): it sends the
        -- next without a claim. Parked instead if its endpoint is closed.
        UPDATE webhook_deliveries d
        SET state = CASE WHEN s.open THEN 'pending' ELSE 'parked' END,
            attempts = d.attempts + CASE WHEN s.open THEN 1 ELSE 0 END,
            locked_by = CASE WHEN s.open THEN $4 END,
            locked_until = CASE WHEN s.open THEN now() + $5 * interval '1 millisecond' END,
            next_attempt_at = CASE WHEN s.open THEN now() + $5 * interval '1 millisecond'
                                   ELSE now() END,
            updated_at = now()
        FROM step s
        WHERE d.event_id = s.next_event AND d.endpoint_id = s.endpoint_id AND d.state = 'queued'
        RETURNING d.event_id, d.endpoint_id, d.attempts, d.state
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
    SELECT p.event_id, p.endpoint_id, p.attempts, o.payload::text
    FROM promoted p
    LEFT JOIN webhook_outbox o ON o.id = p.event_id
    WHERE p.state = 'pending';
END
$handoff$;
