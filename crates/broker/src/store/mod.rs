//! The job store: the only module that knows SQL.
//!
//! [`Store`] is the one interface the service calls: async methods that speak domain types only
//! ([`JobRecord`], [`NewJob`], outcomes). Behind it is one engine per deployment:
//!
//! - [`sqlite`]: the embedded default. One SQLite database in WAL mode under the data directory;
//!   every state change is one short transaction on a single writer connection (on the blocking
//!   pool), reads on a small pool of read connections; the queue's claim order mirrored in memory
//!   (`queue_index`) for positions.
//! - [`postgres`]: the shared engine (`DATABASE_URL`), which several brokers may use at once:
//!   claims lock with `SKIP LOCKED` and re-check, changes lock their job's row, and each committed
//!   change is announced to the other brokers with `NOTIFY` ([`Store::cluster_notes`]).
//!
//! Whatever the engine, the lease columns, not row locks, hold a worker's claim on a job: a
//! database transaction never spans a network call.

use std::collections::HashMap;
use std::path::Path;

use tdcomfy_api::{InputInfo, JobId, JobStatus, LeaseToken, Progress, ResultInfo, StreamMode, Timestamp};

use crate::clock::Clock;

pub mod postgres;
mod queue_index;
pub mod sqlite;

pub use postgres::{DatabaseUrl, PgStore};
pub use sqlite::SqliteStore;

/// Errors of the store. Lease and state conflicts are ordinary outcomes a worker must handle;
/// `Database` and `Join` are broker faults.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No job with that id.
    #[error("job not found")]
    NotFound,
    /// The caller's lease token is not the job's current one, or the job has ended.
    #[error("the lease on this job is no longer held (status {status})")]
    LeaseLost {
        /// The job's status now.
        status: JobStatus,
    },
    /// The job was cancelled by a client while the worker held it.
    #[error("the job was cancelled")]
    Cancelled,
    /// The caller's own lease already finished the job (a repeated result upload): unlike
    /// `LeaseLost`, the token matched.
    #[error("this lease already finished the job")]
    AlreadyDone,
    /// SQLite failed.
    #[error("database error: {0}")]
    Database(#[from] rusqlite::Error),
    /// PostgreSQL failed (a statement, or the connection).
    #[error("database error: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// No PostgreSQL connection could be had from the pool in time.
    #[error("database pool: {0}")]
    Pool(String),
    /// The database cannot be reached at start (the message names DATABASE_URL, never its
    /// password).
    #[error("{0}")]
    Unavailable(String),
    /// PostgreSQL: a lock this change needs stayed held by another session past the lock
    /// timeout on every try (a broker cut off mid-transaction holds its locks until the server
    /// ends its session): the change was not made, and may be tried again.
    #[error("database busy: {0}")]
    Busy(String),
    /// A stored value could not be decoded (corruption or a schema mismatch).
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// The blocking task running the statement panicked or was cancelled.
    #[error("store task failed: {0}")]
    Join(String),
}

/// Whether a job's result bytes exist.
#[derive(Debug, Clone, PartialEq)]
pub enum ResultState {
    /// No result (yet).
    None,
    /// The result file is on disk.
    Present(ResultInfo),
    /// There was a result; `DELETE` or `RESULT_TTL` removed it.
    Deleted,
}

/// The worker lease on a running job.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseState {
    /// Secret proving the lease.
    pub token: LeaseToken,
    /// Worker that holds it.
    pub owner: String,
    /// When it lapses unless renewed; `None` once the job ended.
    pub expires_at: Option<Timestamp>,
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    /// The id.
    pub id: JobId,
    /// Insertion order; the queue is FIFO on it.
    pub seq: i64,
    /// Lifecycle state.
    pub status: JobStatus,
    /// Positive prompt.
    pub prompt: String,
    /// Negative prompt.
    pub negative_prompt: String,
    /// Seed, if chosen.
    pub seed: Option<u64>,
    /// Workflow name.
    pub workflow: String,
    /// Named workflow inputs.
    pub params: serde_json::Map<String, serde_json::Value>,
    /// The stored input image.
    pub input: InputInfo,
    /// Whether the input file still exists.
    pub input_present: bool,
    /// Accepted at.
    pub created_at: Timestamp,
    /// Current attempt started at.
    pub started_at: Option<Timestamp>,
    /// Reached a terminal state at.
    pub finished_at: Option<Timestamp>,
    /// Number of leases handed out.
    pub attempts: u32,
    /// The current or last lease.
    pub lease: Option<LeaseState>,
    /// Latest progress of the current attempt.
    pub progress: Progress,
    /// Why it failed or was cancelled.
    pub error_message: Option<String>,
    /// The result.
    pub result: ResultState,
    /// ComfyUI's execution time of the successful attempt, as the worker reported it.
    pub comfy_execution_ms: Option<u64>,
    /// Bumped on every change.
    pub version: u64,
    /// The stream; `""` for the anonymous stream of jobs submitted without one.
    pub stream: String,
    /// How the job treated its stream's older jobs.
    pub mode: StreamMode,
    /// Whether the client asked for previews.
    pub previews: bool,
    /// Why it was cancelled ([`cancel_reason`]).
    pub cancel_reason: Option<String>,
    /// The job that superseded it.
    pub superseded_by: Option<JobId>,
    /// The job whose result it reuses.
    pub reused_from: Option<JobId>,
    /// What the result depends on (frame bytes and every parameter), hashed; `None` for jobs whose
    /// result cannot be reproduced (a random seed) and for jobs stored before dedupe existed.
    pub dedupe_key: Option<String>,
    /// The client asked for `dedupe`: a result of the stream with the same key answers the job,
    /// at submit or, if its twin was still running then, when a worker would claim it.
    pub dedupe: bool,
}

/// A finished job whose result a new job may reuse, as the service found it before linking the file.
#[derive(Debug, Clone)]
pub struct Reuse {
    /// The finished job.
    pub from: JobId,
    /// Its result, which the new job's own result file (already linked) copies.
    pub result: ResultInfo,
}

/// What `POST /jobs` stores.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// Id chosen by the caller (the input file is already stored under it).
    pub id: JobId,
    /// Positive prompt.
    pub prompt: String,
    /// Negative prompt.
    pub negative_prompt: String,
    /// Seed.
    pub seed: Option<u64>,
    /// Workflow name.
    pub workflow: String,
    /// Named inputs.
    pub params: serde_json::Map<String, serde_json::Value>,
    /// The stored input image.
    pub input: InputInfo,
    /// `Idempotency-Key` header and a fingerprint of the request's fields.
    pub idempotency: Option<(String, String)>,
    /// The stream (`""`: the anonymous one).
    pub stream: String,
    /// `latest`: the stream's queued jobs are cancelled as superseded in the same transaction.
    pub mode: StreamMode,
    /// In `latest` mode, also cancel the stream's running job.
    pub preempt: bool,
    /// Previews asked for.
    pub previews: bool,
    /// See [`JobRecord::dedupe_key`].
    pub dedupe_key: Option<String>,
    /// See [`JobRecord::dedupe`].
    pub dedupe: bool,
    /// Store the job as `done` with this result, if that job is still the stream's last finished
    /// one with the same key and its result (otherwise the job is queued as usual).
    pub reuse: Option<Reuse>,
}

/// A job [`Store::insert`] stored.
#[derive(Debug)]
pub struct Inserted {
    /// The new job.
    pub record: JobRecord,
    /// Jobs of its stream it cancelled (`latest` mode), each with its status before.
    pub superseded: Vec<(JobRecord, JobStatus)>,
    /// True when the job was stored `done` with [`NewJob::reuse`]'s result.
    pub reused: bool,
}

/// Result of [`Store::insert`].
#[derive(Debug)]
pub enum InsertOutcome {
    /// A new job was stored.
    Created(Inserted),
    /// The idempotency key was seen before with the same request: the original job.
    Replayed(JobRecord),
    /// The idempotency key was seen before with a different request.
    KeyConflict,
}

/// Result of [`Store::heartbeat`].
#[derive(Debug)]
pub struct HeartbeatOutcome {
    /// True when the job was cancelled while leased.
    pub cancelled: bool,
    /// The record after the update, when progress changed (for an event).
    pub changed: Option<JobRecord>,
    /// True when this heartbeat ended the job's prefetch (its worker says ComfyUI started it):
    /// a named stream's next queued job, held back until then, may be claimed now, so the
    /// waiting lease requests must be woken.
    pub unblocked: bool,
}

/// Result of [`Store::cancel`].
#[derive(Debug)]
pub struct CancelOutcome {
    /// The record after the call.
    pub record: JobRecord,
    /// Status before the call.
    pub previous: JobStatus,
    /// True when this call changed something (a repeat changes nothing).
    pub changed: bool,
}

/// What one sweep step changed, and the jobs it could not handle (each reported, none stopping the
/// rest).
#[derive(Debug, Default)]
pub struct Swept {
    /// The records after the change.
    pub changed: Vec<JobRecord>,
    /// `(seq, error)` of each job that failed.
    pub failed: Vec<(i64, StoreError)>,
}

impl Swept {
    fn record(&mut self, seq: i64, outcome: Result<JobRecord, StoreError>) {
        match outcome {
            Ok(r) => self.changed.push(r),
            Err(e) => self.failed.push((seq, e)),
        }
    }
}

/// Most jobs one sweep step changes: a backlog (a million rows past `JOB_RETENTION` after an
/// upgrade) is worked off over several sweeps instead of in one long transaction.
pub const SWEEP_BATCH: i64 = 256;

/// Most records one sweep deletes for `JOB_RETENTION`: each deletion maintains five indexes and
/// the counts, and the writer is held meanwhile, so a backlog is worked off at 500 a sweep (a
/// million in about half an hour) rather than delaying submissions by tens of milliseconds.
pub const RETENTION_BATCH: i64 = 500;

/// Counts per status, for `/health`.
#[derive(Debug, Clone, Copy, Default)]
pub struct StatusCounts {
    /// Queued jobs.
    pub queued: u64,
    /// Running jobs.
    pub running: u64,
    /// Done jobs.
    pub done: u64,
    /// Failed jobs.
    pub error: u64,
    /// Cancelled jobs.
    pub cancelled: u64,
}

/// What a broker hears of the changes other brokers make to the shared database (PostgreSQL's
/// `NOTIFY`, sent in the changing transaction, so only committed changes are heard).
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterNote {
    /// A job changed: the receiving broker re-reads it and publishes `kind` to its own
    /// subscribers, and wakes its waiting workers when the job is queued.
    Changed {
        /// The job changed.
        id: JobId,
        /// The event the change is.
        kind: tdcomfy_api::JobEventKind,
        /// The row's version after the change.
        version: u64,
    },
    /// The listening connection was lost and is back: notes may have been missed meanwhile, so
    /// whatever was shown from them must be re-read (clients get a `resync`, waiting workers a
    /// wake-up).
    Missed,
    /// Nothing any client sees changed, but a queued job may have become claimable (a prefetched
    /// job started, so its stream's next job is offered): wake the waiting lease requests.
    Wake,
}

/// A broker sharing the database, as its last heartbeat row says (`/health`).
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerPresence {
    /// Random at every broker start.
    pub id: String,
    /// The address it listens on, as it reported it.
    pub addr: String,
    /// When it started.
    pub started_at: Timestamp,
    /// Its last heartbeat.
    pub last_seen: Timestamp,
}

/// The job store. Cheap to clone; all clones share the engine's connections.
#[derive(Clone)]
pub enum Store {
    /// The embedded SQLite store (one broker per database).
    Sqlite(SqliteStore),
    /// PostgreSQL, shared by any number of brokers.
    Postgres(PgStore),
}

/// Runs the same call on whichever engine the store is.
macro_rules! on_engine {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            Store::Sqlite($s) => $call,
            Store::Postgres($s) => $call,
        }
    };
}

impl Store {
    /// Opens (creating if needed) the SQLite database at `path` and brings its schema up to date.
    /// Every time the store records or compares comes from `clock`.
    pub fn open(path: &Path, clock: Clock) -> Result<Store, StoreError> {
        Ok(Store::Sqlite(SqliteStore::open(path, clock)?))
    }

    /// Connects to the PostgreSQL database `url` names, brings its schema up to date (once, however
    /// many brokers start together) and starts hearing the other brokers' changes. `broker_id`
    /// tags this broker's own notes, which it does not hear back. Every time the store records or
    /// compares comes from `clock`, so brokers sharing a database need synchronised clocks.
    pub async fn connect(url: &DatabaseUrl, clock: Clock, broker_id: String) -> Result<Store, StoreError> {
        Ok(Store::Postgres(PgStore::connect(url, clock, broker_id).await?))
    }

    /// The id this broker's changes carry in the notes the other brokers hear (`None` on SQLite,
    /// which has no other brokers).
    pub fn broker_id(&self) -> Option<&str> {
        match self {
            Store::Sqlite(_) => None,
            Store::Postgres(s) => Some(s.broker_id()),
        }
    }

    /// The engine's name, for logs and `/health`.
    pub fn engine(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }

    /// Stores a new job, or finds the one its idempotency key already names. In `latest` mode the
    /// stream's queued jobs (and with `preempt` its running one) are cancelled as superseded in the
    /// same transaction, so there is never a moment with two waiting jobs in the stream, nor a
    /// cancellation without the job that replaced it.
    pub async fn insert(&self, job: NewJob) -> Result<InsertOutcome, StoreError> {
        on_engine!(self, s => s.insert(job).await)
    }

    /// The stream's last finished (`done`) job: its id, dedupe key and whether its result is on
    /// disk. From the partial index on the stream's done jobs, so one row is read.
    pub async fn last_done_in_stream(
        &self,
        stream: String,
    ) -> Result<Option<(JobId, Option<String>, bool)>, StoreError> {
        on_engine!(self, s => s.last_done_in_stream(stream).await)
    }

    /// Gives every running job's lease one full `lease_ms` from now, in one transaction. Called
    /// at start, before the first sweep: while the broker was down its workers' heartbeats failed,
    /// so their stored leases lapsed through no fault of theirs; their next heartbeat renews them.
    /// A worker that died meanwhile still loses the job one lease later. The lease is *set*, not
    /// only extended, so a lease stored on a timeline ahead of this one cannot outlive one TTL.
    ///
    /// `JOB_TIMEOUT` (`timeout_ms`) keeps counting the downtime, since the worker went on running
    /// the attempt (and its own timer counts it too); but an attempt whose time ran out while the
    /// broker was down gets the same one lease to report, because its worker may be holding a
    /// finished result it could not upload. `started_at` is pulled back to now if a previous
    /// timeline put it in the future, so the timeout cannot be postponed by a clock step.
    ///
    /// On PostgreSQL the service calls it only when no other broker is alive (while others are,
    /// their sweeps and the workers' heartbeats through them keep the leases right).
    pub async fn resume_running(&self, lease_ms: i64, timeout_ms: i64) -> Result<u64, StoreError> {
        on_engine!(self, s => s.resume_running(lease_ms, timeout_ms).await)
    }

    /// One job by id.
    pub async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        on_engine!(self, s => s.get(id).await)
    }

    /// True when a job was stored under this idempotency key.
    pub async fn knows_idempotency_key(&self, key: String) -> Result<bool, StoreError> {
        on_engine!(self, s => s.knows_idempotency_key(key).await)
    }

    /// Number of queued jobs (SQLite: from its in-memory index; PostgreSQL: counted, at most
    /// MAX_QUEUE rows).
    pub async fn queued_count(&self) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(s) => Ok(s.queued_count()),
            Store::Postgres(s) => s.queued_count().await,
        }
    }

    /// 1-based position of a queued job in the claim order (0 when it is not queued). SQLite: from
    /// the in-memory index (one pass over the streams that have queued jobs, a binary search within
    /// its own); PostgreSQL: the same rule in SQL, since other brokers change the queue.
    pub async fn queue_position(&self, stream: &str, seq: i64) -> Result<u64, StoreError> {
        on_engine!(self, s => s.queue_position(stream, seq).await)
    }

    /// [`Store::queue_position`] of each `(stream, seq)`, in order, at one moment: one query on
    /// PostgreSQL, one lock of the index on SQLite (for job lists, which would otherwise pay
    /// one query per queued job). 0 for a job not queued.
    pub async fn queue_positions(&self, jobs: &[(String, i64)]) -> Result<Vec<u64>, StoreError> {
        on_engine!(self, s => s.queue_positions(jobs).await)
    }

    /// Jobs newest first, optionally of one status.
    pub async fn list(&self, status: Option<JobStatus>, limit: u32) -> Result<Vec<JobRecord>, StoreError> {
        on_engine!(self, s => s.list(status, limit).await)
    }

    /// Number of jobs in each status, never a count over the finished rows: SQLite reads the counts
    /// table its triggers keep (five rows); PostgreSQL counts the queued and running rows and sums
    /// the finished ones' deltas (no counter row every writer would queue on).
    pub async fn counts(&self) -> Result<StatusCounts, StoreError> {
        on_engine!(self, s => s.counts().await)
    }

    /// Leases the next job to `worker`, or returns `None` when the queue is empty: the oldest queued
    /// job of the stream served least recently (streams never served first, oldest job first), so
    /// streams take turns and jobs of one stream start in submission order. [`QueueIndex`] orders
    /// positions by the same rule.
    ///
    /// With `allowed_workflows`, only a job of one of those workflows is claimed (the workflows
    /// the worker's ComfyUI server can run); `None` claims any.
    pub async fn claim_next(
        &self,
        worker: String,
        lease_ms: i64,
        allowed_workflows: Option<Vec<String>>,
    ) -> Result<Option<JobRecord>, StoreError> {
        on_engine!(self, s => s.claim_next_with(worker, lease_ms, allowed_workflows, false).await)
    }

    /// [`Store::claim_next`]; with `prefetch` the job is marked as waiting in ComfyUI's queue
    /// behind the server's running job until [`Store::heartbeat`] hears it `started`.
    pub async fn claim_next_with(
        &self,
        worker: String,
        lease_ms: i64,
        allowed_workflows: Option<Vec<String>>,
        prefetch: bool,
    ) -> Result<Option<JobRecord>, StoreError> {
        on_engine!(self, s => s.claim_next_with(worker, lease_ms, allowed_workflows, prefetch).await)
    }

    /// Finishes a just-claimed `dedupe` job with `reuse`'s result, when `reuse.from` is still the
    /// stream's newest finished job with the same key and its result: the job was queued while
    /// its twin ran, and now needs no GPU. The attempt is not counted. `None` when that no longer
    /// holds (the claim stands and the job runs). The result file is linked under the job's id
    /// before (files before the record that names them); its input is given up here.
    pub async fn complete_reused(
        &self,
        id: JobId,
        token: LeaseToken,
        reuse: Reuse,
    ) -> Result<Option<JobRecord>, StoreError> {
        on_engine!(self, s => s.complete_reused(id, token, reuse).await)
    }

    /// The workflow of the job a claim with `allowed_workflows` would take now, if any (a read:
    /// the broker uses it to hand the job to the waiting worker that suits it best).
    pub async fn peek_next(&self, allowed_workflows: Option<Vec<String>>) -> Result<Option<String>, StoreError> {
        on_engine!(self, s => s.peek_next(allowed_workflows).await)
    }

    /// Forgets the turns of streams not served in the last `keep` claims, at most [`SWEEP_BATCH`]
    /// per call, so neither `stream_turns` nor its mirror grows with every stream id ever seen.
    /// A forgotten stream counts as never served, which orders it before every stream served in
    /// those `keep` claims, exactly where its old turn put it; only its order among other
    /// forgotten streams becomes their age.
    pub async fn forget_old_turns(&self, keep: i64) -> Result<u64, StoreError> {
        on_engine!(self, s => s.forget_old_turns(keep).await)
    }

    /// Renews a lease and records progress. Fails with `LeaseLost` unless `token` is the job's
    /// current lease and the job is running (or was cancelled under this lease).
    pub async fn heartbeat(
        &self,
        id: JobId,
        token: LeaseToken,
        progress: Option<Progress>,
        lease_ms: i64,
        started: bool,
    ) -> Result<HeartbeatOutcome, StoreError> {
        on_engine!(self, s => s.heartbeat(id, token, progress, lease_ms, started).await)
    }

    /// Renews a lease whose result is arriving, and holds `JOB_TIMEOUT` off for as long: a result
    /// that is being delivered is not timed out mid-stream. Same refusals as [`Store::heartbeat`].
    pub async fn renew_for_upload(&self, id: JobId, token: LeaseToken, lease_ms: i64) -> Result<bool, StoreError> {
        on_engine!(self, s => s.renew_for_upload(id, token, lease_ms).await)
    }

    /// Checks that `token` is the current lease of a running job (before accepting bytes from it).
    pub async fn check_lease(&self, id: JobId, token: &LeaseToken) -> Result<JobRecord, StoreError> {
        on_engine!(self, s => s.check_lease(id, token).await)
    }

    /// Marks a job done with its result. Repeating it with the same token after success returns the
    /// finished job and changes nothing (`Ok((record, false))`).
    pub async fn complete(
        &self,
        id: JobId,
        token: LeaseToken,
        result: ResultInfo,
        comfy_execution_ms: Option<u64>,
    ) -> Result<(JobRecord, bool), StoreError> {
        on_engine!(self, s => s.complete(id, token, result, comfy_execution_ms).await)
    }

    /// Records a worker's failure: back to the queue when `retryable` and attempts remain, else
    /// `error` with `message`.
    pub async fn fail(
        &self,
        id: JobId,
        token: LeaseToken,
        message: String,
        retryable: bool,
        handed_back: bool,
        max_attempts: u32,
    ) -> Result<(JobRecord, bool), StoreError> {
        on_engine!(self, s => s.fail(id, token, message, retryable, handed_back, max_attempts).await)
    }

    /// Hands back a lease that never reached its worker (the lease request's client hung up after
    /// the claim committed): the job is queued again and the attempt is not counted. `None` when
    /// the lease is no longer current (nothing to undo).
    /// `claimed_expiry` is the lease's expiry as claimed: a lease renewed since (its worker's first
    /// heartbeat committed meanwhile) has been received and is left alone.
    pub async fn release_unreceived(
        &self,
        id: JobId,
        token: LeaseToken,
        claimed_expiry: Option<Timestamp>,
    ) -> Result<Option<JobRecord>, StoreError> {
        on_engine!(self, s => s.release_unreceived(id, token, claimed_expiry).await)
    }

    /// Cancels a queued or running job; on a finished job only marks its files deleted. Files are
    /// marked gone in the same transaction, so the caller deletes them after the commit.
    pub async fn cancel(&self, id: JobId) -> Result<CancelOutcome, StoreError> {
        on_engine!(self, s => s.cancel(id).await)
    }

    /// Puts running jobs whose lease lapsed back in the queue, or fails them when they used up
    /// `max_attempts`; at most [`SWEEP_BATCH`] per call (the next sweep takes the rest).
    pub async fn expire_leases(&self, max_attempts: u32) -> Result<Swept, StoreError> {
        on_engine!(self, s => s.expire_leases(max_attempts).await)
    }

    /// Fails running jobs whose current attempt has run longer than `timeout_ms` (and whose
    /// restart grace, if any, is over); at most [`SWEEP_BATCH`] per call.
    pub async fn time_out_running(&self, timeout_ms: i64) -> Result<Swept, StoreError> {
        on_engine!(self, s => s.time_out_running(timeout_ms).await)
    }

    /// Finished jobs whose files are still on disk and older than `ttl_ms` (by finish time), oldest
    /// first, at most [`SWEEP_BATCH`]. The partial index on finish time over rows that still have
    /// files means this touches only those rows, however many finished jobs are stored.
    pub async fn files_expired(&self, ttl_ms: i64) -> Result<Vec<JobId>, StoreError> {
        on_engine!(self, s => s.files_expired(ttl_ms).await)
    }

    /// Finished jobs whose record is older than `retention_ms` (by finish time), oldest first, at
    /// most [`RETENTION_BATCH`], each with whether its row says it still has a file; from the
    /// index on finish time, so only those rows are read.
    pub async fn records_expired(&self, retention_ms: i64) -> Result<Vec<(JobId, bool)>, StoreError> {
        on_engine!(self, s => s.records_expired(retention_ms).await)
    }

    /// Deletes the records of `ids` that are still finished and older than `retention_ms` (the
    /// caller removed their files first). Returns how many went.
    pub async fn delete_records(&self, ids: Vec<JobId>, retention_ms: i64) -> Result<u64, StoreError> {
        on_engine!(self, s => s.delete_records(ids, retention_ms).await)
    }

    /// Benchmark hook: stores `n` finished (`done`) jobs in one statement, finish times spread
    /// evenly over the `spread_ms` before now, the newest `with_files` of them still marked as
    /// having their files. Not for production use: the rows name files that do not exist.
    #[doc(hidden)]
    pub async fn fill_finished_for_benchmark(&self, n: u64, spread_ms: i64, with_files: u64) -> Result<(), StoreError> {
        on_engine!(self, s => s.fill_finished_for_benchmark(n, spread_ms, with_files).await)
    }

    /// For each of `ids` that has a row: whether the row says its input and its result are on disk.
    pub async fn owned_files(&self, ids: Vec<JobId>) -> Result<HashMap<JobId, (bool, bool)>, StoreError> {
        on_engine!(self, s => s.owned_files(ids).await)
    }

    /// Records that a finished job's files were deleted; `None` when there was nothing to record.
    pub async fn mark_files_deleted(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        on_engine!(self, s => s.mark_files_deleted(id).await)
    }

    /// The changes other brokers make to the shared database, as they commit; `None` for an
    /// engine that one broker has to itself (SQLite), where every change is this broker's own.
    pub fn cluster_notes(&self) -> Option<tokio::sync::broadcast::Receiver<ClusterNote>> {
        match self {
            Store::Sqlite(_) => None,
            Store::Postgres(s) => Some(s.cluster_notes()),
        }
    }

    /// Records that this broker (`me`) is alive, and returns the brokers whose last heartbeat is
    /// within `within_ms` of now, this one included. SQLite has one broker: `me`, unrecorded.
    pub async fn broker_heartbeat(
        &self,
        me: BrokerPresence,
        within_ms: i64,
    ) -> Result<Vec<BrokerPresence>, StoreError> {
        match self {
            Store::Sqlite(_) => {
                let _ = within_ms;
                Ok(vec![me])
            }
            Store::Postgres(s) => s.broker_heartbeat(me, within_ms).await,
        }
    }

    /// Deletes the presence row of broker `id`, which is stopping. SQLite records none.
    pub async fn broker_leave(&self, id: String) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(_) => Ok(()),
            Store::Postgres(s) => s.broker_leave(id).await,
        }
    }
}

pub(crate) fn check_lease(job: &JobRecord, token: &LeaseToken) -> Result<(), StoreError> {
    match &job.lease {
        Some(lease) if constant_time_eq(lease.token.as_str(), token.as_str()) => Ok(()),
        _ => Err(StoreError::LeaseLost { status: job.status }),
    }
}

/// Compares secrets without an early exit, so timing does not reveal a prefix.
pub(crate) fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) fn opt_id(s: Option<String>) -> Result<Option<JobId>, StoreError> {
    s.as_deref().map(parse_id).transpose()
}

pub(crate) fn parse_id(s: &str) -> Result<JobId, StoreError> {
    JobId::parse(s).ok_or_else(|| StoreError::Corrupt(format!("bad job id {s:?}")))
}

// SQL integers (SQLite INTEGER, PostgreSQL BIGINT) are signed 64-bit; seeds use the full u64 range, so they are stored bit-cast.
pub(crate) fn seed_to_sql(seed: u64) -> i64 {
    seed as i64
}

pub(crate) fn seed_from_sql(v: i64) -> u64 {
    v as u64
}
