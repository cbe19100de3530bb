//! Tracked messaging: operator → device messages whose delivery is acknowledged, answered or
//! kept in the client's outbox until it connects, and device → operator (uplink) messages.
//!
//! The store holds the truth (one record per message, states only moving forward, see
//! [`crate::store::messages`]); every change is also a `message` event on the cluster bus,
//! which wakes the operators waiting on any node ([`waiters`]) and opens the outbox gate.
//!
//! * [`Tracker`]: this node's part, used by connections (answers, uplink, the outbox on
//!   accept, the requeue at the end) and by upkeep (expiry, retention).
//! * [`send`]: the operators' sends (to a connection, to a client), over [`crate::delivery`].
//!
//! Nothing here touches the untracked path: a plain `POST …/send` never reads or writes a
//! message record, and a connect reads the outbox only while the gate says some message waits
//! somewhere.

pub mod send;
mod uplink;
mod waiters;

use std::sync::Arc;
use std::time::Duration;

use morrigan_protocol::events::{ConnectionEvent, kinds};
use morrigan_protocol::messages::{self as wire, Direction, MessageState, Track};
use morrigan_protocol::time_format;
use serde_json::Value;

use crate::events::Observer;
use crate::metrics::Metrics;
use crate::store::messages::{Answer, MessageRow, NewMessage, Settled};
use crate::store::{Store, StoreError};
pub use uplink::{DEFAULT_PATTERNS, PatternError, UplinkTypes};
pub use waiters::Signals;
use waiters::Update;

/// Outgoing messages written per round when a connection drains its outbox.
pub(crate) const OUTBOX_BATCH: u32 = 100;
/// Rounds of [`Tracker::outbox`] per accept: with [`OUTBOX_BATCH`], more than any outbox holds.
pub(crate) const OUTBOX_ROUNDS: usize = 20;
/// Messages expired per sweep statement.
const EXPIRE_BATCH: u32 = 1000;
/// Messages deleted per retention statement, and statements per sweep (a sweep that leaves
/// some behind continues at the next).
const PURGE_BATCH: u32 = 1000;
const PURGE_ROUNDS: usize = 100;
/// Longest nack reason kept.
const MAX_REASON: usize = 1024;

/// Why a device's answer (`connection.ack|reply|nack`) was not recorded; the connection
/// provider turns each into a `connection.error`.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    /// Not `ack`, `reply` or `nack`.
    #[error("unknown message")]
    UnknownMessage,
    #[error("{0}")]
    Invalid(String),
    /// No message with that id was sent to this client.
    #[error("{0}")]
    UnknownId(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The bounds and choices of tracked messaging (see `Config`).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Messages kept this long after they were created.
    pub retention: Duration,
    /// Most queued messages per client.
    pub outbox_messages: i64,
    /// Most queued body bytes per client.
    pub outbox_bytes: i64,
    /// Uplink messages kept per client.
    pub uplink_keep: u32,
    pub uplink: UplinkTypes,
}

/// This node's part of tracked messaging.
pub struct Tracker {
    store: Arc<dyn Store>,
    signals: Arc<Signals>,
    observer: Arc<Observer>,
    metrics: Arc<Metrics>,
    node_id: String,
    limits: Limits,
}

impl Tracker {
    pub fn new(
        store: Arc<dyn Store>,
        signals: Arc<Signals>,
        observer: Arc<Observer>,
        metrics: Arc<Metrics>,
        node_id: &str,
        limits: Limits,
    ) -> Self {
        Self {
            store,
            signals,
            observer,
            metrics,
            node_id: node_id.to_string(),
            limits,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub(crate) fn signals(&self) -> &Signals {
        &self.signals
    }

    /// Opens the outbox gate if the store holds undelivered messages (a start, a restart).
    pub async fn start(&self) {
        match self.store.any_pending_messages().await {
            Ok(false) => {}
            Ok(true) => self.signals.open_gate(),
            Err(e) => {
                tracing::warn!(error = %e, "could not read the outboxes; checking on every connect");
                self.signals.open_gate();
            }
        }
    }

    /// Whether some message may wait for delivery anywhere: while not, a connect reads no
    /// outbox (one atomic load).
    pub fn may_have_outbox(&self) -> bool {
        self.signals.gate_open()
    }

    /// Tells this node's waiters and the cluster (a `message` event) that `row` changed.
    pub(crate) fn changed(&self, row: &MessageRow) {
        let Ok(state) = row.state() else { return };
        // As every node does for the event (this node skips its own, see `Signals::event`).
        if matches!(state, MessageState::Queued | MessageState::Written) {
            self.signals.open_gate();
        }
        let reply: Option<Value> = row
            .reply
            .as_deref()
            .and_then(|r| serde_json::from_str(r).ok());
        self.signals.update(
            &row.id,
            Update {
                state,
                reply: reply.clone(),
                reason: row.reason.clone(),
            },
        );
        if !self.observer.read() {
            return;
        }
        let mut e = ConnectionEvent::new(
            kinds::MESSAGE,
            row.connection_id.as_deref().unwrap_or(""),
            &row.client_id,
            &self.node_id,
        );
        e.state = Some(state.as_str().to_string());
        e.message_id = Some(row.id.clone());
        e.message_type = Some(row.message_type.clone());
        e.direction = Some(row.direction.clone());
        e.reply = reply;
        e.reason = row.reason.clone();
        if row.direction == Direction::In.as_str() {
            e.body = serde_json::from_str(&row.body).ok();
        }
        self.observer.publish(&e);
    }

    /// A device's `connection.ack`, `connection.reply` or `connection.nack` (`message`: `ack`,
    /// `reply`, `nack`): recorded if it answers one of this client's messages still waiting
    /// for it; a repeated answer is accepted silently (delivery is at least once).
    pub async fn answer(
        &self,
        client_id: &str,
        message: &str,
        body: &Value,
    ) -> Result<(), AnswerError> {
        if !matches!(message, "ack" | "reply" | "nack") {
            return Err(AnswerError::UnknownMessage);
        }
        let id = body
            .get(wire::MESSAGE_ID)
            .and_then(Value::as_str)
            .ok_or_else(|| AnswerError::Invalid("'messageId' must be a string".into()))?;
        let payload;
        let reason;
        let answer = match message {
            "ack" => Answer::Ack,
            "reply" => {
                payload = body
                    .get("payload")
                    .map(Value::to_string)
                    .unwrap_or_else(|| "null".into());
                Answer::Reply(&payload)
            }
            "nack" => {
                reason = body
                    .get("reason")
                    .and_then(Value::as_str)
                    .unwrap_or("rejected by the device")
                    .chars()
                    .take(MAX_REASON)
                    .collect::<String>();
                Answer::Nack(&reason)
            }
            _ => return Err(AnswerError::UnknownMessage),
        };
        let now = time_format::now();
        match self
            .store
            .settle_message(id, client_id, answer, &now)
            .await?
        {
            Settled::Updated(row) => {
                self.changed(&row);
                Ok(())
            }
            Settled::Unchanged => Ok(()),
            Settled::Unknown => Err(AnswerError::UnknownId(format!(
                "no message '{id}' was sent to this client"
            ))),
        }
    }

    /// Accepts a device message of an uplink type: counted, kept (the client's newest few) and
    /// published. `false` if `message_type` is not uplink.
    pub async fn uplink(
        &self,
        client_id: &str,
        connection_id: &str,
        message_type: &str,
        body: &Value,
    ) -> bool {
        if !self.limits.uplink.matches(message_type) {
            return false;
        }
        let provider = message_type.split('.').next().unwrap_or("");
        self.metrics.message_in(provider);
        let id = message_id();
        let now = time_format::now();
        let text = body.to_string();
        let m = NewMessage {
            id: &id,
            client_id,
            connection_id: Some(connection_id),
            direction: Direction::In,
            message_type,
            body: &text,
            track: Track::None,
            state: MessageState::Received,
            created: &now,
            expires: None,
            idempotency_key: None,
        };
        if let Err(e) = self.store.insert_uplink(&m, self.limits.uplink_keep).await {
            tracing::warn!(error = %e, "could not keep an uplink message; published only");
        }
        self.changed(&MessageRow {
            seq: 0,
            id,
            client_id: client_id.to_string(),
            connection_id: Some(connection_id.to_string()),
            direction: Direction::In.as_str().into(),
            message_type: message_type.to_string(),
            body: text,
            track: Track::None.as_str().into(),
            state: MessageState::Received.as_str().into(),
            created: now,
            written: None,
            acked: None,
            replied: None,
            ended: None,
            expires: None,
            reply: None,
            reason: None,
            idempotency_key: None,
            size: 0,
        });
        true
    }

    /// The frames connection `connection_id` of `client_id` owes its device, oldest first (a
    /// round of at most [`OUTBOX_BATCH`]): nothing, without a store read, while the gate is
    /// closed. A failed read is logged and delivers nothing now (the next connect retries).
    pub async fn outbox(&self, client_id: &str, connection_id: &str) -> Vec<(String, String)> {
        if !self.signals.gate_open() {
            return Vec::new();
        }
        let now = time_format::now();
        let rows = match self
            .store
            .pending_messages(client_id, connection_id, &now, OUTBOX_BATCH)
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the outbox");
                return Vec::new();
            }
        };
        rows.into_iter()
            .filter_map(|row| {
                let frame = match row.track() {
                    Ok(Track::None) => row.body,
                    _ => wire::with_message_id(&row.body, &row.id)?,
                };
                Some((row.id, frame))
            })
            .collect()
    }

    /// Records message `id` written to `connection_id` (and says so).
    pub async fn written(&self, id: &str, connection_id: &str) {
        let now = time_format::now();
        match self.store.mark_written(id, connection_id, &now).await {
            Ok(Some(row)) => self.changed(&row),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, message = %id, "could not record a write"),
        }
    }

    /// The connection ended: its tracked messages still unanswered wait for the next one.
    pub async fn requeue(&self, connection_id: &str) {
        match self.store.requeue_messages(connection_id).await {
            Ok(rows) if rows.is_empty() => {}
            Ok(rows) => {
                tracing::info!(
                    messages = rows.len(),
                    "unanswered messages back in the outbox"
                );
                // Each change (`queued`) opens the gate.
                for row in &rows {
                    self.changed(row);
                }
            }
            // The next connection's outbox read finds them anyway (written elsewhere, unanswered).
            Err(e) => tracing::warn!(error = %e, "could not requeue unanswered messages"),
        }
    }

    /// Fails a deprovisioned client's waiting messages.
    pub async fn client_gone(&self, client_id: &str) {
        let now = time_format::now();
        if let Err(e) = self
            .store
            .fail_client_messages(client_id, "client deprovisioned", &now)
            .await
        {
            tracing::warn!(error = %e, "could not fail a deprovisioned client's messages");
        }
    }

    /// Upkeep: expires what its TTL passed, forgets what retention passed, and closes the
    /// outbox gate when nothing waits anywhere.
    pub async fn sweep(&self, now: time::OffsetDateTime) -> Result<(), crate::store::StoreError> {
        let now_s = time_format::format(now);
        for row in self.store.expire_messages(&now_s, EXPIRE_BATCH).await? {
            self.changed(&row);
        }
        let cutoff = time_format::format(now - self.limits.retention);
        for _ in 0..PURGE_ROUNDS {
            if self.store.purge_messages(&cutoff, PURGE_BATCH).await? < u64::from(PURGE_BATCH) {
                break;
            }
        }
        let generation = self.signals.generation();
        if !self.store.any_pending_messages().await? {
            self.signals.close_gate(generation);
        } else {
            self.signals.open_gate();
        }
        Ok(())
    }
}

/// A new message id: a UUID of version 7, whose leading bits are its creation time, so a
/// record's key lands beside the last one in every B-tree that holds it (a random v4 id put each
/// insert on a page of its own, read back and rewritten at the commit); its 74 random bits keep
/// ids unguessable.
pub(crate) fn message_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Whether `text` (a frame on its way to a device) carries a message id: tracked frames end
/// with it (see [`wire::with_message_id`]), so only the tail is looked at.
pub fn is_tracked(text: &str) -> bool {
    const FIELD: &[u8] = br#""messageId":""#;
    let bytes = text.as_bytes();
    bytes[bytes.len().saturating_sub(64)..]
        .windows(FIELD.len())
        .any(|w| w == FIELD)
}
