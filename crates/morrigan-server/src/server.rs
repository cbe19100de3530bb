//! Starting, serving and stopping a node.
//!
//! [`Server::builder`] opens the store, loads the node id and signing key, creates the first
//! admin, closes records a crashed predecessor left open and binds the listener;
//! [`Server::run`] accepts connections until the shutdown future resolves, then closes every
//! socket with 1001, waits for their records to be written and marks the node stopped.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use morrigan_protocol::close;
use morrigan_protocol::time_format;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::normalize_path::NormalizePath;

use crate::auth::{self, functions};
use crate::bus::local::LocalBus;
use crate::bus::nats::NatsBus;
use crate::bus::postgres::PgBus;
use crate::bus::{Bus, BusConfig, CommandHandler};
use crate::config::Config;
use crate::credentials::Credentials;
use crate::delivery::HubCommands;
use crate::hooks::Hooks;
use crate::hub::Hub;
use crate::lease::Lease;
use crate::listener::{Graceful, Serving};
use crate::providers::{Provider, Providers};
use crate::state::{AppState, Inner};
use crate::store::{
    CloseInfo, Deadline, IdentityRow, NodeRow, Store, StoreError, postgres::PgStore,
    sqlite::SqliteStore,
};
use crate::tokens::{KeyError, Tokens};

/// A graceful stop ends within this, whatever peers and the store do (the binary's runtime
/// takes at most half a second more).
pub const SHUTDOWN_BOUND: Duration = Duration::from_millis(9_000);
/// What the stop keeps for itself after the sockets' grace period: forcing the remaining
/// connections, writing records, stopping the background tasks.
const STOP_TAIL: Duration = Duration::from_millis(3_000);
/// How long forced connections (and HTTP connections) get to end.
const FORCE_WAIT: Duration = Duration::from_millis(1_000);

/// How often expired tokens, unused connection tokens and old records are cleaned up.
pub const MAINTENANCE_PERIOD: Duration = Duration::from_secs(60);

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("unsupported database URL '{0}' (use sqlite: or postgres://)")]
    Database(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("could not create the admin identity: {0}")]
    Admin(String),
    #[error("could not start the password hashing threads: {0}")]
    Hashers(std::io::Error),
    #[error(transparent)]
    Bus(#[from] crate::bus::BusError),
    #[error(transparent)]
    FdLimit(#[from] crate::listener::FdLimitError),
}

/// Adds providers and hooks before a node starts.
pub struct ServerBuilder {
    config: Config,
    providers: Providers,
    hooks: Vec<Arc<dyn Hooks>>,
    listener: Option<TcpListener>,
    local_bus: Option<Arc<LocalBus>>,
}

impl ServerBuilder {
    /// Registers a message provider (its `name()` is the `type` prefix it handles).
    pub fn provider(mut self, provider: Arc<dyn Provider>) -> Self {
        self.providers.register(provider);
        self
    }

    /// Registers connection hooks.
    pub fn hook(mut self, hook: Arc<dyn Hooks>) -> Self {
        self.hooks.push(hook);
        self
    }

    /// Serves on an already bound listener instead of binding `config.listen`.
    pub fn listener(mut self, listener: TcpListener) -> Self {
        self.listener = Some(listener);
        self
    }

    /// Joins an in-process cluster: nodes built with the same [`LocalBus`] reach each other's
    /// sockets (tests, embedding). Used when the bus configuration resolves to local.
    pub fn local_bus(mut self, bus: Arc<LocalBus>) -> Self {
        self.local_bus = Some(bus);
        self
    }

    /// Opens everything and binds; the node is ready to [`Server::run`].
    pub async fn build(self) -> Result<Server, StartError> {
        let config = self.config;
        create_data_dir(&config.data_dir)?;
        let node_id = load_node_id(&config.data_dir)?;
        let deadline = Deadline(config.store_timeout);
        let (store, pg_pool) = open_store(&config, deadline).await?;
        let metrics = crate::metrics::Metrics::new(&node_id);
        let admission = crate::listener::Admission::new(&config, metrics.clone())?;
        let store: Arc<dyn Store> = Arc::new(crate::metered_store::MeteredStore {
            inner: store,
            metrics: metrics.clone(),
            deadline,
        });
        let tls = match &config.tls {
            Some(files) => Some(crate::tls::acceptor(&files.cert, &files.key)?),
            None => None,
        };
        let listener = match self.listener {
            Some(l) => l,
            None => TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?,
        };
        let bound = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let tokens = Tokens::load_or_create(&config.data_dir, &node_id, store.clone())
            .await?
            .with_metrics(metrics.clone());
        let passwords = crate::passwords::Passwords::start().map_err(StartError::Hashers)?;
        bootstrap_admin(&config, store.as_ref(), &passwords).await?;

        // Records this node left open are from a crash: their sockets are gone.
        let now = time_format::now();
        let recovered = store
            .close_node_connections(
                &node_id,
                &CloseInfo {
                    at: &now,
                    code: 1006,
                    reason: "node stopped without closing; closed at restart",
                },
            )
            .await?;
        if recovered > 0 {
            tracing::warn!(
                count = recovered,
                "closed connection records left open by a previous run"
            );
        }
        let base_url = config.base_url(bound);
        let registered_at = std::time::Instant::now();
        store
            .register_node(&NodeRow {
                id: node_id.clone(),
                public_url: base_url.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                started: now.clone(),
                lease_expires: time_format::format(
                    time::OffsetDateTime::now_utc() + config.node_lease,
                ),
                state: "running".into(),
            })
            .await?;

        let hub = Arc::new(Hub::new());
        let background = CancellationToken::new();
        let write_bound = config.effective_write_timeout() + Duration::from_secs(1);
        // Only a node that shares its store with others over a networked bus can be declared
        // lost, so only such a node fences itself (see lease.rs).
        let networked = matches!(
            (&config.bus, &pg_pool),
            (BusConfig::Nats(_), _) | (BusConfig::Auto, Some(_))
        );
        let lease = Arc::new(Lease::new(networked));
        lease.renewed(registered_at, config.node_lease);
        let commands: Arc<dyn CommandHandler> = Arc::new(HubCommands {
            hub: hub.clone(),
            lease: lease.clone(),
            write_bound,
        });
        let bus: Arc<dyn Bus> = match (&config.bus, pg_pool) {
            (BusConfig::Nats(url), _) => {
                NatsBus::start(
                    url,
                    store.clone(),
                    &node_id,
                    commands.clone(),
                    write_bound,
                    background.clone(),
                )
                .await?
            }
            (BusConfig::Auto, Some(pool)) => {
                PgBus::start(
                    pool,
                    store.clone(),
                    &node_id,
                    commands.clone(),
                    write_bound,
                    background.clone(),
                )
                .await?
            }
            _ => {
                let local = self.local_bus.unwrap_or_default();
                local.register(&node_id, &commands, write_bound);
                local
            }
        };
        tracing::info!(bus = bus.name(), "cluster bus ready");
        let bus: Arc<dyn Bus> = Arc::new(crate::bus::metered::MeteredBus {
            inner: bus,
            metrics: metrics.clone(),
        });
        // The built-in observer (metrics, event stream) runs before the embedder's hooks.
        let mut hooks: Vec<Arc<dyn Hooks>> = vec![crate::events::Observer::start(
            &node_id,
            metrics.clone(),
            bus.clone(),
        )];
        let embedder_hooks = !self.hooks.is_empty();
        hooks.extend(self.hooks);
        let (heartbeats, heartbeat_rx) = crate::heartbeat::queue();
        let records = crate::records::Records::start(store.clone());
        let credentials = Arc::new(Credentials::new(tokens, store.clone(), &config));
        let hooks: Arc<[Arc<dyn Hooks>]> = hooks.into();
        let services = Arc::new(crate::providers::Services {
            store: store.clone(),
            credentials: credentials.clone(),
            hooks: hooks.clone(),
        });
        let state = AppState(Arc::new(Inner {
            config,
            node_id: Arc::from(node_id.as_str()),
            base_url,
            store,
            credentials,
            hub,
            lease,
            bus,
            providers: self.providers,
            hooks,
            services,
            embedder_hooks,
            heartbeats,
            records,
            metrics,
            admission,
            passwords,
            login_throttle: Default::default(),
            owners: Default::default(),
            peers: Default::default(),
            sessions: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        }));
        let (router, _) = crate::routes::build(state.clone());
        Ok(Server {
            state,
            commands,
            router,
            listener,
            tls,
            bound,
            heartbeat_rx,
            background,
        })
    }
}

/// A started node, bound and ready to serve.
pub struct Server {
    state: AppState,
    /// What the bus hands commands for this node to; held for the node's life (the in-process
    /// bus holds it weakly, so a node that is gone is unreachable).
    commands: Arc<dyn CommandHandler>,
    router: Router,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    bound: SocketAddr,
    heartbeat_rx: crate::heartbeat::QueueReceiver,
    /// Stops the flusher, maintenance and the bus listener, after the sockets are closed.
    background: CancellationToken,
}

impl Server {
    /// A builder with the built-in providers.
    pub fn builder(config: Config) -> ServerBuilder {
        ServerBuilder {
            config,
            providers: Providers::builtin(),
            hooks: Vec::new(),
            listener: None,
            local_bus: None,
        }
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.bound
    }

    /// The node's shared state.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then stops gracefully.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Server {
            state,
            commands,
            router,
            listener,
            tls,
            bound,
            heartbeat_rx,
            background,
        } = self;
        let flusher = tokio::spawn(crate::heartbeat::run_flusher(
            state.records.clone(),
            heartbeat_rx,
            background.clone(),
        ));
        let maintenance = tokio::spawn(maintain(state.clone(), background.clone()));
        tokio::spawn(crate::metrics::run_upkeep(
            state.metrics.clone(),
            background.clone(),
        ));

        let service = NormalizePath::trim_trailing_slash(router);
        let graceful = Graceful::new();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let serving = Serving::new(&state.config, state.metrics.clone(), service, tls);
        tracing::info!(address = %bound, %scheme, node = %state.node_id, report_url = %state.report_url(),
            max_http_connections = state.admission.max_http_connections(),
            max_sockets = state.admission.max_sockets(), "serving");

        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors, mostly: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = &mut shutdown => break,
            };
            // Past a cap the socket is dropped (closed) here, before anything is read from it.
            if let Some(permit) = state.admission.admit() {
                serving.spawn(stream, peer, permit, graceful.watcher());
            }
        }
        drop(listener);

        tracing::info!(connections = state.hub.len(), "shutting down");
        // Every step below is bounded, so the node stops within SHUTDOWN_BOUND whatever its
        // peers (or its store) do: sockets get `shutdown_timeout` to close with 1001, the rest
        // are dropped, and every record is written (or left to the next start's recovery).
        let hard_stop = tokio::time::Instant::now() + SHUTDOWN_BOUND;
        state.shutdown.cancel();
        state
            .hub
            .close_all(close::GOING_AWAY, "server shutting down");
        state.sessions.close();
        let grace = state
            .config
            .shutdown_timeout
            .min(SHUTDOWN_BOUND - STOP_TAIL);
        let closed = tokio::time::timeout(grace, state.sessions.wait())
            .await
            .is_ok();
        if !closed {
            tracing::warn!(
                remaining = state.hub.len(),
                "connections did not close in time; dropping them"
            );
            state.hub.kill_all();
            let _ = tokio::time::timeout(FORCE_WAIT, state.sessions.wait()).await;
        }
        let _ = tokio::time::timeout(FORCE_WAIT, graceful.shutdown()).await;
        if !state.hub.is_empty() || !closed {
            let now = time_format::now();
            let _ = tokio::time::timeout_at(
                hard_stop,
                state.store.close_node_connections(
                    &state.node_id,
                    &CloseInfo {
                        at: &now,
                        code: close::GOING_AWAY,
                        reason: "server shutting down",
                    },
                ),
            )
            .await;
        }
        background.cancel();
        let _ = tokio::time::timeout_at(hard_stop, flusher).await;
        let _ = tokio::time::timeout_at(hard_stop, maintenance).await;
        // Records the store did not take yet: retried while the stop's bound allows.
        state.records.drain(hard_stop).await;
        match tokio::time::timeout_at(
            hard_stop,
            state.store.stop_node(&state.node_id, &time_format::now()),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not mark the node stopped"),
            Err(_) => tracing::warn!("could not mark the node stopped in time"),
        }
        drop(commands);
        tracing::info!("stopped");
    }
}

/// Periodic upkeep: the node lease and reaping lost nodes (every third of the lease), unused
/// connection tokens, expired tokens and retention (every [`MAINTENANCE_PERIOD`]).
async fn maintain(state: AppState, stop: CancellationToken) {
    let lease_period = state.config.node_lease / 3;
    let mut lease = tokio::time::interval(lease_period.max(Duration::from_millis(100)));
    let mut upkeep = tokio::time::interval(MAINTENANCE_PERIOD);
    lease.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = lease.tick() => {
                if let Err(e) = lease_once(&state).await {
                    tracing::warn!(error = %e, "could not renew the node lease");
                }
            }
            _ = upkeep.tick() => {
                if let Err(e) = upkeep_once(&state).await {
                    tracing::warn!(error = %e, "maintenance failed");
                }
            }
        }
    }
}

/// Renews this node's lease and closes the records of nodes whose lease lapsed.
pub async fn lease_once(state: &AppState) -> Result<(), StoreError> {
    let now = time::OffsetDateTime::now_utc();
    let until = time_format::format(now + state.config.node_lease);
    let sent = std::time::Instant::now();
    if state.store.renew_node(&state.node_id, &until).await? {
        state.lease.renewed(sent, state.config.node_lease);
    } else {
        // The survivors declared this node lost (it stalled past its lease) and closed its
        // records with 1006: its sockets must not live on unrecorded, and must end as their
        // records say, without a close frame. Devices reconnect.
        tracing::error!("this node's lease lapsed and it was declared lost; dropping its sockets");
        state.lease.lost();
        state.hub.abandon_all(
            close::ABNORMAL,
            &format!("node {} lost its lease", state.node_id),
        );
        let sent = std::time::Instant::now();
        state
            .store
            .register_node(&NodeRow {
                id: state.node_id.to_string(),
                public_url: state.base_url.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                started: time_format::format(now),
                lease_expires: until,
                state: "running".into(),
            })
            .await?;
        state.lease.renewed(sent, state.config.node_lease);
    }
    for lost in state
        .store
        .reap_nodes(&time_format::format(now), &state.node_id)
        .await?
    {
        let reason = format!("node {} lost its lease", lost.id);
        let closed = state
            .store
            .close_node_connections(
                &lost.id,
                &CloseInfo {
                    at: &lost.lease_expires,
                    code: close::ABNORMAL,
                    reason: &reason,
                },
            )
            .await?;
        tracing::warn!(node = %lost.id, closed, "a node lost its lease; closed its connection records");
    }
    state.peers.refresh(&state.store.nodes().await?);
    Ok(())
}

/// One round of cleanup (also called by tests).
pub async fn upkeep_once(state: &AppState) -> Result<(), StoreError> {
    let now = time::OffsetDateTime::now_utc();
    let now_s = time_format::format(now);
    let expired = state.store.expire_pending_connections(&now_s).await?;
    let cutoff = time_format::format(now - state.config.retention);
    let purged = state.store.purge_closed_connections(&cutoff).await?;
    let tokens = state.store.purge_expired_tokens(&now_s).await?;
    state
        .store
        .purge_payloads(&time_format::format(now - Duration::from_secs(300)))
        .await?;
    if expired + purged + tokens > 0 {
        tracing::debug!(expired, purged, tokens, "maintenance");
    }
    Ok(())
}

fn create_data_dir(dir: &Path) -> Result<(), StartError> {
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
fn load_node_id(dir: &Path) -> Result<String, StartError> {
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
            crate::fsutil::write_private(&path, id.as_bytes()).map_err(err)?;
            Ok(id)
        }
        Err(e) => Err(err(e)),
    }
}

/// Opens the configured store; with PostgreSQL also returns its pool for the LISTEN/NOTIFY bus.
async fn open_store(
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

/// On a first start (no identities) creates `admin` with every function. The password is
/// `MORRIGAN_ADMIN_PASSWORD` if set, else generated and written to
/// `<data_dir>/initial-admin-password` (mode 0600). No password is hard-coded (S6).
async fn bootstrap_admin(
    config: &Config,
    store: &dyn Store,
    passwords: &crate::passwords::Passwords,
) -> Result<(), StartError> {
    if store.count_identities().await? > 0 {
        return Ok(());
    }
    let (password, generated) = match &config.admin_password {
        Some(p) if auth::valid_password(p) => (p.clone(), false),
        Some(_) => {
            return Err(StartError::Admin(
                "the admin password must be 8 to 1024 characters".into(),
            ));
        }
        None => {
            use base64::Engine;
            let mut bytes = [0u8; 18];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
            (
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes),
                true,
            )
        }
    };
    let hash = passwords
        .hash(&password)
        .await
        .map_err(|e| StartError::Admin(e.to_string()))?;
    let now = time_format::now();
    let created = store
        .insert_identity(&IdentityRow {
            id: uuid::Uuid::new_v4().to_string(),
            name: "admin".into(),
            functions: functions::ALL.iter().map(|s| s.to_string()).collect(),
            password_hash: hash,
            created: now.clone(),
            updated: now,
        })
        .await;
    match created {
        // Another node of the cluster starting at the same moment created it first.
        Err(StoreError::Conflict(_)) => return Ok(()),
        other => other?,
    }
    if generated {
        let path = config.data_dir.join("initial-admin-password");
        crate::fsutil::write_private(&path, format!("{password}\n").as_bytes()).map_err(
            |source| StartError::DataDir {
                path: path.display().to_string(),
                source,
            },
        )?;
        eprintln!(
            "Created identity 'admin'. Its generated password is in {} (readable by this user only).",
            path.display()
        );
    } else {
        eprintln!("Created identity 'admin' with the password from MORRIGAN_ADMIN_PASSWORD.");
    }
    Ok(())
}
