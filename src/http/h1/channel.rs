//! The hand-over of a request body from the connection that reads it to whoever sends it on: one
//! frame at a time, and only on demand. The connection reads the client's socket for the body
//! only when the receiver asks for a frame, so a body nobody wants stays in the client's socket
//! (backpressure), and the first ask is what lets `Expect: 100-continue` be answered.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};
use parking_lot::Mutex;

use crate::http::body::BoxError;

struct Shared {
    slot: Option<Result<Frame<Bytes>, BoxError>>,
    /// The receiver polled and found nothing: it wants the next frame.
    wanted: bool,
    /// The sender finished the body (or gave up on it).
    sender_done: bool,
    receiver_gone: bool,
    receiver_waker: Option<Waker>,
    sender_waker: Option<Waker>,
}

/// The connection's end.
pub struct BodySender {
    shared: Arc<Mutex<Shared>>,
}

/// The request's body as the proxy pipeline reads it.
pub struct RequestBody {
    shared: Arc<Mutex<Shared>>,
    size_hint: SizeHint,
    ended: bool,
}

pub fn body_channel(size_hint: SizeHint) -> (BodySender, RequestBody) {
    let shared = Arc::new(Mutex::new(Shared {
        slot: None,
        wanted: false,
        sender_done: false,
        receiver_gone: false,
        receiver_waker: None,
        sender_waker: None,
    }));
    (BodySender { shared: shared.clone() }, RequestBody { shared, size_hint, ended: false })
}

/// The receiver was dropped: nobody will read the rest of the body.
#[derive(Debug)]
pub struct ReceiverGone;

impl BodySender {
    /// Ready when the receiver wants a frame and the slot is free.
    pub fn poll_wanted(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ReceiverGone>> {
        let mut shared = self.shared.lock();
        if shared.receiver_gone {
            return Poll::Ready(Err(ReceiverGone));
        }
        if shared.wanted && shared.slot.is_none() {
            return Poll::Ready(Ok(()));
        }
        if !shared.sender_waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            shared.sender_waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// A data frame; `last` when the body ends with it.
    pub fn send_data(&mut self, data: Bytes, last: bool) {
        self.put(Ok(Frame::data(data)), last);
    }

    /// The receiver was dropped.
    pub fn receiver_gone(&self) -> bool {
        self.shared.lock().receiver_gone
    }

    /// The last frame: the body is complete (with the chunked trailers, if any).
    pub fn finish(&mut self, trailers: Option<HeaderMap>) {
        match trailers {
            Some(trailers) => self.put(Ok(Frame::trailers(trailers)), true),
            None => self.close(),
        }
    }

    /// The body cannot be read to its end: the receiver sees this error.
    pub fn fail(&mut self, error: BoxError) {
        self.put(Err(error), true);
    }

    fn put(&mut self, frame: Result<Frame<Bytes>, BoxError>, last: bool) {
        let waker = {
            let mut shared = self.shared.lock();
            shared.slot = Some(frame);
            shared.wanted = false;
            shared.sender_done |= last;
            shared.receiver_waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn close(&mut self) {
        let waker = {
            let mut shared = self.shared.lock();
            shared.sender_done = true;
            shared.receiver_waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl Drop for BodySender {
    fn drop(&mut self) {
        let unfinished = !self.shared.lock().sender_done;
        if unfinished {
            // The connection went away in the middle of the body.
            self.fail("the client connection ended before the request body".into());
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let (polled, waker) = {
            let mut shared = self.shared.lock();
            if let Some(frame) = shared.slot.take() {
                let ended = shared.sender_done;
                drop(shared);
                self.ended = ended;
                return Poll::Ready(Some(frame));
            }
            if shared.sender_done {
                (Poll::Ready(None), None)
            } else {
                shared.wanted = true;
                if !shared.receiver_waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    shared.receiver_waker = Some(cx.waker().clone());
                }
                (Poll::Pending, shared.sender_waker.take())
            }
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        if polled.is_ready() {
            self.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.size_hint.upper() == Some(0)
    }

    fn size_hint(&self) -> SizeHint {
        self.size_hint
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        let waker = {
            let mut shared = self.shared.lock();
            shared.receiver_gone = true;
            shared.sender_waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn frames_flow_only_on_demand() {
        let (mut sender, mut body) = body_channel(SizeHint::with_exact(10));
        let waker = futures_noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(sender.poll_wanted(&mut cx).is_pending(), "nobody asked yet");
        let reading = tokio::spawn(async move { body.frame().await.map(|f| f.ok().and_then(|f| f.into_data().ok())) });
        let wanted = std::future::poll_fn(|cx| sender.poll_wanted(cx)).await;
        assert!(wanted.is_ok());
        sender.send_data(Bytes::from_static(b"0123456789"), false);
        assert_eq!(reading.await.unwrap(), Some(Some(Bytes::from_static(b"0123456789"))));
        // The receiver is gone now.
        assert!(std::future::poll_fn(|cx| sender.poll_wanted(cx)).await.is_err());
    }

    #[tokio::test]
    async fn a_finished_body_ends_and_a_dropped_sender_fails_it() {
        let (mut sender, body) = body_channel(SizeHint::default());
        let reading = tokio::spawn(async move { body.collect().await.map(|c| c.to_bytes()) });
        std::future::poll_fn(|cx| sender.poll_wanted(cx)).await.unwrap();
        sender.send_data(Bytes::from_static(b"ab"), false);
        std::future::poll_fn(|cx| sender.poll_wanted(cx)).await.unwrap();
        sender.finish(None);
        assert_eq!(reading.await.unwrap().unwrap(), Bytes::from_static(b"ab"));

        let (mut sender, body) = body_channel(SizeHint::default());
        let reading = tokio::spawn(async move { body.collect().await.map(|c| c.to_bytes()) });
        std::future::poll_fn(|cx| sender.poll_wanted(cx)).await.unwrap();
        drop(sender);
        assert!(reading.await.unwrap().is_err());
    }

    fn futures_noop_waker() -> Waker {
        Waker::noop().clone()
    }
}
