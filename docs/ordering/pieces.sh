#!/usr/bin/env bash
# What an ordered delivery costs PostgreSQL beyond an unordered one, piece by piece, for
# a burst of 20,000 events over 1,000 keys to one endpoint:
#   U  claim::CLAIM fanning out 20,000 fresh unordered events, 200 a claim (each
#      delivery inserted already leased)
#   F  the ordered fan-out (proto_fanout_ordered), 200 events a call: log rows locked
#      and deleted, key rows locked or created, heads inserted leased, the rest queued
#   R  claim::CLAIM taking 200 due heads (the path of every promoted delivery)
#   A  webhook_ordering_advance for 200 ended heads, each promoting its next
#   S  webhook_settle_outcomes for 200 delivered (the settle every delivery pays)
# Prints the total time of each and the time per delivery.
# Usage: scripts/with-postgres.sh bash -c 'target/debug/outboxd migrate && bash docs/ordering/pieces.sh'
. "$(dirname "$0")/env.sh"
ROOT="$(cd "$HERE/../.." && pwd)"
psqlq -f "$HERE/0013_proto.sql" -f "$HERE/proto-fanout.sql" 2>/dev/null
{ printf 'PREPARE claim(text, int8, int8, int8, int8, int8[], int4[], float8[], int4) AS'
  python3 "$HERE/claim-sql.py" "$ROOT/src/claim.rs"; echo ';'; } >"$HERE/.claim.sql"
total() { grep -E '^Time' | awk -v n="$2" -v label="$1" '{t += $2; c++} END {printf "%-44s %4d calls %8.1f ms  %6.1f us/delivery\n", label, c, t, t * 1000 / n}'; }
reset() {
    psqlq <<'SQL'
TRUNCATE webhook_outbox, webhook_deliveries, webhook_ordering_log, webhook_ordering_keys, webhook_attempts;
DELETE FROM webhook_endpoints;
INSERT INTO webhook_endpoints (url, secret) VALUES ('http://127.0.0.1:9/', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw');
SQL
}
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
for round in 1 2 3; do
reset
psqlq -c "INSERT INTO webhook_outbox (event_type, payload) SELECT 'order.paid', '{\"order_id\": 42}' FROM generate_series(1, 20000)" -c "VACUUM ANALYZE webhook_outbox"
psqlq <<SQL | total "U  unordered fan-out + claim" 20000
\i $HERE/.claim.sql
\timing on
$(for i in $(seq 100); do echo "EXECUTE claim('w1', 60000, 200, 67108864, 4194304, '{}', '{}', '{}', 100000) \\g /dev/null"; done)
SQL
psqlq <<SQL | total "S  webhook_settle_outcomes, 200 delivered (rolled back)" 2000
$(for i in $(seq 10); do echo "\\timing off
BEGIN;
SELECT array_agg(event_id) AS evs, array_agg(endpoint_id) AS eps, array_agg(attempts) AS att,
       array_agg('delivered'::text) AS st, array_agg(0::bigint) AS dl, array_agg(0) AS unc,
       array_agg(200) AS code, array_agg(NULL::text) AS err, array_agg(now()) AS at,
       array_agg(1) AS ms
FROM (SELECT * FROM webhook_deliveries WHERE state = 'pending' AND locked_by = 'w1'
      ORDER BY event_id LIMIT 200 OFFSET $((i * 200))) d \\gset
\\timing on
SELECT * FROM webhook_settle_outcomes('w1', :'evs', :'eps', :'att', :'st', :'dl', :'unc', :'code', :'err',
    :'evs', :'eps', :'att', :'at', :'ms', :'code', '{}'::text[], '{}'::text[], '{}'::text[],
    ARRAY[1]::bigint[], '{}', '{}', '{}', '{}', '{}', 5, 5000, 300000) \\g /dev/null
\\timing off
ROLLBACK;"; done)
SQL
reset
psqlq -c "INSERT INTO webhook_outbox (event_type, payload, ordering_key) SELECT 'order.paid', '{\"order_id\": 42}', 'order-' || (i % 1000) FROM generate_series(1, 20000) i" -c "VACUUM ANALYZE webhook_outbox, webhook_ordering_log"
# The first call only records the horizon pair; it is passed on to the next ones.
psqlq -c "SELECT max(seen) AS seen, max(xid::text) AS xid FROM proto_fanout_ordered('{}', '{}', 'w1', 60000, 200)" -t -A -F' ' >"$HERE/.pair"
read -r SEEN XID <"$HERE/.pair"
psqlq <<SQL | total "F  ordered fan-out" 20000
\timing on
$(for i in $(seq 100); do echo "SELECT count(*) FROM proto_fanout_ordered(ARRAY[$SEEN]::int8[], ARRAY['$XID']::xid8[], 'w1', 60000, 200) \\g /dev/null"; done)
SQL
psqlq -t -A -c "SELECT 'after F: ' || string_agg(state || ' ' || n, ', ') FROM (SELECT state, count(*) n FROM webhook_deliveries GROUP BY state) s" -c "VACUUM ANALYZE webhook_deliveries, webhook_ordering_keys"
psqlq -c "UPDATE webhook_deliveries SET locked_by = NULL, locked_until = NULL, attempts = 0, next_attempt_at = now() - interval '1 s' WHERE state = 'pending'" -c "VACUUM ANALYZE webhook_deliveries"
psqlq <<SQL | total "R  claim of 200 due heads (rolled back)" 2000
\\i $HERE/.claim.sql
$(for i in $(seq 10); do echo "\\timing off
BEGIN;
\\timing on
EXECUTE claim('w1', 60000, 200, 67108864, 4194304, '{}', '{}', '{}', 100000) \\g /dev/null
\\timing off
ROLLBACK;"; done)
SQL
psqlq <<SQL | total "A  promotion of the next, 200 heads (rolled back)" 2000
\\timing off
$(for i in $(seq 10); do echo "BEGIN;
SELECT array_agg(event_id) AS evs, array_agg(endpoint_id) AS eps FROM (SELECT event_id, endpoint_id FROM webhook_deliveries WHERE state = 'pending' ORDER BY event_id LIMIT 200) s \\gset
UPDATE webhook_deliveries SET state = 'delivered', locked_by = NULL WHERE event_id = ANY (:'evs'::bigint[]);
\\timing on
SELECT webhook_ordering_advance(:'evs'::bigint[], :'eps'::bigint[], 'block') \\g /dev/null
\\timing off
ROLLBACK;"; done)
SQL
done
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
rm -f "$HERE/.claim.sql" "$HERE/.pair"
