//! Wire types of the Morrigan connection protocol.
//!
//! Everything that crosses the wire between a Morrigan server, a device and an operator lives here,
//! so that the server (`morrigan-server`), the SDK (`morrigan-client`) and the tools agree on one
//! definition. The crate has no I/O and no async: it is cheap to depend on from anywhere.
//!
//! * [`message`]: the JSON message envelope, the `type` grammar and the built-in message types.
//! * [`close`]: WebSocket close codes the server uses, and what a client should do on each.
//! * [`records`]: connection, client and node records as the REST API serves them.
//! * [`events`]: the connection event stream's events.
//! * [`messages`]: tracked messages (acks, replies, the outbox) and uplink messages.
//! * [`functions`]: operator function (permission) names.
//! * [`api`]: request and response bodies of the REST API, and token claims.
//! * [`paths`]: the HTTP paths, as the original Node.js server mounted them.

pub mod api;
pub mod close;
pub mod events;
pub mod functions;
pub mod message;
pub mod messages;
pub mod paths;
pub mod records;
pub mod time_format;

pub use message::{MessageType, MessageTypeError};
