//! Listening ports: binding (all of a set or none), one accept loop per port, and releasing a port
//! so it can be bound again at once. Hands each accepted socket to a callback; knows nothing of
//! routes or sessions.

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const LISTEN_BACKLOG: i32 = 1024;
/// After an accept error such as EMFILE, wait before retrying instead of spinning on it.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(20);

pub type OnAccept = Arc<dyn Fn(TcpStream, SocketAddr, u16) + Send + Sync>;

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

#[derive(Default)]
pub struct PortManager {
    ports: BTreeMap<u16, Listening>,
}

impl PortManager {
    pub fn ports(&self) -> Vec<u16> {
        self.ports.keys().copied().collect()
    }

    /// Binds every port of `ports` not yet bound, or none of them: on the first failure the ones
    /// bound by this call are closed again. Must run inside the engine's tokio runtime.
    pub fn bind_all(&mut self, ports: &[u16], on_accept: &OnAccept) -> Result<(), BindError> {
        let mut bound = Vec::new();
        for &port in ports.iter().filter(|p| !self.ports.contains_key(p)) {
            let listener = bind(port)
                .and_then(TcpListener::from_std)
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

/// Dual-stack `[::]:port` where the host has IPv6, else `0.0.0.0:port`.
fn bind(port: u16) -> io::Result<std::net::TcpListener> {
    let socket = bind_dual_stack(Type::STREAM, port)?;
    socket.listen(LISTEN_BACKLOG)?;
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

async fn accept_loop(listener: TcpListener, port: u16, stop: CancellationToken, on_accept: OnAccept) {
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => on_accept(stream, peer, port),
                Err(err) => {
                    tracing::warn!(port, error = %err, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
        }
    }
}
