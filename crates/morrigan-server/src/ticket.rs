//! The outcome of one frame handed to a connection task: written, refused, or never taken.
//!
//! A sender that gives up must be able to say "this frame will never be written": a REST send
//! answered 504 must not reach the device a moment later (a caller that retries would deliver
//! it twice). So the handover is decided by one compare-and-swap on the ticket: the connection
//! task *takes* the frame (`Pending → Taken`) before writing it, and a sender whose deadline
//! passed *cancels* it (`Pending → Cancelled`). Exactly one of the two wins. A cancelled frame is
//! never written; a taken frame is written or its socket closed within the write timeout, and
//! the sender waits for that outcome.
//!
//! One allocation per frame (the shared state), like the oneshot channel it replaces.

use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::task::Poll;
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::time::Instant;

const PENDING: u8 = 0;
const TAKEN: u8 = 1;
const CANCELLED: u8 = 2;
const DONE: u8 = 3;

/// Outcome codes; a close code is stored as `CLOSED_BASE + code`.
const OK: u32 = 0;
const WRITE_TIMEOUT: u32 = 1;
const CLOSED_BASE: u32 = 0x1_0000;

/// Why a frame was not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// No connection with that id is held by this node.
    #[error("connection is not held by this node")]
    NotHere,
    /// The connection ended before the frame was written (with this close code, if known).
    #[error("connection closed before the frame was written")]
    Closed(Option<u16>),
    /// The connection did not take the frame before the deadline; it will never be written.
    #[error("connection did not take the frame in time")]
    NotTaken,
    /// The connection took the frame but the device did not read it within the write timeout:
    /// its socket was closed (4008).
    #[error("the device did not read the frame within the write timeout")]
    WriteTimeout,
}

struct Inner {
    state: AtomicU8,
    outcome: AtomicU32,
    waker: AtomicWaker,
}

/// The sender's half: wait for the outcome, cancel at the deadline.
pub struct Ticket(Arc<Inner>);

/// The connection task's half. Dropped without an outcome (the task ended), it reports
/// [`SendError::Closed`].
pub struct TicketWriter(Option<Arc<Inner>>);

/// A new ticket and the writer that travels with the frame.
pub fn ticket() -> (Ticket, TicketWriter) {
    let inner = Arc::new(Inner {
        state: AtomicU8::new(PENDING),
        outcome: AtomicU32::new(OK),
        waker: AtomicWaker::new(),
    });
    (Ticket(inner.clone()), TicketWriter(Some(inner)))
}

impl TicketWriter {
    /// Claims the frame for writing. False when its sender already gave up: drop it unwritten.
    pub fn take(&self) -> bool {
        self.0.as_ref().is_some_and(|i| {
            i.state
                .compare_exchange(PENDING, TAKEN, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        })
    }

    /// The frame was written (flushed to the socket).
    pub fn written(mut self) {
        self.finish(OK);
    }

    /// The frame was not written.
    pub fn failed(mut self, why: SendError) {
        let code = match why {
            SendError::WriteTimeout => WRITE_TIMEOUT,
            SendError::Closed(code) => CLOSED_BASE + u32::from(code.unwrap_or(0)),
            // Not produced by a connection task; reported as a plain close.
            SendError::NotHere | SendError::NotTaken => CLOSED_BASE,
        };
        self.finish(code);
    }

    fn finish(&mut self, outcome: u32) {
        if let Some(inner) = self.0.take() {
            inner.outcome.store(outcome, Ordering::Release);
            inner.state.store(DONE, Ordering::Release);
            inner.waker.wake();
        }
    }
}

impl Drop for TicketWriter {
    fn drop(&mut self) {
        self.finish(CLOSED_BASE);
    }
}

impl Ticket {
    fn outcome(&self) -> Option<Result<(), SendError>> {
        if self.0.state.load(Ordering::Acquire) != DONE {
            return None;
        }
        Some(match self.0.outcome.load(Ordering::Acquire) {
            OK => Ok(()),
            WRITE_TIMEOUT => Err(SendError::WriteTimeout),
            n => {
                let code = u16::try_from(n - CLOSED_BASE).ok().filter(|c| *c != 0);
                Err(SendError::Closed(code))
            }
        })
    }

    async fn done(&self) -> Result<(), SendError> {
        poll_fn(|cx| {
            if let Some(o) = self.outcome() {
                return Poll::Ready(o);
            }
            self.0.waker.register(cx.waker());
            match self.outcome() {
                Some(o) => Poll::Ready(o),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// Waits for the outcome. At `take_by` a frame not yet taken is cancelled
    /// ([`SendError::NotTaken`], never written); a taken one is waited for at most `write_bound`
    /// more (the connection writes it or closes its socket within its write timeout).
    pub async fn wait(self, take_by: Instant, write_bound: Duration) -> Result<(), SendError> {
        if let Ok(outcome) = tokio::time::timeout_at(take_by, self.done()).await {
            return outcome;
        }
        if self
            .0
            .state
            .compare_exchange(PENDING, CANCELLED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return Err(SendError::NotTaken);
        }
        match tokio::time::timeout(write_bound, self.done()).await {
            Ok(outcome) => outcome,
            // The connection task is being torn down; the frame did not reach the socket.
            Err(_) => Err(SendError::WriteTimeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_written_frame_reports_ok() {
        let (t, w) = ticket();
        assert!(w.take());
        w.written();
        let r = t
            .wait(Instant::now() + Duration::from_secs(1), Duration::ZERO)
            .await;
        assert_eq!(r, Ok(()));
    }

    #[tokio::test]
    async fn a_frame_not_taken_by_the_deadline_is_cancelled_and_cannot_be_taken() {
        let (t, w) = ticket();
        let r = t
            .wait(Instant::now() + Duration::from_millis(10), Duration::ZERO)
            .await;
        assert_eq!(r, Err(SendError::NotTaken));
        assert!(!w.take(), "a cancelled frame must never be written");
    }

    #[tokio::test]
    async fn a_taken_frame_is_waited_for_past_the_take_deadline() {
        let (t, w) = ticket();
        assert!(w.take());
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            w.written();
        });
        let r = t
            .wait(
                Instant::now() + Duration::from_millis(5),
                Duration::from_secs(5),
            )
            .await;
        assert_eq!(r, Ok(()));
        writer.await.ok();
    }

    #[tokio::test]
    async fn a_dropped_writer_reports_closed() {
        let (t, w) = ticket();
        drop(w);
        let r = t
            .wait(Instant::now() + Duration::from_secs(1), Duration::ZERO)
            .await;
        assert_eq!(r, Err(SendError::Closed(None)));
        let (t, w) = ticket();
        assert!(w.take());
        w.failed(SendError::Closed(Some(4000)));
        let r = t
            .wait(Instant::now() + Duration::from_secs(1), Duration::ZERO)
            .await;
        assert_eq!(r, Err(SendError::Closed(Some(4000))));
    }
}
