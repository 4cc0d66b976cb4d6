//! One proxy instance (one `new SmartProxy()`): its route table snapshot, listening ports,
//! sessions, limits and metrics, and the control operations on them (start, stop, updateRoutes,
//! ports). Control operations are serialised; the data path never waits on them. Knows nothing of
//! napi: `lib.rs` wraps it.

mod runtime;
mod ops_http;
mod stats;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::{AccessLog, Destination, LogFormat};
use crate::kernel::{KernelForwarder, KernelStatus};
use crate::acme::{AcmeManager, CertStatus};
use crate::balance::health::HealthChecks;
use crate::balance::affinity::AffinityStore;
use crate::shared_state::SharedRedis;
use crate::udp::{UdpEnv, UdpPorts, UdpReplies, UdpStats};
use crate::quic::{QuicEnv, QuicPorts, QuicStats};
use crate::balance::BackendRegistry;
use crate::config::{ConfigError, EngineConfig, EngineOptions, RouteConfig};
use crate::http::pool::{PoolSettings, UpstreamPool};
use crate::http::pipeline::HttpEnv;
use crate::http::server::HttpLimitOptions;
use crate::listener::{BindError, ClientSocketOptions, OnAccept, PortManager};
use crate::logging;
use crate::hooks::{ScriptHost, Scripts};
use crate::metrics::EngineMetrics;
use crate::matchers::ip::IpList;
use crate::routing::RouteTable;
use crate::security::{ConnectionLimiter, IpPolicy};
use crate::session::{Session, SessionEnv};
use crate::tls::dynamic::CertSlots;


/// After the grace period, sessions are cancelled; this bounds the wait for them to unwind.
const FORCED_CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Closes an access log off the runtime's threads: closing waits for its writer to finish.
/// Reads the kernel routes' counters back every second, while the engine runs.
async fn read_kernel_counters(kernel: Arc<KernelForwarder>) {
    let mut every_second = tokio::time::interval(Duration::from_secs(1));
    loop {
        every_second.tick().await;
        kernel.refresh_counters().await;
    }
}

async fn close_access_log(access_log: Option<Arc<AccessLog>>) {
    if let Some(access_log) = access_log {
        let _ = tokio::task::spawn_blocking(move || access_log.close()).await;
    }
}
const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

pub struct Engine {
    options: EngineOptions,
    global_policy: IpPolicy,
    /// `proxyIPs`, parsed.
    trusted_proxies: IpList,
    metrics: Arc<EngineMetrics>,
    limiter: Arc<ConnectionLimiter>,
    table: Arc<RwLock<Arc<RouteTable>>>,
    next_session_id: Arc<AtomicU64>,
    control: tokio::sync::Mutex<Control>,
    /// What `getListeningPorts()` answers without waiting for a control operation to finish.
    listening: Mutex<Vec<u16>>,
    scripts: Scripts,
    /// Tables replaced by `updateRoutes` that connections may still use (and call functions of).
    retired_tables: Mutex<Vec<Weak<RouteTable>>>,
    /// Automatic certificates: their slots outlive tables; orders run while started.
    cert_slots: Arc<CertSlots>,
    acme: Arc<AcmeManager>,
    /// Backend health and in-flight counts, kept across tables; probes run while started.
    backends: Arc<BackendRegistry>,
    health_checks: HealthChecks,
    /// The nftables table of the routes the kernel forwards.
    kernel: Arc<KernelForwarder>,
    /// Made at the first start (its Redis client needs the runtime); kept across restarts.
    affinity: std::sync::OnceLock<Arc<AffinityStore>>,
    /// UDP flows' counters, kept across restarts.
    udp_stats: Arc<UdpStats>,
    /// QUIC connections' counters, kept across restarts.
    quic_stats: Arc<QuicStats>,
    /// The UDP ports' sockets and flows, for datagram handlers' replies.
    udp_replies: Arc<UdpReplies>,
    /// The Redis client replicas share state through (`options.redis`), made at the first start.
    shared: std::sync::OnceLock<Option<Arc<SharedRedis>>>,
    /// Raised when a stop begins, lowered by the next start.
    stopping: AtomicBool,
    /// When the last start began, for the status's uptime.
    started_at: Mutex<Option<std::time::Instant>>,
    /// `accessLog`'s format, checked at construction.
    access_log_format: Option<LogFormat>,
    /// The access log while started (`reopenLogs()` reaches it here).
    access_log: Mutex<Option<Arc<AccessLog>>>,
}

#[derive(Default)]
struct Control {
    /// Ports added with `addListeningPort` beyond those of the routes.
    extra_ports: BTreeSet<u16>,
    /// Route ports closed with `removeListeningPort`, until `updateRoutes` or `addListeningPort`.
    removed_ports: BTreeSet<u16>,
    running: Option<Running>,
}

struct Running {
    ports: PortManager,
    /// The UDP routes' ports, each with its relay.
    udp: UdpPorts,
    udp_env: Arc<UdpEnv>,
    /// The HTTP/3 routes' ports, each with its QUIC endpoint.
    quic: QuicPorts,
    quic_env: Arc<QuicEnv>,
    on_accept: OnAccept,
    sessions: TaskTracker,
    draining: CancellationToken,
    force_close: CancellationToken,
    pool: Arc<UpstreamPool>,
    sampler: JoinHandle<()>,
    /// Reads the kernel routes' counters back every second.
    kernel_counters: JoinHandle<()>,
    /// The `metrics.prometheus` and `admin` listeners, as configured.
    ops: Vec<ops_http::OpsListener>,
    /// Where this engine's log events go while it runs (`logger`, or standard error).
    _log: logging::Registration,
}

impl Drop for Running {
    /// An engine dropped while running leaves no task behind.
    fn drop(&mut self) {
        self.sampler.abort();
        self.kernel_counters.abort();
    }
}

#[derive(Debug)]
pub enum EngineError {
    Config(ConfigError),
    Bind(BindError),
    /// The access log's file could not be opened.
    AccessLog(std::io::Error),
    NotStarted,
}

impl std::fmt::Display for EngineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EngineError::Config(e) => e.fmt(f),
            EngineError::Bind(e) => e.fmt(f),
            EngineError::AccessLog(e) => e.fmt(f),
            EngineError::NotStarted => f.write_str("the proxy is not started"),
        }
    }
}

impl std::error::Error for EngineError {}

impl Engine {
    /// `script_host` answers socket handlers and function targets (the JavaScript side); routes
    /// that need it fail their connections without one.
    pub fn new(config: EngineConfig, script_host: Option<Arc<dyn ScriptHost>>) -> Result<Engine, ConfigError> {
        let metrics = Arc::new(EngineMetrics::default());
        let cert_slots = Arc::new(CertSlots::default());
        let backends = Arc::new(BackendRegistry::default());
        let table = RouteTable::compile(&config.routes, &metrics.routes, &cert_slots, &backends)?;
        let global_policy = global_policy(&config.options)?;
        let trusted_proxies = IpList::parse(&config.options.proxy_ips)
            .map_err(|(i, reason)| ConfigError::in_options(&format!("proxyIPs[{i}]"), reason))?;
        if let Some(redis) = &config.options.redis {
            redis::Client::open(redis.url.as_str()).map_err(|err| ConfigError::in_options("redis.url", err.to_string()))?;
            if let Some(key) = &redis.encryption_key {
                crate::shared_state::seal::Sealer::from_base64(key).map_err(|reason| ConfigError::in_options("redis.encryptionKey", reason))?;
            }
        }
        if config.options.send_proxy_protocol > 2 {
            return Err(ConfigError::in_options("sendProxyProtocol", "expected 1 or 2 (or false)"));
        }
        let access_log_format = match &config.options.access_log {
            Some(access_log) => Some(
                LogFormat::parse(&access_log.format)
                    .ok_or_else(|| ConfigError::in_options("accessLog.format", format!("expected 'json' or 'combined', got '{}'", access_log.format)))?,
            ),
            None => None,
        };
        let limiter = ConnectionLimiter::new(
            config.options.max_connections_per_ip,
            config.options.connection_rate_limit_per_minute,
        );
        let scripts = Scripts::new(script_host, metrics.clone(), Duration::from_millis(config.options.js_call_timeout_ms.max(1)));
        let acme = AcmeManager::new(cert_slots.clone(), scripts.clone());
        acme.sync_routes(&config.routes);
        Ok(Engine {
            cert_slots,
            acme,
            backends,
            health_checks: HealthChecks::default(),
            kernel: Arc::new(KernelForwarder::new(metrics.clone(), &config.options.default_security.ip_allow_list, &config.options.default_security.ip_block_list)),
            affinity: std::sync::OnceLock::new(),
            shared: std::sync::OnceLock::new(),
            udp_stats: Arc::default(),
            quic_stats: Arc::default(),
            udp_replies: Arc::default(),
            stopping: AtomicBool::new(false),
            started_at: Mutex::new(None),
            access_log_format,
            access_log: Mutex::new(None),
            scripts,
            retired_tables: Mutex::default(),
            global_policy,
            trusted_proxies,
            metrics,
            limiter: Arc::new(limiter),
            table: Arc::new(RwLock::new(Arc::new(table))),
            next_session_id: Arc::new(AtomicU64::new(1)),
            control: tokio::sync::Mutex::default(),
            listening: Mutex::default(),
            options: config.options,
        })
    }

    /// The runtime this engine's work runs on.
    pub fn runtime(&self) -> &'static tokio::runtime::Runtime {
        runtime::shared(self.options.worker_threads)
    }

    /// Binds every route port (all or none) and starts accepting. Starting twice is a no-op.
    pub async fn start(self: &Arc<Self>) -> Result<(), EngineError> {
        let mut control = self.control.lock().await;
        if control.running.is_some() {
            return Ok(());
        }
        let sessions = TaskTracker::new();
        let force_close = CancellationToken::new();
        // Cancelled by a force close too, so a session waiting for the drain sees either.
        let draining = force_close.child_token();
        let pool = Arc::new(UpstreamPool::new(PoolSettings::default(), self.metrics.upstream.clone()));
        let shared = self.shared_redis()?;
        let affinity = self.affinity_store(shared.clone());
        let access_log = self.open_access_log()?;
        let env = Arc::new(self.session_env(draining.clone(), force_close.clone(), pool.clone(), affinity.clone(), shared.clone(), access_log.clone()));
        let quic_env = Arc::new(QuicEnv::new(self.table.clone(), env.clone(), sessions.clone(), self.next_session_id.clone(), self.quic_stats.clone()));
        let on_accept = self.accept_callback(env, sessions.clone());
        if let Some(redis) = shared {
            self.acme.share(redis);
        }
        // Stored certificates serve the very first handshakes.
        self.acme.load_stored(None).await;
        self.stopping.store(false, Ordering::Release);
        *self.started_at.lock() = Some(std::time::Instant::now());
        let ops = match self.bind_ops_listeners().await {
            Ok(ops) => ops,
            Err(err) => {
                close_access_log(access_log).await;
                return Err(err);
            }
        };
        let mut ports = PortManager::new(ClientSocketOptions { no_delay: self.options.no_delay, keep_alive: self.client_keep_alive() });
        let udp_env = Arc::new(UdpEnv::new(self.table.clone(), self.global_policy.clone(), self.metrics.clone(), self.udp_stats.clone(), self.scripts.clone(), self.udp_replies.clone()));
        let mut udp = UdpPorts::default();
        let udp_wanted: Vec<u16> = self.table.read().udp_ports().into_iter().collect();
        let mut quic = QuicPorts::default();
        let quic_wanted: Vec<u16> = self.table.read().quic_ports().into_iter().collect();
        let bound = ports
            .bind_all(&self.wanted_ports(&control), &on_accept)
            .and_then(|()| udp.bind_all(&udp_wanted, &udp_env).map(drop))
            .and_then(|()| quic.bind_all(&quic_wanted, &quic_env).map(drop));
        if let Err(err) = bound {
            ports.release_all().await;
            udp.release_all().await;
            quic.release_all().await;
            for listener in ops {
                listener.stop().await;
            }
            close_access_log(access_log).await;
            return Err(EngineError::Bind(err));
        }
        *self.access_log.lock() = access_log;
        // Orders need the challenge port listening.
        self.acme.start(None);
        self.health_checks.sync(self.table.read().health_probes());
        let sampler = tokio::spawn(sample_every_second(self.metrics.clone(), self.limiter.clone(), pool.clone(), self.table.clone(), affinity));
        *self.listening.lock() = ports.ports();
        let log = logging::register(self.log_sink(), self.options.enable_detailed_logging);
        // After the log's registration: a warning that the kernel path is unavailable reaches it.
        let kernel_routes = self.table.read().kernel_routes();
        self.kernel.sync(&kernel_routes).await;
        let kernel_counters = tokio::spawn(read_kernel_counters(self.kernel.clone()));
        tracing::info!(ports = ?ports.ports(), routes = self.table.read().routes().len(), "proxy started");
        control.running = Some(Running { ports, udp, udp_env, quic, quic_env, on_accept, sessions, draining, force_close, pool, sampler, kernel_counters, ops, _log: log });
        Ok(())
    }

    /// Stops accepting, lets open connections finish within `gracefulShutdownTimeout`, then closes
    /// the rest. Stopping a stopped engine is a no-op.
    pub async fn stop(&self) {
        let mut control = self.control.lock().await;
        let Some(mut running) = control.running.take() else {
            return;
        };
        self.acme.stop();
        self.health_checks.stop_all();
        self.stopping.store(true, Ordering::Release);
        running.ports.release_all().await;
        running.udp.release_all().await;
        // QUIC connections drain with the other sessions; their endpoints close after them.
        running.quic.stop_accepting();
        self.listening.lock().clear();
        running.sampler.abort();
        running.kernel_counters.abort();
        // New flows are no longer forwarded once the table is gone; established ones may keep the
        // translation conntrack holds for them until they end: they are not ours to drain.
        self.kernel.remove().await;
        running.sessions.close();
        running.draining.cancel();
        running.pool.clear();
        let grace = Duration::from_millis(self.options.graceful_shutdown_timeout_ms);
        if tokio::time::timeout(grace, running.sessions.wait()).await.is_err() {
            running.force_close.cancel();
            let _ = tokio::time::timeout(FORCED_CLOSE_WAIT, running.sessions.wait()).await;
        }
        running.quic.release_all().await;
        // Connections returned to the pool by the last requests.
        running.pool.clear();
        // After the sessions: their last records are written before the file closes.
        let access_log = self.access_log.lock().take();
        close_access_log(access_log).await;
        // Last: `/healthz` says 503 for as long as the stop takes.
        for listener in std::mem::take(&mut running.ops) {
            listener.stop().await;
        }
        tracing::info!("proxy stopped");
    }

    /// Reopens the access log's file by its path (after logrotate renamed it); nothing without one.
    pub fn reopen_logs(&self) {
        if let Some(access_log) = self.access_log.lock().as_ref() {
            access_log.reopen();
        }
    }

    fn log_sink(&self) -> logging::LogSink {
        if self.options.logger {
            logging::LogSink::Logger(logging::LoggerSink::new(self.scripts.clone(), self.runtime().handle().clone()))
        } else {
            logging::LogSink::StandardError
        }
    }

    fn open_access_log(&self) -> Result<Option<Arc<AccessLog>>, EngineError> {
        let (Some(options), Some(format)) = (&self.options.access_log, self.access_log_format) else {
            return Ok(None);
        };
        let destination = options.path.as_ref().map_or(Destination::Stdout, |path| Destination::File(path.into()));
        AccessLog::open(destination, format, self.metrics.access_log.clone()).map(|log| Some(Arc::new(log))).map_err(EngineError::AccessLog)
    }

    /// A stop has begun (or the engine is stopped): what `/healthz` answers 503 for.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Binds `metrics.prometheus` and `admin` (all or none).
    async fn bind_ops_listeners(self: &Arc<Self>) -> Result<Vec<ops_http::OpsListener>, EngineError> {
        let mut wanted = Vec::new();
        if let Some(prometheus) = &self.options.prometheus {
            wanted.push((prometheus.host.clone(), prometheus.port, ops_http::Service::Scrape { path: prometheus.path.clone() }));
        }
        if let Some(admin) = &self.options.admin {
            wanted.push((admin.host.clone(), admin.port, ops_http::Service::Admin { token: admin.token.clone() }));
        }
        let mut bound = Vec::new();
        for (host, port, service) in wanted {
            match ops_http::OpsListener::bind(&host, port, service, Arc::downgrade(self)).await {
                Ok(listener) => bound.push(listener),
                Err(err) => {
                    for listener in bound {
                        listener.stop().await;
                    }
                    return Err(EngineError::Bind(err));
                }
            }
        }
        Ok(bound)
    }

    /// Swaps in a new route table; binds the ports it adds (all or none, else nothing changes) and
    /// releases the ports nobody uses any more. Open connections keep the table they started with.
    pub async fn update_routes(&self, routes: &[RouteConfig]) -> Result<(), EngineError> {
        let mut control = self.control.lock().await;
        let table = Arc::new(RouteTable::compile(routes, &self.metrics.routes, &self.cert_slots, &self.backends).map_err(EngineError::Config)?);
        let previous = std::mem::replace(&mut *self.table.write(), table.clone());
        self.retired_tables.lock().push(Arc::downgrade(&previous));
        let removed_before = std::mem::take(&mut control.removed_ports);
        let wanted = self.wanted_ports(&control);
        if let Some(running) = control.running.as_mut() {
            let udp_wanted: Vec<u16> = table.udp_ports().into_iter().collect();
            let quic_wanted: Vec<u16> = table.quic_ports().into_iter().collect();
            // A port still draining its HTTP/3 connections is closed now if it is wanted again.
            let wanted_udp_sides: Vec<u16> = udp_wanted.iter().chain(&quic_wanted).copied().collect();
            running.quic.reclaim(&wanted_udp_sides).await;
            let udp_added = match running.udp.bind_all(&udp_wanted, &running.udp_env) {
                Ok(added) => added,
                Err(err) => {
                    *self.table.write() = previous;
                    control.removed_ports = removed_before;
                    return Err(EngineError::Bind(err));
                }
            };
            let bound = match running.quic.bind_all(&quic_wanted, &running.quic_env) {
                Ok(quic_added) => running.ports.bind_all(&wanted, &running.on_accept).map_err(|err| (err, quic_added)),
                Err(err) => Err((err, Vec::new())),
            };
            if let Err((err, quic_added)) = bound {
                for port in udp_added {
                    running.udp.release(port).await;
                }
                for port in quic_added {
                    running.quic.release(port).await;
                }
                *self.table.write() = previous;
                control.removed_ports = removed_before;
                return Err(EngineError::Bind(err));
            }
            for port in running.udp.ports() {
                if !udp_wanted.contains(&port) {
                    running.udp.release(port).await;
                }
            }
            // As over TCP, open connections finish what they took: a GOAWAY, then the grace period.
            let grace = Duration::from_millis(self.options.graceful_shutdown_timeout_ms);
            for port in running.quic.ports() {
                if !quic_wanted.contains(&port) {
                    running.quic.retire(port, grace).await;
                }
            }
            for port in running.ports.ports() {
                if !wanted.contains(&port) {
                    running.ports.release(port).await;
                }
            }
            *self.listening.lock() = running.ports.ports();
        }
        let added = self.acme.sync_routes(routes);
        if control.running.is_some() {
            // One transaction: the old rules are replaced by the new, with no moment in between.
            self.kernel.sync(&table.kernel_routes()).await;
            self.acme.load_stored(Some(&added)).await;
            self.acme.start(Some(&added));
            self.health_checks.sync(table.health_probes());
        }
        self.backends.prune();
        let live: Vec<Arc<str>> = table.routes().iter().map(|r| r.label.clone()).collect();
        self.metrics.routes.retain_labels(&live);
        tracing::info!(routes = live.len(), ports = ?self.listening.lock().clone(), "routes updated");
        Ok(())
    }

    pub async fn add_listening_port(&self, port: u16) -> Result<(), EngineError> {
        let mut control = self.control.lock().await;
        let running = control.running.as_mut().ok_or(EngineError::NotStarted)?;
        running.ports.bind_all(&[port], &running.on_accept).map_err(EngineError::Bind)?;
        *self.listening.lock() = running.ports.ports();
        control.removed_ports.remove(&port);
        control.extra_ports.insert(port);
        Ok(())
    }

    pub async fn remove_listening_port(&self, port: u16) {
        let mut control = self.control.lock().await;
        control.extra_ports.remove(&port);
        control.removed_ports.insert(port);
        if let Some(running) = control.running.as_mut() {
            running.ports.release(port).await;
            *self.listening.lock() = running.ports.ports();
        }
    }

    /// The JavaScript functions the current table and every table still in use refer to; the
    /// wrapper may forget all others.
    pub fn live_function_ids(&self) -> Vec<u32> {
        let mut tables = vec![self.table.read().clone()];
        {
            let mut retired = self.retired_tables.lock();
            retired.retain(|weak| weak.strong_count() > 0);
            tables.extend(retired.iter().filter_map(Weak::upgrade));
        }
        let mut ids: Vec<u32> = tables.iter().flat_map(|t| t.routes().iter().flat_map(|r| r.function_ids()).collect::<Vec<_>>()).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    pub fn certificate_status(&self, route_name: &str) -> Option<CertStatus> {
        self.acme.status(route_name)
    }

    /// Orders the route's certificate now, one attempt (`provisionCertificate`, `renewCertificate`).
    pub async fn order_certificate(&self, route_name: &str) -> Result<(), String> {
        self.acme.order_now(route_name).await
    }

    /// Orders it in the background with retries (where `certProvisionFunction` answered 'http01').
    pub fn order_certificate_in_background(&self, route_name: &str) {
        self.acme.order_in_background(route_name.to_string());
    }

    /// A certificate from `certProvisionFunction` for one domain of the route.
    pub fn install_certificate(&self, route_name: &str, domain: &str, chain_pem: &str, key_pem: &str) -> Result<(), String> {
        self.acme.install_custom(route_name, domain, chain_pem, key_pem)
    }

    /// Kernel forwarding's state, when a route asks for it or its table is still in place.
    pub fn kernel_status(&self) -> Option<KernelStatus> {
        let status = self.kernel.status();
        let wanted = self.table.read().routes().iter().any(|route| route.kernel.is_some());
        (wanted || status.active).then_some(status)
    }

    pub fn listening_ports(&self) -> Vec<u16> {
        self.listening.lock().clone()
    }

    fn wanted_ports(&self, control: &Control) -> Vec<u16> {
        let mut ports = self.table.read().ports();
        ports.extend(control.extra_ports.iter().copied());
        ports.retain(|p| !control.removed_ports.contains(p));
        ports.into_iter().collect()
    }

    fn shared_redis(&self) -> Result<Option<Arc<SharedRedis>>, EngineError> {
        if let Some(shared) = self.shared.get() {
            return Ok(shared.clone());
        }
        let shared = match &self.options.redis {
            Some(options) => Some(SharedRedis::new(options).map_err(|reason| EngineError::Config(ConfigError::in_options("redis", reason)))?),
            None => None,
        };
        Ok(self.shared.get_or_init(|| shared).clone())
    }

    fn affinity_store(&self, shared: Option<Arc<SharedRedis>>) -> Arc<AffinityStore> {
        self.affinity.get_or_init(|| Arc::new(AffinityStore::new(shared))).clone()
    }

    /// Active UDP flows, and the UDP counters when a route takes UDP or a flow ever ran.
    /// A datagram handler's reply to a client of `port` (see `UdpReplies::reply`).
    pub fn udp_reply(&self, port: u16, client: std::net::SocketAddr, data: &[u8]) -> bool {
        self.udp_replies.reply(port, client, data, &self.udp_stats, &self.metrics)
    }

    pub fn quic_stats(&self) -> (u64, Option<crate::quic::QuicStatsSnapshot>) {
        let snapshot = self.quic_stats.snapshot();
        let wanted = !self.table.read().quic_ports().is_empty() || snapshot.connections_total > 0 || snapshot.refused > 0;
        (self.quic_stats.active(), wanted.then_some(snapshot))
    }

    pub fn udp_stats(&self) -> (u64, Option<crate::udp::UdpStatsSnapshot>) {
        let snapshot = self.udp_stats.snapshot();
        let wanted = !self.table.read().udp_ports().is_empty() || snapshot.sessions_total > 0;
        (self.udp_stats.active(), wanted.then_some(snapshot))
    }

    pub fn shared_state_stats(&self) -> Option<crate::shared_state::SharedStateStats> {
        self.shared.get().and_then(Option::as_ref).map(|shared| shared.stats())
    }

    pub fn affinity_stats(&self) -> Option<crate::balance::affinity::AffinityStats> {
        self.affinity.get().map(|store| store.stats())
    }

    /// Keep-alive probes on client and backend sockets (`keepAlive`, after
    /// `keepAliveInitialDelay`, at least a second).
    fn client_keep_alive(&self) -> Option<Duration> {
        let o = &self.options;
        o.keep_alive.then(|| Duration::from_millis(o.keep_alive_initial_delay_ms.max(1000)))
    }

    fn session_env(
        &self,
        draining: CancellationToken,
        force_close: CancellationToken,
        pool: Arc<UpstreamPool>,
        affinity: Arc<AffinityStore>,
        shared: Option<Arc<SharedRedis>>,
        access_log: Option<Arc<AccessLog>>,
    ) -> SessionEnv {
        let o = &self.options;
        SessionEnv {
            metrics: self.metrics.clone(),
            limiter: self.limiter.clone(),
            global_policy: self.global_policy.clone(),
            initial_data_timeout: Duration::from_millis(o.initial_data_timeout_ms),
            http_limits: HttpLimitOptions {
                max_header_size: o.max_header_size,
                header_timeout: Duration::from_millis(o.header_timeout_ms),
                max_concurrent_streams: o.http2_max_concurrent_streams,
                keep_alive_timeout: Duration::from_millis(o.http_keep_alive_timeout_ms),
            },
            idle_timeout: Duration::from_millis(o.socket_timeout_ms.min(o.inactivity_timeout_ms)),
            max_lifetime: Duration::from_millis(o.max_connection_lifetime_ms),
            max_pending_data: o.max_pending_data_size,
            no_delay: o.no_delay,
            keep_alive: self.client_keep_alive(),
            draining,
            force_close: force_close.clone(),
            proxy_header_from: o.accept_proxy_protocol.then(|| self.trusted_proxies.clone()),
            trusted_proxies: self.trusted_proxies.clone(),
            trust_forwarded_headers: o.trust_forwarded_headers,
            send_proxy_protocol: o.send_proxy_protocol,
            acme_challenges: self.acme.challenges(),
            http: Arc::new(HttpEnv {
                metrics: self.metrics.clone(),
                pool,
                no_delay: o.no_delay,
                scripts: self.scripts.clone(),
                send_proxy_protocol: o.send_proxy_protocol,
                affinity,
                shared,
                access_log,
                force_close,
            }),
        }
    }

    fn accept_callback(&self, env: Arc<SessionEnv>, sessions: TaskTracker) -> OnAccept {
        let table = self.table.clone();
        let next_id = self.next_session_id.clone();
        Arc::new(move |stream, peer, port| {
            let snapshot = table.read().clone();
            let session = Session::new(next_id.fetch_add(1, Ordering::Relaxed), peer, port);
            sessions.spawn(session.run(env.clone(), snapshot, stream));
        })
    }
}

fn global_policy(options: &EngineOptions) -> Result<IpPolicy, ConfigError> {
    let list = |items: &[String], field: &str| {
        IpList::parse(items).map_err(|(i, reason)| ConfigError::in_options(&format!("defaults.security.{field}[{i}]"), reason))
    };
    Ok(IpPolicy {
        allow: list(&options.default_security.ip_allow_list, "ipAllowList")?,
        block: list(&options.default_security.ip_block_list, "ipBlockList")?,
    })
}

/// How many connections must have ended, and how long since the last time, before idle workers
/// give their allocator's free memory back.
const GIVE_BACK_AFTER_CONNECTIONS: u64 = 1000;
const GIVE_BACK_INTERVAL: Duration = Duration::from_secs(10);

async fn sample_every_second(
    metrics: Arc<EngineMetrics>,
    limiter: Arc<ConnectionLimiter>,
    pool: Arc<UpstreamPool>,
    table: Arc<RwLock<Arc<RouteTable>>>,
    affinity: Arc<AffinityStore>,
) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ended_at_give_back = 0u64;
    let mut last_give_back = std::time::Instant::now();
    loop {
        tick.tick().await;
        // Many connections ended: what they held goes back to the system once workers idle.
        let ended = metrics.total.load(Ordering::Relaxed).saturating_sub(metrics.active.load(Ordering::Relaxed));
        if ended.saturating_sub(ended_at_give_back) >= GIVE_BACK_AFTER_CONNECTIONS && last_give_back.elapsed() >= GIVE_BACK_INTERVAL {
            ended_at_give_back = ended;
            last_give_back = std::time::Instant::now();
            runtime::give_memory_back();
            // Parked workers act on it only once they wake: a few trivial tasks wake them.
            for _ in 0..4 {
                tokio::spawn(async {});
            }
        }
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        metrics.sample(now_ms);
        limiter.sample_and_sweep(now_ms);
        pool.sweep();
        affinity.sweep();
        // Rate-limit keys live at most a window past their last request.
        let current = table.read().clone();
        for route in current.routes() {
            if let Some(security) = &route.http_security {
                security.sweep();
            }
        }
    }
}
