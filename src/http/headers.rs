//! Header rewriting between client and upstream (API.md "HTTP rewriting"): hop-by-hop headers out
//! in both directions, the `X-Forwarded-*` set and `Via` in, and the route's and target's
//! `headers.request` / `headers.response` templates (`{domain}`, `{path}`, `{query}`, `{clientIp}`,
//! `{port}`, `{routeName}`, `{connectionId}`), compiled once per route table.

use std::net::IpAddr;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

const HOP_COUNT: usize = 7;
/// Headers that describe one hop and never travel through a proxy (RFC 9110 §7.6.1).
static HOP_BY_HOP: [HeaderName; HOP_COUNT] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Where `HOP_BY_HOP` has `Connection` and `Transfer-Encoding`, which say how the message is
/// delimited and whether its connection stays open.
pub const CONNECTION_HOP: usize = 0;
pub const TRANSFER_ENCODING_HOP: usize = 5;

/// `HOP_BY_HOP`'s names as bytes, to compare raw names with.
const HOP_NAMES: [&[u8]; HOP_COUNT] = [b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"];

/// Where a field name, in any case, is in `HOP_BY_HOP`. Its length and first letter tell the
/// names apart, so most names are passed over without a comparison; raw names off the wire and a
/// map's lowercase ones are read alike.
#[inline]
pub fn hop_index(name: &[u8]) -> Option<usize> {
    let index = match (name.len(), name.first()? | 0x20) {
        (10, b'c') => 0,
        (10, b'k') => 1,
        (16, b'p') => 2,
        (2, b't') => 3,
        (7, b't') => 4,
        (17, b't') => 5,
        (7, b'u') => 6,
        _ => return None,
    };
    equals_lowercase_any_case(name, HOP_NAMES[index]).then_some(index)
}

/// Whether `name` is `lower` in any case, where `lower` holds only lowercase letters, digits and
/// `-` (as field names and the tokens the proxy reads in field values do). Eight bytes at a
/// time: a letter's byte of `lower` has the 0x40 bit, and that bit shifted down is the case bit
/// the same byte of `name` may differ by; digits and `-` must match exactly.
/// (`eq_ignore_ascii_case` folds byte by byte, and every request and response head asks this
/// of several of its names and tokens.)
pub fn equals_lowercase_any_case(name: &[u8], lower: &[u8]) -> bool {
    debug_assert!(lower.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-'), "{lower:?}");
    const LETTER_BITS: u64 = u64::from_ne_bytes([0x40; 8]);
    let same = |name: u64, lower: u64| name | ((lower & LETTER_BITS) >> 1) == lower;
    let len = name.len();
    if len != lower.len() {
        return false;
    }
    if len < 8 {
        return name.iter().zip(lower).all(|(n, l)| same(u64::from(*n), u64::from(*l)));
    }
    let word = |bytes: &[u8], at: usize| bytes.get(at..at + 8).and_then(|w| <[u8; 8]>::try_from(w).ok()).map_or(0, u64::from_ne_bytes);
    // Whole words from the start, then the last eight bytes (overlapping the word before).
    (0..len - 8).step_by(8).all(|at| same(word(name, at), word(lower, at))) && same(word(name, len - 8), word(lower, len - 8))
}

/// A `Connection` token naming a hop-by-hop header, in any case.
fn is_hop_by_hop(token: &[u8]) -> bool {
    hop_index(token).is_some()
}

/// The tokens of a `Connection` (or other comma-separated) field value, trimmed; empty ones
/// included.
pub fn list_items(value: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    value.split(|b| *b == b',').map(<[u8]>::trim_ascii)
}

/// A `Connection` token that names another field of the message (to be removed with it), as
/// opposed to `close` or a hop-by-hop field.
pub fn names_another_field(token: &[u8]) -> bool {
    !(token.is_empty() || token.eq_ignore_ascii_case(b"close") || is_hop_by_hop(token))
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Removes hop-by-hop headers and every header the `Connection` header names. With `keep_upgrade`
/// (a WebSocket handshake) `Connection: upgrade` and `Upgrade` survive, as the next hop needs them.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the message's names finds the hop-by-hop ones it carries (most carry one, a
    // response's `Connection: keep-alive`, or none), and only those are removed: each removal is a
    // hash lookup. The names are told apart by their text, which costs a length check for most.
    let mut present = [false; HOP_COUNT];
    for name in headers.keys() {
        if let Some(i) = hop_index(name.as_str().as_bytes()) {
            present[i] = true;
        }
    }
    if present[CONNECTION_HOP] {
        // Connection goes (an upgrade gets its own below), and what it names besides the
        // hop-by-hop headers (removed below anyway) and `close` is gathered as its values are
        // taken out, in one lookup; nearly always nothing is, and nothing is allocated.
        let mut named: Vec<HeaderName> = Vec::new();
        if let http::header::Entry::Occupied(connection) = headers.entry(header::CONNECTION) {
            for value in connection.remove_entry_mult().1 {
                for token in list_items(value.as_bytes()).filter(|token| names_another_field(token)) {
                    if let Ok(name) = HeaderName::from_bytes(token) {
                        named.push(name);
                    }
                }
            }
        }
        for name in &named {
            headers.remove(name);
        }
        present[CONNECTION_HOP] = false;
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, present)| *present) {
        if !(keep_upgrade && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// A connection's client address and local port as header values. They are the same on every
/// request of the connection, so they are formatted once per connection rather than per request,
/// into one buffer that each value shares (a connection, idle ones included, holds one pointer
/// and a length rather than two values).
#[derive(Debug, Clone)]
pub struct ConnectionValues {
    /// The address's text, then the port's.
    text: Bytes,
    address_len: u8,
}

impl ConnectionValues {
    pub fn new(client_ip: IpAddr, local_port: u16) -> ConnectionValues {
        // Written on the stack, then into the one allocation the values share, which counts
        // their references too (a copied `Bytes` takes a second allocation for that when first
        // cloned): it lasts as long as the connection, idle ones included.
        let mut text = [0u8; CONNECTION_TEXT_MAX];
        let mut len = 0;
        match client_ip {
            // Most clients: four numbers, written digit by digit rather than through the
            // formatting machinery (one connection in each new-connection request pays it).
            IpAddr::V4(v4) => {
                for (index, octet) in v4.octets().into_iter().enumerate() {
                    if index > 0 {
                        text[len] = b'.';
                        len += 1;
                    }
                    put_decimal(&mut text, &mut len, u16::from(octet));
                }
            }
            IpAddr::V6(v6) => {
                let address = v6.to_string();
                text[..address.len()].copy_from_slice(address.as_bytes());
                len = address.len();
            }
        }
        let address_len = len as u8;
        put_decimal(&mut text, &mut len, local_port);
        // An IPv4 client's text in an owner of its own size: the owner and its count then take
        // no more than a copied text and its count took.
        let text = match client_ip {
            IpAddr::V4(_) => Bytes::from_owner(ConnectionText::<IPV4_TEXT_MAX>::new(&text[..len])),
            IpAddr::V6(_) => Bytes::from_owner(ConnectionText::<CONNECTION_TEXT_MAX>::new(&text[..len])),
        };
        ConnectionValues { text, address_len }
    }

    pub fn client_ip(&self) -> HeaderValue {
        // SAFETY: an address's text is visible ASCII, which a header value may hold.
        unsafe { HeaderValue::from_maybe_shared_unchecked(self.text.slice(..usize::from(self.address_len))) }
    }

    pub fn client_ip_text(&self) -> &[u8] {
        &self.text[..usize::from(self.address_len)]
    }

    pub fn local_port(&self) -> HeaderValue {
        // SAFETY: a port's decimal digits.
        unsafe { HeaderValue::from_maybe_shared_unchecked(self.text.slice(usize::from(self.address_len)..)) }
    }
}

/// Appends `value` in decimal to `text` at `len`.
fn put_decimal(text: &mut [u8; CONNECTION_TEXT_MAX], len: &mut usize, value: u16) {
    let mut digits = [0u8; 5];
    let mut start = digits.len();
    let mut rest = value;
    loop {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    for &digit in &digits[start..] {
        text[*len] = digit;
        *len += 1;
    }
}

/// The longest text of an address and a port: 39 characters of an IPv6 address (eight groups of
/// four hex digits, seven colons), five of a port.
const CONNECTION_TEXT_MAX: usize = 44;
/// The same for IPv4: 15 and five.
const IPV4_TEXT_MAX: usize = 20;

/// The owner of `ConnectionValues`' bytes.
struct ConnectionText<const N: usize> {
    text: [u8; N],
    len: u8,
}

impl<const N: usize> ConnectionText<N> {
    fn new(text: &[u8]) -> Self {
        let mut owned = ConnectionText { text: [0; N], len: text.len() as u8 };
        owned.text[..text.len()].copy_from_slice(text);
        owned
    }
}

impl<const N: usize> AsRef<[u8]> for ConnectionText<N> {
    fn as_ref(&self) -> &[u8] {
        &self.text[..usize::from(self.len)]
    }
}

/// What the forwarding headers say about the client's request.
pub struct ForwardedFacts<'a> {
    pub connection: &'a ConnectionValues,
    pub https: bool,
    /// Host as the client sent it (with its port, if any).
    pub host: Option<&'a str>,
    /// The peer is a trusted proxy (`proxyIPs`) whose forwarding headers are believed
    /// (`trustForwardedHeaders`): its `X-Forwarded-*` are extended, not replaced.
    pub trusted_peer: bool,
    pub version: http::Version,
}

/// The forwarding headers a request gets on its way upstream, in `FORWARDING` order. They are
/// kept beside the request's head rather than inserted in its map (each insert is a hash and
/// perhaps a growth of the map): the HTTP/1.1 client writes them after the head's own fields, and
/// `move_into` puts them in the map where a map is needed (HTTP/2, request templates).
#[derive(Debug, Clone, Default)]
pub struct ForwardingHeaders {
    values: [Option<HeaderValue>; FORWARDING.len()],
}

static FORWARDING: [HeaderName; 5] = [X_FORWARDED_FOR, X_FORWARDED_PROTO, X_FORWARDED_HOST, X_FORWARDED_PORT, header::VIA];

impl ForwardingHeaders {
    pub fn iter(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        FORWARDING.iter().zip(&self.values).filter_map(|(name, value)| Some((name, value.as_ref()?)))
    }

    pub fn move_into(&mut self, headers: &mut HeaderMap) {
        for (name, value) in FORWARDING.iter().zip(&mut self.values) {
            if let Some(value) = value.take() {
                headers.insert(name, value);
            }
        }
    }
}

/// Which forwarding headers a request carried, found in one pass over its names.
#[derive(Default)]
struct Carried {
    /// In `FORWARDING` order.
    forwarding: [bool; FORWARDING.len()],
    forwarded: bool,
    real_ip: bool,
}

fn carried(headers: &HeaderMap) -> Carried {
    let mut carried = Carried::default();
    for name in headers.keys() {
        match name.as_str() {
            "x-forwarded-for" => carried.forwarding[0] = true,
            "x-forwarded-proto" => carried.forwarding[1] = true,
            "x-forwarded-host" => carried.forwarding[2] = true,
            "x-forwarded-port" => carried.forwarding[3] = true,
            "via" => carried.forwarding[4] = true,
            "forwarded" => carried.forwarded = true,
            "x-real-ip" => carried.real_ip = true,
            _ => {}
        }
    }
    carried
}

/// Works out `X-Forwarded-For`/`-Proto`/`-Host`/`-Port` and `Via` (returned, to go with the head)
/// and takes the client's own out of `headers` where they are replaced. From a trusted peer the
/// `X-Forwarded-For` list is extended and the other `X-Forwarded-*` it sent are kept; from anyone
/// else all of them are replaced, and a `Forwarded` or `X-Real-IP` it sent is replaced by what the
/// proxy knows (the client address; the protocol). Values that stay the same are shared, not
/// rebuilt: per-connection ones come formatted, the rest are static or clone the request's `Host`.
pub fn add_forwarded(headers: &mut HeaderMap, facts: &ForwardedFacts<'_>) -> ForwardingHeaders {
    let carried = carried(headers);
    let trusted = facts.trusted_peer;
    let connection = facts.connection;
    let mut out = ForwardingHeaders::default();
    let [for_, proto, host, port, via] = &mut out.values;

    *for_ = if trusted && carried.forwarding[0] {
        let mut value = String::with_capacity(48);
        for existing in headers.get_all(&X_FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()) {
            value.push_str(existing);
            value.push_str(", ");
        }
        value.push_str(std::str::from_utf8(connection.client_ip_text()).unwrap_or("unknown"));
        HeaderValue::try_from(value).ok()
    } else {
        Some(connection.client_ip())
    };
    let sent_host = facts.host.and_then(|host| match headers.get(header::HOST) {
        Some(sent) if sent.as_bytes() == host.as_bytes() => Some(sent.clone()),
        // Values built from a parsed request never hold control bytes; skip rather than fail if so.
        _ => HeaderValue::from_str(host).ok(),
    });
    // A trusted peer's own -Proto, -Host and -Port stay where they are; anyone else's are
    // replaced by ours (For and Via are always ours, extending what came).
    let kept = |i: usize| (1..=3).contains(&i) && trusted && carried.forwarding[i];
    if !kept(1) {
        // Built at compile time (`from_static` checks its bytes, and a runtime choice of text
        // left that check to every request).
        *proto = Some(if facts.https { const { HeaderValue::from_static("https") } } else { const { HeaderValue::from_static("http") } });
    }
    if !kept(2) {
        *host = sent_host;
    }
    if !kept(3) {
        *port = Some(facts.connection.local_port());
    }
    let (protocol, via_alone) = match facts.version {
        http::Version::HTTP_10 => ("1.0", const { HeaderValue::from_static("1.0 smartproxy") }),
        http::Version::HTTP_2 => ("2", const { HeaderValue::from_static("2 smartproxy") }),
        http::Version::HTTP_3 => ("3", const { HeaderValue::from_static("3 smartproxy") }),
        _ => ("1.1", const { HeaderValue::from_static("1.1 smartproxy") }),
    };
    let sent_via = if carried.forwarding[4] { headers.get(header::VIA).and_then(|v| v.to_str().ok()) } else { None };
    *via = match sent_via {
        Some(existing) => HeaderValue::try_from(format!("{existing}, {protocol} smartproxy")).ok(),
        None => Some(via_alone),
    };
    // What the request carried of the headers worked out here goes, unless the peer's is kept.
    for (i, name) in FORWARDING.iter().enumerate() {
        if carried.forwarding[i] && !kept(i) {
            headers.remove(name);
        }
    }

    if !trusted {
        if carried.forwarded {
            let proto = if facts.https { "https" } else { "http" };
            let client = std::str::from_utf8(connection.client_ip_text()).unwrap_or("unknown");
            let value = if client.contains(':') { format!("for=\"[{client}]\";proto={proto}") } else { format!("for={client};proto={proto}") };
            match HeaderValue::try_from(value) {
                Ok(value) => headers.insert(header::FORWARDED, value),
                Err(_) => headers.remove(header::FORWARDED),
            };
        }
        if carried.real_ip {
            headers.insert(X_REAL_IP, connection.client_ip());
        }
    }
    out
}

/// Whether a `Connection` field of the message lists `token`.
pub fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|value| list_items(value.as_bytes()))
        .any(|item| item.eq_ignore_ascii_case(token.as_bytes()))
}

/// The message's `Content-Length`: None without one; an error when it is not one number.
pub fn content_length(headers: &HeaderMap) -> Result<Option<u64>, &'static str> {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let Some(first) = values.next() else { return Ok(None) };
    let parsed = first.to_str().ok().filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit())).and_then(|v| v.parse::<u64>().ok());
    let Some(length) = parsed else { return Err("Content-Length is not a number") };
    if values.any(|other| other != first) {
        return Err("differing Content-Length values");
    }
    Ok(Some(length))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (k, v) in pairs {
            headers.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        headers
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_dropped() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-connection", "keep-alive"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn connection_values_are_the_address_and_port_as_text() {
        for ip in ["127.0.0.1", "0.0.0.0", "255.255.255.255", "10.20.3.4", "::1", "2001:db8::8a2e:370:7334", "::ffff:1.2.3.4"] {
            let ip: IpAddr = ip.parse().expect("an address");
            for port in [0u16, 7, 80, 443, 8443] {
                let values = ConnectionValues::new(ip, port);
                assert_eq!(values.client_ip_text(), ip.to_string().as_bytes());
                assert_eq!(values.client_ip().as_bytes(), ip.to_string().as_bytes());
                assert_eq!(values.local_port().as_bytes(), port.to_string().as_bytes());
            }
        }
        // The longest texts fill their owners exactly.
        for ip in ["255.255.255.255", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"] {
            let ip: IpAddr = ip.parse().expect("an address");
            let values = ConnectionValues::new(ip, 65535);
            assert_eq!(values.client_ip_text(), ip.to_string().as_bytes());
            assert_eq!(values.local_port().as_bytes(), b"65535");
        }
    }

    #[test]
    fn hop_index_names_each_hop_by_hop_header_where_it_is() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_index(name.as_str().as_bytes()), Some(i), "{name}");
            assert_eq!(hop_index(name.as_str().to_ascii_uppercase().as_bytes()), Some(i), "{name}");
        }
        assert_eq!(hop_index(b"host"), None);
        assert_eq!(hop_index(b"x-connection"), None);
        for (name, bytes) in HOP_BY_HOP.iter().zip(HOP_NAMES) {
            assert_eq!(name.as_str().as_bytes(), bytes);
        }
        assert_eq!(HOP_BY_HOP[CONNECTION_HOP], header::CONNECTION);
        assert_eq!(HOP_BY_HOP[TRANSFER_ENCODING_HOP], header::TRANSFER_ENCODING);
        assert!(is_hop_by_hop(b"Keep-Alive") && is_hop_by_hop(b"TRANSFER-ENCODING") && !is_hop_by_hop(b"x-transfer-encoding"));
    }

    #[test]
    fn hop_names_are_matched_in_any_case_and_nothing_else() {
        for lower in HOP_NAMES {
            // Each name in every case pattern (of its first ten bytes, the rest following them).
            let cased = |mask: u32| lower.iter().enumerate().map(|(i, b)| if mask & (1 << (i % 10)) != 0 { b.to_ascii_uppercase() } else { *b }).collect::<Vec<u8>>();
            for mask in 0u32..1 << lower.len().min(10) {
                assert!(equals_lowercase_any_case(&cased(mask), lower), "{}", String::from_utf8_lossy(&cased(mask)));
            }
            // Every one-byte change of three of them, against the byte-by-byte reading.
            for name in [cased(0), cased(u32::MAX), cased(0b0101010101)] {
                for at in 0..name.len() {
                    for byte in 0..=255u8 {
                        let mut changed = name.clone();
                        changed[at] = byte;
                        assert_eq!(equals_lowercase_any_case(&changed, lower), changed.eq_ignore_ascii_case(lower), "{changed:?}");
                    }
                }
            }
            assert!(!equals_lowercase_any_case(&lower[1..], lower));
            assert!(!equals_lowercase_any_case(&[lower, &b"x"[..]].concat(), lower));
        }
    }

    #[test]
    fn an_upgrade_keeps_its_upgrade_headers() {
        let mut h = map(&[("connection", "Upgrade, x-secret"), ("upgrade", "websocket"), ("x-secret", "1")]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert!(!h.contains_key("x-secret"));
    }

    fn facts(connection: &ConnectionValues, trusted: bool) -> ForwardedFacts<'_> {
        ForwardedFacts { connection, https: true, host: Some("Example.com:8443"), trusted_peer: trusted, version: http::Version::HTTP_11 }
    }

    /// What the upstream receives: the map with the forwarding headers in it.
    fn add_forwarded(headers: &mut HeaderMap, facts: &ForwardedFacts<'_>) {
        super::add_forwarded(headers, facts).move_into(headers);
    }

    fn connection() -> ConnectionValues {
        ConnectionValues::new("10.1.2.3".parse().unwrap(), 8443)
    }

    #[test]
    fn an_untrusted_clients_forwarding_headers_are_replaced() {
        let mut h = map(&[("x-forwarded-for", "6.6.6.6"), ("x-forwarded-proto", "http"), ("x-forwarded-host", "evil")]);
        add_forwarded(&mut h, &facts(&connection(), false));
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "Example.com:8443");
        assert_eq!(h["x-forwarded-port"], "8443");
        assert_eq!(h["via"], "1.1 smartproxy");
    }

    #[test]
    fn a_trusted_peers_forwarding_headers_are_extended() {
        let mut h = map(&[("x-forwarded-for", "1.1.1.1, 2.2.2.2"), ("x-forwarded-proto", "http"), ("via", "1.0 lb")]);
        add_forwarded(&mut h, &facts(&connection(), true));
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "Example.com:8443");
        assert_eq!(h["via"], "1.0 lb, 1.1 smartproxy");
    }

    #[test]
    fn forwarding_values_come_from_the_connection_the_host_header_and_the_version() {
        let v6 = ConnectionValues::new("2001:db8::7".parse().unwrap(), 80);
        // The Host header's value is reused when it is what the request named; else the facts' host.
        let mut h = map(&[("host", "Example.com:8443")]);
        add_forwarded(&mut h, &ForwardedFacts { connection: &v6, https: false, host: Some("Example.com:8443"), trusted_peer: false, version: http::Version::HTTP_2 });
        assert_eq!(h["x-forwarded-for"], "2001:db8::7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "Example.com:8443");
        assert_eq!(h["x-forwarded-port"], "80");
        assert_eq!(h["via"], "2 smartproxy");
        let mut h = map(&[("host", "other.example"), ("x-forwarded-host", "evil")]);
        add_forwarded(&mut h, &ForwardedFacts { connection: &v6, https: false, host: Some("a.example"), trusted_peer: false, version: http::Version::HTTP_10 });
        assert_eq!(h["x-forwarded-host"], "a.example");
        assert_eq!(h["via"], "1.0 smartproxy");
        // No host at all: an untrusted client's X-Forwarded-Host does not survive; a trusted one's does.
        let mut h = map(&[("x-forwarded-host", "evil")]);
        add_forwarded(&mut h, &ForwardedFacts { connection: &v6, https: false, host: None, trusted_peer: false, version: http::Version::HTTP_11 });
        assert!(!h.contains_key("x-forwarded-host"));
        let mut h = map(&[("x-forwarded-host", "lb.example"), ("x-forwarded-port", "443")]);
        add_forwarded(&mut h, &ForwardedFacts { connection: &v6, https: false, host: None, trusted_peer: true, version: http::Version::HTTP_11 });
        assert_eq!(h["x-forwarded-host"], "lb.example");
        assert_eq!(h["x-forwarded-port"], "443");
        assert_eq!(h["x-forwarded-for"], "2001:db8::7");
    }

    #[test]
    fn a_message_without_hop_by_hop_headers_is_left_as_it_is() {
        let mut h = map(&[("host", "a"), ("x-kept", "yes")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h.len(), 3);
        // Any one of them is enough to take the full path.
        for name in ["keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"] {
            let mut h = map(&[("host", "a"), (name, "x")]);
            strip_hop_by_hop(&mut h, false);
            assert!(!h.contains_key(name), "{name} is dropped");
            assert_eq!(h.len(), 1);
        }
    }

    #[test]
    fn an_untrusted_clients_forwarded_and_real_ip_are_replaced() {
        let forward = |h: &mut HeaderMap, connection: &ConnectionValues, trusted: bool| {
            strip_hop_by_hop(h, false);
            add_forwarded(h, &facts(connection, trusted));
        };
        let mut h = map(&[("forwarded", "for=6.6.6.6;host=evil"), ("x-real-ip", "6.6.6.6")]);
        forward(&mut h, &connection(), false);
        assert_eq!(h["forwarded"], "for=10.1.2.3;proto=https");
        assert_eq!(h["x-real-ip"], "10.1.2.3");
        let mut h = map(&[("forwarded", "for=1.1.1.1"), ("x-real-ip", "1.1.1.1")]);
        forward(&mut h, &connection(), true);
        assert_eq!(h["forwarded"], "for=1.1.1.1");
        assert_eq!(h["x-real-ip"], "1.1.1.1");
        let v6 = ConnectionValues::new("2001:db8::7".parse().unwrap(), 80);
        let mut h = map(&[("forwarded", "for=x")]);
        forward(&mut h, &v6, false);
        assert_eq!(h["forwarded"], "for=\"[2001:db8::7]\";proto=https");
        let mut h = map(&[]);
        forward(&mut h, &connection(), false);
        assert!(!h.contains_key("forwarded") && !h.contains_key("x-real-ip"), "nothing is added");
    }
}
