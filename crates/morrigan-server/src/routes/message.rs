//! Tracked messaging over REST: client-addressed sends (`POST /api/core/client/:clientId/send`),
//! tracked connection sends (`POST /api/core/connection/:id/send?track=`, entered from
//! `connection.rs`), and reading message records. The work is in [`crate::messaging::send`];
//! this file parses, authorizes and answers.

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State, rejection::QueryRejection};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use morrigan_protocol::api::ErrorBody;
use morrigan_protocol::messages::{
    Direction, MessageList, MessageRecord, MessageResponse, MessageState, SendResult, Track,
};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::User;
use super::responses::{BadRequest, NotFound, Refused, Unavailable};
use crate::auth::functions;
use crate::error::{ApiError, ApiResult};
use crate::messaging::send::{
    self, Body, ClientSend, MAX_KEY_LEN, MAX_TIMEOUT, Outcome, SendError,
};
use crate::state::AppState;
use crate::store::messages::MessageFilter;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(client_send))
        .routes(routes!(client_messages))
        .routes(routes!(get_message))
}

/// Most records one listing returns.
const MAX_LIMIT: u32 = 1000;

/// The options of a tracked send.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SendQuery {
    /// `none` (the default), `ack` or `reply`: what the device's answer must be. With `ack` or
    /// `reply` the frame carries a `messageId` the device answers with `connection.ack`,
    /// `connection.reply` or `connection.nack`.
    pub track: Option<String>,
    /// Seconds to wait for the answer (at most 300). Connection sends with `track` wait 10 by
    /// default; client sends without it answer 202 at once.
    pub timeout: Option<u64>,
    /// Client sends only: seconds the message may wait in the client's outbox while it is
    /// offline, and for its answer (at most the message retention). Without it, a send to an
    /// offline client is refused (409).
    pub ttl: Option<u64>,
}

impl SendQuery {
    fn track(&self) -> Result<Track, ApiError> {
        match self.track.as_deref() {
            None => Ok(Track::None),
            Some(t) => Track::parse(t)
                .ok_or_else(|| ApiError::bad_request("'track' must be 'none', 'ack' or 'reply'.")),
        }
    }

    fn timeout(&self) -> Result<Option<Duration>, ApiError> {
        match self.timeout {
            None => Ok(None),
            Some(t) if Duration::from_secs(t) > MAX_TIMEOUT => Err(ApiError::bad_request(format!(
                "'timeout' is at most {} seconds.",
                MAX_TIMEOUT.as_secs()
            ))),
            Some(t) => Ok(Some(Duration::from_secs(t))),
        }
    }
}

/// The tracked form of `POST /api/core/connection/:id/send` (`track=ack|reply`).
pub(super) async fn connection_send(
    s: &AppState,
    id: &str,
    query: &SendQuery,
    text: &str,
) -> Result<Response, ApiError> {
    let track = query.track()?;
    if query.ttl.is_some() {
        return Err(ApiError::bad_request(
            "'ttl' applies to client sends (POST /api/core/client/:clientId/send).",
        ));
    }
    let timeout = query.timeout()?.unwrap_or(send::DEFAULT_TIMEOUT);
    let body = Body::parse(text)?;
    let outcome = send::to_connection(s, id, track, timeout, &body).await?;
    Ok(answer(outcome, true))
}

/// Sends a JSON message to a client, wherever it is connected, or queues it in the client's
/// outbox while it is offline (with `ttl`); with `track` the device acknowledges or answers it,
/// and with `timeout` the request waits for that. An `Idempotency-Key` header makes a retried
/// request return the message the first one created.
///
/// Needs the functions `api` and `connection.send`.
#[utoipa::path(post, path = "/api/core/client/{clientId}/send", tag = "message", security(("userToken" = [])),
    params(("clientId" = String, Path, description = "Client id"), SendQuery,
           ("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key (per client) return the first message instead of sending again (at most 200 bytes)")),
    request_body(content = Value, description = "A JSON object with a string `type` and no `messageId`"),
    responses((status = 200, description = "Waited (`timeout`): the awaited state was reached", body = SendResult),
              (status = 202, description = "Written or queued, not waited for", body = SendResult),
              BadRequest,
              Refused,
              NotFound,
              (status = 409, description = "Offline without `ttl`, delivery failed, or the message expired or failed while waited for", body = ErrorBody),
              (status = 422, description = "The device refused it (`connection.nack`)", body = SendResult),
              (status = 429, description = "The client's outbox is full", body = ErrorBody),
              Unavailable,
              (status = 504, description = "No answer within `timeout` (`state: timeout`); the message keeps its own state", body = SendResult)))]
async fn client_send(
    State(s): State<AppState>,
    user: User,
    Path(client_id): Path<String>,
    query: Result<Query<SendQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    user.require(&[functions::API, functions::CONNECTION_SEND])?;
    let Query(q) = query.map_err(|e| ApiError::bad_request(format!("Invalid query: {e}")))?;
    let track = q.track()?;
    let timeout = q.timeout()?;
    let retention = s.tracker.limits().retention;
    let ttl = match q.ttl {
        None | Some(0) => None,
        Some(t) if Duration::from_secs(t) > retention => {
            return Err(ApiError::bad_request(format!(
                "'ttl' is at most the message retention ({} seconds).",
                retention.as_secs()
            )));
        }
        Some(t) => Some(Duration::from_secs(t)),
    };
    let idempotency_key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let key = v
                .to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= MAX_KEY_LEN)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "'Idempotency-Key' must be 1-{MAX_KEY_LEN} visible ASCII characters."
                    ))
                })?;
            Some(key.to_string())
        }
    };
    let text =
        std::str::from_utf8(&body).map_err(|_| ApiError::bad_request("The body is not UTF-8."))?;
    let body = Body::parse(text)?;
    let opts = ClientSend {
        track,
        ttl,
        timeout,
        idempotency_key,
    };
    let outcome = send::to_client(&s, &client_id, &opts, &body).await?;
    Ok(answer(outcome, timeout.is_some()))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MessagesQuery {
    /// `out` (operator → device) or `in` (uplink); both when absent.
    direction: Option<String>,
    /// Only messages in this state (`queued`, `written`, `acked`, `replied`, `rejected`,
    /// `expired`, `failed`, `received`).
    state: Option<String>,
    /// At most this many (default 50, at most 1000).
    limit: Option<u32>,
}

/// A client's messages, newest first: what operators sent it (with their states and replies)
/// and what it sent as uplink messages (the newest few are kept).
///
/// Needs the functions `api` and `connection`.
#[utoipa::path(get, path = "/api/core/client/{clientId}/messages", tag = "message", security(("userToken" = [])),
    params(("clientId" = String, Path, description = "Client id"), MessagesQuery),
    responses((status = 200, body = MessageList),
              BadRequest,
              Refused,
              Unavailable))]
async fn client_messages(
    State(s): State<AppState>,
    user: User,
    Path(client_id): Path<String>,
    query: Result<Query<MessagesQuery>, QueryRejection>,
) -> ApiResult<Json<MessageList>> {
    user.require(&[functions::API, functions::CONNECTION])?;
    let Query(q) = query.map_err(|e| ApiError::bad_request(format!("Invalid query: {e}")))?;
    let direction = q
        .direction
        .as_deref()
        .map(|d| {
            Direction::parse(d)
                .ok_or_else(|| ApiError::bad_request("'direction' must be 'in' or 'out'."))
        })
        .transpose()?;
    let state = q
        .state
        .as_deref()
        .map(|st| {
            MessageState::parse(st)
                .ok_or_else(|| ApiError::bad_request(format!("Unknown message state '{st}'.")))
        })
        .transpose()?;
    let limit = q.limit.unwrap_or(50);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::bad_request(format!(
            "'limit' must be 1-{MAX_LIMIT}."
        )));
    }
    let rows = s
        .store
        .messages(&MessageFilter {
            client_id: &client_id,
            direction,
            state,
            limit,
        })
        .await?;
    let messages = rows
        .iter()
        .map(|r| r.to_record())
        .collect::<Result<Vec<MessageRecord>, _>>()?;
    Ok(Json(MessageList {
        state: "success".into(),
        messages,
    }))
}

/// One message record: its states' timestamps, the reply, the reason it was refused or failed.
///
/// Needs the functions `api` and `connection`.
#[utoipa::path(get, path = "/api/core/message/{id}", tag = "message", security(("userToken" = [])),
    params(("id" = String, Path, description = "Message id")),
    responses((status = 200, body = MessageResponse),
              Refused,
              NotFound,
              Unavailable))]
async fn get_message(
    State(s): State<AppState>,
    user: User,
    Path(id): Path<String>,
) -> ApiResult<Json<MessageResponse>> {
    user.require(&[functions::API, functions::CONNECTION])?;
    let row = s
        .store
        .message(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("No such message."))?;
    Ok(Json(MessageResponse {
        state: "success".into(),
        message: row.to_record()?,
    }))
}

/// The answer to a send: 504 when the wait ran out, 202 when none was asked for, 200 when the
/// awaited state was reached, 422 when the device refused, 409 when it expired or failed.
fn answer(o: Outcome, waited: bool) -> Response {
    let (status, kind, state) = if o.timed_out {
        (StatusCode::GATEWAY_TIMEOUT, "failed", "timeout".to_string())
    } else if !waited {
        (StatusCode::ACCEPTED, "accepted", o.state.to_string())
    } else if o.satisfied {
        (StatusCode::OK, "success", o.state.to_string())
    } else if o.state == MessageState::Rejected {
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            "failed",
            o.state.to_string(),
        )
    } else {
        (StatusCode::CONFLICT, "failed", o.state.to_string())
    };
    let reason = if o.timed_out {
        Some(format!(
            "No answer in time; the message is {} (GET /api/core/message/{}).",
            o.state, o.id
        ))
    } else {
        o.reason
    };
    let body = SendResult {
        status: kind.into(),
        message_id: o.id,
        state,
        reply: o.reply,
        reason,
    };
    (status, Json(body)).into_response()
}

impl From<SendError> for ApiError {
    fn from(e: SendError) -> Self {
        let reason = e.to_string();
        match e {
            SendError::Invalid(_) => ApiError::bad_request(reason),
            SendError::NoClient => ApiError::not_found(reason),
            SendError::Offline => ApiError::new(StatusCode::CONFLICT, "offline", reason),
            SendError::OutboxFull(_) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "outboxFull", reason)
            }
            SendError::Delivery(e) => e.into(),
            SendError::Store(e) => e.into(),
        }
    }
}
