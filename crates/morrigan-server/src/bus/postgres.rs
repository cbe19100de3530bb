//! PostgreSQL LISTEN/NOTIFY bus: the default with a PostgreSQL store, so a cluster needs no
//! service besides its database.
//!
//! Each node LISTENs on `morrigan_node_<id>`; requests and replies are NOTIFYs on the other
//! node's channel (protocol in [`super::rpc`]). NOTIFY payloads are limited to 8000 bytes, so a
//! larger command is stashed in the store and only its id is notified (never truncated).
//!
//! The node knows whether its listener is live: it notifies itself a pulse every
//! [`PULSE_PERIOD`]; while no pulse has come back for [`PULSE_LOST`], the bus reports itself
//! disconnected and requests fail at once instead of waiting for answers that cannot arrive.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use super::rpc::{Envelope, Rpc, Transport, now_ms};
use super::{Answer, Bus, BusCommand, BusError, CommandHandler};
use crate::store::PayloadStore;

/// Payloads above this many bytes travel through the store.
pub const NOTIFY_LIMIT: usize = 7000;

/// The channel every node LISTENs on for cluster events.
pub const EVENTS_CHANNEL: &str = "morrigan_events";

/// How often a node checks its own listener.
const PULSE_PERIOD: Duration = Duration::from_millis(500);
/// A listener that has not heard its own pulse for this long is down.
const PULSE_LOST: Duration = Duration::from_millis(2500);
/// The payload of a pulse (not JSON, so never mistaken for an envelope).
const PULSE: &str = "pulse";
/// Each NOTIFY is bounded: a database that does not answer must not hold a request or reply.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(2);

fn channel(node_id: &str) -> String {
    format!("morrigan_node_{}", node_id.replace('-', ""))
}

fn transport(e: impl std::fmt::Display) -> BusError {
    BusError::Transport(e.to_string())
}

/// The NOTIFY side of the bus.
struct Notifier {
    pool: PgPool,
    /// Unix ms of the last pulse heard back.
    last_pulse: AtomicI64,
}

impl Notifier {
    async fn notify(&self, channel: &str, payload: &str) -> Result<(), BusError> {
        let query = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(channel)
            .bind(payload)
            .execute(&self.pool);
        match tokio::time::timeout(NOTIFY_TIMEOUT, query).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(transport(e)),
            Err(_) => Err(BusError::Transport("NOTIFY timed out".into())),
        }
    }
}

#[async_trait]
impl Transport for Notifier {
    async fn send_request(&self, to: &str, _id: &str, payload: String) -> Result<(), BusError> {
        self.notify(&channel(to), &payload).await
    }

    async fn send_reply(&self, to: &str, _id: &str, payload: String) -> Result<(), BusError> {
        self.notify(&channel(to), &payload).await
    }

    fn connected(&self) -> bool {
        now_ms() - self.last_pulse.load(Ordering::Acquire) < PULSE_LOST.as_millis() as i64
    }

    fn limit(&self) -> usize {
        NOTIFY_LIMIT
    }
}

pub struct PgBus {
    notifier: Arc<Notifier>,
    rpc: Arc<Rpc>,
    node_id: String,
}

impl PgBus {
    /// Starts listening for this node's commands, which go to `handler`; stops when `stop` is
    /// cancelled. `write_bound` is how long this node's connections may take to report a frame
    /// they took (their write timeout and slack).
    pub async fn start(
        pool: PgPool,
        store: Arc<dyn PayloadStore>,
        node_id: &str,
        handler: Arc<dyn CommandHandler>,
        write_bound: Duration,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, BusError> {
        let mut listener = PgListener::connect_with(&pool).await.map_err(transport)?;
        let own = channel(node_id);
        listener
            .listen_all([own.as_str(), EVENTS_CHANNEL])
            .await
            .map_err(transport)?;
        let notifier = Arc::new(Notifier {
            pool,
            last_pulse: AtomicI64::new(now_ms()),
        });
        let bus = Arc::new(Self {
            notifier: notifier.clone(),
            rpc: Arc::new(Rpc::new(node_id, store, write_bound)),
            node_id: node_id.to_string(),
        });
        let pulse = notifier.clone();
        let stop_pulse = stop.clone();
        let own_pulse = own.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PULSE_PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop_pulse.cancelled() => break,
                    _ = tick.tick() => {
                        let _ = pulse.notify(&own_pulse, PULSE).await;
                    }
                }
            }
        });
        let me = bus.clone();
        tokio::spawn(async move {
            loop {
                let received = tokio::select! {
                    _ = stop.cancelled() => break,
                    n = listener.try_recv() => n,
                };
                match received {
                    Ok(Some(n)) if n.channel() == EVENTS_CHANNEL => {
                        handler.event(n.payload());
                    }
                    Ok(Some(n)) if n.payload() == PULSE => {
                        me.notifier.last_pulse.store(now_ms(), Ordering::Release);
                    }
                    Ok(Some(n)) => me.on_payload(n.payload(), &handler),
                    // The connection was lost: the next try_recv reconnects. Notifications sent
                    // meanwhile are lost; the pulse stops, so requests fail fast until it is back.
                    Ok(None) => tracing::warn!("bus listener lost its connection; reconnecting"),
                    Err(e) => {
                        tracing::warn!(error = %e, "bus listener failed; reconnecting");
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        }
                    }
                }
            }
        });
        Ok(bus)
    }

    fn on_payload(self: &Arc<Self>, payload: &str, handler: &Arc<dyn CommandHandler>) {
        let Ok(envelope) = serde_json::from_str::<Envelope>(payload) else {
            tracing::warn!("malformed bus payload ignored");
            return;
        };
        if let Some(reply) = envelope.reply {
            self.rpc
                .on_reply(&envelope.id, reply, envelope.write_bound_ms);
            return;
        }
        let rpc = self.rpc.clone();
        let notifier = self.notifier.clone();
        let handler = handler.clone();
        tokio::spawn(async move {
            rpc.serve(notifier.as_ref(), handler.as_ref(), envelope)
                .await;
        });
    }
}

#[async_trait]
impl Bus for PgBus {
    async fn request(&self, node_id: &str, command: BusCommand, timeout: Duration) -> Answer {
        self.rpc
            .request(self.notifier.as_ref(), node_id, command, timeout)
            .await
    }

    async fn publish_event(&self, event: &str) -> Result<(), BusError> {
        if event.len() > NOTIFY_LIMIT {
            return Err(BusError::Transport("event too large for NOTIFY".into()));
        }
        self.notifier.notify(EVENTS_CHANNEL, event).await
    }

    fn name(&self) -> &'static str {
        "postgres"
    }
}

impl std::fmt::Debug for PgBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBus")
            .field("node", &self.node_id)
            .finish()
    }
}
