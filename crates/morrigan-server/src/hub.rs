//! The local hub: every WebSocket this node holds, by connection id.
//!
//! A sharded map (`DashMap`) so that connects, sends and closes on different connections never
//! contend on one lock. Each entry is a handle to the connection's own task: a small bounded
//! channel of frames to write (the task owns the socket, so nothing else ever writes to it), the
//! shared heartbeat state the flusher reads, and a [`Control`] through which a close reaches the
//! task without waiting behind its queued frames.
//!
//! Nothing here waits on a connection for longer than a stated bound: a send waits for its
//! frame to be taken until its deadline, a close waits [`CLOSE_GRACE`] for the task to end and
//! then forces it (the task drops its socket at once and writes its record).

use std::sync::atomic::{AtomicBool, AtomicI64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

pub use crate::ticket::SendError;
use crate::ticket::{TicketWriter, ticket};

/// A frame for a connection task to write.
pub struct Outgoing {
    pub text: String,
    /// Taken before writing; reports the outcome to the sender.
    pub ticket: TicketWriter,
}

/// How long a close waits for the connection task to end on its own (close handshake included)
/// before forcing it.
pub const CLOSE_GRACE: Duration = Duration::from_secs(4);
/// How long a forced connection task may take to write its record before the closer answers.
const FORCE_WAIT: Duration = Duration::from_secs(4);
/// Frames queued per connection before senders wait (small: a frame is taken as soon as the
/// previous one reached the socket).
const COMMAND_QUEUE: usize = 8;

/// State shared between a connection task and the heartbeat flusher. Atomics only: a pong
/// costs two stores and, at most once per flush period, one channel push.
#[derive(Debug)]
pub struct Liveness {
    /// Unix milliseconds of the last pong (or of the accept).
    pub last_pong_ms: AtomicI64,
    pub alive: AtomicBool,
    /// Queued for the next flush.
    pub dirty: AtomicBool,
    /// The connection's client, set by its session when it starts: lets a tracked send to a
    /// connection held here skip reading its record.
    pub client: std::sync::OnceLock<Arc<str>>,
}

impl Liveness {
    pub fn new(now_ms: i64) -> Self {
        Self {
            last_pong_ms: AtomicI64::new(now_ms),
            alive: AtomicBool::new(true),
            dirty: AtomicBool::new(false),
            client: std::sync::OnceLock::new(),
        }
    }
}

/// A requested close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseRequest {
    pub code: u16,
    pub reason: String,
}

#[derive(Default)]
struct ControlState {
    close: Option<CloseRequest>,
    kill: bool,
    ended: bool,
    done: Vec<oneshot::Sender<()>>,
}

/// The out-of-band channel to a connection task: close requests (which must not queue behind
/// frames a slow device is not reading) and the forced end.
#[derive(Default)]
pub struct Control {
    state: Mutex<ControlState>,
    /// Wakes the task's loop for a close request.
    close: Notify,
    /// Wakes the task's outer select for a forced end.
    kill: Notify,
}

impl Control {
    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        // A panic while holding this lock cannot leave it inconsistent (plain field writes).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the task to close; the first request's code and reason win. Returns a receiver
    /// that fires once the task has written its record, or `None` if it already ended.
    pub fn request_close(&self, code: u16, reason: &str) -> Option<oneshot::Receiver<()>> {
        let (tx, rx) = oneshot::channel();
        {
            let mut s = self.lock();
            if s.ended {
                return None;
            }
            if s.close.is_none() {
                s.close = Some(CloseRequest {
                    code,
                    reason: reason.to_string(),
                });
            }
            s.done.push(tx);
        }
        self.close.notify_one();
        Some(rx)
    }

    /// Ends the task at once: its socket is dropped without a close handshake and its record
    /// written with the requested close code.
    pub fn kill(&self) {
        self.lock().kill = true;
        self.kill.notify_one();
    }

    /// Ends the task at once with `code` and `reason` recorded and no close frame sent: the
    /// node was declared lost and its records already say so.
    pub fn abandon(&self, code: u16, reason: &str) {
        {
            let mut s = self.lock();
            if s.close.is_none() {
                s.close = Some(CloseRequest {
                    code,
                    reason: reason.to_string(),
                });
            }
            s.kill = true;
        }
        self.kill.notify_one();
    }

    /// The pending close request, if any (task side).
    pub fn close_requested(&self) -> Option<CloseRequest> {
        self.lock().close.clone()
    }

    /// Resolves when a close is requested (task side; a request made earlier counts).
    pub async fn close_signal(&self) {
        loop {
            if self.lock().close.is_some() {
                return;
            }
            self.close.notified().await;
        }
    }

    /// Resolves when the task must end at once (task side).
    pub async fn kill_signal(&self) {
        loop {
            if self.lock().kill {
                return;
            }
            self.kill.notified().await;
        }
    }

    /// The task ended and its record is written: release every closer (task side).
    pub fn finish(&self) {
        let done = {
            let mut s = self.lock();
            s.ended = true;
            std::mem::take(&mut s.done)
        };
        for d in done {
            let _ = d.send(());
        }
    }
}

/// A handle to one live connection's task.
#[derive(Clone)]
pub struct ConnHandle {
    /// Frames are boxed: the channel allocates its first block of 32 slots up front, so a
    /// pointer-sized slot keeps that block small.
    pub tx: mpsc::Sender<Box<Outgoing>>,
    pub liveness: Arc<Liveness>,
    pub control: Arc<Control>,
}

/// A connection registered in the hub whose session has not started. Dropped unused (the
/// accept failed, the upgrade never happened), it leaves the hub and releases any closer.
pub struct Reservation {
    hub: Arc<Hub>,
    id: Arc<str>,
    handle: Option<ConnHandle>,
    rx: Option<mpsc::Receiver<Box<Outgoing>>>,
}

/// What a session takes over from its reservation.
pub struct Registered {
    pub id: Arc<str>,
    pub handle: ConnHandle,
    pub rx: mpsc::Receiver<Box<Outgoing>>,
}

impl Reservation {
    /// The close requested while the connection was reserved, if any.
    pub fn close_requested(&self) -> Option<CloseRequest> {
        self.handle.as_ref()?.control.close_requested()
    }

    /// Hands the registration to the session, which removes it when it ends.
    pub fn start(mut self) -> Option<Registered> {
        let handle = self.handle.take()?;
        let rx = self.rx.take()?;
        Some(Registered {
            id: self.id.clone(),
            handle,
            rx,
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            self.hub.remove(&self.id, &handle.tx, None);
            handle.control.finish();
        }
    }
}

/// How a close ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// No such connection here.
    NotHere,
    /// The connection closed (handshake or not) and its record was written.
    Done,
    /// The connection did not end within [`CLOSE_GRACE`] and was forced; its record is
    /// written, or queued for writing if the store did not answer in time.
    Forced,
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

    /// Registers connection `id` before its token is consumed, so that anything that closes
    /// it from then on (a deprovisioning, a DELETE, shutdown) finds it here: whoever closes a
    /// record first and looks in the hub second either finds this entry or made the accept
    /// fail. `None` if an entry with that id exists (a replay racing the first use).
    pub fn reserve(self: &Arc<Self>, id: &str, now_ms: i64) -> Option<Reservation> {
        let id: Arc<str> = Arc::from(id);
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let handle = ConnHandle {
            tx,
            liveness: Arc::new(Liveness::new(now_ms)),
            control: Arc::new(Control::default()),
        };
        match self.conns.entry(id.clone()) {
            dashmap::Entry::Occupied(_) => return None,
            dashmap::Entry::Vacant(v) => {
                v.insert(handle.clone());
            }
        }
        Some(Reservation {
            hub: self.clone(),
            id,
            handle: Some(handle),
            rx: Some(rx),
        })
    }

    /// Makes `id` its client's newest local connection; returns the one it replaces, if any
    /// (which the caller supersedes). Of racing promotions for one client, each replaces
    /// exactly the one before it, so exactly one stays the newest.
    pub fn promote(&self, id: &Arc<str>, client_id: &Arc<str>) -> Option<Arc<str>> {
        self.newest.insert(client_id.clone(), id.clone())
    }

    /// The client of connection `id`, if its session runs here.
    pub fn client_of(&self, id: &str) -> Option<Arc<str>> {
        self.conns.get(id)?.liveness.client.get().cloned()
    }

    /// Removes `id` if it is still the entry created with `tx` (a task only removes itself),
    /// and as `client_id`'s newest if it was promoted.
    pub fn remove(&self, id: &str, tx: &mpsc::Sender<Box<Outgoing>>, client_id: Option<&str>) {
        if self
            .conns
            .remove_if(id, |_, h| h.tx.same_channel(tx))
            .is_some()
            && let Some(client) = client_id
        {
            self.newest.remove_if(client, |_, newest| &**newest == id);
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

    /// Writes `text` on connection `id`. The frame must be taken by the connection before
    /// `take_by` (else [`SendError::NotTaken`]: it is never written); once taken it is written,
    /// or the socket closed, within the connection's write timeout (`write_bound` bounds that
    /// wait). Answers 200-worthy `Ok` only once the frame is on the socket.
    pub async fn send(
        &self,
        id: &str,
        text: String,
        take_by: Instant,
        write_bound: Duration,
    ) -> Result<(), SendError> {
        let handle = self.get(id).ok_or(SendError::NotHere)?;
        let (ticket, writer) = ticket();
        let frame = Box::new(Outgoing {
            text,
            ticket: writer,
        });
        match tokio::time::timeout_at(take_by, handle.tx.send(frame)).await {
            // Never queued: the frame was dropped with the send future.
            Err(_) => return Err(SendError::NotTaken),
            Ok(Err(_)) => return Err(SendError::Closed(None)),
            Ok(Ok(())) => {}
        }
        ticket.wait(take_by, write_bound).await
    }

    /// Asks connection `id` to close with `code` and `reason`, without waiting. Returns the
    /// receiver that fires once its record is written, or `None` if it is not held here.
    pub fn request_close(
        &self,
        id: &str,
        code: u16,
        reason: &str,
    ) -> Option<(Arc<Control>, Option<oneshot::Receiver<()>>)> {
        let handle = self.get(id)?;
        let done = handle.control.request_close(code, reason);
        Some((handle.control, done))
    }

    /// Closes connection `id` and waits until its record is written: at most [`CLOSE_GRACE`]
    /// for a graceful close, then the task is forced, then at most a few seconds more.
    pub async fn close(&self, id: &str, code: u16, reason: &str) -> Closed {
        let Some((control, done)) = self.request_close(id, code, reason) else {
            return Closed::NotHere;
        };
        let Some(mut done) = done else {
            return Closed::Done;
        };
        if tokio::time::timeout(CLOSE_GRACE, &mut done).await.is_ok() {
            return Closed::Done;
        }
        tracing::warn!(connection = %id, "connection did not close in time; forcing it");
        control.kill();
        let _ = tokio::time::timeout(FORCE_WAIT, done).await;
        Closed::Forced
    }

    /// Asks every connection to close (shutdown), without waiting on any of them.
    pub fn close_all(&self, code: u16, reason: &str) {
        for entry in self.conns.iter() {
            let _ = entry.value().control.request_close(code, reason);
        }
    }

    /// Drops every connection at once without a close frame, recording `code` and `reason`
    /// (the node was declared lost).
    pub fn abandon_all(&self, code: u16, reason: &str) {
        for entry in self.conns.iter() {
            entry.value().control.abandon(code, reason);
        }
    }

    /// Forces every remaining connection to end at once (shutdown past its grace period).
    pub fn kill_all(&self) {
        for entry in self.conns.iter() {
            entry.value().control.kill();
        }
    }
}
