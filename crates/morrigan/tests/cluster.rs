//! Cluster tests: three `morrigan serve` processes on one fresh PostgreSQL database, for each
//! bus (PostgreSQL LISTEN/NOTIFY and NATS); and the lease reaper closing a dead node's records. They need `MORRIGAN_TEST_POSTGRES_URL` (and
//! `MORRIGAN_TEST_NATS_URL` for the NATS bus); without them they print a notice and pass, unless
//! `MORRIGAN_TEST_REQUIRE_SERVICES` is set (as `.ci/run` does), in which case they fail.

mod cluster_support;
mod harness;

use std::time::Duration;

use cluster_support::*;
use serde_json::{Value, json};

async fn scenario(nats: Option<String>) {
    let Some(pg) = service_url("MORRIGAN_TEST_POSTGRES_URL") else {
        return;
    };
    let database = fresh_database(&pg).await;
    let mut nodes = Node::start_many(3, &database, nats.as_deref(), &[]).await;
    let (c, b, a) = (
        nodes.pop().unwrap(),
        nodes.pop().unwrap(),
        nodes.pop().unwrap(),
    );
    let http = http();
    let user = login(&http, &b).await;
    let identity = provision(&http, &c, &user, "cluster-device").await;

    // A device connects to node A.
    let token = connection_token(&http, &a, &identity).await;
    assert_eq!(
        claims(&token)["reportUrl"],
        format!("{}/api/core/connection/connect", a.url)
    );
    let mut device = ws_connect(&a, &token).await.expect("connect to A");
    let accepted = next(&mut device).await.expect("accepted");
    assert_eq!(accepted["state"], "accepted");
    let id = accepted["connectionId"].as_str().expect("id").to_string();
    let rec = record(&http, &c, &user, &id).await;
    let node_a = rec["serverId"].as_str().expect("serverId").to_string();

    // A send through node B reaches the device on node A, exactly as sent.
    let msg = json!({"type": "agent.ping", "payload": {"via": "B", "n": 1}});
    assert_eq!(send(&http, &b, &user, &id, &msg).await, 200);
    assert_eq!(next(&mut device).await.expect("frame"), msg);
    // A large message (over NOTIFY's 8000-byte payload) is not lost either.
    let big = json!({"type": "agent.big", "payload": "x".repeat(20_000)});
    assert_eq!(send(&http, &b, &user, &id, &big).await, 200);
    assert_eq!(next(&mut device).await.expect("big frame"), big);

    // A token issued by A is accepted by B, and refused when replayed on C.
    let other = provision(&http, &c, &user, "cluster-device-2").await;
    let token2 = connection_token(&http, &a, &other).await;
    let mut device2 = ws_connect(&b, &token2).await.expect("A's token on B");
    assert_eq!(
        next(&mut device2).await.expect("accepted")["state"],
        "accepted"
    );
    match ws_connect(&c, &token2).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status().as_u16(), 403)
        }
        other => panic!("replay on C was not refused: {:?}", other.map(|_| ())),
    }

    // DELETE through C closes the device's socket on A with 4000.
    let r = http
        .delete(format!(
            "{}/api/core/connection/{id}?reason=cluster%20test",
            c.url
        ))
        .bearer_auth(&user)
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(next(&mut device).await, Err(4000));
    let rec = record(&http, &b, &user, &id).await;
    assert_eq!(rec["open"], false);
    assert_eq!(rec["closeCode"], 4000);
    // A send to the closed connection through B: 409.
    assert_eq!(send(&http, &b, &user, &id, &msg).await, 409);

    // The device now runs the client library, with node A first in its list: it connects to A.
    drop(device);
    let state = tempfile::tempdir().expect("state dir");
    let urls: Vec<String> = [&a, &b, &c]
        .iter()
        .map(|n| format!("{}/api/core/connection", n.url))
        .collect();
    let client = morrigan_client::Client::builder_multi(urls, identity.clone())
        .state_dir(state.path())
        .backoff(morrigan_client::BackoffConfig {
            base: Duration::from_millis(100),
            cap: Duration::from_millis(500),
            ..Default::default()
        })
        .build()
        .expect("client");
    let (handle, mut events) = client.start();
    let id3 = connected(&mut events).await;
    assert_eq!(
        record(&http, &c, &user, &id3).await["serverId"],
        node_a.as_str()
    );

    // A is killed (-9): the survivors close its record and mark it lost.
    let mut a = a;
    a.kill9();
    // Closed by a survivor: by the lease reaper, or by the supersede of the device's new
    // connection on another node, whichever comes first. (The reaper alone, with no device
    // reconnecting, is the next test.)
    let mut closed = Value::Null;
    for _ in 0..150 {
        closed = record(&http, &b, &user, &id3).await;
        if closed["open"] == false {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        closed["open"], false,
        "record not closed after the node died"
    );
    assert_eq!(closed["alive"], false);
    assert!(closed["disconnected"].is_string());
    let reason = closed["closeReason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&node_a) || reason.starts_with("superseded"),
        "{closed}"
    );
    // The dead node is marked lost within the lease timeout (2 s here).
    let mut lost = Value::Null;
    for _ in 0..100 {
        let nodes: Value = http
            .get(format!("{}/api/core/node", c.url))
            .bearer_auth(&user)
            .send()
            .await
            .expect("nodes")
            .json()
            .await
            .expect("nodes body");
        lost = nodes
            .as_array()
            .expect("array")
            .iter()
            .find(|n| n["id"] == node_a.as_str())
            .cloned()
            .expect("node A listed");
        if lost["state"] == "lost" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(lost["state"], "lost");
    // A send to a connection of the dead node does not pretend success.
    assert_eq!(send(&http, &b, &user, &id3, &msg).await, 409);

    // The device reconnected by itself to another node, where sends reach it again.
    let id4 = connected(&mut events).await;
    let moved = record(&http, &c, &user, &id4).await;
    assert_ne!(moved["serverId"], node_a.as_str());
    assert_eq!(moved["open"], true);
    let hello = json!({"type": "agent.ping", "payload": "after failover"});
    assert_eq!(send(&http, &c, &user, &id4, &hello).await, 200);
    loop {
        match tokio::time::timeout(Duration::from_secs(15), events.recv()).await {
            Ok(Some(morrigan_client::Event::Message(m))) if m == hello => break,
            Ok(Some(_)) => continue,
            other => panic!("the message did not reach the device: {other:?}"),
        }
    }
    handle.stop("test").await.expect("graceful stop");
    drop(device2);
    drop((a, b, c));
    drop_database(&pg, &database).await;
}

/// The lease reaper, with nothing else to close the record: a device (a raw WebSocket, which
/// never reconnects) on node A; A is killed (-9); the survivor declares A lost and closes its
/// record itself: 1006, the reason naming A's lease, disconnected when that lease lapsed.
#[tokio::test]
async fn a_dead_nodes_records_are_closed_by_a_survivor_when_its_lease_lapses() {
    let Some(pg) = service_url("MORRIGAN_TEST_POSTGRES_URL") else {
        return;
    };
    let database = fresh_database(&pg).await;
    let mut started = Node::start_many(2, &database, None, &[]).await;
    let (b, mut a) = (started.pop().unwrap(), started.pop().unwrap());
    let http = http();
    let user = login(&http, &b).await;
    let identity = provision(&http, &b, &user, "reaped-device").await;
    let token = connection_token(&http, &a, &identity).await;
    let mut device = ws_connect(&a, &token).await.expect("connect to A");
    let accepted = next(&mut device).await.expect("accepted");
    let id = accepted["connectionId"].as_str().expect("id").to_string();
    let rec = record(&http, &b, &user, &id).await;
    assert_eq!(rec["open"], true, "{rec}");
    let node_a = rec["serverId"].as_str().expect("serverId").to_string();

    a.kill9();
    // The socket just ends: a killed node sends no close frame.
    assert_eq!(next(&mut device).await, Err(1006));

    // The lease is 2 s, renewed every third of it; the bound is generous.
    let closed = eventually("A's record closed by the survivor", WAIT_REAPED, || async {
        let r = record(&http, &b, &user, &id).await;
        (r["open"] == false).then_some(r)
    })
    .await;
    assert_eq!(closed["closeCode"], 1006, "{closed}");
    assert_eq!(
        closed["closeReason"],
        format!("node {node_a} lost its lease"),
        "{closed}"
    );
    assert_eq!(closed["alive"], false, "{closed}");
    let lost = eventually("A marked lost", WAIT_REAPED, || async {
        nodes(&http, &b, &user)
            .await
            .into_iter()
            .find(|n| n["id"] == node_a.as_str() && n["state"] == "lost")
    })
    .await;
    assert_eq!(
        closed["disconnected"], lost["leaseExpires"],
        "disconnected when A's lease lapsed: {closed} {lost}"
    );
    // The survivor itself is not declared lost.
    let survivor = nodes(&http, &b, &user).await;
    assert!(
        survivor
            .iter()
            .any(|n| n["id"] != node_a.as_str() && n["state"] == "running"),
        "{survivor:?}"
    );
    drop((a, b));
    drop_database(&pg, &database).await;
}

/// Bound on the reaper's work after a node died (a 2 s lease).
const WAIT_REAPED: Duration = Duration::from_secs(30);

/// Waits for the client's next `Connected` event and returns the connection id.
async fn connected(events: &mut morrigan_client::Events) -> String {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), events.recv()).await {
            Ok(Some(morrigan_client::Event::Connected { connection_id })) => {
                return connection_id.expect("connection id");
            }
            Ok(Some(morrigan_client::Event::Stopped(r))) => panic!("client stopped: {r:?}"),
            Ok(Some(_)) => continue,
            other => panic!("the client did not connect: {other:?}"),
        }
    }
}

#[tokio::test]
async fn cluster_on_postgres_bus() {
    scenario(None).await;
}

#[tokio::test]
async fn cluster_on_nats_bus() {
    let Some(nats) = service_url("MORRIGAN_TEST_NATS_URL") else {
        return;
    };
    scenario(Some(nats)).await;
}
