-- Variant measured in docs/ordering.md ("Costs"): the next of a key is promoted by the
-- claim, not by the settle. The settle only frees the key row (head NULL); a key row is
-- ready when it is free and something is queued behind (tail_seq > last_seq); the claim
-- takes ready rows FOR UPDATE SKIP LOCKED (re-checked on their latest version) and leases
-- each one's first queued delivery directly. Applied over 0013_proto.sql by one-key.sh
-- MODE=claim.
ALTER TABLE webhook_ordering_keys
    ALTER COLUMN head_event_id DROP NOT NULL,
    ALTER COLUMN head_seq DROP NOT NULL,
    -- The largest number fanned out to this line, and its latest head's.
    ADD COLUMN IF NOT EXISTS tail_seq bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS last_seq bigint NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS webhook_ordering_keys_ready_idx
    ON webhook_ordering_keys (endpoint_id, ordering_key)
    WHERE head_event_id IS NULL AND tail_seq > last_seq;

-- The settle's part: one statement, no decision (the state of the outcome's delivery,
-- already written by webhook_settle in the same transaction, says whether its head
-- ended); it would be a CTE of webhook_settle's statement.
CREATE OR REPLACE FUNCTION proto_free_heads(bigint[], bigint[], text) RETURNS bigint
LANGUAGE sql
AS $$
    WITH ended AS (
        SELECT k.endpoint_id, k.ordering_key,
               d.state = 'dead' AND coalesce(ep.ordering_dead_head, $3) = 'block' AS block
        FROM unnest($1, $2) AS o(event_id, endpoint_id)
        JOIN webhook_deliveries d ON d.event_id = o.event_id AND d.endpoint_id = o.endpoint_id
        JOIN webhook_ordering_keys k
          ON k.endpoint_id = d.endpoint_id AND k.ordering_key = d.ordering_key
         AND k.head_event_id = d.event_id
        LEFT JOIN webhook_endpoints ep ON ep.id = o.endpoint_id
        WHERE d.state IN ('delivered', 'dead', 'discarded')
        ORDER BY k.endpoint_id, k.ordering_key
    ), freed AS (
        UPDATE webhook_ordering_keys k
        SET head_event_id = CASE WHEN e.block THEN k.head_event_id END,
            blocked_since = CASE WHEN e.block THEN now() END
        FROM ended e
        WHERE k.endpoint_id = e.endpoint_id AND k.ordering_key = e.ordering_key
        RETURNING 1
    )
    SELECT count(*) FROM freed
$$;

-- The claim's part: ready lines, their next leased at once, with the payload (the
-- claim's result would carry it like any claimed delivery). $1 worker, $2 lease ms,
-- $3 most.
CREATE OR REPLACE FUNCTION proto_claim_next(text, bigint, int)
RETURNS TABLE (event_id bigint, endpoint_id bigint, attempt int, payload text)
LANGUAGE sql
AS $$
    WITH ready AS (
        SELECT k.endpoint_id, k.ordering_key
        FROM webhook_ordering_keys k
        WHERE k.head_event_id IS NULL AND k.tail_seq > k.last_seq
        LIMIT $3
        FOR UPDATE SKIP LOCKED
    ), nxt AS (
        SELECT r.endpoint_id, r.ordering_key, q.event_id, q.ordering_seq
        FROM ready r
        CROSS JOIN LATERAL (
            SELECT d.event_id, d.ordering_seq FROM webhook_deliveries d
            WHERE d.state = 'queued' AND d.endpoint_id = r.endpoint_id
              AND d.ordering_key = r.ordering_key
            ORDER BY d.ordering_seq LIMIT 1
        ) q
    ), leased AS (
        UPDATE webhook_deliveries d
        SET state = 'pending', attempts = d.attempts + 1, locked_by = $1,
            locked_until = now() + $2 * interval '1 millisecond',
            next_attempt_at = now() + $2 * interval '1 millisecond', updated_at = now()
        FROM nxt n
        WHERE d.event_id = n.event_id AND d.endpoint_id = n.endpoint_id AND d.state = 'queued'
        RETURNING d.event_id, d.endpoint_id, d.attempts
    ), moved AS (
        UPDATE webhook_ordering_keys k
        SET head_event_id = n.event_id, head_seq = n.ordering_seq, last_seq = n.ordering_seq
        FROM nxt n
        WHERE k.endpoint_id = n.endpoint_id AND k.ordering_key = n.ordering_key
    )
    SELECT l.event_id, l.endpoint_id, l.attempts, o.payload::text
    FROM leased l
    LEFT JOIN LATERAL (SELECT x.payload FROM webhook_outbox x WHERE x.id = l.event_id OFFSET 0) o ON true
$$;
