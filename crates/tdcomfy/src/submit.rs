//! `tdcomfy submit`: send a frame, follow the job live, download the result.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use tdcomfy_api::{ErrorBody, JobStatus, JobView, SubmitResponse};
use tokio::io::AsyncWriteExt;

use crate::broker_target::BrokerTarget;

/// `tdcomfy submit`.
#[derive(Debug, clap::Args)]
pub struct SubmitCmd {
    /// The frame to send (PNG, JPEG or WebP).
    image: PathBuf,
    /// Positive prompt.
    #[arg(long, default_value = "")]
    prompt: String,
    /// Negative prompt.
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Seed (integer).
    #[arg(long)]
    seed: Option<u64>,
    /// Workflow name (see GET /workflows); default: the broker's DEFAULT_WORKFLOW.
    #[arg(long)]
    workflow: Option<String>,
    /// Named workflow inputs as a JSON object, e.g. '{"frames": 49}'.
    #[arg(long)]
    params: Option<String>,
    /// Where to write the result. Default: <job id>.<ext> in the current directory.
    #[arg(long, short)]
    out: Option<PathBuf>,
    #[command(flatten)]
    broker: BrokerTarget,
    /// Print only the result path (no progress bar).
    #[arg(long, short)]
    quiet: bool,
}

struct Broker {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Broker {
    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self.http.request(method, format!("{}{}", self.base, path));
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }
}

async fn api_error(resp: reqwest::Response) -> anyhow::Error {
    let status = resp.status();
    match resp.json::<ErrorBody>().await {
        Ok(body) => anyhow::anyhow!("{} ({}, HTTP {})", body.error.message, body.error.code, status.as_u16()),
        Err(_) => anyhow::anyhow!("the broker answered HTTP {status}"),
    }
}

/// Runs `submit`; the exit code is non-zero when the job failed or was cancelled.
pub async fn run(cmd: SubmitCmd) -> anyhow::Result<std::process::ExitCode> {
    let broker = Broker { http: cmd.broker.http()?, base: cmd.broker.base(), token: cmd.broker.token() };
    let file = tokio::fs::File::open(&cmd.image).await.with_context(|| format!("opening {}", cmd.image.display()))?;
    let size = file.metadata().await?.len();
    let name = cmd.image.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "frame".into());
    let part = reqwest::multipart::Part::stream_with_length(
        reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file)),
        size,
    )
    .file_name(name);
    let mut form = reqwest::multipart::Form::new()
        .part("image", part)
        .text("prompt", cmd.prompt.clone())
        .text("negative_prompt", cmd.negative_prompt.clone());
    if let Some(seed) = cmd.seed {
        form = form.text("seed", seed.to_string());
    }
    if let Some(w) = &cmd.workflow {
        form = form.text("workflow", w.clone());
    }
    if let Some(p) = &cmd.params {
        form = form.text("params", p.clone());
    }
    let resp = broker
        .req(reqwest::Method::POST, "/jobs")
        .header("Idempotency-Key", tdcomfy_api::JobId::new().to_string())
        .multipart(form)
        .send()
        .await
        .with_context(|| format!("could not reach the broker at {}", broker.base))?;
    if !resp.status().is_success() {
        return Err(api_error(resp).await);
    }
    let submitted: SubmitResponse = resp.json().await?;
    let id = submitted.job_id;
    if !cmd.quiet {
        eprintln!("job {id} queued (workflow {})", submitted.workflow);
    }
    let job = follow(&broker, id, cmd.quiet).await?;
    match job.status {
        JobStatus::Done => {}
        JobStatus::Error => {
            eprintln!("job {id} failed: {}", job.error_message.as_deref().unwrap_or("no reason given"));
            return Ok(std::process::ExitCode::FAILURE);
        }
        status => {
            eprintln!("job {id} ended {status}");
            return Ok(std::process::ExitCode::FAILURE);
        }
    }
    let content_type = job.result.as_ref().map(|r| r.content_type.clone()).unwrap_or_default();
    let out = cmd
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{id}.{}", tdcomfy_api::media::extension_for_mime(&content_type))));
    let bytes = download(&broker, id, &out).await?;
    if cmd.quiet {
        println!("{}", out.display());
    } else {
        eprintln!(
            "done in {:.1} s: {} ({} bytes, {content_type})",
            job.processing_time.unwrap_or_default(),
            out.display(),
            bytes
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Follows the job over SSE (falling back to long-polling when the stream breaks) until it ends.
async fn follow(broker: &Broker, id: tdcomfy_api::JobId, quiet: bool) -> anyhow::Result<JobView> {
    let mut bar = ProgressBar { quiet, last: String::new() };
    loop {
        match follow_sse(broker, id, &mut bar).await {
            Ok(job) if job.status.is_terminal() => {
                bar.finish();
                return Ok(job);
            }
            _ => {
                // Long-poll once, then try the stream again.
                let resp = broker.req(reqwest::Method::GET, &format!("/jobs/{id}?wait=20")).send().await;
                match resp {
                    Ok(r) if r.status().is_success() => {
                        let job: JobView = r.json().await?;
                        bar.show(&job);
                        if job.status.is_terminal() {
                            bar.finish();
                            return Ok(job);
                        }
                    }
                    Ok(r) => return Err(api_error(r).await),
                    Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                }
            }
        }
    }
}

async fn follow_sse(broker: &Broker, id: tdcomfy_api::JobId, bar: &mut ProgressBar) -> anyhow::Result<JobView> {
    let resp = broker.req(reqwest::Method::GET, &format!("/jobs/{id}/events")).send().await?;
    if !resp.status().is_success() {
        return Err(api_error(resp).await);
    }
    let mut events = crate::sse::JobEvents::new(resp);
    let mut last: Option<JobView> = None;
    while let Some(event) = events.next().await? {
        bar.show(&event.job);
        last = Some(event.job);
    }
    last.context("the event stream ended without an event")
}

async fn download(broker: &Broker, id: tdcomfy_api::JobId, out: &std::path::Path) -> anyhow::Result<u64> {
    let resp = broker.req(reqwest::Method::GET, &format!("/jobs/{id}/result")).send().await?;
    if !resp.status().is_success() {
        return Err(api_error(resp).await);
    }
    let part = out.with_extension("part");
    let mut file = tokio::fs::File::create(&part).await.with_context(|| format!("creating {}", part.display()))?;
    let mut stream = resp.bytes_stream();
    let mut n = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        n += chunk.len() as u64;
        file.write_all(&chunk).await?;
    }
    file.flush().await?;
    drop(file);
    tokio::fs::rename(&part, out).await?;
    Ok(n)
}

struct ProgressBar {
    quiet: bool,
    last: String,
}

impl ProgressBar {
    fn show(&mut self, job: &JobView) {
        if self.quiet {
            return;
        }
        let line = match job.status {
            JobStatus::Queued => format!("queued, position {}", job.queue_position.unwrap_or(0)),
            _ => {
                let p = job.progress.value.clamp(0.0, 1.0);
                let filled = (p * 30.0).round() as usize;
                let step = match (job.progress.step, job.progress.max_steps) {
                    (Some(s), Some(m)) => format!(" step {s}/{m}"),
                    _ => String::new(),
                };
                let node = job.progress.node_type.as_deref().map(|n| format!(" {n}")).unwrap_or_default();
                format!(
                    "[{}{}] {:>3.0}% {}{step}{node}",
                    "#".repeat(filled),
                    " ".repeat(30 - filled),
                    p * 100.0,
                    job.status
                )
            }
        };
        if line != self.last {
            if std::io::stderr().is_terminal() {
                eprint!("\r\x1b[2K{line}");
            } else {
                // A pipe or a file keeps every byte: one line per change, no redraw codes.
                eprintln!("{line}");
            }
            let _ = std::io::stderr().flush();
            self.last = line;
        }
    }

    fn finish(&mut self) {
        if !self.quiet && !self.last.is_empty() && std::io::stderr().is_terminal() {
            eprintln!();
        }
    }
}
