#!/usr/bin/env bash
# The race between the fan-out (a claim queuing a key's next event) and the settle
# (ending the key's head and promoting the next), step by step with two sessions
# (dblink), both ways round, and the one-statement settle that loses a key's line.
# Usage: scripts/with-postgres.sh bash -c 'target/debug/outboxd migrate && bash docs/ordering/race.sh'
. "$(dirname "$0")/env.sh"
psqlq -f "$HERE/0013_proto.sql" -f "$HERE/proto-fanout.sql" 2>/dev/null
psqlq -v db="$DB" <<'SQL' 2>&1 | grep -v '^$'
\pset footer off
CREATE EXTENSION IF NOT EXISTS dblink;
-- The wrong settle: one statement decides on its own snapshot, taken before the wait.
CREATE OR REPLACE FUNCTION proto_advance_one_statement(ev bigint, ep bigint) RETURNS void
LANGUAGE sql AS $$
    WITH next AS (
        SELECT d.event_id FROM webhook_deliveries d, webhook_ordering_keys k
        WHERE k.endpoint_id = ep AND k.head_event_id = ev AND d.state = 'queued'
          AND d.endpoint_id = ep AND d.ordering_key = k.ordering_key
        ORDER BY d.ordering_seq LIMIT 1
    ), promoted AS (
        UPDATE webhook_deliveries d SET state = 'pending' FROM next
        WHERE d.event_id = next.event_id AND d.endpoint_id = ep
    )
    DELETE FROM webhook_ordering_keys k
    WHERE k.endpoint_id = ep AND k.head_event_id = ev AND NOT EXISTS (SELECT 1 FROM next)
$$;
TRUNCATE webhook_outbox, webhook_deliveries, webhook_ordering_log, webhook_ordering_keys;
DELETE FROM webhook_endpoints;
INSERT INTO webhook_endpoints (url, secret) VALUES ('http://127.0.0.1:9/', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw');
SELECT id AS ep FROM webhook_endpoints \gset
-- "Every pair usable": the horizon is shown by horizon.sh; here only the race matters.
\set pairs 'ARRAY[9223372036854775807]::int8[], ARRAY[''1'']::xid8[]'
DROP VIEW IF EXISTS line;
CREATE VIEW line AS
    SELECT d.event_id, d.state, d.ordering_seq, d.locked_by,
           (k.head_event_id = d.event_id) AS is_head_of_key_row
    FROM webhook_deliveries d
    LEFT JOIN webhook_ordering_keys k USING (endpoint_id, ordering_key)
    ORDER BY d.ordering_seq;
CREATE OR REPLACE FUNCTION deliver(ev bigint) RETURNS text LANGUAGE sql AS $$
    UPDATE webhook_deliveries SET state = 'delivered', locked_by = NULL, locked_until = NULL
    WHERE event_id = ev AND locked_by = 'w1' RETURNING 'delivered ' || ev
$$;
CREATE OR REPLACE FUNCTION enqueue() RETURNS bigint LANGUAGE sql AS $$
    INSERT INTO webhook_outbox (event_type, payload, ordering_key)
    VALUES ('order.paid', '{"order_id": 42}', 'order-42') RETURNING id
$$;

SELECT enqueue() AS e1 \gset
SELECT event_id, state FROM proto_fanout_ordered(:pairs, 'w1', 60000, 100);
\echo '--- A. the settle waits for the fan-out'
SELECT dblink_connect('f', :'db') \g /dev/null
SELECT dblink_connect('s', :'db') \g /dev/null
SELECT enqueue() AS e2 \gset
SELECT dblink_exec('f', 'BEGIN') \g /dev/null
SELECT * FROM dblink('f', format('SELECT event_id, state FROM proto_fanout_ordered(%s, %L, 60000, 100)',
                                 :'pairs', 'w1')) AS t(event_id bigint, fanned_out_as text);
SELECT dblink_exec('s', 'BEGIN') \g /dev/null
SELECT * FROM dblink('s', format('SELECT deliver(%s)', :e1)) AS t(settle text);
SELECT dblink_send_query('s', format('SELECT webhook_ordering_advance(ARRAY[%s], ARRAY[%s], %L)', :e1, :ep, 'block')) \g /dev/null
SELECT pg_sleep(0.3) \g /dev/null
SELECT wait_event_type, wait_event, left(query, 40) AS settle_waits FROM pg_stat_activity
WHERE query LIKE 'SELECT webhook_ordering_advance%';
SELECT dblink_exec('f', 'COMMIT') \g /dev/null
SELECT * FROM dblink_get_result('s') AS t(promoted bigint);
SELECT * FROM dblink_get_result('s') AS t(x text) \g /dev/null
SELECT dblink_exec('s', 'COMMIT') \g /dev/null
SELECT * FROM line;

\echo '--- B. the fan-out waits for the settle, which empties the line'
UPDATE webhook_deliveries SET locked_by = 'w1', attempts = 1 WHERE event_id = :e2;
SELECT dblink_exec('s', 'BEGIN') \g /dev/null
SELECT * FROM dblink('s', format('SELECT deliver(%s)', :e2)) AS t(settle text);
SELECT * FROM dblink('s', format('SELECT webhook_ordering_advance(ARRAY[%s], ARRAY[%s], %L)', :e2, :ep, 'block')) AS t(promoted bigint);
SELECT enqueue() AS e3 \gset
SELECT dblink_exec('f', 'BEGIN') \g /dev/null
SELECT dblink_send_query('f', format('SELECT event_id, state FROM proto_fanout_ordered(%s, %L, 60000, 100)', :'pairs', 'w1')) \g /dev/null
SELECT pg_sleep(0.3) \g /dev/null
SELECT wait_event_type, wait_event, left(query, 40) AS fanout_waits FROM pg_stat_activity
WHERE query LIKE 'SELECT event_id, state FROM proto_fanout%';
SELECT dblink_exec('s', 'COMMIT') \g /dev/null
SELECT * FROM dblink_get_result('f') AS t(event_id bigint, fanned_out_as text);
SELECT * FROM dblink_get_result('f') AS t(x text) \g /dev/null
SELECT dblink_exec('f', 'COMMIT') \g /dev/null
SELECT * FROM line;

\echo '--- C. A again with the one-statement settle: the line loses its head'
SELECT enqueue() AS e4 \gset
SELECT dblink_exec('f', 'BEGIN') \g /dev/null
SELECT * FROM dblink('f', format('SELECT event_id, state FROM proto_fanout_ordered(%s, %L, 60000, 100)',
                                 :'pairs', 'w1')) AS t(event_id bigint, fanned_out_as text);
SELECT dblink_exec('s', 'BEGIN') \g /dev/null
SELECT * FROM dblink('s', format('SELECT deliver(%s)', :e3)) AS t(settle text);
SELECT dblink_send_query('s', format('SELECT proto_advance_one_statement(%s, %s)', :e3, :ep)) \g /dev/null
SELECT pg_sleep(0.3) \g /dev/null
SELECT dblink_exec('f', 'COMMIT') \g /dev/null
SELECT * FROM dblink_get_result('s') AS t(r text) \g /dev/null
SELECT * FROM dblink_get_result('s') AS t(x text) \g /dev/null
SELECT dblink_exec('s', 'COMMIT') \g /dev/null
SELECT * FROM line;
SELECT count(*) AS key_rows FROM webhook_ordering_keys;
SELECT dblink_disconnect('f'), dblink_disconnect('s') \g /dev/null
SQL
