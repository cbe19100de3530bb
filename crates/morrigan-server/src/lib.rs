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

pub mod admission;
pub mod auth;
pub mod bus;
pub mod config;
pub mod credentials;
pub mod delivery;
pub mod error;
pub mod events;
pub mod forwarded;
pub mod heartbeat;
pub mod hooks;
pub mod hub;
pub mod lease;
pub mod listener;
pub mod metrics;
pub mod node;
pub mod passwords;
pub mod peers;
pub mod providers;
pub mod records;
pub mod routes;
pub mod session;
pub mod state;
pub mod store;
pub mod throttle;
pub mod ticket;
pub mod tls;
pub mod tokens;

pub use config::{Config, TlsFiles};
pub use node::{Server, ServerBuilder, StartError};
pub use state::AppState;
