//! Message providers: the extension point for protocols running over a connection.
//!
//! A message's `type` is `<provider>.<message>`; the provider part selects a [`Provider`]
//! registered here, which handles the message part. A provider also describes itself for
//! `GET /api/core/capability` (name, version, messages, endpoints, functions).

pub mod capability;
pub mod client;
pub mod connection;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use morrigan_protocol::message::Capability;
use serde_json::Value;

use crate::credentials::Credentials;
use crate::hooks::Hooks;
use crate::store::Store;

/// The node's services a provider may use, shared by every connection of the node.
pub struct Services {
    pub store: Arc<dyn Store>,
    pub(crate) credentials: Arc<Credentials>,
    pub(crate) hooks: Arc<[Arc<dyn Hooks>]>,
    pub(crate) tracker: Arc<crate::messaging::Tracker>,
}

/// Where a message came from, and what its handler may use.
pub struct MessageContext {
    pub connection_id: Arc<str>,
    pub client_id: Arc<str>,
    pub services: Arc<Services>,
}

/// Why a provider did not handle a message. The connection stays open in every case; the peer
/// gets a `connection.error` naming the problem.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The provider has no handler for this message.
    #[error("unknown message")]
    UnknownMessage,
    /// The message's fields are wrong.
    #[error("{0}")]
    Invalid(String),
    /// An answer (`connection.ack`, ...) quotes a message id this client was never sent.
    #[error("{0}")]
    UnknownId(String),
    /// The handler failed (store down, ...).
    #[error("{0}")]
    Failed(String),
}

impl From<crate::store::StoreError> for HandlerError {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!(error = %e, "store failure in message handler");
        HandlerError::Failed("the server could not store this; retry later".into())
    }
}

/// A message provider.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// The provider part of the message types it handles (`client`).
    fn name(&self) -> &str;
    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }
    /// Message parts it handles (`state`, `token.refresh`).
    fn messages(&self) -> Vec<String>;
    /// REST endpoints it serves, as `METHOD /path` (for capability listings).
    fn endpoints(&self) -> Vec<String> {
        Vec::new()
    }
    /// Functions (permissions) it defines.
    fn functions(&self) -> Vec<String> {
        Vec::new()
    }
    /// Handles `message` (the part after the provider); may return one reply frame.
    async fn handle(
        &self,
        ctx: &MessageContext,
        message: &str,
        body: Value,
    ) -> Result<Option<Value>, HandlerError>;
}

/// The registered providers, by name.
#[derive(Clone, Default)]
pub struct Providers {
    by_name: HashMap<String, Arc<dyn Provider>>,
    order: Vec<String>,
}

impl Providers {
    /// The built-in providers: `connection`, `client`, `capability`.
    pub fn builtin() -> Self {
        let mut p = Self::default();
        p.register(Arc::new(connection::ConnectionProvider));
        p.register(Arc::new(client::ClientProvider));
        p.register(Arc::new(capability::CapabilityProvider));
        p
    }

    /// Adds (or replaces) a provider.
    pub fn register(&mut self, provider: Arc<dyn Provider>) {
        let name = provider.name().to_string();
        if self.by_name.insert(name.clone(), provider).is_none() {
            self.order.push(name);
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Provider>> {
        self.by_name.get(name)
    }

    /// One capability entry per provider, in registration order.
    pub fn describe(&self) -> Vec<Capability> {
        self.order
            .iter()
            .filter_map(|n| self.by_name.get(n))
            .map(|p| Capability {
                name: p.name().to_string(),
                version: p.version().to_string(),
                messages: p.messages(),
                endpoints: Some(p.endpoints()),
                functions: Some(p.functions()),
            })
            .collect()
    }
}
