//! Read-only views of an engine for `getStatistics()` and `getMetrics()`.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use serde::Serialize;

use super::Engine;
use crate::balance::affinity::AffinityStats;
use crate::balance::BackendStatus;
use crate::metrics::Rate;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Statistics {
    pub active_connections: u64,
    pub tls_connections: u64,
    pub non_tls_connections: u64,
    /// Client connections the HTTP engine serves right now (plain or over terminated TLS).
    pub http_connections: u64,
    /// WebSocket tunnels open right now (each is also one of the active connections).
    pub websocket_connections: u64,
    /// WebSocket tunnels opened since start.
    pub websocket_total: u64,
    pub total_connections: u64,
    pub http_requests: u64,
    /// Calls into JavaScript so far (function targets and socket handlers).
    pub js_calls: u64,
    pub routes: usize,
    pub listening_ports: Vec<u16>,
    pub termination_reasons: BTreeMap<&'static str, u64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Per route: requests refused by its rate limit (429), authentication (401) and IP lists (403).
    pub refusals: BTreeMap<String, Refusals>,
    /// Per route with balanced targets: each backend's health and in-flight count.
    pub backends: BTreeMap<String, Vec<BackendStatus>>,
    /// Session-affinity lookups, Redis round trips and fallbacks to memory (once started).
    pub affinity: Option<AffinityStats>,
    /// Rate-limit keys dropped to keep routes within `rateLimit.maxKeys` (routes of the current
    /// table; affinity evictions are under `affinity`).
    pub rate_limit_evictions: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Refusals {
    pub rate_limited: u64,
    pub unauthorized: u64,
    pub forbidden: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Throughput {
    #[serde(rename = "in")]
    pub bytes_in: f64,
    #[serde(rename = "out")]
    pub bytes_out: f64,
}

impl From<Rate> for Throughput {
    fn from(rate: Rate) -> Self {
        Throughput { bytes_in: rate.bytes_in_per_sec, bytes_out: rate.bytes_out_per_sec }
    }
}

/// Everything `IMetrics` answers, for one throughput window.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricsQuery {
    pub active: u64,
    pub total: u64,
    pub active_by_route: BTreeMap<String, u64>,
    pub active_by_ip: BTreeMap<String, u32>,
    pub throughput: Throughput,
    pub throughput_by_route: BTreeMap<String, Throughput>,
    pub throughput_by_ip: BTreeMap<String, Throughput>,
    pub requests_per_second: f64,
    pub requests_per_minute: f64,
    pub requests_total: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

#[derive(Debug, Serialize)]
pub struct HistoryPoint {
    pub timestamp: u64,
    #[serde(rename = "in")]
    pub bytes_in: f64,
    #[serde(rename = "out")]
    pub bytes_out: f64,
}

impl Engine {
    pub fn statistics(&self) -> Statistics {
        let m = &self.metrics;
        let active = m.active.load(Ordering::Acquire);
        let tls = m.active_tls.load(Ordering::Acquire).min(active);
        let (bytes_in, bytes_out) = m.bytes.totals();
        Statistics {
            active_connections: active,
            tls_connections: tls,
            non_tls_connections: active - tls,
            http_connections: m.active_http.load(Ordering::Acquire).min(active),
            websocket_connections: m.active_websocket.load(Ordering::Acquire).min(active),
            websocket_total: m.websocket_total.load(Ordering::Relaxed),
            total_connections: m.total.load(Ordering::Relaxed),
            http_requests: m.http_requests.load(Ordering::Relaxed),
            js_calls: m.js_calls.load(Ordering::Relaxed),
            routes: self.table.read().routes().len(),
            listening_ports: self.listening_ports(),
            termination_reasons: m.terminations().into_iter().collect(),
            bytes_in,
            bytes_out,
            refusals: m
                .routes
                .all()
                .into_iter()
                .map(|(label, stats)| {
                    let count = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
                    let refusals = Refusals { rate_limited: count(&stats.rate_limited), unauthorized: count(&stats.unauthorized), forbidden: count(&stats.forbidden) };
                    (label.to_string(), refusals)
                })
                .collect(),
            backends: self
                .table
                .read()
                .routes()
                .iter()
                .map(|route| (route.label.to_string(), route.backend_statuses()))
                .filter(|(_, backends)| !backends.is_empty())
                .collect(),
            affinity: self.affinity_stats(),
            rate_limit_evictions: self.table.read().routes().iter().filter_map(|r| r.http_security.as_ref()).map(|s| s.rate_limit_evictions()).sum(),
        }
    }

    pub fn metrics(&self, window_seconds: usize) -> MetricsQuery {
        let m = &self.metrics;
        let routes = m.routes.all();
        let (bytes_in, bytes_out) = m.bytes.totals();
        let (second, minute) = {
            let ring = m.ring.lock();
            (ring.rate(1), ring.rate(60))
        };
        MetricsQuery {
            active: m.active.load(Ordering::Acquire),
            total: m.total.load(Ordering::Relaxed),
            active_by_route: routes.iter().map(|(l, s)| (l.to_string(), s.active.load(Ordering::Relaxed))).collect(),
            active_by_ip: self.limiter.active_by_ip().into_iter().map(|(ip, n)| (ip.to_string(), n)).collect(),
            throughput: m.ring.lock().rate(window_seconds).into(),
            throughput_by_route: routes.iter().map(|(l, s)| (l.to_string(), s.ring.lock().rate(window_seconds).into())).collect(),
            throughput_by_ip: self
                .limiter
                .throughput_by_ip(window_seconds)
                .into_iter()
                .map(|(ip, rate)| (ip.to_string(), rate.into()))
                .collect(),
            requests_per_second: second.requests_per_sec,
            requests_per_minute: minute.requests_per_sec * 60.0,
            requests_total: m.requests.load(Ordering::Relaxed),
            bytes_in,
            bytes_out,
        }
    }

    pub fn history(&self, seconds: usize) -> Vec<HistoryPoint> {
        self.metrics
            .ring
            .lock()
            .history(seconds)
            .into_iter()
            .map(|(timestamp, rate)| HistoryPoint { timestamp, bytes_in: rate.bytes_in_per_sec, bytes_out: rate.bytes_out_per_sec })
            .collect()
    }
}
