//! Delivery: reaching a connection wherever it is. A frame or a close for a connection goes to
//! this node's hub when the socket is here, else over the bus to exactly the node its record
//! names; the answer says what happened, never a success that did not happen, and a failure
//! is never carried out later (the ticket's compare-and-swap here, the bus command's deadlines
//! there).

use std::sync::Arc;
use std::time::Duration;

use morrigan_protocol::records::ConnectionRecord;

use crate::bus::{BusCommand, BusError, BusReply};
use crate::hub::{Closed, SendError};
use crate::state::AppState;
use crate::store::{CloseInfo, StoreError};

/// How long a REST call gives the owning node's connection to take a frame (as for a local
/// send: see `routes::connection::SEND_TIMEOUT`).
pub const REMOTE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a send waits for the connection to take its frame. A frame not taken by then is
/// never written; a frame taken is written, or its socket closed, within the write timeout.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Slack over the write timeout for the connection task to report a taken frame's outcome.
const SEND_GRACE: Duration = Duration::from_secs(1);

/// Why a frame or a close did not reach its connection. Nothing was delivered, and nothing will
/// be, unless the variant says the outcome is unknown ([`DeliveryError::NoAnswer`]).
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("No such connection.")]
    NotFound,
    /// The connection is closed (with this close code, if known) or closing.
    #[error("Connection closed.")]
    Closed(Option<u16>),
    /// Token issued, socket not open yet.
    #[error("Connection not established yet (token issued, socket not open).")]
    NotEstablished,
    /// The connection did not take the frame before the deadline; it will never be written.
    #[error(
        "The connection did not take the message in time; it was not delivered and will not be."
    )]
    NotTaken,
    /// The device did not read the frame within the write timeout; its socket was dropped.
    #[error("The device did not read within the write timeout; its connection was closed (4008).")]
    WriteTimeout,
    /// The owning node acknowledged the command but gave no outcome in time: unknown.
    #[error("Node '{0}', which holds the connection, did not answer in time.")]
    NoAnswer(String),
    /// The owning node is not reachable: nothing was delivered.
    #[error("Node '{0}', which holds the connection, is not reachable; nothing was delivered.")]
    Unreachable(String),
    /// This node's bus is disconnected: nothing was sent.
    #[error("This node's cluster bus is disconnected; nothing was delivered. Retry later.")]
    BusDown,
    #[error("Cluster bus failure: {0}; nothing was delivered.")]
    Bus(String),
    /// This node cannot confirm its lease: it delivers nothing.
    #[error("This node cannot confirm its cluster lease; nothing was delivered. Retry.")]
    Fenced,
    /// The owning node cannot confirm its lease: it did nothing.
    #[error(
        "The node holding the connection cannot confirm its cluster lease; nothing was delivered."
    )]
    OwnerFenced,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<SendError> for DeliveryError {
    fn from(e: SendError) -> Self {
        match e {
            SendError::NotHere | SendError::Closed(None) => DeliveryError::Closed(None),
            SendError::Closed(code) => DeliveryError::Closed(code),
            SendError::NotTaken => DeliveryError::NotTaken,
            SendError::WriteTimeout => DeliveryError::WriteTimeout,
        }
    }
}

impl From<BusError> for DeliveryError {
    fn from(e: BusError) -> Self {
        match e {
            BusError::Timeout(n) => DeliveryError::NoAnswer(n),
            BusError::NoRoute(n) => DeliveryError::Unreachable(n),
            BusError::Unavailable => DeliveryError::BusDown,
            BusError::Transport(e) => DeliveryError::Bus(e),
        }
    }
}

/// Writes `text` (exactly as given) to connection `id`, wherever it is; `Ok` once it is on the
/// socket.
pub async fn send(s: &AppState, id: &str, text: String) -> Result<(), DeliveryError> {
    if !s.lease.held() {
        return Err(DeliveryError::Fenced);
    }
    let take_by = tokio::time::Instant::now() + SEND_TIMEOUT;
    let write_bound = s.config.effective_write_timeout() + SEND_GRACE;
    match s.hub.send(id, text.clone(), take_by, write_bound).await {
        Ok(()) => Ok(()),
        Err(SendError::NotHere) => {
            let command = BusCommand::Send {
                connection_id: id.to_string(),
                text,
            };
            route(s, id, command).await
        }
        Err(e) => Err(e.into()),
    }
}

/// Closes connection `id` with `code` and `reason`, wherever it is; a pending record (token
/// issued, unused) is closed too, which invalidates its token. `Ok` once the record is closed.
pub async fn close(s: &AppState, id: &str, code: u16, reason: &str) -> Result<(), DeliveryError> {
    if s.hub.close(id, code, reason).await != Closed::NotHere {
        return Ok(());
    }
    if let Some(r) = s.store.connection(id).await?
        && r.open
        && r.connected.is_none()
    {
        let now = morrigan_protocol::time_format::now();
        s.store
            .close_connection(
                id,
                &CloseInfo {
                    at: &now,
                    code,
                    reason,
                },
            )
            .await?;
        return Ok(());
    }
    let command = BusCommand::Close {
        connection_id: id.to_string(),
        code,
        reason: reason.to_string(),
    };
    route(s, id, command).await
}

/// Delivers `command` for a connection this node does not hold, according to its record:
/// 404 unknown, 409 closed or not established, else the owning node's answer (503 when it is
/// unreachable or this node's bus is down, 504 when it gave no outcome in time). Never reports
/// success without the owner's answer, and asks the bus once: a failed request is not retried
/// (its deadlines guarantee the owner will not carry it out later).
async fn route(s: &AppState, id: &str, command: BusCommand) -> Result<(), DeliveryError> {
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
                .ok_or(DeliveryError::NotFound)?;
            let owner = owner_of(s, &record)?;
            Arc::from(owner)
        }
    };
    if !s.peers.reachable(&owner) {
        return Err(DeliveryError::Unreachable(owner.to_string()));
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
                None => Err(DeliveryError::NotFound),
                Some(_) => Err(DeliveryError::Closed(None)),
            }
        }
        Ok(reply) => answer(reply),
        Err(e) => {
            s.owners.remove(id);
            if matches!(e, BusError::NoRoute(_)) {
                s.peers.silent(&owner);
            }
            Err(e.into())
        }
    }
}

/// The node holding `record`'s socket, or why there is none.
fn owner_of<'a>(s: &AppState, record: &'a ConnectionRecord) -> Result<&'a str, DeliveryError> {
    if !record.open {
        return Err(DeliveryError::Closed(record.close_code));
    }
    let Some(owner) = record
        .server_id
        .as_deref()
        .filter(|_| record.connected.is_some())
    else {
        return Err(DeliveryError::NotEstablished);
    };
    if owner == &*s.node_id {
        // Open in the store, gone from the hub: it is closing right now.
        return Err(DeliveryError::Closed(None));
    }
    Ok(owner)
}

/// Most remembered owners (bounded: a peer chooses the ids it sends to).
const MAX_OWNERS: usize = 100_000;

fn answer(reply: BusReply) -> Result<(), DeliveryError> {
    match reply {
        BusReply::Ok => Ok(()),
        BusReply::NotHere | BusReply::Closed => Err(DeliveryError::Closed(None)),
        BusReply::Timeout | BusReply::Received => Err(DeliveryError::NotTaken),
        BusReply::Unavailable => Err(DeliveryError::OwnerFenced),
        BusReply::WriteTimeout => Err(DeliveryError::WriteTimeout),
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
    let close = CloseInfo {
        at: &now,
        code,
        reason,
    };
    // Retried until the store takes it: no node holds a socket for this record any more.
    s.records.close(&record.id, &close).await;
}
