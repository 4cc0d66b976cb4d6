//! One HTTP/1.x client connection, served request by request in the connection's own task: each
//! head read and checked by the one head parser (every head, not only the first), its body read
//! only as the pipeline asks for it, the response written and framed here. Pipelined requests are
//! answered in order; a refused head gets its 400/431 and a close; an accepted upgrade hands the
//! socket, with what the client already sent, to the tunnel. No read buffer is held while the
//! connection waits for its next request.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use http::{header, HeaderValue, Method, Request, StatusCode, Uri, Version};
use hyper::body::{Body, SizeHint};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::http::body::{ClientBody, ProxyBody};
use crate::http::edge::Refusal;
use crate::http::h1::channel::{body_channel, BodySender};
use crate::http::h1::decode::{BodyDecoder, Decoded};
use crate::http::h1::write::{Framing, Output, ResponseHead};
use crate::http::head::{take_head, BodyLength, HeadParse, RequestHead};
use crate::http::headers::connection_has;
use crate::http::io::Replay;
use crate::http::pipeline::{handle_pooled, Answered, ConnectionContext, HeadChecked};
use crate::pooled_future::PooledFuture;
use crate::http::read_buffer::ReadBuffer;

/// The room a connection's first read after a wait is lent: most request heads fit.
const FIRST_READ: usize = 2048;
/// Room made in the read buffer for a body.
const BODY_READ: usize = 16 * 1024;
/// Response bytes queued before they are written out.
const WRITE_HIGH_WATER: usize = 64 * 1024;
/// After a refusal or a response that leaves request bytes unread: how long, and how much, the
/// client's bytes are read and dropped, so that the close does not reset the connection before
/// the client has read the answer. Time is the bound that matters: a client still sending the
/// upload that was refused must not see a reset while it is sending (some clients then report the
/// failed write, not the answer they had received). The byte budget only caps what a fast sender
/// costs in that time.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 16 * 1024 * 1024;
const LINGER_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// A client stream after an upgrade, with the bytes it had sent past the request head.
pub type UpgradedClient = Replay<Box<dyn ClientStream>>;

/// A byte stream as the HTTP/1 code holds it once its type no longer matters (an upgraded
/// client, an upstream connection): Sync too, as the boxed bodies that may own one are.
pub trait ClientStream: AsyncRead + AsyncWrite + Send + Sync + Unpin {
    /// The plain TCP stream this is, if it is one. (Called on a `Box<dyn ClientStream>`, ask
    /// what it holds, `(*boxed).as_tcp()`: the box is a stream of its own type too.)
    fn as_tcp(&self) -> Option<&tokio::net::TcpStream>;
}
impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static> ClientStream for T {
    fn as_tcp(&self) -> Option<&tokio::net::TcpStream> {
        (self as &dyn std::any::Any).downcast_ref()
    }
}

/// In the extensions of an upgrade request: the client's stream, once the upgrade was answered.
#[derive(Clone)]
pub struct PendingUpgrade(Arc<Mutex<Option<oneshot::Receiver<UpgradedClient>>>>);

impl PendingUpgrade {
    /// The client's stream; `None` when the connection ended without answering the upgrade.
    pub async fn client(self) -> Option<UpgradedClient> {
        let receiver = self.0.lock().take()?;
        receiver.await.ok()
    }
}

/// How a connection served this way ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum H1End {
    /// The client closed between requests, or a response that was the last was written.
    Completed,
    /// The socket failed, the client left in the middle of a message, or a body was malformed.
    ClientError,
    /// A head the edge rules refuse was answered 400/431.
    InvalidHttp,
    /// The engine is stopping and the connection was idle.
    Drained,
    /// The stream went to a WebSocket tunnel.
    Upgraded,
}

/// Serves one client connection's HTTP/1.x requests, the first of them `first_head` when the
/// session read it already (its bytes are then no longer in `io`): one reading of those bytes
/// decides both how the connection is routed and what the request is. A function returning the
/// future rather than an `async fn`: the future uses its captured arguments in place instead of
/// holding each twice.
pub fn serve_h1<'a, S>(mut io: S, mut first_head: Option<Box<RequestHead>>, ctx: Arc<ConnectionContext>, max_head: usize, draining: &'a CancellationToken) -> impl Future<Output = H1End> + Send + 'a
where
    S: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static,
{
    async move {
        let mut buf = ReadBuffer::new();
        // A refused head leaves the loop and is answered after it, in a box: a rare wait held
        // beside the request state would size every connection's future, idle ones included.
        let refusal = loop {
            if draining.is_cancelled() && buf.is_empty() && first_head.is_none() {
                let _ = io.shutdown().await;
                return H1End::Drained;
            }
            let head = match first_head.take() {
                Some(head) => head,
                None => match read_head(&mut io, &mut buf, max_head).await {
                    HeadRead::Head(head) => head,
                    HeadRead::Closed => return H1End::Completed,
                    HeadRead::Failed => return H1End::ClientError,
                    HeadRead::Refused(refusal) => break refusal,
                },
            };
            // Boxed: held in place, the request state would size every idle connection's future.
            let mut exchange = match Exchange::start(*head, &ctx, max_head, draining) {
                Ok(exchange) => Box::new(exchange),
                Err(refusal) => break refusal,
            };
            if exchange.feed.is_none() {
                // Nothing more is read from the client until the response is out: the buffer
                // goes back to the pool while the request waits upstream (unless a pipelined
                // request is in it).
                buf.release();
            }
            let outcome = std::future::poll_fn(|cx| exchange.poll(cx, &mut io, &mut buf)).await;
            match outcome {
                Outcome::KeepAlive => {
                    // Idle until the next request: the buffer goes back to the pool (unless the
                    // client's next request is in it already); the next read takes one again.
                    buf.release();
                }
                Outcome::Close { unread } => {
                    // Boxed: a wait held in place would size every connection's future.
                    Box::pin(close(&mut io, unread)).await;
                    return H1End::Completed;
                }
                Outcome::Failed => return H1End::ClientError,
                Outcome::Upgrade(sender) => {
                    let leftover = buf.split().freeze();
                    let client: Box<dyn ClientStream> = Box::new(io);
                    let _ = sender.send(Replay::new(client, leftover));
                    return H1End::Upgraded;
                }
            }
        };
        Box::pin(refuse(&mut io, &refusal)).await;
        H1End::InvalidHttp
    }
}

enum HeadRead {
    Head(Box<RequestHead>),
    Closed,
    Failed,
    Refused(Refusal),
}

async fn read_head<S: AsyncRead + Unpin>(io: &mut S, buf: &mut ReadBuffer, max_head: usize) -> HeadRead {
    loop {
        if !buf.is_empty() {
            match take_head(buf, max_head) {
                HeadParse::Request(head) => return HeadRead::Head(Box::new(head)),
                HeadParse::Incomplete => {}
                HeadParse::Refused(refusal) => return HeadRead::Refused(refusal),
                HeadParse::NotHttp | HeadParse::H2Preface => return HeadRead::Refused(Refusal::bad_request("malformed request line")),
            }
        }
        let read = if !buf.is_lent() {
            std::future::poll_fn(|cx| buf.poll_read_unlent(cx, io, FIRST_READ)).await
        } else {
            if buf.capacity() - buf.len() < 512 {
                buf.reserve(buf.capacity().max(FIRST_READ));
            }
            io.read_buf(&mut **buf).await
        };
        match read {
            Ok(0) if buf.is_empty() => return HeadRead::Closed,
            Ok(0) => return HeadRead::Failed,
            Ok(_) => {}
            Err(_) => return HeadRead::Failed,
        }
    }
}

/// Answers a refused request and closes, lingering so the answer is read.
pub async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S, refusal: &Refusal) {
    if tokio::time::timeout(LINGER_WRITE_TIMEOUT, io.write_all(&refusal.http1_bytes())).await.is_err() {
        return;
    }
    linger(io).await;
}

/// Closes after a response that was the last; `unread`: the client sent bytes that were not read.
async fn close<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S, unread: bool) {
    if unread {
        linger(io).await;
    } else {
        let _ = tokio::time::timeout(LINGER_WRITE_TIMEOUT, io.shutdown()).await;
    }
}

async fn linger<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) {
    if tokio::time::timeout(LINGER_WRITE_TIMEOUT, io.shutdown()).await.is_err() {
        return;
    }
    // On the heap: a buffer held across an await here would size every connection's future.
    let mut sink = vec![0u8; 64 * 1024];
    let mut drained = 0;
    let draining = async {
        while drained < LINGER_BYTES {
            match io.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, draining).await;
}

enum Outcome {
    KeepAlive,
    /// `unread`: request bytes may still be on their way.
    Close { unread: bool },
    Failed,
    Upgrade(oneshot::Sender<UpgradedClient>),
}

type ResponseFuture = PooledFuture<Result<Answered, std::convert::Infallible>>;

/// The request body on its way from the client's socket to the pipeline.
struct BodyFeed {
    sender: BodySender,
    decoder: BodyDecoder,
    /// The client waits for `100 Continue` before it sends the body.
    expect_continue: bool,
    /// The body can no longer be read to its end (malformed, or the client left).
    broken: bool,
    /// The pipeline dropped the body before its end.
    abandoned: bool,
}

struct Writing {
    body: ProxyBody,
    framing: Framing,
    /// Bytes of a `Content-Length` body still to come.
    remaining: u64,
    body_done: bool,
}

/// One request, from its head to the end of its response.
struct Exchange<'a> {
    response: Option<ResponseFuture>,
    feed: Option<BodyFeed>,
    writing: Option<Writing>,
    out: Output,
    head_written: bool,
    method_head: bool,
    version: Version,
    /// This is the connection's last exchange.
    close: bool,
    upgrade: Option<oneshot::Sender<UpgradedClient>>,
    upgrading: bool,
    draining: &'a CancellationToken,
}

impl<'a> Exchange<'a> {
    fn start(head: RequestHead, ctx: &Arc<ConnectionContext>, max_head: usize, draining: &'a CancellationToken) -> Result<Self, Refusal> {
        let RequestHead { method, version, target, body, headers, close, upgrade: is_upgrade, expect_continue, .. } = head;
        let uri = Uri::from_maybe_shared(bytes::Bytes::from(target)).map_err(|_| Refusal::bad_request("malformed request target"))?;
        let method_head = method == Method::HEAD;
        let (client_body, feed) = match body {
            BodyLength::None | BodyLength::Length(0) => (ClientBody::Empty, None),
            BodyLength::Length(n) => {
                let (sender, receiver) = body_channel(SizeHint::with_exact(n));
                (ClientBody::H1(receiver), Some((sender, BodyDecoder::length(n))))
            }
            BodyLength::Chunked => {
                let (sender, receiver) = body_channel(SizeHint::default());
                (ClientBody::H1(receiver), Some((sender, BodyDecoder::chunked(max_head))))
            }
        };
        let mut request = Request::new(client_body);
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.version_mut() = version;
        *request.headers_mut() = headers;
        let upgrade = is_upgrade.then(|| {
            let (sender, receiver) = oneshot::channel();
            request.extensions_mut().insert(PendingUpgrade(Arc::new(Mutex::new(Some(receiver)))));
            sender
        });
        Ok(Exchange {
            response: Some(handle_pooled(ctx.clone(), request, HeadChecked::Host)),
            feed: feed.map(|(sender, decoder)| BodyFeed { sender, decoder, expect_continue, broken: false, abandoned: false }),
            writing: None,
            out: Output::default(),
            head_written: false,
            method_head,
            version,
            close,
            upgrade,
            upgrading: false,
            draining,
        })
    }

    fn poll<S: AsyncRead + AsyncWrite + Unpin>(&mut self, cx: &mut Context<'_>, io: &mut S, buf: &mut ReadBuffer) -> Poll<Outcome> {
        loop {
            let mut progressed = self.poll_feed(cx, io, buf);
            if let Some(response) = self.response.as_mut() {
                if let Poll::Ready(Ok(response)) = Pin::new(response).poll(cx) {
                    self.response = None;
                    self.start_response(response, buf);
                    progressed = true;
                }
            }
            match self.poll_body(cx) {
                Ok(more) => progressed |= more,
                Err(()) => return Poll::Ready(Outcome::Failed),
            }
            if !self.out.is_empty() {
                match self.out.poll_write_all(cx, io) {
                    Poll::Ready(Ok(())) => progressed = true,
                    Poll::Ready(Err(_)) => return Poll::Ready(Outcome::Failed),
                    Poll::Pending => {}
                }
            }
            if self.out.is_empty() && self.writing.as_ref().is_some_and(|w| w.body_done) {
                return Poll::Ready(self.finish(buf));
            }
            if !progressed {
                return Poll::Pending;
            }
        }
    }

    /// Moves the request body along while the pipeline asks for it. True when something happened.
    fn poll_feed<S: AsyncRead + Unpin>(&mut self, cx: &mut Context<'_>, io: &mut S, buf: &mut ReadBuffer) -> bool {
        let Some(feed) = self.feed.as_mut() else { return false };
        if feed.decoder.is_done() || feed.broken || feed.abandoned {
            return false;
        }
        match feed.sender.poll_wanted(cx) {
            Poll::Pending => return false,
            Poll::Ready(Err(_)) => {
                feed.abandoned = true;
                return false;
            }
            Poll::Ready(Ok(())) => {}
        }
        let mut progressed = false;
        if feed.expect_continue {
            feed.expect_continue = false;
            if !self.head_written {
                self.out.put_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                progressed = true;
            }
        }
        loop {
            match feed.decoder.decode(buf) {
                Ok(Some(Decoded::Data(data))) => {
                    // A counted body's last bytes end it at once: the pipeline need not ask again.
                    let last = feed.decoder.remaining() == Some(0);
                    if last {
                        let _ = feed.decoder.decode(buf);
                    }
                    feed.sender.send_data(data, last);
                    return true;
                }
                Ok(Some(Decoded::End(trailers))) => {
                    feed.sender.finish(trailers);
                    return true;
                }
                Err(err) => {
                    feed.broken = true;
                    feed.sender.fail(Box::new(err));
                    return true;
                }
                Ok(None) => {}
            }
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(BODY_READ);
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, &mut **buf) {
                Poll::Pending => return progressed,
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    feed.broken = true;
                    feed.sender.fail("the client closed the connection in the middle of the request body".into());
                    return true;
                }
                Poll::Ready(Ok(_)) => {}
            }
        }
    }

    fn start_response(&mut self, answered: Answered, buf: &mut BytesMut) {
        let Answered { response, upstream_fields } = answered;
        let (parts, body) = response.into_parts();
        let status = parts.status;
        let upgrading = status == StatusCode::SWITCHING_PROTOCOLS && self.upgrade.is_some();
        let raw = upstream_fields.as_deref();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .map(HeaderValue::as_bytes)
            .or_else(|| raw.and_then(|raw| raw.content_length()))
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<u64>().ok());
        let framing = if upgrading || self.method_head || status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            Framing::NoBody
        } else if let Some(length) = declared {
            Framing::Length(length)
        } else if body.is_end_stream() {
            Framing::Length(0)
        } else if let Some(exact) = body.size_hint().exact() {
            Framing::Length(exact)
        } else if self.version == Version::HTTP_11 {
            Framing::Chunked
        } else {
            Framing::UntilClose
        };
        let unread_body = self.feed.as_mut().is_some_and(|feed| !request_body_settles(feed, buf));
        self.close |= framing == Framing::UntilClose
            || unread_body
            || connection_has(&parts.headers, "close")
            || self.draining.is_cancelled()
            || (status == StatusCode::SWITCHING_PROTOCOLS && !upgrading);
        let reason = parts.extensions.get::<hyper::ext::ReasonPhrase>().map(|r| r.as_bytes());
        self.out.encode_head(&ResponseHead {
            status,
            reason,
            headers: &parts.headers,
            raw,
            framing,
            close: self.close && !upgrading,
            client_version: self.version,
        });
        self.head_written = true;
        self.upgrading = upgrading;
        let remaining = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        let body_done = framing == Framing::NoBody || framing == Framing::Length(0);
        self.writing = Some(Writing { body, framing, remaining, body_done });
    }

    /// Queues the response body's frames as they come. Err: the response cannot be completed.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Result<bool, ()> {
        let Some(writing) = self.writing.as_mut() else { return Ok(false) };
        let mut progressed = false;
        while !writing.body_done && self.out.len() < WRITE_HIGH_WATER {
            match Pin::new(&mut writing.body).poll_frame(cx) {
                Poll::Pending => break,
                Poll::Ready(Some(Ok(frame))) => {
                    progressed = true;
                    let Ok(data) = frame.into_data() else { continue };
                    match writing.framing {
                        Framing::Length(_) => {
                            if data.len() as u64 > writing.remaining {
                                tracing::debug!("response body longer than its Content-Length");
                                return Err(());
                            }
                            writing.remaining -= data.len() as u64;
                            self.out.put_bytes(data);
                        }
                        Framing::Chunked => self.out.put_chunk(data),
                        Framing::UntilClose => self.out.put_bytes(data),
                        Framing::NoBody => {}
                    }
                }
                Poll::Ready(Some(Err(err))) => {
                    tracing::debug!(error = %err, "response body failed");
                    return Err(());
                }
                Poll::Ready(None) => {
                    progressed = true;
                    match writing.framing {
                        Framing::Chunked => self.out.put_last_chunk(),
                        Framing::Length(_) if writing.remaining != 0 => {
                            tracing::debug!("response body shorter than its Content-Length");
                            return Err(());
                        }
                        _ => {}
                    }
                    writing.body_done = true;
                }
            }
        }
        if writing.framing == Framing::NoBody || writing.framing == Framing::Length(0) {
            writing.body_done = true;
        }
        Ok(progressed)
    }

    /// The response is out: whether the connection can take the next request.
    fn finish(&mut self, buf: &mut BytesMut) -> Outcome {
        // The response's body (and what it held: the upstream connection, the in-flight count)
        // goes now, not when the next request comes.
        self.writing = None;
        if self.upgrading {
            if let Some(sender) = self.upgrade.take() {
                return Outcome::Upgrade(sender);
            }
        }
        let unread = self.feed.as_mut().is_some_and(|feed| !request_body_settles(feed, buf));
        if self.close || unread {
            return Outcome::Close { unread };
        }
        Outcome::KeepAlive
    }
}

/// Whether the request body is, or can be, read to its end from what is already buffered (what
/// the pipeline did not want is skipped). A connection whose body is not settled cannot carry
/// another request.
fn request_body_settles(feed: &mut BodyFeed, buf: &mut BytesMut) -> bool {
    if feed.broken {
        return false;
    }
    if feed.decoder.is_done() {
        return true;
    }
    // The pipeline may still read it; or the client holds it back until told to send it, and
    // never was.
    if !feed.sender.receiver_gone() || feed.expect_continue {
        return false;
    }
    feed.abandoned = true;
    loop {
        match feed.decoder.decode(buf) {
            Ok(Some(Decoded::End(_))) => return true,
            Ok(Some(Decoded::Data(_))) => continue,
            Ok(None) | Err(_) => return false,
        }
    }
}
