//! Message records: operator → device messages (tracked, queued in a client's outbox) and the
//! last uplink messages of each client. One table for both directions, ordered by an
//! insertion sequence, so a client's history is one index range.
//!
//! Every transition is one conditional statement: a state only moves forward (see
//! [`MessageState`]), so racing writers (the node that wrote a frame, the node that read the
//! device's ack, the expiry sweep) never undo each other, whatever the order they land in.

use async_trait::async_trait;
use morrigan_protocol::messages::{Direction, MessageRecord, MessageState, Track};

use super::{Result, StoreError};

/// A message as stored.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct MessageRow {
    pub seq: i64,
    pub id: String,
    pub client_id: String,
    pub connection_id: Option<String>,
    pub direction: String,
    pub message_type: String,
    /// The JSON object as the operator sent it (without `messageId`), or as the device sent it.
    pub body: String,
    pub track: String,
    pub state: String,
    pub created: String,
    pub written: Option<String>,
    pub acked: Option<String>,
    pub replied: Option<String>,
    pub ended: Option<String>,
    pub expires: Option<String>,
    /// The reply payload, as JSON text.
    pub reply: Option<String>,
    pub reason: Option<String>,
    pub idempotency_key: Option<String>,
    /// The body's length in bytes (what the outbox bound counts).
    pub size: i64,
}

impl MessageRow {
    pub fn state(&self) -> Result<MessageState> {
        MessageState::parse(&self.state)
            .ok_or_else(|| StoreError::Corrupt(format!("message state '{}'", self.state)))
    }

    pub fn track(&self) -> Result<Track> {
        Track::parse(&self.track)
            .ok_or_else(|| StoreError::Corrupt(format!("message track '{}'", self.track)))
    }

    /// The record the REST API serves.
    pub fn to_record(&self) -> Result<MessageRecord> {
        let json = |s: &str| {
            serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("message JSON: {e}")))
        };
        Ok(MessageRecord {
            id: self.id.clone(),
            client_id: self.client_id.clone(),
            connection_id: self.connection_id.clone(),
            direction: Direction::parse(&self.direction).ok_or_else(|| {
                StoreError::Corrupt(format!("message direction '{}'", self.direction))
            })?,
            kind: self.message_type.clone(),
            body: json(&self.body)?,
            track: self.track()?,
            state: self.state()?,
            created: self.created.clone(),
            written: self.written.clone(),
            acked: self.acked.clone(),
            replied: self.replied.clone(),
            ended: self.ended.clone(),
            expires: self.expires.clone(),
            reply: self.reply.as_deref().map(json).transpose()?,
            reason: self.reason.clone(),
        })
    }
}

/// A message to insert.
#[derive(Debug, Clone)]
pub struct NewMessage<'a> {
    pub id: &'a str,
    pub client_id: &'a str,
    pub connection_id: Option<&'a str>,
    pub direction: Direction,
    pub message_type: &'a str,
    pub body: &'a str,
    pub track: Track,
    /// `queued` (outgoing, not written yet) or `received` (uplink).
    pub state: MessageState,
    pub created: &'a str,
    pub expires: Option<&'a str>,
    pub idempotency_key: Option<&'a str>,
}

impl NewMessage<'_> {
    /// The row this message is once inserted (its `seq` unknown: 0).
    pub fn row(&self) -> MessageRow {
        MessageRow {
            seq: 0,
            id: self.id.to_string(),
            client_id: self.client_id.to_string(),
            connection_id: self.connection_id.map(str::to_string),
            direction: self.direction.as_str().to_string(),
            message_type: self.message_type.to_string(),
            body: self.body.to_string(),
            track: self.track.as_str().to_string(),
            state: self.state.as_str().to_string(),
            created: self.created.to_string(),
            written: None,
            acked: None,
            replied: None,
            ended: None,
            expires: self.expires.map(str::to_string),
            reply: None,
            reason: None,
            idempotency_key: self.idempotency_key.map(str::to_string),
            size: i64::try_from(self.body.len()).unwrap_or(i64::MAX),
        }
    }
}

/// A message insert queued in its store's write order (see [`MessageStore::queue_message`]).
pub struct Committed(std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool>> + Send>>);

impl Committed {
    /// An insert already done.
    pub(crate) fn ready(inserted: bool) -> Self {
        Self(Box::pin(std::future::ready(Ok(inserted))))
    }

    /// An insert done when `done` answers.
    pub(crate) fn new(
        done: impl std::future::Future<Output = Result<bool>> + Send + 'static,
    ) -> Self {
        Self(Box::pin(done))
    }

    /// Whether the message was inserted, once it is durable (bounded by the store deadline).
    pub async fn wait(self) -> Result<bool> {
        self.0.await
    }
}

/// A message record to insert (no idempotency key: keyed sends take the single path, which
/// reads the earlier message back).
pub(crate) struct InsertRequest {
    pub id: String,
    pub client_id: String,
    pub connection_id: Option<String>,
    pub direction: &'static str,
    pub message_type: String,
    pub body: String,
    pub track: &'static str,
    pub state: &'static str,
    pub created: String,
    pub expires: Option<String>,
}

impl From<&NewMessage<'_>> for InsertRequest {
    fn from(m: &NewMessage<'_>) -> Self {
        Self {
            id: m.id.to_string(),
            client_id: m.client_id.to_string(),
            connection_id: m.connection_id.map(str::to_string),
            direction: m.direction.as_str(),
            message_type: m.message_type.to_string(),
            body: m.body.to_string(),
            track: m.track.as_str(),
            state: m.state.as_str(),
            created: m.created.to_string(),
            expires: m.expires.map(str::to_string),
        }
    }
}

/// Message `id` written to `connection_id` at `at`.
pub(crate) struct WrittenRequest {
    pub id: String,
    pub connection_id: String,
    pub at: String,
}

/// A device's answer: `kind` is `ack`, `reply` or `nack`.
pub(crate) struct SettleRequest {
    pub id: String,
    pub client_id: String,
    pub kind: &'static str,
    pub at: String,
    pub payload: Option<String>,
    pub reason: Option<String>,
}

/// The columns an update returns: a message row without its body (up to the message size
/// limit, which no answer or written mark needs to copy back out).
macro_rules! updated_columns {
    () => {
        "seq, id, client_id, connection_id, direction, message_type, '' AS body, track, state, \
         created, written, acked, replied, ended, expires, reply, reason, idempotency_key, size"
    };
}
pub(crate) use updated_columns;

/// A device's answer to a tracked message.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Answer<'a> {
    Ack,
    /// The reply payload as JSON text.
    Reply(&'a str),
    /// The device's reason.
    Nack(&'a str),
}

/// What a device's answer did.
#[derive(Debug, Clone, PartialEq)]
pub enum Settled {
    /// The message moved to the answer's state: the updated row (without its body).
    Updated(Box<MessageRow>),
    /// The message is this client's but already past what the answer would set (a duplicate
    /// answer, or one to an expired message): nothing changed.
    Unchanged,
    /// No outgoing message of this client has that id.
    Unknown,
}

/// Filters for a client's messages, newest first.
#[derive(Debug, Clone)]
pub struct MessageFilter<'a> {
    pub client_id: &'a str,
    pub direction: Option<Direction>,
    pub state: Option<MessageState>,
    pub limit: u32,
}

#[async_trait]
pub trait MessageStore: Send + Sync + 'static {
    /// Inserts `m`; when this client already used `m.idempotency_key`, inserts nothing and
    /// returns the earlier message with `false`.
    async fn insert_message(&self, m: &NewMessage<'_>) -> Result<(MessageRow, bool)>;
    /// Queues the insert of `m` in this store's write order and returns once it is queued;
    /// [`Committed::wait`] then says, once it is durable, whether it was inserted (`false`:
    /// its id or idempotency key exists). Where the backend orders its writes (SQLite's writer
    /// thread), every message write this node queues afterwards (a written mark, the device's
    /// answer) is applied after it, so a frame may leave before the commit; elsewhere the
    /// insert is done before this returns.
    async fn queue_message(&self, m: &NewMessage<'_>) -> Result<Committed>;
    /// Inserts an uplink message and keeps only the client's newest `keep` uplink messages.
    async fn insert_uplink(&self, m: &NewMessage<'_>, keep: u32) -> Result<()>;
    async fn message(&self, id: &str) -> Result<Option<MessageRow>>;
    /// The message client `client_id` sent with idempotency key `key`, if any.
    async fn message_by_key(&self, client_id: &str, key: &str) -> Result<Option<MessageRow>>;
    async fn messages(&self, filter: &MessageFilter<'_>) -> Result<Vec<MessageRow>>;
    /// How many messages, and how many body bytes, wait in the client's outbox.
    async fn outbox_usage(&self, client_id: &str) -> Result<(i64, i64)>;
    /// Outgoing messages to deliver on the client's connection `connection_id`, oldest first,
    /// at most `limit`: queued ones, and tracked ones written to another connection and never
    /// answered (that connection ended, or its node died); none past its expiry at `now`.
    async fn pending_messages(
        &self,
        client_id: &str,
        connection_id: &str,
        now: &str,
        limit: u32,
    ) -> Result<Vec<MessageRow>>;
    /// Whether any outgoing message waits for delivery or an answer (anywhere).
    async fn any_pending_messages(&self) -> Result<bool>;
    /// Marks message `id` written to `connection_id` (from `queued`, or from `written` on
    /// another connection): the updated row (without its body), or `None` if it had moved on
    /// (answered, expired, failed).
    async fn mark_written(
        &self,
        id: &str,
        connection_id: &str,
        at: &str,
    ) -> Result<Option<MessageRow>>;
    /// Records the device's answer to message `id`, sent by `client_id`.
    async fn settle_message(
        &self,
        id: &str,
        client_id: &str,
        answer: Answer<'_>,
        at: &str,
    ) -> Result<Settled>;
    /// Message `id`, not yet answered, failed with `reason` (delivery failed and it may not
    /// wait); the updated row, or `None` if it had moved on.
    async fn fail_message(&self, id: &str, reason: &str, at: &str) -> Result<Option<MessageRow>>;
    /// Tracked messages written to `connection_id` and unanswered go back to `queued` (the
    /// connection ended); returns them.
    async fn requeue_messages(&self, connection_id: &str) -> Result<Vec<MessageRow>>;
    /// Fails every undelivered or unanswered message of a client (deprovisioned).
    async fn fail_client_messages(&self, client_id: &str, reason: &str, at: &str) -> Result<u64>;
    /// Expires up to `limit` undelivered or unanswered messages whose expiry is before `now`;
    /// returns them.
    async fn expire_messages(&self, now: &str, limit: u32) -> Result<Vec<MessageRow>>;
    /// Deletes up to `limit` of the oldest messages (by insertion) created before `before`;
    /// returns how many. Insertion order stands for age, so no index on `created` is kept
    /// (one B-tree less per send): a message inserted after a younger one goes with the next
    /// sweep after that one.
    async fn purge_messages(&self, before: &str, limit: u32) -> Result<u64>;
}

/// Implements [`MessageStore`] for `$store` (a struct with a `pool: sqlx::Pool<$db>` field).
macro_rules! sql_messages {
    ($store:ident, $db:ty) => {
        const _: () = {
            use morrigan_protocol::messages::{Direction, MessageState};
            use $crate::store::messages::{
                Answer, Committed, MessageFilter, MessageRow, MessageStore, NewMessage, Settled,
            };
            use $crate::store::messages::{InsertRequest, SettleRequest, WrittenRequest};
            use $crate::store::sql::db;
            use $crate::store::Result;

            /// States in which a message still waits for delivery or an answer.
            macro_rules! open {
                () => {
                    "state IN ('queued', 'written')"
                };
            }
            /// Message `$1`, outgoing, of client `$2`.
            macro_rules! mine {
                () => {
                    "id = $1 AND client_id = $2 AND direction = 'out'"
                };
            }

            #[async_trait::async_trait]
            impl MessageStore for $store {
                async fn insert_message(&self, m: &NewMessage<'_>) -> Result<(MessageRow, bool)> {
                    if m.idempotency_key.is_none() {
                        // The common case: batched with concurrent sends.
                        let inserted = self.messages.insert(InsertRequest::from(m)).await?;
                        if !inserted {
                            return Err($crate::store::StoreError::Conflict(format!(
                                "message {} exists",
                                m.id
                            )));
                        }
                        return Ok((m.row(), true));
                    }
                    let inserted: Option<MessageRow> = sqlx::query_as(
                        "INSERT INTO messages (id, client_id, connection_id, direction, \
                         message_type, body, track, state, created, expires, idempotency_key, size) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
                         ON CONFLICT (client_id, idempotency_key) WHERE idempotency_key IS NOT NULL \
                         DO NOTHING RETURNING *",
                    )
                    .bind(m.id)
                    .bind(m.client_id)
                    .bind(m.connection_id)
                    .bind(m.direction.as_str())
                    .bind(m.message_type)
                    .bind(m.body)
                    .bind(m.track.as_str())
                    .bind(m.state.as_str())
                    .bind(m.created)
                    .bind(m.expires)
                    .bind(m.idempotency_key)
                    .bind(i64::try_from(m.body.len()).unwrap_or(i64::MAX))
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)?;
                    if let Some(row) = inserted {
                        return Ok((row, true));
                    }
                    let key = m.idempotency_key.unwrap_or_default();
                    let earlier = self.message_by_key(m.client_id, key).await?.ok_or_else(|| {
                        $crate::store::StoreError::Database(format!(
                            "message with key {key} conflicts but was not found"
                        ))
                    })?;
                    Ok((earlier, false))
                }

                async fn queue_message(&self, m: &NewMessage<'_>) -> Result<Committed> {
                    if m.idempotency_key.is_some() {
                        let (_, inserted) = self.insert_message(m).await?;
                        return Ok(Committed::ready(inserted));
                    }
                    self.messages.queue_insert(InsertRequest::from(m)).await
                }

                async fn insert_uplink(&self, m: &NewMessage<'_>, keep: u32) -> Result<()> {
                    let mut tx = self.pool.begin().await.map_err(db)?;
                    sqlx::query(
                        "INSERT INTO messages (id, client_id, connection_id, direction, \
                         message_type, body, track, state, created, size) \
                         VALUES ($1, $2, $3, 'in', $4, $5, 'none', 'received', $6, $7)",
                    )
                    .bind(m.id)
                    .bind(m.client_id)
                    .bind(m.connection_id)
                    .bind(m.message_type)
                    .bind(m.body)
                    .bind(m.created)
                    .bind(i64::try_from(m.body.len()).unwrap_or(i64::MAX))
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                    sqlx::query(
                        "DELETE FROM messages WHERE client_id = $1 AND direction = 'in' AND seq <= \
                         (SELECT seq FROM messages WHERE client_id = $1 AND direction = 'in' \
                          ORDER BY seq DESC LIMIT 1 OFFSET $2)",
                    )
                    .bind(m.client_id)
                    .bind(i64::from(keep))
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                    tx.commit().await.map_err(db)
                }

                async fn message(&self, id: &str) -> Result<Option<MessageRow>> {
                    sqlx::query_as("SELECT * FROM messages WHERE id = $1")
                        .bind(id)
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(db)
                }

                async fn message_by_key(
                    &self,
                    client_id: &str,
                    key: &str,
                ) -> Result<Option<MessageRow>> {
                    sqlx::query_as(
                        "SELECT * FROM messages WHERE client_id = $1 AND idempotency_key = $2",
                    )
                    .bind(client_id)
                    .bind(key)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)
                }

                async fn messages(&self, f: &MessageFilter<'_>) -> Result<Vec<MessageRow>> {
                    sqlx::query_as(
                        "SELECT * FROM messages WHERE client_id = $1 \
                         AND ($2 IS NULL OR direction = $2) AND ($3 IS NULL OR state = $3) \
                         ORDER BY seq DESC LIMIT $4",
                    )
                    .bind(f.client_id)
                    .bind(f.direction.map(Direction::as_str))
                    .bind(f.state.map(MessageState::as_str))
                    .bind(i64::from(f.limit))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)
                }

                async fn outbox_usage(&self, client_id: &str) -> Result<(i64, i64)> {
                    sqlx::query_as(
                        "SELECT COUNT(*), CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM messages \
                         WHERE client_id = $1 AND direction = 'out' AND state = 'queued'",
                    )
                    .bind(client_id)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db)
                }

                async fn pending_messages(
                    &self,
                    client_id: &str,
                    connection_id: &str,
                    now: &str,
                    limit: u32,
                ) -> Result<Vec<MessageRow>> {
                    sqlx::query_as(
                        "SELECT * FROM messages WHERE client_id = $1 AND direction = 'out' \
                         AND (state = 'queued' OR (state = 'written' AND track <> 'none' \
                              AND connection_id <> $2)) \
                         AND (expires IS NULL OR expires > $3) ORDER BY seq LIMIT $4",
                    )
                    .bind(client_id)
                    .bind(connection_id)
                    .bind(now)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)
                }

                async fn any_pending_messages(&self) -> Result<bool> {
                    let one: Option<i64> = sqlx::query_scalar(
                        "SELECT seq FROM messages WHERE state IN ('queued', 'written') \
                         AND direction = 'out' AND (state = 'queued' OR track <> 'none') LIMIT 1",
                    )
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)?;
                    Ok(one.is_some())
                }

                async fn mark_written(
                    &self,
                    id: &str,
                    connection_id: &str,
                    at: &str,
                ) -> Result<Option<MessageRow>> {
                    self.messages
                        .written(WrittenRequest {
                            id: id.to_string(),
                            connection_id: connection_id.to_string(),
                            at: at.to_string(),
                        })
                        .await
                }

                async fn settle_message(
                    &self,
                    id: &str,
                    client_id: &str,
                    answer: Answer<'_>,
                    at: &str,
                ) -> Result<Settled> {
                    let (kind, payload, reason) = match answer {
                        Answer::Ack => ("ack", None, None),
                        Answer::Reply(p) => ("reply", Some(p.to_string()), None),
                        Answer::Nack(r) => ("nack", None, Some(r.to_string())),
                    };
                    let updated = self
                        .messages
                        .settle(SettleRequest {
                            id: id.to_string(),
                            client_id: client_id.to_string(),
                            kind,
                            at: at.to_string(),
                            payload,
                            reason,
                        })
                        .await?;
                    if let Some(row) = updated {
                        return Ok(Settled::Updated(Box::new(row)));
                    }
                    // The rare path: a repeated answer, or a foreign id.
                    let known: Option<i64> = sqlx::query_scalar(concat!("SELECT seq FROM messages WHERE ", mine!()))
                    .bind(id)
                    .bind(client_id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)?;
                    Ok(if known.is_some() {
                        Settled::Unchanged
                    } else {
                        Settled::Unknown
                    })
                }

                async fn fail_message(
                    &self,
                    id: &str,
                    reason: &str,
                    at: &str,
                ) -> Result<Option<MessageRow>> {
                    sqlx::query_as(concat!("UPDATE messages SET state = 'failed', ended = $2, reason = $3 \
                         WHERE id = $1 AND ", open!(), " RETURNING *"))
                    .bind(id)
                    .bind(at)
                    .bind(reason)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)
                }

                async fn requeue_messages(&self, connection_id: &str) -> Result<Vec<MessageRow>> {
                    sqlx::query_as(
                        "UPDATE messages SET state = 'queued' WHERE connection_id = $1 \
                         AND state = 'written' AND track <> 'none' RETURNING *",
                    )
                    .bind(connection_id)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)
                }

                async fn fail_client_messages(
                    &self,
                    client_id: &str,
                    reason: &str,
                    at: &str,
                ) -> Result<u64> {
                    let r = sqlx::query(concat!("UPDATE messages SET state = 'failed', ended = $2, reason = $3 \
                         WHERE client_id = $1 AND direction = 'out' AND ", open!()))
                    .bind(client_id)
                    .bind(at)
                    .bind(reason)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                    Ok(r.rows_affected())
                }

                async fn expire_messages(&self, now: &str, limit: u32) -> Result<Vec<MessageRow>> {
                    sqlx::query_as(concat!("UPDATE messages SET state = 'expired', ended = $1 WHERE seq IN \
                         (SELECT seq FROM messages WHERE expires < $1 AND ", open!(), " LIMIT $2) \
                         AND ", open!(), " RETURNING *"))
                    .bind(now)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)
                }

                async fn purge_messages(&self, before: &str, limit: u32) -> Result<u64> {
                    let r = sqlx::query(
                        "DELETE FROM messages WHERE seq IN \
                         (SELECT seq FROM messages ORDER BY seq LIMIT $2) AND created < $1",
                    )
                    .bind(before)
                    .bind(i64::from(limit))
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                    Ok(r.rows_affected())
                }
            }
        };
    };
}
pub(crate) use sql_messages;
