//! Load balancing over a route's backend set: weighted round robin, least connections and ip-hash
//! (weighted rendezvous hashing: removing a backend moves only its own clients), skipping
//! backends marked down unless all are (fail open). Each backend's health and in-flight count
//! live in a `BackendState` kept across route updates; a `Lease` holds one in-flight slot and
//! gives it back exactly once, when dropped. Active probes live in `health`; session affinity in
//! `affinity`, whose Redis calls go through `shared_state`.

pub mod affinity;
pub mod health;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::Serialize;

pub use crate::config::BalanceAlgorithm as Algorithm;

/// Without active checks, a backend marked down by failed connects gets traffic again after this.
const PASSIVE_RETRY_AFTER: Duration = Duration::from_secs(10);
/// Passive thresholds where the route configures no health check.
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 3;
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 2;

/// When a backend counts as down, and who brings it back.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    pub unhealthy: u32,
    pub healthy: u32,
    /// Active probes run: a down backend stays down until they see it healthy.
    pub active: bool,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds { unhealthy: DEFAULT_UNHEALTHY_THRESHOLD, healthy: DEFAULT_HEALTHY_THRESHOLD, active: false }
    }
}

/// One backend's health and load, shared by every table that names it.
#[derive(Debug)]
pub struct BackendState {
    pub host: String,
    pub port: u16,
    id: String,
    up: AtomicBool,
    failures: AtomicU32,
    successes: AtomicU32,
    /// When it went down (ms since the epoch), for the passive retry.
    down_since_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl BackendState {
    fn new(host: &str, port: u16) -> BackendState {
        BackendState {
            host: host.to_string(),
            port,
            id: format!("{host}:{port}"),
            up: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            successes: AtomicU32::new(0),
            down_since_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    /// A probe's or a real connect's outcome.
    pub fn record(&self, ok: bool, thresholds: Thresholds) {
        if ok {
            self.failures.store(0, Ordering::Relaxed);
            let successes = self.successes.fetch_add(1, Ordering::Relaxed) + 1;
            if !self.up.load(Ordering::Relaxed) && successes >= thresholds.healthy.max(1) {
                self.up.store(true, Ordering::Relaxed);
                tracing::info!(host = %self.host, port = self.port, "backend is healthy again");
            }
        } else {
            self.successes.store(0, Ordering::Relaxed);
            let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
            if failures >= thresholds.unhealthy.max(1) && self.up.swap(false, Ordering::Relaxed) {
                self.down_since_ms.store(now_ms(), Ordering::Relaxed);
                tracing::warn!(host = %self.host, port = self.port, "backend marked down");
            }
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// May take traffic now: up, or down long enough for a passive retry.
    fn eligible(&self, thresholds: Thresholds, now_ms: u64) -> bool {
        self.is_up() || (!thresholds.active && now_ms.saturating_sub(self.down_since_ms.load(Ordering::Relaxed)) >= PASSIVE_RETRY_AFTER.as_millis() as u64)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// `host:port`: how affinity bindings name it.
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// Backend states by (route, host, port), kept across route tables.
#[derive(Debug, Default)]
pub struct BackendRegistry {
    states: Mutex<HashMap<(Arc<str>, String, u16), Arc<BackendState>>>,
}

impl BackendRegistry {
    pub fn state(&self, route: &Arc<str>, host: &str, port: u16) -> Arc<BackendState> {
        self.states
            .lock()
            .entry((route.clone(), host.to_string(), port))
            .or_insert_with(|| Arc::new(BackendState::new(host, port)))
            .clone()
    }

    /// Forgets backends no table refers to any more.
    pub fn prune(&self) {
        self.states.lock().retain(|_, state| Arc::strong_count(state) > 1);
    }
}

/// One in-flight connection or request on a backend; released when dropped.
#[derive(Debug)]
pub struct Lease {
    state: Arc<BackendState>,
    thresholds: Thresholds,
}

impl Lease {
    fn new(state: Arc<BackendState>, thresholds: Thresholds) -> Lease {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        Lease { state, thresholds }
    }

    /// Passive health: the outcome of connecting to this backend for real traffic.
    pub fn report_connect(&self, ok: bool) {
        self.state.record(ok, self.thresholds);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A candidate as the picker sees it: its weight and state.
pub trait Candidate {
    fn weight(&self) -> u32;
    fn state(&self) -> &Arc<BackendState>;
}

/// Picks one of `candidates` (an iterator that can be walked several times) and leases it.
/// `turn` is the route's rotation counter. Returns the candidate's position.
pub fn pick<'a, C: Candidate + 'a, I>(candidates: I, algorithm: Algorithm, thresholds: Thresholds, turn: &AtomicUsize, client_ip: IpAddr) -> Option<(usize, Lease)>
where
    I: Iterator<Item = &'a C> + Clone,
{
    // One candidate is the pick whatever its health (failing open), and reading the clock for
    // that would be wasted.
    let mut probe = candidates.clone();
    if let (Some(only), None) = (probe.next(), probe.next()) {
        return Some((0, Lease::new(only.state().clone(), thresholds)));
    }
    let now = now_ms();
    let chosen = choose(candidates.clone(), algorithm, turn, client_ip, |c| c.state().eligible(thresholds, now))
        // Every backend down: fail open, traffic goes to them anyway.
        .or_else(|| choose(candidates.clone(), algorithm, turn, client_ip, |_| true))?;
    let state = candidates.clone().nth(chosen)?.state().clone();
    Some((chosen, Lease::new(state, thresholds)))
}

/// Leases the candidate whose backend is `host:port`, when it may take traffic.
pub fn pick_bound<'a, C: Candidate + 'a, I>(candidates: I, backend: &str, thresholds: Thresholds) -> Option<(usize, Lease)>
where
    I: Iterator<Item = &'a C>,
{
    let now = now_ms();
    let (position, candidate) = candidates.enumerate().find(|(_, c)| c.state().id() == backend)?;
    if !candidate.state().eligible(thresholds, now) {
        return None;
    }
    Some((position, Lease::new(candidate.state().clone(), thresholds)))
}

fn choose<'a, C: Candidate + 'a, I>(candidates: I, algorithm: Algorithm, turn: &AtomicUsize, client_ip: IpAddr, usable: impl Fn(&C) -> bool) -> Option<usize>
where
    I: Iterator<Item = &'a C> + Clone,
{
    let total: u64 = candidates.clone().filter(|c| usable(c)).map(|c| u64::from(c.weight().max(1))).sum();
    if total == 0 {
        return None;
    }
    match algorithm {
        Algorithm::RoundRobin => {
            // A permutation of 0..total spreads each backend's share over the cycle, and every
            // `total` consecutive picks give each backend exactly its weight.
            let n = turn.fetch_add(1, Ordering::Relaxed) as u64 % total;
            let step = if total % ROUND_ROBIN_STEP == 0 { 1 } else { ROUND_ROBIN_STEP };
            let mut slot = (n * step) % total;
            for (i, c) in candidates.enumerate() {
                if !usable(c) {
                    continue;
                }
                let weight = u64::from(c.weight().max(1));
                if slot < weight {
                    return Some(i);
                }
                slot -= weight;
            }
            None
        }
        Algorithm::LeastConnections => {
            // Fewest in flight per unit of weight; ties go round robin.
            let start = turn.fetch_add(1, Ordering::Relaxed);
            let count = candidates.clone().count();
            let mut best: Option<(usize, u64, u64)> = None;
            for offset in 0..count {
                let i = (start + offset) % count;
                let Some(c) = candidates.clone().nth(i) else { continue };
                if !usable(c) {
                    continue;
                }
                let (load, weight) = (c.state().in_flight() as u64, u64::from(c.weight().max(1)));
                // load/weight < best_load/best_weight, without division.
                if best.is_none_or(|(_, best_load, best_weight)| load * best_weight < best_load * weight) {
                    best = Some((i, load, weight));
                }
            }
            best.map(|(i, _, _)| i)
        }
        Algorithm::IpHash => {
            let mut best: Option<(usize, f64)> = None;
            for (i, c) in candidates.enumerate() {
                if !usable(c) {
                    continue;
                }
                let score = rendezvous_score(client_ip, c.state(), c.weight());
                if best.is_none_or(|(_, best_score)| score > best_score) {
                    best = Some((i, score));
                }
            }
            best.map(|(i, _)| i)
        }
    }
}

/// Coprime with most cycle lengths; only spreads the order, any odd prime would do.
const ROUND_ROBIN_STEP: u64 = 7919;

/// Weighted rendezvous (highest random weight): `-weight / ln(h)` with h uniform in (0, 1).
fn rendezvous_score(client_ip: IpAddr, backend: &BackendState, weight: u32) -> f64 {
    let mut hasher = Fnv1a::default();
    client_ip.hash(&mut hasher);
    backend.host.hash(&mut hasher);
    backend.port.hash(&mut hasher);
    let hash = mix(hasher.finish());
    let unit = ((hash >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -f64::from(weight.max(1)) / unit.ln()
}

/// Stable across processes and releases (replicas must agree), unlike `DefaultHasher`.
#[derive(Default)]
struct Fnv1a(u64);

impl Hasher for Fnv1a {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        if self.0 == 0 {
            self.0 = 0xcbf2_9ce4_8422_2325;
        }
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// splitmix64's finaliser: FNV's low bits are weak.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// `getStatistics().backends[route]`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendStatus {
    pub host: String,
    pub port: u16,
    pub healthy: bool,
    pub in_flight: usize,
}

impl From<&BackendState> for BackendStatus {
    fn from(state: &BackendState) -> Self {
        BackendStatus { host: state.host.clone(), port: state.port, healthy: state.is_up(), in_flight: state.in_flight() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Test(u32, Arc<BackendState>);
    impl Candidate for Test {
        fn weight(&self) -> u32 {
            self.0
        }
        fn state(&self) -> &Arc<BackendState> {
            &self.1
        }
    }

    fn backends(weights: &[u32]) -> Vec<Test> {
        weights.iter().enumerate().map(|(i, w)| Test(*w, Arc::new(BackendState::new("10.0.0.1", 8000 + i as u16)))).collect()
    }

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(n.to_be_bytes())
    }

    #[test]
    fn weighted_round_robin_gives_exact_shares_per_cycle_and_interleaves() {
        let set = backends(&[3, 1, 1]);
        let turn = AtomicUsize::new(0);
        let picks: Vec<usize> = (0..100).map(|_| pick(set.iter(), Algorithm::RoundRobin, Thresholds::default(), &turn, ip(1)).unwrap().0).collect();
        let count = |b| picks.iter().filter(|p| **p == b).count();
        assert_eq!((count(0), count(1), count(2)), (60, 20, 20));
        // Not three in a row then the others: the permutation spreads them.
        assert_ne!(&picks[0..3], &[0, 0, 0]);
    }

    #[test]
    fn down_backends_are_skipped_unless_all_are_down() {
        let set = backends(&[1, 1, 1]);
        let thresholds = Thresholds { unhealthy: 1, healthy: 1, active: true };
        set[1].1.record(false, thresholds);
        let turn = AtomicUsize::new(0);
        for _ in 0..30 {
            assert_ne!(pick(set.iter(), Algorithm::RoundRobin, thresholds, &turn, ip(1)).unwrap().0, 1);
        }
        set[0].1.record(false, thresholds);
        set[2].1.record(false, thresholds);
        assert!(pick(set.iter(), Algorithm::RoundRobin, thresholds, &turn, ip(1)).is_some(), "fail open");
        set[1].1.record(true, thresholds);
        assert_eq!(pick(set.iter(), Algorithm::LeastConnections, thresholds, &turn, ip(1)).unwrap().0, 1);
    }

    #[test]
    fn least_connections_counts_leases_until_dropped() {
        let set = backends(&[1, 1, 1]);
        let turn = AtomicUsize::new(0);
        let t = Thresholds::default();
        let a = pick(set.iter(), Algorithm::LeastConnections, t, &turn, ip(1)).unwrap();
        let b = pick(set.iter(), Algorithm::LeastConnections, t, &turn, ip(1)).unwrap();
        assert_ne!(a.0, b.0);
        let freed = b.0;
        drop(b);
        let c = pick(set.iter(), Algorithm::LeastConnections, t, &turn, ip(1)).unwrap();
        let d = pick(set.iter(), Algorithm::LeastConnections, t, &turn, ip(1)).unwrap();
        assert!(c.0 == freed || d.0 == freed);
        assert_eq!(set.iter().map(|s| s.1.in_flight()).sum::<usize>(), 3);
        drop((a, c, d));
        assert_eq!(set.iter().map(|s| s.1.in_flight()).sum::<usize>(), 0);
    }

    #[test]
    fn ip_hash_is_stable_and_moves_only_the_removed_backends_clients() {
        let set = backends(&[1, 1, 1]);
        let turn = AtomicUsize::new(0);
        let t = Thresholds::default();
        let before: Vec<usize> = (0..3000).map(|n| pick(set.iter(), Algorithm::IpHash, t, &turn, ip(n)).unwrap().0).collect();
        for b in 0..3 {
            let share = before.iter().filter(|p| **p == b).count();
            assert!((800..1200).contains(&share), "backend {b} got {share} of 3000");
        }
        let again: Vec<usize> = (0..3000).map(|n| pick(set.iter(), Algorithm::IpHash, t, &turn, ip(n)).unwrap().0).collect();
        assert_eq!(before, again);
        let without_last: Vec<Test> = set.into_iter().take(2).collect();
        for n in 0..3000 {
            let after = pick(without_last.iter(), Algorithm::IpHash, t, &turn, ip(n)).unwrap().0;
            if before[n as usize] != 2 {
                assert_eq!(after, before[n as usize], "client {n} moved although its backend stayed");
            }
        }
    }

    #[test]
    fn passive_marks_need_the_threshold_and_successes_bring_it_back() {
        let state = BackendState::new("h", 1);
        let t = Thresholds { unhealthy: 3, healthy: 2, active: false };
        state.record(false, t);
        state.record(false, t);
        assert!(state.is_up());
        state.record(false, t);
        assert!(!state.is_up());
        assert!(!state.eligible(t, now_ms()));
        assert!(state.eligible(t, now_ms() + PASSIVE_RETRY_AFTER.as_millis() as u64));
        state.record(true, t);
        assert!(!state.is_up());
        state.record(true, t);
        assert!(state.is_up());
    }
}
