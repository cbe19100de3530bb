//! The REST error type. Every error answers with JSON
//! `{"state":<kind>,"status":"failed","reason":<text>}` (see [`morrigan_protocol::api::ErrorBody`]).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use morrigan_protocol::api::ErrorBody;

use crate::store::StoreError;

/// A failed REST call.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub state: &'static str,
    pub reason: String,
    /// Seconds for a `Retry-After` header (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, state: &'static str, reason: impl Into<String>) -> Self {
        Self {
            status,
            state,
            reason: reason.into(),
            retry_after: None,
        }
    }
    /// The same error, answered with `Retry-After: <seconds>`.
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }
    /// 400: the request itself is wrong.
    pub fn bad_request(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "requestError", reason)
    }
    /// 401: no valid credentials.
    pub fn unauthorized(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "authenticationfailed", reason)
    }
    /// 403: credentials valid but not allowed, or a device token refused.
    pub fn forbidden(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", reason)
    }
    pub fn not_found(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "notFound", reason)
    }
    pub fn conflict(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", reason)
    }
    pub fn unavailable(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", reason)
    }
    pub fn timeout(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout", reason)
    }
    pub fn internal(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "serverError", reason)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "store failure");
        match e {
            StoreError::Conflict(_) => ApiError::conflict("conflicting record"),
            _ => ApiError::unavailable("the store is unavailable; retry later"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            state: self.state.to_string(),
            status: "failed".to_string(),
            reason: self.reason,
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
