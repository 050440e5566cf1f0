//! Upstream adapters, one per wire format: each builds the upstream request, translates a JSON
//! answer and a stream (incrementally, into OpenAI chunks), and reads an error body. The
//! component only moves the bytes these produce; the catalogue says which adapter a provider uses.

pub mod openai;

use crate::catalog::Wire;
use crate::config::Configured;
use crate::upstream::{self, Failure, Hints};
use crate::wire::openai::{ChatRequest, Usage};

/// An upstream request, ready to send. Built without secrets; [`Adapter::authorize`] adds them
/// last, right before sending, so a request logged or returned by mistake carries no key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamRequest {
    pub url: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

/// A complete, valid JSON answer in OpenAI's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub body: Vec<u8>,
    pub usage: Option<Usage>,
}

/// What a stream translator has seen so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamState {
    /// Data events seen (the terminator excluded).
    pub events: u64,
    /// The upstream said the answer is complete (`[DONE]` for OpenAI).
    pub done: bool,
    pub usage: Option<Usage>,
    /// The last non-null `finish_reason`.
    pub finish_reason: Option<String>,
    /// The upstream sent an error event (already relayed to the client).
    pub upstream_error: bool,
    /// The stream can no longer be translated (e.g. an event over the size limit).
    pub broken: Option<String>,
}

/// How a stream ended, judged when the upstream body ends or fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEnd {
    /// Everything arrived.
    Complete,
    /// The upstream reported an error in the stream; the client has that error event.
    UpstreamError,
    /// The answer is incomplete; the client must get an error event saying why.
    Interrupted(String),
}

/// Translates one upstream stream into client bytes, incrementally.
pub trait StreamTranslator {
    /// Feeds upstream bytes in arrival order; appends to `out` the bytes the client should get
    /// now. Only whole events are ever emitted, so a stream cut anywhere leaves the client at an
    /// event boundary, where an error event still parses.
    fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>);
    fn state(&self) -> &StreamState;
    /// The usage, the first time it is known (so it can be recorded at once).
    fn take_new_usage(&mut self) -> Option<Usage>;
    /// Called once, when the upstream body ended (`failure`: it broke, and why).
    fn end(&mut self, failure: Option<&str>) -> StreamEnd {
        let s = self.state();
        if let Some(why) = failure.or(s.broken.as_deref()) {
            return StreamEnd::Interrupted(why.to_owned());
        }
        if s.done {
            StreamEnd::Complete
        } else if s.upstream_error {
            StreamEnd::UpstreamError
        } else {
            StreamEnd::Interrupted("it ended before the answer was complete".into())
        }
    }
}

/// One wire format.
pub trait Adapter: Sync {
    /// The request for `model` at `target`, without credentials.
    fn request(&self, target: &Configured, model: &str, req: &ChatRequest) -> UpstreamRequest;
    /// Adds the credentials, last.
    fn authorize(&self, request: &mut UpstreamRequest, api_key: &str);
    /// Translates a complete 2xx JSON body; `Err` says why it is not a usable answer.
    fn answer(&self, body: &[u8]) -> Result<Answer, String>;
    /// A translator for one streamed answer; `client_usage`: the client asked for the usage
    /// chunk (it is always requested upstream, and dropped here when the client did not ask).
    fn stream(&self, client_usage: bool) -> Box<dyn StreamTranslator>;
    /// The human-readable message in an error body, if it has one.
    fn error_detail(&self, body: &[u8]) -> Option<String>;

    /// Judges a non-2xx answer.
    fn judge(
        &self,
        target: &Configured,
        status: u16,
        hints: Hints<'_>,
        body: &[u8],
        now_ms: u64,
    ) -> Failure {
        let detail = self.error_detail(body);
        upstream::judge_status(
            target.provider.id,
            &target.api_key,
            status,
            hints,
            detail.as_deref(),
            now_ms,
        )
    }
}

/// The adapter for a wire format.
pub fn for_wire(wire: Wire) -> &'static dyn Adapter {
    match wire {
        Wire::OpenAi => &openai::OpenAi,
    }
}
