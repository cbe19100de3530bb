//! Revocable tokens (operators' session tokens, devices' identity tokens). Connection tokens
//! have no row here: their connection record is their record, and accepting the connection
//! consumes them.

use async_trait::async_trait;

use super::{Result, StoreError};

/// The kinds of token the server records; each has its own lifetime and audience.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// An operator's session token.
    User,
    /// A device's long-lived identity token.
    Identity,
}

impl TokenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::User => "user",
            TokenKind::Identity => "identity",
        }
    }
}

impl TryFrom<String> for TokenKind {
    type Error = StoreError;

    fn try_from(kind: String) -> Result<Self> {
        match kind.as_str() {
            "user" => Ok(TokenKind::User),
            "identity" => Ok(TokenKind::Identity),
            other => Err(StoreError::Corrupt(format!("token kind {other}"))),
        }
    }
}

/// A revocable token's record.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct TokenRow {
    pub id: String,
    #[sqlx(try_from = "String")]
    pub kind: TokenKind,
    pub subject: String,
    pub issuer: String,
    pub issued: String,
    pub expires: String,
    /// The digest of the token's text; `None` for tokens recorded before digests were kept.
    pub digest: Option<String>,
}

#[async_trait]
pub trait TokenStore: Send + Sync + 'static {
    async fn insert_token(&self, row: &TokenRow) -> Result<()>;
    /// Records the digest of a token recorded without one (before digests were kept), once its
    /// signature has been checked; false if it has one already or does not exist.
    async fn set_token_digest(&self, id: &str, digest: &str) -> Result<bool>;
    /// The token's record if it exists and has not expired at `now`.
    async fn live_token(&self, id: &str, now: &str) -> Result<Option<TokenRow>>;
    /// Deletes every token of `subject` of this kind except `keep`.
    async fn revoke_tokens(
        &self,
        kind: TokenKind,
        subject: &str,
        keep: Option<&str>,
    ) -> Result<u64>;
    /// Moves the expiry of every other token of `subject` to at most `expires` (a grace period
    /// after a refresh, so a device that lost the new token can still come back once).
    async fn shorten_tokens(
        &self,
        kind: TokenKind,
        subject: &str,
        keep: &str,
        expires: &str,
    ) -> Result<u64>;
    async fn purge_expired_tokens(&self, now: &str) -> Result<u64>;
}

/// Implements [`TokenStore`] for `$store` (a struct with a `pool: sqlx::Pool<$db>` field).
macro_rules! sql_tokens {
    ($store:ident, $db:ty) => {
        const _: () = {
            use $crate::store::sql::db;
            use $crate::store::{Result, TokenKind, TokenRow, TokenStore};

            #[async_trait::async_trait]
            impl TokenStore for $store {
                async fn insert_token(&self, row: &TokenRow) -> Result<()> {
                    sqlx::query(
                        "INSERT INTO tokens (id, kind, subject, issuer, issued, expires, digest) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    )
                    .bind(&row.id)
                    .bind(row.kind.as_str())
                    .bind(&row.subject)
                    .bind(&row.issuer)
                    .bind(&row.issued)
                    .bind(&row.expires)
                    .bind(&row.digest)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                    Ok(())
                }

                async fn set_token_digest(&self, id: &str, digest: &str) -> Result<bool> {
                    let r = sqlx::query(
                        "UPDATE tokens SET digest = $1 WHERE id = $2 AND digest IS NULL",
                    )
                    .bind(digest)
                    .bind(id)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                    Ok(r.rows_affected() > 0)
                }

                async fn live_token(&self, id: &str, now: &str) -> Result<Option<TokenRow>> {
                    sqlx::query_as::<$db, TokenRow>(
                        "SELECT * FROM tokens WHERE id = $1 AND expires > $2",
                    )
                    .bind(id)
                    .bind(now)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)
                }

                async fn revoke_tokens(
                    &self,
                    kind: TokenKind,
                    subject: &str,
                    keep: Option<&str>,
                ) -> Result<u64> {
                    let r = sqlx::query(
                        "DELETE FROM tokens WHERE kind = $1 AND subject = $2 AND id <> $3",
                    )
                    .bind(kind.as_str())
                    .bind(subject)
                    .bind(keep.unwrap_or(""))
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                    Ok(r.rows_affected())
                }

                async fn shorten_tokens(
                    &self,
                    kind: TokenKind,
                    subject: &str,
                    keep: &str,
                    expires: &str,
                ) -> Result<u64> {
                    let r = sqlx::query(
                        "UPDATE tokens SET expires = $4 WHERE kind = $1 AND subject = $2 \
                         AND id <> $3 AND expires > $4",
                    )
                    .bind(kind.as_str())
                    .bind(subject)
                    .bind(keep)
                    .bind(expires)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                    Ok(r.rows_affected())
                }

                async fn purge_expired_tokens(&self, now: &str) -> Result<u64> {
                    let r = sqlx::query("DELETE FROM tokens WHERE expires <= $1")
                        .bind(now)
                        .execute(&self.pool)
                        .await
                        .map_err(db)?;
                    Ok(r.rows_affected())
                }
            }
        };
    };
}
pub(crate) use sql_tokens;
