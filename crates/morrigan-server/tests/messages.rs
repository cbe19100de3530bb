//! Messages a device sends: the built-in ones, and every kind of bad input (each answered with
//! `connection.error` on a socket that stays open, or a close of that socket only).

mod common;

use common::{Device, Node};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::Message;

/// Polls the client record until `pred` holds.
async fn client_until(node: &Node, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        let (status, c) = node
            .get(&format!("/api/core/client/{id}"), &node.admin)
            .await;
        assert_eq!(status, 200, "{c}");
        if pred(&c) {
            return c;
        }
        assert!(tokio::time::Instant::now() < deadline, "client {id}: {c}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn client_state_is_persisted_on_the_client_record() {
    let node = Node::start().await;
    let mut device = node.device("dev").await;
    device
        .send_json(&json!({"type": "client.state", "state": "ready"}))
        .await;
    let c = client_until(&node, "dev", |c| c["state"] == "ready").await;
    assert!(c["stateUpdated"].is_string(), "{c}");
    device
        .send_json(&json!({"type": "client.state", "state": "stopped.update"}))
        .await;
    client_until(&node, "dev", |c| c["state"] == "stopped.update").await;

    // A state that is not a string is an invalid message.
    device
        .send_json(&json!({"type": "client.state", "state": 7}))
        .await;
    let err = device.next_json().await;
    assert_eq!(err["type"], "connection.error");
    assert_eq!(err["error"], "invalidMessage");
    assert_eq!(err["messageType"], "client.state");
    device.assert_served(&node).await;
}

#[tokio::test]
async fn token_refresh_issues_a_recorded_token_that_deprovisioning_revokes() {
    let node = Node::start().await;
    let mut device = node.device("dev").await;
    device
        .send_json(&json!({"type": "client.token.refresh"}))
        .await;
    let issue = device.next_json().await;
    assert_eq!(issue["type"], "client.token.issue", "{issue}");
    let token = issue["token"].as_str().expect("token").to_string();
    let expires = issue["expires"].as_str().expect("expires");
    assert!(expires.ends_with('Z'), "{expires}");
    let claims = common::claims(&token);
    assert_eq!(claims["sub"], "dev");
    assert_eq!(claims["aud"], "morrigan:identity");
    assert_ne!(token, device.identity);

    // The client record now names the new token, and the new token works.
    let (_, client) = node.get("/api/core/client/dev", &node.admin).await;
    assert_eq!(client["tokenId"], claims["jti"]);
    node.token(&token).await;

    // Deprovisioning revokes the refreshed token too.
    let (status, _) = node.delete("/api/core/client/dev", &node.admin).await;
    assert_eq!(status, 200);
    assert_eq!(u16::from(device.next_close().await.code), 4003);
    let (status, body) = node.connection_token(&token).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = node.connection_token(&device.identity).await;
    assert_eq!(status, 403, "{body}");
}

#[tokio::test]
async fn capability_report_is_persisted_and_served() {
    let node = Node::start().await;
    let mut device = node.device("dev").await;
    let (status, body) = node.get("/api/core/capability/dev", &node.admin).await;
    assert_eq!(status, 404, "before any report: {body}");

    let caps = json!([
        {"name": "agent", "version": "1.2.0", "messages": ["run", "ping"]},
        {"name": "files", "version": "0.1.0", "messages": []}
    ]);
    device
        .send_json(&json!({"type": "capability.report", "capabilities": caps}))
        .await;
    let deadline = tokio::time::Instant::now() + common::WAIT;
    let reported = loop {
        let (status, body) = node.get("/api/core/capability/dev", &node.admin).await;
        if status == 200 {
            break body;
        }
        assert!(tokio::time::Instant::now() < deadline, "{status} {body}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(reported["clientId"], "dev");
    assert_eq!(reported["capabilities"][0]["name"], "agent");
    assert_eq!(reported["capabilities"][0]["version"], "1.2.0");
    assert_eq!(
        reported["capabilities"][0]["messages"],
        json!(["run", "ping"])
    );
    assert_eq!(reported["capabilities"][1]["name"], "files");
    assert!(reported["reported"].is_string());

    // Malformed reports are invalid messages.
    for bad in [
        json!({"type": "capability.report"}),
        json!({"type": "capability.report", "capabilities": "agent"}),
        json!({"type": "capability.report", "capabilities": [{"version": "1"}]}),
    ] {
        device.send_json(&bad).await;
        let err = device.next_json().await;
        assert_eq!(err["error"], "invalidMessage", "{bad}: {err}");
    }
    device.assert_served(&node).await;
}

#[tokio::test]
async fn capability_list_names_every_provider() {
    let node = Node::start().await;
    let (status, list) = node.get("/api/core/capability", &node.admin).await;
    assert_eq!(status, 200);
    let list = list.as_array().expect("array");
    for name in ["connection", "client", "capability"] {
        let p = list
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("provider {name} missing: {list:?}"));
        assert!(p["version"].is_string(), "{p}");
        assert!(p["messages"].is_array(), "{p}");
        assert!(p["endpoints"].is_array(), "{p}");
        assert!(p["functions"].is_array(), "{p}");
    }
    let client = list.iter().find(|p| p["name"] == "client").unwrap();
    let messages: Vec<&str> = client["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert!(messages.contains(&"state") && messages.contains(&"token.refresh"));
}

#[tokio::test]
async fn every_bad_frame_gets_a_connection_error_and_the_socket_stays_open() {
    let node = Node::start().await;
    let mut device = node.device("dev").await;
    let cases: Vec<(&str, &str, Option<&str>)> = vec![
        ("{not json", "invalidJson", None),
        ("[1,2,3]", "notAnObject", None),
        ("\"client.state\"", "notAnObject", None),
        ("{}", "missingType", None),
        (r#"{"type": 42}"#, "missingType", None),
        (r#"{"type": "nodot"}"#, "invalidType", Some("nodot")),
        (r#"{"type": "a^b.c"}"#, "invalidType", Some("a^b.c")),
        (r#"{"type": "client."}"#, "invalidType", Some("client.")),
        (
            r#"{"type": "nobody.home"}"#,
            "unknownProvider",
            Some("nobody.home"),
        ),
        (
            r#"{"type": "connection.anything"}"#,
            "unknownMessage",
            Some("connection.anything"),
        ),
        (
            r#"{"type": "client.nope"}"#,
            "unknownMessage",
            Some("client.nope"),
        ),
        (
            r#"{"type": "capability.nope"}"#,
            "unknownMessage",
            Some("capability.nope"),
        ),
    ];
    for (text, kind, message_type) in cases {
        device.send_text(text).await;
        let err = device.next_json().await;
        assert_eq!(err["type"], "connection.error", "{text}: {err}");
        assert_eq!(err["error"], kind, "{text}: {err}");
        assert!(err["reason"].is_string(), "{text}: {err}");
        match message_type {
            Some(t) => assert_eq!(err["messageType"], t, "{text}: {err}"),
            None => assert!(err.get("messageType").is_none(), "{text}: {err}"),
        }
    }
    device
        .ws
        .send(Message::Binary(vec![1u8, 2, 3].into()))
        .await
        .unwrap();
    let err = device.next_json().await;
    assert_eq!(err["error"], "binaryFrame", "{err}");

    device.assert_served(&node).await;
    let r = node.record(&device.id).await;
    assert_eq!(r["open"], true);
}

/// Sends `n` messages in one write (they reach the server together) and returns, in order,
/// each answer's error kind, with the time from the first send to the last answer: an upper
/// bound on the time the server took to take them in.
async fn burst(device: &mut Device, n: usize) -> (Vec<String>, std::time::Duration) {
    let started = std::time::Instant::now();
    for i in 0..n {
        let probe = json!({"type": "connection.burst", "n": i}).to_string();
        device
            .ws
            .feed(Message::Text(probe.into()))
            .await
            .expect("queue");
    }
    device.ws.flush().await.expect("send the burst");
    let mut kinds = Vec::new();
    for _ in 0..n {
        let err = device.next_json().await;
        assert_eq!(err["type"], "connection.error", "{err}");
        if err["error"] == "rateLimited" {
            assert_eq!(
                err["reason"],
                format!("more than {RATE} messages per second; message dropped"),
                "{err}"
            );
        }
        kinds.push(err["error"].as_str().expect("error kind").to_string());
    }
    (kinds, started.elapsed())
}

/// The per-connection limit of these tests: messages per second (bursts of twice that).
const RATE: u32 = 10;

#[tokio::test]
async fn too_many_messages_are_answered_with_rate_limited_at_the_rate_and_burst() {
    let node = Node::start_with(|c| c.max_messages_per_second = RATE).await;
    let mut device = node.device("dev").await;
    let burst_size = 2 * RATE as usize;
    let handled = |kinds: &[String]| kinds.iter().filter(|k| *k == "unknownMessage").count();
    // At most the burst, plus what the bucket refilled at RATE per second since the first
    // message could have arrived (one more for the fraction left over).
    let bound = |took: std::time::Duration| {
        burst_size + (f64::from(RATE) * took.as_secs_f64()).floor() as usize + 1
    };
    let started = std::time::Instant::now();

    // A fresh connection has a full bucket: a burst of twice the rate is handled whole (each
    // probe answered as an unknown message, in order), and what follows at once is refused.
    let (first, took) = burst(&mut device, 4 * RATE as usize).await;
    assert!(
        first[..burst_size].iter().all(|k| k == "unknownMessage"),
        "the first {burst_size} of a burst are handled: {first:?}"
    );
    assert!(
        handled(&first) <= bound(took),
        "{} handled within {took:?}: {first:?}",
        handled(&first)
    );
    assert!(first.iter().any(|k| k == "rateLimited"), "{first:?}");

    // The bucket refills at RATE per second: 0.7 s later at least 7 tokens are back, and in
    // all no more than the burst and the refill over the whole time was handled.
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    let (second, _) = burst(&mut device, burst_size).await;
    let took = started.elapsed();
    let refilled = 7;
    assert!(
        second[..refilled].iter().all(|k| k == "unknownMessage"),
        "0.7 s after the burst, {refilled} messages are handled: {second:?}"
    );
    let total = handled(&first) + handled(&second);
    assert!(
        total <= bound(took),
        "{total} handled within {took:?}, over the rate: {first:?} {second:?}"
    );
    for kinds in [&first, &second] {
        assert!(
            kinds
                .iter()
                .all(|k| k == "unknownMessage" || k == "rateLimited"),
            "{kinds:?}"
        );
    }
    assert_eq!(node.record(&device.id).await["open"], true);
}

#[tokio::test]
async fn an_oversized_message_closes_that_socket_with_1009() {
    let node = Node::start_with(|c| c.max_message_size = 1024).await;
    let mut big = node.device("big").await;
    let mut bystander = node.device("bystander").await;

    // Just under the limit is fine.
    let fits = json!({"type": "connection.pad", "pad": "x".repeat(900)});
    big.send_json(&fits).await;
    assert_eq!(big.next_json().await["error"], "unknownMessage");

    let too_big = json!({"type": "client.state", "state": "x".repeat(2000)});
    big.send_json(&too_big).await;
    let close = big.next_close().await;
    assert_eq!(u16::from(close.code), 1009, "{close:?}");
    let r = node
        .record_until(&big.id, "closed", |r| r["open"] == false)
        .await;
    assert_eq!(r["closeCode"], 1009);
    assert!(r["disconnected"].is_string());

    bystander.assert_served(&node).await;
}

#[tokio::test]
async fn a_large_message_arrives_whole_through_the_small_read_buffer() {
    // The socket reads at most 512 bytes per syscall (a small buffer for idle memory): a
    // 256 KiB frame, then small ones right behind it, must still be read whole and in order.
    let node = Node::start().await;
    let mut device = node.device("big").await;
    let large = json!({"type": "connection.pad", "pad": "x".repeat(256 * 1024)});
    device.send_json(&large).await;
    for i in 0..3 {
        device
            .send_json(&json!({"type": "connection.pad", "n": i}))
            .await;
    }
    for _ in 0..4 {
        assert_eq!(device.next_json().await["error"], "unknownMessage");
    }
    device.assert_served(&node).await;
}

#[tokio::test]
async fn a_malformed_frame_closes_only_that_socket() {
    let node = Node::start().await;
    let mut bystander = node.device("bystander").await;
    // Two kinds of frame-level violation: a reserved opcode, and an unmasked client frame.
    let bad_frames: [(&str, &[u8]); 2] = [
        ("reserved opcode", &[0x83, 0x80, 1, 2, 3, 4]),
        ("unmasked frame", &[0x81, 0x02, b'{', b'}']),
    ];
    for (i, (what, raw)) in bad_frames.into_iter().enumerate() {
        let mut device = node.device(&format!("dev-{i}")).await;
        match device.ws.get_mut() {
            MaybeTlsStream::Plain(tcp) => tcp.write_all(raw).await.unwrap(),
            _ => unreachable!("plain TCP"),
        }
        // The server closes with a protocol error (1002), or the socket just ends; either way
        // the record is closed and nothing else is affected.
        let end = tokio::time::timeout(common::WAIT, async {
            loop {
                match device.ws.next().await {
                    Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(other)) => panic!("{what}: unexpected {other:?}"),
                    Some(Err(_)) | None => return None,
                }
            }
        })
        .await
        .expect("the socket ends");
        let r = node
            .record_until(&device.id, "closed", |r| r["open"] == false)
            .await;
        assert_eq!(r["closeCode"], 1002, "{what}: {r}");
        if let Some(code) = end {
            assert_eq!(code, 1002, "{what}");
        }
        bystander.assert_served(&node).await;
    }
    // New devices still connect.
    node.device("after").await;
}
