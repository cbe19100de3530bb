//! `morrigan-bench`: see `BENCHMARKS.md`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use morrigan_bench::load::Target;
use morrigan_bench::run::{self, RunOptions, Scenario, Spec};
use morrigan_bench::{bare, sys};
use tokio::io::AsyncBufReadExt;

#[derive(Parser)]
#[command(
    name = "morrigan-bench",
    about = "Load generator for Morrigan and its bare floor"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Open N connections at concurrency C, then hold them idle for --hold seconds.
    Connect(RunArgs),
    /// Hold N connections, then REST sends to random ones for --duration seconds.
    Send(RunArgs),
    /// Connect/close cycles for --duration seconds (--load-concurrency loops).
    Churn(RunArgs),
    /// Like send, but devices are held by --url and sends go through --send-url.
    ClusterSend(RunArgs),
    /// N offline devices with --per-client queued tracked messages each reconnect at once
    /// (-c concurrent connects); times the outbox drain.
    Outbox(RunArgs),
    /// Run the bare floor server (prints `listening <url>` on stdout).
    BareServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        spec: String,
    },
}

#[derive(Args, Clone)]
struct RunArgs {
    /// The node devices connect to.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The node REST sends go through (cluster-send).
    #[arg(long)]
    send_url: Option<String>,
    #[arg(long, default_value = "admin")]
    admin_name: String,
    #[arg(long, env = "MORRIGAN_ADMIN_PASSWORD", default_value = "")]
    admin_password: String,
    /// Run against the bare floor server instead: started here as a child process.
    #[arg(long)]
    bare: bool,
    /// The server's pid, for RSS and CPU from /proc (set automatically with --bare).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Connections to open and hold (default 1000; 0 for churn).
    #[arg(short = 'n', long)]
    connections: Option<u64>,
    /// Concurrent connects.
    #[arg(short = 'c', long, default_value_t = 100)]
    concurrency: usize,
    /// Concurrent REST senders (send) or connect/close loops (churn).
    #[arg(long, default_value_t = 32)]
    load_concurrency: usize,
    /// Seconds to hold the connections idle after connecting.
    #[arg(long, default_value_t = 0.0)]
    hold: f64,
    /// Seconds of sends or churn.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Worker processes (default: enough for at most 15,000 sockets each).
    #[arg(long)]
    workers: Option<usize>,
    /// Source addresses 127.0.0.1 ..= 127.0.0.<sources>.
    #[arg(long, default_value_t = 4)]
    sources: u8,
    /// The whole run stops after this many seconds, whatever happens.
    #[arg(long, default_value_t = 900)]
    max_time: u64,
    /// Sends are tracked: `ack` or `reply` (held sockets answer), waiting up to 10 s each.
    #[arg(long, value_parser = ["ack", "reply"])]
    track: Option<String>,
    /// Outbox: tracked messages queued per device before they reconnect.
    #[arg(long, default_value_t = 10)]
    per_client: u32,
    /// A label copied into the JSON line.
    #[arg(long, default_value = "")]
    label: String,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    sys::raise_nofile();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        match cli.command {
            Cmd::Connect(a) => scenario(Scenario::Connect, a).await,
            Cmd::Send(a) => scenario(Scenario::Send, a).await,
            Cmd::Churn(a) => scenario(Scenario::Churn, a).await,
            Cmd::ClusterSend(a) => scenario(Scenario::ClusterSend, a).await,
            Cmd::Outbox(a) => scenario(Scenario::Outbox, a).await,
            Cmd::BareServer { listen } => {
                let listener = tokio::net::TcpListener::bind(listen).await?;
                println!("listening http://{}", listener.local_addr()?);
                let stop = tokio_util::sync::CancellationToken::new();
                let s = stop.clone();
                tokio::spawn(async move {
                    let _ = tokio::signal::ctrl_c().await;
                    s.cancel();
                });
                bare::serve(listener, stop).await
            }
            Cmd::Worker { spec } => run::worker(serde_json::from_str(&spec)?).await,
        }
    })
}

async fn scenario(scenario: Scenario, a: RunArgs) -> Result<()> {
    let mut url = a.url.trim_end_matches('/').to_string();
    let mut server_pid = a.server_pid;
    let mut bare_child = None;
    if a.bare {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .args(["bare-server", "--listen", "127.0.0.1:0"])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the bare server")?;
        let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("piped")).lines();
        let first = lines.next_line().await?.unwrap_or_default();
        url = first
            .strip_prefix("listening ")
            .context("bare server did not start")?
            .to_string();
        server_pid = child.id();
        bare_child = Some(child);
    }
    if scenario == Scenario::ClusterSend && a.send_url.is_none() {
        anyhow::bail!("cluster-send needs --send-url (the node sends go through)");
    }
    let connections = a
        .connections
        .unwrap_or(if scenario == Scenario::Churn { 0 } else { 1000 });
    let workers = a
        .workers
        .unwrap_or_else(|| connections.max(1).div_ceil(15_000) as usize)
        .max(1);
    let spec = Spec {
        scenario,
        target: Target {
            url,
            send_url: a
                .send_url
                .clone()
                .map(|u| u.trim_end_matches('/').to_string()),
            admin_name: a.admin_name.clone(),
            admin_password: a.admin_password.clone(),
            track: a.track.clone(),
        },
        connections,
        concurrency: a.concurrency,
        load_concurrency: a.load_concurrency,
        hold_s: a.hold,
        duration_s: a.duration,
        sources: a.sources,
        run_id: format!("{:08x}", rand::random::<u32>()),
        workers,
        worker: 0,
        per_client: a.per_client,
    };
    let label = if a.label.is_empty() {
        format!(
            "{}-{}",
            if a.bare { "bare" } else { "morrigan" },
            scenario.name()
        )
    } else {
        a.label.clone()
    };
    eprintln!(
        "{label}: {} connections, concurrency {}, {} worker(s), {} source address(es) -> {}",
        spec.connections, spec.concurrency, workers, spec.sources, spec.target.url
    );
    let report = run::run(RunOptions {
        spec,
        server_pid,
        label,
        max_time: Duration::from_secs(a.max_time),
    })
    .await;
    if let Some(mut c) = bare_child {
        let _ = c.start_kill();
        let _ = c.wait().await;
    }
    let mut report = report?;
    report["bare"] = serde_json::json!(a.bare);
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
