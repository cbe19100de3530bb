//! Fencing: what this node may do, judged by its own clock.
//!
//! In a cluster, a node whose lease lapses is declared lost by the others, who close its
//! records. A node that stalled (a paused process, a frozen VM) must not wake up and keep
//! writing to sockets whose records say they are closed. So the node acts only while *its own
//! monotonic clock* says its lease is current: the lease it last renewed, minus a margin for
//! clock drift between nodes, measured from when the renewal was *sent*. Past that instant the
//! node is fenced: its connections take no frames and write nothing (not even a ping or a close
//! frame), its bus handler refuses commands, and new connections are refused, until a renewal
//! succeeds. If the renewal finds the node declared lost, its sockets are dropped without a
//! close frame, which is what the survivors recorded (1006).
//!
//! A node alone on its store (SQLite, the in-process bus) cannot be declared lost by anyone
//! and is never fenced.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// This node's lease as far as it can vouch for it.
pub struct Lease {
    enabled: bool,
    /// The origin of `held_until`.
    epoch: Instant,
    /// Until when (milliseconds since `epoch`) the node may act.
    held_until: AtomicU64,
    /// Wakes fenced connections when the lease is confirmed again.
    renewed: Notify,
}

impl Lease {
    /// A lease that fences only when `enabled` (a node sharing its store with others).
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            epoch: Instant::now(),
            held_until: AtomicU64::new(0),
            renewed: Notify::new(),
        }
    }

    /// How much of a lease a node trusts: a fifth is kept back for clock drift between nodes.
    fn trusted(lease: Duration) -> Duration {
        lease - lease / 5
    }

    fn ms(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// The store accepted a renewal (or registration) of `lease` that was sent at `sent`.
    pub fn renewed(&self, sent: Instant, lease: Duration) {
        let until = self.ms(sent + Self::trusted(lease));
        self.held_until.fetch_max(until, Ordering::AcqRel);
        self.renewed.notify_waiters();
    }

    /// Whether the node may act now (always, when fencing is off).
    #[inline]
    pub fn held(&self) -> bool {
        !self.enabled || self.ms(Instant::now()) < self.held_until.load(Ordering::Acquire)
    }

    /// Resolves at the next confirmed renewal.
    pub async fn confirmed(&self) {
        let wait = self.renewed.notified();
        if self.held() {
            return;
        }
        wait.await;
    }

    /// The node was declared lost: it is fenced until the next renewal.
    pub fn lost(&self) {
        self.held_until.store(0, Ordering::Release);
    }
}
