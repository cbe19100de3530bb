//! What stops a client for good and what it retries, against a real in-process node: closes
//! 4003 (deprovisioned) and 4001 (superseded), refused identity tokens, refused upgrades, and a
//! stop when the server no longer answers.

mod support;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use morrigan_client::protocol::records::ConnectionRecord;
use morrigan_client::{Client, Endpoint, Error, Event};
use morrigan_server::hooks::Hooks;
use serde_json::json;
use support::{
    Node, Proxy, WAIT, claims, connected, fast_backoff, unsigned_jwt, until_stopped, wait_for,
};

/// After the last `Disconnected` (or from the start), the client made no further attempt.
fn no_attempt_after_the_end(events: &[Event]) {
    let from = events
        .iter()
        .rposition(|e| matches!(e, Event::Disconnected { .. }))
        .map_or(0, |i| i + 1);
    let retries: Vec<_> = events[from..]
        .iter()
        .filter(|e| matches!(e, Event::Reconnecting { .. } | Event::Connected { .. }))
        .collect();
    assert!(retries.is_empty(), "retried after a fatal end: {events:?}");
}

#[tokio::test]
async fn deprovisioning_stops_the_client_for_good() {
    let node = Node::start().await;
    let identity = node.provision("dev-gone").await;
    let client = Client::builder(node.provider_url(), &identity)
        .backoff(fast_backoff())
        .token_refresh(None)
        .build()
        .unwrap();
    let (handle, mut events) = client.start();
    let id = connected(&mut events).await;
    node.deprovision("dev-gone").await;

    let result = tokio::time::timeout(WAIT, handle.wait()).await.unwrap();
    assert!(
        matches!(result, Err(Error::Revoked { code: 4003, ref reason }) if reason == "client deprovisioned"),
        "{result:?}"
    );
    let rest = until_stopped(&mut events).await;
    assert!(
        matches!(
            &rest[..],
            [
                ..,
                Event::Disconnected { code: 4003, .. },
                Event::Stopped(Err(Error::Revoked { .. }))
            ]
        ),
        "{rest:?}"
    );
    no_attempt_after_the_end(&rest);
    // The handle is alive, the client is not: a new subscription ends at once.
    let late = tokio::time::timeout(WAIT, handle.subscribe().recv()).await;
    assert!(matches!(late, Ok(None)), "{late:?}");
    let record = node
        .record_until(&id, "closed", |r| r["open"] == false)
        .await;
    assert_eq!(record["closeCode"], 4003);
    // The handle reports the same outcome.
    assert!(matches!(
        handle.stop("late").await,
        Err(Error::Revoked { .. })
    ));
}

#[tokio::test]
async fn a_newer_connection_of_the_same_client_supersedes_and_stops_it() {
    let node = Node::start().await;
    let identity = node.provision("dev-twice").await;
    let client = Client::builder(node.provider_url(), &identity)
        .backoff(fast_backoff())
        .token_refresh(None)
        .build()
        .unwrap();
    let (handle, mut events) = client.start();
    let older = connected(&mut events).await;

    // The same device identity connects again (a second agent, a cloned disk).
    let newer = morrigan_client::connect_once(&node.provider_url(), &identity)
        .await
        .unwrap();
    let newer_id = newer.connection_id().unwrap().to_string();
    let result = tokio::time::timeout(WAIT, handle.wait()).await.unwrap();
    let Err(Error::Superseded { reason }) = result else {
        panic!("{result:?}")
    };
    assert!(reason.contains(&newer_id), "{reason}");
    let rest = until_stopped(&mut events).await;
    assert!(
        matches!(
            &rest[..],
            [
                ..,
                Event::Disconnected { code: 4001, .. },
                Event::Stopped(Err(Error::Superseded { .. }))
            ]
        ),
        "{rest:?}"
    );
    no_attempt_after_the_end(&rest);
    assert_eq!(
        node.record_until(&older, "closed", |r| r["open"] == false)
            .await["closeCode"],
        4001
    );
    assert_eq!(node.record(&newer_id).await["open"], true);
}

/// Starts a client with `token` and returns how it ended and what it went through.
async fn run_until_fatal(node: &Node, token: &str) -> (Result<(), Error>, Vec<Event>) {
    let client = Client::builder(node.provider_url(), token)
        .backoff(fast_backoff())
        .build()
        .unwrap();
    let (handle, mut events) = client.start();
    let result = tokio::time::timeout(WAIT, handle.wait()).await.unwrap();
    (result, until_stopped(&mut events).await)
}

#[tokio::test]
async fn refused_identity_tokens_are_fatal() {
    let node = Node::start().await;
    let identity = node.provision("dev-id").await;

    // The server signs its tokens: an unsigned one (what a scripted server hands out) and a
    // signed one whose payload was changed are refused.
    let unsigned = unsigned_jwt(&claims(&identity));
    let mut parts: Vec<String> = identity.split('.').map(str::to_string).collect();
    let mut forged = claims(&identity);
    forged["sub"] = json!("someone-else");
    parts[1] = support::unsigned_jwt(&forged)
        .split('.')
        .nth(1)
        .unwrap()
        .to_string();
    let tampered = parts.join(".");
    // Provisioning again revokes the older token.
    let replaced = identity.clone();
    let current = node.provision("dev-id").await;
    assert_ne!(current, replaced);

    for (what, token, reason) in [
        ("unsigned", unsigned, "Identity token refused"),
        ("tampered", tampered, "Identity token refused"),
        ("replaced", replaced, "Identity token has been revoked."),
    ] {
        let (result, events) = run_until_fatal(&node, &token).await;
        let Err(Error::IdentityRejected {
            status,
            state,
            reason: got,
        }) = result
        else {
            panic!("{what}: {result:?}")
        };
        assert_eq!(
            (status, state.as_str()),
            (403, "authenticationfailed"),
            "{what}"
        );
        assert!(got.starts_with(reason), "{what}: {got}");
        // One attempt, no retry.
        assert!(
            matches!(
                &events[..],
                [
                    Event::ConnectFailed(Error::IdentityRejected { .. }),
                    Event::Stopped(Err(_))
                ]
            ),
            "{what}: {events:?}"
        );
    }
    assert!(node.records_of("dev-id").await.is_empty());

    // The current token still works.
    let connection = morrigan_client::connect_once(&node.provider_url(), &current)
        .await
        .unwrap();
    assert!(connection.connection_id().is_some());
}

/// Refuses the first connection it is asked about, and remembers every record it saw.
#[derive(Default)]
struct RefuseFirst {
    refused: AtomicBool,
    seen: Mutex<Vec<String>>,
}

#[async_trait]
impl Hooks for RefuseFirst {
    async fn authenticate(&self, record: &ConnectionRecord) -> Result<(), String> {
        self.seen.lock().unwrap().push(record.id.clone());
        if self.refused.swap(true, Ordering::SeqCst) {
            Ok(())
        } else {
            Err("maintenance".into())
        }
    }
}

#[tokio::test]
async fn a_refused_upgrade_is_retried_with_a_fresh_connection_token() {
    let hook = std::sync::Arc::new(RefuseFirst::default());
    let node = Node::start_with(|s| s.hooks.push(hook.clone())).await;
    let identity = node.provision("dev-retry").await;
    let client = Client::builder(node.provider_url(), &identity)
        .backoff(fast_backoff())
        .token_refresh(None)
        .build()
        .unwrap();
    let (handle, mut events) = client.start();
    let event = wait_for(&mut events, |e| matches!(e, Event::ConnectFailed(_))).await;
    assert!(
        matches!(event, Event::ConnectFailed(Error::UpgradeRefused { status: 403, ref reason }) if reason == "Refused: maintenance"),
        "{event:?}"
    );
    let event = wait_for(&mut events, |e| matches!(e, Event::Reconnecting { .. })).await;
    assert!(
        matches!(event, Event::Reconnecting { attempt: 1, .. }),
        "{event:?}"
    );
    let id = connected(&mut events).await;
    // Each attempt had a connection token (and record) of its own.
    let seen = hook.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_ne!(seen[0], seen[1]);
    assert_eq!(seen[1], id);
    handle.stop("test").await.unwrap();
}

#[tokio::test]
async fn connection_tokens_are_single_use_and_signed() {
    let node = Node::start().await;
    let identity = node.provision("dev-token").await;
    let endpoint = Endpoint::new(&node.provider_url()).unwrap();
    let token = endpoint.exchange_token(&identity).await.unwrap();
    let report_url = claims(&token)["reportUrl"].as_str().unwrap().to_string();
    assert_eq!(report_url, node.url("/api/core/connection/connect"));
    let first = endpoint.connect_with_token(&token).await.unwrap();
    assert!(first.connection_id().is_some());

    // Replayed: 403 (401 is for tokens that are not valid at all).
    let replay = endpoint.connect_with_token(&token).await;
    assert!(
        matches!(replay, Err(Error::UpgradeRefused { status: 403, ref reason }) if reason.contains("already used")),
        "{replay:?}"
    );
    // An unsigned copy of a valid, unused token: 401, and the token itself is not spent.
    let unused = endpoint.exchange_token(&identity).await.unwrap();
    let unsigned = unsigned_jwt(&claims(&unused));
    let refused = endpoint.connect_with_token(&unsigned).await;
    assert!(
        matches!(refused, Err(Error::UpgradeRefused { status: 401, ref reason }) if reason.starts_with("Connection token refused")),
        "{refused:?}"
    );
    let second = endpoint.connect_with_token(&unused).await.unwrap();
    assert_eq!(
        second.connection_id(),
        claims(&unused)["sub"].as_str(),
        "the record named by the token"
    );
    // An upgrade refusal is not fatal: the client retries those.
    assert!(!refused.unwrap_err().is_fatal());
}

#[tokio::test]
async fn stop_is_bounded_when_the_server_does_not_answer() {
    // The device reaches the node through a proxy (a load balancer) that then stalls: the
    // socket stays open and nothing comes back, not even the close.
    let proxy = Proxy::start().await;
    let node = Node::start_with(|s| s.config.public_url = Some(proxy.base())).await;
    proxy.retarget(node.addr);
    let identity = node.provision("dev-stall").await;
    let client = Client::builder(format!("{}/api/core/connection", proxy.base()), &identity)
        .token_refresh(None)
        .stop_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let (handle, mut events) = client.start();
    let id = connected(&mut events).await;
    assert_eq!(node.record(&id).await["open"], true);

    proxy.freeze();
    let started = std::time::Instant::now();
    tokio::time::timeout(WAIT, handle.stop("test"))
        .await
        .expect("stop returns although the server never answers")
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let rest = until_stopped(&mut events).await;
    assert!(
        matches!(
            &rest[..],
            [
                ..,
                Event::Disconnected { code: 1000, .. },
                Event::Stopped(Ok(()))
            ]
        ),
        "{rest:?}"
    );
}
