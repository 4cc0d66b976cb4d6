//! WebSocket tunnels: once the upstream answered 101, the client's and the upstream's upgraded
//! streams are joined here until one side ends, the connection idles past its timeout, outlives
//! `maxConnectionLifetime` or the engine shuts down. Without route settings the tunnel is a byte
//! relay; with `websocket.pingInterval` or `maxPayloadSize` it follows the frames both ways: the
//! proxy pings the client between the backend's frames and ends a tunnel whose client does not pong
//! within `pingTimeout`, and a client frame that breaks RFC 6455 ends it with a Close 1002, one over
//! `maxPayloadSize` (alone or with its message's earlier frames) with a Close 1009; not one byte of
//! the refused frame reaches the upstream. Frames are followed, never rewritten.
//! Knows nothing of hyper's connections or of routing.

pub mod frame;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::routing::table::WsSettings;
use crate::tcp::{relay_streams, Activity, ByteSinks, RelayEnd, RelayLimits};
use frame::{close_frame, server_frame, FrameError, FrameTracker, OPCODE_CLOSE, OPCODE_PING, OPCODE_PONG};

/// What the proxy's pings carry; a client's pong echoes it.
const PING_PAYLOAD: &[u8] = b"smartproxy";
/// Buffers start small and grow only while a stream keeps them full, as in the raw relay: idle
/// tunnels stay cheap and bulk transfers get large reads.
const INITIAL_BUFFER: usize = 16 * 1024;
const MAX_BUFFER: usize = 256 * 1024;
/// How long the proxy's own Close may take to reach the client before the tunnel drops it.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// How a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelEnd {
    Completed,
    ClientError,
    UpstreamError,
    IdleTimeout,
    LifetimeExceeded,
    Shutdown,
    /// The client did not answer a ping within `pingTimeout`.
    PongTimeout,
    /// A client frame or message over `maxPayloadSize` (the client got a Close 1009).
    MessageTooBig,
    /// A client frame that breaks RFC 6455 (the client got a Close 1002 saying which rule).
    InvalidFrame(FrameError),
}

impl TunnelEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelEnd::Completed => "completed",
            TunnelEnd::ClientError => "client_error",
            TunnelEnd::UpstreamError => "upstream_error",
            TunnelEnd::IdleTimeout => "idle_timeout",
            TunnelEnd::LifetimeExceeded => "lifetime_exceeded",
            TunnelEnd::Shutdown => "shutdown",
            TunnelEnd::PongTimeout => "pong_timeout",
            TunnelEnd::MessageTooBig => "message_too_big",
            TunnelEnd::InvalidFrame(_) => "invalid_frame",
        }
    }
}

impl From<RelayEnd> for TunnelEnd {
    fn from(end: RelayEnd) -> Self {
        match end {
            RelayEnd::Completed => TunnelEnd::Completed,
            RelayEnd::ClientError => TunnelEnd::ClientError,
            RelayEnd::BackendError => TunnelEnd::UpstreamError,
            RelayEnd::IdleTimeout => TunnelEnd::IdleTimeout,
            RelayEnd::LifetimeExceeded => TunnelEnd::LifetimeExceeded,
            RelayEnd::Shutdown => TunnelEnd::Shutdown,
        }
    }
}

/// Joins the two upgraded streams until the tunnel ends. Bytes are counted by the client stream
/// itself (the upgraded stream is the client connection's), so nothing is counted here.
pub async fn run<C, U>(mut client: C, mut upstream: U, settings: WsSettings, limits: RelayLimits, shutdown: &CancellationToken) -> TunnelEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    if !settings.follows_frames() {
        let sinks = ByteSinks { sinks: &[] };
        return relay_streams(&mut client, &mut upstream, &sinks, limits, shutdown).await.into();
    }
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (upstream_read, upstream_write) = tokio::io::split(upstream);
    let activity = Activity::new();
    let heartbeat = Heartbeat { pong_ms: AtomicU64::new(0), ping_ms: AtomicU64::new(0), ping_sent: Notify::new() };
    let client_side_at_boundary = AtomicBool::new(true);

    let end = {
        let upstream_pump = client_to_upstream(&mut client_read, upstream_write, settings.max_message, &activity, &heartbeat);
        let client_pump = upstream_to_client(upstream_read, &mut client_write, settings.ping_interval, &activity, &heartbeat, &client_side_at_boundary);
        let watchdog = async {
            match settings.ping_interval {
                Some(_) => heartbeat.missed_pong(&activity, settings.ping_timeout).await,
                None => std::future::pending().await,
            }
        };
        let idle = activity.quiet_for(limits.idle);
        tokio::pin!(upstream_pump, client_pump, watchdog, idle);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            if up_done && down_done {
                break TunnelEnd::Completed;
            }
            tokio::select! {
                result = &mut upstream_pump, if !up_done => match result {
                    Ok(()) => up_done = true,
                    Err(end) => break end,
                },
                result = &mut client_pump, if !down_done => match result {
                    Ok(()) => down_done = true,
                    Err(end) => break end,
                },
                _ = &mut watchdog => break TunnelEnd::PongTimeout,
                _ = &mut idle => break TunnelEnd::IdleTimeout,
                _ = tokio::time::sleep_until(limits.deadline.into()) => break TunnelEnd::LifetimeExceeded,
                _ = shutdown.cancelled() => break TunnelEnd::Shutdown,
            }
        }
    };
    // Tell the client why, where a frame of ours cannot land inside one of the backend's.
    let status = match end {
        TunnelEnd::MessageTooBig => Some((1009, "message too big")),
        TunnelEnd::InvalidFrame(err) => Some((err.close_code(), err.reason())),
        TunnelEnd::PongTimeout => Some((1001, "ping timeout")),
        TunnelEnd::Shutdown => Some((1001, "going away")),
        _ => None,
    };
    if let (Some((code, reason)), true) = (status, client_side_at_boundary.load(Ordering::Acquire)) {
        let frame = close_frame(code, reason);
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            client_write.write_all(&frame).await?;
            client_write.shutdown().await?;
            // Closing with unread client bytes would send a reset, which may destroy the Close
            // before the client reads it: read on (and drop) until the client closes too.
            let mut sink = vec![0u8; 4096];
            while client_read.read(&mut sink).await? > 0 {}
            Ok::<(), std::io::Error>(())
        })
        .await;
    }
    end
}

/// The proxy's pings to the client and the client's pongs (times in `Activity` milliseconds, +1 so
/// that 0 means never).
struct Heartbeat {
    pong_ms: AtomicU64,
    ping_ms: AtomicU64,
    ping_sent: Notify,
}

impl Heartbeat {
    /// Resolves when a ping went unanswered for `timeout`.
    async fn missed_pong(&self, activity: &Activity, timeout: Duration) {
        loop {
            self.ping_sent.notified().await;
            let sent = self.ping_ms.load(Ordering::Acquire);
            tokio::time::sleep(timeout).await;
            if self.pong_ms.load(Ordering::Acquire) < sent {
                tracing::debug!(after_ms = activity.now_ms(), "websocket client did not answer a ping");
                return;
            }
        }
    }
}

/// Client → upstream, frame by frame: notes pongs (passed on: an unsolicited pong is allowed,
/// RFC 6455 §5.5.3) and passes on only what the tracker has cleared. The bytes of a frame head are
/// held back until the whole head has passed the checks, so a refused frame never reaches the
/// upstream, not even its first byte; the frames before it in the same read still do.
async fn client_to_upstream<R, W>(from: &mut R, mut to: W, max_message: Option<u64>, activity: &Activity, heartbeat: &Heartbeat) -> Result<(), TunnelEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut tracker = FrameTracker::new(max_message);
    let mut buf = vec![0u8; INITIAL_BUFFER];
    // `buf[..held]`: the start of a frame head, not yet cleared; `passed`: the stream offset of buf[0].
    let mut held = 0usize;
    let mut passed = 0u64;
    loop {
        let n = from.read(&mut buf[held..]).await.map_err(|_| TunnelEnd::ClientError)?;
        if n == 0 {
            // A head cut short by the client's end is no frame: it is dropped with the stream.
            let _ = to.shutdown().await;
            return Ok(());
        }
        activity.touch();
        let filled = held + n;
        let mut pong = false;
        let verdict = tracker.feed(&buf[held..filled], |head| pong |= head.opcode == OPCODE_PONG);
        let cleared = usize::try_from(tracker.cleared().saturating_sub(passed)).map_or(filled, |c| c.min(filled));
        if pong {
            heartbeat.pong_ms.store(activity.now_ms() + 1, Ordering::Release);
        }
        if cleared > 0 {
            write_flushed(&mut to, &buf[..cleared]).await.map_err(|_| TunnelEnd::UpstreamError)?;
            passed += cleared as u64;
            activity.touch();
        }
        verdict.map_err(|err| match err {
            FrameError::TooBig { .. } => TunnelEnd::MessageTooBig,
            err => TunnelEnd::InvalidFrame(err),
        })?;
        // A head is at most 14 bytes: the copy is of a few bytes, and only when a read split one.
        buf.copy_within(cleared..filled, 0);
        held = filled - cleared;
        if filled == buf.len() && buf.len() < MAX_BUFFER {
            buf.resize(buf.len() * 2, 0);
        }
    }
}

/// Upstream → client, with the proxy's pings put between the upstream's frames (never after the
/// upstream's Close, after which nothing may follow).
async fn upstream_to_client<R, W>(
    mut from: R,
    to: &mut W,
    ping_interval: Option<Duration>,
    activity: &Activity,
    heartbeat: &Heartbeat,
    at_boundary: &AtomicBool,
) -> Result<(), TunnelEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut tracker = FrameTracker::from_server();
    let mut closing = false;
    let mut buf = vec![0u8; INITIAL_BUFFER];
    let ping = server_frame(OPCODE_PING, PING_PAYLOAD);
    let mut next_ping = ping_interval.map(|every| tokio::time::Instant::now() + every);
    loop {
        let ping_due = async {
            match next_ping {
                Some(at) if tracker.at_boundary() && !closing => tokio::time::sleep_until(at).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = ping_due => {
                // Until the ping is out whole, a frame of ours put here would land inside it.
                at_boundary.store(false, Ordering::Release);
                write_flushed(to, &ping).await.map_err(|_| TunnelEnd::ClientError)?;
                at_boundary.store(true, Ordering::Release);
                heartbeat.ping_ms.store(activity.now_ms() + 1, Ordering::Release);
                heartbeat.ping_sent.notify_one();
                next_ping = ping_interval.map(|every| tokio::time::Instant::now() + every);
            }
            read = from.read(&mut buf) => {
                let n = read.map_err(|_| TunnelEnd::UpstreamError)?;
                if n == 0 {
                    let _ = to.shutdown().await;
                    return Ok(());
                }
                activity.touch();
                // The upstream is not ours to police: a stream we cannot follow only stops our pings.
                if tracker.feed(&buf[..n], |head| closing |= head.opcode == OPCODE_CLOSE).is_err() {
                    closing = true;
                }
                // Between frames only once this chunk has been written whole.
                at_boundary.store(false, Ordering::Release);
                write_flushed(to, &buf[..n]).await.map_err(|_| TunnelEnd::ClientError)?;
                at_boundary.store(tracker.at_boundary() && !closing, Ordering::Release);
                activity.touch();
                if n == buf.len() && buf.len() < MAX_BUFFER {
                    buf.resize(buf.len() * 2, 0);
                }
            }
        }
    }
}

/// Writes all of `bytes` and pushes them out: a TLS stream may otherwise keep the last record of
/// a burst in its buffer until the next write.
async fn write_flushed<W: AsyncWrite + Unpin + ?Sized>(to: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    to.write_all(bytes).await?;
    to.flush().await
}

/// The tunnels of one client connection. hyper's connection future ends as soon as it hands the
/// upgraded stream over, but the session (its counters, its per-IP and route slots) must last as
/// long as the tunnel does: the session waits on this scope once hyper is done.
pub struct TunnelScope {
    /// Made by the first tunnel (or at the end): most connections never upgrade, and an idle
    /// connection should hold only what it needs.
    tasks: std::sync::OnceLock<tokio_util::task::TaskTracker>,
    limits: RelayLimits,
}

impl TunnelScope {
    pub fn new(limits: RelayLimits) -> Self {
        TunnelScope { tasks: std::sync::OnceLock::new(), limits }
    }

    pub fn limits(&self) -> RelayLimits {
        self.limits
    }

    pub fn spawn<F>(&self, tunnel: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.get_or_init(tokio_util::task::TaskTracker::new).spawn(tunnel);
    }

    /// Resolves when every tunnel of the connection has ended.
    pub async fn wait(&self) {
        // No tunnel yet: nothing to wait for (a tracker made now would be empty, and its wait
        // would return at once just the same).
        let Some(tasks) = self.tasks.get() else {
            return;
        };
        tasks.close();
        tasks.wait().await;
    }
}
