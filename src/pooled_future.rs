//! Futures in memory their thread keeps for the next future of the same size, as HAProxy keeps
//! its streams in per-thread pools. A request's pipeline future is made and dropped per request
//! and is larger than the allocator's small sizes, which it serves through its slow path; a block
//! taken back from the thread's own list is both cheaper to get and still in the cache, where a
//! block the allocator chooses has often gone cold while the connections in flight ran.

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::ptr::NonNull;
use std::task::{Context, Poll};

/// Blocks a thread keeps for each size: enough for the requests a worker starts between two of
/// its responses, little enough that a burst's blocks are not held for long.
const KEPT_PER_SIZE: usize = 64;
/// Sizes a thread keeps blocks for (the pipeline's futures: one or two types); blocks of any other
/// size are given back to the allocator.
const SIZES_KEPT: usize = 4;

/// A future pinned in a block of its own, which goes back to its thread's list when the future
/// is dropped. It is `Unpin`: the future stays where it was written whatever happens to this
/// handle.
pub struct PooledFuture<O> {
    future: NonNull<dyn Future<Output = O> + Send>,
    layout: Layout,
}

// SAFETY: the future it owns is `Send`, and its block is memory of the global allocator, which
// any thread may free or keep.
unsafe impl<O> Send for PooledFuture<O> {}

impl<O> PooledFuture<O> {
    /// The future `make` returns, written straight into its block: made first and moved after,
    /// the whole future would be copied.
    #[inline(always)]
    pub fn new<F: Future<Output = O> + Send + 'static>(make: impl FnOnce() -> F) -> Self {
        let layout = Layout::new::<F>();
        let block: NonNull<F> = if layout.size() == 0 { NonNull::dangling() } else { take(layout).cast() };
        // SAFETY: `block` is valid for a write of `F` (allocated with its layout, or dangling
        // for a zero-sized one) and holds nothing yet.
        unsafe { block.as_ptr().write(make()) };
        PooledFuture { future: block, layout }
    }
}

impl<O> Future for PooledFuture<O> {
    type Output = O;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<O> {
        // SAFETY: the future was written into its block and is only ever dropped there: it is
        // pinned for its whole life.
        let future = unsafe { Pin::new_unchecked(&mut *self.future.as_ptr()) };
        future.poll(cx)
    }
}

impl<O> Drop for PooledFuture<O> {
    fn drop(&mut self) {
        // SAFETY: the future is alive in its block (written by `new`) and dropped only here.
        unsafe { std::ptr::drop_in_place(self.future.as_ptr()) };
        if self.layout.size() != 0 {
            give_back(self.future.cast(), self.layout);
        }
    }
}

/// One thread's blocks, by layout.
struct Pool {
    lists: Vec<(Layout, Vec<NonNull<u8>>)>,
}

impl Drop for Pool {
    fn drop(&mut self) {
        for (layout, blocks) in self.lists.drain(..) {
            for block in blocks {
                // SAFETY: each block was allocated with `layout` and holds nothing.
                unsafe { dealloc(block.as_ptr(), layout) };
            }
        }
    }
}

thread_local! {
    static POOL: RefCell<Pool> = const { RefCell::new(Pool { lists: Vec::new() }) };
}

fn take(layout: Layout) -> NonNull<u8> {
    let kept = POOL
        .try_with(|pool| pool.borrow_mut().lists.iter_mut().find(|(kept, _)| *kept == layout).and_then(|(_, blocks)| blocks.pop()))
        .ok()
        .flatten();
    kept.unwrap_or_else(|| {
        // SAFETY: `layout` has a non-zero size (`new` never takes a block for a zero-sized one).
        NonNull::new(unsafe { alloc(layout) }).unwrap_or_else(|| handle_alloc_error(layout))
    })
}

fn give_back(block: NonNull<u8>, layout: Layout) {
    let kept = POOL.try_with(|pool| {
        let mut pool = pool.borrow_mut();
        let index = match pool.lists.iter().position(|(kept, _)| *kept == layout) {
            Some(index) => index,
            None if pool.lists.len() < SIZES_KEPT => {
                pool.lists.push((layout, Vec::with_capacity(KEPT_PER_SIZE)));
                pool.lists.len() - 1
            }
            None => return false,
        };
        let blocks = &mut pool.lists[index].1;
        if blocks.len() < KEPT_PER_SIZE {
            blocks.push(block);
            return true;
        }
        false
    });
    if kept != Ok(true) {
        // SAFETY: allocated with `layout` (by `take`), and the future in it was dropped.
        unsafe { dealloc(block.as_ptr(), layout) };
    }
}

/// Blocks this thread keeps for futures of `layout`.
#[cfg(test)]
fn kept_here(layout: Layout) -> usize {
    POOL.with(|pool| pool.borrow().lists.iter().find(|(kept, _)| *kept == layout).map_or(0, |(_, blocks)| blocks.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Counts its drops; pending once, then ready with its payload.
    struct Probe {
        payload: [u64; 64],
        polled: bool,
        drops: Arc<AtomicUsize>,
    }

    impl Future for Probe {
        type Output = u64;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u64> {
            if !self.polled {
                self.polled = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(self.payload.iter().sum())
        }
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            self.drops.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn probe(drops: &Arc<AtomicUsize>) -> Probe {
        Probe { payload: [3; 64], polled: false, drops: drops.clone() }
    }

    #[tokio::test]
    async fn a_future_runs_in_a_kept_block_and_its_block_is_reused() {
        let layout = Layout::new::<Probe>();
        let drops = Arc::new(AtomicUsize::new(0));
        let first = PooledFuture::new(|| probe(&drops));
        let first_block = first.future.cast::<u8>();
        assert_eq!(first.await, 3 * 64);
        assert_eq!(drops.load(Ordering::Relaxed), 1);
        assert_eq!(kept_here(layout), 1);
        // The next future of the size takes the block just given back.
        let second = PooledFuture::new(|| probe(&drops));
        assert_eq!(second.future.cast::<u8>(), first_block);
        assert_eq!(kept_here(layout), 0);
        // Dropped before it ends: the future is dropped in place, its block kept.
        drop(second);
        assert_eq!(drops.load(Ordering::Relaxed), 2);
        assert_eq!(kept_here(layout), 1);
    }

    #[test]
    fn a_thread_keeps_a_bounded_number_of_blocks() {
        let layout = Layout::new::<Probe>();
        let drops = Arc::new(AtomicUsize::new(0));
        let many: Vec<_> = (0..KEPT_PER_SIZE + 10).map(|_| PooledFuture::new(|| probe(&drops))).collect();
        drop(many);
        assert_eq!(drops.load(Ordering::Relaxed), KEPT_PER_SIZE + 10);
        assert_eq!(kept_here(layout), KEPT_PER_SIZE);
    }

    #[test]
    fn a_future_dropped_on_another_thread_gives_its_block_to_that_thread() {
        let layout = Layout::new::<Probe>();
        let drops = Arc::new(AtomicUsize::new(0));
        let future = PooledFuture::new(|| probe(&drops));
        let kept_there = std::thread::spawn(move || {
            drop(future);
            kept_here(layout)
        })
        .join()
        .unwrap();
        assert_eq!(kept_there, 1);
        assert_eq!(drops.load(Ordering::Relaxed), 1);
    }
}
