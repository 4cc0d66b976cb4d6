//! Differential test of our HTTP/1.x request reading against httparse (the head alone) and hyper
//! 1.x's HTTP/1 server (head and body), over a table of requests: valid ones of every kind and the
//! request-smuggling and edge cases.
//!
//! Per row, three verdicts:
//! - ours: `parse_head` (head limit `MAX_HEAD`) as `h1::server` reads a head (a non-HTTP first line
//!   and the HTTP/2 preface are a 400 there), the target as an `http::Uri` (`Exchange::start`),
//!   then `BodyDecoder` over the bytes after the head when the head says there is a body;
//! - httparse: `httparse::Request::parse` of the bytes, 100 header slots: did it read a head;
//! - hyper: `http1::Builder::new().serve_connection` over a `tokio::io::duplex` pair, the bytes
//!   written and the client's write half shut (`half_close(true)`, so that hyper still answers
//!   after that end of input); the service collects the whole body and answers 200 with it, or
//!   fails (hyper then closes without answering); the verdict is the first final response's
//!   status and body, or "closed".
//!
//! Each row states our verdict exactly. Where ours and the other side disagree (one accepts, the
//! other refuses, or both accept with other bodies; httparse: one reads a head, the other not),
//! the row must carry a one-line explanation, and a row that carries one must still disagree:
//! a change on either side makes the test fail until the table is brought up to date.

use std::fmt::Write as _;
use std::time::Duration;

use bytes::BytesMut;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::decode::{BodyDecoder, DecodeError, Decoded};
use crate::http::head::{parse_head, BodyLength, HeadParse, MAX_HEADERS};

const MAX_HEAD: usize = 64 * 1024;

/// What our server side makes of a connection's bytes.
#[derive(Debug, Clone, PartialEq)]
enum Ours {
    /// The head and the whole body: the body's data.
    Accept(Vec<u8>),
    /// The head is refused with this status.
    Refuse(u16),
    /// The bytes end inside the head.
    HeadIncomplete,
    /// The head is accepted, its body is malformed.
    BadBody(DecodeError),
    /// The head is accepted, the bytes end inside its body.
    BodyIncomplete,
}

impl Ours {
    fn head_accepted(&self) -> bool {
        matches!(self, Ours::Accept(_) | Ours::BadBody(_) | Ours::BodyIncomplete)
    }
}

fn accept(body: &[u8]) -> Ours {
    Ours::Accept(body.to_vec())
}

const R400: Ours = Ours::Refuse(400);
const R431: Ours = Ours::Refuse(431);

fn ours(bytes: &[u8]) -> Ours {
    let head = match parse_head(bytes, MAX_HEAD) {
        HeadParse::Request(head) => head,
        HeadParse::Refused(refusal) => return Ours::Refuse(refusal.status.as_u16()),
        HeadParse::Incomplete => return Ours::HeadIncomplete,
        // `h1::server::read_head`: nothing but an HTTP/1.x request is served there.
        HeadParse::NotHttp | HeadParse::H2Preface => return R400,
    };
    if head.target.parse::<Uri>().is_err() {
        return R400;
    }
    let mut decoder = match head.body {
        BodyLength::None | BodyLength::Length(0) => return Ours::Accept(Vec::new()),
        BodyLength::Length(n) => BodyDecoder::length(n),
        // As `h1::server` makes it: trailers are bounded by the head limit.
        BodyLength::Chunked => BodyDecoder::chunked(MAX_HEAD),
    };
    let mut buf = BytesMut::from(&bytes[head.len..]);
    let mut data = Vec::new();
    loop {
        match decoder.decode(&mut buf) {
            Ok(Some(Decoded::Data(bytes))) => data.extend_from_slice(&bytes),
            Ok(Some(Decoded::End(_))) => return Ours::Accept(data),
            Ok(None) => return Ours::BodyIncomplete,
            Err(error) => return Ours::BadBody(error),
        }
    }
}

/// httparse's reading of the head alone.
fn httparse_verdict(bytes: &[u8]) -> Result<usize, String> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut storage);
    match request.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => Ok(len),
        Ok(httparse::Status::Partial) => Err("partial".into()),
        Err(error) => Err(format!("{error:?}")),
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Hyper {
    /// The first final response: its status and body.
    Status(u16, Vec<u8>),
    Closed,
}

async fn hyper_verdict(bytes: Vec<u8>) -> Hyper {
    // Room for every row's bytes at once, so the write never waits for hyper to read.
    let (mut client, server) = tokio::io::duplex(bytes.len() + 64 * 1024);
    let service = service_fn(|request: Request<Incoming>| async move {
        let body = request.into_body().collect().await?.to_bytes();
        Ok::<_, hyper::Error>(Response::new(Full::new(body)))
    });
    // `half_close`: the client's write half is shut right after the request; without it hyper
    // takes that end of input for the client leaving, and drops the answer it is working on.
    let connection = tokio::spawn(hyper::server::conn::http1::Builder::new().half_close(true).serve_connection(TokioIo::new(server), service));
    let mut out = Vec::new();
    let io = async {
        client.write_all(&bytes).await?;
        client.shutdown().await?;
        client.read_to_end(&mut out).await
    };
    let finished = tokio::time::timeout(Duration::from_secs(10), io).await;
    connection.abort();
    assert!(finished.is_ok(), "hyper neither answered nor closed within 10 s");
    first_response(&out)
}

/// The first final (non-1xx) response in `out`.
fn first_response(mut out: &[u8]) -> Hyper {
    loop {
        let mut storage = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut storage);
        let Ok(httparse::Status::Complete(len)) = response.parse(out) else { return Hyper::Closed };
        let status = response.code.unwrap_or(0);
        if (100..200).contains(&status) {
            out = &out[len..];
            continue;
        }
        let length = response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
            .unwrap_or(0);
        let body = out[len..].get(..length).unwrap_or(&out[len..]).to_vec();
        return Hyper::Status(status, body);
    }
}

struct Row {
    name: &'static str,
    bytes: Vec<u8>,
    ours: Ours,
    /// Why httparse reads a head where we refuse it, or the other way round.
    httparse: Option<&'static str>,
    /// Why hyper accepts where we refuse, or the other way round.
    hyper: Option<&'static str>,
}

fn row(name: &'static str, bytes: impl AsRef<[u8]>, ours: Ours) -> Row {
    Row { name, bytes: bytes.as_ref().to_vec(), ours, httparse: None, hyper: None }
}

impl Row {
    fn httparse(mut self, why: &'static str) -> Row {
        self.httparse = Some(why);
        self
    }

    fn hyper(mut self, why: &'static str) -> Row {
        self.hyper = Some(why);
        self
    }
}

/// `POST / HTTP/1.1`, `Host: a.test`, the given header lines, the empty line, then `body`.
fn post(headers: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes = format!("POST / HTTP/1.1\r\nHost: a.test\r\n{headers}\r\n").into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

fn chunked(body: &[u8]) -> Vec<u8> {
    post("Transfer-Encoding: chunked\r\n", body)
}

// Why httparse, which reads the syntax of a head and nothing more, and hyper differ from us.
const HP_FRAMING: &str = "httparse reads syntax only; the framing rules (RFC 9112 §6.1, §6.3) are ours, on top of it";
const HP_TARGET: &str = "httparse reads syntax only; the target-form and Host rules (RFC 9112 §3.2) are ours, on top of it";
const HP_BARE_LF: &str = "httparse takes a bare LF as a line end (RFC 9112 §2.2 lets a recipient); we refuse it, as a next hop may not";
const HY_CL_TE: &str = "hyper frames by TE and drops CL (RFC 9112 §6.3); a proxy must not pass such a message on, and a server may reject it (§6.1): we do";
const HY_CHUNKED_TWICE: &str = "hyper checks only that the last coding is chunked; chunked must not be applied twice (RFC 9112 §6.1), so we refuse";
const HY_BARE_LF: &str = "hyper (httparse) takes a bare LF as a line end; we refuse it, as a next hop may split the head elsewhere";
const HY_HOST: &str = "hyper leaves Host to the service; RFC 9112 §3.2 requires a 400 for a missing, repeated or invalid Host, and we route by it";
const HY_EXT: &str = "hyper skips chunk-extension bytes up to the CR unparsed; we parse chunk-ext strictly (RFC 9112 §7.1.1) so no hop reads it differently";

fn rows() -> Vec<Row> {
    let big_head = {
        let mut bytes = b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Big: ".to_vec();
        bytes.resize(bytes.len() + MAX_HEAD, b'a');
        bytes.extend_from_slice(b"\r\n\r\n");
        bytes
    };
    let many_headers = {
        let mut bytes = b"GET / HTTP/1.1\r\nHost: a.test\r\n".to_vec();
        for i in 1..MAX_HEADERS {
            bytes.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        bytes.extend_from_slice(b"\r\n");
        bytes
    };
    let long_extensions = {
        let mut body = b"1".to_vec();
        for _ in 0..2000 {
            body.extend_from_slice(b";abcdefghi");
        }
        body.extend_from_slice(b"\r\nx\r\n0\r\n\r\n");
        chunked(&body)
    };
    let big_trailers = {
        let mut body = b"1\r\nx\r\n0\r\n".to_vec();
        for i in 0..30 {
            body.extend_from_slice(format!("X-T{i}: {}\r\n", "t".repeat(800)).as_bytes());
        }
        body.extend_from_slice(b"\r\n");
        chunked(&body)
    };
    let many_chunks = {
        let mut body = Vec::new();
        let mut data = Vec::new();
        for i in 0..200u32 {
            let chunk = format!("{i:03}-");
            body.extend_from_slice(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes());
            data.extend_from_slice(chunk.as_bytes());
        }
        body.extend_from_slice(b"0\r\n\r\n");
        (chunked(&body), data)
    };

    vec![
        // Valid requests.
        row("GET", b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", accept(b"")),
        row("GET with a query", b"GET /p/q?x=1&y=%20 HTTP/1.1\r\nHost: a.test\r\n\r\n", accept(b"")),
        row("HEAD", b"HEAD /x HTTP/1.1\r\nHost: a.test\r\n\r\n", accept(b"")),
        row("DELETE", b"DELETE /x HTTP/1.1\r\nHost: a.test\r\n\r\n", accept(b"")),
        row("Host with a port", b"GET / HTTP/1.1\r\nHost: a.test:8080\r\n\r\n", accept(b"")),
        row("Host as an IPv6 literal", b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n", accept(b"")),
        row("empty Host value", b"GET / HTTP/1.1\r\nHost:\r\n\r\n", accept(b"")),
        row("HTTP/1.0 without Host", b"GET / HTTP/1.0\r\n\r\n", accept(b"")),
        row("HTTP/1.0 POST with Content-Length", b"POST / HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc", accept(b"abc")),
        row("OPTIONS *", b"OPTIONS * HTTP/1.1\r\nHost: a.test\r\n\r\n", accept(b"")),
        row("CONNECT authority-form", b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n", accept(b"")),
        row("absolute-form, same Host", b"GET http://a.test/p?q HTTP/1.1\r\nHost: a.test\r\n\r\n", accept(b"")),
        row("absolute-form without a path", b"GET http://a.test HTTP/1.1\r\nHost: a.test\r\n\r\n", accept(b"")),
        row("lowercase method", b"get / HTTP/1.1\r\nHost: a.test\r\n\r\n", accept(b"")),
        row("extension method", b"PURGE /x HTTP/1.1\r\nHost: a.test\r\n\r\n", accept(b"")),
        row("empty lines before the request line", b"\r\n\r\nGET / HTTP/1.1\r\nHost: a.test\r\n\r\n", accept(b"")),
        row("obs-text in a header value", b"GET / HTTP/1.1\r\nHost: a.test\r\nX-T: caf\xc3\xa9\r\n\r\n", accept(b"")),
        row("empty header value", b"GET / HTTP/1.1\r\nHost: a.test\r\nX-E:\r\n\r\n", accept(b"")),
        row("tab around a header value", b"GET / HTTP/1.1\r\nHost:\ta.test\t\r\n\r\n", accept(b"")),
        row("Upgrade: websocket", b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", accept(b"")),
        row("Expect: 100-continue", post("Expect: 100-continue\r\nContent-Length: 5\r\n", b"hello"), accept(b"hello")),
        row("pipelined GETs", b"GET /1 HTTP/1.1\r\nHost: a.test\r\n\r\nGET /2 HTTP/1.1\r\nHost: a.test\r\n\r\n", accept(b"")),
        row("Content-Length body", post("Content-Length: 5\r\n", b"hello"), accept(b"hello")),
        row("Content-Length body, then a pipelined request", post("Content-Length: 5\r\n", b"helloGET / HTTP/1.1\r\nHost: a.test\r\n\r\n"), accept(b"hello")),
        row("Content-Length: 0", post("Content-Length: 0\r\n", b""), accept(b"")),
        row("Content-Length with leading zeros", post("Content-Length: 005\r\n", b"hello"), accept(b"hello")),
        row("Content-Length twice, the same", post("Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"), accept(b"hello")),
        row("chunked", chunked(b"5\r\nhello\r\n0\r\n\r\n"), accept(b"hello")),
        row("chunked, several chunks", chunked(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"), accept(b"hello world")),
        row("chunked, 200 chunks", &many_chunks.0, Ours::Accept(many_chunks.1.clone())),
        row("chunked, uppercase hex", chunked(b"A\r\n0123456789\r\n0\r\n\r\n"), accept(b"0123456789")),
        row("chunked, leading zeros", chunked(b"0005\r\nhello\r\n000\r\n\r\n"), accept(b"hello")),
        row("chunked, 20 leading zeros", chunked(b"00000000000000000005\r\nhello\r\n0\r\n\r\n"), accept(b"hello")),
        row("chunked, extensions", chunked(b"5;name=value;flag\r\nhello\r\n0;last\r\n\r\n"), accept(b"hello")),
        row("chunked, quoted extension", chunked(b"5;q=\"a \\\" b\"\r\nhello\r\n0\r\n\r\n"), accept(b"hello")),
        row("chunked, whitespace around extensions", chunked(b"5 ; a = b \r\nhello\r\n0\r\n\r\n"), accept(b"hello")),
        row("chunked, whitespace after the size", chunked(b"5 \r\nhello\r\n0\r\n\r\n"), accept(b"hello")),
        row("chunked, trailers", chunked(b"5\r\nhello\r\n0\r\nX-Sum: 1\r\nX-Two: 2\r\n\r\n"), accept(b"hello")),
        row("chunked, Content-Length as a trailer", chunked(b"5\r\nhello\r\n0\r\nContent-Length: 5\r\n\r\n"), accept(b"hello")),
        row("Transfer-Encoding: gzip, chunked", post("Transfer-Encoding: gzip, chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"), accept(b"hello")),
        row("Transfer-Encoding: Chunked (case)", post("Transfer-Encoding: Chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"), accept(b"hello")),
        row("Transfer-Encoding over two lines", post("Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"), accept(b"hello")),
        row("100 header fields", &many_headers, accept(b"")),
        // Framing: Content-Length and Transfer-Encoding.
        row("CL then TE", post("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"), R400).httparse(HP_FRAMING).hyper(HY_CL_TE),
        row("TE then CL", post("Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", b"5\r\nhello\r\n0\r\n\r\n"), R400).httparse(HP_FRAMING).hyper(HY_CL_TE),
        row("CL.TE smuggling shape", post("Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\nG"), R400).httparse(HP_FRAMING).hyper(HY_CL_TE),
        row("differing Content-Lengths", post("Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"), R400).httparse(HP_FRAMING),
        row("Content-Length: 5, 5", post("Content-Length: 5, 5\r\n", b"hello"), R400).httparse(HP_FRAMING),
        row("Content-Length: 5, 6", post("Content-Length: 5, 6\r\n", b"hello!"), R400).httparse(HP_FRAMING),
        row("Content-Length: +5", post("Content-Length: +5\r\n", b"hello"), R400).httparse(HP_FRAMING),
        row("Content-Length: -1", post("Content-Length: -1\r\n", b""), R400).httparse(HP_FRAMING),
        row("Content-Length: 5a", post("Content-Length: 5a\r\n", b"hello"), R400).httparse(HP_FRAMING),
        row("empty Content-Length", post("Content-Length:\r\n", b""), R400).httparse(HP_FRAMING),
        row("Content-Length past u64", post("Content-Length: 99999999999999999999\r\n", b""), R400).httparse(HP_FRAMING),
        row("Content-Length body cut short", post("Content-Length: 5\r\n", b"hel"), Ours::BodyIncomplete),
        row("Transfer-Encoding: chunked, identity", post("Transfer-Encoding: chunked, identity\r\n", b"5\r\nhello\r\n0\r\n\r\n"), R400).httparse(HP_FRAMING),
        row("Transfer-Encoding: chunked, chunked", post("Transfer-Encoding: chunked, chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"), R400).httparse(HP_FRAMING).hyper(HY_CHUNKED_TWICE),
        row("Transfer-Encoding: chunked twice", post("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"), R400).httparse(HP_FRAMING).hyper(HY_CHUNKED_TWICE),
        row("Transfer-Encoding: gzip", post("Transfer-Encoding: gzip\r\n", b"hello"), R400).httparse(HP_FRAMING),
        row("Transfer-Encoding: xchunked", post("Transfer-Encoding: xchunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"), R400).httparse(HP_FRAMING),
        row("empty Transfer-Encoding", post("Transfer-Encoding:\r\n", b""), R400).httparse(HP_FRAMING),
        row("Transfer-Encoding : chunked", post("Transfer-Encoding : chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"), R400),
        row("Transfer-Encoding with a space before the name", b"POST / HTTP/1.1\r\nHost: a.test\r\n Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", R400),
        row("HTTP/1.0 with Transfer-Encoding", b"POST / HTTP/1.0\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", R400).httparse(HP_FRAMING),
        // The head.
        row("obs-fold", b"GET / HTTP/1.1\r\nHost: a.test\r\nX-F: a\r\n b\r\n\r\n", R400),
        row("bare LF line ends", b"GET / HTTP/1.1\nHost: a.test\n\n", R400).httparse(HP_BARE_LF).hyper(HY_BARE_LF),
        row("one bare LF in the head", b"GET / HTTP/1.1\r\nHost: a.test\nX: b\r\n\r\n", R400).httparse(HP_BARE_LF).hyper(HY_BARE_LF),
        row("bare CR in the head", b"GET / HTTP/1.1\r\nHost: a.test\rX: b\r\n\r\n", R400),
        row("tabs in the request line", b"GET\t/\tHTTP/1.1\r\nHost: a.test\r\n\r\n", R400),
        row("two spaces in the request line", b"GET  / HTTP/1.1\r\nHost: a.test\r\n\r\n", R400),
        row("space in the target", b"GET /a b HTTP/1.1\r\nHost: a.test\r\n\r\n", R400),
        row("fragment in the target", b"GET /a#b HTTP/1.1\r\nHost: a.test\r\n\r\n", R400).httparse("httparse takes `#` in a target; a fragment is no part of a request target (RFC 9110 §7.1, RFC 9112 §3.2)").hyper("hyper's `http::Uri` drops a fragment silently; we refuse it, as the hop after us may route or sign by the raw target"),
        row("target without a slash", b"GET a HTTP/1.1\r\nHost: a.test\r\n\r\n", R400).httparse(HP_TARGET).hyper("hyper takes any target `http::Uri` parses (`a` as an authority); we take only the form the method allows (RFC 9112 §3.2)"),
        row("absolute-form, other scheme", b"GET ftp://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n", R400).httparse(HP_TARGET).hyper("hyper takes any scheme in absolute-form; we forward http and https targets only"),
        row("absolute-form, other Host", b"GET http://a.test/ HTTP/1.1\r\nHost: b.test\r\n\r\n", R400).httparse(HP_TARGET).hyper("hyper does not compare target and Host; a proxy routes by the host, so both must name the same one (RFC 9112 §3.2.2)"),
        row("two Host fields", b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n", R400).httparse(HP_TARGET).hyper(HY_HOST),
        row("no Host on HTTP/1.1", b"GET / HTTP/1.1\r\n\r\n", R400).httparse(HP_TARGET).hyper(HY_HOST),
        row("Host that is no host", b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", R400).httparse(HP_TARGET).hyper(HY_HOST),
        row("HTTP/1.2", b"GET / HTTP/1.2\r\nHost: a.test\r\n\r\n", R400),
        row("HTTP/2.0 request line", b"GET / HTTP/2.0\r\nHost: a.test\r\n\r\n", R400),
        row("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", R400),
        row("NUL in a header value", b"GET / HTTP/1.1\r\nHost: a.test\r\nX: a\0b\r\n\r\n", R400),
        row("header name with a parenthesis", b"GET / HTTP/1.1\r\nHost: a.test\r\nX(y): a\r\n\r\n", R400),
        row("header line without a colon", b"GET / HTTP/1.1\r\nHost: a.test\r\nXY\r\n\r\n", R400),
        row("not HTTP", b"HELLO WORLD\r\n\r\n", R400),
        row("101 header fields", [&many_headers[..many_headers.len() - 2], b"X-Last: v\r\n\r\n"].concat(), R431),
        row("head over 64 KiB", &big_head, R431).httparse("httparse has no size limit; ours is the engine's maxHeaderSize (64 KiB here), then 431").hyper("hyper's default head limit is its ~400 KiB read buffer; ours is the engine's maxHeaderSize (64 KiB here)"),
        row("head cut short", b"GET / HTTP/1.1\r\nHost: a.test\r\n", Ours::HeadIncomplete),
        row("no bytes", b"", Ours::HeadIncomplete),
        // Chunk framing.
        row("bare LF after the chunk size", chunked(b"5\nhello\r\n0\r\n\r\n"), Ours::BadBody(DecodeError::LineEnd)),
        row("bare LF after the chunk data", chunked(b"5\r\nhello\n0\r\n\r\n"), Ours::BadBody(DecodeError::LineEnd)),
        row("bare LF after the last chunk", chunked(b"5\r\nhello\r\n0\n\n"), Ours::BadBody(DecodeError::LineEnd)),
        row("bare LF ending the trailers", chunked(b"5\r\nhello\r\n0\r\n\n"), Ours::BadBody(DecodeError::Trailers)),
        row("bare LF inside the trailers", chunked(b"5\r\nhello\r\n0\r\nX: a\nY: b\r\n\r\n"), Ours::BadBody(DecodeError::LineEnd)),
        row("bare CR after the chunk data", chunked(b"5\r\nhello\r0\r\n\r\n"), Ours::BadBody(DecodeError::LineEnd)),
        row("chunk size x", chunked(b"x\r\nhello\r\n0\r\n\r\n"), Ours::BadBody(DecodeError::ChunkSize)),
        row("chunk size 0x5", chunked(b"0x5\r\nhello\r\n0\r\n\r\n"), Ours::BadBody(DecodeError::ChunkSize)),
        row("chunk size -5", chunked(b"-5\r\nhello\r\n0\r\n\r\n"), Ours::BadBody(DecodeError::ChunkSize)),
        row("chunk size +5", chunked(b"+5\r\nhello\r\n0\r\n\r\n"), Ours::BadBody(DecodeError::ChunkSize)),
        row("empty chunk size", chunked(b"\r\n\r\n"), Ours::BadBody(DecodeError::ChunkSize)),
        row("whitespace before the chunk size", chunked(b" 5\r\nhello\r\n0\r\n\r\n"), Ours::BadBody(DecodeError::ChunkSize)),
        row("whitespace inside the chunk size", chunked(b"5 5\r\nhello\r\n0\r\n\r\n"), Ours::BadBody(DecodeError::ChunkExtension)),
        row("only whitespace as the chunk size", chunked(b" \r\n\r\n"), Ours::BadBody(DecodeError::ChunkSize)),
        row("chunk size past u64", chunked(b"10000000000000000\r\nhello\r\n0\r\n\r\n"), Ours::BadBody(DecodeError::ChunkSize)),
        row("chunk size of 2^64-1, cut short", chunked(b"FFFFFFFFFFFFFFFF\r\nhello"), Ours::BodyIncomplete),
        row("chunk longer than its size", chunked(b"5\r\nhelloX\r\n0\r\n\r\n"), Ours::BadBody(DecodeError::LineEnd)),
        row("chunk shorter than its size", chunked(b"6\r\nhello\r\n0\r\n\r\n"), Ours::BadBody(DecodeError::LineEnd)),
        row("extension with an unterminated quote", chunked(b"5;a=\"x\r\nhello\r\n0\r\n\r\n"), Ours::BadBody(DecodeError::ChunkExtension)).hyper(HY_EXT),
        row("extension without a name", chunked(b"5;\r\nhello\r\n0\r\n\r\n"), Ours::BadBody(DecodeError::ChunkExtension)).hyper(HY_EXT),
        row("extension with a control byte", chunked(b"5;a=\x01\r\nhello\r\n0\r\n\r\n"), Ours::BadBody(DecodeError::ChunkExtension)).hyper(HY_EXT),
        row("extension value with a space", chunked(b"5;a=b c\r\nhello\r\n0\r\n\r\n"), Ours::BadBody(DecodeError::ChunkExtension)).hyper(HY_EXT),
        row("extension with a bare LF", chunked(b"5;a\nhello\r\n0\r\n\r\n"), Ours::BadBody(DecodeError::LineEnd)),
        row("extensions over 16 KiB", &long_extensions, Ours::BadBody(DecodeError::TooLarge)),
        row("0\\r\\n without the final CRLF", chunked(b"5\r\nhello\r\n0\r\n"), Ours::BodyIncomplete),
        row("0\\r\\n\\r without its LF", chunked(b"5\r\nhello\r\n0\r\n\r"), Ours::BodyIncomplete),
        row("no last chunk", chunked(b"5\r\nhello\r\n"), Ours::BodyIncomplete),
        row("trailer with a space before the colon", chunked(b"5\r\nhello\r\n0\r\nX : a\r\n\r\n"), Ours::BadBody(DecodeError::Trailers)),
        row("trailer without a colon", chunked(b"5\r\nhello\r\n0\r\nXY\r\n\r\n"), Ours::BadBody(DecodeError::Trailers)),
        row("trailer obs-fold", chunked(b"5\r\nhello\r\n0\r\nX: a\r\n b\r\n\r\n"), Ours::BadBody(DecodeError::Trailers)),
        row("trailers over 16 KiB", &big_trailers, accept(b"x")).hyper("hyper caps a trailer section at 16 KiB; we cap it at the head limit (maxHeaderSize, 64 KiB here), as h1::server makes the decoder"),
    ]
}

fn same_class(ours: &Ours, hyper: &Hyper) -> bool {
    match (ours, hyper) {
        (Ours::Accept(body), Hyper::Status(200, theirs)) => body == theirs,
        (Ours::Accept(_), _) | (_, Hyper::Status(200, _)) => false,
        _ => true,
    }
}

#[test]
fn ours_httparse_and_hyper_agree_or_say_why() {
    let rows = rows();
    assert!(rows.len() >= 60);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut table = String::new();
    let mut failures = Vec::new();
    for row in &rows {
        let ours = ours(&row.bytes);
        let httparse = httparse_verdict(&row.bytes);
        let hyper = runtime.block_on(hyper_verdict(row.bytes.clone()));
        let show = |v: &dyn std::fmt::Debug| {
            let mut s = format!("{v:?}");
            if s.len() > 60 {
                s.truncate(60);
                s.push('…');
            }
            s
        };
        let _ = writeln!(
            table,
            "{:<48} ours {:<28} httparse {:<22} hyper {}",
            row.name,
            show(&ours),
            show(&httparse.as_ref().map(|_| "head")),
            show(&match &hyper {
                Hyper::Status(status, body) => format!("{status} {}", String::from_utf8_lossy(body)),
                Hyper::Closed => "closed".to_string(),
            })
        );
        if ours != row.ours {
            failures.push(format!("{}: ours is {ours:?}, the table says {:?}", row.name, row.ours));
        }
        let httparse_differs = httparse.is_ok() != ours.head_accepted();
        match (httparse_differs, row.httparse) {
            (true, None) => failures.push(format!("{}: httparse reads {httparse:?}, ours {ours:?}, and the row says not why", row.name)),
            (false, Some(why)) => failures.push(format!("{}: httparse now agrees ({httparse:?}); drop \"{why}\"", row.name)),
            _ => {}
        }
        let hyper_differs = !same_class(&ours, &hyper);
        match (hyper_differs, row.hyper) {
            (true, None) => failures.push(format!("{}: hyper answers {hyper:?}, ours {ours:?}, and the row says not why", row.name)),
            (false, Some(why)) => failures.push(format!("{}: hyper now agrees ({hyper:?}); drop \"{why}\"", row.name)),
            _ => {}
        }
    }
    eprintln!("{table}");
    assert!(failures.is_empty(), "{} rows out of step:\n{}", failures.len(), failures.join("\n"));
}

/// The harness itself: a body hyper reads is what its answer carries.
#[test]
fn the_hyper_harness_reads_an_answer() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let answer = runtime.block_on(hyper_verdict(post("Content-Length: 5\r\n", b"hello")));
    assert_eq!(answer, Hyper::Status(200, b"hello".to_vec()));
    assert_eq!(first_response(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 400 Bad Request\r\n\r\n"), Hyper::Status(400, Vec::new()));
}
