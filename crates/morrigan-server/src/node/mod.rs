//! A node: starting it ([`Server::builder`]), serving ([`Server::run`]) and stopping it.
//!
//! * [`open`]: the data directory, the node id, the store and the bus, by configuration;
//! * [`lifecycle`]: the first admin, crash recovery, the lease, reaping lost nodes, upkeep;
//! * [`stop`]: the bounded graceful stop.
//!
//! The accept loop and the caps on sockets are in [`crate::listener`].

mod handler;
pub(crate) mod lifecycle;
mod open;
mod stop;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::normalize_path::NormalizePath;

use crate::bus::local::LocalBus;
use crate::bus::{Bus, BusConfig, CommandHandler};
use crate::config::Config;
use crate::credentials::Credentials;
use crate::hooks::Hooks;
use crate::hub::Hub;
use crate::lease::Lease;
use crate::listener::{Graceful, Serving};
use crate::providers::{Provider, Providers};
use crate::state::{AppState, Inner};
use crate::store::{Deadline, Store, StoreError};
use crate::tokens::{KeyError, Tokens};

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
    #[error("uplink types: {0}")]
    Uplink(#[from] crate::messaging::PatternError),
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
        open::create_data_dir(&config.data_dir)?;
        let node_id = open::load_node_id(&config.data_dir)?;
        let deadline = Deadline(config.store_timeout);
        let (store, pg_pool) = open::open_store(&config, deadline).await?;
        let metrics = crate::metrics::Metrics::new(&node_id);
        let admission = crate::listener::Admission::new(&config, metrics.clone())?;
        let store: Arc<dyn Store> = Arc::new(crate::store::metered::MeteredStore {
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
        lifecycle::bootstrap_admin(&config, store.as_ref(), &passwords).await?;

        lifecycle::recover(store.as_ref(), &node_id).await?;
        let base_url = config.base_url(bound);
        let registered_at = std::time::Instant::now();
        store
            .register_node(&lifecycle::node_row(&node_id, &base_url, config.node_lease))
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
        let events = Arc::new(crate::events::EventFanout::default());
        let signals = Arc::new(crate::messaging::Signals::new(&node_id));
        let commands: Arc<dyn CommandHandler> = Arc::new(handler::BusHandler {
            hub: hub.clone(),
            lease: lease.clone(),
            write_bound,
            events: events.clone(),
            signals: signals.clone(),
        });
        let bus = open::open_bus(
            &config,
            pg_pool,
            self.local_bus,
            store.clone(),
            &node_id,
            commands.clone(),
            write_bound,
            background.clone(),
        )
        .await?;
        tracing::info!(bus = bus.name(), "cluster bus ready");
        let bus: Arc<dyn Bus> = Arc::new(crate::bus::metered::MeteredBus {
            inner: bus,
            metrics: metrics.clone(),
        });
        // The built-in observer (metrics, event stream) runs before the embedder's hooks.
        let observer =
            crate::events::Observer::start(&node_id, metrics.clone(), bus.clone(), events.clone());
        let tracker = Arc::new(crate::messaging::Tracker::new(
            store.clone(),
            signals,
            observer.clone(),
            metrics.clone(),
            &node_id,
            crate::messaging::Limits {
                retention: config.message_retention,
                outbox_messages: i64::try_from(config.outbox_max_messages).unwrap_or(i64::MAX),
                outbox_bytes: i64::try_from(config.outbox_max_bytes).unwrap_or(i64::MAX),
                uplink_keep: config.uplink_keep,
                uplink: crate::messaging::UplinkTypes::parse(
                    crate::messaging::DEFAULT_PATTERNS
                        .iter()
                        .copied()
                        .chain(config.uplink_types.iter().map(String::as_str)),
                )?,
            },
        ));
        tracker.start().await;
        let mut hooks: Vec<Arc<dyn Hooks>> = vec![observer];
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
            tracker: tracker.clone(),
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
            events,
            providers: self.providers,
            hooks,
            services,
            tracker,
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
        let maintenance = tokio::spawn(lifecycle::maintain(state.clone(), background.clone()));
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

        crate::listener::accept_until(listener, &state.admission, &serving, &graceful, shutdown)
            .await;
        stop::stop(
            &state,
            graceful,
            stop::Background {
                token: background,
                flusher,
                maintenance,
            },
        )
        .await;
        drop(commands);
        tracing::info!("stopped");
    }
}
