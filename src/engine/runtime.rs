//! The one tokio runtime of the process, shared by every engine. Built on first use with the first
//! started engine's `workerThreads` (default: one per core); later engines share it as it is. Also
//! the addon's global allocator, which serves that runtime's threads, and when it gives the
//! memory it keeps back to the system.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use tokio::runtime::{Builder, Runtime};

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// Every Rust allocation of the addon (Node's own heap is untouched). Request handling allocates
/// and frees small blocks from the runtime's threads; mimalloc's thread-local free lists serve
/// those without glibc's arena bookkeeping, whose heaps grew and shrank with the request churn
/// (an mprotect call every ~25 HTTP/2 requests, malloc_consolidate in every profile). Built
/// without transparent huge pages (Cargo.toml says why).
#[global_allocator]
static ALLOCATOR: Allocator = Allocator;

/// mimalloc, asked for alignment only where its plain blocks lack it. Every block it hands out is
/// aligned to 8 bytes (its size classes are multiples of 8, its pages start 16-aligned), but its
/// aligned entry point, which the `mimalloc` crate calls for every allocation, takes the
/// over-allocating slow path for blocks past its small sizes whose size class is not a power of two:
/// a request's pipeline future is one, allocated and freed per request.
struct Allocator;

/// The largest alignment every mimalloc block has.
const PLAIN_ALIGN: usize = 8;

unsafe impl std::alloc::GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.align() <= PLAIN_ALIGN {
            libmimalloc_sys::mi_malloc(layout.size()).cast()
        } else {
            libmimalloc_sys::mi_malloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.align() <= PLAIN_ALIGN {
            libmimalloc_sys::mi_zalloc(layout.size()).cast()
        } else {
            libmimalloc_sys::mi_zalloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        libmimalloc_sys::mi_free(ptr.cast());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= PLAIN_ALIGN {
            libmimalloc_sys::mi_realloc(ptr.cast(), new_size).cast()
        } else {
            libmimalloc_sys::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
        }
    }
}

/// Bumped by `give_memory_back`: each worker hands its allocator's free memory back to the system
/// the next time it goes idle, once per bump.
static GIVE_BACK: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static GIVEN_BACK: Cell<u64> = const { Cell::new(0) };
}

/// mimalloc returns the pages a thread freed only when that thread allocates again, so a proxy
/// that goes quiet after many connections ended would keep their memory. Called when many have
/// ended; the work happens on each worker as it parks, off every request path.
pub fn give_memory_back() {
    GIVE_BACK.fetch_add(1, Ordering::Relaxed);
}

fn on_worker_park() {
    crate::write_batch::round_ended();
    let wanted = GIVE_BACK.load(Ordering::Relaxed);
    if wanted == 0 {
        return;
    }
    GIVEN_BACK.with(|given| {
        if given.get() != wanted {
            given.set(wanted);
            crate::http::read_buffer::clear_thread_pool();
            // SAFETY: mi_collect takes no pointers; it only walks this thread's own heap.
            unsafe { libmimalloc_sys::mi_collect(true) };
        }
    });
}

/// Tasks a busy worker runs between two polls of the kernel for readiness.
const EVENT_INTERVAL: u32 = 1024;

pub fn shared(worker_threads: Option<usize>) -> &'static Runtime {
    RUNTIME.get_or_init(|| {
        let workers = worker_threads
            .filter(|n| *n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
        Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("smartproxy-worker")
            // A busy worker polls the kernel for readiness every this many tasks (tokio's default is
            // 61) and queues the tasks it wakes ahead of those its local queue had to overflow, so
            // past a few hundred connections some waited round after round (a p99 latency several
            // times the mean). As many tasks as one poll can wake (`max_io_events_per_tick`'s
            // default) now run before the kernel is asked again: what was ready is served first.
            .event_interval(EVENT_INTERVAL)
            .on_thread_start(crate::write_batch::worker_started)
            .on_thread_park(on_worker_park)
            .enable_all()
            .build()
            // Without threads or an epoll instance nothing here can work; there is no fallback.
            .expect("smartproxy: cannot start the tokio runtime")
    })
}
