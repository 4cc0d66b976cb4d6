//! How a record becomes a line: JSON (one object per line, the fields API.md lists) or Apache's
//! combined format. A line is made in two steps: its opening (what is known when the request
//! arrives) is formatted at once; its time and outcome (what is known at its end) are added when
//! it is finished. Every string from a client is clipped and escaped for the format it lands in,
//! so that no value can end a line or forge a field.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What a line keeps of each string a client chose (host, path, referer, user agent).
pub const MAX_CLIENT_FIELD: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Combined,
}

impl LogFormat {
    pub fn parse(name: &str) -> Option<LogFormat> {
        match name {
            "json" => Some(LogFormat::Json),
            "combined" => Some(LogFormat::Combined),
            _ => None,
        }
    }

}

/// Room a line takes, but for the strings it carries.
const LINE_ROOM: usize = 256;

/// What is known of a request (or a connection) when it arrives: formatted at once, so that
/// nothing of the request need be kept but the formatted bytes.
#[derive(Debug, Clone, Copy)]
pub struct Opening<'a> {
    /// The client's address as text (a connection formats it once for all its requests).
    pub client_ip: &'a [u8],
    pub method: Option<&'a str>,
    /// The host the client named (HTTP) or its SNI (TCP): bytes as the client sent them, which
    /// need not be UTF-8.
    pub host: Option<&'a [u8]>,
    /// The path without its query.
    pub path: Option<&'a [u8]>,
    /// `HTTP/1.1`, `HTTP/2`, … or `tcp`.
    pub protocol: &'static str,
    pub tls: bool,
    /// Written by the combined format only, without query or credentials.
    pub referer: Option<&'a [u8]>,
    pub user_agent: Option<&'a [u8]>,
}

/// Where the parts made later go into a formatted opening: a line is `opening[..time]`, the
/// time, `opening[time..outcome]`, the outcome, `opening[outcome..]` and a newline.
#[derive(Debug, Clone, Copy, Default)]
pub struct Splits {
    pub time: usize,
    pub outcome: usize,
}

/// What is known once the request (or connection) has ended.
#[derive(Debug, Clone, Copy)]
pub struct Outcome<'a> {
    pub route: Option<&'a Arc<str>>,
    pub status: Option<u16>,
    /// Body bytes from the client (HTTP), or bytes relayed from it (TCP).
    pub bytes_in: u64,
    /// Body bytes to the client (HTTP), or bytes relayed to it (TCP).
    pub bytes_out: u64,
    pub duration: Duration,
    /// The backend's host and port.
    pub upstream: Option<(&'a Arc<str>, u16)>,
    /// `completed`, `client_aborted`, `upstream_error`, or a connection's termination reason.
    pub termination: &'a str,
}

/// The opening formatted into a buffer of its own, with room for the rest of the line as it
/// usually is.
pub fn format_opening(format: LogFormat, o: &Opening<'_>) -> (Vec<u8>, Splits) {
    let client_strings = [o.host, o.path, o.referer, o.user_agent].iter().map(|s| s.map_or(0, |s| s.len().min(MAX_CLIENT_FIELD))).sum::<usize>();
    let mut line = Vec::with_capacity(LINE_ROOM + client_strings);
    let splits = write_opening(format, o, &mut line);
    (line, splits)
}

/// Room a finished line usually takes: its opening, the time and the outcome.
pub fn line_room(opening_len: usize, o: &Outcome<'_>) -> usize {
    let names = o.route.map_or(0, |route| route.len()) + o.upstream.map_or(0, |(host, _)| host.len());
    opening_len + LINE_ROOM + names
}

/// Appends a request's opening (see `Splits`). The time is left out: lines are stamped as they
/// are finished, from a stamp worked out once per second.
fn write_opening(format: LogFormat, o: &Opening<'_>, out: &mut Vec<u8>) -> Splits {
    match format {
        LogFormat::Json => {
            out.extend_from_slice(b"{\"time\":\"");
            let time = out.len();
            out.extend_from_slice(b"Z\",\"clientIp\":\"");
            out.extend_from_slice(o.client_ip);
            out.extend_from_slice(b"\",\"method\":");
            match o.method {
                // A method is an HTTP token: nothing in it needs escaping.
                Some(method) => token(out, method),
                None => out.extend_from_slice(b"null"),
            }
            out.extend_from_slice(b",\"host\":");
            json_opt_str(out, o.host);
            out.extend_from_slice(b",\"path\":");
            json_opt_str(out, o.path);
            out.extend_from_slice(b",\"protocol\":");
            token(out, o.protocol);
            out.extend_from_slice(if o.tls { b",\"tls\":true," } else { b",\"tls\":false," });
            Splits { time, outcome: out.len() }
        }
        LogFormat::Combined => {
            out.extend_from_slice(o.client_ip);
            out.extend_from_slice(b" - - [");
            let time = out.len();
            out.extend_from_slice(b"] \"");
            match (o.method, o.path) {
                (Some(method), Some(path)) => {
                    out.extend_from_slice(method.as_bytes());
                    out.push(b' ');
                    quoted_content(out, clip(path));
                    out.push(b' ');
                    out.extend_from_slice(o.protocol.as_bytes());
                }
                _ => out.push(b'-'),
            }
            out.extend_from_slice(b"\" ");
            let outcome = out.len();
            for value in [o.referer, o.user_agent] {
                out.extend_from_slice(b" \"");
                match value {
                    Some(value) => quoted_content(out, clip(value)),
                    None => out.push(b'-'),
                }
                out.push(b'"');
            }
            Splits { time, outcome }
        }
    }
}

/// Finishes lines: stamps them and writes their outcomes, keeping what runs of lines share (the
/// second's stamp; the route and backend names, escaped once per run).
pub struct LineFinisher {
    format: LogFormat,
    second: Option<u64>,
    /// `2026-12-05T22:10:03.` (JSON: milliseconds follow) or `05/Dec/2026:22:10:03 +0000`.
    stamp: Vec<u8>,
    route: EscapedCache,
    upstream: EscapedCache,
}

/// A configured name (shared, so compared by address), with a port or without, and its escaped
/// JSON text (`name` or `name:port`).
#[derive(Default)]
struct EscapedCache(Option<(Arc<str>, Option<u16>, Vec<u8>)>);

impl EscapedCache {
    fn escaped(&mut self, name: &Arc<str>, port: Option<u16>) -> &[u8] {
        if !matches!(&self.0, Some((cached, cached_port, _)) if Arc::ptr_eq(cached, name) && *cached_port == port) {
            let mut escaped = Vec::with_capacity(name.len() + 6);
            json_content(&mut escaped, name.as_bytes());
            if let Some(port) = port {
                escaped.push(b':');
                number(&mut escaped, port as u64);
            }
            self.0 = Some((name.clone(), port, escaped));
        }
        self.0.as_ref().map_or(&[], |(_, _, escaped)| escaped)
    }
}

impl LineFinisher {
    pub fn new(format: LogFormat) -> LineFinisher {
        LineFinisher { format, second: None, stamp: Vec::with_capacity(32), route: EscapedCache::default(), upstream: EscapedCache::default() }
    }

    /// Appends the whole line, newline included: the opening's parts, the time (milliseconds
    /// since the Unix epoch) and the outcome.
    pub fn finish(&mut self, opening: &[u8], splits: Splits, unix_millis: u64, o: &Outcome<'_>, out: &mut Vec<u8>) {
        out.extend_from_slice(&opening[..splits.time]);
        self.stamp(unix_millis, out);
        out.extend_from_slice(&opening[splits.time..splits.outcome]);
        self.outcome(o, out);
        out.extend_from_slice(&opening[splits.outcome..]);
        out.push(b'\n');
    }

    fn stamp(&mut self, unix_millis: u64, out: &mut Vec<u8>) {
        let second = unix_millis / 1000;
        if self.second != Some(second) {
            self.second = Some(second);
            self.stamp.clear();
            let civil = Civil::of(second);
            match self.format {
                LogFormat::Json => civil.rfc3339_seconds(&mut self.stamp),
                LogFormat::Combined => civil.common_log(&mut self.stamp),
            }
        }
        out.extend_from_slice(&self.stamp);
        if self.format == LogFormat::Json {
            three_digits(out, (unix_millis % 1000) as u32);
        }
    }

    fn outcome(&mut self, o: &Outcome<'_>, out: &mut Vec<u8>) {
        match self.format {
            LogFormat::Json => {
                out.extend_from_slice(b"\"route\":");
                match o.route {
                    Some(route) => {
                        out.push(b'"');
                        out.extend_from_slice(self.route.escaped(route, None));
                        out.push(b'"');
                    }
                    None => out.extend_from_slice(b"null"),
                }
                out.extend_from_slice(b",\"status\":");
                match o.status {
                    // Statuses have three digits.
                    Some(status @ 100..=999) => three_digits(out, status as u32),
                    Some(status) => number(out, status as u64),
                    None => out.extend_from_slice(b"null"),
                }
                out.extend_from_slice(b",\"bytesIn\":");
                number(out, o.bytes_in);
                out.extend_from_slice(b",\"bytesOut\":");
                number(out, o.bytes_out);
                out.extend_from_slice(b",\"durationMs\":");
                // Milliseconds with three decimals: sub-millisecond requests are the common case.
                let micros = o.duration.as_micros() as u64;
                number(out, micros / 1000);
                out.push(b'.');
                three_digits(out, (micros % 1000) as u32);
                out.extend_from_slice(b",\"upstream\":");
                match o.upstream {
                    Some((host, port)) => {
                        out.push(b'"');
                        out.extend_from_slice(self.upstream.escaped(host, Some(port)));
                        out.push(b'"');
                    }
                    None => out.extend_from_slice(b"null"),
                }
                out.extend_from_slice(b",\"termination\":");
                token(out, o.termination);
                out.push(b'}');
            }
            // Apache writes `-` for an empty byte count; a connection's status is 0.
            LogFormat::Combined => {
                number(out, o.status.unwrap_or(0) as u64);
                out.push(b' ');
                if o.bytes_out == 0 {
                    out.push(b'-');
                } else {
                    number(out, o.bytes_out);
                }
            }
        }
    }
}

/// `text` cut to at most `MAX_CLIENT_FIELD` bytes, before any UTF-8 character the cut would
/// split: a client decides how long its path and headers are.
pub fn clip(text: &[u8]) -> &[u8] {
    if text.len() <= MAX_CLIENT_FIELD {
        return text;
    }
    let mut end = MAX_CLIENT_FIELD;
    // A continuation byte (10xxxxxx) is not where a character starts.
    while end > MAX_CLIENT_FIELD - 3 && text[end] & 0xc0 == 0x80 {
        end -= 1;
    }
    &text[..end]
}

/// A JSON string of a token the engine names (protocol, termination) or an HTTP method: no byte
/// of one needs escaping.
fn token(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    out.extend_from_slice(text.as_bytes());
    out.push(b'"');
}

/// `2026-12-05T22:10:03.042Z`: the time format of both logs.
pub fn write_rfc3339(time: SystemTime, out: &mut Vec<u8>) {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    Civil::of(since.as_secs()).rfc3339_seconds(out);
    three_digits(out, since.subsec_millis());
    out.push(b'Z');
}

#[inline]
fn number(out: &mut Vec<u8>, n: u64) {
    // Most numbers in a line are short: their digits without the general machinery.
    match n {
        0..=9 => out.push(b'0' + n as u8),
        10..=99 => out.extend_from_slice(&[b'0' + (n / 10) as u8, b'0' + (n % 10) as u8]),
        100..=999 => three_digits(out, n as u32),
        _ => out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes()),
    }
}

fn json_opt_str(out: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        Some(value) => {
            out.push(b'"');
            json_content(out, clip(value));
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
}

/// Inside a JSON string: quote, backslash and control characters escaped (RFC 8259 §7), and bytes
/// that are not UTF-8 replaced (U+FFFD), so that a line is always valid JSON.
fn json_content(out: &mut Vec<u8>, bytes: &[u8]) {
    // Nearly every value is ASCII that needs no escaping: that is found out eight bytes at a time.
    if !needs_json_escape(bytes) {
        out.extend_from_slice(bytes);
        return;
    }
    let text = String::from_utf8_lossy(bytes);
    escaped(out, text.as_bytes(), |b| JSON_ESCAPED[b as usize], |out, b| match b {
        b'"' => out.extend_from_slice(b"\\\""),
        b'\\' => out.extend_from_slice(b"\\\\"),
        _ => {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[(b >> 4) as usize]);
            out.push(HEX[(b & 0xf) as usize]);
        }
    });
}

/// Whether `bytes` are anything but ASCII JSON takes as it is: a byte beyond ASCII, below 0x20,
/// 0x7f, `"` or `\\`. Tested a word at a time: a byte of `word ^ (c * ONES)` is zero where the
/// byte is `c`, and `below` finds a byte under `n` without a false positive where none is (the
/// borrow runs only past a real one). A short tail is tested as the word ending with it.
fn needs_json_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let below = |word: u64, n: u8| word.wrapping_sub(ONES * n as u64) & !word & HIGHS != 0;
    let special = |word: u64| {
        word & HIGHS != 0 || below(word, 0x20) || below(word ^ (ONES * b'"' as u64), 1) || below(word ^ (ONES * b'\\' as u64), 1) || below(word ^ (ONES * 0x7f), 1)
    };
    let word_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or_default());
    if bytes.len() < 8 {
        return bytes.iter().any(|&b| b > 0x7f || JSON_ESCAPED[b as usize]);
    }
    let mut at = 0;
    while at + 8 <= bytes.len() {
        if special(word_at(at)) {
            return true;
        }
        at += 8;
    }
    at < bytes.len() && special(word_at(bytes.len() - 8))
}

/// Inside a combined-format quoted field: quote, backslash, controls and bytes beyond ASCII as
/// `\xHH`, as Apache escapes them.
fn quoted_content(out: &mut Vec<u8>, value: &[u8]) {
    escaped(out, value, |b| COMBINED_ESCAPED[b as usize], |out, b| {
        out.extend_from_slice(b"\\x");
        out.push(HEX[(b >> 4) as usize]);
        out.push(HEX[(b & 0xf) as usize]);
    });
}

/// Copies `bytes`, runs of plain bytes at once, each byte `needs_escape` says through `escape`.
#[inline(always)]
fn escaped(out: &mut Vec<u8>, bytes: &[u8], needs_escape: impl Fn(u8) -> bool, escape: impl Fn(&mut Vec<u8>, u8)) {
    let mut run_start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if needs_escape(b) {
            out.extend_from_slice(&bytes[run_start..i]);
            escape(out, b);
            run_start = i + 1;
        }
    }
    out.extend_from_slice(&bytes[run_start..]);
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The bytes each format escapes, as tables: one load per byte.
static JSON_ESCAPED: [bool; 256] = escape_table(false);
static COMBINED_ESCAPED: [bool; 256] = escape_table(true);

const fn escape_table(beyond_ascii: bool) -> [bool; 256] {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = b < 0x20 || b == 0x7f || b == b'"' as usize || b == b'\\' as usize || (beyond_ascii && b > 0x7f);
        b += 1;
    }
    table
}

/// A UTC calendar time.
struct Civil {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
}

impl Civil {
    /// The calendar time `unix_secs` seconds after the Unix epoch.
    fn of(unix_secs: u64) -> Civil {
        let secs = unix_secs as i64;
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400) as u32);
        // Days since the epoch to a proleptic Gregorian date (H. Hinnant's `civil_from_days`).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Civil { year, month, day, hour: rem / 3600, minute: rem / 60 % 60, second: rem % 60 }
    }

    /// `2026-12-05T22:10:03.` (milliseconds and zone follow)
    fn rfc3339_seconds(&self, out: &mut Vec<u8>) {
        number(out, self.year as u64);
        for (sep, value) in [(b'-', self.month), (b'-', self.day), (b'T', self.hour), (b':', self.minute), (b':', self.second)] {
            out.push(sep);
            two_digits(out, value);
        }
        out.push(b'.');
    }

    /// `05/Dec/2026:22:10:03 +0000`
    fn common_log(&self, out: &mut Vec<u8>) {
        const MONTHS: [&[u8; 3]; 12] = [b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec"];
        two_digits(out, self.day);
        out.push(b'/');
        out.extend_from_slice(MONTHS[(self.month - 1) as usize]);
        out.push(b'/');
        number(out, self.year as u64);
        for value in [self.hour, self.minute, self.second] {
            out.push(b':');
            two_digits(out, value);
        }
        out.extend_from_slice(b" +0000");
    }
}

fn three_digits(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&[b'0' + (value / 100 % 10) as u8, b'0' + (value / 10 % 10) as u8, b'0' + (value % 10) as u8]);
}

fn two_digits(out: &mut Vec<u8>, value: u32) {
    out.push(b'0' + (value / 10) as u8);
    out.push(b'0' + (value % 10) as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-05T22:10:03.042Z
    fn time() -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(1_796_508_603_042)
    }

    fn line(format: LogFormat, time: SystemTime, opening: &Opening<'_>, outcome: &Outcome<'_>) -> String {
        let (parts, splits) = format_opening(format, opening);
        let millis = time.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        let mut out = finish(&mut LineFinisher::new(format), &parts, splits, millis, outcome);
        assert_eq!(out.pop(), Some(b'\n'));
        String::from_utf8(out).unwrap()
    }

    fn finish(finisher: &mut LineFinisher, parts: &[u8], splits: Splits, millis: u64, outcome: &Outcome<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        finisher.finish(parts, splits, millis, outcome, &mut out);
        out
    }

    /// Configured names live as long as the test.
    fn name(text: &str) -> &'static Arc<str> {
        Box::leak(Box::new(Arc::from(text)))
    }

    fn request() -> (Opening<'static>, Outcome<'static>) {
        let opening = Opening {
            client_ip: b"2001:db8::1",
            method: Some("POST"),
            host: Some(b"example.com"),
            path: Some(b"/a\"b\n"),
            protocol: "HTTP/1.1",
            tls: true,
            referer: None,
            user_agent: Some("curl/8 \u{e9}".as_bytes()),
        };
        let outcome = Outcome {
            route: Some(name("api \"v1\"")),
            status: Some(201),
            bytes_in: 12,
            bytes_out: 345,
            duration: Duration::from_micros(1_234_567),
            upstream: Some((name("10.0.0.2"), 8080)),
            termination: "completed",
        };
        (opening, outcome)
    }

    fn connection(ip: &'static str) -> (Opening<'static>, Outcome<'static>) {
        let opening = Opening {
            client_ip: ip.as_bytes(),
            method: None,
            host: None,
            path: None,
            protocol: "tcp",
            tls: false,
            referer: None,
            user_agent: None,
        };
        let outcome = Outcome { route: None, status: None, bytes_in: 0, bytes_out: 0, duration: Duration::ZERO, upstream: None, termination: "backend_connect_failed" };
        (opening, outcome)
    }

    #[test]
    fn json_lines_escape_client_strings() {
        let (opening, outcome) = request();
        let line = line(LogFormat::Json, time(), &opening, &outcome);
        assert_eq!(
            line,
            "{\"time\":\"2026-12-05T22:10:03.042Z\",\"clientIp\":\"2001:db8::1\",\"method\":\"POST\",\"host\":\"example.com\",\
             \"path\":\"/a\\\"b\\u000a\",\"protocol\":\"HTTP/1.1\",\"tls\":true,\"route\":\"api \\\"v1\\\"\",\"status\":201,\"bytesIn\":12,\
             \"bytesOut\":345,\"durationMs\":1234.567,\"upstream\":\"10.0.0.2:8080\",\"termination\":\"completed\"}"
        );
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["path"], "/a\"b\n");
        assert_eq!(parsed["route"], "api \"v1\"");
    }

    #[test]
    fn combined_lines_quote_as_apache_does() {
        let (opening, outcome) = request();
        assert_eq!(
            line(LogFormat::Combined, time(), &opening, &outcome),
            "2001:db8::1 - - [05/Dec/2026:22:10:03 +0000] \"POST /a\\x22b\\x0a HTTP/1.1\" 201 345 \"-\" \"curl/8 \\xc3\\xa9\""
        );
    }

    #[test]
    fn a_tcp_record_has_no_request() {
        let (opening, outcome) = connection("192.0.2.7");
        assert_eq!(line(LogFormat::Combined, UNIX_EPOCH, &opening, &outcome), "192.0.2.7 - - [01/Jan/1970:00:00:00 +0000] \"-\" 0 - \"-\" \"-\"");
        let parsed: serde_json::Value = serde_json::from_str(&line(LogFormat::Json, UNIX_EPOCH, &opening, &outcome)).unwrap();
        assert_eq!(parsed["method"], serde_json::Value::Null);
        assert_eq!(parsed["termination"], "backend_connect_failed");
        assert_eq!(parsed["durationMs"], 0.0);
    }

    #[test]
    fn client_strings_are_clipped_at_a_character_boundary() {
        for text in ["\u{e9}".repeat(MAX_CLIENT_FIELD), "\u{20ac}".repeat(MAX_CLIENT_FIELD), "\u{1f600}".repeat(MAX_CLIENT_FIELD)] {
            let cut = std::str::from_utf8(clip(text.as_bytes())).unwrap();
            assert!(cut.len() <= MAX_CLIENT_FIELD && cut.len() >= MAX_CLIENT_FIELD - 3);
        }
        assert_eq!(clip(b"/short"), b"/short");
        let (mut opening, outcome) = request();
        let path = "/".to_string() + &"a".repeat(10_000);
        opening.path = Some(path.as_bytes());
        let parsed: serde_json::Value = serde_json::from_str(&line(LogFormat::Json, UNIX_EPOCH, &opening, &outcome)).unwrap();
        assert_eq!(parsed["path"].as_str().unwrap().len(), MAX_CLIENT_FIELD);
    }

    #[test]
    fn route_and_upstream_names_are_escaped_once_per_run_and_follow_changes() {
        let mut finisher = LineFinisher::new(LogFormat::Json);
        let (opening, _) = connection("10.0.0.1");
        let (parts, splits) = format_opening(LogFormat::Json, &opening);
        let quoted = name("a \"b\"");
        let plain = name("plain");
        for (route, port) in [(quoted, 1), (quoted, 1), (quoted, 2), (plain, 2), (quoted, 2)] {
            let outcome = Outcome { route: Some(route), status: Some(200), bytes_in: 0, bytes_out: 1000, duration: Duration::ZERO, upstream: Some((route, port)), termination: "completed" };
            let out = finish(&mut finisher, &parts, splits, 0, &outcome);
            let parsed: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(parsed["route"], &**route);
            assert_eq!(parsed["upstream"], format!("{route}:{port}"));
            assert_eq!(parsed["bytesOut"], 1000);
        }
    }

    #[test]
    fn the_word_test_finds_exactly_the_bytes_json_escapes_or_replaces() {
        for len in 1..=20 {
            assert!(!needs_json_escape(&vec![b'a'; len]));
            for b in 0..=255u8 {
                for at in 0..len {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = b;
                    let expected = b > 0x7f || JSON_ESCAPED[b as usize];
                    assert_eq!(needs_json_escape(&bytes), expected, "byte {b:#x} at {at} of {len}");
                }
            }
        }
    }

    #[test]
    fn bytes_that_are_not_utf8_are_replaced() {
        let (mut opening, outcome) = request();
        opening.host = Some(b"bad\xffhost");
        let parsed: serde_json::Value = serde_json::from_str(&line(LogFormat::Json, UNIX_EPOCH, &opening, &outcome)).unwrap();
        assert_eq!(parsed["host"], "bad\u{fffd}host");
    }

    #[test]
    fn numbers_in_every_width() {
        for n in [0u64, 7, 10, 99, 100, 999, 1000, 65_535, u64::MAX] {
            let mut out = Vec::new();
            number(&mut out, n);
            assert_eq!(String::from_utf8(out).unwrap(), n.to_string());
        }
    }

    #[test]
    fn calendar_dates_across_leap_years() {
        let at = |secs: u64| {
            let mut out = Vec::new();
            write_rfc3339(UNIX_EPOCH + Duration::from_secs(secs), &mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(1_709_251_199), "2024-02-29T23:59:59.000Z");
        assert_eq!(at(4_102_444_800), "2100-01-01T00:00:00.000Z");
    }
}
