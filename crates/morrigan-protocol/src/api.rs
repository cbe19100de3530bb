//! REST request/response bodies and token claims.
//!
//! Success bodies keep the original's shapes (`{"state":"success",...}`, `{"status":"success"}`
//! for sends). Every error body carries both keys, `{"state":<kind>,"status":"failed","reason"}`,
//! because the original used `state` on most routes and `status` on send: a script that checks
//! either keeps working.

use serde::{Deserialize, Serialize};

/// `POST /api/auth`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LoginRequest {
    pub name: String,
    pub password: String,
    /// Ignored; accepted because the original's documents required it (`"password"`).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// `{"state":"success","token"}`: login and connection-token exchange.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenResponse {
    pub state: String,
    pub token: String,
}

/// `POST /api/core/client/provision`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProvisionRequest {
    /// The client's id: 1-128 characters of `[A-Za-z0-9_.:@-]`.
    pub id: String,
}

/// `{"status":"success"}` of a send/close.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StatusResponse {
    pub status: String,
}

/// Every error body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// The kind of failure: `requestError`, `authenticationFailed`, `forbidden`, `notFound`,
    /// `conflict`, `unavailable`, `serverError`, ...
    pub state: String,
    /// Always `failed`.
    pub status: String,
    /// A human-readable explanation.
    pub reason: String,
}

/// The audience claim tells the three token kinds apart, so one kind can never be used as another.
pub mod audience {
    pub const USER: &str = "morrigan:user";
    pub const IDENTITY: &str = "morrigan:identity";
    pub const CONNECTION: &str = "morrigan:connection";
}

/// Claims of every Morrigan JWT (EdDSA, `kid` = signing key id).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Claims {
    /// Identity id (user token), client id (identity token) or connection id (connection token).
    pub sub: String,
    /// The issuing node's id.
    pub iss: String,
    /// One of [`audience`].
    pub aud: String,
    pub iat: i64,
    pub exp: i64,
    /// The token's id; its record in the store has this id.
    pub jti: String,
    /// Connection tokens only: where to open the WebSocket (an `http(s)://` URL, as the original).
    #[serde(rename = "reportUrl", skip_serializing_if = "Option::is_none", default)]
    pub report_url: Option<String>,
}
