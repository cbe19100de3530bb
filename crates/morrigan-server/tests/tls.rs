//! A device session over TLS (HTTPS and WSS) with a certificate the test generates.

mod common;

use common::{How, Node};
use serde_json::json;

#[tokio::test]
async fn a_device_session_over_tls() {
    let node = Node::start_with(|c| {
        let dir = c.data_dir.parent().expect("temp dir").to_path_buf();
        c.tls = Some(common::self_signed(&dir));
    })
    .await;
    assert!(node.base.starts_with("https://"));

    let (status, health) = node
        .call(reqwest::Method::GET, "/healthz", None, None)
        .await;
    assert_eq!(status, 200, "{health}");

    // Token exchange over HTTPS; the reportUrl is https://.
    let identity = node.provision("secure-dev").await;
    let token = node.token(&identity).await;
    let claims = common::claims(&token);
    assert_eq!(
        claims["reportUrl"],
        format!("https://{}/api/core/connection/connect", node.addr)
    );

    // WSS, trusting only the generated certificate.
    let (mut ws, res) = node
        .ws_connect(&token, How::Subprotocol)
        .await
        .expect("wss");
    assert_eq!(res.status().as_u16(), 101);
    let accepted = common::next_json(&mut ws).await;
    assert_eq!(accepted["type"], "connection.state");
    assert_eq!(accepted["state"], "accepted");
    let id = accepted["connectionId"].as_str().unwrap().to_string();
    let mut device = common::Device {
        client_id: "secure-dev".into(),
        identity: identity.clone(),
        id: id.clone(),
        ws,
    };

    // Messages both ways.
    let (status, body) = node
        .send(&id, &json!({"type": "agent.run", "cmd": "uptime"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let got = device.next_json().await;
    assert_eq!(got, json!({"type": "agent.run", "cmd": "uptime"}));
    device
        .send_json(&json!({"type": "client.token.refresh"}))
        .await;
    assert_eq!(device.next_json().await["type"], "client.token.issue");
    device.assert_served(&node).await;

    // Plain HTTP to the TLS port does not get served.
    let plain = reqwest::Client::new()
        .get(format!("http://{}/healthz", node.addr))
        .timeout(common::WAIT)
        .send()
        .await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());

    // Operator close over TLS.
    let (status, _) = node
        .delete(&format!("/api/core/connection/{id}"), &node.admin)
        .await;
    assert_eq!(status, 200);
    assert_eq!(u16::from(device.next_close().await.code), 4000);
}
