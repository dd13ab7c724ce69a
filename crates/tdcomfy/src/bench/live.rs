//! `tdcomfy bench live`: the live-use figures of issue 10, against real processes — one
//! `tdcomfy sim` child per simulated ComfyUI server and a `tdcomfy up` child (broker and worker)
//! leasing to all of them — with a fixed job time (the simulator's `SlowPassthrough` node, one
//! step of `--job-time` seconds, writing a PNG).
//!
//! - `duty`: GPU duty cycle with 2 TD-like clients (each keeps `--depth` jobs in flight: submit,
//!   follow, download, submit the next), PREFETCH=0 beside PREFETCH=1. Duty = the sum of ComfyUI's
//!   own execution times (history's `execution_start` to `execution_success`, the jobs'
//!   `timings.comfy_execution`) over the wall time from the first job's lease to the last job's
//!   result, on one server.
//! - `scale`: jobs per second with 4 servers against 1 (enough clients to keep every server fed).
//! - `staleness`: one producer submitting a frame every 1/60 s in `latest` mode on one stream:
//!   the age of the input frame when its result is on the client's disk, and frames superseded.
//! - `static`: the same producer sending one unchanged frame with `dedupe`: how many jobs ran on
//!   the GPU (not reused, not superseded).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;

use super::loadgen::quantile;
use super::{ChildServer, TempDir, fmt_ms, free_port};

/// Which figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LiveMode {
    /// GPU duty cycle, PREFETCH=0 and 1.
    Duty,
    /// Throughput with 4 servers against 1.
    Scale,
    /// Frame age in latest mode with a 60 fps producer.
    Staleness,
    /// A static scene with dedupe: GPU jobs.
    Static,
}

/// Options of the live benchmarks.
#[derive(Debug, Clone, clap::Args)]
pub struct LiveBenchArgs {
    /// Which figure to measure.
    #[arg(value_enum)]
    pub mode: LiveMode,
    /// Seconds each simulated job takes on the "GPU".
    #[arg(long, default_value_t = 1.0)]
    pub job_time: f64,
    /// Seconds each run lasts (jobs are submitted until then, and the run waits for them).
    #[arg(long, default_value_t = 20.0)]
    pub seconds: f64,
    /// Jobs each TD-like client keeps in flight (duty, scale).
    #[arg(long, default_value_t = 2)]
    pub depth: usize,
    /// Frames per second of the producer (staleness, static).
    #[arg(long, default_value_t = 60.0)]
    pub fps: f64,
    /// PREFETCH of the worker (scale, staleness, static; duty runs 0 and 1).
    #[arg(long, default_value_t = 1)]
    pub prefetch: usize,
}

/// A running pipeline: simulators and one `up`.
struct Live {
    _sims: Vec<tokio::process::Child>,
    _up: ChildServer,
    api: Api,
    _dir: TempDir,
}

/// The broker as a TD client sees it.
#[derive(Clone)]
struct Api {
    http: reqwest::Client,
    base: String,
}

impl Live {
    async fn start(servers: usize, prefetch: usize, job_time: f64) -> anyhow::Result<Live> {
        let dir = TempDir::new("tdcomfy-bench-live")?;
        let workflows = dir.0.join("workflows");
        std::fs::create_dir_all(&workflows)?;
        let graph = serde_json::json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
            "2": {"class_type": "SlowPassthrough", "inputs": {"images": ["1", 0], "steps": 1, "step_seconds": job_time, "send_preview": false}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "tdcomfy/bench-live"}}
        });
        std::fs::write(workflows.join("bench_live.json"), graph.to_string())?;
        let exe = std::env::current_exe().context("locating the tdcomfy binary")?;
        let http = reqwest::Client::new();
        let mut sims = Vec::new();
        let mut urls = Vec::new();
        for i in 0..servers {
            let port = free_port()?;
            let child = tokio::process::Command::new(&exe)
                .arg("sim")
                .env("COMFYUI_HOST", "127.0.0.1")
                .env("COMFYUI_PORT", port.to_string())
                .env("SIM_DATA_DIR", dir.0.join(format!("sim-{i}")))
                .env("RUST_LOG", "warn")
                .stdout(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("starting a simulator")?;
            sims.push(child);
            let url = format!("http://127.0.0.1:{port}");
            let mut up = false;
            for _ in 0..600 {
                if http.get(format!("{url}/system_stats")).send().await.is_ok_and(|r| r.status() == 200) {
                    up = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::ensure!(up, "simulator {i} did not answer within 30 s");
            urls.push(url);
        }
        let (urls, prefetch, workflows) =
            (urls.join(","), prefetch.to_string(), workflows.to_string_lossy().into_owned());
        let up = ChildServer::start(
            &["up"],
            &[
                ("COMFYUI_URLS", urls.as_str()),
                ("PREFETCH", prefetch.as_str()),
                ("WORKFLOWS_DIR", workflows.as_str()),
                ("DEFAULT_WORKFLOW", "bench_live"),
                ("MAX_QUEUE", "100000"),
            ],
        )
        .await?;
        // Every lease loop has looked at its server (preflight) before the clock starts.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let h: Value = http.get(format!("{}/health", up.base)).send().await?.json().await?;
            if h["workers"].as_array().map_or(0, |w| w.iter().filter(|w| w["state"] == "idle").count()) >= servers {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "the worker's loops did not become idle: {h}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let api = Api { http, base: up.base.clone() };
        Ok(Live { _sims: sims, _up: up, api, _dir: dir })
    }
}

impl Api {
    async fn submit(&self, frame: &[u8], prompt: &str, fields: &[(&str, &str)]) -> anyhow::Result<String> {
        let mut form = reqwest::multipart::Form::new()
            .part("image", reqwest::multipart::Part::bytes(frame.to_vec()).file_name("frame.png"))
            .text("prompt", prompt.to_owned());
        for (k, v) in fields {
            form = form.text(k.to_string(), v.to_string());
        }
        let resp = self.http.post(format!("{}/jobs", self.base)).multipart(form).send().await?;
        anyhow::ensure!(resp.status() == 200, "submit answered {}: {}", resp.status(), resp.text().await?);
        Ok(resp.json::<Value>().await?["job_id"].as_str().context("job_id")?.to_owned())
    }

    /// Follows a job (long-poll) until it is terminal.
    async fn until_terminal(&self, id: &str) -> anyhow::Result<Value> {
        let mut since = 0u64;
        loop {
            let job: Value =
                self.http.get(format!("{}/jobs/{id}?wait=30&since={since}", self.base)).send().await?.json().await?;
            if matches!(job["status"].as_str(), Some("done" | "error" | "cancelled")) {
                return Ok(job);
            }
            since = job["version"].as_u64().unwrap_or(0);
        }
    }

    /// Downloads a done job's result (as TD does before playing it).
    async fn download(&self, id: &str) -> anyhow::Result<usize> {
        let resp = self.http.get(format!("{}/jobs/{id}/result", self.base)).send().await?;
        anyhow::ensure!(resp.status() == 200, "result of {id}: {}", resp.status());
        Ok(resp.bytes().await?.len())
    }
}

/// Runs the benchmark and prints the figures.
pub async fn run(args: LiveBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.job_time > 0.0 && args.seconds > 0.0 && args.fps > 0.0, "times and fps must be positive");
    match args.mode {
        LiveMode::Duty => {
            println!(
                "tdcomfy live benchmark: GPU duty cycle, 1 simulated server, {} s jobs, 2 TD-like clients x {} jobs in flight, {} s",
                args.job_time, args.depth, args.seconds
            );
            for prefetch in [0, 1] {
                let live = Live::start(1, prefetch, args.job_time).await?;
                let r = clients(&live, 2, args.depth, args.seconds).await?;
                println!(
                    "PREFETCH={prefetch}: duty {:.2} %  ({} jobs, {:.2} s executing in {:.2} s wall, {:.2} jobs/s)",
                    100.0 * r.executing / r.wall,
                    r.jobs,
                    r.executing,
                    r.wall,
                    r.jobs as f64 / r.wall
                );
            }
        }
        LiveMode::Scale => {
            println!(
                "tdcomfy live benchmark: throughput, {} s jobs, PREFETCH={}, {} s per run",
                args.job_time, args.prefetch, args.seconds
            );
            let mut rates = Vec::new();
            for servers in [1, 4] {
                let live = Live::start(servers, args.prefetch, args.job_time).await?;
                // Enough TD-like clients that every server always has its next job.
                let r = clients(&live, 2 * servers, args.depth, args.seconds).await?;
                let rate = r.jobs as f64 / r.wall;
                println!(
                    "{servers} server(s): {rate:.3} jobs/s ({} jobs in {:.2} s; duty per server {:.2} %)",
                    r.jobs,
                    r.wall,
                    100.0 * r.executing / r.wall / servers as f64
                );
                rates.push(rate);
            }
            println!("4 servers / 1 server: {:.2}x", rates[1] / rates[0]);
        }
        LiveMode::Staleness => staleness(&args, false).await?,
        LiveMode::Static => staleness(&args, true).await?,
    }
    Ok(())
}

struct ClientsReport {
    jobs: usize,
    executing: f64,
    wall: f64,
}

/// `n` TD-like clients, each keeping `depth` jobs in flight for `seconds`; then waits for all.
async fn clients(live: &Live, n: usize, depth: usize, seconds: f64) -> anyhow::Result<ClientsReport> {
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let frame = Arc::new(super::noise_png(256, 160));
    let live = &live.api;
    let finished: Arc<Mutex<Vec<Value>>> = Arc::default();
    let mut tasks = Vec::new();
    for c in 0..n * depth.max(1) {
        let (frame, finished) = (frame.clone(), finished.clone());
        tasks.push(async move {
            let mut i = 0;
            while Instant::now() < until {
                let id = live.submit(&frame, &format!("client {} frame {i}", c / depth.max(1)), &[]).await?;
                let job = live.until_terminal(&id).await?;
                anyhow::ensure!(job["status"] == "done", "job {id} ended {}", job["status"]);
                live.download(&id).await?;
                finished.lock().unwrap_or_else(|p| p.into_inner()).push(job);
                i += 1;
            }
            anyhow::Ok(())
        });
    }
    for r in futures_util::future::join_all(tasks).await {
        r?;
    }
    let jobs = std::mem::take(&mut *finished.lock().unwrap_or_else(|p| p.into_inner()));
    anyhow::ensure!(!jobs.is_empty(), "no job finished");
    let executing: f64 = jobs.iter().filter_map(|j| j["timings"]["comfy_execution"].as_f64()).sum();
    let first = jobs.iter().filter_map(|j| j["started_at"].as_f64()).fold(f64::MAX, f64::min);
    let last = jobs.iter().filter_map(|j| j["finished_at"].as_f64()).fold(f64::MIN, f64::max);
    Ok(ClientsReport { jobs: jobs.len(), executing, wall: last - first })
}

/// A producer at `fps` in `latest` mode on one stream; with `still`, the same frame every time
/// and `dedupe`. Prints the ages of the frames whose results reached the client.
async fn staleness(args: &LiveBenchArgs, still: bool) -> anyhow::Result<()> {
    let pipeline = Live::start(1, args.prefetch, args.job_time).await?;
    let live = &pipeline.api;
    println!(
        "tdcomfy live benchmark: {}, 1 simulated server, {} s jobs, PREFETCH={}, a {} fps producer in latest mode for {} s",
        if still { "a static scene with dedupe" } else { "staleness" },
        args.job_time,
        args.prefetch,
        args.fps,
        args.seconds
    );
    let submitted: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut fields = vec![("stream", "td-live"), ("mode", "latest")];
    if still {
        fields.push(("dedupe", "true"));
    }
    let period = Duration::from_secs_f64(1.0 / args.fps);
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(args.seconds);
    let still_frame = super::noise_png(256, 160);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut followers = Vec::new();
    let mut n = 0u64;
    while Instant::now() < until {
        ticker.tick().await;
        // A moving scene: every frame differs (a new seed of pixels would cost the producer too
        // much; the prompt carries the frame number and makes each request distinct).
        let prompt = if still { "still".to_owned() } else { format!("frame {n}") };
        let at = Instant::now();
        let id = live.submit(&still_frame, &prompt, &fields).await?;
        submitted.lock().unwrap_or_else(|p| p.into_inner()).insert(id.clone(), at);
        let live = live.clone();
        followers.push(tokio::spawn(async move {
            let job = live.until_terminal(&id).await?;
            let reached = if job["status"] == "done" {
                live.download(&id).await?;
                Some(at.elapsed())
            } else {
                None
            };
            anyhow::Ok((job, reached))
        }));
        n += 1;
    }
    let outcomes = futures_util::future::join_all(followers).await;
    let (mut ages, mut superseded, mut reused, mut ran) = (Vec::new(), 0usize, 0usize, 0usize);
    for outcome in outcomes {
        let (job, reached) = outcome??;
        if job["cancel_reason"] == "superseded" {
            superseded += 1;
        }
        if job["status"] == "done" {
            if job["reused_from"].is_string() {
                reused += 1;
            } else {
                ran += 1;
            }
            ages.extend(reached);
        }
    }
    ages.sort();
    println!("{:<44} {n}", "frames submitted");
    println!("{:<44} {ran}", "jobs run on the GPU");
    println!("{:<44} {reused}", "answered from the last result (dedupe)");
    println!("{:<44} {superseded}", "superseded before they started");
    if !still {
        println!(
            "{:<44} p50 {}  p99 {}  max {}  ({:.2} / {:.2} job times)",
            "input frame age when its result is on disk",
            fmt_ms(quantile(&ages, 0.5)),
            fmt_ms(quantile(&ages, 0.99)),
            fmt_ms(ages.last().copied().unwrap_or_default()),
            quantile(&ages, 0.5).as_secs_f64() / args.job_time,
            quantile(&ages, 0.99).as_secs_f64() / args.job_time,
        );
    }
    Ok(())
}
