//! What the engine asks of its embedder (the JavaScript side): take over a connection (socket
//! handlers), choose a backend (function targets), and hear about events. A trait, so sessions and
//! the HTTP engine stay free of napi; `bridge` implements it with JS handles. `Scripts` wraps the
//! trait with what every call needs: the call counter, the `jsCallTimeout` bound, 'error' events.

use std::future::Future;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::metrics::EngineMetrics;
use crate::routing::table::{Route, SelectedTarget, TargetFunctions};

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The facts of a connection (and of a request, on HTTP routes) a script sees as `IRouteContext`.
#[derive(Debug, Clone, Default)]
pub struct ScriptContext {
    pub connection_id: u64,
    pub port: u16,
    pub domain: Option<String>,
    pub client_ip: Option<IpAddr>,
    pub client_port: u16,
    pub server_ip: Option<IpAddr>,
    pub is_tls: bool,
    pub tls_version: Option<&'static str>,
    pub route_name: Option<String>,
    pub route_id: Option<String>,
    pub path: Option<String>,
    pub query: Option<String>,
    pub headers: Option<Vec<(String, String)>>,
    /// The route's static hosts / port, where the target has them.
    pub target_host: Option<Vec<String>>,
    pub target_port: Option<u16>,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
}

impl ScriptContext {
    pub fn now_ms() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }

    /// The context of a connection (or of a request on it) that `route` matched: the request's
    /// own facts (path, query, headers) are the caller's to add.
    pub fn for_route(connection: &ConnectionIdentity, domain: Option<&str>, route: &Route) -> Self {
        ScriptContext {
            connection_id: connection.connection_id,
            port: connection.port,
            domain: domain.map(str::to_string),
            client_ip: Some(connection.client_ip),
            client_port: connection.client_port,
            server_ip: connection.server_ip,
            is_tls: connection.is_tls,
            tls_version: connection.tls_version,
            route_name: route.name.clone(),
            route_id: route.id.clone(),
            timestamp_ms: ScriptContext::now_ms(),
            ..ScriptContext::default()
        }
    }
}

/// Who is on a connection, as scripts and events name it: the one source of `ScriptContext` and
/// of the route-matched event, for sessions and HTTP requests alike.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionIdentity {
    pub connection_id: u64,
    pub port: u16,
    pub client_ip: IpAddr,
    pub client_port: u16,
    /// The address the client connected to, where the caller knows it.
    pub server_ip: Option<IpAddr>,
    pub is_tls: bool,
    pub tls_version: Option<&'static str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    /// The accepted TCP descriptor itself.
    Tcp,
    /// One end of a Unix socket pair; Rust relays the other end to the (TLS) client.
    Pair,
}

impl SocketKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SocketKind::Tcp => "tcp",
            SocketKind::Pair => "pair",
        }
    }
}

/// A connection given to a route's socket handler.
#[derive(Debug)]
pub struct Handoff {
    /// The wrapper's id of the handler function.
    pub handler: u32,
    pub fd: OwnedFd,
    pub kind: SocketKind,
    /// Bytes read to route the connection; the socket delivers them first.
    pub initial: Vec<u8>,
    pub context: ScriptContext,
}

/// One datagram of a UDP flow for a route's datagram handler; its answers come back through
/// the engine's `udp_reply`.
#[derive(Debug)]
pub struct DatagramDelivery {
    /// The wrapper's id of the handler function.
    pub handler: u32,
    pub data: Vec<u8>,
    pub client_ip: IpAddr,
    pub client_port: u16,
    /// The proxy's port the datagram came to (and replies leave from).
    pub port: u16,
    pub route_name: Option<String>,
}

/// How a handed-off socket ended, as the wrapper reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandoffEnd {
    /// The handler threw or rejected (the wrapper destroyed the socket).
    pub handler_failed: bool,
    /// Bytes JavaScript read from and wrote to the socket (not counting `initial`).
    pub bytes_read: u64,
    pub bytes_written: u64,
}

/// What the functions answered (each `None` where the target is static).
#[derive(Debug, Clone, Default)]
pub struct ScriptTarget {
    pub hosts: Option<Vec<String>>,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScriptError {
    /// The call did not settle within `jsCallTimeout`.
    Timeout(Duration),
    /// The function threw, rejected, or answered something unusable.
    Failed(String),
    /// The JavaScript side is gone (the environment is shutting down).
    Unavailable,
}

impl std::fmt::Display for ScriptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScriptError::Timeout(t) => write!(f, "did not settle within {} ms (jsCallTimeout)", t.as_millis()),
            ScriptError::Failed(reason) => f.write_str(reason),
            ScriptError::Unavailable => f.write_str("the JavaScript side is not available"),
        }
    }
}

/// Events a listener may ask for; 'connection' and 'route-matched' cost nothing unless listened to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Connection,
    RouteMatched,
}

#[derive(Debug, Clone)]
pub enum EngineEvent {
    Connection { connection_id: u64, client_ip: IpAddr, port: u16, domain: Option<String> },
    RouteMatched { connection_id: u64, client_ip: IpAddr, port: u16, domain: Option<String>, route_name: Option<String>, route_id: Option<String> },
    /// A data-path failure worth a user's attention.
    Error { code: &'static str, message: String, connection_id: u64, route_name: Option<String> },
    /// An automatic certificate was issued, renewed, failed, or is about to expire.
    Certificate { kind: CertificateEventKind, route_name: String, domain: String, expiry_ms: Option<u64>, error: Option<String> },
    /// Log entries for the `logger` option, in the order they happened.
    Log { entries: Vec<crate::logging::LogEntry> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateEventKind {
    Issued,
    Renewed,
    Failed,
    Expiring,
}

impl CertificateEventKind {
    /// The event's name on the SmartProxy emitter.
    pub fn event_name(self) -> &'static str {
        match self {
            CertificateEventKind::Issued => "certificate-issued",
            CertificateEventKind::Renewed => "certificate-renewed",
            CertificateEventKind::Failed => "certificate-failed",
            CertificateEventKind::Expiring => "certificate-expiring",
        }
    }
}

pub trait ScriptHost: Send + Sync + 'static {
    /// Gives the socket to the handler; resolves when the wrapper reports the socket closed.
    fn hand_off(&self, handoff: Handoff) -> BoxFuture<Result<HandoffEnd, ScriptError>>;
    fn resolve_target(&self, functions: TargetFunctions, context: ScriptContext) -> BoxFuture<Result<ScriptTarget, ScriptError>>;
    /// Queues a datagram for its handler, without waiting; false when it could not be queued
    /// (the JavaScript side is gone, or too far behind).
    fn datagram(&self, delivery: DatagramDelivery) -> bool;
    fn wants(&self, kind: EventKind) -> bool;
    fn emit(&self, event: EngineEvent);
}

/// The engine's handle on its script host.
#[derive(Clone)]
pub struct Scripts {
    host: Option<Arc<dyn ScriptHost>>,
    metrics: Arc<EngineMetrics>,
    call_timeout: Duration,
}

impl Scripts {
    pub fn new(host: Option<Arc<dyn ScriptHost>>, metrics: Arc<EngineMetrics>, call_timeout: Duration) -> Self {
        Scripts { host, metrics, call_timeout }
    }

    pub fn wants(&self, kind: EventKind) -> bool {
        self.host.as_ref().is_some_and(|h| h.wants(kind))
    }

    pub fn emit(&self, event: EngineEvent) {
        if let Some(host) = &self.host {
            host.emit(event);
        }
    }

    /// The 'route-matched' event, when the embedder listens for it.
    /// `connection` is asked only when someone listens (its server address may cost a system call).
    pub fn route_matched(&self, connection: impl FnOnce() -> ConnectionIdentity, domain: Option<&str>, route: &Route) {
        if self.wants(EventKind::RouteMatched) {
            let connection = connection();
            self.emit(EngineEvent::RouteMatched {
                connection_id: connection.connection_id,
                client_ip: connection.client_ip,
                port: connection.port,
                domain: domain.map(str::to_string),
                route_name: route.name.clone(),
                route_id: route.id.clone(),
            });
        }
    }

    /// Calls the target's functions, bounded by `jsCallTimeout`.
    async fn resolve_target(&self, functions: TargetFunctions, context: ScriptContext) -> Result<ScriptTarget, ScriptError> {
        let Some(host) = &self.host else {
            return Err(ScriptError::Unavailable);
        };
        self.metrics.js_calls.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(self.call_timeout, host.resolve_target(functions, context)).await {
            Ok(answer) => answer,
            Err(_) => Err(ScriptError::Timeout(self.call_timeout)),
        }
    }

    /// The host and port to connect to: the target's own, or what its functions answer for the
    /// context (built only when a function is called). A host list answered rotates like a static one.
    pub async fn endpoint(&self, target: &SelectedTarget<'_>, context: impl FnOnce() -> ScriptContext) -> Result<(Arc<str>, u16), ScriptError> {
        let Some(functions) = target.functions else {
            return Ok((target.host.clone(), target.port));
        };
        let mut context = context();
        if functions.host.is_none() {
            context.target_host = Some(target.hosts.iter().map(|host| host.to_string()).collect());
        }
        if functions.port.is_none() {
            context.target_port = Some(target.port);
        }
        let connection_id = context.connection_id;
        let route_name = context.route_name.clone();
        let endpoint = self.resolve_target(functions, context).await.and_then(|answer| {
            let host: Arc<str> = match (functions.host, answer.hosts) {
                (None, _) => target.host.clone(),
                (Some(_), Some(hosts)) if !hosts.is_empty() => Arc::from(hosts[target.turn % hosts.len()].as_str()),
                (Some(_), _) => return Err(ScriptError::Failed("the host function answered no host".into())),
            };
            let port = match (functions.port, answer.port) {
                (None, _) => target.port,
                (Some(_), Some(port)) if port != 0 => port,
                (Some(_), _) => return Err(ScriptError::Failed("the port function answered no valid port".into())),
            };
            Ok((host, port))
        });
        if let Err(err) = &endpoint {
            self.emit(EngineEvent::Error {
                code: "TARGET_FUNCTION_FAILED",
                message: format!("target function of route {}: {err}", route_name.as_deref().unwrap_or("(unnamed)")),
                connection_id,
                route_name,
            });
        }
        endpoint
    }

    /// A datagram for a route's handler; false when it was dropped.
    pub fn datagram(&self, delivery: DatagramDelivery) -> bool {
        match &self.host {
            Some(host) => {
                self.metrics.js_calls.fetch_add(1, Ordering::Relaxed);
                host.datagram(delivery)
            }
            None => false,
        }
    }

    /// Hands the socket over; the future ends when the socket is closed on the JavaScript side.
    /// Handler failures are reported by the wrapper itself, where the error object is.
    pub fn hand_off(&self, handoff: Handoff) -> BoxFuture<Result<HandoffEnd, ScriptError>> {
        match &self.host {
            Some(host) => {
                self.metrics.js_calls.fetch_add(1, Ordering::Relaxed);
                host.hand_off(handoff)
            }
            None => Box::pin(async { Err(ScriptError::Unavailable) }),
        }
    }
}
