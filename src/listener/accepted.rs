//! An accepted client socket that joins the runtime's poller only once it has to wait. A client
//! that sends its request with the handshake, is answered at once and leaves (a new connection per
//! request) then never costs the two epoll_ctl calls of a registration and its removal: reads
//! and writes are tried on the socket first, as HAProxy's speculative I/O does, and only one that
//! would block registers it.

use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::matchers::ip::canonical_ip;

pub struct AcceptedSocket {
    state: State,
}

enum State {
    /// Non-blocking, not (yet) known to the poller.
    Unregistered(std::net::TcpStream),
    Registered(TcpStream),
    /// Registering failed: the socket is closed, and every call says so.
    Failed,
}

impl AcceptedSocket {
    /// `socket` must be in non-blocking mode.
    pub fn new(socket: std::net::TcpStream) -> Self {
        AcceptedSocket { state: State::Unregistered(socket) }
    }

    /// The socket as the runtime's stream (registered now if it was not), for what needs one
    /// (the TCP relay).
    pub fn into_registered(self) -> io::Result<TcpStream> {
        match self.state {
            State::Unregistered(socket) => TcpStream::from_std(socket),
            State::Registered(stream) => Ok(stream),
            State::Failed => Err(failed()),
        }
    }

    /// The socket out of the poller, still non-blocking (for a hand-off of the descriptor itself).
    pub fn into_std(self) -> io::Result<std::net::TcpStream> {
        match self.state {
            State::Unregistered(socket) => Ok(socket),
            State::Registered(stream) => stream.into_std(),
            State::Failed => Err(failed()),
        }
    }

    /// The address the client connected to, as the proxy reports it (`server_address`).
    pub fn server_address(&self) -> Option<SocketAddr> {
        match &self.state {
            State::Unregistered(socket) => server_address(socket.as_fd()),
            State::Registered(stream) => server_address(stream.as_fd()),
            State::Failed => None,
        }
    }

    /// Registers the socket; on failure the socket is gone (closed) and `Failed` remains.
    fn register(&mut self) -> io::Result<&mut TcpStream> {
        if matches!(self.state, State::Unregistered(_)) {
            self.state = match std::mem::replace(&mut self.state, State::Failed) {
                State::Unregistered(socket) => State::Registered(TcpStream::from_std(socket)?),
                kept => kept,
            };
        }
        match &mut self.state {
            State::Registered(stream) => Ok(stream),
            _ => Err(failed()),
        }
    }
}

fn failed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the client socket could not be registered with the poller")
}

/// A `recv` into the unfilled part of `buf` (left uninitialised: the kernel writes it).
fn recv_into(socket: &std::net::TcpStream, buf: &mut ReadBuf<'_>) -> io::Result<()> {
    // SAFETY: the kernel only writes into the unfilled part (never de-initialising it), and only
    // the `n` bytes it reports written are marked initialised below.
    let n = unsafe {
        let unfilled = buf.unfilled_mut();
        libc::recv(socket.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len(), 0)
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: recv wrote `n` bytes into the unfilled part.
    unsafe { buf.assume_init(n) };
    buf.advance(n);
    Ok(())
}

impl AsyncRead for AcceptedSocket {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let State::Unregistered(socket) = &self.state {
            loop {
                match recv_into(socket, buf) {
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                    done => return Poll::Ready(done),
                }
            }
        }
        // Registering reports the socket's current readiness, so nothing that arrived after the
        // failed try is missed.
        match self.register() {
            Ok(stream) => Pin::new(stream).poll_read(cx, buf),
            Err(err) => Poll::Ready(Err(err)),
        }
    }
}

impl AcceptedSocket {
    /// Tries `write` on the unregistered socket; `None`: it would block, register and poll.
    fn try_unregistered(&mut self, write: impl FnOnce(&mut std::net::TcpStream) -> io::Result<usize>) -> Option<io::Result<usize>> {
        let State::Unregistered(socket) = &mut self.state else {
            return None;
        };
        match write(socket) {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => None,
            done => Some(done),
        }
    }
}

impl AsyncWrite for AcceptedSocket {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if let Some(done) = self.try_unregistered(|socket| socket.write(data)) {
            return Poll::Ready(done);
        }
        match self.register() {
            Ok(stream) => Pin::new(stream).poll_write(cx, data),
            Err(err) => Poll::Ready(Err(err)),
        }
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        if let Some(done) = self.try_unregistered(|socket| socket.write_vectored(bufs)) {
            return Poll::Ready(done);
        }
        match self.register() {
            Ok(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Err(err) => Poll::Ready(Err(err)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.state {
            State::Unregistered(socket) => Poll::Ready(socket.shutdown(Shutdown::Write)),
            State::Registered(stream) => Pin::new(stream).poll_shutdown(cx),
            State::Failed => Poll::Ready(Err(failed())),
        }
    }
}

impl AcceptedSocket {
    /// The descriptor; -1 once a failed registration closed the socket (system calls on it then
    /// fail with EBADF).
    pub fn as_raw_fd(&self) -> RawFd {
        match &self.state {
            State::Unregistered(socket) => socket.as_raw_fd(),
            State::Registered(stream) => stream.as_raw_fd(),
            State::Failed => -1,
        }
    }
}

/// The address a client connected to, as the proxy reports it (`IRouteContext.serverIp`, the
/// destination of a PROXY header towards a backend): the socket's local address, an IPv4-mapped
/// IPv6 address as the IPv4 one (as client addresses are).
pub fn server_address(socket: BorrowedFd<'_>) -> Option<SocketAddr> {
    let local = socket2::SockRef::from(&socket).local_addr().ok()?.as_socket()?;
    Some(SocketAddr::new(canonical_ip(local.ip()), local.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_address_is_the_local_one_with_a_mapped_ipv4_address_as_ipv4() {
        // A dual-stack listener sees an IPv4 client's connection on an IPv4-mapped address.
        let Ok(listener) = std::net::TcpListener::bind("[::]:0") else { return };
        let port = listener.local_addr().expect("addr").port();
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        assert!(accepted.local_addr().expect("addr").is_ipv6());
        let expected = SocketAddr::from(([127, 0, 0, 1], port));
        assert_eq!(server_address(accepted.as_fd()), Some(expected));
        accepted.set_nonblocking(true).expect("nonblocking");
        assert_eq!(AcceptedSocket::new(accepted).server_address(), Some(expected));
    }
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pair() -> (std::net::TcpStream, AcceptedSocket) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        accepted.set_nonblocking(true).expect("non-blocking");
        (client, AcceptedSocket::new(accepted))
    }

    fn registered(socket: &AcceptedSocket) -> bool {
        matches!(socket.state, State::Registered(_))
    }

    /// Bytes already there are read and answered without the poller; a read that must wait
    /// registers and is woken by what arrives later.
    #[tokio::test]
    async fn registers_only_to_wait() {
        let (mut client, mut accepted) = pair();
        client.write_all(b"first").expect("send");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut buf = [0u8; 16];
        assert_eq!(accepted.read(&mut buf).await.expect("read"), 5);
        assert_eq!(&buf[..5], b"first");
        accepted.write_all(b"answer").await.expect("write");
        assert!(!registered(&accepted));

        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            client.write_all(b"later").expect("send");
            client.shutdown(Shutdown::Write).expect("shutdown");
            let mut answer = Vec::new();
            std::io::Read::read_to_end(&mut client, &mut answer).expect("read");
            answer
        });
        let n = tokio::time::timeout(Duration::from_secs(5), accepted.read(&mut buf)).await.expect("woken").expect("read");
        assert_eq!(&buf[..n], b"later");
        assert!(registered(&accepted));
        assert_eq!(accepted.read(&mut buf).await.expect("read"), 0);
        accepted.write_all(b" and more").await.expect("write");
        accepted.shutdown().await.expect("shutdown");
        assert_eq!(sender.join().expect("sender"), b"answer and more");
    }

    /// Unregistered, the socket still becomes the runtime's stream or hands its descriptor on.
    #[tokio::test]
    async fn converts_either_way() {
        let (mut client, accepted) = pair();
        let fd = accepted.as_raw_fd();
        let mut stream = accepted.into_registered().expect("register");
        assert_eq!(stream.as_raw_fd(), fd);
        client.write_all(b"x").expect("send");
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.expect("read");

        let (_client, accepted) = pair();
        let fd = accepted.as_raw_fd();
        let std = accepted.into_std().expect("std");
        assert_eq!(std.as_raw_fd(), fd);
        assert_eq!(std.local_addr().expect("addr").ip(), std::net::Ipv4Addr::LOCALHOST);
    }
}
