//! Tracked messaging across a cluster: two nodes on one PostgreSQL database, with the
//! LISTEN/NOTIFY bus and with NATS. A device on node A is reached by client sends and calls
//! made on node B; when A crashes holding unacknowledged messages, the device reconnects to B
//! and gets each again (same id) until acknowledged, and nothing expired is delivered. Needs
//! `MORRIGAN_TEST_POSTGRES_URL` (and `MORRIGAN_TEST_NATS_URL`); without them the tests print a
//! notice and pass, unless `MORRIGAN_TEST_REQUIRE_SERVICES` is set.

mod common;

use std::time::Duration;

use common::pg::Database;
use common::{Node, service_url};
use serde_json::json;

async fn scenario(nats: Option<String>) {
    let Some(base) = service_url("MORRIGAN_TEST_POSTGRES_URL") else {
        return;
    };
    let db = Database::create(&base, "tracked").await;
    let start = || {
        let (url, nats) = (db.url.clone(), nats.clone());
        Node::start_with(move |c| {
            c.database_url = Some(url);
            if let Some(n) = nats {
                c.bus = morrigan_server::bus::BusConfig::Nats(n);
            }
        })
    };
    let a = start().await;
    let b = start().await;
    let identity = a.provision("dev").await;
    let mut device = a.connect_device("dev", &identity).await;

    // A call made on B reaches the device on A, and B hears the reply.
    let call_path = "/api/core/client/dev/send?track=reply&timeout=10";
    let ping = json!({"type": "agent.ping", "payload": {"n": 1}});
    let call = b.post(call_path, &b.admin, &ping);
    let device_side = async {
        let frame = device.next_json().await;
        assert_eq!(frame["payload"], json!({"n": 1}), "{frame}");
        let id = frame["messageId"].as_str().expect("messageId").to_string();
        device
            .send_json(
                &json!({"type": "connection.reply", "messageId": id, "payload": {"pong": 1}}),
            )
            .await;
    };
    let ((status, answer), ()) = tokio::join!(call, device_side);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["state"], "replied");
    assert_eq!(answer["reply"], json!({"pong": 1}));

    // Two tracked messages written through A and never acknowledged; one of them expires.
    let send = |query: &str, ty: &str| {
        let path = format!("/api/core/client/dev/send?{query}");
        let body = json!({"type": ty});
        let b = &b;
        async move {
            let (status, body) = b.post(&path, &b.admin, &body).await;
            assert_eq!(status, 202, "{body}");
            assert_eq!(body["state"], "written", "{body}");
            body["messageId"].as_str().expect("id").to_string()
        }
    };
    let kept = send("track=ack&ttl=600", "agent.kept").await;
    let short = send("track=ack&ttl=1", "agent.short").await;
    for id in [&kept, &short] {
        let frame = device.next_json().await;
        assert_eq!(frame["messageId"], id.as_str(), "{frame}");
    }
    // Acknowledged before the crash: never delivered again.
    let acked = send("track=ack&ttl=600", "agent.acked").await;
    let frame = device.next_json().await;
    assert_eq!(frame["messageId"], acked.as_str());
    device
        .send_json(&json!({"type": "connection.ack", "messageId": acked}))
        .await;
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        let (_, m) = b.get(&format!("/api/core/message/{acked}"), &b.admin).await;
        if m["message"]["state"] == "acked" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let _dir = a.crash();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut device = b.connect_device("dev", &identity).await;
    let frame = device.next_json().await;
    assert_eq!(frame["type"], "agent.kept", "{frame}");
    assert_eq!(frame["messageId"], kept.as_str(), "same id after the crash");
    device
        .send_json(&json!({"type": "connection.ack", "messageId": kept}))
        .await;
    // Nothing else arrives before the operator's next frame: the expired and the acked one
    // are not delivered.
    let (status, _) = b
        .post(
            "/api/core/client/dev/send",
            &b.admin,
            &json!({"type": "agent.marker"}),
        )
        .await;
    assert_eq!(status, 202);
    assert_eq!(device.next_json().await, json!({"type": "agent.marker"}));
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        let (_, m) = b.get(&format!("/api/core/message/{kept}"), &b.admin).await;
        if m["message"]["state"] == "acked" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.upkeep().await;
    let (_, m) = b.get(&format!("/api/core/message/{short}"), &b.admin).await;
    assert_eq!(m["message"]["state"], "expired", "{m}");
    drop(device);
    drop(b);
    db.drop_now().await;
}

#[tokio::test]
async fn tracked_messages_cross_the_postgres_bus_and_survive_a_crash() {
    scenario(None).await;
}

#[tokio::test]
async fn tracked_messages_cross_the_nats_bus_and_survive_a_crash() {
    let Some(nats) = service_url("MORRIGAN_TEST_NATS_URL") else {
        return;
    };
    scenario(Some(nats)).await;
}
