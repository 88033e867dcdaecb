-- The variant measured and rejected (docs/ordering.md, "producer cost"): the trigger
-- writes the number into the producer's own outbox row. Applied over 0013_proto.sql by
-- producer-cost.sh VARIANT=update.
ALTER TABLE webhook_outbox ADD COLUMN IF NOT EXISTS ordering_seq bigint;
CREATE INDEX IF NOT EXISTS webhook_outbox_ordered_idx
    ON webhook_outbox (ordering_key)
    WHERE processed_at IS NULL AND ordering_key IS NOT NULL;
CREATE OR REPLACE FUNCTION webhook_outbox_draw_ordering_seq() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $body$
BEGIN
    UPDATE webhook_outbox SET ordering_seq = nextval('webhook_ordering_seq')
    WHERE id = NEW.id AND ordering_seq IS NULL;
    RETURN NULL;
END
$body$;
