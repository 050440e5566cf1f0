//! The OpenAI-compatible wire format (OpenAI, Groq, OpenRouter, Mistral, NVIDIA, Together, …):
//! requests and answers pass through byte for byte, except the model, the usage request on
//! streams, and the usage chunk a client did not ask for.

use super::{Adapter, Answer, StreamState, StreamTranslator, UpstreamRequest};
use crate::config::Configured;
use crate::wire::openai::{error_message, ChatRequest, StreamOptions, Usage};
use crate::wire::sse::SseFramer;
use serde_json::Value;

/// The OpenAI-compatible adapter.
pub struct OpenAi;

impl Adapter for OpenAi {
    fn request(&self, target: &Configured, model: &str, req: &ChatRequest) -> UpstreamRequest {
        let usage = match (req.stream, target.provider.stream_options) {
            (false, _) => StreamOptions::Keep,
            (true, true) => StreamOptions::AskUsage,
            (true, false) => StreamOptions::Remove,
        };
        UpstreamRequest {
            url: target.chat_url(),
            headers: vec![
                ("content-type", "application/json".into()),
                (
                    "accept",
                    if req.stream {
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
            ],
            body: req.upstream_body(model, usage),
        }
    }

    fn authorize(&self, request: &mut UpstreamRequest, api_key: &str) {
        request
            .headers
            .push(("authorization", format!("Bearer {api_key}")));
    }

    fn answer(&self, body: &[u8]) -> Result<Answer, String> {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| format!("its answer is not complete JSON ({e})"))?;
        if v.get("error").is_some_and(|e| !e.is_null()) {
            let detail = error_message(body).unwrap_or_else(|| "no message".into());
            return Err(format!("it answered 200 with an error: {detail}"));
        }
        if !v.get("choices").is_some_and(Value::is_array) {
            return Err("its answer has no `choices`".into());
        }
        Ok(Answer {
            body: body.to_vec(),
            usage: Usage::from_object(&v),
        })
    }

    fn stream(&self, client_usage: bool) -> Box<dyn StreamTranslator> {
        Box::new(OpenAiStream {
            client_usage,
            ..Default::default()
        })
    }

    fn error_detail(&self, body: &[u8]) -> Option<String> {
        error_message(body)
    }
}

/// Relays whole events; notes `[DONE]`, usage, finish reasons and error events.
#[derive(Debug, Default)]
pub struct OpenAiStream {
    framer: SseFramer,
    client_usage: bool,
    state: StreamState,
    new_usage: Option<Usage>,
}

impl StreamTranslator for OpenAiStream {
    fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        if self.state.broken.is_some() {
            return;
        }
        let (state, new_usage, client_usage) =
            (&mut self.state, &mut self.new_usage, self.client_usage);
        let framed = self.framer.feed(chunk, |ev| {
            if keep(ev.has_data, ev.data, state, new_usage, client_usage) {
                out.extend_from_slice(ev.raw);
            }
        });
        if let Err(why) = framed {
            self.state.broken = Some(why);
        }
    }

    fn state(&self) -> &StreamState {
        &self.state
    }

    fn take_new_usage(&mut self) -> Option<Usage> {
        self.new_usage.take()
    }
}

/// Reads one event; false when the client must not get it (a usage chunk it did not ask for).
fn keep(
    has_data: bool,
    data: &[u8],
    state: &mut StreamState,
    new_usage: &mut Option<Usage>,
    client_usage: bool,
) -> bool {
    if !has_data {
        return true;
    }
    if data == b"[DONE]" {
        state.done = true;
        return true;
    }
    state.events += 1;
    // Most chunks carry nothing to note: parse only those that may.
    let worth_parsing = field_is(data, b"\"usage\"", |b| b == b'{')
        || field_is(data, b"\"finish_reason\"", |b| b != b'n')
        || field_is(data, b"\"error\"", |b| b != b'n');
    if !worth_parsing {
        return true;
    }
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return true;
    };
    if v.get("error").is_some_and(|e| !e.is_null()) {
        state.upstream_error = true;
    }
    if let Some(reason) = v
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .rev()
        .find_map(|c| c.get("finish_reason").and_then(Value::as_str))
    {
        state.finish_reason = Some(reason.to_owned());
    }
    if let Some(u) = Usage::from_object(&v) {
        if state.usage.is_none() {
            *new_usage = Some(u);
        }
        state.usage = Some(u);
        let usage_only = v
            .get("choices")
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty);
        if usage_only && !client_usage {
            return false;
        }
    }
    true
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
    use crate::adapter::StreamEnd;
    use crate::config::tests::config_of;

    const STREAM: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"},\"finish_reason\":null}],\"usage\":null}\n\n\
data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"},\"finish_reason\":null}],\"usage\":null}\n\n\
data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":1,\"total_tokens\":5}}\n\n\
data: [DONE]\n\n";

    fn run(client_usage: bool, chunks: &[&[u8]]) -> (Vec<u8>, Box<dyn StreamTranslator>) {
        let mut t = OpenAi.stream(client_usage);
        let mut out = Vec::new();
        for c in chunks {
            t.feed(c, &mut out);
        }
        (out, t)
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
        assert_eq!(t.end(None), StreamEnd::Complete);

        let (out, _) = run(true, &[STREAM.as_bytes()]);
        assert_eq!(out, STREAM.as_bytes(), "asked for usage: relayed unchanged");
    }

    #[test]
    fn a_stream_cut_mid_event_leaves_the_client_at_a_boundary() {
        let cut = &STREAM.as_bytes()[..STREAM.find("hi").unwrap()];
        let (out, mut t) = run(true, &[cut]);
        assert!(out.ends_with(b"\n\n"));
        assert_eq!(t.state().events, 1);
        assert!(matches!(t.end(Some("reset")), StreamEnd::Interrupted(w) if w == "reset"));
        let (_, mut t) = run(true, &[cut]);
        assert!(matches!(t.end(None), StreamEnd::Interrupted(_)));
    }

    #[test]
    fn upstream_error_events_are_relayed_and_noted() {
        let (out, mut t) = run(false, &[b"data: {\"error\":{\"message\":\"boom\"}}\n\n"]);
        assert!(!out.is_empty());
        assert!(t.state().upstream_error);
        assert_eq!(t.end(None), StreamEnd::UpstreamError);
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

    #[test]
    fn requests_ask_for_usage_on_streams_and_carry_no_key_until_authorized() {
        let c = config_of(&[("groq_api_key", "gsk-secret"), ("mistral_api_key", "m")]).unwrap();
        let req = ChatRequest::parse(
            br#"{"model":"auto","stream":true,"stream_options":{"x":1},"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        let groq = c.provider("groq").unwrap();
        let mut up = OpenAi.request(groq, "llama", &req);
        let body: Value = serde_json::from_slice(&up.body).unwrap();
        assert_eq!(body["model"], "llama");
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["stream_options"]["x"], 1);
        assert!(!format!("{up:?}").contains("gsk-secret"));
        OpenAi.authorize(&mut up, &groq.api_key);
        assert!(up
            .headers
            .contains(&("authorization", "Bearer gsk-secret".into())));
        // Mistral rejects stream_options (422): never sent there.
        let up = OpenAi.request(c.provider("mistral").unwrap(), "m", &req);
        let body: Value = serde_json::from_slice(&up.body).unwrap();
        assert!(body.get("stream_options").is_none());
    }

    #[test]
    fn answers_must_be_whole() {
        let ok = br#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
        assert_eq!(
            OpenAi.answer(ok).unwrap().usage.unwrap().completion_tokens,
            2
        );
        assert!(OpenAi.answer(&ok[..20]).is_err());
        assert!(OpenAi.answer(br#"{"error":{"message":"x"}}"#).is_err());
        assert!(OpenAi.answer(br#"{"id":"x"}"#).is_err());
    }
}
