//! The identity changes that must leave at least one identity holding every function
//! ([`Store::update_identity`](super::Store::update_identity),
//! [`Store::delete_identity`](super::Store::delete_identity)).
//!
//! Each runs in one transaction that first takes the backend's lock on identity changes
//! (SQLite: `BEGIN IMMEDIATE`, which makes the transaction the database's one writer;
//! PostgreSQL: a transaction-scoped advisory lock), then reads which identities hold every
//! function, decides, and writes. Two such changes never interleave, so two operators
//! deleting each other at once cannot together remove the last full identity: the second
//! sees the first's result and is refused.

use super::IdentityChange;

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

/// Implements the guarded changes for `$store` (database `$db`), which provides
/// `async fn begin_identities(&self) -> Result<sqlx::Transaction<'static, $db>>` taking the lock.
macro_rules! guarded_identities {
    ($store:ident, $db:ty) => {
        impl $store {
            /// The ids of the identities holding every function in `full`, and whether `id`
            /// exists, read inside the locked transaction.
            async fn full_holders(
                tx: &mut <$db as sqlx::Database>::Connection,
                id: &str,
                full: &[&str],
            ) -> $crate::store::Result<(Vec<String>, bool)> {
                use sqlx::Row as _;
                let rows = sqlx::query("SELECT id, functions FROM identities")
                    .fetch_all(&mut *tx)
                    .await
                    .map_err($crate::store::sql::db)?;
                let mut holders = Vec::new();
                let mut exists = false;
                for row in &rows {
                    let get = |e: sqlx::Error| $crate::store::StoreError::Corrupt(e.to_string());
                    let row_id: String = row.try_get("id").map_err(get)?;
                    let functions: String = row.try_get("functions").map_err(get)?;
                    exists |= row_id == id;
                    if $crate::store::identities::holds_all(&functions, full) {
                        holders.push(row_id);
                    }
                }
                Ok((holders, exists))
            }

            pub(crate) async fn guarded_update(
                &self,
                row: &$crate::store::IdentityRow,
                full: &[&str],
            ) -> $crate::store::Result<$crate::store::IdentityChange> {
                let functions = serde_json::to_string(&row.functions)
                    .map_err(|e| $crate::store::StoreError::Corrupt(e.to_string()))?;
                let mut tx = self.begin_identities().await?;
                let (holders, exists) = Self::full_holders(&mut *tx, &row.id, full).await?;
                let keeps = $crate::store::identities::holds_all(&functions, full);
                let change = $crate::store::identities::decide(
                    exists.then_some(row.id.as_str()),
                    &holders,
                    keeps,
                );
                if change != $crate::store::IdentityChange::Done {
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
                .map_err($crate::store::sql::db)?;
                tx.commit().await.map_err($crate::store::sql::db)?;
                Ok(change)
            }

            pub(crate) async fn guarded_delete(
                &self,
                id: &str,
                full: &[&str],
            ) -> $crate::store::Result<$crate::store::IdentityChange> {
                let mut tx = self.begin_identities().await?;
                let (holders, exists) = Self::full_holders(&mut *tx, id, full).await?;
                let change =
                    $crate::store::identities::decide(exists.then_some(id), &holders, false);
                if change != $crate::store::IdentityChange::Done {
                    return Ok(change);
                }
                sqlx::query("DELETE FROM identities WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err($crate::store::sql::db)?;
                sqlx::query("DELETE FROM tokens WHERE kind = 'user' AND subject = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err($crate::store::sql::db)?;
                tx.commit().await.map_err($crate::store::sql::db)?;
                Ok(change)
            }
        }
    };
}
pub(crate) use guarded_identities;

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
