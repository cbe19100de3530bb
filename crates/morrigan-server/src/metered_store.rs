//! A [`Store`] decorator that times every call into `morrigan_store_duration_seconds{op}`.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use morrigan_protocol::records::{ClientCapabilities, ClientRecord, ConnectionRecord};

use crate::metrics::Metrics;
use crate::store::*;

pub struct MeteredStore {
    pub inner: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
}

#[async_trait]
impl Store for MeteredStore {
    async fn put_signing_key(&self, key: &SigningKeyRow) -> Result<()> {
        let started = Instant::now();
        let r = self.inner.put_signing_key(key).await;
        self.metrics
            .store_duration("put_signing_key", r.is_ok(), started.elapsed());
        r
    }
    async fn signing_key(&self, kid: &str) -> Result<Option<SigningKeyRow>> {
        let started = Instant::now();
        let r = self.inner.signing_key(kid).await;
        self.metrics
            .store_duration("signing_key", r.is_ok(), started.elapsed());
        r
    }
    async fn signing_keys(&self) -> Result<Vec<SigningKeyRow>> {
        let started = Instant::now();
        let r = self.inner.signing_keys().await;
        self.metrics
            .store_duration("signing_keys", r.is_ok(), started.elapsed());
        r
    }
    async fn register_node(&self, node: &NodeRow) -> Result<()> {
        let started = Instant::now();
        let r = self.inner.register_node(node).await;
        self.metrics
            .store_duration("register_node", r.is_ok(), started.elapsed());
        r
    }
    async fn renew_node(&self, id: &str, lease_expires: &str) -> Result<bool> {
        let started = Instant::now();
        let r = self.inner.renew_node(id, lease_expires).await;
        self.metrics
            .store_duration("renew_node", r.is_ok(), started.elapsed());
        r
    }
    async fn reap_nodes(&self, now: &str, except: &str) -> Result<Vec<NodeRow>> {
        let started = Instant::now();
        let r = self.inner.reap_nodes(now, except).await;
        self.metrics
            .store_duration("reap_nodes", r.is_ok(), started.elapsed());
        r
    }
    async fn stop_node(&self, id: &str, at: &str) -> Result<()> {
        let started = Instant::now();
        let r = self.inner.stop_node(id, at).await;
        self.metrics
            .store_duration("stop_node", r.is_ok(), started.elapsed());
        r
    }
    async fn nodes(&self) -> Result<Vec<NodeRow>> {
        let started = Instant::now();
        let r = self.inner.nodes().await;
        self.metrics
            .store_duration("nodes", r.is_ok(), started.elapsed());
        r
    }
    async fn count_identities(&self) -> Result<i64> {
        let started = Instant::now();
        let r = self.inner.count_identities().await;
        self.metrics
            .store_duration("count_identities", r.is_ok(), started.elapsed());
        r
    }
    async fn insert_identity(&self, row: &IdentityRow) -> Result<()> {
        let started = Instant::now();
        let r = self.inner.insert_identity(row).await;
        self.metrics
            .store_duration("insert_identity", r.is_ok(), started.elapsed());
        r
    }
    async fn identity(&self, id: &str) -> Result<Option<IdentityRow>> {
        let started = Instant::now();
        let r = self.inner.identity(id).await;
        self.metrics
            .store_duration("identity", r.is_ok(), started.elapsed());
        r
    }
    async fn identity_by_name(&self, name: &str) -> Result<Option<IdentityRow>> {
        let started = Instant::now();
        let r = self.inner.identity_by_name(name).await;
        self.metrics
            .store_duration("identity_by_name", r.is_ok(), started.elapsed());
        r
    }
    async fn identities(&self) -> Result<Vec<IdentityRow>> {
        let started = Instant::now();
        let r = self.inner.identities().await;
        self.metrics
            .store_duration("identities", r.is_ok(), started.elapsed());
        r
    }
    async fn update_identity(&self, row: &IdentityRow, full: &[&str]) -> Result<IdentityChange> {
        let started = Instant::now();
        let r = self.inner.update_identity(row, full).await;
        self.metrics
            .store_duration("update_identity", r.is_ok(), started.elapsed());
        r
    }
    async fn delete_identity(&self, id: &str, full: &[&str]) -> Result<IdentityChange> {
        let started = Instant::now();
        let r = self.inner.delete_identity(id, full).await;
        self.metrics
            .store_duration("delete_identity", r.is_ok(), started.elapsed());
        r
    }
    async fn insert_token(&self, row: &TokenRow) -> Result<()> {
        let started = Instant::now();
        let r = self.inner.insert_token(row).await;
        self.metrics
            .store_duration("insert_token", r.is_ok(), started.elapsed());
        r
    }
    async fn set_token_digest(&self, id: &str, digest: &str) -> Result<bool> {
        let started = Instant::now();
        let r = self.inner.set_token_digest(id, digest).await;
        self.metrics
            .store_duration("set_token_digest", r.is_ok(), started.elapsed());
        r
    }
    async fn live_token(&self, id: &str, now: &str) -> Result<Option<TokenRow>> {
        let started = Instant::now();
        let r = self.inner.live_token(id, now).await;
        self.metrics
            .store_duration("live_token", r.is_ok(), started.elapsed());
        r
    }
    async fn revoke_tokens(
        &self,
        kind: TokenKind,
        subject: &str,
        keep: Option<&str>,
    ) -> Result<u64> {
        let started = Instant::now();
        let r = self.inner.revoke_tokens(kind, subject, keep).await;
        self.metrics
            .store_duration("revoke_tokens", r.is_ok(), started.elapsed());
        r
    }
    async fn shorten_tokens(
        &self,
        kind: TokenKind,
        subject: &str,
        keep: &str,
        expires: &str,
    ) -> Result<u64> {
        let started = Instant::now();
        let r = self
            .inner
            .shorten_tokens(kind, subject, keep, expires)
            .await;
        self.metrics
            .store_duration("shorten_tokens", r.is_ok(), started.elapsed());
        r
    }
    async fn purge_expired_tokens(&self, now: &str) -> Result<u64> {
        let started = Instant::now();
        let r = self.inner.purge_expired_tokens(now).await;
        self.metrics
            .store_duration("purge_expired_tokens", r.is_ok(), started.elapsed());
        r
    }
    async fn upsert_client(&self, id: &str, now: &str) -> Result<ClientRecord> {
        let started = Instant::now();
        let r = self.inner.upsert_client(id, now).await;
        self.metrics
            .store_duration("upsert_client", r.is_ok(), started.elapsed());
        r
    }
    async fn client(&self, id: &str) -> Result<Option<ClientRecord>> {
        let started = Instant::now();
        let r = self.inner.client(id).await;
        self.metrics
            .store_duration("client", r.is_ok(), started.elapsed());
        r
    }
    async fn clients(&self) -> Result<Vec<ClientRecord>> {
        let started = Instant::now();
        let r = self.inner.clients().await;
        self.metrics
            .store_duration("clients", r.is_ok(), started.elapsed());
        r
    }
    async fn delete_client(&self, id: &str) -> Result<bool> {
        let started = Instant::now();
        let r = self.inner.delete_client(id).await;
        self.metrics
            .store_duration("delete_client", r.is_ok(), started.elapsed());
        r
    }
    async fn set_client_token(&self, id: &str, token_id: &str, now: &str) -> Result<bool> {
        let started = Instant::now();
        let r = self.inner.set_client_token(id, token_id, now).await;
        self.metrics
            .store_duration("set_client_token", r.is_ok(), started.elapsed());
        r
    }
    async fn set_client_state(&self, id: &str, state: &str, now: &str) -> Result<bool> {
        let started = Instant::now();
        let r = self.inner.set_client_state(id, state, now).await;
        self.metrics
            .store_duration("set_client_state", r.is_ok(), started.elapsed());
        r
    }
    async fn set_capabilities(&self, id: &str, capabilities: &str, now: &str) -> Result<bool> {
        let started = Instant::now();
        let r = self.inner.set_capabilities(id, capabilities, now).await;
        self.metrics
            .store_duration("set_capabilities", r.is_ok(), started.elapsed());
        r
    }
    async fn capabilities(&self, id: &str) -> Result<Option<ClientCapabilities>> {
        let started = Instant::now();
        let r = self.inner.capabilities(id).await;
        self.metrics
            .store_duration("capabilities", r.is_ok(), started.elapsed());
        r
    }
    async fn issue_connection(
        &self,
        record: &ConnectionRecord,
        token_digest: &str,
        token_expires: &str,
        identity_token: &str,
        identity: Proof<'_>,
    ) -> Result<bool> {
        let started = Instant::now();
        let r = self
            .inner
            .issue_connection(
                record,
                token_digest,
                token_expires,
                identity_token,
                identity,
            )
            .await;
        self.metrics
            .store_duration("issue_connection", r.is_ok(), started.elapsed());
        r
    }
    async fn connection(&self, id: &str) -> Result<Option<ConnectionRecord>> {
        let started = Instant::now();
        let r = self.inner.connection(id).await;
        self.metrics
            .store_duration("connection", r.is_ok(), started.elapsed());
        r
    }
    async fn connections(&self, filter: &ConnectionFilter) -> Result<Vec<ConnectionRecord>> {
        let started = Instant::now();
        let r = self.inner.connections(filter).await;
        self.metrics
            .store_duration("connections", r.is_ok(), started.elapsed());
        r
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
        let started = Instant::now();
        let r = self
            .inner
            .accept_connection(id, token_id, proof, server_id, address, now)
            .await;
        self.metrics
            .store_duration("accept_connection", r.is_ok(), started.elapsed());
        r
    }
    async fn open_connections_of_client(
        &self,
        client_id: &str,
        except: &str,
    ) -> Result<Vec<ConnectionRecord>> {
        let started = Instant::now();
        let r = self
            .inner
            .open_connections_of_client(client_id, except)
            .await;
        self.metrics
            .store_duration("open_connections_of_client", r.is_ok(), started.elapsed());
        r
    }
    async fn close_connection(&self, id: &str, close: &CloseInfo<'_>) -> Result<bool> {
        let started = Instant::now();
        let r = self.inner.close_connection(id, close).await;
        self.metrics
            .store_duration("close_connection", r.is_ok(), started.elapsed());
        r
    }
    async fn close_client_connections(
        &self,
        client_id: &str,
        close: &CloseInfo<'_>,
    ) -> Result<Vec<ConnectionRecord>> {
        let started = Instant::now();
        let r = self.inner.close_client_connections(client_id, close).await;
        self.metrics
            .store_duration("close_client_connections", r.is_ok(), started.elapsed());
        r
    }
    async fn close_node_connections(&self, server_id: &str, close: &CloseInfo<'_>) -> Result<u64> {
        let started = Instant::now();
        let r = self.inner.close_node_connections(server_id, close).await;
        self.metrics
            .store_duration("close_node_connections", r.is_ok(), started.elapsed());
        r
    }
    async fn record_heartbeats(&self, beats: &[Heartbeat]) -> Result<()> {
        let started = Instant::now();
        let r = self.inner.record_heartbeats(beats).await;
        self.metrics
            .store_duration("record_heartbeats", r.is_ok(), started.elapsed());
        r
    }
    async fn expire_pending_connections(&self, now: &str) -> Result<u64> {
        let started = Instant::now();
        let r = self.inner.expire_pending_connections(now).await;
        self.metrics
            .store_duration("expire_pending_connections", r.is_ok(), started.elapsed());
        r
    }
    async fn purge_closed_connections(&self, before: &str) -> Result<u64> {
        let started = Instant::now();
        let r = self.inner.purge_closed_connections(before).await;
        self.metrics
            .store_duration("purge_closed_connections", r.is_ok(), started.elapsed());
        r
    }
    async fn stash_payload(&self, id: &str, body: &str, now: &str) -> Result<()> {
        let started = Instant::now();
        let r = self.inner.stash_payload(id, body, now).await;
        self.metrics
            .store_duration("stash_payload", r.is_ok(), started.elapsed());
        r
    }
    async fn take_payload(&self, id: &str) -> Result<Option<String>> {
        let started = Instant::now();
        let r = self.inner.take_payload(id).await;
        self.metrics
            .store_duration("take_payload", r.is_ok(), started.elapsed());
        r
    }
    async fn purge_payloads(&self, before: &str) -> Result<u64> {
        let started = Instant::now();
        let r = self.inner.purge_payloads(before).await;
        self.metrics
            .store_duration("purge_payloads", r.is_ok(), started.elapsed());
        r
    }
}
