//! The reverse-proxy service: each request of a client connection is routed on its own (Host or
//! `:authority`, path, headers, method among the routes of the port), checked against the route's
//! policy, rewritten, sent upstream over a pooled connection and streamed back. Failures become
//! short native responses (404 no route, 403 denied, 502 upstream failure, 504 response timeout);
//! a WebSocket upgrade becomes a byte tunnel only once the upstream answered 101.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};

use crate::http::body::{ClientBody, UpstreamBody};
use crate::http::h1::client::{self as h1_client, ClientError, PendingUpstreamUpgrade};
use crate::http::h1::server::PendingUpgrade;
use rustls::pki_types::ServerName;

use crate::balance::affinity::{AffinityKey, AffinityStore, OnUnknown};
use crate::config::BackendProtocol;
use crate::http::body::{full, text_response, BoxError, Direction, ProxyBody, TrackedBody};
use crate::http::io::{ClientCounters, InFlight};
use crate::http::headers::{add_forwarded, apply_templates, strip_hop_by_hop, ConnectionValues, ForwardedFacts, TemplateContext};
use crate::http::pool::{Checkout, PoolKey, UpstreamError, UpstreamPool, UpstreamProtocol, UpstreamTls};
use crate::http::edge::{self, normalise_host, normalise_path, request_host};
use crate::http::websocket::{self, TunnelScope};
use crate::hooks::{EngineEvent, EventKind, ScriptContext, Scripts};
use crate::proxy_protocol;
use crate::metrics::{EngineMetrics, GaugeHold};
use crate::routing::table::{NativeResponse, RequestFacts, Route, SelectedTarget};
use crate::routing::{ConnectionFacts, Protocol, RouteTable};
use crate::security::http::Refusal as SecurityRefusal;
use crate::security::RouteGuard;

/// What a response head may take when the route sets no `timeouts.responseMs`.
const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(300);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTP engine's share of an engine: fixed while it runs.
pub struct HttpEnv {
    pub metrics: Arc<EngineMetrics>,
    pub pool: Arc<UpstreamPool>,
    pub no_delay: bool,
    pub scripts: Scripts,
    /// PROXY header version sent upstream when a route does not say (0 = none).
    pub send_proxy_protocol: u8,
    /// Session-affinity bindings (in memory, or shared through Redis).
    pub affinity: Arc<AffinityStore>,
}

/// One client connection as the service sees it.
pub struct ConnectionContext {
    pub env: Arc<HttpEnv>,
    pub table: Arc<RouteTable>,
    pub connection_id: u64,
    pub local_port: u16,
    pub client_ip: IpAddr,
    pub client_port: u16,
    /// The address the client connected to (`IRouteContext.serverIp`).
    pub server_ip: Option<IpAddr>,
    /// Where the client connected to, as a PROXY header towards a backend names it.
    pub destination: Option<std::net::SocketAddr>,
    pub https: bool,
    pub tls_version: Option<&'static str>,
    /// The peer is a trusted proxy (`proxyIPs`) and `trustForwardedHeaders` is set.
    pub trusted_peer: bool,
    /// On terminated TLS: the SNI and the route it selected. A request for another host that
    /// belongs to another route is misdirected (421): its certificate was never presented.
    pub sni: Option<String>,
    pub tls_route: Option<Arc<Route>>,
    /// Where this connection's WebSocket tunnels run (the session waits for them).
    pub tunnels: TunnelScope,
    /// `client_ip` and `local_port` formatted for `X-Forwarded-For` and `X-Forwarded-Port`.
    pub header_values: ConnectionValues,
    /// The client's socket, to see whether it has closed its sending side while an HTTP/1
    /// request waits (`send_watching_client`). Valid for as long as HTTP/1 requests of the
    /// connection run: they run inside the connection's own task, which owns the socket.
    pub client_fd: Option<std::os::fd::RawFd>,
    /// The client side's counters: requests in flight, for the connection's watchdog.
    pub counters: Arc<ClientCounters>,
    /// HTTP/2: how many upstream exchanges this one client connection may hold at once (made on
    /// its first stream), so that streams a client stalls cannot take a backend's whole pool.
    pub upstream_slots: std::sync::OnceLock<Arc<tokio::sync::Semaphore>>,
    pub max_upstream_per_client: usize,
}

pub async fn handle(ctx: Arc<ConnectionContext>, req: Request<ClientBody>) -> Result<Response<ProxyBody>, Infallible> {
    ctx.env.metrics.requests.fetch_add(1, Ordering::Relaxed);
    ctx.env.metrics.http_requests.fetch_add(1, Ordering::Relaxed);
    // In flight until its response ends: a proxied body takes the guard along, any other answer
    // is written at once.
    let mut in_flight = Some(ctx.counters.request_started());
    Ok(proxy(&ctx, req, &mut in_flight).await.unwrap_or_else(|refusal| refusal))
}

type Refusal = Response<ProxyBody>;

async fn proxy(ctx: &ConnectionContext, mut req: Request<ClientBody>, in_flight: &mut Option<InFlight>) -> Result<Response<ProxyBody>, Refusal> {
    // The edge rules (API.md "Edge hygiene"): one host, which is the one the backend receives; a
    // normalised path for matching. An HTTP/1.x head met them already, with the framing rules
    // (`http::head`); an HTTP/2 request meets them here first.
    let version = req.version();
    let raw_host: Option<String> = match request_host(req.uri().authority().map(|a| a.as_str()), req.headers(), version >= Version::HTTP_11) {
        Ok(host) => host.map(str::to_string),
        Err(refusal) => return Err(edge_refusal(refusal, version)),
    };
    if req.method() == Method::CONNECT {
        return Err(edge_refusal(edge::Refusal { status: StatusCode::METHOD_NOT_ALLOWED, reason: "CONNECT is not proxied" }, version));
    }
    let domain = raw_host.as_deref().map(normalise_host).filter(|d| !d.is_empty());
    let path = req.uri().path().to_string();
    let match_path = match normalise_path(&path) {
        Ok(normal) => normal,
        Err(refusal) => return Err(edge_refusal(refusal, version)),
    };
    let query = req.uri().query().unwrap_or("").to_string();

    let protocol = if ctx.https { Protocol::Tls { version: ctx.tls_version } } else { Protocol::Http };
    let facts = RequestFacts {
        connection: ConnectionFacts { local_port: ctx.local_port, client_ip: ctx.client_ip, domain: domain.as_deref(), protocol },
        path: &match_path,
        method: req.method(),
        headers: req.headers(),
    };
    let found = ctx.table.find_for_request(&facts);
    if let (Some(sni), Some(sni_route)) = (&ctx.sni, &ctx.tls_route) {
        let same_host = domain.as_deref() == Some(sni.as_str());
        let same_route = found.is_some_and(|route| Arc::ptr_eq(route, sni_route));
        if !same_host && !same_route {
            return Err(text_response(StatusCode::MISDIRECTED_REQUEST, "this connection was not made for that host"));
        }
    }
    let Some(route) = found else {
        return Err(text_response(StatusCode::NOT_FOUND, "no route matches this request"));
    };
    if !route.policy.admits(ctx.client_ip) {
        route.stats.forbidden.fetch_add(1, Ordering::Relaxed);
        return Err(text_response(StatusCode::FORBIDDEN, "access denied"));
    }
    if route.socket_handler.is_some() {
        // A socket handler takes whole connections; only a connection's first request can go to
        // it. This connection closes after the answer, so the client's next try opens a new one.
        let mut refusal = text_response(StatusCode::MISDIRECTED_REQUEST, "this route takes whole connections: send the request on a new connection");
        refusal.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Err(refusal);
    }
    let scripts = &ctx.env.scripts;
    if scripts.wants(EventKind::RouteMatched) {
        scripts.emit(EngineEvent::RouteMatched {
            connection_id: ctx.connection_id,
            client_ip: ctx.client_ip,
            port: ctx.local_port,
            domain: domain.as_deref().map(str::to_string),
            route_name: route.name.clone(),
            route_id: route.id.clone(),
        });
    }
    let Some(mut route_slot) = RouteGuard::acquire(&route.stats, route.max_connections).map(Some) else {
        return Err(text_response(StatusCode::SERVICE_UNAVAILABLE, "route connection limit reached"));
    };
    // Rate limit, then authentication: refused requests never reach an upstream.
    let admitted = match &route.http_security {
        None => None,
        Some(security) => match security.admit(ctx.client_ip, &match_path, req.headers()) {
            Ok(admitted) => Some(admitted),
            Err(refusal) => return Err(refusal_response(route, refusal)),
        },
    };
    let templates = TemplateContext {
        domain: domain.as_deref().unwrap_or(""),
        port: ctx.local_port,
        path: &path,
        query: &query,
        client_ip: ctx.client_ip,
        route_name: &route.label,
        connection_id: ctx.connection_id,
        claims: admitted.as_ref().and_then(|a| a.claims.as_deref()),
    };
    if let Some(native) = &route.http.native {
        return Ok(native_response(native, &templates));
    }
    // Affinity: a value bound before goes to its backend while that one may take traffic; a
    // value seen for the first time is balanced, then bound (or refused, when the route says so).
    let affinity = route.affinity.as_ref();
    let request_value = affinity.and_then(|a| a.key.request_value(ctx.client_ip, req.headers()));
    let mut bound_target = None;
    // Some(only_if_new): the value is to be bound to the target picked below.
    let mut to_bind: Option<bool> = None;
    if let (Some(affinity), Some(value)) = (affinity, &request_value) {
        match Box::pin(ctx.env.affinity.lookup(affinity, value)).await {
            Some(backend) => {
                bound_target = route.select_bound(ctx.local_port, ctx.client_ip, Some(&facts), &backend);
                if bound_target.is_none() {
                    // Its backend is down or gone: the replacement takes the binding over.
                    to_bind = Some(false);
                }
            }
            None if affinity.on_unknown == OnUnknown::Reject && affinity.key != AffinityKey::ClientIp => {
                return Err(text_response(StatusCode::BAD_REQUEST, "unknown session"));
            }
            None => to_bind = Some(true),
        }
    }
    let Some(mut target) = bound_target.or_else(|| route.select_target_for(ctx.local_port, ctx.client_ip, Some(&facts))) else {
        return Err(text_response(StatusCode::BAD_GATEWAY, "no target for this request"));
    };
    if let (Some(affinity), Some(value), Some(only_if_new)) = (affinity, &request_value, to_bind) {
        let backend = format!("{}:{}", target.host, target.port);
        let winner = Box::pin(ctx.env.affinity.bind(affinity, value, &backend, only_if_new)).await;
        // Another replica bound this value first: follow its choice.
        if winner != backend {
            if let Some(theirs) = route.select_bound(ctx.local_port, ctx.client_ip, Some(&facts), &winner) {
                target = theirs;
            }
        }
    }
    // Function targets see the request; the context is built only for routes that have them.
    let script_context = route.has_target_functions().then(|| ScriptContext {
        connection_id: ctx.connection_id,
        port: ctx.local_port,
        domain: domain.as_deref().map(str::to_string),
        client_ip: Some(ctx.client_ip),
        client_port: ctx.client_port,
        server_ip: ctx.server_ip,
        is_tls: ctx.https,
        tls_version: ctx.tls_version,
        route_name: route.name.clone(),
        route_id: route.id.clone(),
        path: Some(path.clone()),
        query: Some(query.clone()),
        headers: Some(
            req.headers()
                .iter()
                .filter_map(|(name, value)| Some((name.as_str().to_string(), value.to_str().ok()?.to_string())))
                .collect(),
        ),
        timestamp_ms: ScriptContext::now_ms(),
        ..ScriptContext::default()
    });

    // Credentials the proxy checked are its own, unless the route says to pass them on.
    let consumed_credentials = admitted.as_ref().is_some_and(|a| a.authenticated)
        && !route.http_security.as_ref().is_some_and(|s| s.forward_authorization);
    if consumed_credentials {
        req.headers_mut().remove(header::AUTHORIZATION);
    }
    let wants_upgrade = req.version() == Version::HTTP_11 && route.http.websocket && is_upgrade_request(&req);
    let client_upgrade = if wants_upgrade { req.extensions_mut().remove::<PendingUpgrade>() } else { None };
    let protocol = match route.http.backend_protocol {
        _ if wants_upgrade => UpstreamProtocol::Http1,
        BackendProtocol::Http2 => UpstreamProtocol::Http2,
        BackendProtocol::Http1 => UpstreamProtocol::Http1,
        BackendProtocol::Auto => UpstreamProtocol::Auto,
    };
    // The backend gets the path as sent, unless the route forwards the normalised one.
    let path_and_query = match (route.http.normalize_path, &match_path) {
        (true, std::borrow::Cow::Owned(normal)) if query.is_empty() => normal.clone(),
        (true, std::borrow::Cow::Owned(normal)) => format!("{normal}?{query}"),
        _ => req.uri().path_and_query().map_or("/", |pq| pq.as_str()).to_string(),
    };
    let policy = route.http.retry;
    let (parts, incoming) = req.into_parts();
    let mut head = Request::from_parts(parts, ());
    let idempotent = is_idempotent(head.method());
    let mut body = if incoming.is_end_stream() {
        RequestBody::Empty
    } else if policy.replays_after_send() && idempotent && incoming.size_hint().upper().is_some_and(|n| n <= MAX_REPLAY_BODY) {
        // Small enough to keep whole: a retry after sending can send it again.
        let collected = Box::pin(tokio::time::timeout(DEFAULT_RESPONSE_TIMEOUT, http_body_util::Limited::new(incoming, MAX_REPLAY_BODY as usize).collect())).await;
        match collected {
            Ok(Ok(collected)) => {
                let bytes = collected.to_bytes();
                route.stats.bytes.bytes_in.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                RequestBody::Buffered(bytes)
            }
            _ => return Err(text_response(StatusCode::BAD_REQUEST, "the request body could not be read")),
        }
    } else {
        RequestBody::Streaming(Some(incoming), Arc::new(AtomicBool::new(false)))
    };

    let connect_timeout = route.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let response_timeout = route.http.response_timeout.unwrap_or(DEFAULT_RESPONSE_TIMEOUT);
    let pool = &ctx.env.pool;
    let mut attempt: u32 = 0;
    // HTTP/2: this stream's share of the connection's upstream exchanges (`upstream_slots`).
    let mut client_slot: Option<tokio::sync::OwnedSemaphorePermit> = None;
    let mut replaced_dead_connection = false;
    let mut fresh_connection = false;
    let (response, checkout, key, request_sent) = loop {
        let (target_host, target_port) = match Box::pin(scripts.endpoint(&target, || script_context.clone().unwrap_or_default())).await {
            Ok(endpoint) => endpoint,
            Err(err) => {
                tracing::debug!(route = &*route.label, error = %err, "target function failed");
                return Err(text_response(StatusCode::BAD_GATEWAY, "the route's target function failed"));
            }
        };
        let tls = target.upstream_tls(wants_upgrade).map(|config| UpstreamTls { server_name: upstream_server_name(&target_host, domain.as_deref()), config });
        let target_form = RequestTarget {
            authority: raw_host.clone().unwrap_or_else(|| format!("{target_host}:{target_port}")),
            path_and_query: path_and_query.clone(),
            https: tls.is_some(),
        };
        let proxy_version = target.send_proxy_protocol.unwrap_or(ctx.env.send_proxy_protocol);
        let proxy_header = ctx.destination.and_then(|destination| {
            proxy_protocol::encode(proxy_version, std::net::SocketAddr::new(ctx.client_ip, ctx.client_port), destination).map(Arc::from)
        });
        let key = PoolKey { host: target_host, port: target_port, protocol, tls, proxy_header };
        if version == Version::HTTP_2 && client_slot.is_none() {
            let slots = ctx.upstream_slots.get_or_init(|| Arc::new(tokio::sync::Semaphore::new(ctx.max_upstream_per_client.max(1))));
            match tokio::time::timeout(connect_timeout, slots.clone().acquire_owned()).await {
                Ok(Ok(permit)) => client_slot = Some(permit),
                _ => return Err(text_response(StatusCode::SERVICE_UNAVAILABLE, "too many requests of this connection are waiting upstream")),
            }
        }
        let checked_out = if fresh_connection {
            pool.checkout_fresh(&key, connect_timeout, ctx.env.no_delay).await
        } else {
            pool.checkout(&key, connect_timeout, ctx.env.no_delay).await
        };
        fresh_connection = false;
        if let Some(lease) = &target.lease {
            match &checked_out {
                Ok(checkout) if !checkout.reused() => lease.report_connect(true),
                Ok(_) => {}
                Err(_) => lease.report_connect(false),
            }
        }
        let mut checkout = match checked_out {
            Ok(checkout) => checkout,
            // Nothing was sent: any request may go to the next pick.
            Err(err) if policy.on_connect_failure && attempt < policy.max_retries => {
                tracing::debug!(route = &*route.label, error = %err, attempt, "upstream connect failed, retrying");
                attempt += 1;
                backoff(policy.backoff, attempt).await;
                target = route.select_target_for(ctx.local_port, ctx.client_ip, Some(&facts_for_retry(ctx, domain.as_deref(), &match_path, &head))).unwrap_or(target);
                continue;
            }
            Err(err) => return Err(upstream_failure(err)),
        };
        let Some(attempt_body) = body.for_attempt() else {
            return Err(text_response(StatusCode::BAD_GATEWAY, "the upstream server failed and the request cannot be repeated"));
        };
        let request_sent = Arc::new(AtomicBool::new(false));
        let counted = matches!(body, RequestBody::Streaming(..)).then(|| (route.stats.clone(), Direction::In));
        // The client's head is copied only when a later attempt may need it again.
        let may_repeat = policy.max_retries > attempt || (!replaced_dead_connection && body.replayable());
        let attempt_head = if may_repeat { clone_head(&head) } else { std::mem::replace(&mut head, Request::new(())) };
        let mut upstream_req = attempt_head.map(|()| TrackedBody::new(attempt_body, counted, request_sent.clone()).boxed());
        rewrite_headers(&mut upstream_req, ctx, route, &target, raw_host.as_deref(), &templates, wants_upgrade);
        target_form
            .apply(&mut upstream_req, matches!(checkout, Checkout::Http2 { .. }))
            .map_err(|()| text_response(StatusCode::BAD_REQUEST, "bad request target"))?;
        let reused = checkout.reused();
        let watched = if version < Version::HTTP_2 { ctx.client_fd } else { None };
        let sent = send_watching_client(&mut checkout, upstream_req, response_timeout, watched, &mut route_slot).await;
        // After bytes reached the upstream only an idempotent request may be sent again.
        let replayable = body.replayable() && idempotent;
        match sent {
            Ok(response) if response.status().is_server_error() && policy.on_5xx && replayable && attempt < policy.max_retries => {
                tracing::debug!(route = &*route.label, status = %response.status(), attempt, "upstream answered 5xx, retrying");
                attempt += 1;
                backoff(policy.backoff, attempt).await;
                target = route.select_target_for(ctx.local_port, ctx.client_ip, Some(&facts_for_retry(ctx, domain.as_deref(), &match_path, &head))).unwrap_or(target);
            }
            Ok(response) => break (response, checkout, key, request_sent),
            // A pooled connection the upstream closed just as it was reused fails before the
            // request was processed: a request that can be sent again goes on a fresh connection.
            Err(SendError::Failed(err)) if reused && !replaced_dead_connection && replayable && err.stale_connection() => {
                if let Checkout::Http2 { .. } = checkout {
                    pool.forget_h2(&key);
                }
                replaced_dead_connection = true;
                fresh_connection = true;
            }
            Err(SendError::Failed(_)) if body.client_failed() => {
                return Err(edge_refusal(edge::Refusal::bad_request("the request body is not framed correctly"), version));
            }
            Err(SendError::Failed(err)) => {
                if let Checkout::Http2 { .. } = checkout {
                    pool.forget_h2(&key);
                }
                tracing::debug!(route = &*route.label, error = %err, "upstream request failed");
                return Err(text_response(StatusCode::BAD_GATEWAY, "the upstream server did not answer properly"));
            }
            Err(SendError::Timeout) if policy.on_timeout && replayable && attempt < policy.max_retries => {
                attempt += 1;
                backoff(policy.backoff, attempt).await;
                target = route.select_target_for(ctx.local_port, ctx.client_ip, Some(&facts_for_retry(ctx, domain.as_deref(), &match_path, &head))).unwrap_or(target);
            }
            Err(SendError::Timeout) => {
                return Err(text_response(StatusCode::GATEWAY_TIMEOUT, "the upstream server did not answer in time"));
            }
        }
    };

    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        return match client_upgrade {
            Some(client_upgrade) => {
                let joined = Tunnel { client_upgrade, route: route.clone(), _route_slot: route_slot, _backend_lease: target.lease };
                Ok(joined.answer(ctx, response, target.response_headers, &templates))
            }
            None => Err(text_response(StatusCode::BAD_GATEWAY, "the upstream switched protocols unasked")),
        };
    }
    let (mut parts, body) = response.into_parts();
    // A session the backend just issued belongs to it, bound before the client can use it.
    if let Some(affinity) = affinity {
        if let Some(issued) = affinity.key.response_value(&parts.headers).filter(|v| request_value.as_ref() != Some(v)) {
            let backend = format!("{}:{}", target.host, target.port);
            Box::pin(ctx.env.affinity.bind(affinity, &issued, &backend, false)).await;
        }
    }
    strip_hop_by_hop(&mut parts.headers, false);
    apply_templates(&mut parts.headers, &route.http.response_headers, &templates);
    apply_templates(&mut parts.headers, target.response_headers, &templates);
    let response_read = Arc::new(AtomicBool::new(false));
    let body = ReturningBody {
        inner: TrackedBody::new(body, Some((route.stats.clone(), Direction::Out)), response_read.clone()),
        pool: pool.clone(),
        key,
        checkout: Some(checkout),
        request_sent,
        response_read,
        _route_slot: route_slot,
        _backend_lease: target.lease,
        _client_slot: client_slot,
        _in_flight: in_flight.take(),
    };
    Ok(Response::from_parts(parts, body.boxed()))
}

/// Largest request body kept whole so that a retry after sending can repeat it.
const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// The client's request body across attempts.
enum RequestBody {
    Empty,
    /// Read whole before the first attempt: every attempt sends a copy.
    Buffered(Bytes),
    /// Streamed through once; after the first attempt took it, nothing can be repeated. The flag
    /// is raised when the client's own framing of it failed (a bad chunk): the client's fault.
    Streaming(Option<ClientBody>, Arc<AtomicBool>),
}

impl RequestBody {
    fn for_attempt(&mut self) -> Option<ProxyBody> {
        match self {
            RequestBody::Empty => Some(crate::http::body::empty()),
            RequestBody::Buffered(bytes) => Some(crate::http::body::full(bytes.clone())),
            RequestBody::Streaming(slot, failed) => {
                let failed = failed.clone();
                slot.take().map(|incoming| {
                    incoming
                        .map_err(move |err| {
                            failed.store(true, Ordering::Release);
                            err
                        })
                        .boxed()
                })
            }
        }
    }

    /// The client broke its own body's framing: answered 400, not blamed on the upstream.
    fn client_failed(&self) -> bool {
        matches!(self, RequestBody::Streaming(_, failed) if failed.load(Ordering::Acquire))
    }

    fn replayable(&self) -> bool {
        !matches!(self, RequestBody::Streaming(..))
    }
}

fn facts_for_retry<'a>(ctx: &ConnectionContext, domain: Option<&'a str>, path: &'a str, head: &'a Request<()>) -> RequestFacts<'a> {
    let protocol = if ctx.https { Protocol::Tls { version: ctx.tls_version } } else { Protocol::Http };
    RequestFacts {
        connection: ConnectionFacts { local_port: ctx.local_port, client_ip: ctx.client_ip, domain, protocol },
        path,
        method: head.method(),
        headers: head.headers(),
    }
}

/// Exponential backoff with jitter: `base * 2^(attempt-1)`, scaled by a factor in [0.5, 1.5).
async fn backoff(base: Duration, attempt: u32) {
    if base.is_zero() {
        return;
    }
    let exponential = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(10));
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let jitter = 0.5 + f64::from(nanos % 1000) / 1000.0;
    tokio::time::sleep(exponential.mul_f64(jitter)).await;
}

/// A request the edge rules refuse: the reason as the body; an HTTP/1 connection closes after it.
fn edge_refusal(refusal: edge::Refusal, version: Version) -> Response<ProxyBody> {
    let mut response = text_response(refusal.status, refusal.reason);
    if version < Version::HTTP_2 {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// What a route with a native response answers, without any upstream.
fn refusal_response(route: &Route, refusal: SecurityRefusal) -> Response<ProxyBody> {
    match refusal {
        SecurityRefusal::RateLimited { retry_after_secs, message } => {
            route.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            let mut response = Response::new(full(format!("{message}\n")));
            *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            response
        }
        SecurityRefusal::Unauthorized { challenge } => {
            route.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
            let mut response = text_response(StatusCode::UNAUTHORIZED, "authentication required");
            response.headers_mut().insert(header::WWW_AUTHENTICATE, challenge);
            response
        }
    }
}

fn native_response(native: &NativeResponse, templates: &TemplateContext<'_>) -> Response<ProxyBody> {
    match native {
        NativeResponse::Redirect { location, status } => {
            let path_with_query = if templates.query.is_empty() {
                templates.path.to_string()
            } else {
                format!("{}?{}", templates.path, templates.query)
            };
            let rendered = location
                .replace("{domain}", templates.domain)
                .replace("{port}", &templates.port.to_string())
                .replace("{path}", &path_with_query)
                .replace("{query}", templates.query)
                .replace("{clientIp}", &templates.client_ip.to_string())
                .replace("{routeName}", templates.route_name);
            let mut response = Response::new(crate::http::body::empty());
            *response.status_mut() = *status;
            match HeaderValue::from_str(&rendered) {
                Ok(value) => {
                    response.headers_mut().insert(header::LOCATION, value);
                    response
                }
                Err(_) => text_response(StatusCode::BAD_REQUEST, "the redirect target is not a valid header value"),
            }
        }
        NativeResponse::Response { status, headers, body } => {
            let mut response = Response::new(crate::http::body::full(body.clone()));
            *response.status_mut() = *status;
            for (name, value) in headers {
                response.headers_mut().insert(name.clone(), value.clone());
            }
            response
        }
        NativeResponse::Block { status, message } => {
            let mut response = Response::new(crate::http::body::full(message.clone()));
            *response.status_mut() = *status;
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
            response
        }
    }
}

fn rewrite_headers<B>(
    req: &mut Request<B>,
    ctx: &ConnectionContext,
    route: &Route,
    target: &SelectedTarget<'_>,
    raw_host: Option<&str>,
    templates: &TemplateContext<'_>,
    upgrade: bool,
) {
    let version = req.version();
    let headers = req.headers_mut();
    let claims = strip_hop_by_hop(headers, upgrade);
    add_forwarded(
        headers,
        &ForwardedFacts { connection: &ctx.header_values, https: ctx.https, host: raw_host, trusted_peer: ctx.trusted_peer, version, claims },
    );
    apply_templates(headers, &route.http.request_headers, templates);
    apply_templates(headers, target.request_headers, templates);
}

/// How the request names its target upstream: origin form and `Host` for HTTP/1.1, an absolute
/// URI (`:scheme`, `:authority`) for HTTP/2. Known only once the connection's protocol is.
struct RequestTarget {
    authority: String,
    path_and_query: String,
    https: bool,
}

impl RequestTarget {
    fn apply<B>(&self, req: &mut Request<B>, http2: bool) -> Result<(), ()> {
        if http2 {
            req.headers_mut().remove(header::HOST);
            *req.uri_mut() = Uri::builder()
                .scheme(if self.https { "https" } else { "http" })
                .authority(self.authority.as_str())
                .path_and_query(self.path_and_query.as_str())
                .build()
                .map_err(|_| ())?;
            *req.version_mut() = Version::HTTP_2;
        } else {
            // Host is kept as the client sent it; an HTTP/2 client's `:authority` becomes Host.
            if !req.headers().contains_key(header::HOST) {
                let value = HeaderValue::from_str(&self.authority).map_err(|_| ())?;
                req.headers_mut().insert(header::HOST, value);
            }
            *req.uri_mut() = self.path_and_query.parse::<Uri>().map_err(|_| ())?;
            *req.version_mut() = Version::HTTP_11;
        }
        Ok(())
    }
}

/// SNI and verified name towards a TLS upstream: the target's host name, or the request's domain
/// when the target is an IP address (the certificate names the site, not the address).
fn upstream_server_name(target_host: &str, domain: Option<&str>) -> ServerName<'static> {
    if let Ok(ip) = target_host.parse::<IpAddr>() {
        return domain
            .and_then(|d| ServerName::try_from(d.to_string()).ok())
            .unwrap_or(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(target_host.to_string()).unwrap_or_else(|_| ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into()))
}

enum SendError {
    Failed(UpstreamFailure),
    Timeout,
}

#[derive(Debug)]
enum UpstreamFailure {
    H1(ClientError),
    H2(hyper::Error),
}

impl UpstreamFailure {
    /// The connection was found closed before anything of a response came: a pooled connection
    /// the upstream had closed just as it was reused.
    fn stale_connection(&self) -> bool {
        match self {
            UpstreamFailure::H1(err) => err.before_response(),
            UpstreamFailure::H2(err) => err.is_canceled() || err.is_incomplete_message(),
        }
    }
}

impl std::fmt::Display for UpstreamFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamFailure::H1(err) => err.fmt(f),
            UpstreamFailure::H2(err) => err.fmt(f),
        }
    }
}

async fn send(checkout: &mut Checkout, req: Request<ProxyBody>, timeout: Duration) -> Result<Response<UpstreamBody>, SendError> {
    let sending = async {
        match checkout {
            Checkout::Http1 { conn, .. } => match conn.take() {
                Some(conn) => h1_client::send(conn, req).await.map(|r| r.map(UpstreamBody::H1)).map_err(UpstreamFailure::H1),
                None => Err(UpstreamFailure::H1(ClientError::ClosedBeforeResponse(None))),
            },
            Checkout::Http2 { sender, .. } => sender.send_request(req).await.map(|r| r.map(UpstreamBody::H2)).map_err(UpstreamFailure::H2),
        }
    };
    match tokio::time::timeout(timeout, sending).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(err)) => Err(SendError::Failed(err)),
        Err(_) => Err(SendError::Timeout),
    }
}

/// How often a waiting HTTP/1 request looks whether its client closed its side.
const CLIENT_WATCH_PERIOD: Duration = Duration::from_millis(250);

/// `send`, while the client may leave: a client that closed its sending side no longer holds its
/// route's `maxConnections` slot (it can send nothing more), though its request still waits for
/// an answer, as a half-closing client expects. Holding the slot until a silent upstream's
/// response timeout would refuse every new client of the route meanwhile. The HTTP/1 loop does not
/// read the client while a request waits (pipelined bytes stay in the socket), so it is asked directly; only requests
/// that hold a limited slot pay for the watch. (HTTP/2 streams end with their client.)
async fn send_watching_client(
    checkout: &mut Checkout,
    req: Request<ProxyBody>,
    timeout: Duration,
    client_fd: Option<std::os::fd::RawFd>,
    route_slot: &mut Option<RouteGuard>,
) -> Result<Response<UpstreamBody>, SendError> {
    let limited = route_slot.as_ref().is_some_and(RouteGuard::is_limited);
    match (client_fd, limited) {
        // Boxed: the watch's timer would otherwise size every request's future.
        (Some(fd), true) => Box::pin(send_while_watching(checkout, req, timeout, fd, route_slot)).await,
        _ => send(checkout, req, timeout).await,
    }
}

async fn send_while_watching(
    checkout: &mut Checkout,
    req: Request<ProxyBody>,
    timeout: Duration,
    fd: std::os::fd::RawFd,
    route_slot: &mut Option<RouteGuard>,
) -> Result<Response<UpstreamBody>, SendError> {
    let sending = send(checkout, req, timeout);
    tokio::pin!(sending);
    let mut watch = tokio::time::interval(CLIENT_WATCH_PERIOD);
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            sent = &mut sending => return sent,
            _ = watch.tick(), if route_slot.is_some() => {
                if peer_closed(fd) {
                    route_slot.take();
                }
            }
        }
    }
}

/// The peer shut down its sending side (FIN), or the socket failed.
fn peer_closed(fd: std::os::fd::RawFd) -> bool {
    let mut polled = libc::pollfd { fd, events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: one valid pollfd, a zero timeout; `fd` belongs to the live client connection.
    let ready = unsafe { libc::poll(&mut polled, 1, 0) };
    ready > 0 && polled.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

fn upstream_failure(err: UpstreamError) -> Refusal {
    tracing::debug!(error = %err, "upstream unavailable");
    let message = match err {
        UpstreamError::ConnectTimeout => "connecting to the upstream server timed out",
        UpstreamError::ConnectFailed(_) => "the upstream server refused the connection",
        UpstreamError::Tls(_) => "the TLS handshake with the upstream server failed",
        UpstreamError::Handshake(_) => "the upstream server failed the handshake",
        UpstreamError::PoolExhausted => "too many connections to the upstream server",
    };
    text_response(StatusCode::BAD_GATEWAY, message)
}

fn is_upgrade_request<B>(req: &Request<B>) -> bool {
    crate::http::headers::connection_has(req.headers(), "upgrade") && req.headers().contains_key(header::UPGRADE)
}

fn is_idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE)
}

fn clone_head<B>(req: &Request<B>) -> Request<()> {
    let mut copy = Request::new(());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// A WebSocket upgrade the upstream accepted: the client's side still to be upgraded, and the
/// slots the tunnel holds while it is open (route `maxConnections`, the backend's in-flight count).
struct Tunnel {
    client_upgrade: PendingUpgrade,
    route: Arc<Route>,
    _route_slot: Option<RouteGuard>,
    _backend_lease: Option<crate::balance::Lease>,
}

impl Tunnel {
    /// Answers the client's upgrade with the upstream's 101 and joins the two upgraded streams in
    /// the connection's tunnel scope.
    fn answer(
        self,
        ctx: &ConnectionContext,
        response: Response<UpstreamBody>,
        target_templates: &[crate::http::headers::HeaderTemplate],
        templates: &TemplateContext<'_>,
    ) -> Response<ProxyBody> {
        let upstream_upgrade = response.extensions().get::<PendingUpstreamUpgrade>().and_then(PendingUpstreamUpgrade::take);
        let (mut parts, _) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers, true);
        apply_templates(&mut parts.headers, &self.route.http.response_headers, templates);
        apply_templates(&mut parts.headers, target_templates, templates);
        let scope = ctx.tunnels.clone();
        let metrics = ctx.env.metrics.clone();
        let Tunnel { client_upgrade, route, _route_slot: route_slot, _backend_lease: backend_lease } = self;
        ctx.tunnels.spawn(async move {
            // Named here so that the task owns them (a closure captures only the places it names).
            let _held_while_open = (route_slot, backend_lease);
            let Some(upstream) = upstream_upgrade else {
                tracing::debug!(route = &*route.label, "upstream upgrade failed");
                return;
            };
            let Some(client) = client_upgrade.client().await else {
                tracing::debug!(route = &*route.label, "the client left before its upgrade");
                return;
            };
            let upstream = crate::http::io::Replay::new(upstream.io, upstream.read_ahead);
            metrics.websocket_total.fetch_add(1, Ordering::Relaxed);
            let _open = GaugeHold::enter(metrics, |m| &m.active_websocket);
            let settings = route.http.websocket_settings;
            let end = websocket::run(client, upstream, settings, scope.limits(), scope.shutdown()).await;
            tracing::debug!(route = &*route.label, end = end.as_str(), "websocket tunnel closed");
        });
        Response::from_parts(parts, crate::http::body::empty())
    }
}

/// The response body on its way to the client. When it is dropped after a clean exchange (the
/// response read to its end and the request body fully sent) its HTTP/1.1 connection goes back to
/// the pool; otherwise the connection is closed with it.
struct ReturningBody {
    inner: TrackedBody<UpstreamBody>,
    pool: Arc<UpstreamPool>,
    key: PoolKey,
    checkout: Option<Checkout>,
    request_sent: Arc<AtomicBool>,
    response_read: Arc<AtomicBool>,
    _route_slot: Option<RouteGuard>,
    /// The backend's in-flight slot, until the response has been passed on.
    _backend_lease: Option<crate::balance::Lease>,
    _client_slot: Option<tokio::sync::OwnedSemaphorePermit>,
    _in_flight: Option<InFlight>,
}

impl Body for ReturningBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ReturningBody {
    fn drop(&mut self) {
        let clean = self.response_read.load(Ordering::Acquire) && self.request_sent.load(Ordering::Acquire);
        if let (true, Some(Checkout::Http1 { permit, .. })) = (clean, self.checkout.take()) {
            if let Some(conn) = self.inner.inner_mut().take_reusable() {
                self.pool.put_back(&self.key, conn, permit);
            }
        }
    }
}
