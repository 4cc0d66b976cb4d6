//! The request pipeline of the reverse proxy. Every request of a client connection, whatever its
//! HTTP version, goes through the same named phases with one per-request context (`RequestCtx`),
//! as Pingora's `ProxyHttp` names its own:
//! 1. `admit`: the edge rules, the route (404, 421), its policy, limits and security, and the
//!    answers a route gives itself (redirects, static responses);
//! 2. `peer`: affinity and balancing choose the backend;
//! 3. `prepare`: the upstream request's protocol, target and body (kept for a retry, or streamed);
//! 4. `send`: over a pooled connection, with retries and re-selection; failures become 502/504;
//! 5. `respond`: the upstream's response filtered on its way back (hop-by-hop headers, templates,
//!    a session the backend issued), or a WebSocket tunnel once the upstream answered 101.
//!
//! A phase either hands the next what it needs or answers the request itself (`Answer`); the
//! answers the proxy writes are in `answers`.

// Phases return `Result<_, Answer>`: an answer is a response, as large as what the phase would
// have handed on; boxing it would add an allocation to every refusal for nothing.
#![allow(clippy::result_large_err)]

mod admit;
pub use admit::HeadChecked;
mod answers;
mod peer;
mod prepare;
mod record;
mod respond;
mod send;

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use http::request::Parts;
use http::{Request, Response, Uri, Version};

use crate::balance::affinity::AffinityStore;
use crate::hooks::{ConnectionIdentity, ScriptContext, Scripts};
use crate::http::body::{ClientBody, ProxyBody};
use crate::http::h1::fields::RawFields;
use crate::http::headers::ConnectionValues;
use crate::templates::TemplateContext;
use crate::http::io::ClientCounters;
use crate::http::pool::UpstreamPool;
use crate::http::websocket::TunnelScope;
use crate::metrics::EngineMetrics;
use crate::pooled_future::PooledFuture;
use crate::routing::table::{RequestFacts, Route, SelectedTarget};
use crate::routing::{ConnectionFacts, Protocol, RouteTable};
use crate::security::http::Admitted;

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
    /// Replicas' shared state (`options.redis`): rate limits are counted there.
    pub shared: Option<Arc<crate::shared_state::SharedRedis>>,
    /// `accessLog`, when enabled: a record per request and per TCP connection.
    pub access_log: Option<Arc<crate::access_log::AccessLog>>,
    /// Cancelled when a stop's grace period is over: WebSocket tunnels close at once.
    pub force_close: tokio_util::sync::CancellationToken,
}

/// What a connection whose TLS was terminated here adds to its context.
pub struct TerminatedTls {
    pub version: Option<&'static str>,
    /// The SNI and the route it selected. A request for another host that belongs to another
    /// route is misdirected (421): its certificate was never presented.
    pub sni: Option<Box<str>>,
    pub route: Arc<Route>,
}

/// One client connection as the pipeline sees it.
pub struct ConnectionContext {
    pub env: Arc<HttpEnv>,
    pub table: Arc<RouteTable>,
    pub connection_id: u64,
    pub local_port: u16,
    pub client_ip: IpAddr,
    pub client_port: u16,
    /// The address the client connected to (`IRouteContext.serverIp`, a PROXY header's
    /// destination towards a backend).
    pub server: ServerAddress,
    /// The peer is a trusted proxy (`proxyIPs`) and `trustForwardedHeaders` is set.
    pub trusted_peer: bool,
    /// On terminated TLS (boxed: a plain connection, idle ones included, holds a pointer).
    pub tls: Option<Box<TerminatedTls>>,
    /// Where this connection's WebSocket tunnels run (the session waits for them).
    pub tunnels: TunnelScope,
    /// `client_ip` and `local_port` formatted for `X-Forwarded-For` and `X-Forwarded-Port`.
    pub header_values: ConnectionValues,
    /// The client's socket, to see whether it has closed its sending side while an HTTP/1
    /// request waits (`send::send_watching_client`). Valid for as long as requests of the
    /// connection run: they run inside the connection's own task (HTTP/2 streams too), which
    /// owns the socket.
    pub client_fd: Option<std::os::fd::RawFd>,
    /// The client side's counters: requests in flight, for the connection's watchdog.
    pub counters: Arc<ClientCounters>,
    /// HTTP/2: how many upstream exchanges this one client connection may hold at once (made on
    /// its first stream), so that streams a client stalls cannot take a backend's whole pool.
    pub upstream_slots: std::sync::OnceLock<Arc<tokio::sync::Semaphore>>,
    pub max_upstream_per_client: u32,
}

// Every client connection holds one, idle ones included, in an `Arc` (two counters more): in
// 256 bytes it takes the allocator's 256-byte class, one byte more takes the 320-byte one.
const _: () = assert!(std::mem::size_of::<ConnectionContext>() <= 240);

/// Where a client connected to. Over TCP it is asked of the client's socket when a request first
/// needs it (a script's context, a PROXY header towards a backend): most connections never do,
/// and asking every one would cost each new connection a system call.
pub struct ServerAddress {
    /// The destination a trusted PROXY header named (boxed: rare, and every connection's context
    /// holds the field).
    stated: Option<Box<SocketAddr>>,
    ip: OnceLock<Option<IpAddr>>,
}

impl ServerAddress {
    /// An address known when the connection was set up (QUIC: the endpoint's).
    pub fn known(ip: Option<IpAddr>) -> Self {
        ServerAddress { stated: None, ip: OnceLock::from(ip) }
    }

    /// To be asked of the client's socket (`ConnectionContext::client_fd`), unless a PROXY header
    /// `stated` the destination.
    pub fn of_socket(stated: Option<SocketAddr>) -> Self {
        ServerAddress { stated: stated.map(Box::new), ip: OnceLock::new() }
    }
}

impl ConnectionContext {
    /// The address the client connected to (`IRouteContext.serverIp`).
    pub fn server_ip(&self) -> Option<IpAddr> {
        *self.server.ip.get_or_init(|| {
            let socket = self.client_fd?;
            // SAFETY: the socket stays open while the connection's requests run (see `client_fd`).
            let socket = unsafe { BorrowedFd::borrow_raw(socket) };
            crate::listener::server_address(socket).map(|address| address.ip())
        })
    }

    /// Where the client connected to, as a PROXY header towards a backend names it.
    pub fn destination(&self) -> Option<SocketAddr> {
        self.server.stated.as_deref().copied().or_else(|| self.server_ip().map(|ip| SocketAddr::new(ip, self.local_port)))
    }

    /// TLS was terminated here.
    pub fn https(&self) -> bool {
        self.tls.is_some()
    }

    fn identity(&self) -> ConnectionIdentity {
        ConnectionIdentity {
            connection_id: self.connection_id,
            port: self.local_port,
            client_ip: self.client_ip,
            client_port: self.client_port,
            server_ip: self.server_ip(),
            is_tls: self.https(),
            tls_version: self.tls.as_ref().and_then(|tls| tls.version),
        }
    }

    fn protocol(&self) -> Protocol {
        if self.https() {
            Protocol::Tls { version: self.tls.as_ref().and_then(|tls| tls.version) }
        } else {
            Protocol::Http
        }
    }
}

/// `handle`'s future in a block of its own, written there as it is made (built first and moved
/// after, the whole pipeline state would be copied), which the thread keeps for its next request.
pub fn handle_pooled(conn: Arc<ConnectionContext>, req: Request<ClientBody>, head_checked: HeadChecked) -> PooledFuture<Result<Answered, Infallible>> {
    PooledFuture::new(|| handle(conn, req, head_checked))
}

/// One request through the phases. The request is taken apart here, before the future is made:
/// an `async fn` keeps each argument twice (as passed, and moved into its body), and a request
/// is large, so the future captures its parts and uses them in place.
#[inline(always)]
pub fn handle(conn: Arc<ConnectionContext>, req: Request<ClientBody>, head_checked: HeadChecked) -> impl Future<Output = Result<Answered, Infallible>> + Send {
    conn.env.metrics.requests.fetch_add(1, Ordering::Relaxed);
    conn.env.metrics.http_requests.fetch_add(1, Ordering::Relaxed);
    // In flight until its response ends: a proxied body takes the guard along, any other answer
    // is written at once.
    let mut in_flight = Some(conn.counters.request_started());
    let (mut head, body) = req.into_parts();
    let version = head.version;
    let received = Instant::now();
    let mut access_record = record::PendingRecord::begin(&conn, &head, received);
    async move {
        // The route that answered, whatever phase answered: its counters take the response.
        let mut answered_by: Option<&Arc<Route>> = None;
        let proxied = async {
            let conn: &ConnectionContext = &conn;
            let admit::Admission { mut ctx, mut route_slot, shared_pending } = admit::admit(conn, &head, head_checked).map_err(|refused| {
                answered_by = refused.route;
                refused.answer
            })?;
            answered_by = Some(ctx.route);
            if shared_pending {
                // Boxed: only routes with a rate limit shared through Redis wait here.
                Box::pin(admit::admit_shared(&mut ctx, &head)).await.map_err(|refused| refused.answer)?;
            }
            if let Some(pending) = access_record.as_mut() {
                pending.route = Some(ctx.route.label.clone());
            }
            // Phases that may wait only on rare paths (affinity, a body kept for retries) are
            // boxed there, so that the common request's future stays small.
            let affinity = ctx.route.affinity.as_ref();
            let peer::Peer { mut target, affinity_value, script_context } = match affinity {
                None => peer::choose(&ctx, &head)?,
                Some(affinity) => Box::pin(peer::choose_with_affinity(&ctx, &head, affinity)).await?,
            };
            let mut outbound = prepare::prepare(&ctx, &mut head, body, access_record.is_some());
            if let Some(pending) = access_record.as_mut() {
                pending.bytes_in_meter = outbound.received_bytes.clone();
            }
            if outbound.keep_whole {
                Box::pin(prepare::read_whole(&ctx, &mut outbound)).await?;
            }
            let mut exchange = send::send_with_retries(&ctx, &mut target, script_context.as_deref(), &mut head, &mut outbound, &mut route_slot).await?;
            if let Some(affinity) = affinity {
                Box::pin(respond::bind_issued_session(&ctx, affinity, &mut exchange, &target, affinity_value.as_deref())).await;
            }
            respond::respond(&ctx, exchange, target, outbound.client_upgrade, route_slot, &mut in_flight, &mut access_record)
        };
        let Answered { mut response, upstream_fields } = proxied.await.unwrap_or_else(|answer: Answer| Answered::from(answer));
        if let Some(route) = answered_by {
            route.stats.record_response(response.status().as_u16(), received.elapsed());
            if let Some(http3) = route.http3.filter(|_| version < Version::HTTP_3) {
                advertise_http3(&mut response, conn.local_port, http3.alt_svc_max_age);
            }
        }
        // Unless the response body took it along, the request is over once its head is ready.
        if let Some(pending) = access_record {
            pending.answered(answered_by, &response);
        }
        Ok(Answered { response, upstream_fields })
    }
}

/// The pipeline's answer to a request.
pub struct Answered {
    pub response: Response<ProxyBody>,
    /// An HTTP/1.1 upstream's fields kept in its head (`h1::fields`), when they go back unchanged
    /// to an HTTP/1.x client: written before the response's own map, which holds none of them.
    pub upstream_fields: Option<Box<RawFields>>,
}

impl Answered {
    /// The response with every field in its map, as HTTP/2 and HTTP/3 write it.
    pub fn into_response(self) -> Response<ProxyBody> {
        let mut response = self.response;
        if let Some(fields) = self.upstream_fields {
            fields.merge_into(response.headers_mut());
        }
        response
    }
}

impl From<Response<ProxyBody>> for Answered {
    fn from(response: Response<ProxyBody>) -> Self {
        Answered { response, upstream_fields: None }
    }
}

/// `Alt-Svc` on a response over TCP of a route also served over QUIC on the same port (RFC 7838).
/// It replaces the backend's own: the client's alternatives are the proxy's, not the backend's.
fn advertise_http3(response: &mut Response<ProxyBody>, port: u16, max_age: u32) {
    if let Ok(value) = http::HeaderValue::try_from(format!("h3=\":{port}\"; ma={max_age}")) {
        response.headers_mut().insert(http::header::ALT_SVC, value);
    }
}

/// A response the proxy gives itself instead of forwarding one: a refusal, a failure to reach the
/// upstream, or a route's own answer. It ends the pipeline at the phase that gives it.
type Answer = Response<ProxyBody>;

fn request_facts<'a>(conn: &ConnectionContext, domain: Option<&'a str>, match_path: &'a str, head: &'a Parts) -> RequestFacts<'a> {
    RequestFacts {
        connection: ConnectionFacts { local_port: conn.local_port, client_ip: conn.client_ip, domain, protocol: conn.protocol() },
        path: match_path,
        method: &head.method,
        headers: &head.headers,
    }
}

/// The host routes match, as normalising `raw_host` gave it: a span of it (the host without
/// its port or trailing dot, already lowercase, as most are), or a lowercased copy.
enum DomainText {
    Within(std::ops::Range<usize>),
    Own(String),
}

/// What the phases of one request share, fixed once the request is admitted.
struct RequestCtx<'c> {
    conn: &'c ConnectionContext,
    route: &'c Arc<Route>,
    version: Version,
    /// The request target as the client sent it.
    uri: Uri,
    /// The host as the client named it (`Host`, or the target's authority): what the backend
    /// receives.
    raw_host: Option<String>,
    /// Where the host routes match (`domain()`) is.
    domain: DomainText,
    /// The path routes and security match, where normalising changed the one sent.
    normalised_path: Option<String>,
    /// What the route's security established: JWT claims, and whether the request's credentials
    /// were the proxy's to check.
    admitted: Option<Admitted>,
}

impl<'c> RequestCtx<'c> {
    /// The host routes match: lowercase, without port or trailing dot.
    fn domain(&self) -> Option<&str> {
        match &self.domain {
            DomainText::Within(span) => self.raw_host.as_deref().and_then(|raw| raw.get(span.clone())),
            DomainText::Own(normal) => Some(normal.as_str()),
        }
        .filter(|domain| !domain.is_empty())
    }

    /// The path as sent, without the query.
    fn path(&self) -> &str {
        self.uri.path()
    }

    fn query(&self) -> &str {
        self.uri.query().unwrap_or("")
    }

    fn match_path(&self) -> &str {
        self.normalised_path.as_deref().unwrap_or(self.path())
    }

    fn templates(&self) -> TemplateContext<'_> {
        TemplateContext {
            domain: self.domain().unwrap_or(""),
            port: self.conn.local_port,
            path: self.path(),
            query: self.query(),
            client_ip: self.conn.client_ip,
            route_name: &self.route.label,
            connection_id: self.conn.connection_id,
            claims: self.admitted.as_ref().and_then(|a| a.claims.as_deref()),
        }
    }

    /// What routing and target selection read of the request.
    fn facts<'a>(&'a self, head: &'a Parts) -> RequestFacts<'a> {
        request_facts(self.conn, self.domain(), self.match_path(), head)
    }

    /// The route's next pick for a retry, or the same target when there is no other.
    fn reselect(&self, head: &Parts, target: &mut SelectedTarget<'c>) {
        let route: &'c Route = self.route;
        if let Some(next) = route.select_target_for(self.conn.local_port, self.conn.client_ip, Some(&self.facts(head))) {
            *target = next;
        }
    }

    /// What function targets see of the request.
    fn script_context(&self, head: &Parts) -> ScriptContext {
        ScriptContext {
            path: Some(self.path().to_string()),
            query: Some(self.query().to_string()),
            headers: Some(
                head.headers
                    .iter()
                    .filter_map(|(name, value)| Some((name.as_str().to_string(), value.to_str().ok()?.to_string())))
                    .collect(),
            ),
            ..ScriptContext::for_route(&self.conn.identity(), self.domain(), self.route)
        }
    }
}
