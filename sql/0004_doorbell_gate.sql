-- A gate in front of the doorbell, so a producer pays almost nothing for the push path.
--
-- Even unrung, the doorbell of 0002 cost every insert statement a PL/pgSQL call and a
-- read of webhook_doorbell: with 16 producers (one event per transaction, pgbench,
-- durability on) that was ~15% of their throughput, more than the push path may take.
-- The trigger now has a WHEN condition that reads one sequence through a C function
-- (pg_sequence_last_value: a lock on the sequence and a share lock on its one buffer),
-- and the PL/pgSQL ring function, with its table read, runs only while the gate is open.
--
-- The gate is a sequence because sequence state is not transactional: a dispatcher's
-- setval is visible to every session at once, without waiting for a commit.
--   open    is_called = false, so pg_sequence_last_value() returns NULL. A fresh
--           sequence starts open, so the gate fails safe: open means "run the ring
--           function", which still decides on the transactional doorbell row.
--   closed  is_called = true.
-- A dispatcher about to sleep arms the doorbell row and opens the gate (one statement,
-- `claim::ARM_DOORBELL`); a dispatcher woken by a notification closes the gate as it
-- makes its next claim (`claim::CLOSE_DOORBELL_GATE`). Producers never write the gate: a ringer
-- that rolled back must leave the bell armed and the gate open for the next producer,
-- which a transactional disarm of the row does and a sequence write would not.
-- A close and an arm exclude each other through the doorbell row: the close locks the
-- row (SKIP LOCKED) and closes only a rung bell, the arm updates the row before it opens
-- the gate. So while any dispatcher sleeps with the bell armed, the gate is open, even
-- if another, awake one closes it late (say after waiting for free send slots). At any
-- moment either the gate is open or some dispatcher is awake and will open it before
-- it sleeps; if that dispatcher dies instead, the poll tick of the others covers the
-- gap, as it covers a lost notification. A dispatcher also tries to close the gate on
-- wake-ups that were not a ring (a retry scheduled by its own settle). Its own bell is
-- still armed then, so the close only reads and the gate stays open: the next insert
-- rings once more, nothing worse.

CREATE SEQUENCE IF NOT EXISTS webhook_doorbell_gate;
-- pg_sequence_last_value() needs SELECT on the sequence, and the WHEN condition runs as
-- the producer's role. The gate reveals nothing, so every role may read it.
GRANT SELECT ON SEQUENCE webhook_doorbell_gate TO PUBLIC;

-- The same ring as in 0002, now SECURITY DEFINER: it runs rarely (only while the gate
-- is open), and producers no longer need privileges on webhook_doorbell. A SECURITY
-- DEFINER function must not resolve names through a path its caller controls: with the
-- migrator's own path, pg_temp would be searched first, and a producer's temporary table
-- or view named webhook_doorbell would run with the owner's rights. So the function is
-- created for the schema the migration runs in (current_schema()), names its table with
-- that schema, and pins search_path to pg_catalog, that schema, then pg_temp last.
DO $migrate$
BEGIN
    EXECUTE format($function$
        CREATE OR REPLACE FUNCTION %1$I.webhook_outbox_ring_doorbell() RETURNS trigger
        LANGUAGE plpgsql
        SECURITY DEFINER
        SET search_path = pg_catalog, %1$I, pg_temp
        AS $body$
        BEGIN
            IF EXISTS (SELECT 1 FROM %1$I.webhook_doorbell WHERE id = 1 AND armed) THEN
                -- SKIP LOCKED: if another producer is ringing right now, it notifies
                -- for us. The row is re-checked after the lock, so a bell disarmed
                -- meanwhile is left.
                PERFORM 1 FROM %1$I.webhook_doorbell WHERE id = 1 AND armed
                    FOR UPDATE SKIP LOCKED;
                IF FOUND THEN
                    UPDATE %1$I.webhook_doorbell SET armed = false WHERE id = 1;
                    PERFORM pg_catalog.pg_notify('outboxd_wakeup', '');
                END IF;
            END IF;
            RETURN NULL;
        END
        $body$
    $function$, current_schema());
END
$migrate$;

-- The WHEN condition of a statement-level trigger is evaluated when the statement ends;
-- while it is false the ring function is never called. The sequence is stored by OID here, so the
-- condition does not depend on the producer's search_path.
DROP TRIGGER IF EXISTS webhook_outbox_notify ON webhook_outbox;
CREATE TRIGGER webhook_outbox_notify
    AFTER INSERT ON webhook_outbox
    FOR EACH STATEMENT
    WHEN (pg_sequence_last_value('webhook_doorbell_gate'::regclass) IS NULL)
    EXECUTE FUNCTION webhook_outbox_ring_doorbell();
