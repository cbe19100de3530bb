//! The batched writes of a connection's life: token exchange, accept and close, each one
//! multi-row statement per batch of concurrent callers (see [`super::batch`]).

use morrigan_protocol::records::ConnectionRecord;

use super::batch::Batcher;

/// A pending connection to record if its identity token is live at `record.created` and its
/// client is still provisioned (see
/// [`ConnectionStore::issue_connection`](super::ConnectionStore::issue_connection)).
pub(crate) struct IssueRequest {
    pub record: ConnectionRecord,
    pub token_digest: String,
    pub token_expires: String,
    pub identity_token: String,
    /// `None` when the caller checked the identity token's signature.
    pub identity_digest: Option<String>,
}

/// A connection token to consume (see
/// [`ConnectionStore::accept_connection`](super::ConnectionStore::accept_connection)).
pub(crate) struct AcceptRequest {
    pub id: String,
    pub token_id: String,
    /// `None` when the caller checked the connection token's signature.
    pub token_digest: Option<String>,
    pub server_id: String,
    pub address: String,
    pub now: String,
}

/// A record to close (see
/// [`ConnectionStore::close_connection`](super::ConnectionStore::close_connection)).
pub(crate) struct CloseRequest {
    pub id: String,
    pub at: String,
    pub code: u16,
    pub reason: String,
}

/// The batch writers of one store.
#[derive(Clone)]
pub(crate) struct HotPath {
    pub issue: Batcher<IssueRequest, bool>,
    pub accept: Batcher<AcceptRequest, Option<ConnectionRecord>>,
    pub close: Batcher<CloseRequest, bool>,
}

/// Answers each request with the one whose `id` came back, first come first served (a
/// duplicate id in one batch, e.g. one token presented twice, wins once).
pub(crate) fn match_returned<T>(
    ids: impl Iterator<Item = String>,
    mut returned: std::collections::HashMap<String, T>,
) -> Vec<Option<T>> {
    ids.map(|id| returned.remove(&id)).collect()
}

/// For statements that return `id`: whether each request's row came back.
pub(crate) fn returned_ids(ids: impl Iterator<Item = String>, rows: Vec<String>) -> Vec<bool> {
    let returned = rows.into_iter().map(|id| (id, ())).collect();
    match_returned(ids, returned)
        .into_iter()
        .map(|r| r.is_some())
        .collect()
}

/// Defines `$store::hot_path(pool, deadline)`, which starts the batch writers on `pool` (for
/// database `$db`; `$numbered` as for [`values_list`](super::batch::values_list)).
macro_rules! sql_hot_path {
    ($store:ident, $db:ty, numbered: $numbered:expr) => {
        const _: () = {
            use std::collections::HashMap;

            use morrigan_protocol::records::ConnectionRecord;
            use $crate::store::Result;
            use $crate::store::batch::{Batcher, values_list};
            use $crate::store::connections::ConnectionCols;
            use $crate::store::hot_path::{
                AcceptRequest, CloseRequest, HotPath, IssueRequest, match_returned, returned_ids,
            };
            use $crate::store::sql::{BATCH_ROWS, db};

            impl $store {
                /// Starts the batch writers of the hot path on `pool` (its timeouts:
                /// `deadline`'s).
                pub(crate) fn hot_path(
                    pool: &sqlx::Pool<$db>,
                    deadline: $crate::store::Deadline,
                ) -> HotPath {
                    let p = pool.clone();
                    let issue = Batcher::spawn(BATCH_ROWS, deadline, move |reqs| {
                        Box::pin(issue_batch(p.clone(), reqs))
                    });
                    let p = pool.clone();
                    let accept = Batcher::spawn(BATCH_ROWS, deadline, move |reqs| {
                        Box::pin(accept_batch(p.clone(), reqs))
                    });
                    let p = pool.clone();
                    let close = Batcher::spawn(BATCH_ROWS, deadline, move |reqs| {
                        Box::pin(close_batch(p.clone(), reqs))
                    });
                    HotPath {
                        issue,
                        accept,
                        close,
                    }
                }
            }

            /// Pending records, each inserted only if its identity token is live and its client
            /// provisioned: one `INSERT … SELECT … FROM (VALUES …) WHERE EXISTS …` per batch.
            async fn issue_batch(
                pool: sqlx::Pool<$db>,
                reqs: Vec<IssueRequest>,
            ) -> Result<Vec<bool>> {
                let sql = format!(
                    "INSERT INTO connections (id, client_id, server_id, token_id, token_expires, \
                     client_address, connected, alive, open, last_heartbeat, disconnected, \
                     report_url, created, token_digest) \
                     SELECT v.column1, v.column2, NULL, v.column3, v.column4, v.column5, NULL, \
                     FALSE, TRUE, NULL, NULL, v.column6, v.column7, v.column9 \
                     FROM (VALUES {}) AS v \
                     WHERE EXISTS (SELECT 1 FROM tokens t WHERE t.id = v.column8 \
                     AND t.expires > v.column7 AND (v.column10 IS NULL OR t.digest = v.column10)) \
                     AND EXISTS (SELECT 1 FROM clients c WHERE c.id = v.column2) RETURNING id",
                    values_list(reqs.len(), 10, $numbered)
                );
                let mut q = sqlx::query_scalar::<$db, String>(sqlx::AssertSqlSafe(sql));
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
                Ok(returned_ids(reqs.into_iter().map(|r| r.record.id), rows))
            }

            /// Consumes connection tokens: one conditional `UPDATE … FROM (VALUES …) RETURNING`
            /// per batch; a request whose row did not come back was refused.
            async fn accept_batch(
                pool: sqlx::Pool<$db>,
                reqs: Vec<AcceptRequest>,
            ) -> Result<Vec<Option<ConnectionRecord>>> {
                let sql = format!(
                    concat!(
                        "UPDATE connections SET token_used = TRUE, server_id = v.column3, \
                         client_address = v.column4, connected = v.column5, alive = TRUE, \
                         last_heartbeat = v.column5 FROM (VALUES {}) AS v \
                         WHERE connections.id = v.column1 AND connections.token_id = v.column2 \
                         AND connections.token_used = FALSE AND connections.open \
                         AND connections.token_expires > v.column5 \
                         AND (v.column6 IS NULL OR connections.token_digest = v.column6) \
                         AND EXISTS (SELECT 1 FROM clients c WHERE c.id = connections.client_id) \
                         RETURNING ",
                        $crate::store::connections::connection_columns!()
                    ),
                    values_list(reqs.len(), 6, $numbered)
                );
                let mut q = sqlx::query_as::<$db, ConnectionCols>(sqlx::AssertSqlSafe(sql));
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
                let returned: HashMap<String, ConnectionRecord> = rows
                    .into_iter()
                    .map(|row| {
                        let record = ConnectionRecord::from(row);
                        (record.id.clone(), record)
                    })
                    .collect();
                Ok(match_returned(reqs.into_iter().map(|r| r.id), returned))
            }

            /// Closes records that are still open: one `UPDATE … FROM (VALUES …)` per batch.
            async fn close_batch(
                pool: sqlx::Pool<$db>,
                reqs: Vec<CloseRequest>,
            ) -> Result<Vec<bool>> {
                let sql = format!(
                    "UPDATE connections SET open = FALSE, alive = FALSE, disconnected = v.column2, \
                     close_code = v.column3, close_reason = v.column4 FROM (VALUES {}) AS v \
                     WHERE connections.id = v.column1 AND connections.open RETURNING id",
                    values_list(reqs.len(), 4, $numbered)
                );
                let mut q = sqlx::query_scalar::<$db, String>(sqlx::AssertSqlSafe(sql));
                for r in &reqs {
                    q = q
                        .bind(r.id.clone())
                        .bind(r.at.clone())
                        .bind(i64::from(r.code))
                        .bind(r.reason.clone());
                }
                let rows = q.fetch_all(&pool).await.map_err(db)?;
                Ok(returned_ids(reqs.into_iter().map(|r| r.id), rows))
            }
        };
    };
}
pub(crate) use sql_hot_path;
