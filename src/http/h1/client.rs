//! Our HTTP/1.1 client side towards upstreams, driven by the request that uses it: no task and no
//! channel per upstream connection. The request head is written once from the pipeline's parts;
//! the body streams as the pipeline's body yields it while the response head is awaited (an early
//! response is taken as it comes) and, after it, from inside the response body, so a backend that
//! answers while it still reads gets the rest. The response head is read by `response_head` (its
//! framing checked: a response that frames its body twice is refused); the body is read to its
//! end, and only then can the connection go back to the pool.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header;

use crate::http::h1::fields::RawFields;
use crate::http::h1::response_head::{parse_response_head, Fields, Framing, Malformed, ResponseHead, MAX_RESPONSE_HEAD};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, ReadBuf};

use crate::http::body::{BoxError, ProxyBody};
use crate::http::h1::decode::{BodyDecoder, Decoded};
use crate::http::h1::server::ClientStream;
use crate::http::h1::write::Output;
use crate::http::headers::ForwardingHeaders;
use crate::http::read_buffer::{ReadBuffer, READ_ROOM};

const READ_SIZE: usize = 8 * 1024;
/// A body that keeps filling its reads gets larger ones, up to this: fewer system calls for
/// large responses, small buffers for small ones.
const MAX_BODY_READ: usize = 256 * 1024;

/// One upstream connection: its stream and what was read past the last response.
pub struct Connection {
    io: Box<dyn ClientStream>,
    buf: ReadBuffer,
    /// The response timeout, one timer for the connection's life: a timer made and dropped per
    /// request went through the wheel's lock twice.
    response_timer: Option<Pin<Box<ResponseTimer>>>,
}

/// A connection's response timer and the deadline of its current request. The timer is set again
/// only when a deadline comes before the one it is set for; a later one (every request of a
/// connection whose routes share a timeout) is only written down, and a timer that fires before
/// it is set again for it, once per timeout at most. (The deadline lives here, not in
/// `Connection`, which is moved whole from the pool through every response.)
struct ResponseTimer {
    sleep: tokio::time::Sleep,
    deadline: tokio::time::Instant,
}

impl ResponseTimer {
    fn new(deadline: tokio::time::Instant) -> Pin<Box<ResponseTimer>> {
        Box::pin(ResponseTimer { sleep: tokio::time::sleep_until(deadline), deadline })
    }

    /// Times the current request out at `deadline`.
    fn set(mut self: Pin<&mut Self>, deadline: tokio::time::Instant) {
        if deadline < self.sleep.deadline() {
            self.as_mut().sleep().reset(deadline);
        }
        // SAFETY: `deadline` is never pinned (only `sleep` is); it is written in place.
        unsafe { self.get_unchecked_mut().deadline = deadline };
    }

    /// Ready once the current request's deadline passed.
    fn poll_expired(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        while self.as_mut().sleep().poll(cx).is_ready() {
            if self.sleep.deadline() >= self.deadline {
                return Poll::Ready(());
            }
            // Set for an earlier request's deadline: on to this one's.
            let deadline = self.deadline;
            self.as_mut().sleep().reset(deadline);
        }
        Poll::Pending
    }

    fn sleep(self: Pin<&mut Self>) -> Pin<&mut tokio::time::Sleep> {
        // SAFETY: `sleep` is pinned with its owner and never moved out of it.
        unsafe { self.map_unchecked_mut(|timer| &mut timer.sleep) }
    }
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

impl From<Malformed> for ClientError {
    fn from(Malformed(why): Malformed) -> Self {
        ClientError::Malformed(why)
    }
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
        Some(timer) => timer.as_mut().set(deadline),
        None => conn.response_timer = Some(ResponseTimer::new(deadline)),
    }
    let head = poll_fn(|cx| {
        if let Poll::Ready(head) = poll_response_head(cx, &mut conn, &mut sending) {
            return Poll::Ready(head);
        }
        match conn.response_timer.as_mut().map(|timer| timer.as_mut().poll_expired(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(ClientError::TimedOut)),
            _ => Poll::Pending,
        }
    })
    .await?;
    let ResponseHead { status, version, reason, headers, close, fields } = head;
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
        match fields.framing()? {
            Framing::Length(n) => ResponseDecoder::Body(BodyDecoder::length(n)),
            Framing::Chunked => ResponseDecoder::Body(BodyDecoder::chunked(MAX_RESPONSE_HEAD)),
            Framing::UntilClose => ResponseDecoder::UntilClose,
        }
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
    if let Some(reason) = reason.and_then(|reason| hyper::ext::ReasonPhrase::try_from(reason).ok()) {
        response.extensions_mut().insert(reason);
    }
    response.body_mut().done = matches!(response.body().decoder, ResponseDecoder::Empty);
    Ok(response)
}

fn poll_response_head(cx: &mut Context<'_>, conn: &mut Connection, sending: &mut RequestSend) -> Poll<Result<ResponseHead, ClientError>> {
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
        let seen_any = !conn.buf.is_empty();
        // A connection waiting for its response holds no buffer: one is lent when bytes come.
        let read = if conn.buf.is_lent() {
            if conn.buf.capacity() - conn.buf.len() < 1024 {
                conn.buf.reserve(READ_ROOM);
            }
            tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut *conn.buf)
        } else {
            conn.buf.poll_read_unlent(cx, &mut conn.io, READ_ROOM)
        };
        match read {
            Poll::Ready(Ok(0)) if seen_any => return Poll::Ready(Err(ClientError::Incomplete)),
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(sending.write_error.take().map_or(ClientError::ClosedBeforeResponse(None), |e| ClientError::ClosedBeforeResponse(Some(e))))),
            Poll::Ready(Ok(_)) => {}
            Poll::Ready(Err(err)) if seen_any => return Poll::Ready(Err(ClientError::Io(err))),
            Poll::Ready(Err(err)) => return Poll::Ready(Err(ClientError::ClosedBeforeResponse(Some(err)))),
            // Sending moved and may move again (a body's next frames): another turn. Once the
            // request is all out, the read just registered is the only wait.
            Poll::Pending if sent && !sending.finished() => {}
            Poll::Pending => return Poll::Pending,
        }
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

    /// Nothing more will be written: the request is all out, or writing failed.
    fn finished(&self) -> bool {
        self.complete || self.write_error.is_some()
    }

    /// Writes what is queued and pulls the body's next frames. Ok(true) when something moved.
    /// A write failure stops the sending (the upstream may have answered already); a failed
    /// request body is the request's error.
    fn poll_send(&mut self, cx: &mut Context<'_>, io: &mut Box<dyn ClientStream>) -> Result<bool, ClientError> {
        if self.finished() {
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

    /// A pooled connection carries requests whose routes may set different response timeouts: an
    /// earlier deadline than the timer's is kept, and a later one does not end the request at the
    /// earlier request's deadline.
    #[tokio::test]
    async fn each_request_on_a_pooled_connection_has_its_own_response_timeout() {
        use std::time::Duration;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        // Answers its connection's requests in turn, after the delays given.
        async fn backend(listener: tokio::net::TcpListener, delays: Vec<Option<Duration>>) {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            for delay in delays {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let n = socket.read(&mut buf).await.unwrap();
                    assert!(n > 0, "the proxy closed");
                    head.extend_from_slice(&buf[..n]);
                }
                match delay {
                    Some(delay) => {
                        tokio::time::sleep(delay).await;
                        socket.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.unwrap();
                    }
                    None => {
                        // Never answers; holds the connection until the client gives up.
                        let _ = socket.read(&mut buf).await;
                        return;
                    }
                }
            }
        }
        async fn exchange(conn: Connection, timeout: Duration) -> Result<Option<Connection>, ClientError> {
            let (parts, ()) = http::Request::get("/").header(header::HOST, "backend").body(()).unwrap().into_parts();
            let forwarding = ForwardingHeaders::default();
            let sent = send(conn, &parts, &forwarding, None, crate::http::body::empty(), timeout);
            let response = tokio::time::timeout(Duration::from_secs(10), sent).await.expect("the send ended by itself")?;
            Ok(response.into_body().take_reusable())
        }

        // A long timeout first, then a short one: the second request times out.
        let served = tokio::spawn(backend(listener, vec![Some(Duration::ZERO), None]));
        let conn = Connection::new(Box::new(tokio::net::TcpStream::connect(address).await.unwrap()));
        let conn = exchange(conn, Duration::from_secs(3600)).await.expect("answered").expect("reusable");
        let started = std::time::Instant::now();
        assert!(matches!(exchange(conn, Duration::from_millis(50)).await, Err(ClientError::TimedOut)));
        assert!(started.elapsed() < Duration::from_secs(5));
        served.await.unwrap();

        // A short timeout first, then a longer one that the answer comes within, after the first's
        // deadline had passed.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let served = tokio::spawn(backend(listener, vec![Some(Duration::ZERO), Some(Duration::from_millis(150))]));
        let conn = Connection::new(Box::new(tokio::net::TcpStream::connect(address).await.unwrap()));
        let conn = exchange(conn, Duration::from_millis(30)).await.expect("answered").expect("reusable");
        exchange(conn, Duration::from_secs(5)).await.expect("answered within its own timeout");
        served.await.unwrap();
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
}
