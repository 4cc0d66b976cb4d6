//! Polling a rarely ready future only after something it waits on woke it: a future that sits in
//! a `select!` beside a busy one (a connection's watchdog beside its serving, a listener's stop
//! beside its accepts) would otherwise be polled on every wake of the busy one, and a timer's or a
//! cancellation token's poll takes locks.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use atomic_waker::AtomicWaker;

/// Polls `inner` only on its first poll and after something `inner` waits on woke it; otherwise
/// answers `Pending` at the cost of two atomic operations. Meant for a future that sits in a
/// `select!` next to a busy one. The wake flag lives in `O`, which is the inner future's waker:
/// an allocation of its own, or one the gate's user already has (a connection's counters).
pub struct WakeGated<F, O: GateOwner = WakeFlag> {
    inner: Pin<Box<F>>,
    owner: Arc<O>,
    waker: Waker,
}

/// What a gate's wakes set.
pub struct WakeFlag {
    woken: AtomicBool,
    /// The waker of the task polling the gate, from its latest poll.
    task: AtomicWaker,
}

impl WakeFlag {
    pub fn new() -> WakeFlag {
        WakeFlag { woken: AtomicBool::new(true), task: AtomicWaker::new() }
    }

    pub fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Default for WakeFlag {
    fn default() -> Self {
        WakeFlag::new()
    }
}

/// Holds a gate's flag and wakes it (`Wake` calling `WakeFlag::wake`).
pub trait GateOwner: Wake + Send + Sync + 'static {
    fn wake_flag(&self) -> &WakeFlag;
}

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        WakeFlag::wake(&self);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        WakeFlag::wake(self);
    }
}

impl GateOwner for WakeFlag {
    fn wake_flag(&self) -> &WakeFlag {
        self
    }
}

impl<F: Future> WakeGated<F> {
    pub fn new(inner: F) -> Self {
        WakeGated::with_owner(inner, Arc::new(WakeFlag::new()))
    }
}

impl<F: Future, O: GateOwner> WakeGated<F, O> {
    /// A gate whose flag is `owner`'s. A gate that replaces another of the same owner may be made
    /// before the old one is dropped: the old one's wakes then only cost the new one a poll.
    pub fn with_owner(inner: F, owner: Arc<O>) -> Self {
        // Woken at the start: the first poll must reach `inner` so it registers its wakers.
        owner.wake_flag().woken.store(true, Ordering::Release);
        WakeGated { inner: Box::pin(inner), waker: Waker::from(owner.clone()), owner }
    }
}

impl<F: Future, O: GateOwner> Future for WakeGated<F, O> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let flag = this.owner.wake_flag();
        // Registered before the flag is read: a wake between the two is seen by the read, and a
        // wake after it reaches this task through the registered waker.
        flag.task.register(cx.waker());
        if !flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.inner.as_mut().poll(&mut Context::from_waker(&this.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls; ready once `ready` is set, and wakes whoever `wake_me` holds then.
    struct Probe {
        polls: Arc<AtomicUsize>,
        ready: Arc<AtomicBool>,
        wake_me: Arc<parking_lot::Mutex<Option<Waker>>>,
    }

    impl Future for Probe {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            if self.ready.load(Ordering::Relaxed) {
                return Poll::Ready(());
            }
            *self.wake_me.lock() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[test]
    fn inner_is_polled_only_after_its_own_wake() {
        let polls = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(AtomicBool::new(false));
        let wake_me = Arc::new(parking_lot::Mutex::new(None));
        let mut gated = WakeGated::new(Probe { polls: polls.clone(), ready: ready.clone(), wake_me: wake_me.clone() });
        let task_wakes = Arc::new(CountingWaker::default());
        let task_waker = Waker::from(task_wakes.clone());
        let mut cx = Context::from_waker(&task_waker);

        assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::Relaxed), 1, "the first poll reaches the inner future");
        for _ in 0..5 {
            assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::Relaxed), 1, "polls without a wake of the inner future stop at the gate");

        ready.store(true, Ordering::Relaxed);
        let inner_waker = wake_me.lock().take().expect("the inner future registered a waker");
        inner_waker.wake();
        assert_eq!(task_wakes.0.load(Ordering::Relaxed), 1, "the inner wake reaches the polling task");
        assert!(Pin::new(&mut gated).poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}
