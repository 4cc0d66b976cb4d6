//! The route table: routes compiled from config (matchers, and per target how the proxy connects:
//! TLS or not, PROXY header version), grouped by port in matching order (priority descending,
//! then the user's array order). A table is immutable; `updateRoutes` builds a new one
//! and live connections keep the table they were accepted under.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, Method};

use crate::config::{
    BackendProtocol, ConfigError, HeaderMatchConfig, HealthCheckConfig, HeaderTemplatesConfig, NameValue, NativeResponseConfig, RegexConfig, RetryConfig,
    RouteConfig, TargetPort, TargetTlsConfig, TlsConfig, TlsMode, Transport, UdpConfig, Http3Config,
};
use crate::tls::config::{client_config, server_config, server_config_with_resolver, ALPN_H2, ALPN_H3, ALPN_HTTP11};
use crate::tls::dynamic::{CertSlots, SlotResolver};
use crate::balance::affinity::{Affinity, AffinityKey, OnUnknown};
use crate::balance::health::{ProbeKind, ProbeSpec};
use crate::balance::{self, Algorithm, BackendRegistry, BackendState, BackendStatus, Candidate, Lease, Thresholds};
use crate::templates::HeaderTemplate;
use crate::metrics::{RouteStats, RouteStatsRegistry};
use crate::matchers::domain::DomainPattern;
use crate::matchers::ip::IpList;
use crate::matchers::path::PathPattern;
use crate::security::http::HttpSecurity;
use crate::security::IpPolicy;

/// What connecting to a backend may take when the route sets no `connectTimeoutMs`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// What a response head may take when the route sets no `timeouts.responseMs`.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(300);

/// A pong must answer within this when the route sets `pingInterval` but no `pingTimeout`.
pub const DEFAULT_PING_TIMEOUT: Duration = Duration::from_secs(10);

/// A route's `action.websocket` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WsSettings {
    pub ping_interval: Option<Duration>,
    pub ping_timeout: Duration,
    /// Largest client message (the payloads of its frames), in bytes.
    pub max_message: Option<u64>,
}

impl WsSettings {
    /// Only routes with settings follow frames. The tunnel cannot tell a WebSocket from another
    /// protocol upgraded on the same route (its caller passes streams, not the `Upgrade` token), and
    /// following one that is not WebSocket would close it as garbage: a route without settings
    /// promises nothing about frames, so its tunnel stays a plain relay.
    pub fn follows_frames(&self) -> bool {
        self.ping_interval.is_some() || self.max_message.is_some()
    }
}

/// What the listener learned about a connection before routing it.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionFacts<'a> {
    pub local_port: u16,
    pub client_ip: IpAddr,
    /// SNI for TLS, the Host header (without port) for plain HTTP.
    pub domain: Option<&'a str>,
    pub protocol: Protocol,
}

/// What the HTTP engine knows of one request, on top of its connection's facts.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// `domain` is the request's Host / `:authority` without port.
    pub connection: ConnectionFacts<'a>,
    /// Path without the query.
    pub path: &'a str,
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// The port's routes need nothing from the client, so nothing was read before routing.
    NotSniffed,
    Tls { version: Option<&'static str> },
    Http,
    Other,
}

#[derive(Debug)]
pub struct Route {
    /// How metrics and logs name the route: its name, else its id, else `routes[index]`.
    pub label: Arc<str>,
    pub name: Option<String>,
    pub id: Option<String>,
    /// `socket-handler` routes: the wrapper's id of the handler; the connection goes to it.
    pub socket_handler: Option<u32>,
    /// `socket-handler` routes taking UDP: the wrapper's id of the datagram handler; each of a
    /// flow's datagrams goes to it.
    pub datagram_handler: Option<u32>,
    /// Rate limit and authentication, checked per request by the HTTP engine.
    pub http_security: Option<HttpSecurity>,
    pub priority: f64,
    domains: Vec<DomainPattern>,
    client_ip: IpList,
    tls_versions: Vec<String>,
    pub tls: Option<RouteTls>,
    targets: Vec<Target>,
    /// `action.connectTimeoutMs`, or `DEFAULT_CONNECT_TIMEOUT`.
    pub connect_timeout: Duration,
    pub policy: IpPolicy,
    pub max_connections: Option<u32>,
    pub stats: Arc<RouteStats>,
    path: Option<PathPattern>,
    header_matches: Vec<HeaderMatch>,
    pub http: HttpSettings,
    balancing: Balancing,
    /// Session affinity: which backend a client's key value is bound to.
    pub affinity: Option<Affinity>,
    /// The route decides or rewrites by what is in requests (`wants_http`): bytes the engine
    /// could not read as HTTP never reach it.
    needs_http: bool,
    /// `forwardingEngine: 'nftables'`: what the kernel forwards for the route (the relay serves
    /// it where the kernel cannot).
    pub kernel: Option<crate::kernel::KernelRoute>,
    /// Which sockets of its ports the route takes.
    pub transport: Transport,
    /// `action.udp` with its defaults (used when `transport` includes UDP).
    pub udp: UdpConfig,
    /// `action.http3`: the route is served over QUIC too, and advertised with this `Alt-Svc` age.
    pub http3: Option<Http3Config>,
}

/// How the route spreads picks over a backend set.
#[derive(Debug)]
struct Balancing {
    algorithm: Algorithm,
    thresholds: Thresholds,
    health_check: Option<HealthCheckConfig>,
    /// Rotation over the backend set, per table.
    turn: AtomicUsize,
}

/// A route's client-facing TLS handling, with its rustls configs built once per table.
#[derive(Debug)]
pub struct RouteTls {
    pub mode: TlsMode,
    /// Terminating modes: the acceptor with the route's certificate.
    pub acceptor: Option<Arc<rustls::ServerConfig>>,
    /// Re-encrypt: TLS to the targets that do not say otherwise (`SelectedTarget::upstream_tls`).
    upstream: Option<Arc<UpstreamConnectors>>,
    /// A static certificate's notBefore and notAfter (status pages and metrics show its expiry).
    pub static_validity: Option<(std::time::SystemTime, std::time::SystemTime)>,
}

/// TLS from the proxy to a target, built once per table: a route's re-encryption, or a target's
/// own `tls`. Both connectors verify the same way; they differ only in what ALPN offers.
#[derive(Debug)]
struct UpstreamConnectors {
    /// Offers what `backendProtocol` allows.
    any: Arc<rustls::ClientConfig>,
    /// Offers only HTTP/1.1 (WebSocket upgrades and health checks need it).
    http1: Arc<rustls::ClientConfig>,
    /// QUIC's (TLS 1.3, ALPN h3), for `'auto'` once a backend advertised HTTP/3 (`'http3'` uses
    /// `any`); None where the TLS versions allowed leave out 1.3.
    h3: Option<Arc<rustls::ClientConfig>>,
}

impl UpstreamConnectors {
    fn build(ca: Option<&str>, verify: bool, versions: &[String], backend_protocol: BackendProtocol) -> Result<UpstreamConnectors, String> {
        let alpn: &[&[u8]] = match backend_protocol {
            BackendProtocol::Auto => &[ALPN_H2, ALPN_HTTP11],
            BackendProtocol::Http1 => &[ALPN_HTTP11],
            BackendProtocol::Http2 => &[ALPN_H2],
            BackendProtocol::Http3 => &[ALPN_H3],
        };
        // QUIC has TLS 1.3 only.
        let tls13 = ["TLSv1.3".to_string()];
        let any_versions: &[String] = if backend_protocol == BackendProtocol::Http3 { &tls13 } else { versions };
        let any = client_config(ca, verify, any_versions, alpn)?;
        let h3 = match backend_protocol {
            BackendProtocol::Http3 => Some(any.clone()),
            BackendProtocol::Auto if versions.is_empty() || versions.iter().any(|v| v == "TLSv1.3") => Some(client_config(ca, verify, &tls13, &[ALPN_H3])?),
            _ => None,
        };
        Ok(UpstreamConnectors { any, http1: client_config(ca, verify, versions, &[ALPN_HTTP11])?, h3 })
    }

    fn pick(&self, http1_only: bool) -> Arc<rustls::ClientConfig> {
        if http1_only { self.http1.clone() } else { self.any.clone() }
    }
}

impl Route {
    /// The certificate status of a route that terminates TLS with a static certificate.
    pub fn static_certificate(&self) -> Option<crate::acme::CertStatus> {
        let (not_before, not_after) = self.tls.as_ref()?.static_validity?;
        let ms = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        Some(crate::acme::CertStatus {
            domain: self.domains.first().map_or("*", |d| d.as_str()).to_string(),
            status: if not_after <= std::time::SystemTime::now() { "expired" } else { "valid" },
            expiry_date: Some(ms(not_after)),
            issue_date: Some(ms(not_before)),
            source: "static",
            error: None,
        })
    }
}

impl RouteTls {
    pub fn terminates(&self) -> bool {
        self.mode != TlsMode::Passthrough
    }

    /// `socket_handler`: the plaintext goes to a socket handler, so no HTTP protocol is negotiated.
    fn compile(config: &TlsConfig, backend_protocol: BackendProtocol, socket_handler: bool, certs: &CertSlots) -> Result<RouteTls, (String, String)> {
        let alpn: &[&[u8]] = if socket_handler { &[] } else { &[ALPN_H2, ALPN_HTTP11] };
        let acceptor = match (config.mode, &config.certificate) {
            (TlsMode::Passthrough, _) => None,
            (_, None) if config.acme.is_some() => {
                let name = config.acme.as_ref().map(|a| a.cert_name.as_str()).unwrap_or_default();
                let resolver = Arc::new(SlotResolver(certs.slot(name)));
                Some(server_config_with_resolver(resolver, &config.versions, alpn).map_err(|reason| ("action.tls".to_string(), reason))?)
            }
            (_, Some(pem)) => Some(
                server_config(&pem.cert, &pem.key, pem.ca.as_deref(), &config.versions, alpn)
                    .map_err(|reason| ("action.tls.certificate".to_string(), reason))?,
            ),
            (_, None) => {
                return Err(("action.tls.certificate".into(), "a terminating route needs a certificate { key, cert }".into()));
            }
        };
        // `versions` are the client-facing ones here; the connection to the targets offers the defaults.
        let upstream = match config.mode {
            TlsMode::TerminateAndReencrypt => {
                let ca = config.certificate.as_ref().and_then(|c| c.ca.as_deref());
                let connectors = UpstreamConnectors::build(ca, config.reject_unauthorized, &[], backend_protocol)
                    .map_err(|reason| ("action.tls".to_string(), reason))?;
                Some(Arc::new(connectors))
            }
            _ => None,
        };
        let static_validity = match config.mode {
            TlsMode::Passthrough => None,
            _ => config.certificate.as_ref().and_then(|pem| crate::tls::dynamic::leaf_validity(&pem.cert)),
        };
        Ok(RouteTls { mode: config.mode, acceptor, upstream, static_validity })
    }
}

/// What a target's own `tls` makes of the connection to it, replacing the route's settings whole
/// (fields it leaves out take their defaults, not the route's): `terminate-and-reencrypt` is TLS
/// to the target, `terminate` plain. `None` inside: plain. On failure: the field under the target.
fn compile_target_tls(config: &TargetTlsConfig, backend_protocol: BackendProtocol) -> Result<Option<Arc<UpstreamConnectors>>, (&'static str, String)> {
    match config.mode {
        TlsMode::Passthrough => Err((
            "tls.mode",
            "a target cannot pass TLS through: the route decides what reaches its targets; use 'terminate-and-reencrypt' (TLS to this target) or 'terminate' (plain)".into(),
        )),
        TlsMode::Terminate => Ok(None),
        TlsMode::TerminateAndReencrypt => UpstreamConnectors::build(config.ca.as_deref(), config.reject_unauthorized, &config.versions, backend_protocol)
            .map(|connectors| Some(Arc::new(connectors)))
            .map_err(|reason| ("tls", reason)),
    }
}

/// How the HTTP engine treats the route's requests.
#[derive(Debug)]
pub struct HttpSettings {
    pub request_headers: Vec<HeaderTemplate>,
    pub response_headers: Vec<HeaderTemplate>,
    /// What a response head may take (`timeouts.responseMs`), or `DEFAULT_RESPONSE_TIMEOUT`.
    pub response_timeout: Duration,
    pub websocket: bool,
    pub websocket_settings: WsSettings,
    pub backend_protocol: BackendProtocol,
    /// `action.options.raw`: bytes are relayed even for HTTP traffic.
    pub raw: bool,
    pub retry: RetryPolicy,
    /// Served by the engine itself; the route has no upstream.
    pub native: Option<NativeResponse>,
    /// `action.normalizePath`: the backend gets the path matching saw, not the one sent.
    pub normalize_path: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub on_connect_failure: bool,
    pub on_5xx: bool,
    pub on_timeout: bool,
    pub backoff: Duration,
}

impl RetryPolicy {
    /// Without `action.retry`: no retries (a dead pooled connection is still replaced once).
    pub const NONE: RetryPolicy =
        RetryPolicy { max_retries: 0, on_connect_failure: false, on_5xx: false, on_timeout: false, backoff: Duration::ZERO };

    fn from_config(config: Option<&RetryConfig>) -> RetryPolicy {
        match config {
            None => RetryPolicy::NONE,
            Some(c) => RetryPolicy {
                max_retries: c.max_retries,
                on_connect_failure: c.on_connect_failure,
                on_5xx: c.on5xx,
                on_timeout: c.on_timeout,
                backoff: Duration::from_millis(c.backoff_ms),
            },
        }
    }

    /// Whether an attempt may be repeated after bytes reached the upstream.
    pub fn replays_after_send(&self) -> bool {
        self.max_retries > 0 && (self.on_5xx || self.on_timeout)
    }
}

#[derive(Debug)]
pub enum NativeResponse {
    /// `location` is a template: `{domain}`, `{port}`, `{path}` (with the query), `{query}`,
    /// `{clientIp}`, `{routeName}`.
    Redirect { location: String, status: http::StatusCode },
    Response { status: http::StatusCode, headers: Vec<(HeaderName, http::HeaderValue)>, body: bytes::Bytes },
    Block { status: http::StatusCode, message: String },
}

impl NativeResponse {
    fn compile(config: &NativeResponseConfig) -> Result<NativeResponse, String> {
        let status = |code: u16| http::StatusCode::from_u16(code).map_err(|_| format!("{code} is not an HTTP status"));
        Ok(match config {
            NativeResponseConfig::Redirect { location, status: code } => {
                let status = status(*code)?;
                if !status.is_redirection() {
                    return Err(format!("{code} is not a redirect status (3xx)"));
                }
                NativeResponse::Redirect { location: location.clone(), status }
            }
            NativeResponseConfig::Response { status: code, headers, body } => NativeResponse::Response {
                status: status(*code)?,
                headers: headers
                    .iter()
                    .map(|nv| {
                        let name = HeaderName::from_bytes(nv.name.as_bytes()).map_err(|_| format!("{:?} is not a valid header name", nv.name))?;
                        let value = http::HeaderValue::from_str(&nv.value).map_err(|_| format!("the value of {name} is not a valid header value"))?;
                        Ok((name, value))
                    })
                    .collect::<Result<Vec<_>, String>>()?,
                body: bytes::Bytes::from(body.clone()),
            },
            NativeResponseConfig::Block { status: code, message } => NativeResponse::Block { status: status(*code)?, message: message.clone() },
        })
    }
}

#[derive(Debug)]
struct HeaderMatch {
    name: HeaderName,
    value: HeaderValueMatch,
}

#[derive(Debug)]
enum HeaderValueMatch {
    Exact(String),
    /// Tested on the raw value bytes: no UTF-8 check and no allocation per request.
    Regex(regex::bytes::Regex),
}

impl HeaderValueMatch {
    fn matches(&self, value: &[u8]) -> bool {
        match self {
            HeaderValueMatch::Exact(exact) => value == exact.as_bytes(),
            HeaderValueMatch::Regex(regex) => regex.is_match(value),
        }
    }
}

/// A JavaScript RegExp compiled with the regex crate, which has no lookaround or backreferences
/// (those are errors) and matches in linear time. Flags: `i`, `m`, `s` as in JavaScript; `u`/`v`
/// turn on Unicode classes (without them `\d`, `\w` and `\b` are ASCII, as in JavaScript);
/// `g`, `y` and `d` mean nothing to a yes/no test and are ignored.
fn compile_js_regex(config: &RegexConfig) -> Result<regex::bytes::Regex, String> {
    let shown = format!("/{}/{}", config.source, config.flags);
    let mut builder = regex::bytes::RegexBuilder::new(&config.source);
    builder.unicode(false);
    for flag in config.flags.chars() {
        match flag {
            'i' => {
                builder.case_insensitive(true);
            }
            'm' => {
                builder.multi_line(true).crlf(true);
            }
            's' => {
                builder.dot_matches_new_line(true);
            }
            'u' | 'v' => {
                builder.unicode(true);
            }
            'g' | 'y' | 'd' => {}
            other => return Err(format!("{shown}: unknown RegExp flag {other:?}")),
        }
    }
    builder.build().map_err(|err| match err {
        // The crate's message spans several lines (the pattern, a caret, the reason): keep the reason.
        regex::Error::Syntax(text) => {
            let reason = text.lines().rev().find_map(|line| line.strip_prefix("error: ")).unwrap_or(text.as_str()).trim().to_string();
            format!("{shown} is not supported by the engine's regex matcher: {reason}")
        }
        other => format!("{shown}: {other}"),
    })
}

/// A target whose host and/or port a JavaScript function chooses (ids the wrapper assigned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetFunctions {
    pub host: Option<u32>,
    pub port: Option<u32>,
}

#[derive(Debug)]
struct Target {
    /// Shared: each request's pool key holds its host, and a clone of these is a count.
    hosts: Vec<Arc<str>>,
    host_function: Option<u32>,
    port: TargetPort,
    match_ports: Option<Vec<u16>>,
    match_path: Option<PathPattern>,
    match_headers: Vec<HeaderMatch>,
    match_methods: Option<Vec<Method>>,
    priority: f64,
    request_headers: Vec<HeaderTemplate>,
    response_headers: Vec<HeaderTemplate>,
    /// TLS to this target: its own `tls` if it has one, else the route's re-encryption.
    upstream: Option<Arc<UpstreamConnectors>>,
    /// Its own `sendProxyProtocol`, else the route's.
    send_proxy_protocol: Option<u8>,
    /// Round-robin position over `hosts`, per table: a route update restarts the rotation.
    next_host: AtomicUsize,
    /// One per static host where the port is fixed: what balancing picks from.
    backends: Vec<BackendSlot>,
}

/// One backend of a target: a host of it, with the target's weight.
#[derive(Debug)]
struct BackendSlot {
    target: usize,
    host: usize,
    weight: u32,
    state: Arc<BackendState>,
}

impl Candidate for BackendSlot {
    fn weight(&self) -> u32 {
        self.weight
    }

    fn state(&self) -> &Arc<BackendState> {
        &self.state
    }
}

impl Target {
    fn has_match(&self) -> bool {
        self.match_ports.is_some() || self.match_path.is_some() || !self.match_headers.is_empty() || self.match_methods.is_some()
    }

    fn fits(&self, local_port: u16, request: Option<&RequestFacts<'_>>) -> bool {
        if let Some(ports) = &self.match_ports {
            if !ports.contains(&local_port) {
                return false;
            }
        }
        let needs_request = self.match_path.is_some() || !self.match_headers.is_empty() || self.match_methods.is_some();
        match request {
            None => !needs_request,
            Some(request) => {
                self.match_path.as_ref().is_none_or(|p| p.matches(request.path))
                    && headers_match(&self.match_headers, request.headers)
                    && self.match_methods.as_ref().is_none_or(|methods| methods.contains(request.method))
            }
        }
    }
}

/// Every wanted header is there with a fitting value; a header sent more than once fits when one
/// of its values does.
fn headers_match(wanted: &[HeaderMatch], headers: &HeaderMap) -> bool {
    wanted.iter().all(|m| headers.get_all(&m.name).iter().any(|v| m.value.matches(v.as_bytes())))
}

/// The backend a connection goes to.
#[derive(Debug)]
pub struct SelectedTarget<'a> {
    /// Empty when `functions.host` chooses.
    pub host: &'a Arc<str>,
    /// 0 when `functions.port` chooses.
    pub port: u16,
    /// Set when a function must complete the choice (see `hooks::Scripts::endpoint`).
    pub functions: Option<TargetFunctions>,
    /// The static hosts (for the context's `targetHost`) and this pick's round-robin turn.
    pub hosts: &'a [Arc<str>],
    pub turn: usize,
    pub request_headers: &'a [HeaderTemplate],
    pub response_headers: &'a [HeaderTemplate],
    /// The backend's in-flight slot (balanced targets); report connects to it, drop it when done.
    pub lease: Option<Lease>,
    /// PROXY header version towards this target: its own, else the route's (`None`: the engine's).
    pub send_proxy_protocol: Option<u8>,
    upstream: Option<&'a UpstreamConnectors>,
}

/// The host of a target whose function chooses it.
static NO_HOST: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));

impl SelectedTarget<'_> {
    /// Where to connect when no function has to choose: the host (shared) and the port.
    pub fn static_endpoint(&self) -> Option<(Arc<str>, u16)> {
        self.functions.is_none().then(|| (self.host.clone(), self.port))
    }

    /// The TLS config for the connection to this target (`None`: plain), the target's own `tls`
    /// winning over the route's. `http1_only`: the connection must speak HTTP/1.1 (upgrades).
    pub fn upstream_tls(&self, http1_only: bool) -> Option<Arc<rustls::ClientConfig>> {
        self.upstream.map(|connectors| connectors.pick(http1_only))
    }

    /// The TLS config for QUIC to this target, where it may speak HTTP/3.
    pub fn upstream_tls_h3(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.upstream.and_then(|connectors| connectors.h3.clone())
    }
}

/// The routes of one port, in matching order, and what must be read from a client to choose.
#[derive(Debug, Default)]
pub struct PortPlan {
    pub routes: Vec<Arc<Route>>,
    /// Some route here matches on domain or TLS version: the first bytes must be sniffed.
    pub needs_client_data: bool,
    /// Some route here must see HTTP requests (path, headers, templates): plain HTTP on this port
    /// goes to the HTTP engine instead of a byte relay.
    pub serves_http: bool,
    /// Some route here is a socket handler: a plain HTTP connection's first request decides
    /// whether the whole connection goes to it.
    pub socket_handlers: bool,
    /// ACME HTTP-01 challenges are answered here before any route sees the request.
    pub acme_challenges: bool,
}

#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
    ports: HashMap<u16, PortPlan, foldhash::fast::RandomState>,
    /// The routes taking datagrams on each UDP port, in matching order.
    udp_ports: HashMap<u16, Vec<Arc<Route>>, foldhash::fast::RandomState>,
    /// The ports some route serves HTTP/3 on (`action.http3`): their UDP sockets are QUIC's.
    quic_ports: BTreeSet<u16>,
}

/// What a UDP route can be: a relay of datagrams to static targets, with nothing of TLS or HTTP.
fn check_udp_route(config: &RouteConfig, route: &Route) -> Result<(), (String, String)> {
    let m = &config.match_;
    let refuse = |field: &str, why: &str| Err((field.to_string(), format!("UDP routes relay datagrams: {why}")));
    let handler_route = config.action.socket_handler.is_some() || config.action.datagram_handler.is_some();
    if handler_route {
        match (route.transport, config.action.socket_handler, config.action.datagram_handler) {
            (Transport::Udp, Some(_), _) => return Err(("action.socketHandler".into(), "a route taking only UDP takes datagrams: give it a datagramHandler instead".into())),
            (_, _, None) => return Err(("action.datagramHandler".into(), "a socket-handler route taking UDP needs a datagramHandler for its datagrams".into())),
            (Transport::All, None, Some(_)) => return Err(("action.socketHandler".into(), "a socket-handler route with match.transport 'all' needs a socketHandler for its TCP connections too".into())),
            _ => {}
        }
        if config.action.tls.is_some() || !m.domains.is_empty() {
            return refuse("action.tls", "a datagram handler gets the client's datagrams as they come: no TLS, no domains");
        }
    }
    // QUIC passed through by SNI is the one TLS a UDP route has: the proxy reads the hello in
    // the client's Initial packets and ends nothing.
    let passthrough = match &config.action.tls {
        None => false,
        Some(tls) if tls.mode == TlsMode::Passthrough => true,
        Some(_) => return refuse("action.tls", "the proxy does not end TLS on them (QUIC passthrough by SNI is tls.mode 'passthrough'; HTTP/3 is action.http3 on a TCP route)"),
    };
    if !m.domains.is_empty() && !passthrough {
        return refuse("match.domains", "a datagram names no domain unless the route passes QUIC through by SNI (action.tls.mode 'passthrough')");
    }
    if m.path.is_some() || !m.headers.is_empty() || !m.tls_version.is_empty() {
        return refuse("match", "no path, headers or TLS version to match");
    }
    if config.action.native_response.is_some() || config.action.kernel.is_some() {
        return refuse("action", "forward to targets (kernel routes take UDP with action.nftables.protocol)");
    }
    if route.targets.iter().any(|t| t.host_function.is_some() || !matches!(t.port, TargetPort::Fixed(_))) {
        return refuse("action.targets", "targets must be static hosts and ports, not functions");
    }
    if config.action.load_balancing.health_check.is_some() && !route.transport.tcp() {
        return refuse("action.loadBalancing.healthCheck", "health checks probe over TCP or HTTP, which a UDP backend may not answer");
    }
    let udp = route.udp;
    if udp.session_timeout_ms < 1000 || udp.max_sessions_per_ip == 0 || udp.max_datagram_size == 0 || udp.max_datagram_size > 65_535 {
        return Err((
            "action.udp".into(),
            "sessionTimeout must be at least 1000 ms, maxSessionsPerIP at least 1, maxDatagramSize from 1 to 65535".into(),
        ));
    }
    Ok(())
}

/// What a route served over HTTP/3 needs: QUIC ends in the proxy, so its TLS must too, and its
/// ports' UDP sockets belong to QUIC.
fn check_http3_route(route: &Route) -> Result<(), (String, String)> {
    let refuse = |why: &str| Err(("action.http3".to_string(), why.to_string()));
    if !route.tls.as_ref().is_some_and(|tls| tls.terminates() && tls.acceptor.is_some()) {
        return refuse("HTTP/3 ends QUIC, and its TLS, in the proxy: the route needs action.tls.mode 'terminate' or 'terminate-and-reencrypt'");
    }
    if route.transport.udp() {
        return refuse("the route's UDP ports are taken by QUIC: match.transport must be 'tcp'");
    }
    if route.socket_handler.is_some() || route.http.raw || route.kernel.is_some() {
        return refuse("HTTP/3 requests go through the HTTP engine: not on a socket-handler, raw or kernel-forwarded route");
    }
    Ok(())
}

/// The kernel takes every flow to a kernel route's port (on this host's addresses) before any
/// socket sees it: a port it forwards belongs to that route alone.
fn check_kernel_ports(configs: &[RouteConfig], routes: &[Arc<Route>]) -> Result<(), ConfigError> {
    use crate::kernel::KernelProtocol;
    for (i, (config, route)) in configs.iter().zip(routes).enumerate() {
        let Some(kernel) = &route.kernel else { continue };
        for (j, (other_config, other)) in configs.iter().zip(routes).enumerate() {
            if i == j {
                continue;
            }
            // A kernel route takes its protocols' flows: another route may keep the others.
            let (kernel_tcp, kernel_udp) = (kernel.protocol != KernelProtocol::Udp, kernel.protocol != KernelProtocol::Tcp);
            let clash = match &other.kernel {
                Some(theirs) => kernel.protocol == KernelProtocol::All || theirs.protocol == KernelProtocol::All || theirs.protocol == kernel.protocol,
                None => (kernel_tcp && other.transport.tcp()) || (kernel_udp && (other.transport.udp() || other.http3.is_some())),
            };
            if let Some(port) = clash.then(|| config.match_.ports.iter().find(|p| other_config.match_.ports.contains(p))).flatten() {
                let (later, earlier) = if i > j { (config, &other.label) } else { (other_config, &route.label) };
                return Err(ConfigError::in_route(
                    later.index,
                    later.name.as_deref(),
                    "match.ports",
                    format!("port {port} is forwarded by the kernel for route {earlier:?} (forwardingEngine: 'nftables'), which takes every flow to it: it cannot be shared"),
                ));
            }
        }
    }
    Ok(())
}

impl RouteTable {
    /// `certs`: the engine's slots of automatic certificates, which outlive this table.
    /// `backends`: the engine's backend states (health, in flight), which outlive this table.
    pub fn compile(configs: &[RouteConfig], stats: &RouteStatsRegistry, certs: &CertSlots, backends: &BackendRegistry) -> Result<RouteTable, ConfigError> {
        let mut routes = Vec::with_capacity(configs.len());
        for config in configs {
            routes.push(Arc::new(Route::compile(config, stats, certs, backends)?));
        }
        check_kernel_ports(configs, &routes)?;
        // Stable sort keeps array order among equal priorities.
        let mut ordered: Vec<(usize, Arc<Route>)> = routes.iter().cloned().enumerate().collect();
        ordered.sort_by(|(ai, a), (bi, b)| b.priority.total_cmp(&a.priority).then(ai.cmp(bi)));
        let mut ports: HashMap<u16, PortPlan, foldhash::fast::RandomState> = HashMap::default();
        let mut udp_ports: HashMap<u16, Vec<Arc<Route>>, foldhash::fast::RandomState> = HashMap::default();
        for (position, route) in &ordered {
            if route.transport.udp() {
                for port in &configs[*position].match_.ports {
                    udp_ports.entry(*port).or_default().push(route.clone());
                }
            }
            if !route.transport.tcp() {
                continue;
            }
            for port in &configs[*position].match_.ports {
                let plan = ports.entry(*port).or_default();
                let wants_http = route.needs_http;
                plan.needs_client_data |= !route.domains.is_empty() || !route.tls_versions.is_empty() || wants_http;
                plan.serves_http |= wants_http || (!route.domains.is_empty() && route.tls.is_none() && !route.http.raw);
                plan.socket_handlers |= route.socket_handler.is_some();
                plan.routes.push(route.clone());
            }
        }
        // ACME HTTP-01 is answered on its port ahead of the routes there, even where none listens.
        for config in configs {
            if let Some(acme) = config.action.tls.as_ref().and_then(|tls| tls.acme.as_ref()) {
                let plan = ports.entry(acme.port).or_default();
                plan.acme_challenges = true;
                plan.needs_client_data = true;
            }
        }
        let mut quic_ports = BTreeSet::new();
        for (config, route) in configs.iter().zip(&routes) {
            if route.http3.is_none() {
                continue;
            }
            for port in &config.match_.ports {
                if let Some(relay) = udp_ports.get(port).and_then(|relays| relays.first()) {
                    return Err(ConfigError::in_route(
                        config.index,
                        config.name.as_deref(),
                        "action.http3",
                        format!("port {port} relays datagrams for route {:?} (match.transport): its UDP socket cannot also take QUIC", relay.label),
                    ));
                }
                quic_ports.insert(*port);
            }
        }
        Ok(RouteTable { routes, ports, udp_ports, quic_ports })
    }

    /// Every port some route serves HTTP/3 on.
    pub fn quic_ports(&self) -> BTreeSet<u16> {
        self.quic_ports.clone()
    }

    /// Every port some route takes datagrams on.
    pub fn udp_ports(&self) -> BTreeSet<u16> {
        self.udp_ports.keys().copied().collect()
    }

    /// Whether some UDP route of the port passes QUIC through by SNI: a new flow's first datagrams
    /// are then read as QUIC Initial packets before a route is chosen.
    pub fn udp_reads_hello(&self, port: u16) -> bool {
        self.udp_ports.get(&port).is_some_and(|routes| routes.iter().any(|route| route.tls.is_some()))
    }

    /// The first UDP route of the port that takes this flow. `hello`: on a port that reads hellos
    /// (`udp_reads_hello`), the QUIC client's ClientHello, or None when the first datagram was no
    /// QUIC Initial (then only routes without TLS take it, as on TCP).
    pub fn find_udp(&self, port: u16, client_ip: IpAddr, hello: Option<&crate::tls::client_hello::ClientHelloInfo>) -> Option<&Arc<Route>> {
        let routes = self.udp_ports.get(&port)?;
        let facts = match hello {
            Some(hello) => ConnectionFacts { local_port: port, client_ip, domain: hello.sni.as_deref(), protocol: Protocol::Tls { version: hello.max_version_name() } },
            None if routes.iter().any(|route| route.tls.is_some()) => ConnectionFacts { local_port: port, client_ip, domain: None, protocol: Protocol::Other },
            None => ConnectionFacts { local_port: port, client_ip, domain: None, protocol: Protocol::NotSniffed },
        };
        routes.iter().find(|route| route.matches(&facts))
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// Every backend the routes' health checks probe.
    pub fn health_probes(&self) -> Vec<ProbeSpec> {
        self.routes.iter().flat_map(|route| route.health_probes()).collect()
    }

    /// The routes the kernel forwards (`forwardingEngine: 'nftables'`), by label.
    pub fn kernel_routes(&self) -> Vec<(Arc<str>, crate::kernel::KernelRoute)> {
        self.routes.iter().filter_map(|route| Some((route.label.clone(), route.kernel.clone()?))).collect()
    }

    /// Every port some route listens on.
    pub fn ports(&self) -> BTreeSet<u16> {
        self.ports.keys().copied().collect()
    }

    pub fn port(&self, port: u16) -> Option<&PortPlan> {
        self.ports.get(&port)
    }

    /// The first route of the connection's port that matches, in matching order.
    pub fn find(&self, facts: &ConnectionFacts<'_>) -> Option<&Arc<Route>> {
        self.ports.get(&facts.local_port)?.routes.iter().find(|route| route.matches(facts))
    }

    /// The first route of the port that takes this HTTP request (passthrough and raw routes never do).
    pub fn find_for_request(&self, facts: &RequestFacts<'_>) -> Option<&Arc<Route>> {
        self.ports.get(&facts.connection.local_port)?.routes.iter().find(|route| route.matches_request(facts))
    }
}

impl Route {
    fn compile(config: &RouteConfig, stats: &RouteStatsRegistry, certs: &CertSlots, backend_states: &BackendRegistry) -> Result<Route, ConfigError> {
        let name = config.name.as_deref();
        let fail = |field: String, reason: String| ConfigError::in_route(config.index, name, &field, reason);

        let mut domains = Vec::with_capacity(config.match_.domains.len());
        for (i, pattern) in config.match_.domains.iter().enumerate() {
            domains.push(DomainPattern::parse(pattern).map_err(|r| fail(format!("match.domains[{i}]"), r))?);
        }
        let client_ip = IpList::parse(&config.match_.client_ip)
            .map_err(|(i, r)| fail(format!("match.clientIp[{i}]"), r))?;
        let allow = IpList::parse(&config.security.ip_allow_list)
            .map_err(|(i, r)| fail(format!("security.ipAllowList[{i}]"), r))?;
        let block = IpList::parse(&config.security.ip_block_list)
            .map_err(|(i, r)| fail(format!("security.ipBlockList[{i}]"), r))?;
        if config.match_.ports.is_empty() {
            return Err(fail("match.ports".into(), "at least one port is required".into()));
        }
        if let Some(i) = config.match_.ports.iter().position(|p| *p == 0) {
            return Err(fail(format!("match.ports[{i}]"), "0 is not a valid port".into()));
        }
        let native = match &config.action.native_response {
            Some(native) => Some(NativeResponse::compile(native).map_err(|r| fail("action.socketHandler".into(), r))?),
            None => None,
        };
        if config.action.targets.is_empty() && native.is_none() && config.action.socket_handler.is_none() && config.action.datagram_handler.is_none() {
            return Err(fail("action.targets".into(), "a forward route needs at least one target".into()));
        }
        let tls = match &config.action.tls {
            Some(tls) => Some(RouteTls::compile(tls, config.action.backend_protocol, config.action.socket_handler.is_some(), certs).map_err(|(f, r)| fail(f, r))?),
            None => None,
        };
        if let Some(version) = config.action.send_proxy_protocol.filter(|v| *v > 2) {
            return Err(fail("action.sendProxyProtocol".into(), format!("{version} is not a PROXY protocol version (1 or 2)")));
        }
        let mut targets = Vec::with_capacity(config.action.targets.len());
        let label: Arc<str> = match (&config.name, &config.id) {
            (Some(name), _) => name.as_str().into(),
            (None, Some(id)) => id.as_str().into(),
            (None, None) => format!("routes[{}]", config.index).into(),
        };
        for (i, target) in config.action.targets.iter().enumerate() {
            let hosts_missing = target.hosts.is_empty() && target.host_function.is_none();
            if hosts_missing || target.hosts.iter().any(|h| h.trim().is_empty()) {
                return Err(fail(format!("action.targets[{i}].host"), "a target needs a non-empty host".into()));
            }
            if target.port == TargetPort::Fixed(0) {
                return Err(fail(format!("action.targets[{i}].port"), "0 is not a valid port".into()));
            }
            let field = |rest: &str| format!("action.targets[{i}].{rest}");
            let match_path = match &target.match_path {
                Some(p) => Some(PathPattern::parse(p).map_err(|r| fail(field("match.path"), r))?),
                None => None,
            };
            let match_methods = match &target.match_methods {
                Some(methods) => Some(
                    methods
                        .iter()
                        .map(|m| Method::from_bytes(m.to_ascii_uppercase().as_bytes()).map_err(|_| fail(field("match.method"), format!("{m:?} is not an HTTP method"))))
                        .collect::<Result<Vec<_>, _>>()?,
                ),
                None => None,
            };
            let (request_headers, response_headers) = compile_templates(&target.headers).map_err(|(f, r)| fail(field(&f), r))?;
            let upstream = match &target.tls {
                Some(own) => {
                    // Nothing of the proxy's own reaches the targets of these routes: a target's
                    // TLS settings there would be silently ignored.
                    if tls.as_ref().is_some_and(|t| t.mode == TlsMode::Passthrough) {
                        return Err(fail(field("tls"), "a passthrough route relays the client's own TLS: the proxy opens no TLS of its own to the target".into()));
                    }
                    if config.action.raw {
                        return Err(fail(field("tls"), "a raw route relays bytes as they come: the proxy opens no TLS of its own to the target".into()));
                    }
                    compile_target_tls(own, config.action.backend_protocol).map_err(|(f, r)| fail(field(f), r))?
                }
                None => tls.as_ref().and_then(|t| t.upstream.clone()),
            };
            if config.action.backend_protocol == BackendProtocol::Http3 && upstream.is_none() {
                return Err(fail(
                    "action.backendProtocol".into(),
                    format!("'http3' speaks QUIC, which is TLS, to the targets: action.targets[{i}] is plain (use action.tls.mode 'terminate-and-reencrypt', or the target's tls)"),
                ));
            }
            if config.action.backend_protocol == BackendProtocol::Http3 && target.send_proxy_protocol.is_some_and(|v| v > 0) {
                return Err(fail(field("sendProxyProtocol"), "a PROXY header goes first on a TCP connection: HTTP/3 targets have none".into()));
            }
            if let Some(version) = target.send_proxy_protocol.filter(|v| *v > 2) {
                return Err(fail(field("sendProxyProtocol"), format!("{version} is not a PROXY protocol version (1 or 2)")));
            }
            let backends = match (target.host_function, target.port) {
                (None, TargetPort::Fixed(port)) => target
                    .hosts
                    .iter()
                    .enumerate()
                    .map(|(h, host)| BackendSlot { target: i, host: h, weight: target.weight.max(1), state: backend_states.state(&label, host, port) })
                    .collect(),
                _ => Vec::new(),
            };
            targets.push(Target {
                backends,
                hosts: target.hosts.iter().map(|host| Arc::from(host.as_str())).collect(),
                host_function: target.host_function,
                port: target.port,
                match_ports: target.match_ports.clone(),
                match_path,
                match_headers: compile_header_matches(&target.match_headers).map_err(|(f, r)| fail(field(&f), r))?,
                match_methods,
                priority: target.priority,
                request_headers,
                response_headers,
                upstream,
                send_proxy_protocol: target.send_proxy_protocol.or(config.action.send_proxy_protocol),
                next_host: AtomicUsize::new(0),
            });
        }
        let path = match &config.match_.path {
            Some(p) => Some(PathPattern::parse(p).map_err(|r| fail("match.path".into(), r))?),
            None => None,
        };
        let kernel = match &config.action.kernel {
            Some(kernel) => Some(crate::kernel::KernelRoute::compile(config, kernel).map_err(|(f, r)| fail(f, r))?),
            None => None,
        };
        let header_matches = compile_header_matches(&config.match_.headers).map_err(|(f, r)| fail(f, r))?;
        let affinity = match &config.action.load_balancing.affinity {
            None => None,
            Some(a) => {
                let key = AffinityKey::parse(&a.key).map_err(|r| fail("action.loadBalancing.affinity.key".into(), r))?;
                let owner = config.id.as_deref().or(config.name.as_deref()).unwrap_or(&label);
                Some(Affinity {
                    key,
                    ttl: Duration::from_secs(a.ttl_seconds.max(1)),
                    on_unknown: if a.reject_unknown { OnUnknown::Reject } else { OnUnknown::Assign },
                    namespace: format!("affinity:{owner}:").into(),
                    max_keys: a.max_keys.max(1),
                })
            }
        };
        let (request_headers, response_headers) = compile_templates(&config.headers).map_err(|(f, r)| fail(f, r))?;
        let http = HttpSettings {
            request_headers,
            response_headers,
            response_timeout: config.action.response_timeout_ms.map_or(DEFAULT_RESPONSE_TIMEOUT, Duration::from_millis),
            websocket: config.action.websocket,
            websocket_settings: {
                let ws = config.action.websocket_options;
                WsSettings {
                    ping_interval: ws.ping_interval_ms.filter(|ms| *ms > 0).map(Duration::from_millis),
                    ping_timeout: ws.ping_timeout_ms.filter(|ms| *ms > 0).map_or(DEFAULT_PING_TIMEOUT, Duration::from_millis),
                    max_message: ws.max_payload_size,
                }
            },
            backend_protocol: config.action.backend_protocol,
            raw: config.action.raw,
            retry: RetryPolicy::from_config(config.action.retry.as_ref()),
            native,
            normalize_path: config.action.normalize_path,
        };
        let security = &config.security;
        let http_security = HttpSecurity::compile(
            config.id.as_deref().or(config.name.as_deref()).unwrap_or(&label),
            security.rate_limit.as_ref(),
            security.basic_auth.as_ref(),
            security.jwt_auth.as_ref(),
            security.forward_authorization,
        )
        .map_err(|(f, r)| fail(f, r))?;
        if http_security.is_some() {
            let field = if security.rate_limit.is_some() { "security.rateLimit" } else if security.basic_auth.is_some() { "security.basicAuth" } else { "security.jwtAuth" };
            let passthrough = config.action.tls.as_ref().is_some_and(|t| t.mode == TlsMode::Passthrough);
            if passthrough || config.action.raw || config.action.socket_handler.is_some() {
                return Err(fail(field.into(), "HTTP security needs requests the proxy reads: not on a passthrough, raw or socket-handler route".into()));
            }
        }
        let route = Route {
            stats: stats.get(&label),
            label,
            name: config.name.clone(),
            id: config.id.clone(),
            socket_handler: config.action.socket_handler,
            datagram_handler: config.action.datagram_handler,
            http_security,
            priority: config.priority,
            domains,
            client_ip,
            tls_versions: config.match_.tls_version.clone(),
            tls,
            targets,
            connect_timeout: config.action.connect_timeout_ms.map_or(DEFAULT_CONNECT_TIMEOUT, Duration::from_millis),
            policy: IpPolicy { allow, block },
            max_connections: config.security.max_connections,
            path,
            header_matches,
            http,
            balancing: Balancing {
                algorithm: config.action.load_balancing.algorithm,
                thresholds: match &config.action.load_balancing.health_check {
                    Some(check) => Thresholds { unhealthy: check.unhealthy_threshold, healthy: check.healthy_threshold, active: true },
                    None => Thresholds::default(),
                },
                health_check: config.action.load_balancing.health_check.clone(),
                turn: AtomicUsize::new(0),
            },
            affinity,
            needs_http: false,
            kernel,
            transport: config.match_.transport,
            udp: config.action.udp.unwrap_or_default(),
            http3: config.action.http3,
        };
        let route = Route { needs_http: route.wants_http(), ..route };
        if route.http3.is_some() {
            check_http3_route(&route).map_err(|(f, r)| fail(f, r))?;
        }
        if route.transport.udp() {
            check_udp_route(config, &route).map_err(|(f, r)| fail(f, r))?;
        } else if config.action.datagram_handler.is_some() {
            return Err(fail("action.datagramHandler".into(), "a datagram handler needs match.transport 'udp' or 'all' (this route takes TCP only)".into()));
        } else if config.action.udp.is_some() {
            return Err(fail("action.udp".into(), "needs match.transport 'udp' or 'all' (this route takes TCP only)".into()));
        }
        // A kernel route's datagrams are the relay's where the kernel cannot forward them, as
        // its connections are: while the kernel forwards, none reaches the relay's socket.
        let route = match &route.kernel {
            Some(kernel) if kernel.protocol != crate::kernel::KernelProtocol::Tcp => Route { transport: Transport::All, ..route },
            _ => route,
        };
        if route.affinity.is_some() && !route.speaks_http() {
            return Err(fail("action.loadBalancing.affinity".into(), "affinity is kept per HTTP request: the route must serve HTTP (terminate TLS, or plain HTTP with domains or HTTP matching)".into()));
        }
        Ok(route)
    }

    /// The ids of the JavaScript functions the route calls (socket handler, host and port functions).
    pub fn function_ids(&self) -> impl Iterator<Item = u32> + '_ {
        let targets = self.targets.iter().flat_map(|t| {
            let port = match t.port {
                TargetPort::Function(f) => Some(f.function),
                _ => None,
            };
            t.host_function.into_iter().chain(port)
        });
        self.socket_handler.into_iter().chain(self.datagram_handler).chain(targets)
    }

    /// Some target's host or port is a JavaScript function.
    pub fn has_target_functions(&self) -> bool {
        self.targets.iter().any(|t| t.host_function.is_some() || matches!(t.port, TargetPort::Function(_)))
    }

    /// The route needs to see requests: it matches on them or rewrites them.
    fn wants_http(&self) -> bool {
        !self.http.raw
            && self.tls.is_none()
            && (self.path.is_some()
                || self.http.native.is_some()
                || self.http_security.is_some()
                || !self.header_matches.is_empty()
                || !self.http.request_headers.is_empty()
                || !self.http.response_headers.is_empty()
                || self.targets.iter().any(|t| {
                    // A target's own TLS carries the requests the HTTP engine forwards (TLS origination).
                    t.match_path.is_some() || !t.match_headers.is_empty() || t.match_methods.is_some() || !t.request_headers.is_empty() || !t.response_headers.is_empty() || t.upstream.is_some()
                }))
    }

    /// Plain requests take routes without TLS; requests over terminated TLS take terminating routes.
    pub fn matches_request(&self, facts: &RequestFacts<'_>) -> bool {
        let over_tls = matches!(facts.connection.protocol, Protocol::Tls { .. });
        let tls_fits = match &self.tls {
            None => !over_tls,
            Some(tls) => over_tls && tls.terminates(),
        };
        !self.http.raw
            && tls_fits
            && self.matches(&facts.connection)
            && self.path.as_ref().is_none_or(|p| p.matches(facts.path))
            && headers_match(&self.header_matches, facts.headers)
    }

    pub fn matches(&self, facts: &ConnectionFacts<'_>) -> bool {
        if self.tls.is_some() && !matches!(facts.protocol, Protocol::Tls { .. } | Protocol::NotSniffed) {
            return false;
        }
        // A route that needs requests never gets bytes relayed raw past its checks.
        if self.needs_http && facts.protocol == Protocol::Other {
            return false;
        }
        if !self.domains.is_empty() {
            match facts.domain {
                Some(domain) if self.domains.iter().any(|p| p.matches(domain)) => {}
                _ => return false,
            }
        }
        if !self.client_ip.is_empty() && !self.client_ip.matches(facts.client_ip) {
            return false;
        }
        if !self.tls_versions.is_empty() {
            match facts.protocol {
                Protocol::Tls { version: Some(v) } if self.tls_versions.iter().any(|w| w == v) => {}
                _ => return false,
            }
        }
        true
    }

    /// The highest-priority target whose `match` fits the connection, else the highest-priority one
    /// without a `match`; equal priorities keep array order. The static hosts of the targets of
    /// that class and priority form the backend set the route's algorithm picks from.
    pub fn select_target(&self, local_port: u16, client_ip: IpAddr) -> Option<SelectedTarget<'_>> {
        self.select_target_for(local_port, client_ip, None)
    }

    /// As `select_target`, with the request's path, method and headers for `targets[].match`.
    pub fn select_target_for(&self, local_port: u16, client_ip: IpAddr, request: Option<&RequestFacts<'_>>) -> Option<SelectedTarget<'_>> {
        self.select(local_port, client_ip, request, None)
    }

    /// The backend `host:port` of the set, when it is there and may take traffic (affinity).
    pub fn select_bound(&self, local_port: u16, client_ip: IpAddr, request: Option<&RequestFacts<'_>>, backend: &str) -> Option<SelectedTarget<'_>> {
        self.select(local_port, client_ip, request, Some(backend))
    }

    fn select(&self, local_port: u16, client_ip: IpAddr, request: Option<&RequestFacts<'_>>, bound: Option<&str>) -> Option<SelectedTarget<'_>> {
        let class = |want_match: bool| move |t: &&Target| if want_match { t.has_match() && t.fits(local_port, request) } else { !t.has_match() };
        let best = |want_match: bool| {
            self.targets.iter().filter(class(want_match)).fold(None::<&Target>, |best, t| match best {
                Some(b) if b.priority >= t.priority => Some(b),
                _ => Some(t),
            })
        };
        let (first, want_match) = match self.targets.as_slice() {
            // A lone target without a `match` is the only choice.
            [only] if !only.has_match() => (only, false),
            _ => match best(true) {
                Some(target) => (target, true),
                None => (best(false)?, false),
            },
        };
        if !first.backends.is_empty() {
            let priority = first.priority;
            let set = self
                .targets
                .iter()
                .filter(class(want_match))
                .filter(move |t| t.priority == priority)
                .flat_map(|t| t.backends.iter());
            let balancing = &self.balancing;
            let (position, lease) = match bound {
                None => balance::pick(set.clone(), balancing.algorithm, balancing.thresholds, &balancing.turn, client_ip)?,
                Some(backend) => balance::pick_bound(set.clone(), backend, balancing.thresholds)?,
            };
            let slot = set.clone().nth(position)?;
            let target = self.targets.get(slot.target)?;
            let TargetPort::Fixed(port) = target.port else { return None };
            return Some(SelectedTarget {
                host: target.hosts.get(slot.host)?,
                port,
                functions: None,
                hosts: &target.hosts,
                turn: slot.host,
                request_headers: &target.request_headers,
                response_headers: &target.response_headers,
                lease: Some(lease),
                send_proxy_protocol: target.send_proxy_protocol,
                upstream: target.upstream.as_deref(),
            });
        }
        if bound.is_some() {
            return None;
        }
        let target = first;
        let turn = target.next_host.fetch_add(1, Ordering::Relaxed);
        let host = match target.host_function {
            Some(_) => &*NO_HOST,
            None => target.hosts.get(turn % target.hosts.len())?,
        };
        let (port, port_function) = match target.port {
            TargetPort::Fixed(port) => (port, None),
            TargetPort::Preserve(_) => (local_port, None),
            TargetPort::Function(f) => (0, Some(f.function)),
        };
        let functions = (target.host_function.is_some() || port_function.is_some())
            .then_some(TargetFunctions { host: target.host_function, port: port_function });
        Some(SelectedTarget {
            host,
            port,
            functions,
            hosts: &target.hosts,
            turn,
            request_headers: &target.request_headers,
            response_headers: &target.response_headers,
            lease: None,
            send_proxy_protocol: target.send_proxy_protocol,
            upstream: target.upstream.as_deref(),
        })
    }

    /// Its balanced backends, for `getStatistics().backends`.
    pub fn backend_statuses(&self) -> Vec<BackendStatus> {
        self.targets.iter().flat_map(|t| t.backends.iter().map(|b| BackendStatus::from(&*b.state))).collect()
    }

    /// What active health checks probe for this route (none without `healthCheck`).
    pub fn health_probes(&self) -> Vec<ProbeSpec> {
        let Some(check) = &self.balancing.health_check else { return Vec::new() };
        let speaks_http = self.speaks_http();
        // Each backend is probed the way its target is reached (its own TLS or the route's).
        let kind = |t: &Target| {
            if speaks_http {
                ProbeKind::Http { path: check.path.clone(), tls: t.upstream.as_ref().map(|u| u.pick(true)) }
            } else {
                ProbeKind::Tcp
            }
        };
        self.targets
            .iter()
            .flat_map(|t| t.backends.iter().map(move |b| (t, b)))
            .map(|(t, b)| ProbeSpec {
                route: self.label.clone(),
                state: b.state.clone(),
                kind: kind(t),
                interval: Duration::from_millis(check.interval_ms.max(1)),
                timeout: Duration::from_millis(check.timeout_ms.max(1)),
                thresholds: self.balancing.thresholds,
            })
            .collect()
    }

    /// What the route does with a connection, in a word: `tls-passthrough`, `tls-terminate`,
    /// `http` (requests proxied) or `tcp` (bytes relayed), `socket-handler`.
    pub fn kind(&self) -> &'static str {
        match (&self.tls, self.socket_handler) {
            (_, Some(_)) => "socket-handler",
            (Some(tls), _) if tls.terminates() => "tls-terminate",
            (Some(_), _) => "tls-passthrough",
            (None, _) if self.speaks_http() => "http",
            (None, _) => "tcp",
        }
    }

    /// Its traffic reaches the backends as HTTP requests (not as relayed bytes).
    fn speaks_http(&self) -> bool {
        match &self.tls {
            Some(tls) => tls.terminates() && self.socket_handler.is_none(),
            None => !self.http.raw && (self.wants_http() || !self.domains.is_empty()),
        }
    }
}

/// On failure: the field (`match.headers.x-version`) and why.
fn compile_header_matches(items: &[HeaderMatchConfig]) -> Result<Vec<HeaderMatch>, (String, String)> {
    items
        .iter()
        .map(|item| {
            let field = format!("match.headers.{}", item.name);
            let name = HeaderName::from_bytes(item.name.as_bytes()).map_err(|_| (field.clone(), format!("{:?} is not a valid header name", item.name)))?;
            let value = match (&item.value, &item.regex) {
                (Some(exact), None) => HeaderValueMatch::Exact(exact.clone()),
                (None, Some(regex)) => HeaderValueMatch::Regex(compile_js_regex(regex).map_err(|reason| (field.clone(), reason))?),
                _ => return Err((field, "expected either an exact value or a RegExp".into())),
            };
            Ok(HeaderMatch { name, value })
        })
        .collect()
}

/// On failure: the field (`headers.request.X-Foo`) and why.
fn compile_templates(config: &HeaderTemplatesConfig) -> Result<(Vec<HeaderTemplate>, Vec<HeaderTemplate>), (String, String)> {
    let compile = |items: &[NameValue], kind: &str| {
        items
            .iter()
            .map(|nv| HeaderTemplate::parse(&nv.name, &nv.value).map_err(|r| (format!("headers.{kind}.{}", nv.name), r)))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok((compile(&config.request, "request")?, compile(&config.response, "response")?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ActionConfig, MatchConfig, PreserveKeyword, RouteSecurityConfig, TargetConfig};

    fn route(index: usize, name: &str, ports: &[u16], domains: &[&str], priority: f64) -> RouteConfig {
        RouteConfig {
            index,
            name: Some(name.into()),
            id: None,
            priority,
            match_: MatchConfig {
                ports: ports.to_vec(),
                domains: domains.iter().map(|d| d.to_string()).collect(),
                client_ip: vec![],
                tls_version: vec![],
                path: None,
                headers: vec![],
                transport: Default::default(),
            },
            action: ActionConfig {
                tls: None,
                targets: vec![target("10.0.0.1", 80)],
                connect_timeout_ms: None,
                response_timeout_ms: None,
                websocket: true,
                websocket_options: Default::default(),
                backend_protocol: BackendProtocol::Auto,
                raw: false,
                retry: None,
                native_response: None,
                socket_handler: None,
                datagram_handler: None,
                send_proxy_protocol: None,
                load_balancing: Default::default(),
                normalize_path: false,
                kernel: None,
                udp: None,
                http3: None,
            },
            security: RouteSecurityConfig::default(),
            headers: HeaderTemplatesConfig::default(),
        }
    }

    fn target(host: &str, port: u16) -> TargetConfig {
        TargetConfig {
            hosts: vec![host.into()],
            host_function: None,
            port: TargetPort::Fixed(port),
            match_ports: None,
            match_path: None,
            match_headers: vec![],
            match_methods: None,
            priority: 0.0,
            headers: HeaderTemplatesConfig::default(),
            weight: 1,
            tls: None,
            send_proxy_protocol: None,
        }
    }

    fn facts(port: u16, domain: Option<&str>) -> ConnectionFacts<'_> {
        ConnectionFacts { local_port: port, client_ip: "127.0.0.1".parse().unwrap(), domain, protocol: Protocol::Http }
    }

    fn table(routes: &[RouteConfig]) -> RouteTable {
        RouteTable::compile(routes, &RouteStatsRegistry::default(), &CertSlots::default(), &BackendRegistry::default()).expect("valid table")
    }

    fn winner(t: &RouteTable, port: u16, domain: Option<&str>) -> Option<String> {
        t.find(&facts(port, domain)).map(|r| r.label.to_string())
    }

    #[test]
    fn higher_priority_wins_and_equal_priority_keeps_array_order() {
        let t = table(&[
            route(0, "first", &[80], &["*.example.com"], 0.0),
            route(1, "second", &[80], &["*.example.com"], 0.0),
            route(2, "urgent", &[80], &["api.example.com"], 10.0),
        ]);
        assert_eq!(winner(&t, 80, Some("api.example.com")).as_deref(), Some("urgent"));
        assert_eq!(winner(&t, 80, Some("www.example.com")).as_deref(), Some("first"));
    }

    #[test]
    fn a_route_with_domains_never_matches_a_connection_without_one() {
        let t = table(&[route(0, "named", &[443], &["a.com"], 0.0), route(1, "any", &[443], &[], 0.0)]);
        assert_eq!(winner(&t, 443, None).as_deref(), Some("any"));
        assert_eq!(winner(&t, 443, Some("A.COM.")).as_deref(), Some("named"));
    }

    #[test]
    fn ports_partition_the_routes() {
        let t = table(&[route(0, "a", &[80, 81], &[], 0.0), route(1, "b", &[82], &[], 0.0)]);
        assert_eq!(winner(&t, 81, None).as_deref(), Some("a"));
        assert_eq!(winner(&t, 82, None).as_deref(), Some("b"));
        assert_eq!(winner(&t, 83, None), None);
        assert!(!t.port(80).unwrap().needs_client_data);
    }

    #[test]
    fn client_ip_and_tls_version_restrict_matches() {
        let mut r = route(0, "lan", &[443], &[], 0.0);
        r.match_.client_ip = vec!["10.0.0.0/8".into()];
        let mut v13 = route(1, "tls13", &[443], &[], 0.0);
        v13.match_.tls_version = vec!["TLSv1.3".into()];
        let t = table(&[r, v13]);
        let mut f = facts(443, None);
        f.client_ip = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(t.find(&f).map(|r| &*r.label), Some("lan"));
        f.client_ip = "192.168.0.1".parse().unwrap();
        assert!(t.find(&f).is_none());
        f.protocol = Protocol::Tls { version: Some("TLSv1.3") };
        assert_eq!(t.find(&f).map(|r| &*r.label), Some("tls13"));
        assert!(t.port(443).unwrap().needs_client_data);
    }

    #[test]
    fn passthrough_routes_only_take_tls() {
        let mut r = route(0, "pt", &[443], &[], 0.0);
        r.action.tls = Some(TlsConfig { mode: TlsMode::Passthrough, certificate: None, versions: vec![], reject_unauthorized: true, acme: None });
        let t = table(&[r]);
        assert!(t.find(&facts(443, None)).is_none());
        let mut f = facts(443, None);
        f.protocol = Protocol::Tls { version: None };
        assert!(t.find(&f).is_some());
    }

    #[test]
    fn host_arrays_rotate_and_preserve_keeps_the_port() {
        let mut r = route(0, "rr", &[8000], &[], 0.0);
        r.action.targets[0].hosts = vec!["a".into(), "b".into()];
        r.action.targets[0].port = TargetPort::Preserve(PreserveKeyword::Preserve);
        let t = table(&[r]);
        let route = t.find(&facts(8000, None)).unwrap();
        let picks: Vec<_> = (0..4).map(|_| route.select_target(8000, "127.0.0.1".parse().unwrap()).unwrap()).collect();
        assert_eq!(picks.iter().map(|p| &**p.host).collect::<Vec<_>>(), vec!["a", "b", "a", "b"]);
        assert!(picks.iter().all(|p| p.port == 8000));
    }

    #[test]
    fn targets_with_a_matching_port_win_over_the_default() {
        let mut r = route(0, "t", &[80, 81], &[], 0.0);
        let mut special = target("special", 9000);
        special.match_ports = Some(vec![81]);
        r.action.targets.push(special);
        let t = table(&[r]);
        let route = t.find(&facts(81, None)).unwrap();
        assert_eq!(&**route.select_target(81, "127.0.0.1".parse().unwrap()).unwrap().host, "special");
        assert_eq!(&**route.select_target(80, "127.0.0.1".parse().unwrap()).unwrap().host, "10.0.0.1");
    }

    #[test]
    fn bad_patterns_are_config_errors_naming_the_route() {
        let mut r = route(4, "api", &[80], &[], 0.0);
        r.security.ip_allow_list = vec!["10.0.0.0/8".into(), "10.0.0.0/33".into()];
        let err = RouteTable::compile(&[r], &RouteStatsRegistry::default(), &CertSlots::default(), &BackendRegistry::default()).unwrap_err();
        assert!(err.message.starts_with("routes[4] \"api\": security.ipAllowList[1]: "), "{}", err.message);
    }

    fn exact(name: &str, value: &str) -> HeaderMatchConfig {
        HeaderMatchConfig { name: name.into(), value: Some(value.into()), regex: None }
    }

    fn regex(name: &str, source: &str, flags: &str) -> HeaderMatchConfig {
        HeaderMatchConfig { name: name.into(), value: None, regex: Some(RegexConfig { source: source.into(), flags: flags.into() }) }
    }

    fn compile_err(r: RouteConfig) -> String {
        RouteTable::compile(&[r], &RouteStatsRegistry::default(), &CertSlots::default(), &BackendRegistry::default()).unwrap_err().message
    }

    /// Which route of `t` takes a GET / on port 80 with these headers.
    fn request_winner(t: &RouteTable, headers: &[(&str, &str)]) -> Option<String> {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), http::HeaderValue::from_str(value).unwrap());
        }
        let request = RequestFacts { connection: facts(80, Some("a.test")), path: "/", method: &Method::GET, headers: &map };
        t.find_for_request(&request).map(|r| r.label.to_string())
    }

    fn target_tls(mode: TlsMode) -> TargetTlsConfig {
        TargetTlsConfig { mode, ca: None, versions: vec![], reject_unauthorized: true }
    }

    /// A re-encrypting route whose certificate comes from ACME (so the test needs no PEM).
    fn reencrypting(r: &mut RouteConfig) {
        r.action.tls = Some(TlsConfig {
            mode: TlsMode::TerminateAndReencrypt,
            certificate: None,
            versions: vec![],
            reject_unauthorized: true,
            acme: Some(crate::config::AcmeSettings {
                cert_name: "t".into(),
                domains: vec!["a.test".into()],
                email: "ops@a.test".into(),
                directory_url: "https://acme.invalid/directory".into(),
                directory_ca_file: None,
                certificate_store: "/nonexistent".into(),
                port: 80,
                renew_threshold_days: 30,
                auto_renew: false,
                renew_check_interval_secs: 3600,
                custom_provisioning: false,
            }),
        });
    }

    #[test]
    fn regexp_header_values_are_tested_and_exact_ones_stay_exact() {
        let mut v2 = route(0, "v2", &[80], &[], 0.0);
        v2.match_.headers = vec![regex("X-Version", "^v2", "")];
        let mut loud = route(1, "loud", &[80], &[], 0.0);
        loud.match_.headers = vec![regex("x-mode", "^loud$", "gi")];
        let mut literal = route(2, "exact", &[80], &[], 0.0);
        literal.match_.headers = vec![exact("x-mode", "^quiet$")];
        let t = table(&[v2, loud, literal]);
        assert_eq!(request_winner(&t, &[("x-version", "v2.1")]).as_deref(), Some("v2"));
        assert_eq!(request_winner(&t, &[("x-version", "v1"), ("x-version", "v2")]).as_deref(), Some("v2"));
        assert_eq!(request_winner(&t, &[("x-version", "av2")]), None);
        assert_eq!(request_winner(&t, &[("x-mode", "LOUD")]).as_deref(), Some("loud"));
        // A string is compared as it is, never as a pattern.
        assert_eq!(request_winner(&t, &[("x-mode", "quiet")]), None);
        assert_eq!(request_winner(&t, &[("x-mode", "^quiet$")]).as_deref(), Some("exact"));
        assert!(t.port(80).unwrap().serves_http);
    }

    #[test]
    fn regexp_flags_follow_javascript() {
        let compiled = |source: &str, flags: &str| compile_js_regex(&RegexConfig { source: source.into(), flags: flags.into() }).unwrap();
        // Without `u`, \d and \w are ASCII only (as in JavaScript); with it, Unicode.
        assert!(!compiled(r"^\w+$", "").is_match("é".as_bytes()));
        assert!(compiled(r"^\w+$", "u").is_match("é".as_bytes()));
        assert!(compiled(r"^a.b$", "s").is_match(b"a\nb"));
        assert!(!compiled(r"^a.b$", "").is_match(b"a\nb"));
        assert!(compiled(r"^b$", "m").is_match(b"a\nb"));
        // JavaScript sources escape `/`; named groups use JavaScript's spelling.
        assert!(compiled(r"^a\/(?<rest>b)$", "").is_match(b"a/b"));
        // A literal beyond ASCII matches its UTF-8 bytes either way.
        assert!(compiled("^café$", "").is_match("café".as_bytes()));
        assert!(compiled("^CAFÉ$", "iu").is_match("café".as_bytes()));
        // Bytes that are not UTF-8 (obs-text) are matched, not refused.
        assert!(compiled(r"^x.y$", "").is_match(b"x\xffy"));
    }

    #[test]
    fn a_regexp_the_engine_cannot_run_is_a_config_error_naming_the_field() {
        let mut r = route(0, "x", &[80], &[], 0.0);
        r.match_.headers = vec![regex("x-version", "^(?=v)v2", "")];
        let err = compile_err(r);
        assert!(err.starts_with("routes[0] \"x\": match.headers.x-version: /^(?=v)v2/ is not supported by the engine's regex matcher: look-around"), "{err}");
        assert!(!err.contains('\n'), "{err}");
        let mut r = route(0, "x", &[80], &[], 0.0);
        r.action.targets[0].match_headers = vec![regex("x-a", r"(a)\1", "")];
        let err = compile_err(r);
        assert!(err.starts_with("routes[0] \"x\": action.targets[0].match.headers.x-a: /(a)\\1/ is not supported"), "{err}");
    }

    #[test]
    fn a_target_regexp_picks_the_target() {
        let mut r = route(0, "t", &[80], &[], 0.0);
        let mut beta = target("beta", 81);
        beta.match_headers = vec![regex("x-channel", "^beta(-.*)?$", "i")];
        r.action.targets.push(beta);
        let t = table(&[r]);
        let route = t.find(&facts(80, None)).unwrap();
        let pick = |value: &str| {
            let mut map = HeaderMap::new();
            map.insert("x-channel", http::HeaderValue::from_str(value).unwrap());
            let request = RequestFacts { connection: facts(80, None), path: "/", method: &Method::GET, headers: &map };
            route.select_target_for(80, "127.0.0.1".parse().unwrap(), Some(&request)).unwrap().host.to_string()
        };
        assert_eq!(pick("Beta-2"), "beta");
        assert_eq!(pick("stable"), "10.0.0.1");
    }

    #[test]
    fn a_target_s_own_tls_wins_over_the_route_s() {
        let mut r = route(0, "re", &[443], &["a.test"], 0.0);
        reencrypting(&mut r);
        let mut plain = target("plain", 80);
        plain.match_ports = Some(vec![443]);
        plain.priority = 2.0;
        plain.tls = Some(target_tls(TlsMode::Terminate));
        r.action.targets.push(plain);
        let t = table(&[r]);
        let route = &t.routes()[0];
        let ip = "127.0.0.1".parse().unwrap();
        // The plain target has a match (port 443) and wins there; elsewhere the inheriting one.
        let chosen = route.select_target(443, ip).unwrap();
        assert_eq!((&**chosen.host, chosen.upstream_tls(false).is_some()), ("plain", false));
        let inherited = route.select_target(444, ip).unwrap();
        assert_eq!(&**inherited.host, "10.0.0.1");
        assert!(inherited.upstream_tls(false).is_some() && inherited.upstream_tls(true).is_some());
        let h1 = inherited.upstream_tls(true).unwrap();
        assert_eq!(h1.alpn_protocols, vec![ALPN_HTTP11.to_vec()]);
    }

    #[test]
    fn a_reencrypting_target_on_a_plain_route_gets_tls_and_makes_the_route_serve_http() {
        let mut r = route(0, "origin", &[80], &[], 0.0);
        r.action.targets[0].tls = Some(TargetTlsConfig { versions: vec!["TLSv1.3".into()], ..target_tls(TlsMode::TerminateAndReencrypt) });
        let t = table(&[r]);
        let plan = t.port(80).unwrap();
        assert!(plan.serves_http && plan.needs_client_data);
        let chosen = t.routes()[0].select_target(80, "127.0.0.1".parse().unwrap()).unwrap();
        assert!(chosen.upstream_tls(false).is_some());
        // A `terminate` target there changes nothing: the route still relays raw TCP.
        let mut r = route(0, "plain", &[80], &[], 0.0);
        r.action.targets[0].tls = Some(target_tls(TlsMode::Terminate));
        assert!(!table(&[r]).port(80).unwrap().serves_http);
    }

    #[test]
    fn health_checks_reach_each_target_the_way_requests_do() {
        let mut r = route(0, "hc", &[80], &["a.test"], 0.0);
        r.action.load_balancing.health_check =
            Some(crate::config::HealthCheckConfig { path: "/health".into(), interval_ms: 1000, timeout_ms: 500, unhealthy_threshold: 3, healthy_threshold: 2 });
        let mut secure = target("10.0.0.2", 443);
        secure.tls = Some(target_tls(TlsMode::TerminateAndReencrypt));
        r.action.targets.push(secure);
        let probes = table(&[r]).health_probes();
        let tls_of = |host: &str| match &probes.iter().find(|p| p.state.host == host).unwrap().kind {
            ProbeKind::Http { tls, .. } => tls.as_ref().map(|config| config.alpn_protocols.clone()),
            ProbeKind::Tcp => panic!("an HTTP route is probed over HTTP"),
        };
        assert_eq!(tls_of("10.0.0.1"), None);
        assert_eq!(tls_of("10.0.0.2"), Some(vec![ALPN_HTTP11.to_vec()]));
    }

    #[test]
    fn target_tls_the_proxy_cannot_honour_is_a_config_error_naming_the_target() {
        let mut r = route(0, "x", &[443], &[], 0.0);
        r.action.targets[0].tls = Some(target_tls(TlsMode::Passthrough));
        assert!(compile_err(r).starts_with("routes[0] \"x\": action.targets[0].tls.mode: a target cannot pass TLS through"));
        let mut r = route(0, "x", &[443], &[], 0.0);
        r.action.tls = Some(TlsConfig { mode: TlsMode::Passthrough, certificate: None, versions: vec![], reject_unauthorized: true, acme: None });
        r.action.targets[0].tls = Some(target_tls(TlsMode::TerminateAndReencrypt));
        assert!(compile_err(r).starts_with("routes[0] \"x\": action.targets[0].tls: a passthrough route"));
        let mut r = route(0, "x", &[80], &[], 0.0);
        r.action.raw = true;
        r.action.targets[0].tls = Some(target_tls(TlsMode::TerminateAndReencrypt));
        assert!(compile_err(r).starts_with("routes[0] \"x\": action.targets[0].tls: a raw route"));
        let mut r = route(0, "x", &[80], &[], 0.0);
        r.action.targets[0].tls = Some(TargetTlsConfig { versions: vec!["TLSv1.0".into()], ..target_tls(TlsMode::TerminateAndReencrypt) });
        assert!(compile_err(r).starts_with("routes[0] \"x\": action.targets[0].tls: TLSv1.0 and TLSv1.1 are not supported"));
    }

    #[test]
    fn a_target_s_proxy_protocol_version_wins_over_the_route_s() {
        let mut r = route(0, "pp", &[80], &[], 0.0);
        r.action.send_proxy_protocol = Some(1);
        let mut v2 = target("v2", 81);
        v2.match_ports = Some(vec![81]);
        v2.send_proxy_protocol = Some(2);
        let mut none = target("none", 82);
        none.match_ports = Some(vec![82]);
        none.send_proxy_protocol = Some(0);
        r.action.targets.extend([v2, none]);
        r.match_.ports = vec![80, 81, 82];
        let t = table(&[r]);
        let compiled = &t.routes()[0];
        let ip = "127.0.0.1".parse().unwrap();
        assert_eq!(compiled.select_target(80, ip).unwrap().send_proxy_protocol, Some(1));
        assert_eq!(compiled.select_target(81, ip).unwrap().send_proxy_protocol, Some(2));
        assert_eq!(compiled.select_target(82, ip).unwrap().send_proxy_protocol, Some(0));
        let mut r = route(0, "pp", &[80], &[], 0.0);
        r.action.targets[0].send_proxy_protocol = Some(3);
        assert!(compile_err(r).starts_with("routes[0] \"pp\": action.targets[0].sendProxyProtocol: 3 is not"));
    }

    #[test]
    fn block_beats_allow() {
        let mut r = route(0, "s", &[80], &[], 0.0);
        r.security.ip_allow_list = vec!["10.0.0.0/8".into()];
        r.security.ip_block_list = vec!["10.0.0.5".into()];
        let t = table(&[r]);
        let route = &t.routes()[0];
        assert!(route.policy.admits("10.0.0.4".parse().unwrap()));
        assert!(!route.policy.admits("10.0.0.5".parse().unwrap()));
        assert!(!route.policy.admits("11.0.0.1".parse().unwrap()));
    }
}
