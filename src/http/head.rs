//! The one reading of a plain connection's first bytes as HTTP/1.x, before anything routes by them:
//! whether they are a request at all (any RFC 9110 token method, so server-first and binary
//! protocols are told apart early), and if so the request head, parsed once and checked against
//! the framing and host rules of API.md "Edge hygiene". Routing, the socket-handler context and
//! the refusal all read this one parse, and the HTTP engine takes the head it found as the
//! connection's first request (`h1::server::serve_h1`); later heads are read by `take_head`.

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};

use crate::http::edge::{checked_request_host, field_text, has_bare_lf, host_values, is_tchar, normalise_host, request_host, Refusal};
use crate::http::headers::{equals_lowercase_any_case, list_items};

pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Methods recognised from their first bytes, before the request line is complete: the HTTP
/// registry's common ones and WebDAV's. Any other token method is recognised once its request
/// line ends in an HTTP version.
const KNOWN_METHODS: &[&[u8]] = &[
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE", b"PROPFIND", b"PROPPATCH",
    b"MKCOL", b"COPY", b"MOVE", b"LOCK", b"UNLOCK", b"REPORT", b"SEARCH", b"PURGE",
];
/// How much of a first line is read looking for its HTTP version before the bytes are taken for
/// another protocol.
const MAX_UNKNOWN_LINE: usize = 8 * 1024;
/// Header fields in one head, as hyper allows.
pub const MAX_HEADERS: usize = 100;

#[derive(Debug)]
pub enum HeadParse {
    /// Could still be HTTP: read more.
    Incomplete,
    /// Not HTTP/1.x.
    NotHttp,
    /// The HTTP/2 prior-knowledge preface (no host until the HEADERS frame).
    H2Preface,
    Request(RequestHead),
    /// HTTP, but not a request the proxy forwards: answered with this and closed.
    Refused(Refusal),
}

/// A complete, checked request head.
#[derive(Debug)]
pub struct RequestHead {
    pub method: Method,
    pub version: Version,
    /// The request target as sent (origin, absolute, authority or asterisk form).
    pub target: String,
    /// How the body that follows the head is delimited.
    pub body: BodyLength,
    /// How many bytes of the buffer the head took, its final empty line included.
    pub len: usize,
    pub headers: HeaderMap,
    /// What its `Connection` and related fields ask of this hop: to close after the response
    /// (HTTP/1.1 `close`, HTTP/1.0 without `keep-alive`), a protocol upgrade (`Upgrade` with
    /// `Connection: upgrade`), an interim 100 before the body (`Expect: 100-continue`).
    pub close: bool,
    pub upgrade: bool,
    pub expect_continue: bool,
    /// Where the origin form (path and query) starts in `target`, where its path ends.
    origin_start: usize,
    path_end: usize,
}

impl RequestHead {
    /// The target's path as sent, without the query (`/` for an absolute form without one).
    pub fn path(&self) -> &str {
        match &self.target[self.origin_start..self.path_end] {
            "" => "/",
            path => path,
        }
    }

    pub fn query(&self) -> Option<&str> {
        self.target.get(self.path_end..).and_then(|rest| rest.strip_prefix('?'))
    }

    /// The request's host as routing sees it: lowercase, no port, no trailing dot. Worked out
    /// on demand: only a connection's first head is routed by the session from it.
    pub fn domain(&self) -> Option<String> {
        let (authority, _) = split_target(&self.target, &self.method).ok()?;
        // The head met the host rules as it was read: the host they chose, without checking again.
        let host = checked_request_host(authority, host_values(&self.headers))?;
        Some(normalise_host(host).into_owned()).filter(|d| !d.is_empty())
    }
}

/// Reads `buf` (a connection's first bytes) as an HTTP/1.x request head. `max_head` is the
/// engine's `maxHeaderSize`. The header values share one copy of the head, rather than each
/// value taking an allocation of its own.
pub fn parse_head(buf: &[u8], max_head: usize) -> HeadParse {
    let mut spans = no_spans();
    match read_spans(buf, max_head, &mut spans) {
        Ok((head, count)) => {
            let copy = Bytes::copy_from_slice(&buf[..head.len]);
            with_fields(head, &spans[..count], &copy)
        }
        Err(outcome) => outcome,
    }
}

/// `parse_head` for a connection's buffer: a complete head is taken off `buf`, and its header
/// values share the head's bytes instead of copying them.
pub fn take_head(buf: &mut BytesMut, max_head: usize) -> HeadParse {
    let mut spans = no_spans();
    match read_spans(buf, max_head, &mut spans) {
        Ok((head, count)) => {
            let taken = buf.split_to(head.len).freeze();
            with_fields(head, &spans[..count], &taken)
        }
        Err(outcome) => outcome,
    }
}

/// Where each field of a head is in it: name start, name end, value start, value end. Only the
/// first fields, as many as the head has, are written (a request has a handful, and room for
/// the most would be cleared each time for nothing).
type Spans = [std::mem::MaybeUninit<[u32; 4]>; MAX_HEADERS];

fn no_spans() -> Spans {
    [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS]
}

/// The request head at the start of `buf`, read and checked, with its fields noted in `spans`
/// (how many, beside the head): httparse reads the buffer as it is, and the fields are made
/// values once the caller holds the head's bytes in a `Bytes` of their own. Or what else the
/// bytes are (so far).
fn read_spans(buf: &[u8], max_head: usize, spans: &mut Spans) -> Result<(RequestHead, usize), HeadParse> {
    let base = buf.as_ptr() as usize;
    let mut storage = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let len = read_request(buf, max_head, &mut request, &mut storage)?;
    let head = checked_head(&buf[..len], &request, len).map_err(HeadParse::Refused)?;
    // Every slice httparse gives is of the buffer it read (an empty value's too: should one not
    // be, it is read as empty by `with_fields`).
    let offset = |part: &[u8]| (part.as_ptr() as usize).wrapping_sub(base) as u32;
    for (span, field) in spans.iter_mut().zip(request.headers.iter()) {
        let (name, value) = (field.name.as_bytes(), field.value);
        span.write([offset(name), offset(name) + name.len() as u32, offset(value), offset(value) + value.len() as u32]);
    }
    Ok((head, request.headers.len()))
}

/// `head` with its fields in its map, their values slices of `bytes` (the head's bytes, which
/// `spans` locate them in). `spans` must all have been written by `read_spans`.
fn with_fields(mut head: RequestHead, spans: &[std::mem::MaybeUninit<[u32; 4]>], bytes: &Bytes) -> HeadParse {
    let mut headers = HeaderMap::with_capacity(spans.len());
    for span in spans {
        // SAFETY: `read_spans` wrote one span per field, as many as it said, and the caller
        // passes those alone.
        let [name_start, name_end, value_start, value_end] = unsafe { span.assume_init() };
        let name = bytes.get(name_start as usize..name_end as usize).unwrap_or_default();
        let (value_start, value_end) = (value_start as usize, value_end as usize);
        let value = if value_start <= value_end && value_end <= bytes.len() { bytes.slice(value_start..value_end) } else { Bytes::new() };
        let Ok(name) = HeaderName::from_bytes(name) else {
            return HeadParse::Refused(Refusal::bad_request("malformed header name"));
        };
        headers.append(name, parsed_field_value(value));
    }
    head.headers = headers;
    HeadParse::Request(head)
}

/// Reads `buf` with httparse into `request` once it is a whole request head: its length, or what
/// else the bytes are (so far).
fn read_request<'h, 'b>(buf: &'b [u8], max_head: usize, request: &mut httparse::Request<'h, 'b>, storage: &'h mut [std::mem::MaybeUninit<httparse::Header<'b>>]) -> Result<usize, HeadParse> {
    // RFC 9112 §2.2: empty lines before the request line are ignored.
    let start = leading_empty_lines(buf);
    // The first line's cap counts from the start of the connection, empty lines included, so the
    // answer never depends on how the bytes were split.
    let Some(budget) = MAX_UNKNOWN_LINE.checked_sub(start).filter(|b| *b > 0) else {
        return Err(HeadParse::NotHttp);
    };
    let line = &buf[start..];
    // Nothing yet, or half of another empty line.
    if line.is_empty() || line == b"\r" {
        return Err(HeadParse::Incomplete);
    }
    if line.starts_with(b"PRI ") && start == 0 {
        let seen = line.len().min(H2_PREFACE.len());
        return Err(if line[..seen] != H2_PREFACE[..seen] {
            HeadParse::Refused(Refusal::bad_request("malformed HTTP/2 preface"))
        } else if seen == H2_PREFACE.len() {
            HeadParse::H2Preface
        } else {
            HeadParse::Incomplete
        });
    }
    match request_line_shape(line, budget) {
        Shape::NotHttp => return Err(HeadParse::NotHttp),
        Shape::Undecided => return Err(HeadParse::Incomplete),
        Shape::Http => {}
    }
    // Only the first `max_head` bytes decide: whatever follows cannot turn a 431 into a 400.
    let view = &buf[..buf.len().min(max_head)];
    match request.parse_with_uninit_headers(view, storage) {
        Ok(httparse::Status::Complete(len)) => Ok(len),
        Ok(httparse::Status::Partial) if buf.len() <= max_head => Err(HeadParse::Incomplete),
        Ok(httparse::Status::Partial) => Err(too_large("the request head is larger than the limit")),
        Err(httparse::Error::TooManyHeaders) => Err(too_large("too many header fields")),
        Err(_) => Err(HeadParse::Refused(Refusal::bad_request("malformed request head"))),
    }
}

fn too_large(reason: &'static str) -> HeadParse {
    HeadParse::Refused(Refusal { status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, reason })
}

fn leading_empty_lines(buf: &[u8]) -> usize {
    let mut at = 0;
    while buf[at..].starts_with(b"\r\n") {
        at += 2;
    }
    at
}

enum Shape {
    Http,
    NotHttp,
    Undecided,
}

/// A request line is a token, a space, a target, a space and `HTTP/x.y`. A known method and a
/// space decide at once; another token waits for the line's end and its version, within `budget`
/// bytes.
fn request_line_shape(line: &[u8], budget: usize) -> Shape {
    let method_end = line.iter().position(|b| !is_tchar(*b));
    match method_end {
        Some(0) => return Shape::NotHttp,
        Some(end) if line[end] == b' ' && KNOWN_METHODS.contains(&&line[..end]) => return Shape::Http,
        _ => {}
    }
    let window = &line[..line.len().min(budget)];
    let Some(newline) = window.iter().position(|b| *b == b'\n') else {
        return if line.len() < budget { Shape::Undecided } else { Shape::NotHttp };
    };
    let text = window[..newline].strip_suffix(b"\r").unwrap_or(&window[..newline]);
    match text.len().checked_sub(8).map(|at| &text[at..]) {
        Some([b'H', b'T', b'T', b'P', b'/', major, b'.', minor]) if major.is_ascii_digit() && minor.is_ascii_digit() => Shape::Http,
        _ => Shape::NotHttp,
    }
}

/// The framing and host rules on a head httparse accepted.
/// Its `headers` are left empty for the caller, which knows where the values' bytes are kept.
fn checked_head(head: &[u8], request: &httparse::Request<'_, '_>, len: usize) -> Result<RequestHead, Refusal> {
    // httparse takes a bare LF as a line end; the next hop may not.
    if has_bare_lf(head) {
        return Err(Refusal::bad_request("a line ends in a bare LF"));
    }
    let method = request.method.and_then(|m| Method::from_bytes(m.as_bytes()).ok()).ok_or(Refusal::bad_request("malformed method"))?;
    let http10 = request.version == Some(0);
    let target = request.path.ok_or(Refusal::bad_request("malformed request target"))?;
    // A fragment never travels in a request (RFC 9110 §7.1); hyper would drop it, this reading not.
    if target.contains('#') {
        return Err(Refusal::bad_request("the request target holds a fragment"));
    }
    // The rules read the fields as httparse gave them, in order, rather than look each name up
    // in the map.
    let fields = RuledFields::of(request.headers);
    let body = check_framing(&fields, http10)?;
    let (authority, origin_form) = split_target(target, &method)?;
    request_host(authority, fields.values(Ruled::Host), !http10)?;
    let connection_lists = |token: &[u8]| fields.values(Ruled::Connection).flat_map(list_items).any(|item| equals_lowercase_any_case(item, token));
    let close = if http10 { !connection_lists(b"keep-alive") } else { connection_lists(b"close") };
    let upgrade = !http10 && fields.values(Ruled::Upgrade).next().is_some() && connection_lists(b"upgrade");
    let expect_continue = !http10 && fields.values(Ruled::Expect).next().is_some_and(|value| equals_lowercase_any_case(value, b"100-continue"));
    // The origin form is a part of the target, or (no path in an absolute form, CONNECT) none.
    let origin_start = (origin_form.as_ptr() as usize).wrapping_sub(target.as_ptr() as usize);
    let origin_start = if origin_start <= target.len() && target.get(origin_start..) == Some(origin_form) { origin_start } else { target.len() };
    let path_end = origin_start + origin_form.find('?').unwrap_or(target.len() - origin_start);
    let version = if http10 { Version::HTTP_10 } else { Version::HTTP_11 };
    Ok(RequestHead { method, version, target: target.to_string(), body, len, headers: HeaderMap::new(), close, upgrade, expect_continue, origin_start, path_end })
}

/// A field value httparse accepted, as a `HeaderValue` without checking its bytes again.
/// `bytes` must be a field value from an httparse parse.
pub(crate) fn parsed_field_value(bytes: Bytes) -> HeaderValue {
    // SAFETY: httparse accepts in a field value only HTAB, SP to `~` and 0x80 to 0xFF (its
    // HEADER_VALUE_MAP, and the same ranges in its SIMD paths), each a byte `HeaderValue` allows;
    // debug builds check them again (`from_maybe_shared_unchecked` does).
    unsafe { HeaderValue::from_maybe_shared_unchecked(bytes) }
}

/// The fields the head rules read.
#[derive(Clone, Copy)]
enum Ruled {
    Host,
    Connection,
    Upgrade,
    Expect,
    ContentLength,
    TransferEncoding,
}

/// A head's fields, with which of them are the ones the rules read: found in one pass over the
/// names rather than one per rule.
struct RuledFields<'h, 'b> {
    fields: &'h [httparse::Header<'b>],
    /// Per `Ruled`, bit i: field i has that name (`MAX_HEADERS` fields at most).
    named: [u128; 6],
}

const _: () = assert!(MAX_HEADERS <= 128);

impl<'h, 'b> RuledFields<'h, 'b> {
    fn of(fields: &'h [httparse::Header<'b>]) -> Self {
        let mut named = [0u128; 6];
        for (index, field) in fields.iter().enumerate().take(128) {
            let name = field.name.as_bytes();
            // Told apart by length and first letter, then the whole name in any case.
            let (ruled, text) = match (name.len(), name.first().map_or(0, |b| b | 0x20)) {
                (4, b'h') => (Ruled::Host, "host"),
                (10, b'c') => (Ruled::Connection, "connection"),
                (7, b'u') => (Ruled::Upgrade, "upgrade"),
                (6, b'e') => (Ruled::Expect, "expect"),
                (14, b'c') => (Ruled::ContentLength, "content-length"),
                (17, b't') => (Ruled::TransferEncoding, "transfer-encoding"),
                _ => continue,
            };
            if equals_lowercase_any_case(name, text.as_bytes()) {
                named[ruled as usize] |= 1 << index;
            }
        }
        RuledFields { fields, named }
    }

    /// The values of the fields with that name, in order.
    fn values(&self, ruled: Ruled) -> impl Iterator<Item = &'b [u8]> + '_ {
        let mut left = self.named[ruled as usize];
        std::iter::from_fn(move || {
            let index = left.trailing_zeros() as usize;
            left &= left.checked_sub(1)?;
            Some(self.fields[index].value)
        })
    }
}

/// How a request's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    /// No body: neither `Content-Length` nor `Transfer-Encoding`.
    None,
    Length(u64),
    Chunked,
}

/// Body framing that every hop reads the same way (RFC 9112 §6): `Transfer-Encoding` or
/// `Content-Length`, never both; one length; `chunked` last and only once; none on HTTP/1.0.
fn check_framing(fields: &RuledFields<'_, '_>, http10: bool) -> Result<BodyLength, Refusal> {
    let mut length: Option<&[u8]> = None;
    for value in fields.values(Ruled::ContentLength) {
        if value.is_empty() || !value.iter().all(u8::is_ascii_digit) || value.len() > 19 {
            return Err(Refusal::bad_request("malformed Content-Length"));
        }
        if length.is_some_and(|seen| seen != value) {
            return Err(Refusal::bad_request("Content-Length values differ"));
        }
        length = Some(value);
    }
    let mut codings = Vec::new();
    let mut transfer_encoding = false;
    for value in fields.values(Ruled::TransferEncoding) {
        transfer_encoding = true;
        let text = field_text(value).ok_or(Refusal::bad_request("malformed Transfer-Encoding"))?;
        codings.extend(text.split(',').map(str::trim));
    }
    if codings.is_empty() {
        if transfer_encoding {
            return Err(Refusal::bad_request("malformed Transfer-Encoding"));
        }
        // At most 19 digits: always within u64.
        let length = length.map(|digits| std::str::from_utf8(digits).ok().and_then(|d| d.parse::<u64>().ok()));
        return match length {
            None => Ok(BodyLength::None),
            Some(Some(n)) => Ok(BodyLength::Length(n)),
            Some(None) => Err(Refusal::bad_request("malformed Content-Length")),
        };
    }
    if http10 {
        return Err(Refusal::bad_request("Transfer-Encoding on HTTP/1.0"));
    }
    if length.is_some() {
        return Err(Refusal::bad_request("both Content-Length and Transfer-Encoding"));
    }
    let chunked = |c: &&str| c.eq_ignore_ascii_case("chunked");
    if !codings.last().is_some_and(chunked) || codings.iter().filter(|c| chunked(c)).count() != 1 || codings.iter().any(|c| c.is_empty()) {
        return Err(Refusal::bad_request("Transfer-Encoding must end in a single chunked"));
    }
    Ok(BodyLength::Chunked)
}

/// The target's authority (absolute and authority forms) and its origin form (path and query).
fn split_target<'a>(target: &'a str, method: &Method) -> Result<(Option<&'a str>, &'a str), Refusal> {
    if target.starts_with('/') || (target == "*" && method == Method::OPTIONS) {
        return Ok((None, target));
    }
    if method == Method::CONNECT {
        return Ok((Some(target), "/"));
    }
    let scheme_end = target.find("://").ok_or(Refusal::bad_request("malformed request target"))?;
    let scheme = &target[..scheme_end];
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err(Refusal::bad_request("malformed request target"));
    }
    let rest = &target[scheme_end + 3..];
    let (authority, origin) = match rest.find(['/', '?']) {
        Some(at) if rest.as_bytes()[at] == b'/' => (&rest[..at], &rest[at..]),
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    Ok((Some(authority), origin))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 64 * 1024;

    fn parse(bytes: &[u8]) -> HeadParse {
        parse_head(bytes, LIMIT)
    }

    fn refused(bytes: &[u8]) -> StatusCode {
        match parse(bytes) {
            HeadParse::Refused(refusal) => refusal.status,
            other => panic!("{:?}: expected a refusal, got {other:?}", String::from_utf8_lossy(bytes)),
        }
    }

    impl HeadParse {
        fn status(&self) -> Option<StatusCode> {
            match self {
                HeadParse::Refused(refusal) => Some(refusal.status),
                _ => None,
            }
        }
    }

    fn request(bytes: &[u8]) -> RequestHead {
        match parse(bytes) {
            HeadParse::Request(head) => head,
            other => panic!("{:?}: expected a request, got {other:?}", String::from_utf8_lossy(bytes)),
        }
    }

    #[test]
    fn finds_the_host_path_and_query() {
        let head = request(b"POST /api/x?y=1 HTTP/1.1\r\nUser-Agent: t\r\nHOST: Api.Example.com.:8080\r\nX-K: v\r\n\r\nbody");
        assert_eq!(head.method, Method::POST);
        assert_eq!(head.domain().as_deref(), Some("api.example.com"));
        assert_eq!(head.path(), "/api/x");
        assert_eq!(head.query(), Some("y=1"));
        assert_eq!(head.headers.get("x-k").map(|v| v.as_bytes()), Some(&b"v"[..]));
        let absolute = request(b"GET http://a.b/p/q HTTP/1.1\r\nHost: a.b\r\n\r\n");
        assert_eq!((absolute.path(), absolute.domain().as_deref()), ("/p/q", Some("a.b")));
        let bare = request(b"GET http://a.b HTTP/1.1\r\nHost: a.b\r\n\r\n");
        assert_eq!((bare.path(), bare.query()), ("/", None));
        let bare_query = request(b"GET http://a.b?x=1 HTTP/1.1\r\nHost: a.b\r\n\r\n");
        assert_eq!((bare_query.path(), bare_query.query()), ("/", Some("x=1")));
        let query_url = request(b"GET /ws?next=https://app/x HTTP/1.1\r\nHost: a.b\r\n\r\n");
        assert_eq!((query_url.path(), query_url.query()), ("/ws", Some("next=https://app/x")));
        assert_eq!(request(b"GET / HTTP/1.0\r\n\r\n").domain(), None);
        assert_eq!(refused(b"GET / HTTP/1.1\r\n\r\n"), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn connection_fields_say_what_the_hop_is_asked() {
        let flags = |bytes: &[u8]| {
            let head = request(bytes);
            (head.close, head.upgrade, head.expect_continue)
        };
        assert_eq!(flags(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), (false, false, false));
        assert_eq!(flags(b"GET / HTTP/1.1\r\nHost: a\r\nconnection: x, CLOSE\r\n\r\n"), (true, false, false));
        assert_eq!(flags(b"GET / HTTP/1.0\r\n\r\n"), (true, false, false));
        assert_eq!(flags(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"), (false, false, false));
        assert_eq!(flags(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"), (false, true, false));
        assert_eq!(flags(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n"), (false, false, false), "Upgrade alone");
        assert_eq!(flags(b"GET / HTTP/1.0\r\nConnection: upgrade, keep-alive\r\nUpgrade: websocket\r\n\r\n"), (false, false, false));
        assert_eq!(flags(b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n"), (false, false, true));
        assert_eq!(flags(b"PUT / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\nConnection: keep-alive\r\n\r\n"), (false, false, false));
    }

    #[test]
    fn every_prefix_of_a_request_is_incomplete() {
        let head = b"POST /p HTTP/1.1\r\nHost: a.b\r\n\r\n";
        for end in 1..head.len() {
            assert!(matches!(parse(&head[..end]), HeadParse::Incomplete), "prefix {end}");
        }
        let odd = b"purge /p HTTP/1.1\r\nHost: a.b\r\n\r\n";
        for end in 1..odd.len() {
            assert!(matches!(parse(&odd[..end]), HeadParse::Incomplete), "prefix {end}");
        }
    }

    #[test]
    fn any_token_method_is_http() {
        for method in ["PURGE", "PROPFIND", "get", "X-CUSTOM.1"] {
            let bytes = format!("{method} / HTTP/1.1\r\nHost: a.test\r\n\r\n");
            assert_eq!(request(bytes.as_bytes()).method.as_str(), method);
        }
        assert_eq!(request(b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n").method, Method::GET);
    }

    #[test]
    fn other_protocols_are_told_apart() {
        for bytes in [&b"\x16\x03\x01"[..], b"\0\0\0", b"SSH-2.0-OpenSSH_9.6\r\n", b"HELLO WORLD\r\n", b"PING\r\n", b"*1\r\n$4\r\nPING\r\n"] {
            assert!(matches!(parse(bytes), HeadParse::NotHttp), "{:?}", String::from_utf8_lossy(bytes));
        }
        assert!(matches!(parse(b"GE"), HeadParse::Incomplete));
        assert!(matches!(parse(b"EHLO x"), HeadParse::Incomplete));
    }

    /// Found by fuzzing: a decided answer must not change as more bytes arrive.
    #[test]
    fn the_answer_does_not_depend_on_how_the_bytes_were_split() {
        let request = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n";
        // Half of a leading empty line.
        assert!(matches!(parse(b"\r"), HeadParse::Incomplete));
        let mut crlf_then_request = b"\r\n".to_vec();
        crlf_then_request.extend_from_slice(request);
        assert!(matches!(parse(&crlf_then_request), HeadParse::Request(_)));
        // The first line's cap counts empty lines too, and a line end past the cap.
        let mut long_token = vec![b'A'; MAX_UNKNOWN_LINE];
        assert!(matches!(parse(&long_token), HeadParse::NotHttp));
        long_token.extend_from_slice(b" / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(matches!(parse(&long_token), HeadParse::NotHttp));
        let mut empty_lines = b"\r\n".repeat(MAX_UNKNOWN_LINE / 2);
        assert!(matches!(parse(&empty_lines), HeadParse::NotHttp));
        empty_lines.extend_from_slice(request);
        assert!(matches!(parse(&empty_lines), HeadParse::NotHttp));
        // Past the head limit, what follows cannot turn a 431 into a 400.
        let mut big = b"GET /".to_vec();
        big.resize(4097, b'a');
        assert_eq!(parse_head(&big, 4096).status(), Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
        big.push(b'\r');
        assert_eq!(parse_head(&big, 4096).status(), Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
        assert_eq!(refused(b"GET /admin#x HTTP/1.1\r\nHost: a\r\n\r\n"), StatusCode::BAD_REQUEST);
    }

    /// `take_head` gives the answer `parse_head` gives, and takes exactly the head.
    #[test]
    fn taking_a_head_off_a_buffer_agrees_with_reading_it() {
        let inputs: &[&[u8]] = &[
            b"GET /a?b HTTP/1.1\r\nHost: a.test\r\nX: 1\r\n\r\nNEXT",
            b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\nHost: a\n\nrest",
            // A head ended by bare LFs, with a CRLF CRLF in the bytes after it.
            b"GET / HTTP/1.1\nHost: a\n\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n\nPOST / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"SSH-2.0-x\r\n\r\n",
        ];
        for input in inputs {
            let read = parse(input);
            let mut buf = BytesMut::from(*input);
            let taken = take_head(&mut buf, LIMIT);
            match (&read, &taken) {
                (HeadParse::Request(a), HeadParse::Request(b)) => {
                    assert_eq!((a.len, &a.target, &a.headers), (b.len, &b.target, &b.headers));
                    assert_eq!(&buf[..], &input[a.len..]);
                }
                _ => assert_eq!(format!("{read:?}"), format!("{taken:?}"), "{:?}", String::from_utf8_lossy(input)),
            }
        }
    }

    #[test]
    fn the_h2_preface_is_recognised() {
        assert!(matches!(parse(H2_PREFACE), HeadParse::H2Preface));
        assert!(matches!(parse(&H2_PREFACE[..10]), HeadParse::Incomplete));
        assert_eq!(refused(b"PRI * HTTP/1.1\r\n\r\n"), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn malformed_heads_are_refused() {
        let cases: &[&[u8]] = &[
            b"GET / HTTP/1.2\r\nHost: a\r\n\r\n",
            b"GET\t/\tHTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
            b"GET / HTTP/1.1\nHost: a\n\n",
            b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET http://a.test/ HTTP/1.1\r\nHost: b.test\r\n\r\n",
            b"GET ftp://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
            b"GET x HTTP/1.1\r\nHost: a\r\n\r\n",
        ];
        for bytes in cases {
            assert_eq!(refused(bytes), StatusCode::BAD_REQUEST, "{:?}", String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        let cases: &[&[u8]] = &[
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \r\n\r\n",
            b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
        ];
        for bytes in cases {
            assert_eq!(refused(bytes), StatusCode::BAD_REQUEST, "{:?}", String::from_utf8_lossy(bytes));
        }
        request(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n");
        request(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n");
    }

    #[test]
    fn oversized_heads_get_431() {
        let mut head = b"GET / HTTP/1.1\r\nX: ".to_vec();
        head.resize(LIMIT + 1, b'a');
        assert_eq!(refused(&head), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(refused(&many), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }
}
