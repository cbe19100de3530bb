//! The cluster store: PostgreSQL, shared by every node. The statements are the same as
//! SQLite's (see `sql.rs`); row-level atomicity of the conditional `UPDATE`s keeps token
//! consumption and supersede correct across nodes under READ COMMITTED.
//!
//! A connection the server ended (restart, `pg_terminate_backend`, a network cut) is found dead
//! by sqlx's ping when it is next taken from the pool, or when it is returned after a failed
//! statement, and a new one is opened in its place: the node recovers without a restart.

use std::str::FromStr;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::sql::db;
use super::{Deadline, Result};

/// Migrations, in order. Applied once each, recorded in `morrigan_migrations`.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/postgres/0001_init.sql")),
    (
        2,
        include_str!("../../migrations/postgres/0002_cluster.sql"),
    ),
    (
        3,
        include_str!("../../migrations/postgres/0003_partial_indexes.sql"),
    ),
    (
        4,
        include_str!("../../migrations/postgres/0004_token_digests.sql"),
    ),
    (
        5,
        include_str!("../../migrations/postgres/0005_messages.sql"),
    ),
];

/// PostgreSQL-backed [`Store`](super::Store).
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// The hot path's writes share the pool (PostgreSQL runs them concurrently).
    writer: PgPool,
    hot: super::hot_path::HotPath,
    messages: super::message_path::MessagePath,
}

impl PgStore {
    /// Connects to a `postgres://` URL and applies migrations. Concurrent first starts are
    /// serialised with an advisory lock.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with_deadline(url, Deadline::DEFAULT).await
    }

    /// [`PgStore::connect`] with the pool's timeouts taken from `deadline`: the server cancels a
    /// statement after `deadline.statement()` (`statement_timeout`), so a call reported as
    /// failed is not carried out later (see [`Deadline`]).
    pub async fn connect_with_deadline(url: &str, deadline: Deadline) -> Result<Self> {
        let statement = format!("{}ms", deadline.statement().as_millis());
        let options = PgConnectOptions::from_str(url)
            .map_err(db)?
            .options([("statement_timeout", statement)]);
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .min_connections(1)
            .acquire_timeout(deadline.acquire())
            .connect_with(options)
            .await
            .map_err(db)?;
        let hot = Self::hot_path(&pool, deadline);
        let messages = Self::message_path(&pool, deadline);
        let store = Self {
            writer: pool.clone(),
            pool,
            hot,
            messages,
        };
        // Migrations may wait for another node's and may rewrite large tables: on a connection
        // of their own without the statement timeout.
        let mut lock = store.pool.acquire().await.map_err(db)?;
        sqlx::query("SET statement_timeout = 0")
            .execute(&mut *lock)
            .await
            .map_err(db)?;
        sqlx::query("SELECT pg_advisory_lock(72070001)")
            .execute(&mut *lock)
            .await
            .map_err(db)?;
        let migrated = async {
            use sqlx::Connection as _;
            super::sql::migrate!(&mut *lock, MIGRATIONS)
        }
        .await;
        sqlx::query("SELECT pg_advisory_unlock(72070001)")
            .execute(&mut *lock)
            .await
            .map_err(db)?;
        sqlx::query("RESET statement_timeout")
            .execute(&mut *lock)
            .await
            .map_err(db)?;
        migrated?;
        Ok(store)
    }

    /// The pool, for the PostgreSQL cluster bus (LISTEN/NOTIFY).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

impl PgStore {
    /// A transaction holding the advisory lock that serialises the guarded identity changes
    /// (see `identities.rs`); released at commit or rollback.
    async fn begin_identities(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(super::identities::PG_IDENTITY_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        Ok(tx)
    }
}

super::sql::sql_store!(PgStore, sqlx::Postgres, numbered: true);
