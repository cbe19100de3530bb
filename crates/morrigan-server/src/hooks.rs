//! Server-side hooks on connection events, for embedding applications.
//!
//! `authenticate` runs before the token is consumed and before the upgrade, so a refusal is an
//! HTTP 403 with the hook's reason (the original ran it after the record was written: F10).
//! `connect` runs after `connection.state accepted` was sent; `disconnect` after the record
//! was closed. Hooks run on the connection's task: keep them short or spawn.

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
}
