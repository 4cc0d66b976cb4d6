//! The relay: two pumps (client→backend, backend→client) in one task. An orderly end of one
//! direction is passed on as a write shutdown (half-close) while the other keeps flowing; an error
//! on either side ends both. Buffers start small and grow only while a stream keeps them full, so
//! idle connections stay cheap and bulk transfers get large reads; between two TCP sockets, a
//! direction that keeps filling the largest buffer moves on to splice(2) (`splice.rs`), so its
//! bytes stop passing through user space.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::splice::Pipe;
use tokio_util::sync::CancellationToken;

use crate::metrics::ByteCounters;

const INITIAL_BUFFER: usize = 16 * 1024;
const MAX_BUFFER: usize = 256 * 1024;
/// Reads that fill the largest buffer, in a row, before a TCP direction moves on to splice.
const FULL_READS_BEFORE_SPLICE: u32 = 4;
/// Splices that move under a quarter of the pipe, in a row, before the direction copies again.
const CALM_FILLS_BEFORE_COPY: u32 = 8;

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
    let activity = Activity::new();
    let (client, backend) = (&*client, &*backend);
    let upstream = pump_tcp(client, backend, Side::Client, |n| bytes.add_in(n), |_| {}, &activity);
    let downstream = pump_tcp(backend, client, Side::Backend, |_| {}, |n| bytes.add_out(n), &activity);
    join_pumps(upstream, downstream, &activity, limits, shutdown, client_done).await
}

/// `relay` for any two streams (a TLS session and a socket pair, say).
pub async fn relay_streams<C, B>(client: &mut C, backend: &mut B, bytes: &ByteSinks<'_>, limits: RelayLimits, shutdown: &CancellationToken) -> RelayEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity::new();
    let (client_read, client_write) = tokio::io::split(client);
    let (backend_read, backend_write) = tokio::io::split(backend);
    let upstream = pump(client_read, backend_write, Side::Client, |n| bytes.add_in(n), |_| {}, &activity);
    let downstream = pump(backend_read, client_write, Side::Backend, |_| {}, |n| bytes.add_out(n), &activity);
    join_pumps(upstream, downstream, &activity, limits, shutdown, false).await
}

/// When bytes last moved in either direction.
struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity { epoch: Instant::now(), last_ms: AtomicU64::new(0) }
    }

    fn touch(&self) {
        self.last_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `idle`.
    async fn quiet_for(&self, idle: Duration) {
        loop {
            let quiet_until = self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + idle;
            if Instant::now() >= quiet_until {
                return;
            }
            tokio::time::sleep_until(quiet_until.into()).await;
        }
    }
}

/// Runs both directions against the limits until both have ended or one fails.
async fn join_pumps<U, D>(upstream: U, downstream: D, activity: &Activity, limits: RelayLimits, shutdown: &CancellationToken, client_done: bool) -> RelayEnd
where
    U: std::future::Future<Output = Result<(), Side>>,
    D: std::future::Future<Output = Result<(), Side>>,
{
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

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
        }
    }
}

/// Copies `from` → `to` until `from` ends, then half-closes `to`. Errors name the side at fault:
/// a failed read is the reading side's, a failed write the writing side's.
async fn pump<R, W>(mut from: R, mut to: W, from_side: Side, on_read: impl Fn(usize), on_written: impl Fn(usize), activity: &Activity) -> Result<(), Side>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let to_side = from_side.other();
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
        // A TLS stream may keep the last record of a burst buffered until pushed.
        to.flush().await.map_err(|_| to_side)?;
        on_written(n);
        activity.touch();
        if n == buf.len() && buf.len() < MAX_BUFFER {
            buf.resize(buf.len() * 2, 0);
        }
    }
}

/// `pump` between two TCP sockets: copies through a buffer while exchanges are short, moves on to
/// splice once reads keep filling the largest buffer (a bulk transfer), and back to copying (the
/// pipe closed) once the transfer has calmed down.
async fn pump_tcp(from: &TcpStream, to: &TcpStream, from_side: Side, on_read: impl Fn(usize), on_written: impl Fn(usize), activity: &Activity) -> Result<(), Side> {
    let to_side = from_side.other();
    let mut buf = vec![0u8; INITIAL_BUFFER];
    // Full reads in a row (copying), or small fills in a row (splicing).
    let mut streak = 0;
    let mut pipe: Option<Pipe> = None;
    let mut splice_works = true;
    loop {
        let n = match &pipe {
            Some(p) => match p.fill(from).await {
                Ok(n) => n,
                // Where splice is not supported nothing was moved: copy instead, for good.
                Err(err) if splice_unsupported(&err) => {
                    pipe = None;
                    splice_works = false;
                    continue;
                }
                Err(_) => return Err(from_side),
            },
            None => read_tcp(from, &mut buf).await.map_err(|_| from_side)?,
        };
        if n == 0 {
            half_close(to);
            return Ok(());
        }
        on_read(n);
        activity.touch();
        match &pipe {
            Some(p) => p.drain(to, n).await.map_err(|_| to_side)?,
            None => write_all_tcp(to, &buf[..n]).await.map_err(|_| to_side)?,
        }
        on_written(n);
        activity.touch();
        match &pipe {
            Some(p) => {
                streak = if n < p.capacity() / 4 { streak + 1 } else { 0 };
                if streak >= CALM_FILLS_BEFORE_COPY {
                    pipe = None;
                    streak = 0;
                }
            }
            None if n < buf.len() => streak = 0,
            None if buf.len() < MAX_BUFFER => buf.resize(buf.len() * 2, 0),
            None => {
                streak += 1;
                if streak >= FULL_READS_BEFORE_SPLICE && splice_works {
                    streak = 0;
                    // Without a pipe (descriptor limit, say) the copy simply goes on.
                    pipe = Pipe::new().ok();
                }
            }
        }
    }
}

fn splice_unsupported(err: &std::io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP))
}

async fn read_tcp(from: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match from.try_read(buf) {
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => from.readable().await?,
            result => return result,
        }
    }
}

async fn write_all_tcp(to: &TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match to.try_write(bytes) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => to.writable().await?,
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Passes an orderly end on as a FIN. The peer may already be gone; a failed FIN changes nothing
/// for the other direction.
fn half_close(to: &TcpStream) {
    let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
}
