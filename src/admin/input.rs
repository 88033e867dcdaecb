//! Turning requests into checked values: extractors whose rejections are [`ApiError`]s
//! (so a malformed body, query or path is a JSON 400, never axum's plain-text answer),
//! and the checks of every parameter and body field.
//!
//! Each check accepts exactly what `docs/openapi.json` says the field may be: the
//! patterns below are the document's (a test compares them), lengths count characters
//! as JSON Schema does, and ids, page sizes and times have the document's ranges. A
//! request the document calls valid is never refused as malformed, and one it calls
//! invalid always is.

use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use regex::Regex;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::inspect::DeliveryId;

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
    // serde reads a struct from an array too (`[null, null]` as the fields in order):
    // every body the API takes is an object, so nothing else gets that far.
    let first = bytes
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    if first != Some(&b'{') {
        return Err(ApiError::invalid_input(
            "the request body must be a JSON object",
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
/// parameters are refused; [`NoQuery`] refuses any.
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

/// The query of a route that takes no parameters: any parameter is unknown.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NoQuery {}

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

/// The two path parameters of a route on one ordered key: the endpoint id and the key,
/// as text (percent-decoded); parsed by the handler.
#[derive(Debug)]
pub(super) struct KeyPath(pub String, pub String);

impl<S: Send + Sync> FromRequestParts<S> for KeyPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<(String, String)>::from_request_parts(parts, state).await {
            Ok(Path((id, key))) => Ok(Self(id, key)),
            Err(rejection) => Err(ApiError::invalid_input(rejection.body_text())),
        }
    }
}

/// Most characters in an ordering key (as the outbox's check constraint counts them).
pub(super) const MAX_ORDERING_KEY_CHARS: usize = 255;

/// An ordering key named `what`: 1 to 255 characters without NUL, as keys are stored
/// (PostgreSQL text cannot hold NUL).
pub(super) fn check_ordering_key(what: &str, key: String) -> Result<String, ApiError> {
    if key.is_empty() || key.chars().count() > MAX_ORDERING_KEY_CHARS || key.contains('\0') {
        return Err(ApiError::invalid_input(format!(
            "{what} must be 1 to {MAX_ORDERING_KEY_CHARS} characters, without NUL"
        )));
    }
    Ok(key)
}

/// An optional ordering-key query parameter (a cursor).
pub(super) fn opt_ordering_key(
    what: &str,
    value: Option<String>,
) -> Result<Option<String>, ApiError> {
    query_value(what, value)?
        .map(|key| check_ordering_key(what, key))
        .transpose()
}

/// The largest id: ids are `bigint`.
const MAX_ID: u64 = i64::MAX as u64;

/// Reads an unsigned decimal integer as the document's `integer` means it in a path
/// or query: ASCII digits only (no sign, no spaces); `None` past `u64`.
fn digits(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u64>().ok()
}

/// An endpoint or event id (`what` names it): an integer from 1 to 2^63 - 1.
pub(super) fn parse_id(what: &str, text: &str) -> Result<i64, ApiError> {
    match digits(text) {
        Some(id @ 1..=MAX_ID) => Ok(id as i64),
        _ => Err(ApiError::invalid_input(format!(
            "{what} must be an integer from 1 to {MAX_ID}, got {text:?}"
        ))),
    }
}

/// An id in a JSON body: the same range as [`parse_id`] (serde has checked the type).
pub(super) fn check_body_id(what: &str, id: Option<i64>) -> Result<Option<i64>, ApiError> {
    match id {
        Some(id) if id < 1 => Err(ApiError::invalid_input(format!(
            "{what} must be an integer from 1 to {MAX_ID}, got {id}"
        ))),
        other => Ok(other),
    }
}

/// A delivery id as a path or cursor holds it (the document's pattern is
/// `^[0-9]+:[0-9]+$`): each part any run of digits. A part past
/// the id range names a delivery that cannot exist, which is not a malformed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DeliveryRef {
    /// Both parts are in the id range.
    Id(DeliveryId),
    /// `(event, endpoint)` with a part past the id range (as `None`).
    Beyond(Option<i64>, Option<i64>),
}

/// Parses `EVENT_ID:ENDPOINT_ID` ([`DELIVERY_ID_PATTERN`]).
pub(super) fn parse_delivery_ref(what: &str, text: &str) -> Result<DeliveryRef, ApiError> {
    let bad = || {
        ApiError::invalid_input(format!(
            "{what} must be a delivery id EVENT_ID:ENDPOINT_ID, such as 42:7, got {text:?}"
        ))
    };
    let (event, endpoint) = text.split_once(':').ok_or_else(bad)?;
    let part = |p: &str| -> Result<Option<i64>, ApiError> {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        Ok(digits(p).filter(|&n| n <= MAX_ID).map(|n| n as i64))
    };
    Ok(match (part(event)?, part(endpoint)?) {
        (Some(event_id), Some(endpoint_id)) => DeliveryRef::Id(DeliveryId {
            event_id,
            endpoint_id,
        }),
        (event, endpoint) => DeliveryRef::Beyond(event, endpoint),
    })
}

/// A delivery named in a path: its id, or 404 when it cannot exist.
pub(super) fn delivery_in_path(text: &str) -> Result<DeliveryId, ApiError> {
    match parse_delivery_ref("delivery id", text)? {
        DeliveryRef::Id(id) => Ok(id),
        DeliveryRef::Beyond(..) => Err(ApiError::not_found(format!("delivery {text}"))),
    }
}

/// The deliveries' `after` cursor as the keyset condition `(event, endpoint) < cursor`
/// needs it; `None` when every delivery comes before it.
pub(super) fn delivery_cursor(text: &str) -> Result<Option<DeliveryId>, ApiError> {
    Ok(match parse_delivery_ref("after", text)? {
        DeliveryRef::Id(id) => Some(id),
        // (e, past the range): every delivery of event e and the ones before, which is
        // exactly those before (e + 1, smallest endpoint id).
        DeliveryRef::Beyond(Some(event_id), None) if event_id < i64::MAX => Some(DeliveryId {
            event_id: event_id + 1,
            endpoint_id: i64::MIN,
        }),
        DeliveryRef::Beyond(..) => None,
    })
}

/// A query parameter's text. Present but empty is refused: the document gives no
/// parameter an empty value (to leave a filter out, leave the parameter out).
pub(super) fn query_value(what: &str, value: Option<String>) -> Result<Option<String>, ApiError> {
    match value {
        Some(v) if v.is_empty() => Err(ApiError::invalid_input(format!(
            "{what} is empty; leave the parameter out instead"
        ))),
        other => Ok(other),
    }
}

/// An optional id query parameter.
pub(super) fn opt_id(what: &str, value: Option<String>) -> Result<Option<i64>, ApiError> {
    query_value(what, value)?
        .map(|v| parse_id(what, &v))
        .transpose()
}

/// `limit`: 1 to [`crate::inspect::MAX_PAGE`]; absent means the default page.
pub(super) fn opt_limit(value: Option<String>) -> Result<Option<u32>, ApiError> {
    let Some(text) = query_value("limit", value)? else {
        return Ok(None);
    };
    let max = crate::inspect::MAX_PAGE;
    match digits(&text) {
        Some(n @ 1..) if n <= u64::from(max) => Ok(Some(n as u32)),
        _ => Err(ApiError::invalid_input(format!(
            "limit must be an integer from 1 to {max}, got {text:?}"
        ))),
    }
}

/// One of [`crate::inspect::DELIVERY_STATES`].
pub(super) fn opt_state(value: Option<String>) -> Result<Option<String>, ApiError> {
    match query_value("state", value)? {
        Some(s) if !crate::inspect::DELIVERY_STATES.contains(&s.as_str()) => {
            Err(ApiError::invalid_input(format!(
                "state must be one of {}, got {s:?}",
                crate::inspect::DELIVERY_STATES.join(", ")
            )))
        }
        other => Ok(other),
    }
}

/// Most characters in an event type (as the outbox's check constraint counts them).
pub(super) const MAX_EVENT_TYPE_CHARS: usize = 255;

/// An exact event type to filter on, in a query or a body: 1 to 255 characters without
/// NUL, as event types are stored (PostgreSQL text cannot hold NUL).
pub(super) fn check_event_type(
    what: &str,
    value: Option<String>,
) -> Result<Option<String>, ApiError> {
    match value {
        Some(v) if v.is_empty() || v.chars().count() > MAX_EVENT_TYPE_CHARS => {
            Err(ApiError::invalid_input(format!(
                "{what} must be 1 to {MAX_EVENT_TYPE_CHARS} characters"
            )))
        }
        Some(v) if v.contains('\0') => Err(ApiError::invalid_input(format!(
            "{what} must not contain NUL"
        ))),
        other => Ok(other),
    }
}

/// An optional `event_type` query parameter.
pub(super) fn opt_event_type(value: Option<String>) -> Result<Option<String>, ApiError> {
    check_event_type("event_type", query_value("event_type", value)?)
}

/// An optional time named `what`, from a query or a body (see [`parse_date_time`]).
pub(super) fn opt_time(what: &str, value: Option<String>) -> Result<Option<SystemTime>, ApiError> {
    value
        .map(|v| {
            parse_date_time(&v).ok_or_else(|| {
                ApiError::invalid_input(format!(
                    "{what} must be an RFC 3339 date-time such as 2025-01-31T12:00:00Z \
                     or 2025-01-31T13:00:00+01:00 (encode + as %2B in a query), got {v:?}"
                ))
            })
        })
        .transpose()
}

/// An optional time query parameter.
pub(super) fn opt_query_time(
    what: &str,
    value: Option<String>,
) -> Result<Option<SystemTime>, ApiError> {
    opt_time(what, query_value(what, value)?)
}

/// Parses an RFC 3339 `date-time` exactly as JSON Schema's `date-time` format reads it:
/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`, `T` and `Z` in either case, any year
/// from 0000 to 9999, a real calendar date, and a leap second (`:60`) only at 23:59 UTC.
/// Nothing else: no space for `T`, no missing offset, no surrounding whitespace.
/// Digits of the fraction past nanoseconds are read and dropped.
pub fn parse_date_time(text: &str) -> Option<SystemTime> {
    let b = text.as_bytes();
    let num = |at: usize, len: usize| -> Option<i64> {
        b.get(at..at + len)?.iter().try_fold(0i64, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0'))
        })
    };
    let sep = |at: usize, allowed: &[u8]| b.get(at).is_some_and(|c| allowed.contains(c));
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hour, minute, second) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    let mut at = 19;
    let mut nanos = 0u32;
    if sep(at, b".") {
        at += 1;
        let start = at;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            if at - start < 9 {
                nanos = nanos * 10 + u32::from(b[at] - b'0');
            }
            at += 1;
        }
        let read = at - start;
        if read == 0 {
            return None;
        }
        nanos *= 10u32.pow(9u32.saturating_sub(read as u32));
    }
    let offset_minutes = match b.get(at..)? {
        b"Z" | b"z" => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (h, m) = (num(at + 1, 2)?, num(at + 4, 2)?);
            if h > 23 || m > 59 {
                return None;
            }
            if *sign == b'-' {
                -(h * 60 + m)
            } else {
                h * 60 + m
            }
        }
        _ => return None,
    };
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    // A leap second ends a UTC day; anywhere else `:60` is no time at all.
    if second == 60 && (hour * 60 + minute - offset_minutes).rem_euclid(1440) != 1439 {
        return None;
    }
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second
        - offset_minutes * 60;
    let whole = Duration::from_secs(seconds.unsigned_abs());
    let at_second = if seconds >= 0 {
        UNIX_EPOCH.checked_add(whole)?
    } else {
        UNIX_EPOCH.checked_sub(whole)?
    };
    at_second.checked_add(Duration::from_nanos(u64::from(nanos)))
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

// ---------------------------------------------------------------------------------------
// Body fields
// ---------------------------------------------------------------------------------------

/// For `#[serde(default, deserialize_with = "non_null")]` on an `Option` field: absent is
/// `None`, a value is `Some`, and `null` is refused (the document does not make the
/// field nullable).
pub(super) fn non_null<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

/// For `#[serde(default, deserialize_with = "nullable")]` on an `Option<Option<_>>`
/// field of an update: absent is `None` (leave it), `null` is `Some(None)` (remove it),
/// a value is `Some(Some(_))`.
pub(super) fn nullable<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    <Option<T> as serde::Deserialize>::deserialize(deserializer).map(Some)
}

/// The document's pattern of an endpoint URL: `http` or `https`, a host name (labels
/// of letters, digits and `_` joined by single hyphens; the last label starts with a
/// letter, so it is never read as an IPv4 number), a dotted-quad IPv4 address or a
/// bracketed IPv6 address, an optional port up to 65535, then a path and a query in
/// RFC 3986 characters (anything else percent-encoded). No credentials, no fragment.
/// Every URL it matches also passes [`crate::endpoint::validate_url`] (a test checks).
pub(super) const URL_PATTERN: &str = concat!(
    "^[Hh][Tt][Tt][Pp][Ss]?://",
    "(?:",
    // host name
    "(?:[A-Za-z0-9_]+(?:-[A-Za-z0-9_]+)*\\.)*[A-Za-z][A-Za-z0-9_]*(?:-[A-Za-z0-9_]+)*\\.?",
    // IPv4
    "|(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(?:\\.(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3}",
    // IPv6
    "|\\[(?:",
    "(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}",
    "|(?:[0-9A-Fa-f]{1,4}:){1,7}:",
    "|(?:[0-9A-Fa-f]{1,4}:){1,6}:[0-9A-Fa-f]{1,4}",
    "|(?:[0-9A-Fa-f]{1,4}:){1,5}(?::[0-9A-Fa-f]{1,4}){1,2}",
    "|(?:[0-9A-Fa-f]{1,4}:){1,4}(?::[0-9A-Fa-f]{1,4}){1,3}",
    "|(?:[0-9A-Fa-f]{1,4}:){1,3}(?::[0-9A-Fa-f]{1,4}){1,4}",
    "|(?:[0-9A-Fa-f]{1,4}:){1,2}(?::[0-9A-Fa-f]{1,4}){1,5}",
    "|[0-9A-Fa-f]{1,4}:(?::[0-9A-Fa-f]{1,4}){1,6}",
    "|:(?:(?::[0-9A-Fa-f]{1,4}){1,7}|:)",
    ")\\]",
    ")",
    // port
    "(?::(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4}))?",
    // path
    "(?:/(?:[A-Za-z0-9._~!$&'()*+,;=:@-]|%[0-9A-Fa-f]{2})*)*",
    // query
    "(?:\\?(?:[A-Za-z0-9._~!$&'()*+,;=:@/?-]|%[0-9A-Fa-f]{2})*)?",
    "$"
);

/// The document's pattern of an event-type filter: `*`, or a name of letters, digits
/// and `._-:` (1 to 255, not starting or ending with `.`), optionally followed by `.*`.
/// The same set as [`crate::endpoint::validate_filter`] (a test checks).
pub(super) const FILTER_PATTERN: &str =
    "^(?:\\*|[A-Za-z0-9_:-](?:[A-Za-z0-9._:-]{0,253}[A-Za-z0-9_:-])?(?:\\.\\*)?)$";

/// The document's pattern of a signing secret: `whsec_` and the canonical standard
/// base64 (padded, no stray bits) of a 24 to 64 byte key. The same set as
/// [`crate::sign::Secret::parse`] (a test checks).
pub(super) const SECRET_PATTERN: &str = concat!(
    "^whsec_(?:",
    "(?:[A-Za-z0-9+/]{4}){8,21}",
    "|(?:[A-Za-z0-9+/]{4}){8,21}[A-Za-z0-9+/][AQgw]==",
    "|(?:[A-Za-z0-9+/]{4}){8,20}[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=",
    ")$"
);

/// Longest endpoint URL, in characters (the pattern admits ASCII only, so bytes too).
pub(super) const MAX_URL_CHARS: usize = crate::endpoint::MAX_URL_LEN;

fn matches(pattern: &'static LazyLock<Result<Regex, regex::Error>>, text: &str) -> bool {
    match &**pattern {
        Ok(re) => re.is_match(text),
        // Unreachable while the unit tests compile every pattern; refusing is safe.
        Err(_) => false,
    }
}

static URL_RE: LazyLock<Result<Regex, regex::Error>> = LazyLock::new(|| Regex::new(URL_PATTERN));
static FILTER_RE: LazyLock<Result<Regex, regex::Error>> =
    LazyLock::new(|| Regex::new(FILTER_PATTERN));
static SECRET_RE: LazyLock<Result<Regex, regex::Error>> =
    LazyLock::new(|| Regex::new(SECRET_PATTERN));

/// An endpoint URL: the library's checks first (their messages say what is wrong), then
/// the document's pattern.
pub(super) fn check_url(url: &str) -> Result<(), ApiError> {
    crate::endpoint::validate_url(url).map_err(crate::Error::from)?;
    if url.len() > MAX_URL_CHARS || !matches(&URL_RE, url) {
        return Err(ApiError::invalid_input(
            "invalid endpoint URL: use http:// or https://, a host name (letters, digits, \
             _ and single hyphens), an IPv4 address or an [IPv6] address, an optional port, \
             then a path and query in ASCII with anything else percent-encoded; \
             no credentials, no fragment, at most 2048 characters",
        ));
    }
    Ok(())
}

/// Most event-type filters on one endpoint (through the API).
pub(super) const MAX_FILTERS: usize = 100;
/// Longest description, in characters (through the API).
pub(super) const MAX_DESCRIPTION_CHARS: usize = 1000;

/// Event-type filters: at most [`MAX_FILTERS`], each as [`FILTER_PATTERN`] says.
///
/// The bounds on filters, descriptions and URLs keep every body the document calls valid
/// well under [`super::MAX_BODY_BYTES`] however it is encoded (12 bytes a character at
/// worst), so a valid request is never refused for its size.
pub(super) fn check_filters(filters: &[String]) -> Result<(), ApiError> {
    if filters.len() > MAX_FILTERS {
        return Err(ApiError::invalid_input(format!(
            "event_types takes at most {MAX_FILTERS} filters, got {}",
            filters.len()
        )));
    }
    for filter in filters {
        crate::endpoint::validate_filter(filter).map_err(crate::Error::from)?;
        if !matches(&FILTER_RE, filter) {
            return Err(crate::Error::from(crate::endpoint::InvalidEndpoint::Filter(
                filter.clone(),
            ))
            .into());
        }
    }
    Ok(())
}

/// A signing secret, as [`SECRET_PATTERN`] says. The message never repeats the secret.
pub(super) fn check_secret(secret: &str) -> Result<(), ApiError> {
    crate::sign::Secret::parse(secret)
        .map_err(|e| crate::Error::from(crate::endpoint::InvalidEndpoint::from(e)))?;
    if !matches(&SECRET_RE, secret) {
        return Err(ApiError::invalid_input(
            "invalid signing secret: whsec_ and the padded standard base64 of a 24 to 64 byte key",
        ));
    }
    Ok(())
}

/// A description: up to [`MAX_DESCRIPTION_CHARS`] characters without NUL (PostgreSQL
/// text cannot hold it).
pub(super) fn check_description(description: &str) -> Result<(), ApiError> {
    if description.contains('\0') {
        return Err(ApiError::invalid_input("description must not contain NUL"));
    }
    if description.chars().count() > MAX_DESCRIPTION_CHARS {
        return Err(ApiError::invalid_input(format!(
            "description must be at most {MAX_DESCRIPTION_CHARS} characters"
        )));
    }
    Ok(())
}

/// The document's pattern of a static header's name: an HTTP token.
#[cfg(test)]
pub(super) const HEADER_NAME_PATTERN: &str = "^[A-Za-z0-9!#$%&'*+.^_`|~-]+$";

/// The document's pattern of the names an endpoint may not set (its `not`), the same
/// set as [`crate::endpoint::is_owned_header`] (a test checks).
#[cfg(test)]
pub(super) const OWNED_HEADER_PATTERN: &str = "^(?:[Ww][Ee][Bb][Hh][Oo][Oo][Kk]-.*|\
[Cc][Oo][Nn][Tt][Ee][Nn][Tt]-(?:[Tt][Yy][Pp][Ee]|[Ll][Ee][Nn][Gg][Tt][Hh])|[Hh][Oo][Ss][Tt]|\
[Tt][Rr][Aa][Nn][Ss][Ff][Ee][Rr]-[Ee][Nn][Cc][Oo][Dd][Ii][Nn][Gg]|\
[Cc][Oo][Nn][Nn][Ee][Cc][Tt][Ii][Oo][Nn])$";

/// The document's pattern of a static header's value: visible ASCII, spaces and tabs.
#[cfg(test)]
pub(super) const HEADER_VALUE_PATTERN: &str = "^[\\t -~]*$";

/// Static headers, as the library checks them (the document's patterns describe the
/// same sets: a test checks). The message names a header, never its value.
pub(super) fn check_headers(headers: &[crate::endpoint::StaticHeader]) -> Result<(), ApiError> {
    crate::endpoint::validate_headers(headers).map_err(crate::Error::from)?;
    Ok(())
}

/// A timeout override in milliseconds: 1 to 3,600,000, or 0 where `zero_clears` (an
/// update removing the override). `None` if it is to be removed.
pub(super) fn check_timeout(
    ms: u64,
    zero_clears: bool,
) -> Result<Option<std::time::Duration>, ApiError> {
    if ms == 0 && zero_clears {
        return Ok(None);
    }
    let timeout = std::time::Duration::from_millis(ms);
    crate::endpoint::validate_timeout(timeout).map_err(crate::Error::from)?;
    Ok(Some(timeout))
}

/// A per-endpoint limit (`field` names it) in its range
/// ([`crate::endpoint::MAX_IN_FLIGHT_RANGE`], [`crate::endpoint::RATE_LIMIT_RANGE`]), as
/// the library checks it.
pub(super) fn check_limit(
    field: &'static str,
    value: Option<u64>,
    range: &std::ops::RangeInclusive<u32>,
) -> Result<Option<u32>, ApiError> {
    value
        .map(|value| crate::endpoint::validate_limit(field, value, range))
        .transpose()
        .map_err(|e| crate::Error::from(e).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The header patterns of the document accept exactly what the library does.
    #[test]
    fn header_patterns_are_the_librarys() {
        use crate::endpoint::{StaticHeader, is_owned_header, validate_headers};
        let name_re = re(HEADER_NAME_PATTERN);
        let owned_re = re(OWNED_HEADER_PATTERN);
        let value_re = re(HEADER_VALUE_PATTERN);
        let mut rng = Rng(0x5eed_4ead);
        let alphabet: Vec<char> = "aZ09-_.!~`|x:; \t\"(),/\\é".chars().collect();
        let mut names: Vec<String> = [
            "webhook-id",
            "Webhook-",
            "WEBHOOK-SIGNATURE",
            "webhooks",
            "content-type",
            "Content-Length",
            "content-typo",
            "host",
            "hosts",
            "Transfer-Encoding",
            "connection",
            "authorization",
            "",
        ]
        .iter()
        .map(|n| (*n).to_owned())
        .collect();
        for _ in 0..2_000 {
            let len = rng.below(8);
            names.push(rng.string(&alphabet, len));
        }
        for name in &names {
            let header = StaticHeader {
                name: name.clone(),
                value: "v".to_owned(),
            };
            let document = matches_re(&name_re, name) && !matches_re(&owned_re, name);
            assert_eq!(
                validate_headers(&[header]).is_ok(),
                document,
                "name {name:?}"
            );
            if matches_re(&name_re, name) {
                assert_eq!(
                    is_owned_header(name),
                    matches_re(&owned_re, name),
                    "{name:?}"
                );
            }
        }
        for _ in 0..2_000 {
            let len = rng.below(6);
            let value = rng.string(&alphabet, len);
            let header = StaticHeader {
                name: "x-key".to_owned(),
                value: value.clone(),
            };
            assert_eq!(
                validate_headers(&[header]).is_ok(),
                matches_re(&value_re, &value),
                "value {value:?}"
            );
        }
    }

    fn matches_re(re: &Regex, text: &str) -> bool {
        re.is_match(text)
    }

    /// xorshift64*: deterministic, so a failure names a reproducible case.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len())]
        }
        fn string(&mut self, alphabet: &[char], len: usize) -> String {
            (0..len).map(|_| *self.pick(alphabet)).collect()
        }
    }

    fn re(pattern: &str) -> Regex {
        Regex::new(pattern).expect("the pattern compiles")
    }

    /// Every `pattern` in the document is one the server checks, and the fields the
    /// server checks with a pattern carry exactly that pattern.
    #[test]
    fn patterns_are_the_documents() {
        let doc: serde_json::Value =
            serde_json::from_str(super::super::OPENAPI_JSON).expect("the document parses");
        fn walk(value: &serde_json::Value, found: &mut BTreeSet<String>) {
            match value {
                serde_json::Value::Object(map) => {
                    if let Some(p) = map.get("pattern").and_then(|p| p.as_str()) {
                        found.insert(p.to_owned());
                    }
                    map.values().for_each(|v| walk(v, found));
                }
                serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, found)),
                _ => {}
            }
        }
        let mut found = BTreeSet::new();
        walk(&doc, &mut found);
        let known: BTreeSet<String> = [
            URL_PATTERN,
            FILTER_PATTERN,
            SECRET_PATTERN,
            HEADER_NAME_PATTERN,
            OWNED_HEADER_PATTERN,
            HEADER_VALUE_PATTERN,
            "^[0-9]+:[0-9]+$",
            "^[^\\u0000]*$",
        ]
        .iter()
        .map(|p| (*p).to_owned())
        .collect();
        assert_eq!(found, known);
        for pattern in &known {
            re(pattern);
        }
        for (pointer, pattern) in [
            (
                "/components/schemas/NewEndpoint/properties/url",
                URL_PATTERN,
            ),
            (
                "/components/schemas/EndpointUpdate/properties/url",
                URL_PATTERN,
            ),
            (
                "/components/schemas/NewEndpoint/properties/event_types/items",
                FILTER_PATTERN,
            ),
            (
                "/components/schemas/EndpointUpdate/properties/event_types/items",
                FILTER_PATTERN,
            ),
            (
                "/components/schemas/NewEndpoint/properties/secret",
                SECRET_PATTERN,
            ),
            (
                "/components/schemas/RotateSecretRequest/properties/secret",
                SECRET_PATTERN,
            ),
            (
                "/components/schemas/RotatedSecret/properties/secret",
                SECRET_PATTERN,
            ),
            (
                "/components/schemas/NewEndpoint/properties/description",
                "^[^\\u0000]*$",
            ),
            (
                "/components/schemas/EndpointUpdate/properties/description",
                "^[^\\u0000]*$",
            ),
            (
                "/components/schemas/DeadRetryRequest/properties/event_type",
                "^[^\\u0000]*$",
            ),
            ("/components/parameters/EventType/schema", "^[^\\u0000]*$"),
            ("/components/parameters/OrderingKey/schema", "^[^\\u0000]*$"),
            (
                "/components/parameters/BlockedAfter/schema",
                "^[^\\u0000]*$",
            ),
            (
                "/components/parameters/DeliveryId/schema",
                "^[0-9]+:[0-9]+$",
            ),
            (
                "/components/parameters/DeliveriesAfter/schema",
                "^[0-9]+:[0-9]+$",
            ),
        ] {
            assert_eq!(
                doc.pointer(pointer).and_then(|s| s["pattern"].as_str()),
                Some(pattern),
                "{pointer}"
            );
        }
        let url = doc
            .pointer("/components/schemas/NewEndpoint/properties/url")
            .expect("url");
        assert_eq!(url["maxLength"], MAX_URL_CHARS);
        for schema in ["NewEndpoint", "EndpointUpdate"] {
            let properties = &doc["components"]["schemas"][schema]["properties"];
            assert_eq!(
                properties["event_types"]["maxItems"], MAX_FILTERS,
                "{schema}"
            );
            assert_eq!(
                properties["description"]["maxLength"], MAX_DESCRIPTION_CHARS,
                "{schema}"
            );
        }
        // The largest valid body, every character escaped at 12 bytes, fits the limit.
        let worst = 12 * MAX_DESCRIPTION_CHARS + MAX_URL_CHARS + MAX_FILTERS * (257 + 3) + 1024;
        assert!(worst < super::super::MAX_BODY_BYTES, "{worst}");
        let event_type = doc
            .pointer("/components/parameters/EventType/schema")
            .expect("event type");
        assert_eq!(event_type["maxLength"], MAX_EVENT_TYPE_CHARS);
        assert_eq!(event_type["minLength"], 1);
    }

    fn random_url(rng: &mut Rng) -> String {
        let word = ['a', 'Z', 'q', '0', '9', '_'];
        let label = |rng: &mut Rng, first: &[char]| {
            let mut l = String::from(*rng.pick(first));
            for _ in 0..rng.below(3) {
                let len = 1 + rng.below(6);
                if rng.below(3) == 0 {
                    l.push('-');
                }
                l.push_str(&rng.string(&word, len));
            }
            l
        };
        let host = match rng.below(5) {
            0 | 1 => {
                let mut h = String::new();
                for _ in 0..rng.below(4) {
                    h.push_str(&label(rng, &word));
                    h.push('.');
                }
                h.push_str(&label(rng, &['a', 'Z', 'x', 'n']));
                if rng.below(5) == 0 {
                    h.push('.');
                }
                h
            }
            2 => {
                let ip = std::net::Ipv4Addr::from(rng.next() as u32);
                ip.to_string()
            }
            3 => {
                let ip = std::net::Ipv6Addr::from(
                    (u128::from(rng.next()) << 64 | u128::from(rng.next())) >> (rng.below(4) * 32),
                );
                format!("[{ip}]")
            }
            _ => {
                let segs: Vec<String> =
                    (0..8).map(|_| format!("{:x}", rng.next() as u16)).collect();
                format!("[{}]", segs.join(":"))
            }
        };
        let mut url = format!("{}://{host}", rng.pick(&["http", "https", "HTTP", "hTtPs"]));
        if rng.below(2) == 0 {
            url.push_str(&format!(":{}", rng.below(65_536)));
        }
        let pchar: Vec<char> = "aZ09._~!$&'()*+,;=:@-".chars().collect();
        for _ in 0..rng.below(4) {
            url.push('/');
            let len = rng.below(6);
            url.push_str(&rng.string(&pchar, len));
            if rng.below(4) == 0 {
                url.push_str("%2F");
            }
        }
        if rng.below(2) == 0 {
            url.push('?');
            let len = rng.below(8);
            url.push_str(
                &rng.string(&['a', '=', '&', '/', '?', '%', '4', '1'], len)
                    .replace('%', "%25"),
            );
        }
        url
    }

    /// Every URL the pattern admits is one the library accepts and the sender parses:
    /// the document never calls valid a URL the server would refuse.
    #[test]
    fn url_pattern_admits_only_usable_urls() {
        let pattern = re(URL_PATTERN);
        let mut rng = Rng(0x5eed_0001);
        let mut admitted = 0;
        for _ in 0..50_000 {
            let url = random_url(&mut rng);
            if pattern.is_match(&url) {
                admitted += 1;
                assert!(crate::endpoint::validate_url(&url).is_ok(), "{url}");
                assert!(url::Url::parse(&url).is_ok(), "{url}");
                assert!(check_url(&url).is_ok(), "{url}");
            } else {
                assert!(check_url(&url).is_err(), "{url}");
            }
        }
        assert!(
            admitted > 45_000,
            "the generator mostly makes admissible URLs: {admitted}"
        );
        for good in [
            "http://127.0.0.1:8080/hook",
            "https://example.com/",
            "https://example.com",
            "HTTPS://Example.COM./a/b;c=d?x=1&y=%2F#".trim_end_matches('#'),
            "http://a_b.example-1.com:65535/~user/%E2%82%AC",
            "http://[::1]:9/",
            "http://[2001:db8::1]/",
            "http://[1:2:3:4:5:6:7::]/",
            "http://localhost/",
            "http://1.2.3.a/",
        ] {
            assert!(pattern.is_match(good), "{good}");
            assert!(check_url(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "ftp://example.com/",
            "https://u:p@example.com/",
            "https://example.com/#frag",
            "https://example.com:65536/",
            "https://example.com:/",
            "https://bücher.de/",
            "https://xn--a.com/",
            "https://xn--bcher-kva.de/",
            "https://a--b.com/",
            "https://-a.com/",
            "https://1.2.3.999/",
            "https://999/",
            "https://01.2.3.4/",
            "https://[::g]/",
            "https://[:::]/",
            "https://example.com/a b",
            "https://example.com/ü",
            "https://example.com/%zz",
            "https://example.com\\evil",
            " https://example.com/",
            "https://example.com/\n",
            "https:example.com",
            "https:///x",
        ] {
            assert!(!pattern.is_match(bad), "{bad:?}");
            assert!(check_url(bad).is_err(), "{bad:?}");
        }
        let long = format!("https://example.com/{}", "a".repeat(2048));
        assert!(check_url(&long).is_err());
    }

    /// The filter pattern and the library's filter check accept the same strings.
    #[test]
    fn filter_pattern_is_the_library_check() {
        let pattern = re(FILTER_PATTERN);
        let alphabet: Vec<char> = "aZ09._-:*.* é\0".chars().collect();
        let mut rng = Rng(0x5eed_0002);
        let mut cases: Vec<String> = (0..100_000)
            .map(|_| {
                let len = rng.below(8);
                rng.string(&alphabet, len)
            })
            .collect();
        for len in [253, 254, 255, 256, 257] {
            cases.push("a".repeat(len));
            cases.push(format!("{}.*", "a".repeat(len)));
            cases.push(format!(".{}", "a".repeat(len)));
        }
        let mut accepted = 0;
        for case in &cases {
            let library = crate::endpoint::validate_filter(case).is_ok();
            assert_eq!(pattern.is_match(case), library, "{case:?}");
            accepted += usize::from(library);
        }
        assert!(accepted > 1_000, "both sides are exercised: {accepted}");
    }

    /// The secret pattern and the secret parser accept the same strings.
    #[test]
    fn secret_pattern_is_the_parser() {
        use base64::Engine as _;
        let pattern = re(SECRET_PATTERN);
        let engines = [
            base64::engine::general_purpose::STANDARD,
            base64::engine::general_purpose::STANDARD_NO_PAD,
        ];
        let mut rng = Rng(0x5eed_0003);
        let mut accepted = 0;
        for _ in 0..20_000 {
            let len = rng.below(81);
            let key: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let mut encoded = rng.pick(&engines).encode(&key);
            match rng.below(6) {
                // A different last data character: stray bits or another key.
                0 if !encoded.is_empty() => {
                    let data = encoded.trim_end_matches('=').len();
                    let c = *rng.pick(&['A', 'B', 'Q', 'R', 'g', 'w', '/', '+', '=', '-']);
                    encoded.replace_range(data - 1..data, &c.to_string());
                }
                1 => encoded.push('='),
                2 => encoded.insert(rng.below(encoded.len() + 1), *rng.pick(&[' ', '\n', '_'])),
                _ => {}
            }
            let prefix = if rng.below(20) == 0 {
                "whsec"
            } else {
                "whsec_"
            };
            let secret = format!("{prefix}{encoded}");
            let parsed = crate::sign::Secret::parse(&secret).is_ok();
            assert_eq!(pattern.is_match(&secret), parsed, "{secret:?}");
            assert_eq!(check_secret(&secret).is_ok(), parsed, "{secret:?}");
            accepted += usize::from(parsed);
        }
        assert!(accepted > 2_000, "both sides are exercised: {accepted}");
    }

    fn utc(y: i64, mo: i64, d: i64, h: i64, mi: i64, s: i64) -> SystemTime {
        let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s;
        if secs >= 0 {
            UNIX_EPOCH + Duration::from_secs(secs as u64)
        } else {
            UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
        }
    }

    #[test]
    fn date_times_are_rfc_3339() {
        let noon = utc(2025, 1, 31, 12, 0, 0);
        for text in [
            "2025-01-31T12:00:00Z",
            "2025-01-31t12:00:00z",
            "2025-01-31T13:00:00+01:00",
            "2025-01-31T06:30:00-05:30",
            "2025-01-31T12:00:00+00:00",
            "2025-01-31T12:00:00-00:00",
            "2025-02-01T11:59:00+23:59",
            "2025-01-31T12:00:00.000000000000Z",
        ] {
            assert_eq!(parse_date_time(text), Some(noon), "{text}");
        }
        assert_eq!(
            parse_date_time("2025-01-31T12:00:00.25Z"),
            Some(noon + Duration::from_millis(250))
        );
        assert_eq!(
            parse_date_time("2025-01-31T12:00:00.1234567891Z"),
            Some(noon + Duration::from_nanos(123_456_789))
        );
        // Before 1970, and the ends of the range.
        assert_eq!(
            parse_date_time("0464-11-16T22:15:01.5-18:33"),
            Some(utc(464, 11, 17, 16, 48, 1) + Duration::from_millis(500))
        );
        assert_eq!(
            parse_date_time("1969-12-31T23:59:59Z"),
            Some(utc(1969, 12, 31, 23, 59, 59))
        );
        assert_eq!(
            parse_date_time("0000-01-01T00:00:00Z"),
            Some(utc(0, 1, 1, 0, 0, 0))
        );
        assert_eq!(
            parse_date_time("9999-12-31T23:59:59Z"),
            Some(utc(9999, 12, 31, 23, 59, 59))
        );
        assert_eq!(
            parse_date_time("2000-02-29T00:00:00Z"),
            Some(utc(2000, 2, 29, 0, 0, 0))
        );
        // A leap second is the instant after 23:59:59 UTC.
        assert_eq!(
            parse_date_time("2016-12-31T23:59:60Z"),
            Some(utc(2017, 1, 1, 0, 0, 0))
        );
        assert!(parse_date_time("2016-12-31T22:59:60-01:00").is_some());
        assert!(parse_date_time("2017-01-01T00:59:60+01:00").is_some());
        for bad in [
            "",
            "2025-01-31",
            "2025-01-31T12:00:00",
            "2025-01-31T12:00Z",
            "2025-01-31 12:00:00Z",
            " 2025-01-31T12:00:00Z",
            "2025-01-31T12:00:00Z ",
            "2025-01-31T12:00:00 01:00",
            "2025-01-31T12:00:00+0100",
            "2025-01-31T12:00:00+01",
            "2025-01-31T12:00:00+24:00",
            "2025-01-31T12:00:00+01:60",
            "2025-01-31T12:00:00.Z",
            "2025-01-31T12:00:00,5Z",
            "2025-01-31T24:00:00Z",
            "2025-01-31T12:60:00Z",
            "2025-01-31T12:00:61Z",
            "2025-01-31T12:00:60Z",
            "2016-12-31T23:59:60+01:00",
            "2025-00-10T12:00:00Z",
            "2025-13-10T12:00:00Z",
            "2025-02-29T12:00:00Z",
            "1900-02-29T12:00:00Z",
            "2025-04-31T12:00:00Z",
            "2025-01-00T12:00:00Z",
            "2025-1-31T12:00:00Z",
            "+2025-01-31T12:00:00Z",
            "12025-01-31T12:00:00Z",
            "2025-01-31T12:00:00ZZ",
            "2025-01-31T12:00:00\u{ff10}Z",
            "２025-01-31T12:00:00Z",
            "yesterday",
        ] {
            assert_eq!(parse_date_time(bad), None, "{bad:?}");
        }
        // What the API writes, it reads back.
        let mut rng = Rng(0x5eed_0004);
        for _ in 0..10_000 {
            let t = UNIX_EPOCH + Duration::from_micros(rng.next() % 253_402_300_799_000_000);
            let written = humantime::format_rfc3339_micros(t).to_string();
            assert_eq!(parse_date_time(&written), Some(t), "{written}");
        }
    }

    #[test]
    fn ids_are_positive_bigints_in_digits() {
        assert_eq!(parse_id("id", "1").unwrap(), 1);
        assert_eq!(parse_id("id", "007").unwrap(), 7);
        assert_eq!(parse_id("id", "9223372036854775807").unwrap(), i64::MAX);
        for bad in [
            "",
            "0",
            "-1",
            "+1",
            " 1",
            "1 ",
            "1.0",
            "1e3",
            "9223372036854775808",
            "x",
        ] {
            assert!(parse_id("id", bad).is_err(), "{bad:?}");
        }
        assert!(check_body_id("endpoint_id", Some(0)).is_err());
        assert!(check_body_id("endpoint_id", Some(-5)).is_err());
        assert_eq!(check_body_id("endpoint_id", Some(5)).unwrap(), Some(5));
        assert_eq!(check_body_id("endpoint_id", None).unwrap(), None);
        assert!(opt_id("after", Some(String::new())).is_err());
        assert_eq!(opt_id("after", None).unwrap(), None);
    }

    #[test]
    fn delivery_ids_and_cursors() {
        let id = |e, d| DeliveryId {
            event_id: e,
            endpoint_id: d,
        };
        assert_eq!(delivery_in_path("42:7").unwrap(), id(42, 7));
        assert_eq!(delivery_in_path("0:0").unwrap(), id(0, 0));
        for bad in [
            "", "42", "42:", ":7", "42:7:1", "-1:2", "1:-2", " 1:2", "1: 2", "a:b", "1%3A2",
        ] {
            assert_eq!(
                delivery_in_path(bad).unwrap_err().status(),
                StatusCode::BAD_REQUEST,
                "{bad:?}"
            );
        }
        for beyond in ["9223372036854775808:1", "1:99999999999999999999999"] {
            assert_eq!(
                delivery_in_path(beyond).unwrap_err().status(),
                StatusCode::NOT_FOUND,
                "{beyond}"
            );
        }
        // A cursor keeps exactly the deliveries (event, endpoint) < cursor.
        assert_eq!(delivery_cursor("5:3").unwrap(), Some(id(5, 3)));
        assert_eq!(
            delivery_cursor("5:9223372036854775808").unwrap(),
            Some(id(6, i64::MIN))
        );
        assert_eq!(
            delivery_cursor("9223372036854775807:9223372036854775808").unwrap(),
            None
        );
        assert_eq!(delivery_cursor("9223372036854775808:1").unwrap(), None);
        assert!(delivery_cursor("5").is_err());
    }

    #[test]
    fn query_values() {
        for (what, f) in [
            ("limit", opt_limit(Some(String::new())).map(|_| ())),
            ("state", opt_state(Some(String::new())).map(|_| ())),
            (
                "event_type",
                opt_event_type(Some(String::new())).map(|_| ()),
            ),
            (
                "since",
                opt_query_time("since", Some(String::new())).map(|_| ()),
            ),
        ] {
            assert!(f.is_err(), "an empty {what} is refused");
        }
        assert_eq!(
            opt_state(Some("dead".into())).unwrap().as_deref(),
            Some("dead")
        );
        assert!(opt_state(Some("DEAD".into())).is_err());
        let long = "é".repeat(255);
        assert!(
            opt_event_type(Some(long.clone())).is_ok(),
            "255 characters, 510 bytes"
        );
        assert!(opt_event_type(Some(format!("{long}é"))).is_err());
        assert!(opt_event_type(Some("a\0b".into())).is_err());
        assert!(check_description("a\0b").is_err());
        assert!(check_description("").is_ok());
        assert!(check_description(&"😀".repeat(1000)).is_ok());
        assert!(check_description(&"a".repeat(1001)).is_err());
        assert!(check_filters(&vec!["a".to_owned(); 100]).is_ok());
        assert!(check_filters(&vec!["a".to_owned(); 101]).is_err());
    }

    #[test]
    fn limits() {
        assert_eq!(opt_limit(None).unwrap(), None);
        assert_eq!(opt_limit(Some("3".into())).unwrap(), Some(3));
        assert_eq!(opt_limit(Some("1000".into())).unwrap(), Some(1000));
        for bad in [
            "0",
            "1001",
            "100000",
            "-1",
            "+5",
            "x",
            "99999999999",
            "99999999999999999999999",
            " 5",
        ] {
            assert_eq!(
                opt_limit(Some(bad.into())).unwrap_err().status(),
                StatusCode::BAD_REQUEST,
                "{bad}"
            );
        }
    }

    #[test]
    fn only_objects_are_bodies() {
        #[derive(Debug, serde::Deserialize)]
        struct Any {
            #[serde(default)]
            #[allow(dead_code)]
            a: Option<i64>,
        }
        for bad in ["[]", "[null]", "null", "1", "\"x\"", " [1]"] {
            assert!(parse_json::<Any>(true, bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(parse_json::<Any>(true, b" \n{\"a\": 1}").is_ok());
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
