//! Opening what a node runs on: its data directory and id, its store and its bus, each chosen
//! by configuration.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::StartError;
use crate::bus::local::LocalBus;
use crate::bus::nats::NatsBus;
use crate::bus::postgres::PgBus;
use crate::bus::{Bus, BusConfig, CommandHandler};
use crate::config::Config;
use crate::store::{Deadline, Store, postgres::PgStore, sqlite::SqliteStore};

pub(super) fn create_data_dir(dir: &Path) -> Result<(), StartError> {
    let err = |source| StartError::DataDir {
        path: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

/// The node id lives in `<data_dir>/node-id`, created on first start.
pub(super) fn load_node_id(dir: &Path) -> Result<String, StartError> {
    let path = dir.join("node-id");
    let err = |source| StartError::DataDir {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(s) if uuid::Uuid::parse_str(s.trim()).is_ok() => Ok(s.trim().to_string()),
        Ok(_) => Err(err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "node-id does not hold a UUID",
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = uuid::Uuid::new_v4().to_string();
            morrigan_files::write_private(&path, id.as_bytes()).map_err(err)?;
            Ok(id)
        }
        Err(e) => Err(err(e)),
    }
}

/// Opens the configured store; with PostgreSQL also returns its pool for the LISTEN/NOTIFY bus.
pub(super) async fn open_store(
    config: &Config,
    deadline: Deadline,
) -> Result<(Arc<dyn Store>, Option<sqlx::PgPool>), StartError> {
    match config.database_url.as_deref() {
        None => Ok((
            Arc::new(
                SqliteStore::open_with_deadline(&config.data_dir.join("morrigan.db"), deadline)
                    .await?,
            ),
            None,
        )),
        Some(url) if url.starts_with("sqlite:") => Ok((
            Arc::new(SqliteStore::connect_with_deadline(url, deadline).await?),
            None,
        )),
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let store = PgStore::connect_with_deadline(url, deadline).await?;
            let pool = store.pool().clone();
            Ok((Arc::new(store), Some(pool)))
        }
        Some(url) => Err(StartError::Database(
            url.split('@').next_back().unwrap_or("").to_string(),
        )),
    }
}

/// Starts the configured bus: NATS when a URL is given, PostgreSQL NOTIFY with a PostgreSQL
/// store, else in-process (joining `local` if the embedder gave one). Commands for this node
/// go to `handler`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn open_bus(
    config: &Config,
    pg_pool: Option<sqlx::PgPool>,
    local: Option<Arc<LocalBus>>,
    store: Arc<dyn Store>,
    node_id: &str,
    handler: Arc<dyn CommandHandler>,
    write_bound: Duration,
    stop: CancellationToken,
) -> Result<Arc<dyn Bus>, StartError> {
    Ok(match (&config.bus, pg_pool) {
        (BusConfig::Nats(url), _) => {
            NatsBus::start(url, store, node_id, handler, write_bound, stop).await?
        }
        (BusConfig::Auto, Some(pool)) => {
            PgBus::start(pool, store, node_id, handler, write_bound, stop).await?
        }
        _ => {
            let local = local.unwrap_or_default();
            local.register(node_id, &handler, write_bound);
            local
        }
    })
}
