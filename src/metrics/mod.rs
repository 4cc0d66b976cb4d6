//! Counters and throughput rings for one engine: connections (global, per route, per client IP),
//! bytes on the client side, requests and termination reasons; a per-second sampler turns byte
//! totals into rates. Lock-free on the data path (relaxed atomics); rings are touched once a second.
//! Knows nothing of sockets or napi.

pub mod prometheus;
mod rate;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

pub use rate::{Rate, RateRing};

/// Why a connection ended. Every exit path of a session names one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TerminationReason {
    /// Both directions finished with an orderly close.
    Completed,
    ClientClosedBeforeData,
    ClientClosedDuringConnect,
    ClientError,
    BackendError,
    InitialDataTimeout,
    IdleTimeout,
    /// An HTTP connection sat between requests past `httpKeepAliveTimeout`.
    KeepAliveTimeout,
    /// A later HTTP/1.x request head did not complete within `headerTimeout` of its first byte.
    HeadTimeout,
    LifetimeExceeded,
    InvalidTls,
    TlsHandshakeFailed,
    InvalidHttp,
    NoRoute,
    NoTarget,
    IpBlocked,
    RouteIpBlocked,
    PerIpLimit,
    RateLimited,
    RouteConnectionLimit,
    BackendConnectFailed,
    BackendConnectTimeout,
    Shutdown,
    PendingDataOverflow,
    /// A call into JavaScript (a function target) timed out, threw or answered nonsense.
    ScriptFailed,
    /// The connection went to a socket handler, which closed it (or the client did).
    HandedToScript,
    /// A socket handler threw or rejected; its socket was destroyed.
    HandlerFailed,
    /// A trusted peer's PROXY header was missing or malformed, or an untrusted peer sent one.
    InvalidProxyHeader,
}

impl TerminationReason {
    pub const ALL: [TerminationReason; 28] = [
        Self::Completed,
        Self::ClientClosedBeforeData,
        Self::ClientClosedDuringConnect,
        Self::ClientError,
        Self::BackendError,
        Self::InitialDataTimeout,
        Self::IdleTimeout,
        Self::KeepAliveTimeout,
        Self::HeadTimeout,
        Self::LifetimeExceeded,
        Self::InvalidTls,
        Self::TlsHandshakeFailed,
        Self::InvalidHttp,
        Self::NoRoute,
        Self::NoTarget,
        Self::IpBlocked,
        Self::RouteIpBlocked,
        Self::PerIpLimit,
        Self::RateLimited,
        Self::RouteConnectionLimit,
        Self::BackendConnectFailed,
        Self::BackendConnectTimeout,
        Self::Shutdown,
        Self::PendingDataOverflow,
        Self::ScriptFailed,
        Self::HandedToScript,
        Self::HandlerFailed,
        Self::InvalidProxyHeader,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::ClientClosedBeforeData => "client_closed_before_data",
            Self::ClientClosedDuringConnect => "client_closed_during_connect",
            Self::ClientError => "client_error",
            Self::BackendError => "backend_error",
            Self::InitialDataTimeout => "initial_data_timeout",
            Self::IdleTimeout => "idle_timeout",
            Self::KeepAliveTimeout => "keep_alive_timeout",
            Self::HeadTimeout => "head_timeout",
            Self::LifetimeExceeded => "lifetime_exceeded",
            Self::InvalidTls => "invalid_tls",
            Self::TlsHandshakeFailed => "tls_handshake_failed",
            Self::InvalidHttp => "invalid_http",
            Self::NoRoute => "no_route",
            Self::NoTarget => "no_target",
            Self::IpBlocked => "ip_blocked",
            Self::RouteIpBlocked => "route_ip_blocked",
            Self::PerIpLimit => "per_ip_limit",
            Self::RateLimited => "rate_limited",
            Self::RouteConnectionLimit => "route_connection_limit",
            Self::BackendConnectFailed => "backend_connect_failed",
            Self::BackendConnectTimeout => "backend_connect_timeout",
            Self::Shutdown => "shutdown",
            Self::PendingDataOverflow => "pending_data_overflow",
            Self::ScriptFailed => "script_failed",
            Self::HandedToScript => "handed_to_script",
            Self::HandlerFailed => "handler_failed",
            Self::InvalidProxyHeader => "invalid_proxy_header",
        }
    }

    fn slot(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Bytes on the client side: `bytes_in` read from the client, `bytes_out` written to it.
#[derive(Debug, Default)]
pub struct ByteCounters {
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

impl ByteCounters {
    pub fn totals(&self) -> (u64, u64) {
        (self.bytes_in.load(Ordering::Relaxed), self.bytes_out.load(Ordering::Relaxed))
    }
}

/// Per-route counters. They outlive a route table: `updateRoutes` keeps a route's counters when a
/// route of the same name survives, so `maxConnections` and metrics stay true across updates.
#[derive(Debug)]
pub struct RouteStats {
    pub active: AtomicU64,
    pub total: AtomicU64,
    /// Requests refused by the route's checks: 429 (rate limit), 401 (authentication), 403 (IP lists).
    pub rate_limited: AtomicU64,
    pub unauthorized: AtomicU64,
    pub forbidden: AtomicU64,
    /// HTTP requests answered, by status class (1xx to 5xx).
    pub responses: [AtomicU64; 5],
    /// HTTP requests, from the request head to the response head.
    pub response_time: Histogram,
    pub bytes: ByteCounters,
    pub ring: Mutex<RateRing>,
}

impl RouteStats {
    /// One HTTP request of the route answered with `status`, its response head `elapsed` after
    /// its request head.
    pub fn record_response(&self, status: u16, elapsed: std::time::Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.responses[class].fetch_add(1, Ordering::Relaxed);
        self.response_time.record(elapsed);
    }
}

/// Upper bounds of the request-duration buckets, in microseconds: Prometheus' default buckets,
/// with finer ones below them, since a request through a proxy next to its backend is often
/// answered faster than the smallest default bucket.
pub const DURATION_BOUNDS_MICROS: [u64; 15] =
    [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 10_000_000];

/// A histogram of durations with fixed buckets: one relaxed add per bucket hit, the count and the
/// sum; read without a lock (a scrape may see one request's bucket before its count, never worse).
#[derive(Debug, Default)]
pub struct Histogram {
    /// Non-cumulative counts: `buckets[i]` for durations up to `DURATION_BOUNDS_MICROS[i]`, the
    /// last one for longer ones.
    buckets: [AtomicU64; DURATION_BOUNDS_MICROS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn record(&self, elapsed: std::time::Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = DURATION_BOUNDS_MICROS.partition_point(|bound| *bound < micros);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Cumulative counts per bound (the last is `+Inf`, the total), and the sum in seconds.
    pub fn snapshot(&self) -> ([u64; DURATION_BOUNDS_MICROS.len() + 1], f64) {
        let mut cumulative = [0; DURATION_BOUNDS_MICROS.len() + 1];
        let mut running = 0;
        for (slot, bucket) in cumulative.iter_mut().zip(&self.buckets) {
            running += bucket.load(Ordering::Relaxed);
            *slot = running;
        }
        (cumulative, self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6)
    }
}

impl Default for RouteStats {
    fn default() -> Self {
        RouteStats {
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            unauthorized: AtomicU64::new(0),
            forbidden: AtomicU64::new(0),
            responses: Default::default(),
            response_time: Histogram::default(),
            bytes: ByteCounters::default(),
            ring: Mutex::new(RateRing::new(PER_KEY_HISTORY_SECONDS)),
        }
    }
}

/// Seconds of per-route and per-IP history kept for `byRoute(window)` / `byIP(window)`.
pub const PER_KEY_HISTORY_SECONDS: usize = 60;
/// Seconds of engine-wide history kept for `history(seconds)` and `custom(seconds)`.
pub const ENGINE_HISTORY_SECONDS: usize = 3600;

#[derive(Debug, Default)]
pub struct RouteStatsRegistry {
    by_label: Mutex<HashMap<Arc<str>, Arc<RouteStats>>>,
}

impl RouteStatsRegistry {
    pub fn get(&self, label: &Arc<str>) -> Arc<RouteStats> {
        self.by_label.lock().entry(label.clone()).or_default().clone()
    }

    pub fn all(&self) -> Vec<(Arc<str>, Arc<RouteStats>)> {
        self.by_label.lock().iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Forget routes that no table uses and no connection holds any more.
    pub fn retain_labels(&self, live: &[Arc<str>]) {
        self.by_label
            .lock()
            .retain(|label, stats| live.contains(label) || stats.active.load(Ordering::Relaxed) > 0);
    }
}

#[derive(Debug)]
pub struct EngineMetrics {
    pub active: AtomicU64,
    pub active_tls: AtomicU64,
    /// Client connections served by the HTTP engine right now.
    pub active_http: AtomicU64,
    /// WebSocket tunnels open right now, and all opened so far.
    pub active_websocket: AtomicU64,
    pub websocket_total: AtomicU64,
    pub total: AtomicU64,
    pub requests: AtomicU64,
    /// Requests the HTTP engine handled (a subset of `requests`).
    pub http_requests: AtomicU64,
    /// Calls made into JavaScript (function targets, socket hand-offs); routes without functions
    /// never add to it.
    pub js_calls: AtomicU64,
    pub bytes: ByteCounters,
    terminations: [AtomicU64; TerminationReason::ALL.len()],
    pub ring: Mutex<RateRing>,
    pub routes: RouteStatsRegistry,
    /// Access log lines written and dropped (kept across restarts, as the other counters).
    pub access_log: Arc<crate::access_log::AccessLogCounters>,
    /// The HTTP engine's upstream checkouts: reused, connected, failed.
    pub upstream: Arc<crate::http::pool::UpstreamCounters>,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        EngineMetrics {
            active: AtomicU64::new(0),
            active_tls: AtomicU64::new(0),
            active_http: AtomicU64::new(0),
            active_websocket: AtomicU64::new(0),
            websocket_total: AtomicU64::new(0),
            total: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            http_requests: AtomicU64::new(0),
            js_calls: AtomicU64::new(0),
            bytes: ByteCounters::default(),
            terminations: std::array::from_fn(|_| AtomicU64::new(0)),
            ring: Mutex::new(RateRing::new(ENGINE_HISTORY_SECONDS)),
            routes: RouteStatsRegistry::default(),
            access_log: Arc::default(),
            upstream: Arc::default(),
        }
    }
}

/// One unit of an engine gauge (`active_http`, `active_websocket`), held for as long as this
/// lives and given back when it is dropped, whatever way its owner ends.
pub struct GaugeHold {
    metrics: Arc<EngineMetrics>,
    gauge: fn(&EngineMetrics) -> &AtomicU64,
}

impl GaugeHold {
    pub fn enter(metrics: Arc<EngineMetrics>, gauge: fn(&EngineMetrics) -> &AtomicU64) -> Self {
        gauge(&metrics).fetch_add(1, Ordering::AcqRel);
        GaugeHold { metrics, gauge }
    }
}

impl Drop for GaugeHold {
    fn drop(&mut self) {
        (self.gauge)(&self.metrics).fetch_sub(1, Ordering::AcqRel);
    }
}

impl EngineMetrics {
    pub fn record_termination(&self, reason: TerminationReason) {
        self.terminations[reason.slot()].fetch_add(1, Ordering::Relaxed);
    }

    /// The reasons connections ended for so far, with their counts (those that happened).
    pub fn terminations(&self) -> Vec<(&'static str, u64)> {
        self.termination_counts().filter(|(_, n)| *n > 0).collect()
    }

    /// Every reason with its count, zeros included.
    pub fn termination_counts(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        TerminationReason::ALL.iter().map(|r| (r.as_str(), self.terminations[r.slot()].load(Ordering::Relaxed)))
    }

    /// Called once a second by the engine's sampler.
    pub fn sample(&self, now_ms: u64) {
        let (bytes_in, bytes_out) = self.bytes.totals();
        self.ring.lock().push(now_ms, bytes_in, bytes_out, self.requests.load(Ordering::Relaxed), self.active.load(Ordering::Relaxed));
        for (_, stats) in self.routes.all() {
            let (i, o) = stats.bytes.totals();
            stats.ring.lock().push(now_ms, i, o, stats.total.load(Ordering::Relaxed), stats.active.load(Ordering::Relaxed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_slot() {
        let m = EngineMetrics::default();
        for r in TerminationReason::ALL {
            m.record_termination(r);
        }
        let all = m.terminations();
        assert_eq!(all.len(), TerminationReason::ALL.len());
        assert!(all.iter().all(|(_, n)| *n == 1));
    }

    #[test]
    fn a_histogram_counts_each_duration_once_and_cumulates_on_reading() {
        let stats = RouteStats::default();
        stats.record_response(200, std::time::Duration::from_micros(100));
        stats.record_response(204, std::time::Duration::from_micros(101));
        stats.record_response(503, std::time::Duration::from_secs(60));
        stats.record_response(99, std::time::Duration::ZERO);
        let (cumulative, sum) = stats.response_time.snapshot();
        assert_eq!(&cumulative[..3], &[2, 3, 3], "100 µs is in the first bucket (le), 101 in the second");
        assert_eq!(cumulative[DURATION_BOUNDS_MICROS.len() - 1], 3, "a minute is beyond every bound");
        assert_eq!(cumulative[DURATION_BOUNDS_MICROS.len()], 4);
        assert!((sum - 60.000201).abs() < 1e-9);
        let classes: Vec<u64> = stats.responses.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        assert_eq!(classes, [1, 2, 0, 0, 1], "a status below 100 counts as 1xx");
    }

    #[test]
    fn route_stats_survive_a_new_table_under_the_same_label() {
        let reg = RouteStatsRegistry::default();
        let label: Arc<str> = "api".into();
        let a = reg.get(&label);
        a.active.fetch_add(1, Ordering::Relaxed);
        assert!(Arc::ptr_eq(&a, &reg.get(&label)));
        reg.retain_labels(&[]);
        assert!(Arc::ptr_eq(&a, &reg.get(&label)), "an active route's counters are kept");
    }
}
