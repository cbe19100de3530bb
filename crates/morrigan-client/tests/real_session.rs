//! A device session against a real in-process node: the greeting, the token refresh, handlers,
//! sending, a graceful stop, and the public state of a running client (`Handle::subscribe`,
//! `is_connected`, `connection_id`, a lagging subscriber).

mod support;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use morrigan_client::{Capability, Client, Error, Event, Events, Incoming, Sender};
use serde_json::{Value, json};
use support::{
    Node, WAIT, claims, connected, dead_url, fast_backoff, next_event, recorders, until_stopped,
    wait_for,
};
use tokio::sync::mpsc;

#[tokio::test]
async fn full_session_greeting_handlers_refresh_and_graceful_stop() {
    let (providers, mut inbox) = recorders(&["agent", "files"]);
    let node = Node::start_with(|s| s.providers = providers).await;
    // As the provisioning endpoint answers it: a JSON string literal.
    let provisioned = node.provision_body("dev-1").await;
    let identity: String = serde_json::from_str(&provisioned).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = Client::builder(node.provider_url(), provisioned)
        .state_dir(dir.path())
        .backoff(fast_backoff())
        .on_type("agent.ping", |m: Value, s: Sender| async move {
            s.send("agent.pong", &json!({"echo": m["n"]}))
                .await
                .unwrap();
        })
        .on_provider("files", |m: Value, s: Sender| async move {
            s.send_value(json!({"type": "files.ack", "of": m["type"]}))
                .await
                .unwrap();
        })
        .capability(Capability {
            name: "agent".into(),
            version: "1.0.0".into(),
            ..Capability::default()
        })
        .build()
        .unwrap();
    let (handle, mut events) = client.start();

    // Accepted: the event names the record the server opened for this device.
    let id = connected(&mut events).await;
    let record = node.record(&id).await;
    assert_eq!(record["clientId"], "dev-1");
    assert_eq!(record["serverId"], node.node_id.as_str());
    assert_eq!(record["open"], true);

    // The greeting reached the server: the state and the capability report are stored.
    node.get_until("/api/core/client/dev-1", "state ready", |c| {
        c["state"] == "ready"
    })
    .await;
    let reported = node
        .get_until("/api/core/capability/dev-1", "a report", |_| true)
        .await;
    assert_eq!(
        reported["capabilities"],
        json!([
            {"name": "agent", "version": "1.0.0", "messages": ["ping"]},
            {"name": "files", "version": "", "messages": []},
        ])
    );

    // The token refresh: a new identity token signed by the server, in use, saved 0600, and the
    // client's current one on the server.
    wait_for(&mut events, |e| matches!(e, Event::TokenRefreshed { .. })).await;
    let refreshed = handle.identity_token();
    assert_ne!(refreshed, identity);
    let new_claims = claims(&refreshed);
    assert_eq!(new_claims["sub"], "dev-1");
    assert_eq!(new_claims["aud"], claims(&identity)["aud"]);
    let saved = dir.path().join("identity-token");
    assert_eq!(std::fs::read_to_string(&saved).unwrap(), refreshed);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&saved).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let client_record = node.get("/api/core/client/dev-1").await.1;
    assert_eq!(client_record["tokenId"], new_claims["jti"]);
    let (status, body) = node.exchange(&refreshed).await;
    assert_eq!(status, 200, "the server takes the refreshed token: {body}");

    // Handlers, by type then by provider: what they send reaches the server from this
    // connection; the messages also come out as events.
    node.send(&id, json!({"type": "agent.ping", "n": 7})).await;
    let pong = inbox.next().await;
    assert_eq!(pong.body, json!({"type": "agent.pong", "echo": 7}));
    assert_eq!(
        (pong.connection_id.as_str(), pong.client_id.as_str()),
        (id.as_str(), "dev-1")
    );
    let event = wait_for(&mut events, |e| matches!(e, Event::Message(_))).await;
    assert!(
        matches!(event, Event::Message(ref m) if *m == json!({"type": "agent.ping", "n": 7})),
        "{event:?}"
    );
    node.send(&id, json!({"type": "files.get.chunk"})).await;
    assert_eq!(
        inbox.next().await.body,
        json!({"type": "files.ack", "of": "files.get.chunk"})
    );

    // Sending from the application.
    handle
        .send("agent.status", &json!({"load": 0.5}))
        .await
        .unwrap();
    assert_eq!(
        inbox.next().await.body,
        json!({"type": "agent.status", "load": 0.5})
    );

    // Graceful stop: the state is reported, the socket closed with 1000, and that is the end.
    handle.stop("SIGINT").await.unwrap();
    node.get_until("/api/core/client/dev-1", "the stop state", |c| {
        c["state"] == "stopped.SIGINT"
    })
    .await;
    let closed = node
        .record_until(&id, "closed", |r| r["open"] == false)
        .await;
    assert_eq!(closed["closeCode"], 1000, "{closed}");
    let rest = until_stopped(&mut events).await;
    assert!(
        matches!(&rest[..], [.., Event::Disconnected { code: 1000, reason }, Event::Stopped(Ok(()))] if reason == "stopped.SIGINT"),
        "{rest:?}"
    );
}

#[tokio::test]
async fn stop_cancels_running_handlers() {
    struct Flag(Arc<AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let dropped = Arc::new(AtomicBool::new(false));
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let node = Node::start().await;
    let identity = node.provision("dev-hang").await;
    let client = {
        let dropped = dropped.clone();
        Client::builder(node.provider_url(), &identity)
            .token_refresh(None)
            .on_type("agent.hang", move |_: Value, _: Sender| {
                let flag = Flag(dropped.clone());
                let started_tx = started_tx.clone();
                async move {
                    let _flag = flag;
                    let _ = started_tx.send(());
                    std::future::pending::<()>().await;
                }
            })
            .build()
            .unwrap()
    };
    let (handle, mut events) = client.start();
    let id = connected(&mut events).await;
    node.send(&id, json!({"type": "agent.hang"})).await;
    tokio::time::timeout(WAIT, started.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(!dropped.load(Ordering::SeqCst));
    tokio::time::timeout(WAIT, handle.stop("test"))
        .await
        .unwrap()
        .unwrap();
    assert!(
        dropped.load(Ordering::SeqCst),
        "the handler was not cancelled"
    );
}

#[tokio::test]
async fn connect_once_returns_after_accepted() {
    let (providers, mut inbox) = recorders(&["agent"]);
    let node = Node::start_with(|s| s.providers = providers).await;
    let identity = node.provision("dev-once").await;
    let mut connection = morrigan_client::connect_once(&node.provider_url(), &identity)
        .await
        .unwrap();
    let id = connection.connection_id().expect("an id").to_string();
    let record = node.record(&id).await;
    assert_eq!(record["clientId"], "dev-once");
    assert!(record["connected"].is_string(), "{record}");
    assert_eq!(connection.url().scheme(), "ws");

    connection
        .send(&json!({"type": "agent.hello"}))
        .await
        .unwrap();
    let hello = inbox.next().await;
    assert_eq!(
        (hello.connection_id.as_str(), &hello.body),
        (id.as_str(), &json!({"type": "agent.hello"}))
    );
    assert!(matches!(
        connection.send(&json!({"type": "nodot"})).await,
        Err(Error::InvalidType { .. })
    ));

    node.send(&id, json!({"type": "agent.ping", "payload": "x"}))
        .await;
    let incoming = tokio::time::timeout(WAIT, connection.recv()).await.unwrap();
    assert_eq!(
        incoming,
        Incoming::Message(json!({"type": "agent.ping", "payload": "x"}))
    );

    assert_eq!(connection.close(1000, "", WAIT).await, 1000);
    let closed = node
        .record_until(&id, "closed", |r| r["open"] == false)
        .await;
    assert_eq!(closed["closeCode"], 1000, "{closed}");
}

#[tokio::test]
async fn is_connected_and_connection_id_follow_the_connection() {
    // Never connected: nothing listens for real at the URL.
    let (dead, _dead) = dead_url().await;
    let token = support::unsigned_jwt(&json!({"sub": "d"}));
    let client = Client::builder(dead, &token)
        .backoff(fast_backoff())
        .build()
        .unwrap();
    let (handle, mut events) = client.start();
    wait_for(&mut events, |e| matches!(e, Event::ConnectFailed(_))).await;
    assert!(!handle.is_connected());
    assert!(!handle.sender().is_connected());
    assert_eq!(handle.sender().connection_id(), None);
    handle.stop("test").await.unwrap();

    let node = Node::start().await;
    let identity = node.provision("dev-link").await;
    let client = Client::builder(node.provider_url(), &identity)
        .backoff(fast_backoff())
        .token_refresh(None)
        .build()
        .unwrap();
    let (handle, mut events) = client.start();
    let sender = handle.sender();
    let first = connected(&mut events).await;
    // By the time the event is out, the state says so too; the id is the server's record.
    assert!(handle.is_connected() && sender.is_connected());
    assert_eq!(sender.connection_id().as_deref(), Some(first.as_str()));
    let open = node.records_of("dev-link").await;
    assert_eq!(open.len(), 1);
    assert_eq!(open[0]["id"], first.as_str());

    // Closed by an operator (4000): not connected, no id, until the client reconnects.
    node.close_connection(&first, "maintenance").await;
    let event = wait_for(&mut events, |e| matches!(e, Event::Disconnected { .. })).await;
    assert!(
        matches!(event, Event::Disconnected { code: 4000, ref reason } if reason == "maintenance"),
        "{event:?}"
    );
    assert!(!handle.is_connected() && !sender.is_connected());
    assert_eq!(sender.connection_id(), None);
    let second = connected(&mut events).await;
    assert_ne!(second, first);
    assert!(handle.is_connected());
    assert_eq!(sender.connection_id().as_deref(), Some(second.as_str()));
    assert_eq!(node.record(&second).await["open"], true);

    handle.stop("test").await.unwrap();
    assert!(!sender.is_connected());
    assert_eq!(sender.connection_id(), None);
}

/// The messages of type `agent.n` among `events`, by their `n`.
fn numbers(events: &[Event]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) if m["type"] == "agent.n" => m["n"].as_u64(),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn subscribe_starts_now_and_every_subscriber_gets_every_event() {
    let node = Node::start().await;
    let identity = node.provision("dev-sub").await;
    let client = Client::builder(node.provider_url(), &identity)
        .token_refresh(None)
        .build()
        .unwrap();
    let (handle, mut first) = client.start();
    let id = connected(&mut first).await;
    // Subscribed after the connect: it does not see it.
    let mut late = handle.subscribe();
    node.send(&id, json!({"type": "agent.n", "n": 1})).await;
    let event = next_event(&mut late).await;
    assert!(
        matches!(event, Event::Message(ref m) if m["n"] == 1),
        "the first event of a late subscription: {event:?}"
    );
    let mut later = handle.subscribe();
    node.send(&id, json!({"type": "agent.n", "n": 2})).await;
    handle.stop("test").await.unwrap();

    let first = until_stopped(&mut first).await;
    let late = until_stopped(&mut late).await;
    let later = until_stopped(&mut later).await;
    assert_eq!(numbers(&first), [1, 2]);
    assert_eq!(numbers(&late), [2]);
    assert_eq!(numbers(&later), [2]);
    for seen in [&first, &late, &later] {
        assert!(
            matches!(
                &seen[..],
                [
                    ..,
                    Event::Disconnected { code: 1000, .. },
                    Event::Stopped(Ok(()))
                ]
            ),
            "{seen:?}"
        );
    }
}

/// A log sink for the current thread.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn a_lagging_subscriber_skips_the_oldest_events_and_the_lag_is_logged() {
    // Documented: a subscriber more than the channel's capacity behind skips the oldest events,
    // and the skip is logged; the client never waits for it, and other subscribers lose nothing.
    let logs = Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let logs = logs.clone();
            move || logs.clone()
        })
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    // This test runs on one thread (the default test runtime): the subscriber sees the client's
    // `Events::recv` (the node runs on its own runtime, unseen).
    let _logging = tracing::subscriber::set_default(subscriber);

    const CAPACITY: usize = 4;
    const SENT: u64 = 12;
    let node = Node::start().await;
    let identity = node.provision("dev-lag").await;
    let client = Client::builder(node.provider_url(), &identity)
        .token_refresh(None)
        .event_capacity(CAPACITY)
        .build()
        .unwrap();
    let (handle, mut keeping_up) = client.start();
    let id = connected(&mut keeping_up).await;
    let mut slow: Events = handle.subscribe();
    for n in 1..=SENT {
        node.send(&id, json!({"type": "agent.n", "n": n})).await;
        // This one reads every event as it comes: it never falls behind.
        let event = next_event(&mut keeping_up).await;
        assert!(
            matches!(event, Event::Message(ref m) if m["n"] == n),
            "{event:?}"
        );
    }
    assert!(!logs.text().contains("fell behind"), "{}", logs.text());

    // The slow one gets the newest CAPACITY events, in order; the older ones are skipped.
    let skipped = SENT - CAPACITY as u64;
    let mut got = Vec::new();
    for _ in 0..CAPACITY {
        got.push(next_event(&mut slow).await);
    }
    assert_eq!(numbers(&got), ((skipped + 1)..=SENT).collect::<Vec<_>>());
    let logged = logs.text();
    assert!(
        logged.contains("event subscriber fell behind")
            && logged.contains(&format!("skipped={skipped}")),
        "{logged}"
    );

    // Still a working subscription: it sees the end like any other.
    handle.stop("test").await.unwrap();
    let rest = until_stopped(&mut slow).await;
    assert!(
        matches!(
            &rest[..],
            [
                Event::Disconnected { code: 1000, .. },
                Event::Stopped(Ok(()))
            ]
        ),
        "{rest:?}"
    );
    let rest = until_stopped(&mut keeping_up).await;
    assert!(
        matches!(
            &rest[..],
            [Event::Disconnected { .. }, Event::Stopped(Ok(()))]
        ),
        "{rest:?}"
    );
}
