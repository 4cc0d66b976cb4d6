//! When bytes last moved on a connection, in milliseconds since it began, and a future that
//! resolves once nothing has moved for a given time: the idle watchdog of the raw relay and of
//! WebSocket tunnels. One atomic store per touch; no timer is re-armed per byte.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::clock::{coarse_ms, instant_at};

pub struct Activity {
    /// When the connection began, on the coarse clock (`crate::clock`): its times are read on
    /// every transfer, and need no finer grain than idle timeouts do.
    start_ms: u64,
    last_ms: AtomicU64,
}

impl Activity {
    pub fn new() -> Self {
        Activity { start_ms: coarse_ms(), last_ms: AtomicU64::new(0) }
    }

    /// Milliseconds since the connection began.
    pub fn now_ms(&self) -> u64 {
        coarse_ms().saturating_sub(self.start_ms)
    }

    pub fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `idle`.
    pub async fn quiet_for(&self, idle: Duration) {
        loop {
            let quiet_until = instant_at(self.start_ms + self.last_ms.load(Ordering::Relaxed)) + idle;
            if Instant::now() >= quiet_until {
                return;
            }
            tokio::time::sleep_until(quiet_until.into()).await;
        }
    }
}

impl Default for Activity {
    fn default() -> Self {
        Activity::new()
    }
}
