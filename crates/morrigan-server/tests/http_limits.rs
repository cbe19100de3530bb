//! The HTTP layer's bounds, over raw sockets: silent and idle connections are closed, a body
//! must arrive in time and within the size limit, a request needs a `Host`, every error answer
//! is JSON, and past the cap on not-yet-upgraded connections a new one is closed at once while
//! connected devices are still served.

mod common;

use std::time::Duration;

use common::{Node, WAIT};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Slack on top of a configured bound before a wait counts as failed (a busy machine).
const SLACK: Duration = Duration::from_secs(4);

/// One HTTP response read off a raw socket.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    /// Lower-cased names.
    headers: Vec<(String, String)>,
    body: Value,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Asserts the body is the project's error JSON.
    fn assert_error_json(&self) {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{self:?}"
        );
        assert_eq!(self.body["status"], "failed", "{self:?}");
        assert!(self.body["state"].is_string(), "{self:?}");
        assert!(
            !self.body["reason"].as_str().unwrap_or("").is_empty(),
            "{self:?}"
        );
    }
}

/// Reads one response (head, then a `Content-Length` body, or up to EOF) within `limit`.
async fn read_response_within<R: AsyncRead + Unpin>(s: &mut R, limit: Duration) -> RawResponse {
    let deadline = Instant::now() + limit;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .expect("a response in time")
            .expect("read");
        assert!(
            n > 0,
            "connection closed before a response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let mut body = buf[head_end..].to_vec();
    loop {
        if length.is_some_and(|l| body.len() >= l) {
            break;
        }
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .expect("the body in time")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    RawResponse {
        status,
        headers,
        body: common::parse_body(&body),
    }
}

async fn read_response(s: &mut TcpStream) -> RawResponse {
    read_response_within(s, WAIT).await
}

/// Waits (at most `limit`) for the peer to close `s`: EOF or a reset. Panics on data or when
/// the socket is still open after `limit`; returns how long it took.
async fn assert_closed_within<R: AsyncRead + Unpin>(
    s: &mut R,
    limit: Duration,
    what: &str,
) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    match tokio::time::timeout(limit, s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => started.elapsed(),
        Ok(Ok(n)) => panic!(
            "{what}: expected the connection closed, got {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(_) => panic!("{what}: still open after {limit:?}"),
    }
}

/// Asserts `s` is open with nothing to read (the server has neither answered nor closed it).
fn assert_open(s: &TcpStream, what: &str) {
    let mut buf = [0u8; 64];
    match s.try_read(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("{what}: expected an open, silent socket, got {other:?}"),
    }
}

async fn connect(node: &Node) -> TcpStream {
    tokio::time::timeout(WAIT, TcpStream::connect(node.addr))
        .await
        .expect("connect in time")
        .expect("connect")
}

/// Sends `request` (raw bytes) on a new connection and reads the answer.
async fn exchange(node: &Node, request: &[u8]) -> RawResponse {
    let mut s = connect(node).await;
    s.write_all(request).await.expect("write");
    read_response(&mut s).await
}

/// A client that never keeps a connection idle in a pool, so that the connections a test
/// counts are only its own.
fn unpooled() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(WAIT)
        .build()
        .expect("client")
}

/// The value of the series of `name` whose labels contain `label`, from `GET /metrics`.
async fn metric(node: &Node, name: &str, label: &str) -> Option<f64> {
    // Unpooled: a pooled connection may be closed by the idle bound just as it is reused.
    let text = unpooled()
        .get(node.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .find_map(|l| l.rsplit(' ').next().and_then(|v| v.parse().ok()))
}

#[tokio::test]
async fn a_silent_socket_is_closed_within_the_idle_bound() {
    let idle = Duration::from_secs(1);
    let node = Node::start_with(|c| c.http_idle_timeout = idle).await;
    let mut s = connect(&node).await;
    assert_closed_within(&mut s, idle + SLACK, "a socket that never sent a byte").await;
    let cut = metric(
        &node,
        "morrigan_http_connections_cut_total",
        "reason=\"idle\"",
    )
    .await;
    assert!(cut.is_some_and(|n| n >= 1.0), "{cut:?}");
}

#[tokio::test]
async fn a_silent_tls_connection_is_closed_after_its_handshake() {
    let idle = Duration::from_secs(1);
    let dir = tempfile::TempDir::new().expect("temp dir");
    let files = common::self_signed(dir.path());
    let node = Node::start_with(|c| {
        c.http_idle_timeout = idle;
        c.tls = Some(files.clone());
    })
    .await;
    let pem = std::fs::read_to_string(&files.cert).expect("cert");
    let connector = tokio_rustls::TlsConnector::from(common::rustls_config(&pem));
    let tcp = connect(&node).await;
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = tokio::time::timeout(WAIT, connector.connect(name, tcp))
        .await
        .expect("handshake in time")
        .expect("handshake");
    assert_closed_within(&mut tls, idle + SLACK, "a silent TLS connection").await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let idle = Duration::from_secs(1);
    let node = Node::start_with(|c| c.http_idle_timeout = idle).await;
    let mut s = connect(&node).await;
    for _ in 0..2 {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let res = read_response(&mut s).await;
        assert_eq!(res.status, 200, "{res:?}");
    }
    assert_closed_within(&mut s, idle + SLACK, "an idle keep-alive connection").await;
}

#[tokio::test]
async fn requests_in_flight_and_websockets_are_not_idle() {
    let idle = Duration::from_secs(1);
    let node = Node::start_with(|c| c.http_idle_timeout = idle).await;
    let mut device = node.device("still-here").await;
    // An event stream: one request whose response lasts longer than the idle bound.
    let mut s = connect(&node).await;
    let req = format!(
        "GET /api/core/connection/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        node.admin
    );
    s.write_all(req.as_bytes()).await.expect("write");
    // Let three idle bounds pass (the point of the test is that time passes).
    common::pause(idle * 3).await;
    device.assert_served(&node).await;
    let _second = node.device("after-the-pause").await;
    // The stream delivers the second device's `connected` event.
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .expect("the connected event in time")
            .expect("read");
        assert!(n > 0, "the event stream was closed");
        seen.extend_from_slice(&chunk[..n]);
        if String::from_utf8_lossy(&seen).contains("after-the-pause") {
            break;
        }
    }
}

#[tokio::test]
async fn a_trickled_body_gets_408_json_within_the_deadline() {
    let deadline = Duration::from_secs(2);
    let node = Node::start_with(|c| c.http_body_timeout = deadline).await;
    let mut s = connect(&node).await;
    s.write_all(
        b"POST /api/auth HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 64\r\n\r\n{",
    )
    .await
    .expect("write");
    let (mut rd, mut wr) = s.into_split();
    let trickle = tokio::spawn(async move {
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if wr.write_all(b" ").await.is_err() {
                return;
            }
        }
    });
    let res = read_response_within(&mut rd, deadline + SLACK).await;
    trickle.abort();
    assert_eq!(res.status, 408, "{res:?}");
    res.assert_error_json();
    assert_eq!(res.header("connection"), Some("close"), "{res:?}");
    assert_closed_within(&mut rd, SLACK, "the connection after a 408").await;
    let refused = metric(
        &node,
        "morrigan_http_requests_refused_total",
        "reason=\"body_timeout\"",
    )
    .await;
    assert_eq!(refused, Some(1.0));
}

#[tokio::test]
async fn a_declared_length_over_the_limit_gets_413_json_at_once() {
    let node = Node::start().await;
    // The body never comes: the answer must not wait for it.
    let res = exchange(
        &node,
        b"POST /api/auth HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000000000\r\n\r\n{}",
    )
    .await;
    assert_eq!(res.status, 413, "{res:?}");
    res.assert_error_json();
    // The same on the send route, which reads its body as raw bytes.
    let req = format!(
        "POST /api/core/connection/00000000-0000-0000-0000-000000000000/send HTTP/1.1\r\nHost: x\r\n\
         Authorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 1000000000000\r\n\r\n{{}}",
        node.admin
    );
    let res = exchange(&node, req.as_bytes()).await;
    assert_eq!(res.status, 413, "{res:?}");
    res.assert_error_json();
    let refused = metric(
        &node,
        "morrigan_http_requests_refused_total",
        "reason=\"body_too_large\"",
    )
    .await;
    assert_eq!(refused, Some(2.0));
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_on_the_send_route_gets_413_json() {
    let node = Node::start_with(|c| c.max_message_size = 1024).await;
    let mut s = connect(&node).await;
    let head = format!(
        "POST /api/core/connection/00000000-0000-0000-0000-000000000000/send HTTP/1.1\r\nHost: x\r\n\
         Authorization: Bearer {}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        node.admin
    );
    s.write_all(head.as_bytes()).await.expect("write");
    // 64 KiB in 4 KiB chunks, well over 1 KiB + 16 KiB; the server may answer and close early.
    let chunk = format!("1000\r\n{}\r\n", "x".repeat(4096));
    for _ in 0..16 {
        if s.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n").await;
    let res = read_response(&mut s).await;
    assert_eq!(res.status, 413, "{res:?}");
    res.assert_error_json();
}

#[tokio::test]
async fn a_request_without_host_gets_400_json() {
    let node = Node::start().await;
    let res = exchange(&node, b"GET /healthz HTTP/1.1\r\n\r\n").await;
    assert_eq!(res.status, 400, "{res:?}");
    res.assert_error_json();
    let res = exchange(
        &node,
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    )
    .await;
    assert_eq!(res.status, 400, "two Host fields: {res:?}");
    res.assert_error_json();
    // HTTP/1.0 does not require Host.
    let res = exchange(&node, b"GET /healthz HTTP/1.0\r\n\r\n").await;
    assert_eq!(res.status, 200, "{res:?}");
    let res = exchange(&node, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(res.status, 200, "{res:?}");
}

#[tokio::test]
async fn framework_errors_are_json() {
    let node = Node::start().await;
    // 405 from the router, with its Allow header kept.
    let res = exchange(&node, b"DELETE /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(res.status, 405, "{res:?}");
    res.assert_error_json();
    assert!(res.header("allow").is_some(), "{res:?}");
    // A header block over the limit the layer enforces (below hyper's own buffer).
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Filler: {}\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    let res = exchange(&node, big.as_bytes()).await;
    assert_eq!(res.status, 431, "{res:?}");
    res.assert_error_json();
}

#[tokio::test]
async fn past_the_http_cap_new_connections_are_closed_at_once_and_devices_are_served() {
    const CAP: usize = 4;
    let idle = Duration::from_secs(8);
    let mut node = Node::start_with(|c| {
        c.max_http_connections = CAP;
        c.http_idle_timeout = idle;
    })
    .await;
    node.http = unpooled();
    let mut device = node.device("connected-before").await;
    // Only the device's WebSocket is left: wait until no plain HTTP connection is open.
    let deadline = Instant::now() + WAIT;
    while node.state().http_connections() > 0 {
        assert!(Instant::now() < deadline, "HTTP connections left open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The cap's worth of idle sockets: one will carry an operator's request later.
    let mut held = Vec::new();
    for _ in 0..CAP {
        held.push(connect(&node).await);
    }
    let mut refused = connect(&node).await;
    let took = assert_closed_within(
        &mut refused,
        Duration::from_secs(3),
        "the socket past the cap",
    )
    .await;
    assert!(took < idle, "closed by the cap, not the idle bound");
    for (i, s) in held.iter().enumerate() {
        assert_open(s, &format!("held socket {i}"));
    }
    // The connected device is served: an operator's send reaches its socket.
    let message = json!({"type": "agent.ping", "payload": "through the cap"});
    let body = message.to_string();
    let req = format!(
        "POST /api/core/connection/{}/send HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        device.id,
        node.admin,
        body.len()
    );
    let operator = &mut held[0];
    operator.write_all(req.as_bytes()).await.expect("write");
    let res = read_response(operator).await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(device.next_json().await, message);
    // Once the idle sockets are cut, new connections (and devices) get in again.
    for (i, s) in held.iter_mut().enumerate() {
        assert_closed_within(s, idle + SLACK, &format!("held socket {i}")).await;
    }
    let mut second = node.device("connected-after").await;
    second.assert_served(&node).await;
    device.assert_served(&node).await;
    let refused = metric(
        &node,
        "morrigan_http_connections_refused_total",
        "reason=\"http_limit\"",
    )
    .await;
    assert_eq!(refused, Some(1.0));
}

#[tokio::test]
async fn a_response_the_client_does_not_read_is_cut_after_the_write_timeout() {
    let node = Node::start_with(|c| c.write_timeout = Some(Duration::from_secs(1))).await;
    // A client with a small receive buffer asks (pipelined) for more than the kernel's buffers
    // hold and never reads it.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut s = socket.connect(node.addr).await.expect("connect");
    let request = format!(
        "GET /api-docs/view/swagger-ui-bundle.js HTTP/1.1\r\nHost: {}\r\n\r\n",
        node.addr
    );
    s.write_all(request.repeat(16).as_bytes())
        .await
        .expect("write");
    let deadline = Instant::now() + Duration::from_secs(1) + SLACK;
    loop {
        if metric(
            &node,
            "morrigan_http_connections_cut_total",
            "write_timeout",
        )
        .await
            == Some(1.0)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stalled response was not cut within the write timeout"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The connection is gone: what was sent before the cut, then the end.
    let mut sink = vec![0u8; 64 * 1024];
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match s.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection was not closed");
}
