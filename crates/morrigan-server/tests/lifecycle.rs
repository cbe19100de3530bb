//! A node's life: health, keys, documents, graceful shutdown, crash recovery, upkeep.

mod common;

use std::time::Duration;

use base64::Engine;
use common::Node;
use futures_util::StreamExt;
use reqwest::Method;
use serde_json::Value;

#[tokio::test]
async fn healthz_jwks_and_unknown_routes() {
    let node = Node::start().await;
    let (status, health) = node.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(status, 200);
    assert_eq!(health["status"], "ok");

    // The JWKS holds this node's key under the kid of the tokens it signs, and the key verifies
    // them.
    let (status, jwks) = node
        .call(Method::GET, "/.well-known/jwks.json", None, None)
        .await;
    assert_eq!(status, 200);
    let header = common::jwt_header(&node.admin);
    assert_eq!(header["alg"], "EdDSA");
    let kid = header["kid"].as_str().expect("kid");
    let key = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid)
        .unwrap_or_else(|| panic!("kid {kid} not in {jwks}"));
    assert_eq!(key["kty"], "OKP");
    assert_eq!(key["crv"], "Ed25519");
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let x: [u8; 32] = b64
        .decode(key["x"].as_str().unwrap())
        .unwrap()
        .try_into()
        .expect("32-byte key");
    let public = ed25519_dalek::VerifyingKey::from_bytes(&x).unwrap();
    let (signed, signature) = node.admin.rsplit_once('.').unwrap();
    let signature = ed25519_dalek::Signature::from_slice(&b64.decode(signature).unwrap()).unwrap();
    public
        .verify_strict(signed.as_bytes(), &signature)
        .expect("the published key verifies the token");

    // Unknown routes: 404 with a JSON body.
    for path in ["/nope", "/api/core/nothing", "/api/core/connection/a/b/c"] {
        let (status, body) = node.call(Method::GET, path, Some(&node.admin), None).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body["status"], "failed", "{path}: {body}");
        assert!(body["reason"].is_string());
    }
    // A trailing slash is the same route.
    let (status, _) = node.get("/api/core/connection/", &node.admin).await;
    assert_eq!(status, 200);
    let (status, _) = node.call(Method::GET, "/healthz/", None, None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn api_docs_describe_every_route() {
    let node = Node::start().await;
    let (status, docs) = node.call(Method::GET, "/api-docs", None, None).await;
    assert_eq!(status, 200);
    assert!(docs["openapi"].is_string(), "{docs}");
    let paths = docs["paths"].as_object().expect("paths");
    let expected: &[(&str, &[&str])] = &[
        ("/api/auth", &["post"]),
        ("/api/auth/identity", &["get", "post"]),
        ("/api/auth/identity/me", &["get", "patch"]),
        ("/api/auth/identity/{id}", &["get", "patch", "delete"]),
        ("/api/core/client/provision", &["post"]),
        ("/api/core/client", &["get"]),
        ("/api/core/client/{clientId}", &["get", "delete"]),
        ("/api/core/connection", &["get", "post"]),
        ("/api/core/connection/connect", &["get"]),
        ("/api/core/connection/{id}", &["get", "delete"]),
        ("/api/core/connection/{id}/send", &["post"]),
        ("/api/core/capability", &["get"]),
        ("/api/core/capability/{clientId}", &["get"]),
        ("/healthz", &["get"]),
        ("/.well-known/jwks.json", &["get"]),
    ];
    for (path, methods) in expected {
        let item = paths
            .get(*path)
            .unwrap_or_else(|| panic!("{path} missing from /api-docs"));
        for m in *methods {
            assert!(item.get(*m).is_some(), "{m} {path} missing from /api-docs");
        }
    }
}

#[tokio::test]
async fn graceful_shutdown_closes_sockets_with_1001_and_writes_the_records() {
    let node = Node::start().await;
    let device = node.device("dev").await;
    let identity = device.identity.clone();
    let id = device.id.clone();
    let pending = node.token(&identity).await;
    let mut ws = device.ws;
    let reader = tokio::spawn(async move { common::next_close(&mut ws).await });

    let dir = node.stop().await;
    let close = reader.await.unwrap();
    assert_eq!(u16::from(close.code), 1001, "{close:?}");

    // After the node stopped, the record is closed (read through a restarted node).
    let node = Node::start_in(dir, |_| {}).await;
    let r = node.record(&id).await;
    assert_eq!(r["open"], false, "{r}");
    assert_eq!(r["alive"], false, "{r}");
    assert_eq!(r["closeCode"], 1001, "{r}");
    assert!(r["disconnected"].is_string(), "{r}");
    // Keys and tokens survive the restart: an unused connection token from before still works
    // once, the identity token still works.
    let (mut ws, _) = node
        .ws_connect(&pending, common::How::Origin)
        .await
        .expect("token issued before the restart");
    assert_eq!(common::next_json(&mut ws).await["state"], "accepted");
    let mut again = node.connect_device("dev", &identity).await;
    again.assert_served(&node).await;
}

#[tokio::test]
async fn after_a_crash_the_restart_closes_the_records_left_open() {
    let node = Node::start().await;
    let node_id = node.node_id();
    let mut device = node.device("dev").await;
    let id = device.id.clone();

    let dir = node.crash();
    // The socket just ends: no close frame from a crashed node.
    let end = tokio::time::timeout(common::WAIT, async {
        loop {
            match device.ws.next().await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Ping(_))) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the socket ends");
    assert!(
        !matches!(
            end,
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(_))))
        ),
        "{end:?}"
    );

    let node = Node::start_in(dir, |_| {}).await;
    assert_eq!(
        node.node_id(),
        node_id,
        "the node id is kept in the data dir"
    );
    let r = node.record(&id).await;
    assert_eq!(r["open"], false, "{r}");
    assert_eq!(r["alive"], false, "{r}");
    assert!(r["disconnected"].is_string(), "{r}");
    assert_eq!(r["serverId"], node_id.as_str());
    let (_, open) = node
        .get("/api/core/connection?open=true", &node.admin)
        .await;
    assert_eq!(open, Value::Array(vec![]));
    // And the device reconnects.
    node.connect_device("dev", &device.identity)
        .await
        .assert_served(&node)
        .await;
}

#[tokio::test]
async fn unused_connection_tokens_expire_at_upkeep() {
    // Expiry is in whole seconds (`exp` = issue second + TTL): a 3 s TTL leaves at least 2 s
    // before the token's expiry, whenever in its second it was issued.
    let node = Node::start_with(|c| c.connection_token_ttl = Duration::from_secs(3)).await;
    let identity = node.provision("dev").await;
    let token = node.token(&identity).await;
    let claims = common::claims(&token);
    let id = claims["sub"].as_str().unwrap().to_string();
    let exp = claims["exp"].as_i64().expect("exp");
    let now = || time::OffsetDateTime::now_utc().unix_timestamp_nanos() as f64 / 1e9;

    // Not expired yet: upkeep leaves it. (Asserted only if the upkeep surely ran before the
    // expiry, which a machine that stalled for seconds might not have.)
    node.upkeep().await;
    let open = node.record(&id).await["open"].clone();
    if now() < exp as f64 {
        assert_eq!(open, true, "an unexpired token's record is left open");
    }

    // Once the clock has passed `exp`, the next upkeep closes it.
    while now() <= exp as f64 + 0.05 {
        common::pause(Duration::from_millis(50)).await;
    }
    node.upkeep().await;
    let r = node.record(&id).await;
    assert_eq!(r["open"], false, "{r}");
    assert_eq!(r["alive"], false, "{r}");
    assert_eq!(r["connected"], Value::Null, "{r}");
    assert!(r["disconnected"].is_string(), "{r}");
    // Its token is dead.
    let (status, body) = common::refused(node.ws_connect(&token, common::How::Origin).await);
    assert!(status == 401 || status == 403, "{status} {body}");
}
