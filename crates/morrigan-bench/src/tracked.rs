//! Tracked messaging under load: held sockets answer tracked frames (`connection.ack`, or
//! `connection.reply` to a `bench.call`), and the outbox scenario queues messages for offline
//! devices, then connects them all at once and times the drain.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::load::{ConnectResult, Driver, Observed, answer, hold};

/// How long a reconnected device waits for its whole queue.
const DRAIN_WAIT: Duration = Duration::from_secs(120);

/// Queues `per_client` tracked messages (ttl one hour) for each offline client, at
/// `concurrency`; `ok` counts messages queued.
pub async fn queue_phase(
    driver: &Arc<Driver>,
    clients: &[String],
    per_client: u32,
    concurrency: usize,
) -> ConnectResult {
    let start = Instant::now();
    let sends = clients
        .iter()
        .flat_map(|c| (0..per_client).map(move |k| (c.clone(), k)));
    let outcomes: Vec<(Result<(), String>, u64)> = futures_util::stream::iter(sends)
        .map(|(client, k)| {
            let driver = driver.clone();
            async move {
                let t = Instant::now();
                let r = queue_one(&driver, &client, k).await;
                (r, t.elapsed().as_micros() as u64)
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    tally(outcomes, start)
}

async fn queue_one(driver: &Driver, client: &str, k: u32) -> Result<(), String> {
    let resp = driver
        .http
        .post(format!(
            "{}/api/core/client/{client}/send?track=ack&ttl=3600",
            driver.target.url
        ))
        .bearer_auth(&driver.user_token)
        .header("Content-Type", "application/json")
        .body(format!(r#"{{"type":"bench.queued","k":{k}}}"#))
        .send()
        .await
        .map_err(|_| "queue-io".to_string())?;
    if resp.status().as_u16() != 202 {
        return Err(format!("queue-http-{}", resp.status().as_u16()));
    }
    let _ = resp.bytes().await;
    Ok(())
}

/// Connects every identity at `concurrency`; each device reads its `per_client` queued
/// frames, acknowledging each, then is held until `stop`. `ok` counts frames delivered;
/// `latency` is, per device, connect start → its last queued frame.
pub async fn drain_phase(
    driver: &Arc<Driver>,
    identities: &[String],
    per_client: u32,
    concurrency: usize,
    obs: &Arc<Observed>,
    stop: &CancellationToken,
) -> ConnectResult {
    let start = Instant::now();
    let outcomes: Vec<(Result<u64, String>, u64)> =
        futures_util::stream::iter(identities.iter().cloned())
            .map(|identity| {
                let (driver, obs, stop) = (driver.clone(), obs.clone(), stop.clone());
                async move {
                    let t = Instant::now();
                    let r = drain_one(&driver, &identity, per_client, obs, stop).await;
                    (r, t.elapsed().as_micros() as u64)
                }
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
    let mut res = ConnectResult {
        elapsed_s: start.elapsed().as_secs_f64(),
        ..Default::default()
    };
    for (r, us) in outcomes {
        match r {
            Ok(frames) => {
                res.ok += frames;
                res.latency.record_us(us);
            }
            Err(k) => res.failures.add(k),
        }
    }
    res
}

async fn drain_one(
    driver: &Driver,
    identity: &str,
    per_client: u32,
    obs: Arc<Observed>,
    stop: CancellationToken,
) -> Result<u64, String> {
    let (mut ws, _) = driver.connect(identity).await?;
    let mut got = 0u64;
    let deadline = tokio::time::Instant::now() + DRAIN_WAIT;
    while got < u64::from(per_client) {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err("drain-timeout".into()),
            Ok(Some(Ok(Message::Text(t)))) => {
                if let Some(answer) = answer(&t) {
                    got += 1;
                    ws.send(Message::Text(answer.into()))
                        .await
                        .map_err(|_| "drain-ack-failed".to_string())?;
                }
            }
            Ok(Some(Ok(_))) => {}
            Ok(_) => return Err("drain-closed".into()),
        }
    }
    tokio::spawn(hold(ws, obs, stop));
    Ok(got)
}

fn tally(outcomes: Vec<(Result<(), String>, u64)>, start: Instant) -> ConnectResult {
    let mut res = ConnectResult {
        elapsed_s: start.elapsed().as_secs_f64(),
        ..Default::default()
    };
    for (r, us) in outcomes {
        match r {
            Ok(()) => {
                res.ok += 1;
                res.latency.record_us(us);
            }
            Err(k) => res.failures.add(k),
        }
    }
    res
}
