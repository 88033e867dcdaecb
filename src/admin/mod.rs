//! The admin HTTP API: endpoints, events, deliveries, re-drive, blocked ordered keys and
//! statistics over JSON, described by the OpenAPI 3.0 document `docs/openapi.json`
//! (served at `GET /openapi.json`).
//!
//! Guarantees:
//!
//! * **Every** request, to a route or not, needs `Authorization: Bearer <token>`, checked
//!   in constant time. Without it the answer is 401 with the error body and nothing
//!   that tells whether the route exists; with it an unknown path is a JSON 404 and a
//!   wrong method a JSON 405.
//! * Every error is `{"error": {"code": "...", "message": "..."}}`.
//!   Malformed input (a body, query parameter or path that does not parse or validate)
//!   is 400 `invalid_input`, never a 500; a missing row is 404 `not_found`; a request
//!   that does not fit the current state (retrying a delivery that is not dead, testing
//!   a disabled endpoint, replaying an event not yet fanned out, re-driving or
//!   discarding the head of an ordered key that is not blocked) is 409 `conflict`;
//!   database and pool failures are 500 `internal` with a generic message, the detail
//!   going to the log.
//! * Nothing is logged from request bodies, secrets or payloads. An endpoint's secret
//!   appears in a response only when it is created or rotated.
//! * The routes are exactly [`ROUTES`], and `docs/openapi.json` describes exactly
//!   those (checked by the integration tests).
//! * The document is the contract for input: a request it describes as valid is never
//!   refused as malformed, and every other request is a 400 (or a 413 past
//!   [`MAX_BODY_BYTES`], which no valid body reaches). The unit tests of the input
//!   checks and a schemathesis run in the integration tests hold the two together.
//!
//! The API is meant for a loopback or private address: it can read every payload and
//! re-send any event.

mod error;
mod handlers;
mod input;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter, on};
use hmac::{Hmac, Mac};
use rand::RngCore as _;
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

pub(crate) use error::ApiError;

use crate::db::Pool;

/// What the admin API needs.
#[derive(Clone)]
pub struct AdminState {
    /// Connections for the queries; a small pool such as [`crate::db::admin_pool`].
    pub pool: Pool,
    /// The bearer token every request must carry, compared exactly (build the state
    /// with [`AdminState::new`], which drops surrounding whitespace). An empty token
    /// refuses every request.
    pub token: Arc<str>,
    /// After a secret rotation, how long the previous secret keeps signing beside the
    /// new one.
    pub rotation_grace: Duration,
}

impl AdminState {
    /// Bundles the state. Surrounding whitespace is not part of the token (a token read
    /// from a file usually ends in a newline that no client sends).
    pub fn new(pool: Pool, token: impl Into<Arc<str>>, rotation_grace: Duration) -> Self {
        let token: Arc<str> = token.into();
        let token = match token.trim() {
            trimmed if trimmed.len() == token.len() => token,
            trimmed => Arc::from(trimmed),
        };
        Self {
            pool,
            token,
            rotation_grace,
        }
    }
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("token", &"<redacted>")
            .field("rotation_grace", &self.rotation_grace)
            .finish_non_exhaustive()
    }
}

/// Every route, as `(method, path template)`, path templates written as in OpenAPI
/// (`{id}`). [`router`] serves exactly these and nothing else; `docs/openapi.json`
/// describes exactly these.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/openapi.json"),
    ("GET", "/v1/endpoints"),
    ("POST", "/v1/endpoints"),
    ("GET", "/v1/endpoints/{id}"),
    ("PATCH", "/v1/endpoints/{id}"),
    ("DELETE", "/v1/endpoints/{id}"),
    ("POST", "/v1/endpoints/{id}/rotate-secret"),
    ("POST", "/v1/endpoints/{id}/enable"),
    ("POST", "/v1/endpoints/{id}/test"),
    ("POST", "/v1/endpoints/{id}/circuit/close"),
    ("GET", "/v1/endpoints/{id}/ordering/blocked"),
    ("POST", "/v1/endpoints/{id}/ordering/blocked/{key}/redrive"),
    ("POST", "/v1/endpoints/{id}/ordering/blocked/{key}/discard"),
    ("GET", "/v1/events"),
    ("GET", "/v1/events/{id}"),
    ("POST", "/v1/events/{id}/replay"),
    ("GET", "/v1/deliveries"),
    ("GET", "/v1/deliveries/{id}"),
    ("POST", "/v1/deliveries/{id}/retry"),
    ("POST", "/v1/dead/retry"),
    ("GET", "/v1/stats"),
];

/// The OpenAPI 3.0 document describing [`ROUTES`], as served at `GET /openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("../../docs/openapi.json");

/// Largest request body accepted (413 `payload_too_large` beyond it). Admin requests
/// are a few hundred bytes; this leaves room for long filter lists.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The handler of one entry of [`ROUTES`]; `None` for a pair that is not one. The
/// method filter comes from the method string, so the table cannot disagree with it.
fn method_router(method: &str, path: &str) -> Option<MethodRouter<AdminState>> {
    use handlers as h;
    let filter = match method {
        "GET" => MethodFilter::GET,
        "POST" => MethodFilter::POST,
        "PATCH" => MethodFilter::PATCH,
        "DELETE" => MethodFilter::DELETE,
        _ => return None,
    };
    let route = match (method, path) {
        ("GET", "/openapi.json") => on(filter, h::openapi),
        ("GET", "/v1/endpoints") => on(filter, h::list_endpoints),
        ("POST", "/v1/endpoints") => on(filter, h::create_endpoint),
        ("GET", "/v1/endpoints/{id}") => on(filter, h::get_endpoint),
        ("PATCH", "/v1/endpoints/{id}") => on(filter, h::update_endpoint),
        ("DELETE", "/v1/endpoints/{id}") => on(filter, h::delete_endpoint),
        ("POST", "/v1/endpoints/{id}/rotate-secret") => on(filter, h::rotate_secret),
        ("POST", "/v1/endpoints/{id}/enable") => on(filter, h::enable_endpoint),
        ("POST", "/v1/endpoints/{id}/test") => on(filter, h::send_test),
        ("POST", "/v1/endpoints/{id}/circuit/close") => on(filter, h::close_circuit),
        ("GET", "/v1/endpoints/{id}/ordering/blocked") => on(filter, h::list_blocked),
        ("POST", "/v1/endpoints/{id}/ordering/blocked/{key}/redrive") => {
            on(filter, h::redrive_blocked)
        }
        ("POST", "/v1/endpoints/{id}/ordering/blocked/{key}/discard") => {
            on(filter, h::discard_blocked)
        }
        ("GET", "/v1/events") => on(filter, h::list_events),
        ("GET", "/v1/events/{id}") => on(filter, h::get_event),
        ("POST", "/v1/events/{id}/replay") => on(filter, h::replay_event),
        ("GET", "/v1/deliveries") => on(filter, h::list_deliveries),
        ("GET", "/v1/deliveries/{id}") => on(filter, h::get_delivery),
        ("POST", "/v1/deliveries/{id}/retry") => on(filter, h::retry_delivery),
        ("POST", "/v1/dead/retry") => on(filter, h::retry_dead),
        ("GET", "/v1/stats") => on(filter, h::stats),
        _ => return None,
    };
    Some(route)
}

/// The admin API as a router: [`ROUTES`] behind the bearer-token check, with JSON
/// 404/405 answers for anything else (to authenticated callers only).
pub fn router(state: AdminState) -> Router {
    let mut app: Router<AdminState> = Router::new();
    for &(method, path) in ROUTES {
        match method_router(method, path) {
            Some(route) => app = app.route(path, route),
            // Unreachable while the unit test `every_route_has_a_handler` passes.
            None => tracing::error!(method, path, "admin route without a handler"),
        }
    }
    app.fallback(handlers::no_route)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state.token),
            authenticate,
        ))
        .with_state(state)
}

/// Serves the admin API on `listener` until `shutdown` is cancelled, then stops
/// accepting and finishes the requests under way. Returns the listener's I/O error if
/// serving fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving the admin API");
    }
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// The outermost layer: refuses anything without the token, before routing.
async fn authenticate(State(token): State<Arc<str>>, request: Request, next: Next) -> Response {
    if !authorized(request.headers(), &token) {
        tracing::debug!(method = %request.method(), "admin API request refused: no valid token");
        return ApiError::unauthorized().into_response();
    }
    next.run(request).await
}

/// Whether `headers` carry exactly one `Authorization: Bearer <expected>`. The scheme
/// is case-insensitive (RFC 9110); the token is compared in constant time.
fn authorized(headers: &HeaderMap, expected: &str) -> bool {
    if expected.is_empty() {
        return false;
    }
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return false;
    };
    let Ok(value) = value.to_str() else {
        return false;
    };
    let Some((scheme, token)) = value.trim().split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer")
        && constant_time_eq(token.trim_start().as_bytes(), expected.as_bytes())
}

/// Compares HMACs of both sides under a per-process random key, with a constant-time
/// tag comparison: the time taken depends on neither token's content, and the lengths
/// only through the hashing, which reveals nothing about where the tokens differ.
fn constant_time_eq(presented: &[u8], expected: &[u8]) -> bool {
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    let key = KEY.get_or_init(|| {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        key
    });
    let (Ok(mut theirs), Ok(mut ours)) = (
        Hmac::<Sha256>::new_from_slice(key),
        Hmac::<Sha256>::new_from_slice(key),
    ) else {
        return false;
    };
    theirs.update(presented);
    ours.update(expected);
    ours.verify_slice(&theirs.finalize().into_bytes()).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn every_route_has_a_handler() {
        for &(method, path) in ROUTES {
            assert!(
                method_router(method, path).is_some(),
                "{method} {path} has no handler"
            );
        }
        let mut seen = std::collections::HashSet::new();
        for route in ROUTES {
            assert!(seen.insert(route), "{route:?} listed twice");
        }
    }

    fn with_auth(values: &[&'static str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(header::AUTHORIZATION, HeaderValue::from_static(v));
        }
        headers
    }

    #[test]
    fn bearer_tokens() {
        let token = "s3cret-token-0123456789";
        assert!(authorized(
            &with_auth(&["Bearer s3cret-token-0123456789"]),
            token
        ));
        assert!(authorized(
            &with_auth(&["bearer s3cret-token-0123456789"]),
            token
        ));
        for bad in [
            "",
            "Bearer",
            "Bearer ",
            "Bearer s3cret-token-012345678",
            "Bearer s3cret-token-01234567890",
            "Bearer S3CRET-TOKEN-0123456789",
            "Basic s3cret-token-0123456789",
            "s3cret-token-0123456789",
            "Bearers3cret-token-0123456789",
        ] {
            assert!(!authorized(&with_auth(&[bad]), token), "{bad:?}");
        }
        assert!(!authorized(&HeaderMap::new(), token));
        assert!(!authorized(
            &with_auth(&[
                "Bearer s3cret-token-0123456789",
                "Bearer s3cret-token-0123456789"
            ]),
            token
        ));
        // An empty configured token refuses everything, even an empty bearer token.
        assert!(!authorized(&with_auth(&["Bearer "]), ""));
        assert!(!authorized(&with_auth(&["Bearer x"]), ""));
    }

    #[test]
    fn openapi_document_is_json() {
        let doc: serde_json::Value =
            serde_json::from_str(OPENAPI_JSON).expect("docs/openapi.json parses");
        assert!(
            doc["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3.0.")),
            "an OpenAPI 3.0 document"
        );
    }
}
