//! `tdcomfy bench storage`: submit rate and result download throughput with files under
//! `DATA_DIR` and with `STORAGE_URL=s3://…` on an S3-compatible server on loopback (moto's, started
//! by the benchmark; `pip install "moto[server]"`), each against a real `tdcomfy serve` child.

use std::time::{Duration, Instant};

use anyhow::Context;

use super::{ChildServer, free_port, noise_png};

/// Options of the storage benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct StorageBenchArgs {
    /// Jobs submitted for the submit-rate figure (each storage).
    #[arg(long, default_value_t = 400)]
    pub jobs: usize,
    /// Concurrent submitters.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Size of the result downloaded, in MB.
    #[arg(long, default_value_t = 64)]
    pub result_mb: usize,
    /// Downloads of the result (each storage).
    #[arg(long, default_value_t = 5)]
    pub downloads: usize,
    /// The S3 server binary (started on a free loopback port).
    #[arg(long, env = "MOTO_SERVER", default_value = "moto_server")]
    pub moto_server: String,
}

/// Runs the benchmark and prints the figures.
pub async fn run(args: StorageBenchArgs) -> anyhow::Result<()> {
    let port = free_port()?;
    let mut moto = tokio::process::Command::new(&args.moto_server)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} (pip install \"moto[server]\")", args.moto_server))?;
    let endpoint = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder().pool_max_idle_per_host(64).build()?;
    let mut up = false;
    for _ in 0..400 {
        if http.put(format!("{endpoint}/bench")).send().await.is_ok_and(|r| r.status().is_success()) {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::ensure!(up, "the S3 server did not answer on {endpoint}");
    println!(
        "tdcomfy storage benchmark: {} submits ({} concurrent, ~100 KB PNG), {} downloads of a {} MB result",
        args.jobs, args.concurrency, args.downloads, args.result_mb
    );
    let s3_env = [
        ("STORAGE_URL", "s3://bench/tdcomfy"),
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_REGION", "us-east-1"),
    ];
    for (name, env) in [("local files (DATA_DIR)", &[][..]), ("S3 (moto on loopback)", &s3_env[..])] {
        let mut env = env.to_vec();
        env.extend([("RESULT_TTL", "0"), ("MAX_RESULT_MB", "4096")]);
        let server = ChildServer::start(&["serve"], &env).await?;
        let (rate, mbps) = measure(&http, &server.base, &args).await?;
        println!("{name:<26} submit {rate:>7.0} jobs/s   result download {mbps:>7.0} MB/s");
    }
    let _ = moto.kill().await;
    Ok(())
}

async fn measure(http: &reqwest::Client, base: &str, args: &StorageBenchArgs) -> anyhow::Result<(f64, f64)> {
    let png = noise_png(192, 176);
    let per_task = args.jobs.div_ceil(args.concurrency);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (http, base, png) = (http.clone(), base.to_owned(), png.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..per_task {
                let form = reqwest::multipart::Form::new()
                    .part("image", reqwest::multipart::Part::bytes(png.clone()).file_name("frame.png"))
                    .text("prompt", "benchmark");
                let resp = http.post(format!("{base}/jobs")).multipart(form).send().await?;
                anyhow::ensure!(resp.status() == 200, "submit answered {}", resp.status());
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let rate = (per_task * args.concurrency) as f64 / started.elapsed().as_secs_f64();

    // One job through the worker routes, with a result of `result_mb`.
    let lease: serde_json::Value = http
        .post(format!("{base}/worker/lease"))
        .json(&serde_json::json!({"worker_id": "bench", "wait": 5}))
        .send()
        .await?
        .json()
        .await?;
    let id = lease["job"]["job_id"].as_str().context("no job leased")?.to_owned();
    let token = lease["job"]["lease_token"].as_str().context("no lease token")?.to_owned();
    let result = vec![0x5au8; args.result_mb * 1024 * 1024];
    let resp = http
        .put(format!("{base}/worker/jobs/{id}/result"))
        .header("lease-token", token)
        .header("content-type", "video/mp4")
        .body(result)
        .send()
        .await?;
    anyhow::ensure!(resp.status() == 200, "result upload answered {}", resp.status());
    let started = Instant::now();
    let mut bytes = 0usize;
    for _ in 0..args.downloads {
        let mut resp = http.get(format!("{base}/jobs/{id}/result")).send().await?;
        anyhow::ensure!(resp.status() == 200, "download answered {}", resp.status());
        while let Some(chunk) = resp.chunk().await? {
            bytes += chunk.len();
        }
    }
    let mbps = bytes as f64 / (1024.0 * 1024.0) / started.elapsed().as_secs_f64();
    Ok((rate, mbps))
}
