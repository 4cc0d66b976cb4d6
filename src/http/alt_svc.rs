//! What backends advertise with `Alt-Svc` (RFC 7838), for `backendProtocol: 'auto'`: a TLS
//! backend that names `h3` on a port of its own host is reached over HTTP/3 from then on, until
//! the advertisement expires, is cleared, or HTTP/3 to it fails (then it is forgotten and the
//! request goes over TCP, as upstream 27 does). Only alternatives on the same host are taken: a
//! backend must not be able to send the proxy's traffic to another host. Bounded in entries.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderMap;
use parking_lot::Mutex;

/// Backends remembered at most (they come from the routes' targets, but a target function may
/// name many).
const MAX_ENTRIES: usize = 4096;
/// RFC 7838 §3: `ma` defaults to 24 hours; longer ones are held no longer than that.
const DEFAULT_MAX_AGE: Duration = Duration::from_secs(86_400);
/// After HTTP/3 to a backend failed, its advertisements are not believed for this long: each
/// of its TCP responses would advertise it again, and each try cost a request its wait.
const FAILED_FOR: Duration = Duration::from_secs(300);

/// What an `Alt-Svc` field says about HTTP/3 on the same host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advertised {
    /// HTTP/3 on this port, for this long.
    H3 { port: u16, max_age: Duration },
    /// `clear`: forget every alternative.
    Clear,
}

/// The first `h3` alternative on the same host in the response's `Alt-Svc` fields, or `clear`.
pub fn advertised(headers: &HeaderMap) -> Option<Advertised> {
    for value in headers.get_all(http::header::ALT_SVC) {
        let Ok(value) = value.to_str() else { continue };
        if value.trim() == "clear" {
            return Some(Advertised::Clear);
        }
        for alternative in split_outside_quotes(value, ',') {
            if let Some(found) = parse_alternative(alternative) {
                return Some(found);
            }
        }
    }
    None
}

/// `h3=":443"; ma=3600` → HTTP/3 on 443 for an hour; other protocols and other hosts → None.
fn parse_alternative(alternative: &str) -> Option<Advertised> {
    let mut parts = split_outside_quotes(alternative, ';');
    let (protocol, authority) = parts.next()?.trim().split_once('=')?;
    if protocol.trim() != "h3" {
        return None;
    }
    let authority = authority.trim().strip_prefix('"')?.strip_suffix('"')?;
    // Same host only: the authority is `:port`.
    let port: u16 = authority.strip_prefix(':')?.parse().ok().filter(|p| *p != 0)?;
    let mut max_age = DEFAULT_MAX_AGE;
    for parameter in parts {
        if let Some((name, value)) = parameter.trim().split_once('=') {
            if name.trim().eq_ignore_ascii_case("ma") {
                let seconds: u64 = value.trim().trim_matches('"').parse().ok()?;
                max_age = Duration::from_secs(seconds).min(DEFAULT_MAX_AGE);
            }
        }
    }
    Some(Advertised::H3 { port, max_age })
}

/// Pieces of `value` between `separator`s that are not inside double quotes.
fn split_outside_quotes(value: &str, separator: char) -> impl Iterator<Item = &str> {
    let mut quoted = false;
    let mut start = 0;
    let mut pieces = Vec::new();
    for (i, c) in value.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c == separator && !quoted => {
                pieces.push(&value[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    pieces.push(&value[start..]);
    pieces.into_iter()
}

/// The HTTP/3 ports backends advertised, by backend (host and TCP port as the route names it).
#[derive(Default)]
pub struct AltSvcCache {
    entries: Mutex<HashMap<(Arc<str>, u16), Entry>>,
    /// No backend ever advertised HTTP/3: every lookup is answered without the lock.
    learnt_any: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Clone, Copy)]
enum Entry {
    /// HTTP/3 on this port until then.
    H3(u16, Instant),
    /// HTTP/3 failed: TCP until then, whatever the backend advertises.
    Failed(Instant),
}

impl Entry {
    fn until(self) -> Instant {
        match self {
            Entry::H3(_, until) | Entry::Failed(until) => until,
        }
    }
}

impl AltSvcCache {
    /// The port to reach `host:port` over HTTP/3 on, while its advertisement holds.
    pub fn h3_port(&self, host: &Arc<str>, port: u16) -> Option<u16> {
        if !self.learnt_any.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let mut entries = self.entries.lock();
        let key = (host.clone(), port);
        match entries.get(&key).copied() {
            Some(Entry::H3(h3_port, until)) if Instant::now() < until => Some(h3_port),
            Some(entry) if Instant::now() >= entry.until() => {
                entries.remove(&key);
                None
            }
            _ => None,
        }
    }

    /// What a response from `host:port` over TCP said.
    pub fn learn(&self, host: &Arc<str>, port: u16, headers: &HeaderMap) {
        match advertised(headers) {
            Some(Advertised::H3 { port: h3_port, max_age }) if !max_age.is_zero() => {
                let now = Instant::now();
                let mut entries = self.entries.lock();
                let key = (host.clone(), port);
                if entries.get(&key).is_some_and(|entry| matches!(entry, Entry::Failed(until) if now < *until)) {
                    return;
                }
                if entries.len() >= MAX_ENTRIES && !entries.contains_key(&key) {
                    entries.retain(|_, entry| now < entry.until());
                    if entries.len() >= MAX_ENTRIES {
                        return;
                    }
                }
                entries.insert(key, Entry::H3(h3_port, now + max_age));
                self.learnt_any.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            Some(_) => {
                let mut entries = self.entries.lock();
                if let Some(Entry::H3(..)) = entries.get(&(host.clone(), port)) {
                    entries.remove(&(host.clone(), port));
                }
            }
            None => {}
        }
    }

    /// HTTP/3 to the backend failed: TCP from now on, and its advertisements are not believed for
    /// a while.
    pub fn failed(&self, host: &Arc<str>, port: u16) {
        let mut entries = self.entries.lock();
        if entries.len() < MAX_ENTRIES || entries.contains_key(&(host.clone(), port)) {
            entries.insert((host.clone(), port), Entry::Failed(Instant::now() + FAILED_FOR));
        } else {
            entries.remove(&(host.clone(), port));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in values {
            map.append(http::header::ALT_SVC, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn h3_on_the_same_host_is_read_with_its_max_age() {
        assert_eq!(advertised(&headers(&[r#"h3=":443"; ma=3600"#])), Some(Advertised::H3 { port: 443, max_age: Duration::from_secs(3600) }));
        assert_eq!(advertised(&headers(&[r#"h3=":8443""#])), Some(Advertised::H3 { port: 8443, max_age: DEFAULT_MAX_AGE }));
        assert_eq!(advertised(&headers(&[r#"h2=":443", h3-29=":443", h3=":4433"; ma=60; persist=1"#])), Some(Advertised::H3 { port: 4433, max_age: Duration::from_secs(60) }));
        assert_eq!(advertised(&headers(&[r#"h3=":443"; ma=99999999"#])), Some(Advertised::H3 { port: 443, max_age: DEFAULT_MAX_AGE }));
        assert_eq!(advertised(&headers(&["clear"])), Some(Advertised::Clear));
    }

    #[test]
    fn other_hosts_protocols_and_nonsense_are_ignored() {
        for value in [r#"h3="other.example:443""#, r#"h2=":443""#, r#"h3=":0""#, r#"h3=":99999""#, "h3=:443", r#"h3=":443"; ma=soon"#, "", r#"h3="a,b:443""#] {
            assert_eq!(advertised(&headers(&[value])), None, "{value}");
        }
        assert_eq!(advertised(&HeaderMap::new()), None);
    }

    #[test]
    fn the_cache_learns_clears_and_distrusts_a_failed_backend() {
        let cache = AltSvcCache::default();
        let host: Arc<str> = Arc::from("backend");
        cache.learn(&host, 443, &headers(&[r#"h3=":8443""#]));
        assert_eq!(cache.h3_port(&host, 443), Some(8443));
        assert_eq!(cache.h3_port(&host, 444), None);
        cache.learn(&host, 443, &headers(&["clear"]));
        assert_eq!(cache.h3_port(&host, 443), None);
        cache.learn(&host, 443, &headers(&[r#"h3=":8443"; ma=0"#]));
        assert_eq!(cache.h3_port(&host, 443), None);
        cache.learn(&host, 443, &headers(&[r#"h3=":8443""#]));
        cache.failed(&host, 443);
        assert_eq!(cache.h3_port(&host, 443), None);
        // Its next advertisement is not believed.
        cache.learn(&host, 443, &headers(&[r#"h3=":8443""#]));
        assert_eq!(cache.h3_port(&host, 443), None);
    }
}
