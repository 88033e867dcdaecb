#!/usr/bin/env bash
# What an ordered insert costs a producer, against an unordered one, with pgbench:
#  1. one event per transaction, 16 clients, durable commits (the usual producer);
#  2. 100 events per transaction, 1 client (the trigger's own CPU, per event);
#  3. ordered producers at REPEATABLE READ and SERIALIZABLE (and the database's
#     default_transaction_isolation = serializable), 16 clients on 10 keys: failures.
# Prints pgbench's summary lines. Usage:
#   scripts/with-postgres.sh bash -c 'target/debug/outboxd migrate && bash docs/ordering/producer-cost.sh'
. "$(dirname "$0")/env.sh"
psqlq -f "$HERE/0013_proto.sql" 2>/dev/null
[[ "${VARIANT:-}" == update ]] && psqlq -f "$HERE/update-variant.sql"
T="${T:-15}"
W="$(mktemp -d)"
cat >"$W/unordered.sql" <<'SQL'
INSERT INTO webhook_outbox (event_type, payload) VALUES ('order.paid', '{"order_id": 42}');
SQL
cat >"$W/ordered.sql" <<'SQL'
\set k random(1, :keys)
INSERT INTO webhook_outbox (event_type, payload, ordering_key)
VALUES ('order.paid', '{"order_id": 42}', 'order-' || :k);
SQL
cat >"$W/unordered100.sql" <<'SQL'
INSERT INTO webhook_outbox (event_type, payload)
SELECT 'order.paid', '{"order_id": 42}' FROM generate_series(1, 100);
SQL
cat >"$W/ordered100.sql" <<'SQL'
INSERT INTO webhook_outbox (event_type, payload, ordering_key)
SELECT 'order.paid', '{"order_id": 42}', 'order-' || (i % 1000) FROM generate_series(1, 100) i;
SQL
run() { # label, pgbench args...
    local label="$1"; shift
    psqlq -c "TRUNCATE webhook_outbox, webhook_ordering_log" -c "CHECKPOINT" >/dev/null
    printf '%-34s ' "$label"
    pgbench "$DB" -n "$@" 2>&1 | awk '/^tps|latency average|failed|aborted/ {printf "%s; ", $0} END {print ""}'
}
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
for round in 1 2 3; do
    run "unordered, 1/txn, 16 clients" -c 16 -j 2 -T "$T" -f "$W/unordered.sql"
    run "ordered, 1/txn, 16 clients" -c 16 -j 2 -T "$T" -D keys=1000 -f "$W/ordered.sql"
done
for round in 1 2 3; do
    run "unordered, 100/txn, 1 client" -c 1 -T "$T" -f "$W/unordered100.sql"
    run "ordered, 100/txn, 1 client" -c 1 -T "$T" -f "$W/ordered100.sql"
done
[[ "${VARIANT:-}" == update ]] && psqlq -c "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'webhook_outbox'"
for iso in 'read committed' 'repeatable read' 'serializable'; do
    PGOPTIONS="-c default_transaction_isolation=${iso// /\\ }" \
        run "unordered at $iso" -c 16 -j 2 -T "$T" -f "$W/unordered.sql" --failures-detailed
    PGOPTIONS="-c default_transaction_isolation=${iso// /\\ }" \
        run "ordered at $iso, 10 keys" -c 16 -j 2 -T "$T" -D keys=10 -f "$W/ordered.sql" --failures-detailed
done
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
rm -rf "$W"
