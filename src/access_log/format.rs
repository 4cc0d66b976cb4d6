//! How a record becomes a line: JSON (one object per line, the fields API.md lists) or Apache's
//! combined format. Every string from a client is escaped for the format it lands in, so that no
//! value can end a line or forge a field.

use std::io::Write as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::AccessRecord;

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

/// Writes records as lines of one format, keeping the time stamp of the current second: records
/// come many to a second, and the calendar is worked out once for each.
pub struct LineFormatter {
    format: LogFormat,
    second: Option<u64>,
    /// The second's stamp: `2026-12-05T22:10:03` (JSON, milliseconds follow) or
    /// `05/Dec/2026:22:10:03 +0000` (combined).
    stamp: Vec<u8>,
    /// The last route's label and upstream host as escaped JSON text: records come in runs of the
    /// same route and backend, whose names need escaping only once.
    route: EscapedCache,
    upstream: EscapedCache,
}

/// A string of the configuration (shared, so compared by address) and its escaped JSON text.
#[derive(Default)]
struct EscapedCache(Option<(Arc<str>, Vec<u8>)>);

impl EscapedCache {
    fn escaped(&mut self, text: &Arc<str>) -> &[u8] {
        if !matches!(&self.0, Some((cached, _)) if Arc::ptr_eq(cached, text)) {
            let mut escaped = Vec::with_capacity(text.len() + 2);
            json_content(&mut escaped, text);
            self.0 = Some((text.clone(), escaped));
        }
        self.0.as_ref().map_or(&[], |(_, escaped)| escaped)
    }
}

impl LineFormatter {
    pub fn new(format: LogFormat) -> LineFormatter {
        LineFormatter { format, second: None, stamp: Vec::with_capacity(32), route: EscapedCache::default(), upstream: EscapedCache::default() }
    }

    /// Appends the record's line, newline included.
    pub fn write(&mut self, record: &AccessRecord, out: &mut Vec<u8>) {
        let since = record.time.duration_since(UNIX_EPOCH).unwrap_or_default();
        if self.second != Some(since.as_secs()) {
            self.second = Some(since.as_secs());
            self.stamp.clear();
            let civil = Civil::of(record.time);
            match self.format {
                LogFormat::Json => civil.rfc3339_seconds(&mut self.stamp),
                LogFormat::Combined => civil.common_log(&mut self.stamp),
            }
        }
        match self.format {
            LogFormat::Json => self.json(record, since.subsec_millis(), out),
            LogFormat::Combined => combined(record, &self.stamp, out),
        }
        out.push(b'\n');
    }

    fn json(&mut self, r: &AccessRecord, millis: u32, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"time\":\"");
        out.extend_from_slice(&self.stamp);
        three_digits(out, millis);
        out.extend_from_slice(b"Z\",\"route\":");
        match &r.route {
            Some(route) => {
                out.push(b'"');
                out.extend_from_slice(self.route.escaped(route));
                out.push(b'"');
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"clientIp\":\"");
        ip(out, r.client_ip);
        out.extend_from_slice(b"\",\"method\":");
        match &r.method {
            // A method is an HTTP token: nothing in it needs escaping.
            Some(method) => token(out, method.as_str()),
            None => out.extend_from_slice(b"null"),
        }
        json_rest(r, &mut self.upstream, out);
    }
}

fn json_rest(r: &AccessRecord, upstream_cache: &mut EscapedCache, out: &mut Vec<u8>) {
    out.extend_from_slice(b",\"host\":");
    json_opt_str(out, r.host.as_deref());
    out.extend_from_slice(b",\"path\":");
    json_opt_str(out, r.path.as_deref());
    out.extend_from_slice(b",\"status\":");
    match r.status {
        Some(status) => number(out, status as u64),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"bytesIn\":");
    number(out, r.bytes_in);
    out.extend_from_slice(b",\"bytesOut\":");
    number(out, r.bytes_out);
    out.extend_from_slice(b",\"durationMs\":");
    // Milliseconds with three decimals: sub-millisecond requests are the common case.
    let micros = r.duration.as_micros() as u64;
    number(out, micros / 1000);
    out.push(b'.');
    three_digits(out, (micros % 1000) as u32);
    out.extend_from_slice(b",\"upstream\":");
    match &r.upstream {
        Some((host, port)) => {
            out.push(b'"');
            out.extend_from_slice(upstream_cache.escaped(host));
            out.push(b':');
            number(out, *port as u64);
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"protocol\":");
    token(out, r.protocol);
    out.extend_from_slice(if r.tls { b",\"tls\":true" } else { b",\"tls\":false" });
    out.extend_from_slice(b",\"termination\":");
    token(out, r.termination);
    out.push(b'}');
}

/// A JSON string of a token the engine names (protocol, termination) or an HTTP method: no byte
/// of one needs escaping.
fn token(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    out.extend_from_slice(text.as_bytes());
    out.push(b'"');
}

/// `client - - [time] "METHOD path PROTOCOL" status bytes "referer" "user-agent"`, as Apache
/// writes it (`-` for an empty byte count). A TCP connection's line has `"-"` for the request and
/// `0` for the status.
fn combined(r: &AccessRecord, stamp: &[u8], out: &mut Vec<u8>) {
    ip(out, r.client_ip);
    out.extend_from_slice(b" - - [");
    out.extend_from_slice(stamp);
    out.extend_from_slice(b"] \"");
    match (&r.method, &r.path) {
        (Some(method), Some(path)) => {
            out.extend_from_slice(method.as_str().as_bytes());
            out.push(b' ');
            quoted_content(out, path);
            out.push(b' ');
            out.extend_from_slice(r.protocol.as_bytes());
        }
        _ => out.push(b'-'),
    }
    out.extend_from_slice(b"\" ");
    number(out, r.status.unwrap_or(0) as u64);
    out.push(b' ');
    if r.bytes_out == 0 {
        out.push(b'-');
    } else {
        number(out, r.bytes_out);
    }
    for value in [r.referer.as_deref(), r.user_agent.as_deref()] {
        out.extend_from_slice(b" \"");
        match value {
            Some(value) => quoted_content(out, value),
            None => out.push(b'-'),
        }
        out.push(b'"');
    }
}

/// `2026-12-05T22:10:03.042Z`: the time format of both logs.
pub fn write_rfc3339(time: SystemTime, out: &mut Vec<u8>) {
    Civil::of(time).rfc3339_seconds(out);
    three_digits(out, time.duration_since(UNIX_EPOCH).unwrap_or_default().subsec_millis());
    out.push(b'Z');
}

fn number(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn json_opt_str(out: &mut Vec<u8>, value: Option<&str>) {
    match value {
        Some(value) => json_str(out, value),
        None => out.extend_from_slice(b"null"),
    }
}

fn ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        // The common case without the formatting machinery.
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
        }
        // Writing to a Vec cannot fail.
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// A JSON string: quote, backslash and control characters escaped (RFC 8259 §7).
fn json_str(out: &mut Vec<u8>, value: &str) {
    out.push(b'"');
    json_content(out, value);
    out.push(b'"');
}

fn json_content(out: &mut Vec<u8>, value: &str) {
    escaped(out, value.as_bytes(), |b| JSON_ESCAPED[b as usize], |out, b| match b {
        b'"' => out.extend_from_slice(b"\\\""),
        b'\\' => out.extend_from_slice(b"\\\\"),
        _ => {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[(b >> 4) as usize]);
            out.push(HEX[(b & 0xf) as usize]);
        }
    });
}

/// Inside a combined-format quoted field: quote, backslash, controls and bytes beyond ASCII as
/// `\xHH`, as Apache escapes them.
fn quoted_content(out: &mut Vec<u8>, value: &str) {
    escaped(out, value.as_bytes(), |b| COMBINED_ESCAPED[b as usize], |out, b| {
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

/// The bytes each format escapes, as tables: one load per byte on the writer's hot loop.
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
    fn of(time: SystemTime) -> Civil {
        let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = since.as_secs() as i64;
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
    use std::time::Duration;

    fn sample() -> AccessRecord {
        let mut r = AccessRecord::begin("2001:db8::1".parse().unwrap(), "HTTP/1.1", true, std::time::Instant::now());
        // 2026-12-05T22:10:03.042Z
        r.time = UNIX_EPOCH + Duration::from_millis(1_796_508_603_042);
        r.route = Some("api \"v1\"".into());
        r.method = Some(http::Method::POST);
        r.host = Some("example.com".into());
        r.path = Some("/a\"b\n".into());
        r.status = Some(201);
        r.bytes_in = 12;
        r.bytes_out = 345;
        r.duration = Duration::from_micros(1_234_567);
        r.upstream = Some(("10.0.0.2".into(), 8080));
        r.user_agent = Some("curl/8 \u{e9}".into());
        r
    }

    #[test]
    fn json_lines_escape_client_strings() {
        let mut out = Vec::new();
        LineFormatter::new(LogFormat::Json).write(&sample(), &mut out);
        let line = String::from_utf8(out).unwrap();
        assert_eq!(
            line,
            "{\"time\":\"2026-12-05T22:10:03.042Z\",\"route\":\"api \\\"v1\\\"\",\"clientIp\":\"2001:db8::1\",\"method\":\"POST\",\
             \"host\":\"example.com\",\"path\":\"/a\\\"b\\u000a\",\"status\":201,\"bytesIn\":12,\"bytesOut\":345,\"durationMs\":1234.567,\
             \"upstream\":\"10.0.0.2:8080\",\"protocol\":\"HTTP/1.1\",\"tls\":true,\"termination\":\"completed\"}\n"
        );
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["path"], "/a\"b\n");
    }

    #[test]
    fn combined_lines_quote_as_apache_does() {
        let mut out = Vec::new();
        LineFormatter::new(LogFormat::Combined).write(&sample(), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2001:db8::1 - - [05/Dec/2026:22:10:03 +0000] \"POST /a\\x22b\\x0a HTTP/1.1\" 201 345 \"-\" \"curl/8 \\xc3\\xa9\"\n"
        );
    }

    #[test]
    fn a_tcp_record_has_no_request() {
        let mut r = AccessRecord::begin("192.0.2.7".parse().unwrap(), "tcp", false, std::time::Instant::now());
        r.time = UNIX_EPOCH;
        r.termination = "backend_connect_failed";
        let mut out = Vec::new();
        LineFormatter::new(LogFormat::Combined).write(&r, &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), "192.0.2.7 - - [01/Jan/1970:00:00:00 +0000] \"-\" 0 - \"-\" \"-\"\n");
        let mut out = Vec::new();
        LineFormatter::new(LogFormat::Json).write(&r, &mut out);
        let parsed: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed["method"], serde_json::Value::Null);
        assert_eq!(parsed["termination"], "backend_connect_failed");
        assert_eq!(parsed["durationMs"], 0.0);
    }

    #[test]
    fn route_and_upstream_names_are_escaped_once_per_run_and_follow_changes() {
        let mut formatter = LineFormatter::new(LogFormat::Json);
        let quoted: Arc<str> = "a \"b\"".into();
        let plain: Arc<str> = "plain".into();
        let line = |formatter: &mut LineFormatter, route: &Arc<str>, ip: &str| {
            let mut r = AccessRecord::begin(ip.parse().unwrap(), "tcp", false, std::time::Instant::now());
            r.route = Some(route.clone());
            r.upstream = Some((route.clone(), 1));
            let mut out = Vec::new();
            formatter.write(&r, &mut out);
            serde_json::from_slice::<serde_json::Value>(&out).unwrap()
        };
        for (route, ip) in [(&quoted, "0.100.255.9"), (&quoted, "10.0.0.1"), (&plain, "192.168.1.20"), (&quoted, "1.2.3.4")] {
            let parsed = line(&mut formatter, route, ip);
            assert_eq!(parsed["route"], &**route);
            assert_eq!(parsed["upstream"], format!("{route}:1"));
            assert_eq!(parsed["clientIp"], ip);
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
