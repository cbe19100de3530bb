//! What the bus brings this node, carried out here.

use std::sync::Arc;
use std::time::Duration;

use crate::bus::{BusCommand, BusReply, CommandHandler};
use crate::events::EventFanout;
use crate::hub::{Closed, Hub};
use crate::ticket::SendError;

/// What the bus hands this node's commands and the cluster's events to: commands are carried
/// out against the hub, events go to this node's event subscribers (the bus sees neither).
pub(crate) struct BusHandler {
    pub hub: Arc<Hub>,
    /// A fenced node carries out nothing (see [`crate::lease`]).
    pub lease: Arc<crate::lease::Lease>,
    /// How long a connection may take, after taking a frame, to report its outcome.
    pub write_bound: Duration,
    /// This node's event stream subscribers.
    pub events: Arc<EventFanout>,
    /// This node's message waiters and outbox gate.
    pub signals: Arc<crate::messaging::Signals>,
}

#[async_trait::async_trait]
impl CommandHandler for BusHandler {
    async fn handle(&self, command: BusCommand, take_by: tokio::time::Instant) -> BusReply {
        if !self.lease.held() {
            return BusReply::Unavailable;
        }
        match command {
            BusCommand::Send {
                connection_id,
                text,
            } => match self
                .hub
                .send(&connection_id, text, take_by, self.write_bound)
                .await
            {
                Ok(()) => BusReply::Ok,
                Err(SendError::NotHere) => BusReply::NotHere,
                Err(SendError::Closed(_)) => BusReply::Closed,
                Err(SendError::NotTaken) => BusReply::Timeout,
                Err(SendError::WriteTimeout) => BusReply::WriteTimeout,
            },
            BusCommand::Close {
                connection_id,
                code,
                reason,
            } => match self.hub.close(&connection_id, code, &reason).await {
                Closed::NotHere => BusReply::NotHere,
                Closed::Done | Closed::Forced => BusReply::Ok,
            },
        }
    }

    fn event(&self, event: &str) {
        self.events.deliver(event);
        self.signals.event(event);
    }
}
