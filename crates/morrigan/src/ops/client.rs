//! `morrigan client`: provision, list, show and deprovision clients (devices).

use std::path::PathBuf;

use clap::{Args, Subcommand};
use morrigan_client::parse_identity_token;
use morrigan_protocol::api::{DeprovisionResponse, ProvisionRequest};
use morrigan_protocol::paths;
use morrigan_protocol::records::ClientRecord;
use reqwest::Method;
use serde_json::json;

use super::api::{Api, write_private};
use super::common::{Remote, answer, print_raw, request_body};
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
    }
    Ok(())
}
