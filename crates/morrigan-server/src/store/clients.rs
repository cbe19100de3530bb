//! Provisioned clients (devices), their reported state and capabilities.

use async_trait::async_trait;
use morrigan_protocol::records::{ClientCapabilities, ClientRecord};

use super::Result;

#[async_trait]
pub trait ClientStore: Send + Sync + 'static {
    /// Creates the client if absent (else bumps `updated`) and returns it.
    async fn upsert_client(&self, id: &str, now: &str) -> Result<ClientRecord>;
    async fn client(&self, id: &str) -> Result<Option<ClientRecord>>;
    async fn clients(&self) -> Result<Vec<ClientRecord>>;
    /// Deletes the client and its identity tokens; false if it did not exist.
    async fn delete_client(&self, id: &str) -> Result<bool>;
    async fn set_client_token(&self, id: &str, token_id: &str, now: &str) -> Result<bool>;
    async fn set_client_state(&self, id: &str, state: &str, now: &str) -> Result<bool>;
    async fn set_capabilities(&self, id: &str, capabilities: &str, now: &str) -> Result<bool>;
    async fn capabilities(&self, id: &str) -> Result<Option<ClientCapabilities>>;
}

/// Implements [`ClientStore`] for `$store` (a struct with a `pool: sqlx::Pool<$db>` field).
macro_rules! sql_clients {
    ($store:ident, $db:ty) => {
        const _: () = {
            use morrigan_protocol::records::{ClientCapabilities, ClientRecord};
            use $crate::store::sql::db;
            use $crate::store::{ClientStore, Result, StoreError};

            #[async_trait::async_trait]
            impl ClientStore for $store {
                async fn upsert_client(&self, id: &str, now: &str) -> Result<ClientRecord> {
                    sqlx::query_as::<$db, ClientRecord>(
                        "INSERT INTO clients (id, created, updated) VALUES ($1, $2, $2) \
                         ON CONFLICT (id) DO UPDATE SET updated = excluded.updated \
                         RETURNING id, created, updated, token_id, state, state_updated",
                    )
                    .bind(id)
                    .bind(now)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db)
                }

                async fn client(&self, id: &str) -> Result<Option<ClientRecord>> {
                    sqlx::query_as::<$db, ClientRecord>(
                        "SELECT id, created, updated, token_id, state, state_updated \
                         FROM clients WHERE id = $1",
                    )
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)
                }

                async fn clients(&self) -> Result<Vec<ClientRecord>> {
                    sqlx::query_as::<$db, ClientRecord>(
                        "SELECT id, created, updated, token_id, state, state_updated \
                         FROM clients ORDER BY created, id",
                    )
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)
                }

                async fn delete_client(&self, id: &str) -> Result<bool> {
                    let mut tx = self.pool.begin().await.map_err(db)?;
                    let r = sqlx::query("DELETE FROM clients WHERE id = $1")
                        .bind(id)
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                    sqlx::query("DELETE FROM tokens WHERE kind = 'identity' AND subject = $1")
                        .bind(id)
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                    tx.commit().await.map_err(db)?;
                    Ok(r.rows_affected() == 1)
                }

                async fn set_client_token(
                    &self,
                    id: &str,
                    token_id: &str,
                    now: &str,
                ) -> Result<bool> {
                    let r =
                        sqlx::query("UPDATE clients SET token_id = $2, updated = $3 WHERE id = $1")
                            .bind(id)
                            .bind(token_id)
                            .bind(now)
                            .execute(&self.pool)
                            .await
                            .map_err(db)?;
                    Ok(r.rows_affected() == 1)
                }

                async fn set_client_state(&self, id: &str, state: &str, now: &str) -> Result<bool> {
                    let r = sqlx::query(
                        "UPDATE clients SET state = $2, state_updated = $3 WHERE id = $1",
                    )
                    .bind(id)
                    .bind(state)
                    .bind(now)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                    Ok(r.rows_affected() == 1)
                }

                async fn set_capabilities(
                    &self,
                    id: &str,
                    capabilities: &str,
                    now: &str,
                ) -> Result<bool> {
                    let r = sqlx::query(
                        "UPDATE clients SET capabilities = $2, capabilities_reported = $3 \
                         WHERE id = $1",
                    )
                    .bind(id)
                    .bind(capabilities)
                    .bind(now)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                    Ok(r.rows_affected() == 1)
                }

                async fn capabilities(&self, id: &str) -> Result<Option<ClientCapabilities>> {
                    let row = sqlx::query_as::<$db, (String, String)>(
                        "SELECT capabilities, capabilities_reported FROM clients \
                         WHERE id = $1 AND capabilities IS NOT NULL",
                    )
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)?;
                    let Some((text, reported)) = row else {
                        return Ok(None);
                    };
                    Ok(Some(ClientCapabilities {
                        client_id: id.to_string(),
                        capabilities: serde_json::from_str(&text)
                            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                        reported,
                    }))
                }
            }
        };
    };
}
pub(crate) use sql_clients;
