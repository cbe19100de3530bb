//! The bus decorator that times every call into the node's metrics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{Answer, Bus, BusCommand, BusError, BusReply};
use crate::metrics::Metrics;

/// Times every bus call.
pub struct MeteredBus {
    pub inner: Arc<dyn Bus>,
    pub metrics: Arc<Metrics>,
}

#[async_trait]
impl Bus for MeteredBus {
    async fn request(&self, node_id: &str, command: BusCommand, timeout: Duration) -> Answer {
        let started = Instant::now();
        let r = self.inner.request(node_id, command, timeout).await;
        let outcome = match &r {
            Ok(BusReply::Ok) => "ok",
            Ok(_) => "refused",
            Err(BusError::NoRoute(_)) => "no_route",
            Err(BusError::Timeout(_)) => "timeout",
            Err(BusError::Unavailable) => "unavailable",
            Err(BusError::Transport(_)) => "error",
        };
        self.metrics
            .bus_duration("request", outcome, started.elapsed());
        r
    }

    async fn publish_event(&self, event: &str) -> Result<(), BusError> {
        let started = Instant::now();
        let r = self.inner.publish_event(event).await;
        let outcome = if r.is_ok() { "ok" } else { "error" };
        self.metrics
            .bus_duration("publish", outcome, started.elapsed());
        r
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn alone(&self) -> bool {
        self.inner.alone()
    }
}
