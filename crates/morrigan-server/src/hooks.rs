//! Server-side hooks on connection events, for embedding applications.
//!
//! `authenticate` runs before the token is consumed and before the upgrade, so a refusal is an
//! HTTP 403 with the hook's reason, and the pending record is never marked accepted.
//! `connect` runs after `connection.state accepted` was sent; `disconnect` after the record
//! was closed; `heartbeat_missed` on a connection's first missed heartbeat; `client_state` after
//! a `client.state` was stored. Hooks run on the connection's task: keep them short or spawn.

use async_trait::async_trait;
use morrigan_protocol::records::ConnectionRecord;

/// How a connection ended.
#[derive(Debug, Clone)]
pub struct Disconnect {
    pub connection_id: String,
    pub client_id: String,
    pub code: u16,
    pub reason: String,
}

#[async_trait]
pub trait Hooks: Send + Sync + 'static {
    /// Return `Err(reason)` to refuse the connection.
    async fn authenticate(&self, _record: &ConnectionRecord) -> Result<(), String> {
        Ok(())
    }
    async fn connect(&self, _record: &ConnectionRecord) {}
    async fn disconnect(&self, _event: &Disconnect) {}
    /// The connection missed a heartbeat (the first miss; a second closes it with 4002).
    async fn heartbeat_missed(&self, _connection_id: &str, _client_id: &str) {}
    /// The connected client reported its state (`client.state`), already stored.
    async fn client_state(&self, _connection_id: &str, _client_id: &str, _state: &str) {}
}
