//! A millisecond clock for what only needs to know roughly when: the last activity of a
//! connection (for idle and header timeouts), the age of a pooled connection. It is the kernel's
//! coarse monotonic clock, which the vDSO reads without the cycle counter and the scaling a
//! precise reading takes: these times are taken on every read and write, where `Instant::now`
//! and the arithmetic of `elapsed` were a measurable part of a request. It is the clock `Instant`
//! reads (CLOCK_MONOTONIC) at the kernel tick's resolution, so a time converts to an `Instant`
//! within a tick (`instant_at`).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Milliseconds on the coarse monotonic clock (from an arbitrary start, the same for the whole
/// process).
#[cfg(target_os = "linux")]
pub fn coarse_ms() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: one valid timespec to write; CLOCK_MONOTONIC_COARSE exists on every Linux since 2.6.32.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    now.tv_sec as u64 * 1000 + now.tv_nsec as u64 / 1_000_000
}

#[cfg(not(target_os = "linux"))]
pub fn coarse_ms() -> u64 {
    reference().0.elapsed().as_millis() as u64 + reference().1
}

/// An `Instant` and the coarse clock's reading taken together, to convert between them.
fn reference() -> &'static (Instant, u64) {
    static REFERENCE: OnceLock<(Instant, u64)> = OnceLock::new();
    #[cfg(target_os = "linux")]
    let taken = || (Instant::now(), coarse_ms());
    #[cfg(not(target_os = "linux"))]
    let taken = || (Instant::now(), 1 << 32);
    REFERENCE.get_or_init(taken)
}

/// The `Instant` of a coarse clock reading (within a tick of the precise clock's).
pub fn instant_at(ms: u64) -> Instant {
    let (instant, at) = *reference();
    if ms >= at {
        instant + Duration::from_millis(ms - at)
    } else {
        instant.checked_sub(Duration::from_millis(at - ms)).unwrap_or(instant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coarse_clock_moves_with_the_precise_one_within_a_tick_or_two() {
        let start = Instant::now();
        let start_ms = coarse_ms();
        std::thread::sleep(Duration::from_millis(60));
        let elapsed_ms = coarse_ms() - start_ms;
        let precise = start.elapsed().as_millis() as u64;
        // The coarse clock moves by the kernel's tick (CONFIG_HZ).
        assert!(elapsed_ms + 20 >= precise && elapsed_ms <= precise + 20, "coarse {elapsed_ms} ms, precise {precise} ms");
        let converted = instant_at(coarse_ms());
        let now = Instant::now();
        assert!(converted <= now + Duration::from_millis(20) && now <= converted + Duration::from_millis(20));
    }
}
