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

use crate::metrics::Metrics;
use crate::store::*;

pub struct MeteredStore {
    pub inner: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub deadline: Deadline,
}

impl MeteredStore {
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

#[async_trait]
impl Store for MeteredStore {
    async fn put_signing_key(&self, key: &SigningKeyRow) -> Result<()> {
        self.timed("put_signing_key", self.inner.put_signing_key(key))
            .await
    }
    async fn signing_key(&self, kid: &str) -> Result<Option<SigningKeyRow>> {
        self.timed("signing_key", self.inner.signing_key(kid)).await
    }
    async fn signing_keys(&self) -> Result<Vec<SigningKeyRow>> {
        self.timed("signing_keys", self.inner.signing_keys()).await
    }
    async fn register_node(&self, node: &NodeRow) -> Result<()> {
        self.timed("register_node", self.inner.register_node(node))
            .await
    }
    async fn renew_node(&self, id: &str, lease_expires: &str) -> Result<bool> {
        self.timed("renew_node", self.inner.renew_node(id, lease_expires))
            .await
    }
    async fn reap_nodes(&self, now: &str, except: &str) -> Result<Vec<NodeRow>> {
        self.timed("reap_nodes", self.inner.reap_nodes(now, except))
            .await
    }
    async fn stop_node(&self, id: &str, at: &str) -> Result<()> {
        self.timed("stop_node", self.inner.stop_node(id, at)).await
    }
    async fn nodes(&self) -> Result<Vec<NodeRow>> {
        self.timed("nodes", self.inner.nodes()).await
    }
    async fn count_identities(&self) -> Result<i64> {
        self.timed("count_identities", self.inner.count_identities())
            .await
    }
    async fn insert_identity(&self, row: &IdentityRow) -> Result<()> {
        self.timed("insert_identity", self.inner.insert_identity(row))
            .await
    }
    async fn identity(&self, id: &str) -> Result<Option<IdentityRow>> {
        self.timed("identity", self.inner.identity(id)).await
    }
    async fn identity_by_name(&self, name: &str) -> Result<Option<IdentityRow>> {
        self.timed("identity_by_name", self.inner.identity_by_name(name))
            .await
    }
    async fn identities(&self) -> Result<Vec<IdentityRow>> {
        self.timed("identities", self.inner.identities()).await
    }
    async fn update_identity(&self, row: &IdentityRow, full: &[&str]) -> Result<IdentityChange> {
        self.timed("update_identity", self.inner.update_identity(row, full))
            .await
    }
    async fn delete_identity(&self, id: &str, full: &[&str]) -> Result<IdentityChange> {
        self.timed("delete_identity", self.inner.delete_identity(id, full))
            .await
    }
    async fn insert_token(&self, row: &TokenRow) -> Result<()> {
        self.timed("insert_token", self.inner.insert_token(row))
            .await
    }
    async fn set_token_digest(&self, id: &str, digest: &str) -> Result<bool> {
        self.timed("set_token_digest", self.inner.set_token_digest(id, digest))
            .await
    }
    async fn live_token(&self, id: &str, now: &str) -> Result<Option<TokenRow>> {
        self.timed("live_token", self.inner.live_token(id, now))
            .await
    }
    async fn revoke_tokens(
        &self,
        kind: TokenKind,
        subject: &str,
        keep: Option<&str>,
    ) -> Result<u64> {
        self.timed(
            "revoke_tokens",
            self.inner.revoke_tokens(kind, subject, keep),
        )
        .await
    }
    async fn shorten_tokens(
        &self,
        kind: TokenKind,
        subject: &str,
        keep: &str,
        expires: &str,
    ) -> Result<u64> {
        self.timed(
            "shorten_tokens",
            self.inner.shorten_tokens(kind, subject, keep, expires),
        )
        .await
    }
    async fn purge_expired_tokens(&self, now: &str) -> Result<u64> {
        self.timed("purge_expired_tokens", self.inner.purge_expired_tokens(now))
            .await
    }
    async fn upsert_client(&self, id: &str, now: &str) -> Result<ClientRecord> {
        self.timed("upsert_client", self.inner.upsert_client(id, now))
            .await
    }
    async fn client(&self, id: &str) -> Result<Option<ClientRecord>> {
        self.timed("client", self.inner.client(id)).await
    }
    async fn clients(&self) -> Result<Vec<ClientRecord>> {
        self.timed("clients", self.inner.clients()).await
    }
    async fn delete_client(&self, id: &str) -> Result<bool> {
        self.timed("delete_client", self.inner.delete_client(id))
            .await
    }
    async fn set_client_token(&self, id: &str, token_id: &str, now: &str) -> Result<bool> {
        self.timed(
            "set_client_token",
            self.inner.set_client_token(id, token_id, now),
        )
        .await
    }
    async fn set_client_state(&self, id: &str, state: &str, now: &str) -> Result<bool> {
        self.timed(
            "set_client_state",
            self.inner.set_client_state(id, state, now),
        )
        .await
    }
    async fn set_capabilities(&self, id: &str, capabilities: &str, now: &str) -> Result<bool> {
        self.timed(
            "set_capabilities",
            self.inner.set_capabilities(id, capabilities, now),
        )
        .await
    }
    async fn capabilities(&self, id: &str) -> Result<Option<ClientCapabilities>> {
        self.timed("capabilities", self.inner.capabilities(id))
            .await
    }
    async fn issue_connection(
        &self,
        record: &ConnectionRecord,
        token_digest: &str,
        token_expires: &str,
        identity_token: &str,
        identity: Proof<'_>,
    ) -> Result<bool> {
        self.timed(
            "issue_connection",
            self.inner.issue_connection(
                record,
                token_digest,
                token_expires,
                identity_token,
                identity,
            ),
        )
        .await
    }
    async fn connection(&self, id: &str) -> Result<Option<ConnectionRecord>> {
        self.timed("connection", self.inner.connection(id)).await
    }
    async fn connections(&self, filter: &ConnectionFilter) -> Result<Vec<ConnectionRecord>> {
        self.timed("connections", self.inner.connections(filter))
            .await
    }
    async fn accept_connection(
        &self,
        id: &str,
        token_id: &str,
        proof: Proof<'_>,
        server_id: &str,
        address: &str,
        now: &str,
    ) -> Result<Option<ConnectionRecord>> {
        self.timed(
            "accept_connection",
            self.inner
                .accept_connection(id, token_id, proof, server_id, address, now),
        )
        .await
    }
    async fn open_connections_of_client(
        &self,
        client_id: &str,
        except: &str,
    ) -> Result<Vec<ConnectionRecord>> {
        self.timed(
            "open_connections_of_client",
            self.inner.open_connections_of_client(client_id, except),
        )
        .await
    }
    async fn close_connection(&self, id: &str, close: &CloseInfo<'_>) -> Result<bool> {
        self.timed("close_connection", self.inner.close_connection(id, close))
            .await
    }
    async fn close_client_connections(
        &self,
        client_id: &str,
        close: &CloseInfo<'_>,
    ) -> Result<Vec<ConnectionRecord>> {
        self.timed(
            "close_client_connections",
            self.inner.close_client_connections(client_id, close),
        )
        .await
    }
    async fn close_node_connections(&self, server_id: &str, close: &CloseInfo<'_>) -> Result<u64> {
        self.timed(
            "close_node_connections",
            self.inner.close_node_connections(server_id, close),
        )
        .await
    }
    async fn record_heartbeats(&self, beats: &[Heartbeat]) -> Result<()> {
        self.timed("record_heartbeats", self.inner.record_heartbeats(beats))
            .await
    }
    async fn expire_pending_connections(&self, now: &str) -> Result<u64> {
        self.timed(
            "expire_pending_connections",
            self.inner.expire_pending_connections(now),
        )
        .await
    }
    async fn purge_closed_connections(&self, before: &str) -> Result<u64> {
        self.timed(
            "purge_closed_connections",
            self.inner.purge_closed_connections(before),
        )
        .await
    }
    async fn stash_payload(&self, id: &str, body: &str, now: &str) -> Result<()> {
        self.timed("stash_payload", self.inner.stash_payload(id, body, now))
            .await
    }
    async fn take_payload(&self, id: &str) -> Result<Option<String>> {
        self.timed("take_payload", self.inner.take_payload(id))
            .await
    }
    async fn purge_payloads(&self, before: &str) -> Result<u64> {
        self.timed("purge_payloads", self.inner.purge_payloads(before))
            .await
    }
}
