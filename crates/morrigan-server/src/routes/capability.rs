//! `/api/core/capability`.

use axum::Json;
use axum::extract::{Path, State};
use morrigan_protocol::message::Capability;
use morrigan_protocol::records::ClientCapabilities;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::User;
use super::responses::Refused;
use crate::auth::functions;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use morrigan_protocol::api::ErrorBody;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_capabilities))
        .routes(routes!(client_capabilities))
}

/// One entry per provider: name, version, messages, endpoints, functions.
#[utoipa::path(get, path = "/api/core/capability", tag = "capability", security(("userToken" = [])),
    responses((status = 200, body = Vec<Capability>),
              Refused))]
async fn list_capabilities(
    State(s): State<AppState>,
    user: User,
) -> ApiResult<Json<Vec<Capability>>> {
    user.require(&[functions::API])?;
    Ok(Json(s.providers.describe()))
}

/// What a client last reported with `capability.report`.
#[utoipa::path(get, path = "/api/core/capability/{clientId}", tag = "capability", security(("userToken" = [])),
    params(("clientId" = String, Path)),
    responses((status = 200, description = "{clientId, capabilities, reported}", body = Value),
              Refused,
              (status = 404, description = "No such client, or it has not reported", body = ErrorBody)))]
async fn client_capabilities(
    State(s): State<AppState>,
    user: User,
    Path(client_id): Path<String>,
) -> ApiResult<Json<ClientCapabilities>> {
    user.require(&[functions::API])?;
    s.store
        .capabilities(&client_id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("No capabilities reported by this client."))
}
