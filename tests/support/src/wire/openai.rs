//! The OpenAI chat-completions wire format, as api.openai.com speaks it: request parsing, the
//! `chat.completion` object, `chat.completion.chunk` server-sent events, the model list and the
//! error shape. Pure functions from data to bytes; no I/O and no timing (that is the engine's).

use bytes::Bytes;
use serde::Serialize;
use serde_json::{json, Value};

pub use super::{content_text, count_words, word_pieces, ChatRequest, ToolSpec};
use super::{json_pieces, Checks, Finish, Reply, RequestError, Thoughts};

/// Fingerprint reported in every completion, as OpenAI does.
pub const SYSTEM_FINGERPRINT: &str = "fp_mock0000001";

/// How OpenAI names a JSON value's type in its validation messages.
fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Reads a chat-completions request body, checking what OpenAI checks before it answers.
pub fn parse_request(body: &[u8]) -> Result<ChatRequest, RequestError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        RequestError::new(format!(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON. {e})"
        ), None)
    })?;
    request_from_value(&value)
}

/// As [`parse_request`], from an already parsed body.
pub fn request_from_value(value: &Value) -> Result<ChatRequest, RequestError> {
    request_checked(value, &Checks::default())
}

/// As [`request_from_value`], with the mock's configured extra checks.
pub fn request_checked(value: &Value, checks: &Checks) -> Result<ChatRequest, RequestError> {
    let obj = value.as_object().ok_or_else(|| {
        RequestError::new("Invalid type for request body: expected an object.", None)
    })?;
    if checks.reject_stream_options {
        if let Some(input) = obj.get("stream_options") {
            // Mistral's answer to a field it does not know (FastAPI, extra = forbid).
            return Err(RequestError {
                status: 422,
                message: "Extra inputs are not permitted".into(),
                param: Some("stream_options".into()),
                body: Some(json!({
                    "object": "error",
                    "message": {"detail": [{
                        "type": "extra_forbidden",
                        "loc": ["body", "stream_options"],
                        "msg": "Extra inputs are not permitted",
                        "input": input,
                    }]},
                    "type": "invalid_request_error",
                    "param": null,
                    "code": null,
                })),
            });
        }
    }
    let model = match obj.get("model") {
        Some(Value::String(m)) => m.clone(),
        _ => {
            return Err(RequestError::new(
                "you must provide a model parameter",
                None,
            ))
        }
    };
    let messages = match obj.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(Value::Array(_)) => {
            return Err(RequestError::new(
                "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
                Some("messages"),
            ))
        }
        _ => {
            return Err(RequestError::new(
                "Missing required parameter: 'messages'.",
                Some("messages"),
            ))
        }
    };
    let mut prompt_tokens = 0;
    let mut last_user_text = String::new();
    for (i, msg) in messages.iter().enumerate() {
        let role = msg.get("role").and_then(Value::as_str).ok_or_else(|| {
            RequestError::new(
                format!("Missing required parameter: 'messages[{i}].role'."),
                Some(&format!("messages[{i}].role")),
            )
        })?;
        let text = msg.get("content").map(content_text).unwrap_or_default();
        prompt_tokens += count_words(&text);
        if role == "user" {
            last_user_text = text;
        }
    }
    if let Some(Value::Array(stop)) = obj.get("stop") {
        if stop.len() > 4 {
            let message = format!(
                "Invalid 'stop': array too long. Expected an array with maximum length 4, but got an array with length {} instead.",
                stop.len()
            );
            return Err(RequestError {
                body: Some(json!({"error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "param": "stop",
                    "code": "array_above_max_length",
                }})),
                ..RequestError::new(message, Some("stop"))
            });
        }
    }
    let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(_) if !stream => {
            return Err(RequestError::new(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                Some("stream_options"),
            ))
        }
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(RequestError::new(
                    format!(
                        "Invalid type for 'stream_options.include_usage': expected a boolean, but got {} instead.",
                        json_type(other)
                    ),
                    Some("stream_options.include_usage"),
                ))
            }
        },
        Some(other) => {
            return Err(RequestError::new(
                format!(
                    "Invalid type for 'stream_options': expected an object, but got {} instead.",
                    json_type(other)
                ),
                Some("stream_options"),
            ))
        }
    };
    let tools = obj
        .get("tools")
        .and_then(Value::as_array)
        .map(|tools| {
            tools
                .iter()
                .filter_map(|t| {
                    let f = t.get("function")?;
                    Some(ToolSpec {
                        name: f.get("name")?.as_str()?.to_string(),
                        parameters: f.get("parameters").cloned().unwrap_or(Value::Null),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let max_tokens = obj
        .get("max_completion_tokens")
        .and_then(Value::as_u64)
        .or_else(|| obj.get("max_tokens").and_then(Value::as_u64));
    Ok(ChatRequest {
        model,
        stream,
        include_usage,
        last_user_text,
        prompt_tokens,
        tools,
        max_tokens,
        thoughts: Thoughts::Shown,
    })
}

// ---- serialisation shapes (field order as OpenAI sends them) ----

#[derive(Serialize)]
struct PromptDetails {
    cached_tokens: u64,
    audio_tokens: u64,
}

#[derive(Serialize)]
struct CompletionDetails {
    reasoning_tokens: u64,
    audio_tokens: u64,
    accepted_prediction_tokens: u64,
    rejected_prediction_tokens: u64,
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    prompt_tokens_details: PromptDetails,
    completion_tokens_details: CompletionDetails,
}

impl Usage {
    fn of(reply: &Reply) -> Self {
        let completion = reply.completion_tokens + reply.thinking_tokens;
        Usage {
            prompt_tokens: reply.prompt_tokens,
            completion_tokens: completion,
            total_tokens: reply.prompt_tokens + completion,
            prompt_tokens_details: PromptDetails {
                cached_tokens: 0,
                audio_tokens: 0,
            },
            completion_tokens_details: CompletionDetails {
                reasoning_tokens: reply.thinking_tokens,
                audio_tokens: 0,
                accepted_prediction_tokens: 0,
                rejected_prediction_tokens: 0,
            },
        }
    }
}

#[derive(Serialize)]
struct FunctionCall<'a> {
    name: &'a str,
    arguments: &'a str,
}

#[derive(Serialize)]
struct ToolCallOut<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionCall<'a>,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: Option<&'a str>,
    /// As DeepSeek, Groq and other OpenAI-compatible providers report thinking.
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<ToolCallOut<'a>>>,
    refusal: Option<&'a str>,
    annotations: [(); 0],
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    message: Message<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [Choice<'a>; 1],
    usage: Usage,
    service_tier: &'static str,
    system_fingerprint: &'static str,
}

/// The `finish_reason` OpenAI reports for a reply.
pub fn finish_reason(reply: &Reply) -> &'static str {
    match reply.finish {
        Finish::Stop if !reply.tool_calls.is_empty() => "tool_calls",
        Finish::Stop | Finish::MalformedFunctionCall => "stop",
        Finish::Length => "length",
        Finish::ContentFilter => "content_filter",
    }
}

/// A whole `chat.completion` object.
pub fn completion_json(reply: &Reply) -> Bytes {
    let tool_calls = (!reply.tool_calls.is_empty()).then(|| {
        reply
            .tool_calls
            .iter()
            .map(|call| ToolCallOut {
                id: &call.id,
                kind: "function",
                function: FunctionCall {
                    name: &call.name,
                    arguments: &call.arguments,
                },
            })
            .collect()
    });
    let completion = Completion {
        id: &reply.id,
        object: "chat.completion",
        created: reply.created,
        model: &reply.model,
        choices: [Choice {
            index: 0,
            message: Message {
                role: "assistant",
                content: reply.text.as_deref(),
                reasoning_content: reply.thinking.as_deref(),
                tool_calls,
                refusal: None,
                annotations: [],
            },
            logprobs: None,
            finish_reason: finish_reason(reply),
        }],
        usage: Usage::of(reply),
        service_tier: "default",
        system_fingerprint: SYSTEM_FINGERPRINT,
    };
    Bytes::from(serde_json::to_vec(&completion).expect("completion serialises"))
}

#[derive(Serialize)]
struct FunctionDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    arguments: &'a str,
}

#[derive(Serialize)]
struct ToolCallDelta<'a> {
    index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    function: FunctionDelta<'a>,
}

#[derive(Serialize, Default)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<[ToolCallDelta<'a>; 1]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refusal: Option<Option<&'a str>>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    service_tier: &'static str,
    system_fingerprint: &'static str,
    choices: Vec<ChunkChoice<'a>>,
    /// Absent without `include_usage`; `null` on every chunk but the last with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<Usage>>,
}

/// One server-sent event carrying `data`.
pub fn sse_event(data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + 8);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// The stream terminator.
pub const DONE_EVENT: &[u8] = b"data: [DONE]\n\n";

/// Every SSE event of a streamed reply, in order, ending with `data: [DONE]`: a role chunk
/// (carrying the first tool call's start when the reply is only tool calls), reasoning pieces,
/// content pieces, each tool call's start and argument pieces, the finish chunk, the usage chunk
/// (with `include_usage`), `[DONE]`. `usage_on_finish`: the finish chunk carries the usage, as
/// Mistral's streams do (it takes no `stream_options`, and reports usage that way instead).
pub fn stream_events(reply: &Reply, include_usage: bool, usage_on_finish: bool) -> Vec<Bytes> {
    let event = |choices: Vec<ChunkChoice<'_>>, usage: Option<Option<Usage>>| {
        let c = Chunk {
            id: &reply.id,
            object: "chat.completion.chunk",
            created: reply.created,
            model: &reply.model,
            service_tier: "default",
            system_fingerprint: SYSTEM_FINGERPRINT,
            choices,
            usage,
        };
        sse_event(&serde_json::to_vec(&c).expect("chunk serialises"))
    };
    let usage_field = || if include_usage { Some(None) } else { None };
    let chunk = |delta: Delta<'_>, finish: Option<&'static str>| {
        let choice = ChunkChoice {
            index: 0,
            delta,
            logprobs: None,
            finish_reason: finish,
        };
        event(vec![choice], usage_field())
    };
    let call_start = |index: usize| {
        let call = &reply.tool_calls[index];
        [ToolCallDelta {
            index,
            id: Some(&call.id),
            kind: Some("function"),
            function: FunctionDelta {
                name: Some(&call.name),
                arguments: "",
            },
        }]
    };
    let mut events = Vec::new();
    let only_calls =
        reply.text.is_none() && reply.thinking.is_none() && !reply.tool_calls.is_empty();
    if only_calls {
        events.push(chunk(
            Delta {
                role: Some("assistant"),
                content: Some(None),
                tool_calls: Some(call_start(0)),
                refusal: Some(None),
                ..Delta::default()
            },
            None,
        ));
    } else {
        events.push(chunk(
            Delta {
                role: Some("assistant"),
                content: Some(Some("")),
                refusal: Some(None),
                ..Delta::default()
            },
            None,
        ));
    }
    for piece in reply
        .thinking
        .as_deref()
        .map(word_pieces)
        .unwrap_or_default()
    {
        events.push(chunk(
            Delta {
                reasoning_content: Some(piece),
                ..Delta::default()
            },
            None,
        ));
    }
    for piece in reply.text.as_deref().map(word_pieces).unwrap_or_default() {
        events.push(chunk(
            Delta {
                content: Some(Some(piece)),
                ..Delta::default()
            },
            None,
        ));
    }
    for (index, call) in reply.tool_calls.iter().enumerate() {
        if !(only_calls && index == 0) {
            events.push(chunk(
                Delta {
                    tool_calls: Some(call_start(index)),
                    ..Delta::default()
                },
                None,
            ));
        }
        for piece in json_pieces(&call.arguments) {
            events.push(chunk(
                Delta {
                    tool_calls: Some([ToolCallDelta {
                        index,
                        id: None,
                        kind: None,
                        function: FunctionDelta {
                            name: None,
                            arguments: piece,
                        },
                    }]),
                    ..Delta::default()
                },
                None,
            ));
        }
    }
    if usage_on_finish && !include_usage {
        let choice = ChunkChoice {
            index: 0,
            delta: Delta::default(),
            logprobs: None,
            finish_reason: Some(finish_reason(reply)),
        };
        events.push(event(vec![choice], Some(Some(Usage::of(reply)))));
    } else {
        events.push(chunk(Delta::default(), Some(finish_reason(reply))));
    }
    if include_usage {
        events.push(event(Vec::new(), Some(Some(Usage::of(reply)))));
    }
    events.push(Bytes::from_static(DONE_EVENT));
    events
}

/// The error event OpenAI sends when a stream fails after it began: `data: {"error":{…}}`.
pub fn stream_error_event(message: &str, kind: &str) -> Bytes {
    sse_event(&error_json(message, kind, None, None))
}

#[derive(Serialize)]
struct ErrorInner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorInner<'a>,
}

/// `{"error":{"message","type","param","code"}}`.
pub fn error_json(message: &str, kind: &str, param: Option<&str>, code: Option<&str>) -> Bytes {
    let body = ErrorBody {
        error: ErrorInner {
            message,
            kind,
            param,
            code,
        },
    };
    Bytes::from(serde_json::to_vec(&body).expect("error serialises"))
}

/// The error body OpenAI sends with a given status, when a script names none.
pub fn default_error_for_status(status: u16, model: &str) -> Bytes {
    match status {
        400 => error_json(
            "Invalid request (mock).",
            "invalid_request_error",
            None,
            None,
        ),
        401 => error_json(
            "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            None,
            Some("invalid_api_key"),
        ),
        403 => error_json(
            "You are not allowed to sample from this model (mock).",
            "invalid_request_error",
            None,
            Some("permission_denied"),
        ),
        404 => error_json(
            &format!("The model `{model}` does not exist or you do not have access to it."),
            "invalid_request_error",
            None,
            Some("model_not_found"),
        ),
        422 => error_json(
            "Unprocessable request (mock).",
            "invalid_request_error",
            None,
            None,
        ),
        429 => error_json(
            &format!("Rate limit reached for {model} (mock) on requests per min (RPM): Limit 30, Used 30, Requested 1. Please try again later."),
            "requests",
            None,
            Some("rate_limit_exceeded"),
        ),
        503 => error_json(
            "The engine is currently overloaded, please try again later.",
            "server_error",
            None,
            None,
        ),
        _ => error_json(
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
            None,
        ),
    }
}

#[derive(Serialize)]
struct ModelEntry<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'a str,
}

#[derive(Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: Vec<ModelEntry<'a>>,
}

/// `GET /models`: `{"object":"list","data":[{"id","object":"model","created","owned_by"}]}`.
pub fn models_json(models: &[String], owned_by: &str) -> Bytes {
    let list = ModelList {
        object: "list",
        data: models
            .iter()
            .map(|id| ModelEntry {
                id,
                object: "model",
                created: 1_700_000_000,
                owned_by,
            })
            .collect(),
    };
    Bytes::from(serde_json::to_vec(&list).expect("model list serialises"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_parts_are_joined() {
        let v: Value = serde_json::json!([{"type":"text","text":"Hello"},{"type":"image_url","image_url":{"url":"x"}},{"type":"text","text":"world"}]);
        assert_eq!(content_text(&v), "Hello world");
    }

    #[test]
    fn request_checks() {
        assert!(parse_request(b"{").is_err());
        assert_eq!(
            parse_request(br#"{"model":"m","messages":[]}"#)
                .unwrap_err()
                .param
                .as_deref(),
            Some("messages")
        );
        let r = parse_request(
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi there"}]}"#,
        )
        .unwrap();
        assert!(r.stream && r.include_usage);
        assert_eq!(r.prompt_tokens, 4);
        assert_eq!(r.last_user_text, "hi there");
    }

    #[test]
    fn stream_options_as_openai_checks_them() {
        let with = |extra: &str| {
            parse_request(
                format!(r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}]{extra}}}"#)
                    .as_bytes(),
            )
        };
        // Only with stream: true, as OpenAI insists.
        for extra in [
            r#","stream_options":{"include_usage":true}"#,
            r#","stream":false,"stream_options":{"include_usage":false}"#,
        ] {
            let e = with(extra).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("stream_options"), "{extra}");
            assert!(e.message.contains("only allowed when 'stream' is enabled"));
        }
        let e = with(r#","stream":true,"stream_options":{"include_usage":"yes"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("stream_options.include_usage"));
        let e = with(r#","stream":true,"stream_options":[]"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("stream_options"));
        assert!(!with(r#","stream_options":null"#).unwrap().include_usage);
        assert!(
            !with(r#","stream":true,"stream_options":{}"#)
                .unwrap()
                .include_usage
        );
        assert!(
            !with(r#","stream":true,"stream_options":{"include_usage":false}"#)
                .unwrap()
                .include_usage
        );
    }

    #[test]
    fn usage_is_reported_only_when_asked() {
        let reply = Reply::text("chatcmpl-x", "m", "a b", 2);
        let chunks = |include_usage| -> Vec<Value> {
            let events = stream_events(&reply, include_usage, false);
            assert_eq!(events.last().unwrap().as_ref(), DONE_EVENT);
            events[..events.len() - 1]
                .iter()
                .map(|e| serde_json::from_slice(&e[6..e.len() - 2]).unwrap())
                .collect()
        };
        let plain = chunks(false);
        assert!(plain.iter().all(|c| c.get("usage").is_none()));
        assert!(plain
            .iter()
            .all(|c| c["choices"].as_array().unwrap().len() == 1));
        let with = chunks(true);
        assert_eq!(with.len(), plain.len() + 1);
        let (last, rest) = with.split_last().unwrap();
        assert!(rest
            .iter()
            .all(|c| c.get("usage") == Some(&Value::Null) && c["choices"][0].is_object()));
        assert_eq!(last["choices"], serde_json::json!([]));
        assert_eq!(last["usage"]["total_tokens"], 4);
    }
}
