//! The message writes on SQLite's writer thread ([`super::sqlite_writer`]), where a round's
//! records, written marks and answers share one commit: one prepared statement per write,
//! saying what the batched path's multi-row statements (`super::message_path`) say for each of
//! their rows.

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::Result;
use super::messages::{InsertRequest, MessageRow, SettleRequest, WrittenRequest};
use super::sqlite_writer::sqlite;

/// Inserts a record: `false` if its id exists.
pub(crate) fn insert(c: &Connection, r: &InsertRequest) -> Result<bool> {
    let mut stmt = c
        .prepare_cached(
            "INSERT INTO messages (id, client_id, connection_id, direction, message_type, body, \
             track, state, created, expires, size) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) ON CONFLICT (id) DO NOTHING",
        )
        .map_err(sqlite)?;
    let size = i64::try_from(r.body.len()).unwrap_or(i64::MAX);
    let n = stmt
        .execute(params![
            r.id,
            r.client_id,
            r.connection_id,
            r.direction,
            r.message_type,
            r.body,
            r.track,
            r.state,
            r.created,
            r.expires,
            size
        ])
        .map_err(sqlite)?;
    Ok(n == 1)
}

/// Marks a message written, from `queued` or from `written` on another connection.
pub(crate) fn written(c: &Connection, r: &WrittenRequest) -> Result<Option<MessageRow>> {
    let mut stmt = c
        .prepare_cached(concat!(
            "UPDATE messages SET state = 'written', connection_id = ?2, written = ?3 \
             WHERE id = ?1 AND state IN ('queued', 'written') RETURNING ",
            super::messages::updated_columns!()
        ))
        .map_err(sqlite)?;
    stmt.query_row(params![r.id, r.connection_id, r.at], message_row)
        .optional()
        .map_err(sqlite)
}

/// Records a device's answer if its message still waits for it (an ack or a nack while
/// `queued` or `written`, a reply until `acked` too).
pub(crate) fn settle(c: &Connection, r: &SettleRequest) -> Result<Option<MessageRow>> {
    let mut stmt = c
        .prepare_cached(concat!(
            "UPDATE messages SET \
             state = CASE ?3 WHEN 'ack' THEN 'acked' WHEN 'reply' THEN 'replied' \
               ELSE 'rejected' END, \
             written = CASE WHEN ?3 = 'nack' THEN written ELSE COALESCE(written, ?4) END, \
             acked = CASE WHEN ?3 = 'nack' THEN acked ELSE COALESCE(acked, ?4) END, \
             replied = CASE WHEN ?3 = 'reply' THEN ?4 ELSE replied END, \
             reply = CASE WHEN ?3 = 'reply' THEN ?5 ELSE reply END, \
             ended = CASE WHEN ?3 = 'nack' THEN ?4 ELSE ended END, \
             reason = CASE WHEN ?3 = 'nack' THEN ?6 ELSE reason END \
             WHERE id = ?1 AND client_id = ?2 AND direction = 'out' \
             AND (state IN ('queued', 'written') OR (?3 = 'reply' AND state = 'acked')) \
             RETURNING ",
            super::messages::updated_columns!()
        ))
        .map_err(sqlite)?;
    stmt.query_row(
        params![r.id, r.client_id, r.kind, r.at, r.payload, r.reason],
        message_row,
    )
    .optional()
    .map_err(sqlite)
}

/// A row of [`updated_columns!`](super::messages::updated_columns), in its order.
fn message_row(r: &Row<'_>) -> rusqlite::Result<MessageRow> {
    Ok(MessageRow {
        seq: r.get(0)?,
        id: r.get(1)?,
        client_id: r.get(2)?,
        connection_id: r.get(3)?,
        direction: r.get(4)?,
        message_type: r.get(5)?,
        body: r.get(6)?,
        track: r.get(7)?,
        state: r.get(8)?,
        created: r.get(9)?,
        written: r.get(10)?,
        acked: r.get(11)?,
        replied: r.get(12)?,
        ended: r.get(13)?,
        expires: r.get(14)?,
        reply: r.get(15)?,
        reason: r.get(16)?,
        idempotency_key: r.get(17)?,
        size: r.get(18)?,
    })
}
