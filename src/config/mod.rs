//! The serde model of the configuration the TypeScript wrapper hands the engine (`INativeConfig` in
//! `ts/models/native-config.ts`): shapes and defaults only. The wrapper has already normalised the
//! user's options; semantic checks that need compiled patterns happen in `routing::table`.
//! Knows nothing of napi, sockets or routing.

use std::fmt;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EngineConfig {
    pub routes: Vec<RouteConfig>,
    pub options: EngineOptions,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EngineOptions {
    pub initial_data_timeout_ms: u64,
    pub socket_timeout_ms: u64,
    pub inactivity_timeout_ms: u64,
    pub max_connection_lifetime_ms: u64,
    pub graceful_shutdown_timeout_ms: u64,
    pub max_connections_per_ip: u32,
    pub connection_rate_limit_per_minute: u32,
    pub no_delay: bool,
    pub keep_alive: bool,
    pub keep_alive_initial_delay_ms: u64,
    pub max_pending_data_size: usize,
    pub worker_threads: Option<usize>,
    pub enable_detailed_logging: bool,
    /// The wrapper has a `logger` function: log entries go to it rather than to standard error.
    #[serde(default)]
    pub logger: bool,
    pub max_header_size: usize,
    pub header_timeout_ms: u64,
    pub http2_max_concurrent_streams: u32,
    /// Bound on each call into JavaScript (function targets).
    pub js_call_timeout_ms: u64,
    /// Connections from `proxyIps` must begin with a PROXY header (v1 or v2).
    pub accept_proxy_protocol: bool,
    /// Trusted balancers: their PROXY headers and X-Forwarded-* headers are believed.
    pub proxy_ips: Vec<String>,
    /// PROXY header version sent to backends by default (0 = none, 1, 2).
    pub send_proxy_protocol: u8,
    pub default_security: DefaultSecurity,
    /// Shared session-affinity store across replicas.
    #[serde(default)]
    pub redis: Option<RedisOptions>,
    /// Keep a client's own `X-Forwarded-*`, `Forwarded` and `X-Real-IP` when its peer is in
    /// `proxyIps` (otherwise they are replaced even from trusted peers).
    #[serde(default)]
    pub trust_forwarded_headers: bool,
    /// How long a client connection may sit idle between HTTP requests.
    #[serde(default = "default_keep_alive_timeout_ms")]
    pub http_keep_alive_timeout_ms: u64,
    /// `metrics.prometheus`: where the Prometheus exposition is served while started.
    #[serde(default)]
    pub prometheus: Option<PrometheusOptions>,
    /// `admin`: the operator's listener (status page, status API, metrics, health).
    #[serde(default)]
    pub admin: Option<AdminOptions>,
    /// `accessLog`, when enabled.
    #[serde(default)]
    pub access_log: Option<AccessLogOptions>,
}

fn default_keep_alive_timeout_ms() -> u64 {
    120_000
}

/// How many keys (affinity values, rate-limit keys) a route keeps in memory by default.
pub const DEFAULT_MAX_KEYS: usize = 100_000;

fn default_max_keys() -> usize {
    DEFAULT_MAX_KEYS
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PrometheusOptions {
    pub port: u16,
    pub host: String,
    /// The one path answered (`/metrics`).
    pub path: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AdminOptions {
    pub port: u16,
    pub host: String,
    /// Required as `Authorization: Bearer <token>` on every path but `/healthz`.
    pub token: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AccessLogOptions {
    /// The file lines are appended to; standard output without one.
    pub path: Option<String>,
    /// `json` or `combined`.
    pub format: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RedisOptions {
    pub url: String,
    pub key_prefix: String,
    /// Base64 of 32 bytes: private keys and ACME credentials in Redis are sealed with it.
    #[serde(default)]
    pub encryption_key: Option<String>,
    /// How often a replica looks for certificates other replicas stored (pub/sub tells it at once).
    #[serde(default = "default_sync_interval_ms")]
    pub sync_interval_ms: u64,
}

fn default_sync_interval_ms() -> u64 {
    5000
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DefaultSecurity {
    pub ip_allow_list: Vec<String>,
    pub ip_block_list: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteConfig {
    /// Position in the user's `routes` array, so errors and metrics name the route the user wrote.
    pub index: usize,
    pub name: Option<String>,
    pub id: Option<String>,
    pub priority: f64,
    #[serde(rename = "match")]
    pub match_: MatchConfig,
    pub action: ActionConfig,
    pub security: RouteSecurityConfig,
    /// `headers.request` / `headers.response` templates applied to every request of the route.
    pub headers: HeaderTemplatesConfig,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderTemplatesConfig {
    pub request: Vec<NameValue>,
    pub response: Vec<NameValue>,
}

/// A header name with a value (a template, or a header of a response the engine writes).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameValue {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MatchConfig {
    pub ports: Vec<u16>,
    /// Which sockets of the ports the route takes: TCP (the default), UDP, or both.
    #[serde(default)]
    pub transport: Transport,
    pub domains: Vec<String>,
    pub client_ip: Vec<String>,
    pub tls_version: Vec<String>,
    pub path: Option<String>,
    /// Names compare case-insensitively.
    pub headers: Vec<HeaderMatchConfig>,
}

/// One `match.headers` entry: an exact value, or a JavaScript RegExp the value is tested against.
/// Exactly one of `value` and `regex` is set.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatchConfig {
    pub name: String,
    pub value: Option<String>,
    pub regex: Option<RegexConfig>,
}

/// A JavaScript RegExp as `source` and `flags` (`/^v2/i` → `{ source: "^v2", flags: "i" }`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegexConfig {
    pub source: String,
    pub flags: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ActionConfig {
    pub tls: Option<TlsConfig>,
    pub targets: Vec<TargetConfig>,
    pub connect_timeout_ms: Option<u64>,
    /// Time from sending a request upstream to its response head (504 when over).
    pub response_timeout_ms: Option<u64>,
    pub websocket: bool,
    /// `action.websocket` ping and size settings (all absent: a plain byte tunnel).
    #[serde(default)]
    pub websocket_options: WebSocketConfig,
    pub backend_protocol: BackendProtocol,
    /// Relay bytes even when the traffic is HTTP (no per-request routing or rewriting).
    pub raw: bool,
    pub retry: Option<RetryConfig>,
    /// A response the engine writes itself instead of forwarding (the native side of
    /// `SocketHandlers.httpRedirect` / `httpResponse` / `httpBlock`).
    pub native_response: Option<NativeResponseConfig>,
    /// The wrapper's id of the route's `socketHandler` function (type `socket-handler`).
    pub socket_handler: Option<u32>,
    /// The wrapper's id of the route's `datagramHandler` function (a `socket-handler` route
    /// taking UDP).
    #[serde(default)]
    pub datagram_handler: Option<u32>,
    /// PROXY header version towards this route's backends (0 = none, 1, 2); `None` = the option's.
    pub send_proxy_protocol: Option<u8>,
    #[serde(default)]
    pub load_balancing: LoadBalancingConfig,
    /// Forward the normalised path (the one matching saw) instead of the path as sent.
    #[serde(default)]
    pub normalize_path: bool,
    /// `forwardingEngine: 'nftables'`: the kernel forwards the route's flows (`kernel/`).
    #[serde(default)]
    pub kernel: Option<KernelConfig>,
    /// `action.udp` of a route whose transport includes UDP.
    #[serde(default)]
    pub udp: Option<UdpConfig>,
    /// `action.http3` when enabled: the route is also served over QUIC on its ports.
    #[serde(default)]
    pub http3: Option<Http3Config>,
}

/// `action.http3` of a terminating route, with its defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Http3Config {
    /// `ma=` of the `Alt-Svc` the route's HTTP/1.1 and HTTP/2 responses carry, in seconds.
    pub alt_svc_max_age: u32,
}

/// `action.nftables` of a route with `forwardingEngine: 'nftables'`, with its defaults.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KernelConfig {
    /// `tcp`, `udp` or `all`.
    pub protocol: String,
    pub preserve_source_ip: bool,
    pub max_rate: Option<String>,
    pub priority: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WebSocketConfig {
    pub ping_interval_ms: Option<u64>,
    pub ping_timeout_ms: Option<u64>,
    pub max_payload_size: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadBalancingConfig {
    pub algorithm: BalanceAlgorithm,
    pub health_check: Option<HealthCheckConfig>,
    #[serde(default)]
    pub affinity: Option<AffinityConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AffinityConfig {
    /// `ip`, `header:NAME` or `cookie:NAME`.
    pub key: String,
    pub ttl_seconds: u64,
    /// A value never bound before: balance and bind it, or answer 400.
    pub reject_unknown: bool,
    /// Bindings kept in memory at most (least recently used evicted first).
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BalanceAlgorithm {
    #[default]
    RoundRobin,
    LeastConnections,
    IpHash,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthCheckConfig {
    /// Probed with GET over HTTP on HTTP routes; raw TCP routes are probed with a connect.
    pub path: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryConfig {
    pub max_retries: u32,
    pub on_connect_failure: bool,
    pub on5xx: bool,
    pub on_timeout: bool,
    pub backoff_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "camelCase")]
pub enum NativeResponseConfig {
    Redirect { location: String, status: u16 },
    Response { status: u16, headers: Vec<NameValue>, body: String },
    Block { status: u16, message: String },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    #[default]
    Tcp,
    Udp,
    All,
}

impl Transport {
    pub fn tcp(self) -> bool {
        self != Transport::Udp
    }

    pub fn udp(self) -> bool {
        self != Transport::Tcp
    }
}

/// `action.udp` of a UDP route, with its defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UdpConfig {
    /// A flow with no datagram either way for this long ends.
    pub session_timeout_ms: u64,
    pub max_sessions_per_ip: u32,
    /// Larger datagrams from clients are dropped.
    pub max_datagram_size: u32,
}

impl Default for UdpConfig {
    fn default() -> Self {
        UdpConfig { session_timeout_ms: 60_000, max_sessions_per_ip: 1000, max_datagram_size: 65_535 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendProtocol {
    Auto,
    Http1,
    Http2,
    /// QUIC to the target's port over UDP; the target must be TLS.
    Http3,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TlsConfig {
    pub mode: TlsMode,
    /// PEM certificate and key served when TLS is terminated.
    pub certificate: Option<CertificatePem>,
    /// Allowed client TLS versions (`TLSv1.2`, `TLSv1.3`); empty = both.
    pub versions: Vec<String>,
    /// Re-encrypt only: verify the upstream's certificate (default true).
    pub reject_unauthorized: bool,
    /// `certificate: 'auto'`: the certificate comes from ACME (or `certProvisionFunction`) with
    /// these settings (global `acme` merged with the route's `tls.acme` by the wrapper).
    #[serde(default)]
    pub acme: Option<AcmeSettings>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AcmeSettings {
    /// Names the route's folder in the store and its status (the route's name).
    pub cert_name: String,
    /// The names on the certificate (the route's domains, no wildcards).
    pub domains: Vec<String>,
    pub email: String,
    pub directory_url: String,
    /// PEM file of a CA to trust for the directory's HTTPS (private or test ACME servers).
    pub directory_ca_file: Option<String>,
    pub certificate_store: String,
    /// Where HTTP-01 challenges are answered.
    pub port: u16,
    pub renew_threshold_days: u32,
    pub auto_renew: bool,
    /// `renewCheckIntervalHours`, in seconds.
    pub renew_check_interval_secs: u64,
    /// `certProvisionFunction` is set: the wrapper asks it first and starts ACME itself.
    pub custom_provisioning: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    Passthrough,
    Terminate,
    TerminateAndReencrypt,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificatePem {
    pub key: String,
    pub cert: String,
    /// Extra CA PEM: appended to the served chain and trusted for re-encrypted upstreams.
    pub ca: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TargetConfig {
    /// Empty when `hostFunction` chooses the host.
    pub hosts: Vec<String>,
    /// The wrapper's id of a `host` function of the context.
    pub host_function: Option<u32>,
    pub port: TargetPort,
    pub match_ports: Option<Vec<u16>>,
    pub match_path: Option<String>,
    pub match_headers: Vec<HeaderMatchConfig>,
    /// Upper-case method names; `None` = any.
    pub match_methods: Option<Vec<String>>,
    pub priority: f64,
    pub headers: HeaderTemplatesConfig,
    /// Share of picks under load balancing (default 1).
    #[serde(default = "one")]
    pub weight: u32,
    /// The connection to this target instead of the route's: TLS or not, and how it is verified.
    #[serde(default)]
    pub tls: Option<TargetTlsConfig>,
    /// PROXY header version towards this target (0 = none, 1, 2); `None` = the route's.
    #[serde(default)]
    pub send_proxy_protocol: Option<u8>,
}

/// A target's own `tls`: only the proxy's connection to it (the client-facing TLS is the route's).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TargetTlsConfig {
    /// `terminate`: plain to this target; `terminate-and-reencrypt`: TLS to it; `passthrough` is
    /// refused (a target cannot pass through TLS the route has already ended).
    pub mode: TlsMode,
    /// PEM CA trusted for this target, besides the system roots.
    pub ca: Option<String>,
    /// TLS versions offered to this target; empty = TLSv1.2 and TLSv1.3.
    pub versions: Vec<String>,
    /// Verify the target's certificate.
    pub reject_unauthorized: bool,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum TargetPort {
    Fixed(u16),
    Preserve(PreserveKeyword),
    /// `{ "function": id }`: a `port` function of the context chooses.
    Function(PortFunction),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortFunction {
    pub function: u32,
}

/// The literal `'preserve'`: connect to the port the client connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum PreserveKeyword {
    #[serde(rename = "preserve")]
    Preserve,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteSecurityConfig {
    pub ip_allow_list: Vec<String>,
    pub ip_block_list: Vec<String>,
    pub max_connections: Option<u32>,
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    #[serde(default)]
    pub basic_auth: Option<BasicAuthConfig>,
    #[serde(default)]
    pub jwt_auth: Option<JwtAuthConfig>,
    /// Pass the `Authorization` header the proxy checked on to the upstream (default: consumed).
    #[serde(default)]
    pub forward_authorization: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimitConfig {
    pub max_requests: u32,
    pub window_seconds: u64,
    pub key_by: RateLimitKey,
    /// `keyBy: 'header'`: whose value is the key.
    pub header_name: Option<String>,
    pub error_message: String,
    /// Keys tracked at most (least recently used evicted first).
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitKey {
    Ip,
    Path,
    Header,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BasicAuthConfig {
    pub users: Vec<BasicAuthUser>,
    pub realm: String,
    pub exclude_paths: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuthUser {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JwtAuthConfig {
    /// The HMAC secret (HS*), or the PEM public key (RS*, ES*).
    pub secret: String,
    pub algorithm: String,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub exclude_paths: Vec<String>,
    pub leeway_seconds: u64,
    /// A token without `exp` is refused unless this is false.
    #[serde(default = "yes")]
    pub require_exp: bool,
}

/// A configuration the engine cannot run, with the route and field it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub message: String,
}

impl ConfigError {
    /// `routes[2] "api": match.ports: ...` — the form users see from the wrapper's own checks too.
    pub fn in_route(index: usize, name: Option<&str>, field: &str, reason: impl fmt::Display) -> Self {
        let who = match name {
            Some(name) => format!("routes[{index}] {name:?}"),
            None => format!("routes[{index}]"),
        };
        ConfigError { message: format!("{who}: {field}: {reason}") }
    }

    pub fn in_options(field: &str, reason: impl fmt::Display) -> Self {
        ConfigError { message: format!("options.{field}: {reason}") }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Deserialises the wrapper's config, turning a serde path such as `routes[0].match.ports[1]` into
/// the user's route index and name.
pub fn parse(value: serde_json::Value) -> Result<EngineConfig, ConfigError> {
    serde_path_to_error::deserialize::<_, EngineConfig>(&value).map_err(|err| {
        let path = err.path().to_string();
        let reason = err.inner().to_string();
        match route_of_path(&value, &path) {
            Some((index, name, rest)) => ConfigError::in_route(index, name.as_deref(), &rest, reason),
            None => ConfigError { message: format!("invalid SmartProxy config at {path}: {reason}") },
        }
    })
}

fn route_of_path(value: &serde_json::Value, path: &str) -> Option<(usize, Option<String>, String)> {
    let rest = path.strip_prefix("routes[")?;
    let close = rest.find(']')?;
    let position: usize = rest[..close].parse().ok()?;
    let field = rest[close + 1..].trim_start_matches('.').to_string();
    let route = value.get("routes")?.get(position)?;
    let index = route.get("index").and_then(|i| i.as_u64()).map_or(position, |i| i as usize);
    let name = route.get("name").and_then(|n| n.as_str()).map(str::to_string);
    Some((index, name, if field.is_empty() { ".".to_string() } else { field }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn options() -> serde_json::Value {
        json!({
            "initialDataTimeoutMs": 120000, "socketTimeoutMs": 3600000, "inactivityTimeoutMs": 14400000,
            "maxConnectionLifetimeMs": 86400000, "gracefulShutdownTimeoutMs": 30000,
            "maxConnectionsPerIp": 100, "connectionRateLimitPerMinute": 300, "noDelay": true,
            "keepAlive": true, "keepAliveInitialDelayMs": 10000, "maxPendingDataSize": 10485760,
            "workerThreads": null, "enableDetailedLogging": false,
            "maxHeaderSize": 65536, "headerTimeoutMs": 30000, "http2MaxConcurrentStreams": 256, "jsCallTimeoutMs": 30000,
            "acceptProxyProtocol": false, "proxyIps": [], "sendProxyProtocol": 0,
            "defaultSecurity": { "ipAllowList": [], "ipBlockList": [] }
        })
    }

    fn route(port: serde_json::Value) -> serde_json::Value {
        json!({
            "index": 3, "name": "api", "id": null, "priority": 0,
            "match": { "ports": [port], "domains": [], "clientIp": [], "tlsVersion": [], "path": null, "headers": [] },
            "action": { "tls": { "mode": "passthrough", "certificate": null, "versions": [], "rejectUnauthorized": true, "acme": null }, "connectTimeoutMs": null, "responseTimeoutMs": null,
                        "websocket": true, "backendProtocol": "auto", "raw": false, "retry": null, "nativeResponse": null, "socketHandler": null, "sendProxyProtocol": null,
                        "targets": [{ "hosts": ["a"], "hostFunction": null, "port": "preserve", "matchPorts": null, "matchPath": null,
                                      "matchHeaders": [], "matchMethods": null, "priority": 0,
                                      "headers": { "request": [], "response": [] } }] },
            "security": { "ipAllowList": [], "ipBlockList": [], "maxConnections": null },
            "headers": { "request": [], "response": [] }
        })
    }

    #[test]
    fn parses_a_normalised_config() {
        let cfg = parse(json!({ "routes": [route(json!(443))], "options": options() })).expect("valid");
        assert_eq!(cfg.routes[0].match_.ports, vec![443]);
        assert_eq!(cfg.routes[0].action.tls.as_ref().map(|t| t.mode), Some(TlsMode::Passthrough));
        assert_eq!(cfg.routes[0].action.targets[0].port, TargetPort::Preserve(PreserveKeyword::Preserve));
    }

    #[test]
    fn errors_name_the_users_route_index_and_name() {
        let err = parse(json!({ "routes": [route(json!(70000))], "options": options() })).unwrap_err();
        assert_eq!(
            err.message,
            "routes[3] \"api\": match.ports[0]: invalid value: integer `70000`, expected u16"
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let mut opts = options();
        opts["bogus"] = json!(1);
        let err = parse(json!({ "routes": [], "options": opts })).unwrap_err();
        assert!(err.message.starts_with("invalid SmartProxy config at options.bogus: unknown field `bogus`"), "{}", err.message);
    }
}
