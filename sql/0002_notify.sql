-- The push path: wake a sleeping dispatcher when an event is committed, without
-- making producers pay for it.
--
-- A transaction that calls NOTIFY takes one cluster-wide lock at commit
-- (PreCommit_Notify in PostgreSQL's async.c) and holds it through its commit, so
-- notifying commits are serialized. An unconditional notify trigger caps a crowd of
-- producers at a fraction of their rate. Instead the trigger rings a doorbell:
--
--   * a dispatcher about to sleep arms the doorbell (armed = true), then looks for
--     work again at once and a few more times over the next ~100 ms, so nothing
--     committed around the arm is missed;
--   * the first producer to find it armed disarms it and notifies; every other
--     producer skips the row (SKIP LOCKED) or finds it disarmed, and pays only for
--     reading one tiny row;
--   * a producer whose transaction read the doorbell before the dispatcher armed it
--     but commits after the dispatcher's last look (~100 ms) is caught by the poll tick, which
--     always remains (as it must anyway: notifications are lost while a listener is
--     disconnected).
--
-- The payload is constant, so PostgreSQL folds repeated notifications within one
-- transaction, and the trigger is statement-level, so a bulk insert costs at most one.

CREATE TABLE IF NOT EXISTS webhook_doorbell (
    id    integer PRIMARY KEY CHECK (id = 1),
    armed boolean NOT NULL
);
INSERT INTO webhook_doorbell (id, armed) VALUES (1, false) ON CONFLICT (id) DO NOTHING;

CREATE OR REPLACE FUNCTION webhook_outbox_ring_doorbell() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    -- Cheap unlocked read first: when nobody sleeps (the common case under load)
    -- the producer takes no row lock at all.
    IF EXISTS (SELECT 1 FROM webhook_doorbell WHERE id = 1 AND armed) THEN
        -- SKIP LOCKED: if another producer is ringing right now, it notifies for us.
        -- The row is re-checked after the lock, so a bell disarmed meanwhile is left.
        PERFORM 1 FROM webhook_doorbell WHERE id = 1 AND armed FOR UPDATE SKIP LOCKED;
        IF FOUND THEN
            UPDATE webhook_doorbell SET armed = false WHERE id = 1;
            PERFORM pg_notify('outboxd_wakeup', '');
        END IF;
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS webhook_outbox_notify ON webhook_outbox;
CREATE TRIGGER webhook_outbox_notify
    AFTER INSERT ON webhook_outbox
    FOR EACH STATEMENT
    EXECUTE FUNCTION webhook_outbox_ring_doorbell();
