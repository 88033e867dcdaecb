-- Routing an event to its endpoints by index once there are many endpoints, so that a
-- delivery's cost does not grow with the endpoints that do not receive it (issue 16).
--
-- With a handful of endpoints the claim (claim::CLAIM) joins each event with each
-- endpoint and tests the filters in place: nothing is cheaper for a few. Past 16
-- endpoints (the claim's `mode`) it looks up, for each distinct event type among the
-- events it fans out, the endpoints whose filters hold one of the patterns that match
-- that type (the name itself, `*`, and each `prefix.*` ending at one of its dots) in the
-- GIN index below, and the endpoints with no filter in the partial index after it; and
-- it sizes the claim by the deliveries those lookups really make instead of assuming
-- every event goes to every endpoint.
--
-- Safe while dispatchers of the previous version run: three new indexes on the small
-- endpoints table, which they do not use. CREATE INDEX (not CONCURRENTLY: migrations
-- run in a transaction) holds a SHARE lock on webhook_endpoints while it builds: endpoint
-- writes (registration, updates, the settle's circuit and failure clock) wait for the
-- moment the build takes on a table of endpoints (~10 ms for 10,000); claims, which only
-- read it, go on.

-- The filters, for `event_types && <patterns of an event type>`. fastupdate off:
-- endpoints are written rarely, and entries left in GIN's pending list are scanned
-- linearly by every probe until a vacuum merges them (1,000 freshly registered endpoints
-- would make each lookup read all 1,000). Partial: a removed endpoint gets nothing.
CREATE INDEX IF NOT EXISTS webhook_endpoints_filters_idx
    ON webhook_endpoints USING gin (event_types) WITH (fastupdate = off)
    WHERE deleted_at IS NULL;

-- Endpoints with no filter receive every event (but outboxd's own): found here, since
-- an empty array has nothing for the GIN index to hold. The routed claim also counts
-- them, with those subscribed to `*`, to bound how many events it considers at once.
CREATE INDEX IF NOT EXISTS webhook_endpoints_unfiltered_idx
    ON webhook_endpoints (id)
    WHERE deleted_at IS NULL AND cardinality(event_types) = 0;

-- The endpoints that need the full claim's limits (a `max_in_flight`, a `rate_limit`, a
-- circuit that is not closed): while there are none, a dispatcher claims with the
-- smaller statement claim::CLAIM_FAST, and claim::CLAIM checks it on every claim. Empty
-- in the common case, so the check reads nothing however many endpoints there are.
CREATE INDEX IF NOT EXISTS webhook_endpoints_limited_idx
    ON webhook_endpoints (id)
    WHERE deleted_at IS NULL
      AND (max_in_flight IS NOT NULL OR rate_limit IS NOT NULL
           OR circuit_open_until IS NOT NULL);
