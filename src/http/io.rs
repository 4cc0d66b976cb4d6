//! The client side of an HTTP connection as hyper sees it: the bytes sniffed before routing are
//! replayed first, every byte read or written is counted on the client side (engine and per-IP
//! counters, as the TCP relay does), and what the watchdog times is kept: the last byte, the
//! requests in flight, and when the first byte of a later HTTP/1.x head arrived.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake};
use std::time::Instant;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::clock::{coarse_ms as now_ms, instant_at};
use crate::wake_gate::{GateOwner, WakeFlag};

/// Where client-side byte counts go; shared with the session that owns the connection.
pub struct ClientCounters {
    pub engine: Arc<crate::metrics::EngineMetrics>,
    /// The client address's slot and byte counters: the slot is given back when the last holder
    /// of these counters lets go, which is when the connection (and any tunnel of it) ended.
    pub ip: crate::security::IpGuard,
    /// On the coarse clock (`crate::clock`).
    last_activity_ms: AtomicU64,
    /// Requests of the connection between their head and the end of their response.
    in_flight: AtomicU32,
    /// HTTP/1.x: heads are timed from their first byte (HTTP/2 frames between streams are not heads).
    times_heads: AtomicBool,
    /// When (on the coarse clock, plus one; 0 = none) the first byte was read while no request
    /// was in flight: a head on its way.
    head_started_ms: AtomicU64,
    /// The connection's watchdog runs wake-gated, these counters its waker: they last as long
    /// as the connection anyway, and the gate then needs no allocation of its own.
    watchdog_wake: WakeFlag,
}

impl Wake for ClientCounters {
    fn wake(self: Arc<Self>) {
        self.watchdog_wake.wake();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.watchdog_wake.wake();
    }
}

impl GateOwner for ClientCounters {
    fn wake_flag(&self) -> &WakeFlag {
        &self.watchdog_wake
    }
}

impl ClientCounters {
    pub fn new(engine: Arc<crate::metrics::EngineMetrics>, ip: crate::security::IpGuard) -> Self {
        ClientCounters {
            engine,
            ip,
            last_activity_ms: AtomicU64::new(now_ms()),
            in_flight: AtomicU32::new(0),
            times_heads: AtomicBool::new(false),
            head_started_ms: AtomicU64::new(0),
            watchdog_wake: WakeFlag::new(),
        }
    }

    pub fn last_activity(&self) -> Instant {
        instant_at(self.last_activity_ms.load(Ordering::Relaxed))
    }

    /// The connection speaks HTTP/1.x: time each later head from its first byte.
    pub fn time_heads(&self) {
        self.times_heads.store(true, Ordering::Relaxed);
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// When the first byte of a head still being read arrived.
    pub fn head_started(&self) -> Option<Instant> {
        match self.head_started_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(instant_at(ms - 1)),
        }
    }

    /// A request's head was read: it is in flight until the guard drops (its response ended).
    pub fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_started_ms.store(0, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// A connection whose bytes are not read through `ClientIo` (QUIC): a sign of life for the
    /// watchdog.
    pub fn note_activity(&self) {
        self.touch();
    }

    /// Bytes counted at once, by a connection whose transport counts them itself (QUIC).
    pub fn add_bytes(&self, bytes_in: u64, bytes_out: u64) {
        self.engine.bytes.bytes_in.fetch_add(bytes_in, Ordering::Relaxed);
        self.ip.bytes().bytes_in.fetch_add(bytes_in, Ordering::Relaxed);
        self.engine.bytes.bytes_out.fetch_add(bytes_out, Ordering::Relaxed);
        self.ip.bytes().bytes_out.fetch_add(bytes_out, Ordering::Relaxed);
    }

    fn touch(&self) {
        self.last_activity_ms.store(now_ms(), Ordering::Relaxed);
    }

    fn add_in(&self, n: usize) {
        self.engine.bytes.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        self.ip.bytes().bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        let now = now_ms();
        self.last_activity_ms.store(now, Ordering::Relaxed);
        if self.times_heads.load(Ordering::Relaxed) && self.in_flight.load(Ordering::Acquire) == 0 && self.head_started_ms.load(Ordering::Relaxed) == 0 {
            self.head_started_ms.store(now + 1, Ordering::Relaxed);
        }
    }

    fn add_out(&self, n: usize) {
        self.engine.bytes.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        self.ip.bytes().bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        self.touch();
    }
}

/// A request in flight on its connection; dropped when its response has ended (or failed).
pub struct InFlight(Arc<ClientCounters>);

impl Drop for InFlight {
    fn drop(&mut self) {
        // The keep-alive wait runs from the last byte, which the response's own writes just moved.
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The client's socket with every byte counted (in `Replay` when bytes sniffed before it come first).
pub struct ClientIo<S> {
    inner: S,
    counters: Arc<ClientCounters>,
}

impl<S> ClientIo<S> {
    pub fn new(inner: S, counters: Arc<ClientCounters>) -> Self {
        ClientIo { inner, counters }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ClientIo<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.counters.add_in(n);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ClientIo<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = polled {
            self.counters.add_out(n);
        }
        polled
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            self.counters.add_out(n);
        }
        polled
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

/// A stream whose first bytes were already read (sniffed before routing, or a request head checked
/// inside TLS): they are handed out again before the stream's own. They were counted when read,
/// by the `ClientIo` underneath.
pub struct Replay<S> {
    inner: S,
    replay: Bytes,
}

impl<S> Replay<S> {
    pub fn new(inner: S, replay: Bytes) -> Self {
        Replay { inner, replay }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.replay.is_empty() {
            let n = self.replay.len().min(buf.remaining());
            buf.put_slice(&self.replay[..n]);
            self.replay.advance(n);
            if self.replay.is_empty() {
                // An emptied Bytes still holds the sniffing buffer; an idle connection should not.
                self.replay = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
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
