//! QUIC to clients (`action.http3`): one QUIC endpoint on the UDP side of each port some route
//! serves HTTP/3 on. A connection is admitted as a TCP one is (the engine's IP lists and per-IP
//! limits, before any handshake work; a Retry first while many handshakes are in progress), its
//! certificate is the one of the route its SNI selects (for this client, as `find` decides for
//! TCP), and that route's IP lists refuse in the handshake, before any certificate is offered.
//! Its requests then go through the same pipeline as HTTP/1.1 and HTTP/2 (`http::h3`).
//! Connections belong to the engine's sessions, so a stop drains them with the rest.

pub mod initial;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::RwLock;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Serialize;
use socket2::Type;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::http::io::ClientCounters;
use crate::http::pipeline::ServerAddress;
use crate::http::server::Shutdown;
use crate::listener::{bind_dual_stack, BindError};
use crate::matchers::ip::canonical_ip;
use crate::metrics::TerminationReason;
use crate::routing::table::{Route, RouteTable};
use crate::routing::{ConnectionFacts, Protocol};
use crate::session::{ConnectionGuard, HttpPeer, SessionEnv};
use crate::tls::config::{quic_server_config, QuicResumption};

/// H3_NO_ERROR (RFC 9114 §8.1): the application close code of every connection the proxy
/// closes itself, with the reason as text.
const NO_ERROR: u32 = 0x100;
/// Unidirectional streams a client may have open: HTTP/3 keeps three for the connection's life
/// (control and the two QPACK streams); h3 stops the others (grease, extensions) at once.
const MAX_UNI_STREAMS: u32 = 16;
/// What one stream, and the whole connection, may have received and not yet read: the bound on
/// what a client makes the proxy hold for it (quinn's defaults are per stream only).
const STREAM_RECEIVE_WINDOW: u32 = 1 << 20;
const CONNECTION_RECEIVE_WINDOW: u32 = 8 << 20;
const SEND_WINDOW: u64 = 8 << 20;
/// A handshake takes a few round trips: one that is not done by then is given up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress beyond which a client whose address is not yet validated is first sent
/// a Retry (RFC 9000 §8.1): a flood of spoofed Initials costs one stateless packet each, not a
/// handshake and a per-IP admission in the victim's name.
const RETRY_ABOVE_HANDSHAKES: u64 = 64;

/// Counters of `getStatistics().quic`.
#[derive(Debug, Default)]
pub struct QuicStats {
    active: AtomicU64,
    total: AtomicU64,
    handshake_failures: AtomicU64,
    refused: AtomicU64,
    handshaking: AtomicU64,
    retries: AtomicU64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QuicStatsSnapshot {
    /// QUIC connections whose handshake completed, since start.
    pub connections_total: u64,
    pub handshake_failures: u64,
    /// Connection attempts refused before the handshake (IP lists, per-IP limits).
    pub refused: u64,
    /// Clients sent a Retry to prove their address first.
    pub retries: u64,
    /// Handshakes in progress now.
    pub handshaking: u64,
}

impl QuicStats {
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> QuicStatsSnapshot {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        QuicStatsSnapshot { connections_total: load(&self.total), handshake_failures: load(&self.handshake_failures), refused: load(&self.refused), retries: load(&self.retries), handshaking: load(&self.handshaking) }
    }
}

/// What the ports' endpoints share with the engine.
pub struct QuicEnv {
    pub table: Arc<RwLock<Arc<RouteTable>>>,
    pub session: Arc<SessionEnv>,
    /// The engine's sessions: a stop waits for QUIC connections as for TCP ones.
    pub sessions: TaskTracker,
    pub next_id: Arc<AtomicU64>,
    pub stats: Arc<QuicStats>,
    resumption: QuicResumption,
    transport: Arc<quinn::TransportConfig>,
}

impl QuicEnv {
    pub fn new(table: Arc<RwLock<Arc<RouteTable>>>, session: Arc<SessionEnv>, sessions: TaskTracker, next_id: Arc<AtomicU64>, stats: Arc<QuicStats>) -> QuicEnv {
        let mut transport = quinn::TransportConfig::default();
        let streams = session.http_limits.max_concurrent_streams.max(1);
        transport
            .max_concurrent_bidi_streams(streams.into())
            .max_concurrent_uni_streams(MAX_UNI_STREAMS.into())
            .stream_receive_window(STREAM_RECEIVE_WINDOW.into())
            .receive_window(CONNECTION_RECEIVE_WINDOW.into())
            .send_window(SEND_WINDOW)
            // HTTP/3 here uses no unreliable datagrams: none are buffered.
            .datagram_receive_buffer_size(None);
        // The transport's own idle limit is the longest the watchdog allows; the watchdog closes
        // idle keep-alive connections sooner (`httpKeepAliveTimeout`).
        let idle = session.idle_timeout.max(session.http_limits.keep_alive_timeout).min(Duration::from_secs(3600));
        transport.max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok());
        QuicEnv { table, session, sessions, next_id, stats, resumption: QuicResumption::new(), transport: Arc::new(transport) }
    }

    /// The server config of one incoming connection: its certificate is chosen for this client.
    fn server_config(&self, resolver: Arc<RouteCertificate>) -> Result<Arc<quinn::ServerConfig>, String> {
        let crypto = quic_server_config(resolver, &self.resumption)?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        // The address admitted (IP lists, per-IP limits) is the connection's for its life.
        config.transport_config(self.transport.clone()).migration(false);
        Ok(Arc::new(config))
    }
}

type SocketHandle = std::sync::Weak<dyn quinn::AsyncUdpSocket>;

struct Listening {
    endpoint: quinn::Endpoint,
    /// The endpoint's socket, held by its driver task: gone once that task has ended, and with
    /// it the port.
    socket: SocketHandle,
    stop: CancellationToken,
    task: JoinHandle<()>,
    /// Cancelled when the port is retired (or at a stop, through its parent): the port's
    /// connections send a GOAWAY and finish the requests they took.
    draining: CancellationToken,
}

/// A port the routes no longer serve HTTP/3 on, whose connections are finishing their requests.
/// It takes no new connection; its endpoint closes once they are done or the grace period is
/// over, whichever comes first, and the port is free once its socket is gone.
struct Retiring {
    socket: SocketHandle,
    /// Cancelled to close the endpoint now (a stop, or the port wanted again).
    close_now: CancellationToken,
    closer: JoinHandle<()>,
}

/// The QUIC endpoints bound, each with its accept loop, and those retiring.
#[derive(Default)]
pub struct QuicPorts {
    ports: BTreeMap<u16, Listening>,
    retiring: BTreeMap<u16, Retiring>,
}

impl QuicPorts {
    pub fn ports(&self) -> Vec<u16> {
        self.ports.keys().copied().collect()
    }

    /// Binds every port of `ports` not yet bound, or none of them; returns those this call bound.
    /// Must run inside the engine's runtime.
    pub fn bind_all(&mut self, ports: &[u16], env: &Arc<QuicEnv>) -> Result<Vec<u16>, BindError> {
        let mut bound = Vec::new();
        for &port in ports.iter().filter(|p| !self.ports.contains_key(p)) {
            let (endpoint, socket) = bind(port, env).map_err(|source| BindError { port, source })?;
            bound.push((port, endpoint, socket));
        }
        let mut added = Vec::with_capacity(bound.len());
        for (port, endpoint, socket) in bound {
            let stop = CancellationToken::new();
            let draining = env.session.draining.child_token();
            let task = tokio::spawn(accept_loop(endpoint.clone(), port, stop.clone(), draining.clone(), env.clone()));
            self.ports.insert(port, Listening { endpoint, socket, stop, task, draining });
            added.push(port);
        }
        Ok(added)
    }

    /// Closes the endpoints still retiring on any of `ports` now, so the ports can be bound again
    /// (for QUIC or a UDP route); returns once they are free.
    pub async fn reclaim(&mut self, ports: &[u16]) {
        for port in ports {
            if let Some(retiring) = self.retiring.remove(port) {
                retiring.close_now.cancel();
                let _ = retiring.closer.await;
                socket_gone(&retiring.socket).await;
            }
        }
        self.retiring.retain(|_, retiring| retiring.socket.strong_count() > 0);
    }

    /// Stops taking connections on the port and lets its open ones finish their requests (a
    /// GOAWAY each), for up to `grace`, in the background; the endpoint closes after them.
    pub async fn retire(&mut self, port: u16, grace: Duration) {
        let Some(listening) = self.ports.remove(&port) else { return };
        let Listening { endpoint, socket, stop, task, draining } = listening;
        stop.cancel();
        let _ = task.await;
        // New Initials are refused from now on.
        endpoint.set_server_config(None);
        draining.cancel();
        let close_now = CancellationToken::new();
        let closer = tokio::spawn({
            let close_now = close_now.clone();
            async move {
                tokio::select! {
                    _ = close_now.cancelled() => {}
                    _ = tokio::time::timeout(grace, endpoint.wait_idle()) => {}
                }
                close_endpoint(endpoint).await;
            }
        });
        self.retiring.retain(|_, retiring| retiring.socket.strong_count() > 0);
        self.retiring.insert(port, Retiring { socket, close_now, closer });
    }

    /// Stops taking connections on the port and closes its endpoint; returns once the port is
    /// free. Its open connections are closed with it: `release_all` at a stop runs after they
    /// drained.
    pub async fn release(&mut self, port: u16) {
        if let Some(listening) = self.ports.remove(&port) {
            let Listening { endpoint, socket, stop, task, .. } = listening;
            stop.cancel();
            let _ = task.await;
            close_endpoint(endpoint).await;
            socket_gone(&socket).await;
        }
    }

    /// Stops taking new connections on every port, leaving open ones to drain.
    pub fn stop_accepting(&self) {
        for listening in self.ports.values() {
            listening.stop.cancel();
            listening.endpoint.set_server_config(None);
        }
    }

    pub async fn release_all(&mut self) {
        for port in self.ports() {
            self.release(port).await;
        }
        let retiring: Vec<u16> = self.retiring.keys().copied().collect();
        self.reclaim(&retiring).await;
    }
}

/// Closes the endpoint's connections at once, and lets go of this handle of it.
async fn close_endpoint(endpoint: quinn::Endpoint) {
    endpoint.close(NO_ERROR.into(), b"port closed");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
}

/// Waits (bounded) until the endpoint's socket is closed: its driver task lets go of it once it
/// sees the last handle gone.
async fn socket_gone(socket: &SocketHandle) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while socket.strong_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

impl Drop for QuicPorts {
    /// An engine dropped without `stop()` leaves no endpoint behind.
    fn drop(&mut self) {
        for listening in self.ports.values() {
            listening.stop.cancel();
            listening.endpoint.close(NO_ERROR.into(), b"stopped");
        }
        for retiring in self.retiring.values() {
            retiring.close_now.cancel();
        }
    }
}

/// The port's UDP socket (dual stack where the host has IPv6), as a QUIC server endpoint.
fn bind(port: u16, env: &QuicEnv) -> std::io::Result<(quinn::Endpoint, std::sync::Weak<dyn quinn::AsyncUdpSocket>)> {
    let socket = bind_dual_stack(Type::DGRAM, port)?;
    socket.set_nonblocking(true)?;
    // The endpoint's own config serves no certificate (port 0 has no route): every connection
    // is accepted with the config chosen for its client (`serve_connection`).
    let resolver = Arc::new(RouteCertificate { table: env.table.read().clone(), port: 0, client_ip: IpAddr::from([0, 0, 0, 0]), chosen: Arc::default(), forbidden: Arc::default() });
    let config = env.server_config(resolver).map_err(std::io::Error::other)?;
    let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
    let socket = runtime.wrap_udp_socket(socket.into())?;
    let weak = Arc::downgrade(&socket);
    let endpoint = quinn::Endpoint::new_with_abstract_socket(quinn::EndpointConfig::default(), Some(Arc::unwrap_or_clone(config)), socket, runtime)?;
    Ok((endpoint, weak))
}

async fn accept_loop(endpoint: quinn::Endpoint, port: u16, stop: CancellationToken, draining: CancellationToken, env: Arc<QuicEnv>) {
    loop {
        let incoming = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let connection_env = env.clone();
        env.sessions.spawn(serve_connection(incoming, port, draining.clone(), connection_env));
    }
}

/// The route a client's hello selects on this port, and its certificate: decided once, by the
/// same facts as a TCP connection's TLS route (port, client address, SNI), among routes that
/// serve HTTP/3. No route, or one whose IP lists refuse the client: no certificate, and the
/// handshake fails, before any key exchange (as a TCP connection is refused before TLS).
struct RouteCertificate {
    table: Arc<RouteTable>,
    port: u16,
    client_ip: IpAddr,
    chosen: Arc<OnceLock<Arc<Route>>>,
    forbidden: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for RouteCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteCertificate").field("port", &self.port).field("client_ip", &self.client_ip).finish()
    }
}

impl ResolvesServerCert for RouteCertificate {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let domain = hello.server_name().map(|name| name.trim_end_matches('.').to_ascii_lowercase());
        let facts = ConnectionFacts { local_port: self.port, client_ip: self.client_ip, domain: domain.as_deref(), protocol: Protocol::Tls { version: Some("TLSv1.3") } };
        let route = self.table.find(&facts)?;
        route.http3?;
        if !route.policy.admits(self.client_ip) {
            route.stats.forbidden.fetch_add(1, Ordering::Relaxed);
            self.forbidden.store(true, Ordering::Relaxed);
            return None;
        }
        let acceptor = route.tls.as_ref()?.acceptor.as_ref()?;
        let key = acceptor.cert_resolver.resolve(hello)?;
        let _ = self.chosen.set(route.clone());
        Some(key)
    }
}

/// One client's QUIC connection, from its first packet to its close.
async fn serve_connection(incoming: quinn::Incoming, port: u16, draining: CancellationToken, env: Arc<QuicEnv>) {
    let session = &env.session;
    let remote = incoming.remote_address();
    let client_ip = canonical_ip(remote.ip());
    if !session.global_policy.admits(client_ip) {
        return refuse(incoming, &env, TerminationReason::IpBlocked);
    }
    if !incoming.remote_address_validated() && incoming.may_retry() && env.stats.handshaking.load(Ordering::Relaxed) >= RETRY_ABOVE_HANDSHAKES {
        env.stats.retries.fetch_add(1, Ordering::Relaxed);
        // Nothing is kept: the client's next Initial carries the token that proves its address.
        let _ = incoming.retry();
        return;
    }
    let ip_slot = match session.limiter.admit(client_ip) {
        Ok(slot) => slot,
        Err(crate::security::IpRefusal::TooManyConnections) => return refuse(incoming, &env, TerminationReason::PerIpLimit),
        Err(crate::security::IpRefusal::RateLimited) => return refuse(incoming, &env, TerminationReason::RateLimited),
    };
    let table = env.table.read().clone();
    let chosen: Arc<OnceLock<Arc<Route>>> = Arc::default();
    let forbidden: Arc<std::sync::atomic::AtomicBool> = Arc::default();
    let resolver = Arc::new(RouteCertificate { table: table.clone(), port, client_ip, chosen: chosen.clone(), forbidden: forbidden.clone() });
    let config = match env.server_config(resolver) {
        Ok(config) => config,
        Err(err) => {
            tracing::warn!(port, error = %err, "QUIC server config failed");
            return refuse(incoming, &env, TerminationReason::TlsHandshakeFailed);
        }
    };
    let local_ip = incoming.local_ip().map(canonical_ip);
    // The client's first Initial is read here: a hello that finds no route (or a forbidden one)
    // fails at once.
    let connecting = match incoming.accept_with(config) {
        Ok(connecting) => connecting,
        Err(_) => return handshake_refused(&env, &forbidden),
    };
    let accepted_at = std::time::Instant::now();
    let handshake = {
        let _handshaking = Gauge::enter(&env.stats.handshaking);
        tokio::time::timeout(HANDSHAKE_TIMEOUT.min(session.initial_data_timeout), connecting).await
    };
    let connection = match handshake {
        Ok(Ok(connection)) => connection,
        _ => return handshake_refused(&env, &forbidden),
    };
    let Some(route) = chosen.get().cloned() else {
        connection.close(NO_ERROR.into(), b"no route");
        return handshake_failed(&env);
    };
    let mut counted = ConnectionGuard::new(&session.metrics);
    counted.mark_tls();
    env.stats.total.fetch_add(1, Ordering::Relaxed);
    let _active = Gauge::enter(&env.stats.active);
    let sni = connection
        .handshake_data()
        .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|data| data.server_name)
        .map(|name| name.trim_end_matches('.').to_ascii_lowercase());
    let counters = Arc::new(ClientCounters::new(session.metrics.clone(), ip_slot));
    let peer = HttpPeer {
        connection_id: env.next_id.fetch_add(1, Ordering::Relaxed),
        local_port: port,
        client: SocketAddr::new(client_ip, remote.port()),
        peer_ip: client_ip,
        server: ServerAddress::known(local_ip),
        tls_version: Some("TLSv1.3"),
        accepted_at,
    };
    let ctx = session.http_context(table, peer, sni, Some(route), None, counters.clone());
    let limits = session.http_limits_from(accepted_at);
    let shutdown = Shutdown { draining: &draining, force_close: &session.force_close };
    let reason = crate::http::h3::server::serve(connection.clone(), counters.clone(), ctx, limits, shutdown).await;
    // The connection's bytes, as UDP payload (QUIC's own overhead included), once it is over.
    let stats = connection.stats();
    counters.add_bytes(stats.udp_rx.bytes, stats.udp_tx.bytes);
    session.metrics.record_termination(reason);
    drop(counted);
}

fn refuse(incoming: quinn::Incoming, env: &QuicEnv, reason: TerminationReason) {
    env.stats.refused.fetch_add(1, Ordering::Relaxed);
    env.session.metrics.record_termination(reason);
    incoming.refuse();
}

/// A handshake that did not complete: the route's IP lists refused the client, or it failed.
fn handshake_refused(env: &QuicEnv, forbidden: &std::sync::atomic::AtomicBool) {
    if forbidden.load(Ordering::Relaxed) {
        env.stats.refused.fetch_add(1, Ordering::Relaxed);
        env.session.metrics.record_termination(TerminationReason::RouteIpBlocked);
    } else {
        handshake_failed(env);
    }
}

fn handshake_failed(env: &QuicEnv) {
    env.stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
    env.session.metrics.record_termination(TerminationReason::TlsHandshakeFailed);
}

/// One unit of a QUIC gauge (open connections, handshakes in progress), given back on drop.
struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    fn enter(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::AcqRel);
        Gauge(gauge)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
