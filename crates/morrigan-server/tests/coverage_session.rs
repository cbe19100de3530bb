//! What a device's socket does at the edges: a text frame that is not UTF-8 (1007),
//! `client.state` at and past its bounds and racing a deprovisioning, and `client.token.refresh`
//! with its grace period and after a deprovisioning.

mod common;

use std::time::Duration;

use common::{Device, Node, WAIT};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

/// A raw text (or continuation) frame: tungstenite sends `Message::Frame` as given, masked.
fn text_frame(payload: &[u8], first: bool, last: bool) -> Message {
    let opcode = if first { Data::Text } else { Data::Continue };
    Message::Frame(Frame::message(payload.to_vec(), OpCode::Data(opcode), last))
}

/// Sends a message of an unknown provider and returns its error frame: every frame the device
/// received before it is returned too, so a test sees what (if anything) answered the messages
/// sent before the probe.
async fn replies_until_probe(device: &mut Device, n: u32) -> Vec<Value> {
    let probe = format!("probe.n{n}");
    device.send_json(&json!({"type": probe})).await;
    let mut before = Vec::new();
    loop {
        let frame = device.next_json().await;
        if frame["messageType"] == probe.as_str() {
            assert_eq!(frame["error"], "unknownProvider", "{frame}");
            return before;
        }
        before.push(frame);
    }
}

fn assert_error_frame(frame: &Value, error: &str, message_type: &str, reason_part: &str) {
    assert_eq!(frame["type"], "connection.error", "{frame}");
    assert_eq!(frame["error"], error, "{frame}");
    assert_eq!(frame["messageType"], message_type, "{frame}");
    assert!(
        frame["reason"].as_str().unwrap_or("").contains(reason_part),
        "{frame}"
    );
}

#[tokio::test]
async fn a_text_frame_that_is_not_utf8_closes_with_1007() {
    let node = Node::start().await;

    // Valid UTF-8 split inside a character across two fragments is one valid message.
    let mut device = node.device("fragments").await;
    device
        .ws
        .send(text_frame(b"{\"type\":\"zz.\xc3", true, false))
        .await
        .expect("first fragment");
    device
        .ws
        .send(text_frame(b"\xa4\"}", false, true))
        .await
        .expect("last fragment");
    let reply = device.next_json().await;
    assert_error_frame(&reply, "invalidType", "zz.\u{e4}", "character");
    device.assert_served(&node).await;

    // Invalid UTF-8 in one frame, and a character cut short at the end of the last fragment.
    for (client, frames) in [
        (
            "bad-byte",
            vec![text_frame(b"{\"type\":\"zz.\xff\"}", true, true)],
        ),
        (
            "cut-short",
            vec![
                text_frame(b"{\"type\":\"zz.", true, false),
                text_frame(b"x\"}\xe2\x82", false, true),
            ],
        ),
    ] {
        let mut device = node.device(client).await;
        for f in frames {
            device.ws.send(f).await.expect("send frame");
        }
        let close = device.next_close().await;
        assert_eq!(u16::from(close.code), 1007, "{client}: {close:?}");
        let r = node
            .record_until(&device.id, "closed", |r| r["open"] == false)
            .await;
        assert_eq!(r["closeCode"], 1007, "{client}: {r}");
        assert_eq!(r["alive"], false, "{client}: {r}");
    }
    // The other connections are unaffected.
    device.assert_served(&node).await;
}

/// The client record of `stateful`.
async fn stored(node: &Node) -> Value {
    let (status, body) = node.get("/api/core/client/stateful", &node.admin).await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn client_state_is_stored_within_its_bounds_and_refused_outside() {
    let node = Node::start().await;
    let mut device = node.device("stateful").await;

    // At the bound (128 bytes): stored, and no reply.
    let longest = "s".repeat(128);
    device
        .send_json(&json!({"type": "client.state", "state": longest}))
        .await;
    assert_eq!(
        replies_until_probe(&mut device, 1).await,
        Vec::<Value>::new()
    );
    let client = stored(&node).await;
    assert_eq!(client["state"], longest.as_str(), "{client}");
    assert!(client["stateUpdated"].is_string(), "{client}");

    // Empty, one past the bound, not a string, missing: one invalidMessage each, nothing stored.
    let cases = [
        (json!({"type": "client.state", "state": ""}), "1-128"),
        (
            json!({"type": "client.state", "state": "s".repeat(129)}),
            "1-128",
        ),
        (json!({"type": "client.state", "state": 7}), "string"),
        (json!({"type": "client.state"}), "string"),
    ];
    for (i, (message, reason)) in cases.iter().enumerate() {
        device.send_json(message).await;
        let replies = replies_until_probe(&mut device, 10 + i as u32).await;
        assert_eq!(replies.len(), 1, "{message}: {replies:?}");
        assert_error_frame(&replies[0], "invalidMessage", "client.state", reason);
    }
    assert_eq!(stored(&node).await["state"], longest.as_str());

    // A short one replaces it.
    device
        .send_json(&json!({"type": "client.state", "state": "ready"}))
        .await;
    assert_eq!(
        replies_until_probe(&mut device, 2).await,
        Vec::<Value>::new()
    );
    assert_eq!(stored(&node).await["state"], "ready");
}

/// The device sends `cycle` over and over, as fast as the server reads, while the operator
/// deprovisions it (once three frames have answered it); returns every text frame it received
/// before its close frame, and the close code.
async fn flood_while_deprovisioned(
    node: &Node,
    device: Device,
    cycle: Vec<Value>,
) -> (Vec<Value>, u16) {
    let (mut sink, mut stream) = device.ws.split();
    let writer = tokio::spawn(async move {
        for message in cycle.iter().cycle().take(4_000) {
            if sink
                .send(Message::Text(message.to_string().into()))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut frames = Vec::new();
    let deadline = Instant::now() + WAIT;
    let mut deprovisioning = None;
    let code = loop {
        let next = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("frames and a close in time");
        match next {
            Some(Ok(Message::Text(t))) => {
                frames.push(serde_json::from_str::<Value>(t.as_str()).expect("JSON frame"));
                // Deprovision (without pausing the reads) once the device is being answered.
                if frames.len() == 3 && deprovisioning.is_none() {
                    let req = node
                        .http
                        .delete(node.url(&format!("/api/core/client/{}", device.client_id)))
                        .bearer_auth(&node.admin)
                        .send();
                    deprovisioning = Some(tokio::spawn(async move {
                        common::read(req.await.expect("deprovision")).await
                    }));
                }
            }
            Some(Ok(Message::Close(Some(frame)))) => break u16::from(frame.code),
            Some(Ok(_)) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    let (status, body) = deprovisioning
        .expect("deprovisioned while the device was answered")
        .await
        .expect("deprovision task");
    assert_eq!(status, 200, "{body}");
    writer.abort();
    (frames, code)
}

#[tokio::test]
async fn client_state_racing_a_deprovisioning_never_brings_the_client_back() {
    let node = Node::start_with(|c| c.max_messages_per_second = 100_000).await;
    let device = node.device("leaving").await;
    // Valid states (stored, no answer) between probes (always answered, so the device sees
    // its messages handled while the deprovisioning runs).
    let cycle = vec![
        json!({"type": "client.state", "state": "still-here"}),
        json!({"type": "probe.flood"}),
    ];
    let (frames, code) = flood_while_deprovisioned(&node, device, cycle).await;
    assert_eq!(code, 4003, "{frames:?}");
    // A client.state handled after the client was deleted is refused, never stored.
    for f in frames.iter().filter(|f| f["messageType"] != "probe.flood") {
        assert_error_frame(f, "invalidMessage", "client.state", "no longer provisioned");
    }
    let (status, body) = node.get("/api/core/client/leaving", &node.admin).await;
    assert_eq!(
        status, 404,
        "a late client.state recreated the client: {body}"
    );
    let (status, body) = node
        .get(
            "/api/core/connection?clientId=leaving&open=true",
            &node.admin,
        )
        .await;
    assert_eq!((status, body), (200, json!([])));
}

/// `POST /api/core/connection` with an identity token: the status only.
async fn exchange(node: &Node, identity: &str) -> u16 {
    let (status, body) = node.connection_token(identity).await;
    if status != 200 {
        assert_eq!(body["status"], "failed", "{body}");
    }
    status
}

/// The grace period of the refresh test: long enough that a loaded machine answers the first
/// exchange within it.
const GRACE: Duration = Duration::from_secs(5);

#[tokio::test]
async fn a_refreshed_token_keeps_the_old_one_valid_for_the_grace_period_only() {
    let node = Node::start_with(|c| c.refresh_grace = GRACE).await;
    let old = node.provision("refresher").await;
    let mut device = node.connect_device("refresher", &old).await;

    let asked = Instant::now();
    device
        .send_json(&json!({"type": "client.token.refresh"}))
        .await;
    let issue = device.next_json().await;
    assert_eq!(issue["type"], "client.token.issue", "{issue}");
    let new = issue["token"].as_str().expect("token").to_string();
    assert_ne!(new, old);
    let claims = common::claims(&new);
    assert_eq!(claims["aud"], "morrigan:identity", "{claims}");
    assert_eq!(claims["sub"], "refresher", "{claims}");
    let exp = time::OffsetDateTime::from_unix_timestamp(claims["exp"].as_i64().expect("exp"))
        .expect("exp");
    assert_eq!(
        issue["expires"],
        morrigan_protocol::time_format::format(exp)
    );

    // Both work within the grace period (the server started it after `asked`, so an answer
    // that came back before `asked + GRACE` was given within it).
    assert_eq!(exchange(&node, &new).await, 200);
    assert_eq!(exchange(&node, &old).await, 200);
    assert!(
        asked.elapsed() < GRACE,
        "the machine is too slow for this test: {:?}",
        asked.elapsed()
    );

    // Then the old one is refused (never before the grace period could have ended).
    let deadline = Instant::now() + GRACE + WAIT;
    loop {
        let sent = Instant::now();
        let status = exchange(&node, &old).await;
        if status == 403 {
            assert!(
                sent >= asked,
                "refused {:?} after the refresh",
                sent - asked
            );
            assert!(
                Instant::now() >= asked + GRACE,
                "the old token was refused within the grace period"
            );
            break;
        }
        assert_eq!(status, 200);
        assert!(Instant::now() < deadline, "the old token is still accepted");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The new one stays valid, and a second refresh answers too.
    assert_eq!(exchange(&node, &new).await, 200);
    device
        .send_json(&json!({"type": "client.token.refresh"}))
        .await;
    let second = device.next_json().await;
    assert_eq!(second["type"], "client.token.issue", "{second}");
    let newest = second["token"].as_str().expect("token").to_string();

    // Deprovisioning revokes every one of them and closes the socket with 4003.
    let (status, body) = node.delete("/api/core/client/refresher", &node.admin).await;
    assert_eq!(status, 200, "{body}");
    let close = device.next_close().await;
    assert_eq!(u16::from(close.code), 4003, "{close:?}");
    for token in [&old, &new, &newest] {
        assert_eq!(exchange(&node, token).await, 403);
    }
}

#[tokio::test]
async fn refreshes_racing_a_deprovisioning_issue_nothing_that_works() {
    let node = Node::start_with(|c| c.max_messages_per_second = 100_000).await;
    let device = node.device("refreshing").await;
    let identity = device.identity.clone();
    let cycle = vec![json!({"type": "client.token.refresh"})];
    let (frames, code) = flood_while_deprovisioned(&node, device, cycle).await;
    assert_eq!(code, 4003, "{frames:?}");
    let mut tokens = vec![identity];
    for f in &frames {
        if f["type"] == "client.token.issue" {
            tokens.push(f["token"].as_str().expect("token").to_string());
        } else {
            // Handled after the client was deleted: refused.
            assert_error_frame(
                f,
                "invalidMessage",
                "client.token.refresh",
                "no longer provisioned",
            );
        }
    }
    assert!(
        tokens.len() >= 3,
        "refreshes were answered before: {frames:?}"
    );
    // Whatever was issued, before or during the deprovisioning, opens nothing.
    for token in &tokens {
        assert_eq!(exchange(&node, token).await, 403);
    }
}
