//! The SDK's tests run against a real Morrigan node, in process: `morrigan_server::Server` on a
//! temporary data directory, listening on 127.0.0.1:0, driven through its REST API as an
//! operator would (log in as `admin`, provision clients, send, close, deprovision). No mocks:
//! what the SDK sees is what a device sees.
//!
//! Each node runs on a Tokio runtime of its own, so that a test's own work never starves it.
//! Besides the node: a [`Recorder`] provider (what the device sent, as the server received it),
//! a TCP [`Proxy`] (a load balancer that can switch nodes or stall), and a private CA for TLS.
//! Adapted from the server crate's tests/common (not shared: that harness is not a library).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use morrigan_client::{BackoffConfig, Event, Events};
use morrigan_server::bus::local::LocalBus;
use morrigan_server::hooks::Hooks;
use morrigan_server::providers::{HandlerError, MessageContext, Provider};
use morrigan_server::{Config, Server, TlsFiles};
use reqwest::Method;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, watch};

/// The admin password of every test node.
pub const ADMIN_PASSWORD: &str = "correct-horse-battery";
/// Upper bound for any single wait (a hung server or client fails the test, never hangs it).
pub const WAIT: Duration = Duration::from_secs(10);

/// How to start a node: its configuration plus what an embedder adds.
pub struct Setup {
    pub config: Config,
    pub providers: Vec<Arc<dyn Provider>>,
    pub hooks: Vec<Arc<dyn Hooks>>,
    /// Joins an in-process cluster (with a shared `config.database_url`).
    pub bus: Option<Arc<LocalBus>>,
    /// The CA the node's certificate chains to (with `config.tls`).
    pub root_ca_pem: Option<String>,
}

impl Setup {
    /// Test defaults on `data_dir`; `admin` gets [`ADMIN_PASSWORD`].
    pub fn new(data_dir: PathBuf) -> Self {
        let mut config = Config::new(SocketAddr::from(([127, 0, 0, 1], 0)), data_dir);
        config.admin_password = Some(ADMIN_PASSWORD.to_string());
        config.shutdown_timeout = Duration::from_secs(5);
        Self {
            config,
            providers: Vec::new(),
            hooks: Vec::new(),
            bus: None,
            root_ca_pem: None,
        }
    }
}

/// A running node.
pub struct Node {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:<port>` (or `https://`).
    pub base: String,
    pub node_id: String,
    pub http: reqwest::Client,
    /// A user token of `admin` (every function).
    pub admin: String,
    _dir: Option<TempDir>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Node {
    /// A node with the test defaults.
    pub async fn start() -> Node {
        Self::start_with(|_| {}).await
    }

    /// A node on a fresh data directory, `adjust` changing its setup.
    pub async fn start_with(adjust: impl FnOnce(&mut Setup)) -> Node {
        let dir = TempDir::new().expect("temp dir");
        let mut setup = Setup::new(dir.path().join("data"));
        adjust(&mut setup);
        Self::launch(setup, Some(dir)).await
    }

    /// Starts a node from `setup`; `dir` (if any) lives as long as the node.
    pub async fn launch(setup: Setup, dir: Option<TempDir>) -> Node {
        let Setup {
            config,
            providers,
            hooks,
            bus,
            root_ca_pem,
        } = setup;
        let tls = config.tls.is_some();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("node runtime");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = rt.spawn(async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let mut builder = Server::builder(config).listener(listener);
            for provider in providers {
                builder = builder.provider(provider);
            }
            for hook in hooks {
                builder = builder.hook(hook);
            }
            if let Some(bus) = bus {
                builder = builder.local_bus(bus);
            }
            let server = builder.build().await.expect("server starts");
            let _ = ready_tx.send((server.local_addr(), server.state().node_id().to_string()));
            server
                .run(async {
                    let _ = rx.await;
                })
                .await;
        });
        let (addr, node_id) = tokio::time::timeout(WAIT, ready_rx)
            .await
            .expect("node started in time")
            .expect("node started");
        let scheme = if tls { "https" } else { "http" };
        let mut http = reqwest::Client::builder().timeout(WAIT);
        if let Some(pem) = &root_ca_pem {
            let cert = reqwest::Certificate::from_pem(pem.as_bytes()).expect("CA certificate");
            http = http.tls_certs_only([cert]);
        }
        let mut node = Node {
            addr,
            base: format!("{scheme}://{addr}"),
            node_id,
            http: http.build().expect("HTTP client"),
            admin: String::new(),
            _dir: dir,
            shutdown: Some(tx),
            task: Some(task),
            rt: Some(rt),
        };
        let (status, body) = node
            .call(
                Method::POST,
                "/api/auth",
                None,
                Some(json!({"name": "admin", "password": ADMIN_PASSWORD})),
            )
            .await;
        assert_eq!(status, 200, "admin login: {body}");
        node.admin = body["token"].as_str().expect("user token").to_string();
        node
    }

    /// Stops the node gracefully (what SIGTERM does: every socket gets 1001).
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("node stopped in time")
                .expect("node task");
        }
    }

    /// The provider URL a device is given.
    pub fn provider_url(&self) -> String {
        self.url("/api/core/connection")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Any request as `token` (or none); the body parsed as JSON (a JSON string if it is not
    /// JSON, null if empty).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.expect("request sent");
        let status = res.status().as_u16();
        let bytes = res.bytes().await.expect("body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        (status, body)
    }

    /// `GET` as admin.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call(Method::GET, path, Some(&self.admin), None).await
    }

    /// Polls `GET path` (as admin) until `pred` holds for the body of a 200 (bounded by
    /// [`WAIT`]); returns that body.
    pub async fn get_until(&self, path: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (status, body) = self.get(path).await;
            if status == 200 && pred(&body) {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{path} never showed {what}: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Provisions `client_id`; returns the response body as received: the identity token as a
    /// JSON string literal, quotes included.
    pub async fn provision_body(&self, client_id: &str) -> String {
        let res = self
            .http
            .post(self.url("/api/core/client/provision"))
            .bearer_auth(&self.admin)
            .json(&json!({"id": client_id}))
            .send()
            .await
            .expect("provision sent");
        assert_eq!(res.status().as_u16(), 200, "provision {client_id}");
        res.text().await.expect("body")
    }

    /// Provisions `client_id`; returns the bare identity token.
    pub async fn provision(&self, client_id: &str) -> String {
        let body = self.provision_body(client_id).await;
        serde_json::from_str(&body).expect("a JSON string")
    }

    /// `POST /api/core/connection` with `identity` (raw in `Authorization`).
    pub async fn exchange(&self, identity: &str) -> (u16, Value) {
        let res = self
            .http
            .post(self.provider_url())
            .header("authorization", identity)
            .send()
            .await
            .expect("exchange sent");
        let status = res.status().as_u16();
        (status, res.json().await.expect("JSON body"))
    }

    /// The connection record `id`.
    pub async fn record(&self, id: &str) -> Value {
        let (status, body) = self.get(&format!("/api/core/connection/{id}")).await;
        assert_eq!(status, 200, "record {id}: {body}");
        body
    }

    /// Polls record `id` until `pred` holds.
    pub async fn record_until(&self, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.get_until(&format!("/api/core/connection/{id}"), what, pred)
            .await
    }

    /// Every connection record of `client_id` (newest first).
    pub async fn records_of(&self, client_id: &str) -> Vec<Value> {
        let (status, body) = self
            .get(&format!("/api/core/connection?clientId={client_id}"))
            .await;
        assert_eq!(status, 200, "{body}");
        body.as_array().expect("an array").clone()
    }

    /// `POST /api/core/connection/:id/send`, asserting it was written.
    pub async fn send(&self, id: &str, message: Value) {
        let (status, body) = self
            .call(
                Method::POST,
                &format!("/api/core/connection/{id}/send"),
                Some(&self.admin),
                Some(message),
            )
            .await;
        assert_eq!(status, 200, "send to {id}: {body}");
    }

    /// `DELETE /api/core/connection/:id?reason=` (close 4000).
    pub async fn close_connection(&self, id: &str, reason: &str) {
        let (status, body) = self
            .call(
                Method::DELETE,
                &format!("/api/core/connection/{id}?reason={reason}"),
                Some(&self.admin),
                None,
            )
            .await;
        assert_eq!(status, 200, "close {id}: {body}");
    }

    /// `DELETE /api/core/client/:id` (revokes its tokens, closes its sockets with 4003).
    pub async fn deprovision(&self, client_id: &str) {
        let (status, body) = self
            .call(
                Method::DELETE,
                &format!("/api/core/client/{client_id}"),
                Some(&self.admin),
                None,
            )
            .await;
        assert_eq!(status, 200, "deprovision {client_id}: {body}");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Two nodes of one in-process cluster: one SQLite database, one in-process bus. Each node's
/// setup is adjusted by `adjust` (also for `config.public_url`, say).
pub async fn cluster(adjust: impl Fn(&mut Setup)) -> (Node, Node, TempDir) {
    let dir = TempDir::new().expect("temp dir");
    let db = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("cluster.db").display()
    );
    let bus = LocalBus::new();
    let mut nodes = Vec::new();
    for name in ["a", "b"] {
        let mut setup = Setup::new(dir.path().join(name));
        setup.config.database_url = Some(db.clone());
        setup.bus = Some(bus.clone());
        adjust(&mut setup);
        nodes.push(Node::launch(setup, None).await);
    }
    let b = nodes.pop().expect("b");
    let a = nodes.pop().expect("a");
    (a, b, dir)
}

// ----- what the server received -----

/// One message a device sent to a [`Recorder`] provider.
#[derive(Debug, Clone)]
pub struct Received {
    pub connection_id: String,
    pub client_id: String,
    /// The whole message, `type` included.
    pub body: Value,
}

/// A provider that records every message of its `type` prefix and answers nothing.
pub struct Recorder {
    name: String,
    tx: mpsc::UnboundedSender<Received>,
}

#[async_trait]
impl Provider for Recorder {
    fn name(&self) -> &str {
        &self.name
    }
    fn messages(&self) -> Vec<String> {
        Vec::new()
    }
    async fn handle(
        &self,
        ctx: &MessageContext,
        _message: &str,
        body: Value,
    ) -> Result<Option<Value>, HandlerError> {
        let _ = self.tx.send(Received {
            connection_id: ctx.connection_id.to_string(),
            client_id: ctx.client_id.to_string(),
            body,
        });
        Ok(None)
    }
}

/// What the recorders of a node received.
pub struct Inbox {
    rx: mpsc::UnboundedReceiver<Received>,
}

impl Inbox {
    /// The next message received.
    pub async fn next(&mut self) -> Received {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("a message reached the server in time")
            .expect("recorder alive")
    }
}

/// Recorders for the given providers (register them with [`Setup::providers`]).
pub fn recorders(names: &[&str]) -> (Vec<Arc<dyn Provider>>, Inbox) {
    let (tx, rx) = mpsc::unbounded_channel();
    let providers = names
        .iter()
        .map(|name| {
            Arc::new(Recorder {
                name: (*name).to_string(),
                tx: tx.clone(),
            }) as Arc<dyn Provider>
        })
        .collect();
    (providers, Inbox { rx })
}

// ----- the network between device and node -----

/// A TCP proxy on 127.0.0.1: a load balancer in front of one node at a time. New connections go
/// to the current target (none at first: they are dropped); [`freeze`](Self::freeze) stops forwarding in both directions (a
/// stalled path: sockets open, nothing arrives).
pub struct Proxy {
    pub addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    frozen: Arc<watch::Sender<bool>>,
    /// Bumped by [`cut`](Self::cut): every connection forwarded before ends.
    cuts: Arc<watch::Sender<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let target = Arc::new(Mutex::new(None));
        let frozen = Arc::new(watch::channel(false).0);
        let cuts = Arc::new(watch::channel(0u64).0);
        let task = {
            let (target, frozen, cuts) = (target.clone(), frozen.clone(), cuts.clone());
            tokio::spawn(async move {
                // Owned here, so that dropping the proxy ends every connection it forwards.
                let mut connections = tokio::task::JoinSet::new();
                while let Ok((inbound, _)) = listener.accept().await {
                    let to = *target.lock().expect("target");
                    let frozen = frozen.clone();
                    let mut cut = cuts.subscribe();
                    connections.spawn(async move {
                        let Some(to) = to else { return };
                        let Ok(outbound) = tokio::net::TcpStream::connect(to).await else {
                            return;
                        };
                        let (in_read, in_write) = inbound.into_split();
                        let (out_read, out_write) = outbound.into_split();
                        let forward = async {
                            tokio::join!(
                                pump(in_read, out_write, frozen.subscribe()),
                                pump(out_read, in_write, frozen.subscribe()),
                            )
                        };
                        // The cut first: bytes held by a freeze are dropped with the sockets,
                        // never forwarded by the thaw that comes with the cut.
                        tokio::select! {
                            biased;
                            _ = cut.changed() => {}
                            _ = forward => {}
                        }
                    });
                    while connections.try_join_next().is_some() {}
                }
            })
        };
        Proxy {
            addr,
            target,
            frozen,
            cuts,
            task,
        }
    }

    /// `http://<proxy>`.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// New connections go to `to` (existing ones stay where they are).
    pub fn retarget(&self, to: SocketAddr) {
        *self.target.lock().expect("target") = Some(to);
    }

    /// Stops forwarding anything, in both directions, on every connection.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Ends every connection forwarded so far (both sockets closed, whatever a freeze held
    /// dropped) and forwards again: a network failure both ends see as a lost connection.
    pub fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
        self.frozen.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut frozen: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// A provider URL on 127.0.0.1 whose "server" accepts TCP connections and drops them at once:
/// every attempt fails, and the port stays reserved while the returned task runs.
pub async fn dead_url() -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let task = tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            drop(socket);
        }
    });
    (format!("http://{addr}/api/core/connection"), task)
}

/// A private CA and, in `dir`, a certificate chain for 127.0.0.1 signed by it (with its key):
/// `(CA PEM, files for the node)`.
pub fn private_ca(dir: &Path) -> (String, TlsFiles) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key"))
        .expect("CA certificate");
    let key = KeyPair::generate().expect("key");
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .expect("leaf params")
        .signed_by(&key, &ca)
        .expect("leaf certificate");
    let cert = dir.join("chain.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert, format!("{}{}", leaf.pem(), ca.pem())).expect("write chain");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    (
        ca.pem(),
        TlsFiles {
            cert,
            key: key_path,
        },
    )
}

// ----- the device side -----

/// Fast reconnects for tests.
pub fn fast_backoff() -> BackoffConfig {
    BackoffConfig {
        base: Duration::from_millis(20),
        cap: Duration::from_millis(200),
        stable_after: Duration::from_secs(30),
        going_away_spread: Duration::from_millis(100),
    }
}

/// The next event.
pub async fn next_event(events: &mut Events) -> Event {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("an event in time")
        .expect("events until stopped")
}

/// The next event matching `pred`, skipping others.
pub async fn wait_for(events: &mut Events, pred: impl Fn(&Event) -> bool) -> Event {
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

/// The id of the next `Connected` event.
pub async fn connected(events: &mut Events) -> String {
    match wait_for(events, |e| matches!(e, Event::Connected { .. })).await {
        Event::Connected {
            connection_id: Some(id),
        } => id,
        other => panic!("connected without an id: {other:?}"),
    }
}

/// Every event up to and including `Stopped`, then checks the subscription ends.
pub async fn until_stopped(events: &mut Events) -> Vec<Event> {
    let mut seen = Vec::new();
    loop {
        let event = next_event(events).await;
        let stopped = matches!(event, Event::Stopped(_));
        seen.push(event);
        if stopped {
            break;
        }
    }
    let end = tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("the subscription ends");
    assert!(end.is_none(), "an event after Stopped: {end:?}");
    seen
}

/// The claims of a JWT, unverified.
pub fn claims(jwt: &str) -> Value {
    let part = jwt.split('.').nth(1).expect("JWT payload");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("JSON")
}

/// An unsigned JWT (what a scripted server hands out; a real one refuses it).
pub fn unsigned_jwt(payload: &Value) -> String {
    let enc = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.c2ln",
        enc(&json!({"alg": "EdDSA", "typ": "JWT"})),
        enc(payload)
    )
}
