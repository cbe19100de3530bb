//! The long-running device client: connect, stay connected, keep the identity token fresh,
//! dispatch messages, stop gracefully.
//!
//! One supervisor task owns the connection. The application talks to it through cheap handles:
//! [`Sender`] (queue messages), [`Handle`] (stop, subscribe) and [`Events`] (what happened).
//! Message handlers run as tasks of their own, so a slow handler never delays pongs or other
//! messages; all of them are cancelled when the client stops.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use morrigan_protocol::message::{Capability, TokenIssue, types};
use morrigan_protocol::{MessageType, close};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Error;
use crate::backoff::{Backoff, BackoffConfig};
use crate::connect::{self, Connection, DEFAULT_TIMEOUT, Endpoint, Incoming};
use crate::token::{TokenStore, check_token_shape, parse_identity_token, peek_claims, token_label};

/// Default interval between `client.token.refresh` requests (the original's 8 h).
pub const DEFAULT_TOKEN_REFRESH: Duration = Duration::from_secs(8 * 3600);
/// Default bound on a graceful stop (waiting for the server's close).
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Default capacity of the event channel; a subscriber that falls further behind skips events.
pub const DEFAULT_EVENT_CAPACITY: usize = 1024;
/// Messages [`Sender::send`] may queue ahead of the socket before it waits.
const OUTGOING_CAPACITY: usize = 256;

/// What happened to the client, in order.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// The server accepted the connection (`connection.state accepted`).
    Connected { connection_id: Option<String> },
    /// An accepted connection ended: the close code (1005 none given, 1006 no close frame).
    Disconnected { code: u16, reason: String },
    /// An application message (anything but the built-ins the client consumes:
    /// `connection.state` and `client.token.issue`), including `connection.error`. Delivered
    /// whether or not a handler ran for it.
    Message(Value),
    /// The server issued a new identity token; it is in use (and saved, with a state directory).
    TokenRefreshed { expires: String },
    /// A connection attempt failed (the client retries unless the error is fatal).
    ConnectFailed(Error),
    /// The client waits `delay` before connection attempt `attempt` (1 = first retry).
    Reconnecting { attempt: u32, delay: Duration },
    /// The client stopped: `Ok` after [`Handle::stop`], `Err` with the fatal error otherwise.
    /// Always the last event.
    Stopped(Result<(), Error>),
}

/// A subscription to a client's [`Event`]s.
///
/// Backed by a broadcast channel: the client never waits for a slow subscriber; one that falls
/// more than the channel's capacity behind skips the oldest events (logged).
#[derive(Debug)]
pub struct Events {
    rx: broadcast::Receiver<Event>,
    /// No event will come after what is buffered: [`Event::Stopped`] was received, or this
    /// subscription began after it was sent.
    ended: bool,
}

impl Events {
    /// The next event; `None` once the client has stopped and every event was received (after
    /// [`Event::Stopped`], whether or not a [`Handle`] is still alive).
    pub async fn recv(&mut self) -> Option<Event> {
        loop {
            let received = if self.ended {
                match self.rx.try_recv() {
                    Ok(event) => Ok(event),
                    Err(broadcast::error::TryRecvError::Lagged(n)) => Err(n),
                    Err(_) => return None,
                }
            } else {
                match self.rx.recv().await {
                    Ok(event) => Ok(event),
                    Err(broadcast::error::RecvError::Lagged(n)) => Err(n),
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            };
            match received {
                Ok(event) => {
                    self.ended |= matches!(event, Event::Stopped(_));
                    return Some(event);
                }
                Err(skipped) => tracing::warn!(skipped, "event subscriber fell behind"),
            }
        }
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
type HandlerFn = Arc<dyn Fn(Value, Sender) -> BoxFuture + Send + Sync>;

#[derive(Default)]
struct Handlers {
    by_type: HashMap<String, HandlerFn>,
    by_provider: HashMap<String, HandlerFn>,
}

impl Handlers {
    /// The handler for a full type, else for its provider.
    fn find(&self, ty: &str) -> Option<&HandlerFn> {
        self.by_type.get(ty).or_else(|| {
            let provider = MessageType::parse(ty).ok()?.provider();
            self.by_provider.get(provider)
        })
    }
}

#[derive(Debug, Clone, Default)]
struct Link {
    connected: bool,
    connection_id: Option<String>,
}

/// State shared by the supervisor and the handles.
struct Shared {
    identity_token: Mutex<String>,
    link: watch::Sender<Link>,
    events: broadcast::Sender<Event>,
    /// How the client ended, once it has.
    outcome: watch::Sender<Option<Result<(), Error>>>,
}

impl Shared {
    fn token(&self) -> String {
        self.identity_token
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_token(&self, token: String) {
        *self
            .identity_token
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = token;
    }

    fn emit(&self, event: Event) {
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

/// Configures a [`Client`]. Created by [`Client::builder`].
#[must_use]
pub struct ClientBuilder {
    /// Tried in turn: the first, then the next whenever an attempt fails or a connection is lost.
    provider_urls: Vec<String>,
    identity_token: String,
    state_dir: Option<PathBuf>,
    backoff: BackoffConfig,
    token_refresh: Option<Duration>,
    timeout: Duration,
    stop_timeout: Duration,
    root_ca_pems: Vec<Vec<u8>>,
    handlers: Handlers,
    capabilities: Vec<Capability>,
    event_capacity: usize,
    /// Registration errors, reported by `build` so that the chain stays fluent.
    errors: Vec<String>,
}

impl ClientBuilder {
    /// Adds another provider URL (another node of the cluster, or another cluster). The client
    /// starts with the first URL and moves on to the next one, round robin, whenever a
    /// connection attempt fails or an accepted connection is lost; the backoff applies as
    /// usual between attempts. Fatal errors (a refused identity, a revoked client) stop the
    /// client whichever URL gave them.
    pub fn fallback_url(mut self, provider_url: impl Into<String>) -> Self {
        self.provider_urls.push(provider_url.into());
        self
    }

    /// Where to keep the newest identity token (`<dir>/identity-token`, 0600, replaced
    /// atomically). Without one, a refreshed token lives only in memory and a restart falls back
    /// to the token given to [`Client::builder`], which the refresh has revoked.
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }

    /// The reconnect policy (default: 1 s base, 60 s cap, reset after 30 s connected).
    pub fn backoff(mut self, backoff: BackoffConfig) -> Self {
        self.backoff = backoff;
        self
    }

    /// How often to ask for a new identity token while connected (default 8 h; one is also
    /// requested on every connect). `None` disables refreshing.
    pub fn token_refresh(mut self, every: Option<Duration>) -> Self {
        self.token_refresh = every.filter(|d| !d.is_zero());
        self
    }

    /// Bounds each step of a connection attempt, and each write on an open connection
    /// (default 30 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Bounds a graceful stop (default 5 s).
    pub fn stop_timeout(mut self, timeout: Duration) -> Self {
        self.stop_timeout = timeout;
        self
    }

    /// Also trusts the CA certificate(s) in this PEM, for HTTPS and WSS alike.
    pub fn root_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_ca_pems.push(pem.into());
        self
    }

    /// Capacity of the event channel (default 1024).
    pub fn event_capacity(mut self, capacity: usize) -> Self {
        self.event_capacity = capacity.max(1);
        self
    }

    /// Handles messages of one type (`"agent.ping"`). Takes precedence over a provider handler.
    /// Registering the same type again replaces the handler.
    ///
    /// The handler runs as its own task, concurrently with other messages (no ordering between
    /// handler invocations), and is cancelled when the client stops.
    pub fn on_type<F, Fut>(mut self, ty: &str, handler: F) -> Self
    where
        F: Fn(Value, Sender) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        match MessageType::parse(ty) {
            Ok(_) => {
                self.handlers.by_type.insert(ty.to_string(), boxed(handler));
            }
            Err(e) => self.errors.push(format!("handler type {ty:?}: {e}")),
        }
        self
    }

    /// Handles every message of a provider (`"agent"` gets `agent.*`) that has no type handler.
    pub fn on_provider<F, Fut>(mut self, provider: &str, handler: F) -> Self
    where
        F: Fn(Value, Sender) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        // A provider is valid exactly when `<provider>.x` is a valid type without a second dot.
        if !provider.contains('.') && MessageType::parse(&format!("{provider}.x")).is_ok() {
            self.handlers
                .by_provider
                .insert(provider.to_string(), boxed(handler));
        } else {
            self.errors.push(format!(
                "handler provider {provider:?} is not [A-Za-z0-9_-]+"
            ));
        }
        self
    }

    /// Adds an entry to the capability report. Entries with the same name as a provider that has
    /// handlers are merged with it (the handlers' message names are added).
    pub fn capability(mut self, capability: Capability) -> Self {
        self.capabilities.push(capability);
        self
    }

    /// Checks the configuration and picks the identity token to start with.
    ///
    /// With a state directory that holds a token, that token wins over the one given to
    /// [`Client::builder`] (it is the newest the device received), unless the given one was
    /// issued later (`iat`): a re-provisioned device must not be stuck with a revoked token.
    pub fn build(self) -> Result<Client, Error> {
        if !self.errors.is_empty() {
            return Err(Error::Config(self.errors.join("; ")));
        }
        if self.provider_urls.is_empty() {
            return Err(Error::Config("no provider URL".into()));
        }
        let endpoints = self
            .provider_urls
            .iter()
            .map(|url| {
                Endpoint::with_root_cas(url, &self.root_ca_pems).map(|e| e.timeout(self.timeout))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let store = self.state_dir.map(TokenStore::new);
        let given = parse_identity_token(&self.identity_token);
        let persisted = match &store {
            Some(store) => store.load()?,
            None => None,
        };
        let token = match persisted {
            Some(saved) if !is_newer(&given, &saved) => saved,
            _ => {
                if given.is_empty() {
                    return Err(Error::Config("no identity token".into()));
                }
                if let Some(store) = &store {
                    store.save(&given)?;
                }
                given
            }
        };
        check_token_shape(&token)
            .map_err(|_| Error::Config("identity token is not a JWT".into()))?;
        tracing::debug!(token = %token_label(&token), "identity token selected");
        Ok(Client {
            endpoints,
            store,
            token,
            backoff: self.backoff,
            token_refresh: self.token_refresh,
            stop_timeout: self.stop_timeout,
            write_timeout: self.timeout,
            capabilities: capability_report(&self.handlers, self.capabilities),
            handlers: Arc::new(self.handlers),
            event_capacity: self.event_capacity,
        })
    }
}

/// True when `candidate` was issued after `current` (both readable, `iat` strictly later).
fn is_newer(candidate: &str, current: &str) -> bool {
    let iat = |t: &str| peek_claims(t).ok().and_then(|c| c.iat);
    matches!((iat(candidate), iat(current)), (Some(a), Some(b)) if a > b)
}

fn boxed<F, Fut>(handler: F) -> HandlerFn
where
    F: Fn(Value, Sender) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Arc::new(move |message, sender| Box::pin(handler(message, sender)) as BoxFuture)
}

/// The capability report: explicit entries, merged with one entry per provider that has
/// handlers (listing the message names of its type handlers).
fn capability_report(handlers: &Handlers, explicit: Vec<Capability>) -> Vec<Capability> {
    let mut report: BTreeMap<String, Capability> = BTreeMap::new();
    for capability in explicit {
        report.insert(capability.name.clone(), capability);
    }
    for provider in handlers.by_provider.keys() {
        report
            .entry(provider.clone())
            .or_insert_with(|| Capability {
                name: provider.clone(),
                ..Capability::default()
            });
    }
    for ty in handlers.by_type.keys() {
        let Ok(parsed) = MessageType::parse(ty) else {
            continue;
        };
        let entry = report
            .entry(parsed.provider().to_string())
            .or_insert_with(|| Capability {
                name: parsed.provider().to_string(),
                ..Capability::default()
            });
        if !entry.messages.iter().any(|m| m == parsed.message()) {
            entry.messages.push(parsed.message().to_string());
        }
    }
    let mut report: Vec<Capability> = report.into_values().collect();
    for capability in &mut report {
        capability.messages.sort();
    }
    report
}

/// A configured device client; [`start`](Self::start) it to connect.
pub struct Client {
    endpoints: Vec<Endpoint>,
    store: Option<TokenStore>,
    token: String,
    backoff: BackoffConfig,
    token_refresh: Option<Duration>,
    stop_timeout: Duration,
    write_timeout: Duration,
    capabilities: Vec<Capability>,
    handlers: Arc<Handlers>,
    event_capacity: usize,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoints", &self.endpoints)
            .field("token", &token_label(&self.token))
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Starts configuring a client for the connection provider at `provider_url` (e.g.
    /// `https://host/api/core/connection`) with the device's identity token (bare or as the
    /// quoted string the provisioning endpoint returns).
    pub fn builder(
        provider_url: impl Into<String>,
        identity_token: impl Into<String>,
    ) -> ClientBuilder {
        ClientBuilder {
            provider_urls: vec![provider_url.into()],
            identity_token: identity_token.into(),
            state_dir: None,
            backoff: BackoffConfig::default(),
            token_refresh: Some(DEFAULT_TOKEN_REFRESH),
            timeout: DEFAULT_TIMEOUT,
            stop_timeout: DEFAULT_STOP_TIMEOUT,
            root_ca_pems: Vec::new(),
            handlers: Handlers::default(),
            capabilities: Vec::new(),
            event_capacity: DEFAULT_EVENT_CAPACITY,
            errors: Vec::new(),
        }
    }

    /// Like [`builder`](Self::builder), with several provider URLs tried in turn (see
    /// [`ClientBuilder::fallback_url`]): a device can fail over to another node or cluster.
    /// An empty list makes [`build`](ClientBuilder::build) fail.
    pub fn builder_multi<I, U>(provider_urls: I, identity_token: impl Into<String>) -> ClientBuilder
    where
        I: IntoIterator<Item = U>,
        U: Into<String>,
    {
        let mut builder = Self::builder(String::new(), identity_token);
        builder.provider_urls = provider_urls.into_iter().map(Into::into).collect();
        builder
    }

    /// The provider URLs the client tries, in order (bare server URLs completed with
    /// `/api/core/connection`).
    pub fn provider_urls(&self) -> Vec<String> {
        self.endpoints
            .iter()
            .map(|e| e.provider_url().to_string())
            .collect()
    }

    /// Spawns the client on the current tokio runtime and returns its handle and a first event
    /// subscription (created before anything happens, so no event is missed).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn start(self) -> (Handle, Events) {
        let (events, events_rx) = broadcast::channel(self.event_capacity);
        let (link, _) = watch::channel(Link::default());
        let (outcome, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            identity_token: Mutex::new(self.token),
            link,
            events,
            outcome,
        });
        let (out_tx, out_rx) = mpsc::channel(OUTGOING_CAPACITY);
        let (stop_tx, stop_rx) = mpsc::channel(1);
        let sender = Sender {
            out: out_tx,
            shared: shared.clone(),
        };
        let runner = Runner {
            endpoints: self.endpoints,
            current: 0,
            store: self.store,
            shared: shared.clone(),
            handlers: self.handlers,
            capabilities: self.capabilities,
            backoff_config: self.backoff,
            backoff: Backoff::new(self.backoff.base, self.backoff.cap),
            token_refresh: self.token_refresh,
            stop_timeout: self.stop_timeout,
            write_timeout: self.write_timeout,
            stop_rx,
            out_rx,
            sender: sender.clone(),
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
        };
        let task = tokio::spawn(runner.run());
        let handle = Handle {
            sender,
            shared,
            stop_tx,
            task,
        };
        let events = Events {
            rx: events_rx,
            ended: false,
        };
        (handle, events)
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

    /// Another subscription to the events, starting now (after the client stopped: one that
    /// ends at once).
    pub fn subscribe(&self) -> Events {
        let rx = self.shared.events.subscribe();
        // `Stopped` is sent before the outcome is set: with an outcome, what this subscription
        // will ever get is already in it.
        let ended = self.shared.outcome.borrow().is_some();
        Events { rx, ended }
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

/// How a session ended.
enum SessionEnd {
    /// Stopped on request; the client is done.
    Stopped,
    /// The connection closed; maybe reconnect.
    Closed { code: u16, reason: String },
}

/// The supervisor: owns the connection and everything the client spawned.
struct Runner {
    /// Never empty; `current` is the one the next attempt uses.
    endpoints: Vec<Endpoint>,
    current: usize,
    store: Option<TokenStore>,
    shared: Arc<Shared>,
    handlers: Arc<Handlers>,
    capabilities: Vec<Capability>,
    backoff_config: BackoffConfig,
    backoff: Backoff,
    token_refresh: Option<Duration>,
    stop_timeout: Duration,
    write_timeout: Duration,
    stop_rx: mpsc::Receiver<String>,
    out_rx: mpsc::Receiver<String>,
    sender: Sender,
    tasks: TaskTracker,
    cancel: CancellationToken,
}

/// What `stop_rx` yields: a reason, or "dropped" when the handle went away.
fn stop_reason(received: Option<String>) -> String {
    received.unwrap_or_else(|| "dropped".to_string())
}

impl Runner {
    /// Moves on to the next provider URL (round robin) after a failed attempt or a lost
    /// connection.
    fn next_endpoint(&mut self) {
        if self.endpoints.len() > 1 {
            self.current = (self.current + 1) % self.endpoints.len();
            tracing::info!(url = %self.endpoints[self.current].provider_url(), "next attempt uses another provider URL");
        }
    }

    async fn run(mut self) -> Result<(), Error> {
        let result = self.supervise().await;
        match &result {
            Ok(()) => tracing::info!("client stopped"),
            Err(e) => tracing::error!(error = %e, "client stopped"),
        }
        // End every handler task before reporting the end.
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        // In this order: see `Handle::subscribe`.
        self.shared.emit(Event::Stopped(result.clone()));
        self.shared.outcome.send_replace(Some(result.clone()));
        result
    }

    async fn supervise(&mut self) -> Result<(), Error> {
        loop {
            // Always the newest token: a refresh revokes the previous one (the original's K6).
            let token = self.shared.token();
            let endpoint = self.endpoints[self.current].clone();
            let attempt = tokio::select! {
                biased;
                reason = self.stop_rx.recv() => {
                    tracing::debug!(reason = %stop_reason(reason), "stopped while connecting");
                    return Ok(());
                }
                attempt = endpoint.connect(&token) => attempt,
            };
            let mut floor = Duration::ZERO;
            match attempt {
                Ok(connection) => {
                    let since = Instant::now();
                    match self.session(connection).await {
                        SessionEnd::Stopped => return Ok(()),
                        SessionEnd::Closed { code, reason } => {
                            tracing::info!(
                                code, %reason, name = close::reason_name(code), "disconnected"
                            );
                            self.shared.emit(Event::Disconnected {
                                code,
                                reason: reason.clone(),
                            });
                            if let Some(fatal) = connect::stop_error(code, &reason) {
                                return Err(fatal);
                            }
                            if since.elapsed() >= self.backoff_config.stable_after {
                                self.backoff.reset();
                            }
                            if close::advice(code) == close::Advice::ReconnectWithJitter {
                                floor = self.backoff_config.going_away_spread;
                            }
                        }
                    }
                }
                Err(e) => {
                    self.shared.emit(Event::ConnectFailed(e.clone()));
                    if e.is_fatal() {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, url = %endpoint.provider_url(), "connection attempt failed");
                }
            }
            self.next_endpoint();
            let delay = self.backoff.next_delay_with_floor(floor);
            let attempt = self.backoff.attempt();
            tracing::info!(attempt, ?delay, "reconnecting");
            self.shared.emit(Event::Reconnecting { attempt, delay });
            tokio::select! {
                biased;
                reason = self.stop_rx.recv() => {
                    tracing::debug!(reason = %stop_reason(reason), "stopped while waiting");
                    return Ok(());
                }
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn session(&mut self, mut connection: Connection) -> SessionEnd {
        let connection_id = connection.connection_id().map(str::to_string);
        tracing::info!(connection_id = ?connection_id, url = %connection.url(), "connected");
        self.shared.link.send_replace(Link {
            connected: true,
            connection_id: connection_id.clone(),
        });
        self.shared.emit(Event::Connected { connection_id });
        let end = self.converse(&mut connection).await;
        self.shared.link.send_replace(Link::default());
        // Whatever is still queued was meant for this connection.
        let mut dropped = 0;
        while self.out_rx.try_recv().is_ok() {
            dropped += 1;
        }
        if dropped > 0 {
            tracing::debug!(dropped, "messages queued for a closed connection dropped");
        }
        match end {
            Ok(end) => end,
            Err(reason) => {
                let code = connection.close(close::NORMAL, "", self.stop_timeout).await;
                tracing::debug!(code, "server answered the close");
                self.shared.emit(Event::Disconnected {
                    code: 1000,
                    reason: format!("stopped.{reason}"),
                });
                SessionEnd::Stopped
            }
        }
    }

    /// Runs an accepted connection until it closes (`Ok`) or a stop is requested (`Err(reason)`,
    /// after `client.state stopped.<reason>` was sent; the caller closes).
    async fn converse(&mut self, connection: &mut Connection) -> Result<SessionEnd, String> {
        let mut greeting = vec![
            json!({"type": types::CLIENT_STATE, "state": "ready"}),
            json!({"type": types::CAPABILITY_REPORT, "capabilities": self.capabilities}),
        ];
        if self.token_refresh.is_some() {
            greeting.push(json!({"type": types::CLIENT_TOKEN_REFRESH}));
        }
        for message in &greeting {
            if let Err(e) = self.write(connection, message).await {
                return Ok(abnormal(e));
            }
        }
        let mut refresh = self.token_refresh.map(|every| {
            let mut interval = tokio::time::interval_at(Instant::now() + every, every);
            interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
            interval
        });
        loop {
            // Not biased: a flood in one direction must not starve the other.
            tokio::select! {
                reason = self.stop_rx.recv() => {
                    let reason = stop_reason(reason);
                    let state = json!({"type": types::CLIENT_STATE, "state": format!("stopped.{reason}")});
                    let report = connection.send(&state);
                    match tokio::time::timeout(self.stop_timeout, report).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::debug!(error = %e, "could not report the stop"),
                        Err(_) => tracing::debug!("timed out reporting the stop"),
                    }
                    return Err(reason);
                }
                incoming = connection.recv() => match incoming {
                    Incoming::Message(message) => self.on_message(message).await,
                    Incoming::Closed { code, reason } => return Ok(SessionEnd::Closed { code, reason }),
                },
                Some(text) = self.out_rx.recv() => {
                    let write = connection.send_text(text);
                    match tokio::time::timeout(self.write_timeout, write).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Ok(abnormal(e)),
                        Err(_) => return Ok(abnormal(Error::Timeout("writing a message"))),
                    }
                }
                () = tick(&mut refresh) => {
                    tracing::debug!("requesting a new identity token");
                    let message = json!({"type": types::CLIENT_TOKEN_REFRESH});
                    if let Err(e) = self.write(connection, &message).await {
                        return Ok(abnormal(e));
                    }
                }
            }
        }
    }

    /// Sends a message, giving up after the write timeout: a server that stops reading must not
    /// wedge the client (it would neither see a stop request nor answer pings meanwhile).
    async fn write(&self, connection: &mut Connection, message: &Value) -> Result<(), Error> {
        tokio::time::timeout(self.write_timeout, connection.send(message))
            .await
            .unwrap_or(Err(Error::Timeout("writing a message")))
    }

    async fn on_message(&mut self, message: Value) {
        let ty = message
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        match ty.as_str() {
            types::CONNECTION_STATE => {
                tracing::debug!(state = ?message.get("state"), "connection.state after accept");
            }
            types::CLIENT_TOKEN_ISSUE => self.on_token_issue(message).await,
            _ => {
                if ty == types::CONNECTION_ERROR {
                    tracing::warn!(
                        error = ?message.get("error"), reason = ?message.get("reason"),
                        message_type = ?message.get("messageType"), "server reported an error"
                    );
                }
                match self.handlers.find(&ty) {
                    Some(handler) => {
                        let run = handler(message.clone(), self.sender.clone());
                        let cancel = self.cancel.clone();
                        self.tasks.spawn(async move {
                            tokio::select! {
                                () = cancel.cancelled() => {}
                                () = run => {}
                            }
                        });
                    }
                    None => tracing::debug!(%ty, "no handler"),
                }
                self.shared.emit(Event::Message(message));
            }
        }
    }

    async fn on_token_issue(&mut self, message: Value) {
        let issue: TokenIssue = match serde_json::from_value(message) {
            Ok(issue) => issue,
            Err(e) => {
                tracing::warn!(error = %e, "malformed client.token.issue ignored");
                return;
            }
        };
        if let Err(e) = check_token_shape(&issue.token) {
            tracing::warn!(error = %e, "client.token.issue ignored");
            return;
        }
        let label = token_label(&issue.token);
        if let Some(store) = self.store.clone() {
            let token = issue.token.clone();
            match tokio::task::spawn_blocking(move || store.save(&token)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "new identity token not saved"),
                Err(e) => tracing::error!(error = %e, "new identity token not saved"),
            }
        }
        self.shared.set_token(issue.token);
        tracing::info!(token = %label, expires = %issue.expires, "identity token refreshed");
        self.shared.emit(Event::TokenRefreshed {
            expires: issue.expires,
        });
    }
}

fn abnormal(e: Error) -> SessionEnd {
    SessionEnd::Closed {
        code: 1006,
        reason: e.to_string(),
    }
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::tests::fake_jwt;

    fn noop(_: Value, _: Sender) -> std::future::Ready<()> {
        std::future::ready(())
    }

    #[test]
    fn builder_rejects_bad_handlers() {
        let token = fake_jwt(&json!({"sub": "d"}));
        let err = Client::builder("http://127.0.0.1:1/api/core/connection", &token)
            .on_type("nodot", noop)
            .on_provider("a.b", noop)
            .on_provider("", noop)
            .build()
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("nodot") && text.contains("a.b"), "{text}");
        assert!(
            Client::builder("http://127.0.0.1:1/api/core/connection", &token)
                .on_type("agent.ping", noop)
                .on_provider("agent", noop)
                .build()
                .is_ok()
        );
    }

    #[test]
    fn builder_needs_a_jwt() {
        for bad in ["", "\"\"", "not a token"] {
            let err = Client::builder("http://127.0.0.1:1/x", bad)
                .build()
                .unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{bad:?}: {err}");
        }
    }

    #[test]
    fn capability_report_merges_handlers_and_explicit_entries() {
        let mut handlers = Handlers::default();
        handlers.by_type.insert("agent.ping".into(), boxed(noop));
        handlers
            .by_type
            .insert("agent.exec.run".into(), boxed(noop));
        handlers.by_type.insert("files.get".into(), boxed(noop));
        handlers.by_provider.insert("logs".into(), boxed(noop));
        let explicit = vec![Capability {
            name: "agent".into(),
            version: "1.2.0".into(),
            ..Capability::default()
        }];
        let report = capability_report(&handlers, explicit);
        let value = serde_json::to_value(&report).unwrap();
        assert_eq!(
            value,
            json!([
                {"name": "agent", "version": "1.2.0", "messages": ["exec.run", "ping"]},
                {"name": "files", "version": "", "messages": ["get"]},
                {"name": "logs", "version": "", "messages": []},
            ])
        );
    }

    #[test]
    fn handler_lookup_prefers_the_full_type() {
        let mut handlers = Handlers::default();
        handlers.by_type.insert("agent.ping".into(), boxed(noop));
        handlers.by_provider.insert("agent".into(), boxed(noop));
        let full = handlers.find("agent.ping").map(Arc::as_ptr);
        let provider = handlers.find("agent.other").map(Arc::as_ptr);
        assert!(full.is_some() && provider.is_some());
        assert_ne!(full, provider);
        assert!(handlers.find("other.ping").is_none());
    }

    #[test]
    fn stored_token_wins_unless_the_given_one_is_newer() {
        let dir = tempfile::tempdir().unwrap();
        let old = fake_jwt(&json!({"sub": "d", "iat": 100}));
        let new = fake_jwt(&json!({"sub": "d", "iat": 200}));
        let url = "http://127.0.0.1:1/api/core/connection";
        let store = TokenStore::new(dir.path());
        // Empty state dir: the given token is used and saved.
        let client = Client::builder(url, &old)
            .state_dir(dir.path())
            .build()
            .unwrap();
        assert_eq!(client.token, old);
        assert_eq!(store.load().unwrap().as_deref(), Some(old.as_str()));
        // A refresh saved a newer token: a restart with the old one uses the saved one.
        store.save(&new).unwrap();
        let client = Client::builder(url, &old)
            .state_dir(dir.path())
            .build()
            .unwrap();
        assert_eq!(client.token, new);
        // Re-provisioned with an even newer token: that one wins and replaces the saved one.
        let newest = fake_jwt(&json!({"sub": "d", "iat": 300}));
        let quoted = format!("\"{newest}\"");
        let client = Client::builder(url, quoted)
            .state_dir(dir.path())
            .build()
            .unwrap();
        assert_eq!(client.token, newest);
        assert_eq!(store.load().unwrap().as_deref(), Some(newest.as_str()));
    }

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
        let sender = handle.sender();
        handle.stop("test").await.unwrap();
        assert!(matches!(sender.send("a.b", &()).await, Err(Error::Stopped)));
    }
}
