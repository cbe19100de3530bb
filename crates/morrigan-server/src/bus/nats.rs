//! NATS bus: request/reply on the subject `morrigan.node.<id>`. NATS answers "no responders"
//! at once when the node is gone, and carries far more messages per second than NOTIFY.
//! Commands larger than the server's `max_payload` travel through the store.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::{Bus, BusCommand, BusError, BusReply, Envelope, apply, envelope, unstash};
use crate::hub::Hub;
use crate::store::Store;

/// The subject every node subscribes to for cluster events.
pub const EVENTS_SUBJECT: &str = "morrigan.events";

fn subject(node_id: &str) -> String {
    format!("morrigan.node.{node_id}")
}

fn transport(e: impl std::fmt::Display) -> BusError {
    BusError::Transport(e.to_string())
}

pub struct NatsBus {
    client: async_nats::Client,
    store: Arc<dyn Store>,
    node_id: String,
    events: broadcast::Sender<Arc<str>>,
}

impl NatsBus {
    /// Connects to `url` and starts answering this node's subject until `stop` is cancelled.
    pub async fn start(
        url: &str,
        store: Arc<dyn Store>,
        node_id: &str,
        hub: Arc<Hub>,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, BusError> {
        let client = async_nats::ConnectOptions::new()
            .name(format!("morrigan-{node_id}"))
            .connect(url)
            .await
            .map_err(transport)?;
        let mut sub = client
            .subscribe(subject(node_id))
            .await
            .map_err(transport)?;
        let mut event_sub = client.subscribe(EVENTS_SUBJECT).await.map_err(transport)?;
        let bus = Arc::new(Self {
            client,
            store,
            node_id: node_id.to_string(),
            events: broadcast::channel(super::EVENT_BUFFER).0,
        });
        let events = bus.events.clone();
        let stop_events = stop.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = stop_events.cancelled() => break,
                    m = event_sub.next() => m,
                };
                let Some(msg) = msg else { break };
                if let Ok(text) = std::str::from_utf8(&msg.payload) {
                    let _ = events.send(Arc::from(text));
                }
            }
            let _ = event_sub.unsubscribe().await;
        });
        let me = bus.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => break,
                    m = sub.next() => m,
                };
                let Some(msg) = msg else { break };
                let Some(reply_to) = msg.reply.clone() else {
                    continue;
                };
                let me = me.clone();
                let hub = hub.clone();
                tokio::spawn(async move {
                    let reply = match serde_json::from_slice::<Envelope>(&msg.payload) {
                        Ok(env) => match unstash(&me.store, &env).await {
                            Some(cmd) => apply(&hub, cmd).await,
                            None => BusReply::NotHere,
                        },
                        Err(_) => BusReply::NotHere,
                    };
                    if let Ok(body) = serde_json::to_vec(&reply)
                        && let Err(e) = me.client.publish(reply_to, body.into()).await
                    {
                        tracing::warn!(error = %e, "could not answer a bus request");
                    }
                });
            }
            let _ = sub.unsubscribe().await;
        });
        Ok(bus)
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn request(
        &self,
        node_id: &str,
        command: BusCommand,
        timeout: Duration,
    ) -> Result<BusReply, BusError> {
        let limit = self.client.server_info().max_payload.saturating_sub(1024);
        let (_, text) = envelope(&self.store, &self.node_id, command, limit).await?;
        let request = async_nats::Request::new()
            .payload(text.into_bytes().into())
            .timeout(Some(timeout));
        match self.client.send_request(subject(node_id), request).await {
            Ok(msg) => serde_json::from_slice(&msg.payload).map_err(transport),
            Err(e) => match e.kind() {
                async_nats::RequestErrorKind::NoResponders => {
                    Err(BusError::NoRoute(node_id.to_string()))
                }
                async_nats::RequestErrorKind::TimedOut => {
                    Err(BusError::Timeout(node_id.to_string()))
                }
                _ => Err(transport(e)),
            },
        }
    }

    async fn publish_event(&self, event: &str) -> Result<(), BusError> {
        self.client
            .publish(EVENTS_SUBJECT, event.to_string().into_bytes().into())
            .await
            .map_err(transport)
    }

    fn subscribe_events(&self) -> broadcast::Receiver<Arc<str>> {
        self.events.subscribe()
    }

    fn name(&self) -> &'static str {
        "nats"
    }
}
