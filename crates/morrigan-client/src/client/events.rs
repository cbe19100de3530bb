//! What a client tells the application: [`Event`]s, through an [`Events`] subscription.

use std::time::Duration;

use serde_json::Value;
use tokio::sync::broadcast;

use crate::Error;
#[cfg(doc)]
use crate::Handle;

/// What happened to the client, in order.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// The server accepted the connection (`connection.state accepted`).
    Connected { connection_id: Option<String> },
    /// An accepted connection ended: the close code (1005 none given, 1006 no close frame).
    Disconnected { code: u16, reason: String },
    /// An application message (anything but the built-ins the client consumes:
    /// `connection.state` and `client.token.issue`), including `connection.error`. Delivered
    /// whether or not a handler ran for it; a tracked message re-delivered with an id the
    /// client remembers is not delivered again.
    Message(Value),
    /// The server issued a new identity token; it is in use (and saved, with a state directory).
    TokenRefreshed { expires: String },
    /// A connection attempt failed (the client retries unless the error is fatal).
    ConnectFailed(Error),
    /// The client waits `delay` before connection attempt `attempt` (1 = first retry).
    Reconnecting { attempt: u32, delay: Duration },
    /// The client stopped: `Ok` after [`Handle::stop`], `Err` with the fatal error otherwise.
    /// Always the last event.
    Stopped(Result<(), Error>),
}

/// A subscription to a client's [`Event`]s.
///
/// Backed by a broadcast channel: the client never waits for a slow subscriber; one that falls
/// more than the channel's capacity behind skips the oldest events (logged).
#[derive(Debug)]
pub struct Events {
    rx: broadcast::Receiver<Event>,
    /// No event will come after what is buffered: [`Event::Stopped`] was received, or this
    /// subscription began after it was sent.
    ended: bool,
}

impl Events {
    /// A subscription over `rx`; `ended` when the client had already stopped before it began.
    pub(super) fn new(rx: broadcast::Receiver<Event>, ended: bool) -> Self {
        Self { rx, ended }
    }

    /// The next event; `None` once the client has stopped and every event was received (after
    /// [`Event::Stopped`], whether or not a [`Handle`] is still alive).
    pub async fn recv(&mut self) -> Option<Event> {
        loop {
            let received = if self.ended {
                match self.rx.try_recv() {
                    Ok(event) => Ok(event),
                    Err(broadcast::error::TryRecvError::Lagged(n)) => Err(n),
                    Err(_) => return None,
                }
            } else {
                match self.rx.recv().await {
                    Ok(event) => Ok(event),
                    Err(broadcast::error::RecvError::Lagged(n)) => Err(n),
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            };
            match received {
                Ok(event) => {
                    self.ended |= matches!(event, Event::Stopped(_));
                    return Some(event);
                }
                Err(skipped) => tracing::warn!(skipped, "event subscriber fell behind"),
            }
        }
    }
}
