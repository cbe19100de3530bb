//! `morrigan`: the server (`serve`), a device agent (`agent`) and the operator commands
//! (`login`, `client`, `connection`, `message`, `identity`, `node`).

mod agent;
mod ops;
mod serve;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "morrigan",
    version,
    about = "Morrigan: authorizes and manages the WebSocket connections of a device fleet"
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        env = "MORRIGAN_LOG_FORMAT",
        value_enum,
        default_value = "pretty",
        global = true
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a server node.
    Serve(Box<serve::ServeArgs>),
    /// Run a device agent: stays connected, logs what it receives (acknowledging tracked
    /// messages), answers agent.ping.
    Agent(agent::AgentArgs),
    /// Log in to a server; the user token is kept (0600) for the other commands.
    Login(ops::login::LoginArgs),
    /// Provision, list, show, deprovision and message clients (devices).
    Client(ops::client::ClientCmd),
    /// List, show, message and close connections.
    Connection(ops::connection::ConnectionCmd),
    /// Show and list tracked and uplink messages.
    Message(ops::message::MessageCmd),
    /// List, create, delete operator identities and grant them functions.
    Identity(ops::identity::IdentityCmd),
    /// List the nodes of the cluster.
    Node(ops::node::NodeCmd),
}

/// A failure reported as one line (`error: <message>`) and a chosen exit code.
#[derive(Debug)]
pub struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }

    /// Exit code 1.
    pub fn msg(message: impl Into<String>) -> Self {
        Self::new(1, message)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MORRIGAN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // No colour codes in a log file or a journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Operator commands print results, not logs.
    let default_filter = match cli.command {
        Command::Serve(_) | Command::Agent(_) => "info,sqlx=warn",
        _ => "warn",
    };
    init_logging(cli.log_format, default_filter);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve::run(*args).await,
            Command::Agent(args) => agent::run(args).await,
            Command::Login(args) => ops::login::run(args).await.map_err(Into::into),
            Command::Client(cmd) => ops::client::run(cmd).await.map_err(Into::into),
            Command::Connection(cmd) => ops::connection::run(cmd).await.map_err(Into::into),
            Command::Message(cmd) => ops::message::run(cmd).await.map_err(Into::into),
            Command::Identity(cmd) => ops::identity::run(cmd).await.map_err(Into::into),
            Command::Node(cmd) => ops::node::run(cmd).await.map_err(Into::into),
        }
    });
    // Whatever is still running (a password hash, a blocking call) must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever the error.
            let line = format!("{e:#}").replace(['\n', '\r'], " ");
            eprintln!("error: {line}");
            let code = e.downcast_ref::<Failure>().map_or(1, |f| f.code);
            std::process::ExitCode::from(code)
        }
    }
}
