//! The OpenAI-compatible wire format (OpenAI, Groq, OpenRouter, Mistral, NVIDIA, Cerebras,
//! Together, custom endpoints): requests and answers pass through, except what the catalogue's
//! quirks say a provider needs changed, and the guarantees every stream gets (a first chunk
//! with `role`, a `finish_reason`, the usage chunk when asked for, `[DONE]`).

use super::{
    out, Adapter, Answer, ReplyCtx, StreamEnd, StreamState, StreamTranslator, Target,
    UpstreamRequest,
};
use crate::catalog::{MaxTokensField, Quirks};
use crate::cooldown;
use crate::error::ApiError;
use crate::upstream::{self, BodyHints, Cause, Failure, Hints};
use crate::wire::openai::{error_message, ChatRequest, Usage};
use crate::wire::sse::SseFramer;
use serde_json::{json, Map, Value};

/// The OpenAI-compatible adapter.
pub struct OpenAi;

impl Adapter for OpenAi {
    fn request(&self, target: &Target<'_>, req: &ChatRequest) -> Result<UpstreamRequest, ApiError> {
        let mut body = req.body().clone();
        body.insert("model".into(), Value::String(target.model.to_owned()));
        apply_quirks(&mut body, &target.provider.quirks, req.stream);
        Ok(UpstreamRequest {
            url: format!("{}/chat/completions", target.base_url),
            headers: super::base_headers(req.stream),
            body: serde_json::to_vec(&body).unwrap_or_default(),
        })
    }

    fn answer(&self, body: &[u8], _ctx: &ReplyCtx) -> Result<Answer, String> {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| format!("its answer is not complete JSON ({e})"))?;
        if v.get("error").is_some_and(|e| !e.is_null()) {
            let detail = error_message(body).unwrap_or_else(|| "no message".into());
            return Err(format!("it answered 200 with an error: {detail}"));
        }
        if !v.get("choices").is_some_and(Value::is_array) {
            return Err("its answer has no `choices`".into());
        }
        let finish_reason = v["choices"][0]["finish_reason"].as_str().map(str::to_owned);
        Ok(Answer {
            body: body.to_vec(),
            usage: Usage::from_object(&v),
            finish_reason,
        })
    }

    fn stream(&self, ctx: ReplyCtx) -> Box<dyn StreamTranslator> {
        let text = ctx.collect_text.then(String::new);
        Box::new(OpenAiStream {
            framer: SseFramer::default(),
            relay: Relay {
                ctx,
                state: StreamState {
                    text,
                    ..StreamState::default()
                },
                new_usage: None,
                usage_sent: false,
                role_checked: false,
            },
        })
    }

    /// The message of an OpenAI-style error body: `error.message` (or `error` as a string),
    /// else a top-level `message` (Mistral: `{"object":"error","message":…}`) or `detail`
    /// (FastAPI-style hosts). Structured messages (Mistral's validation errors) are shown as
    /// compact JSON. OpenRouter's `metadata.raw`, the upstream's own words behind "Provider
    /// returned error", is appended, so the client (and the judgement) see the real cause.
    fn error_detail(&self, body: &[u8]) -> Option<String> {
        let v: Value = serde_json::from_slice(body).ok()?;
        let e = match v.get("error") {
            Some(Value::String(s)) if !s.is_empty() => return Some(s.clone()),
            Some(e @ Value::Object(_)) => e,
            _ => &v,
        };
        let message = match e.get("message").or_else(|| e.get("detail"))? {
            Value::String(s) if !s.is_empty() => s.clone(),
            m @ (Value::Object(_) | Value::Array(_)) => shorten(&m.to_string()),
            _ => return None,
        };
        let meta = &e["metadata"];
        Some(match meta["raw"].as_str().filter(|r| !r.is_empty()) {
            Some(raw) => match meta["provider_name"].as_str().filter(|p| !p.is_empty()) {
                Some(p) => format!("{message} ({p}: {})", shorten(raw)),
                None => format!("{message} ({})", shorten(raw)),
            },
            None => message,
        })
    }

    /// Reads the codes of an OpenAI-style error body ([`read_error`]), then judges.
    fn judge(
        &self,
        provider: &str,
        api_key: &str,
        status: u16,
        hints: Hints<'_>,
        body: &[u8],
        now_ms: u64,
    ) -> Failure {
        let detail = self.error_detail(body);
        let found = read_error(status, body, now_ms);
        upstream::judge_body(
            provider,
            api_key,
            status,
            hints,
            detail.as_deref(),
            found,
            now_ms,
        )
    }
}

/// What an OpenAI-style error body says beyond its message:
///
/// - `code`: `context_length_exceeded` (OpenAI, Groq, Cerebras) is a context overflow;
///   `content_filter` (Azure), `content_policy_violation` (OpenAI), and `invalid_prompt` whose
///   message cites the usage policy (OpenAI's reasoning models) a content filter;
///   `insufficient_quota` (OpenAI: the account's credit is spent, no wait helps) a refused key.
/// - OpenRouter's moderation (`metadata.flagged_input` / `metadata.reasons`): a content filter.
/// - On a 429, OpenRouter's `metadata.headers`: `X-RateLimit-Reset` (Unix ms) is when a spent
///   `free-models-per-day` quota comes back, or the end of a per-minute window;
///   `Retry-After` and `metadata.retry_after_seconds` (an upstream's own 429 relayed as
///   "Provider returned error") the wait.
///
/// Per-day caps themselves are recognised by their wording in [`upstream::judge_body`].
fn read_error(status: u16, body: &[u8], now_ms: u64) -> BodyHints {
    let mut found = BodyHints::default();
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return found;
    };
    let e = match v.get("error") {
        Some(e @ Value::Object(_)) => e,
        _ => &v,
    };
    let message = e["message"].as_str().unwrap_or("");
    let meta = &e["metadata"];
    found.cause = match e["code"].as_str().unwrap_or("") {
        "context_length_exceeded" => Some(Cause::ContextLength),
        "content_filter" | "content_policy_violation" => Some(Cause::ContentFilter),
        "invalid_prompt" if message.contains("usage policy") => Some(Cause::ContentFilter),
        "insufficient_quota" => Some(Cause::KeyRefused),
        _ if meta.get("flagged_input").is_some() || meta.get("reasons").is_some() => {
            Some(Cause::ContentFilter)
        }
        _ => None,
    };
    if status == 429 {
        let header = |name: &str| -> Option<String> {
            let (_, v) = meta["headers"]
                .as_object()?
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))?;
            v.as_str()
                .map(str::to_owned)
                .or_else(|| v.as_u64().map(|n| n.to_string()))
        };
        let reset_at = header("X-RateLimit-Reset").and_then(|r| cooldown::parse_instant(&r));
        found.reset_at_ms = reset_at;
        found.wait_ms = header("Retry-After")
            .and_then(|r| cooldown::retry_after_ms(&r, now_ms))
            .or_else(|| {
                meta["retry_after_seconds"]
                    .as_f64()
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .map(|s| (s * 1000.0).ceil() as u64)
            })
            .or_else(|| reset_at.map(|at| at.saturating_sub(now_ms)));
    }
    found
}

/// At most 300 characters of upstream text, for a message.
fn shorten(text: &str) -> String {
    const MAX: usize = 300;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// Rewrites a client body for a provider's quirks (catalogue data, no code per vendor).
pub fn apply_quirks(body: &mut Map<String, Value>, q: &Quirks, stream: bool) {
    if !stream {
        // OpenAI answers 400 to stream_options without stream.
        body.remove("stream_options");
    } else if q.stream_options {
        // Always ask for usage: stats and quotas must never see 0 tokens for a stream.
        let so = body
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Map::new()));
        if !so.is_object() {
            *so = Value::Object(Map::new());
        }
        if let Value::Object(o) = so {
            o.insert("include_usage".into(), Value::Bool(true));
        }
    } else {
        body.remove("stream_options");
    }
    let (from, to) = match q.max_tokens {
        MaxTokensField::Any => ("", ""),
        MaxTokensField::MaxTokens => ("max_completion_tokens", "max_tokens"),
        MaxTokensField::MaxCompletionTokens => ("max_tokens", "max_completion_tokens"),
    };
    if !from.is_empty() {
        if let Some(v) = body.remove(from) {
            body.entry(to).or_insert(v);
        }
    }
    if let (Some(max), Some(Value::Array(stops))) = (q.max_stop, body.get_mut("stop")) {
        stops.truncate(max as usize);
    }
    for name in q.drop {
        body.remove(*name);
    }
    for (from, to) in q.rename {
        if let Some(v) = body.remove(*from) {
            body.insert((*to).to_owned(), v);
        }
    }
    if q.prefix_flag {
        if let Some(Value::Array(messages)) = body.get_mut("messages") {
            if let Some(Value::Object(last)) = messages.last_mut() {
                if last.get("role").and_then(Value::as_str) == Some("assistant") {
                    last.insert("prefix".into(), Value::Bool(true));
                }
            }
        }
    }
}

/// Relays whole events; notes `[DONE]`, usage, finish reasons and error events, and makes
/// every stream well-formed: a `role` in the first chunk, a `finish_reason`, the usage chunk when
/// the client asked for it (with its cost), and `[DONE]` after a finished answer.
#[derive(Debug)]
pub struct OpenAiStream {
    framer: SseFramer,
    relay: Relay,
}

/// The stream's state apart from its framing (so events can be handled while framing).
#[derive(Debug)]
struct Relay {
    ctx: ReplyCtx,
    state: StreamState,
    new_usage: Option<Usage>,
    /// The client has its usage chunk.
    usage_sent: bool,
    /// The first chunk with choices was checked for its `role`.
    role_checked: bool,
}

impl StreamTranslator for OpenAiStream {
    fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let relay = &mut self.relay;
        if relay.state.broken.is_some() || relay.state.done {
            return;
        }
        let framed = self.framer.feed(chunk, |ev| {
            if !relay.state.done {
                relay.event(ev.raw, ev.has_data, ev.data, out);
            }
        });
        if let Err(why) = framed {
            relay.state.broken = Some(why);
        }
    }

    fn state(&self) -> &StreamState {
        &self.relay.state
    }

    fn take_new_usage(&mut self) -> Option<Usage> {
        self.relay.new_usage.take()
    }

    fn end(&mut self, failure: Option<&str>, out: &mut Vec<u8>) -> StreamEnd {
        self.relay.end(failure, out)
    }
}

impl Relay {
    fn end(&mut self, failure: Option<&str>, out: &mut Vec<u8>) -> StreamEnd {
        // Finished (finish_reason seen) but no [DONE]: the answer is whole; end it cleanly.
        if failure.is_none()
            && self.state.broken.is_none()
            && !self.state.done
            && !self.state.upstream_error
            && self.state.finish_reason.is_some()
        {
            self.finish(out);
        }
        let s = &self.state;
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

    fn event(&mut self, raw: &[u8], has_data: bool, data: &[u8], out: &mut Vec<u8>) {
        if !has_data {
            out.extend_from_slice(raw);
            return;
        }
        if data == b"[DONE]" {
            self.finish(out);
            return;
        }
        self.state.events += 1;
        if !self.state.content && has_tokens(data) {
            self.state.content = true;
        }
        let first = !self.role_checked;
        // Most chunks carry nothing to note: parse only those that may.
        let worth_parsing = first
            || self.state.text.is_some()
            || field_is(data, b"\"usage\"", |b| b == b'{')
            || field_is(data, b"\"finish_reason\"", |b| b != b'n')
            || field_is(data, b"\"error\"", |b| b != b'n');
        if !worth_parsing {
            out.extend_from_slice(raw);
            return;
        }
        let Ok(mut v) = serde_json::from_slice::<Value>(data) else {
            out.extend_from_slice(raw);
            return;
        };
        let mut rewrite = false;
        if first {
            // Synthesised chunks carry the upstream's id, model and timestamp.
            if let Some(id) = v.get("id").and_then(Value::as_str) {
                self.ctx.id = id.to_owned();
            }
            if let Some(m) = v.get("model").and_then(Value::as_str) {
                self.ctx.model = m.to_owned();
            }
            if let Some(c) = v.get("created").and_then(Value::as_u64) {
                self.ctx.created = c;
            }
            if let Some(delta) = v
                .get_mut("choices")
                .and_then(Value::as_array_mut)
                .and_then(|c| c.first_mut())
                .and_then(|c| c.get_mut("delta"))
                .and_then(Value::as_object_mut)
            {
                self.role_checked = true;
                if self.ctx.continuation {
                    // The client has its role chunk from the stream this one rescues.
                    if delta.remove("role").is_some() {
                        rewrite = true;
                    }
                } else if !delta.contains_key("role") {
                    delta.insert("role".into(), json!("assistant"));
                    rewrite = true;
                }
            }
        }
        if self.state.text.is_some() {
            if let Some(delta) = v.pointer("/choices/0/delta") {
                super::note_delta(&mut self.state, delta);
            }
        }
        if v.get("error").is_some_and(|e| !e.is_null()) {
            self.state.upstream_error = true;
        }
        if let Some(reason) = v
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .rev()
            .find_map(|c| c.get("finish_reason").and_then(Value::as_str))
        {
            self.state.finish_reason = Some(reason.to_owned());
        }
        if let Some(u) = Usage::from_object(&v) {
            if self.state.usage.is_none() {
                self.new_usage = Some(u);
            }
            self.state.usage = Some(u);
            let usage_only = v
                .get("choices")
                .and_then(Value::as_array)
                .is_some_and(Vec::is_empty);
            if usage_only {
                if !self.ctx.client_usage {
                    return;
                }
                self.usage_sent = true;
                if let (Some(cost), Some(obj)) = (
                    self.ctx.cost(u),
                    v.get_mut("usage").and_then(Value::as_object_mut),
                ) {
                    obj.entry("cost").or_insert(json!(cost));
                    rewrite = true;
                }
            }
        }
        if rewrite {
            out::event(&v, out);
        } else {
            out.extend_from_slice(raw);
        }
    }

    /// The answer is complete: what the client is still owed, then `[DONE]`.
    fn finish(&mut self, out: &mut Vec<u8>) {
        if self.state.finish_reason.is_none() && !self.state.upstream_error {
            // Every stream ends with a finish_reason, even from upstreams that omit it.
            let delta = if self.role_checked {
                json!({})
            } else {
                json!({"role": "assistant"})
            };
            out::chunk_event(&self.ctx, &delta, Some("stop"), out);
            self.state.finish_reason = Some("stop".into());
        }
        if self.ctx.client_usage && !self.usage_sent {
            // The provider takes no stream_options (or ignored it): the usage it reported on
            // another chunk goes in the chunk the client asked for.
            if let Some(u) = self.state.usage {
                let usage = out::usage(&self.ctx, u.prompt_tokens, u.completion_tokens, None, None);
                out::event(&out::usage_chunk(&self.ctx, usage), out);
                self.usage_sent = true;
            }
        }
        out.extend_from_slice(out::DONE);
        self.state.done = true;
    }
}

/// Does a chunk carry a token: non-empty `content` or `reasoning_content`, or tool calls? (Read
/// without parsing, until the first one: a role chunk alone is not a first token.)
fn has_tokens(data: &[u8]) -> bool {
    let non_empty_string = |name: &[u8]| {
        let mut from = 0;
        while let Some(i) = find(&data[from..], name) {
            let rest = &data[from + i + name.len()..];
            let mut it = rest.iter().skip_while(|b| b.is_ascii_whitespace());
            if it.next() == Some(&b':') {
                let mut it = it.skip_while(|b| b.is_ascii_whitespace());
                if it.next() == Some(&b'"') && it.next().is_some_and(|&b| b != b'"') {
                    return true;
                }
            }
            from += i + name.len();
        }
        false
    };
    non_empty_string(b"\"content\"")
        || non_empty_string(b"\"reasoning_content\"")
        || non_empty_string(b"\"reasoning\"")
        || field_is(data, b"\"tool_calls\"", |b| b == b'[')
}

/// Does `"name"` appear with a value whose first byte satisfies `first`?
fn field_is(data: &[u8], name: &[u8], first: impl Fn(u8) -> bool) -> bool {
    let mut from = 0;
    while let Some(i) = find(&data[from..], name) {
        let after = &data[from + i + name.len()..];
        let mut rest = after.iter().skip_while(|b| b.is_ascii_whitespace());
        if rest.next() == Some(&b':') {
            if let Some(&b) = rest.find(|b| !b.is_ascii_whitespace()) {
                if first(b) {
                    return true;
                }
            }
        }
        from += i + name.len();
    }
    false
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::{authorize, StreamEnd};
    use crate::config::tests::config_of;

    const STREAM: &str = "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"},\"finish_reason\":null}],\"usage\":null}\n\n\
data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"},\"finish_reason\":null}],\"usage\":null}\n\n\
data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n\
data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":1,\"total_tokens\":5}}\n\n\
data: [DONE]\n\n";

    pub(crate) fn ctx(client_usage: bool) -> ReplyCtx {
        ReplyCtx {
            id: "chatcmpl-test".into(),
            created: 1_700_000_000,
            model: "m".into(),
            client_usage,
            price: None,
            continuation: false,
            collect_text: false,
        }
    }

    fn run_with(ctx: ReplyCtx, chunks: &[&[u8]]) -> (Vec<u8>, Box<dyn StreamTranslator>) {
        let mut t = OpenAi.stream(ctx);
        let mut out = Vec::new();
        for c in chunks {
            t.feed(c, &mut out);
        }
        (out, t)
    }

    fn run(client_usage: bool, chunks: &[&[u8]]) -> (Vec<u8>, Box<dyn StreamTranslator>) {
        run_with(ctx(client_usage), chunks)
    }

    fn data_events(out: &[u8]) -> Vec<Value> {
        String::from_utf8_lossy(out)
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }

    #[test]
    fn usage_is_noted_and_its_chunk_dropped_unless_asked() {
        let (out, mut t) = run(false, &[STREAM.as_bytes()]);
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("prompt_tokens"));
        assert!(text.ends_with("data: [DONE]\n\n"));
        assert_eq!(
            t.take_new_usage(),
            Some(Usage {
                prompt_tokens: 4,
                completion_tokens: 1
            })
        );
        assert_eq!(t.take_new_usage(), None);
        assert_eq!(t.state().finish_reason.as_deref(), Some("stop"));
        assert_eq!(t.end(None, &mut Vec::new()), StreamEnd::Complete);

        let (out, _) = run(true, &[STREAM.as_bytes()]);
        assert_eq!(out, STREAM.as_bytes(), "asked for usage: relayed unchanged");
    }

    #[test]
    fn the_usage_chunk_carries_its_cost_when_the_price_is_known() {
        let mut c = ctx(true);
        c.price = Some(crate::catalog::Price {
            input: 1.0,
            output: 5.0,
            source: "t",
        });
        let (out, _) = run_with(c, &[STREAM.as_bytes()]);
        let usage = data_events(&out).pop().unwrap();
        assert_eq!(usage["usage"]["cost"], json!(0.000009));
        assert_eq!(usage["usage"]["prompt_tokens"], 4);
    }

    #[test]
    fn streams_are_made_whole_role_finish_usage_done() {
        // No role in the first chunk, usage only on the finish chunk (Mistral), no
        // usage-only chunk, then [DONE].
        let s = "data: {\"id\":\"x\",\"model\":\"mm\",\"created\":5,\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"},\"finish_reason\":null}]}\n\n\
data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n\
data: [DONE]\n\n";
        let (out, _) = run(true, &[s.as_bytes()]);
        let ev = data_events(&out);
        assert_eq!(ev[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(ev[0]["choices"][0]["delta"]["content"], "a");
        let last = ev.last().unwrap();
        assert_eq!(last["choices"], json!([]));
        assert_eq!(last["usage"]["completion_tokens"], 1);
        assert_eq!(
            (last["id"].as_str(), last["model"].as_str()),
            (Some("x"), Some("mm"))
        );
        assert!(out.ends_with(b"data: [DONE]\n\n"));

        // No finish_reason at all before [DONE]: one is added.
        let s = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"a\"}}]}\n\ndata: [DONE]\n\n";
        let (out, mut t) = run(false, &[s.as_bytes()]);
        let ev = data_events(&out);
        assert_eq!(ev.last().unwrap()["choices"][0]["finish_reason"], "stop");
        assert_eq!(t.end(None, &mut Vec::new()), StreamEnd::Complete);
    }

    #[test]
    fn a_finished_stream_without_done_ends_cleanly() {
        let cut = &STREAM[..STREAM.find("data: [DONE]").unwrap()];
        let (mut out, mut t) = run(false, &[cut.as_bytes()]);
        assert_eq!(t.end(None, &mut out), StreamEnd::Complete);
        assert!(out.ends_with(b"data: [DONE]\n\n"));
        // Not finished: interrupted, and nothing is added.
        let cut = &STREAM[..STREAM
            .find("data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},")
            .unwrap()];
        let (mut out, mut t) = run(false, &[cut.as_bytes()]);
        let before = out.len();
        assert!(matches!(t.end(None, &mut out), StreamEnd::Interrupted(_)));
        assert_eq!(out.len(), before);
    }

    #[test]
    fn a_stream_cut_mid_event_leaves_the_client_at_a_boundary() {
        let cut = &STREAM.as_bytes()[..STREAM.find("hi").unwrap()];
        let (out, mut t) = run(true, &[cut]);
        assert!(out.ends_with(b"\n\n"));
        assert_eq!(t.state().events, 1);
        assert!(
            matches!(t.end(Some("reset"), &mut Vec::new()), StreamEnd::Interrupted(w) if w == "reset")
        );
        let (_, mut t) = run(true, &[cut]);
        assert!(matches!(
            t.end(None, &mut Vec::new()),
            StreamEnd::Interrupted(_)
        ));
    }

    #[test]
    fn upstream_error_events_are_relayed_and_noted() {
        let (out, mut t) = run(false, &[b"data: {\"error\":{\"message\":\"boom\"}}\n\n"]);
        assert!(!out.is_empty());
        assert!(t.state().upstream_error);
        assert_eq!(t.end(None, &mut Vec::new()), StreamEnd::UpstreamError);
    }

    #[test]
    fn a_continuation_has_no_second_role_and_the_text_is_kept_for_a_rescue() {
        let mut c = ctx(false);
        c.collect_text = true;
        let (_, t) = run_with(c.clone(), &[STREAM.as_bytes()]);
        assert_eq!(t.state().text.as_deref(), Some("hi"));
        assert!(t.state().content);
        c.continuation = true;
        let (out, _) = run_with(c, &[STREAM.as_bytes()]);
        assert!(data_events(&out)
            .iter()
            .all(|e| e.pointer("/choices/0/delta/role").is_none()));
        // A tool call cannot be carried by a prefill: no text to rescue with.
        let mut c = ctx(false);
        c.collect_text = true;
        let tool = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"tool_calls\":[{\"index\":0,\"id\":\"c\",\"function\":{\"name\":\"f\",\"arguments\":\"\"}}]}}]}\n\n";
        let (_, t) = run_with(c, &[tool.as_bytes()]);
        assert_eq!(t.state().text, None);
        assert!(t.state().content);
    }

    #[test]
    fn a_role_chunk_is_not_a_first_token() {
        assert!(!has_tokens(
            br#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#
        ));
        assert!(has_tokens(br#"{"choices":[{"delta":{"content":"Hi"}}]}"#));
        assert!(has_tokens(
            br#"{"choices":[{"delta":{"reasoning_content":"hm"}}]}"#
        ));
        assert!(has_tokens(
            br#"{"choices":[{"delta":{"tool_calls":[{"index":0}]}}]}"#
        ));
        assert!(!has_tokens(
            br#"{"choices":[{"delta":{"tool_calls":null}}]}"#
        ));
    }

    #[test]
    fn field_detection() {
        assert!(field_is(b"{\"usage\" : {\"a\":1}}", b"\"usage\"", |b| b == b'{'));
        assert!(!field_is(b"{\"usage\":null}", b"\"usage\"", |b| b == b'{'));
        assert!(field_is(
            b"{\"finish_reason\":null,\"x\":{\"finish_reason\":\"stop\"}}",
            b"\"finish_reason\"",
            |b| b != b'n'
        ));
    }

    fn body_for(provider: &str, req: &str) -> Value {
        let c = config_of(&[(&*format!("{provider}_api_key"), "k")]).unwrap();
        let p = c.provider(provider).unwrap();
        let req = ChatRequest::parse(req.as_bytes()).unwrap();
        let up = OpenAi.request(&p.target("mm"), &req).unwrap();
        serde_json::from_slice(&up.body).unwrap()
    }

    #[test]
    fn requests_ask_for_usage_on_streams_and_carry_no_key_until_authorized() {
        let c = config_of(&[("groq_api_key", "gsk-secret"), ("mistral_api_key", "m")]).unwrap();
        let req = ChatRequest::parse(
            br#"{"model":"auto","stream":true,"stream_options":{"x":1},"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        let groq = c.provider("groq").unwrap();
        let mut up = OpenAi.request(&groq.target("llama"), &req).unwrap();
        assert_eq!(up.url, "https://api.groq.com/openai/v1/chat/completions");
        let body: Value = serde_json::from_slice(&up.body).unwrap();
        assert_eq!(body["model"], "llama");
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["stream_options"]["x"], 1);
        assert!(!format!("{up:?}").contains("gsk-secret"));
        authorize(&mut up, groq.provider.auth, groq.keys[0].secret());
        assert!(up
            .headers
            .contains(&("authorization", "Bearer gsk-secret".into())));
        // Mistral rejects stream_options (422): never sent there.
        let up = OpenAi
            .request(&c.provider("mistral").unwrap().target("m"), &req)
            .unwrap();
        let body: Value = serde_json::from_slice(&up.body).unwrap();
        assert!(body.get("stream_options").is_none());
    }

    #[test]
    fn quirks_are_applied_as_data() {
        // Continue's autocomplete: 7 stop strings; OpenAI and Groq take 4.
        let seven = r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stop":["a","b","c","d","e","f","g"],"max_tokens":9,"seed":1,"logit_bias":{"1":2},"stream_options":{"include_usage":true}}"#;
        let groq = body_for("groq", seven);
        assert_eq!(groq["stop"].as_array().unwrap().len(), 4);
        assert_eq!(groq["max_tokens"], 9);
        assert!(groq.get("logit_bias").is_none());
        assert!(
            groq.get("stream_options").is_none(),
            "no stream: no stream_options"
        );
        let openai = body_for("openai", seven);
        assert_eq!(openai["max_completion_tokens"], 9);
        assert!(openai.get("max_tokens").is_none());
        assert_eq!(openai["logit_bias"]["1"], 2);
        let mistral = body_for("mistral", seven);
        assert_eq!(mistral["stop"].as_array().unwrap().len(), 7);
        assert_eq!(
            (mistral["random_seed"].as_i64(), mistral.get("seed")),
            (Some(1), None)
        );
        let mistral = body_for(
            "mistral",
            r#"{"model":"m","max_completion_tokens":5,"messages":[{"role":"user","content":"x"},{"role":"assistant","content":"def "}]}"#,
        );
        assert_eq!(mistral["max_tokens"], 5);
        assert_eq!(mistral["messages"][1]["prefix"], true);
        // Unknown fields a provider accepts are carried through untouched.
        let nvidia = body_for(
            "nvidia",
            r#"{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}]},{"role":"tool","tool_call_id":"c","content":"ok"}],"x_vendor":{"a":[1]}}"#,
        );
        assert_eq!(nvidia["x_vendor"]["a"][0], 1);
        assert_eq!(nvidia["messages"][0]["content"], Value::Null);
    }

    #[test]
    fn answers_must_be_whole() {
        let ok = br#"{"choices":[{"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
        let a = OpenAi.answer(ok, &ctx(false)).unwrap();
        assert_eq!(a.usage.unwrap().completion_tokens, 2);
        assert_eq!(a.finish_reason.as_deref(), Some("stop"));
        assert!(OpenAi.answer(&ok[..20], &ctx(false)).is_err());
        assert!(OpenAi
            .answer(br#"{"error":{"message":"x"}}"#, &ctx(false))
            .is_err());
        assert!(OpenAi.answer(br#"{"id":"x"}"#, &ctx(false)).is_err());
    }

    // -- errors -------------------------------------------------------------------------------

    /// Unix ms of 2026-11-21 07:28 UTC; the next UTC midnight is 16 h 32 min later.
    const NOW: u64 = 1_795_246_080_000;
    const MIDNIGHT_UTC: u64 = 1_795_305_600_000;

    fn judged(provider: &str, status: u16, hints: Hints<'_>, body: &str) -> Failure {
        OpenAi.judge(provider, "sk-secret", status, hints, body.as_bytes(), NOW)
    }

    #[test]
    fn openrouter_daily_cap_cools_until_the_reset_it_names() {
        // As OpenRouter sends it (openclaude #936): the reset is in `metadata.headers`, in ms.
        let body = |reset: u64| {
            format!(
                r#"{{"error":{{"message":"Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free model requests per day","code":429,"metadata":{{"headers":{{"X-RateLimit-Limit":"50","X-RateLimit-Remaining":"0","X-RateLimit-Reset":"{reset}"}},"provider_name":null}}}},"user_id":"user_x"}}"#
            )
        };
        let f = judged("openrouter", 429, Hints::default(), &body(MIDNIGHT_UTC));
        assert_eq!((f.cause, f.retryable), (Cause::DailyCap, true));
        assert_eq!(f.cooldown.unwrap().until_ms, MIDNIGHT_UTC);
        assert_eq!(f.error.retry_after, Some((MIDNIGHT_UTC - NOW) / 1000));
        assert!(f
            .error
            .message
            .starts_with("Provider `openrouter` has spent its daily quota"));
        // The body's instant is what counts, whatever a header says.
        let hints = Hints {
            retry_after: Some("60"),
            ..Hints::default()
        };
        let f = judged("openrouter", 429, hints, &body(NOW + 7_200_000));
        assert_eq!(f.cooldown.unwrap().until_ms, NOW + 7_200_000);
        // Without it (or with one already past): the next UTC midnight.
        let bare = r#"{"error":{"message":"Rate limit exceeded: free-models-per-day-high-balance.","type":"rate_limit_error","code":"429"}}"#;
        let f = judged("openrouter", 429, hints, bare);
        assert_eq!(
            (f.cause, f.cooldown.unwrap().until_ms),
            (Cause::DailyCap, MIDNIGHT_UTC)
        );
        let f = judged("openrouter", 429, hints, &body(NOW - 1_000));
        assert_eq!(f.cooldown.unwrap().until_ms, MIDNIGHT_UTC);
    }

    #[test]
    fn openrouter_per_minute_limits_wait_as_the_body_says() {
        let per_min = format!(
            r#"{{"error":{{"message":"Rate limit exceeded: free-models-per-min. ","code":429,"metadata":{{"headers":{{"X-RateLimit-Limit":"20","X-RateLimit-Remaining":"0","X-RateLimit-Reset":"{}"}},"provider_name":null}}}}}}"#,
            NOW + 40_000
        );
        let f = judged("openrouter", 429, Hints::default(), &per_min);
        assert_eq!(f.cause, Cause::RateLimited);
        assert_eq!(f.cooldown.unwrap().until_ms, NOW + 40_000);
        // An upstream's own 429, relayed: its words and its wait.
        let relayed = r#"{"error":{"message":"Provider returned error","code":429,"metadata":{"raw":"meta-llama/llama-3.3-70b-instruct:free is temporarily rate-limited upstream. Please retry shortly.","provider_name":"Venice","is_byok":false,"retry_after_seconds":17,"retry_after_seconds_raw":16.007,"headers":{"Retry-After":"17"}}},"user_id":"user_x"}"#;
        let f = judged("openrouter", 429, Hints::default(), relayed);
        assert_eq!(f.cause, Cause::RateLimited);
        assert_eq!(f.cooldown.unwrap().until_ms, NOW + 17_000);
        assert!(f
            .error
            .message
            .contains("Provider returned error (Venice: meta-llama/llama-3.3-70b-instruct:free is temporarily"));
        let seconds_only = relayed.replace(r#","headers":{"Retry-After":"17"}"#, "");
        let f = judged("openrouter", 429, Hints::default(), &seconds_only);
        assert_eq!(f.cooldown.unwrap().until_ms, NOW + 17_000);
        // A Retry-After header still wins.
        let hints = Hints {
            retry_after: Some("5"),
            ..Hints::default()
        };
        assert_eq!(
            judged("openrouter", 429, hints, relayed)
                .cooldown
                .unwrap()
                .until_ms,
            NOW + 5_000
        );
    }

    #[test]
    fn groq_daily_caps_wait_for_the_rolling_window() {
        let tpd = r#"{"error":{"message":"Rate limit reached for model `openai/gpt-oss-120b` in organization `org_x` service tier `on_demand` on tokens per day (TPD): Limit 200000, Used 197494, Requested 4035. Please try again in 11m0.528s. Need more tokens? Upgrade to Dev Tier today at https://console.groq.com/settings/billing","type":"tokens","code":"rate_limit_exceeded"}}"#;
        let f = judged("groq", 429, Hints::default(), tpd);
        assert_eq!(f.cause, Cause::DailyCap);
        assert_eq!(f.cooldown.unwrap().until_ms, NOW + 660_528);
        let rpd = r#"{"error":{"message":"Rate limit reached for model `llama-3.1-8b-instant` in organization `org_x` service tier `on_demand` on requests per day (RPD): Limit 14400, Used 14400, Requested 1.","type":"requests","code":"rate_limit_exceeded"}}"#;
        let f = judged("groq", 429, Hints::default(), rpd);
        assert_eq!(
            (f.cause, f.cooldown.unwrap().until_ms),
            (Cause::DailyCap, MIDNIGHT_UTC)
        );
        let rpm = r#"{"error":{"message":"Rate limit reached for model `llama-3.1-8b-instant` on requests per minute (RPM): Limit 30, Used 30, Requested 1. Please try again in 2s.","type":"requests","code":"rate_limit_exceeded"}}"#;
        let hints = Hints {
            retry_after: Some("2"),
            reset_requests: Some("2m59.56s"),
            reset_tokens: Some("7.66s"),
        };
        let f = judged("groq", 429, hints, rpm);
        assert_eq!(
            (f.cause, f.cooldown.unwrap().until_ms),
            (Cause::RateLimited, NOW + 2_000)
        );
    }

    #[test]
    fn codes_name_overflows_filters_and_spent_credit() {
        for (status, body, cause) in [
            (
                400,
                r#"{"error":{"message":"This model's maximum context length is 128000 tokens. However, your messages resulted in 130000 tokens. Please reduce the length of the messages.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#,
                Cause::ContextLength,
            ),
            (
                400,
                r#"{"error":{"message":"Input is longer than allowed.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#,
                Cause::ContextLength,
            ),
            (
                400,
                r#"{"error":{"message":"The response was filtered due to the prompt triggering Azure OpenAI's content management policy. Please modify your prompt and retry.","type":null,"param":"prompt","code":"content_filter","status":400,"innererror":{"code":"ResponsibleAIPolicyViolation","content_filter_result":{"hate":{"filtered":true,"severity":"high"}}}}}"#,
                Cause::ContentFilter,
            ),
            (
                400,
                r#"{"error":{"message":"Your request was rejected as a result of our safety system.","type":"invalid_request_error","param":null,"code":"content_policy_violation"}}"#,
                Cause::ContentFilter,
            ),
            (
                400,
                r#"{"error":{"message":"Invalid prompt: your prompt was flagged as potentially violating our usage policy. Please try again with a different prompt.","type":"invalid_request_error","param":null,"code":"invalid_prompt"}}"#,
                Cause::ContentFilter,
            ),
            (
                403,
                r#"{"error":{"code":403,"message":"Input moderated.","metadata":{"reasons":["harassment"],"flagged_input":"...","provider_name":"OpenAI","model_slug":"openai/gpt-4o"}}}"#,
                Cause::ContentFilter,
            ),
            (
                429,
                r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#,
                Cause::KeyRefused,
            ),
            (
                401,
                r#"{"error":{"message":"Incorrect API key provided: sk-secret.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#,
                Cause::KeyRefused,
            ),
            (
                400,
                r#"{"error":{"message":"Invalid 'messages': empty array.","type":"invalid_request_error","param":"messages","code":"empty_array"}}"#,
                Cause::Client,
            ),
            (
                400,
                r#"{"object":"error","message":"Prompt contains 40000 tokens and 0 draft tokens, too large for model with 32768 maximum context length","type":"invalid_request_message_error","param":null,"code":"3051"}"#,
                Cause::ContextLength,
            ),
            (
                503,
                r#"{"error":{"message":"The engine is currently overloaded, please try again later.","type":"server_error","param":null,"code":null}}"#,
                Cause::Server,
            ),
        ] {
            let f = judged("openai", status, Hints::default(), body);
            assert_eq!(f.cause, cause, "{body}");
            assert!(
                !f.error.message.contains("sk-secret"),
                "{}",
                f.error.message
            );
            match cause {
                Cause::ContextLength => assert_eq!(f.error.code, Some("context_length_exceeded")),
                Cause::ContentFilter => assert_eq!(f.error.code, Some("content_filter")),
                _ => {}
            }
        }
    }

    #[test]
    fn error_details_of_every_openai_like_shape() {
        let d = |b: &str| OpenAi.error_detail(b.as_bytes());
        assert_eq!(
            d(r#"{"error":{"message":"plain"}}"#).as_deref(),
            Some("plain")
        );
        assert_eq!(d(r#"{"error":"worse"}"#).as_deref(), Some("worse"));
        // Mistral: the error is the body itself; a validation error's message is structured.
        assert_eq!(
            d(r#"{"object":"error","message":"Invalid model: x","type":"invalid_model","code":"1500"}"#).as_deref(),
            Some("Invalid model: x")
        );
        assert_eq!(
            d(r#"{"object":"error","message":{"detail":[{"type":"extra_forbidden","loc":["body","stream_options"],"msg":"Extra inputs are not permitted"}]},"type":"invalid_request_error"}"#).as_deref(),
            Some(r#"{"detail":[{"loc":["body","stream_options"],"msg":"Extra inputs are not permitted","type":"extra_forbidden"}]}"#)
        );
        assert_eq!(d(r#"{"detail":"Not Found"}"#).as_deref(), Some("Not Found"));
        // OpenRouter's relayed upstream words, shortened.
        let long = "x".repeat(400);
        let raw = d(&format!(
            r#"{{"error":{{"message":"Provider returned error","code":400,"metadata":{{"raw":"{long}"}}}}}}"#
        ))
        .unwrap();
        assert!(raw.starts_with("Provider returned error (xxx") && raw.ends_with("x…)"));
        assert_eq!(
            raw.chars().count(),
            "Provider returned error (".len() + 300 + 2
        );
        assert_eq!(d("<html>"), None);
        assert_eq!(d(r#"{"error":{}}"#), None);
    }
}
