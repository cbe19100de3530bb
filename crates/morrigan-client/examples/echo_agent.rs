//! A minimal device agent: answers `agent.ping` with `agent.pong` and echoes any other `echo.*`
//! message back, until Ctrl-C.
//!
//! ```sh
//! MORRIGAN_URL=http://127.0.0.1:8080/api/core/connection \
//! MORRIGAN_TOKEN_FILE=./identity-token \
//! MORRIGAN_STATE_DIR=./agent-state \
//! cargo run -p morrigan-client --example echo_agent
//! ```
//!
//! `MORRIGAN_CA` may name a PEM file with an extra root CA (a server with a self-signed cert).

use std::process::ExitCode;

use morrigan_client::{Capability, Client, Event, Sender};
use serde_json::{Value, json};

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

#[tokio::main]
async fn main() -> ExitCode {
    let Some(url) = env("MORRIGAN_URL") else {
        eprintln!(
            "set MORRIGAN_URL to the connection provider, e.g. http://host:port/api/core/connection"
        );
        return ExitCode::FAILURE;
    };
    // The token as the provisioning endpoint returned it (quoted or not).
    let token = match env("MORRIGAN_TOKEN_FILE").map(std::fs::read_to_string) {
        Some(Ok(token)) => token,
        Some(Err(e)) => {
            eprintln!("reading MORRIGAN_TOKEN_FILE: {e}");
            return ExitCode::FAILURE;
        }
        None => env("MORRIGAN_TOKEN").unwrap_or_default(),
    };

    let mut builder = Client::builder(url, token)
        .on_type("agent.ping", |message: Value, sender: Sender| async move {
            let reply = json!({ "data": message.get("data") });
            if let Err(e) = sender.send("agent.pong", &reply).await {
                eprintln!("agent.pong not sent: {e}");
            }
        })
        .on_provider("echo", |mut message: Value, sender: Sender| async move {
            if let Some(ty) = message.get("type").and_then(Value::as_str) {
                let reply = format!("{ty}.reply");
                message["type"] = Value::String(reply);
                let _ = sender.send_value(message).await;
            }
        })
        .capability(Capability {
            name: "agent".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Capability::default()
        });
    if let Some(dir) = env("MORRIGAN_STATE_DIR") {
        builder = builder.state_dir(dir);
    }
    if let Some(path) = env("MORRIGAN_CA") {
        match std::fs::read(&path) {
            Ok(pem) => builder = builder.root_ca_pem(pem),
            Err(e) => {
                eprintln!("reading MORRIGAN_CA {path}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let client = match builder.build() {
        Ok(client) => client,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };

    let (handle, mut events) = client.start();
    let printer = tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            match event {
                Event::Connected { connection_id } => println!("connected ({connection_id:?})"),
                Event::Disconnected { code, reason } => println!("disconnected: {code} {reason}"),
                Event::Reconnecting { attempt, delay } => {
                    println!("reconnecting in {delay:?} (attempt {attempt})")
                }
                Event::ConnectFailed(e) => println!("connect failed: {e}"),
                Event::TokenRefreshed { expires } => {
                    println!("identity token refreshed ({expires})")
                }
                Event::Message(m) => println!("message: {m}"),
                Event::Stopped(result) => println!("stopped: {result:?}"),
                _ => {}
            }
        }
    });

    let result = tokio::select! {
        _ = tokio::signal::ctrl_c() => handle.stop("SIGINT").await,
        // The client ends on its own only on a fatal error (identity revoked, superseded).
        result = handle.wait() => result,
    };
    let _ = printer.await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
