//! The connection event stream across real cluster buses: two nodes on one PostgreSQL database,
//! with the LISTEN/NOTIFY bus and with NATS. A subscriber on one node sees the other node's
//! events. Needs `MORRIGAN_TEST_POSTGRES_URL` (and `MORRIGAN_TEST_NATS_URL`); without them the
//! tests print a notice and pass, unless `MORRIGAN_TEST_REQUIRE_SERVICES` is set.

mod common;

use std::time::Duration;

use serde_json::{Value, json};

use common::service_url;

/// Starts a node on the test runtime; returns its base URL, id and stop handle.
async fn start(
    db: &str,
    nats: Option<&str>,
    dir: std::path::PathBuf,
) -> (
    String,
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let mut c = common::config(dir);
    c.database_url = Some(db.to_string());
    if let Some(n) = nats {
        c.bus = morrigan_server::bus::BusConfig::Nats(n.to_string());
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = morrigan_server::Server::builder(c)
        .listener(listener)
        .build()
        .await
        .expect("node starts");
    let base = format!("http://{}", server.local_addr());
    let id = server.state().node_id().to_string();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    (base, id, tx, task)
}

async fn scenario(nats: Option<String>) {
    let Some(pg) = service_url("MORRIGAN_TEST_POSTGRES_URL") else {
        return;
    };
    let database = common::pg::Database::create(&pg, "events").await;
    let db = database.url.clone();
    let dir = tempfile::TempDir::new().unwrap();
    let (a, a_id, stop_a, task_a) = start(&db, nats.as_deref(), dir.path().join("a")).await;
    let (b, _, stop_b, task_b) = start(&db, nats.as_deref(), dir.path().join("b")).await;
    let http = reqwest::Client::builder()
        .timeout(common::WAIT)
        .build()
        .unwrap();
    let login = |base: &str| {
        let req = http
            .post(format!("{base}/api/auth"))
            .json(&json!({"name": "admin", "password": common::ADMIN_PASSWORD}));
        async move {
            let v: Value = req.send().await.unwrap().json().await.unwrap();
            v["token"].as_str().unwrap().to_string()
        }
    };
    let token_a = login(&a).await;
    let token_b = login(&b).await;

    // Subscribe on B.
    let mut stream = reqwest::Client::new()
        .get(format!("{b}/api/core/connection/events"))
        .bearer_auth(&token_b)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status().as_u16(), 200);
    let mut buf = String::new();

    // A device connects to A and is closed there.
    let (_ws, id) = common::connect_at(&http, &a, &token_a, "bus-device").await;
    let status = http
        .delete(format!("{a}/api/core/connection/{id}?reason=bus-test"))
        .bearer_auth(&token_a)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 200);

    // B's subscriber sees both, from node A.
    let mut seen: Vec<Value> = Vec::new();
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while !seen.iter().any(|e| e["type"] == "disconnected") {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let chunk = tokio::time::timeout(left, stream.chunk())
            .await
            .unwrap_or_else(|_| panic!("events in time; saw {seen:?}"))
            .unwrap()
            .expect("stream open");
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            for line in block.lines() {
                if let Some(data) = line.strip_prefix("data:") {
                    let v: Value = serde_json::from_str(data.trim()).unwrap();
                    if v["connectionId"] == id.as_str() {
                        seen.push(v);
                    }
                }
            }
        }
    }
    assert_eq!(seen[0]["type"], "connected", "{seen:?}");
    assert_eq!(seen[0]["node"], a_id);
    let gone = seen.iter().find(|e| e["type"] == "disconnected").unwrap();
    assert_eq!(gone["code"], 4000);
    assert_eq!(gone["reason"], "bus-test");

    drop(stream);
    let _ = stop_a.send(());
    let _ = stop_b.send(());
    let _ = tokio::time::timeout(Duration::from_secs(15), task_a).await;
    let _ = tokio::time::timeout(Duration::from_secs(15), task_b).await;
    database.drop_now().await;
}

#[tokio::test]
async fn events_cross_the_postgres_bus() {
    scenario(None).await;
}

#[tokio::test]
async fn events_cross_the_nats_bus() {
    let Some(nats) = service_url("MORRIGAN_TEST_NATS_URL") else {
        return;
    };
    scenario(Some(nats)).await;
}
