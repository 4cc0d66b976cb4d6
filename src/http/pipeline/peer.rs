//! Phase 2, choose the peer: a session value bound before goes to its backend while that one may
//! take traffic; a value seen for the first time is balanced, then bound (or refused, when the
//! route says so); without affinity the route's balancing picks.

use http::request::Parts;
use http::StatusCode;

use super::{Answer, RequestCtx};
use crate::balance::affinity::{Affinity, AffinityKey, OnUnknown};
use crate::hooks::ScriptContext;
use crate::http::body::text_response;
use crate::routing::table::{Route, SelectedTarget};

pub(super) struct Peer<'c> {
    pub target: SelectedTarget<'c>,
    /// The request's affinity value, if the route has affinity and the request carries one: a
    /// different value the backend issues in its response is bound to it.
    pub affinity_value: Option<String>,
    /// What the target's functions are called with (on each attempt); made only for routes that
    /// have them (boxed, so that other routes' requests carry no room for one).
    pub script_context: Option<Box<ScriptContext>>,
}

/// The route's balancing picks (routes without affinity).
pub(super) fn choose<'c>(ctx: &RequestCtx<'c>, head: &Parts) -> Result<Peer<'c>, Answer> {
    let route: &'c Route = ctx.route;
    let Some(target) = route.select_target_for(ctx.conn.local_port, ctx.conn.client_ip, Some(&ctx.facts(head))) else {
        return Err(no_target());
    };
    Ok(peer(ctx, head, target, None))
}

/// A session value bound before goes to its backend; a new one is balanced, then bound.
pub(super) async fn choose_with_affinity<'c>(ctx: &RequestCtx<'c>, head: &Parts, affinity: &Affinity) -> Result<Peer<'c>, Answer> {
    let route: &'c Route = ctx.route;
    let conn = ctx.conn;
    let facts = ctx.facts(head);
    let affinity_value = affinity.key.request_value(conn.client_ip, &head.headers);
    let mut bound_target = None;
    // Some(only_if_new): the value is to be bound to the target picked below.
    let mut to_bind: Option<bool> = None;
    if let Some(value) = &affinity_value {
        match conn.env.affinity.lookup(affinity, value).await {
            Some(backend) => {
                bound_target = route.select_bound(conn.local_port, conn.client_ip, Some(&facts), &backend);
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
    let Some(mut target) = bound_target.or_else(|| route.select_target_for(conn.local_port, conn.client_ip, Some(&facts))) else {
        return Err(no_target());
    };
    if let (Some(value), Some(only_if_new)) = (&affinity_value, to_bind) {
        let backend = format!("{}:{}", target.host, target.port);
        let winner = conn.env.affinity.bind(affinity, value, &backend, only_if_new).await;
        // Another replica bound this value first: follow its choice.
        if winner != backend {
            if let Some(theirs) = route.select_bound(conn.local_port, conn.client_ip, Some(&facts), &winner) {
                target = theirs;
            }
        }
    }
    Ok(peer(ctx, head, target, affinity_value))
}

fn peer<'c>(ctx: &RequestCtx<'c>, head: &Parts, target: SelectedTarget<'c>, affinity_value: Option<String>) -> Peer<'c> {
    // Made before `prepare` takes credentials the proxy consumed out of the head: a function
    // target sees the request as the client sent it.
    let script_context = ctx.route.has_target_functions().then(|| Box::new(ctx.script_context(head)));
    Peer { target, affinity_value, script_context }
}

fn no_target() -> Answer {
    text_response(StatusCode::BAD_GATEWAY, "no target for this request")
}
