//! The in-process bus: nodes in the same process (a single node, or a test cluster) find each
//! other's command handlers in a shared registry. With one node every remote request is
//! `NoRoute`.

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;

use super::{Answer, Bus, BusCommand, BusError, CommandHandler};

/// A registry of in-process nodes. Share one `Arc<LocalBus>` between nodes of a cluster.
pub struct LocalBus {
    nodes: DashMap<String, Weak<dyn CommandHandler>>,
    /// How long after its take deadline a node may still report a frame's outcome.
    write_bound: std::sync::Mutex<Duration>,
}

impl Default for LocalBus {
    fn default() -> Self {
        Self {
            nodes: DashMap::new(),
            write_bound: std::sync::Mutex::new(Duration::from_secs(11)),
        }
    }
}

impl LocalBus {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Makes `handler` reachable as node `node_id`. The bus holds it weakly: a node that is
    /// gone is unreachable.
    pub fn register(
        &self,
        node_id: &str,
        handler: &Arc<dyn CommandHandler>,
        write_bound: Duration,
    ) {
        self.nodes
            .insert(node_id.to_string(), Arc::downgrade(handler));
        if let Ok(mut b) = self.write_bound.lock() {
            *b = (*b).max(write_bound);
        }
    }
}

#[async_trait]
impl Bus for LocalBus {
    async fn request(&self, node_id: &str, command: BusCommand, timeout: Duration) -> Answer {
        let handler = self
            .nodes
            .get(node_id)
            .and_then(|w| w.upgrade())
            .ok_or_else(|| BusError::NoRoute(node_id.to_string()))?;
        let take_by = tokio::time::Instant::now() + timeout;
        let bound = self
            .write_bound
            .lock()
            .map(|b| *b)
            .unwrap_or(Duration::from_secs(11));
        tokio::time::timeout(timeout + bound, handler.handle(command, take_by))
            .await
            .map_err(|_| BusError::Timeout(node_id.to_string()))
    }

    async fn publish_event(&self, event: &str) -> Result<(), BusError> {
        // `event` does not wait or touch the registry, so it runs under the shard's read lock:
        // no allocation per event on the connect and close paths.
        for node in self.nodes.iter() {
            if let Some(handler) = node.upgrade() {
                handler.event(event);
            }
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        "local"
    }

    /// A single node: nothing else can reach (or hold) this store's sockets.
    fn alone(&self) -> bool {
        self.nodes.len() <= 1
    }
}
