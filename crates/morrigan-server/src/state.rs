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
    pub config: Config,
    /// This node's id: `iss` of its tokens, `serverId` of the records it holds.
    pub node_id: Arc<str>,
    /// Base of report URLs (`http(s)://host:port`).
    pub base_url: String,
    pub store: Arc<dyn Store>,
    /// Issues and records every token; verifies operator sessions.
    pub credentials: Arc<crate::credentials::Credentials>,
    /// This node's sockets (shared with the bus, which applies remote commands to it).
    pub hub: Arc<Hub>,
    /// Whether this node may act (see [`crate::lease`]).
    pub lease: Arc<crate::lease::Lease>,
    /// Reaches the node holding a socket that is not here.
    pub bus: Arc<dyn Bus>,
    /// This node's event stream subscribers (fed by the bus).
    pub events: Arc<crate::events::EventFanout>,
    pub providers: Providers,
    pub hooks: Arc<[Arc<dyn Hooks>]>,
    /// What message providers may use (see [`crate::providers::Services`]).
    pub services: Arc<crate::providers::Services>,
    /// Whether the embedder registered hooks (the built-in observer never refuses a
    /// connection): only then does an upgrade read the pending record for `authenticate`.
    pub embedder_hooks: bool,
    pub heartbeats: HeartbeatQueue,
    /// Writes closed records and heartbeats, retrying those the store did not take.
    pub records: crate::records::Records,
    /// Every argon2 computation runs here, a few at a time (see [`crate::passwords`]).
    pub passwords: Arc<crate::passwords::Passwords>,
    /// Failed logins per address and per name (see [`crate::throttle`]).
    pub login_throttle: crate::throttle::LoginThrottle,
    /// The node of each remote connection this node has sent to (see [`crate::delivery::route`]).
    pub owners: dashmap::DashMap<String, Arc<str>>,
    /// The other nodes' leases and recent silence (see [`crate::peers::Peers`]).
    pub peers: crate::peers::Peers,
    /// This node's Prometheus registry (`GET /metrics`).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The counts and caps of the sockets this node holds.
    pub admission: Arc<crate::listener::Admission>,
    /// Every connection task, so shutdown can wait for their records to be written.
    pub sessions: TaskTracker,
    /// Cancelled when the node starts shutting down.
    pub shutdown: CancellationToken,
}

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    /// The report URL every connection token names.
    pub fn report_url(&self) -> String {
        format!("{}{}", self.base_url, morrigan_protocol::paths::CONNECT)
    }
}
