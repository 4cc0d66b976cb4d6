//! The engine-wide count of a connection, taken at accept and released on drop: whatever path a
//! session leaves by (refusal, timeout, error, panic unwinding), `activeConnections` goes back down.

use std::sync::atomic::Ordering;

use crate::metrics::EngineMetrics;

pub struct ConnectionGuard<'a> {
    metrics: &'a EngineMetrics,
    counted_as_tls: bool,
}

impl<'a> ConnectionGuard<'a> {
    pub fn new(metrics: &'a EngineMetrics) -> Self {
        metrics.active.fetch_add(1, Ordering::AcqRel);
        metrics.total.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard { metrics, counted_as_tls: false }
    }

    pub fn mark_tls(&mut self) {
        if !self.counted_as_tls {
            self.counted_as_tls = true;
            self.metrics.active_tls.fetch_add(1, Ordering::AcqRel);
        }
    }
}

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        self.metrics.active.fetch_sub(1, Ordering::AcqRel);
        if self.counted_as_tls {
            self.metrics.active_tls.fetch_sub(1, Ordering::AcqRel);
        }
    }
}
