//! The nodes' public signing keys: any node verifies any node's tokens with them.

use async_trait::async_trait;

use super::Result;

/// The public half of a node's signing key.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct SigningKeyRow {
    pub kid: String,
    pub node_id: String,
    /// Raw 32-byte Ed25519 public key.
    pub public_key: Vec<u8>,
    pub created: String,
}

#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Records a key; a key already recorded under its `kid` is kept as it is.
    async fn put_signing_key(&self, key: &SigningKeyRow) -> Result<()>;
    async fn signing_key(&self, kid: &str) -> Result<Option<SigningKeyRow>>;
    async fn signing_keys(&self) -> Result<Vec<SigningKeyRow>>;
}

/// Implements [`KeyStore`] for `$store` (a struct with a `pool: sqlx::Pool<$db>` field).
macro_rules! sql_keys {
    ($store:ident, $db:ty) => {
        const _: () = {
            use $crate::store::sql::db;
            use $crate::store::{KeyStore, Result, SigningKeyRow};

            #[async_trait::async_trait]
            impl KeyStore for $store {
                async fn put_signing_key(&self, key: &SigningKeyRow) -> Result<()> {
                    sqlx::query(
                        "INSERT INTO signing_keys (kid, node_id, public_key, created) \
                         VALUES ($1, $2, $3, $4) ON CONFLICT (kid) DO NOTHING",
                    )
                    .bind(&key.kid)
                    .bind(&key.node_id)
                    .bind(&key.public_key)
                    .bind(&key.created)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                    Ok(())
                }

                async fn signing_key(&self, kid: &str) -> Result<Option<SigningKeyRow>> {
                    sqlx::query_as::<$db, _>("SELECT * FROM signing_keys WHERE kid = $1")
                        .bind(kid)
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(db)
                }

                async fn signing_keys(&self) -> Result<Vec<SigningKeyRow>> {
                    sqlx::query_as::<$db, _>("SELECT * FROM signing_keys ORDER BY created")
                        .fetch_all(&self.pool)
                        .await
                        .map_err(db)
                }
            }
        };
    };
}
pub(crate) use sql_keys;
