//! The Anthropic Messages wire format (`POST /v1/messages`), as api.anthropic.com speaks it:
//! request checks, the `message` object, the named server-sent events of a stream, the model
//! list and the error shape.

use bytes::Bytes;
use serde_json::{Map, Value};

use super::{
    base64, content_text, count_words, json_pieces, word_pieces, ChatRequest, Checks, Finish, Obj,
    Reply, RequestError, Thoughts, ToolSpec,
};

/// The request header every call must carry (its value is not checked).
pub const VERSION_HEADER: &str = "anthropic-version";

/// Top-level request fields the Messages API knows; any other is a 400, as there.
const KNOWN_FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "system",
    "metadata",
    "stop_sequences",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "tools",
    "tool_choice",
    "thinking",
    "service_tier",
    "container",
    "mcp_servers",
    "context_management",
    "output_format",
    "output_config",
    "inference_geo",
    "speed",
    "cache_control",
    "diagnostics",
    "user_profile_id",
    "workspace_id",
];

/// The message Anthropic answers a prefilled conversation with, on models without prefill.
pub const PREFILL_REJECTED: &str = "This model does not support assistant message prefill. The conversation must end with a user message.";

fn bad(message: impl Into<String>) -> RequestError {
    RequestError::new(message, None)
}

/// A message's content blocks (a string is one text block).
fn blocks(content: &Value) -> Vec<Value> {
    match content {
        Value::String(s) => vec![serde_json::json!({"type": "text", "text": s})],
        Value::Array(a) => a.clone(),
        _ => Vec::new(),
    }
}

fn block_type(block: &Value) -> &str {
    block.get("type").and_then(Value::as_str).unwrap_or("")
}

/// The ids of a message's blocks of type `kind` (`tool_use`: `id`; `tool_result`: `tool_use_id`).
fn ids(content: &[Value], kind: &str, field: &str) -> Vec<(usize, String)> {
    content
        .iter()
        .enumerate()
        .filter(|(_, b)| block_type(b) == kind)
        .filter_map(|(j, b)| Some((j, b.get(field)?.as_str()?.to_string())))
        .collect()
}

/// Reads a Messages request, checking what the API checks before it answers.
pub fn parse_request(value: &Value, checks: &Checks) -> Result<ChatRequest, RequestError> {
    let obj = value
        .as_object()
        .ok_or_else(|| bad("Input should be a valid dictionary"))?;
    if let Some(extra) = obj.keys().find(|k| !KNOWN_FIELDS.contains(&k.as_str())) {
        return Err(bad(format!("{extra}: Extra inputs are not permitted")));
    }
    let model = match obj.get("model") {
        Some(Value::String(m)) => m.clone(),
        Some(_) => return Err(bad("model: Input should be a valid string")),
        None => return Err(bad("model: Field required")),
    };
    let max_tokens = match obj.get("max_tokens") {
        None => return Err(bad("max_tokens: Field required")),
        Some(v) => match v.as_i64() {
            Some(n) if n >= 1 => n as u64,
            Some(_) => {
                return Err(bad(
                    "max_tokens: Input should be greater than or equal to 1",
                ))
            }
            None => return Err(bad("max_tokens: Input should be a valid integer")),
        },
    };
    let messages = match obj.get("messages") {
        None => return Err(bad("messages: Field required")),
        Some(Value::Array(m)) if m.is_empty() => {
            return Err(bad(
                "messages: List should have at least 1 item after validation, not 0",
            ))
        }
        Some(Value::Array(m)) => m,
        Some(_) => return Err(bad("messages: Input should be a valid list")),
    };

    let mut prompt_tokens = 0;
    match obj.get("system") {
        None | Some(Value::Null) => {}
        Some(s @ Value::String(_)) => prompt_tokens += count_words(&content_text(s)),
        Some(Value::Array(parts)) => {
            for (j, p) in parts.iter().enumerate() {
                if block_type(p) != "text" {
                    return Err(bad(format!("system.{j}.type: Input should be 'text'")));
                }
            }
            prompt_tokens += count_words(&content_text(&Value::Array(parts.clone())));
        }
        Some(_) => return Err(bad("system: Input should be a valid list")),
    }

    let mut roles = Vec::with_capacity(messages.len());
    let mut contents = Vec::with_capacity(messages.len());
    for (i, msg) in messages.iter().enumerate() {
        let role = match msg.get("role").and_then(Value::as_str) {
            Some(r @ ("user" | "assistant")) => r,
            Some("system") => {
                return Err(bad(
                    "messages: Unexpected role \"system\". The Messages API accepts a top-level `system` parameter, not \"system\" as an input message role.",
                ))
            }
            Some(_) => {
                return Err(bad(format!(
                    "messages.{i}.role: Input should be 'user' or 'assistant'"
                )))
            }
            None => return Err(bad(format!("messages.{i}.role: Field required"))),
        };
        let content = match msg.get("content") {
            Some(c @ (Value::String(_) | Value::Array(_))) => blocks(c),
            Some(_) => {
                return Err(bad(format!(
                    "messages.{i}.content: Input should be a valid list"
                )))
            }
            None => return Err(bad(format!("messages.{i}.content: Field required"))),
        };
        for b in &content {
            if block_type(b) == "text" && b.get("text").and_then(Value::as_str) == Some("") {
                return Err(bad("messages: text content blocks must be non-empty"));
            }
        }
        let last = i + 1 == messages.len();
        if content.is_empty() && !(last && role == "assistant") {
            return Err(bad(format!(
                "messages.{i}: all messages must have non-empty content except for the optional final assistant message"
            )));
        }
        prompt_tokens += count_words(&content_text(&Value::Array(content.clone())));
        roles.push(role);
        contents.push(content);
    }
    if roles[0] != "user" {
        return Err(bad("messages: first message must use the \"user\" role"));
    }
    for pair in roles.windows(2) {
        if pair[0] == pair[1] {
            return Err(bad(format!(
                "messages: roles must alternate between \"user\" and \"assistant\", but found multiple \"{}\" roles in a row",
                pair[0]
            )));
        }
    }
    for i in 0..contents.len() {
        if roles[i] == "assistant" {
            let uses = ids(&contents[i], "tool_use", "id");
            if let (false, Some(next)) = (uses.is_empty(), contents.get(i + 1)) {
                let answered: Vec<String> = ids(next, "tool_result", "tool_use_id")
                    .into_iter()
                    .map(|(_, id)| id)
                    .collect();
                let missing: Vec<&str> = uses
                    .iter()
                    .map(|(_, id)| id.as_str())
                    .filter(|id| !answered.iter().any(|a| a == id))
                    .collect();
                if !missing.is_empty() {
                    return Err(bad(format!(
                        "messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: {}. Each `tool_use` block must have a corresponding `tool_result` block in the next message.",
                        missing.join(", ")
                    )));
                }
            }
        } else {
            let asked: Vec<String> = match i.checked_sub(1) {
                Some(prev) => ids(&contents[prev], "tool_use", "id")
                    .into_iter()
                    .map(|(_, id)| id)
                    .collect(),
                None => Vec::new(),
            };
            for (j, id) in ids(&contents[i], "tool_result", "tool_use_id") {
                if !asked.contains(&id) {
                    return Err(bad(format!(
                        "messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: {id}. Each `tool_result` block must have a corresponding `tool_use` block in the previous message."
                    )));
                }
            }
        }
    }
    if roles.last() == Some(&"assistant") {
        if checks.reject_prefill {
            return Err(bad(PREFILL_REJECTED));
        }
        let last = contents.last().expect("messages is not empty");
        let trailing_ws = last
            .iter()
            .rev()
            .find(|b| block_type(b) == "text")
            .and_then(|b| b.get("text").and_then(Value::as_str))
            .is_some_and(|t| t.ends_with(char::is_whitespace));
        if trailing_ws {
            return Err(bad(
                "messages: final assistant content cannot end with trailing whitespace",
            ));
        }
    }
    let last_user_text = (0..contents.len())
        .rev()
        .filter(|&i| roles[i] == "user")
        .map(|i| content_text(&Value::Array(contents[i].clone())))
        .find(|t| !t.is_empty())
        .unwrap_or_default();

    let mut tools = Vec::new();
    match obj.get("tools") {
        None | Some(Value::Null) => {}
        Some(Value::Array(list)) => {
            for (i, t) in list.iter().enumerate() {
                let kind = t.get("type").and_then(Value::as_str);
                if kind.is_some_and(|k| k != "custom") {
                    continue; // a server tool (web search and the like)
                }
                let Some(name) = t.get("name").and_then(Value::as_str) else {
                    return Err(bad(format!("tools.{i}.custom.name: Field required")));
                };
                let Some(schema) = t.get("input_schema") else {
                    return Err(bad(format!(
                        "tools.{i}.custom.input_schema: Field required"
                    )));
                };
                tools.push(ToolSpec {
                    name: name.to_string(),
                    parameters: schema.clone(),
                });
            }
        }
        Some(_) => return Err(bad("tools: Input should be a valid list")),
    }

    let thoughts = match obj.get("thinking") {
        None | Some(Value::Null) => Thoughts::Off,
        Some(t) => match t.get("type").and_then(Value::as_str) {
            Some("enabled") => {
                let budget = t.get("budget_tokens").and_then(Value::as_u64);
                match budget {
                    None => return Err(bad("thinking.enabled.budget_tokens: Field required")),
                    Some(b) if b < 1024 => {
                        return Err(bad(
                            "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024",
                        ))
                    }
                    Some(b) if b >= max_tokens => {
                        return Err(bad(
                            "`max_tokens` must be greater than `thinking.budget_tokens`. Please consult our documentation at https://docs.claude.com/en/docs/build-with-claude/extended-thinking#max-tokens-and-context-window-size",
                        ))
                    }
                    Some(_) => Thoughts::Shown,
                }
            }
            Some("adaptive") => Thoughts::Shown,
            Some("disabled") => Thoughts::Off,
            _ => {
                return Err(bad(
                    "thinking: Input tag does not match any of the expected tags: 'enabled', 'disabled', 'adaptive'",
                ))
            }
        },
    };

    Ok(ChatRequest {
        model,
        stream: obj.get("stream").and_then(Value::as_bool).unwrap_or(false),
        include_usage: false,
        last_user_text,
        prompt_tokens,
        tools,
        max_tokens: Some(max_tokens),
        thoughts,
    })
}

/// The `stop_reason` Anthropic reports for a reply.
pub fn stop_reason(reply: &Reply) -> &'static str {
    match reply.finish {
        Finish::Stop if !reply.tool_calls.is_empty() => "tool_use",
        Finish::Stop | Finish::MalformedFunctionCall => "end_turn",
        Finish::Length => "max_tokens",
        Finish::ContentFilter => "refusal",
    }
}

/// The thinking block's signature (opaque base64, as Anthropic's).
pub fn signature(reply: &Reply) -> String {
    let seed = format!(
        "mock-signature:{}:{}:{}",
        reply.id,
        reply.thinking_tokens,
        reply.thinking.as_deref().unwrap_or("")
    );
    base64(seed.as_bytes())
}

fn usage(reply: &Reply, output_tokens: u64) -> Obj {
    Obj::new()
        .put("input_tokens", reply.prompt_tokens)
        .put("cache_creation_input_tokens", 0)
        .put("cache_read_input_tokens", 0)
        .put("output_tokens", output_tokens)
        .put("service_tier", "standard")
}

fn stop_details(reply: &Reply) -> Option<Obj> {
    (reply.finish == Finish::ContentFilter).then(|| {
        Obj::new()
            .put("type", "refusal")
            .put("category", Value::Null)
            .put("explanation", Value::Null)
    })
}

fn message(reply: &Reply, content: Vec<Obj>, finished: bool, output_tokens: u64) -> Obj {
    let mut m = Obj::new()
        .put("id", &reply.id)
        .put("type", "message")
        .put("role", "assistant")
        .put("model", &reply.model)
        .list("content", content);
    if finished {
        m = m.put("stop_reason", stop_reason(reply));
        m = m.put("stop_sequence", Value::Null);
        if let Some(d) = stop_details(reply) {
            m = m.obj("stop_details", d);
        }
    } else {
        m = m
            .put("stop_reason", Value::Null)
            .put("stop_sequence", Value::Null);
    }
    m.obj("usage", usage(reply, output_tokens))
}

fn output_tokens(reply: &Reply) -> u64 {
    reply.completion_tokens + reply.thinking_tokens
}

/// A whole `message` object.
pub fn message_json(reply: &Reply) -> Bytes {
    let mut content = Vec::new();
    if let Some(thinking) = &reply.thinking {
        content.push(
            Obj::new()
                .put("type", "thinking")
                .put("thinking", thinking)
                .put("signature", signature(reply)),
        );
    }
    if let Some(text) = &reply.text {
        content.push(Obj::new().put("type", "text").put("text", text));
    }
    for call in &reply.tool_calls {
        content.push(
            Obj::new()
                .put("type", "tool_use")
                .put("id", &call.id)
                .put("name", &call.name)
                .put("input", call.arguments_value()),
        );
    }
    Bytes::from(message(reply, content, true, output_tokens(reply)).done())
}

/// One named server-sent event.
pub fn sse_event(name: &str, data: &str) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

fn typed(kind: &str) -> Obj {
    Obj::new().put("type", kind)
}

/// Every event of a streamed reply, in order: `message_start`, `ping`, for each content block
/// (thinking, text, each tool use) `content_block_start`, its deltas and `content_block_stop`,
/// then `message_delta` (stop reason and output tokens) and `message_stop`.
pub fn stream_events(reply: &Reply) -> Vec<Bytes> {
    let mut events = vec![
        sse_event(
            "message_start",
            &typed("message_start")
                .obj("message", message(reply, Vec::new(), false, 1))
                .done(),
        ),
        sse_event("ping", r#"{"type": "ping"}"#),
    ];
    let mut index = 0usize;
    let mut block = |events: &mut Vec<Bytes>, start: Obj, deltas: Vec<Obj>| {
        events.push(sse_event(
            "content_block_start",
            &typed("content_block_start")
                .put("index", index)
                .obj("content_block", start)
                .done(),
        ));
        for delta in deltas {
            events.push(sse_event(
                "content_block_delta",
                &typed("content_block_delta")
                    .put("index", index)
                    .obj("delta", delta)
                    .done(),
            ));
        }
        events.push(sse_event(
            "content_block_stop",
            &typed("content_block_stop").put("index", index).done(),
        ));
        index += 1;
    };
    if let Some(thinking) = &reply.thinking {
        let mut deltas: Vec<Obj> = word_pieces(thinking)
            .into_iter()
            .map(|p| typed("thinking_delta").put("thinking", p))
            .collect();
        deltas.push(typed("signature_delta").put("signature", signature(reply)));
        block(
            &mut events,
            typed("thinking").put("thinking", "").put("signature", ""),
            deltas,
        );
    }
    if let Some(text) = &reply.text {
        let deltas = word_pieces(text)
            .into_iter()
            .map(|p| typed("text_delta").put("text", p))
            .collect();
        block(&mut events, typed("text").put("text", ""), deltas);
    }
    for call in &reply.tool_calls {
        // As the API does: an empty first piece, then the JSON in a few pieces.
        let deltas = std::iter::once("")
            .chain(json_pieces(&call.arguments))
            .map(|p| typed("input_json_delta").put("partial_json", p))
            .collect();
        block(
            &mut events,
            typed("tool_use")
                .put("id", &call.id)
                .put("name", &call.name)
                .put("input", Map::new()),
            deltas,
        );
    }
    let mut delta = Obj::new()
        .put("stop_reason", stop_reason(reply))
        .put("stop_sequence", Value::Null);
    if let Some(d) = stop_details(reply) {
        delta = delta.obj("stop_details", d);
    }
    events.push(sse_event(
        "message_delta",
        &typed("message_delta")
            .obj("delta", delta)
            .obj(
                "usage",
                Obj::new().put("output_tokens", output_tokens(reply)),
            )
            .done(),
    ));
    events.push(sse_event("message_stop", &typed("message_stop").done()));
    events
}

/// `{"type":"error","error":{"type":…,"message":…}}`.
pub fn error_json(kind: &str, message: &str) -> Bytes {
    Bytes::from(
        typed("error")
            .obj(
                "error",
                Obj::new().put("type", kind).put("message", message),
            )
            .done(),
    )
}

/// The event Anthropic sends when a stream fails after it began.
pub fn error_event(kind: &str, message: &str) -> Bytes {
    let json = error_json(kind, message);
    sse_event("error", std::str::from_utf8(&json).expect("utf-8"))
}

/// The error `type` Anthropic uses with a status.
pub fn error_type_for_status(status: u16) -> &'static str {
    match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    }
}

/// The status Anthropic answers an error `type` with.
pub fn status_for_error_type(kind: &str) -> u16 {
    match kind {
        "invalid_request_error" => 400,
        "authentication_error" => 401,
        "billing_error" => 402,
        "permission_error" => 403,
        "not_found_error" => 404,
        "request_too_large" => 413,
        "rate_limit_error" => 429,
        "timeout_error" => 504,
        "overloaded_error" => 529,
        _ => 500,
    }
}

/// The error body Anthropic sends with a status, when a script names none.
pub fn default_error_for_status(status: u16, model: &str) -> Bytes {
    let kind = error_type_for_status(status);
    let message = match status {
        400 => "Invalid request (mock).".to_string(),
        401 => "invalid x-api-key".to_string(),
        403 => "Your API key does not have permission to use the specified resource.".into(),
        404 => format!("model: {model}"),
        413 => "Request exceeds the maximum allowed number of bytes.".into(),
        429 => "Number of request tokens has exceeded your per-minute rate limit (https://docs.claude.com/en/api/rate-limits); see the response headers for current usage. Please reduce the prompt length or the maximum tokens requested, or try again later. You may also contact sales at https://www.anthropic.com/contact-sales to discuss your options for a rate limit increase.".into(),
        503 | 529 => "Overloaded".into(),
        _ => "Internal server error".into(),
    };
    error_json(kind, &message)
}

/// `GET /v1/models`: `{"data":[{"type":"model","id","display_name","created_at"}],"has_more",…}`.
pub fn models_json(models: &[String]) -> Bytes {
    let data = models
        .iter()
        .map(|id| {
            Obj::new()
                .put("type", "model")
                .put("id", id)
                .put("display_name", id)
                .put("created_at", "2025-01-01T00:00:00Z")
        })
        .collect();
    Bytes::from(
        Obj::new()
            .list("data", data)
            .put("has_more", false)
            .put("first_id", models.first())
            .put("last_id", models.last())
            .done(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<ChatRequest, RequestError> {
        parse_request(&v, &Checks::default())
    }

    fn err(v: Value) -> String {
        parse(v).unwrap_err().message
    }

    #[test]
    fn reads_a_request() {
        let r = parse(
            json!({"model": "claude-x", "max_tokens": 2000, "system": "be brief",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}},
                      {"type": "web_search_20250305", "name": "web_search"}],
            "thinking": {"type": "enabled", "budget_tokens": 1024}, "stream": true}),
        )
        .unwrap();
        assert_eq!(r.model, "claude-x");
        assert_eq!(r.max_tokens, Some(2000));
        assert_eq!(r.prompt_tokens, 4);
        assert_eq!(r.last_user_text, "hello there");
        assert_eq!(r.tools.len(), 1);
        assert!(r.stream);
        assert_eq!(r.thoughts, Thoughts::Shown);
    }

    #[test]
    fn checks_as_the_api() {
        let user = json!({"role": "user", "content": "hi"});
        let asst = json!({"role": "assistant", "content": "yo"});
        let base = |messages: Value| json!({"model": "m", "max_tokens": 10, "messages": messages});
        assert!(err(json!({"model": "m", "messages": [user]})).contains("max_tokens"));
        assert!(err(base(json!([]))).contains("at least 1 item"));
        assert!(err(base(json!([asst]))).contains("first message"));
        assert!(err(base(json!([user, user]))).contains("alternate"));
        assert!(err(base(json!([{"role": "system", "content": "x"}, user])))
            .contains("top-level `system`"));
        assert!(
            err(base(json!([{"role": "tool", "content": "x"}]))).contains("'user' or 'assistant'")
        );
        assert!(
            err(base(json!([user, {"role": "assistant", "content": "so "}])))
                .contains("trailing whitespace")
        );
        assert!(parse(base(json!([user, asst]))).is_ok());
        let prefill = parse_request(
            &base(json!([user, asst])),
            &Checks {
                reject_prefill: true,
                ..Checks::default()
            },
        );
        assert_eq!(prefill.unwrap_err().message, PREFILL_REJECTED);
        let mut extra = base(json!([user]));
        extra["n"] = json!(2);
        assert!(err(extra).starts_with("n: Extra inputs"));
        let mut thinking = base(json!([user]));
        thinking["thinking"] = json!({"type": "enabled", "budget_tokens": 2000});
        assert!(err(thinking).contains("greater than `thinking.budget_tokens`"));
    }

    #[test]
    fn tool_results_must_answer_tool_uses() {
        let base = |messages: Value| json!({"model": "m", "max_tokens": 10, "messages": messages});
        let use_ = json!({"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]});
        let result = |id: &str| {
            json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": id, "content": "42"}]})
        };
        let user = json!({"role": "user", "content": "hi"});
        assert!(parse(base(json!([user, use_, result("toolu_1")]))).is_ok());
        assert!(err(base(json!([user, use_, result("toolu_2")])))
            .contains("`tool_use` ids were found without"));
        assert!(err(base(json!([result("toolu_1")]))).contains("unexpected `tool_use_id`"));
        // A trailing tool use is a prefill, fine.
        assert!(parse(base(json!([user, use_]))).is_ok());
    }
}
