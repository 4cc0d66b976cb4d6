//! The one tokio runtime of the process, shared by every engine. Built on first use with the first
//! started engine's `workerThreads` (default: one per core); later engines share it as it is. Also
//! the addon's global allocator, which serves that runtime's threads.

use std::sync::OnceLock;

use tokio::runtime::{Builder, Runtime};

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// Every Rust allocation of the addon (Node's own heap is untouched). Request handling allocates
/// and frees small blocks from the runtime's threads; mimalloc's thread-local free lists serve
/// those without glibc's arena bookkeeping, whose heaps grew and shrank with the request churn
/// (an mprotect call every ~25 HTTP/2 requests, malloc_consolidate in every profile). Built
/// without transparent huge pages (Cargo.toml says why).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub fn shared(worker_threads: Option<usize>) -> &'static Runtime {
    RUNTIME.get_or_init(|| {
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
