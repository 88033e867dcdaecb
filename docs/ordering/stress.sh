#!/usr/bin/env bash
# The whole protocol under concurrency, in SQL: producers (SERIALIZABLE, several events
# of several keys per transaction) beside dispatchers (claim with the ordered fan-out and
# the claim-side horizon, settle with promotion) that succeed 70%, retry 20%, and end
# dead 10% (`skip` here, so that lines keep moving), and abandon 5% of their leases
# (a crash: the lease of 300 ms runs out and another dispatcher takes the delivery over).
# Two endpoints, each with its own order. A unique index allows one pending (so at most
# one in flight) delivery per (endpoint, key): a second head would fail a statement.
# Then a single session drains everything and the checks run.
# Usage: scripts/with-postgres.sh bash -c 'target/debug/outboxd migrate && bash docs/ordering/stress.sh'
. "$(dirname "$0")/env.sh"
T="${T:-30}"
psqlq -f "$HERE/0013_proto.sql" -f "$HERE/proto-fanout.sql" 2>/dev/null
psqlq <<'SQL'
TRUNCATE webhook_outbox, webhook_deliveries, webhook_ordering_log, webhook_ordering_keys;
DELETE FROM webhook_endpoints;
INSERT INTO webhook_endpoints (url, secret)
SELECT 'http://127.0.0.1:9/' || i, 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw' FROM generate_series(1, 2) i;
CREATE UNIQUE INDEX IF NOT EXISTS stress_one_head
    ON webhook_deliveries (endpoint_id, ordering_key) WHERE state = 'pending';
-- The producer's transaction, for the check of numbers within a transaction.
ALTER TABLE webhook_outbox ADD COLUMN IF NOT EXISTS stress_xact xid8 DEFAULT pg_current_xact_id();
DROP TABLE IF EXISTS received;
CREATE TABLE received (endpoint_id bigint, ordering_key text, seq bigint, event_id bigint,
                       n bigint GENERATED ALWAYS AS IDENTITY);
-- A dispatcher's claim: the ordered fan-out (its fresh heads leased at once), then due
-- heads. Returns its horizon pair for the next call.
CREATE OR REPLACE FUNCTION stress_claim(seen_before bigint, x xid8, worker text)
RETURNS TABLE (seen bigint, xid text) LANGUAGE plpgsql AS $$
DECLARE s bigint; y text;
BEGIN
    SELECT max(f.seen), max(f.xid::text) INTO s, y
    FROM proto_fanout_ordered(ARRAY[seen_before], ARRAY[x], worker, 300, 50) f;
    WITH due AS (
        SELECT d.event_id, d.endpoint_id FROM webhook_deliveries d
        WHERE d.state = 'pending' AND d.next_attempt_at <= now()
        ORDER BY d.next_attempt_at LIMIT 50 FOR UPDATE SKIP LOCKED
    )
    UPDATE webhook_deliveries d
    SET attempts = d.attempts + 1, locked_by = worker,
        locked_until = now() + interval '300 ms', next_attempt_at = now() + interval '300 ms'
    FROM due WHERE d.event_id = due.event_id AND d.endpoint_id = due.endpoint_id;
    RETURN QUERY SELECT coalesce(s, seen_before), coalesce(y, x::text);
END $$;
-- A dispatcher's settle of what it holds: guarded by the lease like webhook_settle, then
-- the promotion.
CREATE OR REPLACE FUNCTION stress_settle(worker text, abandon float8) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE evs bigint[]; eps bigint[];
BEGIN
    WITH mine AS (
        SELECT d.event_id, d.endpoint_id, d.attempts, random() AS r
        FROM webhook_deliveries d
        WHERE d.state = 'pending' AND d.locked_by = worker AND d.locked_until > now()
    ), settled AS (
        UPDATE webhook_deliveries d
        SET state = CASE WHEN m.r < 0.70 THEN 'delivered' WHEN m.r < 0.90 THEN 'pending'
                         ELSE 'dead' END,
            next_attempt_at = now() + interval '5 ms', locked_by = NULL, locked_until = NULL
        FROM mine m
        WHERE d.event_id = m.event_id AND d.endpoint_id = m.endpoint_id
          AND d.locked_by = worker AND d.attempts = m.attempts AND random() >= abandon
        RETURNING d.event_id, d.endpoint_id, d.state, d.ordering_key, d.ordering_seq
    ), got AS (
        INSERT INTO received (endpoint_id, ordering_key, seq, event_id)
        SELECT endpoint_id, ordering_key, ordering_seq, event_id FROM settled
        WHERE state = 'delivered'
    )
    SELECT array_agg(event_id), array_agg(endpoint_id) INTO evs, eps FROM settled;
    IF evs IS NOT NULL THEN
        PERFORM webhook_ordering_advance(evs, eps, 'skip');
    END IF;
END $$;
SQL
W="$(mktemp -d)"
cat >"$W/produce.sql" <<'SQL'
\set a random(1, 200)
\set b random(1, 200)
BEGIN;
INSERT INTO webhook_outbox (event_type, payload, ordering_key)
VALUES ('order.paid', '{}', 'order-' || :a), ('order.paid', '{}', 'order-' || :b);
INSERT INTO webhook_outbox (event_type, payload, ordering_key)
VALUES ('order.shipped', '{}', 'order-' || :a);
END;
SQL
cat >"$W/dispatch.sql" <<'SQL'
SELECT seen, xid FROM stress_claim(:seen, (:xid)::text::xid8, 'w' || :client_id) \gset
SELECT pg_sleep(0.002);
SELECT stress_settle('w' || :client_id, 0.05);
SQL
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
PGOPTIONS='-c default_transaction_isolation=serializable' \
    pgbench "$DB" -n -c 6 -j 1 -T "$T" -R 300 -f "$W/produce.sql" --failures-detailed 2>&1 \
    | grep -E 'processed|failed|aborted|tps' | sed 's/^/producers: /' &
pgbench "$DB" -n -c "${DISPATCHERS:-4}" -j 1 -T "$T" -D seen=0 -D xid=1 -f "$W/dispatch.sql" --failures-detailed --verbose-errors 2>&1 \
    | grep -E 'processed|failed|aborted|tps|ERROR|DETAIL|deadlock|serializ|CONTEXT' | sort | uniq -c | sed 's/^/dispatchers: /'
wait
psqlq <<'SQL'
-- Drain: one dispatcher, everything succeeds, until nothing is left in any line.
DO $$
DECLARE s bigint := 0; x xid8 := '1'; r record; i int := 0;
BEGIN
    LOOP
        SELECT * INTO r FROM stress_claim(s, x, 'drain');
        s := r.seen; x := r.xid::xid8;
        PERFORM stress_settle('drain', 0);
        i := i + 1;
        EXIT WHEN i > 20000 OR NOT EXISTS (
            SELECT 1 FROM webhook_deliveries WHERE state IN ('pending', 'queued'))
            AND NOT EXISTS (SELECT 1 FROM webhook_ordering_log);
        COMMIT;
    END LOOP;
    RAISE NOTICE 'drained in % rounds', i;
END $$;
\pset footer off
SELECT (SELECT count(*) FROM webhook_outbox WHERE ordering_key IS NOT NULL) AS events,
       (SELECT count(*) FROM webhook_deliveries) AS deliveries,
       (SELECT count(*) FROM webhook_deliveries WHERE state = 'delivered') AS delivered,
       (SELECT count(*) FROM webhook_deliveries WHERE state = 'dead') AS dead_skipped,
       (SELECT count(*) FROM webhook_deliveries WHERE state NOT IN ('delivered', 'dead')) AS left_in_line,
       (SELECT count(*) FROM webhook_ordering_keys) AS key_rows_left,
       (SELECT count(DISTINCT ordering_key) FROM webhook_outbox) AS keys;
SELECT count(*) AS events_missing_a_delivery
FROM webhook_outbox o CROSS JOIN webhook_endpoints e
-- outboxd.delivery.dead events (sql/0010) are unordered: not this prototype's fan-out.
WHERE o.ordering_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = o.id AND d.endpoint_id = e.id);
SELECT count(*) AS receipts, count(*) FILTER (WHERE seq < prev) AS out_of_order,
       count(*) FILTER (WHERE seq = prev) AS duplicates
FROM (SELECT seq, lag(seq) OVER (PARTITION BY endpoint_id, ordering_key ORDER BY n) AS prev
      FROM received) r;
-- Commit order: within a producer's transaction, numbers follow insert order.
SELECT count(*) AS transactions_numbered_out_of_insert_order
FROM (SELECT d.event_id, d.ordering_seq,
             lag(d.ordering_seq) OVER (PARTITION BY o.stress_xact ORDER BY o.id) AS prev
      FROM webhook_deliveries d JOIN webhook_outbox o ON o.id = d.event_id
      WHERE d.endpoint_id = (SELECT min(id) FROM webhook_endpoints)) t
WHERE ordering_seq < prev;
SQL
rm -rf "$W"
