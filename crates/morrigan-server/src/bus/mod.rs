//! The cluster bus: how a node asks the node that holds a socket to write to it or close it.
//!
//! Every connection record names the node holding its socket (`serverId`), so a command is
//! routed to exactly that node (never broadcast), and the caller waits for that node's answer:
//! a REST send answers 200 only after the owning node wrote the frame, or fails with a reason.
//!
//! Backends, one file each: [`local`] (in-process: a single node, or several nodes in one
//! process), [`postgres`] (LISTEN/NOTIFY, the default with a PostgreSQL store: no extra
//! service), [`nats`] (NATS, for higher rates). The two networked backends share one request
//! protocol ([`rpc`]); none of them knows the hub: commands that reach a node are handed to the
//! [`CommandHandler`] the node gave the bus when it started.
//!
//! **No answered failure is carried out later.** Every command carries two deadlines (wall
//! clock): the owner must *receive* it by the first, or drops it unread, and the connection
//! must *take* its frame by the second, or it is never written. The requester waits for the
//! owner's receipt a little longer than the first deadline before answering 503, and for the
//! outcome a little longer than the owner can take to produce it before answering 504. A bus
//! that knows it is disconnected answers [`BusError::Unavailable`] at once. This assumes the
//! nodes' clocks agree to well within [`rpc::RECEIPT_WINDOW`] (NTP does).

pub mod local;
pub(crate) mod metered;
pub(crate) mod nats;
pub(crate) mod postgres;
pub(crate) mod rpc;

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

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
    /// The connection did not take the frame by the deadline; it will never be written.
    Timeout,
    /// The device did not read the frame within the write timeout; its socket was dropped.
    WriteTimeout,
    /// Receipt: the owner got the command in time and is carrying it out (not a final answer).
    Received,
    /// The owner cannot confirm its lease (it may have been declared lost): it did nothing.
    Unavailable,
}

/// Why a command got no answer.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// No node with that id is listening, or it did not acknowledge the command in time (it
    /// will drop the command if it gets it later).
    #[error("node {0} is not reachable on the bus")]
    NoRoute(String),
    /// The node acknowledged the command but gave no outcome in time.
    #[error("node {0} did not answer in time")]
    Timeout(String),
    /// This node's bus is disconnected: nothing was sent.
    #[error("the cluster bus is disconnected")]
    Unavailable,
    /// The bus itself failed.
    #[error("cluster bus failure: {0}")]
    Transport(String),
}

/// The owning node's answer to a command, or why there is none.
pub type Answer = Result<BusReply, BusError>;

/// What a node does with what the bus brings it: commands for its sockets and the cluster's
/// events. The node implements it over its hub and its event subscribers; the bus only carries
/// commands, answers and events, and hands each to the node once.
#[async_trait]
pub trait CommandHandler: Send + Sync + 'static {
    /// Carries out `command`; a frame must be taken by `take_by`.
    async fn handle(&self, command: BusCommand, take_by: tokio::time::Instant) -> BusReply;

    /// An event some node (this one included) published. Must not wait: the bus's receiving
    /// task calls it.
    fn event(&self, event: &str);
}

/// Carries commands between nodes.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Sends `command` to node `node_id`; its frame must be taken within `timeout`. Waits for
    /// the node's answer (see the module documentation for the bounds).
    async fn request(&self, node_id: &str, command: BusCommand, timeout: Duration) -> Answer;

    /// Publishes a cluster event (a JSON object) to every node, this one included, whose
    /// [`CommandHandler::event`] receives it. At most once: a lost notification misses it.
    async fn publish_event(&self, event: &str) -> Result<(), BusError>;

    /// The backend's name, for logs and `/healthz`.
    fn name(&self) -> &'static str;

    /// True when no other node can hold a socket of this node's store: the hub then knows
    /// every live connection, and supersede needs no store query.
    fn alone(&self) -> bool {
        false
    }
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
