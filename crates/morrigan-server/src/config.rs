//! Server configuration, as the library takes it. The binary builds it from flags, environment
//! variables and an optional `morrigan.toml` (see `crates/morrigan`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// PEM files for serving HTTPS/WSS in-process.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Everything a node needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Embedded database, node id and signing key live here.
    pub data_dir: PathBuf,
    /// Base of every `reportUrl` (e.g. `https://morrigan.example.com`); default
    /// `http(s)://<listen>`.
    pub public_url: Option<String>,
    /// `sqlite:...` (default: `<data_dir>/morrigan.db`).
    pub database_url: Option<String>,
    /// Ping period; two missed periods close the connection.
    pub heartbeat_interval: Duration,
    /// Lifetime of connection tokens.
    pub connection_token_ttl: Duration,
    /// Lifetime of device identity tokens.
    pub identity_token_ttl: Duration,
    /// Lifetime of operator (user) tokens.
    pub user_token_ttl: Duration,
    /// After a `client.token.refresh`, older identity tokens stay valid this long at most, so a
    /// device that lost the new token before saving it can still reconnect once.
    pub refresh_grace: Duration,
    /// Largest WebSocket message (and REST body) accepted.
    pub max_message_size: usize,
    /// Messages a connection may send per second (sustained); twice that as a burst.
    pub max_messages_per_second: u32,
    /// Closed connection records are deleted after this long.
    pub retention: Duration,
    /// Serve HTTPS/WSS with these PEM files.
    pub tls: Option<TlsFiles>,
    /// Password for the `admin` identity created on first start (else one is generated).
    pub admin_password: Option<String>,
    /// How long a graceful shutdown waits for sockets to close and records to be written.
    pub shutdown_timeout: Duration,
    /// A node's lease; a node that has not renewed it for this long is declared lost and
    /// its open records are closed by the survivors.
    pub node_lease: Duration,
    /// Which cluster bus carries commands to other nodes.
    pub bus: crate::bus::BusConfig,
    /// Peers whose `X-Forwarded-For`/`Forwarded` headers are believed (load balancers).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The longest one store call may take before it fails (a REST request then answers 503);
    /// the backends give up on its statement first (see [`crate::store::Deadline`]).
    pub store_timeout: Duration,
}

impl Config {
    /// Defaults for a node listening on `listen` with data in `data_dir`.
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        Self {
            listen,
            data_dir,
            public_url: None,
            database_url: None,
            heartbeat_interval: Duration::from_secs(30),
            connection_token_ttl: Duration::from_secs(60),
            identity_token_ttl: Duration::from_secs(30 * 24 * 3600),
            user_token_ttl: Duration::from_secs(30 * 60),
            refresh_grace: Duration::from_secs(3600),
            max_message_size: 1024 * 1024,
            max_messages_per_second: 100,
            retention: Duration::from_secs(7 * 24 * 3600),
            tls: None,
            admin_password: None,
            shutdown_timeout: Duration::from_secs(8),
            node_lease: Duration::from_secs(15),
            bus: crate::bus::BusConfig::Auto,
            trusted_proxies: Vec::new(),
            store_timeout: crate::store::Deadline::DEFAULT.call(),
        }
    }

    /// The base URL devices are told to connect to, without a trailing slash.
    pub fn base_url(&self, bound: SocketAddr) -> String {
        if let Some(url) = &self.public_url {
            return url.trim_end_matches('/').to_string();
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        // An unspecified listen address (0.0.0.0, ::) is not reachable by that name (the
        // original's F13); name the loopback instead and let operators set --public-url.
        let host = if bound.ip().is_unspecified() {
            if bound.is_ipv4() {
                "127.0.0.1".to_string()
            } else {
                "[::1]".to_string()
            }
        } else if bound.is_ipv6() {
            format!("[{}]", bound.ip())
        } else {
            bound.ip().to_string()
        };
        format!("{scheme}://{host}:{}", bound.port())
    }
}
