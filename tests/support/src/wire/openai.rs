//! The OpenAI chat-completions wire format, as api.openai.com speaks it: request parsing, the
//! `chat.completion` object, `chat.completion.chunk` server-sent events, the model list and the
//! error shape. Pure functions from data to bytes; no I/O and no timing (that is the engine's).

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

use super::{Reply, ReplyBody, RequestError, ToolCall};

/// Fingerprint reported in every completion, as OpenAI does.
pub const SYSTEM_FINGERPRINT: &str = "fp_mock0000001";

/// What the engine needs to know about a chat-completions request.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    /// Text of the last `user` message (text parts joined with a space); empty if none.
    pub last_user_text: String,
    /// Whitespace-separated words in every message's text: the mock's prompt token count.
    pub prompt_tokens: u64,
    /// The first entry of `tools`, if any.
    pub first_tool: Option<ToolSpec>,
}

/// The part of a tool definition the mock uses to make a plausible call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    /// Name of the first declared parameter (`parameters.properties`), if any.
    pub first_param: Option<String>,
}

/// Whitespace-word count: the mock's notion of a token.
pub fn count_words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// The text of a message `content`: a string, or the `text` of each `{"type":"text"}` part joined
/// with a single space. Anything else has no text.
pub fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => {
            let mut out = String::new();
            for part in parts {
                let text = match part {
                    Value::String(s) => Some(s.as_str()),
                    Value::Object(o) => o.get("text").and_then(Value::as_str),
                    _ => None,
                };
                if let Some(text) = text {
                    if !out.is_empty() {
                        out.push(' ');
                    }
                    out.push_str(text);
                }
            }
            out
        }
        _ => String::new(),
    }
}

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
    let value: Value = serde_json::from_slice(body).map_err(|e| RequestError {
        message: format!(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON. {e})"
        ),
        param: None,
    })?;
    request_from_value(&value)
}

/// As [`parse_request`], from an already parsed body.
pub fn request_from_value(value: &Value) -> Result<ChatRequest, RequestError> {
    let obj = value.as_object().ok_or_else(|| RequestError {
        message: "Invalid type for request body: expected an object.".into(),
        param: None,
    })?;
    let model = match obj.get("model") {
        Some(Value::String(m)) => m.clone(),
        _ => {
            return Err(RequestError {
                message: "you must provide a model parameter".into(),
                param: None,
            })
        }
    };
    let messages = match obj.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(Value::Array(_)) => {
            return Err(RequestError {
                message: "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.".into(),
                param: Some("messages".into()),
            })
        }
        _ => {
            return Err(RequestError {
                message: "Missing required parameter: 'messages'.".into(),
                param: Some("messages".into()),
            })
        }
    };
    let mut prompt_tokens = 0;
    let mut last_user_text = String::new();
    for (i, msg) in messages.iter().enumerate() {
        let role = msg
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| RequestError {
                message: format!("Missing required parameter: 'messages[{i}].role'."),
                param: Some(format!("messages[{i}].role")),
            })?;
        let text = msg.get("content").map(content_text).unwrap_or_default();
        prompt_tokens += count_words(&text);
        if role == "user" {
            last_user_text = text;
        }
    }
    let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(_) if !stream => {
            return Err(RequestError {
                message: "The 'stream_options' parameter is only allowed when 'stream' is enabled."
                    .into(),
                param: Some("stream_options".into()),
            })
        }
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(RequestError {
                    message: format!(
                        "Invalid type for 'stream_options.include_usage': expected a boolean, but got {} instead.",
                        json_type(other)
                    ),
                    param: Some("stream_options.include_usage".into()),
                })
            }
        },
        Some(other) => {
            return Err(RequestError {
                message: format!(
                    "Invalid type for 'stream_options': expected an object, but got {} instead.",
                    json_type(other)
                ),
                param: Some("stream_options".into()),
            })
        }
    };
    let first_tool = obj
        .get("tools")
        .and_then(Value::as_array)
        .and_then(|t| t.first())
        .and_then(|t| {
            let f = t.get("function")?;
            let name = f.get("name")?.as_str()?.to_string();
            let first_param = f
                .get("parameters")
                .and_then(|p| p.get("properties"))
                .and_then(Value::as_object)
                .and_then(|p| p.keys().next().cloned());
            Some(ToolSpec { name, first_param })
        });
    Ok(ChatRequest {
        model,
        stream,
        include_usage,
        last_user_text,
        prompt_tokens,
        first_tool,
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
        Usage {
            prompt_tokens: reply.prompt_tokens,
            completion_tokens: reply.completion_tokens,
            total_tokens: reply.prompt_tokens + reply.completion_tokens,
            prompt_tokens_details: PromptDetails {
                cached_tokens: 0,
                audio_tokens: 0,
            },
            completion_tokens_details: CompletionDetails {
                reasoning_tokens: 0,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<[ToolCallOut<'a>; 1]>,
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
    match reply.body {
        ReplyBody::Text(_) => "stop",
        ReplyBody::ToolCall(_) => "tool_calls",
    }
}

/// A whole `chat.completion` object.
pub fn completion_json(reply: &Reply) -> Bytes {
    let (content, tool_calls) = match &reply.body {
        ReplyBody::Text(t) => (Some(t.as_str()), None),
        ReplyBody::ToolCall(call) => (
            None,
            Some([ToolCallOut {
                id: &call.id,
                kind: "function",
                function: FunctionCall {
                    name: &call.name,
                    arguments: &call.arguments,
                },
            }]),
        ),
    };
    let completion = Completion {
        id: &reply.id,
        object: "chat.completion",
        created: reply.created,
        model: &reply.model,
        choices: [Choice {
            index: 0,
            message: Message {
                role: "assistant",
                content,
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
    index: u32,
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

/// Splits text into stream pieces, one per word, each word after the first carrying the
/// whitespace before it (as tokens do), so the pieces concatenate back to the text exactly.
pub fn word_pieces(text: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut prev_ws = true;
    for (i, c) in text.char_indices() {
        let ws = c.is_whitespace();
        if ws && !prev_ws && i > 0 {
            pieces.push(&text[start..i]);
            start = i;
        }
        prev_ws = ws;
    }
    if start < text.len() {
        pieces.push(&text[start..]);
    }
    pieces
}

/// Splits tool-call arguments into a few pieces, as OpenAI streams them.
fn argument_pieces(args: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut rest = args;
    while !rest.is_empty() {
        let mut cut = rest.len().min(8);
        while !rest.is_char_boundary(cut) {
            cut += 1;
        }
        pieces.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    pieces
}

/// Every SSE event of a streamed reply, in order, ending with `data: [DONE]`.
pub fn stream_events(reply: &Reply, include_usage: bool) -> Vec<Bytes> {
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
    let mut events = Vec::new();
    match &reply.body {
        ReplyBody::Text(text) => {
            events.push(chunk(
                Delta {
                    role: Some("assistant"),
                    content: Some(Some("")),
                    refusal: Some(None),
                    ..Delta::default()
                },
                None,
            ));
            for piece in word_pieces(text) {
                events.push(chunk(
                    Delta {
                        content: Some(Some(piece)),
                        ..Delta::default()
                    },
                    None,
                ));
            }
        }
        ReplyBody::ToolCall(ToolCall {
            id,
            name,
            arguments,
        }) => {
            events.push(chunk(
                Delta {
                    role: Some("assistant"),
                    content: Some(None),
                    tool_calls: Some([ToolCallDelta {
                        index: 0,
                        id: Some(id),
                        kind: Some("function"),
                        function: FunctionDelta {
                            name: Some(name),
                            arguments: "",
                        },
                    }]),
                    refusal: Some(None),
                },
                None,
            ));
            for piece in argument_pieces(arguments) {
                events.push(chunk(
                    Delta {
                        tool_calls: Some([ToolCallDelta {
                            index: 0,
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
    }
    events.push(chunk(Delta::default(), Some(finish_reason(reply))));
    if include_usage {
        events.push(event(Vec::new(), Some(Some(Usage::of(reply)))));
    }
    events.push(Bytes::from_static(DONE_EVENT));
    events
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
    fn word_pieces_concatenate_back() {
        for text in ["", "one", "mock(groq): hello  big\nworld ", "  lead"] {
            let pieces = word_pieces(text);
            assert_eq!(pieces.concat(), text);
        }
        assert_eq!(word_pieces("a b  c"), vec!["a", " b", "  c"]);
    }

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
        let reply = Reply {
            id: "chatcmpl-x".into(),
            created: 1,
            model: "m".into(),
            body: ReplyBody::Text("a b".into()),
            prompt_tokens: 2,
            completion_tokens: 2,
        };
        let chunks = |include_usage| -> Vec<Value> {
            let events = stream_events(&reply, include_usage);
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
