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

/// What the client sent while the backend was being connected: its bytes (counted already; freed
/// once written) and whether its FIN came too.
#[derive(Default)]
pub struct Held {
    pub bytes: Vec<u8>,
    pub client_done: bool,
}

/// Relays until both directions have ended or a limit fires. `held` goes to the backend first,
/// as part of the client's direction: the backend's direction flows meanwhile, so a backend that
/// answers as it reads (an echo, a pipelining server) cannot block the bytes held for it, and the
/// limits apply to them as to any others.
pub async fn relay(
    client: &mut TcpStream,
    backend: &mut TcpStream,
    bytes: &ByteSinks<'_>,
    limits: RelayLimits,
    shutdown: &CancellationToken,
    held: Held,
) -> RelayEnd {
    let (client_read, client_write) = client.split();
    let (backend_read, backend_write) = backend.split();
    relay_halves((client_read, client_write), (backend_read, backend_write), bytes, limits, shutdown, held).await
}

/// `relay` for any two streams (a TLS session and a socket pair, say).
pub async fn relay_streams<C, B>(client: &mut C, backend: &mut B, bytes: &ByteSinks<'_>, limits: RelayLimits, shutdown: &CancellationToken) -> RelayEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    relay_halves(tokio::io::split(client), tokio::io::split(backend), bytes, limits, shutdown, Held::default()).await
}

async fn relay_halves<CR, CW, BR, BW>(
    (client_read, client_write): (CR, CW),
    (backend_read, backend_write): (BR, BW),
    bytes: &ByteSinks<'_>,
    limits: RelayLimits,
    shutdown: &CancellationToken,
    held: Held,
) -> RelayEnd
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    BR: AsyncRead + Unpin,
    BW: AsyncWrite + Unpin,
{
    let activity = Activity::new();
    let upstream = pump(client_read, backend_write, Side::Client, held, |n| bytes.add_in(n), |_| {}, &activity);
    let downstream = pump(backend_read, client_write, Side::Backend, Held::default(), |_| {}, |n| bytes.add_out(n), &activity);
    let idle = activity.quiet_for(limits.idle);
    tokio::pin!(upstream, downstream, idle);

    let (mut up_done, mut down_done) = (false, false);
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

/// Copies `first`, then `from` → `to` until `from` ends (at once if it ended before), then
/// half-closes `to`. Errors name the side at fault: a failed read is the reading side's, a failed
/// write the writing side's.
async fn pump<R, W>(
    mut from: R,
    mut to: W,
    from_side: Side,
    first: Held,
    on_read: impl Fn(usize),
    on_written: impl Fn(usize),
    activity: &Activity,
) -> Result<(), Side>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let to_side = if from_side == Side::Client { Side::Backend } else { Side::Client };
    let Held { bytes: held, client_done: from_done } = first;
    if !held.is_empty() {
        to.write_all(&held).await.map_err(|_| to_side)?;
        to.flush().await.map_err(|_| to_side)?;
        on_written(held.len());
        activity.touch();
    }
    drop(held);
    if from_done {
        // The peer may already be gone; a failed FIN changes nothing for the other direction.
        let _ = to.shutdown().await;
        return Ok(());
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// Two ends of one loopback TCP connection.
    async fn connected_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (connected, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        (connected.expect("connect"), accepted.expect("accept").0)
    }

    /// More than the kernel buffers of both connections hold together, so that nothing reaches
    /// the end unless someone reads the echo while the held bytes are still being written.
    const HELD: usize = 32 * 1024 * 1024;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bytes_held_during_connect_reach_a_backend_that_answers_as_it_reads() {
        let (client, mut proxy_client) = connected_pair().await;
        let (mut proxy_backend, echo) = connected_pair().await;
        tokio::spawn(async move {
            let (mut read, mut write) = echo.into_split();
            let _ = tokio::io::copy(&mut read, &mut write).await;
            let _ = write.shutdown().await;
        });
        // The client sent everything, then its FIN, while the backend was being connected.
        let (mut client_read, mut client_write) = client.into_split();
        client_write.shutdown().await.expect("client FIN");
        let echoed = tokio::spawn(async move {
            let mut echoed = Vec::new();
            client_read.read_to_end(&mut echoed).await.map(|_| echoed)
        });
        let limits = RelayLimits { idle: Duration::from_secs(30), deadline: Instant::now() + Duration::from_secs(60) };
        let end = tokio::time::timeout(
            Duration::from_secs(30),
            relay(&mut proxy_client, &mut proxy_backend, &ByteSinks { sinks: &[] }, limits, &CancellationToken::new(), Held { bytes: vec![0x5a_u8; HELD], client_done: true }),
        )
        .await
        .expect("the relay finished instead of waiting on itself");
        assert_eq!(end, RelayEnd::Completed);
        let echoed = echoed.await.expect("reader task").expect("client read");
        assert_eq!(echoed.len(), HELD, "every held byte came back through the echo");
        assert!(echoed.iter().all(|byte| *byte == 0x5a));
    }
}
