//! Datagrams by the batch: on Linux one `recvmmsg` takes what is waiting on a socket and one
//! `sendmmsg` sends a run of datagrams, so a busy port or flow pays a system call per batch rather
//! than per datagram. Elsewhere the same interface reads and sends one datagram per call.
//!
//! The calls are non-blocking and bypass tokio's readiness for writes: a full send buffer drops
//! the rest of a run (the caller decides), as the network would.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::RawFd;

use socket2::SockAddr;

/// Datagrams read or sent per call.
pub const BATCH: usize = 32;
/// Room for the largest UDP payload in every slot, so no datagram is ever truncated. The
/// allocator hands out the slots as untouched zero pages: small datagrams make only each slot's
/// first page resident.
const SLOT: usize = 65_535;

/// Datagrams read from one socket in one call, each with its source.
pub struct RecvBatch {
    data: Box<[u8]>,
    lens: [usize; BATCH],
    sources: Box<[libc::sockaddr_storage]>,
    source_lens: [libc::socklen_t; BATCH],
    count: usize,
}

impl Default for RecvBatch {
    fn default() -> RecvBatch {
        RecvBatch {
            data: vec![0u8; BATCH * SLOT].into_boxed_slice(),
            lens: [0; BATCH],
            // SAFETY: an all-zero sockaddr_storage is a valid (unspecified) address.
            sources: (0..BATCH).map(|_| unsafe { zeroed::<libc::sockaddr_storage>() }).collect(),
            source_lens: [0; BATCH],
            count: 0,
        }
    }
}

impl RecvBatch {
    /// The datagrams of the last read.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn datagram(&self, index: usize) -> &[u8] {
        &self.data[index * SLOT..index * SLOT + self.lens[index]]
    }

    pub fn source(&self, index: usize) -> Option<SocketAddr> {
        // SAFETY: the kernel wrote a socket address of `source_lens[index]` bytes there.
        unsafe { SockAddr::new(self.sources[index], self.source_lens[index]) }.as_socket()
    }

    /// Reads what is waiting on `fd`, up to `BATCH` datagrams: how many, or `WouldBlock` when none.
    #[cfg(target_os = "linux")]
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.count = 0;
        // SAFETY: plain C structs, all zero is their empty value.
        let mut iovecs: [libc::iovec; BATCH] = unsafe { zeroed() };
        let mut headers: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        let data = self.data.as_mut_ptr();
        for (index, (iovec, header)) in iovecs.iter_mut().zip(headers.iter_mut()).enumerate() {
            // SAFETY: slot `index` lies inside `data`.
            iovec.iov_base = unsafe { data.add(index * SLOT) }.cast();
            iovec.iov_len = SLOT;
            header.msg_hdr.msg_name = (&mut self.sources[index] as *mut libc::sockaddr_storage).cast();
            header.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            header.msg_hdr.msg_iov = iovec;
            header.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at a slot and an address of this batch, which outlive the call.
        let read = unsafe { libc::recvmmsg(fd, headers.as_mut_ptr(), BATCH as libc::c_uint, libc::MSG_DONTWAIT as _, std::ptr::null_mut()) };
        if read < 0 {
            return Err(io::Error::last_os_error());
        }
        let read = read as usize;
        for (index, header) in headers.iter().take(read).enumerate() {
            self.lens[index] = header.msg_len as usize;
            self.source_lens[index] = header.msg_hdr.msg_namelen;
        }
        self.count = read;
        Ok(read)
    }

    #[cfg(not(target_os = "linux"))]
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.count = 0;
        let mut source_len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: slot 0 and address 0 of this batch outlive the call.
        let read = unsafe {
            libc::recvfrom(fd, self.data.as_mut_ptr().cast(), SLOT, libc::MSG_DONTWAIT, (&mut self.sources[0] as *mut libc::sockaddr_storage).cast(), &mut source_len)
        };
        if read < 0 {
            return Err(io::Error::last_os_error());
        }
        self.lens[0] = read as usize;
        self.source_lens[0] = source_len;
        self.count = 1;
        Ok(1)
    }
}

/// One call sending datagrams `range` of `batch` (at most `BATCH` of them) on `fd`: to `to`, or to
/// the socket's peer when it is connected and `to` is None. How many went out.
#[cfg(target_os = "linux")]
fn send_once(fd: RawFd, to: Option<&SockAddr>, batch: &RecvBatch, range: Range<usize>) -> io::Result<usize> {
    let count = range.len().min(BATCH);
    // SAFETY: plain C structs, all zero is their empty value.
    let mut iovecs: [libc::iovec; BATCH] = unsafe { zeroed() };
    let mut headers: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
    for (offset, (iovec, header)) in iovecs.iter_mut().zip(headers.iter_mut()).take(count).enumerate() {
        let datagram = batch.datagram(range.start + offset);
        // sendmmsg only reads through the pointer.
        iovec.iov_base = datagram.as_ptr() as *mut libc::c_void;
        iovec.iov_len = datagram.len();
        if let Some(to) = to {
            header.msg_hdr.msg_name = to.as_ptr() as *mut libc::c_void;
            header.msg_hdr.msg_namelen = to.len();
        }
        header.msg_hdr.msg_iov = iovec;
        header.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: the headers point at datagrams of `batch` and at `to`, which outlive the call.
    let sent = unsafe { libc::sendmmsg(fd, headers.as_mut_ptr(), count as libc::c_uint, libc::MSG_DONTWAIT as _) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sent as usize)
}

#[cfg(not(target_os = "linux"))]
fn send_once(fd: RawFd, to: Option<&SockAddr>, batch: &RecvBatch, range: Range<usize>) -> io::Result<usize> {
    let datagram = batch.datagram(range.start);
    let (name, name_len) = match to {
        Some(to) => (to.as_ptr(), to.len()),
        None => (std::ptr::null(), 0),
    };
    // SAFETY: the datagram and the address outlive the call.
    let sent = unsafe { libc::sendto(fd, datagram.as_ptr().cast(), datagram.len(), libc::MSG_DONTWAIT, name, name_len) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(1)
}

/// What `send_run` did with a run of datagrams.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RunSent {
    pub datagrams: usize,
    pub bytes: usize,
    /// Refused one by one (too large for the path, for instance).
    pub dropped: usize,
    /// The first datagram not sent because the socket's send buffer is full; those from it on are
    /// the caller's to wait for or drop.
    pub blocked_at: Option<usize>,
}

/// Sends datagrams `range` of `batch` on `fd` in as few calls as the kernel takes them. On a
/// connected socket an ICMP error left by an earlier datagram fails one call without sending:
/// that call is made once more.
pub fn send_run(fd: RawFd, to: Option<&SockAddr>, batch: &RecvBatch, range: Range<usize>) -> RunSent {
    let mut outcome = RunSent::default();
    let mut next = range.start;
    let mut retried_refusal = false;
    while next < range.end {
        match send_once(fd, to, batch, next..range.end) {
            Ok(sent) => {
                outcome.datagrams += sent;
                outcome.bytes += (next..next + sent).map(|index| batch.lens[index]).sum::<usize>();
                next += sent;
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                outcome.blocked_at = Some(next);
                break;
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) if err.kind() == io::ErrorKind::ConnectionRefused && !retried_refusal => retried_refusal = true,
            Err(_) => {
                outcome.dropped += 1;
                next += 1;
            }
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_batch_reads_what_waits_and_sends_it_on_in_order() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sizes = [1usize, 64, 1500, 9000, 65_507];
        for (index, size) in sizes.iter().enumerate() {
            sender.send_to(&vec![index as u8; *size], receiver.local_addr().unwrap()).unwrap();
        }
        let mut batch = RecvBatch::default();
        let read = batch.recv(receiver.as_raw_fd()).unwrap();
        assert_eq!(read, if cfg!(target_os = "linux") { sizes.len() } else { 1 });
        for index in 0..read {
            assert_eq!(batch.datagram(index), &vec![index as u8; sizes[index]][..]);
            assert_eq!(batch.source(index), Some(sender.local_addr().unwrap()));
        }
        let to = SockAddr::from(sink.local_addr().unwrap());
        let sent = send_run(receiver.as_raw_fd(), Some(&to), &batch, 0..read);
        assert_eq!(sent, RunSent { datagrams: read, bytes: sizes[..read].iter().sum(), dropped: 0, blocked_at: None });
        let mut buf = vec![0u8; 65_535];
        for index in 0..read {
            let (len, from) = sink.recv_from(&mut buf).unwrap();
            assert_eq!(from, receiver.local_addr().unwrap());
            assert_eq!(&buf[..len], &vec![index as u8; sizes[index]][..]);
        }
    }

    #[test]
    fn an_empty_socket_would_block() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut batch = RecvBatch::default();
        let err = batch.recv(receiver.as_raw_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(batch.len(), 0);
    }

    #[test]
    fn a_connected_socket_sends_without_an_address() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        let upstream = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        upstream.connect(sink.local_addr().unwrap()).unwrap();
        for index in 0..3u8 {
            sender.send_to(&[index; 10], receiver.local_addr().unwrap()).unwrap();
        }
        let mut batch = RecvBatch::default();
        // One call on Linux; one datagram per call elsewhere.
        let mut read = 0;
        while read < 3 {
            let count = batch.recv(receiver.as_raw_fd()).unwrap();
            let sent = send_run(upstream.as_raw_fd(), None, &batch, 0..count);
            assert_eq!(sent.datagrams, count);
            read += count;
        }
        let mut buf = [0u8; 16];
        for index in 0..3u8 {
            let (len, from) = sink.recv_from(&mut buf).unwrap();
            assert_eq!(from, upstream.local_addr().unwrap());
            assert_eq!(&buf[..len], &[index; 10]);
        }
    }
}
