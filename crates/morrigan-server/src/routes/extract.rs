//! Request extractors: the operator behind a user token, the client's address, a JSON body.

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::credentials::SessionRefusal;
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::IdentityRow;

/// A bearer token (`Authorization: Bearer <jwt>`, scheme case-insensitive).
fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// An authenticated operator: a valid, unrevoked user token whose identity exists (401
/// otherwise), and what it may do (403 otherwise).
#[derive(Debug, Clone)]
pub struct User {
    pub identity: IdentityRow,
    /// The `jti` of the token used, so a password change can keep this session.
    pub token_id: String,
}

impl User {
    /// 403 unless the identity holds every function in `required`.
    pub fn require(&self, required: &[&str]) -> Result<(), ApiError> {
        for f in required {
            if !self.identity.functions.iter().any(|g| g == f) {
                return Err(ApiError::forbidden(format!(
                    "This requires the function '{f}'."
                )));
            }
        }
        Ok(())
    }

    /// The functions of `functions` this identity does not hold, quoted, comma-separated.
    fn lacking<'a>(&self, functions: impl IntoIterator<Item = &'a str>) -> Option<String> {
        let mut lacking: Vec<String> = Vec::new();
        for f in functions {
            let quoted = format!("'{f}'");
            if !self.identity.functions.iter().any(|g| g == f) && !lacking.contains(&quoted) {
                lacking.push(quoted);
            }
        }
        (!lacking.is_empty()).then(|| lacking.join(", "))
    }

    /// 403 unless this identity holds every function in `functions`: nobody grants a
    /// function they do not hold (to another identity or, through its id, to itself).
    pub fn may_grant(&self, functions: &[String]) -> Result<(), ApiError> {
        match self.lacking(functions.iter().map(String::as_str)) {
            None => Ok(()),
            Some(list) => Err(ApiError::forbidden(format!(
                "You cannot grant functions you do not hold: {list}."
            ))),
        }
    }

    /// 403 unless this identity holds every function `target` holds: an identity changes or
    /// deletes only identities no more privileged than itself (no password reset of a
    /// superior, no stripping one).
    pub fn may_manage(&self, target: &IdentityRow) -> Result<(), ApiError> {
        match self.lacking(target.functions.iter().map(String::as_str)) {
            None => Ok(()),
            Some(list) => Err(ApiError::forbidden(format!(
                "Identity '{}' holds functions you do not hold: {list}.",
                target.name
            ))),
        }
    }
}

impl FromRequestParts<AppState> for User {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or_else(|| {
            ApiError::unauthorized("A user token is required: 'Authorization: Bearer <token>'.")
        })?;
        match state.credentials.session(token).await {
            Ok(session) => Ok(User {
                identity: session.identity,
                token_id: session.token_id,
            }),
            Err(SessionRefusal::Store(e)) => Err(e.into()),
            Err(refusal) => Err(ApiError::unauthorized(refusal.to_string())),
        }
    }
}

/// The client's address: the TCP peer, or behind a trusted proxy the address it forwards
/// (see [`crate::forwarded`]).
pub struct ClientAddress(pub String);

impl FromRequestParts<AppState> for ClientAddress {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let ConnectInfo(peer) = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .copied()
            .ok_or_else(|| ApiError::internal("the peer address is unknown"))?;
        Ok(ClientAddress(crate::forwarded::client_address(
            &state.config.trusted_proxies,
            peer,
            &parts.headers,
        )))
    }
}

/// A JSON request body. Unlike `axum::Json` it does not insist on a `Content-Type` (the
/// original's clients do not always send one) and it answers every failure with 400
/// `{"state":"requestError","reason"}` instead of a framework default such as 415 or 422.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            ApiError::new(
                e.status(),
                "requestError",
                format!("Could not read the body: {e}"),
            )
        })?;
        if bytes.is_empty() {
            return Err(ApiError::bad_request("A JSON body is required."));
        }
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| ApiError::bad_request(format!("Invalid JSON body: {e}")))
    }
}
