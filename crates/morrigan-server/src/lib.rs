//! The Morrigan connection server, as a library.
//!
//! Map of the crate (see `ARCHITECTURE.md` for the paths of a connection and a message):
//!
//! * [`server`]: start ([`Server::builder`]), serve ([`Server::run`]) and stop a node.
//! * [`routes`]: the HTTP surface (the original's paths), one module per provider.
//! * [`session`]: one task per WebSocket: reads, writes, heartbeat, record on close.
//! * [`hub`]: the local connections of this node (sharded map of task handles).
//! * [`listener`]: accepting sockets: the caps that refuse one early, serving HTTP/1.1.
//! * [`heartbeat`]: coalesced persistence of pongs (no database write per pong).
//! * [`records`]: closed records and heartbeats, retried until the store takes them.
//! * [`providers`]: message routing by `type` prefix; the extension point.
//! * [`hooks`]: authenticate / connect / disconnect callbacks for embedders.
//! * [`tokens`]: EdDSA JWTs, keys in the store, verification by `kid`.
//! * [`auth`]: operators: user tokens, functions, who may grant what.
//! * [`passwords`]: argon2id on a few fixed threads (bounded concurrency and memory).
//! * [`throttle`]: failed logins per address and per name.
//! * [`store`]: the persistence trait and one file per backend.
//! * [`metrics`], [`events`]: Prometheus metrics and the connection event stream.

pub(crate) mod admission;
pub(crate) mod auth;
pub mod bus;
pub mod config;
pub(crate) mod credentials;
pub(crate) mod delivery;
pub(crate) mod error;
pub(crate) mod events;
pub(crate) mod forwarded;
pub(crate) mod heartbeat;
pub mod hooks;
pub(crate) mod hub;
pub(crate) mod lease;
pub(crate) mod listener;
pub mod messaging;
pub(crate) mod metrics;
pub(crate) mod node;
pub(crate) mod passwords;
pub(crate) mod peers;
pub mod providers;
pub(crate) mod records;
pub(crate) mod routes;
pub(crate) mod session;
pub(crate) mod state;
pub mod store;
pub(crate) mod throttle;
pub(crate) mod ticket;
pub(crate) mod tls;
pub(crate) mod tokens;

pub use config::{Config, TlsFiles};
pub use node::{Server, ServerBuilder, StartError};
pub use state::AppState;

/// Internals the integration tests and benchmarks drive directly; not part of the embedder API.
#[doc(hidden)]
pub mod testing {
    pub use crate::forwarded::client_address;
    pub use crate::node::lifecycle::upkeep_once;
    pub use crate::routes::ui::UNDOCUMENTED;
    pub use crate::tokens::{Tokens, digest};
}
