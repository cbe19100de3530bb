//! The request protocol shared by the networked buses (PostgreSQL NOTIFY and NATS).
//!
//! A request is an [`Envelope`] with a correlation id and two deadlines (unix milliseconds):
//! `receiveBy` (the owner drops a command it gets later, unread) and `takeBy` (the connection
//! must take the frame by then). The owner answers twice on the requester's reply channel:
//! [`BusReply::Received`] at once, then the outcome. The requester waits [`RECEIPT_WAIT`] for the
//! receipt (longer than [`RECEIPT_WINDOW`], so that a command it gave up on can no longer be
//! received) and then for the outcome until the owner's own bound has passed.
//!
//! Commands larger than the transport carries travel through the store (the envelope names the
//! stashed payload), never truncated.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{BusCommand, BusError, BusReply, CommandHandler};
use crate::store::PayloadStore;

/// The owner drops a command it receives more than this after it was sent.
pub(crate) const RECEIPT_WINDOW: Duration = Duration::from_millis(1000);
/// How long a requester waits for the owner's receipt before answering that the node is not
/// reachable.
pub(crate) const RECEIPT_WAIT: Duration = Duration::from_millis(1500);
/// Slack for the outcome's trip back, beyond the owner's own bound.
const OUTCOME_SLACK: Duration = Duration::from_secs(1);

/// The wire envelope of the networked backends.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Envelope {
    /// Correlation id.
    pub id: String,
    /// The requesting node (replies go to it).
    pub from: String,
    /// Unix ms after which the owner must not carry the command out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receive_by: Option<i64>,
    /// Unix ms by which the connection must take the frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub take_by: Option<i64>,
    /// The command, inline...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<BusCommand>,
    /// ...or the id of a stashed payload, when the command is too large for the transport.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stash: Option<String>,
    /// Set on replies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<BusReply>,
    /// On a receipt: how long after `takeBy` the owner may still report a taken frame's
    /// outcome (its own write timeout and slack), which the requester waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_bound_ms: Option<u64>,
}

/// How a networked backend moves envelopes.
#[async_trait]
pub(crate) trait Transport: Send + Sync + 'static {
    /// Sends a request to node `to`.
    async fn send_request(&self, to: &str, id: &str, payload: String) -> Result<(), BusError>;
    /// Sends a reply to node `to`.
    async fn send_reply(&self, to: &str, id: &str, payload: String) -> Result<(), BusError>;
    /// Whether this node's end of the bus is up (requests and replies can flow).
    fn connected(&self) -> bool;
    /// Largest payload carried inline, in bytes.
    fn limit(&self) -> usize;
}

pub(crate) fn now_ms() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64 / 1_000_000
}

fn transport(e: impl std::fmt::Display) -> BusError {
    BusError::Transport(e.to_string())
}

/// One node's requests in flight and its way of serving others' requests.
pub(crate) struct Rpc {
    node_id: String,
    store: Arc<dyn PayloadStore>,
    pending: DashMap<String, mpsc::Sender<(BusReply, Option<u64>)>>,
    /// How long after `takeBy` an owner may still report a taken frame's outcome (its write
    /// timeout and some slack).
    write_bound: Duration,
}

/// Removes a request from the pending map however its wait ends.
struct Pending<'a> {
    rpc: &'a Rpc,
    id: String,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.rpc.pending.remove(&self.id);
    }
}

impl Rpc {
    pub(crate) fn new(node_id: &str, store: Arc<dyn PayloadStore>, write_bound: Duration) -> Self {
        Self {
            node_id: node_id.to_string(),
            store,
            pending: DashMap::new(),
            write_bound,
        }
    }

    /// Sends `command` to `node_id` over `t` and waits for the outcome (see the module
    /// documentation for the bounds).
    pub(crate) async fn request<T: Transport + ?Sized>(
        &self,
        t: &T,
        node_id: &str,
        command: BusCommand,
        timeout: Duration,
    ) -> Result<BusReply, BusError> {
        if !t.connected() {
            return Err(BusError::Unavailable);
        }
        let started = Instant::now();
        let sent = now_ms();
        let id = uuid::Uuid::new_v4().to_string();
        let envelope = Envelope {
            id: id.clone(),
            from: self.node_id.clone(),
            receive_by: Some(sent + RECEIPT_WINDOW.as_millis() as i64),
            take_by: Some(sent + timeout.as_millis() as i64),
            command: Some(command),
            stash: None,
            reply: None,
            write_bound_ms: None,
        };
        let payload = self.encode(envelope, t.limit()).await?;
        let (tx, mut rx) = mpsc::channel(2);
        self.pending.insert(id.clone(), tx);
        let _pending = Pending {
            rpc: self,
            id: id.clone(),
        };
        t.send_request(node_id, &id, payload).await?;
        // The owner's bound for a taken frame is its own (its write timeout may differ from
        // this node's): waiting less could answer 504 for a frame it then writes.
        let owner_bound = match tokio::time::timeout_at(started + RECEIPT_WAIT, rx.recv()).await {
            Ok(Some((BusReply::Received, bound))) => {
                bound.map_or(self.write_bound, Duration::from_millis)
            }
            Ok(Some((outcome, _))) => return Ok(outcome),
            Ok(None) | Err(_) => return Err(BusError::NoRoute(node_id.to_string())),
        };
        let bound = started + timeout + owner_bound + OUTCOME_SLACK;
        loop {
            match tokio::time::timeout_at(bound, rx.recv()).await {
                Ok(Some((BusReply::Received, _))) => continue,
                Ok(Some((outcome, _))) => return Ok(outcome),
                Ok(None) | Err(_) => return Err(BusError::Timeout(node_id.to_string())),
            }
        }
    }

    /// A reply reached this node (`write_bound_ms` as a receipt carries it).
    pub(crate) fn on_reply(&self, id: &str, reply: BusReply, write_bound_ms: Option<u64>) {
        if let Some(tx) = self.pending.get(id) {
            let _ = tx.try_send((reply, write_bound_ms));
        }
    }

    /// The transport reported that nobody listens for request `id`: its requester answers
    /// [`BusError::NoRoute`] at once.
    pub(crate) fn no_responders(&self, id: &str) {
        self.pending.remove(id);
    }

    /// Carries out a request that reached this node and answers it.
    pub(crate) async fn serve<T: Transport + ?Sized>(
        &self,
        t: &T,
        handler: &dyn CommandHandler,
        envelope: Envelope,
    ) {
        let now = now_ms();
        if envelope.receive_by.is_some_and(|by| now > by) {
            tracing::warn!(from = %envelope.from, late_ms = now - envelope.receive_by.unwrap_or(now), "dropped a bus command received after its deadline");
            return;
        }
        let answer = |reply: BusReply| Envelope {
            id: envelope.id.clone(),
            from: self.node_id.clone(),
            receive_by: None,
            take_by: None,
            command: None,
            stash: None,
            reply: Some(reply),
            write_bound_ms: (reply == BusReply::Received)
                .then(|| u64::try_from(self.write_bound.as_millis()).unwrap_or(u64::MAX)),
        };
        if let Ok(text) = serde_json::to_string(&answer(BusReply::Received))
            && let Err(e) = t.send_reply(&envelope.from, &envelope.id, text).await
        {
            tracing::warn!(error = %e, "could not acknowledge a bus request");
        }
        let take_by = match envelope.take_by {
            Some(by) => {
                Instant::now() + Duration::from_millis(u64::try_from(by - now).unwrap_or(0))
            }
            None => Instant::now() + Duration::from_secs(10),
        };
        let reply = match self.unstash(&envelope).await {
            Some(command) => handler.handle(command, take_by).await,
            None => BusReply::NotHere,
        };
        if let Ok(text) = serde_json::to_string(&answer(reply))
            && let Err(e) = t.send_reply(&envelope.from, &envelope.id, text).await
        {
            tracing::warn!(error = %e, "could not answer a bus request");
        }
    }

    /// The envelope's JSON, with the command stashed in the store if the JSON exceeds `limit`.
    async fn encode(&self, mut envelope: Envelope, limit: usize) -> Result<String, BusError> {
        let text = serde_json::to_string(&envelope).map_err(transport)?;
        if text.len() <= limit {
            return Ok(text);
        }
        let body = serde_json::to_string(&envelope.command).map_err(transport)?;
        let stash_id = uuid::Uuid::new_v4().to_string();
        self.store
            .stash_payload(&stash_id, &body, &morrigan_protocol::time_format::now())
            .await
            .map_err(transport)?;
        envelope.command = None;
        envelope.stash = Some(stash_id);
        serde_json::to_string(&envelope).map_err(transport)
    }

    /// The envelope's command, fetched from the store if it was stashed.
    async fn unstash(&self, envelope: &Envelope) -> Option<BusCommand> {
        if let Some(c) = &envelope.command {
            return Some(c.clone());
        }
        let id = envelope.stash.as_deref()?;
        match self.store.take_payload(id).await {
            Ok(Some(body)) => serde_json::from_str(&body).ok(),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "could not fetch a stashed bus payload");
                None
            }
        }
    }
}
