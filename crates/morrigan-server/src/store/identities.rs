//! Operator identities, and the changes that must leave at least one identity holding every
//! function ([`IdentityStore::update_identity`], [`IdentityStore::delete_identity`]).
//!
//! Each guarded change runs in one transaction that first takes the backend's lock on identity
//! changes (SQLite: `BEGIN IMMEDIATE`, which makes the transaction the database's one writer;
//! PostgreSQL: a transaction-scoped advisory lock), then reads which identities hold every
//! function, decides, and writes. Two such changes never interleave, so two operators
//! deleting each other at once cannot together remove the last full identity: the second
//! sees the first's result and is refused.

use async_trait::async_trait;

use super::{Result, StoreError};

/// An operator identity with its password hash (PHC string, argon2id).
#[derive(Debug, Clone, PartialEq)]
pub struct IdentityRow {
    pub id: String,
    pub name: String,
    pub functions: Vec<String>,
    pub password_hash: String,
    pub created: String,
    pub updated: String,
}

/// What a guarded identity change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityChange {
    Done,
    /// No such identity.
    NotFound,
    /// Refused: it is the last identity holding every function asked to be kept, and would
    /// no longer be.
    LastFull,
}

#[async_trait]
pub trait IdentityStore: Send + Sync + 'static {
    async fn count_identities(&self) -> Result<i64>;
    /// Fails with [`StoreError::Conflict`] when the name is taken.
    async fn insert_identity(&self, row: &IdentityRow) -> Result<()>;
    async fn identity(&self, id: &str) -> Result<Option<IdentityRow>>;
    async fn identity_by_name(&self, name: &str) -> Result<Option<IdentityRow>>;
    async fn identities(&self) -> Result<Vec<IdentityRow>>;
    /// Replaces name, functions and hash, unless the identity is the last one holding every
    /// function in `full` and the new functions do not. Atomic: concurrent changes cannot
    /// together leave no identity holding all of `full`.
    async fn update_identity(&self, row: &IdentityRow, full: &[&str]) -> Result<IdentityChange>;
    /// Deletes the identity and its user tokens, unless it is the last one holding every
    /// function in `full`; atomic like [`IdentityStore::update_identity`].
    async fn delete_identity(&self, id: &str, full: &[&str]) -> Result<IdentityChange>;
}

/// The columns of an identity row: the functions are stored as a JSON list.
#[derive(sqlx::FromRow)]
pub(crate) struct IdentityCols {
    id: String,
    name: String,
    functions: String,
    password_hash: String,
    created: String,
    updated: String,
}

impl TryFrom<IdentityCols> for IdentityRow {
    type Error = StoreError;

    fn try_from(c: IdentityCols) -> Result<Self> {
        Ok(IdentityRow {
            functions: serde_json::from_str(&c.functions)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            id: c.id,
            name: c.name,
            password_hash: c.password_hash,
            created: c.created,
            updated: c.updated,
        })
    }
}

/// The stored form of an identity's functions.
pub(crate) fn functions_text(functions: &[String]) -> Result<String> {
    serde_json::to_string(functions).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Key of the PostgreSQL advisory lock that serialises guarded identity changes (the
/// migrations use 72070001).
pub(crate) const PG_IDENTITY_LOCK: i64 = 72_070_002;

/// Whether `functions` (a stored JSON list) holds every function in `full`. An unreadable
/// list holds nothing.
pub(crate) fn holds_all(functions: &str, full: &[&str]) -> bool {
    let list: Vec<String> = serde_json::from_str(functions).unwrap_or_default();
    full.iter().all(|f| list.iter().any(|g| g == f))
}

/// Decides a guarded change of `target` (`None`: it does not exist) given the identities that
/// hold every function now (`holders`) and whether `target` still will afterwards.
pub(crate) fn decide(target: Option<&str>, holders: &[String], keeps_all: bool) -> IdentityChange {
    match target {
        None => IdentityChange::NotFound,
        Some(id) if !keeps_all && holders.len() == 1 && holders[0] == id => {
            IdentityChange::LastFull
        }
        Some(_) => IdentityChange::Done,
    }
}

/// Implements [`IdentityStore`] for `$store` (a struct with a `pool: sqlx::Pool<$db>` field)
/// which provides `async fn begin_identities(&self) -> Result<sqlx::Transaction<'static, $db>>`
/// taking the lock on identity changes.
macro_rules! sql_identities {
    ($store:ident, $db:ty) => {
        const _: () = {
            use $crate::store::identities::{IdentityCols, decide, functions_text, holds_all};
            use $crate::store::sql::db;
            use $crate::store::{IdentityChange, IdentityRow, IdentityStore, Result};

            #[async_trait::async_trait]
            impl IdentityStore for $store {
                async fn count_identities(&self) -> Result<i64> {
                    sqlx::query_scalar("SELECT COUNT(*) FROM identities")
                        .fetch_one(&self.pool)
                        .await
                        .map_err(db)
                }

                async fn insert_identity(
                    &self,
                    row: &IdentityRow,
                ) -> Result<()> {
                    sqlx::query(
                        "INSERT INTO identities (id, name, functions, password_hash, created, updated) \
                         VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .bind(&row.id)
                    .bind(&row.name)
                    .bind(functions_text(&row.functions)?)
                    .bind(&row.password_hash)
                    .bind(&row.created)
                    .bind(&row.updated)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                    Ok(())
                }

                async fn identity(
                    &self,
                    id: &str,
                ) -> Result<Option<IdentityRow>> {
                    self.identity_where("SELECT * FROM identities WHERE id = $1", id).await
                }

                async fn identity_by_name(
                    &self,
                    name: &str,
                ) -> Result<Option<IdentityRow>> {
                    self.identity_where("SELECT * FROM identities WHERE name = $1", name).await
                }

                async fn identities(&self) -> Result<Vec<IdentityRow>> {
                    sqlx::query_as::<$db, IdentityCols>(
                        "SELECT * FROM identities ORDER BY created, name",
                    )
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)?
                    .into_iter()
                    .map(TryInto::try_into)
                    .collect()
                }

                async fn update_identity(
                    &self,
                    row: &IdentityRow,
                    full: &[&str],
                ) -> Result<IdentityChange> {
                    self.guarded_update(row, full).await
                }

                async fn delete_identity(
                    &self,
                    id: &str,
                    full: &[&str],
                ) -> Result<IdentityChange> {
                    self.guarded_delete(id, full).await
                }
            }

            impl $store {
                /// The one identity `statement` selects by its one parameter.
                async fn identity_where(
                    &self,
                    statement: &'static str,
                    key: &str,
                ) -> Result<Option<IdentityRow>> {
                    sqlx::query_as::<$db, IdentityCols>(statement)
                        .bind(key)
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(db)?
                        .map(TryInto::try_into)
                        .transpose()
                }

                /// The ids of the identities holding every function in `full`, and whether `id`
                /// exists, read inside the locked transaction.
                async fn full_holders(
                    tx: &mut <$db as sqlx::Database>::Connection,
                    id: &str,
                    full: &[&str],
                ) -> Result<(Vec<String>, bool)> {
                    let rows = sqlx::query_as::<$db, (String, String)>(
                        "SELECT id, functions FROM identities",
                    )
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(db)?;
                    let mut holders = Vec::new();
                    let mut exists = false;
                    for (row_id, functions) in rows {
                        exists |= row_id == id;
                        if holds_all(&functions, full) {
                            holders.push(row_id);
                        }
                    }
                    Ok((holders, exists))
                }

                async fn guarded_update(
                    &self,
                    row: &IdentityRow,
                    full: &[&str],
                ) -> Result<IdentityChange> {
                    let functions = functions_text(&row.functions)?;
                    let mut tx = self.begin_identities().await?;
                    let (holders, exists) = Self::full_holders(&mut *tx, &row.id, full).await?;
                    let keeps = holds_all(&functions, full);
                    let change = decide(
                        exists.then_some(row.id.as_str()),
                        &holders,
                        keeps,
                    );
                    if change != IdentityChange::Done {
                        return Ok(change);
                    }
                    sqlx::query(
                        "UPDATE identities SET name = $2, functions = $3, password_hash = $4, updated = $5 \
                         WHERE id = $1",
                    )
                    .bind(&row.id)
                    .bind(&row.name)
                    .bind(functions)
                    .bind(&row.password_hash)
                    .bind(&row.updated)
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                    tx.commit().await.map_err(db)?;
                    Ok(change)
                }

                async fn guarded_delete(
                    &self,
                    id: &str,
                    full: &[&str],
                ) -> Result<IdentityChange> {
                    let mut tx = self.begin_identities().await?;
                    let (holders, exists) = Self::full_holders(&mut *tx, id, full).await?;
                    let change =
                        decide(exists.then_some(id), &holders, false);
                    if change != IdentityChange::Done {
                        return Ok(change);
                    }
                    sqlx::query("DELETE FROM identities WHERE id = $1")
                        .bind(id)
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                    sqlx::query("DELETE FROM tokens WHERE kind = 'user' AND subject = $1")
                        .bind(id)
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                    tx.commit().await.map_err(db)?;
                    Ok(change)
                }
            }
        };
    };
}
pub(crate) use sql_identities;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_last_holder_losing_a_function_is_refused() {
        let full = ["a", "b"];
        assert!(holds_all(r#"["b","a","c"]"#, &full));
        assert!(!holds_all(r#"["a"]"#, &full));
        assert!(!holds_all("not json", &full));
        let one = vec!["x".to_string()];
        let two = vec!["x".to_string(), "y".to_string()];
        assert_eq!(decide(None, &one, false), IdentityChange::NotFound);
        assert_eq!(decide(Some("x"), &one, false), IdentityChange::LastFull);
        assert_eq!(decide(Some("x"), &one, true), IdentityChange::Done);
        assert_eq!(decide(Some("x"), &two, false), IdentityChange::Done);
        assert_eq!(decide(Some("z"), &one, false), IdentityChange::Done);
    }
}
