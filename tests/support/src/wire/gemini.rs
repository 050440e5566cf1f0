//! The Gemini API wire format (`models/{model}:generateContent` and `:streamGenerateContent`),
//! as generativelanguage.googleapis.com speaks it: request checks, the `GenerateContentResponse`
//! object, its stream (server-sent events with `alt=sse`, else one JSON array sent piece by
//! piece), the model list and Google's error shape.

use bytes::Bytes;
use serde_json::{json, Value};

use super::{
    content_text, count_words, word_pieces, ChatRequest, Finish, Obj, Reply, RequestError,
    Thoughts, ToolSpec,
};

/// Top-level request fields the API knows (JSON names in either case style, as protobuf JSON
/// accepts); any other is a 400, as there.
const KNOWN_FIELDS: &[&str] = &[
    "contents",
    "tools",
    "toolConfig",
    "tool_config",
    "safetySettings",
    "safety_settings",
    "systemInstruction",
    "system_instruction",
    "generationConfig",
    "generation_config",
    "cachedContent",
    "cached_content",
    "model",
    "labels",
    "serviceTier",
    "service_tier",
    "store",
    "continuationToken",
    "continuation_token",
];

/// At most this many `stopSequences`.
pub const MAX_STOP_SEQUENCES: usize = 5;

/// A field by its JSON name or its proto name.
fn field<'a>(obj: &'a Value, camel: &str, snake: &str) -> Option<&'a Value> {
    obj.get(camel).or_else(|| obj.get(snake))
}

/// The canonical status name of an HTTP code, as Google's APIs pair them.
pub fn status_name(code: u16) -> &'static str {
    match code {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ABORTED",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        501 => "UNIMPLEMENTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "INTERNAL",
    }
}

/// The HTTP code of a status name (500 for an unknown one).
pub fn code_of_status(status: &str) -> u16 {
    match status {
        "INVALID_ARGUMENT" | "FAILED_PRECONDITION" | "OUT_OF_RANGE" => 400,
        "UNAUTHENTICATED" => 401,
        "PERMISSION_DENIED" => 403,
        "NOT_FOUND" => 404,
        "ABORTED" | "ALREADY_EXISTS" => 409,
        "RESOURCE_EXHAUSTED" => 429,
        "CANCELLED" => 499,
        "UNIMPLEMENTED" => 501,
        "UNAVAILABLE" => 503,
        "DEADLINE_EXCEEDED" => 504,
        _ => 500,
    }
}

/// `{"error":{"code","message","status"[,"details"]}}`.
pub fn error_value(code: u16, message: &str, status: &str, details: Option<Value>) -> Value {
    let mut error = json!({"code": code, "message": message, "status": status});
    if let Some(d) = details {
        error["details"] = d;
    }
    json!({ "error": error })
}

fn error_bytes(code: u16, message: &str, status: &str, details: Option<Value>) -> Bytes {
    // Field order as Google sends it: code, message, status, details.
    let mut e = Obj::new()
        .put("code", code)
        .put("message", message)
        .put("status", status);
    if let Some(d) = details {
        e = e.put("details", d);
    }
    Bytes::from(Obj::new().obj("error", e).done())
}

/// Google's error body for `code` with its canonical status.
pub fn error_json(code: u16, message: &str) -> Bytes {
    error_bytes(code, message, status_name(code), None)
}

fn invalid(message: impl Into<String>) -> RequestError {
    RequestError::new(message, None)
}

/// The answer to a key Google does not know: 400 `API_KEY_INVALID`.
pub fn bad_key_json() -> Bytes {
    let message = "API key not valid. Please pass a valid API key.";
    error_bytes(
        400,
        message,
        "INVALID_ARGUMENT",
        Some(json!([
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
             "domain": "googleapis.com",
             "metadata": {"service": "generativelanguage.googleapis.com"}},
            {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US",
             "message": message}
        ])),
    )
}

/// The answer to a call with no key: 403 `PERMISSION_DENIED`.
pub fn no_key_json() -> Bytes {
    error_bytes(
        403,
        "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.",
        "PERMISSION_DENIED",
        Some(json!([
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "CREDENTIALS_MISSING",
             "domain": "googleapis.com",
             "metadata": {"service": "generativelanguage.googleapis.com",
                          "method": "google.ai.generativelanguage.v1beta.GenerativeService.GenerateContent"}}
        ])),
    )
}

/// The body for a rejected request: Google's shape, with the request error's message.
pub fn request_error_json(e: &RequestError) -> Bytes {
    match &e.body {
        Some(b) => Bytes::from(b.to_string()),
        None => error_json(e.status, &e.message),
    }
}

/// Reads a `generateContent` request for `model`, checking what the API checks before it
/// answers.
pub fn parse_request(
    value: &Value,
    model: &str,
    stream: bool,
) -> Result<ChatRequest, RequestError> {
    let obj = value
        .as_object()
        .ok_or_else(|| invalid("Invalid JSON payload received. Expected an object."))?;
    if let Some(extra) = obj.keys().find(|k| !KNOWN_FIELDS.contains(&k.as_str())) {
        let message =
            format!("Invalid JSON payload received. Unknown name \"{extra}\": Cannot find field.");
        return Err(RequestError {
            body: Some(error_value(
                400,
                &message,
                "INVALID_ARGUMENT",
                Some(
                    json!([{"@type": "type.googleapis.com/google.rpc.BadRequest",
                    "fieldViolations": [{"description": message}]}]),
                ),
            )),
            ..invalid(message.clone())
        });
    }
    let contents = match obj.get("contents") {
        Some(Value::Array(c)) if !c.is_empty() => c,
        _ => {
            return Err(invalid(
                "* GenerateContentRequest.contents: contents is not specified\n",
            ))
        }
    };
    let mut prompt_tokens = 0;
    if let Some(system) = field(value, "systemInstruction", "system_instruction") {
        prompt_tokens += count_words(&content_text(system.get("parts").unwrap_or(&Value::Null)));
    }
    let mut last_user_text = String::new();
    for (i, content) in contents.iter().enumerate() {
        let role = content
            .get("role")
            .and_then(Value::as_str)
            .unwrap_or("user");
        if role != "user" && role != "model" {
            return Err(invalid("Please use a valid role: user, model."));
        }
        let parts = match content.get("parts") {
            Some(Value::Array(p)) if !p.is_empty() => p,
            _ => {
                return Err(invalid(format!(
                "* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty.\n"
            )))
            }
        };
        for (j, part) in parts.iter().enumerate() {
            if let Some(fr) = field(part, "functionResponse", "function_response") {
                let named = fr
                    .get("name")
                    .and_then(Value::as_str)
                    .is_some_and(|n| !n.is_empty());
                if !named {
                    return Err(invalid(format!(
                        "* GenerateContentRequest.contents[{i}].parts[{j}].function_response.name: Name cannot be empty.\n"
                    )));
                }
            }
            if let Some(fc) = field(part, "functionCall", "function_call") {
                let named = fc
                    .get("name")
                    .and_then(Value::as_str)
                    .is_some_and(|n| !n.is_empty());
                if !named {
                    return Err(invalid(format!(
                        "* GenerateContentRequest.contents[{i}].parts[{j}].function_call.name: Name cannot be empty.\n"
                    )));
                }
            }
        }
        let text = content_text(&Value::Array(parts.clone()));
        prompt_tokens += count_words(&text);
        if role == "user" && !text.is_empty() {
            last_user_text = text;
        }
    }
    let config = field(value, "generationConfig", "generation_config");
    let stops = config
        .and_then(|c| field(c, "stopSequences", "stop_sequences"))
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    if stops > MAX_STOP_SEQUENCES {
        return Err(invalid(format!(
            "* GenerateContentRequest.generation_config.stop_sequences: the number of stop_sequences must not exceed {MAX_STOP_SEQUENCES}, got {stops}.\n"
        )));
    }
    let max_tokens = config
        .and_then(|c| field(c, "maxOutputTokens", "max_output_tokens"))
        .and_then(Value::as_u64);
    let include_thoughts = config
        .and_then(|c| field(c, "thinkingConfig", "thinking_config"))
        .and_then(|t| field(t, "includeThoughts", "include_thoughts"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut tools = Vec::new();
    if let Some(list) = obj.get("tools").and_then(Value::as_array) {
        for (i, tool) in list.iter().enumerate() {
            let decls = field(tool, "functionDeclarations", "function_declarations")
                .and_then(Value::as_array);
            for (j, decl) in decls.into_iter().flatten().enumerate() {
                let name = decl.get("name").and_then(Value::as_str).unwrap_or("");
                if name.is_empty() {
                    return Err(invalid(format!(
                        "* GenerateContentRequest.tools[{i}].function_declarations[{j}].name: Name cannot be empty.\n"
                    )));
                }
                let parameters = decl
                    .get("parameters")
                    .or_else(|| field(decl, "parametersJsonSchema", "parameters_json_schema"))
                    .cloned()
                    .unwrap_or(Value::Null);
                tools.push(ToolSpec {
                    name: name.to_string(),
                    parameters,
                });
            }
        }
    }
    Ok(ChatRequest {
        model: model.to_string(),
        stream,
        include_usage: false,
        last_user_text,
        prompt_tokens,
        tools,
        max_tokens,
        thoughts: if include_thoughts {
            Thoughts::Shown
        } else {
            Thoughts::Hidden
        },
    })
}

/// The `finishReason` Gemini reports for a reply.
pub fn finish_reason(reply: &Reply) -> &'static str {
    match reply.finish {
        Finish::Stop => "STOP",
        Finish::Length => "MAX_TOKENS",
        Finish::ContentFilter => "SAFETY",
        Finish::MalformedFunctionCall => "MALFORMED_FUNCTION_CALL",
    }
}

fn usage(reply: &Reply, finished: bool) -> Obj {
    let prompt_details = || {
        vec![Obj::new()
            .put("modality", "TEXT")
            .put("tokenCount", reply.prompt_tokens)]
    };
    if !finished {
        let u = Obj::new()
            .put("promptTokenCount", reply.prompt_tokens)
            .put(
                "totalTokenCount",
                reply.prompt_tokens + reply.thinking_tokens,
            )
            .list("promptTokensDetails", prompt_details());
        return if reply.thinking_tokens > 0 {
            u.put("thoughtsTokenCount", reply.thinking_tokens)
        } else {
            u
        };
    }
    let mut u = Obj::new().put("promptTokenCount", reply.prompt_tokens);
    if reply.completion_tokens > 0 {
        u = u.put("candidatesTokenCount", reply.completion_tokens);
    }
    u = u
        .put(
            "totalTokenCount",
            reply.prompt_tokens + reply.completion_tokens + reply.thinking_tokens,
        )
        .list("promptTokensDetails", prompt_details());
    if reply.thinking_tokens > 0 {
        u = u.put("thoughtsTokenCount", reply.thinking_tokens);
    }
    u
}

fn safety_ratings() -> Vec<Obj> {
    [
        ("HARM_CATEGORY_SEXUALLY_EXPLICIT", "NEGLIGIBLE", false),
        ("HARM_CATEGORY_HATE_SPEECH", "NEGLIGIBLE", false),
        ("HARM_CATEGORY_HARASSMENT", "NEGLIGIBLE", false),
        ("HARM_CATEGORY_DANGEROUS_CONTENT", "HIGH", true),
    ]
    .into_iter()
    .map(|(category, probability, blocked)| {
        let r = Obj::new()
            .put("category", category)
            .put("probability", probability);
        if blocked {
            r.put("blocked", true)
        } else {
            r
        }
    })
    .collect()
}

/// One candidate; `finished` adds the finish reason (and safety ratings for `SAFETY`).
fn candidate(reply: &Reply, parts: Vec<Obj>, finished: bool) -> Obj {
    let mut c = Obj::new();
    if !parts.is_empty() {
        c = c.obj(
            "content",
            Obj::new().list("parts", parts).put("role", "model"),
        );
    }
    if finished {
        c = c.put("finishReason", finish_reason(reply));
        if reply.finish == Finish::ContentFilter {
            c = c.list("safetyRatings", safety_ratings());
        }
        if reply.finish == Finish::MalformedFunctionCall {
            c = c.put(
                "finishMessage",
                "Malformed function call: the model produced a function call that could not be parsed.",
            );
        }
    }
    c.put("index", 0)
}

fn response(reply: &Reply, parts: Vec<Obj>, finished: bool) -> String {
    Obj::new()
        .list("candidates", vec![candidate(reply, parts, finished)])
        .obj("usageMetadata", usage(reply, finished))
        .put("modelVersion", &reply.model)
        .put("responseId", &reply.id)
        .done()
}

fn call_parts(reply: &Reply) -> Vec<Obj> {
    reply
        .tool_calls
        .iter()
        .map(|call| {
            Obj::new().obj(
                "functionCall",
                Obj::new()
                    .put("name", &call.name)
                    .put("args", call.arguments_value()),
            )
        })
        .collect()
}

fn thought_part(text: &str) -> Obj {
    Obj::new().put("text", text).put("thought", true)
}

fn text_part(text: &str) -> Obj {
    Obj::new().put("text", text)
}

/// A whole `GenerateContentResponse`.
pub fn response_json(reply: &Reply) -> Bytes {
    let mut parts = Vec::new();
    if let Some(t) = &reply.thinking {
        parts.push(thought_part(t));
    }
    if let Some(t) = &reply.text {
        parts.push(text_part(t));
    }
    parts.extend(call_parts(reply));
    Bytes::from(response(reply, parts, true))
}

/// The streamed responses of a reply, in order: one per thought piece and text piece (a word
/// each), then the function calls; the last chunk carries the finish reason and the full usage.
pub fn stream_chunks(reply: &Reply) -> Vec<String> {
    let mut parts: Vec<Obj> = Vec::new();
    if let Some(t) = &reply.thinking {
        parts.extend(word_pieces(t).into_iter().map(thought_part));
    }
    if let Some(t) = &reply.text {
        parts.extend(word_pieces(t).into_iter().map(text_part));
    }
    // As Gemini streams: function calls come in a chunk of their own (the last); without them
    // the last piece of text rides with the finish.
    let last = if reply.tool_calls.is_empty() {
        parts.pop()
    } else {
        None
    };
    let mut chunks: Vec<String> = parts
        .into_iter()
        .map(|p| response(reply, vec![p], false))
        .collect();
    let mut final_parts: Vec<Obj> = last.into_iter().collect();
    final_parts.extend(call_parts(reply));
    chunks.push(response(reply, final_parts, true));
    chunks
}

/// One server-sent event, framed as Google frames them (`\r\n\r\n`).
pub fn sse_event(json: &str) -> Bytes {
    Bytes::from(format!("data: {json}\r\n\r\n"))
}

/// The stream's pieces: with `sse`, one event per chunk; else the pieces of one JSON array
/// (`[` + first, `,\r\n` + each next, then `]`).
pub fn stream_events(reply: &Reply, sse: bool) -> Vec<Bytes> {
    frame(stream_chunks(reply), sse)
}

/// Frames chunks as SSE events or as the pieces of a JSON array (with its closing `]` piece).
pub fn frame(chunks: Vec<String>, sse: bool) -> Vec<Bytes> {
    if sse {
        return chunks.iter().map(|c| sse_event(c)).collect();
    }
    let mut out: Vec<Bytes> = chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| Bytes::from(format!("{}{c}", if i == 0 { "[" } else { ",\r\n" })))
        .collect();
    out.push(Bytes::from_static(b"]"));
    out
}

/// The error chunk Gemini sends when a stream fails after it began.
pub fn stream_error_chunk(status: &str, message: &str) -> String {
    let bytes = error_bytes(code_of_status(status), message, status, None);
    String::from_utf8(bytes.to_vec()).expect("utf-8")
}

/// The error body Gemini sends with a status, when a script names none. `retry_delay` (such as
/// `"7s"`) adds a `google.rpc.RetryInfo` to a 429.
pub fn default_error_for_status(status: u16, model: &str, retry_delay: Option<&str>) -> Bytes {
    let message = match status {
        400 => "Request contains an invalid argument.".to_string(),
        401 => "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.".into(),
        403 => "The caller does not have permission".into(),
        404 => format!("models/{model} is not found for API version v1beta, or is not supported for generateContent. Call ListModels to see the list of available models and their supported methods."),
        429 => "You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.".into(),
        503 => "The model is overloaded. Please try again later.".into(),
        504 => "The request timed out. Please try again.".into(),
        _ => "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting".into(),
    };
    let details = (status == 429).then(|| {
        let mut d = vec![
            json!({"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
                "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                "quotaDimensions": {"location": "global", "model": model},
                "quotaValue": "10"}]}),
            json!({"@type": "type.googleapis.com/google.rpc.Help", "links": [{
                "description": "Learn more about Gemini API quotas",
                "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]}),
        ];
        if let Some(delay) = retry_delay {
            d.push(json!({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}));
        }
        Value::Array(d)
    });
    error_bytes(status, &message, status_name(status), details)
}

/// `GET /v1beta/models`: `{"models":[{"name":"models/…",…}]}`.
pub fn models_json(models: &[String]) -> Bytes {
    let list = models
        .iter()
        .map(|id| {
            Obj::new()
                .put("name", format!("models/{id}"))
                .put("version", "001")
                .put("displayName", id)
                .put("inputTokenLimit", 1_048_576)
                .put("outputTokenLimit", 65_536)
                .put(
                    "supportedGenerationMethods",
                    ["generateContent", "countTokens"],
                )
        })
        .collect();
    Bytes::from(Obj::new().list("models", list).done())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(v: Value) -> String {
        parse_request(&v, "gemini-x", false).unwrap_err().message
    }

    #[test]
    fn reads_a_request() {
        let r = parse_request(
            &json!({"contents": [{"role": "user", "parts": [{"text": "hi there"}]}],
                "systemInstruction": {"parts": [{"text": "be brief"}]},
                "tools": [{"functionDeclarations": [{"name": "f", "parameters": {"type": "OBJECT"}}]}],
                "generationConfig": {"maxOutputTokens": 7, "thinkingConfig": {"includeThoughts": true}}}),
            "gemini-x",
            true,
        )
        .unwrap();
        assert_eq!(r.model, "gemini-x");
        assert!(r.stream);
        assert_eq!(r.prompt_tokens, 4);
        assert_eq!(r.last_user_text, "hi there");
        assert_eq!(r.tools[0].name, "f");
        assert_eq!(r.max_tokens, Some(7));
        assert_eq!(r.thoughts, Thoughts::Shown);
    }

    #[test]
    fn checks_as_the_api() {
        assert!(err(json!({"contents": []})).contains("contents is not specified"));
        assert!(
            err(json!({"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}))
                .contains("valid role")
        );
        assert!(err(json!({"contents": [{"role": "user", "parts": [{"functionResponse": {"response": {}}}]}]}))
            .contains("function_response.name"));
        assert!(err(json!({"contents": [{"parts": [{"text": "x"}]}],
            "generationConfig": {"stopSequences": ["a", "b", "c", "d", "e", "f"]}}))
        .contains("stop_sequences"));
        assert!(
            err(json!({"contents": [{"parts": [{"text": "x"}]}], "temperature": 1}))
                .contains("Unknown name \"temperature\"")
        );
    }

    #[test]
    fn json_array_framing_is_one_array() {
        let chunks = vec!["{\"a\":1}".to_string(), "{\"b\":2}".to_string()];
        let joined: Vec<u8> = frame(chunks, false).concat();
        let v: Value = serde_json::from_slice(&joined).unwrap();
        assert_eq!(v, json!([{"a": 1}, {"b": 2}]));
    }
}
