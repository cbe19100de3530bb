//! The operator commands against a real `morrigan serve` process: exit codes, `--json` output,
//! human tables and one-line errors.

mod cli_support;
mod harness;

use std::os::unix::fs::PermissionsExt;

use cli_support::{ADMIN_PASSWORD, Cli, Server, assert_success, one_error_line};
use morrigan_client::{Client, Event, Sender};
use serde_json::{Value, json};
use tokio::sync::mpsc;

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn is_jwt(s: &str) -> bool {
    s.split('.').count() == 3 && s.len() > 40 && !s.contains(char::is_whitespace)
}

#[tokio::test]
async fn login_caches_the_token_privately_and_errors_are_one_line() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data")).await;
    let cli = Cli::new(&server.url);

    // Not logged in: one line that says what to do.
    let line = cli.fails(&["client", "ls"]).await;
    assert!(line.contains("morrigan login"), "{line}");

    // A wrong password: the server's reason.
    let out = cli
        .run_with_stdin(&["login", "--password-stdin"], "wrong-password\n")
        .await;
    let line = one_error_line(&["login"], &out);
    assert!(line.contains("Invalid username/password"), "{line}");

    // The right one, from stdin and from MORRIGAN_PASSWORD.
    cli.login().await;
    let token_file = cli.config_dir().join("token");
    assert_eq!(mode(&token_file), 0o600);
    let first = std::fs::read_to_string(&token_file).unwrap();
    assert!(is_jwt(first.trim()), "{first}");
    assert_eq!(
        std::fs::read_to_string(cli.config_dir().join("url"))
            .unwrap()
            .trim(),
        format!("{}/", server.url)
    );
    let mut cmd = cli.command(&["login", "--name", "admin"]);
    cmd.env("MORRIGAN_PASSWORD", ADMIN_PASSWORD);
    let out = cli.output(cmd).await;
    assert_success(&["login (env)"], &out);
    assert_ne!(std::fs::read_to_string(&token_file).unwrap(), first);
    // No temporary file left behind.
    let names: Vec<_> = std::fs::read_dir(cli.config_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");

    // Later commands default to the saved URL.
    let mut cmd = cli.command(&["node", "ls", "--json"]);
    cmd.env_remove("MORRIGAN_URL");
    assert_success(&["node ls without a URL"], &cli.output(cmd).await);
    // The token is not sent to another server.
    let refusing = harness::RefusingPort::new();
    let other = refusing.url();
    let line = cli.fails(&["client", "ls", "--url", &other]).await;
    assert!(
        line.contains("not logged in to") && line.contains("morrigan login"),
        "{line}"
    );
    // An unreachable server.
    let mut cmd = cli.command(&["login", "--url", &other]);
    cmd.env("MORRIGAN_PASSWORD", ADMIN_PASSWORD);
    let line = one_error_line(&["login"], &cli.output(cmd).await);
    assert!(line.contains("cannot reach"), "{line}");
    // An expired or revoked session: the server's 401, with the hint.
    std::fs::write(&token_file, "x.y.z\n").unwrap();
    let line = cli.fails(&["client", "ls"]).await;
    assert!(
        line.contains("401") && line.contains("morrigan login"),
        "{line}"
    );
}

/// A device connected through the SDK, recording what it receives.
async fn device(
    url: &str,
    token: &str,
) -> (morrigan_client::Handle, mpsc::UnboundedReceiver<Event>) {
    let client = Client::builder(url, token)
        .on_type("agent.ping", |_: Value, _: Sender| async {})
        .build()
        .unwrap();
    let (handle, mut events) = client.start();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if tx.send(event).is_err() {
                break;
            }
        }
    });
    (handle, rx)
}

async fn next_matching(
    rx: &mut mpsc::UnboundedReceiver<Event>,
    pred: impl Fn(&Event) -> bool,
) -> Event {
    tokio::time::timeout(cli_support::WAIT, async {
        loop {
            let event = rx.recv().await.expect("device events");
            if pred(&event) {
                return event;
            }
        }
    })
    .await
    .expect("device event in time")
}

#[tokio::test]
async fn client_connection_identity_and_node_commands() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data")).await;
    let cli = Cli::new(&server.url);
    cli.login().await;

    // client provision: printed, as JSON (the server's quoted string), and to a 0600 file.
    let printed = cli.ok(&["client", "provision", "device-1"]).await;
    assert!(is_jwt(printed.trim()), "{printed}");
    let raw = cli.json(&["client", "provision", "device-1"]).await;
    assert!(is_jwt(raw.as_str().unwrap()));
    let file = data.path().join("device-1.token");
    let out = cli
        .run(&[
            "client",
            "provision",
            "device-1",
            "--out",
            file.to_str().unwrap(),
        ])
        .await;
    assert_success(&["provision --out"], &out);
    assert!(out.stdout.is_empty());
    assert_eq!(mode(&file), 0o600);
    let token = std::fs::read_to_string(&file).unwrap().trim().to_string();
    assert!(is_jwt(&token));
    let line = cli.fails(&["client", "provision", "bad/id"]).await;
    assert!(
        line.contains("Invalid client id") && line.contains("400"),
        "{line}"
    );

    // client ls / show.
    let table = cli.ok(&["client", "ls"]).await;
    let mut lines = table.lines();
    assert!(lines.next().unwrap().starts_with("ID "), "{table}");
    assert!(lines.next().unwrap().starts_with("device-1 "), "{table}");
    let list = cli.json(&["client", "ls"]).await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], "device-1");
    let shown = cli.json(&["client", "show", "device-1"]).await;
    assert_eq!(shown["id"], "device-1");
    assert!(
        cli.ok(&["client", "show", "device-1"])
            .await
            .contains("device-1")
    );
    let line = cli.fails(&["client", "show", "nobody"]).await;
    assert_eq!(line, "error: No such client (HTTP 404)");

    // A device connects (only the newest token works: provisioning revoked the others).
    let (device, mut events) = device(&server.url, &token).await;
    let connected = next_matching(&mut events, |e| matches!(e, Event::Connected { .. })).await;
    let Event::Connected {
        connection_id: Some(cid),
    } = connected
    else {
        panic!("{connected:?}")
    };

    // connection ls / show.
    let open = cli
        .json(&["connection", "ls", "--open", "--client", "device-1"])
        .await;
    let open = open.as_array().unwrap();
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0]["id"], cid.as_str());
    let table = cli.ok(&["connection", "ls", "--open"]).await;
    let header = table.lines().next().unwrap();
    for column in [
        "ID",
        "CLIENT",
        "NODE",
        "ADDRESS",
        "CONNECTED",
        "LAST HEARTBEAT",
        "ALIVE",
        "OPEN",
    ] {
        assert!(header.contains(column), "{header}");
    }
    let row = table.lines().nth(1).unwrap();
    assert!(
        row.starts_with(&cid) && row.contains("device-1") && row.contains("127.0.0.1"),
        "{table}"
    );
    assert_eq!(
        cli.json(&["connection", "show", &cid]).await["clientId"],
        "device-1"
    );
    assert!(
        cli.ok(&["connection", "show", &cid])
            .await
            .contains("device-1")
    );
    let line = cli
        .fails(&["connection", "show", "no-such-connection"])
        .await;
    assert_eq!(line, "error: No such connection (HTTP 404)");

    // connection send: a whole message, or --type and --data.
    let answer = cli
        .json(&[
            "connection",
            "send",
            &cid,
            r#"{"type":"agent.ping","payload":"hello"}"#,
        ])
        .await;
    assert_eq!(answer["status"], "success");
    let got = next_matching(&mut events, |e| matches!(e, Event::Message(_))).await;
    let Event::Message(message) = got else {
        unreachable!()
    };
    assert_eq!(message, json!({"type": "agent.ping", "payload": "hello"}));
    let said = cli
        .ok(&[
            "connection",
            "send",
            &cid,
            "--type",
            "agent.ping",
            "--data",
            r#"{"n":1}"#,
        ])
        .await;
    assert_eq!(said.trim(), format!("sent to {cid}"));
    let got = next_matching(&mut events, |e| matches!(e, Event::Message(_))).await;
    let Event::Message(message) = got else {
        unreachable!()
    };
    assert_eq!(message, json!({"type": "agent.ping", "n": 1}));
    let line = cli
        .fails(&["connection", "send", &cid, r#"{"type":"nodot"}"#])
        .await;
    assert!(
        line.contains("Invalid message type") && line.contains("400"),
        "{line}"
    );
    let line = cli.fails(&["connection", "send", &cid, "not json"]).await;
    assert!(line.contains("not JSON"), "{line}");
    let line = cli
        .fails(&[
            "connection",
            "send",
            "no-such-connection",
            r#"{"type":"agent.ping"}"#,
        ])
        .await;
    assert!(line.contains("404"), "{line}");

    // connection close: the device sees 4000 and the reason.
    let said = cli
        .ok(&["connection", "close", &cid, "--reason", "maintenance"])
        .await;
    assert_eq!(said.trim(), format!("closed {cid}"));
    let closed = next_matching(&mut events, |e| matches!(e, Event::Disconnected { .. })).await;
    assert!(
        matches!(closed, Event::Disconnected { code: 4000, ref reason } if reason == "maintenance"),
        "{closed:?}"
    );
    assert_eq!(
        cli.json(&["connection", "show", &cid]).await["closeCode"],
        4000
    );
    device.stop("test").await.unwrap();

    // client rm: deprovisioned, then unknown.
    let said = cli.ok(&["client", "rm", "device-1"]).await;
    assert!(said.contains("device-1 deprovisioned"), "{said}");
    let line = cli.fails(&["client", "rm", "device-1"]).await;
    assert_eq!(line, "error: No such client (HTTP 404)");

    // identity ls / create / grant / rm.
    let table = cli.ok(&["identity", "ls"]).await;
    assert!(table.lines().any(|l| l.contains(" admin ")), "{table}");
    let listed = cli.json(&["identity", "ls"]).await;
    assert_eq!(listed["identities"][0]["name"], "admin");
    let out = cli
        .run_with_stdin(
            &[
                "identity",
                "create",
                "ops",
                "--function",
                "api",
                "--password-stdin",
                "--json",
            ],
            "ops-password-123\n",
        )
        .await;
    assert_success(&["identity create"], &out);
    let created: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(created["identity"]["functions"], json!(["api"]));
    let ops_id = created["identity"]["id"].as_str().unwrap().to_string();
    let out = cli
        .run_with_stdin(
            &["identity", "create", "ops", "--password-stdin"],
            "ops-password-123\n",
        )
        .await;
    let line = one_error_line(&["identity create again"], &out);
    assert!(line.contains("already in use"), "{line}");
    let granted = cli
        .json(&["identity", "grant", "ops", "connection.send", "api"])
        .await;
    assert_eq!(
        granted["identity"]["functions"],
        json!(["api", "connection.send"])
    );
    let said = cli
        .ok(&["identity", "grant", &ops_id, "connection.close"])
        .await;
    assert_eq!(
        said.trim(),
        "ops now has: api, connection.send, connection.close"
    );
    let line = cli
        .fails(&["identity", "grant", "ops", "no.such.function"])
        .await;
    assert!(line.contains("Unknown function"), "{line}");
    // The new identity can log in (and its functions are what was granted).
    let other = Cli::new(&server.url);
    let out = other
        .run_with_stdin(
            &["login", "--name", "ops", "--password-stdin"],
            "ops-password-123\n",
        )
        .await;
    assert_success(&["login as ops"], &out);
    let line = other.fails(&["identity", "ls"]).await;
    assert!(line.contains("403"), "{line}");
    assert_eq!(
        cli.json(&["identity", "rm", "ops"]).await["state"],
        "success"
    );
    let line = cli.fails(&["identity", "rm", "ops"]).await;
    assert!(line.contains("no identity named \"ops\""), "{line}");

    // node ls.
    let nodes = cli.json(&["node", "ls"]).await;
    assert_eq!(nodes.as_array().unwrap().len(), 1, "{nodes}");
    assert_eq!(nodes[0]["state"], "running");
    let table = cli.ok(&["node", "ls"]).await;
    assert!(table.lines().nth(1).unwrap().contains("running"), "{table}");

    // Usage errors are clap's (exit 2).
    let out = cli.run(&["connection", "send", &cid]).await;
    assert_eq!(out.status.code(), Some(2));
}
