//! The state every route and connection task shares.

use std::ops::Deref;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::Bus;
use crate::config::Config;
use crate::heartbeat::HeartbeatQueue;
use crate::hooks::Hooks;
use crate::hub::Hub;
use crate::providers::Providers;
use crate::store::Store;

/// Cheaply cloneable handle to the node's state.
#[derive(Clone)]
pub struct AppState(pub(crate) Arc<Inner>);

pub struct Inner {
    pub(crate) config: Config,
    /// This node's id: `iss` of its tokens, `serverId` of the records it holds.
    pub(crate) node_id: Arc<str>,
    /// Base of report URLs (`http(s)://host:port`).
    pub(crate) base_url: String,
    pub(crate) store: Arc<dyn Store>,
    /// Issues and records every token; verifies operator sessions.
    pub(crate) credentials: Arc<crate::credentials::Credentials>,
    /// This node's sockets (shared with the bus, which applies remote commands to it).
    pub(crate) hub: Arc<Hub>,
    /// Whether this node may act (see [`crate::lease`]).
    pub(crate) lease: Arc<crate::lease::Lease>,
    /// Reaches the node holding a socket that is not here.
    pub(crate) bus: Arc<dyn Bus>,
    /// This node's event stream subscribers (fed by the bus).
    pub(crate) events: Arc<crate::events::EventFanout>,
    pub(crate) providers: Providers,
    pub(crate) hooks: Arc<[Arc<dyn Hooks>]>,
    /// What message providers may use (see [`crate::providers::Services`]).
    pub(crate) services: Arc<crate::providers::Services>,
    pub(crate) tracker: Arc<crate::messaging::Tracker>,
    /// Whether the embedder registered hooks (the built-in observer never refuses a
    /// connection): only then does an upgrade read the pending record for `authenticate`.
    pub(crate) embedder_hooks: bool,
    pub(crate) heartbeats: HeartbeatQueue,
    /// Writes closed records and heartbeats, retrying those the store did not take.
    pub(crate) records: crate::records::Records,
    /// Every argon2 computation runs here, a few at a time (see [`crate::passwords`]).
    pub(crate) passwords: Arc<crate::passwords::Passwords>,
    /// Failed logins per address and per name (see [`crate::throttle`]).
    pub(crate) login_throttle: crate::throttle::LoginThrottle,
    /// The node of each remote connection this node has sent to (see [`crate::delivery::route`]).
    pub(crate) owners: dashmap::DashMap<String, Arc<str>>,
    /// The other nodes' leases and recent silence (see [`crate::peers::Peers`]).
    pub(crate) peers: crate::peers::Peers,
    /// This node's Prometheus registry (`GET /metrics`).
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    /// The counts and caps of the sockets this node holds.
    pub(crate) admission: Arc<crate::listener::Admission>,
    /// Every connection task, so shutdown can wait for their records to be written.
    pub(crate) sessions: TaskTracker,
    /// Cancelled when the node starts shutting down.
    pub(crate) shutdown: CancellationToken,
}

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    /// This node's id (`serverId` of the records it holds).
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The node's configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// HTTP connections (sockets not upgraded) this node holds now.
    #[doc(hidden)]
    pub fn http_connections(&self) -> usize {
        self.admission.http_connections()
    }

    /// The report URL every connection token names.
    pub fn report_url(&self) -> String {
        format!("{}{}", self.base_url, morrigan_protocol::paths::CONNECT)
    }
}
