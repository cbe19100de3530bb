//! Messages are JSON objects with a string `type` of the form `<provider>.<message>`:
//! `^[A-Za-z0-9_-]+\.[A-Za-z0-9_.-]+$`. The provider part (before the first dot) routes the
//! message to a provider; the rest (which may contain dots) names the message within it.
//!
//! The original used `[A-z]`, which also admits `` [ \ ] ^ ` ``; Morrigan uses the intended
//! ASCII letters only.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The longest `type` accepted (a peer controls it, so it is bounded).
pub const MAX_TYPE_LEN: usize = 256;

/// A validated message type, split into provider and message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageType<'a> {
    full: &'a str,
    dot: usize,
}

/// Why a `type` is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageTypeError {
    #[error("message type is empty")]
    Empty,
    #[error("message type is longer than {MAX_TYPE_LEN} characters")]
    TooLong,
    #[error("message type must be '<provider>.<message>'")]
    NoDot,
    #[error("message type contains a character outside [A-Za-z0-9_.-]")]
    BadCharacter,
}

fn provider_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

impl<'a> MessageType<'a> {
    /// Parses and validates a message type.
    pub fn parse(full: &'a str) -> Result<Self, MessageTypeError> {
        let bytes = full.as_bytes();
        if bytes.is_empty() {
            return Err(MessageTypeError::Empty);
        }
        if bytes.len() > MAX_TYPE_LEN {
            return Err(MessageTypeError::TooLong);
        }
        let dot = bytes
            .iter()
            .position(|&b| b == b'.')
            .ok_or(MessageTypeError::NoDot)?;
        if dot == 0 || dot + 1 == bytes.len() {
            return Err(MessageTypeError::NoDot);
        }
        if !bytes[..dot].iter().all(|&b| provider_char(b)) {
            return Err(MessageTypeError::BadCharacter);
        }
        if !bytes[dot + 1..]
            .iter()
            .all(|&b| provider_char(b) || b == b'.')
        {
            return Err(MessageTypeError::BadCharacter);
        }
        Ok(Self { full, dot })
    }

    /// The provider part (`client` in `client.token.refresh`).
    pub fn provider(&self) -> &'a str {
        &self.full[..self.dot]
    }

    /// The message part (`token.refresh` in `client.token.refresh`).
    pub fn message(&self) -> &'a str {
        &self.full[self.dot + 1..]
    }

    /// The whole type.
    pub fn as_str(&self) -> &'a str {
        self.full
    }
}

/// Returns true when `s` is a valid message type.
pub fn is_valid_type(s: &str) -> bool {
    MessageType::parse(s).is_ok()
}

/// Built-in message types.
pub mod types {
    /// S→C, first frame of every accepted connection: `{"type","state":"accepted"}`.
    pub const CONNECTION_STATE: &str = "connection.state";
    /// S→C, the server could not process a frame; the connection stays open.
    pub const CONNECTION_ERROR: &str = "connection.error";
    /// C→S `{"state":"ready"|"stopped.<reason>"|...}`, persisted on the client record.
    pub const CLIENT_STATE: &str = "client.state";
    /// C→S, asks for a new identity token.
    pub const CLIENT_TOKEN_REFRESH: &str = "client.token.refresh";
    /// S→C `{"token","expires"}`, the answer to `client.token.refresh`.
    pub const CLIENT_TOKEN_ISSUE: &str = "client.token.issue";
    /// C→S `{"capabilities":[{"name","version","messages":[..]}]}`, persisted.
    pub const CAPABILITY_REPORT: &str = "capability.report";
}

/// Error kinds carried in `connection.error` as `error`.
pub mod error_kinds {
    pub const INVALID_JSON: &str = "invalidJson";
    pub const NOT_AN_OBJECT: &str = "notAnObject";
    pub const MISSING_TYPE: &str = "missingType";
    pub const INVALID_TYPE: &str = "invalidType";
    pub const UNKNOWN_PROVIDER: &str = "unknownProvider";
    pub const UNKNOWN_MESSAGE: &str = "unknownMessage";
    pub const BINARY_FRAME: &str = "binaryFrame";
    pub const INVALID_MESSAGE: &str = "invalidMessage";
    pub const HANDLER_FAILED: &str = "handlerFailed";
    pub const RATE_LIMITED: &str = "rateLimited";
    /// An ack, reply or nack quoting a message id this client was never sent (or that is
    /// already settled otherwise).
    pub const UNKNOWN_MESSAGE_ID: &str = "unknownMessageId";
}

/// `{"type":"connection.state","state":"accepted"}` (and `rejected` with a reason, which the
/// original device code understood).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConnectionState {
    #[serde(rename = "type")]
    pub kind: String,
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    /// The connection record's id, so a device can quote it in support requests.
    #[serde(
        rename = "connectionId",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub connection_id: Option<String>,
}

/// `{"type":"connection.error","error","reason","messageType"?}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConnectionError {
    #[serde(rename = "type")]
    pub kind: String,
    /// One of [`error_kinds`].
    pub error: String,
    pub reason: String,
    /// The offending message's `type`, when it had a string one.
    #[serde(
        rename = "messageType",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub message_type: Option<String>,
}

impl ConnectionError {
    pub fn new(error: &str, reason: impl Into<String>, message_type: Option<&str>) -> Self {
        Self {
            kind: types::CONNECTION_ERROR.to_string(),
            error: error.to_string(),
            reason: reason.into(),
            message_type: message_type.map(str::to_string),
        }
    }
}

/// `{"type":"client.token.issue","token","expires"}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenIssue {
    #[serde(rename = "type")]
    pub kind: String,
    pub token: String,
    /// ISO 8601 UTC.
    pub expires: String,
}

/// One entry of a capability report (and of `GET /api/core/capability`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Capability {
    pub name: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub messages: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub functions: Option<Vec<String>>,
}

/// Builds a message object `{"type": ty, ...fields}`.
pub fn build(ty: &str, fields: Map<String, Value>) -> Value {
    let mut m = fields;
    m.insert("type".to_string(), Value::String(ty.to_string()));
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_first_dot() {
        let t = MessageType::parse("client.token.refresh").unwrap();
        assert_eq!(t.provider(), "client");
        assert_eq!(t.message(), "token.refresh");
    }

    #[test]
    fn rejects_bad_types() {
        for bad in ["", "client", ".x", "x.", "a^b.c", "a.b c", "a[.b", "ä.b"] {
            assert!(MessageType::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(MessageType::parse(&format!("a.{}", "b".repeat(300))).is_err());
        for good in ["a.b", "A-_9.x.y-z_", "agent.ping"] {
            assert!(MessageType::parse(good).is_ok(), "{good:?} refused");
        }
    }
}
