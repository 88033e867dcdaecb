#!/usr/bin/env bash
# The claim with 1,000,000 ordered deliveries in line for one endpoint: KEYS heads pending
# (due now), the rest queued. The claim statement is claim::CLAIM as it is in src/claim.rs
# (its ordered fan-out part adds nothing here: the log of events waiting for fan-out is
# empty). Prints the plan (EXPLAIN ANALYZE, BUFFERS) and the claim time over 20 runs,
# each rolled back so that every run finds the same rows.
# REST=delivered makes the 999,000 history instead, for comparison.
# Usage: scripts/with-postgres.sh bash -c 'target/debug/outboxd migrate && KEYS=1000 bash docs/ordering/claim-cost.sh'
. "$(dirname "$0")/env.sh"
KEYS="${KEYS:-1000}"
ROOT="$(cd "$HERE/../.." && pwd)"
psqlq -f "$HERE/0013_proto.sql" 2>/dev/null
{ printf 'PREPARE claim(text, int8, int8, int8, int8, int8[], int4[], float8[], int4) AS'
  python3 "$HERE/claim-sql.py" "$ROOT/src/claim.rs"; echo ';'; } >"$HERE/.claim.sql"
echo "load: $(cut -d' ' -f1-3 /proc/loadavg); keys: $KEYS"
# REST=delivered: the same rows as history instead of a line (the comparison).
psqlq -v keys="$KEYS" -v rest="${REST:-queued}" <<'SQL'
TRUNCATE webhook_outbox, webhook_deliveries, webhook_ordering_log, webhook_ordering_keys;
DELETE FROM webhook_endpoints;
INSERT INTO webhook_endpoints (url, secret) VALUES ('http://127.0.0.1:9/', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw');
INSERT INTO webhook_outbox (id, event_type, payload, ordering_key, processed_at)
SELECT i, 'order.paid', '{"order_id": 42}', 'order-' || (i % :keys), now()
FROM generate_series(1, 1000000) i;
INSERT INTO webhook_deliveries (event_id, endpoint_id, state, ordering_key, ordering_seq)
SELECT i, e.id, CASE WHEN i <= :keys THEN 'pending' ELSE :'rest' END,
       'order-' || (i % :keys), i
FROM generate_series(1, 1000000) i, webhook_endpoints e;
INSERT INTO webhook_ordering_keys (endpoint_id, ordering_key, head_event_id, head_seq)
SELECT e.id, 'order-' || (i % :keys), i, i
FROM generate_series(1, :keys) i, webhook_endpoints e;
VACUUM ANALYZE webhook_outbox, webhook_deliveries, webhook_ordering_keys;
SELECT state, count(*) FROM webhook_deliveries GROUP BY state ORDER BY state;
SELECT relname, pg_size_pretty(pg_relation_size(oid)) FROM pg_class
WHERE relname IN ('webhook_deliveries_due_idx', 'webhook_deliveries_queued_idx', 'webhook_deliveries_pkey');
SQL
PLAN="${PLAN:-/dev/stdout}"
psqlq <<SQL >"$PLAN"
\i $HERE/.claim.sql
BEGIN;
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF)
EXECUTE claim('w1', 60000, 200, 67108864, 4194304, '{}', '{}', '{}', 64);
ROLLBACK;
SQL
psqlq <<SQL | grep -E '^Time' | awk 'NR % 3 == 2 {print $2}' | sort -n | awk '{a[NR]=$1} END {printf "claim of 200 heads, 20 runs: min %.2f ms, median %.2f ms, max %.2f ms\n", a[1], a[int((NR+1)/2)], a[NR]}'
\i $HERE/.claim.sql
\timing on
$(for i in $(seq 20); do echo "BEGIN; EXECUTE claim('w1', 60000, 200, 67108864, 4194304, '{}', '{}', '{}', 64) \\g /dev/null
ROLLBACK;"; done)
SQL
rm -f "$HERE/.claim.sql"
