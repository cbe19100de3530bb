//! Heartbeats with a 1-second interval: a device that answers pings stays, one that does not is
//! closed with 4002 after two missed intervals.

mod common;

use std::time::Duration;

use common::Node;
use futures_util::StreamExt;
use tokio::io::AsyncReadExt;
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::Message;

/// Reads the server's (unmasked) frames straight off the TCP stream until it ends:
/// `(opcode, payload)` each.
async fn raw_frames(ws: &mut common::Ws) -> Vec<(u8, Vec<u8>)> {
    let MaybeTlsStream::Plain(tcp) = ws.get_mut() else {
        unreachable!("plain TCP")
    };
    let mut bytes = Vec::new();
    let _ = tokio::time::timeout(common::WAIT, tcp.read_to_end(&mut bytes)).await;
    let mut frames = Vec::new();
    let mut rest = &bytes[..];
    while rest.len() >= 2 {
        let opcode = rest[0] & 0x0f;
        let len = usize::from(rest[1] & 0x7f);
        assert!(
            len < 126 && rest[1] & 0x80 == 0,
            "short unmasked frames only"
        );
        frames.push((opcode, rest[2..2 + len].to_vec()));
        rest = &rest[2 + len..];
    }
    frames
}

#[tokio::test]
async fn a_device_that_answers_pings_stays_and_its_heartbeat_advances() {
    let node = Node::start_with(|c| c.heartbeat_interval = Duration::from_secs(1)).await;
    let device = node.device("steady").await;
    let id = device.id.clone();
    let first = node.record(&id).await["lastHeartbeat"]
        .as_str()
        .unwrap()
        .to_string();

    // Keep reading (tungstenite answers each ping with a pong as it reads), counting pings.
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let (count, mut pings) = tokio::sync::watch::channel(0u32);
    let mut ws = device.ws;
    let reader = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stopped => return ws,
                msg = ws.next() => match msg {
                    Some(Ok(Message::Ping(_))) => count.send_modify(|n| *n += 1),
                    Some(Ok(other)) => panic!("unexpected {other:?}"),
                    Some(Err(e)) => panic!("socket error: {e}"),
                    None => panic!("socket ended"),
                }
            }
        }
    });

    // lastHeartbeat advances (coalesced writes: it may lag by a flush period).
    let advanced = node
        .record_until(&id, "advanced", |r| {
            r["lastHeartbeat"]
                .as_str()
                .is_some_and(|t| t > first.as_str())
        })
        .await;
    assert_eq!(advanced["lastHearbeat"], advanced["lastHeartbeat"]);
    // Four pings answered: the server has judged the device at four ticks, and would have
    // closed it (4002) at the second had it not taken the pongs. (A close would also end the
    // reader with a panic.) It is still open and alive.
    tokio::time::timeout(common::WAIT, pings.wait_for(|n| *n >= 4))
        .await
        .expect("four pings in time")
        .expect("the reader runs");
    let r = node
        .record_until(&id, "alive after four pings", |r| r["alive"] == true)
        .await;
    assert_eq!(r["open"], true, "{r}");

    stop.send(()).unwrap();
    reader.await.unwrap();
}

#[tokio::test]
async fn a_device_that_stops_answering_is_closed_with_4002() {
    let node = Node::start_with(|c| c.heartbeat_interval = Duration::from_secs(1)).await;
    let mut silent = node.device("silent").await;
    // Do not read the socket: no pong goes back. The server closes after two missed intervals.
    let r = node
        .record_until(&silent.id, "closed", |r| r["open"] == false)
        .await;
    assert_eq!(r["closeCode"], 4002, "{r}");
    assert_eq!(r["alive"], false, "{r}");
    assert!(r["disconnected"].is_string(), "{r}");
    assert!(
        r["closeReason"].as_str().unwrap().contains("heartbeat"),
        "{r}"
    );

    // What the device finds when it reads again: pings, then the close frame. (Read raw: a
    // WebSocket client would try to answer the queued pings on a socket the server has since
    // dropped, and report that write error first.)
    let frames = raw_frames(&mut silent.ws).await;
    let close = frames
        .iter()
        .find(|(opcode, _)| *opcode == 0x8)
        .unwrap_or_else(|| panic!("no close frame in {frames:?}"));
    assert_eq!(u16::from_be_bytes([close.1[0], close.1[1]]), 4002);
    assert!(
        frames.iter().any(|(opcode, _)| *opcode == 0x9),
        "pings: {frames:?}"
    );

    // The node serves on.
    let mut other = node.device("other").await;
    other.assert_served(&node).await;
}
