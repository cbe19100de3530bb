//! Test harness: real nodes on 127.0.0.1 with a temporary data directory, and the HTTP and
//! WebSocket helpers a device or an operator would use. No mocks: every helper goes through a
//! socket.
//!
//! Each node runs on its own Tokio runtime, so that a test can *crash* it (drop every task and
//! socket at once, without the graceful path) and start a new node on the same data directory.

#![allow(dead_code)]

pub mod events;
pub mod pg;
mod skip;
#[allow(unused_imports)]
pub use skip::{service_url, skip};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use morrigan_server::{AppState, Config, Server, TlsFiles};
use reqwest::Method;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

/// The admin password every test node is created with.
pub const ADMIN_PASSWORD: &str = "correct-horse-battery";
/// Upper bound for any single wait on the network (a hung server fails the test, never hangs it).
pub const WAIT: Duration = Duration::from_secs(10);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
/// What a WebSocket handshake returns.
pub type Handshake = Result<(Ws, Response<Option<Vec<u8>>>), tungstenite::Error>;

/// Where the connection token goes in the WebSocket handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// `Origin: <token>` (the original's devices).
    Origin,
    /// `Authorization: Bearer <token>`.
    Bearer,
    /// `Sec-WebSocket-Protocol: morrigan, morrigan.token.<token>` (browsers).
    Subprotocol,
}

/// Test defaults: short heartbeat and token lifetimes are set per test where they matter.
pub fn config(dir: PathBuf) -> Config {
    let mut c = Config::new(SocketAddr::from(([127, 0, 0, 1], 0)), dir);
    c.admin_password = Some(ADMIN_PASSWORD.to_string());
    c.shutdown_timeout = Duration::from_secs(5);
    c
}

/// A running node.
pub struct Node {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:<port>` or `https://...`.
    pub base: String,
    pub tls: bool,
    pub http: reqwest::Client,
    /// A user token of `admin` (every function).
    pub admin: String,
    state: Option<AppState>,
    dir: Option<TempDir>,
    root_pem: Option<String>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Node {
    /// A node with the test defaults.
    pub async fn start() -> Node {
        Self::start_with(|_| {}).await
    }

    /// A node whose config `tweak` adjusts.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Node {
        Self::start_in(TempDir::new().expect("temp dir"), tweak).await
    }

    /// A node on an existing data directory (a restart).
    pub async fn start_in(dir: TempDir, tweak: impl FnOnce(&mut Config)) -> Node {
        let mut c = config(dir.path().join("data"));
        tweak(&mut c);
        let root_pem = c
            .tls
            .as_ref()
            .map(|files| std::fs::read_to_string(&files.cert).expect("read cert"));
        let tls = c.tls.is_some();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("node runtime");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = rt.spawn(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let server = Server::builder(c)
                .listener(listener)
                .build()
                .await
                .expect("server starts");
            let _ = ready_tx.send((server.local_addr(), server.state().clone()));
            server
                .run(async {
                    let _ = rx.await;
                })
                .await;
        });
        let (addr, state) = tokio::time::timeout(WAIT, ready_rx)
            .await
            .expect("node started in time")
            .expect("node started");
        let scheme = if tls { "https" } else { "http" };
        let base = format!("{scheme}://{addr}");
        let mut http = reqwest::Client::builder().timeout(WAIT);
        if let Some(pem) = &root_pem {
            let cert = reqwest::Certificate::from_pem(pem.as_bytes()).expect("cert");
            http = http.tls_certs_only([cert]);
        }
        let mut node = Node {
            addr,
            base,
            tls,
            http: http.build().expect("http client"),
            admin: String::new(),
            state: Some(state),
            dir: Some(dir),
            root_pem,
            shutdown: Some(tx),
            task: Some(task),
            rt: Some(rt),
        };
        node.admin = node.login("admin", ADMIN_PASSWORD).await;
        node
    }

    /// The node's shared state (for [`morrigan_server::testing::upkeep_once`]).
    pub fn state(&self) -> &AppState {
        self.state.as_ref().expect("running node")
    }

    /// The node id (as `serverId` of the records it holds).
    pub fn node_id(&self) -> String {
        self.state().node_id().to_string()
    }

    /// Runs one round of the node's periodic upkeep on the node's runtime.
    pub async fn upkeep(&self) {
        let state = self.state().clone();
        let rt = self.rt.as_ref().expect("running node");
        rt.spawn(async move { morrigan_server::testing::upkeep_once(&state).await })
            .await
            .expect("upkeep task")
            .expect("upkeep");
    }

    /// The data directory of this node (`<tmp>/data`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.as_ref().expect("dir").path().join("data")
    }

    pub fn tmp(&self) -> &std::path::Path {
        self.dir.as_ref().expect("dir").path()
    }

    /// Graceful stop (what SIGTERM does); returns the temp dir for a restart.
    pub async fn stop(mut self) -> TempDir {
        self.state = None;
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("node stopped in time")
                .expect("node task");
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
        self.dir.take().expect("dir")
    }

    /// A crash: every task and socket of the node is dropped at once, nothing is written.
    pub fn crash(mut self) -> TempDir {
        self.state = None;
        // Dropping the shutdown sender would start a graceful stop: keep it until the runtime
        // (every task, socket and database handle of the node) is gone.
        let keep = self.shutdown.take();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
        drop(keep);
        self.dir.take().expect("dir")
    }

    // ----- REST -----

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Any request; the body is parsed as JSON (or returned as a JSON string if it is not JSON,
    /// or null if empty).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let res = req.send().await.expect("request sent");
        read(res).await
    }

    pub async fn get(&self, path: &str, token: &str) -> (u16, Value) {
        self.call(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: &Value) -> (u16, Value) {
        self.call(
            Method::POST,
            path,
            Some(token),
            Some(body.to_string().into_bytes()),
        )
        .await
    }

    pub async fn patch(&self, path: &str, token: &str, body: &Value) -> (u16, Value) {
        self.call(
            Method::PATCH,
            path,
            Some(token),
            Some(body.to_string().into_bytes()),
        )
        .await
    }

    pub async fn delete(&self, path: &str, token: &str) -> (u16, Value) {
        self.call(Method::DELETE, path, Some(token), None).await
    }

    /// `POST /api/auth` → `(status, body)`.
    pub async fn try_login(&self, name: &str, password: &str) -> (u16, Value) {
        self.call(
            Method::POST,
            "/api/auth",
            None,
            Some(
                json!({"name": name, "password": password})
                    .to_string()
                    .into_bytes(),
            ),
        )
        .await
    }

    /// Logs in and returns the user token.
    pub async fn login(&self, name: &str, password: &str) -> String {
        let (status, body) = self.try_login(name, password).await;
        assert_eq!(status, 200, "login as {name}: {body}");
        assert_eq!(body["state"], "success");
        body["token"].as_str().expect("token").to_string()
    }

    /// Creates an identity with `functions` and returns `(id, user token)`.
    pub async fn identity_with(&self, name: &str, functions: &[&str]) -> (String, String) {
        let password = format!("password-of-{name}");
        let body = json!({
            "name": name,
            "auth": {"type": "password", "password": password},
            "functions": functions,
        });
        let (status, body) = self.post("/api/auth/identity", &self.admin, &body).await;
        assert_eq!(status, 200, "create identity {name}: {body}");
        let id = body["identity"]["id"].as_str().expect("id").to_string();
        let token = self.login(name, &password).await;
        (id, token)
    }

    /// Provisions `client_id`; returns the identity token (the body is a JSON string literal).
    pub async fn provision(&self, client_id: &str) -> String {
        let res = self
            .http
            .post(self.url("/api/core/client/provision"))
            .bearer_auth(&self.admin)
            .json(&json!({"id": client_id}))
            .send()
            .await
            .expect("provision sent");
        assert_eq!(res.status().as_u16(), 200);
        let text = res.text().await.expect("body");
        assert!(
            text.starts_with('"') && text.ends_with('"'),
            "the identity token is a JSON string literal: {text}"
        );
        serde_json::from_str::<String>(&text).expect("JSON string")
    }

    /// `POST /api/core/connection` with the identity token raw in `Authorization`.
    pub async fn connection_token(&self, identity: &str) -> (u16, Value) {
        let res = self
            .http
            .post(self.url("/api/core/connection"))
            .header("authorization", identity)
            .send()
            .await
            .expect("token request sent");
        read(res).await
    }

    /// A connection token, asserting success.
    pub async fn token(&self, identity: &str) -> String {
        let (status, body) = self.connection_token(identity).await;
        assert_eq!(status, 200, "token exchange: {body}");
        assert_eq!(body["state"], "success");
        body["token"].as_str().expect("token").to_string()
    }

    /// The connection record `id` (asserting it exists).
    pub async fn record(&self, id: &str) -> Value {
        let (status, body) = self
            .get(&format!("/api/core/connection/{id}"), &self.admin)
            .await;
        assert_eq!(status, 200, "record {id}: {body}");
        body
    }

    /// Polls the record until `pred` holds (bounded by [`WAIT`]).
    pub async fn record_until(&self, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let r = self.record(id).await;
            if pred(&r) {
                return r;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "record {id} never became {what}: {r}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `POST /api/core/connection/:id/send`.
    pub async fn send(&self, id: &str, message: &Value) -> (u16, Value) {
        self.post(
            &format!("/api/core/connection/{id}/send"),
            &self.admin,
            message,
        )
        .await
    }

    // ----- WebSocket -----

    pub fn ws_url(&self) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        format!("{scheme}://{}/api/core/connection/connect", self.addr)
    }

    /// Opens the WebSocket with `token` presented as `how`.
    pub async fn ws_connect(&self, token: &str, how: How) -> Handshake {
        let mut req = self.ws_url().into_client_request().expect("request");
        let headers = req.headers_mut();
        match how {
            How::Origin => {
                headers.insert("origin", HeaderValue::from_str(token).expect("header"));
            }
            How::Bearer => {
                headers.insert(
                    "authorization",
                    HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
                );
            }
            How::Subprotocol => {
                headers.insert(
                    "sec-websocket-protocol",
                    HeaderValue::from_str(&format!("morrigan, morrigan.token.{token}"))
                        .expect("header"),
                );
            }
        }
        self.ws_request(req, None).await
    }

    /// Opens the WebSocket with a prepared request and an optional frame-size configuration.
    pub async fn ws_request(
        &self,
        req: tungstenite::handshake::client::Request,
        config: Option<tungstenite::protocol::WebSocketConfig>,
    ) -> Handshake {
        let connector = self
            .root_pem
            .as_ref()
            .map(|pem| Connector::Rustls(rustls_config(pem)));
        let (ws, res) = tokio::time::timeout(
            WAIT,
            tokio_tungstenite::connect_async_tls_with_config(req, config, true, connector),
        )
        .await
        .expect("handshake in time")?;
        Ok((ws, res))
    }

    /// Provisions `client_id` and connects it (token in `Origin`); returns the device after
    /// its `connection.state accepted` frame.
    pub async fn device(&self, client_id: &str) -> Device {
        let identity = self.provision(client_id).await;
        self.connect_device(client_id, &identity).await
    }

    /// Connects an already provisioned client.
    pub async fn connect_device(&self, client_id: &str, identity: &str) -> Device {
        let token = self.token(identity).await;
        let (mut ws, _) = self.ws_connect(&token, How::Origin).await.expect("connect");
        let first = next_json(&mut ws).await;
        assert_eq!(first["type"], "connection.state", "{first}");
        assert_eq!(first["state"], "accepted", "{first}");
        let id = first["connectionId"]
            .as_str()
            .expect("connectionId")
            .to_string();
        Device {
            client_id: client_id.to_string(),
            identity: identity.to_string(),
            id,
            ws,
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.state = None;
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// A connected device.
pub struct Device {
    pub client_id: String,
    pub identity: String,
    /// The connection id.
    pub id: String,
    pub ws: Ws,
}

impl Device {
    pub async fn send_json(&mut self, v: &Value) {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .expect("send");
    }

    pub async fn send_text(&mut self, t: &str) {
        self.ws
            .send(Message::Text(t.to_string().into()))
            .await
            .expect("send");
    }

    pub async fn next_json(&mut self) -> Value {
        next_json(&mut self.ws).await
    }

    pub async fn next_json_within(&mut self, wait: Duration) -> Value {
        next_json_within(&mut self.ws, wait).await
    }

    pub async fn next_close(&mut self) -> CloseFrame {
        next_close(&mut self.ws).await
    }

    /// Proves the socket is open and served both ways, by what a user sees: a `client.state`
    /// the device sends is handled (the client record shows it; a refusal would arrive as a
    /// `connection.error` frame and fail the next step), and an operator's send through
    /// `node` arrives on the socket, exactly as sent and before anything else.
    pub async fn assert_served(&mut self, node: &Node) {
        static PROBE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = PROBE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let state = format!("served-{n}");
        self.send_json(&json!({"type": "client.state", "state": state}))
            .await;
        let path = format!("/api/core/client/{}", self.client_id);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (status, client) = node.get(&path, &node.admin).await;
            assert_eq!(status, 200, "client {}: {client}", self.client_id);
            if client["state"] == state.as_str() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the client.state {state} of {} was not handled: {client}",
                self.client_id
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let message = json!({"type": "connection.served", "probe": n});
        let (status, body) = node.send(&self.id, &message).await;
        assert_eq!(status, 200, "send to {}: {body}", self.id);
        assert_eq!(
            self.next_json().await,
            message,
            "the operator's send arrives"
        );
    }
}

/// The response status and body (JSON, or a JSON string if not JSON, or null if empty).
pub async fn read(res: reqwest::Response) -> (u16, Value) {
    let status = res.status().as_u16();
    let bytes = res.bytes().await.expect("body");
    (status, parse_body(&bytes))
}

pub fn parse_body(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// The next text frame as JSON, skipping ping/pong frames; panics on close or after [`WAIT`].
/// Provisions `client_id` on the node at `base` (a URL, for nodes this harness did not start),
/// exchanges its identity token and connects it; returns the socket and the connection id.
pub async fn connect_at(
    http: &reqwest::Client,
    base: &str,
    user_token: &str,
    client_id: &str,
) -> (Ws, String) {
    let identity: String = http
        .post(format!("{base}/api/core/client/provision"))
        .bearer_auth(user_token)
        .json(&serde_json::json!({"id": client_id}))
        .send()
        .await
        .expect("provision")
        .json()
        .await
        .expect("identity token");
    let conn: Value = http
        .post(format!("{base}/api/core/connection"))
        .header("authorization", identity)
        .send()
        .await
        .expect("token exchange")
        .json()
        .await
        .expect("token body");
    let url = format!(
        "{}/api/core/connection/connect",
        base.replace("http://", "ws://")
    );
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
            .expect("request");
    let token = conn["token"].as_str().expect("connection token");
    req.headers_mut()
        .insert("origin", token.parse().expect("header value"));
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("connect");
    let first = next_json(&mut ws).await;
    let id = first["connectionId"]
        .as_str()
        .expect("connectionId")
        .to_string();
    (ws, id)
}

pub async fn next_json(ws: &mut Ws) -> Value {
    next_json_within(ws, WAIT).await
}

/// The next JSON text frame, waiting at most `wait` (for replies that follow a long burst).
pub async fn next_json_within(ws: &mut Ws, wait: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("a frame in time");
        match msg {
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str(t.as_str()).expect("a JSON text frame");
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(other)) => panic!("expected a text frame, got {other:?}"),
            Some(Err(e)) => panic!("socket error: {e}"),
            None => panic!("socket ended"),
        }
    }
}

/// Reads until the close frame; panics on a text frame, an error, or after [`WAIT`].
pub async fn next_close(ws: &mut Ws) -> CloseFrame {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("a close frame in time");
        match msg {
            Some(Ok(Message::Close(Some(frame)))) => {
                // Send the queued close reply now, as a device would, so the server is not left
                // waiting for it.
                let _ = ws.flush().await;
                return frame;
            }
            Some(Ok(Message::Close(None))) => panic!("close frame without a code"),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(other)) => panic!("expected a close frame, got {other:?}"),
            Some(Err(e)) => panic!("socket error before the close frame: {e}"),
            None => panic!("socket ended without a close frame"),
        }
    }
}

/// The status and JSON body of a refused WebSocket handshake.
pub fn refused(result: Handshake) -> (u16, Value) {
    match result {
        Ok(_) => panic!("the handshake was accepted"),
        Err(tungstenite::Error::Http(res)) => {
            let status = res.status().as_u16();
            let body = res.body().as_deref().map(parse_body).unwrap_or(Value::Null);
            (status, body)
        }
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
    }
}

/// The claims of a JWT (no verification: a device reads `reportUrl` this way).
pub fn claims(jwt: &str) -> Value {
    jwt_part(jwt, 1)
}

/// The header of a JWT.
pub fn jwt_header(jwt: &str) -> Value {
    jwt_part(jwt, 0)
}

fn jwt_part(jwt: &str, i: usize) -> Value {
    use base64::Engine;
    let part = jwt.split('.').nth(i).expect("JWT part");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("JSON")
}

/// A rustls client trusting only `pem`.
pub fn rustls_config(pem: &str) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(cert.expect("PEM cert")).expect("root");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// Generates a self-signed certificate for 127.0.0.1 and localhost into `dir`.
pub fn self_signed(dir: &std::path::Path) -> TlsFiles {
    let key = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
        .expect("certificate");
    let cert = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert, key.cert.pem()).expect("write cert");
    std::fs::write(&key_path, key.signing_key.serialize_pem()).expect("write key");
    TlsFiles {
        cert,
        key: key_path,
    }
}

/// Sleeps; used where a test must let wall-clock time pass (token expiry), never to assert
/// timing.
pub async fn pause(d: Duration) {
    tokio::time::sleep(d).await;
}
