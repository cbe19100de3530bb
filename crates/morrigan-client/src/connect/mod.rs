//! One connection attempt: token exchange, WebSocket upgrade, wait for `accepted`.
//!
//! [`Endpoint`] is the reusable part (provider URL, HTTP client with its connection pool, TLS
//! settings); [`Connection`] is one accepted WebSocket. The [`Client`](crate::Client) builds on
//! both; tools and load generators can use them directly.

mod connection;
mod endpoint;

use std::time::Duration;

use tokio::net::TcpStream;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub use connection::{Connection, Incoming};
pub(crate) use connection::{encode, stop_error};
pub use endpoint::{Endpoint, connect_once};

/// The WebSocket stream type of a [`Connection`].
pub type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Default bound on each network step (HTTP exchange, WebSocket handshake, waiting for
/// `accepted`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
