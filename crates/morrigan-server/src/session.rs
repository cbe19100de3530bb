//! One WebSocket connection's task.
//!
//! The task owns the socket: it reads frames, writes frames that arrive on its command channel
//! (REST sends, closes), pings on the heartbeat period, and on any end writes the record
//! (`open:false`, `alive:false`, `disconnected`, close code and reason) before it returns.
//! Nothing else touches the socket, so there is no lock on it, and every task a connection
//! spawns is this one.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::SinkExt;
use morrigan_protocol::close;
use morrigan_protocol::message::{
    ConnectionError, ConnectionState, MessageType, error_kinds, types,
};
use morrigan_protocol::records::ConnectionRecord;
use morrigan_protocol::time_format;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::hooks::Disconnect;
use crate::hub::{Command, ConnHandle, Liveness};
use crate::providers::{HandlerError, MessageContext};
use crate::state::AppState;
use crate::store::CloseInfo;

/// Commands queued per connection before senders wait (small: a frame is written as soon as
/// the task sees it).
pub const COMMAND_QUEUE: usize = 8;
/// How long a close waits for the peer's close reply.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0),
    )
    .unwrap_or(i64::MAX)
}

/// How the connection ended.
struct End {
    code: u16,
    reason: String,
    done: Option<oneshot::Sender<()>>,
}

impl End {
    fn new(code: u16, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
            done: None,
        }
    }
}

/// A per-connection token bucket: `rate` messages per second, bursts of `2 × rate`.
struct RateLimit {
    tokens: f64,
    rate: f64,
    last: tokio::time::Instant,
}

impl RateLimit {
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Self {
            tokens: rate * 2.0,
            rate,
            last: tokio::time::Instant::now(),
        }
    }
    fn allow(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate * 2.0);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Runs an accepted connection to its end.
pub async fn run(state: AppState, record: ConnectionRecord, socket: WebSocket) {
    let span = tracing::info_span!("conn", id = %record.id, client = %record.client_id);
    run_inner(state, record, socket).instrument(span).await
}

async fn run_inner(state: AppState, record: ConnectionRecord, mut socket: WebSocket) {
    let id: Arc<str> = Arc::from(record.id.as_str());
    let client_id: Arc<str> = Arc::from(record.client_id.as_str());
    let (tx, mut rx) = mpsc::channel(COMMAND_QUEUE);
    let liveness = Arc::new(Liveness::new(now_ms()));
    let replaced = state.hub.insert(
        id.clone(),
        ConnHandle {
            client_id: client_id.clone(),
            tx: tx.clone(),
            liveness: liveness.clone(),
        },
    );
    tracing::info!(address = ?record.client_address, "connected");

    // Alone, the hub knows every live connection: the one this replaced is the older one. In a
    // cluster the older one may be on another node, which only the store knows.
    let superseded = if state.bus.alone() {
        if let Some(older) = replaced {
            let reason = format!("superseded by connection {}", record.id);
            state
                .hub
                .close(&older, close::SUPERSEDED, &reason, None)
                .await;
            tracing::info!(older = %older, "superseded an older connection");
        }
        None
    } else {
        supersede(&state, &record).await
    };

    let accepted = ConnectionState {
        kind: types::CONNECTION_STATE.into(),
        state: "accepted".into(),
        reason: None,
        connection_id: Some(record.id.clone()),
    };
    let sent = match serde_json::to_string(&accepted) {
        Ok(text) => socket.send(Message::Text(text.into())).await.is_ok(),
        Err(_) => false,
    };
    let end = match (sent, superseded) {
        (true, None) => {
            for hook in &state.hooks {
                hook.connect(&record).await;
            }
            let ctx = MessageContext {
                connection_id: id.clone(),
                client_id: client_id.clone(),
                state: state.clone(),
            };
            // Not needed past the hooks: its strings would otherwise live as long as the socket.
            drop(record);
            serve(&state, &ctx, &mut socket, &mut rx, &liveness).await
        }
        // A newer connection of this client was accepted while this one started.
        (true, Some(reason)) => {
            close_socket(&mut socket, close::SUPERSEDED, &reason).await;
            End::new(close::SUPERSEDED, reason)
        }
        (false, _) => End::new(1006, "could not send the accept frame"),
    };

    state.hub.remove(&id, &tx);
    // The close handshake is done: release the socket (and the peer) now rather than after the
    // record's write, so a reconnecting device does not wait on the store (a churn cycle's
    // latency included one batch round trip for nothing). The record is still written below
    // before this task ends, and shutdown awaits the task.
    drop(socket);
    drop(tx);
    // Anything still queued will never be written: fail those senders now.
    rx.close();
    while rx.try_recv().is_ok() {}

    let now = time_format::now();
    let info = CloseInfo {
        at: &now,
        code: end.code,
        reason: &end.reason,
    };
    // Written now, or queued and retried until the store takes it (see records.rs).
    state.records.close(&id, &info).await;
    tracing::info!(code = end.code, reason = %end.reason, "disconnected");
    if let Some(done) = end.done {
        let _ = done.send(());
    }
    let event = Disconnect {
        connection_id: id.to_string(),
        client_id: client_id.to_string(),
        code: end.code,
        reason: end.reason,
    };
    for hook in &state.hooks {
        hook.disconnect(&event).await;
    }
}

/// One live connection per client: the newest by (accept time, id). Every session runs this
/// right after entering the hub, so that whatever the interleaving of racing accepts exactly one
/// survives (the first version closed anything not newer, pending records included, from a
/// snapshot: two racing accepts could both close each other, or close the record of a session
/// that had not entered the hub yet and leave its socket live with a closed record):
/// * an older connection is closed, through whichever node holds it;
/// * a newer connection means this one is superseded: the returned reason, with which the
///   session closes itself right after its accept frame;
/// * a pending record (token issued, unused) is not a live connection and is left alone: if its
///   token is used later, that connection supersedes this one then;
/// * an older connection of this node that is not in the hub yet is left alone too: its
///   session is starting, will find this newer one and close itself.
async fn supersede(state: &AppState, record: &ConnectionRecord) -> Option<String> {
    let others = match state
        .store
        .open_connections_of_client(&record.client_id, &record.id)
        .await
    {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(error = %e, "could not look up older connections");
            return None;
        }
    };
    let mine = (
        record.connected.as_deref().unwrap_or(""),
        record.id.as_str(),
    );
    let reason = format!("superseded by connection {}", record.id);
    let mut newer = None;
    for other in others {
        let Some(connected) = other.connected.as_deref() else {
            continue;
        };
        if (connected, other.id.as_str()) > mine {
            tracing::info!(newer = %other.id, "superseded by a newer connection");
            newer = Some(format!("superseded by connection {}", other.id));
            continue;
        }
        if other.server_id.as_deref() == Some(&*state.node_id) && state.hub.get(&other.id).is_none()
        {
            continue;
        }
        crate::cluster::close_anywhere(state, &other, close::SUPERSEDED, &reason).await;
        tracing::info!(older = %other.id, "superseded an older connection");
    }
    newer
}

async fn serve(
    state: &AppState,
    ctx: &MessageContext,
    socket: &mut WebSocket,
    rx: &mut mpsc::Receiver<Box<Command>>,
    liveness: &Arc<Liveness>,
) -> End {
    let period = state.config.heartbeat_interval;
    let period_ms = i64::try_from(period.as_millis()).unwrap_or(i64::MAX);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut limit = RateLimit::new(state.config.max_messages_per_second);
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd.map(|c| *c) {
                Some(Command::Send { text, ack }) => {
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        return End::new(1006, "write failed");
                    }
                    let _ = ack.send(());
                }
                Some(Command::Close { code, reason, done }) => {
                    close_socket(socket, code, &reason).await;
                    let mut end = End::new(code, reason);
                    end.done = done;
                    return end;
                }
                None => return End::new(close::INTERNAL_ERROR, "command channel closed"),
            },
            _ = ping.tick() => {
                let silent = now_ms() - liveness.last_pong_ms.load(Ordering::Acquire);
                if silent > 2 * period_ms {
                    tracing::info!(silent_ms = silent, "heartbeat missed twice; closing");
                    close_socket(socket, close::HEARTBEAT_TIMEOUT, "heartbeat missed twice").await;
                    return End::new(close::HEARTBEAT_TIMEOUT, "heartbeat missed twice");
                }
                if silent > period_ms + period_ms / 4 && liveness.alive.swap(false, Ordering::AcqRel) {
                    tracing::info!(silent_ms = silent, "heartbeat missed");
                    state.heartbeats.mark(&ctx.connection_id, liveness);
                    for hook in &state.hooks {
                        hook.heartbeat_missed(&ctx.connection_id, &ctx.client_id).await;
                    }
                }
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    return End::new(1006, "write failed");
                }
            },
            msg = socket.recv() => match msg {
                None => return End::new(1006, "connection lost"),
                Some(Err(e)) => return read_error(socket, e, state.config.max_message_size).await,
                Some(Ok(Message::Text(text))) => {
                    let reply = if limit.allow() {
                        handle_text(ctx, text.as_str()).await
                    } else {
                        Some(error_frame(error_kinds::RATE_LIMITED, format!(
                            "more than {} messages per second; message dropped",
                            state.config.max_messages_per_second), None))
                    };
                    if let Some(reply) = reply
                        && socket.send(Message::Text(reply.into())).await.is_err() {
                        return End::new(1006, "write failed");
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    let reply = error_frame(error_kinds::BINARY_FRAME,
                        "binary frames are not supported; send JSON text frames", None);
                    if socket.send(Message::Text(reply.into())).await.is_err() {
                        return End::new(1006, "write failed");
                    }
                }
                Some(Ok(Message::Pong(_))) => {
                    liveness.last_pong_ms.store(now_ms(), Ordering::Release);
                    liveness.alive.store(true, Ordering::Release);
                    state.heartbeats.mark(&ctx.connection_id, liveness);
                }
                Some(Ok(Message::Ping(_))) => {}
                Some(Ok(Message::Close(frame))) => {
                    // tungstenite queued the close reply; flush it so the peer sees a clean close.
                    let _ = tokio::time::timeout(CLOSE_WAIT, socket.flush()).await;
                    let (code, reason) = frame
                        .map(|f| (f.code, f.reason.to_string()))
                        .unwrap_or((1005, String::new()));
                    let reason = if reason.is_empty() { "closed by client".to_string() } else { reason };
                    return End::new(code, reason);
                }
            }
        }
    }
}

/// A read failed: an oversized message gets 1009, a malformed frame 1002; only this socket ends.
async fn read_error(socket: &mut WebSocket, e: axum::Error, limit: usize) -> End {
    use tungstenite::error::{CapacityError, Error as WsError};
    let inner = e.into_inner();
    match inner.downcast_ref::<WsError>() {
        Some(WsError::Capacity(CapacityError::MessageTooLong { .. }))
        | Some(WsError::Capacity(_)) => {
            let reason = format!("message exceeds {limit} bytes");
            close_socket(socket, close::MESSAGE_TOO_BIG, &reason).await;
            End::new(close::MESSAGE_TOO_BIG, reason)
        }
        Some(WsError::Protocol(p)) => {
            let reason = format!("protocol error: {p}");
            let reason: String = reason.chars().take(100).collect();
            close_socket(socket, close::PROTOCOL_ERROR, &reason).await;
            End::new(close::PROTOCOL_ERROR, reason)
        }
        Some(WsError::Utf8(_)) => {
            close_socket(socket, 1007, "invalid UTF-8 in a text frame").await;
            End::new(1007, "invalid UTF-8 in a text frame")
        }
        _ => End::new(1006, format!("connection lost: {inner}")),
    }
}

/// Sends a close frame and waits briefly for the peer's reply.
async fn close_socket(socket: &mut WebSocket, code: u16, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    if socket.send(Message::Close(Some(frame))).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(msg)) = socket.recv().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

fn error_frame(kind: &str, reason: impl Into<String>, message_type: Option<&str>) -> String {
    serde_json::to_string(&ConnectionError::new(kind, reason, message_type)).unwrap_or_default()
}

/// Parses, validates and routes one text frame; returns the frame to answer with, if any.
async fn handle_text(ctx: &MessageContext, text: &str) -> Option<String> {
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            return Some(error_frame(
                error_kinds::INVALID_JSON,
                format!("not valid JSON: {e}"),
                None,
            ));
        }
    };
    let Some(obj) = value.as_object() else {
        return Some(error_frame(
            error_kinds::NOT_AN_OBJECT,
            "a message must be a JSON object",
            None,
        ));
    };
    let Some(ty) = obj.get("type").and_then(Value::as_str) else {
        return Some(error_frame(
            error_kinds::MISSING_TYPE,
            "a message needs a string 'type'",
            None,
        ));
    };
    let ty = ty.to_string();
    let parsed = match MessageType::parse(&ty) {
        Ok(t) => t,
        Err(e) => {
            return Some(error_frame(
                error_kinds::INVALID_TYPE,
                e.to_string(),
                Some(&ty),
            ));
        }
    };
    let Some(provider) = ctx.state.providers.get(parsed.provider()) else {
        return Some(error_frame(
            error_kinds::UNKNOWN_PROVIDER,
            format!("no provider named '{}'", parsed.provider()),
            Some(&ty),
        ));
    };
    ctx.state.metrics.message_in(parsed.provider());
    match provider.handle(ctx, parsed.message(), value).await {
        Ok(None) => None,
        Ok(Some(reply)) => serde_json::to_string(&reply).ok(),
        Err(HandlerError::UnknownMessage) => Some(error_frame(
            error_kinds::UNKNOWN_MESSAGE,
            format!(
                "provider '{}' has no message '{}'",
                parsed.provider(),
                parsed.message()
            ),
            Some(&ty),
        )),
        Err(HandlerError::Invalid(reason)) => {
            Some(error_frame(error_kinds::INVALID_MESSAGE, reason, Some(&ty)))
        }
        Err(HandlerError::Failed(reason)) => {
            Some(error_frame(error_kinds::HANDLER_FAILED, reason, Some(&ty)))
        }
    }
}
