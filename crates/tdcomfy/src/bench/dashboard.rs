//! `tdcomfy bench dashboard`: what open dashboards and a Prometheus scraper cost the broker.
//!
//! A real `tdcomfy serve` child runs a steady job load (submit, lease, progress heartbeats,
//! result) twice for the same time: once alone, once with N simulated dashboards and a scrape of
//! `/metrics` every second. The broker's CPU time (utime + stime from `/proc`) over each window is
//! the figure; the difference is what watching costs.
//!
//! A simulated dashboard does what `crates/broker/dashboard/app.js` does over the network: it
//! holds `/events?batch_ms=200` open and reads every event, re-reads the queue when a job joins or leaves it
//! (at most every 5 s), reads `/health` after a state change and every 2 s (at most once per 2 s
//! in all) and `/workflows` every 10 s, and downloads input frames (of running and finished
//! jobs) and results (of done jobs) one at a time, newest first, at most one a second,
//! skipping jobs no longer among the 20 finished cards the page keeps.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::time::Instant;

use super::{ChildServer, noise_png};
use crate::sse::JobEvents;

/// Options of the dashboard cost benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct DashboardBenchArgs {
    /// Jobs per second submitted and run.
    #[arg(long, default_value_t = 20.0)]
    pub jobs_per_second: f64,
    /// Open dashboards during the second window.
    #[arg(long, default_value_t = 50)]
    pub dashboards: usize,
    /// Seconds of each measured window.
    #[arg(long, default_value_t = 20.0)]
    pub seconds: f64,
    /// Progress heartbeats per job (each is one `progress` event).
    #[arg(long, default_value_t = 4)]
    pub progress_steps: u32,
}

/// Counters of the load, shared by its tasks.
#[derive(Default)]
struct Counts {
    jobs_done: AtomicU64,
    events_read: AtomicU64,
    dashboard_requests: AtomicU64,
    scrapes: AtomicU64,
    scrape_bytes: AtomicU64,
    failures: AtomicU64,
}

/// CPU seconds (user + system) the process has used, from `/proc/{pid}/stat`.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).context("reading /proc (Linux only)")?;
    // Fields after the command name (which may hold spaces) start at the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("odd /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the ')'.
    let ticks: f64 = fields
        .get(11)
        .and_then(|v| v.parse().ok())
        .zip(fields.get(12).and_then(|v| v.parse().ok()))
        .map(|(u, s): (f64, f64)| u + s)
        .context("no utime/stime in /proc stat")?;
    // USER_HZ is 100 on every Linux this runs on (the kernel ABI fixes it for /proc).
    Ok(ticks / 100.0)
}

/// Runs the benchmark and prints the figures.
pub async fn run(args: DashboardBenchArgs) -> anyhow::Result<()> {
    let server = ChildServer::start(&["serve"], &[("RESULT_TTL", "0"), ("MAX_SUBSCRIBERS", "1024")]).await?;
    let base = server.base.clone();
    let pid = server.pid();
    let http = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    let counts = Arc::new(Counts::default());
    let stop = tokio_util::sync::CancellationToken::new();
    println!(
        "tdcomfy dashboard cost benchmark (release build recommended): {} jobs/s, {} dashboards + 1 scrape/s, {} s windows, broker pid {pid}",
        args.jobs_per_second, args.dashboards, args.seconds
    );

    let load = tokio::spawn(job_load(http.clone(), base.clone(), args.clone(), counts.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let window = Duration::from_secs_f64(args.seconds);

    let (cpu_alone, done_alone) = measure(pid, window, &counts).await?;

    let mut watchers = Vec::new();
    for _ in 0..args.dashboards {
        watchers.push(tokio::spawn(dashboard(http.clone(), base.clone(), counts.clone(), stop.clone())));
    }
    watchers.push(tokio::spawn(scraper(http.clone(), base.clone(), counts.clone(), stop.clone())));
    // The dashboards' first loads (lists, workflows) are not steady state.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let events_before = counts.events_read.load(Ordering::Relaxed);
    let requests_before = counts.dashboard_requests.load(Ordering::Relaxed);
    let scrapes_before = counts.scrapes.load(Ordering::Relaxed);
    let (cpu_watched, done_watched) = measure(pid, window, &counts).await?;
    let events = counts.events_read.load(Ordering::Relaxed) - events_before;
    let requests = counts.dashboard_requests.load(Ordering::Relaxed) - requests_before;
    let scrapes = counts.scrapes.load(Ordering::Relaxed) - scrapes_before;
    stop.cancel();
    for w in watchers {
        let _ = w.await;
    }
    let _ = load.await;

    let secs = window.as_secs_f64();
    let pct = |cpu: f64| cpu / secs * 100.0;
    println!("{:<52} {:.1} jobs/s", "jobs done, alone", done_alone as f64 / secs);
    println!("{:<52} {:.1} jobs/s", "jobs done, watched", done_watched as f64 / secs);
    println!("{:<52} {:.2} % of one core", "broker CPU, alone", pct(cpu_alone));
    println!("{:<52} {:.2} % of one core", "broker CPU, with dashboards and scrapes", pct(cpu_watched));
    println!(
        "{:<52} {:+.2} points of one core ({:+.1} % of the broker's own use)",
        "added by watching",
        pct(cpu_watched) - pct(cpu_alone),
        (cpu_watched / cpu_alone.max(1e-9) - 1.0) * 100.0
    );
    println!("{:<52} {:.0} events/s", "events read by the dashboards", events as f64 / secs);
    println!("{:<52} {:.0} requests/s", "dashboards' HTTP requests (lists, health, media)", requests as f64 / secs);
    let size = counts.scrape_bytes.load(Ordering::Relaxed) / counts.scrapes.load(Ordering::Relaxed).max(1);
    println!("{:<52} {:.1} /s, {} bytes each", "scrapes of /metrics", scrapes as f64 / secs, size);
    let failures = counts.failures.load(Ordering::Relaxed);
    anyhow::ensure!(failures == 0, "{failures} requests failed during the run");
    Ok(())
}

/// The broker's CPU seconds and the jobs done over `window`.
async fn measure(pid: u32, window: Duration, counts: &Counts) -> anyhow::Result<(f64, u64)> {
    let (cpu0, done0) = (cpu_seconds(pid)?, counts.jobs_done.load(Ordering::Relaxed));
    tokio::time::sleep(window).await;
    Ok((cpu_seconds(pid)? - cpu0, counts.jobs_done.load(Ordering::Relaxed) - done0))
}

/// Submits `jobs_per_second` and runs each as a worker would: lease, heartbeats with progress,
/// a small result.
async fn job_load(
    http: reqwest::Client,
    base: String,
    args: DashboardBenchArgs,
    counts: Arc<Counts>,
    stop: tokio_util::sync::CancellationToken,
) {
    let png = Arc::new(noise_png(64, 64));
    let result = Arc::new(vec![0u8; 16 * 1024]);
    // Enough lease loops that a job never waits for one.
    for w in 0..4 {
        let (http, base, counts, stop, result) =
            (http.clone(), base.clone(), counts.clone(), stop.clone(), result.clone());
        let steps = args.progress_steps;
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if run_one(&http, &base, &format!("bench-{w}"), steps, &result).await.is_err() {
                    counts.failures.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                counts.jobs_done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.jobs_per_second));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while !stop.is_cancelled() {
        tick.tick().await;
        let (http, base, png, counts) = (http.clone(), base.clone(), png.clone(), counts.clone());
        tokio::spawn(async move {
            let form = reqwest::multipart::Form::new()
                .part("image", reqwest::multipart::Part::bytes(png.to_vec()).file_name("frame.png"))
                .text("prompt", "dashboard benchmark");
            match http.post(format!("{base}/jobs")).multipart(form).send().await {
                Ok(r) if r.status() == 200 => {}
                _ => {
                    counts.failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
}

/// One job through a worker's calls; `Ok` without a job when the lease wait ended empty.
async fn run_one(http: &reqwest::Client, base: &str, worker: &str, steps: u32, result: &[u8]) -> anyhow::Result<()> {
    let resp = http
        .post(format!("{base}/worker/lease"))
        .json(&serde_json::json!({"worker_id": worker, "wait": 5}))
        .send()
        .await?;
    if resp.status() == 204 {
        return Ok(());
    }
    anyhow::ensure!(resp.status() == 200, "lease answered {}", resp.status());
    let lease: serde_json::Value = resp.json().await?;
    let id = lease["job"]["job_id"].as_str().context("job id")?.to_owned();
    let token = lease["job"]["lease_token"].as_str().context("lease token")?.to_owned();
    for step in 1..=steps {
        let progress = serde_json::json!({"value": step as f64 / (steps + 1) as f64, "step": step, "max_steps": steps});
        let r = http
            .post(format!("{base}/worker/jobs/{id}/heartbeat"))
            .json(&serde_json::json!({"lease_token": token, "progress": progress}))
            .send()
            .await?;
        anyhow::ensure!(r.status() == 200, "heartbeat answered {}", r.status());
    }
    let r = http
        .put(format!("{base}/worker/jobs/{id}/result"))
        .header("lease-token", &token)
        .header("content-type", "video/mp4")
        .header("comfy-execution-ms", "40")
        .body(result.to_vec())
        .send()
        .await?;
    anyhow::ensure!(r.status() == 200, "result answered {}", r.status());
    Ok(())
}

/// One open dashboard page, as `app.js` behaves.
async fn dashboard(
    http: reqwest::Client,
    base: String,
    counts: Arc<Counts>,
    stop: tokio_util::sync::CancellationToken,
) {
    let get = |path: String| {
        let (http, counts) = (http.clone(), counts.clone());
        async move {
            match http.get(path).send().await {
                Ok(r) if r.status().is_success() || r.status() == 410 => {
                    // Read the body as the page does (a 410: a file gone while the card loaded).
                    let _ = r.bytes().await;
                    counts.dashboard_requests.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    counts.failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    };
    let Ok(resp) = http.get(format!("{base}/events?batch_ms=200")).send().await else {
        counts.failures.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let mut events = JobEvents::new(resp);
    for path in
        ["/jobs?status=queued&limit=500", "/jobs?status=running&limit=500", "/jobs?limit=30", "/workflows", "/health"]
    {
        get(format!("{base}{path}")).await;
    }
    let mut seen: HashSet<String> = HashSet::new();
    // Media wanted, newest last (the page's stack), and the finished jobs its cards still show.
    let mut wanted: Vec<(String, &'static str)> = Vec::new();
    let mut shown: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    let mut next_media = Instant::now();
    let mut queue_due: Option<Instant> = None;
    let mut health_due: Option<Instant> = None;
    let (mut queue_last, mut health_last) = (Instant::now(), Instant::now());
    let mut health_poll = tokio::time::interval(Duration::from_secs(2));
    let mut workflows_poll = tokio::time::interval(Duration::from_secs(10));
    let due = |last: Instant, every: Duration| (last + every).max(Instant::now() + Duration::from_millis(250));
    loop {
        let media_due = (!wanted.is_empty()).then_some(next_media);
        let next_due = [queue_due, health_due, media_due].into_iter().flatten().min();
        tokio::select! {
            _ = stop.cancelled() => return,
            ev = events.next_raw() => {
                let Ok(Some((name, data))) = ev else { return };
                counts.events_read.fetch_add(1, Ordering::Relaxed);
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&data) else { continue };
                let id = v["job_id"].as_str().unwrap_or_default().to_owned();
                if name == "queued" || name == "started" || name == "cancelled" {
                    queue_due.get_or_insert_with(|| due(queue_last, Duration::from_secs(5)));
                }
                if name != "progress" {
                    health_due.get_or_insert_with(|| due(health_last, Duration::from_secs(2)));
                }
                if name == "started" && seen.insert(id.clone()) {
                    wanted.push((id.clone(), "input"));
                }
                if name == "done" {
                    wanted.push((id.clone(), "result"));
                    shown.push_front(id);
                    shown.truncate(20);
                }
                if seen.len() > 1000 {
                    seen.clear();
                }
            }
            _ = async { tokio::time::sleep_until(next_due.unwrap_or_else(Instant::now)).await }, if next_due.is_some() => {
                let now = Instant::now();
                if queue_due.is_some_and(|t| t <= now) {
                    queue_due = None;
                    queue_last = now;
                    tokio::spawn(get(format!("{base}/jobs?status=queued&limit=500")));
                }
                if health_due.is_some_and(|t| t <= now) {
                    health_due = None;
                    health_last = now;
                    tokio::spawn(get(format!("{base}/health")));
                }
                if media_due.is_some_and(|t| t <= now) {
                    // Newest first; a finished job that left the 20 cards is skipped, as a
                    // running one that is still running or just finished is not.
                    while let Some((id, kind)) = wanted.pop() {
                        let on_page = kind == "input" || shown.contains(&id);
                        if on_page {
                            get(format!("{base}/jobs/{id}/{kind}")).await;
                            next_media = Instant::now() + Duration::from_secs(1);
                            break;
                        }
                    }
                    // The page's stack holds only cards still on it.
                    wanted.retain(|(id, kind)| *kind == "input" || shown.contains(id));
                    if wanted.len() > 40 {
                        wanted.drain(..wanted.len() - 40);
                    }
                }
            }
            _ = health_poll.tick() => {
                health_due.get_or_insert_with(|| due(health_last, Duration::from_secs(2)));
            }
            _ = workflows_poll.tick() => { tokio::spawn(get(format!("{base}/workflows"))); }
        }
    }
}

/// Prometheus: `GET /metrics` once a second.
async fn scraper(http: reqwest::Client, base: String, counts: Arc<Counts>, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while !stop.is_cancelled() {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match http.get(format!("{base}/metrics")).send().await {
            Ok(r) if r.status() == 200 => {
                let body = r.bytes().await.unwrap_or_default();
                counts.scrapes.fetch_add(1, Ordering::Relaxed);
                counts.scrape_bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
            }
            _ => {
                counts.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
