//! Tracked messages and uplink messages against a real in-process node: what a handler returns
//! is what the operator's tracked send answers (reply, ack, rejected), a published message is
//! recorded as received, and a message re-delivered after a lost connection is answered again
//! without being handled twice.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use morrigan_client::{Client, Event, Handle, Sender, message_id};
use reqwest::Method;
use serde_json::{Value, json};
use support::{Node, Proxy, WAIT, connected, fast_backoff, until_stopped, wait_for};
use tokio::sync::{Notify, mpsc};

/// `POST path` as admin with `body`.
async fn post(node: &Node, path: &str, body: Value) -> (u16, Value) {
    node.call(Method::POST, path, Some(&node.admin), Some(body))
        .await
}

/// A provisioned client `client_id` with the handlers `configure` adds, started and connected:
/// its handle and connection id.
async fn device(
    node: &Node,
    client_id: &str,
    configure: impl FnOnce(morrigan_client::ClientBuilder) -> morrigan_client::ClientBuilder,
) -> (Handle, morrigan_client::Events, String) {
    let identity = node.provision(client_id).await;
    let builder = Client::builder(node.provider_url(), &identity)
        .backoff(fast_backoff())
        .token_refresh(None);
    let (handle, mut events) = configure(builder).build().unwrap().start();
    let id = connected(&mut events).await;
    (handle, events, id)
}

/// A UUID-shaped message id (what the server hands out).
fn assert_message_id(answer: &Value) -> String {
    let id = answer["messageId"].as_str().unwrap_or_default();
    assert_eq!(id.len(), 36, "a message id: {answer}");
    id.to_string()
}

#[tokio::test]
async fn a_reply_from_the_handler_answers_the_tracked_send() {
    let node = Node::start().await;
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let (handle, _events, id) = device(&node, "dev-reply", |b| {
        b.on_type("agent.query", move |m: Value, _: Sender| {
            let seen_tx = seen_tx.clone();
            async move {
                let _ = seen_tx.send(m);
                Ok::<_, String>(Some(json!({"x": 1})))
            }
        })
    })
    .await;

    let (status, answer) = post(
        &node,
        &format!("/api/core/connection/{id}/send?track=reply&timeout=10"),
        json!({"type": "agent.query", "q": "x"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "success", "{answer}");
    assert_eq!(answer["state"], "replied", "{answer}");
    assert_eq!(answer["reply"], json!({"x": 1}), "{answer}");
    let message = assert_message_id(&answer);

    // The handler got the operator's object with the id added, and nothing else changed.
    let got = tokio::time::timeout(WAIT, seen.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(message_id(&got), Some(message.as_str()));
    assert_eq!(
        got,
        json!({"type": "agent.query", "q": "x", "messageId": message})
    );

    // The record says the same.
    let (status, record) = node.get(&format!("/api/core/message/{message}")).await;
    assert_eq!(status, 200, "{record}");
    let record = &record["message"];
    assert_eq!(record["state"], "replied", "{record}");
    assert_eq!(record["reply"], json!({"x": 1}), "{record}");
    assert_eq!(record["direction"], "out", "{record}");
    assert_eq!(record["type"], "agent.query", "{record}");
    assert_eq!(record["clientId"], "dev-reply", "{record}");
    handle.stop("test").await.unwrap();
}

#[tokio::test]
async fn ok_none_and_unit_handlers_ack() {
    let node = Node::start().await;
    let (handle, _events, id) = device(&node, "dev-ack", |b| {
        b.on_type("agent.set", |_: Value, _: Sender| async {
            Ok::<Option<Value>, String>(None)
        })
        // A handler written before tracked messages existed: `()` acks.
        .on_provider("legacy", |_: Value, _: Sender| async {})
    })
    .await;

    for ty in ["agent.set", "legacy.anything"] {
        let (status, answer) = post(
            &node,
            &format!("/api/core/connection/{id}/send?track=ack"),
            json!({"type": ty}),
        )
        .await;
        assert_eq!(status, 200, "{ty}: {answer}");
        assert_eq!(answer["status"], "success", "{ty}: {answer}");
        assert_eq!(answer["state"], "acked", "{ty}: {answer}");
        assert!(answer.get("reply").is_none_or(Value::is_null), "{answer}");
        assert_message_id(&answer);
    }
    handle.stop("test").await.unwrap();
}

/// A handler bug.
fn crash() {
    panic!("a handler bug (expected by the test)");
}

#[tokio::test]
async fn an_error_a_panic_or_no_handler_rejects_the_message() {
    let node = Node::start().await;
    let (handle, _events, id) = device(&node, "dev-nack", |b| {
        b.on_type("agent.format", |_: Value, _: Sender| async {
            Err::<Option<Value>, _>("formatting is disabled")
        })
        .on_type("agent.crash", |_: Value, _: Sender| async { crash() })
    })
    .await;

    for (ty, reason) in [
        ("agent.format", "formatting is disabled"),
        ("agent.crash", "handler panicked"),
        ("other.thing", "no handler for other.thing"),
    ] {
        let (status, answer) = post(
            &node,
            &format!("/api/core/connection/{id}/send?track=reply&timeout=10"),
            json!({"type": ty}),
        )
        .await;
        assert_eq!(status, 422, "{ty}: {answer}");
        assert_eq!(answer["status"], "failed", "{ty}: {answer}");
        assert_eq!(answer["state"], "rejected", "{ty}: {answer}");
        assert_eq!(answer["reason"], reason, "{ty}: {answer}");
        let message = assert_message_id(&answer);
        let (_, record) = node.get(&format!("/api/core/message/{message}")).await;
        assert_eq!(record["message"]["state"], "rejected", "{record}");
        assert_eq!(record["message"]["reason"], reason, "{record}");
    }
    // The connection survived all of it.
    assert!(handle.is_connected());
    assert_eq!(node.record(&id).await["open"], true);
    handle.stop("test").await.unwrap();
}

#[tokio::test]
async fn a_published_message_is_recorded_as_received() {
    // `disk.*` is not a built-in uplink type: the operator declares it.
    let node = Node::start_with(|s| {
        s.config.uplink_types = vec!["agent.*".into(), "disk.*".into()];
    })
    .await;
    let (handle, _events, id) = device(&node, "dev-pub", |b| b).await;

    handle
        .publish("disk.alert", json!({"path": "/var", "usedPercent": 97}))
        .await
        .unwrap();
    let listed = node
        .get_until(
            "/api/core/client/dev-pub/messages?direction=in",
            "the published message",
            |body| {
                body["messages"]
                    .as_array()
                    .is_some_and(|m| m.iter().any(|r| r["type"] == "disk.alert"))
            },
        )
        .await;
    assert_eq!(listed["state"], "success", "{listed}");
    let record = listed["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "disk.alert")
        .unwrap();
    assert_eq!(record["state"], "received", "{record}");
    assert_eq!(record["direction"], "in", "{record}");
    assert_eq!(record["clientId"], "dev-pub", "{record}");
    assert_eq!(record["connectionId"], id.as_str(), "{record}");
    assert_eq!(
        record["body"],
        json!({"type": "disk.alert", "payload": {"path": "/var", "usedPercent": 97}}),
        "{record}"
    );
    // Only uplink messages are listed with direction=in; it is found by id as well.
    let (status, one) = node
        .get(&format!(
            "/api/core/message/{}",
            record["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["message"]["state"], "received", "{one}");
    handle.stop("test").await.unwrap();
}

#[tokio::test]
async fn a_redelivered_message_is_answered_again_without_being_handled_twice() {
    // The device's answer is lost with its connection (held by a frozen network, then cut): the
    // server delivers the message again on the next connection, and the device answers it from
    // memory, with the first handling's reply.
    let proxy = Proxy::start().await;
    let node = Node::start_with(|s| s.config.public_url = Some(proxy.base())).await;
    proxy.retarget(node.addr);
    let identity = node.provision("dev-again").await;
    let handled = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Notify::new());
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let client = {
        let (handled, gate) = (handled.clone(), gate.clone());
        Client::builder(format!("{}/api/core/connection", proxy.base()), &identity)
            .backoff(fast_backoff())
            .token_refresh(None)
            .on_type("agent.job", move |_: Value, _: Sender| {
                let (handled, gate, started_tx) =
                    (handled.clone(), gate.clone(), started_tx.clone());
                async move {
                    let n = handled.fetch_add(1, Ordering::SeqCst) + 1;
                    let _ = started_tx.send(n);
                    gate.notified().await;
                    Ok::<_, String>(Some(json!({"handling": n})))
                }
            })
            .build()
            .unwrap()
    };
    let (handle, mut events) = client.start();
    let first = connected(&mut events).await;

    // Queued for the client with a TTL: not waited for, delivered again if unanswered.
    let (status, accepted) = post(
        &node,
        "/api/core/client/dev-again/send?track=reply&ttl=60",
        json!({"type": "agent.job"}),
    )
    .await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(accepted["status"], "accepted", "{accepted}");
    let message = assert_message_id(&accepted);
    assert_eq!(
        tokio::time::timeout(WAIT, started.recv()).await.unwrap(),
        Some(1)
    );

    // The reply goes into a frozen network and is lost with the cut.
    proxy.freeze();
    gate.notify_one();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    proxy.cut();
    wait_for(&mut events, |e| matches!(e, Event::Disconnected { .. })).await;
    let second = connected(&mut events).await;
    assert_ne!(second, first);

    let record = node
        .get_until(
            &format!("/api/core/message/{message}"),
            "the re-delivered message replied",
            |r| r["message"]["state"] == "replied",
        )
        .await;
    assert_eq!(
        record["message"]["reply"],
        json!({"handling": 1}),
        "{record}"
    );
    assert_eq!(
        record["message"]["connectionId"],
        second.as_str(),
        "{record}"
    );
    assert_eq!(handled.load(Ordering::SeqCst), 1, "handled once");

    handle.stop("test").await.unwrap();
    let rest = until_stopped(&mut events).await;
    let jobs = rest
        .iter()
        .filter(|e| matches!(e, Event::Message(m) if m["type"] == "agent.job"))
        .count();
    assert_eq!(jobs, 0, "the re-delivery is not an event again: {rest:?}");
}
