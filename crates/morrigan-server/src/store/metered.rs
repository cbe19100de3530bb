//! A [`Store`] decorator that bounds every call by the store deadline and times it into
//! `morrigan_store_duration_seconds{op}`.
//!
//! A call that has not answered by its deadline fails with [`StoreError::Timeout`] (a REST
//! request answers 503), so a store outage never hangs a request, a connection task or
//! shutdown. The backends give up on the statement first (see [`Deadline`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use morrigan_protocol::records::{ClientCapabilities, ClientRecord, ConnectionRecord};

use super::messages::{Answer, Committed, MessageFilter, MessageRow, NewMessage, Settled};
use super::*;
use crate::metrics::Metrics;

pub struct MeteredStore {
    pub inner: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub deadline: Deadline,
}

impl MeteredStore {
    /// Runs `call` under the deadline and records its duration as `op`.
    async fn timed<T>(&self, op: &'static str, call: impl Future<Output = Result<T>>) -> Result<T> {
        let started = Instant::now();
        let r = tokio::time::timeout(self.deadline.call(), call)
            .await
            .unwrap_or(Err(StoreError::Timeout(self.deadline.call())));
        self.metrics
            .store_duration(op, r.is_ok(), started.elapsed());
        r
    }
}

/// Implements `$trait` for [`MeteredStore`]: each method, one line, runs the inner store's
/// method of the same name through [`MeteredStore::timed`], labelled with its name.
macro_rules! metered {
    ($trait:ident { $(fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)* }) => {
        #[async_trait]
        impl $trait for MeteredStore {
            $(async fn $name(&self, $($arg: $ty),*) -> Result<$ret> {
                self.timed(stringify!($name), self.inner.$name($($arg),*)).await
            })*
        }
    };
}

metered!(KeyStore {
    fn put_signing_key(key: &SigningKeyRow) -> ();
    fn signing_key(kid: &str) -> Option<SigningKeyRow>;
    fn signing_keys() -> Vec<SigningKeyRow>;
});

metered!(NodeStore {
    fn register_node(node: &NodeRow) -> ();
    fn renew_node(id: &str, lease_expires: &str) -> bool;
    fn reap_nodes(now: &str, except: &str) -> Vec<NodeRow>;
    fn stop_node(id: &str, at: &str) -> ();
    fn nodes() -> Vec<NodeRow>;
});

metered!(IdentityStore {
    fn count_identities() -> i64;
    fn insert_identity(row: &IdentityRow) -> ();
    fn identity(id: &str) -> Option<IdentityRow>;
    fn identity_by_name(name: &str) -> Option<IdentityRow>;
    fn identities() -> Vec<IdentityRow>;
    fn update_identity(row: &IdentityRow, full: &[&str]) -> IdentityChange;
    fn delete_identity(id: &str, full: &[&str]) -> IdentityChange;
});

metered!(TokenStore {
    fn insert_token(row: &TokenRow) -> ();
    fn set_token_digest(id: &str, digest: &str) -> bool;
    fn live_token(id: &str, now: &str) -> Option<TokenRow>;
    fn revoke_tokens(kind: TokenKind, subject: &str, keep: Option<&str>) -> u64;
    fn shorten_tokens(kind: TokenKind, subject: &str, keep: &str, expires: &str) -> u64;
    fn purge_expired_tokens(now: &str) -> u64;
});

metered!(ClientStore {
    fn upsert_client(id: &str, now: &str) -> ClientRecord;
    fn client(id: &str) -> Option<ClientRecord>;
    fn clients() -> Vec<ClientRecord>;
    fn delete_client(id: &str) -> bool;
    fn set_client_token(id: &str, token_id: &str, now: &str) -> bool;
    fn set_client_state(id: &str, state: &str, now: &str) -> bool;
    fn set_capabilities(id: &str, capabilities: &str, now: &str) -> bool;
    fn capabilities(id: &str) -> Option<ClientCapabilities>;
});

metered!(ConnectionStore {
    fn issue_connection(
        record: &ConnectionRecord,
        token_digest: &str,
        token_expires: &str,
        identity_token: &str,
        identity: Proof<'_>
    ) -> bool;
    fn connection(id: &str) -> Option<ConnectionRecord>;
    fn connections(filter: &ConnectionFilter) -> Vec<ConnectionRecord>;
    fn accept_connection(
        id: &str,
        token_id: &str,
        proof: Proof<'_>,
        server_id: &str,
        address: &str,
        now: &str
    ) -> Option<ConnectionRecord>;
    fn open_connections_of_client(client_id: &str, except: &str) -> Vec<ConnectionRecord>;
    fn close_connection(id: &str, close: &CloseInfo<'_>) -> bool;
    fn close_client_connections(client_id: &str, close: &CloseInfo<'_>) -> Vec<ConnectionRecord>;
    fn close_node_connections(server_id: &str, close: &CloseInfo<'_>) -> u64;
    fn record_heartbeats(beats: &[Heartbeat]) -> ();
    fn expire_pending_connections(now: &str) -> u64;
    fn purge_closed_connections(before: &str) -> u64;
});

metered!(MessageStore {
    fn insert_message(m: &NewMessage<'_>) -> (MessageRow, bool);
    fn queue_message(m: &NewMessage<'_>) -> Committed;
    fn insert_uplink(m: &NewMessage<'_>, keep: u32) -> ();
    fn message(id: &str) -> Option<MessageRow>;
    fn message_by_key(client_id: &str, key: &str) -> Option<MessageRow>;
    fn messages(filter: &MessageFilter<'_>) -> Vec<MessageRow>;
    fn outbox_usage(client_id: &str) -> (i64, i64);
    fn pending_messages(client_id: &str, connection_id: &str, now: &str, limit: u32) -> Vec<MessageRow>;
    fn any_pending_messages() -> bool;
    fn mark_written(id: &str, connection_id: &str, at: &str) -> Option<MessageRow>;
    fn settle_message(id: &str, client_id: &str, answer: Answer<'_>, at: &str) -> Settled;
    fn fail_message(id: &str, reason: &str, at: &str) -> Option<MessageRow>;
    fn requeue_messages(connection_id: &str) -> Vec<MessageRow>;
    fn fail_client_messages(client_id: &str, reason: &str, at: &str) -> u64;
    fn expire_messages(now: &str, limit: u32) -> Vec<MessageRow>;
    fn purge_messages(before: &str, limit: u32) -> u64;
});

metered!(PayloadStore {
    fn stash_payload(id: &str, body: &str, now: &str) -> ();
    fn take_payload(id: &str) -> Option<String>;
    fn purge_payloads(before: &str) -> u64;
});
