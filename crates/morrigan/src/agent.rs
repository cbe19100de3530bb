//! `morrigan agent`: a device agent built on `morrigan-client`.
//!
//! It connects with the device's identity token, stays connected (reconnecting with jittered
//! backoff, failing over between several URLs), keeps the identity token fresh in its state
//! directory, logs every message it receives and answers the diagnostic `agent.ping` with
//! `agent.pong`, echoing everything but the type. Tracked messages (those with a `messageId`)
//! are answered: a tracked `agent.ping` with the reply `{"payload": <its payload>}` (what
//! `morrigan client call` prints), every other one with an ack once logged.
//! SIGTERM/SIGINT stop it gracefully (exit 0);
//! a revoked or deprovisioned identity ends it with one error line and exit code 3, so that a
//! supervisor can tell "do not restart" from a crash (systemd: `RestartPreventExitStatus=3`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use morrigan_client::{
    Answer, BackoffConfig, Client, Error, Event, IDENTITY_TOKEN_FILE, Sender, message_id,
};
use serde_json::{Value, json};

use crate::Failure;

/// Exit code of an agent whose identity the server refuses for good (revoked, deprovisioned,
/// superseded): restarting it cannot help.
pub const EXIT_REFUSED: u8 = 3;

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Server URL (http://host:port) or connection provider URL (.../api/core/connection).
    /// Repeat it, or separate URLs with commas, to fail over: the next URL is tried whenever
    /// an attempt fails or a connection is lost.
    #[arg(
        long = "url",
        value_name = "URL",
        env = "MORRIGAN_URL",
        value_delimiter = ',',
        required = true
    )]
    urls: Vec<String>,
    /// File holding the identity token (bare, or the quoted string provisioning returns). Only
    /// the first start needs it: later ones use the newest token saved in the state directory.
    #[arg(long, env = "MORRIGAN_TOKEN_FILE")]
    token_file: PathBuf,
    /// Directory where the newest identity token is kept (created if missing).
    #[arg(
        long,
        env = "MORRIGAN_STATE_DIR",
        default_value = "morrigan-agent-state"
    )]
    state_dir: PathBuf,
    /// Seconds between identity token refreshes (one is also requested on every connect).
    #[arg(long, env = "MORRIGAN_TOKEN_REFRESH", default_value = "28800", value_parser = seconds)]
    token_refresh: Duration,
    /// Ceiling of the first reconnect delay, in seconds; doubles per failed attempt.
    #[arg(long, env = "MORRIGAN_BACKOFF_BASE", default_value = "1", value_parser = seconds)]
    backoff_base: Duration,
    /// Largest reconnect delay, in seconds.
    #[arg(long, env = "MORRIGAN_BACKOFF_CAP", default_value = "60", value_parser = seconds)]
    backoff_cap: Duration,
    /// After the server goes away (close 1001), reconnect within this many seconds, at random.
    #[arg(long, env = "MORRIGAN_GOING_AWAY_SPREAD", default_value = "10", value_parser = seconds)]
    going_away_spread: Duration,
    /// PEM file with an extra root CA to trust (a server with a private CA).
    #[arg(long, env = "MORRIGAN_ROOT_CA")]
    root_ca: Option<PathBuf>,
}

/// Seconds, fractions allowed ("0.5").
fn seconds(s: &str) -> Result<Duration, String> {
    let value: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(value).map_err(|e| format!("{s:?}: {e}"))
}

/// Reads the identity token file. A missing or unreadable file is fine when the state directory
/// already holds a token (it is newer anyway); otherwise it is an error.
fn read_token_file(path: &Path, state_dir: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(e) if state_dir.join(IDENTITY_TOKEN_FILE).is_file() => {
            tracing::warn!(file = %path.display(), error = %e,
                "cannot read the token file; using the token saved in the state directory");
            Ok(String::new())
        }
        Err(e) => Err(e).with_context(|| format!("cannot read token file {}", path.display())),
    }
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let given = read_token_file(&args.token_file, &args.state_dir)?;
    let mut builder = Client::builder_multi(args.urls.iter().map(|u| u.trim()), given)
        .state_dir(&args.state_dir)
        .token_refresh(Some(args.token_refresh))
        .backoff(BackoffConfig {
            base: args.backoff_base,
            cap: args.backoff_cap,
            going_away_spread: args.going_away_spread,
            ..BackoffConfig::default()
        })
        .on_type("agent.ping", answer_ping)
        // Logged by `log_events`; a tracked one is acknowledged.
        .on_other(|_: Value, _: Sender| async {});
    if let Some(path) = &args.root_ca {
        let pem = std::fs::read(path)
            .with_context(|| format!("cannot read root CA {}", path.display()))?;
        builder = builder.root_ca_pem(pem);
    }
    let client = builder.build().map_err(|e| match e {
        Error::Config(reason) => anyhow::anyhow!("{reason}"),
        other => anyhow::anyhow!(other),
    })?;
    tracing::info!(urls = ?client.provider_urls(), state_dir = %args.state_dir.display(), "agent starting");
    let (handle, events) = client.start();
    let logger = tokio::spawn(log_events(events));

    let outcome = tokio::select! {
        outcome = handle.wait() => outcome,
        signal = shutdown_signal() => {
            let signal = signal?;
            tracing::info!(signal, "stopping");
            handle.stop(signal).await
        }
    };
    // The logger ends after the final `Stopped` event.
    let _ = tokio::time::timeout(Duration::from_secs(1), logger).await;
    match outcome {
        Ok(()) => Ok(()),
        Err(e) => Err(fatal(e)),
    }
}

/// One clear line for the error that stopped the client, with the exit code to use.
fn fatal(e: Error) -> anyhow::Error {
    let (code, hint) = match &e {
        Error::Revoked { .. } | Error::IdentityRejected { .. } => (
            EXIT_REFUSED,
            "; not retrying (provision the device again to reconnect)",
        ),
        Error::Superseded { .. } => (
            EXIT_REFUSED,
            "; not retrying (another agent with this identity is connected)",
        ),
        _ => (1, ""),
    };
    Failure::new(code, format!("{e}{hint}")).into()
}

/// A tracked `agent.ping` → the reply `{"payload": <its payload, or null>}`; an untracked one
/// → `agent.pong` with everything but the type echoed (what the agent always did).
async fn answer_ping(message: Value, sender: Sender) -> Answer {
    if let Some(id) = message_id(&message) {
        tracing::info!(message_id = id, "answered agent.ping with a reply");
        let payload = message.get("payload").cloned().unwrap_or(Value::Null);
        return Answer::Reply(json!({ "payload": payload }));
    }
    let mut body = message.as_object().cloned().unwrap_or_default();
    body.remove("type");
    match sender.send("agent.pong", &Value::Object(body)).await {
        Ok(()) => tracing::info!("answered agent.ping with agent.pong"),
        Err(e) => tracing::warn!(error = %e, "could not answer agent.ping"),
    }
    // Untracked: not sent.
    Answer::Ack
}

async fn log_events(mut events: morrigan_client::Events) {
    while let Some(event) = events.recv().await {
        match event {
            Event::Connected { connection_id } => {
                tracing::info!(
                    connection_id = connection_id.as_deref().unwrap_or("-"),
                    "agent connected"
                );
            }
            Event::Message(message) => {
                let ty = message.get("type").and_then(Value::as_str).unwrap_or("");
                // Built-ins carrying tokens (`client.token.issue`) never reach this point.
                tracing::info!(message_type = ty, body = %message, "received");
            }
            Event::Reconnecting { attempt, delay } => {
                tracing::debug!(attempt, ?delay, "waiting before reconnecting");
            }
            Event::Stopped(_) => break,
            _ => {}
        }
    }
}

/// Waits for SIGTERM or SIGINT and names it.
async fn shutdown_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
