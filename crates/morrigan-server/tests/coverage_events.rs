//! The connection event stream (`GET /api/core/connection/events`) beyond its happy path: a
//! subscriber that does not read gets a `lagged` event with what it missed and then the
//! events that follow; the stream ends cleanly when the node stops; operators without a token
//! or without `api` are refused.

mod common;

use std::time::Duration;

use common::{Node, WAIT};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// An event stream read off a raw socket: de-chunks the body and splits it into SSE events.
struct RawStream {
    socket: tokio::net::TcpStream,
    /// Bytes read and not yet de-chunked.
    raw: Vec<u8>,
    /// De-chunked body not yet split into events.
    body: String,
    head_done: bool,
}

impl RawStream {
    /// Reads until one whole event is available; `None` when the body ended.
    async fn next_event(&mut self, deadline: Instant) -> Option<(String, Value)> {
        loop {
            if let Some(end) = self.body.find("\n\n") {
                let block: String = self.body.drain(..end + 2).collect();
                let mut kind = String::new();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        kind = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if kind.is_empty() && data.is_empty() {
                    continue; // a keep-alive comment
                }
                let data = serde_json::from_str(&data).expect("each data line is JSON");
                return Some((kind, data));
            }
            if !self.dechunk() {
                return None;
            }
            if self.dechunked_more() {
                continue;
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = tokio::time::timeout_at(deadline, self.socket.read(&mut chunk))
                .await
                .expect("stream data in time")
                .expect("read");
            if n == 0 {
                return None;
            }
            self.raw.extend_from_slice(&chunk[..n]);
        }
    }

    fn dechunked_more(&self) -> bool {
        self.body.contains("\n\n")
    }

    /// Moves every complete chunk from `raw` to `body`; false once the last chunk was seen.
    fn dechunk(&mut self) -> bool {
        if !self.head_done {
            let Some(i) = self.raw.windows(4).position(|w| w == b"\r\n\r\n") else {
                return true;
            };
            let head = String::from_utf8_lossy(&self.raw[..i]).to_ascii_lowercase();
            assert!(head.starts_with("http/1.1 200"), "{head}");
            assert!(head.contains("content-type: text/event-stream"), "{head}");
            assert!(head.contains("transfer-encoding: chunked"), "{head}");
            self.raw.drain(..i + 4);
            self.head_done = true;
        }
        loop {
            let Some(eol) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return true;
            };
            let size_line = String::from_utf8_lossy(&self.raw[..eol]).into_owned();
            let size = usize::from_str_radix(size_line.trim(), 16).expect("chunk size");
            if size == 0 {
                return false;
            }
            if self.raw.len() < eol + 2 + size + 2 {
                return true;
            }
            let data = self.raw[eol + 2..eol + 2 + size].to_vec();
            self.raw.drain(..eol + 2 + size + 2);
            self.body
                .push_str(std::str::from_utf8(&data).expect("UTF-8 events"));
        }
    }
}

/// Subscribes from a socket with a 4 KiB receive buffer and reads up to the `ready` event.
async fn subscribe_raw(node: &Node) -> RawStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut socket = socket.connect(node.addr).await.expect("connect");
    let request = format!(
        "GET /api/core/connection/events HTTP/1.1\r\nHost: node\r\nAuthorization: Bearer {}\r\n\r\n",
        node.admin
    );
    socket.write_all(request.as_bytes()).await.expect("request");
    let mut stream = RawStream {
        socket,
        raw: Vec::new(),
        body: String::new(),
        head_done: false,
    };
    let (kind, data) = stream
        .next_event(Instant::now() + WAIT)
        .await
        .expect("the ready event");
    assert_eq!(kind, "ready");
    assert_eq!(data, json!({"type": "ready", "node": node.node_id()}));
    stream
}

/// Events the subscriber must fall behind by: more than the bus buffers (1024) plus what the
/// server's HTTP and socket buffers can hold for a reader that stopped (at most hyper's 400 KiB
/// and a 4 MiB socket buffer: 14,000 events of this size).
const EVENTS: usize = 20_000;

/// The `n`th state: numbered, padded to the longest state (128 bytes) so that the buffers
/// fill with fewer events.
fn state(n: usize) -> String {
    format!("s-{n}-{}", "p".repeat(128))[..128].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_falls_behind_gets_lagged_then_the_newer_events() {
    let node = Node::start_with(|c| c.max_messages_per_second = 100_000).await;
    let mut stream = subscribe_raw(&node).await;
    let mut device = node.device("chatty").await;

    // Every client.state is stored, then published as a client-state event. The subscriber
    // reads nothing meanwhile.
    for i in 0..EVENTS {
        device
            .send_json(&json!({"type": "client.state", "state": state(i)}))
            .await;
    }
    device
        .send_json(&json!({"type": "client.state", "state": "marker"}))
        .await;
    // Messages are handled in order: once the probe is answered, every state was published.
    device.send_json(&json!({"type": "probe.done"})).await;
    // A generous bound: on a loaded machine the burst takes well over the usual frame wait.
    let reply = device.next_json_within(Duration::from_secs(60)).await;
    assert_eq!(reply["messageType"], "probe.done", "{reply}");

    // Now read: the oldest events, then `lagged` with a count, then the newest ones. Each
    // event's place in what was published: `connected`, state(0) .. state(EVENTS - 1), the marker.
    let place = |kind: &str, data: &Value| -> usize {
        assert_eq!(data["clientId"], "chatty", "{data}");
        match (kind, data["state"].as_str()) {
            ("connected", _) => 0,
            ("client-state", Some("marker")) => EVENTS + 1,
            ("client-state", Some(s)) => {
                let n = s
                    .strip_prefix("s-")
                    .and_then(|rest| rest.split('-').next())
                    .and_then(|n| n.parse::<usize>().ok())
                    .expect("a numbered state");
                assert_eq!(s, state(n));
                1 + n
            }
            _ => panic!("unexpected event {kind}: {data}"),
        }
    };
    let mut before = Vec::new();
    let mut missed = None;
    let mut after = Vec::new();
    loop {
        let (kind, data) = stream
            .next_event(Instant::now() + WAIT)
            .await
            .expect("the stream goes on up to the marker");
        if kind == "lagged" {
            assert!(missed.is_none(), "one lagged event: {data}");
            assert_eq!(data["type"], "lagged", "{data}");
            let n = data["missed"].as_u64().expect("missed is a count");
            assert!(n > 0, "{data}");
            missed = Some(n as usize);
            continue;
        }
        let at = place(&kind, &data);
        if missed.is_none() {
            before.push(at);
        } else {
            after.push(at);
        }
        if at == EVENTS + 1 {
            break;
        }
    }
    let missed = missed.expect("a lagged event before the marker");
    // Nothing is delivered twice or out of order, and the count is exact: the events before
    // the gap are the oldest, those after it the newest, and `missed` is the gap between.
    assert_eq!(before, (0..before.len()).collect::<Vec<_>>());
    let resumed = before.len() + missed;
    assert_eq!(after, (resumed..=EVENTS + 1).collect::<Vec<_>>());
    // The node goes on serving the device.
    device.assert_served(&node).await;
}

#[tokio::test]
async fn the_stream_ends_when_the_node_stops() {
    let node = Node::start().await;
    let mut res = node
        .http
        .get(node.url("/api/core/connection/events"))
        .bearer_auth(&node.admin)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("subscribe");
    assert_eq!(res.status().as_u16(), 200);
    let mut text = String::new();
    while !text.contains("\n\n") {
        let chunk = tokio::time::timeout(WAIT, res.chunk())
            .await
            .expect("the ready event in time")
            .expect("read")
            .expect("the stream is open");
        text.push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
    }
    assert!(text.starts_with("event: ready"), "{text}");

    let stopping = tokio::spawn(node.stop());
    // The body ends (cleanly, not cut) once the node stops, long before a keep-alive comment.
    let deadline = Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, res.chunk())
            .await
            .expect("the stream ends in time")
        {
            Ok(None) => break,
            Ok(Some(chunk)) => {
                let more = String::from_utf8_lossy(&chunk);
                assert!(
                    !more.contains("event: ") || more.contains("event: disconnected"),
                    "{more}"
                );
            }
            Err(e) => panic!("the stream was cut instead of ended: {e}"),
        }
    }
    tokio::time::timeout(Duration::from_secs(20), stopping)
        .await
        .expect("the node stops in time")
        .expect("stop task");
}

#[tokio::test]
async fn the_stream_is_refused_without_a_token_or_the_api_function() {
    let node = Node::start().await;
    let path = "/api/core/connection/events";
    let (status, body) = node.call(Method::GET, path, None, None).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["state"], "authenticationfailed", "{body}");
    let (status, body) = node.get(path, "not-a-token").await;
    assert_eq!(status, 401, "{body}");
    let (_, outsider) = node.identity_with("no-api", &["connection.close"]).await;
    let (status, body) = node.get(path, &outsider).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["state"], "forbidden", "{body}");
    assert!(
        body["reason"].as_str().unwrap_or("").contains("'api'"),
        "{body}"
    );
}
