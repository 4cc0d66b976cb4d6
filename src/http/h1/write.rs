//! Writing an HTTP/1.1 response to the client: the head (status line, the fields the pipeline
//! produced, `Date`, the connection's own `Connection` and framing fields) and the body framed by
//! `Content-Length`, chunked coding, or the close of the connection, in as few writes as the
//! socket takes.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, StatusCode, Version};
use tokio::io::AsyncWrite;

use crate::http::h1::fields::RawFields;
use crate::http::headers::equals_lowercase_any_case;

/// Data frames up to this size are copied next to their framing; larger ones are written from
/// their own buffer.
const COPY_LIMIT: usize = 4096;
const MAX_SLICES: usize = 16;

/// How the response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body may follow (HEAD, 1xx, 204, 304).
    NoBody,
    Length(u64),
    Chunked,
    /// HTTP/1.0 without a length: the body ends when the connection closes.
    UntilClose,
}

/// The response head, as written to the client.
pub struct ResponseHead<'a> {
    pub status: StatusCode,
    /// The upstream's own reason phrase, when it sent one.
    pub reason: Option<&'a [u8]>,
    pub headers: &'a HeaderMap,
    /// The upstream's fields kept in its head, written before those in `headers`.
    pub raw: Option<&'a RawFields>,
    pub framing: Framing,
    /// `Connection: close` (this is the last response) or, to an HTTP/1.0 client that asked,
    /// `Connection: keep-alive`.
    pub close: bool,
    pub client_version: Version,
}

/// Bytes queued for the client, written with as few calls as the stream allows.
#[derive(Default)]
pub struct Output {
    segments: VecDeque<Bytes>,
    tail: BytesMut,
    queued: usize,
    /// Everything was written, but the stream's flush has not completed: a TLS stream takes the
    /// bytes into its own buffer and sends them as records only as the flush goes on (the socket
    /// may have been unwritable for the moment, as one just registered with the poller is until
    /// the poller first reports it).
    flush_pending: bool,
}

impl Output {
    /// Nothing queued and nothing waiting in the stream to be flushed: the bytes are on their way.
    pub fn is_empty(&self) -> bool {
        self.queued == 0 && !self.flush_pending
    }

    pub fn len(&self) -> usize {
        self.queued
    }

    /// Room for `additional` bytes in the current write, in one allocation.
    pub fn reserve(&mut self, additional: usize) {
        if self.tail.capacity() == 0 {
            // Most heads start an empty buffer: allocated at its size at once, where `reserve`
            // would take its longer way (growing a vector) to the same allocation.
            self.tail = BytesMut::with_capacity(additional);
        } else {
            self.tail.reserve(additional);
        }
    }

    pub fn put_content_length(&mut self, n: u64) {
        self.put_slice(b"content-length: ");
        self.put_slice(itoa::Buffer::new().format(n).as_bytes());
        self.put_slice(b"\r\n");
    }

    pub fn put_slice(&mut self, bytes: &[u8]) {
        self.tail.extend_from_slice(bytes);
        self.queued += bytes.len();
    }

    pub fn put_bytes(&mut self, bytes: Bytes) {
        if bytes.len() <= COPY_LIMIT {
            self.put_slice(&bytes);
            return;
        }
        self.seal_tail();
        self.queued += bytes.len();
        self.segments.push_back(bytes);
    }

    fn seal_tail(&mut self) {
        if !self.tail.is_empty() {
            self.segments.push_back(self.tail.split().freeze());
        }
    }

    pub fn encode_head(&mut self, head: &ResponseHead<'_>) {
        let reason = head.reason.unwrap_or_else(|| head.status.canonical_reason().unwrap_or("").as_bytes());
        let mapped = || head.headers.iter().map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes()));
        // Each kept field takes no more room than its line in the upstream's head.
        let kept_size = head.raw.map_or(0, RawFields::head_len);
        let size = mapped().fold(32 + reason.len() + kept_size, |size, (name, value)| size + name.len() + value.len() + 4);
        self.reserve(size + 96);
        let before = self.tail.len();
        let out = &mut self.tail;
        out.put_slice(b"HTTP/1.1 ");
        out.put_slice(head.status.as_str().as_bytes());
        out.put_u8(b' ');
        out.put_slice(reason);
        out.put_slice(b"\r\n");
        let mut has_date = false;
        let mut has_length = false;
        // Whether a field goes on, noting the ones this head must otherwise add.
        let mut goes_on = |name: &[u8]| {
            // The names that matter here, told apart from most others by their length.
            let is = |known: &HeaderName| equals_lowercase_any_case(name, known.as_str().as_bytes());
            match name.len() {
                10 if is(&header::CONNECTION) && head.status != StatusCode::SWITCHING_PROTOCOLS => return false,
                17 if is(&header::TRANSFER_ENCODING) => return false,
                14 if is(&header::CONTENT_LENGTH) => {
                    if head.framing != Framing::NoBody && !matches!(head.framing, Framing::Length(_)) {
                        return false;
                    }
                    has_length = true;
                }
                4 if is(&header::DATE) => has_date = true,
                _ => {}
            }
            true
        };
        let put_field = |out: &mut BytesMut, name: &[u8], value: &[u8]| {
            out.put_slice(name);
            out.put_slice(b": ");
            out.put_slice(value);
            out.put_slice(b"\r\n");
        };
        // The upstream's fields as they came (`RawFields`): lines that follow one another in its
        // head, each `name: value` CRLF, are copied as one run.
        if let Some(raw) = head.raw {
            let mut run: Option<std::ops::Range<usize>> = None;
            for field in raw.fields() {
                if !goes_on(field.name) {
                    continue;
                }
                match (field.line, run.as_mut()) {
                    (Some(line), Some(lines)) if lines.end == line.start => lines.end = line.end,
                    (line, _) => {
                        if let Some(lines) = run.take() {
                            out.put_slice(&raw.head()[lines]);
                        }
                        match line {
                            Some(line) => run = Some(line),
                            None => put_field(out, field.name, field.value),
                        }
                    }
                }
            }
            if let Some(lines) = run {
                out.put_slice(&raw.head()[lines]);
            }
        }
        // Then any in the map.
        for (name, value) in mapped() {
            if goes_on(name) {
                put_field(out, name, value);
            }
        }
        if !has_date {
            out.put_slice(b"date: ");
            with_http_date(|date| out.put_slice(date));
            out.put_slice(b"\r\n");
        }
        match head.framing {
            Framing::Length(n) if !has_length => {
                out.put_slice(b"content-length: ");
                out.put_slice(itoa::Buffer::new().format(n).as_bytes());
                out.put_slice(b"\r\n");
            }
            Framing::Chunked => out.put_slice(b"transfer-encoding: chunked\r\n"),
            _ => {}
        }
        if head.close {
            out.put_slice(b"connection: close\r\n");
        } else if head.client_version == Version::HTTP_10 {
            out.put_slice(b"connection: keep-alive\r\n");
        }
        out.put_slice(b"\r\n");
        self.queued += self.tail.len() - before;
    }

    /// A data frame of a chunked body.
    pub fn put_chunk(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        let mut size = [0u8; 18];
        let digits = hex_usize(data.len(), &mut size[..16]);
        let len = digits.len();
        size.copy_within(16 - len..16, 0);
        size[len] = b'\r';
        size[len + 1] = b'\n';
        self.put_slice(&size[..len + 2]);
        self.put_bytes(data);
        self.put_slice(b"\r\n");
    }

    pub fn put_last_chunk(&mut self) {
        self.put_slice(b"0\r\n\r\n");
    }

    /// Writes everything queued, then flushes the stream.
    pub fn poll_write_all<S: AsyncWrite + Unpin>(&mut self, cx: &mut Context<'_>, io: &mut S) -> Poll<io::Result<()>> {
        // Most writes are the tail alone (a head, small bodies): written from where it is, as
        // making it a segment would allocate twice (its shared form and the queue's room).
        if self.segments.is_empty() {
            while !self.tail.is_empty() {
                let written = std::task::ready!(Pin::new(&mut *io).poll_write(cx, &self.tail))?;
                if written == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.tail.advance(written);
                self.queued -= written;
            }
        }
        self.seal_tail();
        while !self.segments.is_empty() {
            let written = if io.is_write_vectored() && self.segments.len() > 1 {
                let mut slices = [IoSlice::new(&[]); MAX_SLICES];
                let count = self.segments.len().min(MAX_SLICES);
                for (slice, segment) in slices.iter_mut().zip(self.segments.iter()) {
                    *slice = IoSlice::new(segment);
                }
                std::task::ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..count]))?
            } else {
                std::task::ready!(Pin::new(&mut *io).poll_write(cx, &self.segments[0]))?
            };
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.advance(written);
        }
        if self.tail.capacity() > 4 * COPY_LIMIT {
            // A large response's buffer is not kept for the next one.
            self.tail = BytesMut::new();
        }
        let flushed = Pin::new(&mut *io).poll_flush(cx);
        self.flush_pending = flushed.is_pending();
        flushed
    }

    fn advance(&mut self, mut n: usize) {
        self.queued -= n;
        while n > 0 {
            let Some(front) = self.segments.front_mut() else { return };
            if n < front.len() {
                front.advance(n);
                return;
            }
            n -= front.len();
            self.segments.pop_front();
        }
    }
}

fn hex_usize(mut n: usize, out: &mut [u8]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut at = out.len();
    loop {
        at -= 1;
        out[at] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            return &out[at..];
        }
    }
}

/// The current `Date` value, formatted once a second per thread.
pub(crate) fn with_http_date(f: impl FnOnce(&[u8])) {
    thread_local! {
        static CACHED: std::cell::RefCell<(u64, [u8; 29])> = const { std::cell::RefCell::new((u64::MAX, [0; 29])) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second {
            let text = httpdate::fmt_http_date(now);
            if text.len() == 29 {
                cached.1.copy_from_slice(text.as_bytes());
                cached.0 = second;
            }
        }
        f(&cached.1);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::h1::fields::FieldSpans;
    use http::HeaderValue;

    fn written(output: &mut Output) -> String {
        output.seal_tail();
        let mut all = Vec::new();
        for segment in &output.segments {
            all.extend_from_slice(segment);
        }
        String::from_utf8(all).unwrap()
    }

    /// A stream like a TLS one: it takes every write into its own buffer, and sends it only as
    /// its flush goes on, which waits the first time (the socket not yet reported writable).
    struct BufferingStream {
        taken: Vec<u8>,
        sent: Vec<u8>,
        flush_waits: usize,
    }

    impl AsyncWrite for BufferingStream {
        fn poll_write(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
            self.taken.extend_from_slice(data);
            Poll::Ready(Ok(data.len()))
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            if self.flush_waits > 0 {
                self.flush_waits -= 1;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let taken = std::mem::take(&mut self.taken);
            self.sent.extend_from_slice(&taken);
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn output_is_not_done_until_the_stream_has_flushed_what_it_took() {
        let mut stream = BufferingStream { taken: Vec::new(), sent: Vec::new(), flush_waits: 1 };
        let mut output = Output::default();
        output.put_slice(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n");
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(output.poll_write_all(&mut cx, &mut stream).is_pending());
        // Every byte was taken, none sent: the response is not out yet.
        assert_eq!(output.len(), 0);
        assert!(!output.is_empty());
        assert!(stream.sent.is_empty());
        assert!(output.poll_write_all(&mut cx, &mut stream).is_ready());
        assert!(output.is_empty());
        assert!(stream.sent.starts_with(b"HTTP/1.1 401"));
    }

    #[test]
    fn heads_carry_the_connections_own_fields() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        headers.insert(header::DATE, HeaderValue::from_static("Sat, 05 Dec 2026 10:00:00 GMT"));
        let mut output = Output::default();
        output.encode_head(&ResponseHead {
            status: StatusCode::OK,
            reason: None,
            headers: &headers,
            raw: None,
            framing: Framing::Chunked,
            close: true,
            client_version: Version::HTTP_11,
        });
        output.put_chunk(Bytes::from_static(b"hello world, this is 31 bytes!!"));
        output.put_last_chunk();
        assert_eq!(
            written(&mut output),
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ndate: Sat, 05 Dec 2026 10:00:00 GMT\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n1f\r\nhello world, this is 31 bytes!!\r\n0\r\n\r\n"
        );
    }

    #[test]
    fn fields_kept_in_the_upstream_head_go_out_as_they_came_before_the_maps() {
        let head = Bytes::from_static(b"HTTP/1.1 200 OK\r\nServer: up\r\nContent-Length: 2\r\nConnection: keep-alive\r\nX-Mixed-Case:A b\r\nX-Last: z\r\n\r\n");
        let field = |name: &str, value: &str| {
            let at = |part: &str| head.windows(part.len()).position(|w| w == part.as_bytes()).expect("in the head");
            (head.slice(at(name)..at(name) + name.len()), head.slice(at(value)..at(value) + value.len()))
        };
        let mut spans = FieldSpans::new(head.len()).expect("short head");
        // `Connection` is a hop's own, and `X-Mixed-Case` has no space after its colon: the lines
        // around them are copied, they are not (and `X-Mixed-Case` is written anew).
        for (name, value) in [field("Server", "up"), field("Content-Length", "2"), field("Connection", "keep-alive"), field("X-Mixed-Case", "A b"), field("X-Last", "z")] {
            assert!(spans.push(&head, &name, &value));
        }
        let raw = spans.into_fields(head.clone());
        let mut headers = HeaderMap::new();
        headers.insert(header::ALT_SVC, HeaderValue::from_static("h3=\":443\""));
        let mut output = Output::default();
        output.encode_head(&ResponseHead {
            status: StatusCode::OK,
            reason: None,
            headers: &headers,
            raw: Some(&raw),
            framing: Framing::Length(2),
            close: false,
            client_version: Version::HTTP_11,
        });
        let text = written(&mut output);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\nServer: up\r\nContent-Length: 2\r\nX-Mixed-Case: A b\r\nX-Last: z\r\nalt-svc: h3=\":443\"\r\ndate: "), "{text}");
        assert!(text.ends_with(" GMT\r\n\r\n"), "{text}");
        // The same fields made a map, as anything that reads them first does.
        let map = raw.into_map();
        assert_eq!(map.get("x-mixed-case").map(|v| v.as_bytes()), Some(&b"A b"[..]));
        assert_eq!(map.len(), 5);
    }

    #[test]
    fn lengths_and_reasons() {
        let headers = HeaderMap::new();
        let mut output = Output::default();
        output.encode_head(&ResponseHead {
            status: StatusCode::NOT_FOUND,
            reason: Some(b"Nothing Here"),
            headers: &headers,
            raw: None,
            framing: Framing::Length(1234567),
            close: false,
            client_version: Version::HTTP_10,
        });
        let text = written(&mut output);
        assert!(text.starts_with("HTTP/1.1 404 Nothing Here\r\ndate: "), "{text}");
        assert!(text.ends_with(" GMT\r\ncontent-length: 1234567\r\nconnection: keep-alive\r\n\r\n"), "{text}");
    }
}
