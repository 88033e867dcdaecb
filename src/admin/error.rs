//! The admin API's one error shape: `{"error": {"code": "...", "message": "..."}}`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::Error;

/// An error answer. Every status the admin API sends other than 2xx is one of these,
/// so clients can rely on `error.code` (stable, machine-readable) and show
/// `error.message` (for people; wording may change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 `invalid_input`: the request is malformed; the message says how.
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_input", message)
    }

    /// 401 `unauthorized`: no valid bearer token. Says nothing about the route.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required",
        )
    }

    /// 404 `not_found`: the named thing does not exist.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 405 `method_not_allowed`: the path exists, the method does not.
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this method is not allowed on this path",
        )
    }

    /// 409 `conflict`: the request is well formed but the thing is in the wrong state.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// 413 `payload_too_large`.
    pub fn payload_too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }

    /// 500 `internal`, with a generic message: the detail goes to the log only.
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; the server log has the details",
        )
    }

    /// The HTTP status.
    #[cfg(test)]
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<Error> for ApiError {
    /// Input errors become 400 with the library's message (which never includes a
    /// secret: secret errors say what is wrong with it, not what it was); `NotFound`
    /// becomes 404; everything else is logged and becomes a generic 500.
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidEndpoint(_)
            | Error::InvalidInput(_)
            | Error::InvalidEvent(_)
            | Error::Config(_) => Self::invalid_input(e.to_string()),
            Error::NotFound(_) => Self::not_found(e.to_string()),
            Error::Db(_)
            | Error::Pool(_)
            | Error::CannotSettle(_)
            | Error::ReadOnlyDatabase(_)
            | Error::Migration { .. }
            | Error::MigrationChanged { .. }
            | Error::RowShape { .. }
            | Error::HttpClient(_) => {
                tracing::error!(error = %e, "admin API request failed");
                Self::internal()
            }
        }
    }
}

impl From<bb8::RunError<tokio_postgres::Error>> for ApiError {
    fn from(e: bb8::RunError<tokio_postgres::Error>) -> Self {
        Error::Pool(e).into()
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::Db(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: Inner {
                code: self.code,
                message: &self.message,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"outboxd-admin\""),
            );
        }
        response
    }
}
