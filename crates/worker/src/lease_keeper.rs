//! Keeps one attempt's lease alive from the moment it is leased until its result is accepted or
//! its failure reported: through the frame download, the upload to ComfyUI, the prompt, the
//! download from `/view` and the delivery — every step that can outlast `LEASE_TTL` on a slow link
//! or while the broker is away.
//!
//! The keeper is a task of its own, so no step has to remember to heartbeat. It also carries the
//! latest progress to the broker and tells the job when the broker says the lease is over (a client
//! cancelled, or the lease went elsewhere).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tdcomfy_api::{JobId, Lease, LeaseToken, Progress};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::broker_client::{BrokerCallError, BrokerClient};

/// Why the broker ended a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseEnd {
    /// A client cancelled the job.
    Cancelled,
    /// The lease is no longer this worker's (expired and re-leased, or the job ended).
    Lost,
}

struct Shared {
    /// ComfyUI started the prompt (set once; only a prefetched lease tells the broker).
    started: std::sync::atomic::AtomicBool,
    /// Wakes a prefetched lease's long-polling beat when the prompt starts.
    start_signal: tokio::sync::Notify,
    pending: Mutex<Option<Progress>>,
    ended: Mutex<Option<LeaseEnd>>,
    /// Cancelled when the broker ended the lease; every step of the job selects on it.
    over: CancellationToken,
}

/// The heartbeat of one lease. Dropping it stops the heartbeats.
pub(crate) struct LeaseKeeper {
    shared: Arc<Shared>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

/// How often the keeper beats.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cadence {
    /// A heartbeat at least this often, progress or not.
    pub beat: Duration,
    /// Progress goes out at most this often.
    pub progress: Duration,
}

impl Cadence {
    /// `heartbeat_interval`, but never more than a third of the lease's lifetime, so two lost
    /// heartbeats in a row still leave the lease standing.
    pub fn for_lease(lease: &Lease, heartbeat_interval: Duration, progress_interval: Duration) -> Cadence {
        Cadence::for_ttl(lease.lease_expires_in, heartbeat_interval, progress_interval)
    }

    /// The same for a lease of `lease_ttl` seconds.
    pub fn for_ttl(lease_ttl: f64, heartbeat_interval: Duration, progress_interval: Duration) -> Cadence {
        let third = Duration::from_secs_f64((lease_ttl / 3.0).clamp(0.1, 3600.0));
        Cadence { beat: heartbeat_interval.min(third), progress: progress_interval.min(third) }
    }
}

impl LeaseKeeper {
    /// Starts heartbeating `lease` at once: the first beat also tells the broker the lease arrived.
    pub fn start(broker: BrokerClient, id: JobId, token: LeaseToken, cadence: Cadence) -> LeaseKeeper {
        LeaseKeeper::start_as(broker, id, token, cadence, false)
    }

    /// [`LeaseKeeper::start`] for a lease that may be `prefetched` (leased while the server was
    /// busy): until [`LeaseKeeper::started`], each beat is a long-poll the broker answers the
    /// moment the job is cancelled or superseded, so its prompt leaves ComfyUI's queue before it
    /// can start; the first beat after says `started`.
    pub fn start_as(
        broker: BrokerClient,
        id: JobId,
        token: LeaseToken,
        cadence: Cadence,
        prefetched: bool,
    ) -> LeaseKeeper {
        let shared = Arc::new(Shared {
            started: std::sync::atomic::AtomicBool::new(false),
            start_signal: tokio::sync::Notify::new(),
            pending: Mutex::new(None),
            ended: Mutex::new(None),
            over: CancellationToken::new(),
        });
        let stop = CancellationToken::new();
        let beat = beat(broker, id, token, cadence, shared.clone(), stop.clone(), prefetched);
        // In the job's span, so its log lines carry the job's attempt and worker too.
        let task = tokio::spawn(tracing::Instrument::in_current_span(beat));
        LeaseKeeper { shared, stop, task: Some(task) }
    }

    /// ComfyUI started the job's prompt.
    pub fn started(&self) {
        self.shared.started.store(true, std::sync::atomic::Ordering::Release);
        self.shared.start_signal.notify_one();
    }

    /// Progress for the next heartbeat (only the latest is kept).
    pub fn report(&self, progress: Progress) {
        *self.shared.pending.lock().unwrap_or_else(|p| p.into_inner()) = Some(progress);
    }

    /// Resolves when the broker ended the lease.
    pub async fn ended(&self) -> LeaseEnd {
        self.shared.over.cancelled().await;
        self.end().unwrap_or(LeaseEnd::Lost)
    }

    /// How the broker ended the lease, if it did.
    pub fn end(&self) -> Option<LeaseEnd> {
        *self.shared.ended.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops heartbeating (the result was accepted or the failure reported).
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn beat(
    broker: BrokerClient,
    id: JobId,
    token: LeaseToken,
    cadence: Cadence,
    shared: Arc<Shared>,
    stop: CancellationToken,
    prefetched: bool,
) {
    let mut tick = tokio::time::interval(cadence.progress);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_beat: Option<Instant> = None;
    let mut failing = false;
    // Waiting in ComfyUI's queue: beats long-poll for a cancel instead of ticking.
    let mut waiting = prefetched;
    // `started` still to be told (kept over a failed beat).
    let mut tell_started = false;
    loop {
        // The first beat after the start goes at once.
        let mut started = false;
        if waiting && shared.started.load(std::sync::atomic::Ordering::Acquire) {
            waiting = false;
            started = true;
            tell_started = true;
        }
        if waiting {
            // At most one long-poll per progress interval, so a broker that answers at once
            // (older than `wait`, or failing) is not called in a loop.
            let gap = last_beat.map_or(Duration::ZERO, |t| cadence.progress.saturating_sub(t.elapsed()));
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = shared.start_signal.notified() => continue,
                _ = tokio::time::sleep(gap) => {}
            }
        } else if !started {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
        }
        let progress = shared.pending.lock().unwrap_or_else(|p| p.into_inner()).take();
        let due = last_beat.is_none_or(|t| t.elapsed() >= cadence.beat);
        if progress.is_none() && !due && !started && !waiting {
            continue;
        }
        last_beat = Some(Instant::now());
        let wait = if waiting { cadence.beat } else { Duration::ZERO };
        let answer = tokio::select! {
            _ = stop.cancelled() => return,
            // The prompt started mid-poll: say so now rather than when the poll ends (the
            // broker's renewal is already done; dropping the request costs nothing).
            _ = shared.start_signal.notified(), if waiting => continue,
            answer = broker.heartbeat_with(id, &token, progress.clone(), tell_started, wait) => answer,
        };
        let end = match answer {
            Ok(false) => {
                tell_started = false;
                if failing {
                    tracing::info!(job_id = %id, "heartbeats reach the broker again");
                    failing = false;
                }
                continue;
            }
            Ok(true) | Err(BrokerCallError::Cancelled) => LeaseEnd::Cancelled,
            Err(BrokerCallError::LeaseLost(m)) => {
                tracing::warn!(job_id = %id, reason = %m, "lease lost");
                LeaseEnd::Lost
            }
            Err(e) => {
                // The broker is away: keep beating. Its restart grace keeps the lease for the
                // first beat after it is back; unsent progress is offered again next time.
                if !failing {
                    tracing::warn!(job_id = %id, error = %e, "heartbeat failed; retrying");
                    failing = true;
                }
                if let Some(p) = progress {
                    shared.pending.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(p);
                }
                continue;
            }
        };
        *shared.ended.lock().unwrap_or_else(|p| p.into_inner()) = Some(end);
        shared.over.cancel();
        return;
    }
}
