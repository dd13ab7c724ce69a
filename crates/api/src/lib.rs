//! The broker's wire types: every JSON body that crosses the broker's HTTP boundary, for clients
//! (TouchDesigner, `tdcomfy submit`) and for workers.
//!
//! This crate is the contract. Field names and status values of the original design (`job_id`,
//! `status`, `has_result`, `error_message`, `processing_time`, …) are kept as they are; new fields are
//! only ever added. Types here carry no behaviour beyond parsing and formatting.

mod ids;
pub mod media;
mod time;

pub use ids::{JobId, LeaseToken};
pub use time::{Timestamp, format_rfc3339_ms};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The lifecycle state of a job, as TouchDesigner scripts see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Accepted and stored, waiting for a worker.
    Queued,
    /// Leased by a worker that is running it.
    Running,
    /// Finished with a result.
    Done,
    /// Finished without a result; `error_message` says why.
    Error,
    /// Cancelled by a client.
    Cancelled,
}

impl JobStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [JobStatus; 5] =
        [JobStatus::Queued, JobStatus::Running, JobStatus::Done, JobStatus::Error, JobStatus::Cancelled];

    /// The wire spelling (`"queued"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Done => "done",
            JobStatus::Error => "error",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// Parses the wire spelling; `None` for anything else.
    pub fn parse(s: &str) -> Option<JobStatus> {
        JobStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// True once the job can no longer change state.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Done | JobStatus::Error | JobStatus::Cancelled)
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a job treats the older jobs of its stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StreamMode {
    /// Every job runs, in submission order (the original behaviour).
    #[default]
    Queue,
    /// Latest wins: a new job cancels the stream's jobs that have not started
    /// (`cancel_reason: "superseded"`), so a stream has at most one job waiting.
    Latest,
}

impl StreamMode {
    /// The wire spelling (`"queue"`, `"latest"`).
    pub fn as_str(self) -> &'static str {
        match self {
            StreamMode::Queue => "queue",
            StreamMode::Latest => "latest",
        }
    }

    /// Parses the wire spelling; `None` for anything else.
    pub fn parse(s: &str) -> Option<StreamMode> {
        [StreamMode::Queue, StreamMode::Latest].into_iter().find(|m| m.as_str() == s)
    }
}

/// Why a job was cancelled (`cancel_reason`).
pub mod cancel_reason {
    /// A client's `DELETE /jobs/{id}` (or `POST /jobs/{id}/cancel`).
    pub const CANCELLED: &str = "cancelled";
    /// A newer job of the same stream in `latest` mode replaced it (`superseded_by` names it).
    pub const SUPERSEDED: &str = "superseded";
}

/// How far a running job has come.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Progress {
    /// Fraction done, 0.0 ..= 1.0.
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub value: f64,
    /// Current sampler step, when the backend reports steps.
    #[serde(default)]
    pub step: Option<u32>,
    /// Number of sampler steps, when known.
    #[serde(default)]
    pub max_steps: Option<u32>,
    /// ComfyUI node id being executed, when known.
    #[serde(default)]
    pub node: Option<String>,
    /// ComfyUI class type of that node, when known.
    #[serde(default)]
    pub node_type: Option<String>,
    /// What that node is busy with besides steps, when ComfyUI says (e.g. `loading` a model;
    /// newer ComfyUI only). Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
}

/// What a finished job produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ResultInfo {
    /// MIME type of the result bytes (`video/mp4` for the default workflow).
    pub content_type: String,
    /// Size in bytes.
    pub size: u64,
}

/// A job as `GET /jobs/{id}` returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    /// The job id.
    pub id: JobId,
    /// Lifecycle state.
    pub status: JobStatus,
    /// When the broker accepted the job (RFC 3339, UTC).
    pub created_at: Timestamp,
    /// Positive prompt as submitted ("" when none).
    pub prompt: String,
    /// Negative prompt as submitted ("" when none).
    pub negative_prompt: String,
    /// Seed as submitted, if any.
    pub seed: Option<u64>,
    /// Name of the workflow that runs the job.
    pub workflow: String,
    /// True when `GET /jobs/{id}/result` will return bytes.
    pub has_result: bool,
    /// Why the job failed or was cancelled, if it did.
    pub error_message: Option<String>,
    /// Seconds from start to finish (or to now while running); null before the job started.
    pub processing_time: Option<f64>,
    /// Progress of the current attempt.
    pub progress: Progress,
    /// 1-based position in the queue while queued; null otherwise.
    pub queue_position: Option<u64>,
    /// When the current attempt started.
    pub started_at: Option<Timestamp>,
    /// When the job reached a terminal state.
    pub finished_at: Option<Timestamp>,
    /// How many times a worker leased the job.
    pub attempts: u32,
    /// Increases on every change; pair with `?wait=&since=` to long-poll without missing updates.
    pub version: u64,
    /// The result's type and size once there is one.
    pub result: Option<ResultInfo>,
    /// Where the time went.
    pub timings: Timings,
    /// While queued: why no worker takes the job when no connected ComfyUI server can run its
    /// workflow (a missing node or model file, from the workers' preflight checks); null when
    /// some server can run it, or no worker has reported on it.
    #[serde(default)]
    pub waiting_reason: Option<String>,
    /// The stream the job belongs to, as submitted; null for jobs without one (they share one
    /// anonymous stream).
    #[serde(default)]
    pub stream: Option<String>,
    /// `queue` or `latest`, as submitted.
    #[serde(default)]
    pub mode: StreamMode,
    /// True when the client asked for previews while the job runs.
    #[serde(default)]
    pub previews: bool,
    /// Why a cancelled job was cancelled: `"cancelled"` (a client's DELETE) or `"superseded"` (a
    /// newer job of its stream in `latest` mode); null otherwise.
    #[serde(default)]
    pub cancel_reason: Option<String>,
    /// The job that superseded this one, when `cancel_reason` is `"superseded"`.
    #[serde(default)]
    pub superseded_by: Option<JobId>,
    /// The finished job whose result this one reuses (`dedupe=true` and nothing changed): the job
    /// was answered `done` at once without GPU work.
    #[serde(default)]
    pub reused_from: Option<JobId>,
    /// The named workflow inputs as submitted (`params`), so a client can run the job again with
    /// the same values (the dashboard's retry).
    #[serde(default)]
    pub params: serde_json::Map<String, serde_json::Value>,
}

/// Where a job's time went, in seconds; null where not (yet) known.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Timings {
    /// From acceptance to the start of the current attempt.
    pub queue_wait: Option<f64>,
    /// ComfyUI's own execution time of the prompt (its history timestamps), as the worker reported.
    pub comfy_execution: Option<f64>,
    /// From acceptance to the end.
    pub total: Option<f64>,
}

/// Response of `POST /jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SubmitResponse {
    /// The new (or, on an idempotent replay, the original) job's id.
    pub job_id: JobId,
    /// Current status (`queued` for a new job).
    pub status: JobStatus,
    /// A human sentence.
    pub message: String,
    /// 1-based queue position while queued.
    pub queue_position: Option<u64>,
    /// Workflow that will run the job.
    pub workflow: String,
    /// The finished job whose result was reused (`dedupe=true` hit; `status` is then `done`).
    #[serde(default)]
    pub reused_from: Option<JobId>,
    /// Jobs of the same stream this submission cancelled (`mode=latest`), oldest first.
    #[serde(default)]
    pub superseded: Vec<JobId>,
}

/// Response of `DELETE /jobs/{id}` and `POST /jobs/{id}/cancel`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeleteResponse {
    /// The job's id.
    pub job_id: JobId,
    /// Status after the call.
    pub status: JobStatus,
    /// What happened, as a sentence.
    pub message: String,
}

/// Response of `GET /jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    /// Jobs, newest first.
    pub jobs: Vec<JobView>,
    /// Number of jobs in `jobs`.
    pub count: usize,
}

/// A worker the broker has heard from recently.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WorkerInfo {
    /// The id the worker leases under.
    pub id: String,
    /// Milliseconds since the worker last called the broker.
    pub last_seen_ms_ago: u64,
    /// The job it holds a lease on, if any.
    pub job_id: Option<JobId>,
    /// The ComfyUI server behind this lease loop (its base URL), from the worker's report;
    /// `null` until a worker that reports it (0.5 and later) sent one.
    #[serde(default)]
    pub server: Option<String>,
    /// `idle` (waiting for a job), `running` (a job runs on the server), `paused` (the loop takes
    /// no job: its server failed a job by being unreachable, and it waits to answer again) or
    /// `unreachable` (the server does not answer); `null` without a report.
    #[serde(default)]
    pub state: Option<ServerState>,
    /// Jobs leased ahead of the running one, waiting in ComfyUI's own queue (`PREFETCH`), oldest
    /// first.
    #[serde(default)]
    pub prefetched_jobs: Vec<JobId>,
    /// The workflow the server ran last (its models are loaded).
    #[serde(default)]
    pub last_workflow: Option<String>,
    /// The server's compute devices from ComfyUI's `/system_stats` `devices[]`, at its last look.
    #[serde(default)]
    pub devices: Vec<DeviceInfo>,
}

/// What a ComfyUI server behind a lease loop is doing, as its worker reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ServerState {
    /// Waiting for a job.
    Idle,
    /// A job runs on the server.
    Running,
    /// Taking no job for a while: the server failed a job by being unreachable.
    Paused,
    /// The server does not answer.
    Unreachable,
}

/// A compute device of a ComfyUI server (`/system_stats` `devices[]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeviceInfo {
    /// Device name (e.g. `cuda:0 NVIDIA GeForce RTX 4090 : cudaMallocAsync`).
    pub name: String,
    /// Device type (`cuda`, `cpu`, `mps`…).
    #[serde(rename = "type")]
    pub kind: String,
    /// Total VRAM in bytes, when reported.
    #[serde(default)]
    pub vram_total: Option<u64>,
    /// Free VRAM in bytes, when reported.
    #[serde(default)]
    pub vram_free: Option<u64>,
}

/// Response of `GET /health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always `"healthy"` when the broker answers.
    pub status: String,
    /// Number of jobs in the store.
    pub jobs_count: u64,
    /// Jobs waiting for a worker.
    pub queued: u64,
    /// Jobs being run.
    pub running: u64,
    /// Jobs finished with a result.
    pub done: u64,
    /// Jobs that failed.
    pub error: u64,
    /// Jobs cancelled by a client.
    pub cancelled: u64,
    /// Workers waiting on a lease or heard from in the last 30 s.
    pub workers_connected: u64,
    /// Those workers (the ones this broker heard from: with several brokers, a worker counts on
    /// each broker its calls reach).
    pub workers: Vec<WorkerInfo>,
    /// The job store's engine: `sqlite` (one broker) or `postgres` (brokers may share it). Empty
    /// from brokers older than this field.
    #[serde(default)]
    pub store: String,
    /// The brokers alive on this broker's database, this one included (`this: true`): on SQLite
    /// only this one. Empty from brokers older than this field.
    #[serde(default)]
    pub brokers: Vec<BrokerInfo>,
}

/// A broker sharing the job database, as its presence heartbeat says (`GET /health`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BrokerInfo {
    /// Random at every start of the broker; also the `<boot>` of its event ids (`<boot>-<seq>`),
    /// so a client can tell which broker an event id came from.
    pub id: String,
    /// The address it listens on, as it reported it (`0.0.0.0:8080` for all interfaces).
    pub addr: String,
    /// When it started.
    pub started_at: Timestamp,
    /// Its last presence heartbeat (about every second).
    pub last_seen: Timestamp,
    /// True for the broker that answered this request.
    pub this: bool,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong, for programs (`code`) and people (`message`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable snake_case code, e.g. `payload_too_large`.
    pub code: String,
    /// A sentence naming the field and the limit where there is one.
    pub message: String,
    /// The request field at fault, if one is.
    #[serde(default)]
    pub field: Option<String>,
    /// The limit that was exceeded, if one was (bytes, characters or pixels).
    #[serde(default)]
    pub limit: Option<u64>,
}

/// What changed, in a [`JobEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobEventKind {
    /// The current state, sent first on a per-job stream.
    Snapshot,
    /// Accepted, or put back in the queue after a lost lease.
    Queued,
    /// A worker leased it.
    Started,
    /// Progress changed.
    Progress,
    /// Finished with a result.
    Done,
    /// Failed.
    Error,
    /// Cancelled.
    Cancelled,
    /// Its files were deleted.
    Deleted,
}

/// One push event, the same on SSE and WebSocket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobEvent {
    /// Always `"job"`, so WebSocket clients can tell events from other messages.
    #[serde(rename = "type")]
    pub kind: String,
    /// What changed.
    pub event: JobEventKind,
    /// The job it concerns.
    pub job_id: JobId,
    /// The job's state after the change.
    pub job: JobView,
}

impl JobEvent {
    /// Builds an event for `job`.
    pub fn new(event: JobEventKind, job: JobView) -> JobEvent {
        JobEvent { kind: "job".to_owned(), event, job_id: job.id, job }
    }
}

/// A `preview` push event, the same on SSE and WebSocket: a newer preview image of a running job
/// is at `url`. It carries no bytes and no job state: it is not a change of the job (its `version`
/// does not move), only the note that `GET url` now answers with a newer image. Sent only for jobs
/// submitted with previews on, at most as often as the worker's `PREVIEW_FPS`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PreviewEvent {
    /// Always `"preview"`, so WebSocket clients that only follow `"job"` messages skip it.
    #[serde(rename = "type")]
    pub kind: String,
    /// Always `"preview"` (the SSE `event:` name).
    pub event: String,
    /// The job it belongs to.
    pub job_id: JobId,
    /// Increases with every preview the broker accepts (across jobs) since it started; a client
    /// that sees a lower `seq` than one it already has for the job skips it.
    pub seq: u64,
    /// Where the image is, relative to the broker: `/jobs/{id}/preview`. Its `ETag` names `seq`.
    pub url: String,
    /// `image/jpeg`, `image/png` or `image/webp`, judged from the bytes.
    pub content_type: String,
    /// Size of the image in bytes.
    pub size: u64,
}

impl PreviewEvent {
    /// The event for preview `seq` of `job_id`.
    pub fn new(job_id: JobId, seq: u64, content_type: &str, size: u64) -> PreviewEvent {
        PreviewEvent {
            kind: "preview".to_owned(),
            event: "preview".to_owned(),
            job_id,
            seq,
            url: format!("/jobs/{job_id}/preview"),
            content_type: content_type.to_owned(),
            size,
        }
    }
}

/// Body of `POST /worker/lease`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LeaseRequest {
    /// A stable name for the worker (host name, GPU index): 1 to 128 visible ASCII characters.
    #[schema(min_length = 1, max_length = 128, pattern = "^[!-~]+$")]
    pub worker_id: String,
    /// Seconds to wait for a job before answering 204 (at most 60).
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 60.0)]
    pub wait: Option<f64>,
    /// The workflows this worker's ComfyUI server can run (its preflight check): only jobs of
    /// these are leased to it. Absent: any workflow (workers without preflight).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_items = 1000)]
    pub workflows: Option<Vec<String>>,
    /// True when the worker's server is already running a job and this lease would wait in
    /// ComfyUI's queue behind it (`PREFETCH`): such a job counts as not started (a `latest`
    /// submission supersedes it) until a heartbeat says `started`, and an idle server waiting at
    /// the same time is served first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub prefetch: bool,
    /// The workflow this loop's server ran last (its models are loaded): among servers waiting
    /// at the same time, a job goes to one whose last workflow is the job's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 128)]
    pub last_workflow: Option<String>,
}

/// Whether one ComfyUI server can run one workflow, as its worker checked it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WorkflowReadiness {
    /// The workflow.
    #[schema(max_length = 128)]
    pub name: String,
    /// True when every node class and every fixed option value (sampler, model file…) of the
    /// workflow is on the server.
    pub ready: bool,
    /// What is missing, one sentence each (empty when ready).
    #[serde(default)]
    pub problems: Vec<String>,
}

/// Body of `POST /worker/preflight`: what the ComfyUI server behind one lease loop can run. Sent
/// at start, whenever it changes, and again every few seconds of leasing (so a restarted broker
/// hears it); the broker forgets it with the worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PreflightReport {
    /// The name the loop leases under.
    #[schema(min_length = 1, max_length = 128, pattern = "^[!-~]+$")]
    pub worker_id: String,
    /// The ComfyUI server (base URL).
    #[schema(max_length = 2048)]
    pub server: String,
    /// False while the server does not answer; the workflows are then as last checked.
    pub reachable: bool,
    /// One entry per workflow the worker serves.
    #[schema(max_items = 1000)]
    pub workflows: Vec<WorkflowReadiness>,
    /// What the server is doing (shown by `/health`); absent from workers older than 0.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<ServerState>,
    /// The job running on the server, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<JobId>,
    /// Jobs waiting in ComfyUI's queue behind it (`PREFETCH`), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 64)]
    pub prefetched_jobs: Vec<JobId>,
    /// The workflow the server ran last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 128)]
    pub last_workflow: Option<String>,
    /// The server's devices from `/system_stats`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 64)]
    pub devices: Vec<DeviceInfo>,
}

/// One server's readiness for a workflow, as `GET /workflows` lists it under `readiness`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ServerReadiness {
    /// The lease loop that reported it.
    pub worker: String,
    /// The ComfyUI server.
    pub server: String,
    /// Whether the server answered at the worker's last look.
    pub reachable: bool,
    /// Whether it can run the workflow.
    pub ready: bool,
    /// What is missing (empty when ready).
    pub problems: Vec<String>,
}

/// The input image of a leased job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InputInfo {
    /// MIME type judged from the bytes (`image/png`, `image/jpeg`, `image/webp`).
    pub content_type: String,
    /// Size in bytes.
    pub size: u64,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// A job handed to a worker, with the token that proves the lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Lease {
    /// The job.
    pub job_id: JobId,
    /// Secret for heartbeat, input, result and fail calls of this attempt.
    pub lease_token: LeaseToken,
    /// Seconds until the lease expires unless renewed by a heartbeat.
    pub lease_expires_in: f64,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Positive prompt.
    pub prompt: String,
    /// Negative prompt.
    pub negative_prompt: String,
    /// Seed, if the client chose one.
    pub seed: Option<u64>,
    /// Workflow name.
    pub workflow: String,
    /// Named workflow inputs, already validated.
    pub params: serde_json::Map<String, serde_json::Value>,
    /// The input image.
    pub input: InputInfo,
    /// Seconds the job may run in all (`JOB_TIMEOUT`).
    pub job_timeout: f64,
    /// Largest result the broker accepts, in bytes (`MAX_RESULT_MB`), so a worker refuses an
    /// over-large output before sending it. Absent from older brokers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_result_bytes: Option<u64>,
    /// True when the client asked for previews of this job while it runs. False from older brokers.
    #[serde(default)]
    pub previews: bool,
}

/// Response of `POST /worker/lease` when a job was leased.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LeaseResponse {
    /// The leased job.
    pub job: Lease,
}

/// Body of `POST /worker/jobs/{id}/heartbeat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatRequest {
    /// The lease's token.
    pub lease_token: LeaseToken,
    /// Progress to publish, if it changed.
    #[serde(default)]
    pub progress: Option<Progress>,
    /// True once ComfyUI started the prompt of a job leased with `prefetch`: from then on it is
    /// the running job of its stream (a `latest` submission no longer supersedes it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub started: bool,
    /// Seconds to hold the answer while the job is not cancelled (at most a third of
    /// `LEASE_TTL`): a prefetched job's worker hears of a cancellation or supersede at once and
    /// takes the prompt out of ComfyUI's queue before it can start. The lease is renewed first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0.0, maximum = 60.0)]
    pub wait: Option<f64>,
}

/// Response of a heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatResponse {
    /// True when a client cancelled the job: stop it and release nothing.
    pub cancelled: bool,
    /// Seconds until the renewed lease expires.
    pub lease_expires_in: f64,
}

/// Body of `POST /worker/jobs/{id}/fail`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FailRequest {
    /// The lease's token.
    pub lease_token: LeaseToken,
    /// What went wrong, shown to the client as `error_message`.
    pub message: String,
    /// True when another attempt may succeed (backend down); the job goes back to the queue while
    /// attempts remain.
    #[serde(default)]
    pub retryable: bool,
    /// True when the worker hands the job back unfinished for a reason of its own (it is shutting
    /// down): the job is queued again and the attempt does not count towards `MAX_ATTEMPTS`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub handed_back: bool,
}

/// Response of the worker's result upload and fail calls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WorkerAck {
    /// The job's status after the call.
    pub status: JobStatus,
}
