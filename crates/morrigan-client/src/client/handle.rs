//! The application's side of a running client: [`Handle`] (stop, wait, subscribe) and
//! [`Sender`] (queue messages), over the state they share with the runner.

use std::sync::{Arc, Mutex, PoisonError};

use morrigan_protocol::MessageType;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

use super::{Event, Events};
use crate::Error;
use crate::connect;

/// Providers of the protocol's own messages: [`Sender::publish`] refuses their types.
const RESERVED_PROVIDERS: [&str; 3] = ["connection", "client", "capability"];

/// Whether a connection is accepted, and its id.
#[derive(Debug, Clone, Default)]
pub(super) struct Link {
    pub(super) connected: bool,
    pub(super) connection_id: Option<String>,
}

/// State shared by the supervisor and the handles.
pub(super) struct Shared {
    identity_token: Mutex<String>,
    pub(super) link: watch::Sender<Link>,
    events: broadcast::Sender<Event>,
    /// How the client ended, once it has.
    pub(super) outcome: watch::Sender<Option<Result<(), Error>>>,
}

impl Shared {
    /// The state of a client about to start with `token`, and the first event subscription
    /// (taken before anything happens, so that it misses no event).
    pub(super) fn new(token: String, event_capacity: usize) -> (Arc<Self>, Events) {
        let (events, events_rx) = broadcast::channel(event_capacity);
        let (link, _) = watch::channel(Link::default());
        let (outcome, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            identity_token: Mutex::new(token),
            link,
            events,
            outcome,
        });
        (shared, Events::new(events_rx, false))
    }

    pub(super) fn token(&self) -> String {
        self.identity_token
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(super) fn set_token(&self, token: String) {
        *self
            .identity_token
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = token;
    }

    pub(super) fn emit(&self, event: Event) {
        // No subscriber is not an error.
        let _ = self.events.send(event);
    }
}

/// A cheap, cloneable handle for sending messages; handlers receive one with every message.
#[derive(Clone)]
pub struct Sender {
    out: mpsc::Sender<String>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl Sender {
    pub(super) fn new(out: mpsc::Sender<String>, shared: Arc<Shared>) -> Self {
        Self { out, shared }
    }

    /// Sends `body` (any `Serialize` that gives a JSON object, or `()` for none) as a message of
    /// type `ty`. The type is validated first; nothing is sent when it is invalid.
    ///
    /// A body that has its own `type` field must agree with `ty`.
    pub async fn send<T: Serialize + ?Sized>(&self, ty: &str, body: &T) -> Result<(), Error> {
        MessageType::parse(ty).map_err(|source| Error::InvalidType {
            ty: ty.to_string(),
            source,
        })?;
        let mut message = match serde_json::to_value(body) {
            Ok(Value::Object(map)) => map,
            Ok(Value::Null) => serde_json::Map::new(),
            Ok(_) => {
                return Err(Error::InvalidMessage(
                    "a message body must serialize to a JSON object".into(),
                ));
            }
            Err(e) => return Err(Error::InvalidMessage(e.to_string())),
        };
        match message.get("type") {
            Some(Value::String(own)) if own != ty => {
                return Err(Error::InvalidMessage(format!(
                    "body type {own:?} differs from {ty:?}"
                )));
            }
            _ => {}
        }
        message.insert("type".into(), Value::String(ty.to_string()));
        self.send_value(Value::Object(message)).await
    }

    /// Sends a raw message: a JSON object with a valid string `type` (checked; nothing is sent
    /// otherwise).
    ///
    /// `Ok` means the message was queued for the live connection. It fails fast with
    /// [`Error::NotConnected`] between connections (messages are not held for the next one:
    /// stale commands are worse than lost ones) and with [`Error::Stopped`] after the client
    /// stopped. A message queued just before the connection drops is lost with it.
    pub async fn send_value(&self, message: Value) -> Result<(), Error> {
        let text = connect::encode(&message)?;
        self.send_text(text).await
    }

    /// Publishes an uplink message, `{"type": ty, "payload": payload}`: a message for the
    /// operators rather than for a server provider. The server records it (a message record
    /// with `direction: in` and state `received`, listed by
    /// `GET /api/core/client/:clientId/messages?direction=in`) and publishes a `message` event.
    ///
    /// `ty` must be a valid type (`<provider>.<message>`, [`Error::InvalidType`] otherwise) and
    /// not one of the protocol's own (`connection.*`, `client.*`, `capability.*`:
    /// [`Error::ReservedType`]); nothing is sent when it is not. A type whose provider the
    /// server itself implements goes to that provider instead. `payload` is any `Serialize`
    /// ([`Error::InvalidMessage`] if it fails to serialize). Sent like [`send`](Self::send): at
    /// most once, only while connected, not acknowledged.
    pub async fn publish<T: Serialize>(&self, ty: &str, payload: T) -> Result<(), Error> {
        let parsed = MessageType::parse(ty).map_err(|source| Error::InvalidType {
            ty: ty.to_string(),
            source,
        })?;
        if RESERVED_PROVIDERS.contains(&parsed.provider()) {
            return Err(Error::ReservedType { ty: ty.to_string() });
        }
        let payload =
            serde_json::to_value(payload).map_err(|e| Error::InvalidMessage(e.to_string()))?;
        self.send_value(serde_json::json!({"type": ty, "payload": payload}))
            .await
    }

    /// Queues an encoded message for the live connection (see [`send_value`](Self::send_value)
    /// for when it fails).
    pub(super) async fn send_text(&self, text: String) -> Result<(), Error> {
        if !self.is_connected() {
            return Err(if self.out.is_closed() {
                Error::Stopped
            } else {
                Error::NotConnected
            });
        }
        self.out.send(text).await.map_err(|_| Error::Stopped)
    }

    /// True while a connection is accepted.
    pub fn is_connected(&self) -> bool {
        self.shared.link.borrow().connected
    }

    /// The current connection's id, when connected and the server sent one.
    pub fn connection_id(&self) -> Option<String> {
        self.shared.link.borrow().connection_id.clone()
    }
}

/// Controls a started client. Dropping it stops the client (gracefully, in the background).
pub struct Handle {
    sender: Sender,
    shared: Arc<Shared>,
    stop_tx: mpsc::Sender<String>,
    task: JoinHandle<Result<(), Error>>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("connected", &self.sender.is_connected())
            .finish_non_exhaustive()
    }
}

impl Handle {
    pub(super) fn new(
        sender: Sender,
        shared: Arc<Shared>,
        stop_tx: mpsc::Sender<String>,
        task: JoinHandle<Result<(), Error>>,
    ) -> Self {
        Self {
            sender,
            shared,
            stop_tx,
            task,
        }
    }

    /// A sender for use elsewhere (it does not keep the client running).
    pub fn sender(&self) -> Sender {
        self.sender.clone()
    }

    /// See [`Sender::send`].
    pub async fn send<T: Serialize + ?Sized>(&self, ty: &str, body: &T) -> Result<(), Error> {
        self.sender.send(ty, body).await
    }

    /// See [`Sender::send_value`].
    pub async fn send_value(&self, message: Value) -> Result<(), Error> {
        self.sender.send_value(message).await
    }

    /// See [`Sender::publish`].
    pub async fn publish<T: Serialize>(&self, ty: &str, payload: T) -> Result<(), Error> {
        self.sender.publish(ty, payload).await
    }

    /// Another subscription to the events, starting now (after the client stopped: one that
    /// ends at once).
    pub fn subscribe(&self) -> Events {
        let rx = self.shared.events.subscribe();
        // `Stopped` is sent before the outcome is set: with an outcome, what this subscription
        // will ever get is already in it.
        let ended = self.shared.outcome.borrow().is_some();
        Events::new(rx, ended)
    }

    /// True while a connection is accepted.
    pub fn is_connected(&self) -> bool {
        self.sender.is_connected()
    }

    /// The identity token the next connection attempt will use (the newest received). A secret:
    /// do not log it.
    pub fn identity_token(&self) -> String {
        self.shared.token()
    }

    /// Stops the client: reports `client.state` `stopped.<reason>`, closes with 1000, waits (up
    /// to the stop timeout) for the server's close, and ends every task of the client.
    ///
    /// Returns how the client ended: `Ok` for this stop, or the fatal error that had already
    /// stopped it.
    pub async fn stop(self, reason: &str) -> Result<(), Error> {
        // Fails only when the client already ended; its outcome is then in the task.
        let _ = self.stop_tx.send(reason.to_string()).await;
        join(self.task).await
    }

    /// Waits until the client has stopped (on its own, after a fatal error, or by
    /// [`stop`](Self::stop)) and returns how. Borrows the handle, so that an application can
    /// wait for either this or a signal and then still call `stop`.
    pub async fn wait(&self) -> Result<(), Error> {
        let mut outcome = self.shared.outcome.subscribe();
        match outcome.wait_for(Option::is_some).await {
            Ok(result) => result.clone().unwrap_or(Ok(())),
            // Unreachable: the handle itself keeps the sender alive.
            Err(_) => Err(Error::Stopped),
        }
    }
}

async fn join(task: JoinHandle<Result<(), Error>>) -> Result<(), Error> {
    task.await
        .unwrap_or_else(|e| Err(Error::Internal(e.to_string())))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::token::tests::fake_jwt;
    use crate::{BackoffConfig, Client};

    #[tokio::test]
    async fn send_validates_before_anything_else() {
        let token = fake_jwt(&json!({"sub": "d"}));
        let client = Client::builder("http://127.0.0.1:1/api/core/connection", &token)
            .backoff(BackoffConfig {
                base: Duration::from_secs(3600),
                ..BackoffConfig::default()
            })
            .build()
            .unwrap();
        let (handle, _events) = client.start();
        assert!(matches!(
            handle.send("nodot", &json!({})).await,
            Err(Error::InvalidType { .. })
        ));
        assert!(matches!(
            handle.send("a.b", &[1, 2]).await,
            Err(Error::InvalidMessage(_))
        ));
        assert!(matches!(
            handle.send("a.b", &json!({"type": "c.d"})).await,
            Err(Error::InvalidMessage(_))
        ));
        assert!(matches!(
            handle.send_value(json!({"type": "bad type"})).await,
            Err(Error::InvalidType { .. })
        ));
        // Valid, but there is no connection (port 1 refuses).
        assert!(matches!(
            handle.send("a.b", &()).await,
            Err(Error::NotConnected)
        ));
        // publish: the same checks, and the protocol's own types are refused.
        assert!(matches!(
            handle.publish("nodot", json!(1)).await,
            Err(Error::InvalidType { .. })
        ));
        for reserved in ["connection.ack", "client.state", "capability.report"] {
            assert!(
                matches!(
                    handle.publish(reserved, json!({})).await,
                    Err(Error::ReservedType { ref ty }) if ty == reserved
                ),
                "{reserved}"
            );
        }
        assert!(matches!(
            handle.publish("agent.status", json!({"load": 1})).await,
            Err(Error::NotConnected)
        ));
        let sender = handle.sender();
        handle.stop("test").await.unwrap();
        assert!(matches!(sender.send("a.b", &()).await, Err(Error::Stopped)));
        assert!(matches!(
            sender.publish("a.b", "x").await,
            Err(Error::Stopped)
        ));
    }
}
