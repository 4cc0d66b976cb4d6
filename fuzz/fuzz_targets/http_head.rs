//! Fuzzes the first-request-head parser (the first bytes of every plain connection, and of HTTP/1.x
//! inside TLS) and checks what the session and the HTTP engine rely on, beyond "no panic": the
//! answer is deterministic, `Incomplete` never outlives the size caps, a decided answer never
//! changes when more bytes arrive, a `Request` meets the edge rules and reads the same to httparse
//! and to the engine's own routing, and a refusal is a 400 or a 431; `take_head`, which reads the
//! same bytes off a connection's buffer, gives the same answer.
//!
//! head.rs names its sibling as `crate::http::edge`, so both files are mounted under a `http`
//! module of this crate; the `http` library is reached as `::http` here.
#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;

// A `#[path]` on an inline module names the directory its children are read from.
#[allow(dead_code)]
#[path = "../../src/http"]
mod http {
    #[path = "edge.rs"]
    pub mod edge;
    #[path = "head.rs"]
    pub mod head;
    #[path = "headers.rs"]
    pub mod headers;
}

use http::edge::{host_values, normalise_host, request_host};
use http::head::{parse_head, take_head, HeadParse, RequestHead, H2_PREFACE, MAX_HEADERS};

/// Small, so that inputs libFuzzer can grow reach the size paths.
const MAX_HEAD: usize = 4096;
/// head.rs's private `MAX_UNKNOWN_LINE`: how far a first line is read looking for its version.
/// Keep in step with it.
const UNKNOWN_LINE_CAP: usize = 8 * 1024;
/// Expanded inputs stop growing here: past both caps, with room for what follows them.
const MAX_EXPANDED: usize = 3 * UNKNOWN_LINE_CAP;

/// Bytes appended to a decided buffer: line ends, a version, a whole request, a byte no head may
/// hold. None of them may change the answer.
const SUFFIXES: &[&[u8]] = &[b"\r", b"\n", b"\r\n\r\n", b" / HTTP/1.1\r\nHost: a\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"\0"];

/// The caps are kilobytes away, further than libFuzzer grows inputs by itself, so an input
/// `0xFF n_hi n_lo prefix_len chunk_len prefix chunk suffix` stands for prefix + chunk × n + suffix.
/// Any other input is the bytes themselves (a raw 0xFF first byte is never HTTP anyway).
fn expand(data: &[u8]) -> Cow<'_, [u8]> {
    let [0xFF, n_hi, n_lo, prefix_len, chunk_len, rest @ ..] = data else {
        return Cow::Borrowed(data);
    };
    let (prefix_len, chunk_len) = (usize::from(*prefix_len), usize::from(*chunk_len));
    if rest.len() < prefix_len + chunk_len {
        return Cow::Borrowed(data);
    }
    let (prefix, rest) = rest.split_at(prefix_len);
    let (chunk, suffix) = rest.split_at(chunk_len);
    let mut out = prefix.to_vec();
    let mut n = usize::from(u16::from_be_bytes([*n_hi, *n_lo]));
    while n > 0 && !chunk.is_empty() && out.len() + chunk.len() <= MAX_EXPANDED {
        out.extend_from_slice(chunk);
        n -= 1;
    }
    out.extend_from_slice(suffix);
    Cow::Owned(out)
}

/// A comparable summary of an answer.
#[derive(Debug, PartialEq, Eq)]
enum Key {
    Incomplete,
    NotHttp,
    H2Preface,
    Request { method: String, path: String, query: Option<String>, domain: Option<String>, headers: Vec<(String, Vec<u8>)> },
    Refused { status: u16, reason: &'static str },
}

fn key(parse: &HeadParse) -> Key {
    match parse {
        HeadParse::Incomplete => Key::Incomplete,
        HeadParse::NotHttp => Key::NotHttp,
        HeadParse::H2Preface => Key::H2Preface,
        HeadParse::Request(head) => Key::Request {
            method: head.method.to_string(),
            path: head.path().to_string(),
            query: head.query().map(str::to_string),
            domain: head.domain(),
            headers: header_list(head),
        },
        HeadParse::Refused(refusal) => Key::Refused { status: refusal.status.as_u16(), reason: refusal.reason },
    }
}

/// Header fields as (lowercase name, value), in a fixed order.
fn header_list(head: &RequestHead) -> Vec<(String, Vec<u8>)> {
    let mut list: Vec<_> = head.headers.iter().map(|(name, value)| (name.as_str().to_string(), value.as_bytes().to_vec())).collect();
    list.sort();
    list
}

/// The same decision, as the session sees it: for a refusal the status it answers with (the
/// reason only words it).
fn same_decision(a: &Key, b: &Key) -> bool {
    match (a, b) {
        (Key::Refused { status: x, .. }, Key::Refused { status: y, .. }) => x == y,
        _ => a == b,
    }
}

fn check_request(buf: &[u8], head: &RequestHead, full: &Key) {
    let head_domain = head.domain();
    let head_path = head.path();
    if let Some(domain) = &head_domain {
        assert!(!domain.is_empty() && !domain.ends_with('.'), "domain {domain:?}");
        assert!(domain.bytes().all(|b| b.is_ascii() && !b.is_ascii_uppercase()), "domain {domain:?}");
    }
    assert!(head.headers.get_all(::http::header::HOST).iter().count() <= 1, "more than one Host");
    assert!(head.headers.len() <= MAX_HEADERS);
    assert!(
        !(head.headers.contains_key(::http::header::CONTENT_LENGTH) && head.headers.contains_key(::http::header::TRANSFER_ENCODING)),
        "both framings"
    );
    assert!(head_path.starts_with('/') || (head_path == "*" && head.method == ::http::Method::OPTIONS), "path {head_path:?}");
    // What the hop is asked, read from the fields as they came, is what the map of them says.
    let lists = |token: &str| {
        head.headers.get_all(::http::header::CONNECTION).iter().flat_map(|v| v.as_bytes().split(|b| *b == b',')).any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    };
    let http11 = head.version == ::http::Version::HTTP_11;
    assert_eq!(head.close, if http11 { lists("close") } else { !lists("keep-alive") }, "close");
    assert_eq!(head.upgrade, http11 && head.headers.contains_key(::http::header::UPGRADE) && lists("upgrade"), "upgrade");
    let expect = head.headers.get(::http::header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    assert_eq!(head.expect_continue, http11 && expect, "expect");

    // Differential: httparse alone, with room for one header more than the parser allows, reads
    // the same head. parse_head is built on httparse and only narrows what it accepts, so no
    // difference is expected; this pins that parse_head never reports a head httparse did not.
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS + 1];
    let mut request = httparse::Request::new(&mut storage);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        other => panic!("parse_head found a request that httparse reads as {other:?}"),
    };
    assert!(len <= MAX_HEAD && len <= buf.len());
    assert_eq!(request.method, Some(head.method.as_str()));
    let mut fields: Vec<(String, Vec<u8>)> = request.headers.iter().map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec())).collect();
    fields.sort();
    assert_eq!(fields, header_list(head), "httparse reads other header fields");
    // RFC 9112 line ends only: httparse would also take a bare LF, the next hop might not.
    assert!(buf[..len].iter().enumerate().all(|(i, b)| *b != b'\n' || (i > 0 && buf[i - 1] == b'\r')), "bare LF in an accepted head");
    // The head alone decides: the bytes after it (a body, a pipelined request) change nothing.
    assert_eq!(&key(&parse_head(&buf[..len], MAX_HEAD)), full, "the bytes after the head changed the answer");

    // Differential with the engine: hyper reads the target as an `http::Uri` and routes each
    // request by `request_host` on its authority (the pipeline's admit phase); where hyper accepts the target, the
    // host and path routed on the first head must be the ones the engine routes on.
    let target = request.path.unwrap_or("");
    let Ok(uri) = target.parse::<::http::Uri>() else { return };
    if head.method != ::http::Method::CONNECT {
        // Expected difference: `http::Uri` drops a `#fragment` (not part of an HTTP request target,
        // RFC 9112 §3.2, but httparse takes `#`), while the head keeps the target's bytes.
        let (path, query) = match (head_path.split_once('#'), head.query()) {
            (Some((path, _)), _) => (path, None),
            (None, Some(query)) => (head_path, Some(query.split_once('#').map_or(query, |(q, _)| q))),
            (None, None) => (head_path, None),
        };
        let uri_path = if uri.path().is_empty() { "/" } else { uri.path() };
        assert_eq!((uri_path, uri.query()), (path, query), "hyper reads another path or query from {target:?}");
    }
    let http11 = request.version == Some(1);
    match request_host(uri.authority().map(|a| a.as_str()), host_values(&head.headers), http11) {
        Ok(host) => {
            let domain = host.map(|h| normalise_host(h).into_owned()).filter(|d| !d.is_empty());
            assert_eq!(domain, head_domain, "the engine routes {target:?} by another host");
        }
        Err(refusal) => panic!("the engine refuses what the first head accepted: {target:?}: {}", refusal.reason),
    }
}

fuzz_target!(|data: &[u8]| {
    let buf = expand(data);
    let buf: &[u8] = &buf;
    let parsed = parse_head(buf, MAX_HEAD);
    let full = key(&parsed);
    assert_eq!(full, key(&parse_head(buf, MAX_HEAD)), "not deterministic");
    // The engine takes the head off its buffer (`take_head`): the same answer, and exactly the
    // head's bytes taken.
    let mut taken_from = bytes::BytesMut::from(buf);
    let taken = take_head(&mut taken_from, MAX_HEAD);
    assert_eq!(key(&taken), full, "take_head reads another head");
    match &taken {
        HeadParse::Request(head) => assert_eq!(&taken_from[..], &buf[head.len..], "take_head took another length"),
        _ => assert_eq!(&taken_from[..], buf, "take_head took bytes without a head"),
    }

    match &parsed {
        // The session's read buffer is sized by these caps: an undecided head never needs more.
        HeadParse::Incomplete => {
            assert!(buf.len() <= MAX_HEAD.max(UNKNOWN_LINE_CAP), "Incomplete at {} bytes", buf.len())
        }
        HeadParse::NotHttp => {}
        HeadParse::H2Preface => assert!(buf.starts_with(H2_PREFACE)),
        HeadParse::Request(head) => check_request(buf, head, &full),
        HeadParse::Refused(refusal) => {
            assert!(matches!(refusal.status.as_u16(), 400 | 431), "status {}", refusal.status);
            assert!(!refusal.reason.is_empty());
            // The answer written to the client is a whole response with that status.
            let bytes = refusal.http1_bytes();
            let mut storage = [httparse::EMPTY_HEADER; 8];
            let mut response = httparse::Response::new(&mut storage);
            assert!(matches!(response.parse(&bytes), Ok(httparse::Status::Complete(_))));
            assert_eq!(response.code, Some(refusal.status.as_u16()));
        }
    }

    // Every answer but Incomplete is final: shorter prefixes were undecided or agree, and more
    // bytes never change it. Prefixes: all of a short input, else a sample (libFuzzer moves the
    // input's end, so the last bytes are the ones to cut at), and those at the caps.
    let len = buf.len();
    let mut cuts: Vec<usize> = if len <= 32 { (0..len).collect() } else { (0..12).map(|i| i * len / 12).chain(len - 4..len).collect() };
    cuts.extend([MAX_HEAD, MAX_HEAD + 1, UNKNOWN_LINE_CAP - 1, UNKNOWN_LINE_CAP, UNKNOWN_LINE_CAP + 1].into_iter().filter(|&n| n < len));
    for n in cuts {
        let part = key(&parse_head(&buf[..n], MAX_HEAD));
        assert!(
            part == Key::Incomplete || same_decision(&part, &full),
            "prefix {n} of {len}: {part:?}, whole: {full:?}"
        );
    }
    if full != Key::Incomplete {
        for suffix in SUFFIXES {
            let longer = [buf, suffix].concat();
            let after = key(&parse_head(&longer, MAX_HEAD));
            assert!(
                same_decision(&after, &full),
                "appending \"{}\": {after:?}, before: {full:?}",
                suffix.escape_ascii()
            );
        }
    }
});
