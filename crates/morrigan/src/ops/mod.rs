//! Operator commands: `login`, `client`, `connection`, `message`, `identity`, `node`, against a
//! server's REST API, one module per command group.
//!
//! Answers are read as the protocol crate's types, so a renamed field on the wire fails to
//! compile here rather than print `-`. Output is a human table by default and the server's
//! JSON, as received, with `--json`. Every failure is one line on stderr (`error: <the
//! server's reason>`) and a non-zero exit code.

mod api;
pub mod client;
mod common;
pub mod connection;
pub mod identity;
pub mod login;
pub mod message;
pub mod node;
mod table;
