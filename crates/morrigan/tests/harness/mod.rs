//! Shared by every test of the binary: the address a `morrigan serve` process bound (every
//! server listens on `127.0.0.1:0` and the test reads the port from its `serving` log line, so
//! no port is picked, released and hoped for), a port that refuses connections, and skipping a
//! test whose backing service is missing.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

// The skipping rule is the server tests' own: one file, included by both test trees.
#[path = "../../../morrigan-server/tests/common/skip.rs"]
mod skip;
#[allow(unused_imports)]
pub use skip::{service_url, skip};

/// The address in the `serving` line of a `morrigan serve` log (pretty or JSON format): the
/// address the listener actually bound.
pub fn serving_address(log: &str) -> Option<SocketAddr> {
    log.lines().find_map(|line| {
        if let Ok(event) = serde_json::from_str::<serde_json::Value>(line) {
            let fields = &event["fields"];
            if fields["message"] != "serving" {
                return None;
            }
            return fields["address"].as_str()?.parse().ok();
        }
        let (_, after) = line.split_once(" serving address=")?;
        after.split_whitespace().next()?.parse().ok()
    })
}

/// Waits (at most `within`) for the `serving` line in the log file `log` and returns the bound
/// address. `exited` tells whether the process has ended (then the wait fails at once, with the
/// log).
pub async fn wait_serving(
    log: &Path,
    mut exited: impl FnMut() -> Option<String>,
    within: Duration,
) -> SocketAddr {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(addr) = serving_address(&text) {
            return addr;
        }
        if let Some(status) = exited() {
            panic!("morrigan serve exited ({status}) before serving:\n{text}");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "morrigan serve did not log its address within {within:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A port on 127.0.0.1 that refuses every connection for as long as this value lives: a socket
/// bound to it that never listens (so nothing else can take the port meanwhile).
pub struct RefusingPort {
    socket: tokio::net::TcpSocket,
    pub port: u16,
}

impl RefusingPort {
    pub fn new() -> RefusingPort {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind 127.0.0.1:0");
        let port = socket.local_addr().expect("bound address").port();
        RefusingPort { socket, port }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}
