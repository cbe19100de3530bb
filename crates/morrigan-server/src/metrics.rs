//! Prometheus metrics (`GET /metrics`), one registry per node.
//!
//! The registry is a [`PrometheusRecorder`] held in the node's state and used directly (no
//! global recorder is installed), so several nodes in one process (tests, embedding) keep
//! separate numbers. Every name is listed in [`NAMES`] and documented in `docs/metrics.md`.
//! No label carries a per-connection value: labels are the node id, close reasons from
//! [`morrigan_protocol::close::reason_name`], token kinds and refusal reasons (fixed sets),
//! store operations (method names), and provider names (at most [`MAX_PROVIDER_LABELS`]
//! distinct ones, then `other`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

/// Open WebSockets held by the node (gauge; label `node`).
pub const CONNECTIONS_OPEN: &str = "morrigan_connections_open";
/// Accepted WebSockets (counter; `node`).
pub const CONNECTS: &str = "morrigan_connects_total";
/// Ended WebSockets (counter; `node`, `reason`).
pub const DISCONNECTS: &str = "morrigan_disconnects_total";
/// Tokens issued (counter; `kind` = user | identity | connection).
pub const TOKENS_ISSUED: &str = "morrigan_tokens_issued_total";
/// Tokens refused (counter; `kind`, `reason`).
pub const TOKENS_REFUSED: &str = "morrigan_token_refusals_total";
/// Messages from devices routed to a provider (counter; `provider`).
pub const MESSAGES_IN: &str = "morrigan_messages_in_total";
/// Messages pushed to devices through the REST send (counter; `provider`).
pub const MESSAGES_OUT: &str = "morrigan_messages_out_total";
/// Duration of a REST send until the frame was written, or failed (histogram; `outcome`).
pub const SEND_SECONDS: &str = "morrigan_send_duration_seconds";
/// First missed heartbeat of a connection (counter; `node`).
pub const HEARTBEATS_MISSED: &str = "morrigan_heartbeats_missed_total";
/// Store calls (histogram; `op`, `outcome`).
pub const STORE_SECONDS: &str = "morrigan_store_duration_seconds";
/// Cluster bus requests and event publications (histogram; `op`, `outcome`).
pub const BUS_SECONDS: &str = "morrigan_bus_duration_seconds";
/// Event stream subscribers on this node (gauge; `node`).
pub const EVENT_SUBSCRIBERS: &str = "morrigan_event_subscribers";
/// TCP connections closed as soon as accepted, past a cap (counter; `reason`).
pub const HTTP_REFUSED: &str = "morrigan_http_connections_refused_total";
/// HTTP connections closed for sending no request in time (counter; `reason`).
pub const HTTP_CUT: &str = "morrigan_http_connections_cut_total";
/// Requests refused by the HTTP layer's bounds (counter; `reason`).
pub const HTTP_REQUESTS_REFUSED: &str = "morrigan_http_requests_refused_total";
/// Connections not (yet) upgraded to a WebSocket (gauge; `node`).
pub const HTTP_OPEN: &str = "morrigan_http_connections_open";
/// Every socket the node holds, HTTP and WebSocket (gauge; `node`).
pub const SOCKETS_OPEN: &str = "morrigan_sockets_open";
/// Failed logins (counter; `reason` = password | throttled | busy).
pub const LOGIN_FAILURES: &str = "morrigan_login_failures_total";

/// Every metric name, with its help text.
pub const NAMES: &[(&str, &str)] = &[
    (
        CONNECTIONS_OPEN,
        "Open WebSocket connections held by this node.",
    ),
    (CONNECTS, "WebSocket connections accepted by this node."),
    (DISCONNECTS, "WebSocket connections ended, by close reason."),
    (
        TOKENS_ISSUED,
        "Tokens issued, by kind (user, identity, connection).",
    ),
    (TOKENS_REFUSED, "Tokens refused, by kind and reason."),
    (
        MESSAGES_IN,
        "Device messages routed to a provider, by provider.",
    ),
    (
        MESSAGES_OUT,
        "Operator messages pushed to devices, by provider (type prefix).",
    ),
    (
        SEND_SECONDS,
        "REST send duration until the frame was written, by outcome.",
    ),
    (
        HEARTBEATS_MISSED,
        "Connections that missed a heartbeat (first miss).",
    ),
    (
        STORE_SECONDS,
        "Store call duration, by operation and outcome.",
    ),
    (
        BUS_SECONDS,
        "Cluster bus call duration, by operation and outcome.",
    ),
    (
        EVENT_SUBSCRIBERS,
        "Event stream subscribers connected to this node.",
    ),
    (
        HTTP_REFUSED,
        "TCP connections closed as soon as accepted, by the cap reached.",
    ),
    (
        HTTP_CUT,
        "HTTP connections closed for sending no request in time.",
    ),
    (
        HTTP_REQUESTS_REFUSED,
        "Requests refused by the HTTP layer's bounds, by reason.",
    ),
    (
        HTTP_OPEN,
        "Connections not (yet) upgraded to a WebSocket, TLS handshakes included.",
    ),
    (
        SOCKETS_OPEN,
        "Sockets held by this node: HTTP connections and WebSockets.",
    ),
    (
        LOGIN_FAILURES,
        "Failed logins, by reason (password, throttled, busy).",
    ),
];

/// Distinct provider label values kept before the rest is counted as `other`.
pub const MAX_PROVIDER_LABELS: usize = 64;

/// Latency buckets in seconds (100 µs to 10 s).
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// One node's metrics.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    node: String,
    open: Gauge,
    connects: Counter,
    heartbeats_missed: Counter,
    subscribers: Gauge,
    http_open: Gauge,
    sockets_open: Gauge,
    /// Cached handles of labelled series, by `name\0label values`.
    series: DashMap<String, Series>,
    /// Provider label values seen so far (bounded).
    providers: DashMap<String, ()>,
}

#[derive(Clone)]
enum Series {
    Counter(Counter),
    Histogram(Histogram),
}

impl Metrics {
    pub fn new(node_id: &str) -> Arc<Self> {
        let builder = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .expect("static non-empty buckets");
        let recorder = builder.build_recorder();
        for (name, help) in NAMES {
            let key = metrics::KeyName::from_const_str(name);
            if name.ends_with("_seconds") {
                recorder.describe_histogram(key, Some(metrics::Unit::Seconds), (*help).into());
            } else if name.ends_with("_total") {
                recorder.describe_counter(key, None, (*help).into());
            } else {
                recorder.describe_gauge(key, None, (*help).into());
            }
        }
        let handle = recorder.handle();
        let node = node_id.to_string();
        let with_node =
            |name: &'static str| Key::from_parts(name, vec![Label::new("node", node.clone())]);
        let open = recorder.register_gauge(&with_node(CONNECTIONS_OPEN), &METADATA);
        let connects = recorder.register_counter(&with_node(CONNECTS), &METADATA);
        let heartbeats_missed = recorder.register_counter(&with_node(HEARTBEATS_MISSED), &METADATA);
        let subscribers = recorder.register_gauge(&with_node(EVENT_SUBSCRIBERS), &METADATA);
        let http_open = recorder.register_gauge(&with_node(HTTP_OPEN), &METADATA);
        let sockets_open = recorder.register_gauge(&with_node(SOCKETS_OPEN), &METADATA);
        Arc::new(Self {
            recorder,
            handle,
            node,
            open,
            connects,
            heartbeats_missed,
            subscribers,
            http_open,
            sockets_open,
            series: DashMap::new(),
            providers: DashMap::new(),
        })
    }

    /// The Prometheus text exposition of every metric; `open` is the hub's current size.
    pub fn render(&self, open: usize) -> String {
        self.open.set(open as f64);
        self.handle.render()
    }

    /// Drains histogram samples into their buckets (call every few seconds).
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        match self.series(name, labels, false) {
            Series::Counter(c) => c,
            Series::Histogram(_) => Counter::noop(),
        }
    }

    fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        match self.series(name, labels, true) {
            Series::Histogram(h) => h,
            Series::Counter(_) => Histogram::noop(),
        }
    }

    fn series(&self, name: &'static str, labels: &[(&'static str, &str)], hist: bool) -> Series {
        let mut id = String::with_capacity(64);
        id.push_str(name);
        for (_, v) in labels {
            id.push('\0');
            id.push_str(v);
        }
        if let Some(s) = self.series.get(&id) {
            return s.clone();
        }
        let key = Key::from_parts(
            name,
            labels
                .iter()
                .map(|(k, v)| Label::new(*k, v.to_string()))
                .collect::<Vec<_>>(),
        );
        let s = if hist {
            Series::Histogram(self.recorder.register_histogram(&key, &METADATA))
        } else {
            Series::Counter(self.recorder.register_counter(&key, &METADATA))
        };
        self.series.insert(id, s.clone());
        s
    }

    /// A provider name as a label: itself while fewer than [`MAX_PROVIDER_LABELS`] are known.
    fn provider_label<'a>(&self, provider: &'a str) -> &'a str {
        if self.providers.contains_key(provider) {
            return provider;
        }
        if self.providers.len() < MAX_PROVIDER_LABELS && provider.len() <= 64 {
            self.providers.insert(provider.to_string(), ());
            return provider;
        }
        "other"
    }

    pub fn connected(&self) {
        self.connects.increment(1);
    }

    pub fn disconnected(&self, code: u16) {
        let reason = morrigan_protocol::close::reason_name(code);
        self.counter(DISCONNECTS, &[("node", &self.node), ("reason", reason)])
            .increment(1);
    }

    pub fn heartbeat_missed(&self) {
        self.heartbeats_missed.increment(1);
    }

    /// `kind`: `user`, `identity` or `connection`.
    pub fn token_issued(&self, kind: &'static str) {
        self.counter(TOKENS_ISSUED, &[("kind", kind)]).increment(1);
    }

    /// `reason`: one of a fixed set (`missing`, `malformed`, `unknown_key`, `invalid`,
    /// `expired`, `revoked`, `deprovisioned`, `replayed`, `hook`, `password`).
    pub fn token_refused(&self, kind: &'static str, reason: &'static str) {
        self.counter(TOKENS_REFUSED, &[("kind", kind), ("reason", reason)])
            .increment(1);
    }

    pub fn message_in(&self, provider: &str) {
        let p = self.provider_label(provider);
        self.counter(MESSAGES_IN, &[("provider", p)]).increment(1);
    }

    pub fn message_out(&self, message_type: &str) {
        let provider = message_type.split('.').next().unwrap_or("");
        let p = self.provider_label(provider);
        self.counter(MESSAGES_OUT, &[("provider", p)]).increment(1);
    }

    /// `outcome`: `ok` or a failure kind.
    pub fn send_duration(&self, started: Instant, outcome: &'static str) {
        self.histogram(SEND_SECONDS, &[("outcome", outcome)])
            .record(started.elapsed());
    }

    pub fn store_duration(&self, op: &'static str, ok: bool, took: Duration) {
        let outcome = if ok { "ok" } else { "error" };
        self.histogram(STORE_SECONDS, &[("op", op), ("outcome", outcome)])
            .record(took);
    }

    pub fn bus_duration(&self, op: &'static str, outcome: &'static str, took: Duration) {
        self.histogram(BUS_SECONDS, &[("op", op), ("outcome", outcome)])
            .record(took);
    }

    /// `reason`: `password` (wrong password or unknown name), `throttled` (refused unchecked,
    /// 429) or `busy` (no password hasher free in time, 503).
    pub fn login_failed(&self, reason: &'static str) {
        self.counter(LOGIN_FAILURES, &[("reason", reason)])
            .increment(1);
    }

    pub fn subscriber(&self, delta: f64) {
        self.subscribers.increment(delta);
    }

    /// The socket counts, set before a render (see [`crate::listener::Admission`]).
    pub fn set_sockets(&self, http: usize, sockets: usize) {
        self.http_open.set(http as f64);
        self.sockets_open.set(sockets as f64);
    }

    /// `reason`: `http_limit` or `socket_limit`.
    pub fn connection_refused(&self, reason: &'static str) {
        self.counter(HTTP_REFUSED, &[("node", &self.node), ("reason", reason)])
            .increment(1);
    }

    /// `reason`: `idle` (no complete request head in time) or `tls_handshake`.
    pub fn connection_cut(&self, reason: &'static str) {
        self.counter(HTTP_CUT, &[("node", &self.node), ("reason", reason)])
            .increment(1);
    }

    /// `reason`: `no_host`, `headers_too_large`, `body_too_large` or `body_timeout`.
    pub fn request_refused(&self, reason: &'static str) {
        self.counter(
            HTTP_REQUESTS_REFUSED,
            &[("node", &self.node), ("reason", reason)],
        )
        .increment(1);
    }
}

/// Runs [`Metrics::upkeep`] every 5 seconds until `stop` is cancelled.
pub async fn run_upkeep(metrics: Arc<Metrics>, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => metrics.upkeep(),
        }
    }
}
