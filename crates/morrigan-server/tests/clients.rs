//! Devices: provisioning, listing, deprovisioning.

mod common;

use common::Node;
use serde_json::json;

#[tokio::test]
async fn provision_answers_a_json_string_and_reprovisioning_revokes_the_old_token() {
    let node = Node::start().await;
    let first = node.provision("MyComputer").await;
    assert_eq!(common::claims(&first)["sub"], "MyComputer");
    node.token(&first).await;

    let second = node.provision("MyComputer").await;
    assert_ne!(first, second);
    let (status, body) = node.connection_token(&first).await;
    assert_eq!(
        status, 403,
        "old identity token after re-provisioning: {body}"
    );
    assert_eq!(body["status"], "failed");
    node.token(&second).await;

    // The client record names the current token.
    let (status, client) = node.get("/api/core/client/MyComputer", &node.admin).await;
    assert_eq!(status, 200);
    assert_eq!(client["id"], "MyComputer");
    assert_eq!(client["tokenId"], common::claims(&second)["jti"]);
    assert!(client["created"].is_string() && client["updated"].is_string());

    // Invalid ids.
    for bad in [
        json!(""),
        json!("a/b"),
        json!("x".repeat(129)),
        json!("tab\there"),
    ] {
        let (status, body) = node
            .post(
                "/api/core/client/provision",
                &node.admin,
                &json!({"id": bad}),
            )
            .await;
        assert_eq!(status, 400, "id {bad}: {body}");
        assert_eq!(body["state"], "requestError");
    }
}

#[tokio::test]
async fn list_and_get_clients() {
    let node = Node::start().await;
    node.provision("dev-a").await;
    node.provision("dev-b").await;
    let (status, list) = node.get("/api/core/client", &node.admin).await;
    assert_eq!(status, 200);
    let mut ids: Vec<&str> = list
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["dev-a", "dev-b"]);

    let (status, one) = node.get("/api/core/client/dev-b", &node.admin).await;
    assert_eq!(status, 200);
    assert_eq!(one["id"], "dev-b");
    assert_eq!(one["state"], serde_json::Value::Null);

    let (status, body) = node.get("/api/core/client/nope", &node.admin).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["status"], "failed");
    // The trailing-slash form of the list works too.
    let (status, _) = node.get("/api/core/client/", &node.admin).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn deprovisioning_revokes_tokens_and_closes_the_live_socket_with_4003() {
    let node = Node::start().await;
    let mut device = node.device("doomed").await;
    // A second, pending token (issued, not used yet) dies with the client too.
    let pending = node.token(&device.identity).await;

    let (status, body) = node.delete("/api/core/client/doomed", &node.admin).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "success");

    let close = device.next_close().await;
    assert_eq!(u16::from(close.code), 4003, "{close:?}");
    let record = node
        .record_until(&device.id, "closed", |r| r["open"] == false)
        .await;
    assert_eq!(record["closeCode"], 4003);
    assert_eq!(record["alive"], false);
    assert!(record["disconnected"].is_string(), "{record}");

    // The identity token is refused, and so is the pending connection token.
    let (status, body) = node.connection_token(&device.identity).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = common::refused(node.ws_connect(&pending, common::How::Origin).await);
    assert_eq!(status, 403, "{body}");

    // Gone from the list; a second delete is 404.
    let (status, body) = node.get("/api/core/client/doomed", &node.admin).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = node.delete("/api/core/client/doomed", &node.admin).await;
    assert_eq!(status, 404, "{body}");

    // Re-provisioning the same id starts afresh.
    let again = node.device("doomed").await;
    assert_ne!(again.id, device.id);
}

#[tokio::test]
async fn a_retried_deprovisioning_closes_what_the_first_attempt_left_open() {
    use sqlx::Connection;
    let node = Node::start().await;
    let mut device = node.device("half-done").await;
    // A first DELETE that deleted the client and failed before closing its records.
    let db = node.data_dir().join("morrigan.db");
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .expect("open the database");
    sqlx::query("DELETE FROM clients WHERE id = 'half-done'")
        .execute(&mut conn)
        .await
        .expect("delete the client row");
    drop(conn);

    let (status, body) = node.delete("/api/core/client/half-done", &node.admin).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["closedConnections"], 1, "{body}");
    assert_eq!(u16::from(device.next_close().await.code), 4003);
    assert_eq!(node.record(&device.id).await["open"], false);
    // Now there is nothing left: 404.
    let (status, _) = node.delete("/api/core/client/half-done", &node.admin).await;
    assert_eq!(status, 404);
}
