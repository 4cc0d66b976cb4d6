//! Admission at L7, per request of a route served by the HTTP engine: the rate limit (GCRA per key,
//! keys bounded in number and size) and authentication (basic, constant-time; JWT, jsonwebtoken). Compiled once per route
//! table. Knows nothing of hyper's connections, of upstreams or of napi: it looks at a request's
//! facts and answers pass or refuse.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use base64::Engine as _;
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName, HeaderValue};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use subtle::ConstantTimeEq;

use crate::bounded::{bounded_bytes, BoundedMap};
use crate::config::{BasicAuthConfig, JwtAuthConfig, RateLimitConfig, RateLimitKey};
use crate::matchers::path::PathPattern;
use crate::shared_state::rate_limit::{GcraArgs, SharedDecision};
use crate::shared_state::SharedRedis;

/// Longest `Authorization` value looked at; longer ones are refused unread.
const MAX_CREDENTIALS_BYTES: usize = 8 * 1024;
/// Verified tokens remembered per route (their signature, issuer and audience are fixed by their
/// bytes; the time claims are checked again on every use). Full: forgotten all at once.
const VERIFIED_TOKEN_CACHE: usize = 4096;

/// The claims of a verified token, for `{jwt.<claim>}` header templates.
pub type Claims = serde_json::Map<String, serde_json::Value>;

#[derive(Debug)]
pub struct HttpSecurity {
    pub rate_limit: Option<RateLimit>,
    basic: Option<BasicAuth>,
    jwt: Option<JwtAuth>,
    /// Keep the `Authorization` header the proxy checked when forwarding.
    pub forward_authorization: bool,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 429 with `Retry-After` (whole seconds, at least 1).
    RateLimited { retry_after_secs: u64, message: String },
    /// 401 with this `WWW-Authenticate` challenge.
    Unauthorized { challenge: HeaderValue },
}

/// What authentication established about a request.
#[derive(Debug, Default)]
pub struct Admitted {
    pub claims: Option<Arc<Claims>>,
    /// The request carried credentials the proxy checked (to be removed before forwarding).
    pub authenticated: bool,
}

impl HttpSecurity {
    /// `None` when the route has no HTTP-level security. Errors name the field (`security.jwtAuth.secret`).
    /// `owner` names the route's keys in shared state (its id, else its name).
    pub fn compile(
        owner: &str,
        rate_limit: Option<&RateLimitConfig>,
        basic: Option<&BasicAuthConfig>,
        jwt: Option<&JwtAuthConfig>,
        forward_authorization: bool,
    ) -> Result<Option<HttpSecurity>, (String, String)> {
        if rate_limit.is_none() && basic.is_none() && jwt.is_none() {
            return Ok(None);
        }
        Ok(Some(HttpSecurity {
            rate_limit: rate_limit.map(|config| RateLimit::compile(config, owner)).transpose()?,
            basic: basic.map(BasicAuth::compile).transpose()?,
            jwt: jwt.map(JwtAuth::compile).transpose()?,
            forward_authorization,
        }))
    }

    /// The rate limit first, then authentication (either configured scheme admits).
    pub fn admit(&self, client_ip: IpAddr, path: &str, headers: &HeaderMap) -> Result<Admitted, Refusal> {
        if let Some(limit) = &self.rate_limit {
            limit.check(client_ip, path, headers)?;
        }
        self.authenticate(path, headers)
    }

    /// As `admit`, with the rate limit counted across replicas in Redis. While Redis fails, this
    /// replica's own limiter answers (the outage logged once). `client_ip_text`: the address as
    /// its connection formatted it once (the Redis key of a per-IP limit).
    pub async fn admit_shared(&self, redis: &SharedRedis, client_ip: IpAddr, client_ip_text: &[u8], path: &str, headers: &HeaderMap) -> Result<Admitted, Refusal> {
        if let Some(limit) = &self.rate_limit {
            limit.check_shared(redis, client_ip, client_ip_text, path, headers).await?;
        }
        self.authenticate(path, headers)
    }

    /// Authentication alone (either configured scheme admits).
    fn authenticate(&self, path: &str, headers: &HeaderMap) -> Result<Admitted, Refusal> {
        if self.basic.is_none() && self.jwt.is_none() {
            return Ok(Admitted::default());
        }
        let excluded = self.basic.as_ref().is_some_and(|b| b.excludes(path)) || self.jwt.as_ref().is_some_and(|j| j.excludes(path));
        if excluded {
            return Ok(Admitted::default());
        }
        let credentials = headers.get(AUTHORIZATION).map(HeaderValue::as_bytes).filter(|v| v.len() <= MAX_CREDENTIALS_BYTES);
        if let (Some(basic), Some(credentials)) = (&self.basic, credentials) {
            if basic.verify(credentials) {
                return Ok(Admitted { claims: None, authenticated: true });
            }
        }
        if let (Some(jwt), Some(credentials)) = (&self.jwt, credentials) {
            if let Some(claims) = jwt.verify(credentials) {
                return Ok(Admitted { claims: Some(claims), authenticated: true });
            }
        }
        // RFC 6750 §3.1: a client that sent no credentials is only told the scheme.
        let challenge = match (&self.basic, credentials) {
            (Some(basic), _) => basic.challenge.clone(),
            (None, Some(_)) => HeaderValue::from_static("Bearer error=\"invalid_token\""),
            (None, None) => HeaderValue::from_static("Bearer"),
        };
        Err(Refusal::Unauthorized { challenge })
    }

    /// Forgets rate-limit keys whose state is back to fresh (called once a second).
    pub fn sweep(&self) {
        if let Some(limit) = &self.rate_limit {
            limit.sweep();
        }
    }

    /// Rate-limit keys evicted to stay within `maxKeys`.
    pub fn rate_limit_evictions(&self) -> u64 {
        self.rate_limit.as_ref().map_or(0, |limit| limit.keys.lock().evictions())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum RateKey {
    Ip(IpAddr),
    /// A path or header value, hashed when long (`bounded_bytes`).
    Bytes(Box<[u8]>),
}

enum KeyBy {
    Ip,
    Path,
    Header(HeaderName),
}

/// GCRA per key: a fresh key may send `maxRequests` at once, then one more every
/// `window / maxRequests`. Each key keeps its theoretical arrival time; a key whose time has
/// passed is as good as fresh and is forgotten by the sweep.
pub struct RateLimit {
    keys: Mutex<BoundedMap<RateKey, Instant>>,
    /// `<owner>:`, the route's part of its keys in shared state.
    namespace: String,
    /// The period and burst as the shared script takes them.
    shared_args: GcraArgs,
    /// `window / maxRequests`.
    period: Duration,
    /// `period * maxRequests`: how far ahead of now a key's arrival time may run.
    burst: Duration,
    key_by: KeyBy,
    message: String,
}

impl std::fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit").field("keys", &self.keys.lock().len()).field("message", &self.message).finish()
    }
}

impl RateLimit {
    fn compile(config: &RateLimitConfig, owner: &str) -> Result<RateLimit, (String, String)> {
        let field = |f: &str| format!("security.rateLimit.{f}");
        if config.max_requests == 0 {
            return Err((field("maxRequests"), "must be at least 1".into()));
        }
        if config.window_seconds == 0 {
            return Err((field("window"), "must be at least 1 second".into()));
        }
        if config.max_keys == 0 {
            return Err((field("maxKeys"), "must be at least 1".into()));
        }
        let period = (Duration::from_secs(config.window_seconds) / config.max_requests).max(Duration::from_nanos(1));
        let key_by = match config.key_by {
            RateLimitKey::Ip => KeyBy::Ip,
            RateLimitKey::Path => KeyBy::Path,
            RateLimitKey::Header => {
                let name = config.header_name.as_deref().ok_or_else(|| (field("headerName"), "keyBy 'header' needs a headerName".to_string()))?;
                KeyBy::Header(HeaderName::from_bytes(name.as_bytes()).map_err(|_| (field("headerName"), format!("{name:?} is not a header name")))?)
            }
        };
        Ok(RateLimit {
            keys: Mutex::new(BoundedMap::new(config.max_keys)),
            namespace: format!("{owner}:"),
            shared_args: GcraArgs::new(period, period * config.max_requests),
            period,
            burst: period * config.max_requests,
            key_by,
            message: config.error_message.clone(),
        })
    }

    fn key(&self, client_ip: IpAddr, path: &str, headers: &HeaderMap) -> RateKey {
        match &self.key_by {
            KeyBy::Ip => RateKey::Ip(client_ip),
            KeyBy::Path => RateKey::Bytes(bounded_bytes(path.as_bytes()).into()),
            // Requests without the header share one budget.
            KeyBy::Header(name) => RateKey::Bytes(bounded_bytes(headers.get(name).map_or(&[][..], HeaderValue::as_bytes)).into()),
        }
    }

    fn refusal(&self, wait: Duration) -> Refusal {
        Refusal::RateLimited { retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64, message: self.message.clone() }
    }

    fn check(&self, client_ip: IpAddr, path: &str, headers: &HeaderMap) -> Result<(), Refusal> {
        self.check_key(self.key(client_ip, path, headers))
    }

    async fn check_shared(&self, redis: &SharedRedis, client_ip: IpAddr, client_ip_text: &[u8], path: &str, headers: &HeaderMap) -> Result<(), Refusal> {
        let key = self.key(client_ip, path, headers);
        let key_bytes: &[u8] = match &key {
            RateKey::Ip(_) => client_ip_text,
            RateKey::Bytes(bytes) => bytes,
        };
        redis.counters.rate_limit_calls.fetch_add(1, Ordering::Relaxed);
        match redis.rate_limit(&self.namespace, key_bytes, &self.shared_args).await {
            Ok(decision) => {
                redis.rate_limit_outage.answered("rate limits are");
                match decision {
                    SharedDecision::Admitted => Ok(()),
                    SharedDecision::Wait(wait) => Err(self.refusal(wait)),
                }
            }
            Err(err) => {
                redis.counters.rate_limit_fallbacks.fetch_add(1, Ordering::Relaxed);
                redis.rate_limit_outage.failed("rate limits are counted by this replica alone", &err.to_string());
                self.check_key(key)
            }
        }
    }

    fn check_key(&self, key: RateKey) -> Result<(), Refusal> {
        let now = Instant::now();
        let mut keys = self.keys.lock();
        // A fresh key's first request is always within its burst: one lookup either way.
        let Some(at) = keys.get_mut(&key) else {
            keys.insert(key, now + self.period);
            return Ok(());
        };
        let next = (*at).max(now) + self.period;
        if next > now + self.burst {
            return Err(self.refusal(next - self.burst - now));
        }
        *at = next;
        Ok(())
    }

    fn sweep(&self) {
        let now = Instant::now();
        self.keys.lock().retain(|arrival| *arrival > now);
    }
}

#[derive(Debug)]
struct BasicAuth {
    users: Vec<(Vec<u8>, Vec<u8>)>,
    challenge: HeaderValue,
    exclude: Vec<PathPattern>,
}

impl BasicAuth {
    fn compile(config: &BasicAuthConfig) -> Result<BasicAuth, (String, String)> {
        let realm = config.realm.replace(['"', '\\'], "");
        let challenge = HeaderValue::from_str(&format!("Basic realm=\"{realm}\", charset=\"UTF-8\""))
            .map_err(|_| ("security.basicAuth.realm".to_string(), "not a valid header value".to_string()))?;
        for (i, user) in config.users.iter().enumerate() {
            if user.username.contains(':') {
                return Err((format!("security.basicAuth.users[{i}].username"), "may not contain ':'".into()));
            }
        }
        Ok(BasicAuth {
            users: config.users.iter().map(|u| (u.username.as_bytes().to_vec(), u.password.as_bytes().to_vec())).collect(),
            challenge,
            exclude: compile_paths(&config.exclude_paths, "security.basicAuth.excludePaths")?,
        })
    }

    fn excludes(&self, path: &str) -> bool {
        self.exclude.iter().any(|p| p.matches(path))
    }

    /// Every user is compared, in constant time per comparison, whatever matched earlier.
    fn verify(&self, credentials: &[u8]) -> bool {
        let Some(encoded) = strip_scheme(credentials, b"basic") else {
            return false;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
            return false;
        };
        let Some(colon) = decoded.iter().position(|b| *b == b':') else {
            return false;
        };
        let (user, password) = (&decoded[..colon], &decoded[colon + 1..]);
        let mut matched = subtle::Choice::from(0);
        for (known_user, known_password) in &self.users {
            matched |= known_user.as_slice().ct_eq(user) & known_password.as_slice().ct_eq(password);
        }
        matched.into()
    }
}

struct JwtAuth {
    key: DecodingKey,
    /// Signature, algorithm, issuer and audience; the time claims are checked here, below.
    validation: Validation,
    leeway: f64,
    require_exp: bool,
    exclude: Vec<PathPattern>,
    verified: Mutex<HashMap<Box<str>, VerifiedToken>>,
}

/// A token whose signature verified, with its time claims (NumericDate: seconds, maybe fractional).
struct VerifiedToken {
    claims: Arc<Claims>,
    exp: Option<f64>,
    nbf: Option<f64>,
}

impl std::fmt::Debug for JwtAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuth").field("algorithms", &self.validation.algorithms).finish_non_exhaustive()
    }
}

impl JwtAuth {
    fn compile(config: &JwtAuthConfig) -> Result<JwtAuth, (String, String)> {
        let field = |f: &str| format!("security.jwtAuth.{f}");
        let algorithm: Algorithm = config
            .algorithm
            .parse()
            .map_err(|_| (field("algorithm"), format!("{:?} is not one of HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA", config.algorithm)))?;
        let pem = config.secret.as_bytes();
        let key = match algorithm {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                if config.secret.is_empty() {
                    return Err((field("secret"), "an HMAC secret may not be empty".into()));
                }
                DecodingKey::from_secret(pem)
            }
            Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 | Algorithm::PS256 | Algorithm::PS384 | Algorithm::PS512 => {
                DecodingKey::from_rsa_pem(pem).map_err(|e| (field("secret"), format!("not an RSA public key in PEM ({e})")))?
            }
            Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(pem).map_err(|e| (field("secret"), format!("not an EC public key in PEM ({e})")))?,
            Algorithm::EdDSA => DecodingKey::from_ed_pem(pem).map_err(|e| (field("secret"), format!("not an Ed25519 public key in PEM ({e})")))?,
        };
        // Only the configured algorithm: a token naming another (or `none`) is refused, so an
        // HMAC token cannot be checked against an RSA key's PEM text.
        let mut validation = Validation::new(algorithm);
        // jsonwebtoken skips a time claim it cannot read as whole seconds (a string, a fraction);
        // `in_time` reads every form and refuses what is not a number.
        validation.validate_nbf = false;
        validation.validate_exp = false;
        // A configured issuer or audience must be present in the token, not merely not wrong.
        validation.required_spec_claims.clear();
        validation.validate_aud = config.audience.is_some();
        if let Some(audience) = &config.audience {
            validation.set_audience(&[audience]);
            validation.required_spec_claims.insert("aud".to_string());
        }
        if let Some(issuer) = &config.issuer {
            validation.set_issuer(&[issuer]);
            validation.required_spec_claims.insert("iss".to_string());
        }
        Ok(JwtAuth {
            key,
            validation,
            leeway: config.leeway_seconds as f64,
            require_exp: config.require_exp,
            exclude: compile_paths(&config.exclude_paths, "security.jwtAuth.excludePaths")?,
            verified: Mutex::new(HashMap::new()),
        })
    }

    fn excludes(&self, path: &str) -> bool {
        self.exclude.iter().any(|p| p.matches(path))
    }

    fn verify(&self, credentials: &[u8]) -> Option<Arc<Claims>> {
        let token = std::str::from_utf8(strip_scheme(credentials, b"bearer")?).ok()?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        if let Some(known) = self.verified.lock().get(token) {
            return self.in_time(known, now).then(|| known.claims.clone());
        }
        let claims = Arc::new(jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).ok()?.claims);
        let time = |name: &str| match claims.get(name) {
            None => Some(None),
            Some(value) => value.as_f64().map(Some),
        };
        // A time claim that is not a number is refused outright (not merely left unchecked).
        let (Some(exp), Some(nbf)) = (time("exp"), time("nbf")) else {
            return None;
        };
        let verified = VerifiedToken { exp, nbf, claims: claims.clone() };
        if !self.in_time(&verified, now) {
            return None;
        }
        let mut cache = self.verified.lock();
        if cache.len() >= VERIFIED_TOKEN_CACHE {
            cache.clear();
        }
        cache.insert(token.into(), verified);
        Some(claims)
    }

    /// `exp` and `nbf` with the leeway; a token without `exp` only when the route allows it.
    fn in_time(&self, token: &VerifiedToken, now: f64) -> bool {
        let exp_ok = match token.exp {
            Some(exp) => exp + self.leeway >= now,
            None => !self.require_exp,
        };
        exp_ok && token.nbf.is_none_or(|nbf| nbf <= now + self.leeway)
    }
}

/// `Basic xyz` → `xyz` (scheme case-insensitive, surrounding spaces ignored).
fn strip_scheme<'a>(value: &'a [u8], scheme: &[u8]) -> Option<&'a [u8]> {
    let value = value.trim_ascii();
    let (head, rest) = value.split_at_checked(scheme.len())?;
    if !head.eq_ignore_ascii_case(scheme) || !rest.first().is_some_and(|b| *b == b' ') {
        return None;
    }
    Some(rest.trim_ascii())
}

fn compile_paths(paths: &[String], field: &str) -> Result<Vec<PathPattern>, (String, String)> {
    paths
        .iter()
        .enumerate()
        .map(|(i, p)| PathPattern::parse(p).map_err(|r| (format!("{field}[{i}]"), r)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(users: &[(&str, &str)]) -> HttpSecurity {
        let config = BasicAuthConfig {
            users: users.iter().map(|(u, p)| crate::config::BasicAuthUser { username: u.to_string(), password: p.to_string() }).collect(),
            realm: "R".into(),
            exclude_paths: vec!["/health".into()],
        };
        HttpSecurity::compile("r", None, Some(&config), None, false).unwrap().unwrap()
    }

    fn with_auth(value: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_bytes(value).unwrap());
        headers
    }

    #[test]
    fn basic_auth_takes_the_right_user_only() {
        let security = basic(&[("alice", "s3cret"), ("bob", "pw:with:colons")]);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let encode = |s: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(s));
        assert!(security.admit(ip, "/", &with_auth(encode("alice:s3cret").as_bytes())).is_ok());
        assert!(security.admit(ip, "/", &with_auth(encode("bob:pw:with:colons").as_bytes())).is_ok());
        assert!(security.admit(ip, "/", &with_auth(b"basic  YWxpY2U6czNjcmV0 ")).is_ok());
        for bad in [encode("alice:wrong"), encode("alice"), encode("mallory:s3cret"), "Basic !!!".into(), "Bearer x".into(), "Basic".into(), "Basicx YQ==".into()] {
            assert!(matches!(security.admit(ip, "/", &with_auth(bad.as_bytes())), Err(Refusal::Unauthorized { .. })), "{bad}");
        }
        assert!(matches!(security.admit(ip, "/", &HeaderMap::new()), Err(Refusal::Unauthorized { .. })));
        assert!(security.admit(ip, "/health", &HeaderMap::new()).is_ok());
    }

    #[test]
    fn the_rate_limit_refuses_the_request_after_the_burst_per_key() {
        let config = RateLimitConfig { max_requests: 3, window_seconds: 60, key_by: RateLimitKey::Ip, header_name: None, error_message: "slow".into(), max_keys: 100 };
        let security = HttpSecurity::compile("r", Some(&config), None, None, false).unwrap().unwrap();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..3 {
            assert!(security.admit(a, "/", &HeaderMap::new()).is_ok());
        }
        match security.admit(a, "/", &HeaderMap::new()) {
            Err(Refusal::RateLimited { retry_after_secs, message }) => {
                assert!((1..=20).contains(&retry_after_secs), "{retry_after_secs}");
                assert_eq!(message, "slow");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(security.admit(b, "/", &HeaderMap::new()).is_ok());
    }

    fn jwt(require_exp: bool) -> HttpSecurity {
        let config = JwtAuthConfig {
            secret: "a-secret-of-decent-length-0123456789".into(),
            algorithm: "HS256".into(),
            issuer: None,
            audience: None,
            exclude_paths: vec![],
            leeway_seconds: 30,
            require_exp,
        };
        HttpSecurity::compile("r", None, None, Some(&config), false).unwrap().unwrap()
    }

    fn bearer(claims: serde_json::Value) -> HeaderMap {
        let key = jsonwebtoken::EncodingKey::from_secret(b"a-secret-of-decent-length-0123456789");
        let token = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap();
        with_auth(format!("Bearer {token}").as_bytes())
    }

    fn now() -> f64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
    }

    #[test]
    fn jwt_time_claims_must_be_numbers_and_exp_is_required_by_default() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let strict = jwt(true);
        let lenient = jwt(false);
        let future = now() + 3600.0;
        let ok = |security: &HttpSecurity, claims: serde_json::Value| security.admit(ip, "/", &bearer(claims)).is_ok();
        assert!(ok(&strict, serde_json::json!({ "sub": "a", "exp": future as u64 })));
        assert!(ok(&strict, serde_json::json!({ "sub": "a", "exp": future + 0.5 })));
        assert!(!ok(&strict, serde_json::json!({ "sub": "a" })), "no exp");
        assert!(ok(&lenient, serde_json::json!({ "sub": "a" })), "no exp, allowed");
        for security in [&strict, &lenient] {
            assert!(!ok(security, serde_json::json!({ "sub": "a", "exp": format!("{}", future as u64) })), "string exp");
            assert!(!ok(security, serde_json::json!({ "sub": "a", "exp": future as u64, "nbf": "0" })), "string nbf");
            assert!(!ok(security, serde_json::json!({ "sub": "a", "exp": now() - 60.0 })), "expired");
            assert!(!ok(security, serde_json::json!({ "sub": "a", "exp": future as u64, "nbf": now() + 60.0 })), "not yet");
        }
        assert!(ok(&strict, serde_json::json!({ "sub": "a", "exp": now() - 10.0 })), "within the leeway");
    }

    #[test]
    fn a_refused_token_is_told_it_is_invalid() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let security = jwt(true);
        let challenge = |headers: &HeaderMap| match security.admit(ip, "/", headers) {
            Err(Refusal::Unauthorized { challenge }) => challenge,
            other => panic!("expected 401, got {other:?}"),
        };
        assert_eq!(challenge(&bearer(serde_json::json!({ "sub": "a", "exp": now() - 60.0 }))), "Bearer error=\"invalid_token\"");
        assert_eq!(challenge(&HeaderMap::new()), "Bearer");
    }
}
