//! `morrigan identity`: list, create and delete operator identities, grant them functions.

use clap::{Args, Subcommand};
use morrigan_protocol::api::{AuthDetails, IdentityList, IdentityRequest, IdentityResponse};
use morrigan_protocol::paths;
use morrigan_protocol::records::Identity;
use reqwest::Method;

use super::api::Api;
use super::common::{Remote, answer, parse, password_from_stdin, print_raw, prompt, request_body};
use super::table::{Table, short_time, text};
use crate::Failure;

#[derive(Args, Debug)]
pub struct IdentityCmd {
    #[command(flatten)]
    remote: Remote,
    #[command(subcommand)]
    action: IdentityAction,
}

#[derive(Subcommand, Debug)]
enum IdentityAction {
    /// List operator identities.
    #[command(visible_alias = "list")]
    Ls,
    /// Create an operator identity.
    Create {
        name: String,
        /// A function to grant (repeatable), e.g. api, connection.send.
        #[arg(long = "function")]
        functions: Vec<String>,
        /// Read the new identity's password from standard input (else a prompt).
        #[arg(long)]
        password_stdin: bool,
    },
    /// Delete an identity (by name or id) and revoke its sessions.
    #[command(visible_alias = "delete")]
    Rm { name_or_id: String },
    /// Grant functions to an identity (added to those it has).
    Grant {
        name_or_id: String,
        #[arg(required = true)]
        functions: Vec<String>,
    },
}

pub async fn run(cmd: IdentityCmd) -> Result<(), Failure> {
    let api = Api::authenticated(cmd.remote.url.as_deref())?;
    let as_json = cmd.remote.json;
    match cmd.action {
        IdentityAction::Ls => {
            let body = api.get(paths::IDENTITY, &[], &[]).await?;
            let Some(list) = answer::<IdentityList>(&body, as_json)? else {
                return Ok(());
            };
            let mut table = Table::new(["ID", "NAME", "CREATED", "FUNCTIONS"]);
            for i in &list.identities {
                table.row([
                    text(i.id.as_str()),
                    text(i.name.as_str()),
                    short_time(i.created.as_str()),
                    i.functions.join(","),
                ]);
            }
            table.print();
        }
        IdentityAction::Create {
            name,
            functions,
            password_stdin,
        } => {
            let password = if password_stdin {
                password_from_stdin()?
            } else {
                let first = prompt(&format!("Password for the new identity {name}: "))?;
                let again = prompt("Again: ")?;
                if first != again {
                    return Err(Failure::msg("the passwords differ"));
                }
                first
            };
            let body = request_body(&IdentityRequest {
                name: Some(name),
                auth: Some(AuthDetails {
                    kind: Some("password".into()),
                    password: Some(password),
                }),
                functions: Some(functions),
            })?;
            let body = api
                .call(Method::POST, api.url(paths::IDENTITY, &[], &[]), Some(body))
                .await?;
            let Some(IdentityResponse { identity, .. }) = answer(&body, as_json)? else {
                return Ok(());
            };
            println!(
                "created identity {} ({}) with functions: {}",
                text(identity.name.as_str()),
                text(identity.id.as_str()),
                identity.functions.join(", ")
            );
        }
        IdentityAction::Rm { name_or_id } => {
            let identity = find_identity(&api, &name_or_id).await?;
            let id = identity.id;
            let reply = api
                .call(Method::DELETE, api.url(paths::IDENTITY, &[&id], &[]), None)
                .await?;
            if as_json {
                print_raw(&reply);
                return Ok(());
            }
            println!("deleted identity {} ({id})", text(identity.name.as_str()));
        }
        IdentityAction::Grant {
            name_or_id,
            functions,
        } => {
            let Identity {
                id,
                functions: mut all,
                ..
            } = find_identity(&api, &name_or_id).await?;
            for f in functions {
                if !all.contains(&f) {
                    all.push(f);
                }
            }
            let body = request_body(&IdentityRequest {
                functions: Some(all),
                ..IdentityRequest::default()
            })?;
            let body = api
                .call(
                    Method::PATCH,
                    api.url(paths::IDENTITY, &[&id], &[]),
                    Some(body),
                )
                .await?;
            let Some(IdentityResponse { identity, .. }) = answer(&body, as_json)? else {
                return Ok(());
            };
            println!(
                "{} now has: {}",
                text(identity.name.as_str()),
                identity.functions.join(", ")
            );
        }
    }
    Ok(())
}

/// The identity whose id or name is `key` (an id wins over a name).
async fn find_identity(api: &Api, key: &str) -> Result<Identity, Failure> {
    let body = api.get(paths::IDENTITY, &[], &[]).await?;
    let IdentityList { mut identities, .. } = parse(&body)?;
    let found = identities
        .iter()
        .position(|i| i.id == key)
        .or_else(|| identities.iter().position(|i| i.name == key));
    match found {
        Some(at) => Ok(identities.swap_remove(at)),
        None => Err(Failure::msg(format!(
            "no identity named {key:?} or with that id"
        ))),
    }
}
