//! Phase 3, prepare the upstream request: what the proxy consumed comes out of the head (checked
//! credentials), the upstream protocol is chosen (HTTP/1.1 for an upgrade), the path the backend
//! gets is fixed, and the body is either kept whole for a retry or streamed through once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::header;
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{Method, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Body;

use super::{Answer, RequestCtx};
use crate::config::BackendProtocol;
use crate::http::body::{text_response, ClientBody, ProxyBody};
use crate::http::h1::server::PendingUpgrade;
use crate::http::pool::UpstreamProtocol;
use crate::routing::table::DEFAULT_RESPONSE_TIMEOUT;

/// Largest request body kept whole so that a retry after sending can repeat it.
const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// The upstream request, apart from its head, as every attempt sends it.
pub(super) struct Outbound {
    /// A WebSocket upgrade the route allows: the upstream connection speaks HTTP/1.1 and keeps
    /// `Upgrade` and `Connection: upgrade`.
    pub wants_upgrade: bool,
    /// The client's side of that upgrade, completed once the upstream answers 101.
    pub client_upgrade: Option<PendingUpgrade>,
    pub protocol: UpstreamProtocol,
    /// The path and query the backend gets: as sent, unless the route forwards the normalised path.
    pub path_and_query: PathAndQuery,
    pub body: RequestBody,
    pub idempotent: bool,
    /// The body is small enough to keep whole, and the route may repeat a request after sending
    /// it: `read_whole` is to read it before the first attempt.
    pub keep_whole: bool,
    /// The request body's bytes received from the client, counted for the access log.
    pub received_bytes: Option<Arc<AtomicU64>>,
}

pub(super) fn prepare(ctx: &RequestCtx<'_>, head: &mut Parts, incoming: ClientBody, count_body: bool) -> Outbound {
    let route = ctx.route;
    // Credentials the proxy checked are its own, unless the route says to pass them on.
    let consumed_credentials = ctx.admitted.as_ref().is_some_and(|a| a.authenticated)
        && !route.http_security.as_ref().is_some_and(|s| s.forward_authorization);
    if consumed_credentials {
        head.headers.remove(header::AUTHORIZATION);
    }
    let wants_upgrade = head.version == Version::HTTP_11 && route.http.websocket && is_upgrade_request(head);
    let client_upgrade = if wants_upgrade { head.extensions.remove::<PendingUpgrade>() } else { None };
    let protocol = match route.http.backend_protocol {
        _ if wants_upgrade => UpstreamProtocol::Http1,
        BackendProtocol::Http2 => UpstreamProtocol::Http2,
        BackendProtocol::Http1 => UpstreamProtocol::Http1,
        BackendProtocol::Auto => UpstreamProtocol::Auto,
        BackendProtocol::Http3 => UpstreamProtocol::Http3,
    };
    let sent_path = || head.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    let path_and_query = match (&ctx.normalised_path, route.http.normalize_path) {
        (Some(normal), true) => {
            let normalised = if ctx.query().is_empty() { normal.clone() } else { format!("{normal}?{}", ctx.query()) };
            // The normalised path is made of what a path may hold; kept as sent should it not parse.
            PathAndQuery::from_maybe_shared(Bytes::from(normalised)).unwrap_or_else(|_| sent_path())
        }
        _ => sent_path(),
    };
    let idempotent = is_idempotent(&head.method);
    let mut received_bytes = None;
    let (body, keep_whole) = if incoming.is_end_stream() {
        (RequestBody::Empty, false)
    } else {
        let keep_whole = route.http.retry.replays_after_send() && idempotent && incoming.size_hint().upper().is_some_and(|n| n <= MAX_REPLAY_BODY);
        received_bytes = count_body.then(|| Arc::new(AtomicU64::new(0)));
        (RequestBody::Streaming(Some(incoming), Arc::new(AtomicBool::new(false)), received_bytes.clone()), keep_whole)
    };
    Outbound { wants_upgrade, client_upgrade, protocol, path_and_query, body, idempotent, keep_whole, received_bytes }
}

/// Reads a body `prepare` chose to keep whole, so that a retry after sending can send it again.
pub(super) async fn read_whole(ctx: &RequestCtx<'_>, outbound: &mut Outbound) -> Result<(), Answer> {
    let RequestBody::Streaming(Some(incoming), _, _) = std::mem::replace(&mut outbound.body, RequestBody::Empty) else {
        return Ok(());
    };
    let collected = tokio::time::timeout(DEFAULT_RESPONSE_TIMEOUT, http_body_util::Limited::new(incoming, MAX_REPLAY_BODY as usize).collect()).await;
    match collected {
        Ok(Ok(collected)) => {
            let bytes = collected.to_bytes();
            ctx.route.stats.bytes.bytes_in.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            if let Some(received) = &outbound.received_bytes {
                received.store(bytes.len() as u64, Ordering::Relaxed);
            }
            outbound.body = RequestBody::Buffered(bytes);
            Ok(())
        }
        _ => Err(text_response(StatusCode::BAD_REQUEST, "the request body could not be read")),
    }
}

/// The client's request body across attempts.
pub(super) enum RequestBody {
    Empty,
    /// Read whole before the first attempt: every attempt sends a copy.
    Buffered(Bytes),
    /// Streamed through once; after the first attempt took it, nothing can be repeated. The flag
    /// is raised when the client's own framing of it failed (a bad chunk): the client's fault.
    /// Its bytes are counted into the last field for the access log.
    Streaming(Option<ClientBody>, Arc<AtomicBool>, Option<Arc<AtomicU64>>),
}

impl RequestBody {
    pub fn for_attempt(&mut self) -> Option<ProxyBody> {
        match self {
            RequestBody::Empty => Some(crate::http::body::empty()),
            RequestBody::Buffered(bytes) => Some(crate::http::body::full(bytes.clone())),
            RequestBody::Streaming(slot, failed, received) => {
                let failed = failed.clone();
                let received = received.clone();
                slot.take().map(|incoming| {
                    let body = incoming.map_err(move |err| {
                        failed.store(true, Ordering::Release);
                        err
                    });
                    match received {
                        None => body.boxed(),
                        Some(received) => body
                            .map_frame(move |frame| {
                                if let Some(data) = frame.data_ref() {
                                    received.fetch_add(data.len() as u64, Ordering::Relaxed);
                                }
                                frame
                            })
                            .boxed(),
                    }
                })
            }
        }
    }

    /// The client broke its own body's framing: answered 400, not blamed on the upstream.
    pub fn client_failed(&self) -> bool {
        matches!(self, RequestBody::Streaming(_, failed, _) if failed.load(Ordering::Acquire))
    }

    pub fn replayable(&self) -> bool {
        !matches!(self, RequestBody::Streaming(..))
    }
}

fn is_upgrade_request(head: &Parts) -> bool {
    crate::http::headers::connection_has(&head.headers, "upgrade") && head.headers.contains_key(header::UPGRADE)
}

fn is_idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE)
}
