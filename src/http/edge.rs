//! The edge rules of API.md ("Edge hygiene") that every request meets, whichever path it came by
//! (a plain connection's first head, hyper's later heads, TLS, HTTP/2): one host per request, one
//! normalised path for matching, and the refusal a request gets when it breaks a rule. Pure
//! functions over request facts; knows nothing of connections, routes or hyper's types beyond `http`.

use std::borrow::Cow;

use http::header::{self, HeaderMap};
use http::StatusCode;

/// Why a request is answered by the proxy itself and the connection closed, before anything of it
/// reaches a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: &'static str,
}

impl Refusal {
    pub const fn bad_request(reason: &'static str) -> Refusal {
        Refusal { status: StatusCode::BAD_REQUEST, reason }
    }

    /// The body of the answer, as the engine's other short answers read (`400 Bad Request: why`).
    pub fn body(&self) -> String {
        format!("{} {}: {}\n", self.status.as_u16(), self.status.canonical_reason().unwrap_or(""), self.reason)
    }

    /// The whole HTTP/1.1 response, for a connection no HTTP engine serves yet: status line, a
    /// closing connection, the body.
    pub fn http1_bytes(&self) -> Vec<u8> {
        let body = self.body();
        let reason = self.status.canonical_reason().unwrap_or("Error");
        format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            self.status.as_u16(),
            body.len()
        )
        .into_bytes()
    }
}

/// The host a request is routed by, which is also the host its backend receives: the request
/// target's authority (absolute form, HTTP/2 `:authority`) or the single `Host` header (`hosts`:
/// the values of the request's `Host` fields). Both present and different, two `Host` headers, or
/// a value that is not a host name, address or port: refused; so is no host at all when
/// `host_required` (HTTP/1.1 and HTTP/2, RFC 9112 §3.2). `Ok(None)`: an HTTP/1.0 request that
/// names no host.
pub fn request_host<'a>(authority: Option<&'a str>, mut hosts: impl Iterator<Item = &'a [u8]>, host_required: bool) -> Result<Option<&'a str>, Refusal> {
    let first = hosts.next();
    let host_sent = first.is_some();
    let host = match first {
        None => None,
        Some(_) if hosts.next().is_some() => return Err(Refusal::bad_request("more than one Host header")),
        Some(value) => authority_text(value)?,
    };
    match (authority.filter(|a| !a.is_empty()), host) {
        (Some(authority), Some(host)) => {
            authority_text(authority.as_bytes())?;
            if !same_authority(authority, host) {
                return Err(Refusal::bad_request("the request target's host and the Host header disagree"));
            }
            Ok(Some(host))
        }
        (Some(authority), None) => Ok(authority_text(authority.as_bytes())?),
        // An empty Host is how a client names no authority (RFC 9112 §3.2); no Host at all is not.
        (None, None) if host_required && !host_sent => Err(Refusal::bad_request("the request names no host")),
        (None, host) => Ok(host),
    }
}

/// `request_host`'s answer for a request whose head it accepted already (an HTTP/1.x head, which
/// `http::head` checks as it reads it): the same choice, without checking the bytes again.
pub fn checked_request_host<'a>(authority: Option<&'a str>, mut hosts: impl Iterator<Item = &'a [u8]>) -> Option<&'a str> {
    let trimmed = |value: &'a [u8]| -> Option<&'a str> {
        let blank = |b: &u8| *b == b' ' || *b == b'\t';
        let start = value.iter().position(|b| !blank(b))?;
        let end = value.iter().rposition(|b| !blank(b)).map_or(start, |last| last + 1);
        text(&value[start..end])
    };
    hosts.next().and_then(trimmed).or_else(|| authority.and_then(|a| trimmed(a.as_bytes())))
}

/// The `Host` values of a request's header map, for `request_host`.
pub fn host_values(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers.get_all(header::HOST).iter().map(http::HeaderValue::as_bytes)
}

/// A field value as text, when it is visible ASCII (tabs allowed), as `HeaderValue::to_str` reads
/// it.
pub fn field_text(value: &[u8]) -> Option<&str> {
    if value.iter().all(|b| *b == b'\t' || (0x20..0x7f).contains(b)) {
        text(value)
    } else {
        None
    }
}

/// `bytes` as text when they are UTF-8; ASCII (nearly every host) without `from_utf8`'s
/// byte-by-byte reading of a short string.
fn text(bytes: &[u8]) -> Option<&str> {
    if bytes.is_ascii() {
        // SAFETY: ASCII is UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(bytes) })
    } else {
        std::str::from_utf8(bytes).ok()
    }
}

const NOT_A_HOST: Refusal = Refusal::bad_request("the host is not a host name or address");

/// The bytes a host name, an IPv4 address or a bracketed IPv6 address with an optional port are
/// made of: nothing that could be read as a path, user info or a second header.
const AUTHORITY_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_' | b':' | b'[' | b']');
        b += 1;
    }
    table
};

/// The authority (a target's, or a `Host` value's bytes) without surrounding spaces, `None` when
/// empty; refused when it holds a byte no host name, address or port has (any byte that is not
/// visible ASCII among them).
fn authority_text(value: &[u8]) -> Result<Option<&str>, Refusal> {
    let blank = |b: &u8| *b == b' ' || *b == b'\t';
    let start = value.iter().position(|b| !blank(b)).unwrap_or(value.len());
    let end = value.iter().rposition(|b| !blank(b)).map_or(start, |last| last + 1);
    let value = &value[start..end];
    if value.len() > 1024 || !value.iter().all(|b| AUTHORITY_BYTES[usize::from(*b)]) {
        return Err(NOT_A_HOST);
    }
    // SAFETY: every byte is one of AUTHORITY_BYTES, which are ASCII, and ASCII is UTF-8.
    let text = unsafe { std::str::from_utf8_unchecked(value) };
    Ok(Some(text).filter(|text| !text.is_empty()))
}

/// Same host (case-insensitive, trailing dot ignored) and same port when both name one.
fn same_authority(a: &str, b: &str) -> bool {
    let (host_a, port_a) = split_port(a);
    let (host_b, port_b) = split_port(b);
    let trim = |h: &str| h.trim_end_matches('.').to_string();
    trim(host_a).eq_ignore_ascii_case(&trim(host_b)) && (port_a.is_none() || port_b.is_none() || port_a == port_b)
}

fn split_port(authority: &str) -> (&str, Option<&str>) {
    if let Some(rest) = authority.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((host, tail)) => (host, tail.strip_prefix(':')),
            None => (authority, None),
        };
    }
    match memchr::memrchr(b':', authority.as_bytes()) {
        Some(colon) if authority.as_bytes()[colon + 1..].iter().all(u8::is_ascii_digit) => (&authority[..colon], Some(&authority[colon + 1..])),
        _ => (authority, None),
    }
}

/// `Example.COM.:8080` → `example.com`; `[::1]:80` → `::1`: the domain routes match against.
/// Borrowed when already lower case (most requests).
pub fn normalise_host(authority: &str) -> Cow<'_, str> {
    let (host, _) = split_port(authority);
    let host = host.trim_end_matches('.');
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// The path routes and security match against: `%`-escapes of unreserved characters decoded,
/// dot segments removed (RFC 3986 §5.2.4), runs of `/` merged. Borrowed when already normal.
/// Refused: a path that climbs above `/`, an encoded `/` or `\`, a raw `\`, a bad escape, a dot
/// segment hidden behind a `;` parameter (`/..;/`, read as `..` by some servers), or a target
/// that is not a path at all.
pub fn normalise_path(raw: &str) -> Result<Cow<'_, str>, Refusal> {
    if raw == "*" {
        return Ok(Cow::Borrowed(raw));
    }
    if !raw.starts_with('/') {
        return Err(Refusal::bad_request("the request target is not a path"));
    }
    let bytes = raw.as_bytes();
    let needs_work = bytes.iter().enumerate().any(|(i, &b)| match b {
        b'%' | b'\\' | b';' => true,
        b'/' => matches!(bytes.get(i + 1), Some(b'/') | Some(b'.')),
        _ => false,
    });
    if !needs_work {
        return Ok(Cow::Borrowed(raw));
    }
    if raw.contains('\\') {
        return Err(Refusal::bad_request("the path contains a backslash"));
    }
    let decoded = decode_unreserved(raw)?;
    let mut segments: Vec<&str> = Vec::new();
    let ends_with_slash = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    for segment in decoded.split('/').skip(1) {
        let bare = segment.split(';').next().unwrap_or(segment);
        if (bare == "." || bare == "..") && segment.len() != bare.len() {
            return Err(Refusal::bad_request("the path hides a dot segment behind a parameter"));
        }
        match segment {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err(Refusal::bad_request("the path climbs above the root"));
                }
            }
            other => segments.push(other),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() || ends_with_slash {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// Decodes `%XX` where XX is an unreserved character; other escapes stay, in upper case.
fn decode_unreserved(raw: &str) -> Result<String, Refusal> {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            // `raw` is a str, and multi-byte characters are copied byte by byte in order.
            let end = (i + 1..=bytes.len()).find(|&e| raw.is_char_boundary(e)).unwrap_or(bytes.len());
            out.push_str(&raw[i..end]);
            i = end;
            continue;
        }
        let hex = |at: usize| bytes.get(at).and_then(|c| (*c as char).to_digit(16));
        let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) else {
            return Err(Refusal::bad_request("the path has a malformed %-escape"));
        };
        let value = (hi * 16 + lo) as u8;
        match value {
            b'/' | b'\\' => return Err(Refusal::bad_request("the path contains an encoded slash or backslash")),
            b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' | b'-' | b'.' | b'_' | b'~' => out.push(value as char),
            _ => {
                out.push('%');
                out.push(char::from_digit(hi, 16).unwrap_or('0').to_ascii_uppercase());
                out.push(char::from_digit(lo, 16).unwrap_or('0').to_ascii_uppercase());
            }
        }
        i += 3;
    }
    Ok(out)
}

/// Whether any LF in `bytes` is not preceded by CR. Every request head pays for this, so the
/// LFs are found by memchr rather than by a branch per byte.
pub fn has_bare_lf(bytes: &[u8]) -> bool {
    let Some((first, rest)) = bytes.split_first() else { return false };
    // Every byte beside the one before it, without a branch: the compiler makes it vector
    // compares, where a search for each line end costs a call per line.
    let bare = bytes.iter().zip(rest).fold(false, |bare, (before, byte)| bare | ((*byte == b'\n') & (*before != b'\r')));
    bare || *first == b'\n'
}

/// RFC 9110 `tchar`: what a method or header name is made of.
pub fn is_tchar(b: u8) -> bool {
    TCHAR[usize::from(b)]
}

/// `is_tchar` by byte: every request line's method is read with it, up to the space after it.
const TCHAR: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric() || matches!(c, b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~');
        b += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn tchar_is_rfc_9110s() {
        for b in 0..=255u8 {
            assert_eq!(is_tchar(b), b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b), "{b}");
        }
    }

    #[test]
    fn a_bare_lf_is_found_wherever_it_is() {
        for bare in [&b"\n"[..], b"a\nb", b"\nGET", b"GET / HTTP/1.1\r\nHost: a\r\n\n", b"\r\r\n\n", &[b'a'; 100].iter().chain(b"\n").copied().collect::<Vec<u8>>()] {
            assert!(has_bare_lf(bare), "{:?}", bare.escape_ascii().to_string());
        }
        for clean in [&b""[..], b"\r", b"\r\n", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"a\rb", &[b'a'; 100]] {
            assert!(!has_bare_lf(clean), "{:?}", clean.escape_ascii().to_string());
        }
    }

    fn hosts(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append(header::HOST, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    #[test]
    fn one_host_per_request() {
        let host = |authority: Option<&'static str>, values: &[&str]| request_host(authority, host_values(&hosts(values)), true).map(|h| h.map(str::to_string));
        assert_eq!(host(None, &["a.test"]), Ok(Some("a.test".into())));
        assert_eq!(request_host(None, host_values(&hosts(&[])), false), Ok(None));
        assert!(host(None, &[]).is_err(), "HTTP/1.1 needs a host");
        assert_eq!(host(None, &[" "]), Ok(None), "an empty Host names no authority");
        assert_eq!(host(Some("a.test"), &[]), Ok(Some("a.test".into())));
        assert_eq!(host(Some("A.test."), &["a.test:80"]), Ok(Some("a.test:80".into())));
        assert!(host(None, &["a.test", "b.test"]).is_err());
        assert!(host(Some("a.test"), &["b.test"]).is_err());
        assert!(host(Some("a.test:81"), &["a.test:80"]).is_err());
        assert!(host(None, &["a.test/x"]).is_err());
        assert!(host(None, &["u@a.test"]).is_err());
        assert_eq!(host(None, &["[::1]:8080"]), Ok(Some("[::1]:8080".into())));
    }

    #[test]
    fn a_checked_head_gets_the_host_request_host_chose() {
        let authorities = [None, Some(""), Some("a.test"), Some("A.test."), Some("a.test:80"), Some("[::1]:8080"), Some(" a.test\t")];
        let values: &[&[&str]] = &[&[], &["a.test"], &[" "], &["a.test:80"], &["\ta.test "], &["[::1]:8080"], &["b.test"], &["a.test", "b.test"], &["a.test/x"]];
        let mut accepted = 0;
        for authority in authorities {
            for host_values_sent in values {
                let map = hosts(host_values_sent);
                for required in [true, false] {
                    let Ok(chosen) = request_host(authority, host_values(&map), required) else { continue };
                    accepted += 1;
                    assert_eq!(checked_request_host(authority, host_values(&map)), chosen, "{authority:?} {host_values_sent:?}");
                }
            }
        }
        assert!(accepted > 20, "{accepted}");
    }

    #[test]
    fn hosts_are_normalised() {
        assert_eq!(normalise_host("[::1]:443"), "::1");
        assert_eq!(normalise_host("EXAMPLE.com.:80"), "example.com");
        assert_eq!(normalise_host("a.com"), "a.com");
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for path in ["/", "/api/v1/users", "/a.b/c-d_e~f", "/x/", "*"] {
            assert!(matches!(normalise_path(path), Ok(Cow::Borrowed(p)) if p == path), "{path}");
        }
    }

    #[test]
    fn paths_are_normalised_for_matching() {
        let n = |p: &str| normalise_path(p).map(|c| c.into_owned());
        assert_eq!(n("/public/../admin"), Ok("/admin".into()));
        assert_eq!(n("/public/%2e%2e/admin"), Ok("/admin".into()));
        assert_eq!(n("//admin/x"), Ok("/admin/x".into()));
        assert_eq!(n("/%61dmin/x"), Ok("/admin/x".into()));
        assert_eq!(n("/a/./b/"), Ok("/a/b/".into()));
        assert_eq!(n("/a/b/.."), Ok("/a/".into()));
        assert_eq!(n("/a/%3f"), Ok("/a/%3F".into()));
        assert_eq!(n("/caf\u{e9}/%7e"), Ok("/caf\u{e9}/~".into()));
        assert_eq!(n("/.."), Err(Refusal::bad_request("the path climbs above the root")));
        assert!(n("/a/../../b").is_err());
        assert!(n("/a%2Fb").is_err());
        assert!(n("/a%5cb").is_err());
        assert!(n("/a\\b").is_err());
        assert!(n("/a%zz").is_err());
        assert!(n("/a%2").is_err());
        assert!(n("/public/..;/admin").is_err());
        assert!(n("/public/.;x/admin").is_err());
        assert_eq!(n("/a;v=1/b"), Ok("/a;v=1/b".into()));
        assert!(n("admin").is_err());
    }

    #[test]
    fn a_refusal_is_a_complete_closing_response() {
        let bytes = Refusal::bad_request("nope").http1_bytes();
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.ends_with("\r\nContent-Length: 22\r\n\r\n400 Bad Request: nope\n"), "{text}");
    }
}
