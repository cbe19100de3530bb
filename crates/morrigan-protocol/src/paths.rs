//! HTTP paths of the Morrigan API. They are the original server's mount points
//! (`/api/<component>/<provider>`), kept so that existing devices and admin scripts work unchanged.

/// Login: `POST` `{"name","password"}` → `{"state":"success","token"}`.
pub const AUTH: &str = "/api/auth";
/// Identities (operators): `GET` list, `POST` create.
pub const IDENTITY: &str = "/api/auth/identity";
/// The caller's own identity: `GET`, `PATCH`.
pub const IDENTITY_ME: &str = "/api/auth/identity/me";
/// Connection provider root: `POST` with an identity token exchanges it for a connection token;
/// `GET` lists connection records.
pub const CONNECTION: &str = "/api/core/connection";
/// WebSocket endpoint (the `reportUrl` of every connection token).
pub const CONNECT: &str = "/api/core/connection/connect";
/// Client provider root: `GET` lists clients.
pub const CLIENT: &str = "/api/core/client";
/// `POST {"id"}` → the identity token as a JSON string.
pub const CLIENT_PROVISION: &str = "/api/core/client/provision";
/// Tracked messages: `GET /api/core/message/:id` reads one. Sends are
/// `POST /api/core/connection/:id/send` and `POST /api/core/client/:clientId/send`; a client's
/// messages are `GET /api/core/client/:clientId/messages`.
pub const MESSAGE: &str = "/api/core/message";
/// The nodes of the cluster: `GET` lists them.
pub const NODE: &str = "/api/core/node";
/// Capability provider root.
pub const CAPABILITY: &str = "/api/core/capability";
/// Liveness/readiness probe.
pub const HEALTHZ: &str = "/healthz";
/// Public halves of the signing keys, as a JSON Web Key Set.
pub const JWKS: &str = "/.well-known/jwks.json";
/// The OpenAPI document.
pub const API_DOCS: &str = "/api-docs";

/// The sub-protocol prefix a browser uses to carry the connection token:
/// `Sec-WebSocket-Protocol: morrigan.token.<jwt>` (browsers cannot set `Origin` or `Authorization`).
/// The server answers with the plain [`SUBPROTOCOL`] when it was offered too, otherwise it
/// echoes nothing (a browser that offered only the token value accepts a response without one
/// only if it offered no protocol, so offer both: `["morrigan", "morrigan.token.<jwt>"]`).
pub const TOKEN_SUBPROTOCOL_PREFIX: &str = "morrigan.token.";
/// The sub-protocol name the server selects when offered.
pub const SUBPROTOCOL: &str = "morrigan";
