//! `/api/core/connection`: token exchange, the WebSocket endpoint, records, send and close.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State, rejection::QueryRejection};
use axum::http::header::{AUTHORIZATION, ORIGIN, SEC_WEBSOCKET_PROTOCOL};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use morrigan_protocol::api::{StatusResponse, TokenResponse, audience};
use morrigan_protocol::close;
use morrigan_protocol::message::MessageType;
use morrigan_protocol::paths::{SUBPROTOCOL, TOKEN_SUBPROTOCOL_PREFIX};
use morrigan_protocol::records::ConnectionRecord;
use morrigan_protocol::time_format;
use serde::Deserialize;
use serde_json::Value;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::upgrade::{Socket, Upgrade};
use crate::auth::{User, functions};
use crate::bus::BusCommand;
use crate::cluster;
use crate::error::{ApiError, ApiResult};
use crate::hub::{Closed, Reservation, SendError};
use crate::state::AppState;
use crate::store::{CloseInfo, ConnectionFilter, Proof};
use crate::tokens::{self, TokenError};

/// How long a REST send waits for the connection to take its frame. A frame not taken by then
/// is never written (504); a frame taken is written, or its socket closed, within the write
/// timeout.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Slack over the write timeout for the connection task to report a taken frame's outcome.
const SEND_GRACE: Duration = Duration::from_secs(1);
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

fn identity_error(e: TokenError, peer: SocketAddr) -> ApiError {
    if let TokenError::Store(e) = e {
        return e.into();
    }
    tracing::info!(%peer, reason = %e, "identity token refused");
    identity_refused(format!("Identity token refused: {e}."))
}

/// Exchanges a device's identity token for a single-use connection token (60 s by default)
/// whose `reportUrl` claim names the WebSocket endpoint.
#[utoipa::path(post, path = "/api/core/connection", tag = "connection",
    security(("identityToken" = [])),
    request_body(content = Option<Value>, description = "Ignored (the original device sends {idtoken, traceId})"),
    responses((status = 200, body = TokenResponse),
              (status = 400, description = "No token provided", body = morrigan_protocol::api::ErrorBody),
              (status = 403, description = "Identity token invalid, expired, revoked, or client deprovisioned", body = morrigan_protocol::api::ErrorBody)))]
async fn request_token(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> ApiResult<Json<TokenResponse>> {
    let token = identity_token(&headers).ok_or_else(|| {
        s.tokens.refused(audience::IDENTITY, "missing");
        ApiError::bad_request("No token provided.")
    })?;
    // Read, not yet trusted: the insert below requires the digest recorded when this token was
    // issued, which proves it is the token a node signed (see tokens.rs).
    let presented = s
        .tokens
        .presented(token, audience::IDENTITY)
        .await
        .map_err(|e| identity_error(e, peer))?;
    let claims = &presented.claims;
    let now_s = time_format::now();
    let id = uuid::Uuid::new_v4().to_string();
    let report_url = s.report_url();
    let ttl = s.config.connection_token_ttl.as_secs();
    let issued = s
        .tokens
        .issue(audience::CONNECTION, &id, ttl, Some(report_url.clone()))
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let expires = time::OffsetDateTime::from_unix_timestamp(issued.claims.exp)
        .map(time_format::format)
        .unwrap_or_default();
    let record = ConnectionRecord {
        id: id.clone(),
        client_id: claims.sub.clone(),
        server_id: None,
        token_id: issued.claims.jti.clone(),
        client_address: Some(cluster::client_address(&s, peer, &headers)),
        connected: None,
        alive: false,
        open: true,
        last_heartbeat: None,
        disconnected: None,
        report_url,
        created: now_s.clone(),
        close_code: None,
        close_reason: None,
    };
    // Written before answering, so the device can never connect before its record exists (F8).
    // One statement checks the identity token's record (and digest) and the client and inserts
    // the pending record; only a refusal reads which check failed.
    let token_digest = tokens::digest(&issued.token);
    let inserted = s
        .store
        .issue_connection(
            &record,
            &token_digest,
            &expires,
            &claims.jti,
            Proof::Digest(&presented.digest),
        )
        .await?;
    if !inserted {
        // The rare path: check the signature, then the record, to say why; a token recorded
        // before digests were kept is let through by its signature and gets its digest.
        let claims = s
            .tokens
            .verify(token, audience::IDENTITY)
            .await
            .map_err(|e| identity_error(e, peer))?;
        let live = s.store.live_token(&claims.jti, &now_s).await?;
        let Some(live) = live else {
            s.tokens.refused(audience::IDENTITY, "revoked");
            return Err(identity_refused("Identity token has been revoked."));
        };
        if live.digest.as_ref().is_some_and(|d| d != &presented.digest) {
            // Signed, live, but not the text recorded for it: cannot happen with our encoder.
            s.tokens.refused(audience::IDENTITY, "invalid");
            return Err(identity_refused(
                "Identity token refused: it is not the token issued.",
            ));
        }
        let legacy = live.digest.is_none()
            && s.store
                .issue_connection(
                    &record,
                    &token_digest,
                    &expires,
                    &claims.jti,
                    Proof::Signature,
                )
                .await?;
        if !legacy {
            s.tokens.refused(audience::IDENTITY, "deprovisioned");
            return Err(identity_refused("Client is no longer provisioned."));
        }
        s.store
            .set_token_digest(&claims.jti, &presented.digest)
            .await?;
    }
    tracing::debug!(client = %claims.sub, connection = %id, "connection token issued");
    Ok(Json(TokenResponse {
        state: "success".into(),
        token: issued.token,
    }))
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
              (status = 400, body = morrigan_protocol::api::ErrorBody),
              (status = 401, body = morrigan_protocol::api::ErrorBody),
              (status = 403, body = morrigan_protocol::api::ErrorBody)))]
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
              (status = 401, body = morrigan_protocol::api::ErrorBody),
              (status = 403, body = morrigan_protocol::api::ErrorBody),
              (status = 404, body = morrigan_protocol::api::ErrorBody)))]
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

/// Pushes a JSON message to a connection. Answers once the frame was written to the socket.
#[utoipa::path(post, path = "/api/core/connection/{id}/send", tag = "connection", security(("userToken" = [])),
    params(("id" = String, Path, description = "Connection id")),
    request_body(content = Value, description = "A JSON object with a string `type` (`<provider>.<message>`); delivered as sent"),
    responses((status = 200, body = StatusResponse),
              (status = 400, description = "Not a JSON object with a valid type", body = morrigan_protocol::api::ErrorBody),
              (status = 401, body = morrigan_protocol::api::ErrorBody),
              (status = 403, description = "Missing function connection.send", body = morrigan_protocol::api::ErrorBody),
              (status = 404, body = morrigan_protocol::api::ErrorBody),
              (status = 409, description = "Connection closed or not established", body = morrigan_protocol::api::ErrorBody),
              (status = 503, body = morrigan_protocol::api::ErrorBody),
              (status = 504, body = morrigan_protocol::api::ErrorBody)))]
async fn send(
    State(s): State<AppState>,
    user: User,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<StatusResponse>> {
    user.require(&[functions::API, functions::CONNECTION_SEND])?;
    let text =
        std::str::from_utf8(&body).map_err(|_| ApiError::bad_request("The body is not UTF-8."))?;
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
    if !s.lease.held() {
        return Err(ApiError::unavailable(
            "This node cannot confirm its cluster lease; nothing was delivered. Retry.",
        ));
    }
    let started = std::time::Instant::now();
    let take_by = tokio::time::Instant::now() + SEND_TIMEOUT;
    let write_bound = s.config.effective_write_timeout() + SEND_GRACE;
    let result = match s
        .hub
        .send(&id, text.to_string(), take_by, write_bound)
        .await
    {
        Ok(()) => Ok(()),
        Err(SendError::NotHere) => {
            let command = BusCommand::Send {
                connection_id: id.clone(),
                text: text.to_string(),
            };
            cluster::route(&s, &id, command).await
        }
        Err(e) => Err(e.into()),
    };
    let outcome = match &result {
        Ok(()) => "ok",
        Err(e) if e.status == StatusCode::CONFLICT => "closed",
        Err(e) if e.status == StatusCode::NOT_FOUND => "not_found",
        Err(e) if e.status == StatusCode::GATEWAY_TIMEOUT => "timeout",
        Err(_) => "error",
    };
    s.metrics.send_duration(started, outcome);
    result?;
    s.metrics.message_out(ty);
    Ok(Json(StatusResponse {
        status: "success".into(),
    }))
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
              (status = 401, body = morrigan_protocol::api::ErrorBody),
              (status = 403, body = morrigan_protocol::api::ErrorBody),
              (status = 404, body = morrigan_protocol::api::ErrorBody),
              (status = 409, body = morrigan_protocol::api::ErrorBody),
              (status = 503, body = morrigan_protocol::api::ErrorBody)))]
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
    if s.hub.close(&id, close::CLOSED_BY_OPERATOR, &reason).await != Closed::NotHere {
        tracing::info!(by = %user.identity.name, connection = %id, "connection closed by operator");
        return Ok(Json(StatusResponse {
            status: "success".into(),
        }));
    }
    // Not held here: a pending record (token issued, unused) can still be closed, which also
    // invalidates its token.
    if let Some(r) = s.store.connection(&id).await?
        && r.open
        && r.connected.is_none()
    {
        let now = time_format::now();
        s.store
            .close_connection(
                &id,
                &CloseInfo {
                    at: &now,
                    code: close::CLOSED_BY_OPERATOR,
                    reason: &reason,
                },
            )
            .await?;
        return Ok(Json(StatusResponse {
            status: "success".into(),
        }));
    }
    let command = BusCommand::Close {
        connection_id: id.clone(),
        code: close::CLOSED_BY_OPERATOR,
        reason,
    };
    cluster::route(&s, &id, command).await?;
    tracing::info!(by = %user.identity.name, connection = %id, "remote connection closed by operator");
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

fn refuse(status: StatusCode, reason: impl Into<String>) -> Response {
    let state = if status == StatusCode::UNAUTHORIZED {
        "authenticationfailed"
    } else {
        "forbidden"
    };
    ApiError::new(status, state, reason).into_response()
}

/// A refused connection token: 401 with the reason.
fn connection_error(e: TokenError, peer: SocketAddr) -> Response {
    if let TokenError::Store(e) = e {
        return ApiError::from(e).into_response();
    }
    tracing::info!(%peer, reason = %e, "connection token refused");
    refuse(
        StatusCode::UNAUTHORIZED,
        format!("Connection token refused: {e}."),
    )
}

/// The WebSocket endpoint (every connection token's `reportUrl`). The connection token is
/// checked and consumed *before* the upgrade: a refused token gets 401/403 with a JSON reason,
/// never a silent close. The first frame of an accepted socket is
/// `{"type":"connection.state","state":"accepted","connectionId"}`.
#[utoipa::path(get, path = "/api/core/connection/connect", tag = "connection",
    security(("connectionToken" = [])),
    responses((status = 101, description = "Switching protocols: WebSocket accepted"),
              (status = 401, description = "No token, or a malformed, invalid or expired token", body = morrigan_protocol::api::ErrorBody),
              (status = 403, description = "Token already used, connection closed, or refused by a hook", body = morrigan_protocol::api::ErrorBody),
              (status = 426, description = "Not a WebSocket upgrade", body = morrigan_protocol::api::ErrorBody)))]
async fn connect(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    upgrade: Result<Upgrade, ApiError>,
) -> Response {
    // Check the upgrade first so that a plain GET never consumes a token.
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    if s.shutdown.is_cancelled() {
        return ApiError::unavailable("The node is shutting down.").into_response();
    }
    if !s.lease.held() {
        return ApiError::unavailable("This node cannot confirm its cluster lease; retry.")
            .into_response();
    }
    let Some((token, protocol)) = connection_token(&headers) else {
        s.tokens.refused(audience::CONNECTION, "missing");
        return refuse(
            StatusCode::UNAUTHORIZED,
            "No connection token: send it in 'Origin', 'Authorization: Bearer', or as the \
             sub-protocol 'morrigan.token.<token>'.",
        );
    };
    // Without an embedder's hooks the token is read, not yet trusted: the accept below requires
    // the digest recorded with its record (see tokens.rs). Hooks see the record before that
    // statement, so with them the signature is checked first, as the accept's proof.
    let (claims, digest) = if s.embedder_hooks {
        match s.tokens.verify(&token, audience::CONNECTION).await {
            Ok(c) => (c, None),
            Err(e) => return connection_error(e, peer),
        }
    } else {
        match s.tokens.presented(&token, audience::CONNECTION).await {
            Ok(p) => (p.claims, Some(p.digest)),
            Err(e) => return connection_error(e, peer),
        }
    };
    // Hooks see the pending record before the token is consumed (F10). Without an embedder's
    // hooks that read is skipped: the conditional accept below checks everything it would.
    if s.embedder_hooks {
        let record = match s.store.connection(&claims.sub).await {
            Err(e) => return ApiError::from(e).into_response(),
            Ok(None) => return refuse(StatusCode::FORBIDDEN, "No such connection."),
            Ok(Some(r)) => r,
        };
        if record.token_id != claims.jti || !record.open || record.connected.is_some() {
            tracing::info!(%peer, connection = %record.id, "connection token replayed or closed");
            s.tokens.refused(audience::CONNECTION, "replayed");
            return refuse(
                StatusCode::FORBIDDEN,
                "Connection token already used or its connection is closed.",
            );
        }
        for hook in &s.hooks {
            if let Err(reason) = hook.authenticate(&record).await {
                s.tokens.refused(audience::CONNECTION, "hook");
                return refuse(StatusCode::FORBIDDEN, format!("Refused: {reason}"));
            }
        }
    }
    let now = time_format::now();
    let address = cluster::client_address(&s, peer, &headers);
    // Registered in the hub before the token is consumed: a deprovisioning or DELETE that
    // closes the record after the accept finds this entry and closes the session (see
    // Hub::reserve). A live connection with this id means a replay.
    let Some(reservation) = s.hub.reserve(&claims.sub, crate::session::now_ms()) else {
        // A forged token naming a live connection is refused as forged (401), not as a replay.
        if let Err(e) = s.tokens.verify(&token, audience::CONNECTION).await {
            return connection_error(e, peer);
        }
        s.tokens.refused(audience::CONNECTION, "replayed");
        return refuse(
            StatusCode::FORBIDDEN,
            "Connection token already used or its connection is closed.",
        );
    };
    let accepted = match accept(&s, &claims, &token, digest.as_deref(), &address, &now, peer).await
    {
        Ok(record) => record,
        Err(refusal) => {
            release(&s, &claims.sub, reservation).await;
            return refusal;
        }
    };
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

/// Consumes the connection token (see `Store::accept_connection`); the refusal as a response.
async fn accept(
    s: &AppState,
    claims: &morrigan_protocol::api::Claims,
    token: &str,
    digest: Option<&str>,
    address: &str,
    now: &str,
    peer: SocketAddr,
) -> Result<ConnectionRecord, Response> {
    let proof = digest.map_or(Proof::Signature, Proof::Digest);
    let mut accepted = s
        .store
        .accept_connection(&claims.sub, &claims.jti, proof, &s.node_id, address, now)
        .await;
    if matches!(accepted, Ok(None)) && digest.is_some() {
        // Refused: a forged token, a replay, or a record written before digests were kept. The
        // signature tells the first apart; the accept, with it as proof, the other two.
        if let Err(e) = s.tokens.verify(token, audience::CONNECTION).await {
            return Err(connection_error(e, peer));
        }
        accepted = s
            .store
            .accept_connection(
                &claims.sub,
                &claims.jti,
                Proof::Signature,
                &s.node_id,
                address,
                now,
            )
            .await;
    }
    match accepted {
        Err(e) => Err(ApiError::from(e).into_response()),
        Ok(None) => {
            tracing::info!(%peer, connection = %claims.sub, "connection token replayed or closed");
            s.tokens.refused(audience::CONNECTION, "replayed");
            Err(refuse(
                StatusCode::FORBIDDEN,
                "Connection token already used or its connection is closed.",
            ))
        }
        Ok(Some(r)) => Ok(r),
    }
}

/// The accept failed: the reservation leaves the hub. A close requested meanwhile (a DELETE
/// of a pending record that found the reservation) is carried out on the record.
async fn release(s: &AppState, id: &str, reservation: Reservation) {
    if let Some(req) = reservation.close_requested() {
        let now = time_format::now();
        let close = CloseInfo {
            at: &now,
            code: req.code,
            reason: &req.reason,
        };
        s.records.close(id, &close).await;
    }
    drop(reservation);
}
