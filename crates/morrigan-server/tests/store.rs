//! The store backends behind the same trait: the heartbeat batch, token consumption and node
//! reaping on SQLite and (with `MORRIGAN_TEST_POSTGRES_URL`) on a fresh PostgreSQL database.

use std::sync::Arc;

use morrigan_protocol::records::ConnectionRecord;
use morrigan_server::store::postgres::PgStore;
use morrigan_server::store::sqlite::SqliteStore;
use morrigan_server::store::{CloseInfo, Heartbeat, NodeRow, Store};

fn pending(id: &str, token: &str) -> ConnectionRecord {
    ConnectionRecord {
        id: id.into(),
        client_id: "dev".into(),
        server_id: None,
        token_id: token.into(),
        client_address: None,
        connected: None,
        alive: false,
        open: true,
        last_heartbeat: None,
        disconnected: None,
        report_url: "http://127.0.0.1/api/core/connection/connect".into(),
        created: "2026-01-01T00:00:00.000Z".into(),
        close_code: None,
        close_reason: None,
    }
}

async fn exercise(store: Arc<dyn Store>) {
    let far = "2999-01-01T00:00:00.000Z";
    // 450 connections: many heartbeat chunks (32 each).
    for i in 0..450 {
        store
            .insert_connection(&pending(&format!("c{i}"), &format!("t{i}")), far)
            .await
            .expect("insert");
        let accepted = store
            .accept_connection(
                &format!("c{i}"),
                &format!("t{i}"),
                "node-1",
                "127.0.0.1",
                "2026-01-01T00:00:01.000Z",
            )
            .await
            .expect("accept");
        assert!(accepted.is_some());
    }
    // Single use: the same token again is refused.
    let again = store
        .accept_connection(
            "c0",
            "t0",
            "node-1",
            "127.0.0.1",
            "2026-01-01T00:00:02.000Z",
        )
        .await
        .expect("accept again");
    assert!(again.is_none());

    let beats: Vec<Heartbeat> = (0..450)
        .map(|i| Heartbeat {
            connection_id: format!("c{i}"),
            alive: i % 2 == 0,
            last_heartbeat: (i % 3 != 0).then(|| format!("2026-01-01T00:01:{:02}.000Z", i % 60)),
        })
        .collect();
    store.record_heartbeats(&beats).await.expect("heartbeats");
    for i in [0usize, 1, 2, 31, 32, 33, 449] {
        let r = store
            .connection(&format!("c{i}"))
            .await
            .expect("read")
            .expect("record");
        assert_eq!(r.alive, i % 2 == 0, "alive of c{i}");
        let expected = if i % 3 != 0 {
            format!("2026-01-01T00:01:{:02}.000Z", i % 60)
        } else {
            "2026-01-01T00:00:01.000Z".to_string()
        };
        assert_eq!(r.last_heartbeat.as_deref(), Some(expected.as_str()), "c{i}");
    }
    // Closed records take no heartbeat.
    store
        .close_connection(
            "c2",
            &CloseInfo {
                at: "2026-01-01T00:02:00.000Z",
                code: 1000,
                reason: "bye",
            },
        )
        .await
        .expect("close");
    store
        .record_heartbeats(&[Heartbeat {
            connection_id: "c2".into(),
            alive: true,
            last_heartbeat: Some("2026-01-01T00:03:00.000Z".into()),
        }])
        .await
        .expect("heartbeat after close");
    let c2 = store.connection("c2").await.expect("read").expect("c2");
    assert!(!c2.open && !c2.alive);

    // A lapsed lease is reaped once.
    let node = |id: &str, lease: &str| NodeRow {
        id: id.into(),
        public_url: "http://x".into(),
        version: "0".into(),
        started: "2026-01-01T00:00:00.000Z".into(),
        lease_expires: lease.into(),
        state: "running".into(),
    };
    store
        .register_node(&node("node-1", "2026-01-01T00:00:10.000Z"))
        .await
        .expect("node-1");
    store
        .register_node(&node("node-2", far))
        .await
        .expect("node-2");
    let now = "2026-01-01T00:05:00.000Z";
    let reaped = store.reap_nodes(now, "node-2").await.expect("reap");
    assert_eq!(reaped.len(), 1);
    assert!(
        store
            .reap_nodes(now, "node-2")
            .await
            .expect("reap again")
            .is_empty()
    );
    assert!(!store.renew_node("node-1", far).await.expect("renew lost"));
}

#[tokio::test]
async fn sqlite_store() {
    let store = SqliteStore::connect("sqlite::memory:")
        .await
        .expect("sqlite");
    exercise(Arc::new(store)).await;
}

#[tokio::test]
async fn postgres_store() {
    let Ok(base) = std::env::var("MORRIGAN_TEST_POSTGRES_URL") else {
        assert!(
            std::env::var("MORRIGAN_TEST_REQUIRE_SERVICES").is_err(),
            "MORRIGAN_TEST_POSTGRES_URL is required"
        );
        eprintln!("notice: MORRIGAN_TEST_POSTGRES_URL not set; skipping the PostgreSQL store test");
        return;
    };
    use sqlx::Connection;
    let name = format!("morrigan_store_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(&base).await.expect("connect");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .expect("create database");
    let mut url = reqwest::Url::parse(&base).expect("url");
    url.set_path(&format!("/{name}"));
    {
        let store = PgStore::connect(url.as_str()).await.expect("postgres");
        exercise(Arc::new(store.clone())).await;
        store.pool().close().await;
    }
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await;
}
