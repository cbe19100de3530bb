//! Login protection: failed logins are throttled per source address and per identity name (429
//! with `Retry-After` and a JSON reason, growing delays), the real admin from another address
//! still logs in, password hashing runs a few at a time (503 with `Retry-After` when saturated,
//! never a hang), and `/metrics` counts failed logins by reason.
//!
//! Each client binds its own loopback address (127.0.0.0/8 is all local on Linux), so the
//! server sees distinct source addresses.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use common::{ADMIN_PASSWORD, Node, WAIT};
use serde_json::{Value, json};

/// A client whose connections come from `ip`.
fn client_from(ip: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(WAIT)
        .local_address(IpAddr::V4(Ipv4Addr::from(ip)))
        .build()
        .expect("http client")
}

/// One login answer: status, JSON body and the `Retry-After` header in seconds, if any.
struct Answer {
    status: u16,
    body: Value,
    retry_after: Option<u64>,
}

async fn login_from(node: &Node, http: &reqwest::Client, name: &str, password: &str) -> Answer {
    let res = http
        .post(node.url("/api/auth"))
        .json(&json!({"name": name, "password": password}))
        .send()
        .await
        .expect("login answered in time");
    let retry_after = res.headers().get("retry-after").map(|v| {
        v.to_str()
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("Retry-After is a number of seconds: {v:?}"))
    });
    let (status, body) = common::read(res).await;
    Answer {
        status,
        body,
        retry_after,
    }
}

/// Asserts a throttled answer: 429, `Retry-After` ≥ 1, `{"state":"throttled","status":"failed",
/// "reason":"… retry in N s"}`; returns the delay.
fn assert_throttled(a: &Answer, what: &str) -> u64 {
    assert_eq!(a.status, 429, "{what}: {}", a.body);
    assert_eq!(a.body["state"], "throttled", "{what}: {}", a.body);
    assert_eq!(a.body["status"], "failed", "{what}: {}", a.body);
    let reason = a.body["reason"].as_str().unwrap_or_default();
    let retry = a
        .retry_after
        .unwrap_or_else(|| panic!("{what}: a 429 carries Retry-After"));
    assert!(retry >= 1, "{what}: Retry-After {retry}");
    assert!(
        reason.contains(&format!("retry in {retry} s")),
        "{what}: the reason names the delay ({retry} s): {reason}"
    );
    retry
}

/// The value of `morrigan_login_failures_total{reason="<reason>"}` (0 when absent).
async fn login_failures(node: &Node, reason: &str) -> u64 {
    let text = node
        .http
        .get(node.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let label = format!("reason=\"{reason}\"");
    text.lines()
        .filter(|l| l.starts_with("morrigan_login_failures_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Attempts with a wrong password from `http` until one is not throttled (bounded by the
/// announced delay plus [`WAIT`]); returns that answer.
async fn wrong_password_after_the_delay(node: &Node, http: &reqwest::Client, delay: u64) -> Answer {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(delay) + WAIT;
    loop {
        let a = login_from(node, http, "admin", "not-the-password").await;
        if a.status != 429 {
            return a;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still throttled {delay} s + {WAIT:?} after a {delay} s Retry-After: {}",
            a.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn brute_force_from_one_address_is_throttled_with_a_growing_delay() {
    let node = Node::start().await;
    let attacker = client_from([127, 0, 0, 5]);

    // A few free failures, then 429.
    let mut refused = 0;
    let first = loop {
        let a = login_from(&node, &attacker, "admin", "not-the-password").await;
        if a.status == 429 {
            break a;
        }
        assert_eq!(a.status, 403, "a wrong password: {}", a.body);
        refused += 1;
        assert!(
            refused <= 10,
            "{refused} wrong passwords from one address and still no 429"
        );
    };
    assert!(refused >= 1, "the first failures are free");
    let mut delay = assert_throttled(&first, "after the free failures");

    // Each further failure makes the next wait longer.
    for round in 0..2 {
        let a = wrong_password_after_the_delay(&node, &attacker, delay).await;
        assert_eq!(a.status, 403, "round {round}: {}", a.body);
        refused += 1;
        let next = assert_throttled(
            &login_from(&node, &attacker, "admin", "not-the-password").await,
            "right after a failure past the free ones",
        );
        assert!(
            next > delay,
            "round {round}: the delay grows ({delay} s, then {next} s)"
        );
        delay = next;
    }
    // While throttled, even the right password is not checked.
    let a = login_from(&node, &attacker, "admin", ADMIN_PASSWORD).await;
    assert_throttled(&a, "the right password from a throttled address");

    // The admin, from another address, is not locked out.
    let admin = client_from([127, 0, 0, 6]);
    let a = login_from(&node, &admin, "admin", ADMIN_PASSWORD).await;
    assert_eq!(a.status, 200, "the admin from another address: {}", a.body);
    assert_eq!(a.body["state"], "success");

    // Counted.
    assert!(login_failures(&node, "password").await >= refused);
    assert!(login_failures(&node, "throttled").await >= 4);
}

#[tokio::test]
async fn guessing_one_name_from_many_addresses_is_throttled_but_a_clean_address_logs_in() {
    let node = Node::start().await;
    // Spread the guesses so that no address reaches its own limit: a few per address.
    let mut throttled = None;
    'guessing: for host in 1..=20u8 {
        let guesser = client_from([127, 0, 1, host]);
        for _ in 0..3 {
            let a = login_from(&node, &guesser, "admin", "not-the-password").await;
            if a.status == 429 {
                throttled = Some((guesser, a));
                break 'guessing;
            }
            assert_eq!(a.status, 403, "a wrong password: {}", a.body);
        }
    }
    let (guesser, a) = throttled.expect("60 guesses at one name from 20 addresses and no 429");
    assert_throttled(&a, "a guesser, once the name had too many failures");
    let reason = a.body["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("identity"), "the reason says why: {reason}");

    // A fresh address gets one checked attempt (each failure makes the name's delay longer).
    for host in 1..=5u8 {
        let fresh = client_from([127, 0, 2, host]);
        let a = login_from(&node, &fresh, "admin", "not-the-password").await;
        assert_eq!(a.status, 403, "a fresh address is checked: {}", a.body);
        if host == 5 {
            let a = login_from(&node, &fresh, "admin", "not-the-password").await;
            assert_throttled(&a, "the same address again");
        }
    }
    // A guessing address is refused even with the right password.
    let a = login_from(&node, &guesser, "admin", ADMIN_PASSWORD).await;
    assert_throttled(&a, "a guessing address with the right password");

    // The real admin, from an address that has not failed, logs in.
    let admin = client_from([127, 0, 2, 100]);
    let a = login_from(&node, &admin, "admin", ADMIN_PASSWORD).await;
    assert_eq!(a.status, 200, "the admin from a clean address: {}", a.body);
    // Other identities are not affected.
    let (_, _) = node.identity_with("ops", &["api"]).await;
    let a = login_from(&node, &guesser, "ops", "password-of-ops").await;
    assert_eq!(
        a.status, 200,
        "another name from the guessing address: {}",
        a.body
    );
}

#[tokio::test]
async fn concurrent_logins_are_bounded_answered_and_none_hangs() {
    let node = Node::start().await;
    const LOGINS: usize = 120;
    let clients: Vec<reqwest::Client> = (0..LOGINS)
        .map(|i| client_from([127, 0, 3 + (i / 200) as u8, 1 + (i % 200) as u8]))
        .collect();
    let started = tokio::time::Instant::now();
    let answers = futures_util::future::join_all(clients.iter().enumerate().map(|(i, http)| {
        let node = &node;
        async move { login_from(node, http, &format!("nobody-{i}"), "not-the-password").await }
    }))
    .await;
    let took = started.elapsed();
    let mut busy = 0;
    for a in &answers {
        match a.status {
            403 => {
                assert_eq!(a.body["status"], "failed", "{}", a.body);
            }
            503 => {
                busy += 1;
                assert_eq!(a.body["state"], "unavailable", "{}", a.body);
                assert_eq!(a.body["status"], "failed", "{}", a.body);
                assert!(a.body["reason"].is_string(), "{}", a.body);
                let retry = a.retry_after.expect("a 503 carries Retry-After");
                assert!(retry >= 1, "Retry-After {retry}");
            }
            other => panic!("a login answered {other}: {}", a.body),
        }
    }
    assert!(
        busy > 0,
        "{LOGINS} concurrent logins, none told to come back later (took {took:?})"
    );
    assert!(login_failures(&node, "busy").await >= busy as u64);
    assert!(login_failures(&node, "password").await >= (LOGINS - busy) as u64);
    // The slots were released: a login goes through.
    let a = login_from(
        &node,
        &client_from([127, 0, 4, 250]),
        "admin",
        ADMIN_PASSWORD,
    )
    .await;
    assert_eq!(a.status, 200, "after the burst: {}", a.body);
}
