//! The real binary, run as an unprivileged user (`setpriv`), through a fault of its SQLite
//! data directory: while its files are read-only the node answers 503, and once the
//! permissions are restored every write succeeds again, without a restart.
//!
//! Needs root (to run the node as `nobody` and to change the permissions under it); otherwise
//! the test prints a notice and passes.

mod harness;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

const PASSWORD: &str = "store-faults-password";
const WAIT: Duration = Duration::from_secs(20);
/// `nobody`.
const UID: u32 = 65534;

/// A running `morrigan serve`, killed on drop.
struct Proc {
    child: Child,
    base: String,
    log: std::path::PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn login(&self) -> (u16, Value) {
        let res = reqwest::Client::builder()
            .timeout(WAIT)
            .build()
            .unwrap()
            .post(format!("{}/api/auth", self.base))
            .json(&json!({"name": "admin", "password": PASSWORD}))
            .send()
            .await
            .expect("login sent");
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }
}

/// `morrigan serve` as `nobody` on `data`, once `/healthz` answers.
async fn serve_unprivileged(tmp: &Path, data: &Path) -> Proc {
    let log = tmp.join("serve.log");
    let mut child = Command::new("setpriv")
        .args([
            &format!("--reuid={UID}"),
            &format!("--regid={UID}"),
            "--clear-groups",
            env!("CARGO_BIN_EXE_morrigan"),
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .current_dir(tmp)
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
        .stderr(Stdio::from(
            std::fs::OpenOptions::new().append(true).open(&log).unwrap(),
        ))
        .env("MORRIGAN_LOG", "info")
        .env("MORRIGAN_ADMIN_PASSWORD", PASSWORD)
        .env_remove("MORRIGAN_CONFIG")
        .env_remove("MORRIGAN_DATABASE_URL")
        .spawn()
        .expect("start morrigan through setpriv");
    let addr = harness::wait_serving(
        &log,
        || child.try_wait().ok().flatten().map(|s| s.to_string()),
        WAIT,
    )
    .await;
    let mut proc = Proc {
        child,
        base: format!("http://{addr}"),
        log,
    };
    let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(Some(status)) = proc.child.try_wait() {
            panic!("morrigan exited early ({status}):\n{}", proc.log_text());
        }
        if let Ok(res) = http.get(format!("{}/healthz", proc.base)).send().await
            && res.status().as_u16() == 200
        {
            return proc;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no /healthz in time:\n{}",
            proc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// The database files of the data directory (the WAL and its index exist while the node runs).
fn database_files(data: &Path) -> Vec<std::path::PathBuf> {
    ["morrigan.db", "morrigan.db-wal", "morrigan.db-shm"]
        .iter()
        .map(|f| data.join(f))
        .filter(|p| p.exists())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_writes_recover_once_the_data_directory_is_writable_again() {
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let setpriv = Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !root || !setpriv {
        harness::skip("needs root and setpriv to run the node as nobody");
        return;
    }
    let tmp = tempfile::TempDir::new().unwrap();
    chmod(tmp.path(), 0o755);
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::os::unix::fs::chown(&data, Some(UID), Some(UID)).unwrap();
    let node = serve_unprivileged(tmp.path(), &data).await;

    // The fault, as soon as the node serves: the data directory and its files become read-only
    // for the node's user (what `chmod -R a-w` does). Requests keep coming meanwhile (the
    // signing keys are read from the store), so the node opens database connections.
    let files = database_files(&data);
    for f in &files {
        chmod(f, 0o444);
    }
    chmod(&data, 0o500);
    let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let reads = (0..64).map(|_| {
        http.get(format!("{}/.well-known/jwks.json", node.base))
            .send()
    });
    for res in futures_util::future::join_all(reads).await {
        let status = res
            .expect("answered while the files were read-only")
            .status();
        assert!(
            status == 200 || status == 503,
            "a read answered {status} while the files were read-only"
        );
    }

    // Permissions restored: within a few seconds every write succeeds again (a login records
    // its token), without a restart.
    for f in &files {
        chmod(f, 0o644);
    }
    chmod(&data, 0o700);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    'heal: loop {
        let mut last = (0, Value::Null);
        for _ in 0..12 {
            last = node.login().await;
            if last.0 != 200 {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "writes still fail after the permissions were restored: {} {}\n{}",
                    last.0,
                    last.1,
                    node.log_text()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue 'heal;
            }
        }
        assert_eq!(last.0, 200);
        break;
    }
}
