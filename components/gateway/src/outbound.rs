//! Sending one upstream request through wasi:http with the deployment's timeouts. spin-sdk's
//! `send` takes no request options, so this is the small part of it we need, with options; and a
//! deadline for any future, on wasi's monotonic clock.

use freerelay::adapter::UpstreamRequest;
use freerelay::config::Timeouts;
use freerelay::upstream::Transport;
use spin_executor::CancelOnDropToken;
use spin_sdk::http::{
    ErrorCode, Fields, IncomingResponse, Method, OutgoingBody, OutgoingRequest, Scheme,
};
use spin_sdk::wit::wasi::http0_2_0::outgoing_handler;
use spin_sdk::wit::wasi::http0_2_0::types::RequestOptions;
use std::future::Future;
use std::task::Context;
use std::task::Poll;
use wasi::clocks::monotonic_clock;
use wasi::io::poll::Pollable;
use wasi::io::streams::{OutputStream, StreamError};

const MS: u64 = 1_000_000;

/// Registers `pollable` with the executor; dropping the token unregisters (and drops) it.
pub fn wait_on(pollable: Pollable, cx: &mut Context<'_>) -> CancelOnDropToken {
    spin_executor::push_waker_and_get_token(pollable, cx.waker().clone()).into()
}

/// Runs `fut` for at most `ms` milliseconds; `None` when the deadline passed first (`fut` is
/// then dropped, which must leave no registered pollable behind: see [`wait_on`]).
pub async fn within<T>(ms: u64, fut: impl Future<Output = T>) -> Option<T> {
    let deadline = monotonic_clock::now().saturating_add(ms.saturating_mul(MS));
    // The clock decides, not `pollable.ready()`: a deadline pollable is only a wake-up call.
    let mut waiting: Option<CancelOnDropToken> = None;
    let timer = futures::future::poll_fn(move |cx| {
        if monotonic_clock::now() >= deadline {
            waiting.take();
            Poll::Ready(())
        } else {
            waiting = Some(wait_on(monotonic_clock::subscribe_instant(deadline), cx));
            Poll::Pending
        }
    });
    futures::pin_mut!(fut);
    futures::pin_mut!(timer);
    match futures::future::select(fut, timer).await {
        futures::future::Either::Left((value, _)) => Some(value),
        futures::future::Either::Right(_) => None,
    }
}

/// Waits `ms` milliseconds (a back-off, or a short Retry-After waited out).
pub async fn sleep(ms: u64) {
    within(ms, futures::future::pending::<()>()).await;
}

/// Sends a POST built by an adapter and waits for the response head;
/// `in_flight` runs once the request has been handed to the host, before its answer is awaited:
/// bookkeeping that need not precede the request overlaps the upstream's work instead.
pub async fn post(
    up: UpstreamRequest,
    timeouts: Timeouts,
    in_flight: impl FnOnce(),
) -> Result<IncomingResponse, Transport> {
    let UpstreamRequest { url, headers, body } = up;
    let parsed = url::Url::parse(&url).map_err(|e| Transport::Other(format!("bad URL: {e}")))?;
    let authority = match (parsed.host_str(), parsed.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        (None, _) => return Err(Transport::Other("URL has no host".into())),
    };
    let path = match parsed.query() {
        Some(q) => format!("{}?{q}", parsed.path()),
        None => parsed.path().to_owned(),
    };
    let list: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
        .chain([(
            "content-length".to_owned(),
            body.len().to_string().into_bytes(),
        )])
        .collect();
    let fields = Fields::from_list(&list).map_err(|e| Transport::Other(format!("{e:?}")))?;
    let request = OutgoingRequest::new(fields);
    let scheme = if parsed.scheme() == "https" {
        Scheme::Https
    } else {
        Scheme::Http
    };
    let set_ok = request.set_method(&Method::Post).is_ok()
        && request.set_scheme(Some(&scheme)).is_ok()
        && request.set_authority(Some(&authority)).is_ok()
        && request.set_path_with_query(Some(&path)).is_ok();
    if !set_ok {
        return Err(Transport::Other(format!("cannot address {url}")));
    }
    let options = RequestOptions::new();
    // A host that does not support an option keeps its own default; that is not an error.
    let _ = options.set_connect_timeout(Some(timeouts.connect_ms * MS));
    let _ = options.set_first_byte_timeout(Some(timeouts.first_byte_ms * MS));
    let _ = options.set_between_bytes_timeout(Some(timeouts.between_bytes_ms * MS));

    // The body is written and finished before the request is handed to the host whenever the
    // host's buffer takes it, so head and body leave in one write: Spin's outbound connections
    // leave Nagle's algorithm on, and a body sent after its head waits for the delayed ACK.
    let out = request
        .body()
        .map_err(|_| Transport::Other("request body already taken".into()))?;
    let stream = out
        .write()
        .map_err(|_| Transport::Other("request body not writable".into()))?;
    let fits = matches!(stream.check_write(), Ok(n) if n as usize >= body.len());
    let mut write = Ok(());
    if fits && !body.is_empty() {
        write = stream.write(&body);
    }
    let future = outgoing_handler::handle(request, Some(options)).map_err(|e| transport(&e))?;
    if !fits {
        write = write_all(&stream, &body).await;
    }
    drop(stream);
    let _ = OutgoingBody::finish(out, None);
    in_flight();
    // Declared after `future`, so dropped before it: a pollable must never outlive its parent
    // resource (the host traps), which would happen if this attempt is abandoned at a deadline.
    let mut waiting: Option<CancelOnDropToken> = None;
    let response = futures::future::poll_fn(|cx| match future.get() {
        Some(Ok(r)) => Poll::Ready(r),
        Some(Err(())) => Poll::Ready(Err(ErrorCode::InternalError(Some(
            "response taken twice".into(),
        )))),
        None => {
            waiting = Some(wait_on(future.subscribe(), cx));
            Poll::Pending
        }
    })
    .await
    .map_err(|e| transport(&e))?;
    // A failed body write shows up as an error response above; if the upstream still answered,
    // its answer is what counts.
    let _ = write;
    Ok(response)
}

/// Writes all of `bytes`, waiting for room as the host drains the stream.
pub async fn write_all(stream: &OutputStream, mut bytes: &[u8]) -> Result<(), StreamError> {
    while !bytes.is_empty() {
        let room = stream.check_write()? as usize;
        if room == 0 {
            // The registration is dropped with this future, before the caller drops `stream`
            // (a pollable outliving its stream makes the host trap).
            let mut waiting = None;
            futures::future::poll_fn(|cx| match stream.check_write() {
                Ok(0) => {
                    waiting = Some(wait_on(stream.subscribe(), cx));
                    Poll::Pending
                }
                _ => Poll::Ready(()),
            })
            .await;
            drop(waiting);
            continue;
        }
        let n = room.min(bytes.len());
        stream.write(&bytes[..n])?;
        bytes = &bytes[n..];
    }
    Ok(())
}

/// Classifies a wasi:http error code.
pub fn transport(e: &ErrorCode) -> Transport {
    match e {
        ErrorCode::ConnectionTimeout
        | ErrorCode::ConnectionReadTimeout
        | ErrorCode::ConnectionWriteTimeout
        | ErrorCode::DnsTimeout => Transport::Timeout,
        ErrorCode::ConnectionRefused
        | ErrorCode::ConnectionTerminated
        | ErrorCode::ConnectionLimitReached
        | ErrorCode::DestinationNotFound
        | ErrorCode::DestinationUnavailable
        | ErrorCode::DestinationIpUnroutable
        | ErrorCode::DestinationIpProhibited
        | ErrorCode::DnsError(_) => Transport::Unreachable,
        ErrorCode::HttpRequestDenied => Transport::Denied,
        other => Transport::Other(format!("{other:?}")),
    }
}
