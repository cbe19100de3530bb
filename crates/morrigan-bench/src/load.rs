//! The device and operator side of a load run: login, provisioning, token exchange, WebSocket
//! with the token in `Origin`, holding sockets (pings are answered while they are polled), REST
//! sends with a timestamp in each frame, and connect/close cycles.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow};
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use morrigan_protocol::close;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

use crate::stats::{Failures, Latency};

/// How long one connect (exchange + upgrade + accepted frame) may take before it counts as a
/// `timeout` failure.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a REST call may take.
pub const REST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the load goes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    /// Base URL of the node devices connect to, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    /// Base URL REST sends go through (another node for `cluster-send`); default `url`.
    pub send_url: Option<String>,
    pub admin_name: String,
    pub admin_password: String,
    /// `ack` or `reply`: sends are tracked (`?track=…`) and wait for the device's answer,
    /// which every held socket gives.
    #[serde(default)]
    pub track: Option<String>,
}

/// The client's small WebSocket buffers: 19,000 sockets per process must stay cheap.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
}

pub type Ws = WebSocketStream<TcpStream>;

/// Now, as nanoseconds since the epoch (the sender and the device share the clock).
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The frame a send carries: its type and when the REST call started. A `bench.call` asks
/// a held socket for a reply (tracked sends with `track=reply`).
pub fn bench_frame(seq: u64, call: bool) -> String {
    let ty = if call { "bench.call" } else { "bench.ping" };
    format!(r#"{{"type":"{ty}","t":{},"seq":{seq}}}"#, now_ns())
}

/// The operator and device side against one target.
pub struct Driver {
    pub http: reqwest::Client,
    pub target: Target,
    pub user_token: String,
    /// Source addresses for WebSocket sockets, used in turn.
    pub sources: Vec<Ipv4Addr>,
    next_source: AtomicU64,
}

#[derive(Deserialize)]
struct TokenBody {
    token: String,
}

impl Driver {
    /// Logs in as the admin identity.
    pub async fn login(
        target: Target,
        sources: Vec<Ipv4Addr>,
        rest_source: Option<Ipv4Addr>,
    ) -> Result<Self> {
        let mut b = reqwest::Client::builder()
            .http1_only()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(4096)
            .timeout(REST_TIMEOUT)
            .no_proxy();
        if let Some(src) = rest_source {
            b = b.local_address(std::net::IpAddr::V4(src));
        }
        let http = b.build()?;
        let resp = http
            .post(format!("{}/api/auth", target.url))
            .json(
                &serde_json::json!({"name": target.admin_name, "password": target.admin_password}),
            )
            .send()
            .await
            .context("login")?;
        if !resp.status().is_success() {
            return Err(anyhow!("login: HTTP {}", resp.status()));
        }
        let user_token = resp.json::<TokenBody>().await?.token;
        Ok(Self {
            http,
            target,
            user_token,
            sources: if sources.is_empty() {
                vec![Ipv4Addr::LOCALHOST]
            } else {
                sources
            },
            next_source: AtomicU64::new(0),
        })
    }

    /// Provisions clients `ids` (bounded parallelism); returns their identity tokens.
    pub async fn provision(&self, ids: Vec<String>, concurrency: usize) -> Result<Vec<String>> {
        let results: Vec<Result<String>> = futures_util::stream::iter(ids)
            .map(|id| async move {
                let resp = self
                    .http
                    .post(format!("{}/api/core/client/provision", self.target.url))
                    .bearer_auth(&self.user_token)
                    .json(&serde_json::json!({ "id": id }))
                    .send()
                    .await?;
                if !resp.status().is_success() {
                    return Err(anyhow!("provision {id}: HTTP {}", resp.status()));
                }
                Ok(resp.json::<String>().await?)
            })
            .buffered(concurrency.max(1))
            .collect()
            .await;
        results.into_iter().collect()
    }

    fn source(&self) -> Ipv4Addr {
        let i = self.next_source.fetch_add(1, Ordering::Relaxed) as usize;
        self.sources[i % self.sources.len()]
    }

    /// One full connect: token exchange, WebSocket with the token in `Origin`, the accepted
    /// frame. The error is the failure kind.
    pub async fn connect(&self, identity: &str) -> Result<(Ws, String), String> {
        match tokio::time::timeout(CONNECT_TIMEOUT, self.connect_inner(identity)).await {
            Ok(r) => r,
            Err(_) => Err("timeout".into()),
        }
    }

    async fn connect_inner(&self, identity: &str) -> Result<(Ws, String), String> {
        let resp = self
            .http
            .post(format!("{}/api/core/connection", self.target.url))
            .header("Authorization", identity)
            .send()
            .await
            .map_err(|_| "exchange-io".to_string())?;
        if !resp.status().is_success() {
            return Err(format!("exchange-http-{}", resp.status().as_u16()));
        }
        let token = resp
            .json::<TokenBody>()
            .await
            .map_err(|_| "exchange-body".to_string())?
            .token;
        let report_url = report_url(&token).ok_or("token-no-reportUrl")?;
        let ws_url = report_url
            .replacen("https://", "wss://", 1)
            .replacen("http://", "ws://", 1);
        let parsed = reqwest::Url::parse(&ws_url).map_err(|_| "bad-reportUrl")?;
        let host: std::net::IpAddr = parsed
            .host_str()
            .and_then(|h| h.trim_matches(['[', ']']).parse().ok())
            .ok_or("reportUrl-host-not-ip")?;
        let addr = SocketAddr::new(host, parsed.port_or_known_default().unwrap_or(80));
        let socket = TcpSocket::new_v4().map_err(|e| io_kind("socket", &e))?;
        socket
            .bind(SocketAddr::new(self.source().into(), 0))
            .map_err(|e| io_kind("bind", &e))?;
        let stream = socket
            .connect(addr)
            .await
            .map_err(|e| io_kind("tcp-connect", &e))?;
        let _ = stream.set_nodelay(true);
        let mut req = ws_url
            .into_client_request()
            .map_err(|_| "bad-request".to_string())?;
        req.headers_mut().insert(
            "Origin",
            HeaderValue::from_str(&token).map_err(|_| "bad-token")?,
        );
        let (mut ws, _) =
            tokio_tungstenite::client_async_with_config(req, stream, Some(ws_config()))
                .await
                .map_err(|e| match e {
                    tungstenite::Error::Http(r) => format!("ws-http-{}", r.status().as_u16()),
                    tungstenite::Error::Io(e) => io_kind("ws", &e),
                    other => format!("ws-{}", short(&other.to_string())),
                })?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let v: serde_json::Value =
                        serde_json::from_str(&t).map_err(|_| "accept-not-json")?;
                    if v["type"] == "connection.state" && v["state"] == "accepted" {
                        let id = v["connectionId"]
                            .as_str()
                            .ok_or("accept-no-id")?
                            .to_string();
                        return Ok((ws, id));
                    }
                    return Err("accept-unexpected-frame".into());
                }
                Some(Ok(Message::Close(f))) => {
                    return Err(format!(
                        "closed-before-accept-{}",
                        f.map(|f| u16::from(f.code)).unwrap_or(close::NO_STATUS)
                    ));
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Err("closed-before-accept".into()),
            }
        }
    }

    /// A REST send of `frame` to connection `id`; the error is the failure kind.
    pub async fn send(&self, id: &str, frame: String) -> Result<(), String> {
        let base = self.target.send_url.as_ref().unwrap_or(&self.target.url);
        let query = match &self.target.track {
            Some(track) => format!("?track={track}&timeout=10"),
            None => String::new(),
        };
        let resp = self
            .http
            .post(format!("{base}/api/core/connection/{id}/send{query}"))
            .bearer_auth(&self.user_token)
            .header("Content-Type", "application/json")
            .body(frame)
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    "send-timeout".to_string()
                } else {
                    "send-io".to_string()
                }
            })?;
        if !resp.status().is_success() {
            return Err(format!("send-http-{}", resp.status().as_u16()));
        }
        let _ = resp.bytes().await;
        Ok(())
    }
}

fn short(s: &str) -> String {
    s.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(3)
        .collect::<Vec<_>>()
        .join("-")
        .to_lowercase()
}

fn io_kind(stage: &str, e: &std::io::Error) -> String {
    format!("{stage}-{:?}", e.kind()).to_lowercase()
}

/// The `reportUrl` claim of a JWT (its signature is the server's business).
pub fn report_url(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v["reportUrl"].as_str().map(str::to_string)
}

/// What held sockets observe, shared by every device task of a process.
#[derive(Default)]
pub struct Observed {
    /// Benchmark frames received.
    pub received: AtomicU64,
    /// REST call start → frame at the device.
    pub e2e: Mutex<Latency>,
    /// Sockets that ended while they should have been held.
    pub drops: Mutex<Failures>,
    pub held: AtomicU64,
}

/// Holds a socket until `stop`: polls it (answering pings), records benchmark frames, counts
/// a drop if it ends early. On `stop` it closes with 1000.
pub async fn hold(mut ws: Ws, obs: Arc<Observed>, stop: CancellationToken) {
    obs.held.fetch_add(1, Ordering::Relaxed);
    let dropped = loop {
        tokio::select! {
            _ = stop.cancelled() => break None,
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    let now = now_ns();
                    let frame = BenchFrame::read(&t);
                    if let Some(sent) = frame.as_ref().and_then(BenchFrame::sent) {
                        obs.e2e.lock().unwrap().record_us(now.saturating_sub(sent) / 1000);
                        obs.received.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(answer) = frame.as_ref().and_then(BenchFrame::answer)
                        && ws.send(Message::Text(answer.into())).await.is_err()
                    {
                        break Some("drop-answer".into());
                    }
                }
                Some(Ok(Message::Close(f))) => {
                    break Some(format!("drop-close-{}", f.map(|f| u16::from(f.code)).unwrap_or(close::NO_STATUS)));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => break Some(format!("drop-{}", short(&e.to_string()))),
                None => break Some("drop-eof".into()),
            }
        }
    };
    obs.held.fetch_sub(1, Ordering::Relaxed);
    match dropped {
        Some(kind) => obs.drops.lock().unwrap().add(kind),
        None => {
            let _ = tokio::time::timeout(Duration::from_secs(5), ws.close(None)).await;
        }
    }
}

/// What a held socket reads of a frame the benchmark sent: one parse for both the end-to-end
/// time and the answer (the simulated devices share the machine with the server, so their
/// work is kept small).
#[derive(Deserialize)]
pub struct BenchFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    /// When the frame was sent (ns since the epoch): `bench.ping` and `bench.call` carry it.
    t: Option<u64>,
    seq: Option<u64>,
    #[serde(rename = "messageId", borrow)]
    message_id: Option<std::borrow::Cow<'a, str>>,
}

impl<'a> BenchFrame<'a> {
    /// `None` for a frame that is neither a benchmark frame nor tracked.
    pub fn read(text: &'a str) -> Option<Self> {
        if !text.contains("bench.") && !text.contains(r#""messageId":""#) {
            return None;
        }
        serde_json::from_str(text).ok()
    }

    fn sent(&self) -> Option<u64> {
        matches!(&*self.kind, "bench.ping" | "bench.call")
            .then_some(self.t)
            .flatten()
    }

    /// The answer a device gives a tracked frame: a reply to `bench.call`, an ack to anything
    /// else; `None` for an untracked frame.
    pub fn answer(&self) -> Option<String> {
        let id = self.message_id.as_deref()?;
        let answer = if self.kind == "bench.call" {
            serde_json::json!({"type": "connection.reply", "messageId": id, "payload": {"seq": self.seq}})
        } else {
            serde_json::json!({"type": "connection.ack", "messageId": id})
        };
        Some(answer.to_string())
    }
}

/// The answer a device gives a tracked frame (see [`BenchFrame::answer`]).
pub fn answer(text: &str) -> Option<String> {
    BenchFrame::read(text)?.answer()
}

/// Result of a connect phase.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ConnectResult {
    pub ok: u64,
    pub failures: Failures,
    pub latency: Latency,
    pub elapsed_s: f64,
}

/// Connects every identity at `concurrency`; successes are held (spawned) until `stop`.
/// Returns the result and the connection ids held.
pub async fn connect_phase(
    driver: &Arc<Driver>,
    identities: &[String],
    concurrency: usize,
    obs: &Arc<Observed>,
    stop: &CancellationToken,
) -> (ConnectResult, Vec<String>) {
    let start = Instant::now();
    let outcomes: Vec<(Result<String, String>, u64)> =
        futures_util::stream::iter(identities.iter().cloned())
            .map(|identity| {
                let driver = driver.clone();
                let obs = obs.clone();
                let stop = stop.clone();
                async move {
                    let t = Instant::now();
                    let r = driver.connect(&identity).await;
                    let us = t.elapsed().as_micros() as u64;
                    match r {
                        Ok((ws, id)) => {
                            tokio::spawn(hold(ws, obs, stop));
                            (Ok(id), us)
                        }
                        Err(k) => (Err(k), us),
                    }
                }
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
    let mut res = ConnectResult {
        elapsed_s: start.elapsed().as_secs_f64(),
        ..Default::default()
    };
    let mut ids = Vec::with_capacity(outcomes.len());
    for (r, us) in outcomes {
        match r {
            Ok(id) => {
                res.ok += 1;
                res.latency.record_us(us);
                ids.push(id);
            }
            Err(k) => res.failures.add(k),
        }
    }
    (res, ids)
}

/// Result of a send phase.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SendResult {
    pub ok: u64,
    pub failures: Failures,
    /// REST call latency.
    pub latency: Latency,
    /// REST call start → frame at the device.
    pub e2e: Latency,
    /// Acknowledged sends whose frame never arrived (after a grace period).
    pub lost: u64,
    pub elapsed_s: f64,
}

/// Closed-loop REST sends to random held connections for `duration`.
pub async fn send_phase(
    driver: &Arc<Driver>,
    ids: Arc<Vec<String>>,
    concurrency: usize,
    duration: Duration,
    obs: &Arc<Observed>,
) -> SendResult {
    let mut res = SendResult::default();
    if ids.is_empty() {
        return res;
    }
    let received_before = obs.received.load(Ordering::Relaxed);
    *obs.e2e.lock().unwrap() = Latency::default();
    let start = Instant::now();
    let deadline = start + duration;
    let seq = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let driver = driver.clone();
        let ids = ids.clone();
        let seq = seq.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = 0u64;
            let mut failures = Failures::default();
            let mut lat = Latency::default();
            while Instant::now() < deadline {
                let id = &ids[rand::thread_rng().gen_range(0..ids.len())];
                let call = driver.target.track.as_deref() == Some("reply");
                let frame = bench_frame(seq.fetch_add(1, Ordering::Relaxed), call);
                let t = Instant::now();
                match driver.send(id, frame).await {
                    Ok(()) => {
                        ok += 1;
                        lat.record_us(t.elapsed().as_micros() as u64);
                    }
                    Err(k) => failures.add(k),
                }
            }
            (ok, failures, lat)
        }));
    }
    for t in tasks {
        if let Ok((ok, f, l)) = t.await {
            res.ok += ok;
            res.failures.merge(&f);
            res.latency.merge(&l);
        }
    }
    res.elapsed_s = start.elapsed().as_secs_f64();
    // Frames acknowledged by the server were written; give them a moment to be read.
    let grace = Instant::now() + Duration::from_secs(3);
    while obs.received.load(Ordering::Relaxed) - received_before < res.ok && Instant::now() < grace
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = obs.received.load(Ordering::Relaxed) - received_before;
    res.lost = res.ok.saturating_sub(got);
    res.e2e = obs.e2e.lock().unwrap().clone();
    res
}

/// Result of a churn phase.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ChurnResult {
    pub ok: u64,
    pub failures: Failures,
    /// One full cycle: exchange + upgrade + accepted + close handshake.
    pub latency: Latency,
    pub elapsed_s: f64,
}

/// Connect/close cycles for `duration`, one identity per concurrent loop.
pub async fn churn_phase(
    driver: &Arc<Driver>,
    identities: &[String],
    duration: Duration,
) -> ChurnResult {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for identity in identities {
        let identity = identity.clone();
        let driver = driver.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = ChurnResult::default();
            while Instant::now() < deadline {
                let t = Instant::now();
                match driver.connect(&identity).await {
                    Ok((mut ws, _)) => {
                        let closed = tokio::time::timeout(Duration::from_secs(10), async {
                            ws.close(None).await.ok();
                            while let Some(Ok(_)) = ws.next().await {}
                        })
                        .await;
                        if closed.is_ok() {
                            r.ok += 1;
                            r.latency.record_us(t.elapsed().as_micros() as u64);
                        } else {
                            r.failures.add("close-timeout");
                        }
                    }
                    Err(k) => {
                        r.failures.add(k);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            r
        }));
    }
    let mut res = ChurnResult::default();
    for t in tasks {
        if let Ok(r) = t.await {
            res.ok += r.ok;
            res.failures.merge(&r.failures);
            res.latency.merge(&r.latency);
        }
    }
    res.elapsed_s = start.elapsed().as_secs_f64();
    res
}
