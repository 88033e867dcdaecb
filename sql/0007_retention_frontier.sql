-- Retention's place in the outbox, so that pruning costs what it prunes.
--
-- A pruning pass used to walk the outbox from its first id, every 30 s, through every
-- event it had to keep (pending, parked, dead within their retention), before reaching
-- anything it could delete: with millions kept, a pass spent its whole budget on them
-- and never reached the expired rows behind. The walk now starts where the last one
-- stopped (`frontier`); what it leaves behind is found by index when it expires (dead
-- deliveries through webhook_deliveries_dead_idx, a removed endpoint's parked ones
-- through webhook_deliveries_parked_idx), and the rest (a delivery that finished long
-- after its event was written, an event fanned out late) by a slow sweep that visits
-- a few thousand events below the frontier per pass (`sweep`). See src/retention.rs.
--
-- One row; a pass locks it (FOR UPDATE SKIP LOCKED) in each of its short transactions,
-- so one dispatcher prunes at a time and the others skip their turn. A new table, read
-- only by the new code: safe to apply while older dispatchers run (they keep walking
-- from the first id, as before).
CREATE TABLE IF NOT EXISTS webhook_retention (
    id       integer PRIMARY KEY CHECK (id = 1),
    -- Every event up to this id has been walked once.
    frontier bigint  NOT NULL DEFAULT 0,
    -- The sweep's place below the frontier; back to 0 when it gets there.
    sweep    bigint  NOT NULL DEFAULT 0
);

INSERT INTO webhook_retention (id) VALUES (1) ON CONFLICT (id) DO NOTHING;
