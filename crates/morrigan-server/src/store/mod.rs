//! Persistence. [`Store`] is the one interface the rest of the server uses; each backend is one
//! file beside this one ([`sqlite`] now, PostgreSQL for clusters next). The trait speaks in
//! protocol records and plain strings: no backend type leaks through it.
//!
//! Timestamps are stored as fixed-width ISO 8601 UTC text (see
//! [`morrigan_protocol::time_format`]), so ordering and range queries are plain string
//! comparisons on every backend.

pub(crate) mod batch;
pub(crate) mod identities;
pub mod postgres;
pub(crate) mod sql;
pub mod sqlite;

use async_trait::async_trait;
use morrigan_protocol::records::{ClientCapabilities, ClientRecord, ConnectionRecord};

/// Store failures. Backend errors are wrapped, not exposed by type. `Clone`, so that one failed
/// batch can answer each of its callers.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// A uniqueness constraint was violated (e.g. an identity name already in use).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The database failed.
    #[error("database error: {0}")]
    Database(String),
    /// Stored data could not be decoded.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The call did not answer within the store deadline (see [`Deadline`]).
    #[error("the store did not answer within {0:?}")]
    Timeout(std::time::Duration),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// How long one store call may take (`Config::store_timeout`), and how the backends divide it.
///
/// Every call is abandoned at the deadline (by `MeteredStore`). A timed-out call must not be
/// carried out later, so the backend gives up first: a pooled connection is waited for at most
/// [`Deadline::acquire`], and one statement runs at most [`Deadline::statement`] (SQLite's
/// busy timeout, PostgreSQL's `statement_timeout`). A statement that starts within the first
/// quarter of the call therefore ends, done or refused, before the caller is told it failed;
/// the group-commit batches ([`batch`]) start no request with less than
/// [`Deadline::started_bound`] left. What remains is a statement that stalls on I/O after it
/// started (a hung disk, a lost reply from PostgreSQL): see ARCHITECTURE.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(pub std::time::Duration);

impl Deadline {
    /// The default store deadline: under every REST client's and the cluster bus's timeouts.
    pub const DEFAULT: Deadline = Deadline(std::time::Duration::from_secs(5));

    /// The whole call.
    pub fn call(self) -> std::time::Duration {
        self.0
    }

    /// The longest wait for a pooled connection (a quarter of the call).
    pub fn acquire(self) -> std::time::Duration {
        self.0 / 4
    }

    /// The longest the backend works on one statement (half of the call).
    pub fn statement(self) -> std::time::Duration {
        self.0 / 2
    }

    /// The longest a statement takes once its call asked for a connection: a request is only
    /// started with at least this much of its deadline left.
    pub fn started_bound(self) -> std::time::Duration {
        self.acquire() + self.statement()
    }
}

/// What shows that a presented token is the one a node issued, for the statements that
/// consume it ([`Store::issue_connection`], [`Store::accept_connection`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof<'a> {
    /// The token's [`crate::tokens::digest`]: the statement requires the stored one to match.
    Digest(&'a str),
    /// The caller checked the signature (tokens recorded before digests were kept).
    Signature,
}

impl Proof<'_> {
    /// The digest to bind: `NULL` makes the statement's digest condition hold.
    pub(crate) fn digest(self) -> Option<String> {
        match self {
            Proof::Digest(d) => Some(d.to_string()),
            Proof::Signature => None,
        }
    }
}

/// The kinds of token the server issues; each has its own lifetime and audience.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// An operator's session token (30 minutes).
    User,
    /// A device's long-lived identity token (30 days).
    Identity,
}

impl TokenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::User => "user",
            TokenKind::Identity => "identity",
        }
    }
}

/// A revocable token's record. Connection tokens have none: their connection record is their
/// record, and accepting the connection consumes them.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRow {
    pub id: String,
    pub kind: TokenKind,
    pub subject: String,
    pub issuer: String,
    pub issued: String,
    pub expires: String,
    /// [`crate::tokens::digest`] of the token's text; `None` for tokens recorded before digests
    /// were kept.
    pub digest: Option<String>,
}

impl TokenRow {
    /// The record of a token just issued (its `jti`, `sub`, `iss`, `iat`, `exp` and digest).
    pub fn issued(kind: TokenKind, issued: &crate::tokens::Issued) -> Self {
        Self {
            digest: Some(crate::tokens::digest(&issued.token)),
            ..Self::from_claims(kind, &issued.claims)
        }
    }

    /// The record of a token from its claims, without a digest.
    pub fn from_claims(kind: TokenKind, claims: &morrigan_protocol::api::Claims) -> Self {
        let at = |t: i64| {
            time::OffsetDateTime::from_unix_timestamp(t)
                .map(morrigan_protocol::time_format::format)
                .unwrap_or_default()
        };
        Self {
            id: claims.jti.clone(),
            kind,
            subject: claims.sub.clone(),
            issuer: claims.iss.clone(),
            issued: at(claims.iat),
            expires: at(claims.exp),
            digest: None,
        }
    }
}

/// The public half of a node's signing key. Any node verifies any node's tokens with it.
#[derive(Debug, Clone, PartialEq)]
pub struct SigningKeyRow {
    pub kid: String,
    pub node_id: String,
    /// Raw 32-byte Ed25519 public key.
    pub public_key: Vec<u8>,
    pub created: String,
}

/// An operator identity with its password hash (PHC string, argon2id).
#[derive(Debug, Clone, PartialEq)]
pub struct IdentityRow {
    pub id: String,
    pub name: String,
    pub functions: Vec<String>,
    pub password_hash: String,
    pub created: String,
    pub updated: String,
}

/// What a guarded identity change did ([`Store::update_identity`], [`Store::delete_identity`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityChange {
    Done,
    /// No such identity.
    NotFound,
    /// Refused: it is the last identity holding every function asked to be kept, and would
    /// no longer be.
    LastFull,
}

/// A coalesced heartbeat observation, written in batches (never one write per pong).
#[derive(Debug, Clone, PartialEq)]
pub struct Heartbeat {
    pub connection_id: String,
    pub alive: bool,
    pub last_heartbeat: Option<String>,
}

/// A node of the cluster: the wire record itself (the store keeps nothing more).
pub use morrigan_protocol::records::NodeRecord as NodeRow;

/// Filters for listing connection records.
#[derive(Debug, Clone, Default)]
pub struct ConnectionFilter {
    pub client_id: Option<String>,
    pub server_id: Option<String>,
    pub open: Option<bool>,
    pub limit: u32,
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq)]
pub struct CloseInfo<'a> {
    pub at: &'a str,
    pub code: u16,
    pub reason: &'a str,
}

/// Everything the server persists.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    // --- signing keys ---
    async fn put_signing_key(&self, key: &SigningKeyRow) -> Result<()>;
    async fn signing_key(&self, kid: &str) -> Result<Option<SigningKeyRow>>;
    async fn signing_keys(&self) -> Result<Vec<SigningKeyRow>>;

    // --- nodes ---
    /// Registers or re-registers a node as running.
    async fn register_node(&self, node: &NodeRow) -> Result<()>;
    /// Extends a running node's lease; false if the node was declared lost meanwhile.
    async fn renew_node(&self, id: &str, lease_expires: &str) -> Result<bool>;
    /// Atomically marks every running node (other than `except`) whose lease lapsed before
    /// `now` as `lost` and returns them: exactly one survivor gets each lost node.
    async fn reap_nodes(&self, now: &str, except: &str) -> Result<Vec<NodeRow>>;
    async fn stop_node(&self, id: &str, at: &str) -> Result<()>;
    async fn nodes(&self) -> Result<Vec<NodeRow>>;

    // --- identities (operators) ---
    async fn count_identities(&self) -> Result<i64>;
    /// Fails with [`StoreError::Conflict`] when the name is taken.
    async fn insert_identity(&self, row: &IdentityRow) -> Result<()>;
    async fn identity(&self, id: &str) -> Result<Option<IdentityRow>>;
    async fn identity_by_name(&self, name: &str) -> Result<Option<IdentityRow>>;
    async fn identities(&self) -> Result<Vec<IdentityRow>>;
    /// Replaces name, functions and hash, unless the identity is the last one holding every
    /// function in `full` and the new functions do not. Atomic: concurrent changes cannot
    /// together leave no identity holding all of `full` (see `store/identities.rs`).
    async fn update_identity(&self, row: &IdentityRow, full: &[&str]) -> Result<IdentityChange>;
    /// Deletes the identity and its user tokens, unless it is the last one holding every
    /// function in `full`; atomic like [`Store::update_identity`].
    async fn delete_identity(&self, id: &str, full: &[&str]) -> Result<IdentityChange>;

    // --- revocable tokens ---
    async fn insert_token(&self, row: &TokenRow) -> Result<()>;
    /// Records the digest of a token recorded without one (before digests were kept), once its
    /// signature has been checked; false if it has one already or does not exist.
    async fn set_token_digest(&self, id: &str, digest: &str) -> Result<bool>;
    /// The token's record if it exists and has not expired at `now`.
    async fn live_token(&self, id: &str, now: &str) -> Result<Option<TokenRow>>;
    /// Deletes every token of `subject` of this kind except `keep`.
    async fn revoke_tokens(
        &self,
        kind: TokenKind,
        subject: &str,
        keep: Option<&str>,
    ) -> Result<u64>;
    /// Moves the expiry of every other token of `subject` to at most `expires` (a grace period
    /// after a refresh, so a device that lost the new token can still come back once).
    async fn shorten_tokens(
        &self,
        kind: TokenKind,
        subject: &str,
        keep: &str,
        expires: &str,
    ) -> Result<u64>;
    async fn purge_expired_tokens(&self, now: &str) -> Result<u64>;

    // --- clients (devices) ---
    /// Creates the client if absent (else bumps `updated`) and returns it.
    async fn upsert_client(&self, id: &str, now: &str) -> Result<ClientRecord>;
    async fn client(&self, id: &str) -> Result<Option<ClientRecord>>;
    async fn clients(&self) -> Result<Vec<ClientRecord>>;
    /// Deletes the client, its tokens and its capabilities; false if it did not exist.
    async fn delete_client(&self, id: &str) -> Result<bool>;
    async fn set_client_token(&self, id: &str, token_id: &str, now: &str) -> Result<bool>;
    async fn set_client_state(&self, id: &str, state: &str, now: &str) -> Result<bool>;
    async fn set_capabilities(&self, id: &str, capabilities: &str, now: &str) -> Result<bool>;
    async fn capabilities(&self, id: &str) -> Result<Option<ClientCapabilities>>;

    // --- connections ---
    /// Inserts a pending connection (token issued, not yet used) whose token has the digest
    /// `token_digest` and expires at `token_expires`, if and only if the identity token
    /// `identity_token` is live at `record.created` (and matches `identity`) and
    /// `record.client_id` is still provisioned: false otherwise, and the caller reads which (the
    /// rare path). One statement, batched with concurrent exchanges.
    async fn issue_connection(
        &self,
        record: &ConnectionRecord,
        token_digest: &str,
        token_expires: &str,
        identity_token: &str,
        identity: Proof<'_>,
    ) -> Result<bool>;
    async fn connection(&self, id: &str) -> Result<Option<ConnectionRecord>>;
    async fn connections(&self, filter: &ConnectionFilter) -> Result<Vec<ConnectionRecord>>;
    /// Atomically consumes the connection token `token_id` of connection `id` (shown by `proof`)
    /// and marks it connected on `server_id`. Returns `None` when the token was already used,
    /// the record is closed, the token expired, the digest does not match or the client is no
    /// longer provisioned: this single statement is what makes tokens single-use, and what
    /// keeps a connection token issued while its client was being deprovisioned unusable.
    async fn accept_connection(
        &self,
        id: &str,
        token_id: &str,
        proof: Proof<'_>,
        server_id: &str,
        address: &str,
        now: &str,
    ) -> Result<Option<ConnectionRecord>>;
    /// Open connections of a client other than `except` (for supersede).
    async fn open_connections_of_client(
        &self,
        client_id: &str,
        except: &str,
    ) -> Result<Vec<ConnectionRecord>>;
    /// Closes one connection record if it is open; false if it was already closed or unknown.
    async fn close_connection(&self, id: &str, close: &CloseInfo<'_>) -> Result<bool>;
    /// Closes every open connection of a client; returns the ones it closed.
    async fn close_client_connections(
        &self,
        client_id: &str,
        close: &CloseInfo<'_>,
    ) -> Result<Vec<ConnectionRecord>>;
    /// Closes every open record held by `server_id` (crash recovery, lease expiry).
    async fn close_node_connections(&self, server_id: &str, close: &CloseInfo<'_>) -> Result<u64>;
    /// Writes a batch of coalesced heartbeats to open records.
    async fn record_heartbeats(&self, beats: &[Heartbeat]) -> Result<()>;
    /// Closes pending records whose token expired unused.
    async fn expire_pending_connections(&self, now: &str) -> Result<u64>;
    /// Deletes closed records that ended before `before` (retention).
    async fn purge_closed_connections(&self, before: &str) -> Result<u64>;

    // --- cluster bus payloads too large for the transport ---
    async fn stash_payload(&self, id: &str, body: &str, now: &str) -> Result<()>;
    /// Returns and deletes a stashed payload.
    async fn take_payload(&self, id: &str) -> Result<Option<String>>;
    async fn purge_payloads(&self, before: &str) -> Result<u64>;
}
