//! Health and keys.

use axum::Json;
use axum::extract::State;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ApiResult;
use crate::state::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(jwks))
}

/// Liveness and readiness: 200 once the node accepts connections, 503 while it shuts down.
#[utoipa::path(get, path = "/healthz", tag = "system",
    responses((status = 200, description = "Serving", body = serde_json::Value),
              (status = 503, description = "Shutting down")))]
async fn healthz(State(s): State<AppState>) -> (axum::http::StatusCode, Json<serde_json::Value>) {
    let status = if s.shutdown.is_cancelled() {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    } else {
        axum::http::StatusCode::OK
    };
    (
        status,
        // Public, so it names no node id, version or load: an unauthenticated caller learns
        // only whether the node serves. Operators get those from /api/core/node.
        Json(serde_json::json!({
            "status": if status.is_success() { "ok" } else { "stopping" },
        })),
    )
}

/// The public halves of every node's signing key (JWKS, Ed25519 `OKP` keys).
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "system",
    responses((status = 200, description = "JSON Web Key Set", body = serde_json::Value)))]
async fn jwks(State(s): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(s.credentials.tokens().jwks().await?))
}
