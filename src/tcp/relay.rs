//! The relay: two pumps (client→backend, backend→client) in one task. An orderly end of one
//! direction is passed on as a write shutdown (half-close) while the other keeps flowing; an error
//! on either side ends both. Buffers start small and grow only while a stream keeps them full, so
//! idle connections stay cheap and bulk transfers get large reads.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::activity::Activity;
use crate::metrics::ByteCounters;

const INITIAL_BUFFER: usize = 16 * 1024;
const MAX_BUFFER: usize = 256 * 1024;

/// Where the client-side bytes of a connection are counted (engine, route, client IP).
pub struct ByteSinks<'a> {
    pub sinks: &'a [&'a ByteCounters],
}

impl ByteSinks<'_> {
    pub fn add_in(&self, n: usize) {
        for sink in self.sinks {
            sink.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    pub fn add_out(&self, n: usize) {
        for sink in self.sinks {
            sink.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct RelayLimits {
    /// No byte in either direction for this long ends the relay.
    pub idle: Duration,
    /// The connection's absolute end (`maxConnectionLifetime` from accept).
    pub deadline: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    Completed,
    ClientError,
    BackendError,
    IdleTimeout,
    LifetimeExceeded,
    Shutdown,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Backend,
}

/// Relays until both directions have ended or a limit fires. `client_done` says the client has
/// already half-closed (its FIN arrived before the backend was connected, and was passed on).
pub async fn relay(
    client: &mut TcpStream,
    backend: &mut TcpStream,
    bytes: &ByteSinks<'_>,
    limits: RelayLimits,
    shutdown: &CancellationToken,
    client_done: bool,
) -> RelayEnd {
    let (client_read, client_write) = client.split();
    let (backend_read, backend_write) = backend.split();
    relay_halves((client_read, client_write), (backend_read, backend_write), bytes, limits, shutdown, client_done).await
}

/// `relay` for any two streams (a TLS session and a socket pair, say).
pub async fn relay_streams<C, B>(client: &mut C, backend: &mut B, bytes: &ByteSinks<'_>, limits: RelayLimits, shutdown: &CancellationToken) -> RelayEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    relay_halves(tokio::io::split(client), tokio::io::split(backend), bytes, limits, shutdown, false).await
}

async fn relay_halves<CR, CW, BR, BW>(
    (client_read, client_write): (CR, CW),
    (backend_read, backend_write): (BR, BW),
    bytes: &ByteSinks<'_>,
    limits: RelayLimits,
    shutdown: &CancellationToken,
    client_done: bool,
) -> RelayEnd
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    BR: AsyncRead + Unpin,
    BW: AsyncWrite + Unpin,
{
    let activity = Activity::new();
    let upstream = pump(client_read, backend_write, Side::Client, |n| bytes.add_in(n), |_| {}, &activity);
    let downstream = pump(backend_read, client_write, Side::Backend, |_| {}, |n| bytes.add_out(n), &activity);
    let idle = activity.quiet_for(limits.idle);
    tokio::pin!(upstream, downstream, idle);

    let (mut up_done, mut down_done) = (client_done, false);
    while !(up_done && down_done) {
        tokio::select! {
            result = &mut upstream, if !up_done => {
                up_done = true;
                if let Err(side) = result {
                    return side.into();
                }
            }
            result = &mut downstream, if !down_done => {
                down_done = true;
                if let Err(side) = result {
                    return side.into();
                }
            }
            _ = &mut idle => return RelayEnd::IdleTimeout,
            _ = tokio::time::sleep_until(limits.deadline.into()) => return RelayEnd::LifetimeExceeded,
            _ = shutdown.cancelled() => return RelayEnd::Shutdown,
        }
    }
    RelayEnd::Completed
}

impl From<Side> for RelayEnd {
    fn from(side: Side) -> Self {
        match side {
            Side::Client => RelayEnd::ClientError,
            Side::Backend => RelayEnd::BackendError,
        }
    }
}

/// Copies `from` → `to` until `from` ends, then half-closes `to`. Errors name the side at fault:
/// a failed read is the reading side's, a failed write the writing side's.
async fn pump<R, W>(
    mut from: R,
    mut to: W,
    from_side: Side,
    on_read: impl Fn(usize),
    on_written: impl Fn(usize),
    activity: &Activity,
) -> Result<(), Side>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let to_side = if from_side == Side::Client { Side::Backend } else { Side::Client };
    let mut buf = vec![0u8; INITIAL_BUFFER];
    loop {
        let n = from.read(&mut buf).await.map_err(|_| from_side)?;
        if n == 0 {
            // The peer may already be gone; a failed FIN changes nothing for the other direction.
            let _ = to.shutdown().await;
            return Ok(());
        }
        on_read(n);
        activity.touch();
        to.write_all(&buf[..n]).await.map_err(|_| to_side)?;
        // A TLS stream may keep the last record of a burst buffered until pushed (free on TCP).
        to.flush().await.map_err(|_| to_side)?;
        on_written(n);
        activity.touch();
        if n == buf.len() && buf.len() < MAX_BUFFER {
            buf.resize(buf.len() * 2, 0);
        }
    }
}
