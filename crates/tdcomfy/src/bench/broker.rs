//! `tdcomfy bench broker`: the broker's speed and memory targets, measured against a real
//! `tdcomfy serve` child process on loopback.

use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::AsyncWriteExt;

use super::loadgen::{get_load, quantile};
use super::{ChildServer, fmt_ms, noise_png, rss_kib};

/// Options of the broker benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerBenchArgs {
    /// Seconds of `GET /jobs/{id}` load.
    #[arg(long, default_value_t = 5.0)]
    pub get_seconds: f64,
    /// Connections for the GET load.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Jobs submitted for the POST throughput figure.
    #[arg(long, default_value_t = 2000)]
    pub post_jobs: usize,
    /// Concurrent submitters.
    #[arg(long, default_value_t = 16)]
    pub post_concurrency: usize,
    /// Jobs in the store for the "RSS with N jobs" figure.
    #[arg(long, default_value_t = 10_000)]
    pub fill_jobs: usize,
    /// Size of the big streamed upload in MB.
    #[arg(long, default_value_t = 200)]
    pub upload_mb: u64,
    /// Samples of queued-to-leased latency.
    #[arg(long, default_value_t = 300)]
    pub lease_samples: usize,
}

/// Runs the benchmark and prints the figures.
pub async fn run(args: BrokerBenchArgs) -> anyhow::Result<()> {
    let server = ChildServer::start(&["serve"], &[("MAX_UPLOAD_MB", "512"), ("RESULT_TTL", "0")]).await?;
    let base = server.base.clone();
    let http = reqwest::Client::builder().pool_max_idle_per_host(64).build()?;
    println!("tdcomfy broker benchmark (release build recommended), broker pid {}", server.pid());
    println!("{:<44} {}", "broker RSS idle", fmt_kib(rss_kib(server.pid())?));

    // Queued-to-leased: a worker waits in a lease long-poll; each job is submitted only when the
    // worker is waiting, and the clock runs from the submit request to the lease's arrival.
    let png_small = noise_png(64, 64);
    let mut to_lease = Vec::with_capacity(args.lease_samples);
    let mut post_rt = Vec::with_capacity(args.lease_samples);
    for _ in 0..args.lease_samples {
        let lease_http = http.clone();
        let lease_url = format!("{base}/worker/lease");
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let waiter = tokio::spawn(async move {
            let req = lease_http.post(lease_url).json(&serde_json::json!({"worker_id": "bench", "wait": 10}));
            let _ = ready_tx.send(());
            let resp = req.send().await;
            (Instant::now(), resp.map(|r| r.status().as_u16()))
        });
        let _ = ready_rx.await;
        wait_for_waiting_worker(&http, &base).await?;
        let t0 = Instant::now();
        submit(&http, &base, &png_small).await?;
        post_rt.push(t0.elapsed());
        let (leased_at, status) = waiter.await?;
        anyhow::ensure!(status.ok() == Some(200), "lease did not return a job");
        to_lease.push(leased_at.saturating_duration_since(t0));
    }
    to_lease.sort();
    post_rt.sort();
    println!(
        "{:<44} p50 {}  p99 {}  (POST round trip p50 {})",
        "submit → leased by a waiting worker",
        fmt_ms(quantile(&to_lease, 0.5)),
        fmt_ms(quantile(&to_lease, 0.99)),
        fmt_ms(quantile(&post_rt, 0.5)),
    );

    // Durable POST /jobs with a ~100 KB PNG.
    let png = noise_png(192, 176);
    let started = Instant::now();
    let per_task = args.post_jobs.div_ceil(args.post_concurrency);
    let mut tasks = Vec::new();
    for _ in 0..args.post_concurrency {
        let (http, base, png) = (http.clone(), base.clone(), png.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..per_task {
                submit(&http, &base, &png).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let posted = per_task * args.post_concurrency;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{:<44} {:.0} jobs/s ({} jobs of {} KB, {} concurrent, each fsynced)",
        "POST /jobs throughput",
        posted as f64 / secs,
        posted,
        png.len() / 1024,
        args.post_concurrency
    );

    // Fill the store to `fill_jobs` with small frames, then measure memory.
    let have = posted + args.lease_samples;
    let remaining = args.fill_jobs.saturating_sub(have);
    let per_task = remaining.div_ceil(args.post_concurrency);
    let mut tasks = Vec::new();
    for _ in 0..args.post_concurrency {
        let (http, base, png) = (http.clone(), base.clone(), png_small.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..per_task {
                submit(&http, &base, &png).await?;
            }
            anyhow::Ok(())
        }));
    }
    let mut last_id = String::new();
    for t in tasks {
        t.await??;
    }
    let list: serde_json::Value = http.get(format!("{base}/jobs?limit=1")).send().await?.json().await?;
    if let Some(id) = list["jobs"][0]["id"].as_str() {
        last_id = id.to_owned();
    }
    let health: serde_json::Value = http.get(format!("{base}/health")).send().await?.json().await?;
    println!("{:<44} {}", format!("broker RSS with {} jobs", health["jobs_count"]), fmt_kib(rss_kib(server.pid())?));

    // GET /jobs/{id} at N connections (the newest job: queued, so its queue position is counted).
    let addr = base.trim_start_matches("http://").to_owned();
    let report =
        get_load(&addr, &format!("/jobs/{last_id}"), args.connections, Duration::from_secs_f64(args.get_seconds))
            .await?;
    println!(
        "{:<44} {:.0} req/s  p50 {}  p99 {}  ({} failed)",
        format!("GET /jobs/{{id}} at {} connections", args.connections),
        report.rate(),
        fmt_ms(quantile(&report.latencies, 0.5)),
        fmt_ms(quantile(&report.latencies, 0.99)),
        report.failed
    );

    // A big upload, streamed: sample the broker's RSS while it arrives.
    let before = rss_kib(server.pid())?;
    let pid = server.pid();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(kib) = rss_kib(pid) {
                    peak.fetch_max(kib, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let t = Instant::now();
    big_upload(&addr, args.upload_mb * 1024 * 1024).await.context("streaming the big upload")?;
    let upload_secs = t.elapsed().as_secs_f64();
    sampler.abort();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed).max(rss_kib(pid)?);
    println!(
        "{:<44} +{} (peak {}; {} MB in {:.1} s)",
        format!("broker RSS during a {} MB upload", args.upload_mb),
        fmt_kib(peak.saturating_sub(before)),
        fmt_kib(peak),
        args.upload_mb,
        upload_secs
    );
    Ok(())
}

async fn wait_for_waiting_worker(http: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    // The lease request was sent; wait until the broker reports the worker as waiting so the
    // measurement starts from an idle worker, as in production.
    for _ in 0..2000 {
        let h: serde_json::Value = http.get(format!("{base}/health")).send().await?.json().await?;
        if h["workers"].as_array().is_some_and(|w| w.iter().any(|w| w["last_seen_ms_ago"] == 0)) {
            return Ok(());
        }
        tokio::task::yield_now().await;
    }
    anyhow::bail!("the benchmark worker never showed up as waiting")
}

async fn submit(http: &reqwest::Client, base: &str, png: &[u8]) -> anyhow::Result<()> {
    let form = reqwest::multipart::Form::new()
        .part("image", reqwest::multipart::Part::bytes(png.to_vec()).file_name("frame.png"))
        .text("prompt", "benchmark");
    let resp = http.post(format!("{base}/jobs")).multipart(form).send().await?;
    anyhow::ensure!(resp.status() == 200, "submit answered {}", resp.status());
    Ok(())
}

/// Streams a multipart body of `size` bytes (a PNG header, then zeros) over a raw socket.
async fn big_upload(addr: &str, size: u64) -> anyhow::Result<()> {
    let boundary = "tdcomfybenchboundary";
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.png\"\r\nContent-Type: image/png\r\n\r\n"
    );
    let tail = format!("\r\n--{boundary}--\r\n");
    let png_head = noise_png(16, 16);
    let total = head.len() as u64 + size + tail.len() as u64;
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    conn.write_all(
        format!(
            "POST /jobs HTTP/1.1\r\nHost: bench\r\nContent-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {total}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(&png_head).await?;
    let zeros = vec![0u8; 256 * 1024];
    let mut left = size - png_head.len() as u64;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        conn.write_all(&zeros[..n]).await?;
        left -= n as u64;
    }
    conn.write_all(tail.as_bytes()).await?;
    let mut buf = vec![0u8; 4096];
    let status = super::loadgen::read_response(&mut conn, &mut buf).await?;
    anyhow::ensure!(status == 200, "big upload answered {status}");
    Ok(())
}

fn fmt_kib(kib: u64) -> String {
    format!("{:.1} MB", kib as f64 / 1024.0)
}

/// Options of the sweep benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct SweepBenchArgs {
    /// Finished jobs in the database.
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: u64,
    /// Sweeps timed.
    #[arg(long, default_value_t = 50)]
    pub sweeps: usize,
    /// Seconds of sequential `GET /health`.
    #[arg(long, default_value_t = 3.0)]
    pub health_seconds: f64,
}

/// `tdcomfy bench sweep`: the cost of housekeeping and `/health` with a large history. Fills the
/// database with `rows` finished jobs (spread over the last six days, the newest 10,000 still
/// holding files, so nothing is due with the default RESULT_TTL and JOB_RETENTION), times the
/// broker's sweep in-process, then times `/health` against a `tdcomfy serve` child on that data.
pub async fn run_sweep(args: SweepBenchArgs) -> anyhow::Result<()> {
    let dir = super::TempDir::new("tdcomfy-bench-sweep")?;
    let data = dir.0.join("data");
    std::fs::create_dir_all(&data)?;
    let t = Instant::now();
    {
        let store =
            tdcomfy_broker::store::Store::open(&data.join("jobs.sqlite3"), tdcomfy_broker::clock::Clock::system())?;
        store.fill_finished_for_benchmark(args.rows, 6 * 86_400_000, args.rows.min(10_000)).await?;
    }
    println!("tdcomfy sweep benchmark: {} finished jobs stored in {:.1} s", args.rows, t.elapsed().as_secs_f64());

    let workflows = std::sync::Arc::new(
        tdcomfy_workflows::WorkflowArgs {
            workflows_dir: std::env::current_dir()?.join("workflows"),
            default_workflow: "ltxv_image_to_video".into(),
            workflow_nodes: None,
        }
        .load()?,
    );
    let args_for = |job_retention: u64| tdcomfy_broker::BrokerArgs {
        job_retention,
        ..tdcomfy_broker::BrokerArgs::loopback(data.clone())
    };
    {
        let broker = tdcomfy_broker::Broker::open(args_for(604_800).into_config(workflows.clone())?).await?;
        broker.sweep().await?; // warm the page cache and statement caches
        let mut times = Vec::with_capacity(args.sweeps);
        for _ in 0..args.sweeps {
            let t = Instant::now();
            broker.sweep().await?;
            times.push(t.elapsed());
        }
        times.sort();
        println!(
            "{:<44} p50 {}  p99 {}  max {}  ({} sweeps, RESULT_TTL and JOB_RETENTION at their defaults)",
            "sweep with nothing due",
            fmt_ms(quantile(&times, 0.5)),
            fmt_ms(quantile(&times, 0.99)),
            fmt_ms(*times.last().unwrap_or(&Duration::ZERO)),
            args.sweeps
        );
    }
    {
        // A backlog: with JOB_RETENTION at three days, half the rows are due; each sweep deletes a
        // batch, so no sweep holds the writer for long however large the backlog.
        let broker = tdcomfy_broker::Broker::open(args_for(3 * 86_400).into_config(workflows)?).await?;
        let mut times = Vec::new();
        for _ in 0..10 {
            let t = Instant::now();
            broker.sweep().await?;
            times.push(t.elapsed());
        }
        times.sort();
        println!(
            "{:<44} p50 {}  max {}  (10 sweeps, {} records each)",
            "sweep deleting a JOB_RETENTION backlog",
            fmt_ms(quantile(&times, 0.5)),
            fmt_ms(*times.last().unwrap_or(&Duration::ZERO)),
            tdcomfy_broker::store::RETENTION_BATCH
        );
    }

    let data_env = data.to_string_lossy().into_owned();
    let server = ChildServer::start(&["serve"], &[("DATA_DIR", data_env.as_str())]).await?;
    let addr = server.base.trim_start_matches("http://").to_owned();
    let report = get_load(&addr, "/health", 1, Duration::from_secs_f64(args.health_seconds)).await?;
    println!(
        "{:<44} p50 {}  p99 {}  ({} requests, {} failed)",
        format!("GET /health with {} jobs stored", args.rows),
        fmt_ms(quantile(&report.latencies, 0.5)),
        fmt_ms(quantile(&report.latencies, 0.99)),
        report.ok,
        report.failed
    );
    drop(server);
    drop(dir);
    Ok(())
}
