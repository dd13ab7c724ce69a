//! The broker's clock: the one source of "now" for every deadline and timestamp the broker keeps.
//!
//! It reads the wall clock once, when it is made, and from then on advances by the monotonic
//! clock. Lease expiry, an attempt's `JOB_TIMEOUT`, `RESULT_TTL` and `JOB_RETENTION` are all
//! computed on this timeline, so an NTP step (or an operator setting the show PC's clock) after the
//! broker started moves none of them: no lease lapses early, no job times out or loses its files
//! early, and a dead worker's lease still lapses on time after a step backwards. The stored
//! milliseconds stay on this timeline, so a restart continues close to where it left off; the
//! difference a restart may make (downtime, a step while the broker was down) is covered by the
//! lease grace at open ([`crate::store::Store::resume_running`]). The price is that display
//! timestamps (`created_at`, …) keep the pre-step offset until the next restart.

use std::sync::Arc;
use std::time::Instant;

use tdcomfy_api::Timestamp;

/// Where the wall time comes from: the system clock, or a test's steppable stand-in.
pub type WallSource = Arc<dyn Fn() -> i64 + Send + Sync>;

/// A wall-clock reading advanced by a monotonic clock. Cheap to clone.
#[derive(Clone)]
pub struct Clock {
    wall_at_origin: i64,
    origin: Instant,
}

impl Clock {
    /// The system clock, anchored now.
    pub fn system() -> Clock {
        Clock::from_wall(Arc::new(|| Timestamp::now().millis()))
    }

    /// A clock anchored on `wall` (milliseconds since the epoch), which is read once, here.
    pub fn from_wall(wall: WallSource) -> Clock {
        Clock { wall_at_origin: wall(), origin: Instant::now() }
    }

    /// Now, on this clock's timeline.
    pub fn now(&self) -> Timestamp {
        let elapsed = i64::try_from(self.origin.elapsed().as_millis()).unwrap_or(i64::MAX / 2);
        Timestamp(self.wall_at_origin.saturating_add(elapsed))
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clock").field("now", &self.now()).finish()
    }
}
