//! PostgreSQL LISTEN/NOTIFY bus: the default with a PostgreSQL store, so a cluster needs no
//! service besides its database.
//!
//! Each node LISTENs on `morrigan_node_<id>`; a request is a NOTIFY on the owner's channel, the
//! answer a NOTIFY on the requester's. NOTIFY payloads are limited to 8000 bytes, so a larger
//! command is stashed in the store and only its id is notified (never silently truncated).
//! NOTIFY is at-most-once: a lost request or answer surfaces as a timeout (504), not as a
//! false success.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{broadcast, oneshot};
use tokio_util::sync::CancellationToken;

use super::{Bus, BusCommand, BusError, BusReply, Envelope, apply, envelope, unstash};
use crate::hub::Hub;
use crate::store::Store;

/// Payloads above this many bytes travel through the store.
pub const NOTIFY_LIMIT: usize = 7000;

/// The channel every node LISTENs on for cluster events.
pub const EVENTS_CHANNEL: &str = "morrigan_events";

fn channel(node_id: &str) -> String {
    format!("morrigan_node_{}", node_id.replace('-', ""))
}

fn transport(e: impl std::fmt::Display) -> BusError {
    BusError::Transport(e.to_string())
}

pub struct PgBus {
    pool: PgPool,
    store: Arc<dyn Store>,
    node_id: String,
    pending: DashMap<String, oneshot::Sender<BusReply>>,
    events: broadcast::Sender<Arc<str>>,
}

impl PgBus {
    /// Starts listening for this node's commands; stops when `stop` is cancelled.
    pub async fn start(
        pool: PgPool,
        store: Arc<dyn Store>,
        node_id: &str,
        hub: Arc<Hub>,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, BusError> {
        let mut listener = PgListener::connect_with(&pool).await.map_err(transport)?;
        listener
            .listen_all([channel(node_id).as_str(), EVENTS_CHANNEL])
            .await
            .map_err(transport)?;
        let bus = Arc::new(Self {
            pool,
            store,
            node_id: node_id.to_string(),
            pending: DashMap::new(),
            events: broadcast::channel(super::EVENT_BUFFER).0,
        });
        let me = bus.clone();
        tokio::spawn(async move {
            loop {
                let received = tokio::select! {
                    _ = stop.cancelled() => break,
                    n = listener.recv() => n,
                };
                match received {
                    Ok(n) if n.channel() == EVENTS_CHANNEL => {
                        let _ = me.events.send(Arc::from(n.payload()));
                    }
                    Ok(n) => me.on_payload(n.payload(), &hub),
                    Err(e) => {
                        // PgListener reconnects on the next recv; notifications sent meanwhile
                        // are lost and surface as timeouts at the requester.
                        tracing::warn!(error = %e, "bus listener failed; reconnecting");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
        Ok(bus)
    }

    fn on_payload(self: &Arc<Self>, payload: &str, hub: &Arc<Hub>) {
        let Ok(env) = serde_json::from_str::<Envelope>(payload) else {
            tracing::warn!("malformed bus payload ignored");
            return;
        };
        if let Some(reply) = env.reply {
            if let Some((_, tx)) = self.pending.remove(&env.id) {
                let _ = tx.send(reply);
            }
            return;
        }
        let me = self.clone();
        let hub = hub.clone();
        tokio::spawn(async move {
            let reply = match unstash(&me.store, &env).await {
                Some(cmd) => apply(&hub, cmd).await,
                None => BusReply::NotHere,
            };
            let answer = Envelope {
                id: env.id,
                from: me.node_id.clone(),
                command: None,
                stash: None,
                reply: Some(reply),
            };
            if let Ok(text) = serde_json::to_string(&answer)
                && let Err(e) = me.notify(&channel(&env.from), &text).await
            {
                tracing::warn!(error = %e, "could not answer a bus request");
            }
        });
    }

    async fn notify(&self, channel: &str, payload: &str) -> Result<(), BusError> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(channel)
            .bind(payload)
            .execute(&self.pool)
            .await
            .map_err(transport)?;
        Ok(())
    }
}

#[async_trait]
impl Bus for PgBus {
    async fn request(
        &self,
        node_id: &str,
        command: BusCommand,
        timeout: Duration,
    ) -> Result<BusReply, BusError> {
        let (id, text) = envelope(&self.store, &self.node_id, command, NOTIFY_LIMIT).await?;
        let (tx, rx) = oneshot::channel();
        self.pending.insert(id.clone(), tx);
        if let Err(e) = self.notify(&channel(node_id), &text).await {
            self.pending.remove(&id);
            return Err(e);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            _ => {
                self.pending.remove(&id);
                Err(BusError::Timeout(node_id.to_string()))
            }
        }
    }

    async fn publish_event(&self, event: &str) -> Result<(), BusError> {
        if event.len() > NOTIFY_LIMIT {
            return Err(BusError::Transport("event too large for NOTIFY".into()));
        }
        self.notify(EVENTS_CHANNEL, event).await
    }

    fn subscribe_events(&self) -> broadcast::Receiver<Arc<str>> {
        self.events.subscribe()
    }

    fn name(&self) -> &'static str {
        "postgres"
    }
}
