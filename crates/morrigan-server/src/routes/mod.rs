//! The HTTP surface: the original's paths and bodies, each route annotated for the OpenAPI
//! document it is generated into.

pub mod auth;
pub mod capability;
pub mod client;
pub mod connection;
pub mod events;
pub mod extract;
pub mod limits;
pub mod message;
pub mod node;
mod responses;
pub mod system;
pub mod ui;
pub mod upgrade;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use tower_http::request_id::{
    MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;

use crate::error::ApiError;
use crate::state::AppState;

pub use extract::ApiJson;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Morrigan Server API",
        description = "Authorizes and manages the WebSocket connections of a device-management system. \
Operators authenticate with a user token (`Authorization: Bearer <token>` from `POST /api/auth`). \
Devices exchange their identity token (`POST /api/core/connection`, raw or Bearer in `Authorization`) \
for a 60-second single-use connection token, then open the WebSocket named by its `reportUrl` with \
the token in `Origin`, `Authorization: Bearer`, or `Sec-WebSocket-Protocol: morrigan, morrigan.token.<token>`."
    ),
    modifiers(&SecuritySchemes),
    tags(
        (name = "auth", description = "Operators: login and identities"),
        (name = "connection", description = "Connections: token exchange, WebSocket, records, send, close"),
        (name = "message", description = "Tracked messages: client sends with acks, replies and an offline outbox; message records; uplink messages"),
        (name = "client", description = "Clients (devices): provisioning"),
        (name = "capability", description = "Providers' and clients' capabilities"),
        (name = "node", description = "The nodes of the cluster"),
        (name = "system", description = "Health and keys"),
    )
)]
struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "userToken",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("An operator's user token from POST /api/auth."))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "identityToken",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "Authorization",
                "A device's identity token, raw (as the original) or as 'Bearer <token>'.",
            ))),
        );
        components.add_security_scheme(
            "connectionToken",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "Origin",
                "A connection token (single use). Also accepted as 'Authorization: Bearer <token>' \
                 or as the WebSocket sub-protocol 'morrigan.token.<token>'.",
            ))),
        );
    }
}

/// Every request's span: its id (`x-request-id`, generated unless the caller sent one, and
/// echoed in the response), method and path. Never the query or headers: no token is logged.
fn request_span(req: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let id = req
        .extensions()
        .get::<RequestId>()
        .and_then(|r| r.header_value().to_str().ok())
        .unwrap_or("");
    tracing::info_span!("request", id, method = %req.method(), path = req.uri().path())
}

/// Builds the router and the OpenAPI document generated from its route annotations.
pub fn build(state: AppState) -> (Router, utoipa::openapi::OpenApi) {
    let body_limit = state.config.max_message_size + 16 * 1024;
    let (router, openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(auth::routes())
        .merge(connection::routes())
        .merge(events::routes())
        .merge(client::routes())
        .merge(message::routes())
        .merge(capability::routes())
        .merge(node::routes())
        .merge(system::routes())
        .split_for_parts();
    let openapi = ui::complete(openapi);
    let router = router
        .merge(ui::router(openapi.clone()))
        .fallback(|| async { ApiError::not_found("No such route.") })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(limits::LimitsLayer::new(
            body_limit,
            state.config.http_body_timeout,
            state.metrics.clone(),
        ))
        .layer(
            tower::ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(TraceLayer::new_for_http().make_span_with(request_span))
                .layer(PropagateRequestIdLayer::x_request_id()),
        )
        .with_state(state);
    (router, openapi)
}
