//! `morrigan connection`: list, show, message and close connections.

use clap::{ArgGroup, Args, Subcommand};
use morrigan_protocol::messages::Track;
use morrigan_protocol::paths;
use morrigan_protocol::records::ConnectionRecord;
use reqwest::Method;
use serde_json::Value;

use super::api::Api;
use super::common::{Remote, answer, print_raw};
use super::message;
use super::table::{self, Table, short_time, text, yes_no};
use crate::Failure;

#[derive(Args, Debug)]
pub struct ConnectionCmd {
    #[command(flatten)]
    remote: Remote,
    #[command(subcommand)]
    action: ConnectionAction,
}

#[derive(Subcommand, Debug)]
enum ConnectionAction {
    /// List connection records, newest first.
    #[command(visible_alias = "list")]
    Ls {
        /// Only open connections.
        #[arg(long)]
        open: bool,
        /// Only this client's connections.
        #[arg(long = "client")]
        client: Option<String>,
        /// Only connections held by this node.
        #[arg(long = "node")]
        node: Option<String>,
        /// At most this many records.
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Show one connection record.
    Show { id: String },
    /// Send a message to a connection: a JSON object with a "type", or --type and --data.
    ///
    /// With --ack or --reply the message is tracked: the command waits (--timeout, default 10
    /// s) for the device's ack or reply and prints "<message id> <state>" or the reply; exit
    /// 4 when the answer timed out, 1 when the device refused it.
    #[command(group(ArgGroup::new("track").args(["ack", "reply"])))]
    Send {
        id: String,
        /// The whole message, e.g. '{"type":"agent.ping","payload":"hi"}'.
        #[arg(required_unless_present = "type", conflicts_with_all = ["type", "data"])]
        message: Option<String>,
        /// The message type (provider.message).
        #[arg(long = "type")]
        r#type: Option<String>,
        /// The other fields, as a JSON object.
        #[arg(long, requires = "type")]
        data: Option<String>,
        /// Wait for the device's ack.
        #[arg(long)]
        ack: bool,
        /// Wait for the device's reply, and print it.
        #[arg(long)]
        reply: bool,
        /// How many seconds to wait for the ack or reply (the server's default: 10, at most
        /// 300).
        #[arg(long, value_name = "SECONDS", requires = "track")]
        timeout: Option<u64>,
    },
    /// Close a connection (code 4000).
    Close {
        id: String,
        /// The reason the device is given.
        #[arg(long)]
        reason: Option<String>,
    },
}

pub async fn run(cmd: ConnectionCmd) -> Result<(), Failure> {
    let api = Api::authenticated(cmd.remote.url.as_deref())?;
    let as_json = cmd.remote.json;
    match cmd.action {
        ConnectionAction::Ls {
            open,
            client,
            node,
            limit,
        } => {
            let mut query = Vec::new();
            if open {
                query.push(("open", "true".to_string()));
            }
            if let Some(client) = client {
                query.push(("clientId", client));
            }
            if let Some(node) = node {
                query.push(("serverId", node));
            }
            if let Some(limit) = limit {
                query.push(("limit", limit.to_string()));
            }
            let body = api.get(paths::CONNECTION, &[], &query).await?;
            let Some(records) = answer::<Vec<ConnectionRecord>>(&body, as_json)? else {
                return Ok(());
            };
            list(&records);
        }
        ConnectionAction::Show { id } => {
            let body = api.get(paths::CONNECTION, &[&id], &[]).await?;
            if let Some(record) = answer::<ConnectionRecord>(&body, as_json)? {
                show(&record);
            }
        }
        ConnectionAction::Send {
            id,
            message,
            r#type,
            data,
            ack,
            reply,
            timeout,
        } => {
            let text = message_text(message, r#type, data)?;
            let track = match (ack, reply) {
                (_, true) => Track::Reply,
                (true, false) => Track::Ack,
                (false, false) => Track::None,
            };
            if track != Track::None {
                let mut query = vec![("track", track.as_str().to_string())];
                if let Some(timeout) = timeout {
                    query.push(("timeout", timeout.to_string()));
                }
                let url = api.url(paths::CONNECTION, &[&id, "send"], &query);
                return message::send(&api, url, text, &[], as_json).await;
            }
            let reply = api
                .call(
                    Method::POST,
                    api.url(paths::CONNECTION, &[&id, "send"], &[]),
                    Some(text),
                )
                .await?;
            if as_json {
                print_raw(&reply);
            } else {
                println!("sent to {id}");
            }
        }
        ConnectionAction::Close { id, reason } => {
            let query: Vec<(&str, String)> = reason.into_iter().map(|r| ("reason", r)).collect();
            let reply = api
                .call(
                    Method::DELETE,
                    api.url(paths::CONNECTION, &[&id], &query),
                    None,
                )
                .await?;
            if as_json {
                print_raw(&reply);
            } else {
                println!("closed {id}");
            }
        }
    }
    Ok(())
}

fn list(records: &[ConnectionRecord]) {
    let mut table = Table::new([
        "ID",
        "CLIENT",
        "NODE",
        "ADDRESS",
        "CONNECTED",
        "LAST HEARTBEAT",
        "ALIVE",
        "OPEN",
    ]);
    for c in records {
        let node: String = text(c.server_id.as_deref()).chars().take(8).collect();
        table.row([
            text(c.id.as_str()),
            text(c.client_id.as_str()),
            node,
            text(c.client_address.as_deref()),
            short_time(c.connected.as_deref()),
            short_time(c.last_heartbeat.as_deref()),
            yes_no(c.alive),
            yes_no(c.open),
        ]);
    }
    table.print();
}

fn show(c: &ConnectionRecord) {
    let close = match (c.close_code, text(c.close_reason.as_deref())) {
        (Some(code), reason) if reason != "-" => format!("{code} {reason}"),
        (Some(code), _) => code.to_string(),
        (None, _) => "-".to_string(),
    };
    table::print_fields(&[
        ("id", text(c.id.as_str())),
        ("client", text(c.client_id.as_str())),
        ("node", text(c.server_id.as_deref())),
        ("address", text(c.client_address.as_deref())),
        ("created", text(c.created.as_str())),
        ("connected", text(c.connected.as_deref())),
        ("last heartbeat", text(c.last_heartbeat.as_deref())),
        ("alive", yes_no(c.alive)),
        ("open", yes_no(c.open)),
        ("disconnected", text(c.disconnected.as_deref())),
        ("close", close),
        ("report URL", text(c.report_url.as_str())),
    ]);
}

/// The message to send: the whole message as given (checked to be JSON, sent exactly as
/// typed), or `--type` with the fields of `--data`.
fn message_text(
    message: Option<String>,
    ty: Option<String>,
    data: Option<String>,
) -> Result<String, Failure> {
    match (message, ty) {
        (Some(message), _) => {
            serde_json::from_str::<Value>(&message)
                .map_err(|e| Failure::msg(format!("the message is not JSON: {e}")))?;
            Ok(message)
        }
        (None, Some(ty)) => {
            let mut body = match data.as_deref().map(serde_json::from_str::<Value>) {
                None => serde_json::Map::new(),
                Some(Ok(Value::Object(map))) => map,
                Some(Ok(_)) => return Err(Failure::msg("--data must be a JSON object")),
                Some(Err(e)) => return Err(Failure::msg(format!("--data is not JSON: {e}"))),
            };
            body.insert("type".into(), Value::String(ty));
            Ok(Value::Object(body).to_string())
        }
        (None, None) => Err(Failure::msg("give a message or --type")),
    }
}
