//! REST answers on their success and failure paths: the node list and its authorization,
//! `/healthz` while the node stops, the dashboard's security headers, and what every kind of
//! request answers while the store is down (503 JSON, nothing carried out later).

mod common;

use std::path::Path;
use std::time::Duration;

use common::{How, Node, WAIT};
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::Connection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The error body every refusal carries.
fn assert_error(body: &Value, state: &str) {
    assert_eq!(body["state"], state, "{body}");
    assert_eq!(body["status"], "failed", "{body}");
    assert!(
        body["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{body}"
    );
}

fn is_timestamp(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|s| morrigan_protocol::time_format::parse(s).is_ok() && s.ends_with('Z'))
}

#[tokio::test]
async fn the_node_list_needs_a_user_token_with_api() {
    let node = Node::start().await;

    let (status, body) = node.get("/api/core/node", &node.admin).await;
    assert_eq!(status, 200, "{body}");
    let nodes = body.as_array().expect("an array of nodes");
    assert_eq!(nodes.len(), 1, "{body}");
    let me = &nodes[0];
    assert_eq!(me["id"], node.node_id(), "{me}");
    assert_eq!(me["state"], "running", "{me}");
    assert_eq!(me["publicUrl"], node.base, "{me}");
    assert_eq!(me["version"], env!("CARGO_PKG_VERSION"), "{me}");
    assert!(
        is_timestamp(&me["started"]) && is_timestamp(&me["leaseExpires"]),
        "{me}"
    );
    assert!(
        me["leaseExpires"].as_str() > me["started"].as_str(),
        "the lease runs past the start: {me}"
    );

    // An identity holding `api` (and nothing else) may read it too.
    let (_, reader) = node.identity_with("reader", &["api"]).await;
    let (status, body) = node.get("/api/core/node", &reader).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.as_array().map(Vec::len), Some(1), "{body}");

    // No token, a forged one, a device's identity token: 401 with the error body.
    let (status, body) = node.call(Method::GET, "/api/core/node", None, None).await;
    assert_eq!(status, 401, "{body}");
    assert_error(&body, "authenticationfailed");
    let (status, body) = node.get("/api/core/node", "x.y.z").await;
    assert_eq!(status, 401, "{body}");
    assert_error(&body, "authenticationfailed");
    let identity = node.provision("not-an-operator").await;
    let (status, body) = node.get("/api/core/node", &identity).await;
    assert_eq!(status, 401, "{body}");
    assert_error(&body, "authenticationfailed");

    // A valid user token without `api`: 403 naming the function.
    let (_, outsider) = node.identity_with("outsider", &["connection.send"]).await;
    let (status, body) = node.get("/api/core/node", &outsider).await;
    assert_eq!(status, 403, "{body}");
    assert_error(&body, "forbidden");
    assert!(
        body["reason"].as_str().unwrap_or("").contains("'api'"),
        "{body}"
    );
}

#[tokio::test]
async fn the_dashboard_is_served_with_its_security_headers() {
    let node = Node::start().await;
    for (path, kind) in [
        ("/dashboard", "text/html"),
        ("/dashboard/app.js", "text/javascript"),
        ("/dashboard/app.css", "text/css"),
    ] {
        let res = node.http.get(node.url(path)).send().await.expect("request");
        assert_eq!(res.status().as_u16(), 200, "{path}");
        let h = res.headers().clone();
        let header = |name: &str| {
            h.get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_else(|| panic!("{path}: no {name} header"))
                .to_string()
        };
        assert!(header("content-type").starts_with(kind), "{path}: {h:?}");
        assert_eq!(header("x-content-type-options"), "nosniff", "{path}");
        assert_eq!(header("referrer-policy"), "no-referrer", "{path}");
        // Only the dashboard's own files and API: no inline script, no framing, no other origin.
        let csp = header("content-security-policy");
        let directives: Vec<&str> = csp.split(';').map(str::trim).collect();
        for expected in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
            "base-uri 'none'",
            "form-action 'self'",
        ] {
            assert!(directives.contains(&expected), "{path}: {csp}");
        }
        assert!(
            !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval") && !csp.contains('*'),
            "{path}: {csp}"
        );
        let body = res.text().await.expect("body");
        assert!(!body.is_empty(), "{path}");
        if path == "/dashboard" {
            // The page loads what the policy allows: its own script, no inline one.
            assert!(body.contains("app.js"), "the page loads its script");
            assert!(
                !body.contains("<script>") && !body.contains("onclick="),
                "inline script would be blocked by the policy"
            );
        }
    }

    // Any other file: the JSON 404, not a page.
    for path in [
        "/dashboard/other.js",
        "/dashboard/index.htm",
        "/dashboard/..%2fapp.js",
    ] {
        let (status, body) = node.call(Method::GET, path, None, None).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_error(&body, "notFound");
    }
}

/// One response read off a raw keep-alive connection: status and JSON body.
async fn read_response(s: &mut TcpStream) -> Option<(u16, Value)> {
    let deadline = Instant::now() + WAIT;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .expect("a response in time")
        {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("a content-length");
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .expect("the body in time")
            .expect("read");
        assert!(n > 0, "connection closed mid-body");
        body.extend_from_slice(&chunk[..n]);
    }
    Some((status, common::parse_body(&body[..length])))
}

#[tokio::test]
async fn healthz_answers_503_while_the_node_stops() {
    let node = Node::start_with(|c| c.shutdown_timeout = Duration::from_secs(6)).await;
    let addr = node.addr;
    // A device that will not answer the close frame keeps the stop busy for a while: long
    // enough to ask /healthz on a connection opened before the stop.
    let silent = node.device("silent").await;

    let mut s = TcpStream::connect(addr).await.expect("connect");
    let request = b"GET /healthz HTTP/1.1\r\nHost: node\r\n\r\n";
    s.write_all(request).await.expect("write");
    let (status, body) = read_response(&mut s).await.expect("an answer");
    assert_eq!((status, body), (200, json!({"status": "ok"})));

    let stopping = tokio::spawn(node.stop());
    let deadline = Instant::now() + WAIT;
    let answer = loop {
        s.write_all(request)
            .await
            .expect("the connection stays open");
        match read_response(&mut s).await {
            Some((200, _)) => {
                assert!(Instant::now() < deadline, "/healthz never said stopping");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Some(other) => break other,
            None => panic!("the connection closed before /healthz said stopping"),
        }
    };
    assert_eq!(answer, (503, json!({"status": "stopping"})));
    // New connections are no longer accepted meanwhile.
    let refused = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect answered in time");
    assert!(refused.is_err(), "a stopping node accepted a connection");

    tokio::time::timeout(Duration::from_secs(20), stopping)
        .await
        .expect("the node stops in time")
        .expect("stop task");
    drop(silent);
}

/// The node's SQLite database, write-locked by a connection of the test's own (SQLite's WAL
/// mode still serves reads meanwhile).
struct Lock {
    conn: sqlx::SqliteConnection,
}

impl Lock {
    async fn take(db: &Path) -> Lock {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(db)
            .busy_timeout(WAIT);
        let mut conn = sqlx::SqliteConnection::connect_with(&options)
            .await
            .expect("open the node's database");
        sqlx::query("BEGIN EXCLUSIVE")
            .execute(&mut conn)
            .await
            .expect("lock the database");
        Lock { conn }
    }

    async fn release(mut self) {
        sqlx::query("ROLLBACK")
            .execute(&mut self.conn)
            .await
            .expect("unlock the database");
        let _ = self.conn.close().await;
    }
}

/// The store deadline of the store-down test, and the slack a loaded machine may add to it.
const STORE_TIMEOUT: Duration = Duration::from_secs(2);
const SLACK: Duration = Duration::from_secs(6);

/// Runs `call`, asserting it answers within the store deadline (plus slack).
async fn within_deadline<T>(what: &str, call: impl std::future::Future<Output = T>) -> T {
    let started = Instant::now();
    let out = call.await;
    assert!(
        started.elapsed() < STORE_TIMEOUT + SLACK,
        "{what} took {:?} while the store was down",
        started.elapsed()
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_store_is_down_writes_answer_503_and_live_sockets_go_on() {
    let node = Node::start_with(|c| c.store_timeout = STORE_TIMEOUT).await;
    let mut device = node.device("live").await;
    let waiting = node.provision("waiting").await;
    let unused_token = node.token(&waiting).await;

    let lock = Lock::take(&node.data_dir().join("morrigan.db")).await;

    // Writes: provisioning, a token exchange, an upgrade (its accept), a login.
    let (status, body) = within_deadline(
        "provisioning",
        node.post(
            "/api/core/client/provision",
            &node.admin,
            &json!({"id": "new"}),
        ),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_error(&body, "unavailable");
    let (status, body) = within_deadline("a token exchange", node.connection_token(&waiting)).await;
    assert_eq!(status, 503, "{body}");
    assert_error(&body, "unavailable");
    let refused = within_deadline("an upgrade", node.ws_connect(&unused_token, How::Origin)).await;
    let (status, body) = common::refused(refused);
    assert_eq!(status, 503, "{body}");
    assert_error(&body, "unavailable");
    let (status, body) =
        within_deadline("a login", node.try_login("admin", common::ADMIN_PASSWORD)).await;
    assert_eq!(status, 503, "{body}");
    assert_error(&body, "unavailable");

    // Reads are still served (WAL), and so is the live socket: a REST send reaches it, and a
    // message whose handler cannot store answers handlerFailed, the socket staying open.
    let (status, body) = node.get("/api/core/client/live", &node.admin).await;
    assert_eq!(status, 200, "{body}");
    let ping = json!({"type": "agent.ping", "payload": "during the outage"});
    let (status, body) = node.send(&device.id, &ping).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(device.next_json().await, ping);
    device
        .send_json(&json!({"type": "client.state", "state": "unstored"}))
        .await;
    let reply = within_deadline("a client.state", device.next_json()).await;
    assert_eq!(reply["type"], "connection.error", "{reply}");
    assert_eq!(reply["error"], "handlerFailed", "{reply}");
    assert_eq!(reply["messageType"], "client.state", "{reply}");

    lock.release().await;

    // Nothing answered 503 was carried out later: the client was not provisioned, the unused
    // token was not consumed (it still opens its one socket), the state was not stored.
    let (status, body) = node.get("/api/core/client/new", &node.admin).await;
    assert_eq!(status, 404, "{body}");
    let (mut ws, _) = node
        .ws_connect(&unused_token, How::Origin)
        .await
        .expect("the token refused during the outage still opens its socket");
    let first = common::next_json(&mut ws).await;
    assert_eq!(first["state"], "accepted", "{first}");
    let (_, client) = node.get("/api/core/client/live", &node.admin).await;
    assert_ne!(client["state"], "unstored", "{client}");

    // And the same requests succeed again, without a restart.
    let (status, body) = node
        .post(
            "/api/core/client/provision",
            &node.admin,
            &json!({"id": "new"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = node.connection_token(&waiting).await;
    assert_eq!(status, 200, "{body}");
    device
        .send_json(&json!({"type": "client.state", "state": "stored"}))
        .await;
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, client) = node.get("/api/core/client/live", &node.admin).await;
        if client["state"] == "stored" {
            break;
        }
        assert!(Instant::now() < deadline, "state never stored: {client}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
