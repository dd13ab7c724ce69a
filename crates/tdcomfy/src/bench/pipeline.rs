//! `tdcomfy bench pipeline`: the TouchDesigner loop (submit, wait for done via events, download,
//! next) against broker + worker + simulator in a `tdcomfy up --simulate` child process, reporting
//! per-frame overhead = end-to-end time minus ComfyUI's (the simulator's) own execution time.

use std::time::{Duration, Instant};

use anyhow::Context;
use tdcomfy_api::{JobStatus, JobView};

use super::loadgen::quantile;
use super::{ChildServer, fmt_ms, free_port};

/// Options of the pipeline benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct PipelineBenchArgs {
    /// Frames to push through the loop.
    #[arg(long, default_value_t = 40)]
    pub frames: usize,
    /// The simulator's fixed sampler time per job, in seconds.
    #[arg(long, default_value_t = 0.2)]
    pub sim_job_time: f64,
    /// Frames per clip (the LTXV `frames` parameter); the default 97 gives a clip of about 1 MB.
    #[arg(long, default_value_t = 97)]
    pub clip_frames: u32,
}

/// Runs the benchmark and prints the figures.
pub async fn run(args: PipelineBenchArgs) -> anyhow::Result<()> {
    let sim_port = free_port()?.to_string();
    let job_time = args.sim_job_time.to_string();
    let server = ChildServer::start(
        &["up", "--simulate"],
        &[("COMFYUI_PORT", sim_port.as_str()), ("SIM_JOB_TIME", job_time.as_str()), ("RESULT_TTL", "0")],
    )
    .await?;
    let http = reqwest::Client::new();
    let frame = super::noise_png(512, 320);
    let params = format!(r#"{{"frames": {}}}"#, args.clip_frames);
    println!(
        "tdcomfy pipeline benchmark: {} frames of 512x320 PNG ({} KB) through up --simulate, sampler {} s",
        args.frames,
        frame.len() / 1024,
        args.sim_job_time
    );
    let (mut overhead, mut e2e, mut comfy) = (Vec::new(), Vec::new(), Vec::new());
    let mut result_bytes = 0usize;
    let dir = super::TempDir::new("tdcomfy-bench-out")?;
    for i in 0..args.frames {
        let t0 = Instant::now();
        let form = reqwest::multipart::Form::new()
            .part("image", reqwest::multipart::Part::bytes(frame.clone()).file_name("frame.png"))
            .text("prompt", format!("frame {i}"))
            .text("params", params.clone());
        let resp = http.post(format!("{}/jobs", server.base)).multipart(form).send().await?;
        anyhow::ensure!(resp.status() == 200, "submit answered {}", resp.status());
        let id = resp.json::<serde_json::Value>().await?["job_id"].as_str().context("job_id")?.to_owned();
        let job = wait_done(&http, &server.base, &id).await?;
        anyhow::ensure!(job.status == JobStatus::Done, "job {id} ended {}: {:?}", job.status, job.error_message);
        // Download to a unique file, as the TD client does.
        let mut resp = http.get(format!("{}/jobs/{id}/result", server.base)).send().await?;
        let path = dir.0.join(format!("{id}.mp4"));
        let mut file = tokio::fs::File::create(&path).await?;
        let mut n = 0;
        while let Some(chunk) = resp.chunk().await? {
            n += chunk.len();
            tokio::io::AsyncWriteExt::write_all(&mut file, &chunk).await?;
        }
        let total = t0.elapsed();
        let exec = Duration::from_secs_f64(job.timings.comfy_execution.context("no ComfyUI execution time reported")?);
        result_bytes = n;
        if i > 0 {
            // The first frame pays one-off costs (sockets, caches); it is not a steady-state frame.
            e2e.push(total);
            comfy.push(exec);
            overhead.push(total.saturating_sub(exec));
        }
    }
    overhead.sort();
    e2e.sort();
    comfy.sort();
    println!("{:<40} {} KB", "result size", result_bytes / 1024);
    println!(
        "{:<40} p50 {}  p99 {}",
        "end to end per frame",
        fmt_ms(quantile(&e2e, 0.5)),
        fmt_ms(quantile(&e2e, 0.99))
    );
    println!(
        "{:<40} p50 {}  p99 {}",
        "ComfyUI (simulator) execution",
        fmt_ms(quantile(&comfy, 0.5)),
        fmt_ms(quantile(&comfy, 0.99))
    );
    println!(
        "{:<40} p50 {}  p99 {}  max {}",
        "per-frame overhead (e2e - execution)",
        fmt_ms(quantile(&overhead, 0.5)),
        fmt_ms(quantile(&overhead, 0.99)),
        fmt_ms(overhead.last().copied().unwrap_or_default())
    );
    Ok(())
}

/// Follows the job's SSE stream until a terminal state.
async fn wait_done(http: &reqwest::Client, base: &str, id: &str) -> anyhow::Result<JobView> {
    let resp = http.get(format!("{base}/jobs/{id}/events")).send().await?;
    let mut events = crate::sse::JobEvents::new(resp);
    while let Some(event) = events.next().await? {
        if event.job.status.is_terminal() {
            return Ok(event.job);
        }
    }
    anyhow::bail!("the event stream of job {id} ended before the job did")
}
