-- Operations: secret rotation, endpoint health, re-drive, and the indexes the admin
-- views need. Forward-only and safe to apply while dispatchers run: every statement
-- adds a nullable or defaulted column (no table rewrite) or builds a small index.

-- Secret rotation: during the grace period deliveries carry a signature from the old
-- secret beside the new one, so consumers can switch without a gap.
ALTER TABLE webhook_endpoints ADD COLUMN IF NOT EXISTS previous_secret text;
ALTER TABLE webhook_endpoints ADD COLUMN IF NOT EXISTS previous_secret_expires_at timestamptz;

-- When the endpoint's current run of failures began; NULL while it is healthy. Set on
-- the first failure after a success, cleared by any success, so writes happen only on
-- transitions. An endpoint failing for WEBHOOK_ENDPOINT_DISABLE_AFTER_HOURS is disabled.
ALTER TABLE webhook_endpoints ADD COLUMN IF NOT EXISTS failing_since timestamptz;

-- Attempts counted before the last re-drive: a re-driven delivery gets a fresh retry
-- budget (attempts - attempt_base) while attempt numbers stay unique in the history.
ALTER TABLE webhook_deliveries ADD COLUMN IF NOT EXISTS attempt_base integer NOT NULL DEFAULT 0;

-- Dead deliveries are listed, counted and re-driven by operators. Partial: dead rows
-- are few, and a delivery only gets an entry here when it dies.
CREATE INDEX IF NOT EXISTS webhook_deliveries_dead_idx
    ON webhook_deliveries (endpoint_id, updated_at)
    WHERE state = 'dead';

-- "Attempts in the last hour" (stats, per-endpoint failure rates) without a full scan.
-- BRIN: attempts are appended in time order, so a block-range summary finds recent rows
-- at a tiny fraction of a btree's insert cost on the hot path.
CREATE INDEX IF NOT EXISTS webhook_attempts_started_brin
    ON webhook_attempts USING brin (started_at);
