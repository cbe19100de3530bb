//! Routing a command to the node that holds a connection, and the client address behind a
//! trusted proxy.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use morrigan_protocol::records::ConnectionRecord;

use crate::bus::{BusCommand, BusError, BusReply, CommandHandler};
use crate::error::ApiError;
use crate::hub::{Closed, Hub, SendError};
use crate::state::AppState;

/// How long a REST call gives the owning node's connection to take a frame (as for a local
/// send: see `routes::connection::SEND_TIMEOUT`).
pub const REMOTE_TIMEOUT: Duration = Duration::from_secs(10);

/// Carries out bus commands against this node's hub: what the bus hands a command that
/// reached this node to (the bus never sees the hub).
pub struct HubCommands {
    pub hub: Arc<Hub>,
    /// A fenced node carries out nothing (see [`crate::lease`]).
    pub lease: Arc<crate::lease::Lease>,
    /// How long a connection may take, after taking a frame, to report its outcome.
    pub write_bound: Duration,
}

#[async_trait::async_trait]
impl CommandHandler for HubCommands {
    async fn handle(&self, command: BusCommand, take_by: tokio::time::Instant) -> BusReply {
        if !self.lease.held() {
            return BusReply::Unavailable;
        }
        match command {
            BusCommand::Send {
                connection_id,
                text,
            } => match self
                .hub
                .send(&connection_id, text, take_by, self.write_bound)
                .await
            {
                Ok(()) => BusReply::Ok,
                Err(SendError::NotHere) => BusReply::NotHere,
                Err(SendError::Closed(_)) => BusReply::Closed,
                Err(SendError::NotTaken) => BusReply::Timeout,
                Err(SendError::WriteTimeout) => BusReply::WriteTimeout,
            },
            BusCommand::Close {
                connection_id,
                code,
                reason,
            } => match self.hub.close(&connection_id, code, &reason).await {
                Closed::NotHere => BusReply::NotHere,
                Closed::Closed | Closed::Forced => BusReply::Ok,
            },
        }
    }
}

/// Delivers `command` for a connection this node does not hold, according to its record:
/// 404 unknown, 409 closed or not established, else the owning node's answer (503 when it is
/// unreachable or this node's bus is down, 504 when it gave no outcome in time). Never reports
/// success without the owner's answer, and asks the bus once: a failed request is not retried
/// (its deadlines guarantee the owner will not carry it out later).
pub async fn route(s: &AppState, id: &str, command: BusCommand) -> Result<(), ApiError> {
    // A connection never changes node, so its owner is remembered after the first lookup: a
    // repeated remote send costs no store read. A stale entry only means the owner answers
    // "not here", and the record decides.
    // Clone out of the map first: holding the shard guard across the request (or into the
    // `remove` below) would block that shard, and deadlock on the remove.
    let cached = s.owners.get(id).map(|o| o.value().clone());
    let owner: Arc<str> = match cached {
        Some(owner) => owner,
        None => {
            let record = s
                .store
                .connection(id)
                .await?
                .ok_or_else(|| ApiError::not_found("No such connection."))?;
            let owner = owner_of(s, &record)?;
            Arc::from(owner)
        }
    };
    if !s.peers.reachable(&owner) {
        return Err(ApiError::unavailable(format!(
            "Node '{owner}', which holds the connection, is not reachable (lease lapsed or no \
             answer recently); nothing was delivered."
        )));
    }
    match s.bus.request(&owner, command, REMOTE_TIMEOUT).await {
        Ok(BusReply::Ok) => {
            if s.owners.len() >= MAX_OWNERS {
                s.owners.clear();
            }
            s.owners.insert(id.to_string(), owner);
            Ok(())
        }
        Ok(BusReply::NotHere) => {
            s.owners.remove(id);
            // The owner no longer holds it: the record says whether it is closed or unknown.
            match s.store.connection(id).await? {
                None => Err(ApiError::not_found("No such connection.")),
                Some(_) => Err(ApiError::conflict("Connection closed.")),
            }
        }
        Ok(reply) => answer(reply),
        Err(e) => {
            s.owners.remove(id);
            if matches!(e, BusError::NoRoute(_)) {
                s.peers.silent(&owner);
            }
            Err(bus_error(e))
        }
    }
}

/// The node holding `record`'s socket, or why there is none.
fn owner_of<'a>(s: &AppState, record: &'a ConnectionRecord) -> Result<&'a str, ApiError> {
    if !record.open {
        return Err(ApiError::conflict("Connection closed."));
    }
    let Some(owner) = record
        .server_id
        .as_deref()
        .filter(|_| record.connected.is_some())
    else {
        return Err(ApiError::conflict(
            "Connection not established yet (token issued, socket not open).",
        ));
    };
    if owner == &*s.node_id {
        // Open in the store, gone from the hub: it is closing right now.
        return Err(ApiError::conflict("Connection closed."));
    }
    Ok(owner)
}

fn bus_error(e: BusError) -> ApiError {
    match e {
        BusError::Timeout(n) => ApiError::timeout(format!(
            "Node '{n}', which holds the connection, did not answer in time."
        )),
        BusError::NoRoute(n) => ApiError::unavailable(format!(
            "Node '{n}', which holds the connection, is not reachable; nothing was delivered."
        )),
        BusError::Unavailable => ApiError::unavailable(
            "This node's cluster bus is disconnected; nothing was delivered. Retry later.",
        ),
        BusError::Transport(e) => {
            ApiError::unavailable(format!("Cluster bus failure: {e}; nothing was delivered."))
        }
    }
}

/// How long a node that did not acknowledge a command is treated as unreachable without
/// asking it again.
const UNREACHABLE_FOR: Duration = Duration::from_secs(5);

/// What this node knows of the other nodes, so that a dead or frozen one costs a caller nothing:
/// the leases read from the store (refreshed with this node's own lease), and the nodes that
/// recently did not acknowledge a command.
#[derive(Default)]
pub struct Peers {
    /// Node id → (state, lease expiry), as of the last refresh.
    leases: std::sync::RwLock<std::collections::HashMap<String, (String, String)>>,
    unreachable: dashmap::DashMap<String, tokio::time::Instant>,
}

impl Peers {
    /// Replaces the lease table with `nodes` (read from the store).
    pub fn refresh(&self, nodes: &[crate::store::NodeRow]) {
        let table = nodes
            .iter()
            .map(|n| (n.id.clone(), (n.state.clone(), n.lease_expires.clone())))
            .collect();
        if let Ok(mut leases) = self.leases.write() {
            *leases = table;
        }
        let now = tokio::time::Instant::now();
        self.unreachable.retain(|_, until| *until > now);
    }

    /// Whether `node` may be asked: not known to be stopped, lost or past its lease, and not
    /// recently silent. A node not yet in the table is asked.
    pub fn reachable(&self, node: &str) -> bool {
        if self
            .unreachable
            .get(node)
            .is_some_and(|until| *until > tokio::time::Instant::now())
        {
            return false;
        }
        let now = morrigan_protocol::time_format::now();
        match self.leases.read() {
            Ok(leases) => match leases.get(node) {
                Some((state, expires)) => state == "running" && *expires > now,
                None => true,
            },
            Err(_) => true,
        }
    }

    /// `node` did not acknowledge a command.
    fn silent(&self, node: &str) {
        if self.unreachable.len() < MAX_OWNERS {
            self.unreachable.insert(
                node.to_string(),
                tokio::time::Instant::now() + UNREACHABLE_FOR,
            );
        }
    }
}

/// Most remembered owners (bounded: a peer chooses the ids it sends to).
const MAX_OWNERS: usize = 100_000;

fn answer(reply: BusReply) -> Result<(), ApiError> {
    match reply {
        BusReply::Ok => Ok(()),
        BusReply::NotHere | BusReply::Closed => Err(ApiError::conflict("Connection closed.")),
        BusReply::Timeout | BusReply::Received => Err(SendError::NotTaken.into()),
        BusReply::Unavailable => Err(ApiError::unavailable(
            "The node holding the connection cannot confirm its cluster lease; nothing was delivered.",
        )),
        BusReply::WriteTimeout => Err(SendError::WriteTimeout.into()),
    }
}

/// How long supersede and deprovisioning give the owning node to take a close (an owner that
/// does not acknowledge it within the bus's receipt wait is treated as gone).
const CLOSE_ANYWHERE_TIMEOUT: Duration = Duration::from_secs(3);

/// Asks whichever node holds `record` to close it; closes the record directly when no node can
/// (pending record, owner gone). Best effort, never waiting on a connection: used by supersede
/// and deprovisioning.
pub async fn close_anywhere(s: &AppState, record: &ConnectionRecord, code: u16, reason: &str) {
    if s.hub.request_close(&record.id, code, reason).is_some() {
        return;
    }
    if let Some(owner) = record.server_id.as_deref()
        && owner != &*s.node_id
        && record.connected.is_some()
        && s.peers.reachable(owner)
    {
        let command = BusCommand::Close {
            connection_id: record.id.clone(),
            code,
            reason: reason.to_string(),
        };
        match s.bus.request(owner, command, CLOSE_ANYWHERE_TIMEOUT).await {
            Ok(BusReply::Ok) => return,
            Err(BusError::NoRoute(_)) => s.peers.silent(owner),
            _ => {}
        }
    }
    let now = morrigan_protocol::time_format::now();
    let close = crate::store::CloseInfo {
        at: &now,
        code,
        reason,
    };
    // Retried until the store takes it: no node holds a socket for this record any more.
    s.records.close(&record.id, &close).await;
}

/// The client's address: the TCP peer, unless the peer is a trusted proxy, in which case the
/// nearest untrusted hop of `Forwarded: for=` or `X-Forwarded-For`.
pub fn client_address(s: &AppState, peer: SocketAddr, headers: &HeaderMap) -> String {
    let trusted = |ip: &IpAddr| s.config.trusted_proxies.iter().any(|n| n.contains(ip));
    if !trusted(&peer.ip()) {
        return peer.ip().to_string();
    }
    let mut hops: Vec<IpAddr> = Vec::new();
    for v in headers.get_all("forwarded") {
        let Ok(v) = v.to_str() else { continue };
        for element in v.split(',') {
            for pair in element.split(';') {
                if let Some((k, val)) = pair.trim().split_once('=')
                    && k.trim().eq_ignore_ascii_case("for")
                    && let Some(ip) = parse_hop(val)
                {
                    hops.push(ip);
                }
            }
        }
    }
    if hops.is_empty() {
        for v in headers.get_all("x-forwarded-for") {
            let Ok(v) = v.to_str() else { continue };
            hops.extend(v.split(',').filter_map(parse_hop));
        }
    }
    // Walk from the nearest hop back; the first untrusted one is the client.
    hops.iter()
        .rev()
        .find(|ip| !trusted(ip))
        .or(hops.first())
        .map(|ip| ip.to_string())
        .unwrap_or_else(|| peer.ip().to_string())
}

fn parse_hop(raw: &str) -> Option<IpAddr> {
    let v = raw.trim().trim_matches('"');
    if let Ok(ip) = v.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = v.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    // `[v6]` without a port.
    v.strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|r| r.parse().ok())
}
