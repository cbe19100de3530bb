//! The cluster's nodes and their leases.

use async_trait::async_trait;

use super::Result;

/// A node of the cluster: the wire record itself (the store keeps nothing more).
pub use morrigan_protocol::records::NodeRecord as NodeRow;

#[async_trait]
pub trait NodeStore: Send + Sync + 'static {
    /// Registers or re-registers a node as running.
    async fn register_node(&self, node: &NodeRow) -> Result<()>;
    /// Extends a running node's lease; false if the node was declared lost meanwhile.
    async fn renew_node(&self, id: &str, lease_expires: &str) -> Result<bool>;
    /// Atomically marks every running node (other than `except`) whose lease lapsed before
    /// `now` as `lost` and returns them: exactly one survivor gets each lost node.
    async fn reap_nodes(&self, now: &str, except: &str) -> Result<Vec<NodeRow>>;
    async fn stop_node(&self, id: &str, at: &str) -> Result<()>;
    async fn nodes(&self) -> Result<Vec<NodeRow>>;
}

/// Implements [`NodeStore`] for `$store` (a struct with a `pool: sqlx::Pool<$db>` field).
macro_rules! sql_nodes {
    ($store:ident, $db:ty) => {
        const _: () = {
            use $crate::store::sql::db;
            use $crate::store::{NodeRow, NodeStore, Result};

            #[async_trait::async_trait]
            impl NodeStore for $store {
                async fn register_node(&self, node: &NodeRow) -> Result<()> {
                    sqlx::query(
                        "INSERT INTO nodes (id, public_url, version, started, lease_expires, state) \
                         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO UPDATE SET \
                         public_url = excluded.public_url, version = excluded.version, \
                         started = excluded.started, lease_expires = excluded.lease_expires, \
                         state = excluded.state",
                    )
                    .bind(&node.id)
                    .bind(&node.public_url)
                    .bind(&node.version)
                    .bind(&node.started)
                    .bind(&node.lease_expires)
                    .bind(&node.state)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                    Ok(())
                }

                async fn renew_node(&self, id: &str, lease_expires: &str) -> Result<bool> {
                    let r = sqlx::query(
                        "UPDATE nodes SET lease_expires = $2 WHERE id = $1 AND state = 'running'",
                    )
                    .bind(id)
                    .bind(lease_expires)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                    Ok(r.rows_affected() == 1)
                }

                async fn reap_nodes(
                    &self,
                    now: &str,
                    except: &str,
                ) -> Result<Vec<NodeRow>> {
                    let rows = sqlx::query_as::<$db, NodeRow>(
                        "UPDATE nodes SET state = 'lost' WHERE state = 'running' AND lease_expires < $1 \
                         AND id <> $2 RETURNING *",
                    )
                    .bind(now)
                    .bind(except)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)?;
                    Ok(rows)
                }

                async fn stop_node(&self, id: &str, at: &str) -> Result<()> {
                    sqlx::query("UPDATE nodes SET state = 'stopped', lease_expires = $2 WHERE id = $1")
                        .bind(id)
                        .bind(at)
                        .execute(&self.pool)
                        .await
                        .map_err(db)?;
                    Ok(())
                }

                async fn nodes(&self) -> Result<Vec<NodeRow>> {
                    let rows = sqlx::query_as::<$db, NodeRow>(
                        "SELECT * FROM nodes ORDER BY started",
                    )
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)?;
                    Ok(rows)
                }
            }
        };
    };
}
pub(crate) use sql_nodes;
