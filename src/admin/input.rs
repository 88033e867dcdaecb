//! Turning requests into checked values: extractors whose rejections are [`ApiError`]s
//! (so a malformed body, query or path is a JSON 400, never axum's plain-text answer),
//! and the parsers for ids, times, page sizes and event types.

use std::time::SystemTime;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::inspect::DeliveryId;
use crate::time_format::parse_rfc3339;

/// A required JSON body. The body must be present, sent as `application/json` (or a
/// `+json` type) and match `T`, unknown fields included if `T` denies them.
#[derive(Debug)]
pub(super) struct JsonBody<T>(pub T);

/// An optional JSON body: an empty body means `T::default()`; anything else is held to
/// the rules of [`JsonBody`].
#[derive(Debug)]
pub(super) struct OptionalJsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let (is_json, bytes) = read_body(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::invalid_input(
                "a JSON request body is required (Content-Type: application/json)",
            ));
        }
        parse_json(is_json, &bytes).map(Self)
    }
}

impl<S, T> FromRequest<S> for OptionalJsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Default,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let (is_json, bytes) = read_body(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(T::default()));
        }
        parse_json(is_json, &bytes).map(Self)
    }
}

async fn read_body<S: Send + Sync>(req: Request, state: &S) -> Result<(bool, Bytes), ApiError> {
    let is_json = json_content_type(req.headers());
    let bytes = Bytes::from_request(req, state)
        .await
        .map_err(body_rejection)?;
    Ok((is_json, bytes))
}

fn parse_json<T: DeserializeOwned>(is_json: bool, bytes: &[u8]) -> Result<T, ApiError> {
    if !is_json {
        return Err(ApiError::invalid_input(
            "the request body must be JSON, sent with Content-Type: application/json",
        ));
    }
    match Json::<T>::from_bytes(bytes) {
        Ok(Json(value)) => Ok(value),
        Err(rejection) => Err(json_rejection(&rejection)),
    }
}

fn json_rejection(rejection: &JsonRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::payload_too_large(rejection.body_text())
    } else {
        ApiError::invalid_input(rejection.body_text())
    }
}

fn body_rejection(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::payload_too_large(rejection.body_text())
    } else {
        ApiError::invalid_input(rejection.body_text())
    }
}

/// `application/json`, `application/json; charset=utf-8`, `application/x+json`.
fn json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Query parameters deserialized into `T` (whose fields are all `Option<String>` in this
/// module, parsed afterwards with messages naming the parameter). Unknown and repeated
/// parameters are refused.
#[derive(Debug)]
pub(super) struct Params<T>(pub T);

impl<S, T> FromRequestParts<S> for Params<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::invalid_input(rejection.body_text())),
        }
    }
}

/// The one path parameter of a route, as text (percent-decoded); parsed by the handler.
#[derive(Debug)]
pub(super) struct PathParam(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::invalid_input(rejection.body_text())),
        }
    }
}

/// An endpoint or event id: a decimal integer.
pub(super) fn parse_id(what: &str, text: &str) -> Result<i64, ApiError> {
    text.parse::<i64>()
        .map_err(|_| ApiError::invalid_input(format!("{what} must be an integer, got {text:?}")))
}

/// A delivery id, `EVENT_ID:ENDPOINT_ID`.
pub(super) fn parse_delivery_id(text: &str) -> Result<DeliveryId, ApiError> {
    text.parse::<DeliveryId>().map_err(ApiError::from)
}

/// An absent or empty query parameter is `None`.
pub(super) fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

/// An optional integer query parameter.
pub(super) fn opt_id(what: &str, value: Option<String>) -> Result<Option<i64>, ApiError> {
    non_empty(value).map(|v| parse_id(what, &v)).transpose()
}

/// `limit`: 1 to [`crate::inspect::MAX_PAGE`]; absent means the default page.
pub(super) fn opt_limit(value: Option<String>) -> Result<Option<u32>, ApiError> {
    let Some(text) = non_empty(value) else {
        return Ok(None);
    };
    let limit = text.parse::<u32>().map_err(|_| {
        ApiError::invalid_input(format!(
            "limit must be an integer between 1 and {}, got {text:?}",
            crate::inspect::MAX_PAGE
        ))
    })?;
    crate::inspect::page_size(Some(limit))?;
    Ok(Some(limit))
}

/// An exact event type, as producers write them: 1 to 255 bytes.
pub(super) fn opt_event_type(value: Option<String>) -> Result<Option<String>, ApiError> {
    match value {
        Some(v) if v.len() > 255 => Err(ApiError::invalid_input(
            "event_type must be at most 255 bytes",
        )),
        Some(v) if v.is_empty() => Ok(None),
        other => Ok(other),
    }
}

/// An optional RFC 3339 time named `what`.
pub(super) fn opt_time(what: &str, value: Option<String>) -> Result<Option<SystemTime>, ApiError> {
    non_empty(value)
        .map(|v| {
            parse_rfc3339(&v).ok_or_else(|| {
                ApiError::invalid_input(format!(
                    "{what} must be an RFC 3339 time such as 2025-01-31T12:00:00Z \
                     or 2025-01-31T13:00:00+01:00, got {v:?}"
                ))
            })
        })
        .transpose()
}

/// Checks that a `since`/`until` pair leaves a non-empty window.
pub(super) fn check_window(
    since: Option<SystemTime>,
    until: Option<SystemTime>,
) -> Result<(), ApiError> {
    match (since, until) {
        (Some(since), Some(until)) if since >= until => {
            Err(ApiError::invalid_input("since must be earlier than until"))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits() {
        assert_eq!(opt_limit(None).unwrap(), None);
        assert_eq!(opt_limit(Some("3".into())).unwrap(), Some(3));
        for bad in ["0", "1001", "100000", "-1", "x", "99999999999"] {
            assert_eq!(
                opt_limit(Some(bad.into())).unwrap_err().status(),
                StatusCode::BAD_REQUEST,
                "{bad}"
            );
        }
    }

    #[test]
    fn json_content_types() {
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, header::HeaderValue::from_static(v));
            json_content_type(&h)
        };
        assert!(with("application/json"));
        assert!(with("Application/JSON; charset=utf-8"));
        assert!(with("application/merge-patch+json"));
        assert!(!with("text/json"));
        assert!(!with("text/plain"));
        assert!(!json_content_type(&HeaderMap::new()));
    }
}
