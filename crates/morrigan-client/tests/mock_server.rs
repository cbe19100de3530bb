//! The client against a small scripted server on 127.0.0.1 that speaks the wire protocol: token
//! exchange over plain HTTP/1.1 (answering JSON labelled `text/html`, as the original does), and
//! a tokio-tungstenite WebSocket endpoint that checks the connection token in `Origin`.

// tungstenite's handshake callback returns `Result<Response, ErrorResponse>`; its size is theirs.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::{SinkExt, StreamExt};
use morrigan_client::{BackoffConfig, Capability, Client, Error, Event, Events, Incoming, Sender};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

const WAIT: Duration = Duration::from_secs(10);

fn jwt(payload: Value) -> String {
    let enc = |v: Value| URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.c2ln",
        enc(json!({"alg": "EdDSA", "typ": "JWT"})),
        enc(payload)
    )
}

#[derive(Default)]
struct State {
    /// Identity tokens the server accepts.
    identities: HashSet<String>,
    /// Issued connection tokens and the identity token each was issued for.
    connection_tokens: HashMap<String, String>,
    /// Refuse this many upcoming upgrades with 401 (Morrigan's answer to a bad connection token).
    refuse_upgrades: u32,
    /// Close this many upcoming sockets without a code before `accepted` (the original's answer).
    close_before_accept: u32,
    /// Accept, then never read again (a wedged server).
    deaf: bool,
    /// Every identity token presented to the exchange, in order.
    exchanges: Vec<(String, Value)>,
    counter: u64,
}

/// One accepted server-side connection, driven by the test.
struct ServerConn {
    id: String,
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

    /// The next message of type `ty`, skipping others.
    async fn next_of(&mut self, ty: &str) -> Value {
        loop {
            let m = self.next().await;
            if m["type"] == ty {
                return m;
            }
        }
    }

    fn send(&self, message: Value) {
        self.to_client
            .send(Message::text(message.to_string()))
            .unwrap();
    }

    fn close(&self, code: u16, reason: &str) {
        self.to_client
            .send(Message::Close(Some(CloseFrame {
                code: code.into(),
                reason: reason.into(),
            })))
            .unwrap();
    }
}

struct Mock {
    http: SocketAddr,
    scheme: &'static str,
    state: Arc<Mutex<State>>,
    conns: mpsc::UnboundedReceiver<ServerConn>,
}

impl Mock {
    async fn start() -> Self {
        Self::start_with(None).await
    }

    /// With `tls`, both endpoints speak HTTPS and the report URL is `https://`.
    async fn start_with(tls: Option<TlsAcceptor>) -> Self {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ws = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let report_url = format!(
            "{scheme}://{}/api/core/connection/connect",
            ws.local_addr().unwrap()
        );
        let state = Arc::new(Mutex::new(State::default()));
        let (conn_tx, conns) = mpsc::unbounded_channel();
        let http_addr = http.local_addr().unwrap();
        {
            let state = state.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = http.accept().await {
                    let (state, report_url) = (state.clone(), report_url.clone());
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        match tls {
                            None => exchange(stream, state, report_url).await,
                            Some(tls) => {
                                if let Ok(stream) = tls.accept(stream).await {
                                    exchange(stream, state, report_url).await;
                                }
                            }
                        }
                    });
                }
            });
        }
        {
            let state = state.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = ws.accept().await {
                    let (state, conn_tx, tls) = (state.clone(), conn_tx.clone(), tls.clone());
                    tokio::spawn(async move {
                        match tls {
                            None => websocket(stream, state, conn_tx).await,
                            Some(tls) => {
                                if let Ok(stream) = tls.accept(stream).await {
                                    websocket(stream, state, conn_tx).await;
                                }
                            }
                        }
                    });
                }
            });
        }
        Mock {
            http: http_addr,
            scheme,
            state,
            conns,
        }
    }

    fn provider_url(&self) -> String {
        format!("{}://{}/api/core/connection", self.scheme, self.http)
    }

    /// A fresh identity token the server accepts.
    fn provision(&self) -> String {
        let mut s = self.state.lock().unwrap();
        s.counter += 1;
        let token =
            jwt(json!({"sub": "dev1", "jti": format!("id-{}", s.counter), "iat": s.counter}));
        s.identities.insert(token.clone());
        token
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
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    state: Arc<Mutex<State>>,
    report_url: String,
) {
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
        if s.identities.contains(&authorization) {
            s.counter += 1;
            let token = jwt(json!({
                "sub": format!("conn-{}", s.counter), "jti": format!("ct-{}", s.counter),
                "reportUrl": report_url,
            }));
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

async fn websocket<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    state: Arc<Mutex<State>>,
    conns: mpsc::UnboundedSender<ServerConn>,
) {
    let identity = Arc::new(Mutex::new(None::<String>));
    let check = {
        let state = state.clone();
        let identity = identity.clone();
        move |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
            let origin = req
                .headers()
                .get("origin")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let mut s = state.lock().unwrap();
            let refuse = |reason: &str| {
                let mut r = ErrorResponse::new(Some(
                    json!({"state": "authenticationfailed", "status": "failed", "reason": reason})
                        .to_string(),
                ));
                *r.status_mut() = StatusCode::UNAUTHORIZED;
                Err(r)
            };
            if s.refuse_upgrades > 0 {
                s.refuse_upgrades -= 1;
                return refuse("Connection token refused: replayed.");
            }
            // Single use, as Morrigan does.
            match s.connection_tokens.remove(origin) {
                Some(id) => {
                    *identity.lock().unwrap() = Some(id);
                    Ok(resp)
                }
                None => refuse("Connection token refused: unknown."),
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
    if state.lock().unwrap().deaf {
        std::future::pending::<()>().await;
    }
    let (from_tx, from_client) = mpsc::unbounded_channel();
    let (to_client, mut to_rx) = mpsc::unbounded_channel::<Message>();
    conns
        .send(ServerConn {
            id,
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
                        // Issue a new identity token and revoke the one this connection used.
                        let new = {
                            let mut s = state.lock().unwrap();
                            s.counter += 1;
                            let new = jwt(json!({"sub": "dev1", "jti": format!("id-{}", s.counter), "iat": s.counter}));
                            if let Some(old) = identity.lock().unwrap().replace(new.clone()) {
                                s.identities.remove(&old);
                            }
                            s.identities.insert(new.clone());
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
async fn full_session_greeting_handlers_refresh_and_graceful_stop() {
    let mut mock = Mock::start().await;
    let identity = mock.provision();
    let dir = tempfile::tempdir().unwrap();
    let client = Client::builder(mock.provider_url(), format!("\"{identity}\""))
        .state_dir(dir.path())
        .backoff(fast_backoff())
        .on_type("agent.ping", |m: Value, s: Sender| async move {
            s.send("agent.pong", &json!({"echo": m["n"]}))
                .await
                .unwrap();
        })
        .on_provider("files", |m: Value, s: Sender| async move {
            s.send_value(json!({"type": "files.ack", "of": m["type"]}))
                .await
                .unwrap();
        })
        .capability(Capability {
            name: "agent".into(),
            version: "1.0.0".into(),
            ..Capability::default()
        })
        .build()
        .unwrap();
    let (handle, mut events) = client.start();
    let mut conn = mock.accepted().await;

    // The exchange: raw Authorization, and the original's body.
    let (auth, body) = mock.exchanges().remove(0);
    assert_eq!(auth, identity);
    assert_eq!(body["idtoken"], identity.as_str());
    assert!(body["traceId"].as_str().is_some_and(|t| t.len() == 32));

    let event = wait_for(&mut events, |e| matches!(e, Event::Connected { .. })).await;
    assert!(matches!(event, Event::Connected { connection_id: Some(ref id) } if *id == conn.id));

    // Greeting: ready, capabilities, token refresh.
    assert_eq!(
        conn.next().await,
        json!({"type": "client.state", "state": "ready"})
    );
    assert_eq!(
        conn.next().await,
        json!({"type": "capability.report", "capabilities": [
            {"name": "agent", "version": "1.0.0", "messages": ["ping"]},
            {"name": "files", "version": "", "messages": []},
        ]})
    );
    assert_eq!(conn.next().await, json!({"type": "client.token.refresh"}));

    // The refreshed token is used, saved (0600) and reported.
    wait_for(&mut events, |e| matches!(e, Event::TokenRefreshed { .. })).await;
    let refreshed = handle.identity_token();
    assert_ne!(refreshed, identity);
    let saved = std::fs::read_to_string(dir.path().join("identity-token")).unwrap();
    assert_eq!(saved, refreshed);

    // Handlers: by type, then by provider; the messages also come out as events.
    conn.send(json!({"type": "agent.ping", "n": 7}));
    assert_eq!(
        conn.next_of("agent.pong").await,
        json!({"type": "agent.pong", "echo": 7})
    );
    conn.send(json!({"type": "files.get.chunk"}));
    assert_eq!(conn.next_of("files.ack").await["of"], "files.get.chunk");
    let event = wait_for(&mut events, |e| matches!(e, Event::Message(_))).await;
    assert!(matches!(event, Event::Message(ref m) if m["type"] == "agent.ping"));

    // Sending from the application.
    handle
        .send("agent.status", &json!({"load": 0.5}))
        .await
        .unwrap();
    assert_eq!(conn.next_of("agent.status").await["load"], 0.5);

    // Graceful stop: reported, closed with 1000, and answered.
    handle.stop("SIGINT").await.unwrap();
    assert_eq!(
        conn.next().await,
        json!({"type": "client.state", "state": "stopped.SIGINT"})
    );
    assert_eq!(conn.next().await, json!({"closed": 1000}));
    let last = wait_for(&mut events, |e| matches!(e, Event::Stopped(_))).await;
    assert!(matches!(last, Event::Stopped(Ok(()))));
    assert!(events.recv().await.is_none(), "Stopped is the last event");
}

#[tokio::test]
async fn going_away_reconnects_with_the_refreshed_token() {
    let mut mock = Mock::start().await;
    let identity = mock.provision();
    let client = Client::builder(mock.provider_url(), &identity)
        .backoff(fast_backoff())
        .build()
        .unwrap();
    let (handle, mut events) = client.start();
    let conn = mock.accepted().await;
    wait_for(&mut events, |e| matches!(e, Event::TokenRefreshed { .. })).await;
    let refreshed = handle.identity_token();

    conn.close(1001, "server restarting");
    let event = wait_for(&mut events, |e| matches!(e, Event::Disconnected { .. })).await;
    assert!(
        matches!(event, Event::Disconnected { code: 1001, ref reason } if reason == "server restarting")
    );
    let event = wait_for(&mut events, |e| matches!(e, Event::Reconnecting { .. })).await;
    let Event::Reconnecting { attempt, delay } = event else {
        unreachable!()
    };
    assert_eq!(attempt, 1);
    assert!(delay <= fast_backoff().going_away_spread);

    // The old identity token was revoked by the refresh; reusing it (the original's K6) would be
    // refused with 403 and stop the client.
    let _conn2 = mock.accepted().await;
    wait_for(&mut events, |e| matches!(e, Event::Connected { .. })).await;
    let exchanges = mock.exchanges();
    assert_eq!(exchanges.len(), 2);
    assert_eq!(exchanges[1].0, refreshed);
    handle.stop("test").await.unwrap();
}

#[tokio::test]
async fn revoked_close_stops_for_good() {
    let mut mock = Mock::start().await;
    let identity = mock.provision();
    let client = Client::builder(mock.provider_url(), &identity)
        .backoff(fast_backoff())
        .token_refresh(None)
        .build()
        .unwrap();
    let (handle, mut events) = client.start();
    let conn = mock.accepted().await;
    conn.close(4003, "client deprovisioned");
    let result = tokio::time::timeout(WAIT, handle.wait()).await.unwrap();
    assert!(
        matches!(result, Err(Error::Revoked { code: 4003, ref reason }) if reason == "client deprovisioned"),
        "{result:?}"
    );
    let event = wait_for(&mut events, |e| matches!(e, Event::Stopped(_))).await;
    assert!(matches!(event, Event::Stopped(Err(Error::Revoked { .. }))));
    // No reconnect attempt.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(mock.exchanges().len(), 1);
}

#[tokio::test]
async fn superseded_close_stops() {
    let mut mock = Mock::start().await;
    let identity = mock.provision();
    let client = Client::builder(mock.provider_url(), &identity)
        .backoff(fast_backoff())
        .token_refresh(None)
        .build()
        .unwrap();
    let (handle, _events) = client.start();
    mock.accepted().await.close(4001, "newer connection");
    let result = tokio::time::timeout(WAIT, handle.wait()).await.unwrap();
    assert!(
        matches!(result, Err(Error::Superseded { .. })),
        "{result:?}"
    );
}

#[tokio::test]
async fn refused_identity_is_fatal() {
    let mock = Mock::start().await;
    let unknown = jwt(json!({"sub": "dev1", "jti": "nope"}));
    let client = Client::builder(mock.provider_url(), &unknown)
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
    assert_eq!(state, "authenticationfailed");
    assert_eq!(reason, "No record found for the token.");
    assert_eq!(mock.exchanges().len(), 1);
}

#[tokio::test]
async fn refused_upgrade_and_close_before_accept_are_retried() {
    let mut mock = Mock::start().await;
    let identity = mock.provision();
    {
        let mut s = mock.state.lock().unwrap();
        s.refuse_upgrades = 1;
        s.close_before_accept = 1;
    }
    let client = Client::builder(mock.provider_url(), &identity)
        .backoff(fast_backoff())
        .token_refresh(None)
        .build()
        .unwrap();
    let (handle, mut events) = client.start();
    let event = wait_for(&mut events, |e| matches!(e, Event::ConnectFailed(_))).await;
    assert!(
        matches!(event, Event::ConnectFailed(Error::UpgradeRefused { status: 401, ref reason }) if reason.contains("replayed")),
        "{event:?}"
    );
    let event = wait_for(&mut events, |e| matches!(e, Event::ConnectFailed(_))).await;
    assert!(
        matches!(
            event,
            Event::ConnectFailed(Error::ClosedBeforeAccepted { code: 1005, .. })
        ),
        "{event:?}"
    );
    let _conn = mock.accepted().await;
    wait_for(&mut events, |e| matches!(e, Event::Connected { .. })).await;
    // A fresh connection token for every attempt.
    assert_eq!(mock.exchanges().len(), 3);
    handle.stop("test").await.unwrap();
}

#[tokio::test]
async fn restart_uses_the_saved_token() {
    let mut mock = Mock::start().await;
    let identity = mock.provision();
    let dir = tempfile::tempdir().unwrap();
    let url = mock.provider_url();
    let build = || {
        Client::builder(&url, &identity)
            .state_dir(dir.path())
            .backoff(fast_backoff())
            .build()
            .unwrap()
    };
    let (handle, mut events) = build().start();
    let _conn = mock.accepted().await;
    wait_for(&mut events, |e| matches!(e, Event::TokenRefreshed { .. })).await;
    let refreshed = handle.identity_token();
    handle.stop("restart").await.unwrap();

    // Same configuration (the original, now revoked, token): the saved one is used.
    let (handle, mut events) = build().start();
    let _conn = mock.accepted().await;
    wait_for(&mut events, |e| matches!(e, Event::Connected { .. })).await;
    assert_eq!(mock.exchanges()[1].0, refreshed);
    handle.stop("test").await.unwrap();
}

#[tokio::test]
async fn stop_cancels_running_handlers() {
    struct Flag(Arc<std::sync::atomic::AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
    let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let mut mock = Mock::start().await;
    let identity = mock.provision();
    let client = {
        let dropped = dropped.clone();
        Client::builder(mock.provider_url(), &identity)
            .token_refresh(None)
            .on_type("agent.hang", move |_: Value, _: Sender| {
                let flag = Flag(dropped.clone());
                let started_tx = started_tx.clone();
                async move {
                    let _flag = flag;
                    let _ = started_tx.send(());
                    std::future::pending::<()>().await;
                }
            })
            .build()
            .unwrap()
    };
    let (handle, _events) = client.start();
    let conn = mock.accepted().await;
    conn.send(json!({"type": "agent.hang"}));
    tokio::time::timeout(WAIT, started.recv()).await.unwrap();
    assert!(!dropped.load(std::sync::atomic::Ordering::SeqCst));
    tokio::time::timeout(WAIT, handle.stop("test"))
        .await
        .unwrap()
        .unwrap();
    assert!(dropped.load(std::sync::atomic::Ordering::SeqCst));
}

#[tokio::test]
async fn connect_once_returns_after_accepted() {
    let mut mock = Mock::start().await;
    let identity = mock.provision();
    let mut connection = morrigan_client::connect_once(&mock.provider_url(), &identity)
        .await
        .unwrap();
    let mut conn = mock.accepted().await;
    assert_eq!(connection.connection_id(), Some(conn.id.as_str()));
    assert_eq!(connection.url().scheme(), "ws");
    connection
        .send(&json!({"type": "agent.hello"}))
        .await
        .unwrap();
    assert_eq!(conn.next().await["type"], "agent.hello");
    assert!(matches!(
        connection.send(&json!({"type": "nodot"})).await,
        Err(Error::InvalidType { .. })
    ));
    conn.send(json!({"type": "agent.ping"}));
    assert_eq!(
        connection.recv().await,
        Incoming::Message(json!({"type": "agent.ping"}))
    );
    let code = connection.close(1000, "", WAIT).await;
    assert_eq!(code, 1000);
    assert_eq!(conn.next().await, json!({"closed": 1000}));
}

/// A private CA and a server certificate for 127.0.0.1 signed by it.
fn private_ca() -> (String, TlsAcceptor) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone(), ca.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    (ca.pem(), TlsAcceptor::from(Arc::new(config)))
}

#[tokio::test]
async fn https_and_wss_trust_the_added_root_ca() {
    let (ca_pem, acceptor) = private_ca();
    let mut mock = Mock::start_with(Some(acceptor)).await;
    let identity = mock.provision();

    // Without the CA: the HTTPS exchange fails (retryable), nothing reaches the server.
    let client = Client::builder(mock.provider_url(), &identity)
        .backoff(fast_backoff())
        .build()
        .unwrap();
    let (handle, mut events) = client.start();
    let event = wait_for(&mut events, |e| matches!(e, Event::ConnectFailed(_))).await;
    assert!(
        matches!(event, Event::ConnectFailed(Error::Http(_))),
        "{event:?}"
    );
    handle.stop("test").await.unwrap();
    assert!(mock.exchanges().is_empty());

    // With it: HTTPS exchange, then WSS to the https:// report URL.
    let client = Client::builder(mock.provider_url(), &identity)
        .root_ca_pem(ca_pem.clone())
        .backoff(fast_backoff())
        .token_refresh(None)
        .build()
        .unwrap();
    let (handle, mut events) = client.start();
    let mut conn = mock.accepted().await;
    wait_for(&mut events, |e| matches!(e, Event::Connected { .. })).await;
    assert_eq!(conn.next().await["state"], "ready");
    handle.stop("test").await.unwrap();

    // The single-attempt API takes the CA too.
    let endpoint =
        morrigan_client::Endpoint::with_root_cas(&mock.provider_url(), &[ca_pem]).unwrap();
    let connection = endpoint.connect(&identity).await.unwrap();
    assert_eq!(connection.url().scheme(), "wss");

    // WSS checks the certificate on its own: a valid connection token does not get an endpoint
    // without the CA past the TLS handshake.
    let token = endpoint.exchange_token(&identity).await.unwrap();
    let bare = morrigan_client::Endpoint::new(&mock.provider_url()).unwrap();
    let refused = bare.connect_with_token(&token).await;
    assert!(matches!(refused, Err(Error::WebSocket(_))), "{refused:?}");
}

#[tokio::test]
async fn stop_is_bounded_when_the_server_does_not_answer() {
    let mock = Mock::start().await;
    let identity = mock.provision();
    mock.state.lock().unwrap().deaf = true;
    let client = Client::builder(mock.provider_url(), &identity)
        .stop_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let (handle, mut events) = client.start();
    wait_for(&mut events, |e| matches!(e, Event::Connected { .. })).await;
    let started = std::time::Instant::now();
    tokio::time::timeout(WAIT, handle.stop("test"))
        .await
        .unwrap()
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

/// A URL on 127.0.0.1 where nothing listens (the port was free a moment ago).
async fn closed_port_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}/api/core/connection")
}

#[tokio::test]
async fn several_provider_urls_are_tried_in_turn() {
    let mut a = Mock::start().await;
    let mut b = Mock::start().await;
    // Both "nodes" accept the same identity token (one cluster, one store).
    let identity = a.provision();
    b.state.lock().unwrap().identities.insert(identity.clone());
    let dead = closed_port_url().await;
    let client = Client::builder_multi([dead.clone(), a.provider_url()], &identity)
        .fallback_url(b.provider_url())
        .backoff(fast_backoff())
        .token_refresh(None)
        .build()
        .unwrap();
    assert_eq!(
        client.provider_urls(),
        [dead.clone(), a.provider_url(), b.provider_url()]
    );
    let (handle, mut events) = client.start();

    // The first URL refuses the TCP connection: the next one is tried.
    let event = wait_for(&mut events, |e| {
        matches!(e, Event::ConnectFailed(_) | Event::Connected { .. })
    })
    .await;
    assert!(
        matches!(event, Event::ConnectFailed(Error::Http(_))),
        "{event:?}"
    );
    let conn_a = a.accepted().await;
    wait_for(&mut events, |e| matches!(e, Event::Connected { .. })).await;

    // A lost connection moves on to the next URL too.
    conn_a.close(1011, "node failing");
    let conn_b = b.accepted().await;
    wait_for(&mut events, |e| matches!(e, Event::Connected { .. })).await;
    assert_eq!(a.exchanges().len(), 1);
    assert_eq!(b.exchanges().len(), 1);

    // And round robin: after B, the dead URL again, then A.
    conn_b.close(1011, "node failing");
    wait_for(&mut events, |e| matches!(e, Event::ConnectFailed(_))).await;
    let _conn_a2 = a.accepted().await;
    wait_for(&mut events, |e| matches!(e, Event::Connected { .. })).await;
    handle.stop("test").await.unwrap();
}

#[tokio::test]
async fn an_empty_provider_url_list_is_a_configuration_error() {
    let err = Client::builder_multi(Vec::<String>::new(), "a.b.c")
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
}
