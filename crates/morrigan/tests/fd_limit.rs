//! The socket cap derived from the file limit, on the real binary: `morrigan serve` started
//! with a hard `RLIMIT_NOFILE` of 256 (the default reserve) + 24 holds 24 sockets; the 25th is
//! closed as soon as it is accepted, the process never meets `EMFILE`, a connected device is
//! still served, and once sockets are released new devices get in again.

mod harness;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

const PASSWORD: &str = "fd-limit-test-password";
const WAIT: Duration = Duration::from_secs(20);
/// The default `--fd-reserve`.
const RESERVE: u64 = 256;
/// Sockets the node may hold under the file limit the test sets.
const SOCKETS: usize = 24;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A running `morrigan serve`, killed on drop.
struct Proc {
    child: Child,
    base: String,
    addr: String,
    log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// `morrigan serve` whose soft file limit is 64 and hard limit `RESERVE + SOCKETS`: the node
/// raises the soft limit to the hard one and caps its sockets at `SOCKETS`.
async fn spawn(tmp: &Path) -> Proc {
    let log = tmp.join("serve.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_morrigan"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(tmp.join("data"))
        .current_dir(tmp)
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
        .stderr(Stdio::from(
            std::fs::OpenOptions::new().append(true).open(&log).unwrap(),
        ))
        .env("MORRIGAN_LOG", "info")
        .env("MORRIGAN_ADMIN_PASSWORD", PASSWORD)
        // Idle sockets must outlive the test's steps: they are cut by the cap, not by time.
        .env("MORRIGAN_HTTP_IDLE_TIMEOUT", "60");
    for var in [
        "MORRIGAN_CONFIG",
        "MORRIGAN_DATABASE_URL",
        "MORRIGAN_MAX_HTTP_CONNECTIONS",
        "MORRIGAN_FD_RESERVE",
        "MORRIGAN_TLS_CERT",
        "MORRIGAN_TLS_KEY",
    ] {
        cmd.env_remove(var);
    }
    let hard = RESERVE + SOCKETS as u64;
    // SAFETY: setrlimit is async-signal-safe and reads a valid local struct.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: 64,
                rlim_max: hard as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("start morrigan");
    let addr = harness::wait_serving(
        &log,
        || child.try_wait().ok().flatten().map(|s| s.to_string()),
        WAIT,
    )
    .await
    .to_string();
    let mut proc = Proc {
        child,
        base: format!("http://{addr}"),
        addr,
        log,
    };
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(Some(status)) = proc.child.try_wait() {
            panic!("morrigan exited early ({status}):\n{}", proc.log_text());
        }
        if let Ok(res) = unpooled()
            .get(format!("{}/healthz", proc.base))
            .send()
            .await
            && res.status().as_u16() == 200
        {
            return proc;
        }
        assert!(
            Instant::now() < deadline,
            "no /healthz in time:\n{}",
            proc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client that keeps no idle connection: the sockets the test counts are its own.
fn unpooled() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(WAIT)
        .build()
        .unwrap()
}

async fn admin(proc: &Proc) -> String {
    let body: Value = unpooled()
        .post(format!("{}/api/auth", proc.base))
        .json(&json!({"name": "admin", "password": PASSWORD}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["token"].as_str().expect("token").to_string()
}

/// Provisions and connects `client`; returns the socket and the connection id.
async fn device(proc: &Proc, admin: &str, client: &str) -> (Ws, String) {
    let http = unpooled();
    let identity: String = http
        .post(format!("{}/api/core/client/provision", proc.base))
        .bearer_auth(admin)
        .json(&json!({"id": client}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let body: Value = http
        .post(format!("{}/api/core/connection", proc.base))
        .header("authorization", identity)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = body["token"].as_str().expect("token");
    let mut req = format!("ws://{}/api/core/connection/connect", proc.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("origin", HeaderValue::from_str(token).unwrap());
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("handshake in time")
        .expect("connect");
    let first = next_text(&mut ws).await;
    assert_eq!(first["state"], "accepted", "{first}");
    let id = first["connectionId"].as_str().unwrap().to_string();
    (ws, id)
}

async fn next_text(ws: &mut Ws) -> Value {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(t.as_str()).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Sends `request` on `s` (a keep-alive connection) and returns the status and body text of
/// the answer (which must carry a Content-Length).
async fn exchange(s: &mut TcpStream, request: &str) -> (u16, String) {
    s.write_all(request.as_bytes()).await.expect("write");
    let deadline = Instant::now() + WAIT;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("content-length");
            if buf.len() >= end + 4 + length {
                let status = head
                    .split(' ')
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .expect("status");
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + length]).into_owned();
                return (status, body);
            }
        }
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(n > 0, "connection closed before an answer");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The value of the series of `name` whose line contains `label` (if any), from `/metrics`
/// fetched over `s`.
async fn metric(s: &mut TcpStream, name: &str, label: &str) -> Option<f64> {
    let (status, text) = exchange(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status, 200);
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .find_map(|l| l.rsplit(' ').next().and_then(|v| v.parse().ok()))
}

/// Waits until the node holds exactly `n` sockets (its gauge, read over `s`).
async fn sockets_settle(s: &mut TcpStream, n: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        if metric(s, "morrigan_sockets_open", "node=").await == Some(n as f64) {
            return;
        }
        assert!(Instant::now() < deadline, "the node never held {n} sockets");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sockets_past_the_file_limit_cap_are_closed_at_once_and_devices_are_served() {
    let tmp = TempDir::new().unwrap();
    let proc = spawn(tmp.path()).await;
    let admin = admin(&proc).await;
    let (mut ws, id) = device(&proc, &admin, "fd-device").await;
    // The operator's keep-alive connection: the device's socket and this one are all left.
    let mut operator = TcpStream::connect(&proc.addr).await.unwrap();
    sockets_settle(&mut operator, 2).await;

    let mut held = Vec::new();
    for _ in 0..SOCKETS - 2 {
        held.push(TcpStream::connect(&proc.addr).await.unwrap());
    }
    sockets_settle(&mut operator, SOCKETS).await;
    let mut refused = TcpStream::connect(&proc.addr).await.unwrap();
    let mut buf = [0u8; 16];
    match tokio::time::timeout(Duration::from_secs(3), refused.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("unexpected data: {:?}", &buf[..n]),
        Err(_) => panic!(
            "the socket past the cap is still open:\n{}",
            proc.log_text()
        ),
    }
    for (i, s) in held.iter().enumerate() {
        match s.try_read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("held socket {i}: expected open and silent, got {other:?}"),
        }
    }

    // The connected device is served at the cap.
    let message = json!({"type": "agent.ping", "payload": "at the file limit"});
    let body = message.to_string();
    let send = format!(
        "POST /api/core/connection/{id}/send HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (status, answer) = exchange(&mut operator, &send).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(next_text(&mut ws).await, message);
    assert_eq!(
        metric(
            &mut operator,
            "morrigan_http_connections_refused_total",
            "reason=\"socket_limit\""
        )
        .await,
        Some(1.0)
    );

    // Released sockets make room: a new device connects.
    held.truncate(SOCKETS - 2 - 4);
    sockets_settle(&mut operator, SOCKETS - 4).await;
    let (_ws2, _) = device(&proc, &admin, "fd-device-2").await;
    let log = proc.log_text();
    assert!(!log.contains("accept failed"), "{log}");
    assert!(!log.contains("Too many open files"), "{log}");
}
