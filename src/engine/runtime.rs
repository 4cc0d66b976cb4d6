//! The one tokio runtime of the process, shared by every engine. Built on first use with the first
//! started engine's `workerThreads` (default: one per core); later engines share it as it is.

use std::sync::OnceLock;

use tokio::runtime::{Builder, Runtime};

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// Every Rust allocation of the addon (Node's own heap is untouched). Request handling allocates
/// and frees small blocks from the runtime's threads; mimalloc's thread-local free lists serve
/// those without glibc's arena bookkeeping, whose heaps grew and shrank with the request churn
/// (an mprotect call every ~25 HTTP/2 requests, malloc_consolidate in every profile).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (include/mimalloc.h of the v3 sources the
/// sys crate builds; its Rust bindings do not name it). Default 1000 ms (src/options.c; the header's
/// comment still says 10).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed pages are given back to the OS at once instead of a second later. mimalloc purges only from
/// inside allocator calls, so a delayed purge never ran on a proxy that went idle: 5000 idle
/// keep-alive connections kept the ~38 KiB each that setting them up had touched. Measured cost
/// under load: one madvise per ~50 requests.
fn purge_freed_pages_at_once() {
    // SAFETY: sets one integer option of the allocator; valid at any time, from any thread.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

pub fn shared(worker_threads: Option<usize>) -> &'static Runtime {
    RUNTIME.get_or_init(|| {
        purge_freed_pages_at_once();
        let workers = worker_threads
            .filter(|n| *n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
        Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("smartproxy-worker")
            .enable_all()
            .build()
            // Without threads or an epoll instance nothing here can work; there is no fallback.
            .expect("smartproxy: cannot start the tokio runtime")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        // A wrong index would set some other option: the purge delay's default, 1000 (ms),
        // and then the value set are read back. Only this test sets it; cargo test runs without
        // MIMALLOC_* variables.
        // SAFETY: reads and sets integer options of the allocator.
        let before = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(before, 1000, "index {MI_OPTION_PURGE_DELAY} is not the purge delay");
        purge_freed_pages_at_once();
        assert_eq!(unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) }, 0);
    }
}
