//! Serving one client connection with hyper: HTTP/1.1 with keep-alive and upgrades, HTTP/2 by
//! its preface (ALPN `h2` on TLS, prior knowledge on plain ports). Limits of API.md: the request
//! head size (over it: 431), the head read timeout, HTTP/2 concurrent streams. The connection ends
//! when the client leaves, when it sits idle past the idle timeout, gracefully when the engine
//! drains (in-flight requests finish, idle keep-alive connections close at once) and at once when
//! the grace period is over.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::http::io::ClientCounters;
use crate::http::proxy::{handle, ConnectionContext};
use crate::http::watchdog::{Watch, WatchEvent, WakeGated};
use crate::metrics::{GaugeHold, TerminationReason};

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

/// `io` is the client stream, counted below (a `ClientIo`, or TLS over one).
pub async fn serve<S>(io: S, counters: Arc<ClientCounters>, ctx: Arc<ConnectionContext>, limits: HttpLimits, shutdown: Shutdown<'_>) -> TerminationReason
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        // A client that half-closes after its request still gets the response.
        .half_close(true)
        // hyper's head timer runs from when it starts waiting for a head, idle keep-alive time
        // included, so it is only a backstop here, later than the watchdog's deadlines: the
        // watchdog times a head from its first byte (`headerTimeout`) and the wait between
        // requests by `httpKeepAliveTimeout`. The backstop still ends a connection hyper has
        // stopped serving after answering a malformed head itself (it waits on nothing then).
        .header_read_timeout(limits.keep_alive_timeout.saturating_add(limits.header_timeout))
        // hyper answers 431 itself when a head outgrows its read buffer.
        .max_buf_size(limits.max_header_size.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_size as u32);
    let _active = GaugeHold::enter(ctx.env.metrics.clone(), |m| &m.active_http);
    let tunnels = ctx.tunnels.clone();
    let service = service_fn(move |req| handle(ctx.clone(), req));
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);

    let watch = Watch {
        draining: shutdown.draining,
        force_close: shutdown.force_close,
        counters: &counters,
        idle_timeout: limits.idle_timeout,
        keep_alive_timeout: limits.keep_alive_timeout,
        header_timeout: limits.header_timeout,
        deadline: limits.deadline,
    };
    let mut watchdog = WakeGated::new(watch.next(false));
    loop {
        tokio::select! {
            biased;
            result = connection.as_mut() => {
                let reason = match result {
                    Ok(()) => TerminationReason::Completed,
                    Err(err) => {
                        tracing::debug!(error = %err, "http connection ended with an error");
                        TerminationReason::ClientError
                    }
                };
                // An upgraded connection lives on as a WebSocket tunnel after hyper let go of it;
                // tunnels end by themselves (peer, idle, lifetime, engine shutdown).
                tunnels.wait().await;
                return reason;
            }
            event = &mut watchdog => match event {
                WatchEvent::Draining => {
                    connection.as_mut().graceful_shutdown();
                    watchdog = WakeGated::new(watch.next(true));
                }
                WatchEvent::ForceClose => return TerminationReason::Shutdown,
                WatchEvent::IdleTimeout => return TerminationReason::IdleTimeout,
                WatchEvent::KeepAliveTimeout => return TerminationReason::KeepAliveTimeout,
                WatchEvent::HeadTimeout => return TerminationReason::HeadTimeout,
                WatchEvent::LifetimeExceeded => return TerminationReason::LifetimeExceeded,
            },
        }
    }
}
