//! Our HTTP/1.1 client side towards upstreams, driven by the request that uses it: no task and no
//! channel per upstream connection. The request head is written once from the pipeline's parts;
//! the body streams as the pipeline's body yields it while the response head is awaited (an early
//! response is taken as it comes) and, after it, from inside the response body, so a backend that
//! answers while it still reads gets the rest. The response head is parsed with httparse and its
//! framing checked (a response that frames its body twice is refused); the body is read to its
//! end, and only then can the connection go back to the pool.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Method, Response, StatusCode, Version};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, ReadBuf};

use crate::http::body::{BoxError, ProxyBody};
use crate::http::h1::decode::{BodyDecoder, Decoded};
use crate::http::h1::server::ClientStream;
use crate::http::h1::write::Output;
use crate::http::head::MAX_HEADERS;
use crate::http::headers::{wants_close, ForwardingHeaders};

/// A response head larger than this is refused (the upstream is not an attacker, but not
/// unbounded either).
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
const READ_SIZE: usize = 8 * 1024;
/// A body that keeps filling its reads gets larger ones, up to this: fewer system calls for
/// large responses, small buffers for small ones.
const MAX_BODY_READ: usize = 256 * 1024;

/// One upstream connection: its stream and what was read past the last response.
pub struct Connection {
    io: Box<dyn ClientStream>,
    buf: BytesMut,
}

/// The upstream connection of an answered upgrade (101), with the bytes read past its head.
pub struct UpgradedUpstream {
    pub io: Box<dyn ClientStream>,
    pub read_ahead: Bytes,
}

/// In the extensions of a 101 response: the upstream's side of the tunnel.
#[derive(Clone)]
pub struct PendingUpstreamUpgrade(std::sync::Arc<parking_lot::Mutex<Option<UpgradedUpstream>>>);

impl PendingUpstreamUpgrade {
    pub fn take(&self) -> Option<UpgradedUpstream> {
        self.0.lock().take()
    }
}

#[derive(Debug)]
pub enum ClientError {
    /// The connection failed or closed before any byte of a response: a request on a reused
    /// connection may be sent again on a new one.
    ClosedBeforeResponse(Option<io::Error>),
    Io(io::Error),
    /// The upstream closed in the middle of a response.
    Incomplete,
    Malformed(&'static str),
    /// The request body (the client's) failed.
    RequestBody(BoxError),
}

impl ClientError {
    /// Nothing of a response was seen: the upstream closed a connection it had kept idle.
    pub fn before_response(&self) -> bool {
        matches!(self, ClientError::ClosedBeforeResponse(_))
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::ClosedBeforeResponse(None) => f.write_str("the upstream closed the connection before a response"),
            ClientError::ClosedBeforeResponse(Some(err)) => write!(f, "the upstream connection failed before a response: {err}"),
            ClientError::Io(err) => write!(f, "upstream connection failed: {err}"),
            ClientError::Incomplete => f.write_str("the upstream closed the connection in the middle of a response"),
            ClientError::Malformed(why) => write!(f, "malformed upstream response: {why}"),
            ClientError::RequestBody(err) => write!(f, "the request body failed: {err}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl Connection {
    pub fn new(io: Box<dyn ClientStream>) -> Self {
        Connection { io, buf: BytesMut::new() }
    }

    /// After sitting idle: the upstream neither closed it nor sent anything unasked.
    pub fn is_usable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        let mut read = ReadBuf::uninit(&mut probe);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        matches!(Pin::new(&mut self.io).poll_read(&mut cx, &mut read), Poll::Pending)
    }
}

/// Sends the request (`parts` with the `forwarding` headers after its own, `body`) on `conn` and
/// reads the response head. The response body owns the connection; the head stays the caller's,
/// to send again should the connection turn out closed before any response
/// (`ClientError::before_response`).
pub async fn send(mut conn: Connection, parts: &Parts, forwarding: &ForwardingHeaders, body: ProxyBody) -> Result<Response<ResponseBody>, ClientError> {
    let mut sending = RequestSend::new(parts, forwarding, body);
    let head_request = parts.method == Method::HEAD;
    let upgrade_request = parts.headers.contains_key(header::UPGRADE);
    let head = poll_fn(|cx| poll_response_head(cx, &mut conn, &mut sending)).await?;
    let ResponseHeadParts { status, version, reason, headers, close } = head;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        if !upgrade_request {
            return Err(ClientError::Malformed("101 without an upgrade request"));
        }
        let upgraded = UpgradedUpstream { read_ahead: conn.buf.split().freeze(), io: conn.io };
        let mut response = Response::new(ResponseBody::empty());
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        response.extensions_mut().insert(PendingUpstreamUpgrade(std::sync::Arc::new(parking_lot::Mutex::new(Some(upgraded)))));
        return Ok(response);
    }
    let decoder = if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        ResponseDecoder::Empty
    } else {
        response_framing(&headers)?
    };
    let reusable = !close && !matches!(decoder, ResponseDecoder::UntilClose);
    let mut response = Response::new(ResponseBody { conn: Some(conn), decoder, sending: Some(sending), reusable, done: false, read_size: READ_SIZE });
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = headers;
    if let Some(reason) = reason {
        response.extensions_mut().insert(reason);
    }
    response.body_mut().done = matches!(response.body().decoder, ResponseDecoder::Empty);
    Ok(response)
}

struct ResponseHeadParts {
    status: StatusCode,
    version: Version,
    reason: Option<hyper::ext::ReasonPhrase>,
    headers: HeaderMap,
    /// The upstream will close after this response.
    close: bool,
}

fn poll_response_head(cx: &mut Context<'_>, conn: &mut Connection, sending: &mut RequestSend) -> Poll<Result<ResponseHeadParts, ClientError>> {
    loop {
        let sent = sending.poll_send(cx, &mut conn.io)?;
        if !conn.buf.is_empty() {
            match parse_response_head(&mut conn.buf)? {
                // Interim responses (100, 102, 103) are not passed on.
                Some(head) if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS => continue,
                Some(head) => return Poll::Ready(Ok(head)),
                None => {}
            }
        }
        if conn.buf.capacity() - conn.buf.len() < 1024 {
            conn.buf.reserve(READ_SIZE);
        }
        let seen_any = !conn.buf.is_empty();
        match tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf) {
            Poll::Ready(Ok(0)) if seen_any => return Poll::Ready(Err(ClientError::Incomplete)),
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(sending.write_error.take().map_or(ClientError::ClosedBeforeResponse(None), |e| ClientError::ClosedBeforeResponse(Some(e))))),
            Poll::Ready(Ok(_)) => {}
            Poll::Ready(Err(err)) if seen_any => return Poll::Ready(Err(ClientError::Io(err))),
            Poll::Ready(Err(err)) => return Poll::Ready(Err(ClientError::ClosedBeforeResponse(Some(err)))),
            Poll::Pending if sent => {}
            Poll::Pending => return Poll::Pending,
        }
    }
}

fn parse_response_head(buf: &mut BytesMut) -> Result<Option<ResponseHeadParts>, ClientError> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut storage);
    let len = match response.parse(buf) {
        // The limit holds however the bytes were split into reads.
        Ok(httparse::Status::Complete(len)) if len > MAX_RESPONSE_HEAD => return Err(ClientError::Malformed("response head too large")),
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_HEAD => return Err(ClientError::Malformed("response head too large")),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(ClientError::Malformed("too many response header fields")),
        Err(_) => return Err(ClientError::Malformed("unreadable response head")),
    };
    let code = response.code.ok_or(ClientError::Malformed("no status"))?;
    let status = StatusCode::from_u16(code).map_err(|_| ClientError::Malformed("bad status"))?;
    let http10 = response.version == Some(0);
    let reason = response
        .reason
        .filter(|reason| !reason.is_empty() && Some(*reason) != status.canonical_reason())
        .and_then(|reason| hyper::ext::ReasonPhrase::try_from(reason.as_bytes().to_vec()).ok());
    // Values are slices of the head's own bytes (no copy per field): offsets first, then the head
    // is split off the buffer and shared.
    let base = buf.as_ptr() as usize;
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let count = response.headers.len();
    for (span, field) in spans.iter_mut().zip(response.headers.iter()) {
        let name = field.name.as_ptr() as usize - base;
        let value = field.value.as_ptr() as usize - base;
        // Within a head of at most MAX_RESPONSE_HEAD bytes: the offsets fit.
        *span = (name as u32, (name + field.name.len()) as u32, value as u32, (value + field.value.len()) as u32);
    }
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    for &(name_start, name_end, value_start, value_end) in &spans[..count] {
        let name = HeaderName::from_bytes(&head[name_start as usize..name_end as usize]).map_err(|_| ClientError::Malformed("bad header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(value_start as usize..value_end as usize)).map_err(|_| ClientError::Malformed("bad header value"))?;
        headers.append(name, value);
    }
    let version = if http10 { Version::HTTP_10 } else { Version::HTTP_11 };
    let close = wants_close(&headers, version);
    Ok(Some(ResponseHeadParts { status, version, reason, headers, close }))
}

/// RFC 9112 §6.3 for a response that has a body: chunked, a length, or until the close. A
/// response that gives both, or two lengths, is refused: its end is ambiguous.
fn response_framing(headers: &HeaderMap) -> Result<ResponseDecoder, ClientError> {
    let mut length: Option<u64> = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        let text = value.to_str().map_err(|_| ClientError::Malformed("bad Content-Length"))?;
        for item in text.split(',').map(str::trim) {
            if item.is_empty() || !item.bytes().all(|b| b.is_ascii_digit()) || item.len() > 19 {
                return Err(ClientError::Malformed("bad Content-Length"));
            }
            let n: u64 = item.parse().map_err(|_| ClientError::Malformed("bad Content-Length"))?;
            if length.is_some_and(|seen| seen != n) {
                return Err(ClientError::Malformed("Content-Length values differ"));
            }
            length = Some(n);
        }
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        if length.is_some() {
            return Err(ClientError::Malformed("both Content-Length and Transfer-Encoding"));
        }
        let last_is_chunked = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .is_some_and(|coding| coding.trim().eq_ignore_ascii_case("chunked"));
        return Ok(if last_is_chunked { ResponseDecoder::Body(BodyDecoder::chunked(MAX_RESPONSE_HEAD)) } else { ResponseDecoder::UntilClose });
    }
    Ok(match length {
        Some(n) => ResponseDecoder::Body(BodyDecoder::length(n)),
        None => ResponseDecoder::UntilClose,
    })
}

/// How the request body goes out: framed as its head says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestFraming {
    Length,
    Chunked,
}

/// The request on its way upstream: the head, then the body's frames as they come.
struct RequestSend {
    out: Output,
    body: Option<ProxyBody>,
    framing: RequestFraming,
    /// The body ended and everything was written.
    complete: bool,
    /// Writing failed: the upstream may still have answered (an early response before a close).
    write_error: Option<io::Error>,
}

impl RequestSend {
    fn new(parts: &Parts, forwarding: &ForwardingHeaders, body: ProxyBody) -> Self {
        let mut out = Output::default();
        let empty = body.is_end_stream();
        let exact = body.size_hint().exact();
        let framing = if empty || exact.is_some() { RequestFraming::Length } else { RequestFraming::Chunked };
        let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let size = parts.headers.iter().chain(forwarding.iter()).map(|(name, value)| name.as_str().len() + value.len() + 4).sum::<usize>();
        out.reserve(parts.method.as_str().len() + path.len() + size + 64);
        out.put_slice(parts.method.as_str().as_bytes());
        out.put_slice(b" ");
        out.put_slice(path.as_bytes());
        out.put_slice(b" HTTP/1.1\r\n");
        let mut has_length = false;
        for (name, value) in &parts.headers {
            if name == header::TRANSFER_ENCODING {
                continue;
            }
            if name == header::CONTENT_LENGTH {
                if framing == RequestFraming::Chunked || has_length {
                    continue;
                }
                has_length = true;
            }
            out.put_slice(name.as_str().as_bytes());
            out.put_slice(b": ");
            out.put_slice(value.as_bytes());
            out.put_slice(b"\r\n");
        }
        for (name, value) in forwarding.iter() {
            out.put_slice(name.as_str().as_bytes());
            out.put_slice(b": ");
            out.put_slice(value.as_bytes());
            out.put_slice(b"\r\n");
        }
        match framing {
            RequestFraming::Chunked => out.put_slice(b"transfer-encoding: chunked\r\n"),
            RequestFraming::Length if !has_length => {
                let n = exact.unwrap_or(0);
                // An empty body is announced only where a body is expected.
                if n > 0 || matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
                    out.put_content_length(n);
                }
            }
            RequestFraming::Length => {}
        }
        out.put_slice(b"\r\n");
        RequestSend { out, body: (!empty).then_some(body), framing, complete: false, write_error: None }
    }

    /// Writes what is queued and pulls the body's next frames. Ok(true) when something moved.
    /// A write failure stops the sending (the upstream may have answered already); a failed
    /// request body is the request's error.
    fn poll_send(&mut self, cx: &mut Context<'_>, io: &mut Box<dyn ClientStream>) -> Result<bool, ClientError> {
        if self.complete || self.write_error.is_some() {
            return Ok(false);
        }
        let mut progressed = false;
        loop {
            if !self.out.is_empty() {
                match self.out.poll_write_all(cx, io) {
                    Poll::Ready(Ok(())) => progressed = true,
                    Poll::Ready(Err(err)) => {
                        self.write_error = Some(err);
                        self.body = None;
                        return Ok(true);
                    }
                    Poll::Pending => return Ok(progressed),
                }
            }
            let Some(body) = self.body.as_mut() else {
                self.complete = true;
                return Ok(true);
            };
            match Pin::new(body).poll_frame(cx) {
                Poll::Pending => return Ok(progressed),
                Poll::Ready(None) => {
                    if self.framing == RequestFraming::Chunked {
                        self.out.put_last_chunk();
                    }
                    self.body = None;
                }
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        match self.framing {
                            RequestFraming::Chunked => self.out.put_chunk(data),
                            RequestFraming::Length => self.out.put_bytes(data),
                        }
                    }
                }
                Poll::Ready(Some(Err(err))) => return Err(ClientError::RequestBody(err)),
            }
            progressed = true;
        }
    }
}

enum ResponseDecoder {
    Empty,
    Body(BodyDecoder),
    /// No length: the body ends when the upstream closes (the connection is not reused).
    UntilClose,
}

/// A response body read off its upstream connection; it also finishes sending the request body.
pub struct ResponseBody {
    conn: Option<Connection>,
    decoder: ResponseDecoder,
    sending: Option<RequestSend>,
    reusable: bool,
    done: bool,
    /// The next read's size (grows while reads come back full).
    read_size: usize,
}

impl ResponseBody {
    fn empty() -> Self {
        ResponseBody { conn: None, decoder: ResponseDecoder::Empty, sending: None, reusable: false, done: true, read_size: READ_SIZE }
    }

    /// The connection, when the exchange ended cleanly on both sides and it may carry another.
    pub fn take_reusable(&mut self) -> Option<Connection> {
        let sent = self.sending.as_ref().is_none_or(|s| s.complete);
        if !(self.finished() && self.reusable && sent) {
            return None;
        }
        let mut conn = self.conn.take().filter(|conn| conn.buf.is_empty())?;
        // An idle pooled connection holds no buffer: the next response's first read makes one.
        conn.buf = BytesMut::new();
        Some(conn)
    }
}

impl ResponseBody {
    /// Every byte of the body was read (a counted body may not have been polled for its end).
    fn finished(&self) -> bool {
        self.done || matches!(&self.decoder, ResponseDecoder::Body(decoder) if decoder.remaining() == Some(0))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        let Some(conn) = this.conn.as_mut() else {
            this.done = true;
            return Poll::Ready(None);
        };
        if let Some(sending) = this.sending.as_mut() {
            if let Err(err) = sending.poll_send(cx, &mut conn.io) {
                // The response is already under way; the request cannot be finished.
                tracing::debug!(error = %err, "request body failed after the response began");
                this.reusable = false;
                this.sending = None;
            }
        }
        loop {
            let decoded = match &mut this.decoder {
                ResponseDecoder::Empty => Ok(Some(Decoded::End(None))),
                ResponseDecoder::Body(decoder) => decoder.decode(&mut conn.buf),
                ResponseDecoder::UntilClose if conn.buf.is_empty() => Ok(None),
                ResponseDecoder::UntilClose => Ok(Some(Decoded::Data(conn.buf.split().freeze()))),
            };
            match decoded {
                Ok(Some(Decoded::Data(data))) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Some(Decoded::End(trailers))) => {
                    this.done = true;
                    return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
                }
                Err(err) => {
                    this.done = true;
                    this.reusable = false;
                    return Poll::Ready(Some(Err(Box::new(err))));
                }
                Ok(None) => {}
            }
            if conn.buf.capacity() - conn.buf.len() < 1024 {
                conn.buf.reserve(this.read_size);
            }
            let room = conn.buf.capacity() - conn.buf.len();
            match std::task::ready!(tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf)) {
                Ok(n) if n == room => this.read_size = (this.read_size * 2).min(MAX_BODY_READ),
                Ok(0) if matches!(this.decoder, ResponseDecoder::UntilClose) => {
                    this.done = true;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.done = true;
                    this.reusable = false;
                    return Poll::Ready(Some(Err(Box::new(ClientError::Incomplete))));
                }
                Ok(_) => {}
                Err(err) => {
                    this.done = true;
                    this.reusable = false;
                    return Poll::Ready(Some(Err(Box::new(ClientError::Io(err)))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.decoder {
            ResponseDecoder::Empty => SizeHint::with_exact(0),
            ResponseDecoder::Body(decoder) => decoder.remaining().map_or_else(SizeHint::default, SizeHint::with_exact),
            ResponseDecoder::UntilClose => SizeHint::default(),
        }
    }
}
