//! The embedded default store: SQLite in WAL mode, one file in the data directory.
//!
//! SQLite serialises writers, so the pool is small, and the hot path's batched writes (token
//! exchange, accept, close, the heartbeat flush) go through one connection of their own, whose
//! page cache then stays warm. Message writes go to a thread of their own on a database file
//! (see [`super::sqlite_writer`]).
//!
//! Every connection is checked when it opens: SQLite silently opens a database it may not write
//! (its files or directory made read-only) read-only, and such a connection would fail every
//! write for as long as the pool keeps it, long after the permissions are back. Refused, it is
//! opened again on the next use instead.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Connection, Executor, SqlitePool};

use super::sql::db;
use super::{Deadline, Result};

/// Migrations, in order. Applied once each, recorded in `morrigan_migrations`.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/sqlite/0001_init.sql")),
    (2, include_str!("../../migrations/sqlite/0002_cluster.sql")),
    (
        3,
        include_str!("../../migrations/sqlite/0003_partial_indexes.sql"),
    ),
    (
        4,
        include_str!("../../migrations/sqlite/0004_token_digests.sql"),
    ),
    (5, include_str!("../../migrations/sqlite/0005_messages.sql")),
];

/// SQLite-backed [`Store`].
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// One connection for the hot path's writes (the batches and the heartbeat flush); see
    /// [`SqliteStore::with_options`].
    writer: SqlitePool,
    hot: super::hot_path::HotPath,
    /// Message records' batched writes: on the writer thread ([`super::sqlite_writer`]) for a
    /// database file, on `writer` for one in memory (which no second connection can open).
    messages: super::message_path::MessagePath,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and applies migrations.
    pub async fn open(path: &Path) -> Result<Self> {
        Self::open_with_deadline(path, Deadline::DEFAULT).await
    }

    /// [`SqliteStore::open`] with the backend's timeouts taken from `deadline`.
    pub async fn open_with_deadline(path: &Path, deadline: Deadline) -> Result<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true);
        Self::with_options(options, 4, deadline).await
    }

    /// Opens a `sqlite:` URL (e.g. `sqlite:///var/lib/morrigan/morrigan.db` or `sqlite::memory:`).
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with_deadline(url, Deadline::DEFAULT).await
    }

    /// [`SqliteStore::connect`] with the backend's timeouts taken from `deadline`.
    pub async fn connect_with_deadline(url: &str, deadline: Deadline) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(db)?
            .create_if_missing(true);
        let in_memory = url.contains(":memory:");
        Self::with_options(options, if in_memory { 1 } else { 4 }, deadline).await
    }

    async fn with_options(
        options: SqliteConnectOptions,
        max: u32,
        deadline: Deadline,
    ) -> Result<Self> {
        let options = options
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            // A statement waiting for the write lock gives up before its call's deadline, so a
            // call reported as failed is not carried out later (see `Deadline`).
            .busy_timeout(deadline.statement())
            .foreign_keys(false)
            // The batched statements have one text per batch size (up to 32 each): room for
            // them and everything else, so none is prepared twice.
            .statement_cache_capacity(512)
            // No commit runs a checkpoint (and its fsync) inline: `checkpoints` does, beside
            // the writer (see below).
            .pragma("wal_autocheckpoint", "0");
        let path = options.get_filename().to_path_buf();
        if max > 1 {
            // Create the file, switch it to WAL and migrate it on one connection, before any
            // other opens: sqlx opens a pool's first connections concurrently, each checked
            // with a write (see `writable`), and a migration's transaction, which reads before
            // it writes, fails at once with SQLITE_BUSY when another connection holds the
            // write lock (SQLite consults no busy handler for that upgrade).
            let mut first = SqliteConnection::connect_with(&options).await.map_err(db)?;
            let migrated = async { super::sql::migrate!(&mut first, MIGRATIONS) }.await;
            first.close().await.map_err(db)?;
            migrated?;
        }
        let pool = Self::pool_options(max, deadline)
            .connect_with(options.clone())
            .await
            .map_err(db)?;
        if max == 1 {
            // In memory: the database is this one connection's.
            super::sql::migrate!(&pool, MIGRATIONS)?;
        }
        // The hot path writes through a connection of its own. SQLite runs one writer at a
        // time anyway, and a connection drops its whole page cache whenever another one has
        // written since its last statement: with the batches spread over the pool, nearly every
        // batch began by re-reading its B-tree pages (perf: `pread` and checkpoints were a
        // quarter of a churning node's SQLite time). An in-memory database is one connection.
        let writer = if max == 1 {
            pool.clone()
        } else {
            Self::pool_options(1, deadline)
                .connect_with(options)
                .await
                .map_err(db)?
        };
        let hot = Self::hot_path(&writer, deadline);
        let messages = if max == 1 {
            Self::message_path(&writer, deadline)
        } else {
            let thread = super::sqlite_writer::Writer::spawn(&path, deadline)?;
            tokio::spawn(checkpoints(pool.clone(), writer.clone(), thread.clone()));
            super::message_path::MessagePath::Ordered(thread)
        };
        Ok(Self {
            pool,
            writer,
            hot,
            messages,
        })
    }

    fn pool_options(max: u32, deadline: Deadline) -> SqlitePoolOptions {
        let busy = deadline.statement();
        SqlitePoolOptions::new()
            // An embedded database has no far end to lose: sqlx's default ping on every acquire
            // doubled the round trips to the SQLite worker thread of every statement.
            .test_before_acquire(false)
            .max_connections(max)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(deadline.acquire())
            .after_connect(move |conn, _| Box::pin(writable(conn, busy)))
    }
}

impl SqliteStore {
    /// A transaction that is the database's one writer from its start, for the guarded
    /// identity changes (see `identities.rs`).
    async fn begin_identities(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(db)
    }
}

/// How often the write-ahead log is copied back into the database.
const CHECKPOINT_PERIOD: Duration = Duration::from_secs(1);

/// Copies the write-ahead log into the database every [`CHECKPOINT_PERIOD`] until the pool
/// closes. SQLite starts the log over only when a write finds all of it copied, and a
/// checkpoint run while a writer appends never catches up with it: checkpointed only beside
/// the writers, the log would grow for as long as writes go on. So each period runs two
/// checkpoints:
///
/// 1. on a pooled connection, beside both writers: it copies most of the log and flushes it to
///    disk, the slow part, while they go on;
/// 2. with both writers between two of their writes, the hot path's connection held (its
///    batches wait) and on the message writer's thread (see `sqlite_writer.rs`): it copies only
///    what they appended meanwhile, and the next write starts the log over.
///
/// So under steady writes the log stays about one period long. `PASSIVE` never waits for
/// another connection, and no commit runs a checkpoint.
async fn checkpoints(pool: SqlitePool, hot: SqlitePool, writer: super::sqlite_writer::Writer) {
    let mut tick = tokio::time::interval(CHECKPOINT_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if pool.is_closed() {
            return;
        }
        let bulk = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
            .map_err(db);
        let rest = match hot.acquire().await {
            Ok(_held) => writer.checkpoint().await,
            Err(e) => Err(db(e)),
        };
        match bulk.and(rest) {
            Ok(true) => {}
            // A pooled connection wrote meanwhile, or a checkpoint was already running.
            Ok(false) => tracing::debug!("log not all copied back; it starts over later"),
            Err(e) => tracing::debug!(error = %e, "checkpoint failed; retried next period"),
        }
    }
}

/// Fails for a connection that cannot write, without waiting for the write lock (the busy
/// timeout is zero meanwhile). `BEGIN IMMEDIATE` asks for the write lock on a writable database,
/// so `SQLITE_BUSY` proves writability; on a database opened read-only it starts a read
/// transaction instead, and rewriting `user_version` (rolled back) shows which it was.
async fn writable(conn: &mut SqliteConnection, busy: Duration) -> sqlx::Result<()> {
    conn.execute("PRAGMA busy_timeout = 0").await?;
    match conn.execute("BEGIN IMMEDIATE").await {
        Err(sqlx::Error::Database(e)) if is_busy(e.code().as_deref()) => {}
        Err(e) => return Err(e),
        Ok(_) => {
            let version: i64 = sqlx::query_scalar("PRAGMA user_version")
                .fetch_one(&mut *conn)
                .await?;
            let rewrite = format!("PRAGMA user_version = {version}");
            let wrote = conn.execute(sqlx::AssertSqlSafe(rewrite)).await;
            conn.execute("ROLLBACK").await?;
            wrote?;
        }
    }
    let restore = format!("PRAGMA busy_timeout = {}", busy.as_millis());
    conn.execute(sqlx::AssertSqlSafe(restore)).await?;
    Ok(())
}

/// `SQLITE_BUSY` or `SQLITE_LOCKED`, with any extended code (sqlx reports the extended one).
fn is_busy(code: Option<&str>) -> bool {
    const SQLITE_BUSY: i32 = 5;
    const SQLITE_LOCKED: i32 = 6;
    let primary = code.and_then(|c| c.parse::<i32>().ok()).map(|c| c & 0xff);
    matches!(primary, Some(SQLITE_BUSY | SQLITE_LOCKED))
}

super::sql::sql_store!(SqliteStore, sqlx::Sqlite, numbered: false);
