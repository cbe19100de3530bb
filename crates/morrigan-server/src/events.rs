//! Connection events for operators: the [`Observer`] hook turns connection callbacks into
//! metrics and [`ConnectionEvent`]s, which it publishes on the cluster bus so that the event
//! stream (`GET /api/core/connection/events`) of every node sees the events of every node.
//!
//! Publication is off the connection's task: events go on a bounded queue that one task per
//! node drains into the bus in order. When the bus cannot keep up the queue drops events
//! (counted in the log) rather than slowing connections down. An event nobody can read (a node
//! alone on its bus, with no subscriber) is not even built: connects, disconnects and tracked
//! messages then cost no serialization and no publishing task wake-up.

use std::sync::Arc;

use async_trait::async_trait;
use morrigan_protocol::close;
use morrigan_protocol::records::ConnectionRecord;
use tokio::sync::mpsc;

use crate::bus::Bus;
use crate::hooks::{Disconnect, Hooks};
use crate::metrics::Metrics;

pub use morrigan_protocol::events::{ConnectionEvent, kinds};

/// Events queued per node before publication drops them.
pub const PUBLISH_QUEUE: usize = 4096;

/// Events buffered per subscriber before it lags.
pub const EVENT_BUFFER: usize = 1024;

/// This node's event stream subscribers. Every bus backend hands each cluster event to the node
/// once ([`crate::bus::CommandHandler::event`]); the fan-out to the subscribers happens here,
/// never waiting: a subscriber that falls behind by [`EVENT_BUFFER`] events misses the oldest
/// and is told how many.
pub struct EventFanout(tokio::sync::broadcast::Sender<Arc<str>>);

impl Default for EventFanout {
    fn default() -> Self {
        Self(tokio::sync::broadcast::channel(EVENT_BUFFER).0)
    }
}

impl EventFanout {
    /// Hands `event` to every current subscriber (none is not an error).
    pub fn deliver(&self, event: &str) {
        if self.0.receiver_count() > 0 {
            let _ = self.0.send(Arc::from(event));
        }
    }

    /// Whether anyone subscribes now.
    pub fn has_subscribers(&self) -> bool {
        self.0.receiver_count() > 0
    }

    /// A new subscriber: the events delivered from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<str>> {
        self.0.subscribe()
    }
}

/// The built-in hook: metrics and events for every connection of the node.
pub struct Observer {
    node_id: String,
    metrics: Arc<Metrics>,
    queue: mpsc::Sender<String>,
    bus: Arc<dyn Bus>,
    events: Arc<EventFanout>,
}

impl Observer {
    /// Starts the publishing task (on the current runtime); it ends when the observer is dropped.
    /// `events`: this node's subscribers (see [`Observer::read`]).
    pub fn start(
        node_id: &str,
        metrics: Arc<Metrics>,
        bus: Arc<dyn Bus>,
        events: Arc<EventFanout>,
    ) -> Arc<Self> {
        let (queue, mut rx) = mpsc::channel::<String>(PUBLISH_QUEUE);
        let publisher = bus.clone();
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                if let Err(e) = publisher.publish_event(&event).await {
                    tracing::debug!(error = %e, "could not publish a connection event");
                }
            }
        });
        Arc::new(Self {
            node_id: node_id.to_string(),
            metrics,
            queue,
            bus,
            events,
        })
    }

    /// Whether an event published now can be read: another node may be on the bus, or this
    /// node has a subscriber. One subscribing a moment later misses it, as it would have
    /// missed any event before it subscribed.
    pub(crate) fn read(&self) -> bool {
        !self.bus.alone() || self.events.has_subscribers()
    }

    /// Queues `event` for the bus (dropped, with a debug line, when the queue is full). Callers
    /// ask [`Observer::read`] first, before building the event.
    pub(crate) fn publish(&self, event: &ConnectionEvent) {
        let Ok(text) = serde_json::to_string(event) else {
            return;
        };
        if self.queue.try_send(text).is_err() {
            tracing::debug!(kind = %event.kind, "event queue full; event dropped");
        }
    }
}

#[async_trait]
impl Hooks for Observer {
    async fn connect(&self, record: &ConnectionRecord) {
        self.metrics.connected();
        if !self.read() {
            return;
        }
        let mut e = ConnectionEvent::new(
            kinds::CONNECTED,
            &record.id,
            &record.client_id,
            &self.node_id,
        );
        e.address = record.client_address.clone();
        if let Some(at) = &record.connected {
            e.at = at.clone();
        }
        self.publish(&e);
    }

    async fn disconnect(&self, d: &Disconnect) {
        self.metrics.disconnected(d.code);
        if !self.read() {
            return;
        }
        let mut e = ConnectionEvent::new(
            kinds::DISCONNECTED,
            &d.connection_id,
            &d.client_id,
            &self.node_id,
        );
        e.code = Some(d.code);
        e.reason = Some(d.reason.clone());
        e.reason_name = Some(close::reason_name(d.code).to_string());
        if d.code == close::SUPERSEDED {
            let mut s = e.clone();
            s.kind = kinds::SUPERSEDED.to_string();
            self.publish(&s);
        }
        self.publish(&e);
    }

    async fn heartbeat_missed(&self, connection_id: &str, client_id: &str) {
        self.metrics.heartbeat_missed();
        if !self.read() {
            return;
        }
        self.publish(&ConnectionEvent::new(
            kinds::HEARTBEAT_MISSED,
            connection_id,
            client_id,
            &self.node_id,
        ));
    }

    async fn client_state(&self, connection_id: &str, client_id: &str, state: &str) {
        if !self.read() {
            return;
        }
        let mut e =
            ConnectionEvent::new(kinds::CLIENT_STATE, connection_id, client_id, &self.node_id);
        e.state = Some(state.to_string());
        self.publish(&e);
    }
}
