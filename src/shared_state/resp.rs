//! The slice of RESP (the Redis protocol) that the per-request calls speak: commands encoded as
//! arrays of bulk strings, and the replies GETEX, EVALSHA of our scripts (which answer with a bulk
//! string), AUTH and SELECT get (a value, nil, a status, an error).
//! Replies are untrusted bytes: the parser bounds every line and value, and is fuzzed
//! (fuzz/fuzz_targets/redis_reply.rs).

/// A reply's first line (a status, an error, a length) is short; a longer one is not Redis.
pub const MAX_LINE_BYTES: usize = 4096;
/// A stored backend is a `host:port`; a longer value is not ours to buffer.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// The decimal digits of `n`, right-aligned: `digits[start..]`.
fn decimal(mut n: u64) -> ([u8; 20], usize) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return (digits, start);
        }
    }
}

fn push_length(out: &mut Vec<u8>, kind: u8, n: usize) {
    out.push(kind);
    push_decimal(out, n as u64);
    out.extend_from_slice(b"\r\n");
}

/// One bulk string made of `parts`.
fn push_bulk(out: &mut Vec<u8>, parts: &[&[u8]]) {
    push_length(out, b'$', parts.iter().map(|part| part.len()).sum());
    for part in parts {
        out.extend_from_slice(part);
    }
    out.extend_from_slice(b"\r\n");
}

/// A command in RESP: an array of bulk strings.
pub fn encode_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    push_length(out, b'*', args.len());
    for arg in args {
        push_bulk(out, &[arg]);
    }
}

/// As `encode_command`, each argument the concatenation of its parts (a key written in place,
/// with no key string built).
pub fn encode_command_of_parts(out: &mut Vec<u8>, args: &[&[&[u8]]]) {
    push_length(out, b'*', args.len());
    for parts in args {
        push_bulk(out, parts);
    }
}

/// `GETEX <prefix><entry> EX <ttl_secs>`, the key written in place (no key string is built).
/// Once per proxied request: one reservation, then appends into it (callgrind: ~150 instructions,
/// where two stack buffers and a digit loop per number took ~530).
pub fn encode_getex(out: &mut Vec<u8>, prefix: &str, entry: &str, ttl_secs: u64) {
    let (ttl, ttl_start) = decimal(ttl_secs);
    let ttl = &ttl[ttl_start..];
    // The fixed text, two 20-digit numbers at most and the length of one.
    out.reserve(32 + 2 * 20 + prefix.len() + entry.len());
    out.extend_from_slice(b"*4\r\n$5\r\nGETEX\r\n$");
    push_decimal(out, (prefix.len() + entry.len()) as u64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(prefix.as_bytes());
    out.extend_from_slice(entry.as_bytes());
    out.extend_from_slice(b"\r\n$2\r\nEX\r\n$");
    push_decimal(out, ttl.len() as u64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(ttl);
    out.extend_from_slice(b"\r\n");
}

/// The digits of `n`; below 100 (a key's or a TTL's length) without the digit loop.
fn push_decimal(out: &mut Vec<u8>, n: u64) {
    if n < 100 {
        if n >= 10 {
            out.push(b'0' + (n / 10) as u8);
        }
        out.push(b'0' + (n % 10) as u8);
        return;
    }
    let (digits, start) = decimal(n);
    out.extend_from_slice(&digits[start..]);
}

/// A reply to GETEX (`Value`, `Nil`, `Error`), AUTH or SELECT (`Status`, `Error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    Value(&'a [u8]),
    Nil,
    Status(&'a [u8]),
    Error(&'a [u8]),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parse<'a> {
    /// A reply, and the bytes it took.
    Complete(Reply<'a>, usize),
    /// More bytes may make a reply.
    Incomplete,
    /// No number of further bytes makes these a reply to our commands.
    Invalid(&'static str),
}

/// The first reply at the start of `buf` (RESP2; RESP3's `_` null is taken too).
pub fn parse_reply(buf: &[u8]) -> Parse<'_> {
    let Some(&kind) = buf.first() else { return Parse::Incomplete };
    if !b"+-$_".contains(&kind) {
        return Parse::Invalid("not a reply to GETEX, AUTH or SELECT");
    }
    let window = &buf[..buf.len().min(MAX_LINE_BYTES)];
    let Some(newline) = window.iter().position(|&b| b == b'\n') else {
        return if window.len() == MAX_LINE_BYTES { Parse::Invalid("line too long") } else { Parse::Incomplete };
    };
    if newline == 0 || buf[newline - 1] != b'\r' {
        return Parse::Invalid("line not ended by CRLF");
    }
    let line = &buf[1..newline - 1];
    let after_line = newline + 1;
    match kind {
        b'+' => Parse::Complete(Reply::Status(line), after_line),
        b'-' => Parse::Complete(Reply::Error(line), after_line),
        b'_' if line.is_empty() => Parse::Complete(Reply::Nil, after_line),
        b'_' => Parse::Invalid("null with content"),
        _ => {
            if line == b"-1" {
                return Parse::Complete(Reply::Nil, after_line);
            }
            let Some(len) = parse_length(line) else { return Parse::Invalid("bad bulk length") };
            if len > MAX_VALUE_BYTES {
                return Parse::Invalid("value too long");
            }
            let end = after_line + len;
            if buf.len() < end + 2 {
                // A wrong terminator is already visible when the value is complete and one byte
                // of it has come: decide then, not only once both bytes are there.
                if buf.len() == end + 1 && buf[end] != b'\r' {
                    return Parse::Invalid("value not ended by CRLF");
                }
                return Parse::Incomplete;
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Parse::Invalid("value not ended by CRLF");
            }
            Parse::Complete(Reply::Value(&buf[after_line..end]), end + 2)
        }
    }
}

/// A bulk length: 1 to 7 decimal digits (anything longer is over `MAX_VALUE_BYTES` anyway).
fn parse_length(digits: &[u8]) -> Option<usize> {
    if digits.is_empty() || digits.len() > 7 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0, |n, d| n * 10 + usize::from(d - b'0')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_encode_as_resp_arrays() {
        let mut out = Vec::new();
        encode_getex(&mut out, "p:affinity:r:", "abc", 3600);
        assert_eq!(out, b"*4\r\n$5\r\nGETEX\r\n$16\r\np:affinity:r:abc\r\n$2\r\nEX\r\n$4\r\n3600\r\n");
        let mut generic = Vec::new();
        encode_command(&mut generic, &[b"GETEX", b"p:affinity:r:abc", b"EX", b"3600"]);
        assert_eq!(out, generic);
        out.clear();
        encode_getex(&mut out, "", &"k".repeat(70_000), u64::MAX);
        generic.clear();
        encode_command(&mut generic, &[b"GETEX", "k".repeat(70_000).as_bytes(), b"EX", u64::MAX.to_string().as_bytes()]);
        assert_eq!(out, generic);
        out.clear();
        encode_command(&mut out, &[b"AUTH", b"user", b""]);
        assert_eq!(out, b"*3\r\n$4\r\nAUTH\r\n$4\r\nuser\r\n$0\r\n\r\n");
        for n in [0, 1, 9, 10, 11, 99, 100, 101, 999, 1000, u64::MAX] {
            out.clear();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
        assert_eq!(decimal(0).1, 19);
        let (digits, start) = decimal(u64::MAX);
        assert_eq!(&digits[start..], u64::MAX.to_string().as_bytes());
    }

    #[test]
    fn replies_parse_whole_split_and_invalid() {
        assert_eq!(parse_reply(b"$9\r\nh:1:8080\r\n$-1\r\n"), Parse::Invalid("value not ended by CRLF"));
        assert_eq!(parse_reply(b"$8\r\nh:1:8080\r\n$-1\r\n"), Parse::Complete(Reply::Value(b"h:1:8080"), 14));
        assert_eq!(parse_reply(b"$-1\r\n"), Parse::Complete(Reply::Nil, 5));
        assert_eq!(parse_reply(b"_\r\n"), Parse::Complete(Reply::Nil, 3));
        assert_eq!(parse_reply(b"$0\r\n\r\n"), Parse::Complete(Reply::Value(b""), 6));
        assert_eq!(parse_reply(b"+OK\r\n"), Parse::Complete(Reply::Status(b"OK"), 5));
        assert_eq!(parse_reply(b"-WRONGTYPE no\r\n"), Parse::Complete(Reply::Error(b"WRONGTYPE no"), 15));
        let whole = b"$8\r\nh:1:8080\r\n";
        for n in 0..whole.len() {
            assert_eq!(parse_reply(&whole[..n]), Parse::Incomplete, "prefix of {n} bytes");
        }
        assert_eq!(parse_reply(b":1\r\n"), Parse::Invalid("not a reply to GETEX, AUTH or SELECT"));
        assert_eq!(parse_reply(b"*1\r\n"), Parse::Invalid("not a reply to GETEX, AUTH or SELECT"));
        assert_eq!(parse_reply(b"$x\r\n"), Parse::Invalid("bad bulk length"));
        assert_eq!(parse_reply(b"$+1\r\n"), Parse::Invalid("bad bulk length"));
        assert_eq!(parse_reply(b"$99999999\r\n"), Parse::Invalid("bad bulk length"));
        assert_eq!(parse_reply(b"$65537\r\n"), Parse::Invalid("value too long"));
        assert_eq!(parse_reply(b"+OK\n"), Parse::Invalid("line not ended by CRLF"));
        assert_eq!(parse_reply(b"$2\r\nabX"), Parse::Invalid("value not ended by CRLF"));
        let mut long = vec![b'+'; MAX_LINE_BYTES];
        assert_eq!(parse_reply(&long), Parse::Invalid("line too long"));
        long.truncate(MAX_LINE_BYTES - 1);
        assert_eq!(parse_reply(&long), Parse::Incomplete);
    }
}
