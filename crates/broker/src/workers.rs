//! Which workers the broker has heard from, for `/health`, and what each one's ComfyUI server can
//! run (its preflight report, for `GET /workflows` and a queued job's `waiting_reason`). Kept in
//! memory only: after a restart a worker reappears at its next call and re-sends its report, and
//! no claim depends on this table (a lease request carries its own workflow list).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tdcomfy_api::{JobId, PreflightReport, WorkerInfo};

/// How long a worker that stopped calling still counts as connected.
pub const CONNECTED_WINDOW: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct Seen {
    last_seen: Instant,
    job: Option<JobId>,
    waiting: usize,
    /// The worker's last preflight report, if it sent one.
    report: Option<PreflightReport>,
}

impl Seen {
    fn new() -> Seen {
        Seen { last_seen: Instant::now(), job: None, waiting: 0, report: None }
    }

    fn live(&self) -> bool {
        self.waiting > 0 || self.last_seen.elapsed() < CONNECTED_WINDOW
    }
}

/// The table of recently seen workers.
#[derive(Debug, Default)]
pub struct WorkerRegistry {
    seen: Mutex<HashMap<String, Seen>>,
    /// Lease requests waiting now, by a number of their own.
    waiters: Mutex<HashMap<u64, Waiter>>,
    next_waiter: std::sync::atomic::AtomicU64,
}

/// What a waiting lease request says about its server.
#[derive(Debug, Clone, Default)]
pub struct Wish {
    /// Busy: the job would wait in ComfyUI's queue.
    pub prefetch: bool,
    /// The workflow the server ran last.
    pub last_workflow: Option<String>,
    /// The workflows it can run (`None`: any).
    pub workflows: Option<Vec<String>>,
}

#[derive(Debug)]
struct Waiter {
    wish: Wish,
    /// Another request let this one go first, and waits to hear it left.
    deferred_to: bool,
}

impl Wish {
    /// How well this request suits a job of `workflow` (lower is better), `None` when it cannot
    /// run it: an idle server before a busy one (the GPU would otherwise wait), then one with the
    /// workflow's models loaded.
    fn rank(&self, workflow: &str) -> Option<(bool, bool)> {
        let can = self.workflows.as_ref().is_none_or(|names| names.iter().any(|n| n == workflow));
        can.then(|| (self.prefetch, self.last_workflow.as_deref() != Some(workflow)))
    }
}

/// Marks a worker as waiting on a lease until dropped.
pub struct WaitingGuard<'a> {
    registry: &'a WorkerRegistry,
    worker: String,
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        let mut seen = self.registry.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = seen.get_mut(&self.worker) {
            s.waiting = s.waiting.saturating_sub(1);
            s.last_seen = Instant::now();
        }
    }
}

impl WorkerRegistry {
    /// Records a call from `worker`, holding `job` (or none).
    pub fn touch(&self, worker: &str, job: Option<JobId>) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let entry = seen.entry(worker.to_owned()).or_insert_with(Seen::new);
        entry.last_seen = Instant::now();
        entry.job = job;
    }

    /// Keeps `report` as what `report.worker_id`'s server can run (replacing its previous one).
    pub fn set_report(&self, report: PreflightReport) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let entry = seen.entry(report.worker_id.clone()).or_insert_with(Seen::new);
        entry.last_seen = Instant::now();
        entry.report = Some(report);
    }

    /// The reports of the workers that count as connected (see [`WorkerRegistry::connected`]),
    /// by worker id: a stopped worker's report goes with it.
    pub fn reports(&self) -> Vec<PreflightReport> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<PreflightReport> =
            seen.values().filter(|s| s.live()).filter_map(|s| s.report.clone()).collect();
        out.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        out
    }

    /// Records that `worker` waits on a lease while the guard lives.
    pub fn waiting(&self, worker: &str) -> WaitingGuard<'_> {
        self.touch(worker, None);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = seen.get_mut(worker) {
            s.waiting += 1;
        }
        WaitingGuard { registry: self, worker: worker.to_owned() }
    }

    /// Puts a lease request on the waiting list; its number is for the calls below.
    pub fn wait_for_lease(&self, wish: Wish) -> u64 {
        let id = self.next_waiter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.waiters.lock().unwrap_or_else(|p| p.into_inner()).insert(id, Waiter { wish, deferred_to: false });
        id
    }

    /// Takes request `id` off the waiting list; true when another request deferred to it.
    pub fn stop_waiting(&self, id: u64) -> bool {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner()).remove(&id).is_some_and(|w| w.deferred_to)
    }

    /// How many lease requests wait now.
    pub fn lease_waiters(&self) -> usize {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether another waiting request suits a job of `workflow` strictly better than request
    /// `me`; if so that one is marked, so it wakes `me` when it leaves.
    pub fn better_waiter(&self, me: u64, workflow: &str) -> bool {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mine) = waiters.get(&me).and_then(|w| w.wish.rank(workflow)) else { return false };
        let best = waiters
            .iter_mut()
            .filter(|(id, _)| **id != me)
            .filter_map(|(_, w)| w.wish.rank(workflow).map(|rank| (rank, w)))
            .min_by_key(|(rank, _)| *rank);
        match best {
            Some((rank, w)) if rank < mine => {
                w.deferred_to = true;
                true
            }
            _ => false,
        }
    }

    /// Forgets the job a worker held (it finished or failed it).
    pub fn release(&self, job: JobId) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        for s in seen.values_mut().filter(|s| s.job == Some(job)) {
            s.job = None;
        }
    }

    /// Workers waiting now or seen within [`CONNECTED_WINDOW`], and drops the others.
    pub fn connected(&self) -> Vec<WorkerInfo> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|_, s| s.waiting > 0 || s.last_seen.elapsed() < CONNECTED_WINDOW * 10);
        let mut out: Vec<WorkerInfo> = seen
            .iter()
            .filter(|(_, s)| s.live())
            .map(|(id, s)| {
                let report = s.report.as_ref().filter(|r| r.state.is_some());
                WorkerInfo {
                    id: id.clone(),
                    last_seen_ms_ago: if s.waiting > 0 { 0 } else { s.last_seen.elapsed().as_millis() as u64 },
                    // A loop that reports its state knows its running job better than the last
                    // call seen here (a prefetched job's heartbeats come from the same id).
                    job_id: match report {
                        Some(r) => r.job_id,
                        None => s.job,
                    },
                    server: s.report.as_ref().map(|r| r.server.clone()),
                    state: report.and_then(|r| r.state),
                    prefetched_jobs: report.map(|r| r.prefetched_jobs.clone()).unwrap_or_default(),
                    last_workflow: report.and_then(|r| r.last_workflow.clone()),
                    devices: report.map(|r| r.devices.clone()).unwrap_or_default(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }
}
