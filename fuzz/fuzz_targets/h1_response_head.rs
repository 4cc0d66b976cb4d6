//! Fuzzes the upstream response-head reader (`src/http/h1/response_head.rs`: what our HTTP/1.1
//! client makes of a backend's answer before any of it reaches a client) and checks what the
//! client side relies on, beyond "no panic": the answer is deterministic; a prefix of a complete
//! head is incomplete, and bytes after it change nothing; the head is taken off the buffer to its
//! end and no further; the fields that go on are httparse's fields of the head without the
//! hop-by-hop ones and those `Connection` names (a 101 keeps them all), whether they are kept as
//! spans of the head or in a map; and the framing is the one RFC 9112 §6.3 gives, ambiguous
//! framing refused.
//!
//! Input: the first byte picks where the head is cut for the prefix check; the rest is the bytes
//! the upstream sent.
//!
//! The modules name their siblings as `crate::http::…`, so they are mounted under a `http` module
//! of this crate, as in `http_head`; the `http` library is reached as `::http` here.
#![no_main]

use bytes::{Bytes, BytesMut};
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
    pub mod h1 {
        #[path = "fields.rs"]
        pub mod fields;
        #[path = "response_head.rs"]
        pub mod response_head;
    }
}

use http::h1::response_head::{fields_map, parse_response_head, Fields, Framing, Malformed, ResponseHead, MAX_RESPONSE_HEAD};
use http::head::MAX_HEADERS;
use http::headers::{hop_index, list_items, names_another_field};

/// Everything the client side reads of one parse, comparable.
#[derive(Debug, PartialEq)]
enum Outcome {
    Incomplete,
    Refused(&'static str),
    Head {
        /// Bytes taken off the buffer.
        len: usize,
        status: u16,
        http10: bool,
        reason: Option<Vec<u8>>,
        close: bool,
        /// The fields that go on, names lowercase, in order.
        fields: Vec<(Vec<u8>, Vec<u8>)>,
        kept_raw: bool,
        framing: Result<Framing, &'static str>,
    },
}

fn fields_of(headers: &::http::HeaderMap) -> Vec<(Vec<u8>, Vec<u8>)> {
    headers.iter().map(|(name, value)| (name.as_str().as_bytes().to_vec(), value.as_bytes().to_vec())).collect()
}

/// Parses `bytes` as a connection's buffer holds them; the outcome and what is left of the buffer.
fn parse(bytes: &[u8]) -> (Outcome, BytesMut) {
    let mut buf = BytesMut::from(bytes);
    let outcome = match parse_response_head(&mut buf) {
        Ok(None) => Outcome::Incomplete,
        Err(Malformed(why)) => Outcome::Refused(why),
        Ok(Some(ResponseHead { status, version, reason, headers, close, fields: delimiting })) => {
            let (fields, kept_raw) = match headers {
                // In order, with the names as the upstream cased them, made lowercase here.
                Fields::Raw(raw) => (raw.iter().map(|(name, value)| (name.to_ascii_lowercase(), value.to_vec())).collect(), true),
                Fields::Map(map) => (fields_of(&map), false),
            };
            Outcome::Head {
                len: bytes.len() - buf.len(),
                status: status.as_u16(),
                http10: version == ::http::Version::HTTP_10,
                reason,
                close,
                fields,
                kept_raw,
                framing: delimiting.framing().map_err(|Malformed(why)| why),
            }
        }
    };
    (outcome, buf)
}

/// What the head's fields say, read here from httparse's own reading: the fields that go on, and
/// the framing RFC 9112 §6.3 gives.
fn expected(head: &[u8]) -> (u16, Vec<(Vec<u8>, Vec<u8>)>, Result<Framing, &'static str>, bool) {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut storage);
    let Ok(httparse::Status::Complete(len)) = response.parse(head) else { panic!("the head the reader took does not parse alone") };
    assert_eq!(len, head.len(), "the reader took more or less than the head");
    let status = response.code.expect("a complete head has a status");
    let tunnel = status == 101;
    let connection_items = || {
        response.headers.iter().filter(|f| f.name.eq_ignore_ascii_case("connection")).flat_map(|f| list_items(f.value)).map(|item| item.to_ascii_lowercase())
    };
    let named: Vec<Vec<u8>> = connection_items().filter(|item| names_another_field(item)).collect();
    let lists = |token: &[u8]| connection_items().any(|item| item == token);
    let close = if response.version == Some(0) { !lists(b"keep-alive") } else { lists(b"close") };
    let fields = response
        .headers
        .iter()
        .filter(|f| tunnel || (hop_index(f.name.as_bytes()).is_none() && !named.iter().any(|n| f.name.as_bytes().eq_ignore_ascii_case(n))))
        .map(|f| (f.name.to_ascii_lowercase().into_bytes(), f.value.to_vec()))
        .collect();
    // Content-Length as RFC 9110 §8.6 lets a recipient read it: a list of one number, repeated;
    // the first fault found, in order, is the answer (a field with a bad item is read no further).
    let mut length: Option<u64> = None;
    let mut length_fault: Option<&'static str> = None;
    for field in response.headers.iter().filter(|f| f.name.eq_ignore_ascii_case("content-length")) {
        for item in list_items(field.value) {
            if item.is_empty() || item.len() > 19 || !item.iter().all(u8::is_ascii_digit) {
                length_fault.get_or_insert("bad Content-Length");
                break;
            }
            let n = item.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            if length.is_some_and(|seen| seen != n) {
                length_fault.get_or_insert("Content-Length values differ");
            }
            length = Some(n);
        }
    }
    let codings: Vec<&httparse::Header<'_>> = response.headers.iter().filter(|f| f.name.eq_ignore_ascii_case("transfer-encoding")).collect();
    let framing = if let Some(fault) = length_fault {
        Err(fault)
    } else if !codings.is_empty() && length.is_some() {
        Err("both Content-Length and Transfer-Encoding")
    } else if let Some(last) = codings.last() {
        let readable = last.value.iter().all(|b| *b == b'\t' || (0x20..0x7f).contains(b));
        let chunked = readable && list_items(last.value).next_back().is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"));
        Ok(if chunked { Framing::Chunked } else { Framing::UntilClose })
    } else {
        Ok(length.map_or(Framing::UntilClose, Framing::Length))
    };
    (status, fields, framing, close)
}

fuzz_target!(|input: &[u8]| {
    let Some((&cut, bytes)) = input.split_first() else { return };
    let (outcome, rest) = parse(bytes);
    assert_eq!(parse(bytes).0, outcome, "not deterministic");
    match &outcome {
        Outcome::Incomplete => assert!(bytes.len() <= MAX_RESPONSE_HEAD, "incomplete past the cap"),
        Outcome::Refused(_) => {}
        Outcome::Head { len, status, fields, kept_raw, framing, close, .. } => {
            assert!(*len <= MAX_RESPONSE_HEAD);
            assert_eq!(&rest[..], &bytes[*len..], "the head was not taken off exactly");
            let head = &bytes[..*len];
            let (want_status, want_fields, want_framing, want_close) = expected(head);
            assert_eq!(*status, want_status);
            // A map gives each name's values together (in order), and a removal may move a
            // name: compared by name, then as sent within one name. Spans keep the order sent.
            let by_name = |fields: &[(Vec<u8>, Vec<u8>)]| {
                let mut sorted = fields.to_vec();
                sorted.sort_by(|a, b| a.0.cmp(&b.0));
                sorted
            };
            if *kept_raw {
                assert_eq!(fields, &want_fields, "the fields that go on");
            } else {
                assert_eq!(by_name(fields), by_name(&want_fields), "the fields that go on");
            }
            assert_eq!(framing, &want_framing, "the framing");
            assert_eq!(*close, want_close, "whether the upstream closes");
            assert!(fields.iter().all(|(_, value)| !value.contains(&b'\r') && !value.contains(&b'\n')));
            // Kept as spans, the fields read the same as the map the other path builds.
            if *kept_raw {
                let map = fields_map(&Bytes::copy_from_slice(head), false, &[]).expect("a head read once reads again");
                assert_eq!(by_name(fields), by_name(&fields_of(&map)), "spans and map disagree");
            }
            // A prefix of the head is incomplete; bytes after it change nothing.
            let prefix = usize::from(cut) * *len / 256;
            assert_eq!(parse(&head[..prefix]).0, Outcome::Incomplete, "a prefix of {prefix} bytes was decided");
            let mut longer = bytes.to_vec();
            longer.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
            assert_eq!(parse(&longer).0, outcome, "bytes after the head changed it");
        }
    }
});
