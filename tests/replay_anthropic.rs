//! Replays Anthropic's documented responses (tests/fixtures/anthropic; sources in its README)
//! through the Anthropic adapter and checks what an OpenAI client gets: chunks that parse, a
//! first chunk with the assistant role, tool arguments that concatenate to the documented input,
//! the mapped finish reason, the usage, and `[DONE]` (an OpenAI error event instead, for an
//! error). Each stream is fed whole, one byte at a time and seven bytes at a time, and the three
//! outputs must be equal.

use freerelay::adapter::anthropic::Anthropic;
use freerelay::adapter::{Adapter, ReplyCtx, StreamEnd, StreamState};
use freerelay::wire::openai::Usage;
use serde_json::{json, Value};

const BASIC: &str = include_str!("fixtures/anthropic/streaming_basic.sse");
const TOOL_USE: &str = include_str!("fixtures/anthropic/streaming_tool_use.sse");
const THINKING: &str = include_str!("fixtures/anthropic/streaming_thinking.sse");
const ERROR: &str = include_str!("fixtures/anthropic/streaming_error.sse");
const SDK_TOOL_USE: &str = include_str!("fixtures/anthropic/sdk_tool_use_response.sse");
const SDK_REFUSAL: &str = include_str!("fixtures/anthropic/sdk_refusal_response.sse");
const MESSAGE_TOOL_USE: &str = include_str!("fixtures/anthropic/message_tool_use.json");

/// The reply identity the gateway would give.
fn ctx(client_usage: bool) -> ReplyCtx {
    ReplyCtx {
        id: "chatcmpl-replay".into(),
        created: 1_750_000_000,
        model: "claude-sonnet-4-5".into(),
        client_usage,
        price: None,
        continuation: false,
        collect_text: false,
    }
}

/// The body as a server sends it: the last event ends with its blank line.
fn terminated(fixture: &str) -> String {
    let mut body = fixture.to_owned();
    while !body.ends_with("\n\n") {
        body.push('\n');
    }
    body
}

/// What the client got from one replay.
struct Replay {
    out: String,
    /// The `data:` events, parsed (`[DONE]` apart).
    events: Vec<Value>,
    end: StreamEnd,
    state: StreamState,
    new_usage: Option<Usage>,
}

/// Feeds `fixture` in `size`-byte chunks.
fn feed(fixture: &str, client_usage: bool, size: usize) -> Replay {
    let body = terminated(fixture);
    let mut t = Anthropic.stream(ctx(client_usage));
    let mut out = Vec::new();
    for chunk in body.as_bytes().chunks(size) {
        t.feed(chunk, &mut out);
    }
    let new_usage = t.take_new_usage();
    assert_eq!(t.take_new_usage(), None, "the usage is reported once");
    let end = t.end(None, &mut out);
    let out = String::from_utf8(out).expect("the output is UTF-8");
    let events = out
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .filter_map(|e| {
            if e.starts_with(':') {
                return None; // a comment (relayed ping)
            }
            let data = e
                .strip_prefix("data: ")
                .expect("only data events and comments");
            (data != "[DONE]").then(|| serde_json::from_str(data).expect("events are JSON"))
        })
        .collect();
    Replay {
        out,
        events,
        end,
        state: t.state().clone(),
        new_usage,
    }
}

/// Replays `fixture` whole, byte by byte and 7 bytes at a time; all three must agree.
fn replay(fixture: &str, client_usage: bool) -> Replay {
    let whole = feed(fixture, client_usage, usize::MAX);
    for size in [1, 7] {
        let split = feed(fixture, client_usage, size);
        assert_eq!(split.out, whole.out, "fed {size} byte(s) at a time");
        assert_eq!(split.state, whole.state, "fed {size} byte(s) at a time");
    }
    whole
}

/// Every chunk is an OpenAI `chat.completion.chunk` of this reply; the first has the role.
fn check_chunks(r: &Replay) {
    assert!(!r.events.is_empty());
    for e in &r.events {
        assert_eq!(e["object"], "chat.completion.chunk", "{e}");
        assert_eq!(e["id"], "chatcmpl-replay");
        assert_eq!(e["model"], "claude-sonnet-4-5");
        assert_eq!(e["created"], 1_750_000_000);
        assert!(e["choices"].as_array().is_some_and(|c| c.len() <= 1), "{e}");
    }
    assert_eq!(r.events[0]["choices"][0]["delta"]["role"], "assistant");
}

/// The last chunk with a choice, and its finish reason.
fn finish_reason(r: &Replay) -> &str {
    let finishing: Vec<&Value> = r
        .events
        .iter()
        .filter(|e| !e["choices"][0]["finish_reason"].is_null())
        .collect();
    assert_eq!(finishing.len(), 1, "exactly one finishing chunk");
    finishing[0]["choices"][0]["finish_reason"]
        .as_str()
        .unwrap()
}

/// The concatenated `delta.<field>` strings.
fn concat(r: &Replay, field: &str) -> String {
    r.events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"][field].as_str())
        .collect()
}

/// The tool calls, by OpenAI index: (id, name, concatenated arguments).
fn tool_calls(r: &Replay) -> Vec<(String, String, String)> {
    let mut calls: Vec<(String, String, String)> = Vec::new();
    for e in &r.events {
        for c in e["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let k = c["index"].as_u64().unwrap() as usize;
            if k == calls.len() {
                assert_eq!(c["type"], "function", "a call starts with its type");
                calls.push(Default::default());
            }
            let call = &mut calls[k];
            if let Some(id) = c["id"].as_str() {
                call.0 = id.into();
            }
            if let Some(name) = c["function"]["name"].as_str() {
                call.1 = name.into();
            }
            call.2 += c["function"]["arguments"].as_str().unwrap_or("");
        }
    }
    calls
}

/// The final usage chunk (`choices: []`), if any.
fn usage_chunk(r: &Replay) -> Option<&Value> {
    r.events
        .iter()
        .find(|e| e["choices"].as_array().is_some_and(Vec::is_empty))
}

/// The stream finished: `[DONE]` last, judged complete.
fn check_done(r: &Replay) {
    assert!(r.out.ends_with("data: [DONE]\n\n"));
    assert_eq!(r.out.matches("[DONE]").count(), 1);
    assert_eq!(r.end, StreamEnd::Complete);
    assert!(r.state.done && !r.state.upstream_error && r.state.broken.is_none());
}

#[test]
fn basic_text_stream() {
    let r = replay(BASIC, true);
    check_chunks(&r);
    check_done(&r);
    assert_eq!(concat(&r, "content"), "Hello!");
    assert!(tool_calls(&r).is_empty());
    assert_eq!(finish_reason(&r), "stop");
    assert!(
        r.out.contains(": ping\n\n"),
        "the ping is relayed as a comment"
    );
    let usage = Usage {
        prompt_tokens: 25,
        completion_tokens: 15,
    };
    assert_eq!(r.new_usage, Some(usage));
    assert_eq!(r.state.usage, Some(usage));
    assert_eq!(r.state.events, 8);
    let u = usage_chunk(&r).expect("asked for");
    assert_eq!(
        u["usage"],
        json!({"prompt_tokens": 25, "completion_tokens": 15, "total_tokens": 40})
    );
    // Not asked for: no usage chunk, the same usage noted.
    let r = replay(BASIC, false);
    assert!(usage_chunk(&r).is_none());
    assert_eq!(r.new_usage, Some(usage));
}

#[test]
fn tool_use_stream() {
    let r = replay(TOOL_USE, true);
    check_chunks(&r);
    check_done(&r);
    assert_eq!(
        concat(&r, "content"),
        "Okay, let's check the weather for San Francisco, CA:"
    );
    let calls = tool_calls(&r);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].0, "toolu_01T1x1fJ34qAmk2tNTrN7Up6");
    assert_eq!(calls[0].1, "get_weather");
    let args: Value = serde_json::from_str(&calls[0].2).expect("arguments are whole JSON");
    assert_eq!(
        args,
        json!({"location": "San Francisco, CA", "unit": "fahrenheit"})
    );
    assert_eq!(finish_reason(&r), "tool_calls");
    assert_eq!(r.state.finish_reason.as_deref(), Some("tool_calls"));
    assert_eq!(usage_chunk(&r).unwrap()["usage"]["prompt_tokens"], 472);
    assert_eq!(usage_chunk(&r).unwrap()["usage"]["completion_tokens"], 89);
}

#[test]
fn extended_thinking_stream() {
    let r = replay(THINKING, true);
    check_chunks(&r);
    check_done(&r);
    assert_eq!(
        concat(&r, "reasoning_content"),
        "Let me solve this step by step:\n\n1. First break down 27 * 453\n2. 453 = 400 + 50 + 3\n\
         3. 27 * 400 = 10,800\n4. 27 * 50 = 1,350\n5. 27 * 3 = 81\n6. 10,800 + 1,350 + 81 = 12,231"
    );
    assert_eq!(concat(&r, "content"), "27 * 453 = 12,231");
    assert!(
        !r.out.contains("EqQBCgIYAh"),
        "the signature stays upstream"
    );
    assert_eq!(finish_reason(&r), "stop");
    // The documented example reports no usage at all: none is invented.
    assert_eq!(r.new_usage, None);
    assert!(usage_chunk(&r).is_none());
}

#[test]
fn error_event() {
    let r = replay(ERROR, true);
    assert_eq!(
        r.events,
        [
            json!({"error": {"message": "Overloaded", "type": "overloaded_error", "param": null, "code": null}})
        ]
    );
    assert!(!r.out.contains("[DONE]"));
    assert_eq!(r.end, StreamEnd::UpstreamError);
    assert!(r.state.upstream_error && !r.state.done);

    // The same error in the middle of the documented text stream.
    let cut = &BASIC[..BASIC.find("event: content_block_stop").unwrap()];
    let r = replay(&format!("{cut}{ERROR}"), true);
    assert_eq!(r.events[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(concat(&r, "content"), "Hello!");
    assert_eq!(
        r.events.last().unwrap()["error"]["type"],
        "overloaded_error"
    );
    assert!(!r.out.contains("[DONE]"));
    assert_eq!(r.end, StreamEnd::UpstreamError);
    assert_eq!(r.new_usage, None);
}

#[test]
fn sdk_recorded_tool_use_stream() {
    let r = replay(SDK_TOOL_USE, true);
    check_chunks(&r);
    check_done(&r);
    assert_eq!(
        concat(&r, "content"),
        "I'll check the current weather in Paris for you."
    );
    let calls = tool_calls(&r);
    assert_eq!(calls.len(), 1);
    assert_eq!(
        (&*calls[0].0, &*calls[0].1),
        ("toolu_01NRLabsLyVHZPKxbKvkfSMn", "get_weather")
    );
    let args: Value = serde_json::from_str(&calls[0].2).unwrap();
    assert_eq!(args, json!({"location": "Paris"}));
    assert_eq!(finish_reason(&r), "tool_calls");
    let u = &usage_chunk(&r).unwrap()["usage"];
    assert_eq!(
        (&u["prompt_tokens"], &u["completion_tokens"]),
        (&json!(377), &json!(65))
    );
    assert_eq!(u["prompt_tokens_details"]["cached_tokens"], 0);
}

#[test]
fn sdk_recorded_refusal_stream() {
    let r = replay(SDK_REFUSAL, false);
    check_chunks(&r);
    check_done(&r);
    assert_eq!(concat(&r, "content"), "");
    assert_eq!(finish_reason(&r), "content_filter");
    assert_eq!(
        r.new_usage,
        Some(Usage {
            prompt_tokens: 20,
            completion_tokens: 0
        })
    );
}

#[test]
fn documented_tool_use_answer() {
    let a = Anthropic
        .answer(MESSAGE_TOOL_USE.as_bytes(), &ctx(false))
        .expect("a usable answer");
    let v: Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["id"], "chatcmpl-replay");
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(
        choice["message"]["content"],
        "I'll check the current weather in San Francisco for you."
    );
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["id"], "toolu_01A09q90qw90lq917835lq9");
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(
        args,
        json!({"location": "San Francisco, CA", "unit": "celsius"})
    );
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(a.finish_reason.as_deref(), Some("tool_calls"));
    // The documented example has no usage: none is invented.
    assert!(v.get("usage").is_none());
    assert_eq!(a.usage, None);
}
