//! Cluster invariants under races and partitions, with three `morrigan serve` processes on one
//! PostgreSQL database, on each bus:
//! * a deprovisioning racing an upgrade, or a token exchange, never leaves a live socket or a
//!   usable token behind (bounded loops of racing attempts, every one checked);
//! * a node frozen past its lease writes nothing when it wakes, and its devices see what the
//!   records say (1006);
//! * a device of a killed node is accepted elsewhere at once, and a send to the dead node's
//!   connection fails fast.

mod cluster_support;
mod harness;

use std::time::{Duration, Instant};

use cluster_support::*;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Racing attempts per race and bus.
const ATTEMPTS: usize = 400;

async fn delete_client_at(http: &reqwest::Client, node: &str, user: &str, id: &str) -> u16 {
    http.delete(format!("{node}/api/core/client/{id}"))
        .bearer_auth(user)
        .send()
        .await
        .expect("delete client")
        .status()
        .as_u16()
}

/// `POST /api/core/connection` on `node`: the status and the token, if any.
async fn exchange_at(http: &reqwest::Client, node: &str, identity: &str) -> (u16, Option<String>) {
    let res = http
        .post(format!("{node}/api/core/connection"))
        .header("Authorization", identity)
        .send()
        .await
        .expect("token exchange");
    let status = res.status().as_u16();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    (status, body["token"].as_str().map(str::to_string))
}

/// Opens the WebSocket and reads its first frame: the socket and connection id when accepted.
async fn open(node: &Node, token: &str) -> Option<(Ws, String)> {
    open_at(&node.url, token).await
}

/// [`open`] on the node at `url`.
async fn open_at(url: &str, token: &str) -> Option<(Ws, String)> {
    let mut ws = ws_connect_at(url, token).await.ok()?;
    match next(&mut ws).await {
        Ok(frame) if frame["state"] == "accepted" => {
            let id = frame["connectionId"].as_str()?.to_string();
            Some((ws, id))
        }
        _ => None,
    }
}

/// Runs `first` and `second` on two worker threads, released together, `second` offset by
/// `offset_us` microseconds (negative: it goes first). The offset is kept by spinning: a timer
/// only has millisecond resolution, and these races are decided in tens of microseconds.
async fn race<A, B>(offset_us: i64, first: A, second: B) -> (A::Output, B::Output)
where
    A: std::future::Future + Send + 'static,
    A::Output: Send + 'static,
    B: std::future::Future + Send + 'static,
    B::Output: Send + 'static,
{
    let gate = std::sync::Arc::new(tokio::sync::Barrier::new(2));
    let spin = |us: i64| {
        let until = Instant::now() + Duration::from_micros(us.max(0) as u64);
        while Instant::now() < until {
            std::hint::spin_loop();
        }
    };
    let g = gate.clone();
    let a = tokio::spawn(async move {
        g.wait().await;
        spin(-offset_us);
        first.await
    });
    let g = gate.clone();
    let b = tokio::spawn(async move {
        g.wait().await;
        spin(offset_us);
        second.await
    });
    let (a, b) = tokio::join!(a, b);
    (a.expect("first racer"), b.expect("second racer"))
}

/// The offset of attempt `i`: a sweep of -150..150 µs, where these requests cross.
fn offset(i: usize) -> i64 {
    (i as i64 * 7) % 300 - 150
}

/// Reads `ws` in the background (answering the server's close at once, as a device does) and
/// tells, when awaited, whether it was still live `within` after it opened.
fn watch(mut ws: Ws, within: Duration) -> tokio::task::JoinHandle<bool> {
    tokio::spawn(async move { still_live(&mut ws, within).await })
}

/// Whether a socket the server should have closed is still live: it must end within `within`
/// (a close frame or the end of the stream).
async fn still_live(ws: &mut Ws, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return true,
            Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => return false,
            Ok(Some(Ok(_))) => continue,
        }
    }
}

struct Cluster {
    database: String,
    nodes: Vec<Node>,
    http: reqwest::Client,
    user: String,
}

async fn cluster(pg: &str, nats: Option<&str>, extra: &[&str]) -> Cluster {
    let database = fresh_database(pg).await;
    let nodes = Node::start_many(3, &database, nats, extra).await;
    let http = http();
    let user = login(&http, &nodes[1]).await;
    Cluster {
        database,
        nodes,
        http,
        user,
    }
}

async fn deprovision_races(nats: Option<String>) {
    let Some(pg) = service_url("MORRIGAN_TEST_POSTGRES_URL") else {
        return;
    };
    let c = cluster(&pg, nats.as_deref(), &[]).await;
    let (a, b) = (&c.nodes[0], &c.nodes[1]);

    // 1. The upgrade on A racing the deprovisioning through A or B.
    let mut survivors = Vec::new();
    for i in 0..ATTEMPTS {
        let client = format!("race-upgrade-{i}");
        let identity = provision(&c.http, a, &c.user, &client).await;
        let token = connection_token(&c.http, a, &identity).await;
        let via = if i % 2 == 0 { a } else { b };
        let (node, via) = (a.url.clone(), via.url.clone());
        let (http, user) = (c.http.clone(), c.user.clone());
        let (opened, deleted) = race(
            offset(i),
            // Read from the moment it opens, answering the server's close at once.
            async move {
                let (ws, id) = open_at(&node, &token).await?;
                Some((id, watch(ws, Duration::from_secs(5))))
            },
            async move { delete_client_at(&http, &via, &user, &client).await },
        )
        .await;
        assert_eq!(deleted, 200, "attempt {i}: the deprovisioning failed");
        if let Some(socket) = opened {
            let (id, live) = socket;
            survivors.push((i, id, live));
        }
    }
    let mut violations = Vec::new();
    for (i, id, live) in survivors {
        if live.await.expect("watcher") {
            violations.push(format!(
                "attempt {i}: socket {id} still live after the DELETE"
            ));
        }
        let ping = json!({"type": "agent.ping", "payload": i});
        let status = send(&c.http, a, &c.user, &id, &ping).await;
        if status == 200 {
            violations.push(format!("attempt {i}: a send to {id} was delivered"));
        }
        let r = record(&c.http, b, &c.user, &id).await;
        if r["open"] != false {
            violations.push(format!("attempt {i}: record {id} still open: {r}"));
        }
    }
    assert!(
        violations.is_empty(),
        "{} of {ATTEMPTS} upgrade races left a live socket: {violations:#?}",
        violations.len()
    );

    // 2. The token exchange on B racing the deprovisioning on A.
    let mut violations = Vec::new();
    for i in 0..ATTEMPTS {
        let client = format!("race-exchange-{i}");
        let identity = provision(&c.http, a, &c.user, &client).await;
        let (node_b, node_a) = (b.url.clone(), a.url.clone());
        let (http, user, http2) = (c.http.clone(), c.user.clone(), c.http.clone());
        let (exchanged, deleted) = race(
            offset(i),
            async move { exchange_at(&http2, &node_b, &identity).await },
            async move { delete_client_at(&http, &node_a, &user, &client).await },
        )
        .await;
        assert_eq!(deleted, 200, "attempt {i}: the deprovisioning failed");
        let (200, Some(token)) = exchanged else {
            continue;
        };
        if let Some((ws, id)) = open(b, &token).await {
            let live = watch(ws, Duration::from_secs(2));
            let status = send(&c.http, b, &c.user, &id, &json!({"type": "agent.ping"})).await;
            let live = live.await.expect("watcher");
            violations.push(format!(
                "attempt {i}: a token exchanged during the deprovisioning opened {id} \
                 (still live: {live}, send: {status})"
            ));
        }
    }
    assert!(
        violations.is_empty(),
        "{} of {ATTEMPTS} exchange races gave a usable token: {violations:#?}",
        violations.len()
    );
    let Cluster {
        database, nodes, ..
    } = c;
    drop(nodes);
    drop_database(&pg, &database).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deprovisioning_races_on_the_postgres_bus_leave_nothing_live() {
    deprovision_races(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deprovisioning_races_on_the_nats_bus_leave_nothing_live() {
    let Some(nats) = service_url("MORRIGAN_TEST_NATS_URL") else {
        return;
    };
    deprovision_races(Some(nats)).await;
}

/// The device's next event: `Ok(frame)` for any frame (pings included), `Err(())` when the
/// stream ends or fails without a frame, `None` if nothing happens within `within`.
async fn next_event(ws: &mut Ws, within: Duration) -> Option<Result<Message, ()>> {
    match tokio::time::timeout(within, ws.next()).await {
        Err(_) => None,
        Ok(Some(Ok(m))) => Some(Ok(m)),
        Ok(Some(Err(_))) | Ok(None) => Some(Err(())),
    }
}

async fn fencing(nats: Option<String>) {
    let Some(pg) = service_url("MORRIGAN_TEST_POSTGRES_URL") else {
        return;
    };
    // A 2 s lease and a 1 s heartbeat: a frozen node has pings due when it wakes.
    let c = cluster(&pg, nats.as_deref(), &["--heartbeat-interval", "1"]).await;
    let (s, b) = (&c.nodes[0], &c.nodes[1]);
    let identity = provision(&c.http, b, &c.user, "fenced-device").await;
    let token = connection_token(&c.http, s, &identity).await;
    let (mut ws, id) = open(s, &token).await.expect("connected to S");

    s.signal("-STOP");
    let frozen = Instant::now();
    // Declared lost and its record closed by a survivor, with 1006.
    let mut closed = Value::Null;
    while frozen.elapsed() < Duration::from_secs(15) {
        closed = record(&c.http, b, &c.user, &id).await;
        if closed["open"] == false {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let probe = json!({"type": "agent.ping", "payload": "during the stall"});
    let started = Instant::now();
    let status = send(&c.http, b, &c.user, &id, &probe).await;
    let took = started.elapsed();
    s.signal("-CONT");
    assert_eq!(closed["open"], false, "S was never declared lost: {closed}");
    assert_eq!(closed["closeCode"], 1006, "{closed}");
    assert!(
        status != 200 && took < Duration::from_secs(3),
        "a send during the stall answered {status} after {took:?}"
    );

    // On waking, S writes nothing to the device (no ping, no frame, no close frame): the
    // socket just ends, as its record (1006) says.
    match next_event(&mut ws, Duration::from_secs(10)).await {
        Some(Err(())) => {}
        Some(Ok(frame)) => panic!("S wrote to a socket whose record was closed: {frame:?}"),
        None => panic!("S kept the socket open after waking"),
    }
    let r = record(&c.http, b, &c.user, &id).await;
    assert_eq!(r["closeCode"], 1006, "{r}");
    let Cluster {
        database, nodes, ..
    } = c;
    drop(nodes);
    drop_database(&pg, &database).await;
}

#[tokio::test]
async fn a_frozen_node_on_the_postgres_bus_writes_nothing_when_it_wakes() {
    fencing(None).await;
}

#[tokio::test]
async fn a_frozen_node_on_the_nats_bus_writes_nothing_when_it_wakes() {
    let Some(nats) = service_url("MORRIGAN_TEST_NATS_URL") else {
        return;
    };
    fencing(Some(nats)).await;
}

async fn failover(nats: Option<String>) {
    let Some(pg) = service_url("MORRIGAN_TEST_POSTGRES_URL") else {
        return;
    };
    // A long lease: the dead node is not reaped during the test, so only the bus can tell.
    let mut c = cluster(&pg, nats.as_deref(), &["--node-lease", "30"]).await;
    let identity = provision(&c.http, &c.nodes[1], &c.user, "failover-device").await;
    let token = connection_token(&c.http, &c.nodes[0], &identity).await;
    let (_ws, old) = open(&c.nodes[0], &token).await.expect("connected to A");

    c.nodes[0].kill9();
    let (b, n3) = (&c.nodes[1], &c.nodes[2]);
    // A send to the dead node's connection fails fast, on either bus.
    let started = Instant::now();
    let status = send(&c.http, n3, &c.user, &old, &json!({"type": "agent.ping"})).await;
    let took = started.elapsed();
    assert!(
        status == 503 && took < Duration::from_secs(3),
        "a send to a dead node's connection answered {status} after {took:?}"
    );

    // The device reconnects to B: accepted at once, without waiting for the dead node.
    let token = connection_token(&c.http, b, &identity).await;
    let started = Instant::now();
    let (_fresh, new) = open(b, &token).await.expect("connected to B");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "the reconnection waited {took:?} for the dead node"
    );
    // The old record is closed soon after, whoever closes it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = record(&c.http, n3, &c.user, &old).await;
        if r["open"] == false {
            break;
        }
        assert!(Instant::now() < deadline, "the old record stayed open: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(record(&c.http, n3, &c.user, &new).await["open"], true);
    let Cluster {
        database, nodes, ..
    } = c;
    drop(nodes);
    drop_database(&pg, &database).await;
}

#[tokio::test]
async fn failover_on_the_postgres_bus_is_immediate() {
    failover(None).await;
}

#[tokio::test]
async fn failover_on_the_nats_bus_is_immediate() {
    let Some(nats) = service_url("MORRIGAN_TEST_NATS_URL") else {
        return;
    };
    failover(Some(nats)).await;
}
