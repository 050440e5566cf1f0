//! The response body the mock sends: a queue of pieces written one frame each, with an optional
//! delay between them, and an ending: finish cleanly, abort the connection, or hang.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

/// How long an aborting body waits, pending, so that what it sent is flushed first.
const ABORT_FLUSH_PAUSE: Duration = Duration::from_millis(20);

/// How the body ends once its pieces are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    /// End the body normally.
    Finish,
    /// Fail the body: hyper closes the connection mid-message.
    Abort,
    /// Never end: the connection stays open with nothing more sent.
    Stall,
}

/// A response body made of pieces.
pub struct MockBody {
    pieces: VecDeque<Bytes>,
    delay: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    sent_any: bool,
    /// For [`BodyEnd::Abort`]: the pause that lets hyper flush the pieces has passed.
    flushed: bool,
    end: BodyEnd,
    /// Known total length: sent with `content-length` instead of chunked encoding.
    exact_len: Option<u64>,
}

impl MockBody {
    /// A complete body of known length.
    pub fn full(bytes: Bytes) -> Self {
        let len = bytes.len() as u64;
        let mut pieces = VecDeque::with_capacity(1);
        if !bytes.is_empty() {
            pieces.push_back(bytes);
        }
        MockBody {
            pieces,
            delay: Duration::ZERO,
            sleep: None,
            sent_any: false,
            flushed: false,
            end: BodyEnd::Finish,
            exact_len: Some(len),
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        Self::full(Bytes::new())
    }

    /// A chunked body: each piece one frame, `delay` between frames, then `end`.
    pub fn pieces(pieces: impl IntoIterator<Item = Bytes>, delay: Duration, end: BodyEnd) -> Self {
        MockBody {
            pieces: pieces.into_iter().collect(),
            delay,
            sleep: None,
            sent_any: false,
            flushed: false,
            end,
            exact_len: None,
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if !this.pieces.is_empty() {
            if this.sent_any && !this.delay.is_zero() {
                let delay = this.delay;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.sleep = None;
            }
            this.sent_any = true;
            let piece = this.pieces.pop_front().expect("checked non-empty");
            return Poll::Ready(Some(Ok(Frame::data(piece))));
        }
        match this.end {
            BodyEnd::Finish => Poll::Ready(None),
            BodyEnd::Abort if !this.flushed => {
                // hyper discards unflushed output when a body fails; it flushes whenever the body
                // is pending, so pause briefly to get the pieces onto the wire before breaking.
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(ABORT_FLUSH_PAUSE)));
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.sleep = None;
                this.flushed = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            BodyEnd::Abort => Poll::Ready(Some(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "mock: connection dropped by script",
            )))),
            // Deliberately never woken: the script says hang.
            BodyEnd::Stall => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pieces.is_empty() && self.end == BodyEnd::Finish
    }

    fn size_hint(&self) -> SizeHint {
        match self.exact_len {
            Some(len) => SizeHint::with_exact(len),
            None => SizeHint::default(),
        }
    }
}
