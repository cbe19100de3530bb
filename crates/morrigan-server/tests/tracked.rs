//! Tracked messaging over real sockets: acknowledged and answered sends, refusals, timeouts,
//! the offline outbox (queued, delivered after `accepted`, redelivered after a lost
//! connection, expired, bounded, kept across a restart, failed by deprovisioning), idempotent
//! retries and uplink messages. The outbox scenarios run on SQLite and on PostgreSQL.

mod common;

use std::time::Duration;

use common::pg::Database;
use common::{Device, Node, service_url};
use serde_json::{Value, json};

fn send_path(conn: &str, query: &str) -> String {
    format!("/api/core/connection/{conn}/send?{query}")
}

fn client_send_path(client: &str, query: &str) -> String {
    format!("/api/core/client/{client}/send?{query}")
}

async fn message(node: &Node, id: &str) -> Value {
    let (status, body) = node
        .get(&format!("/api/core/message/{id}"), &node.admin)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "success", "{body}");
    body["message"].clone()
}

/// Polls message `id` until its state is `state`.
async fn message_until(node: &Node, id: &str, state: &str) -> Value {
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        let m = message(node, id).await;
        if m["state"] == state {
            return m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "message {id} never reached {state}: {m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads the next frame, checks it carries a message id and the body's fields, and returns
/// the id.
async fn tracked_frame(device: &mut Device, expect_type: &str) -> (String, Value) {
    let frame = device.next_json().await;
    assert_eq!(frame["type"], expect_type, "{frame}");
    let id = frame["messageId"]
        .as_str()
        .unwrap_or_else(|| panic!("no messageId in {frame}"))
        .to_string();
    (id, frame)
}

#[tokio::test]
async fn an_acked_send_answers_once_the_device_acknowledges() {
    let node = Node::start().await;
    let mut device = node.device("dev").await;
    let path = send_path(&device.id, "track=ack&timeout=10");
    let body = json!({"type": "agent.run", "payload": {"cmd": "ls"}});
    let request = node.post(&path, &node.admin, &body);
    let device_side = async {
        let (id, frame) = tracked_frame(&mut device, "agent.run").await;
        assert_eq!(frame["payload"], json!({"cmd": "ls"}));
        device
            .send_json(&json!({"type": "connection.ack", "messageId": id}))
            .await;
        id
    };
    let ((status, answer), id) = tokio::join!(request, device_side);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "success");
    assert_eq!(answer["state"], "acked");
    assert_eq!(answer["messageId"], id);
    let m = message(&node, &id).await;
    assert_eq!(m["state"], "acked", "{m}");
    assert_eq!(m["track"], "ack");
    assert_eq!(m["clientId"], "dev");
    assert_eq!(m["connectionId"], device.id);
    assert_eq!(m["body"], body);
    for at in ["created", "written", "acked"] {
        assert!(m[at].is_string(), "{at} missing: {m}");
    }
    // A repeated ack is accepted silently (at least once); an unknown id is an error.
    device
        .send_json(&json!({"type": "connection.ack", "messageId": id}))
        .await;
    device
        .send_json(&json!({"type": "connection.ack", "messageId": "not-sent"}))
        .await;
    let err = device.next_json().await;
    assert_eq!(err["type"], "connection.error", "{err}");
    assert_eq!(err["error"], "unknownMessageId", "{err}");
    device.assert_served(&node).await;
}

#[tokio::test]
async fn a_reply_carries_the_payload_and_a_nack_its_reason() {
    let node = Node::start().await;
    let mut device = node.device("dev").await;
    let path = send_path(&device.id, "track=reply");
    let ping = json!({"type": "agent.ping"});
    let request = node.post(&path, &node.admin, &ping);
    let device_side = async {
        let (id, _) = tracked_frame(&mut device, "agent.ping").await;
        device
            .send_json(&json!({"type": "connection.reply", "messageId": id, "payload": {"up": 42}}))
            .await;
    };
    let ((status, answer), ()) = tokio::join!(request, device_side);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["state"], "replied");
    assert_eq!(answer["reply"], json!({"up": 42}));
    let id = answer["messageId"].as_str().expect("id").to_string();
    let m = message(&node, &id).await;
    assert_eq!(m["reply"], json!({"up": 42}));
    assert!(m["acked"].is_string() && m["replied"].is_string(), "{m}");

    let reboot = json!({"type": "agent.reboot"});
    let request = node.post(&path, &node.admin, &reboot);
    let device_side = async {
        let (id, _) = tracked_frame(&mut device, "agent.reboot").await;
        device
            .send_json(&json!({"type": "connection.nack", "messageId": id, "reason": "busy"}))
            .await;
    };
    let ((status, answer), ()) = tokio::join!(request, device_side);
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["status"], "failed");
    assert_eq!(answer["state"], "rejected");
    assert_eq!(answer["reason"], "busy");
}

#[tokio::test]
async fn no_answer_in_time_is_504_and_the_message_keeps_its_state() {
    let node = Node::start().await;
    let mut device = node.device("dev").await;
    let path = send_path(&device.id, "track=ack&timeout=1");
    let (status, answer) = node
        .post(&path, &node.admin, &json!({"type": "agent.slow"}))
        .await;
    assert_eq!(status, 504, "{answer}");
    assert_eq!(answer["state"], "timeout");
    let id = answer["messageId"].as_str().expect("id").to_string();
    let (frame_id, _) = tracked_frame(&mut device, "agent.slow").await;
    assert_eq!(frame_id, id);
    assert_eq!(message(&node, &id).await["state"], "written");
    // A late ack still lands.
    device
        .send_json(&json!({"type": "connection.ack", "messageId": id}))
        .await;
    message_until(&node, &id, "acked").await;

    // Bad options are refused before anything is sent.
    for query in ["track=maybe", "track=ack&timeout=301", "track=ack&ttl=5"] {
        let (status, body) = node
            .post(
                &send_path(&device.id, query),
                &node.admin,
                &json!({"type": "a.b"}),
            )
            .await;
        assert_eq!(status, 400, "{query}: {body}");
    }
    let (status, body) = node
        .post(
            &send_path(&device.id, "track=ack"),
            &node.admin,
            &json!({"type": "a.b", "messageId": "mine"}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = node
        .post(
            &send_path("nope", "track=ack"),
            &node.admin,
            &json!({"type": "a.b"}),
        )
        .await;
    assert_eq!(status, 404);
}

/// An operator who leaves before the device answers (before the frame's deferred `written`
/// mark) still leaves the message recorded as written, and the late answer lands on it.
#[tokio::test]
async fn a_send_whose_operator_left_is_still_recorded() {
    let node = Node::start().await;
    let mut device = node.device("dev").await;
    let request = node
        .http
        .post(format!(
            "{}{}",
            node.base,
            send_path(&device.id, "track=ack&timeout=30")
        ))
        .bearer_auth(&node.admin)
        .json(&json!({"type": "agent.slow"}))
        .send();
    let operator = tokio::spawn(request);
    let (id, _) = tracked_frame(&mut device, "agent.slow").await;
    operator.abort();
    let _ = operator.await;
    message_until(&node, &id, "written").await;
    device
        .send_json(&json!({"type": "connection.ack", "messageId": id}))
        .await;
    let m = message_until(&node, &id, "acked").await;
    assert!(m["written"].is_string() && m["acked"].is_string(), "{m}");
}

/// A device that loses its socket right after a tracked frame, before the frame's `written`
/// mark, and connects again at once gets the message again, same id, on its next connection;
/// its ack there answers the operator who was waiting all along.
#[tokio::test]
async fn a_frame_lost_with_its_socket_is_redelivered_and_answers_the_waiting_operator() {
    let node = Node::start().await;
    let device = node.device("dev").await;
    let (identity, conn) = (device.identity.clone(), device.id.clone());
    let request = node
        .http
        .post(format!(
            "{}{}",
            node.base,
            send_path(&conn, "track=ack&timeout=30")
        ))
        .bearer_auth(&node.admin)
        .json(&json!({"type": "agent.job"}))
        .send();
    let operator = tokio::spawn(request);
    let mut device = device;
    let (id, _) = tracked_frame(&mut device, "agent.job").await;
    drop(device);
    let mut device = node.connect_device("dev", &identity).await;
    let (again, _) = tracked_frame(&mut device, "agent.job").await;
    assert_eq!(again, id, "redelivered with the same id");
    device
        .send_json(&json!({"type": "connection.ack", "messageId": id}))
        .await;
    let answer = operator.await.expect("joined").expect("answered");
    assert_eq!(answer.status(), 200);
    let body: Value = answer.json().await.expect("json");
    assert_eq!(
        (&body["messageId"], &body["state"]),
        (&json!(id), &json!("acked")),
        "{body}"
    );
}

/// Client sends on `node`: online, offline, queued and delivered after `accepted`, redelivered
/// after a connection lost unanswered, expired, bounded, idempotent, failed by deprovisioning.
async fn outbox_scenario(node: &Node) {
    let identity = node.provision("dev").await;
    // Offline without a ttl: refused, nothing recorded.
    let (status, body) = node
        .post(
            &client_send_path("dev", "track=ack"),
            &node.admin,
            &json!({"type": "agent.x"}),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["state"], "offline", "{body}");
    let (status, _) = node
        .post(
            &client_send_path("ghost", "ttl=60"),
            &node.admin,
            &json!({"type": "agent.x"}),
        )
        .await;
    assert_eq!(status, 404);

    // Offline with a ttl: queued, in order.
    let mut queued = Vec::new();
    for n in 0..3 {
        let (status, body) = node
            .post(
                &client_send_path("dev", "track=ack&ttl=600"),
                &node.admin,
                &json!({"type": "agent.job", "n": n}),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["status"], "accepted");
        assert_eq!(body["state"], "queued");
        queued.push(body["messageId"].as_str().expect("id").to_string());
    }
    // An idempotent retry returns the first message.
    let keyed = |key: &'static str| {
        node.http
            .post(node.url(&client_send_path("dev", "ttl=600")))
            .bearer_auth(&node.admin)
            .header("idempotency-key", key)
            .body(json!({"type": "agent.once"}).to_string())
    };
    let first: Value = keyed("k1")
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let again: Value = keyed("k1")
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(first["messageId"], again["messageId"], "{first} {again}");
    // A short-lived one expires before the device connects.
    let (status, short) = node
        .post(
            &client_send_path("dev", "track=ack&ttl=1"),
            &node.admin,
            &json!({"type": "agent.short"}),
        )
        .await;
    assert_eq!(status, 202, "{short}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    node.upkeep().await;
    let short_id = short["messageId"].as_str().expect("id");
    assert_eq!(message(node, short_id).await["state"], "expired");

    // The device connects: the queue arrives after `accepted`, in order, same ids.
    let mut device = node.connect_device("dev", &identity).await;
    for (n, id) in queued.iter().enumerate() {
        let (got, frame) = tracked_frame(&mut device, "agent.job").await;
        assert_eq!(&got, id);
        assert_eq!(frame["n"], n);
    }
    // The untracked keyed message carries no id.
    let once = device.next_json().await;
    assert_eq!(once, json!({"type": "agent.once"}));
    // Ack the first; lose the connection before acking the others.
    device
        .send_json(&json!({"type": "connection.ack", "messageId": queued[0]}))
        .await;
    message_until(node, &queued[0], "acked").await;
    assert_eq!(message(node, &queued[1]).await["state"], "written");
    drop(device);
    message_until(node, &queued[1], "queued").await;
    let mut device = node.connect_device("dev", &identity).await;
    for id in &queued[1..] {
        let (got, _) = tracked_frame(&mut device, "agent.job").await;
        assert_eq!(&got, id, "redelivered in order with the same id");
        device
            .send_json(&json!({"type": "connection.ack", "messageId": got}))
            .await;
        message_until(node, id, "acked").await;
    }
    device.assert_served(node).await;

    // Online: written at once, and with a timeout the answer is waited for.
    let (status, body) = node
        .post(
            &client_send_path("dev", ""),
            &node.admin,
            &json!({"type": "agent.now"}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["state"], "written");
    assert_eq!(device.next_json().await, json!({"type": "agent.now"}));
    let (ask_path, ask) = (
        client_send_path("dev", "track=reply&timeout=10"),
        json!({"type": "agent.ask"}),
    );
    let request = node.post(&ask_path, &node.admin, &ask);
    let device_side = async {
        let (id, _) = tracked_frame(&mut device, "agent.ask").await;
        device
            .send_json(&json!({"type": "connection.reply", "messageId": id, "payload": "yes"}))
            .await;
    };
    let ((status, answer), ()) = tokio::join!(request, device_side);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["reply"], "yes");

    // The client's messages, newest first.
    let (status, list) = node
        .get(
            "/api/core/client/dev/messages?direction=out&limit=100",
            &node.admin,
        )
        .await;
    assert_eq!(status, 200, "{list}");
    let messages = list["messages"].as_array().expect("messages");
    assert_eq!(messages[0]["type"], "agent.ask");
    assert!(messages.iter().any(|m| m["id"] == queued[2]));
    let (_, acked) = node
        .get("/api/core/client/dev/messages?state=acked", &node.admin)
        .await;
    assert_eq!(
        acked["messages"].as_array().map(Vec::len),
        Some(3),
        "{acked}"
    );
    drop(device);

    // Deprovisioning fails what still waits.
    let (_, waiting) = node
        .post(
            &client_send_path("dev", "track=ack&ttl=600"),
            &node.admin,
            &json!({"type": "agent.late"}),
        )
        .await;
    let waiting_id = waiting["messageId"].as_str().expect("id").to_string();
    let (status, _) = node.delete("/api/core/client/dev", &node.admin).await;
    assert_eq!(status, 200);
    let m = message_until(node, &waiting_id, "failed").await;
    assert_eq!(m["reason"], "client deprovisioned");
}

#[tokio::test]
async fn the_outbox_on_sqlite() {
    let node = Node::start().await;
    outbox_scenario(&node).await;
}

#[tokio::test]
async fn the_outbox_on_postgres() {
    let Some(base) = service_url("MORRIGAN_TEST_POSTGRES_URL") else {
        return;
    };
    let db = Database::create(&base, "outbox").await;
    let url = db.url.clone();
    let node = Node::start_with(move |c| c.database_url = Some(url)).await;
    outbox_scenario(&node).await;
    drop(node);
    db.drop_now().await;
}

#[tokio::test]
async fn the_outbox_is_bounded_and_survives_a_restart() {
    let node = Node::start_with(|c| {
        c.outbox_max_messages = 2;
        c.outbox_max_bytes = 200;
    })
    .await;
    let identity = node.provision("dev").await;
    let path = client_send_path("dev", "track=ack&ttl=600");
    let keyed = |n: u32| {
        node.http
            .post(node.url(&path))
            .bearer_auth(&node.admin)
            .header("idempotency-key", "job-0")
            .body(json!({"type": "agent.job", "n": n}).to_string())
    };
    let first = keyed(0).send().await.expect("send");
    assert_eq!(first.status().as_u16(), 202);
    let first: Value = first.json().await.expect("json");
    let (status, body) = node
        .post(&path, &node.admin, &json!({"type": "agent.job", "n": 1}))
        .await;
    assert_eq!(status, 202, "{body}");
    let (status, body) = node
        .post(&path, &node.admin, &json!({"type": "agent.job", "n": 2}))
        .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["state"], "outboxFull");
    // A retry of the first request is answered with the first message, full outbox or not.
    let retry = keyed(0).send().await.expect("send");
    assert_eq!(retry.status().as_u16(), 202);
    let retry: Value = retry.json().await.expect("json");
    assert_eq!(retry["messageId"], first["messageId"], "{retry}");
    assert_eq!(retry["state"], "queued");
    let dir = node.stop().await;

    let node = Node::start_in(dir, |c| {
        c.outbox_max_messages = 2;
        c.outbox_max_bytes = 200;
    })
    .await;
    let mut device = node.connect_device("dev", &identity).await;
    for n in 0..2 {
        let (_, frame) = tracked_frame(&mut device, "agent.job").await;
        assert_eq!(frame["n"], n);
    }
    // A send that may wait (ttl) must fit the outbox, even while the device is online; one
    // that may not is written.
    let big = json!({"type": "agent.big", "data": "x".repeat(300)});
    let (status, body) = node.post(&path, &node.admin, &big).await;
    assert_eq!(status, 429, "{body}");
    let (status, body) = node
        .post(&client_send_path("dev", "track=ack"), &node.admin, &big)
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["state"], "written");
}

#[tokio::test]
async fn uplink_messages_are_kept_and_published_and_other_types_still_refused() {
    let node =
        Node::start_with(|c| c.uplink_types = vec!["agent.*".into(), "telemetry.cpu".into()]).await;
    let mut events = common::events::Events::open(&node, &node.admin).await;
    let mut device = node.device("dev").await;
    device
        .send_json(&json!({"type": "agent.pong", "payload": {"n": 1}}))
        .await;
    device
        .send_json(&json!({"type": "telemetry.cpu", "load": 0.5}))
        .await;
    device.send_json(&json!({"type": "telemetry.mem"})).await;
    let err = device.next_json().await;
    assert_eq!(err["error"], "unknownProvider", "{err}");
    assert_eq!(err["messageType"], "telemetry.mem");
    let event = events
        .next_where(|e| e["type"] == "message" && e["messageType"] == "agent.pong")
        .await;
    assert_eq!(event["direction"], "in");
    assert_eq!(event["clientId"], "dev");
    assert_eq!(event["connectionId"], device.id);
    assert_eq!(event["state"], "received");
    assert_eq!(
        event["body"],
        json!({"type": "agent.pong", "payload": {"n": 1}})
    );
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        let (status, list) = node
            .get("/api/core/client/dev/messages?direction=in", &node.admin)
            .await;
        assert_eq!(status, 200);
        let types: Vec<&str> = list["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .filter_map(|m| m["type"].as_str())
            .collect();
        if types == ["telemetry.cpu", "agent.pong"] {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{list}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    device.assert_served(&node).await;
}

#[tokio::test]
async fn messages_are_forgotten_after_the_retention() {
    let node = Node::start_with(|c| c.message_retention = Duration::from_secs(1)).await;
    node.provision("dev").await;
    let (status, body) = node
        .post(
            &client_send_path("dev", "ttl=1"),
            &node.admin,
            &json!({"type": "agent.x"}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["messageId"].as_str().expect("id").to_string();
    // A ttl past the retention is refused.
    let (status, _) = node
        .post(
            &client_send_path("dev", "ttl=2"),
            &node.admin,
            &json!({"type": "agent.x"}),
        )
        .await;
    assert_eq!(status, 400);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    node.upkeep().await;
    let (status, body) = node
        .get(&format!("/api/core/message/{id}"), &node.admin)
        .await;
    assert_eq!(status, 404, "{body}");
}

/// A device's answers to tracked frames are owed, not chatter: an operator who sends a device
/// more tracked messages per second than its message rate still gets every answer (before,
/// the answers past the rate were refused with `rateLimited` and the sends timed out).
#[tokio::test]
async fn answers_owed_for_tracked_frames_pass_the_message_rate_limit() {
    let node = Node::start_with(|c| c.max_messages_per_second = 5).await;
    let mut device = node.device("dev").await;
    let path = send_path(&device.id, "track=ack&timeout=5");
    const SENDS: usize = 60;
    let sender = async {
        for n in 0..SENDS {
            let (status, body) = node
                .post(&path, &node.admin, &json!({"type": "agent.job", "n": n}))
                .await;
            assert_eq!(status, 200, "send {n}: {body}");
            assert_eq!(body["state"], "acked");
        }
    };
    let device_side = async {
        for _ in 0..SENDS {
            let (id, _) = tracked_frame(&mut device, "agent.job").await;
            device
                .send_json(&json!({"type": "connection.ack", "messageId": id}))
                .await;
        }
    };
    tokio::join!(sender, device_side);
    // Other messages are still limited: a burst past twice the rate is refused.
    for _ in 0..20 {
        device
            .send_json(&json!({"type": "client.state", "state": "busy"}))
            .await;
    }
    let refused = device.next_json().await;
    assert_eq!(refused["error"], "rateLimited", "{refused}");
}
