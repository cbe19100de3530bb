//! The in-process bus: nodes in the same process (a single node, or a test cluster) find each
//! other's hubs in a shared registry. With one node every remote request is `NoRoute`.

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use tokio::sync::broadcast;

use super::{Bus, BusCommand, BusError, BusReply, apply};
use crate::hub::Hub;

/// A registry of in-process nodes' hubs. Share one `Arc<LocalBus>` between nodes of a cluster.
pub struct LocalBus {
    hubs: DashMap<String, Weak<Hub>>,
    /// Events of every in-process node.
    events: broadcast::Sender<Arc<str>>,
}

impl Default for LocalBus {
    fn default() -> Self {
        Self {
            hubs: DashMap::new(),
            events: broadcast::channel(super::EVENT_BUFFER).0,
        }
    }
}

impl LocalBus {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Makes `hub` reachable as node `node_id`.
    pub fn register(&self, node_id: &str, hub: &Arc<Hub>) {
        self.hubs.insert(node_id.to_string(), Arc::downgrade(hub));
    }

    pub fn unregister(&self, node_id: &str) {
        self.hubs.remove(node_id);
    }
}

#[async_trait]
impl Bus for LocalBus {
    async fn request(
        &self,
        node_id: &str,
        command: BusCommand,
        timeout: Duration,
    ) -> Result<BusReply, BusError> {
        let hub = self
            .hubs
            .get(node_id)
            .and_then(|w| w.upgrade())
            .ok_or_else(|| BusError::NoRoute(node_id.to_string()))?;
        tokio::time::timeout(timeout, apply(&hub, command))
            .await
            .map_err(|_| BusError::Timeout(node_id.to_string()))
    }

    async fn publish_event(&self, event: &str) -> Result<(), BusError> {
        // No subscriber is not an error.
        let _ = self.events.send(Arc::from(event));
        Ok(())
    }

    fn subscribe_events(&self) -> broadcast::Receiver<Arc<str>> {
        self.events.subscribe()
    }

    fn name(&self) -> &'static str {
        "local"
    }

    /// A single node: nothing else can reach (or hold) this store's sockets.
    fn alone(&self) -> bool {
        self.hubs.len() <= 1
    }
}
