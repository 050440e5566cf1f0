//! The mock provider, seen from the wire: JSON shape, SSE framing and order, include_usage, auth,
//! the control API and every scripted behaviour.

use std::time::{Duration, Instant};

use bytes::Bytes;
use freerelay_testkit::client::{sse_data, timed_frames, Conn};
use freerelay_testkit::{Behaviour, MockConfig, MockHandle, MockProvider};
use http::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &str = "sk-mock-test";
const CHAT: &str = "/openai/v1/chat/completions";

async fn mock() -> MockHandle {
    MockProvider::start(MockConfig::new("groq", KEY))
        .await
        .expect("mock starts")
}

async fn conn(m: &MockHandle) -> Conn {
    Conn::connect(m.addr()).await.expect("connects")
}

fn auth() -> String {
    format!("Bearer {KEY}")
}

async fn post_chat(m: &MockHandle, path: &str, body: Value) -> freerelay_testkit::client::Fetched {
    let a = auth();
    conn(m)
        .await
        .fetch(
            Method::POST,
            path,
            &[("authorization", &a), ("content-type", "application/json")],
            Bytes::from(body.to_string()),
        )
        .await
        .expect("request completes")
}

fn simple(content: &str) -> Value {
    json!({"model": "llama-3.1-8b-instant", "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": content}
    ]})
}

fn streaming(content: &str, include_usage: bool) -> Value {
    let mut b = simple(content);
    b["stream"] = json!(true);
    if include_usage {
        b["stream_options"] = json!({"include_usage": true});
    }
    b
}

fn events(body: &Bytes) -> Vec<String> {
    sse_data(std::str::from_utf8(body).expect("utf-8"))
}

/// Posts a streaming chat of `text` on a fresh connection and collects its body frames with
/// their arrival times, for at most `limit`.
async fn timed_stream(
    m: &MockHandle,
    text: &str,
    limit: Duration,
) -> (u16, Vec<(Duration, Bytes)>, Result<(), String>) {
    let a = auth();
    let mut c = conn(m).await;
    let start = Instant::now();
    let resp = c
        .send(
            Method::POST,
            CHAT,
            &[("authorization", &a)],
            Bytes::from(streaming(text, false).to_string()),
        )
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let (frames, end) = timed_frames(resp.into_body(), start, limit).await;
    (status, frames, end)
}

/// The SSE data payloads carried by a list of frames.
fn frame_events(frames: &[(Duration, Bytes)]) -> Vec<String> {
    let all: Vec<u8> = frames.iter().flat_map(|(_, b)| b.to_vec()).collect();
    events(&Bytes::from(all))
}

#[tokio::test]
async fn json_completion_has_openai_shape() {
    let m = mock().await;
    let r = post_chat(&m, CHAT, simple("hello big world")).await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("application/json"));
    let v = r.json();
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(v["model"], "llama-3.1-8b-instant");
    assert!(v["system_fingerprint"].is_string());
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], "mock(groq): hello big world");
    assert!(choice["message"]["refusal"].is_null());
    assert!(choice["message"].get("tool_calls").is_none());
    assert!(choice["logprobs"].is_null());
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], 6);
    assert_eq!(v["usage"]["completion_tokens"], 4);
    assert_eq!(v["usage"]["total_tokens"], 10);
}

#[tokio::test]
async fn array_content_parts_are_joined() {
    let m = mock().await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "first part"}, {"type": "text", "text": "second"}
    ]}]});
    let v = post_chat(&m, "/v1/chat/completions", body).await.json();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "mock(groq): first part second"
    );
}

#[tokio::test]
async fn any_prefix_is_served() {
    let m = mock().await;
    for path in [
        "/openai/v1/chat/completions",
        "/v1/chat/completions",
        "/api/v1/chat/completions",
        "/v1beta/openai/chat/completions",
    ] {
        assert_eq!(
            post_chat(&m, path, simple("hi")).await.status,
            200,
            "{path}"
        );
    }
    let a = auth();
    let r = conn(&m)
        .await
        .fetch(
            Method::GET,
            "/api/v1/models",
            &[("authorization", &a)],
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["object"], "model");
    assert!(v["data"][0]["id"].is_string());
    assert_eq!(v["data"][0]["owned_by"], "groq");
}

#[tokio::test]
async fn wrong_or_missing_key_is_401_openai_shaped() {
    let m = mock().await;
    for headers in [
        vec![("authorization", "Bearer wrong")],
        vec![],
        vec![("authorization", KEY)],
    ] {
        let r = conn(&m)
            .await
            .fetch(
                Method::POST,
                CHAT,
                &headers,
                Bytes::from(simple("hi").to_string()),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 401);
        let e = &r.json()["error"];
        assert_eq!(e["type"], "invalid_request_error");
        assert_eq!(e["code"], "invalid_api_key");
        assert!(e["param"].is_null());
        assert!(e["message"].is_string());
    }
    let r = conn(&m)
        .await
        .fetch(Method::GET, "/v1/models", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(r.status, 401);
}

#[tokio::test]
async fn bad_body_is_400_and_unknown_path_404() {
    let m = mock().await;
    let a = auth();
    let mut c = conn(&m).await;
    let r = c
        .fetch(
            Method::POST,
            CHAT,
            &[("authorization", &a)],
            Bytes::from_static(b"{not json"),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    let r = c
        .fetch(
            Method::GET,
            "/v1/other",
            &[("authorization", &a)],
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    let r = c
        .fetch(Method::GET, CHAT, &[("authorization", &a)], Bytes::new())
        .await
        .unwrap();
    assert_eq!(r.status, 405);
}

#[tokio::test]
async fn stream_framing_and_order() {
    let m = mock().await;
    let r = post_chat(&m, CHAT, streaming("one two three", false)).await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .contains("text/event-stream"));
    let text = std::str::from_utf8(&r.body).unwrap();
    assert!(text.starts_with("data: {"));
    assert!(text.ends_with("data: [DONE]\n\n"));
    let ev = events(&r.body);
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    // role chunk, 4 words ("mock(groq):", " one", " two", " three"), finish chunk
    assert_eq!(chunks.len(), 6);
    let id = chunks[0]["id"].as_str().unwrap();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], id);
        assert_eq!(c["model"], "llama-3.1-8b-instant");
        assert!(c.get("usage").is_none(), "no usage without include_usage");
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": "", "refusal": null})
    );
    assert!(chunks[0]["choices"][0]["finish_reason"].is_null());
    let content: String = chunks[1..5]
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(content, "mock(groq): one two three");
    assert_eq!(chunks[5]["choices"][0]["delta"], json!({}));
    assert_eq!(chunks[5]["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn stream_include_usage() {
    let m = mock().await;
    let r = post_chat(&m, CHAT, streaming("one two", true)).await;
    let ev = events(&r.body);
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let (last, rest) = chunks.split_last().unwrap();
    for c in rest {
        assert!(c["usage"].is_null() && c.get("usage").is_some());
        assert_eq!(c["choices"].as_array().unwrap().len(), 1);
    }
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["prompt_tokens"], 5);
    assert_eq!(last["usage"]["completion_tokens"], 3);
    assert_eq!(last["usage"]["total_tokens"], 8);
    assert_eq!(rest.last().unwrap()["choices"][0]["finish_reason"], "stop");
}

fn weather_request(stream: bool) -> Value {
    json!({"model": "m", "stream": stream, "messages": [
        {"role": "user", "content": "What's the weather in Oslo?"}
    ], "tools": [{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]})
}

#[tokio::test]
async fn tool_call_json() {
    let m = mock().await;
    let v = post_chat(&m, CHAT, weather_request(false)).await.json();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert!(choice["message"]["content"].is_null());
    let call = &choice["message"]["tool_calls"][0];
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Oslo"}));
    // Without the word "weather", tools do not trigger a call.
    let mut plain = weather_request(false);
    plain["messages"][0]["content"] = json!("weathering heights");
    let v = post_chat(&m, CHAT, plain).await.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn tool_call_stream() {
    let m = mock().await;
    let r = post_chat(&m, CHAT, weather_request(true)).await;
    let ev = events(&r.body);
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let first = &chunks[0]["choices"][0]["delta"];
    assert_eq!(first["role"], "assistant");
    let tc = &first["tool_calls"][0];
    assert_eq!(tc["index"], 0);
    assert!(tc["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(tc["type"], "function");
    assert_eq!(tc["function"]["name"], "get_weather");
    let mut args = String::new();
    let mut pieces = 0;
    for c in &chunks[1..chunks.len() - 1] {
        let tc = &c["choices"][0]["delta"]["tool_calls"][0];
        assert_eq!(tc["index"], 0);
        args.push_str(tc["function"]["arguments"].as_str().unwrap());
        pieces += 1;
    }
    assert!(pieces >= 2, "arguments split over chunks");
    assert_eq!(
        serde_json::from_str::<Value>(&args).unwrap(),
        json!({"city": "Oslo"})
    );
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "tool_calls"
    );
}

#[tokio::test]
async fn requests_are_recorded_and_reset() {
    let m = mock().await;
    let mut body = simple("record me");
    body["unknown_field"] = json!({"kept": true});
    post_chat(&m, "/v1/chat/completions", body.clone()).await;
    let mut c = conn(&m).await;
    let r = c
        .fetch(Method::GET, "/_mock/requests", &[], Bytes::new())
        .await
        .unwrap();
    let list = r.json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["method"], "POST");
    assert_eq!(list[0]["path"], "/v1/chat/completions");
    assert_eq!(list[0]["headers"]["authorization"], auth());
    assert_eq!(list[0]["body"], body);
    assert_eq!(m.requests().len(), 1);
    c.fetch(Method::POST, "/_mock/reset", &[], Bytes::new())
        .await
        .unwrap();
    assert!(m.requests().is_empty());
}

async fn script(m: &MockHandle, script: Value) {
    let r = conn(m)
        .await
        .fetch(
            Method::POST,
            "/_mock/script",
            &[("content-type", "application/json")],
            Bytes::from(script.to_string()),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

#[tokio::test]
async fn all_requests_include_models_and_unknown_paths() {
    let m = mock().await;
    let a = auth();
    let mut c = conn(&m).await;
    c.fetch(
        Method::GET,
        "/v1/models",
        &[("authorization", &a)],
        Bytes::new(),
    )
    .await
    .unwrap();
    c.fetch(Method::GET, "/v1/elsewhere", &[], Bytes::new())
        .await
        .unwrap();
    post_chat(&m, CHAT, simple("x")).await;
    assert_eq!(m.requests().len(), 1);
    let all = m.all_requests();
    let kinds: Vec<&str> = all.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(kinds, ["models", "other", "chat"]);
    let r = c
        .fetch(Method::GET, "/_mock/requests?all=1", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(r.json().as_array().unwrap().len(), 3);
    let r = c
        .fetch(Method::GET, "/_mock/requests", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(r.json()[0]["kind"], "chat");
}

#[tokio::test]
async fn script_is_fifo_then_default() {
    let m = mock().await;
    script(
        &m,
        json!([{"kind": "status", "status": 500}, {"kind": "ok", "content": "scripted"}]),
    )
    .await;
    assert_eq!(post_chat(&m, CHAT, simple("a")).await.status, 500);
    let v = post_chat(&m, CHAT, simple("a")).await.json();
    assert_eq!(v["choices"][0]["message"]["content"], "scripted");
    let v = post_chat(&m, CHAT, simple("a")).await.json();
    assert_eq!(v["choices"][0]["message"]["content"], "mock(groq): a");
    let r = conn(&m)
        .await
        .fetch(
            Method::POST,
            "/_mock/script",
            &[],
            Bytes::from_static(br#"[{"kind":"bogus"}]"#),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn status_429_carries_retry_after_and_ratelimit_headers() {
    let m = mock().await;
    script(
        &m,
        json!([{"kind": "status", "status": 429, "retry_after": "7"}]),
    )
    .await;
    let r = post_chat(&m, CHAT, simple("a")).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("7"));
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
    assert_eq!(r.header("x-ratelimit-reset-requests"), Some("7s"));
    assert!(r.header("x-ratelimit-limit-requests").is_some());
    let e = &r.json()["error"];
    assert_eq!(e["code"], "rate_limit_exceeded");
    assert!(e["message"].is_string());
    assert!(e.get("param").is_some());

    let custom = json!({"error": {"message": "custom", "type": "x", "param": null, "code": "y"}});
    script(
        &m,
        json!([{"kind": "status", "status": 422, "body": custom}]),
    )
    .await;
    let r = post_chat(&m, CHAT, simple("a")).await;
    assert_eq!(r.status, 422);
    assert_eq!(r.json(), custom);
}

#[tokio::test]
async fn latency_delays_headers() {
    let m = mock().await;
    script(&m, json!([{"kind": "ok", "latency_ms": 300}])).await;
    let start = Instant::now();
    assert_eq!(post_chat(&m, CHAT, simple("a")).await.status, 200);
    assert!(start.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn chunk_delay_spaces_out_stream_chunks() {
    let m = mock().await;
    script(&m, json!([{"kind": "ok", "chunk_delay_ms": 100}])).await;
    let (status, frames, end) =
        timed_stream(&m, "one two three four five", Duration::from_secs(10)).await;
    assert_eq!(status, 200);
    assert!(end.is_ok());
    // role + 6 words + finish + [DONE] = 9 events, 8 gaps of 100 ms
    assert_eq!(frame_events(&frames).len(), 9);
    let first = frames.first().unwrap().0;
    let last = frames.last().unwrap().0;
    // Lower bounds only, which load cannot break: 8 gaps of 100 ms lie between first and last.
    assert!(last >= Duration::from_millis(750), "last chunk at {last:?}");
    assert!(
        last - first >= Duration::from_millis(750),
        "first chunk at {first:?}, last at {last:?}: the first was held back"
    );
}

#[tokio::test]
async fn stall_sends_n_chunks_then_hangs() {
    let m = mock().await;
    script(&m, json!([{"kind": "stall", "after_chunks": 2}])).await;
    // A generous wait: what is sent arrives in milliseconds, and the stall never ends.
    let (status, frames, end) = timed_stream(&m, "one two three", Duration::from_secs(2)).await;
    assert_eq!(status, 200);
    assert_eq!(end, Err("timed out".to_string()));
    let ev = frame_events(&frames);
    assert_eq!(ev.len(), 2);
    assert!(!ev.iter().any(|e| e == "[DONE]"));
}

#[tokio::test]
async fn drop_sends_n_chunks_then_breaks_the_connection() {
    let m = mock().await;
    script(&m, json!([{"kind": "drop", "after_chunks": 3}])).await;
    let (status, frames, end) = timed_stream(&m, "one two three", Duration::from_secs(5)).await;
    assert_eq!(status, 200);
    assert!(end.is_err(), "the body must end in an error, not cleanly");
    assert_ne!(end, Err("timed out".to_string()));
    let ev = frame_events(&frames);
    assert_eq!(ev.len(), 3);
    assert!(!ev.iter().any(|e| e == "[DONE]"));
}

/// Posts `body` on a fresh connection; the response with its body still streaming.
async fn send(m: &MockHandle, body: Value) -> http::Response<hyper::body::Incoming> {
    let a = auth();
    conn(m)
        .await
        .send(
            Method::POST,
            CHAT,
            &[("authorization", &a)],
            Bytes::from(body.to_string()),
        )
        .await
        .expect("response head")
}

/// All the bytes of a list of frames.
fn joined(frames: &[(Duration, Bytes)]) -> String {
    let all: Vec<u8> = frames.iter().flat_map(|(_, b)| b.to_vec()).collect();
    String::from_utf8(all).expect("utf-8")
}

/// `text` with every reply id and `created` time made equal, to compare two answers' bytes.
fn normalised(text: &[u8]) -> String {
    let text = String::from_utf8_lossy(text);
    let mut out = String::new();
    let mut rest = &text[..];
    loop {
        let id = rest.find("chatcmpl-mock");
        let created = rest.find("\"created\":");
        let (at, skip, with) = match (id, created) {
            (None, None) => break,
            (Some(i), c) if c.is_none_or(|c| i < c) => (i, "chatcmpl-mock".len(), "chatcmpl-mockN"),
            (_, Some(c)) => (c, "\"created\":".len(), "\"created\":N"),
            _ => unreachable!(),
        };
        out.push_str(&rest[..at]);
        out.push_str(with);
        rest = rest[at + skip..].trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    out
}

/// The complete stream `body` gets when nothing goes wrong.
async fn whole_stream(m: &MockHandle, body: Value) -> String {
    let r = post_chat(m, CHAT, body).await;
    assert_eq!(r.status, 200);
    String::from_utf8(r.body.to_vec()).unwrap()
}

#[tokio::test]
async fn drop_mid_event_cuts_inside_a_data_line() {
    let m = mock().await;
    let whole = whole_stream(&m, streaming("one two three", false)).await;
    let whole_events: Vec<&str> = whole.split_inclusive("\n\n").collect();
    script(
        &m,
        json!([{"kind": "drop", "after_chunks": 2, "mid_event": true}]),
    )
    .await;
    let resp = send(&m, streaming("one two three", false)).await;
    assert_eq!(resp.status(), 200);
    let (frames, end) =
        timed_frames(resp.into_body(), Instant::now(), Duration::from_secs(5)).await;
    assert!(end.is_err(), "the body must end in an error, not cleanly");
    assert_ne!(end, Err("timed out".to_string()));
    let got = joined(&frames);
    // Two whole events, then the first half of the third: inside its JSON, no newline.
    let head_len: usize = whole_events[..2].iter().map(|e| e.len()).sum();
    let third = whole_events[2];
    assert_eq!(got.len(), head_len + third.len() / 2, "{got:?}");
    assert_eq!(
        normalised(got.as_bytes()),
        normalised(&whole.as_bytes()[..head_len + third.len() / 2])
    );
    let partial = &got[head_len..];
    assert!(
        partial.starts_with("data: {") && !partial.contains('\n'),
        "{partial:?}"
    );
    assert!(serde_json::from_str::<Value>(&partial["data: ".len()..]).is_err());
    assert_eq!(frame_events(&frames).len(), 3, "two events and a fragment");
}

#[tokio::test]
async fn drop_before_done_sends_finish_and_usage_chunks() {
    let m = mock().await;
    script(&m, json!([{"kind": "drop", "before_done": true}])).await;
    let resp = send(&m, streaming("one two", true)).await;
    let (frames, end) =
        timed_frames(resp.into_body(), Instant::now(), Duration::from_secs(5)).await;
    assert!(
        end.is_err() && end != Err("timed out".to_string()),
        "{end:?}"
    );
    let got = joined(&frames);
    assert!(got.ends_with("\n\n"), "every event is whole: {got:?}");
    let ev = frame_events(&frames);
    assert!(!ev.iter().any(|e| e == "[DONE]"));
    let chunks: Vec<Value> = ev
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let (usage, rest) = chunks.split_last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["total_tokens"], 8);
    assert_eq!(rest.last().unwrap()["choices"][0]["finish_reason"], "stop");

    // With mid_event the cut falls inside `data: [DONE]`.
    script(
        &m,
        json!([{"kind": "drop", "before_done": true, "mid_event": true}]),
    )
    .await;
    let resp = send(&m, streaming("one two", false)).await;
    let (frames, end) =
        timed_frames(resp.into_body(), Instant::now(), Duration::from_secs(5)).await;
    assert!(end.is_err());
    assert!(
        joined(&frames).ends_with("\n\ndata: ["),
        "{}",
        joined(&frames)
    );
}

#[tokio::test]
async fn drop_after_bytes_truncates_a_json_answer_under_its_content_length() {
    let m = mock().await;
    let whole = post_chat(&m, CHAT, simple("one two three")).await;
    let whole_len = whole.body.len();
    for (after_bytes, want) in [(0, 0), (10, 10), (100_000, whole_len - 1)] {
        script(&m, json!([{"kind": "drop", "after_bytes": after_bytes}])).await;
        let resp = send(&m, simple("one two three")).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-length"].to_str().unwrap(),
            whole_len.to_string(),
            "the head announces the whole answer"
        );
        assert_eq!(resp.headers()["content-type"], "application/json");
        let (frames, end) =
            timed_frames(resp.into_body(), Instant::now(), Duration::from_secs(5)).await;
        assert!(
            end.is_err() && end != Err("timed out".to_string()),
            "{end:?}"
        );
        let got = joined(&frames);
        assert_eq!(got.len(), want, "after_bytes {after_bytes}");
        assert_eq!(normalised(got.as_bytes()), normalised(&whole.body[..want]));
    }
    // Without after_bytes: half the JSON (after_chunks > 0) or nothing, as before.
    script(&m, json!([{"kind": "drop", "after_chunks": 1}])).await;
    let resp = send(&m, simple("one two three")).await;
    let (frames, end) =
        timed_frames(resp.into_body(), Instant::now(), Duration::from_secs(5)).await;
    assert!(end.is_err());
    assert_eq!(joined(&frames).len(), whole_len / 2);
}

#[tokio::test]
async fn after_bytes_cuts_a_stream_anywhere() {
    let m = mock().await;
    let whole = whole_stream(&m, streaming("one two", false)).await;
    script(&m, json!([{"kind": "drop", "after_bytes": 25}])).await;
    let resp = send(&m, streaming("one two", false)).await;
    let (frames, end) =
        timed_frames(resp.into_body(), Instant::now(), Duration::from_secs(5)).await;
    assert!(end.is_err());
    assert_eq!(
        normalised(joined(&frames).as_bytes()),
        normalised(&whole.as_bytes()[..25])
    );
}

#[tokio::test]
async fn stall_mid_event_hangs_inside_an_event() {
    let m = mock().await;
    script(
        &m,
        json!([{"kind": "stall", "after_chunks": 1, "mid_event": true}]),
    )
    .await;
    let resp = send(&m, streaming("one two three", false)).await;
    // A generous wait: what is sent arrives in milliseconds, and the stall never ends.
    let (frames, end) =
        timed_frames(resp.into_body(), Instant::now(), Duration::from_secs(2)).await;
    assert_eq!(end, Err("timed out".to_string()));
    let got = joined(&frames);
    let (first, partial) = got.split_once("\n\n").unwrap();
    assert!(first.starts_with("data: {"));
    assert!(
        partial.starts_with("data: {") && !partial.contains('\n'),
        "{partial:?}"
    );
}

#[tokio::test]
async fn omit_done_ends_the_stream_cleanly_without_done() {
    let m = mock().await;
    script(&m, json!([{"kind": "ok", "omit_done": true}])).await;
    let resp = send(&m, streaming("one two", true)).await;
    let (frames, end) =
        timed_frames(resp.into_body(), Instant::now(), Duration::from_secs(5)).await;
    assert_eq!(end, Ok(()));
    let ev = frame_events(&frames);
    assert!(!ev.iter().any(|e| e == "[DONE]"));
    let last: Value = serde_json::from_str(ev.last().unwrap()).unwrap();
    assert_eq!(last["choices"], json!([]), "the usage chunk is still sent");
}

/// Reads frames until `n` SSE events have arrived (5 s at most).
async fn read_events(body: &mut hyper::body::Incoming, n: usize) -> Vec<String> {
    use http_body_util::BodyExt;
    let mut text = String::new();
    loop {
        let ev = events(&Bytes::from(text.clone()));
        if ev.len() >= n && text.ends_with("\n\n") {
            return ev;
        }
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("events arrive")
            .expect("body goes on")
            .expect("no error");
        if let Ok(data) = frame.into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
        }
    }
}

async fn wait_paused(m: &MockHandle, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while m.paused() != n {
        assert!(
            Instant::now() < deadline,
            "paused: {} (want {n})",
            m.paused()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn pause_holds_a_stream_until_released() {
    let m = mock().await;
    let whole = whole_stream(&m, streaming("one two three", false)).await;
    script(&m, json!([{"kind": "ok", "pause_after_chunks": 2}])).await;
    let mut body = send(&m, streaming("one two three", false))
        .await
        .into_body();
    let first = read_events(&mut body, 2).await;
    assert_eq!(first.len(), 2, "exactly the events before the pause");
    wait_paused(&m, 1).await;
    // Nothing more comes while paused.
    let more = tokio::time::timeout(Duration::from_millis(200), {
        use http_body_util::BodyExt;
        body.frame()
    })
    .await;
    assert!(more.is_err(), "a frame arrived during the pause");
    m.release(1);
    let (frames, end) = timed_frames(body, Instant::now(), Duration::from_secs(5)).await;
    assert_eq!(end, Ok(()));
    assert_eq!(m.paused(), 0);
    let all: Vec<String> = first.into_iter().chain(frame_events(&frames)).collect();
    assert_eq!(all.len(), events(&Bytes::from(whole)).len());
    assert_eq!(all.last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn release_before_the_pause_is_kept_and_reset_forgets_it() {
    let m = mock().await;
    let r = conn(&m)
        .await
        .fetch(
            Method::POST,
            "/_mock/release",
            &[],
            Bytes::from_static(br#"{"count": 1}"#),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"released": 1}));
    script(&m, json!([{"kind": "ok", "pause_after_chunks": 1}])).await;
    let r = post_chat(&m, CHAT, streaming("a", false)).await;
    assert!(std::str::from_utf8(&r.body)
        .unwrap()
        .ends_with("data: [DONE]\n\n"));

    // A release left over from one test does not leak into the next.
    m.release(1);
    m.reset();
    script(&m, json!([{"kind": "ok", "pause_after_chunks": 0}])).await;
    let mut body = send(&m, streaming("a", false)).await.into_body();
    wait_paused(&m, 1).await;
    let r = conn(&m)
        .await
        .fetch(Method::GET, "/_mock/paused", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(r.json(), json!({"paused": 1}));
    let r = conn(&m)
        .await
        .fetch(Method::POST, "/_mock/release", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(r.json(), json!({"released": 1}));
    // role, "mock(groq):", " a", finish, [DONE]
    assert_eq!(read_events(&mut body, 5).await.last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn a_paused_answer_whose_client_leaves_stops_waiting() {
    let m = mock().await;
    script(&m, json!([{"kind": "ok", "pause_after_chunks": 1}])).await;
    let mut body = send(&m, streaming("one two", false)).await.into_body();
    read_events(&mut body, 1).await;
    wait_paused(&m, 1).await;
    drop(body);
    wait_paused(&m, 0).await;
    // Nothing is left waiting: the next answer comes whole.
    assert_eq!(post_chat(&m, CHAT, simple("a")).await.status, 200);
}

#[tokio::test]
async fn pause_holds_a_json_answer_after_its_head() {
    let m = mock().await;
    let whole = post_chat(&m, CHAT, simple("one two")).await.body;
    script(&m, json!([{"kind": "ok", "pause_after_chunks": 1}])).await;
    let resp = send(&m, simple("one two")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-length"].to_str().unwrap(),
        whole.len().to_string()
    );
    let mut body = resp.into_body();
    let first = {
        use http_body_util::BodyExt;
        tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .into_data()
            .unwrap()
    };
    assert_eq!(normalised(&first), normalised(&whole[..whole.len() / 2]));
    wait_paused(&m, 1).await;
    m.release(1);
    let (frames, end) = timed_frames(body, Instant::now(), Duration::from_secs(5)).await;
    assert_eq!(end, Ok(()));
    let rest: Vec<u8> = frames.iter().flat_map(|(_, b)| b.to_vec()).collect();
    assert_eq!(normalised(&rest), normalised(&whole[whole.len() / 2..]));
}

#[tokio::test]
async fn stream_options_without_stream_is_400_as_at_openai() {
    let m = mock().await;
    let mut body = simple("a");
    body["stream_options"] = json!({"include_usage": true});
    let r = post_chat(&m, CHAT, body).await;
    assert_eq!(r.status, 400);
    let e = &r.json()["error"];
    assert_eq!(e["param"], "stream_options");
    assert_eq!(e["type"], "invalid_request_error");
    assert_eq!(
        e["message"],
        "The 'stream_options' parameter is only allowed when 'stream' is enabled."
    );
    // Recorded all the same: tests can see what the gateway sent.
    assert_eq!(m.requests().len(), 1);
}

#[tokio::test]
async fn close_answers_nothing() {
    let m = mock().await;
    script(&m, json!([{"kind": "close"}])).await;
    // Raw TCP: the connection must end with no response bytes at all.
    let mut s = tokio::net::TcpStream::connect(m.addr()).await.unwrap();
    let body = simple("a").to_string();
    let req = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("connection closes")
        .unwrap_or(0);
    assert_eq!(n, 0, "got a response: {}", String::from_utf8_lossy(&buf));
    // The next request gets the default reply.
    assert_eq!(post_chat(&m, CHAT, simple("a")).await.status, 200);
}

#[tokio::test]
async fn keep_alive_serves_many_requests_on_one_connection() {
    let m = mock().await;
    let a = auth();
    let mut c = conn(&m).await;
    for i in 0..50 {
        let r = c
            .fetch(
                Method::POST,
                CHAT,
                &[("authorization", &a)],
                Bytes::from(simple(&format!("n{i}")).to_string()),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    assert!(c.is_open());
}

#[tokio::test]
async fn fixed_mode_answers_without_recording() {
    let mut cfg = MockConfig::new("bench", KEY);
    cfg.fixed = true;
    cfg.record = false;
    let m = MockProvider::start(cfg).await.unwrap();
    let v = post_chat(&m, CHAT, simple("anything")).await.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "mock(bench): fixed");
    // Streaming still works in fixed mode.
    let r = post_chat(&m, CHAT, streaming("x", false)).await;
    assert!(r
        .header("content-type")
        .unwrap()
        .contains("text/event-stream"));
    assert!(m.requests().is_empty());
}

#[tokio::test]
async fn in_process_script_api() {
    let m = mock().await;
    m.push_script([Behaviour::rate_limited(3), Behaviour::status(503)]);
    assert_eq!(post_chat(&m, CHAT, simple("a")).await.status, 429);
    assert_eq!(post_chat(&m, CHAT, simple("a")).await.status, 503);
    assert_eq!(post_chat(&m, CHAT, simple("a")).await.status, 200);
    assert!(m.url().starts_with("http://127.0.0.1:"));
}

#[tokio::test]
async fn load_generator_measures_the_mock() {
    use freerelay_testkit::client::Target;
    use freerelay_testkit::load::{default_body, run, LoadConfig};
    let m = mock().await;
    let target = Target::parse(&format!("{}/v1/chat/completions", m.url()))
        .await
        .unwrap();
    let report = run(LoadConfig {
        target,
        key: KEY.into(),
        concurrency: 4,
        duration: Duration::from_millis(500),
        warmup: Duration::from_millis(100),
        body: default_body(false),
        request_timeout: Duration::from_secs(5),
        headers: vec![],
    })
    .await;
    assert_eq!(report.errors, 0);
    assert!(report.requests > 10, "{report:?}");
    assert!(report.p50_us <= report.p99_us && report.p99_us <= report.max_us);
    // Bad key: every request is an error.
    let target = Target::parse(&format!("{}/v1", m.url())).await.unwrap();
    let mut t = target.clone();
    t.path = "/v1/chat/completions".into();
    let report = run(LoadConfig {
        target: t,
        key: "wrong".into(),
        concurrency: 1,
        duration: Duration::from_millis(200),
        warmup: Duration::ZERO,
        body: default_body(false),
        request_timeout: Duration::from_secs(5),
        headers: vec![],
    })
    .await;
    assert_eq!(report.requests, 0);
    assert!(report.errors > 0);
    // A native endpoint with the provider's own key header (a direct Anthropic baseline).
    let mut t = target.clone();
    t.path = "/v1/messages".into();
    let report = run(LoadConfig {
        target: t,
        key: String::new(),
        concurrency: 1,
        duration: Duration::from_millis(200),
        warmup: Duration::ZERO,
        body: bytes::Bytes::from_static(
            br#"{"model":"claude-haiku-4-5","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#,
        ),
        request_timeout: Duration::from_secs(5),
        headers: vec![
            ("x-api-key".into(), KEY.into()),
            ("anthropic-version".into(), "2023-06-01".into()),
        ],
    })
    .await;
    assert_eq!(report.errors, 0, "{report:?}");
    assert!(report.requests > 0);
}

#[tokio::test]
async fn load_generator_refuses_non_loopback() {
    use freerelay_testkit::client::Target;
    let err = Target::parse("http://192.0.2.1:80/v1").await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
}

async fn control(m: &MockHandle, method: Method, path: &str, body: Value) -> (u16, Value) {
    let r = conn(m)
        .await
        .fetch(
            method,
            path,
            &[("content-type", "application/json")],
            Bytes::from(body.to_string()),
        )
        .await
        .unwrap();
    (r.status.as_u16(), r.json())
}

fn for_model(model: &str, content: &str) -> Value {
    let mut b = simple(content);
    b["model"] = json!(model);
    b
}

#[tokio::test]
async fn rules_apply_per_model_and_text_before_the_script() {
    let m = mock().await;
    let (status, v) = control(
        &m,
        Method::POST,
        "/_mock/rules",
        json!([
            {"model": "bad-model", "behaviour": {"kind": "status", "status": 500}},
            {"contains": "FLAKY", "times": 2, "behaviour": {"kind": "status", "status": 503}}
        ]),
    )
    .await;
    assert_eq!((status, v), (200, json!({"rules": 2})));
    script(&m, json!([{"kind": "ok", "content": "scripted"}])).await;

    // The standing rule answers every request for its model; the script is left alone.
    for _ in 0..3 {
        assert_eq!(
            post_chat(&m, CHAT, for_model("bad-model", "a"))
                .await
                .status,
            500
        );
    }
    // Text rules count down, then the script and the default answer take over.
    assert_eq!(post_chat(&m, CHAT, simple("FLAKY one")).await.status, 503);
    let (_, left) = control(&m, Method::GET, "/_mock/rules", json!(null)).await;
    assert_eq!(left[1]["times"], 1, "{left}");
    assert_eq!(post_chat(&m, CHAT, simple("FLAKY two")).await.status, 503);
    let v = post_chat(&m, CHAT, simple("FLAKY three")).await.json();
    assert_eq!(v["choices"][0]["message"]["content"], "scripted");
    let v = post_chat(&m, CHAT, simple("fine")).await.json();
    assert_eq!(v["choices"][0]["message"]["content"], "mock(groq): fine");
    assert_eq!(m.rules().len(), 1);

    // Replaced at run time (a status switch), and cleared by a reset.
    control(
        &m,
        Method::POST,
        "/_mock/rules",
        json!({"model": "bad-model", "behaviour": {"kind": "status", "status": 429}}),
    )
    .await;
    assert_eq!(
        post_chat(&m, CHAT, for_model("bad-model", "a"))
            .await
            .status,
        429
    );
    m.reset();
    assert!(m.rules().is_empty());
    assert_eq!(
        post_chat(&m, CHAT, for_model("bad-model", "a"))
            .await
            .status,
        200
    );

    let (status, _) = control(
        &m,
        Method::POST,
        "/_mock/rules",
        json!([{"model": "x", "behaviour": {"kind": "bogus"}}]),
    )
    .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn rules_match_the_gemini_model_in_the_path() {
    let m = MockProvider::start(MockConfig::new("gemini", KEY))
        .await
        .unwrap();
    m.set_rules(
        freerelay_testkit::mock::parse_rules(
            br#"{"model":"gemini-2.5-flash","behaviour":{"kind":"status","status":500}}"#,
        )
        .unwrap(),
    );
    let body = json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]});
    let post = |model: &'static str| {
        let body = body.clone();
        let m = &m;
        async move {
            conn(m)
                .await
                .fetch(
                    Method::POST,
                    &format!("/v1beta/models/{model}:generateContent"),
                    &[
                        ("x-goog-api-key", KEY),
                        ("content-type", "application/json"),
                    ],
                    Bytes::from(body.to_string()),
                )
                .await
                .unwrap()
                .status
        }
    };
    assert_eq!(post("gemini-2.5-flash").await, 500);
    assert_eq!(post("gemini-2.5-pro").await, 200);
}

#[tokio::test]
async fn recorded_requests_carry_their_arrival_time() {
    let m = mock().await;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    post_chat(&m, CHAT, simple("a")).await;
    let after = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let at = m.requests()[0].at_ms;
    assert!(before <= at && at <= after, "{before} <= {at} <= {after}");
}
