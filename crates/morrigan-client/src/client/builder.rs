//! [`ClientBuilder`]: the client's configuration, checked once by [`ClientBuilder::build`],
//! which also picks the identity token to start with.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use morrigan_protocol::MessageType;
use morrigan_protocol::message::Capability;
use serde_json::Value;

use super::handlers::{Handlers, boxed, capability_report};
use super::tracked::{DEFAULT_MESSAGE_ID_MEMORY, HandlerResult};
use super::{Client, DEFAULT_EVENT_CAPACITY, DEFAULT_STOP_TIMEOUT, DEFAULT_TOKEN_REFRESH, Sender};
use crate::Error;
use crate::backoff::BackoffConfig;
use crate::connect::{DEFAULT_TIMEOUT, Endpoint};
use crate::token::{TokenStore, check_token_shape, parse_identity_token, peek_claims, token_label};

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
            message_id_memory: DEFAULT_MESSAGE_ID_MEMORY,
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
    message_id_memory: usize,
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

    /// How many tracked message ids to remember, with their answers (default 1024, at least 1).
    /// A re-delivered id among them is not handled again: its first answer is sent again. The
    /// memory lives as long as the client, across reconnects; the oldest ids are forgotten
    /// first.
    pub fn message_id_memory(mut self, ids: usize) -> Self {
        self.message_id_memory = ids.max(1);
        self
    }

    /// Handles messages of one type (`"agent.ping"`). Takes precedence over a provider handler.
    /// Registering the same type again replaces the handler.
    ///
    /// The handler gets the whole message (`type`, and `messageId` when it is tracked) and a
    /// [`Sender`]. It runs as its own task, concurrently with other messages (no ordering
    /// between handler invocations), and is cancelled when the client stops.
    ///
    /// What it returns answers a tracked message (see [`HandlerResult`]): `()` or `Ok(None)`
    /// acks it, `Ok(Some(payload))` replies with `payload`, `Err(e)` nacks it with
    /// `e.to_string()`. A handler that panics nacks it with `handler panicked`. The answer is
    /// sent after everything the handler itself sent. A message without a `messageId` is not
    /// answered, whatever the handler returns.
    pub fn on_type<F, Fut>(mut self, ty: &str, handler: F) -> Self
    where
        F: Fn(Value, Sender) -> Fut + Send + Sync + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: HandlerResult,
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
    /// The handler is as for [`on_type`](Self::on_type).
    pub fn on_provider<F, Fut>(mut self, provider: &str, handler: F) -> Self
    where
        F: Fn(Value, Sender) -> Fut + Send + Sync + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: HandlerResult,
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

    /// Handles every message that has neither a type nor a provider handler (but never the
    /// server's own `connection.*` messages). The handler is as for [`on_type`](Self::on_type).
    ///
    /// Without one, a tracked message nobody handles is nacked with `no handler for <type>`;
    /// an agent that acknowledges whatever it receives registers `on_other(|_, _| async {})`.
    /// It adds nothing to the capability report.
    pub fn on_other<F, Fut>(mut self, handler: F) -> Self
    where
        F: Fn(Value, Sender) -> Fut + Send + Sync + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: HandlerResult,
    {
        self.handlers.other = Some(boxed(handler));
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
            message_id_memory: self.message_id_memory,
        })
    }
}

/// True when `candidate` was issued after `current` (both readable, `iat` strictly later).
fn is_newer(candidate: &str, current: &str) -> bool {
    let iat = |t: &str| peek_claims(t).ok().and_then(|c| c.iat);
    matches!((iat(candidate), iat(current)), (Some(a), Some(b)) if a > b)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

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
}
