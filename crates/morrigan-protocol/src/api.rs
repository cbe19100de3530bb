//! REST request/response bodies and token claims.
//!
//! Success bodies keep the original's shapes (`{"state":"success",...}`, `{"status":"success"}`
//! for sends). Every error body carries both keys, `{"state":<kind>,"status":"failed","reason"}`,
//! because the original used `state` on most routes and `status` on send: a script that checks
//! either keeps working.

use serde::{Deserialize, Serialize};

use crate::records::Identity;

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

/// `{"state":"success","closedConnections"}`: `DELETE /api/core/client/:id` (deprovisioning).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct DeprovisionResponse {
    pub state: String,
    /// How many of the client's connection records were open and are now closed (4003).
    pub closed_connections: usize,
}

/// The body of `POST /api/auth/identity` (create: `name` and `auth` required) and of `PATCH
/// /api/auth/identity/:id` or `/me` (each field present is changed). Absent fields are left
/// out when serialized.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IdentityRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthDetails>,
    /// The functions the identity holds (a change replaces the whole list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub functions: Option<Vec<String>>,
}

/// How an identity authenticates: `{"type":"password","password"}`. Unknown fields are refused.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AuthDetails {
    /// Only `password` exists.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

/// `{"state":"success","identity"}`: an identity read, created or changed
/// (`/api/auth/identity`, `/api/auth/identity/:id`, `/api/auth/identity/me`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IdentityResponse {
    pub state: String,
    pub identity: Identity,
}

/// `{"state":"success","identities":[..]}`: `GET /api/auth/identity`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IdentityList {
    pub state: String,
    pub identities: Vec<Identity>,
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn identity_request_sends_only_what_it_changes() {
        let grant = IdentityRequest {
            functions: Some(vec!["api".into()]),
            ..IdentityRequest::default()
        };
        assert_eq!(
            serde_json::to_value(&grant).unwrap(),
            json!({"functions": ["api"]})
        );
        let create = IdentityRequest {
            name: Some("ops".into()),
            auth: Some(AuthDetails {
                kind: Some("password".into()),
                password: Some("secret-123".into()),
            }),
            functions: Some(vec![]),
        };
        assert_eq!(
            serde_json::to_value(&create).unwrap(),
            json!({"name": "ops", "auth": {"type": "password", "password": "secret-123"}, "functions": []})
        );
        let unknown = json!({"auth": {"type": "password", "password": "x", "otp": "1"}});
        assert!(serde_json::from_value::<IdentityRequest>(unknown).is_err());
    }

    #[test]
    fn answers_read_as_served() {
        let answer: DeprovisionResponse =
            serde_json::from_value(json!({"state": "success", "closedConnections": 2})).unwrap();
        assert_eq!(answer.closed_connections, 2);
        let identity = json!({"id": "i", "name": "admin", "functions": ["api"], "created": "t"});
        let one: IdentityResponse =
            serde_json::from_value(json!({"state": "success", "identity": identity})).unwrap();
        assert_eq!(one.identity.name, "admin");
        let list: IdentityList =
            serde_json::from_value(json!({"state": "success", "identities": [identity]})).unwrap();
        assert_eq!(list.identities, [one.identity]);
    }
}
