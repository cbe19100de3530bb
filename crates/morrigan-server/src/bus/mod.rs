//! The cluster bus: how a node asks the node that holds a socket to write to it or close it.
//!
//! Every connection record names the node holding its socket (`serverId`), so a command is
//! routed to exactly that node (never broadcast), and the caller waits for that node's answer:
//! a REST send answers 200 only after the owning node wrote the frame, or fails with a reason.
//!
//! Backends, one file each: [`local`] (in-process: a single node, or several nodes in one
//! process), [`postgres`] (LISTEN/NOTIFY, the default with a PostgreSQL store: no extra
//! service), [`nats`] (request/reply, for higher rates).

pub mod local;
pub mod nats;
pub mod postgres;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::hub::{Hub, SendError};

/// A command for the node holding a connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum BusCommand {
    /// Write `text` to the connection.
    #[serde(rename_all = "camelCase")]
    Send { connection_id: String, text: String },
    /// Close the connection.
    #[serde(rename_all = "camelCase")]
    Close {
        connection_id: String,
        code: u16,
        reason: String,
    },
}

/// The owning node's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum BusReply {
    /// Written (send) or closed and recorded (close).
    Ok,
    /// That node does not hold the connection (any more).
    NotHere,
    /// The connection closed before the frame was written.
    Closed,
    /// The connection did not take the frame in time.
    Timeout,
}

/// Why a command got no answer.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// No node with that id is listening.
    #[error("node {0} is not reachable on the bus")]
    NoRoute(String),
    /// The node did not answer in time.
    #[error("node {0} did not answer in time")]
    Timeout(String),
    /// The bus itself failed.
    #[error("cluster bus failure: {0}")]
    Transport(String),
}

/// Carries commands between nodes.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Sends `command` to node `node_id` and waits (at most `timeout`) for its answer.
    async fn request(
        &self,
        node_id: &str,
        command: BusCommand,
        timeout: Duration,
    ) -> Result<BusReply, BusError>;

    /// Publishes a cluster event (a JSON object) to the event subscribers of every node, this
    /// one included. At most once: a subscriber that lags or a lost notification misses it.
    async fn publish_event(&self, event: &str) -> Result<(), BusError>;

    /// The events every node publishes (see [`Bus::publish_event`]).
    fn subscribe_events(&self) -> tokio::sync::broadcast::Receiver<Arc<str>>;

    /// The backend's name, for logs and `/healthz`.
    fn name(&self) -> &'static str;

    /// True when no other node can hold a socket of this node's store: the hub then knows
    /// every live connection, and supersede needs no store query.
    fn alone(&self) -> bool {
        false
    }
}

/// Events buffered per subscriber before it lags.
pub const EVENT_BUFFER: usize = 1024;

/// How long the owning node waits for a connection to take a frame.
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(8);

/// Executes a command received from the bus against this node's hub.
pub async fn apply(hub: &Hub, command: BusCommand) -> BusReply {
    match command {
        BusCommand::Send {
            connection_id,
            text,
        } => match hub.send(&connection_id, text, APPLY_TIMEOUT).await {
            Ok(()) => BusReply::Ok,
            Err(SendError::NotHere) => BusReply::NotHere,
            Err(SendError::Closed) => BusReply::Closed,
            Err(SendError::Timeout) => BusReply::Timeout,
        },
        BusCommand::Close {
            connection_id,
            code,
            reason,
        } => {
            let (tx, done) = tokio::sync::oneshot::channel();
            if hub.close(&connection_id, code, &reason, Some(tx)).await {
                let _ = tokio::time::timeout(APPLY_TIMEOUT, done).await;
                BusReply::Ok
            } else {
                BusReply::NotHere
            }
        }
    }
}

/// The wire envelope of the PostgreSQL and NATS backends.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Envelope {
    /// Correlation id.
    pub id: String,
    /// The requesting node (replies go to its channel).
    pub from: String,
    /// The command, inline...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<BusCommand>,
    /// ...or the id of a stashed payload, when the command is too large for the transport.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stash: Option<String>,
    /// Set on replies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<BusReply>,
}

/// Which bus a node uses.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum BusConfig {
    /// PostgreSQL LISTEN/NOTIFY with a PostgreSQL store, in-process otherwise.
    #[default]
    Auto,
    /// In-process only.
    Local,
    /// NATS at this URL.
    Nats(String),
}

/// Resolves a stashed command (a command too large for the transport travels through the store).
pub(crate) async fn unstash(
    store: &Arc<dyn crate::store::Store>,
    env: &Envelope,
) -> Option<BusCommand> {
    if let Some(c) = &env.command {
        return Some(c.clone());
    }
    let id = env.stash.as_deref()?;
    match store.take_payload(id).await {
        Ok(Some(body)) => serde_json::from_str(&body).ok(),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "could not fetch a stashed bus payload");
            None
        }
    }
}

/// Builds an envelope for `command`, stashing it in the store if its JSON exceeds `limit`.
pub(crate) async fn envelope(
    store: &Arc<dyn crate::store::Store>,
    from: &str,
    command: BusCommand,
    limit: usize,
) -> Result<(String, String), BusError> {
    let id = uuid::Uuid::new_v4().to_string();
    let inline = Envelope {
        id: id.clone(),
        from: from.to_string(),
        command: Some(command),
        stash: None,
        reply: None,
    };
    let text = serde_json::to_string(&inline).map_err(|e| BusError::Transport(e.to_string()))?;
    if text.len() <= limit {
        return Ok((id, text));
    }
    let body =
        serde_json::to_string(&inline.command).map_err(|e| BusError::Transport(e.to_string()))?;
    let stash_id = uuid::Uuid::new_v4().to_string();
    store
        .stash_payload(&stash_id, &body, &morrigan_protocol::time_format::now())
        .await
        .map_err(|e| BusError::Transport(e.to_string()))?;
    let stashed = Envelope {
        id: id.clone(),
        from: from.to_string(),
        command: None,
        stash: Some(stash_id),
        reply: None,
    };
    let text = serde_json::to_string(&stashed).map_err(|e| BusError::Transport(e.to_string()))?;
    Ok((id, text))
}
