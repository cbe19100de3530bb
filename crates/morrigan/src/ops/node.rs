//! `morrigan node`: the nodes of the cluster.

use clap::{Args, Subcommand};
use morrigan_protocol::paths;
use morrigan_protocol::records::NodeRecord;

use super::api::Api;
use super::common::{Remote, answer};
use super::table::{Table, short_time, text};
use crate::Failure;

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

pub async fn run(cmd: NodeCmd) -> Result<(), Failure> {
    let api = Api::authenticated(cmd.remote.url.as_deref())?;
    match cmd.action {
        NodeAction::Ls => {
            let body = api.get(paths::NODE, &[], &[]).await?;
            let Some(nodes) = answer::<Vec<NodeRecord>>(&body, cmd.remote.json)? else {
                return Ok(());
            };
            let mut table =
                Table::new(["ID", "STATE", "URL", "VERSION", "STARTED", "LEASE EXPIRES"]);
            for n in &nodes {
                table.row([
                    text(n.id.as_str()),
                    text(n.state.as_str()),
                    text(n.public_url.as_str()),
                    text(n.version.as_str()),
                    short_time(n.started.as_str()),
                    short_time(n.lease_expires.as_str()),
                ]);
            }
            table.print();
        }
    }
    Ok(())
}
