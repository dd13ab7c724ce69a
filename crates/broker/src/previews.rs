//! The latest preview image of each running job, in memory only.
//!
//! Previews are ephemeral: a client wants the newest one, never a history, and none survives the
//! job's run (or a broker restart). So there is one slot per job, a newer preview replaces the
//! older, the whole set is capped at `MAX_PREVIEW_MB` (the slots updated longest ago go first), and
//! the event hub empties a job's slot as soon as the job leaves `running`
//! ([`EventHub::publish`](crate::events::EventHub::publish)). Nothing here touches the disk or the
//! store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tdcomfy_api::JobId;

/// The largest single preview the broker takes: sampler previews are small JPEGs (a 512-pixel
/// TAESD frame is 20–60 KB), and a preview is held in memory for as long as its job runs.
pub const MAX_PREVIEW_BYTES: u64 = 2 * 1024 * 1024;

/// What the broker keeps of previews.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreviewLimits {
    /// Most bytes of all jobs' previews together (`MAX_PREVIEW_MB`).
    pub total_bytes: u64,
    /// Most bytes of one preview (at most [`MAX_PREVIEW_BYTES`], and never above `total_bytes`).
    pub each_bytes: u64,
    /// Test hook: the preview route waits this long before it answers, so a test can show that a
    /// slow broker costs a job nothing. Not a setting.
    #[doc(hidden)]
    pub stall_for_tests: Option<std::time::Duration>,
}

impl PreviewLimits {
    /// Limits for a total of `total_bytes`.
    pub fn with_total(total_bytes: u64) -> PreviewLimits {
        PreviewLimits { total_bytes, each_bytes: MAX_PREVIEW_BYTES.min(total_bytes), stall_for_tests: None }
    }

    /// Whether previews are off (`MAX_PREVIEW_MB=0`).
    pub fn disabled(&self) -> bool {
        self.total_bytes == 0
    }
}

impl Default for PreviewLimits {
    fn default() -> PreviewLimits {
        PreviewLimits::with_total(64 * 1024 * 1024)
    }
}

/// One stored preview.
#[derive(Debug)]
pub struct Preview {
    /// The broker-wide preview sequence number (its `ETag`).
    pub seq: u64,
    /// `image/jpeg`, `image/png` or `image/webp`.
    pub content_type: &'static str,
    /// The image.
    pub bytes: Bytes,
}

#[derive(Default)]
struct Slots {
    by_job: HashMap<JobId, Arc<Preview>>,
    bytes: u64,
    seq: u64,
}

/// The previews of running jobs.
pub struct Previews {
    limits: PreviewLimits,
    slots: Mutex<Slots>,
}

impl std::fmt::Debug for Previews {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Previews").field("limits", &self.limits).finish_non_exhaustive()
    }
}

impl Previews {
    /// An empty set under `limits`.
    pub fn new(limits: PreviewLimits) -> Previews {
        Previews { limits, slots: Mutex::new(Slots::default()) }
    }

    /// The limits.
    pub fn limits(&self) -> PreviewLimits {
        self.limits
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `bytes` as `job`'s preview in place of the one before, and returns it with its
    /// sequence number. The caller checked the size against [`PreviewLimits::each_bytes`]. Over
    /// the total, the previews of other jobs updated longest ago are dropped: the newest preview
    /// is the one somebody is waiting for.
    pub fn put(&self, job: JobId, content_type: &'static str, bytes: Bytes) -> Arc<Preview> {
        let mut slots = self.slots();
        slots.seq += 1;
        let preview = Arc::new(Preview { seq: slots.seq, content_type, bytes });
        let added = preview.bytes.len() as u64;
        if let Some(old) = slots.by_job.insert(job, preview.clone()) {
            slots.bytes -= old.bytes.len() as u64;
        }
        slots.bytes += added;
        while slots.bytes > self.limits.total_bytes {
            // Sequence numbers grow with every put, so the lowest is the slot updated longest ago.
            let oldest =
                slots.by_job.iter().filter(|(id, _)| **id != job).min_by_key(|(_, p)| p.seq).map(|(id, _)| *id);
            let Some(oldest) = oldest else { break };
            if let Some(gone) = slots.by_job.remove(&oldest) {
                slots.bytes -= gone.bytes.len() as u64;
            }
        }
        preview
    }

    /// `job`'s latest preview.
    pub fn get(&self, job: JobId) -> Option<Arc<Preview>> {
        self.slots().by_job.get(&job).cloned()
    }

    /// Whether `seq` is still `job`'s latest preview.
    pub fn is_latest(&self, job: JobId, seq: u64) -> bool {
        self.slots().by_job.get(&job).is_some_and(|p| p.seq == seq)
    }

    /// Drops `job`'s preview (the job left `running`).
    pub fn remove(&self, job: JobId) {
        let mut slots = self.slots();
        if let Some(gone) = slots.by_job.remove(&job) {
            slots.bytes -= gone.bytes.len() as u64;
        }
    }

    /// Drops `job`'s preview if it is still preview `seq`.
    pub fn remove_if_latest(&self, job: JobId, seq: u64) {
        let mut slots = self.slots();
        if slots.by_job.get(&job).is_some_and(|p| p.seq == seq)
            && let Some(gone) = slots.by_job.remove(&job)
        {
            slots.bytes -= gone.bytes.len() as u64;
        }
    }

    /// Bytes held now, for tests and logs.
    pub fn bytes_held(&self) -> u64 {
        self.slots().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_slot_per_job_and_the_total_drops_the_stalest_other_job() {
        let previews = Previews::new(PreviewLimits { total_bytes: 10, each_bytes: 10, stall_for_tests: None });
        let (a, b, c) = (JobId::new(), JobId::new(), JobId::new());
        previews.put(a, "image/jpeg", Bytes::from_static(b"aaaa"));
        let a2 = previews.put(a, "image/jpeg", Bytes::from_static(b"aaa"));
        assert_eq!(previews.bytes_held(), 3, "a newer preview replaces the older one");
        previews.put(b, "image/jpeg", Bytes::from_static(b"bbbb"));
        previews.put(c, "image/jpeg", Bytes::from_static(b"cccccc"));
        assert!(previews.get(a).is_none(), "a was updated longest ago");
        assert!(previews.get(b).is_some() && previews.get(c).is_some());
        assert_eq!(previews.bytes_held(), 10);
        assert!(!previews.is_latest(a, a2.seq));
        previews.remove(b);
        assert_eq!(previews.bytes_held(), 6);
    }
}
