//! Phase 1, admit: the request against the edge rules, then its route (404 none, 421 misdirected
//! on a TLS connection made for another route), the route's IP policy and connection limit, its
//! rate limit and authentication, and the answers a route gives without an upstream.

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, StatusCode, Version};

use super::answers::{edge_refusal, native_response, security_refusal};
use super::{request_facts, Answer, ConnectionContext, DomainText, RequestCtx, TerminatedTls};
use crate::routing::table::Route;
use crate::http::body::text_response;
use crate::http::edge::{self, checked_request_host, host_values, normalise_host, normalise_path, request_host};
use crate::security::RouteGuard;

/// An admitted request: its context, and the route's `maxConnections` slot it holds until its
/// response ends.
pub(super) struct Admission<'c> {
    pub ctx: RequestCtx<'c>,
    pub route_slot: Option<RouteGuard>,
    /// The route's rate limit is to be asked of Redis (`admit_shared`) before anything else.
    pub shared_pending: bool,
}

/// Which edge rules a request's head met before the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadChecked {
    /// None: an HTTP/2 or HTTP/3 request, whose head the pipeline checks.
    Nothing,
    /// Its host (`edge::request_host`), by the HTTP/1.x head reader (`http::head`).
    Host,
}

/// A request refused before it reached its route's checks (`route: None`: it found no route), or
/// by them.
pub(super) struct Refused<'c> {
    pub route: Option<&'c Arc<Route>>,
    pub answer: Answer,
}

impl From<Answer> for Refused<'_> {
    fn from(answer: Answer) -> Self {
        Refused { route: None, answer }
    }
}

pub(super) fn admit<'c>(conn: &'c ConnectionContext, head: &Parts, head_checked: HeadChecked) -> Result<Admission<'c>, Refused<'c>> {
    // The edge rules (API.md "Edge hygiene"): one host, which is the one the backend receives; a
    // normalised path for matching. An HTTP/1.x head met them already, with the framing rules
    // (`http::head`); an HTTP/2 or HTTP/3 request meets them here first.
    let version = head.version;
    let authority = head.uri.authority().map(|a| a.as_str());
    let raw_host = match head_checked {
        HeadChecked::Host => checked_request_host(authority, host_values(&head.headers)).map(str::to_string),
        HeadChecked::Nothing => match request_host(authority, host_values(&head.headers), version >= Version::HTTP_11) {
            Ok(host) => host.map(str::to_string),
            Err(refusal) => return Err(edge_refusal(refusal, version).into()),
        },
    };
    if head.method == Method::CONNECT {
        return Err(edge_refusal(edge::Refusal { status: StatusCode::METHOD_NOT_ALLOWED, reason: "CONNECT is not proxied" }, version).into());
    }
    let normalised = raw_host.as_deref().map(normalise_host);
    let domain = normalised.as_deref().filter(|d| !d.is_empty());
    let normalised_path = match normalise_path(head.uri.path()) {
        Ok(Cow::Owned(normal)) => Some(normal),
        Ok(Cow::Borrowed(_)) => None,
        Err(refusal) => return Err(edge_refusal(refusal, version).into()),
    };
    let match_path = normalised_path.as_deref().unwrap_or(head.uri.path());
    let found = conn.table.find_for_request(&request_facts(conn, domain, match_path, head));
    if let Some(TerminatedTls { sni: Some(sni), route: sni_route, .. }) = conn.tls.as_deref() {
        let same_host = domain == Some(&**sni);
        let same_route = found.is_some_and(|route| Arc::ptr_eq(route, sni_route));
        if !same_host && !same_route {
            return Err(text_response(StatusCode::MISDIRECTED_REQUEST, "this connection was not made for that host").into());
        }
    }
    let Some(route) = found else {
        return Err(text_response(StatusCode::NOT_FOUND, "no route matches this request").into());
    };
    // Over QUIC, only routes that serve HTTP/3 take requests: the others never offered it.
    if version == Version::HTTP_3 && route.http3.is_none() {
        return Err(text_response(StatusCode::MISDIRECTED_REQUEST, "this route is not served over HTTP/3").into());
    }
    let refused = |answer: Answer| Refused { route: Some(route), answer };
    if !route.policy.admits(conn.client_ip) {
        route.stats.forbidden.fetch_add(1, Ordering::Relaxed);
        return Err(refused(text_response(StatusCode::FORBIDDEN, "access denied")));
    }
    if route.socket_handler.is_some() {
        // A socket handler takes whole connections; only a connection's first request can go to
        // it. This connection closes after the answer, so the client's next try opens a new one.
        let mut refusal = text_response(StatusCode::MISDIRECTED_REQUEST, "this route takes whole connections: send the request on a new connection");
        refusal.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Err(refused(refusal));
    }
    conn.env.scripts.route_matched(|| conn.identity(), domain, route);
    let Some(route_slot) = RouteGuard::acquire(&route.stats, route.max_connections).map(Some) else {
        return Err(refused(text_response(StatusCode::SERVICE_UNAVAILABLE, "route connection limit reached")));
    };
    // A rate limit shared by replicas is asked of Redis: `admit_shared` finishes such a request.
    let shared = route.http_security.as_ref().is_some_and(|s| s.rate_limit.is_some()) && conn.env.shared.is_some();
    // Rate limit, then authentication: refused requests never reach an upstream.
    let admitted = match &route.http_security {
        Some(security) if !shared => match security.admit(conn.client_ip, match_path, &head.headers) {
            Ok(admitted) => Some(admitted),
            Err(refusal) => return Err(refused(security_refusal(route, refusal))),
        },
        _ => None,
    };
    // A borrowed normal form is a slice of `raw_host` (normalising only cut it): its span.
    let domain = match (raw_host.as_deref(), normalised) {
        (Some(raw), Some(Cow::Borrowed(normal))) => {
            let start = normal.as_ptr() as usize - raw.as_ptr() as usize;
            DomainText::Within(start..start + normal.len())
        }
        (_, Some(Cow::Owned(normal))) => DomainText::Own(normal),
        _ => DomainText::Within(0..0),
    };
    let ctx = RequestCtx { conn, route, version, uri: head.uri.clone(), raw_host, domain, normalised_path, admitted };
    if shared {
        return Ok(Admission { ctx, route_slot, shared_pending: true });
    }
    answer_natively(&ctx)?;
    Ok(Admission { ctx, route_slot, shared_pending: false })
}

/// The rest of `admit` for a request whose rate limit is counted in Redis: the limit, then
/// authentication and the answers given without an upstream, as `admit` orders them.
pub(super) async fn admit_shared<'c>(ctx: &mut RequestCtx<'c>, head: &Parts) -> Result<(), Refused<'c>> {
    let route = ctx.route;
    let (Some(security), Some(redis)) = (&route.http_security, &ctx.conn.env.shared) else { return Ok(()) };
    let match_path = ctx.normalised_path.as_deref().unwrap_or(head.uri.path());
    match security.admit_shared(redis, ctx.conn.client_ip, ctx.conn.header_values.client_ip_text(), match_path, &head.headers).await {
        Ok(admitted) => ctx.admitted = Some(admitted),
        Err(refusal) => return Err(Refused { route: Some(route), answer: security_refusal(route, refusal) }),
    }
    answer_natively(ctx)
}

/// A route that answers by itself (`native` responses) refuses to go further with that answer.
fn answer_natively<'c>(ctx: &RequestCtx<'c>) -> Result<(), Refused<'c>> {
    match &ctx.route.http.native {
        Some(native) => Err(Refused { route: Some(ctx.route), answer: native_response(native, &ctx.templates()) }),
        None => Ok(()),
    }
}
