//! Operator experience: the Prometheus metrics and the connection event stream (the OpenAPI
//! document is tested in openapi.rs).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::events::Events;
use common::{Node, WAIT};
use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn event_stream_delivers_connection_events() {
    let node = Node::start().await;
    let mut events = Events::open(&node, &node.admin).await;

    let mut first = node.device("ev-device").await;
    let connected = events.until("connected", &first.id).await;
    assert_eq!(connected["clientId"], "ev-device");
    assert_eq!(connected["node"], node.node_id());
    assert_eq!(connected["address"], "127.0.0.1");

    first
        .send_json(&json!({"type": "client.state", "state": "ready"}))
        .await;
    let state = events.until("client-state", &first.id).await;
    assert_eq!(state["state"], "ready");

    // A second connection of the same client supersedes the first.
    let second = node
        .connect_device("ev-device", &first.identity.clone())
        .await;
    let superseded = events.until("superseded", &first.id).await;
    assert_eq!(superseded["code"], 4001);
    let gone = events.until("disconnected", &first.id).await;
    assert_eq!(gone["code"], 4001);
    assert_eq!(gone["reasonName"], "superseded");
    events.until("connected", &second.id).await;

    let (status, body) = node
        .delete(
            &format!("/api/core/connection/{}?reason=maintenance", second.id),
            &node.admin,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let closed = events.until("disconnected", &second.id).await;
    assert_eq!(closed["code"], 4000);
    assert_eq!(closed["reason"], "maintenance");
    assert_eq!(closed["reasonName"], "closed_by_operator");
}

#[tokio::test]
async fn event_stream_reports_missed_heartbeats() {
    // Pings every P = 2 s, from the accept. The device answers the first ping 0.7 s after it
    // arrives, then never again: the second ping finds it silent for ~1.3 s (fine), the third
    // for ~3.3 s (over 1.25 P: missed), the fourth for ~5.3 s (over 2 P: closed with 4002).
    // Any pong delay between 0 and 1.5 s gives the same outcome, so a loaded machine cannot
    // turn it into a close without the missed heartbeat.
    let period = Duration::from_secs(2);
    let node = Node::start_with(|c| c.heartbeat_interval = period).await;
    let mut events = Events::open(&node, &node.admin).await;
    let mut device = node.device("silent-device").await;
    events.until("connected", &device.id).await;
    match tokio::time::timeout(WAIT, device.ws.next()).await {
        Ok(Some(Ok(Message::Ping(_)))) => {}
        other => panic!("expected the first ping, got {other:?}"),
    }
    // The pong tungstenite queued for that ping leaves with the next flush.
    tokio::time::sleep(period * 7 / 20).await;
    device.ws.flush().await.expect("the pong");
    events.until("heartbeat-missed", &device.id).await;
    let closed = events.until("disconnected", &device.id).await;
    assert_eq!(closed["code"], 4002);
    let m = scrape(&node).await;
    assert_eq!(value(&m, "morrigan_heartbeats_missed_total", &[]), 1.0);
    drop(device);
}

#[tokio::test]
async fn a_device_that_never_answers_is_reported_missed_before_it_is_closed() {
    // No pong at all: the first unanswered ping marks it missed, the second closes it, in that
    // order whatever the ticks' delays.
    let node = Node::start_with(|c| c.heartbeat_interval = Duration::from_secs(1)).await;
    let mut events = Events::open(&node, &node.admin).await;
    let device = node.device("mute-device").await;
    events.until("connected", &device.id).await;
    events.until("heartbeat-missed", &device.id).await;
    let closed = events.until("disconnected", &device.id).await;
    assert_eq!(closed["code"], 4002);
    drop(device);
}

#[tokio::test]
async fn event_stream_needs_a_user_token_with_api() {
    let node = Node::start().await;
    let (status, _) = node
        .call(Method::GET, "/api/core/connection/events", None, None)
        .await;
    assert_eq!(status, 401);
    let (_, limited) = node.identity_with("no-api", &["connection.send"]).await;
    let (status, _) = node.get("/api/core/connection/events", &limited).await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn event_stream_is_cluster_wide() {
    // Two nodes of one in-process cluster (shared database and LocalBus): a subscriber on one
    // sees the events of the other.
    let bus = morrigan_server::bus::local::LocalBus::new();
    let dir = tempfile::TempDir::new().unwrap();
    let db = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("cluster.db").display()
    );
    let (a, a_id) = start_on_bus(&bus, &db, dir.path().join("a")).await;
    let (b, _) = start_on_bus(&bus, &db, dir.path().join("b")).await;
    let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let login = |base: String| {
        let http = http.clone();
        async move {
            let v: Value = http
                .post(format!("{base}/api/auth"))
                .json(&json!({"name": "admin", "password": common::ADMIN_PASSWORD}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["token"].as_str().unwrap().to_string()
        }
    };
    let token_a = login(a.clone()).await;
    let token_b = login(b.clone()).await;
    let stream = reqwest::Client::new()
        .get(format!("{b}/api/core/connection/events"))
        .bearer_auth(&token_b)
        .send()
        .await
        .unwrap();
    let mut on_b = Events::from_response(stream).await;

    let (_ws, id) = common::connect_at(&http, &a, &token_a, "cluster-device").await;
    let ev = on_b.until("connected", &id).await;
    assert_eq!(ev["node"], a_id);
    assert_eq!(ev["clientId"], "cluster-device");
}

/// Starts a node of an in-process cluster on the test's runtime: `(base URL, node id)`.
async fn start_on_bus(
    bus: &std::sync::Arc<morrigan_server::bus::local::LocalBus>,
    db: &str,
    dir: std::path::PathBuf,
) -> (String, String) {
    let mut c = common::config(dir);
    c.database_url = Some(db.to_string());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = morrigan_server::Server::builder(c)
        .listener(listener)
        .local_bus(bus.clone())
        .build()
        .await
        .expect("node starts");
    let base = format!("http://{}", server.local_addr());
    let id = server.state().node_id().to_string();
    tokio::spawn(server.run(std::future::pending()));
    (base, id)
}

// ----- metrics -----

type Scrape = BTreeMap<String, f64>;

async fn scrape(node: &Node) -> Scrape {
    let res = node.http.get(node.url("/metrics")).send().await.unwrap();
    assert_eq!(res.status().as_u16(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = res.text().await.unwrap();
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, v) = line.rsplit_once(' ').expect("series value");
        out.insert(series.to_string(), v.parse::<f64>().expect("number"));
    }
    out
}

/// Sum of every series of `name` whose labels include all of `labels`.
fn value(m: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    m.iter()
        .filter(|(series, _)| {
            let (n, rest) = series.split_once('{').unwrap_or((series.as_str(), ""));
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| *v)
        .sum()
}

async fn metric_until(node: &Node, name: &str, labels: &[(&str, &str)], want: f64) -> Scrape {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let m = scrape(node).await;
        if value(&m, name, labels) == want {
            return m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}{labels:?} never became {want}: {}",
            value(&m, name, labels)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn metrics_follow_connections() {
    let node = Node::start().await;
    let me = node.node_id();
    let node_label = [("node", me.as_str())];
    let m = scrape(&node).await;
    assert_eq!(value(&m, "morrigan_connections_open", &node_label), 0.0);
    assert_eq!(value(&m, "morrigan_connects_total", &node_label), 0.0);
    assert_eq!(
        value(&m, "morrigan_tokens_issued_total", &[("kind", "user")]),
        1.0
    );

    let mut device = node.device("metrics-device").await;
    let m = metric_until(&node, "morrigan_connects_total", &node_label, 1.0).await;
    assert_eq!(value(&m, "morrigan_connections_open", &node_label), 1.0);
    assert_eq!(
        value(&m, "morrigan_tokens_issued_total", &[("kind", "identity")]),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "morrigan_tokens_issued_total",
            &[("kind", "connection")]
        ),
        1.0
    );

    // Messages in and out, and the send latency.
    device
        .send_json(&json!({"type": "client.state", "state": "busy"}))
        .await;
    metric_until(
        &node,
        "morrigan_messages_in_total",
        &[("provider", "client")],
        1.0,
    )
    .await;
    let (status, body) = node
        .send(&device.id, &json!({"type": "agent.ping", "n": 1}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(device.next_json().await["type"], "agent.ping");
    let m = scrape(&node).await;
    assert_eq!(
        value(&m, "morrigan_messages_out_total", &[("provider", "agent")]),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "morrigan_send_duration_seconds_count",
            &[("outcome", "ok")]
        ),
        1.0
    );
    assert!(
        value(
            &m,
            "morrigan_store_duration_seconds_count",
            &[("op", "accept_connection")]
        ) >= 1.0
    );

    // Refusals, by reason.
    let (status, _) = node
        .ws_connect("not.a.token", common::How::Bearer)
        .await
        .map(|_| (101, ()))
        .unwrap_or((401, ()));
    assert_eq!(status, 401);
    let m = metric_until(
        &node,
        "morrigan_token_refusals_total",
        &[("kind", "connection"), ("reason", "malformed")],
        1.0,
    )
    .await;
    assert_eq!(value(&m, "morrigan_token_refusals_total", &[]), 1.0);

    // The connection goes: open back to 0, one disconnect with the operator's reason.
    let (status, body) = node
        .delete(&format!("/api/core/connection/{}", device.id), &node.admin)
        .await;
    assert_eq!(status, 200, "{body}");
    let m = metric_until(
        &node,
        "morrigan_disconnects_total",
        &[("node", &me), ("reason", "closed_by_operator")],
        1.0,
    )
    .await;
    assert_eq!(value(&m, "morrigan_connections_open", &node_label), 0.0);
    assert_eq!(value(&m, "morrigan_disconnects_total", &[]), 1.0);

    // No series carries a per-connection value.
    for series in m.keys() {
        assert!(
            !series.contains(&device.id),
            "per-connection label: {series}"
        );
        assert!(
            !series.contains("metrics-device"),
            "per-client label: {series}"
        );
    }
}

#[tokio::test]
async fn metrics_are_per_node_in_one_process() {
    let a = Node::start().await;
    let b = Node::start().await;
    let _device = a.device("only-on-a").await;
    metric_until(&a, "morrigan_connects_total", &[], 1.0).await;
    let m = scrape(&b).await;
    assert_eq!(value(&m, "morrigan_connects_total", &[]), 0.0);
}

// ----- OpenAPI -----

#[tokio::test]
async fn responses_carry_a_request_id() {
    let node = Node::start().await;
    let res = node.http.get(node.url("/healthz")).send().await.unwrap();
    let id = res.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    let res = node
        .http
        .get(node.url("/healthz"))
        .header("x-request-id", "trace-me-1")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "trace-me-1");
}
