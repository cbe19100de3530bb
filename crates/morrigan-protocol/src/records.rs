//! Records as the REST API serves them. Field names are the original's (camelCase), timestamps
//! are ISO 8601 UTC strings (see [`crate::time_format`]) or `null`, never a mix of types.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A connection record (`GET /api/core/connection[/:id]`).
///
/// `lastHeartbeat` is also served under the original's misspelling `lastHearbeat`, so scripts
/// written against either the seed or the original keep working.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "ConnectionRecordWire", into = "ConnectionRecordWire")]
pub struct ConnectionRecord {
    /// The connection id (a UUID); the `sub` of its connection token.
    pub id: String,
    /// The client (device) the connection belongs to.
    pub client_id: String,
    /// The node holding the socket; `None` until the WebSocket is accepted.
    pub server_id: Option<String>,
    /// The `jti` of the connection token issued for this connection.
    pub token_id: String,
    /// The peer address of the WebSocket (or of the token request, until connected).
    pub client_address: Option<String>,
    /// When the WebSocket was accepted; `None` before.
    pub connected: Option<String>,
    /// Answered the last ping within the heartbeat interval.
    pub alive: bool,
    /// The connection is usable: token issued and unused, or socket open.
    pub open: bool,
    /// The last pong (or the accept), coalesced: may lag the socket by a few seconds.
    pub last_heartbeat: Option<String>,
    /// When the connection ended, whoever ended it.
    pub disconnected: Option<String>,
    /// Where the device was told to connect.
    pub report_url: String,
    /// When the record was created (connection token issued).
    pub created: String,
    /// The WebSocket close code, once closed.
    pub close_code: Option<u16>,
    /// Why it was closed, once closed.
    pub close_reason: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConnectionRecordWire {
    id: String,
    client_id: String,
    server_id: Option<String>,
    token_id: String,
    client_address: Option<String>,
    connected: Option<String>,
    alive: bool,
    open: bool,
    last_heartbeat: Option<String>,
    #[serde(default)]
    last_hearbeat: Option<String>,
    disconnected: Option<String>,
    report_url: String,
    #[serde(default)]
    created: String,
    #[serde(default)]
    close_code: Option<u16>,
    #[serde(default)]
    close_reason: Option<String>,
}

impl From<ConnectionRecordWire> for ConnectionRecord {
    fn from(w: ConnectionRecordWire) -> Self {
        Self {
            id: w.id,
            client_id: w.client_id,
            server_id: w.server_id,
            token_id: w.token_id,
            client_address: w.client_address,
            connected: w.connected,
            alive: w.alive,
            open: w.open,
            last_heartbeat: w.last_heartbeat.or(w.last_hearbeat),
            disconnected: w.disconnected,
            report_url: w.report_url,
            created: w.created,
            close_code: w.close_code,
            close_reason: w.close_reason,
        }
    }
}

impl From<ConnectionRecord> for ConnectionRecordWire {
    fn from(r: ConnectionRecord) -> Self {
        Self {
            id: r.id,
            client_id: r.client_id,
            server_id: r.server_id,
            token_id: r.token_id,
            client_address: r.client_address,
            connected: r.connected,
            alive: r.alive,
            open: r.open,
            last_hearbeat: r.last_heartbeat.clone(),
            last_heartbeat: r.last_heartbeat,
            disconnected: r.disconnected,
            report_url: r.report_url,
            created: r.created,
            close_code: r.close_code,
            close_reason: r.close_reason,
        }
    }
}

/// A provisioned client (device) (`GET /api/core/client[/:id]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "sqlx", derive(sqlx::FromRow))]
#[serde(rename_all = "camelCase")]
pub struct ClientRecord {
    pub id: String,
    /// First provisioning.
    pub created: String,
    /// Last (re-)provisioning.
    pub updated: String,
    /// The newest identity token's id (`jti`), updated by provisioning and by refresh.
    pub token_id: Option<String>,
    /// The last `client.state` the device reported.
    pub state: Option<String>,
    pub state_updated: Option<String>,
}

/// What a client last reported with `capability.report`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientCapabilities {
    pub client_id: String,
    pub capabilities: Value,
    pub reported: String,
}

/// An operator identity (`/api/auth/identity`). Never carries password material.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    pub id: String,
    pub name: String,
    pub functions: Vec<String>,
    #[serde(default)]
    pub created: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_heartbeat_spellings_served_and_read() {
        let r = ConnectionRecord {
            id: "c".into(),
            client_id: "d".into(),
            server_id: None,
            token_id: "t".into(),
            client_address: None,
            connected: None,
            alive: false,
            open: true,
            last_heartbeat: Some("2026-01-01T00:00:00.000Z".into()),
            disconnected: None,
            report_url: "http://x/api/core/connection/connect".into(),
            created: "2026-01-01T00:00:00.000Z".into(),
            close_code: None,
            close_reason: None,
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["lastHeartbeat"], v["lastHearbeat"]);
        assert_eq!(v["connected"], Value::Null);
        let back: ConnectionRecord = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }
}

/// A node of the cluster as `GET /api/core/node` serves it (a single server is a cluster of one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "sqlx", derive(sqlx::FromRow))]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    pub id: String,
    pub public_url: String,
    pub version: String,
    pub started: String,
    pub lease_expires: String,
    /// `running`, `stopped` (clean stop) or `lost` (lease lapsed).
    pub state: String,
}
