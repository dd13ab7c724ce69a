//! Preview images of a running job, from ComfyUI's socket to the broker, off the job's path.
//!
//! The run's updates are read by the job's supervision loop, which also carries progress,
//! cancellation and the outcome; a preview upload awaited there would hold all of them up behind
//! a slow broker. So a job's previews go through a one-slot mailbox (`watch`: a newer preview
//! replaces the one not yet sent) to a task of their own, which sends the newest at most
//! `PREVIEW_FPS` times a second, gives each upload [`UPLOAD_TIMEOUT`], and never retries: a slow
//! or failing broker costs previews, never progress, heartbeats or the result.

use std::time::Duration;

use tdcomfy_api::{JobId, Lease, LeaseToken};
use tdcomfy_comfy::{PreviewFormat, PreviewImage, PreviewMethod, error_chain};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

use crate::broker_client::{BrokerCallError, BrokerClient};

/// The broker's limit for one preview (its `MAX_PREVIEW_BYTES`): a larger one is not sent.
pub const MAX_PREVIEW_BYTES: usize = 2 * 1024 * 1024;

/// Longest one preview upload may take; past it the preview is dropped (a newer one is likely
/// waiting already). Short: a preview older than this is not worth showing.
pub const UPLOAD_TIMEOUT: Duration = Duration::from_secs(2);

/// Sends a job's previews to the broker while it lives; dropping it stops the task (an upload
/// in flight is abandoned, and the broker drops the job's preview once the job ends anyway).
#[derive(Debug)]
pub struct PreviewUploader {
    mailbox: Option<watch::Sender<Option<PreviewImage>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl PreviewUploader {
    /// An uploader for `lease`'s previews every `interval` (`None`: `PREVIEW_FPS=0`); one that
    /// drops everything when the job was not submitted with previews on.
    pub fn for_lease(broker: &BrokerClient, lease: &Lease, interval: Option<Duration>) -> PreviewUploader {
        let Some(interval) = interval.filter(|_| wants_previews(lease)) else {
            return PreviewUploader { mailbox: None, task: None };
        };
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(
            upload_latest(broker.clone(), lease.job_id, lease.lease_token.clone(), rx, interval).in_current_span(),
        );
        PreviewUploader { mailbox: Some(tx), task: Some(task) }
    }

    /// Hands over the run's newest preview; returns at once, whatever the broker does.
    pub fn offer(&self, preview: PreviewImage) {
        if let Some(tx) = &self.mailbox {
            tx.send_replace(Some(preview));
        }
    }
}

impl Drop for PreviewUploader {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Whether the job was submitted with previews on (false from brokers older than the field).
fn wants_previews(lease: &Lease) -> bool {
    lease.previews
}

/// The preview method a job's prompt asks ComfyUI for: `PREVIEW_METHOD` (`configured`), except
/// that a job submitted with previews on gets `auto` where that says `none` — newer ComfyUI renders
/// no preview at all for a prompt without a method, and the client asked for them.
pub fn preview_method(lease: &Lease, configured: PreviewMethod) -> PreviewMethod {
    match configured {
        PreviewMethod::None if wants_previews(lease) => PreviewMethod::Auto,
        other => other,
    }
}

/// The MIME type the broker accepts for `format`, or `None` for a format it does not.
fn mime(format: &PreviewFormat) -> Option<&'static str> {
    match format.mime() {
        "image/jpeg" => Some("image/jpeg"),
        "image/png" => Some("image/png"),
        "image/webp" => Some("image/webp"),
        _ => None,
    }
}

async fn upload_latest(
    broker: BrokerClient,
    job: JobId,
    token: LeaseToken,
    mut mailbox: watch::Receiver<Option<PreviewImage>>,
    interval: Duration,
) {
    let mut next_at = Instant::now();
    // Ends when the job's uploader is dropped (the sender goes with it).
    while mailbox.changed().await.is_ok() {
        // The rate limit: whatever arrives meanwhile replaces what waits, so the newest goes.
        tokio::time::sleep_until(next_at).await;
        let Some(preview) = mailbox.borrow_and_update().clone() else { continue };
        let Some(content_type) = mime(&preview.format) else {
            tracing::debug!(format = ?preview.format, "preview in a format the broker does not take; skipped");
            continue;
        };
        if preview.image.len() > MAX_PREVIEW_BYTES {
            tracing::debug!(size = preview.image.len(), "preview over the broker's 2 MiB limit; skipped");
            continue;
        }
        next_at = Instant::now() + interval;
        let upload = broker.upload_preview(job, &token, content_type, preview.image);
        match tokio::time::timeout(UPLOAD_TIMEOUT, upload).await {
            Ok(Ok(())) => {}
            // The lease is over, or the broker takes no previews (MAX_PREVIEW_MB=0, an older
            // broker): nothing later would fare better.
            Ok(Err(BrokerCallError::LeaseLost(_) | BrokerCallError::Cancelled)) => return,
            Ok(Err(BrokerCallError::Refused { status: 404 | 405 | 413, message })) => {
                tracing::info!(reason = %message, "the broker takes no previews; not sending more for this job");
                return;
            }
            Ok(Err(e)) => tracing::debug!(error = %error_chain(&e), "preview upload failed; dropped"),
            Err(_) => tracing::debug!(timeout = ?UPLOAD_TIMEOUT, "preview upload too slow; dropped"),
        }
    }
}
