//! The client's address behind trusted proxies (`Forwarded: for=`, `X-Forwarded-For`).
//!
//! A peer's headers are believed only when the peer itself is a trusted proxy, and then only up
//! to the nearest hop that is not one: a client cannot put an address of its choice in the
//! record by sending the headers itself.

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;
use ipnet::IpNet;

/// The client's address: the TCP peer, unless the peer is a trusted proxy, in which case the
/// nearest untrusted hop of `Forwarded: for=` or `X-Forwarded-For`.
pub fn client_address(trusted_proxies: &[IpNet], peer: SocketAddr, headers: &HeaderMap) -> String {
    let trusted = |ip: &IpAddr| trusted_proxies.iter().any(|n| n.contains(ip));
    if !trusted(&peer.ip()) {
        return peer.ip().to_string();
    }
    let mut hops: Vec<IpAddr> = Vec::new();
    for v in headers.get_all("forwarded") {
        let Ok(v) = v.to_str() else { continue };
        for element in v.split(',') {
            for pair in element.split(';') {
                if let Some((k, val)) = pair.trim().split_once('=')
                    && k.trim().eq_ignore_ascii_case("for")
                    && let Some(ip) = parse_hop(val)
                {
                    hops.push(ip);
                }
            }
        }
    }
    if hops.is_empty() {
        for v in headers.get_all("x-forwarded-for") {
            let Ok(v) = v.to_str() else { continue };
            hops.extend(v.split(',').filter_map(parse_hop));
        }
    }
    // Walk from the nearest hop back; the first untrusted one is the client.
    hops.iter()
        .rev()
        .find(|ip| !trusted(ip))
        .or(hops.first())
        .map(|ip| ip.to_string())
        .unwrap_or_else(|| peer.ip().to_string())
}

fn parse_hop(raw: &str) -> Option<IpAddr> {
    let v = raw.trim().trim_matches('"');
    if let Ok(ip) = v.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = v.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    // `[v6]` without a port.
    v.strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|r| r.parse().ok())
}
