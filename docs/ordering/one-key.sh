#!/usr/bin/env bash
# The database's share of one key's cycle: claim its head (claim::CLAIM), settle it
# (webhook_settle_outcomes) and promote the next (webhook_ordering_advance), each
# committed on its own as a dispatcher's statements are (synchronous_commit off, as
# on the dispatcher's sessions), KEYS keys with 200 events in line each. No HTTP and no
# wake-up: what is left of a cycle once the receiver answers at once.
# UNORDERED=1: unordered events instead (fan-out and claim in one, settle; no promotion),
# the comparison within the same harness.
# MODE=claim: promotion in the claim instead (claim-promotion.sql).
# HANDOFF=1: the settle leases each key's next to the settling dispatcher and returns
# it (handoff.sql); the claim runs once, for the first heads.
# Usage: scripts/with-postgres.sh bash -c 'target/debug/outboxd migrate && KEYS=1 bash docs/ordering/one-key.sh'
. "$(dirname "$0")/env.sh"
KEYS="${KEYS:-1}"
ROOT="$(cd "$HERE/../.." && pwd)"
psqlq -f "$HERE/0013_proto.sql" -f "$HERE/handoff.sql" 2>/dev/null
# MODE=claim: promotion in the claim (claim-promotion.sql).
if [[ "${MODE:-}" == claim ]]; then psqlq -f "$HERE/claim-promotion.sql" >/dev/null 2>&1; fi
CLAIM="$(python3 "$HERE/claim-sql.py" "$ROOT/src/claim.rs")"

isclaim=false; [[ "${MODE:-}" == claim ]] && isclaim=true
psqlq -v keys="$KEYS" -v unordered="${UNORDERED:-0}" -v isclaim="$isclaim" <<'SQL'
TRUNCATE webhook_outbox, webhook_deliveries, webhook_ordering_log, webhook_ordering_keys, webhook_attempts;
DELETE FROM webhook_endpoints;
INSERT INTO webhook_endpoints (url, secret) VALUES ('http://127.0.0.1:9/', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw');
INSERT INTO webhook_outbox (id, event_type, payload, ordering_key, processed_at)
SELECT i, 'order.paid', '{"order_id": 42}', 'order-' || (i % :keys), now()
FROM generate_series(1, 200 * :keys) i;
INSERT INTO webhook_deliveries (event_id, endpoint_id, state, ordering_key, ordering_seq)
SELECT i, e.id, CASE WHEN i <= :keys THEN 'pending' ELSE 'queued' END, 'order-' || (i % :keys), i
FROM generate_series(1, 200 * :keys) i, webhook_endpoints e;
INSERT INTO webhook_ordering_keys (endpoint_id, ordering_key, head_event_id, head_seq)
SELECT e.id, 'order-' || (i % :keys), i, i FROM generate_series(1, :keys) i, webhook_endpoints e;
-- UNORDERED=1: the same number of unordered events, not fanned out yet, instead.
DELETE FROM webhook_ordering_keys WHERE :unordered = 1;
DELETE FROM webhook_deliveries WHERE :unordered = 1;
UPDATE webhook_outbox SET ordering_key = NULL, processed_at = NULL WHERE :unordered = 1;
\if :isclaim
UPDATE webhook_ordering_keys k SET tail_seq = (SELECT max(ordering_seq) FROM webhook_deliveries d
    WHERE d.endpoint_id = k.endpoint_id AND d.ordering_key = k.ordering_key), last_seq = head_seq;
-- Heads past the first claim's 200 are "in flight elsewhere": the claim of each cycle
-- then finds nothing due, and the lines it serves are the ones this loop settles.
UPDATE webhook_deliveries SET next_attempt_at = now() + interval '1 hour'
WHERE state = 'pending' AND event_id > 200;
\endif
VACUUM ANALYZE;
SQL
echo "load: $(cut -d' ' -f1-3 /proc/loadavg); keys: $KEYS; hand-off: ${HANDOFF:-0}; unordered: ${UNORDERED:-0}; mode: ${MODE:-settle}"
psqlq -v claim="$CLAIM" -v handoff="${HANDOFF:-0}" -v unordered="${UNORDERED:-0}" -v mode="${MODE:-}" <<'SQL'
SELECT format('PREPARE claim(text, int8, int8, int8, int8, int8[], int4[], float8[], int4) AS %s', :'claim') AS prep \gset
:prep;
SELECT set_config('ordering.handoff', :'handoff', false) \g /dev/null
SELECT set_config('ordering.unordered', :'unordered', false) \g /dev/null
SELECT set_config('ordering.mode', :'mode', false) \g /dev/null
SET synchronous_commit = off;
DO $$
DECLARE
    t0 timestamptz := clock_timestamp();
    rounds int := 150;
    evs bigint[]; eps bigint[]; att int[]; n int := 0; r record;
    evs_done bigint[]; eps_done bigint[];
    handoff boolean := current_setting('ordering.handoff') = '1';
    t_claim interval := '0'; t_settle interval := '0'; t_adv interval := '0'; t1 timestamptz;
BEGIN
    FOR i IN 1 .. rounds LOOP
        t1 := clock_timestamp();
        IF current_setting('ordering.mode') = 'claim' AND i > 1 THEN
            -- The claim as a dispatcher would run it (nothing due here), and the
            -- promotion of ready lines that would be one of its CTEs.
            FOR r IN EXECUTE 'EXECUTE claim(''w1'', 60000, 200, 67108864, 4194304, ''{}'', ''{}'', ''{}'', 64)' LOOP
            END LOOP;
            evs := NULL; eps := NULL; att := NULL;
            FOR r IN SELECT * FROM proto_claim_next('w1', 60000, 200) LOOP
                evs := evs || r.event_id; eps := eps || r.endpoint_id; att := att || r.attempt;
            END LOOP;
        ELSIF NOT handoff OR i = 1 THEN
        evs := NULL; eps := NULL; att := NULL;
        -- The prepared statement, planned once as a dispatcher's prepared claim is.
        FOR r IN EXECUTE 'EXECUTE claim(''w1'', 60000, 200, 67108864, 4194304, ''{}'', ''{}'', ''{}'', 64)'
        LOOP
            evs := evs || r.event_id; eps := eps || r.endpoint_id; att := att || r.attempt;
        END LOOP;
        END IF;
        COMMIT;
        t_claim := t_claim + (clock_timestamp() - t1);
        EXIT WHEN evs IS NULL;
        n := n + cardinality(evs);
        evs_done := evs; eps_done := eps;
        t1 := clock_timestamp();
        PERFORM webhook_settle_outcomes('w1', evs, eps, att,
            array_fill('delivered'::text, ARRAY[cardinality(evs)]), array_fill(0::bigint, ARRAY[cardinality(evs)]),
            array_fill(0, ARRAY[cardinality(evs)]), array_fill(200, ARRAY[cardinality(evs)]),
            array_fill(NULL::text, ARRAY[cardinality(evs)]),
            evs, eps, att, array_fill(now(), ARRAY[cardinality(evs)]), array_fill(1, ARRAY[cardinality(evs)]),
            array_fill(200, ARRAY[cardinality(evs)]), '{}'::text[], '{}'::text[], '{}'::text[],
            ARRAY[eps[1]], '{}', '{}', '{}', '{}', '{}', 5, 5000, 300000);
        t_settle := t_settle + (clock_timestamp() - t1);
        t1 := clock_timestamp();
        IF current_setting('ordering.unordered') = '1' THEN
            NULL;
        ELSIF current_setting('ordering.mode') = 'claim' THEN
            PERFORM proto_free_heads(evs_done, eps_done, 'block');
        ELSIF handoff THEN
            -- The next of each key comes back leased, with its payload: no claim.
            evs := NULL; eps := NULL; att := NULL;
            FOR r IN SELECT * FROM proto_ordering_handoff(evs_done, eps_done, 'block', 'w1', 60000) LOOP
                evs := evs || r.event_id; eps := eps || r.endpoint_id; att := att || r.attempt;
            END LOOP;
        ELSE
            PERFORM webhook_ordering_advance(evs, eps, 'block');
        END IF;
        COMMIT;
        t_adv := t_adv + (clock_timestamp() - t1);
    END LOOP;
    RAISE NOTICE 'cycles: %, deliveries: %, per cycle: claim % ms, settle % ms, promotion (with the settle''s commit) % ms, total % ms',
        rounds, n,
        round((extract(epoch FROM t_claim) * 1000 / rounds)::numeric, 3),
        round((extract(epoch FROM t_settle) * 1000 / rounds)::numeric, 3),
        round((extract(epoch FROM t_adv) * 1000 / rounds)::numeric, 3),
        round((extract(epoch FROM clock_timestamp() - t0) * 1000 / rounds)::numeric, 3);
END $$;
SQL
