//! Operators waiting for a message's answer, and what tells them: every state change of a
//! message is a `message` event on the cluster bus, which each node hands to [`Signals`]; the
//! node where the answer arrives also tells its own waiters at once.
//!
//! Events are a fast path, not the truth: a waiter also re-reads the store every
//! [`POLL`] and at its deadline, so an event lost on the way (a full publish queue, a bus
//! outage) costs latency, never a wrong answer.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use morrigan_protocol::events::{ConnectionEvent, kinds};
use morrigan_protocol::messages::MessageState;
use serde_json::Value;
use tokio::sync::Notify;

/// How often a waiter re-reads the message when no event came.
pub const POLL: Duration = Duration::from_secs(1);

/// A message's state as an event or the store reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub state: MessageState,
    pub reply: Option<Value>,
    pub reason: Option<String>,
}

#[derive(Default)]
pub(super) struct Slot {
    latest: Mutex<Option<Update>>,
    notify: Notify,
}

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Update>> {
        self.latest.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn latest(&self) -> Option<Update> {
        self.lock().clone()
    }

    pub(super) fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }
}

/// What the bus tells this node about messages: answers for its waiters, and whether any
/// outbox may hold something (the gate that keeps connects free of an outbox read while no
/// message waits anywhere).
#[derive(Default)]
pub struct Signals {
    slots: DashMap<String, Arc<Slot>>,
    /// Whether some message may wait for delivery: while false, an accepted connection does not
    /// read its outbox.
    pending: AtomicBool,
    /// Bumped by every [`Signals::open_gate`], so that a sweep that found nothing pending
    /// closes the gate only if nothing was queued meanwhile.
    generation: AtomicU64,
    /// `"node":"<this node's id>"`, as this node's own events carry it.
    own: String,
}

/// One operator's wait on a message: its slot, released when the wait ends, however it ends
/// (the slot goes with its last waiter).
pub(super) struct Waiter<'a> {
    signals: &'a Signals,
    id: &'a str,
    slot: Arc<Slot>,
}

impl std::ops::Deref for Waiter<'_> {
    type Target = Slot;
    fn deref(&self) -> &Slot {
        &self.slot
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        // Let go of this waiter's reference first, so that of two last waiters ending at once
        // at least one sees only the map's.
        drop(std::mem::take(&mut self.slot));
        self.signals
            .slots
            .remove_if(self.id, |_, s| Arc::strong_count(s) <= 1);
    }
}

impl Signals {
    /// The signals of node `node_id`.
    pub fn new(node_id: &str) -> Self {
        Self {
            own: format!(r#""node":"{node_id}""#),
            ..Self::default()
        }
    }

    /// Starts waiting for message `id`'s changes (before its frame leaves, so that no answer
    /// can come first).
    pub(super) fn wait_for<'a>(&'a self, id: &'a str) -> Waiter<'a> {
        let slot = self.slots.entry(id.to_string()).or_default().clone();
        Waiter {
            signals: self,
            id,
            slot,
        }
    }

    /// Tells `id`'s waiters (if any) its new state. A final state is never replaced by an
    /// earlier report arriving late.
    pub fn update(&self, id: &str, update: Update) {
        let Some(slot) = self.slots.get(id).map(|s| s.clone()) else {
            return;
        };
        {
            let mut latest = slot.lock();
            if latest.as_ref().is_some_and(|l| l.state.is_final()) && !update.state.is_final() {
                return;
            }
            *latest = Some(update);
        }
        slot.notify.notify_waiters();
    }

    /// A cluster event, as the bus delivers it to this node: `message` events reach the waiters
    /// and open the outbox gate. Costs one prefix comparison for every other event, and one
    /// search for this node's own message events, whose change this node's waiters and gate
    /// already had from [`Tracker::changed`](super::Tracker::changed) (the gate opened by
    /// whoever queued), so they are not parsed again.
    pub fn event(&self, text: &str) {
        if !text.starts_with(r#"{"type":"message""#) || text.contains(&self.own) {
            return;
        }
        // Nothing to learn: the gate is open and nobody here waits.
        if self.slots.is_empty() && self.gate_open() {
            return;
        }
        let Ok(event) = serde_json::from_str::<ConnectionEvent>(text) else {
            return;
        };
        debug_assert_eq!(event.kind, kinds::MESSAGE);
        let Some(state) = event.state.as_deref().and_then(MessageState::parse) else {
            return;
        };
        if matches!(state, MessageState::Queued | MessageState::Written) {
            self.open_gate();
        }
        if let Some(id) = event.message_id.as_deref()
            && !self.slots.is_empty()
        {
            self.update(
                id,
                Update {
                    state,
                    reply: event.reply,
                    reason: event.reason,
                },
            );
        }
    }

    /// Some message may now wait for delivery.
    pub fn open_gate(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.pending.store(true, Ordering::Release);
    }

    pub(super) fn gate_open(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Closes the gate if nothing opened it since `generation` was read (before the store said
    /// nothing was pending).
    pub(super) fn close_gate(&self, generation: u64) {
        if self.generation.load(Ordering::Acquire) == generation {
            self.pending.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_earlier_state_does_not_replace_a_final_one() {
        let signals = Signals::default();
        let slot = signals.wait_for("m");
        let update = |state| Update {
            state,
            reply: None,
            reason: None,
        };
        signals.update("m", update(MessageState::Acked));
        signals.update("m", update(MessageState::Written));
        assert_eq!(slot.latest().map(|u| u.state), Some(MessageState::Acked));
        drop(slot);
        assert!(signals.slots.is_empty());
    }

    #[test]
    fn only_other_nodes_message_events_are_read() {
        let signals = Signals::new("n1");
        let slot = signals.wait_for("m");
        let event = |node: &str| {
            let mut e = ConnectionEvent::new(kinds::MESSAGE, "c", "client", node);
            e.state = Some("acked".into());
            e.message_id = Some("m".into());
            serde_json::to_string(&e).unwrap_or_default()
        };
        signals.event(&event("n1"));
        assert_eq!(slot.latest(), None);
        signals.event(&event("n2"));
        assert_eq!(slot.latest().map(|u| u.state), Some(MessageState::Acked));
    }

    #[test]
    fn the_gate_stays_open_when_opened_during_a_sweep() {
        let signals = Signals::default();
        signals.open_gate();
        let g = signals.generation();
        signals.open_gate();
        signals.close_gate(g);
        assert!(signals.gate_open());
        signals.close_gate(signals.generation());
        assert!(!signals.gate_open());
    }
}
