//! In-process fan-out of job events, the replay buffer that lets a client resume a stream, and the
//! wake-up signal for workers waiting on a lease.
//!
//! Every change the service makes is published here once, already serialized, so a hundred SSE or
//! WebSocket subscribers cost one `serde_json` call, not a hundred. Each event gets an id,
//! `<boot>-<seq>`: `boot` is new at every broker start (the sequence restarts with it), so an id
//! from before a restart is recognised as one and never silently skips the events after it.
//!
//! The last [`REPLAY_EVENTS`] events (at most [`REPLAY_BYTES`] of JSON) stay in a ring, so a client
//! that reconnects with `Last-Event-ID` first gets what it missed ([`EventHub::resume`]). Whatever
//! cannot be replayed exactly (an id of another start, one older than the ring, a subscriber that
//! fell behind the channel) is answered with a [`Resync`] instead: the client re-reads the state.
//! A slow client can never hold memory or block the broker.
//!
//! Preview events ([`PreviewEvent`]) travel on a channel of their own and never enter the ring
//! nor take a sequence number: they are not changes of a job (its `version` does not move), a
//! client that resumes needs only the newest preview, not the ones it missed, and a burst of them
//! must not push state changes out of the replay window. The hub also holds the previews
//! themselves ([`Previews`]) so that the one place every change passes through can drop a job's
//! preview the moment the job leaves `running`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tdcomfy_api::{JobEvent, JobEventKind, JobId, JobStatus, PreviewEvent};
use tokio::sync::{Notify, broadcast, watch};

use crate::previews::{Preview, PreviewLimits, Previews};

/// How many events the replay buffer keeps.
pub const REPLAY_EVENTS: usize = 1024;

/// The most JSON the replay buffer keeps; a prompt may be 10,000 characters, so 1024 events can
/// be 20 MB. Past this the oldest events go first.
pub const REPLAY_BYTES: usize = 8 << 20;

/// The name of an event kind on the wire (its SSE `event:` line and JSON `event`).
pub fn event_name(kind: JobEventKind) -> &'static str {
    match kind {
        JobEventKind::Snapshot => "snapshot",
        JobEventKind::Queued => "queued",
        JobEventKind::Started => "started",
        JobEventKind::Progress => "progress",
        JobEventKind::Done => "done",
        JobEventKind::Error => "error",
        JobEventKind::Cancelled => "cancelled",
        JobEventKind::Deleted => "deleted",
    }
}

/// One published event with its sequence number, id and JSON text.
#[derive(Debug)]
pub struct PublishedEvent {
    /// Increases with every event since the broker started (a gap in other brokers' changes
    /// takes a number too, so the numbers of consecutive events may skip one).
    pub seq: u64,
    /// The SSE `id:`, `<boot>-<seq>`.
    pub id: String,
    /// The event.
    pub event: JobEvent,
    /// `event` serialized once.
    pub json: String,
}

impl PublishedEvent {
    /// The job the event concerns.
    pub fn job_id(&self) -> JobId {
        self.event.job_id
    }
}

/// Why a stream cannot go on from where the client was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncReason {
    /// The subscriber fell more than the channel's capacity behind.
    Lagged,
    /// `Last-Event-ID` is not an id of this broker start (malformed, another start, or newer
    /// than anything published).
    UnknownId,
    /// `Last-Event-ID` is older than the replay buffer holds.
    Expired,
    /// The broker may have missed changes other brokers on its database made (its connection
    /// to the database's notifications broke and is back): what the client holds may be stale.
    Missed,
}

impl ResyncReason {
    /// The `reason` on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ResyncReason::Lagged => "lagged",
            ResyncReason::UnknownId => "unknown_id",
            ResyncReason::Expired => "expired",
            ResyncReason::Missed => "missed",
        }
    }
}

/// "Events were missed; re-read the state": sent instead of a gap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resync {
    /// Why.
    pub reason: ResyncReason,
    /// The id of the last event published when the stream went on: every later event follows
    /// the resync, so it is also the `Last-Event-ID` to resume from.
    pub id: String,
}

impl Resync {
    /// The JSON of the `resync` event, the same on SSE and WebSocket.
    pub fn json(&self) -> String {
        serde_json::json!({"type": "resync", "reason": self.reason.as_str(), "id": self.id}).to_string()
    }
}

/// A receiver of every event published after `id`.
#[derive(Debug)]
pub struct Subscription {
    /// The events.
    pub rx: broadcast::Receiver<Arc<PublishedEvent>>,
    /// The preview events published from the same moment on.
    pub previews: broadcast::Receiver<Arc<PublishedPreview>>,
    /// The id of the last event published before `rx` subscribed.
    pub id: String,
    /// Changes with every [`EventHub::resync_all`] after the subscription.
    pub resyncs: watch::Receiver<u64>,
}

/// Where a resumed stream starts.
#[derive(Debug)]
pub enum Resume {
    /// Everything published after the client's id, oldest first (then `rx` goes on).
    Replay(Vec<Arc<PublishedEvent>>),
    /// The missed events cannot be given exactly.
    Resync(Resync),
}

/// A published preview event with its JSON.
#[derive(Debug)]
pub struct PublishedPreview {
    /// The event.
    pub event: PreviewEvent,
    /// `event` serialized once.
    pub json: String,
}

impl PublishedPreview {
    fn of(job: JobId, preview: &Preview) -> PublishedPreview {
        let event = PreviewEvent::new(job, preview.seq, preview.content_type, preview.bytes.len() as u64);
        let json = serde_json::to_string(&event).unwrap_or_else(|_| String::from("{}"));
        PublishedPreview { event, json }
    }
}

struct Ring {
    /// The last sequence number handed out (to an event, or to a gap).
    seq: u64,
    /// The newest sequence number taken by a gap ([`EventHub::wanted_or_gap`],
    /// [`EventHub::resync_all`]): a change another broker made may be missing right before it.
    /// It takes a number of its own, so an id handed out after the gap (a subscription, a
    /// resync) is told from one handed out before it.
    gap_seq: Option<u64>,
    events: VecDeque<Arc<PublishedEvent>>,
    bytes: usize,
}

/// The broker's event bus.
pub struct EventHub {
    tx: broadcast::Sender<Arc<PublishedEvent>>,
    boot: String,
    ring: Mutex<Ring>,
    queued: Notify,
    previews: Previews,
    preview_tx: broadcast::Sender<Arc<PublishedPreview>>,
    /// Bumped by [`EventHub::resync_all`]: a channel of its own rather than an event, so a
    /// subscriber sees it before anything still queued for it and drops that backlog.
    resync_tx: watch::Sender<u64>,
}

impl std::fmt::Debug for EventHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventHub").field("boot", &self.boot).finish_non_exhaustive()
    }
}

impl EventHub {
    /// A hub with a new boot id whose subscribers may fall `capacity` events behind before they
    /// get a resync.
    pub fn new(capacity: usize) -> EventHub {
        EventHub::with_previews(capacity, PreviewLimits::default())
    }

    /// [`EventHub::new`] keeping previews under `limits`.
    pub fn with_previews(capacity: usize, limits: PreviewLimits) -> EventHub {
        // Random rather than clock-based: a wall clock that stepped back across a restart must not
        // make an old id look like one of this start.
        let boot = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        EventHub {
            tx: broadcast::channel(capacity).0,
            boot,
            ring: Mutex::new(Ring { seq: 0, gap_seq: None, events: VecDeque::new(), bytes: 0 }),
            queued: Notify::new(),
            previews: Previews::new(limits),
            // Previews come at most PREVIEW_FPS per running job; a subscriber this far behind
            // skips to the newest ones (they replace each other anyway).
            preview_tx: broadcast::channel(capacity).0,
            resync_tx: watch::channel(0).0,
        }
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn id_of(&self, seq: u64) -> String {
        format!("{}-{seq}", self.boot)
    }

    /// Sends `event` to every subscriber and keeps it for replay, unless a newer state of its job
    /// went out already (see [`EventHub::publish_if_newer`]); false when it was dropped.
    pub fn publish(&self, event: JobEvent) -> bool {
        self.publish_if_newer(event)
    }

    /// Publishes `event` unless an event of the same job at a *newer* version went out meanwhile:
    /// with several brokers, another broker's change (read back from its note) can be published
    /// here between this broker's commit and its own event, and the other way round, so either
    /// may arrive late; a job's events never go back in version on a stream, and a stale one does
    /// not drop the job's preview slot either. The same version passes: a repeated `DELETE`
    /// re-publishes `cancelled` unchanged, here or through another broker. Checked against the
    /// replay ring, under its lock (older than the ring, nothing can overtake it any more).
    pub fn publish_if_newer(&self, event: JobEvent) -> bool {
        let json = serde_json::to_string(&event).unwrap_or_else(|_| String::from("{}"));
        let ring = self.ring();
        let (job, version) = (event.job_id, event.job.version);
        if ring.events.iter().rev().any(|e| e.job_id() == job && e.event.job.version > version) {
            return false;
        }
        self.publish_locked(ring, event, json);
        true
    }

    fn publish_locked(&self, mut ring: std::sync::MutexGuard<'_, Ring>, event: JobEvent, json: String) {
        if event.job.status != JobStatus::Running {
            // A preview exists only while its job runs: done, failed, cancelled or requeued, the
            // next attempt (if any) brings its own. Under the ring's lock, like
            // `publish_preview`'s check, so no preview event is sent after this one.
            self.previews.remove(event.job_id);
        }
        ring.seq += 1;
        let ev = Arc::new(PublishedEvent { seq: ring.seq, id: self.id_of(ring.seq), event, json });
        ring.bytes += ev.json.len();
        ring.events.push_back(ev.clone());
        // The newest event always stays, however large, so a resume from the one before it works.
        while ring.events.len() > REPLAY_EVENTS || (ring.bytes > REPLAY_BYTES && ring.events.len() > 1) {
            let Some(old) = ring.events.pop_front() else { break };
            ring.bytes -= old.json.len();
        }
        // Sent under the ring's lock, which subscribers take too: an event is either in the ring
        // a subscriber copies or in its receiver, never in both and never in neither, and the
        // channel's order is the sequence order. No subscribers is not an error.
        let _ = self.tx.send(ev);
    }

    /// Whether an event of `job` published now would reach anyone: a subscriber (stream or
    /// long-poll) is open, or the job has a preview here that its event would drop.
    pub fn wanted(&self, job: JobId) -> bool {
        self.tx.receiver_count() > 0 || self.previews.get(job).is_some()
    }

    /// [`EventHub::wanted`], and when nobody wants the event, records a gap instead: the caller
    /// skips it, so a client that resumes from an id of before now must re-read
    /// ([`ResyncReason::Missed`]) rather than be told nothing happened. Under the ring's lock,
    /// which subscribing takes too, so no subscription slips between the check and the gap.
    pub fn wanted_or_gap(&self, job: JobId) -> bool {
        let mut ring = self.ring();
        if self.wanted(job) {
            return true;
        }
        Self::gap_locked(&mut ring);
        false
    }

    fn gap_locked(ring: &mut Ring) {
        ring.seq += 1;
        ring.gap_seq = Some(ring.seq);
    }

    /// A receiver of every event published from now on (for code that needs no ids).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<PublishedEvent>> {
        self.tx.subscribe()
    }

    /// A receiver of every event published from now on, with the id of the last one before.
    pub fn subscribe_now(&self) -> Subscription {
        let ring = self.ring();
        Subscription {
            rx: self.tx.subscribe(),
            previews: self.preview_tx.subscribe(),
            id: self.id_of(ring.seq),
            resyncs: self.resync_tx.subscribe(),
        }
    }

    /// Subscribes, and says what comes first for a client whose last event was `last_event_id`:
    /// the events after it, or a resync when they cannot be given exactly.
    pub fn resume(&self, last_event_id: &str) -> (Subscription, Resume) {
        let ring = self.ring();
        let sub = Subscription {
            rx: self.tx.subscribe(),
            previews: self.preview_tx.subscribe(),
            id: self.id_of(ring.seq),
            resyncs: self.resync_tx.subscribe(),
        };
        let resync = |reason| Resume::Resync(Resync { reason, id: sub.id.clone() });
        let seq = last_event_id
            .trim()
            .rsplit_once('-')
            .filter(|(boot, _)| *boot == self.boot)
            .and_then(|(_, seq)| seq.parse::<u64>().ok())
            .filter(|&seq| seq <= ring.seq);
        let resume = match seq {
            None => resync(ResyncReason::UnknownId),
            // Before the `seq == ring.seq` shortcut: a change skipped after the client's event
            // (nobody was subscribed) or lost (notifications broke) is in no replay.
            Some(seq) if ring.gap_seq.is_some_and(|gap| seq < gap) => resync(ResyncReason::Missed),
            Some(seq) if seq == ring.seq => Resume::Replay(Vec::new()),
            // The ring must still hold the event right after the client's, or some are lost.
            Some(seq) if ring.events.front().is_none_or(|first| first.seq > seq + 1) => resync(ResyncReason::Expired),
            Some(seq) => Resume::Replay(ring.events.iter().filter(|e| e.seq > seq).cloned().collect()),
        };
        drop(ring);
        (sub, resume)
    }

    /// This broker start's random id (the `<boot>` of event ids and preview ETags).
    pub fn boot(&self) -> &str {
        &self.boot
    }

    /// The previews of running jobs.
    pub fn previews(&self) -> &Previews {
        &self.previews
    }

    /// The event of `job`'s current preview, if it has one.
    pub fn current_preview(&self, job: JobId) -> Option<Arc<PublishedPreview>> {
        let preview = self.previews.get(job)?;
        Some(Arc::new(PublishedPreview::of(job, &preview)))
    }

    /// Announces `preview` of `job` to every subscriber, unless a newer preview replaced it or the
    /// job left `running` meanwhile (then its event would name an image that is not there).
    pub fn publish_preview(&self, job: JobId, preview: &Preview) {
        let published = Arc::new(PublishedPreview::of(job, preview));
        // Checked and sent under the ring's lock, which `publish` holds while it drops previews
        // and sends state changes: no preview event is sent after its job's final event (a
        // subscriber reading both channels may still see one just after it; see `http::push`).
        let _ring = self.ring();
        if self.previews.is_latest(job, preview.seq) {
            let _ = self.preview_tx.send(published);
        }
    }

    /// A receiver of every preview event published from now on.
    pub fn subscribe_previews(&self) -> broadcast::Receiver<Arc<PublishedPreview>> {
        self.preview_tx.subscribe()
    }

    /// Tells every subscriber that it may have missed changes ([`ResyncReason::Missed`]): each
    /// open stream sends a `resync` and goes on from the events published after it, and each
    /// long-poll re-reads what it waits on.
    pub fn resync_all(&self) {
        // A gap first, so a client away now resyncs when it resumes, and each open stream's new
        // subscription (taken after the bump below) starts after the gap.
        Self::gap_locked(&mut self.ring());
        self.resync_tx.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// A receiver that changes at every [`EventHub::resync_all`] from now on.
    pub fn resyncs(&self) -> watch::Receiver<u64> {
        self.resync_tx.subscribe()
    }

    /// Wakes every worker waiting for a queued job.
    pub fn job_queued(&self) {
        self.queued.notify_waiters();
    }

    /// The signal [`EventHub::job_queued`] fires.
    pub fn queued_signal(&self) -> &Notify {
        &self.queued
    }
}

/// Resolves at the next [`EventHub::resync_all`] after `rx` last saw one; never when the hub is
/// gone (its streams end with its event channel).
pub async fn resync_wanted(rx: &mut watch::Receiver<u64>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: JobEventKind, id: JobId, status: JobStatus, version: u64) -> JobEvent {
        let view = tdcomfy_api::JobView {
            id,
            status,
            created_at: tdcomfy_api::Timestamp::now(),
            prompt: String::new(),
            negative_prompt: String::new(),
            seed: None,
            workflow: "w".into(),
            has_result: false,
            error_message: None,
            processing_time: None,
            progress: Default::default(),
            queue_position: None,
            started_at: None,
            finished_at: None,
            attempts: 1,
            version,
            result: None,
            timings: Default::default(),
            waiting_reason: None,
            stream: None,
            mode: tdcomfy_api::StreamMode::Queue,
            previews: false,
            cancel_reason: None,
            superseded_by: None,
            reused_from: None,
            params: Default::default(),
        };
        JobEvent::new(kind, view)
    }

    fn received(rx: &mut broadcast::Receiver<Arc<PublishedEvent>>) -> Vec<(JobEventKind, u64)> {
        std::iter::from_fn(|| rx.try_recv().ok()).map(|e| (e.event.event, e.event.job.version)).collect()
    }

    #[test]
    fn a_job_s_events_never_go_back_in_version_but_a_repeat_goes_out() {
        let hub = EventHub::new(64);
        let mut rx = hub.subscribe();
        let (a, b) = (JobId::new(), JobId::new());
        assert!(hub.publish(event(JobEventKind::Started, a, JobStatus::Running, 2)));
        // This broker's own `queued` v1, late behind another broker's `started` v2: dropped.
        assert!(!hub.publish(event(JobEventKind::Queued, a, JobStatus::Queued, 1)));
        assert!(!hub.publish_if_newer(event(JobEventKind::Queued, a, JobStatus::Queued, 1)));
        // Another job's older version is no concern of this one's.
        assert!(hub.publish(event(JobEventKind::Queued, b, JobStatus::Queued, 1)));
        // A repeated DELETE's `cancelled`, same version, locally and from another broker.
        assert!(hub.publish(event(JobEventKind::Cancelled, a, JobStatus::Cancelled, 3)));
        assert!(hub.publish(event(JobEventKind::Cancelled, a, JobStatus::Cancelled, 3)));
        assert!(hub.publish_if_newer(event(JobEventKind::Cancelled, a, JobStatus::Cancelled, 3)));
        assert_eq!(
            received(&mut rx),
            vec![
                (JobEventKind::Started, 2),
                (JobEventKind::Queued, 1),
                (JobEventKind::Cancelled, 3),
                (JobEventKind::Cancelled, 3),
                (JobEventKind::Cancelled, 3)
            ]
        );
    }
}
