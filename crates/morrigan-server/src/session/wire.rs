//! The socket of one connection, as its task drives it: frames are *appended* to tungstenite's
//! write buffer without waiting and flushed beside everything else the task does, so a device
//! that stops reading can hold up nothing but its own writes, and only until the write
//! deadline.
//!
//! Everything here is bounded: appending never waits; a flush is raced against the write
//! deadline by the caller; every close waits at most its budget; after a read error the peer's
//! remaining bytes are drained for at most [`CLOSE_WAIT`] so that the close frame reaches it
//! instead of a reset.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Sink, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tungstenite::Message;
use tungstenite::error::Error as WsError;
use tungstenite::protocol::CloseFrame;

use crate::lease::Lease;
use crate::ticket::{SendError, TicketWriter};

/// How long a close waits for its frame to drain and for the peer's close reply.
pub(crate) const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// What the socket did.
pub(super) enum Io {
    /// Everything appended so far reached the socket (or failed to).
    Flushed(Result<(), WsError>),
    /// The next frame read (`None`: the socket ended).
    Frame(Option<Result<Message, WsError>>),
}

/// Why a frame could not be appended.
pub(super) enum AppendError {
    /// Too much is already waiting for a device that does not read.
    Full,
    /// The socket failed or is closing.
    Failed,
}

/// A WebSocket and what its task has appended but not yet seen flushed.
pub(super) struct Wire<S> {
    ws: WebSocketStream<S>,
    /// When what is appended must have drained; `None` when nothing is pending.
    deadline: Option<Instant>,
    /// Operator frames appended since the last completed flush.
    tickets: Vec<TicketWriter>,
    write_timeout: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    pub(super) fn new(ws: WebSocketStream<S>, write_timeout: Duration) -> Self {
        Self {
            ws,
            deadline: None,
            tickets: Vec::new(),
            write_timeout,
        }
    }

    /// When the pending write must be done, if one is pending.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    pub(super) fn flushing(&self) -> bool {
        self.deadline.is_some()
    }

    /// Appends `msg` without waiting; the write deadline starts when the buffer stops being
    /// empty.
    pub(super) fn append(&mut self, msg: Message) -> Result<(), AppendError> {
        match Pin::new(&mut self.ws).start_send(msg) {
            Ok(()) => {
                if self.deadline.is_none() {
                    self.deadline = Some(Instant::now() + self.write_timeout);
                }
                Ok(())
            }
            Err(WsError::WriteBufferFull(_)) => Err(AppendError::Full),
            Err(_) => Err(AppendError::Failed),
        }
    }

    /// Appends an operator frame whose ticket is reported when the flush completes.
    pub(super) fn append_frame(
        &mut self,
        text: String,
        ticket: TicketWriter,
    ) -> Result<(), AppendError> {
        match self.append(Message::Text(text.into())) {
            Ok(()) => {
                self.tickets.push(ticket);
                Ok(())
            }
            Err(e) => {
                ticket.failed(match e {
                    AppendError::Full => SendError::WriteTimeout,
                    AppendError::Failed => SendError::Closed(None),
                });
                Err(e)
            }
        }
    }

    /// Polls the pending flush (if any) and then the next frame (if `reading`), both only
    /// while the node holds its lease (checked at every poll: reading may write too, a pong or
    /// a close reply).
    pub(super) fn poll_io(
        &mut self,
        lease: &Lease,
        reading: bool,
        cx: &mut Context<'_>,
    ) -> Poll<Io> {
        if !lease.held() {
            return Poll::Pending;
        }
        if self.deadline.is_some()
            && let Poll::Ready(r) = Pin::new(&mut self.ws).poll_flush(cx)
        {
            return Poll::Ready(Io::Flushed(r));
        }
        if reading && let Poll::Ready(frame) = Pin::new(&mut self.ws).poll_next(cx) {
            return Poll::Ready(Io::Frame(frame));
        }
        Poll::Pending
    }

    /// The pending write completed: report its frames written.
    pub(super) fn flushed(&mut self) {
        self.deadline = None;
        for t in self.tickets.drain(..) {
            t.written();
        }
    }

    /// The pending write will not complete: report its frames failed.
    pub(super) fn fail_pending(&mut self, why: SendError) {
        self.deadline = None;
        for t in self.tickets.drain(..) {
            t.failed(why);
        }
    }

    /// Sends one frame and waits for it to reach the socket, within the write timeout.
    pub(super) async fn send_now(&mut self, msg: Message) -> bool {
        if self.append(msg).is_err() {
            return false;
        }
        let flushed = tokio::time::timeout(
            self.write_timeout,
            futures_util::future::poll_fn(|cx| Pin::new(&mut self.ws).poll_flush(cx)),
        )
        .await;
        match flushed {
            Ok(Ok(())) => {
                self.flushed();
                true
            }
            _ => false,
        }
    }

    /// Closes with `code` and `reason`: the close frame goes behind whatever is pending, then
    /// the task waits for the flush and the peer's close reply, all within `budget`.
    pub(super) async fn close(&mut self, code: u16, reason: &str, budget: Duration) {
        let deadline = Instant::now() + budget;
        let frame = CloseFrame {
            code: code.into(),
            reason: reason.into(),
        };
        if self.append(Message::Close(Some(frame))).is_err() {
            self.fail_pending(SendError::Closed(Some(code)));
            return;
        }
        let flushed = tokio::time::timeout_at(
            deadline,
            futures_util::future::poll_fn(|cx| Pin::new(&mut self.ws).poll_flush(cx)),
        )
        .await;
        match flushed {
            Ok(Ok(())) => self.flushed(),
            _ => {
                self.fail_pending(SendError::Closed(Some(code)));
                return;
            }
        }
        let _ = tokio::time::timeout_at(deadline, async {
            while let Some(Ok(msg)) = self.ws.next().await {
                if matches!(msg, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }

    /// Flushes the close reply tungstenite queued when the peer closed (bounded).
    pub(super) async fn answer_close(&mut self) {
        let _ = tokio::time::timeout(
            CLOSE_WAIT,
            futures_util::future::poll_fn(|cx| Pin::new(&mut self.ws).poll_flush(cx)),
        )
        .await;
    }

    /// Refuses the peer after a read error (oversize message, malformed frame): sends the close
    /// frame, ends our direction of the TCP stream, and reads and discards what the peer is
    /// still sending until it closes. Closing a socket with unread bytes makes the kernel send
    /// a reset, which would destroy the close frame on its way; draining avoids that.
    pub(super) async fn refuse(&mut self, code: u16, reason: &str) {
        let deadline = Instant::now() + CLOSE_WAIT;
        let frame = CloseFrame {
            code: code.into(),
            reason: reason.into(),
        };
        if self.append(Message::Close(Some(frame))).is_ok() {
            let _ = tokio::time::timeout_at(
                deadline,
                futures_util::future::poll_fn(|cx| Pin::new(&mut self.ws).poll_flush(cx)),
            )
            .await;
        }
        self.fail_pending(SendError::Closed(Some(code)));
        let raw = self.ws.get_mut();
        let _ = tokio::time::timeout_at(deadline, raw.shutdown()).await;
        let _ = tokio::time::timeout_at(deadline, async {
            // On the heap: a buffer held across an await would sit in every connection's
            // task for its whole life.
            let mut scratch = vec![0u8; 8192];
            while let Ok(n) = raw.read(&mut scratch).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }
}
