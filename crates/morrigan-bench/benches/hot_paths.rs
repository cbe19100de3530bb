//! Micro-benchmarks of the hot functions: message type parsing + provider routing, token
//! sign/verify, and connection record encoding.
//!
//! `cargo bench -p morrigan-bench --bench hot_paths`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use ed25519_dalek::SigningKey;
use morrigan_protocol::api::audience;
use morrigan_protocol::message::MessageType;
use morrigan_protocol::records::ConnectionRecord;
use morrigan_server::providers::Providers;
use morrigan_server::store::sqlite::SqliteStore;
use morrigan_server::testing::Tokens;

fn routing(c: &mut Criterion) {
    let providers = Providers::builtin();
    c.bench_function("MessageType::parse", |b| {
        b.iter(|| MessageType::parse(black_box("client.state.ready")).unwrap())
    });
    c.bench_function("parse + provider lookup", |b| {
        b.iter(|| {
            let t = MessageType::parse(black_box("capability.list")).unwrap();
            providers.get(t.provider()).is_some()
        })
    });
    c.bench_function("frame -> serde_json::Value -> parse + lookup", |b| {
        let frame = r#"{"type":"client.state","state":"ready","payload":{"a":1,"b":[1,2,3]}}"#;
        b.iter(|| {
            let v: serde_json::Value = serde_json::from_str(black_box(frame)).unwrap();
            let t = MessageType::parse(v["type"].as_str().unwrap()).unwrap();
            providers.get(t.provider()).is_some()
        })
    });
}

fn tokens(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tokens = rt.block_on(async {
        let store = SqliteStore::connect("sqlite::memory:").await.unwrap();
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        Tokens::from_key(key, "bench-node", Arc::new(store))
            .await
            .unwrap()
    });
    let url = Some("http://127.0.0.1:8080/api/core/connection/connect".to_string());
    c.bench_function("Tokens::issue (connection, Ed25519 sign)", |b| {
        b.iter(|| {
            tokens
                .issue(audience::CONNECTION, black_box("conn-id"), 60, url.clone())
                .unwrap()
        })
    });
    let token = tokens
        .issue(audience::CONNECTION, "conn-id", 60, url.clone())
        .unwrap()
        .token;
    c.bench_function("Tokens::verify (connection, Ed25519 verify)", |b| {
        b.iter(|| {
            rt.block_on(tokens.verify(black_box(&token), audience::CONNECTION))
                .unwrap()
        })
    });
    // What the connect path runs instead of `verify` (the store then matches the digest).
    c.bench_function(
        "Tokens::presented (connection: claims + SHA-256 digest)",
        |b| {
            b.iter(|| {
                rt.block_on(tokens.presented(black_box(&token), audience::CONNECTION))
                    .unwrap()
            })
        },
    );
}

fn records(c: &mut Criterion) {
    let record = ConnectionRecord {
        id: "7b0d7a3e-2f7e-4a57-9f1e-1a2b3c4d5e6f".into(),
        client_id: "device-000123".into(),
        server_id: Some("node-1".into()),
        token_id: "0c9c5d2e-1111-4222-8333-944455566677".into(),
        client_address: Some("127.0.0.2".into()),
        connected: Some("2026-05-01T10:00:00.000Z".into()),
        alive: true,
        open: true,
        last_heartbeat: Some("2026-05-01T10:00:30.000Z".into()),
        disconnected: None,
        report_url: "http://127.0.0.1:8080/api/core/connection/connect".into(),
        created: "2026-05-01T09:59:59.000Z".into(),
        close_code: None,
        close_reason: None,
    };
    c.bench_function("serde_json::to_string(&ConnectionRecord)", |b| {
        b.iter(|| serde_json::to_string(black_box(&record)).unwrap())
    });
}

criterion_group!(benches, routing, tokens, records);
criterion_main!(benches);
