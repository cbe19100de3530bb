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
    /// How long a socket may take to drain what the server wrote to it (a frame, a ping, a
    /// close) before it is dropped with 4008. `None`: 10 s, or the heartbeat interval if that
    /// is shorter.
    pub write_timeout: Option<Duration>,
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
    /// A connection must deliver a complete request head within this long of being accepted
    /// (the TLS handshake has the same bound) and of its previous response, else it is closed:
    /// this bounds silent sockets, idle keep-alive connections and slow headers alike.
    pub http_idle_timeout: Duration,
    /// A request body must arrive whole within this long of its head, else 408.
    pub http_body_timeout: Duration,
    /// Connections not (yet) upgraded to a WebSocket: past this many, a new connection is
    /// closed as soon as it is accepted.
    pub max_http_connections: usize,
    /// File descriptors kept for the store, files and outgoing connections: the sockets a node
    /// holds (HTTP and WebSocket) are capped at the process's file limit minus this.
    pub fd_reserve: usize,
    /// The longest one store call may take before it fails (a REST request then answers 503);
    /// the backends give up on its statement first (see [`crate::store::Deadline`]).
    pub store_timeout: Duration,
    /// Message records (tracked, queued, uplink) are deleted this long after they were
    /// created; a send's `ttl` may not be longer.
    pub message_retention: Duration,
    /// Device message types accepted as uplink (published for operators): `type`,
    /// `provider.*` or `*` (see [`crate::messaging::UplinkTypes`]), besides the built-in
    /// agent's `agent.*`, which always are.
    pub uplink_types: Vec<String>,
    /// Most messages queued in one client's outbox.
    pub outbox_max_messages: usize,
    /// Most body bytes queued in one client's outbox.
    pub outbox_max_bytes: usize,
    /// Uplink messages kept per client (`GET /api/core/client/:id/messages?direction=in`).
    pub uplink_keep: u32,
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
            write_timeout: None,
            connection_token_ttl: Duration::from_secs(60),
            identity_token_ttl: Duration::from_secs(30 * 24 * 3600),
            user_token_ttl: Duration::from_secs(30 * 60),
            refresh_grace: Duration::from_secs(3600),
            max_message_size: 1024 * 1024,
            max_messages_per_second: 100,
            retention: Duration::from_secs(7 * 24 * 3600),
            tls: None,
            admin_password: None,
            shutdown_timeout: Duration::from_secs(6),
            node_lease: Duration::from_secs(15),
            bus: crate::bus::BusConfig::Auto,
            trusted_proxies: Vec::new(),
            http_idle_timeout: Duration::from_secs(10),
            http_body_timeout: Duration::from_secs(30),
            max_http_connections: 1024,
            fd_reserve: 256,
            store_timeout: crate::store::Deadline::DEFAULT.call(),
            message_retention: Duration::from_secs(7 * 24 * 3600),
            uplink_types: Vec::new(),
            outbox_max_messages: 1000,
            outbox_max_bytes: 1024 * 1024,
            uplink_keep: 100,
        }
    }

    /// The write timeout in force (see [`Config::write_timeout`]).
    pub fn effective_write_timeout(&self) -> Duration {
        self.write_timeout
            .unwrap_or_else(|| Duration::from_secs(10).min(self.heartbeat_interval))
            .max(Duration::from_millis(100))
    }

    /// The base URL devices are told to connect to, without a trailing slash.
    pub fn base_url(&self, bound: SocketAddr) -> String {
        if let Some(url) = &self.public_url {
            return url.trim_end_matches('/').to_string();
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        // An unspecified listen address (0.0.0.0, ::) is not reachable by that name, so devices
        // are never told to connect to it: name the loopback instead and let operators set
        // --public-url.
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
