//! `tdcomfy bench`: documented benchmark commands that print the figures the README reports.
//! They drive real child processes of this same binary over loopback, so memory figures are the
//! broker's own and not the load generator's.

pub mod broker;
pub mod chaos;
pub mod claims;
pub mod cluster;
pub mod dashboard;
pub mod live;
pub mod loadgen;
pub mod pipeline;
pub mod preview;
pub mod storage;

use std::time::Duration;

use anyhow::Context;

/// Which benchmark.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Broker throughput, queued-to-leased latency and memory (GET/POST rates, RSS).
    Broker(broker::BrokerBenchArgs),
    /// Store claim throughput: SQLite, and PostgreSQL with several broker handles on one database
    /// claiming at once (each job leased exactly once, checked).
    Claims(claims::ClaimsBenchArgs),
    /// Housekeeping and `/health` with a million finished jobs stored: sweep time, `/health` latency.
    Sweep(broker::SweepBenchArgs),
    /// The TouchDesigner loop against broker + worker + simulator: per-frame overhead.
    Pipeline(pipeline::PipelineBenchArgs),
    /// Preview latency: ComfyUI's binary preview frame → the client's preview file, p50/p99.
    Preview(preview::PreviewBenchArgs),
    /// Submit rate and result download throughput, local files vs S3 (moto on loopback).
    Storage(storage::StorageBenchArgs),
    /// What 50 open dashboards and a Prometheus scrape every second cost the broker at 20 jobs/s.
    Dashboard(dashboard::DashboardBenchArgs),
    /// Live use: GPU duty cycle (PREFETCH=0 and 1), 4 servers against 1, staleness in latest
    /// mode at 60 fps, a static scene with dedupe; real `sim` and `up` child processes.
    Live(live::LiveBenchArgs),
    /// The reliability proof: SIGKILL and restart broker, worker and simulator under load; count
    /// lost, stuck, wrong and re-run jobs (exit 1 on any lost, stuck or wrong).
    Chaos(chaos::ChaosBenchArgs),
    /// SQLite with one broker against PostgreSQL with one and with several: submit and GET
    /// rates, event latency across brokers, queued-to-leased latency across brokers.
    Cluster(cluster::ClusterBenchArgs),
}

/// Runs a benchmark; only the chaos run has a verdict of its own (its exit code).
pub async fn run(cmd: BenchCommand) -> anyhow::Result<std::process::ExitCode> {
    match cmd {
        BenchCommand::Broker(a) => broker::run(a).await.map(|()| std::process::ExitCode::SUCCESS),
        BenchCommand::Claims(a) => claims::run(a).await.map(|()| std::process::ExitCode::SUCCESS),
        BenchCommand::Sweep(a) => broker::run_sweep(a).await.map(|()| std::process::ExitCode::SUCCESS),
        BenchCommand::Pipeline(a) => pipeline::run(a).await.map(|()| std::process::ExitCode::SUCCESS),
        BenchCommand::Preview(a) => preview::run(a).await.map(|()| std::process::ExitCode::SUCCESS),
        BenchCommand::Storage(a) => storage::run(a).await.map(|()| std::process::ExitCode::SUCCESS),
        BenchCommand::Dashboard(a) => dashboard::run(a).await.map(|()| std::process::ExitCode::SUCCESS),
        BenchCommand::Live(a) => live::run(a).await.map(|()| std::process::ExitCode::SUCCESS),
        BenchCommand::Chaos(a) => chaos::run(a).await,
        BenchCommand::Cluster(a) => cluster::run(a).await.map(|()| std::process::ExitCode::SUCCESS),
    }
}

/// A `tdcomfy` child process serving HTTP on a free loopback port with a temporary data dir.
pub struct ChildServer {
    child: tokio::process::Child,
    /// `http://127.0.0.1:PORT` of the broker.
    pub base: String,
    _dir: TempDir,
}

/// A temporary directory removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    /// Creates a fresh directory under the system temp dir.
    pub fn new(prefix: &str) -> std::io::Result<TempDir> {
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{}", std::process::id(), tdcomfy_api::JobId::new()));
        std::fs::create_dir_all(&path)?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free TCP port on loopback (bound and released; fine for benchmarks).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl ChildServer {
    /// Starts `tdcomfy <args>` with API_HOST/API_PORT/DATA_DIR set and `env` added, and waits for
    /// `/health`.
    pub async fn start(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<ChildServer> {
        let dir = TempDir::new("tdcomfy-bench")?;
        let port = free_port()?;
        let exe = std::env::current_exe().context("locating the tdcomfy binary")?;
        let workflows = std::env::current_dir()?.join("workflows");
        let mut cmd = tokio::process::Command::new(exe);
        cmd.args(args)
            .env("API_HOST", "127.0.0.1")
            .env("API_PORT", port.to_string())
            .env("DATA_DIR", dir.0.join("data"))
            .env("WORKFLOWS_DIR", workflows)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().context("starting the child server")?;
        let base = format!("http://127.0.0.1:{port}");
        let server = ChildServer { child, base, _dir: dir };
        let http = reqwest::Client::new();
        for _ in 0..600 {
            if http.get(format!("{}/health", server.base)).send().await.is_ok_and(|r| r.status() == 200) {
                return Ok(server);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("the child server did not answer /health within 30 s")
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }
}

/// Resident set size of a process in KiB (Linux `/proc`).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).context("reading /proc (Linux only)")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS line")
}

/// A PNG of pseudo-random pixels: it does not compress, so its size is about `w*h*3` bytes.
pub fn noise_png(w: u32, h: u32) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let img = image::RgbImage::from_fn(w, h, |_, _| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let b = state.to_le_bytes();
        image::Rgb([b[0], b[1], b[2]])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).expect("PNG encoding to memory cannot fail");
    out.into_inner()
}

/// Milliseconds with two decimals.
pub fn fmt_ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}
