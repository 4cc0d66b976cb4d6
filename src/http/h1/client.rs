//! Our HTTP/1.1 client side towards upstreams, driven by the request that uses it: no task and no
//! channel per upstream connection. The request head is written once from the pipeline's parts;
//! the body streams as the pipeline's body yields it while the response head is awaited (an early
//! response is taken as it comes) and, after it, from inside the response body, so a backend that
//! answers while it still reads gets the rest. The response head is parsed with httparse and its
//! framing checked (a response that frames its body twice is refused); the body is read to its
//! end, and only then can the connection go back to the pool.

use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName};

use crate::http::h1::fields::{FieldSpans, RawFields};
use http::request::Parts;
use http::{HeaderMap, Method, Response, StatusCode, Version};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, ReadBuf};

use crate::http::body::{BoxError, ProxyBody};
use crate::http::h1::decode::{BodyDecoder, Decoded};
use crate::http::h1::server::ClientStream;
use crate::http::h1::write::Output;
use crate::http::head::MAX_HEADERS;
use crate::http::headers::{hop_index, list_items, names_another_field, ForwardingHeaders, CONNECTION_HOP, TRANSFER_ENCODING_HOP};
use crate::http::read_buffer::{ReadBuffer, READ_ROOM};

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
    buf: ReadBuffer,
    /// The response timeout, one timer for the connection's life: each request moves its deadline
    /// later, which the timer wheel takes without a lock; a timer made and dropped per request
    /// went through the wheel's lock twice.
    response_timer: Option<Pin<Box<tokio::time::Sleep>>>,
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
    /// No response head within the response timeout.
    TimedOut,
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
            ClientError::TimedOut => f.write_str("the upstream sent no response in time"),
        }
    }
}

impl std::error::Error for ClientError {}

impl Connection {
    pub fn new(io: Box<dyn ClientStream>) -> Self {
        Connection { io, buf: ReadBuffer::new(), response_timer: None }
    }

    /// After sitting idle: the upstream neither closed it nor sent anything unasked.
    pub fn is_usable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        if let Some(tcp) = (*self.io).as_tcp() {
            // What the runtime saw of the socket since the last read (a close, unasked bytes),
            // without registering to hear of more: the probe below learns the same, dearer.
            let mut probe = [0u8; 1];
            return matches!(tcp.try_read(&mut probe), Err(err) if err.kind() == io::ErrorKind::WouldBlock);
        }
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        let mut read = ReadBuf::uninit(&mut probe);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        matches!(Pin::new(&mut self.io).poll_read(&mut cx, &mut read), Poll::Pending)
    }
}

/// Sends the request (`parts` with the `forwarding` headers after its own, `body`) on `conn` and
/// reads the response head. `host` (a host the edge rules checked: nothing but host bytes) is
/// written as `Host` when `parts` has none. The response body owns the connection; the head stays the caller's,
/// to send again should the connection turn out closed before any response
/// (`ClientError::before_response`).
pub async fn send(mut conn: Connection, parts: &Parts, forwarding: &ForwardingHeaders, host: Option<&str>, body: ProxyBody, timeout: std::time::Duration) -> Result<Response<ResponseBody>, ClientError> {
    let mut sending = RequestSend::new(parts, forwarding, host, body);
    let head_request = parts.method == Method::HEAD;
    let upgrade_request = parts.headers.contains_key(header::UPGRADE);
    let now = tokio::time::Instant::now();
    // A timeout too long to add is no timeout (a deadline decades away, as tokio's own).
    let deadline = now.checked_add(timeout).unwrap_or_else(|| now + std::time::Duration::from_secs(86_400 * 365 * 30));
    match conn.response_timer.as_mut() {
        Some(timer) => timer.as_mut().reset(deadline),
        None => conn.response_timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
    }
    let head = poll_fn(|cx| {
        if let Poll::Ready(head) = poll_response_head(cx, &mut conn, &mut sending) {
            return Poll::Ready(head);
        }
        match conn.response_timer.as_mut().map(|timer| timer.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(ClientError::TimedOut)),
            _ => Poll::Pending,
        }
    })
    .await?;
    let ResponseHeadParts { status, version, reason, headers, close, fields } = head;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        if !upgrade_request {
            return Err(ClientError::Malformed("101 without an upgrade request"));
        }
        let upgraded = UpgradedUpstream { read_ahead: conn.buf.split().freeze(), io: conn.io };
        let mut response = Response::new(ResponseBody::empty());
        *response.status_mut() = status;
        *response.version_mut() = version;
        headers.set_on(&mut response);
        response.extensions_mut().insert(PendingUpstreamUpgrade(std::sync::Arc::new(parking_lot::Mutex::new(Some(upgraded)))));
        return Ok(response);
    }
    let decoder = if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        ResponseDecoder::Empty
    } else {
        fields.framing()?
    };
    let reusable = !close && !matches!(decoder, ResponseDecoder::UntilClose);
    // A request sent whole by now (most: no body, or a small one) leaves nothing for the body to
    // finish; only one still sending is kept, boxed, so that every response moved through the
    // pipeline is smaller by its room.
    let sending = (!sending.complete).then(|| Box::new(sending));
    let mut response = Response::new(ResponseBody { conn: Some(conn), decoder, sending, reusable, done: false, read_size: READ_SIZE, raw_fields: None });
    *response.status_mut() = status;
    *response.version_mut() = version;
    headers.set_on(&mut response);
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
    /// Without the hop-by-hop fields (but a 101's, which are always in a map).
    headers: Fields,
    /// The upstream will close after this response.
    close: bool,
    fields: DelimitingFields,
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
            conn.buf.reserve(READ_ROOM);
        }
        let seen_any = !conn.buf.is_empty();
        match tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut *conn.buf) {
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

/// Reads a response head off the start of `buf`: None while it is incomplete. httparse reads
/// the buffer as it is, and the head is taken off it once read, its fields kept as spans of it.
fn parse_response_head(buf: &mut BytesMut) -> Result<Option<ResponseHeadParts>, ClientError> {
    let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let end = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut response, buf, &mut storage) {
        Ok(httparse::Status::Complete(len)) => len,
        // The limit holds however the bytes were split into reads.
        Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_HEAD => return Err(ClientError::Malformed("response head too large")),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(ClientError::Malformed("too many response header fields")),
        Err(_) => return Err(ClientError::Malformed("unreadable response head")),
    };
    if end > MAX_RESPONSE_HEAD {
        return Err(ClientError::Malformed("response head too large"));
    }
    let code = response.code.ok_or(ClientError::Malformed("no status"))?;
    let status = StatusCode::from_u16(code).map_err(|_| ClientError::Malformed("bad status"))?;
    let http10 = response.version == Some(0);
    let reason = response
        .reason
        .filter(|reason| !reason.is_empty() && Some(*reason) != status.canonical_reason())
        .and_then(|reason| hyper::ext::ReasonPhrase::try_from(reason.as_bytes().to_vec()).ok());
    // Hop-by-hop fields describe this connection and end here: they are read for what they say
    // and left out of the head that goes on, as is any field `Connection` names. A 101 keeps
    // them all: the tunnel that follows needs its `Upgrade`, and sorts them out itself.
    let tunnel = status == StatusCode::SWITCHING_PROTOCOLS;
    let mut fields = DelimitingFields::default();
    // The fields stay in the head (`RawFields`) unless there are too many, a 101's tunnel needs
    // them, or `Connection` names some to leave out.
    let head = &buf[..end];
    let mut spans = (!tunnel).then(|| FieldSpans::new(end)).flatten();
    for field in response.headers.iter() {
        let name = field.name.as_bytes();
        let hop = hop_index(name);
        match hop {
            Some(CONNECTION_HOP) => fields.connection(field.value),
            Some(TRANSFER_ENCODING_HOP) => fields.transfer_encoding(field.value),
            None if name.eq_ignore_ascii_case(b"content-length") => fields.content_length(field.value),
            _ => {}
        }
        if hop.is_some() && !tunnel {
            continue;
        }
        if let Some(kept) = spans.as_mut() {
            if kept.push(head, name, field.value) {
                continue;
            }
            spans = None;
        }
    }
    // Taken off the buffer now that it is read, so that its fields are slices of it (no copy
    // per field).
    let head = buf.split_to(end).freeze();
    let headers = match spans {
        Some(spans) if fields.named.is_empty() => Fields::Raw(spans.into_fields(head)),
        _ => Fields::Map(fields_map(&head, tunnel, &fields.named)?),
    };
    let version = if http10 { Version::HTTP_10 } else { Version::HTTP_11 };
    let close = if http10 { !fields.keep_alive } else { fields.close };
    Ok(Some(ResponseHeadParts { status, version, reason, headers, close, fields }))
}

/// The fields of a response head (read once already) that go on, as a map whose values share
/// the head: all of a 101's; without the hop-by-hop ones and those `Connection` names otherwise.
fn fields_map(head: &Bytes, tunnel: bool, named: &[HeaderName]) -> Result<HeaderMap, ClientError> {
    let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut response, head, &mut storage) {
        Ok(httparse::Status::Complete(len)) if len == head.len() => {}
        _ => return Err(ClientError::Malformed("unreadable response head")),
    }
    let mut headers = HeaderMap::with_capacity(response.headers.len());
    for field in response.headers.iter().filter(|field| tunnel || hop_index(field.name.as_bytes()).is_none()) {
        let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| ClientError::Malformed("bad header name"))?;
        headers.append(name, crate::http::head::parsed_field_value(field.value, Some(head)));
    }
    if !tunnel {
        for name in named {
            headers.remove(name);
        }
    }
    Ok(headers)
}

/// A response head's fields as they go on: kept in the head, or in a map.
enum Fields {
    Raw(Box<RawFields>),
    Map(HeaderMap),
}

impl Fields {
    /// Into a response: a map as its `HeaderMap`, kept fields in its body.
    fn set_on(self, response: &mut Response<ResponseBody>) {
        match self {
            Fields::Map(map) => *response.headers_mut() = map,
            Fields::Raw(raw) => response.body_mut().raw_fields = Some(raw),
        }
    }
}

/// What a response head's delimiting and connection fields say, gathered as the head is read.
#[derive(Default)]
struct DelimitingFields {
    /// `Connection` lists `close`, `keep-alive`.
    close: bool,
    keep_alive: bool,
    /// Fields `Connection` names besides the hop-by-hop ones (rarely any).
    named: Vec<HeaderName>,
    /// The one length every `Content-Length` gives, or why there is none.
    length: Option<u64>,
    length_error: Option<&'static str>,
    transfer_encoding: bool,
    /// The last `Transfer-Encoding` field ends in `chunked`.
    chunked_last: bool,
}

impl DelimitingFields {
    fn connection(&mut self, value: &[u8]) {
        for token in list_items(value) {
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if names_another_field(token) {
                if let Ok(name) = HeaderName::from_bytes(token) {
                    self.named.push(name);
                }
            }
        }
    }

    fn transfer_encoding(&mut self, value: &[u8]) {
        self.transfer_encoding = true;
        let readable = value.iter().all(|b| *b == b'\t' || (0x20..0x7f).contains(b));
        self.chunked_last = readable && list_items(value).next_back().is_some_and(|coding| coding.eq_ignore_ascii_case(b"chunked"));
    }

    fn content_length(&mut self, value: &[u8]) {
        for item in list_items(value) {
            if item.is_empty() || !item.iter().all(u8::is_ascii_digit) || item.len() > 19 {
                self.length_error.get_or_insert("bad Content-Length");
                return;
            }
            // At most 19 digits: always within u64.
            let n = item.iter().fold(0u64, |n, digit| n * 10 + u64::from(digit - b'0'));
            if self.length.is_some_and(|seen| seen != n) {
                self.length_error.get_or_insert("Content-Length values differ");
            }
            self.length = Some(n);
        }
    }

    /// RFC 9112 §6.3 for a response that has a body: chunked, a length, or until the close. A
    /// response that gives both, or two lengths, is refused: its end is ambiguous.
    fn framing(&self) -> Result<ResponseDecoder, ClientError> {
        if let Some(why) = self.length_error {
            return Err(ClientError::Malformed(why));
        }
        if self.transfer_encoding {
            if self.length.is_some() {
                return Err(ClientError::Malformed("both Content-Length and Transfer-Encoding"));
            }
            return Ok(if self.chunked_last { ResponseDecoder::Body(BodyDecoder::chunked(MAX_RESPONSE_HEAD)) } else { ResponseDecoder::UntilClose });
        }
        Ok(match self.length {
            Some(n) => ResponseDecoder::Body(BodyDecoder::length(n)),
            None => ResponseDecoder::UntilClose,
        })
    }
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
    fn new(parts: &Parts, forwarding: &ForwardingHeaders, host: Option<&str>, body: ProxyBody) -> Self {
        let mut out = Output::default();
        let empty = body.is_end_stream();
        let exact = body.size_hint().exact();
        let framing = if empty || exact.is_some() { RequestFraming::Length } else { RequestFraming::Chunked };
        let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let size = parts.headers.iter().chain(forwarding.iter()).map(|(name, value)| name.as_str().len() + value.len() + 4).sum::<usize>();
        out.reserve(parts.method.as_str().len() + path.len() + size + host.map_or(0, str::len) + 64);
        out.put_slice(parts.method.as_str().as_bytes());
        out.put_slice(b" ");
        out.put_slice(path.as_bytes());
        out.put_slice(b" HTTP/1.1\r\n");
        let mut has_length = false;
        let mut has_host = false;
        for (name, value) in &parts.headers {
            if name == header::TRANSFER_ENCODING {
                continue;
            }
            has_host |= name == header::HOST;
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
        if let Some(host) = host.filter(|_| !has_host) {
            out.put_slice(b"host: ");
            out.put_slice(host.as_bytes());
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
    /// The request, while its body is still being sent (`None`: sent whole, or given up).
    sending: Option<Box<RequestSend>>,
    reusable: bool,
    done: bool,
    /// The next read's size (grows while reads come back full).
    read_size: usize,
    /// The response's fields, kept in its head (`h1::fields`) until something takes them.
    raw_fields: Option<Box<RawFields>>,
}

impl ResponseBody {
    /// The response's fields as they were kept in its head, if nothing took them yet.
    pub fn take_raw_fields(&mut self) -> Option<Box<RawFields>> {
        self.raw_fields.take()
    }

    fn empty() -> Self {
        ResponseBody { conn: None, decoder: ResponseDecoder::Empty, sending: None, reusable: false, done: true, read_size: READ_SIZE, raw_fields: None }
    }

    /// The connection, when the exchange ended cleanly on both sides and it may carry another.
    pub fn take_reusable(&mut self) -> Option<Connection> {
        let sent = self.sending.as_ref().is_none_or(|s| s.complete);
        if !(self.finished() && self.reusable && sent) {
            return None;
        }
        let mut conn = self.conn.take().filter(|conn| conn.buf.is_empty())?;
        // An idle pooled connection holds no buffer: the next response's first read takes one.
        conn.buf.release();
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
            match std::task::ready!(tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut *conn.buf)) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> ResponseHeadParts {
        let mut buf = BytesMut::from(text.as_bytes());
        match parse_response_head(&mut buf) {
            Ok(Some(head)) => head,
            Ok(None) => panic!("{text:?}: incomplete"),
            Err(err) => panic!("{text:?}: {err}"),
        }
    }

    /// The fields that go on, as a map, whichever way they were kept.
    fn map(text: &str) -> HeaderMap {
        match head(text).headers {
            Fields::Map(map) => map,
            Fields::Raw(raw) => raw.into_map(),
        }
    }

    fn framing(text: &str) -> Result<&'static str, &'static str> {
        match head(text).fields.framing() {
            Ok(ResponseDecoder::Body(decoder)) if decoder.remaining().is_some() => Ok("length"),
            Ok(ResponseDecoder::Body(_)) => Ok("chunked"),
            Ok(ResponseDecoder::UntilClose) => Ok("until close"),
            Ok(ResponseDecoder::Empty) => Ok("empty"),
            Err(ClientError::Malformed(why)) => Err(why),
            Err(_) => Err("other"),
        }
    }

    /// An idle connection stays usable until the runtime sees its upstream close it or send
    /// something unasked; over plain TCP (readiness looked at, not registered for) and over any
    /// other stream (a probing read) alike.
    #[tokio::test]
    async fn an_idle_connection_is_unusable_once_its_upstream_closed_or_spoke() {
        async fn pair() -> (Connection, tokio::net::TcpStream) {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            (Connection::new(Box::new(client)), server)
        }
        async fn turns_unusable(conn: &mut Connection) -> bool {
            for _ in 0..200 {
                if !conn.is_usable() {
                    return true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            false
        }
        let (mut conn, server) = pair().await;
        assert!((*conn.io).as_tcp().is_some());
        assert!(conn.is_usable());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(conn.is_usable(), "nothing happened");
        drop(server);
        assert!(turns_unusable(&mut conn).await, "the upstream closed");

        let (mut conn, mut server) = pair().await;
        assert!(conn.is_usable());
        tokio::io::AsyncWriteExt::write_all(&mut server, b"HTTP/1.1 408 Request Timeout\r\n\r\n").await.unwrap();
        assert!(turns_unusable(&mut conn).await, "the upstream spoke unasked");

        let (near, far) = tokio::io::duplex(64);
        let mut conn = Connection::new(Box::new(near));
        assert!((*conn.io).as_tcp().is_none());
        assert!(conn.is_usable());
        drop(far);
        assert!(turns_unusable(&mut conn).await, "the other stream closed");
    }

    #[test]
    fn hop_by_hop_fields_and_the_ones_connection_names_stay_behind() {
        let text = "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Internal\r\nKeep-Alive: timeout=5\r\nX-Internal: secret\r\n\
             TE: trailers\r\nTrailer: x\r\nUpgrade: h2c\r\nProxy-Connection: close\r\nContent-Length: 2\r\nServer: up\r\n\r\n";
        let headers = map(text);
        let mut names: Vec<&str> = headers.keys().map(|name| name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-length", "server"]);
        assert!(!head(text).close);
        // Without a field named by Connection, the rest stay in the head, in order.
        let kept = head("HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nServer: up\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\n");
        let Fields::Raw(raw) = kept.headers else { panic!("a map") };
        let fields: Vec<(&[u8], &[u8])> = raw.iter().collect();
        assert_eq!(fields, [(&b"Server"[..], &b"up"[..]), (&b"Content-Length"[..], &b"2"[..])]);
        assert_eq!(raw.content_length(), Some(&b"2"[..]));
    }

    #[test]
    fn a_head_whose_lines_end_in_bare_lf_ends_where_httparse_reads_it() {
        // The body holds a CRLF CRLF: the head still ends at its first empty line, and what
        // follows stays in the buffer as the body's bytes.
        for text in ["HTTP/1.1 200 OK\nContent-Length: 6\n\nab\r\n\r\n", "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\nab\r\n\r\n"] {
            let mut buf = BytesMut::from(text.as_bytes());
            let Ok(Some(parts)) = parse_response_head(&mut buf) else { panic!("{text:?}: no head") };
            assert_eq!(&buf[..], b"ab\r\n\r\n", "{text:?}");
            assert_eq!(framing(text), Ok("length"));
            assert!(!parts.close);
        }
        // Without a CRLF CRLF anywhere.
        let mut buf = BytesMut::from(&b"HTTP/1.1 204 No Content\n\nrest"[..]);
        assert!(matches!(parse_response_head(&mut buf), Ok(Some(_))));
        assert_eq!(&buf[..], b"rest");
    }

    #[test]
    fn the_connection_stays_open_as_the_version_and_connection_say() {
        assert!(head("HTTP/1.1 200 OK\r\nconnection: Close\r\n\r\n").close);
        assert!(!head("HTTP/1.1 200 OK\r\n\r\n").close);
        assert!(head("HTTP/1.0 200 OK\r\n\r\n").close);
        assert!(!head("HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\n\r\n").close);
    }

    #[test]
    fn a_switch_of_protocols_keeps_its_upgrade_fields_for_the_tunnel() {
        let headers = map("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n");
        assert!(headers.contains_key(header::UPGRADE) && headers.contains_key(header::CONNECTION));
    }

    #[test]
    fn a_body_is_delimited_one_way_or_refused() {
        assert_eq!(framing("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"), Ok("length"));
        assert_eq!(framing("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n"), Ok("length"));
        assert_eq!(framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n"), Ok("chunked"));
        assert_eq!(framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n"), Ok("until close"));
        assert_eq!(framing("HTTP/1.1 200 OK\r\n\r\n"), Ok("until close"));
        assert_eq!(framing("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"), Err("Content-Length values differ"));
        assert_eq!(framing("HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n"), Err("bad Content-Length"));
        assert_eq!(framing("HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n"), Err("bad Content-Length"));
        assert_eq!(framing("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"), Err("both Content-Length and Transfer-Encoding"));
        // Read only where a body follows: a HEAD's answer may say what it likes.
        assert!(map("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").contains_key(header::CONTENT_LENGTH));
    }
}
