//! The cluster bus under faults, with real processes: a NATS server killed and restarted, an
//! owner node frozen with SIGSTOP. A send that cannot reach the owner answers 503 at once, and
//! a send that was answered with a failure is never delivered afterwards.
//!
//! Needs `MORRIGAN_TEST_POSTGRES_URL` and `MORRIGAN_TEST_NATS_URL` (the killable NATS server is
//! a private `nats-server` process this test starts, from the same installation).

mod cluster_support;
mod harness;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cluster_support::*;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// A NATS server of this test's own, on a port it chose at its first start (`-p -1`) and keeps
/// across restarts (the nodes know only that URL).
struct PrivateNats {
    child: Option<Child>,
    port: u16,
    log: tempfile::NamedTempFile,
}

impl PrivateNats {
    fn binary() -> String {
        for candidate in [
            "/usr/sbin/nats-server",
            "/usr/bin/nats-server",
            "/usr/local/bin/nats-server",
        ] {
            if std::path::Path::new(candidate).exists() {
                return candidate.to_string();
            }
        }
        "nats-server".to_string()
    }

    async fn start() -> Self {
        let mut nats = Self {
            child: None,
            port: 0,
            log: tempfile::NamedTempFile::new().expect("nats log file"),
        };
        nats.spawn(-1);
        // "Listening for client connections on 127.0.0.1:<port>"
        let deadline = Instant::now() + Duration::from_secs(10);
        nats.port = loop {
            let log = std::fs::read_to_string(nats.log.path()).unwrap_or_default();
            let port = log.lines().find_map(|l| {
                let (_, addr) = l.split_once("Listening for client connections on ")?;
                addr.trim().rsplit(':').next()?.parse::<u16>().ok()
            });
            if let Some(port) = port {
                break port;
            }
            nats.assert_running(&log);
            assert!(
                Instant::now() < deadline,
                "nats-server did not start: {log}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        nats
    }

    fn spawn(&mut self, port: i32) {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.log.path())
            .expect("nats log");
        let child = Command::new(Self::binary())
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
    }

    fn assert_running(&mut self, log: &str) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!("nats-server exited ({status}): {log}");
        }
    }

    /// Starts again on the same port. A bind failure (the port's old connections still
    /// closing) is retried for a few seconds.
    async fn restart(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.spawn(i32::from(self.port));
            loop {
                if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                    .await
                    .is_ok()
                {
                    return;
                }
                if let Some(child) = self.child.as_mut()
                    && let Ok(Some(_)) = child.try_wait()
                {
                    break;
                }
                assert!(Instant::now() < deadline, "nats-server did not restart");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let log = std::fs::read_to_string(self.log.path()).unwrap_or_default();
            assert!(
                Instant::now() < deadline,
                "nats-server could not listen on port {} again: {log}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Times a send through `via`.
async fn timed_send(
    http: &reqwest::Client,
    via: &Node,
    user: &str,
    id: &str,
    body: &Value,
) -> (u16, Duration) {
    let started = Instant::now();
    let status = send(http, via, user, id, body).await;
    (status, started.elapsed())
}

/// The device's next text frame within `within`, skipping pings; `None` if none came.
async fn next_text_within(ws: &mut Ws, within: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                return Some(serde_json::from_str(t.as_str()).expect("json"));
            }
            Ok(Some(Ok(Message::Close(f)))) => panic!("device closed: {f:?}"),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => panic!("device socket failed: {e}"),
            Ok(None) => panic!("device socket ended"),
            Err(_) => return None,
        }
    }
}

/// Two nodes on a fresh database; a device on `a`; a first send through `b` that works.
async fn two_nodes(
    pg: &str,
    nats: Option<&str>,
    extra: &[&str],
) -> (String, Node, Node, reqwest::Client, String, Ws, String) {
    let database = fresh_database(pg).await;
    let mut nodes = Node::start_many(2, &database, nats, extra).await;
    let b = nodes.pop().expect("node b");
    let a = nodes.pop().expect("node a");
    let http = http();
    let user = login(&http, &b).await;
    let identity = provision(&http, &b, &user, "bus-device").await;
    let token = connection_token(&http, &a, &identity).await;
    let mut device = ws_connect(&a, &token).await.expect("connect to A");
    let accepted = next(&mut device).await.expect("accepted");
    let id = accepted["connectionId"].as_str().expect("id").to_string();
    let hello = json!({"type": "agent.ping", "payload": "before"});
    assert_eq!(send(&http, &b, &user, &id, &hello).await, 200);
    assert_eq!(next(&mut device).await.expect("frame"), hello);
    (database, a, b, http, user, device, id)
}

#[tokio::test]
async fn a_send_while_nats_is_down_answers_503_at_once_and_is_never_delivered() {
    let Some(pg) = service_url("MORRIGAN_TEST_POSTGRES_URL") else {
        return;
    };
    if service_url("MORRIGAN_TEST_NATS_URL").is_none() {
        return;
    }
    let mut nats = PrivateNats::start().await;
    let url = nats.url();
    let (database, a, b, http, user, mut device, id) = two_nodes(&pg, Some(&url), &[]).await;

    nats.kill();
    for n in 0..3 {
        let lost = json!({"type": "agent.ping", "payload": {"lost": n}});
        let (status, took) = timed_send(&http, &b, &user, &id, &lost).await;
        assert_eq!(status, 503, "send {n} during the outage");
        assert!(took < Duration::from_secs(3), "send {n} took {took:?}");
    }

    nats.restart().await;
    // Once both nodes are back on the bus, a send goes through; the messages answered 503 must
    // not have been delivered on the reconnection, before or after it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let marker = loop {
        let marker = json!({"type": "agent.ping", "payload": {"marker": Instant::now().elapsed().as_nanos().to_string()}});
        let (status, _) = timed_send(&http, &b, &user, &id, &marker).await;
        if status == 200 {
            break marker;
        }
        assert!(
            Instant::now() < deadline,
            "the bus did not recover: {status}\n{}",
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(
        next_text_within(&mut device, Duration::from_secs(10)).await,
        Some(marker),
        "a message answered 503 reached the device"
    );
    assert_eq!(
        next_text_within(&mut device, Duration::from_secs(2)).await,
        None
    );
    drop((a, b));
    drop_database(&pg, &database).await;
}

async fn stalled_owner(nats: Option<String>) {
    let Some(pg) = service_url("MORRIGAN_TEST_POSTGRES_URL") else {
        return;
    };
    // A long lease: nobody declares the frozen node lost during this test.
    let (database, a, b, http, user, mut device, id) =
        two_nodes(&pg, nats.as_deref(), &["--node-lease", "60"]).await;

    a.signal("-STOP");
    let lost = json!({"type": "agent.ping", "payload": "answered 503"});
    let (status, took) = timed_send(&http, &b, &user, &id, &lost).await;
    // Resume the owner whatever happened, so a failed assertion does not leave it frozen.
    let resume = |a: &Node| a.signal("-CONT");
    if status != 503 || took >= Duration::from_secs(3) {
        resume(&a);
        panic!("a send to a frozen owner answered {status} after {took:?}");
    }
    // Past the command's receive window on any clock: the owner must drop it when it wakes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    resume(&a);

    let after = json!({"type": "agent.ping", "payload": "after the stall"});
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, _) = timed_send(&http, &b, &user, &id, &after).await;
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the owner did not come back: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        next_text_within(&mut device, Duration::from_secs(10)).await,
        Some(after.clone()),
        "the command answered 503 was carried out when the owner woke"
    );
    // Retried sends of `after` that answered 503 are not delivered either.
    assert_eq!(
        next_text_within(&mut device, Duration::from_secs(2)).await,
        None
    );
    drop((a, b));
    drop_database(&pg, &database).await;
}

#[tokio::test]
async fn a_frozen_owner_on_the_postgres_bus_is_unreachable_at_once_and_never_acts_late() {
    stalled_owner(None).await;
}

#[tokio::test]
async fn a_frozen_owner_on_the_nats_bus_is_unreachable_at_once_and_never_acts_late() {
    let Some(nats) = service_url("MORRIGAN_TEST_NATS_URL") else {
        return;
    };
    stalled_owner(Some(nats)).await;
}
