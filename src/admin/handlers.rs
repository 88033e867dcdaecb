//! One function per route. Each checks its input completely before touching the
//! database, then calls the library ([`crate::endpoint`], [`crate::inspect`],
//! [`crate::redrive`]); nothing here logs request bodies, secrets or payloads.

use std::time::SystemTime;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::AdminState;
use super::error::ApiError;
use super::input::{
    JsonBody, KeyPath, NoQuery, OptionalJsonBody, Params, PathParam, check_body_id,
    check_description, check_event_type, check_filters, check_headers, check_limit,
    check_ordering_key, check_secret, check_timeout, check_url, delivery_cursor, delivery_in_path,
    non_null, nullable, opt_event_type, opt_id, opt_limit, opt_ordering_key, opt_query_time,
    opt_state, opt_time, parse_id, query_value,
};
use crate::endpoint::{
    self, DeadHead, Endpoint, EndpointUpdate, MAX_IN_FLIGHT_RANGE, NewEndpoint, RATE_LIMIT_RANGE,
    StaticHeader,
};
use crate::inspect::{self, BlockedFilter, DeliveryFilter, DeliveryId, EventFilter};
use crate::redrive::{self, DeadFilter, KeyAction};

type Handled = Result<Response, ApiError>;

// ---------------------------------------------------------------------------------------
// Endpoints
// ---------------------------------------------------------------------------------------

// Optional fields are absent or a value: `null` is refused, as the document makes none
// of them nullable; but for the limits, where `null` is "no limit", as in an endpoint.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateEndpoint {
    url: String,
    #[serde(default, deserialize_with = "non_null")]
    event_types: Option<Vec<String>>,
    #[serde(default, deserialize_with = "non_null")]
    description: Option<String>,
    #[serde(default, deserialize_with = "non_null")]
    secret: Option<String>,
    #[serde(default, deserialize_with = "non_null")]
    headers: Option<Vec<StaticHeader>>,
    #[serde(default, deserialize_with = "non_null")]
    timeout_ms: Option<u64>,
    #[serde(default)]
    max_in_flight: Option<u64>,
    #[serde(default)]
    rate_limit: Option<u64>,
    // `null` is the global setting, as in an endpoint.
    #[serde(default)]
    ordering_dead_head: Option<DeadHead>,
}

#[derive(Serialize)]
struct CreatedEndpoint {
    #[serde(flatten)]
    endpoint: Endpoint,
    secret: String,
}

#[derive(Serialize)]
struct Items<T> {
    items: Vec<T>,
}

pub(super) async fn create_endpoint(
    State(state): State<AdminState>,
    JsonBody(body): JsonBody<CreateEndpoint>,
) -> Handled {
    let timeout = match body.timeout_ms {
        Some(ms) => check_timeout(ms, false)?,
        None => None,
    };
    let new = NewEndpoint {
        url: body.url,
        event_types: body.event_types.unwrap_or_default(),
        secret: body.secret,
        description: body.description.unwrap_or_default(),
        headers: body.headers.unwrap_or_default(),
        timeout,
        max_in_flight: check_limit("max_in_flight", body.max_in_flight, &MAX_IN_FLIGHT_RANGE)?,
        rate_limit: check_limit("rate_limit", body.rate_limit, &RATE_LIMIT_RANGE)?,
        ordering_dead_head: body.ordering_dead_head,
    };
    // Validate before taking a connection, so bad input never waits on the pool.
    check_url(&new.url)?;
    check_filters(&new.event_types)?;
    check_description(&new.description)?;
    check_headers(&new.headers)?;
    if let Some(secret) = &new.secret {
        check_secret(secret)?;
    }
    let conn = state.pool.get().await?;
    let (endpoint, secret) = endpoint::add(&*conn, new).await?;
    let location = HeaderValue::from_str(&format!("/v1/endpoints/{}", endpoint.id)).ok();
    let mut response = (
        StatusCode::CREATED,
        Json(CreatedEndpoint { endpoint, secret }),
    )
        .into_response();
    if let Some(location) = location {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

pub(super) async fn list_endpoints(
    State(state): State<AdminState>,
    Params(NoQuery {}): Params<NoQuery>,
) -> Handled {
    let conn = state.pool.get().await?;
    let items = endpoint::list(&*conn).await?;
    Ok(Json(Items { items }).into_response())
}

pub(super) async fn get_endpoint(
    State(state): State<AdminState>,
    PathParam(id): PathParam,
    Params(NoQuery {}): Params<NoQuery>,
) -> Handled {
    let id = parse_id("endpoint id", &id)?;
    let conn = state.pool.get().await?;
    Ok(Json(endpoint::get(&*conn, id).await?).into_response())
}

// Here `null` is allowed and means "leave it as it is", as the document says; but for
// the limits, where it means "no limit" (absent leaves them): 0 cannot mean that, as it
// reads like a pause.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PatchEndpoint {
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    event_types: Option<Vec<String>>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    active: Option<bool>,
    #[serde(default)]
    headers: Option<Vec<StaticHeader>>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default, deserialize_with = "nullable")]
    max_in_flight: Option<Option<u64>>,
    #[serde(default, deserialize_with = "nullable")]
    rate_limit: Option<Option<u64>>,
    #[serde(default, deserialize_with = "nullable")]
    ordering_dead_head: Option<Option<DeadHead>>,
}

pub(super) async fn update_endpoint(
    State(state): State<AdminState>,
    PathParam(id): PathParam,
    Params(NoQuery {}): Params<NoQuery>,
    JsonBody(body): JsonBody<PatchEndpoint>,
) -> Handled {
    let id = parse_id("endpoint id", &id)?;
    if let Some(url) = &body.url {
        check_url(url)?;
    }
    if let Some(filters) = &body.event_types {
        check_filters(filters)?;
    }
    if let Some(description) = &body.description {
        check_description(description)?;
    }
    if let Some(headers) = &body.headers {
        check_headers(headers)?;
    }
    let timeout = match body.timeout_ms {
        Some(ms) => Some(check_timeout(ms, true)?),
        None => None,
    };
    let change = EndpointUpdate {
        url: body.url,
        event_types: body.event_types,
        description: body.description,
        active: body.active,
        headers: body.headers,
        timeout,
        max_in_flight: body
            .max_in_flight
            .map(|n| check_limit("max_in_flight", n, &MAX_IN_FLIGHT_RANGE))
            .transpose()?,
        rate_limit: body
            .rate_limit
            .map(|n| check_limit("rate_limit", n, &RATE_LIMIT_RANGE))
            .transpose()?,
        ordering_dead_head: body.ordering_dead_head,
    };
    // One transaction: the fields and the parking or resuming land together or not at all.
    let mut conn = state.pool.get().await?;
    let tx = conn.transaction().await?;
    let endpoint = endpoint::update(&tx, id, change).await?;
    tx.commit().await?;
    Ok(Json(endpoint).into_response())
}

pub(super) async fn delete_endpoint(
    State(state): State<AdminState>,
    PathParam(id): PathParam,
    Params(NoQuery {}): Params<NoQuery>,
) -> Handled {
    let id = parse_id("endpoint id", &id)?;
    let mut conn = state.pool.get().await?;
    let tx = conn.transaction().await?;
    endpoint::remove(&tx, id).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RotateSecret {
    #[serde(default, deserialize_with = "non_null")]
    secret: Option<String>,
}

#[derive(Serialize)]
struct Rotated {
    secret: String,
    #[serde(with = "crate::time_format::option")]
    previous_secret_expires_at: Option<SystemTime>,
}

pub(super) async fn rotate_secret(
    State(state): State<AdminState>,
    PathParam(id): PathParam,
    Params(NoQuery {}): Params<NoQuery>,
    OptionalJsonBody(body): OptionalJsonBody<RotateSecret>,
) -> Handled {
    let id = parse_id("endpoint id", &id)?;
    if let Some(secret) = &body.secret {
        check_secret(secret)?;
    }
    let mut conn = state.pool.get().await?;
    let tx = conn.transaction().await?;
    let secret = endpoint::rotate_secret(&tx, id, body.secret, state.rotation_grace).await?;
    let endpoint = endpoint::get(&tx, id).await?;
    tx.commit().await?;
    Ok(Json(Rotated {
        secret,
        previous_secret_expires_at: endpoint.previous_secret_expires_at,
    })
    .into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EnableEndpoint {
    #[serde(default)]
    discard_backlog: bool,
}

#[derive(Serialize)]
struct Enabled {
    resumed: u64,
    discarded: u64,
}

/// Enables an endpoint: its parked deliveries resume, or with `discard_backlog` become
/// `discarded` instead, in the statement that enables it.
pub(super) async fn enable_endpoint(
    State(state): State<AdminState>,
    PathParam(id): PathParam,
    OptionalJsonBody(body): OptionalJsonBody<EnableEndpoint>,
) -> Handled {
    let id = parse_id("endpoint id", &id)?;
    let mut conn = state.pool.get().await?;
    let enabled = if body.discard_backlog {
        let discarded = endpoint::enable_discarding_backlog(&mut *conn, id).await?;
        Enabled {
            resumed: 0,
            discarded,
        }
    } else {
        let resumed = endpoint::enable(&*conn, id).await?;
        Enabled {
            resumed,
            discarded: 0,
        }
    };
    Ok(Json(enabled).into_response())
}

#[derive(Serialize)]
struct CircuitClosed {
    /// Whether it was open or half-open.
    was_open: bool,
    /// The endpoint as it now is.
    endpoint: Endpoint,
}

/// Closes an endpoint's circuit by hand; its due deliveries go out at once.
pub(super) async fn close_circuit(
    State(state): State<AdminState>,
    PathParam(id): PathParam,
    Params(NoQuery {}): Params<NoQuery>,
) -> Handled {
    let id = parse_id("endpoint id", &id)?;
    let mut conn = state.pool.get().await?;
    let tx = conn.transaction().await?;
    let was_open = endpoint::close_circuit(&tx, id).await?;
    let endpoint = endpoint::get(&tx, id).await?;
    tx.commit().await?;
    Ok(Json(CircuitClosed { was_open, endpoint }).into_response())
}

#[derive(Serialize)]
struct OneDelivery {
    delivery_id: DeliveryId,
}

pub(super) async fn send_test(
    State(state): State<AdminState>,
    PathParam(id): PathParam,
    Params(NoQuery {}): Params<NoQuery>,
) -> Handled {
    let id = parse_id("endpoint id", &id)?;
    let conn = state.pool.get().await?;
    let endpoint = endpoint::get(&*conn, id).await?;
    if !endpoint.active {
        return Err(ApiError::conflict(format!(
            "endpoint {id} is disabled; enable it (PATCH active=true) before sending a test event"
        )));
    }
    let delivery_id = redrive::send_test(&*conn, id).await?;
    Ok((StatusCode::ACCEPTED, Json(OneDelivery { delivery_id })).into_response())
}

// ---------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventQuery {
    event_type: Option<String>,
    since: Option<String>,
    until: Option<String>,
    after: Option<String>,
    limit: Option<String>,
}

pub(super) async fn list_events(
    State(state): State<AdminState>,
    Params(query): Params<EventQuery>,
) -> Handled {
    // A window with since at or after until is valid and matches nothing.
    let filter = EventFilter {
        event_type: opt_event_type(query.event_type)?,
        since: opt_query_time("since", query.since)?,
        until: opt_query_time("until", query.until)?,
        after: opt_id("after", query.after)?,
        limit: opt_limit(query.limit)?,
    };
    let conn = state.pool.get().await?;
    Ok(Json(inspect::list_events(&*conn, &filter).await?).into_response())
}

pub(super) async fn get_event(
    State(state): State<AdminState>,
    PathParam(id): PathParam,
    Params(NoQuery {}): Params<NoQuery>,
) -> Handled {
    let id = parse_id("event id", &id)?;
    let conn = state.pool.get().await?;
    Ok(Json(inspect::get_event(&*conn, id).await?).into_response())
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReplayEvent {
    #[serde(default, deserialize_with = "non_null")]
    endpoint_id: Option<i64>,
}

#[derive(Serialize)]
struct Deliveries {
    deliveries: Vec<DeliveryId>,
}

pub(super) async fn replay_event(
    State(state): State<AdminState>,
    PathParam(id): PathParam,
    Params(NoQuery {}): Params<NoQuery>,
    OptionalJsonBody(body): OptionalJsonBody<ReplayEvent>,
) -> Handled {
    let id = parse_id("event id", &id)?;
    let endpoint_id = check_body_id("endpoint_id", body.endpoint_id)?;
    let conn = state.pool.get().await?;
    let event = inspect::get_event(&*conn, id).await?;
    if event.processed_at.is_none() {
        return Err(ApiError::conflict(format!(
            "event {id} has not been fanned out yet; it will be delivered without a replay"
        )));
    }
    let deliveries = redrive::replay(&*conn, id, endpoint_id).await?;
    Ok((StatusCode::ACCEPTED, Json(Deliveries { deliveries })).into_response())
}

// ---------------------------------------------------------------------------------------
// Deliveries
// ---------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeliveryQuery {
    state: Option<String>,
    endpoint_id: Option<String>,
    event_type: Option<String>,
    since: Option<String>,
    until: Option<String>,
    after: Option<String>,
    limit: Option<String>,
}

pub(super) async fn list_deliveries(
    State(state): State<AdminState>,
    Params(query): Params<DeliveryQuery>,
) -> Handled {
    // A cursor past the id range has every delivery before it: no condition.
    let after = query_value("after", query.after)?
        .map(|after| delivery_cursor(&after))
        .transpose()?
        .flatten();
    // A window with since at or after until is valid and matches nothing.
    let filter = DeliveryFilter {
        state: opt_state(query.state)?,
        endpoint_id: opt_id("endpoint_id", query.endpoint_id)?,
        event_type: opt_event_type(query.event_type)?,
        since: opt_query_time("since", query.since)?,
        until: opt_query_time("until", query.until)?,
        after,
        limit: opt_limit(query.limit)?,
    };
    let conn = state.pool.get().await?;
    Ok(Json(inspect::list_deliveries(&*conn, &filter).await?).into_response())
}

pub(super) async fn get_delivery(
    State(state): State<AdminState>,
    PathParam(id): PathParam,
    Params(NoQuery {}): Params<NoQuery>,
) -> Handled {
    let id = delivery_in_path(&id)?;
    let conn = state.pool.get().await?;
    Ok(Json(inspect::get_delivery(&*conn, id).await?).into_response())
}

pub(super) async fn retry_delivery(
    State(state): State<AdminState>,
    PathParam(id): PathParam,
    Params(NoQuery {}): Params<NoQuery>,
) -> Handled {
    let id = delivery_in_path(&id)?;
    let conn = state.pool.get().await?;
    let retried = redrive::retry_dead(&*conn, &[id]).await?;
    if retried.is_empty() {
        // Not dead: say whether it exists at all, and if so what it is instead.
        let current = inspect::get_delivery(&*conn, id).await?;
        return Err(ApiError::conflict(format!(
            "delivery {id} is {}; only dead deliveries can be retried \
             (POST /v1/events/{}/replay sends a finished event again)",
            current.delivery.state, id.event_id
        )));
    }
    Ok((StatusCode::ACCEPTED, Json(OneDelivery { delivery_id: id })).into_response())
}

// ---------------------------------------------------------------------------------------
// Ordered keys
// ---------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BlockedQuery {
    after: Option<String>,
    limit: Option<String>,
}

/// An endpoint's blocked keys, by key, paged.
pub(super) async fn list_blocked(
    State(state): State<AdminState>,
    PathParam(id): PathParam,
    Params(query): Params<BlockedQuery>,
) -> Handled {
    let endpoint_id = parse_id("endpoint id", &id)?;
    let filter = BlockedFilter {
        endpoint_id,
        after: opt_ordering_key("after", query.after)?,
        limit: opt_limit(query.limit)?,
    };
    let conn = state.pool.get().await?;
    Ok(Json(inspect::list_blocked(&*conn, &filter).await?).into_response())
}

/// The answer to a re-drive or discard that changed nothing: 409, saying why.
fn not_blocked(endpoint_id: i64, key: &str) -> ApiError {
    ApiError::conflict(format!(
        "ordering key {key:?} of endpoint {endpoint_id} is not blocked: its head is \
         pending, in flight or parked"
    ))
}

/// Re-drives a blocked key's dead head; the key resumes in order.
pub(super) async fn redrive_blocked(
    State(state): State<AdminState>,
    KeyPath(id, key): KeyPath,
    Params(NoQuery {}): Params<NoQuery>,
) -> Handled {
    let endpoint_id = parse_id("endpoint id", &id)?;
    let key = check_ordering_key("ordering key", key)?;
    let conn = state.pool.get().await?;
    match redrive::redrive_blocked(&*conn, endpoint_id, &key).await? {
        KeyAction::Done(delivery_id) => {
            Ok((StatusCode::ACCEPTED, Json(OneDelivery { delivery_id })).into_response())
        }
        KeyAction::NotBlocked => Err(not_blocked(endpoint_id, &key)),
    }
}

/// Discards a blocked key's dead head; the key's next delivery goes.
pub(super) async fn discard_blocked(
    State(state): State<AdminState>,
    KeyPath(id, key): KeyPath,
    Params(NoQuery {}): Params<NoQuery>,
) -> Handled {
    let endpoint_id = parse_id("endpoint id", &id)?;
    let key = check_ordering_key("ordering key", key)?;
    let mut conn = state.pool.get().await?;
    match redrive::discard_blocked(&mut *conn, endpoint_id, &key).await? {
        KeyAction::Done(delivery_id) => {
            Ok((StatusCode::OK, Json(OneDelivery { delivery_id })).into_response())
        }
        KeyAction::NotBlocked => Err(not_blocked(endpoint_id, &key)),
    }
}

// ---------------------------------------------------------------------------------------
// Dead deliveries in bulk, statistics
// ---------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RetryDead {
    #[serde(default, deserialize_with = "non_null")]
    endpoint_id: Option<i64>,
    #[serde(default, deserialize_with = "non_null")]
    event_type: Option<String>,
    #[serde(default, deserialize_with = "non_null")]
    since: Option<String>,
    #[serde(default, deserialize_with = "non_null")]
    until: Option<String>,
}

#[derive(Serialize)]
struct Retried {
    retried: usize,
    deliveries: Vec<DeliveryId>,
}

pub(super) async fn retry_dead(
    State(state): State<AdminState>,
    Params(NoQuery {}): Params<NoQuery>,
    JsonBody(body): JsonBody<RetryDead>,
) -> Handled {
    // A window with since at or after until is valid and matches nothing.
    let filter = DeadFilter {
        endpoint_id: check_body_id("endpoint_id", body.endpoint_id)?,
        event_type: check_event_type("event_type", body.event_type)?,
        since: opt_time("since", body.since)?,
        until: opt_time("until", body.until)?,
    };
    let conn = state.pool.get().await?;
    let deliveries = redrive::retry_dead_matching(&*conn, &filter).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Retried {
            retried: deliveries.len(),
            deliveries,
        }),
    )
        .into_response())
}

pub(super) async fn stats(
    State(state): State<AdminState>,
    Params(NoQuery {}): Params<NoQuery>,
) -> Handled {
    let conn = state.pool.get().await?;
    Ok(Json(inspect::stats(&*conn).await?).into_response())
}

pub(super) async fn openapi(Params(NoQuery {}): Params<NoQuery>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        super::OPENAPI_JSON,
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------
// Fallbacks
// ---------------------------------------------------------------------------------------

pub(super) async fn no_route() -> ApiError {
    ApiError::not_found("no such route; GET /openapi.json lists them")
}

pub(super) async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}
