//! The client side of an HTTP connection as hyper sees it: the bytes sniffed before routing are
//! replayed first, every byte read or written is counted on the client side (engine and per-IP
//! counters, as the TCP relay does), and the time of the last byte is kept for the idle watchdog.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::ByteCounters;

/// Where client-side byte counts go; shared with the session that owns the connection.
pub struct ClientCounters {
    pub engine: Arc<crate::metrics::EngineMetrics>,
    pub ip: Arc<ByteCounters>,
    epoch: Instant,
    last_activity_ms: AtomicU64,
}

impl ClientCounters {
    pub fn new(engine: Arc<crate::metrics::EngineMetrics>, ip: Arc<ByteCounters>) -> Self {
        ClientCounters { engine, ip, epoch: Instant::now(), last_activity_ms: AtomicU64::new(0) }
    }

    pub fn last_activity(&self) -> Instant {
        self.epoch + std::time::Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed))
    }

    fn touch(&self) {
        self.last_activity_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn add_in(&self, n: usize) {
        self.engine.bytes.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        self.ip.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        self.touch();
    }

    fn add_out(&self, n: usize) {
        self.engine.bytes.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        self.ip.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        self.touch();
    }
}

pub struct ClientIo<S> {
    inner: S,
    /// The sniffed prefix, already counted when it was read.
    replay: Bytes,
    counters: Arc<ClientCounters>,
}

impl<S> ClientIo<S> {
    pub fn new(inner: S, replay: Bytes, counters: Arc<ClientCounters>) -> Self {
        ClientIo { inner, replay, counters }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ClientIo<S> {
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

/// A stream whose first bytes were already read (to check a request head inside TLS): they are
/// handed out again before the stream's own. Counting stays with the `ClientIo` underneath.
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
