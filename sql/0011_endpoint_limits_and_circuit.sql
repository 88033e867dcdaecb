-- Per-endpoint limits and a circuit breaker: one bad endpoint never holds up the others.
--
-- `max_in_flight`: most concurrent requests to the endpoint across all dispatchers.
-- NULL (the default) leaves each dispatcher to its own per-endpoint cap,
-- WEBHOOK_ENDPOINT_MAX_IN_FLIGHT: a slow endpoint can never take all of a dispatcher's
-- send slots either way, and the common case pays for no coordination.
--
-- `rate_limit`: most requests per second across all dispatchers (NULL: none), kept as a
-- token bucket (`rate_tokens` as of `rate_refilled_at`, at most a second's worth) that
-- claims spend under the endpoint's advisory lock (webhook_endpoint_grant below).
--
-- The circuit: `circuit_failures` counts consecutive failures of the kinds that signal
-- an unhealthy consumer (timeouts, connection errors, 5xx). When it reaches the
-- dispatcher's threshold the circuit opens: `circuit_open_until` is set, claims take
-- nothing for the endpoint and spend none of its deliveries' attempts until then. Once
-- it has passed the circuit is half-open: a single probe goes out (`circuit_probe_until`
-- is the probe's lease), a success closes the circuit (both NULL again) and a failure
-- opens it for longer (`circuit_opens` consecutive openings double the interval, up to
-- a cap). A Retry-After on 429/503 opens it for the time asked. Auto-disable (sql/0006)
-- stays as the last resort above it.
--
-- Every column is nullable or has a constant default: adding them rewrites nothing, and
-- dispatchers of the previous version, which do not read them, keep running.
ALTER TABLE webhook_endpoints
    ADD COLUMN IF NOT EXISTS max_in_flight integer CHECK (max_in_flight BETWEEN 1 AND 10000),
    ADD COLUMN IF NOT EXISTS rate_limit integer CHECK (rate_limit BETWEEN 1 AND 100000),
    ADD COLUMN IF NOT EXISTS rate_tokens double precision,
    ADD COLUMN IF NOT EXISTS rate_refilled_at timestamptz,
    ADD COLUMN IF NOT EXISTS circuit_failures integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS circuit_opens integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS circuit_open_until timestamptz,
    ADD COLUMN IF NOT EXISTS circuit_probe_until timestamptz;
