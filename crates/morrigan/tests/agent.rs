//! `morrigan agent` against a real `morrigan serve` process: messages both ways, fail-over from
//! a dead URL, a server restart, a graceful stop, the refreshed token used after an agent
//! restart, and a deprovisioned device that stops for good; tracked messages (a tracked
//! `agent.ping` replied to, anything else acknowledged, an untracked `agent.pong` recorded as an
//! uplink message); and against an embedded server whose `agent` provider records the
//! `agent.pong` echo.
//!
//! Backoff bounds and jitter are covered with paused time by the SDK's unit tests
//! (`morrigan-client/src/backoff.rs`); these tests only shorten the delays (`--backoff-base`).

mod cli_support;
mod harness;

use std::sync::Arc;

use cli_support::{Agent, Cli, Server, eventually, provisioned, signal, wait_exit};
use morrigan_client::peek_claims;
use morrigan_server::providers::{HandlerError, MessageContext, Provider};
use serde_json::{Value, json};

/// The open, accepted connection of `client`, if any, other than `not`.
async fn open_connection(cli: &Cli, client: &str, not: Option<&str>) -> Option<Value> {
    let out = cli
        .run(&["connection", "ls", "--open", "--client", client, "--json"])
        .await;
    if !out.status.success() {
        return None;
    }
    let list: Value = serde_json::from_slice(&out.stdout).ok()?;
    list.as_array()?
        .iter()
        .find(|c| !c["connected"].is_null() && c["id"].as_str() != not)
        .cloned()
}

async fn client_record(cli: &Cli, client: &str) -> Value {
    cli.json(&["client", "show", client]).await
}

#[tokio::test]
async fn agent_talks_fails_over_survives_a_restart_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data")).await;
    let cli = Cli::new(&server.url);
    let token_file = provisioned(&cli, dir.path(), "device-1").await;

    // The first URL refuses connections: the agent fails over to the second (given as the
    // provider URL, the first as a bare server URL: both forms work).
    let refusing = harness::RefusingPort::new();
    let dead = refusing.url();
    let provider = format!("{}/api/core/connection", server.url);
    let mut agent = Agent::spawn(
        &[&dead, &provider],
        &token_file,
        &dir.path().join("state"),
        &dir.path().join("agent.log"),
    );
    let first = eventually("the agent's connection", || {
        open_connection(&cli, "device-1", None)
    })
    .await;
    let first_id = first["id"].as_str().unwrap().to_string();
    eventually("client.state ready", || async {
        (client_record(&cli, "device-1").await["state"] == "ready").then_some(())
    })
    .await;
    assert!(
        agent.log().contains("connection attempt failed"),
        "{}",
        agent.log()
    );

    // Server → agent: the agent logs what it received. (Its answer, agent.pong, is checked
    // against an embedded server that handles it: see the next test.)
    cli.ok(&[
        "connection",
        "send",
        &first_id,
        r#"{"type":"agent.ping","payload":{"n":42}}"#,
    ])
    .await;
    let ping = eventually("the agent to log agent.ping", || {
        let found = agent.events().into_iter().find(|e| {
            e["fields"]["message"] == "received" && e["fields"]["message_type"] == "agent.ping"
        });
        async move { found }
    })
    .await;
    let body: Value = serde_json::from_str(ping["fields"]["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["payload"]["n"], 42);

    // A server restart: the agent reconnects by itself (a new accepted connection record).
    let server = server.restart().await;
    let second = eventually("the agent's reconnection", || {
        open_connection(&cli, "device-1", Some(&first_id))
    })
    .await;
    assert_eq!(
        cli.json(&["connection", "show", &first_id]).await["closeCode"],
        1001
    );

    // SIGTERM: `client.state stopped.SIGTERM`, close 1000, exit 0.
    signal(&agent.child, libc::SIGTERM);
    let status = wait_exit(&mut agent.child, "the agent").await;
    assert!(status.success(), "{status}: {}", agent.log());
    let second_id = second["id"].as_str().unwrap();
    let closed = eventually("the closed record", || async {
        let record = cli.json(&["connection", "show", second_id]).await;
        (record["open"] == false).then_some(record)
    })
    .await;
    assert_eq!(closed["closeCode"], 1000, "{closed}");
    assert_eq!(
        client_record(&cli, "device-1").await["state"],
        "stopped.SIGTERM"
    );
    assert!(agent.plain_lines().is_empty(), "{:?}", agent.plain_lines());
    server.stop().await;
}

#[tokio::test]
async fn a_refreshed_token_is_persisted_and_used_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data")).await;
    let cli = Cli::new(&server.url);
    let token_file = provisioned(&cli, dir.path(), "device-2").await;
    let provisioned_token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    let state = dir.path().join("state");
    let saved = state.join(morrigan_client::IDENTITY_TOKEN_FILE);

    let mut agent = Agent::spawn(
        &[&server.url],
        &token_file,
        &state,
        &dir.path().join("a1.log"),
    );
    let first = eventually("the agent's connection", || {
        open_connection(&cli, "device-2", None)
    })
    .await;
    // The agent asks for a new identity token on connect and saves it in its state directory.
    let refreshed = eventually("a refreshed token in the state directory", || {
        let token = std::fs::read_to_string(&saved).unwrap_or_default();
        let token = token.trim().to_string();
        let fresh = !token.is_empty() && token != provisioned_token;
        async move { fresh.then_some(token) }
    })
    .await;
    // It is the server's newest token for this client, not something the agent made up.
    let jti = peek_claims(&refreshed).unwrap().jti.unwrap();
    assert_eq!(
        client_record(&cli, "device-2").await["tokenId"],
        jti.as_str()
    );
    signal(&agent.child, libc::SIGTERM);
    assert!(wait_exit(&mut agent.child, "the agent").await.success());

    // The proof that a restart uses the saved token: the token file now holds garbage, so the
    // only identity token the restarted agent can present is the one in its state directory.
    // (Presenting the provisioned token would prove nothing: the server honours a refreshed-away
    // token for a grace period.)
    std::fs::write(&token_file, "garbage, not a token\n").unwrap();
    let mut agent = Agent::spawn(
        &[&server.url],
        &token_file,
        &state,
        &dir.path().join("a2.log"),
    );
    let first_id = first["id"].as_str().unwrap();
    eventually("the restarted agent's connection", || {
        open_connection(&cli, "device-2", Some(first_id))
    })
    .await;
    signal(&agent.child, libc::SIGINT);
    assert!(wait_exit(&mut agent.child, "the agent").await.success());

    // Without a state directory the same garbage is refused at once, with one clear line.
    let mut agent = Agent::spawn(
        &[&server.url],
        &token_file,
        &dir.path().join("empty-state"),
        &dir.path().join("a3.log"),
    );
    let status = wait_exit(&mut agent.child, "the agent").await;
    assert_eq!(status.code(), Some(1), "{}", agent.log());
    let lines = agent.plain_lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains("not a JWT"),
        "{lines:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_deprovisioned_or_revoked_agent_stops_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data")).await;
    let cli = Cli::new(&server.url);
    let token_file = provisioned(&cli, dir.path(), "device-3").await;

    let mut agent = Agent::spawn(
        &[&server.url],
        &token_file,
        &dir.path().join("state"),
        &dir.path().join("agent.log"),
    );
    let record = eventually("the agent's connection", || {
        open_connection(&cli, "device-3", None)
    })
    .await;
    cli.ok(&["client", "rm", "device-3"]).await;
    // Exit code 3 (do not restart), one error line, and no retry: the process is gone.
    let status = wait_exit(&mut agent.child, "the agent").await;
    assert_eq!(status.code(), Some(3), "{}", agent.log());
    let lines = agent.plain_lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains("deprovisioned"),
        "{lines:?}"
    );
    assert!(lines[0].contains("not retrying"), "{lines:?}");
    let closed = cli
        .json(&["connection", "show", record["id"].as_str().unwrap()])
        .await;
    assert_eq!(closed["closeCode"], 4003, "{closed}");

    // A token revoked by a newer provisioning is refused at the token exchange: same ending.
    let old = provisioned(&cli, dir.path(), "device-4").await;
    let old_copy = dir.path().join("old.token");
    std::fs::copy(&old, &old_copy).unwrap();
    provisioned(&cli, dir.path(), "device-4").await;
    let mut agent = Agent::spawn(
        &[&server.url],
        &old_copy,
        &dir.path().join("state-4"),
        &dir.path().join("agent-4.log"),
    );
    let status = wait_exit(&mut agent.child, "the agent").await;
    assert_eq!(status.code(), Some(3), "{}", agent.log());
    let lines = agent.plain_lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("error: identity token refused"),
        "{lines:?}"
    );
    server.stop().await;
}

/// `method path` on the server of `cli`, as its logged-in user; the status and the body as JSON.
async fn rest(cli: &Cli, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let token = std::fs::read_to_string(cli.config_dir().join("token")).unwrap();
    let mut request = reqwest::Client::new()
        .request(method, format!("{}{path}", cli.url))
        .bearer_auth(token.trim())
        .timeout(cli_support::WAIT);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test]
async fn the_agent_answers_tracked_messages() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data")).await;
    let cli = Cli::new(&server.url);
    let token_file = provisioned(&cli, dir.path(), "device-5").await;
    let mut agent = Agent::spawn(
        &[&server.url],
        &token_file,
        &dir.path().join("state"),
        &dir.path().join("agent.log"),
    );
    let connection = eventually("the agent's connection", || {
        open_connection(&cli, "device-5", None)
    })
    .await;
    let id = connection["id"].as_str().unwrap();

    // A tracked agent.ping: the reply carries its payload.
    let (status, answer) = rest(
        &cli,
        reqwest::Method::POST,
        "/api/core/client/device-5/send?track=reply&timeout=10",
        Some(json!({"type": "agent.ping", "payload": {"n": 1}})),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["state"], "replied", "{answer}");
    assert_eq!(answer["reply"], json!({"payload": {"n": 1}}), "{answer}");
    // Without a payload, the reply says so.
    let (status, answer) = rest(
        &cli,
        reqwest::Method::POST,
        &format!("/api/core/connection/{id}/send?track=reply&timeout=10"),
        Some(json!({"type": "agent.ping"})),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["reply"], json!({"payload": null}), "{answer}");
    // Anything else tracked is acknowledged, and logged.
    let (status, answer) = rest(
        &cli,
        reqwest::Method::POST,
        "/api/core/client/device-5/send?track=ack&timeout=10",
        Some(json!({"type": "firmware.check", "version": "1.2"})),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["state"], "acked", "{answer}");
    eventually("the agent to log firmware.check", || {
        let logged = agent.events().into_iter().any(|e| {
            e["fields"]["message"] == "received" && e["fields"]["message_type"] == "firmware.check"
        });
        async move { logged.then_some(()) }
    })
    .await;

    // An untracked agent.ping still gets agent.pong, which the server records as an uplink
    // message (no connection.error for an unknown provider).
    cli.ok(&[
        "connection",
        "send",
        id,
        r#"{"type":"agent.ping","payload":"plain"}"#,
    ])
    .await;
    let pong = eventually("the agent.pong uplink record", || async {
        let (status, list) = rest(
            &cli,
            reqwest::Method::GET,
            "/api/core/client/device-5/messages?direction=in",
            None,
        )
        .await;
        (status == 200)
            .then(|| {
                list["messages"]
                    .as_array()?
                    .iter()
                    .find(|m| m["type"] == "agent.pong")
                    .cloned()
            })
            .flatten()
    })
    .await;
    assert_eq!(pong["state"], "received", "{pong}");
    assert_eq!(pong["body"]["payload"], "plain", "{pong}");
    let errors: Vec<Value> = agent
        .events()
        .into_iter()
        .filter(|e| e["fields"]["message_type"] == "connection.error")
        .collect();
    assert!(errors.is_empty(), "{errors:?}");

    signal(&agent.child, libc::SIGTERM);
    assert!(wait_exit(&mut agent.child, "the agent").await.success());
    server.stop().await;
}

/// The `agent` provider of an embedded server: every `agent.*` message it receives, with the
/// connection it came from.
struct AgentMessages(tokio::sync::mpsc::UnboundedSender<(String, String, Value)>);

#[async_trait::async_trait]
impl Provider for AgentMessages {
    fn name(&self) -> &str {
        "agent"
    }
    fn messages(&self) -> Vec<String> {
        vec!["pong".into()]
    }
    async fn handle(
        &self,
        ctx: &MessageContext,
        message: &str,
        body: Value,
    ) -> Result<Option<Value>, HandlerError> {
        let _ = self
            .0
            .send((ctx.connection_id.to_string(), message.to_string(), body));
        Ok(None)
    }
}

/// The README's promise: the agent answers `agent.ping` with `agent.pong`, the payload (every
/// field but the type) echoed. The server here is embedded, with a provider for `agent.*` that
/// records what arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_answers_agent_ping_with_its_payload_echoed() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut received) = tokio::sync::mpsc::unbounded_channel();
    let mut config = morrigan_server::Config::new(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        dir.path().join("data"),
    );
    config.admin_password = Some(cli_support::ADMIN_PASSWORD.to_string());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = morrigan_server::Server::builder(config)
        .provider(Arc::new(AgentMessages(tx)))
        .listener(listener)
        .build()
        .await
        .expect("the embedded server starts");
    let url = format!("http://{}", server.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));

    let cli = Cli::new(&url);
    let token_file = provisioned(&cli, dir.path(), "echo-device").await;
    let mut agent = Agent::spawn(
        &[&url],
        &token_file,
        &dir.path().join("state"),
        &dir.path().join("agent.log"),
    );
    let connection = eventually("the agent's connection", || {
        open_connection(&cli, "echo-device", None)
    })
    .await;
    let id = connection["id"].as_str().unwrap();

    let ping = json!({
        "type": "agent.ping",
        "payload": {"n": 42, "text": "héllo", "list": [1, "two", null, {"deep": true}]},
        "requestId": "ping-1",
    });
    cli.ok(&["connection", "send", id, &ping.to_string()]).await;
    let (from, message, pong) = tokio::time::timeout(cli_support::WAIT, received.recv())
        .await
        .expect("an agent.* message within the wait")
        .expect("the provider is registered");
    assert_eq!(from, id, "the pong came over the agent's connection");
    assert_eq!(message, "pong", "{pong}");
    assert_eq!(
        pong,
        json!({
            "type": "agent.pong",
            "payload": {"n": 42, "text": "héllo", "list": [1, "two", null, {"deep": true}]},
            "requestId": "ping-1",
        }),
        "everything but the type echoed"
    );

    signal(&agent.child, libc::SIGTERM);
    assert!(wait_exit(&mut agent.child, "the agent").await.success());
    let _ = stop.send(());
    tokio::time::timeout(cli_support::WAIT, serving)
        .await
        .expect("the embedded server stops in time")
        .unwrap();
}
