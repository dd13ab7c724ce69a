//! The embedded engine: one SQLite database in WAL mode under the data directory. Every state
//! change is one short transaction on a single writer connection (run on the blocking pool, so a
//! slow disk never stalls the async runtime); reads go through a small pool of read connections,
//! which WAL lets run beside the writer.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};
use tdcomfy_api::{
    InputInfo, JobId, JobStatus, LeaseToken, Progress, ResultInfo, StreamMode, Timestamp, cancel_reason,
};

use super::queue_index::{QueueDelta, QueueIndex};
use super::{
    CancelOutcome, HeartbeatOutcome, InsertOutcome, Inserted, JobRecord, LeaseState, NewJob, RETENTION_BATCH,
    ResultState, Reuse, SWEEP_BATCH, StatusCounts, StoreError, Swept, check_lease, opt_id, parse_id, seed_from_sql,
    seed_to_sql,
};
use crate::clock::Clock;

mod schema;

use schema::migrate;

/// The next job a claim takes, for a worker's workflow list (`?1`, a JSON array, or NULL for
/// any): the oldest queued job of the stream served least recently. A named stream offers only its
/// oldest queued job (so a workflow filter skips a stream but never reorders it), and nothing while
/// it has a job prefetched and not started yet (it must start before the stream's next one does)
/// or while the job offered is a `dedupe` twin of the stream's running job (it waits for that
/// result, which answers it at its claim, instead of costing a second GPU run).
/// The redundant `IN` lets the planner use the partial index `jobs_waiting_by_stream`.
/// Shared by [`Store::claim_next_with`] and [`Store::peek_next`], so the two cannot disagree.
const NEXT_JOB: &str = "SELECT j.seq, j.stream, j.workflow FROM jobs j INDEXED BY jobs_by_status \
     LEFT JOIN stream_turns t ON t.stream = j.stream \
     WHERE j.status = 'queued' \
     AND (?1 IS NULL OR j.workflow IN (SELECT value FROM json_each(?1))) \
     AND (j.stream = '' OR NOT EXISTS (SELECT 1 FROM jobs p INDEXED BY jobs_waiting_by_stream \
          WHERE p.stream = j.stream AND p.status IN ('queued', 'running') \
          AND (p.prefetched = 1 OR (p.status = 'queued' AND p.seq < j.seq) \
               OR (j.dedupe = 1 AND p.status = 'running' AND p.dedupe_key = j.dedupe_key)))) \
     ORDER BY COALESCE(t.served, 0), j.seq LIMIT 1";

const COLUMNS: &str = "seq, id, status, prompt, negative_prompt, seed, workflow, params, \
    input_content_type, input_size, input_width, input_height, input_present, created_at, started_at, \
    finished_at, attempts, lease_token, lease_owner, lease_expires_at, progress, error_message, \
    result_state, result_content_type, result_size, comfy_execution_ms, version, stream, mode, previews, \
    cancel_reason, superseded_by, reused_from, dedupe_key, dedupe";

/// The SQLite store. Cheap to clone; all clones share the connections.
#[derive(Clone)]
pub struct SqliteStore {
    writer: Arc<Mutex<Connection>>,
    queue: Arc<Mutex<QueueIndex>>,
    readers: Arc<Mutex<Vec<Connection>>>,
    path: Arc<std::path::PathBuf>,
    clock: Clock,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date. Every
    /// time the store records or compares comes from `clock`.
    pub fn open(path: &Path, clock: Clock) -> Result<SqliteStore, StoreError> {
        let mut writer = Connection::open(path)?;
        writer.busy_timeout(std::time::Duration::from_secs(5))?;
        // WAL lets readers run beside the writer; FULL syncs the WAL on every commit, so an
        // accepted job survives power loss as well as a killed process.
        writer.pragma_update(None, "journal_mode", "WAL")?;
        writer.pragma_update(None, "synchronous", "FULL")?;
        writer.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut writer)?;
        let mut index = QueueIndex::default();
        let turns: Vec<(String, i64)> = writer
            .prepare("SELECT stream, served FROM stream_turns")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let queued: Vec<(i64, String)> = writer
            .prepare("SELECT seq, stream FROM jobs WHERE status = 'queued' ORDER BY seq")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut delta = QueueDelta::default();
        for (stream, served) in turns {
            delta.served(stream, served);
        }
        for (seq, stream) in queued {
            delta.added(seq, &stream);
        }
        index.apply(delta);
        Ok(SqliteStore {
            queue: Arc::new(Mutex::new(index)),
            writer: Arc::new(Mutex::new(writer)),
            readers: Arc::new(Mutex::new(Vec::new())),
            path: Arc::new(path.to_owned()),
            clock,
        })
    }

    /// Runs `f` on the writer connection on the blocking pool, inside one immediate transaction.
    /// `f` gets the clock's time in milliseconds, read under the writer lock so times are in
    /// commit order.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Transaction<'_>, &mut QueueDelta, i64) -> Result<T, StoreError> + Send + 'static,
    {
        let (writer, queue, clock) = (self.writer.clone(), self.queue.clone(), self.clock.clone());
        tokio::task::spawn_blocking(move || {
            let mut conn = writer.lock().unwrap_or_else(|p| p.into_inner());
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let mut delta = QueueDelta::default();
            let out = f(&tx, &mut delta, clock.now().millis())?;
            tx.commit()?;
            // Still under the writer lock: the index changes in commit order.
            queue.lock().unwrap_or_else(|p| p.into_inner()).apply(delta);
            Ok(out)
        })
        .await
        .map_err(|e| StoreError::Join(e.to_string()))?
    }

    /// Runs `f` on a pooled read connection. Point reads take microseconds, so they run inline on
    /// the calling task: handing them to the blocking pool would cost more than the query.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let conn = {
            let mut pool = self.readers.lock().unwrap_or_else(|p| p.into_inner());
            pool.pop()
        };
        let conn = match conn {
            Some(c) => c,
            None => {
                let c = Connection::open_with_flags(
                    self.path.as_path(),
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                c.busy_timeout(std::time::Duration::from_secs(5))?;
                c
            }
        };
        let out = f(&conn);
        let mut pool = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < 8 {
            pool.push(conn);
        }
        out
    }

    /// Stores a new job, or finds the one its idempotency key already names. In `latest` mode the
    /// stream's queued jobs (and with `preempt` its running one) are cancelled as superseded in the
    /// same transaction, so there is never a moment with two waiting jobs in the stream, nor a
    /// cancellation without the job that replaced it.
    pub async fn insert(&self, job: NewJob) -> Result<InsertOutcome, StoreError> {
        self.write(move |tx, queue, now| {
            if let Some((key, fingerprint)) = &job.idempotency {
                let existing: Option<(String, String)> = tx
                    .query_row("SELECT id, request_fingerprint FROM jobs WHERE idempotency_key = ?1", [key], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                    .optional()?;
                if let Some((id, stored)) = existing {
                    if &stored != fingerprint {
                        return Ok(InsertOutcome::KeyConflict);
                    }
                    let id = parse_id(&id)?;
                    return Ok(InsertOutcome::Replayed(get_in(tx, id)?.ok_or(StoreError::NotFound)?));
                }
            }
            let mut superseded = Vec::new();
            if job.mode == StreamMode::Latest {
                let older: Vec<(i64, String, bool)> = tx
                    .prepare_cached(
                        "SELECT seq, status, prefetched FROM jobs INDEXED BY jobs_waiting_by_stream \
                         WHERE stream = ?1 AND status IN ('queued', 'running') ORDER BY seq",
                    )?
                    .query_map([&job.stream], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect::<Result<_, _>>()?;
                let message = format!("superseded by job {}", job.id);
                for (seq, status, prefetched) in older {
                    let previous = if status == "queued" { JobStatus::Queued } else { JobStatus::Running };
                    // The running job finishes unless the new one asks to preempt it; a
                    // prefetched one has not started (it waits in ComfyUI's queue), so it goes
                    // like a queued one: its worker, long-polling its heartbeat, takes it out of
                    // ComfyUI's queue at once.
                    if previous == JobStatus::Running && !prefetched && !job.preempt {
                        continue;
                    }
                    let (stream, reason) = (job.stream.as_str(), cancel_reason::SUPERSEDED);
                    cancel_in(tx, queue, Cancel { seq, stream, reason, message: &message, by: Some(job.id) }, now)?;
                    superseded.push((get_by_seq(tx, seq)?.ok_or(StoreError::NotFound)?, previous));
                }
            }
            // Checked again here, under the writer lock: the result found before its file was
            // linked may have been deleted, or a newer job of the stream finished, meanwhile.
            let reuse = match &job.reuse {
                Some(reuse) => {
                    let last = last_done_in(tx, &job.stream)?;
                    let still = last.is_some_and(|(id, key, present)| {
                        id == reuse.from && present && key.is_some() && key == job.dedupe_key
                    });
                    still.then_some(reuse)
                }
                None => None,
            };
            let (key, fingerprint) = job.idempotency.clone().unzip();
            tx.prepare_cached(
                "INSERT INTO jobs (id, status, prompt, negative_prompt, seed, workflow, params, \
                 input_content_type, input_size, input_width, input_height, created_at, \
                 idempotency_key, request_fingerprint, stream, mode, previews, dedupe_key, dedupe) \
                 VALUES (?1, 'queued', ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
            )?
            .execute(params![
                job.id.to_string(),
                job.prompt,
                job.negative_prompt,
                job.seed.map(seed_to_sql),
                job.workflow,
                serde_json::Value::Object(job.params.clone()).to_string(),
                job.input.content_type,
                job.input.size as i64,
                job.input.width,
                job.input.height,
                now,
                key,
                fingerprint,
                job.stream,
                job.mode.as_str(),
                job.previews,
                job.dedupe_key,
                job.dedupe,
            ])?;
            if let Some(reuse) = reuse {
                // Inserted and finished in the same transaction: the counts and the queue index
                // never see it queued. Its input is given up at once (the caller deletes the file
                // after the commit): nothing will read it.
                let seq: i64 = tx
                    .prepare_cached("SELECT seq FROM jobs WHERE id = ?1")?
                    .query_row([job.id.to_string()], |r| r.get(0))?;
                finish_as_reuse(tx, seq, reuse, now)?;
            }
            let record = get_in(tx, job.id)?.ok_or(StoreError::NotFound)?;
            let reused = record.status == JobStatus::Done;
            if !reused {
                queue.added(record.seq, &record.stream);
            }
            Ok(InsertOutcome::Created(Inserted { record, superseded, reused }))
        })
        .await
    }

    /// The stream's last finished (`done`) job: its id, dedupe key and whether its result is on
    /// disk. From the partial index on the stream's done jobs, so one row is read.
    pub async fn last_done_in_stream(
        &self,
        stream: String,
    ) -> Result<Option<(JobId, Option<String>, bool)>, StoreError> {
        self.read(|c| last_done_in(c, &stream))
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
    pub async fn resume_running(&self, lease_ms: i64, timeout_ms: i64) -> Result<u64, StoreError> {
        self.write(move |tx, _, now| {
            let n = tx.execute(
                "UPDATE jobs SET lease_expires_at = ?1 + ?2, started_at = MIN(started_at, ?1), \
                 timeout_grace_until = CASE WHEN MIN(started_at, ?1) + ?3 < ?1 + ?2 THEN ?1 + ?2 END \
                 WHERE status = 'running'",
                params![now, lease_ms, timeout_ms],
            )?;
            Ok(n as u64)
        })
        .await
    }

    /// One job by id.
    pub async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        self.read(|c| get_in(c, id))
    }

    /// True when a job was stored under this idempotency key.
    pub async fn knows_idempotency_key(&self, key: String) -> Result<bool, StoreError> {
        self.read(|c| {
            let found: Option<i64> = c
                .prepare_cached("SELECT 1 FROM jobs WHERE idempotency_key = ?1")?
                .query_row([key], |r| r.get(0))
                .optional()?;
            Ok(found.is_some())
        })
    }

    /// Number of queued jobs (from the in-memory index).
    pub fn queued_count(&self) -> u64 {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).len as u64
    }

    /// 1-based position of a queued job in the claim order (from the in-memory index: one pass over
    /// the streams that have queued jobs, a binary search within its own).
    pub async fn queue_position(&self, stream: &str, seq: i64) -> Result<u64, StoreError> {
        Ok(self.queue.lock().unwrap_or_else(|p| p.into_inner()).position(stream, seq))
    }

    /// [`Self::queue_position`] of each job, under one lock of the index (one consistent queue).
    pub async fn queue_positions(&self, jobs: &[(String, i64)]) -> Result<Vec<u64>, StoreError> {
        let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        Ok(jobs.iter().map(|(stream, seq)| queue.position(stream, *seq)).collect())
    }

    /// Jobs newest first, optionally of one status.
    pub async fn list(&self, status: Option<JobStatus>, limit: u32) -> Result<Vec<JobRecord>, StoreError> {
        self.read(|c| {
            let rows = match status {
                Some(st) => {
                    let mut stmt = c.prepare_cached(&format!(
                        "SELECT {COLUMNS} FROM jobs WHERE status = ?1 ORDER BY seq DESC LIMIT ?2"
                    ))?;
                    stmt.query_map(params![st.as_str(), limit], row_to_record)?.collect::<Result<Vec<_>, _>>()?
                }
                None => {
                    let mut stmt =
                        c.prepare_cached(&format!("SELECT {COLUMNS} FROM jobs ORDER BY seq DESC LIMIT ?1"))?;
                    stmt.query_map(params![limit], row_to_record)?.collect::<Result<Vec<_>, _>>()?
                }
            };
            rows.into_iter().collect()
        })
    }

    /// Number of jobs in each status, from the counts table the triggers keep (five rows, however
    /// many jobs are stored).
    pub async fn counts(&self) -> Result<StatusCounts, StoreError> {
        self.read(|c| {
            let mut counts = StatusCounts::default();
            let mut stmt = c.prepare_cached("SELECT status, n FROM job_counts")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (status, n) = row?;
                let n = n as u64;
                match JobStatus::parse(&status) {
                    Some(JobStatus::Queued) => counts.queued = n,
                    Some(JobStatus::Running) => counts.running = n,
                    Some(JobStatus::Done) => counts.done = n,
                    Some(JobStatus::Error) => counts.error = n,
                    Some(JobStatus::Cancelled) => counts.cancelled = n,
                    None => return Err(StoreError::Corrupt(format!("unknown status {status}"))),
                }
            }
            Ok(counts)
        })
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
        self.claim_next_with(worker, lease_ms, allowed_workflows, false).await
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
        let allowed = workflow_filter(allowed_workflows)?;
        self.write(move |tx, queue, now| {
            // Queued jobs number at most MAX_QUEUE (plus uploads in flight), each joined to its
            // stream's one turn row, so this sort stays small.
            let next: Option<(i64, String)> =
                tx.prepare_cached(NEXT_JOB)?.query_row(params![allowed], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
            let Some((seq, stream)) = next else { return Ok(None) };
            let served: i64 = tx
                .prepare_cached(
                    "INSERT INTO stream_turns (stream, served) \
                     VALUES (?1, (SELECT COALESCE(MAX(served), 0) + 1 FROM stream_turns)) \
                     ON CONFLICT (stream) DO UPDATE SET served = excluded.served RETURNING served",
                )?
                .query_row([&stream], |r| r.get(0))?;
            queue.served(stream.clone(), served);
            tx.prepare_cached(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1, lease_token = ?1, \
                 lease_owner = ?2, lease_expires_at = ?3, started_at = ?4, finished_at = NULL, \
                 timeout_grace_until = NULL, progress = NULL, error_message = NULL, prefetched = ?6, \
                 version = version + 1 WHERE seq = ?5",
            )?
            .execute(params![LeaseToken::new().as_str(), worker, now + lease_ms, now, seq, prefetch])?;
            queue.removed(seq, &stream);
            get_by_seq(tx, seq)
        })
        .await
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
        self.write(move |tx, _queue, now| {
            let Some(job) = get_in(tx, id)? else { return Ok(None) };
            if job.status != JobStatus::Running || check_lease(&job, &token).is_err() {
                return Ok(None);
            }
            let still = last_done_in(tx, &job.stream)?.is_some_and(|(from, key, present)| {
                from == reuse.from && present && key.is_some() && key == job.dedupe_key
            });
            if !still {
                return Ok(None);
            }
            finish_as_reuse(tx, job.seq, &reuse, now)?;
            get_by_seq(tx, job.seq)
        })
        .await
    }

    /// The workflow of the job a claim with `allowed_workflows` would take now, if any (a read:
    /// the broker uses it to hand the job to the waiting worker that suits it best).
    pub async fn peek_next(&self, allowed_workflows: Option<Vec<String>>) -> Result<Option<String>, StoreError> {
        let allowed = workflow_filter(allowed_workflows)?;
        self.read_blocking(move |c| {
            Ok(c.prepare_cached(NEXT_JOB)?.query_row(params![allowed], |r| r.get(2)).optional()?)
        })
        .await
    }

    /// Forgets the turns of streams not served in the last `keep` claims, at most [`SWEEP_BATCH`]
    /// per call, so neither `stream_turns` nor its mirror grows with every stream id ever seen.
    /// A forgotten stream counts as never served, which orders it before every stream served in
    /// those `keep` claims, exactly where its old turn put it; only its order among other
    /// forgotten streams becomes their age.
    pub async fn forget_old_turns(&self, keep: i64) -> Result<u64, StoreError> {
        self.write(move |tx, queue, _| {
            let newest: i64 = tx.query_row("SELECT COALESCE(MAX(served), 0) FROM stream_turns", [], |r| r.get(0))?;
            let old: Vec<String> = tx
                .prepare_cached(
                    "SELECT stream FROM stream_turns INDEXED BY stream_turns_by_served WHERE served < ?1 LIMIT ?2",
                )?
                .query_map(params![newest - keep, SWEEP_BATCH], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let mut forget = tx.prepare_cached("DELETE FROM stream_turns WHERE stream = ?1")?;
            for stream in &old {
                forget.execute([stream])?;
                queue.forgot(stream.clone());
            }
            Ok(old.len() as u64)
        })
        .await
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
        self.write(move |tx, _, now| {
            let job = get_in(tx, id)?.ok_or(StoreError::NotFound)?;
            check_lease(&job, &token)?;
            match job.status {
                JobStatus::Cancelled => Ok(HeartbeatOutcome { cancelled: true, changed: None, unblocked: false }),
                JobStatus::Running => {
                    // Not a change anyone sees (no event): the job was `running` for its clients all
                    // along; only supersedes and claims read it.
                    let unblocked = started
                        && tx
                            .prepare_cached("UPDATE jobs SET prefetched = 0 WHERE seq = ?1 AND prefetched = 1")?
                            .execute([job.seq])?
                            > 0;
                            let changed = progress.as_ref().is_some_and(|p| *p != job.progress);
                    if changed {
                        let text = serde_json::to_string(&progress).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                        tx.prepare_cached(
                            "UPDATE jobs SET lease_expires_at = ?1, progress = ?2, version = version + 1 WHERE seq = ?3",
                        )?
                        .execute(params![now + lease_ms, text, job.seq])?;
                    } else {
                        tx.prepare_cached("UPDATE jobs SET lease_expires_at = ?1 WHERE seq = ?2")?
                            .execute(params![now + lease_ms, job.seq])?;
                    }
                    let changed = if changed { get_by_seq(tx, job.seq)? } else { None };
                    Ok(HeartbeatOutcome { cancelled: false, changed, unblocked })
                }
                status => Err(StoreError::LeaseLost { status }),
            }
        })
        .await
    }

    /// Renews a lease whose result is arriving, and holds `JOB_TIMEOUT` off for as long: a result
    /// that is being delivered is not timed out mid-stream. Same refusals as [`Store::heartbeat`].
    pub async fn renew_for_upload(&self, id: JobId, token: LeaseToken, lease_ms: i64) -> Result<bool, StoreError> {
        self.write(move |tx, _, now| {
            let job = get_in(tx, id)?.ok_or(StoreError::NotFound)?;
            check_lease(&job, &token)?;
            match job.status {
                JobStatus::Cancelled => Ok(true),
                JobStatus::Running => {
                    tx.prepare_cached(
                        "UPDATE jobs SET lease_expires_at = ?1, \
                         timeout_grace_until = MAX(COALESCE(timeout_grace_until, 0), ?1) WHERE seq = ?2",
                    )?
                    .execute(params![now + lease_ms, job.seq])?;
                    Ok(false)
                }
                status => Err(StoreError::LeaseLost { status }),
            }
        })
        .await
    }

    /// Checks that `token` is the current lease of a running job (before accepting bytes from it).
    pub async fn check_lease(&self, id: JobId, token: &LeaseToken) -> Result<JobRecord, StoreError> {
        let job = self.get(id).await?.ok_or(StoreError::NotFound)?;
        check_lease(&job, token)?;
        match job.status {
            JobStatus::Running => Ok(job),
            JobStatus::Cancelled => Err(StoreError::Cancelled),
            JobStatus::Done => Err(StoreError::AlreadyDone),
            status => Err(StoreError::LeaseLost { status }),
        }
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
        self.write(move |tx, _, now| {
            let job = get_in(tx, id)?.ok_or(StoreError::NotFound)?;
            check_lease(&job, &token)?;
            match job.status {
                JobStatus::Running => {}
                JobStatus::Done => return Ok((job, false)),
                JobStatus::Cancelled => return Err(StoreError::Cancelled),
                status => return Err(StoreError::LeaseLost { status }),
            }
            let progress = Progress { value: 1.0, ..job.progress.clone() };
            tx.execute(
                "UPDATE jobs SET status = 'done', finished_at = ?1, lease_expires_at = NULL, \
                 result_state = 'present', result_content_type = ?2, result_size = ?3, progress = ?4, \
                 error_message = NULL, comfy_execution_ms = ?5, version = version + 1 WHERE seq = ?6",
                params![
                    now,
                    result.content_type,
                    result.size as i64,
                    serde_json::to_string(&progress).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    comfy_execution_ms.map(|v| v as i64),
                    job.seq
                ],
            )?;
            Ok((get_by_seq(tx, job.seq)?.ok_or(StoreError::NotFound)?, true))
        })
        .await
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
        self.write(move |tx, queue, now| {
            let job = get_in(tx, id)?.ok_or(StoreError::NotFound)?;
            check_lease(&job, &token)?;
            match job.status {
                JobStatus::Running => {}
                // A repeated report (its first answer was lost): the same answer, and no change.
                JobStatus::Error => return Ok((job, false)),
                JobStatus::Cancelled => return Err(StoreError::Cancelled),
                status => return Err(StoreError::LeaseLost { status }),
            }
            if handed_back {
                // A worker's own stop is no fault of the job: its attempt is not counted.
                requeue(tx, queue, job.seq, now)?;
                tx.prepare_cached("UPDATE jobs SET attempts = MAX(attempts - 1, 0) WHERE seq = ?1")?
                    .execute([job.seq])?;
            } else if retryable && job.attempts < max_attempts {
                requeue(tx, queue, job.seq, now)?;
            } else {
                let message =
                    if retryable { format!("{message} (gave up after {} attempts)", job.attempts) } else { message };
                finish_with_error(tx, job.seq, &message, now)?;
            }
            Ok((get_by_seq(tx, job.seq)?.ok_or(StoreError::NotFound)?, true))
        })
        .await
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
        self.write(move |tx, queue, now| {
            let Some(job) = get_in(tx, id)? else { return Ok(None) };
            if job.status != JobStatus::Running || check_lease(&job, &token).is_err() {
                return Ok(None);
            }
            if job.lease.as_ref().and_then(|l| l.expires_at) != claimed_expiry {
                return Ok(None);
            }
            requeue(tx, queue, job.seq, now)?;
            tx.prepare_cached("UPDATE jobs SET attempts = MAX(attempts - 1, 0) WHERE seq = ?1")?.execute([job.seq])?;
            get_by_seq(tx, job.seq)
        })
        .await
    }

    /// Cancels a queued or running job; on a finished job only marks its files deleted. Files are
    /// marked gone in the same transaction, so the caller deletes them after the commit.
    pub async fn cancel(&self, id: JobId) -> Result<CancelOutcome, StoreError> {
        self.write(move |tx, queue, now| {
            let job = get_in(tx, id)?.ok_or(StoreError::NotFound)?;
            let previous = job.status;
            let files_present = job.input_present || matches!(job.result, ResultState::Present(_));
            let changed = match job.status {
                JobStatus::Queued | JobStatus::Running => {
                    let (seq, stream) = (job.seq, job.stream.as_str());
                    let reason = cancel_reason::CANCELLED;
                    cancel_in(
                        tx,
                        queue,
                        Cancel { seq, stream, reason, message: "cancelled by client", by: None },
                        now,
                    )?;
                    true
                }
                _ if files_present => {
                    tx.execute(
                        "UPDATE jobs SET input_present = 0, \
                         result_state = CASE result_state WHEN 'present' THEN 'deleted' ELSE result_state END, \
                         version = version + 1 WHERE seq = ?1",
                        [job.seq],
                    )?;
                    true
                }
                _ => false,
            };
            let record = get_by_seq(tx, job.seq)?.ok_or(StoreError::NotFound)?;
            Ok(CancelOutcome { record, previous, changed })
        })
        .await
    }

    /// Puts running jobs whose lease lapsed back in the queue, or fails them when they used up
    /// `max_attempts`; at most [`SWEEP_BATCH`] per call (the next sweep takes the rest).
    pub async fn expire_leases(&self, max_attempts: u32) -> Result<Swept, StoreError> {
        self.write(move |tx, queue, now| {
            let expired: Vec<(i64, u32)> = tx
                .prepare_cached(
                    "SELECT seq, attempts FROM jobs INDEXED BY jobs_lease_expiry \
                     WHERE status = 'running' AND lease_expires_at < ?1 \
                     ORDER BY lease_expires_at LIMIT ?2",
                )?
                .query_map(params![now, SWEEP_BATCH], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            let mut swept = Swept::default();
            for (seq, attempts) in expired {
                // One job that cannot be changed or read back is reported, not allowed to stop
                // the others (a failed statement leaves the transaction usable).
                let one = (|| {
                    if attempts < max_attempts {
                        requeue(tx, queue, seq, now)?;
                    } else {
                        finish_with_error(
                            tx,
                            seq,
                            &format!("worker lost: its lease expired without a heartbeat on all {attempts} attempts"),
                            now,
                        )?;
                    }
                    get_by_seq(tx, seq)?.ok_or(StoreError::NotFound)
                })();
                swept.record(seq, one);
            }
            Ok(swept)
        })
        .await
    }

    /// Fails running jobs whose current attempt has run longer than `timeout_ms` (and whose
    /// restart grace, if any, is over); at most [`SWEEP_BATCH`] per call.
    pub async fn time_out_running(&self, timeout_ms: i64) -> Result<Swept, StoreError> {
        self.write(move |tx, _, now| {
            let late: Vec<i64> = tx
                .prepare_cached(
                    "SELECT seq FROM jobs WHERE status = 'running' AND started_at < ?1 \
                     AND (timeout_grace_until IS NULL OR timeout_grace_until < ?2) LIMIT ?3",
                )?
                .query_map(params![now - timeout_ms, now, SWEEP_BATCH], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let mut swept = Swept::default();
            for seq in late {
                let one = (|| {
                    finish_with_error(
                        tx,
                        seq,
                        &format!("timed out: the job ran longer than JOB_TIMEOUT ({} s)", timeout_ms / 1000),
                        now,
                    )?;
                    get_by_seq(tx, seq)?.ok_or(StoreError::NotFound)
                })();
                swept.record(seq, one);
            }
            Ok(swept)
        })
        .await
    }

    /// Finished jobs whose files are still on disk and older than `ttl_ms` (by finish time), oldest
    /// first, at most [`SWEEP_BATCH`]. The partial index on finish time over rows that still have
    /// files means this touches only those rows, however many finished jobs are stored.
    pub async fn files_expired(&self, ttl_ms: i64) -> Result<Vec<JobId>, StoreError> {
        let cutoff = self.clock.now().millis() - ttl_ms;
        self.read_blocking(move |c| {
            // INDEXED BY: without it the planner may prefer the status index and read every done
            // row; with it, a query the index cannot serve fails at prepare instead of going slow.
            // The OR term is written exactly as in the index's WHERE, so the partial index applies.
            let ids: Vec<String> = c
                .prepare_cached(
                    "SELECT id FROM jobs INDEXED BY jobs_with_files_by_finish \
                     WHERE (input_present = 1 OR result_state = 'present') \
                     AND finished_at < ?1 AND status IN ('done', 'error') ORDER BY finished_at LIMIT ?2",
                )?
                .query_map(params![cutoff, SWEEP_BATCH], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            ids.iter().map(|id| parse_id(id)).collect()
        })
        .await
    }

    /// Finished jobs whose record is older than `retention_ms` (by finish time), oldest first, at
    /// most [`RETENTION_BATCH`], each with whether its row says it still has a file; from the
    /// index on finish time, so only those rows are read.
    pub async fn records_expired(&self, retention_ms: i64) -> Result<Vec<(JobId, bool)>, StoreError> {
        let cutoff = self.clock.now().millis() - retention_ms;
        self.read_blocking(move |c| {
            let rows: Vec<(String, bool)> = c
                .prepare_cached(
                    "SELECT id, input_present = 1 OR result_state = 'present' FROM jobs INDEXED BY jobs_by_finish \
                     WHERE finished_at < ?1 AND status IN ('done', 'error', 'cancelled') \
                     ORDER BY finished_at LIMIT ?2",
                )?
                .query_map(params![cutoff, RETENTION_BATCH], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            rows.iter().map(|(id, files)| Ok((parse_id(id)?, *files))).collect()
        })
        .await
    }

    /// Deletes the records of `ids` that are still finished and older than `retention_ms` (the
    /// caller removed their files first). Returns how many went.
    pub async fn delete_records(&self, ids: Vec<JobId>, retention_ms: i64) -> Result<u64, StoreError> {
        self.write(move |tx, _, now| {
            let mut stmt = tx.prepare_cached(
                "DELETE FROM jobs WHERE id = ?1 AND finished_at < ?2 AND status IN ('done', 'error', 'cancelled')",
            )?;
            let mut n = 0;
            for id in ids {
                n += stmt.execute(params![id.to_string(), now - retention_ms])? as u64;
            }
            Ok(n)
        })
        .await
    }

    /// Benchmark hook: stores `n` finished (`done`) jobs in one statement, finish times spread
    /// evenly over the `spread_ms` before now, the newest `with_files` of them still marked as
    /// having their files. Not for production use: the rows name files that do not exist.
    #[doc(hidden)]
    pub async fn fill_finished_for_benchmark(&self, n: u64, spread_ms: i64, with_files: u64) -> Result<(), StoreError> {
        self.write(move |tx, _, now| {
            tx.execute(
                "WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < ?1) \
                 INSERT INTO jobs (id, status, prompt, negative_prompt, workflow, params, input_content_type, \
                 input_size, input_width, input_height, input_present, created_at, started_at, finished_at, \
                 attempts, result_state, result_content_type, result_size) \
                 SELECT printf('%08x-0000-4000-8000-%012x', i, i), 'done', 'benchmark', '', 'bench', '{}', \
                 'image/png', 1000, 64, 64, i > ?1 - ?4, t - 5000, t - 4000, t, 1, \
                 CASE WHEN i > ?1 - ?4 THEN 'present' ELSE 'deleted' END, 'video/mp4', 100000 \
                 FROM (SELECT i, ?2 - ?3 + ?3 * i / ?1 AS t FROM k)",
                params![n as i64, now, spread_ms, with_files as i64],
            )?;
            Ok(())
        })
        .await
    }

    /// For each of `ids` that has a row: whether the row says its input and its result are on disk.
    pub async fn owned_files(&self, ids: Vec<JobId>) -> Result<HashMap<JobId, (bool, bool)>, StoreError> {
        self.read_blocking(move |c| {
            let mut stmt =
                c.prepare_cached("SELECT input_present, result_state = 'present' FROM jobs WHERE id = ?1")?;
            let mut owned = HashMap::with_capacity(ids.len());
            for id in ids {
                if let Some(flags) = stmt.query_row([id.to_string()], |r| Ok((r.get(0)?, r.get(1)?))).optional()? {
                    owned.insert(id, flags);
                }
            }
            Ok(owned)
        })
        .await
    }

    /// Runs a read on the blocking pool: for the sweep's scans, which must not hold up the async
    /// runtime however large the database is.
    async fn read_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.read(f)).await.map_err(|e| StoreError::Join(e.to_string()))?
    }

    /// Records that a finished job's files were deleted; `None` when there was nothing to record.
    pub async fn mark_files_deleted(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        self.write(move |tx, _, _| {
            let changed = tx.execute(
                "UPDATE jobs SET input_present = 0, \
                 result_state = CASE result_state WHEN 'present' THEN 'deleted' ELSE result_state END, \
                 version = version + 1 WHERE id = ?1 AND (result_state = 'present' OR input_present = 1)",
                [id.to_string()],
            )?;
            if changed == 0 { Ok(None) } else { get_in(tx, id) }
        })
        .await
    }
}

/// A claim's workflow list as one JSON array parameter (a statement per list length would not
/// stay cached); `None` is "any workflow".
fn workflow_filter(allowed: Option<Vec<String>>) -> Result<Option<String>, StoreError> {
    allowed.map(|names| serde_json::to_string(&names).map_err(|e| StoreError::Corrupt(e.to_string()))).transpose()
}

/// Puts a running job back in the queue, unless it is of a `latest` stream that has a newer job
/// (waiting, running or done): then it is cancelled as superseded by the newest, since running the
/// older scene again would put a stale clip after a newer one and two jobs in the stream's queue.
fn requeue(tx: &rusqlite::Transaction<'_>, queue: &mut QueueDelta, seq: i64, now: i64) -> Result<(), StoreError> {
    let (stream, mode): (String, String) = tx
        .prepare_cached("SELECT stream, mode FROM jobs WHERE seq = ?1")?
        .query_row([seq], |r| Ok((r.get(0)?, r.get(1)?)))?;
    if mode == StreamMode::Latest.as_str() && !stream.is_empty() {
        let newer: Option<String> = tx
            .prepare_cached(
                "SELECT id FROM jobs WHERE stream = ?1 AND seq > ?2 \
                 AND status IN ('queued', 'running', 'done') ORDER BY seq DESC LIMIT 1",
            )?
            .query_row(params![stream, seq], |r| r.get(0))
            .optional()?;
        if let Some(newer) = newer {
            let by = parse_id(&newer)?;
            let message = format!("superseded by job {by}");
            let reason = cancel_reason::SUPERSEDED;
            return cancel_in(tx, queue, Cancel { seq, stream: &stream, reason, message: &message, by: Some(by) }, now);
        }
    }
    queue.added(seq, &stream);
    tx.prepare_cached(
        "UPDATE jobs SET status = 'queued', lease_token = NULL, lease_owner = NULL, \
         lease_expires_at = NULL, started_at = NULL, timeout_grace_until = NULL, progress = NULL, \
         prefetched = 0, version = version + 1 WHERE seq = ?1",
    )?
    .execute([seq])?;
    Ok(())
}

/// One job to cancel, and why.
struct Cancel<'a> {
    seq: i64,
    stream: &'a str,
    reason: &'a str,
    message: &'a str,
    /// The job that superseded it.
    by: Option<JobId>,
}

/// Cancels a queued or running job. The lease token stays, so the worker's next heartbeat learns of
/// the cancel; the files are marked gone (the caller deletes them after the commit).
fn cancel_in(
    tx: &rusqlite::Transaction<'_>,
    queue: &mut QueueDelta,
    c: Cancel<'_>,
    now: i64,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "UPDATE jobs SET status = 'cancelled', finished_at = ?1, lease_expires_at = NULL, \
         error_message = ?2, cancel_reason = ?3, superseded_by = ?4, input_present = 0, \
         result_state = CASE result_state WHEN 'present' THEN 'deleted' ELSE result_state END, \
         version = version + 1 WHERE seq = ?5",
    )?
    .execute(params![now, c.message, c.reason, c.by.map(|id| id.to_string()), c.seq])?;
    queue.removed(c.seq, c.stream);
    Ok(())
}

fn last_done_in(c: &Connection, stream: &str) -> Result<Option<(JobId, Option<String>, bool)>, StoreError> {
    let row: Option<(String, Option<String>, bool)> = c
        .prepare_cached(
            "SELECT id, dedupe_key, result_state = 'present' FROM jobs INDEXED BY jobs_done_by_stream_seq \
             WHERE stream = ?1 AND status = 'done' ORDER BY seq DESC LIMIT 1",
        )?
        .query_row([stream], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    row.map(|(id, key, present)| Ok((parse_id(&id)?, key, present))).transpose()
}

/// Marks a job `done` with a reused result (`reused_from`), its input given up, its attempt (if a
/// claim counted one) uncounted.
fn finish_as_reuse(tx: &rusqlite::Transaction<'_>, seq: i64, reuse: &Reuse, now: i64) -> Result<(), StoreError> {
    let progress = Progress { value: 1.0, ..Progress::default() };
    tx.prepare_cached(
        "UPDATE jobs SET status = 'done', started_at = COALESCE(started_at, ?1), finished_at = ?1, \
         lease_expires_at = NULL, input_present = 0, result_state = 'present', result_content_type = ?2, \
         result_size = ?3, progress = ?4, reused_from = ?5, attempts = MAX(attempts - 1, 0), \
         version = version + 1 WHERE seq = ?6",
    )?
    .execute(params![
        now,
        reuse.result.content_type,
        reuse.result.size as i64,
        serde_json::to_string(&progress).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        reuse.from.to_string(),
        seq,
    ])?;
    Ok(())
}

fn finish_with_error(tx: &rusqlite::Transaction<'_>, seq: i64, message: &str, now: i64) -> Result<(), StoreError> {
    tx.prepare_cached(
        "UPDATE jobs SET status = 'error', error_message = ?1, finished_at = ?2, \
         lease_expires_at = NULL, version = version + 1 WHERE seq = ?3",
    )?
    .execute(params![message, now, seq])?;
    Ok(())
}

fn get_in(c: &Connection, id: JobId) -> Result<Option<JobRecord>, StoreError> {
    c.prepare_cached(&format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"))?
        .query_row([id.to_string()], row_to_record)
        .optional()?
        .transpose()
}

fn get_by_seq(c: &Connection, seq: i64) -> Result<Option<JobRecord>, StoreError> {
    c.prepare_cached(&format!("SELECT {COLUMNS} FROM jobs WHERE seq = ?1"))?
        .query_row([seq], row_to_record)
        .optional()?
        .transpose()
}

fn row_to_record(r: &Row<'_>) -> rusqlite::Result<Result<JobRecord, StoreError>> {
    let id: String = r.get("id")?;
    let status: String = r.get("status")?;
    let params_text: String = r.get("params")?;
    let progress_text: Option<String> = r.get("progress")?;
    let lease_token: Option<String> = r.get("lease_token")?;
    let result_state: String = r.get("result_state")?;
    let result_ct: Option<String> = r.get("result_content_type")?;
    let result_size: Option<i64> = r.get("result_size")?;
    let mode: String = r.get("mode")?;
    let ts = |v: Option<i64>| v.map(Timestamp);
    let build = || -> Result<JobRecord, StoreError> {
        let params = match serde_json::from_str(&params_text) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => return Err(StoreError::Corrupt(format!("params of job {id}"))),
        };
        let progress = match progress_text.as_deref() {
            None => Progress::default(),
            Some(t) => serde_json::from_str(t).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        };
        let result = match result_state.as_str() {
            "present" => ResultState::Present(ResultInfo {
                content_type: result_ct.clone().unwrap_or_default(),
                size: result_size.unwrap_or(0) as u64,
            }),
            "deleted" => ResultState::Deleted,
            _ => ResultState::None,
        };
        Ok(JobRecord {
            id: parse_id(&id)?,
            seq: r.get("seq")?,
            status: JobStatus::parse(&status).ok_or_else(|| StoreError::Corrupt(format!("status {status}")))?,
            prompt: r.get("prompt")?,
            negative_prompt: r.get("negative_prompt")?,
            seed: r.get::<_, Option<i64>>("seed")?.map(seed_from_sql),
            workflow: r.get("workflow")?,
            params,
            input: InputInfo {
                content_type: r.get("input_content_type")?,
                size: r.get::<_, i64>("input_size")? as u64,
                width: r.get("input_width")?,
                height: r.get("input_height")?,
            },
            input_present: r.get::<_, i64>("input_present")? != 0,
            created_at: Timestamp(r.get("created_at")?),
            started_at: ts(r.get("started_at")?),
            finished_at: ts(r.get("finished_at")?),
            attempts: r.get("attempts")?,
            lease: lease_token
                .map(|t| -> rusqlite::Result<LeaseState> {
                    Ok(LeaseState {
                        token: LeaseToken::from_string(t),
                        owner: r.get::<_, Option<String>>("lease_owner")?.unwrap_or_default(),
                        expires_at: ts(r.get("lease_expires_at")?),
                    })
                })
                .transpose()?,
            progress,
            error_message: r.get("error_message")?,
            result,
            comfy_execution_ms: r.get::<_, Option<i64>>("comfy_execution_ms")?.map(|v| v.max(0) as u64),
            version: r.get::<_, i64>("version")? as u64,
            stream: r.get("stream")?,
            mode: StreamMode::parse(&mode).ok_or_else(|| StoreError::Corrupt(format!("mode {mode}")))?,
            previews: r.get::<_, i64>("previews")? != 0,
            cancel_reason: r.get("cancel_reason")?,
            superseded_by: opt_id(r.get("superseded_by")?)?,
            reused_from: opt_id(r.get("reused_from")?)?,
            dedupe_key: r.get("dedupe_key")?,
            dedupe: r.get::<_, i64>("dedupe")? != 0,
        })
    };
    Ok(build())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(stream: &str) -> NewJob {
        NewJob {
            id: JobId::new(),
            prompt: String::new(),
            negative_prompt: String::new(),
            seed: None,
            workflow: "w".into(),
            params: serde_json::Map::new(),
            input: InputInfo { content_type: "image/png".into(), size: 1, width: 1, height: 1 },
            idempotency: None,
            stream: stream.into(),
            mode: StreamMode::Queue,
            preempt: false,
            previews: false,
            dedupe_key: None,
            dedupe: false,
            reuse: None,
        }
    }

    async fn insert(store: &SqliteStore, stream: &str) -> JobRecord {
        match store.insert(job(stream)).await.unwrap() {
            InsertOutcome::Created(ins) => ins.record,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn forgetting_old_turns_keeps_positions_equal_to_the_claim_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db"), Clock::system()).unwrap();
        // Streams a, b, c served in that order; then only c again, so a and b are the old ones.
        for s in ["a", "b", "c"] {
            insert(&store, s).await;
            store.claim_next("w".into(), 60_000, None).await.unwrap().unwrap();
        }
        insert(&store, "c").await;
        store.claim_next("w".into(), 60_000, None).await.unwrap().unwrap();
        let queued = [insert(&store, "c").await, insert(&store, "b").await, insert(&store, "a").await];
        let before: Vec<u64> = {
            let mut v = Vec::new();
            for r in &queued {
                v.push(store.queue_position(&r.stream, r.seq).await.unwrap());
            }
            v
        };
        assert_eq!(before, [3, 2, 1], "least recently served first: a, then b, then c");
        assert_eq!(store.forget_old_turns(1).await.unwrap(), 2, "a and b are forgotten, c is kept");
        let turns: i64 =
            store.read(|c| Ok(c.query_row("SELECT COUNT(*) FROM stream_turns", [], |r| r.get(0))?)).unwrap();
        assert_eq!(turns, 1);
        // Forgotten streams count as never served: still before c, now among themselves by age.
        let mut after = Vec::new();
        for r in &queued {
            after.push(store.queue_position(&r.stream, r.seq).await.unwrap());
        }
        assert_eq!(after, [3, 1, 2]);
        let mut claimed = Vec::new();
        while let Some(r) = store.claim_next("w".into(), 60_000, None).await.unwrap() {
            claimed.push(r.id);
        }
        assert_eq!(claimed, [queued[1].id, queued[2].id, queued[0].id], "claims follow the positions");
    }
}
