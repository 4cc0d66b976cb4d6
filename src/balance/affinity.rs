//! Session affinity: which backend a key's value (a client IP, a session header, a cookie) is
//! bound to. With `options.redis` the bindings are shared by every replica: a lookup is one
//! `GETEX` (value and TTL refresh in one round trip), a new binding one `SET .. NX EX` so replicas
//! racing on a new value agree on one backend. Each Redis call is bounded by a short timeout; while
//! Redis is unreachable the replica's own memory answers (bindings are written to both), the
//! outage is logged once and fallbacks are counted; once Redis answers again it is used again.
//! Values come from clients, so they are bounded: long ones stand as their digest, and each
//! route keeps at most `maxKeys` bindings in memory (least recently used evicted first).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{COOKIE, SET_COOKIE};
use http::{HeaderMap, HeaderName};
use parking_lot::Mutex;
use serde::Serialize;

use crate::shared_state::{OutageLog, SharedRedis, PER_REQUEST_TIMEOUT};
use crate::bounded::{bounded_value, BoundedMap};


/// What identifies a client's session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AffinityKey {
    ClientIp,
    Header(HeaderName),
    Cookie(String),
}

impl AffinityKey {
    /// `ip`, `header:NAME`, `cookie:NAME`.
    pub fn parse(text: &str) -> Result<AffinityKey, String> {
        if text == "ip" {
            return Ok(AffinityKey::ClientIp);
        }
        if let Some(name) = text.strip_prefix("header:") {
            return HeaderName::from_bytes(name.as_bytes()).map(AffinityKey::Header).map_err(|_| format!("{name:?} is not a valid header name"));
        }
        if let Some(name) = text.strip_prefix("cookie:") {
            if !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && !b"=;,".contains(&b)) {
                return Ok(AffinityKey::Cookie(name.to_string()));
            }
            return Err(format!("{name:?} is not a valid cookie name"));
        }
        Err(format!("expected 'ip', 'header:NAME' or 'cookie:NAME', got {text:?}"))
    }

    /// The value a request carries (the client IP always has one), bounded in size.
    pub fn request_value(&self, client_ip: std::net::IpAddr, headers: &HeaderMap) -> Option<String> {
        self.request_value_as_sent(client_ip, headers).map(bounded)
    }

    fn request_value_as_sent(&self, client_ip: std::net::IpAddr, headers: &HeaderMap) -> Option<String> {
        match self {
            AffinityKey::ClientIp => Some(client_ip.to_string()),
            AffinityKey::Header(name) => headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty()).map(str::to_string),
            AffinityKey::Cookie(name) => headers
                .get_all(COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|pair| cookie_value(pair, name)),
        }
    }

    /// A value a backend's response issues (a session header, or `Set-Cookie: NAME=...`),
    /// bounded as request values are, so that both name the same binding.
    pub fn response_value(&self, headers: &HeaderMap) -> Option<String> {
        self.response_value_as_sent(headers).map(bounded)
    }

    fn response_value_as_sent(&self, headers: &HeaderMap) -> Option<String> {
        match self {
            AffinityKey::ClientIp => None,
            AffinityKey::Header(name) => headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty()).map(str::to_string),
            AffinityKey::Cookie(name) => headers
                .get_all(SET_COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(|v| v.split(';').next().and_then(|pair| cookie_value(pair, name))),
        }
    }
}

fn bounded(value: String) -> String {
    match bounded_value(&value) {
        std::borrow::Cow::Borrowed(_) => value,
        std::borrow::Cow::Owned(digest) => digest,
    }
}

/// `prefix` then `rest`, in one allocation (`format!` costs several times as much per lookup).
fn concat(prefix: &str, rest: &str) -> String {
    let mut joined = String::with_capacity(prefix.len() + rest.len());
    joined.push_str(prefix);
    joined.push_str(rest);
    joined
}

fn cookie_value(pair: &str, name: &str) -> Option<String> {
    let (key, value) = pair.trim().split_once('=')?;
    (key.trim() == name && !value.trim().is_empty()).then(|| value.trim().trim_matches('"').to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUnknown {
    Assign,
    Reject,
}

/// A route's affinity settings, compiled.
#[derive(Debug, Clone)]
pub struct Affinity {
    pub key: AffinityKey,
    pub ttl: Duration,
    pub on_unknown: OnUnknown,
    /// Entries belong to the route (its id, else its name): `affinity:<route>:`.
    pub namespace: Arc<str>,
    /// Bindings the route keeps in memory at most.
    pub max_keys: usize,
}

impl Affinity {
    pub fn entry(&self, value: &str) -> String {
        concat(&self.namespace, value)
    }
}

struct Redis {
    shared: Arc<SharedRedis>,
    /// Logs an outage of shared bindings once.
    outage: OutageLog,
}

/// Counters for `getStatistics().affinity`.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AffinityStats {
    pub lookups: u64,
    pub redis_lookups: u64,
    pub redis_fallbacks: u64,
    pub memory_entries: usize,
    /// Bindings dropped from memory to keep a route within its `maxKeys`.
    pub evictions: u64,
}

/// A binding in memory: the backend and when it expires.
type Binding = (String, Instant);

#[derive(Default)]
pub struct AffinityStore {
    /// Per route namespace, its bindings by value.
    memory: Mutex<HashMap<Arc<str>, BoundedMap<String, Binding>>>,
    redis: Option<Redis>,
    lookups: AtomicU64,
    redis_lookups: AtomicU64,
    fallbacks: AtomicU64,
}

impl AffinityStore {
    /// With `redis`, bindings are shared through it (memory keeps a copy for outages).
    pub fn new(redis: Option<Arc<SharedRedis>>) -> AffinityStore {
        let redis = redis.map(|shared| Redis { shared, outage: OutageLog::default() });
        AffinityStore { redis, ..AffinityStore::default() }
    }

    /// The backend `value` is bound to for the route of `affinity`, refreshing its TTL.
    pub async fn lookup(&self, affinity: &Affinity, value: &str) -> Option<String> {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let ttl = affinity.ttl;
        if let Some(redis) = &self.redis {
            self.redis_lookups.fetch_add(1, Ordering::Relaxed);
            // The pipeline bounds the wait (one timer for all), so a lookup needs no timer of its own.
            let answered = redis.shared.pipeline().getex(redis.shared.prefix(), &affinity.entry(value), ttl.as_secs().max(1)).await.map_err(|err| err.to_string());
            if let Some(answer) = self.redis_answer(redis, answered) {
                if let Some(backend) = &answer {
                    // Kept in memory too, so an outage does not lose live sessions; an unchanged
                    // binding only has its expiry moved (no allocation on the hot path).
                    let expires = Instant::now() + ttl;
                    let mut memory = self.memory.lock();
                    let bindings = Self::bindings(&mut memory, affinity);
                    match bindings.get_mut(value) {
                        Some(held) if held.0 == *backend => held.1 = expires,
                        _ => bindings.insert(value.to_string(), (backend.clone(), expires)),
                    }
                }
                return answer;
            }
        }
        let mut memory = self.memory.lock();
        let bindings = memory.get_mut(&*affinity.namespace)?;
        let now = Instant::now();
        match bindings.get_mut(value) {
            Some((backend, expires)) if *expires > now => {
                *expires = now + ttl;
                Some(backend.clone())
            }
            Some(_) => {
                bindings.remove(value);
                None
            }
            None => None,
        }
    }

    /// Binds `value` to `backend` for the route of `affinity`. `only_if_new`: another replica's
    /// binding made meanwhile wins, and the backend bound in the end is returned.
    pub async fn bind(&self, affinity: &Affinity, value: &str, backend: &str, only_if_new: bool) -> String {
        let ttl = affinity.ttl;
        let mut bound = backend.to_string();
        if let Some(redis) = &self.redis {
            let key = concat(redis.shared.prefix(), &affinity.entry(value));
            let mut cmd = redis::cmd("SET");
            cmd.arg(&key).arg(backend);
            if only_if_new {
                cmd.arg("NX");
            }
            cmd.arg("EX").arg(ttl.as_secs().max(1));
            if let Some(answer) = self.redis_call::<Option<String>>(redis, cmd).await {
                if answer.is_none() {
                    // NX lost the race: read who won (and refresh it).
                    let mut get = redis::cmd("GETEX");
                    get.arg(&key).arg("EX").arg(ttl.as_secs().max(1));
                    if let Some(Some(winner)) = self.redis_call::<Option<String>>(redis, get).await {
                        bound = winner;
                    }
                }
            }
        }
        let mut memory = self.memory.lock();
        Self::bindings(&mut memory, affinity).insert(value.to_string(), (bound.clone(), Instant::now() + ttl));
        bound
    }

    /// The route's bindings, made on first use with the route's cap.
    fn bindings<'m>(memory: &'m mut HashMap<Arc<str>, BoundedMap<String, Binding>>, affinity: &Affinity) -> &'m mut BoundedMap<String, Binding> {
        // The key is shared, not copied: a reference count per call, no allocation.
        memory.entry(affinity.namespace.clone()).or_insert_with(|| BoundedMap::new(affinity.max_keys))
    }

    /// The answer within a per-request call's time, or `None` when Redis failed or timed out
    /// (then memory answers).
    async fn redis_call<T: redis::FromRedisValue>(&self, redis: &Redis, cmd: redis::Cmd) -> Option<T> {
        let answered = match tokio::time::timeout(PER_REQUEST_TIMEOUT, redis.shared.call::<T>(&cmd)).await {
            Ok(answer) => answer,
            Err(_) => Err("no answer in time".to_string()),
        };
        self.redis_answer(redis, answered)
    }

    /// The answer, or `None` after counting and logging the fallback.
    fn redis_answer<T>(&self, redis: &Redis, answered: Result<T, String>) -> Option<T> {
        redis.shared.answered(answered.is_ok());
        match answered {
            Ok(answer) => {
                redis.outage.answered("session affinity is");
                Some(answer)
            }
            Err(err) => {
                self.fell_back(redis, &err);
                None
            }
        }
    }

    fn fell_back(&self, redis: &Redis, why: &str) {
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
        redis.outage.failed("session affinity is kept in this replica's memory", why);
    }

    /// Drops expired entries (memory stays bounded by live sessions).
    pub fn sweep(&self) {
        let now = Instant::now();
        for bindings in self.memory.lock().values_mut() {
            bindings.retain(|(_, expires)| *expires > now);
        }
    }

    pub fn stats(&self) -> AffinityStats {
        let (memory_entries, evictions) = {
            let memory = self.memory.lock();
            (memory.values().map(BoundedMap::len).sum(), memory.values().map(BoundedMap::evictions).sum())
        };
        AffinityStats {
            lookups: self.lookups.load(Ordering::Relaxed),
            redis_lookups: self.redis_lookups.load(Ordering::Relaxed),
            redis_fallbacks: self.fallbacks.load(Ordering::Relaxed),
            memory_entries,
            evictions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn keys_parse_and_read_values_from_requests_and_responses() {
        assert_eq!(AffinityKey::parse("ip").unwrap(), AffinityKey::ClientIp);
        assert!(AffinityKey::parse("header:bad name").is_err());
        assert!(AffinityKey::parse("cookie:").is_err());
        assert!(AffinityKey::parse("path").is_err());
        let header = AffinityKey::parse("header:Mcp-Session-Id").unwrap();
        let cookie = AffinityKey::parse("cookie:sid").unwrap();
        let mut request = HeaderMap::new();
        request.insert("mcp-session-id", HeaderValue::from_static(" abc "));
        request.append(COOKIE, HeaderValue::from_static("a=1; sid=\"xyz\"; b=2"));
        let ip: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(header.request_value(ip, &request).as_deref(), Some("abc"));
        assert_eq!(cookie.request_value(ip, &request).as_deref(), Some("xyz"));
        assert_eq!(AffinityKey::ClientIp.request_value(ip, &request).as_deref(), Some("10.0.0.1"));
        let mut response = HeaderMap::new();
        response.append(SET_COOKIE, HeaderValue::from_static("other=1; Path=/"));
        response.append(SET_COOKIE, HeaderValue::from_static("sid=new; HttpOnly"));
        assert_eq!(cookie.response_value(&response).as_deref(), Some("new"));
        assert_eq!(header.response_value(&response), None);
    }

    fn affinity(ttl: Duration, max_keys: usize) -> Affinity {
        Affinity { key: AffinityKey::ClientIp, ttl, on_unknown: OnUnknown::Assign, namespace: "affinity:r:".into(), max_keys }
    }

    #[tokio::test]
    async fn memory_bindings_expire_and_lookups_refresh_them() {
        let store = AffinityStore::new(None);
        let a = affinity(Duration::from_millis(50), 10);
        assert_eq!(store.lookup(&a, "a").await, None);
        assert_eq!(store.bind(&a, "a", "h:1", true).await, "h:1");
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(store.lookup(&a, "a").await.as_deref(), Some("h:1"));
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(store.lookup(&a, "a").await.as_deref(), Some("h:1"), "the lookup refreshed the TTL");
        tokio::time::sleep(Duration::from_millis(80)).await;
        store.sweep();
        assert_eq!(store.lookup(&a, "a").await, None);
        assert_eq!(store.stats().memory_entries, 0);
    }

    #[tokio::test]
    async fn each_route_keeps_at_most_max_keys_the_least_recently_used_evicted() {
        let store = AffinityStore::new(None);
        let small = affinity(Duration::from_secs(60), 3);
        let other = Affinity { namespace: "affinity:other:".into(), ..affinity(Duration::from_secs(60), 3) };
        for value in ["a", "b", "c"] {
            store.bind(&small, value, "h:1", true).await;
        }
        store.bind(&other, "a", "h:2", true).await;
        assert_eq!(store.lookup(&small, "a").await.as_deref(), Some("h:1"));
        store.bind(&small, "d", "h:1", true).await;
        assert_eq!(store.lookup(&small, "b").await, None, "b was the least recently used");
        assert_eq!(store.lookup(&small, "a").await.as_deref(), Some("h:1"));
        assert_eq!(store.lookup(&other, "a").await.as_deref(), Some("h:2"), "routes do not share a cap");
        let stats = store.stats();
        assert_eq!((stats.memory_entries, stats.evictions), (4, 1));
    }

    #[test]
    fn long_values_are_bound_by_their_digest() {
        let key = AffinityKey::parse("header:x-session").unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-session", HeaderValue::from_str(&"s".repeat(8 * 1024)).unwrap());
        let value = key.request_value("10.0.0.1".parse().unwrap(), &headers).unwrap();
        assert!(value.starts_with("sha256:") && value.len() == 71, "{value}");
        assert_eq!(key.response_value(&headers), Some(value), "a response issuing it names the same binding");
    }
}
