//! Listening ports: binding (all of a set or none), one accept loop per port, and releasing a port
//! so it can be bound again at once. Hands each accepted socket to a callback; knows nothing of
//! routes or sessions. The client sockets' options are set once, on the listening socket: Linux
//! copies them to every socket it accepts, which saves each connection its own setsockopt calls.

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, TcpKeepalive, Type};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::wake_gate::WakeGated;

const LISTEN_BACKLOG: i32 = 1024;
/// After an accept error such as EMFILE, wait before retrying instead of spinning on it.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(20);

mod accepted;
pub use accepted::{server_address, AcceptedSocket};

pub type OnAccept = Arc<dyn Fn(AcceptedSocket, SocketAddr, u16) + Send + Sync>;

/// Why a port could not be bound; the message starts with the errno name so the wrapper can set
/// `err.code` as Node's own `listen` errors do.
#[derive(Debug)]
pub struct BindError {
    pub port: u16,
    pub source: io::Error,
}

impl std::fmt::Display for BindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let port = self.port;
        match self.source.kind() {
            io::ErrorKind::AddrInUse => write!(f, "EADDRINUSE: port {port} is already in use"),
            io::ErrorKind::PermissionDenied => write!(f, "EACCES: permission denied to listen on port {port}"),
            _ => write!(f, "ELISTEN: cannot listen on port {port}: {}", self.source),
        }
    }
}

impl std::error::Error for BindError {}

struct Listening {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// The options every accepted client socket gets (`noDelay`, `keepAlive`).
#[derive(Clone, Copy, Debug, Default)]
pub struct ClientSocketOptions {
    pub no_delay: bool,
    /// Idle time before the first keep-alive probe; `None`: no keep-alive probes.
    pub keep_alive: Option<Duration>,
}

pub struct PortManager {
    ports: BTreeMap<u16, Listening>,
    client_options: ClientSocketOptions,
}

impl PortManager {
    pub fn new(client_options: ClientSocketOptions) -> Self {
        PortManager { ports: BTreeMap::new(), client_options }
    }

    pub fn ports(&self) -> Vec<u16> {
        self.ports.keys().copied().collect()
    }

    /// Binds every port of `ports` not yet bound, or none of them: on the first failure the ones
    /// bound by this call are closed again. Must run inside the engine's tokio runtime.
    pub fn bind_all(&mut self, ports: &[u16], on_accept: &OnAccept) -> Result<(), BindError> {
        let mut bound = Vec::new();
        for &port in ports.iter().filter(|p| !self.ports.contains_key(p)) {
            let listener = bind(port, self.client_options)
                // SAFETY: the AsyncFd owns the listener, whose descriptor stays open and the same
                // for as long as the AsyncFd lives.
                .and_then(|listener| unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }.map_err(io::Error::from))
                .map_err(|source| BindError { port, source })?;
            bound.push((port, listener));
        }
        for (port, listener) in bound {
            let stop = CancellationToken::new();
            let task = tokio::spawn(accept_loop(listener, port, stop.clone(), on_accept.clone()));
            self.ports.insert(port, Listening { stop, task });
        }
        Ok(())
    }

    /// Stops accepting on `port` and closes its socket before returning.
    pub async fn release(&mut self, port: u16) {
        if let Some(listening) = self.ports.remove(&port) {
            listening.stop.cancel();
            let _ = listening.task.await;
        }
    }

    pub async fn release_all(&mut self) {
        for port in self.ports() {
            self.release(port).await;
        }
    }
}

/// Dual-stack `[::]:port` where the host has IPv6, else `0.0.0.0:port`, with the options its
/// accepted sockets inherit.
fn bind(port: u16, client_options: ClientSocketOptions) -> io::Result<std::net::TcpListener> {
    let socket = bind_dual_stack(Type::STREAM, port)?;
    socket.set_nodelay(client_options.no_delay)?;
    if let Some(idle) = client_options.keep_alive {
        socket.set_tcp_keepalive(&TcpKeepalive::new().with_time(idle))?;
    }
    socket.listen(LISTEN_BACKLOG)?;
    // Accepted sockets start with delayed acknowledgements, as a connection does anyway once it
    // has exchanged data both ways: a client's first request (or TLS ClientHello) is then
    // acknowledged by the answer to it, instead of by an ACK segment of its own that the client's
    // kernel has to take too (HAProxy's `tcp-smart-accept`). Should no answer come in time, the
    // kernel's delayed-ACK timer sends the ACK. A saving, not a need: a kernel that refuses it
    // (an emulated one) still gets the listener.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = socket.set_quickack(false);
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// A socket of `kind` bound to `[::]:port` (taking IPv4 too) where the host has IPv6, else to
/// `0.0.0.0:port`. TCP sockets get SO_REUSEADDR, so a port released by `stop()` can be bound
/// again while old connections sit in TIME_WAIT (it does not let two listeners share a port:
/// that would be SO_REUSEPORT). UDP sockets do not: there it would let another socket share the
/// port and its datagrams instead of failing to bind.
pub fn bind_dual_stack(kind: Type, port: u16) -> io::Result<Socket> {
    let reuse = kind == Type::STREAM;
    match Socket::new(Domain::IPV6, kind, None) {
        Ok(socket) => {
            socket.set_only_v6(false)?;
            socket.set_reuse_address(reuse)?;
            socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
            Ok(socket)
        }
        Err(_) => {
            let socket = Socket::new(Domain::IPV4, kind, None)?;
            socket.set_reuse_address(reuse)?;
            socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
            Ok(socket)
        }
    }
}

async fn accept_loop(listener: AsyncFd<std::net::TcpListener>, port: u16, stop: CancellationToken, on_accept: OnAccept) {
    // One wait on the token for the loop's life, polled only once the token woke it: a wait made
    // afresh per turn would join and leave the token's waiter list for every batch of
    // connections, and even a standing wait takes the list's lock on each poll.
    let mut stopped = WakeGated::new(stop.cancelled());
    loop {
        tokio::select! {
            biased;
            _ = &mut stopped => return,
            accepted = listener.async_io(Interest::READABLE, accept_unregistered) => match accepted {
                Ok((socket, peer)) => on_accept(AcceptedSocket::new(socket), peer, port),
                Err(err) => {
                    tracing::warn!(port, error = %err, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
        }
    }
}

/// One connection off the listening socket, non-blocking and not yet known to the poller (see
/// `AcceptedSocket`).
fn accept_unregistered(listener: &std::net::TcpListener) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    // SAFETY: accept4 writes at most `len` bytes of address into the storage try_init provides,
    // and returns a new descriptor that nothing else owns.
    let (fd, peer) = unsafe {
        SockAddr::try_init(|storage, len| {
            let fd = libc::accept4(listener.as_raw_fd(), storage.cast(), len, libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC);
            if fd < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(fd)
            }
        })?
    };
    // SAFETY: `fd` is the open socket accept4 just returned, owned from here on by the stream.
    let socket = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    let peer = peer.as_socket().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "accepted a socket without an IP address"))?;
    Ok((socket, peer))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The session sets no options on a client socket of its own: it relies on these being
    /// inherited from the listening socket.
    #[test]
    fn accepted_sockets_inherit_the_client_options() {
        for options in [
            ClientSocketOptions { no_delay: true, keep_alive: Some(Duration::from_secs(77)) },
            ClientSocketOptions { no_delay: false, keep_alive: None },
        ] {
            let listener = bind(0, options).expect("bind");
            let port = listener.local_addr().expect("addr").port();
            listener.set_nonblocking(false).expect("blocking");
            let _client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
            let (accepted, _) = listener.accept().expect("accept");
            let accepted = socket2::SockRef::from(&accepted);
            assert_eq!(accepted.nodelay().expect("nodelay"), options.no_delay);
            assert_eq!(accepted.keepalive().expect("keepalive"), options.keep_alive.is_some());
            if let Some(idle) = options.keep_alive {
                assert_eq!(accepted.keepalive_time().expect("keepidle"), idle);
            }
            // Delayed acknowledgements from the start: the first request is acknowledged by its answer.
            assert!(!accepted.quickack().expect("quickack"));
        }
    }
}
