//! The shared engine: PostgreSQL, which several brokers may use at once (`DATABASE_URL`).
//!
//! Every method has the semantics of its SQLite twin ([`super::SqliteStore`]); what differs is
//! how they hold with several writers:
//!
//! - A claim locks its job with `FOR UPDATE OF j SKIP LOCKED` and its `UPDATE` re-checks
//!   `status = 'queued'`, so a job is leased once however many brokers claim at the same moment;
//!   the stream turns come from a sequence, not `MAX(served) + 1` (which two could read alike).
//! - Heartbeat, complete, fail, cancel and release lock their job's row (`FOR UPDATE`) before
//!   they look at it, so two brokers cannot both finish or both requeue a job.
//! - Changes that decide a stream's waiting jobs (inserts into a named or `latest` stream, the
//!   requeue of a `latest` job) hold a transaction advisory lock on the stream, always taken
//!   before any job row lock, so a stream never has two waiting `latest` jobs.
//! - Sweeps pick candidates without locks, then change each job in its own transaction that
//!   locks it `SKIP LOCKED` and re-checks why it was picked: N brokers sweeping requeue a job once.
//! - Every committed change of a job row sends `pg_notify('tdcomfy_jobs', …)` in its own
//!   transaction (see [`listen`]), so other brokers hear only what committed.
//! - Time is the broker's [`Clock`], passed in as a parameter, never the server's `now()`: the
//!   brokers' clocks must agree (NTP), and the stepped-clock tests mean the same on both engines.
//!   A change that locks first reads the clock after its lock waits, so a lease runs from when
//!   it was granted and `created_at` follows a stream's commit order.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use deadpool_postgres::{GenericClient, Pool};
use tdcomfy_api::{
    InputInfo, JobEventKind, JobId, JobStatus, LeaseToken, Progress, ResultInfo, StreamMode, Timestamp, cancel_reason,
};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::queue_index::{QueueDelta, QueueIndex};
use super::{
    BrokerPresence, CancelOutcome, ClusterNote, HeartbeatOutcome, InsertOutcome, Inserted, JobRecord, LeaseState,
    NewJob, RETENTION_BATCH, ResultState, Reuse, SWEEP_BATCH, StatusCounts, StoreError, Swept, check_lease, opt_id,
    parse_id, seed_from_sql, seed_to_sql,
};
use crate::clock::Clock;

pub mod listen;
mod schema;

/// The channel every broker's changes are announced on.
pub const CHANNEL: &str = "tdcomfy_jobs";

/// Most tries of a transaction that failed on a serialization failure, a deadlock or a
/// concurrent duplicate (each retry sees the other transaction's commit).
const MAX_TRIES: u32 = 6;

/// How long one statement may wait for a lock (a row, a stream's advisory lock) before it fails
/// with `55P03`. Legitimate holders keep them for milliseconds; a broker cut off mid-transaction
/// holds them until PostgreSQL ends its session, and waiting on it would hold a pooled connection
/// and the caller's request all that time.
const LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Tries of a transaction whose lock wait timed out: one more, for a holder that was merely slow;
/// then [`StoreError::Busy`], so a caller waits at most about twice [`LOCK_TIMEOUT`].
const LOCK_TRIES: u32 = 2;

/// How long a session may sit inside a transaction without sending a statement before
/// PostgreSQL ends it and so releases its locks. This broker's transactions never wait on
/// anything but the database between statements; a session idle this long belongs to a broker
/// that hung or lost its network.
const IDLE_IN_TRANSACTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// The longest any one statement may run. Far above a legitimate one (the slowest, a sweep
/// step or `/health`'s counts over a big table, takes well under a second); bounded so a
/// runaway plan cannot hold a connection forever. Migrations and the benchmark fill lift it.
const STATEMENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// TCP keepalive: the first probe after this much silence (the system default is 2 h), then
/// every [`KEEPALIVE_INTERVAL`], [`KEEPALIVE_RETRIES`] times, before the connection is dropped.
const KEEPALIVE_IDLE: std::time::Duration = std::time::Duration::from_secs(30);
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;

/// How long sent data may stay unacknowledged before the kernel drops the connection (Linux
/// `TCP_USER_TIMEOUT`): keepalive only probes an idle connection, this bounds a busy one.
const TCP_USER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long opening a connection may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `config` with this broker's timeouts and keepalives. The URL's own settings win: a
/// `connect_timeout` or `tcp_user_timeout` in it is kept, and its `options` come after these
/// `-c` ones (PostgreSQL applies them in order), so an operator can still choose other values.
fn tuned(config: &tokio_postgres::Config) -> tokio_postgres::Config {
    let mut c = config.clone();
    if c.get_connect_timeout().is_none() {
        c.connect_timeout(CONNECT_TIMEOUT);
    }
    if c.get_tcp_user_timeout().is_none() {
        c.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    c.keepalives(true).keepalives_idle(KEEPALIVE_IDLE).keepalives_interval(KEEPALIVE_INTERVAL);
    c.keepalives_retries(KEEPALIVE_RETRIES);
    let ours = format!(
        "-c lock_timeout={} -c idle_in_transaction_session_timeout={} -c statement_timeout={}",
        LOCK_TIMEOUT.as_millis(),
        IDLE_IN_TRANSACTION_TIMEOUT.as_millis(),
        STATEMENT_TIMEOUT.as_millis()
    );
    let options = match config.get_options() {
        Some(theirs) if !theirs.trim().is_empty() => format!("{ours} {theirs}"),
        _ => ours,
    };
    c.options(options);
    c
}

/// The next job a claim takes, by the rule of SQLite's `NEXT_JOB` (see there): the oldest queued
/// job of the stream served least recently; a named stream offers only its oldest queued job, and
/// nothing while it has a prefetched job or while that job is a `dedupe` twin of its running one.
/// `$1` is the workflow list (NULL: any).
const NEXT_JOB: &str = "SELECT j.seq, j.stream, j.workflow FROM jobs j \
     LEFT JOIN stream_turns t ON t.stream = j.stream \
     WHERE j.status = 'queued' \
     AND ($1::text[] IS NULL OR j.workflow = ANY($1::text[])) \
     AND (j.stream = '' OR NOT EXISTS (SELECT 1 FROM jobs p \
          WHERE p.stream = j.stream AND p.status IN ('queued', 'running') \
          AND (p.prefetched OR (p.status = 'queued' AND p.seq < j.seq) \
               OR (j.dedupe AND p.status = 'running' AND p.dedupe_key = j.dedupe_key)))) \
     ORDER BY COALESCE(t.served, 0), j.seq LIMIT 1";

const COLUMNS: &str = "seq, id, status, prompt, negative_prompt, seed, workflow, params, \
    input_content_type, input_size, input_width, input_height, input_present, created_at, started_at, \
    finished_at, attempts, lease_token, lease_owner, lease_expires_at, progress, error_message, \
    result_state, result_content_type, result_size, comfy_execution_ms, version, stream, mode, previews, \
    cancel_reason, superseded_by, reused_from, dedupe_key, dedupe";

/// A `DATABASE_URL` (`postgres://…` or `key=value` form), checked; its `Debug` and `Display` hide
/// the password.
#[derive(Clone)]
pub struct DatabaseUrl {
    config: tokio_postgres::Config,
    redacted: String,
}

impl DatabaseUrl {
    /// Parses and checks `url`; the error names what is wrong without repeating the URL (which
    /// holds the password).
    pub fn parse(url: &str) -> Result<DatabaseUrl, String> {
        let config: tokio_postgres::Config = url.parse().map_err(|e: tokio_postgres::Error| {
            // The error's own text is only "invalid connection string"; its cause says more, but
            // only the cause that names an option (a fixed key, never the URL's text) is
            // repeated: the others (syntax, percent-decoding, an unknown key) may quote the text
            // around the fault, which can be the password.
            let cause = std::error::Error::source(&e).map(|c| c.to_string()).unwrap_or_default();
            let detail =
                if cause.starts_with("invalid value for option `") { format!(": {cause}") } else { String::new() };
            format!("is not a PostgreSQL URL (postgres://user:password@host:5432/database){detail}")
        })?;
        match config.get_ssl_mode() {
            tokio_postgres::config::SslMode::Disable | tokio_postgres::config::SslMode::Prefer => {}
            // No TLS connector is built in yet: refusing is better than a plaintext fallback the
            // operator did not ask for.
            _ => {
                return Err("sslmode=require is not supported yet: connect over a private network or a \
                            local TLS tunnel and use sslmode=disable or prefer"
                    .into());
            }
        }
        if config.get_hosts().is_empty() {
            return Err("names no host (postgres://user:password@host:5432/database)".into());
        }
        let host = match &config.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            #[cfg(unix)]
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let redacted = format!(
            "postgres://{}@{host}:{port}/{}",
            config.get_user().unwrap_or(""),
            config.get_dbname().unwrap_or("")
        );
        Ok(DatabaseUrl { config, redacted })
    }

    /// The URL without its password, for logs.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

/// The PostgreSQL store. Cheap to clone; all clones share the pool and the listening task.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    clock: Clock,
    broker_id: Arc<str>,
    listener: Arc<listen::Listener>,
    streams: Arc<StreamLocks>,
    positions: Arc<Positions>,
}

/// The longest a positions snapshot is used while no change was seen: a backstop for the few
/// changes that send no note (another broker forgetting old stream turns), which move positions
/// only among streams not served for thousands of claims.
const POSITIONS_MAX_AGE: Duration = Duration::from_secs(1);

/// Queue positions from one snapshot of the queued rows, shared by every `GET` until the queue
/// may have changed. A position needs the whole queue (the claim order is round-robin over the
/// streams), so computing it per request would read every queued row for each `GET` of a queued
/// job; the snapshot reads them once per change instead. The database stays the source of truth:
/// the snapshot is rebuilt from it after any commit of this broker and any note from another
/// (`changes` counts both), and never kept longer than [`POSITIONS_MAX_AGE`].
#[derive(Default)]
struct Positions {
    /// Bumped after every commit of this store that changed the queue or the stream turns, and
    /// every note of such a change (or `Missed`) the listener hears.
    changes: Arc<AtomicU64>,
    /// The snapshot, with the `changes` count read before it was taken and when it was taken.
    cached: std::sync::Mutex<Option<(u64, Instant, Arc<QueueIndex>)>>,
    /// Held while a snapshot is taken.
    rebuild: tokio::sync::Mutex<()>,
}

/// In-process turns of this broker's inserts into each named stream. They are taken before a
/// pooled connection: without them a burst of submits to one stream would each hold a connection
/// while waiting on the stream's advisory lock, and could take the whole pool from heartbeats and
/// claims. The advisory lock still orders them against other brokers.
#[derive(Default)]
struct StreamLocks {
    held: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// One stream's turn; dropping it hands the stream on, and forgets it when nobody waits.
struct StreamTurn<'a> {
    locks: &'a StreamLocks,
    stream: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl StreamLocks {
    async fn lock(&self, stream: &str) -> StreamTurn<'_> {
        let mutex = {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            held.entry(stream.to_owned()).or_default().clone()
        };
        let guard = mutex.lock_owned().await;
        StreamTurn { locks: self, stream: stream.to_owned(), guard: Some(guard) }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for StreamTurn<'_> {
    fn drop(&mut self) {
        // Under the map's lock, which every waiter takes to clone the entry: the count cannot
        // grow meanwhile, so one only the map holds has no waiter and goes. (A waiter whose
        // request was dropped leaves its entry behind until the stream's next insert.)
        let mut held = self.locks.held.lock().unwrap_or_else(|p| p.into_inner());
        drop(self.guard.take());
        if held.get(&self.stream).is_some_and(|m| Arc::strong_count(m) == 1) {
            held.remove(&self.stream);
        }
    }
}

/// One write transaction and the notes it sends at its commit.
struct W<'a> {
    tx: deadpool_postgres::Transaction<'a>,
    notes: Vec<String>,
    me: &'a str,
    /// The transaction changed the queued set or the stream turns (so queue positions).
    queue_moved: bool,
}

impl W<'_> {
    /// Announces `r`'s change as `kind` to the other brokers, at this transaction's commit.
    fn note(&mut self, kind: JobEventKind, r: &JobRecord) {
        self.notes.push(format!("{} {} {} {}", self.me, listen::kind_name(kind), r.id, r.version));
        // Progress is the one change that never moves a queue position (and the most frequent).
        self.queue_moved |= kind != JobEventKind::Progress;
    }

    /// Tells the other brokers, at this transaction's commit, that `r`'s stream may have a job to
    /// claim now although nothing any client sees changed ([`ClusterNote::Wake`]).
    fn wake(&mut self, r: &JobRecord) {
        self.notes.push(format!("{} {} {} {}", self.me, listen::WAKE, r.id, r.version));
    }

    async fn commit(self) -> Result<(), StoreError> {
        if !self.notes.is_empty() {
            // In the changing transaction: PostgreSQL delivers the notes only if it commits, and
            // in commit order.
            exec(&self.tx, "SELECT pg_notify($1, n) FROM unnest($2::text[]) AS n", &[&CHANNEL, &self.notes]).await?;
        }
        self.tx.commit().await?;
        Ok(())
    }
}

/// Fixes an async block's output type, so `?` inside it knows its error type.
fn typed<T>(f: impl Future<Output = Result<T, StoreError>>) -> impl Future<Output = Result<T, StoreError>> {
    f
}

/// Runs `$body` (which may `return Ok(..)` early) in one transaction with `$w: &mut W` and `$now`
/// (the clock's milliseconds), commits it with its notes, and runs it all again on a
/// serialization failure, a deadlock or a unique violation (a concurrent duplicate key, which the
/// retry then finds).
macro_rules! write_tx {
    ($self:ident, |$w:ident, $now:ident| $body:block) => {{
        let mut tries = 0u32;
        loop {
            tries += 1;
            let outcome = typed(async {
                let mut client = $self.pool.get().await.map_err(pool_error)?;
                let tx = client.transaction().await?;
                let mut w = W { tx, notes: Vec::new(), me: &$self.broker_id, queue_moved: false };
                let $now: i64 = $self.clock.now().millis();
                let out = {
                    let $w = &mut w;
                    typed(async { $body }).await?
                };
                let queue_moved = w.queue_moved;
                w.commit().await?;
                if queue_moved {
                    // After the commit: a positions snapshot taken before it is stale from now on.
                    $self.positions.changes.fetch_add(1, Ordering::Release);
                }
                Ok(out)
            })
            .await;
            match outcome {
                Err(e) if is_lock_timeout(&e) => {
                    if tries >= LOCK_TRIES {
                        break Err(StoreError::Busy(format!(
                            "a lock was held by another session for over {} s, {tries} times",
                            LOCK_TIMEOUT.as_secs()
                        )));
                    }
                }
                Err(e) if tries < MAX_TRIES && is_retryable(&e) => {
                    // A short, growing pause, so the transactions that collided do not collide again.
                    tokio::time::sleep(std::time::Duration::from_millis(2u64 << tries)).await;
                }
                other => break other,
            }
        }
    }};
}

fn is_retryable(e: &StoreError) -> bool {
    use tokio_postgres::error::SqlState;
    match e {
        StoreError::Postgres(e) => e.code().is_some_and(|c| {
            *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::UNIQUE_VIOLATION
        }),
        _ => false,
    }
}

/// A lock wait past [`LOCK_TIMEOUT`] (`55P03`).
fn is_lock_timeout(e: &StoreError) -> bool {
    matches!(e, StoreError::Postgres(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE))
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => StoreError::Postgres(e),
        other => StoreError::Pool(other.to_string()),
    }
}

async fn rows<C: GenericClient>(c: &C, sql: &str, p: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, StoreError> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.query(&st, p).await?)
}

async fn opt<C: GenericClient>(c: &C, sql: &str, p: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>, StoreError> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.query_opt(&st, p).await?)
}

async fn one<C: GenericClient>(c: &C, sql: &str, p: &[&(dyn ToSql + Sync)]) -> Result<Row, StoreError> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.query_one(&st, p).await?)
}

async fn exec<C: GenericClient>(c: &C, sql: &str, p: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.execute(&st, p).await?)
}

impl PgStore {
    /// Connects to `url`, brings the schema up to date (under an advisory lock, so brokers
    /// starting together migrate once) and starts listening for the other brokers' changes.
    /// `broker_id` names this broker in the notes it sends, so it can ignore its own.
    pub async fn connect(url: &DatabaseUrl, clock: Clock, broker_id: String) -> Result<PgStore, StoreError> {
        let unreachable = |e: tokio_postgres::Error| {
            StoreError::Unavailable(format!("DATABASE_URL: cannot connect to {}: {e}", url.redacted()))
        };
        let config = tuned(&url.config);
        let (mut client, connection) = config.connect(tokio_postgres::NoTls).await.map_err(unreachable)?;
        let driver = tokio::spawn(connection);
        let migrated = schema::migrate(&mut client).await;
        drop(client);
        let _ = driver.await;
        migrated?;
        let manager = deadpool_postgres::Manager::from_config(
            config.clone(),
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig { recycling_method: deadpool_postgres::RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(16)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(std::time::Duration::from_secs(10)))
            .create_timeout(Some(std::time::Duration::from_secs(10)))
            .build()
            .map_err(|e| StoreError::Pool(e.to_string()))?;
        let positions = Arc::new(Positions::default());
        let listener =
            listen::Listener::start(config, broker_id.clone(), listen::Liveness::default(), positions.changes.clone())
                .await
                .map_err(|e| {
                    StoreError::Unavailable(format!("DATABASE_URL: cannot listen on {}: {e}", url.redacted()))
                })?;
        Ok(PgStore {
            pool,
            clock,
            broker_id: broker_id.into(),
            listener: Arc::new(listener),
            streams: Arc::new(StreamLocks::default()),
            positions,
        })
    }

    /// This broker's id, as its notes carry it.
    pub fn broker_id(&self) -> &str {
        &self.broker_id
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }

    /// The other brokers' changes, as they commit.
    pub fn cluster_notes(&self) -> tokio::sync::broadcast::Receiver<ClusterNote> {
        self.listener.subscribe()
    }

    /// See [`super::Store::insert`].
    pub async fn insert(&self, job: NewJob) -> Result<InsertOutcome, StoreError> {
        let job = &job;
        let named = job.mode == StreamMode::Latest || !job.stream.is_empty();
        // Before a connection is taken: this broker's submits to one stream wait here, holding
        // nothing of the pool (see StreamLocks).
        let _turn = if named { Some(self.streams.lock(&job.stream).await) } else { None };
        write_tx!(self, |w, _now| {
            if named {
                // Before any row lock (the order every stream-deciding change keeps): with it,
                // two submits to one stream on two brokers see each other's job. Needed in queue
                // mode too: it makes a stream's commit order its seq order, so a claim cannot
                // see (and start) a later job of the stream while an earlier one is uncommitted.
                exec(&w.tx, "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", &[&job.stream]).await?;
            }
            if let Some((key, fingerprint)) = &job.idempotency {
                let existing =
                    opt(&w.tx, "SELECT id, request_fingerprint FROM jobs WHERE idempotency_key = $1", &[key]).await?;
                if let Some(row) = existing {
                    let stored: Option<String> = row.get(1);
                    if stored.as_deref() != Some(fingerprint.as_str()) {
                        return Ok(InsertOutcome::KeyConflict);
                    }
                    let id = parse_id(&row.get::<_, String>(0))?;
                    return Ok(InsertOutcome::Replayed(get_in(&w.tx, id, false).await?.ok_or(StoreError::NotFound)?));
                }
            }
            let older = if job.mode == StreamMode::Latest {
                rows(
                    &w.tx,
                    "SELECT seq, status, prefetched FROM jobs \
                     WHERE stream = $1 AND status IN ('queued', 'running') ORDER BY seq FOR UPDATE",
                    &[&job.stream],
                )
                .await?
            } else {
                Vec::new()
            };
            // Read after the lock waits, not at BEGIN: created_at then follows the stream's
            // commit order, and a supersede is dated when it happened.
            let now = self.clock.now().millis();
            let mut superseded = Vec::new();
            if job.mode == StreamMode::Latest {
                let message = format!("superseded by job {}", job.id);
                for row in older {
                    let (seq, status, prefetched): (i64, String, bool) = (row.get(0), row.get(1), row.get(2));
                    let previous = if status == "queued" { JobStatus::Queued } else { JobStatus::Running };
                    // As on SQLite: the running job finishes unless the new one preempts it; a
                    // prefetched one has not started, so it goes like a queued one.
                    if previous == JobStatus::Running && !prefetched && !job.preempt {
                        continue;
                    }
                    let c = Cancel { seq, reason: cancel_reason::SUPERSEDED, message: &message, by: Some(job.id) };
                    cancel_in(&w.tx, c, now).await?;
                    let r = get_by_seq(&w.tx, seq).await?.ok_or(StoreError::NotFound)?;
                    w.note(JobEventKind::Cancelled, &r);
                    superseded.push((r, previous));
                }
            }
            // Checked again here, under the stream's lock: the result found before its file was
            // linked may have been deleted, or a newer job of the stream finished, meanwhile.
            let reuse = match &job.reuse {
                Some(reuse) => {
                    let last = last_done_in(&w.tx, &job.stream).await?;
                    let still = last.is_some_and(|(id, key, present)| {
                        id == reuse.from && present && key.is_some() && key == job.dedupe_key
                    });
                    still.then_some(reuse)
                }
                None => None,
            };
            let (key, fingerprint) = job.idempotency.clone().unzip();
            let params = serde_json::Value::Object(job.params.clone()).to_string();
            let seq: i64 = one(
                &w.tx,
                "INSERT INTO jobs (id, status, prompt, negative_prompt, seed, workflow, params, \
                 input_content_type, input_size, input_width, input_height, created_at, \
                 idempotency_key, request_fingerprint, stream, mode, previews, dedupe_key, dedupe) \
                 VALUES ($1, 'queued', $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18) \
                 RETURNING seq",
                &[
                    &job.id.to_string(),
                    &job.prompt,
                    &job.negative_prompt,
                    &job.seed.map(seed_to_sql),
                    &job.workflow,
                    &params,
                    &job.input.content_type,
                    &(job.input.size as i64),
                    &i64::from(job.input.width),
                    &i64::from(job.input.height),
                    &now,
                    &key,
                    &fingerprint,
                    &job.stream,
                    &job.mode.as_str(),
                    &job.previews,
                    &job.dedupe_key,
                    &job.dedupe,
                ],
            )
            .await?
            .get(0);
            if let Some(reuse) = reuse {
                finish_as_reuse(&w.tx, seq, reuse, now).await?;
            }
            let record = get_by_seq(&w.tx, seq).await?.ok_or(StoreError::NotFound)?;
            let reused = record.status == JobStatus::Done;
            w.note(if reused { JobEventKind::Done } else { JobEventKind::Queued }, &record);
            Ok(InsertOutcome::Created(Inserted { record, superseded, reused }))
        })
    }

    /// See [`super::Store::last_done_in_stream`].
    pub async fn last_done_in_stream(
        &self,
        stream: String,
    ) -> Result<Option<(JobId, Option<String>, bool)>, StoreError> {
        last_done_in(&self.client().await?, &stream).await
    }

    /// See [`super::Store::resume_running`]: every running job's lease, as on SQLite. The
    /// service calls it only when no other broker is alive on the database, and then no lease
    /// was renewed through another broker: a live one belongs to a worker whose heartbeats failed
    /// during this short downtime (or went through a broker that died) and is about to lapse
    /// through no fault of its own, so restricting this to lapsed leases would lose it one sweep
    /// later (wave2-cluster's `a_lone_broker_restarting_renews_running_leases`).
    pub async fn resume_running(&self, lease_ms: i64, timeout_ms: i64) -> Result<u64, StoreError> {
        write_tx!(self, |w, now| {
            exec(
                &w.tx,
                "UPDATE jobs SET lease_expires_at = $1::BIGINT + $2::BIGINT, started_at = LEAST(started_at, $1), \
                 timeout_grace_until = CASE WHEN LEAST(started_at, $1) + $3::BIGINT < $1::BIGINT + $2::BIGINT \
                 THEN $1::BIGINT + $2::BIGINT END WHERE status = 'running'",
                &[&now, &lease_ms, &timeout_ms],
            )
            .await
        })
    }

    /// See [`super::Store::get`].
    pub async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        get_in(&self.client().await?, id, false).await
    }

    /// See [`super::Store::knows_idempotency_key`].
    pub async fn knows_idempotency_key(&self, key: String) -> Result<bool, StoreError> {
        Ok(opt(&self.client().await?, "SELECT 1 FROM jobs WHERE idempotency_key = $1", &[&key]).await?.is_some())
    }

    /// Number of queued jobs, counted (at most MAX_QUEUE rows, through the partial index).
    pub async fn queued_count(&self) -> Result<u64, StoreError> {
        let n: i64 = one(&self.client().await?, "SELECT COUNT(*) FROM jobs WHERE status = 'queued'", &[]).await?.get(0);
        Ok(n as u64)
    }

    /// 1-based position of a queued job in the claim order (0 if it is not queued), from the
    /// positions snapshot ([`Positions`]). A job the snapshot does not hold may have been queued
    /// through another broker whose note has not arrived yet (the caller read the row as queued):
    /// the snapshot is then taken again, so a queued job never gets 0.
    pub async fn queue_position(&self, stream: &str, seq: i64) -> Result<u64, StoreError> {
        match self.positions(false).await?.position(stream, seq) {
            0 => Ok(self.positions(true).await?.position(stream, seq)),
            n => Ok(n),
        }
    }

    /// The queue's claim order as of the last change seen ([`Positions`]): the same rule as the
    /// claim (round-robin by stream turn, then submission order), computed by [`QueueIndex`] from
    /// one consistent read of the queued rows and their streams' turns.
    /// With `fresh`, a new snapshot is taken whatever the cache holds.
    async fn positions(&self, fresh: bool) -> Result<Arc<QueueIndex>, StoreError> {
        let cached = |changes: u64| {
            let cached = self.positions.cached.lock().unwrap_or_else(|p| p.into_inner());
            match cached.as_ref() {
                Some((seen, at, index)) if *seen == changes && at.elapsed() < POSITIONS_MAX_AGE => Some(index.clone()),
                _ => None,
            }
        };
        if !fresh && let Some(index) = cached(self.positions.changes.load(Ordering::Acquire)) {
            return Ok(index);
        }
        // One rebuild at a time: the requests that missed the cache together wait for it and
        // share it, instead of each reading the whole queue.
        let _rebuilding = self.positions.rebuild.lock().await;
        let changes = self.positions.changes.load(Ordering::Acquire);
        if !fresh && let Some(index) = cached(changes) {
            return Ok(index);
        }
        // One statement, so the rows and the turns are of one snapshot; queued jobs number at
        // most MAX_QUEUE (plus uploads in flight).
        let found = rows(
            &self.client().await?,
            "SELECT j.seq, j.stream, t.served FROM jobs j LEFT JOIN stream_turns t ON t.stream = j.stream \
             WHERE j.status = 'queued' ORDER BY j.seq",
            &[],
        )
        .await?;
        let mut delta = QueueDelta::default();
        for row in &found {
            let (seq, stream, served): (i64, String, Option<i64>) = (row.get(0), row.get(1), row.get(2));
            if let Some(served) = served {
                delta.served(stream.clone(), served);
            }
            delta.added(seq, &stream);
        }
        let mut index = QueueIndex::default();
        index.apply(delta);
        let index = Arc::new(index);
        // Stored with the count read before the query: a change committed meanwhile has bumped
        // it, so this snapshot is not used past that change.
        *self.positions.cached.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((changes, Instant::now(), index.clone()));
        Ok(index)
    }

    /// See [`super::Store::list`].
    pub async fn list(&self, status: Option<JobStatus>, limit: u32) -> Result<Vec<JobRecord>, StoreError> {
        let c = self.client().await?;
        let limit = i64::from(limit);
        let found = match status {
            Some(st) => {
                let sql = format!("SELECT {COLUMNS} FROM jobs WHERE status = $1 ORDER BY seq DESC LIMIT $2");
                rows(&c, &sql, &[&st.as_str(), &limit]).await?
            }
            None => rows(&c, &format!("SELECT {COLUMNS} FROM jobs ORDER BY seq DESC LIMIT $1"), &[&limit]).await?,
        };
        found.iter().map(row_to_record).collect()
    }

    /// Number of jobs in each status: queued and running counted (few rows, partial index), the
    /// finished ones summed from the deltas the trigger appends (see the schema for why).
    pub async fn counts(&self) -> Result<StatusCounts, StoreError> {
        let c = self.client().await?;
        let found = rows(
            &c,
            "SELECT status, COUNT(*)::BIGINT FROM jobs WHERE status IN ('queued', 'running') GROUP BY status \
             UNION ALL SELECT status, SUM(delta)::BIGINT FROM finished_count_deltas GROUP BY status",
            &[],
        )
        .await?;
        let mut counts = StatusCounts::default();
        for row in found {
            let (status, n): (String, i64) = (row.get(0), row.get(1));
            let n = n.max(0) as u64;
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
    }

    /// See [`super::Store::claim_next_with`].
    pub async fn claim_next_with(
        &self,
        worker: String,
        lease_ms: i64,
        allowed_workflows: Option<Vec<String>>,
        prefetch: bool,
    ) -> Result<Option<JobRecord>, StoreError> {
        let (worker, allowed) = (&worker, &allowed_workflows);
        let next = format!("{NEXT_JOB} FOR UPDATE OF j SKIP LOCKED");
        let next = next.as_str();
        write_tx!(self, |w, _now| {
            // SKIP LOCKED: a job another broker is claiming is passed over, not waited for. The
            // lock does not make the pick right by itself (the NOT EXISTS saw this statement's
            // snapshot), so the UPDATE re-checks that the job is still queued; a pick that lost
            // is followed by the next one.
            for _ in 0..8 {
                let Some(row) = opt(&w.tx, next, &[allowed]).await? else { return Ok(None) };
                let (seq, stream): (i64, String) = (row.get(0), row.get(1));
                // After the pick (SKIP LOCKED does not wait, but the statement may queue behind
                // others on a busy server): the lease runs from the moment it is granted.
                let now = self.clock.now().millis();
                let token = LeaseToken::new();
                let claimed = exec(
                    &w.tx,
                    "UPDATE jobs SET status = 'running', attempts = attempts + 1, lease_token = $1, \
                     lease_owner = $2, lease_expires_at = $3, started_at = $4, finished_at = NULL, \
                     timeout_grace_until = NULL, progress = NULL, error_message = NULL, prefetched = $6, \
                     version = version + 1 WHERE seq = $5 AND status = 'queued'",
                    &[&token.as_str(), worker, &(now + lease_ms), &now, &seq, &prefetch],
                )
                .await?;
                if claimed == 0 {
                    continue;
                }
                exec(
                    &w.tx,
                    "INSERT INTO stream_turns (stream, served) VALUES ($1, nextval('stream_turn_seq')) \
                     ON CONFLICT (stream) DO UPDATE SET served = excluded.served",
                    &[&stream],
                )
                .await?;
                let r = get_by_seq(&w.tx, seq).await?.ok_or(StoreError::NotFound)?;
                w.note(JobEventKind::Started, &r);
                return Ok(Some(r));
            }
            Ok(None)
        })
    }

    /// See [`super::Store::complete_reused`].
    pub async fn complete_reused(
        &self,
        id: JobId,
        token: LeaseToken,
        reuse: Reuse,
    ) -> Result<Option<JobRecord>, StoreError> {
        let (token, reuse) = (&token, &reuse);
        write_tx!(self, |w, _now| {
            let Some(job) = get_in(&w.tx, id, true).await? else { return Ok(None) };
            // After the row lock: see `insert` (a lease or a finish dated by when the wait ended).
            let now = self.clock.now().millis();
            if job.status != JobStatus::Running || check_lease(&job, token).is_err() {
                return Ok(None);
            }
            let still = last_done_in(&w.tx, &job.stream).await?.is_some_and(|(from, key, present)| {
                from == reuse.from && present && key.is_some() && key == job.dedupe_key
            });
            if !still {
                return Ok(None);
            }
            finish_as_reuse(&w.tx, job.seq, reuse, now).await?;
            let r = get_by_seq(&w.tx, job.seq).await?.ok_or(StoreError::NotFound)?;
            w.note(JobEventKind::Done, &r);
            Ok(Some(r))
        })
    }

    /// See [`super::Store::peek_next`].
    pub async fn peek_next(&self, allowed_workflows: Option<Vec<String>>) -> Result<Option<String>, StoreError> {
        Ok(opt(&self.client().await?, NEXT_JOB, &[&allowed_workflows]).await?.map(|r| r.get(2)))
    }

    /// See [`super::Store::forget_old_turns`]; `keep` counts values of the turn sequence (a claim
    /// that rolled back used one too, so a little fewer claims). The sweep also folds the
    /// finished counts' deltas into one row per status here.
    pub async fn forget_old_turns(&self, keep: i64) -> Result<u64, StoreError> {
        write_tx!(self, |w, _now| {
            // Forgotten turns reorder the streams they belonged to.
            w.queue_moved = true;
            let newest: i64 = one(&w.tx, "SELECT COALESCE(MAX(served), 0) FROM stream_turns", &[]).await?.get(0);
            let n = exec(
                &w.tx,
                "DELETE FROM stream_turns WHERE stream IN \
                 (SELECT stream FROM stream_turns WHERE served < $1 ORDER BY served LIMIT $2 FOR UPDATE SKIP LOCKED)",
                &[&(newest - keep), &SWEEP_BATCH],
            )
            .await?;
            // Only the rows this snapshot sees are folded; deltas appended meanwhile stay beside
            // the sums. The try-lock keeps brokers sweeping together from folding the same rows.
            let folding: bool = one(&w.tx, "SELECT pg_try_advisory_xact_lock($1)", &[&FOLD_LOCK]).await?.get(0);
            if folding {
                exec(
                    &w.tx,
                    "WITH d AS (DELETE FROM finished_count_deltas RETURNING status, delta) \
                     INSERT INTO finished_count_deltas (status, delta) \
                     SELECT status, SUM(delta)::BIGINT FROM d GROUP BY status",
                    &[],
                )
                .await?;
            }
            Ok(n)
        })
    }

    /// See [`super::Store::heartbeat`].
    pub async fn heartbeat(
        &self,
        id: JobId,
        token: LeaseToken,
        progress: Option<Progress>,
        lease_ms: i64,
        started: bool,
    ) -> Result<HeartbeatOutcome, StoreError> {
        let (token, progress) = (&token, &progress);
        write_tx!(self, |w, _now| {
            let job = get_in(&w.tx, id, true).await?.ok_or(StoreError::NotFound)?;
            // After the row lock: see `insert` (a lease or a finish dated by when the wait ended).
            let now = self.clock.now().millis();
            check_lease(&job, token)?;
            match job.status {
                JobStatus::Cancelled => Ok(HeartbeatOutcome { cancelled: true, changed: None, unblocked: false }),
                JobStatus::Running => {
                    let unblocked = started
                        && exec(&w.tx, "UPDATE jobs SET prefetched = FALSE WHERE seq = $1 AND prefetched", &[&job.seq])
                            .await?
                            > 0;
                    if unblocked {
                        // No event (clients saw the job running all along), but the stream's next
                        // job is claimable now: other brokers' waiting workers must hear it.
                        w.wake(&job);
                    }
                    let changed = progress.as_ref().is_some_and(|p| *p != job.progress);
                    if changed {
                        let text = serde_json::to_string(progress).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                        exec(
                            &w.tx,
                            "UPDATE jobs SET lease_expires_at = $1, progress = $2, version = version + 1 WHERE seq = $3",
                            &[&(now + lease_ms), &text, &job.seq],
                        )
                        .await?;
                        let r = get_by_seq(&w.tx, job.seq).await?.ok_or(StoreError::NotFound)?;
                        w.note(JobEventKind::Progress, &r);
                        Ok(HeartbeatOutcome { cancelled: false, changed: Some(r), unblocked })
                    } else {
                        exec(
                            &w.tx,
                            "UPDATE jobs SET lease_expires_at = $1 WHERE seq = $2",
                            &[&(now + lease_ms), &job.seq],
                        )
                        .await?;
                        Ok(HeartbeatOutcome { cancelled: false, changed: None, unblocked })
                    }
                }
                status => Err(StoreError::LeaseLost { status }),
            }
        })
    }

    /// See [`super::Store::renew_for_upload`].
    pub async fn renew_for_upload(&self, id: JobId, token: LeaseToken, lease_ms: i64) -> Result<bool, StoreError> {
        let token = &token;
        write_tx!(self, |w, _now| {
            let job = get_in(&w.tx, id, true).await?.ok_or(StoreError::NotFound)?;
            // After the row lock: see `insert` (a lease or a finish dated by when the wait ended).
            let now = self.clock.now().millis();
            check_lease(&job, token)?;
            match job.status {
                JobStatus::Cancelled => Ok(true),
                JobStatus::Running => {
                    exec(
                        &w.tx,
                        "UPDATE jobs SET lease_expires_at = $1, \
                         timeout_grace_until = GREATEST(COALESCE(timeout_grace_until, 0), $1) WHERE seq = $2",
                        &[&(now + lease_ms), &job.seq],
                    )
                    .await?;
                    Ok(false)
                }
                status => Err(StoreError::LeaseLost { status }),
            }
        })
    }

    /// See [`super::Store::check_lease`].
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

    /// See [`super::Store::complete`].
    pub async fn complete(
        &self,
        id: JobId,
        token: LeaseToken,
        result: ResultInfo,
        comfy_execution_ms: Option<u64>,
    ) -> Result<(JobRecord, bool), StoreError> {
        let (token, result) = (&token, &result);
        write_tx!(self, |w, _now| {
            let job = get_in(&w.tx, id, true).await?.ok_or(StoreError::NotFound)?;
            // After the row lock: see `insert` (a lease or a finish dated by when the wait ended).
            let now = self.clock.now().millis();
            check_lease(&job, token)?;
            match job.status {
                JobStatus::Running => {}
                JobStatus::Done => return Ok((job, false)),
                JobStatus::Cancelled => return Err(StoreError::Cancelled),
                status => return Err(StoreError::LeaseLost { status }),
            }
            let progress = Progress { value: 1.0, ..job.progress.clone() };
            let progress = serde_json::to_string(&progress).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            exec(
                &w.tx,
                "UPDATE jobs SET status = 'done', finished_at = $1, lease_expires_at = NULL, \
                 result_state = 'present', result_content_type = $2, result_size = $3, progress = $4, \
                 error_message = NULL, comfy_execution_ms = $5, version = version + 1 WHERE seq = $6",
                &[
                    &now,
                    &result.content_type,
                    &(result.size as i64),
                    &progress,
                    &comfy_execution_ms.map(|v| v as i64),
                    &job.seq,
                ],
            )
            .await?;
            let r = get_by_seq(&w.tx, job.seq).await?.ok_or(StoreError::NotFound)?;
            w.note(JobEventKind::Done, &r);
            Ok((r, true))
        })
    }

    /// See [`super::Store::fail`].
    pub async fn fail(
        &self,
        id: JobId,
        token: LeaseToken,
        message: String,
        retryable: bool,
        handed_back: bool,
        max_attempts: u32,
    ) -> Result<(JobRecord, bool), StoreError> {
        let (token, message) = (&token, &message);
        write_tx!(self, |w, _now| {
            let job = lock_for_requeue(&w.tx, id, None).await?.ok_or(StoreError::NotFound)?;
            // After the row lock: see `insert` (a lease or a finish dated by when the wait ended).
            let now = self.clock.now().millis();
            check_lease(&job, token)?;
            match job.status {
                JobStatus::Running => {}
                JobStatus::Error => return Ok((job, false)),
                JobStatus::Cancelled => return Err(StoreError::Cancelled),
                status => return Err(StoreError::LeaseLost { status }),
            }
            if handed_back {
                // A worker's own stop is no fault of the job: its attempt is not counted.
                requeue(&w.tx, job.seq, now).await?;
                exec(&w.tx, "UPDATE jobs SET attempts = GREATEST(attempts - 1, 0) WHERE seq = $1", &[&job.seq]).await?;
            } else if retryable && job.attempts < max_attempts {
                requeue(&w.tx, job.seq, now).await?;
            } else {
                let message = if retryable {
                    format!("{message} (gave up after {} attempts)", job.attempts)
                } else {
                    message.clone()
                };
                finish_with_error(&w.tx, job.seq, &message, now).await?;
            }
            let r = get_by_seq(&w.tx, job.seq).await?.ok_or(StoreError::NotFound)?;
            w.note(kind_for_status(r.status), &r);
            Ok((r, true))
        })
    }

    /// See [`super::Store::release_unreceived`].
    pub async fn release_unreceived(
        &self,
        id: JobId,
        token: LeaseToken,
        claimed_expiry: Option<Timestamp>,
    ) -> Result<Option<JobRecord>, StoreError> {
        let token = &token;
        write_tx!(self, |w, _now| {
            let Some(job) = lock_for_requeue(&w.tx, id, None).await? else { return Ok(None) };
            // After the row lock: see `insert` (a lease or a finish dated by when the wait ended).
            let now = self.clock.now().millis();
            if job.status != JobStatus::Running || check_lease(&job, token).is_err() {
                return Ok(None);
            }
            if job.lease.as_ref().and_then(|l| l.expires_at) != claimed_expiry {
                return Ok(None);
            }
            requeue(&w.tx, job.seq, now).await?;
            exec(&w.tx, "UPDATE jobs SET attempts = GREATEST(attempts - 1, 0) WHERE seq = $1", &[&job.seq]).await?;
            let r = get_by_seq(&w.tx, job.seq).await?.ok_or(StoreError::NotFound)?;
            w.note(kind_for_status(r.status), &r);
            Ok(Some(r))
        })
    }

    /// See [`super::Store::cancel`].
    pub async fn cancel(&self, id: JobId) -> Result<CancelOutcome, StoreError> {
        write_tx!(self, |w, _now| {
            let job = get_in(&w.tx, id, true).await?.ok_or(StoreError::NotFound)?;
            // After the row lock: see `insert` (a lease or a finish dated by when the wait ended).
            let now = self.clock.now().millis();
            let previous = job.status;
            let files_present = job.input_present || matches!(job.result, ResultState::Present(_));
            let kind = match job.status {
                JobStatus::Queued | JobStatus::Running => {
                    let reason = cancel_reason::CANCELLED;
                    cancel_in(&w.tx, Cancel { seq: job.seq, reason, message: "cancelled by client", by: None }, now)
                        .await?;
                    Some(JobEventKind::Cancelled)
                }
                _ if files_present => {
                    exec(
                        &w.tx,
                        "UPDATE jobs SET input_present = FALSE, \
                         result_state = CASE result_state WHEN 'present' THEN 'deleted' ELSE result_state END, \
                         version = version + 1 WHERE seq = $1",
                        &[&job.seq],
                    )
                    .await?;
                    Some(JobEventKind::Deleted)
                }
                _ => None,
            };
            let record = get_by_seq(&w.tx, job.seq).await?.ok_or(StoreError::NotFound)?;
            if let Some(kind) = kind {
                w.note(kind, &record);
            } else if record.status == JobStatus::Cancelled {
                // The service answers a repeated DELETE of a cancelled job with `cancelled` again
                // (its client may have missed the first); a client of another broker asks the same
                // way, so the note goes out again, with the unchanged version.
                w.note(JobEventKind::Cancelled, &record);
            }
            Ok(CancelOutcome { record, previous, changed: kind.is_some() })
        })
    }

    /// See [`super::Store::expire_leases`]. Candidates are read without locks; each is then
    /// changed in its own transaction that locks it `SKIP LOCKED` and re-checks that its lease
    /// lapsed, so brokers sweeping at once requeue it once (and a heartbeat in flight wins).
    pub async fn expire_leases(&self, max_attempts: u32) -> Result<Swept, StoreError> {
        let now = self.clock.now().millis();
        let candidates = rows(
            &self.client().await?,
            "SELECT seq, id FROM jobs WHERE status = 'running' AND lease_expires_at < $1 \
             ORDER BY lease_expires_at LIMIT $2",
            &[&now, &SWEEP_BATCH],
        )
        .await?;
        let mut swept = Swept::default();
        for row in candidates {
            let (seq, id): (i64, String) = (row.get(0), row.get(1));
            // One unreadable id must not stop the batch: the jobs after it still lapse, and the
            // ones already requeued above must still get their events (as on SQLite).
            let id = match parse_id(&id) {
                Ok(id) => id,
                Err(e) => {
                    swept.failed.push((seq, e));
                    continue;
                }
            };
            let one = write_tx!(self, |w, now| {
                let Some(job) = lock_for_requeue(&w.tx, id, Some(now)).await? else { return Ok(None) };
                if job.attempts < max_attempts {
                    requeue(&w.tx, job.seq, now).await?;
                } else {
                    let message =
                        format!("worker lost: its lease expired without a heartbeat on all {} attempts", job.attempts);
                    finish_with_error(&w.tx, job.seq, &message, now).await?;
                }
                let r = get_by_seq(&w.tx, job.seq).await?.ok_or(StoreError::NotFound)?;
                w.note(kind_for_status(r.status), &r);
                Ok(Some(r))
            });
            match one {
                Ok(Some(r)) => swept.changed.push(r),
                Ok(None) => {}
                Err(e) => swept.failed.push((seq, e)),
            }
        }
        Ok(swept)
    }

    /// See [`super::Store::time_out_running`]; candidates as in [`PgStore::expire_leases`].
    pub async fn time_out_running(&self, timeout_ms: i64) -> Result<Swept, StoreError> {
        let now = self.clock.now().millis();
        let candidates = rows(
            &self.client().await?,
            "SELECT seq FROM jobs WHERE status = 'running' AND started_at < $1 \
             AND (timeout_grace_until IS NULL OR timeout_grace_until < $2) LIMIT $3",
            &[&(now - timeout_ms), &now, &SWEEP_BATCH],
        )
        .await?;
        let mut swept = Swept::default();
        for row in candidates {
            let seq: i64 = row.get(0);
            let one = write_tx!(self, |w, now| {
                let late = opt(
                    &w.tx,
                    "SELECT seq FROM jobs WHERE seq = $1 AND status = 'running' AND started_at < $2 \
                     AND (timeout_grace_until IS NULL OR timeout_grace_until < $3) FOR UPDATE SKIP LOCKED",
                    &[&seq, &(now - timeout_ms), &now],
                )
                .await?;
                if late.is_none() {
                    return Ok(None);
                }
                let message = format!("timed out: the job ran longer than JOB_TIMEOUT ({} s)", timeout_ms / 1000);
                finish_with_error(&w.tx, seq, &message, now).await?;
                let r = get_by_seq(&w.tx, seq).await?.ok_or(StoreError::NotFound)?;
                w.note(JobEventKind::Error, &r);
                Ok(Some(r))
            });
            match one {
                Ok(Some(r)) => swept.changed.push(r),
                Ok(None) => {}
                Err(e) => swept.failed.push((seq, e)),
            }
        }
        Ok(swept)
    }

    /// See [`super::Store::files_expired`].
    pub async fn files_expired(&self, ttl_ms: i64) -> Result<Vec<JobId>, StoreError> {
        let cutoff = self.clock.now().millis() - ttl_ms;
        let found = rows(
            &self.client().await?,
            "SELECT id FROM jobs WHERE (input_present OR result_state = 'present') \
             AND finished_at < $1 AND status IN ('done', 'error') ORDER BY finished_at LIMIT $2",
            &[&cutoff, &SWEEP_BATCH],
        )
        .await?;
        found.iter().map(|r| parse_id(&r.get::<_, String>(0))).collect()
    }

    /// See [`super::Store::records_expired`].
    pub async fn records_expired(&self, retention_ms: i64) -> Result<Vec<(JobId, bool)>, StoreError> {
        let cutoff = self.clock.now().millis() - retention_ms;
        let found = rows(
            &self.client().await?,
            "SELECT id, input_present OR result_state = 'present' FROM jobs \
             WHERE finished_at IS NOT NULL AND finished_at < $1 AND status IN ('done', 'error', 'cancelled') \
             ORDER BY finished_at LIMIT $2",
            &[&cutoff, &RETENTION_BATCH],
        )
        .await?;
        found.iter().map(|r| Ok((parse_id(&r.get::<_, String>(0))?, r.get(1)))).collect()
    }

    /// See [`super::Store::delete_records`]. The WHERE re-checks, so brokers deleting the same
    /// batch at once delete each row once.
    pub async fn delete_records(&self, ids: Vec<JobId>, retention_ms: i64) -> Result<u64, StoreError> {
        let ids: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
        let ids = &ids;
        write_tx!(self, |w, now| {
            exec(
                &w.tx,
                "DELETE FROM jobs WHERE id = ANY($1) AND finished_at < $2 AND status IN ('done', 'error', 'cancelled')",
                &[ids, &(now - retention_ms)],
            )
            .await
        })
    }

    /// See [`super::Store::fill_finished_for_benchmark`].
    pub async fn fill_finished_for_benchmark(&self, n: u64, spread_ms: i64, with_files: u64) -> Result<(), StoreError> {
        let (n, with_files) = (n as i64, with_files as i64);
        write_tx!(self, |w, now| {
            // Millions of rows may take longer than STATEMENT_TIMEOUT, legitimately.
            exec(&w.tx, "SET LOCAL statement_timeout = 0", &[]).await?;
            exec(
                &w.tx,
                "INSERT INTO jobs (id, status, prompt, negative_prompt, workflow, params, input_content_type, \
                 input_size, input_width, input_height, input_present, created_at, started_at, finished_at, \
                 attempts, result_state, result_content_type, result_size) \
                 SELECT lpad(to_hex(i), 8, '0') || '-0000-4000-8000-' || lpad(to_hex(i), 12, '0'), 'done', \
                 'benchmark', '', 'bench', '{}', 'image/png', 1000, 64, 64, i > $1::BIGINT - $4::BIGINT, t - 5000, t - 4000, t, 1, \
                 CASE WHEN i > $1::BIGINT - $4::BIGINT THEN 'present' ELSE 'deleted' END, 'video/mp4', 100000 \
                 FROM (SELECT i, $2::BIGINT - $3::BIGINT + $3::BIGINT * i / $1::BIGINT AS t \
                       FROM generate_series(1::BIGINT, $1::BIGINT) AS i) AS k",
                &[&n, &now, &spread_ms, &with_files],
            )
            .await?;
            Ok(())
        })
    }

    /// See [`super::Store::owned_files`].
    pub async fn owned_files(&self, ids: Vec<JobId>) -> Result<HashMap<JobId, (bool, bool)>, StoreError> {
        let names: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
        let found = rows(
            &self.client().await?,
            "SELECT id, input_present, result_state = 'present' FROM jobs WHERE id = ANY($1)",
            &[&names],
        )
        .await?;
        found.iter().map(|r| Ok((parse_id(&r.get::<_, String>(0))?, (r.get(1), r.get(2))))).collect()
    }

    /// See [`super::Store::mark_files_deleted`].
    pub async fn mark_files_deleted(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        write_tx!(self, |w, _now| {
            let changed = opt(
                &w.tx,
                "UPDATE jobs SET input_present = FALSE, \
                 result_state = CASE result_state WHEN 'present' THEN 'deleted' ELSE result_state END, \
                 version = version + 1 WHERE id = $1 AND (result_state = 'present' OR input_present) RETURNING seq",
                &[&id.to_string()],
            )
            .await?;
            let Some(row) = changed else { return Ok(None) };
            let r = get_by_seq(&w.tx, row.get(0)).await?.ok_or(StoreError::NotFound)?;
            w.note(JobEventKind::Deleted, &r);
            Ok(Some(r))
        })
    }

    /// Records that `me` is alive and returns the brokers seen within `within_ms` (this one
    /// included), deleting the rows of brokers not seen for a day.
    pub async fn broker_heartbeat(
        &self,
        me: BrokerPresence,
        within_ms: i64,
    ) -> Result<Vec<BrokerPresence>, StoreError> {
        let me = &me;
        write_tx!(self, |w, now| {
            exec(
                &w.tx,
                "INSERT INTO brokers (id, addr, started_at, last_seen) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (id) DO UPDATE SET addr = excluded.addr, last_seen = excluded.last_seen",
                &[&me.id, &me.addr, &me.started_at.millis(), &now],
            )
            .await?;
            exec(&w.tx, "DELETE FROM brokers WHERE last_seen < $1", &[&(now - DEAD_BROKER_MS)]).await?;
            let found = rows(
                &w.tx,
                "SELECT id, addr, started_at, last_seen FROM brokers WHERE last_seen >= $1 ORDER BY started_at, id",
                &[&(now - within_ms)],
            )
            .await?;
            Ok(found
                .iter()
                .map(|r| BrokerPresence {
                    id: r.get(0),
                    addr: r.get(1),
                    started_at: Timestamp(r.get(2)),
                    last_seen: Timestamp(r.get(3)),
                })
                .collect())
        })
    }

    /// Deletes `id`'s presence row (a broker stopping gracefully): the others, and its own next
    /// start, no longer count it as alive.
    pub async fn broker_leave(&self, id: String) -> Result<(), StoreError> {
        let id = &id;
        write_tx!(self, |w, _now| {
            exec(&w.tx, "DELETE FROM brokers WHERE id = $1", &[id]).await?;
            Ok(())
        })
    }

    /// [`Self::queue_position`] of each `(stream, seq)`, in order, from one positions snapshot (a
    /// job list costs at most one read of the queue, not one per queued job). 0 for a job not
    /// queued.
    pub async fn queue_positions(&self, jobs: &[(String, i64)]) -> Result<Vec<u64>, StoreError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let mut index = self.positions(false).await?;
        if jobs.iter().any(|(stream, seq)| index.position(stream, *seq) == 0) {
            // As in `queue_position`: a job queued through another broker a moment ago.
            index = self.positions(true).await?;
        }
        Ok(jobs.iter().map(|(stream, seq)| index.position(stream, *seq)).collect())
    }
}

/// How long a broker's presence row outlives its last heartbeat.
const DEAD_BROKER_MS: i64 = 24 * 3600 * 1000;

/// The advisory lock key of the counts' folding ("tdcount" in ASCII).
const FOLD_LOCK: i64 = 0x0074_6463_6f75_6e74;

fn kind_for_status(status: JobStatus) -> JobEventKind {
    match status {
        JobStatus::Queued => JobEventKind::Queued,
        JobStatus::Running => JobEventKind::Started,
        JobStatus::Done => JobEventKind::Done,
        JobStatus::Error => JobEventKind::Error,
        JobStatus::Cancelled => JobEventKind::Cancelled,
    }
}

/// Locks job `id` for a change that may requeue it: first the advisory lock of its stream when it
/// is a named `latest` one (stream and mode never change, so they are read before the row lock;
/// taking the stream lock first keeps the order [`PgStore::insert`] uses, so the two cannot
/// deadlock), then its row. With `expired_before` (the sweep's now) only a running job whose
/// lease lapsed before it is taken, and one another transaction holds is skipped.
async fn lock_for_requeue(
    tx: &deadpool_postgres::Transaction<'_>,
    id: JobId,
    expired_before: Option<i64>,
) -> Result<Option<JobRecord>, StoreError> {
    let id_text = id.to_string();
    let Some(row) = opt(tx, "SELECT stream, mode FROM jobs WHERE id = $1", &[&id_text]).await? else {
        return Ok(None);
    };
    let (stream, mode): (String, String) = (row.get(0), row.get(1));
    if mode == StreamMode::Latest.as_str() && !stream.is_empty() {
        exec(tx, "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", &[&stream]).await?;
    }
    match expired_before {
        None => get_in(tx, id, true).await,
        Some(now) => {
            let sql = format!(
                "SELECT {COLUMNS} FROM jobs WHERE id = $1 AND status = 'running' AND lease_expires_at < $2 \
                 FOR UPDATE SKIP LOCKED"
            );
            opt(tx, &sql, &[&id_text, &now]).await?.as_ref().map(row_to_record).transpose()
        }
    }
}

/// See SQLite's `requeue`: back to the queue, unless a newer job of its `latest` stream exists
/// (then cancelled as superseded by the newest). The caller holds the stream's advisory lock.
async fn requeue(tx: &deadpool_postgres::Transaction<'_>, seq: i64, now: i64) -> Result<(), StoreError> {
    let row = one(tx, "SELECT stream, mode FROM jobs WHERE seq = $1", &[&seq]).await?;
    let (stream, mode): (String, String) = (row.get(0), row.get(1));
    if mode == StreamMode::Latest.as_str() && !stream.is_empty() {
        let newer = opt(
            tx,
            "SELECT id FROM jobs WHERE stream = $1 AND seq > $2 \
             AND status IN ('queued', 'running', 'done') ORDER BY seq DESC LIMIT 1",
            &[&stream, &seq],
        )
        .await?;
        if let Some(newer) = newer {
            let by = parse_id(&newer.get::<_, String>(0))?;
            let message = format!("superseded by job {by}");
            return cancel_in(
                tx,
                Cancel { seq, reason: cancel_reason::SUPERSEDED, message: &message, by: Some(by) },
                now,
            )
            .await;
        }
    }
    exec(
        tx,
        "UPDATE jobs SET status = 'queued', lease_token = NULL, lease_owner = NULL, \
         lease_expires_at = NULL, started_at = NULL, timeout_grace_until = NULL, progress = NULL, \
         prefetched = FALSE, version = version + 1 WHERE seq = $1",
        &[&seq],
    )
    .await?;
    Ok(())
}

/// One job to cancel, and why.
struct Cancel<'a> {
    seq: i64,
    reason: &'a str,
    message: &'a str,
    by: Option<JobId>,
}

/// See SQLite's `cancel_in`: the lease token stays, so the worker's next heartbeat learns of it.
async fn cancel_in(tx: &deadpool_postgres::Transaction<'_>, c: Cancel<'_>, now: i64) -> Result<(), StoreError> {
    exec(
        tx,
        "UPDATE jobs SET status = 'cancelled', finished_at = $1, lease_expires_at = NULL, \
         error_message = $2, cancel_reason = $3, superseded_by = $4, input_present = FALSE, \
         result_state = CASE result_state WHEN 'present' THEN 'deleted' ELSE result_state END, \
         version = version + 1 WHERE seq = $5",
        &[&now, &c.message, &c.reason, &c.by.map(|id| id.to_string()), &c.seq],
    )
    .await?;
    Ok(())
}

async fn last_done_in<C: GenericClient>(
    c: &C,
    stream: &str,
) -> Result<Option<(JobId, Option<String>, bool)>, StoreError> {
    let row = opt(
        c,
        "SELECT id, dedupe_key, result_state = 'present' FROM jobs \
         WHERE stream = $1 AND status = 'done' ORDER BY seq DESC LIMIT 1",
        &[&stream],
    )
    .await?;
    row.map(|r| Ok((parse_id(&r.get::<_, String>(0))?, r.get(1), r.get(2)))).transpose()
}

async fn finish_as_reuse(
    tx: &deadpool_postgres::Transaction<'_>,
    seq: i64,
    reuse: &Reuse,
    now: i64,
) -> Result<(), StoreError> {
    let progress = Progress { value: 1.0, ..Progress::default() };
    let progress = serde_json::to_string(&progress).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    exec(
        tx,
        "UPDATE jobs SET status = 'done', started_at = COALESCE(started_at, $1), finished_at = $1, \
         lease_expires_at = NULL, input_present = FALSE, result_state = 'present', result_content_type = $2, \
         result_size = $3, progress = $4, reused_from = $5, attempts = GREATEST(attempts - 1, 0), \
         version = version + 1 WHERE seq = $6",
        &[&now, &reuse.result.content_type, &(reuse.result.size as i64), &progress, &reuse.from.to_string(), &seq],
    )
    .await?;
    Ok(())
}

async fn finish_with_error(
    tx: &deadpool_postgres::Transaction<'_>,
    seq: i64,
    message: &str,
    now: i64,
) -> Result<(), StoreError> {
    exec(
        tx,
        "UPDATE jobs SET status = 'error', error_message = $1, finished_at = $2, \
         lease_expires_at = NULL, version = version + 1 WHERE seq = $3",
        &[&message, &now, &seq],
    )
    .await?;
    Ok(())
}

/// One job by id; `lock` takes its row lock (`FOR UPDATE`) for a change.
async fn get_in<C: GenericClient>(c: &C, id: JobId, lock: bool) -> Result<Option<JobRecord>, StoreError> {
    let sql = if lock {
        format!("SELECT {COLUMNS} FROM jobs WHERE id = $1 FOR UPDATE")
    } else {
        format!("SELECT {COLUMNS} FROM jobs WHERE id = $1")
    };
    opt(c, &sql, &[&id.to_string()]).await?.as_ref().map(row_to_record).transpose()
}

async fn get_by_seq<C: GenericClient>(c: &C, seq: i64) -> Result<Option<JobRecord>, StoreError> {
    opt(c, &format!("SELECT {COLUMNS} FROM jobs WHERE seq = $1"), &[&seq])
        .await?
        .as_ref()
        .map(row_to_record)
        .transpose()
}

fn row_to_record(r: &Row) -> Result<JobRecord, StoreError> {
    let id: String = r.try_get("id")?;
    let status: String = r.try_get("status")?;
    let params_text: String = r.try_get("params")?;
    let progress_text: Option<String> = r.try_get("progress")?;
    let lease_token: Option<String> = r.try_get("lease_token")?;
    let result_state: String = r.try_get("result_state")?;
    let mode: String = r.try_get("mode")?;
    let ts = |v: Option<i64>| v.map(Timestamp);
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
            content_type: r.try_get::<_, Option<String>>("result_content_type")?.unwrap_or_default(),
            size: r.try_get::<_, Option<i64>>("result_size")?.unwrap_or(0).max(0) as u64,
        }),
        "deleted" => ResultState::Deleted,
        _ => ResultState::None,
    };
    let lease = match lease_token {
        Some(t) => Some(LeaseState {
            token: LeaseToken::from_string(t),
            owner: r.try_get::<_, Option<String>>("lease_owner")?.unwrap_or_default(),
            expires_at: ts(r.try_get("lease_expires_at")?),
        }),
        None => None,
    };
    let dim = |name: &str| -> Result<u32, StoreError> {
        let v: i64 = r.try_get(name)?;
        u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{name} {v} of job {id}")))
    };
    Ok(JobRecord {
        id: parse_id(&id)?,
        seq: r.try_get("seq")?,
        status: JobStatus::parse(&status).ok_or_else(|| StoreError::Corrupt(format!("status {status}")))?,
        prompt: r.try_get("prompt")?,
        negative_prompt: r.try_get("negative_prompt")?,
        seed: r.try_get::<_, Option<i64>>("seed")?.map(seed_from_sql),
        workflow: r.try_get("workflow")?,
        params,
        input: InputInfo {
            content_type: r.try_get("input_content_type")?,
            size: r.try_get::<_, i64>("input_size")?.max(0) as u64,
            width: dim("input_width")?,
            height: dim("input_height")?,
        },
        input_present: r.try_get("input_present")?,
        created_at: Timestamp(r.try_get("created_at")?),
        started_at: ts(r.try_get("started_at")?),
        finished_at: ts(r.try_get("finished_at")?),
        attempts: u32::try_from(r.try_get::<_, i64>("attempts")?.max(0)).unwrap_or(u32::MAX),
        lease,
        progress,
        error_message: r.try_get("error_message")?,
        result,
        comfy_execution_ms: r.try_get::<_, Option<i64>>("comfy_execution_ms")?.map(|v| v.max(0) as u64),
        version: r.try_get::<_, i64>("version")?.max(0) as u64,
        stream: r.try_get("stream")?,
        mode: StreamMode::parse(&mode).ok_or_else(|| StoreError::Corrupt(format!("mode {mode}")))?,
        previews: r.try_get("previews")?,
        cancel_reason: r.try_get("cancel_reason")?,
        superseded_by: opt_id(r.try_get("superseded_by")?)?,
        reused_from: opt_id(r.try_get("reused_from")?)?,
        dedupe_key: r.try_get("dedupe_key")?,
        dedupe: r.try_get("dedupe")?,
    })
}

/// Benchmark and test hook: creates the empty database `name` on the server `url` names (the
/// user needs CREATEDB) and returns its URL.
#[doc(hidden)]
pub async fn create_database(url: &DatabaseUrl, name: &str) -> Result<DatabaseUrl, StoreError> {
    check_database_name(name)?;
    admin_statement(url, &format!("CREATE DATABASE \"{name}\"")).await?;
    let mut config = url.config.clone();
    config.dbname(name);
    let redacted = format!("{}/{name}", url.redacted.rsplit_once('/').map(|(base, _)| base).unwrap_or(""));
    Ok(DatabaseUrl { config, redacted })
}

/// Benchmark and test hook: drops the database `name` (closing its connections) on `url`'s server.
#[doc(hidden)]
pub async fn drop_database(url: &DatabaseUrl, name: &str) -> Result<(), StoreError> {
    check_database_name(name)?;
    admin_statement(url, &format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await
}

/// The name is spliced into the statement (`CREATE DATABASE` takes no parameters), so only a
/// plain identifier is accepted: lower-case letters, digits and `_`, not starting with a digit,
/// at most 63 bytes (PostgreSQL's limit, past which it would silently truncate).
fn check_database_name(name: &str) -> Result<(), StoreError> {
    let plain = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if plain {
        Ok(())
    } else {
        Err(StoreError::Unavailable(format!(
            "database name {name:?}: use 1 to 63 lower-case letters, digits or _, not starting with a digit"
        )))
    }
}

async fn admin_statement(url: &DatabaseUrl, statement: &str) -> Result<(), StoreError> {
    let (client, connection) = url.config.connect(tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(connection);
    let done = client.batch_execute(statement).await;
    drop(client);
    let _ = driver.await;
    Ok(done?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_never_repeat_the_password() {
        for bad in [
            "postgres://user:s3cret@host:notaport/db",
            "host=h password='s3cret",
            "host=h password=s3cret port=x",
            "postgres://user:s3cret@host/db?s3cret=1",
        ] {
            let e = DatabaseUrl::parse(bad).expect_err(bad);
            assert!(!e.contains("s3cr"), "{bad:?} gave {e:?}");
            assert!(e.starts_with("is not a PostgreSQL URL"), "{e}");
        }
        let e = DatabaseUrl::parse("host=h port=x").unwrap_err();
        assert!(e.contains("invalid value for option `port`"), "the option is still named: {e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stream_turns_serialise_and_are_forgotten_when_unused() {
        let locks = Arc::new(StreamLocks::default());
        let inside = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (locks, inside) = (locks.clone(), inside.clone());
            tasks.push(tokio::spawn(async move {
                let _turn = locks.lock("s").await;
                let n = inside.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                assert_eq!(n, 0, "one holder of a stream at a time");
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                inside.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            }));
        }
        let other = locks.lock("t").await;
        assert!(locks.len() >= 1);
        drop(other);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(locks.len(), 0, "no entry outlives its last holder");
    }

    #[test]
    fn database_names_are_plain_identifiers() {
        for good in ["tdcomfy_bench_0a1b", "a", &"x".repeat(63)] {
            assert!(check_database_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Upper", "1abc", "a\"; DROP DATABASE postgres; --", "a-b", &"x".repeat(64)] {
            let e = check_database_name(bad).unwrap_err().to_string();
            assert!(e.contains("1 to 63 lower-case letters"), "{bad}: {e}");
        }
    }
}
