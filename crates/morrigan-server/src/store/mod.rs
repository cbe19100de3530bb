//! Persistence, split by aggregate: one trait per kind of record ([`KeyStore`], [`NodeStore`],
//! [`IdentityStore`], [`TokenStore`], [`ClientStore`], [`ConnectionStore`], [`PayloadStore`],
//! [`MessageStore`]),
//! so each part of the server names only what it uses; [`Store`] is all of them, what a backend
//! implements and what the node holds.
//!
//! Each aggregate's file holds its trait, its rows and its SQL (as a macro that the backends
//! instantiate for their pool type: the statements are portable, see [`sql`]). Each backend is
//! one file ([`sqlite`], the embedded default; [`postgres`], for clusters) that opens its pool
//! and runs its migrations. [`metered`] bounds and times every call. The traits speak in
//! protocol records, rows and plain strings: no backend type leaks through them.
//!
//! Timestamps are stored as fixed-width ISO 8601 UTC text (see
//! [`morrigan_protocol::time_format`]), so ordering and range queries are plain string
//! comparisons on every backend.

pub(crate) mod batch;
mod clients;
mod connections;
mod hot_path;
mod identities;
mod keys;
mod message_path;
pub mod messages;
pub(crate) mod metered;
mod nodes;
mod payloads;
pub mod postgres;
pub(crate) mod sql;
pub mod sqlite;
mod sqlite_messages;
mod sqlite_writer;
mod tokens;

pub use clients::ClientStore;
pub use connections::{CloseInfo, ConnectionFilter, ConnectionStore, Heartbeat};
pub use identities::{IdentityChange, IdentityRow, IdentityStore};
pub use keys::{KeyStore, SigningKeyRow};
pub use messages::MessageStore;
pub use nodes::{NodeRow, NodeStore};
pub use payloads::PayloadStore;
pub use tokens::{TokenKind, TokenRow, TokenStore};

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

/// Everything the server persists: what a backend implements and the node holds. Parts of the
/// server that need one aggregate take that trait instead.
pub trait Store:
    KeyStore
    + NodeStore
    + IdentityStore
    + TokenStore
    + ClientStore
    + ConnectionStore
    + PayloadStore
    + MessageStore
{
}

impl<T> Store for T where
    T: KeyStore
        + NodeStore
        + IdentityStore
        + TokenStore
        + ClientStore
        + ConnectionStore
        + PayloadStore
        + MessageStore
        + ?Sized
{
}

/// How long one store call may take (`Config::store_timeout`), and how the backends divide it.
///
/// Every call is abandoned at the deadline (by [`metered::MeteredStore`]). A timed-out call must
/// not be carried out later, so the backend gives up first: a pooled connection is waited for
/// at most [`Deadline::acquire`], and one statement runs at most [`Deadline::statement`]
/// (SQLite's busy timeout, PostgreSQL's `statement_timeout`). A statement that starts within
/// the first quarter of the call therefore ends, done or refused, before the caller is told it
/// failed; the group-commit batches ([`batch`]) start no request with less than
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
/// consume it ([`ConnectionStore::issue_connection`], [`ConnectionStore::accept_connection`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof<'a> {
    /// The digest of the token's text: the statement requires the stored one to match.
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
