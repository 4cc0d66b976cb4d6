//! Serving one client connection: HTTP/1.x by our own loop (`h1::server`), HTTP/2 by `h2::server`
//! (ALPN `h2` on TLS, the prior-knowledge preface on plain ports), both under one watchdog. Limits of API.md: the request
//! head size (over it: 431), the head read timeout, HTTP/2 concurrent streams. The connection ends
//! when the client leaves, when it sits idle past the idle timeout, gracefully when the engine
//! drains (in-flight requests finish, idle keep-alive connections close at once) and at once when
//! the grace period is over.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::http::head::RequestHead;
use crate::http::h1::server::{serve_h1, H1End};
use crate::http::io::ClientCounters;
use crate::http::pipeline::ConnectionContext;
use crate::http::watchdog::{Watch, WatchEvent};
use crate::wake_gate::WakeGated;
use crate::http::websocket::TunnelScope;
use crate::metrics::TerminationReason;

#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    pub max_header_size: usize,
    pub header_timeout: Duration,
    pub max_concurrent_streams: u32,
    /// While a request is in flight: how long the connection may see no byte.
    pub idle_timeout: Duration,
    /// Between requests (`httpKeepAliveTimeout`).
    pub keep_alive_timeout: Duration,
    /// `maxConnectionLifetime` from accept.
    pub deadline: Instant,
}

/// The engine-wide HTTP limits (options `maxHeaderSize`, `headerTimeout`,
/// `http2MaxConcurrentStreams`, `httpKeepAliveTimeout`).
#[derive(Debug, Clone, Copy)]
pub struct HttpLimitOptions {
    pub max_header_size: usize,
    pub header_timeout: Duration,
    pub max_concurrent_streams: u32,
    pub keep_alive_timeout: Duration,
}

pub struct Shutdown<'a> {
    /// Cancelled when the engine starts stopping: finish in-flight requests, accept no new ones.
    /// A child of `force_close`.
    pub draining: &'a CancellationToken,
    /// Cancelled when the grace period is over: close now.
    pub force_close: &'a CancellationToken,
}

/// Which protocol the connection speaks, known before serving starts: ALPN on TLS, the sniffed
/// prior-knowledge preface on plain ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    Http2,
}

/// `io` is the client stream, counted below (a `ClientIo`, or TLS over one). A function returning
/// the future: an HTTP/1.x connection's serving future is made here and kept in place by the one
/// returned, so that its state (the largest part of an idle connection's memory) is held once.
/// Boxed here, each protocol's future in an allocation of its own size (an enum of the two would
/// add its tag to the size, and cost an idle HTTP/1.x connection the next size class).
pub fn serve<'a, S>(
    io: S,
    version: HttpVersion,
    first_head: Option<Box<RequestHead>>,
    counters: Arc<ClientCounters>,
    ctx: Arc<ConnectionContext>,
    limits: HttpLimits,
    shutdown: Shutdown<'a>,
) -> Pin<Box<dyn Future<Output = TerminationReason> + Send + 'a>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static,
{
    let serving = Serving::enter(ctx.clone());
    let watch = Watch {
        draining: shutdown.draining,
        force_close: shutdown.force_close,
        counters,
        idle_timeout: limits.idle_timeout,
        keep_alive_timeout: limits.keep_alive_timeout,
        header_timeout: limits.header_timeout,
        deadline: limits.deadline,
    };
    match version {
        HttpVersion::Http1 => {
            let mut connection = serve_h1(io, first_head, ctx, limits.max_header_size, shutdown.draining);
            Box::pin(async move {
                // Held, not moved: what this future captured stays where it is.
                let _ = &serving;
                // SAFETY: `connection` is part of this future's own state, which stays where it
                // is once polled (a future is pinned to be polled), and nothing moves it out.
                let connection = unsafe { Pin::new_unchecked(&mut connection) };
                let reason = watched(connection, &watch, |watch| {
                    // Idle connections close at once; one with a request in flight closes after
                    // its response (the loop sees the token).
                    watch.counters.in_flight() == 0
                })
                .await
                .map(|end| match end {
                    H1End::Completed | H1End::Drained | H1End::Upgraded => TerminationReason::Completed,
                    H1End::ClientError => TerminationReason::ClientError,
                    H1End::InvalidHttp => TerminationReason::InvalidHttp,
                });
                after_serving(reason, &serving.0.tunnels).await
            })
        }
        HttpVersion::Http2 => Box::pin(async move {
            let _ = &serving;
            // Boxed: hyper's HTTP/2 connection would otherwise size every HTTP/1 connection's future.
            let reason = Box::pin(crate::http::h2::server::serve(io, ctx, limits, &watch)).await;
            after_serving(reason, &serving.0.tunnels).await
        }),
    }
}

/// A connection counted in `active_http` while it is served, with its context kept for what
/// follows (its tunnels): one pointer for both in every idle connection's future.
struct Serving(Arc<ConnectionContext>);

impl Serving {
    fn enter(ctx: Arc<ConnectionContext>) -> Serving {
        ctx.env.metrics.active_http.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Serving(ctx)
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.env.metrics.active_http.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// An upgraded connection lives on as a WebSocket tunnel; tunnels end by themselves (peer, idle,
/// lifetime, engine shutdown).
async fn after_serving(served: Result<TerminationReason, TerminationReason>, tunnels: &TunnelScope) -> TerminationReason {
    match served {
        Ok(reason) => {
            tunnels.wait().await;
            reason
        }
        Err(reason) => reason,
    }
}

/// Runs a connection under the watchdog. `on_drain` is told when the engine starts draining and
/// says whether to close at once. Err: the watchdog ended the connection.
pub(crate) async fn watched<F: std::future::Future>(mut connection: std::pin::Pin<&mut F>, watch: &Watch<'_>, mut on_drain: impl FnMut(&Watch<'_>) -> bool) -> Result<F::Output, TerminationReason> {
    let mut watchdog = WakeGated::with_owner(watch.next(false), watch.counters.clone());
    loop {
        tokio::select! {
            biased;
            result = connection.as_mut() => return Ok(result),
            event = &mut watchdog => match event {
                WatchEvent::Draining => {
                    if on_drain(watch) {
                        return Err(TerminationReason::Completed);
                    }
                    watchdog = WakeGated::with_owner(watch.next(true), watch.counters.clone());
                }
                WatchEvent::ForceClose => return Err(TerminationReason::Shutdown),
                WatchEvent::IdleTimeout => return Err(TerminationReason::IdleTimeout),
                WatchEvent::KeepAliveTimeout => return Err(TerminationReason::KeepAliveTimeout),
                WatchEvent::HeadTimeout => return Err(TerminationReason::HeadTimeout),
                WatchEvent::LifetimeExceeded => return Err(TerminationReason::LifetimeExceeded),
            },
        }
    }
}
