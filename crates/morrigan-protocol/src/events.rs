//! The connection event stream (`GET /api/core/connection/events`, Server-Sent Events): every
//! node's connection events, as operators and the dashboard read them.

use serde::{Deserialize, Serialize};

use crate::time_format;

/// Event kinds (the SSE `event:` field and the JSON `type`).
pub mod kinds {
    pub const CONNECTED: &str = "connected";
    pub const DISCONNECTED: &str = "disconnected";
    pub const SUPERSEDED: &str = "superseded";
    pub const HEARTBEAT_MISSED: &str = "heartbeat-missed";
    pub const CLIENT_STATE: &str = "client-state";
    /// A tracked message changed state, or a device sent an uplink message (state `received`).
    pub const MESSAGE: &str = "message";
    /// Stream control: the subscription is active (first event of every stream).
    pub const READY: &str = "ready";
    /// Stream control: this subscriber fell behind and `missed` events were dropped.
    pub const LAGGED: &str = "lagged";
}

/// One event about a connection, as the event stream delivers it (the SSE `data:`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ConnectionEvent {
    /// `connected`, `disconnected`, `superseded`, `heartbeat-missed`, `client-state` or
    /// `message`.
    #[serde(rename = "type")]
    pub kind: String,
    pub connection_id: String,
    pub client_id: String,
    /// The node holding (or that held) the socket.
    pub node: String,
    /// When it happened (ISO 8601 UTC).
    pub at: String,
    /// `connected`: the client's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// `disconnected`, `superseded`: the close code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
    /// `disconnected`, `superseded`: the close reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `disconnected`: the close code's short name (`normal`, `superseded`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_name: Option<String>,
    /// `client-state`: the reported state; `message`: the message's new state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// `message`: the message's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// `message`: the message's own `type` (`agent.pong`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_type: Option<String>,
    /// `message`: `in` (device → operators) or `out`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<String>,
    /// `message` `in`: the device's message as it sent it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
    /// `message` `replied`: the device's reply payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<serde_json::Value>,
}

impl ConnectionEvent {
    /// An event of `kind` happening now.
    pub fn new(kind: &str, connection_id: &str, client_id: &str, node: &str) -> Self {
        Self {
            kind: kind.to_string(),
            connection_id: connection_id.to_string(),
            client_id: client_id.to_string(),
            node: node.to_string(),
            at: time_format::now(),
            address: None,
            code: None,
            reason: None,
            reason_name: None,
            state: None,
            message_id: None,
            message_type: None,
            direction: None,
            body: None,
            reply: None,
        }
    }
}
