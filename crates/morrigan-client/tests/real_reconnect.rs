//! Staying connected across server changes, against real in-process nodes: a rolling restart
//! behind a load balancer (1001), the identity token across restarts of the device (saved
//! token, the server's grace period), fail-over between provider URLs, and TLS with a private
//! CA.

mod support;

use std::time::Duration;

use morrigan_client::{BackoffConfig, Client, Endpoint, Error, Event};
use serde_json::Value;
use support::{
    Node, Proxy, claims, cluster, connected, dead_url, fast_backoff, private_ca, wait_for,
};

#[tokio::test]
async fn going_away_reconnects_spread_out_with_the_refreshed_token() {
    // Two nodes of one cluster behind a load balancer; refreshed tokens replace older ones at
    // once (no grace period), so a reconnect succeeds only with the newest token.
    let proxy = Proxy::start().await;
    let (a, b, _dir) = cluster(|s| {
        s.config.public_url = Some(proxy.base());
        s.config.refresh_grace = Duration::ZERO;
    })
    .await;
    proxy.retarget(a.addr);
    let identity = a.provision("dev-roll").await;
    // The device's own backoff is ~zero: only the going-away spread can make the delay longer.
    let backoff = BackoffConfig {
        base: Duration::from_micros(1),
        cap: Duration::from_micros(1),
        stable_after: Duration::from_secs(30),
        going_away_spread: Duration::from_millis(500),
    };
    let client = Client::builder(format!("{}/api/core/connection", proxy.base()), &identity)
        .backoff(backoff)
        .build()
        .unwrap();
    let (handle, mut events) = client.start();
    let first = connected(&mut events).await;
    assert_eq!(a.record(&first).await["serverId"], a.node_id.as_str());
    wait_for(&mut events, |e| matches!(e, Event::TokenRefreshed { .. })).await;
    let refreshed = handle.identity_token();
    assert_ne!(refreshed, identity);

    // Rolling restart: new connections go to B, then A stops (every socket gets 1001).
    proxy.retarget(b.addr);
    a.stop().await;
    let event = wait_for(&mut events, |e| matches!(e, Event::Disconnected { .. })).await;
    assert!(
        matches!(event, Event::Disconnected { code: 1001, ref reason } if reason == "server shutting down"),
        "{event:?}"
    );
    let event = wait_for(&mut events, |e| matches!(e, Event::Reconnecting { .. })).await;
    let Event::Reconnecting { attempt, delay } = event else {
        unreachable!()
    };
    assert_eq!(attempt, 1);
    // Drawn from [0, spread] rather than [0, base]: the fleet does not come back at once.
    assert!(
        delay > backoff.cap && delay <= backoff.going_away_spread,
        "{delay:?}"
    );
    let second = connected(&mut events).await;
    assert_eq!(b.record(&second).await["serverId"], b.node_id.as_str());
    // The token it started with is refused by now: the reconnect used the refreshed one.
    let (status, body) = b.exchange(&identity).await;
    assert_eq!(status, 403, "{body}");
    handle.stop("test").await.unwrap();
}

#[tokio::test]
async fn a_restart_uses_the_saved_token() {
    let node = Node::start_with(|s| s.config.refresh_grace = Duration::ZERO).await;
    let provisioned = node.provision_body("dev-saved").await;
    let dir = tempfile::tempdir().unwrap();
    let (handle, mut events) = Client::builder(node.provider_url(), &provisioned)
        .state_dir(dir.path())
        .backoff(fast_backoff())
        .build()
        .unwrap()
        .start();
    connected(&mut events).await;
    wait_for(&mut events, |e| matches!(e, Event::TokenRefreshed { .. })).await;
    let refreshed = handle.identity_token();
    handle.stop("restart").await.unwrap();
    // Without a grace period the provisioned token is dead now.
    let original: String = serde_json::from_str(&provisioned).unwrap();
    let (status, body) = node.exchange(&original).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["reason"], "Identity token has been revoked.");

    // Same configuration (the provisioned token): the saved one is used, and works.
    let (handle, mut events) = Client::builder(node.provider_url(), &provisioned)
        .state_dir(dir.path())
        .backoff(fast_backoff())
        .token_refresh(None)
        .build()
        .unwrap()
        .start();
    assert_eq!(handle.identity_token(), refreshed);
    let id = connected(&mut events).await;
    assert_eq!(node.record(&id).await["clientId"], "dev-saved");
    handle.stop("test").await.unwrap();

    // Without the state directory the client falls back to the provisioned token (documented
    // on `ClientBuilder::state_dir`), which the server now refuses: it stops.
    let (handle, _events) = Client::builder(node.provider_url(), &provisioned)
        .backoff(fast_backoff())
        .build()
        .unwrap()
        .start();
    let result = tokio::time::timeout(support::WAIT, handle.wait())
        .await
        .unwrap();
    assert!(
        matches!(result, Err(Error::IdentityRejected { status: 403, .. })),
        "{result:?}"
    );
}

#[tokio::test]
async fn after_a_refresh_the_older_token_works_for_the_grace_period() {
    // The server's default: older identity tokens stay valid for a while after a refresh, so a
    // device that lost the new token (no state directory, or it crashed before saving) can
    // still come back with the one it was provisioned with.
    let node = Node::start().await;
    let identity = node.provision("dev-grace").await;
    let (handle, mut events) = Client::builder(node.provider_url(), &identity)
        .backoff(fast_backoff())
        .build()
        .unwrap()
        .start();
    let first = connected(&mut events).await;
    wait_for(&mut events, |e| matches!(e, Event::TokenRefreshed { .. })).await;
    let refreshed = handle.identity_token();
    handle.stop("crash").await.unwrap();
    let current = node.get("/api/core/client/dev-grace").await.1;
    assert_eq!(current["tokenId"], claims(&refreshed)["jti"]);

    let (handle, mut events) = Client::builder(node.provider_url(), &identity)
        .backoff(fast_backoff())
        .token_refresh(None)
        .build()
        .unwrap()
        .start();
    let second = connected(&mut events).await;
    assert_ne!(second, first);
    assert_eq!(handle.identity_token(), identity);
    handle.stop("test").await.unwrap();
}

#[tokio::test]
async fn several_provider_urls_are_tried_in_turn() {
    // Two nodes of one cluster (one store: both take the same identity token) and a URL where
    // every attempt fails.
    let (a, b, _dir) = cluster(|_| {}).await;
    let identity = a.provision("dev-multi").await;
    let (dead, _dead) = dead_url().await;
    let client = Client::builder_multi([dead.clone(), a.provider_url()], &identity)
        .fallback_url(b.provider_url())
        .backoff(fast_backoff())
        .token_refresh(None)
        .build()
        .unwrap();
    assert_eq!(
        client.provider_urls(),
        [dead.clone(), a.provider_url(), b.provider_url()]
    );
    let (handle, mut events) = client.start();

    // The first URL fails: the next one is tried.
    let event = wait_for(&mut events, |e| {
        matches!(e, Event::ConnectFailed(_) | Event::Connected { .. })
    })
    .await;
    assert!(
        matches!(event, Event::ConnectFailed(Error::Http(_))),
        "{event:?}"
    );
    let on_a = connected(&mut events).await;
    assert_eq!(a.record(&on_a).await["serverId"], a.node_id.as_str());

    // A lost connection moves on to the next URL too.
    a.close_connection(&on_a, "node-draining").await;
    let on_b = connected(&mut events).await;
    assert_eq!(a.record(&on_b).await["serverId"], b.node_id.as_str());

    // And round robin: after B, the failing URL again, then A.
    b.close_connection(&on_b, "node-draining").await;
    let event = wait_for(&mut events, |e| {
        matches!(e, Event::ConnectFailed(_) | Event::Connected { .. })
    })
    .await;
    assert!(matches!(event, Event::ConnectFailed(_)), "{event:?}");
    let again = connected(&mut events).await;
    assert_eq!(a.record(&again).await["serverId"], a.node_id.as_str());
    handle.stop("test").await.unwrap();
}

#[tokio::test]
async fn an_empty_provider_url_list_is_a_configuration_error() {
    let err = Client::builder_multi(Vec::<String>::new(), "a.b.c")
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
}

#[tokio::test]
async fn https_and_wss_trust_the_added_root_ca() {
    let certs = tempfile::tempdir().unwrap();
    let (ca_pem, files) = private_ca(certs.path());
    let node = Node::start_with(|s| {
        s.config.tls = Some(files);
        s.root_ca_pem = Some(ca_pem.clone());
    })
    .await;
    assert!(node.base.starts_with("https://"));
    let identity = node.provision("dev-tls").await;

    // Without the CA: the HTTPS exchange fails (retried), nothing reaches the server.
    let (handle, mut events) = Client::builder(node.provider_url(), &identity)
        .backoff(fast_backoff())
        .build()
        .unwrap()
        .start();
    let event = wait_for(&mut events, |e| matches!(e, Event::ConnectFailed(_))).await;
    assert!(
        matches!(event, Event::ConnectFailed(Error::Http(_))),
        "{event:?}"
    );
    wait_for(&mut events, |e| matches!(e, Event::Reconnecting { .. })).await;
    handle.stop("test").await.unwrap();
    assert!(node.records_of("dev-tls").await.is_empty());

    // With it: HTTPS exchange, then WSS to the https:// report URL.
    let (handle, mut events) = Client::builder(node.provider_url(), &identity)
        .root_ca_pem(ca_pem.clone())
        .backoff(fast_backoff())
        .token_refresh(None)
        .build()
        .unwrap()
        .start();
    let id = connected(&mut events).await;
    let record = node.record(&id).await;
    assert!(
        record["reportUrl"]
            .as_str()
            .is_some_and(|u| u.starts_with("https://")),
        "{record}"
    );
    handle.stop("test").await.unwrap();

    // The single-attempt API takes the CA too.
    let endpoint = Endpoint::with_root_cas(&node.provider_url(), &[ca_pem]).unwrap();
    let connection = endpoint.connect(&identity).await.unwrap();
    assert_eq!(connection.url().scheme(), "wss");

    // WSS checks the certificate on its own: a valid connection token does not get an endpoint
    // without the CA past the TLS handshake.
    let token = endpoint.exchange_token(&identity).await.unwrap();
    let bare = Endpoint::new(&node.provider_url()).unwrap();
    let refused = bare.connect_with_token(&token).await;
    assert!(matches!(refused, Err(Error::WebSocket(_))), "{refused:?}");
    let pending: Vec<Value> = node.records_of("dev-tls").await;
    assert!(
        pending.iter().any(|r| r["connected"].is_null()),
        "the token of the refused attempt was never used: {pending:?}"
    );
}
