//! What ends an HTTP connection from outside its serving loop: the engine draining, then force-closing; the
//! connection sitting idle past its timeout (with a request in flight: the idle timeout; between
//! requests: the keep-alive timeout, or the head timeout once a later HTTP/1.x head has begun);
//! its lifetime running out. The connection's future
//! wakes the session task on every read, write and upstream answer, while these fire a few times
//! per connection at most, so the watchdog runs wake-gated (`crate::wake_gate`): the session task
//! polls it only after its timer or (once it waits on it) its token woke it, instead of re-polling
//! both on every wake.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::http::io::ClientCounters;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEvent {
    /// The engine is stopping: finish in-flight requests, take no new ones.
    Draining,
    /// The grace period is over (or was skipped): close now.
    ForceClose,
    IdleTimeout,
    KeepAliveTimeout,
    HeadTimeout,
    LifetimeExceeded,
}

/// What the watchdog waits for, and what it waits on.
pub struct Watch<'a> {
    /// Cancelled when a stop begins. A child of `force_close`, so it is cancelled by either.
    pub draining: &'a CancellationToken,
    pub force_close: &'a CancellationToken,
    pub counters: Arc<ClientCounters>,
    pub idle_timeout: Duration,
    pub keep_alive_timeout: Duration,
    pub header_timeout: Duration,
    pub deadline: Instant,
}

impl Watch<'_> {
    /// The next event. Before `Draining` was reported it waits on `draining` (which a force close
    /// cancels too), afterwards on `force_close`: one token at a time, and one timer for both the
    /// idle timeout and the lifetime. A connection joins `draining`'s waiters only from the
    /// timer's first check on (`JOIN_DRAIN_WAITERS_AFTER`), and looks at the token before that.
    /// (Polled by hand rather than through `select!`: what every connection holds while it
    /// waits is the timer, the token's wait and a reference, and no copies of them.)
    pub async fn next(&self, draining_reported: bool) -> WatchEvent {
        let token = if draining_reported { self.force_close } else { self.draining };
        // Once draining was reported, a force close must end the connection at once: its wait is
        // joined from the start.
        let mut joined = draining_reported;
        let first_recheck = if joined { self.recheck_period() } else { self.recheck_period().min(JOIN_DRAIN_WAITERS_AFTER) };
        let timer = std::pin::pin!(tokio::time::sleep_until(self.next_check(first_recheck).into()));
        let cancelled = std::pin::pin!(token.cancelled());
        let mut waits = (timer, cancelled);
        std::future::poll_fn(move |cx| {
            let (timer, cancelled) = &mut waits;
            let stopping = if joined { cancelled.as_mut().poll(cx).is_ready() } else { token.is_cancelled() };
            if stopping {
                return Poll::Ready(self.stop_event());
            }
            while timer.as_mut().poll(cx).is_ready() {
                let now = Instant::now();
                if self.deadline <= now {
                    return Poll::Ready(WatchEvent::LifetimeExceeded);
                }
                // Activity since the timer was set moved the idle point on.
                let (idle_at, event) = self.idle_at();
                if idle_at <= now {
                    return Poll::Ready(event);
                }
                if !joined {
                    joined = true;
                    if cancelled.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(self.stop_event());
                    }
                }
                timer.as_mut().reset(self.next_check(self.recheck_period()).into());
            }
            Poll::Pending
        })
        .await
    }

    fn stop_event(&self) -> WatchEvent {
        if self.force_close.is_cancelled() {
            WatchEvent::ForceClose
        } else {
            WatchEvent::Draining
        }
    }

    /// When the connection has waited too long, and what it then waited for.
    fn idle_at(&self) -> (Instant, WatchEvent) {
        let counters = &self.counters;
        if counters.in_flight() > 0 {
            return (after(counters.last_activity(), self.idle_timeout), WatchEvent::IdleTimeout);
        }
        if let Some(started) = counters.head_started() {
            return (after(started, self.header_timeout), WatchEvent::HeadTimeout);
        }
        // Between requests both bound the wait; the shorter one says why it ended.
        let idle = counters.last_activity();
        if self.keep_alive_timeout <= self.idle_timeout {
            (after(idle, self.keep_alive_timeout), WatchEvent::KeepAliveTimeout)
        } else {
            (after(idle, self.idle_timeout), WatchEvent::IdleTimeout)
        }
    }

    /// The earliest point something may be due, and no later than `recheck_after` from now.
    fn next_check(&self, recheck_after: Duration) -> Instant {
        let recheck = after(Instant::now(), recheck_after);
        self.idle_at().0.min(self.deadline).min(recheck)
    }

    /// Activity only moves points later, but a request ending or a head beginning can move the
    /// point earlier than the timer was set for, so the timer also looks again every half head
    /// timeout: a head is cut by 1.5 times `headerTimeout` at worst, a keep-alive wait never
    /// before its timeout.
    fn recheck_period(&self) -> Duration {
        (self.header_timeout / 2).max(Duration::from_millis(10))
    }
}

/// How long a connection's watchdog only looks at the drain token when its timer wakes it,
/// before it joins the token's waiters (a lock to join, another to leave): a connection that ends
/// sooner, as most that carry one request do, never joins, and one that is this young when a stop
/// begins hears of it this much later at most, and so of a force close that comes before its
/// first check (a stop with a grace period this short). A connection that was told of the drain
/// hears the force close at once.
const JOIN_DRAIN_WAITERS_AFTER: Duration = Duration::from_millis(100);

/// `at + wait`, or a year on for a wait too long to add (configured timeouts may be huge).
fn after(at: Instant, wait: Duration) -> Instant {
    at.checked_add(wait).unwrap_or_else(|| at + Duration::from_secs(365 * 24 * 3600))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wake_gate::WakeGated;

    /// The engine's two tokens (draining a child of force_close) and one connection's counters.
    struct Fixture {
        force_close: CancellationToken,
        draining: CancellationToken,
        counters: Arc<ClientCounters>,
    }

    impl Fixture {
        fn new() -> Fixture {
            let force_close = CancellationToken::new();
            let draining = force_close.child_token();
            let limiter = Arc::new(crate::security::ConnectionLimiter::new(0, 0));
            let ip_slot = limiter.admit(std::net::Ipv4Addr::LOCALHOST.into()).expect("no limits");
            let counters = Arc::new(ClientCounters::new(Arc::new(crate::metrics::EngineMetrics::default()), ip_slot));
            Fixture { force_close, draining, counters }
        }

        fn watch(&self, idle_timeout: Duration, lifetime: Duration) -> Watch<'_> {
            Watch {
                draining: &self.draining,
                force_close: &self.force_close,
                counters: self.counters.clone(),
                idle_timeout,
                keep_alive_timeout: idle_timeout * 10,
                header_timeout: idle_timeout * 10,
                deadline: Instant::now() + lifetime,
            }
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    /// The watchdog's next event; a watchdog that never reports one fails the test instead of
    /// hanging it.
    async fn next_event(watch: &Watch<'_>, draining_reported: bool) -> WatchEvent {
        tokio::time::timeout(Duration::from_secs(5), WakeGated::with_owner(watch.next(draining_reported), watch.counters.clone())).await.expect("the watchdog reported an event")
    }

    #[tokio::test]
    async fn reports_draining_then_force_close() {
        let fixture = Fixture::new();
        let watch = fixture.watch(HOUR, 2 * HOUR);
        fixture.draining.cancel();
        assert_eq!(next_event(&watch, false).await, WatchEvent::Draining);
        let after_drain = tokio::spawn({
            let force_close = fixture.force_close.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                force_close.cancel();
            }
        });
        assert_eq!(next_event(&watch, true).await, WatchEvent::ForceClose);
        after_drain.await.expect("the canceller ran");
    }

    #[tokio::test]
    async fn a_drain_that_begins_while_the_watchdog_waits_is_reported() {
        // Before the watchdog joined the token's waiters, and after.
        for delay in [Duration::from_millis(5), JOIN_DRAIN_WAITERS_AFTER * 2] {
            let fixture = Fixture::new();
            let watch = fixture.watch(HOUR, 2 * HOUR);
            let draining = fixture.draining.clone();
            let canceller = tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                draining.cancel();
            });
            assert_eq!(next_event(&watch, false).await, WatchEvent::Draining, "a drain {delay:?} after the watchdog started");
            canceller.await.expect("the canceller ran");
        }
    }

    #[tokio::test]
    async fn a_force_close_without_a_drain_is_reported_as_such() {
        let fixture = Fixture::new();
        fixture.force_close.cancel();
        assert_eq!(next_event(&fixture.watch(HOUR, 2 * HOUR), false).await, WatchEvent::ForceClose);
    }

    #[tokio::test]
    async fn idle_and_lifetime_share_one_timer() {
        let fixture = Fixture::new();
        let idle = fixture.watch(Duration::from_millis(30), HOUR);
        assert_eq!(next_event(&idle, false).await, WatchEvent::IdleTimeout);
        let lifetime = fixture.watch(HOUR, Duration::from_millis(30));
        assert_eq!(next_event(&lifetime, false).await, WatchEvent::LifetimeExceeded);
    }

    #[tokio::test]
    async fn between_requests_the_keep_alive_timeout_applies_and_a_begun_head_has_its_own() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let fixture = Fixture::new();
        let short = Duration::from_millis(30);
        let watch = |idle_timeout, keep_alive_timeout, header_timeout, lifetime| Watch {
            draining: &fixture.draining,
            force_close: &fixture.force_close,
            counters: fixture.counters.clone(),
            idle_timeout,
            keep_alive_timeout,
            header_timeout,
            deadline: Instant::now() + lifetime,
        };
        assert_eq!(next_event(&watch(HOUR, short, HOUR, HOUR), false).await, WatchEvent::KeepAliveTimeout);
        // With a request in flight the keep-alive timeout does not apply: the lifetime ends it.
        let in_flight = fixture.counters.request_started();
        assert_eq!(next_event(&watch(HOUR, short, short, 3 * short), false).await, WatchEvent::LifetimeExceeded);
        drop(in_flight);
        // The first bytes of a later HTTP/1.x head start its own timer.
        fixture.counters.time_heads();
        let (mut client, server) = tokio::io::duplex(64);
        let mut io = crate::http::io::ClientIo::new(server, fixture.counters.clone());
        client.write_all(b"GE").await.expect("write");
        let mut buf = [0u8; 8];
        assert_eq!(io.read(&mut buf).await.expect("read"), 2);
        assert!(fixture.counters.head_started().is_some());
        assert_eq!(next_event(&watch(HOUR, HOUR, short, HOUR), false).await, WatchEvent::HeadTimeout);
        // Its request came: the head timer is gone.
        let _in_flight = fixture.counters.request_started();
        assert!(fixture.counters.head_started().is_none());
    }
}
