//! The floor: a minimal tokio + hyper + tungstenite server speaking the same protocol as
//! Morrigan (login, provision, token exchange, WebSocket with the token in `Origin`, the
//! accepted frame, pings every 30 s, REST send acknowledged after the write), with Ed25519
//! connection tokens signed and verified by jsonwebtoken (EdDSA) and single use enforced in
//! memory. No database, no records, no hooks: everything Morrigan does on top is its cost.
//!
//! Operator and identity tokens are opaque strings here (Morrigan verifies them as EdDSA JWTs
//! plus a store lookup); only the connection token is a real signed JWT.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::{DashMap, DashSet};
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{
    AUTHORIZATION, CONNECTION, CONTENT_TYPE, ORIGIN, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY,
    UPGRADE,
};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use morrigan_protocol::api::{Claims, audience};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;

const USER_TOKEN: &str = "bare-user-token";
const IDENTITY_PREFIX: &str = "bare-identity.";
const PING_EVERY: Duration = Duration::from_secs(30);

type Command = (String, oneshot::Sender<()>);

struct Bare {
    base_url: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    clients: DashSet<String>,
    used: DashSet<String>,
    conns: DashMap<String, mpsc::Sender<Command>>,
}

fn unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    json(code, format!(r#"{{"status":"failed","reason":"{code}"}}"#))
}

/// Serves the floor on `listener` until `stop`.
pub async fn serve(listener: TcpListener, stop: CancellationToken) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let signing = SigningKey::generate(&mut rand::rngs::OsRng);
    let der = signing
        .to_pkcs8_der()
        .map_err(|e| anyhow::anyhow!("pkcs8: {e}"))?;
    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.set_audience(&[audience::CONNECTION]);
    validation.leeway = 2;
    let bare = Arc::new(Bare {
        base_url: format!("http://{addr}"),
        encoding: EncodingKey::from_ed_der(der.as_bytes()),
        decoding: DecodingKey::from_ed_der(&signing.verifying_key().to_bytes()),
        validation,
        clients: DashSet::new(),
        used: DashSet::new(),
        conns: DashMap::new(),
    });
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => {
                    // Out of files: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let bare = bare.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let bare = bare.clone();
                async move { Ok::<_, Infallible>(route(bare, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await;
        });
    }
}

fn bearer(req: &Request<Incoming>) -> Option<&str> {
    let v = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
    Some(v.strip_prefix("Bearer ").unwrap_or(v).trim())
}

async fn body(req: Request<Incoming>) -> Option<Bytes> {
    Limited::new(req.into_body(), 1024 * 1024)
        .collect()
        .await
        .ok()
        .map(|c| c.to_bytes())
}

async fn route(bare: Arc<Bare>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::POST, "/api/auth") => json(
            StatusCode::OK,
            format!(r#"{{"state":"success","token":"{USER_TOKEN}"}}"#),
        ),
        (&Method::POST, "/api/core/client/provision") => {
            if bearer(&req) != Some(USER_TOKEN) {
                return status(StatusCode::UNAUTHORIZED);
            }
            let Some(b) = body(req).await else {
                return status(StatusCode::BAD_REQUEST);
            };
            let v: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
            let Some(id) = v["id"].as_str() else {
                return status(StatusCode::BAD_REQUEST);
            };
            bare.clients.insert(id.to_string());
            json(StatusCode::OK, format!(r#""{IDENTITY_PREFIX}{id}""#))
        }
        (&Method::POST, "/api/core/connection") => {
            let Some(client) = bearer(&req).and_then(|t| t.strip_prefix(IDENTITY_PREFIX)) else {
                return status(StatusCode::BAD_REQUEST);
            };
            if !bare.clients.contains(client) {
                return status(StatusCode::FORBIDDEN);
            }
            let now = unix();
            let claims = Claims {
                sub: uuid::Uuid::new_v4().to_string(),
                iss: "bare".into(),
                aud: audience::CONNECTION.into(),
                iat: now,
                exp: now + 60,
                jti: uuid::Uuid::new_v4().to_string(),
                report_url: Some(format!("{}/api/core/connection/connect", bare.base_url)),
            };
            match jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &bare.encoding) {
                Ok(token) => json(
                    StatusCode::OK,
                    format!(r#"{{"state":"success","token":"{token}"}}"#),
                ),
                Err(_) => status(StatusCode::INTERNAL_SERVER_ERROR),
            }
        }
        (&Method::GET, "/api/core/connection/connect") => upgrade(bare, req),
        (&Method::POST, p) if p.starts_with("/api/core/connection/") && p.ends_with("/send") => {
            if bearer(&req) != Some(USER_TOKEN) {
                return status(StatusCode::UNAUTHORIZED);
            }
            let id = p["/api/core/connection/".len()..p.len() - "/send".len()].to_string();
            let Some(b) = body(req).await else {
                return status(StatusCode::BAD_REQUEST);
            };
            let Ok(text) = String::from_utf8(b.to_vec()) else {
                return status(StatusCode::BAD_REQUEST);
            };
            // The same validation Morrigan does: a JSON object with a string type.
            let v: serde_json::Value = match serde_json::from_str(&text) {
                Ok(v) => v,
                Err(_) => return status(StatusCode::BAD_REQUEST),
            };
            if !v["type"].is_string() {
                return status(StatusCode::BAD_REQUEST);
            }
            let Some(tx) = bare.conns.get(&id).map(|c| c.clone()) else {
                return status(StatusCode::NOT_FOUND);
            };
            let (ack_tx, ack_rx) = oneshot::channel();
            if tx.send((text, ack_tx)).await.is_err() {
                return status(StatusCode::CONFLICT);
            }
            match tokio::time::timeout(Duration::from_secs(10), ack_rx).await {
                Ok(Ok(())) => json(StatusCode::OK, r#"{"status":"success"}"#.into()),
                _ => status(StatusCode::SERVICE_UNAVAILABLE),
            }
        }
        _ => status(StatusCode::NOT_FOUND),
    }
}

fn upgrade(bare: Arc<Bare>, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    let Some(key) = req.headers().get(SEC_WEBSOCKET_KEY).cloned() else {
        return status(StatusCode::UPGRADE_REQUIRED);
    };
    let Some(token) = req
        .headers()
        .get(ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
    else {
        return status(StatusCode::UNAUTHORIZED);
    };
    let claims = match jsonwebtoken::decode::<Claims>(&token, &bare.decoding, &bare.validation) {
        Ok(d) => d.claims,
        Err(_) => return status(StatusCode::UNAUTHORIZED),
    };
    if !bare.used.insert(claims.jti) {
        return status(StatusCode::FORBIDDEN);
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let config = WebSocketConfig::default()
            .read_buffer_size(4 * 1024)
            .write_buffer_size(0);
        // Take the TCP stream back so hyper's read buffer is freed with the HTTP connection.
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) if parts.read_buf.is_empty() => {
                let ws = WebSocketStream::from_raw_socket(
                    parts.io.into_inner(),
                    Role::Server,
                    Some(config),
                )
                .await;
                session(bare, claims.sub, ws).await;
            }
            Ok(parts) => {
                let ws = WebSocketStream::from_partially_read(
                    parts.io.into_inner(),
                    parts.read_buf.to_vec(),
                    Role::Server,
                    Some(config),
                )
                .await;
                session(bare, claims.sub, ws).await;
            }
            Err(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await;
                session(bare, claims.sub, ws).await;
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(CONNECTION, "upgrade")
        .header(UPGRADE, "websocket")
        .header(SEC_WEBSOCKET_ACCEPT, derive_accept_key(key.as_bytes()))
        .body(Full::new(Bytes::new()))
        .expect("valid response")
}

async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    bare: Arc<Bare>,
    id: String,
    mut ws: WebSocketStream<S>,
) {
    let (tx, mut rx) = mpsc::channel::<Command>(8);
    bare.conns.insert(id.clone(), tx);
    let accepted =
        format!(r#"{{"type":"connection.state","state":"accepted","connectionId":"{id}"}}"#);
    if ws.send(Message::text(accepted)).await.is_ok() {
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
        loop {
            tokio::select! {
                c = rx.recv() => match c {
                    Some((text, ack)) => {
                        if ws.send(Message::text(text)).await.is_err() { break; }
                        let _ = ack.send(());
                    }
                    None => break,
                },
                _ = ping.tick() => {
                    if ws.send(Message::Ping(Bytes::new())).await.is_err() { break; }
                }
                m = ws.next() => match m {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                },
            }
        }
    }
    bare.conns.remove(&id);
}

/// Binds `addr` and serves until `stop` (used by the `bare-server` subcommand and tests).
pub async fn bind_and_serve(addr: SocketAddr, stop: CancellationToken) -> anyhow::Result<()> {
    serve(TcpListener::bind(addr).await?, stop).await
}
