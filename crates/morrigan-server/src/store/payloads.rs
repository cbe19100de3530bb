//! Cluster bus payloads too large for the transport, stashed for their receiver to take.

use async_trait::async_trait;

use super::Result;

#[async_trait]
pub trait PayloadStore: Send + Sync + 'static {
    async fn stash_payload(&self, id: &str, body: &str, now: &str) -> Result<()>;
    /// Returns and deletes a stashed payload.
    async fn take_payload(&self, id: &str) -> Result<Option<String>>;
    async fn purge_payloads(&self, before: &str) -> Result<u64>;
}

/// Implements [`PayloadStore`] for `$store` (a struct with a `pool: sqlx::Pool<$db>` field).
macro_rules! sql_payloads {
    ($store:ident, $db:ty) => {
        const _: () = {
            use $crate::store::sql::db;
            use $crate::store::{PayloadStore, Result};

            #[async_trait::async_trait]
            impl PayloadStore for $store {
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
        };
    };
}
pub(crate) use sql_payloads;
