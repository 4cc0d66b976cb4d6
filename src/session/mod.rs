//! One accepted connection from accept to close: its context (`Session`) and its state machine,
//! read top to bottom in `Session::drive`. See LIFECYCLE.md beside this file for the states,
//! transitions and invariants. Uses routing, tls, http, tcp and security; knows nothing of napi.

mod guards;
mod sniff;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{SockRef, TcpKeepalive};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tokio::net::TcpStream;

use crate::listener::AcceptedSocket;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::acme::ChallengeStore;
use crate::http::headers::ConnectionValues;
use crate::http::io::{ClientCounters, ClientIo, Replay};
use crate::hooks::{ConnectionIdentity, EngineEvent, EventKind, Handoff, HandoffEnd, ScriptContext, SocketKind};
use crate::http::edge::{normalise_path, Refusal};
use crate::http::head::{HeadParse, RequestHead};
use crate::http::pipeline::{ConnectionContext, HttpEnv, ServerAddress, TerminatedTls};
use crate::http::server::{serve as serve_http, HttpLimitOptions, HttpLimits, HttpVersion, Shutdown};
use crate::http::websocket::TunnelScope;
use crate::access_log::{AccessLog, AccessRecord, Opening};
use crate::metrics::{ByteCounters, EngineMetrics, TerminationReason};
use crate::proxy_protocol;
use crate::matchers::ip::{canonical_ip, IpList};
use crate::routing::table::Route;
use crate::routing::table::RequestFacts;
use crate::routing::{ConnectionFacts, Protocol, RouteTable};
use crate::security::{ConnectionLimiter, IpGuard, IpPolicy, IpRefusal, RouteGuard};
use crate::tcp::{relay, relay_streams, ByteSinks, Held, RelayEnd, RelayLimits};
use crate::tls::client_hello::{fatal_alert, ALERT_UNRECOGNIZED_NAME};

pub use guards::ConnectionGuard;
use sniff::Sniffed;

/// What a backend connect may take when the route sets no `timeouts.connectMs`.
/// After refusing a request, how long the rest of what the client sends is read and dropped, so
/// that closing with unread bytes does not reset the connection before the answer is read.
/// A refusal alert is best effort: a client that does not read it does not hold the session.
const ALERT_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// After a socket-pair relay ends, how long to wait for the wrapper's word on how its side ended.
const HANDOFF_REPORT_WAIT: Duration = Duration::from_millis(200);

/// Everything of the engine a session needs, fixed for the life of a started engine.
pub struct SessionEnv {
    pub metrics: Arc<EngineMetrics>,
    pub limiter: Arc<ConnectionLimiter>,
    pub global_policy: IpPolicy,
    pub initial_data_timeout: Duration,
    /// `maxHeaderSize`, `headerTimeout`, `http2MaxConcurrentStreams` of the HTTP engine.
    pub http_limits: HttpLimitOptions,
    /// `min(socketTimeout, inactivityTimeout)`: both bound how long a connection may sit idle.
    pub idle_timeout: Duration,
    pub max_lifetime: Duration,
    pub max_pending_data: usize,
    pub no_delay: bool,
    pub keep_alive: Option<Duration>,
    /// Cancelled when a stop begins (or by `force_close`, its parent): HTTP connections finish
    /// what is in flight and close.
    pub draining: CancellationToken,
    /// `acceptProxyProtocol`: connections from these peers must begin with a PROXY header.
    pub proxy_header_from: Option<IpList>,
    /// `proxyIPs`: peers whose PROXY headers are believed.
    pub trusted_proxies: IpList,
    /// `trustForwardedHeaders`: the forwarding headers of `proxyIPs` peers are believed too.
    pub trust_forwarded_headers: bool,
    /// PROXY header version sent to backends when a route does not say (0 = none).
    pub send_proxy_protocol: u8,
    /// Cancelled when a stop's grace period is over: every session closes at once.
    pub force_close: CancellationToken,
    /// ACME HTTP-01 answers, served on the challenge port ahead of its routes.
    pub acme_challenges: Arc<ChallengeStore>,
    pub http: Arc<HttpEnv>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Accepted,
    Sniffing,
    Routed,
    Connecting,
    Relaying,
    /// Reading a trusted balancer's PROXY header.
    ProxyHeader,
    /// Completing the TLS handshake of a terminating route.
    Terminating,
    /// Served by the HTTP engine: every request is routed on its own.
    Http,
    /// A socket handler in JavaScript owns the connection (or its plaintext, over a socket pair).
    HandedToJs,
    Closed,
}

impl State {
    /// The transitions of LIFECYCLE.md: what may follow this state.
    fn may_become(self, next: State) -> bool {
        use State::*;
        matches!(
            (self, next),
            (Accepted, ProxyHeader | Sniffing | Closed)
                | (ProxyHeader, Sniffing | Closed)
                | (Sniffing, Http | Routed | Closed)
                | (Routed, Terminating | Connecting | HandedToJs | Closed)
                | (Terminating, Http | HandedToJs | Closed)
                | (Connecting, Relaying | Closed)
                | (Http | Relaying | HandedToJs, Closed)
        )
    }

    /// Moves session `id` to `next`; a transition LIFECYCLE.md does not have is a bug, reported
    /// (and fatal in debug builds) rather than carried on silently. A method of the state, not of
    /// the session, so that it can be called while other fields of the session are borrowed.
    fn advance(&mut self, next: State, id: u64) {
        if !self.may_become(next) {
            tracing::error!(id, from = ?*self, to = ?next, "session state transition outside LIFECYCLE.md");
            debug_assert!(false, "session {id} went from {:?} to {next:?}", *self);
        }
        *self = next;
    }
}

/// The per-connection context.
pub struct Session {
    pub id: u64,
    pub local_port: u16,
    pub client_ip: IpAddr,
    pub client_port: u16,
    /// The socket's own peer (a balancer, when a PROXY header named the client).
    pub peer_ip: IpAddr,
    /// Where the client connected to, when a PROXY header said so.
    pub destination: Option<SocketAddr>,
    pub accepted_at: Instant,
    pub state: State,
    pub domain: Option<String>,
    pub tls_version: Option<&'static str>,
    pub route_label: Option<Arc<str>>,
    pub termination: Option<TerminationReason>,
}

impl Session {
    pub fn new(id: u64, peer: SocketAddr, local_port: u16) -> Self {
        Session {
            id,
            local_port,
            client_ip: canonical_ip(peer.ip()),
            client_port: peer.port(),
            peer_ip: canonical_ip(peer.ip()),
            destination: None,
            accepted_at: Instant::now(),
            state: State::Accepted,
            domain: None,
            tls_version: None,
            route_label: None,
            termination: None,
        }
    }

    /// Runs the connection to its end and records why it ended.
    /// (A function returning the future rather than an `async fn`: the future uses what it
    /// captures in place instead of holding each argument twice, for the connection's whole life.
    /// The session itself is boxed: inline it would take the connection's task past tokio's
    /// smallest cache-aligned task size, which costs every idle connection more than the box.)
    pub fn run(self, env: Arc<SessionEnv>, table: Arc<RouteTable>, client: AcceptedSocket) -> impl Future<Output = ()> + Send + 'static {
        let mut session = Box::new(self);
        async move {
            // Accepted: counted at once. The count is released only after the reason is recorded, so
            // whoever sees activeConnections drop also sees why the connection ended.
            let mut counted = ConnectionGuard::new(&env.metrics);
            // Routing runs boxed and its state is freed once it decides; a plain HTTP connection is
            // then served by what `drive` hands back, so that an idle keep-alive connection holds its
            // serving state and this small future, not the routing state as well.
            let reason = match Box::pin(session.drive(&env, &table, client, &mut counted)).await {
                Next::Ended(reason) => reason,
                Next::ServeHttp(serving) => serving.await,
            };
            let ended_in = session.state;
            session.state.advance(State::Closed, session.id);
            session.termination = Some(reason);
            env.metrics.record_termination(reason);
            drop(counted);
            tracing::debug!(
                id = session.id,
                client = %session.client_ip,
                client_port = session.client_port,
                port = session.local_port,
                domain = session.domain.as_deref().unwrap_or("-"),
                route = session.route_label.as_deref().unwrap_or("-"),
                reason = reason.as_str(),
                state = ?ended_in,
                "connection closed"
            );
        }
    }

    /// Routes the connection and runs it to its end, except plain HTTP, which it hands back to be
    /// served (`Next::ServeHttp`). The other paths (TLS, socket hand-offs, connect and relay) await
    /// boxed futures, so that this one stays small and a path's state is allocated only when it
    /// is taken.
    async fn drive<'e>(&mut self, env: &'e SessionEnv, table_arc: &Arc<RouteTable>, client: AcceptedSocket, counted: &mut ConnectionGuard<'_>) -> Next<'e> {
        let mut relayed = Relayed::default();
        let next = self.route_and_run(env, table_arc, client, counted, &mut relayed).await;
        // A connection the HTTP engine served is in the log request by request.
        if let (Next::Ended(reason), Some(access_log), false) = (&next, &env.http.access_log, self.state == State::Http) {
            let record = self.access_record(access_log, *reason, relayed);
            access_log.submit(&record);
        }
        next
    }

    /// The access log's line for a connection that was not served as HTTP.
    fn access_record(&self, log: &AccessLog, reason: TerminationReason, relayed: Relayed) -> AccessRecord {
        let client_ip = self.client_ip.to_string();
        let opening = Opening {
            client_ip: client_ip.as_bytes(),
            method: None,
            host: self.domain.as_deref().map(str::as_bytes),
            path: None,
            protocol: "tcp",
            tls: relayed.tls || self.tls_version.is_some(),
            referer: None,
            user_agent: None,
        };
        let mut record = log.begin(&opening, self.accepted_at);
        record.route = self.route_label.clone();
        record.bytes_in = relayed.bytes.bytes_in.load(std::sync::atomic::Ordering::Relaxed);
        record.bytes_out = relayed.bytes.bytes_out.load(std::sync::atomic::Ordering::Relaxed);
        record.upstream = relayed.upstream;
        record.termination = reason.as_str();
        record
    }

    async fn route_and_run<'e>(
        &mut self,
        env: &'e SessionEnv,
        table_arc: &Arc<RouteTable>,
        mut client: AcceptedSocket,
        counted: &mut ConnectionGuard<'_>,
        relayed: &mut Relayed,
    ) -> Next<'e> {
        let table: &RouteTable = table_arc;
        // Every exit below releases exactly what it took (guards).
        let mut initial = Vec::new();
        // ProxyHeader: a trusted balancer names the client first; everything below sees that client.
        if env.proxy_header_from.as_ref().is_some_and(|from| from.matches(self.peer_ip)) {
            self.state.advance(State::ProxyHeader, self.id);
            let deadline = self.accepted_at + env.initial_data_timeout;
            // Boxed: only connections from a trusted balancer wait here.
            match Box::pin(read_proxy_header(&mut client, &mut initial, deadline)).await {
                Ok(header) => {
                    if let Some((source, destination)) = header.addresses {
                        self.client_ip = canonical_ip(source.ip());
                        self.client_port = source.port();
                        self.destination = Some(destination);
                    }
                }
                Err(reason) => return Next::Ended(reason),
            }
        }
        if !env.global_policy.admits(self.client_ip) {
            return Next::Ended(TerminationReason::IpBlocked);
        }
        let ip_slot = match env.limiter.admit(self.client_ip) {
            Ok(slot) => slot,
            Err(IpRefusal::TooManyConnections) => return Next::Ended(TerminationReason::PerIpLimit),
            Err(IpRefusal::RateLimited) => return Next::Ended(TerminationReason::RateLimited),
        };
        // The client socket's options came from the listening socket (listener::bind).
        let Some(plan) = table.port(self.local_port) else {
            return Next::Ended(TerminationReason::NoRoute);
        };

        // Sniffing: only where some route of this port needs facts from the client.
        self.state.advance(State::Sniffing, self.id);
        let early_bytes = |n: usize| {
            env.metrics.bytes.bytes_in.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            ip_slot.bytes().bytes_in.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        };
        let sniffed = if plan.needs_client_data {
            let deadline = self.accepted_at + env.initial_data_timeout;
            match Box::pin(sniff::sniff(&mut client, &mut initial, deadline, env.http_limits.header_timeout, env.http_limits.max_header_size, early_bytes)).await {
                Ok(sniffed) => Some(sniffed),
                Err(reason) => return Next::Ended(reason),
            }
        } else {
            None
        };
        // Only a trusted peer may speak for someone else.
        if sniffed.is_some() && !matches!(proxy_protocol::parse(&initial), proxy_protocol::Parse::NotProxy) {
            return Next::Ended(TerminationReason::InvalidProxyHeader);
        }
        let protocol = match &sniffed {
            None => Protocol::NotSniffed,
            Some(Sniffed::Tls(hello)) => Protocol::Tls { version: hello.max_version_name() },
            Some(Sniffed::Http(_) | Sniffed::H2Preface) => Protocol::Http,
            Some(Sniffed::RefusedHttp(_)) if plan.serves_http => Protocol::Http,
            // No route here reads requests: these bytes are another protocol's business.
            Some(Sniffed::RefusedHttp(_) | Sniffed::Other) => Protocol::Other,
        };
        let mut first_head: Option<Box<RequestHead>> = None;
        let h2_preface = matches!(sniffed, Some(Sniffed::H2Preface));
        match sniffed {
            Some(Sniffed::Tls(hello)) => {
                self.domain = hello.sni;
                self.tls_version = match protocol {
                    Protocol::Tls { version } => version,
                    _ => None,
                };
            }
            Some(Sniffed::Http(head)) => {
                // A connection served request by request has no one domain (each request is
                // routed by its own host): the first head's is read only for what decides on the
                // whole connection, a socket handler's route, the connection event, a port that
                // routes connections rather than requests.
                if !plan.serves_http || plan.socket_handlers || env.http.scripts.wants(EventKind::Connection) {
                    self.domain = head.domain();
                }
                first_head = Some(head);
            }
            // HTTP on a port whose routes read requests is answered, never relayed raw.
            Some(Sniffed::RefusedHttp(refusal)) if plan.serves_http => {
                self.state.advance(State::Http, self.id);
                Box::pin(refuse_http(&mut client, &refusal)).await;
                return Next::Ended(TerminationReason::InvalidHttp);
            }
            _ => {}
        }
        // An ACME server validating a challenge: answered here, whatever the routes of the port.
        if plan.acme_challenges {
            let challenge = first_head.as_ref().map(|head| head.path()).filter(|path| crate::acme::ChallengeStore::is_challenge(path));
            // Boxed: rare, and it may wait on Redis.
            let response = match challenge {
                Some(path) => Box::pin(env.acme_challenges.answer(path)).await,
                None => None,
            };
            if let Some(response) = response {
                Box::pin(async {
                    let _ = tokio::time::timeout(ALERT_WRITE_TIMEOUT, client.write_all(&response)).await;
                    let _ = client.shutdown().await;
                })
                .await;
                return Next::Ended(TerminationReason::Completed);
            }
        }

        if env.http.scripts.wants(EventKind::Connection) {
            env.http.scripts.emit(EngineEvent::Connection {
                connection_id: self.id,
                client_ip: self.client_ip,
                port: self.local_port,
                domain: self.domain.clone(),
            });
        }
        let facts = ConnectionFacts {
            local_port: self.local_port,
            client_ip: self.client_ip,
            domain: self.domain.as_deref(),
            protocol,
        };

        // Plain HTTP on a port whose routes look at requests: the HTTP engine routes each request,
        // unless the first one belongs to a socket handler, which then takes the whole connection.
        let handler_route = match &first_head {
            Some(head) if plan.serves_http && plan.socket_handlers => {
                let path = match normalise_path(head.path()) {
                    Ok(path) => path,
                    Err(refusal) => {
                        Box::pin(refuse_http(&mut client, &refusal)).await;
                        return Next::Ended(TerminationReason::InvalidHttp);
                    }
                };
                let request = RequestFacts { connection: facts, path: &path, method: &head.method, headers: &head.headers };
                table.find_for_request(&request).filter(|route| route.socket_handler.is_some()).cloned()
            }
            _ => None,
        };
        if protocol == Protocol::Http && plan.serves_http && handler_route.is_none() {
            self.state.advance(State::Http, self.id);
            let counters = Arc::new(ClientCounters::new(env.metrics.clone(), ip_slot));
            let client_fd = client.as_raw_fd();
            // The head read here is the engine's first request: its bytes are not read again.
            let (first_head, replayed) = split_first_head(first_head, initial);
            let io = Replay::new(ClientIo::new(client, counters.clone()), replayed);
            if matches!(protocol, Protocol::Http) && !h2_preface {
                counters.time_heads();
            }
            let ctx = self.http_context(env, table_arc, None, None, client_fd, counters.clone());
            let version = if h2_preface { HttpVersion::Http2 } else { HttpVersion::Http1 };
            // Boxed (by `serve`), as every branch that outlives the routing decision: the session's
            // own future stays small, and an idle HTTP connection holds only what serving HTTP needs.
            return Next::ServeHttp(serve_http(io, version, first_head, counters, ctx, self.http_limits(env), Shutdown { draining: &env.draining, force_close: &env.force_close }));
        }

        // Boxed: a connection served as HTTP (above) never carries room for what a routed one
        // may need (a relay, a TLS session, a hand-off).
        let routed = Routed { client, initial, first_head, protocol, handler_route, ip_slot };
        Next::Ended(Box::pin(self.run_routed(env, table_arc, routed, counted, relayed)).await)
    }

    /// A connection routed as a whole: refused, handed to a socket handler, TLS terminated and
    /// served as HTTP, or connected to its target and relayed.
    async fn run_routed(&mut self, env: &SessionEnv, table_arc: &Arc<RouteTable>, routed: Routed, counted: &mut ConnectionGuard<'_>, relayed: &mut Relayed) -> TerminationReason {
        let Routed { mut client, mut initial, first_head, protocol, handler_route, ip_slot } = routed;
        // Routed: the table this connection was accepted under decides, whatever updates follow.
        let table: &RouteTable = table_arc;
        let facts = ConnectionFacts {
            local_port: self.local_port,
            client_ip: self.client_ip,
            domain: self.domain.as_deref(),
            protocol,
        };
        env.metrics.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.state.advance(State::Routed, self.id);
        let Some(route) = handler_route.as_ref().or_else(|| table.find(&facts)) else {
            if matches!(protocol, Protocol::Tls { .. }) {
                let alert = fatal_alert(ALERT_UNRECOGNIZED_NAME);
                let _ = tokio::time::timeout(ALERT_WRITE_TIMEOUT, client.write_all(&alert)).await;
            }
            return TerminationReason::NoRoute;
        };
        self.route_label = Some(route.label.clone());
        if !route.policy.admits(self.client_ip) {
            route.stats.forbidden.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return TerminationReason::RouteIpBlocked;
        }
        let Some(route_slot) = RouteGuard::acquire(&route.stats, route.max_connections) else {
            return TerminationReason::RouteConnectionLimit;
        };
        if matches!(protocol, Protocol::Tls { .. }) || (protocol == Protocol::NotSniffed && route.tls.is_some()) {
            counted.mark_tls();
            relayed.tls = true;
        }
        route_slot.stats.bytes.bytes_in.fetch_add(initial.len() as u64, std::sync::atomic::Ordering::Relaxed);
        env.http.scripts.route_matched(|| self.identity(None), self.domain.as_deref(), route);

        // HandedToJs: a socket handler takes the connection, as plaintext where TLS ends here.
        if let Some(handler) = route.socket_handler {
            let server_ip = client.server_address().map(|a| a.ip());
            let mut context = ScriptContext::for_route(&self.identity(server_ip), self.domain.as_deref(), route);
            if let Some(head) = first_head {
                context.path = Some(head.path().to_string());
                context.query = head.query().map(str::to_string);
                context.headers = Some(header_pairs(&head.headers));
            }
            let Some(acceptor) = route.tls.as_ref().and_then(|tls| tls.acceptor.clone()) else {
                let sinks = ByteSinks { sinks: &[&env.metrics.bytes, &route_slot.stats.bytes, ip_slot.bytes(), &relayed.bytes] };
                return Box::pin(self.hand_off_tcp(env, handler, client, initial, context, &sinks)).await;
            };
            self.state.advance(State::Terminating, self.id);
            let counters = Arc::new(ClientCounters::new(env.metrics.clone(), ip_slot));
            let io = Replay::new(ClientIo::new(client, counters), initial.into());
            let deadline = self.accepted_at + env.initial_data_timeout;
            // One boxed future from the handshake on: a TLS session held in this function's own
            // state would size the future of every connection, TLS or not.
            return Box::pin(async {
                let stream = match accept_tls(acceptor, io, deadline, self.id).await {
                    Ok(stream) => stream,
                    Err(reason) => return reason,
                };
                self.tls_version = stream.get_ref().1.protocol_version().and_then(tls_version_label);
                context.is_tls = true;
                context.tls_version = self.tls_version;
                // Global and per-IP bytes are counted on the wire by ClientIo; the route's here.
                let sinks = ByteSinks { sinks: &[&route_slot.stats.bytes, &relayed.bytes] };
                self.hand_off_pair(env, handler, stream, context, &sinks).await
            })
            .await;
        }

        // Terminating: TLS ends here and the HTTP engine serves what is inside, request by request
        // (each request takes its own route slot, so the connection gives this one back).
        if let Some(acceptor) = route.tls.as_ref().and_then(|tls| tls.acceptor.clone()) {
            drop(route_slot);
            self.state.advance(State::Terminating, self.id);
            let counters = Arc::new(ClientCounters::new(env.metrics.clone(), ip_slot));
            let client_fd = client.as_raw_fd();
            let io = Replay::new(ClientIo::new(client, counters.clone()), initial.into());
            let deadline = self.accepted_at + env.initial_data_timeout;
            // One boxed future from the handshake on: a TLS session held in this function's own
            // state would size the future of every connection, TLS or not.
            return Box::pin(async {
                let stream = match accept_tls(acceptor, io, deadline, self.id).await {
                    Ok(stream) => stream,
                    Err(reason) => return reason,
                };
                self.tls_version = stream.get_ref().1.protocol_version().and_then(tls_version_label);
                self.state.advance(State::Http, self.id);
                let ctx = self.http_context(env, table_arc, self.domain.clone(), Some(route.clone()), client_fd, counters.clone());
                let limits = self.http_limits(env);
                serve_terminated(stream, counters, ctx, limits, deadline, env).await
            })
            .await;
        }
        let Some(target) = route.select_target(self.local_port, self.client_ip) else {
            return TerminationReason::NoTarget;
        };
        let server_ip = if target.functions.is_some() { client.server_address().map(|a| a.ip()) } else { None };
        let (target_host, target_port) = match Box::pin(env.http.scripts.endpoint(&target, || ScriptContext::for_route(&self.identity(server_ip), self.domain.as_deref(), route))).await {
            Ok(endpoint) => endpoint,
            Err(err) => {
                tracing::debug!(id = self.id, route = &*route.label, error = %err, "target function failed");
                return TerminationReason::ScriptFailed;
            }
        };

        // Connecting: the client may keep sending (kept, up to maxPendingDataSize) or leave.
        self.state.advance(State::Connecting, self.id);
        if env.http.access_log.is_some() {
            relayed.upstream = Some((target_host.clone(), target_port));
        }
        let sinks = ByteSinks { sinks: &[&env.metrics.bytes, &route_slot.stats.bytes, ip_slot.bytes(), &relayed.bytes] };
        let connect_timeout = route.connect_timeout;
        let connected = Box::pin(connect_backend((&*target_host, target_port), connect_timeout, &mut client, &mut initial, env, &sinks)).await;
        if let Some(lease) = &target.lease {
            match &connected {
                Ok(_) => lease.report_connect(true),
                Err(TerminationReason::BackendConnectFailed | TerminationReason::BackendConnectTimeout) => lease.report_connect(false),
                Err(_) => {}
            }
        }
        let (mut backend, client_done) = match connected {
            Ok(connected) => connected,
            Err(reason) => return reason,
        };
        apply_socket_options(&backend, env);
        let proxy_version = target.send_proxy_protocol.unwrap_or(env.send_proxy_protocol);
        if proxy_version > 0 {
            let destination = self.destination.or_else(|| client.server_address());
            let header = destination.and_then(|d| proxy_protocol::encode(proxy_version, SocketAddr::new(self.client_ip, self.client_port), d));
            if let Some(header) = header {
                if backend.write_all(&header).await.is_err() {
                    return TerminationReason::BackendError;
                }
            }
        }

        // Relaying until both sides are done or a limit ends it. What the client sent while the
        // backend was connected goes first, inside the relay: written here before it, to a backend
        // that answers as it reads, it would wait for a reader of the answers that never came.
        self.state.advance(State::Relaying, self.id);
        let Ok(mut client) = client.into_registered() else {
            return TerminationReason::ClientError;
        };
        let limits = RelayLimits { idle: env.idle_timeout, deadline: self.accepted_at + env.max_lifetime };
        let held = Held { bytes: initial, client_done };
        match Box::pin(relay(&mut client, &mut backend, &sinks, limits, &env.force_close, held)).await {
            RelayEnd::Completed => TerminationReason::Completed,
            RelayEnd::ClientError => TerminationReason::ClientError,
            RelayEnd::BackendError => TerminationReason::BackendError,
            RelayEnd::IdleTimeout => TerminationReason::IdleTimeout,
            RelayEnd::LifetimeExceeded => TerminationReason::LifetimeExceeded,
            RelayEnd::Shutdown => TerminationReason::Shutdown,
        }
    }
}

/// What the access log learns of a connection the proxy relays or hands off: bytes each way and
/// the backend.
#[derive(Default)]
struct Relayed {
    bytes: ByteCounters,
    upstream: Option<(Arc<str>, u16)>,
    /// TLS, passed through or ended here.
    tls: bool,
}

/// What routing hands the part of a connection that is routed as a whole.
struct Routed {
    client: AcceptedSocket,
    /// What was read before the routing decision: sniffed bytes, or a PROXY header's remainder.
    initial: Vec<u8>,
    first_head: Option<Box<RequestHead>>,
    protocol: Protocol,
    /// The socket handler's route that the first request chose, if one did.
    handler_route: Option<Arc<Route>>,
    ip_slot: IpGuard,
}

/// How `drive` ends: with the connection's end, or with the serving of a plain HTTP connection
/// still to run.
enum Next<'e> {
    Ended(TerminationReason),
    ServeHttp(Pin<Box<dyn Future<Output = TerminationReason> + Send + 'e>>),
}

impl Session {
    fn identity(&self, server_ip: Option<IpAddr>) -> ConnectionIdentity {
        ConnectionIdentity {
            connection_id: self.id,
            port: self.local_port,
            client_ip: self.client_ip,
            client_port: self.client_port,
            server_ip,
            is_tls: self.tls_version.is_some(),
            tls_version: self.tls_version,
        }
    }

    /// Gives the accepted descriptor itself to the handler. The engine keeps a duplicate only to
    /// end the connection at stop or at `maxConnectionLifetime`; JavaScript does the I/O.
    async fn hand_off_tcp(
        &mut self,
        env: &SessionEnv,
        handler: u32,
        client: AcceptedSocket,
        initial: Vec<u8>,
        context: ScriptContext,
        sinks: &ByteSinks<'_>,
    ) -> TerminationReason {
        let fd: std::os::fd::OwnedFd = match client.into_std() {
            Ok(socket) => socket.into(),
            Err(_) => return TerminationReason::ClientError,
        };
        let Ok(control) = fd.try_clone() else {
            return TerminationReason::ClientError;
        };
        self.state.advance(State::HandedToJs, self.id);
        let ended = env.http.scripts.hand_off(Handoff { handler, fd, kind: SocketKind::Tcp, initial, context });
        tokio::pin!(ended);
        let deadline = self.accepted_at + env.max_lifetime;
        let (reason, report) = tokio::select! {
            ended = &mut ended => match ended {
                Ok(end) => (handoff_reason(&end), Some(end)),
                Err(err) => {
                    tracing::debug!(id = self.id, error = %err, "socket hand-off failed");
                    (TerminationReason::ScriptFailed, None)
                }
            },
            _ = env.force_close.cancelled() => (TerminationReason::Shutdown, None),
            _ = tokio::time::sleep_until(deadline.into()) => (TerminationReason::LifetimeExceeded, None),
        };
        // Ends the connection for every descriptor of it (JavaScript's sees EOF or a reset and
        // closes); dropping `control` then releases the engine's.
        let _ = SockRef::from(&control).shutdown(std::net::Shutdown::Both);
        // Cut short by the engine: JavaScript's account of the bytes comes once its socket closed.
        let report = match (reason, report) {
            (TerminationReason::Shutdown | TerminationReason::LifetimeExceeded, None) => {
                tokio::time::timeout(HANDOFF_REPORT_WAIT, &mut ended).await.ok().and_then(Result::ok)
            }
            (_, report) => report,
        };
        if let Some(end) = report {
            sinks.add_in(end.bytes_read as usize);
            sinks.add_out(end.bytes_written as usize);
        }
        reason
    }

    /// Terminated TLS: the handler gets one end of a socket pair carrying the plaintext, and the
    /// engine relays the other end to the TLS session under the usual limits.
    async fn hand_off_pair<S>(&mut self, env: &SessionEnv, handler: u32, mut stream: S, context: ScriptContext, sinks: &ByteSinks<'_>) -> TerminationReason
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let Ok((engine_end, script_end)) = std::os::unix::net::UnixStream::pair() else {
            return TerminationReason::ClientError;
        };
        let engine_end = match engine_end.set_nonblocking(true).and_then(|()| tokio::net::UnixStream::from_std(engine_end)) {
            Ok(end) => end,
            Err(_) => return TerminationReason::ClientError,
        };
        let mut engine_end = engine_end;
        self.state.advance(State::HandedToJs, self.id);
        let ended = env.http.scripts.hand_off(Handoff { handler, fd: script_end.into(), kind: SocketKind::Pair, initial: Vec::new(), context });
        tokio::pin!(ended);
        let limits = RelayLimits { idle: env.idle_timeout, deadline: self.accepted_at + env.max_lifetime };
        let (relayed, report) = {
            let relay = relay_streams(&mut stream, &mut engine_end, sinks, limits, &env.force_close);
            tokio::pin!(relay);
            let mut report = None;
            let relayed = loop {
                tokio::select! {
                    relayed = &mut relay => break relayed,
                    answer = &mut ended, if report.is_none() => match answer {
                        Ok(end) => report = Some(end),
                        // No JavaScript side took the socket: nothing will ever read it.
                        Err(err) => {
                            tracing::debug!(id = self.id, error = %err, "socket hand-off failed");
                            return TerminationReason::ScriptFailed;
                        }
                    },
                }
            };
            (relayed, report)
        };
        drop(engine_end);
        let report = match report {
            Some(end) => Some(end),
            None => tokio::time::timeout(HANDOFF_REPORT_WAIT, &mut ended).await.ok().and_then(Result::ok),
        };
        if report.is_some_and(|end| end.handler_failed) {
            return TerminationReason::HandlerFailed;
        }
        match relayed {
            RelayEnd::Completed | RelayEnd::BackendError => TerminationReason::HandedToScript,
            RelayEnd::ClientError => TerminationReason::ClientError,
            RelayEnd::IdleTimeout => TerminationReason::IdleTimeout,
            RelayEnd::LifetimeExceeded => TerminationReason::LifetimeExceeded,
            RelayEnd::Shutdown => TerminationReason::Shutdown,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn http_context(
        &self,
        env: &SessionEnv,
        table: &Arc<RouteTable>,
        sni: Option<String>,
        tls_route: Option<Arc<Route>>,
        client_fd: std::os::fd::RawFd,
        counters: Arc<ClientCounters>,
    ) -> Arc<ConnectionContext> {
        let peer = HttpPeer {
            connection_id: self.id,
            local_port: self.local_port,
            client: SocketAddr::new(self.client_ip, self.client_port),
            peer_ip: self.peer_ip,
            server: ServerAddress::of_socket(self.destination),
            tls_version: self.tls_version,
            accepted_at: self.accepted_at,
        };
        env.http_context(Arc::clone(table), peer, sni, tls_route, Some(client_fd), counters)
    }

    fn http_limits(&self, env: &SessionEnv) -> HttpLimits {
        env.http_limits_from(self.accepted_at)
    }
}

/// Who a client connection served by the HTTP engine is, as its context needs it.
pub struct HttpPeer {
    pub connection_id: u64,
    pub local_port: u16,
    /// The client (named by a trusted PROXY header, where one came).
    pub client: SocketAddr,
    /// The address the connection came from (a balancer, where the PROXY header named another).
    pub peer_ip: IpAddr,
    /// Where the client connected to (a PROXY header's destination, where one came).
    pub server: ServerAddress,
    pub tls_version: Option<&'static str>,
    pub accepted_at: Instant,
}

impl SessionEnv {
    /// The context of a client connection the HTTP engine serves (over TCP or QUIC): the one
    /// place its engine-wide parts are derived.
    pub fn http_context(
        &self,
        table: Arc<RouteTable>,
        peer: HttpPeer,
        sni: Option<String>,
        tls_route: Option<Arc<Route>>,
        client_fd: Option<std::os::fd::RawFd>,
        counters: Arc<ClientCounters>,
    ) -> Arc<ConnectionContext> {
        Arc::new(ConnectionContext {
            env: self.http.clone(),
            table,
            connection_id: peer.connection_id,
            local_port: peer.local_port,
            client_ip: peer.client.ip(),
            client_port: peer.client.port(),
            server: peer.server,
            trusted_peer: self.trust_forwarded_headers && self.trusted_proxies.matches(peer.peer_ip),
            tls: tls_route.map(|route| Box::new(TerminatedTls { version: peer.tls_version, sni: sni.map(String::into_boxed_str), route })),
            tunnels: TunnelScope::new(RelayLimits { idle: self.idle_timeout, deadline: peer.accepted_at + self.max_lifetime }),
            header_values: ConnectionValues::new(peer.client.ip(), peer.local_port),
            client_fd,
            counters,
            upstream_slots: std::sync::OnceLock::new(),
            max_upstream_per_client: self.http_limits.max_concurrent_streams / 4,
        })
    }

    /// The HTTP limits of a connection accepted at `accepted_at`.
    pub fn http_limits_from(&self, accepted_at: Instant) -> HttpLimits {
        HttpLimits {
            max_header_size: self.http_limits.max_header_size,
            header_timeout: self.http_limits.header_timeout,
            max_concurrent_streams: self.http_limits.max_concurrent_streams,
            idle_timeout: self.idle_timeout,
            keep_alive_timeout: self.http_limits.keep_alive_timeout,
            deadline: accepted_at + self.max_lifetime,
        }
    }
}

/// The TLS handshake of a route that ends TLS here, by the accept deadline.
async fn accept_tls<IO>(acceptor: Arc<rustls::ServerConfig>, io: IO, deadline: Instant, id: u64) -> Result<tokio_rustls::server::TlsStream<IO>, TerminationReason>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match tokio::time::timeout_at(deadline.into(), TlsAcceptor::from(acceptor).accept(io)).await {
        Err(_) => Err(TerminationReason::InitialDataTimeout),
        Ok(Err(err)) => {
            tracing::debug!(id, error = %err, "TLS handshake failed");
            Err(TerminationReason::TlsHandshakeFailed)
        }
        Ok(Ok(stream)) => Ok(stream),
    }
}

/// Reads a PROXY header into `buf` (the client's bytes after it stay there) by `deadline`.
async fn read_proxy_header(client: &mut AcceptedSocket, buf: &mut Vec<u8>, deadline: Instant) -> Result<proxy_protocol::ProxyHeader, TerminationReason> {
    loop {
        match proxy_protocol::parse(buf) {
            proxy_protocol::Parse::Complete(header, consumed) => {
                buf.drain(..consumed);
                return Ok(header);
            }
            proxy_protocol::Parse::Invalid(why) => {
                tracing::debug!(reason = why, "malformed PROXY header");
                return Err(TerminationReason::InvalidProxyHeader);
            }
            proxy_protocol::Parse::NotProxy => return Err(TerminationReason::InvalidProxyHeader),
            proxy_protocol::Parse::Incomplete => {}
        }
        buf.reserve(512);
        match tokio::time::timeout_at(deadline.into(), client.read_buf(buf)).await {
            Err(_) => return Err(TerminationReason::InitialDataTimeout),
            Ok(Err(_)) => return Err(TerminationReason::ClientError),
            Ok(Ok(0)) => return Err(TerminationReason::ClientClosedBeforeData),
            Ok(Ok(_)) => {}
        }
    }
}

/// Terminated TLS: the first bytes are read (by `first_head_by`) and decide the protocol, the
/// HTTP/2 preface or an HTTP/1.x head checked as a plain connection's is; then the engine serves it.
async fn serve_terminated<S>(
    mut stream: S,
    counters: Arc<ClientCounters>,
    ctx: Arc<ConnectionContext>,
    limits: HttpLimits,
    first_head_by: Instant,
    env: &SessionEnv,
) -> TerminationReason
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + Sync + 'static,
{
    let shutdown = Shutdown { draining: &env.draining, force_close: &env.force_close };
    // ALPN `h2` is not taken on trust: the first bytes say which protocol the client speaks (the
    // HTTP/2 preface or an HTTP/1.x head), as on plain ports.
    let mut head = Vec::new();
    let max_head = env.http_limits.max_header_size;
    let (version, first_head) = match sniff::read_first_head(&mut stream, &mut head, first_head_by, env.http_limits.header_timeout, max_head).await {
        Err(reason) => return reason,
        Ok(Some(HeadParse::Request(first))) => {
            counters.time_heads();
            (HttpVersion::Http1, Some(Box::new(first)))
        }
        Ok(Some(HeadParse::H2Preface)) => (HttpVersion::Http2, None),
        Ok(Some(HeadParse::Refused(refusal))) => {
            refuse_http(&mut stream, &refusal).await;
            return TerminationReason::InvalidHttp;
        }
        Ok(Some(HeadParse::NotHttp | HeadParse::Incomplete) | None) => {
            refuse_http(&mut stream, &Refusal::bad_request("not an HTTP/1.x request")).await;
            return TerminationReason::InvalidHttp;
        }
    };
    let (first_head, replayed) = split_first_head(first_head, head);
    serve_http(Replay::new(stream, replayed), version, first_head, counters, ctx, limits, shutdown).await
}

/// The bytes a connection's first reading took, for the HTTP engine: past the request head that
/// reading found (which the engine takes as its first request), or all of them.
fn split_first_head(first_head: Option<Box<RequestHead>>, mut read: Vec<u8>) -> (Option<Box<RequestHead>>, Bytes) {
    match first_head {
        // Most often nothing came after the head: no bytes are kept (a slice of them would take
        // an allocation of its own to share the buffer).
        Some(head) if head.len == read.len() => (Some(head), Bytes::new()),
        Some(head) if head.len < read.len() => {
            read.drain(..head.len);
            (Some(head), Bytes::from(read))
        }
        _ => (None, Bytes::from(read)),
    }
}

/// Answers a request the edge rules refuse and closes (lingering, so the answer is read).
async fn refuse_http<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(client: &mut S, refusal: &Refusal) {
    crate::http::h1::server::refuse(client, refusal).await;
}

fn handoff_reason(end: &HandoffEnd) -> TerminationReason {
    if end.handler_failed {
        TerminationReason::HandlerFailed
    } else {
        TerminationReason::HandedToScript
    }
}

fn header_pairs(headers: &http::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter_map(|(name, value)| Some((name.as_str().to_string(), value.to_str().ok()?.to_string())))
        .collect()
}

fn tls_version_label(version: rustls::ProtocolVersion) -> Option<&'static str> {
    match version {
        rustls::ProtocolVersion::TLSv1_3 => Some("TLSv1.3"),
        rustls::ProtocolVersion::TLSv1_2 => Some("TLSv1.2"),
        _ => None,
    }
}

/// Connects to the backend while watching the client. Bytes the client sends meanwhile are kept
/// for the backend (reading pauses at `maxPendingDataSize`). A client that closes having sent
/// nothing aborts the connect; one that half-closes after sending keeps its request going.
/// Returns the backend and whether the client has already half-closed.
async fn connect_backend(
    target: (&str, u16),
    timeout: Duration,
    client: &mut AcceptedSocket,
    pending: &mut Vec<u8>,
    env: &SessionEnv,
    sinks: &ByteSinks<'_>,
) -> Result<(TcpStream, bool), TerminationReason> {
    let connect = tokio::time::timeout(timeout, TcpStream::connect(target));
    tokio::pin!(connect);
    let mut client_done = false;
    // On the heap: a buffer held across an await here would size every connection's future.
    let mut chunk = vec![0u8; 4096];
    loop {
        let may_read = !client_done && pending.len() < env.max_pending_data;
        tokio::select! {
            result = &mut connect => {
                return match result {
                    Err(_) => Err(TerminationReason::BackendConnectTimeout),
                    Ok(Err(_)) => Err(TerminationReason::BackendConnectFailed),
                    Ok(Ok(backend)) => Ok((backend, client_done)),
                };
            }
            read = client.read(&mut chunk), if may_read => match read {
                Ok(0) if pending.is_empty() => return Err(TerminationReason::ClientClosedDuringConnect),
                Ok(0) => client_done = true,
                Ok(n) => {
                    sinks.add_in(n);
                    pending.extend_from_slice(&chunk[..n]);
                }
                Err(_) => return Err(TerminationReason::ClientError),
            },
            _ = env.force_close.cancelled() => return Err(TerminationReason::Shutdown),
        }
    }
}

/// A backend socket's options (client sockets inherit theirs from the listening socket).
fn apply_socket_options(stream: &TcpStream, env: &SessionEnv) {
    // Best effort: a socket that refuses an option still relays correctly.
    let _ = stream.set_nodelay(env.no_delay);
    if let Some(delay) = env.keep_alive {
        let _ = SockRef::from(stream).set_tcp_keepalive(&TcpKeepalive::new().with_time(delay));
    }
}

#[cfg(test)]
mod tests {
    use super::State;

    /// Every path of LIFECYCLE.md is a chain of allowed transitions; nothing leaves Closed and
    /// nothing skips routing on its way to a relay.
    #[test]
    fn the_state_machine_is_the_documented_one() {
        use State::*;
        let paths: &[&[State]] = &[
            &[Accepted, Closed],
            &[Accepted, ProxyHeader, Sniffing, Routed, Connecting, Relaying, Closed],
            &[Accepted, Sniffing, Http, Closed],
            &[Accepted, Sniffing, Routed, Terminating, Http, Closed],
            &[Accepted, Sniffing, Routed, Terminating, HandedToJs, Closed],
            &[Accepted, Sniffing, Routed, HandedToJs, Closed],
        ];
        for path in paths {
            for pair in path.windows(2) {
                assert!(pair[0].may_become(pair[1]), "{:?} -> {:?}", pair[0], pair[1]);
            }
        }
        for refused in [(Accepted, Relaying), (Sniffing, Connecting), (Http, Relaying), (Closed, Accepted), (Relaying, Http)] {
            assert!(!refused.0.may_become(refused.1), "{:?} -> {:?}", refused.0, refused.1);
        }
    }
}
