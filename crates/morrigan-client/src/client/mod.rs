//! The long-running device client: connect, stay connected, keep the identity token fresh,
//! dispatch messages, stop gracefully.
//!
//! One supervisor task (`runner`) owns the connection. The application talks to it through
//! cheap handles: [`Sender`] (queue messages), [`Handle`] (stop, subscribe) and [`Events`] (what
//! happened). Message handlers (`handlers`) run as tasks of their own, so a slow handler never
//! delays pongs or other messages; all of them are cancelled when the client stops. What a
//! handler returns answers a tracked message (`tracked`).

mod builder;
mod events;
mod handle;
mod handlers;
mod runner;
mod tracked;

use std::sync::Arc;
use std::time::Duration;

use morrigan_protocol::message::Capability;
use tokio::sync::mpsc;

pub use builder::ClientBuilder;
pub use events::{Event, Events};
pub use handle::{Handle, Sender};
pub use tracked::{Answer, DEFAULT_MESSAGE_ID_MEMORY, HandlerResult, message_id};

use crate::backoff::BackoffConfig;
use crate::connect::Endpoint;
use crate::token::{TokenStore, token_label};
use handle::Shared;
use handlers::Handlers;
use runner::Runner;

/// Default interval between `client.token.refresh` requests (the original's 8 h).
pub const DEFAULT_TOKEN_REFRESH: Duration = Duration::from_secs(8 * 3600);
/// Default bound on a graceful stop (waiting for the server's close).
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Default capacity of the event channel; a subscriber that falls further behind skips events.
pub const DEFAULT_EVENT_CAPACITY: usize = 1024;
/// Messages [`Sender::send`] may queue ahead of the socket before it waits.
const OUTGOING_CAPACITY: usize = 256;

/// A configured device client; [`start`](Self::start) it to connect.
///
/// Its fields are private to this module: [`ClientBuilder::build`] fills them and
/// [`start`](Self::start) hands them to the runner.
pub struct Client {
    /// Never empty.
    endpoints: Vec<Endpoint>,
    store: Option<TokenStore>,
    /// The identity token to start with.
    token: String,
    backoff: BackoffConfig,
    token_refresh: Option<Duration>,
    stop_timeout: Duration,
    write_timeout: Duration,
    capabilities: Vec<Capability>,
    handlers: Arc<Handlers>,
    event_capacity: usize,
    message_id_memory: usize,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoints", &self.endpoints)
            .field("token", &token_label(&self.token))
            .finish_non_exhaustive()
    }
}

impl Client {
    /// The provider URLs the client tries, in order (bare server URLs completed with
    /// `/api/core/connection`).
    pub fn provider_urls(&self) -> Vec<String> {
        self.endpoints
            .iter()
            .map(|e| e.provider_url().to_string())
            .collect()
    }

    /// Spawns the client on the current tokio runtime and returns its handle and a first event
    /// subscription (created before anything happens, so no event is missed).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn start(mut self) -> (Handle, Events) {
        let token = std::mem::take(&mut self.token);
        let (shared, events) = Shared::new(token, self.event_capacity);
        let (out_tx, out_rx) = mpsc::channel(OUTGOING_CAPACITY);
        let (stop_tx, stop_rx) = mpsc::channel(1);
        let sender = Sender::new(out_tx, shared.clone());
        let runner = Runner::new(self, shared.clone(), sender.clone(), stop_rx, out_rx);
        let task = tokio::spawn(runner.run());
        (Handle::new(sender, shared, stop_tx, task), events)
    }
}
