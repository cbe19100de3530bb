//! Admission: a device's two steps onto a node, decided here rather than in the HTTP handlers.
//!
//! 1. **Exchange** ([`exchange`]): an identity token for a single-use connection token. One
//!    conditional insert writes the pending connection record, and only if the identity token's
//!    record still exists with the digest of the presented text (possession: see `tokens.rs`)
//!    and the client is still provisioned; the record exists before the token is handed out.
//! 2. **Accept** ([`accept`]): the connection token for the right to open the WebSocket. The
//!    connection is registered in the hub first (see `Hub::reserve`), then one conditional
//!    update consumes the token: unused, unexpired, its record open, its client provisioned,
//!    the digest matching. Of any number of racing accepts exactly one wins.
//!
//! Both refuse with a [`Refusal`]: what a device is told, and the label it is counted under. A
//! signature is checked only on the rare path, to say why a refusal happened.

use morrigan_protocol::api::audience;
use morrigan_protocol::records::ConnectionRecord;
use morrigan_protocol::time_format;

use crate::hub::Reservation;
use crate::state::AppState;
use crate::store::{CloseInfo, Proof, StoreError};
use crate::tokens::{self, TokenError};

/// Why a device was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// No token where one was expected.
    #[error("no token")]
    Missing,
    /// The token is malformed, signed by an unknown key, of another audience or expired.
    #[error("{0}")]
    Token(TokenError),
    /// The identity token's record is gone: revoked (or expired and purged).
    #[error("the identity token has been revoked")]
    Revoked,
    /// Signed and live, but not the exact text issued for it.
    #[error("it is not the token issued")]
    NotIssued,
    /// The client is no longer provisioned.
    #[error("the client is no longer provisioned")]
    Deprovisioned,
    /// The connection token was used already, or its connection is closed.
    #[error("connection token already used or its connection is closed")]
    Replayed,
    /// An embedder's `authenticate` hook refused, for this reason.
    #[error("refused: {0}")]
    Hook(String),
    /// This node takes no connections now (shutting down, or it cannot confirm its lease).
    #[error("{0}")]
    Unavailable(&'static str),
    /// The store failed.
    #[error(transparent)]
    Store(StoreError),
    /// A token could not be signed.
    #[error("could not sign the token: {0}")]
    Internal(String),
}

impl Refusal {
    /// The reason it is counted under in `morrigan_token_refusals_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Token(e) => e.reason(),
            Refusal::Revoked => "revoked",
            Refusal::NotIssued => "invalid",
            Refusal::Deprovisioned => "deprovisioned",
            Refusal::Replayed => "replayed",
            Refusal::Hook(_) => "hook",
            Refusal::Unavailable(_) => "unavailable",
            Refusal::Store(_) => "store_error",
            Refusal::Internal(_) => "internal",
        }
    }
}

impl From<TokenError> for Refusal {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Store(s) => Refusal::Store(s),
            other => Refusal::Token(other),
        }
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        Refusal::Store(e)
    }
}

/// Counts a refusal decided here (token errors are counted where they are found).
fn counted(s: &AppState, aud: &str, r: Refusal) -> Refusal {
    if !matches!(r, Refusal::Token(_) | Refusal::Store(_)) {
        s.credentials.tokens().refused(aud, r.label());
    }
    r
}

/// Exchanges `identity_token` (presented by a device at `address`) for a connection token,
/// after writing its pending record.
pub async fn exchange(
    s: &AppState,
    identity_token: Option<&str>,
    address: String,
) -> Result<String, Refusal> {
    let tokens = s.credentials.tokens();
    let token = identity_token.ok_or_else(|| counted(s, audience::IDENTITY, Refusal::Missing))?;
    // Read, not yet trusted: the insert below requires the digest recorded when this token was
    // issued, which proves it is the token a node signed (see tokens.rs).
    let presented = tokens.presented(token, audience::IDENTITY).await?;
    let claims = &presented.claims;
    let now = time_format::now();
    let id = uuid::Uuid::new_v4().to_string();
    let report_url = s.report_url();
    let issued = s
        .credentials
        .issue_connection(&id, report_url.clone())
        .map_err(|e| Refusal::Internal(e.to_string()))?;
    let expires = time::OffsetDateTime::from_unix_timestamp(issued.claims.exp)
        .map(time_format::format)
        .unwrap_or_default();
    let record = ConnectionRecord {
        id: id.clone(),
        client_id: claims.sub.clone(),
        server_id: None,
        token_id: issued.claims.jti.clone(),
        client_address: Some(address),
        connected: None,
        alive: false,
        open: true,
        last_heartbeat: None,
        disconnected: None,
        report_url,
        created: now.clone(),
        close_code: None,
        close_reason: None,
    };
    // Written before answering, so that the device can never connect before its record exists.
    let token_digest = tokens::digest(&issued.token);
    let inserted = s
        .store
        .issue_connection(
            &record,
            &token_digest,
            &expires,
            &claims.jti,
            Proof::Digest(&presented.digest),
        )
        .await?;
    if !inserted {
        // The rare path: check the signature, then the record, to say why; a token recorded
        // without a digest is let through by its signature and gets its digest.
        let claims = tokens.verify(token, audience::IDENTITY).await?;
        let Some(live) = s.store.live_token(&claims.jti, &now).await? else {
            return Err(counted(s, audience::IDENTITY, Refusal::Revoked));
        };
        if live.digest.as_ref().is_some_and(|d| d != &presented.digest) {
            return Err(counted(s, audience::IDENTITY, Refusal::NotIssued));
        }
        let legacy = live.digest.is_none()
            && s.store
                .issue_connection(
                    &record,
                    &token_digest,
                    &expires,
                    &claims.jti,
                    Proof::Signature,
                )
                .await?;
        if !legacy {
            return Err(counted(s, audience::IDENTITY, Refusal::Deprovisioned));
        }
        s.store
            .set_token_digest(&claims.jti, &presented.digest)
            .await?;
    }
    tracing::debug!(client = %claims.sub, connection = %id, "connection token issued");
    Ok(issued.token)
}

/// A device admitted: its record, marked connected on this node, and its hub registration,
/// which the session takes over.
pub struct Admitted {
    pub record: ConnectionRecord,
    pub reservation: Reservation,
}

/// Consumes connection token `token`, presented by a device at `address`.
pub async fn accept(s: &AppState, token: Option<&str>, address: &str) -> Result<Admitted, Refusal> {
    if s.shutdown.is_cancelled() {
        return Err(Refusal::Unavailable("The node is shutting down."));
    }
    if !s.lease.held() {
        return Err(Refusal::Unavailable(
            "This node cannot confirm its cluster lease; retry.",
        ));
    }
    let tokens = s.credentials.tokens();
    let token = token.ok_or_else(|| counted(s, audience::CONNECTION, Refusal::Missing))?;
    // Without an embedder's hooks the token is read, not yet trusted: the accept below requires
    // the digest recorded with its record (see tokens.rs). Hooks see the record before that
    // statement, so with them the signature is checked first, as the accept's proof.
    let (claims, digest) = if s.embedder_hooks {
        (tokens.verify(token, audience::CONNECTION).await?, None)
    } else {
        let p = tokens.presented(token, audience::CONNECTION).await?;
        (p.claims, Some(p.digest))
    };
    if s.embedder_hooks {
        authenticate(s, &claims).await?;
    }
    // Registered in the hub before the token is consumed: a deprovisioning or DELETE that
    // closes the record after the accept finds this entry and closes the session (see
    // Hub::reserve). A live connection with this id means a replay, or a forgery naming it.
    let Some(reservation) = s.hub.reserve(&claims.sub, crate::session::now_ms()) else {
        tokens.verify(token, audience::CONNECTION).await?;
        return Err(counted(s, audience::CONNECTION, Refusal::Replayed));
    };
    let now = time_format::now();
    match consume(s, &claims, token, digest.as_deref(), address, &now).await {
        Ok(record) => Ok(Admitted {
            record,
            reservation,
        }),
        Err(refusal) => {
            release(s, &claims.sub, reservation).await;
            Err(refusal)
        }
    }
}

/// Runs the embedder's `authenticate` hooks on the pending record, before the token is used.
async fn authenticate(
    s: &AppState,
    claims: &morrigan_protocol::api::Claims,
) -> Result<(), Refusal> {
    let record = s
        .store
        .connection(&claims.sub)
        .await?
        .ok_or_else(|| counted(s, audience::CONNECTION, Refusal::Replayed))?;
    if record.token_id != claims.jti || !record.open || record.connected.is_some() {
        return Err(counted(s, audience::CONNECTION, Refusal::Replayed));
    }
    for hook in s.hooks.iter() {
        if let Err(reason) = hook.authenticate(&record).await {
            return Err(counted(s, audience::CONNECTION, Refusal::Hook(reason)));
        }
    }
    Ok(())
}

/// The one statement that consumes the token (see `Store::accept_connection`).
async fn consume(
    s: &AppState,
    claims: &morrigan_protocol::api::Claims,
    token: &str,
    digest: Option<&str>,
    address: &str,
    now: &str,
) -> Result<ConnectionRecord, Refusal> {
    let proof = digest.map_or(Proof::Signature, Proof::Digest);
    let mut accepted = s
        .store
        .accept_connection(&claims.sub, &claims.jti, proof, &s.node_id, address, now)
        .await?;
    if accepted.is_none() && digest.is_some() {
        // Refused: a forged token, a replay, or a record written without a digest. The
        // signature tells the first apart; the accept, with it as proof, the other two.
        s.credentials
            .tokens()
            .verify(token, audience::CONNECTION)
            .await?;
        accepted = s
            .store
            .accept_connection(
                &claims.sub,
                &claims.jti,
                Proof::Signature,
                &s.node_id,
                address,
                now,
            )
            .await?;
    }
    accepted.ok_or_else(|| counted(s, audience::CONNECTION, Refusal::Replayed))
}

/// The accept failed: the reservation leaves the hub. A close requested meanwhile (a DELETE
/// of a pending record that found the reservation) is carried out on the record.
async fn release(s: &AppState, id: &str, reservation: Reservation) {
    if let Some(req) = reservation.close_requested() {
        let now = time_format::now();
        let close = CloseInfo {
            at: &now,
            code: req.code,
            reason: &req.reason,
        };
        s.records.close(id, &close).await;
    }
    drop(reservation);
}
