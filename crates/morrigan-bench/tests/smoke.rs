//! A quick, bounded smoke test: a handful of connections and sends against the in-process
//! bare floor server. Real load runs only through the binary and `scripts/bench.sh`.

use std::sync::Arc;
use std::time::Duration;

use morrigan_bench::load::{self, Driver, Observed, Target};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn bare_connect_send_churn() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(morrigan_bench::bare::serve(listener, stop.clone()));
    let target = Target {
        url,
        send_url: None,
        admin_name: "admin".into(),
        admin_password: "x".into(),
        track: None,
    };
    let driver = Arc::new(
        Driver::login(target, vec![std::net::Ipv4Addr::LOCALHOST], None)
            .await
            .unwrap(),
    );
    let ids: Vec<String> = (0..5).map(|i| format!("smoke-{i}")).collect();
    let identities = driver.provision(ids, 4).await.unwrap();
    let obs = Arc::new(Observed::default());
    let held = CancellationToken::new();
    let (r, conns) = load::connect_phase(&driver, &identities, 3, &obs, &held).await;
    assert_eq!(r.ok, 5, "failures: {:?}", r.failures);
    assert_eq!(conns.len(), 5);
    let s = load::send_phase(
        &driver,
        Arc::new(conns),
        2,
        Duration::from_millis(200),
        &obs,
    )
    .await;
    assert!(s.ok > 0, "failures: {:?}", s.failures);
    assert_eq!(s.lost, 0);
    assert_eq!(s.e2e.count(), s.ok);
    held.cancel();
    let c = load::churn_phase(&driver, &identities[..2], Duration::from_millis(200)).await;
    assert!(c.ok > 0, "failures: {:?}", c.failures);
    stop.cancel();
}

#[tokio::test]
async fn morrigan_connect_and_send() {
    let dir = tempfile::tempdir().unwrap();
    let mut config =
        morrigan_server::Config::new("127.0.0.1:0".parse().unwrap(), dir.path().into());
    config.admin_password = Some("smoke-password-123".into());
    let server = morrigan_server::Server::builder(config)
        .build()
        .await
        .unwrap();
    let url = format!("http://{}", server.local_addr());
    let stop = CancellationToken::new();
    let s = stop.clone();
    let running = tokio::spawn(server.run(async move { s.cancelled().await }));
    let target = Target {
        url,
        send_url: None,
        admin_name: "admin".into(),
        admin_password: "smoke-password-123".into(),
        track: None,
    };
    let driver = Arc::new(
        Driver::login(target, vec![std::net::Ipv4Addr::LOCALHOST], None)
            .await
            .unwrap(),
    );
    let ids: Vec<String> = (0..4).map(|i| format!("smoke-{i}")).collect();
    let identities = driver.provision(ids, 4).await.unwrap();
    let obs = Arc::new(Observed::default());
    let held = CancellationToken::new();
    let (r, conns) = load::connect_phase(&driver, &identities, 2, &obs, &held).await;
    assert_eq!(r.ok, 4, "failures: {:?}", r.failures);
    let conns = Arc::new(conns);
    let s = load::send_phase(&driver, conns.clone(), 2, Duration::from_millis(200), &obs).await;
    assert!(s.ok > 0, "failures: {:?}", s.failures);
    assert_eq!(s.lost, 0);

    // Tracked sends: the held sockets answer, the REST calls wait for it.
    for track in ["ack", "reply"] {
        let mut target = driver.target.clone();
        target.track = Some(track.into());
        let tracked = Arc::new(
            Driver::login(target, vec![std::net::Ipv4Addr::LOCALHOST], None)
                .await
                .unwrap(),
        );
        let t =
            load::send_phase(&tracked, conns.clone(), 2, Duration::from_millis(200), &obs).await;
        assert!(t.ok > 0, "{track}: failures: {:?}", t.failures);
    }

    // The outbox: queued for offline devices, drained when they connect.
    let ids: Vec<String> = (0..2).map(|i| format!("smoke-offline-{i}")).collect();
    let identities = driver.provision(ids.clone(), 2).await.unwrap();
    let q = morrigan_bench::tracked::queue_phase(&driver, &ids, 3, 2).await;
    assert_eq!(q.ok, 6, "failures: {:?}", q.failures);
    let d = morrigan_bench::tracked::drain_phase(&driver, &identities, 3, 2, &obs, &held).await;
    assert_eq!(d.ok, 6, "failures: {:?}", d.failures);
    held.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), running).await;
}
