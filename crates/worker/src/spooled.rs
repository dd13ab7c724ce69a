//! Results that outlive their worker process. Once an attempt's result is in its spool folder, a
//! `pending.json` there names the lease and the file; the attempt holds an exclusive lock on the
//! folder's `owner.lock` while it lives. A worker that starts finds folders whose lock nobody
//! holds (their worker was killed or crashed mid-delivery) and delivers them while their lease
//! still stands — a restart within `LEASE_TTL` costs the job nothing, not a re-run of the prompt.
//!
//! The lock, not the worker id, says whether an attempt is alive: workers may share a spool, and
//! the default worker id changes at every start.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tdcomfy_api::{JobId, LeaseToken};
use tdcomfy_comfy::error_chain;
use tokio_util::sync::CancellationToken;

use crate::broker_client::{BrokerCallError, BrokerClient};
use crate::lease_keeper::{Cadence, LeaseKeeper};

const PENDING: &str = "pending.json";
const OWNER: &str = "owner.lock";

/// What a restarted worker needs to deliver a spooled result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Pending {
    pub job_id: JobId,
    pub lease_token: LeaseToken,
    /// The result file's name inside the attempt's folder.
    pub result_file: String,
    pub content_type: String,
    pub comfy_execution_ms: Option<u64>,
    pub lease_expires_in: f64,
}

/// The lock an attempt holds on its spool folder for as long as it runs.
pub(crate) struct OwnerLock {
    _file: std::fs::File,
}

/// Takes the attempt's folder lock (blocking only in theory: the folder is new and this attempt's).
pub(crate) fn hold(dir: &Path) -> std::io::Result<OwnerLock> {
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(OWNER))?;
    file.lock()?;
    Ok(OwnerLock { _file: file })
}

/// Records that `pending`'s result waits in `dir` (written to a temporary name, then renamed, so
/// a reader finds either nothing or the whole record).
pub(crate) async fn record(dir: &Path, pending: &Pending) -> std::io::Result<()> {
    let text = serde_json::to_vec(pending).map_err(std::io::Error::other)?;
    let tmp = dir.join("pending.json.tmp");
    tokio::fs::write(&tmp, text).await?;
    tokio::fs::rename(&tmp, dir.join(PENDING)).await
}

/// Folders under `spool` with a recorded result whose attempt is gone (nobody holds the lock).
/// Each comes with its lock, now held by the caller.
fn orphans(spool: &Path) -> Vec<(PathBuf, Pending, OwnerLock)> {
    let Ok(entries) = std::fs::read_dir(spool) else { return Vec::new() };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        let Ok(text) = std::fs::read(dir.join(PENDING)) else { continue };
        let Ok(file) = std::fs::OpenOptions::new().write(true).open(dir.join(OWNER)) else { continue };
        // Held: a live attempt (this process or another worker sharing the spool) owns it.
        if file.try_lock().is_err() {
            continue;
        }
        match serde_json::from_slice::<Pending>(&text) {
            Ok(pending) => found.push((dir, pending, OwnerLock { _file: file })),
            Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "unreadable spooled result record; left alone"),
        }
    }
    found
}

/// Delivers every orphaned spooled result in `spool`, each with its own heartbeats, then removes
/// its folder. Runs beside the lease loops; gives up on a result once the broker says its lease
/// is over (another attempt has the job) or after `patience` of failed tries.
pub(crate) async fn deliver_orphans(
    spool: PathBuf,
    broker: BrokerClient,
    heartbeat_interval: Duration,
    progress_interval: Duration,
    shutdown: CancellationToken,
) {
    let found = tokio::task::spawn_blocking(move || orphans(&spool)).await.unwrap_or_default();
    for (dir, pending, lock) in found {
        let id = pending.job_id;
        let cadence = Cadence::for_ttl(pending.lease_expires_in, heartbeat_interval, progress_interval);
        let keeper = LeaseKeeper::start(broker.clone(), id, pending.lease_token.clone(), cadence);
        let path = dir.join(&pending.result_file);
        let exec = pending.comfy_execution_ms.map(Duration::from_millis);
        let patience = tokio::time::Instant::now() + Duration::from_secs_f64(pending.lease_expires_in.max(10.0) * 3.0);
        let mut delay = Duration::from_millis(200);
        loop {
            let upload = broker.upload_result(id, &pending.lease_token, &path, &pending.content_type, exec);
            match upload.await {
                Ok(()) => {
                    tracing::info!(job_id = %id, "delivered a result spooled before this worker restarted");
                    break;
                }
                Err(e @ (BrokerCallError::Cancelled | BrokerCallError::LeaseLost(_))) => {
                    tracing::info!(job_id = %id, reason = %e, "a spooled result from before the restart is no longer wanted");
                    break;
                }
                Err(e) if e.is_transient() && tokio::time::Instant::now() < patience => {
                    tracing::warn!(job_id = %id, error = %error_chain(&e), "spooled result not delivered yet; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = keeper.ended() => break,
                        _ = shutdown.cancelled() => return,
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    tracing::warn!(job_id = %id, error = %error_chain(&e), "gave up on a spooled result; its lease will lapse");
                    break;
                }
            }
        }
        keeper.stop().await;
        drop(lock);
        let _ = tokio::fs::remove_dir_all(&dir).await;
    }
}
