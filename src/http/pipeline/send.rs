//! Phase 4, send: each attempt resolves the target's endpoint (its functions, if any), checks a
//! connection out of the pool, writes the rewritten head and the body, and waits for the response
//! head within the route's response timeout. A failure before anything was sent, a 5xx or a
//! timeout may go to the route's next pick (`retry`); a pooled connection found closed is replaced
//! once; what is left becomes 502 or 504.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use rustls::pki_types::ServerName;
use std::net::IpAddr;

use super::answers::{edge_refusal, upstream_failure};
use super::prepare::{Outbound, RequestBody};
use super::{Answer, RequestCtx};
use crate::hooks::ScriptContext;
use crate::http::body::{fields_in_map, text_response, Direction, ProxyBody, TrackedBody, UpstreamBody};
use crate::http::edge;
use crate::http::h1::client::{self as h1_client, ClientError};
use crate::http::h3::client as h3_client;
use crate::http::headers::{add_forwarded, strip_hop_by_hop, ForwardedFacts, ForwardingHeaders};
use crate::templates::apply_templates;
use crate::http::pool::{Checkout, PoolKey, UpstreamProtocol, UpstreamTls};
use crate::proxy_protocol;
use crate::routing::table::SelectedTarget;
use crate::security::RouteGuard;

/// A response head the upstream gave, with what its body's end needs: the connection (back to the
/// pool once the exchange was clean) and the slots it holds.
pub(super) struct Exchange {
    pub response: Response<UpstreamBody>,
    pub checkout: Checkout,
    pub key: PoolKey,
    /// Raised when the request body was sent whole: only then may the connection be reused
    /// (`None`: there was no body, the head was all).
    pub request_sent: Option<Arc<AtomicBool>>,
    /// HTTP/2 clients: this stream's share of the connection's upstream exchanges.
    pub client_slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

pub(super) async fn send_with_retries<'c>(
    ctx: &RequestCtx<'c>,
    target: &mut SelectedTarget<'c>,
    script_context: Option<&ScriptContext>,
    head: &mut Parts,
    outbound: &mut Outbound,
    route_slot: &mut Option<RouteGuard>,
) -> Result<Exchange, Answer> {
    let conn = ctx.conn;
    let route = ctx.route;
    let policy = route.http.retry;
    let pool = &conn.env.pool;
    let mut attempt: u32 = 0;
    let mut client_slot: Option<tokio::sync::OwnedSemaphorePermit> = None;
    let mut replaced_dead_connection = false;
    let mut fresh_connection = false;
    // The head as rewritten for the current target, kept when a stale pooled connection is
    // replaced.
    // (Boxed: only a replacement has one.)
    let mut rewritten: Option<Box<UpstreamHead>> = None;
    // The backend advertised HTTP/3 and this request goes over it (its host and TCP port), or it
    // failed already and the request stays on TCP.
    let mut alt_svc_from: Option<(Arc<str>, u16)>;
    let mut alt_svc_failed = false;
    loop {
        let endpoint = match target.static_endpoint() {
            Some(endpoint) => Ok(endpoint),
            // Boxed: only a target with a function waits here.
            None => Box::pin(conn.env.scripts.endpoint(target, || script_context.cloned().unwrap_or_default())).await,
        };
        let (target_host, target_port) = match endpoint {
            Ok(endpoint) => endpoint,
            Err(err) => {
                tracing::debug!(route = &*route.label, error = %err, "target function failed");
                return Err(text_response(StatusCode::BAD_GATEWAY, "the route's target function failed"));
            }
        };
        // Only a TLS upstream needs it (a parse, a copy and a validation per request).
        let server_name = || upstream_server_name(&target_host, ctx.domain());
        // `auto` to a TLS backend that advertised HTTP/3 on its host: QUIC to that port; TCP
        // again should it fail.
        let advertised = (outbound.protocol == UpstreamProtocol::Auto && !outbound.wants_upgrade && !alt_svc_failed)
            .then(|| target.upstream_tls_h3())
            .flatten()
            .and_then(|config| Some((pool.alt_svc.h3_port(&target_host, target_port)?, config)));
        alt_svc_from = advertised.as_ref().map(|_| (target_host.clone(), target_port));
        let key = match advertised {
            Some((h3_port, config)) => {
                let tls = Some(UpstreamTls { server_name: server_name(), config });
                PoolKey { host: target_host, port: h3_port, protocol: UpstreamProtocol::Http3, tls, proxy_header: None }
            }
            None => {
                let tls = target.upstream_tls(outbound.wants_upgrade).map(|config| UpstreamTls { server_name: server_name(), config });
                let proxy_version = target.send_proxy_protocol.unwrap_or(conn.env.send_proxy_protocol);
                let proxy_header = (proxy_version > 0).then(|| conn.destination()).flatten().and_then(|destination| {
                    proxy_protocol::encode(proxy_version, std::net::SocketAddr::new(conn.client_ip, conn.client_port), destination).map(Arc::from)
                });
                PoolKey { host: target_host, port: target_port, protocol: outbound.protocol, tls, proxy_header }
            }
        };
        if ctx.version >= Version::HTTP_2 && client_slot.is_none() {
            let slots = conn.upstream_slots.get_or_init(|| Arc::new(tokio::sync::Semaphore::new(conn.max_upstream_per_client.max(1) as usize)));
            // A free slot is taken at once (no timer, no clock read); only a client holding all
            // of its slots waits, up to the connect timeout.
            let permit = match slots.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => match tokio::time::timeout(route.connect_timeout, slots.clone().acquire_owned()).await {
                    Ok(Ok(permit)) => Some(permit),
                    _ => None,
                },
            };
            match permit {
                Some(permit) => client_slot = Some(permit),
                None => return Err(text_response(StatusCode::SERVICE_UNAVAILABLE, "too many requests of this connection are waiting upstream")),
            }
        }
        // An advertised alternative gets a short try: TCP is there should it not answer.
        let connect_timeout = if alt_svc_from.is_some() { route.connect_timeout.min(ALT_SVC_CONNECT_BUDGET) } else { route.connect_timeout };
        let checked_out = if fresh_connection {
            pool.checkout_fresh(&key, connect_timeout, conn.env.no_delay).await
        } else {
            pool.checkout(&key, connect_timeout, conn.env.no_delay).await
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
            // Nothing was sent: the backend is asked over TCP at once, and not over QUIC again
            // until it advertises HTTP/3 anew.
            Err(err) if alt_svc_from.is_some() => {
                tracing::debug!(route = &*route.label, error = %err, "advertised HTTP/3 failed, back to TCP");
                if let Some((host, port)) = alt_svc_from.take() {
                    pool.alt_svc.failed(&host, port);
                }
                alt_svc_failed = true;
                continue;
            }
            // Nothing was sent: any request may go to the next pick.
            Err(err) if policy.on_connect_failure && attempt < policy.max_retries => {
                tracing::debug!(route = &*route.label, error = %err, attempt, "upstream connect failed, retrying");
                attempt += 1;
                backoff(policy.backoff, attempt).await;
                ctx.reselect(head, target);
                continue;
            }
            Err(err) => return Err(upstream_failure(err)),
        };
        let Some(attempt_body) = outbound.body.for_attempt() else {
            return Err(text_response(StatusCode::BAD_GATEWAY, "the upstream server failed and the request cannot be repeated"));
        };
        let multiplexed = checkout.multiplexed();
        // Made in a block that ends before the send waits: a moved-from head would otherwise
        // still take room in the future.
        let mut upstream_head = {
            let mut built = match rewritten.take() {
                Some(head) => *head,
                None => {
                    // The client's head is copied only when a retry may go to another target,
                    // which needs the head as the client sent it for its own rewrite.
                    let fresh = if policy.max_retries > attempt { clone_head(head) } else { std::mem::replace(head, empty_head()) };
                    rewrite_headers(fresh, ctx, target, outbound.wants_upgrade)
                }
            };
            set_target(&mut built.parts, &checkout, &key, &outbound.path_and_query, ctx.raw_host.as_deref())
                .map_err(|()| text_response(StatusCode::BAD_REQUEST, "bad request target"))?;
            Some(built)
        };
        let reused = checkout.reused();
        // After bytes reached the upstream only an idempotent request may be sent again.
        let replayable = outbound.body.replayable() && outbound.idempotent;
        // HTTP/2 consumes the head it sends: a copy, where a stale pooled connection could be
        // replaced (boxed, so that the common request's future does not carry room for one).
        // HTTP/1.1 only borrows it: it is still in `upstream_head` after the attempt.
        let mut spare = (multiplexed && (reused || alt_svc_from.is_some()) && !replaced_dead_connection && replayable)
            .then(|| upstream_head.as_ref().map(|head| Box::new(head.copy())))
            .flatten();
        // A body is followed to its end (and its bytes counted, when streamed); no body is sent
        // as it is.
        let (body, request_sent) = if matches!(outbound.body, RequestBody::Empty) {
            (attempt_body, None)
        } else {
            let counted = matches!(outbound.body, RequestBody::Streaming(..)).then(|| (route.stats.clone(), Direction::In));
            let sent = Arc::new(AtomicBool::new(false));
            (TrackedBody::new(attempt_body, counted, Some(sent.clone())).boxed(), Some(sent))
        };
        let watched = if ctx.version < Version::HTTP_2 { conn.client_fd } else { None };
        let sent = send_watching_client(&mut checkout, &mut upstream_head, body, ctx.raw_host.as_deref(), route.http.response_timeout, watched, route_slot).await;
        match sent {
            Ok(response) if response.status().is_server_error() && policy.on_5xx && replayable && attempt < policy.max_retries => {
                tracing::debug!(route = &*route.label, status = %response.status(), attempt, "upstream answered 5xx, retrying");
                attempt += 1;
                backoff(policy.backoff, attempt).await;
                ctx.reselect(head, target);
            }
            Ok(mut response) => {
                if key.protocol == UpstreamProtocol::Auto && key.tls.is_some() {
                    fields_in_map(&mut response);
                    pool.alt_svc.learn(&key.host, key.port, response.headers());
                }
                return Ok(Exchange { response, checkout, key, request_sent, client_slot });
            }
            Err(err) if alt_svc_from.is_some() => {
                if let Some((host, port)) = alt_svc_from.take() {
                    pool.alt_svc.failed(&host, port);
                }
                alt_svc_failed = true;
                match err {
                    // Sent again over TCP, where the request may be repeated.
                    SendError::Failed(_) if replayable => {
                        pool.forget_multiplexed(&key);
                        rewritten = upstream_head.map(Box::new).or(spare.take());
                    }
                    SendError::Failed(_) => return Err(text_response(StatusCode::BAD_GATEWAY, "the upstream server did not answer properly")),
                    SendError::Timeout => return Err(text_response(StatusCode::GATEWAY_TIMEOUT, "the upstream server did not answer in time")),
                }
            }
            // A pooled connection the upstream closed just as it was reused fails before the
            // request was processed: a request that can be sent again goes on a fresh connection.
            Err(SendError::Failed(err)) if reused && !replaced_dead_connection && replayable && err.stale_connection() => {
                if multiplexed {
                    pool.forget_multiplexed(&key);
                }
                // The same target again, on a new connection: the head goes as it was rewritten.
                rewritten = upstream_head.map(Box::new).or(spare.take());
                replaced_dead_connection = true;
                fresh_connection = true;
            }
            Err(SendError::Failed(_)) if outbound.body.client_failed() => {
                return Err(edge_refusal(edge::Refusal::bad_request("the request body is not framed correctly"), ctx.version));
            }
            Err(SendError::Failed(err)) => {
                if multiplexed {
                    pool.forget_multiplexed(&key);
                }
                tracing::debug!(route = &*route.label, error = %err, "upstream request failed");
                return Err(text_response(StatusCode::BAD_GATEWAY, "the upstream server did not answer properly"));
            }
            Err(SendError::Timeout) if policy.on_timeout && replayable && attempt < policy.max_retries => {
                attempt += 1;
                backoff(policy.backoff, attempt).await;
                ctx.reselect(head, target);
            }
            Err(SendError::Timeout) => {
                return Err(text_response(StatusCode::GATEWAY_TIMEOUT, "the upstream server did not answer in time"));
            }
        }
    }
}

/// Hop-by-hop headers out, the `X-Forwarded-*` set in, then the route's and the target's request
/// templates.
fn rewrite_headers(mut parts: Parts, ctx: &RequestCtx<'_>, target: &SelectedTarget<'_>, upgrade: bool) -> UpstreamHead {
    let conn = ctx.conn;
    let facts = ForwardedFacts {
        connection: &conn.header_values,
        https: conn.https(),
        host: ctx.raw_host.as_deref(),
        trusted_peer: conn.trusted_peer,
        version: parts.version,
    };
    strip_hop_by_hop(&mut parts.headers, upgrade);
    let forwarding = add_forwarded(&mut parts.headers, &facts);
    let mut head = UpstreamHead { parts, forwarding };
    let headers = &mut head.parts.headers;
    let route_templates = &ctx.route.http.request_headers;
    if !route_templates.is_empty() || !target.request_headers.is_empty() {
        // A template may set a forwarding header itself: it wins.
        head.forwarding.move_into(headers);
        let templates = ctx.templates();
        apply_templates(headers, route_templates, &templates);
        apply_templates(headers, target.request_headers, &templates);
    }
    head
}

/// A request head rewritten for its upstream, with the forwarding headers that go with it.
#[derive(Debug)]
struct UpstreamHead {
    parts: Parts,
    forwarding: ForwardingHeaders,
}

impl UpstreamHead {
    fn copy(&self) -> UpstreamHead {
        UpstreamHead { parts: clone_head(&self.parts), forwarding: self.forwarding.clone() }
    }
}

/// How the request names its target upstream: origin form and `Host` for HTTP/1.1, an absolute
/// URI (`:scheme`, `:authority`) for HTTP/2 and HTTP/3. Known only once the connection's protocol
/// is. The authority is the host the client named, else the target's address.
fn set_target(head: &mut Parts, checkout: &Checkout, key: &PoolKey, path_and_query: &PathAndQuery, raw_host: Option<&str>) -> Result<(), ()> {
    let authority = || raw_host.map_or_else(|| format!("{}:{}", key.host, key.port), str::to_string);
    if checkout.multiplexed() {
        head.headers.remove(header::HOST);
        head.uri = Uri::builder()
            .scheme(if key.tls.is_some() { "https" } else { "http" })
            .authority(authority())
            .path_and_query(path_and_query.clone())
            .build()
            .map_err(|_| ())?;
        head.version = if matches!(checkout, Checkout::Http3 { .. }) { Version::HTTP_3 } else { Version::HTTP_2 };
    } else {
        // Host is kept as the client sent it; an HTTP/2 client's `:authority` becomes Host, which
        // our HTTP/1.1 client writes from the request's host as it writes the head (`send`).
        // Without either (HTTP/1.0), the target's address.
        if raw_host.is_none() && !head.headers.contains_key(header::HOST) {
            let value = HeaderValue::try_from(authority()).map_err(|_| ())?;
            head.headers.insert(header::HOST, value);
        }
        head.uri = Uri::from(path_and_query.clone());
        head.version = Version::HTTP_11;
    }
    Ok(())
}

fn clone_head(head: &Parts) -> Parts {
    let mut copy = empty_head();
    copy.method = head.method.clone();
    copy.uri = head.uri.clone();
    copy.version = head.version;
    copy.headers = head.headers.clone();
    copy
}

fn empty_head() -> Parts {
    Request::new(()).into_parts().0
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
    H3(h3::error::StreamError),
}

impl UpstreamFailure {
    /// The connection was found closed before anything of a response came: a pooled connection
    /// the upstream had closed just as it was reused.
    fn stale_connection(&self) -> bool {
        match self {
            UpstreamFailure::H1(err) => err.before_response(),
            UpstreamFailure::H2(err) => err.is_canceled() || err.is_incomplete_message(),
            // A QUIC connection closed by the backend (idle) is seen by the pool before reuse;
            // one that fails on the way is not told apart from a failed request.
            UpstreamFailure::H3(_) => false,
        }
    }
}

impl std::fmt::Display for UpstreamFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamFailure::H1(err) => err.fmt(f),
            UpstreamFailure::H2(err) => err.fmt(f),
            UpstreamFailure::H3(err) => err.fmt(f),
        }
    }
}

/// Sends one attempt of the head in `head` (always `Some` on the way in). HTTP/1.1 borrows it
/// and leaves it there, for a stale connection's replacement to send again; HTTP/2 takes it.
/// `host`: the host the client named, which an HTTP/1.1 head without `Host` (an HTTP/2 client's)
/// gets written as its `Host`.
async fn send(checkout: &mut Checkout, head: &mut Option<UpstreamHead>, body: ProxyBody, host: Option<&str>, timeout: Duration) -> Result<Response<UpstreamBody>, SendError> {
    match checkout {
        Checkout::Http1 { conn, .. } => {
            let (Some(conn), Some(head)) = (conn.take(), head.as_ref()) else {
                return Err(SendError::Failed(UpstreamFailure::H1(ClientError::ClosedBeforeResponse(None))));
            };
            match h1_client::send(conn, &head.parts, &head.forwarding, host, body, timeout).await {
                Ok(response) => Ok(response.map(UpstreamBody::H1)),
                Err(ClientError::TimedOut) => Err(SendError::Timeout),
                Err(err) => Err(SendError::Failed(UpstreamFailure::H1(err))),
            }
        }
        Checkout::Http3 { upstream, .. } => {
            let Some(UpstreamHead { mut parts, mut forwarding }) = head.take() else {
                return Err(SendError::Failed(UpstreamFailure::H1(ClientError::ClosedBeforeResponse(None))));
            };
            forwarding.move_into(&mut parts.headers);
            let heard = upstream.datagrams_received();
            // Boxed: inline, HTTP/3's state would size every request's future.
            match tokio::time::timeout(timeout, Box::pin(h3_client::send(upstream, parts, body))).await {
                Ok(Ok(response)) => Ok(response.map(|body| UpstreamBody::H3(Box::new(body)))),
                Ok(Err(err)) => Err(SendError::Failed(UpstreamFailure::H3(err))),
                Err(_) => {
                    // Not a word, not even an acknowledgement, all that time: the backend is gone.
                    if upstream.datagrams_received() == heard {
                        upstream.abandon();
                    }
                    Err(SendError::Timeout)
                }
            }
        }
        Checkout::Http2 { sender, .. } => {
            let Some(UpstreamHead { mut parts, mut forwarding }) = head.take() else {
                return Err(SendError::Failed(UpstreamFailure::H1(ClientError::ClosedBeforeResponse(None))));
            };
            forwarding.move_into(&mut parts.headers);
            match tokio::time::timeout(timeout, sender.send_request(Request::from_parts(parts, body))).await {
                Ok(Ok(response)) => Ok(response.map(UpstreamBody::H2)),
                Ok(Err(err)) => Err(SendError::Failed(UpstreamFailure::H2(err))),
                Err(_) => Err(SendError::Timeout),
            }
        }
    }
}

/// The longest an advertised HTTP/3 alternative may take to connect before the request goes over
/// TCP instead (within the route's connect timeout).
const ALT_SVC_CONNECT_BUDGET: Duration = Duration::from_secs(2);

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
    head: &mut Option<UpstreamHead>,
    body: ProxyBody,
    host: Option<&str>,
    timeout: Duration,
    client_fd: Option<std::os::fd::RawFd>,
    route_slot: &mut Option<RouteGuard>,
) -> Result<Response<UpstreamBody>, SendError> {
    let limited = route_slot.as_ref().is_some_and(RouteGuard::is_limited);
    match (client_fd, limited) {
        // Boxed: the watch's timer would otherwise size every request's future.
        (Some(fd), true) => Box::pin(send_while_watching(checkout, head, body, host, timeout, fd, route_slot)).await,
        _ => send(checkout, head, body, host, timeout).await,
    }
}

async fn send_while_watching(
    checkout: &mut Checkout,
    head: &mut Option<UpstreamHead>,
    body: ProxyBody,
    host: Option<&str>,
    timeout: Duration,
    fd: std::os::fd::RawFd,
    route_slot: &mut Option<RouteGuard>,
) -> Result<Response<UpstreamBody>, SendError> {
    let sending = send(checkout, head, body, host, timeout);
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
