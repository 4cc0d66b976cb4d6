//! Serving one client's HTTP/2 connection with the `h2` crate. The connection's streams run inside
//! its own task, beside the codec that drives its socket, as an HTTP/1.x connection's requests do:
//! a stream is the pipeline's future for its request, then its response written back under flow
//! control. So a request costs no task, no channel and no body adapter, and a stream's upstream
//! exchange wakes the one task that also writes its answer.
//!
//! The codec enforces the protocol: malformed requests and connection-specific headers are reset
//! (RFC 9113 §8.1.1, §8.2.2), `Content-Length` is held to the DATA received, streams past
//! `http2MaxConcurrentStreams` are refused, and a client that keeps resetting streams is sent away.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, Stream};
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::http::body::{BoxError, ClientBody, ProxyBody};
use crate::http::h1::write::with_http_date;
use crate::http::headers::{content_length, hop_index, strip_hop_by_hop};
use crate::http::pipeline::{handle_pooled, Answered, ConnectionContext, HeadChecked};
use crate::pooled_future::PooledFuture;
use crate::http::server::{watched, HttpLimits};
use crate::http::watchdog::Watch;
use crate::metrics::TerminationReason;
use crate::write_batch::Batched;

/// Flow-control windows, frame size and send buffer: the defaults of hyper's HTTP/2 server, which
/// served these connections before (the spec's default windows would throttle uploads).
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 1024 * 1024;
const MAX_FRAME_SIZE: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 400 * 1024;
/// Streams this side may reset for a client's protocol errors before it ends the connection.
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// Serves the connection until the client closes it, the watchdog ends it, or a drain finishes it
/// (a GOAWAY, then the streams in flight complete). Err: the watchdog ended it.
pub async fn serve<S>(io: S, ctx: Arc<ConnectionContext>, limits: HttpLimits, watch: &Watch<'_>) -> Result<TerminationReason, TerminationReason>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_size as u32);
    let graceful = AtomicBool::new(false);
    let serving = std::pin::pin!(async {
        let mut connection = builder.handshake::<_, Bytes>(Batched::new(io)).await?;
        let mut streams = FuturesUnordered::new();
        std::future::poll_fn(|cx| {
            if graceful.swap(false, Ordering::Relaxed) {
                connection.graceful_shutdown();
            }
            loop {
                // The codec: it reads frames, writes what the streams queued, and hands over new
                // streams. It ends once the client has gone, or a drain's last stream is done.
                let mut accepted = false;
                loop {
                    match connection.poll_accept(cx) {
                        Poll::Ready(Some(Ok((request, mut respond)))) => {
                            // The pipeline's future is made in a block of its own first: the
                            // stream's future, moved into the set, holds a pointer to it.
                            let head_only = request.method() == Method::HEAD;
                            match start_pipeline(&ctx, request) {
                                Ok(pipeline) => streams.push(serve_stream(pipeline, respond, head_only)),
                                Err(reason) => {
                                    tracing::debug!(reason, "HTTP/2 request refused");
                                    respond.send_reset(Reason::PROTOCOL_ERROR);
                                }
                            }
                            accepted = true;
                        }
                        Poll::Ready(Some(Err(err))) => return Poll::Ready(Err(err)),
                        Poll::Ready(None) => return Poll::Ready(Ok(())),
                        Poll::Pending => break,
                    }
                }
                // Then the streams that can move. Once new ones started or some finished, the
                // codec goes again at once: what they wrote goes out in one write, and a
                // draining connection may be done.
                let mut finished = false;
                while let Poll::Ready(Some(())) = Pin::new(&mut streams).poll_next(cx) {
                    finished = true;
                }
                if !accepted && !finished {
                    return Poll::Pending;
                }
            }
        })
        .await
    });
    watched(serving, watch, |_| {
        graceful.store(true, Ordering::Relaxed);
        false
    })
    .await
    .map(|served: Result<(), h2::Error>| match served {
        Ok(()) => TerminationReason::Completed,
        Err(err) => {
            tracing::debug!(error = %err, "http/2 connection ended with an error");
            TerminationReason::ClientError
        }
    })
}

/// The pipeline's future for a stream's request, or why the request is malformed.
fn start_pipeline(ctx: &Arc<ConnectionContext>, request: Request<RecvStream>) -> Result<PooledFuture<Result<Answered, Infallible>>, &'static str> {
    let (parts, stream) = request.into_parts();
    let body = request_body(stream, &parts.headers)?;
    Ok(handle_pooled(ctx.clone(), Request::from_parts(parts, body), HeadChecked::Nothing))
}

/// One stream: the pipeline's answer to its request, unless the client resets the stream first
/// (the pipeline, with its upstream exchange, is dropped then), and that answer written back.
async fn serve_stream(mut pipeline: PooledFuture<Result<Answered, Infallible>>, mut respond: SendResponse<Bytes>, head_only: bool) {
    let answer = std::future::poll_fn(|cx| {
        if let Poll::Ready(Ok(answered)) = Pin::new(&mut pipeline).poll(cx) {
            return Poll::Ready(Some(answered.into_response()));
        }
        respond.poll_reset(cx).map(|_| None)
    })
    .await;
    drop(pipeline);
    let Some(response) = answer else { return };
    // The head is sent at once; only the body, if any, is waited on (so the stream's future
    // holds no response while it waits, and is moved cheaply when it starts).
    let sending = match start_response(&mut respond, response, head_only) {
        Ok(Some(sending)) => sending,
        Ok(None) => return,
        Err(err) => {
            tracing::debug!(error = %err, "HTTP/2 response not delivered");
            return;
        }
    };
    let (mut send, mut pump) = sending;
    if let Err(err) = std::future::poll_fn(|cx| pump.poll(&mut send, cx)).await {
        tracing::debug!(error = %err, "HTTP/2 response not delivered");
    }
}

/// The response's head; then the body and trailers that follow it, if any, for `BodyPump`.
/// `head_only`: the answer to a HEAD request, whose body (the proxy's own answers have one) is not
/// sent.
fn start_response(respond: &mut SendResponse<Bytes>, response: Response<ProxyBody>, head_only: bool) -> Result<Option<(SendStream<Bytes>, BodyPump)>, h2::Error> {
    let (mut head, body) = response.into_parts();
    // One pass over the names (a proxied response has been filtered already, and nearly always
    // has both a Date and a Content-Length): connection-specific headers are malformed in
    // HTTP/2, and the codec would refuse the whole head.
    let (mut has_date, mut has_length, mut connection_specific) = (false, false, false);
    for name in head.headers.keys() {
        has_date |= name == header::DATE;
        has_length |= name == header::CONTENT_LENGTH;
        connection_specific |= hop_index(name.as_str().as_bytes()).is_some();
    }
    if connection_specific {
        strip_hop_by_hop(&mut head.headers, false);
    }
    if !has_date {
        with_http_date(|date| {
            if let Ok(value) = HeaderValue::from_bytes(date) {
                head.headers.insert(header::DATE, value);
            }
        });
    }
    let end = head_only || body.is_end_stream();
    if !end && !has_length {
        if let Some(length) = body.size_hint().exact() {
            head.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        }
    }
    let send = match respond.send_response(Response::from_parts(head, ()), end) {
        Ok(send) => send,
        Err(err) => {
            respond.send_reset(Reason::INTERNAL_ERROR);
            return Err(err);
        }
    };
    Ok((!end).then(|| (send, BodyPump { body, waiting: None })))
}

/// A response body into its stream: each chunk waits for flow-control capacity before the next
/// is read, so a client that reads slowly slows the upstream down rather than filling memory.
struct BodyPump {
    body: ProxyBody,
    /// A chunk read from the body, and whether it was the last, waiting for capacity.
    waiting: Option<(Bytes, bool)>,
}

impl BodyPump {
    fn poll(&mut self, send: &mut SendStream<Bytes>, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            if let Some((chunk, last)) = self.waiting.take() {
                while send.capacity() == 0 {
                    match send.poll_capacity(cx) {
                        Poll::Pending => {
                            self.waiting = Some((chunk, last));
                            return pending_unless_reset(send, cx);
                        }
                        Poll::Ready(Some(Ok(_))) => {}
                        Poll::Ready(Some(Err(err))) => return Poll::Ready(Err(err.into())),
                        Poll::Ready(None) => return Poll::Ready(Err("the stream closed while its response was being sent".into())),
                    }
                }
                // The codec sends what the window allows and buffers the rest, counted against
                // the capacity asked for next.
                send.send_data(chunk, last)?;
                if last {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return pending_unless_reset(send, cx),
                Poll::Ready(None) => {
                    send.send_data(Bytes::new(), true)?;
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Some(Err(err))) => {
                    send.send_reset(Reason::INTERNAL_ERROR);
                    return Poll::Ready(Err(err));
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(chunk) => {
                        if self.body.is_end_stream() {
                            // Nothing follows, so nothing more is read while the codec sends it
                            // as the window allows (most responses are this one chunk).
                            send.send_data(chunk, true)?;
                            return Poll::Ready(Ok(()));
                        }
                        if chunk.is_empty() {
                            continue;
                        }
                        // A claim on the window only once a chunk is in hand: claimed ahead of
                        // the data, capacity would sit idle on a body that has nothing to send
                        // while other streams wait for it. The codec raises the claim to the
                        // chunk's length when it takes the chunk.
                        send.reserve_capacity(1);
                        self.waiting = Some((chunk, false));
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            send.reserve_capacity(0);
                            send.send_trailers(trailers)?;
                            return Poll::Ready(Ok(()));
                        }
                    }
                },
            }
        }
    }
}

/// Waiting for the body or for the window: a reset from the client ends the response instead
/// (and wakes this stream when it comes).
fn pending_unless_reset(send: &mut SendStream<Bytes>, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
    match send.poll_reset(cx) {
        Poll::Pending => Poll::Pending,
        Poll::Ready(Ok(reason)) => Poll::Ready(Err(format!("the client reset the stream ({reason})").into())),
        Poll::Ready(Err(err)) => Poll::Ready(Err(err.into())),
    }
}

/// The body of a request with these headers; a stream the client ended with its headers (most
/// requests without a body arrive so) is an empty body.
fn request_body(stream: RecvStream, headers: &HeaderMap) -> Result<ClientBody, &'static str> {
    // The codec has reset any request whose Content-Length is not a number, differs from another,
    // or is not zero on a stream that ended with its headers: only a body's length is read here.
    if stream.is_end_stream() {
        return Ok(ClientBody::Empty);
    }
    let length = content_length(headers)?;
    Ok(ClientBody::H2(RequestBody { stream, remaining: length, data_done: false }))
}

/// An HTTP/2 request's body as it arrives. Each DATA frame's bytes go back to the client's
/// flow-control window as they are handed on, so the window stays open only as fast as the
/// upstream takes the body.
pub struct RequestBody {
    stream: RecvStream,
    /// What `Content-Length` leaves to come (the codec holds the DATA to it).
    remaining: Option<u64>,
    data_done: bool,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if !this.data_done {
            match this.stream.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(data))) => {
                    // Fails only once the stream is gone, which the next poll reports.
                    let _ = this.stream.flow_control().release_capacity(data.len());
                    if let Some(remaining) = this.remaining.as_mut() {
                        *remaining = remaining.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(err))) => return Poll::Ready(Some(Err(err.into()))),
                Poll::Ready(None) => this.data_done = true,
            }
        }
        match this.stream.poll_trailers(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(err)) => Poll::Ready(Some(Err(err.into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.remaining.map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}
