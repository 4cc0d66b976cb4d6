//! Admission at L4: allow/block lists, per-client-IP concurrency and connection rate, per-route
//! concurrency. Every admission returns a guard that releases what it took when dropped, so a
//! connection's counters are released exactly once on every exit path. Knows nothing of napi or
//! of how connections are relayed.

pub mod http;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::metrics::{ByteCounters, Rate, RateRing, RouteStats, PER_KEY_HISTORY_SECONDS};
use crate::matchers::ip::IpList;

/// An allow list and a block list: block beats allow; an empty allow list admits everyone.
#[derive(Debug, Clone, Default)]
pub struct IpPolicy {
    pub allow: IpList,
    pub block: IpList,
}

impl IpPolicy {
    pub fn admits(&self, ip: IpAddr) -> bool {
        !self.block.matches(ip) && (self.allow.is_empty() || self.allow.matches(ip))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpRefusal {
    /// `maxConnectionsPerIP` concurrent connections are already open from this IP.
    TooManyConnections,
    /// Over `connectionRateLimitPerMinute` new connections from this IP.
    RateLimited,
}

/// Per-client-IP admission: concurrency and a GCRA rate limit (one timestamp per IP instead of a
/// list of recent connection times, so a flood costs a constant amount of memory per address).
#[derive(Debug)]
pub struct ConnectionLimiter {
    max_per_ip: u32,
    emission_interval: Duration,
    burst_tolerance: Duration,
    ips: Mutex<HashMap<IpAddr, IpEntry>>,
}

#[derive(Debug)]
struct IpEntry {
    share: Arc<IpShare>,
    /// GCRA's theoretical arrival time of the next connection.
    next_arrival: Instant,
    ring: RateRing,
}

/// What an address's open connections share with the limiter: their bytes, and how many they
/// are. A connection gives its slot back by one atomic decrement, without the limiter's lock or a
/// second lookup of its address.
#[derive(Debug, Default)]
struct IpShare {
    bytes: ByteCounters,
    active: AtomicU32,
}

impl ConnectionLimiter {
    /// `0` disables a limit.
    pub fn new(max_per_ip: u32, per_minute: u32) -> Self {
        let window = Duration::from_secs(60);
        let emission_interval = if per_minute == 0 { Duration::ZERO } else { window / per_minute };
        ConnectionLimiter {
            max_per_ip,
            emission_interval,
            burst_tolerance: window.saturating_sub(emission_interval),
            ips: Mutex::new(HashMap::new()),
        }
    }

    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<IpGuard, IpRefusal> {
        let now = Instant::now();
        let mut ips = self.ips.lock();
        let entry = ips.entry(ip).or_insert_with(|| IpEntry {
            share: Arc::default(),
            next_arrival: now,
            ring: RateRing::new(PER_KEY_HISTORY_SECONDS),
        });
        // Slots are taken only under the lock and given back by decrements: a count read here
        // can only be too high, never let one connection too many in.
        if self.max_per_ip > 0 && entry.share.active.load(Ordering::Acquire) >= self.max_per_ip {
            return Err(IpRefusal::TooManyConnections);
        }
        if !self.emission_interval.is_zero() {
            let arrival = entry.next_arrival.max(now);
            if arrival.duration_since(now) > self.burst_tolerance {
                return Err(IpRefusal::RateLimited);
            }
            entry.next_arrival = arrival + self.emission_interval;
        }
        entry.share.active.fetch_add(1, Ordering::Relaxed);
        Ok(IpGuard { share: entry.share.clone() })
    }

    /// Drops addresses with no open connection whose rate state has fully recovered; called by the
    /// engine's once-a-second sampler, which also records each address's throughput.
    pub fn sample_and_sweep(&self, now_ms: u64) {
        let now = Instant::now();
        let mut ips = self.ips.lock();
        // An address with no open connection has no guard left that could count it again: a
        // connection that comes later makes a fresh entry, under this lock.
        ips.retain(|_, e| e.share.active.load(Ordering::Acquire) > 0 || e.next_arrival > now);
        for entry in ips.values_mut() {
            let (i, o) = entry.share.bytes.totals();
            entry.ring.push(now_ms, i, o, 0, 0);
        }
    }

    /// Open connections per client IP (addresses with none are left out).
    pub fn active_by_ip(&self) -> Vec<(IpAddr, u32)> {
        let ips = self.ips.lock();
        ips.iter().map(|(ip, e)| (*ip, e.share.active.load(Ordering::Relaxed))).filter(|(_, active)| *active > 0).collect()
    }

    pub fn throughput_by_ip(&self, seconds: usize) -> Vec<(IpAddr, Rate)> {
        self.ips.lock().iter().map(|(ip, e)| (*ip, e.ring.rate(seconds))).collect()
    }

    #[cfg(test)]
    fn tracked_ips(&self) -> usize {
        self.ips.lock().len()
    }
}

/// One admitted connection from an IP; dropping it releases the IP's concurrency slot.
#[derive(Debug)]
pub struct IpGuard {
    share: Arc<IpShare>,
}

impl IpGuard {
    /// The address's byte counters, which its connections add to.
    pub fn bytes(&self) -> &ByteCounters {
        &self.share.bytes
    }
}

impl Drop for IpGuard {
    fn drop(&mut self) {
        // Release: the sweep that sees the count fall to zero sees this connection's bytes.
        self.share.active.fetch_sub(1, Ordering::Release);
    }
}

/// A connection counted against its route (`maxConnections` and per-route metrics).
#[derive(Debug)]
pub struct RouteGuard {
    pub stats: Arc<RouteStats>,
    limited: bool,
}

impl RouteGuard {
    /// `None` when the route already has `max` connections.
    pub fn acquire(stats: &Arc<RouteStats>, max: Option<u32>) -> Option<RouteGuard> {
        let limit = max.map_or(u64::MAX, u64::from);
        stats
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1))
            .ok()?;
        stats.total.fetch_add(1, Ordering::Relaxed);
        Some(RouteGuard { stats: stats.clone(), limited: max.is_some() })
    }

    /// The route has a `maxConnections`: holding this slot keeps someone else out.
    pub fn is_limited(&self) -> bool {
        self.limited
    }
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        self.stats.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn per_ip_concurrency_is_released_by_the_guard() {
        let limiter = Arc::new(ConnectionLimiter::new(2, 0));
        let a = limiter.admit(ip("10.0.0.1")).expect("first");
        let _b = limiter.admit(ip("10.0.0.1")).expect("second");
        assert_eq!(limiter.admit(ip("10.0.0.1")).unwrap_err(), IpRefusal::TooManyConnections);
        assert!(limiter.admit(ip("10.0.0.2")).is_ok(), "other IPs are not affected");
        drop(a);
        assert!(limiter.admit(ip("10.0.0.1")).is_ok());
    }

    #[test]
    fn the_rate_limit_allows_a_burst_of_the_per_minute_budget() {
        let limiter = Arc::new(ConnectionLimiter::new(0, 5));
        for _ in 0..5 {
            drop(limiter.admit(ip("10.0.0.1")).expect("within budget"));
        }
        assert_eq!(limiter.admit(ip("10.0.0.1")).unwrap_err(), IpRefusal::RateLimited);
    }

    #[test]
    fn recovered_idle_addresses_are_forgotten() {
        let limiter = Arc::new(ConnectionLimiter::new(10, 0));
        for n in 0..100u8 {
            drop(limiter.admit(IpAddr::from([10, 0, 0, n])).expect("admit"));
        }
        let held = limiter.admit(ip("10.1.1.1")).expect("admit");
        limiter.sample_and_sweep(0);
        assert_eq!(limiter.tracked_ips(), 1);
        drop(held);
        limiter.sample_and_sweep(1000);
        assert_eq!(limiter.tracked_ips(), 0);
    }

    #[test]
    fn route_slots_stop_at_max_and_come_back() {
        let stats = Arc::new(RouteStats::default());
        let a = RouteGuard::acquire(&stats, Some(1)).expect("first");
        assert!(RouteGuard::acquire(&stats, Some(1)).is_none());
        drop(a);
        assert!(RouteGuard::acquire(&stats, Some(1)).is_some());
        assert_eq!(stats.total.load(Ordering::Relaxed), 2);
    }
}
