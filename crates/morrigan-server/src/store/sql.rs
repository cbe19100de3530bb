//! What the SQL backends share. The statements are portable (`$n` placeholders,
//! `TRUE`/`FALSE`, `ON CONFLICT`, `RETURNING`, text timestamps), so each aggregate's file holds
//! one body of its SQL as a macro, and [`sql_store!`] instantiates all of them for a backend's
//! pool type; each backend file (`sqlite.rs`, `postgres.rs`) only opens its pool, runs its own
//! migrations and invokes [`sql_store!`].

use super::StoreError;

/// Maps a driver error; unique violations become [`StoreError::Conflict`].
pub(crate) fn db(e: sqlx::Error) -> StoreError {
    if let sqlx::Error::Database(d) = &e
        && d.is_unique_violation()
    {
        return StoreError::Conflict(d.message().to_string());
    }
    StoreError::Database(e.to_string())
}

/// Rows per multi-row statement. Each row count is its own statement text, prepared and cached
/// per pooled connection, so this also bounds those caches.
pub(crate) const BATCH_ROWS: usize = 32;

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

/// Implements [`Store`](super::Store) for `$store`: a struct with `pool` and `writer` fields of
/// type `sqlx::Pool<$db>` (the second for the hot path's writes), a `hot` field made by
/// `$store::hot_path(&writer, deadline)`, and an
/// `async fn begin_identities(&self) -> Result<sqlx::Transaction<'static, $db>>` that takes the
/// backend's lock on identity changes. `numbered`: whether the backend's placeholders are `$n`.
macro_rules! sql_store {
    ($store:ident, $db:ty, numbered: $numbered:expr) => {
        $crate::store::keys::sql_keys!($store, $db);
        $crate::store::nodes::sql_nodes!($store, $db);
        $crate::store::identities::sql_identities!($store, $db);
        $crate::store::tokens::sql_tokens!($store, $db);
        $crate::store::clients::sql_clients!($store, $db);
        $crate::store::connections::sql_connections!($store, $db, numbered: $numbered);
        $crate::store::hot_path::sql_hot_path!($store, $db, numbered: $numbered);
        $crate::store::payloads::sql_payloads!($store, $db);
        $crate::store::messages::sql_messages!($store, $db);
        $crate::store::message_path::sql_message_path!($store, $db, numbered: $numbered);
    };
}
pub(crate) use sql_store;
