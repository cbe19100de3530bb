//! A device that stops reading, a handler that waits on the store, a frame too big sent in one
//! write: none of them may stall anything but that one connection, and only for a stated time.
//! Over real sockets: the stalled device is a real TCP client with a small receive buffer that
//! simply stops reading.

mod common;

use std::time::{Duration, Instant};

use common::{Node, WAIT, next_close, next_json};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

type RawWs = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Connects `client_id` (provisioned with `identity`) from a socket with a 4 KiB receive
/// buffer, reads its accept frame and returns it with the connection id. The caller then never
/// reads it again: the device "stops reading".
async fn reluctant_device(node: &Node, identity: &str) -> (RawWs, String) {
    let token = node.token(identity).await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let stream = socket.connect(node.addr).await.expect("tcp connect");
    let mut req = node.ws_url().into_client_request().expect("request");
    req.headers_mut()
        .insert("origin", token.parse().expect("header"));
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(req, stream))
        .await
        .expect("handshake in time")
        .expect("handshake");
    let first = loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => break t,
            Ok(Some(Ok(_))) => continue,
            other => panic!("no accept frame: {other:?}"),
        }
    };
    let first: Value = serde_json::from_str(first.as_str()).expect("json");
    assert_eq!(first["state"], "accepted", "{first}");
    let id = first["connectionId"].as_str().expect("id").to_string();
    (ws, id)
}

/// Fires `n` sends of a 256 KiB frame at connection `id` at once; returns their statuses as
/// they come back (in a task, so the test can go on while they wait).
fn flood(node: &Node, id: &str, n: usize) -> tokio::task::JoinHandle<Vec<u16>> {
    let http = node.http.clone();
    let url = node.url(&format!("/api/core/connection/{id}/send"));
    let admin = node.admin.clone();
    tokio::spawn(async move {
        let big = json!({"type": "agent.blob", "pad": "x".repeat(256 * 1024)});
        let calls = (0..n).map(|_| {
            let req = http
                .post(&url)
                .bearer_auth(&admin)
                .json(&big)
                .timeout(Duration::from_secs(30));
            async move {
                match req.send().await {
                    Ok(r) => r.status().as_u16(),
                    Err(e) => panic!("a send got no answer: {e}"),
                }
            }
        });
        futures_util::future::join_all(calls).await
    })
}

/// Waits until the server has been blocked writing to `id` for a moment (the flood filled the
/// socket's buffers): polls until at least one send of the flood is still unanswered after a
/// second.
async fn stalled(flood: &tokio::task::JoinHandle<Vec<u16>>) {
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!flood.is_finished(), "the flood did not stall the socket");
}

/// A device still served: a REST send reaches it and answers 200.
async fn served(node: &Node, device: &mut common::Device) {
    let ping = json!({"type": "agent.ping", "payload": "still here"});
    let (status, body) = node.send(&device.id, &ping).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(device.next_json().await, ping);
}

#[tokio::test]
async fn a_device_that_stops_reading_is_dropped_with_4008_and_its_sends_answer() {
    let node = Node::start_with(|c| {
        c.heartbeat_interval = Duration::from_secs(60);
        c.write_timeout = Some(Duration::from_secs(2));
    })
    .await;
    let identity = node.provision("slow").await;
    let (_slow, id) = reluctant_device(&node, &identity).await;
    let mut bystander = node.device("bystander").await;

    let started = Instant::now();
    let statuses = flood(&node, &id, 40).await.expect("flood task");
    // Every send answered, none later than the write timeout plus the close's own bounds.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(
        statuses.iter().all(|s| [200, 409, 504].contains(s)),
        "{statuses:?}"
    );
    assert!(statuses.iter().any(|s| *s != 200), "{statuses:?}");
    let r = node
        .record_until(&id, "closed", |r| r["open"] == false)
        .await;
    assert_eq!(r["closeCode"], 4008, "{r}");
    assert_eq!(r["alive"], false, "{r}");
    assert!(
        r["closeReason"]
            .as_str()
            .unwrap_or("")
            .contains("write timeout"),
        "{r}"
    );
    served(&node, &mut bystander).await;
}

#[tokio::test]
async fn delete_answers_while_the_device_does_not_read() {
    let node = Node::start_with(|c| {
        c.heartbeat_interval = Duration::from_secs(120);
        c.write_timeout = Some(Duration::from_secs(120));
    })
    .await;
    let identity = node.provision("slow").await;
    let (_slow, id) = reluctant_device(&node, &identity).await;
    let sends = flood(&node, &id, 40);
    stalled(&sends).await;

    let (status, body) = node
        .delete(
            &format!("/api/core/connection/{id}?reason=stuck"),
            &node.admin,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let r = node.record(&id).await;
    assert_eq!(r["open"], false, "{r}");
    assert_eq!(r["closeCode"], 4000, "{r}");
    // The sends queued behind the stalled write are answered too, none with a false success
    // for a frame the device never got.
    let statuses = tokio::time::timeout(WAIT, sends)
        .await
        .expect("the queued sends answered")
        .expect("flood task");
    assert!(statuses.contains(&409), "{statuses:?}");
}

#[tokio::test]
async fn the_same_client_reconnecting_is_accepted_while_its_old_socket_is_stuck() {
    let node = Node::start_with(|c| {
        c.heartbeat_interval = Duration::from_secs(120);
        c.write_timeout = Some(Duration::from_secs(120));
    })
    .await;
    let identity = node.provision("slow").await;
    let (_slow, old) = reluctant_device(&node, &identity).await;
    let sends = flood(&node, &old, 40);
    stalled(&sends).await;

    // connect_device asserts the accept frame arrives (within WAIT).
    let fresh = node.connect_device("slow", &identity).await;
    let r = node
        .record_until(&old, "closed", |r| r["open"] == false)
        .await;
    assert_eq!(r["closeCode"], 4001, "{r}");
    assert_eq!(node.record(&fresh.id).await["open"], true);
}

#[tokio::test]
async fn liveness_is_judged_while_a_write_is_pending() {
    // The write timeout is far away: only the heartbeat can end this connection.
    let node = Node::start_with(|c| {
        c.heartbeat_interval = Duration::from_secs(1);
        c.write_timeout = Some(Duration::from_secs(120));
    })
    .await;
    let identity = node.provision("slow").await;
    let (_slow, id) = reluctant_device(&node, &identity).await;
    let _sends = flood(&node, &id, 40);
    let r = node
        .record_until(&id, "closed", |r| r["open"] == false)
        .await;
    assert_eq!(r["closeCode"], 4002, "{r}");
    assert_eq!(r["alive"], false, "{r}");
}

#[tokio::test]
async fn a_graceful_stop_is_bounded_whatever_a_device_does() {
    let node = Node::start_with(|c| {
        c.heartbeat_interval = Duration::from_secs(120);
        c.write_timeout = Some(Duration::from_secs(120));
        c.shutdown_timeout = Duration::from_secs(3);
    })
    .await;
    let identity = node.provision("slow").await;
    let (_slow, stuck) = reluctant_device(&node, &identity).await;
    let mut good = node.device("good").await;
    let sends = flood(&node, &stuck, 40);
    stalled(&sends).await;

    let good_id = good.id.clone();
    let closing = tokio::spawn(async move { good.next_close().await });
    let started = Instant::now();
    let dir = node.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "stop took {:?}",
        started.elapsed()
    );
    let frame = tokio::time::timeout(WAIT, closing)
        .await
        .expect("close in time")
        .expect("reader");
    assert_eq!(u16::from(frame.code), 1001, "{frame:?}");

    // Both records were written before the node stopped (the restart finds nothing to recover).
    let node = Node::start_in(dir, |_| {}).await;
    for id in [&stuck, &good_id] {
        let r = node.record(id).await;
        assert_eq!(r["open"], false, "{r}");
        assert_eq!(r["closeCode"], 1001, "{r}");
    }
}

#[tokio::test]
async fn a_message_waiting_on_the_store_does_not_hold_up_sends_to_that_device() {
    use sqlx::Connection;
    let node = Node::start().await;
    let mut device = node.device("patient").await;
    // Another connection takes SQLite's write lock: the device's `client.state` waits on it.
    let db = node.data_dir().join("morrigan.db");
    let mut lock = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .expect("open the database");
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut lock)
        .await
        .expect("take the write lock");
    device
        .send_json(&json!({"type": "client.state", "state": "busy"}))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let ping = json!({"type": "agent.ping", "payload": "meanwhile"});
    let started = Instant::now();
    let (status, body) = node.send(&device.id, &ping).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the send waited {:?} behind the device's message",
        started.elapsed()
    );
    let frame = tokio::time::timeout(Duration::from_secs(3), next_json(&mut device.ws))
        .await
        .expect("the frame arrived while the store was still locked");
    assert_eq!(frame, ping);
    sqlx::query("ROLLBACK")
        .execute(&mut lock)
        .await
        .expect("release the lock");
}

/// A masked text frame of `len` bytes, header and payload in one buffer.
fn raw_text_frame(len: usize) -> Vec<u8> {
    let mask = [0x11u8, 0x22, 0x33, 0x44];
    let mut frame = vec![0x81u8, 0x80 | 127];
    frame.extend_from_slice(&(len as u64).to_be_bytes());
    frame.extend_from_slice(&mask);
    frame.extend((0..len).map(|i| b'x' ^ mask[i % 4]));
    frame
}

#[tokio::test]
async fn an_oversized_frame_in_one_write_gets_the_1009_close_frame_not_a_reset() {
    let node = Node::start_with(|c| c.max_message_size = 64 * 1024).await;
    let mut device = node.device("big").await;
    let frame = raw_text_frame(4 * 1024 * 1024);
    let raw = device.ws.get_mut();
    match raw {
        tokio_tungstenite::MaybeTlsStream::Plain(tcp) => {
            tcp.write_all(&frame).await.expect("one write");
        }
        _ => panic!("plain TCP expected"),
    }
    let close: CloseFrame = next_close(&mut device.ws).await;
    assert_eq!(u16::from(close.code), 1009, "{close:?}");
    let r = node
        .record_until(&device.id, "closed", |r| r["open"] == false)
        .await;
    assert_eq!(r["closeCode"], 1009);
}
