//! Credentials: every token this node issues, recorded so that it can be revoked, and the
//! operator sessions it verified recently.
//!
//! One place issues each kind: user tokens (a login), identity tokens (provisioning and
//! `client.token.refresh`), connection tokens (the exchange; their record is the pending
//! connection record, which admission writes). A token is recorded *before* it is handed out,
//! so every token a peer holds can be revoked by deleting its record.
//!
//! Operator sessions: a REST call with a user token this node verified within
//! [`USER_CACHE_TTL`] costs no signature check and no store read. Anything this node changes
//! about identities or their tokens forgets every cached session at once
//! ([`Credentials::sessions_changed`]); a change made on another node of a cluster takes effect
//! here within [`USER_CACHE_TTL`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use morrigan_protocol::api::audience;
use morrigan_protocol::functions;
use morrigan_protocol::time_format;

use crate::config::Config;
use crate::store::{IdentityChange, IdentityRow, Store, StoreError, TokenKind};
use crate::tokens::{Issued, TokenError, Tokens, token_row};

/// How long a verified user token is trusted without checking it again.
pub const USER_CACHE_TTL: Duration = Duration::from_secs(5);
/// Most sessions cached; past this the cache starts over (operators are few; this bounds
/// memory against a flood of distinct valid tokens).
const USER_CACHE_MAX: usize = 10_000;

/// Why a credential could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("could not sign the token: {0}")]
    Sign(TokenError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An operator session: a valid, unrevoked user token whose identity exists.
#[derive(Debug, Clone)]
pub struct Session {
    pub identity: IdentityRow,
    /// The `jti` of the token used, so a password change can keep this session.
    pub token_id: String,
}

/// Why a user token opens no session.
#[derive(Debug, thiserror::Error)]
pub enum SessionRefusal {
    #[error("Invalid user token: {0}.")]
    Invalid(TokenError),
    #[error("The user token has been revoked.")]
    Revoked,
    #[error("The identity of this token no longer exists.")]
    NoIdentity,
    #[error(transparent)]
    Store(StoreError),
}

/// Issues and records every kind of token; verifies operator sessions.
pub struct Credentials {
    tokens: Tokens,
    store: Arc<dyn Store>,
    user_ttl: Duration,
    identity_ttl: Duration,
    connection_ttl: Duration,
    refresh_grace: Duration,
    sessions: dashmap::DashMap<Box<str>, (Session, Instant, i64)>,
}

impl Credentials {
    pub fn new(tokens: Tokens, store: Arc<dyn Store>, config: &Config) -> Self {
        Self {
            tokens,
            store,
            user_ttl: config.user_token_ttl,
            identity_ttl: config.identity_token_ttl,
            connection_ttl: config.connection_token_ttl,
            refresh_grace: config.refresh_grace,
            sessions: Default::default(),
        }
    }

    /// The node's token signer and verifier.
    pub fn tokens(&self) -> &Tokens {
        &self.tokens
    }

    /// A user token for `identity_id`, recorded (revocable).
    pub async fn issue_user(&self, identity_id: &str) -> Result<String, CredentialError> {
        let issued = self
            .tokens
            .issue(audience::USER, identity_id, self.user_ttl.as_secs(), None)
            .map_err(CredentialError::Sign)?;
        self.store
            .insert_token(&token_row(TokenKind::User, &issued))
            .await?;
        Ok(issued.token)
    }

    /// A new identity token for `client_id`, recorded and made the client's current one.
    async fn issue_identity(&self, client_id: &str) -> Result<Issued, CredentialError> {
        let issued = self
            .tokens
            .issue(
                audience::IDENTITY,
                client_id,
                self.identity_ttl.as_secs(),
                None,
            )
            .map_err(CredentialError::Sign)?;
        self.store
            .insert_token(&token_row(TokenKind::Identity, &issued))
            .await?;
        self.store
            .set_client_token(client_id, &issued.claims.jti, &time_format::now())
            .await?;
        Ok(issued)
    }

    /// Provisioning: a new identity token for `client_id`; every older one is revoked.
    pub async fn provision(&self, client_id: &str) -> Result<Issued, CredentialError> {
        let issued = self.issue_identity(client_id).await?;
        self.store
            .revoke_tokens(TokenKind::Identity, client_id, Some(&issued.claims.jti))
            .await?;
        Ok(issued)
    }

    /// `client.token.refresh`: a new identity token for `client_id`; older ones keep working
    /// for the refresh grace period only (a device that lost the new token before saving it
    /// can still come back once).
    pub async fn refresh(&self, client_id: &str) -> Result<Issued, CredentialError> {
        let issued = self.issue_identity(client_id).await?;
        let grace = time::OffsetDateTime::now_utc() + self.refresh_grace;
        self.store
            .shorten_tokens(
                TokenKind::Identity,
                client_id,
                &issued.claims.jti,
                &time_format::format(grace),
            )
            .await?;
        Ok(issued)
    }

    /// A connection token for connection `connection_id`, naming `report_url`. Its record is
    /// the pending connection record, written by the caller before the token is handed out.
    pub fn issue_connection(
        &self,
        connection_id: &str,
        report_url: String,
    ) -> Result<Issued, CredentialError> {
        self.tokens
            .issue(
                audience::CONNECTION,
                connection_id,
                self.connection_ttl.as_secs(),
                Some(report_url),
            )
            .map_err(CredentialError::Sign)
    }

    /// Revokes `identity_id`'s user tokens but `keep` (a password change).
    pub async fn revoke_sessions(
        &self,
        identity_id: &str,
        keep: Option<&str>,
    ) -> Result<(), StoreError> {
        self.sessions_changed();
        self.store
            .revoke_tokens(TokenKind::User, identity_id, keep)
            .await?;
        // Again after the revocation, so that no request in between re-cached a revoked one.
        self.sessions_changed();
        Ok(())
    }

    /// Changes an identity (guarded: see [`crate::store::IdentityStore::update_identity`]); cached sessions,
    /// which carry its old name and functions, are forgotten whatever the outcome.
    pub async fn update_identity(&self, row: &IdentityRow) -> Result<IdentityChange, StoreError> {
        let updated = self.store.update_identity(row, functions::ALL).await;
        self.sessions_changed();
        updated
    }

    /// Deletes an identity and its sessions (guarded like [`Credentials::update_identity`]).
    pub async fn delete_identity(&self, id: &str) -> Result<IdentityChange, StoreError> {
        let deleted = self.store.delete_identity(id, functions::ALL).await;
        self.sessions_changed();
        deleted
    }

    /// Identities or their tokens changed: forget every cached session.
    fn sessions_changed(&self) {
        self.sessions.clear();
    }

    /// The operator session of user token `token`.
    pub async fn session(&self, token: &str) -> Result<Session, SessionRefusal> {
        if let Some(entry) = self.sessions.get(token) {
            let (session, at, exp) = &*entry;
            if at.elapsed() < USER_CACHE_TTL
                && time::OffsetDateTime::now_utc().unix_timestamp() < *exp
            {
                return Ok(session.clone());
            }
        }
        let claims = self
            .tokens
            .verify(token, audience::USER)
            .await
            .map_err(|e| match e {
                TokenError::Store(s) => SessionRefusal::Store(s),
                other => SessionRefusal::Invalid(other),
            })?;
        let now = time_format::now();
        let live = self
            .store
            .live_token(&claims.jti, &now)
            .await
            .map_err(SessionRefusal::Store)?;
        if live.is_none() {
            return Err(SessionRefusal::Revoked);
        }
        let identity = self
            .store
            .identity(&claims.sub)
            .await
            .map_err(SessionRefusal::Store)?
            .ok_or(SessionRefusal::NoIdentity)?;
        let session = Session {
            identity,
            token_id: claims.jti,
        };
        if self.sessions.len() >= USER_CACHE_MAX {
            self.sessions.clear();
        }
        self.sessions
            .insert(token.into(), (session.clone(), Instant::now(), claims.exp));
        Ok(session)
    }
}
