//! Serving one client's HTTP/3 connection (RFC 9114) with the `h3` crate over quinn. Each request
//! stream goes through the same pipeline as HTTP/1.1 and HTTP/2 (`pipeline::handle`): its body is
//! read as it arrives (and checked against its `Content-Length`), and the response streams back
//! under QUIC's flow control. The connection runs under the same watchdog as the TCP ones
//! (keep-alive and idle timeouts, lifetime, drain on stop), with a request's headers bounded by
//! `headerTimeout` and `maxHeaderSize` and its streams by `http2MaxConcurrentStreams`.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use h3::error::Code;
use http::{HeaderMap, Request, Response};
use http_body_util::BodyExt;
use tokio::task::JoinSet;

use super::guard::{Guarded, GuardedConnection};
use super::MessageBody;
use crate::http::headers::content_length;
use crate::http::body::{BoxError, ClientBody};
use crate::http::io::ClientCounters;
use crate::http::pipeline::{handle, ConnectionContext, HeadChecked};
use crate::http::server::{watched, HttpLimits, Shutdown};
use crate::http::watchdog::Watch;
use crate::metrics::{GaugeHold, TerminationReason};

pub type RecvStream = h3::server::RequestStream<Guarded<h3_quinn::RecvStream>, Bytes>;
type SendStream = h3::server::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;
type Resolver = h3::server::RequestResolver<GuardedConnection, Bytes>;

/// Serves the connection's requests until the client closes it, the watchdog ends it, or a stop
/// drains it (a GOAWAY, then the requests in flight finish).
pub async fn serve(connection: quinn::Connection, counters: Arc<ClientCounters>, ctx: Arc<ConnectionContext>, limits: HttpLimits, shutdown: Shutdown<'_>) -> TerminationReason {
    let _active = GaugeHold::enter(ctx.env.metrics.clone(), |m| &m.active_http);
    let watch = Watch {
        draining: shutdown.draining,
        force_close: shutdown.force_close,
        counters: counters.clone(),
        idle_timeout: limits.idle_timeout,
        keep_alive_timeout: limits.keep_alive_timeout,
        header_timeout: limits.header_timeout,
        deadline: limits.deadline,
    };
    let serving = std::pin::pin!(serve_requests(connection.clone(), counters, ctx, limits, shutdown.draining));
    // Draining is the serving loop's own business: a GOAWAY, then the streams it covers finish.
    let reason = watched(serving, &watch, |_| false).await.unwrap_or_else(|reason| reason);
    // Dropping the h3 connection closed it already (H3_NO_ERROR); this also ends one the watchdog
    // left.
    connection.close(quinn::VarInt::from_u32(0x100), b"");
    reason
}

async fn serve_requests(
    connection: quinn::Connection,
    counters: Arc<ClientCounters>,
    ctx: Arc<ConnectionContext>,
    limits: HttpLimits,
    draining: &tokio_util::sync::CancellationToken,
) -> TerminationReason {
    let mut builder = h3::server::builder();
    builder.max_field_section_size(limits.max_header_size as u64);
    let mut h3 = match tokio::time::timeout(limits.header_timeout, builder.build::<_, Bytes>(GuardedConnection::new(h3_quinn::Connection::new(connection.clone()), limits.max_header_size))).await {
        Ok(Ok(h3)) => h3,
        Ok(Err(err)) => {
            tracing::debug!(error = %err, "HTTP/3 connection failed to start");
            return TerminationReason::ClientError;
        }
        Err(_) => return TerminationReason::HeadTimeout,
    };
    // Each request runs in a task of its own, as HTTP/2 streams do; dropping the set (the
    // watchdog ended the connection) ends them.
    let mut requests = JoinSet::new();
    let mut goaway_sent = false;
    let reason = loop {
        if goaway_sent && requests.is_empty() {
            break TerminationReason::Completed;
        }
        let accepted = tokio::select! {
            biased;
            _ = draining.cancelled(), if !goaway_sent => {
                goaway_sent = true;
                // The GOAWAY covers every stream accepted so far (its id is the next one): those
                // finish, and the client sends the rest elsewhere.
                if h3.shutdown(1).await.is_err() {
                    break TerminationReason::Completed;
                }
                continue;
            }
            Some(_) = requests.join_next(), if !requests.is_empty() => continue,
            accepted = h3.accept() => accepted,
        };
        match accepted {
            Ok(Some(resolver)) => {
                requests.spawn(serve_request(resolver, ctx.clone(), counters.clone(), limits.header_timeout));
            }
            Ok(None) => break TerminationReason::Completed,
            Err(err) if err.is_h3_no_error() => break TerminationReason::Completed,
            Err(err) => {
                tracing::debug!(error = %err, "HTTP/3 connection ended with an error");
                // Nothing can reach the client any more: its requests stop waiting upstream.
                requests.abort_all();
                break TerminationReason::ClientError;
            }
        }
    };
    while requests.join_next().await.is_some() {}
    if goaway_sent {
        // The last answers may still be on their way, and a close (dropping `h3` is one) drops
        // what the client has not acknowledged: it closes once it has them, or they had time to
        // arrive. The watchdog still ends this at a forced close.
        let _ = tokio::time::timeout(DRAINED_LINGER, connection.closed()).await;
    }
    reason
}

/// How long a drained connection stays open after its last answer, unless the client closes it.
const DRAINED_LINGER: Duration = Duration::from_secs(1);

/// One request stream: its headers (within `headerTimeout`), the pipeline, and the response.
async fn serve_request(resolver: Resolver, ctx: Arc<ConnectionContext>, counters: Arc<ClientCounters>, header_timeout: Duration) {
    // A malformed or oversized header section is answered by h3 itself (400 or 431).
    let (request, stream) = match tokio::time::timeout(header_timeout, resolver.resolve_request()).await {
        Ok(Ok(resolved)) => resolved,
        Ok(Err(err)) => {
            tracing::debug!(error = %err, "HTTP/3 request refused");
            return;
        }
        Err(_) => return,
    };
    // A request's headers are a sign of life; an empty stream opened now and then is not.
    counters.note_activity();
    let (mut send, recv) = stream.split();
    let (parts, ()) = request.into_parts();
    let head_only = parts.method == http::Method::HEAD;
    let body = match request_body(recv, &parts.headers, counters.clone()) {
        Ok(body) => body,
        Err(reason) => {
            tracing::debug!(reason, "HTTP/3 request refused");
            send.stop_stream(Code::H3_MESSAGE_ERROR);
            return;
        }
    };
    let Ok(answered) = handle(ctx, Request::from_parts(parts, body), HeadChecked::Nothing).await;
    let response = answered.into_response();
    if let Err(err) = write_response(&mut send, response, head_only, &counters).await {
        tracing::debug!(error = %err, "HTTP/3 response not delivered");
        send.stop_stream(Code::H3_INTERNAL_ERROR);
    }
}

/// `head_only`: the answer to a HEAD request, whose body (the proxy's own answers have one) is not
/// sent.
async fn write_response(send: &mut SendStream, response: Response<crate::http::body::ProxyBody>, head_only: bool, counters: &ClientCounters) -> Result<(), BoxError> {
    let (parts, mut body) = response.into_parts();
    send.send_response(Response::from_parts(parts, ())).await?;
    if head_only {
        drop(body);
        send.finish().await?;
        return Ok(());
    }
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        counters.note_activity();
        match frame.into_data() {
            Ok(data) => {
                if !data.is_empty() {
                    send.send_data(data).await?;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    send.send_trailers(trailers).await?;
                }
            }
        }
    }
    send.finish().await?;
    Ok(())
}

/// The body of a request with these headers; a stream the client already finished (most
/// requests without a body arrive so) is an empty body, which no upstream sees framed.
fn request_body(mut stream: RecvStream, headers: &HeaderMap, counters: Arc<ClientCounters>) -> Result<ClientBody, &'static str> {
    let expected = content_length(headers)?;
    if expected == Some(0) {
        return Ok(ClientBody::Empty);
    }
    // One look without waiting: a stream whose end came with its headers has no body.
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    let first = match stream.poll_recv_data(&mut cx) {
        Poll::Ready(Ok(None)) if expected.is_none() => return Ok(ClientBody::Empty),
        Poll::Ready(Ok(Some(mut data))) => Some(data.copy_to_bytes(data.remaining())),
        // The stream ended early, or failed: the first poll of the body reports it.
        _ => None,
    };
    let mut body = MessageBody::new(stream, expected, Some(counters));
    if let Some(first) = first {
        body = body.with_first(first).map_err(|_| "the body is longer than its Content-Length")?;
    }
    Ok(ClientBody::H3(Box::new(body)))
}
