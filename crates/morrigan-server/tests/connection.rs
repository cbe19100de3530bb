//! Connections: token exchange, the WebSocket handshake (three ways to present the token),
//! refusals before the upgrade, records, send and close.

mod common;

use std::time::Duration;

use common::{How, Node};
use futures_util::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[tokio::test]
async fn token_exchange_raw_and_bearer() {
    let node = Node::start().await;
    let identity = node.provision("dev").await;

    let (status, raw) = node.connection_token(&identity).await;
    assert_eq!(status, 200, "{raw}");
    assert_eq!(raw["state"], "success");
    let token = raw["token"].as_str().unwrap();
    let claims = common::claims(token);
    assert_eq!(
        claims["reportUrl"],
        format!("http://{}/api/core/connection/connect", node.addr)
    );
    assert_eq!(claims["aud"], "morrigan:connection");
    assert_eq!(claims["iss"], node.node_id());
    // The token's subject is its connection record, which exists before the device connects.
    let record = node.record(claims["sub"].as_str().unwrap()).await;
    assert_eq!(record["clientId"], "dev");
    assert_eq!(record["open"], true);
    assert_eq!(record["connected"], Value::Null);
    assert_eq!(record["tokenId"], claims["jti"]);
    assert_eq!(record["reportUrl"], claims["reportUrl"]);

    let res = node
        .http
        .post(node.url("/api/core/connection"))
        .bearer_auth(&identity)
        .json(&json!({"idtoken": "ignored", "traceId": "t"}))
        .send()
        .await
        .unwrap();
    let (status, bearer) = common::read(res).await;
    assert_eq!(status, 200, "{bearer}");
    assert_ne!(bearer["token"], raw["token"]);

    // No token: 400. A bad token, a user token, or a connection token: 403.
    let (status, body) = node
        .call(Method::POST, "/api/core/connection", None, None)
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["state"], "requestError");
    for bad in ["garbage", node.admin.as_str(), token] {
        let (status, body) = node.connection_token(bad).await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["status"], "failed");
        assert!(body["reason"].is_string());
    }
}

#[tokio::test]
async fn connect_with_the_token_in_origin_bearer_or_subprotocol() {
    let node = Node::start().await;
    for (client, how) in [
        ("via-origin", How::Origin),
        ("via-bearer", How::Bearer),
        ("via-subprotocol", How::Subprotocol),
    ] {
        let identity = node.provision(client).await;
        let token = node.token(&identity).await;
        let claims = common::claims(&token);
        let (mut ws, res) = node.ws_connect(&token, how).await.expect("accepted");
        assert_eq!(res.status().as_u16(), 101);
        let protocol = res
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap().to_string());
        if how == How::Subprotocol {
            assert_eq!(protocol.as_deref(), Some("morrigan"));
        } else {
            assert_eq!(protocol, None);
        }
        let first = common::next_json(&mut ws).await;
        assert_eq!(first["type"], "connection.state");
        assert_eq!(first["state"], "accepted");
        assert_eq!(first["connectionId"], claims["sub"]);

        let r = node.record(claims["sub"].as_str().unwrap()).await;
        assert_eq!(r["id"], claims["sub"]);
        assert_eq!(r["clientId"], client);
        assert_eq!(r["serverId"], node.node_id());
        assert_eq!(r["tokenId"], claims["jti"]);
        assert_eq!(r["clientAddress"], "127.0.0.1");
        assert_eq!(r["open"], true);
        assert_eq!(r["alive"], true);
        assert!(r["connected"].is_string(), "{r}");
        assert!(r["lastHeartbeat"].is_string(), "{r}");
        assert_eq!(r["lastHearbeat"], r["lastHeartbeat"]);
        assert_eq!(r["disconnected"], Value::Null);
        assert_eq!(r["reportUrl"], claims["reportUrl"]);
        for field in ["connected", "lastHeartbeat", "created"] {
            let t = r[field].as_str().unwrap();
            assert!(t.ends_with('Z') && t.len() == 24, "{field} = {t}");
        }

        // A device closing on its own ends the record too.
        ws.close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        }))
        .await
        .unwrap();
        let closed = node
            .record_until(claims["sub"].as_str().unwrap(), "closed", |r| {
                r["open"] == false
            })
            .await;
        assert_eq!(closed["closeCode"], 1000);
        assert_eq!(closed["alive"], false);
        assert!(closed["disconnected"].is_string());
    }
}

#[tokio::test]
async fn refusals_come_before_the_upgrade_with_a_json_reason() {
    let node = Node::start().await;
    let identity = node.provision("dev").await;

    // Replay: the first use is accepted, the second refused with 403, whichever way it is sent.
    let token = node.token(&identity).await;
    let (mut ws, _) = node
        .ws_connect(&token, How::Origin)
        .await
        .expect("first use");
    common::next_json(&mut ws).await;
    for how in [How::Origin, How::Bearer, How::Subprotocol] {
        let (status, body) = common::refused(node.ws_connect(&token, how).await);
        assert_eq!(status, 403, "replay via {how:?}: {body}");
        assert_eq!(body["status"], "failed");
        assert!(body["reason"].as_str().unwrap().contains("already used"));
    }

    // Garbage, a user token, an identity token: 401.
    for bad in [
        "aaaaaaaaaaaa.bbbbbbbbbbbbbbbb.cccccccccccc",
        node.admin.as_str(),
        identity.as_str(),
    ] {
        let (status, body) = common::refused(node.ws_connect(bad, How::Bearer).await);
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["state"], "authenticationfailed");
    }

    // No token at all: 401.
    let req = node.ws_url().into_client_request().unwrap();
    let (status, body) = common::refused(node.ws_request(req, None).await);
    assert_eq!(status, 401, "{body}");

    // A browser sends its page origin in `Origin` and the token as a sub-protocol: accepted.
    let browser_token = node.token(&identity).await;
    let mut req = node.ws_url().into_client_request().unwrap();
    req.headers_mut()
        .insert("origin", "http://localhost:3000".parse().unwrap());
    req.headers_mut().insert(
        "sec-websocket-protocol",
        format!("morrigan, morrigan.token.{browser_token}")
            .parse()
            .unwrap(),
    );
    let (mut browser, res) = node.ws_request(req, None).await.expect("browser handshake");
    assert_eq!(res.headers()["sec-websocket-protocol"], "morrigan");
    assert_eq!(common::next_json(&mut browser).await["state"], "accepted");

    // A plain GET (no upgrade) is 426 and does not consume a token.
    let fresh = node.token(&identity).await;
    let res = node
        .http
        .get(node.url("/api/core/connection/connect"))
        .header("origin", &fresh)
        .send()
        .await
        .unwrap();
    let (status, body) = common::read(res).await;
    assert_eq!(status, 426, "{body}");
    assert_eq!(body["status"], "failed");
    let (mut ws2, _) = node.ws_connect(&fresh, How::Origin).await.expect("unused");
    assert_eq!(common::next_json(&mut ws2).await["state"], "accepted");
}

#[tokio::test]
async fn an_expired_connection_token_is_refused_with_401() {
    let node = Node::start_with(|c| c.connection_token_ttl = Duration::from_secs(1)).await;
    let identity = node.provision("dev").await;
    let token = node.token(&identity).await;
    // exp = iat + 1 s; the verifier allows 2 s of leeway on whole seconds.
    common::pause(Duration::from_millis(4200)).await;
    let (status, body) = common::refused(node.ws_connect(&token, How::Origin).await);
    assert_eq!(status, 401, "{body}");
    assert!(
        body["reason"].as_str().unwrap().contains("expired"),
        "{body}"
    );
    // A fresh one still works.
    let device = node.connect_device("dev", &identity).await;
    assert_eq!(node.record(&device.id).await["open"], true);
}

#[tokio::test]
async fn send_delivers_the_message_as_sent() {
    let node = Node::start().await;
    let mut device = node.device("dev").await;
    // Unusual spacing and key order: the device must receive these exact bytes.
    let text = r#"{ "type":"agent.run",  "z":1,"a":{"list":[1,2,3],"s":"é\u00e9"} }"#;
    let (status, body) = node
        .call(
            Method::POST,
            &format!("/api/core/connection/{}/send", device.id),
            Some(&node.admin),
            Some(text.as_bytes().to_vec()),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"status": "success"}));
    let frame = tokio::time::timeout(common::WAIT, device.ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(frame, Message::Text(text.into()));

    // Bad bodies: 400 each, the connection unaffected.
    for bad in [
        r#"{"no":"type"}"#,
        r#"{"type":"notype"}"#,
        r#"{"type":"a^b.c"}"#,
        r#"{"type":5}"#,
        r#"["a.b"]"#,
        r#""a.b""#,
        "{broken",
    ] {
        let (status, body) = node
            .call(
                Method::POST,
                &format!("/api/core/connection/{}/send", device.id),
                Some(&node.admin),
                Some(bad.as_bytes().to_vec()),
            )
            .await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["status"], "failed");
        assert!(body["reason"].is_string());
    }
    device.assert_served(&node).await;

    // Without connection.send: 403.
    let (_, api_only) = node.identity_with("viewer", &["api"]).await;
    let (status, body) = node
        .post(
            &format!("/api/core/connection/{}/send", device.id),
            &api_only,
            &json!({"type": "agent.run"}),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["status"], "failed");

    // Unknown id: 404. A pending connection (token not used yet): 409.
    let (status, body) = node.send("no-such-id", &json!({"type": "agent.run"})).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["status"], "failed");
    let pending = common::claims(&node.token(&device.identity).await)["sub"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, body) = node.send(&pending, &json!({"type": "agent.run"})).await;
    assert_eq!(status, 409, "{body}");

    // Closed: 409.
    let id = device.id.clone();
    device.ws.close(None).await.unwrap();
    node.record_until(&id, "closed", |r| r["open"] == false)
        .await;
    let (status, body) = node.send(&id, &json!({"type": "agent.run"})).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["status"], "failed");
}

#[tokio::test]
async fn delete_closes_with_4000_and_a_reason() {
    let node = Node::start().await;
    let mut device = node.device("dev").await;
    let (status, body) = node
        .delete(
            &format!("/api/core/connection/{}?reason=maintenance", device.id),
            &node.admin,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "success");
    let close = device.next_close().await;
    assert_eq!(u16::from(close.code), 4000);
    assert_eq!(close.reason.as_str(), "maintenance");
    // The route answers once the record is closed.
    let r = node.record(&device.id).await;
    assert_eq!(r["open"], false);
    assert_eq!(r["alive"], false);
    assert_eq!(r["closeCode"], 4000);
    assert_eq!(r["closeReason"], "maintenance");
    assert!(r["disconnected"].is_string());

    let (status, body) = node
        .delete(&format!("/api/core/connection/{}", device.id), &node.admin)
        .await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = node
        .delete("/api/core/connection/no-such-id", &node.admin)
        .await;
    assert_eq!(status, 404, "{body}");
    let long = "x".repeat(121);
    let (status, body) = node
        .delete(
            &format!("/api/core/connection/{}?reason={long}", device.id),
            &node.admin,
        )
        .await;
    assert_eq!(status, 400, "{body}");

    // Without connection.close: 403.
    let other = node.device("other").await;
    let (_, sender) = node
        .identity_with("sender", &["api", "connection.send"])
        .await;
    let (status, body) = node
        .delete(&format!("/api/core/connection/{}", other.id), &sender)
        .await;
    assert_eq!(status, 403, "{body}");
    // A pending connection can be closed too, which kills its token.
    let identity = node.provision("pending").await;
    let token = node.token(&identity).await;
    let pending = common::claims(&token)["sub"].as_str().unwrap().to_string();
    let (status, body) = node
        .delete(&format!("/api/core/connection/{pending}"), &node.admin)
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = common::refused(node.ws_connect(&token, How::Origin).await);
    assert_eq!(status, 403, "{body}");
}

#[tokio::test]
async fn list_filters_and_get_one() {
    let node = Node::start().await;
    let a = node.device("dev-a").await;
    let b = node.device("dev-b").await;
    // A closed one for dev-a.
    let mut old = node.device("dev-c").await;
    old.ws.close(None).await.unwrap();
    node.record_until(&old.id, "closed", |r| r["open"] == false)
        .await;

    let ids = |v: &Value| -> Vec<String> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (status, all) = node.get("/api/core/connection", &node.admin).await;
    assert_eq!(status, 200);
    let all = ids(&all);
    for id in [&a.id, &b.id, &old.id] {
        assert!(all.contains(id));
    }
    let (_, open) = node
        .get("/api/core/connection?open=true", &node.admin)
        .await;
    let open = ids(&open);
    assert!(open.contains(&a.id) && open.contains(&b.id) && !open.contains(&old.id));
    let (_, closed) = node
        .get("/api/core/connection?open=false", &node.admin)
        .await;
    assert_eq!(ids(&closed), vec![old.id.clone()]);
    let (_, one) = node
        .get("/api/core/connection?open=true&clientId=dev-b", &node.admin)
        .await;
    assert_eq!(ids(&one), vec![b.id.clone()]);
    let (_, mine) = node
        .get(
            &format!("/api/core/connection?serverId={}", node.node_id()),
            &node.admin,
        )
        .await;
    assert_eq!(ids(&mine).len(), 3);
    let (status, body) = node
        .get("/api/core/connection?open=maybe", &node.admin)
        .await;
    assert_eq!(status, 400, "{body}");

    let (status, body) = node
        .get("/api/core/connection/no-such-id", &node.admin)
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["status"], "failed");
    // Trailing slash.
    let (status, _) = node.get("/api/core/connection/", &node.admin).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn concurrent_sends_all_arrive() {
    let node = Node::start().await;
    let mut device = node.device("dev").await;
    let mut sends = Vec::new();
    for i in 0..20 {
        let http = node.http.clone();
        let url = node.url(&format!("/api/core/connection/{}/send", device.id));
        let token = node.admin.clone();
        sends.push(tokio::spawn(async move {
            let res = http
                .post(url)
                .bearer_auth(token)
                .json(&json!({"type": "agent.n", "n": i}))
                .send()
                .await
                .unwrap();
            res.status().as_u16()
        }));
    }
    for s in sends {
        assert_eq!(s.await.unwrap(), 200);
    }
    let mut seen = Vec::new();
    for _ in 0..20 {
        seen.push(device.next_json().await["n"].as_i64().unwrap());
    }
    seen.sort();
    assert_eq!(seen, (0..20).collect::<Vec<_>>());
}

/// `jwt` with its payload's `iat` moved by one second and the original signature: the same
/// `jti` and subject, so only the signature (or the recorded digest) tells it apart.
fn tampered(jwt: &str) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut claims = common::claims(jwt);
    claims["iat"] = json!(claims["iat"].as_i64().unwrap() - 1);
    let parts: Vec<&str> = jwt.split('.').collect();
    let payload = b64.encode(serde_json::to_vec(&claims).unwrap());
    format!("{}.{payload}.{}", parts[0], parts[2])
}

#[tokio::test]
async fn a_tampered_token_is_refused_at_both_steps_and_consumes_nothing() {
    let node = Node::start().await;
    let identity = node.provision("dev").await;

    // Identity token: the exchange is refused (the stored digest does not match; the signature
    // check says why) and writes no record.
    let (status, body) = node.connection_token(&tampered(&identity)).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["state"], "authenticationfailed");
    assert!(
        body["reason"].as_str().unwrap().contains("invalid"),
        "{body}"
    );
    let (_, records) = node
        .get("/api/core/connection?clientId=dev", &node.admin)
        .await;
    assert_eq!(records.as_array().unwrap().len(), 0, "{records}");

    // Connection token: refused with 401, and the genuine token is still unused.
    let token = node.token(&identity).await;
    let (status, body) = common::refused(node.ws_connect(&tampered(&token), How::Origin).await);
    assert_eq!(status, 401, "{body}");
    assert!(
        body["reason"].as_str().unwrap().contains("invalid"),
        "{body}"
    );
    let (mut ws, _) = node.ws_connect(&token, How::Origin).await.expect("genuine");
    assert_eq!(common::next_json(&mut ws).await["state"], "accepted");
    // A tampered token naming the now live connection is still refused as forged, not replayed.
    let (status, body) = common::refused(node.ws_connect(&tampered(&token), How::Origin).await);
    assert_eq!(status, 401, "{body}");
}

#[tokio::test]
async fn tokens_recorded_before_digests_were_kept_still_work() {
    let node = Node::start().await;
    let identity = node.provision("dev").await;
    let pending = node.token(&identity).await;
    // Tokens recorded without a digest (as an older release's database holds them).
    let db = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        node.data_dir().join("morrigan.db").display()
    ))
    .await
    .expect("open the node's database");
    sqlx::query("UPDATE tokens SET digest = NULL")
        .execute(&db)
        .await
        .expect("forget token digests");
    sqlx::query("UPDATE connections SET token_digest = NULL")
        .execute(&db)
        .await
        .expect("forget connection digests");

    // The pending connection's token is accepted by its signature, once.
    let (mut ws, _) = node
        .ws_connect(&pending, How::Origin)
        .await
        .expect("old record");
    assert_eq!(common::next_json(&mut ws).await["state"], "accepted");
    let (status, body) = common::refused(node.ws_connect(&pending, How::Origin).await);
    assert_eq!(status, 403, "{body}");

    // The identity token is accepted by its signature and gets its digest.
    let device = node.connect_device("dev", &identity).await;
    assert_eq!(node.record(&device.id).await["open"], true);
    let digest: Option<String> =
        sqlx::query_scalar("SELECT digest FROM tokens WHERE kind = 'identity'")
            .fetch_one(&db)
            .await
            .expect("read the digest");
    assert!(digest.is_some_and(|d| d.len() == 43));
    // A tampered copy is still refused.
    let (status, _) = node.connection_token(&tampered(&identity)).await;
    assert_eq!(status, 403);
}
