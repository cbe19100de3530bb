//! Tracked messages: operator → device messages whose delivery is acknowledged, answered or
//! queued for an offline device, and device → operator (uplink) messages.
//!
//! On the wire a tracked frame is the operator's JSON object with one top-level field added,
//! `"messageId": "<uuid>"`. The device answers with [`types::ACK`], [`types::REPLY`] (which
//! implies the ack) or [`types::NACK`], quoting the id. Delivery is at least once: a device may
//! see the same id again after a reconnect, and drops it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The field added to a tracked frame, and quoted by the device's answer.
pub const MESSAGE_ID: &str = "messageId";

/// The device's answers to a tracked message.
pub mod types {
    /// C→S `{"type":"connection.ack","messageId"}`: received and handled.
    pub const ACK: &str = "connection.ack";
    /// C→S `{"type":"connection.reply","messageId","payload":ANY}`: the answer (implies the ack).
    pub const REPLY: &str = "connection.reply";
    /// C→S `{"type":"connection.nack","messageId","reason":STRING}`: refused.
    pub const NACK: &str = "connection.nack";
}

/// What an operator waits for: nothing, the device's ack, or its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Track {
    #[default]
    None,
    Ack,
    Reply,
}

impl Track {
    pub fn as_str(self) -> &'static str {
        match self {
            Track::None => "none",
            Track::Ack => "ack",
            Track::Reply => "reply",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "none" => Some(Track::None),
            "ack" => Some(Track::Ack),
            "reply" => Some(Track::Reply),
            _ => None,
        }
    }
}

/// A message's state. It only moves forward: `queued` → `written` → `acked` → `replied`, or
/// to one of the ends `rejected`, `expired`, `failed`. A written message whose connection ends
/// unacknowledged goes back to `queued` (the one step back: it is delivered again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum MessageState {
    /// In the client's outbox, waiting for a connection.
    Queued,
    /// On a connection's socket.
    Written,
    /// The device acknowledged it.
    Acked,
    /// The device answered it (the reply is kept).
    Replied,
    /// The device refused it (`connection.nack`; the reason is kept).
    Rejected,
    /// Its TTL passed before it was written or acknowledged.
    Expired,
    /// It cannot be delivered: client deprovisioned, delivery failed without a TTL.
    Failed,
    /// Device → operator (uplink): received and published.
    Received,
}

impl MessageState {
    pub const ALL: [MessageState; 8] = [
        MessageState::Queued,
        MessageState::Written,
        MessageState::Acked,
        MessageState::Replied,
        MessageState::Rejected,
        MessageState::Expired,
        MessageState::Failed,
        MessageState::Received,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MessageState::Queued => "queued",
            MessageState::Written => "written",
            MessageState::Acked => "acked",
            MessageState::Replied => "replied",
            MessageState::Rejected => "rejected",
            MessageState::Expired => "expired",
            MessageState::Failed => "failed",
            MessageState::Received => "received",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// No further change will happen.
    pub fn is_final(self) -> bool {
        !matches!(self, MessageState::Queued | MessageState::Written)
    }

    /// The state answers a request tracked with `track` successfully: `written` for none,
    /// `acked` or `replied` for ack, `replied` for reply.
    pub fn satisfies(self, track: Track) -> bool {
        match track {
            Track::None => matches!(
                self,
                MessageState::Written | MessageState::Acked | MessageState::Replied
            ),
            Track::Ack => matches!(self, MessageState::Acked | MessageState::Replied),
            Track::Reply => self == MessageState::Replied,
        }
    }
}

impl std::fmt::Display for MessageState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `out`: operator → device; `in`: device → operator (uplink).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Out,
    In,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Out => "out",
            Direction::In => "in",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "out" => Some(Direction::Out),
            "in" => Some(Direction::In),
            _ => None,
        }
    }
}

/// A message record: `GET /api/core/message/:id`, `GET /api/core/client/:clientId/messages`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct MessageRecord {
    pub id: String,
    pub client_id: String,
    /// The connection it was last written to (or, uplink, read from).
    pub connection_id: Option<String>,
    pub direction: Direction,
    /// The message's `type`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The JSON object as the operator sent it (without `messageId`), or as the device sent it.
    pub body: Value,
    pub track: Track,
    pub state: MessageState,
    /// ISO 8601 UTC timestamps of each transition (absent until it happens).
    pub created: String,
    pub written: Option<String>,
    pub acked: Option<String>,
    pub replied: Option<String>,
    /// When it was rejected, expired or failed.
    pub ended: Option<String>,
    /// Past this (ISO 8601 UTC) an undelivered or unacknowledged message expires.
    pub expires: Option<String>,
    /// The device's reply payload.
    pub reply: Option<Value>,
    /// Why it was rejected or failed.
    pub reason: Option<String>,
}

/// `{"state":"success","message"}`: `GET /api/core/message/:id`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MessageResponse {
    pub state: String,
    pub message: MessageRecord,
}

/// `{"state":"success","messages"}`: `GET /api/core/client/:clientId/messages`, newest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MessageList {
    pub state: String,
    pub messages: Vec<MessageRecord>,
}

/// The answer to a tracked or client-addressed send: 200 (`status: success`, the awaited state
/// reached), 202 (accepted, not waited for: `status: accepted`), or with 504 `state: timeout`
/// (the message keeps its own state; read it with `GET /api/core/message/:id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct SendResult {
    pub status: String,
    pub message_id: String,
    /// The message's state (`timeout` on a 504).
    pub state: String,
    /// The device's reply payload (`track=reply`, state `replied`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<Value>,
    /// Why it was rejected or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Inserts `"messageId":"<id>"` as the last top-level field of the JSON object `body`, leaving
/// every other byte as it was. `None` if `body` is not a JSON object text ending in `}`.
pub fn with_message_id(body: &str, id: &str) -> Option<String> {
    let trimmed = body.trim_end();
    let head = trimmed.strip_suffix('}')?;
    let empty = head.trim_end().ends_with('{');
    let mut out = String::with_capacity(trimmed.len() + id.len() + 16);
    out.push_str(head);
    if !empty {
        out.push(',');
    }
    out.push_str("\"messageId\":\"");
    out.push_str(id);
    out.push_str("\"}");
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn message_id_is_added_as_a_top_level_field() {
        let body = r#"{"type":"agent.ping", "payload":{"a":[1,2]}}"#;
        let framed = with_message_id(body, "m1").unwrap();
        assert_eq!(
            framed,
            r#"{"type":"agent.ping", "payload":{"a":[1,2]},"messageId":"m1"}"#
        );
        let v: Value = serde_json::from_str(&framed).unwrap();
        assert_eq!(v["messageId"], "m1");
        assert_eq!(
            with_message_id("{ }", "x").unwrap(),
            r#"{ "messageId":"x"}"#
        );
        assert!(with_message_id("[1]", "x").is_none());
    }

    #[test]
    fn states_round_trip_and_order() {
        for s in MessageState::ALL {
            assert_eq!(MessageState::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), json!(s.as_str()));
        }
        assert!(MessageState::Replied.satisfies(Track::Ack));
        assert!(!MessageState::Acked.satisfies(Track::Reply));
        assert!(MessageState::Written.satisfies(Track::None));
        assert!(!MessageState::Queued.is_final());
        assert!(MessageState::Expired.is_final());
    }
}
