//! Bounds on what a client makes h3 hold. h3 buffers every frame but DATA whole before it decodes
//! it, and reads its streams as fast as they come (so QUIC's flow control never pushes back): a
//! client declaring a HEADERS frame of a gigabyte, or an unknown frame type on its control stream,
//! would be buffered for as long as it keeps sending. This wraps the QUIC connection h3 reads:
//! on request streams it follows the frame headers as the bytes go by and refuses a frame other
//! than DATA longer than the header limit allows; on unidirectional streams (control, QPACK), whose
//! frames and instructions are small, it refuses a stream past a fixed total.

use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use h3::quic::{self, StreamErrorIncoming, StreamId, WriteBuf};

/// What a client's unidirectional stream may carry in its life: SETTINGS, GOAWAY, grease and
/// QPACK instructions (the dynamic table is off) are a few bytes each.
const UNI_STREAM_BUDGET: u64 = 64 * 1024;
/// Room beyond the header limit for a HEADERS frame's own encoding: a section over the limit but
/// within this is decoded and answered 431 by h3; one beyond it is refused as it arrives.
const FRAME_SLACK: u64 = 16 * 1024;
const DATA_FRAME: u64 = 0x0;

/// h3-quinn's connection, its streams' receiving sides guarded.
pub struct GuardedConnection {
    inner: h3_quinn::Connection,
    /// Opens this connection's own streams (h3 opens its control stream through it).
    opener: GuardedOpener,
}

impl GuardedConnection {
    pub fn new(inner: h3_quinn::Connection, max_header_size: usize) -> Self {
        // Twice the header limit, and some: QPACK makes a section shorter than its fields, never
        // much longer.
        let opener = GuardedOpener { inner: quic::Connection::<Bytes>::opener(&inner), max_frame: 2 * max_header_size as u64 + FRAME_SLACK };
        GuardedConnection { inner, opener }
    }
}

impl<B: Buf> quic::Connection<B> for GuardedConnection {
    type RecvStream = Guarded<h3_quinn::RecvStream>;
    type OpenStreams = GuardedOpener;

    fn poll_accept_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Self::RecvStream, quic::ConnectionErrorIncoming>> {
        quic::Connection::<B>::poll_accept_recv(&mut self.inner, cx).map_ok(|stream| Guarded::total(stream, UNI_STREAM_BUDGET))
    }

    fn poll_accept_bidi(&mut self, cx: &mut Context<'_>) -> Poll<Result<Self::BidiStream, quic::ConnectionErrorIncoming>> {
        let max_frame = self.opener.max_frame;
        quic::Connection::<B>::poll_accept_bidi(&mut self.inner, cx).map_ok(|stream| GuardedBidi { inner: stream, frames: FrameGuard::new(max_frame) })
    }

    fn opener(&self) -> Self::OpenStreams {
        self.opener.clone()
    }
}

/// Opens streams as h3-quinn does, their receiving sides guarded.
#[derive(Clone)]
pub struct GuardedOpener {
    inner: h3_quinn::OpenStreams,
    max_frame: u64,
}

impl<B: Buf> quic::OpenStreams<B> for GuardedOpener {
    type BidiStream = GuardedBidi<B>;
    type SendStream = h3_quinn::SendStream<B>;

    fn poll_open_bidi(&mut self, cx: &mut Context<'_>) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        let max_frame = self.max_frame;
        quic::OpenStreams::<B>::poll_open_bidi(&mut self.inner, cx).map_ok(|stream| GuardedBidi { inner: stream, frames: FrameGuard::new(max_frame) })
    }

    fn poll_open_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        quic::OpenStreams::<B>::poll_open_send(&mut self.inner, cx)
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        quic::OpenStreams::<B>::close(&mut self.inner, code, reason)
    }
}

/// The connection opens streams as its opener does.
impl<B: Buf> quic::OpenStreams<B> for GuardedConnection {
    type BidiStream = GuardedBidi<B>;
    type SendStream = h3_quinn::SendStream<B>;

    fn poll_open_bidi(&mut self, cx: &mut Context<'_>) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        self.opener.poll_open_bidi(cx)
    }

    fn poll_open_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        self.opener.poll_open_send(cx)
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        quic::OpenStreams::<B>::close(&mut self.opener, code, reason)
    }
}

/// A receiving side with its bound.
pub struct Guarded<S> {
    inner: S,
    limit: Limit,
}

enum Limit {
    Total { left: u64 },
    Frames(FrameGuard),
}

impl<S> Guarded<S> {
    fn total(inner: S, budget: u64) -> Self {
        Guarded { inner, limit: Limit::Total { left: budget } }
    }
}

/// A chunk on its way to h3, checked against the stream's bound: past it, the stream is stopped
/// (H3_EXCESSIVE_LOAD) and h3 gets an error instead.
fn checked<S: quic::RecvStream>(
    polled: Poll<Result<Option<Bytes>, StreamErrorIncoming>>,
    stream: &mut S,
    check: impl FnOnce(&[u8]) -> Result<(), &'static str>,
) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
    if let Poll::Ready(Ok(Some(chunk))) = &polled {
        if let Err(why) = check(chunk) {
            stream.stop_sending(h3::error::Code::H3_EXCESSIVE_LOAD.value());
            return Poll::Ready(Err(StreamErrorIncoming::Unknown(Box::new(std::io::Error::other(why)))));
        }
    }
    polled
}

impl<S: quic::RecvStream<Buf = Bytes>> quic::RecvStream for Guarded<S> {
    type Buf = Bytes;

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        let polled = self.inner.poll_data(cx);
        let limit = &mut self.limit;
        checked(polled, &mut self.inner, |chunk| match limit {
            Limit::Total { left } => match left.checked_sub(chunk.len() as u64) {
                Some(rest) => {
                    *left = rest;
                    Ok(())
                }
                None => Err("a control or QPACK stream carried more than it ever needs"),
            },
            Limit::Frames(frames) => frames.follow(chunk),
        })
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.inner.stop_sending(error_code)
    }

    fn recv_id(&self) -> StreamId {
        self.inner.recv_id()
    }
}

/// A request stream, its receiving side guarded frame by frame.
pub struct GuardedBidi<B: Buf> {
    inner: h3_quinn::BidiStream<B>,
    frames: FrameGuard,
}

impl<B: Buf> quic::RecvStream for GuardedBidi<B> {
    type Buf = Bytes;

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        let polled = self.inner.poll_data(cx);
        let frames = &mut self.frames;
        checked(polled, &mut self.inner, |chunk| frames.follow(chunk))
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.inner.stop_sending(error_code)
    }

    fn recv_id(&self) -> StreamId {
        self.inner.recv_id()
    }
}

impl<B: Buf> quic::SendStream<B> for GuardedBidi<B> {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.inner.poll_ready(cx)
    }

    fn send_data<T: Into<WriteBuf<B>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        self.inner.send_data(data)
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.inner.poll_finish(cx)
    }

    fn reset(&mut self, reset_code: u64) {
        self.inner.reset(reset_code)
    }

    fn send_id(&self) -> StreamId {
        self.inner.send_id()
    }
}

impl<B: Buf> quic::BidiStream<B> for GuardedBidi<B> {
    type SendStream = h3_quinn::SendStream<B>;
    type RecvStream = Guarded<h3_quinn::RecvStream>;

    fn split(self) -> (Self::SendStream, Self::RecvStream) {
        let (send, recv) = self.inner.split();
        (send, Guarded { inner: recv, limit: Limit::Frames(self.frames) })
    }
}

/// Follows HTTP/3 frame headers (a varint type, a varint length) across the chunks of a stream,
/// skipping payloads, and refuses a frame other than DATA longer than `max_frame`.
#[derive(Debug)]
struct FrameGuard {
    max_frame: u64,
    state: FrameState,
}

#[derive(Debug, Clone, Copy)]
enum FrameState {
    /// Reading a varint: `needed` bytes in all (0: not yet known), `value` so far, `read` of them.
    Type { value: u64, needed: u8, read: u8 },
    Length { frame_type: u64, value: u64, needed: u8, read: u8 },
    Payload { left: u64 },
}

impl FrameGuard {
    fn new(max_frame: u64) -> Self {
        FrameGuard { max_frame, state: FrameState::Type { value: 0, needed: 0, read: 0 } }
    }

    fn follow(&mut self, mut bytes: &[u8]) -> Result<(), &'static str> {
        while !bytes.is_empty() {
            match &mut self.state {
                FrameState::Payload { left } => {
                    let skipped = (*left).min(bytes.len() as u64);
                    *left -= skipped;
                    bytes = &bytes[skipped as usize..];
                    if *left == 0 {
                        self.state = FrameState::Type { value: 0, needed: 0, read: 0 };
                    }
                }
                FrameState::Type { value, needed, read } => {
                    if let Some(frame_type) = varint_step(value, needed, read, &mut bytes) {
                        self.state = FrameState::Length { frame_type, value: 0, needed: 0, read: 0 };
                    }
                }
                FrameState::Length { frame_type, value, needed, read } => {
                    let frame_type = *frame_type;
                    if let Some(length) = varint_step(value, needed, read, &mut bytes) {
                        if frame_type != DATA_FRAME && length > self.max_frame {
                            return Err("a frame longer than the header limit allows");
                        }
                        self.state = if length == 0 { FrameState::Type { value: 0, needed: 0, read: 0 } } else { FrameState::Payload { left: length } };
                    }
                }
            }
        }
        Ok(())
    }
}

/// Takes bytes of a varint from `bytes`; the value once all of it has come.
fn varint_step(value: &mut u64, needed: &mut u8, read: &mut u8, bytes: &mut &[u8]) -> Option<u64> {
    while let Some((&byte, rest)) = bytes.split_first() {
        *bytes = rest;
        if *needed == 0 {
            *needed = 1 << (byte >> 6);
            *value = u64::from(byte & 0x3f);
        } else {
            *value = *value << 8 | u64::from(byte);
        }
        *read += 1;
        if *read == *needed {
            return Some(*value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_followed_across_any_split() {
        // HEADERS of 3 bytes, DATA of 300 (a two-byte length), an unknown type (two-byte varint)
        // of 2, then HEADERS declaring 5000 (over the limit of 1000).
        let mut stream = vec![0x01, 0x03, 1, 2, 3, 0x00, 0x41, 0x2c];
        stream.extend(std::iter::repeat_n(7u8, 300));
        stream.extend([0x40, 0x21, 0x02, 9, 9]);
        let good = stream.len();
        stream.extend([0x01, 0x53, 0x88]);
        for cut in 0..stream.len() {
            let mut guard = FrameGuard::new(1000);
            let first = guard.follow(&stream[..cut]);
            let second = if first.is_ok() { guard.follow(&stream[cut..]) } else { first };
            assert_eq!(second, Err("a frame longer than the header limit allows"), "cut at {cut}");
            let mut fine = FrameGuard::new(1000);
            assert_eq!(fine.follow(&stream[..good.min(cut)]), Ok(()));
        }
        // DATA may be as long as it likes.
        let mut guard = FrameGuard::new(10);
        assert_eq!(guard.follow(&[0x00, 0x80, 0x10, 0x00, 0x00]), Ok(()));
    }
}
