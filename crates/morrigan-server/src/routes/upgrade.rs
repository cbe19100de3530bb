//! The WebSocket handshake (RFC 6455 §4.2), done here rather than by axum's extractor so that
//! the session gets tokio-tungstenite's stream itself: its raw TCP stream is reachable (to
//! drain a peer that is still sending when it is refused, so the close frame is not destroyed
//! by a reset), and hyper's per-connection read buffer is released at the upgrade.

use axum::extract::FromRequestParts;
use axum::http::header::{
    CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tungstenite::protocol::{Role, WebSocketConfig};

use crate::error::ApiError;
use crate::listener::Counted;

/// A valid WebSocket upgrade request, not yet answered.
pub struct Upgrade {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
}

fn has_token(headers: &HeaderMap, name: axum::http::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn not_an_upgrade(why: &str) -> ApiError {
    ApiError::new(
        StatusCode::UPGRADE_REQUIRED,
        "requestError",
        format!("This endpoint takes a WebSocket upgrade: {why}."),
    )
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        if parts.method != Method::GET {
            return Err(not_an_upgrade("the method must be GET"));
        }
        if !has_token(&parts.headers, CONNECTION, "upgrade") {
            return Err(not_an_upgrade(
                "'Connection' header did not include 'upgrade'",
            ));
        }
        if !has_token(&parts.headers, UPGRADE, "websocket") {
            return Err(not_an_upgrade(
                "'Upgrade' header did not include 'websocket'",
            ));
        }
        if parts
            .headers
            .get(SEC_WEBSOCKET_VERSION)
            .map(|v| v.as_bytes())
            != Some(b"13")
        {
            return Err(not_an_upgrade("'Sec-WebSocket-Version' must be 13"));
        }
        let key = parts
            .headers
            .get(SEC_WEBSOCKET_KEY)
            .filter(|k| !k.is_empty() && k.len() <= 64)
            .cloned()
            .ok_or_else(|| not_an_upgrade("'Sec-WebSocket-Key' header missing"))?;
        let on_upgrade = parts
            .extensions
            .remove::<OnUpgrade>()
            .ok_or_else(|| not_an_upgrade("this connection cannot be upgraded"))?;
        Ok(Self { key, on_upgrade })
    }
}

/// A socket after the handshake: the (counted) TCP stream itself when the connection is plain
/// TCP, else hyper's upgraded I/O (TLS).
pub enum Socket {
    Tcp(WebSocketStream<Counted<TcpStream>>),
    Upgraded(WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>),
}

impl Upgrade {
    /// Answers 101 (selecting `protocol`, if any) and calls `on_socket` with the socket once
    /// hyper hands it over, or `on_failed` if it never does.
    pub fn accept<F, Fut>(
        self,
        protocol: Option<HeaderValue>,
        config: WebSocketConfig,
        on_socket: F,
        on_failed: impl FnOnce(hyper::Error) + Send + 'static,
    ) -> Response
    where
        F: FnOnce(Socket) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let accept = tungstenite::handshake::derive_accept_key(self.key.as_bytes());
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => return on_failed(e),
            };
            let socket = match upgraded.downcast::<TokioIo<Counted<TcpStream>>>() {
                Ok(parts) if parts.read_buf.is_empty() => Socket::Tcp(
                    WebSocketStream::from_raw_socket(
                        parts.io.into_inner(),
                        Role::Server,
                        Some(config),
                    )
                    .await,
                ),
                Ok(parts) => Socket::Tcp(
                    WebSocketStream::from_partially_read(
                        parts.io.into_inner(),
                        parts.read_buf.to_vec(),
                        Role::Server,
                        Some(config),
                    )
                    .await,
                ),
                Err(upgraded) => Socket::Upgraded(
                    WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        Some(config),
                    )
                    .await,
                ),
            };
            on_socket(socket).await;
        });
        let mut res = Response::new(axum::body::Body::empty());
        *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = res.headers_mut();
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(v) = HeaderValue::from_str(&accept) {
            headers.insert(SEC_WEBSOCKET_ACCEPT, v);
        }
        if let Some(p) = protocol {
            headers.insert(axum::http::header::SEC_WEBSOCKET_PROTOCOL, p);
        }
        res
    }
}
