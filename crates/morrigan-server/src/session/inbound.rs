//! What a device sends: the per-connection rate limit, the queue of messages waiting for their
//! handler, and the routing of one text frame to its provider.
//!
//! Messages are handled one at a time, in arrival order, but *beside* the socket: while a
//! handler waits (on the store, say) the connection keeps writing operator frames, pinging and
//! reading. Replies leave in the order their messages arrived.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;

use morrigan_protocol::message::{ConnectionError, MessageType, error_kinds};
use serde_json::Value;
use tungstenite::Utf8Bytes;

use crate::metrics::Metrics;
use crate::providers::{HandlerError, MessageContext, Providers};
use crate::state::AppState;

/// Messages read and waiting for their handler; past this the connection stops reading its
/// socket until the handler catches up (TCP backpressure on the device, nothing dropped).
pub(super) const MAX_WAITING: usize = 32;

/// A per-connection token bucket: `rate` messages per second, bursts of `2 × rate`.
pub(super) struct RateLimit {
    tokens: f64,
    rate: f64,
    last: tokio::time::Instant,
}

impl RateLimit {
    pub(super) fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Self {
            tokens: rate * 2.0,
            rate,
            last: tokio::time::Instant::now(),
        }
    }

    pub(super) fn allow(&mut self) -> bool {
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

/// An entry of the inbox: a message for the handler, or an answer already decided (a refusal)
/// that must leave after the replies of the messages before it.
pub(super) enum Inbound {
    Message(Utf8Bytes),
    Answer(String),
}

/// A running handler: resolves to the frame to answer with, if any.
pub(super) type Handling<'a> = Pin<Box<dyn Future<Output = Option<String>> + Send + 'a>>;

/// The messages of one connection waiting for, or in, their handler.
pub(super) struct Inbox<'a> {
    waiting: VecDeque<Inbound>,
    pub(super) running: Option<Handling<'a>>,
}

impl<'a> Inbox<'a> {
    pub(super) fn new() -> Self {
        Self {
            waiting: VecDeque::new(),
            running: None,
        }
    }

    /// Whether another frame may be read from the socket.
    pub(super) fn has_room(&self) -> bool {
        self.waiting.len() < MAX_WAITING
    }

    pub(super) fn push(&mut self, entry: Inbound) {
        self.waiting.push_back(entry);
    }

    /// Starts the next message's handler if none runs; returns the answers that are due now
    /// (decided answers queued before that message), in order.
    pub(super) fn advance(
        &mut self,
        ctx: &'a MessageContext,
        state: &'a AppState,
        due: &mut Vec<String>,
    ) {
        while self.running.is_none() {
            match self.waiting.pop_front() {
                None => return,
                Some(Inbound::Answer(text)) => due.push(text),
                Some(Inbound::Message(text)) => {
                    self.running = Some(Box::pin(handle_text(
                        ctx,
                        &state.providers,
                        &state.metrics,
                        text,
                    )));
                }
            }
        }
    }
}

impl<'a> Inbox<'a> {
    /// Runs the handlers of every message still waiting (answers are dropped: the connection
    /// is ending), until `until` at the latest.
    pub(super) async fn drain(
        &mut self,
        ctx: &'a MessageContext,
        state: &'a AppState,
        until: tokio::time::Instant,
    ) {
        let _ = tokio::time::timeout_at(until, async {
            let mut discarded = Vec::new();
            loop {
                if let Some(running) = self.running.as_mut() {
                    running.await;
                    self.running = None;
                }
                self.advance(ctx, state, &mut discarded);
                discarded.clear();
                if self.running.is_none() {
                    return;
                }
            }
        })
        .await;
    }
}

/// Whether `text` looks like an answer to a tracked message (checked only past the rate
/// limit; the provider validates it).
pub(super) fn is_answer(text: &str) -> bool {
    use morrigan_protocol::messages::types;
    [types::ACK, types::REPLY, types::NACK]
        .iter()
        .any(|t| text.contains(t))
}

pub(super) fn error_frame(
    kind: &str,
    reason: impl Into<String>,
    message_type: Option<&str>,
) -> String {
    serde_json::to_string(&ConnectionError::new(kind, reason, message_type)).unwrap_or_default()
}

/// Parses, validates and routes one text frame; returns the frame to answer with, if any.
pub(super) async fn handle_text(
    ctx: &MessageContext,
    providers: &Providers,
    metrics: &Metrics,
    text: Utf8Bytes,
) -> Option<String> {
    let value: Value = match serde_json::from_str(text.as_str()) {
        Ok(v) => v,
        Err(e) => {
            return Some(error_frame(
                error_kinds::INVALID_JSON,
                format!("not valid JSON: {e}"),
                None,
            ));
        }
    };
    drop(text);
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
    let Some(provider) = providers.get(parsed.provider()) else {
        if ctx
            .services
            .tracker
            .uplink(&ctx.client_id, &ctx.connection_id, &ty, &value)
            .await
        {
            return None;
        }
        return Some(error_frame(
            error_kinds::UNKNOWN_PROVIDER,
            format!("no provider named '{}'", parsed.provider()),
            Some(&ty),
        ));
    };
    metrics.message_in(parsed.provider());
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
        Err(HandlerError::UnknownId(reason)) => Some(error_frame(
            error_kinds::UNKNOWN_MESSAGE_ID,
            reason,
            Some(&ty),
        )),
        Err(HandlerError::Failed(reason)) => {
            Some(error_frame(error_kinds::HANDLER_FAILED, reason, Some(&ty)))
        }
    }
}
