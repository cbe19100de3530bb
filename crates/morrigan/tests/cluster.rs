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

    // The device now runs the client library, with node A first in its list: it connects to A.
    drop(device);
    let state = tempfile::tempdir().expect("state dir");
    let urls: Vec<String> = [&a, &b, &c]
        .iter()
        .map(|n| format!("{}/api/core/connection", n.url))
        .collect();
    let client = morrigan_client::Client::builder_multi(urls, identity.clone())
        .state_dir(state.path())
        .backoff(morrigan_client::BackoffConfig {
            base: Duration::from_millis(100),
            cap: Duration::from_millis(500),
            ..Default::default()
        })
        .build()
        .expect("client");
    let (handle, mut events) = client.start();
    let id3 = connected(&mut events).await;
    assert_eq!(
        record(&http, &c, &user, &id3).await["serverId"],
        node_a.as_str()
    );

    // A is killed (-9): the survivors close its record and mark it lost.
    let mut a = a;
    a.kill9();
    // Closed by a survivor: by the lease reaper, or by the supersede of the device's new
    // connection on another node, whichever comes first.
    let mut closed = Value::Null;
    for _ in 0..150 {
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
    let reason = closed["closeReason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&node_a) || reason.starts_with("superseded"),
        "{closed}"
    );
    // The dead node is marked lost within the lease timeout (2 s here).
    let mut lost = Value::Null;
    for _ in 0..100 {
        let nodes: Value = http
            .get(format!("{}/api/core/node", c.url))
            .bearer_auth(&user)
            .send()
            .await
            .expect("nodes")
            .json()
            .await
            .expect("nodes body");
        lost = nodes
            .as_array()
            .expect("array")
            .iter()
            .find(|n| n["id"] == node_a.as_str())
            .cloned()
            .expect("node A listed");
        if lost["state"] == "lost" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(lost["state"], "lost");
    // A send to a connection of the dead node does not pretend success.
    assert_eq!(send(&http, &b, &user, &id3, &msg).await, 409);

    // The device reconnected by itself to another node, where sends reach it again.
    let id4 = connected(&mut events).await;
    let moved = record(&http, &c, &user, &id4).await;
    assert_ne!(moved["serverId"], node_a.as_str());
    assert_eq!(moved["open"], true);
    let hello = json!({"type": "agent.ping", "payload": "after failover"});
    assert_eq!(send(&http, &c, &user, &id4, &hello).await, 200);
    loop {
        match tokio::time::timeout(Duration::from_secs(15), events.recv()).await {
            Ok(Some(morrigan_client::Event::Message(m))) if m == hello => break,
            Ok(Some(_)) => continue,
            other => panic!("the message did not reach the device: {other:?}"),
        }
    }
    handle.stop("test").await.expect("graceful stop");
    drop(device2);
    drop((a, b, c));
    drop_database(&pg, &database).await;
}

/// Waits for the client's next `Connected` event and returns the connection id.
async fn connected(events: &mut morrigan_client::Events) -> String {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), events.recv()).await {
            Ok(Some(morrigan_client::Event::Connected { connection_id })) => {
                return connection_id.expect("connection id");
            }
            Ok(Some(morrigan_client::Event::Stopped(r))) => panic!("client stopped: {r:?}"),
            Ok(Some(_)) => continue,
            other => panic!("the client did not connect: {other:?}"),
        }
    }
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
