-- Operational events: state changes an operator must hear about become events in the
-- outbox, written by triggers in the transaction that makes the change, so that an
-- event exists if and only if its change committed (a disable rolled back leaves none).
--
--   outboxd.endpoint.disabled  an endpoint stops receiving (an operator's disable, the
--                              automatic disable of a failing endpoint, a 410 Gone);
--                              not when it is removed
--   outboxd.delivery.dead      a delivery ends dead (its attempts spent, a permanent
--                              failure, a payload that cannot be sent)
--
-- They are delivered like any event, but only to endpoints whose filters name them
-- (`outboxd.*`, `outboxd.delivery.*`, an exact type: an endpoint taking every event does
-- not get them, so a consumer never learns of another's endpoint), and never to the
-- endpoint they are about (`about_endpoint_id`, read by the claim). A delivery of an
-- operational event that goes dead makes no further event, so they cannot loop.
--
-- about_endpoint_id is nullable without a default: adding it rewrites nothing, and
-- producers' inserts, which do not name it, are unchanged. Older dispatchers, which do
-- not read it, would send these events to the endpoint they are about as well; nothing
-- is lost.
ALTER TABLE webhook_outbox ADD COLUMN IF NOT EXISTS about_endpoint_id bigint;

-- SECURITY DEFINER for the reason of 0004: the dispatcher's role (or an operator's)
-- needs no INSERT on webhook_outbox for its changes to be announced; the functions name
-- their tables with the migration's schema and pin search_path.
DO $migrate$
BEGIN
    EXECUTE format($function$
        CREATE OR REPLACE FUNCTION %1$I.webhook_announce_endpoint_disabled() RETURNS trigger
        LANGUAGE plpgsql
        SECURITY DEFINER
        SET search_path = pg_catalog, %1$I, pg_temp
        AS $body$
        BEGIN
            INSERT INTO %1$I.webhook_outbox (event_type, payload, about_endpoint_id)
            VALUES ('outboxd.endpoint.disabled',
                    pg_catalog.jsonb_build_object(
                        'endpoint_id', NEW.id,
                        'reason', NEW.disabled_reason,
                        'description', NEW.description),
                    NEW.id);
            RETURN NULL;
        END
        $body$
    $function$, current_schema());

    EXECUTE format($function$
        CREATE OR REPLACE FUNCTION %1$I.webhook_announce_delivery_dead() RETURNS trigger
        LANGUAGE plpgsql
        SECURITY DEFINER
        SET search_path = pg_catalog, %1$I, pg_temp
        AS $body$
        DECLARE
            dead_type text;
        BEGIN
            SELECT o.event_type INTO dead_type
            FROM %1$I.webhook_outbox o WHERE o.id = NEW.event_id;
            -- An operational event's own death is not announced: no loops.
            IF dead_type IS NULL OR pg_catalog.starts_with(dead_type, 'outboxd.') THEN
                RETURN NULL;
            END IF;
            INSERT INTO %1$I.webhook_outbox (event_type, payload, about_endpoint_id)
            VALUES ('outboxd.delivery.dead',
                    pg_catalog.jsonb_build_object(
                        'event_id', NEW.event_id,
                        'endpoint_id', NEW.endpoint_id,
                        'event_type', dead_type,
                        'attempts', NEW.attempts,
                        'last_status', NEW.last_status,
                        'last_error', NEW.last_error),
                    NEW.endpoint_id);
            RETURN NULL;
        END
        $body$
    $function$, current_schema());
END
$migrate$;

-- Row triggers with WHEN: the condition costs a comparison per updated row, and the
-- function runs only on the change itself. `UPDATE OF` keeps the claim's lease updates,
-- which do not set these columns, from even testing the condition.
DROP TRIGGER IF EXISTS webhook_endpoints_announce_disabled ON webhook_endpoints;
CREATE TRIGGER webhook_endpoints_announce_disabled
    AFTER UPDATE OF active ON webhook_endpoints
    FOR EACH ROW
    WHEN (OLD.active AND NOT NEW.active AND NEW.deleted_at IS NULL)
    EXECUTE FUNCTION webhook_announce_endpoint_disabled();

DROP TRIGGER IF EXISTS webhook_deliveries_announce_dead ON webhook_deliveries;
CREATE TRIGGER webhook_deliveries_announce_dead
    AFTER UPDATE OF state ON webhook_deliveries
    FOR EACH ROW
    WHEN (NEW.state = 'dead' AND OLD.state IS DISTINCT FROM 'dead')
    EXECUTE FUNCTION webhook_announce_delivery_dead();
