//! The graceful stop: every socket closed with 1001, every record written, the node marked
//! stopped, within [`SHUTDOWN_BOUND`] whatever peers and the store do.

use std::time::Duration;

use morrigan_protocol::close;
use morrigan_protocol::time_format;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::listener::Graceful;
use crate::state::AppState;
use crate::store::CloseInfo;

/// A graceful stop ends within this, whatever peers and the store do (the binary's runtime
/// takes at most half a second more).
pub const SHUTDOWN_BOUND: Duration = Duration::from_millis(9_000);
/// What the stop keeps for itself after the sockets' grace period: forcing the remaining
/// connections, writing records, stopping the background tasks.
const STOP_TAIL: Duration = Duration::from_millis(3_000);
/// How long forced connections (and HTTP connections) get to end.
const FORCE_WAIT: Duration = Duration::from_millis(1_000);

/// The node's background tasks, stopped after its sockets.
pub(super) struct Background {
    pub token: CancellationToken,
    pub flusher: JoinHandle<()>,
    pub maintenance: JoinHandle<()>,
}

/// Stops the node; the accept loop has ended.
pub(super) async fn stop(state: &AppState, graceful: Graceful, background: Background) {
    tracing::info!(connections = state.hub.len(), "shutting down");
    // Every step below is bounded, so the node stops within SHUTDOWN_BOUND whatever its
    // peers (or its store) do: sockets get `shutdown_timeout` to close with 1001, the rest
    // are dropped, and every record is written (or left to the next start's recovery).
    let hard_stop = tokio::time::Instant::now() + SHUTDOWN_BOUND;
    state.shutdown.cancel();
    state
        .hub
        .close_all(close::GOING_AWAY, "server shutting down");
    state.sessions.close();
    let grace = state
        .config
        .shutdown_timeout
        .min(SHUTDOWN_BOUND - STOP_TAIL);
    let closed = tokio::time::timeout(grace, state.sessions.wait())
        .await
        .is_ok();
    if !closed {
        tracing::warn!(
            remaining = state.hub.len(),
            "connections did not close in time; dropping them"
        );
        state.hub.kill_all();
        let _ = tokio::time::timeout(FORCE_WAIT, state.sessions.wait()).await;
    }
    let _ = tokio::time::timeout(FORCE_WAIT, graceful.shutdown()).await;
    if !state.hub.is_empty() || !closed {
        let now = time_format::now();
        let _ = tokio::time::timeout_at(
            hard_stop,
            state.store.close_node_connections(
                &state.node_id,
                &CloseInfo {
                    at: &now,
                    code: close::GOING_AWAY,
                    reason: "server shutting down",
                },
            ),
        )
        .await;
    }
    background.token.cancel();
    let _ = tokio::time::timeout_at(hard_stop, background.flusher).await;
    let _ = tokio::time::timeout_at(hard_stop, background.maintenance).await;
    // Records the store did not take yet: retried while the stop's bound allows.
    state.records.drain(hard_stop).await;
    match tokio::time::timeout_at(
        hard_stop,
        state.store.stop_node(&state.node_id, &time_format::now()),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not mark the node stopped"),
        Err(_) => tracing::warn!("could not mark the node stopped in time"),
    }
}
