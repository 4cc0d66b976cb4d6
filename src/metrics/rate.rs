//! A ring of once-a-second samples of monotonic totals, from which rates over a window are read.

use std::collections::VecDeque;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub bytes_in_per_sec: f64,
    pub bytes_out_per_sec: f64,
    pub requests_per_sec: f64,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at_ms: u64,
    bytes_in: u64,
    bytes_out: u64,
    requests: u64,
    /// A gauge read at the sample's time (open connections), kept as it was.
    active: u64,
}

/// One sampled second: its wall-clock end, the rates over it, and the gauge at its end.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub at_ms: u64,
    pub rate: Rate,
    pub active: u64,
}

#[derive(Debug)]
pub struct RateRing {
    samples: VecDeque<Sample>,
    capacity: usize,
}

impl RateRing {
    /// Keeps `seconds` rates, so `seconds + 1` totals.
    pub fn new(seconds: usize) -> Self {
        RateRing { samples: VecDeque::new(), capacity: seconds + 1 }
    }

    pub fn push(&mut self, at_ms: u64, bytes_in: u64, bytes_out: u64, requests: u64, active: u64) {
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back(Sample { at_ms, bytes_in, bytes_out, requests, active });
    }

    /// Average rate over the last `seconds` (or over what has been sampled so far, if less).
    pub fn rate(&self, seconds: usize) -> Rate {
        let (Some(last), n) = (self.samples.back(), self.samples.len()) else {
            return Rate { bytes_in_per_sec: 0.0, bytes_out_per_sec: 0.0, requests_per_sec: 0.0 };
        };
        let back = seconds.max(1).min(n - 1);
        let first = self.samples[n - 1 - back];
        rate_between(&first, last)
    }

    /// One point per sampled second, oldest first.
    pub fn history(&self, seconds: usize) -> Vec<Point> {
        let n = self.samples.len();
        let start = n.saturating_sub(seconds.saturating_add(1));
        self.samples
            .range(start..)
            .zip(self.samples.range(start + 1..))
            .map(|(a, b)| Point { at_ms: b.at_ms, rate: rate_between(a, b), active: b.active })
            .collect()
    }
}

fn rate_between(first: &Sample, last: &Sample) -> Rate {
    if last.at_ms <= first.at_ms {
        return Rate { bytes_in_per_sec: 0.0, bytes_out_per_sec: 0.0, requests_per_sec: 0.0 };
    }
    let secs = (last.at_ms - first.at_ms) as f64 / 1000.0;
    Rate {
        bytes_in_per_sec: last.bytes_in.saturating_sub(first.bytes_in) as f64 / secs,
        bytes_out_per_sec: last.bytes_out.saturating_sub(first.bytes_out) as f64 / secs,
        requests_per_sec: last.requests.saturating_sub(first.requests) as f64 / secs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_deltas_over_elapsed_time() {
        let mut ring = RateRing::new(10);
        ring.push(0, 0, 0, 0, 0);
        ring.push(1000, 100, 10, 1, 4);
        ring.push(2000, 300, 30, 3, 2);
        assert_eq!(ring.rate(1).bytes_in_per_sec, 200.0);
        assert_eq!(ring.rate(10).bytes_in_per_sec, 150.0);
        assert_eq!(ring.history(5).len(), 2);
        assert_eq!(ring.history(1)[0].rate.bytes_out_per_sec, 20.0);
        assert_eq!(ring.history(5).iter().map(|p| p.active).collect::<Vec<_>>(), [4, 2]);
    }

    #[test]
    fn an_empty_or_single_sample_ring_reads_zero() {
        let mut ring = RateRing::new(3);
        assert_eq!(ring.rate(1).bytes_in_per_sec, 0.0);
        ring.push(5, 10, 10, 1, 0);
        assert_eq!(ring.rate(1).bytes_in_per_sec, 0.0);
        assert!(ring.history(3).is_empty());
    }

    #[test]
    fn the_ring_keeps_only_its_capacity() {
        let mut ring = RateRing::new(2);
        for s in 0..10u64 {
            ring.push(s * 1000, s * 10, 0, 0, 0);
        }
        assert_eq!(ring.history(100).len(), 2);
    }
}
