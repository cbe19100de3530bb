//! `/api/core/connection`: token exchange, the WebSocket endpoint, records, send and close.

use std::net::SocketAddr;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State, rejection::QueryRejection};
use axum::http::header::{AUTHORIZATION, ORIGIN, SEC_WEBSOCKET_PROTOCOL};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use morrigan_protocol::api::{StatusResponse, TokenResponse};
use morrigan_protocol::close;
use morrigan_protocol::message::MessageType;
use morrigan_protocol::paths::{SUBPROTOCOL, TOKEN_SUBPROTOCOL_PREFIX};
use morrigan_protocol::records::ConnectionRecord;
use morrigan_protocol::time_format;
use serde::Deserialize;
use serde_json::Value;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::{ClientAddress, User};
use super::responses::{BadRequest, Conflict, NotFound, Refused, Timeout, Unavailable};
use super::upgrade::{Socket, Upgrade};
use crate::admission::{self, Admitted, Refusal};
use crate::auth::functions;
use crate::delivery::{self, DeliveryError};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::store::{CloseInfo, ConnectionFilter};
use morrigan_protocol::api::ErrorBody;
use morrigan_protocol::messages::SendResult;

/// Largest page of records one list call returns.
pub const MAX_LIST: u32 = 10_000;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(request_token, list_connections))
        .routes(routes!(connect))
        .routes(routes!(get_connection, close_connection))
        .routes(routes!(send))
}

/// The identity token from `Authorization`: raw (as the original's devices send it) or
/// `Bearer <token>`.
fn identity_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
    let token = match value.split_once(' ') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
        _ => value,
    };
    (!token.is_empty()).then_some(token)
}

/// A refused token exchange (403, as the original's devices expect).
fn identity_refused(reason: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "authenticationfailed", reason.into())
}

/// Exchanges a device's identity token for a single-use connection token (60 s by default)
/// whose `reportUrl` claim names the WebSocket endpoint.
#[utoipa::path(post, path = "/api/core/connection", tag = "connection",
    security(("identityToken" = [])),
    request_body(content = Option<Value>, description = "Ignored (the original device sends {idtoken, traceId})"),
    responses((status = 200, body = TokenResponse),
              (status = 400, description = "No token provided", body = ErrorBody),
              (status = 403, description = "Identity token invalid, expired, revoked, or client deprovisioned", body = ErrorBody)))]
async fn request_token(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ClientAddress(address): ClientAddress,
    headers: HeaderMap,
) -> ApiResult<Json<TokenResponse>> {
    let token = admission::exchange(&s, identity_token(&headers), address)
        .await
        .map_err(|r| exchange_refused(r, peer))?;
    Ok(Json(TokenResponse {
        state: "success".into(),
        token,
    }))
}

/// What a device is told when its exchange is refused: 400 without a token, else 403 (as the
/// original's devices expect), 503 when the store failed.
fn exchange_refused(r: Refusal, peer: SocketAddr) -> ApiError {
    match r {
        Refusal::Missing => ApiError::bad_request("No token provided."),
        Refusal::Store(e) => e.into(),
        Refusal::Internal(e) => ApiError::internal(e),
        Refusal::Unavailable(why) => ApiError::unavailable(why),
        Refusal::Token(e) => {
            tracing::info!(%peer, reason = %e, "identity token refused");
            identity_refused(format!("Identity token refused: {e}."))
        }
        Refusal::Revoked => identity_refused("Identity token has been revoked."),
        Refusal::NotIssued => {
            identity_refused("Identity token refused: it is not the token issued.")
        }
        Refusal::Deprovisioned => identity_refused("Client is no longer provisioned."),
        other => identity_refused(format!("Identity token refused: {other}.")),
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct ListQuery {
    /// Only this client's connections.
    client_id: Option<String>,
    /// Only connections held by this node.
    server_id: Option<String>,
    /// Only open (`true`) or closed (`false`) records.
    open: Option<bool>,
    /// At most this many records, newest first (default and maximum 10000).
    limit: Option<u32>,
}

/// Lists connection records of every node, newest first.
#[utoipa::path(get, path = "/api/core/connection", tag = "connection", security(("userToken" = [])),
    params(ListQuery),
    responses((status = 200, body = Vec<Value>),
              BadRequest,
              Refused))]
async fn list_connections(
    State(s): State<AppState>,
    user: User,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<ConnectionRecord>>> {
    user.require(&[functions::API])?;
    let Query(q) = query.map_err(|e| ApiError::bad_request(format!("Invalid query: {e}")))?;
    let filter = ConnectionFilter {
        client_id: q.client_id,
        server_id: q.server_id,
        open: q.open,
        limit: q.limit.unwrap_or(MAX_LIST).clamp(1, MAX_LIST),
    };
    Ok(Json(s.store.connections(&filter).await?))
}

/// One connection record.
#[utoipa::path(get, path = "/api/core/connection/{id}", tag = "connection", security(("userToken" = [])),
    params(("id" = String, Path, description = "Connection id")),
    responses((status = 200, body = Value),
              Refused,
              NotFound))]
async fn get_connection(
    State(s): State<AppState>,
    user: User,
    Path(id): Path<String>,
) -> ApiResult<Json<ConnectionRecord>> {
    user.require(&[functions::API])?;
    s.store
        .connection(&id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("No such connection."))
}

/// Pushes a JSON message to a connection. Without `track` it is written byte for byte and the
/// answer comes once the frame is on the socket. With `track=ack|reply` the frame carries a
/// `messageId` and the answer waits (up to `timeout`, default 10 s) for the device's
/// `connection.ack` or `connection.reply`: see `POST /api/core/client/{clientId}/send` for the
/// answers' shapes.
///
/// Needs the functions `api` and `connection.send`.
#[utoipa::path(post, path = "/api/core/connection/{id}/send", tag = "connection", security(("userToken" = [])),
    params(("id" = String, Path, description = "Connection id"), super::message::SendQuery),
    request_body(content = Value, description = "A JSON object with a string `type` (`<provider>.<message>`); delivered as sent"),
    responses((status = 200, description = "Written (untracked: `{\"status\":\"success\"}`), or acknowledged/answered (tracked)", body = SendResult),
              (status = 422, description = "Tracked: the device refused it (`connection.nack`)", body = SendResult),
              (status = 400, description = "Not a JSON object with a valid type", body = ErrorBody),
              (status = 401, body = ErrorBody),
              (status = 403, description = "Missing function connection.send", body = ErrorBody),
              NotFound,
              (status = 409, description = "Connection closed or not established", body = ErrorBody),
              Unavailable,
              Timeout))]
async fn send(
    State(s): State<AppState>,
    user: User,
    Path(id): Path<String>,
    query: Result<Query<super::message::SendQuery>, QueryRejection>,
    body: Bytes,
) -> ApiResult<Response> {
    user.require(&[functions::API, functions::CONNECTION_SEND])?;
    let Query(query) = query.map_err(|e| ApiError::bad_request(format!("Invalid query: {e}")))?;
    let text =
        std::str::from_utf8(&body).map_err(|_| ApiError::bad_request("The body is not UTF-8."))?;
    if query.track.as_deref().is_some_and(|t| t != "none") {
        return super::message::connection_send(&s, &id, &query, text).await;
    }
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ApiError::bad_request(format!("Invalid JSON body: {e}")))?;
    let ty = value
        .as_object()
        .ok_or_else(|| ApiError::bad_request("The message must be a JSON object."))?
        .get("type")
        .ok_or_else(|| ApiError::bad_request("No message type specified."))?
        .as_str()
        .ok_or_else(|| ApiError::bad_request("The message type must be a string."))?;
    MessageType::parse(ty)
        .map_err(|e| ApiError::bad_request(format!("Invalid message type: {e}.")))?;
    let started = std::time::Instant::now();
    let result = delivery::send(&s, &id, text.to_string()).await;
    let outcome = match &result {
        Ok(()) => "ok",
        Err(DeliveryError::Closed(_) | DeliveryError::NotEstablished) => "closed",
        Err(DeliveryError::NotFound) => "not_found",
        Err(DeliveryError::NotTaken | DeliveryError::WriteTimeout | DeliveryError::NoAnswer(_)) => {
            "timeout"
        }
        Err(_) => "error",
    };
    s.metrics.send_duration(started, outcome);
    result.map_err(ApiError::from)?;
    s.metrics.message_out(ty);
    Ok(Json(StatusResponse {
        status: "success".into(),
    })
    .into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CloseQuery {
    /// Close reason sent to the device (at most 120 bytes).
    reason: Option<String>,
}

/// Closes a connection with code 4000 and a reason. Answers once the record is closed.
#[utoipa::path(delete, path = "/api/core/connection/{id}", tag = "connection", security(("userToken" = [])),
    params(("id" = String, Path, description = "Connection id"), CloseQuery),
    responses((status = 200, body = StatusResponse),
              Refused,
              NotFound,
              Conflict,
              Unavailable))]
async fn close_connection(
    State(s): State<AppState>,
    user: User,
    Path(id): Path<String>,
    query: Result<Query<CloseQuery>, QueryRejection>,
) -> ApiResult<Json<StatusResponse>> {
    user.require(&[functions::API, functions::CONNECTION_CLOSE])?;
    let Query(q) = query.map_err(|e| ApiError::bad_request(format!("Invalid query: {e}")))?;
    let reason = q.reason.unwrap_or_else(|| "closed by operator".to_string());
    // A close frame's reason is at most 123 bytes.
    if reason.len() > 120 {
        return Err(ApiError::bad_request(
            "The reason is longer than 120 bytes.",
        ));
    }
    delivery::close(&s, &id, close::CLOSED_BY_OPERATOR, &reason).await?;
    tracing::info!(by = %user.identity.name, connection = %id, "connection closed by operator");
    Ok(Json(StatusResponse {
        status: "success".into(),
    }))
}

/// Where the connection token was presented.
fn connection_token(headers: &HeaderMap) -> Option<(String, Option<HeaderValue>)> {
    let looks_like_jwt = |t: &str| t.len() > 20 && t.split('.').count() == 3 && !t.contains(':');
    if let Some(t) = headers.get(ORIGIN).and_then(|v| v.to_str().ok())
        && looks_like_jwt(t.trim())
    {
        return Some((t.trim().to_string(), None));
    }
    if let Some(t) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok())
        && let Some((scheme, token)) = t.split_once(' ')
        && scheme.eq_ignore_ascii_case("bearer")
    {
        return Some((token.trim().to_string(), None));
    }
    for value in headers.get_all(SEC_WEBSOCKET_PROTOCOL) {
        let Ok(value) = value.to_str() else { continue };
        let offered: Vec<&str> = value.split(',').map(str::trim).collect();
        if let Some(item) = offered
            .iter()
            .find(|p| p.starts_with(TOKEN_SUBPROTOCOL_PREFIX))
        {
            let token = item[TOKEN_SUBPROTOCOL_PREFIX.len()..].to_string();
            // Select `morrigan` when offered, else echo the token protocol: a browser fails the
            // handshake if it offered protocols and the server selects none.
            let selected = if offered.contains(&SUBPROTOCOL) {
                HeaderValue::from_static(SUBPROTOCOL)
            } else {
                HeaderValue::from_str(item).ok()?
            };
            return Some((token, Some(selected)));
        }
    }
    None
}

/// What a device is told when its upgrade is refused, before any upgrade: 401 without a
/// token or with an invalid one, 403 for a replay or a hook's refusal, 503 when the node takes
/// no connections or the store failed.
fn connect_refused(r: Refusal, peer: SocketAddr) -> ApiError {
    let refuse = |status: StatusCode, reason: String| {
        let state = if status == StatusCode::UNAUTHORIZED {
            "authenticationfailed"
        } else {
            "forbidden"
        };
        ApiError::new(status, state, reason)
    };
    match r {
        Refusal::Missing => refuse(
            StatusCode::UNAUTHORIZED,
            "No connection token: send it in 'Origin', 'Authorization: Bearer', or as the \
             sub-protocol 'morrigan.token.<token>'."
                .into(),
        ),
        Refusal::Token(e) => {
            tracing::info!(%peer, reason = %e, "connection token refused");
            refuse(
                StatusCode::UNAUTHORIZED,
                format!("Connection token refused: {e}."),
            )
        }
        Refusal::Hook(reason) => refuse(StatusCode::FORBIDDEN, format!("Refused: {reason}")),
        Refusal::Store(e) => e.into(),
        Refusal::Unavailable(why) => ApiError::unavailable(why),
        Refusal::Internal(e) => ApiError::internal(e),
        Refusal::Replayed | Refusal::Revoked | Refusal::NotIssued | Refusal::Deprovisioned => {
            tracing::info!(%peer, "connection token replayed or closed");
            refuse(
                StatusCode::FORBIDDEN,
                "Connection token already used or its connection is closed.".into(),
            )
        }
    }
}

/// The WebSocket endpoint (every connection token's `reportUrl`). The connection token is
/// checked and consumed *before* the upgrade: a refused token gets 401/403 with a JSON reason,
/// never a silent close. The first frame of an accepted socket is
/// `{"type":"connection.state","state":"accepted","connectionId"}`.
#[utoipa::path(get, path = "/api/core/connection/connect", tag = "connection",
    security(("connectionToken" = [])),
    responses((status = 101, description = "Switching protocols: WebSocket accepted"),
              (status = 401, description = "No token, or a malformed, invalid or expired token", body = ErrorBody),
              (status = 403, description = "Token already used, connection closed, or refused by a hook", body = ErrorBody),
              (status = 426, description = "Not a WebSocket upgrade", body = ErrorBody)))]
async fn connect(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ClientAddress(address): ClientAddress,
    headers: HeaderMap,
    upgrade: Result<Upgrade, ApiError>,
) -> Response {
    // Check the upgrade first so that a plain GET never consumes a token.
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    let presented = connection_token(&headers);
    let token = presented.as_ref().map(|(t, _)| t.as_str());
    let Admitted {
        record: accepted,
        reservation,
    } = match admission::accept(&s, token, &address).await {
        Ok(a) => a,
        Err(r) => return connect_refused(r, peer).into_response(),
    };
    let protocol = presented.and_then(|(_, p)| p);
    let config = tungstenite::protocol::WebSocketConfig::default()
        // Small, because it stays allocated for the socket's life. It bounds one read
        // syscall, not a frame: tungstenite reserves a frame's full length when its header
        // arrives, and a device's messages are mostly a few hundred bytes.
        .read_buffer_size(512)
        .write_buffer_size(0)
        // Room for one operator frame plus the small replies and pings queued behind it; a
        // device that lets more pile up is not reading and is dropped with 4008.
        .max_write_buffer_size(s.config.max_message_size + 64 * 1024)
        .max_message_size(Some(s.config.max_message_size))
        .max_frame_size(Some(s.config.max_message_size));
    let failed_state = s.clone();
    let failed_id = accepted.id.clone();
    let session_state = s.clone();
    let tracker = s.sessions.clone();
    upgrade.accept(
        protocol,
        config,
        move |socket| {
            tracker.track_future(async move {
                let Some(registered) = reservation.start() else {
                    return;
                };
                match socket {
                    Socket::Tcp(ws) => {
                        crate::session::run(session_state, accepted, registered, ws).await
                    }
                    Socket::Upgraded(ws) => {
                        crate::session::run(session_state, accepted, registered, ws).await
                    }
                }
            })
        },
        move |e| {
            tracing::info!(error = %e, connection = %failed_id, "upgrade failed after accept");
            tokio::spawn(async move {
                let now = time_format::now();
                let close = CloseInfo {
                    at: &now,
                    code: close::ABNORMAL,
                    reason: "upgrade failed",
                };
                // Accepted, never served: retried until the store takes it.
                failed_state.records.close(&failed_id, &close).await;
            });
        },
    )
}

impl From<DeliveryError> for ApiError {
    fn from(e: DeliveryError) -> Self {
        let reason = e.to_string();
        match e {
            DeliveryError::NotFound => ApiError::not_found(reason),
            DeliveryError::Closed(Some(code)) => ApiError::conflict(format!(
                "Connection closed ({code} {}).",
                close::reason_name(code)
            )),
            DeliveryError::Closed(None) | DeliveryError::NotEstablished => {
                ApiError::conflict(reason)
            }
            DeliveryError::NotTaken | DeliveryError::WriteTimeout | DeliveryError::NoAnswer(_) => {
                ApiError::timeout(reason)
            }
            DeliveryError::Store(e) => e.into(),
            DeliveryError::Unreachable(_)
            | DeliveryError::BusDown
            | DeliveryError::Bus(_)
            | DeliveryError::Fenced
            | DeliveryError::OwnerFenced => ApiError::unavailable(reason),
        }
    }
}
