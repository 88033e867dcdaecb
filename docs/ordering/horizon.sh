#!/usr/bin/env bash
# Which horizon makes "fan out an ordered event only once every transaction that may
# have drawn a smaller number has ended" hold? Two producers of one key, at each
# isolation level: A writes first (smaller xid), B second; B draws its number at commit
# and then sits in its pre-commit (a user's slower deferred trigger, 3 s); A draws after
# B and commits. B's event (number 1) is still invisible: nothing drawn after it may go.
#   rule P  producer records pg_snapshot_xmax(pg_current_snapshot()) at its draw,
#           eligible once the claim's pg_snapshot_xmin reaches it   (the first idea)
#   rule X  a claim records the largest number it sees and its snapshot's xmax
#   rule C  a claim records the largest number it sees and its own xid (assigned after
#           its snapshot); eligible once a later claim's xmin is past that xid (chosen)
# pg_snapshot_xmax is latestCompletedXid + 1, not the next xid to be assigned: a
# transaction that got its xid earlier and is still running is above it, and neither
# listed in xip nor counted in xmin. P and X fail at every level; C holds.
# Usage: scripts/with-postgres.sh bash docs/ordering/horizon.sh
. "$(dirname "$0")/env.sh"
psqlq <<'SQL'
CREATE EXTENSION IF NOT EXISTS dblink;
DROP TABLE IF EXISTS h_events;
DROP FUNCTION IF EXISTS h_draw(), h_slow();
DROP SEQUENCE IF EXISTS h_seq;
CREATE SEQUENCE h_seq;
CREATE TABLE h_events (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                       k text NOT NULL, seq bigint, horizon xid8, slow boolean DEFAULT false);
CREATE FUNCTION h_draw() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE h_events SET seq = nextval('h_seq'),
                        horizon = pg_snapshot_xmax(pg_current_snapshot())
    WHERE id = NEW.id;
    RETURN NULL;
END $$;
CREATE FUNCTION h_slow() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(3); RETURN NULL; END $$;
-- Deferred triggers on one row fire in name order: a_draw, then the user's z_slow.
CREATE CONSTRAINT TRIGGER a_draw AFTER INSERT ON h_events DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION h_draw();
CREATE CONSTRAINT TRIGGER z_slow AFTER INSERT ON h_events DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (NEW.slow) EXECUTE FUNCTION h_slow();
SQL
for iso in 'read committed' 'repeatable read' 'serializable'; do
psqlq -v iso="$iso" -v db="$DB" <<'SQL' | grep -v '^$'
\pset footer off
\set QUIET on
TRUNCATE h_events;
SELECT dblink_connect('a', :'db') \g /dev/null
SELECT dblink_connect('b', :'db') \g /dev/null
\echo '==== producers at' :iso
SELECT dblink_exec('a', 'BEGIN ISOLATION LEVEL ' || :'iso') \g /dev/null
SELECT dblink_exec('a', $$INSERT INTO h_events (k) VALUES ('order-42')$$) \g /dev/null
SELECT dblink_exec('b', 'BEGIN ISOLATION LEVEL ' || :'iso') \g /dev/null
SELECT dblink_exec('b', $$INSERT INTO h_events (k, slow) VALUES ('order-42', true)$$) \g /dev/null
SELECT * FROM dblink('a', 'SELECT pg_current_xact_id()::text') AS a(xid_a text),
              dblink('b', 'SELECT pg_current_xact_id()::text') AS b(xid_b text);
SELECT dblink_send_query('b', 'COMMIT') \g /dev/null
SELECT pg_sleep(0.5) \g /dev/null
SELECT dblink_exec('a', 'COMMIT') \g /dev/null
\echo 'claim 1 (B is still in its commit; only A''s event, number 2, is visible):'
BEGIN;
SELECT max(seq) AS seen, max(horizon) AS p_horizon,
       pg_snapshot_xmax(pg_current_snapshot()) AS x_pair, pg_current_snapshot() AS snap
FROM h_events \gset
SELECT pg_current_xact_id() AS c_pair \gset
COMMIT;
SELECT :'seen' AS seen, :'snap' AS claim1_snapshot, :'p_horizon' AS p_horizon,
       :'x_pair' AS x_pair, :'c_pair' AS c_pair;
\echo 'claim 2, right after (B still committing): may number 2 go?'
SELECT pg_current_snapshot() AS claim2_snapshot,
       :'p_horizon'::xid8 <= pg_snapshot_xmin(pg_current_snapshot()) AS rule_p,
       :'x_pair'::xid8 <= pg_snapshot_xmin(pg_current_snapshot()) AS rule_x,
       :'c_pair'::xid8 < pg_snapshot_xmin(pg_current_snapshot()) AS rule_c,
       (SELECT count(*) FROM h_events) AS visible_events;
SELECT * FROM dblink_get_result('b') AS t(r text) \g /dev/null
SELECT dblink_disconnect('a'), dblink_disconnect('b') \g /dev/null
\echo 'claim 3, after B committed:'
SELECT :'c_pair'::xid8 < pg_snapshot_xmin(pg_current_snapshot()) AS rule_c,
       (SELECT string_agg(seq::text, ',' ORDER BY seq) FROM h_events) AS visible_numbers;
SQL
done
