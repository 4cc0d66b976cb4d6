//! Header rewriting between client and upstream (API.md "HTTP rewriting"): hop-by-hop headers out
//! in both directions, the `X-Forwarded-*` set and `Via` in, and the route's and target's
//! `headers.request` / `headers.response` templates (`{domain}`, `{path}`, `{query}`, `{clientIp}`,
//! `{port}`, `{routeName}`, `{connectionId}`), compiled once per route table.

use std::fmt::Write as _;
use std::net::IpAddr;

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

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Forwarding claims a request carried (seen in `strip_hop_by_hop`'s pass over the names, so that
/// `add_forwarded` needs no lookups of its own).
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardingClaims {
    pub forwarded: bool,
    pub real_ip: bool,
}

/// Removes hop-by-hop headers and every header the `Connection` header names. With `keep_upgrade`
/// (a WebSocket handshake) `Connection: upgrade` and `Upgrade` survive, as the next hop needs them.
/// Returns which forwarding claims the message carried.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) -> ForwardingClaims {
    // One pass over the message's names finds the hop-by-hop ones it carries (most carry one, a
    // response's `Connection: keep-alive`, or none), and only those are removed: each removal is a
    // hash lookup, and one per hop-by-hop name cost ~2,600 instructions a request (callgrind).
    let mut present = [false; HOP_COUNT];
    let mut claims = ForwardingClaims::default();
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|hop| hop == name) {
            present[i] = true;
        }
        claims.forwarded |= name == header::FORWARDED;
        claims.real_ip |= name == X_REAL_IP;
    }
    let carries_connection = present[0]; // HOP_BY_HOP[0] is Connection
    if carries_connection {
        // Cloned out (a reference count each) so that the map can change while they are read.
        let mut values = headers.get_all(header::CONNECTION).iter();
        let first = values.next().cloned();
        let others: Vec<HeaderValue> = values.cloned().collect();
        for value in first.iter().chain(&others) {
            for token in value.to_str().unwrap_or("").split(',').map(str::trim) {
                // Listed hop-by-hop names are handled below, with the upgrade exception.
                if token.is_empty() || HOP_BY_HOP.iter().any(|hop| token.eq_ignore_ascii_case(hop.as_str())) {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                    headers.remove(&name);
                }
            }
        }
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, present)| *present) {
        if !(keep_upgrade && (name == header::UPGRADE || name == header::CONNECTION)) {
            headers.remove(name);
        }
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    claims
}

/// A connection's client address and local port as header values. They are the same on every
/// request of the connection, so they are formatted once per connection rather than per request.
#[derive(Debug, Clone)]
pub struct ConnectionValues {
    pub client_ip: HeaderValue,
    pub local_port: HeaderValue,
}

impl ConnectionValues {
    pub fn new(client_ip: IpAddr, local_port: u16) -> ConnectionValues {
        // An address's text is always a valid header value.
        let client_ip = HeaderValue::try_from(client_ip.to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        ConnectionValues { client_ip, local_port: HeaderValue::from(local_port) }
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
    /// What `strip_hop_by_hop` saw of `Forwarded` and `X-Real-IP`.
    pub claims: ForwardingClaims,
    pub version: http::Version,
}

/// Sets `X-Forwarded-For`/`-Proto`/`-Host`/`-Port` and appends to `Via`. From a trusted peer the
/// `X-Forwarded-For` list is extended and the other `X-Forwarded-*` it sent are kept; from anyone
/// else all of them are replaced, and a `Forwarded` or `X-Real-IP` it sent is replaced by what
/// the proxy knows (the client address; the protocol). Values that stay the same are shared, not rebuilt: per-connection
/// ones come formatted, the rest are static or clone the request's own `Host`.
pub fn add_forwarded(headers: &mut HeaderMap, facts: &ForwardedFacts<'_>) {
    // Up to five inserts follow: the map grows once rather than on the way. Hyper caps a head's
    // header count far below the map's limit, so this cannot fail; if it did, inserts still work.
    let _ = headers.try_reserve(5);
    let client_ip = &facts.connection.client_ip;
    let forwarded_for = if facts.trusted_peer && headers.contains_key(&X_FORWARDED_FOR) {
        let mut value = String::with_capacity(48);
        for existing in headers.get_all(&X_FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()) {
            value.push_str(existing);
            value.push_str(", ");
        }
        value.push_str(client_ip.to_str().unwrap_or("unknown"));
        HeaderValue::try_from(value).ok()
    } else {
        Some(client_ip.clone())
    };
    if let Some(value) = forwarded_for {
        headers.insert(X_FORWARDED_FOR, value);
    }

    let keep_client_values = facts.trusted_peer;
    let host = facts.host.and_then(|host| match headers.get(header::HOST) {
        Some(sent) if sent.as_bytes() == host.as_bytes() => Some(sent.clone()),
        // Values built from a parsed request never hold control bytes; skip rather than fail if so.
        _ => HeaderValue::from_str(host).ok(),
    });
    let mut set_unless_trusted = |name: HeaderName, value: HeaderValue| {
        if !(keep_client_values && headers.contains_key(&name)) {
            headers.insert(name, value);
        }
    };
    set_unless_trusted(X_FORWARDED_PROTO, HeaderValue::from_static(if facts.https { "https" } else { "http" }));
    if let Some(host) = host {
        set_unless_trusted(X_FORWARDED_HOST, host);
    }
    set_unless_trusted(X_FORWARDED_PORT, facts.connection.local_port.clone());
    if facts.host.is_none() && !keep_client_values {
        headers.remove(&X_FORWARDED_HOST);
    }

    if !keep_client_values {
        if facts.claims.forwarded {
            let proto = if facts.https { "https" } else { "http" };
            let client = client_ip.to_str().unwrap_or("unknown");
            let value = if client.contains(':') { format!("for=\"[{client}]\";proto={proto}") } else { format!("for={client};proto={proto}") };
            match HeaderValue::try_from(value) {
                Ok(value) => headers.insert(header::FORWARDED, value),
                Err(_) => headers.remove(header::FORWARDED),
            };
        }
        if facts.claims.real_ip {
            headers.insert(X_REAL_IP, client_ip.clone());
        }
    }

    let (protocol, via_alone) = match facts.version {
        http::Version::HTTP_10 => ("1.0", "1.0 smartproxy"),
        http::Version::HTTP_2 => ("2", "2 smartproxy"),
        _ => ("1.1", "1.1 smartproxy"),
    };
    let via = match headers.get(header::VIA).and_then(|v| v.to_str().ok()) {
        Some(existing) => HeaderValue::try_from(format!("{existing}, {protocol} smartproxy")).ok(),
        None => Some(HeaderValue::from_static(via_alone)),
    };
    if let Some(via) = via {
        headers.insert(header::VIA, via);
    }
}

/// The values a header template may use.
pub struct TemplateContext<'a> {
    pub domain: &'a str,
    pub port: u16,
    pub path: &'a str,
    pub query: &'a str,
    pub client_ip: IpAddr,
    pub route_name: &'a str,
    pub connection_id: u64,
    /// The verified JWT's claims, for `{jwt.<claim>}`.
    pub claims: Option<&'a crate::security::http::Claims>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variable {
    Domain,
    Port,
    Path,
    Query,
    ClientIp,
    RouteName,
    ConnectionId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(Box<str>),
    Var(Variable),
    /// `{jwt.<claim>}`: a claim of the request's verified token (empty without one).
    Claim(Box<str>),
}

/// One `name: value-template` pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderTemplate {
    name: HeaderName,
    pieces: Vec<Piece>,
}

impl HeaderTemplate {
    /// Unknown `{words}` stay literal text, so values such as JSON survive untouched.
    pub fn parse(name: &str, value: &str) -> Result<HeaderTemplate, String> {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("{name:?} is not a valid header name"))?;
        if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            return Err(format!("the value of {name} contains a line break or NUL"));
        }
        let mut pieces = Vec::new();
        let mut rest = value;
        let mut text = String::new();
        while let Some(open) = rest.find('{') {
            let (before, from_brace) = rest.split_at(open);
            text.push_str(before);
            let variable = from_brace.find('}').and_then(|close| {
                let piece = match &from_brace[1..close] {
                    "domain" => Piece::Var(Variable::Domain),
                    "port" => Piece::Var(Variable::Port),
                    "path" => Piece::Var(Variable::Path),
                    "query" => Piece::Var(Variable::Query),
                    "clientIp" => Piece::Var(Variable::ClientIp),
                    "routeName" => Piece::Var(Variable::RouteName),
                    "connectionId" => Piece::Var(Variable::ConnectionId),
                    word => match word.strip_prefix("jwt.") {
                        Some(claim) if !claim.is_empty() => Piece::Claim(claim.into()),
                        _ => return None,
                    },
                };
                Some((piece, close))
            });
            match variable {
                Some((piece, close)) => {
                    if !text.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut text).into_boxed_str()));
                    }
                    pieces.push(piece);
                    rest = &from_brace[close + 1..];
                }
                None => {
                    text.push('{');
                    rest = &from_brace[1..];
                }
            }
        }
        text.push_str(rest);
        if !text.is_empty() {
            pieces.push(Piece::Text(text.into_boxed_str()));
        }
        Ok(HeaderTemplate { name, pieces })
    }

    /// `None` when the value cannot be rendered: a claim the token lacks, or a value that is not
    /// visible ASCII (a claim holding a line break, a path with bytes a header cannot carry).
    fn render(&self, ctx: &TemplateContext<'_>) -> Option<HeaderValue> {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => out.push_str(text),
                Piece::Var(Variable::Domain) => out.push_str(ctx.domain),
                Piece::Var(Variable::Port) => {
                    let _ = write!(out, "{}", ctx.port);
                }
                Piece::Var(Variable::Path) => out.push_str(ctx.path),
                Piece::Var(Variable::Query) => out.push_str(ctx.query),
                Piece::Var(Variable::ClientIp) => {
                    let _ = write!(out, "{}", ctx.client_ip);
                }
                Piece::Var(Variable::RouteName) => out.push_str(ctx.route_name),
                Piece::Var(Variable::ConnectionId) => {
                    let _ = write!(out, "{}", ctx.connection_id);
                }
                Piece::Claim(name) => match ctx.claims.and_then(|claims| claims.get(&**name)) {
                    Some(serde_json::Value::String(text)) => out.push_str(text),
                    Some(serde_json::Value::Null) | None => return None,
                    Some(other) => {
                        let _ = write!(out, "{other}");
                    }
                },
            }
        }
        if !out.bytes().all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic()) {
            return None;
        }
        HeaderValue::from_str(&out).ok()
    }
}

/// Sets every template's header, replacing what was there (later lists override earlier ones). A
/// template that cannot be rendered removes its header: the client's own value never passes in
/// its place.
pub fn apply_templates(headers: &mut HeaderMap, templates: &[HeaderTemplate], ctx: &TemplateContext<'_>) {
    for template in templates {
        match template.render(ctx) {
            Some(value) => {
                headers.insert(template.name.clone(), value);
            }
            None => {
                headers.remove(&template.name);
            }
        }
    }
}

/// The sender of this message will close after it: HTTP/1.0 unless it asked to keep the
/// connection alive, HTTP/1.1 when it said `close`.
pub fn wants_close(headers: &HeaderMap, version: http::Version) -> bool {
    if version == http::Version::HTTP_10 {
        !connection_has(headers, "keep-alive")
    } else {
        connection_has(headers, "close")
    }
}

/// Whether a `Connection` field of the message lists `token`.
pub fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|value| value.as_bytes().split(|b| *b == b','))
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
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
    fn an_upgrade_keeps_its_upgrade_headers() {
        let mut h = map(&[("connection", "Upgrade, x-secret"), ("upgrade", "websocket"), ("x-secret", "1")]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert!(!h.contains_key("x-secret"));
    }

    fn facts(connection: &ConnectionValues, trusted: bool) -> ForwardedFacts<'_> {
        ForwardedFacts { connection, https: true, host: Some("Example.com:8443"), trusted_peer: trusted, version: http::Version::HTTP_11, claims: ForwardingClaims::default() }
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
        add_forwarded(&mut h, &ForwardedFacts { connection: &v6, https: false, host: Some("Example.com:8443"), trusted_peer: false, version: http::Version::HTTP_2, claims: ForwardingClaims::default() });
        assert_eq!(h["x-forwarded-for"], "2001:db8::7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "Example.com:8443");
        assert_eq!(h["x-forwarded-port"], "80");
        assert_eq!(h["via"], "2 smartproxy");
        let mut h = map(&[("host", "other.example"), ("x-forwarded-host", "evil")]);
        add_forwarded(&mut h, &ForwardedFacts { connection: &v6, https: false, host: Some("a.example"), trusted_peer: false, version: http::Version::HTTP_10, claims: ForwardingClaims::default() });
        assert_eq!(h["x-forwarded-host"], "a.example");
        assert_eq!(h["via"], "1.0 smartproxy");
        // No host at all: an untrusted client's X-Forwarded-Host does not survive; a trusted one's does.
        let mut h = map(&[("x-forwarded-host", "evil")]);
        add_forwarded(&mut h, &ForwardedFacts { connection: &v6, https: false, host: None, trusted_peer: false, version: http::Version::HTTP_11, claims: ForwardingClaims::default() });
        assert!(!h.contains_key("x-forwarded-host"));
        let mut h = map(&[("x-forwarded-host", "lb.example"), ("x-forwarded-port", "443")]);
        add_forwarded(&mut h, &ForwardedFacts { connection: &v6, https: false, host: None, trusted_peer: true, version: http::Version::HTTP_11, claims: ForwardingClaims::default() });
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
    fn templates_render_known_variables_and_keep_the_rest() {
        let t = HeaderTemplate::parse("X-Info", "{domain}|{port}|{path}|{query}|{clientIp}|{routeName}|{unknown}|{jwt.sub}|{jwt.n}|{jwt.}|{").unwrap();
        let claims: crate::security::http::Claims = serde_json::from_str(r#"{"sub":"alice","n":3}"#).unwrap();
        let ctx = TemplateContext {
            domain: "a.com",
            port: 80,
            path: "/p",
            query: "q=1",
            client_ip: "::1".parse().unwrap(),
            route_name: "r",
            connection_id: 7,
            claims: Some(&claims),
        };
        let mut h = HeaderMap::new();
        apply_templates(&mut h, &[t], &ctx);
        assert_eq!(h["x-info"], "a.com|80|/p|q=1|::1|r|{unknown}|alice|3|{jwt.}|{");
    }

    #[test]
    fn a_template_that_cannot_be_rendered_removes_the_clients_value() {
        let claims: crate::security::http::Claims = serde_json::from_str(r#"{"sub":"a\r\nX-Admin: 1","nul":"a\u0000b","utf":"caf\u00e9","ok":"bob"}"#).unwrap();
        let ctx = TemplateContext {
            domain: "a.com",
            port: 80,
            path: "/p",
            query: "",
            client_ip: "::1".parse().unwrap(),
            route_name: "r",
            connection_id: 7,
            claims: Some(&claims),
        };
        for claim in ["sub", "nul", "utf", "missing"] {
            let t = HeaderTemplate::parse("X-User", &format!("{{jwt.{claim}}}")).unwrap();
            let mut h = map(&[("x-user", "admin")]);
            apply_templates(&mut h, &[t], &ctx);
            assert!(!h.contains_key("x-user"), "{claim}: {:?}", h.get("x-user"));
        }
        let t = HeaderTemplate::parse("X-User", "{jwt.ok}").unwrap();
        let mut h = map(&[("x-user", "admin")]);
        apply_templates(&mut h, &[t], &TemplateContext { claims: None, ..ctx });
        assert!(!h.contains_key("x-user"), "no token: no claim");
    }

    #[test]
    fn an_untrusted_clients_forwarded_and_real_ip_are_replaced() {
        let forward = |h: &mut HeaderMap, connection: &ConnectionValues, trusted: bool| {
            let claims = strip_hop_by_hop(h, false);
            add_forwarded(h, &ForwardedFacts { claims, ..facts(connection, trusted) });
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

    #[test]
    fn bad_templates_are_refused() {
        assert!(HeaderTemplate::parse("bad name", "x").is_err());
        assert!(HeaderTemplate::parse("x", "a\r\nb").is_err());
    }
}
