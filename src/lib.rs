//! napi exports only: the `NativeEngine` class the TypeScript wrapper drives, and conversions of
//! engine results and errors into JavaScript values. All behaviour lives in the modules below.

mod access_log;
mod acme;
mod balance;
mod bounded;
mod bridge;
mod clock;
mod config;
mod engine;
mod hooks;
mod http;
mod kernel;
mod listener;
mod logging;
mod matchers;
mod metrics;
mod pooled_future;
mod proxy_protocol;
mod quic;
mod routing;
mod security;
mod session;
mod shared_state;
mod tcp;
mod templates;
mod tls;
mod udp;
mod wake_gate;
mod write_batch;

use std::future::Future;
use std::sync::Arc;

use napi::bindgen_prelude::*;
use napi_derive::napi;

use crate::bridge::{DatagramCallback, EventCallback, JsBridge, SocketCallback, TargetCallback};
use crate::engine::{Engine, EngineError};

/// One proxy instance on the shared Rust runtime. Constructed from the normalised config
/// (`INativeConfig`); throws with `code: 'InvalidArg'` and a message naming the route and field.
#[napi]
pub struct NativeEngine {
    engine: Arc<Engine>,
    bridge: Arc<JsBridge>,
}

#[napi]
impl NativeEngine {
    /// `onSocket` takes a socket handler's connection and resolves when that socket has closed;
    /// `resolveTarget` calls a route's host/port functions; `onEvent` receives `{ type, data }`.
    #[napi(
        constructor,
        ts_args_type = "config: object, onSocket: (handoff: SocketHandoff) => Promise<SocketReport>, resolveTarget: (call: TargetCall) => TargetAnswer | Promise<TargetAnswer>, onEvent: (message: { type: string; data: object }) => void, onDatagram: (call: DatagramCall) => void"
    )]
    pub fn new(
        config: serde_json::Value,
        on_socket: SocketCallback,
        resolve_target: TargetCallback,
        on_event: EventCallback,
        on_datagram: DatagramCallback,
    ) -> Result<Self> {
        let config = config::parse(config).map_err(|e| Error::new(Status::InvalidArg, e.to_string()))?;
        let bridge = Arc::new(JsBridge::new(on_socket, resolve_target, on_event, on_datagram));
        let engine = Engine::new(config, Some(bridge.clone())).map_err(|e| Error::new(Status::InvalidArg, e.to_string()))?;
        Ok(NativeEngine { engine: Arc::new(engine), bridge })
    }

    /// Which optional events have listeners; the others are never produced.
    #[napi]
    pub fn set_event_interest(&self, connection: bool, route_matched: bool) {
        self.bridge.set_interest(connection, route_matched);
    }

    /// Binds every route port (all or none; rejects with `EADDRINUSE: port N ...`) and accepts.
    #[napi]
    pub async fn start(&self) -> Result<()> {
        let engine = self.engine.clone();
        on_engine_runtime(&self.engine, async move { engine.start().await }).await?.map_err(engine_error)
    }

    /// Stops accepting, drains up to `gracefulShutdownTimeout`, then closes what is left.
    #[napi]
    pub async fn stop(&self) -> Result<()> {
        let engine = self.engine.clone();
        on_engine_runtime(&self.engine, async move { engine.stop().await }).await
    }

    /// Replaces the routes with those of `config` (a whole normalised config; its options are
    /// ignored: they are fixed at construction).
    #[napi]
    pub async fn update_routes(&self, config: serde_json::Value) -> Result<()> {
        let config = config::parse(config).map_err(|e| Error::new(Status::InvalidArg, e.to_string()))?;
        let engine = self.engine.clone();
        on_engine_runtime(&self.engine, async move { engine.update_routes(&config.routes).await })
            .await?
            .map_err(engine_error)
    }

    #[napi]
    pub async fn add_listening_port(&self, port: u32) -> Result<()> {
        let port = valid_port(port)?;
        let engine = self.engine.clone();
        on_engine_runtime(&self.engine, async move { engine.add_listening_port(port).await })
            .await?
            .map_err(engine_error)
    }

    #[napi]
    pub async fn remove_listening_port(&self, port: u32) -> Result<()> {
        let port = valid_port(port)?;
        let engine = self.engine.clone();
        on_engine_runtime(&self.engine, async move { engine.remove_listening_port(port).await }).await
    }

    /// A datagram handler's reply: `data` from the route's UDP `port` to the client, whose flow
    /// must still be open. False when it is not, or the datagram could not be sent.
    #[napi]
    pub fn udp_reply(&self, port: u32, client_ip: String, client_port: u32, data: Buffer) -> Result<bool> {
        let port = valid_port(port)?;
        let client_port = valid_port(client_port)?;
        let ip: std::net::IpAddr = client_ip.parse().map_err(|_| Error::new(Status::InvalidArg, format!("{client_ip:?} is not an IP address")))?;
        Ok(self.engine.udp_reply(port, std::net::SocketAddr::new(ip, client_port), &data))
    }

    #[napi]
    pub fn listening_ports(&self) -> Vec<u32> {
        self.engine.listening_ports().into_iter().map(u32::from).collect()
    }

    #[napi]
    pub fn statistics(&self) -> Result<serde_json::Value> {
        let mut statistics = to_json(&self.engine.statistics())?;
        statistics["droppedEvents"] = self.bridge.dropped_events().into();
        Ok(statistics)
    }

    /// Reopens the access log's file by its path (logrotate); nothing without a file.
    #[napi]
    pub fn reopen_logs(&self) {
        self.engine.reopen_logs();
    }

    /// The Prometheus text exposition (format 0.0.4) of the engine's counters.
    #[napi]
    pub fn prometheus_metrics(&self) -> String {
        self.engine.prometheus()
    }

    /// `ICertStatus` of an automatic-certificate route (`expiryDate`/`issueDate` in ms), or null.
    #[napi]
    pub fn certificate_status(&self, route_name: String) -> Result<Option<serde_json::Value>> {
        self.engine.certificate_status(&route_name).map(|status| to_json(&status)).transpose()
    }

    /// Orders the route's certificate now (one attempt); rejects with the ACME error.
    #[napi]
    pub async fn order_certificate(&self, route_name: String) -> Result<()> {
        let engine = self.engine.clone();
        on_engine_runtime(&self.engine, async move { engine.order_certificate(&route_name).await })
            .await?
            .map_err(Error::from_reason)
    }

    /// Orders the route's certificate in the background, retrying until issued or stopped.
    #[napi]
    pub fn order_certificate_in_background(&self, route_name: String) {
        let _guard = self.engine.runtime().enter();
        self.engine.order_certificate_in_background(&route_name);
    }

    /// Serves a `certProvisionFunction` certificate (chain and key PEM) for one domain of the route.
    #[napi]
    pub fn install_certificate(&self, route_name: String, domain: String, chain_pem: String, key_pem: String) -> Result<()> {
        self.engine
            .install_certificate(&route_name, &domain, &chain_pem, &key_pem)
            .map_err(|e| Error::new(Status::InvalidArg, e))
    }

    /// Ids of the functions some route table in use refers to (the wrapper forgets the others).
    #[napi]
    pub fn live_function_ids(&self) -> Vec<u32> {
        self.engine.live_function_ids()
    }

    /// Connection counts, totals and throughput averaged over `windowSeconds`.
    #[napi]
    pub fn metrics(&self, window_seconds: u32) -> Result<serde_json::Value> {
        to_json(&self.engine.metrics(window_seconds as usize))
    }

    /// Per-second throughput of the last `seconds` seconds, oldest first.
    #[napi]
    pub fn history(&self, seconds: u32) -> Result<serde_json::Value> {
        to_json(&self.engine.history(seconds as usize))
    }
}

/// Runs engine work on the engine's own runtime (napi's async plumbing only awaits it).
async fn on_engine_runtime<T: Send + 'static>(
    engine: &Engine,
    work: impl Future<Output = T> + Send + 'static,
) -> Result<T> {
    engine
        .runtime()
        .spawn(work)
        .await
        .map_err(|e| Error::from_reason(format!("smartproxy engine task failed: {e}")))
}

fn engine_error(err: EngineError) -> Error {
    let status = match err {
        EngineError::Config(_) => Status::InvalidArg,
        EngineError::Bind(_) | EngineError::AccessLog(_) | EngineError::NotStarted => Status::GenericFailure,
    };
    Error::new(status, err.to_string())
}

fn valid_port(port: u32) -> Result<u16> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| Error::new(Status::InvalidArg, format!("{port} is not a valid port")))
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<serde_json::Value> {
    serde_json::to_value(value).map_err(|e| Error::from_reason(e.to_string()))
}
