//! Reading an HTTP/1.1 message body off the connection's buffer, delimited as its head said
//! (RFC 9112 §6, §7.1): a `Content-Length` count, or chunked coding parsed strictly (hex sizes
//! that fit in 64 bits, extensions that are tokens or quoted strings, CRLF and nothing else as a
//! line end, trailers as header fields), so that every hop after us reads the same message.

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::http::edge::{has_bare_lf, is_tchar};

/// Chunk extensions a whole body may carry, summed over its chunks (as hyper bounds them).
const MAX_EXTENSION_BYTES: usize = 16 * 1024;
/// Hex digits of one chunk size, leading zeros included.
const MAX_SIZE_DIGITS: u8 = 64;
/// Trailer fields after the last chunk.
const MAX_TRAILER_FIELDS: usize = 100;

/// What the decoder took out of the buffer.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    Data(Bytes),
    /// The body is complete; the chunked trailer section, when it had fields.
    End(Option<HeaderMap>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    ChunkSize,
    ChunkExtension,
    LineEnd,
    Trailers,
    TooLarge,
}

impl DecodeError {
    pub fn as_str(self) -> &'static str {
        match self {
            DecodeError::ChunkSize => "malformed chunk size",
            DecodeError::ChunkExtension => "malformed chunk extension",
            DecodeError::LineEnd => "a chunk does not end in CRLF",
            DecodeError::Trailers => "malformed trailer section",
            DecodeError::TooLarge => "chunk extensions or trailers are too large",
        }
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for DecodeError {}

/// A body being read: call `decode` with the connection's buffer until it gives `End`; `Ok(None)`
/// means the buffer holds no more of it yet.
#[derive(Debug)]
pub enum BodyDecoder {
    Length { remaining: u64 },
    Chunked(Chunked),
    Done,
}

impl BodyDecoder {
    pub fn length(n: u64) -> Self {
        BodyDecoder::Length { remaining: n }
    }

    pub fn chunked(max_trailer_bytes: usize) -> Self {
        BodyDecoder::Chunked(Chunked { state: State::Size, size: 0, digits: 0, extension_bytes: 0, trailer_start: 0, max_trailer_bytes })
    }

    pub fn is_done(&self) -> bool {
        matches!(self, BodyDecoder::Done)
    }

    /// The body's exact size, when the head gave it and nothing was read yet, or what is left.
    pub fn remaining(&self) -> Option<u64> {
        match self {
            BodyDecoder::Length { remaining } => Some(*remaining),
            BodyDecoder::Done => Some(0),
            BodyDecoder::Chunked(_) => None,
        }
    }

    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, DecodeError> {
        match self {
            BodyDecoder::Done => Ok(None),
            BodyDecoder::Length { remaining } => {
                if *remaining == 0 {
                    *self = BodyDecoder::Done;
                    return Ok(Some(Decoded::End(None)));
                }
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = buf.len().min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                *remaining -= n as u64;
                Ok(Some(Decoded::Data(buf.split_to(n).freeze())))
            }
            BodyDecoder::Chunked(chunked) => {
                let decoded = chunked.decode(buf)?;
                if matches!(decoded, Some(Decoded::End(_))) {
                    *self = BodyDecoder::Done;
                }
                Ok(decoded)
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Hex digits of a chunk size.
    Size,
    /// Whitespace after the size or an extension, before `;` or the line end.
    AfterSize,
    /// Whitespace after `;`, then an extension name.
    ExtensionNameStart,
    ExtensionName,
    /// Whitespace after a name: `=`, `;` or the line end.
    AfterExtensionName,
    /// Whitespace after `=`, then a token or a quoted string.
    ExtensionValueStart,
    ExtensionToken,
    ExtensionQuoted,
    ExtensionQuotedEscape,
    /// The LF of a chunk-size line.
    SizeLf,
    Data { remaining: u64 },
    DataCr,
    DataLf,
    /// After the last chunk: the trailer section up to its empty line.
    Trailers,
}

#[derive(Debug)]
pub struct Chunked {
    state: State,
    size: u64,
    digits: u8,
    extension_bytes: usize,
    /// How much of the trailer section has been scanned already (it stays in the buffer whole).
    trailer_start: usize,
    max_trailer_bytes: usize,
}

impl Chunked {
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, DecodeError> {
        loop {
            match self.state {
                State::Data { remaining } => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = buf.len().min(usize::try_from(remaining).unwrap_or(usize::MAX));
                    let left = remaining - n as u64;
                    self.state = if left == 0 { State::DataCr } else { State::Data { remaining: left } };
                    return Ok(Some(Decoded::Data(buf.split_to(n).freeze())));
                }
                State::Trailers => return self.trailers(buf),
                _ => {}
            }
            let Some(&byte) = buf.first() else {
                return Ok(None);
            };
            buf.advance(1);
            self.step(byte)?;
        }
    }

    /// One byte of the framing between chunk data.
    fn step(&mut self, byte: u8) -> Result<(), DecodeError> {
        let is_ws = byte == b' ' || byte == b'\t';
        if byte == b'\n' && !matches!(self.state, State::SizeLf | State::DataLf) {
            return Err(DecodeError::LineEnd);
        }
        self.state = match self.state {
            State::Size => match byte {
                b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                    // Leading zeros are fine; a value past 64 bits is not.
                    if self.size >> 60 != 0 || self.digits >= MAX_SIZE_DIGITS {
                        return Err(DecodeError::ChunkSize);
                    }
                    self.size = self.size << 4 | u64::from(hex_value(byte));
                    self.digits = self.digits.saturating_add(1);
                    State::Size
                }
                _ if self.digits == 0 => return Err(DecodeError::ChunkSize),
                b'\r' => State::SizeLf,
                b';' => State::ExtensionNameStart,
                _ if is_ws => State::AfterSize,
                _ => return Err(DecodeError::ChunkSize),
            },
            State::AfterSize => match byte {
                _ if is_ws => State::AfterSize,
                b';' => State::ExtensionNameStart,
                b'\r' => State::SizeLf,
                _ => return Err(DecodeError::ChunkExtension),
            },
            State::ExtensionNameStart => match byte {
                _ if is_ws => State::ExtensionNameStart,
                _ if is_tchar(byte) => State::ExtensionName,
                _ => return Err(DecodeError::ChunkExtension),
            },
            State::ExtensionName => match byte {
                _ if is_tchar(byte) => State::ExtensionName,
                _ if is_ws => State::AfterExtensionName,
                b'=' => State::ExtensionValueStart,
                b';' => State::ExtensionNameStart,
                b'\r' => State::SizeLf,
                _ => return Err(DecodeError::ChunkExtension),
            },
            State::AfterExtensionName => match byte {
                _ if is_ws => State::AfterExtensionName,
                b'=' => State::ExtensionValueStart,
                b';' => State::ExtensionNameStart,
                b'\r' => State::SizeLf,
                _ => return Err(DecodeError::ChunkExtension),
            },
            State::ExtensionValueStart => match byte {
                _ if is_ws => State::ExtensionValueStart,
                b'"' => State::ExtensionQuoted,
                _ if is_tchar(byte) => State::ExtensionToken,
                _ => return Err(DecodeError::ChunkExtension),
            },
            State::ExtensionToken => match byte {
                _ if is_tchar(byte) => State::ExtensionToken,
                _ if is_ws => State::AfterSize,
                b';' => State::ExtensionNameStart,
                b'\r' => State::SizeLf,
                _ => return Err(DecodeError::ChunkExtension),
            },
            // qdtext: HTAB, SP, visible ASCII but `"` and `\`, obs-text; no control bytes.
            State::ExtensionQuoted => match byte {
                b'"' => State::AfterSize,
                b'\\' => State::ExtensionQuotedEscape,
                b'\t' | b' '..=b'~' | 0x80..=0xff => State::ExtensionQuoted,
                _ => return Err(DecodeError::ChunkExtension),
            },
            State::ExtensionQuotedEscape => match byte {
                b'\t' | b' '..=b'~' | 0x80..=0xff => State::ExtensionQuoted,
                _ => return Err(DecodeError::ChunkExtension),
            },
            State::SizeLf => match byte {
                b'\n' if self.size == 0 => {
                    self.trailer_start = 0;
                    State::Trailers
                }
                b'\n' => State::Data { remaining: std::mem::take(&mut self.size) },
                _ => return Err(DecodeError::LineEnd),
            },
            State::DataCr => match byte {
                b'\r' => State::DataLf,
                _ => return Err(DecodeError::LineEnd),
            },
            State::DataLf => match byte {
                b'\n' => {
                    self.digits = 0;
                    State::Size
                }
                _ => return Err(DecodeError::LineEnd),
            },
            State::Data { .. } | State::Trailers => unreachable!("handled by decode"),
        };
        if matches!(
            self.state,
            State::AfterSize | State::ExtensionNameStart | State::ExtensionName | State::AfterExtensionName | State::ExtensionValueStart | State::ExtensionToken | State::ExtensionQuoted | State::ExtensionQuotedEscape
        ) {
            self.extension_bytes += 1;
            if self.extension_bytes > MAX_EXTENSION_BYTES {
                return Err(DecodeError::TooLarge);
            }
        }
        Ok(())
    }

    /// The trailer section: nothing but an empty line, or header fields and an empty line.
    fn trailers(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, DecodeError> {
        if buf.starts_with(b"\r\n") {
            buf.advance(2);
            return Ok(Some(Decoded::End(None)));
        }
        // A byte that starts neither a field line nor the empty line is refused as soon as it is
        // seen, however many bytes came with it (the answer must not depend on the split).
        if buf.first().is_some_and(|b| *b != b'\r' && !is_tchar(*b)) {
            return Err(DecodeError::Trailers);
        }
        if buf.len() < 2 {
            return Ok(None);
        }
        let from = self.trailer_start.saturating_sub(3);
        let end = buf[from..].windows(4).position(|w| w == b"\r\n\r\n").map(|at| from + at + 4);
        let Some(end) = end else {
            if buf.len() > self.max_trailer_bytes {
                return Err(DecodeError::TooLarge);
            }
            self.trailer_start = buf.len();
            return Ok(None);
        };
        if end > self.max_trailer_bytes {
            return Err(DecodeError::TooLarge);
        }
        let section = &buf[..end];
        if has_bare_lf(section) {
            return Err(DecodeError::LineEnd);
        }
        let mut storage = [httparse::EMPTY_HEADER; MAX_TRAILER_FIELDS];
        let fields = match httparse::parse_headers(section, &mut storage) {
            Ok(httparse::Status::Complete((len, fields))) if len == end => fields,
            Err(httparse::Error::TooManyHeaders) => return Err(DecodeError::TooLarge),
            _ => return Err(DecodeError::Trailers),
        };
        let mut trailers = HeaderMap::with_capacity(fields.len());
        for field in fields.iter() {
            let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| DecodeError::Trailers)?;
            let value = HeaderValue::from_bytes(field.value).map_err(|_| DecodeError::Trailers)?;
            trailers.append(name, value);
        }
        buf.advance(end);
        Ok(Some(Decoded::End(Some(trailers))))
    }
}

fn hex_value(byte: u8) -> u8 {
    match byte {
        b'0'..=b'9' => byte - b'0',
        b'a'..=b'f' => byte - b'a' + 10,
        _ => byte - b'A' + 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in pieces of `step` bytes: the body's data, its trailers, and what
    /// was left in the buffer after the end.
    fn decode_in_steps(decoder: &mut BodyDecoder, input: &[u8], step: usize) -> Result<(Vec<u8>, Option<HeaderMap>, Vec<u8>), DecodeError> {
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        let mut fed = 0;
        loop {
            match decoder.decode(&mut buf)? {
                Some(Decoded::Data(bytes)) => data.extend_from_slice(&bytes),
                Some(Decoded::End(trailers)) => {
                    buf.extend_from_slice(&input[fed..]);
                    return Ok((data, trailers, buf.to_vec()));
                }
                None if fed == input.len() => return Err(DecodeError::LineEnd),
                None => {
                    let next = (fed + step).min(input.len());
                    buf.extend_from_slice(&input[fed..next]);
                    fed = next;
                }
            }
        }
    }

    fn chunked(input: &[u8]) -> Result<(Vec<u8>, Option<HeaderMap>, Vec<u8>), DecodeError> {
        let whole = decode_in_steps(&mut BodyDecoder::chunked(8192), input, input.len().max(1));
        // Every split of the same bytes gives the same answer.
        for step in 1..input.len().min(64) {
            let split = decode_in_steps(&mut BodyDecoder::chunked(8192), input, step);
            assert_eq!(split, whole, "step {step} of {:?}", String::from_utf8_lossy(input));
        }
        whole
    }

    #[test]
    fn content_length_bodies_end_at_their_length() {
        let (data, trailers, rest) = decode_in_steps(&mut BodyDecoder::length(5), b"hello GET /", 3).unwrap();
        assert_eq!((data.as_slice(), trailers, rest.as_slice()), (&b"hello"[..], None, &b" GET /"[..]));
        let (data, _, rest) = decode_in_steps(&mut BodyDecoder::length(0), b"GET", 3).unwrap();
        assert_eq!((data.len(), rest.as_slice()), (0, &b"GET"[..]));
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_split() {
        let (data, trailers, rest) = chunked(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\nGET / HTTP/1.1\r\n").unwrap();
        assert_eq!((data.as_slice(), trailers, rest.as_slice()), (&b"hello world"[..], None, &b"GET / HTTP/1.1\r\n"[..]));
        let (data, _, _) = chunked(b"00A;name=value;flag ; q=\"a \\\" b\"\r\n0123456789\r\n000\r\n\r\n").unwrap();
        assert_eq!(data, b"0123456789");
        let (data, trailers, rest) = chunked(b"3\r\nabc\r\n0\r\nX-Sum: 1\r\nX-Two: 2\r\n\r\nNEXT").unwrap();
        let trailers = trailers.unwrap();
        assert_eq!((data.as_slice(), rest.as_slice()), (&b"abc"[..], &b"NEXT"[..]));
        assert_eq!(trailers.get("x-sum").unwrap(), "1");
        assert_eq!(trailers.get("x-two").unwrap(), "2");
    }

    #[test]
    fn malformed_chunked_bodies_are_refused() {
        let cases: &[(&[u8], DecodeError)] = &[
            (b"\r\n", DecodeError::ChunkSize),
            (b"x\r\n", DecodeError::ChunkSize),
            (b"-5\r\nhello\r\n0\r\n\r\n", DecodeError::ChunkSize),
            (b"0x5\r\nhello\r\n0\r\n\r\n", DecodeError::ChunkSize),
            (b"10000000000000000\r\n", DecodeError::ChunkSize),
            (b"5\nhello\r\n0\r\n\r\n", DecodeError::LineEnd),
            (b"5\r\nhelloX\r\n0\r\n\r\n", DecodeError::LineEnd),
            (b"5\r\nhello\n0\r\n\r\n", DecodeError::LineEnd),
            (b"5;\r\nhello\r\n0\r\n\r\n", DecodeError::ChunkExtension),
            (b"5;a=\"unterminated\r\nhello\r\n0\r\n\r\n", DecodeError::ChunkExtension),
            (b"5;a=b c\r\nhello\r\n0\r\n\r\n", DecodeError::ChunkExtension),
            (b"5;a=\"\x01\"\r\nhello\r\n0\r\n\r\n", DecodeError::ChunkExtension),
            (b"5 x\r\nhello\r\n0\r\n\r\n", DecodeError::ChunkExtension),
            (b"0\r\nX: a\nY: b\r\n\r\n", DecodeError::LineEnd),
            (b"0\r\nX : a\r\n\r\n", DecodeError::Trailers),
            (b"0\r\n\x01\r\n\r\n", DecodeError::Trailers),
        ];
        for (input, error) in cases {
            assert_eq!(chunked(input).map(|_| ()), Err(*error), "{:?}", String::from_utf8_lossy(input));
        }
    }

    /// Found by fuzzing (`h1_body`): a trailer section starting with a byte that no field line
    /// starts with was refused at once when that byte came alone, but held (waiting for its end)
    /// or refused as another error when more bytes came with it.
    #[test]
    fn a_bad_first_trailer_byte_is_refused_however_the_bytes_arrive() {
        for input in [&b"0\r\n\nT"[..], b"0\r\n\n\r\n\r\n", b"3\r\nabc\r\n0\r\n\nX-Two 1\r\nX-Two: 2\r\n\r\nNEXT", b"0\r\n\x01X"] {
            assert_eq!(chunked(input).map(|_| ()), Err(DecodeError::Trailers), "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn an_unfinished_last_chunk_is_not_an_end() {
        // `0\r\n` without the final CRLF: the body is not over, whatever follows later.
        let mut decoder = BodyDecoder::chunked(8192);
        let mut buf = BytesMut::from(&b"0\r\n"[..]);
        assert_eq!(decoder.decode(&mut buf), Ok(None));
        assert!(!decoder.is_done());
    }

    #[test]
    fn extensions_and_trailers_are_bounded() {
        let mut long = b"1".to_vec();
        for _ in 0..2000 {
            long.extend_from_slice(b";abcdefghi");
        }
        long.extend_from_slice(b"\r\nx\r\n0\r\n\r\n");
        assert_eq!(decode_in_steps(&mut BodyDecoder::chunked(8192), &long, 4096).map(|_| ()), Err(DecodeError::TooLarge));
        let mut trailers = b"0\r\n".to_vec();
        for i in 0..1000 {
            trailers.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        trailers.extend_from_slice(b"\r\n");
        assert_eq!(decode_in_steps(&mut BodyDecoder::chunked(4096), &trailers, 512).map(|_| ()), Err(DecodeError::TooLarge));
    }
}
