//! Operators' tracked sends: to one connection (`POST /api/core/connection/:id/send?track=`)
//! or to a client wherever it is, queued while it is offline
//! (`POST /api/core/client/:clientId/send`).
//!
//! Every tracked send is recorded before its frame leaves, so the device's answer always finds
//! its record (on whichever node reads it); the operator's wait is bounded by its timeout, and a
//! wait that ends keeps the message as it is (it may still be answered, or delivered later).

use std::time::Duration;

use morrigan_protocol::messages::{self as wire, Direction, MessageState, Track};
use morrigan_protocol::time_format;
use serde_json::Value;

use super::waiters::{POLL, Update};
use crate::delivery::{self, DeliveryError};
use crate::state::AppState;
use crate::store::StoreError;
use crate::store::messages::{Committed, MessageRow, NewMessage};

/// Longest wait for an answer.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(300);
/// The wait of a tracked connection send without `timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest idempotency key.
pub const MAX_KEY_LEN: usize = 200;

/// Why a send was not carried out. Nothing was queued or written, except where the variant
/// carries a message id.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("{0}")]
    Invalid(String),
    #[error("No such client.")]
    NoClient,
    /// The client has no live connection and the send may not wait (no `ttl`).
    #[error("The client is offline; send with a ttl to queue the message in its outbox.")]
    Offline,
    #[error("{0}")]
    OutboxFull(String),
    /// Writing the frame failed: the message (if recorded) is `failed`.
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A validated send body: a JSON object with a valid string `type` and no `messageId`.
pub struct Body {
    pub text: String,
    pub message_type: String,
}

impl Body {
    pub fn parse(text: &str) -> Result<Self, SendError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| SendError::Invalid(format!("Invalid JSON body: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| SendError::Invalid("The message must be a JSON object.".into()))?;
        let ty = obj
            .get("type")
            .ok_or_else(|| SendError::Invalid("No message type specified.".into()))?
            .as_str()
            .ok_or_else(|| SendError::Invalid("The message type must be a string.".into()))?;
        morrigan_protocol::MessageType::parse(ty)
            .map_err(|e| SendError::Invalid(format!("Invalid message type: {e}.")))?;
        if obj.contains_key(wire::MESSAGE_ID) {
            return Err(SendError::Invalid(
                "A tracked message must not carry its own 'messageId': the server assigns it."
                    .into(),
            ));
        }
        Ok(Self {
            text: text.trim().to_string(),
            message_type: ty.to_string(),
        })
    }
}

/// Where a send ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub id: String,
    pub state: MessageState,
    pub reply: Option<Value>,
    pub reason: Option<String>,
    /// The awaited state (for the send's track) was reached.
    pub satisfied: bool,
    /// A wait was asked for and its deadline passed first.
    pub timed_out: bool,
}

impl Outcome {
    fn of(row: &MessageRow, track: Track, timed_out: bool) -> Self {
        let state = row.state().unwrap_or(MessageState::Failed);
        Self {
            id: row.id.clone(),
            state,
            reply: row
                .reply
                .as_deref()
                .and_then(|r| serde_json::from_str(r).ok()),
            reason: row.reason.clone(),
            satisfied: state.satisfies(track),
            timed_out,
        }
    }
}

/// A client send's options.
#[derive(Debug, Clone, Default)]
pub struct ClientSend {
    pub track: Track,
    pub ttl: Option<Duration>,
    pub timeout: Option<Duration>,
    pub idempotency_key: Option<String>,
}

/// Writes `body` with a message id to connection `connection_id` and waits up to `timeout`
/// for the answer `track` asks for.
pub async fn to_connection(
    s: &AppState,
    connection_id: &str,
    track: Track,
    timeout: Duration,
    body: &Body,
) -> Result<Outcome, SendError> {
    let deadline = tokio::time::Instant::now() + timeout;
    // A connection whose session runs here is live: no need to read its record.
    let local = s.hub.client_of(connection_id);
    let client_id = match &local {
        Some(client) => client.to_string(),
        None => {
            let record = s
                .store
                .connection(connection_id)
                .await?
                .ok_or(DeliveryError::NotFound)?;
            if !record.open {
                return Err(DeliveryError::Closed(record.close_code).into());
            }
            if record.connected.is_none() {
                return Err(DeliveryError::NotEstablished.into());
            }
            record.client_id
        }
    };
    let id = super::message_id();
    let now = time_format::now();
    let m = new_message(
        &id,
        &client_id,
        Some(connection_id),
        body,
        track,
        &now,
        None,
        None,
    );
    let row = m.row();
    let slot = s.tracker.signals().wait_for(&id);
    // The device's answer must find the record. Through a session of this node it is recorded
    // by this node's store, after every write queued before it: the frame may leave as soon as
    // the insert is queued, and its commit overlaps the device's round trip. Through another
    // node, the record is committed first.
    let committed = if local.is_some() {
        s.store.queue_message(&m).await?
    } else {
        let (_, inserted) = s.store.insert_message(&m).await?;
        Committed::ready(inserted)
    };
    // The frame may leave from here: its `written` mark is owed even if this future is dropped.
    let unmarked = Unmarked::new(s, &id, connection_id);
    let result = write(s, &row, connection_id, track, body, true).await;
    // Nothing is answered, and no failure recorded, before the record is durable.
    if !committed.wait().await? {
        unmarked.disarm();
        return Err(StoreError::Conflict(format!("message {id} exists")).into());
    }
    // Queued until its written mark: announced as `to_client` does; a device that loses this
    // socket and connects again before the mark reads it from its outbox.
    s.tracker.changed(&row);
    match result {
        Ok(()) => wait(s, &slot, &row, track, deadline, Some(unmarked)).await,
        Err(e) => {
            unmarked.disarm();
            fail(s, &id, &e.to_string()).await;
            Err(e)
        }
    }
}

/// Sends `body` to client `client_id`: written to its live connection (on whichever node), else
/// queued in its outbox when `opts.ttl` allows, else refused; then waits up to `opts.timeout`
/// (if given) for the answer `opts.track` asks for.
pub async fn to_client(
    s: &AppState,
    client_id: &str,
    opts: &ClientSend,
    body: &Body,
) -> Result<Outcome, SendError> {
    let deadline = opts.timeout.map(|t| tokio::time::Instant::now() + t);
    // A retry answers with the first message, whatever changed since (client online or not,
    // outbox full or not).
    if let Some(key) = opts.idempotency_key.as_deref()
        && let Some(earlier) = s.store.message_by_key(client_id, key).await?
    {
        return answer_for(s, &earlier, opts.track, deadline).await;
    }
    if s.store.client(client_id).await?.is_none() {
        return Err(SendError::NoClient);
    }
    let live = live_connection(s, client_id).await?;
    if live.is_none() && opts.ttl.is_none() {
        return Err(SendError::Offline);
    }
    let limits = s.tracker.limits();
    if opts.ttl.is_some() {
        let (count, bytes) = s.store.outbox_usage(client_id).await?;
        let size = i64::try_from(body.text.len()).unwrap_or(i64::MAX);
        if count >= limits.outbox_messages {
            return Err(SendError::OutboxFull(format!(
                "The client's outbox holds {count} messages, its limit."
            )));
        }
        if bytes.saturating_add(size) > limits.outbox_bytes {
            return Err(SendError::OutboxFull(format!(
                "The client's outbox would exceed {} bytes.",
                limits.outbox_bytes
            )));
        }
    }
    let id = super::message_id();
    let now = time::OffsetDateTime::now_utc();
    let expires = opts.ttl.map(|ttl| time_format::format(now + ttl));
    let now = time_format::format(now);
    let (row, inserted) = s
        .store
        .insert_message(&new_message(
            &id,
            client_id,
            None,
            body,
            opts.track,
            &now,
            expires.as_deref(),
            opts.idempotency_key.as_deref(),
        ))
        .await?;
    if !inserted {
        // A retry racing the first request: the first one delivers.
        return answer_for(s, &row, opts.track, deadline).await;
    }
    let slot = s.tracker.signals().wait_for(&row.id);
    // Queued until written and marked: announced, so that every node's outbox gate is open
    // before the frame can leave (a device that loses the frame's socket and connects again at
    // once, anywhere, reads it from its outbox).
    s.tracker.changed(&row);
    // Only a send that waits for an answer defers the `written` mark (see `MARK_AFTER`).
    let defer = deadline.is_some() && opts.track != Track::None;
    let unmarked = deliver(s, &row, live, opts, body, defer)
        .await?
        .map(|conn| Unmarked::new(s, &row.id, &conn));
    match deadline {
        Some(deadline) => wait(s, &slot, &row, opts.track, deadline, unmarked).await,
        None => current(s, &row, opts.track).await,
    }
}

/// The answer about an existing message: its state now, or after waiting until `deadline`.
async fn answer_for(
    s: &AppState,
    row: &MessageRow,
    track: Track,
    deadline: Option<tokio::time::Instant>,
) -> Result<Outcome, SendError> {
    let Some(deadline) = deadline else {
        return current(s, row, track).await;
    };
    let slot = s.tracker.signals().wait_for(&row.id);
    wait(s, &slot, row, track, deadline, None).await
}

/// The first delivery of a new client message: to `live` if there is one, else (or if that
/// fails and the message may wait) into the outbox, looking once more for a connection that
/// arrived meanwhile. Returns the connection it was written to with its mark deferred.
async fn deliver(
    s: &AppState,
    row: &MessageRow,
    live: Option<String>,
    opts: &ClientSend,
    body: &Body,
    defer: bool,
) -> Result<Option<String>, SendError> {
    if let Some(conn) = live {
        match write(s, row, &conn, opts.track, body, defer).await {
            Ok(()) => return Ok(defer.then_some(conn)),
            Err(e) if opts.ttl.is_none() => {
                fail(s, &row.id, &e.to_string()).await;
                return Err(e);
            }
            Err(e) => tracing::debug!(error = %e, "queued after a failed write"),
        }
    }
    // Queued (and announced, see `to_client`): a connection accepted from now on reads it.
    // One accepted before the insert did not: look again.
    if let Some(conn) = live_connection(s, &row.client_id).await? {
        // Still queued if this fails: the connection's next outbox read delivers it.
        let _ = write(s, row, &conn, opts.track, body, false).await;
    }
    Ok(None)
}

/// How long a waiting send leaves its message's record `queued` after the frame is on the
/// socket: a device that answers within it writes the one statement that says both (its
/// answer sets `written` too), one that does not gets the `written` mark then. A crash in
/// between leaves the record `queued`, which redelivers it: at least once either way.
const MARK_AFTER: std::time::Duration = std::time::Duration::from_millis(50);

/// Writes `row` to `connection_id` and records it written; a failed write fails the message
/// (the caller decides whether it may wait instead).
async fn write(
    s: &AppState,
    row: &MessageRow,
    connection_id: &str,
    track: Track,
    body: &Body,
    defer_mark: bool,
) -> Result<(), SendError> {
    let started = std::time::Instant::now();
    match delivery::send(s, connection_id, frame(row, track, body)).await {
        Ok(()) => {
            s.metrics.send_duration(started, "ok");
            s.metrics.message_out(&body.message_type);
            if !defer_mark {
                s.tracker.written(&row.id, connection_id).await;
            }
            Ok(())
        }
        Err(e) => {
            s.metrics.send_duration(started, "error");
            Err(e.into())
        }
    }
}

/// Fails message `id` after a write failed and it may not wait.
async fn fail(s: &AppState, id: &str, reason: &str) {
    let now = time_format::now();
    match s.store.fail_message(id, reason, &now).await {
        Ok(Some(row)) => s.tracker.changed(&row),
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, message = %id, "could not record a failed message"),
    }
}

fn frame(row: &MessageRow, track: Track, body: &Body) -> String {
    match track {
        Track::None => body.text.clone(),
        // `Body::parse` checked it is an object.
        _ => wire::with_message_id(&body.text, &row.id).unwrap_or_else(|| body.text.clone()),
    }
}

/// The client's live connection (the newest accepted), if any.
async fn live_connection(s: &AppState, client_id: &str) -> Result<Option<String>, StoreError> {
    let open = s.store.open_connections_of_client(client_id, "").await?;
    Ok(open
        .into_iter()
        .filter(|c| c.connected.is_some())
        .max_by(|a, b| (&a.connected, &a.id).cmp(&(&b.connected, &b.id)))
        .map(|c| c.id))
}

/// The message's state now, not waited for.
async fn current(s: &AppState, row: &MessageRow, track: Track) -> Result<Outcome, SendError> {
    let row = s
        .store
        .message(&row.id)
        .await?
        .unwrap_or_else(|| row.clone());
    Ok(Outcome::of(&row, track, false))
}

/// Waits until the message reaches what `track` asks for or a final state, or `deadline`: the
/// events wake it, the store decides (re-read every [`POLL`] and at the deadline).
/// `unmarked`: the message's deferred `written` mark (made after [`MARK_AFTER`] unless an
/// answer came first).
async fn wait(
    s: &AppState,
    slot: &super::waiters::Slot,
    row: &MessageRow,
    track: Track,
    deadline: tokio::time::Instant,
    mut unmarked: Option<Unmarked>,
) -> Result<Outcome, SendError> {
    let done = |u: &Update| u.state.satisfies(track) || u.state.is_final();
    let mark_at = tokio::time::Instant::now() + MARK_AFTER;
    loop {
        let notified = slot.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(u) = slot.latest()
            && done(&u)
        {
            // Answered (which says written too) or ended: no mark is owed.
            if let Some(m) = unmarked {
                m.disarm();
            }
            return Ok(Outcome {
                id: row.id.clone(),
                state: u.state,
                reply: u.reply,
                reason: u.reason,
                satisfied: u.state.satisfies(track),
                timed_out: false,
            });
        }
        if unmarked.is_some() {
            tokio::select! {
                _ = &mut notified => continue,
                _ = tokio::time::sleep_until(mark_at.min(deadline)) => {}
            }
            if let Some(m) = unmarked.take() {
                m.mark().await;
            }
            continue;
        }
        let poll = tokio::time::Instant::now() + POLL;
        tokio::select! {
            _ = &mut notified => continue,
            _ = tokio::time::sleep_until(poll.min(deadline)) => {}
        }
        // A poll, or the deadline: the store's word.
        let now_row = s
            .store
            .message(&row.id)
            .await?
            .unwrap_or_else(|| row.clone());
        let outcome = Outcome::of(&now_row, track, false);
        if outcome.satisfied || outcome.state.is_final() {
            return Ok(outcome);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(Outcome {
                timed_out: true,
                ..outcome
            });
        }
    }
}

/// The `written` mark a send owes its message (see [`MARK_AFTER`]): made by [`wait`], or by a
/// task of its own if the send's future is dropped first (its HTTP client left), so that a
/// frame that left is never recorded as still `queued` while its connection lives. A frame
/// handed to the session is written even if its sender is dropped (only a sender that waits
/// out its deadline cancels it, see `ticket.rs`). The one frame that is not: one still waiting
/// for room in the session's queue when the request is dropped; its record then says
/// `written` and, unanswered, it is written again on the client's next connection.
struct Unmarked {
    tracker: std::sync::Arc<super::Tracker>,
    id: String,
    connection_id: String,
    armed: bool,
}

impl Unmarked {
    fn new(s: &AppState, id: &str, connection_id: &str) -> Self {
        Self {
            tracker: s.tracker.clone(),
            id: id.to_string(),
            connection_id: connection_id.to_string(),
            armed: true,
        }
    }

    async fn mark(mut self) {
        self.armed = false;
        self.tracker.written(&self.id, &self.connection_id).await;
    }

    /// Another write recorded the message.
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Unmarked {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (tracker, id, conn) = (
            self.tracker.clone(),
            std::mem::take(&mut self.id),
            std::mem::take(&mut self.connection_id),
        );
        // Bounded by the store deadline.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { tracker.written(&id, &conn).await });
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn new_message<'a>(
    id: &'a str,
    client_id: &'a str,
    connection_id: Option<&'a str>,
    body: &'a Body,
    track: Track,
    now: &'a str,
    expires: Option<&'a str>,
    idempotency_key: Option<&'a str>,
) -> NewMessage<'a> {
    NewMessage {
        id,
        client_id,
        connection_id,
        direction: Direction::Out,
        message_type: &body.message_type,
        body: &body.text,
        track,
        state: MessageState::Queued,
        created: now,
        expires,
        idempotency_key,
    }
}
