//! Fuzzes the HTTP/1.1 request-body decoder (`src/http/h1/decode.rs`: `Content-Length` and strict
//! chunked coding) and checks what the connection loop relies on, beyond "no panic": the outcome
//! (the data, the trailers, the error or the end, the bytes left after the end) is the same however
//! the bytes arrive, fed whole or cut into pieces; every answer but the end makes progress; the data
//! never outgrows the input; the decoder is done after `End` and takes nothing more; a
//! `Content-Length` body is exactly its first bytes; and a chunked body encoded from random data
//! (random chunk sizes, leading zeros, extensions, trailers, bytes after it) decodes back to it.
//!
//! decode.rs names its sibling as `crate::http::edge`, so both files are mounted under a `http`
//! module of this crate, as in `http_head`; the `http` library is reached as `::http` here.
//!
//! Input: the first byte picks the mode (and for raw chunked input the trailer cap):
//! `% 4 == 0` a `Content-Length` body (the next two bytes are the length), `1` and `2` raw chunked
//! bytes, `3` a round trip built from the rest with `arbitrary`. For the first two modes the next
//! byte is a count `k % 8` and the `k` bytes after it the gaps between the cuts; the rest is the body.
#![no_main]

use ::http::{HeaderMap, HeaderName, HeaderValue};
use bytes::BytesMut;
use libfuzzer_sys::arbitrary::{Result as ArbResult, Unstructured};
use libfuzzer_sys::fuzz_target;

// A `#[path]` on an inline module names the directory its children are read from.
#[allow(dead_code)]
#[path = "../../src/http"]
mod http {
    #[path = "edge.rs"]
    pub mod edge;
    pub mod h1 {
        #[path = "decode.rs"]
        pub mod decode;
    }
}

use http::h1::decode::{BodyDecoder, DecodeError, Decoded};

/// decode.rs's private `MAX_EXTENSION_BYTES`. Keep in step with it.
const MAX_EXTENSION_BYTES: usize = 16 * 1024;
/// Trailer caps for raw chunked input: small ones reach the `TooLarge` paths.
const TRAILER_CAPS: [usize; 8] = [0, 1, 2, 3, 4, 16, 64, 8192];

#[derive(Debug, PartialEq)]
enum Outcome {
    End { trailers: Option<HeaderMap>, rest: Vec<u8> },
    Error(DecodeError),
    /// The input ran out before the body's end.
    Incomplete,
}

#[derive(Debug, PartialEq)]
struct Run {
    data: Vec<u8>,
    outcome: Outcome,
}

/// Decodes `input` fed in the pieces that `cuts` (positions, ascending, may repeat, may be past
/// the end) make of it, checking the per-call promises on the way.
fn run(mut decoder: BodyDecoder, input: &[u8], cuts: &[usize]) -> Run {
    let length = decoder.remaining();
    let mut ends: Vec<usize> = cuts.iter().map(|c| (*c).min(input.len())).collect();
    ends.push(input.len());
    let mut ends = ends.into_iter();
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let mut data = Vec::new();
    // Each call either takes a byte, feeds a piece or ends the run: this bounds a stuck decoder.
    let mut calls = 0usize;
    loop {
        calls += 1;
        assert!(calls <= 2 * input.len() + cuts.len() + 8, "the decoder makes no progress");
        let before = buf.len();
        match decoder.decode(&mut buf) {
            Ok(Some(Decoded::Data(bytes))) => {
                assert!(!bytes.is_empty(), "empty data");
                assert!(buf.len() < before, "data from nowhere");
                data.extend_from_slice(&bytes);
                assert!(data.len() <= input.len(), "more data than input");
                assert!(!decoder.is_done());
                if let Some(n) = length {
                    assert_eq!(decoder.remaining(), Some(n - data.len() as u64));
                }
            }
            Ok(Some(Decoded::End(trailers))) => {
                assert!(decoder.is_done(), "not done after End");
                assert_eq!(decoder.remaining(), Some(0));
                let left = buf.len();
                assert_eq!(decoder.decode(&mut buf), Ok(None), "an answer after End");
                assert_eq!(buf.len(), left, "bytes taken after End");
                if let Some(n) = length {
                    assert_eq!(data.len() as u64, n);
                    assert!(trailers.is_none());
                }
                let mut rest = buf.to_vec();
                rest.extend_from_slice(&input[fed..]);
                return Run { data, outcome: Outcome::End { trailers, rest } };
            }
            Ok(None) => {
                assert!(!decoder.is_done());
                let Some(end) = ends.next() else {
                    return Run { data, outcome: Outcome::Incomplete };
                };
                let end = end.max(fed);
                buf.extend_from_slice(&input[fed..end]);
                fed = end;
            }
            Err(error) => {
                assert!(!error.as_str().is_empty());
                return Run { data, outcome: Outcome::Error(error) };
            }
        }
    }
}

/// Cut positions from gap bytes.
fn cuts_from(gaps: &[u8]) -> Vec<usize> {
    let mut at = 0;
    gaps.iter().map(|g| {
        at += usize::from(*g);
        at
    }).collect()
}

/// The same outcome fed whole, in the given pieces, and (short inputs) a byte at a time.
fn same_whatever_the_split(make: &dyn Fn() -> BodyDecoder, input: &[u8], cuts: &[usize]) -> Run {
    let whole = run(make(), input, &[]);
    let split = run(make(), input, cuts);
    assert_eq!(split, whole, "cut at {cuts:?}");
    if input.len() <= 128 {
        let bytewise: Vec<usize> = (0..input.len()).collect();
        assert_eq!(run(make(), input, &bytewise), whole, "a byte at a time");
    }
    whole
}

fn check_raw_chunked(input: &[u8], cuts: &[usize], max_trailer: usize) {
    let run = same_whatever_the_split(&|| BodyDecoder::chunked(max_trailer), input, cuts);
    if let Outcome::End { trailers, rest } = &run.outcome {
        // At least "0\r\n\r\n" of framing; the data and what follows come out of the input.
        assert!(run.data.len() + rest.len() + 5 <= input.len());
        assert!(input.ends_with(rest));
        if let Some(trailers) = trailers {
            assert!(!trailers.is_empty(), "an empty trailer map instead of None");
        }
    }
    // Against the grammar, read independently: an end only where the grammar completes, with the
    // same data, trailers and rest; a refusal only where the grammar fails or a cap is passed; a
    // wait only where the grammar waits too, or inside a trailer section (read whole at its end).
    let (grammar, digits) = reference(input);
    let capped = digits > MAX_SIZE_DIGITS;
    let show = || input.escape_ascii().to_string();
    match (&run.outcome, grammar) {
        (Outcome::End { trailers, rest }, Grammar::Complete { data, fields, rest: grammar_rest }) => {
            assert_eq!(run.data, data, "other data than the grammar's: {}", show());
            assert_eq!(*rest, grammar_rest, "another end than the grammar's: {}", show());
            let mut map = HeaderMap::new();
            for (name, value) in fields {
                map.append(HeaderName::from_bytes(&name).unwrap(), HeaderValue::from_bytes(&value).unwrap());
            }
            assert_eq!(trailers.as_ref(), (!map.is_empty()).then_some(&map), "other trailers than the grammar's: {}", show());
        }
        (Outcome::End { .. }, other) => panic!("an end the grammar does not reach ({other:?}): {}", show()),
        (Outcome::Error(DecodeError::TooLarge), _) | (Outcome::Error(_), Grammar::Invalid { .. }) => {}
        (Outcome::Error(DecodeError::ChunkSize), _) if capped => {}
        (Outcome::Error(error), other) => panic!("{error:?} where the grammar reads {other:?}: {}", show()),
        (Outcome::Incomplete, Grammar::Incomplete | Grammar::Invalid { in_trailers: true }) => {}
        (Outcome::Incomplete, other) => panic!("a wait where the grammar reads {other:?}: {}", show()),
    }
}

/// decode.rs's private `MAX_SIZE_DIGITS`. Keep in step with it.
const MAX_SIZE_DIGITS: usize = 64;

#[derive(Debug)]
enum Grammar {
    Complete { data: Vec<u8>, fields: Vec<(Vec<u8>, Vec<u8>)>, rest: Vec<u8> },
    /// A prefix of a chunked body.
    Incomplete,
    Invalid { in_trailers: bool },
}

enum Stop {
    Incomplete,
    Invalid,
}

struct Cursor<'a> {
    input: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Result<u8, Stop> {
        self.input.get(self.at).copied().ok_or(Stop::Incomplete)
    }

    fn expect(&mut self, byte: u8) -> Result<(), Stop> {
        if self.peek()? != byte {
            return Err(Stop::Invalid);
        }
        self.at += 1;
        Ok(())
    }

    fn skip_while(&mut self, f: impl Fn(u8) -> bool) -> Result<usize, Stop> {
        let from = self.at;
        while f(self.peek()?) {
            self.at += 1;
        }
        Ok(self.at - from)
    }

    fn bws(&mut self) -> Result<(), Stop> {
        self.skip_while(|b| b == b' ' || b == b'\t').map(drop)
    }

    fn token(&mut self) -> Result<(), Stop> {
        if self.skip_while(|b| TCHARS.contains(&b))? == 0 {
            return Err(Stop::Invalid);
        }
        Ok(())
    }
}

/// RFC 9112 §7.1 chunked coding, read whole: `chunk-size *( BWS ";" BWS name [ BWS "=" BWS
/// ( token / quoted-string ) ] ) BWS CRLF` (the BWS before the CRLF as decode.rs allows it),
/// data, CRLF; the last chunk; field lines (RFC 9110 §5.5 values, OWS trimmed); CRLF. Also the
/// most hex digits of a chunk size seen.
fn reference(input: &[u8]) -> (Grammar, usize) {
    let mut cursor = Cursor { input, at: 0 };
    let mut data = Vec::new();
    let mut fields = Vec::new();
    let mut digits = 0;
    let mut in_trailers = false;
    let mut read = || -> Result<(), Stop> {
        loop {
            // A size past 64 bits is invalid as soon as its digits say so.
            let mut size: u64 = 0;
            let mut n = 0;
            while let Some(v) = (cursor.peek()? as char).to_digit(16) {
                size = size.checked_mul(16).and_then(|s| s.checked_add(u64::from(v))).ok_or(Stop::Invalid)?;
                cursor.at += 1;
                n += 1;
                digits = digits.max(n);
            }
            if n == 0 {
                return Err(Stop::Invalid);
            }
            loop {
                cursor.bws()?;
                match cursor.peek()? {
                    b'\r' => break,
                    b';' => cursor.at += 1,
                    _ => return Err(Stop::Invalid),
                }
                cursor.bws()?;
                cursor.token()?;
                cursor.bws()?;
                if cursor.peek()? != b'=' {
                    continue;
                }
                cursor.at += 1;
                cursor.bws()?;
                if cursor.peek()? != b'"' {
                    cursor.token()?;
                    continue;
                }
                cursor.at += 1;
                loop {
                    match cursor.peek()? {
                        b'"' => break,
                        b'\\' => {
                            cursor.at += 1;
                            let b = cursor.peek()?;
                            if !(b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80) {
                                return Err(Stop::Invalid);
                            }
                        }
                        b if b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80 => {}
                        _ => return Err(Stop::Invalid),
                    }
                    cursor.at += 1;
                }
                cursor.at += 1;
            }
            cursor.expect(b'\r')?;
            cursor.expect(b'\n')?;
            if size == 0 {
                break;
            }
            let size = usize::try_from(size).unwrap_or(usize::MAX);
            if input.len() - cursor.at < size {
                return Err(Stop::Incomplete);
            }
            data.extend_from_slice(&input[cursor.at..cursor.at + size]);
            cursor.at += size;
            cursor.expect(b'\r')?;
            cursor.expect(b'\n')?;
        }
        in_trailers = true;
        while cursor.peek()? != b'\r' {
            let start = cursor.at;
            cursor.token()?;
            let name = input[start..cursor.at].to_vec();
            cursor.expect(b':')?;
            cursor.bws()?;
            let start = cursor.at;
            cursor.skip_while(|b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80)?;
            let mut value = &input[start..cursor.at];
            while let [rest @ .., b' ' | b'\t'] = value {
                value = rest;
            }
            cursor.expect(b'\r')?;
            cursor.expect(b'\n')?;
            fields.push((name, value.to_vec()));
        }
        cursor.expect(b'\r')?;
        cursor.expect(b'\n')
    };
    let grammar = match read() {
        Ok(()) => Grammar::Complete { data, fields, rest: input[cursor.at..].to_vec() },
        Err(Stop::Incomplete) => Grammar::Incomplete,
        Err(Stop::Invalid) => Grammar::Invalid { in_trailers },
    };
    (grammar, digits)
}

fn check_length(input: &[u8], cuts: &[usize], n: u64) {
    let run = same_whatever_the_split(&|| BodyDecoder::length(n), input, cuts);
    let take = input.len().min(n as usize);
    assert_eq!(run.data, &input[..take]);
    let expected = if (input.len() as u64) >= n { Outcome::End { trailers: None, rest: input[take..].to_vec() } } else { Outcome::Incomplete };
    assert_eq!(run.outcome, expected);
}

const TCHARS: &[u8] = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

fn token(u: &mut Unstructured, max: usize) -> ArbResult<Vec<u8>> {
    let len = u.int_in_range(1..=max)?;
    (0..len).map(|_| u.choose(TCHARS).copied()).collect()
}

fn bws(u: &mut Unstructured) -> ArbResult<&'static [u8]> {
    Ok(*u.choose(&[&b""[..], b"", b"", b" ", b"\t", b" \t "])?)
}

/// A chunk extension: `BWS ; BWS name [BWS = BWS (token / quoted-string)]`.
fn extension(u: &mut Unstructured) -> ArbResult<Vec<u8>> {
    let mut out = bws(u)?.to_vec();
    out.push(b';');
    out.extend_from_slice(bws(u)?);
    out.extend(token(u, 8)?);
    match u.int_in_range(0..=2u8)? {
        0 => {}
        1 => {
            out.extend_from_slice(bws(u)?);
            out.push(b'=');
            out.extend_from_slice(bws(u)?);
            out.extend(token(u, 8)?);
        }
        _ => {
            out.extend_from_slice(bws(u)?);
            out.push(b'=');
            out.extend_from_slice(bws(u)?);
            out.push(b'"');
            for _ in 0..u.int_in_range(0..=8)? {
                let b: u8 = u.arbitrary()?;
                // qdtext, or a quoted-pair of any HTAB / SP / VCHAR / obs-text.
                let ok = |b: u8| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80;
                if !ok(b) {
                    continue;
                }
                if b == b'"' || b == b'\\' || u.ratio(1, 8)? {
                    out.push(b'\\');
                }
                out.push(b);
            }
            out.push(b'"');
        }
    }
    Ok(out)
}

/// A chunk-size line: the size in hex (either case, leading zeros), extensions, CRLF.
fn size_line(u: &mut Unstructured, size: usize, extension_bytes: &mut usize) -> ArbResult<Vec<u8>> {
    let mut out = b"0".repeat(u.int_in_range(0..=3)?);
    let hex = if u.arbitrary()? { format!("{size:X}") } else { format!("{size:x}") };
    out.extend_from_slice(hex.as_bytes());
    for _ in 0..u.int_in_range(0..=2)? {
        let ext = extension(u)?;
        if *extension_bytes + ext.len() > MAX_EXTENSION_BYTES {
            break;
        }
        *extension_bytes += ext.len();
        out.extend(ext);
    }
    if u.ratio(1, 8)? && *extension_bytes < MAX_EXTENSION_BYTES {
        // Whitespace after the size (BWS before the line end).
        *extension_bytes += 1;
        out.push(b' ');
    }
    out.extend_from_slice(b"\r\n");
    Ok(out)
}

/// A random chunked body, what it decodes to, and random bytes after it; decoded whole, in random
/// pieces and a byte at a time.
fn round_trip(u: &mut Unstructured) -> ArbResult<()> {
    let mut wire = Vec::new();
    let mut data = Vec::new();
    let mut extension_bytes = 0;
    while u.ratio(7, 8)? && !u.is_empty() {
        let size = if u.ratio(1, 16)? { u.int_in_range(256..=4096)? } else { u.int_in_range(1..=64)? };
        let chunk: Vec<u8> = (0..size).map(|i| u.arbitrary::<u8>().unwrap_or(i as u8)).collect();
        wire.extend(size_line(u, size, &mut extension_bytes)?);
        wire.extend_from_slice(&chunk);
        wire.extend_from_slice(b"\r\n");
        data.extend(chunk);
    }
    wire.extend(size_line(u, 0, &mut extension_bytes)?);
    let trailer_start = wire.len();
    let mut trailers = HeaderMap::new();
    for _ in 0..u.int_in_range(0..=3)? {
        let name = token(u, 12)?;
        // A field value: visible characters with single spaces or tabs between them.
        let mut value = vec![*u.choose(TCHARS)?];
        for _ in 0..u.int_in_range(0..=12)? {
            let b: u8 = u.int_in_range(0x21..=0x7e)?;
            if u.ratio(1, 6)? {
                value.push(*u.choose(b" \t")?);
            }
            value.push(b);
        }
        wire.extend_from_slice(&name);
        wire.push(b':');
        wire.extend_from_slice(bws(u)?);
        wire.extend_from_slice(&value);
        wire.extend_from_slice(bws(u)?);
        wire.extend_from_slice(b"\r\n");
        trailers.append(HeaderName::from_bytes(&name).unwrap(), HeaderValue::from_bytes(&value).unwrap());
    }
    wire.extend_from_slice(b"\r\n");
    let section = wire.len() - trailer_start;
    let after: Vec<u8> = u.arbitrary()?;
    wire.extend_from_slice(&after);

    let mut cuts = Vec::new();
    for _ in 0..u.int_in_range(0..=8)? {
        cuts.push(u.int_in_range(0..=wire.len())?);
    }
    cuts.sort_unstable();
    // Exactly the section's size is enough; a byte less is not.
    let max_trailer = if trailers.is_empty() { 0 } else { section + u.int_in_range(0..=64)? };
    let expected = Run {
        data,
        outcome: Outcome::End { trailers: if trailers.is_empty() { None } else { Some(trailers) }, rest: after },
    };
    let got = same_whatever_the_split(&|| BodyDecoder::chunked(max_trailer), &wire, &cuts);
    assert_eq!(got, expected, "round trip of {:?}", wire.escape_ascii().to_string());
    if max_trailer > 0 {
        let tight = run(BodyDecoder::chunked(section - 1), &wire, &cuts);
        assert_eq!(tight.outcome, Outcome::Error(DecodeError::TooLarge), "a trailer section past the cap");
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode % 4 == 3 {
        let _ = round_trip(&mut Unstructured::new(rest));
        return;
    }
    let (n, rest) = match (mode % 4, rest) {
        (0, [hi, lo, rest @ ..]) => (u64::from(u16::from_be_bytes([*hi, *lo])), rest),
        (0, _) => return,
        (_, rest) => (0, rest),
    };
    let Some((&k, rest)) = rest.split_first() else { return };
    let k = usize::from(k % 8).min(rest.len());
    let (gaps, input) = rest.split_at(k);
    let cuts = cuts_from(gaps);
    if mode % 4 == 0 {
        check_length(input, &cuts, n);
    } else {
        check_raw_chunked(input, &cuts, TRAILER_CAPS[usize::from(mode >> 5)]);
    }
});
