//! The message commands against a real `morrigan serve` process and real devices (the agent,
//! and SDK clients in the test): `client call`, `client send` (tracked, queued, timed out,
//! refused), a tracked `connection send`, `message show` and `message ls`, with the exit codes
//! and outputs scripts rely on.

mod cli_support;
mod harness;

use std::path::Path;
use std::process::Output;

use cli_support::{Agent, Cli, Server, eventually, provisioned, signal, wait_exit};
use morrigan_client::{Client, Event, Handle, Sender};
use serde_json::{Value, json};

/// Exit code of a send whose answer timed out.
const EXIT_TIMEOUT: i32 = 4;

/// The open, accepted connection of `client`, if any.
async fn open_connection(cli: &Cli, client: &str) -> Option<String> {
    let out = cli
        .run(&["connection", "ls", "--open", "--client", client, "--json"])
        .await;
    if !out.status.success() {
        return None;
    }
    let list: Value = serde_json::from_slice(&out.stdout).ok()?;
    list.as_array()?
        .iter()
        .find(|c| !c["connected"].is_null())
        .and_then(|c| c["id"].as_str().map(str::to_string))
}

/// An SDK device that never answers `mute.wait` (its handler never ends) and has no handler
/// for anything else; returns once it is connected.
async fn mute_device(url: &str, token_file: &Path) -> Handle {
    let token = std::fs::read_to_string(token_file).unwrap();
    let client = Client::builder(url, token.trim())
        .token_refresh(None)
        .on_type("mute.wait", |_: Value, _: Sender| {
            std::future::pending::<()>()
        })
        .build()
        .unwrap();
    let (handle, mut events) = client.start();
    tokio::time::timeout(cli_support::WAIT, async {
        while let Some(event) = events.recv().await {
            if matches!(event, Event::Connected { .. }) {
                return;
            }
        }
        panic!("the device stopped before connecting");
    })
    .await
    .expect("the device connects in time");
    handle
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Exits with `code`, one `error:` line on stderr; that line.
fn error_line(args: &[&str], out: &Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: one line expected: {stderr}");
    assert!(lines[0].starts_with("error: "), "{args:?}: {stderr}");
    lines[0].to_string()
}

/// `<uuid> <state>`: the message id.
fn id_and_state(printed: &str, state: &str) -> String {
    let (id, said) = printed
        .trim()
        .split_once(' ')
        .unwrap_or_else(|| panic!("'<id> <state>' expected: {printed:?}"));
    assert_eq!(said, state, "{printed:?}");
    assert_eq!(id.len(), 36, "a message id: {printed:?}");
    id.to_string()
}

#[tokio::test]
async fn call_send_show_and_list_messages() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data")).await;
    let cli = Cli::new(&server.url);
    cli.login().await;

    // An agent: replies to a tracked agent.ping, acknowledges anything else.
    let token_file = provisioned(&cli, dir.path(), "dev-a").await;
    let mut agent = Agent::spawn(
        &[&server.url],
        &token_file,
        &dir.path().join("state-a"),
        &dir.path().join("agent-a.log"),
    );
    let cid = eventually("dev-a's connection", || open_connection(&cli, "dev-a")).await;

    // client call: the reply, as JSON, exit 0.
    let printed = cli
        .ok(&[
            "client",
            "call",
            "dev-a",
            r#"{"type":"agent.ping","payload":{"n":1}}"#,
        ])
        .await;
    let reply: Value = serde_json::from_str(&printed).unwrap_or_else(|e| panic!("{e}: {printed}"));
    assert_eq!(reply, json!({"payload": {"n": 1}}));
    let answer = cli
        .json(&[
            "client",
            "call",
            "dev-a",
            r#"{"type":"agent.ping","payload":"x"}"#,
            "--timeout",
            "5",
        ])
        .await;
    assert_eq!(answer["status"], "success", "{answer}");
    assert_eq!(answer["state"], "replied", "{answer}");
    assert_eq!(answer["reply"], json!({"payload": "x"}), "{answer}");

    // client send --ack: "<id> acked"; without a timeout it does not wait: "<id> written".
    let printed = cli
        .ok(&[
            "client",
            "send",
            "dev-a",
            r#"{"type":"agent.config","level":2}"#,
            "--ack",
            "--timeout",
            "10",
        ])
        .await;
    let acked = id_and_state(&printed, "acked");
    let printed = cli
        .ok(&[
            "client",
            "send",
            "dev-a",
            r#"{"type":"agent.config"}"#,
            "--ack",
        ])
        .await;
    // Not waited for: the state when the server answered, `written`, or already `acked` when
    // the agent was quicker than the answer.
    let state = printed
        .trim()
        .split(' ')
        .nth(1)
        .unwrap_or_default()
        .to_string();
    assert!(
        ["written", "acked"].contains(&state.as_str()),
        "{printed:?}"
    );
    let written = id_and_state(&printed, &state);
    let shown = eventually("the unwaited message acked", || {
        let cli = &cli;
        let written = written.clone();
        async move {
            let out = cli.run(&["message", "show", &written, "--json"]).await;
            let record: Value = serde_json::from_slice(&out.stdout).ok()?;
            (record["state"] == "acked").then_some(record)
        }
    })
    .await;
    assert_eq!(shown["id"], written.as_str(), "{shown}");
    // --reply without a reply to wait for prints it; an idempotency key sends once.
    let printed = cli
        .ok(&[
            "client",
            "send",
            "dev-a",
            r#"{"type":"agent.ping","payload":[1,2]}"#,
            "--reply",
            "--timeout",
            "10",
        ])
        .await;
    assert_eq!(
        serde_json::from_str::<Value>(&printed).unwrap(),
        json!({"payload": [1, 2]})
    );
    let keyed = [
        "client",
        "send",
        "dev-a",
        r#"{"type":"agent.config","n":3}"#,
        "--ack",
        "--timeout",
        "10",
        "--idempotency-key",
        "config-3",
    ];
    let first = id_and_state(&cli.ok(&keyed).await, "acked");
    let again = cli.ok(&keyed).await;
    assert!(again.starts_with(&first), "same message: {first} / {again}");

    // connection send --ack / --reply: tracked on that connection.
    let printed = cli
        .ok(&[
            "connection",
            "send",
            &cid,
            r#"{"type":"agent.config"}"#,
            "--ack",
        ])
        .await;
    id_and_state(&printed, "acked");
    let printed = cli
        .ok(&[
            "connection",
            "send",
            &cid,
            "--type",
            "agent.ping",
            "--data",
            r#"{"payload":"hi"}"#,
            "--reply",
            "--timeout",
            "10",
        ])
        .await;
    assert_eq!(
        serde_json::from_str::<Value>(&printed).unwrap(),
        json!({"payload": "hi"})
    );
    // Untracked, as before.
    let said = cli
        .ok(&["connection", "send", &cid, r#"{"type":"agent.ping"}"#])
        .await;
    assert_eq!(said.trim(), format!("sent to {cid}"));
    // --timeout needs --ack or --reply (a usage error).
    let out = cli
        .run(&["connection", "send", &cid, "{}", "--timeout", "3"])
        .await;
    assert_eq!(out.status.code(), Some(2));

    // message show: human fields, and the record with --json.
    let human = cli.ok(&["message", "show", &acked]).await;
    for field in ["id:", "client:", "state:", "acked", "agent.config", "dev-a"] {
        assert!(human.contains(field), "{field}: {human}");
    }
    let record = cli.json(&["message", "show", &acked]).await;
    assert_eq!(record["id"], acked.as_str(), "{record}");
    assert_eq!(record["state"], "acked", "{record}");
    assert_eq!(record["direction"], "out", "{record}");
    assert_eq!(record["body"], json!({"type": "agent.config", "level": 2}));
    let line = cli.fails(&["message", "show", "no-such-message"]).await;
    assert!(line.contains("404"), "{line}");

    // message ls: newest first; filters; a table.
    let listed = cli.json(&["message", "ls", "--client", "dev-a"]).await;
    let listed = listed.as_array().unwrap();
    assert!(listed.len() >= 6, "{listed:?}");
    assert!(listed.iter().any(|m| m["id"] == acked.as_str()));
    let replied = cli
        .json(&["message", "ls", "--client", "dev-a", "--state", "replied"])
        .await;
    let replied = replied.as_array().unwrap();
    assert!(!replied.is_empty());
    assert!(
        replied.iter().all(|m| m["state"] == "replied"),
        "{replied:?}"
    );
    let limited = cli
        .json(&["message", "ls", "--client", "dev-a", "--limit", "1"])
        .await;
    assert_eq!(limited.as_array().unwrap().len(), 1);
    let table = cli
        .ok(&["message", "ls", "--client", "dev-a", "--direction", "out"])
        .await;
    let header = table.lines().next().unwrap();
    for column in [
        "ID",
        "DIRECTION",
        "TYPE",
        "STATE",
        "CREATED",
        "REPLY/REASON",
    ] {
        assert!(header.contains(column), "{header}");
    }
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&acked) && l.contains("acked")),
        "{table}"
    );
    assert!(
        table.lines().any(|l| l.contains(r#"{"payload":[1,2]}"#)),
        "the reply is shown: {table}"
    );
    let out = cli
        .run(&["message", "ls", "--client", "dev-a", "--direction", "up"])
        .await;
    assert_eq!(out.status.code(), Some(2), "a usage error");

    // Messages checked before anything is sent.
    let line = cli.fails(&["client", "send", "dev-a", "not json"]).await;
    assert!(line.contains("not JSON"), "{line}");
    let line = cli
        .fails(&["client", "call", "dev-a", r#"{"payload":1}"#])
        .await;
    assert!(line.contains(r#"string "type""#), "{line}");
    let line = cli
        .fails(&["client", "send", "nobody", r#"{"type":"agent.ping"}"#])
        .await;
    assert!(line.contains("404"), "{line}");

    signal(&agent.child, libc::SIGTERM);
    assert!(wait_exit(&mut agent.child, "the agent").await.success());
    server.stop().await;
}

#[tokio::test]
async fn timeouts_exit_4_and_refusals_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data")).await;
    let cli = Cli::new(&server.url);
    cli.login().await;
    let token_file = provisioned(&cli, dir.path(), "dev-mute").await;
    let device = mute_device(&server.url, &token_file).await;

    // No answer in time: exit 4, the message named on the one error line, nothing on stdout.
    let args = [
        "client",
        "send",
        "dev-mute",
        r#"{"type":"mute.wait"}"#,
        "--reply",
        "--timeout",
        "1",
    ];
    let out = cli.run(&args).await;
    let line = error_line(&args, &out, EXIT_TIMEOUT);
    assert!(
        line.contains("HTTP 504") && line.contains("message "),
        "{line}"
    );
    assert!(out.stdout.is_empty(), "{}", stdout(&out));
    // With --json the answer is printed too (the message id, to follow it up).
    let mut with_json = args.to_vec();
    with_json.push("--json");
    let out = cli.run(&with_json).await;
    error_line(&with_json, &out, EXIT_TIMEOUT);
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["state"], "timeout", "{answer}");
    let id = answer["messageId"].as_str().unwrap().to_string();
    let record = cli.json(&["message", "show", &id]).await;
    assert_eq!(record["state"], "written", "{record}");
    // client call and connection send time out the same way.
    let args = [
        "client",
        "call",
        "dev-mute",
        r#"{"type":"mute.wait"}"#,
        "--timeout",
        "1",
    ];
    error_line(&args, &cli.run(&args).await, EXIT_TIMEOUT);
    let cid = eventually("dev-mute's connection", || {
        open_connection(&cli, "dev-mute")
    })
    .await;
    let args = [
        "connection",
        "send",
        &cid,
        r#"{"type":"mute.wait"}"#,
        "--ack",
        "--timeout",
        "1",
    ];
    error_line(&args, &cli.run(&args).await, EXIT_TIMEOUT);

    // Refused by the device (no handler): exit 1 with the device's reason.
    let line = cli
        .fails(&["client", "call", "dev-mute", r#"{"type":"mute.other"}"#])
        .await;
    assert!(
        line.contains("no handler for mute.other") && line.contains("rejected"),
        "{line}"
    );
    device.stop("test").await.unwrap();

    // Offline without a TTL: refused, exit 1.
    let offline_token = provisioned(&cli, dir.path(), "dev-off").await;
    let line = cli
        .fails(&[
            "client",
            "send",
            "dev-off",
            r#"{"type":"agent.ping"}"#,
            "--ack",
        ])
        .await;
    assert!(line.contains("409"), "{line}");
    // With a TTL: queued (exit 0), delivered and acknowledged once the agent connects.
    let printed = cli
        .ok(&[
            "client",
            "send",
            "dev-off",
            r#"{"type":"agent.update","to":"2.0"}"#,
            "--ack",
            "--ttl",
            "60",
        ])
        .await;
    let queued = id_and_state(&printed, "queued");
    let listed = cli.json(&["message", "ls", "--client", "dev-off"]).await;
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == queued.as_str() && m["state"] == "queued"),
        "{listed}"
    );
    let mut agent = Agent::spawn(
        &[&server.url],
        &offline_token,
        &dir.path().join("state-off"),
        &dir.path().join("agent-off.log"),
    );
    let record = eventually("the queued message acked", || {
        let cli = &cli;
        let queued = queued.clone();
        async move {
            let out = cli.run(&["message", "show", &queued, "--json"]).await;
            let record: Value = serde_json::from_slice(&out.stdout).ok()?;
            (record["state"] == "acked").then_some(record)
        }
    })
    .await;
    assert!(record["written"].is_string(), "{record}");
    assert!(record["acked"].is_string(), "{record}");
    let listed = cli
        .json(&["message", "ls", "--client", "dev-off", "--state", "acked"])
        .await;
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == queued.as_str()),
        "{listed}"
    );

    signal(&agent.child, libc::SIGTERM);
    assert!(wait_exit(&mut agent.child, "the agent").await.success());
    server.stop().await;
}
