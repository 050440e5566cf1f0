//! Upstream adapters, one per wire format: each builds the upstream request, translates a JSON
//! answer and a stream (incrementally, into OpenAI chunks), and reads an error body. The
//! component only moves the bytes these produce; the catalogue says which adapter a provider
//! uses.

pub mod anthropic;
pub mod gemini;
pub mod openai;

use crate::catalog::{Auth, ModelInfo, Price, Provider, Wire};
use crate::error::ApiError;
use crate::upstream::{Failure, Hints};
use crate::wire::openai::{ChatRequest, Usage};
use serde_json::{json, Value};

/// Where one attempt goes: the provider, its resolved API base, the upstream model id and what
/// the catalogue knows of that model. Secret-free.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub provider: &'static Provider,
    /// Origin + API path, without trailing slash (e.g. `https://api.anthropic.com/v1`).
    pub base_url: &'a str,
    pub model: &'a str,
    pub info: ModelInfo,
}

/// An upstream request, ready to send. Built without secrets; [`authorize`] adds them last,
/// right before sending, so a request logged or returned by mistake carries no key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamRequest {
    pub url: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

/// The headers every upstream request carries (a wire format adds its own).
pub fn base_headers(stream: bool) -> Vec<(&'static str, String)> {
    vec![
        ("content-type", "application/json".into()),
        (
            "accept",
            if stream {
                "text/event-stream"
            } else {
                "application/json"
            }
            .into(),
        ),
        (
            "user-agent",
            concat!("freerelay/", env!("CARGO_PKG_VERSION")).into(),
        ),
    ]
}

/// Adds the key as the provider expects it; an empty key (a keyless local endpoint) adds none.
pub fn authorize(request: &mut UpstreamRequest, auth: Auth, api_key: &str) {
    if api_key.is_empty() {
        return;
    }
    let header = match auth {
        Auth::Bearer => ("authorization", format!("Bearer {api_key}")),
        Auth::XApiKey => ("x-api-key", api_key.to_owned()),
        Auth::XGoogApiKey => ("x-goog-api-key", api_key.to_owned()),
    };
    request.headers.push(header);
}

/// The identity of one answer as the client sees it. Translated answers get the gateway's id
/// and timestamp, as OpenAI's carry OpenAI's.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplyCtx {
    /// `chatcmpl-…`, used by translators (pass-through keeps the upstream's id).
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The model reported to the client (the upstream model id).
    pub model: String,
    /// The client asked for the final usage chunk (`stream_options.include_usage`).
    pub client_usage: bool,
    /// What the answer's tokens cost, per million (`None`: unknown). Free tiers: zero.
    pub price: Option<Price>,
    /// This stream continues an answer the client already has (a rescue after a broken
    /// stream): no second `role` chunk.
    pub continuation: bool,
    /// Keep the answer's text in [`StreamState::text`] (a broken stream may be continued from
    /// it on a model that accepts a prefill).
    pub collect_text: bool,
}

impl ReplyCtx {
    /// The cost of `usage` in USD, if the price is known.
    pub fn cost(&self, usage: Usage) -> Option<f64> {
        cost_usd(self.price, usage)
    }
}

/// USD for `usage` at `price` (per million tokens): the whole micro-dollars the budgets count
/// ([`crate::budget::micro_usd`]), so `usage.cost` and `x-freerelay-cost-usd` agree with them.
pub fn cost_usd(price: Option<Price>, usage: Usage) -> Option<f64> {
    crate::budget::micro_usd(price, usage.prompt_tokens, usage.completion_tokens)
        .map(|m| m as f64 / 1e6)
}

/// A complete, valid JSON answer in OpenAI's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub body: Vec<u8>,
    pub usage: Option<Usage>,
    /// The first choice's `finish_reason`, for the log.
    pub finish_reason: Option<String>,
}

/// What a stream translator has seen so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamState {
    /// Data events seen (the terminator excluded).
    pub events: u64,
    /// The upstream said the answer is complete (`[DONE]` for OpenAI, `message_stop` for
    /// Anthropic, the finishing chunk for Gemini), and the client has its terminator.
    pub done: bool,
    pub usage: Option<Usage>,
    /// The last non-null `finish_reason` (OpenAI's vocabulary).
    pub finish_reason: Option<String>,
    /// The upstream sent an error event (already relayed to the client as an OpenAI one).
    pub upstream_error: bool,
    /// The stream can no longer be translated (e.g. an event over the size limit).
    pub broken: Option<String>,
    /// The answer has begun: a delta with text, reasoning or a tool call was emitted (a role
    /// chunk alone is not a first token).
    pub content: bool,
    /// With [`ReplyCtx::collect_text`]: the answer's text so far, while it is only text (a tool
    /// call or anything else that a prefill cannot carry makes it `None`).
    pub text: Option<String>,
}

/// Notes one client delta: whether the answer has begun ([`StreamState::content`]) and its
/// text (see [`ReplyCtx::collect_text`]).
pub fn note_delta(state: &mut StreamState, delta: &Value) {
    if !state.content {
        let non_empty = |k: &str| match delta.get(k) {
            Some(Value::String(s)) => !s.is_empty(),
            Some(Value::Array(a)) => !a.is_empty(),
            _ => false,
        };
        state.content =
            non_empty("content") || non_empty("reasoning_content") || non_empty("tool_calls");
    }
    let Some(text) = state.text.as_mut() else {
        return;
    };
    if delta.get("tool_calls").is_some_and(|t| !t.is_null())
        || delta.get("function_call").is_some_and(|t| !t.is_null())
    {
        state.text = None;
    } else if let Some(c) = delta.get("content").and_then(Value::as_str) {
        text.push_str(c);
    }
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
    /// Called once, when the upstream body ended cleanly (`failure: None`) or broke (`Some`):
    /// may append last bytes (a format whose end is the end of the body finishes there) and
    /// judges the stream.
    fn end(&mut self, failure: Option<&str>, _out: &mut Vec<u8>) -> StreamEnd {
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
    /// The request for `target`, without credentials. `Err`: this format cannot carry what the
    /// client asked (another candidate may).
    fn request(&self, target: &Target<'_>, req: &ChatRequest) -> Result<UpstreamRequest, ApiError>;
    /// Translates a complete 2xx JSON body; `Err` says why it is not a usable answer.
    fn answer(&self, body: &[u8], ctx: &ReplyCtx) -> Result<Answer, String>;
    /// A translator for one streamed answer.
    fn stream(&self, ctx: ReplyCtx) -> Box<dyn StreamTranslator>;
    /// The human-readable message in an error body, if it has one.
    fn error_detail(&self, body: &[u8]) -> Option<String>;

    /// Judges a non-2xx answer: each format reads its own error body's codes (daily caps,
    /// context overflows, refused keys) before [`crate::upstream::judge_body`] decides.
    fn judge(
        &self,
        provider: &str,
        api_key: &str,
        status: u16,
        hints: Hints<'_>,
        body: &[u8],
        now_ms: u64,
    ) -> Failure;
}

/// The adapter for a wire format.
pub fn for_wire(wire: Wire) -> &'static dyn Adapter {
    match wire {
        Wire::OpenAi => &openai::OpenAi,
        Wire::Anthropic => &anthropic::Anthropic,
        Wire::Gemini => &gemini::Gemini,
    }
}

/// Building blocks every translator uses to speak OpenAI to the client.
pub mod out {
    use super::*;

    /// The stream's terminator.
    pub const DONE: &[u8] = b"data: [DONE]\n\n";

    /// Appends one `data:` event.
    pub fn event(value: &Value, out: &mut Vec<u8>) {
        out.extend_from_slice(b"data: ");
        // Serialising a Value into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, value);
        out.extend_from_slice(b"\n\n");
    }

    /// A `chat.completion.chunk` with one choice.
    pub fn chunk(ctx: &ReplyCtx, delta: Value, finish_reason: Option<&str>) -> Value {
        json!({
            "id": ctx.id,
            "object": "chat.completion.chunk",
            "created": ctx.created,
            "model": ctx.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        })
    }

    /// Appends one `chat.completion.chunk` event with one choice, written straight into `out`
    /// (no intermediate JSON tree for the envelope: this runs once per streamed token).
    pub fn chunk_event(
        ctx: &ReplyCtx,
        delta: &Value,
        finish_reason: Option<&str>,
        out: &mut Vec<u8>,
    ) {
        // Writing into a Vec cannot fail.
        out.extend_from_slice(b"data: {\"id\":");
        let _ = serde_json::to_writer(&mut *out, &ctx.id);
        out.extend_from_slice(b",\"object\":\"chat.completion.chunk\",\"created\":");
        out.extend_from_slice(ctx.created.to_string().as_bytes());
        out.extend_from_slice(b",\"model\":");
        let _ = serde_json::to_writer(&mut *out, &ctx.model);
        out.extend_from_slice(b",\"choices\":[{\"index\":0,\"delta\":");
        let _ = serde_json::to_writer(&mut *out, delta);
        out.extend_from_slice(b",\"finish_reason\":");
        let _ = serde_json::to_writer(&mut *out, &finish_reason);
        out.extend_from_slice(b"}]}\n\n");
    }

    /// OpenAI's `usage` object; details only when the upstream reported them. `cost` (USD,
    /// OpenRouter's field) when the price is known.
    pub fn usage(
        ctx: &ReplyCtx,
        prompt: u64,
        completion: u64,
        cached: Option<u64>,
        reasoning: Option<u64>,
    ) -> Value {
        let mut u = json!({
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        });
        if let Some(c) = cached {
            u["prompt_tokens_details"] = json!({ "cached_tokens": c });
        }
        if let Some(r) = reasoning {
            u["completion_tokens_details"] = json!({ "reasoning_tokens": r });
        }
        if let Some(cost) = ctx.cost(Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
        }) {
            u["cost"] = json!(cost);
        }
        u
    }

    /// The final usage chunk (`choices: []`), as OpenAI sends it when asked.
    pub fn usage_chunk(ctx: &ReplyCtx, usage: Value) -> Value {
        json!({
            "id": ctx.id,
            "object": "chat.completion.chunk",
            "created": ctx.created,
            "model": ctx.model,
            "choices": [],
            "usage": usage,
        })
    }

    /// An OpenAI-shaped error event for an error the upstream reported mid-stream.
    pub fn error_event(message: &str, kind: &str, code: Option<&str>, out: &mut Vec<u8>) {
        event(
            &json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
            out,
        );
    }
}
