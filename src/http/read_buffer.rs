//! Read buffers, lent to a connection only while it has bytes to read and work on, from a pool
//! kept by each worker thread (as HAProxy's buffer pools and nginx's do). A connection that waits
//! for its next request or response holds none; one that has work takes a buffer the thread used
//! moments ago (still in its caches, and its bytes shared by the heads read from it without a new
//! allocation for the sharing), and gives it back when it goes idle or ends. How many are lent
//! right now, across the process, is `lent()`: it returns to zero when no connection is working,
//! whatever way connections ended.

use std::cell::RefCell;
use std::io;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, ReadBuf};

/// The size of a buffer lent by the pool: a request head or a response head with the start of
/// its body, in one read.
pub const BUFFER_SIZE: usize = 8 * 1024;
/// The room a lent buffer has at least: a reader that wants more for its read reserves it.
pub const READ_ROOM: usize = BUFFER_SIZE / 2;
/// A buffer that grew past this (a large body read) is freed when given back, not kept.
const MAX_KEPT: usize = 2 * BUFFER_SIZE;
/// The most buffers a thread keeps for the next connections that have work: what a burst of
/// requests on one worker reuses, and little enough that idle connections cost no more for it.
const KEPT_PER_THREAD: usize = 32;
/// What a connection that holds no buffer reads at most, into the stack (`poll_read_unlent`): as
/// much as a lent buffer takes in one read, so that a response up to that size still comes in one
/// system call (copying what came costs less than a second read).
pub const STACK_READ: usize = BUFFER_SIZE;

/// A connection's read buffer: empty and unallocated while the connection has nothing to work
/// on, else a buffer lent by the pool. It is a `BytesMut` for everything else.
#[derive(Default)]
pub struct ReadBuffer {
    bytes: BytesMut,
    lent: bool,
}

impl ReadBuffer {
    pub fn new() -> Self {
        ReadBuffer { bytes: BytesMut::new(), lent: false }
    }

    /// Room for at least `additional` more bytes: in a buffer from the pool when none is held
    /// (which has `READ_ROOM` at least).
    pub fn reserve(&mut self, additional: usize) {
        if !self.lent {
            self.bytes = lend(additional);
            self.lent = true;
        }
        if self.bytes.capacity() - self.bytes.len() < additional {
            self.bytes.reserve(additional);
        }
    }

    /// A buffer from the pool is held.
    pub fn is_lent(&self) -> bool {
        self.lent
    }

    /// A read by a connection that holds no buffer: into the stack, and a buffer (with `room` at
    /// least) is lent only for bytes that came. A connection that waits for its peer, however
    /// long, so holds none, and the pool's buffers go to connections with bytes at hand: the
    /// same few, still in the cache, rather than one per connection waiting.
    pub fn poll_read_unlent<S: AsyncRead + Unpin + ?Sized>(&mut self, cx: &mut Context<'_>, io: &mut S, room: usize) -> Poll<io::Result<usize>> {
        let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); STACK_READ];
        let mut read = ReadBuf::uninit(&mut stack);
        std::task::ready!(Pin::new(io).poll_read(cx, &mut read))?;
        let n = read.filled().len();
        if n > 0 {
            self.reserve(room.max(n * 2));
            self.bytes.extend_from_slice(read.filled());
        }
        Poll::Ready(Ok(n))
    }

    /// Gives the buffer back, if there is one and it holds no unread bytes: the connection has
    /// nothing more to work on for now. (One that grew through `BytesMut`'s own `reserve`, not
    /// this one's, is freed.)
    pub fn release(&mut self) {
        if !self.bytes.is_empty() {
            return;
        }
        let bytes = std::mem::take(&mut self.bytes);
        if std::mem::take(&mut self.lent) {
            give_back(bytes);
        }
    }
}

impl Drop for ReadBuffer {
    fn drop(&mut self) {
        if self.lent {
            self.bytes.clear();
            give_back(std::mem::take(&mut self.bytes));
        }
    }
}

impl Deref for ReadBuffer {
    type Target = BytesMut;
    fn deref(&self) -> &BytesMut {
        &self.bytes
    }
}

impl DerefMut for ReadBuffer {
    fn deref_mut(&mut self) -> &mut BytesMut {
        &mut self.bytes
    }
}

/// Buffers lent right now, by every thread of the process.
pub fn lent() -> u64 {
    let threads = THREADS.lock();
    let sum = threads.counts.iter().map(|c| c.lent.load(Ordering::Relaxed) as i64 - c.returned.load(Ordering::Relaxed) as i64).sum::<i64>();
    (sum + threads.exited + UNPOOLED.load(Ordering::Relaxed)).max(0) as u64
}

/// Frees the buffers this thread keeps (the worker is going idle after many connections ended).
pub fn clear_thread_pool() {
    let _ = POOL.try_with(|pool| pool.borrow_mut().free.clear());
}

/// One thread's counts. Only their own thread writes them (a buffer given back on another thread
/// counts there), so they are written without a locked instruction; a reader sums every thread's.
#[derive(Default)]
struct ThreadCounts {
    lent: AtomicU64,
    returned: AtomicU64,
}

impl ThreadCounts {
    fn bump(counter: &AtomicU64) {
        counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }
}

struct Threads {
    counts: Vec<Arc<ThreadCounts>>,
    /// Lent minus given back by the threads that exited.
    exited: i64,
}

static THREADS: Mutex<Threads> = Mutex::new(Threads { counts: Vec::new(), exited: 0 });
/// Lent minus given back on threads whose pool was already gone (as the thread exits).
static UNPOOLED: AtomicI64 = AtomicI64::new(0);

struct Pool {
    free: Vec<BytesMut>,
    counts: Option<Arc<ThreadCounts>>,
}

impl Pool {
    fn counts(&mut self) -> &ThreadCounts {
        self.counts.get_or_insert_with(|| {
            let counts = Arc::new(ThreadCounts::default());
            THREADS.lock().counts.push(counts.clone());
            counts
        })
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let Some(counts) = self.counts.take() else { return };
        let mut threads = THREADS.lock();
        threads.exited += counts.lent.load(Ordering::Relaxed) as i64 - counts.returned.load(Ordering::Relaxed) as i64;
        threads.counts.retain(|c| !Arc::ptr_eq(c, &counts));
    }
}

thread_local! {
    static POOL: RefCell<Pool> = const { RefCell::new(Pool { free: Vec::new(), counts: None }) };
}

fn lend(at_least: usize) -> BytesMut {
    let kept = POOL.try_with(|pool| {
        let mut pool = pool.borrow_mut();
        ThreadCounts::bump(&pool.counts().lent);
        pool.free.pop()
    });
    match kept {
        Ok(Some(bytes)) => bytes,
        Ok(None) => BytesMut::with_capacity(BUFFER_SIZE.max(at_least)),
        // The thread is exiting: nothing is kept or counted there.
        Err(_) => {
            UNPOOLED.fetch_add(1, Ordering::Relaxed);
            BytesMut::with_capacity(BUFFER_SIZE.max(at_least))
        }
    }
}

/// `bytes` is empty. Kept when it has room for a read: what is left of it after the heads and
/// bodies read from it, which may still share its start (a response's last bytes are on their way
/// to the client as its connection goes back to the pool), or all of it again once nothing does.
fn give_back(mut bytes: BytesMut) {
    let reusable = (bytes.capacity() >= READ_ROOM || bytes.try_reclaim(BUFFER_SIZE)) && bytes.capacity() <= MAX_KEPT;
    let counted = POOL.try_with(|pool| {
        let mut pool = pool.borrow_mut();
        ThreadCounts::bump(&pool.counts().returned);
        if reusable && pool.free.len() < KEPT_PER_THREAD {
            pool.free.push(bytes);
        }
    });
    if counted.is_err() {
        UNPOOLED.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This thread's lent minus given back (other tests' threads run beside it).
    fn outstanding_here() -> i64 {
        POOL.with(|pool| {
            let mut pool = pool.borrow_mut();
            let counts = pool.counts();
            counts.lent.load(Ordering::Relaxed) as i64 - counts.returned.load(Ordering::Relaxed) as i64
        })
    }

    #[test]
    fn a_buffer_is_lent_on_the_first_reserve_and_given_back_when_released_empty() {
        let before = outstanding_here();
        let mut buf = ReadBuffer::new();
        assert_eq!(buf.capacity(), 0);
        buf.reserve(100);
        assert!(buf.capacity() >= BUFFER_SIZE);
        assert_eq!(outstanding_here(), before + 1);
        buf.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        buf.release();
        assert_eq!(outstanding_here(), before + 1, "a buffer with unread bytes stays");
        let head = buf.split_to(18).freeze();
        buf.release();
        assert_eq!(outstanding_here(), before);
        assert_eq!(buf.capacity(), 0);
        // The head read from it keeps its bytes.
        assert_eq!(&head[..], b"GET / HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn a_given_back_buffer_is_lent_again_whole_once_nothing_shares_it() {
        let mut buf = ReadBuffer::new();
        buf.reserve(1);
        let start = buf.as_ptr();
        buf.extend_from_slice(&[b'x'; 6000]);
        let head = buf.split_to(6000).freeze();
        drop(head);
        buf.release();
        let mut again = ReadBuffer::new();
        again.reserve(1);
        assert_eq!(again.as_ptr(), start);
        assert!(again.capacity() >= BUFFER_SIZE);
    }

    #[test]
    fn a_buffer_still_shared_by_a_head_is_not_kept() {
        let mut buf = ReadBuffer::new();
        buf.reserve(1);
        buf.extend_from_slice(&[b'x'; 6000]);
        let head = buf.split_to(6000).freeze();
        let rest = buf.as_ptr();
        buf.release();
        let kept = POOL.with(|pool| pool.borrow().free.iter().any(|b| b.as_ptr() == rest));
        assert!(!kept);
        assert_eq!(head.len(), 6000);
    }

    #[test]
    fn release_leaves_no_allocation_behind_even_one_made_without_the_pool() {
        let mut buf = ReadBuffer::new();
        BytesMut::reserve(&mut buf, 100);
        assert!(buf.capacity() >= 100);
        buf.release();
        assert_eq!(buf.capacity(), 0);
    }

    #[test]
    fn dropping_a_lent_buffer_gives_it_back_even_with_unread_bytes() {
        let before = outstanding_here();
        let mut buf = ReadBuffer::new();
        buf.reserve(1);
        buf.extend_from_slice(b"partial head");
        drop(buf);
        assert_eq!(outstanding_here(), before);
    }

    #[test]
    fn a_buffer_that_grew_large_is_freed_not_kept() {
        let mut buf = ReadBuffer::new();
        buf.reserve(1);
        buf.reserve(4 * MAX_KEPT);
        let large = buf.as_ptr();
        buf.release();
        let kept = POOL.with(|pool| pool.borrow().free.iter().any(|b| b.as_ptr() == large));
        assert!(!kept);
    }

    #[test]
    fn the_count_covers_buffers_of_threads_that_exited() {
        let handle = std::thread::spawn(|| {
            let mut buf = ReadBuffer::new();
            buf.reserve(1);
            buf
        });
        // Lent on a thread that has exited (its count moved to `exited`), given back here: while
        // it is out, the sum over every buffer lent and not given back includes it.
        let buf = handle.join().unwrap();
        assert!(lent() >= 1);
        drop(buf);
    }
    /// A read with nothing to read leaves the connection without a buffer; bytes that come are
    /// put in a lent one, with the room asked for, and a read larger than the stack's comes in
    /// parts without losing a byte.
    #[tokio::test]
    async fn a_waiting_connection_holds_no_buffer_until_its_bytes_come() {
        use tokio::io::AsyncWriteExt;
        let before = outstanding_here();
        let (mut peer, mut io) = tokio::io::duplex(4 * STACK_READ);
        let mut buf = ReadBuffer::new();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(buf.poll_read_unlent(&mut cx, &mut io, 100).is_pending());
        assert!(!buf.is_lent());
        assert_eq!(outstanding_here(), before);
        let sent: Vec<u8> = (0..3 * STACK_READ).map(|i| (i % 251) as u8).collect();
        peer.write_all(&sent).await.unwrap();
        let first = std::future::poll_fn(|cx| buf.poll_read_unlent(cx, &mut io, READ_ROOM)).await.unwrap();
        assert_eq!(first, STACK_READ);
        assert!(buf.is_lent());
        assert!(buf.capacity() >= READ_ROOM);
        assert_eq!(outstanding_here(), before + 1);
        while buf.len() < sent.len() {
            tokio::io::AsyncReadExt::read_buf(&mut io, &mut *buf).await.unwrap();
        }
        assert_eq!(&buf[..], &sent[..]);
        buf.clear();
        buf.release();
        assert_eq!(outstanding_here(), before);
    }
}
