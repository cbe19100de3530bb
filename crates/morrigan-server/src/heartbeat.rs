//! Coalesced heartbeat persistence.
//!
//! A pong must not cost a database write (at 100k connections and a 30 s interval that would be
//! 3,300 writes/s of pure bookkeeping). Instead a connection task marks its [`Liveness`] dirty
//! and, on the clean→dirty edge only, queues its id here; the flusher writes everything queued
//! in one transaction every [`FLUSH_PERIOD`]. A record's `lastHeartbeat` therefore lags the
//! socket by at most one flush period while the store answers; a flush it does not take is
//! retried by [`Records`] until it lands.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::hub::Liveness;
use crate::records::Records;
use crate::store::Heartbeat;

/// How often queued heartbeats are written.
pub const FLUSH_PERIOD: Duration = Duration::from_secs(2);

/// The flusher's end of the queue: connections whose liveness changed since the last flush.
pub type QueueReceiver = mpsc::UnboundedReceiver<(Arc<str>, Arc<Liveness>)>;

/// Cheap handle that connection tasks use to queue their liveness for writing.
#[derive(Clone)]
pub struct HeartbeatQueue {
    tx: mpsc::UnboundedSender<(Arc<str>, Arc<Liveness>)>,
}

impl HeartbeatQueue {
    /// Queues `liveness` for the next flush unless it is already queued.
    pub fn mark(&self, id: &Arc<str>, liveness: &Arc<Liveness>) {
        if !liveness.dirty.swap(true, Ordering::AcqRel) {
            let _ = self.tx.send((id.clone(), liveness.clone()));
        }
    }
}

/// Creates the queue and its receiving end.
pub fn queue() -> (HeartbeatQueue, QueueReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    (HeartbeatQueue { tx }, rx)
}

fn drain(rx: &mut QueueReceiver) -> Vec<Heartbeat> {
    let mut beats = Vec::new();
    while let Ok((id, l)) = rx.try_recv() {
        l.dirty.store(false, Ordering::Release);
        let ms = l.last_pong_ms.load(Ordering::Acquire);
        let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
            .ok()
            .map(morrigan_protocol::time_format::format);
        beats.push(Heartbeat {
            connection_id: id.to_string(),
            alive: l.alive.load(Ordering::Acquire),
            last_heartbeat: at,
        });
    }
    beats
}

/// Runs the flusher until `stop` is cancelled, then flushes once more.
pub async fn run_flusher(records: Records, mut rx: QueueReceiver, stop: CancellationToken) {
    let mut tick = tokio::time::interval(FLUSH_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        records.heartbeats(drain(&mut rx)).await;
    }
    records.heartbeats(drain(&mut rx)).await;
}
