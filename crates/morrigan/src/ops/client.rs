//! `morrigan client`: provision, list, show and deprovision clients (devices), and send them
//! messages (`send`, `call`), addressed to the client rather than to one connection.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use morrigan_client::parse_identity_token;
use morrigan_protocol::api::{DeprovisionResponse, ProvisionRequest};
use morrigan_protocol::messages::Track;
use morrigan_protocol::paths;
use morrigan_protocol::records::ClientRecord;
use reqwest::Method;
use serde_json::json;

use super::api::{Api, write_private};
use super::common::{Remote, answer, print_raw, request_body};
use super::message;
use super::table::{self, Table, short_time, text};
use crate::Failure;

#[derive(Args, Debug)]
pub struct ClientCmd {
    #[command(flatten)]
    remote: Remote,
    #[command(subcommand)]
    action: ClientAction,
}

#[derive(Subcommand, Debug)]
enum ClientAction {
    /// Provision a client (creating it if new): prints its new identity token and revokes the
    /// older ones.
    Provision {
        id: String,
        /// Write the token to this file (mode 0600) instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// List clients.
    #[command(visible_alias = "list")]
    Ls,
    /// Show one client.
    Show { id: String },
    /// Deprovision a client: revokes its tokens and closes its connections (4003).
    #[command(visible_alias = "delete")]
    Rm { id: String },
    /// Send a message to a client: prints "<message id> <state>", or the reply. Exit 0 when
    /// sent (or answered), 4 when the answer timed out, 1 otherwise.
    ///
    /// Without --timeout the command does not wait: the state is written, or queued (--ttl,
    /// client offline). With --timeout it waits that long for the message to be written
    /// (no flag), acknowledged (--ack) or replied to (--reply). --json prints the server's
    /// answer, for a failed message too.
    Send {
        id: String,
        /// The whole message, a JSON object with a "type", sent as typed:
        /// '{"type":"agent.ping","payload":"hi"}'.
        message: String,
        /// Track it until the device acknowledges it.
        #[arg(long, conflicts_with = "reply")]
        ack: bool,
        /// Track it until the device replies.
        #[arg(long)]
        reply: bool,
        /// Keep it this many seconds in the client's outbox when the client is offline (else
        /// an offline client fails the send), and re-deliver it until answered.
        #[arg(long, value_name = "SECONDS")]
        ttl: Option<u64>,
        /// Wait this many seconds for the outcome (the server allows up to 300).
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
        /// A key that makes a retried send not send twice (the server answers the first
        /// send's message instead).
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
    },
    /// Send a message and print the device's reply (a send with --reply and a timeout). Exit
    /// 0 with the reply, 4 when it timed out, 1 otherwise.
    Call {
        id: String,
        /// The whole message, a JSON object with a "type": '{"type":"agent.ping"}'.
        message: String,
        /// Wait this many seconds for the reply (the server allows up to 300).
        #[arg(long, value_name = "SECONDS", default_value_t = 10)]
        timeout: u64,
    },
}

/// How to send to a client: the query and headers of `POST /api/core/client/:id/send`.
struct Delivery {
    track: Track,
    ttl: Option<u64>,
    timeout: Option<u64>,
    idempotency_key: Option<String>,
}

/// `POST /api/core/client/:id/send?track=&ttl=&timeout=` with `text` (checked first), reported
/// by [`message::send`].
async fn send(
    api: &Api,
    id: &str,
    text: String,
    delivery: Delivery,
    as_json: bool,
) -> Result<(), Failure> {
    message::check_message(&text)?;
    let mut query = vec![("track", delivery.track.as_str().to_string())];
    if let Some(ttl) = delivery.ttl {
        query.push(("ttl", ttl.to_string()));
    }
    if let Some(timeout) = delivery.timeout {
        query.push(("timeout", timeout.to_string()));
    }
    let headers: Vec<(&str, String)> = delivery
        .idempotency_key
        .into_iter()
        .map(|key| ("Idempotency-Key", key))
        .collect();
    let url = api.url(paths::CLIENT, &[id, "send"], &query);
    message::send(api, url, text, &headers, as_json).await
}

pub async fn run(cmd: ClientCmd) -> Result<(), Failure> {
    let api = Api::authenticated(cmd.remote.url.as_deref())?;
    let as_json = cmd.remote.json;
    match cmd.action {
        ClientAction::Provision { id, out } => {
            let body = request_body(&ProvisionRequest { id: id.clone() })?;
            let reply = api
                .call(
                    Method::POST,
                    api.url(paths::CLIENT_PROVISION, &[], &[]),
                    Some(body),
                )
                .await?;
            // The answer is the token as a JSON string literal.
            let token = parse_identity_token(&reply);
            match out {
                Some(path) => {
                    write_private(&path, format!("{token}\n").as_bytes())?;
                    if as_json {
                        println!("{}", json!({"id": id, "file": path}));
                    } else {
                        eprintln!("identity token of {id} written to {}", path.display());
                    }
                }
                None if as_json => print_raw(&reply),
                None => println!("{token}"),
            }
        }
        ClientAction::Ls => {
            let body = api.get(paths::CLIENT, &[], &[]).await?;
            let Some(clients) = answer::<Vec<ClientRecord>>(&body, as_json)? else {
                return Ok(());
            };
            let mut table = Table::new(["ID", "STATE", "STATE UPDATED", "PROVISIONED", "CREATED"]);
            for c in &clients {
                table.row([
                    text(c.id.as_str()),
                    text(c.state.as_deref()),
                    short_time(c.state_updated.as_deref()),
                    short_time(c.updated.as_str()),
                    short_time(c.created.as_str()),
                ]);
            }
            table.print();
        }
        ClientAction::Show { id } => {
            let body = api.get(paths::CLIENT, &[&id], &[]).await?;
            let Some(c) = answer::<ClientRecord>(&body, as_json)? else {
                return Ok(());
            };
            table::print_fields(&[
                ("id", text(c.id.as_str())),
                ("state", text(c.state.as_deref())),
                ("state updated", text(c.state_updated.as_deref())),
                ("created", text(c.created.as_str())),
                ("provisioned", text(c.updated.as_str())),
                ("identity token id", text(c.token_id.as_deref())),
            ]);
        }
        ClientAction::Rm { id } => {
            let body = api
                .call(Method::DELETE, api.url(paths::CLIENT, &[&id], &[]), None)
                .await?;
            let Some(done) = answer::<DeprovisionResponse>(&body, as_json)? else {
                return Ok(());
            };
            println!(
                "client {id} deprovisioned ({} connection(s) closed)",
                done.closed_connections
            );
        }
        ClientAction::Send {
            id,
            message,
            ack,
            reply,
            ttl,
            timeout,
            idempotency_key,
        } => {
            let track = match (ack, reply) {
                (_, true) => Track::Reply,
                (true, false) => Track::Ack,
                (false, false) => Track::None,
            };
            let delivery = Delivery {
                track,
                ttl,
                timeout,
                idempotency_key,
            };
            send(&api, &id, message, delivery, as_json).await?;
        }
        ClientAction::Call {
            id,
            message,
            timeout,
        } => {
            let delivery = Delivery {
                track: Track::Reply,
                ttl: None,
                timeout: Some(timeout),
                idempotency_key: None,
            };
            send(&api, &id, message, delivery, as_json).await?;
        }
    }
    Ok(())
}
