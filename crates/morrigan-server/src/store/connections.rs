//! Connection records: issued at token exchange, accepted once, kept true by heartbeats, closed
//! once. The writes of a connection's life go through the group-commit batches of
//! [`hot_path`](super::hot_path).

use async_trait::async_trait;
use morrigan_protocol::records::ConnectionRecord;

use super::{Proof, Result};

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

/// A coalesced heartbeat observation, written in batches (never one write per pong).
#[derive(Debug, Clone, PartialEq)]
pub struct Heartbeat {
    pub connection_id: String,
    pub alive: bool,
    pub last_heartbeat: Option<String>,
}

#[async_trait]
pub trait ConnectionStore: Send + Sync + 'static {
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
}

/// The columns of a connection record, as a literal so that statements stay `&'static str`.
macro_rules! connection_columns {
    () => {
        "id, client_id, server_id, token_id, client_address, connected, alive, open, \
         last_heartbeat, disconnected, report_url, created, close_code, close_reason"
    };
}
pub(crate) use connection_columns;

/// The columns of a connection row. The record is a protocol type, which knows no database,
/// and its close code is a `u16` that PostgreSQL stores as an integer.
#[derive(sqlx::FromRow)]
pub(crate) struct ConnectionCols {
    id: String,
    client_id: String,
    server_id: Option<String>,
    token_id: String,
    client_address: Option<String>,
    connected: Option<String>,
    alive: bool,
    open: bool,
    last_heartbeat: Option<String>,
    disconnected: Option<String>,
    report_url: String,
    created: String,
    close_code: Option<i64>,
    close_reason: Option<String>,
}

impl From<ConnectionCols> for ConnectionRecord {
    fn from(c: ConnectionCols) -> Self {
        ConnectionRecord {
            id: c.id,
            client_id: c.client_id,
            server_id: c.server_id,
            token_id: c.token_id,
            client_address: c.client_address,
            connected: c.connected,
            alive: c.alive,
            open: c.open,
            last_heartbeat: c.last_heartbeat,
            disconnected: c.disconnected,
            report_url: c.report_url,
            created: c.created,
            close_code: c.close_code.and_then(|c| u16::try_from(c).ok()),
            close_reason: c.close_reason,
        }
    }
}

/// Implements [`ConnectionStore`] for `$store` (a struct with `pool` and `writer` fields of
/// type `sqlx::Pool<$db>`, the second for the heartbeat flush, and the batches of
/// [`hot_path`](super::hot_path) in a `hot` field); `$numbered` as for
/// [`values_list`](super::batch::values_list).
macro_rules! sql_connections {
    ($store:ident, $db:ty, numbered: $numbered:expr) => {
        const _: () = {
            use morrigan_protocol::records::ConnectionRecord;
            use $crate::store::batch::values_list;
            use $crate::store::connections::{ConnectionCols, connection_columns};
            use $crate::store::hot_path::{AcceptRequest, CloseRequest, IssueRequest};
            use $crate::store::sql::{BATCH_ROWS, db};
            use $crate::store::{
                CloseInfo, ConnectionFilter, ConnectionStore, Heartbeat, Proof, Result,
            };

            fn records(rows: Vec<ConnectionCols>) -> Vec<ConnectionRecord> {
                rows.into_iter().map(Into::into).collect()
            }

            #[async_trait::async_trait]
            impl ConnectionStore for $store {
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
                    let row = sqlx::query_as::<$db, ConnectionCols>(concat!(
                        "SELECT ",
                        connection_columns!(),
                        " FROM connections WHERE id = $1"
                    ))
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)?;
                    Ok(row.map(Into::into))
                }

                async fn connections(&self, f: &ConnectionFilter) -> Result<Vec<ConnectionRecord>> {
                    // Optional filters as `($n IS NULL OR col = $n)` keep one static, portable
                    // statement.
                    let rows = sqlx::query_as::<$db, ConnectionCols>(concat!(
                        "SELECT ",
                        connection_columns!(),
                        " FROM connections WHERE ($1 IS NULL OR client_id = $1) \
                         AND ($2 IS NULL OR server_id = $2) AND ($3 IS NULL OR open = $3) \
                         ORDER BY created DESC, id LIMIT $4"
                    ))
                    .bind(&f.client_id)
                    .bind(&f.server_id)
                    .bind(f.open)
                    .bind(i64::from(f.limit))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)?;
                    Ok(records(rows))
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
                    let rows = sqlx::query_as::<$db, ConnectionCols>(concat!(
                        "SELECT ",
                        connection_columns!(),
                        " FROM connections WHERE client_id = $1 AND open AND id <> $2"
                    ))
                    .bind(client_id)
                    .bind(except)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)?;
                    Ok(records(rows))
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
                    let rows = sqlx::query_as::<$db, ConnectionCols>(concat!(
                        "UPDATE connections SET open = FALSE, alive = FALSE, disconnected = $2, \
                         close_code = $3, close_reason = $4 WHERE client_id = $1 AND open \
                         RETURNING ",
                        connection_columns!()
                    ))
                    .bind(client_id)
                    .bind(c.at)
                    .bind(i64::from(c.code))
                    .bind(c.reason)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)?;
                    Ok(records(rows))
                }

                async fn close_node_connections(
                    &self,
                    server_id: &str,
                    c: &CloseInfo<'_>,
                ) -> Result<u64> {
                    let r = sqlx::query(
                        "UPDATE connections SET open = FALSE, alive = FALSE, disconnected = $2, \
                         close_code = $3, close_reason = $4 WHERE server_id = $1 AND open",
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
                    // One statement per chunk (`UPDATE … FROM (VALUES …)`, portable to SQLite ≥
                    // 3.33 and PostgreSQL, whose VALUES columns are both named column1..3)
                    // instead of one per connection: the flush is the only steady write of an
                    // idle fleet. Chunks of `BATCH_ROWS` bound the statement texts each pooled
                    // connection prepares and caches.
                    if beats.is_empty() {
                        return Ok(());
                    }
                    let mut tx = self.writer.begin().await.map_err(db)?;
                    for chunk in beats.chunks(BATCH_ROWS) {
                        let sql = format!(
                            "UPDATE connections SET alive = v.column2, \
                             last_heartbeat = COALESCE(v.column3, connections.last_heartbeat) \
                             FROM (VALUES {}) AS v WHERE connections.id = v.column1 \
                             AND connections.open",
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
                    let r = sqlx::query(
                        "DELETE FROM connections WHERE open = FALSE AND disconnected < $1",
                    )
                    .bind(before)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                    Ok(r.rows_affected())
                }
            }
        };
    };
}
pub(crate) use sql_connections;
