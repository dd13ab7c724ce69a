//! The broker's behaviour, between the HTTP handlers and the store: every job state change goes
//! through here, so every change is published as an event and wakes waiting workers exactly once.
//!
//! Handlers parse and answer; this module decides. It never holds a database transaction across a
//! network await: each store call is one short transaction, and streamed bytes are on disk before
//! the store hears of them.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tdcomfy_api::{
    DeleteResponse, Health, InputInfo, JobEvent, JobEventKind, JobId, JobStatus, JobView, Lease, LeaseToken,
    PreflightReport, Progress, ResultInfo, ServerReadiness, StreamMode, SubmitResponse, Timestamp, Timings,
};
use tokio::time::Instant;

use crate::blobs::{BlobKind, Blobs, StagedBlob};
use crate::config::BrokerConfig;
use crate::events::EventHub;
use crate::metrics::{Metrics, Subscriber};
use crate::store::{
    BrokerPresence, ClusterNote, InsertOutcome, JobRecord, NewJob, ResultState, Reuse, Store, StoreError,
};
use crate::workers::WorkerRegistry;

/// How long a lease request that let a better-suited waiting loop go first waits for it to claim
/// before claiming itself: the fallback when that loop does not take the job after all.
const YIELD_LIMIT: Duration = Duration::from_millis(200);

/// What a lease loop asks for, beside its worker id and wait.
#[derive(Debug, Clone, Default)]
pub struct LeaseWish {
    /// The workflows its server can run (`None`: any).
    pub workflows: Option<Vec<String>>,
    /// Its server is busy: the job would wait in ComfyUI's queue.
    pub prefetch: bool,
    /// The workflow its server ran last.
    pub last_workflow: Option<String>,
}

/// One heartbeat: progress, whether a prefetched job started, how long to hold the answer.
#[derive(Debug, Clone, Default)]
pub struct Beat {
    /// Progress to publish.
    pub progress: Option<Progress>,
    /// ComfyUI started the prompt of a job leased with `prefetch`.
    pub started: bool,
    /// Hold the answer this long unless the job changes (0: answer at once).
    pub wait: Duration,
}

/// Takes a lease request off the waiting list when it ends, waking the requests that let it go
/// first so they claim now.
struct WakeOthers<'a> {
    broker: &'a Broker,
    me: u64,
}

impl Drop for WakeOthers<'_> {
    fn drop(&mut self) {
        if self.broker.inner.workers.stop_waiting(self.me) {
            self.broker.inner.hub.job_queued();
        }
    }
}

/// A validated submission whose image is staged on disk.
#[derive(Debug)]
pub struct Submission {
    /// The staged image.
    pub image: StagedBlob,
    /// What the image's header says.
    pub input: InputInfo,
    /// Positive prompt.
    pub prompt: String,
    /// Negative prompt.
    pub negative_prompt: String,
    /// Seed.
    pub seed: Option<u64>,
    /// Workflow name (validated).
    pub workflow: String,
    /// Named inputs (validated).
    pub params: serde_json::Map<String, serde_json::Value>,
    /// Idempotency key and request fingerprint.
    pub idempotency: Option<(String, String)>,
    /// The stream (validated; `""` for none).
    pub stream: String,
    /// `queue` or `latest`.
    pub mode: StreamMode,
    /// In `latest` mode, cancel the stream's running job too.
    pub preempt: bool,
    /// Previews asked for.
    pub previews: bool,
    /// Answer at once with the stream's last result when nothing changed.
    pub dedupe: bool,
    /// True when the seed was drawn at random (`-1`): such a result is never reused.
    pub random_seed: bool,
}

impl Submission {
    /// What the result depends on, hashed: the frame's bytes and every field that reaches the
    /// workflow. `None` when the bytes were not hashed or the seed is random.
    fn dedupe_key(&self) -> Option<String> {
        use sha2::{Digest, Sha256};
        let frame = self.image.sha256?;
        if self.random_seed {
            return None;
        }
        let mut h = Sha256::new();
        // Each part is length-prefixed, so no two different requests hash the same parts.
        let seed = self.seed.map(|s| s.to_string()).unwrap_or_default();
        // The params map is ordered by key (serde_json without preserve_order): one spelling each.
        let params = serde_json::Value::Object(self.params.clone()).to_string();
        for part in [
            &frame[..],
            self.input.content_type.as_bytes(),
            self.workflow.as_bytes(),
            self.prompt.as_bytes(),
            self.negative_prompt.as_bytes(),
            seed.as_bytes(),
            params.as_bytes(),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        let digest: [u8; 32] = h.finalize().into();
        Some(digest.iter().map(|b| format!("{b:02x}")).collect())
    }
}

/// Outcome of a submission.
#[derive(Debug)]
pub enum SubmitOutcome {
    /// Stored (or replayed when `replayed`).
    Accepted {
        /// The response body.
        response: SubmitResponse,
        /// True when the idempotency key named an existing job.
        replayed: bool,
    },
    /// The idempotency key was used for a different request.
    KeyConflict,
}

/// The broker: store, files, events and workers behind one cheap-to-clone handle.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    config: BrokerConfig,
    store: Store,
    blobs: Blobs,
    hub: EventHub,
    workers: WorkerRegistry,
    shutdown: tokio_util::sync::CancellationToken,
    /// Leases handed out but not yet acknowledged by their worker (no input download, no
    /// heartbeat). An answer written into a closed socket looks delivered to the server; only the
    /// worker's first call proves it arrived.
    unacknowledged: std::sync::Mutex<std::collections::HashMap<JobId, Unacknowledged>>,
    /// Open event streams (SSE and WebSocket).
    subscribers: Arc<std::sync::atomic::AtomicUsize>,
    /// This broker's Prometheus metrics.
    metrics: Arc<Metrics>,
    /// This broker's presence on its database: its id (the hub's boot id), address and start.
    me: BrokerPresence,
    /// The brokers alive on the database at the last presence heartbeat, this one included.
    brokers: std::sync::Mutex<Vec<BrokerPresence>>,
    /// Whether the last presence heartbeat failed (so a failing database is logged once, not
    /// every second).
    presence_failing: std::sync::atomic::AtomicBool,
    /// When the store last answered the sweep or the presence heartbeat, and whether it has
    /// failed since: an outage longer than `LEASE_TTL`/3 made every worker's heartbeat fail
    /// meanwhile, so its leases lapsed through no fault of the workers (see [`Broker::sweep`]).
    store_health: std::sync::Mutex<StoreHealth>,
    /// The presence heartbeat and the consumer of other brokers' changes: aborted with the
    /// broker (they hold it only weakly, so they never keep it alive).
    tasks: std::sync::Mutex<Vec<crate::AbortOnDrop>>,
}

/// What the sweep knows of the store's recent answers.
struct StoreHealth {
    /// The last time a sweep step or presence heartbeat succeeded.
    last_ok: Instant,
    /// A call failed since `last_ok`.
    failing: bool,
    /// The store answered again after failing for more than `LEASE_TTL`/3 (the presence beat
    /// may hear it first): the next sweep resumes running leases before expiring any.
    resume_pending: bool,
}

/// How long a starting broker waits for another broker's presence row to move before it takes
/// itself to be alone: every broker beats at least once a second (its sweep interval, at most
/// 1 s), so a row that has not moved in this long belongs to a broker that is gone.
const PRESENCE_PROOF: Duration = Duration::from_millis(2500);

/// Records `me` and finds out how many other brokers are alive on the database (with the live
/// rows, `me` included). A row within the presence window is not proof: after a crash and a quick
/// restart it is this broker's own previous start, and no one renewed its workers' leases while
/// it was down. So when other rows are there, this waits (at most [`PRESENCE_PROOF`]) for one of
/// them to beat again; a row that moves, or a new one, is a live broker. "Moves" compares a row's
/// `last_seen` with its own earlier value, not with this broker's clock, so skew between machines
/// cannot fake a move. Which rows are in the window at all, though, compares a row's `last_seen`
/// (written with its own broker's clock) with this broker's clock: a broker whose clock is behind
/// by more than the window ([`presence_window`]) is missed, here (this broker then takes itself
/// to be alone and resumes running leases) and in `/health`. Brokers need synchronised clocks
/// (NTP), as their leases' expiry does anyway. SQLite has no other rows and answers at once.
async fn others_alive(
    store: &Store,
    me: &BrokerPresence,
    config: &BrokerConfig,
) -> Result<(usize, Vec<BrokerPresence>), BrokerError> {
    let window = presence_window(config).as_millis() as i64;
    let mut live = store.broker_heartbeat(me.clone(), window).await?;
    let first: std::collections::HashMap<String, Timestamp> =
        live.iter().filter(|b| b.id != me.id).map(|b| (b.id.clone(), b.last_seen)).collect();
    if first.is_empty() {
        return Ok((0, live));
    }
    let deadline = Instant::now() + PRESENCE_PROOF;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let beat = BrokerPresence { last_seen: config.clock.now(), ..me.clone() };
        live = store.broker_heartbeat(beat, window).await?;
        let moved =
            live.iter().filter(|b| b.id != me.id && first.get(&b.id).is_none_or(|seen| b.last_seen > *seen)).count();
        if moved > 0 {
            return Ok((moved, live));
        }
    }
    tracing::info!(
        rows = first.len(),
        "the other presence rows did not move: they are brokers that are gone (or this broker's previous start)"
    );
    Ok((0, live))
}

/// How long a broker counts as alive after its last presence heartbeat: several heartbeats (one
/// per sweep interval, at most 1 s), at least 3 s, so a busy machine does not make a live
/// broker flap out of `/health`, while a stopped one drops out within seconds.
fn presence_window(config: &BrokerConfig) -> Duration {
    (config.sweep_interval * 5).max(Duration::from_secs(3))
}

/// Broker faults that are not a client's doing.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The store failed or refused.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The disk failed.
    #[error("disk error: {0}")]
    Io(#[from] std::io::Error),
    /// Another broker holds the data directory.
    #[error(
        "DATA_DIR {} is in use by another broker ({holder}); stop that one, or give this one its own DATA_DIR",
        dir.display()
    )]
    DataDirInUse {
        /// The directory.
        dir: std::path::PathBuf,
        /// Who holds it, as its lock file says.
        holder: String,
    },
}

impl Broker {
    /// Opens the store and file area under `config.data_dir`, and gives the jobs that were running
    /// when the broker stopped one `LEASE_TTL` for their workers to check in (see
    /// [`Store::resume_running`]) when no other broker is alive on the database; call it before
    /// the first [`Broker::sweep`].
    pub async fn open(config: BrokerConfig) -> Result<Broker, BrokerError> {
        Broker::open_on(config, None).await
    }

    /// [`Broker::open`] for a broker listening on `addr`, which its presence row reports.
    ///
    /// Also starts the broker's presence heartbeat and, on a shared database, the task that
    /// publishes the changes other brokers make to this broker's subscribers and waiting workers.
    pub async fn open_on(config: BrokerConfig, addr: Option<std::net::SocketAddr>) -> Result<Broker, BrokerError> {
        std::fs::create_dir_all(&config.data_dir)?;
        // First: its boot id is this broker's id, which a shared store tags its notes with (so
        // the broker does not hear its own changes back) and its presence row carries.
        let hub = EventHub::with_previews(1024, config.preview_limits);
        let store = match &config.database {
            Some(url) => Store::connect(url, config.clock.clone(), hub.boot().to_owned()).await?,
            None => Store::open(&config.data_dir.join("jobs.sqlite3"), config.clock.clone())?,
        };
        let blobs = Blobs::open_at(&config.storage, &config.data_dir.join("files")).await?;
        let now = config.clock.now();
        let me = BrokerPresence {
            // The hub's boot id: random at every start, and what this broker's event ids begin
            // with, so an id a client holds names the broker it came from.
            id: hub.boot().to_owned(),
            addr: addr.map(|a| a.to_string()).unwrap_or_default(),
            started_at: now,
            last_seen: now,
        };
        // Before the first sweep and before listening: other brokers see this one from now on.
        let (others, live) = others_alive(&store, &me, &config).await?;
        if others == 0 {
            let resumed = store
                .resume_running(config.lease_ttl.as_millis() as i64, config.job_timeout.as_millis() as i64)
                .await?;
            if resumed > 0 {
                tracing::info!(jobs = resumed, "running jobs keep their leases for one LEASE_TTL after the restart");
            }
        } else {
            // The workers kept heartbeating through the live brokers while this one was down, so
            // their leases are current; renewing every running lease would only hide a worker
            // that died meanwhile for one more LEASE_TTL.
            tracing::info!(
                brokers = others,
                "other brokers are alive on this database: running jobs keep the leases their workers renew"
            );
        }
        let notes = store.cluster_notes();
        let broker = Broker {
            inner: Arc::new(Inner {
                config,
                store,
                blobs,
                hub,
                shutdown: tokio_util::sync::CancellationToken::new(),
                workers: WorkerRegistry::default(),
                unacknowledged: Default::default(),
                subscribers: Default::default(),
                metrics: Default::default(),
                me,
                brokers: std::sync::Mutex::new(live),
                presence_failing: Default::default(),
                store_health: std::sync::Mutex::new(StoreHealth {
                    last_ok: Instant::now(),
                    failing: false,
                    resume_pending: false,
                }),
                tasks: Default::default(),
            }),
        };
        let weak = Arc::downgrade(&broker.inner);
        let mut tasks = vec![crate::AbortOnDrop(tokio::spawn(presence_forever(weak.clone())))];
        if let Some(notes) = notes {
            tasks.push(crate::AbortOnDrop(tokio::spawn(follow_supervised(weak, notes))));
        }
        *broker.inner.tasks.lock().unwrap_or_else(|p| p.into_inner()) = tasks;
        // After the presence heartbeat started: a pass over a large S3 bucket can take longer
        // than the presence window, and a broker that stops beating meanwhile would be taken
        // for dead by a peer starting then (which would renew the running leases).
        reconcile_files(&broker.inner.store, &broker.inner.blobs).await?;
        Ok(broker)
    }

    /// Stops the presence heartbeat and the consumer of other brokers' changes: `run` calls it
    /// when it ends or is dropped, so a stopped broker never again says it is alive, even while
    /// a request of its lingers.
    pub fn stop_background(&self) {
        self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// A graceful stop: the background tasks end, then this broker's presence row goes, so the
    /// others drop it from `/health` at once and a lone broker's restart need not wait
    /// [`PRESENCE_PROOF`] for a row that will not move. A failure only costs that wait.
    pub async fn leave(&self) {
        self.stop_background();
        if let Err(e) = self.inner.store.broker_leave(self.inner.me.id.clone()).await {
            tracing::warn!(error = %e, "could not delete this broker's presence row; it lapses by itself");
        }
    }

    /// Records this broker's presence and keeps the list of live brokers for `/health`.
    async fn beat_presence(&self) {
        let me = BrokerPresence { last_seen: self.inner.config.clock.now(), ..self.inner.me.clone() };
        let window = presence_window(&self.inner.config).as_millis() as i64;
        let failing = &self.inner.presence_failing;
        let beat = self.inner.store.broker_heartbeat(me, window).await;
        self.store_answered(beat.is_ok());
        match beat {
            Ok(mut live) => {
                live.sort_by(|a, b| (a.started_at, &a.id).cmp(&(b.started_at, &b.id)));
                *self.inner.brokers.lock().unwrap_or_else(|p| p.into_inner()) = live;
                if failing.swap(false, std::sync::atomic::Ordering::Relaxed) {
                    tracing::info!("presence heartbeat recorded again");
                }
            }
            Err(e) => {
                if !failing.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(error = %e, "could not record this broker's presence; retrying every sweep interval");
                }
            }
        }
    }

    /// Publishes a change another broker made (its `NOTIFY`) to this broker's subscribers, from
    /// the row as it is now, and wakes the lease requests waiting here when the job is queued.
    async fn apply_remote_change(&self, id: JobId, kind: JobEventKind, version: u64) {
        if kind == JobEventKind::Queued {
            // Before any read: a waiting worker claims from the database itself, and a wake-up
            // that finds the job taken already costs one empty claim.
            self.inner.hub.job_queued();
        }
        if !matches!(kind, JobEventKind::Started | JobEventKind::Progress) {
            // Whoever held it on this broker's table does not any more.
            self.inner.workers.release(id);
        }
        if !self.inner.hub.wanted_or_gap(id) {
            // No stream, long-poll or preview here would hear of it: skip the re-read, so a
            // broker nobody watches costs the others' changes nothing but this check. The hub
            // recorded the gap: a client resuming from before it resyncs.
            return;
        }
        let r = match self.inner.store.get(id).await {
            Ok(Some(r)) => r,
            // Deleted since (JOB_RETENTION): nothing left to show.
            Ok(None) => return,
            Err(e) => {
                // The change cannot be shown: say so rather than leave a gap.
                tracing::warn!(job_id = %id, error = %e, "could not read a job another broker changed; clients resync");
                self.remote_changes_missed();
                return;
            }
        };
        // A newer version means a later change committed meanwhile; its own note follows and
        // shows it. Publishing this note's kind with the newer row would show, say, `started`
        // with a job already `done`, and then `done` twice.
        if r.version != version {
            tracing::debug!(job_id = %id, version, now = r.version, "skipped a note overtaken by a later change");
            return;
        }
        // Not counted: the broker that made the change counted it (metrics are per broker and
        // add up across brokers). Logged at debug: the changing broker logged it at info.
        match self.view(&r).await {
            Ok(view) => {
                tracing::debug!(job_id = %id, event = crate::events::event_name(kind), "job changed on another broker");
                if !self.inner.hub.publish_if_newer(JobEvent::new(kind, view)) {
                    tracing::debug!(job_id = %id, version, "skipped a note this broker's own later change overtook");
                }
            }
            Err(e) => {
                tracing::warn!(job_id = %id, error = %e, "could not show a job another broker changed; clients resync");
                self.remote_changes_missed();
            }
        }
    }

    /// Other brokers' changes may have been missed: every stream resyncs, every long-poll
    /// re-reads, every waiting lease request looks at the queue again.
    fn remote_changes_missed(&self) {
        self.inner.hub.resync_all();
        self.inner.hub.job_queued();
    }

    /// The settings.
    pub fn config(&self) -> &BrokerConfig {
        &self.inner.config
    }

    /// The file area.
    pub fn blobs(&self) -> &Blobs {
        &self.inner.blobs
    }

    /// Cancelled when the broker shuts down: long-lived responses (event streams, long-polls,
    /// lease waits) end then, so a graceful shutdown never waits on them.
    pub fn shutdown_token(&self) -> &tokio_util::sync::CancellationToken {
        &self.inner.shutdown
    }

    /// The event bus.
    pub fn hub(&self) -> &EventHub {
        &self.inner.hub
    }

    /// Turns a stored job into its wire form.
    ///
    /// Never fails: its one store read, `queue_position` (a query on PostgreSQL), is best-effort.
    /// A view is built after a commit (submit, release, failure report), where an error would
    /// turn a committed change into a 500 (a client without `Idempotency-Key` retries and makes
    /// a second job) and skip its event; a missing position costs the client only that field.
    pub async fn view(&self, r: &JobRecord) -> Result<JobView, BrokerError> {
        let queue_position = if r.status == JobStatus::Queued { self.queue_position(r).await } else { None };
        Ok(self.view_with(r, queue_position))
    }

    async fn queue_position(&self, r: &JobRecord) -> Option<u64> {
        match self.inner.store.queue_position(&r.stream, r.seq).await {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(job_id = %r.id, error = %e, "could not read a queued job's position; shown without it");
                None
            }
        }
    }

    /// [`Broker::view`] with the queue position already known.
    fn view_with(&self, r: &JobRecord, queue_position: Option<u64>) -> JobView {
        let processing_time = r.started_at.map(|start| {
            let end = r.finished_at.unwrap_or_else(|| self.inner.config.clock.now());
            (end.millis() - start.millis()).max(0) as f64 / 1000.0
        });
        let result = match (&r.result, r.status) {
            (ResultState::Present(info), JobStatus::Done) => Some(info.clone()),
            _ => None,
        };
        let secs = |a: Timestamp, b: Timestamp| (b.millis() - a.millis()).max(0) as f64 / 1000.0;
        let timings = Timings {
            queue_wait: r.started_at.map(|s| secs(r.created_at, s)),
            comfy_execution: r.comfy_execution_ms.map(|ms| ms as f64 / 1000.0),
            total: r.finished_at.map(|f| secs(r.created_at, f)),
        };
        JobView {
            id: r.id,
            status: r.status,
            created_at: r.created_at,
            prompt: r.prompt.clone(),
            negative_prompt: r.negative_prompt.clone(),
            seed: r.seed,
            workflow: r.workflow.clone(),
            has_result: result.is_some(),
            error_message: r.error_message.clone(),
            processing_time,
            progress: r.progress.clone(),
            queue_position,
            started_at: r.started_at,
            finished_at: r.finished_at,
            attempts: r.attempts,
            version: r.version,
            result,
            timings,
            waiting_reason: if r.status == JobStatus::Queued { self.waiting_reason(&r.workflow) } else { None },
            stream: (!r.stream.is_empty()).then(|| r.stream.clone()),
            mode: r.mode,
            previews: r.previews,
            cancel_reason: r.cancel_reason.clone(),
            superseded_by: r.superseded_by,
            reused_from: r.reused_from,
            params: r.params.clone(),
        }
    }

    /// Keeps a worker's preflight report (what its ComfyUI server can run) while it stays
    /// connected.
    pub fn report_preflight(&self, report: PreflightReport) {
        self.inner.workers.set_report(report);
    }

    /// What the connected workers' servers said about `workflow`, one entry per server that
    /// reported on it.
    pub fn readiness(&self, workflow: &str) -> Vec<ServerReadiness> {
        self.inner
            .workers
            .reports()
            .into_iter()
            .filter_map(|report| {
                let w = report.workflows.into_iter().find(|w| w.name == workflow)?;
                Some(ServerReadiness {
                    worker: report.worker_id,
                    server: report.server,
                    reachable: report.reachable,
                    ready: w.ready,
                    problems: w.problems,
                })
            })
            .collect()
    }

    /// Why a queued job of `workflow` waits: `Some` only when servers reported on the workflow
    /// and none of them can run it (no report says nothing: an old worker may run anything).
    fn waiting_reason(&self, workflow: &str) -> Option<String> {
        /// Enough to see what is missing; a farm of servers missing the same file says it once each.
        const MAX_PROBLEMS: usize = 10;
        let servers = self.readiness(workflow);
        if servers.is_empty() || servers.iter().any(|s| s.ready) {
            return None;
        }
        let problems: Vec<String> = servers
            .iter()
            .flat_map(|s| {
                if s.problems.is_empty() { vec![format!("not ready on {}", s.server)] } else { s.problems.clone() }
            })
            .collect();
        let mut text = problems.iter().take(MAX_PROBLEMS).cloned().collect::<Vec<_>>().join("; ");
        if problems.len() > MAX_PROBLEMS {
            text.push_str(&format!("; …and {} more", problems.len() - MAX_PROBLEMS));
        }
        Some(format!("no server can run {workflow}: {text}"))
    }

    async fn publish(&self, kind: JobEventKind, r: &JobRecord) -> Result<(), BrokerError> {
        self.count(kind, r);
        self.publish_uncounted(kind, r).await
    }

    /// Counts a change in the metrics: a few atomic adds, nothing that waits.
    fn count(&self, kind: JobEventKind, r: &JobRecord) {
        let m = &self.inner.metrics;
        let secs = |a: Timestamp, b: Timestamp| (b.millis() - a.millis()).max(0) as f64 / 1000.0;
        match kind {
            JobEventKind::Started => {
                if let Some(start) = r.started_at {
                    m.job_started(&r.workflow, secs(r.created_at, start));
                }
            }
            JobEventKind::Done => {
                m.job_finished(&r.workflow, "done");
                // A reused result (dedupe) never ran: no timings to observe.
                if let (Some(start), Some(end), Some(ms)) = (r.started_at, r.finished_at, r.comfy_execution_ms) {
                    m.job_timings(&r.workflow, ms as f64 / 1000.0, secs(start, end));
                }
            }
            JobEventKind::Error => m.job_finished(&r.workflow, "error"),
            JobEventKind::Cancelled => {
                let superseded = r.cancel_reason.as_deref() == Some(tdcomfy_api::cancel_reason::SUPERSEDED);
                m.job_finished(&r.workflow, if superseded { "superseded" } else { "cancelled" });
            }
            JobEventKind::Snapshot | JobEventKind::Queued | JobEventKind::Progress | JobEventKind::Deleted => {}
        }
    }

    /// Publishes without counting: for the repeated `cancelled` of a repeated DELETE, which is
    /// no new change.
    async fn publish_uncounted(&self, kind: JobEventKind, r: &JobRecord) -> Result<(), BrokerError> {
        let view = self.view(r).await?;
        // The broker's record of a job's life, one line per change, with the fields a log search
        // joins the worker's lines on (the worker is absent once a requeue cleared the lease).
        let worker = r.lease.as_ref().map(|l| l.owner.as_str());
        if kind == JobEventKind::Progress {
            tracing::debug!(job_id = %r.id, attempt = r.attempts, worker, "job progress");
        } else {
            let event = crate::events::event_name(kind);
            tracing::info!(job_id = %r.id, attempt = r.attempts, worker, status = %r.status, event, "job {event}");
        }
        if !self.inner.hub.publish(JobEvent::new(kind, view)) {
            // Another broker's later change of the job went out here first (its note outran
            // this commit's event): showing this one now would take the job back in time.
            tracing::debug!(job_id = %r.id, version = r.version, "skipped an event a newer state of its job overtook");
        }
        Ok(())
    }

    fn kind_for_status(status: JobStatus) -> JobEventKind {
        match status {
            JobStatus::Queued => JobEventKind::Queued,
            JobStatus::Running => JobEventKind::Started,
            JobStatus::Done => JobEventKind::Done,
            JobStatus::Error => JobEventKind::Error,
            JobStatus::Cancelled => JobEventKind::Cancelled,
        }
    }

    /// Runs a state change to its end on its own task. hyper drops a handler's future when its
    /// client hangs up; a change awaited inline would then stop between its commit and its event,
    /// its worker wake-up or its file deletion. Spawned, it finishes whatever the client does.
    async fn detached<T, F>(&self, change: F) -> T
    where
        T: Send + 'static,
        F: Future<Output = T> + Send + 'static,
    {
        match tokio::spawn(change).await {
            Ok(out) => out,
            // The task is never aborted, so a join error is a panic: let it surface as one.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// Stores a submission: the image file first (durably), then the row.
    pub async fn submit(&self, sub: Submission) -> Result<SubmitOutcome, BrokerError> {
        let this = self.clone();
        self.detached(async move { this.submit_now(sub).await }).await
    }

    async fn submit_now(&self, sub: Submission) -> Result<SubmitOutcome, BrokerError> {
        let id = JobId::new();
        let dedupe_key = sub.dedupe_key();
        // A hit is decided by the store, in the insert's transaction; the file it will own must be
        // there first (files before the record that names them).
        let reuse = match (&dedupe_key, sub.dedupe) {
            (Some(key), true) => self.prepare_reuse(&sub.stream, key, id).await?,
            _ => None,
        };
        let linked = reuse.is_some();
        if let Err(e) = self.inner.blobs.commit(sub.image, BlobKind::Input, id).await {
            if linked {
                let _ = self.inner.blobs.remove(BlobKind::Result, id).await;
            }
            return Err(e.into());
        }
        let outcome = self
            .inner
            .store
            .insert(NewJob {
                id,
                prompt: sub.prompt,
                negative_prompt: sub.negative_prompt,
                seed: sub.seed,
                workflow: sub.workflow,
                params: sub.params,
                input: sub.input,
                idempotency: sub.idempotency,
                stream: sub.stream,
                mode: sub.mode,
                preempt: sub.preempt,
                previews: sub.previews,
                dedupe_key,
                dedupe: sub.dedupe,
                reuse,
            })
            .await;
        let remove_own = |input: bool, result: bool| async move {
            if input {
                self.inner.blobs.remove(BlobKind::Input, id).await?;
            }
            if result {
                self.inner.blobs.remove(BlobKind::Result, id).await?;
            }
            Ok::<(), BrokerError>(())
        };
        let inserted = match outcome {
            Ok(InsertOutcome::Created(ins)) => ins,
            Ok(InsertOutcome::Replayed(r)) => {
                remove_own(true, linked).await?;
                return self.accepted(&r, true, Vec::new()).await;
            }
            Ok(InsertOutcome::KeyConflict) => {
                remove_own(true, linked).await?;
                return Ok(SubmitOutcome::KeyConflict);
            }
            Err(e) => {
                let _ = remove_own(true, linked).await;
                return Err(e.into());
            }
        };
        // The store gave these files up in the commit; a crash before they go leaves them to
        // `reconcile_files`.
        // The job is committed: from here a file that cannot be deleted is logged, never the
        // client's error (its retry would make a second job), and every event still goes out.
        if let Err(e) = remove_own(inserted.reused, linked && !inserted.reused).await {
            tracing::warn!(job_id = %id, error = %e, "could not delete a file the new job gave up; left for the next start");
        }
        let mut superseded = Vec::with_capacity(inserted.superseded.len());
        for (old, previous) in &inserted.superseded {
            for kind in [BlobKind::Input, BlobKind::Result] {
                if let Err(e) = self.inner.blobs.remove(kind, old.id).await {
                    tracing::warn!(job_id = %old.id, error = %e, "could not delete a superseded job's file; left for the next start");
                }
            }
            if *previous == JobStatus::Running {
                tracing::info!(job_id = %old.id, by = %id, "running job preempted by a newer job of its stream");
            }
            self.publish(JobEventKind::Cancelled, old).await?;
            superseded.push(old.id);
        }
        let record = inserted.record;
        self.inner.metrics.job_submitted(&record.workflow);
        if inserted.reused {
            self.publish(JobEventKind::Done, &record).await?;
        } else {
            // Wake first: nothing after the commit may keep the job from a waiting worker.
            self.inner.hub.job_queued();
            self.publish(JobEventKind::Queued, &record).await?;
        }
        self.accepted(&record, false, superseded).await
    }

    /// Links the result of the stream's last finished job to `id` when that job has the same
    /// dedupe key and still has its result; `None` otherwise (the job runs as usual).
    async fn prepare_reuse(&self, stream: &str, key: &str, id: JobId) -> Result<Option<Reuse>, BrokerError> {
        let Some((from, Some(last_key), true)) = self.inner.store.last_done_in_stream(stream.to_owned()).await? else {
            return Ok(None);
        };
        if last_key != key {
            return Ok(None);
        }
        let Some(ResultState::Present(result)) = self.inner.store.get(from).await?.map(|r| r.result) else {
            return Ok(None);
        };
        match self.inner.blobs.link(BlobKind::Result, from, id).await {
            Ok(()) => Ok(Some(Reuse { from, result })),
            // Deleted meanwhile (DELETE, RESULT_TTL): nothing to reuse, the job runs.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn accepted(
        &self,
        record: &JobRecord,
        replayed: bool,
        superseded: Vec<JobId>,
    ) -> Result<SubmitOutcome, BrokerError> {
        let view = self.view(record).await?;
        let message = if replayed {
            "Job already submitted with this Idempotency-Key".to_owned()
        } else if let Some(from) = record.reused_from {
            format!("Nothing changed since job {from}: its result is reused")
        } else {
            "Job queued".to_owned()
        };
        Ok(SubmitOutcome::Accepted {
            response: SubmitResponse {
                job_id: record.id,
                status: view.status,
                message,
                queue_position: view.queue_position,
                workflow: record.workflow.clone(),
                reused_from: record.reused_from,
                superseded,
            },
            replayed,
        })
    }

    /// True when a job was stored under this `Idempotency-Key`.
    pub async fn knows_idempotency_key(&self, key: &str) -> Result<bool, BrokerError> {
        Ok(self.inner.store.knows_idempotency_key(key.to_owned()).await?)
    }

    /// A place for one more event stream, or `None` when `MAX_SUBSCRIBERS` are open. The stream
    /// holds the slot for its life.
    pub fn subscriber_slot(&self, kind: Subscriber) -> Option<SubscriberSlot> {
        let count = self.inner.subscribers.clone();
        let limit = self.inner.config.max_subscribers;
        count
            .fetch_update(std::sync::atomic::Ordering::AcqRel, std::sync::atomic::Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| {
                let gauge = self.inner.metrics.subscribers(kind).clone();
                gauge.inc();
                SubscriberSlot { count, gauge }
            })
    }

    /// This broker's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// What `/metrics` shows now: the counters, and gauges read from the broker's state.
    pub async fn render_metrics(&self) -> Result<String, BrokerError> {
        let counts = self.inner.store.counts().await?;
        let reports = self.inner.workers.reports();
        let mut up: Vec<&str> = reports.iter().filter(|r| r.reachable).map(|r| r.server.as_str()).collect();
        up.sort_unstable();
        up.dedup();
        Ok(self.inner.metrics.render(crate::metrics::ScrapeState {
            queued: self.queued_count().await?,
            running: counts.running,
            workers_connected: self.inner.workers.connected().len() as u64,
            servers_up: up.len() as u64,
        }))
    }

    /// Number of queued jobs.
    pub async fn queued_count(&self) -> Result<u64, BrokerError> {
        Ok(self.inner.store.queued_count().await?)
    }

    /// One job.
    pub async fn job(&self, id: JobId) -> Result<Option<JobRecord>, BrokerError> {
        Ok(self.inner.store.get(id).await?)
    }

    /// A job's view, waiting up to `wait` for its version to pass `since` (default: its version now).
    pub async fn wait_for_change(
        &self,
        id: JobId,
        since: Option<u64>,
        wait: Duration,
    ) -> Result<Option<JobView>, BrokerError> {
        // Subscribe before reading, so a change between the read and the wait is not missed.
        let mut rx = self.inner.hub.subscribe();
        let mut resyncs = self.inner.hub.resyncs();
        let Some(record) = self.job(id).await? else {
            return Ok(None);
        };
        // Without `since`, a finished job answers at once (it will not change but for its files);
        // with `since`, the caller asked to wait for a newer version, whatever the status.
        let answer_now = match since {
            Some(since) => record.version > since,
            None => record.status.is_terminal(),
        };
        let since = since.unwrap_or(record.version);
        if answer_now || wait.is_zero() {
            return Ok(Some(self.view(&record).await?));
        }
        let deadline = Instant::now() + wait;
        loop {
            let next = tokio::select! {
                next = tokio::time::timeout_at(deadline, rx.recv()) => next,
                // Other brokers' changes may have been missed: re-read below.
                _ = crate::events::resync_wanted(&mut resyncs) => break,
                _ = self.inner.shutdown.cancelled() => break,
            };
            match next {
                Err(_) => break,
                Ok(Ok(ev)) if ev.job_id() == id && ev.event.job.version > since => {
                    return Ok(Some(ev.event.job.clone()));
                }
                Ok(Ok(_)) => {}
                // Fell behind the channel: re-read below rather than trust what was skipped.
                Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => break,
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => break,
            }
        }
        match self.job(id).await? {
            Some(r) => Ok(Some(self.view(&r).await?)),
            None => Ok(None),
        }
    }

    /// Jobs newest first.
    pub async fn list(&self, status: Option<JobStatus>, limit: u32) -> Result<Vec<JobView>, BrokerError> {
        let records = self.inner.store.list(status, limit).await?;
        // One batch for every queued job of the list (the dashboard asks for 500 every 5 s),
        // best-effort like a single view's.
        let queued: Vec<(String, i64)> =
            records.iter().filter(|r| r.status == JobStatus::Queued).map(|r| (r.stream.clone(), r.seq)).collect();
        let mut positions = match self.inner.store.queue_positions(&queued).await {
            Ok(p) => p.into_iter().map(Some).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "could not read the queued jobs' positions; listed without them");
                vec![None; queued.len()]
            }
        }
        .into_iter();
        Ok(records
            .iter()
            .map(|r| {
                let position = if r.status == JobStatus::Queued { positions.next().flatten() } else { None };
                self.view_with(r, position)
            })
            .collect())
    }

    /// Counts, connected workers and the brokers alive on the database.
    pub async fn health(&self) -> Result<Health, BrokerError> {
        let c = self.inner.store.counts().await?;
        let workers = self.inner.workers.connected();
        let brokers = self
            .inner
            .brokers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|b| tdcomfy_api::BrokerInfo {
                id: b.id.clone(),
                addr: b.addr.clone(),
                started_at: b.started_at,
                last_seen: b.last_seen,
                this: b.id == self.inner.me.id,
            })
            .collect();
        Ok(Health {
            status: "healthy".into(),
            jobs_count: c.queued + c.running + c.done + c.error + c.cancelled,
            queued: c.queued,
            running: c.running,
            done: c.done,
            error: c.error,
            cancelled: c.cancelled,
            workers_connected: workers.len() as u64,
            workers,
            store: self.inner.store.engine().to_owned(),
            brokers,
        })
    }

    /// Cancels a job (or, when it already ended, deletes its files). `None` for an unknown id.
    pub async fn cancel(&self, id: JobId) -> Result<Option<DeleteResponse>, BrokerError> {
        let this = self.clone();
        self.detached(async move { this.cancel_now(id).await }).await
    }

    async fn cancel_now(&self, id: JobId) -> Result<Option<DeleteResponse>, BrokerError> {
        let outcome = match self.inner.store.cancel(id).await {
            Err(StoreError::NotFound) => return Ok(None),
            other => other?,
        };
        self.inner.blobs.remove(BlobKind::Input, id).await?;
        self.inner.blobs.remove(BlobKind::Result, id).await?;
        let r = &outcome.record;
        let message = match (outcome.previous, outcome.changed) {
            (JobStatus::Queued, true) => "Job cancelled before it started".to_owned(),
            (JobStatus::Running, true) => "Job cancelled; its worker stops it at the next heartbeat".to_owned(),
            (_, true) => format!("Job had already ended ({}); its files were deleted", outcome.previous),
            (_, false) => format!("Nothing to do: job is {} and its files are gone", r.status),
        };
        if outcome.changed {
            let kind = if matches!(outcome.previous, JobStatus::Queued | JobStatus::Running) {
                JobEventKind::Cancelled
            } else {
                JobEventKind::Deleted
            };
            self.publish(kind, r).await?;
        } else if r.status == JobStatus::Cancelled {
            // A client that asks again may have missed the event (it hung up, its stream broke):
            // repeating the DELETE is its way to hear the cancellation, so say it again.
            self.publish_uncounted(JobEventKind::Cancelled, r).await?;
        }
        Ok(Some(DeleteResponse { job_id: id, status: r.status, message }))
    }

    /// Waits up to `wait` for a queued job and leases it to `worker`.
    ///
    /// The wait ends with the request (a worker that hung up claims nothing), but a claim, once
    /// made, is finished on its own task; if the request is gone by then, [`LeaseHandover`] hands
    /// the job back to the queue without counting the attempt.
    ///
    /// With `workflows` (the worker's preflight), only jobs of those workflows are leased.
    pub async fn lease(
        &self,
        worker: &str,
        wait: Duration,
        workflows: Option<Vec<String>>,
    ) -> Result<Option<Lease>, BrokerError> {
        self.lease_as(worker, wait, LeaseWish { workflows, prefetch: false, last_workflow: None }).await
    }

    /// [`Broker::lease`] for a lease loop that says more about its server: whether it is busy
    /// (`prefetch`: the job would wait in ComfyUI's queue) and which workflow it ran last. Among
    /// the loops waiting at once, the next job goes to an idle one before a busy one, and to one
    /// whose last workflow is the job's (its models are loaded) before one whose is not: a loop
    /// that sees a better-suited one waiting lets it claim first.
    pub async fn lease_as(&self, worker: &str, wait: Duration, wish: LeaseWish) -> Result<Option<Lease>, BrokerError> {
        let _waiting = self.inner.workers.waiting(worker);
        let me = self.inner.workers.wait_for_lease(crate::workers::Wish {
            prefetch: wish.prefetch,
            last_workflow: wish.last_workflow.clone(),
            workflows: wish.workflows.clone(),
        });
        // Whoever let this loop go first is woken when it leaves, claimed or not.
        let _wake = WakeOthers { broker: self, me };
        let deadline = Instant::now() + wait;
        let handover =
            LeaseHandover { broker: self.clone(), state: Arc::new(std::sync::Mutex::new(Handover::Waiting)) };
        let mut yielded = false;
        loop {
            // Register for the wake-up before looking, so a job queued in between is not missed.
            let signal = self.inner.hub.queued_signal().notified();
            tokio::pin!(signal);
            signal.as_mut().enable();
            // Once per wake-up at most, and never twice in a row without a claim attempt: a
            // better-suited loop that does not take the job (it left, or its own claim found
            // another) costs this one at most YIELD_LIMIT.
            if !yielded && self.someone_better(me, &wish).await? {
                yielded = true;
                tokio::select! {
                    _ = &mut signal => {}
                    _ = tokio::time::sleep(YIELD_LIMIT) => {}
                    _ = tokio::time::sleep_until(deadline) => return Ok(None),
                    _ = self.inner.shutdown.cancelled() => return Ok(None),
                }
                continue;
            }
            yielded = false;
            let (this, worker_name, state) = (self.clone(), worker.to_owned(), handover.state.clone());
            let (allowed, prefetch) = (wish.workflows.clone(), wish.prefetch);
            let claimed =
                self.detached(async move { this.claim_now(worker_name, state, allowed, prefetch).await }).await?;
            if let Some(lease) = claimed {
                handover.received();
                return Ok(Some(lease));
            }
            tokio::select! {
                _ = &mut signal => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(None),
                _ = self.inner.shutdown.cancelled() => return Ok(None),
            }
        }
    }

    /// Whether another waiting loop suits the job this one would claim now better than it does
    /// (asked only when another loop waits at all, so a lone worker pays nothing).
    async fn someone_better(&self, me: u64, wish: &LeaseWish) -> Result<bool, BrokerError> {
        if self.inner.workers.lease_waiters() < 2 {
            return Ok(false);
        }
        let Some(workflow) = self.inner.store.peek_next(wish.workflows.clone()).await? else { return Ok(false) };
        Ok(self.inner.workers.better_waiter(me, &workflow))
    }

    async fn claim_now(
        &self,
        worker: String,
        handover: Arc<std::sync::Mutex<Handover>>,
        allowed_workflows: Option<Vec<String>>,
        prefetch: bool,
    ) -> Result<Option<Lease>, BrokerError> {
        let lease_ms = self.inner.config.lease_ttl.as_millis() as i64;
        let r = loop {
            let Some(r) =
                self.inner.store.claim_next_with(worker.clone(), lease_ms, allowed_workflows.clone(), prefetch).await?
            else {
                return Ok(None);
            };
            if !self.answered_by_its_twin(&r).await? {
                break r;
            }
        };
        self.inner.workers.touch(&worker, Some(r.id));
        self.publish(JobEventKind::Started, &r).await?;
        let lease = self.lease_of(&r);
        let expiry = r.lease.as_ref().and_then(|l| l.expires_at);
        let abandoned = {
            let mut state = handover.lock().unwrap_or_else(|p| p.into_inner());
            match *state {
                Handover::Abandoned => true,
                _ => {
                    *state = Handover::Claimed(r.id, lease.lease_token.clone(), expiry);
                    false
                }
            }
        };
        if abandoned {
            self.release_unreceived(r.id, lease.lease_token.clone(), expiry).await?;
            return Ok(None);
        }
        self.unacknowledged()
            .insert(r.id, Unacknowledged { token: lease.lease_token.clone(), at: Instant::now(), expiry });
        Ok(Some(lease))
    }

    /// A `dedupe` job queued while its twin (same frame and settings) was still running finds the
    /// twin's result when it is claimed: it is finished with it on the spot, and the worker gets
    /// the next job instead. True when that happened.
    async fn answered_by_its_twin(&self, r: &JobRecord) -> Result<bool, BrokerError> {
        let (true, Some(key), Some(lease)) = (r.dedupe, r.dedupe_key.as_deref(), r.lease.as_ref()) else {
            return Ok(false);
        };
        let Some(reuse) = self.prepare_reuse(&r.stream, key, r.id).await? else { return Ok(false) };
        match self.inner.store.complete_reused(r.id, lease.token.clone(), reuse).await? {
            Some(done) => {
                // Given up in the commit; a crash before it goes leaves it to `reconcile_files`.
                if let Err(e) = self.inner.blobs.remove(BlobKind::Input, r.id).await {
                    tracing::warn!(job_id = %r.id, error = %e, "could not delete a reused job's frame; left for the next start");
                }
                self.publish(JobEventKind::Done, &done).await?;
                Ok(true)
            }
            None => {
                self.inner.blobs.remove(BlobKind::Result, r.id).await?;
                Ok(false)
            }
        }
    }

    fn unacknowledged(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<JobId, Unacknowledged>> {
        self.inner.unacknowledged.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The worker showed it has the lease: it is no longer a candidate for [`Self::sweep`]'s
    /// hand-back of unreceived leases.
    fn acknowledge(&self, id: JobId) {
        self.unacknowledged().remove(&id);
    }

    /// How long a lease may go without its worker's first call before it counts as never received:
    /// a third of `LEASE_TTL`, within 1 to 10 s (workers call at once: input download, heartbeat).
    fn acknowledge_window(&self) -> Duration {
        (self.inner.config.lease_ttl / 3).clamp(Duration::from_secs(1), Duration::from_secs(10))
    }

    /// Hands back leases whose worker never called (their answer was lost with the connection).
    async fn release_unacknowledged(&self) -> Result<(), BrokerError> {
        let window = self.acknowledge_window();
        let stale: Vec<(JobId, Unacknowledged)> = {
            let mut map = self.unacknowledged();
            let ids: Vec<JobId> = map.iter().filter(|(_, u)| u.at.elapsed() >= window).map(|(id, _)| *id).collect();
            ids.into_iter().filter_map(|id| map.remove(&id).map(|u| (id, u))).collect()
        };
        for (id, u) in stale {
            self.release_unreceived(id, u.token, u.expiry).await?;
        }
        Ok(())
    }

    /// Puts a job whose lease never reached its worker back in the queue, attempt uncounted.
    async fn release_unreceived(
        &self,
        id: JobId,
        token: LeaseToken,
        claimed_expiry: Option<Timestamp>,
    ) -> Result<(), BrokerError> {
        self.acknowledge(id);
        if let Some(r) = self.inner.store.release_unreceived(id, token, claimed_expiry).await? {
            tracing::info!(job_id = %id, status = %r.status, "the worker hung up before receiving its lease: job queued again (or superseded)");
            self.inner.workers.release(id);
            // Wake first: nothing after the commit may keep the job from a waiting worker.
            if r.status == JobStatus::Queued {
                self.inner.hub.job_queued();
            }
            self.drop_frame_if_superseded(&r).await;
            self.publish(Self::kind_for_status(r.status), &r).await?;
        }
        Ok(())
    }

    fn lease_of(&self, r: &JobRecord) -> Lease {
        Lease {
            job_id: r.id,
            lease_token: r.lease.as_ref().map(|l| l.token.clone()).unwrap_or_default(),
            lease_expires_in: self.inner.config.lease_ttl.as_secs_f64(),
            attempt: r.attempts,
            prompt: r.prompt.clone(),
            negative_prompt: r.negative_prompt.clone(),
            seed: r.seed,
            workflow: r.workflow.clone(),
            params: r.params.clone(),
            input: r.input.clone(),
            job_timeout: self.inner.config.job_timeout.as_secs_f64(),
            max_result_bytes: Some(self.inner.config.max_result_bytes),
            previews: r.previews,
        }
    }

    /// Checks a lease before serving the input or accepting a result.
    pub async fn check_lease(&self, id: JobId, token: &LeaseToken) -> Result<JobRecord, BrokerError> {
        let job = self.inner.store.check_lease(id, token).await?;
        self.acknowledge(id);
        Ok(job)
    }

    /// Renews a lease, records progress; true when the job was cancelled.
    pub async fn heartbeat(
        &self,
        id: JobId,
        token: LeaseToken,
        progress: Option<Progress>,
    ) -> Result<bool, BrokerError> {
        self.heartbeat_with(id, token, Beat { progress, started: false, wait: Duration::ZERO }).await
    }

    /// [`Broker::heartbeat`] that may also say ComfyUI started a prefetched job, and may hold the
    /// answer up to `wait` (capped at a third of `LEASE_TTL`, after renewing) until the job
    /// changes: a prefetched job's worker hears of a cancel or supersede at once.
    pub async fn heartbeat_with(&self, id: JobId, token: LeaseToken, beat: Beat) -> Result<bool, BrokerError> {
        // Subscribed before the renewal, so a cancel committed right after it is not missed.
        let mut events = (!beat.wait.is_zero()).then(|| (self.inner.hub.subscribe(), self.inner.hub.resyncs()));
        let this = self.clone();
        let renew_token = token.clone();
        let cancelled = self
            .detached(async move { this.heartbeat_now(id, renew_token, beat.progress, beat.started).await })
            .await?;
        let Some((events, resyncs)) = events.as_mut().filter(|_| !cancelled) else { return Ok(cancelled) };
        let wait = beat.wait.min(self.inner.config.lease_ttl / 3);
        let changed = async {
            loop {
                let next = tokio::select! {
                    next = events.recv() => next,
                    // Other brokers' changes (a cancel) may have been missed: re-read below.
                    _ = crate::events::resync_wanted(resyncs) => return,
                };
                match next {
                    Ok(ev) if ev.job_id() == id => return,
                    Ok(_) => {}
                    // Fell behind or closed: re-read below rather than guess.
                    Err(_) => return,
                }
            }
        };
        tokio::select! {
            _ = changed => {}
            _ = tokio::time::sleep(wait) => return Ok(false),
            _ = self.inner.shutdown.cancelled() => return Ok(false),
        }
        match self.inner.store.check_lease(id, &token).await {
            // Done meanwhile (its result arrived while this poll waited): nothing to stop.
            Ok(_) | Err(StoreError::AlreadyDone) => Ok(false),
            Err(StoreError::Cancelled) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    async fn heartbeat_now(
        &self,
        id: JobId,
        token: LeaseToken,
        progress: Option<Progress>,
        started: bool,
    ) -> Result<bool, BrokerError> {
        let lease_ms = self.inner.config.lease_ttl.as_millis() as i64;
        let outcome = self.inner.store.heartbeat(id, token, progress, lease_ms, started).await?;
        self.acknowledge(id);
        if outcome.unblocked {
            // The job's stream held its next job back while this one waited in ComfyUI's queue;
            // now it may be claimed, and a worker waiting for work must not sleep through it.
            self.inner.hub.job_queued();
        }
        if let Some(r) = &outcome.changed {
            if let Some(lease) = &r.lease {
                self.inner.workers.touch(&lease.owner, Some(id));
            }
            self.publish(JobEventKind::Progress, r).await?;
        }
        Ok(outcome.cancelled)
    }

    /// Renews a lease every third of `LEASE_TTL` for as long as `received` (bytes of an upload
    /// under that lease) keeps growing. Returns only when the lease ended: the job was cancelled
    /// ([`StoreError::Cancelled`]) or the lease lost, so the upload can stop early.
    pub async fn renew_while_receiving(
        &self,
        id: JobId,
        token: LeaseToken,
        received: Arc<std::sync::atomic::AtomicU64>,
    ) -> BrokerError {
        let every = self.inner.config.lease_ttl / 3;
        let mut seen = 0;
        loop {
            tokio::time::sleep(every).await;
            let now = received.load(std::sync::atomic::Ordering::Relaxed);
            if now == seen {
                continue; // a stalled upload does not hold the lease: the sweep may take it back
            }
            seen = now;
            let lease_ms = self.inner.config.lease_ttl.as_millis() as i64;
            match self.inner.store.renew_for_upload(id, token.clone(), lease_ms).await.map_err(BrokerError::from) {
                Ok(false) => {}
                Ok(true) => return BrokerError::Store(StoreError::Cancelled),
                Err(e @ BrokerError::Store(StoreError::LeaseLost { .. } | StoreError::NotFound)) => return e,
                // A fault of our own (disk, database): the upload goes on; complete() decides.
                Err(e) => tracing::warn!(job_id = %id, error = %e, "could not renew the lease of an upload"),
            }
        }
    }

    /// Finishes a job with a staged result file. On a refused lease the file is discarded.
    pub async fn complete(
        &self,
        id: JobId,
        token: LeaseToken,
        staged: StagedBlob,
        content_type: String,
        comfy_execution_ms: Option<u64>,
    ) -> Result<JobStatus, BrokerError> {
        let this = self.clone();
        self.detached(async move { this.complete_now(id, token, staged, content_type, comfy_execution_ms).await }).await
    }

    async fn complete_now(
        &self,
        id: JobId,
        token: LeaseToken,
        staged: StagedBlob,
        content_type: String,
        comfy_execution_ms: Option<u64>,
    ) -> Result<JobStatus, BrokerError> {
        let size = staged.size;
        // Re-check right before committing: the job may have been cancelled during the upload.
        if let Err(e) = self.inner.store.check_lease(id, &token).await {
            self.inner.blobs.discard(staged).await;
            if let StoreError::AlreadyDone = e {
                return Ok(JobStatus::Done);
            }
            return Err(e.into());
        }
        self.inner.blobs.commit(staged, BlobKind::Result, id).await?;
        match self.inner.store.complete(id, token, ResultInfo { content_type, size }, comfy_execution_ms).await {
            Ok((r, changed)) => {
                self.inner.workers.release(id);
                if changed {
                    self.publish(JobEventKind::Done, &r).await?;
                }
                Ok(r.status)
            }
            Err(e) => {
                self.inner.blobs.remove(BlobKind::Result, id).await?;
                Err(e.into())
            }
        }
    }

    /// Records a worker's failure report.
    pub async fn fail(
        &self,
        id: JobId,
        token: LeaseToken,
        message: String,
        retryable: bool,
        handed_back: bool,
    ) -> Result<JobStatus, BrokerError> {
        let this = self.clone();
        self.detached(async move { this.fail_now(id, token, message, retryable, handed_back).await }).await
    }

    async fn fail_now(
        &self,
        id: JobId,
        token: LeaseToken,
        message: String,
        retryable: bool,
        handed_back: bool,
    ) -> Result<JobStatus, BrokerError> {
        let (r, changed) =
            self.inner.store.fail(id, token, message, retryable, handed_back, self.inner.config.max_attempts).await?;
        self.inner.workers.release(id);
        // A repeated report changes nothing, so it is no event (subscribers would see the job fail twice).
        if changed {
            // Wake first: nothing after the commit may keep the job from a waiting worker.
            if r.status == JobStatus::Queued {
                self.inner.hub.job_queued();
            }
            self.drop_frame_if_superseded(&r).await;
            self.publish(Self::kind_for_status(r.status), &r).await?;
        }
        Ok(r.status)
    }

    /// One pass of housekeeping: expired leases back to the queue, over-long attempts failed,
    /// finished jobs' files past `RESULT_TTL` deleted, records past `JOB_RETENTION` deleted.
    ///
    /// Every step runs whatever the others did: a job that cannot be changed, or a file that
    /// cannot be deleted, is logged and skipped, and workers are woken for requeued jobs before
    /// anything else can fail. Returns the first error, after the whole pass.
    pub async fn sweep(&self) -> Result<(), BrokerError> {
        let cfg = &self.inner.config;
        let mut first_error: Option<BrokerError> = None;
        let mut note = |e: BrokerError| {
            tracing::error!(error = %e, "housekeeping step failed; the others went on");
            first_error.get_or_insert(e);
        };
        if let Err(e) = self.release_unacknowledged().await {
            note(e);
        }
        if self.store_was_out_long() {
            // The store was unreachable for more than LEASE_TTL/3: workers' heartbeats failed
            // with it, so their leases lapsed while they kept working. Expiring them now would
            // requeue every running job and refuse its result as `lease_lost`; they get one
            // LEASE_TTL to check in instead, as after a restart (`resume_running`). Before
            // `expire_leases`, never after. The price, when only this broker lost the database
            // while others kept it: the leases they were watching are renewed too, so a job
            // whose worker died meanwhile is requeued up to one LEASE_TTL later than it would be.
            match self
                .inner
                .store
                .resume_running(cfg.lease_ttl.as_millis() as i64, cfg.job_timeout.as_millis() as i64)
                .await
            {
                Ok(n) => {
                    self.store_answered(true);
                    self.inner.store_health.lock().unwrap_or_else(|p| p.into_inner()).resume_pending = false;
                    tracing::warn!(
                        jobs = n,
                        "the store is back after an outage longer than LEASE_TTL/3: running jobs keep their leases for one LEASE_TTL"
                    );
                }
                Err(e) => {
                    self.store_answered(false);
                    // Still out: expiring leases now would be the same mistake next time it works.
                    note(e.into());
                    return first_error.map_or(Ok(()), Err);
                }
            }
        }
        let expired = self.inner.store.expire_leases(cfg.max_attempts).await;
        self.store_answered(expired.is_ok());
        match expired {
            Ok(swept) => {
                let mut requeued = false;
                for r in &swept.changed {
                    tracing::warn!(job_id = %r.id, status = %r.status, attempts = r.attempts, "lease expired");
                    requeued |= r.status == JobStatus::Queued;
                }
                // Wake before publishing, so nothing below can hold a requeued job from a waiting worker.
                if requeued || !swept.failed.is_empty() {
                    self.inner.hub.job_queued();
                }
                for r in &swept.changed {
                    self.drop_frame_if_superseded(r).await;
                }
                self.publish_swept(swept, "expiring its lease").await;
            }
            Err(e) => note(e.into()),
        }
        match self.inner.store.time_out_running(cfg.job_timeout.as_millis() as i64).await {
            Ok(swept) => {
                for r in &swept.changed {
                    tracing::warn!(job_id = %r.id, "job timed out");
                }
                self.publish_swept(swept, "timing it out").await;
            }
            Err(e) => note(e.into()),
        }
        if let Some(ttl) = cfg.result_ttl {
            match self.inner.store.files_expired(ttl.as_millis() as i64).await {
                Ok(ids) => {
                    for id in ids {
                        if let Err(e) = self.expire_files(id).await {
                            tracing::error!(job_id = %id, error = %e, "could not delete the files of a job past RESULT_TTL; skipped");
                        }
                    }
                }
                Err(e) => note(e.into()),
            }
        }
        if let Err(e) = self.inner.store.forget_old_turns(TURN_MEMORY).await {
            note(e.into());
        }
        if let Some(retention) = cfg.job_retention
            && let Err(e) = self.expire_records(retention.as_millis() as i64).await
        {
            note(e);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Records whether a sweep or presence call reached the store.
    fn store_answered(&self, ok: bool) {
        let mut h = self.inner.store_health.lock().unwrap_or_else(|p| p.into_inner());
        if ok {
            if h.failing && h.last_ok.elapsed() > self.inner.config.lease_ttl / 3 {
                h.resume_pending = true;
            }
            h.last_ok = Instant::now();
            h.failing = false;
        } else {
            h.failing = true;
        }
    }

    /// True while the store has failed since it last answered, longer ago than `LEASE_TTL`/3
    /// (the heartbeat interval workers keep): their leases may have lapsed meanwhile. Only a
    /// failure counts, never a slow sweep interval, so leases of workers that really stopped
    /// still expire.
    fn store_was_out_long(&self) -> bool {
        let h = self.inner.store_health.lock().unwrap_or_else(|p| p.into_inner());
        h.resume_pending || (h.failing && h.last_ok.elapsed() > self.inner.config.lease_ttl / 3)
    }

    async fn publish_swept(&self, swept: crate::store::Swept, doing: &str) {
        for (seq, e) in swept.failed {
            tracing::error!(seq, error = %e, "housekeeping could not finish {doing} for a job; skipped");
        }
        for r in swept.changed {
            if let Err(e) = self.publish(Self::kind_for_status(r.status), &r).await {
                tracing::error!(job_id = %r.id, error = %e, "could not publish a housekeeping change");
            }
        }
    }

    /// A job of a `latest` stream that would have been queued again is cancelled as superseded
    /// instead (see `store::requeue`); the store gave its frame up in that commit.
    async fn drop_frame_if_superseded(&self, r: &JobRecord) {
        if r.status != JobStatus::Cancelled {
            return;
        }
        tracing::info!(job_id = %r.id, by = ?r.superseded_by, "job superseded instead of queued again");
        if let Err(e) = self.inner.blobs.remove(BlobKind::Input, r.id).await {
            tracing::warn!(job_id = %r.id, error = %e, "could not delete a superseded job's frame; left for the next start");
        }
    }

    /// Files first, record second: once a job says it has no result, the file is gone.
    async fn expire_files(&self, id: JobId) -> Result<(), BrokerError> {
        self.inner.blobs.remove(BlobKind::Input, id).await?;
        self.inner.blobs.remove(BlobKind::Result, id).await?;
        if let Some(r) = self.inner.store.mark_files_deleted(id).await? {
            self.publish(JobEventKind::Deleted, &r).await?;
        }
        Ok(())
    }

    /// Deletes the records (and any files left) of jobs finished longer than `JOB_RETENTION` ago.
    /// No event is published: the job is past any client's interest, and its GET answers 404.
    async fn expire_records(&self, retention_ms: i64) -> Result<(), BrokerError> {
        let expired = self.inner.store.records_expired(retention_ms).await?;
        if expired.is_empty() {
            return Ok(());
        }
        let mut gone = Vec::with_capacity(expired.len());
        for (id, has_files) in expired {
            if !has_files {
                gone.push(id);
                continue;
            }
            let removed = async {
                self.inner.blobs.remove(BlobKind::Input, id).await?;
                self.inner.blobs.remove(BlobKind::Result, id).await
            };
            match removed.await {
                Ok(()) => gone.push(id),
                // The record stays until its files can go, so no file outlives its record.
                Err(e) => {
                    tracing::error!(job_id = %id, error = %e, "could not delete the files of a job past JOB_RETENTION; kept")
                }
            }
        }
        let n = self.inner.store.delete_records(gone, retention_ms).await?;
        // With several brokers sweeping, another one may have deleted them first: nothing to say.
        if n > 0 {
            tracing::info!(jobs = n, "deleted records past JOB_RETENTION");
        }
        Ok(())
    }
}

/// Claims after which a stream not served since is forgotten by the round-robin (it then counts
/// as never served, which is where its old turn placed it anyway): bounds the turns kept to the
/// streams active recently, however many stream ids clients have used.
const TURN_MEMORY: i64 = 10_000;

/// Deletes the files in `inputs/` and `results/` (objects under those prefixes) that no job owns:
/// left by a crash between a file's rename and its row's commit, or between a commit that gave a
/// file up (cancel, expiry) and the file's removal. One pass at start, before any request, so no
/// upload of this broker is in flight; each file costs one point lookup. On shared storage
/// (`STORAGE_URL`) another broker on the same database may be between its file and its row, so
/// only orphans older than `SHARED_ORPHAN_GRACE` go; a younger one stays to the next start.
/// An orphan can never make a job wrong either way: job ids are fresh random UUIDs, so no later
/// row names it.
async fn reconcile_files(store: &Store, blobs: &Blobs) -> Result<(), BrokerError> {
    let mut removed = 0u64;
    let grace = if blobs.is_shared() { crate::blobs::SHARED_ORPHAN_GRACE } else { Duration::ZERO };
    let now = std::time::SystemTime::now();
    for kind in [BlobKind::Input, BlobKind::Result] {
        let listed: Vec<JobId> = blobs
            .list(kind)
            .await?
            .into_iter()
            .filter(|(_, modified)| {
                grace.is_zero() || modified.and_then(|m| now.duration_since(m).ok()).is_none_or(|age| age >= grace)
            })
            .map(|(id, _)| id)
            .collect();
        let owned = store.owned_files(listed.clone()).await?;
        for id in listed {
            let keep = owned.get(&id).is_some_and(|&(input, result)| match kind {
                BlobKind::Input => input,
                BlobKind::Result => result,
            });
            if !keep {
                blobs.remove(kind, id).await?;
                removed += 1;
            }
        }
    }
    if removed > 0 {
        tracing::warn!(files = removed, "removed files no job owns (left by a crash)");
    }
    Ok(())
}

/// A lease handed out whose worker has not called back yet.
struct Unacknowledged {
    token: LeaseToken,
    at: Instant,
    /// The lease's expiry as claimed; a renewal moves it, which proves the lease arrived.
    expiry: Option<Timestamp>,
}

/// Where a claim stands relative to the lease request that asked for it.
enum Handover {
    /// The request is still waiting; nothing claimed.
    Waiting,
    /// A job was claimed for this request (with the lease's expiry as claimed).
    Claimed(JobId, LeaseToken, Option<Timestamp>),
    /// The request went away (its future was dropped).
    Abandoned,
    /// The lease was returned to the handler, which answers the worker with it.
    Received,
}

/// Dropped with the lease request's future: if that happens before the handler took the lease
/// (the worker hung up between the claim's commit and the answer), the claim is undone.
struct LeaseHandover {
    broker: Broker,
    state: Arc<std::sync::Mutex<Handover>>,
}

impl LeaseHandover {
    fn received(&self) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = Handover::Received;
    }
}

impl Drop for LeaseHandover {
    fn drop(&mut self) {
        let previous =
            std::mem::replace(&mut *self.state.lock().unwrap_or_else(|p| p.into_inner()), Handover::Abandoned);
        if let Handover::Claimed(id, token, expiry) = previous {
            let broker = self.broker.clone();
            // Drop cannot await; the release is a state change like any other, on its own task.
            tokio::spawn(async move {
                if let Err(e) = broker.release_unreceived(id, token, expiry).await {
                    tracing::error!(job_id = %id, error = %e, "could not hand back an unreceived lease");
                }
            });
        }
    }
}

/// One open event stream's place under `MAX_SUBSCRIBERS`; freed when the stream ends.
#[derive(Debug)]
pub struct SubscriberSlot {
    count: Arc<std::sync::atomic::AtomicUsize>,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for SubscriberSlot {
    fn drop(&mut self) {
        self.gauge.dec();
        self.count.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Records this broker's presence every sweep interval until the broker is gone.
async fn presence_forever(broker: std::sync::Weak<Inner>) {
    let Some(interval) = broker.upgrade().map(|b| b.config.sweep_interval) else { return };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once, and `open` has just beaten.
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(inner) = broker.upgrade() else { return };
        Broker { inner }.beat_presence().await;
    }
}

/// Runs [`follow_other_brokers`] until the broker is gone, restarting it after a panic: a panic
/// there (a bug) would otherwise stop every other broker's change from reaching this one's
/// clients and lease waits, silently, for the rest of its life. The notes sent between the panic
/// and the new subscription are lost, so every client resyncs (and every resume from before
/// resyncs, through the gap `resync_all` records) once the new subscription is in place.
async fn follow_supervised(broker: std::sync::Weak<Inner>, mut notes: tokio::sync::broadcast::Receiver<ClusterNote>) {
    loop {
        // Aborted with this task (`stop_background`), so a stopped broker publishes nothing more.
        let mut follower = crate::AbortOnDrop(tokio::spawn(follow_other_brokers(broker.clone(), notes)));
        match (&mut follower.0).await {
            Err(e) if e.is_panic() => {
                tracing::error!("the follower of other brokers' changes panicked; restarted, clients resync")
            }
            // Ended: the broker is gone or its store's notes closed.
            _ => return,
        }
        let Some(inner) = broker.upgrade() else { return };
        let Some(again) = inner.store.cluster_notes() else { return };
        notes = again;
        Broker { inner }.remote_changes_missed();
    }
}

/// Publishes the changes other brokers make to the shared database to this broker's subscribers
/// and waiting workers, in the order they committed, until the broker is gone.
async fn follow_other_brokers(
    broker: std::sync::Weak<Inner>,
    mut notes: tokio::sync::broadcast::Receiver<ClusterNote>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let note = notes.recv().await;
        let Some(inner) = broker.upgrade() else { return };
        let this = Broker { inner };
        match note {
            Ok(ClusterNote::Changed { id, kind, version }) => this.apply_remote_change(id, kind, version).await,
            Ok(ClusterNote::Wake) => this.inner.hub.job_queued(),
            Ok(ClusterNote::Missed) => {
                tracing::warn!("notifications from the database were interrupted; clients resync");
                this.remote_changes_missed();
            }
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "fell behind other brokers' changes; clients resync");
                this.remote_changes_missed();
            }
            Err(RecvError::Closed) => return,
        }
    }
}
