//! Zero-copy forwarding between two TCP sockets with Linux splice(2) through a pipe: the bytes go
//! socket → pipe → socket inside the kernel and never cross into a user buffer. The relay switches
//! a direction to it once that direction proves to be bulk; short exchanges keep the plain copy,
//! which costs no pipe (two descriptors) per direction.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // The default size (64 KiB): larger pipes draw on a per-user kernel budget that other
        // pipes of the process (child processes' stdio) need too.
        // SAFETY: fcntl on a descriptor we own.
        let capacity = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        Ok(Pipe { read, write, capacity: usize::try_from(capacity).unwrap_or(64 * 1024).max(4096) })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Moves what `from` has (up to the pipe's size) into the empty pipe; `Ok(0)` at end of stream.
    pub async fn fill(&self, from: &TcpStream) -> io::Result<usize> {
        let write = self.write.as_raw_fd();
        from.async_io(Interest::READABLE, || splice(from.as_raw_fd(), write, self.capacity)).await
    }

    /// Writes the `len` bytes in the pipe to `to`, waiting while its send buffer is full.
    pub async fn drain(&self, to: &TcpStream, mut len: usize) -> io::Result<()> {
        let read = self.read.as_raw_fd();
        while len > 0 {
            let n = to.async_io(Interest::WRITABLE, || splice(read, to.as_raw_fd(), len)).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "splice wrote nothing"));
            }
            len -= n;
        }
        Ok(())
    }
}

/// One non-blocking splice; `WouldBlock` when the socket end is not ready (the pipe end never is
/// the reason: the relay fills only an empty pipe and drains it whole).
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call; null offsets are allowed
    // (and required) for sockets and pipes.
    let n = unsafe { libc::splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
