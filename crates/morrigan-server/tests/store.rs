//! The store backends behind the same trait: the heartbeat batch, token consumption, node
//! reaping and the guard on the last full identity, on SQLite and (with
//! `MORRIGAN_TEST_POSTGRES_URL`) on a fresh PostgreSQL database.

mod common;

use std::sync::Arc;

use futures_util::future::join_all;
use morrigan_protocol::records::ConnectionRecord;
use morrigan_server::store::postgres::PgStore;
use morrigan_server::store::sqlite::SqliteStore;
use morrigan_server::store::{
    CloseInfo, Heartbeat, IdentityChange, IdentityRow, NodeRow, Proof, Result, Store, TokenKind,
    TokenRow,
};

const FAR: &str = "2999-01-01T00:00:00.000Z";
/// The identity token's recorded digest.
const ID_DIGEST: &str = "identity-digest";
const ID_PROOF: Proof<'static> = Proof::Digest(ID_DIGEST);

/// Records `record` as pending; its connection token's digest is `d-<token_id>`.
async fn issue(
    store: &dyn Store,
    record: &ConnectionRecord,
    identity: &str,
    proof: Proof<'_>,
) -> Result<bool> {
    let digest = format!("d-{}", record.token_id);
    store
        .issue_connection(record, &digest, FAR, identity, proof)
        .await
}

/// Accepts connection `id` with token `token`, proven by the digest `d-<token>`.
async fn accept(
    store: &dyn Store,
    id: &str,
    token: &str,
    at: &str,
) -> Result<Option<ConnectionRecord>> {
    let digest = format!("d-{token}");
    store
        .accept_connection(id, token, Proof::Digest(&digest), "node-1", "127.0.0.1", at)
        .await
}

fn pending(id: &str, token: &str) -> ConnectionRecord {
    ConnectionRecord {
        id: id.into(),
        client_id: "dev".into(),
        server_id: None,
        token_id: token.into(),
        client_address: None,
        connected: None,
        alive: false,
        open: true,
        last_heartbeat: None,
        disconnected: None,
        report_url: "http://127.0.0.1/api/core/connection/connect".into(),
        created: "2026-01-01T00:00:00.000Z".into(),
        close_code: None,
        close_reason: None,
    }
}

/// Client "dev" with the identity token "identity-1" (digest `ID_DIGEST`), issued at `now`.
async fn provision_dev(store: &dyn Store, now: &str) {
    store.upsert_client("dev", now).await.expect("client");
    store
        .insert_token(&TokenRow {
            id: "identity-1".into(),
            kind: TokenKind::Identity,
            subject: "dev".into(),
            issuer: "node-1".into(),
            issued: now.into(),
            expires: FAR.into(),
            digest: Some(ID_DIGEST.into()),
        })
        .await
        .expect("identity token");
}

/// A queued outgoing `test.ping` tracked with an ack.
fn acked_out<'a>(
    id: &'a str,
    client_id: &'a str,
    connection_id: Option<&'a str>,
    now: &'a str,
) -> morrigan_server::store::messages::NewMessage<'a> {
    use morrigan_protocol::messages::{Direction, MessageState, Track};
    morrigan_server::store::messages::NewMessage {
        id,
        client_id,
        connection_id,
        direction: Direction::Out,
        message_type: "test.ping",
        body: r#"{"type":"test.ping"}"#,
        track: Track::Ack,
        state: MessageState::Queued,
        created: now,
        expires: None,
        idempotency_key: None,
    }
}

async fn exercise(store: Arc<dyn Store>) {
    let far = FAR;
    provision_dev(store.as_ref(), "2026-01-01T00:00:00.000Z").await;
    // 450 concurrent exchanges and accepts: the hot path's multi-row batches, and many
    // heartbeat chunks (32 each) below.
    let issued = join_all((0..450).map(|i| {
        let store = store.clone();
        async move {
            issue(
                &*store,
                &pending(&format!("c{i}"), &format!("t{i}")),
                "identity-1",
                ID_PROOF,
            )
            .await
        }
    }))
    .await;
    assert!(issued.iter().all(|r| matches!(r, Ok(true))), "{issued:?}");
    let accepted = join_all((0..450).map(|i| {
        let store = store.clone();
        async move {
            accept(
                &*store,
                &format!("c{i}"),
                &format!("t{i}"),
                "2026-01-01T00:00:01.000Z",
            )
            .await
        }
    }))
    .await;
    for (i, a) in accepted.iter().enumerate() {
        let record = a.as_ref().expect("accept").as_ref().expect("accepted");
        assert_eq!(record.id, format!("c{i}"));
        assert_eq!(record.server_id.as_deref(), Some("node-1"));
    }
    // Single use: the same token again is refused.
    let again = accept(&*store, "c0", "t0", "2026-01-01T00:00:02.000Z")
        .await
        .expect("accept again");
    assert!(again.is_none());
    // One fresh token presented eight times at once (so in one batch): accepted exactly once.
    assert!(
        issue(&*store, &pending("race", "t-race"), "identity-1", ID_PROOF)
            .await
            .expect("issue race")
    );
    let racing = join_all((0..8).map(|_| {
        let store = store.clone();
        async move { accept(&*store, "race", "t-race", "2026-01-01T00:00:03.000Z").await }
    }))
    .await;
    let winners = racing.iter().filter(|r| matches!(r, Ok(Some(_)))).count();
    assert_eq!(winners, 1, "{racing:?}");
    // A wrong token for the record is refused.
    assert!(
        issue(
            &*store,
            &pending("wrong", "t-wrong"),
            "identity-1",
            ID_PROOF
        )
        .await
        .expect("issue wrong")
    );
    assert!(
        accept(&*store, "wrong", "t-other", "2026-01-01T00:00:03.000Z")
            .await
            .expect("accept wrong")
            .is_none()
    );
    // No pending record without a live identity token, or for a deprovisioned client.
    assert!(
        !issue(&*store, &pending("x1", "tx1"), "no-such-token", ID_PROOF)
            .await
            .expect("issue unknown token")
    );
    let mut stranger = pending("x2", "tx2");
    stranger.client_id = "stranger".into();
    assert!(
        !issue(&*store, &stranger, "identity-1", ID_PROOF)
            .await
            .expect("issue unknown client")
    );
    assert!(store.connection("x1").await.expect("read").is_none());
    assert!(store.connection("x2").await.expect("read").is_none());

    // Possession: a token whose digest is not the recorded one is refused at both steps; the
    // signature (checked by the caller) stands in for tokens recorded without a digest.
    assert!(
        !issue(
            &*store,
            &pending("x3", "tx3"),
            "identity-1",
            Proof::Digest("forged")
        )
        .await
        .expect("issue forged")
    );
    assert!(store.connection("x3").await.expect("read").is_none());
    assert!(
        issue(
            &*store,
            &pending("sig", "t-sig"),
            "identity-1",
            Proof::Signature
        )
        .await
        .expect("issue by signature")
    );
    let forged = store
        .accept_connection(
            "sig",
            "t-sig",
            Proof::Digest("d-forged"),
            "node-1",
            "127.0.0.1",
            "2026-01-01T00:00:03.000Z",
        )
        .await
        .expect("accept forged");
    assert!(forged.is_none());
    let signed = store
        .accept_connection(
            "sig",
            "t-sig",
            Proof::Signature,
            "node-1",
            "127.0.0.1",
            "2026-01-01T00:00:03.000Z",
        )
        .await
        .expect("accept by signature");
    assert!(signed.is_some());
    // A token recorded without a digest gets one, once.
    store
        .insert_token(&TokenRow {
            id: "identity-old".into(),
            kind: TokenKind::Identity,
            subject: "dev".into(),
            issuer: "node-1".into(),
            issued: "2026-01-01T00:00:00.000Z".into(),
            expires: far.into(),
            digest: None,
        })
        .await
        .expect("old identity token");
    assert!(
        !issue(&*store, &pending("x4", "tx4"), "identity-old", ID_PROOF)
            .await
            .expect("issue old by digest")
    );
    assert!(
        store
            .set_token_digest("identity-old", "old-digest")
            .await
            .expect("set")
    );
    assert!(
        !store
            .set_token_digest("identity-old", "again")
            .await
            .expect("set again")
    );
    let old = store
        .live_token("identity-old", "2026-01-01T00:00:00.000Z")
        .await
        .expect("read token")
        .expect("live");
    assert_eq!(old.digest.as_deref(), Some("old-digest"));
    assert!(
        issue(
            &*store,
            &pending("x4", "tx4"),
            "identity-old",
            Proof::Digest("old-digest")
        )
        .await
        .expect("issue old by its new digest")
    );

    let beats: Vec<Heartbeat> = (0..450)
        .map(|i| Heartbeat {
            connection_id: format!("c{i}"),
            alive: i % 2 == 0,
            last_heartbeat: (i % 3 != 0).then(|| format!("2026-01-01T00:01:{:02}.000Z", i % 60)),
        })
        .collect();
    store.record_heartbeats(&beats).await.expect("heartbeats");
    for i in [0usize, 1, 2, 31, 32, 33, 449] {
        let r = store
            .connection(&format!("c{i}"))
            .await
            .expect("read")
            .expect("record");
        assert_eq!(r.alive, i % 2 == 0, "alive of c{i}");
        let expected = if i % 3 != 0 {
            format!("2026-01-01T00:01:{:02}.000Z", i % 60)
        } else {
            "2026-01-01T00:00:01.000Z".to_string()
        };
        assert_eq!(r.last_heartbeat.as_deref(), Some(expected.as_str()), "c{i}");
    }
    // Closed records take no heartbeat.
    store
        .close_connection(
            "c2",
            &CloseInfo {
                at: "2026-01-01T00:02:00.000Z",
                code: 1000,
                reason: "bye",
            },
        )
        .await
        .expect("close");
    store
        .record_heartbeats(&[Heartbeat {
            connection_id: "c2".into(),
            alive: true,
            last_heartbeat: Some("2026-01-01T00:03:00.000Z".into()),
        }])
        .await
        .expect("heartbeat after close");
    let c2 = store.connection("c2").await.expect("read").expect("c2");
    assert!(!c2.open && !c2.alive);
    assert_eq!(c2.close_code, Some(1000));
    assert_eq!(c2.close_reason.as_deref(), Some("bye"));
    // Concurrent closes of one record: the first wins, the record keeps its code.
    let closes = join_all((0..4u16).map(|k| {
        let store = store.clone();
        async move {
            store
                .close_connection(
                    "c3",
                    &CloseInfo {
                        at: "2026-01-01T00:02:00.000Z",
                        code: 4000 + k,
                        reason: "racing",
                    },
                )
                .await
        }
    }))
    .await;
    assert_eq!(
        closes.iter().filter(|r| matches!(r, Ok(true))).count(),
        1,
        "{closes:?}"
    );
    let c3 = store.connection("c3").await.expect("read").expect("c3");
    assert!(!c3.open && c3.close_code.is_some_and(|c| (4000..4004).contains(&c)));

    // A lapsed lease is reaped once.
    let node = |id: &str, lease: &str| NodeRow {
        id: id.into(),
        public_url: "http://x".into(),
        version: "0".into(),
        started: "2026-01-01T00:00:00.000Z".into(),
        lease_expires: lease.into(),
        state: "running".into(),
    };
    store
        .register_node(&node("node-1", "2026-01-01T00:00:10.000Z"))
        .await
        .expect("node-1");
    store
        .register_node(&node("node-2", far))
        .await
        .expect("node-2");
    let now = "2026-01-01T00:05:00.000Z";
    let reaped = store.reap_nodes(now, "node-2").await.expect("reap");
    assert_eq!(reaped.len(), 1);
    assert!(
        store
            .reap_nodes(now, "node-2")
            .await
            .expect("reap again")
            .is_empty()
    );
    assert!(!store.renew_node("node-1", far).await.expect("renew lost"));

    last_full_identity_survives_concurrent_changes(&store).await;
}

fn identity_row(id: &str, functions: &[&str]) -> IdentityRow {
    IdentityRow {
        id: id.into(),
        name: id.into(),
        functions: functions.iter().map(|f| f.to_string()).collect(),
        password_hash: "hash".into(),
        created: "2026-01-01T00:00:00.000Z".into(),
        updated: "2026-01-01T00:00:00.000Z".into(),
    }
}

/// Two full identities, changed at once so that each change alone is allowed but both
/// together would leave none: exactly one change is made.
async fn last_full_identity_survives_concurrent_changes(store: &Arc<dyn Store>) {
    for round in 0..12 {
        // Each round its own set of functions, so only this round's pair holds all of it.
        let (f1, f2) = (format!("r{round}.a"), format!("r{round}.b"));
        let full = [f1.as_str(), f2.as_str()];
        let (x, y) = (format!("x{round}"), format!("y{round}"));
        for id in [&x, &y] {
            store
                .insert_identity(&identity_row(id, &full))
                .await
                .expect("insert");
        }
        let stripped = identity_row(&y, &full[..1]);
        let (rx, ry) = if round % 2 == 0 {
            tokio::join!(
                store.delete_identity(&x, &full),
                store.delete_identity(&y, &full)
            )
        } else {
            tokio::join!(
                store.delete_identity(&x, &full),
                store.update_identity(&stripped, &full)
            )
        };
        let outcomes = [rx.expect("x"), ry.expect("y")];
        let done = outcomes
            .iter()
            .filter(|o| **o == IdentityChange::Done)
            .count();
        assert_eq!(done, 1, "round {round}: {outcomes:?}");
        assert!(outcomes.contains(&IdentityChange::LastFull), "{outcomes:?}");
        let holders: Vec<_> = store
            .identities()
            .await
            .expect("identities")
            .into_iter()
            .filter(|i| full.iter().all(|f| i.functions.iter().any(|g| g == f)))
            .collect();
        assert_eq!(holders.len(), 1, "round {round}: {holders:?}");
        // The survivor can be neither deleted nor stripped; an unknown id is not found.
        let survivor = &holders[0];
        assert_eq!(
            store
                .delete_identity(&survivor.id, &full)
                .await
                .expect("delete"),
            IdentityChange::LastFull
        );
        let mut less = survivor.clone();
        less.functions.pop();
        assert_eq!(
            store.update_identity(&less, &full).await.expect("update"),
            IdentityChange::LastFull
        );
        assert_eq!(
            store
                .delete_identity("nobody", &full)
                .await
                .expect("delete"),
            IdentityChange::NotFound
        );
    }
}

#[tokio::test]
async fn sqlite_store() {
    let store = SqliteStore::connect("sqlite::memory:")
        .await
        .expect("sqlite");
    exercise(Arc::new(store)).await;
}

#[tokio::test]
async fn postgres_store() {
    on_postgres("store", exercise).await;
}

/// Runs `scenario` on a store over a fresh PostgreSQL database (named after `prefix`, dropped
/// afterwards); skipped without `MORRIGAN_TEST_POSTGRES_URL`.
async fn on_postgres<F, Fut>(prefix: &str, scenario: F)
where
    F: FnOnce(Arc<dyn Store>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let Some(base) = common::service_url("MORRIGAN_TEST_POSTGRES_URL") else {
        return;
    };
    let database = common::pg::Database::create(&base, prefix).await;
    {
        let store = PgStore::connect(&database.url).await.expect("postgres");
        scenario(Arc::new(store.clone())).await;
        store.pool().close().await;
    }
    database.drop_now().await;
}

/// Commits never run a checkpoint (`wal_autocheckpoint = 0`): a task copies the write-ahead
/// log into the database file every second, so the data reaches the database file without any
/// commit waiting for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_ahead_log_is_checkpointed_beside_the_writer() {
    use morrigan_server::store::ClientStore;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.db");
    let store = SqliteStore::open(&path).await.expect("sqlite");
    let db_size = || std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let before = db_size();
    let now = morrigan_protocol::time_format::now();
    for i in 0..2000 {
        store
            .upsert_client(&format!("client-{i:05}-{}", "x".repeat(64)), &now)
            .await
            .expect("upsert");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while db_size() <= before + 100_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "the database file did not grow: {} bytes (was {before})",
            db_size()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Under a steady stream of writes, on either writer (the connection hot path's batches or the
/// message writer's thread), the write-ahead log still starts over, so it stays about one
/// checkpoint period long. Before, it was checkpointed only beside the writers, which appended
/// meanwhile: the log never started over and grew for as long as the writes went on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_ahead_log_starts_over_under_steady_message_writes() {
    log_starts_over_under(|store, _| async move {
        let now = morrigan_protocol::time_format::now();
        let id = uuid::Uuid::now_v7().to_string();
        let m = acked_out(&id, "dev", None, &now);
        let committed = store.queue_message(&m).await.expect("queued");
        assert!(committed.wait().await.expect("committed"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_ahead_log_starts_over_under_steady_connection_writes() {
    log_starts_over_under(|store, i| async move {
        let record = pending(&format!("steady-{i}"), &format!("t-{i}"));
        let issued = issue(store.as_ref(), &record, "identity-1", ID_PROOF).await;
        assert!(issued.expect("issued"));
    })
    .await;
}

/// Runs `write(store, i)` for i = 0, 1, ... one after another on a fresh SQLite file, and
/// waits (15 s at most) for its write-ahead log to start over meanwhile.
async fn log_starts_over_under<F, Fut>(write: F)
where
    F: Fn(Arc<dyn Store>, u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&dir.path().join("m.db"))
            .await
            .expect("sqlite"),
    );
    provision_dev(store.as_ref(), &morrigan_protocol::time_format::now()).await;
    let (stop, written) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let writes = tokio::spawn({
        let (store, stop, written) = (store.clone(), stop.clone(), written.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                write(store.clone(), written.load(Ordering::Relaxed)).await;
                written.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    // The log's header counts the times it started over (its checkpoint sequence number).
    let wal = dir.path().join("m.db-wal");
    let starts = || {
        use std::io::Read;
        let mut header = [0u8; 16];
        let mut file = std::fs::File::open(&wal).ok()?;
        file.read_exact(&mut header).ok()?;
        Some(u32::from_be_bytes([
            header[12], header[13], header[14], header[15],
        ]))
    };
    while written.load(Ordering::Relaxed) < 50 {
        assert!(!writes.is_finished(), "the writes stopped");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let first = starts();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while starts() == first {
        assert!(
            std::time::Instant::now() < deadline && !writes.is_finished(),
            "the log never started over in 15 s of steady writes ({} of them)",
            written.load(Ordering::Relaxed)
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    writes.await.expect("writes");
}

/// A tracked message's writes: the record, the device's answer queued before the record's
/// commit was waited for (what a send to a socket held by this node does), a repeated answer,
/// a foreign id, and the written mark of a message already answered.
async fn message_writes(store: Arc<dyn Store>) {
    use morrigan_server::store::messages::{Answer, Settled};
    let now = morrigan_protocol::time_format::now();
    store.upsert_client("m-client", &now).await.expect("client");
    let mut answered = Vec::new();
    for i in 0..20 {
        let id = format!("m-{i:02}");
        let m = acked_out(&id, "m-client", Some("m-conn"), &now);
        let committed = store.queue_message(&m).await.expect("queued");
        // Answered while the insert may not be committed yet: it is applied after the insert.
        let settled = tokio::spawn({
            let (store, id, now) = (store.clone(), id.clone(), now.clone());
            async move {
                store
                    .settle_message(&id, "m-client", Answer::Ack, &now)
                    .await
            }
        });
        answered.push((id, committed, settled));
    }
    for (id, committed, settled) in answered {
        assert!(committed.wait().await.expect("committed"), "{id} inserted");
        match settled.await.expect("joined").expect("settled") {
            Settled::Updated(row) => assert_eq!(row.state, "acked", "{id}"),
            other => panic!("{id}: {other:?}"),
        }
        let row = store.message(&id).await.expect("read").expect("recorded");
        assert_eq!(row.state, "acked");
        assert_eq!(row.acked.as_deref(), Some(now.as_str()));
    }
    let again = store
        .settle_message("m-00", "m-client", Answer::Ack, &now)
        .await
        .expect("again");
    assert_eq!(again, Settled::Unchanged);
    let foreign = store
        .settle_message("m-00", "other-client", Answer::Ack, &now)
        .await
        .expect("foreign");
    assert_eq!(foreign, Settled::Unknown);
    // Answered already: the written mark changes nothing.
    let marked = store
        .mark_written("m-01", "m-conn", &now)
        .await
        .expect("mark");
    assert_eq!(marked, None);
}

#[tokio::test]
async fn message_writes_on_sqlite_files_and_in_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = SqliteStore::open(&dir.path().join("m.db"))
        .await
        .expect("sqlite");
    message_writes(Arc::new(file)).await;
    let memory = SqliteStore::connect("sqlite::memory:")
        .await
        .expect("sqlite");
    message_writes(Arc::new(memory)).await;
}

#[tokio::test]
async fn message_writes_on_postgres() {
    on_postgres("store_messages", message_writes).await;
}
