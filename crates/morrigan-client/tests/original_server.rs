//! The client against a small scripted stand-in for the ORIGINAL Node.js server, for the
//! original's quirks only. Everything else runs against a real Morrigan node (real_*.rs).
//!
//! The quirks (each has a test here; Morrigan itself behaves differently):
//!
//! 1. The token exchange's dialect: the device sends the identity token raw in `Authorization`
//!    and `{idtoken, traceId}` as the body; JSON answers are labelled `text/html`; tokens carry
//!    no `jti` and no `aud` (the record id is the header's `kid`).
//! 2. A refused identity is answered 403 with `{"state":"authenticationfailed",
//!    "status":"noRecordError","reason":...}`.
//! 3. A refused connection token is not refused before the upgrade: the socket is upgraded,
//!    then closed without a code (1005) before any `connection.state`.
//! 4. `client.token.refresh` revokes the previous identity token at once (Morrigan keeps it for
//!    a grace period), so a reconnect must use the newest token.
//!
//! The stand-in speaks plain HTTP/1.1 for the exchange and serves the WebSocket on a second
//! port (the connection token's `reportUrl`), checking the connection token in `Origin`.

// tungstenite's handshake callback returns `Result<Response, ErrorResponse>`; its size is theirs.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::{SinkExt, StreamExt};
use morrigan_client::{BackoffConfig, Client, Error, Event, Events};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

const WAIT: Duration = Duration::from_secs(10);

/// A token shaped like the original's: unsigned here, no `jti`/`aud`, the record id as `kid`.
fn original_jwt(kid: &str, payload: Value) -> String {
    let enc = |v: Value| URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.c2ln",
        enc(json!({"alg": "EdDSA", "typ": "JWT", "kid": kid})),
        enc(payload)
    )
}

#[derive(Default)]
struct State {
    /// Identity tokens the server accepts.
    identities: HashSet<String>,
    /// Issued connection tokens and the identity token each was issued for.
    connection_tokens: HashMap<String, String>,
    /// Close this many upcoming sockets without a code before `accepted` (quirk 3).
    close_before_accept: u32,
    /// Every exchange: the `Authorization` header and the body, in order.
    exchanges: Vec<(String, Value)>,
    counter: u64,
}

impl State {
    fn identity_token(&mut self) -> String {
        self.counter += 1;
        let token = original_jwt(
            &format!("rec-{}", self.counter),
            json!({"sub": "dev1", "iss": "srv1", "iat": 1_795_688_000 + self.counter, "exp": 1_798_280_000}),
        );
        self.identities.insert(token.clone());
        token
    }
}

/// One accepted server-side connection, driven by the test.
struct ServerConn {
    /// Everything the client sent, plus `{"closed": code}` at the end.
    from_client: mpsc::UnboundedReceiver<Value>,
    to_client: mpsc::UnboundedSender<Message>,
}

impl ServerConn {
    async fn next(&mut self) -> Value {
        tokio::time::timeout(WAIT, self.from_client.recv())
            .await
            .expect("client message in time")
            .expect("connection task alive")
    }

    fn close(&self, code: u16, reason: &str) {
        let frame = CloseFrame {
            code: code.into(),
            reason: reason.into(),
        };
        self.to_client.send(Message::Close(Some(frame))).unwrap();
    }
}

struct Original {
    http: SocketAddr,
    state: Arc<Mutex<State>>,
    conns: mpsc::UnboundedReceiver<ServerConn>,
}

impl Original {
    async fn start() -> Self {
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ws = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let report_url = format!(
            "http://{}/api/core/connection/connect",
            ws.local_addr().unwrap()
        );
        let state = Arc::new(Mutex::new(State::default()));
        let (conn_tx, conns) = mpsc::unbounded_channel();
        let http_addr = http.local_addr().unwrap();
        let s = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = http.accept().await {
                tokio::spawn(exchange(stream, s.clone(), report_url.clone()));
            }
        });
        let s = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = ws.accept().await {
                tokio::spawn(websocket(stream, s.clone(), conn_tx.clone()));
            }
        });
        Original {
            http: http_addr,
            state,
            conns,
        }
    }

    fn provider_url(&self) -> String {
        format!("http://{}/api/core/connection", self.http)
    }

    fn provision(&self) -> String {
        self.state.lock().unwrap().identity_token()
    }

    fn exchanges(&self) -> Vec<(String, Value)> {
        self.state.lock().unwrap().exchanges.clone()
    }

    async fn accepted(&mut self) -> ServerConn {
        tokio::time::timeout(WAIT, self.conns.recv())
            .await
            .expect("a connection in time")
            .unwrap()
    }
}

/// `POST /api/core/connection`: a minimal HTTP/1.1 exchange, one request per TCP connection.
async fn exchange(mut stream: TcpStream, state: Arc<Mutex<State>>, report_url: String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (head_len, content_length) = loop {
        let n = stream.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..pos]).to_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (pos + 4, len);
        }
    };
    while buf.len() < head_len + content_length {
        let n = stream.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf[..head_len]).to_string();
    let authorization = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("authorization")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&buf[head_len..]).unwrap_or(Value::Null);
    let (status, answer) = {
        let mut s = state.lock().unwrap();
        s.exchanges.push((authorization.clone(), body));
        // The original compares the raw header: "Bearer <token>" would not match.
        if s.identities.contains(&authorization) {
            s.counter += 1;
            let token = original_jwt(
                &format!("rec-{}", s.counter),
                json!({"sub": format!("conn-{}", s.counter), "iss": "srv1", "reportUrl": report_url,
                       "iat": 1_795_688_156, "exp": 1_795_688_216}),
            );
            s.connection_tokens.insert(token.clone(), authorization);
            ("200 OK", json!({"state": "success", "token": token}))
        } else {
            (
                "403 Forbidden",
                json!({"state": "authenticationfailed", "status": "noRecordError", "reason": "No record found for the token."}),
            )
        }
    };
    let body = answer.to_string();
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

async fn websocket(
    stream: TcpStream,
    state: Arc<Mutex<State>>,
    conns: mpsc::UnboundedSender<ServerConn>,
) {
    let identity = Arc::new(Mutex::new(None::<String>));
    let check = {
        let (state, identity) = (state.clone(), identity.clone());
        move |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
            let origin = req
                .headers()
                .get("origin")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            match state.lock().unwrap().connection_tokens.remove(origin) {
                Some(id) => {
                    *identity.lock().unwrap() = Some(id);
                    Ok(resp)
                }
                None => {
                    let mut refusal = ErrorResponse::new(None);
                    *refusal.status_mut() = StatusCode::UNAUTHORIZED;
                    Err(refusal)
                }
            }
        }
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, check).await else {
        return;
    };
    let close_first = {
        let mut s = state.lock().unwrap();
        let close = s.close_before_accept > 0;
        s.close_before_accept = s.close_before_accept.saturating_sub(1);
        close
    };
    if close_first {
        let _ = ws.close(None).await;
        while ws.next().await.is_some() {}
        return;
    }
    let id = {
        let mut s = state.lock().unwrap();
        s.counter += 1;
        format!("c-{}", s.counter)
    };
    let accepted = json!({"type": "connection.state", "state": "accepted", "connectionId": id});
    ws.send(Message::text(accepted.to_string())).await.unwrap();
    let (from_tx, from_client) = mpsc::unbounded_channel();
    let (to_client, mut to_rx) = mpsc::unbounded_channel::<Message>();
    conns
        .send(ServerConn {
            from_client,
            to_client,
        })
        .unwrap();
    loop {
        tokio::select! {
            Some(message) = to_rx.recv() => {
                let _ = ws.send(message).await;
            }
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let message: Value = serde_json::from_str(text.as_str()).unwrap();
                    if message["type"] == "client.token.refresh" {
                        // Quirk 4: a new identity token, and the one this connection used is
                        // revoked at once.
                        let new = {
                            let mut s = state.lock().unwrap();
                            let new = s.identity_token();
                            if let Some(old) = identity.lock().unwrap().replace(new.clone()) {
                                s.identities.remove(&old);
                            }
                            new
                        };
                        let issue = json!({"type": "client.token.issue", "token": new, "expires": "2026-12-26T10:15:58.286Z"});
                        let _ = ws.send(Message::text(issue.to_string())).await;
                    }
                    let _ = from_tx.send(message);
                }
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.map_or(1005, |f| u16::from(f.code));
                    while ws.next().await.is_some() {}
                    let _ = from_tx.send(json!({"closed": code}));
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    let _ = from_tx.send(json!({"closed": 1006}));
                    return;
                }
            }
        }
    }
}

fn fast_backoff() -> BackoffConfig {
    BackoffConfig {
        base: Duration::from_millis(20),
        cap: Duration::from_millis(200),
        stable_after: Duration::from_secs(30),
        going_away_spread: Duration::from_millis(100),
    }
}

/// The next event matching `pred`, skipping others.
async fn wait_for(events: &mut Events, pred: impl Fn(&Event) -> bool) -> Event {
    tokio::time::timeout(WAIT, async {
        loop {
            let event = events.recv().await.expect("events until stopped");
            if pred(&event) {
                return event;
            }
        }
    })
    .await
    .expect("event in time")
}

#[tokio::test]
async fn the_exchange_speaks_the_originals_dialect() {
    let mut original = Original::start().await;
    let identity = original.provision();
    // The original's provisioning answer: the token as a JSON string literal.
    let client = Client::builder(original.provider_url(), format!("\"{identity}\""))
        .backoff(fast_backoff())
        .token_refresh(None)
        .build()
        .unwrap();
    let (handle, mut events) = client.start();
    let mut conn = original.accepted().await;
    let event = wait_for(&mut events, |e| matches!(e, Event::Connected { .. })).await;
    assert!(
        matches!(event, Event::Connected { connection_id: Some(ref id) } if id.starts_with("c-")),
        "{event:?}"
    );

    // Raw Authorization (no "Bearer"), and the original's body.
    let (auth, body) = original.exchanges().remove(0);
    assert_eq!(auth, identity);
    assert_eq!(body["idtoken"], identity.as_str());
    assert!(
        body["traceId"]
            .as_str()
            .is_some_and(|t| t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit())),
        "{body}"
    );
    assert_eq!(
        conn.next().await,
        json!({"type": "client.state", "state": "ready"})
    );
    handle.stop("test").await.unwrap();
}

#[tokio::test]
async fn the_originals_refusal_is_fatal() {
    let original = Original::start().await;
    let unknown = original_jwt("rec-x", json!({"sub": "dev1", "iss": "srv1"}));
    let client = Client::builder(original.provider_url(), &unknown)
        .backoff(fast_backoff())
        .build()
        .unwrap();
    let (handle, mut events) = client.start();
    let event = wait_for(&mut events, |e| matches!(e, Event::ConnectFailed(_))).await;
    assert!(matches!(
        event,
        Event::ConnectFailed(Error::IdentityRejected { status: 403, .. })
    ));
    let result = tokio::time::timeout(WAIT, handle.wait()).await.unwrap();
    let Err(Error::IdentityRejected { state, reason, .. }) = result else {
        panic!("{result:?}")
    };
    // `state`, not the original's `status` ("noRecordError"), names the kind.
    assert_eq!(state, "authenticationfailed");
    assert_eq!(reason, "No record found for the token.");
    assert_eq!(original.exchanges().len(), 1);
}

#[tokio::test]
async fn a_close_without_a_code_before_accepted_is_retried() {
    let mut original = Original::start().await;
    let identity = original.provision();
    original.state.lock().unwrap().close_before_accept = 1;
    let client = Client::builder(original.provider_url(), &identity)
        .backoff(fast_backoff())
        .token_refresh(None)
        .build()
        .unwrap();
    let (handle, mut events) = client.start();
    let event = wait_for(&mut events, |e| matches!(e, Event::ConnectFailed(_))).await;
    assert!(
        matches!(
            event,
            Event::ConnectFailed(Error::ClosedBeforeAccepted { code: 1005, .. })
        ),
        "{event:?}"
    );
    let _conn = original.accepted().await;
    wait_for(&mut events, |e| matches!(e, Event::Connected { .. })).await;
    // A fresh connection token for the second attempt.
    assert_eq!(original.exchanges().len(), 2);
    handle.stop("test").await.unwrap();
}

#[tokio::test]
async fn a_refresh_revokes_the_older_token_at_once_so_reconnects_use_the_newest() {
    let mut original = Original::start().await;
    let identity = original.provision();
    let client = Client::builder(original.provider_url(), &identity)
        .backoff(fast_backoff())
        .build()
        .unwrap();
    let (handle, mut events) = client.start();
    let conn = original.accepted().await;
    wait_for(&mut events, |e| matches!(e, Event::TokenRefreshed { .. })).await;
    let refreshed = handle.identity_token();
    assert_ne!(refreshed, identity);
    assert!(
        !original
            .state
            .lock()
            .unwrap()
            .identities
            .contains(&identity)
    );

    // The original restarting: reusing the revoked token would be refused (403) and stop the
    // client for good.
    conn.close(1001, "server restarting");
    let event = wait_for(&mut events, |e| matches!(e, Event::Disconnected { .. })).await;
    assert!(
        matches!(event, Event::Disconnected { code: 1001, .. }),
        "{event:?}"
    );
    let _conn = original.accepted().await;
    wait_for(&mut events, |e| matches!(e, Event::Connected { .. })).await;
    let exchanges = original.exchanges();
    assert_eq!(exchanges.len(), 2);
    assert_eq!(exchanges[1].0, refreshed);
    handle.stop("test").await.unwrap();
}
