//! The mock's Anthropic Messages and Gemini routes seen from the wire (shapes, stream framing,
//! auth, checks, every scripted behaviour and fault), what the OpenAI rendering gained (parallel
//! tool calls, reasoning, finishes, mid-stream errors, the Mistral and `stop` checks), several
//! keys, and the binary's flags.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use freerelay_testkit::client::{sse_data, sse_events, timed_frames, Conn, Fetched};
use freerelay_testkit::{MockConfig, MockHandle, MockProvider};
use http::Method;
use serde_json::{json, Value};

const KEY: &str = "sk-mock-formats";
const KEY2: &str = "sk-mock-second";
const MESSAGES: &str = "/v1/messages";
const GEMINI_MODEL: &str = "gemini-2.5-flash";

async fn start(config: MockConfig) -> MockHandle {
    MockProvider::start(config).await.expect("mock starts")
}

async fn mock() -> MockHandle {
    start(MockConfig::new("prov", KEY).with_keys([KEY, KEY2])).await
}

async fn fetch(
    m: &MockHandle,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Fetched {
    Conn::connect(m.addr())
        .await
        .expect("connects")
        .fetch(method, path, headers, body)
        .await
        .expect("request completes")
}

async fn script(m: &MockHandle, script: Value) {
    let r = fetch(
        m,
        Method::POST,
        "/_mock/script",
        &[],
        Bytes::from(script.to_string()),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

fn text(r: &Fetched) -> String {
    String::from_utf8(r.body.to_vec()).expect("utf-8")
}

// ---- Anthropic ----

fn anthropic_headers(key: &str) -> Vec<(&str, &str)> {
    vec![
        ("x-api-key", key),
        ("anthropic-version", "2023-06-01"),
        ("content-type", "application/json"),
    ]
}

async fn anthropic(m: &MockHandle, body: Value) -> Fetched {
    fetch(
        m,
        Method::POST,
        MESSAGES,
        &anthropic_headers(KEY),
        Bytes::from(body.to_string()),
    )
    .await
}

fn claude(content: &str) -> Value {
    json!({"model": "claude-x", "max_tokens": 1000, "system": "Be terse.",
           "messages": [{"role": "user", "content": content}]})
}

fn claude_stream(content: &str) -> Value {
    let mut b = claude(content);
    b["stream"] = json!(true);
    b
}

fn weather_tools() -> Value {
    json!([
        {"name": "get_weather", "input_schema": {"type": "object", "properties": {
            "location": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}},
        {"name": "get_time", "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}}}
    ])
}

/// `(event name, JSON data)` of an Anthropic stream, checking each data's `type` is its name.
fn anthropic_events(body: &str) -> Vec<(String, Value)> {
    sse_events(body)
        .into_iter()
        .map(|(name, data)| {
            let name = name.expect("every Anthropic event is named");
            let v: Value = serde_json::from_str(&data).expect("event data is JSON");
            assert_eq!(v["type"], name.as_str(), "{data}");
            (name, v)
        })
        .collect()
}

fn names(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(n, _)| n.as_str()).collect()
}

#[tokio::test]
async fn anthropic_message_shape() {
    let m = mock().await;
    let r = anthropic(&m, claude("hello big world")).await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("application/json"));
    assert!(r.header("request-id").unwrap().starts_with("req_"));
    let v = r.json();
    assert!(v["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["model"], "claude-x");
    assert_eq!(
        v["content"],
        json!([{"type": "text", "text": "mock(prov): hello big world"}])
    );
    assert_eq!(v["stop_reason"], "end_turn");
    assert!(v["stop_sequence"].is_null());
    assert_eq!(v["usage"]["input_tokens"], 5);
    assert_eq!(v["usage"]["output_tokens"], 4);
    let [rec] = &m.requests()[..] else {
        panic!("one request")
    };
    assert_eq!(rec.kind, "anthropic");
    assert_eq!(rec.headers["x-api-key"], KEY);
    assert_eq!(rec.body, claude("hello big world"));
}

#[tokio::test]
async fn anthropic_auth() {
    let m = mock().await;
    let body = Bytes::from(claude("x").to_string());
    for headers in [
        vec![("x-api-key", "wrong"), ("anthropic-version", "2023-06-01")],
        vec![("anthropic-version", "2023-06-01")],
        vec![
            ("authorization", "Bearer wrong"),
            ("anthropic-version", "2023-06-01"),
        ],
    ] {
        let r = fetch(&m, Method::POST, MESSAGES, &headers, body.clone()).await;
        assert_eq!(r.status, 401);
        assert_eq!(
            r.json(),
            json!({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}})
        );
    }
    let bearer = format!("Bearer {KEY2}");
    for headers in [
        anthropic_headers(KEY2),
        vec![
            ("authorization", bearer.as_str()),
            ("anthropic-version", "2023-06-01"),
        ],
    ] {
        assert_eq!(
            fetch(&m, Method::POST, MESSAGES, &headers, body.clone())
                .await
                .status,
            200
        );
    }
    let r = fetch(
        &m,
        Method::POST,
        MESSAGES,
        &[("x-api-key", KEY)],
        body.clone(),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("anthropic-version"));
    // Every attempt was recorded, as chat-like requests of kind "anthropic".
    assert_eq!(m.requests_of("anthropic").len(), 6);
}

#[tokio::test]
async fn anthropic_checks() {
    let m = mock().await;
    let user = json!({"role": "user", "content": "hi"});
    let asst = json!({"role": "assistant", "content": "ok"});
    let cases = [
        (
            json!({"model": "m", "messages": [user]}),
            "max_tokens: Field required",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": []}),
            "at least 1 item",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": [asst]}),
            "first message",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": [user, user]}),
            "alternate",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "s"}, user]}),
            "top-level `system`",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": [user, {"role": "assistant", "content": "so\n"}]}),
            "trailing whitespace",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": [
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"}]}]}),
            "unexpected `tool_use_id`",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "stream_options": {}, "messages": [user]}),
            "stream_options: Extra inputs are not permitted",
        ),
    ];
    for (body, needle) in cases {
        let r = anthropic(&m, body.clone()).await;
        assert_eq!(r.status, 400, "{body}");
        let v = r.json();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{body}: {msg}");
    }
    // A prefill is fine by default, rejected with reject_prefill.
    let prefill = json!({"model": "m", "max_tokens": 5, "messages": [user, asst]});
    assert_eq!(anthropic(&m, prefill.clone()).await.status, 200);
    let strict = start(MockConfig {
        reject_prefill: true,
        ..MockConfig::new("strict", KEY)
    })
    .await;
    let r = anthropic(&strict, prefill).await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["error"]["message"],
        "This model does not support assistant message prefill. The conversation must end with a user message."
    );
}

#[tokio::test]
async fn anthropic_tools_thinking_and_finishes() {
    let m = mock().await;
    script(
        &m,
        json!([{"kind": "ok", "tool_calls": 3, "thinking": "let me see", "content": "Looking."}]),
    )
    .await;
    let mut body = claude("weather in Oslo");
    body["tools"] = weather_tools();
    body["thinking"] = json!({"type": "enabled", "budget_tokens": 1024});
    body["max_tokens"] = json!(4000);
    let v = anthropic(&m, body).await.json();
    let content = v["content"].as_array().unwrap();
    let types: Vec<&str> = content
        .iter()
        .map(|b| b["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        ["thinking", "text", "tool_use", "tool_use", "tool_use"]
    );
    assert_eq!(content[0]["thinking"], "let me see");
    assert!(!content[0]["signature"].as_str().unwrap().is_empty());
    assert_eq!(
        content[2]["input"],
        json!({"location": "Oslo", "unit": "celsius"})
    );
    assert_eq!(content[3]["name"], "get_time");
    assert_eq!(content[3]["input"], json!({"zone": "mock-zone"}));
    assert_eq!(content[4]["name"], "get_weather");
    assert!(content[2]["id"].as_str().unwrap().starts_with("toolu_"));
    assert_eq!(v["stop_reason"], "tool_use");
    // 3 (thinking) + 1 (text) + 3 calls of one word each.
    assert_eq!(v["usage"]["output_tokens"], 7);

    // max_tokens below the reply: cut, max_tokens.
    let mut body = claude("one two three four");
    body["max_tokens"] = json!(3);
    let v = anthropic(&m, body).await.json();
    assert_eq!(v["stop_reason"], "max_tokens");
    assert_eq!(v["content"][0]["text"], "mock(prov): one two");
    script(&m, json!([{"kind": "ok", "finish": "content_filter"}, {"kind": "ok", "finish": "malformed_function_call"}])).await;
    let v = anthropic(&m, claude("x")).await.json();
    assert_eq!(v["stop_reason"], "refusal");
    assert_eq!(v["content"], json!([]));
    assert_eq!(v["stop_details"]["type"], "refusal");
    assert_eq!(
        anthropic(&m, claude("x")).await.json()["stop_reason"],
        "end_turn"
    );
}

#[tokio::test]
async fn anthropic_stream_shape() {
    let m = mock().await;
    script(
        &m,
        json!([{"kind": "ok", "tool_calls": 2, "thinking": "two calls", "content": "On it."}]),
    )
    .await;
    let mut body = claude_stream("weather in Oslo");
    body["tools"] = weather_tools();
    body["thinking"] = json!({"type": "adaptive"});
    let r = anthropic(&m, body).await;
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let body = text(&r);
    assert!(body.starts_with("event: message_start\ndata: {"));
    assert!(body.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
    let ev = anthropic_events(&body);
    let n = names(&ev);
    assert_eq!(&n[..2], ["message_start", "ping"]);
    assert_eq!(&n[n.len() - 2..], ["message_delta", "message_stop"]);
    let start = &ev[0].1["message"];
    assert_eq!(start["content"], json!([]));
    assert!(start["stop_reason"].is_null());
    assert_eq!(start["usage"]["input_tokens"], 5);
    // Blocks: start, deltas, stop, with consecutive indexes.
    let mut blocks: Vec<(Value, Vec<Value>)> = Vec::new();
    for (name, v) in &ev[2..ev.len() - 2] {
        match name.as_str() {
            "content_block_start" => {
                assert_eq!(v["index"], blocks.len());
                blocks.push((v["content_block"].clone(), Vec::new()));
            }
            "content_block_delta" => {
                assert_eq!(v["index"], blocks.len() - 1);
                blocks.last_mut().unwrap().1.push(v["delta"].clone());
            }
            "content_block_stop" => assert_eq!(v["index"], blocks.len() - 1),
            other => panic!("unexpected {other}"),
        }
    }
    let kinds: Vec<&str> = blocks
        .iter()
        .map(|(b, _)| b["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["thinking", "text", "tool_use", "tool_use"]);
    let (_, thinking) = &blocks[0];
    let thought: String = thinking
        .iter()
        .filter(|d| d["type"] == "thinking_delta")
        .map(|d| d["thinking"].as_str().unwrap())
        .collect();
    assert_eq!(thought, "two calls");
    assert_eq!(thinking.last().unwrap()["type"], "signature_delta");
    let said: String = blocks[1]
        .1
        .iter()
        .map(|d| d["text"].as_str().unwrap())
        .collect();
    assert_eq!(said, "On it.");
    for ((start, deltas), expected) in blocks[2..].iter().zip([
        json!({"location": "Oslo", "unit": "celsius"}),
        json!({"zone": "mock-zone"}),
    ]) {
        assert_eq!(start["input"], json!({}));
        assert!(deltas.iter().all(|d| d["type"] == "input_json_delta"));
        let pieces: Vec<&str> = deltas
            .iter()
            .map(|d| d["partial_json"].as_str().unwrap())
            .collect();
        assert!(
            pieces.iter().filter(|p| !p.is_empty()).count() >= 2,
            "{pieces:?}"
        );
        assert_eq!(
            serde_json::from_str::<Value>(&pieces.concat()).unwrap(),
            expected
        );
    }
    let delta = &ev[ev.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");
    assert_eq!(delta["usage"]["output_tokens"], 2 + 2 + 2);
}

// ---- Gemini ----

fn gemini_path(stream: bool, sse: bool) -> String {
    let method = if stream {
        "streamGenerateContent"
    } else {
        "generateContent"
    };
    let alt = if sse { "?alt=sse" } else { "" };
    format!("/v1beta/models/{GEMINI_MODEL}:{method}{alt}")
}

fn gem(content: &str) -> Value {
    json!({"systemInstruction": {"parts": [{"text": "Be terse."}]},
           "contents": [{"role": "user", "parts": [{"text": content}]}]})
}

async fn gemini(m: &MockHandle, path: &str, body: Value) -> Fetched {
    fetch(
        m,
        Method::POST,
        path,
        &[
            ("x-goog-api-key", KEY),
            ("content-type", "application/json"),
        ],
        Bytes::from(body.to_string()),
    )
    .await
}

fn gemini_tools() -> Value {
    json!([{"functionDeclarations": [
        {"name": "get_weather", "parameters": {"type": "OBJECT", "properties": {
            "location": {"type": "STRING"}, "days": {"type": "INTEGER"}}}},
        {"name": "get_time", "parametersJsonSchema": {"type": "object", "properties": {"zone": {"type": "string"}}}}
    ]}])
}

/// The JSON of every event of a Gemini SSE body, checking Google's `\r\n\r\n` framing.
fn gemini_events(body: &str) -> Vec<Value> {
    assert!(body.starts_with("data: {"), "{body}");
    assert!(body.ends_with("}\r\n\r\n"), "{body}");
    assert_eq!(
        body.matches("\r\n\r\n").count(),
        body.matches("data: ").count()
    );
    sse_data(body)
        .iter()
        .map(|d| serde_json::from_str(d).expect("JSON"))
        .collect()
}

fn parts_text(chunk: &Value) -> String {
    chunk["candidates"][0]["content"]["parts"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter(|p| p["thought"] != true)
                .filter_map(|p| p["text"].as_str())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn gemini_response_shape() {
    let m = mock().await;
    let r = gemini(&m, &gemini_path(false, false), gem("hello big world")).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    let cand = &v["candidates"][0];
    assert_eq!(
        cand["content"],
        json!({"parts": [{"text": "mock(prov): hello big world"}], "role": "model"})
    );
    assert_eq!(cand["finishReason"], "STOP");
    assert_eq!(cand["index"], 0);
    assert_eq!(v["usageMetadata"]["promptTokenCount"], 5);
    assert_eq!(v["usageMetadata"]["candidatesTokenCount"], 4);
    assert_eq!(v["usageMetadata"]["totalTokenCount"], 9);
    assert_eq!(v["modelVersion"], GEMINI_MODEL);
    assert!(v["responseId"].is_string());
    let [rec] = &m.requests()[..] else {
        panic!("one request")
    };
    assert_eq!(rec.kind, "gemini");
    assert_eq!(rec.path, gemini_path(false, false));
}

#[tokio::test]
async fn gemini_auth() {
    let m = mock().await;
    let body = Bytes::from(gem("x").to_string());
    let path = gemini_path(false, false);
    let r = fetch(
        &m,
        Method::POST,
        &path,
        &[("x-goog-api-key", "nope")],
        body.clone(),
    )
    .await;
    assert_eq!(r.status, 400);
    let e = &r.json()["error"];
    assert_eq!(
        (e["code"].as_u64(), e["status"].as_str()),
        (Some(400), Some("INVALID_ARGUMENT"))
    );
    assert_eq!(e["details"][0]["reason"], "API_KEY_INVALID");
    let r = fetch(&m, Method::POST, &path, &[], body.clone()).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["status"], "PERMISSION_DENIED");
    let by_query = format!("{path}?key={KEY2}");
    assert_eq!(
        fetch(&m, Method::POST, &by_query, &[], body.clone())
            .await
            .status,
        200
    );
    assert_eq!(
        fetch(
            &m,
            Method::POST,
            &path,
            &[("x-goog-api-key", KEY2)],
            body.clone()
        )
        .await
        .status,
        200
    );
    let wrong = format!("{path}?key=nope");
    assert_eq!(fetch(&m, Method::POST, &wrong, &[], body).await.status, 400);
}

#[tokio::test]
async fn gemini_checks() {
    let m = mock().await;
    let path = gemini_path(false, false);
    let cases = [
        (json!({"contents": []}), "contents is not specified"),
        (
            json!({"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}),
            "valid role",
        ),
        (
            json!({"contents": [{"role": "user", "parts": []}]}),
            "parts must not be empty",
        ),
        (
            json!({"contents": [{"role": "user", "parts": [{"functionResponse": {"name": "", "response": {}}}]}]}),
            "Name cannot be empty",
        ),
        (
            json!({"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"stopSequences": ["1", "2", "3", "4", "5", "6"]}}),
            "stop_sequences",
        ),
        (
            json!({"contents": [{"parts": [{"text": "x"}]}], "max_tokens": 5}),
            "Unknown name \"max_tokens\"",
        ),
    ];
    for (body, needle) in cases {
        let r = gemini(&m, &path, body.clone()).await;
        assert_eq!(r.status, 400, "{body}");
        let e = &r.json()["error"];
        assert_eq!(e["code"], 400);
        assert_eq!(e["status"], "INVALID_ARGUMENT");
        assert!(
            e["message"].as_str().unwrap().contains(needle),
            "{body}: {e}"
        );
    }
    let five = json!({"contents": [{"parts": [{"text": "x"}]}], "generation_config": {"stop_sequences": ["1", "2", "3", "4", "5"]}});
    assert_eq!(gemini(&m, &path, five).await.status, 200);
}

#[tokio::test]
async fn gemini_sse_stream_shape() {
    let m = mock().await;
    let r = gemini(&m, &gemini_path(true, true), gem("one two three")).await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let chunks = gemini_events(&text(&r));
    assert_eq!(chunks.len(), 4, "a word per event");
    let said: String = chunks.iter().map(parts_text).collect();
    assert_eq!(said, "mock(prov): one two three");
    let (last, rest) = chunks.split_last().unwrap();
    for c in rest {
        assert!(c["candidates"][0].get("finishReason").is_none());
        assert_eq!(c["candidates"][0]["content"]["role"], "model");
        assert_eq!(c["modelVersion"], GEMINI_MODEL);
        assert_eq!(c["responseId"], last["responseId"]);
    }
    assert_eq!(last["candidates"][0]["finishReason"], "STOP");
    assert_eq!(last["usageMetadata"]["candidatesTokenCount"], 4);
    assert_eq!(last["usageMetadata"]["totalTokenCount"], 9);
}

#[tokio::test]
async fn gemini_json_array_stream() {
    let m = mock().await;
    let r = gemini(&m, &gemini_path(true, false), gem("one two")).await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("application/json"));
    let v = r.json();
    let chunks = v.as_array().expect("one JSON array");
    assert_eq!(chunks.len(), 3);
    assert_eq!(
        chunks.iter().map(parts_text).collect::<String>(),
        "mock(prov): one two"
    );
    assert_eq!(chunks[2]["candidates"][0]["finishReason"], "STOP");
}

#[tokio::test]
async fn gemini_tools_thoughts_and_finishes() {
    let m = mock().await;
    script(
        &m,
        json!([{"kind": "ok", "tool_calls": 2, "thinking": "check both"}]),
    )
    .await;
    let mut body = gem("weather in Oslo");
    body["tools"] = gemini_tools();
    body["generationConfig"] = json!({"thinkingConfig": {"includeThoughts": true}});
    let v = gemini(&m, &gemini_path(false, false), body.clone())
        .await
        .json();
    let parts = v["candidates"][0]["content"]["parts"].as_array().unwrap();
    assert_eq!(parts[0], json!({"text": "check both", "thought": true}));
    assert_eq!(
        parts[1],
        json!({"functionCall": {"name": "get_weather", "args": {"location": "Oslo", "days": 1}}})
    );
    assert_eq!(
        parts[2],
        json!({"functionCall": {"name": "get_time", "args": {"zone": "mock-zone"}}})
    );
    assert_eq!(v["candidates"][0]["finishReason"], "STOP");
    assert_eq!(v["usageMetadata"]["thoughtsTokenCount"], 2);

    // Streamed: thought pieces first, the calls with the finish in the last event.
    script(
        &m,
        json!([{"kind": "ok", "tool_calls": 1, "thinking": "check both"}]),
    )
    .await;
    let chunks = gemini_events(&text(
        &gemini(&m, &gemini_path(true, true), body.clone()).await,
    ));
    assert_eq!(
        chunks[0]["candidates"][0]["content"]["parts"][0],
        json!({"text": "check", "thought": true})
    );
    assert_eq!(
        chunks.len(),
        3,
        "two thought pieces, then the call with the finish"
    );
    let last = chunks.last().unwrap();
    assert_eq!(
        last["candidates"][0]["content"]["parts"],
        json!([{"functionCall": {"name": "get_weather", "args": {"location": "Oslo", "days": 1}}}])
    );
    assert_eq!(last["candidates"][0]["finishReason"], "STOP");
    assert!(chunks[..2]
        .iter()
        .all(|c| c["candidates"][0].get("finishReason").is_none()));

    // Without includeThoughts: counted, not shown.
    script(
        &m,
        json!([{"kind": "ok", "thinking": "quiet thought", "content": "Hi."}]),
    )
    .await;
    let v = gemini(&m, &gemini_path(false, false), gem("x"))
        .await
        .json();
    assert_eq!(
        v["candidates"][0]["content"]["parts"],
        json!([{"text": "Hi."}])
    );
    assert_eq!(v["usageMetadata"]["thoughtsTokenCount"], 2);

    script(&m, json!([{"kind": "ok", "finish": "content_filter"}, {"kind": "ok", "finish": "malformed_function_call"}])).await;
    let v = gemini(&m, &gemini_path(false, false), gem("x"))
        .await
        .json();
    let cand = &v["candidates"][0];
    assert_eq!(cand["finishReason"], "SAFETY");
    assert!(cand.get("content").is_none());
    let blocked: Vec<&Value> = cand["safetyRatings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["blocked"] == true)
        .collect();
    assert_eq!(blocked.len(), 1);
    let v = gemini(&m, &gemini_path(false, false), gem("x"))
        .await
        .json();
    assert_eq!(
        v["candidates"][0]["finishReason"],
        "MALFORMED_FUNCTION_CALL"
    );

    let mut capped = gem("one two three four");
    capped["generationConfig"] = json!({"maxOutputTokens": 2});
    let v = gemini(&m, &gemini_path(false, false), capped).await.json();
    assert_eq!(v["candidates"][0]["finishReason"], "MAX_TOKENS");
    assert_eq!(parts_text(&v), "mock(prov): one");
}

#[tokio::test]
async fn gemini_status_errors() {
    let m = mock().await;
    script(&m, json!([
        {"kind": "status", "status": 429, "retry_delay": "17s"},
        {"kind": "status", "status": 429},
        {"kind": "status", "status": 404},
        {"kind": "status", "status": 503, "body": {"error": {"code": 503, "message": "verbatim", "status": "UNAVAILABLE"}}}
    ])).await;
    let path = gemini_path(false, false);
    let r = gemini(&m, &path, gem("x")).await;
    assert_eq!(r.status, 429);
    let e = &r.json()["error"];
    assert_eq!(e["status"], "RESOURCE_EXHAUSTED");
    let details = e["details"].as_array().unwrap();
    let types: Vec<&str> = details
        .iter()
        .map(|d| d["@type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "type.googleapis.com/google.rpc.QuotaFailure",
            "type.googleapis.com/google.rpc.Help",
            "type.googleapis.com/google.rpc.RetryInfo"
        ]
    );
    assert_eq!(details[2]["retryDelay"], "17s");
    let e = gemini(&m, &path, gem("x")).await.json();
    assert!(
        !e.to_string().contains("RetryInfo"),
        "no retry_delay, no RetryInfo"
    );
    let r = gemini(&m, &path, gem("x")).await;
    assert_eq!(
        (r.status.as_u16(), r.json()["error"]["status"].as_str()),
        (404, Some("NOT_FOUND"))
    );
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains(GEMINI_MODEL));
    let r = gemini(&m, &path, gem("x")).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["message"], "verbatim");
}

#[tokio::test]
async fn anthropic_status_errors() {
    let m = mock().await;
    script(
        &m,
        json!([
            {"kind": "status", "status": 429, "retry_after": 30},
            {"kind": "status", "status": 529},
            {"kind": "status", "status": 500, "headers": {"x-extra": "1"}}
        ]),
    )
    .await;
    let r = anthropic(&m, claude("x")).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    assert_eq!(r.header("retry-after"), Some("30"));
    assert_eq!(
        r.header("anthropic-ratelimit-requests-remaining"),
        Some("0")
    );
    assert!(r
        .header("anthropic-ratelimit-requests-reset")
        .unwrap()
        .ends_with('Z'));
    let r = anthropic(&m, claude("x")).await;
    assert_eq!(r.status.as_u16(), 529);
    assert_eq!(
        r.json(),
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    );
    let r = anthropic(&m, claude("x")).await;
    assert_eq!(r.json()["error"]["type"], "api_error");
    assert_eq!(r.header("x-extra"), Some("1"));
}

// ---- Faults, in every format ----

/// A streaming request in each format, and how to read its events.
#[derive(Clone, Copy, Debug)]
enum Fmt {
    OpenAi,
    Anthropic,
    Gemini,
    GeminiArray,
}

const ALL: [Fmt; 4] = [Fmt::OpenAi, Fmt::Anthropic, Fmt::Gemini, Fmt::GeminiArray];

impl Fmt {
    fn path(self) -> String {
        match self {
            Fmt::OpenAi => "/v1/chat/completions".into(),
            Fmt::Anthropic => MESSAGES.into(),
            Fmt::Gemini => gemini_path(true, true),
            Fmt::GeminiArray => gemini_path(true, false),
        }
    }

    fn headers(self) -> Vec<(&'static str, &'static str)> {
        match self {
            Fmt::OpenAi => vec![("authorization", "Bearer sk-mock-formats")],
            Fmt::Anthropic => vec![("x-api-key", KEY), ("anthropic-version", "2023-06-01")],
            Fmt::Gemini | Fmt::GeminiArray => vec![("x-goog-api-key", KEY)],
        }
    }

    fn body(self, text: &str, stream: bool) -> Value {
        match self {
            Fmt::OpenAi => {
                json!({"model": "m", "stream": stream, "messages": [{"role": "user", "content": text}]})
            }
            Fmt::Anthropic => {
                let mut b = claude(text);
                b["stream"] = json!(stream);
                b
            }
            Fmt::Gemini | Fmt::GeminiArray => gem(text),
        }
    }

    fn json_path(self) -> String {
        match self {
            Fmt::Gemini | Fmt::GeminiArray => gemini_path(false, false),
            _ => self.path(),
        }
    }

    /// The pieces a whole stream is made of, as the mock cuts them: SSE events, or for a JSON
    /// array `[`+first, `,\r\n`+next…, `]`.
    fn pieces(self, body: &str) -> Vec<String> {
        match self {
            Fmt::OpenAi | Fmt::Anthropic => {
                body.split_inclusive("\n\n").map(str::to_string).collect()
            }
            Fmt::Gemini => body
                .split_inclusive("\r\n\r\n")
                .map(str::to_string)
                .collect(),
            Fmt::GeminiArray => {
                let inner = &body[1..body.len() - 1];
                let mut out: Vec<String> = inner.split(",\r\n").map(str::to_string).collect();
                out[0] = format!("[{}", out[0]);
                for p in out.iter_mut().skip(1) {
                    *p = format!(",\r\n{p}");
                }
                out.push("]".into());
                out
            }
        }
    }

    /// The final event's text (what `omit_done` leaves out).
    fn is_final(self, piece: &str) -> bool {
        match self {
            Fmt::OpenAi => piece == "data: [DONE]\n\n",
            Fmt::Anthropic => piece.starts_with("event: message_stop"),
            Fmt::Gemini | Fmt::GeminiArray => piece.contains("finishReason"),
        }
    }
}

async fn send(m: &MockHandle, fmt: Fmt, body: Value) -> http::Response<hyper::body::Incoming> {
    Conn::connect(m.addr())
        .await
        .unwrap()
        .send(
            Method::POST,
            &fmt.path(),
            &fmt.headers(),
            Bytes::from(body.to_string()),
        )
        .await
        .expect("response head")
}

/// What a streaming request in `fmt` gets, and how its body ended, within `limit`.
async fn stream(m: &MockHandle, fmt: Fmt, limit: Duration) -> (String, Result<(), String>) {
    let resp = send(m, fmt, fmt.body("one two three", true)).await;
    assert_eq!(resp.status(), 200, "{fmt:?}");
    let (frames, end) = timed_frames(resp.into_body(), Instant::now(), limit).await;
    let all: Vec<u8> = frames.iter().flat_map(|(_, b)| b.to_vec()).collect();
    (String::from_utf8(all).unwrap(), end)
}

/// The same stream with nothing scripted (ids aside).
async fn whole(m: &MockHandle, fmt: Fmt) -> Vec<String> {
    let (body, end) = stream(m, fmt, Duration::from_secs(5)).await;
    assert!(end.is_ok());
    fmt.pieces(&body)
}

/// Every run of digits (ids, times) made `0`, to compare two answers.
fn norm(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_digits = false;
    for c in s.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('0');
            }
            in_digits = true;
        } else {
            out.push(c);
            in_digits = false;
        }
    }
    out
}

#[tokio::test]
async fn stall_drop_and_cuts_in_every_format() {
    let m = mock().await;
    for fmt in ALL {
        let pieces = whole(&m, fmt).await;
        assert!(pieces.len() >= 4, "{fmt:?}: {pieces:?}");

        script(&m, json!({"kind": "stall", "after_chunks": 2})).await;
        let (got, end) = stream(&m, fmt, Duration::from_millis(800)).await;
        assert_eq!(end, Err("timed out".to_string()), "{fmt:?}");
        assert_eq!(norm(&got), norm(&pieces[..2].concat()), "{fmt:?}");

        script(
            &m,
            json!({"kind": "drop", "after_chunks": 2, "mid_event": true}),
        )
        .await;
        let (got, end) = stream(&m, fmt, Duration::from_secs(5)).await;
        assert!(
            end.is_err() && end != Err("timed out".into()),
            "{fmt:?}: {end:?}"
        );
        let half = &pieces[2][..pieces[2].len() / 2];
        assert_eq!(
            norm(&got),
            norm(&format!("{}{half}", pieces[..2].concat())),
            "{fmt:?}"
        );

        script(&m, json!({"kind": "drop", "before_done": true})).await;
        let (got, end) = stream(&m, fmt, Duration::from_secs(5)).await;
        assert!(end.is_err(), "{fmt:?}");
        assert_eq!(
            norm(&got),
            norm(&pieces[..pieces.len() - 1].concat()),
            "{fmt:?}"
        );

        script(&m, json!({"kind": "drop", "after_bytes": 25})).await;
        let (got, end) = stream(&m, fmt, Duration::from_secs(5)).await;
        assert!(end.is_err(), "{fmt:?}");
        assert_eq!(got.len(), 25, "{fmt:?}");

        script(&m, json!({"kind": "ok", "omit_done": true})).await;
        let (got, end) = stream(&m, fmt, Duration::from_secs(5)).await;
        assert!(end.is_ok(), "{fmt:?}: a clean end");
        let expected: String = pieces
            .iter()
            .filter(|p| !fmt.is_final(p))
            .cloned()
            .collect();
        assert_eq!(norm(&got), norm(&expected), "{fmt:?}");
        assert!(fmt.pieces(&got).iter().all(|p| !fmt.is_final(p)), "{fmt:?}");
    }
}

#[tokio::test]
async fn json_answers_are_cut_in_every_format() {
    let m = mock().await;
    for fmt in ALL {
        let c = || async { Conn::connect(m.addr()).await.unwrap() };
        let body = Bytes::from(fmt.body("one two", false).to_string());
        let full = c()
            .await
            .fetch(Method::POST, &fmt.json_path(), &fmt.headers(), body.clone())
            .await
            .unwrap();
        assert_eq!(full.status, 200);
        script(&m, json!({"kind": "drop", "after_bytes": 30})).await;
        let resp = c()
            .await
            .send(Method::POST, &fmt.json_path(), &fmt.headers(), body.clone())
            .await
            .unwrap();
        let announced: usize = resp.headers()["content-length"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            announced,
            full.body.len(),
            "{fmt:?}: the full length is announced"
        );
        let (frames, end) =
            timed_frames(resp.into_body(), Instant::now(), Duration::from_secs(5)).await;
        assert!(end.is_err());
        assert_eq!(frames.iter().map(|(_, b)| b.len()).sum::<usize>(), 30);
    }
}

#[tokio::test]
async fn pause_close_and_delays_in_every_format() {
    let m = mock().await;
    for fmt in ALL {
        script(&m, json!({"kind": "ok", "pause_after_chunks": 2})).await;
        let resp = send(&m, fmt, fmt.body("one two three", true)).await;
        let task = tokio::spawn(timed_frames(
            resp.into_body(),
            Instant::now(),
            Duration::from_secs(10),
        ));
        let deadline = Instant::now() + Duration::from_secs(5);
        while m.paused() == 0 {
            assert!(Instant::now() < deadline, "{fmt:?}: never paused");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        m.release(1);
        let (frames, end) = task.await.unwrap();
        assert!(end.is_ok());
        let got: String = frames
            .iter()
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
            .collect();
        assert!(
            fmt.pieces(&got).iter().any(|p| fmt.is_final(p)),
            "{fmt:?}: all of it after release"
        );

        script(&m, json!({"kind": "close"})).await;
        let r = Conn::connect(m.addr())
            .await
            .unwrap()
            .send(
                Method::POST,
                &fmt.path(),
                &fmt.headers(),
                Bytes::from(fmt.body("x", true).to_string()),
            )
            .await;
        assert!(r.is_err(), "{fmt:?}: no response at all");

        script(&m, json!({"kind": "ok", "latency_ms": 300})).await;
        let start = Instant::now();
        let _ = send(&m, fmt, fmt.body("x", true)).await;
        assert!(start.elapsed() >= Duration::from_millis(290), "{fmt:?}");
    }
}

#[tokio::test]
async fn stream_error_in_every_format() {
    let m = mock().await;
    for fmt in ALL {
        let pieces = whole(&m, fmt).await;
        script(
            &m,
            json!({"kind": "stream_error", "after_chunks": 3, "message": "it broke"}),
        )
        .await;
        let (got, end) = stream(&m, fmt, Duration::from_secs(5)).await;
        assert!(
            end.is_ok(),
            "{fmt:?}: the stream ends cleanly after the error"
        );
        let (before, error) = match fmt {
            Fmt::GeminiArray => {
                let v: Value = serde_json::from_str(&got).expect("still one JSON array");
                let arr = v.as_array().unwrap().clone();
                assert_eq!(arr.len(), 4);
                (String::new(), arr[3].clone())
            }
            _ => {
                let got_pieces = fmt.pieces(&got);
                assert_eq!(got_pieces.len(), 4, "{fmt:?}: {got_pieces:?}");
                assert_eq!(norm(&got_pieces[..3].concat()), norm(&pieces[..3].concat()));
                let last = sse_data(&got_pieces[3]).pop().unwrap();
                (got_pieces[3].clone(), serde_json::from_str(&last).unwrap())
            }
        };
        match fmt {
            Fmt::OpenAi => {
                assert_eq!(
                    error,
                    json!({"error": {"message": "it broke", "type": "server_error", "param": null, "code": null}})
                );
            }
            Fmt::Anthropic => {
                assert!(before.starts_with("event: error\n"));
                assert_eq!(
                    error,
                    json!({"type": "error", "error": {"type": "overloaded_error", "message": "it broke"}})
                );
            }
            Fmt::Gemini | Fmt::GeminiArray => {
                assert_eq!(
                    error,
                    json!({"error": {"code": 500, "message": "it broke", "status": "INTERNAL"}})
                );
            }
        }
        // A JSON request gets it as an error status.
        script(&m, json!({"kind": "stream_error", "error_type": if matches!(fmt, Fmt::Gemini | Fmt::GeminiArray) { "UNAVAILABLE" } else { "overloaded_error" }})).await;
        let body = Bytes::from(fmt.body("x", false).to_string());
        let r = Conn::connect(m.addr())
            .await
            .unwrap()
            .fetch(Method::POST, &fmt.json_path(), &fmt.headers(), body)
            .await
            .unwrap();
        let expected = match fmt {
            Fmt::OpenAi => 500,
            Fmt::Anthropic => 529,
            Fmt::Gemini | Fmt::GeminiArray => 503,
        };
        assert_eq!(r.status.as_u16(), expected, "{fmt:?}");
    }
}

// ---- OpenAI additions ----

async fn openai(m: &MockHandle, body: Value) -> Fetched {
    fetch(
        m,
        Method::POST,
        "/v1/chat/completions",
        &Fmt::OpenAi.headers(),
        Bytes::from(body.to_string()),
    )
    .await
}

fn openai_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
            "properties": {"location": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object",
            "properties": {"zone": {"type": "string"}}}}}
    ])
}

#[tokio::test]
async fn openai_parallel_tool_calls_and_reasoning() {
    let m = mock().await;
    script(
        &m,
        json!([{"kind": "ok", "tool_calls": 3, "thinking": "three calls now"}]),
    )
    .await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "weather in Oslo"}], "tools": openai_tools()});
    let v = openai(&m, body.clone()).await.json();
    let msg = &v["choices"][0]["message"];
    assert_eq!(msg["reasoning_content"], "three calls now");
    assert!(msg["content"].is_null());
    let calls = msg["tool_calls"].as_array().unwrap();
    let named: Vec<&str> = calls
        .iter()
        .map(|c| c["function"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(named, ["get_weather", "get_time", "get_weather"]);
    let args: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"location": "Oslo", "unit": "celsius"}));
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        v["usage"]["completion_tokens_details"]["reasoning_tokens"],
        3
    );
    assert_eq!(v["usage"]["completion_tokens"], 3 + 3);

    script(
        &m,
        json!([{"kind": "ok", "tool_calls": 2, "thinking": "two now"}]),
    )
    .await;
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let ev = sse_data(&text(&openai(&m, streamed).await));
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let reasoning: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["reasoning_content"].as_str())
        .collect();
    assert_eq!(reasoning, "two now");
    let mut args = [String::new(), String::new()];
    let mut ids = Vec::new();
    for c in &chunks {
        for tc in c["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let i = tc["index"].as_u64().unwrap() as usize;
            if let Some(id) = tc["id"].as_str() {
                ids.push((i, id.to_string()));
            }
            args[i].push_str(tc["function"]["arguments"].as_str().unwrap());
        }
    }
    assert_eq!(ids.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 1]);
    assert_eq!(
        serde_json::from_str::<Value>(&args[1]).unwrap(),
        json!({"zone": "mock-zone"})
    );
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "tool_calls"
    );
}

#[tokio::test]
async fn openai_finishes_and_checks() {
    let m = mock().await;
    let v = openai(&m, json!({"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "one two three"}]})).await.json();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["choices"][0]["message"]["content"], "mock(prov): one");
    let v = openai(&m, json!({"model": "m", "max_completion_tokens": 50, "messages": [{"role": "user", "content": "one"}]})).await.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    script(
        &m,
        json!([{"kind": "ok", "finish": "content_filter", "content": "partial"}]),
    )
    .await;
    let v = openai(
        &m,
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await
    .json();
    assert_eq!(v["choices"][0]["finish_reason"], "content_filter");
    assert_eq!(v["choices"][0]["message"]["content"], "partial");
    let r = openai(&m, json!({"model": "m", "stop": ["a", "b", "c", "d", "e"], "messages": [{"role": "user", "content": "x"}]})).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "stop");
    assert_eq!(r.json()["error"]["code"], "array_above_max_length");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("maximum length 4"));
    let four = json!({"model": "m", "stop": ["a", "b", "c", "d"], "messages": [{"role": "user", "content": "x"}]});
    assert_eq!(openai(&m, four).await.status, 200);

    let mistral = start(MockConfig {
        reject_stream_options: true,
        ..MockConfig::new("mistral", KEY)
    })
    .await;
    let body = json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "x"}]});
    let r = openai(&mistral, body).await;
    assert_eq!(r.status.as_u16(), 422);
    let v = r.json();
    assert_eq!(v["object"], "error");
    assert_eq!(v["message"]["detail"][0]["type"], "extra_forbidden");
    assert_eq!(
        v["message"]["detail"][0]["loc"],
        json!(["body", "stream_options"])
    );
    let plain =
        json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "x"}]});
    assert_eq!(openai(&mistral, plain).await.status, 200);
}

// ---- Recording, keys, model lists, the binary ----

#[tokio::test]
async fn requests_list_every_chat_format() {
    let m = mock().await;
    openai(&m, Fmt::OpenAi.body("a", false)).await;
    anthropic(&m, claude("b")).await;
    gemini(&m, &gemini_path(false, false), gem("c")).await;
    fetch(
        &m,
        Method::GET,
        "/v1/models",
        &[("authorization", "Bearer sk-mock-formats")],
        Bytes::new(),
    )
    .await;
    let kinds = |path: &str| {
        let m = &m;
        let path = path.to_string();
        async move {
            let r = fetch(m, Method::GET, &path, &[], Bytes::new()).await;
            r.json()
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["kind"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        kinds("/_mock/requests").await,
        ["chat", "anthropic", "gemini"]
    );
    assert_eq!(
        kinds("/_mock/requests?all=1").await,
        ["chat", "anthropic", "gemini", "models"]
    );
    assert_eq!(kinds("/_mock/requests?kind=gemini").await, ["gemini"]);
    assert_eq!(m.requests().len(), 3);
    assert_eq!(m.requests_of("chat").len(), 1);
}

#[tokio::test]
async fn model_lists_in_each_format() {
    let m = mock().await;
    let r = fetch(
        &m,
        Method::GET,
        "/v1/models",
        &[("x-api-key", KEY), ("anthropic-version", "2023-06-01")],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["data"][0]["type"], "model");
    assert_eq!(r.json()["has_more"], false);
    let r = fetch(
        &m,
        Method::GET,
        "/v1beta/models",
        &[("x-goog-api-key", KEY2)],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.json()["models"][0]["name"], "models/mock-small");
    let r = fetch(
        &m,
        Method::GET,
        &format!("/v1beta/models?key={KEY}"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = fetch(&m, Method::GET, "/v1beta/models?key=bad", &[], Bytes::new()).await;
    assert_eq!(r.status, 400);
    let r = fetch(
        &m,
        Method::GET,
        "/v1/models",
        &[("authorization", "Bearer sk-mock-second")],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.json()["object"], "list");
}

#[test]
fn the_binary_takes_several_keys_and_the_strict_flags() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_freerelay-mock"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--name",
            "bin",
            "--api-key",
            "k1,k2",
            "--api-key",
            "k3",
        ])
        .args(["--reject-prefill", "--reject-stream-options"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("the mock binary runs");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .expect("announces its address")
        .to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let statuses = rt.block_on(async {
        let mut out = Vec::new();
        let post = |path: &'static str, headers: Vec<(&'static str, &'static str)>, body: Value| {
            let addr = addr.clone();
            async move {
                let mut c = Conn::connect(addr.parse().unwrap()).await.unwrap();
                c.fetch(Method::POST, path, &headers, Bytes::from(body.to_string())).await.unwrap().status.as_u16()
            }
        };
        for key in ["Bearer k1", "Bearer k2", "Bearer k3", "Bearer k4"] {
            out.push(post("/v1/chat/completions", vec![("authorization", key)], json!({"model": "m", "messages": [{"role": "user", "content": "x"}]})).await);
        }
        out.push(post("/v1/chat/completions", vec![("authorization", "Bearer k2")],
            json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "x"}]})).await);
        out.push(post(MESSAGES, vec![("x-api-key", "k3"), ("anthropic-version", "2023-06-01")],
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})).await);
        out
    });
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(statuses, [200, 200, 200, 401, 422, 400]);
}
