//! Device SDK for Morrigan.
//!
//! A device holds an *identity token* (issued when an operator provisions it). To talk to the
//! server it exchanges that token for a short-lived *connection token* (`POST` to the connection
//! provider), opens a WebSocket to the URL inside the connection token and waits for
//! `connection.state accepted`. From then on both sides exchange JSON messages
//! `{"type":"<provider>.<message>", ...}`.
//!
//! [`Client`] does all of that and keeps doing it:
//!
//! * reconnects with exponential backoff and full jitter ([`Backoff`]), resets after a stable
//!   connection, and obeys the server's close codes: 4003 (revoked/deprovisioned) and 4001
//!   (superseded) stop it with an error, 1001 (server going away) reconnects spread out so that a
//!   fleet does not stampede;
//! * fails over between several provider URLs (other nodes or clusters), moving to the next one
//!   whenever an attempt fails or a connection is lost ([`Client::builder_multi`],
//!   [`ClientBuilder::fallback_url`]);
//! * asks for a new identity token on every connect and periodically, always uses the newest one,
//!   and saves it atomically (0600) in a state directory so that a restart uses it too;
//! * dispatches messages to async handlers registered per type, per provider or as a
//!   catch-all, reports capabilities and `client.state`, and streams [`Event`]s;
//! * answers tracked messages (those with a `messageId`) from what their handler returns
//!   ([`HandlerResult`]: ack, reply or nack), once per id: a message re-delivered after a
//!   reconnect is not handled twice but gets the first answer again;
//! * publishes uplink messages for the operators ([`Sender::publish`]);
//! * stops gracefully (`client.state stopped.<reason>`, close 1000) and ends every task it
//!   spawned.
//!
//! It speaks both the Morrigan server and the original Node.js server (raw `Authorization`,
//! `http://` report URLs, JSON labelled `text/html`, quoted provisioning responses:
//! [`parse_identity_token`]).
//!
//! [`connect_once`] and [`Endpoint`] are the single-attempt building blocks, for tools and load
//! generators.
//!
//! Tokens are secrets: the SDK never logs one, only its id ([`token_label`]). Beware that
//! tungstenite itself logs the whole handshake request, `Origin` (the connection token)
//! included, at `trace` level through the `log` crate: keep `tungstenite` below `trace` in
//! production.
//!
//! # Example
//!
//! ```no_run
//! use morrigan_client::{Client, Event, Sender};
//! use serde_json::{Value, json};
//!
//! # async fn run() -> Result<(), morrigan_client::Error> {
//! let client = Client::builder(
//!     "https://morrigan.example/api/core/connection",
//!     std::fs::read_to_string("/etc/agent/identity-token").unwrap_or_default(),
//! )
//! .state_dir("/var/lib/agent")
//! .on_type("agent.ping", |message: Value, sender: Sender| async move {
//!     let _ = sender.send("agent.pong", &json!({ "echo": message.get("data") })).await;
//! })
//! .build()?;
//!
//! let (handle, mut events) = client.start();
//! tokio::spawn(async move {
//!     while let Some(event) = events.recv().await {
//!         if let Event::Connected { connection_id } = event {
//!             println!("connected as {connection_id:?}");
//!         }
//!     }
//! });
//! tokio::signal::ctrl_c().await.ok();
//! handle.stop("SIGINT").await
//! # }
//! ```

//!
//! The crate's README (tracked messages and uplink messages, with examples) is compiled with the
//! doc tests, so its examples stay true.

/// The README's examples, compiled by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

mod backoff;
mod client;
mod connect;
mod error;
mod token;

pub use backoff::{Backoff, BackoffConfig};
pub use client::{
    Answer, Client, ClientBuilder, DEFAULT_EVENT_CAPACITY, DEFAULT_MESSAGE_ID_MEMORY,
    DEFAULT_STOP_TIMEOUT, DEFAULT_TOKEN_REFRESH, Event, Events, Handle, HandlerResult, Sender,
    message_id,
};
pub use connect::{Connection, DEFAULT_TIMEOUT, Endpoint, Incoming, WsStream, connect_once};
pub use error::Error;
pub use token::{
    IDENTITY_TOKEN_FILE, PeekedClaims, TokenStore, parse_identity_token, peek_claims,
    report_url_to_ws, token_label,
};

/// The wire types, re-exported so that applications need not depend on the protocol crate.
pub use morrigan_protocol as protocol;
pub use morrigan_protocol::message::Capability;
