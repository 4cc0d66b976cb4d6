//! An upstream's HTTP/1.x response head, read once with httparse into what the client side
//! needs of it: the status, whether the connection stays open, how the body is delimited (RFC
//! 9112 §6.3; a response that frames its body two ways is refused), and the fields that go on,
//! without the hop-by-hop ones, kept as spans of the head (`h1::fields`) or in a map. It knows
//! nothing of connections and bodies (`h1::client` drives it), so the fuzzer reads it whole
//! (fuzz/fuzz_targets/h1_response_head.rs).

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, StatusCode, Version};

use crate::http::h1::fields::{FieldSpans, RawFields};
use crate::http::head::MAX_HEADERS;
use crate::http::headers::{equals_lowercase_any_case, hop_index, list_items, names_another_field, CONNECTION_HOP, TRANSFER_ENCODING_HOP};

/// A response head larger than this is refused (the upstream is not an attacker, but not
/// unbounded either).
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Why a response head is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

/// A response head, read.
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    /// The reason phrase, when it is not the status's usual one.
    pub reason: Option<Vec<u8>>,
    /// Without the hop-by-hop fields (but a 101's, which are always in a map).
    pub headers: Fields,
    /// The upstream will close after this response.
    pub close: bool,
    pub fields: DelimitingFields,
}

/// How a response's body is delimited, where it has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
    /// No length: the body ends when the upstream closes.
    UntilClose,
}

/// Reads a response head off the start of `buf`: None while it is incomplete. httparse reads
/// the buffer as it is, and the head is taken off it once read, its fields kept as spans of it.
pub fn parse_response_head(buf: &mut BytesMut) -> Result<Option<ResponseHead>, Malformed> {
    let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let end = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut response, buf, &mut storage) {
        Ok(httparse::Status::Complete(len)) => len,
        // The limit holds however the bytes were split into reads.
        Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_HEAD => return Err(Malformed("response head too large")),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Malformed("too many response header fields")),
        Err(_) => return Err(Malformed("unreadable response head")),
    };
    if end > MAX_RESPONSE_HEAD {
        return Err(Malformed("response head too large"));
    }
    let code = response.code.ok_or(Malformed("no status"))?;
    let status = StatusCode::from_u16(code).map_err(|_| Malformed("bad status"))?;
    let http10 = response.version == Some(0);
    let reason = response.reason.filter(|reason| !reason.is_empty() && Some(*reason) != status.canonical_reason()).map(|reason| reason.as_bytes().to_vec());
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
            None if equals_lowercase_any_case(name, b"content-length") => fields.content_length(field.value),
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
    Ok(Some(ResponseHead { status, version, reason, headers, close, fields }))
}

/// The fields of a response head (read once already) that go on, as a map whose values share
/// the head: all of a 101's; without the hop-by-hop ones and those `Connection` names otherwise.
pub fn fields_map(head: &Bytes, tunnel: bool, named: &[HeaderName]) -> Result<HeaderMap, Malformed> {
    let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut response, head, &mut storage) {
        Ok(httparse::Status::Complete(len)) if len == head.len() => {}
        _ => return Err(Malformed("unreadable response head")),
    }
    let mut headers = HeaderMap::with_capacity(response.headers.len());
    for field in response.headers.iter().filter(|field| tunnel || hop_index(field.name.as_bytes()).is_none()) {
        let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| Malformed("bad header name"))?;
        headers.append(name, crate::http::head::parsed_field_value(head.slice_ref(field.value)));
    }
    if !tunnel {
        for name in named {
            headers.remove(name);
        }
    }
    Ok(headers)
}

/// A response head's fields as they go on: kept in the head, or in a map.
pub enum Fields {
    Raw(Box<RawFields>),
    Map(HeaderMap),
}

/// What a response head's delimiting and connection fields say, gathered as the head is read.
#[derive(Default)]
pub struct DelimitingFields {
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
            if equals_lowercase_any_case(token, b"close") {
                self.close = true;
            } else if equals_lowercase_any_case(token, b"keep-alive") {
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
        self.chunked_last = readable && list_items(value).next_back().is_some_and(|coding| equals_lowercase_any_case(coding, b"chunked"));
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
    pub fn framing(&self) -> Result<Framing, Malformed> {
        if let Some(why) = self.length_error {
            return Err(Malformed(why));
        }
        if self.transfer_encoding {
            if self.length.is_some() {
                return Err(Malformed("both Content-Length and Transfer-Encoding"));
            }
            return Ok(if self.chunked_last { Framing::Chunked } else { Framing::UntilClose });
        }
        Ok(match self.length {
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header;

    fn head(text: &str) -> ResponseHead {
        let mut buf = BytesMut::from(text.as_bytes());
        match parse_response_head(&mut buf) {
            Ok(Some(head)) => head,
            Ok(None) => panic!("{text:?}: incomplete"),
            Err(Malformed(why)) => panic!("{text:?}: {why}"),
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
            Ok(Framing::Length(_)) => Ok("length"),
            Ok(Framing::Chunked) => Ok("chunked"),
            Ok(Framing::UntilClose) => Ok("until close"),
            Err(Malformed(why)) => Err(why),
        }
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
