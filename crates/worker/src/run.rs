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
    ClientId, ComfyClient, ComfyError, ComfyTimeouts, ImageUpload, OutputFile, PromptId, PromptOptions, PromptRunner,
    RunConfig, RunFailure, RunFailureKind, RunUpdate, error_chain, pick_primary,
};
use tdcomfy_workflows::JobInputs;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::broker_client::{BrokerCallError, BrokerClient};
use crate::comfy_files::{self, INPUT_SUBFOLDER, PromptFate, ServedCopy, ServerFiles, SlotGuard};
use crate::config::WorkerConfig;
use crate::lease_keeper::{Cadence, LeaseKeeper};
use crate::preflight::{self, ServerState};
use crate::spooled;
use tdcomfy_api::PreflightReport;
use tokio::sync::watch;

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
    /// Upload names and folders of this server.
    files: std::sync::Arc<ServerFiles>,
    /// What the server can run, kept current by [`preflight::watch_server`].
    preflight: watch::Receiver<ServerState>,
    /// What the loop is doing, for its report (`/health`).
    status: watch::Sender<LoopStatus>,
    /// Set by a job about to report that this server was unreachable (before the report, so a
    /// lease the loop's pending request gets meanwhile — maybe that very job, requeued — is
    /// handed back instead of run against a server that is down); cleared after the cool-down.
    down: std::sync::atomic::AtomicBool,
}

/// What one lease loop is doing: its jobs in lease order (the first runs, the others wait in
/// ComfyUI's queue behind it), whether it pauses, the workflow its server ran last.
#[derive(Debug, Clone, Default, PartialEq)]
struct LoopStatus {
    jobs: Vec<tdcomfy_api::JobId>,
    paused: bool,
    last_workflow: Option<String>,
}

/// What [`report_preflight`] reads for each report.
struct Reported {
    preflight: watch::Receiver<ServerState>,
    status: watch::Receiver<LoopStatus>,
    /// `/system_stats` devices (read, never waited on: free VRAM changes all the time).
    devices: watch::Receiver<Vec<tdcomfy_api::DeviceInfo>>,
}

/// How often a lease loop's preflight report is repeated while nothing changed.
const PREFLIGHT_RESEND: Duration = Duration::from_secs(5);

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
        let client = ComfyClient::with_token(
            endpoint.clone(),
            ClientId::new(),
            ComfyTimeouts::default(),
            config.comfy_token.clone(),
        )?;
        let run_config = RunConfig {
            poll_interval: config.comfy_poll_interval,
            stall_timeout: config.stall_timeout,
            start_budget: config.comfy_retry_budget,
            unreachable_timeout: config.comfy_retry_budget,
            preview_method: config.preview_method,
            ..RunConfig::default()
        };
        // What this server supports, found out now for the log (and again by the client at every
        // reconnect); off the start path, so an unreachable server does not delay the others.
        let probe = client.clone();
        tokio::spawn(async move {
            match probe.detect_features().await {
                Ok(features) => {
                    tracing::info!(comfyui = %probe.endpoint(), features = %features.summary(), "ComfyUI features")
                }
                Err(error) => {
                    tracing::warn!(comfyui = %probe.endpoint(), %error, "could not ask ComfyUI what it supports")
                }
            }
        });
        // Each ComfyUI server gets its own lease loop, so N servers run N jobs at once.
        let lease_name = if servers == 1 { config.worker_id.clone() } else { format!("{}/{index}", config.worker_id) };
        let files = ServerFiles::new(&lease_name, config.comfy_folders.clone(), &endpoint.to_string());
        let (state, preflight) = watch::channel(ServerState::default());
        let (devices_tx, devices) = watch::channel(Vec::new());
        let (status_tx, status) = watch::channel(LoopStatus::default());
        loops.spawn(preflight::watch_server(
            client.clone(),
            config.workflows.clone(),
            preflight::server_name(endpoint),
            config.preflight,
            state,
            devices_tx,
            shutdown.clone(),
        ));
        loops.spawn(report_preflight(
            broker.clone(),
            lease_name.clone(),
            preflight::server_name(endpoint),
            Reported { preflight: preflight.clone(), status, devices },
            config.retry_delay,
            shutdown.clone(),
        ));
        let backend = Backend {
            label: endpoint.to_string(),
            runner: PromptRunner::new(client, run_config),
            files,
            preflight,
            status: status_tx,
            down: std::sync::atomic::AtomicBool::new(false),
        };
        loops.spawn(serve_backend(config.clone(), broker.clone(), backend, lease_name, shutdown.clone()));
    }
    tracing::info!(worker = %config.worker_id, broker = %config.broker_url, servers, "worker started");
    // Results a killed or crashed worker left in the spool go out beside the lease loops.
    loops.spawn(spooled::deliver_orphans(
        config.spool_dir.clone(),
        broker.clone(),
        config.heartbeat_interval,
        config.progress_interval,
        shutdown.clone(),
    ));
    while loops.join_next().await.is_some() {}
    tracing::info!("worker stopped");
    Ok(())
}

/// Leases and runs jobs on one ComfyUI server until shutdown: the current job and, while it
/// runs, up to `PREFETCH` more, each a [`JobRun`] of its own whose prompt waits in ComfyUI's queue
/// (posted in lease order, so ComfyUI runs them in that order and starts the next the instant
/// the last ends).
async fn serve_backend(
    config: WorkerConfig,
    broker: BrokerClient,
    backend: Backend,
    lease_name: String,
    shutdown: CancellationToken,
) {
    let mut broker_failures = 0u32;
    let mut backend_failures = 0u32;
    let mut preflight = backend.preflight.clone();
    // No lease before the first look at the server: it decides which workflows to ask for.
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = preflight.wait_for(|s| s.looked) => {}
    }
    let (config, broker, backend, lease_name, stop) = (&config, &broker, &backend, lease_name.as_str(), &shutdown);
    let mut in_flight = futures_util::stream::FuturesUnordered::new();
    // Cancelled once the last leased job's prompt is in ComfyUI's queue (or that job ended): the
    // next job's prompt is posted only after it.
    let mut last_posted: Option<CancellationToken> = None;
    let mut last_workflow: Option<String> = None;
    let mut lease_call = None;
    let mut lease_prefetch = false;
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        if backend_failures > 0 && in_flight.is_empty() {
            backend.status.send_modify(|s| s.paused = true);
            let up = cool_down(backend, backend_failures, &shutdown).await;
            backend.status.send_modify(|s| s.paused = false);
            if !up {
                break;
            }
            backend_failures = 0;
            backend.down.store(false, std::sync::atomic::Ordering::Release);
        }
        // Another lease while fewer than 1 + PREFETCH jobs are on this server, and none while
        // its jobs fail for being unable to reach it.
        let room = in_flight.len() < 1 + config.prefetch
            && backend_failures == 0
            && !backend.down.load(std::sync::atomic::Ordering::Acquire);
        if room && lease_call.is_none() {
            let state = preflight.borrow_and_update().clone();
            let prefetch = !in_flight.is_empty();
            lease_call = Some(Box::pin(broker.lease_with(
                lease_name,
                config.lease_wait,
                state.runnable(),
                prefetch,
                last_workflow.clone(),
            )));
            // Said with the lease request, so the job leased is known to wait behind another.
            lease_prefetch = prefetch;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some((lease, end)) = in_flight.next(), if !in_flight.is_empty() => {
                let lease: Lease = lease;
                backend.status.send_modify(|s| s.jobs.retain(|id| *id != lease.job_id));
                if matches!(end, JobEnd::Delivered | JobEnd::Failed) {
                    last_workflow = Some(lease.workflow.clone());
                    backend.status.send_modify(|s| s.last_workflow = last_workflow.clone());
                }
                backend_failures = if end == JobEnd::BackendDown { backend_failures.saturating_add(1) } else { 0 };
            }
            lease = async { lease_call.as_mut().expect("guarded").await }, if lease_call.is_some() => {
                lease_call = None;
                match lease {
                    Ok(None) => broker_failures = 0,
                    Ok(Some(lease)) if backend.down.load(std::sync::atomic::Ordering::Acquire) => {
                        broker_failures = 0;
                        // Leased while a job of this loop was finding the server down: not this
                        // job's fault, so it goes back without costing an attempt.
                        tracing::info!(job_id = %lease.job_id, comfyui = %backend.label, "ComfyUI is unreachable: handing the new lease back");
                        let message = format!("ComfyUI at {} is unreachable: handed back before it ran", backend.label);
                        if let Err(e) = broker.fail(lease.job_id, &lease.lease_token, &message, true, true).await {
                            tracing::warn!(job_id = %lease.job_id, error = %e, "could not hand the lease back (it lapses)");
                        }
                    }
                    Ok(Some(lease)) => {
                        broker_failures = 0;
                        let posted = CancellationToken::new();
                        let after = last_posted.replace(posted.clone());
                        backend.status.send_modify(|s| s.jobs.push(lease.job_id));
                        let prefetched = lease_prefetch;
                        in_flight.push(async move {
                            let job = JobRun {
                                config, broker, backend, lease: &lease, shutdown: stop, prefetched,
                                after, posted,
                            };
                            // Every line logged for the job (the lease keeper's task included) carries these.
                            let span = tracing::info_span!("job", job_id = %lease.job_id, attempt = lease.attempt, worker = %lease_name);
                            let end = tracing::Instrument::instrument(job.run(), span.clone()).await;
                            span.in_scope(|| tracing::info!(comfyui = %backend.label, ?end, prefetched, "job finished on this worker"));
                            (lease, end)
                        });
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
            // What the server can run changed: ask again with the new list (the broker hands a
            // claim whose request went away back to the queue).
            Ok(()) = preflight.changed() => lease_call = None,
        }
    }
    // Stopping: every job still here hands itself back (its own shutdown path), then this
    // loop's upload names that no prompt reads any more go (when reachable).
    drop(lease_call);
    while in_flight.next().await.is_some() {}
    backend.files.folders.remove_free_slots(&backend.files.slots).await;
}

/// Sends what this loop's server can run to the broker (`POST /worker/preflight`) whenever it
/// changes and every [`PREFLIGHT_RESEND`] besides: the broker keeps reports in memory only, so one
/// that restarted (or forgot a worker it had not heard from) has it again within that time. Beside
/// the lease loop, not in it, since a lease long-poll can outlast a broker restart unnoticed.
async fn report_preflight(
    broker: BrokerClient,
    lease_name: String,
    server: String,
    reported: Reported,
    retry_delay: Duration,
    shutdown: CancellationToken,
) {
    let Reported { mut preflight, mut status, devices } = reported;
    loop {
        let state = preflight.borrow_and_update().clone();
        let now = status.borrow_and_update().clone();
        let mut next = PREFLIGHT_RESEND;
        // Nothing to say before the server was checked once.
        if state.catalog.is_some() {
            let server_state = if !state.reachable {
                tdcomfy_api::ServerState::Unreachable
            } else if now.paused {
                tdcomfy_api::ServerState::Paused
            } else if now.jobs.is_empty() {
                tdcomfy_api::ServerState::Idle
            } else {
                tdcomfy_api::ServerState::Running
            };
            let report = PreflightReport {
                worker_id: lease_name.clone(),
                server: server.clone(),
                reachable: state.reachable,
                workflows: state.workflows,
                state: Some(server_state),
                job_id: now.jobs.first().copied(),
                prefetched_jobs: now.jobs.iter().skip(1).copied().collect(),
                last_workflow: now.last_workflow.clone(),
                devices: devices.borrow().clone(),
            };
            if let Err(e) = broker.preflight(&report).await {
                // Display only: a broker without the route (older than this worker) still gets
                // the lease's workflow list, so the loop goes on either way.
                tracing::debug!(error = %e, "could not send the preflight report");
                if e.is_transient() {
                    next = retry_delay.max(Duration::from_millis(100)).min(PREFLIGHT_RESEND);
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = preflight.changed() => if changed.is_err() { return },
            changed = status.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(next) => {}
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
    /// Leased while the server was busy: its prompt waits in ComfyUI's queue.
    prefetched: bool,
    /// Cancelled once the job leased before it on this server has its prompt in ComfyUI's queue
    /// (or ended): this one's prompt goes after it, so ComfyUI runs them in lease order.
    after: Option<CancellationToken>,
    /// Cancelled when this job's prompt is in ComfyUI's queue, or when the job ends.
    posted: CancellationToken,
}

/// A failure that ends the job with a message for the client.
struct Failure {
    message: String,
    retryable: bool,
    /// The ComfyUI server could not be reached (its loop cools down).
    backend_down: bool,
    /// The worker itself is stopping: the job goes back without its attempt counting.
    handed_back: bool,
}

impl Failure {
    fn new(message: impl Into<String>, retryable: bool) -> Failure {
        Failure { message: message.into(), retryable, backend_down: false, handed_back: false }
    }

    fn backend_down(message: impl Into<String>) -> Failure {
        Failure { message: message.into(), retryable: true, backend_down: true, handed_back: false }
    }

    /// This worker stops (SIGTERM): no fault of the job, so it costs no attempt.
    fn handed_back(message: impl Into<String>) -> Failure {
        Failure { message: message.into(), retryable: true, backend_down: false, handed_back: true }
    }
}

impl JobRun<'_> {
    async fn run(&self) -> JobEnd {
        // However this attempt ends, the job leased after it need not wait for its prompt.
        let _posted = self.posted.clone().drop_guard();
        // Per attempt, not per job: another attempt of this job may be running right now.
        let dir = comfy_files::attempt_dir(&self.config.spool_dir, self.lease.job_id, &self.lease.lease_token);
        // The lease is kept alive for the whole attempt — every step below can outlast LEASE_TTL
        // on a slow link or while the broker is away — until the result is accepted or the
        // failure reported.
        let cadence = Cadence::for_lease(self.lease, self.config.heartbeat_interval, self.config.progress_interval);
        let keeper = LeaseKeeper::start_as(
            self.broker.clone(),
            self.lease.job_id,
            self.lease.lease_token.clone(),
            cadence,
            self.prefetched,
        );
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
            // The step first: when both are ready, what the step achieved is not thrown away.
            biased;
            out = step => out.map_err(Abandon::Failed),
            end = keeper.ended() => {
                tracing::info!(job_id = %self.lease.job_id, ?end, "the broker ended the lease: stopping");
                Err(Abandon::LeaseEnded)
            }
        }
    }

    fn posted_now(&self) {
        self.posted.cancel();
    }

    async fn report_failure(&self, f: Failure) -> JobEnd {
        let (id, token) = (self.lease.job_id, &self.lease.lease_token);
        if f.backend_down {
            self.backend.down.store(true, std::sync::atomic::Ordering::Release);
        }
        tracing::warn!(job_id = %id, retryable = f.retryable, reason = %f.message, "job failed");
        let mut delay = self.config.retry_delay;
        loop {
            match self.broker.fail(id, token, &f.message, f.retryable, f.handed_back).await {
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
        // Held until this attempt ends: a worker starting meanwhile leaves the folder alone.
        let _owner = spooled::hold(dir).map_err(|e| Failure::new(format!("worker spool: {e}"), true))?;
        let workflow = self.config.workflows.get(&lease.workflow).ok_or_else(|| {
            Failure::new(format!("this worker does not have the workflow {:?}", lease.workflow), true)
        })?;

        // 1. The frame, from the broker to ComfyUI, under a name no other prompt still reads.
        let ext = tdcomfy_api::media::extension_for_mime(&lease.input.content_type);
        let leased = Instant::now();
        let input_path = dir.join(format!("input.{ext}"));
        let download = async {
            // A broker dying mid-download is retried (on the next of BROKER_URL's brokers, where
            // there are several) for a while, so it does not cost the job an attempt.
            let give_up = Instant::now() + INPUT_RETRY_BUDGET;
            let mut delay = self.config.retry_delay;
            loop {
                match self.broker.download_input(lease.job_id, &lease.lease_token, &input_path).await {
                    Ok(_) => return Ok(true),
                    Err(BrokerCallError::Cancelled | BrokerCallError::LeaseLost(_)) => return Ok(false),
                    Err(e) if e.is_transient() && Instant::now() + delay < give_up && !self.shutdown.is_cancelled() => {
                        tracing::warn!(error = %e, retry_in = ?delay, "input frame download failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(4));
                    }
                    Err(e) => return Err(Failure::new(format!("could not fetch the input frame: {e}"), true)),
                }
            }
        };
        match self.unless_lease_ends(keeper, download).await {
            Ok(true) => {}
            Ok(false) | Err(Abandon::LeaseEnded) => return Ok(JobEnd::Abandoned),
            Err(Abandon::Failed(f)) => return Err(f),
        }
        let client = self.backend.runner.client();
        // The slot is given back when `slot` drops, whichever way this attempt ends.
        let mut slot = SlotGuard::take(&self.backend.files, client, ext).await;
        // Overwrite: the name is free, so no prompt reads the old bytes any more (LoadImage's
        // cache hashes the file, so the new bytes run again).
        let upload = ImageUpload::from_file(slot.name().to_owned(), input_path.clone())
            .in_subfolder(INPUT_SUBFOLDER)
            .overwrite(true);
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
        self.check_bound_graph(workflow, &graph).await?;

        // 3. Queue it behind the job leased before it on this server, then run it, relaying
        // progress and watching for cancellation.
        if let Some(after) = &self.after {
            let behind = async {
                tokio::select! {
                    _ = after.cancelled() => Ok(()),
                    _ = self.shutdown.cancelled() => Err(Failure::handed_back("the worker was shut down before the job's prompt was queued")),
                }
            };
            match self.unless_lease_ends(keeper, behind).await {
                Ok(()) => {}
                Err(Abandon::LeaseEnded) => return Ok(JobEnd::Abandoned),
                Err(Abandon::Failed(f)) => return Err(f),
            }
        }
        let prompt_id = PromptId::new();
        slot.set_fate(PromptFate::MaybeQueued(prompt_id.clone()));
        let outcome = self.supervise(graph, prompt_id.clone(), keeper).await;
        if prompt_is_gone(&outcome) {
            slot.set_fate(PromptFate::Gone);
        }
        drop(slot);
        // Cleanup in ComfyUI is off the frame's path: it runs while the result travels.
        tokio::spawn(clean_comfy(client.clone(), prompt_id, self.backend.files.clone()));
        let (outputs, comfy_execution) = match outcome {
            Supervised::Finished(outputs, t) => (outputs, t),
            Supervised::Abandoned => return Ok(JobEnd::Abandoned),
            Supervised::Shutdown => {
                return Err(Failure::handed_back("the worker was shut down while running the job"));
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
        // Should this process die before the broker has the result, the next worker to start
        // delivers it from here while the lease still stands (instead of the prompt running again).
        let pending = spooled::Pending {
            job_id: lease.job_id,
            lease_token: lease.lease_token.clone(),
            result_file: result_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            content_type: content_type.clone(),
            comfy_execution_ms: comfy_execution.map(|d| d.as_millis() as u64),
            lease_expires_in: lease.lease_expires_in,
        };
        if let Err(e) = spooled::record(dir, &pending).await {
            tracing::warn!(job_id = %lease.job_id, error = %e, "could not record the spooled result (it is still delivered)");
        }
        // Not raced against the keeper: a heartbeat answered "lease lost" just after the broker
        // accepted this very upload must not turn a delivered result into an abandoned one. The
        // upload's own answer decides (the broker stops it with 409 when the lease really ended).
        let end = self.deliver(&result_path, &content_type, comfy_execution, keeper).await;
        if matches!(end, Ok(JobEnd::Delivered))
            && !self.config.keep_comfy_outputs
            && let Some(served) = ServedCopy::keep(&result_path).await
        {
            // The result is safe at the broker: ComfyUI's copies can go once compared with what
            // /view served (off the frame's path).
            let files = self.backend.files.clone();
            let (client, primary) = (client.clone(), primary.clone());
            let job_folder = tdcomfy_workflows::job_output_subfolder(&lease.job_id.to_string());
            tokio::spawn(async move {
                let removed = files.folders.remove_outputs(&client, &outputs, &primary, served, &job_folder).await;
                tracing::debug!(removed, job_folder, "removed the job's files from ComfyUI's output folder");
            });
        }
        tracing::debug!(job_id = %lease.job_id, ?fetched, delivered = ?t.elapsed() - fetched, "result handed over");
        end
    }

    /// The job's own values against the server's options (a parameter bound to a sampler or a
    /// model file input): one the server lacks fails the job before a GPU attempt, with the same
    /// sentence preflight uses. The catalog may be older than a file copied in since, so a
    /// mismatch is confirmed with a fresh one first.
    async fn check_bound_graph(
        &self,
        workflow: &tdcomfy_workflows::Workflow,
        graph: &serde_json::Value,
    ) -> Result<(), Failure> {
        let Some(catalog) = self.backend.preflight.borrow().catalog.clone() else { return Ok(()) };
        let label = &preflight::server_name(self.backend.runner.client().endpoint());
        let skip = preflight::frame_inputs(workflow);
        if preflight::check_graph(graph, &catalog, label, &skip).is_empty() {
            return Ok(());
        }
        let Ok(fresh) = self.backend.runner.client().object_info().await else { return Ok(()) };
        let problems = preflight::check_graph(graph, &fresh, label, &skip);
        if problems.is_empty() {
            return Ok(());
        }
        Err(Failure::new(format!("workflow {} cannot run on {label}: {}", workflow.name(), problems.join("; ")), false))
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
                // Neither a frame over the server's limit nor a refused token gets better by
                // retrying; the message names the size and limit, or the token.
                Err(e @ ComfyError::UploadTooLarge { .. }) => {
                    return Err(Failure::new(format!("the frame is too large: {e}"), false));
                }
                Err(e @ ComfyError::Unauthorized { .. }) => return Err(Failure::new(e.to_string(), false)),
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
        // Per prompt: a job that wants previews asks ComfyUI to render them (C5).
        let method = crate::previews::preview_method(self.lease, self.config.preview_method);
        let options = PromptOptions { preview_method: Some(method) };
        let mut run = self.backend.runner.run_prompt_with(graph, prompt_id, cancel.clone(), options);
        let previews =
            crate::previews::PreviewUploader::for_lease(self.broker, self.lease, self.config.preview_interval);
        let mut stop_reason: Option<Supervised> = None;
        // JOB_TIMEOUT holds here too, so a job ends on time even while the broker is unreachable.
        let deadline = tokio::time::sleep(Duration::from_secs_f64(self.lease.job_timeout.clamp(1.0, 1e7)));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                update = run.next() => match update {
                    // Progress is the prompt running too (its `Started` may have been missed).
                    Some(RunUpdate::Progress(p)) => { keeper.started(); keeper.report(Progress {
                        value: f64::from(p.fraction).clamp(0.0, 0.999),
                        step: p.step,
                        max_steps: p.max,
                        node: p.node,
                        node_type: p.node_type,
                        stage: p.stage,
                    }) }
                    Some(RunUpdate::Finished { outputs, execution_time }) => {
                        keeper.started();
                        return stop_reason.unwrap_or(Supervised::Finished(outputs, execution_time));
                    }
                    Some(RunUpdate::Failed(f)) => return stop_reason.unwrap_or(Supervised::Failed(f)),
                    // Handed to the uploader's own task: never awaited here (a preview never delays a job).
                    Some(RunUpdate::Preview(p)) => previews.offer(p),
                    // The next job of this server may post its prompt now: it runs after this one.
                    Some(RunUpdate::Submitted) => self.posted_now(),
                    Some(RunUpdate::Started) => {
                        self.posted_now();
                        keeper.started();
                    }
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
        keeper: &LeaseKeeper,
    ) -> Result<JobEnd, Failure> {
        let (id, token) = (self.lease.job_id, &self.lease.lease_token);
        let mut delay = self.config.retry_delay;
        let shut_down = || Failure::handed_back("the worker was shut down before the broker accepted the result");
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
                // The broker being away is waited out for as long as it takes: a finished result
                // is worth more than any limit, and reporting a failure would need the broker too.
                // Only the broker ending the lease (seen by the keeper) or a shutdown stops this.
                Err(BrokerCallError::Io(e)) => {
                    return Err(Failure::new(format!("could not read the spooled result: {e}"), true));
                }
                Err(e) if e.is_transient() => {
                    tracing::warn!(job_id = %id, error = %error_chain(&e), retry_in = ?delay, "result upload failed; the result waits in the spool");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shutdown.cancelled() => return Err(shut_down()),
                        end = keeper.ended() => {
                            tracing::info!(job_id = %id, ?end, "the broker ended the lease while the result waited");
                            return Ok(JobEnd::Abandoned);
                        }
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

/// How long a failing input download is retried before the attempt fails (retryable): long
/// enough to move past a dead broker, short enough that a broker that lost the frame is reported.
const INPUT_RETRY_BUDGET: Duration = Duration::from_secs(20);

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

/// Whether the prompt has certainly left ComfyUI's queue when supervision ends (else its upload
/// name stays held until `/queue` shows it gone).
fn prompt_is_gone(outcome: &Supervised) -> bool {
    match outcome {
        Supervised::Finished(..) => true,
        Supervised::Failed(f) => matches!(
            f.kind,
            RunFailureKind::Validation | RunFailureKind::Execution | RunFailureKind::NoOutputs | RunFailureKind::Lost
        ),
        Supervised::Abandoned | Supervised::Shutdown | Supervised::TimedOut => false,
    }
}

/// Removes what an attempt left in ComfyUI: its history entry, and one-off uploads whose prompt
/// is gone (when ComfyUI's input folder is reachable). Uploaded frames are never overwritten
/// here: a later attempt may be reading that name.
async fn clean_comfy(client: ComfyClient, prompt_id: PromptId, files: std::sync::Arc<ServerFiles>) {
    if let Err(e) = client.delete_history(&prompt_id).await {
        tracing::debug!(error = %e, "could not delete the history entry");
    }
    files.folders.remove_one_offs(&client, &files.slots).await;
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
