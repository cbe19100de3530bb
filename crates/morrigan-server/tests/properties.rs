//! Property tests where peers control the input: tokens (arbitrary and mutated real ones, through
//! the token API and over HTTP) and the message handler over a real socket. Case counts are
//! modest (the suite runs on two cores); `PROPTEST_CASES` overrides them.

mod common;
#[path = "common/props.rs"]
mod props;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use axum::http::HeaderValue;
use common::{How, Node};
use futures_util::SinkExt;
use morrigan_protocol::api::audience;
use morrigan_protocol::message::{Capability, ConnectionError, error_kinds, is_valid_type};
use morrigan_server::testing::{Tokens, digest};
use props::{client_runtime, runner};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

// ----- tokens -----

const B64URL: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Strings shaped like JWTs (base64url segments and dots), which get past the cheap checks.
fn jwt_like() -> impl Strategy<Value = String> {
    prop::collection::vec("[A-Za-z0-9_-]{0,60}", 1..5).prop_map(|parts| parts.join("."))
}

/// One to three edits of `token`: a character replaced, inserted or removed, a segment
/// dropped or swapped, the token cut short.
fn mutated(token: String) -> impl Strategy<Value = String> {
    let len = token.len();
    let alphabet: Vec<char> = format!("{B64URL}.=+/ ").chars().collect();
    let edit = (0..=len, prop::sample::select(alphabet), 0u8..6);
    prop::collection::vec(edit, 1..4).prop_map(move |edits| {
        let mut t: Vec<char> = token.chars().collect();
        for (at, c, kind) in edits {
            let at = at.min(t.len());
            match kind {
                0 | 1 if at < t.len() => t[at] = c,
                2 => t.insert(at, c),
                3 if at < t.len() => {
                    t.remove(at);
                }
                4 => {
                    let s: String = t.iter().collect();
                    let mut parts: Vec<&str> = s.split('.').collect();
                    if parts.len() > 1 {
                        let n = parts.len();
                        parts.swap(at % n, (at + 1) % n);
                    }
                    t = parts.join(".").chars().collect();
                }
                _ => t.truncate(at),
            }
        }
        t.into_iter().collect()
    })
}

/// Header-safe text (what an HTTP client can send in a header).
fn header_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,120}".prop_map(|s| s.trim().to_string()),
        jwt_like(),
        "Bearer [ -~]{0,80}",
    ]
}

#[test]
fn tokens_from_peers_are_never_accepted_and_never_panic() {
    let rt = client_runtime();
    let (tokens, real) = rt.block_on(async {
        let store = morrigan_server::store::sqlite::SqliteStore::connect("sqlite::memory:")
            .await
            .expect("store");
        let tokens = Tokens::from_key(
            ed25519_dalek::SigningKey::from_bytes(&[42; 32]),
            "node-p",
            Arc::new(store),
        )
        .await
        .expect("tokens");
        let real: Vec<String> = [audience::USER, audience::IDENTITY, audience::CONNECTION]
            .iter()
            .map(|aud| {
                let url = Some("http://127.0.0.1:1/api/core/connection/connect".to_string());
                tokens.issue(aud, "subject", 600, url).expect("issue").token
            })
            .collect();
        // Each real token verifies for its own audience only.
        for (i, aud) in [audience::USER, audience::IDENTITY, audience::CONNECTION]
            .iter()
            .enumerate()
        {
            assert!(tokens.verify(&real[i], aud).await.is_ok(), "{aud}");
        }
        (tokens, real)
    });
    let digests: Vec<String> = real.iter().map(|t| digest(t)).collect();
    let strategy = prop_oneof![
        2 => any::<String>(),
        2 => jwt_like(),
        4 => prop::sample::select(real.clone()).prop_flat_map(mutated),
    ];
    let mut runner = runner(600);
    let result = runner.run(&strategy, |candidate| {
        prop_assume!(!real.iter().any(|r| r.as_str() == candidate.trim()));
        rt.block_on(async {
            for aud in [audience::USER, audience::IDENTITY, audience::CONNECTION] {
                let verified = tokens.verify(&candidate, aud).await;
                prop_assert!(verified.is_err(), "{candidate:?} verified for {aud}");
                // Read without the signature (the store's digest decides): whatever is read
                // is never the digest of a token that was issued.
                if let Ok(p) = tokens.presented(&candidate, aud).await {
                    prop_assert!(!digests.contains(&p.digest), "{candidate:?}");
                    prop_assert_eq!(p.claims.aud.as_str(), aud);
                }
            }
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Opens the WebSocket with `origin` as the `Origin` header: the refusal's status and body.
async fn connect_with_origin(node: &Node, origin: &str) -> Result<(u16, Value), String> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = node.ws_url().into_client_request().expect("request");
    let value = HeaderValue::from_str(origin).map_err(|e| e.to_string())?;
    req.headers_mut().insert("origin", value);
    match node.ws_request(req, None).await {
        Ok(_) => Err(format!("{origin:?} opened a socket")),
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
            let status = res.status().as_u16();
            let body = res
                .body()
                .as_deref()
                .map(common::parse_body)
                .unwrap_or(Value::Null);
            Ok((status, body))
        }
        Err(e) => Err(format!("{origin:?}: not an HTTP refusal: {e}")),
    }
}

#[test]
fn arbitrary_tokens_over_http_are_refused_and_the_node_keeps_serving() {
    let rt = client_runtime();
    let node = rt.block_on(Node::start());
    let (identity, connection) = rt.block_on(async {
        let identity = node.provision("genuine").await;
        let connection = node.token(&identity).await;
        (identity, connection)
    });
    let real = vec![identity.clone(), connection.clone(), node.admin.clone()];
    let strategy = (
        prop_oneof![
            2 => header_text(),
            3 => prop::sample::select(real.clone()).prop_flat_map(mutated),
        ],
        any::<bool>(),
    );
    let mut runner = runner(300);
    let result = runner.run(&strategy, |(candidate, as_origin)| {
        let candidate = candidate.trim().to_string();
        prop_assume!(HeaderValue::from_str(&candidate).is_ok());
        let bare = candidate
            .strip_prefix("Bearer ")
            .unwrap_or(&candidate)
            .trim();
        prop_assume!(!real.iter().any(|r| r == bare));
        rt.block_on(async {
            let (status, body) = if as_origin {
                connect_with_origin(&node, &candidate)
                    .await
                    .map_err(TestCaseError::fail)?
            } else {
                let res = node
                    .http
                    .post(node.url("/api/core/connection"))
                    .header("authorization", &candidate)
                    .send()
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                common::read(res).await
            };
            // The documented refusals: a socket's token 401 or 403; an exchange 400 when no
            // token was given at all, else 403.
            let allowed: &[u16] = match (as_origin, candidate.is_empty()) {
                (true, _) => &[401, 403],
                (false, true) => &[400],
                (false, false) => &[403],
            };
            prop_assert!(
                allowed.contains(&status),
                "{candidate:?} (origin: {as_origin}): {status} {body}"
            );
            prop_assert_eq!(&body["status"], "failed", "{}", body);
            prop_assert!(body["reason"].is_string(), "{}", body);
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // The node still serves, and the genuine tokens were not spent by their forgeries.
    rt.block_on(async {
        let (mut ws, _) = node
            .ws_connect(&connection, How::Origin)
            .await
            .expect("the genuine connection token still opens its socket");
        let first = common::next_json(&mut ws).await;
        assert_eq!(first["state"], "accepted", "{first}");
        let mut device = node.connect_device("genuine", &identity).await;
        device.assert_served(&node).await;
    });
}

// ----- the message handler over a socket -----

/// What a device may send.
#[derive(Debug, Clone)]
enum Frame {
    Text(String),
    Binary(Vec<u8>),
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,16}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn type_value() -> impl Strategy<Value = Value> {
    let known = [
        "client.state",
        "client.state",
        "capability.report",
        "capability.report",
        "client.token.refresh",
        "client.other",
        "capability.list",
        "connection.state",
        "agent.ping",
        "Client.state",
        "client.",
        ".state",
        "client",
        "client..state",
    ];
    prop_oneof![
        5 => prop::sample::select(known.to_vec()).prop_map(Value::from),
        3 => "[A-Za-z0-9_.\\-\\[\\]^` \u{e4}]{0,14}".prop_map(Value::String),
        1 => "[a-z]{1,3}\\.[a-z]{250,256}".prop_map(Value::String),
        1 => json_value(),
    ]
}

fn capability() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => ("[a-z]{1,8}", prop::option::of("[0-9.]{0,5}"), prop::collection::vec("[a-z.]{1,8}", 0..3))
            .prop_map(|(name, version, messages)| {
                let mut c = json!({"name": name, "messages": messages});
                if let Some(v) = version {
                    c["version"] = json!(v);
                }
                c
            }),
        1 => json_value(),
    ]
}

fn typed_object() -> impl Strategy<Value = Value> {
    let state = prop_oneof!["[a-z]{0,3}", "[a-z]{125,131}", ".{0,6}",]
        .prop_map(Value::String)
        .boxed();
    let state = prop_oneof![3 => state, 1 => json_value()];
    let capabilities = prop_oneof![
        3 => prop::collection::vec(capability(), 0..4).prop_map(Value::Array),
        1 => json_value(),
        1 => Just(Value::Array(vec![json!({"name": "n"}); 257])),
    ];
    (
        type_value(),
        prop::option::of(state),
        prop::option::of(capabilities),
        prop::collection::btree_map("[a-z]{1,6}", json_value(), 0..3),
    )
        .prop_map(|(ty, state, capabilities, extra)| {
            let mut m: serde_json::Map<String, Value> = extra.into_iter().collect();
            m.insert("type".into(), ty);
            if let Some(s) = state {
                m.insert("state".into(), s);
            }
            if let Some(c) = capabilities {
                m.insert("capabilities".into(), c);
            }
            Value::Object(m)
        })
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        2 => ".{0,48}".prop_map(Frame::Text),
        2 => json_value().prop_map(|v| Frame::Text(v.to_string())),
        7 => typed_object().prop_map(|v| Frame::Text(v.to_string())),
        1 => prop::collection::vec(any::<u8>(), 0..48).prop_map(Frame::Binary),
    ]
}

/// What the documentation says a frame is answered with.
#[derive(Debug, PartialEq)]
enum Expected {
    Nothing,
    Error(&'static str, Option<String>),
    TokenIssue,
}

fn expected(frame: &Frame) -> Expected {
    use Expected::*;
    let text = match frame {
        Frame::Binary(_) => return Error(error_kinds::BINARY_FRAME, None),
        Frame::Text(t) => t,
    };
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return Error(error_kinds::INVALID_JSON, None);
    };
    let Some(obj) = value.as_object() else {
        return Error(error_kinds::NOT_AN_OBJECT, None);
    };
    let Some(ty) = obj.get("type").and_then(Value::as_str) else {
        return Error(error_kinds::MISSING_TYPE, None);
    };
    let named = |kind| Error(kind, Some(ty.to_string()));
    if !is_valid_type(ty) {
        return named(error_kinds::INVALID_TYPE);
    }
    let (provider, message) = ty.split_once('.').expect("a valid type has a dot");
    match (provider, message) {
        ("client", "state") => match obj.get("state").and_then(Value::as_str) {
            Some(s) if (1..=128).contains(&s.len()) => Nothing,
            _ => named(error_kinds::INVALID_MESSAGE),
        },
        ("client", "token.refresh") => TokenIssue,
        ("capability", "report") => match obj
            .get("capabilities")
            .map(|c| serde_json::from_value::<Vec<Capability>>(c.clone()))
        {
            Some(Ok(list)) if list.len() <= 256 => Nothing,
            _ => named(error_kinds::INVALID_MESSAGE),
        },
        // Answers to tracked messages: none was sent to this device.
        ("connection", "ack" | "reply" | "nack") => match obj.get("messageId") {
            Some(Value::String(_)) => named(error_kinds::UNKNOWN_MESSAGE_ID),
            _ => named(error_kinds::INVALID_MESSAGE),
        },
        ("client" | "capability" | "connection", _) => named(error_kinds::UNKNOWN_MESSAGE),
        // The built-in agent's types are uplink by default: accepted, unanswered.
        ("agent", _) => Nothing,
        _ => named(error_kinds::UNKNOWN_PROVIDER),
    }
}

#[test]
fn every_message_gets_exactly_its_documented_reply_and_the_socket_stays_open() {
    let rt = client_runtime();
    let node = rt.block_on(Node::start_with(|c| c.max_messages_per_second = 100_000));
    let device = std::sync::Mutex::new(rt.block_on(node.device("fuzzed")));
    let probes = AtomicU32::new(0);

    let mut runner = runner(800);
    let result = runner.run(&frame(), |frame| {
        let expect = expected(&frame);
        let mut device = device.lock().expect("device");
        let n = probes.fetch_add(1, Ordering::Relaxed);
        let probe = format!("probe.n{n}");
        let replies = rt.block_on(async {
            let message = match &frame {
                Frame::Text(t) => Message::Text(t.clone().into()),
                Frame::Binary(b) => Message::Binary(b.clone().into()),
            };
            device.ws.send(message).await.expect("send");
            device.send_json(&json!({"type": probe})).await;
            // Everything up to the probe's answer answers the frame (replies keep their order).
            let mut replies = Vec::new();
            loop {
                let reply = device.next_json().await;
                if reply["messageType"] == probe.as_str() {
                    break;
                }
                replies.push(reply);
            }
            replies
        });
        match expect {
            Expected::Nothing => prop_assert!(replies.is_empty(), "{frame:?}: {replies:?}"),
            Expected::TokenIssue => {
                prop_assert_eq!(replies.len(), 1, "{:?}: {:?}", frame, replies);
                prop_assert_eq!(&replies[0]["type"], "client.token.issue");
                prop_assert!(replies[0]["token"].is_string() && replies[0]["expires"].is_string());
            }
            Expected::Error(kind, message_type) => {
                prop_assert_eq!(replies.len(), 1, "{:?}: {:?}", frame, replies);
                let error: ConnectionError = serde_json::from_value(replies[0].clone())
                    .map_err(|e| TestCaseError::fail(format!("{e}: {}", replies[0])))?;
                prop_assert_eq!(error.kind.as_str(), "connection.error");
                prop_assert_eq!(error.error.as_str(), kind, "{:?}: {:?}", frame, replies);
                prop_assert_eq!(error.message_type, message_type);
                prop_assert!(!error.reason.is_empty());
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // Still the same open, served connection.
    let mut device = device.into_inner().expect("device");
    rt.block_on(async {
        device.assert_served(&node).await;
        let record = node.record(&device.id).await;
        assert_eq!(record["open"], true, "{record}");
    });
}
