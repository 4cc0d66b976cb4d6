//! Host sniffing on a buffered prefix of a connection, without consuming it. Only methods from the
//! HTTP registry are recognised, so a server-first or binary protocol is told apart after at most
//! a few bytes instead of waiting for a request head that never comes.

/// Largest request head we buffer to find the Host header (the HTTP engine's default
/// `maxHeaderSize`).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&[u8]] = &[
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE", b"PRI",
];
const LONGEST_METHOD: usize = 7;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpSniff {
    /// An HTTP/1.x request head: its Host without port, lowercased, trailing dot removed.
    Request { host: Option<String> },
    /// The HTTP/2 prior-knowledge preface (no Host until the HEADERS frame).
    H2Preface,
    /// Could still be HTTP: read more.
    Incomplete,
    /// Not HTTP (or a head too large or malformed to route by).
    NotHttp,
}

pub fn sniff(buf: &[u8]) -> HttpSniff {
    match method_prefix(buf) {
        MethodPrefix::Unknown => return HttpSniff::NotHttp,
        MethodPrefix::Partial => return HttpSniff::Incomplete,
        MethodPrefix::Known => {}
    }
    if buf.starts_with(b"PRI ") {
        let seen = buf.len().min(H2_PREFACE.len());
        return if buf[..seen] != H2_PREFACE[..seen] {
            HttpSniff::NotHttp
        } else if seen == H2_PREFACE.len() {
            HttpSniff::H2Preface
        } else {
            HttpSniff::Incomplete
        };
    }
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(_)) => HttpSniff::Request { host: host_of(request.headers) },
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD_BYTES => HttpSniff::Incomplete,
        Ok(httparse::Status::Partial) | Err(_) => HttpSniff::NotHttp,
    }
}

enum MethodPrefix {
    Known,
    Partial,
    Unknown,
}

fn method_prefix(buf: &[u8]) -> MethodPrefix {
    match buf.iter().position(|b| *b == b' ') {
        Some(space) if METHODS.contains(&&buf[..space]) => MethodPrefix::Known,
        Some(_) => MethodPrefix::Unknown,
        None if buf.len() <= LONGEST_METHOD && METHODS.iter().any(|m| m.starts_with(buf)) => MethodPrefix::Partial,
        None => MethodPrefix::Unknown,
    }
}

fn host_of(headers: &[httparse::Header<'_>]) -> Option<String> {
    let value = headers.iter().find(|h| h.name.eq_ignore_ascii_case("host"))?.value;
    let value = std::str::from_utf8(value).ok()?.trim();
    Some(normalise_host(value)).filter(|h| !h.is_empty())
}

/// True when a complete request head frames its body twice (`Content-Length` and
/// `Transfer-Encoding`): the classic request-smuggling shape, refused with 400 (RFC 9112 §6.1).
/// hyper neutralises it for later requests of a connection (it drops Content-Length and closes
/// after the response), but cannot refuse it; the first head, already buffered here, can be.
pub fn has_conflicting_framing(buf: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut request = httparse::Request::new(&mut headers);
    if !matches!(request.parse(buf), Ok(httparse::Status::Complete(_))) {
        return false;
    }
    let has = |name: &str| request.headers.iter().any(|h| h.name.eq_ignore_ascii_case(name));
    has("content-length") && has("transfer-encoding")
}

/// A connection's first request head, parsed whole, for routing it before any HTTP engine runs.
#[derive(Debug)]
pub struct FirstRequest {
    pub method: http::Method,
    /// Without the query.
    pub path: String,
    pub query: Option<String>,
    pub headers: http::HeaderMap,
}

/// `None` when `buf` does not start with a complete, valid HTTP/1.x request head.
pub fn first_request(buf: &[u8]) -> Option<FirstRequest> {
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut request = httparse::Request::new(&mut headers);
    if !matches!(request.parse(buf), Ok(httparse::Status::Complete(_))) {
        return None;
    }
    let method = http::Method::from_bytes(request.method?.as_bytes()).ok()?;
    let target = request.path?;
    // An absolute-form target (`http://host/path?q`) routes by its path too; an origin-form one
    // starts with `/` (and may carry `://` in its query).
    let origin_form = match target.find("://") {
        Some(scheme_end) if !target.starts_with('/') => {
            let after_authority = &target[scheme_end + 3..];
            after_authority.find(['/', '?']).map_or("/", |at| &after_authority[at..])
        }
        _ => target,
    };
    let (path, query) = match origin_form.split_once('?') {
        Some((path, query)) => (path.to_string(), Some(query.to_string())),
        None => (origin_form.to_string(), None),
    };
    let path = if path.is_empty() { "/".to_string() } else { path };
    let mut map = http::HeaderMap::with_capacity(request.headers.len());
    for header in request.headers.iter() {
        let name = http::HeaderName::from_bytes(header.name.as_bytes()).ok()?;
        let value = http::HeaderValue::from_bytes(header.value).ok()?;
        map.append(name, value);
    }
    Some(FirstRequest { method, path, query, headers: map })
}

/// `Example.COM.:8080` → `example.com`; `[::1]:80` → `::1`.
pub fn normalise_host(authority: &str) -> String {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        authority.rsplit_once(':').map_or(authority, |(host, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) { host } else { authority }
        })
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_host_of_a_request_head() {
        let head = b"GET /x HTTP/1.1\r\nUser-Agent: t\r\nHOST: Api.Example.com.:8080\r\n\r\nbody";
        assert_eq!(sniff(head), HttpSniff::Request { host: Some("api.example.com".into()) });
    }

    #[test]
    fn a_request_without_host_has_no_domain() {
        assert_eq!(sniff(b"GET / HTTP/1.0\r\n\r\n"), HttpSniff::Request { host: None });
    }

    #[test]
    fn every_prefix_of_a_request_is_incomplete() {
        let head = b"POST /p HTTP/1.1\r\nHost: a.b\r\n\r\n";
        for end in 1..head.len() {
            assert_eq!(sniff(&head[..end]), HttpSniff::Incomplete, "prefix {end}");
        }
    }

    #[test]
    fn binary_and_server_first_protocols_are_recognised_early() {
        assert_eq!(sniff(b"\x16\x03\x01"), HttpSniff::NotHttp);
        assert_eq!(sniff(b"EHLO x"), HttpSniff::NotHttp);
        assert_eq!(sniff(b"HELLO WORLD"), HttpSniff::NotHttp);
        assert_eq!(sniff(b"GE"), HttpSniff::Incomplete);
        assert_eq!(sniff(b"get / HTTP/1.1\r\n"), HttpSniff::NotHttp);
    }

    #[test]
    fn the_h2_preface_is_recognised() {
        assert_eq!(sniff(H2_PREFACE), HttpSniff::H2Preface);
        assert_eq!(sniff(&H2_PREFACE[..10]), HttpSniff::Incomplete);
        assert_eq!(sniff(b"PRI * HTTP/1.1\r\n"), HttpSniff::NotHttp);
    }

    #[test]
    fn an_oversized_head_is_not_routed_as_http() {
        let mut head = b"GET / HTTP/1.1\r\nX: ".to_vec();
        head.resize(MAX_HEAD_BYTES + 1, b'a');
        assert_eq!(sniff(&head), HttpSniff::NotHttp);
    }

    #[test]
    fn double_framing_is_spotted_in_either_order() {
        assert!(has_conflicting_framing(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"));
        assert!(has_conflicting_framing(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n"));
        assert!(!has_conflicting_framing(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"));
        assert!(!has_conflicting_framing(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n"));
    }

    #[test]
    fn the_first_request_is_parsed_for_routing() {
        let first = first_request(b"POST /api/x?y=1 HTTP/1.1\r\nHost: a.b\r\nX-K: v\r\n\r\nbody").expect("complete head");
        assert_eq!(first.method, http::Method::POST);
        assert_eq!(first.path, "/api/x");
        assert_eq!(first.query.as_deref(), Some("y=1"));
        assert_eq!(first.headers.get("x-k").map(|v| v.as_bytes()), Some(&b"v"[..]));
        let absolute = first_request(b"GET http://a.b/p/q HTTP/1.1\r\nHost: a.b\r\n\r\n").expect("complete head");
        assert_eq!(absolute.path, "/p/q");
        let query_url = first_request(b"GET /ws?next=https://app/x HTTP/1.1\r\nHost: a.b\r\n\r\n").expect("complete head");
        assert_eq!(query_url.path, "/ws");
        assert_eq!(query_url.query.as_deref(), Some("next=https://app/x"));
        assert!(first_request(b"GET / HTTP/1.1\r\nHost: a").is_none());
        assert!(first_request(H2_PREFACE).is_none());
    }

    #[test]
    fn hosts_are_normalised() {
        assert_eq!(normalise_host("[::1]:443"), "::1");
        assert_eq!(normalise_host("EXAMPLE.com."), "example.com");
        assert_eq!(normalise_host("a.com:x"), "a.com:x");
    }
}
