//! Anthropic Messages (`POST /v1/messages`): OpenAI chat-completions requests are rewritten into
//! Messages requests, and Messages answers and event streams are translated back into OpenAI's
//! shapes (a `chat.completion`, or `chat.completion.chunk` events ending with `[DONE]`).
//!
//! One rewrite changes how the answer must be read: a `json_schema` response format (when the
//! client sent no tools of its own) becomes a tool the model is forced to call, whose input is
//! the answer. [`Adapter::answer`] and [`Adapter::stream`] see only the response, so that tool
//! is recognised by its name alone: it starts with [`JSON_TOOL_PREFIX`], a prefix client tools
//! may not use. Its input reaches the client as the message content, with
//! `finish_reason: "stop"`; the client never sees a tool call it did not define.

use super::{
    out, Adapter, Answer, ReplyCtx, StreamState, StreamTranslator, Target, UpstreamRequest,
};
use crate::error::ApiError;
use crate::upstream::{self, BodyHints, Cause, Failure, Hints};
use crate::wire::openai::{error_message, ChatRequest, Usage};
use crate::wire::sse::SseFramer;
use serde::de::{Deserializer, Visitor};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::borrow::Cow;
use std::fmt;

/// The Anthropic Messages adapter.
pub struct Anthropic;

/// Starts the name of the forced tool that carries a `json_schema` answer. Reserved (a client
/// tool with this prefix is refused) so that a response alone says whether a tool call is
/// really that answer.
pub const JSON_TOOL_PREFIX: &str = "freerelay_json_";

/// The Messages API version every request is written for.
const API_VERSION: &str = "2023-06-01";

/// Thinking budgets for OpenAI's `reasoning_effort` levels (`none` and `minimal`: no thinking).
const BUDGETS: [(&str, u64); 3] = [("low", 1024), ("medium", 4096), ("high", 16_384)];

/// Anthropic's smallest thinking budget: below it, thinking cannot be turned on.
const MIN_BUDGET: u64 = 1024;

/// Image types the Messages API accepts as base64 data.
const IMAGE_TYPES: [&str; 4] = ["image/jpeg", "image/png", "image/gif", "image/webp"];

/// Carries a client's partial answer to a model that rejects prefills (or while thinking).
const CONTINUE: &str =
    "Continue the assistant's reply exactly where it leaves off, without repeating it:";

/// `response_format: {"type": "json_object"}`, as an instruction (Anthropic has no JSON mode).
const JSON_OBJECT: &str = "Respond with a single JSON object only.";

/// Describes the forced answer tool to the model when the schema has no description.
const JSON_TOOL_DESCRIPTION: &str =
    "Give your complete final answer as this tool's input, following its schema exactly.";

impl Adapter for Anthropic {
    fn request(&self, target: &Target<'_>, req: &ChatRequest) -> Result<UpstreamRequest, ApiError> {
        let body = messages_body(target, req)?;
        Ok(UpstreamRequest {
            url: format!("{}/messages", target.base_url),
            headers: {
                let mut h = super::base_headers(req.stream);
                h.push(("anthropic-version", API_VERSION.into()));
                h
            },
            body: serde_json::to_vec(&body).unwrap_or_default(),
        })
    }

    fn answer(&self, body: &[u8], ctx: &ReplyCtx) -> Result<Answer, String> {
        translate_answer(body, ctx)
    }

    fn stream(&self, ctx: ReplyCtx) -> Box<dyn StreamTranslator> {
        let text = ctx.collect_text.then(String::new);
        Box::new(AnthropicStream {
            framer: SseFramer::default(),
            t: Translator {
                ctx,
                state: StreamState {
                    text,
                    ..StreamState::default()
                },
                new_usage: None,
                started: false,
                blocks: Vec::new(),
                tool_calls: 0,
                json_answer: false,
                stop_reason: None,
                tokens: Tokens::default(),
            },
        })
    }

    fn error_detail(&self, body: &[u8]) -> Option<String> {
        anthropic_error(body).or_else(|| error_message(body))
    }

    /// Anthropic's error types follow its statuses (`rate_limit_error` 429, `overloaded_error`
    /// 529, …) and its wordings are recognised in [`upstream::judge_body`]: "prompt is too
    /// long: N tokens > M maximum" and "input length and `max_tokens` exceed context limit"
    /// (context), "Output blocked by content filtering policy" (content filter). What needs
    /// this adapter: a spent credit balance ("Your credit balance is too low…", sent as a 400
    /// `invalid_request_error`, or a 402 `billing_error`) is the key's problem, not the
    /// client's: the key is set aside and another provider tried.
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
        let billing = detail.as_deref().is_some_and(|d| {
            d.contains("(billing_error)") || d.contains("credit balance is too low")
        });
        let found = BodyHints {
            cause: billing.then_some(Cause::KeyRefused),
            ..BodyHints::default()
        };
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

// ---------------------------------------------------------------------------------------------
// Request: OpenAI chat completions -> Anthropic Messages
// ---------------------------------------------------------------------------------------------

/// A 400 naming the offending parameter, as OpenAI words them.
fn invalid(message: impl Into<String>, param: &str) -> ApiError {
    ApiError::invalid_request(message, Some(param))
}

/// The Messages body for `req`: only what Anthropic understands is written; OpenAI-only fields
/// (`logprobs`, penalties, `seed`, `logit_bias`, `store`, `metadata`, `service_tier`,
/// `stream_options`…) are dropped, and what cannot be carried (`n` > 1) is refused.
fn messages_body(target: &Target<'_>, req: &ChatRequest) -> Result<Value, ApiError> {
    let b = req.body();
    check_n(b)?;
    let messages = b
        .get("messages")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    let Conversation {
        mut system,
        mut turns,
    } = conversation(messages)?;
    let mut tools = tools(b.get("tools"))?;
    let mut choice = tool_choice(b.get("tool_choice"))?;
    match response_format(b.get("response_format"))? {
        Format::Free => {}
        Format::JsonObject => system.push(JSON_OBJECT.into()),
        Format::Schema {
            name,
            schema,
            description,
        } if tools.is_empty() && object_schema(schema).is_some() => {
            let name = json_tool_name(name);
            tools.push(json!({
                "name": name,
                "description": description.unwrap_or(JSON_TOOL_DESCRIPTION),
                "input_schema": object_schema(schema),
            }));
            choice = Some(Choice::Function(name));
        }
        // The client's tools stay callable, so the schema can only be asked for in words.
        Format::Schema { schema, .. } => system.push(format!(
            "Respond with a single JSON object that conforms to this JSON Schema, and nothing \
             else:\n{schema}"
        )),
    }

    let max_output = u64::from(target.info.max_output).max(1);
    let requested = requested_max_tokens(b)?;
    // Anthropic refuses thinking together with a forced tool: the client's tool choice wins.
    let forced = matches!(choice, Some(Choice::Required | Choice::Function(_)));
    // While thinking, Anthropic wants the assistant turn that called tools to start with its
    // signed thinking block, which OpenAI clients cannot send back: a tool loop continues
    // without thinking.
    let in_tool_loop = turns
        .iter()
        .rev()
        .find(|t| t.role == Role::Assistant)
        .is_some_and(|t| t.blocks.iter().any(is_tool_use));
    let thinking = reasoning_budget(b.get("reasoning_effort"))?
        .filter(|_| target.info.caps.reasoning && !forced && !in_tool_loop)
        .and_then(|budget| fit_thinking(budget, requested, max_output));
    let max_tokens = thinking.map_or_else(
        || requested.unwrap_or(max_output).min(max_output),
        |t| t.max_tokens,
    );
    prefill(
        &mut turns,
        &mut system,
        target.info.caps.prefill && thinking.is_none(),
    );
    if turns.is_empty() {
        return Err(invalid(
            "`messages` must contain at least one user or assistant message with content.",
            "messages",
        ));
    }

    let mut body = Map::new();
    body.insert("model".into(), json!(target.model));
    body.insert("max_tokens".into(), json!(max_tokens));
    if !system.is_empty() {
        body.insert("system".into(), json!(system.join("\n\n")));
    }
    body.insert(
        "messages".into(),
        Value::Array(
            turns
                .into_iter()
                .map(|t| json!({"role": t.role.as_str(), "content": t.blocks}))
                .collect(),
        ),
    );
    if req.stream {
        body.insert("stream".into(), json!(true));
    }
    if !tools.is_empty() {
        let parallel = b.get("parallel_tool_calls").and_then(Value::as_bool) != Some(false);
        if let Some(c) = choice_value(choice, parallel) {
            body.insert("tool_choice".into(), c);
        }
        body.insert("tools".into(), Value::Array(tools));
    }
    let number = |key: &str| b.get(key).and_then(Value::as_f64);
    if let Some(t) = thinking {
        // With thinking, Anthropic takes no temperature or top_k, and top_p only from 0.95.
        body.insert(
            "thinking".into(),
            json!({"type": "enabled", "budget_tokens": t.budget}),
        );
        if let Some(p) = number("top_p") {
            body.insert("top_p".into(), json!(p.clamp(0.95, 1.0)));
        }
    } else {
        // Recent Claude models refuse temperature and top_p together: temperature is kept.
        if let Some(t) = number("temperature") {
            body.insert("temperature".into(), json!(t.clamp(0.0, 1.0)));
        } else if let Some(p) = number("top_p") {
            body.insert("top_p".into(), json!(p.clamp(0.0, 1.0)));
        }
        if let Some(k) = b.get("top_k").and_then(Value::as_u64) {
            body.insert("top_k".into(), json!(k));
        }
    }
    let stops: Vec<&str> = match b.get("stop") {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    // Anthropic refuses blank stop sequences; they would never match anything anyway.
    let stops: Vec<&str> = stops.into_iter().filter(|s| !s.trim().is_empty()).collect();
    if !stops.is_empty() {
        body.insert("stop_sequences".into(), json!(stops));
    }
    if let Some(user) = b
        .get("user")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
    {
        body.insert("metadata".into(), json!({ "user_id": user }));
    }
    Ok(Value::Object(body))
}

/// Anthropic returns one choice per request: `n` above 1 cannot be honoured.
fn check_n(b: &Map<String, Value>) -> Result<(), ApiError> {
    match b.get("n") {
        None | Some(Value::Null) => Ok(()),
        Some(n) if n.as_u64() == Some(1) => Ok(()),
        Some(_) => Err(invalid(
            "Anthropic models return one choice per request: `n` must be 1.",
            "n",
        )),
    }
}

/// The client's token limit (`max_completion_tokens` first, as OpenAI reads it), if any.
fn requested_max_tokens(b: &Map<String, Value>) -> Result<Option<u64>, ApiError> {
    for key in ["max_completion_tokens", "max_tokens"] {
        match b.get(key) {
            None | Some(Value::Null) => {}
            Some(v) => {
                return match v.as_u64() {
                    Some(n) if n >= 1 => Ok(Some(n)),
                    _ => Err(invalid(format!("`{key}` must be a positive integer."), key)),
                }
            }
        }
    }
    Ok(None)
}

/// The thinking budget `reasoning_effort` asks for (`None`: no thinking).
fn reasoning_budget(v: Option<&Value>) -> Result<Option<u64>, ApiError> {
    let effort = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s.as_str(),
        Some(_) => {
            return Err(invalid(
                "`reasoning_effort` must be a string.",
                "reasoning_effort",
            ))
        }
    };
    if matches!(effort, "none" | "minimal") {
        return Ok(None);
    }
    BUDGETS
        .iter()
        .find(|(name, _)| *name == effort)
        .map(|(_, budget)| Some(*budget))
        .ok_or_else(|| {
            invalid(
                format!(
                    "Invalid `reasoning_effort` {effort:?}: expected none, minimal, low, medium or \
                     high."
                ),
                "reasoning_effort",
            )
        })
}

/// Thinking as sent: its budget and the `max_tokens` that leaves room for the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Thinking {
    budget: u64,
    max_tokens: u64,
}

/// Fits a budget under the model's output limit: `max_tokens` is the budget plus what the client
/// asked for (capped at `max_output`), and the budget must stay below it. `None` when the model
/// cannot give even the smallest budget room.
fn fit_thinking(budget: u64, requested: Option<u64>, max_output: u64) -> Option<Thinking> {
    let max_tokens = requested
        .map_or(max_output, |r| budget.saturating_add(r))
        .min(max_output);
    let budget = budget.min(max_tokens.saturating_sub(1));
    (budget >= MIN_BUDGET).then_some(Thinking { budget, max_tokens })
}

/// A conversation as Messages wants it: the system text apart, then alternating turns.
struct Conversation {
    system: Vec<String>,
    turns: Vec<Turn>,
}

/// The two roles a Messages turn can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    User,
    Assistant,
}

/// Messages' spelling of a role.
impl Role {
    /// The role as Messages spells it.
    fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One Messages turn: a role and its (never empty) content blocks.
struct Turn {
    role: Role,
    blocks: Vec<Value>,
}

/// Splits OpenAI messages into system text and alternating turns: consecutive messages of one
/// role are merged (Anthropic requires alternation), `tool` messages become `tool_result`
/// blocks of a user turn (first in it, as Anthropic requires), messages left without content
/// are dropped.
fn conversation(messages: &[Value]) -> Result<Conversation, ApiError> {
    let mut system = Vec::new();
    let mut turns = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let content = m.get("content").unwrap_or(&Value::Null);
        match m.get("role").and_then(Value::as_str).unwrap_or("") {
            "system" | "developer" => {
                let text = plain_text(i, content)?;
                if !text.trim().is_empty() {
                    system.push(text);
                }
            }
            "user" => {
                let mut blocks = Vec::new();
                user_content(i, content, &mut blocks)?;
                push(&mut turns, Role::User, blocks);
            }
            "assistant" => push(&mut turns, Role::Assistant, assistant_blocks(i, m)?),
            "tool" => push(&mut turns, Role::User, vec![tool_result(i, m)?]),
            role => {
                return Err(invalid(
                    format!(
                        "messages[{i}] has role {role:?}, which Anthropic models do not take; \
                         send tool results as `tool` messages."
                    ),
                    &format!("messages[{i}].role"),
                ))
            }
        }
    }
    for turn in &mut turns {
        // Stable: tool results first, everything else in its order.
        turn.blocks.sort_by_key(|b| !is_tool_result(b));
    }
    Ok(Conversation { system, turns })
}

/// Appends blocks to the conversation, merging into the last turn when the role repeats.
fn push(turns: &mut Vec<Turn>, role: Role, blocks: Vec<Value>) {
    if blocks.is_empty() {
        return;
    }
    match turns.last_mut() {
        Some(last) if last.role == role => last.blocks.extend(blocks),
        _ => turns.push(Turn { role, blocks }),
    }
}

/// Is this a `tool_result` block?
fn is_tool_result(block: &Value) -> bool {
    block.get("type").and_then(Value::as_str) == Some("tool_result")
}

/// Is this a `tool_use` block?
fn is_tool_use(block: &Value) -> bool {
    block.get("type").and_then(Value::as_str) == Some("tool_use")
}

/// A text block, unless the text is blank (Anthropic refuses blank text blocks).
fn text_block(text: &str, cache_control: Option<&Value>) -> Option<Value> {
    if text.trim().is_empty() {
        return None;
    }
    let mut block = json!({"type": "text", "text": text});
    if let Some(c) = cache_control.filter(|c| !c.is_null()) {
        block["cache_control"] = c.clone();
    }
    Some(block)
}

/// The `text` of content part `j` of message `i`.
fn part_text(i: usize, j: usize, part: &Value) -> Result<&str, ApiError> {
    part.get("text").and_then(Value::as_str).ok_or_else(|| {
        invalid(
            format!("messages[{i}].content[{j}].text must be a string."),
            &format!("messages[{i}].content"),
        )
    })
}

/// The type of a content part ("" when missing).
fn part_type(part: &Value) -> &str {
    part.get("type").and_then(Value::as_str).unwrap_or("")
}

/// A content part this position cannot carry.
fn unsupported_part(i: usize, j: usize, kind: &str, accepted: &str) -> ApiError {
    invalid(
        format!(
            "messages[{i}].content[{j}] is a {kind:?} part, which Anthropic models do not take \
             here; send {accepted}."
        ),
        &format!("messages[{i}].content"),
    )
}

/// The text of a system or developer message (text parts joined by newlines).
fn plain_text(i: usize, content: &Value) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                match part_type(part) {
                    "text" => texts.push(part_text(i, j, part)?),
                    kind => return Err(unsupported_part(i, j, kind, "text parts")),
                }
            }
            Ok(texts.join("\n"))
        }
        _ => Ok(String::new()),
    }
}

/// User (or tool result) content: text and images. Audio and files have no Messages
/// equivalent the gateway can build, so they are refused rather than silently lost.
fn user_content(i: usize, content: &Value, blocks: &mut Vec<Value>) -> Result<(), ApiError> {
    match content {
        Value::String(s) => blocks.extend(text_block(s, None)),
        Value::Array(parts) => {
            for (j, part) in parts.iter().enumerate() {
                match part_type(part) {
                    "text" => blocks.extend(text_block(
                        part_text(i, j, part)?,
                        part.get("cache_control"),
                    )),
                    "image_url" => blocks.push(image_block(i, j, part)?),
                    kind => return Err(unsupported_part(i, j, kind, "text or image_url parts")),
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// An `image_url` part as an image block: a base64 source for a data URI, a URL source for an
/// http(s) address.
fn image_block(i: usize, j: usize, part: &Value) -> Result<Value, ApiError> {
    let param = format!("messages[{i}].content");
    let url = match part.get("image_url") {
        Some(Value::String(u)) => Some(u.as_str()),
        Some(Value::Object(o)) => o.get("url").and_then(Value::as_str),
        _ => None,
    }
    .ok_or_else(|| {
        invalid(
            format!("messages[{i}].content[{j}].image_url.url must be a string."),
            &param,
        )
    })?;
    let mut block = if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .and_then(|(meta, data)| Some((meta.strip_suffix(";base64")?, data)))
            .ok_or_else(|| {
                invalid(
                    format!(
                        "messages[{i}].content[{j}]: image data URIs must be base64 \
                         (data:<type>;base64,<data>)."
                    ),
                    &param,
                )
            })?;
        let media = meta.to_ascii_lowercase();
        let media = if media == "image/jpg" {
            "image/jpeg".to_owned()
        } else {
            media
        };
        if !IMAGE_TYPES.contains(&media.as_str()) {
            return Err(invalid(
                format!(
                    "messages[{i}].content[{j}]: image type {meta:?} is not supported; use \
                     image/jpeg, image/png, image/gif or image/webp."
                ),
                &param,
            ));
        }
        json!({"type": "image", "source": {"type": "base64", "media_type": media, "data": data}})
    } else if url.starts_with("https://") || url.starts_with("http://") {
        json!({"type": "image", "source": {"type": "url", "url": url}})
    } else {
        return Err(invalid(
            format!(
                "messages[{i}].content[{j}]: an image must be an http(s) URL or a base64 data URI."
            ),
            &param,
        ));
    };
    if let Some(c) = part.get("cache_control").filter(|c| !c.is_null()) {
        block["cache_control"] = c.clone();
    }
    Ok(block)
}

/// An assistant message: its text, then its tool calls as `tool_use` blocks.
/// `reasoning_content` is dropped: Anthropic only takes thinking back with its signature.
fn assistant_blocks(i: usize, m: &Value) -> Result<Vec<Value>, ApiError> {
    let mut blocks = Vec::new();
    match m.get("content") {
        Some(Value::String(s)) => blocks.extend(text_block(s, None)),
        Some(Value::Array(parts)) => {
            for (j, part) in parts.iter().enumerate() {
                match part_type(part) {
                    "text" => blocks.extend(text_block(
                        part_text(i, j, part)?,
                        part.get("cache_control"),
                    )),
                    "refusal" => {}
                    kind => return Err(unsupported_part(i, j, kind, "text parts")),
                }
            }
        }
        _ => {}
    }
    if m.get("function_call").is_some_and(|f| !f.is_null()) {
        return Err(invalid(
            format!(
                "messages[{i}].function_call is deprecated and cannot be sent to Anthropic \
                 models; use tool_calls."
            ),
            &format!("messages[{i}].function_call"),
        ));
    }
    match m.get("tool_calls") {
        None | Some(Value::Null) => {}
        Some(Value::Array(calls)) => {
            for (j, call) in calls.iter().enumerate() {
                blocks.push(tool_use(i, j, call)?);
            }
        }
        Some(_) => {
            return Err(invalid(
                format!("messages[{i}].tool_calls must be an array."),
                &format!("messages[{i}].tool_calls"),
            ))
        }
    }
    Ok(blocks)
}

/// One OpenAI tool call as a `tool_use` block; its arguments must be a JSON object.
fn tool_use(i: usize, j: usize, call: &Value) -> Result<Value, ApiError> {
    let at = format!("messages[{i}].tool_calls[{j}]");
    let required = |field: &str| {
        invalid(
            format!("{at}.{field} is required (a non-empty string)."),
            &format!("{at}.{field}"),
        )
    };
    let id = call
        .get("id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| required("id"))?;
    let function = call.get("function");
    let name = function
        .and_then(|f| f.get("name"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| required("function.name"))?;
    let param = format!("{at}.function.arguments");
    let not_object = || {
        invalid(
            format!("{param} must be a JSON object (Anthropic models take tool input as one)."),
            &param,
        )
    };
    let input = match function.and_then(|f| f.get("arguments")) {
        None | Some(Value::Null) => json!({}),
        Some(Value::String(s)) if s.trim().is_empty() => json!({}),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => return Err(not_object()),
            Err(e) => return Err(invalid(format!("{param} is not valid JSON ({e})."), &param)),
        },
        Some(v @ Value::Object(_)) => v.clone(),
        Some(_) => return Err(not_object()),
    };
    Ok(json!({"type": "tool_use", "id": id, "name": name, "input": input}))
}

/// A `tool` message as a `tool_result` block (no content when the result is empty).
fn tool_result(i: usize, m: &Value) -> Result<Value, ApiError> {
    let id = m
        .get("tool_call_id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            invalid(
                format!("messages[{i}].tool_call_id is required."),
                &format!("messages[{i}].tool_call_id"),
            )
        })?;
    let mut block = json!({"type": "tool_result", "tool_use_id": id});
    match m.get("content") {
        Some(Value::String(s)) if !s.trim().is_empty() => block["content"] = json!(s),
        Some(content @ Value::Array(_)) => {
            let mut blocks = Vec::new();
            user_content(i, content, &mut blocks)?;
            if !blocks.is_empty() {
                block["content"] = Value::Array(blocks);
            }
        }
        _ => {}
    }
    Ok(block)
}

/// A trailing assistant turn is a prefill. Where allowed it stays, trimmed (Anthropic refuses a
/// final assistant turn ending in whitespace); otherwise it becomes a system instruction, so the
/// request still succeeds on models that answer 400 to prefills (and while thinking).
fn prefill(turns: &mut Vec<Turn>, system: &mut Vec<String>, allowed: bool) {
    let Some(last) = turns.last_mut() else {
        return;
    };
    if last.role != Role::Assistant || last.blocks.iter().any(is_tool_use) {
        return;
    }
    if allowed {
        // Text blocks are never blank, so trimming leaves the last one non-empty.
        if let Some(Value::String(text)) = last.blocks.last_mut().and_then(|b| b.get_mut("text")) {
            text.truncate(text.trim_end().len());
        }
        return;
    }
    let text: String = last
        .blocks
        .iter()
        .filter_map(|b| b.get("text").and_then(Value::as_str))
        .collect();
    turns.pop();
    system.push(format!("{CONTINUE}\n{text}"));
}

/// OpenAI's `tools`, as Messages tools (`input_schema` always an object schema).
fn tools(v: Option<&Value>) -> Result<Vec<Value>, ApiError> {
    let list = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(invalid("`tools` must be an array.", "tools")),
    };
    list.iter()
        .enumerate()
        .map(|(i, tool)| {
            let param = format!("tools[{i}]");
            if tool.get("type").and_then(Value::as_str) != Some("function") {
                return Err(invalid(
                    format!("{param}: only tools of type \"function\" can be sent to Anthropic models."),
                    &param,
                ));
            }
            let f = tool.get("function").and_then(Value::as_object);
            let name = f
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .ok_or_else(|| {
                    invalid(
                        format!("{param}.function.name is required."),
                        &format!("{param}.function.name"),
                    )
                })?;
            if name.starts_with(JSON_TOOL_PREFIX) {
                return Err(invalid(
                    format!("{param}: tool names starting with {JSON_TOOL_PREFIX:?} are reserved by this gateway."),
                    &format!("{param}.function.name"),
                ));
            }
            let mut out = Map::new();
            out.insert("name".into(), json!(name));
            if let Some(d) = f
                .and_then(|f| f.get("description"))
                .and_then(Value::as_str)
                .filter(|d| !d.is_empty())
            {
                out.insert("description".into(), json!(d));
            }
            out.insert(
                "input_schema".into(),
                input_schema(f.and_then(|f| f.get("parameters"))),
            );
            Ok(Value::Object(out))
        })
        .collect()
}

/// A function's `parameters` as an `input_schema` (which must exist and be of type object).
fn input_schema(parameters: Option<&Value>) -> Value {
    match parameters {
        Some(Value::Object(p)) if !p.is_empty() => {
            let mut schema = p.clone();
            schema.entry("type").or_insert_with(|| json!("object"));
            Value::Object(schema)
        }
        _ => json!({"type": "object", "properties": {}}),
    }
}

/// OpenAI's `tool_choice`, read.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Choice {
    Auto,
    /// Some tool must be called (Anthropic's `any`).
    Required,
    /// No tool may be called (Anthropic's `none`).
    Forbidden,
    /// This tool must be called.
    Function(String),
}

/// Reads `tool_choice`.
fn tool_choice(v: Option<&Value>) -> Result<Option<Choice>, ApiError> {
    let bad = || {
        invalid(
            "`tool_choice` must be \"auto\", \"required\", \"none\" or {\"type\": \"function\", \
             \"function\": {\"name\": ...}}.",
            "tool_choice",
        )
    };
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Ok(Some(Choice::Auto)),
            "required" => Ok(Some(Choice::Required)),
            "none" => Ok(Some(Choice::Forbidden)),
            _ => Err(bad()),
        },
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str);
            match (o.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(name)) => Ok(Some(Choice::Function(name.to_owned()))),
                _ => Err(bad()),
            }
        }
        Some(_) => Err(bad()),
    }
}

/// The Messages `tool_choice` (`parallel_tool_calls: false` is Anthropic's
/// `disable_parallel_tool_use`, which `none` does not take).
fn choice_value(choice: Option<Choice>, parallel: bool) -> Option<Value> {
    let mut v = match choice {
        Some(Choice::Forbidden) => return Some(json!({"type": "none"})),
        Some(Choice::Required) => json!({"type": "any"}),
        Some(Choice::Function(name)) => json!({"type": "tool", "name": name}),
        Some(Choice::Auto) => json!({"type": "auto"}),
        None if parallel => return None,
        None => json!({"type": "auto"}),
    };
    if !parallel {
        v["disable_parallel_tool_use"] = json!(true);
    }
    Some(v)
}

/// What the client asked the answer to look like (`response_format`).
enum Format<'a> {
    Free,
    JsonObject,
    Schema {
        name: &'a str,
        schema: &'a Value,
        description: Option<&'a str>,
    },
}

/// Reads `response_format`.
fn response_format(v: Option<&Value>) -> Result<Format<'_>, ApiError> {
    let bad = |why: &str| invalid(why, "response_format");
    let o = match v {
        None | Some(Value::Null) => return Ok(Format::Free),
        Some(Value::Object(o)) => o,
        Some(_) => return Err(bad("`response_format` must be an object.")),
    };
    match o.get("type").and_then(Value::as_str) {
        Some("text") => Ok(Format::Free),
        Some("json_object") => Ok(Format::JsonObject),
        Some("json_schema") => {
            let js = o
                .get("json_schema")
                .and_then(Value::as_object)
                .ok_or_else(|| bad("`response_format.json_schema` must be an object."))?;
            Ok(match js.get("schema").filter(|s| s.is_object()) {
                Some(schema) => Format::Schema {
                    name: js.get("name").and_then(Value::as_str).unwrap_or(""),
                    schema,
                    description: js
                        .get("description")
                        .and_then(Value::as_str)
                        .filter(|d| !d.is_empty()),
                },
                None => Format::JsonObject,
            })
        }
        _ => Err(bad(
            "`response_format.type` must be \"text\", \"json_object\" or \"json_schema\".",
        )),
    }
}

/// The schema as a tool's `input_schema`, which Anthropic wants with `"type": "object"` at its
/// top: as is, or — for the `{"$defs": {...}, "$ref": "#/$defs/X"}` shape Pydantic gives a
/// recursive model — with the referenced object definition lifted to the top (its `$defs` kept,
/// so the recursion still resolves). `None` when the answer is not an object.
fn object_schema(schema: &Value) -> Option<Value> {
    if schema.get("type").and_then(Value::as_str) == Some("object") {
        return Some(schema.clone());
    }
    let name = schema.get("$ref")?.as_str()?.strip_prefix("#/$defs/")?;
    let defs = schema.get("$defs")?;
    let def = defs.get(name)?.as_object()?;
    if def.get("type").and_then(Value::as_str) != Some("object") {
        return None;
    }
    let mut top = def.clone();
    top.insert("$defs".into(), defs.clone());
    Some(Value::Object(top))
}

/// The forced tool's name: the reserved prefix and the schema's name (tool names are
/// `[a-zA-Z0-9_-]{1,64}`).
fn json_tool_name(schema_name: &str) -> String {
    let clean: String = schema_name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .take(64 - JSON_TOOL_PREFIX.len())
        .collect();
    let clean = if clean.is_empty() { "answer" } else { &clean };
    format!("{JSON_TOOL_PREFIX}{clean}")
}

// ---------------------------------------------------------------------------------------------
// Answers: Anthropic message -> OpenAI chat.completion
// ---------------------------------------------------------------------------------------------

/// A Messages answer: what the translation reads.
#[derive(Deserialize)]
struct Message {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    content: Option<Vec<Block>>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<AnthropicUsage>,
}

/// One content block of an answer; kinds the client has no field for are skipped.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Text {
        #[serde(default)]
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Value,
    },
    Thinking {
        #[serde(default)]
        thinking: String,
    },
    #[serde(other)]
    Other,
}

/// Anthropic's token counts (answers, `message_start` and `message_delta`): any may be absent.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
struct AnthropicUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

/// Token counts gathered over an answer (a stream reports them in two events).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Tokens {
    input: u64,
    cache_creation: u64,
    cache_read: Option<u64>,
    output: u64,
    /// Some count was reported at all.
    seen: bool,
}

impl Tokens {
    /// Takes the counts `u` reports (later reports are cumulative: they replace earlier ones).
    fn merge(&mut self, u: &AnthropicUsage) {
        if let Some(n) = u.input_tokens {
            self.input = n;
            self.seen = true;
        }
        if let Some(n) = u.cache_creation_input_tokens {
            self.cache_creation = n;
            self.seen = true;
        }
        if let Some(n) = u.cache_read_input_tokens {
            self.cache_read = Some(n);
            self.seen = true;
        }
        if let Some(n) = u.output_tokens {
            self.output = n;
            self.seen = true;
        }
    }

    /// OpenAI's counts: every input token is a prompt token (cache reads and writes included).
    fn usage(&self) -> Option<Usage> {
        self.seen.then(|| Usage {
            prompt_tokens: self.input + self.cache_creation + self.cache_read.unwrap_or(0),
            completion_tokens: self.output,
        })
    }

    /// OpenAI's `usage` object for the client.
    fn openai(&self, ctx: &ReplyCtx) -> Option<Value> {
        self.usage().map(|u| {
            out::usage(
                ctx,
                u.prompt_tokens,
                u.completion_tokens,
                self.cache_read,
                None,
            )
        })
    }
}

/// OpenAI's `finish_reason` for a `stop_reason`. `json_answer`: the tool call that stopped the
/// answer is the forced `json_schema` tool, so the answer simply ended.
fn finish_reason(stop_reason: Option<&str>, json_answer: bool) -> &'static str {
    match stop_reason {
        Some("max_tokens" | "model_context_window_exceeded") => "length",
        Some("tool_use") if json_answer => "stop",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        // end_turn, stop_sequence, pause_turn, and whatever comes next.
        _ => "stop",
    }
}

/// Translates a complete Messages answer into a `chat.completion`.
fn translate_answer(body: &[u8], ctx: &ReplyCtx) -> Result<Answer, String> {
    let m: Message = serde_json::from_slice(body)
        .map_err(|e| format!("its answer is not a complete Messages object ({e})"))?;
    if m.kind.as_deref() == Some("error") {
        let detail = anthropic_error(body).unwrap_or_else(|| "no message".into());
        return Err(format!("it answered 200 with an error: {detail}"));
    }
    let blocks = m.content.ok_or("its answer has no `content`")?;
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut calls = Vec::new();
    let mut json_answer = None;
    for block in blocks {
        match block {
            Block::Text { text: t } => text.push_str(&t),
            Block::Thinking { thinking } => reasoning.push_str(&thinking),
            Block::ToolUse { name, input, .. } if name.starts_with(JSON_TOOL_PREFIX) => {
                json_answer = Some(input.to_string());
            }
            Block::ToolUse { id, name, input } => calls.push(json!({
                "id": id,
                "type": "function",
                "function": {"name": name, "arguments": input.to_string()},
            })),
            Block::Other => {}
        }
    }
    let is_json_answer = json_answer.is_some() && calls.is_empty();
    if let Some(answer) = json_answer {
        // The client asked for JSON: any words around it would break its parser.
        text = answer;
    }
    let finish = finish_reason(m.stop_reason.as_deref(), is_json_answer);
    let mut message = json!({
        "role": "assistant",
        "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { json!(text) },
        "refusal": null,
    });
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    if !reasoning.is_empty() {
        message["reasoning_content"] = json!(reasoning);
    }
    let mut tokens = Tokens::default();
    if let Some(u) = &m.usage {
        tokens.merge(u);
    }
    let mut completion = json!({
        "id": ctx.id,
        "object": "chat.completion",
        "created": ctx.created,
        "model": ctx.model,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
    });
    if let Some(u) = tokens.openai(ctx) {
        completion["usage"] = u;
    }
    Ok(Answer {
        body: serde_json::to_vec(&completion).unwrap_or_default(),
        usage: tokens.usage(),
        finish_reason: Some(finish.into()),
    })
}

/// The message of an Anthropic error body, with its type: "Overloaded (overloaded_error)".
fn anthropic_error(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Body<'a> {
        #[serde(borrow)]
        error: ErrorBody<'a>,
    }
    let e = serde_json::from_slice::<Body<'_>>(body).ok()?.error;
    let message = e.message.0;
    if message.is_empty() {
        return None;
    }
    Some(if e.kind.0.is_empty() {
        message.into_owned()
    } else {
        format!("{message} ({})", e.kind.0)
    })
}

// ---------------------------------------------------------------------------------------------
// Streams: Anthropic events -> OpenAI chunks
// ---------------------------------------------------------------------------------------------

/// A string field borrowed from the event when it has no escapes (most deltas), so reading an
/// event allocates only for what must be unescaped. Absent or null reads as "".
#[derive(Debug, Default)]
struct Str<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// Visits a string or null.
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or null")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E>(self, s: String) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(s)))
            }
            fn visit_none<E>(self) -> Result<Str<'de>, E> {
                Ok(Str::default())
            }
            fn visit_unit<E>(self) -> Result<Str<'de>, E> {
                Ok(Str::default())
            }
            fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Str<'de>, D2::Error> {
                d.deserialize_str(self)
            }
        }
        d.deserialize_option(V)
    }
}

/// One stream event's data: the fields of every event type, each optional.
#[derive(Deserialize)]
struct Event<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Str<'a>,
    #[serde(default)]
    index: u64,
    #[serde(borrow, default)]
    content_block: Option<StartBlock<'a>>,
    #[serde(borrow, default)]
    delta: Option<Delta<'a>>,
    #[serde(default)]
    message: Option<StartMessage>,
    #[serde(default)]
    usage: Option<AnthropicUsage>,
    #[serde(borrow, default)]
    error: Option<ErrorBody<'a>>,
}

/// `content_block_start.content_block`.
#[derive(Deserialize, Default)]
struct StartBlock<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Str<'a>,
    #[serde(borrow, default)]
    text: Str<'a>,
    #[serde(borrow, default)]
    thinking: Str<'a>,
    #[serde(borrow, default)]
    id: Str<'a>,
    #[serde(borrow, default)]
    name: Str<'a>,
}

/// `content_block_delta.delta` or `message_delta.delta`.
#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Str<'a>,
    #[serde(borrow, default)]
    text: Str<'a>,
    #[serde(borrow, default)]
    partial_json: Str<'a>,
    #[serde(borrow, default)]
    thinking: Str<'a>,
    #[serde(borrow, default)]
    stop_reason: Str<'a>,
}

/// `message_start.message`: only its usage (input and cache counts) is read.
#[derive(Deserialize)]
struct StartMessage {
    #[serde(default)]
    usage: Option<AnthropicUsage>,
}

/// An error object (`error` events and error bodies).
#[derive(Deserialize, Default)]
struct ErrorBody<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Str<'a>,
    #[serde(borrow, default)]
    message: Str<'a>,
}

/// What a content block of the stream turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Thinking,
    /// The client's tool call number `k` (OpenAI's `tool_calls[].index`); `args`: some
    /// argument bytes were sent.
    Tool {
        k: u32,
        args: bool,
    },
    /// The forced `json_schema` tool: its input is the answer's content.
    JsonAnswer {
        args: bool,
    },
    /// Nothing the client has a field for (redacted thinking, server tools…).
    Other,
}

/// Translates Anthropic's named events into OpenAI chunks as they arrive.
#[derive(Debug)]
pub struct AnthropicStream {
    framer: SseFramer,
    t: Translator,
}

/// The stream's state apart from its framing (so events can be handled while framing).
#[derive(Debug)]
struct Translator {
    ctx: ReplyCtx,
    state: StreamState,
    new_usage: Option<Usage>,
    /// The client has its first chunk (with `role`).
    started: bool,
    /// Anthropic content block index -> what it is (a handful per answer: searched linearly,
    /// and never sized by an index read from the wire).
    blocks: Vec<(u64, Kind)>,
    /// Client tool calls started so far (the next one's OpenAI index).
    tool_calls: u32,
    /// The forced `json_schema` tool was called.
    json_answer: bool,
    stop_reason: Option<String>,
    tokens: Tokens,
}

impl StreamTranslator for AnthropicStream {
    fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let t = &mut self.t;
        if t.state.broken.is_some() || t.state.done || t.state.upstream_error {
            return;
        }
        let framed = self.framer.feed(chunk, |ev| {
            if ev.has_data && !t.state.done && !t.state.upstream_error {
                t.event(ev.data, out);
            }
        });
        if let Err(why) = framed {
            t.state.broken = Some(why);
        }
    }

    fn state(&self) -> &StreamState {
        &self.t.state
    }

    fn take_new_usage(&mut self) -> Option<Usage> {
        self.t.new_usage.take()
    }
}

impl Translator {
    /// Handles one event (one parse; unknown event types are ignored, as Anthropic's versioning
    /// policy asks).
    fn event(&mut self, data: &[u8], out: &mut Vec<u8>) {
        self.state.events += 1;
        let Ok(ev) = serde_json::from_slice::<Event<'_>>(data) else {
            return;
        };
        match &*ev.kind.0 {
            "message_start" => {
                if let Some(u) = ev.message.and_then(|m| m.usage) {
                    self.tokens.merge(&u);
                }
                self.start(out);
            }
            "content_block_start" => {
                self.block_start(ev.index, ev.content_block.unwrap_or_default(), out)
            }
            "content_block_delta" => {
                if let Some(d) = ev.delta {
                    self.block_delta(ev.index, d, out);
                }
            }
            "content_block_stop" => self.block_stop(ev.index, out),
            "message_delta" => {
                if let Some(reason) = ev.delta.map(|d| d.stop_reason.0).filter(|r| !r.is_empty()) {
                    self.stop_reason = Some(reason.into_owned());
                    self.state.finish_reason = Some(self.finish_reason().into());
                }
                if let Some(u) = &ev.usage {
                    self.tokens.merge(u);
                }
            }
            "message_stop" => self.finish(out),
            // Keeps the client's idle timers alive, as it keeps ours.
            "ping" => out.extend_from_slice(b": ping\n\n"),
            "error" => {
                let e = ev.error.unwrap_or_default();
                let kind = if e.kind.0.is_empty() {
                    "api_error"
                } else {
                    &e.kind.0
                };
                let message = if e.message.0.is_empty() {
                    "The upstream reported an error mid-stream."
                } else {
                    &e.message.0
                };
                out::error_event(message, kind, None, out);
                self.state.upstream_error = true;
            }
            _ => {}
        }
    }

    /// Sends the first chunk (`role: assistant`) if the client does not have it yet.
    fn start(&mut self, out: &mut Vec<u8>) {
        if !self.started && self.ctx.continuation {
            // A continuation: the client has its role chunk from the stream this one rescues.
            self.started = true;
        }
        if !self.started {
            self.started = true;
            out::chunk_event(
                &self.ctx,
                &json!({"role": "assistant", "content": ""}),
                None,
                out,
            );
        }
    }

    /// Sends one delta (after the first chunk).
    fn emit(&mut self, delta: Value, out: &mut Vec<u8>) {
        self.start(out);
        super::note_delta(&mut self.state, &delta);
        out::chunk_event(&self.ctx, &delta, None, out);
    }

    /// What block `index` is.
    fn kind(&self, index: u64) -> Kind {
        self.blocks
            .iter()
            .rev()
            .find(|(i, _)| *i == index)
            .map_or(Kind::Other, |(_, k)| *k)
    }

    /// Notes that block `index` sent argument bytes.
    fn note_args(&mut self, index: u64) {
        if let Some((_, Kind::Tool { args, .. } | Kind::JsonAnswer { args })) =
            self.blocks.iter_mut().rev().find(|(i, _)| *i == index)
        {
            *args = true;
        }
    }

    /// `content_block_start`: notes what the block is; a tool call starts with its id and name.
    fn block_start(&mut self, index: u64, block: StartBlock<'_>, out: &mut Vec<u8>) {
        let kind = match &*block.kind.0 {
            "text" => {
                if !block.text.0.is_empty() {
                    self.emit(json!({ "content": &*block.text.0 }), out);
                }
                Kind::Text
            }
            "thinking" => {
                if !block.thinking.0.is_empty() {
                    self.emit(json!({ "reasoning_content": &*block.thinking.0 }), out);
                }
                Kind::Thinking
            }
            "tool_use" if block.name.0.starts_with(JSON_TOOL_PREFIX) => {
                self.json_answer = true;
                Kind::JsonAnswer { args: false }
            }
            "tool_use" => {
                let k = self.tool_calls;
                self.tool_calls += 1;
                self.emit(
                    json!({"tool_calls": [{
                        "index": k,
                        "id": &*block.id.0,
                        "type": "function",
                        "function": {"name": &*block.name.0, "arguments": ""},
                    }]}),
                    out,
                );
                Kind::Tool { k, args: false }
            }
            _ => Kind::Other,
        };
        self.blocks.push((index, kind));
    }

    /// `content_block_delta`: text, reasoning, or the arguments of the block's tool call.
    fn block_delta(&mut self, index: u64, d: Delta<'_>, out: &mut Vec<u8>) {
        match &*d.kind.0 {
            "text_delta" if !d.text.0.is_empty() => {
                self.emit(json!({ "content": &*d.text.0 }), out)
            }
            "thinking_delta" if !d.thinking.0.is_empty() => {
                self.emit(json!({ "reasoning_content": &*d.thinking.0 }), out)
            }
            "input_json_delta" if !d.partial_json.0.is_empty() => match self.kind(index) {
                Kind::Tool { k, .. } => {
                    self.note_args(index);
                    self.emit(
                        json!({"tool_calls": [{
                            "index": k,
                            "function": {"arguments": &*d.partial_json.0},
                        }]}),
                        out,
                    );
                }
                Kind::JsonAnswer { .. } => {
                    self.note_args(index);
                    self.emit(json!({ "content": &*d.partial_json.0 }), out);
                }
                _ => {}
            },
            // signature_delta, citations_delta, empty deltas: nothing for the client.
            _ => {}
        }
    }

    /// A tool call that got no argument bytes gets `{}`, so arguments always parse.
    fn block_stop(&mut self, index: u64, out: &mut Vec<u8>) {
        match self.kind(index) {
            Kind::Tool { k, args: false } => {
                self.note_args(index);
                self.emit(
                    json!({"tool_calls": [{"index": k, "function": {"arguments": "{}"}}]}),
                    out,
                );
            }
            Kind::JsonAnswer { args: false } => {
                self.note_args(index);
                self.emit(json!({"content": "{}"}), out);
            }
            _ => {}
        }
    }

    /// The finish reason so far, in OpenAI's words.
    fn finish_reason(&self) -> &'static str {
        finish_reason(
            self.stop_reason.as_deref(),
            self.json_answer && self.tool_calls == 0,
        )
    }

    /// `message_stop`: the finishing chunk, the usage chunk when asked for, `[DONE]`.
    fn finish(&mut self, out: &mut Vec<u8>) {
        self.start(out);
        let reason = self.finish_reason();
        out::chunk_event(&self.ctx, &json!({}), Some(reason), out);
        if let Some(u) = self.tokens.usage() {
            self.state.usage = Some(u);
            self.new_usage = Some(u);
            if self.ctx.client_usage {
                if let Some(usage) = self.tokens.openai(&self.ctx) {
                    out::event(&out::usage_chunk(&self.ctx, usage), out);
                }
            }
        }
        out.extend_from_slice(out::DONE);
        self.state.finish_reason = Some(reason.into());
        self.state.done = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::StreamEnd;
    use crate::catalog;

    // ---- helpers

    /// A target on the catalogued Anthropic provider.
    fn target(model: &str) -> Target<'_> {
        let p = catalog::provider("anthropic").unwrap();
        Target {
            provider: p,
            base_url: "https://api.anthropic.com/v1",
            model,
            info: p.model_info(model),
        }
    }

    /// Takes prefills and thinking; max_output 64000.
    const HAIKU: &str = "claude-haiku-4-5";
    /// Answers 400 to a prefill.
    const OPUS46: &str = "claude-opus-4-6";

    /// The Messages body for a client request, or its 400.
    fn try_body(model: &str, req: Value) -> Result<Value, ApiError> {
        let req = ChatRequest::parse(req.to_string().as_bytes()).unwrap();
        let up = Anthropic.request(&target(model), &req)?;
        Ok(serde_json::from_slice(&up.body).unwrap())
    }

    /// The Messages body for a request that must be accepted.
    fn body(model: &str, req: Value) -> Value {
        try_body(model, req).unwrap()
    }

    /// The 400 for a request that must be refused.
    fn err(model: &str, req: Value) -> ApiError {
        try_body(model, req).unwrap_err()
    }

    /// A user message.
    fn user(text: &str) -> Value {
        json!({"role": "user", "content": text})
    }

    /// The reply identity the gateway would give.
    fn ctx(client_usage: bool) -> ReplyCtx {
        ReplyCtx {
            id: "chatcmpl-test".into(),
            created: 1_700_000_000,
            model: "claude-x".into(),
            client_usage,
            price: None,
            continuation: false,
            collect_text: false,
        }
    }

    // ---- requests

    #[test]
    fn url_headers_model_stream_and_no_key() {
        let req = ChatRequest::parse(
            br#"{"model":"auto","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        let up = Anthropic.request(&target(HAIKU), &req).unwrap();
        assert_eq!(up.url, "https://api.anthropic.com/v1/messages");
        assert!(up
            .headers
            .contains(&("anthropic-version", "2023-06-01".into())));
        assert!(up.headers.contains(&("accept", "text/event-stream".into())));
        assert!(up
            .headers
            .contains(&("content-type", "application/json".into())));
        assert!(up.headers.iter().all(|(k, _)| *k != "x-api-key"));
        let b: Value = serde_json::from_slice(&up.body).unwrap();
        assert_eq!(b["model"], HAIKU);
        assert_eq!(b["stream"], true);
        assert_eq!(
            b["messages"],
            json!([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
        );
        let plain = body(HAIKU, json!({"model": "m", "messages": [user("hi")]}));
        assert!(plain.get("stream").is_none());
    }

    #[test]
    fn system_and_developer_messages_become_the_system_string() {
        let b = body(
            HAIKU,
            json!({"model": "m", "messages": [
                {"role": "system", "content": "Be brief."},
                user("hi"),
                {"role": "developer", "content": [{"type": "text", "text": "Rule 1."}, {"type": "text", "text": "Rule 2."}]},
                {"role": "system", "content": ""},
            ]}),
        );
        assert_eq!(b["system"], "Be brief.\n\nRule 1.\nRule 2.");
        assert_eq!(b["messages"].as_array().unwrap().len(), 1);
        let none = body(HAIKU, json!({"model": "m", "messages": [user("hi")]}));
        assert!(none.get("system").is_none());
    }

    #[test]
    fn same_role_messages_merge_and_empty_ones_are_dropped() {
        let b = body(
            HAIKU,
            json!({"model": "m", "messages": [
                user("a"),
                user(""),
                {"role": "assistant", "content": "x"},
                {"role": "assistant", "content": "  "},
                user("b"),
                {"role": "user", "content": [{"type": "text", "text": ""}, {"type": "text", "text": "c"}]},
            ]}),
        );
        assert_eq!(
            b["messages"],
            json!([
                {"role": "user", "content": [{"type": "text", "text": "a"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "x"}]},
                {"role": "user", "content": [{"type": "text", "text": "b"}, {"type": "text", "text": "c"}]},
            ])
        );
        // Dropping an empty assistant message re-merges the user turns around it.
        let b = body(
            HAIKU,
            json!({"model": "m", "messages": [user("a"), {"role": "assistant", "content": ""}, user("b")]}),
        );
        assert_eq!(b["messages"].as_array().unwrap().len(), 1);
        assert_eq!(b["messages"][0]["content"].as_array().unwrap().len(), 2);
        // Nothing left at all: a clear 400.
        let e = err(
            HAIKU,
            json!({"model": "m", "messages": [{"role": "system", "content": "s"}]}),
        );
        assert_eq!(e.param.as_deref(), Some("messages"));
    }

    #[test]
    fn images_by_data_uri_and_by_url() {
        let b = body(
            HAIKU,
            json!({"model": "m", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "high"}},
            ]}]}),
        );
        let content = &b["messages"][0]["content"];
        assert_eq!(
            content[1],
            json!({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}})
        );
        assert_eq!(
            content[2],
            json!({"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}})
        );
        for bad in [
            json!({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}),
            json!({"type": "file", "file": {"file_id": "f"}}),
            json!({"type": "image_url", "image_url": {"url": "data:image/png,notbase64"}}),
            json!({"type": "image_url", "image_url": {"url": "data:image/bmp;base64,AAAA"}}),
            json!({"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}),
        ] {
            let e = err(
                HAIKU,
                json!({"model": "m", "messages": [user("hi"), {"role": "user", "content": [bad]}]}),
            );
            assert_eq!(e.status, 400);
            assert_eq!(
                e.param.as_deref(),
                Some("messages[1].content"),
                "{}",
                e.message
            );
        }
    }

    #[test]
    fn tool_calls_with_null_content_and_results_in_one_user_turn() {
        let b = body(
            HAIKU,
            json!({"model": "m", "messages": [
                user("Weather in Paris and Rome?"),
                {"role": "assistant", "content": null, "reasoning_content": "thinking…", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": ""}},
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
                {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "noon"}]},
                user("Thanks. And tomorrow?"),
            ]}),
        );
        assert_eq!(
            b["messages"],
            json!([
                {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "call_2", "name": "now", "input": {}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "noon"}]},
                    {"type": "text", "text": "Thanks. And tomorrow?"},
                ]},
            ])
        );
    }

    #[test]
    fn tool_results_come_first_even_after_a_user_message() {
        let b = body(
            HAIKU,
            json!({"model": "m", "messages": [
                user("go"),
                {"role": "assistant", "content": "Calling.", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                user("(also this)"),
                {"role": "tool", "tool_call_id": "c", "content": ""},
            ]}),
        );
        let turn = &b["messages"][2]["content"];
        assert_eq!(turn[0], json!({"type": "tool_result", "tool_use_id": "c"}));
        assert_eq!(turn[1]["text"], "(also this)");
        assert_eq!(b["messages"][1]["content"][0]["text"], "Calling.");
    }

    #[test]
    fn invalid_tool_arguments_are_a_400_naming_the_field() {
        for args in ["{not json", "[1,2]"] {
            let e = err(
                HAIKU,
                json!({"model": "m", "messages": [
                    user("x"),
                    {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": args}}]},
                ]}),
            );
            assert_eq!(e.status, 400);
            assert_eq!(
                e.param.as_deref(),
                Some("messages[1].tool_calls[0].function.arguments")
            );
        }
        let e = err(
            HAIKU,
            json!({"model": "m", "messages": [user("x"), {"role": "tool", "content": "r"}]}),
        );
        assert_eq!(e.param.as_deref(), Some("messages[1].tool_call_id"));
    }

    #[test]
    fn a_prefill_stays_trimmed_where_the_model_takes_it() {
        let b = body(
            HAIKU,
            json!({"model": "m", "messages": [user("Tell a story"), {"role": "assistant", "content": "Once upon a time \n"}]}),
        );
        let last = b["messages"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(last["role"], "assistant");
        assert_eq!(last["content"][0]["text"], "Once upon a time");
        assert!(b.get("system").is_none());
    }

    #[test]
    fn a_prefill_becomes_an_instruction_where_the_model_refuses_it() {
        let req = json!({"model": "m", "messages": [
            {"role": "system", "content": "Be terse."},
            user("Tell a story"),
            {"role": "assistant", "content": "Once upon a time"},
        ]});
        let b = body(OPUS46, req.clone());
        let messages = b["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0]["role"], "user");
        assert_eq!(
            b["system"],
            format!("Be terse.\n\n{CONTINUE}\nOnce upon a time")
        );
        // Thinking allows no prefill either, even where the model takes one.
        let mut thinking = req;
        thinking["reasoning_effort"] = json!("low");
        let b = body(HAIKU, thinking);
        assert!(b.get("thinking").is_some());
        assert_eq!(b["messages"].as_array().unwrap().len(), 1);
        assert!(b["system"].as_str().unwrap().ends_with("Once upon a time"));
    }

    #[test]
    fn tools_and_tool_choice_variants() {
        let tools = json!([
            {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}, "strict": true}},
            {"type": "function", "function": {"name": "now"}},
        ]);
        let with = |choice: Value, parallel: Value| {
            let mut req = json!({"model": "m", "messages": [user("x")], "tools": tools});
            if !choice.is_null() {
                req["tool_choice"] = choice;
            }
            if !parallel.is_null() {
                req["parallel_tool_calls"] = parallel;
            }
            body(HAIKU, req)
        };
        let b = with(Value::Null, Value::Null);
        assert_eq!(
            b["tools"],
            json!([
                {"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
                {"name": "now", "input_schema": {"type": "object", "properties": {}}},
            ])
        );
        assert!(b.get("tool_choice").is_none());
        let cases = [
            (json!("auto"), Value::Null, json!({"type": "auto"})),
            (json!("required"), Value::Null, json!({"type": "any"})),
            (json!("none"), Value::Null, json!({"type": "none"})),
            (
                json!({"type": "function", "function": {"name": "now"}}),
                Value::Null,
                json!({"type": "tool", "name": "now"}),
            ),
            (
                Value::Null,
                json!(false),
                json!({"type": "auto", "disable_parallel_tool_use": true}),
            ),
            (
                json!("required"),
                json!(false),
                json!({"type": "any", "disable_parallel_tool_use": true}),
            ),
            (json!("none"), json!(false), json!({"type": "none"})),
        ];
        for (choice, parallel, want) in cases {
            assert_eq!(
                with(choice.clone(), parallel)["tool_choice"],
                want,
                "{choice}"
            );
        }
        let e = err(
            HAIKU,
            json!({"model": "m", "messages": [user("x")], "tools": tools, "tool_choice": "sometimes"}),
        );
        assert_eq!(e.param.as_deref(), Some("tool_choice"));
        let e = err(
            HAIKU,
            json!({"model": "m", "messages": [user("x")], "tools": [{"type": "function", "function": {"name": "freerelay_json_x"}}]}),
        );
        assert_eq!(e.param.as_deref(), Some("tools[0].function.name"));
    }

    #[test]
    fn stop_sampling_user_and_dropped_fields() {
        let b = body(
            HAIKU,
            json!({"model": "m", "messages": [user("x")], "stop": "END", "temperature": 1.7, "top_p": 0.5, "top_k": 40,
                   "user": "u-1", "logprobs": true, "top_logprobs": 2, "seed": 1, "frequency_penalty": 0.5, "presence_penalty": 0.1,
                   "logit_bias": {"1": 2}, "stream_options": {"include_usage": true}, "store": true, "metadata": {"a": "b"},
                   "service_tier": "auto", "n": 1}),
        );
        assert_eq!(b["stop_sequences"], json!(["END"]));
        assert_eq!(b["temperature"], 1.0);
        assert!(b.get("top_p").is_none(), "temperature wins over top_p");
        assert_eq!(b["top_k"], 40);
        assert_eq!(b["metadata"], json!({"user_id": "u-1"}));
        let keys: Vec<&str> = b.as_object().unwrap().keys().map(String::as_str).collect();
        for dropped in [
            "logprobs",
            "top_logprobs",
            "seed",
            "frequency_penalty",
            "presence_penalty",
            "logit_bias",
            "stream_options",
            "store",
            "service_tier",
            "n",
            "stop",
            "user",
        ] {
            assert!(!keys.contains(&dropped), "{dropped}");
        }
        let b = body(
            HAIKU,
            json!({"model": "m", "messages": [user("x")], "stop": ["a", " ", "b"], "top_p": 0.9}),
        );
        assert_eq!(b["stop_sequences"], json!(["a", "b"]));
        assert_eq!(b["top_p"], 0.9);
    }

    #[test]
    fn max_tokens_defaults_to_the_model_limit_and_is_clamped() {
        let mt = |extra: Value| {
            let mut req = json!({"model": "m", "messages": [user("x")]});
            req.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            body(HAIKU, req)["max_tokens"].clone()
        };
        assert_eq!(mt(json!({})), 64_000);
        assert_eq!(mt(json!({"max_tokens": 100})), 100);
        assert_eq!(mt(json!({"max_tokens": 1_000_000_000u64})), 64_000);
        assert_eq!(
            mt(json!({"max_completion_tokens": 50, "max_tokens": 100})),
            50
        );
        // An unlisted model: the catalogue's conservative default.
        let b = body(
            "claude-next",
            json!({"model": "m", "messages": [user("x")]}),
        );
        assert_eq!(b["max_tokens"], 4096);
        let e = err(
            HAIKU,
            json!({"model": "m", "messages": [user("x")], "max_tokens": 0}),
        );
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
    }

    #[test]
    fn reasoning_effort_turns_thinking_on_with_room_for_the_answer() {
        let b = body(
            HAIKU,
            json!({"model": "m", "messages": [user("x")], "reasoning_effort": "medium", "max_tokens": 1000, "temperature": 0.3, "top_k": 5, "top_p": 0.5}),
        );
        assert_eq!(
            b["thinking"],
            json!({"type": "enabled", "budget_tokens": 4096})
        );
        assert_eq!(b["max_tokens"], 5096);
        assert!(b.get("temperature").is_none() && b.get("top_k").is_none());
        assert_eq!(b["top_p"], 0.95);
        // The model's limit caps max_tokens, and the budget stays below it.
        let b = body(
            "claude-opus-4-1",
            json!({"model": "m", "messages": [user("x")], "reasoning_effort": "high", "max_tokens": 20000}),
        );
        assert_eq!(b["max_tokens"], 32_000);
        assert_eq!(b["thinking"]["budget_tokens"], 16_384);
        // No budget fits under a tiny limit; and an unlisted model has no reasoning cap.
        assert_eq!(fit_thinking(1024, Some(10), 1024), None);
        assert_eq!(
            fit_thinking(16_384, Some(1), 8000),
            Some(Thinking {
                budget: 7999,
                max_tokens: 8000
            })
        );
        let b = body(
            "claude-next",
            json!({"model": "m", "messages": [user("x")], "reasoning_effort": "high"}),
        );
        assert!(b.get("thinking").is_none());
        // A forced tool wins over thinking (Anthropic refuses both).
        let b = body(
            HAIKU,
            json!({"model": "m", "messages": [user("x")], "reasoning_effort": "low", "tool_choice": "required",
                   "tools": [{"type": "function", "function": {"name": "f"}}]}),
        );
        assert!(b.get("thinking").is_none());
        // Continuing a tool loop: the signed thinking of the calling turn cannot be sent back.
        let b = body(
            HAIKU,
            json!({"model": "m", "reasoning_effort": "high", "messages": [
                user("x"),
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c", "content": "r"},
            ], "tools": [{"type": "function", "function": {"name": "f"}}]}),
        );
        assert!(b.get("thinking").is_none());
        assert!(body(
            HAIKU,
            json!({"model": "m", "messages": [user("x")], "reasoning_effort": "minimal"})
        )
        .get("thinking")
        .is_none());
        let e = err(
            HAIKU,
            json!({"model": "m", "messages": [user("x")], "reasoning_effort": "extreme"}),
        );
        assert_eq!(e.param.as_deref(), Some("reasoning_effort"));
    }

    #[test]
    fn json_schema_becomes_a_forced_tool_keeping_recursive_refs() {
        let schema = json!({
            "type": "object",
            "properties": {"root": {"$ref": "#/$defs/node"}},
            "required": ["root"],
            "additionalProperties": false,
            "$defs": {"node": {"type": "object", "properties": {
                "name": {"type": "string"},
                "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
            }, "required": ["name", "children"], "additionalProperties": false}},
        });
        let b = body(
            HAIKU,
            json!({"model": "m", "messages": [user("A tree")], "reasoning_effort": "low",
                   "response_format": {"type": "json_schema", "json_schema": {"name": "tree", "schema": schema, "strict": true}}}),
        );
        assert_eq!(b["tools"].as_array().unwrap().len(), 1);
        assert_eq!(b["tools"][0]["name"], "freerelay_json_tree");
        assert_eq!(b["tools"][0]["input_schema"], schema);
        assert_eq!(
            b["tool_choice"],
            json!({"type": "tool", "name": "freerelay_json_tree"})
        );
        assert!(
            b.get("thinking").is_none(),
            "a forced tool allows no thinking"
        );
        // With client tools: an instruction, and the client's tools untouched.
        let b = body(
            HAIKU,
            json!({"model": "m", "messages": [user("x")], "tools": [{"type": "function", "function": {"name": "f"}}],
                   "response_format": {"type": "json_schema", "json_schema": {"name": "tree", "schema": schema}}}),
        );
        assert_eq!(b["tools"].as_array().unwrap().len(), 1);
        assert_eq!(b["tools"][0]["name"], "f");
        assert!(b.get("tool_choice").is_none());
        assert!(b["system"].as_str().unwrap().contains("\"$defs\""));
        // json_object: an instruction.
        let b = body(
            HAIKU,
            json!({"model": "m", "messages": [user("x")], "response_format": {"type": "json_object"}}),
        );
        assert_eq!(b["system"], JSON_OBJECT);
        assert!(b.get("tools").is_none());
        assert_eq!(json_tool_name(""), "freerelay_json_answer");
        assert_eq!(json_tool_name(&"x".repeat(100)).len(), 64);
    }

    #[test]
    fn more_than_one_choice_is_refused() {
        let e = err(
            HAIKU,
            json!({"model": "m", "messages": [user("x")], "n": 2}),
        );
        assert_eq!((e.status, e.param.as_deref()), (400, Some("n")));
        assert!(try_body(
            HAIKU,
            json!({"model": "m", "messages": [user("x")], "n": 1})
        )
        .is_ok());
    }

    // ---- answers

    /// Translates an answer that must be usable.
    fn answer(body: Value) -> (Value, Answer) {
        let a = Anthropic
            .answer(body.to_string().as_bytes(), &ctx(false))
            .unwrap();
        (serde_json::from_slice(&a.body).unwrap(), a)
    }

    #[test]
    fn a_text_answer_with_cache_usage() {
        let (v, a) = answer(json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
            "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " world"}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": 10, "cache_creation_input_tokens": 5, "cache_read_input_tokens": 20, "output_tokens": 7},
        }));
        assert_eq!(
            (&v["id"], &v["object"], &v["created"], &v["model"]),
            (
                &json!("chatcmpl-test"),
                &json!("chat.completion"),
                &json!(1_700_000_000),
                &json!("claude-x")
            )
        );
        let choice = &v["choices"][0];
        assert_eq!(choice["message"]["role"], "assistant");
        assert_eq!(choice["message"]["content"], "Hello world");
        assert!(choice["message"].get("tool_calls").is_none());
        assert!(choice["message"].get("reasoning_content").is_none());
        assert_eq!(choice["finish_reason"], "stop");
        assert_eq!(v["usage"]["prompt_tokens"], 35);
        assert_eq!(v["usage"]["completion_tokens"], 7);
        assert_eq!(v["usage"]["total_tokens"], 42);
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 20);
        assert_eq!(
            a.usage,
            Some(Usage {
                prompt_tokens: 35,
                completion_tokens: 7
            })
        );
        assert_eq!(a.finish_reason.as_deref(), Some("stop"));
    }

    #[test]
    fn parallel_tool_use_and_thinking() {
        let (v, a) = answer(json!({
            "type": "message", "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "Two cities.", "signature": "sig"},
                {"type": "redacted_thinking", "data": "xx"},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome", "unit": "c"}},
            ],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 3, "output_tokens": 4},
        }));
        let m = &v["choices"][0]["message"];
        assert_eq!(m["content"], Value::Null);
        assert_eq!(m["reasoning_content"], "Two cities.");
        let calls = m["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1]["id"], "toolu_2");
        assert_eq!(calls[1]["type"], "function");
        assert_eq!(calls[1]["function"]["name"], "get_weather");
        let args: Value =
            serde_json::from_str(calls[1]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"city": "Rome", "unit": "c"}));
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        assert!(v["usage"].get("prompt_tokens_details").is_none());
        assert_eq!(a.finish_reason.as_deref(), Some("tool_calls"));
    }

    #[test]
    fn stop_reasons_map_to_openai_finish_reasons() {
        for (stop, want) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("pause_turn", "stop"),
            ("max_tokens", "length"),
            ("model_context_window_exceeded", "length"),
            ("refusal", "content_filter"),
            ("tool_use", "tool_calls"),
        ] {
            let (v, _) = answer(
                json!({"type": "message", "content": [{"type": "text", "text": "x"}], "stop_reason": stop}),
            );
            assert_eq!(v["choices"][0]["finish_reason"], want, "{stop}");
        }
    }

    #[test]
    fn the_json_tool_answer_is_content() {
        let (v, a) = answer(json!({
            "type": "message",
            "content": [{"type": "tool_use", "id": "toolu_9", "name": "freerelay_json_tree", "input": {"root": {"name": "a", "children": []}}}],
            "stop_reason": "tool_use",
        }));
        let m = &v["choices"][0]["message"];
        assert!(m.get("tool_calls").is_none());
        let content: Value = serde_json::from_str(m["content"].as_str().unwrap()).unwrap();
        assert_eq!(content, json!({"root": {"name": "a", "children": []}}));
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert!(v.get("usage").is_none() && a.usage.is_none());
    }

    #[test]
    fn unusable_answers_are_errors() {
        let c = ctx(false);
        assert!(Anthropic
            .answer(
                br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
                &c
            )
            .unwrap_err()
            .contains("Overloaded (overloaded_error)"));
        assert!(Anthropic
            .answer(br#"{"type":"message","role":"assistant"}"#, &c)
            .unwrap_err()
            .contains("content"));
        assert!(Anthropic.answer(br#"{"type":"message","cont"#, &c).is_err());
    }

    #[test]
    fn error_details() {
        let d = |b: &[u8]| Anthropic.error_detail(b);
        assert_eq!(
            d(br#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: too big"}}"#).as_deref(),
            Some("max_tokens: too big (invalid_request_error)")
        );
        assert_eq!(
            d(br#"{"error":{"message":"plain"}}"#).as_deref(),
            Some("plain")
        );
        assert_eq!(d(br#"{"error":"worse"}"#).as_deref(), Some("worse"));
        assert_eq!(d(b"<html>"), None);
    }

    #[test]
    fn errors_are_judged_by_their_type_and_wording() {
        use crate::upstream::{Cause, Hints};
        let error = |kind: &str, message: &str| {
            format!(
                r#"{{"type":"error","error":{{"type":"{kind}","message":"{message}"}},"request_id":"req_1"}}"#
            )
        };
        let now = 1_795_246_080_000; // 2026-11-21T07:28:00Z
        let judge = |status: u16, body: &str, hints: Hints<'_>| {
            Anthropic.judge(
                "anthropic",
                "sk-ant-secret",
                status,
                hints,
                body.as_bytes(),
                now,
            )
        };
        let none = Hints::default();
        for (status, kind, message, cause) in [
            (400, "invalid_request_error", "prompt is too long: 208310 tokens > 200000 maximum", Cause::ContextLength),
            (400, "invalid_request_error", "input length and `max_tokens` exceed context limit: 197444 + 8192 > 200000, decrease input length or `max_tokens` and try again", Cause::ContextLength),
            (400, "invalid_request_error", "Output blocked by content filtering policy", Cause::ContentFilter),
            (400, "invalid_request_error", "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits.", Cause::KeyRefused),
            (402, "billing_error", "Payment required", Cause::KeyRefused),
            (400, "invalid_request_error", "max_tokens: Field required", Cause::Client),
            (401, "authentication_error", "invalid x-api-key", Cause::KeyRefused),
            (404, "not_found_error", "model: claude-nope", Cause::Unsupported),
            (413, "request_too_large", "Request exceeds the maximum allowed number of bytes.", Cause::Client),
            (500, "api_error", "Internal server error", Cause::Server),
            (529, "overloaded_error", "Overloaded", Cause::Server),
        ] {
            let f = judge(status, &error(kind, message), none);
            assert_eq!(f.cause, cause, "{status} {kind}: {message}");
        }
        // A 429: Retry-After first, else the reset headers (RFC 3339 timestamps).
        let limited = error("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit. Please reduce the prompt length or the maximum tokens requested, or try again later.");
        let f = judge(
            429,
            &limited,
            Hints {
                retry_after: Some("12"),
                ..none
            },
        );
        assert_eq!(
            (f.cause, f.cooldown.unwrap().until_ms),
            (Cause::RateLimited, now + 12_000)
        );
        let resets = Hints {
            reset_requests: Some("2026-11-21T07:28:30Z"),
            reset_tokens: Some("2026-11-21T07:28:09Z"),
            ..none
        };
        assert_eq!(
            judge(429, &limited, resets).cooldown.unwrap().until_ms,
            now + 30_000
        );
    }

    // ---- streams

    /// A stream with text, two tool calls whose argument deltas interleave, one tool without
    /// arguments, a server tool, thinking, pings and cache usage.
    const STREAM: &str = "event: message_start\n\
data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-haiku-4-5\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":10,\"cache_creation_input_tokens\":2,\"cache_read_input_tokens\":30,\"output_tokens\":1}}}\n\n\
event: content_block_start\n\
data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"thinking\",\"thinking\":\"\"}}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"Two \\\"cities\\\".\"}}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"signature_delta\",\"signature\":\"c2ln\"}}\n\n\
event: content_block_stop\n\
data: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
event: content_block_start\n\
data: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
event: ping\n\
data: {\"type\": \"ping\"}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"text_delta\",\"text\":\"Checking \u{e9}t\u{e9} weather.\"}}\n\n\
event: content_block_stop\n\
data: {\"type\":\"content_block_stop\",\"index\":1}\n\n\
event: content_block_start\n\
data: {\"type\":\"content_block_start\",\"index\":2,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_A\",\"name\":\"get_weather\",\"input\":{}}}\n\n\
event: content_block_start\n\
data: {\"type\":\"content_block_start\",\"index\":3,\"content_block\":{\"type\":\"server_tool_use\",\"id\":\"srvtoolu_1\",\"name\":\"web_search\",\"input\":{}}}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":3,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"query\\\":\\\"x\\\"}\"}}\n\n\
event: content_block_start\n\
data: {\"type\":\"content_block_start\",\"index\":4,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_B\",\"name\":\"get_weather\",\"input\":{}}}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":2,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\"}}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":4,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"city\\\": \\\"Ro\"}}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":2,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"city\\\"\"}}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":4,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"me\\\"}\"}}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":2,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\": \\\"Paris\\\"}\"}}\n\n\
event: content_block_stop\n\
data: {\"type\":\"content_block_stop\",\"index\":2}\n\n\
event: content_block_stop\n\
data: {\"type\":\"content_block_stop\",\"index\":3}\n\n\
event: content_block_stop\n\
data: {\"type\":\"content_block_stop\",\"index\":4}\n\n\
event: content_block_start\n\
data: {\"type\":\"content_block_start\",\"index\":5,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_C\",\"name\":\"now\",\"input\":{}}}\n\n\
event: content_block_stop\n\
data: {\"type\":\"content_block_stop\",\"index\":5}\n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":55}}\n\n\
event: message_stop\n\
data: {\"type\":\"message_stop\"}\n\n";

    /// Feeds the chunks in order.
    fn run(ctx: ReplyCtx, chunks: &[&[u8]]) -> (Vec<u8>, Box<dyn StreamTranslator>) {
        let mut t = Anthropic.stream(ctx);
        let mut out = Vec::new();
        for c in chunks {
            t.feed(c, &mut out);
        }
        (out, t)
    }

    /// Feeds `stream` in `size`-byte chunks.
    fn run_split(ctx: ReplyCtx, stream: &[u8], size: usize) -> Vec<u8> {
        let chunks: Vec<&[u8]> = stream.chunks(size).collect();
        run(ctx, &chunks).0
    }

    /// The `data:` events of the output, parsed (`[DONE]` apart).
    fn data_events(out: &[u8]) -> Vec<Value> {
        String::from_utf8(out.to_vec())
            .unwrap()
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }

    /// Concatenated `tool_calls` of the stream, by OpenAI index: (id, name, arguments).
    fn tool_calls(events: &[Value]) -> Vec<(String, String, String)> {
        let mut calls: Vec<(String, String, String)> = Vec::new();
        for e in events {
            for c in e["choices"][0]["delta"]["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let k = c["index"].as_u64().unwrap() as usize;
                if k == calls.len() {
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

    /// The concatenated `delta.<field>` strings.
    fn concat(events: &[Value], field: &str) -> String {
        events
            .iter()
            .filter_map(|e| e["choices"][0]["delta"][field].as_str())
            .collect()
    }

    #[test]
    fn any_byte_split_gives_the_same_output() {
        let whole = run(ctx(true), &[STREAM.as_bytes()]).0;
        for size in [1, 2, 7, 64, 1000] {
            assert_eq!(
                run_split(ctx(true), STREAM.as_bytes(), size),
                whole,
                "split every {size} bytes"
            );
        }
    }

    #[test]
    fn a_stream_translates_role_text_thinking_tools_and_finish() {
        let (out, mut t) = run(ctx(false), &[STREAM.as_bytes()]);
        let text = String::from_utf8(out.clone()).unwrap();
        let events = data_events(&out);
        assert_eq!(
            events[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        for e in &events {
            assert_eq!(e["object"], "chat.completion.chunk");
            assert_eq!(
                (&e["id"], &e["model"], &e["created"]),
                (
                    &json!("chatcmpl-test"),
                    &json!("claude-x"),
                    &json!(1_700_000_000)
                )
            );
        }
        assert_eq!(
            concat(&events, "content"),
            "Checking \u{e9}t\u{e9} weather."
        );
        assert_eq!(concat(&events, "reasoning_content"), "Two \"cities\".");
        let calls = tool_calls(&events);
        assert_eq!(calls.len(), 3, "the server tool is not the client's");
        assert_eq!((&*calls[0].0, &*calls[0].1), ("toolu_A", "get_weather"));
        assert_eq!((&*calls[1].0, &*calls[2].0), ("toolu_B", "toolu_C"));
        let args: Vec<Value> = calls
            .iter()
            .map(|c| serde_json::from_str(&c.2).unwrap())
            .collect();
        assert_eq!(
            args,
            [json!({"city": "Paris"}), json!({"city": "Rome"}), json!({})]
        );
        let last = events.last().unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(last["choices"][0]["delta"], json!({}));
        assert!(!text.contains("prompt_tokens"), "no usage chunk unasked");
        assert!(text.contains("\n\n: ping\n\n"));
        assert!(text.ends_with("data: [DONE]\n\n"));
        let s = t.state().clone();
        assert!(s.done && !s.upstream_error && s.broken.is_none());
        assert_eq!(s.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(s.events, 25);
        let usage = Usage {
            prompt_tokens: 42,
            completion_tokens: 55,
        };
        assert_eq!(s.usage, Some(usage));
        assert_eq!(t.take_new_usage(), Some(usage));
        assert_eq!(t.take_new_usage(), None);
        assert_eq!(t.end(None, &mut Vec::new()), StreamEnd::Complete);
    }

    #[test]
    fn the_usage_chunk_only_when_asked() {
        let (out, _) = run(ctx(true), &[STREAM.as_bytes()]);
        let events = data_events(&out);
        let usage = events.last().unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["prompt_tokens"], 42);
        assert_eq!(usage["usage"]["completion_tokens"], 55);
        assert_eq!(usage["usage"]["prompt_tokens_details"]["cached_tokens"], 30);
        assert_eq!(
            events[events.len() - 2]["choices"][0]["finish_reason"],
            "tool_calls"
        );
        let (out, _) = run(ctx(false), &[STREAM.as_bytes()]);
        assert!(data_events(&out).iter().all(|e| e.get("usage").is_none()));
    }

    #[test]
    fn a_mid_stream_error_becomes_an_openai_error_event() {
        let cut = &STREAM[..STREAM.find("event: content_block_stop").unwrap()];
        let s = format!(
            "{cut}event: error\ndata: {{\"type\": \"error\", \"error\": {{\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}}}\n\n\
event: message_stop\ndata: {{\"type\":\"message_stop\"}}\n\n"
        );
        let (out, mut t) = run(ctx(true), &[s.as_bytes()]);
        let events = data_events(&out);
        let e = events.last().unwrap();
        assert_eq!(
            e["error"],
            json!({"message": "Overloaded", "type": "overloaded_error", "param": null, "code": null})
        );
        assert!(!String::from_utf8(out).unwrap().contains("[DONE]"));
        assert!(t.state().upstream_error && !t.state().done);
        assert_eq!(t.take_new_usage(), None);
        assert_eq!(t.end(None, &mut Vec::new()), StreamEnd::UpstreamError);
    }

    #[test]
    fn a_cut_or_broken_stream_is_interrupted() {
        let cut = &STREAM[..STREAM.find("event: message_stop").unwrap() + 10];
        let (out, mut t) = run(ctx(false), &[cut.as_bytes()]);
        assert!(out.ends_with(b"\n\n"));
        assert_eq!(t.state().finish_reason.as_deref(), Some("tool_calls"));
        assert!(matches!(
            t.end(None, &mut Vec::new()),
            StreamEnd::Interrupted(_)
        ));
        let mut t = Anthropic.stream(ctx(false));
        let mut out = Vec::new();
        t.feed(b"data: ", &mut out);
        t.feed(&vec![b'x'; crate::wire::sse::MAX_EVENT + 1], &mut out);
        assert!(t.state().broken.is_some());
        assert!(matches!(
            t.end(None, &mut Vec::new()),
            StreamEnd::Interrupted(_)
        ));
    }

    #[test]
    fn the_json_tool_streams_as_content() {
        let s = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\n\
event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_J\",\"name\":\"freerelay_json_tree\",\"input\":{}}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"name\\\": \"}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\\\"a\\\"}\"}}\n\n\
event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":9}}\n\n\
event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let (out, t) = run(ctx(false), &[s.as_bytes()]);
        let events = data_events(&out);
        assert!(tool_calls(&events).is_empty());
        let content: Value = serde_json::from_str(&concat(&events, "content")).unwrap();
        assert_eq!(content, json!({"name": "a"}));
        assert_eq!(
            events.last().unwrap()["choices"][0]["finish_reason"],
            "stop"
        );
        assert_eq!(t.state().finish_reason.as_deref(), Some("stop"));
    }

    #[test]
    fn the_first_chunk_has_the_role_even_without_message_start() {
        let s = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n\
event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let (out, t) = run(ctx(true), &[s.as_bytes()]);
        let events = data_events(&out);
        assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(events[1]["choices"][0]["delta"]["content"], "hi");
        assert_eq!(events.len(), 3, "no usage known: no usage chunk");
        assert_eq!(t.state().usage, None);
        assert_eq!(t.state().finish_reason.as_deref(), Some("stop"));
    }

    #[test]
    fn a_continuation_has_no_second_role_and_keeps_its_text() {
        let s = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"and on\"}}\n\n";
        let mut c = ctx(false);
        c.continuation = true;
        c.collect_text = true;
        let (out, t) = run(c, &[s.as_bytes()]);
        let events = data_events(&out);
        assert!(events
            .iter()
            .all(|e| e.pointer("/choices/0/delta/role").is_none()));
        assert_eq!(events[0]["choices"][0]["delta"]["content"], "and on");
        assert_eq!(t.state().text.as_deref(), Some("and on"));
        assert!(t.state().content);
    }

    #[test]
    fn borrowed_strings_read_escapes_and_nulls() {
        let e: Event<'_> = serde_json::from_slice(
            br#"{"type":"message_delta","delta":{"stop_reason":null,"text":"a\nb"}}"#,
        )
        .unwrap();
        let d = e.delta.unwrap();
        assert_eq!(&*d.stop_reason.0, "");
        assert_eq!(&*d.text.0, "a\nb");
        assert!(matches!(e.kind.0, Cow::Borrowed("message_delta")));
    }

    #[test]
    fn a_top_level_ref_to_an_object_definition_is_lifted_for_the_forced_tool() {
        let schema = json!({
            "$defs": {"node": {"type": "object", "properties": {
                "name": {"type": "string"},
                "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                "required": ["name", "children"]}},
            "$ref": "#/$defs/node",
        });
        let b = body(
            HAIKU,
            json!({"model": "m", "messages": [user("A tree")],
                   "response_format": {"type": "json_schema", "json_schema": {"name": "tree", "schema": schema}}}),
        );
        let input = &b["tools"][0]["input_schema"];
        assert_eq!(input["type"], "object");
        assert_eq!(
            input["properties"]["children"]["items"]["$ref"],
            "#/$defs/node"
        );
        assert_eq!(input["$defs"]["node"]["type"], "object");
        assert_eq!(b["tool_choice"]["name"], "freerelay_json_tree");
        // A top level that is no object (an array answer) is asked for in words.
        let list = json!({"type": "array", "items": {"type": "string"}});
        let b = body(
            HAIKU,
            json!({"model": "m", "messages": [user("A list")],
                   "response_format": {"type": "json_schema", "json_schema": {"name": "l", "schema": list}}}),
        );
        assert!(b.get("tools").is_none());
        assert!(b["system"].as_str().unwrap().contains("JSON Schema"));
    }
}
