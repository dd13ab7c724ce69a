//! The worker loop: lease a job, run it on ComfyUI, report progress, deliver the result, repeat.
//!
//! One job at a time per worker process. Each step that crosses the network has a rule for when
//! the other side is away: the broker being down is waited out (the result stays in the spool
//! directory until it can be delivered); ComfyUI being down fails the job as retryable, so the
//! broker hands it out again while attempts remain.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use tdcomfy_api::{Lease, Progress};
use tdcomfy_comfy::{
    ClientId, ComfyClient, ComfyError, ComfyTimeouts, ImageUpload, OutputFile, PromptId, PromptRunner, RunConfig,
    RunFailure, RunFailureKind, RunUpdate, error_chain, pick_primary,
};
use tdcomfy_workflows::JobInputs;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::broker_client::{BrokerCallError, BrokerClient};
use crate::config::WorkerConfig;
use crate::lease_keeper::{Cadence, LeaseKeeper};

/// Why the worker stopped.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The broker URL or HTTP stack is unusable.
    #[error("broker client: {0}")]
    Broker(#[from] BrokerCallError),
    /// A ComfyUI client could not be created.
    #[error("ComfyUI client: {0}")]
    Comfy(#[from] ComfyError),
    /// The spool directory is unusable.
    #[error("spool directory: {0}")]
    Io(#[from] std::io::Error),
}

/// A ComfyUI server and the runner that supervises prompts on it.
struct Backend {
    label: String,
    runner: PromptRunner,
}

/// How one job ended, from the worker's side.
#[derive(Debug, PartialEq, Eq)]
enum JobEnd {
    Delivered,
    Failed,
    /// Cancelled by a client, or the lease went elsewhere: nothing more to report.
    Abandoned,
    /// Failed (retryable) because the ComfyUI server could not be reached.
    BackendDown,
}

/// Runs the worker until `shutdown` is cancelled. A job in progress at shutdown is stopped in
/// ComfyUI and handed back to the broker as retryable, so another worker can take it.
pub async fn run(config: WorkerConfig, shutdown: CancellationToken) -> Result<(), WorkerError> {
    tokio::fs::create_dir_all(&config.spool_dir).await?;
    let broker = BrokerClient::with_trust(&config.broker_url, config.token.clone(), &config.broker_trust)?;
    let servers = config.comfy.len();
    let mut loops = tokio::task::JoinSet::new();
    for (index, endpoint) in config.comfy.iter().enumerate() {
        let client = ComfyClient::new(endpoint.clone(), ClientId::new(), ComfyTimeouts::default())?;
        let run_config = RunConfig {
            poll_interval: config.comfy_poll_interval,
            stall_timeout: config.stall_timeout,
            start_budget: config.comfy_retry_budget,
            unreachable_timeout: config.comfy_retry_budget,
            ..RunConfig::default()
        };
        let backend = Backend { label: endpoint.to_string(), runner: PromptRunner::new(client, run_config) };
        // Each ComfyUI server gets its own lease loop, so N servers run N jobs at once.
        let lease_name = if servers == 1 { config.worker_id.clone() } else { format!("{}/{index}", config.worker_id) };
        loops.spawn(serve_backend(config.clone(), broker.clone(), backend, lease_name, shutdown.clone()));
    }
    tracing::info!(worker = %config.worker_id, broker = %config.broker_url, servers, "worker started");
    while loops.join_next().await.is_some() {}
    tracing::info!("worker stopped");
    Ok(())
}

/// Leases and runs jobs on one ComfyUI server until shutdown.
async fn serve_backend(
    config: WorkerConfig,
    broker: BrokerClient,
    backend: Backend,
    lease_name: String,
    shutdown: CancellationToken,
) {
    let mut broker_failures = 0u32;
    let mut backend_failures = 0u32;
    loop {
        if backend_failures > 0 && !cool_down(&backend, backend_failures, &shutdown).await {
            break;
        }
        let lease = tokio::select! {
            _ = shutdown.cancelled() => break,
            lease = broker.lease(&lease_name, config.lease_wait) => lease,
        };
        match lease {
            Ok(None) => broker_failures = 0,
            Ok(Some(lease)) => {
                broker_failures = 0;
                let job =
                    JobRun { config: &config, broker: &broker, backend: &backend, lease: &lease, shutdown: &shutdown };
                let end = job.run().await;
                tracing::info!(job_id = %lease.job_id, comfyui = %backend.label, ?end, "job finished on this worker");
                backend_failures = if end == JobEnd::BackendDown { backend_failures.saturating_add(1) } else { 0 };
            }
            Err(e) => {
                broker_failures = broker_failures.saturating_add(1);
                // WORKER_POLL_INTERVAL, doubling up to 16× while the broker stays away.
                let delay = config.retry_delay * 2u32.saturating_pow(broker_failures.min(5) - 1);
                tracing::warn!(error = %e, retry_in = ?delay, "broker unreachable");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// After a job failed because this ComfyUI server was unreachable, takes no job until the server
/// answers again or a back-off (5 s, doubling to 60 s) ends, so other servers' loops take the
/// queue meanwhile instead of this one burning the jobs' attempts. False on shutdown.
async fn cool_down(backend: &Backend, failures: u32, shutdown: &CancellationToken) -> bool {
    let pause = (Duration::from_secs(5) * 2u32.saturating_pow(failures.min(5) - 1)).min(Duration::from_secs(60));
    tracing::warn!(comfyui = %backend.label, ?pause, "ComfyUI unreachable: pausing leases on it");
    let until = Instant::now() + pause;
    while Instant::now() < until {
        if backend.runner.client().system_stats().await.is_ok() {
            tracing::info!(comfyui = %backend.label, "ComfyUI reachable again");
            return true;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    !shutdown.is_cancelled()
}

struct JobRun<'a> {
    config: &'a WorkerConfig,
    broker: &'a BrokerClient,
    backend: &'a Backend,
    lease: &'a Lease,
    shutdown: &'a CancellationToken,
}

/// A failure that ends the job with a message for the client.
struct Failure {
    message: String,
    retryable: bool,
    /// The ComfyUI server could not be reached (its loop cools down).
    backend_down: bool,
}

impl Failure {
    fn new(message: impl Into<String>, retryable: bool) -> Failure {
        Failure { message: message.into(), retryable, backend_down: false }
    }

    fn backend_down(message: impl Into<String>) -> Failure {
        Failure { message: message.into(), retryable: true, backend_down: true }
    }
}

impl JobRun<'_> {
    async fn run(&self) -> JobEnd {
        let dir = self.config.spool_dir.join(self.lease.job_id.to_string());
        // The lease is kept alive for the whole attempt — every step below can outlast LEASE_TTL
        // on a slow link or while the broker is away — until the result is accepted or the
        // failure reported.
        let cadence = Cadence::for_lease(self.lease, self.config.heartbeat_interval, self.config.progress_interval);
        let keeper = LeaseKeeper::start(self.broker.clone(), self.lease, cadence);
        let end = match self.execute(&dir, &keeper).await {
            Ok(end) => end,
            Err(f) => self.report_failure(f).await,
        };
        keeper.stop().await;
        let _ = tokio::fs::remove_dir_all(&dir).await;
        end
    }

    /// Runs `step` unless the broker ends the lease first (a client cancelled, or the lease went
    /// elsewhere): then the job is abandoned, since nothing more may be reported for it.
    async fn unless_lease_ends<T>(
        &self,
        keeper: &LeaseKeeper,
        step: impl std::future::Future<Output = Result<T, Failure>>,
    ) -> Result<T, Abandon> {
        tokio::select! {
            out = step => out.map_err(Abandon::Failed),
            end = keeper.ended() => {
                tracing::info!(job_id = %self.lease.job_id, ?end, "the broker ended the lease: stopping");
                Err(Abandon::LeaseEnded)
            }
        }
    }

    async fn report_failure(&self, f: Failure) -> JobEnd {
        let (id, token) = (self.lease.job_id, &self.lease.lease_token);
        tracing::warn!(job_id = %id, retryable = f.retryable, message = %f.message, "job failed");
        let mut delay = self.config.retry_delay;
        loop {
            match self.broker.fail(id, token, &f.message, f.retryable).await {
                Ok(()) if f.backend_down => return JobEnd::BackendDown,
                Ok(()) => return JobEnd::Failed,
                Err(e) if e.is_transient() && !self.shutdown.is_cancelled() => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(_) => return JobEnd::Abandoned,
            }
        }
    }

    async fn execute(&self, dir: &Path, keeper: &LeaseKeeper) -> Result<JobEnd, Failure> {
        let lease = self.lease;
        tokio::fs::create_dir_all(dir).await.map_err(|e| Failure::new(format!("worker spool: {e}"), true))?;
        let workflow = self.config.workflows.get(&lease.workflow).ok_or_else(|| {
            Failure::new(format!("this worker does not have the workflow {:?}", lease.workflow), true)
        })?;

        // 1. The frame, from the broker to ComfyUI, under a name no other job uses.
        let ext = tdcomfy_api::media::extension_for_mime(&lease.input.content_type);
        let leased = Instant::now();
        let input_path = dir.join(format!("input.{ext}"));
        let download = async {
            match self.broker.download_input(lease.job_id, &lease.lease_token, &input_path).await {
                Ok(_) => Ok(true),
                Err(BrokerCallError::Cancelled | BrokerCallError::LeaseLost(_)) => Ok(false),
                Err(e) => Err(Failure::new(format!("could not fetch the input frame: {e}"), true)),
            }
        };
        match self.unless_lease_ends(keeper, download).await {
            Ok(true) => {}
            Ok(false) | Err(Abandon::LeaseEnded) => return Ok(JobEnd::Abandoned),
            Err(Abandon::Failed(f)) => return Err(f),
        }
        let client = self.backend.runner.client();
        let upload =
            ImageUpload::from_file(format!("{}.{ext}", lease.job_id), input_path.clone()).in_subfolder("tdcomfy");
        let uploaded = match self.unless_lease_ends(keeper, self.upload_with_retry(client, upload)).await {
            Ok(u) => u,
            Err(Abandon::LeaseEnded) => return Ok(JobEnd::Abandoned),
            Err(Abandon::Failed(f)) => return Err(f),
        };
        let image_name = if uploaded.subfolder.is_empty() {
            uploaded.name.clone()
        } else {
            format!("{}/{}", uploaded.subfolder, uploaded.name)
        };

        tracing::debug!(job_id = %lease.job_id, elapsed = ?leased.elapsed(), "frame uploaded to ComfyUI");

        // 2. The workflow with this job's values.
        let graph = workflow
            .bind(&JobInputs {
                image_name,
                prompt: Some(lease.prompt.clone()).filter(|p| !p.is_empty()),
                negative_prompt: Some(lease.negative_prompt.clone()).filter(|p| !p.is_empty()),
                seed: lease.seed,
                params: lease.params.clone(),
                job_id: lease.job_id.to_string(),
            })
            .map_err(|e| Failure::new(format!("workflow {}: {e}", lease.workflow), false))?;

        // 3. Run it, relaying progress and watching for cancellation.
        let prompt_id = PromptId::new();
        let outcome = self.supervise(graph, prompt_id.clone(), keeper).await;
        // Cleanup in ComfyUI is off the frame's path: it runs while the result travels.
        tokio::spawn(clean_comfy(client.clone(), prompt_id, uploaded.subfolder.clone(), uploaded.name.clone()));
        let (outputs, comfy_execution) = match outcome {
            Supervised::Finished(outputs, t) => (outputs, t),
            Supervised::Abandoned => return Ok(JobEnd::Abandoned),
            Supervised::Shutdown => {
                return Err(Failure::new("the worker was shut down while running the job", true));
            }
            Supervised::TimedOut => {
                let secs = lease.job_timeout;
                return Err(Failure::new(format!("timed out: the job ran longer than JOB_TIMEOUT ({secs} s)"), false));
            }
            Supervised::Failed(f) => return Err(describe_failure(&f, &self.backend.label)),
        };

        // 4. The result: ComfyUI → spool file → broker, streamed both ways.
        let primary = pick_primary(&outputs, workflow.primary_output_hint())
            .ok_or_else(|| Failure::new("ComfyUI reported success but produced no output file", false))?;
        let t = Instant::now();
        let (result_path, content_type) =
            match self.unless_lease_ends(keeper, self.fetch_output(client, primary, dir)).await {
                Ok(fetched) => fetched,
                Err(Abandon::LeaseEnded) => return Ok(JobEnd::Abandoned),
                Err(Abandon::Failed(f)) => return Err(f),
            };
        let fetched = t.elapsed();
        let end = match self.unless_lease_ends(keeper, self.deliver(&result_path, &content_type, comfy_execution)).await
        {
            Ok(end) => Ok(end),
            Err(Abandon::LeaseEnded) => Ok(JobEnd::Abandoned),
            Err(Abandon::Failed(f)) => Err(f),
        };
        tracing::debug!(job_id = %lease.job_id, ?fetched, delivered = ?t.elapsed() - fetched, "result handed over");
        end
    }

    async fn upload_with_retry(
        &self,
        client: &ComfyClient,
        upload: ImageUpload,
    ) -> Result<tdcomfy_comfy::UploadedImage, Failure> {
        let deadline = Instant::now() + self.config.comfy_retry_budget;
        let mut delay = Duration::from_millis(250);
        loop {
            match client.upload_image(upload.clone()).await {
                Ok(u) => return Ok(u),
                Err(e) if e.is_transient() && Instant::now() + delay < deadline && !self.shutdown.is_cancelled() => {
                    tracing::warn!(error = %e, "ComfyUI upload failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(4));
                }
                Err(e) if e.is_transient() => {
                    return Err(Failure::backend_down(format!(
                        "ComfyUI at {} is unreachable: {e}",
                        self.backend.label
                    )));
                }
                Err(e) => {
                    return Err(Failure::new(
                        format!("ComfyUI at {} refused the frame: {e}", self.backend.label),
                        false,
                    ));
                }
            }
        }
    }

    async fn supervise(&self, graph: serde_json::Value, prompt_id: PromptId, keeper: &LeaseKeeper) -> Supervised {
        let id = self.lease.job_id;
        let cancel = CancellationToken::new();
        let mut run = self.backend.runner.run_prompt(graph, prompt_id, cancel.clone());
        let mut stop_reason: Option<Supervised> = None;
        // JOB_TIMEOUT holds here too, so a job ends on time even while the broker is unreachable.
        let deadline = tokio::time::sleep(Duration::from_secs_f64(self.lease.job_timeout.clamp(1.0, 1e7)));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                update = run.next() => match update {
                    Some(RunUpdate::Progress(p)) => keeper.report(Progress {
                        value: f64::from(p.fraction).clamp(0.0, 0.999),
                        step: p.step,
                        max_steps: p.max,
                        node: p.node,
                        node_type: p.node_type,
                    }),
                    Some(RunUpdate::Finished { outputs, execution_time }) => {
                        return stop_reason.unwrap_or(Supervised::Finished(outputs, execution_time));
                    }
                    Some(RunUpdate::Failed(f)) => return stop_reason.unwrap_or(Supervised::Failed(f)),
                    Some(_) => {}
                    None => {
                        return stop_reason.unwrap_or_else(|| Supervised::Failed(RunFailure::new(
                            RunFailureKind::Protocol,
                            "prompt supervision ended without an outcome",
                        )));
                    }
                },
                end = keeper.ended(), if stop_reason.is_none() => {
                    tracing::info!(job_id = %id, ?end, "the broker ended the lease: stopping the prompt");
                    stop_reason = Some(Supervised::Abandoned);
                    cancel.cancel();
                }
                _ = self.shutdown.cancelled(), if stop_reason.is_none() => {
                    stop_reason = Some(Supervised::Shutdown);
                    cancel.cancel();
                }
                _ = &mut deadline, if stop_reason.is_none() => {
                    tracing::warn!(job_id = %id, "JOB_TIMEOUT reached: stopping the prompt");
                    stop_reason = Some(Supervised::TimedOut);
                    cancel.cancel();
                }
            }
        }
    }

    async fn fetch_output(
        &self,
        client: &ComfyClient,
        file: &OutputFile,
        dir: &Path,
    ) -> Result<(PathBuf, String), Failure> {
        let fail = |e: &dyn std::fmt::Display| {
            Failure::new(
                format!("could not download {} from ComfyUI at {}: {e}", file.filename, self.backend.label),
                true,
            )
        };
        let mut download = client.download(file).await.map_err(|e| fail(&e))?;
        let content_type = download
            .content_type
            .clone()
            .filter(|t| t != "application/octet-stream")
            .unwrap_or_else(|| tdcomfy_api::media::mime_for_extension(&file.format).to_owned());
        let path = dir.join(format!("result.{}", file.format));
        let mut out = tokio::io::BufWriter::with_capacity(
            256 * 1024,
            tokio::fs::File::create(&path).await.map_err(|e| fail(&e))?,
        );
        let limit = self.lease.max_result_bytes.unwrap_or(u64::MAX);
        let mut size = 0u64;
        while let Some(chunk) = download.next().await {
            let chunk = chunk.map_err(|e| fail(&e))?;
            size += chunk.len() as u64;
            // Checked here, not by the broker's 413 after an upload: a result the broker cannot
            // take would otherwise fill the spool and cross the link for nothing, and retrying
            // it would not help.
            if size > limit {
                return Err(Failure::new(
                    format!(
                        "ComfyUI's output {} is over the broker's MAX_RESULT_MB ({} MB)",
                        file.filename,
                        limit / (1024 * 1024)
                    ),
                    false,
                ));
            }
            out.write_all(&chunk).await.map_err(|e| fail(&e))?;
        }
        out.flush().await.map_err(|e| fail(&e))?;
        Ok((path, content_type))
    }

    /// Uploads the result, retrying while the broker is away, until it is accepted or the lease is
    /// gone. A shutdown lets an upload in flight finish for [`DELIVERY_SHUTDOWN_GRACE`], then hands
    /// the job back (retryable) so another worker runs it instead of the lease lapsing unseen.
    async fn deliver(
        &self,
        path: &Path,
        content_type: &str,
        comfy_execution: Option<Duration>,
    ) -> Result<JobEnd, Failure> {
        let (id, token) = (self.lease.job_id, &self.lease.lease_token);
        let mut delay = self.config.retry_delay;
        let give_up = Instant::now() + Duration::from_secs_f64(self.lease.job_timeout.max(60.0));
        let shut_down = || Failure::new("the worker was shut down before the broker accepted the result", true);
        loop {
            let upload = self.broker.upload_result(id, token, path, content_type, comfy_execution);
            tokio::pin!(upload);
            let outcome = tokio::select! {
                outcome = &mut upload => outcome,
                _ = self.shutdown.cancelled() => {
                    match tokio::time::timeout(DELIVERY_SHUTDOWN_GRACE, &mut upload).await {
                        Ok(Ok(())) => return Ok(JobEnd::Delivered),
                        Ok(Err(BrokerCallError::Cancelled | BrokerCallError::LeaseLost(_))) => return Ok(JobEnd::Abandoned),
                        _ => return Err(shut_down()),
                    }
                }
            };
            match outcome {
                Ok(()) => return Ok(JobEnd::Delivered),
                Err(BrokerCallError::Cancelled | BrokerCallError::LeaseLost(_)) => {
                    return Ok(JobEnd::Abandoned);
                }
                Err(e) if (e.is_transient() || matches!(e, BrokerCallError::Io(_))) && Instant::now() < give_up => {
                    tracing::warn!(job_id = %id, error = %error_chain(&e), retry_in = ?delay, "result upload failed; the result waits in the spool");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shutdown.cancelled() => return Err(shut_down()),
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    return Err(Failure::new(format!("the broker refused the result: {e}"), false));
                }
            }
        }
    }
}

/// How long a result upload in flight at shutdown may still run before the job is handed back:
/// well inside systemd's default 90 s stop timeout, with room for the failure report.
const DELIVERY_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

enum Abandon {
    /// The step failed.
    Failed(Failure),
    /// The broker ended the lease meanwhile.
    LeaseEnded,
}

enum Supervised {
    Finished(Vec<OutputFile>, Option<Duration>),
    Failed(RunFailure),
    Abandoned,
    Shutdown,
    TimedOut,
}

/// Removes what a job left in ComfyUI. ComfyUI has no delete for uploads: the frame is overwritten
/// with a 1-pixel stand-in so the input folder does not grow by a frame per job; the history entry
/// is deleted.
async fn clean_comfy(client: ComfyClient, prompt_id: PromptId, subfolder: String, name: String) {
    let tombstone = ImageUpload::from_bytes(name, tombstone_bytes()).in_subfolder(subfolder).overwrite(true);
    if let Err(e) = client.upload_image(tombstone).await {
        tracing::debug!(error = %e, "could not blank the uploaded frame");
    }
    if let Err(e) = client.delete_history(&prompt_id).await {
        tracing::debug!(error = %e, "could not delete the history entry");
    }
}

fn describe_failure(f: &RunFailure, backend: &str) -> Failure {
    let message = match f.kind {
        RunFailureKind::BackendUnreachable => {
            format!("ComfyUI at {backend} is unreachable: {}", f.message)
        }
        RunFailureKind::Lost => format!("ComfyUI at {backend} lost the prompt (restarted?): {}", f.message),
        _ => f.message.clone(),
    };
    Failure::new(message, f.kind.is_retryable())
}

/// A 1×1 PNG that replaces an uploaded frame. Its name may end in .jpg or .webp; that only
/// matters if the frame were loaded again, which it is not.
fn tombstone_bytes() -> Vec<u8> {
    const PNG_1X1: &[u8] = &[
        0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A, 0x00, 0x00, 0x00, 0x0D, 0x49, 0x48, 0x44, 0x52, 0x00, 0x00,
        0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x00, 0x00, 0x00, 0x00, 0x3A, 0x7E, 0x9B, 0x55, 0x00, 0x00, 0x00,
        0x0A, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9C, 0x63, 0x60, 0x00, 0x00, 0x00, 0x02, 0x00, 0x01, 0xE5, 0x27, 0xDE,
        0xFC, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4E, 0x44, 0xAE, 0x42, 0x60, 0x82,
    ];
    PNG_1X1.to_vec()
}
