//! Operator commands: `login`, `client`, `connection`, `identity`, `node`, against a server's
//! REST API.
//!
//! Output is a human table by default and the server's JSON, as received, with `--json`. Every
//! failure is one line on stderr (`error: <the server's reason>`) and a non-zero exit code.

mod api;
mod table;

use std::io::{IsTerminal, Read};
use std::path::PathBuf;

use clap::{Args, Subcommand};
use morrigan_client::parse_identity_token;
use morrigan_protocol::paths;
use reqwest::Method;
use serde_json::{Value, json};

use crate::Failure;
use api::{Api, Login, json as parse_json, write_private};
use table::{Table, field, short_time};

/// Where and how: shared by every operator command.
#[derive(Args, Debug, Clone)]
pub struct Remote {
    /// Server URL [default: the one of the last `morrigan login`, else http://127.0.0.1:8080].
    #[arg(long, env = "MORRIGAN_URL", global = true)]
    url: Option<String>,
    /// Print the server's JSON answer instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct LoginArgs {
    /// Server URL [default: the one of the last login, else http://127.0.0.1:8080].
    #[arg(long, env = "MORRIGAN_URL")]
    url: Option<String>,
    /// Identity name.
    #[arg(long, default_value = "admin")]
    name: String,
    /// Read the password from standard input (else MORRIGAN_PASSWORD, else a prompt).
    #[arg(long)]
    password_stdin: bool,
}

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
    },
    /// Close a connection (code 4000).
    Close {
        id: String,
        /// The reason the device is given.
        #[arg(long)]
        reason: Option<String>,
    },
}

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

#[derive(Args, Debug)]
pub struct NodeCmd {
    #[command(flatten)]
    remote: Remote,
    #[command(subcommand)]
    action: NodeAction,
}

#[derive(Subcommand, Debug)]
enum NodeAction {
    /// List the nodes of the cluster.
    #[command(visible_alias = "list")]
    Ls,
}

/// Reads a password: all of standard input (one trailing newline removed).
fn password_from_stdin() -> Result<String, Failure> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|e| Failure::msg(format!("cannot read the password from stdin: {e}")))?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.is_empty() {
        return Err(Failure::msg("empty password on stdin"));
    }
    Ok(text.to_string())
}

fn prompt(label: &str) -> Result<String, Failure> {
    if !std::io::stdin().is_terminal() {
        return Err(Failure::msg(
            "no password given: use --password-stdin (or MORRIGAN_PASSWORD for login)",
        ));
    }
    rpassword::prompt_password(label)
        .map_err(|e| Failure::msg(format!("cannot read the password: {e}")))
}

fn print_raw(body: &str) {
    println!("{}", body.trim_end());
}

pub async fn login(args: LoginArgs) -> Result<(), Failure> {
    let api = Api::anonymous(args.url.as_deref())?;
    let password = if args.password_stdin {
        password_from_stdin()?
    } else if let Some(pw) = std::env::var("MORRIGAN_PASSWORD")
        .ok()
        .filter(|p| !p.is_empty())
    {
        pw
    } else {
        prompt(&format!("Password for {} at {}: ", args.name, api.base))?
    };
    let body = json!({"name": args.name, "password": password}).to_string();
    let answer = api
        .call(Method::POST, api.url(paths::AUTH, &[], &[]), Some(body))
        .await?;
    let token = parse_json(&answer)?
        .get("token")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| Failure::msg("the server's login answer has no token"))?;
    let saved = Login {
        url: api.base.clone(),
        token,
    }
    .save()?;
    println!(
        "logged in to {} as {} (token saved in {})",
        api.base,
        args.name,
        saved.display()
    );
    Ok(())
}

pub async fn client(cmd: ClientCmd) -> Result<(), Failure> {
    let api = Api::authenticated(cmd.remote.url.as_deref())?;
    let as_json = cmd.remote.json;
    match cmd.action {
        ClientAction::Provision { id, out } => {
            let body = json!({ "id": id }).to_string();
            let answer = api
                .call(
                    Method::POST,
                    api.url(paths::CLIENT_PROVISION, &[], &[]),
                    Some(body),
                )
                .await?;
            let token = parse_identity_token(&answer);
            match out {
                Some(path) => {
                    write_private(&path, format!("{token}\n").as_bytes())?;
                    if as_json {
                        println!("{}", json!({"id": id, "file": path}));
                    } else {
                        eprintln!("identity token of {id} written to {}", path.display());
                    }
                }
                None if as_json => print_raw(&answer),
                None => println!("{token}"),
            }
        }
        ClientAction::Ls => {
            let body = api.get(paths::CLIENT, &[], &[]).await?;
            if as_json {
                print_raw(&body);
                return Ok(());
            }
            let mut table = Table::new(["ID", "STATE", "STATE UPDATED", "PROVISIONED", "CREATED"]);
            for c in parse_json(&body)?.as_array().into_iter().flatten() {
                table.row([
                    field(c, "id"),
                    field(c, "state"),
                    short_time(c, "stateUpdated"),
                    short_time(c, "updated"),
                    short_time(c, "created"),
                ]);
            }
            table.print();
        }
        ClientAction::Show { id } => {
            let body = api.get(paths::CLIENT, &[&id], &[]).await?;
            if as_json {
                print_raw(&body);
                return Ok(());
            }
            let c = parse_json(&body)?;
            table::print_fields(&[
                ("id", field(&c, "id")),
                ("state", field(&c, "state")),
                ("state updated", field(&c, "stateUpdated")),
                ("created", field(&c, "created")),
                ("provisioned", field(&c, "updated")),
                ("identity token id", field(&c, "tokenId")),
            ]);
        }
        ClientAction::Rm { id } => {
            let answer = api
                .call(Method::DELETE, api.url(paths::CLIENT, &[&id], &[]), None)
                .await?;
            if as_json {
                print_raw(&answer);
                return Ok(());
            }
            let closed = parse_json(&answer)?
                .get("closedConnections")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            println!("client {id} deprovisioned ({closed} connection(s) closed)");
        }
    }
    Ok(())
}

pub async fn connection(cmd: ConnectionCmd) -> Result<(), Failure> {
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
            if as_json {
                print_raw(&body);
                return Ok(());
            }
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
            for c in parse_json(&body)?.as_array().into_iter().flatten() {
                let node: String = field(c, "serverId").chars().take(8).collect();
                table.row([
                    field(c, "id"),
                    field(c, "clientId"),
                    node,
                    field(c, "clientAddress"),
                    short_time(c, "connected"),
                    short_time(c, "lastHeartbeat"),
                    yes_no(c, "alive"),
                    yes_no(c, "open"),
                ]);
            }
            table.print();
        }
        ConnectionAction::Show { id } => {
            let body = api.get(paths::CONNECTION, &[&id], &[]).await?;
            if as_json {
                print_raw(&body);
                return Ok(());
            }
            let c = parse_json(&body)?;
            let close = match (
                c.get("closeCode").and_then(Value::as_u64),
                field(&c, "closeReason"),
            ) {
                (Some(code), reason) if reason != "-" => format!("{code} {reason}"),
                (Some(code), _) => code.to_string(),
                (None, _) => "-".to_string(),
            };
            table::print_fields(&[
                ("id", field(&c, "id")),
                ("client", field(&c, "clientId")),
                ("node", field(&c, "serverId")),
                ("address", field(&c, "clientAddress")),
                ("created", field(&c, "created")),
                ("connected", field(&c, "connected")),
                ("last heartbeat", field(&c, "lastHeartbeat")),
                ("alive", yes_no(&c, "alive")),
                ("open", yes_no(&c, "open")),
                ("disconnected", field(&c, "disconnected")),
                ("close", close),
                ("report URL", field(&c, "reportUrl")),
            ]);
        }
        ConnectionAction::Send {
            id,
            message,
            r#type,
            data,
        } => {
            let text = match (message, r#type) {
                (Some(message), _) => {
                    // Checked here for a clear message; sent exactly as given.
                    serde_json::from_str::<Value>(&message)
                        .map_err(|e| Failure::msg(format!("the message is not JSON: {e}")))?;
                    message
                }
                (None, Some(ty)) => {
                    let mut body = match data.as_deref().map(serde_json::from_str::<Value>) {
                        None => serde_json::Map::new(),
                        Some(Ok(Value::Object(map))) => map,
                        Some(Ok(_)) => return Err(Failure::msg("--data must be a JSON object")),
                        Some(Err(e)) => {
                            return Err(Failure::msg(format!("--data is not JSON: {e}")));
                        }
                    };
                    body.insert("type".into(), Value::String(ty));
                    Value::Object(body).to_string()
                }
                (None, None) => return Err(Failure::msg("give a message or --type")),
            };
            let answer = api
                .call(
                    Method::POST,
                    api.url(paths::CONNECTION, &[&id, "send"], &[]),
                    Some(text),
                )
                .await?;
            if as_json {
                print_raw(&answer);
            } else {
                println!("sent to {id}");
            }
        }
        ConnectionAction::Close { id, reason } => {
            let query: Vec<(&str, String)> = reason.into_iter().map(|r| ("reason", r)).collect();
            let answer = api
                .call(
                    Method::DELETE,
                    api.url(paths::CONNECTION, &[&id], &query),
                    None,
                )
                .await?;
            if as_json {
                print_raw(&answer);
            } else {
                println!("closed {id}");
            }
        }
    }
    Ok(())
}

/// The identity whose id or name is `key`.
async fn find_identity(api: &Api, key: &str) -> Result<Value, Failure> {
    let body = api.get(paths::IDENTITY, &[], &[]).await?;
    let list = parse_json(&body)?;
    let identities = list
        .get("identities")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let by = |k: &str| {
        identities
            .iter()
            .find(|i| i.get(k).and_then(Value::as_str) == Some(key))
            .cloned()
    };
    by("id")
        .or_else(|| by("name"))
        .ok_or_else(|| Failure::msg(format!("no identity named {key:?} or with that id")))
}

fn functions_of(identity: &Value) -> Vec<String> {
    identity
        .get("functions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect()
}

pub async fn identity(cmd: IdentityCmd) -> Result<(), Failure> {
    let api = Api::authenticated(cmd.remote.url.as_deref())?;
    let as_json = cmd.remote.json;
    match cmd.action {
        IdentityAction::Ls => {
            let body = api.get(paths::IDENTITY, &[], &[]).await?;
            if as_json {
                print_raw(&body);
                return Ok(());
            }
            let mut table = Table::new(["ID", "NAME", "CREATED", "FUNCTIONS"]);
            let list = parse_json(&body)?;
            for i in list
                .get("identities")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                table.row([
                    field(i, "id"),
                    field(i, "name"),
                    short_time(i, "created"),
                    functions_of(i).join(","),
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
            let body = json!({
                "name": name,
                "auth": {"type": "password", "password": password},
                "functions": functions,
            })
            .to_string();
            let answer = api
                .call(Method::POST, api.url(paths::IDENTITY, &[], &[]), Some(body))
                .await?;
            if as_json {
                print_raw(&answer);
                return Ok(());
            }
            let created = parse_json(&answer)?;
            let identity = created.get("identity").cloned().unwrap_or_default();
            println!(
                "created identity {} ({}) with functions: {}",
                field(&identity, "name"),
                field(&identity, "id"),
                functions_of(&identity).join(", ")
            );
        }
        IdentityAction::Rm { name_or_id } => {
            let identity = find_identity(&api, &name_or_id).await?;
            let id = field(&identity, "id");
            let answer = api
                .call(Method::DELETE, api.url(paths::IDENTITY, &[&id], &[]), None)
                .await?;
            if as_json {
                print_raw(&answer);
                return Ok(());
            }
            println!("deleted identity {} ({id})", field(&identity, "name"));
        }
        IdentityAction::Grant {
            name_or_id,
            functions,
        } => {
            let identity = find_identity(&api, &name_or_id).await?;
            let id = field(&identity, "id");
            let mut all = functions_of(&identity);
            for f in functions {
                if !all.contains(&f) {
                    all.push(f);
                }
            }
            let body = json!({ "functions": all }).to_string();
            let answer = api
                .call(
                    Method::PATCH,
                    api.url(paths::IDENTITY, &[&id], &[]),
                    Some(body),
                )
                .await?;
            if as_json {
                print_raw(&answer);
                return Ok(());
            }
            let updated = parse_json(&answer)?;
            let identity = updated.get("identity").cloned().unwrap_or_default();
            println!(
                "{} now has: {}",
                field(&identity, "name"),
                functions_of(&identity).join(", ")
            );
        }
    }
    Ok(())
}

pub async fn node(cmd: NodeCmd) -> Result<(), Failure> {
    let api = Api::authenticated(cmd.remote.url.as_deref())?;
    match cmd.action {
        NodeAction::Ls => {
            let body = api.get("/api/core/node", &[], &[]).await?;
            if cmd.remote.json {
                print_raw(&body);
                return Ok(());
            }
            let mut table =
                Table::new(["ID", "STATE", "URL", "VERSION", "STARTED", "LEASE EXPIRES"]);
            for n in parse_json(&body)?.as_array().into_iter().flatten() {
                table.row([
                    field(n, "id"),
                    field(n, "state"),
                    field(n, "publicUrl"),
                    field(n, "version"),
                    short_time(n, "started"),
                    short_time(n, "leaseExpires"),
                ]);
            }
            table.print();
        }
    }
    Ok(())
}

fn yes_no(v: &Value, key: &str) -> String {
    match v.get(key).and_then(Value::as_bool) {
        Some(true) => "yes".into(),
        Some(false) => "no".into(),
        None => "-".into(),
    }
}
