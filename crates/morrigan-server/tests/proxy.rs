//! Behind a load balancer: the client address comes from `X-Forwarded-For`/`Forwarded` only
//! when the TCP peer is a trusted proxy (`--trusted-proxy`).

mod common;

use common::Node;

/// The address recorded for a token exchange made with these extra headers.
async fn recorded_address(node: &Node, client: &str, headers: &[(&str, &str)]) -> String {
    let identity = node.provision(client).await;
    let mut req = reqwest::Client::new()
        .post(node.url("/api/core/connection"))
        .header("authorization", &identity);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.send().await.expect("token request");
    assert_eq!(res.status().as_u16(), 200);
    let body: serde_json::Value = res.json().await.expect("body");
    let token = body["token"].as_str().expect("token");
    let id = common::claims(token)["sub"]
        .as_str()
        .expect("sub")
        .to_string();
    node.record(&id).await["clientAddress"]
        .as_str()
        .expect("clientAddress")
        .to_string()
}

#[tokio::test]
async fn forwarded_headers_are_believed_only_from_trusted_proxies() {
    // Not trusted: the headers are ignored and the TCP peer is recorded.
    let plain = Node::start().await;
    let addr = recorded_address(&plain, "d1", &[("x-forwarded-for", "203.0.113.7")]).await;
    assert_eq!(addr, "127.0.0.1");

    // The loopback is a trusted proxy here.
    let behind_lb = Node::start_with(|c| {
        c.trusted_proxies = vec!["127.0.0.0/8".parse().expect("cidr")];
    })
    .await;
    let addr = recorded_address(
        &behind_lb,
        "d2",
        &[("x-forwarded-for", "198.51.100.9, 203.0.113.7")],
    )
    .await;
    // The nearest untrusted hop is the client (an earlier entry may be forged by it).
    assert_eq!(addr, "203.0.113.7");
    let addr = recorded_address(
        &behind_lb,
        "d3",
        &[("forwarded", "for=\"[2001:db8::1]:4711\";proto=https")],
    )
    .await;
    assert_eq!(addr, "2001:db8::1");
    // No header from a trusted proxy: the proxy itself.
    let addr = recorded_address(&behind_lb, "d4", &[]).await;
    assert_eq!(addr, "127.0.0.1");
}
