//! The JavaScript side of `hooks::ScriptHost`: the only module holding JS handles. Three weak
//! threadsafe functions the wrapper registers per engine (socket hand-off, target functions,
//! events; weak, because the wrapper's own timer keeps the process alive while the proxy runs),
//! and the JS shapes of what crosses (`IRouteContext` and friends).

use std::collections::HashMap;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use napi::bindgen_prelude::{Buffer, Either, Promise};
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::Status;
use napi_derive::napi;
use serde_json::json;

use crate::hooks::{BoxFuture, DatagramDelivery, EngineEvent, EventKind, Handoff, HandoffEnd, ScriptContext, ScriptError, ScriptHost, ScriptTarget};
use crate::routing::table::TargetFunctions;

/// `IRouteContext` as JavaScript receives it.
#[napi(object)]
pub struct RouteContext {
    pub port: u32,
    pub domain: Option<String>,
    pub client_ip: String,
    pub server_ip: String,
    pub path: Option<String>,
    pub query: Option<String>,
    pub headers: Option<HashMap<String, String>>,
    pub is_tls: bool,
    pub tls_version: Option<String>,
    pub route_name: Option<String>,
    pub route_id: Option<String>,
    pub target_host: Option<Vec<String>>,
    pub target_port: Option<u32>,
    pub timestamp: f64,
    pub connection_id: String,
}

/// A connection for a socket handler: `fd` is the wrapper's to close from now on.
#[napi(object)]
pub struct SocketHandoff {
    /// The wrapper's id of the handler function.
    pub handler: u32,
    pub fd: i32,
    /// `'tcp'`: the client's own socket; `'pair'`: a Unix socket carrying the plaintext.
    pub kind: String,
    /// Bytes already read from the client; the socket must deliver them first.
    pub initial: Buffer,
    pub client_port: u32,
    pub context: RouteContext,
}

/// What the wrapper reports when a handed-off socket has closed.
#[napi(object)]
pub struct SocketReport {
    pub handler_failed: bool,
    pub bytes_read: f64,
    pub bytes_written: f64,
}

/// A datagram for a route's `datagramHandler`; replies go back through `NativeEngine.udpReply`.
#[napi(object)]
pub struct DatagramCall {
    pub handler: u32,
    pub data: Buffer,
    pub client_ip: String,
    pub client_port: u32,
    pub port: u32,
    pub route_name: Option<String>,
}

#[napi(object)]
pub struct TargetCall {
    pub host_function: Option<u32>,
    pub port_function: Option<u32>,
    pub context: RouteContext,
}

/// The functions' answers, checked by the wrapper (hosts non-empty strings, port an integer).
#[napi(object)]
pub struct TargetAnswer {
    pub hosts: Option<Vec<String>>,
    pub port: Option<u32>,
}

pub type SocketCallback = ThreadsafeFunction<SocketHandoff, Promise<SocketReport>, SocketHandoff, Status, false, true>;
/// The promise comes first: a plain-object answer type would also accept a Promise (all its
/// fields are optional), and `Either` takes the first type that validates.
pub type TargetCallback =
    ThreadsafeFunction<TargetCall, Either<Promise<TargetAnswer>, TargetAnswer>, TargetCall, Status, false, true>;
/// Events wait here while the JavaScript thread is busy; beyond this many, new ones are dropped
/// (and counted) rather than growing memory without bound.
const EVENT_QUEUE_LIMIT: usize = 10_000;
pub type EventCallback = ThreadsafeFunction<serde_json::Value, (), serde_json::Value, Status, false, true, EVENT_QUEUE_LIMIT>;
/// Datagrams wait here for the JavaScript thread; beyond this many, new ones are dropped (as a
/// full socket buffer would) and counted by the UDP statistics.
const DATAGRAM_QUEUE_LIMIT: usize = 10_000;
pub type DatagramCallback = ThreadsafeFunction<DatagramCall, (), DatagramCall, Status, false, true, DATAGRAM_QUEUE_LIMIT>;

pub struct JsBridge {
    on_socket: Arc<SocketCallback>,
    resolve_target: Arc<TargetCallback>,
    on_event: EventCallback,
    on_datagram: DatagramCallback,
    wants_connection: AtomicBool,
    wants_route_matched: AtomicBool,
    dropped_events: AtomicU64,
}

impl JsBridge {
    pub fn new(on_socket: SocketCallback, resolve_target: TargetCallback, on_event: EventCallback, on_datagram: DatagramCallback) -> Self {
        JsBridge {
            on_socket: Arc::new(on_socket),
            resolve_target: Arc::new(resolve_target),
            on_event,
            on_datagram,
            wants_connection: AtomicBool::new(false),
            wants_route_matched: AtomicBool::new(false),
            dropped_events: AtomicU64::new(0),
        }
    }

    /// Events dropped because the JavaScript side fell more than `EVENT_QUEUE_LIMIT` behind.
    pub fn dropped_events(&self) -> u64 {
        self.dropped_events.load(Ordering::Relaxed)
    }

    /// The wrapper calls this as listeners come and go.
    pub fn set_interest(&self, connection: bool, route_matched: bool) {
        self.wants_connection.store(connection, Ordering::Relaxed);
        self.wants_route_matched.store(route_matched, Ordering::Relaxed);
    }
}

impl ScriptHost for JsBridge {
    fn hand_off(&self, handoff: Handoff) -> BoxFuture<Result<HandoffEnd, ScriptError>> {
        let on_socket = self.on_socket.clone();
        Box::pin(async move {
            let fd = handoff.fd.into_raw_fd();
            let call = SocketHandoff {
                handler: handoff.handler,
                fd,
                kind: handoff.kind.as_str().to_string(),
                initial: Buffer::from(handoff.initial),
                client_port: u32::from(handoff.context.client_port),
                context: route_context(handoff.context),
            };
            let closed = match on_socket.call_async_catch(call).await {
                Ok(closed) => closed,
                Err(err) => {
                    // Only a call that was never queued leaves the fd with us; once JavaScript ran,
                    // the descriptor is its own (the dispatcher closes it on its own failures).
                    if matches!(err.status, Status::Closing | Status::QueueFull) {
                        // SAFETY: `fd` came from `into_raw_fd` above and the call never reached
                        // JavaScript, so nothing else owns it.
                        drop(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                    return Err(ScriptError::Failed(format!("the socket could not be handed to JavaScript: {err}")));
                }
            };
            let report = closed.await.map_err(|err| ScriptError::Failed(err.reason.clone()))?;
            Ok(HandoffEnd {
                handler_failed: report.handler_failed,
                bytes_read: report.bytes_read.max(0.0) as u64,
                bytes_written: report.bytes_written.max(0.0) as u64,
            })
        })
    }

    fn resolve_target(&self, functions: TargetFunctions, context: ScriptContext) -> BoxFuture<Result<ScriptTarget, ScriptError>> {
        let resolve = self.resolve_target.clone();
        Box::pin(async move {
            let call = TargetCall { host_function: functions.host, port_function: functions.port, context: route_context(context) };
            let failed = |err: napi::Error| ScriptError::Failed(err.reason.clone());
            let answer = match resolve.call_async_catch(call).await.map_err(failed)? {
                Either::A(promise) => promise.await.map_err(failed)?,
                Either::B(answer) => answer,
            };
            let port = match answer.port {
                Some(port) => Some(u16::try_from(port).map_err(|_| ScriptError::Failed(format!("port {port} is out of range")))?),
                None => None,
            };
            Ok(ScriptTarget { hosts: answer.hosts, port })
        })
    }

    fn datagram(&self, delivery: DatagramDelivery) -> bool {
        let call = DatagramCall {
            handler: delivery.handler,
            data: Buffer::from(delivery.data),
            client_ip: delivery.client_ip.to_string(),
            client_port: u32::from(delivery.client_port),
            port: u32::from(delivery.port),
            route_name: delivery.route_name,
        };
        self.on_datagram.call(call, ThreadsafeFunctionCallMode::NonBlocking) == Status::Ok
    }

    fn wants(&self, kind: EventKind) -> bool {
        match kind {
            EventKind::Connection => self.wants_connection.load(Ordering::Relaxed),
            EventKind::RouteMatched => self.wants_route_matched.load(Ordering::Relaxed),
        }
    }

    fn emit(&self, event: EngineEvent) {
        let message = match event {
            EngineEvent::Connection { connection_id, client_ip, port, domain } => json!({
                "type": "connection",
                "data": { "connectionId": connection_id.to_string(), "clientIp": client_ip.to_string(), "port": port, "domain": domain },
            }),
            EngineEvent::RouteMatched { connection_id, client_ip, port, domain, route_name, route_id } => json!({
                "type": "route-matched",
                "data": {
                    "connectionId": connection_id.to_string(), "clientIp": client_ip.to_string(), "port": port,
                    "domain": domain, "routeName": route_name, "routeId": route_id,
                },
            }),
            EngineEvent::Error { code, message, connection_id, route_name } => json!({
                "type": "error",
                "data": { "code": code, "message": message, "connectionId": connection_id.to_string(), "routeName": route_name },
            }),
            EngineEvent::Certificate { kind, route_name, domain, expiry_ms, error } => json!({
                "type": kind.event_name(),
                "data": { "routeName": route_name, "domain": domain, "expiryDate": expiry_ms, "error": error },
            }),
            EngineEvent::Log { entries } => {
                let entries: Vec<serde_json::Value> = entries
                    .into_iter()
                    .map(|entry| json!({ "level": entry.level.as_str(), "message": entry.message, "fields": entry.fields }))
                    .collect();
                json!({ "type": "log", "data": { "entries": entries } })
            }
        };
        // Fire and forget: only listened-to kinds (and errors) get here.
        if self.on_event.call(message, ThreadsafeFunctionCallMode::NonBlocking) != Status::Ok {
            self.dropped_events.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn route_context(context: ScriptContext) -> RouteContext {
    let ip = |ip: Option<std::net::IpAddr>| ip.map(|ip| ip.to_string()).unwrap_or_default();
    RouteContext {
        port: u32::from(context.port),
        domain: context.domain,
        client_ip: ip(context.client_ip),
        server_ip: ip(context.server_ip),
        path: context.path,
        query: context.query,
        headers: context.headers.map(|pairs| {
            let mut headers: HashMap<String, String> = HashMap::with_capacity(pairs.len());
            for (name, value) in pairs {
                headers
                    .entry(name)
                    .and_modify(|joined| {
                        joined.push_str(", ");
                        joined.push_str(&value);
                    })
                    .or_insert(value);
            }
            headers
        }),
        is_tls: context.is_tls,
        tls_version: context.tls_version.map(str::to_string),
        route_name: context.route_name,
        route_id: context.route_id,
        target_host: context.target_host,
        target_port: context.target_port.map(u32::from),
        timestamp: context.timestamp_ms as f64,
        connection_id: context.connection_id.to_string(),
    }
}
