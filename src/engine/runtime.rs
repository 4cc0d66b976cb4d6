//! The one tokio runtime of the process, shared by every engine. Built on first use with the first
//! started engine's `workerThreads` (default: one per core); later engines share it as it is.

use std::sync::OnceLock;

use tokio::runtime::{Builder, Runtime};

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

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
