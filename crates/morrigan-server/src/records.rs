//! Records that must become true, even when the store is unreachable as they are written.
//!
//! A connection's closed record, and the heartbeats before it, cannot be written again later by
//! anyone else: if the write fails and is dropped, the record says `open:true, alive:true`
//! forever. [`Records`] writes them at once when it can; when that fails (or while earlier
//! writes are still waiting) it keeps them, at most one close per connection and the latest
//! heartbeat per connection, and one task retries them with capped backoff until they land.
//! Callers never wait longer than one store call (itself bounded by the store deadline).
//!
//! Order: nothing is written directly while something is waiting, and each retry round writes
//! the waiting heartbeats before the waiting closes, so a record's writes land in the order
//! they were made. A heartbeat only updates an open record (`record_heartbeats` requires
//! `open`), and a close only an open one, so a write that lands late never reopens a record or
//! marks a closed one alive. Both are idempotent: landing twice (a timed-out call that still
//! went through, then its retry) changes nothing.
//!
//! At shutdown [`Records::drain`] retries what is left until a deadline. Whatever is still
//! waiting then is closed by the node's next start (crash recovery closes every record it left
//! open) or, in a cluster, by the node that reaps its lapsed lease.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::store::{CloseInfo, ConnectionStore, Heartbeat};

/// First delay between retry rounds after a failed one; doubled up to [`RETRY_CAP`].
const RETRY_BASE: Duration = Duration::from_millis(250);
/// Longest delay between retry rounds: once the store is back, every waiting record lands
/// within this (plus one round).
pub const RETRY_CAP: Duration = Duration::from_secs(2);
/// Heartbeats per store call in a retry round (a backlog is written in short transactions).
const BEATS_PER_CALL: usize = 1024;
/// Closes in flight at once in a retry round (the store batches concurrent closes).
const CLOSES_PER_ROUND: usize = 256;

/// Whether a write reached the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// It is in the store.
    Now,
    /// The store did not take it (or older writes are waiting): it will be retried until it
    /// lands.
    Queued,
}

/// A close waiting to be written.
#[derive(Debug, Clone)]
struct Close {
    at: String,
    code: u16,
    reason: String,
}

/// What waits, by connection id, each with the sequence number of its last change (a write
/// that landed is forgotten only if nothing replaced it meanwhile).
#[derive(Default)]
struct Pending {
    seq: u64,
    closes: HashMap<String, (u64, Close)>,
    beats: HashMap<String, (u64, Heartbeat)>,
    /// Set by [`Records::drain`]: the task stops once nothing waits or this instant passes.
    drain_until: Option<Instant>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.closes.is_empty() && self.beats.is_empty()
    }

    fn len(&self) -> usize {
        self.closes.len() + self.beats.len()
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }
}

struct Shared {
    store: Arc<dyn ConnectionStore>,
    pending: Mutex<Pending>,
    /// Something was queued.
    wake: Notify,
    /// [`Records::drain`] began: cut the backoff short.
    draining: Notify,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// The writer of closed records and heartbeats (cheap to clone).
#[derive(Clone)]
pub struct Records {
    shared: Arc<Shared>,
}

impl Records {
    /// Starts the retry task (it idles until something waits).
    pub fn start(store: Arc<dyn ConnectionStore>) -> Records {
        let shared = Arc::new(Shared {
            store,
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            draining: Notify::new(),
            task: Mutex::new(None),
        });
        let task = tokio::spawn(retry(shared.clone()));
        if let Ok(mut slot) = shared.task.lock() {
            *slot = Some(task);
        }
        Records { shared }
    }

    /// Closes connection `id`'s record (if it is still open): at once if the store takes it,
    /// else queued and retried until it lands. Waits at most one store call.
    pub async fn close(&self, id: &str, close: &CloseInfo<'_>) -> Written {
        if self.idle() {
            match self.shared.store.close_connection(id, close).await {
                Ok(_) => return Written::Now,
                Err(e) => {
                    tracing::warn!(error = %e, connection = %id, "could not write a closed record; retrying until the store takes it");
                }
            }
        }
        self.with_pending(|p| {
            if !p.closes.contains_key(id) {
                let seq = p.next_seq();
                let close = Close {
                    at: close.at.to_string(),
                    code: close.code,
                    reason: close.reason.to_string(),
                };
                p.closes.insert(id.to_string(), (seq, close));
            }
        });
        Written::Queued
    }

    /// Writes a flush of coalesced heartbeats: at once if the store takes them, else each
    /// replaces the one waiting for its connection and they are retried until they land.
    pub async fn heartbeats(&self, beats: Vec<Heartbeat>) -> Written {
        if beats.is_empty() {
            return Written::Now;
        }
        if self.idle() {
            match self.shared.store.record_heartbeats(&beats).await {
                Ok(()) => return Written::Now,
                Err(e) => {
                    tracing::warn!(error = %e, count = beats.len(), "heartbeat flush failed; retrying until the store takes it");
                }
            }
        }
        self.with_pending(|p| {
            for beat in beats {
                let seq = p.next_seq();
                p.beats.insert(beat.connection_id.clone(), (seq, beat));
            }
        });
        Written::Queued
    }

    /// How many writes are waiting.
    pub fn waiting(&self) -> usize {
        self.shared.pending.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// Retries what is waiting until it has all landed or `until` passes, then stops the retry
    /// task; returns how many writes were left unwritten.
    pub async fn drain(&self, until: Instant) -> usize {
        self.with_pending(|p| p.drain_until = Some(until));
        self.shared.draining.notify_one();
        let task = self.shared.task.lock().ok().and_then(|mut t| t.take());
        if let Some(mut task) = task
            && tokio::time::timeout_at(until, &mut task).await.is_err()
        {
            task.abort();
        }
        let left = self.waiting();
        if left > 0 {
            tracing::error!(
                left,
                "the store did not take every closed record before the deadline; the next start closes them"
            );
        }
        left
    }

    /// Nothing waits: a write may go straight to the store without overtaking an older one.
    fn idle(&self) -> bool {
        self.shared
            .pending
            .lock()
            .map(|p| p.is_empty())
            .unwrap_or(false)
    }

    fn with_pending(&self, f: impl FnOnce(&mut Pending)) {
        if let Ok(mut p) = self.shared.pending.lock() {
            f(&mut p);
        }
        self.shared.wake.notify_one();
    }
}

/// The retry task: rounds until nothing waits, backing off while rounds fail.
async fn retry(shared: Arc<Shared>) {
    let mut backoff = RETRY_BASE;
    let mut failing = false;
    loop {
        // Wait for work (or for the drain to finish).
        loop {
            let woken = shared.wake.notified();
            let (empty, drain_until) = match shared.pending.lock() {
                Ok(p) => (p.is_empty(), p.drain_until),
                Err(_) => return,
            };
            if !empty {
                break;
            }
            if drain_until.is_some() {
                return;
            }
            woken.await;
        }
        let waiting = shared.pending.lock().map(|p| p.len()).unwrap_or(0);
        if round(&shared).await {
            if failing {
                tracing::info!(
                    written = waiting,
                    "the store is back: waiting records written"
                );
            }
            failing = false;
            backoff = RETRY_BASE;
            continue;
        }
        failing = true;
        let drain_until = shared.pending.lock().ok().and_then(|p| p.drain_until);
        let mut next = Instant::now() + backoff;
        if let Some(until) = drain_until {
            if Instant::now() >= until {
                return;
            }
            next = next.min(until);
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = shared.draining.notified(), if drain_until.is_none() => {}
        }
        backoff = (backoff * 2).min(RETRY_CAP);
    }
}

/// Writes what waits, heartbeats first; true if everything landed.
async fn round(shared: &Shared) -> bool {
    let (beats, closes) = match shared.pending.lock() {
        Ok(p) => (
            p.beats
                .iter()
                .map(|(id, (seq, b))| (id.clone(), *seq, b.clone()))
                .collect::<Vec<_>>(),
            p.closes
                .iter()
                .map(|(id, (seq, c))| (id.clone(), *seq, c.clone()))
                .collect::<Vec<_>>(),
        ),
        Err(_) => return false,
    };
    for chunk in beats.chunks(BEATS_PER_CALL) {
        let batch: Vec<Heartbeat> = chunk.iter().map(|(_, _, b)| b.clone()).collect();
        if let Err(e) = shared.store.record_heartbeats(&batch).await {
            tracing::debug!(error = %e, "retrying heartbeats failed");
            return false;
        }
        if let Ok(mut p) = shared.pending.lock() {
            for (id, seq, _) in chunk {
                if p.beats.get(id).is_some_and(|(s, _)| s == seq) {
                    p.beats.remove(id);
                }
            }
        }
    }
    let mut all = true;
    for chunk in closes.chunks(CLOSES_PER_ROUND) {
        let writes = chunk.iter().map(|(id, _, c)| {
            let info = CloseInfo {
                at: &c.at,
                code: c.code,
                reason: &c.reason,
            };
            async move { shared.store.close_connection(id, &info).await }
        });
        let results = futures_util::future::join_all(writes).await;
        if let Ok(mut p) = shared.pending.lock() {
            for ((id, seq, _), result) in chunk.iter().zip(results) {
                match result {
                    Ok(_) if p.closes.get(id).is_some_and(|(s, _)| s == seq) => {
                        p.closes.remove(id);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, connection = %id, "retrying a closed record failed");
                        all = false;
                    }
                }
            }
        }
        if !all {
            return false;
        }
    }
    true
}
