//! The cluster store: PostgreSQL, shared by every node. The statements are the same as
//! SQLite's (see `sql.rs`); row-level atomicity of the conditional `UPDATE`s keeps token
//! consumption and supersede correct across nodes under READ COMMITTED.

use std::str::FromStr;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::Result;
use super::sql::db;

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
];

/// PostgreSQL-backed [`Store`](super::Store).
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// The hot path's writes share the pool (PostgreSQL runs them concurrently).
    writer: PgPool,
    hot: super::sql::HotPath,
}

impl PgStore {
    /// Connects to a `postgres://` URL and applies migrations. Concurrent first starts are
    /// serialised with an advisory lock.
    pub async fn connect(url: &str) -> Result<Self> {
        let options = PgConnectOptions::from_str(url).map_err(db)?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(db)?;
        let hot = Self::hot_path(&pool);
        let store = Self {
            writer: pool.clone(),
            pool,
            hot,
        };
        let mut lock = store.pool.acquire().await.map_err(db)?;
        sqlx::query("SELECT pg_advisory_lock(72070001)")
            .execute(&mut *lock)
            .await
            .map_err(db)?;
        let migrated = store.migrate().await;
        sqlx::query("SELECT pg_advisory_unlock(72070001)")
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

    async fn migrate(&self) -> Result<()> {
        super::sql::migrate!(&self.pool, MIGRATIONS)
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

super::identities::guarded_identities!(PgStore, sqlx::Postgres);
super::sql::sql_store!(PgStore, sqlx::Postgres, sqlx::postgres::PgRow, numbered: true);
