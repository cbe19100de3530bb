//! Shared by the cluster tests: `morrigan serve` processes on a fresh PostgreSQL database, and
//! what an operator and a device do against them over HTTP and WebSocket. Every node listens on
//! `127.0.0.1:0` and is found at the address its log names; every wait is bounded.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub use crate::harness::service_url;

pub const PASSWORD: &str = "cluster-admin-pw";
/// Bound on a node's start, generous: three nodes may start at once on a loaded 2-core machine
/// while another cluster test runs.
pub const START_WAIT: Duration = Duration::from_secs(90);
/// Bound on every HTTP call (a send may take 10 s to answer 504).
pub const HTTP_WAIT: Duration = Duration::from_secs(30);

/// An HTTP client whose every request is bounded by [`HTTP_WAIT`].
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(HTTP_WAIT)
        .build()
        .expect("http client")
}

/// Drops the run's database (after its nodes are gone).
pub async fn drop_database(base: &str, database: &str) {
    use sqlx::Connection;
    let Some(name) = database.rsplit('/').next() else {
        return;
    };
    if let Ok(mut conn) = sqlx::PgConnection::connect(base).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut conn)
        .await;
    }
}

/// Creates a fresh database for this run and returns its URL.
pub async fn fresh_database(base: &str) -> String {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(base)
        .await
        .expect("connect to PostgreSQL");
    let name = format!("morrigan_test_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create database");
    let mut url = reqwest::Url::parse(base).expect("database URL");
    url.set_path(&format!("/{name}"));
    url.to_string()
}

pub struct Node {
    pub child: Child,
    pub url: String,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Node {
    pub async fn start(database: &str, nats: Option<&str>) -> Node {
        Self::start_with(database, nats, &[]).await
    }

    /// A node with extra `morrigan serve` arguments (`--node-lease` and `--heartbeat-interval`
    /// there replace the test defaults).
    pub async fn start_with(database: &str, nats: Option<&str>, extra: &[&str]) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("node.log");
        let out = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_morrigan"));
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--database-url", database])
            .env("MORRIGAN_ADMIN_PASSWORD", PASSWORD)
            .env("MORRIGAN_LOG", "info,sqlx=warn")
            .env_remove("MORRIGAN_NATS_URL")
            .stdout(Stdio::null())
            .stderr(out);
        if let Some(n) = nats {
            cmd.args(["--nats-url", n]);
        }
        // Defaults for a test cluster, unless `extra` sets them.
        for (flag, value) in [("--node-lease", "2"), ("--heartbeat-interval", "5")] {
            if !extra.contains(&flag) {
                cmd.args([flag, value]);
            }
        }
        cmd.args(extra);
        let mut child = cmd.spawn().expect("spawn morrigan serve");
        let deadline = tokio::time::Instant::now() + START_WAIT;
        let addr = crate::harness::wait_serving(
            &log,
            || child.try_wait().ok().flatten().map(|s| s.to_string()),
            START_WAIT,
        )
        .await;
        let mut node = Node {
            child,
            url: format!("http://{addr}"),
            log,
            _dir: dir,
        };
        let http = http();
        loop {
            if let Ok(r) = http.get(format!("{}/healthz", node.url)).send().await
                && r.status().is_success()
            {
                return node;
            }
            if let Ok(Some(status)) = node.child.try_wait() {
                panic!("node exited ({status}): {}", node.log_text());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node did not become healthy within {START_WAIT:?}: {}",
                node.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `n` nodes started at once (each waits for its own start, bounded).
    pub async fn start_many(
        n: usize,
        database: &str,
        nats: Option<&str>,
        extra: &[&str],
    ) -> Vec<Node> {
        futures_util::future::join_all((0..n).map(|_| Self::start_with(database, nats, extra)))
            .await
    }

    /// Sends `sig` (e.g. `-STOP`, `-CONT`) to the node's process.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill {sig}");
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls `check` every 100 ms until it gives `Some`, at most `within`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET /api/core/node` on `node`: every node of the cluster.
pub async fn nodes(http: &reqwest::Client, node: &Node, user: &str) -> Vec<Value> {
    let list: Value = http
        .get(format!("{}/api/core/node", node.url))
        .bearer_auth(user)
        .send()
        .await
        .expect("nodes")
        .json()
        .await
        .expect("nodes body");
    list.as_array().expect("an array of nodes").clone()
}

pub async fn login(http: &reqwest::Client, node: &Node) -> String {
    let r: Value = http
        .post(format!("{}/api/auth", node.url))
        .json(&json!({"name": "admin", "password": PASSWORD}))
        .send()
        .await
        .expect("login")
        .json()
        .await
        .expect("login body");
    r["token"].as_str().expect("token").to_string()
}

pub async fn provision(http: &reqwest::Client, node: &Node, user: &str, id: &str) -> String {
    let r: Value = http
        .post(format!("{}/api/core/client/provision", node.url))
        .bearer_auth(user)
        .json(&json!({"id": id}))
        .send()
        .await
        .expect("provision")
        .json()
        .await
        .expect("provision body");
    r.as_str().expect("identity token").to_string()
}

pub async fn connection_token(http: &reqwest::Client, node: &Node, identity: &str) -> String {
    let r: Value = http
        .post(format!("{}/api/core/connection", node.url))
        .header("Authorization", identity)
        .send()
        .await
        .expect("token exchange")
        .json()
        .await
        .expect("token body");
    r["token"].as_str().expect("connection token").to_string()
}

pub fn claims(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("jwt payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64");
    serde_json::from_slice(&bytes).expect("claims")
}

/// Opens the WebSocket at `node`'s connect URL with `token` in Origin.
pub async fn ws_connect(
    node: &Node,
    token: &str,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    ws_connect_at(&node.url, token).await
}

/// [`ws_connect`] to the node at `base` (its `http://` URL).
pub async fn ws_connect_at(
    base: &str,
    token: &str,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let url = format!(
        "{}/api/core/connection/connect",
        base.replace("http://", "ws://")
    );
    let mut req = url.into_client_request()?;
    req.headers_mut()
        .insert("Origin", token.parse().expect("header value"));
    let (ws, _) = tokio::time::timeout(HTTP_WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("the WebSocket handshake answered in time")?;
    Ok(ws)
}

/// The next JSON text frame, or the close frame's code (skipping pings).
pub async fn next(ws: &mut Ws) -> Result<Value, u16> {
    loop {
        match tokio::time::timeout(Duration::from_secs(15), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                return Ok(serde_json::from_str(&t).expect("json frame"));
            }
            Ok(Some(Ok(Message::Close(f)))) => {
                return Err(f.map(|f| u16::from(f.code)).unwrap_or(1005));
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_))) | Ok(None) => return Err(1006),
            Err(_) => panic!("no frame within 15 s"),
        }
    }
}

pub async fn record(http: &reqwest::Client, node: &Node, user: &str, id: &str) -> Value {
    http.get(format!("{}/api/core/connection/{id}", node.url))
        .bearer_auth(user)
        .send()
        .await
        .expect("get record")
        .json()
        .await
        .expect("record body")
}

pub async fn send(http: &reqwest::Client, node: &Node, user: &str, id: &str, body: &Value) -> u16 {
    http.post(format!("{}/api/core/connection/{id}/send", node.url))
        .bearer_auth(user)
        .json(body)
        .send()
        .await
        .expect("send")
        .status()
        .as_u16()
}
