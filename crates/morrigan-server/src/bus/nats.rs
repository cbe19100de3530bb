//! NATS bus: requests go to the subject `morrigan.node.<id>`, replies to
//! `morrigan.reply.<requester>.<correlation id>` (protocol in [`super::rpc`]). NATS answers
//! "no responders" at once when the owner is gone, and carries far more messages per second
//! than NOTIFY. While the client is disconnected the bus reports it and requests fail at once;
//! commands the client buffered meanwhile reach their owner late and are dropped there.
//! Commands larger than the server's `max_payload` travel through the store.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::rpc::{Envelope, Rpc, Transport};
use super::{Answer, Bus, BusCommand, BusError, CommandHandler};
use crate::store::PayloadStore;

/// The subject every node subscribes to for cluster events.
pub const EVENTS_SUBJECT: &str = "morrigan.events";

/// Each publish is bounded (the client queues it; a full queue must not hold a request).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);

fn subject(node_id: &str) -> String {
    format!("morrigan.node.{node_id}")
}

fn reply_subject(node_id: &str, id: &str) -> String {
    format!("morrigan.reply.{node_id}.{id}")
}

fn transport(e: impl std::fmt::Display) -> BusError {
    BusError::Transport(e.to_string())
}

struct Client {
    client: async_nats::Client,
    node_id: String,
}

impl Client {
    async fn bounded<F, E>(&self, publish: F) -> Result<(), BusError>
    where
        F: std::future::Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        match tokio::time::timeout(PUBLISH_TIMEOUT, publish).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(transport(e)),
            Err(_) => Err(BusError::Transport("NATS publish timed out".into())),
        }
    }
}

#[async_trait]
impl Transport for Client {
    async fn send_request(&self, to: &str, id: &str, payload: String) -> Result<(), BusError> {
        self.bounded(self.client.publish_with_reply(
            subject(to),
            reply_subject(&self.node_id, id),
            payload.into_bytes().into(),
        ))
        .await
    }

    async fn send_reply(&self, to: &str, id: &str, payload: String) -> Result<(), BusError> {
        self.bounded(
            self.client
                .publish(reply_subject(to, id), payload.into_bytes().into()),
        )
        .await
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn limit(&self) -> usize {
        self.client.server_info().max_payload.saturating_sub(1024)
    }
}

pub struct NatsBus {
    client: Arc<Client>,
    rpc: Arc<Rpc>,
}

impl NatsBus {
    /// Connects to `url` and serves this node's subject, handing commands to `handler`, until
    /// `stop` is cancelled. `write_bound` is how long this node's connections may take to report
    /// a frame they took.
    pub async fn start(
        url: &str,
        store: Arc<dyn PayloadStore>,
        node_id: &str,
        handler: Arc<dyn CommandHandler>,
        write_bound: Duration,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, BusError> {
        let client = async_nats::ConnectOptions::new()
            .name(format!("morrigan-{node_id}"))
            .connect(url)
            .await
            .map_err(transport)?;
        let mut requests = client
            .subscribe(subject(node_id))
            .await
            .map_err(transport)?;
        let mut replies = client
            .subscribe(format!("morrigan.reply.{node_id}.>"))
            .await
            .map_err(transport)?;
        let mut event_sub = client.subscribe(EVENTS_SUBJECT).await.map_err(transport)?;
        let bus = Arc::new(Self {
            client: Arc::new(Client {
                client,
                node_id: node_id.to_string(),
            }),
            rpc: Arc::new(Rpc::new(node_id, store, write_bound)),
        });
        let events = handler.clone();
        let stop_events = stop.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = stop_events.cancelled() => break,
                    m = event_sub.next() => m,
                };
                let Some(msg) = msg else { break };
                if let Ok(text) = std::str::from_utf8(&msg.payload) {
                    events.event(text);
                }
            }
            let _ = event_sub.unsubscribe().await;
        });
        let rpc = bus.rpc.clone();
        let stop_replies = stop.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = stop_replies.cancelled() => break,
                    m = replies.next() => m,
                };
                let Some(msg) = msg else { break };
                if msg.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
                    if let Some(id) = msg.subject.as_str().rsplit('.').next() {
                        rpc.no_responders(id);
                    }
                    continue;
                }
                match serde_json::from_slice::<Envelope>(&msg.payload) {
                    Ok(Envelope {
                        id,
                        reply: Some(reply),
                        write_bound_ms,
                        ..
                    }) => rpc.on_reply(&id, reply, write_bound_ms),
                    _ => tracing::warn!("malformed bus reply ignored"),
                }
            }
            let _ = replies.unsubscribe().await;
        });
        let me = bus.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => break,
                    m = requests.next() => m,
                };
                let Some(msg) = msg else { break };
                let Ok(envelope) = serde_json::from_slice::<Envelope>(&msg.payload) else {
                    tracing::warn!("malformed bus request ignored");
                    continue;
                };
                let me = me.clone();
                let handler = handler.clone();
                tokio::spawn(async move {
                    me.rpc
                        .serve(me.client.as_ref(), handler.as_ref(), envelope)
                        .await;
                });
            }
            let _ = requests.unsubscribe().await;
        });
        Ok(bus)
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn request(&self, node_id: &str, command: BusCommand, timeout: Duration) -> Answer {
        self.rpc
            .request(self.client.as_ref(), node_id, command, timeout)
            .await
    }

    async fn publish_event(&self, event: &str) -> Result<(), BusError> {
        self.client
            .bounded(
                self.client
                    .client
                    .publish(EVENTS_SUBJECT, event.to_string().into_bytes().into()),
            )
            .await
    }

    fn name(&self) -> &'static str {
        "nats"
    }
}
