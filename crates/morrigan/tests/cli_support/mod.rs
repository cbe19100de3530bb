//! Shared by `tests/cli.rs` and `tests/agent.rs`: a real `morrigan serve` process, the
//! `morrigan` command line with its own config directory, and agent processes.
//!
//! Every wait is bounded ([`WAIT`]); every child is killed when its handle is dropped, so a
//! failing test leaves no process behind.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_morrigan");
pub const ADMIN_PASSWORD: &str = "admin-password-for-tests";
/// Bound on every wait: generous, because a loaded CI machine is slow, and never reached when
/// things work.
pub const WAIT: Duration = Duration::from_secs(30);

/// A command with none of the caller's MORRIGAN_* settings.
fn clean_command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("MORRIGAN_") {
            cmd.env_remove(key);
        }
    }
    cmd.kill_on_drop(true);
    cmd
}

/// Polls `check` every 100 ms until it gives `Some`, at most [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn signal(child: &Child, signal: i32) {
    let pid = child.id().expect("the process is running") as i32;
    // SAFETY: kill(2) on a child we spawned and have not reaped yet.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill {pid}");
}

pub async fn wait_exit(child: &mut Child, what: &str) -> ExitStatus {
    tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap_or_else(|_| panic!("{what} did not exit in time"))
        .unwrap()
}

/// `morrigan serve` on 127.0.0.1 with its data in `data_dir`.
pub struct Server {
    child: Child,
    /// The port it bound (it listens on `127.0.0.1:0` first, and keeps the port across
    /// [`Server::restart`]).
    pub port: u16,
    pub url: String,
    data_dir: PathBuf,
    log: PathBuf,
}

impl Server {
    /// A server on a port of its own choosing (`--listen 127.0.0.1:0`).
    pub async fn start(data_dir: &Path) -> Server {
        Self::start_on(data_dir, 0).await
    }

    /// A server on `127.0.0.1:port` (0: any free port); returns once it serves.
    pub async fn start_on(data_dir: &Path, port: u16) -> Server {
        static RUN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = data_dir.with_extension(format!("serve-{n}.log"));
        let log_file = std::fs::File::create(&log).unwrap();
        let mut child = clean_command(BIN)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
            ])
            .arg(data_dir)
            .env("MORRIGAN_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("MORRIGAN_LOG", "info,sqlx=warn")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap();
        let addr = crate::harness::wait_serving(
            &log,
            || {
                child
                    .try_wait()
                    .ok()
                    .flatten()
                    .map(|status| status.to_string())
            },
            WAIT,
        )
        .await;
        let url = format!("http://{addr}");
        let server = Server {
            child,
            port: addr.port(),
            url: url.clone(),
            data_dir: data_dir.to_path_buf(),
            log,
        };
        let http = reqwest::Client::new();
        let healthz = format!("{url}/healthz");
        eventually("the server's /healthz", || {
            let request = http.get(&healthz).timeout(Duration::from_secs(2)).send();
            async move { request.await.ok().filter(|r| r.status() == 200).map(|_| ()) }
        })
        .await;
        server
    }

    /// SIGTERM, then waits for exit 0.
    pub async fn stop(mut self) {
        signal(&self.child, libc::SIGTERM);
        let status = wait_exit(&mut self.child, "the server").await;
        assert!(status.success(), "server exit: {status}");
    }

    /// Stops and starts again on the same port and data directory (the agent under test knows
    /// only that URL). The port is this server's own until the stop, so only a process binding
    /// it in the instant between could take it.
    pub async fn restart(self) -> Server {
        let (data_dir, port) = (self.data_dir.clone(), self.port);
        self.stop().await;
        Server::start_on(&data_dir, port).await
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The `morrigan` command line with a config directory of its own, pointed at one server.
pub struct Cli {
    config_dir: tempfile::TempDir,
    pub url: String,
}

impl Cli {
    pub fn new(url: &str) -> Cli {
        Cli {
            config_dir: tempfile::tempdir().unwrap(),
            url: url.to_string(),
        }
    }

    pub fn config_dir(&self) -> &Path {
        self.config_dir.path()
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = clean_command(BIN);
        cmd.args(args)
            .env("MORRIGAN_CONFIG_DIR", self.config_dir.path())
            .env("MORRIGAN_URL", &self.url)
            .stdin(Stdio::null());
        cmd
    }

    pub async fn output(&self, mut cmd: Command) -> Output {
        tokio::time::timeout(WAIT, cmd.output())
            .await
            .expect("the command ends in time")
            .unwrap()
    }

    pub async fn run(&self, args: &[&str]) -> Output {
        self.output(self.command(args)).await
    }

    /// Runs with `stdin` as standard input.
    pub async fn run_with_stdin(&self, args: &[&str], stdin: &str) -> Output {
        use tokio::io::AsyncWriteExt;
        let mut cmd = self.command(args);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.as_bytes()).await.unwrap();
        drop(input);
        tokio::time::timeout(WAIT, child.wait_with_output())
            .await
            .expect("the command ends in time")
            .unwrap()
    }

    /// Succeeds; its stdout.
    pub async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert_success(args, &out);
        String::from_utf8(out.stdout).unwrap()
    }

    /// Succeeds with `--json`; its stdout as JSON.
    pub async fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let stdout = self.ok(&args).await;
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
    }

    /// Fails with exactly one line on stderr, `error: ...`, and nothing on stdout; that line.
    pub async fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        one_error_line(args, &out)
    }

    pub async fn login(&self) {
        let out = self
            .run_with_stdin(
                &["login", "--password-stdin"],
                &format!("{ADMIN_PASSWORD}\n"),
            )
            .await;
        assert_success(&["login"], &out);
    }
}

pub fn assert_success(args: &[&str], out: &Output) {
    assert!(
        out.status.success(),
        "{args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn one_error_line(args: &[&str], out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail: {stderr}");
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?} printed {:?}", out.stdout);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: one line expected: {stderr}");
    assert!(lines[0].starts_with("error: "), "{args:?}: {stderr}");
    lines[0].to_string()
}

/// `morrigan agent` with its log (JSON lines, then the final `error:` line if any) in a file.
pub struct Agent {
    pub child: Child,
    log: PathBuf,
}

impl Agent {
    /// Fast reconnects, so that the tests do not wait for production delays.
    pub fn spawn(urls: &[&str], token_file: &Path, state_dir: &Path, log: &Path) -> Agent {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = clean_command(BIN);
        cmd.arg("agent");
        for url in urls {
            cmd.args(["--url", url]);
        }
        let child = cmd
            .arg("--token-file")
            .arg(token_file)
            .arg("--state-dir")
            .arg(state_dir)
            .args(["--backoff-base", "0.2", "--backoff-cap", "1"])
            .args(["--going-away-spread", "0.5"])
            .env("MORRIGAN_LOG_FORMAT", "json")
            .env("MORRIGAN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap();
        Agent {
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The agent's JSON log events.
    pub fn events(&self) -> Vec<Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Lines that are not JSON log events (the final error line).
    pub fn plain_lines(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| serde_json::from_str::<Value>(l).is_err())
            .map(str::to_string)
            .collect()
    }
}

/// Logs in and provisions `client`, its identity token in `<dir>/<client>.token`.
pub async fn provisioned(cli: &Cli, dir: &Path, client: &str) -> std::path::PathBuf {
    cli.login().await;
    let file = dir.join(format!("{client}.token"));
    cli.ok(&[
        "client",
        "provision",
        client,
        "--out",
        file.to_str().unwrap(),
    ])
    .await;
    file
}
