#!/usr/bin/env bash
# What a long-running unrelated transaction costs ordered events: the claim-side horizon
# waits for every transaction holding an xid older than the claim that saw the event.
# A session opens a transaction, then an ordered event is committed and a "dispatcher"
# runs the ordered fan-out every 5 ms (passing on its latest pair) until the event goes.
# The session ends after HOLD seconds. Three kinds of session: one that wrote (holds an
# xid), one that only read at REPEATABLE READ (a snapshot, no xid), and none.
# Usage: scripts/with-postgres.sh bash -c 'target/debug/outboxd migrate && bash docs/ordering/long-transaction.sh'
. "$(dirname "$0")/env.sh"
HOLD="${HOLD:-2}"
psqlq -f "$HERE/0013_proto.sql" -f "$HERE/proto-fanout.sql" 2>/dev/null
for kind in writer reader none; do
PGOPTIONS="-c lt.kind=$kind" psqlq -v db="$DB" -v kind="$kind" -v hold="$HOLD" <<'SQL' 2>&1 | grep -E 'NOTICE|ERROR' | grep -v dblink | sed 's/NOTICE:  //'
CREATE EXTENSION IF NOT EXISTS dblink;
TRUNCATE webhook_outbox, webhook_deliveries, webhook_ordering_log, webhook_ordering_keys;
DELETE FROM webhook_endpoints;
INSERT INTO webhook_endpoints (url, secret) VALUES ('http://127.0.0.1:9/', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw');
SELECT dblink_connect('l', :'db') \g /dev/null
SELECT CASE :'kind'
       WHEN 'writer' THEN dblink_exec('l', 'BEGIN; CREATE TEMP TABLE held (a int)')
       WHEN 'reader' THEN dblink_exec('l', 'BEGIN ISOLATION LEVEL REPEATABLE READ; '
                                          'DO $r$ BEGIN PERFORM count(*) FROM webhook_outbox; END $r$')
       ELSE 'none' END \g /dev/null
SELECT CASE WHEN :'kind' <> 'none'
            THEN dblink_send_query('l', format('SELECT pg_sleep(%s); COMMIT', :'hold')) END \g /dev/null
INSERT INTO webhook_outbox (event_type, payload, ordering_key) VALUES ('order.paid', '{}', 'order-42');
DO $$
DECLARE
    t0 timestamptz := clock_timestamp(); s bigint[] := '{}'; x xid8[] := '{}'; r record;
    claims int := 0; done boolean := false;
BEGIN
    WHILE NOT done AND clock_timestamp() - t0 < interval '30 s' LOOP
        claims := claims + 1;
        FOR r IN SELECT * FROM proto_fanout_ordered(s, x, 'w1', 60000, 200) LOOP
            done := done OR r.event_id IS NOT NULL;
            IF r.seen IS NOT NULL THEN s := s || r.seen; x := x || r.xid; END IF;
        END LOOP;
        COMMIT;
        IF NOT done THEN PERFORM pg_sleep(0.005); END IF;
    END LOOP;
    RAISE NOTICE '%: fanned out after % ms, % claims', current_setting('lt.kind'),
        round(extract(epoch FROM clock_timestamp() - t0)::numeric * 1000, 1), claims;
END $$;
SELECT dblink_disconnect('l') \g /dev/null
SQL
done
