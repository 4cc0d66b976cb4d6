//! When bytes last moved on a connection, in milliseconds since it began, and a future that
//! resolves once nothing has moved for a given time: the idle watchdog of the raw relay and of
//! WebSocket tunnels. One atomic store per touch; no timer is re-armed per byte.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    pub fn new() -> Self {
        Activity { epoch: Instant::now(), last_ms: AtomicU64::new(0) }
    }

    /// Milliseconds since the connection began.
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `idle`.
    pub async fn quiet_for(&self, idle: Duration) {
        loop {
            let quiet_until = self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + idle;
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
