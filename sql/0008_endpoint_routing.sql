-- Routing an event to its endpoints by index, so that a delivery's cost does not grow
-- with the endpoints that do not receive it.
--
-- The claim (claim::CLAIM) used to test every event against every endpoint's filters:
-- with 1,000 endpoints each subscribed to its own event type, every claim joined each
-- event with 1,000 endpoints, and sized its fan-out as if each event went to all of
-- them (one event per claim). It now looks up, for each event, the endpoints whose
-- filters contain one of the event type's candidate patterns (the name itself, each
-- `prefix.*` of it, and `*`) in the GIN index below, and the endpoints with no filter
-- in the partial index after it. See docs/claims.md.
--
-- Safe while dispatchers of the previous version run: two new indexes on the small
-- endpoints table, which they do not use. CREATE INDEX (not CONCURRENTLY: migrations
-- run in a transaction) holds a SHARE lock on webhook_endpoints while it builds, which
-- blocks endpoint writes (registration, the settle's failure clock) for the moment the
-- build takes on a table of endpoints, and no reads: claims go on.

-- The filters, for `event_types && <patterns of the event type>`. fastupdate off:
-- endpoints are written rarely (registration, updates, the failure clock's transitions),
-- and entries left in GIN's pending list are scanned linearly by every probe until a
-- vacuum merges them: 1,000 freshly registered endpoints made each probe ~0.1 ms
-- instead of ~0.005 ms. Partial: a removed endpoint gets nothing.
CREATE INDEX IF NOT EXISTS webhook_endpoints_filters_idx
    ON webhook_endpoints USING gin (event_types) WITH (fastupdate = off)
    WHERE deleted_at IS NULL;

-- Endpoints with no filter receive every event: found here, not by the GIN index (an
-- empty array has no element to index). The claim also counts them, with those
-- subscribed to `*`, to bound how many events one claim fans out.
CREATE INDEX IF NOT EXISTS webhook_endpoints_unfiltered_idx
    ON webhook_endpoints (id)
    WHERE deleted_at IS NULL AND cardinality(event_types) = 0;
