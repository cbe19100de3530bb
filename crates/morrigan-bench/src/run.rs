//! A run: the parent spawns worker processes (itself, re-executed with the hidden `worker`
//! subcommand), steps them through the phases in lockstep over stdin/stdout, samples the
//! server's `/proc` between phases and aggregates.
//!
//! Phases: `provision` → `connect` (if n > 0) → `hold` (if hold > 0) → `send` | `churn`.
//! Each worker waits for a `go` line before each phase and answers with one JSON line.

use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio_util::sync::CancellationToken;

use crate::load::{self, ChurnResult, ConnectResult, Driver, Observed, SendResult, Target};
use crate::stats::Failures;
use crate::sys;
use crate::tracked;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    Connect,
    Send,
    Churn,
    ClusterSend,
    /// Offline devices with queued tracked messages all reconnect: the outbox drain.
    Outbox,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Connect => "connect",
            Scenario::Send => "send",
            Scenario::Churn => "churn",
            Scenario::ClusterSend => "cluster-send",
            Scenario::Outbox => "outbox",
        }
    }
}

/// Everything a worker needs, passed as JSON on its command line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    pub scenario: Scenario,
    pub target: Target,
    /// Connections to open and hold (all workers together).
    pub connections: u64,
    /// Concurrent connects (all workers together).
    pub concurrency: usize,
    /// Concurrent REST senders or churn loops (all workers together).
    pub load_concurrency: usize,
    pub hold_s: f64,
    pub duration_s: f64,
    /// Source addresses 127.0.0.1 ..= 127.0.0.<sources>.
    pub sources: u8,
    pub run_id: String,
    pub workers: usize,
    pub worker: usize,
    /// Outbox: messages queued per device before it reconnects.
    #[serde(default)]
    pub per_client: u32,
}

impl Spec {
    pub fn phases(&self) -> Vec<&'static str> {
        let mut p = vec!["provision"];
        if self.scenario == Scenario::Outbox {
            return vec!["provision", "queue", "drain"];
        }
        if self.connections > 0 {
            p.push("connect");
        }
        if self.hold_s > 0.0 && self.connections > 0 {
            p.push("hold");
        }
        match self.scenario {
            Scenario::Send | Scenario::ClusterSend => p.push("send"),
            Scenario::Churn => p.push("churn"),
            Scenario::Connect | Scenario::Outbox => {}
        }
        p
    }

    fn share(&self, total: u64) -> u64 {
        let k = self.workers as u64;
        total / k + u64::from((self.worker as u64) < total % k)
    }
}

/// The hidden `worker` subcommand.
pub async fn worker(spec: Spec) -> Result<()> {
    sys::raise_nofile();
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    let sources: Vec<Ipv4Addr> = (1..=spec.sources.max(1))
        .map(|i| Ipv4Addr::new(127, 0, 0, i))
        .collect();
    let rest_source = sources[spec.worker % sources.len()];
    let n = spec.share(spec.connections);
    let loops = spec.share(spec.load_concurrency as u64).max(1) as usize;
    let conc = spec.share(spec.concurrency as u64).max(1) as usize;
    let obs = Arc::new(Observed::default());
    let stop = CancellationToken::new();
    let mut driver: Option<Arc<Driver>> = None;
    let mut identities = Vec::new();
    let mut client_ids = Vec::new();
    let mut churn_identities = Vec::new();
    let mut held_ids = Arc::new(Vec::new());
    for phase in spec.phases() {
        if stdin.next_line().await?.as_deref() != Some("go") {
            return Ok(());
        }
        let t = Instant::now();
        let result: Value = match phase {
            "provision" => {
                let d = Arc::new(
                    Driver::login(spec.target.clone(), sources.clone(), Some(rest_source)).await?,
                );
                let ids: Vec<String> = (0..n)
                    .map(|i| format!("bench-{}-{}-{i}", spec.run_id, spec.worker))
                    .collect();
                identities = d.provision(ids.clone(), 64).await?;
                client_ids = ids;
                if spec.scenario == Scenario::Churn {
                    let ids: Vec<String> = (0..loops)
                        .map(|i| format!("bench-{}-{}-churn-{i}", spec.run_id, spec.worker))
                        .collect();
                    churn_identities = d.provision(ids, 64).await?;
                }
                driver = Some(d);
                json!({"ok": identities.len() + churn_identities.len(), "elapsed_s": t.elapsed().as_secs_f64()})
            }
            "connect" => {
                let d = driver.as_ref().expect("provisioned");
                let (r, ids) = load::connect_phase(d, &identities, conc, &obs, &stop).await;
                held_ids = Arc::new(ids);
                serde_json::to_value(r)?
            }
            "hold" => {
                let before = obs.drops.lock().unwrap().clone();
                tokio::time::sleep(Duration::from_secs_f64(spec.hold_s)).await;
                let after = obs.drops.lock().unwrap().clone();
                let mut during = Failures::default();
                for (k, v) in &after.0 {
                    let b = before.0.get(k).copied().unwrap_or(0);
                    if *v > b {
                        *during.0.entry(k.clone()).or_default() += v - b;
                    }
                }
                json!({"held": obs.held.load(std::sync::atomic::Ordering::Relaxed), "drops": during, "elapsed_s": t.elapsed().as_secs_f64()})
            }
            "send" => {
                let d = driver.as_ref().expect("provisioned");
                let r = load::send_phase(
                    d,
                    held_ids.clone(),
                    loops,
                    Duration::from_secs_f64(spec.duration_s),
                    &obs,
                )
                .await;
                serde_json::to_value(r)?
            }
            "queue" => {
                let d = driver.as_ref().expect("provisioned");
                let r = tracked::queue_phase(d, &client_ids, spec.per_client, loops).await;
                serde_json::to_value(r)?
            }
            "drain" => {
                let d = driver.as_ref().expect("provisioned");
                let r =
                    tracked::drain_phase(d, &identities, spec.per_client, conc, &obs, &stop).await;
                serde_json::to_value(r)?
            }
            "churn" => {
                let d = driver.as_ref().expect("provisioned");
                let r = load::churn_phase(
                    d,
                    &churn_identities,
                    Duration::from_secs_f64(spec.duration_s),
                )
                .await;
                serde_json::to_value(r)?
            }
            _ => unreachable!(),
        };
        let line = serde_json::to_string(&json!({"phase": phase, "result": result}))? + "\n";
        out.write_all(line.as_bytes()).await?;
        out.flush().await?;
    }
    // Wait for the parent's last word, then close every held socket (1000).
    let _ = stdin.next_line().await;
    let total_drops = obs.drops.lock().unwrap().clone();
    stop.cancel();
    let deadline = Instant::now() + Duration::from_secs(10);
    while obs.held.load(std::sync::atomic::Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let line =
        serde_json::to_string(&json!({"phase": "end", "result": {"drops": total_drops}}))? + "\n";
    out.write_all(line.as_bytes()).await?;
    out.flush().await?;
    Ok(())
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    lines: tokio::io::Lines<BufReader<ChildStdout>>,
}

impl Worker {
    async fn go(&mut self) -> Result<()> {
        self.stdin.write_all(b"go\n").await?;
        self.stdin.flush().await?;
        Ok(())
    }
    async fn answer(&mut self) -> Result<Value> {
        loop {
            let line = self
                .lines
                .next_line()
                .await?
                .ok_or_else(|| anyhow!("worker exited early"))?;
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                return Ok(v["result"].clone());
            }
        }
    }
}

/// Options of a run as given on the command line.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub spec: Spec,
    pub server_pid: Option<u32>,
    pub label: String,
    /// The whole run is cut off after this.
    pub max_time: Duration,
}

fn sample(pid: Option<u32>) -> sys::ProcSample {
    pid.and_then(sys::sample).unwrap_or_default()
}

fn bench_cpu(workers: &[Worker]) -> u64 {
    workers
        .iter()
        .filter_map(|w| w.child.id())
        .filter_map(sys::sample)
        .map(|s| s.cpu_us)
        .sum()
}

/// Runs every phase across the workers; returns the report (also printed).
pub async fn run(opts: RunOptions) -> Result<Value> {
    match tokio::time::timeout(opts.max_time, run_inner(opts.clone())).await {
        Ok(r) => r,
        Err(_) => Err(anyhow!(
            "run exceeded --max-time {:?}; stopped",
            opts.max_time
        )),
    }
}

async fn run_inner(opts: RunOptions) -> Result<Value> {
    let exe = std::env::current_exe()?;
    let spec = opts.spec.clone();
    let mut workers = Vec::new();
    for k in 0..spec.workers {
        let mut s = spec.clone();
        s.worker = k;
        let mut child = Command::new(&exe)
            .arg("worker")
            .arg("--spec")
            .arg(serde_json::to_string(&s)?)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("spawning a worker")?;
        let stdin = child.stdin.take().expect("piped");
        let lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        workers.push(Worker {
            child,
            stdin,
            lines,
        });
    }
    let pid = opts.server_pid;
    let start_sample = sample(pid);
    let mut phases = Vec::new();
    let mut summary = json!({});
    for phase in spec.phases() {
        let s0 = sample(pid);
        let b0 = bench_cpu(&workers);
        let t0 = Instant::now();
        for w in &mut workers {
            w.go().await?;
        }
        let mut answers = Vec::new();
        for w in &mut workers {
            answers.push(w.answer().await?);
        }
        let wall = t0.elapsed().as_secs_f64();
        let s1 = sample(pid);
        let b1 = bench_cpu(&workers);
        let cpu_us = s1.cpu_us.saturating_sub(s0.cpu_us);
        let mut report = json!({
            "phase": phase,
            "wall_s": wall,
            "server_cpu_us": cpu_us,
            "server_cpu_pct": cpu_us as f64 / (wall * 1e6) * 100.0,
            "bench_cpu_pct": b1.saturating_sub(b0) as f64 / (wall * 1e6) * 100.0,
            "server_rss_kib_before": s0.rss_kib,
            "server_rss_kib_after": s1.rss_kib,
        });
        let ops = merge_phase(phase, &answers, &mut report)?;
        if ops > 0 && pid.is_some() {
            report["server_cpu_us_per_op"] = json!(cpu_us as f64 / ops as f64);
            report["rate_per_s"] = json!(ops as f64 / wall);
        } else if ops > 0 {
            report["rate_per_s"] = json!(ops as f64 / wall);
        }
        if phase == "connect" && ops > 0 && pid.is_some() {
            report["server_rss_kib_per_conn"] =
                json!((s1.rss_kib as f64 - s0.rss_kib as f64) / ops as f64);
        }
        if phase == "hold" {
            let held = report["held"].as_u64().unwrap_or(0);
            if held > 0 && pid.is_some() {
                // Percent of one core per 10,000 held connections.
                report["server_pct_core_per_10k"] =
                    json!(cpu_us as f64 / (wall * 1e6) * 100.0 / (held as f64 / 10_000.0));
                report["server_rss_kib_per_conn"] = json!(
                    (s1.rss_kib as f64 - summary["rss_before_connect_kib"].as_f64().unwrap_or(0.0))
                        / held as f64
                );
            }
        }
        if phase == "connect" {
            summary["rss_before_connect_kib"] = json!(s0.rss_kib);
        }
        print_phase(&report);
        phases.push(report);
    }
    for w in &mut workers {
        w.go().await?;
    }
    let mut end_drops = Failures::default();
    for w in &mut workers {
        if let Ok(v) = w.answer().await
            && let Ok(d) = serde_json::from_value::<Failures>(v["drops"].clone())
        {
            end_drops.merge(&d);
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), w.child.wait()).await;
    }
    let end = sample(pid);
    let report = json!({
        "label": opts.label,
        "scenario": spec.scenario.name(),
        "target": spec.target.url,
        "connections": spec.connections,
        "concurrency": spec.concurrency,
        "load_concurrency": spec.load_concurrency,
        "workers": spec.workers,
        "sources": spec.sources,
        "server_pid": pid,
        "server_rss_kib_start": start_sample.rss_kib,
        "server_rss_kib_end": end.rss_kib,
        "drops_total": end_drops,
        "phases": phases,
    });
    Ok(report)
}

/// Merges the workers' answers for one phase into `report`; returns the operation count.
fn merge_phase(phase: &str, answers: &[Value], report: &mut Value) -> Result<u64> {
    match phase {
        "provision" => {
            let ok: u64 = answers.iter().map(|a| a["ok"].as_u64().unwrap_or(0)).sum();
            report["ok"] = json!(ok);
            Ok(0)
        }
        "connect" | "queue" | "drain" => {
            let mut m = ConnectResult::default();
            for a in answers {
                let r: ConnectResult = serde_json::from_value(a.clone())?;
                m.ok += r.ok;
                m.failures.merge(&r.failures);
                m.latency.merge(&r.latency);
            }
            report["ok"] = json!(m.ok);
            report["failures"] = json!(m.failures);
            report["latency"] = json!(m.latency.summary());
            Ok(m.ok)
        }
        "hold" => {
            let mut held = 0;
            let mut drops = Failures::default();
            for a in answers {
                held += a["held"].as_u64().unwrap_or(0);
                drops.merge(&serde_json::from_value(a["drops"].clone())?);
            }
            report["held"] = json!(held);
            report["drops"] = json!(drops.total());
            report["drops_by_kind"] = json!(drops);
            Ok(0)
        }
        "send" => {
            let mut m = SendResult::default();
            for a in answers {
                let r: SendResult = serde_json::from_value(a.clone())?;
                m.ok += r.ok;
                m.lost += r.lost;
                m.failures.merge(&r.failures);
                m.latency.merge(&r.latency);
                m.e2e.merge(&r.e2e);
            }
            report["ok"] = json!(m.ok);
            report["lost"] = json!(m.lost);
            report["failures"] = json!(m.failures);
            report["latency"] = json!(m.latency.summary());
            report["e2e"] = json!(m.e2e.summary());
            Ok(m.ok)
        }
        "churn" => {
            let mut m = ChurnResult::default();
            for a in answers {
                let r: ChurnResult = serde_json::from_value(a.clone())?;
                m.ok += r.ok;
                m.failures.merge(&r.failures);
                m.latency.merge(&r.latency);
            }
            report["ok"] = json!(m.ok);
            report["failures"] = json!(m.failures);
            report["latency"] = json!(m.latency.summary());
            Ok(m.ok)
        }
        _ => Ok(0),
    }
}

fn print_phase(r: &Value) {
    let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
    let mut line = format!(
        "{:<9} {:>8.2}s  ok {:>7}",
        r["phase"].as_str().unwrap_or(""),
        f("wall_s"),
        r["ok"].as_u64().or(r["held"].as_u64()).unwrap_or(0)
    );
    if r.get("rate_per_s").is_some() {
        line += &format!("  {:>8.0}/s", f("rate_per_s"));
    }
    if let Some(l) = r.get("latency") {
        line += &format!(
            "  p50 {:.1} p99 {:.1} max {:.1} ms",
            l["p50_ms"].as_f64().unwrap_or(0.0),
            l["p99_ms"].as_f64().unwrap_or(0.0),
            l["max_ms"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(l) = r.get("e2e") {
        line += &format!(
            "  e2e p50 {:.1} p99 {:.1} ms",
            l["p50_ms"].as_f64().unwrap_or(0.0),
            l["p99_ms"].as_f64().unwrap_or(0.0)
        );
    }
    if r.get("server_cpu_us_per_op").is_some() {
        line += &format!("  server {:.0} µs/op", f("server_cpu_us_per_op"));
    }
    if r.get("server_rss_kib_per_conn").is_some() {
        line += &format!("  {:.2} KiB/conn", f("server_rss_kib_per_conn"));
    }
    if r.get("server_pct_core_per_10k").is_some() {
        line += &format!("  {:.3} %core/10k", f("server_pct_core_per_10k"));
    }
    line += &format!(
        "  server cpu {:.0}% rss {} KiB  bench cpu {:.0}%",
        f("server_cpu_pct"),
        r["server_rss_kib_after"],
        f("bench_cpu_pct")
    );
    if let Some(fl) = r.get("failures").and_then(|v| v.as_object())
        && !fl.is_empty()
    {
        line += &format!("  failures {}", Value::Object(fl.clone()));
    }
    if let Some(d) = r.get("drops")
        && d.as_u64() != Some(0)
    {
        line += &format!("  drops {}", r["drops_by_kind"]);
    }
    if let Some(l) = r.get("lost")
        && l.as_u64() != Some(0)
    {
        line += &format!("  LOST {l}");
    }
    eprintln!("{line}");
}
