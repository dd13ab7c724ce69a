//! In-process fan-out of job events, and the wake-up signal for workers waiting on a lease.
//!
//! Every change the service makes is published here once, already serialized, so a hundred SSE or
//! WebSocket subscribers cost one `serde_json` call, not a hundred. A subscriber that falls behind
//! the channel's capacity skips ahead (and per-job streams re-read the job), so a slow client can
//! never hold memory or block the broker.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tdcomfy_api::{JobEvent, JobId};
use tokio::sync::{Notify, broadcast};

/// One published event with its sequence number and JSON text.
#[derive(Debug)]
pub struct PublishedEvent {
    /// Increases by one per event since the broker started (the SSE `id:`).
    pub seq: u64,
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

/// The broker's event bus.
#[derive(Debug)]
pub struct EventHub {
    tx: broadcast::Sender<Arc<PublishedEvent>>,
    seq: AtomicU64,
    queued: Notify,
}

impl EventHub {
    /// A hub whose subscribers may fall `capacity` events behind before skipping.
    pub fn new(capacity: usize) -> EventHub {
        EventHub { tx: broadcast::channel(capacity).0, seq: AtomicU64::new(0), queued: Notify::new() }
    }

    /// Sends `event` to every subscriber.
    pub fn publish(&self, event: JobEvent) {
        let json = serde_json::to_string(&event).unwrap_or_else(|_| String::from("{}"));
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        // No subscribers is not an error: nobody is listening right now.
        let _ = self.tx.send(Arc::new(PublishedEvent { seq, event, json }));
    }

    /// A receiver of every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<PublishedEvent>> {
        self.tx.subscribe()
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
