//! The binary's configuration and failure paths: the environment over `morrigan.toml` (and a
//! flag over the environment) for `morrigan serve`, and `morrigan connection close` when it
//! fails.

mod cli_support;
mod harness;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use cli_support::{ADMIN_PASSWORD, BIN, Cli, Server, WAIT, one_error_line};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// `morrigan serve` in `cwd`, with only the `MORRIGAN_*` variables given in `env`.
fn serve_command(cwd: &Path, env: &[(&str, &str)], args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("MORRIGAN_") {
            cmd.env_remove(key);
        }
    }
    cmd.arg("serve")
        .args(args)
        .current_dir(cwd)
        .env("MORRIGAN_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .env("MORRIGAN_LOG_FORMAT", "json")
        .env("MORRIGAN_LOG", "info,sqlx=warn")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// A running `morrigan serve` and the address it reported binding.
struct Serving {
    child: Child,
    base: String,
    log: std::path::PathBuf,
}

impl Serving {
    /// Starts it and waits for its `serving` log event, which names the bound address.
    async fn start(cwd: &Path, env: &[(&str, &str)], args: &[&str]) -> Serving {
        let log = cwd.join(format!("serve-{}.log", uuid::Uuid::new_v4().simple()));
        let file = std::fs::File::create(&log).expect("log file");
        let mut child = serve_command(cwd, env, args)
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("start morrigan serve");
        let deadline = tokio::time::Instant::now() + WAIT;
        let address = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let serving = text
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|e| e["fields"]["message"] == "serving");
            if let Some(event) = serving {
                break event["fields"]["address"]
                    .as_str()
                    .expect("the serving event names its address")
                    .to_string();
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("morrigan serve exited ({status}):\n{text}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no serving event in time:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        Serving {
            child,
            base: format!("http://{address}"),
            log,
        }
    }

    async fn stop(mut self) {
        let pid = self.child.id().expect("running") as i32;
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("exits in time")
            .expect("wait");
        assert!(
            status.success(),
            "{status}: {}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }
}

fn claims(jwt: &str) -> Value {
    use base64::Engine;
    let payload = jwt.split('.').nth(1).expect("payload");
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .expect("base64url"),
    )
    .expect("claims")
}

/// Logs in as admin, provisions `client` and exchanges its identity token (with `headers`);
/// returns the connection token and its record.
async fn connection_token(base: &str, client: &str, headers: &[(&str, &str)]) -> (String, Value) {
    let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let login: Value = http
        .post(format!("{base}/api/auth"))
        .json(&json!({"name": "admin", "password": ADMIN_PASSWORD}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let admin = login["token"].as_str().expect("user token").to_string();
    let identity: String = http
        .post(format!("{base}/api/core/client/provision"))
        .bearer_auth(&admin)
        .json(&json!({"id": client}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut req = http
        .post(format!("{base}/api/core/connection"))
        .header("authorization", identity);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body: Value = req.send().await.unwrap().json().await.unwrap();
    let token = body["token"]
        .as_str()
        .expect("connection token")
        .to_string();
    let id = claims(&token)["sub"].as_str().expect("sub").to_string();
    let record: Value = http
        .get(format!("{base}/api/core/connection/{id}"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (token, record)
}

#[tokio::test]
async fn serve_takes_the_environment_over_the_file_and_a_flag_over_both() {
    let tmp = tempfile::tempdir().unwrap();
    let from_file = tmp.path().join("data-from-file");
    let from_env = tmp.path().join("data-from-env");
    std::fs::write(
        tmp.path().join("morrigan.toml"),
        format!(
            "data_dir = \"{}\"\npublic_url = \"https://from-file.example\"\n\
             connection_token_ttl = 600\ntrusted_proxy = [\"10.0.0.0/8\"]\nmax_message_size = 2048\n",
            from_file.display()
        ),
    )
    .unwrap();
    let env = [
        ("MORRIGAN_LISTEN", "127.0.0.1:0"),
        ("MORRIGAN_DATA_DIR", from_env.to_str().unwrap()),
        ("MORRIGAN_PUBLIC_URL", "https://from-env.example"),
        ("MORRIGAN_CONNECTION_TOKEN_TTL", "30"),
        ("MORRIGAN_TRUSTED_PROXY", "127.0.0.1"),
    ];
    let node = Serving::start(tmp.path(), &env, &[]).await;
    // Every key the environment names comes from it ...
    assert!(
        from_env.join("morrigan.db").exists(),
        "data_dir from the environment"
    );
    assert!(!from_file.exists(), "the file's data_dir is not used");
    let (token, record) =
        connection_token(&node.base, "dev", &[("x-forwarded-for", "198.51.100.4")]).await;
    let c = claims(&token);
    assert_eq!(
        c["reportUrl"],
        "https://from-env.example/api/core/connection/connect"
    );
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 30);
    assert_eq!(record["clientAddress"], "198.51.100.4", "{record}");
    // ... and the file still supplies the rest: its body limit (2 KiB + 16 KiB) holds.
    let big = json!({"name": "admin", "password": "x".repeat(32 * 1024)});
    let res = reqwest::Client::new()
        .post(format!("{}/api/auth", node.base))
        .json(&big)
        .timeout(WAIT)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 413);
    node.stop().await;

    // A flag wins over the environment.
    let node = Serving::start(
        tmp.path(),
        &env,
        &["--public-url", "https://from-flag.example"],
    )
    .await;
    let (token, _) = connection_token(&node.base, "dev", &[]).await;
    assert_eq!(
        claims(&token)["reportUrl"],
        "https://from-flag.example/api/core/connection/connect"
    );
    node.stop().await;
}

/// Runs `morrigan serve` expecting it to refuse to start; returns the exit code and stderr.
async fn refused_start(cwd: &Path, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = tokio::time::timeout(
        WAIT,
        serve_command(cwd, env, &[])
            .env("MORRIGAN_LOG_FORMAT", "pretty")
            .output(),
    )
    .await
    .expect("exits in time")
    .expect("run");
    assert!(!out.status.success(), "started anyway");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn serve_refuses_a_bad_environment_value_even_over_a_good_file() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("morrigan.toml"),
        "listen = \"127.0.0.1:0\"\nconnection_token_ttl = 600\n",
    )
    .unwrap();
    let data = tmp.path().join("data");
    let data = data.to_str().unwrap();

    // Out of range: the environment's value is the one checked, so the node does not start.
    let (code, stderr) = refused_start(
        tmp.path(),
        &[
            ("MORRIGAN_DATA_DIR", data),
            ("MORRIGAN_CONNECTION_TOKEN_TTL", "1"),
        ],
    )
    .await;
    assert_eq!(code, Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines,
        ["error: --connection-token-ttl must be 5 to 3600 seconds"],
        "{stderr}"
    );

    // Not a number: a usage error naming the option.
    let (code, stderr) = refused_start(
        tmp.path(),
        &[
            ("MORRIGAN_DATA_DIR", data),
            ("MORRIGAN_CONNECTION_TOKEN_TTL", "soon"),
        ],
    )
    .await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--connection-token-ttl") && stderr.contains("soon"),
        "{stderr}"
    );
    assert!(
        !Path::new(data).join("morrigan.db").exists(),
        "nothing was started"
    );
}

#[tokio::test]
async fn serve_refuses_bad_messaging_options() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let data = data.to_str().unwrap();
    for (var, value, expect) in [
        (
            "MORRIGAN_UPLINK_TYPES",
            "telemetry.*,not a type",
            "error: --uplink-types: 'not a type' is not an uplink type pattern",
        ),
        (
            "MORRIGAN_MESSAGE_RETENTION",
            "30s",
            "error: --message-retention must be at least a minute",
        ),
        (
            "MORRIGAN_OUTBOX_MAX_BYTES",
            "10",
            "error: --outbox-max-bytes must be at least 1024",
        ),
    ] {
        let (code, stderr) =
            refused_start(tmp.path(), &[("MORRIGAN_DATA_DIR", data), (var, value)]).await;
        assert_eq!(code, Some(1), "{var}={value}: {stderr}");
        assert!(stderr.starts_with(expect), "{var}={value}: {stderr}");
    }
    let (code, stderr) = refused_start(
        tmp.path(),
        &[
            ("MORRIGAN_DATA_DIR", data),
            ("MORRIGAN_MESSAGE_RETENTION", "7 weeks"),
        ],
    )
    .await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--message-retention"), "{stderr}");
}

/// A device connected to `url` (as `client`), past its accept frame; and its connection id.
async fn device(
    url: &str,
    admin_cli: &Cli,
    client: &str,
) -> (
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    String,
) {
    let identity = admin_cli.json(&["client", "provision", client]).await;
    let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let body: Value = http
        .post(format!("{url}/api/core/connection"))
        .header("authorization", identity.as_str().expect("identity token"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ws_url = format!(
        "{}/api/core/connection/connect",
        url.replace("http://", "ws://")
    );
    let mut req = ws_url.into_client_request().unwrap();
    req.headers_mut()
        .insert("origin", body["token"].as_str().unwrap().parse().unwrap());
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("connect in time")
        .expect("connect");
    let first = loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => break serde_json::from_str::<Value>(&t).unwrap(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no accept frame: {other:?}"),
        }
    };
    let id = first["connectionId"].as_str().expect("id").to_string();
    (ws, id)
}

async fn close_code(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> u16 {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => return u16::from(f.code),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    }
}

#[tokio::test]
async fn connection_close_failures_are_one_line_and_exit_1() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(&data.path().join("data")).await;
    let admin = Cli::new(&server.url);
    admin.login().await;
    let (mut ws, id) = device(&server.url, &admin, "closable").await;

    // An operator without connection.close: refused by the server, the device unaffected.
    admin
        .run_with_stdin(
            &[
                "identity",
                "create",
                "viewer",
                "--function",
                "api",
                "--function",
                "connection",
                "--password-stdin",
            ],
            "viewer-password\n",
        )
        .await;
    let viewer = Cli::new(&server.url);
    let out = viewer
        .run_with_stdin(
            &["login", "--name", "viewer", "--password-stdin"],
            "viewer-password\n",
        )
        .await;
    cli_support::assert_success(&["login viewer"], &out);
    let line = viewer.fails(&["connection", "close", &id]).await;
    assert_eq!(
        line,
        "error: This requires the function 'connection.close' (HTTP 403)"
    );
    let shown = admin.json(&["connection", "show", &id]).await;
    assert_eq!(shown["open"], true, "{shown}");

    // An unknown id (and one that is not even a valid path segment).
    let line = admin
        .fails(&[
            "connection",
            "close",
            "00000000-0000-0000-0000-000000000000",
        ])
        .await;
    assert_eq!(line, "error: No such connection (HTTP 404)");
    let line = admin.fails(&["connection", "close", "no/such id"]).await;
    assert!(line.contains("(HTTP 404)"), "{line}");

    // A reason longer than a close frame carries: refused before anything is closed.
    let long = "r".repeat(121);
    let line = admin
        .fails(&["connection", "close", &id, "--reason", &long])
        .await;
    assert!(
        line.contains("120 bytes") && line.contains("(HTTP 400)"),
        "{line}"
    );

    // The admin closes it; closing it again is a conflict, not a success.
    let out = admin
        .ok(&["connection", "close", &id, "--reason", "done"])
        .await;
    assert_eq!(out.trim(), format!("closed {id}"));
    assert_eq!(close_code(&mut ws).await, 4000);
    // Whether the record is already written (with its code) or the socket is still closing,
    // the answer is the same conflict.
    let line = admin.fails(&["connection", "close", &id]).await;
    assert!(
        line == "error: Connection closed (HTTP 409)"
            || line == "error: Connection closed (4000 closed_by_operator) (HTTP 409)",
        "{line}"
    );

    // Not logged in at all: the hint, exit 1.
    let stranger = Cli::new(&server.url);
    let out = stranger.run(&["connection", "close", &id]).await;
    let line = one_error_line(&["connection close (no login)"], &out);
    assert!(line.contains("morrigan login"), "{line}");
    server.stop().await;
}
