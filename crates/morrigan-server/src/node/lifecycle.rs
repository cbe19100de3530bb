//! A node's life in the cluster: the first admin, crash recovery, the lease it renews, the
//! nodes it reaps, and periodic upkeep.

use std::time::Duration;

use morrigan_protocol::close;
use morrigan_protocol::functions;
use morrigan_protocol::time_format;
use tokio_util::sync::CancellationToken;

use super::StartError;
use crate::auth;
use crate::config::Config;
use crate::state::AppState;
use crate::store::{CloseInfo, IdentityRow, NodeRow, Store, StoreError};

/// How often expired tokens, unused connection tokens and old records are cleaned up.
pub const MAINTENANCE_PERIOD: Duration = Duration::from_secs(60);

/// This node's row as it registers: running, its lease from now.
pub(super) fn node_row(node_id: &str, public_url: &str, lease: Duration) -> NodeRow {
    let now = time::OffsetDateTime::now_utc();
    NodeRow {
        id: node_id.to_string(),
        public_url: public_url.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        started: time_format::format(now),
        lease_expires: time_format::format(now + lease),
        state: "running".into(),
    }
}

/// Closes the records this node left open: they are from a crash, their sockets are gone.
pub(super) async fn recover(store: &dyn Store, node_id: &str) -> Result<(), StoreError> {
    let now = time_format::now();
    let recovered = store
        .close_node_connections(
            node_id,
            &CloseInfo {
                at: &now,
                code: close::ABNORMAL,
                reason: "node stopped without closing; closed at restart",
            },
        )
        .await?;
    if recovered > 0 {
        tracing::warn!(
            count = recovered,
            "closed connection records left open by a previous run"
        );
    }
    Ok(())
}

/// Periodic upkeep: the node lease and reaping lost nodes (every third of the lease), unused
/// connection tokens, expired tokens and retention (every [`MAINTENANCE_PERIOD`]).
pub(super) async fn maintain(state: AppState, stop: CancellationToken) {
    let lease_period = state.config.node_lease / 3;
    let mut lease = tokio::time::interval(lease_period.max(Duration::from_millis(100)));
    let mut upkeep = tokio::time::interval(MAINTENANCE_PERIOD);
    lease.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = lease.tick() => {
                if let Err(e) = lease_once(&state).await {
                    tracing::warn!(error = %e, "could not renew the node lease");
                }
            }
            _ = upkeep.tick() => {
                if let Err(e) = upkeep_once(&state).await {
                    tracing::warn!(error = %e, "maintenance failed");
                }
            }
        }
    }
}

/// Renews this node's lease and closes the records of nodes whose lease lapsed.
pub async fn lease_once(state: &AppState) -> Result<(), StoreError> {
    let now = time::OffsetDateTime::now_utc();
    let until = time_format::format(now + state.config.node_lease);
    let sent = std::time::Instant::now();
    if state.store.renew_node(&state.node_id, &until).await? {
        state.lease.renewed(sent, state.config.node_lease);
    } else {
        // The survivors declared this node lost (it stalled past its lease) and closed its
        // records with 1006: its sockets must not live on unrecorded, and must end as their
        // records say, without a close frame. Devices reconnect.
        tracing::error!("this node's lease lapsed and it was declared lost; dropping its sockets");
        state.lease.lost();
        state.hub.abandon_all(
            close::ABNORMAL,
            &format!("node {} lost its lease", state.node_id),
        );
        let sent = std::time::Instant::now();
        state
            .store
            .register_node(&node_row(
                &state.node_id,
                &state.base_url,
                state.config.node_lease,
            ))
            .await?;
        state.lease.renewed(sent, state.config.node_lease);
    }
    for lost in state
        .store
        .reap_nodes(&time_format::format(now), &state.node_id)
        .await?
    {
        let reason = format!("node {} lost its lease", lost.id);
        let closed = state
            .store
            .close_node_connections(
                &lost.id,
                &CloseInfo {
                    at: &lost.lease_expires,
                    code: close::ABNORMAL,
                    reason: &reason,
                },
            )
            .await?;
        tracing::warn!(node = %lost.id, closed, "a node lost its lease; closed its connection records");
    }
    state.peers.refresh(&state.store.nodes().await?);
    Ok(())
}

/// One round of cleanup (also called by tests).
pub async fn upkeep_once(state: &AppState) -> Result<(), StoreError> {
    let now = time::OffsetDateTime::now_utc();
    let now_s = time_format::format(now);
    let expired = state.store.expire_pending_connections(&now_s).await?;
    let cutoff = time_format::format(now - state.config.retention);
    let purged = state.store.purge_closed_connections(&cutoff).await?;
    let tokens = state.store.purge_expired_tokens(&now_s).await?;
    state
        .store
        .purge_payloads(&time_format::format(now - Duration::from_secs(300)))
        .await?;
    state.tracker.sweep(now).await?;
    if expired + purged + tokens > 0 {
        tracing::debug!(expired, purged, tokens, "maintenance");
    }
    Ok(())
}

/// On a first start (no identities) creates `admin` with every function. The password is
/// `MORRIGAN_ADMIN_PASSWORD` if set, else generated and written to
/// `<data_dir>/initial-admin-password` (mode 0600). No password is hard-coded.
pub(super) async fn bootstrap_admin(
    config: &Config,
    store: &dyn Store,
    passwords: &crate::passwords::Passwords,
) -> Result<(), StartError> {
    if store.count_identities().await? > 0 {
        return Ok(());
    }
    let (password, generated) = match &config.admin_password {
        Some(p) if auth::valid_password(p) => (p.clone(), false),
        Some(_) => {
            return Err(StartError::Admin(
                "the admin password must be 8 to 1024 characters".into(),
            ));
        }
        None => {
            use base64::Engine;
            let mut bytes = [0u8; 18];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
            (
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes),
                true,
            )
        }
    };
    let hash = passwords
        .hash(&password)
        .await
        .map_err(|e| StartError::Admin(e.to_string()))?;
    let now = time_format::now();
    let created = store
        .insert_identity(&IdentityRow {
            id: uuid::Uuid::new_v4().to_string(),
            name: "admin".into(),
            functions: functions::ALL.iter().map(|s| s.to_string()).collect(),
            password_hash: hash,
            created: now.clone(),
            updated: now,
        })
        .await;
    match created {
        // Another node of the cluster starting at the same moment created it first.
        Err(StoreError::Conflict(_)) => return Ok(()),
        other => other?,
    }
    if generated {
        let path = config.data_dir.join("initial-admin-password");
        morrigan_files::write_private(&path, format!("{password}\n").as_bytes()).map_err(
            |source| StartError::DataDir {
                path: path.display().to_string(),
                source,
            },
        )?;
        eprintln!(
            "Created identity 'admin'. Its generated password is in {} (readable by this user only).",
            path.display()
        );
    } else {
        eprintln!("Created identity 'admin' with the password from MORRIGAN_ADMIN_PASSWORD.");
    }
    Ok(())
}
