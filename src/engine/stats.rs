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
    /// (ext) Read buffers lent to HTTP/1 connections that have bytes to work on right now, by
    /// every proxy of this process (idle connections hold none): 0 when no connection works.
    pub read_buffers_lent: u64,
    pub routes: usize,
    pub listening_ports: Vec<u16>,
    /// (ext) The UDP ports the routes take: datagram relays and handlers, and QUIC for HTTP/3.
    pub udp_ports: Vec<u16>,
    pub quic_ports: Vec<u16>,
    pub termination_reasons: BTreeMap<&'static str, u64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Per route: requests refused by its rate limit (429), authentication (401) and IP lists (403).
    pub refusals: BTreeMap<String, Refusals>,
    /// Per route with balanced targets: each backend's health and in-flight count.
    pub backends: BTreeMap<String, Vec<BackendStatus>>,
    /// Session-affinity lookups, Redis round trips and fallbacks to memory (once started).
    pub affinity: Option<AffinityStats>,
    /// (ext) State shared with other replicas through Redis; None without `options.redis`.
    pub shared_state: Option<crate::shared_state::SharedStateStats>,
    /// UDP flows open now.
    pub udp_sessions: u64,
    /// (ext) UDP routes' counters; None when no route takes UDP.
    pub udp: Option<crate::udp::UdpStatsSnapshot>,
    /// (ext) QUIC connections open now (HTTP/3; each is also one of the active connections).
    pub quic_connections: u64,
    /// (ext) QUIC's counters; None when no route serves HTTP/3.
    pub quic: Option<crate::quic::QuicStatsSnapshot>,
    /// Rate-limit keys dropped to keep routes within `rateLimit.maxKeys` (routes of the current
    /// table; affinity evictions are under `affinity`).
    pub rate_limit_evictions: u64,
    /// (ext) Kernel forwarding (`forwardingEngine: 'nftables'`): whether the table is in use, why
    /// not, and each kernel route's counters. None without kernel routes.
    pub kernel_forwarding: Option<crate::kernel::KernelStatus>,
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
        let (udp_sessions, udp) = self.udp_stats();
        let (quic_connections, quic) = self.quic_stats();
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
            read_buffers_lent: crate::http::read_buffer::lent(),
            routes: self.table.read().routes().len(),
            listening_ports: self.listening_ports(),
            udp_ports: self.table.read().udp_ports().into_iter().collect(),
            quic_ports: self.table.read().quic_ports().into_iter().collect(),
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
            shared_state: self.shared_state_stats(),
            udp_sessions,
            udp,
            quic_connections,
            quic,
            rate_limit_evictions: self.table.read().routes().iter().filter_map(|r| r.http_security.as_ref()).map(|s| s.rate_limit_evictions()).sum(),
            kernel_forwarding: self.kernel_status(),
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
            .map(|point| HistoryPoint { timestamp: point.at_ms, bytes_in: point.rate.bytes_in_per_sec, bytes_out: point.rate.bytes_out_per_sec })
            .collect()
    }
}

impl Engine {
    /// Every route's certificate that the engine serves: automatic ones (ACME or
    /// `certProvisionFunction`) and static ones.
    fn certificate_statuses(&self) -> Vec<(String, crate::acme::CertStatus)> {
        let mut statuses = self.acme.statuses();
        let table = self.table.read().clone();
        statuses.extend(table.routes().iter().filter_map(|route| Some((route.label.to_string(), route.static_certificate()?))));
        statuses
    }

    /// The Prometheus exposition of this engine (`getPrometheusMetrics()`, `metrics.prometheus`).
    /// Labels are bounded by configuration: routes, backends, domains, status classes and
    /// termination reasons, never client addresses or paths. Each family is read on its own from
    /// counters the data path only adds to: a scrape holds no lock the traffic waits on, beyond
    /// the short ones `getStatistics()` takes.
    pub fn prometheus(&self) -> String {
        use crate::metrics::prometheus::{Exposition, Kind};
        use crate::metrics::RouteStats;
        let m = &self.metrics;
        let statistics = self.statistics();
        let mut routes = m.routes.all();
        routes.sort_by(|a, b| a.0.cmp(&b.0));
        let count = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed) as f64;
        let mut out = Exposition::default();
        let per_route = |out: &mut Exposition, name: &str, kind: Kind, help: &str, value: &dyn Fn(&RouteStats) -> f64| {
            out.family(name, kind, help);
            for (label, stats) in &routes {
                out.sample(name, &[("route", label)], value(stats));
            }
        };

        out.family("smartproxy_build_info", Kind::Gauge, "The engine's version, as a label (always 1).");
        out.sample("smartproxy_build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1u8);
        let engine_wide = [
            ("smartproxy_connections_active", Kind::Gauge, "Client connections open now.", statistics.active_connections),
            ("smartproxy_tls_connections_active", Kind::Gauge, "Client connections open now over TLS (passed through or terminated).", statistics.tls_connections),
            ("smartproxy_http_connections_active", Kind::Gauge, "Client connections the HTTP engine serves now.", statistics.http_connections),
            ("smartproxy_websocket_tunnels_active", Kind::Gauge, "WebSocket tunnels open now.", statistics.websocket_connections),
            ("smartproxy_connections_total", Kind::Counter, "Client connections accepted.", statistics.total_connections),
            ("smartproxy_websocket_tunnels_total", Kind::Counter, "WebSocket tunnels opened.", statistics.websocket_total),
            ("smartproxy_quic_connections_active", Kind::Gauge, "QUIC (HTTP/3) client connections open now.", statistics.quic_connections),
            ("smartproxy_quic_connections_total", Kind::Counter, "QUIC (HTTP/3) client connections whose handshake completed.", statistics.quic.as_ref().map_or(0, |q| q.connections_total)),
            ("smartproxy_http_requests_received_total", Kind::Counter, "Requests the HTTP engine received (routed or not).", statistics.http_requests),
            ("smartproxy_received_bytes_total", Kind::Counter, "Bytes read from clients.", statistics.bytes_in),
            ("smartproxy_sent_bytes_total", Kind::Counter, "Bytes written to clients.", statistics.bytes_out),
            ("smartproxy_js_calls_total", Kind::Counter, "Calls into JavaScript (function targets, socket handlers).", statistics.js_calls),
            ("smartproxy_read_buffers_lent", Kind::Gauge, "Read buffers lent to HTTP/1 connections that have bytes to work on (the whole process).", statistics.read_buffers_lent),
            ("smartproxy_rate_limit_evictions_total", Kind::Counter, "Rate-limit keys dropped to keep routes within rateLimit.maxKeys.", statistics.rate_limit_evictions),
            ("smartproxy_access_log_lines_total", Kind::Counter, "Access log lines written.", m.access_log.written.load(Ordering::Relaxed)),
            (
                "smartproxy_upstream_connections_reused_total",
                Kind::Counter,
                "HTTP requests sent over a pooled upstream connection (or a shared HTTP/2 one).",
                m.upstream.reused.load(Ordering::Relaxed),
            ),
            ("smartproxy_upstream_connections_opened_total", Kind::Counter, "New HTTP upstream connections.", m.upstream.connected.load(Ordering::Relaxed)),
            (
                "smartproxy_upstream_connect_failures_total",
                Kind::Counter,
                "HTTP upstream connects that failed (refused, timed out, TLS or handshake); raw TCP routes count theirs in the terminations.",
                m.upstream.connect_failures.load(Ordering::Relaxed),
            ),
            (
                "smartproxy_upstream_pool_exhausted_total",
                Kind::Counter,
                "HTTP upstream checkouts that waited their connect timeout at a backend's connection cap.",
                m.upstream.exhausted.load(Ordering::Relaxed),
            ),
            (
                "smartproxy_access_log_dropped_total",
                Kind::Counter,
                "Access log lines dropped because the writer was behind (or the file could not be written).",
                m.access_log.dropped.load(Ordering::Relaxed),
            ),
        ];
        let affinity = statistics.affinity.as_ref().map(|affinity| {
            [
                ("smartproxy_affinity_lookups_total", Kind::Counter, "Session-affinity lookups.", affinity.lookups),
                ("smartproxy_affinity_redis_lookups_total", Kind::Counter, "Session-affinity lookups that went to Redis.", affinity.redis_lookups),
                ("smartproxy_affinity_redis_fallbacks_total", Kind::Counter, "Session-affinity lookups answered from memory because Redis failed.", affinity.redis_fallbacks),
                ("smartproxy_affinity_evictions_total", Kind::Counter, "Session-affinity bindings dropped to keep routes within maxKeys.", affinity.evictions),
            ]
        });
        let shared = statistics.shared_state.as_ref().map(|shared| {
            [
                ("smartproxy_redis_reachable", Kind::Gauge, "Whether the last call to the replicas' shared Redis was answered.", u64::from(shared.redis_reachable)),
                ("smartproxy_shared_rate_limit_calls_total", Kind::Counter, "Rate-limit checks sent to Redis.", shared.rate_limit_calls),
                ("smartproxy_shared_rate_limit_script_calls_total", Kind::Counter, "Rate-limit script calls to Redis (checks of one key that arrive together share one).", shared.rate_limit_script_calls),
                ("smartproxy_shared_rate_limit_fallbacks_total", Kind::Counter, "Rate-limit checks answered by this replica alone because Redis failed.", shared.rate_limit_fallbacks),
                ("smartproxy_certificate_lock_waits_total", Kind::Counter, "Waits for another replica's certificate order.", shared.lock_waits),
                ("smartproxy_certificates_loaded_total", Kind::Counter, "Certificates installed from Redis.", shared.certificates_loaded),
                ("smartproxy_certificate_orders_total", Kind::Counter, "ACME orders this replica placed holding the shared lock.", shared.orders_placed),
            ]
        });
        for (name, kind, help, value) in engine_wide.into_iter().chain(affinity.into_iter().flatten()).chain(shared.into_iter().flatten()) {
            out.family(name, kind, help);
            out.sample(name, &[], value as f64);
        }
        out.family("smartproxy_connection_terminations_total", Kind::Counter, "Client connections ended, by why they ended.");
        for (reason, n) in m.termination_counts() {
            out.sample("smartproxy_connection_terminations_total", &[("reason", reason)], n as f64);
        }

        per_route(&mut out, "smartproxy_route_connections_active", Kind::Gauge, "Connections (and HTTP requests in flight) of each route now.", &|s| {
            count(&s.active)
        });
        per_route(&mut out, "smartproxy_route_connections_total", Kind::Counter, "Connections and HTTP requests each route took.", &|s| count(&s.total));
        per_route(&mut out, "smartproxy_route_received_bytes_total", Kind::Counter, "Bytes read from clients, by route.", &|s| count(&s.bytes.bytes_in));
        per_route(&mut out, "smartproxy_route_sent_bytes_total", Kind::Counter, "Bytes written to clients, by route.", &|s| count(&s.bytes.bytes_out));
        out.family("smartproxy_http_requests_total", Kind::Counter, "HTTP requests a route answered, by status class.");
        for (label, stats) in &routes {
            for (class, n) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().zip(&stats.responses) {
                out.sample("smartproxy_http_requests_total", &[("route", label), ("class", class)], count(n));
            }
        }
        out.family(
            "smartproxy_http_request_duration_seconds",
            Kind::Histogram,
            "Time from an HTTP request's head to its response's head, by route.",
        );
        for (label, stats) in &routes {
            out.histogram("smartproxy_http_request_duration_seconds", &[("route", label)], &stats.response_time);
        }
        out.family(
            "smartproxy_route_refusals_total",
            Kind::Counter,
            "Requests a route refused: rate limit (429), authentication (401), IP lists (403).",
        );
        for (label, stats) in &routes {
            for (reason, n) in [("rate_limit", &stats.rate_limited), ("auth", &stats.unauthorized), ("ip", &stats.forbidden)] {
                out.sample("smartproxy_route_refusals_total", &[("route", label), ("reason", reason)], count(n));
            }
        }

        let backends: Vec<(&str, String, &crate::balance::BackendStatus)> = statistics
            .backends
            .iter()
            .flat_map(|(route, backends)| backends.iter().map(move |b| (route.as_str(), format!("{}:{}", b.host, b.port), b)))
            .collect();
        out.family("smartproxy_backend_up", Kind::Gauge, "Whether a balanced backend takes traffic (1) or is marked down (0).");
        for (route, address, backend) in &backends {
            out.sample("smartproxy_backend_up", &[("route", route), ("backend", address)], u8::from(backend.healthy));
        }
        out.family("smartproxy_backend_requests_in_flight", Kind::Gauge, "Requests and connections a balanced backend holds now.");
        for (route, address, backend) in &backends {
            out.sample("smartproxy_backend_requests_in_flight", &[("route", route), ("backend", address)], backend.in_flight as f64);
        }

        out.family(
            "smartproxy_certificate_expiry_timestamp_seconds",
            Kind::Gauge,
            "When a route's certificate expires (Unix seconds), automatic or static, by route and domain.",
        );
        for (route, status) in self.certificate_statuses() {
            if let Some(expiry_ms) = status.expiry_date {
                out.sample("smartproxy_certificate_expiry_timestamp_seconds", &[("route", &route), ("domain", &status.domain)], (expiry_ms / 1000) as f64);
            }
        }

        out.finish()
    }
}

/// `/api/status` of the admin listener: what the status page shows.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub version: &'static str,
    pub uptime_seconds: u64,
    pub stopping: bool,
    pub listening_ports: Vec<u16>,
    pub connections: StatusConnections,
    pub http_requests: u64,
    pub routes: Vec<RouteStatus>,
    pub backends: Vec<BackendRow>,
    pub certificates: Vec<CertificateRow>,
    /// The last `STATUS_HISTORY_SECONDS`, one point per second, oldest first.
    pub history: Vec<StatusPoint>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusConnections {
    pub active: u64,
    pub tls: u64,
    pub http: u64,
    pub websocket: u64,
    pub total: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteStatus {
    pub name: String,
    pub kind: &'static str,
    pub active: u64,
    pub total: u64,
    /// HTTP requests answered, by status class `1xx` … `5xx`.
    pub responses: BTreeMap<&'static str, u64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendRow {
    pub route: String,
    #[serde(flatten)]
    pub backend: BackendStatus,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateRow {
    pub route: String,
    #[serde(flatten)]
    pub status: crate::acme::CertStatus,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusPoint {
    /// Milliseconds since the Unix epoch, at the end of the second.
    pub time: u64,
    pub requests_per_second: f64,
    pub bytes_in_per_second: f64,
    pub bytes_out_per_second: f64,
    pub connections: u64,
}

/// How much history the status carries.
const STATUS_HISTORY_SECONDS: usize = 300;

impl Engine {
    pub fn status(&self) -> Status {
        let statistics = self.statistics();
        let table = self.table.read().clone();
        let routes = table
            .routes()
            .iter()
            .map(|route| {
                let stats = &route.stats;
                let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
                RouteStatus {
                    name: route.label.to_string(),
                    kind: route.kind(),
                    active: load(&stats.active),
                    total: load(&stats.total),
                    responses: ["1xx", "2xx", "3xx", "4xx", "5xx"].into_iter().zip(stats.responses.iter().map(load)).collect(),
                    bytes_in: load(&stats.bytes.bytes_in),
                    bytes_out: load(&stats.bytes.bytes_out),
                }
            })
            .collect();
        let backends = statistics
            .backends
            .into_iter()
            .flat_map(|(route, backends)| backends.into_iter().map(move |backend| BackendRow { route: route.clone(), backend }))
            .collect();
        let certificates = self.certificate_statuses().into_iter().map(|(route, status)| CertificateRow { route, status }).collect();
        let history = self
            .metrics
            .ring
            .lock()
            .history(STATUS_HISTORY_SECONDS)
            .into_iter()
            .map(|point| StatusPoint {
                time: point.at_ms,
                requests_per_second: point.rate.requests_per_sec,
                bytes_in_per_second: point.rate.bytes_in_per_sec,
                bytes_out_per_second: point.rate.bytes_out_per_sec,
                connections: point.active,
            })
            .collect();
        Status {
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: self.started_at.lock().map_or(0, |at| at.elapsed().as_secs()),
            stopping: self.is_stopping(),
            listening_ports: statistics.listening_ports,
            connections: StatusConnections {
                active: statistics.active_connections,
                tls: statistics.tls_connections,
                http: statistics.http_connections,
                websocket: statistics.websocket_connections,
                total: statistics.total_connections,
            },
            http_requests: statistics.http_requests,
            routes,
            backends,
            certificates,
            history,
        }
    }
}
