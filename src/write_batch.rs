//! Rounds of a worker and the writes held to their end. A worker runs every task that is ready,
//! then asks the kernel for more readiness: that is one round. A connection whose writes wait for
//! the end of the round sends them together with every other connection's, so a peer process
//! sleeping on the other end is woken once per round instead of once per connection.

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Wake, Waker};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

thread_local! {
    /// This worker's round; zero on threads that are not workers of the runtime.
    static ROUND: Cell<u64> = const { Cell::new(0) };
}

/// Called as a worker thread starts.
pub fn worker_started() {
    ROUND.with(|round| round.set(1));
}

/// Called when a worker has run out of ready tasks (before it parks).
pub fn round_ended() {
    ROUND.with(|round| {
        if round.get() != 0 {
            round.set(round.get() + 1);
        }
    });
}

fn current_round() -> u64 {
    ROUND.with(Cell::get)
}

/// Holds a connection's first write of a round until the worker has run its other ready tasks.
/// The writes after it in the same round go through at once: they were produced by the same poll,
/// and by then the round's others are leaving too.
#[derive(Default)]
struct WriteGate {
    /// The round in which writes last went through, or in which they began to be held.
    round: u64,
    held: bool,
    release: Option<Arc<Release>>,
}

impl WriteGate {
    fn poll_open(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let round = current_round();
        if round == 0 {
            return Poll::Ready(());
        }
        if self.round == round {
            if !self.held {
                return Poll::Ready(());
            }
        } else if self.held {
            self.held = false;
            self.round = round;
            return Poll::Ready(());
        } else {
            self.held = true;
            self.round = round;
        }
        let release = self.release.get_or_insert_with(|| Arc::new(Release { task: Mutex::new(None) }));
        {
            let mut task = release.task.lock();
            match task.as_ref() {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                _ => *task = Some(cx.waker().clone()),
            }
        }
        // tokio wakes a yielded task only after it has run out of ready tasks and polled the driver;
        // the waker it is given ends the round first, which tokio's own park hook does not see when
        // it only yields.
        let waker = Waker::from(release.clone());
        let yielded = std::pin::pin!(tokio::task::yield_now());
        let _ = std::future::Future::poll(yielded, &mut Context::from_waker(&waker));
        Poll::Pending
    }
}

/// The waker tokio keeps for a held gate: it ends the worker's round, then wakes the task.
struct Release {
    task: Mutex<Option<Waker>>,
}

impl Wake for Release {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        round_ended();
        if let Some(task) = self.task.lock().as_ref() {
            task.wake_by_ref();
        }
    }
}

/// A stream whose writes leave at the end of their round.
pub struct Batched<S> {
    inner: S,
    gate: WriteGate,
}

impl<S> Batched<S> {
    pub fn new(inner: S) -> Self {
        Batched { inner, gate: WriteGate::default() }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Batched<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Batched<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.gate.poll_open(cx));
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        ready!(self.gate.poll_open(cx));
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A sink that logs each write beside the tasks' own entries.
    struct Log(Arc<Mutex<Vec<&'static str>>>);

    impl AsyncWrite for Log {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
            self.0.lock().push("written");
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn worker_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .on_thread_start(worker_started)
            .on_thread_park(round_ended)
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn a_write_leaves_after_the_rounds_other_ready_tasks() {
        let runtime = worker_runtime();
        let log = Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let log = log.clone();
            async move {
                log.lock().push("writer polled");
                let mut out = Batched::new(Log(log.clone()));
                out.write_all(b"first").await.expect("write");
                // Released in this round: the writes after it go through at once.
                out.write_all(b"second").await.expect("write");
            }
        };
        let others: Vec<_> = (0..3)
            .map(|_| {
                let log = log.clone();
                async move { log.lock().push("other task") }
            })
            .collect();
        let (release, gate) = std::sync::mpsc::channel::<()>();
        runtime.block_on(async {
            // The worker is held by the gate until all of them are spawned, so the round it goes
            // on to finds all of them ready (spawned from outside, the writer alone could
            // otherwise run in a round of its own).
            let gate = tokio::spawn(async move {
                let _ = gate.recv();
            });
            let writer = tokio::spawn(writer);
            let others: Vec<_> = others.into_iter().map(tokio::spawn).collect();
            release.send(()).expect("gate");
            gate.await.expect("gate");
            writer.await.expect("writer");
            for other in others {
                other.await.expect("other");
            }
        });
        let log = log.lock().clone();
        assert_eq!(log, ["writer polled", "other task", "other task", "other task", "written", "written"]);
    }

    #[test]
    fn writes_go_straight_through_off_the_workers() {
        // A runtime without the hooks (as in other tests): nothing is held, nothing hangs.
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let log = Arc::new(Mutex::new(Vec::new()));
        runtime.block_on(async {
            let mut out = Batched::new(Log(log.clone()));
            out.write_all(b"one").await.expect("write");
            out.write_all(b"two").await.expect("write");
        });
        assert_eq!(log.lock().len(), 2);
    }
}
