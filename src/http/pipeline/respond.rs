//! Phase 5, respond: the upstream's response on its way to the client. A 101 completes a
//! WebSocket upgrade the client asked for and becomes a tunnel; any other response loses its
//! hop-by-hop headers, gets the route's and the target's response templates, binds a session the
//! backend issued (affinity), and streams back in a body that returns its connection to the pool
//! when the exchange ends cleanly.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};

use super::record::PendingRecord;
use super::send::Exchange;
use super::{Answer, Answered, ConnectionContext, RequestCtx};
use crate::http::body::{fields_in_map, text_response, BoxError, Direction, ProxyBody, TrackedBody, UpstreamBody};
use crate::http::h1::client::PendingUpstreamUpgrade;
use crate::http::h1::server::PendingUpgrade;
use crate::http::headers::strip_hop_by_hop;
use crate::templates::{apply_templates, TemplateContext};
use crate::http::io::InFlight;
use crate::http::pool::{Checkout, PoolKey, UpstreamPool};
use crate::balance::affinity::Affinity;
use crate::http::websocket;
use crate::metrics::GaugeHold;
use crate::routing::table::{Route, SelectedTarget};
use crate::security::RouteGuard;

/// A session the backend just issued belongs to it, bound before the client can use it (routes
/// with affinity; an upgrade's 101 binds nothing).
pub(super) async fn bind_issued_session(ctx: &RequestCtx<'_>, affinity: &Affinity, exchange: &mut Exchange, target: &SelectedTarget<'_>, affinity_value: Option<&str>) {
    if exchange.response.status() == StatusCode::SWITCHING_PROTOCOLS {
        return;
    }
    fields_in_map(&mut exchange.response);
    if let Some(issued) = affinity.key.response_value(exchange.response.headers()).filter(|v| affinity_value != Some(v.as_str())) {
        let backend = format!("{}:{}", target.host, target.port);
        ctx.conn.env.affinity.bind(affinity, &issued, &backend, false).await;
    }
}

pub(super) fn respond(
    ctx: &RequestCtx<'_>,
    exchange: Exchange,
    target: SelectedTarget<'_>,
    client_upgrade: Option<PendingUpgrade>,
    route_slot: Option<RouteGuard>,
    in_flight: &mut Option<InFlight>,
    access_record: &mut Option<PendingRecord>,
) -> Result<Answered, Answer> {
    let Exchange { mut response, checkout, key, request_sent, client_slot } = exchange;
    let route = ctx.route;
    let templates = ctx.templates();
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        return match client_upgrade {
            Some(client_upgrade) => {
                let joined = Tunnel { client_upgrade, route: route.clone(), _route_slot: route_slot, _backend_lease: target.lease };
                Ok(Answered::from(joined.answer(ctx.conn, response, target.response_headers, &templates)))
            }
            None => Err(text_response(StatusCode::BAD_GATEWAY, "the upstream switched protocols unasked")),
        };
    }
    // An HTTP/1.1 upstream's fields stay in its head when they go back to an HTTP/1.x client
    // unchanged; anything else reads or writes them in the map.
    let unchanged = route.http.response_headers.is_empty() && target.response_headers.is_empty() && route.http3.is_none();
    let upstream_fields = if unchanged && ctx.version < Version::HTTP_2 {
        response.body_mut().take_raw_fields()
    } else {
        fields_in_map(&mut response);
        None
    };
    let (mut parts, body) = response.into_parts();
    // Our HTTP/1.1 client leaves the hop-by-hop fields out as it reads a head.
    if !matches!(body, UpstreamBody::H1(_)) {
        strip_hop_by_hop(&mut parts.headers, false);
    }
    apply_templates(&mut parts.headers, &route.http.response_headers, &templates);
    apply_templates(&mut parts.headers, target.response_headers, &templates);
    // The record follows the body: its bytes and its end are the response's.
    let access_record = access_record.take().map(|mut pending| {
        pending.status = Some(parts.status.as_u16());
        pending.upstream = Some((target.host.clone(), target.port));
        pending.termination = "completed";
        pending
    });
    let body = ReturningBody {
        inner: TrackedBody::new(body, Some((route.stats.clone(), Direction::Out)), None),
        pool: ctx.conn.env.pool.clone(),
        key,
        checkout: Some(checkout),
        request_sent,
        _route_slot: route_slot,
        _backend_lease: target.lease,
        _client_slot: client_slot,
        _in_flight: in_flight.take(),
        access_record,
    };
    Ok(Answered { response: Response::from_parts(parts, body.boxed()), upstream_fields })
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
        target_templates: &[crate::templates::HeaderTemplate],
        templates: &TemplateContext<'_>,
    ) -> Response<ProxyBody> {
        let upstream_upgrade = response.extensions().get::<PendingUpstreamUpgrade>().and_then(PendingUpstreamUpgrade::take);
        let (mut parts, _) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers, true);
        apply_templates(&mut parts.headers, &self.route.http.response_headers, templates);
        apply_templates(&mut parts.headers, target_templates, templates);
        let (limits, shutdown) = (ctx.tunnels.limits(), ctx.env.force_close.clone());
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
            let end = websocket::run(client, upstream, settings, limits, &shutdown).await;
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
    request_sent: Option<Arc<AtomicBool>>,
    _route_slot: Option<RouteGuard>,
    /// The backend's in-flight slot, until the response has been passed on.
    _backend_lease: Option<crate::balance::Lease>,
    _client_slot: Option<tokio::sync::OwnedSemaphorePermit>,
    _in_flight: Option<InFlight>,
    /// The request's access log record, written when the body is dropped.
    access_record: Option<PendingRecord>,
}

impl Body for ReturningBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let (Some(pending), std::task::Poll::Ready(Some(frame))) = (self.access_record.as_mut(), &polled) {
            match frame {
                Ok(frame) => pending.bytes_out += frame.data_ref().map_or(0, |data| data.len() as u64),
                Err(_) => pending.termination = "upstream_error",
            }
        }
        polled
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
        if let Some(mut pending) = self.access_record.take() {
            if !self.inner.ended() && pending.termination == "completed" {
                pending.termination = "client_aborted";
            }
        }
        let clean = self.inner.ended() && self.request_sent.as_ref().is_none_or(|sent| sent.load(Ordering::Acquire));
        if let (true, Some(Checkout::Http1 { permit, .. })) = (clean, self.checkout.take()) {
            if let Some(conn) = self.inner.inner_mut().take_reusable() {
                self.pool.put_back(&self.key, conn, permit);
            }
        }
    }
}
