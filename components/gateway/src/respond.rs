//! Writing responses so that real Spin sends each whole in one write: Spin's server leaves
//! Nagle's algorithm on, and a response whose head leaves before its body waits for the
//! client's delayed ACK (~40 ms). The body is written and finished *before* the response is
//! handed to the host, with a `content-length`, so hyper finds head, body and end together.

use freerelay::error::ApiError;
use freerelay::route::Candidate;
use spin_sdk::http::{Fields, OutgoingBody, OutgoingResponse, ResponseOutparam};

/// A complete response, status to body.
pub struct Reply {
    pub status: u16,
    /// The error code, for the log.
    pub code: Option<&'static str>,
    body: Vec<u8>,
    headers: Vec<(&'static str, String)>,
}

impl Reply {
    pub fn json(status: u16, body: Vec<u8>) -> Self {
        Self {
            status,
            code: None,
            body,
            headers: vec![("content-type", "application/json".into())],
        }
    }

    /// A whole SSE stream (a cached answer replayed), sent as one body.
    pub fn sse(body: Vec<u8>) -> Self {
        Self {
            status: 200,
            code: None,
            body,
            headers: vec![
                ("content-type", "text/event-stream".into()),
                ("cache-control", "no-cache".into()),
            ],
        }
    }

    pub fn error(e: &ApiError) -> Self {
        let mut r = Self::json(e.status, e.body());
        r.code = e.code;
        if let Some(s) = e.retry_after {
            r.headers.push(("retry-after", s.to_string()));
        }
        r
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &'static str, value: String) -> Self {
        self.headers.push((name, value));
        self
    }

    /// Adds who answered, after how many attempts, and what it cost (USD; absent when the
    /// price is unknown).
    pub fn answered_by(mut self, c: &Candidate, attempts: u32, micro_usd: Option<u64>) -> Self {
        self.headers.extend(provenance(c, attempts));
        if let Some(micro) = micro_usd {
            // Exactly the micro-dollars added to the budgets: headers sum to recorded spend.
            self.headers
                .push(("x-freerelay-cost-usd", freerelay::budget::format_usd(micro)));
        }
        self
    }

    /// Sends it. A response that cannot be built (a header value the host refuses) becomes a
    /// bare 500; the error says why, for the log.
    pub async fn send(self, out: ResponseOutparam, request_id: &str) -> Result<(), String> {
        let len = self.body.len().to_string();
        let list = self.headers.iter().map(|(k, v)| (*k, v.as_str())).chain([
            ("content-length", len.as_str()),
            ("x-request-id", request_id),
        ]);
        match build(self.status, list) {
            Ok(response) => write_whole(out, response, &self.body).await,
            Err(detail) => {
                let fallback = ApiError::internal("The response could not be built.").body();
                let len = fallback.len().to_string();
                let plain = [
                    ("content-type", "application/json"),
                    ("content-length", len.as_str()),
                ];
                match build(500, plain.into_iter()) {
                    Ok(r) => write_whole(out, r, &fallback).await?,
                    Err(e) => return Err(format!("{detail}; then {e}")),
                }
                Err(detail)
            }
        }
    }
}

/// The head of a streamed answer (SSE), its body to be written as events arrive.
pub fn stream_head(
    request_id: &str,
    c: &Candidate,
    attempts: u32,
    extra: &[(&'static str, String)],
) -> Result<OutgoingResponse, String> {
    let headers = [
        ("content-type", "text/event-stream"),
        ("cache-control", "no-cache"),
        ("x-accel-buffering", "no"),
        ("x-request-id", request_id),
    ];
    let owned: Vec<(&str, String)> = provenance(c, attempts)
        .chain(extra.iter().cloned())
        .collect();
    build(
        200,
        headers
            .into_iter()
            .chain(owned.iter().map(|(k, v)| (*k, v.as_str()))),
    )
}

fn provenance(c: &Candidate, attempts: u32) -> impl Iterator<Item = (&'static str, String)> + '_ {
    [
        ("x-freerelay-provider", c.provider.clone()),
        ("x-freerelay-model", c.model.clone()),
        ("x-freerelay-attempts", attempts.to_string()),
    ]
    .into_iter()
}

fn build<'k, 'v>(
    status: u16,
    headers: impl Iterator<Item = (&'k str, &'v str)>,
) -> Result<OutgoingResponse, String> {
    let list: Vec<(String, Vec<u8>)> = headers
        .map(|(k, v)| (k.to_owned(), v.as_bytes().to_vec()))
        .collect();
    let fields = Fields::from_list(&list).map_err(|e| {
        let names: Vec<&str> = list.iter().map(|(k, _)| k.as_str()).collect();
        format!("response headers refused ({e:?}); names: {names:?}")
    })?;
    let response = OutgoingResponse::new(fields);
    response
        .set_status_code(status)
        .map_err(|_| format!("status {status} refused"))?;
    Ok(response)
}

/// Writes and finishes the body, then hands the response over: in one piece when the host's
/// body buffer takes it all (the normal case), else head first and the rest as it drains.
async fn write_whole(
    out: ResponseOutparam,
    response: OutgoingResponse,
    bytes: &[u8],
) -> Result<(), String> {
    let body = response
        .body()
        .map_err(|_| "response body already taken".to_owned())?;
    let stream = body
        .write()
        .map_err(|_| "response body not writable".to_owned())?;
    let fits = matches!(stream.check_write(), Ok(n) if n as usize >= bytes.len());
    let result = if fits {
        let r = if bytes.is_empty() {
            Ok(())
        } else {
            stream.write(bytes)
        };
        drop(stream);
        let finished = OutgoingBody::finish(body, None);
        out.set(response);
        r.map_err(|e| format!("{e:?}"))
            .and(finished.map_err(|e| format!("{e:?}")))
    } else {
        out.set(response);
        let r = crate::outbound::write_all(&stream, bytes).await;
        drop(stream);
        let finished = OutgoingBody::finish(body, None);
        r.map_err(|e| format!("{e:?}"))
            .and(finished.map_err(|e| format!("{e:?}")))
    };
    result.map_err(|e| format!("writing the response failed: {e}"))
}
