//! Property tests of the client address behind proxies: whatever hops a peer forges, the
//! address recorded is the peer's or one a trusted proxy names. `PROPTEST_CASES` overrides the
//! case count.

mod common;
#[path = "common/props.rs"]
mod props;

use std::net::{IpAddr, SocketAddr};

use axum::http::{HeaderMap, HeaderValue};
use common::Node;
use props::{client_runtime, runner};
use proptest::prelude::*;

// ----- the client address behind proxies -----

/// The networks this node trusts as proxies.
const TRUSTED: [&str; 3] = ["127.0.0.0/8", "10.0.0.0/8", "fd00::/8"];

fn trusted(ip: &IpAddr) -> bool {
    TRUSTED
        .iter()
        .any(|n| n.parse::<ipnet::IpNet>().expect("net").contains(ip))
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 3]>().prop_map(|[a, b, c]| IpAddr::from([10, a, b, c])),
        any::<u8>().prop_map(|d| IpAddr::from([127, 0, 0, d])),
        any::<u8>().prop_map(|d| IpAddr::from([203, 0, 113, d])),
        any::<[u8; 2]>().prop_map(|[c, d]| IpAddr::from([198, 51, c, d])),
        any::<u16>().prop_map(|x| IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, x])),
        any::<u16>().prop_map(|x| IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, x])),
        any::<u8>()
            .prop_map(|d| IpAddr::from(std::net::Ipv4Addr::new(10, 0, 0, d).to_ipv6_mapped())),
    ]
}

/// How one hop is written in a header.
#[derive(Debug, Clone)]
enum Hop {
    /// An address, with or without a port, quotes and brackets.
    Addr {
        ip: IpAddr,
        port: Option<u16>,
        quoted: bool,
        bracketed: bool,
    },
    /// Something that is not an address (`unknown`, an obfuscated id, garbage).
    Junk(String),
}

impl Hop {
    fn ip(&self) -> Option<IpAddr> {
        match self {
            Hop::Addr { ip, .. } => Some(*ip),
            Hop::Junk(_) => None,
        }
    }

    fn render(&self) -> String {
        match self {
            Hop::Junk(s) => s.clone(),
            Hop::Addr {
                ip,
                port,
                quoted,
                bracketed,
            } => {
                let addr = match (ip, port, bracketed) {
                    (IpAddr::V6(v6), Some(p), _) => format!("[{v6}]:{p}"),
                    (IpAddr::V6(v6), None, true) => format!("[{v6}]"),
                    (ip, Some(p), _) => format!("{ip}:{p}"),
                    (ip, None, _) => ip.to_string(),
                };
                if *quoted { format!("\"{addr}\"") } else { addr }
            }
        }
    }
}

fn hop() -> impl Strategy<Value = Hop> {
    prop_oneof![
        4 => (ip(), prop::option::of(any::<u16>()), any::<bool>(), any::<bool>()).prop_map(
            |(ip, port, quoted, bracketed)| Hop::Addr { ip, port, quoted, bracketed }
        ),
        1 => prop_oneof![
            Just("unknown".to_string()),
            "_[a-z]{1,8}",
            "[a-z:.]{0,12}",
            Just("999.1.1.1".to_string()),
        ]
        .prop_filter("not an address", |s| {
            let bare = s.trim_start_matches('[').trim_end_matches(']');
            s.parse::<IpAddr>().is_err()
                && s.parse::<SocketAddr>().is_err()
                && bare.parse::<IpAddr>().is_err()
        })
        .prop_map(Hop::Junk),
    ]
}

/// The headers a request arrives with: `Forwarded` elements and `X-Forwarded-For` lists, each
/// possibly split over several header lines.
#[derive(Debug, Clone)]
struct Forwarding {
    forwarded: Vec<Vec<Hop>>,
    xff: Vec<Vec<Hop>>,
    /// `Forwarded` parameters beside `for=` (`proto=https`, `by=...`), and its spelling.
    params: bool,
    upper: bool,
}

impl Forwarding {
    fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        for line in &self.forwarded {
            let key = if self.upper { "For" } else { "for" };
            let elements: Vec<String> = line
                .iter()
                .map(|hop| {
                    if self.params {
                        format!("proto=https;{key}={};by=_lb", hop.render())
                    } else {
                        format!("{key}={}", hop.render())
                    }
                })
                .collect();
            if let Ok(v) = HeaderValue::from_str(&elements.join(", ")) {
                h.append("forwarded", v);
            }
        }
        for line in &self.xff {
            let list: Vec<String> = line.iter().map(Hop::render).collect();
            if let Ok(v) = HeaderValue::from_str(&list.join(", ")) {
                h.append("x-forwarded-for", v);
            }
        }
        h
    }

    /// The documented answer: the peer unless it is a trusted proxy; else, from the hops of
    /// `Forwarded` (or of `X-Forwarded-For` when `Forwarded` names none), the nearest one that
    /// is not trusted, or the farthest if all are; the peer if there is none.
    fn expected(&self, peer: IpAddr) -> IpAddr {
        if !trusted(&peer) {
            return peer;
        }
        let ips = |lines: &Vec<Vec<Hop>>| -> Vec<IpAddr> {
            lines.iter().flatten().filter_map(Hop::ip).collect()
        };
        let mut hops = ips(&self.forwarded);
        if hops.is_empty() {
            hops = ips(&self.xff);
        }
        hops.iter()
            .rev()
            .find(|ip| !trusted(ip))
            .or(hops.first())
            .copied()
            .unwrap_or(peer)
    }
}

fn forwarding() -> impl Strategy<Value = Forwarding> {
    let lines = || prop::collection::vec(prop::collection::vec(hop(), 1..4), 0..3);
    (lines(), lines(), any::<bool>(), any::<bool>()).prop_map(|(forwarded, xff, params, upper)| {
        Forwarding {
            forwarded,
            xff,
            params,
            upper,
        }
    })
}

fn peer() -> impl Strategy<Value = SocketAddr> {
    (ip(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port))
}

#[test]
fn the_client_address_is_the_peer_or_a_hop_a_trusted_proxy_names() {
    let rt = client_runtime();
    let node = rt.block_on(Node::start_with(|c| {
        c.trusted_proxies = TRUSTED.iter().map(|n| n.parse().expect("net")).collect();
    }));
    let state = node.state().clone();

    let mut structured = runner(1000);
    let result = structured.run(&(peer(), forwarding()), |(peer, fwd)| {
        let got = morrigan_server::testing::client_address(
            &state.config().trusted_proxies,
            peer,
            &fwd.headers(),
        );
        prop_assert_eq!(
            got,
            fwd.expected(peer.ip()).to_string(),
            "{:?}",
            fwd.headers()
        );
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }

    // Arbitrary header bytes: no panic, and the answer is an address, the peer's when the
    // peer is not trusted.
    let bytes = prop::collection::vec(any::<u8>(), 0..80);
    let mut arbitrary = runner(1000);
    let result = arbitrary.run(&(peer(), bytes.clone(), bytes), |(peer, fwd, xff)| {
        let mut h = HeaderMap::new();
        for (name, value) in [("forwarded", fwd), ("x-forwarded-for", xff)] {
            if let Ok(v) = HeaderValue::from_bytes(&value) {
                h.append(name, v);
            }
        }
        let got =
            morrigan_server::testing::client_address(&state.config().trusted_proxies, peer, &h);
        let ip: IpAddr = got.parse().map_err(|_| TestCaseError::fail(got.clone()))?;
        if !trusted(&peer.ip()) {
            prop_assert_eq!(ip, peer.ip());
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }

    // And over HTTP from the loopback (trusted here): the record says what the model says.
    rt.block_on(async {
        let identity = node.provision("behind-proxy").await;
        let cases = [
            (
                "x-forwarded-for",
                "10.1.1.1, 203.0.113.5, 10.2.2.2",
                "203.0.113.5",
            ),
            (
                "forwarded",
                "for=\"[2001:db8::7]:80\", for=10.0.0.9",
                "2001:db8::7",
            ),
            ("x-forwarded-for", "10.1.1.1, 10.2.2.2", "10.1.1.1"),
            ("x-forwarded-for", "garbage, ", "127.0.0.1"),
        ];
        for (name, value, expected) in cases {
            let res = node
                .http
                .post(node.url("/api/core/connection"))
                .header("authorization", &identity)
                .header(name, value)
                .send()
                .await
                .expect("exchange");
            let (status, body) = common::read(res).await;
            assert_eq!(status, 200, "{body}");
            let id = common::claims(body["token"].as_str().expect("token"))["sub"]
                .as_str()
                .expect("sub")
                .to_string();
            let record = node.record(&id).await;
            assert_eq!(record["clientAddress"], expected, "{name}: {value}");
        }
    });
}
