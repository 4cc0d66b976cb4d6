//! Upstream connections for the HTTP engine: one pool per engine, shared by every worker thread,
//! keyed by everything that makes two connections interchangeable (scheme, host, port, SNI, TLS
//! settings, protocol). HTTP/1.1 connections are reused only after a request/response exchange
//! ended cleanly on both sides (a response that arrives before its request body was fully sent
//! leaves the connection unusable: it is closed, never pooled). Idle connections expire after
//! `idle_timeout`; a per-backend cap bounds all connections (idle and busy, whatever their key:
//! TLS settings, protocol, PROXY header) to one upstream address. When the cap is reached, an
//! idle connection of another key to the same backend gives its slot up; a request that still
//! cannot get a slot within the connect timeout fails as pool exhaustion (502).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsConnector;

use crate::clock::coarse_ms;
use crate::http::body::ProxyBody;
use crate::http::alt_svc::AltSvcCache;
use crate::http::h1::client::Connection;
use crate::http::h3::client::{self as h3_client, H3Upstream, QuicClients};

/// What the route asks of the upstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamProtocol {
    Http1,
    Http2,
    /// HTTP/2 when TLS ALPN picks `h2`, else HTTP/1.1 (plain connections: HTTP/1.1).
    Auto,
    /// QUIC (TLS, ALPN `h3`) to the same port number over UDP.
    Http3,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub host: Arc<str>,
    pub port: u16,
    pub protocol: UpstreamProtocol,
    pub tls: Option<UpstreamTls>,
    /// A PROXY protocol header sent first on every new connection: connections are then pooled
    /// per client address (the header names it), never shared between clients.
    pub proxy_header: Option<Arc<[u8]>>,
}

/// TLS to the upstream: the name sent as SNI and verified, and the connector settings.
/// Two keys share connections only when they use the very same config.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    pub server_name: ServerName<'static>,
    pub config: Arc<rustls::ClientConfig>,
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        self.server_name == other.server_name && Arc::ptr_eq(&self.config, &other.config)
    }
}

impl Eq for UpstreamTls {}

impl Hash for UpstreamTls {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.server_name.hash(state);
        Arc::as_ptr(&self.config).hash(state);
    }
}

#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub idle_timeout: Duration,
    pub max_idle_per_host: usize,
    pub max_per_host: usize,
}

impl Default for PoolSettings {
    fn default() -> Self {
        // Idle connections may use the whole per-backend cap: with fewer, a burst of more clients
        // than the idle limit closes and reopens upstream connections on every request.
        PoolSettings { idle_timeout: Duration::from_secs(60), max_idle_per_host: 1024, max_per_host: 1024 }
    }
}

#[derive(Debug)]
pub enum UpstreamError {
    ConnectTimeout,
    ConnectFailed(std::io::Error),
    Tls(std::io::Error),
    Handshake(hyper::Error),
    /// The QUIC connection or its HTTP/3 handshake failed.
    Quic(String),
    PoolExhausted,
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::ConnectTimeout => f.write_str("upstream connect timed out"),
            UpstreamError::ConnectFailed(err) => write!(f, "upstream connect failed: {err}"),
            UpstreamError::Tls(err) => write!(f, "upstream TLS handshake failed: {err}"),
            UpstreamError::Handshake(err) => write!(f, "upstream HTTP handshake failed: {err}"),
            UpstreamError::Quic(err) => write!(f, "upstream QUIC connection failed: {err}"),
            UpstreamError::PoolExhausted => f.write_str("no upstream connection available (per-host limit reached)"),
        }
    }
}

struct IdleH1 {
    conn: Connection,
    permit: OwnedSemaphorePermit,
    /// When it went idle, on the coarse clock (`crate::clock`).
    since: u64,
}

/// How long a connection idle since `since` (on the coarse clock) has been.
fn idle_for(since: u64) -> Duration {
    Duration::from_millis(coarse_ms().saturating_sub(since))
}

#[derive(Default)]
struct HostEntry {
    idle: Vec<IdleH1>,
    /// HTTP/2 multiplexes: one live connection per key serves every request.
    h2: Option<(http2::SendRequest<ProxyBody>, Arc<OwnedSemaphorePermit>)>,
    /// HTTP/3 as HTTP/2: one live QUIC connection per key.
    h3: Option<(H3Upstream, Arc<OwnedSemaphorePermit>)>,
}

/// One upstream address, whatever the keys connecting to it.
type Backend = (Arc<str>, u16);

pub struct UpstreamPool {
    hosts: Mutex<HashMap<PoolKey, HostEntry, RandomState>>,
    /// The per-backend cap: one permit per open connection (idle or busy).
    slots: Mutex<HashMap<Backend, Arc<Semaphore>, RandomState>>,
    settings: PoolSettings,
    counters: Arc<UpstreamCounters>,
    /// The client endpoints of HTTP/3 connections, bound on first use.
    quic: QuicClients,
    /// The HTTP/3 ports TLS backends advertised (`'auto'`).
    pub alt_svc: AltSvcCache,
}

/// What checkouts came to, engine-wide (kept by the engine's metrics across pools).
#[derive(Debug, Default)]
pub struct UpstreamCounters {
    /// Requests served by a connection from the pool (or an HTTP/2 connection shared).
    pub reused: AtomicU64,
    /// New upstream connections ready for requests.
    pub connected: AtomicU64,
    /// Connects that failed: refused, timed out, TLS or protocol handshake.
    pub connect_failures: AtomicU64,
    /// Checkouts that found the backend's connection cap reached until their connect timeout.
    pub exhausted: AtomicU64,
}

/// A connection checked out for one request.
pub enum Checkout {
    /// `conn` is taken by the request that uses it (its response body owns it).
    Http1 { conn: Option<Connection>, permit: OwnedSemaphorePermit, reused: bool },
    Http2 { sender: http2::SendRequest<ProxyBody>, reused: bool },
    Http3 { upstream: H3Upstream, reused: bool },
}

impl Checkout {
    pub fn reused(&self) -> bool {
        match self {
            Checkout::Http1 { reused, .. } | Checkout::Http2 { reused, .. } | Checkout::Http3 { reused, .. } => *reused,
        }
    }

    /// The connection multiplexes requests (HTTP/2, HTTP/3): heads name their target as an
    /// absolute URI.
    pub fn multiplexed(&self) -> bool {
        !matches!(self, Checkout::Http1 { .. })
    }
}

impl UpstreamPool {
    pub fn new(settings: PoolSettings, counters: Arc<UpstreamCounters>) -> Self {
        UpstreamPool { hosts: Mutex::new(HashMap::default()), slots: Mutex::new(HashMap::default()), settings, counters, quic: QuicClients::default(), alt_svc: AltSvcCache::default() }
    }

    /// A pooled connection when one is idle and alive, else a new one.
    pub async fn checkout(&self, key: &PoolKey, connect_timeout: Duration, no_delay: bool) -> Result<Checkout, UpstreamError> {
        if let Some(reused) = self.take_idle(key) {
            self.counters.reused.fetch_add(1, Ordering::Relaxed);
            return Ok(reused);
        }
        // The connect path (TCP, PROXY header, TLS and HTTP handshakes) is boxed: inline, its
        // state would size the future of every request, pooled or not.
        self.counted(Box::pin(self.connect(key, connect_timeout, no_delay, true)).await)
    }

    /// Always a new connection (after a pooled one turned out dead).
    pub async fn checkout_fresh(&self, key: &PoolKey, connect_timeout: Duration, no_delay: bool) -> Result<Checkout, UpstreamError> {
        self.counted(Box::pin(self.connect(key, connect_timeout, no_delay, false)).await)
    }

    fn counted(&self, checkout: Result<Checkout, UpstreamError>) -> Result<Checkout, UpstreamError> {
        let counter = match &checkout {
            Ok(checkout) if checkout.reused() => &self.counters.reused,
            Ok(_) => &self.counters.connected,
            Err(UpstreamError::PoolExhausted) => &self.counters.exhausted,
            Err(_) => &self.counters.connect_failures,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        checkout
    }

    async fn connect(&self, key: &PoolKey, connect_timeout: Duration, no_delay: bool, may_reuse: bool) -> Result<Checkout, UpstreamError> {
        let deadline = Instant::now() + connect_timeout;
        let slots = self.slots(key);
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                // At the cap: an idle connection of another key to this backend gives way.
                self.evict_one_idle(key);
                tokio::time::timeout_at(deadline.into(), slots.acquire_owned())
                    .await
                    .map_err(|_| UpstreamError::PoolExhausted)?
                    .map_err(|_| UpstreamError::PoolExhausted)?
            }
        };
        // A slot may have been freed by a connection going idle: prefer it to a new connect.
        if may_reuse {
            if let Some(reused) = self.take_idle(key) {
                return Ok(reused);
            }
        }
        if key.protocol == UpstreamProtocol::Http3 {
            let Some(tls) = &key.tls else {
                return Err(UpstreamError::Quic("HTTP/3 needs TLS to the target".into()));
            };
            let upstream = h3_client::connect(&self.quic, &key.host, key.port, tls, deadline).await?;
            let mut hosts = self.hosts.lock();
            hosts.entry(key.clone()).or_default().h3 = Some((upstream.clone(), Arc::new(permit)));
            return Ok(Checkout::Http3 { upstream, reused: false });
        }
        let stream = tokio::time::timeout_at(deadline.into(), TcpStream::connect((&*key.host, key.port)))
            .await
            .map_err(|_| UpstreamError::ConnectTimeout)?
            .map_err(UpstreamError::ConnectFailed)?;
        let _ = stream.set_nodelay(no_delay);
        let mut stream = stream;
        if let Some(header) = &key.proxy_header {
            tokio::time::timeout_at(deadline.into(), stream.write_all(header))
                .await
                .map_err(|_| UpstreamError::ConnectTimeout)?
                .map_err(UpstreamError::ConnectFailed)?;
        }
        match &key.tls {
            None => self.handshake(stream, key, permit, key.protocol == UpstreamProtocol::Http2).await,
            Some(tls) => {
                let connector = TlsConnector::from(tls.config.clone());
                let stream = tokio::time::timeout_at(deadline.into(), connector.connect(tls.server_name.clone(), stream))
                    .await
                    .map_err(|_| UpstreamError::ConnectTimeout)?
                    .map_err(UpstreamError::Tls)?;
                let alpn_h2 = stream.get_ref().1.alpn_protocol() == Some(crate::tls::config::ALPN_H2);
                let use_h2 = match key.protocol {
                    UpstreamProtocol::Http2 => true,
                    UpstreamProtocol::Http1 | UpstreamProtocol::Http3 => false,
                    UpstreamProtocol::Auto => alpn_h2,
                };
                self.handshake(stream, key, permit, use_h2).await
            }
        }
    }

    async fn handshake<T>(&self, io: T, key: &PoolKey, permit: OwnedSemaphorePermit, use_h2: bool) -> Result<Checkout, UpstreamError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static,
    {
        if use_h2 {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(30))
                .handshake::<_, ProxyBody>(TokioIo::new(io))
                .await
                .map_err(UpstreamError::Handshake)?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            let mut hosts = self.hosts.lock();
            let entry = hosts.entry(key.clone()).or_default();
            entry.h2 = Some((sender.clone(), Arc::new(permit)));
            Ok(Checkout::Http2 { sender, reused: false })
        } else {
            // HTTP/1.1 is ours: the connection is driven by the request that uses it.
            Ok(Checkout::Http1 { conn: Some(Connection::new(Box::new(io))), permit, reused: false })
        }
    }

    fn take_idle(&self, key: &PoolKey) -> Option<Checkout> {
        loop {
            let candidate = {
                let mut hosts = self.hosts.lock();
                let entry = hosts.get_mut(key)?;
                match &entry.h2 {
                    Some((sender, _)) if !sender.is_closed() => {
                        return Some(Checkout::Http2 { sender: sender.clone(), reused: true });
                    }
                    Some(_) => entry.h2 = None,
                    None => {}
                }
                match &entry.h3 {
                    Some((upstream, _)) if !upstream.is_closed() => {
                        return Some(Checkout::Http3 { upstream: upstream.clone(), reused: true });
                    }
                    Some(_) => entry.h3 = None,
                    None => {}
                }
                entry.idle.pop()?
            };
            let IdleH1 { mut conn, permit, since } = candidate;
            if idle_for(since) >= self.settings.idle_timeout || !conn.is_usable() {
                continue;
            }
            return Some(Checkout::Http1 { conn: Some(conn), permit, reused: true });
        }
    }

    fn slots(&self, key: &PoolKey) -> Arc<Semaphore> {
        let mut slots = self.slots.lock();
        slots.entry((key.host.clone(), key.port)).or_insert_with(|| Arc::new(Semaphore::new(self.settings.max_per_host))).clone()
    }

    /// Closes the oldest idle HTTP/1.1 connection to `key`'s backend, of any key, freeing its slot.
    fn evict_one_idle(&self, key: &PoolKey) {
        let evicted = {
            let mut hosts = self.hosts.lock();
            let oldest = hosts
                .iter_mut()
                .filter(|(other, entry)| other.host == key.host && other.port == key.port && !entry.idle.is_empty())
                .min_by_key(|(_, entry)| entry.idle.first().map(|idle| idle.since));
            oldest.map(|(_, entry)| entry.idle.remove(0))
        };
        drop(evicted);
    }

    /// Gives an HTTP/1.1 connection back after a clean exchange.
    pub fn put_back(&self, key: &PoolKey, conn: Connection, permit: OwnedSemaphorePermit) {
        let mut hosts = self.hosts.lock();
        let entry = hosts.entry(key.clone()).or_default();
        if entry.idle.len() < self.settings.max_idle_per_host {
            entry.idle.push(IdleH1 { conn, permit, since: coarse_ms() });
        }
    }

    /// Drops an HTTP/2 or HTTP/3 connection that failed so the next request dials again.
    pub fn forget_multiplexed(&self, key: &PoolKey) {
        if let Some(entry) = self.hosts.lock().get_mut(key) {
            entry.h2 = None;
            entry.h3 = None;
        }
    }

    /// Closes idle connections past their timeout (called periodically) and forgets empty hosts.
    pub fn sweep(&self) {
        let idle_timeout = self.settings.idle_timeout;
        let mut expired = Vec::new();
        let mut hosts = self.hosts.lock();
        for entry in hosts.values_mut() {
            for mut idle in std::mem::take(&mut entry.idle) {
                if idle_for(idle.since) < idle_timeout && idle.conn.is_usable() {
                    entry.idle.push(idle);
                } else {
                    expired.push(idle);
                }
            }
            if entry.h2.as_ref().is_some_and(|(sender, _)| sender.is_closed()) {
                entry.h2 = None;
            }
            if entry.h3.as_ref().is_some_and(|(upstream, _)| upstream.is_closed()) {
                entry.h3 = None;
            }
        }
        hosts.retain(|_, entry| !entry.idle.is_empty() || entry.h2.is_some() || entry.h3.is_some());
        drop(hosts);
        drop(expired);
        let max = self.settings.max_per_host;
        self.slots.lock().retain(|_, slots| slots.available_permits() < max);
    }

    /// Closes every idle connection (engine stop).
    pub fn clear(&self) {
        let drained: Vec<HostEntry> = self.hosts.lock().drain().map(|(_, entry)| entry).collect();
        drop(drained);
        self.slots.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend that accepts and holds connections without a word.
    async fn silent_backend() -> (u16, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        (port, task)
    }

    fn key(port: u16, client: &str) -> PoolKey {
        PoolKey { host: "127.0.0.1".into(), port, protocol: UpstreamProtocol::Http1, tls: None, proxy_header: Some(Arc::from(client.as_bytes())) }
    }

    #[tokio::test]
    async fn the_cap_holds_per_backend_across_keys_and_idle_connections_give_way() {
        let (port, backend) = silent_backend().await;
        let pool = UpstreamPool::new(PoolSettings { idle_timeout: Duration::from_secs(60), max_idle_per_host: 8, max_per_host: 2 }, Arc::default());
        let wait = Duration::from_millis(200);
        let busy_a = pool.checkout(&key(port, "a"), wait, true).await.expect("a");
        let Checkout::Http1 { conn: Some(conn), permit, .. } = pool.checkout(&key(port, "b"), wait, true).await.expect("b") else {
            panic!("http/1.1 expected");
        };
        // Two connections, each for another client: a third client's key finds the cap.
        assert!(matches!(pool.checkout(&key(port, "c"), wait, true).await, Err(UpstreamError::PoolExhausted)));
        // b's connection goes idle: c's request takes its slot (b's connection is closed).
        pool.put_back(&key(port, "b"), conn, permit);
        assert!(pool.checkout(&key(port, "c"), wait, true).await.is_ok());
        drop(busy_a);
        backend.abort();
    }
}
