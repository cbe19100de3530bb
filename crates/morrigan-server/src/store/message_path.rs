//! The writes of a tracked message's life: its record, its write to a socket and the
//! device's answer. A tracked send costs up to three; one by one through sqlx they were three
//! round trips to the database each (an acked send took 600 µs of a node's CPU), so they are
//! shared by every send in flight, in one of two ways:
//!
//! * [`MessagePath::Batched`]: one multi-row statement per batch of concurrent callers (see
//!   [`super::batch`]), as the connection hot path does (PostgreSQL, and SQLite in memory);
//! * [`MessagePath::Ordered`]: SQLite's writer thread ([`super::sqlite_writer`]), one prepared
//!   statement per write and one commit per round, applied in the order they were queued.

use super::batch::Batcher;
use super::messages::{Committed, InsertRequest, MessageRow, SettleRequest, WrittenRequest};
use super::sqlite_writer::Writer;
use super::{Result, sqlite_messages};

/// Where a store's message writes go.
#[derive(Clone)]
pub(crate) enum MessagePath {
    /// Batch writers, each one multi-row statement per batch.
    Batched {
        insert: Batcher<InsertRequest, bool>,
        written: Batcher<WrittenRequest, Option<MessageRow>>,
        settle: Batcher<SettleRequest, Option<MessageRow>>,
    },
    /// SQLite's writer thread: every write queued after another is applied after it.
    Ordered(Writer),
}

impl MessagePath {
    /// Inserts a record: `false` if its id exists.
    pub(crate) async fn insert(&self, r: InsertRequest) -> Result<bool> {
        self.queue_insert(r).await?.wait().await
    }

    /// Queues a record's insert and returns once it is queued: on the writer thread, every
    /// message write queued after this returns is applied after it (so the device's answer to a
    /// frame written now finds the record); batched, the insert is done first.
    pub(crate) async fn queue_insert(&self, r: InsertRequest) -> Result<Committed> {
        match self {
            Self::Batched { insert, .. } => Ok(Committed::ready(insert.call(r).await?)),
            Self::Ordered(w) => {
                let done = w.queue(move |c| sqlite_messages::insert(c, &r)).await?;
                Ok(Committed::new(done))
            }
        }
    }

    /// Marks a message written (from `queued`, or `written` on another connection): the row,
    /// or `None` if it had moved on.
    pub(crate) async fn written(&self, r: WrittenRequest) -> Result<Option<MessageRow>> {
        match self {
            Self::Batched { written, .. } => written.call(r).await,
            Self::Ordered(w) => w.call(move |c| sqlite_messages::written(c, &r)).await,
        }
    }

    /// Records a device's answer if its message still waits for it: the row, or `None`.
    pub(crate) async fn settle(&self, r: SettleRequest) -> Result<Option<MessageRow>> {
        match self {
            Self::Batched { settle, .. } => settle.call(r).await,
            Self::Ordered(w) => w.call(move |c| sqlite_messages::settle(c, &r)).await,
        }
    }
}

/// Defines `$store::message_path(pool, deadline)`, which starts the batch writers of message
/// records on `pool` (for database `$db`; `$numbered` as for
/// [`values_list`](super::batch::values_list)).
macro_rules! sql_message_path {
    ($store:ident, $db:ty, numbered: $numbered:expr) => {
        const _: () = {
            use std::collections::HashMap;

            use $crate::store::Result;
            use $crate::store::batch::{Batcher, values_list};
            use $crate::store::hot_path::{match_returned, returned_ids};
            use $crate::store::message_path::MessagePath;
            use $crate::store::messages::{InsertRequest, MessageRow, SettleRequest, WrittenRequest};
            use $crate::store::sql::{BATCH_ROWS, db};

            impl $store {
                /// Starts the batch writers of message records on `pool` (its timeouts:
                /// `deadline`'s).
                pub(crate) fn message_path(
                    pool: &sqlx::Pool<$db>,
                    deadline: $crate::store::Deadline,
                ) -> MessagePath {
                    let p = pool.clone();
                    let insert = Batcher::spawn(BATCH_ROWS, deadline, move |reqs| {
                        Box::pin(insert_batch(p.clone(), reqs))
                    });
                    let p = pool.clone();
                    let written = Batcher::spawn(BATCH_ROWS, deadline, move |reqs| {
                        Box::pin(written_batch(p.clone(), reqs))
                    });
                    let p = pool.clone();
                    let settle = Batcher::spawn(BATCH_ROWS, deadline, move |reqs| {
                        Box::pin(settle_batch(p.clone(), reqs))
                    });
                    MessagePath::Batched {
                        insert,
                        written,
                        settle,
                    }
                }
            }

            /// One multi-row `INSERT … RETURNING id` per batch.
            async fn insert_batch(
                pool: sqlx::Pool<$db>,
                reqs: Vec<InsertRequest>,
            ) -> Result<Vec<bool>> {
                let sql = format!(
                    "INSERT INTO messages (id, client_id, connection_id, direction, message_type, \
                     body, track, state, created, expires, size) VALUES {} RETURNING id",
                    values_list(reqs.len(), 11, $numbered)
                );
                let mut q = sqlx::query_scalar::<$db, String>(sqlx::AssertSqlSafe(sql));
                for r in &reqs {
                    q = q
                        .bind(r.id.clone())
                        .bind(r.client_id.clone())
                        .bind(r.connection_id.clone())
                        .bind(r.direction)
                        .bind(r.message_type.clone())
                        .bind(r.body.clone())
                        .bind(r.track)
                        .bind(r.state)
                        .bind(r.created.clone())
                        .bind(r.expires.clone())
                        .bind(i64::try_from(r.body.len()).unwrap_or(i64::MAX));
                }
                let rows = q.fetch_all(&pool).await.map_err(db)?;
                Ok(returned_ids(reqs.into_iter().map(|r| r.id), rows))
            }

            /// Marks messages written, from `queued` or from `written` on another connection:
            /// one `UPDATE … FROM (VALUES …) RETURNING` per batch.
            async fn written_batch(
                pool: sqlx::Pool<$db>,
                reqs: Vec<WrittenRequest>,
            ) -> Result<Vec<Option<MessageRow>>> {
                let sql = format!(
                    concat!(
                        "UPDATE messages SET state = 'written', connection_id = v.column2, \
                         written = v.column3 FROM (VALUES {}) AS v \
                         WHERE messages.id = v.column1 \
                         AND messages.state IN ('queued', 'written') RETURNING ",
                        $crate::store::messages::updated_columns!()
                    ),
                    values_list(reqs.len(), 3, $numbered)
                );
                let mut q = sqlx::query_as::<$db, MessageRow>(sqlx::AssertSqlSafe(sql));
                for r in &reqs {
                    q = q
                        .bind(r.id.clone())
                        .bind(r.connection_id.clone())
                        .bind(r.at.clone());
                }
                let rows = q.fetch_all(&pool).await.map_err(db)?;
                let returned: HashMap<String, MessageRow> =
                    rows.into_iter().map(|row| (row.id.clone(), row)).collect();
                Ok(match_returned(reqs.into_iter().map(|r| r.id), returned))
            }

            /// Records devices' answers, each only if its message still waits for it (an ack
            /// or a nack while `queued` or `written`, a reply until `acked` too): one
            /// `UPDATE … FROM (VALUES …) RETURNING` per batch.
            async fn settle_batch(
                pool: sqlx::Pool<$db>,
                reqs: Vec<SettleRequest>,
            ) -> Result<Vec<Option<MessageRow>>> {
                let sql = format!(
                    concat!(
                        "UPDATE messages SET \
                         state = CASE v.column3 WHEN 'ack' THEN 'acked' \
                           WHEN 'reply' THEN 'replied' ELSE 'rejected' END, \
                         written = CASE WHEN v.column3 = 'nack' THEN written \
                           ELSE COALESCE(written, v.column4) END, \
                         acked = CASE WHEN v.column3 = 'nack' THEN acked \
                           ELSE COALESCE(acked, v.column4) END, \
                         replied = CASE WHEN v.column3 = 'reply' THEN v.column4 ELSE replied END, \
                         reply = CASE WHEN v.column3 = 'reply' THEN v.column5 ELSE reply END, \
                         ended = CASE WHEN v.column3 = 'nack' THEN v.column4 ELSE ended END, \
                         reason = CASE WHEN v.column3 = 'nack' THEN v.column6 ELSE reason END \
                         FROM (VALUES {}) AS v \
                         WHERE messages.id = v.column1 AND messages.client_id = v.column2 \
                         AND messages.direction = 'out' \
                         AND (messages.state IN ('queued', 'written') \
                              OR (v.column3 = 'reply' AND messages.state = 'acked')) \
                         RETURNING ",
                        $crate::store::messages::updated_columns!()
                    ),
                    values_list(reqs.len(), 6, $numbered)
                );
                let mut q = sqlx::query_as::<$db, MessageRow>(sqlx::AssertSqlSafe(sql));
                for r in &reqs {
                    q = q
                        .bind(r.id.clone())
                        .bind(r.client_id.clone())
                        .bind(r.kind)
                        .bind(r.at.clone())
                        .bind(r.payload.clone())
                        .bind(r.reason.clone());
                }
                let rows = q.fetch_all(&pool).await.map_err(db)?;
                let returned: HashMap<String, MessageRow> =
                    rows.into_iter().map(|row| (row.id.clone(), row)).collect();
                Ok(match_returned(reqs.into_iter().map(|r| r.id), returned))
            }
        };
    };
}
pub(crate) use sql_message_path;
