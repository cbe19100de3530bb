//! The real binary: `morrigan serve` as an operator runs it. First start without a password,
//! SIGTERM with a connected device, kill -9 and restart, and `morrigan.toml` with flags over it.
//!
//! Every server listens on `127.0.0.1:0`; the test reads the port it bound from its log.

mod harness;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

const PASSWORD: &str = "process-test-password";
const WAIT: Duration = Duration::from_secs(20);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A running `morrigan serve`, killed on drop.
struct Proc {
    child: Child,
    base: String,
    log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `morrigan` with none of the caller's `MORRIGAN_*` settings.
fn clean_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_morrigan"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("MORRIGAN_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Starts `morrigan <args>` in `cwd` (so no stray ./morrigan.toml is read), reads the address
/// it bound from its log, and waits for `/healthz` there.
async fn spawn(cwd: &Path, args: &[&str], password: Option<&str>) -> Proc {
    static RUN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = cwd.join(format!("serve-{n}.log"));
    let mut cmd = clean_command();
    cmd.args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
        .stderr(Stdio::from(
            std::fs::OpenOptions::new().append(true).open(&log).unwrap(),
        ))
        .env("MORRIGAN_LOG", "info");
    if let Some(p) = password {
        cmd.env("MORRIGAN_ADMIN_PASSWORD", p);
    }
    let mut child = cmd.spawn().expect("start morrigan");
    let addr = harness::wait_serving(
        &log,
        || child.try_wait().ok().flatten().map(|s| s.to_string()),
        WAIT,
    )
    .await;
    let mut proc = Proc {
        child,
        base: format!("http://{addr}"),
        log,
    };
    let http = http();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(Some(status)) = proc.child.try_wait() {
            panic!("morrigan exited early ({status}):\n{}", proc.log_text());
        }
        if let Ok(res) = http.get(format!("{}/healthz", proc.base)).send().await
            && res.status().as_u16() == 200
        {
            return proc;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no /healthz in time:\n{}",
            proc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An HTTP client whose every request is bounded by [`WAIT`].
fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(WAIT).build().unwrap()
}

/// `morrigan serve --listen 127.0.0.1:0 --data-dir <data>` with the admin password set.
async fn serve(tmp: &Path, data: &Path) -> Proc {
    spawn(
        tmp,
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        Some(PASSWORD),
    )
    .await
}

impl Proc {
    /// The port the server bound.
    fn port(&self) -> u16 {
        self.base.rsplit(':').next().unwrap().parse().unwrap()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill {sig}");
    }

    /// Waits (bounded) for the process to exit.
    async fn exit_within(&mut self, limit: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "still running after {limit:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn login(&self, password: &str) -> (u16, Value) {
        let res = http()
            .post(format!("{}/api/auth", self.base))
            .json(&json!({"name": "admin", "password": password}))
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    async fn admin(&self) -> String {
        let (status, body) = self.login(PASSWORD).await;
        assert_eq!(status, 200, "{body}");
        body["token"].as_str().unwrap().to_string()
    }

    async fn get(&self, path: &str, token: &str) -> (u16, Value) {
        let res = http()
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    /// Provisions `client` and returns a connection token.
    async fn connection_token(&self, admin: &str, client: &str) -> String {
        let http = http();
        let identity: String = http
            .post(format!("{}/api/core/client/provision", self.base))
            .bearer_auth(admin)
            .json(&json!({"id": client}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let body: Value = http
            .post(format!("{}/api/core/connection", self.base))
            .header("authorization", identity)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["token"].as_str().expect("token").to_string()
    }

    /// Provisions and connects `client`; returns the socket and the connection id.
    async fn device(&self, admin: &str, client: &str) -> (Ws, String) {
        let token = self.connection_token(admin, client).await;
        let url = format!(
            "{}/api/core/connection/connect",
            self.base.replace("http://", "ws://")
        );
        let mut req = url.into_client_request().unwrap();
        req.headers_mut()
            .insert("origin", HeaderValue::from_str(&token).unwrap());
        let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
            .await
            .unwrap()
            .expect("connect");
        let first = next_text(&mut ws).await;
        assert_eq!(first["state"], "accepted", "{first}");
        let id = first["connectionId"].as_str().unwrap().to_string();
        (ws, id)
    }
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

/// The close code the socket receives, or `None` if it ends without a close frame.
async fn close_code(ws: &mut Ws) -> Option<u16> {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(other)) => panic!("unexpected {other:?}"),
            Some(Err(_)) | None => return None,
        }
    }
}

#[tokio::test]
async fn first_start_without_a_password_writes_a_private_generated_one() {
    let tmp = TempDir::new().unwrap();
    let data = tmp.path().join("data");
    let proc = spawn(
        tmp.path(),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        None,
    )
    .await;
    let file = data.join("initial-admin-password");
    let meta = std::fs::metadata(&file).expect("initial-admin-password written");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
    let _ = meta;
    let password = std::fs::read_to_string(&file).unwrap().trim().to_string();
    assert!(password.len() >= 16, "a strong generated password");
    let (status, body) = proc.login(&password).await;
    assert_eq!(status, 200, "{body}");
    // The log says where it is, not what it is.
    let log = proc.log_text();
    assert!(log.contains("initial-admin-password"), "{log}");
    assert!(!log.contains(&password), "the password must not be logged");
    // No hard-coded fallback.
    for guess in ["admin", "password", "morrigan"] {
        assert_eq!(proc.login(guess).await.0, 403);
    }
}

#[tokio::test]
async fn sigterm_closes_sockets_with_1001_writes_records_and_exits_0() {
    let tmp = TempDir::new().unwrap();
    let data = tmp.path().join("data");
    let mut proc = serve(tmp.path(), &data).await;
    let admin = proc.admin().await;
    let (mut ws, id) = proc.device(&admin, "dev").await;
    let reader = tokio::spawn(async move { close_code(&mut ws).await });

    proc.signal("-TERM");
    let status = proc.exit_within(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{}", proc.log_text());
    assert_eq!(reader.await.unwrap(), Some(1001));
    drop(proc);

    let proc = serve(tmp.path(), &data).await;
    let admin = proc.admin().await;
    let (status, r) = proc
        .get(&format!("/api/core/connection/{id}"), &admin)
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["open"], false, "{r}");
    assert_eq!(r["alive"], false, "{r}");
    assert_eq!(r["closeCode"], 1001, "{r}");
    assert!(r["disconnected"].is_string(), "{r}");
}

#[tokio::test]
async fn after_kill_9_a_restart_closes_the_record_left_open() {
    let tmp = TempDir::new().unwrap();
    let data = tmp.path().join("data");
    let mut proc = serve(tmp.path(), &data).await;
    let admin = proc.admin().await;
    let (mut ws, id) = proc.device(&admin, "dev").await;

    proc.signal("-KILL");
    let status = proc.exit_within(Duration::from_secs(10)).await;
    assert_eq!(status.code(), None, "killed by a signal");
    // No close frame from a killed process.
    assert_eq!(close_code(&mut ws).await, None);
    drop(proc);

    let proc = serve(tmp.path(), &data).await;
    let admin = proc.admin().await;
    let (status, r) = proc
        .get(&format!("/api/core/connection/{id}"), &admin)
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["open"], false, "{r}");
    assert_eq!(r["alive"], false, "{r}");
    assert!(r["disconnected"].is_string(), "{r}");
    let (_, open) = proc.get("/api/core/connection?open=true", &admin).await;
    assert_eq!(open, json!([]));
}

#[tokio::test]
async fn morrigan_toml_is_read_and_flags_override_it() {
    let tmp = TempDir::new().unwrap();
    let data = tmp.path().join("data");
    // ./morrigan.toml in the working directory is read by default.
    std::fs::write(
        tmp.path().join("morrigan.toml"),
        format!(
            "listen = \"127.0.0.2:0\"\ndata_dir = \"{}\"\npublic_url = \"https://from-file.example\"\n",
            data.display()
        ),
    )
    .unwrap();
    let proc = spawn(tmp.path(), &["serve"], Some(PASSWORD)).await;
    // (127.0.0.2: a loopback address of its own, so the default cannot pass for it.)
    assert!(
        proc.base.starts_with("http://127.0.0.2:"),
        "listen from the file: {}",
        proc.base
    );
    assert!(data.join("morrigan.db").exists(), "data_dir from the file");
    let admin = proc.admin().await;
    let token = proc.connection_token(&admin, "dev").await;
    assert_eq!(
        report_url(&token),
        "https://from-file.example/api/core/connection/connect"
    );
    drop(proc);

    // A flag wins over the file (here given with --config).
    let config = tmp.path().join("other.toml");
    std::fs::rename(tmp.path().join("morrigan.toml"), &config).unwrap();
    let proc = spawn(
        tmp.path(),
        &[
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--public-url",
            "https://from-flag.example/",
        ],
        Some(PASSWORD),
    )
    .await;
    let admin = proc.admin().await;
    let token = proc.connection_token(&admin, "dev").await;
    assert_eq!(
        report_url(&token),
        "https://from-flag.example/api/core/connection/connect"
    );
    drop(proc);

    // An unknown key is an error naming it, not silently ignored (ignored, the server would
    // start on the default address, and be killed at the deadline).
    std::fs::write(
        &config,
        format!(
            "listen_on = \"127.0.0.1:1\"\ndata_dir = \"{}\"\n",
            data.display()
        ),
    )
    .unwrap();
    let mut cmd = tokio::process::Command::from(clean_command());
    cmd.args(["serve", "--config", config.to_str().unwrap()])
        .current_dir(tmp.path())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("morrigan serve exits at once on an unknown key")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("unknown field `listen_on`") && stderr.contains("other.toml"),
        "the error names the key and the file: {stderr}"
    );
    assert!(!stderr.contains("serving"), "{stderr}");
}

fn report_url(jwt: &str) -> String {
    use base64::Engine;
    let payload = jwt.split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    claims["reportUrl"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn sigterm_exits_0_in_time_while_a_device_does_not_read() {
    let tmp = TempDir::new().unwrap();
    let data = tmp.path().join("data");
    let mut proc = spawn(
        tmp.path(),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--heartbeat-interval",
            "120",
            "--write-timeout",
            "120",
        ],
        Some(PASSWORD),
    )
    .await;
    let admin = proc.admin().await;
    let (mut good, _) = proc.device(&admin, "good").await;
    let port = proc.port();
    let good_reader = tokio::spawn(async move { close_code(&mut good).await });

    // A device with a small receive buffer that reads its accept frame and nothing more.
    let token = proc.connection_token(&admin, "stuck").await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket
        .connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .unwrap();
    let mut req = format!("ws://127.0.0.1:{port}/api/core/connection/connect")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("origin", HeaderValue::from_str(&token).unwrap());
    let (mut stuck, _) = tokio_tungstenite::client_async(req, stream).await.unwrap();
    let first = loop {
        match tokio::time::timeout(WAIT, stuck.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) => break serde_json::from_str::<Value>(t.as_str()).unwrap(),
            Some(Ok(_)) => continue,
            other => panic!("no accept frame: {other:?}"),
        }
    };
    let stuck_id = first["connectionId"].as_str().unwrap().to_string();
    // Fill its socket: large sends the device never reads.
    let http = http();
    let big = json!({"type": "agent.blob", "pad": "x".repeat(256 * 1024)});
    let url = format!("{}/api/core/connection/{stuck_id}/send", proc.base);
    let mut flood = Vec::new();
    for _ in 0..40 {
        let req = http.post(&url).bearer_auth(&admin).json(&big).send();
        flood.push(tokio::spawn(req));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let started = std::time::Instant::now();
    proc.signal("-TERM");
    let status = proc.exit_within(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{}", proc.log_text());
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(good_reader.await.unwrap(), Some(1001));
    drop(stuck);
}

/// `(VmRSS, VmHWM)` of process `pid`, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// `POST /api/auth` over a socket bound to `local`, as plain HTTP/1.1; the status code, or 0 if
/// the exchange failed or took longer than [`WAIT`].
async fn raw_login(port: u16, local: std::net::Ipv4Addr, name: &str, password: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let socket = tokio::net::TcpSocket::new_v4().ok()?;
        socket.bind((local, 0).into()).ok()?;
        let mut stream = socket.connect(([127, 0, 0, 1], port).into()).await.ok()?;
        let body = json!({"name": name, "password": password}).to_string();
        let request = format!(
            "POST /api/auth HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.ok()?;
        let text = String::from_utf8_lossy(&answer);
        text.split(' ').nth(1)?.parse::<u16>().ok()
    };
    tokio::time::timeout(WAIT, exchange)
        .await
        .ok()
        .flatten()
        .unwrap_or(0)
}

/// 500 concurrent logins with unknown names, each from its own address (so none is throttled
/// and every one asks for a password hash): the server's memory stays within a fixed bound
/// over its warm baseline, every login is answered (403, or 503 when the hashers are busy),
/// and the memory returns afterwards.
#[tokio::test]
async fn a_burst_of_logins_keeps_memory_bounded_and_it_returns() {
    /// Peak resident memory allowed over the warm baseline during the burst.
    const PEAK_OVER_BASELINE_KIB: u64 = 64 * 1024;
    /// Resident memory allowed over the warm baseline once the burst is answered.
    const AFTER_OVER_BASELINE_KIB: u64 = 32 * 1024;
    const LOGINS: usize = 500;
    let tmp = TempDir::new().unwrap();
    let data = tmp.path().join("data");
    let proc = serve(tmp.path(), &data).await;
    let port = proc.port();
    let pid = proc.child.id();
    let address =
        |i: usize| std::net::Ipv4Addr::new(127, 0, 10 + (i / 250) as u8, 1 + (i % 250) as u8);

    // Warm: the hashers have run, the admin has logged in.
    proc.admin().await;
    let warm = futures_util::future::join_all((0..8).map(|i| {
        raw_login(
            port,
            std::net::Ipv4Addr::new(127, 0, 9, 1 + i),
            "warm-up",
            "wrong-password",
        )
    }))
    .await;
    assert!(
        warm.iter().all(|s| [403, 503].contains(s)),
        "warm-up: {warm:?}"
    );
    let (baseline, _) = memory_kib(pid);

    // The burst, watched: stop at once if the bound is crossed.
    let names: Vec<String> = (0..LOGINS).map(|i| format!("nobody-{i}")).collect();
    let burst = futures_util::future::join_all(
        names
            .iter()
            .enumerate()
            .map(|(i, name)| raw_login(port, address(i), name, "wrong-password")),
    );
    let watch = async {
        loop {
            let (rss, _) = memory_kib(pid);
            if rss > baseline + PEAK_OVER_BASELINE_KIB {
                return rss;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let started = tokio::time::Instant::now();
    let statuses = tokio::select! {
        statuses = burst => statuses,
        rss = watch => panic!(
            "resident memory {} MiB during the burst, over the bound {} + {} MiB",
            rss / 1024, baseline / 1024, PEAK_OVER_BASELINE_KIB / 1024
        ),
    };
    let took = started.elapsed();
    let (_, peak) = memory_kib(pid);
    let busy = statuses.iter().filter(|s| **s == 503).count();
    let refused = statuses.iter().filter(|s| **s == 403).count();
    assert_eq!(
        busy + refused,
        LOGINS,
        "every login answered 403 or 503 within {WAIT:?}: {:?}",
        statuses
            .iter()
            .filter(|s| ![403, 503].contains(*s))
            .collect::<Vec<_>>()
    );
    assert!(
        peak <= baseline + PEAK_OVER_BASELINE_KIB,
        "peak resident memory {} MiB over a baseline of {} MiB",
        peak / 1024,
        baseline / 1024
    );
    eprintln!(
        "burst of {LOGINS} logins in {took:?}: {refused} checked, {busy} busy; \
         baseline {} KiB, peak {} KiB",
        baseline, peak
    );

    // The memory comes back.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (rss, _) = memory_kib(pid);
        if rss <= baseline + AFTER_OVER_BASELINE_KIB {
            eprintln!("after the burst: {rss} KiB");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "resident memory {} MiB {WAIT:?} after the burst, baseline {} MiB",
            rss / 1024,
            baseline / 1024
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Still serving.
    proc.admin().await;
}
