//! Body plumbing shared by the server and the upstream side: the one boxed body type both speak,
//! short native responses (errors, redirects), and body wrappers that count bytes into route
//! metrics and report when a body has been fully delivered (what decides whether an upstream
//! connection may be pooled again).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, SizeHint};

use crate::metrics::ByteCounters;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

pub fn empty() -> ProxyBody {
    Empty::<Bytes>::new().map_err(|never| match never {}).boxed()
}

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

/// A short plain-text response the proxy writes itself (`502 Bad Gateway: <why>`).
pub fn text_response(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let body = format!("{} {}: {message}\n", status.as_u16(), status.canonical_reason().unwrap_or(""));
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// Counts data bytes into a route's counters and notes when the body has ended (end of stream
/// seen), so the owner of the connection knows the message was delivered whole: `ended()` for
/// whoever holds the body, `finished` for whoever handed it on.
pub struct TrackedBody<B> {
    inner: B,
    route_bytes: Option<(Arc<crate::metrics::RouteStats>, Direction)>,
    ended: bool,
    finished: Option<Arc<AtomicBool>>,
}

#[derive(Debug, Clone, Copy)]
pub enum Direction {
    /// Request body: counted as bytes in from the client.
    In,
    /// Response body: counted as bytes out to the client.
    Out,
}

impl<B> TrackedBody<B> {
    pub fn inner_mut(&mut self) -> &mut B {
        &mut self.inner
    }

    pub fn ended(&self) -> bool {
        self.ended
    }

    fn end(&mut self) {
        self.ended = true;
        if let Some(finished) = &self.finished {
            finished.store(true, Ordering::Release);
        }
    }
}

impl<B: Body> TrackedBody<B> {
    /// A body that is empty from the start is finished at once (nobody will poll it).
    pub fn new(inner: B, route_bytes: Option<(Arc<crate::metrics::RouteStats>, Direction)>, finished: Option<Arc<AtomicBool>>) -> Self {
        let mut body = TrackedBody { inner, route_bytes, ended: false, finished };
        if body.inner.is_end_stream() {
            body.end();
        }
        body
    }

    fn count(&self, n: usize) {
        if let Some((stats, direction)) = &self.route_bytes {
            let counters: &ByteCounters = &stats.bytes;
            match direction {
                Direction::In => counters.bytes_in.fetch_add(n as u64, Ordering::Relaxed),
                Direction::Out => counters.bytes_out.fetch_add(n as u64, Ordering::Relaxed),
            };
        }
    }
}

impl<B> Body for TrackedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.count(data.len());
                }
                if self.inner.is_end_stream() {
                    self.end();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(err.into()))),
            Poll::Ready(None) => {
                self.end();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A client's request body, as the pipeline reads it whichever protocol carried it.
pub enum ClientBody {
    Empty,
    /// Read off an HTTP/1.x connection by its own loop.
    H1(crate::http::h1::channel::RequestBody),
    /// An HTTP/2 stream's body.
    H2(crate::http::h2::server::RequestBody),
    /// An HTTP/3 stream's body (boxed: the stream is large, and most requests have none).
    H3(Box<crate::http::h3::MessageBody<crate::http::h3::server::RecvStream>>),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ClientBody::Empty => Poll::Ready(None),
            ClientBody::H1(body) => Pin::new(body).poll_frame(cx),
            ClientBody::H2(body) => Pin::new(body).poll_frame(cx),
            ClientBody::H3(body) => Pin::new(&mut **body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Empty => true,
            ClientBody::H1(body) => body.is_end_stream(),
            ClientBody::H2(body) => body.is_end_stream(),
            ClientBody::H3(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::H1(body) => body.size_hint(),
            ClientBody::H2(body) => body.size_hint(),
            ClientBody::H3(body) => body.size_hint(),
        }
    }
}

/// An upstream's response body: off our own HTTP/1.1 connection, or an HTTP/2 stream's.
pub enum UpstreamBody {
    H1(crate::http::h1::client::ResponseBody),
    H2(hyper::body::Incoming),
    H3(Box<crate::http::h3::client::ResponseBody>),
}

impl UpstreamBody {
    /// The HTTP/1.1 connection, once its exchange ended cleanly and it may carry another.
    pub fn take_reusable(&mut self) -> Option<crate::http::h1::client::Connection> {
        match self {
            UpstreamBody::H1(body) => body.take_reusable(),
            UpstreamBody::H2(_) | UpstreamBody::H3(_) => None,
        }
    }

    /// An HTTP/1.1 response's fields, while they are still kept in its head (`h1::fields`).
    pub fn take_raw_fields(&mut self) -> Option<Box<crate::http::h1::fields::RawFields>> {
        match self {
            UpstreamBody::H1(body) => body.take_raw_fields(),
            UpstreamBody::H2(_) | UpstreamBody::H3(_) => None,
        }
    }
}

/// Makes an upstream response's fields part of its `HeaderMap`, wherever they were kept: what
/// reads or changes them calls this first.
pub fn fields_in_map(response: &mut Response<UpstreamBody>) {
    if let Some(raw) = response.body_mut().take_raw_fields() {
        raw.merge_into(response.headers_mut());
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::H1(body) => Pin::new(body).poll_frame(cx),
            UpstreamBody::H2(body) => Pin::new(body).poll_frame(cx).map_err(BoxError::from),
            UpstreamBody::H3(body) => Pin::new(&mut **body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::H1(body) => body.is_end_stream(),
            UpstreamBody::H2(body) => body.is_end_stream(),
            UpstreamBody::H3(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::H1(body) => body.size_hint(),
            UpstreamBody::H2(body) => body.size_hint(),
            UpstreamBody::H3(body) => body.size_hint(),
        }
    }
}
