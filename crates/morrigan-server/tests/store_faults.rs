//! Records never lie after a store fault: closes and heartbeats written while the store is
//! unreachable land once it is back, every store call answers within the store deadline, and a
//! node recovers without a restart.
//!
//! SQLite: the test holds the node's database write lock (`BEGIN EXCLUSIVE` on its own
//! connection) for longer than SQLite's busy timeout. PostgreSQL (with
//! `MORRIGAN_TEST_POSTGRES_URL`): a database of the test's own refuses connections
//! (`ALLOW_CONNECTIONS false` and every session terminated) for a few seconds.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{ADMIN_PASSWORD, Device, Node, WAIT};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use sqlx::Connection;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// How long the test holds the database lock: well past the store deadline (5 s by default;
/// SQLite's busy timeout is half of it), so that every write meanwhile fails.
const OUTAGE: Duration = Duration::from_secs(12);
/// A store call answers within the store deadline (5 s by default); this adds slack for a
/// loaded machine.
const ANSWER_BOUND: Duration = Duration::from_secs(8);
/// The heartbeat interval of the heartbeat test.
const PING: Duration = Duration::from_secs(10);
/// After the store is back, every record is true within this (the retries back off to 2 s).
const HEAL_BOUND: Duration = Duration::from_secs(8);

/// The node's SQLite database, write-locked by a connection of the test's own.
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

/// The device closes its socket with 1000 and waits for the server's close reply.
async fn hang_up(device: &mut Device, reason: &str) {
    device
        .ws
        .close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: reason.to_string().into(),
        }))
        .await
        .expect("send close");
    let deadline = Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, device.ws.next()).await {
            Err(_) => panic!("no close reply in time"),
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return,
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// A REST call with a client that waits longer than the node could take, and how long it took.
async fn timed(node: &Node, path: &str, body: Value) -> (u16, Value, Duration) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("http client");
    let started = Instant::now();
    let res = http
        .post(node.url(path))
        .json(&body)
        .send()
        .await
        .expect("request sent");
    let (status, body) = common::read(res).await;
    (status, body, started.elapsed())
}

/// Polls the record until `pred` holds, for at most `bound`.
async fn record_within(
    node: &Node,
    id: &str,
    bound: Duration,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + bound;
    loop {
        let (status, r) = node
            .get(&format!("/api/core/connection/{id}"), &node.admin)
            .await;
        if status == 200 && pred(&r) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "record {id} did not become {what} within {bound:?} of the store's return: {r}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn closed_with(r: &Value, code: u16, reason: &str) -> bool {
    r["open"] == false
        && r["alive"] == false
        && r["closeCode"] == code
        && r["closeReason"] == reason
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closes_written_while_sqlite_is_locked_land_after_the_lock() {
    let node = Node::start().await;
    let mut devices = Vec::new();
    for i in 0..3 {
        devices.push(node.device(&format!("locked-{i}")).await);
    }

    let lock = Lock::take(&node.data_dir().join("morrigan.db")).await;
    let locked_at = Instant::now();
    for d in &mut devices {
        hang_up(d, "bye").await;
    }
    // Meanwhile a write (a login records its token) answers 503 within the store deadline.
    let (status, body, took) = timed(
        &node,
        "/api/auth",
        serde_json::json!({"name": "admin", "password": ADMIN_PASSWORD}),
    )
    .await;
    tokio::time::sleep_until(locked_at + OUTAGE).await;
    lock.release().await;

    for d in &devices {
        record_within(&node, &d.id, HEAL_BOUND, "closed (1000, bye)", |r| {
            closed_with(r, 1000, "bye")
        })
        .await;
    }
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "failed", "{body}");
    assert!(
        took < ANSWER_BOUND,
        "the login took {took:?} while the store was locked"
    );
    // The node serves new connections without a restart.
    let mut after = node.device("after-the-lock").await;
    after.assert_served(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_flushed_while_sqlite_is_locked_land_after_the_lock() {
    // Pings every 10 s. The device answers the first one while the store is locked, then reads
    // nothing more: no later pong can bring the record up to date, and the node marks it
    // `alive:false` only after 2.5 silent intervals (30 s after the connect).
    let node = Node::start_with(|c| c.heartbeat_interval = PING).await;
    let device = node.device("beating").await;
    let connected = Instant::now();
    let id = device.id.clone();
    let mut ws = device.ws;

    tokio::time::sleep_until(connected + PING - Duration::from_secs(1)).await;
    let lock = Lock::take(&node.data_dir().join("morrigan.db")).await;
    let locked_at = Instant::now();
    let lock_started = morrigan_protocol::time_format::now();
    loop {
        match tokio::time::timeout_at(locked_at + WAIT, ws.next()).await {
            Err(_) => panic!("no ping while the store was locked"),
            Ok(Some(Ok(Message::Ping(_)))) => break,
            Ok(Some(Ok(_))) => continue,
            Ok(other) => panic!("socket ended: {other:?}"),
        }
    }
    // Reading the ping queued the pong; this sends it.
    ws.flush().await.expect("pong sent");
    // Longer than the flush period plus the store deadline: the flush that carries this pong
    // fails.
    tokio::time::sleep_until(locked_at + Duration::from_secs(14)).await;
    lock.release().await;

    let r = record_within(&node, &id, Duration::from_secs(5), "up to date", |r| {
        r["open"] == true
            && r["alive"] == true
            && r["lastHeartbeat"]
                .as_str()
                .is_some_and(|t| t >= lock_started.as_str())
    })
    .await;
    assert!(r["closeCode"].is_null(), "{r}");
    drop(ws);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_still_waiting_at_shutdown_is_written_before_the_node_stops() {
    let node = Node::start().await;
    let mut device = node.device("stopping").await;
    let db = node.data_dir().join("morrigan.db");

    let lock = Lock::take(&db).await;
    let locked_at = Instant::now();
    hang_up(&mut device, "bye").await;
    // Stop the node while the store is still locked, then let the store come back during
    // the shutdown.
    tokio::time::sleep_until(locked_at + OUTAGE - Duration::from_secs(1)).await;
    let stopping = tokio::spawn(node.stop());
    tokio::time::sleep_until(locked_at + OUTAGE).await;
    lock.release().await;
    let dir = stopping.await.expect("node stopped");

    // The record as the stopped node left it (no restart, whose recovery would close it).
    let mut conn = sqlx::SqliteConnection::connect_with(
        &sqlx::sqlite::SqliteConnectOptions::new().filename(dir.path().join("data/morrigan.db")),
    )
    .await
    .expect("open the database");
    let (open, code, reason): (bool, Option<i64>, Option<String>) =
        sqlx::query_as("SELECT open, close_code, close_reason FROM connections WHERE id = $1")
            .bind(&device.id)
            .fetch_one(&mut conn)
            .await
            .expect("the record");
    assert_eq!(
        (open, code, reason.as_deref()),
        (false, Some(1000), Some("bye"))
    );
}

fn postgres_url() -> Option<String> {
    common::service_url("MORRIGAN_TEST_POSTGRES_URL")
}

/// Runs `sql` on the server at `base` (the maintenance database).
async fn admin_sql(base: &str, sql: String) {
    let mut conn = sqlx::PgConnection::connect(base)
        .await
        .expect("connect to PostgreSQL");
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(&mut conn)
        .await
        .expect("admin statement");
    let _ = conn.close().await;
}

/// How many sessions the database `name` has.
async fn sessions(base: &str, name: &str) -> i64 {
    let mut conn = sqlx::PgConnection::connect(base)
        .await
        .expect("connect to PostgreSQL");
    let n = sqlx::query_scalar("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = $1")
        .bind(name)
        .fetch_one(&mut conn)
        .await
        .expect("count sessions");
    let _ = conn.close().await;
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closes_written_while_postgres_refuses_connections_land_after_it() {
    let Some(pg) = postgres_url() else { return };
    let name = format!("morrigan_faults_{}", uuid::Uuid::new_v4().simple());
    admin_sql(&pg, format!("CREATE DATABASE {name}")).await;
    let mut url = url::Url::parse(&pg).expect("database URL");
    url.set_path(&format!("/{name}"));
    let db = url.to_string();

    let node = Node::start_with(|c| {
        c.database_url = Some(db.clone());
        c.bus = morrigan_server::bus::BusConfig::Local;
    })
    .await;
    let mut devices = Vec::new();
    for i in 0..3 {
        devices.push(node.device(&format!("refused-{i}")).await);
    }

    admin_sql(
        &pg,
        format!("ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false"),
    )
    .await;
    admin_sql(
        &pg,
        format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = '{name}' AND pid <> pg_backend_pid()"
        ),
    )
    .await;
    // Termination is asynchronous: wait until the node has no session left.
    let deadline = Instant::now() + WAIT;
    while sessions(&pg, &name).await > 0 {
        assert!(
            Instant::now() < deadline,
            "the node's sessions outlived pg_terminate_backend"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for d in &mut devices {
        hang_up(d, "bye").await;
    }
    // Meanwhile requests answer 503 within the store deadline.
    let (status, body, took) = timed(
        &node,
        "/api/auth",
        serde_json::json!({"name": "admin", "password": ADMIN_PASSWORD}),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(took < ANSWER_BOUND, "the login took {took:?}");
    // The sessions have written (or failed to write) their records by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    admin_sql(
        &pg,
        format!("ALTER DATABASE {name} WITH ALLOW_CONNECTIONS true"),
    )
    .await;

    for d in &devices {
        record_within(&node, &d.id, HEAL_BOUND, "closed (1000, bye)", |r| {
            closed_with(r, 1000, "bye")
        })
        .await;
    }
    let mut after = node.device("after-the-refusal").await;
    after.assert_served(&node).await;

    drop(node);
    if let Ok(mut conn) = sqlx::PgConnection::connect(&pg).await {
        let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
        let _ = sqlx::query(sqlx::AssertSqlSafe(drop))
            .execute(&mut conn)
            .await;
    }
}
