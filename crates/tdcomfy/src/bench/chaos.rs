//! `tdcomfy bench chaos`: the reliability proof of issue 7. Broker, worker and simulator run as
//! separate child processes of this binary; N TouchDesigner-like clients submit frames, follow
//! their jobs over SSE (falling back to `GET /jobs/{id}` while the broker is away) and download and
//! check every result, while a seeded fault schedule SIGKILLs and restarts each process several
//! times. It prints what happened to every accepted job and exits non-zero if any job was lost,
//! forgotten after it ended, stuck, or came back wrong.
//!
//! Jobs run `chaos_invert`: the shipped `image_invert` graph with the simulator's `SlowPassthrough`
//! test node in front, so a prompt takes a known time (there is something to kill mid-prompt) and
//! its output is computable: every pixel the inverse of the job's own frame. Every `--video-every`th
//! job is an LTXV clip of the shipped default workflow instead, checked as an MP4 of the right
//! size and frame count. Every result must also be byte-identical to a file the simulator wrote
//! for that job: the worker hands ComfyUI's output over unchanged.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tdcomfy_api::{JobId, JobList, JobStatus, JobView, SubmitResponse};
use tokio_util::sync::CancellationToken;

use super::{TempDir, free_port};

/// Options of the chaos run.
#[derive(Debug, Clone, clap::Args)]
pub struct ChaosBenchArgs {
    /// TouchDesigner-like clients, each submitting one frame at a time.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Upper bound on jobs submitted; clients stop submitting when the fault schedule ends.
    #[arg(long, default_value_t = 400)]
    pub jobs: usize,
    /// Faults of each kind (broker, worker mid-prompt, worker mid-delivery, simulator).
    #[arg(long, default_value_t = 3)]
    pub faults: usize,
    /// The broker's LEASE_TTL in seconds; the broker stays down longer than this.
    #[arg(long, default_value_t = 3.0)]
    pub lease_ttl: f64,
    /// Seconds one prompt takes in the simulator.
    #[arg(long, default_value_t = 0.6)]
    pub job_time: f64,
    /// The broker's MAX_ATTEMPTS: generous, so the kills alone cannot exhaust a job's attempts.
    #[arg(long, default_value_t = 20)]
    pub max_attempts: u32,
    /// Every Nth job is an LTXV clip (MP4, checked for its size and frame count) instead of an
    /// inverted image; 0: none.
    #[arg(long, default_value_t = 5)]
    pub video_every: usize,
    /// Seed of the fault schedule (which fault when, and for how long).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Seconds after the last fault within which every job must have ended (or count as stuck).
    #[arg(long, default_value_t = 60.0)]
    pub settle: f64,
    /// The CI form: 3 clients, 2 faults of each kind, 40 s to settle.
    #[arg(long)]
    pub short: bool,
    /// Keep the run directory (child logs, data, simulator outputs) afterwards.
    #[arg(long)]
    pub keep: bool,
    /// Brokers: 1 (SQLite, as `tdcomfy up`), or several `tdcomfy serve` processes sharing
    /// `--database-url` (and `--storage-url`); the worker gets every broker's URL, each client
    /// submits to one broker and follows its job's events on another, and a broker fault kills
    /// one of them.
    #[arg(long, default_value_t = 1)]
    pub brokers: usize,
    /// The PostgreSQL database the brokers share (needed with --brokers above 1). Its tables are
    /// created by the first broker; use a fresh database: the run lists every job in it.
    #[arg(long, env = "CHAOS_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Where the brokers keep frames and results (STORAGE_URL; s3://… takes the AWS_* variables
    /// from this process's environment). Default with several brokers: a directory of the run
    /// shared by them (file://).
    #[arg(long)]
    pub storage_url: Option<String>,
    /// Only these fault kinds, comma-separated (broker, worker-mid-prompt, worker-mid-delivery,
    /// sim). Default: all four.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

/// The job graph: `workflows/image_invert.json` with a SlowPassthrough (a test node ComfyUI's
/// `td_test_nodes` provides and the simulator implements) before the invert. `{STEP}` is replaced
/// by the seconds per step.
const CHAOS_WORKFLOW: &str = r#"{
  "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
  "4": {"class_type": "SlowPassthrough", "inputs": {"images": ["1", 0], "steps": 10, "step_seconds": {STEP}, "send_preview": false}},
  "2": {"class_type": "ImageInvert", "inputs": {"image": ["4", 0]}},
  "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "tdcomfy/invert"}}
}"#;

/// Frame size: small, so a run of hundreds of jobs is cheap; every pixel still differs by job.
const FRAME_W: u32 = 48;
const FRAME_H: u32 = 32;

/// Frames of the LTXV clips (8k+1); the output size is the workflow's default, 512×320.
const CLIP_FRAMES: u32 = 9;

/// The shipped default workflow, for the clip jobs (compiled in, so the run works from any
/// directory).
const LTXV_WORKFLOW: &str = include_str!("../../../../workflows/ltxv_image_to_video.json");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Role {
    /// Broker number n (0-based); a one-broker run has only broker 0.
    Broker(usize),
    Worker,
    Sim,
}

impl Role {
    fn name(self) -> String {
        match self {
            Role::Broker(0) => "broker".into(),
            Role::Broker(n) => format!("broker-{}", n + 1),
            Role::Worker => "worker".into(),
            Role::Sim => "sim".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Fault {
    /// SIGKILL the broker, keep it down longer than LEASE_TTL, restart it.
    Broker,
    /// SIGKILL the worker while a job's prompt is part-way through, restart it.
    WorkerMidPrompt,
    /// SIGKILL the worker the moment a prompt's output file appears, i.e. while it fetches and
    /// uploads the result.
    WorkerMidDelivery,
    /// SIGKILL the simulator while a job runs (its queue and history are gone), restart it.
    Sim,
}

impl Fault {
    /// The name `--only` takes.
    fn parse(name: &str) -> Option<Fault> {
        Some(match name.trim() {
            "broker" => Fault::Broker,
            "worker-mid-prompt" => Fault::WorkerMidPrompt,
            "worker-mid-delivery" => Fault::WorkerMidDelivery,
            "sim" => Fault::Sim,
            _ => return None,
        })
    }

    fn label(self) -> &'static str {
        match self {
            Fault::Broker => "broker SIGKILL (down > LEASE_TTL)",
            Fault::WorkerMidPrompt => "worker SIGKILL mid-prompt",
            Fault::WorkerMidDelivery => "worker SIGKILL mid-delivery",
            Fault::Sim => "simulator SIGKILL (queue+history lost)",
        }
    }
}

/// xorshift64*: deterministic for a seed, and enough for a fault schedule.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..hi` seconds.
    fn secs(&mut self, lo: f64, hi: f64) -> Duration {
        let unit = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        Duration::from_secs_f64(lo + (hi - lo) * unit)
    }
}

/// The three child processes, restartable on the same ports and directories.
struct Cluster {
    exe: PathBuf,
    root: PathBuf,
    /// One port per broker, kept across restarts.
    broker_ports: Vec<u16>,
    sim_port: u16,
    /// DATABASE_URL and STORAGE_URL of the brokers (several brokers share them).
    database_url: Option<String>,
    storage_url: Option<String>,
    /// Worker starts so far: each start begins its BROKER_URL list at the next broker.
    worker_starts: usize,
    lease_ttl: f64,
    max_attempts: u32,
    job_time: f64,
    children: BTreeMap<Role, tokio::process::Child>,
    http: reqwest::Client,
}

impl Cluster {
    fn broker_base(&self, n: usize) -> String {
        format!("http://127.0.0.1:{}", self.broker_ports[n])
    }

    /// A broker that is up (they share one database, so any answers for all), for the run's own
    /// look-ups.
    fn any_broker(&self) -> String {
        let up = (0..self.broker_ports.len()).find(|n| self.children.contains_key(&Role::Broker(*n)));
        self.broker_base(up.unwrap_or(0))
    }

    /// Every broker's URL, starting with broker `first`: a worker's BROKER_URL.
    fn broker_list(&self, first: usize) -> String {
        let n = self.broker_ports.len();
        (0..n).map(|i| self.broker_base((first + i) % n)).collect::<Vec<_>>().join(",")
    }

    fn sim_output(&self) -> PathBuf {
        self.root.join("sim/output/tdcomfy")
    }

    async fn start(&mut self, role: Role) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join(format!("logs/{}.log", role.name())))?;
        let mut cmd = tokio::process::Command::new(&self.exe);
        // Settings a user's shell may carry would change the run (tokens, other servers).
        for var in [
            "API_TOKEN",
            "WORKER_TOKEN",
            "TDCOMFY_CONFIG",
            "COMFYUI_URLS",
            "BROKER_URL",
            "WORKER_ID",
            "SIM_FAULTS",
            "COMFYUI_DIR",
            "COMFYUI_OUTPUT_DIR",
            "COMFYUI_INPUT_DIR",
            "DATABASE_URL",
            "STORAGE_URL",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("RUST_LOG", "warn")
            .env("API_HOST", "127.0.0.1")
            .env("API_PORT", self.broker_ports[0].to_string())
            .env("COMFYUI_HOST", "127.0.0.1")
            .env("COMFYUI_PORT", self.sim_port.to_string())
            .env("WORKFLOWS_DIR", self.root.join("workflows"))
            .env("DEFAULT_WORKFLOW", "chaos_invert")
            .kill_on_drop(true)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::from(log));
        match role {
            Role::Broker(n) => {
                cmd.arg("serve")
                    .env("API_PORT", self.broker_ports[n].to_string())
                    .env("DATA_DIR", self.root.join(role.name()))
                    .env("LEASE_TTL", self.lease_ttl.to_string())
                    .env("MAX_ATTEMPTS", self.max_attempts.to_string())
                    .env("RESULT_TTL", "0")
                    // Far above a prompt's time: a job that errors here errors because of a fault.
                    .env("JOB_TIMEOUT", "120");
                if let Some(url) = &self.database_url {
                    cmd.env("DATABASE_URL", url);
                }
                if let Some(url) = &self.storage_url {
                    cmd.env("STORAGE_URL", url);
                }
            }
            Role::Worker => {
                // One spool directory across restarts, as a deployment has (/var/lib/…): a worker
                // that picks up spooled results after a restart would find them there.
                // Each start begins at another broker, so over the run the worker leases through
                // each of them (with one broker, the list is that one).
                let first = (1 + self.worker_starts) % self.broker_ports.len();
                self.worker_starts += 1;
                cmd.arg("worker")
                    .env("BROKER_URL", self.broker_list(first))
                    .env("WORKER_ID", "chaos-worker")
                    .env("WORKER_SPOOL_DIR", self.root.join("spool"))
                    .env("WORKER_POLL_INTERVAL", "0.2")
                    .env("COMFYUI_POLL_INTERVAL", "0.25")
                    .env("COMFYUI_RETRY_BUDGET", "15")
                    .env("STALL_TIMEOUT", "30")
                    // The outputs stay in the simulator's folder as the oracle every download is
                    // compared with (their deletion is tested in the worker's own suite).
                    .env("COMFYUI_KEEP_OUTPUTS", "true");
            }
            Role::Sim => {
                // The same data dir across restarts, like a restarted ComfyUI: files stay, queue
                // and history (in memory) are gone.
                cmd.arg("sim")
                    .env("SIM_DATA_DIR", self.root.join("sim"))
                    .env("SIM_JOB_TIME", self.job_time.to_string());
            }
        }
        let child = cmd.spawn().with_context(|| format!("starting the {}", role.name()))?;
        self.children.insert(role, child);
        let probe = match role {
            Role::Broker(n) => Some(format!("{}/health", self.broker_base(n))),
            Role::Sim => Some(format!("http://127.0.0.1:{}/system_stats", self.sim_port)),
            // The worker has no port; it finds the broker and simulator by itself.
            Role::Worker => None,
        };
        if let Some(url) = probe {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if self.http.get(&url).send().await.is_ok_and(|r| r.status().is_success()) {
                    break;
                }
                if let Some(Ok(Some(status))) = self.children.get_mut(&role).map(|c| c.try_wait()) {
                    anyhow::bail!("the {} exited at start ({status}); see {}", role.name(), self.root.display());
                }
                anyhow::ensure!(Instant::now() < deadline, "the {} did not answer {url} within 30 s", role.name());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    /// SIGKILL (tokio's `start_kill` on Unix): no shutdown code runs in the child.
    async fn kill(&mut self, role: Role) {
        if let Some(mut child) = self.children.remove(&role) {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Polls the simulator's `/history` (every 2 ms, up to `limit`) until the prompt of job `id`
    /// is recorded as a success. False on timeout, or if the entry was already deleted (the
    /// worker deletes it once it has seen the end).
    async fn wait_prompt_success(&self, id: JobId, limit: Duration) -> bool {
        // The newest entries only: prompts of killed workers stay in the history (nobody deletes
        // them), and parsing all of it every 2 ms would be slower than the delivery it targets.
        let url = format!("http://127.0.0.1:{}/history?max_items=4", self.sim_port);
        let needle = id.to_string();
        let until = Instant::now() + limit;
        while Instant::now() < until {
            let history = match self.http.get(&url).timeout(Duration::from_secs(1)).send().await {
                Ok(r) if r.status().is_success() => r.json::<serde_json::Value>().await.ok(),
                _ => None,
            };
            let entries = history.as_ref().and_then(|h| h.as_object()).into_iter().flat_map(|m| m.values());
            // The job id appears in the entry's graph (the uploaded frame's name, the prefix).
            let succeeded = entries
                .filter(|e| e.to_string().contains(&needle))
                .any(|e| e["status"]["status_str"] == "success" && e["status"]["completed"] == true);
            if succeeded {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        false
    }

    async fn running_jobs(&self) -> Vec<JobView> {
        let url = format!("{}/jobs?status=running&limit=50", self.any_broker());
        match self.http.get(url).timeout(Duration::from_secs(2)).send().await {
            Ok(r) if r.status().is_success() => r.json::<JobList>().await.map(|l| l.jobs).unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    async fn job(&self, id: JobId) -> Option<JobView> {
        let url = format!("{}/jobs/{id}", self.any_broker());
        let r = self.http.get(url).timeout(Duration::from_secs(5)).send().await.ok()?;
        if r.status().is_success() { r.json().await.ok() } else { None }
    }
}

/// Output files of completed prompts, by job (the worker binds `tdcomfy/<job_id>/…` as prefix).
fn outputs_by_job(dir: &Path) -> HashMap<String, Vec<PathBuf>> {
    let mut out: HashMap<String, Vec<PathBuf>> = HashMap::new();
    let Ok(jobs) = std::fs::read_dir(dir) else { return out };
    for job in jobs.flatten() {
        let Ok(files) = std::fs::read_dir(job.path()) else { continue };
        let name = job.file_name().to_string_lossy().into_owned();
        for f in files.flatten() {
            if f.path().extension().is_some_and(|e| e == "png" || e == "mp4") {
                out.entry(name.clone()).or_default().push(f.path());
            }
        }
    }
    out
}

/// What became of one submission.
#[derive(Debug)]
enum Outcome {
    /// Done; the result passed its content check (inverse pixels, or the clip's size and frames).
    /// Byte identity with the simulator's files is checked in the report, once all are written.
    Verified,
    /// Done, but the result is missing, altered or not this job's.
    Wrong(String),
    /// Ended `error`, with its message.
    Error(String),
    Cancelled,
    /// Accepted, then the broker answered 404 for it.
    Lost,
    /// Accepted and still not terminal at the deadline (last status seen).
    Stuck(String),
    /// The broker never acknowledged it (not a loss: the client was told nothing was stored).
    NotAccepted(String),
}

struct Record {
    id: Option<JobId>,
    /// An LTXV clip (MP4) rather than an inverted image.
    video: bool,
    frame: Vec<u8>,
    result: Option<Vec<u8>>,
    view: Option<JobView>,
    outcome: Outcome,
}

struct Shared {
    /// Every broker's base URL; client c submits to broker c and follows on broker c + 1.
    bases: Vec<String>,
    /// Where downloaded clips are written for the MP4 check.
    downloads: PathBuf,
    video_every: usize,
    http: reqwest::Client,
    next_job: AtomicUsize,
    max_jobs: usize,
    submitting: AtomicBool,
    give_up: CancellationToken,
    records: Mutex<Vec<Record>>,
}

/// A frame unique to job `index`: pseudo-random pixels seeded by the run seed and the index.
fn job_frame(seed: u64, index: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed ^ (index as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93));
    let img = image::RgbImage::from_fn(FRAME_W, FRAME_H, |_, _| {
        let b = rng.next().to_le_bytes();
        image::Rgb([b[0], b[1], b[2]])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).expect("PNG encoding to memory cannot fail");
    out.into_inner()
}

/// Checks that `result` is `frame` with every channel inverted.
fn check_inverted(frame: &[u8], result: &[u8]) -> Result<(), String> {
    let input = image::load_from_memory(frame).map_err(|e| format!("own frame: {e}"))?.to_rgb8();
    let output = image::load_from_memory(result).map_err(|e| format!("result is not an image: {e}"))?.to_rgb8();
    if input.dimensions() != output.dimensions() {
        return Err(format!("result is {:?}, frame was {:?}", output.dimensions(), input.dimensions()));
    }
    let bad = input.as_raw().iter().zip(output.as_raw()).filter(|(i, o)| 255 - **i != **o).count();
    if bad > 0 {
        return Err(format!("{bad} channel values are not the inverse of this job's frame"));
    }
    Ok(())
}

/// Checks that `result` is an MP4 of the clip the job asked for (written to `path` for parsing).
fn check_clip(path: &Path, result: &[u8]) -> Result<(), String> {
    std::fs::write(path, result).map_err(|e| format!("writing {}: {e}", path.display()))?;
    let info = tdcomfy_sim::video_info(path).map_err(|e| format!("result is not an MP4: {e}"))?;
    let _ = std::fs::remove_file(path);
    if (info.width, info.height, info.frames) != (512, 320, CLIP_FRAMES) {
        return Err(format!(
            "clip is {}x{} with {} frames, expected 512x320 with {CLIP_FRAMES}",
            info.width, info.height, info.frames
        ));
    }
    Ok(())
}

/// The brokers one client talks to: it submits to one and follows (events, result) on another,
/// as TD clients behind a load balancer do; with one broker both are that one.
#[derive(Clone, Copy)]
struct Route<'a> {
    submit: &'a str,
    follow: &'a str,
}

async fn client_loop(shared: Arc<Shared>, seed: u64, client: usize) {
    let n = shared.bases.len();
    let route = Route { submit: &shared.bases[client % n], follow: &shared.bases[(client + 1) % n] };
    while shared.submitting.load(Ordering::SeqCst) {
        let index = shared.next_job.fetch_add(1, Ordering::SeqCst);
        if index >= shared.max_jobs {
            break;
        }
        let video = shared.video_every > 0 && index % shared.video_every == shared.video_every - 1;
        let record = run_job(&shared, route, job_frame(seed, index), video).await;
        shared.records.lock().expect("records lock").push(record);
    }
}

/// What one attempt to follow a job gave.
enum Follow {
    Terminal(JobView),
    Missing,
    Pending(Option<JobView>),
}

async fn run_job(shared: &Shared, route: Route<'_>, frame: Vec<u8>, video: bool) -> Record {
    let mut record =
        Record { id: None, video, frame, result: None, view: None, outcome: Outcome::NotAccepted(String::new()) };
    // Submit, retrying with the same Idempotency-Key while the broker is away: a replay of a
    // stored job returns that job, so a retry never makes a second one.
    let key = JobId::new().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let id = loop {
        if shared.give_up.is_cancelled() || Instant::now() > deadline {
            record.outcome = Outcome::NotAccepted("the broker did not acknowledge it within 60 s".into());
            return record;
        }
        let mut form = reqwest::multipart::Form::new()
            .part("image", reqwest::multipart::Part::bytes(record.frame.clone()).file_name("frame.png"))
            .text("prompt", "chaos");
        if video {
            form =
                form.text("workflow", "ltxv_image_to_video").text("params", format!(r#"{{"frames": {CLIP_FRAMES}}}"#));
        }
        let sent = shared
            .http
            .post(format!("{}/jobs", route.submit))
            .header("Idempotency-Key", &key)
            .multipart(form)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {
                // An unreadable answer means the broker died mid-answer: replay the key.
                if let Ok(s) = r.json::<SubmitResponse>().await {
                    break s.job_id;
                }
            }
            Ok(r) if r.status().is_client_error() => {
                record.outcome = Outcome::NotAccepted(format!("HTTP {}", r.status()));
                return record;
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    record.id = Some(id);

    let view = loop {
        let step = tokio::select! {
            _ = shared.give_up.cancelled() => Follow::Pending(None),
            step = follow_once(shared, route.follow, id) => step,
        };
        match step {
            Follow::Terminal(v) => break v,
            Follow::Missing => {
                record.outcome = Outcome::Lost;
                return record;
            }
            Follow::Pending(v) => {
                if v.is_some() {
                    record.view = v;
                }
                if shared.give_up.is_cancelled() {
                    let last = record.view.as_ref().map(|v| v.status.to_string()).unwrap_or_else(|| "unknown".into());
                    record.outcome = Outcome::Stuck(last);
                    return record;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    record.outcome = match view.status {
        JobStatus::Done => match download(shared, route.follow, id).await {
            Ok(bytes) => {
                let checked = if video {
                    check_clip(&shared.downloads.join(format!("{id}.mp4")), &bytes)
                } else {
                    check_inverted(&record.frame, &bytes)
                };
                record.result = Some(bytes);
                match checked {
                    Ok(()) => Outcome::Verified,
                    Err(e) => Outcome::Wrong(e),
                }
            }
            Err(e) => Outcome::Wrong(e),
        },
        JobStatus::Error => Outcome::Error(view.error_message.clone().unwrap_or_else(|| "(no message)".into())),
        JobStatus::Cancelled => Outcome::Cancelled,
        other => Outcome::Stuck(other.to_string()),
    };
    record.view = Some(view);
    record
}

/// Follows the job's SSE stream until it ends, then asks `GET /jobs/{id}` once: what a TD client
/// does when its stream breaks because the broker went away.
async fn follow_once(shared: &Shared, base: &str, id: JobId) -> Follow {
    let mut last = None;
    if let Ok(resp) = shared.http.get(format!("{base}/jobs/{id}/events")).send().await {
        if resp.status() == 404 {
            return Follow::Missing;
        }
        if resp.status().is_success() {
            let mut events = crate::sse::JobEvents::new(resp);
            while let Ok(Some(event)) = events.next().await {
                if event.job.status.is_terminal() {
                    return Follow::Terminal(event.job);
                }
                last = Some(event.job);
            }
        }
    }
    match shared.http.get(format!("{base}/jobs/{id}")).timeout(Duration::from_secs(5)).send().await {
        Ok(r) if r.status() == 404 => Follow::Missing,
        Ok(r) if r.status().is_success() => match r.json::<JobView>().await {
            Ok(v) if v.status.is_terminal() => Follow::Terminal(v),
            Ok(v) => Follow::Pending(Some(v)),
            Err(_) => Follow::Pending(last),
        },
        _ => Follow::Pending(last),
    }
}

/// Downloads the result, retrying while the broker is away (bounded).
async fn download(shared: &Shared, base: &str, id: JobId) -> Result<Vec<u8>, String> {
    let mut last = String::new();
    for _ in 0..150 {
        if shared.give_up.is_cancelled() {
            break;
        }
        let sent = shared.http.get(format!("{base}/jobs/{id}/result")).timeout(Duration::from_secs(10)).send().await;
        match sent {
            Ok(r) if r.status().is_success() => match r.bytes().await {
                Ok(b) => return Ok(b.to_vec()),
                Err(e) => last = format!("download broke: {e}"),
            },
            Ok(r) if r.status().is_client_error() => {
                return Err(format!("done, but the result answers HTTP {}", r.status()));
            }
            Ok(r) => last = format!("HTTP {}", r.status()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!("done, but the result could not be downloaded: {last}"))
}

/// What the fault controller did.
#[derive(Default)]
struct FaultLog {
    count: BTreeMap<Fault, usize>,
    /// Faults whose target did not show up in time (fired anyway).
    untargeted: BTreeMap<Fault, usize>,
    /// Mid-delivery kills after ComfyUI recorded the prompt's success and before the job was `done`.
    delivery_hits: usize,
    /// The jobs each fault hit: every job running at a broker kill; the targeted job of the
    /// others (mid-prompt, or not yet `done` after its prompt's output appeared).
    hit: BTreeMap<Fault, HashSet<JobId>>,
    /// The attempts those faults ended: a killed attempt's job still shows `running` (with its
    /// last progress) until its lease expires, and must not be taken for a live target.
    dead_attempts: HashSet<(JobId, u32)>,
    /// Every job running just after a worker or simulator kill, targeted or not (a prefetched
    /// job waiting in ComfyUI's queue dies with its worker too): such a job may legitimately run
    /// again. A job outside this set that ran twice was re-run by a broker fault alone.
    process_hit: HashSet<JobId>,
    /// Which broker each broker fault killed (1-based), in order.
    brokers_killed: Vec<usize>,
}

/// Records every job running right now as hit by a worker or simulator kill (asked after the
/// kill: the dead process's leases still stand, so its jobs still show `running`).
async fn note_process_hit(cluster: &Cluster, log: &mut FaultLog) {
    log.process_hit.extend(cluster.running_jobs().await.into_iter().map(|j| j.id));
}

/// Waits (bounded) for a running job matching `pred`; `None` on timeout.
async fn wait_running(
    cluster: &Cluster,
    limit: Duration,
    log: &FaultLog,
    pred: impl Fn(&JobView) -> bool,
) -> Option<JobView> {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        let running = cluster.running_jobs().await;
        if let Some(job) = running.into_iter().find(|j| pred(j) && !log.dead_attempts.contains(&(j.id, j.attempts))) {
            return Some(job);
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    None
}

/// Part-way through the SlowPassthrough: the prompt started and has not finished.
fn mid_prompt(job: &JobView) -> bool {
    job.progress.value > 0.05 && job.progress.value < 0.85
}

async fn inject(cluster: &mut Cluster, fault: Fault, rng: &mut Rng, log: &mut FaultLog) -> anyhow::Result<()> {
    *log.count.entry(fault).or_default() += 1;
    let target = Duration::from_secs(15);
    let mut untargeted = false;
    match fault {
        Fault::Broker => {
            // Asked before the kill: afterwards there is no one to ask. A job whose lease from an
            // earlier kill has not expired yet is counted too: the outage hits it as well.
            let running = cluster.running_jobs().await;
            log.hit.entry(fault).or_default().extend(running.iter().map(|j| j.id));
            log.dead_attempts.extend(running.iter().map(|j| (j.id, j.attempts)));
            // Drawn only with several brokers, so a one-broker run keeps its seeded schedule.
            let brokers = cluster.broker_ports.len();
            let victim = if brokers > 1 { (rng.next() % brokers as u64) as usize } else { 0 };
            log.brokers_killed.push(victim + 1);
            cluster.kill(Role::Broker(victim)).await;
            // Longer than LEASE_TTL, so every lease held at the kill is past its expiry on return.
            tokio::time::sleep(Duration::from_secs_f64(cluster.lease_ttl) + rng.secs(0.5, 1.5)).await;
            cluster.start(Role::Broker(victim)).await?;
        }
        Fault::WorkerMidPrompt => {
            let victim = wait_running(cluster, target, log, mid_prompt).await;
            untargeted = victim.is_none();
            log.hit.entry(fault).or_default().extend(victim.as_ref().map(|j| j.id));
            log.dead_attempts.extend(victim.as_ref().map(|j| (j.id, j.attempts)));
            cluster.kill(Role::Worker).await;
            note_process_hit(cluster, log).await;
            tokio::time::sleep(rng.secs(0.2, 1.0)).await;
            cluster.start(Role::Worker).await?;
        }
        Fault::WorkerMidDelivery => {
            // Two steps, both polled every 2 ms. A new output file in the simulator names the job
            // whose prompt is ending (the worker binds `tdcomfy/<job_id>/` as prefix); the kill
            // comes when ComfyUI's history records that prompt as a success, so from then on only
            // the worker's delivery (notice the end, fetch /view, PUT to the broker) stands
            // between the job and `done`. Whether the kill beat `done` is checked right after.
            // A prompt whose success the poll missed (the worker was quicker) is skipped for the
            // next one.
            let dir = cluster.sim_output();
            let mut seen: HashSet<PathBuf> = outputs_by_job(&dir).into_values().flatten().collect();
            let until = Instant::now() + target;
            let mut victim = None;
            while Instant::now() < until && victim.is_none() {
                let fresh: Vec<(String, PathBuf)> = outputs_by_job(&dir)
                    .into_iter()
                    .flat_map(|(job, files)| files.into_iter().map(move |f| (job.clone(), f)))
                    .filter(|(_, f)| !seen.contains(f))
                    .collect();
                let Some((job, _)) = fresh.first().cloned() else {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                };
                seen.extend(fresh.into_iter().map(|(_, f)| f));
                if let Some(id) = JobId::parse(&job)
                    && cluster.wait_prompt_success(id, Duration::from_millis(500)).await
                {
                    victim = Some(id);
                }
            }
            cluster.kill(Role::Worker).await;
            note_process_hit(cluster, log).await;
            untargeted = victim.is_none();
            if let Some(id) = victim
                && let Some(view) = cluster.job(id).await.filter(|v| v.status == JobStatus::Running)
            {
                log.delivery_hits += 1;
                log.hit.entry(fault).or_default().insert(id);
                log.dead_attempts.insert((id, view.attempts));
            }
            tokio::time::sleep(rng.secs(0.2, 1.0)).await;
            cluster.start(Role::Worker).await?;
        }
        Fault::Sim => {
            let victim = wait_running(cluster, target, log, mid_prompt).await;
            untargeted = victim.is_none();
            log.hit.entry(fault).or_default().extend(victim.as_ref().map(|j| j.id));
            log.dead_attempts.extend(victim.as_ref().map(|j| (j.id, j.attempts)));
            cluster.kill(Role::Sim).await;
            note_process_hit(cluster, log).await;
            tokio::time::sleep(rng.secs(0.3, 1.2)).await;
            cluster.start(Role::Sim).await?;
        }
    }
    if untargeted {
        *log.untargeted.entry(fault).or_default() += 1;
    }
    Ok(())
}

/// Runs the chaos run, prints the figures, and fails (exit 1) on any lost, forgotten, stuck or
/// wrong job.
pub async fn run(mut args: ChaosBenchArgs) -> anyhow::Result<ExitCode> {
    if args.short {
        args.clients = 3;
        args.faults = 2;
        args.settle = 40.0;
    }
    anyhow::ensure!(args.clients > 0 && args.jobs > 0, "--clients and --jobs must be at least 1");
    anyhow::ensure!(args.lease_ttl > 0.0 && args.job_time > 0.0, "--lease-ttl and --job-time must be positive");
    anyhow::ensure!((1..=9).contains(&args.brokers), "--brokers must be 1 to 9");
    anyhow::ensure!(
        args.brokers == 1 || args.database_url.is_some(),
        "--brokers {} needs --database-url postgres://… (several brokers share one database)",
        args.brokers
    );
    let kinds: Vec<Fault> = if args.only.is_empty() {
        vec![Fault::Broker, Fault::WorkerMidPrompt, Fault::WorkerMidDelivery, Fault::Sim]
    } else {
        args.only
            .iter()
            .map(|k| {
                Fault::parse(k).with_context(|| {
                    format!("--only: unknown fault {k:?} (broker, worker-mid-prompt, worker-mid-delivery, sim)")
                })
            })
            .collect::<anyhow::Result<_>>()?
    };
    let started = Instant::now();
    let dir = TempDir::new("tdcomfy-chaos")?;
    for sub in ["logs", "workflows", "sim", "spool", "downloads", "shared-files"] {
        std::fs::create_dir_all(dir.0.join(sub))?;
    }
    for n in 0..args.brokers {
        std::fs::create_dir_all(dir.0.join(Role::Broker(n).name()))?;
    }
    // Several brokers need one place for frames and results; one broker keeps its DATA_DIR's.
    let storage_url = args
        .storage_url
        .clone()
        .or_else(|| (args.brokers > 1).then(|| format!("file://{}", dir.0.join("shared-files").display())));
    let workflow = CHAOS_WORKFLOW.replace("{STEP}", &format!("{:.4}", args.job_time / 10.0));
    std::fs::write(dir.0.join("workflows/chaos_invert.json"), workflow)?;
    std::fs::write(dir.0.join("workflows/ltxv_image_to_video.json"), LTXV_WORKFLOW)?;

    let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(2)).build()?;
    let mut cluster = Cluster {
        exe: std::env::current_exe().context("locating the tdcomfy binary")?,
        root: dir.0.clone(),
        // Picked once and reused by every restart, as a deployment's fixed ports are. (Another
        // program could take one while its server is down; the restart would then fail loudly.)
        broker_ports: (0..args.brokers).map(|_| free_port()).collect::<std::io::Result<_>>()?,
        sim_port: free_port()?,
        database_url: args.database_url.clone(),
        storage_url,
        worker_starts: 0,
        lease_ttl: args.lease_ttl,
        max_attempts: args.max_attempts,
        job_time: args.job_time,
        children: BTreeMap::new(),
        http: http.clone(),
    };
    println!(
        "tdcomfy chaos run: {} clients, {} faults of each kind, seed {}, LEASE_TTL {} s, prompt {} s, \
         MAX_ATTEMPTS {} (generous: each kill costs a job at most one attempt, so kills alone cannot \
         exhaust them)",
        args.clients, args.faults, args.seed, args.lease_ttl, args.job_time, args.max_attempts
    );
    if args.brokers > 1 {
        println!(
            "topology: {} brokers on one PostgreSQL database, storage {}; the worker gets every broker's URL \
             (each start beginning at the next); client c submits to broker c and follows on broker c + 1",
            args.brokers,
            cluster.storage_url.as_deref().unwrap_or("-")
        );
    }
    println!("run directory: {}", dir.0.display());
    cluster.start(Role::Sim).await?;
    for n in 0..args.brokers {
        cluster.start(Role::Broker(n)).await?;
    }
    cluster.start(Role::Worker).await?;

    let shared = Arc::new(Shared {
        bases: (0..args.brokers).map(|n| cluster.broker_base(n)).collect(),
        downloads: dir.0.join("downloads"),
        video_every: args.video_every,
        http: http.clone(),
        next_job: AtomicUsize::new(0),
        max_jobs: args.jobs,
        submitting: AtomicBool::new(true),
        give_up: CancellationToken::new(),
        records: Mutex::new(Vec::new()),
    });
    let mut clients = tokio::task::JoinSet::new();
    for client in 0..args.clients {
        clients.spawn(client_loop(shared.clone(), args.seed, client));
    }

    // The schedule: every kind `faults` times, in a seeded order, with seeded gaps between.
    let mut rng = Rng::new(args.seed);
    let mut schedule: Vec<Fault> = kinds.iter().flat_map(|f| std::iter::repeat_n(*f, args.faults)).collect();
    for i in (1..schedule.len()).rev() {
        schedule.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    let mut log = FaultLog::default();
    let mut fault_error = None;
    for (n, fault) in schedule.iter().enumerate() {
        tokio::time::sleep(rng.secs(1.5, 3.5)).await;
        let at = started.elapsed().as_secs_f64();
        if let Err(e) = inject(&mut cluster, *fault, &mut rng, &mut log).await {
            fault_error = Some(e);
            break;
        }
        println!("  {:>5.1} s  fault {:>2}/{}: {}", at, n + 1, schedule.len(), fault.label());
    }
    let faults_end = Instant::now();
    shared.submitting.store(false, Ordering::SeqCst);

    // Every job must end within `settle` of the last fault; whatever has not is stuck.
    let settle = Duration::from_secs_f64(args.settle);
    let drained = tokio::time::timeout(settle, async { while clients.join_next().await.is_some() {} }).await.is_ok();
    if !drained {
        shared.give_up.cancel();
        while clients.join_next().await.is_some() {}
    }
    let settled_in = faults_end.elapsed();

    // Jobs the broker holds that no client was told about (stored, then the answer was lost).
    let records = std::mem::take(&mut *shared.records.lock().expect("records lock"));
    let known: HashSet<JobId> = records.iter().filter_map(|r| r.id).collect();
    let unacknowledged = match http.get(format!("{}/jobs?limit=500", cluster.any_broker())).send().await {
        Ok(r) if r.status().is_success() => {
            r.json::<JobList>().await.map(|l| l.jobs.iter().filter(|j| !known.contains(&j.id)).count()).ok()
        }
        _ => None,
    };
    // The final word on attempts comes from the broker after the run.
    let mut finals = HashMap::new();
    for id in &known {
        if let Some(v) = cluster.job(*id).await {
            finals.insert(*id, v);
        }
    }
    let outputs = outputs_by_job(&cluster.sim_output());
    let roles: Vec<Role> =
        [Role::Worker].into_iter().chain((0..args.brokers).map(Role::Broker)).chain([Role::Sim]).collect();
    for role in roles {
        cluster.kill(role).await;
    }

    let ok = report(&args, &records, &finals, &outputs, &log, unacknowledged, settled_in, drained, started.elapsed());
    if let Some(e) = fault_error {
        println!("the fault schedule stopped early: {e:#}");
    }
    if args.keep || !ok {
        println!("child logs and data kept in {}", dir.0.display());
        // Leaking the guard keeps the directory for inspection.
        std::mem::forget(dir);
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Prints the table; true when nothing was lost, forgotten, stuck or wrong.
#[allow(clippy::too_many_arguments)]
fn report(
    args: &ChaosBenchArgs,
    records: &[Record],
    finals: &HashMap<JobId, JobView>,
    outputs: &HashMap<String, Vec<PathBuf>>,
    log: &FaultLog,
    unacknowledged: Option<usize>,
    settled_in: Duration,
    drained: bool,
    wall: Duration,
) -> bool {
    let accepted: Vec<&Record> = records.iter().filter(|r| r.id.is_some()).collect();
    let mut errors: BTreeMap<&str, usize> = BTreeMap::new();
    let mut wrong: Vec<String> = Vec::new();
    let (mut done, mut cancelled, mut lost, mut stuck, mut rerun) = (0, 0, 0, 0, 0);
    let mut stuck_status: BTreeMap<&str, usize> = BTreeMap::new();
    let mut prompts_twice = 0;
    let mut forgotten: Vec<String> = Vec::new();
    // A worker or simulator kill may legitimately run a job again (its prompt died, or finished
    // with nobody left to deliver it); a broker kill must not: the worker carries on through
    // another broker, or through the restarted one, with the same lease.
    let process_faults = [Fault::WorkerMidPrompt, Fault::WorkerMidDelivery, Fault::Sim];
    let process_hit: HashSet<JobId> = log
        .process_hit
        .iter()
        .chain(process_faults.iter().flat_map(|f| log.hit.get(f).into_iter().flatten()))
        .copied()
        .collect();
    let mut broker_only_twice: Vec<String> = Vec::new();
    for r in &accepted {
        let id = r.id.expect("accepted");
        let attempts = finals.get(&id).or(r.view.as_ref()).map(|v| v.attempts).unwrap_or(0);
        if attempts > 1 {
            rerun += 1;
        }
        let files = outputs.get(&id.to_string()).map(Vec::as_slice).unwrap_or(&[]);
        if files.len() > 1 {
            prompts_twice += 1;
        }
        if (attempts > 1 || files.len() > 1) && !process_hit.contains(&id) {
            broker_only_twice.push(format!("{id} (attempts {attempts}, prompts completed {})", files.len()));
        }
        // An end the client saw must still be the broker's word after all the restarts.
        let seen_end = r.view.as_ref().map(|v| v.status).filter(|s| s.is_terminal());
        if let Some(seen) = seen_end
            && finals.get(&id).is_none_or(|v| v.status != seen)
        {
            let now = finals.get(&id).map_or("404".into(), |v| v.status.to_string());
            forgotten.push(format!("{id}: the client saw it end {seen}; the broker now says {now}"));
            continue;
        }
        match &r.outcome {
            Outcome::Verified => {
                done += 1;
                // What the client downloaded must be, byte for byte, a file the simulator wrote
                // for this job (the worker delivers ComfyUI's output unchanged).
                let result = r.result.as_deref().unwrap_or_default();
                if !files.iter().any(|f| std::fs::read(f).is_ok_and(|b| b == result)) {
                    wrong.push(format!("{id}: result not byte-identical to any output ComfyUI wrote for it"));
                }
            }
            Outcome::Wrong(e) => {
                done += 1;
                wrong.push(format!("{id}: {e}"));
            }
            Outcome::Error(m) => *errors.entry(m.as_str()).or_default() += 1,
            Outcome::Cancelled => cancelled += 1,
            Outcome::Lost => lost += 1,
            Outcome::Stuck(s) => {
                stuck += 1;
                *stuck_status.entry(s.as_str()).or_default() += 1;
            }
            Outcome::NotAccepted(_) => {}
        }
    }
    let mut refusals: BTreeMap<&str, usize> = BTreeMap::new();
    for r in records {
        if let Outcome::NotAccepted(why) = &r.outcome {
            *refusals.entry(why.as_str()).or_default() += 1;
        }
    }
    let not_accepted = records.len() - accepted.len();
    let error_total: usize = errors.values().sum();
    let line = |k: &str, v: String| println!("{k:<52} {v}");
    println!();
    line("jobs submitted", records.len().to_string());
    line("  not acknowledged (client told nothing was stored)", not_accepted.to_string());
    for (m, n) in &refusals {
        println!("      {n:>4} × {m}");
    }
    line("  on the broker without an acknowledgement", unacknowledged.map_or("?".into(), |n| n.to_string()));
    line("jobs accepted", accepted.len().to_string());
    let clips =
        accepted.iter().filter(|r| r.video && matches!(r.outcome, Outcome::Verified | Outcome::Wrong(_))).count();
    line("  done", format!("{done} ({clips} of them LTXV clips)"));
    line("  error", error_total.to_string());
    for (m, n) in &errors {
        println!("      {n:>4} × {m}");
    }
    line("  cancelled", cancelled.to_string());
    line("  lost (accepted, then 404)", lost.to_string());
    line("  forgotten (ended, then 404 or another state)", forgotten.len().to_string());
    for f in forgotten.iter().take(20) {
        println!("      {f}");
    }
    let stuck_detail: Vec<String> = stuck_status.iter().map(|(s, n)| format!("{n} {s}")).collect();
    line(
        &format!("  stuck (not ended {:.0} s after the last fault)", args.settle),
        if stuck == 0 { "0".into() } else { format!("{stuck} ({})", stuck_detail.join(", ")) },
    );
    line("wrong results (missing, not the inverse, not byte-identical)", wrong.len().to_string());
    for w in wrong.iter().take(20) {
        println!("      {w}");
    }
    line("jobs run more than once (attempts > 1)", rerun.to_string());
    line("jobs whose prompt completed in ComfyUI more than once", prompts_twice.to_string());
    line("prompts completed in ComfyUI", outputs.values().map(Vec::len).sum::<usize>().to_string());
    line(
        "jobs no worker/simulator fault hit, run twice",
        if broker_only_twice.is_empty() {
            "0".into()
        } else {
            format!("{} ({})", broker_only_twice.len(), broker_only_twice.join(", "))
        },
    );
    if !log.brokers_killed.is_empty() {
        let killed: Vec<String> = log.brokers_killed.iter().map(|n| format!("broker {n}")).collect();
        line("brokers killed, in order", killed.join(", "));
    }
    // Which faults the re-runs and failures follow: the outcome of every job a fault hit.
    let by_id: HashMap<JobId, &Record> = accepted.iter().map(|r| (r.id.expect("accepted"), *r)).collect();
    let mut explained: HashSet<JobId> = HashSet::new();
    for (fault, n) in &log.count {
        let miss = log.untargeted.get(fault).copied().unwrap_or(0);
        let hit = log.hit.get(fault).cloned().unwrap_or_default();
        explained.extend(hit.iter().copied());
        let count = |pred: &dyn Fn(&Record, u32) -> bool| {
            hit.iter()
                .filter_map(|id| {
                    by_id.get(id).map(|r| (r, finals.get(id).or(r.view.as_ref()).map_or(0, |v| v.attempts)))
                })
                .filter(|(r, a)| pred(r, *a))
                .count()
        };
        let mut notes = vec![format!(
            "jobs hit {}: re-run {}, error {}, lost {}, stuck {}, wrong {}",
            hit.len(),
            count(&|_, a| a > 1),
            count(&|r, _| matches!(r.outcome, Outcome::Error(_))),
            count(&|r, _| matches!(r.outcome, Outcome::Lost)),
            count(&|r, _| matches!(r.outcome, Outcome::Stuck(_))),
            count(&|r, _| matches!(r.outcome, Outcome::Wrong(_))),
        )];
        if *fault == Fault::WorkerMidDelivery {
            notes.push(format!("{} after the prompt's success and before `done`", log.delivery_hits));
        }
        if miss > 0 {
            notes.push(format!("{miss} fired without a job at the targeted point"));
        }
        line(&format!("faults: {}", fault.label()), format!("{n} ({})", notes.join("; ")));
    }
    let unexplained: Vec<String> = accepted
        .iter()
        .filter_map(|r| r.id)
        .filter(|id| !explained.contains(id) && finals.get(id).is_some_and(|v| v.attempts > 1))
        .map(|id| id.to_string())
        .collect();
    let mut times_hit: HashMap<JobId, usize> = HashMap::new();
    for id in log.hit.values().flatten() {
        *times_hit.entry(*id).or_default() += 1;
    }
    line(
        "jobs hit by a fault",
        format!("{} ({} of them by more than one)", times_hit.len(), times_hit.values().filter(|n| **n > 1).count()),
    );
    // Ids, so they can be looked up in the child logs (`--keep`).
    line(
        "re-runs of jobs no fault hit",
        if unexplained.is_empty() { "0".into() } else { format!("{} ({})", unexplained.len(), unexplained.join(", ")) },
    );
    line(
        "time from the last fault until every job ended",
        if drained { format!("{:.1} s", settled_in.as_secs_f64()) } else { "did not (stuck jobs)".into() },
    );
    line("wall time", format!("{:.1} s", wall.as_secs_f64()));
    // With several brokers, a broker's death must not run any job twice (issue 13); with one,
    // the figure is printed for comparison (a broker restart renews the leases it held).
    let twice_ok = args.brokers == 1 || broker_only_twice.is_empty();
    let ok = lost == 0 && forgotten.is_empty() && stuck == 0 && wrong.is_empty() && !accepted.is_empty() && twice_ok;
    println!(
        "{}",
        match (ok, args.brokers > 1) {
            (true, false) => "chaos: PASS (0 lost, 0 forgotten, 0 stuck, 0 wrong)",
            (true, true) => "chaos: PASS (0 lost, 0 forgotten, 0 stuck, 0 wrong, 0 run twice by a broker fault)",
            (false, _) => "chaos: FAIL (lost, forgotten, stuck, wrong or twice-run jobs above)",
        }
    );
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_differ_by_job_and_the_invert_check_catches_a_wrong_result() {
        let (a, b) = (job_frame(1, 0), job_frame(1, 1));
        assert_ne!(a, b);
        let inverted = {
            let mut img = image::load_from_memory(&a).unwrap().to_rgb8();
            img.iter_mut().for_each(|p| *p = 255 - *p);
            let mut out = std::io::Cursor::new(Vec::new());
            img.write_to(&mut out, image::ImageFormat::Png).unwrap();
            out.into_inner()
        };
        assert_eq!(check_inverted(&a, &inverted), Ok(()));
        assert!(check_inverted(&b, &inverted).is_err(), "another job's result must not pass");
        assert!(check_inverted(&a, &a).is_err());
    }
}
