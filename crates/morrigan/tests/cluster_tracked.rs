//! Tracked messaging across `morrigan serve` processes on one fresh PostgreSQL database, for
//! each bus: a call made on node B reaches the device on node A; then A is killed (-9) while
//! it holds the device with two unacknowledged messages, and after the device reconnects to B
//! each is delivered again (same id) and reaches `acked`; the one acknowledged before the kill
//! is not delivered again. Needs `MORRIGAN_TEST_POSTGRES_URL` (and `MORRIGAN_TEST_NATS_URL`);
//! without them the tests print a notice and pass, unless `MORRIGAN_TEST_REQUIRE_SERVICES` is
//! set.

mod cluster_support;
mod harness;

use std::time::Duration;

use cluster_support::*;
use serde_json::{Value, json};

async fn post(
    http: &reqwest::Client,
    node: &Node,
    user: &str,
    path: &str,
    body: &Value,
) -> (u16, Value) {
    let r = http
        .post(format!("{}{path}", node.url))
        .bearer_auth(user)
        .json(body)
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn state_of(http: &reqwest::Client, node: &Node, user: &str, id: &str) -> Value {
    http.get(format!("{}/api/core/message/{id}", node.url))
        .bearer_auth(user)
        .send()
        .await
        .expect("get message")
        .json::<Value>()
        .await
        .expect("message body")["message"]["state"]
        .clone()
}

async fn scenario(nats: Option<String>) {
    let Some(pg) = service_url("MORRIGAN_TEST_POSTGRES_URL") else {
        return;
    };
    let database = fresh_database(&pg).await;
    let mut nodes = Node::start_many(2, &database, nats.as_deref(), &[]).await;
    let (b, mut a) = (nodes.pop().unwrap(), nodes.pop().unwrap());
    let http = http();
    let user = login(&http, &b).await;
    let identity = provision(&http, &b, &user, "tracked-device").await;
    let token = connection_token(&http, &a, &identity).await;
    let mut device = ws_connect(&a, &token).await.expect("connect to A");
    assert_eq!(
        next(&mut device).await.expect("accepted")["state"],
        "accepted"
    );

    // A call through B: the frame reaches the device on A, the reply reaches B's caller.
    let ping = json!({"type": "agent.ping", "payload": 7});
    let call = post(
        &http,
        &b,
        &user,
        "/api/core/client/tracked-device/send?track=reply&timeout=10",
        &ping,
    );
    let device_side = async {
        let frame = next(&mut device).await.expect("call frame");
        let id = frame["messageId"].as_str().expect("messageId").to_string();
        let reply = json!({"type": "connection.reply", "messageId": id, "payload": {"payload": 7}});
        use futures_util::SinkExt;
        device
            .send(tokio_tungstenite::tungstenite::Message::Text(
                reply.to_string().into(),
            ))
            .await
            .expect("reply");
    };
    let ((status, answer), ()) = tokio::join!(call, device_side);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["reply"], json!({"payload": 7}));

    // Three tracked messages written through A; the device acknowledges only the last.
    let mut ids = Vec::new();
    for n in 0..3 {
        let (status, body) = post(
            &http,
            &b,
            &user,
            "/api/core/client/tracked-device/send?track=ack&ttl=600",
            &json!({"type": "agent.job", "n": n}),
        )
        .await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["state"], "written", "{body}");
        ids.push(body["messageId"].as_str().expect("id").to_string());
        assert_eq!(next(&mut device).await.expect("job")["n"], n);
    }
    {
        use futures_util::SinkExt;
        let ack = json!({"type": "connection.ack", "messageId": ids[2]});
        device
            .send(tokio_tungstenite::tungstenite::Message::Text(
                ack.to_string().into(),
            ))
            .await
            .expect("ack");
    }
    eventually("the last job acked", Duration::from_secs(10), || async {
        (state_of(&http, &b, &user, &ids[2]).await == "acked").then_some(())
    })
    .await;

    a.kill9();
    drop(device);
    let token = connection_token(&http, &b, &identity).await;
    let mut device = ws_connect(&b, &token).await.expect("connect to B");
    assert_eq!(
        next(&mut device).await.expect("accepted")["state"],
        "accepted"
    );
    for (n, id) in ids[..2].iter().enumerate() {
        let frame = next(&mut device).await.expect("redelivered job");
        assert_eq!(frame["messageId"], id.as_str(), "{frame}");
        assert_eq!(frame["n"], n);
        use futures_util::SinkExt;
        let ack = json!({"type": "connection.ack", "messageId": id});
        device
            .send(tokio_tungstenite::tungstenite::Message::Text(
                ack.to_string().into(),
            ))
            .await
            .expect("ack");
    }
    for id in &ids[..2] {
        eventually(
            "a redelivered job acked",
            Duration::from_secs(10),
            || async { (state_of(&http, &b, &user, id).await == "acked").then_some(()) },
        )
        .await;
    }
    // Nothing else was queued: the operator's next frame is the next one the device reads.
    let (status, _) = post(
        &http,
        &b,
        &user,
        "/api/core/client/tracked-device/send",
        &json!({"type": "agent.marker"}),
    )
    .await;
    assert_eq!(status, 202);
    assert_eq!(
        next(&mut device).await.expect("marker"),
        json!({"type": "agent.marker"})
    );
    drop(device);
    drop(b);
    drop_database(&pg, &database).await;
}

#[tokio::test]
async fn tracked_messages_survive_a_killed_node_on_the_postgres_bus() {
    scenario(None).await;
}

#[tokio::test]
async fn tracked_messages_survive_a_killed_node_on_the_nats_bus() {
    let Some(nats) = service_url("MORRIGAN_TEST_NATS_URL") else {
        return;
    };
    scenario(Some(nats)).await;
}
