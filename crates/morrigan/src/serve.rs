//! `morrigan serve`: flags, environment and `morrigan.toml`, in that order of precedence.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use morrigan_server::{Config, Server, TlsFiles};
use serde::Deserialize;

/// Every option has an environment twin and a key of the same name (snake_case) in the
/// optional config file.
#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// Config file (TOML); keys as the flags with '_' for '-'. Default: ./morrigan.toml if present.
    #[arg(long, env = "MORRIGAN_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "MORRIGAN_LISTEN")]
    listen: Option<SocketAddr>,
    /// Data directory: embedded database, node id, signing key [default: ./morrigan-data].
    #[arg(long, env = "MORRIGAN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Base URL of every reportUrl, e.g. https://morrigan.example.com [default: http(s)://<listen>].
    #[arg(long, env = "MORRIGAN_PUBLIC_URL")]
    public_url: Option<String>,
    /// Database URL [default: sqlite file in the data directory].
    #[arg(long, env = "MORRIGAN_DATABASE_URL")]
    database_url: Option<String>,
    /// Seconds between pings; two missed pings close a connection [default: 30].
    #[arg(long, env = "MORRIGAN_HEARTBEAT_INTERVAL")]
    heartbeat_interval: Option<u64>,
    /// Seconds a socket may take to drain what the server wrote (a frame, a ping, a close)
    /// before it is dropped with 4008 [default: 10, or the heartbeat interval if shorter].
    #[arg(long, env = "MORRIGAN_WRITE_TIMEOUT")]
    write_timeout: Option<u64>,
    /// Lifetime of connection tokens, in seconds [default: 60].
    #[arg(long, env = "MORRIGAN_CONNECTION_TOKEN_TTL")]
    connection_token_ttl: Option<u64>,
    /// Largest WebSocket message or REST body, in bytes [default: 1048576].
    #[arg(long, env = "MORRIGAN_MAX_MESSAGE_SIZE")]
    max_message_size: Option<usize>,
    /// Messages per second one connection may send [default: 100].
    #[arg(long, env = "MORRIGAN_MAX_MESSAGES_PER_SECOND")]
    max_messages_per_second: Option<u32>,
    /// Days closed connection records are kept [default: 7].
    #[arg(long, env = "MORRIGAN_RETENTION_DAYS")]
    retention_days: Option<u64>,
    /// PEM certificate chain: serve HTTPS/WSS (needs --tls-key).
    #[arg(long, env = "MORRIGAN_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "MORRIGAN_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Cluster bus: NATS at this URL (default: PostgreSQL LISTEN/NOTIFY with a PostgreSQL
    /// store, in-process otherwise).
    #[arg(long, env = "MORRIGAN_NATS_URL")]
    nats_url: Option<String>,
    /// Seconds a node's lease lasts; a node silent this long is declared lost [default: 15].
    #[arg(long, env = "MORRIGAN_NODE_LEASE")]
    node_lease: Option<u64>,
    /// CIDR of a load balancer whose X-Forwarded-For/Forwarded headers are believed
    /// (repeatable; comma-separated in the environment).
    #[arg(long, env = "MORRIGAN_TRUSTED_PROXY", value_delimiter = ',')]
    trusted_proxy: Vec<String>,
    /// Seconds a connection may take to send a complete request head, from its accept (or TLS
    /// handshake, bounded the same) and from each response; then it is closed [default: 10].
    #[arg(long, env = "MORRIGAN_HTTP_IDLE_TIMEOUT")]
    http_idle_timeout: Option<u64>,
    /// Seconds a request body may take to arrive whole, else 408 [default: 30].
    #[arg(long, env = "MORRIGAN_HTTP_BODY_TIMEOUT")]
    http_body_timeout: Option<u64>,
    /// Connections not (yet) upgraded to a WebSocket; past it new ones are closed at once
    /// [default: 1024].
    #[arg(long, env = "MORRIGAN_MAX_HTTP_CONNECTIONS")]
    max_http_connections: Option<usize>,
    /// File descriptors kept for the store, files and outgoing connections; sockets are capped
    /// at the file limit minus this [default: 256].
    #[arg(long, env = "MORRIGAN_FD_RESERVE")]
    fd_reserve: Option<usize>,
    /// Seconds one store call may take before it fails (503) [default: 5].
    #[arg(long, env = "MORRIGAN_STORE_TIMEOUT")]
    store_timeout: Option<u64>,
}

/// The same keys in `morrigan.toml`.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    public_url: Option<String>,
    database_url: Option<String>,
    heartbeat_interval: Option<u64>,
    write_timeout: Option<u64>,
    connection_token_ttl: Option<u64>,
    max_message_size: Option<usize>,
    max_messages_per_second: Option<u32>,
    retention_days: Option<u64>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    nats_url: Option<String>,
    node_lease: Option<u64>,
    trusted_proxy: Option<Vec<String>>,
    http_idle_timeout: Option<u64>,
    http_body_timeout: Option<u64>,
    max_http_connections: Option<usize>,
    fd_reserve: Option<usize>,
    store_timeout: Option<u64>,
}

fn load_file(args: &ServeArgs) -> anyhow::Result<FileConfig> {
    let (path, explicit) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from("morrigan.toml"), false),
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).with_context(|| format!("reading {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            Ok(FileConfig::default())
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Resolves flags > environment > file > defaults into a [`Config`].
fn resolve(args: ServeArgs) -> anyhow::Result<Config> {
    let file = load_file(&args)?;
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
    let data_dir = args
        .data_dir
        .or(file.data_dir)
        .unwrap_or_else(|| PathBuf::from("morrigan-data"));
    let mut c = Config::new(listen, data_dir);
    c.public_url = args.public_url.or(file.public_url);
    c.database_url = args.database_url.or(file.database_url);
    if let Some(s) = args.heartbeat_interval.or(file.heartbeat_interval) {
        anyhow::ensure!(s >= 1, "--heartbeat-interval must be at least 1 second");
        c.heartbeat_interval = Duration::from_secs(s);
    }
    if let Some(s) = args.write_timeout.or(file.write_timeout) {
        anyhow::ensure!(
            (1..=3600).contains(&s),
            "--write-timeout must be 1 to 3600 seconds"
        );
        c.write_timeout = Some(Duration::from_secs(s));
    }
    if let Some(s) = args.connection_token_ttl.or(file.connection_token_ttl) {
        anyhow::ensure!(
            (5..=3600).contains(&s),
            "--connection-token-ttl must be 5 to 3600 seconds"
        );
        c.connection_token_ttl = Duration::from_secs(s);
    }
    if let Some(n) = args.max_message_size.or(file.max_message_size) {
        anyhow::ensure!(
            (1024..=64 * 1024 * 1024).contains(&n),
            "--max-message-size must be 1 KiB to 64 MiB"
        );
        c.max_message_size = n;
    }
    if let Some(n) = args
        .max_messages_per_second
        .or(file.max_messages_per_second)
    {
        c.max_messages_per_second = n.max(1);
    }
    if let Some(d) = args.retention_days.or(file.retention_days) {
        c.retention = Duration::from_secs(d * 24 * 3600);
    }
    let cert = args.tls_cert.or(file.tls_cert);
    let key = args.tls_key.or(file.tls_key);
    c.tls = match (cert, key) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
        (None, None) => None,
        _ => anyhow::bail!("--tls-cert and --tls-key go together"),
    };
    if let Some(url) = args.nats_url.or(file.nats_url) {
        c.bus = morrigan_server::bus::BusConfig::Nats(url);
    }
    if let Some(s) = args.node_lease.or(file.node_lease) {
        anyhow::ensure!(s >= 1, "--node-lease must be at least 1 second");
        c.node_lease = Duration::from_secs(s);
    }
    if let Some(s) = args.http_idle_timeout.or(file.http_idle_timeout) {
        anyhow::ensure!(s >= 1, "--http-idle-timeout must be at least 1 second");
        c.http_idle_timeout = Duration::from_secs(s);
    }
    if let Some(s) = args.http_body_timeout.or(file.http_body_timeout) {
        anyhow::ensure!(s >= 1, "--http-body-timeout must be at least 1 second");
        c.http_body_timeout = Duration::from_secs(s);
    }
    if let Some(n) = args.max_http_connections.or(file.max_http_connections) {
        anyhow::ensure!(n >= 1, "--max-http-connections must be at least 1");
        c.max_http_connections = n;
    }
    if let Some(n) = args.fd_reserve.or(file.fd_reserve) {
        anyhow::ensure!(n >= 32, "--fd-reserve must be at least 32");
        c.fd_reserve = n;
    }
    if let Some(s) = args.store_timeout.or(file.store_timeout) {
        anyhow::ensure!(
            (1..=60).contains(&s),
            "--store-timeout must be 1 to 60 seconds"
        );
        c.store_timeout = Duration::from_secs(s);
    }
    let proxies = if args.trusted_proxy.is_empty() {
        file.trusted_proxy.unwrap_or_default()
    } else {
        args.trusted_proxy
    };
    for p in proxies {
        let net = p
            .parse::<ipnet::IpNet>()
            .or_else(|_| p.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .with_context(|| format!("--trusted-proxy '{p}' is not a CIDR or an address"))?;
        c.trusted_proxies.push(net);
    }
    c.admin_password = std::env::var("MORRIGAN_ADMIN_PASSWORD")
        .ok()
        .filter(|p| !p.is_empty());
    Ok(c)
}

/// Resolves when SIGTERM or SIGINT arrives.
async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = int.recv() => tracing::info!("SIGINT received"),
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = resolve(args)?;
    let server = Server::builder(config).build().await?;
    server.run(signal()).await;
    Ok(())
}
