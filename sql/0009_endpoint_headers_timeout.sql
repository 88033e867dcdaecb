-- Per-endpoint request settings: static headers and a timeout override.
--
-- `headers` is a JSON array of {"name": ..., "value": ...} objects, sent with every
-- request to the endpoint in this order (a name may repeat, as HTTP allows). The
-- values are secret-like (an API key the consumer demands): outboxd reads them only in
-- the claim, never in an endpoint view. Names and values are validated at
-- registration (src/endpoint.rs); the CHECK only keeps the shape, so that a row
-- written by hand cannot make the claim fail (a bad header makes its deliveries dead
-- with the reason instead).
--
-- `timeout_ms` overrides WEBHOOK_HTTP_TIMEOUT_MS for this endpoint; NULL uses it. A
-- dispatcher caps it below its lease (src/deliver.rs).
--
-- Both columns have constant defaults: adding them rewrites nothing, and dispatchers
-- of the previous version, which do not read them, keep running.
ALTER TABLE webhook_endpoints
    ADD COLUMN IF NOT EXISTS headers jsonb NOT NULL DEFAULT '[]'
        CHECK (jsonb_typeof(headers) = 'array'),
    ADD COLUMN IF NOT EXISTS timeout_ms integer
        CHECK (timeout_ms BETWEEN 1 AND 3600000);
