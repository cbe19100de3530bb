//! `/api/core/node`: the nodes of the cluster and their state.

use axum::Json;
use axum::extract::State;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::User;
use super::responses::Refused;
use crate::auth::functions;
use crate::error::ApiResult;
use crate::state::AppState;
use crate::store::NodeRow;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_nodes))
}

/// Every node that ever registered: id, public URL, version, start, lease expiry, and state
/// (`running`, `stopped` after a clean stop, `lost` when its lease lapsed).
#[utoipa::path(get, path = "/api/core/node", tag = "node", security(("userToken" = [])),
    responses((status = 200, body = Vec<NodeRow>),
              Refused))]
async fn list_nodes(State(s): State<AppState>, user: User) -> ApiResult<Json<Vec<NodeRow>>> {
    user.require(&[functions::API])?;
    Ok(Json(s.store.nodes().await?))
}
