//! HTTP/3 (RFC 9114) with the `h3` crate over quinn: the client side of the proxy (`server`: a
//! client's request streams into the shared pipeline) and the backend side (`client`: requests of
//! `backendProtocol: 'http3'` routes over pooled QUIC connections). Both read message bodies the
//! same way (`MessageBody`): as they arrive, checked against their `Content-Length`.

pub mod client;
pub mod guard;
pub mod server;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use h3::error::{Code, StreamError};
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};

use crate::http::body::BoxError;
use crate::http::io::ClientCounters;

/// The receiving half of a request stream, on either side (h3 gives the two sides separate types
/// with the same methods).
pub trait RecvHalf: Send + Unpin {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamError>>;
    fn poll_trailers(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<HeaderMap>, StreamError>>;
    fn stop_sending(&mut self, code: Code);
}

impl RecvHalf for server::RecvStream {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamError>> {
        self.poll_recv_data(cx).map_ok(|data| data.map(|mut data| data.copy_to_bytes(data.remaining())))
    }

    fn poll_trailers(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<HeaderMap>, StreamError>> {
        self.poll_recv_trailers(cx)
    }

    fn stop_sending(&mut self, code: Code) {
        h3::server::RequestStream::stop_sending(self, code);
    }
}

impl RecvHalf for client::RecvStream {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamError>> {
        self.poll_recv_data(cx).map_ok(|data| data.map(|mut data| data.copy_to_bytes(data.remaining())))
    }

    fn poll_trailers(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<HeaderMap>, StreamError>> {
        self.poll_recv_trailers(cx)
    }

    fn stop_sending(&mut self, code: Code) {
        h3::client::RequestStream::stop_sending(self, code);
    }
}

/// A message's body off its stream. The bytes must add up to its `Content-Length` when it has
/// one (RFC 9114 §4.1.2: otherwise the message is malformed), so what the other side receives is
/// framed as the sender said.
///
/// h3 reports a zero-length DATA frame as the end of the data; a body that goes on after one is a
/// frame error of the connection (the peer's own), never a shorter body passed on as whole.
pub struct MessageBody<S> {
    stream: S,
    /// Data read before the body was handed on.
    first: Option<Bytes>,
    expected: Option<u64>,
    received: u64,
    phase: Phase,
    /// The client side's: each piece of data is a sign of life for its connection's watchdog.
    counters: Option<Arc<ClientCounters>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Data,
    Trailers,
    Done,
}

impl<S: RecvHalf> MessageBody<S> {
    pub fn new(stream: S, expected: Option<u64>, counters: Option<Arc<ClientCounters>>) -> Self {
        MessageBody { stream, first: None, expected, received: 0, phase: Phase::Data, counters }
    }

    /// With data already read off the stream, handed on first (and counted against `expected`).
    pub fn with_first(mut self, first: Bytes) -> Result<Self, BoxError> {
        self.count(first.len())?;
        self.first = Some(first);
        Ok(self)
    }

    fn count(&mut self, n: usize) -> Result<(), BoxError> {
        self.received += n as u64;
        match self.expected {
            Some(expected) if self.received > expected => Err("the body is longer than its Content-Length".into()),
            _ => Ok(()),
        }
    }
}

impl<S: RecvHalf> Body for MessageBody<S> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        loop {
            match this.phase {
                Phase::Data => match this.stream.poll_data(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(err)) => {
                        this.phase = Phase::Done;
                        return Poll::Ready(Some(Err(err.into())));
                    }
                    Poll::Ready(Ok(Some(data))) => {
                        if let Err(err) = this.count(data.len()) {
                            this.phase = Phase::Done;
                            this.stream.stop_sending(Code::H3_MESSAGE_ERROR);
                            return Poll::Ready(Some(Err(err)));
                        }
                        if let Some(counters) = &this.counters {
                            counters.note_activity();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Poll::Ready(Ok(None)) => {
                        if this.expected.is_some_and(|expected| expected != this.received) {
                            this.phase = Phase::Done;
                            return Poll::Ready(Some(Err("the body is shorter than its Content-Length".into())));
                        }
                        this.phase = Phase::Trailers;
                    }
                },
                Phase::Trailers => {
                    let polled = this.stream.poll_trailers(cx);
                    if polled.is_pending() {
                        return Poll::Pending;
                    }
                    this.phase = Phase::Done;
                    return match polled {
                        Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                        Poll::Ready(Ok(None)) => Poll::Ready(None),
                        Poll::Ready(Err(err)) => Poll::Ready(Some(Err(err.into()))),
                        Poll::Pending => Poll::Pending,
                    };
                }
                Phase::Done => return Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.phase == Phase::Done && self.first.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.expected {
            // What is left to yield: the expected bytes less those handed on (`first` is counted
            // but not yet handed on).
            Some(expected) => SizeHint::with_exact(expected - (self.received - self.first.as_ref().map_or(0, |f| f.len() as u64))),
            None => SizeHint::default(),
        }
    }
}
