//! One live connection per client: a newer connection supersedes the older one.

mod common;

use common::Node;
use serde_json::json;

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
    other.assert_served().await;
    third.assert_served().await;
}
