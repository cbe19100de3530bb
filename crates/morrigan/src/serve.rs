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
    /// How long message records (tracked, queued, uplink) are kept: seconds, or a number with
    /// s, m, h or d [default: 7d]. A send's ttl may not be longer.
    #[arg(long, env = "MORRIGAN_MESSAGE_RETENTION", value_parser = duration)]
    message_retention: Option<Duration>,
    /// Device message types accepted as uplink (published on the event stream, the last ones
    /// kept per client): `type`, `provider.*` or `*`; repeatable, comma-separated in the
    /// environment. The built-in agent's `agent.*` are always uplink.
    #[arg(long, env = "MORRIGAN_UPLINK_TYPES", value_delimiter = ',')]
    uplink_types: Vec<String>,
    /// Most messages queued in one client's outbox [default: 1000].
    #[arg(long, env = "MORRIGAN_OUTBOX_MAX_MESSAGES")]
    outbox_max_messages: Option<usize>,
    /// Most body bytes queued in one client's outbox [default: 1048576].
    #[arg(long, env = "MORRIGAN_OUTBOX_MAX_BYTES")]
    outbox_max_bytes: Option<usize>,
    /// Uplink messages kept per client [default: 100].
    #[arg(long, env = "MORRIGAN_UPLINK_KEEP")]
    uplink_keep: Option<u32>,
}

/// `3600`, `90s`, `15m`, `12h`, `7d`.
fn duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (3600, 90s, 15m, 12h, 7d)"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 24 * 3600,
        _ => return Err(format!("'{s}': the unit is s, m, h or d")),
    };
    Ok(Duration::from_secs(n.saturating_mul(scale)))
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
    /// Seconds.
    message_retention: Option<u64>,
    uplink_types: Option<Vec<String>>,
    outbox_max_messages: Option<usize>,
    outbox_max_bytes: Option<usize>,
    uplink_keep: Option<u32>,
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
    if let Some(d) = args
        .message_retention
        .or(file.message_retention.map(Duration::from_secs))
    {
        anyhow::ensure!(
            d >= Duration::from_secs(60),
            "--message-retention must be at least a minute"
        );
        c.message_retention = d;
    }
    let uplink = if args.uplink_types.is_empty() {
        file.uplink_types.unwrap_or_default()
    } else {
        args.uplink_types
    };
    morrigan_server::messaging::UplinkTypes::parse(uplink.iter().map(String::as_str))
        .map_err(|e| anyhow::anyhow!("--uplink-types: {e}"))?;
    c.uplink_types = uplink;
    if let Some(n) = args.outbox_max_messages.or(file.outbox_max_messages) {
        anyhow::ensure!(n >= 1, "--outbox-max-messages must be at least 1");
        c.outbox_max_messages = n;
    }
    if let Some(n) = args.outbox_max_bytes.or(file.outbox_max_bytes) {
        anyhow::ensure!(n >= 1024, "--outbox-max-bytes must be at least 1024");
        c.outbox_max_bytes = n;
    }
    if let Some(n) = args.uplink_keep.or(file.uplink_keep) {
        c.uplink_keep = n;
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
