//! A REST send to a connection another node holds, when that node cannot deliver it: 503 when
//! the owner is gone (crashed: its record still open, its lease not yet lapsed), 409 when it
//! stopped cleanly, 504 when the owner's connection does not take the frame in time. Two
//! in-process nodes on a fresh PostgreSQL database (its LISTEN/NOTIFY bus). Needs
//! `MORRIGAN_TEST_POSTGRES_URL`; without it the tests print a notice and pass, unless
//! `MORRIGAN_TEST_REQUIRE_SERVICES` is set.

mod common;

use std::time::Duration;

use common::pg::Database;
use common::{Node, WAIT};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

async fn node_on(db: &Database, tweak: impl FnOnce(&mut morrigan_server::Config)) -> Node {
    let url = db.url.clone();
    Node::start_with(move |c| {
        c.database_url = Some(url);
        tweak(c);
    })
    .await
}

fn assert_error(body: &Value, state: &str, reason_part: &str) {
    assert_eq!(body["state"], state, "{body}");
    assert_eq!(body["status"], "failed", "{body}");
    assert!(
        body["reason"].as_str().unwrap_or("").contains(reason_part),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_to_a_node_that_is_gone_answers_503_or_409() {
    let Some(pg) = common::service_url("MORRIGAN_TEST_POSTGRES_URL") else {
        return;
    };
    let db = Database::create(&pg, "send").await;
    let a = node_on(&db, |_| {}).await;
    let b = node_on(&db, |_| {}).await;
    let mut device = a.device("on-a").await;

    // Through B, over the bus: delivered.
    let ping = json!({"type": "agent.ping", "payload": "via b"});
    let (status, body) = b.send(&device.id, &ping).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(device.next_json().await, ping);

    // A crashes: its record stays open and its lease current, but nothing answers for it.
    let _a_dir = a.crash();
    let started = Instant::now();
    let (status, body) = b.send(&device.id, &ping).await;
    assert_eq!(status, 503, "{body}");
    assert_error(&body, "unavailable", "not reachable");
    assert!(started.elapsed() < WAIT, "{:?}", started.elapsed());
    let record = b.record(&device.id).await;
    assert_eq!(
        record["open"], true,
        "the crashed node's record is still open: {record}"
    );
    // Asked again, B does not wait on the silent node a second time.
    let started = Instant::now();
    let (status, body) = b.send(&device.id, &ping).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the second send waited {:?}",
        started.elapsed()
    );

    // A node that stopped cleanly closed its records (1001): a send answers 409 at once.
    let c = node_on(&db, |_| {}).await;
    let on_c = c.device("on-c").await;
    let id = on_c.id.clone();
    drop(c.stop().await);
    let (status, body) = b.send(&id, &ping).await;
    assert_eq!(status, 409, "{body}");
    assert_error(&body, "conflict", "closed");
    let record = b.record(&id).await;
    assert_eq!(record["closeCode"], 1001, "{record}");

    drop(b.stop().await);
    db.drop_now().await;
}

type RawWs = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Connects from a socket with a 4 KiB receive buffer (see tests/slow_peers.rs), past its
/// accept frame; the caller then stops reading.
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
    let first = next_text(&mut ws).await;
    assert_eq!(first["state"], "accepted", "{first}");
    let id = first["connectionId"].as_str().expect("id").to_string();
    (ws, id)
}

async fn next_text(ws: &mut RawWs) -> Value {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                return serde_json::from_str(t.as_str()).expect("JSON");
            }
            Ok(Some(Ok(_))) => continue,
            other => panic!("no text frame: {other:?}"),
        }
    }
}

/// Frames the flood sends, 512 KiB each: 12 MiB, more than the socket buffers take (Linux
/// grows the owner's send buffer to at most 4 MiB by default, `net.ipv4.tcp_wmem`).
const FRAMES: usize = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_the_owners_connection_does_not_take_answers_504_and_is_never_written() {
    let Some(pg) = common::service_url("MORRIGAN_TEST_POSTGRES_URL") else {
        return;
    };
    let db = Database::create(&pg, "send").await;
    // The owner waits long for its socket to drain, so the connection stays up with a frame
    // half written while the frames behind it wait to be taken.
    let a = node_on(&db, |c| {
        c.write_timeout = Some(Duration::from_secs(90));
        c.heartbeat_interval = Duration::from_secs(120);
    })
    .await;
    // The requester's own write timeout bounds how long it waits for an outcome beyond the
    // take deadline (10 s): short here, so the test does not wait for it long.
    let b = node_on(&db, |c| c.write_timeout = Some(Duration::from_secs(1))).await;
    let identity = a.provision("slow").await;
    let (ws, id) = reluctant_device(&a, &identity).await;
    let mut ws = Some(ws);

    // B sends FRAMES big frames at once, each numbered; the answers come back on a channel.
    let started = Instant::now();
    let (tx, mut answered) = tokio::sync::mpsc::unbounded_channel();
    for n in 0..FRAMES {
        let req = b
            .http
            .post(b.url(&format!("/api/core/connection/{id}/send")))
            .bearer_auth(&b.admin)
            .json(&json!({"type": "agent.blob", "n": n, "pad": "x".repeat(512 * 1024)}))
            .timeout(Duration::from_secs(90));
        let tx = tx.clone();
        tokio::spawn(async move {
            let res = req.send().await.expect("every send is answered");
            let _ = tx.send((n, common::read(res).await));
        });
    }
    drop(tx);
    // The frames the connection did not take are answered 504 at the take deadline. The device
    // reads again only some seconds later, past the requester's own write timeout: the frame the
    // connection had taken is then written, and B must still be waiting for it (A's write
    // timeout is what bounds it), so that it answers 200, not a 504 for a frame delivered.
    let mut answers = Vec::new();
    let mut reading = None;
    while let Some((n, (status, body))) =
        tokio::time::timeout(Duration::from_secs(60), answered.recv())
            .await
            .expect("every send answered in time")
    {
        match status {
            200 => {}
            504 => {
                assert_eq!(body["state"], "timeout", "{body}");
                if reading.is_none() {
                    let mut socket = ws.take().expect("the device");
                    reading = Some(tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(4)).await;
                        let mut got = Vec::new();
                        loop {
                            let v = next_text(&mut socket).await;
                            if v["type"] == "agent.last" {
                                return got;
                            }
                            got.push(v["n"].as_u64().expect("numbered") as usize);
                        }
                    }));
                }
            }
            other => panic!("frame {n}: {other} {body}"),
        }
        answers.push((n, status));
    }
    assert!(
        answers.iter().any(|(_, s)| *s == 504),
        "no frame was left untaken by the stalled connection: {answers:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );

    // A last small frame marks the end: every frame answered 200 arrived, and no frame answered
    // with a failure ever did.
    let (status, body) = b.send(&id, &json!({"type": "agent.last"})).await;
    assert_eq!(status, 200, "{body}");
    let delivered = tokio::time::timeout(WAIT, reading.expect("the device reads"))
        .await
        .expect("the device reads everything in time")
        .expect("reader");
    for (n, status) in &answers {
        match status {
            200 => assert!(
                delivered.contains(n),
                "frame {n} answered 200, not delivered"
            ),
            _ => assert!(
                !delivered.contains(n),
                "frame {n} was answered {status} but delivered: {delivered:?}"
            ),
        }
    }

    drop(a.stop().await);
    drop(b.stop().await);
    db.drop_now().await;
}
