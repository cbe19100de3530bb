//! The local hub: every WebSocket this node holds, by connection id.
//!
//! A sharded map (`DashMap`) so that connects, sends and closes on different connections never
//! contend on one lock. Each entry is a handle to the connection's own task: a small bounded
//! command channel (the task owns the socket, so nothing else ever writes to it) and the shared
//! heartbeat state the flusher reads.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{mpsc, oneshot};

/// Commands a connection task accepts.
#[derive(Debug)]
pub enum Command {
    /// Write this text frame, then acknowledge.
    Send {
        text: String,
        ack: oneshot::Sender<()>,
    },
    /// Close the socket with this code and reason; `done` fires once the record is written.
    Close {
        code: u16,
        reason: String,
        done: Option<oneshot::Sender<()>>,
    },
}

/// State shared between a connection task and the heartbeat flusher. Atomics only: a pong
/// costs two stores and, at most once per flush period, one channel push.
#[derive(Debug)]
pub struct Liveness {
    /// Unix milliseconds of the last pong (or of the accept).
    pub last_pong_ms: AtomicI64,
    pub alive: AtomicBool,
    /// Queued for the next flush.
    pub dirty: AtomicBool,
}

impl Liveness {
    pub fn new(now_ms: i64) -> Self {
        Self {
            last_pong_ms: AtomicI64::new(now_ms),
            alive: AtomicBool::new(true),
            dirty: AtomicBool::new(false),
        }
    }
}

/// A handle to one live connection's task.
#[derive(Debug, Clone)]
pub struct ConnHandle {
    pub client_id: Arc<str>,
    /// Commands are boxed: the channel allocates its first block of 32 slots up front, so a
    /// pointer-sized slot keeps that block at 256 bytes per connection instead of 1.5 KiB.
    pub tx: mpsc::Sender<Box<Command>>,
    pub liveness: Arc<Liveness>,
}

/// Why a send to a local connection failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SendError {
    #[error("connection is not held by this node")]
    NotHere,
    #[error("connection closed before the frame was written")]
    Closed,
    #[error("connection did not accept the frame in time")]
    Timeout,
}

/// All connections held by this node.
#[derive(Default)]
pub struct Hub {
    conns: DashMap<Arc<str>, ConnHandle>,
    /// The newest local connection of each client (one live connection per client).
    newest: DashMap<Arc<str>, Arc<str>>,
}

impl Hub {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a connection and makes it its client's newest; returns the local connection it
    /// replaces as the newest, if any (which the caller supersedes). Of racing inserts for one
    /// client, each replaces exactly the one before it, so exactly one stays the newest.
    pub fn insert(&self, id: Arc<str>, handle: ConnHandle) -> Option<Arc<str>> {
        let client = handle.client_id.clone();
        self.conns.insert(id.clone(), handle);
        self.newest.insert(client, id)
    }

    /// Removes `id` if it is still the entry created with `tx` (a task only removes itself).
    pub fn remove(&self, id: &str, tx: &mpsc::Sender<Box<Command>>) {
        if let Some((_, handle)) = self.conns.remove_if(id, |_, h| h.tx.same_channel(tx)) {
            self.newest
                .remove_if(&handle.client_id, |_, newest| &**newest == id);
        }
    }

    pub fn get(&self, id: &str) -> Option<ConnHandle> {
        self.conns.get(id).map(|h| h.clone())
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Writes `text` on connection `id` and waits until the frame was written to the socket.
    pub async fn send(&self, id: &str, text: String, timeout: Duration) -> Result<(), SendError> {
        let handle = self.get(id).ok_or(SendError::NotHere)?;
        let (ack, done) = oneshot::channel();
        let deadline = tokio::time::Instant::now() + timeout;
        match tokio::time::timeout_at(
            deadline,
            handle.tx.send(Box::new(Command::Send { text, ack })),
        )
        .await
        {
            Err(_) => return Err(SendError::Timeout),
            Ok(Err(_)) => return Err(SendError::Closed),
            Ok(Ok(())) => {}
        }
        match tokio::time::timeout_at(deadline, done).await {
            Err(_) => Err(SendError::Timeout),
            Ok(Err(_)) => Err(SendError::Closed),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Asks connection `id` to close. Returns false if it is not held here.
    pub async fn close(
        &self,
        id: &str,
        code: u16,
        reason: &str,
        done: Option<oneshot::Sender<()>>,
    ) -> bool {
        let Some(handle) = self.get(id) else {
            return false;
        };
        // A full queue means the task is busy; the close still gets through, just later.
        handle
            .tx
            .send(Box::new(Command::Close {
                code,
                reason: reason.to_string(),
                done,
            }))
            .await
            .is_ok()
    }

    /// Asks every connection to close (shutdown).
    pub async fn close_all(&self, code: u16, reason: &str) {
        let handles: Vec<ConnHandle> = self.conns.iter().map(|e| e.value().clone()).collect();
        for h in handles {
            let cmd = Box::new(Command::Close {
                code,
                reason: reason.to_string(),
                done: None,
            });
            if let Err(mpsc::error::TrySendError::Full(cmd)) = h.tx.try_send(cmd) {
                let _ = h.tx.send(cmd).await;
            }
        }
    }

    /// Ids of local connections of `client_id`.
    pub fn ids_of_client(&self, client_id: &str) -> Vec<Arc<str>> {
        self.conns
            .iter()
            .filter(|e| &*e.value().client_id == client_id)
            .map(|e| e.key().clone())
            .collect()
    }
}
