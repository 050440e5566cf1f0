//! The response body the mock sends: a queue of pieces written one frame each, with an optional
//! delay between them, gates where it waits to be released, and an ending: finish cleanly, abort
//! the connection, or hang.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

/// Releases for paused bodies: `POST /_mock/release` adds permits, each gate passed takes one.
/// A release that comes before the body reaches its gate is kept, not lost.
#[derive(Debug, Clone)]
pub struct Gates {
    permits: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
}

impl Default for Gates {
    fn default() -> Self {
        Gates {
            permits: Arc::new(Semaphore::new(0)),
            waiting: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl Gates {
    /// Lets `n` gates open.
    pub fn release(&self, n: usize) {
        self.permits.add_permits(n);
    }

    /// Bodies waiting at a gate right now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Drops releases no gate has used yet.
    pub fn clear(&self) {
        self.permits
            .forget_permits(self.permits.available_permits());
    }
}

/// One step of a body.
#[derive(Debug, Clone)]
pub enum Piece {
    /// One data frame.
    Data(Bytes),
    /// Wait here (everything before it flushed) until released.
    Gate,
}

type Acquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

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
    pieces: VecDeque<Piece>,
    gates: Option<Gates>,
    /// The release being waited for at a gate.
    acquire: Option<Acquire>,
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
            pieces.push_back(Piece::Data(bytes));
        }
        MockBody {
            pieces,
            gates: None,
            acquire: None,
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
        Self::steps(pieces.into_iter().map(Piece::Data), None, delay, end)
    }

    /// A chunked body of data frames and gates (which wait on `gates`), `delay` between data
    /// frames, then `end`.
    pub fn steps(
        pieces: impl IntoIterator<Item = Piece>,
        gates: Option<Gates>,
        delay: Duration,
        end: BodyEnd,
    ) -> Self {
        MockBody {
            pieces: pieces.into_iter().collect(),
            gates,
            acquire: None,
            delay,
            sleep: None,
            sent_any: false,
            flushed: false,
            end,
            exact_len: None,
        }
    }

    /// Announces `len` bytes (`content-length`) whatever the pieces add up to: with fewer and an
    /// abort, the answer is visibly truncated.
    pub fn announcing(mut self, len: u64) -> Self {
        self.exact_len = Some(len);
        self
    }
}

impl Drop for MockBody {
    fn drop(&mut self) {
        if self.acquire.is_some() {
            if let Some(g) = &self.gates {
                g.waiting.fetch_sub(1, Ordering::SeqCst);
            }
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
        while let Some(Piece::Gate) = this.pieces.front() {
            let Some(gates) = &this.gates else {
                this.pieces.pop_front();
                continue;
            };
            let acquire = this.acquire.get_or_insert_with(|| {
                gates.waiting.fetch_add(1, Ordering::SeqCst);
                Box::pin(gates.permits.clone().acquire_owned())
            });
            let Poll::Ready(permit) = acquire.as_mut().poll(cx) else {
                return Poll::Pending;
            };
            if let Ok(permit) = permit {
                permit.forget();
            }
            this.acquire = None;
            gates.waiting.fetch_sub(1, Ordering::SeqCst);
            this.pieces.pop_front();
        }
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
            let Some(Piece::Data(piece)) = this.pieces.pop_front() else {
                unreachable!("gates are passed above");
            };
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
