//! One error type for the whole SDK.
//!
//! Every variant is `Clone` (foreign errors are held in an `Arc`) because the final outcome of a
//! client is delivered both as the return value of [`Handle::stop`](crate::Handle::stop) and as
//! [`Event::Stopped`](crate::Event::Stopped) on a broadcast channel.

use std::sync::Arc;

use morrigan_protocol::MessageTypeError;

/// Everything that can go wrong in the SDK.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The builder or endpoint was given something unusable (bad URL, bad handler type, bad PEM).
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A message `type` does not match `<provider>.<message>`; nothing was sent.
    #[error("invalid message type {ty:?}: {source}")]
    InvalidType {
        ty: String,
        #[source]
        source: MessageTypeError,
    },

    /// [`Sender::publish`](crate::Sender::publish) was given a type of the protocol's own
    /// (`connection.*`, `client.*`, `capability.*`); nothing was sent.
    #[error("message type {ty:?} is reserved for the protocol")]
    ReservedType { ty: String },

    /// A message to send is not a JSON object with a string `type`, or its body did not serialize
    /// to an object.
    #[error("invalid message: {0}")]
    InvalidMessage(String),

    /// The server refused the identity token (HTTP 401/403 on the token exchange): it was revoked,
    /// replaced by a newer one, or the client was deprovisioned. Retrying cannot help.
    #[error("identity token refused (HTTP {status}, {state}): {reason}")]
    IdentityRejected {
        status: u16,
        state: String,
        reason: String,
    },

    /// The token exchange failed with another HTTP status (400, 429, 5xx...). Retried.
    #[error("token exchange failed with HTTP {status}: {reason}")]
    ExchangeFailed { status: u16, reason: String },

    /// Network or TLS failure talking HTTP to the provider URL. Retried.
    #[error("token exchange request failed: {0}")]
    Http(#[source] Arc<reqwest::Error>),

    /// A response or token from the server is not what the protocol says it should be. Retried:
    /// a half-upgraded server or a proxy error page can cause it.
    #[error("unexpected response from server: {0}")]
    Protocol(String),

    /// The server refused the WebSocket upgrade (HTTP 401/403: the connection token was expired,
    /// replayed or unknown). Retried with a fresh connection token.
    #[error("WebSocket upgrade refused with HTTP {status}: {reason}")]
    UpgradeRefused { status: u16, reason: String },

    /// Network, TLS or framing failure on the WebSocket. Retried.
    #[error("WebSocket failure: {0}")]
    WebSocket(#[source] Arc<tokio_tungstenite::tungstenite::Error>),

    /// The server answered `connection.state` `rejected`. Retried.
    #[error("connection rejected by server: {reason}")]
    Rejected { reason: String },

    /// The socket closed before `connection.state accepted` (the original server's answer to a bad
    /// connection token is a close without a code, 1005). Retried.
    #[error("connection closed before it was accepted (code {code}): {reason}")]
    ClosedBeforeAccepted { code: u16, reason: String },

    /// A step did not finish in time. Retried.
    #[error("timed out: {0}")]
    Timeout(&'static str),

    /// The server closed with 4003: the identity was revoked or the client deprovisioned.
    #[error("identity revoked or client deprovisioned (close {code}): {reason}")]
    Revoked { code: u16, reason: String },

    /// The server closed with 4001: a newer connection of this client took over. This session
    /// stops rather than fight the other one for the connection.
    #[error("superseded by a newer connection of the same client: {reason}")]
    Superseded { reason: String },

    /// Reading or writing the state directory failed.
    #[error("state directory: {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: Arc<std::io::Error>,
    },

    /// The client has stopped; nothing can be sent any more.
    #[error("client is stopped")]
    Stopped,

    /// The client is between connections; the message was not sent.
    #[error("not connected")]
    NotConnected,

    /// The client's task panicked (a bug in the SDK).
    #[error("client task failed: {0}")]
    Internal(String),
}

impl Error {
    /// True when retrying cannot succeed: the client stops instead of reconnecting.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Error::Config(_)
                | Error::IdentityRejected { .. }
                | Error::Revoked { .. }
                | Error::Superseded { .. }
                | Error::Internal(_)
        )
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source: Arc::new(source),
        }
    }
}

impl From<reqwest::Error> for Error {
    fn from(e: reqwest::Error) -> Self {
        Error::Http(Arc::new(e))
    }
}

impl From<tokio_tungstenite::tungstenite::Error> for Error {
    fn from(e: tokio_tungstenite::tungstenite::Error) -> Self {
        Error::WebSocket(Arc::new(e))
    }
}
