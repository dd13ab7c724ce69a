//! `tdcomfy bench cluster`: the broker's figures on one machine's topologies — SQLite with one
//! broker, PostgreSQL with one broker and with three sharing the database — side by side: submit
//! rate, `GET /jobs/{id}` rate, how long an event takes to cross from one broker to another, and
//! queued-to-leased latency when the worker waits on another broker than the submitter's.

use std::time::{Duration, Instant};

use anyhow::Context;
use tdcomfy_api::{JobId, JobStatus, SubmitResponse};

use super::loadgen::{LoadReport, get_load, quantile};
use super::{ChildServer, TempDir, fmt_ms, noise_png};

/// Options of the cluster benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterBenchArgs {
    /// A PostgreSQL server (`postgres://user@host:port/db`): each PostgreSQL topology gets a
    /// fresh database of its own on it, dropped afterwards. Without it only SQLite is measured.
    #[arg(long, env = "BENCH_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Brokers of the several-brokers topology.
    #[arg(long, default_value_t = 3)]
    pub brokers: usize,
    /// Jobs submitted for the submit rate.
    #[arg(long, default_value_t = 600)]
    pub post_jobs: usize,
    /// Concurrent submitters (spread over the brokers).
    #[arg(long, default_value_t = 8)]
    pub post_concurrency: usize,
    /// Seconds of `GET /jobs/{id}` load.
    #[arg(long, default_value_t = 4.0)]
    pub get_seconds: f64,
    /// Connections of the GET load (spread over the brokers).
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// Samples of each latency.
    #[arg(long, default_value_t = 100)]
    pub samples: usize,
}

/// One topology's figures.
struct Figures {
    name: String,
    submit_rate: f64,
    get: LoadReport,
    event: Vec<Duration>,
    lease: Vec<Duration>,
}

/// A database made for one topology on the benchmark's server, dropped by [`TempDatabase::drop_now`].
struct TempDatabase {
    server: String,
    name: String,
    url: String,
}

impl TempDatabase {
    async fn create(server: &str) -> anyhow::Result<TempDatabase> {
        let name = format!("tdcomfy_bench_{}", JobId::new().to_string().replace('-', ""));
        let client = connect(server).await?;
        client.batch_execute(&format!("CREATE DATABASE \"{name}\"")).await.context("CREATE DATABASE")?;
        let mut url = reqwest::Url::parse(server).context("--database-url is not a URL")?;
        url.set_path(&format!("/{name}"));
        Ok(TempDatabase { server: server.to_owned(), name, url: url.to_string() })
    }

    async fn drop_now(self) -> anyhow::Result<()> {
        let client = connect(&self.server).await?;
        // FORCE: a killed broker's connections may not have been noticed by the server yet.
        client.batch_execute(&format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name)).await?;
        Ok(())
    }
}

async fn connect(server: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) =
        tokio_postgres::connect(server, tokio_postgres::NoTls).await.context("connecting to --database-url")?;
    tokio::spawn(conn);
    Ok(client)
}

/// Runs the benchmark and prints the table.
pub async fn run(args: ClusterBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.brokers >= 2, "--brokers must be at least 2 (the several-brokers topology)");
    anyhow::ensure!(args.samples > 0 && args.post_jobs > 0 && args.post_concurrency > 0, "counts must be positive");
    println!(
        "tdcomfy cluster benchmark (release build recommended): {} submits ({} concurrent), {} s of GET at {} \
         connections, {} latency samples; every broker is a `tdcomfy serve` child on loopback",
        args.post_jobs, args.post_concurrency, args.get_seconds, args.connections, args.samples
    );
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!(
        "{cores} cores for everything: brokers, PostgreSQL and this load generator share them, so more brokers \
         cannot raise throughput here; the figures show what crossing brokers costs"
    );
    let mut rows = vec![topology(&args, "SQLite, 1 broker", 1, None).await?];
    match &args.database_url {
        Some(server) => {
            for n in [1, args.brokers] {
                let db = TempDatabase::create(server).await?;
                let name = format!("PostgreSQL, {n} broker{}", if n == 1 { "" } else { "s" });
                let row = topology(&args, &name, n, Some(&db.url)).await;
                db.drop_now().await?;
                rows.push(row?);
            }
        }
        None => println!("(no --database-url: PostgreSQL topologies skipped)"),
    }
    println!();
    println!(
        "{:<24} {:>14} {:>22} {:>26} {:>26}",
        "topology", "submit jobs/s", "GET /jobs/{id} req/s", "event across brokers", "queued→leased across"
    );
    for r in &rows {
        let pair = |v: &[Duration]| {
            format!("p50 {} p99 {}", fmt_ms(quantile(v, 0.5)), fmt_ms(quantile(v, 0.99))).replace(" ms", "")
        };
        println!(
            "{:<24} {:>14.0} {:>22} {:>26} {:>26}",
            r.name,
            r.submit_rate,
            format!("{:.0} (p99 {})", r.get.rate(), fmt_ms(quantile(&r.get.latencies, 0.99))),
            format!("{} ms", pair(&r.event)),
            format!("{} ms", pair(&r.lease)),
        );
    }
    println!(
        "(one broker: \"across\" is the same broker. Event: POST /jobs sent to broker 1 → its `queued` event read on \
         broker 2's /events. Queued→leased: POST to broker 1 → the lease long-poll waiting on broker 2 answers.)"
    );
    Ok(())
}

/// Starts `n` brokers (on `database` when set, sharing a directory for files), measures, stops.
async fn topology(args: &ClusterBenchArgs, name: &str, n: usize, database: Option<&str>) -> anyhow::Result<Figures> {
    let shared = TempDir::new("tdcomfy-bench-cluster")?;
    let storage = format!("file://{}", shared.0.display());
    let mut env: Vec<(&str, &str)> = vec![("MAX_QUEUE", "1000000"), ("MAX_UPLOAD_MB", "64")];
    if let Some(url) = database {
        env.push(("DATABASE_URL", url));
        env.push(("STORAGE_URL", &storage));
    }
    let mut brokers = Vec::new();
    for _ in 0..n {
        brokers.push(ChildServer::start(&["serve"], &env).await?);
    }
    let bases: Vec<String> = brokers.iter().map(|b| b.base.clone()).collect();
    let (first, second) = (&bases[0], &bases[1 % n]);
    let http = reqwest::Client::builder().pool_max_idle_per_host(64).build()?;
    let small = noise_png(64, 64);
    print!("{name}: ");

    // Queued→leased first, while the queue is empty (a waiting worker would otherwise get an
    // older job at once).
    let mut lease = Vec::with_capacity(args.samples);
    for _ in 0..args.samples {
        let (lease_http, url) = (http.clone(), format!("{second}/worker/lease"));
        let waiter = tokio::spawn(async move {
            let resp = lease_http.post(url).json(&serde_json::json!({"worker_id": "bench", "wait": 10})).send().await;
            (Instant::now(), resp.map(|r| r.status().as_u16()))
        });
        wait_for_waiting_worker(&http, second).await?;
        let t0 = Instant::now();
        submit(&http, first, &small).await?;
        let (leased_at, status) = waiter.await?;
        anyhow::ensure!(status.ok() == Some(200), "the lease on {second} did not return the job submitted on {first}");
        lease.push(leased_at.saturating_duration_since(t0));
    }
    lease.sort();
    print!("leases ");

    // An event crossing brokers: broker 2's /events hears the `queued` of a job posted to broker 1.
    let resp = http.get(format!("{second}/events")).send().await?;
    anyhow::ensure!(resp.status().is_success(), "{second}/events answered {}", resp.status());
    let mut events = crate::sse::JobEvents::new(resp);
    let mut event = Vec::with_capacity(args.samples);
    for _ in 0..args.samples {
        let t0 = Instant::now();
        let id = submit(&http, first, &small).await?;
        let heard = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(e) = events.next().await? {
                if e.job.id == id && e.job.status == JobStatus::Queued {
                    return anyhow::Ok(Instant::now());
                }
            }
            anyhow::bail!("{second}/events ended")
        })
        .await
        .with_context(|| format!("{second} never told of job {id}"))??;
        event.push(heard - t0);
    }
    event.sort();
    drop(events);
    print!("events ");

    // Submit rate: ~100 KB frames, each submitter on a broker of its own (round robin).
    let frame = noise_png(192, 176);
    let per_task = args.post_jobs.div_ceil(args.post_concurrency);
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut last = None;
    for t in 0..args.post_concurrency {
        let (http, base, frame) = (http.clone(), bases[t % n].clone(), frame.clone());
        tasks.push(tokio::spawn(async move {
            let mut id = None;
            for _ in 0..per_task {
                id = Some(submit(&http, &base, &frame).await?);
            }
            anyhow::Ok(id)
        }));
    }
    for t in tasks {
        last = t.await??.or(last);
    }
    let submit_rate = (per_task * args.post_concurrency) as f64 / started.elapsed().as_secs_f64();
    print!("submits ");

    // GET /jobs/{id}: the connections spread over the brokers, all at once.
    let id = last.context("no job submitted")?;
    let path = format!("/jobs/{id}");
    let duration = Duration::from_secs_f64(args.get_seconds);
    let per_broker = args.connections.div_ceil(n).max(1);
    let loads = bases.iter().map(|b| {
        let addr = b.trim_start_matches("http://").to_owned();
        let path = path.clone();
        async move { get_load(&addr, &path, per_broker, duration).await }
    });
    let mut get = LoadReport { ok: 0, failed: 0, elapsed: Duration::ZERO, latencies: Vec::new() };
    for r in futures_util::future::join_all(loads).await {
        let r = r?;
        get.ok += r.ok;
        get.failed += r.failed;
        get.elapsed = get.elapsed.max(r.elapsed);
        get.latencies.extend(r.latencies);
    }
    get.latencies.sort();
    anyhow::ensure!(get.failed == 0, "{} GET requests failed", get.failed);
    println!("GETs done");
    drop(brokers);
    Ok(Figures { name: name.to_owned(), submit_rate, get, event, lease })
}

async fn submit(http: &reqwest::Client, base: &str, png: &[u8]) -> anyhow::Result<JobId> {
    let form = reqwest::multipart::Form::new()
        .part("image", reqwest::multipart::Part::bytes(png.to_vec()).file_name("frame.png"))
        .text("prompt", "benchmark");
    let resp = http.post(format!("{base}/jobs")).multipart(form).send().await?;
    anyhow::ensure!(resp.status() == 200, "submit to {base} answered {}", resp.status());
    Ok(resp.json::<SubmitResponse>().await?.job_id)
}

/// Waits until `base` reports the benchmark's lease request as waiting, so each sample starts
/// from an idle worker, as in production.
async fn wait_for_waiting_worker(http: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    for _ in 0..2000 {
        let h: serde_json::Value = http.get(format!("{base}/health")).send().await?.json().await?;
        if h["workers"].as_array().is_some_and(|w| w.iter().any(|w| w["last_seen_ms_ago"] == 0)) {
            return Ok(());
        }
        tokio::task::yield_now().await;
    }
    anyhow::bail!("the benchmark's lease request never showed up as waiting on {base}")
}
