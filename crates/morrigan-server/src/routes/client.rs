//! `/api/core/client`: provisioning devices.

use axum::Json;
use axum::extract::{Path, State};
use morrigan_protocol::api::{DeprovisionResponse, ProvisionRequest};
use morrigan_protocol::close;
use morrigan_protocol::records::ClientRecord;
use morrigan_protocol::time_format;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiJson;
use super::extract::User;
use super::responses::{BadRequest, NotFound, Refused};
use crate::auth::functions;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::store::CloseInfo;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(provision))
        .routes(routes!(list_clients))
        .routes(routes!(get_client, delete_client))
}

/// Client ids: 1-128 characters, no control characters and no `/` (they appear in paths).
/// Free text such as `MyComputer` stays valid, as in the original.
pub fn valid_client_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && !id.chars().any(|c| c.is_control() || c == '/')
}

/// Provisions a client (creating it if new) and returns a new 30-day identity token as a JSON
/// string. Earlier identity tokens of the client are revoked.
#[utoipa::path(post, path = "/api/core/client/provision", tag = "client", security(("userToken" = [])),
    request_body = ProvisionRequest,
    responses((status = 200, description = "The identity token, as a JSON string literal", body = String),
              BadRequest,
              Refused))]
async fn provision(
    State(s): State<AppState>,
    user: User,
    ApiJson(req): ApiJson<ProvisionRequest>,
) -> ApiResult<Json<String>> {
    user.require(&[functions::API])?;
    if !valid_client_id(&req.id) {
        return Err(ApiError::bad_request(
            "Invalid client id (1-128 characters, no control characters or '/').",
        ));
    }
    s.store.upsert_client(&req.id, &time_format::now()).await?;
    let issued = s
        .credentials
        .provision(&req.id)
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    tracing::info!(by = %user.identity.name, client = %req.id, jti = %issued.claims.jti, "client provisioned");
    Ok(Json(issued.token))
}

/// Lists provisioned clients.
#[utoipa::path(get, path = "/api/core/client", tag = "client", security(("userToken" = [])),
    responses((status = 200, body = Vec<Value>),
              Refused))]
async fn list_clients(State(s): State<AppState>, user: User) -> ApiResult<Json<Vec<ClientRecord>>> {
    user.require(&[functions::API])?;
    Ok(Json(s.store.clients().await?))
}

/// One client.
#[utoipa::path(get, path = "/api/core/client/{clientId}", tag = "client", security(("userToken" = [])),
    params(("clientId" = String, Path)),
    responses((status = 200, body = Value),
              Refused,
              NotFound))]
async fn get_client(
    State(s): State<AppState>,
    user: User,
    Path(client_id): Path<String>,
) -> ApiResult<Json<ClientRecord>> {
    user.require(&[functions::API])?;
    s.store
        .client(&client_id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("No such client."))
}

/// Deprovisions a client: deletes it, revokes every identity token it holds and closes its
/// connections with code 4003.
#[utoipa::path(delete, path = "/api/core/client/{clientId}", tag = "client", security(("userToken" = [])),
    params(("clientId" = String, Path)),
    responses((status = 200, body = Value),
              Refused,
              NotFound))]
async fn delete_client(
    State(s): State<AppState>,
    user: User,
    Path(client_id): Path<String>,
) -> ApiResult<Json<DeprovisionResponse>> {
    user.require(&[functions::API])?;
    // The records are closed even when the client is already gone: a DELETE retried after its
    // first attempt failed half-way (client deleted, records not closed) finishes the job.
    let existed = s.store.delete_client(&client_id).await?;
    let now = time_format::now();
    let reason = "client deprovisioned";
    let closed = s
        .store
        .close_client_connections(
            &client_id,
            &CloseInfo {
                at: &now,
                code: close::REVOKED,
                reason,
            },
        )
        .await?;
    if !existed && closed.is_empty() {
        return Err(ApiError::not_found("No such client."));
    }
    s.tracker.client_gone(&client_id).await;
    futures_util::future::join_all(
        closed
            .iter()
            .map(|record| crate::delivery::close_anywhere(&s, record, close::REVOKED, reason)),
    )
    .await;
    tracing::info!(by = %user.identity.name, client = %client_id, closed = closed.len(), "client deprovisioned");
    Ok(Json(DeprovisionResponse {
        state: "success".into(),
        closed_connections: closed.len(),
    }))
}
