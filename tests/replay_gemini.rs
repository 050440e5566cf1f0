//! Replays recorded Gemini API responses (tests/fixtures/gemini, sources in its README) through
//! the Gemini translator and checks the OpenAI shape clients get.

use freerelay::adapter::gemini::{Gemini, THOUGHT_SEP};
use freerelay::adapter::{Adapter, ReplyCtx, StreamEnd, StreamTranslator, Target};
use freerelay::catalog;
use freerelay::upstream::Hints;
use freerelay::wire::openai::{ChatRequest, Usage};
use serde_json::{json, Value};

const TEXT: &str = include_str!("fixtures/gemini/text.json");
const FUNCTION_CALL: &str = include_str!("fixtures/gemini/function_call.json");
const FUNCTION_CALL_THINKING: &str = include_str!("fixtures/gemini/function_call_thinking.json");
const THINKING: &str = include_str!("fixtures/gemini/thinking.json");
const FINISH_SAFETY: &str = include_str!("fixtures/gemini/finish_safety.json");
const PROMPT_BLOCKED: &str = include_str!("fixtures/gemini/prompt_blocked.json");
const STREAM: &str = include_str!("fixtures/gemini/stream.sse");
const STREAM_FUNCTION_CALL: &str = include_str!("fixtures/gemini/stream_function_call.sse");
const ERROR_429_PAGE: &str = include_str!("fixtures/gemini/error_429_page.json");

fn ctx(client_usage: bool) -> ReplyCtx {
    ReplyCtx {
        id: "chatcmpl-replay".into(),
        created: 1_754_000_000,
        model: "gemini-2.5-flash".into(),
        client_usage,
        price: None,
        continuation: false,
        collect_text: false,
    }
}

/// The translated answer: (OpenAI body, usage, finish reason).
fn answer(fixture: &str) -> (Value, Option<Usage>, Option<String>) {
    let a = Gemini.answer(fixture.as_bytes(), &ctx(false)).unwrap();
    let body = serde_json::from_slice(&a.body).unwrap();
    (body, a.usage, a.finish_reason)
}

fn stream(fixture: &str, client_usage: bool, chunk: usize) -> (Vec<u8>, Box<dyn StreamTranslator>) {
    let mut t = Gemini.stream(ctx(client_usage));
    let mut out = Vec::new();
    for c in fixture.as_bytes().chunks(chunk) {
        t.feed(c, &mut out);
    }
    let end = t.end(None, &mut out);
    assert_eq!(end, StreamEnd::Complete);
    (out, t)
}

fn events(out: &[u8]) -> Vec<Value> {
    String::from_utf8(out.to_vec())
        .unwrap()
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

fn deltas(out: &[u8]) -> Vec<Value> {
    events(out)
        .into_iter()
        .filter_map(|e| e["choices"].get(0).map(|c| c["delta"].clone()))
        .collect()
}

#[test]
fn a_text_answer() {
    let (v, usage, finish) = answer(TEXT);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["id"], "chatcmpl-replay");
    assert_eq!(
        v["choices"][0]["message"],
        json!({"role": "assistant", "content": "Google's headquarters, also known as the Googleplex, is located in **Mountain View, California**.\n"})
    );
    assert_eq!(finish.as_deref(), Some("stop"));
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 7, "completion_tokens": 22, "total_tokens": 29})
    );
    assert_eq!(
        usage,
        Some(Usage {
            prompt_tokens: 7,
            completion_tokens: 22
        })
    );
}

#[test]
fn a_function_call_answer_finishes_with_tool_calls() {
    // Gemini says STOP; OpenAI clients only run tools on "tool_calls".
    let (v, usage, finish) = answer(FUNCTION_CALL);
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    let m = &v["choices"][0]["message"];
    assert_eq!(m["content"], Value::Null);
    let call = &m["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "find_theaters");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(
        args,
        json!({"movie": "Barbie", "location": "Mountain View, CA"})
    );
    assert!(!call["id"].as_str().unwrap().contains(THOUGHT_SEP));
    assert_eq!(usage, None, "this recording has no usageMetadata");
}

#[test]
fn a_thinking_function_call_keeps_its_signature_for_the_next_turn() {
    let (v, usage, finish) = answer(FUNCTION_CALL_THINKING);
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    let m = &v["choices"][0]["message"];
    assert!(m["reasoning_content"]
        .as_str()
        .unwrap()
        .starts_with("**Thinking Through the New Year's Eve Calculation**"));
    assert_eq!(m["content"], Value::Null);
    assert_eq!(m["tool_calls"][0]["function"]["name"], "now");
    assert_eq!(m["tool_calls"][0]["function"]["arguments"], "{}");
    assert_eq!(
        v["usage"]["completion_tokens_details"]["reasoning_tokens"],
        501
    );
    assert_eq!(
        usage,
        Some(Usage {
            prompt_tokens: 38,
            completion_tokens: 8 + 501
        })
    );

    // The client runs the tool and sends the conversation back.
    let id = m["tool_calls"][0]["id"].as_str().unwrap();
    let req = json!({
        "model": "gemini/gemini-2.5-pro",
        "messages": [
            {"role": "user", "content": "How many days until New Year's Eve?"},
            {"role": "assistant", "content": null, "tool_calls": m["tool_calls"]},
            {"role": "tool", "tool_call_id": id, "content": "{\"now\": \"2025-07-28\"}"},
        ],
    });
    let req = ChatRequest::parse(req.to_string().as_bytes()).unwrap();
    let p = catalog::provider("gemini").unwrap();
    let target = Target {
        provider: p,
        base_url: "https://generativelanguage.googleapis.com/v1beta",
        model: "gemini-2.5-pro",
        info: p.model_info("gemini-2.5-pro"),
    };
    let up = Gemini.request(&target, &req).unwrap();
    let body: Value = serde_json::from_slice(&up.body).unwrap();
    let recorded: Value = serde_json::from_str(FUNCTION_CALL_THINKING).unwrap();
    let signature = &recorded["candidates"][0]["content"]["parts"][1]["thoughtSignature"];
    let part = &body["contents"][1]["parts"][0];
    assert_eq!(part["functionCall"], json!({"name": "now", "args": {}}));
    assert_eq!(
        &part["thoughtSignature"], signature,
        "byte for byte what Gemini sent"
    );
    assert_eq!(
        body["contents"][2]["parts"][0],
        json!({"functionResponse": {"name": "now", "response": {"now": "2025-07-28"}}})
    );
}

#[test]
fn a_thinking_answer_has_reasoning_content_and_thought_tokens() {
    let (v, usage, _) = answer(THINKING);
    let m = &v["choices"][0]["message"];
    assert_eq!(m["content"], "Mountain View");
    assert!(m["reasoning_content"]
        .as_str()
        .unwrap()
        .starts_with("**Thinking About Google's Headquarters**"));
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 14, "completion_tokens": 26, "total_tokens": 40,
               "completion_tokens_details": {"reasoning_tokens": 24}})
    );
    assert_eq!(usage.unwrap().completion_tokens, 2 + 24);
}

#[test]
fn filtered_answers_say_content_filter() {
    let (v, _, finish) = answer(FINISH_SAFETY);
    assert_eq!(finish.as_deref(), Some("content_filter"));
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "Safety error incoming in 5, 4, 3, 2..."
    );
    let (v, usage, finish) = answer(PROMPT_BLOCKED);
    assert_eq!(finish.as_deref(), Some("content_filter"));
    assert_eq!(v["choices"][0]["message"]["content"], Value::Null);
    assert_eq!(usage, None);
}

#[test]
fn a_streamed_answer() {
    let (out, mut t) = stream(STREAM, true, STREAM.len());
    assert_eq!(
        deltas(&out),
        [
            json!({"role": "assistant", "content": ""}),
            json!({"content": "The"}),
            json!({"content": " capital of Wyoming"}),
            json!({"content": " is **Cheyenne**.\n"}),
            json!({}),
        ]
    );
    let ev = events(&out);
    assert_eq!(ev[4]["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        ev[5]["usage"],
        json!({"prompt_tokens": 7, "completion_tokens": 10, "total_tokens": 17})
    );
    assert!(out.ends_with(b"data: [DONE]\n\n"));
    assert_eq!(
        t.take_new_usage(),
        Some(Usage {
            prompt_tokens: 7,
            completion_tokens: 10
        })
    );
    for size in [1, 7] {
        assert_eq!(stream(STREAM, true, size).0, out, "{size}-byte chunks");
    }
    // Not asked for: no usage chunk, still recorded.
    let (out, mut t) = stream(STREAM, false, STREAM.len());
    assert!(events(&out).iter().all(|e| e.get("usage").is_none()));
    assert!(t.take_new_usage().is_some());
}

#[test]
fn a_streamed_thinking_function_call() {
    let (out, t) = stream(STREAM_FUNCTION_CALL, true, 7);
    let d = deltas(&out);
    assert_eq!(d[0], json!({"role": "assistant", "content": ""}));
    assert!(d[1]["reasoning_content"]
        .as_str()
        .unwrap()
        .starts_with("**Calculating the Days**"));
    assert!(d[2]["reasoning_content"]
        .as_str()
        .unwrap()
        .starts_with("**Determining the Approach**"));
    let call = &d[3]["tool_calls"][0];
    assert_eq!(call["index"], 0);
    assert_eq!(call["function"], json!({"name": "now", "arguments": "{}"}));
    assert!(call["id"].as_str().unwrap().contains(THOUGHT_SEP));
    assert_eq!(d[4], json!({}));
    let ev = events(&out);
    assert_eq!(ev[4]["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        ev[5]["usage"],
        json!({"prompt_tokens": 38, "completion_tokens": 174, "total_tokens": 212,
               "completion_tokens_details": {"reasoning_tokens": 168}})
    );
    assert_eq!(t.state().finish_reason.as_deref(), Some("tool_calls"));
    assert_eq!(stream(STREAM_FUNCTION_CALL, true, 1).0, out);
}

#[test]
fn a_per_day_quota_cools_until_midnight_pacific_not_for_its_retry_delay() {
    let page: Value = serde_json::from_str(ERROR_429_PAGE).unwrap();
    let body = serde_json::to_vec(&page["response"]).unwrap();
    assert_eq!(
        Gemini.error_detail(&body).as_deref(),
        Some("You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits. (RESOURCE_EXHAUSTED)")
    );
    let f = Gemini.judge(
        "gemini",
        "AIza-secret",
        429,
        Hints::default(),
        &body,
        10_000,
    );
    // The recorded 429 is GenerateRequestsPerDayPerProjectPerModel-FreeTier with retryDelay
    // 22s: waiting 22 s would only meet the same spent daily cap again (a retry storm). The key
    // cools until Gemini's day resets, midnight Pacific (08:00 UTC on 1970-01-01).
    assert!(f.retryable);
    assert_eq!(f.cause, freerelay::upstream::Cause::DailyCap);
    assert_eq!(f.cooldown.unwrap().until_ms, 28_800_000);
    assert_eq!((f.error.status, f.error.retry_after), (429, Some(28_790)));
}
