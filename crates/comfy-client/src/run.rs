//! Supervision of one prompt from submission to a trustworthy terminal outcome.
//!
//! The WebSocket is used for speed and progress only; `/history/{id}` is the source of truth,
//! polled at a low rate and immediately when the socket hints at an end. Where the prompt is
//! (running, pending, gone) is asked only when in doubt, from `GET /api/jobs/{id}` where the
//! server has the jobs API (its 404 is "unknown", which history's `{}` cannot tell from
//! "running") and from `/queue` (which carries every queued graph) otherwise. Success needs
//! a history entry with status success and the expected outputs, never just "not in the queue".
//! A prompt that is in neither queue nor history for several polls was lost (ComfyUI restarted).
//! A running prompt stalls only when nothing shows ComfyUI still working on it: no event naming
//! it and no answer listing it as running.
//! Stalls, the total time limit and cancellation stop the prompt by its id: with the jobs cancel
//! (one atomic step on the server) where it exists, else by deleting it if pending and
//! interrupting it if running.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::client::ComfyClient;
use crate::error::{ComfyError, ValidationReport};
use crate::events::{ComfyEvent, PreviewImage};
use crate::features::PreviewMethod;
use crate::hub::{EventHub, HubNotice, HubOptions};
use crate::ids::PromptId;
use crate::outputs::OutputFile;
use crate::progress::{ProgressTracker, RunProgress};
use crate::responses::{HistoryEntry, HistoryOutcome, JobLookup, QueuePosition};

/// What a successful run must have produced.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ExpectedOutputs {
    /// At least one output file (the default: a run without files is useless to the broker).
    #[default]
    AtLeastOne,
    /// At least one file from each of these node ids.
    Nodes(Vec<String>),
    /// Nothing (e.g. graphs that only stream images over the WebSocket).
    Nothing,
}

/// Timing and policy of prompt supervision.
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    /// Regular `/history/{id}` poll period (a few bytes per poll until the prompt is over).
    pub poll_interval: Duration,
    /// How often to ask where the prompt is (running, pending or gone) when nothing else tells:
    /// while it is pending, and while a running prompt's events are silent (then at least four
    /// times per `stall_timeout`). Asked at every poll while the prompt is not seen yet or
    /// suspected lost. The jobs API is used where the server has it, `GET /queue` otherwise.
    pub presence_interval: Duration,
    /// Fail as stalled when a running prompt shows no sign of life for this long: no socket event
    /// naming it and no answer from ComfyUI that it is still running it. A long silent node is
    /// not a stall while ComfyUI keeps listing the prompt as running (`total_timeout` bounds
    /// that); a ComfyUI that stopped answering is.
    pub stall_timeout: Duration,
    /// Hard limit for the whole run, from the call to the outcome.
    pub total_timeout: Duration,
    /// Optional limit for waiting in ComfyUI's queue behind other prompts.
    pub queue_timeout: Option<Duration>,
    /// Consecutive polls that find the prompt in neither queue nor history before it is lost.
    pub lost_after_polls: u32,
    /// How long to keep retrying the submission while ComfyUI is unreachable.
    pub start_budget: Duration,
    /// First retry delay for the submission (doubles up to `start_backoff_max`).
    pub start_backoff_initial: Duration,
    /// Longest submission retry delay.
    pub start_backoff_max: Duration,
    /// How long to wait for the event socket before submitting anyway (polling still works).
    pub socket_wait: Duration,
    /// Fail as unreachable when polls keep failing for this long during a run.
    pub unreachable_timeout: Duration,
    /// After an interrupt/delete, how long to wait for ComfyUI to confirm the prompt stopped.
    pub cancel_grace: Duration,
    /// What success requires.
    pub expected_outputs: ExpectedOutputs,
    /// Options of the shared event socket.
    pub hub: HubOptions,
    /// `extra_data.preview_method` of prompts whose [`PromptOptions`] do not set one (C5).
    pub preview_method: PreviewMethod,
}

/// Settings of one prompt that may differ from the runner's [`RunConfig`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromptOptions {
    /// Previews for this prompt (e.g. `auto` for a job that wants them); `None` uses
    /// [`RunConfig::preview_method`].
    pub preview_method: Option<PreviewMethod>,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(1),
            presence_interval: Duration::from_secs(5),
            stall_timeout: Duration::from_secs(180),
            total_timeout: Duration::from_secs(30 * 60),
            queue_timeout: None,
            lost_after_polls: 3,
            start_budget: Duration::from_secs(30),
            start_backoff_initial: Duration::from_millis(250),
            start_backoff_max: Duration::from_secs(4),
            socket_wait: Duration::from_secs(5),
            unreachable_timeout: Duration::from_secs(30),
            cancel_grace: Duration::from_secs(10),
            expected_outputs: ExpectedOutputs::AtLeastOne,
            hub: HubOptions::default(),
            preview_method: PreviewMethod::None,
        }
    }
}

/// What a run reports, in order; the last update is always `Finished` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum RunUpdate {
    /// Waiting in ComfyUI's queue; `position` 0 runs next.
    Queued {
        /// Index among pending prompts in execution order.
        position: usize,
    },
    /// ComfyUI accepted the prompt into its queue (`POST /prompt` answered, or an ambiguous
    /// post was confirmed): a prompt posted after this one runs after it.
    Submitted,
    /// ComfyUI started executing the prompt.
    Started,
    /// Progress changed.
    Progress(RunProgress),
    /// A preview image of this prompt (sampler previews, SaveImageWebsocket frames).
    Preview(PreviewImage),
    /// Confirmed by history: success, with every output file.
    Finished {
        /// All output files, in node order.
        outputs: Vec<OutputFile>,
        /// ComfyUI's own execution time (`execution_start` to `execution_success` in history).
        execution_time: Option<Duration>,
    },
    /// The run failed.
    Failed(RunFailure),
}

impl RunUpdate {
    /// True for `Finished` and `Failed`.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Finished { .. } | Self::Failed(_))
    }
}

/// Why a run failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunFailureKind {
    /// ComfyUI rejected the graph (missing model, missing upload, bad input…).
    Validation,
    /// A node raised at run time.
    Execution,
    /// Interrupted: cancelled by us, or interrupted by someone else.
    Interrupted,
    /// The prompt vanished from queue and history (ComfyUI restarted).
    Lost,
    /// Running, but for `stall_timeout` neither an event nor ComfyUI's answer showed it still
    /// running (ComfyUI hung or stopped answering); it was interrupted.
    Stalled,
    /// Over the total (or queue) time limit; it was interrupted.
    TimedOut,
    /// ComfyUI could not be reached (at submission, or for too long during the run).
    BackendUnreachable,
    /// History says success but the expected output files are missing.
    NoOutputs,
    /// ComfyUI answered something this client cannot interpret.
    Protocol,
    /// ComfyUI (or its proxy) refused the token, or wants one (HTTP 401): fix `COMFYUI_TOKEN`.
    Unauthorized,
}

impl RunFailureKind {
    /// Whether running the same job again (possibly elsewhere) can reasonably succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::Lost | Self::BackendUnreachable | Self::Stalled)
    }

    /// Stable snake_case code for APIs and logs.
    pub fn code(self) -> &'static str {
        match self {
            Self::Validation => "validation",
            Self::Execution => "execution",
            Self::Interrupted => "interrupted",
            Self::Lost => "lost",
            Self::Stalled => "stalled",
            Self::TimedOut => "timed_out",
            Self::BackendUnreachable => "backend_unreachable",
            Self::NoOutputs => "no_outputs",
            Self::Protocol => "protocol",
            Self::Unauthorized => "unauthorized",
        }
    }
}

/// A failed run, with what a user needs to fix it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunFailure {
    /// Category.
    pub kind: RunFailureKind,
    /// Human-readable message (node type, node id, exception for execution errors).
    pub message: String,
    /// The node concerned, if any.
    pub node_id: Option<String>,
    /// Its class type, if known.
    pub node_type: Option<String>,
    /// Python exception type for execution errors.
    pub exception_type: Option<String>,
    /// The structured validation report for validation failures.
    pub validation: Option<Box<ValidationReport>>,
}

impl RunFailure {
    /// A failure with only a kind and message.
    pub fn new(kind: RunFailureKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), node_id: None, node_type: None, exception_type: None, validation: None }
    }
}

impl std::fmt::Display for RunFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.code(), self.message)
    }
}

impl std::error::Error for RunFailure {}

/// Runs prompts on one ComfyUI server, sharing one event socket between them. Cheap to clone.
///
/// Create one runner per server and reuse it for every prompt: each runner opens its own
/// socket, and ComfyUI delivers a client id's events to only one socket.
#[derive(Clone, Debug)]
pub struct PromptRunner {
    client: ComfyClient,
    hub: EventHub,
    config: Arc<RunConfig>,
}

impl PromptRunner {
    /// Creates the runner and starts its event socket (needs a tokio runtime).
    pub fn new(client: ComfyClient, config: RunConfig) -> Self {
        let hub = EventHub::spawn(&client, config.hub.clone());
        Self { client, hub, config: Arc::new(config) }
    }

    /// The HTTP client.
    pub fn client(&self) -> &ComfyClient {
        &self.client
    }

    /// The shared event socket.
    pub fn hub(&self) -> &EventHub {
        &self.hub
    }

    /// The configuration.
    pub fn config(&self) -> &RunConfig {
        &self.config
    }

    /// Submits `graph` as `prompt_id` and supervises it until a terminal update. Cancelling
    /// `cancel` removes the prompt from ComfyUI (the jobs cancel where the server has it, else
    /// delete if pending and targeted interrupt if running) and ends the run with
    /// `Failed(Interrupted)`. The prompt goes out with [`RunConfig::preview_method`].
    pub fn run_prompt(&self, graph: Value, prompt_id: PromptId, cancel: CancellationToken) -> PromptRun {
        self.run_prompt_with(graph, prompt_id, cancel, PromptOptions::default())
    }

    /// [`PromptRunner::run_prompt`] with this prompt's own options (its preview method).
    pub fn run_prompt_with(
        &self,
        graph: Value,
        prompt_id: PromptId,
        cancel: CancellationToken,
        options: PromptOptions,
    ) -> PromptRun {
        self.start(prompt_id, graph, true, cancel, options)
    }

    /// Supervises a prompt that is already queued (e.g. found again after a worker restart),
    /// without submitting anything. `graph` only improves progress reporting.
    pub fn attach(&self, prompt_id: PromptId, graph: Option<Value>, cancel: CancellationToken) -> PromptRun {
        self.start(prompt_id, graph.unwrap_or(Value::Null), false, cancel, PromptOptions::default())
    }

    fn start(
        &self,
        prompt_id: PromptId,
        graph: Value,
        submit: bool,
        cancel: CancellationToken,
        options: PromptOptions,
    ) -> PromptRun {
        let (tx, rx) = mpsc::channel(64);
        // Subscribe before anything is posted so no event of this prompt can be missed.
        let notices = self.hub.subscribe();
        let supervisor = Supervisor {
            client: self.client.clone(),
            hub: self.hub.clone(),
            config: self.config.clone(),
            prompt_id: prompt_id.clone(),
            preview_method: options.preview_method.unwrap_or(self.config.preview_method),
            tracker: ProgressTracker::new(&graph),
            graph,
            tx,
            cancel,
            phase: Phase::Unknown,
            absent_polls: 0,
            last_presence: None,
            presence_wanted: false,
            last_ok_poll: Instant::now(),
            last_alive: Instant::now(),
            queued_since: Instant::now(),
            execution_time: None,
        };
        // In the caller's span, so the supervisor's lines carry the caller's context (a worker's job).
        let task = tokio::spawn(tracing::Instrument::in_current_span(supervisor.run(notices, submit)));
        PromptRun { prompt_id, rx, task }
    }
}

/// The updates of one supervised prompt. Implements `Stream<Item = RunUpdate>`.
///
/// Dropping it stops supervision but leaves the prompt alone in ComfyUI; cancel through the token
/// to stop the prompt itself.
#[derive(Debug)]
pub struct PromptRun {
    prompt_id: PromptId,
    rx: mpsc::Receiver<RunUpdate>,
    task: JoinHandle<()>,
}

impl PromptRun {
    /// The supervised prompt.
    pub fn prompt_id(&self) -> &PromptId {
        &self.prompt_id
    }

    /// The next update; `None` after the terminal one.
    pub async fn next(&mut self) -> Option<RunUpdate> {
        self.rx.recv().await
    }

    /// Skips intermediate updates and returns the outcome.
    pub async fn finish(mut self) -> Result<Vec<OutputFile>, RunFailure> {
        while let Some(update) = self.rx.recv().await {
            match update {
                RunUpdate::Finished { outputs, .. } => return Ok(outputs),
                RunUpdate::Failed(failure) => return Err(failure),
                _ => {}
            }
        }
        Err(RunFailure::new(RunFailureKind::Protocol, "prompt supervision ended without an outcome"))
    }
}

impl Stream for PromptRun {
    type Item = RunUpdate;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for PromptRun {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A limit that ends supervision.
#[derive(Debug, Clone, Copy)]
enum Limit {
    Cancelled,
    Total,
    Stall,
    QueueWait,
}

/// What ComfyUI said about an ambiguous submission.
enum Submission {
    /// It has the prompt.
    Known,
    /// It answered, repeatedly, that it has no such prompt: posting again is safe.
    Unknown,
    /// It could not tell within the start budget.
    Unsure,
    /// The run was cancelled while checking.
    Cancelled,
}

/// Where ComfyUI says the prompt is.
enum Presence {
    Running,
    /// Pending, at this position when known.
    Pending(Option<usize>),
    /// Over (the jobs API said so before history was asked again).
    Finished(HistoryEntry),
    /// Neither queued, running nor finished.
    Absent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Unknown,
    Pending(usize),
    Running,
}

type Outcome = Result<Vec<OutputFile>, RunFailure>;

struct Supervisor {
    client: ComfyClient,
    hub: EventHub,
    config: Arc<RunConfig>,
    prompt_id: PromptId,
    preview_method: PreviewMethod,
    graph: Value,
    tracker: ProgressTracker,
    tx: mpsc::Sender<RunUpdate>,
    cancel: CancellationToken,
    phase: Phase,
    absent_polls: u32,
    /// When ComfyUI last said where the prompt is (queue or jobs API).
    last_presence: Option<Instant>,
    /// The next poll must ask where the prompt is (the socket hinted at a change).
    presence_wanted: bool,
    last_ok_poll: Instant,
    /// Last sign that ComfyUI is working on the prompt; the stall clock runs from here.
    last_alive: Instant,
    queued_since: Instant,
    execution_time: Option<Duration>,
}

impl Supervisor {
    async fn run(mut self, mut notices: broadcast::Receiver<HubNotice>, submit: bool) {
        let started = Instant::now();
        let deadline = started + self.config.total_timeout;
        let outcome = if submit {
            match self.submit(deadline).await {
                Ok(()) => {
                    self.emit(RunUpdate::Submitted).await;
                    self.supervise(&mut notices, deadline).await
                }
                Err(failure) => Err(failure),
            }
        } else {
            self.supervise(&mut notices, deadline).await
        };
        match &outcome {
            Ok(outputs) => {
                tracing::info!(prompt_id = %self.prompt_id, files = outputs.len(), "prompt finished")
            }
            Err(failure) => tracing::info!(prompt_id = %self.prompt_id, %failure, "prompt failed"),
        }
        let update = match outcome {
            Ok(outputs) => {
                self.tracker.complete();
                let snapshot = self.tracker.take_snapshot();
                self.emit(RunUpdate::Progress(snapshot)).await;
                RunUpdate::Finished { outputs, execution_time: self.execution_time }
            }
            Err(failure) => RunUpdate::Failed(failure),
        };
        self.emit(update).await;
    }

    /// Posts the prompt, retrying while ComfyUI is unreachable within the start budget.
    async fn submit(&mut self, deadline: Instant) -> Result<(), RunFailure> {
        let budget_end = (Instant::now() + self.config.start_budget).min(deadline);
        let socket_wait = self.config.socket_wait.min(budget_end.saturating_duration_since(Instant::now()));
        tokio::select! {
            _ = self.cancel.cancelled() => {
                return Err(RunFailure::new(RunFailureKind::Interrupted, "cancelled before submission"));
            }
            connected = self.hub.wait_connected(socket_wait) => if !connected {
                tracing::warn!(prompt_id = %self.prompt_id, endpoint = %self.client.endpoint(),
                    "event socket not connected; submitting anyway and relying on polling");
            }
        }
        let mut backoff = self.config.start_backoff_initial;
        loop {
            let result = tokio::select! {
                _ = self.cancel.cancelled() => {
                    // An earlier ambiguous attempt may have queued it; removing an unknown id is a no-op.
                    self.stop_remote().await;
                    return Err(RunFailure::new(RunFailureKind::Interrupted, "cancelled before submission"));
                }
                result = self.client.queue_prompt_with(&self.graph, &self.prompt_id, self.preview_method) => result,
            };
            let error = match result {
                Ok(queued) => {
                    tracing::debug!(prompt_id = %self.prompt_id, number = queued.number, "prompt queued");
                    self.queued_since = Instant::now();
                    return Ok(());
                }
                Err(ComfyError::Validation(report)) => {
                    let mut failure = RunFailure::new(RunFailureKind::Validation, report.to_string());
                    if let [node] = report.nodes.as_slice() {
                        failure.node_id = Some(node.node_id.clone());
                        failure.node_type = Some(node.class_type.clone()).filter(|c| !c.is_empty());
                    } else if let (true, Some(node)) = (report.nodes.is_empty(), &report.node) {
                        failure.node_id = Some(node.node_id.clone());
                        failure.node_type = Some(node.class_type.clone()).filter(|c| !c.is_empty());
                    }
                    failure.validation = Some(Box::new(report));
                    return Err(failure);
                }
                Err(error @ ComfyError::Unauthorized { .. }) => {
                    return Err(RunFailure::new(RunFailureKind::Unauthorized, error.to_string()));
                }
                Err(error @ ComfyError::Status { status: 400..=499, .. }) => {
                    return Err(RunFailure::new(RunFailureKind::Validation, error.to_string()));
                }
                Err(error) if error.is_transient() => error,
                Err(error) => {
                    return Err(RunFailure::new(RunFailureKind::Protocol, error.to_string()));
                }
            };
            // A timeout or broken connection may hide a successful submission, and ComfyUI
            // (0.3.64 and 0.38 alike) queues a repeated prompt id a second time: post again only
            // once ComfyUI has said it does not know the prompt.
            if error.is_ambiguous() {
                match self.confirm_submission(budget_end, &mut backoff).await {
                    Submission::Known => {
                        self.queued_since = Instant::now();
                        return Ok(());
                    }
                    Submission::Unknown => {}
                    Submission::Unsure => {
                        // Posting again could run it twice; supervising finds it if it is there
                        // and ends as lost (retryable) if it is not.
                        tracing::warn!(prompt_id = %self.prompt_id, %error,
                            "could not confirm the submission; supervising it as submitted");
                        self.queued_since = Instant::now();
                        return Ok(());
                    }
                    Submission::Cancelled => {
                        self.stop_remote().await;
                        return Err(RunFailure::new(RunFailureKind::Interrupted, "cancelled before submission"));
                    }
                }
            }
            if Instant::now() + backoff > budget_end {
                return Err(RunFailure::new(
                    RunFailureKind::BackendUnreachable,
                    format!("could not submit the prompt: {error}"),
                ));
            }
            tracing::info!(prompt_id = %self.prompt_id, %error, retry_in = ?backoff, "ComfyUI not available; retrying");
            tokio::select! {
                _ = self.cancel.cancelled() => {}
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(self.config.start_backoff_max);
        }
    }

    /// After an ambiguous `POST /prompt`: asks ComfyUI whether it has the prompt, retrying while
    /// it cannot answer. `Unknown` needs `lost_after_polls` answers that it has no such prompt
    /// (one could come while ComfyUI is still validating the graph it received).
    async fn confirm_submission(&self, budget_end: Instant, backoff: &mut Duration) -> Submission {
        let mut denials = 0;
        loop {
            match self.prompt_known().await {
                Ok(true) => return Submission::Known,
                Ok(false) => {
                    denials += 1;
                    if denials >= self.config.lost_after_polls.max(1) {
                        return Submission::Unknown;
                    }
                }
                Err(error) => {
                    tracing::info!(prompt_id = %self.prompt_id, %error, "cannot tell yet whether ComfyUI has the prompt")
                }
            }
            if Instant::now() + *backoff > budget_end {
                return Submission::Unsure;
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return Submission::Cancelled,
                _ = tokio::time::sleep(*backoff) => {}
            }
            *backoff = (*backoff * 2).min(self.config.start_backoff_max);
        }
    }

    /// Whether ComfyUI has the prompt (finished, running or pending); an error means it could
    /// not tell.
    async fn prompt_known(&self) -> Result<bool, ComfyError> {
        if self.client.has_jobs_api() == Some(true) {
            // One answer that tells "unknown" (404) from pending, running and finished alike.
            return Ok(!matches!(self.client.job(&self.prompt_id).await?, JobLookup::Unknown));
        }
        if self.client.history(&self.prompt_id).await?.is_some() {
            return Ok(true);
        }
        if self.client.active_prompts().await?.position(&self.prompt_id).is_some() {
            return Ok(true);
        }
        // It may have finished between the two requests.
        Ok(self.client.history(&self.prompt_id).await?.is_some())
    }

    async fn supervise(&mut self, notices: &mut broadcast::Receiver<HubNotice>, deadline: Instant) -> Outcome {
        let mut poll_timer = tokio::time::interval(self.config.poll_interval);
        poll_timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut notices_open = true;
        self.last_ok_poll = Instant::now();
        loop {
            let mut poll_now = false;
            tokio::select! {
                biased;
                reached = self.limits(deadline) => return Err(self.on_limit(reached).await),
                notice = notices.recv(), if notices_open => match notice {
                    Ok(HubNotice::Event(event)) => {
                        poll_now = self.on_event(&event).await;
                        // An end: if history has no entry yet, the prompt may have been lost.
                        self.presence_wanted |= poll_now;
                    }
                    Ok(HubNotice::Connected { .. }) => {
                        // Events sent while disconnected are gone: catch up from history/queue.
                        // A connection says nothing about the prompt, so the stall clock keeps
                        // running (a socket that keeps reconnecting must not hide a hang).
                        poll_now = true;
                        self.presence_wanted = true;
                    }
                    Ok(HubNotice::Disconnected { .. }) => {}
                    Err(RecvError::Lagged(missed)) => {
                        tracing::debug!(prompt_id = %self.prompt_id, missed, "event subscriber lagged");
                        poll_now = true;
                        self.presence_wanted = true;
                    }
                    Err(RecvError::Closed) => notices_open = false,
                },
                _ = poll_timer.tick() => poll_now = true,
            }
            if poll_now {
                // A request to a hung ComfyUI can take the whole request timeout: the limits
                // (cancel, total, stall) must not wait for it.
                let polled = tokio::select! {
                    biased;
                    reached = self.limits(deadline) => Err(reached),
                    outcome = self.poll() => Ok(outcome),
                };
                match polled {
                    Err(Limit::Stall) if self.alive_in_buffered_events(notices).await => {}
                    Err(reached) => return Err(self.on_limit(reached).await),
                    Ok(Some(outcome)) => return outcome,
                    Ok(None) => {}
                }
                poll_timer.reset();
            }
        }
    }

    /// Handles the notices that queued up while a poll was waiting and tells whether they show
    /// the prompt alive again (events naming it), which cancels a stall that fired meanwhile.
    async fn alive_in_buffered_events(&mut self, notices: &mut broadcast::Receiver<HubNotice>) -> bool {
        loop {
            match notices.try_recv() {
                Ok(HubNotice::Event(event)) => {
                    // An end hint makes the next poll ask where the prompt is.
                    self.presence_wanted |= self.on_event(&event).await;
                }
                Ok(_) | Err(TryRecvError::Lagged(_)) => {}
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
        self.last_alive + self.config.stall_timeout > Instant::now()
    }

    /// Resolves when a limit of the run is reached. The future owns copies of the deadlines, so
    /// it can race a poll that borrows the supervisor.
    fn limits(&self, deadline: Instant) -> impl Future<Output = Limit> + use<> {
        let cancel = self.cancel.clone();
        // Only a running prompt can stall; `last_alive` moves with every sign that ComfyUI is
        // still working on it (its events, or a poll that lists it as running).
        let stall_at = (self.phase == Phase::Running).then(|| self.last_alive + self.config.stall_timeout);
        let queue_limit_at = match (self.phase, self.config.queue_timeout) {
            (Phase::Pending(_) | Phase::Unknown, Some(limit)) => Some(self.queued_since + limit),
            _ => None,
        };
        async move {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => Limit::Cancelled,
                _ = tokio::time::sleep_until(deadline) => Limit::Total,
                _ = sleep_until_opt(stall_at) => Limit::Stall,
                _ = sleep_until_opt(queue_limit_at) => Limit::QueueWait,
            }
        }
    }

    /// Stops the prompt for a reached limit and returns the failure to report.
    async fn on_limit(&mut self, reached: Limit) -> RunFailure {
        match reached {
            Limit::Cancelled => self.abort(RunFailureKind::Interrupted, "cancelled".to_owned()).await,
            Limit::Total => {
                let message = format!("no result within {:?}", self.config.total_timeout);
                self.abort(RunFailureKind::TimedOut, message).await
            }
            Limit::Stall => {
                let message = format!(
                    "no sign of progress for {:?}: ComfyUI neither sent an event for the prompt nor answered that it is still running it{}",
                    self.config.stall_timeout,
                    self.tracker.snapshot().node_type.map(|t| format!(" (last node: {t})")).unwrap_or_default()
                );
                self.abort(RunFailureKind::Stalled, message).await
            }
            Limit::QueueWait => {
                let message = format!(
                    "still waiting in the ComfyUI queue after {:?}",
                    self.config.queue_timeout.unwrap_or_default()
                );
                self.abort(RunFailureKind::TimedOut, message).await
            }
        }
    }

    /// Handles a socket event; returns true when it hints that the prompt ended.
    async fn on_event(&mut self, event: &ComfyEvent) -> bool {
        let ours = match event.prompt_id() {
            Some(id) => self.prompt_id.matches(id),
            // After a reconnect ComfyUI replays `executing` without a prompt id, and legacy
            // previews carry none: they belong to whatever this client has running.
            None => {
                self.phase == Phase::Running
                    && matches!(
                        event,
                        ComfyEvent::Executing { node: Some(_), .. }
                            | ComfyEvent::Preview(_)
                            | ComfyEvent::ProgressText { .. }
                    )
            }
        };
        if !ours {
            return false;
        }
        // Only an event naming the prompt proves progress: the replayed `executing` after a
        // reconnect carries no id and comes even when the node is hung.
        if event.prompt_id().is_some() {
            self.last_alive = Instant::now();
        }
        match event {
            ComfyEvent::ExecutionSuccess { .. }
            | ComfyEvent::ExecutionError(_)
            | ComfyEvent::ExecutionInterrupted(_) => {
                return true;
            }
            ComfyEvent::Executing { node: None, .. } => return true,
            ComfyEvent::Preview(preview) => {
                self.emit(RunUpdate::Preview(preview.clone())).await;
                return false;
            }
            _ => {}
        }
        self.mark_running().await;
        if self.tracker.observe(event) {
            let snapshot = self.tracker.take_snapshot();
            self.emit(RunUpdate::Progress(snapshot)).await;
        }
        false
    }

    /// One round of the source of truth: history (`{}` until the prompt is over, so a few bytes)
    /// every time, then where the prompt is (running, pending or gone) only when that is in doubt.
    async fn poll(&mut self) -> Option<Outcome> {
        match self.client.history(&self.prompt_id).await {
            Ok(Some(entry)) => return Some(self.conclude(&entry)),
            Ok(None) => {}
            Err(error) => return self.poll_failed(error),
        }
        self.last_ok_poll = Instant::now();
        if !self.presence_due() {
            return None;
        }
        let presence = match self.presence().await {
            Ok(presence) => presence,
            Err(error) => return self.poll_failed(error),
        };
        self.last_ok_poll = Instant::now();
        self.last_presence = Some(Instant::now());
        self.presence_wanted = false;
        match presence {
            Presence::Finished(entry) => return Some(self.conclude(&entry)),
            Presence::Running => {
                self.absent_polls = 0;
                self.mark_running().await;
                // ComfyUI answers and still runs it: a long silent node (a first model load, a
                // long VAE decode) is not a stall.
                self.last_alive = Instant::now();
            }
            Presence::Pending(position) => {
                self.absent_polls = 0;
                // A stale queue answer can arrive after the socket said it started.
                if let Some(position) = position
                    && self.phase != Phase::Running
                    && self.phase != Phase::Pending(position)
                {
                    self.phase = Phase::Pending(position);
                    self.emit(RunUpdate::Queued { position }).await;
                }
            }
            Presence::Absent => {
                // It may have finished between the two requests.
                match self.client.history(&self.prompt_id).await {
                    Ok(Some(entry)) => return Some(self.conclude(&entry)),
                    Ok(None) => {}
                    Err(error) => return self.poll_failed(error),
                }
                self.absent_polls += 1;
                tracing::debug!(prompt_id = %self.prompt_id, absent = self.absent_polls, "prompt in neither queue nor history");
                if self.absent_polls >= self.config.lost_after_polls.max(1) {
                    return Some(Err(RunFailure::new(
                        RunFailureKind::Lost,
                        format!(
                            "prompt {} disappeared from ComfyUI's queue and history (server restarted?)",
                            self.prompt_id
                        ),
                    )));
                }
            }
        }
        None
    }

    /// Whether this poll must also ask where the prompt is. The answer is needed to tell a
    /// pending or running prompt from a lost one, for queue positions and, while the prompt's own
    /// events are silent, to keep a running prompt from counting as stalled.
    fn presence_due(&self) -> bool {
        // Not seen yet, suspected lost, or the socket hinted at a change (reconnect, end).
        if self.phase == Phase::Unknown || self.absent_polls > 0 || self.presence_wanted {
            return true;
        }
        let interval = self.config.presence_interval;
        match self.phase {
            // Its own events prove it runs; ask only after a silence, and often enough that a
            // healthy ComfyUI answers several times within the stall timeout.
            Phase::Running => self.last_alive.elapsed() >= interval.min(self.config.stall_timeout / 4),
            _ => self.last_presence.is_none_or(|at| at.elapsed() >= interval),
        }
    }

    /// Where the prompt is. With the jobs API one `GET /api/jobs/{id}` says it (a 404 is a prompt
    /// the server does not know, which `/history/{id}` cannot tell from a running one); without
    /// it, the queue does.
    async fn presence(&self) -> Result<Presence, ComfyError> {
        if self.client.has_jobs_api() == Some(true) {
            return Ok(match self.client.job(&self.prompt_id).await? {
                JobLookup::Unknown => Presence::Absent,
                // A status newer than this client still means the server has the prompt.
                JobLookup::Running | JobLookup::Other(_) => Presence::Running,
                JobLookup::Pending => match self.client.active_prompts().await?.position(&self.prompt_id) {
                    // The job says pending but not where; the graph-free list has the order.
                    Some(QueuePosition::Pending { position }) => Presence::Pending(Some(position)),
                    Some(QueuePosition::Running) => Presence::Running,
                    None => Presence::Pending(None),
                },
                // History stays the source of outputs; the job's own copy serves when history
                // no longer has the entry.
                JobLookup::Finished(entry) => {
                    Presence::Finished(self.client.history(&self.prompt_id).await?.unwrap_or(entry))
                }
            });
        }
        Ok(match self.client.active_prompts().await?.position(&self.prompt_id) {
            Some(QueuePosition::Running) => Presence::Running,
            Some(QueuePosition::Pending { position }) => Presence::Pending(Some(position)),
            None => Presence::Absent,
        })
    }

    fn poll_failed(&mut self, error: ComfyError) -> Option<Outcome> {
        if let ComfyError::Unauthorized { .. } = error {
            // A token does not fix itself: waiting out `unreachable_timeout` would only end in a
            // retryable failure that fails the same way.
            return Some(Err(RunFailure::new(RunFailureKind::Unauthorized, error.to_string())));
        }
        let silent_for = self.last_ok_poll.elapsed();
        if silent_for >= self.config.unreachable_timeout {
            return Some(Err(RunFailure::new(
                RunFailureKind::BackendUnreachable,
                format!("ComfyUI stopped answering during the run ({silent_for:?}): {error}"),
            )));
        }
        tracing::warn!(prompt_id = %self.prompt_id, %error, "poll failed");
        None
    }

    /// Turns a history entry into the outcome (and notes ComfyUI's execution time).
    fn conclude(&mut self, entry: &HistoryEntry) -> Outcome {
        self.execution_time = entry.execution_time();
        match entry.outcome() {
            HistoryOutcome::Success => {
                let outputs = entry.output_files();
                match &self.config.expected_outputs {
                    ExpectedOutputs::Nothing => Ok(outputs),
                    ExpectedOutputs::AtLeastOne if outputs.is_empty() => Err(RunFailure::new(
                        RunFailureKind::NoOutputs,
                        "ComfyUI reports success but the prompt produced no output files",
                    )),
                    ExpectedOutputs::AtLeastOne => Ok(outputs),
                    ExpectedOutputs::Nodes(nodes) => {
                        let missing: Vec<&str> = nodes
                            .iter()
                            .filter(|node| !outputs.iter().any(|f| &f.node_id == *node))
                            .map(String::as_str)
                            .collect();
                        if missing.is_empty() {
                            Ok(outputs)
                        } else {
                            let mut failure = RunFailure::new(
                                RunFailureKind::NoOutputs,
                                format!(
                                    "ComfyUI reports success but output node(s) {} produced no files",
                                    missing.join(", ")
                                ),
                            );
                            if let [node] = missing.as_slice() {
                                failure.node_id = Some((*node).to_owned());
                                failure.node_type = self.tracker.class_type(node).map(str::to_owned);
                            }
                            Err(failure)
                        }
                    }
                }
            }
            HistoryOutcome::Error(info) => {
                let node_type = info
                    .node_type
                    .clone()
                    .or_else(|| info.node_id.as_deref().and_then(|n| self.tracker.class_type(n)).map(str::to_owned));
                Err(RunFailure {
                    kind: RunFailureKind::Execution,
                    message: info.summary(),
                    node_id: info.node_id.clone(),
                    node_type,
                    exception_type: Some(info.exception_type.clone()).filter(|t| !t.is_empty()),
                    validation: None,
                })
            }
            HistoryOutcome::Interrupted(info) => {
                let at = match (&info.node_type, &info.node_id) {
                    (Some(t), Some(n)) => format!(" at {t} (node {n})"),
                    (None, Some(n)) => format!(" at node {n}"),
                    _ => String::new(),
                };
                let mut failure = RunFailure::new(
                    RunFailureKind::Interrupted,
                    format!("interrupted{at} by another client or the ComfyUI UI"),
                );
                failure.node_id = info.node_id.clone();
                failure.node_type = info.node_type.clone();
                Err(failure)
            }
            HistoryOutcome::Unknown { status_str } => Err(RunFailure::new(
                RunFailureKind::Execution,
                format!("ComfyUI ended the prompt with status {status_str:?} and no result message"),
            )),
        }
    }

    /// Stops the prompt in ComfyUI and returns the failure to report.
    async fn abort(&mut self, kind: RunFailureKind, message: String) -> RunFailure {
        tracing::info!(prompt_id = %self.prompt_id, kind = kind.code(), %message, "stopping prompt");
        self.stop_remote().await;
        let mut failure = RunFailure::new(kind, message);
        if kind != RunFailureKind::Interrupted {
            let snapshot = self.tracker.snapshot();
            failure.node_id = snapshot.node;
            failure.node_type = snapshot.node_type;
        }
        failure
    }

    /// Delete (if pending) and interrupt (if running), by prompt id only, until ComfyUI confirms
    /// the prompt is no longer queued or running, or the grace period ends.
    async fn stop_remote(&self) {
        // A hung ComfyUI would hold each request for the whole request timeout.
        if tokio::time::timeout(self.config.cancel_grace, self.stop_remote_until_confirmed()).await.is_err() {
            tracing::warn!(prompt_id = %self.prompt_id, "ComfyUI did not answer the stop requests in time");
        }
    }

    async fn stop_remote_until_confirmed(&self) {
        let grace_end = Instant::now() + self.config.cancel_grace;
        let pause = self.config.poll_interval.min(Duration::from_millis(250));
        // The jobs cancel (C3) removes a pending or running prompt in one step on the server,
        // with no window between "is it running?" and the interrupt.
        let atomic = self.client.has_jobs_api() == Some(true) && self.cancel_atomically().await;
        if !atomic {
            self.stop_legacy().await;
        }
        loop {
            if let Ok(Some(_)) = self.client.history(&self.prompt_id).await {
                return;
            }
            match self.presence().await {
                Ok(Presence::Absent | Presence::Finished(_)) => return,
                Ok(Presence::Running | Presence::Pending(_)) if atomic => {
                    let _ = self.client.cancel_job(&self.prompt_id).await;
                }
                Ok(Presence::Running) => {
                    let _ = self.client.interrupt(&self.prompt_id).await;
                }
                Ok(Presence::Pending(_)) => {
                    let _ = self.client.delete_pending(&self.prompt_id).await;
                }
                Err(_) => {}
            }
            if Instant::now() + pause > grace_end {
                tracing::warn!(prompt_id = %self.prompt_id, "ComfyUI did not confirm that the prompt stopped");
                return;
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// `POST /api/jobs/{id}/cancel`; false when the server has no such route or the call failed
    /// (then the two-step stop is used).
    async fn cancel_atomically(&self) -> bool {
        match self.client.cancel_job(&self.prompt_id).await {
            Ok(Some(cancelled)) => {
                tracing::debug!(prompt_id = %self.prompt_id, cancelled, "jobs cancel");
                true
            }
            Ok(None) => false,
            Err(error) => {
                tracing::warn!(prompt_id = %self.prompt_id, %error, "jobs cancel failed; using /queue and /interrupt");
                false
            }
        }
    }

    /// Delete (if pending) and interrupt (if running), by prompt id only.
    async fn stop_legacy(&self) {
        let delete = async {
            if let Err(error) = self.client.delete_pending(&self.prompt_id).await {
                tracing::warn!(prompt_id = %self.prompt_id, %error, "queue delete failed");
            }
        };
        let interrupt = async {
            if let Err(error) = self.client.interrupt(&self.prompt_id).await {
                tracing::warn!(prompt_id = %self.prompt_id, %error, "interrupt failed");
            }
        };
        if self.phase == Phase::Running {
            // Interrupt first: on a hung ComfyUI the first request may be the only one sent.
            interrupt.await;
            delete.await;
        } else {
            // Delete first so it cannot start, then interrupt in case it already had (the loop
            // in `stop_remote_until_confirmed` catches one that started in between).
            delete.await;
            interrupt.await;
        }
    }

    async fn mark_running(&mut self) {
        if self.phase != Phase::Running {
            self.phase = Phase::Running;
            self.last_alive = Instant::now();
            self.emit(RunUpdate::Started).await;
        }
    }

    async fn emit(&self, update: RunUpdate) {
        // The receiver only disappears when the PromptRun was dropped, which also aborts us.
        let _ = self.tx.send(update).await;
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
