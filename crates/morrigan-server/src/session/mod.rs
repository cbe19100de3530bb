//! One WebSocket connection's task.
//!
//! The task owns the socket: it reads frames, writes the frames queued by REST sends, pings on
//! the heartbeat period, hands device messages to their providers, and on any end writes the
//! record (`open:false`, `alive:false`, `disconnected`, close code and reason) before it returns.
//! Nothing else touches the socket, so there is no lock on it, and the task spawns nothing.
//!
//! No peer can stall it: writes are appended and flushed beside reading, pinging and handling
//! (a device that stops reading is dropped with 4008 once the write timeout passes, and its
//! liveness is judged meanwhile as for any silent device); a device message whose handler waits
//! does not hold up writes; a close requested through the hub's [`Control`] is seen at once,
//! and a task that does not end within the hub's grace period is forced.

mod inbound;
mod wire;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;

pub(crate) use wire::CLOSE_WAIT;

use morrigan_protocol::close;
use morrigan_protocol::message::{ConnectionState, error_kinds, types};
use morrigan_protocol::records::ConnectionRecord;
use morrigan_protocol::time_format;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tracing::Instrument;
use tungstenite::Message;

use crate::hooks::Disconnect;
use crate::hub::{ConnHandle, Control, Liveness, Outgoing, Registered};
use crate::messaging;
use crate::providers::MessageContext;
use crate::state::AppState;
use crate::store::CloseInfo;
use crate::ticket::SendError;
use inbound::{Inbound, Inbox, RateLimit, error_frame};
use wire::{AppendError, Io, Wire};

/// How long a connection that is ending still handles the messages its device sent before.
const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

pub(crate) fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0),
    )
    .unwrap_or(i64::MAX)
}

/// How the connection ended.
struct End {
    code: u16,
    reason: String,
}

impl End {
    fn new(code: u16, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }

    fn lost(reason: impl Into<String>) -> Self {
        Self::new(close::ABNORMAL, reason)
    }
}

/// Runs an accepted connection to its end. `registered` is the hub entry made before the
/// token was consumed (see [`crate::hub::Hub::reserve`]).
pub async fn run<S>(
    state: AppState,
    record: ConnectionRecord,
    registered: Registered,
    socket: WebSocketStream<S>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let span = tracing::info_span!("conn", id = %record.id, client = %record.client_id);
    run_inner(state, record, registered, socket)
        .instrument(span)
        .await
}

async fn run_inner<S>(
    state: AppState,
    record: ConnectionRecord,
    registered: Registered,
    socket: WebSocketStream<S>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Registered { id, handle, mut rx } = registered;
    let ConnHandle {
        tx,
        liveness,
        control,
    } = handle;
    let client_id: Arc<str> = Arc::from(record.client_id.as_str());
    let _ = liveness.client.set(client_id.clone());
    let replaced = state.hub.promote(&id, &client_id);
    tracing::info!(address = ?record.client_address, "connected");
    let mut wire = Wire::new(socket, state.config.effective_write_timeout());

    // Alone, the hub knows every live connection: the one this replaced is the older one. In a
    // cluster the older one may be on another node, which only the store knows.
    let superseded = if state.bus.alone() {
        if let Some(older) = replaced {
            let reason = format!("superseded by connection {}", record.id);
            // Not waited for: the older task closes on its own, within its own bounds.
            let _ = state.hub.request_close(&older, close::SUPERSEDED, &reason);
            tracing::info!(older = %older, "superseded an older connection");
        }
        None
    } else {
        Box::pin(supersede(&state, &record)).await
    };
    // Closed while it was being accepted (a deprovisioning, a DELETE or shutdown that found it
    // registered): it never serves.
    let closing = control.close_requested();

    let accepted = ConnectionState {
        kind: types::CONNECTION_STATE.into(),
        state: "accepted".into(),
        reason: None,
        connection_id: Some(record.id.clone()),
    };
    let fenced = !state.lease.held();
    // Tracked messages written here: only then does the end requeue.
    let mut tracked = Owed::default();
    let sent = match serde_json::to_string(&accepted) {
        Ok(text) if closing.is_none() && !fenced => {
            Box::pin(wire.send_now(Message::Text(text.into()))).await
        }
        _ => false,
    };
    let end = match (sent, superseded) {
        _ if fenced => End::lost("this node cannot confirm its lease"),
        (false, _) if let Some(req) = closing => {
            Box::pin(wire.close(req.code, &req.reason, CLOSE_WAIT)).await;
            End::new(req.code, req.reason)
        }
        (true, None) => {
            for hook in state.hooks.iter() {
                hook.connect(&record).await;
            }
            let ctx = MessageContext {
                connection_id: id.clone(),
                client_id: client_id.clone(),
                services: state.services.clone(),
            };
            // Not needed past the hooks: its strings would otherwise live as long as the socket.
            drop(record);
            // The hub's forced end wins over anything the loop is doing.
            tokio::select! {
                biased;
                _ = control.kill_signal() => forced(&control),
                end = async {
                    if state.tracker.may_have_outbox()
                        && let Some(end) = Box::pin(outbox(&state, &ctx, &mut wire, &mut tracked)).await
                    {
                        return end;
                    }
                    serve(&state, &ctx, &mut wire, &mut rx, &liveness, &control, &mut tracked).await
                } => end,
            }
        }
        // A newer connection of this client was accepted while this one started.
        (true, Some(reason)) => {
            Box::pin(wire.close(close::SUPERSEDED, &reason, CLOSE_WAIT)).await;
            End::new(close::SUPERSEDED, reason)
        }
        (false, _) => End::lost("could not send the accept frame"),
    };

    state.hub.remove(&id, &tx, Some(&client_id));
    // Release the socket (and the peer) before the record's write, so a reconnecting device
    // does not wait on the store; the record is still written below before this task ends, and
    // shutdown awaits the task.
    wire.fail_pending(SendError::Closed(Some(end.code)));
    drop(wire);
    drop(tx);
    // Anything still queued will never be written: tell those senders why now.
    rx.close();
    while let Ok(frame) = rx.try_recv() {
        frame.ticket.failed(SendError::Closed(Some(end.code)));
    }

    let now = time_format::now();
    let info = CloseInfo {
        at: &now,
        code: end.code,
        reason: &end.reason,
    };
    // Written now, or queued and retried until the store takes it (see records.rs).
    Box::pin(state.records.close(&id, &info)).await;
    if tracked.any {
        Box::pin(state.tracker.requeue(&id)).await;
    }
    tracing::info!(code = end.code, reason = %end.reason, "disconnected");
    control.finish();
    let event = Disconnect {
        connection_id: id.to_string(),
        client_id: client_id.to_string(),
        code: end.code,
        reason: end.reason,
    };
    for hook in state.hooks.iter() {
        hook.disconnect(&event).await;
    }
}

/// Most answers a connection may owe beyond its message rate.
const MAX_OWED: u32 = 1024;

/// The tracked frames written on a connection: whether any was (its end requeues those left
/// unanswered), and how many answers (`connection.ack|reply|nack`) the device owes. Those
/// answers pass the per-connection rate limit, one per tracked frame: an operator who sends a
/// device more than its message rate must not lose the answers to timeouts.
#[derive(Default)]
struct Owed {
    any: bool,
    answers: u32,
}

impl Owed {
    /// A frame went to the device.
    fn wrote(&mut self, text: &str) {
        if messaging::is_tracked(text) {
            self.any = true;
            self.answers = (self.answers + 1).min(MAX_OWED);
        }
    }

    /// Whether `text`, over the rate limit, is an owed answer (and counts it).
    fn answered(&mut self, text: &str) -> bool {
        if self.answers > 0 && inbound::is_answer(text) {
            self.answers -= 1;
            true
        } else {
            false
        }
    }
}

/// The end of a task forced by the hub: the requested close, marked as forced.
fn forced(control: &Control) -> End {
    match control.close_requested() {
        Some(req) => End::new(req.code, format!("{} (forced)", req.reason)),
        None => End::new(close::INTERNAL_ERROR, "connection task forced to end"),
    }
}

/// One live connection per client: the newest by (accept time, id). Every session runs this
/// right after entering the hub, so that whatever the interleaving of racing accepts exactly one
/// survives:
/// * an older connection is closed, through whichever node holds it;
/// * a newer connection means this one is superseded: the returned reason, with which the
///   session closes itself right after its accept frame;
/// * a pending record (token issued, unused) is not a live connection and is left alone: if its
///   token is used later, that connection supersedes this one then;
/// * an older connection of this node that is not in the hub yet is left alone too: its
///   session is starting, will find this newer one and close itself.
async fn supersede(state: &AppState, record: &ConnectionRecord) -> Option<String> {
    let others = match state
        .store
        .open_connections_of_client(&record.client_id, &record.id)
        .await
    {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(error = %e, "could not look up older connections");
            return None;
        }
    };
    let mine = (
        record.connected.as_deref().unwrap_or(""),
        record.id.as_str(),
    );
    let reason = format!("superseded by connection {}", record.id);
    let mut newer = None;
    for other in others {
        let Some(connected) = other.connected.as_deref() else {
            continue;
        };
        if (connected, other.id.as_str()) > mine {
            tracing::info!(newer = %other.id, "superseded by a newer connection");
            newer = Some(format!("superseded by connection {}", other.id));
            continue;
        }
        if other.server_id.as_deref() == Some(&*state.node_id) && state.hub.get(&other.id).is_none()
        {
            continue;
        }
        // Not waited for: the new connection is accepted at once whatever the older one's node
        // does; the close (or, with no node able to, the record's) lands on its own.
        let (st, reason) = (state.clone(), reason.clone());
        tracing::info!(older = %other.id, "superseding an older connection");
        state.sessions.spawn(async move {
            crate::delivery::close_anywhere(&st, &other, close::SUPERSEDED, &reason).await;
        });
    }
    newer
}

/// Writes the client's outbox right after `accepted`, oldest first, each message recorded as
/// written once it is on the socket (see [`crate::messaging`]); `Some` if the socket failed.
/// Costs nothing while no message waits anywhere (the tracker's gate).
async fn outbox<S: AsyncRead + AsyncWrite + Unpin>(
    state: &AppState,
    ctx: &MessageContext,
    wire: &mut Wire<S>,
    tracked: &mut Owed,
) -> Option<End> {
    for _ in 0..messaging::OUTBOX_ROUNDS {
        let frames = state
            .tracker
            .outbox(&ctx.client_id, &ctx.connection_id)
            .await;
        let round = frames.len();
        for (message_id, frame) in frames {
            if !state.lease.held() {
                return Some(End::lost("this node cannot confirm its lease"));
            }
            tracked.wrote(&frame);
            if !wire.send_now(Message::Text(frame.into())).await {
                return Some(End::lost("could not write a queued message"));
            }
            state.tracker.written(&message_id, &ctx.connection_id).await;
        }
        if round < messaging::OUTBOX_BATCH as usize {
            break;
        }
    }
    None
}

/// The connection's loop, until something ends it.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    state: &AppState,
    ctx: &MessageContext,
    wire: &mut Wire<S>,
    rx: &mut mpsc::Receiver<Box<Outgoing>>,
    liveness: &Arc<Liveness>,
    control: &Control,
    tracked: &mut Owed,
) -> End {
    let period = state.config.heartbeat_interval;
    // Pings sent since the last pong: one unanswered marks the connection not alive, two close
    // it (counted, not timed, so that a late tick cannot skip the first verdict).
    let mut unanswered: u32 = 0;
    let write_timeout = state.config.effective_write_timeout();
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut limit = RateLimit::new(state.config.max_messages_per_second);
    let mut inbox = Inbox::new();
    let mut due = Vec::new();
    let write_timer = tokio::time::sleep_until(tokio::time::Instant::now());
    tokio::pin!(write_timer);
    let mut armed = None;
    let end = loop {
        if let Some(deadline) = wire.deadline()
            && armed != Some(deadline)
        {
            write_timer.as_mut().reset(deadline);
            armed = Some(deadline);
        }
        let flushing = wire.flushing();
        // A fenced node writes nothing and takes nothing in (see lease.rs) until its lease is
        // confirmed again.
        let held = state.lease.held();
        let reading = inbox.has_room() && held;
        tokio::select! {
            biased;
            _ = control.close_signal() => {
                let req = control.close_requested().unwrap_or(crate::hub::CloseRequest {
                    code: close::INTERNAL_ERROR,
                    reason: String::new(),
                });
                if state.lease.held() {
                    Box::pin(wire.close(req.code, &req.reason, CLOSE_WAIT)).await;
                }
                break End::new(req.code, req.reason);
            }
            _ = state.lease.confirmed(), if !held => {}
            _ = &mut write_timer, if flushing => {
                let reason = format!(
                    "write timeout: the device did not read for {} ms",
                    write_timeout.as_millis()
                );
                tracing::info!("{reason}; dropping the socket");
                wire.fail_pending(SendError::WriteTimeout);
                break End::new(close::WRITE_TIMEOUT, reason);
            }
            io = futures_util::future::poll_fn(|cx| wire.poll_io(&state.lease, reading, cx)) => match io {
                Io::Flushed(Ok(())) => wire.flushed(),
                Io::Flushed(Err(e)) => break End::lost(format!("write failed: {e}")),
                Io::Frame(None) => break End::lost("connection lost"),
                Io::Frame(Some(Err(e))) => {
                    break Box::pin(read_error(wire, e, state.config.max_message_size)).await;
                }
                Io::Frame(Some(Ok(msg))) => match msg {
                    Message::Text(text) => {
                        // An answer the device owes for a tracked frame is not limited: the
                        // operator chose that rate (see `Owed`).
                        if limit.allow() || tracked.answered(&text) {
                            inbox.push(Inbound::Message(text));
                        } else {
                            inbox.push(Inbound::Answer(error_frame(
                                error_kinds::RATE_LIMITED,
                                format!(
                                    "more than {} messages per second; message dropped",
                                    state.config.max_messages_per_second
                                ),
                                None,
                            )));
                        }
                    }
                    Message::Binary(_) => inbox.push(Inbound::Answer(error_frame(
                        error_kinds::BINARY_FRAME,
                        "binary frames are not supported; send JSON text frames",
                        None,
                    ))),
                    Message::Pong(_) => {
                        unanswered = 0;
                        liveness.last_pong_ms.store(now_ms(), Ordering::Release);
                        liveness.alive.store(true, Ordering::Release);
                        state.heartbeats.mark(&ctx.connection_id, liveness);
                    }
                    Message::Close(frame) => {
                        // tungstenite queued the close reply; flush it so the peer sees a clean close.
                        Box::pin(wire.answer_close()).await;
                        let (code, reason) = frame
                            .map(|f| (u16::from(f.code), f.reason.to_string()))
                            .unwrap_or((close::NO_STATUS, String::new()));
                        let reason = if reason.is_empty() { "closed by client".to_string() } else { reason };
                        break End::new(code, reason);
                    }
                    Message::Ping(_) | Message::Frame(_) => {}
                },
            },
            reply = futures_util::future::poll_fn(|cx| match inbox.running.as_mut() {
                Some(h) => h.as_mut().poll(cx),
                None => Poll::Pending,
            }), if inbox.running.is_some() => {
                inbox.running = None;
                if let Some(reply) = reply {
                    due.push(reply);
                }
            }
            frame = rx.recv(), if !flushing && held => {
                // The hub's handle keeps a sender alive until this task removes it.
                let Some(frame) = frame else {
                    break End::new(close::INTERNAL_ERROR, "command channel closed");
                };
                let Outgoing { text, ticket } = *frame;
                tracked.wrote(&text);
                // A frame whose sender gave up is never written, nor one reaching a node that
                // just found it cannot confirm its lease (the sender hears "closed").
                if !state.lease.held() {
                    ticket.failed(SendError::Closed(None));
                } else if ticket.take() && let Err(e) = wire.append_frame(text, ticket) {
                    break append_failed(e, write_timeout);
                }
            }
            _ = ping.tick(), if held => {
                // The guard was checked before this wait: the node may have stalled since.
                if !state.lease.held() {
                    continue;
                }
                let silent = now_ms() - liveness.last_pong_ms.load(Ordering::Acquire);
                if unanswered >= 2 {
                    tracing::info!(silent_ms = silent, "heartbeat missed twice; closing");
                    Box::pin(wire.close(close::HEARTBEAT_TIMEOUT, "heartbeat missed twice", CLOSE_WAIT)).await;
                    break End::new(close::HEARTBEAT_TIMEOUT, "heartbeat missed twice");
                }
                if unanswered >= 1 && liveness.alive.swap(false, Ordering::AcqRel) {
                    tracing::info!(silent_ms = silent, "heartbeat missed");
                    state.heartbeats.mark(&ctx.connection_id, liveness);
                    for hook in state.hooks.iter() {
                        hook.heartbeat_missed(&ctx.connection_id, &ctx.client_id).await;
                    }
                }
                // A ping stuck behind unread data counts as unanswered too: a device that does not
                // read is judged as one that does not answer.
                unanswered += 1;
                match wire.append(Message::Ping(Default::default())) {
                    // Behind unread data: the write deadline decides.
                    Ok(()) | Err(AppendError::Full) => {}
                    Err(AppendError::Failed) => break End::lost("write failed"),
                }
            },
        }
        inbox.advance(ctx, state, &mut due);
        if !state.lease.held() {
            continue;
        }
        let mut failed = None;
        for text in due.drain(..) {
            if let Err(e) = wire.append(Message::Text(text.into())) {
                failed = Some(append_failed(e, write_timeout));
                break;
            }
        }
        if let Some(end) = failed {
            break end;
        }
    };
    // Messages the device sent before the end are still handled (a device that reports its
    // state and closes must see it stored), within a bound; their answers cannot be sent.
    Box::pin(inbox.drain(ctx, state, tokio::time::Instant::now() + DRAIN_WAIT)).await;
    end
}

fn append_failed(e: AppendError, write_timeout: std::time::Duration) -> End {
    match e {
        AppendError::Full => End::new(
            close::WRITE_TIMEOUT,
            format!(
                "write timeout: the device did not read for {} ms",
                write_timeout.as_millis()
            ),
        ),
        AppendError::Failed => End::lost("write failed"),
    }
}

/// A read failed: an oversized message gets 1009, a malformed frame 1002, invalid UTF-8 1007;
/// only this socket ends.
async fn read_error<S: AsyncRead + AsyncWrite + Unpin>(
    wire: &mut Wire<S>,
    e: tungstenite::Error,
    limit: usize,
) -> End {
    use tungstenite::error::Error as WsError;
    let (code, reason) = match e {
        WsError::Capacity(_) => (
            close::MESSAGE_TOO_BIG,
            format!("message exceeds {limit} bytes"),
        ),
        WsError::Protocol(p) => {
            let reason = format!("protocol error: {p}");
            (close::PROTOCOL_ERROR, reason.chars().take(100).collect())
        }
        WsError::Utf8(_) => (
            close::INVALID_PAYLOAD,
            "invalid UTF-8 in a text frame".to_string(),
        ),
        other => return End::lost(format!("connection lost: {other}")),
    };
    wire.refuse(code, &reason).await;
    End::new(code, reason)
}

#[cfg(test)]
mod size {
    use super::*;

    /// The future of every connection task stays small: it is what each connection costs
    /// beyond its buffers. A buffer held across an await, or a rarely used branch that is not
    /// boxed, shows up here.
    #[test]
    fn a_connection_task_is_small() {
        fn size_of_future<F, Fut>(_: F) -> usize
        where
            F: FnOnce(
                AppState,
                ConnectionRecord,
                Registered,
                WebSocketStream<tokio::net::TcpStream>,
            ) -> Fut,
        {
            std::mem::size_of::<Fut>()
        }
        let size = size_of_future(run::<tokio::net::TcpStream>);
        println!("connection task future: {size} bytes");
        assert!(size < 4096, "a connection task's future takes {size} bytes");
    }
}
