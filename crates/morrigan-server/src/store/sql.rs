//! The SQL shared by the SQL backends. The statements are portable (`$n` placeholders,
//! `TRUE`/`FALSE`, `ON CONFLICT`, `RETURNING`, text timestamps), so one body implements
//! [`Store`](super::Store) for each backend's pool type; each backend file
//! (`sqlite.rs`, `postgres.rs`) only opens its pool, runs its own migrations and invokes
//! [`sql_store!`].

use super::StoreError;

/// The columns of a connection record, as a literal so that statements stay `&'static str`.
macro_rules! conn_cols {
    () => {
        "id, client_id, server_id, token_id, client_address, connected, alive, open, \
         last_heartbeat, disconnected, report_url, created, close_code, close_reason"
    };
}
pub(crate) use conn_cols;

/// Maps a driver error; unique violations become [`StoreError::Conflict`].
pub(crate) fn db(e: sqlx::Error) -> StoreError {
    if let sqlx::Error::Database(d) = &e
        && d.is_unique_violation()
    {
        return StoreError::Conflict(d.message().to_string());
    }
    StoreError::Database(e.to_string())
}

/// A pending connection to record if its identity token is live at `record.created` and its
/// client is still provisioned (see [`Store::issue_connection`](super::Store::issue_connection)).
pub(crate) struct IssueRequest {
    pub record: morrigan_protocol::records::ConnectionRecord,
    pub token_digest: String,
    pub token_expires: String,
    pub identity_token: String,
    /// `None` when the caller checked the identity token's signature.
    pub identity_digest: Option<String>,
}

/// A connection token to consume (see [`Store::accept_connection`](super::Store::accept_connection)).
pub(crate) struct AcceptRequest {
    pub id: String,
    pub token_id: String,
    /// `None` when the caller checked the connection token's signature.
    pub token_digest: Option<String>,
    pub server_id: String,
    pub address: String,
    pub now: String,
}

/// A record to close (see [`Store::close_connection`](super::Store::close_connection)).
pub(crate) struct CloseRequest {
    pub id: String,
    pub at: String,
    pub code: u16,
    pub reason: String,
}

/// Rows per multi-row statement. Each row count is its own statement text, prepared and cached
/// per pooled connection, so this also bounds those caches.
pub(crate) const BATCH_ROWS: usize = 32;

/// The batched writes of a connection's life: token exchange, accept and close (see
/// [`super::batch`]).
#[derive(Clone)]
pub(crate) struct HotPath {
    pub issue: super::batch::Batcher<IssueRequest, bool>,
    pub accept:
        super::batch::Batcher<AcceptRequest, Option<morrigan_protocol::records::ConnectionRecord>>,
    pub close: super::batch::Batcher<CloseRequest, bool>,
}

/// Applies `migrations` in order, each once, recording them in `morrigan_migrations`.
macro_rules! migrate {
    ($pool:expr, $migrations:expr) => {{
        use $crate::store::sql::db;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS morrigan_migrations (version BIGINT PRIMARY KEY, applied TEXT NOT NULL)",
        )
        .execute($pool)
        .await
        .map_err(db)?;
        for (version, sql) in $migrations {
            let mut tx = $pool.begin().await.map_err(db)?;
            let done: Option<i64> =
                sqlx::query_scalar("SELECT version FROM morrigan_migrations WHERE version = $1")
                    .bind(version)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db)?;
            if done.is_some() {
                continue;
            }
            sqlx::raw_sql(sqlx::AssertSqlSafe(*sql))
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            sqlx::query("INSERT INTO morrigan_migrations (version, applied) VALUES ($1, $2)")
                .bind(version)
                .bind(morrigan_protocol::time_format::now())
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            tx.commit().await.map_err(db)?;
        }
        Ok::<(), $crate::store::StoreError>(())
    }};
}
pub(crate) use migrate;

/// Implements [`Store`](super::Store) for `$store` (a struct with `pool` and `writer` fields of
/// type `sqlx::Pool<$db>`, the second for the hot path's writes, and a `hot: HotPath` field made
/// by `$store::hot_path(&writer)`) whose rows are `$row`.
macro_rules! sql_store {
    ($store:ident, $db:ty, $row:ty, numbered: $numbered:expr) => {
        mod sql_impl {
            use super::$store;
            use async_trait::async_trait;
            use morrigan_protocol::records::{ClientCapabilities, ClientRecord, ConnectionRecord};
            use sqlx::Row;
            use $crate::store::batch::{Batcher, values_list};
            use $crate::store::sql::{
                AcceptRequest, BATCH_ROWS, CloseRequest, HotPath, IssueRequest, db,
            };
            use $crate::store::{
                CloseInfo, ConnectionFilter, Heartbeat, IdentityChange, IdentityRow, NodeRow, Proof,
                Result, SigningKeyRow, Store, StoreError, TokenKind, TokenRow,
            };

        fn connection_from_row(row: &$row) -> Result<ConnectionRecord> {
            let get = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
            let code: Option<i64> = row.try_get("close_code").map_err(get)?;
            Ok(ConnectionRecord {
                id: row.try_get("id").map_err(get)?,
                client_id: row.try_get("client_id").map_err(get)?,
                server_id: row.try_get("server_id").map_err(get)?,
                token_id: row.try_get("token_id").map_err(get)?,
                client_address: row.try_get("client_address").map_err(get)?,
                connected: row.try_get("connected").map_err(get)?,
                alive: row.try_get("alive").map_err(get)?,
                open: row.try_get("open").map_err(get)?,
                last_heartbeat: row.try_get("last_heartbeat").map_err(get)?,
                disconnected: row.try_get("disconnected").map_err(get)?,
                report_url: row.try_get("report_url").map_err(get)?,
                created: row.try_get("created").map_err(get)?,
                close_code: code.and_then(|c| u16::try_from(c).ok()),
                close_reason: row.try_get("close_reason").map_err(get)?,
            })
        }

        fn client_from_row(row: &$row) -> Result<ClientRecord> {
            let get = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
            Ok(ClientRecord {
                id: row.try_get("id").map_err(get)?,
                created: row.try_get("created").map_err(get)?,
                updated: row.try_get("updated").map_err(get)?,
                token_id: row.try_get("token_id").map_err(get)?,
                state: row.try_get("state").map_err(get)?,
                state_updated: row.try_get("state_updated").map_err(get)?,
            })
        }

        fn identity_from_row(row: &$row) -> Result<IdentityRow> {
            let get = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
            let functions: String = row.try_get("functions").map_err(get)?;
            Ok(IdentityRow {
                id: row.try_get("id").map_err(get)?,
                name: row.try_get("name").map_err(get)?,
                functions: serde_json::from_str(&functions)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                password_hash: row.try_get("password_hash").map_err(get)?,
                created: row.try_get("created").map_err(get)?,
                updated: row.try_get("updated").map_err(get)?,
            })
        }

        fn token_from_row(row: &$row) -> Result<TokenRow> {
            let get = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
            let kind: String = row.try_get("kind").map_err(get)?;
            Ok(TokenRow {
                id: row.try_get("id").map_err(get)?,
                kind: match kind.as_str() {
                    "user" => TokenKind::User,
                    "identity" => TokenKind::Identity,
                    other => return Err(StoreError::Corrupt(format!("token kind {other}"))),
                },
                subject: row.try_get("subject").map_err(get)?,
                issuer: row.try_get("issuer").map_err(get)?,
                issued: row.try_get("issued").map_err(get)?,
                expires: row.try_get("expires").map_err(get)?,
                digest: row.try_get("digest").map_err(get)?,
            })
        }

        fn key_from_row(row: &$row) -> Result<SigningKeyRow> {
            let get = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
            Ok(SigningKeyRow {
                kid: row.try_get("kid").map_err(get)?,
                node_id: row.try_get("node_id").map_err(get)?,
                public_key: row.try_get("public_key").map_err(get)?,
                created: row.try_get("created").map_err(get)?,
            })
        }

        fn node_from_row(row: &$row) -> Result<NodeRow> {
            let get = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
            Ok(NodeRow {
                id: row.try_get("id").map_err(get)?,
                public_url: row.try_get("public_url").map_err(get)?,
                version: row.try_get("version").map_err(get)?,
                started: row.try_get("started").map_err(get)?,
                lease_expires: row.try_get("lease_expires").map_err(get)?,
                state: row.try_get("state").map_err(get)?,
            })
        }

        impl $store {
            /// Starts the batch writers of the hot path on `pool` (its timeouts: `deadline`'s).
            pub(crate) fn hot_path(pool: &sqlx::Pool<$db>, deadline: $crate::store::Deadline) -> HotPath {
                let p = pool.clone();
                let issue = Batcher::spawn(BATCH_ROWS, deadline, move |reqs| Box::pin(issue_batch(p.clone(), reqs)));
                let p = pool.clone();
                let accept = Batcher::spawn(BATCH_ROWS, deadline, move |reqs| Box::pin(accept_batch(p.clone(), reqs)));
                let p = pool.clone();
                let close = Batcher::spawn(BATCH_ROWS, deadline, move |reqs| Box::pin(close_batch(p.clone(), reqs)));
                HotPath { issue, accept, close }
            }
        }

        /// Answers each request with the one whose `id` came back, first come first served
        /// (a duplicate id in one batch, e.g. one token presented twice, wins once).
        fn match_returned<T>(ids: impl Iterator<Item = String>, mut returned: std::collections::HashMap<String, T>) -> Vec<Option<T>> {
            ids.map(|id| returned.remove(&id)).collect()
        }

        /// For statements that return `id`: whether each request's row came back.
        fn returned_ids(ids: impl Iterator<Item = String>, rows: &[$row]) -> Result<Vec<bool>> {
            let mut returned = std::collections::HashMap::new();
            for row in rows {
                let id: String = row.try_get("id").map_err(|e| StoreError::Corrupt(e.to_string()))?;
                returned.insert(id, ());
            }
            Ok(match_returned(ids, returned).into_iter().map(|r| r.is_some()).collect())
        }

        /// Pending records, each inserted only if its identity token is live and its client
        /// provisioned: one `INSERT … SELECT … FROM (VALUES …) WHERE EXISTS …` per batch.
        async fn issue_batch(pool: sqlx::Pool<$db>, reqs: Vec<IssueRequest>) -> Result<Vec<bool>> {
            let sql = format!(
                "INSERT INTO connections (id, client_id, server_id, token_id, token_expires, client_address, \
                 connected, alive, open, last_heartbeat, disconnected, report_url, created, token_digest) \
                 SELECT v.column1, v.column2, NULL, v.column3, v.column4, v.column5, NULL, FALSE, TRUE, NULL, NULL, \
                 v.column6, v.column7, v.column9 FROM (VALUES {}) AS v \
                 WHERE EXISTS (SELECT 1 FROM tokens t WHERE t.id = v.column8 AND t.expires > v.column7 \
                 AND (v.column10 IS NULL OR t.digest = v.column10)) \
                 AND EXISTS (SELECT 1 FROM clients c WHERE c.id = v.column2) RETURNING id",
                values_list(reqs.len(), 10, $numbered)
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for r in &reqs {
                q = q
                    .bind(r.record.id.clone())
                    .bind(r.record.client_id.clone())
                    .bind(r.record.token_id.clone())
                    .bind(r.token_expires.clone())
                    .bind(r.record.client_address.clone())
                    .bind(r.record.report_url.clone())
                    .bind(r.record.created.clone())
                    .bind(r.identity_token.clone())
                    .bind(r.token_digest.clone())
                    .bind(r.identity_digest.clone());
            }
            let rows = q.fetch_all(&pool).await.map_err(db)?;
            returned_ids(reqs.into_iter().map(|r| r.record.id), &rows)
        }

        /// Consumes connection tokens: one conditional `UPDATE … FROM (VALUES …) RETURNING`
        /// per batch; a request whose row did not come back was refused.
        async fn accept_batch(pool: sqlx::Pool<$db>, reqs: Vec<AcceptRequest>) -> Result<Vec<Option<ConnectionRecord>>> {
            let sql = format!(
                concat!("UPDATE connections SET token_used = TRUE, server_id = v.column3, \
                 client_address = v.column4, connected = v.column5, alive = TRUE, last_heartbeat = v.column5 \
                 FROM (VALUES {}) AS v WHERE connections.id = v.column1 AND connections.token_id = v.column2 \
                 AND connections.token_used = FALSE AND connections.open AND connections.token_expires > v.column5 \
                 AND (v.column6 IS NULL OR connections.token_digest = v.column6) \
                 AND EXISTS (SELECT 1 FROM clients c WHERE c.id = connections.client_id) \
                 RETURNING ", $crate::store::sql::conn_cols!()),
                values_list(reqs.len(), 6, $numbered)
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for r in &reqs {
                q = q
                    .bind(r.id.clone())
                    .bind(r.token_id.clone())
                    .bind(r.server_id.clone())
                    .bind(r.address.clone())
                    .bind(r.now.clone())
                    .bind(r.token_digest.clone());
            }
            let rows = q.fetch_all(&pool).await.map_err(db)?;
            let mut returned = std::collections::HashMap::new();
            for row in &rows {
                let record = connection_from_row(row)?;
                returned.insert(record.id.clone(), record);
            }
            Ok(match_returned(reqs.into_iter().map(|r| r.id), returned))
        }

        /// Closes records that are still open: one `UPDATE … FROM (VALUES …)` per batch.
        async fn close_batch(pool: sqlx::Pool<$db>, reqs: Vec<CloseRequest>) -> Result<Vec<bool>> {
            let sql = format!(
                "UPDATE connections SET open = FALSE, alive = FALSE, disconnected = v.column2, \
                 close_code = v.column3, close_reason = v.column4 FROM (VALUES {}) AS v \
                 WHERE connections.id = v.column1 AND connections.open RETURNING id",
                values_list(reqs.len(), 4, $numbered)
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for r in &reqs {
                q = q
                    .bind(r.id.clone())
                    .bind(r.at.clone())
                    .bind(i64::from(r.code))
                    .bind(r.reason.clone());
            }
            let rows = q.fetch_all(&pool).await.map_err(db)?;
            returned_ids(reqs.into_iter().map(|r| r.id), &rows)
        }

        #[async_trait]
        impl Store for $store {
            async fn put_signing_key(&self, key: &SigningKeyRow) -> Result<()> {
                sqlx::query(
                    "INSERT INTO signing_keys (kid, node_id, public_key, created) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (kid) DO NOTHING",
                )
                .bind(&key.kid)
                .bind(&key.node_id)
                .bind(&key.public_key)
                .bind(&key.created)
                .execute(&self.pool)
                .await
                .map_err(db)?;
                Ok(())
            }

            async fn signing_key(&self, kid: &str) -> Result<Option<SigningKeyRow>> {
                let row = sqlx::query("SELECT * FROM signing_keys WHERE kid = $1")
                    .bind(kid)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)?;
                row.as_ref().map(key_from_row).transpose()
            }

            async fn signing_keys(&self) -> Result<Vec<SigningKeyRow>> {
                let rows = sqlx::query("SELECT * FROM signing_keys ORDER BY created")
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)?;
                rows.iter().map(key_from_row).collect()
            }

            async fn register_node(&self, node: &NodeRow) -> Result<()> {
                sqlx::query(
                    "INSERT INTO nodes (id, public_url, version, started, lease_expires, state) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO UPDATE SET \
                     public_url = excluded.public_url, version = excluded.version, started = excluded.started, \
                     lease_expires = excluded.lease_expires, state = excluded.state",
                )
                .bind(&node.id)
                .bind(&node.public_url)
                .bind(&node.version)
                .bind(&node.started)
                .bind(&node.lease_expires)
                .bind(&node.state)
                .execute(&self.pool)
                .await
                .map_err(db)?;
                Ok(())
            }

            async fn renew_node(&self, id: &str, lease_expires: &str) -> Result<bool> {
                let r = sqlx::query(
                    "UPDATE nodes SET lease_expires = $2 WHERE id = $1 AND state = 'running'",
                )
                .bind(id)
                .bind(lease_expires)
                .execute(&self.pool)
                .await
                .map_err(db)?;
                Ok(r.rows_affected() == 1)
            }

            async fn reap_nodes(&self, now: &str, except: &str) -> Result<Vec<NodeRow>> {
                let rows = sqlx::query(
                    "UPDATE nodes SET state = 'lost' WHERE state = 'running' AND lease_expires < $1 \
                     AND id <> $2 RETURNING *",
                )
                .bind(now)
                .bind(except)
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
                rows.iter().map(node_from_row).collect()
            }

            async fn stop_node(&self, id: &str, at: &str) -> Result<()> {
                sqlx::query("UPDATE nodes SET state = 'stopped', lease_expires = $2 WHERE id = $1")
                    .bind(id)
                    .bind(at)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                Ok(())
            }

            async fn nodes(&self) -> Result<Vec<NodeRow>> {
                let rows = sqlx::query("SELECT * FROM nodes ORDER BY started")
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)?;
                rows.iter().map(node_from_row).collect()
            }

            async fn count_identities(&self) -> Result<i64> {
                sqlx::query_scalar("SELECT COUNT(*) FROM identities")
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db)
            }

            async fn insert_identity(&self, row: &IdentityRow) -> Result<()> {
                let functions =
                    serde_json::to_string(&row.functions).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                sqlx::query(
                    "INSERT INTO identities (id, name, functions, password_hash, created, updated) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(&row.id)
                .bind(&row.name)
                .bind(functions)
                .bind(&row.password_hash)
                .bind(&row.created)
                .bind(&row.updated)
                .execute(&self.pool)
                .await
                .map_err(db)?;
                Ok(())
            }

            async fn identity(&self, id: &str) -> Result<Option<IdentityRow>> {
                let row = sqlx::query("SELECT * FROM identities WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)?;
                row.as_ref().map(identity_from_row).transpose()
            }

            async fn identity_by_name(&self, name: &str) -> Result<Option<IdentityRow>> {
                let row = sqlx::query("SELECT * FROM identities WHERE name = $1")
                    .bind(name)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)?;
                row.as_ref().map(identity_from_row).transpose()
            }

            async fn identities(&self) -> Result<Vec<IdentityRow>> {
                let rows = sqlx::query("SELECT * FROM identities ORDER BY created, name")
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)?;
                rows.iter().map(identity_from_row).collect()
            }

            async fn update_identity(&self, row: &IdentityRow, full: &[&str]) -> Result<IdentityChange> {
                self.guarded_update(row, full).await
            }

            async fn delete_identity(&self, id: &str, full: &[&str]) -> Result<IdentityChange> {
                self.guarded_delete(id, full).await
            }

            async fn insert_token(&self, row: &TokenRow) -> Result<()> {
                sqlx::query(
                    "INSERT INTO tokens (id, kind, subject, issuer, issued, expires, digest) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(&row.id)
                .bind(row.kind.as_str())
                .bind(&row.subject)
                .bind(&row.issuer)
                .bind(&row.issued)
                .bind(&row.expires)
                .bind(&row.digest)
                .execute(&self.pool)
                .await
                .map_err(db)?;
                Ok(())
            }

            async fn set_token_digest(&self, id: &str, digest: &str) -> Result<bool> {
                let r = sqlx::query("UPDATE tokens SET digest = $1 WHERE id = $2 AND digest IS NULL")
                    .bind(digest)
                    .bind(id)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                Ok(r.rows_affected() > 0)
            }

            async fn live_token(&self, id: &str, now: &str) -> Result<Option<TokenRow>> {
                let row = sqlx::query("SELECT * FROM tokens WHERE id = $1 AND expires > $2")
                    .bind(id)
                    .bind(now)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)?;
                row.as_ref().map(token_from_row).transpose()
            }

            async fn revoke_tokens(
                &self,
                kind: TokenKind,
                subject: &str,
                keep: Option<&str>,
            ) -> Result<u64> {
                let r = sqlx::query("DELETE FROM tokens WHERE kind = $1 AND subject = $2 AND id <> $3")
                    .bind(kind.as_str())
                    .bind(subject)
                    .bind(keep.unwrap_or(""))
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                Ok(r.rows_affected())
            }

            async fn shorten_tokens(
                &self,
                kind: TokenKind,
                subject: &str,
                keep: &str,
                expires: &str,
            ) -> Result<u64> {
                let r = sqlx::query(
                    "UPDATE tokens SET expires = $4 WHERE kind = $1 AND subject = $2 AND id <> $3 AND expires > $4",
                )
                .bind(kind.as_str())
                .bind(subject)
                .bind(keep)
                .bind(expires)
                .execute(&self.pool)
                .await
                .map_err(db)?;
                Ok(r.rows_affected())
            }

            async fn purge_expired_tokens(&self, now: &str) -> Result<u64> {
                let r = sqlx::query("DELETE FROM tokens WHERE expires <= $1")
                    .bind(now)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                Ok(r.rows_affected())
            }

            async fn upsert_client(&self, id: &str, now: &str) -> Result<ClientRecord> {
                let row = sqlx::query(
                    "INSERT INTO clients (id, created, updated) VALUES ($1, $2, $2) \
                     ON CONFLICT (id) DO UPDATE SET updated = excluded.updated RETURNING *",
                )
                .bind(id)
                .bind(now)
                .fetch_one(&self.pool)
                .await
                .map_err(db)?;
                client_from_row(&row)
            }

            async fn client(&self, id: &str) -> Result<Option<ClientRecord>> {
                let row = sqlx::query("SELECT * FROM clients WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)?;
                row.as_ref().map(client_from_row).transpose()
            }

            async fn clients(&self) -> Result<Vec<ClientRecord>> {
                let rows = sqlx::query("SELECT * FROM clients ORDER BY created, id")
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)?;
                rows.iter().map(client_from_row).collect()
            }

            async fn delete_client(&self, id: &str) -> Result<bool> {
                let mut tx = self.pool.begin().await.map_err(db)?;
                let r = sqlx::query("DELETE FROM clients WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                sqlx::query("DELETE FROM tokens WHERE kind = 'identity' AND subject = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                tx.commit().await.map_err(db)?;
                Ok(r.rows_affected() == 1)
            }

            async fn set_client_token(&self, id: &str, token_id: &str, now: &str) -> Result<bool> {
                let r = sqlx::query("UPDATE clients SET token_id = $2, updated = $3 WHERE id = $1")
                    .bind(id)
                    .bind(token_id)
                    .bind(now)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                Ok(r.rows_affected() == 1)
            }

            async fn set_client_state(&self, id: &str, state: &str, now: &str) -> Result<bool> {
                let r = sqlx::query("UPDATE clients SET state = $2, state_updated = $3 WHERE id = $1")
                    .bind(id)
                    .bind(state)
                    .bind(now)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                Ok(r.rows_affected() == 1)
            }

            async fn set_capabilities(&self, id: &str, capabilities: &str, now: &str) -> Result<bool> {
                let r = sqlx::query(
                    "UPDATE clients SET capabilities = $2, capabilities_reported = $3 WHERE id = $1",
                )
                .bind(id)
                .bind(capabilities)
                .bind(now)
                .execute(&self.pool)
                .await
                .map_err(db)?;
                Ok(r.rows_affected() == 1)
            }

            async fn capabilities(&self, id: &str) -> Result<Option<ClientCapabilities>> {
                let row = sqlx::query(
                    "SELECT capabilities, capabilities_reported FROM clients WHERE id = $1 AND capabilities IS NOT NULL",
                )
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
                let Some(row) = row else { return Ok(None) };
                let get = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
                let text: String = row.try_get("capabilities").map_err(get)?;
                Ok(Some(ClientCapabilities {
                    client_id: id.to_string(),
                    capabilities: serde_json::from_str(&text)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    reported: row.try_get("capabilities_reported").map_err(get)?,
                }))
            }

            async fn issue_connection(
                &self,
                record: &ConnectionRecord,
                token_digest: &str,
                token_expires: &str,
                identity_token: &str,
                identity: Proof<'_>,
            ) -> Result<bool> {
                self.hot
                    .issue
                    .call(IssueRequest {
                        record: record.clone(),
                        token_digest: token_digest.to_string(),
                        token_expires: token_expires.to_string(),
                        identity_token: identity_token.to_string(),
                        identity_digest: identity.digest(),
                    })
                    .await
            }

            async fn connection(&self, id: &str) -> Result<Option<ConnectionRecord>> {
                let row = sqlx::query(concat!("SELECT ", $crate::store::sql::conn_cols!(), " FROM connections WHERE id = $1"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
                row.as_ref().map(connection_from_row).transpose()
            }

            async fn connections(&self, f: &ConnectionFilter) -> Result<Vec<ConnectionRecord>> {
                // Optional filters as `($n IS NULL OR col = $n)` keep one static, portable statement.
                let rows = sqlx::query(concat!("SELECT ", $crate::store::sql::conn_cols!(), " FROM connections \
                     WHERE ($1 IS NULL OR client_id = $1) AND ($2 IS NULL OR server_id = $2) \
                     AND ($3 IS NULL OR open = $3) ORDER BY created DESC, id LIMIT $4"))
                .bind(&f.client_id)
                .bind(&f.server_id)
                .bind(f.open)
                .bind(i64::from(f.limit))
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
                rows.iter().map(connection_from_row).collect()
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
                self.hot
                    .accept
                    .call(AcceptRequest {
                        id: id.to_string(),
                        token_id: token_id.to_string(),
                        token_digest: proof.digest(),
                        server_id: server_id.to_string(),
                        address: address.to_string(),
                        now: now.to_string(),
                    })
                    .await
            }

            async fn open_connections_of_client(
                &self,
                client_id: &str,
                except: &str,
            ) -> Result<Vec<ConnectionRecord>> {
                let rows = sqlx::query(concat!("SELECT ", $crate::store::sql::conn_cols!(), " FROM connections WHERE client_id = $1 AND open AND id <> $2"))
                .bind(client_id)
                .bind(except)
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
                rows.iter().map(connection_from_row).collect()
            }

            async fn close_connection(&self, id: &str, c: &CloseInfo<'_>) -> Result<bool> {
                self.hot
                    .close
                    .call(CloseRequest {
                        id: id.to_string(),
                        at: c.at.to_string(),
                        code: c.code,
                        reason: c.reason.to_string(),
                    })
                    .await
            }

            async fn close_client_connections(
                &self,
                client_id: &str,
                c: &CloseInfo<'_>,
            ) -> Result<Vec<ConnectionRecord>> {
                let rows = sqlx::query(concat!("UPDATE connections SET open = FALSE, alive = FALSE, disconnected = $2, close_code = $3, \
                     close_reason = $4 WHERE client_id = $1 AND open RETURNING ", $crate::store::sql::conn_cols!(), ""))
                .bind(client_id)
                .bind(c.at)
                .bind(i64::from(c.code))
                .bind(c.reason)
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
                rows.iter().map(connection_from_row).collect()
            }

            async fn close_node_connections(&self, server_id: &str, c: &CloseInfo<'_>) -> Result<u64> {
                let r = sqlx::query(
                    "UPDATE connections SET open = FALSE, alive = FALSE, disconnected = $2, close_code = $3, \
                     close_reason = $4 WHERE server_id = $1 AND open",
                )
                .bind(server_id)
                .bind(c.at)
                .bind(i64::from(c.code))
                .bind(c.reason)
                .execute(&self.pool)
                .await
                .map_err(db)?;
                Ok(r.rows_affected())
            }

            async fn record_heartbeats(&self, beats: &[Heartbeat]) -> Result<()> {
                // One statement per chunk (`UPDATE … FROM (VALUES …)`, portable to SQLite ≥ 3.33
                // and PostgreSQL, whose VALUES columns are both named column1..3), instead of one
                // per connection: the flush is the only steady write of an idle fleet.
                // Chunks of 32: at most 32 statement texts to prepare and cache per connection.
                const CHUNK: usize = BATCH_ROWS;
                if beats.is_empty() {
                    return Ok(());
                }
                let mut tx = self.writer.begin().await.map_err(db)?;
                for chunk in beats.chunks(CHUNK) {
                    let sql = format!(
                        "UPDATE connections SET alive = v.column2, \
                         last_heartbeat = COALESCE(v.column3, connections.last_heartbeat) \
                         FROM (VALUES {}) AS v WHERE connections.id = v.column1 AND connections.open",
                        values_list(chunk.len(), 3, $numbered)
                    );
                    // Only placeholders are interpolated; every value is bound.
                    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                    for b in chunk {
                        q = q
                            .bind(b.connection_id.clone())
                            .bind(b.alive)
                            .bind(b.last_heartbeat.clone());
                    }
                    q.execute(&mut *tx).await.map_err(db)?;
                }
                tx.commit().await.map_err(db)?;
                Ok(())
            }

            async fn expire_pending_connections(&self, now: &str) -> Result<u64> {
                let r = sqlx::query(
                    "UPDATE connections SET open = FALSE, alive = FALSE, disconnected = $1, \
                     close_reason = 'connection token expired unused' \
                     WHERE open AND token_used = FALSE AND token_expires <= $1",
                )
                .bind(now)
                .execute(&self.pool)
                .await
                .map_err(db)?;
                Ok(r.rows_affected())
            }

            async fn purge_closed_connections(&self, before: &str) -> Result<u64> {
                let r = sqlx::query("DELETE FROM connections WHERE open = FALSE AND disconnected < $1")
                    .bind(before)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                Ok(r.rows_affected())
            }

            async fn stash_payload(&self, id: &str, body: &str, now: &str) -> Result<()> {
                sqlx::query("INSERT INTO bus_payloads (id, body, created) VALUES ($1, $2, $3)")
                    .bind(id)
                    .bind(body)
                    .bind(now)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                Ok(())
            }

            async fn take_payload(&self, id: &str) -> Result<Option<String>> {
                sqlx::query_scalar("DELETE FROM bus_payloads WHERE id = $1 RETURNING body")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)
            }

            async fn purge_payloads(&self, before: &str) -> Result<u64> {
                let r = sqlx::query("DELETE FROM bus_payloads WHERE created < $1")
                    .bind(before)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                Ok(r.rows_affected())
            }
        }
        }
    };
}
pub(crate) use sql_store;
