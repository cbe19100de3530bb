//! One live connection per client: a newer connection supersedes the older one.

mod common;

use common::Node;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn a_second_connection_supersedes_the_first() {
    let node = Node::start().await;
    let mut first = node.device("dev").await;
    let mut second = node.connect_device("dev", &first.identity).await;
    assert_ne!(first.id, second.id);

    let close = first.next_close().await;
    assert_eq!(u16::from(close.code), 4001, "{close:?}");
    assert!(
        close.reason.as_str().contains(&second.id),
        "the reason names the new connection: {close:?}"
    );

    let old = node
        .record_until(&first.id, "closed", |r| r["open"] == false)
        .await;
    assert_eq!(old["closeCode"], 4001);
    assert_eq!(old["alive"], false);
    assert!(old["disconnected"].is_string());
    assert!(old["closeReason"].as_str().unwrap().contains(&second.id));

    let (status, open) = node
        .get("/api/core/connection?open=true&clientId=dev", &node.admin)
        .await;
    assert_eq!(status, 200);
    let open = open.as_array().unwrap();
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0]["id"], second.id.as_str());
    // The old record is kept as history.
    let (_, all) = node
        .get("/api/core/connection?clientId=dev", &node.admin)
        .await;
    assert_eq!(all.as_array().unwrap().len(), 2);

    // The new connection is the one served.
    let (status, body) = node.send(&second.id, &json!({"type": "agent.hello"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(second.next_json().await["type"], "agent.hello");
    let (status, body) = node.send(&first.id, &json!({"type": "agent.hello"})).await;
    assert_eq!(status, 409, "{body}");

    // Other clients are not affected.
    let mut other = node.device("other").await;
    let mut third = node.connect_device("dev", &first.identity).await;
    assert_eq!(u16::from(second.next_close().await.code), 4001);
    other.assert_served(&node).await;
    third.assert_served(&node).await;
}

/// Two connections of one client accepted at the same moment: exactly one survives, it is the
/// one whose record is open, and the other is told so with 4001 (no socket is left live with a
/// closed record, none with an open record but no socket).
#[tokio::test]
async fn racing_connections_of_one_client_leave_exactly_one() {
    let node = Node::start().await;
    for round in 0..8 {
        let client = format!("racer-{round}");
        let identity = node.provision(&client).await;
        let t1 = node.token(&identity).await;
        let t2 = node.token(&identity).await;
        let (a, b) = tokio::join!(
            node.ws_connect(&t1, common::How::Origin),
            node.ws_connect(&t2, common::How::Origin)
        );
        // Each live socket is read by a task: text frames go to a channel, the task ends with
        // the close code.
        let mut live = Vec::new();
        for (token, result) in [(&t1, a), (&t2, b)] {
            let id = common::claims(token)["sub"].as_str().unwrap().to_string();
            match result {
                Ok((mut ws, _)) => {
                    let first = common::next_json(&mut ws).await;
                    assert_eq!(first["state"], "accepted");
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                    let reader = tokio::spawn(async move {
                        loop {
                            match ws.next().await {
                                Some(Ok(Message::Text(t))) => {
                                    let _ = tx.send(t.to_string());
                                }
                                Some(Ok(Message::Close(f))) => {
                                    let _ = ws.flush().await;
                                    return f.map(|f| u16::from(f.code));
                                }
                                Some(Ok(_)) => {}
                                Some(Err(_)) | None => return None,
                            }
                        }
                    });
                    live.push((id, reader, rx));
                }
                // A token may lose the race before the upgrade (its record already superseded).
                Err(e) => {
                    let (status, body) = common::refused(Err(e));
                    assert_eq!(status, 403, "{body}");
                }
            }
        }
        assert!(!live.is_empty());

        // Settles to exactly one open record...
        let deadline = tokio::time::Instant::now() + common::WAIT;
        let survivor = loop {
            let (_, open) = node
                .get(
                    &format!("/api/core/connection?open=true&clientId={client}"),
                    &node.admin,
                )
                .await;
            let open = open.as_array().unwrap().clone();
            if open.len() == 1 {
                break open[0]["id"].as_str().unwrap().to_string();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: {open:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        // ...whose socket is live, while the other socket was closed with 4001.
        for (id, reader, mut rx) in live {
            if id == survivor {
                let (status, body) = node.send(&id, &json!({"type": "agent.alive"})).await;
                assert_eq!(status, 200, "round {round}: {body}");
                let got = tokio::time::timeout(common::WAIT, rx.recv()).await.unwrap();
                assert!(got.unwrap().contains("agent.alive"));
                reader.abort();
            } else {
                let code = tokio::time::timeout(common::WAIT, reader)
                    .await
                    .unwrap_or_else(|_| panic!("round {round}: the superseded socket stays open"))
                    .unwrap();
                assert_eq!(code, Some(4001), "round {round}");
            }
        }
    }
}
