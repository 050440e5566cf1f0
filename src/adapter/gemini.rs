//! Gemini's native API: `POST {base}/models/{model}:generateContent`, or
//! `:streamGenerateContent?alt=sse` for streams (not the OpenAI-compatible shim, which drops
//! thought signatures, reasoning and finish reasons). Requests are rebuilt from the client's
//! OpenAI body; answers and streams are translated back into OpenAI's shape.
//!
//! # Thought signatures
//!
//! Gemini 3 signs the reasoning behind a function call (`thoughtSignature` on the
//! `functionCall` part) and answers 400 when a later request sends that call back without its
//! signature. OpenAI's wire has nowhere to keep it, so it travels in the tool call id, which every
//! client echoes verbatim: `<id>__thought__<signature>`. The signature is written in base64url
//! without padding (`+/` become `-_`, `=` is dropped) so the id stays within
//! `[A-Za-z0-9_-]`, the id alphabet strict providers (Anthropic) accept should the conversation
//! move there. Our own `<id>` never contains `__thought__` (a Gemini-provided id that does is
//! replaced), so splitting at the *first* occurrence is unambiguous even though `_` is a base64url
//! character. When a request's assistant `tool_calls` carry such an id, the signature goes back
//! on that `functionCall` part in standard padded base64, byte for byte what Gemini sent.
//! Calls that never had one (history from another provider) get Google's documented
//! `skip_thought_signature_validator` placeholder on Gemini 3 models, which would otherwise
//! reject them.

use super::{
    out, Adapter, Answer, ReplyCtx, StreamEnd, StreamState, StreamTranslator, Target,
    UpstreamRequest,
};
use crate::cooldown;
use crate::error::ApiError;
use crate::upstream::{self, Cause, Failure, Hints};
use crate::wire::openai::{error_message, ChatRequest, Usage};
use crate::wire::sse::SseFramer;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Map, Value};
use std::collections::HashMap;

/// The Gemini (generateContent) adapter.
pub struct Gemini;

/// Separates a tool call id from the thought signature it carries (see the module docs).
pub const THOUGHT_SEP: &str = "__thought__";

/// Gemini rejects more stop sequences than this; extra ones are dropped, never refused.
pub const MAX_STOP: usize = 5;

/// Google's documented placeholder for a Gemini 3 function call that has no signature of its own.
const SKIP_SIGNATURE: &str = "skip_thought_signature_validator";

impl Adapter for Gemini {
    fn request(&self, target: &Target<'_>, req: &ChatRequest) -> Result<UpstreamRequest, ApiError> {
        let body = request_body(target, req.body(), req.stream)?;
        let model = path_segment(target.model.strip_prefix("models/").unwrap_or(target.model));
        let url = if req.stream {
            format!(
                "{}/models/{model}:streamGenerateContent?alt=sse",
                target.base_url
            )
        } else {
            format!("{}/models/{model}:generateContent", target.base_url)
        };
        Ok(UpstreamRequest {
            url,
            headers: super::base_headers(req.stream),
            body: serde_json::to_vec(&body).unwrap_or_default(),
        })
    }

    fn answer(&self, body: &[u8], ctx: &ReplyCtx) -> Result<Answer, String> {
        let r: Response = serde_json::from_slice(body)
            .map_err(|e| format!("its answer is not a complete Gemini response ({e})"))?;
        if let Some(e) = r.error.as_ref().filter(|e| !e.is_null()) {
            return Err(format!(
                "it answered 200 with an error: {}",
                describe_error(e)
            ));
        }
        let mut choices = Vec::with_capacity(r.candidates.len().max(1));
        let mut calls = 0;
        for (pos, c) in r.candidates.iter().enumerate() {
            let mut text = String::new();
            let mut reasoning = String::new();
            let mut tool_calls = Vec::new();
            for p in c.parts() {
                if let Some(fc) = &p.function_call {
                    let id = tool_call_id(ctx, calls, fc, p.thought_signature.as_deref());
                    calls += 1;
                    tool_calls.push(json!({
                        "id": id,
                        "type": "function",
                        "function": {"name": fc.name, "arguments": fc.arguments()},
                    }));
                } else if let Some(t) = &p.text {
                    if p.is_thought() {
                        reasoning.push_str(t);
                    } else {
                        text.push_str(t);
                    }
                }
            }
            let finish = finish_reason(c, !tool_calls.is_empty())?;
            let mut message = json!({
                "role": "assistant",
                "content": if text.is_empty() { Value::Null } else { Value::String(text) },
            });
            if !reasoning.is_empty() {
                message["reasoning_content"] = Value::String(reasoning);
            }
            if !tool_calls.is_empty() {
                message["tool_calls"] = Value::Array(tool_calls);
            }
            choices.push(json!({
                "index": c.index.unwrap_or(pos as u64),
                "message": message,
                "finish_reason": finish,
                "logprobs": null,
            }));
        }
        if choices.is_empty() {
            if !r.prompt_blocked() {
                return Err("its answer has no candidates".into());
            }
            // The prompt itself was refused: an answer, as OpenAI reports a filtered one.
            choices.push(json!({
                "index": 0,
                "message": {"role": "assistant", "content": null},
                "finish_reason": "content_filter",
                "logprobs": null,
            }));
        }
        let finish_reason = choices
            .first()
            .and_then(|c| c["finish_reason"].as_str())
            .map(str::to_owned);
        let mut v = json!({
            "id": ctx.id,
            "object": "chat.completion",
            "created": ctx.created,
            "model": ctx.model,
            "choices": choices,
        });
        let usage = r.usage_metadata.map(|u| {
            v["usage"] = u.openai(ctx);
            u.usage()
        });
        Ok(Answer {
            body: serde_json::to_vec(&v).unwrap_or_default(),
            usage,
            finish_reason,
        })
    }

    fn stream(&self, ctx: ReplyCtx) -> Box<dyn StreamTranslator> {
        let text = ctx.collect_text.then(String::new);
        Box::new(GeminiStream {
            framer: SseFramer::default(),
            t: Translate {
                ctx,
                state: StreamState {
                    text,
                    ..StreamState::default()
                },
                new_usage: None,
                started: false,
                calls: 0,
                usage: None,
            },
        })
    }

    fn error_detail(&self, body: &[u8]) -> Option<String> {
        let v: Value = serde_json::from_slice(body).ok()?;
        // Streaming endpoints may wrap the error in an array.
        let v = match v {
            Value::Array(mut a) if !a.is_empty() => a.swap_remove(0),
            v => v,
        };
        match v.get("error") {
            Some(e @ Value::Object(_)) => Some(describe_error(e)),
            _ => error_message(body),
        }
    }

    /// Reads what Google's error body says beyond its message:
    ///
    /// - 429s carry no `Retry-After`; the wait is a `google.rpc.RetryInfo` detail in the body,
    ///   used so the cool-down is what Google asked for (LiteLLM #25507 ignored it).
    /// - A 429 whose `google.rpc.QuotaFailure` names a per-day quota
    ///   (`GenerateRequestsPerDayPerProjectPerModel-FreeTier`) is a spent daily cap: the key cools
    ///   until the next midnight in America/Los_Angeles, when Google resets it. Its `retryDelay`
    ///   (tens of seconds) only names the per-minute window and would make a retry storm.
    /// - Google answers a bad or revoked key with 400 INVALID_ARGUMENT (reason
    ///   API_KEY_INVALID), not 401: judged as the refused key it is, so it is set aside.
    /// - "User location is not supported for the API use." (400 FAILED_PRECONDITION): this
    ///   provider cannot serve the request, another may.
    ///
    /// Context overflows ("The input token count (N) exceeds the maximum number of tokens
    /// allowed (M).") are recognised by their wording in [`upstream::judge_body`]. Safety blocks
    /// are not HTTP errors on this API: they come as 200 answers (`promptFeedback.blockReason`,
    /// `finishReason: SAFETY`).
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
        let mut found = upstream::BodyHints {
            wait_ms: (status == 429)
                .then(|| retry_delay_secs(body))
                .flatten()
                .map(|s| s * 1000),
            ..Default::default()
        };
        if status == 400 && key_invalid(body) {
            found.cause = Some(Cause::KeyRefused);
        } else if status == 429 && per_day_quota(body) {
            found.cause = Some(Cause::DailyCap);
            found.reset_at_ms = Some(cooldown::next_reset_ms(
                upstream::day_reset(provider),
                now_ms,
            ));
        } else if detail
            .as_deref()
            .is_some_and(|d| d.contains("location is not supported"))
        {
            found.cause = Some(Cause::Unsupported);
        }
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

/// Does a Gemini 429 name a per-day quota in its `google.rpc.QuotaFailure` violations?
fn per_day_quota(body: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    let v = match &v {
        Value::Array(a) => a.first().unwrap_or(&Value::Null),
        v => v,
    };
    v["error"]["details"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| {
            d["@type"]
                .as_str()
                .is_some_and(|t| t.ends_with("google.rpc.QuotaFailure"))
        })
        .filter_map(|d| d["violations"].as_array())
        .flatten()
        .filter_map(|v| v["quotaId"].as_str())
        .any(|id| id.contains("PerDay"))
}

/// Does a Gemini error body say the key itself is invalid (`google.rpc.ErrorInfo` reason)?
fn key_invalid(body: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    v["error"]["details"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|d| d["reason"] == "API_KEY_INVALID")
}

// ---------------------------------------------------------------------------------------------
// Requests

/// The generateContent body for an OpenAI request; `Err` names the field Gemini cannot carry.
fn request_body(
    target: &Target<'_>,
    body: &Map<String, Value>,
    stream: bool,
) -> Result<Value, ApiError> {
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            ApiError::invalid_request("`messages` must be an array.", Some("messages"))
        })?;
    let mut conv = Conversation {
        placeholder_signatures: gemini_major(target.model).is_some_and(|v| v >= 3),
        ..Conversation::default()
    };
    for (i, m) in messages.iter().enumerate() {
        conv.message(i, m, i + 1 == messages.len())?;
    }
    if let Some(prefill) = conv.prefill.take() {
        // Gemini does not reliably continue a trailing model turn; ask for it in words.
        conv.system.push(format!(
            "Your reply has already begun with the text inside <partial_reply> below, and the \
             user can see it. Continue exactly where it leaves off, as if your output were \
             appended to it directly; do not repeat any of it.\n<partial_reply>{prefill}\
             </partial_reply>"
        ));
    }
    if conv.contents.is_empty() {
        return Err(ApiError::invalid_request(
            "Gemini needs at least one user message besides the system prompt.",
            Some("messages"),
        ));
    }
    let contents: Vec<Value> = conv
        .contents
        .into_iter()
        .map(|t| json!({"role": t.role, "parts": t.parts}))
        .collect();
    let mut out = Map::new();
    out.insert("contents".into(), Value::Array(contents));
    if !conv.system.is_empty() {
        out.insert(
            "systemInstruction".into(),
            json!({"parts": [{"text": conv.system.join("\n\n")}]}),
        );
    }
    tools(body, &mut out)?;
    let config = generation_config(target, body, stream)?;
    if !config.is_empty() {
        out.insert("generationConfig".into(), Value::Object(config));
    }
    Ok(Value::Object(out))
}

/// The conversation being rebuilt as Gemini `contents`.
#[derive(Default)]
struct Conversation {
    system: Vec<String>,
    contents: Vec<Turn>,
    /// Tool call id → function name, for `tool` messages (Gemini answers by name).
    names: HashMap<String, String>,
    /// The text of a trailing assistant message, to continue.
    prefill: Option<String>,
    /// Gemini 3 rejects unsigned function calls; they get Google's placeholder signature.
    placeholder_signatures: bool,
}

/// One Gemini turn.
struct Turn {
    role: &'static str,
    parts: Vec<Value>,
}

impl Conversation {
    /// Adds message `i`; `last` says whether it ends the conversation (a prefill).
    fn message(&mut self, i: usize, m: &Value, last: bool) -> Result<(), ApiError> {
        let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
        let content = m.get("content");
        match role {
            "system" | "developer" => {
                let text = text_of(content, i)?;
                if !text.is_empty() {
                    self.system.push(text);
                }
            }
            "user" => {
                let parts = user_parts(content, i)?;
                self.push("user", parts);
            }
            "assistant" => self.assistant(i, m, last)?,
            "tool" => {
                let param = format!("messages[{i}].tool_call_id");
                let id = m
                    .get("tool_call_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        ApiError::invalid_request(
                            format!("messages[{i}] is a tool result without `tool_call_id`."),
                            Some(&param),
                        )
                    })?;
                let name = self.names.get(id).cloned().ok_or_else(|| {
                    ApiError::invalid_request(
                        format!(
                            "messages[{i}].tool_call_id {id:?} matches no earlier assistant tool \
                             call; Gemini needs the function's name."
                        ),
                        Some(&param),
                    )
                })?;
                let part = function_response(name, &text_of(content, i)?);
                self.push("user", vec![part]);
            }
            "function" => {
                let name = m.get("name").and_then(Value::as_str).ok_or_else(|| {
                    ApiError::invalid_request(
                        format!("messages[{i}] is a function result without `name`."),
                        Some(&format!("messages[{i}].name")),
                    )
                })?;
                let part = function_response(name.to_owned(), &text_of(content, i)?);
                self.push("user", vec![part]);
            }
            other => {
                return Err(ApiError::invalid_request(
                    format!("messages[{i}].role {other:?} cannot be sent to Gemini."),
                    Some(&format!("messages[{i}].role")),
                ))
            }
        }
        Ok(())
    }

    /// An assistant message: text and function calls as a `model` turn, or a prefill.
    fn assistant(&mut self, i: usize, m: &Value, last: bool) -> Result<(), ApiError> {
        let text = text_of(m.get("content"), i)?;
        let calls = match m.get("tool_calls") {
            None | Some(Value::Null) => &[][..],
            Some(Value::Array(a)) => a.as_slice(),
            Some(_) => {
                return Err(ApiError::invalid_request(
                    format!("messages[{i}].tool_calls must be an array."),
                    Some(&format!("messages[{i}].tool_calls")),
                ))
            }
        };
        let legacy = m.get("function_call").filter(|f| f.is_object());
        if last && calls.is_empty() && legacy.is_none() {
            if !text.is_empty() {
                self.prefill = Some(text);
            }
            return Ok(());
        }
        let mut parts = Vec::with_capacity(calls.len() + 1);
        if !text.is_empty() {
            parts.push(json!({ "text": text }));
        }
        for (j, call) in calls.iter().enumerate() {
            let param = format!("messages[{i}].tool_calls[{j}]");
            let id = call.get("id").and_then(Value::as_str).unwrap_or_default();
            let f = call.get("function").unwrap_or(&Value::Null);
            let name = f.get("name").and_then(Value::as_str).ok_or_else(|| {
                ApiError::invalid_request(
                    format!("{param}.function.name is missing."),
                    Some(&format!("{param}.function.name")),
                )
            })?;
            let args = arguments(f.get("arguments"), &format!("{param}.function.arguments"))?;
            let mut part = json!({"functionCall": {"name": name, "args": args}});
            match split_signature(id) {
                Some((_, sig)) => {
                    part["thoughtSignature"] = Value::String(sig);
                }
                // Only the first call of a step carries a signature (parallel calls share it).
                None if j == 0 && self.placeholder_signatures => {
                    part["thoughtSignature"] = Value::String(SKIP_SIGNATURE.into());
                }
                None => {}
            }
            if !id.is_empty() {
                self.names.insert(id.to_owned(), name.to_owned());
            }
            parts.push(part);
        }
        if let Some(f) = legacy {
            let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
            let args = arguments(
                f.get("arguments"),
                &format!("messages[{i}].function_call.arguments"),
            )?;
            parts.push(json!({"functionCall": {"name": name, "args": args}}));
        }
        self.push("model", parts);
        Ok(())
    }

    /// Appends parts to the conversation, merging into the previous turn when it has the same
    /// role (Gemini wants turns to alternate; parallel tool results form one turn).
    fn push(&mut self, role: &'static str, parts: Vec<Value>) {
        if parts.is_empty() {
            return;
        }
        match self.contents.last_mut() {
            Some(t) if t.role == role => t.parts.extend(parts),
            _ => self.contents.push(Turn { role, parts }),
        }
    }
}

/// The text of a system, assistant or tool message (a string or text parts, joined).
fn text_of(content: Option<&Value>, i: usize) -> Result<String, ApiError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text") | Some("refusal") | None, Some(Value::String(t))) => {
                        texts.push(t.as_str())
                    }
                    (Some("refusal"), _) => {
                        if let Some(r) = p.get("refusal").and_then(Value::as_str) {
                            texts.push(r);
                        }
                    }
                    (kind, _) => {
                        return Err(ApiError::invalid_request(
                            format!(
                                "messages[{i}] can carry only text to Gemini (found a part of type \
                                 {:?}).",
                                kind.unwrap_or("unknown")
                            ),
                            Some(&format!("messages[{i}].content")),
                        ))
                    }
                }
            }
            Ok(texts.join("\n"))
        }
        Some(_) => Err(ApiError::invalid_request(
            format!("messages[{i}].content must be a string or an array of content parts."),
            Some(&format!("messages[{i}].content")),
        )),
    }
}

/// A user message's parts: text, images (inline or by URL), audio and inline files.
fn user_parts(content: Option<&Value>, i: usize) -> Result<Vec<Value>, ApiError> {
    let param = format!("messages[{i}].content");
    let bad = |why: String| ApiError::invalid_request(why, Some(&param));
    let list = match content {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) if s.is_empty() => return Ok(Vec::new()),
        Some(Value::String(s)) => return Ok(vec![json!({ "text": s })]),
        Some(Value::Array(list)) => list,
        Some(_) => {
            return Err(bad(format!(
                "messages[{i}].content must be a string or an array of content parts."
            )))
        }
    };
    let mut parts = Vec::with_capacity(list.len());
    for (k, p) in list.iter().enumerate() {
        let kind = p.get("type").and_then(Value::as_str).unwrap_or_default();
        match kind {
            "text" => match p.get("text").and_then(Value::as_str) {
                Some("") => {}
                Some(t) => parts.push(json!({ "text": t })),
                None => return Err(bad(format!("messages[{i}].content[{k}] has no `text`."))),
            },
            "image_url" => {
                let url = match p.get("image_url") {
                    Some(Value::String(u)) => Some(u.as_str()),
                    Some(o) => o.get("url").and_then(Value::as_str),
                    None => None,
                }
                .ok_or_else(|| bad(format!("messages[{i}].content[{k}] has no image URL.")))?;
                parts.push(
                    image_part(url).map_err(|why| {
                        bad(format!("messages[{i}].content[{k}].image_url: {why}"))
                    })?,
                );
            }
            "input_audio" => {
                let a = p.get("input_audio").unwrap_or(&Value::Null);
                let (Some(data), Some(format)) = (
                    a.get("data").and_then(Value::as_str),
                    a.get("format").and_then(Value::as_str),
                ) else {
                    return Err(bad(format!(
                        "messages[{i}].content[{k}].input_audio needs `data` and `format`."
                    )));
                };
                parts.push(
                    json!({"inlineData": {"mimeType": format!("audio/{format}"), "data": data}}),
                );
            }
            "file" => {
                let data = p
                    .get("file")
                    .and_then(|f| f.get("file_data"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        bad(format!(
                            "messages[{i}].content[{k}]: Gemini takes files only inline \
                             (`file.file_data` as a data URI), not by `file_id`."
                        ))
                    })?;
                let (mime, data) = data_uri(data).ok_or_else(|| {
                    bad(format!(
                        "messages[{i}].content[{k}].file.file_data is not a base64 data URI."
                    ))
                })?;
                parts.push(json!({"inlineData": {"mimeType": mime, "data": data}}));
            }
            other => {
                return Err(bad(format!(
                    "messages[{i}].content[{k}] has type {other:?}, which Gemini cannot take."
                )))
            }
        }
    }
    Ok(parts)
}

/// An image: a data URI goes inline; an http(s) URL goes by reference, typed by its extension.
fn image_part(url: &str) -> Result<Value, &'static str> {
    if url.starts_with("data:") {
        let (mime, data) = data_uri(url).ok_or("the data URI is not base64 with a MIME type")?;
        return Ok(json!({"inlineData": {"mimeType": mime, "data": data}}));
    }
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return Ok(json!({"fileData": {"mimeType": mime_from_url(url), "fileUri": url}}));
    }
    Err("expected a data URI or an http(s) URL")
}

/// `data:<mime>;base64,<data>` → (mime, data).
fn data_uri(uri: &str) -> Option<(&str, &str)> {
    let (head, data) = uri.strip_prefix("data:")?.split_once(',')?;
    let mime = head.strip_suffix(";base64")?;
    let mime = mime.split(';').next().unwrap_or_default();
    (!mime.is_empty() && !data.is_empty()).then_some((mime, data))
}

/// The MIME type of a URL's file, from its extension (JPEG when unknown: most images are).
fn mime_from_url(url: &str) -> &'static str {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let ext = path
        .rsplit_once('/')
        .map_or(path, |(_, file)| file)
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("png") => "image/png",
        Some("webp") => "image/webp",
        Some("gif") => "image/gif",
        Some("heic") => "image/heic",
        Some("heif") => "image/heif",
        Some("pdf") => "application/pdf",
        _ => "image/jpeg",
    }
}

/// A tool call's `arguments` (a JSON string) as the object Gemini's `args` must be.
fn arguments(v: Option<&Value>, param: &str) -> Result<Value, ApiError> {
    let bad = || {
        ApiError::invalid_request(
            format!("{param} must be a JSON object encoded as a string."),
            Some(param),
        )
    };
    match v {
        None | Some(Value::Null) => Ok(json!({})),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(json!({})),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(o @ Value::Object(_)) => Ok(o),
            _ => Err(bad()),
        },
        Some(o @ Value::Object(_)) => Ok(o.clone()),
        Some(_) => Err(bad()),
    }
}

/// A tool result as a `functionResponse` part: a JSON object as is, anything else wrapped.
fn function_response(name: String, text: &str) -> Value {
    let response = match serde_json::from_str::<Value>(text) {
        Ok(o @ Value::Object(_)) => o,
        _ => json!({ "content": text }),
    };
    json!({"functionResponse": {"name": name, "response": response}})
}

/// `tools` and `tool_choice` as Gemini's `tools` and `toolConfig`.
fn tools(body: &Map<String, Value>, out: &mut Map<String, Value>) -> Result<(), ApiError> {
    let list = match body.get("tools") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Array(l)) => l,
        Some(_) => {
            return Err(ApiError::invalid_request(
                "`tools` must be an array.",
                Some("tools"),
            ))
        }
    };
    let mut decls = Vec::with_capacity(list.len());
    for (j, t) in list.iter().enumerate() {
        let kind = t.get("type").and_then(Value::as_str).unwrap_or("function");
        let f = t
            .get("function")
            .filter(|_| kind == "function")
            .ok_or_else(|| {
                ApiError::invalid_request(
                    format!("tools[{j}] has type {kind:?}; Gemini takes only function tools."),
                    Some(&format!("tools[{j}]")),
                )
            })?;
        let name = f.get("name").and_then(Value::as_str).ok_or_else(|| {
            ApiError::invalid_request(
                format!("tools[{j}].function.name is missing."),
                Some(&format!("tools[{j}].function.name")),
            )
        })?;
        let mut d = json!({ "name": name });
        if let Some(desc) = f.get("description").filter(|d| d.is_string()) {
            d["description"] = desc.clone();
        }
        // parametersJsonSchema takes full JSON Schema, so client schemas pass unchanged.
        if let Some(p) = f.get("parameters").filter(|p| !p.is_null()) {
            d["parametersJsonSchema"] = p.clone();
        }
        decls.push(d);
    }
    if decls.is_empty() {
        return Ok(());
    }
    out.insert("tools".into(), json!([{ "functionDeclarations": decls }]));
    let config = match body.get("tool_choice") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(match s.as_str() {
            "auto" => json!({"mode": "AUTO"}),
            "none" => json!({"mode": "NONE"}),
            "required" => json!({"mode": "ANY"}),
            other => {
                return Err(ApiError::invalid_request(
                    format!(
                    "Invalid tool_choice {other:?}: expected auto, none, required or a function."
                ),
                    Some("tool_choice"),
                ))
            }
        }),
        Some(o) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::invalid_request(
                        "tool_choice must name a function: {\"type\":\"function\",\"function\":{\"name\":…}}.",
                        Some("tool_choice"),
                    )
                })?;
            Some(json!({"mode": "ANY", "allowedFunctionNames": [name]}))
        }
    };
    if let Some(c) = config {
        out.insert("toolConfig".into(), json!({ "functionCallingConfig": c }));
    }
    Ok(())
}

/// Sampling, limits, stop sequences, JSON output and thinking as `generationConfig`.
///
/// `json_schema` goes to `responseJsonSchema`, which takes JSON Schema as is — `$ref`/`$defs`,
/// recursive schemas included — unlike `responseSchema`, an OpenAPI subset that rejects them.
fn generation_config(
    target: &Target<'_>,
    body: &Map<String, Value>,
    stream: bool,
) -> Result<Map<String, Value>, ApiError> {
    let mut gc = Map::new();
    for (from, to) in [
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("top_k", "topK"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
        ("seed", "seed"),
    ] {
        if let Some(v) = number(body, from)? {
            gc.insert(to.into(), v);
        }
    }
    if let Some(n) = positive(body, "n")? {
        if n > 1 {
            if stream {
                return Err(ApiError::invalid_request(
                    "Gemini streams one candidate: use n=1 with stream, or no stream.",
                    Some("n"),
                ));
            }
            gc.insert("candidateCount".into(), json!(n));
        }
    }
    let max = match positive(body, "max_completion_tokens")? {
        Some(m) => Some(m),
        None => positive(body, "max_tokens")?,
    };
    if let Some(mut m) = max {
        if target.info.max_output > 0 {
            m = m.min(u64::from(target.info.max_output));
        }
        gc.insert("maxOutputTokens".into(), json!(m));
    }
    let stops: Vec<Value> = match body.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![Value::String(s.clone())],
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            a.iter().take(MAX_STOP).cloned().collect()
        }
        Some(_) => {
            return Err(ApiError::invalid_request(
                "`stop` must be a string or an array of strings.",
                Some("stop"),
            ))
        }
    };
    if !stops.is_empty() {
        gc.insert("stopSequences".into(), Value::Array(stops));
    }
    if let Some(rf) = body.get("response_format").filter(|v| !v.is_null()) {
        match rf.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some("json_object") => {
                gc.insert("responseMimeType".into(), json!("application/json"));
            }
            Some("json_schema") => {
                gc.insert("responseMimeType".into(), json!("application/json"));
                if let Some(s) = rf
                    .get("json_schema")
                    .and_then(|j| j.get("schema"))
                    .filter(|s| !s.is_null())
                {
                    gc.insert("responseJsonSchema".into(), s.clone());
                }
            }
            other => {
                return Err(ApiError::invalid_request(
                    format!(
                    "Invalid response_format type {:?}: expected text, json_object or json_schema.",
                    other.unwrap_or("(none)")
                ),
                    Some("response_format"),
                ))
            }
        }
    }
    if let Some(effort) = body.get("reasoning_effort").filter(|v| !v.is_null()) {
        let budget = match effort.as_str() {
            Some("none") => 0,
            Some("minimal") => 512,
            Some("low") => 1024,
            Some("medium") => 8192,
            Some("high") => 24576,
            _ => {
                return Err(ApiError::invalid_request(
                    "Invalid reasoning_effort: expected none, minimal, low, medium or high.",
                    Some("reasoning_effort"),
                ))
            }
        };
        // A model that cannot think ignores the hint, as OpenAI's non-reasoning models do.
        if target.info.caps.reasoning {
            let mut tc = json!({ "thinkingBudget": budget });
            if budget > 0 {
                // Thought summaries come back as reasoning_content.
                tc["includeThoughts"] = json!(true);
            }
            gc.insert("thinkingConfig".into(), tc);
        }
    }
    Ok(gc)
}

/// A numeric field, if set; anything else is the client's error.
fn number(body: &Map<String, Value>, key: &str) -> Result<Option<Value>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::Number(_)) => Ok(Some(v.clone())),
        Some(_) => Err(ApiError::invalid_request(
            format!("`{key}` must be a number."),
            Some(key),
        )),
    }
}

/// A positive integer field, if set.
fn positive(body: &Map<String, Value>, key: &str) -> Result<Option<u64>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n > 0 => Ok(Some(n)),
            _ => Err(ApiError::invalid_request(
                format!("`{key}` must be a positive integer."),
                Some(key),
            )),
        },
    }
}

/// The major version of a `gemini-<major>…` model id.
fn gemini_major(model: &str) -> Option<u32> {
    let rest = model.strip_prefix("models/").unwrap_or(model);
    let digits: String = rest
        .strip_prefix("gemini-")?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// A model id as one URL path segment (anything but unreserved characters escaped).
fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Thought signatures in tool call ids

/// The OpenAI id for the `n`th function call of an answer, carrying its signature if it has one.
fn tool_call_id(ctx: &ReplyCtx, n: usize, fc: &FunctionCall, signature: Option<&str>) -> String {
    let base = match fc.id.as_deref() {
        Some(id) if !id.is_empty() && !id.contains(THOUGHT_SEP) => id.to_owned(),
        _ => {
            let tail: String = ctx
                .id
                .strip_prefix("chatcmpl-")
                .unwrap_or(&ctx.id)
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .collect();
            format!("call_{tail}_{n}")
        }
    };
    match signature.filter(|s| !s.is_empty()) {
        Some(sig) => {
            let sig: String = sig
                .chars()
                .filter(|&c| c != '=')
                .map(|c| match c {
                    '+' => '-',
                    '/' => '_',
                    c => c,
                })
                .collect();
            format!("{base}{THOUGHT_SEP}{sig}")
        }
        None => base,
    }
}

/// Splits `<id>__thought__<signature>` into the id and the signature in standard padded base64.
fn split_signature(id: &str) -> Option<(&str, String)> {
    let (base, sig) = id.split_once(THOUGHT_SEP)?;
    let ok = !sig.is_empty()
        && sig
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        return None;
    }
    let mut std: String = sig
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    while std.len() % 4 != 0 {
        std.push('=');
    }
    Some((base, std))
}

// ---------------------------------------------------------------------------------------------
// Answers

/// `null` fields read as their default (Gemini omits most fields, proxies may null them).
fn nullable<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A GenerateContentResponse (an answer, or one stream event): only what is translated.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Response {
    #[serde(default, deserialize_with = "nullable")]
    candidates: Vec<Candidate>,
    prompt_feedback: Option<PromptFeedback>,
    usage_metadata: Option<UsageMetadata>,
    error: Option<Value>,
}

impl Response {
    /// The prompt itself was refused (no candidates will follow).
    fn prompt_blocked(&self) -> bool {
        self.prompt_feedback
            .as_ref()
            .is_some_and(|p| p.block_reason.is_some() || p.block_reason_message.is_some())
    }
}

/// One generated answer (OpenAI's choice).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    content: Option<Content>,
    finish_reason: Option<String>,
    finish_message: Option<String>,
    index: Option<u64>,
}

impl Candidate {
    /// Its parts (none when a filter emptied it).
    fn parts(&self) -> &[Part] {
        self.content.as_ref().map_or(&[], |c| &c.parts)
    }
}

/// A candidate's content.
#[derive(Debug, Deserialize)]
struct Content {
    #[serde(default, deserialize_with = "nullable")]
    parts: Vec<Part>,
}

/// One part: text (a thought summary when `thought`), or a whole function call.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Part {
    text: Option<String>,
    thought: Option<bool>,
    function_call: Option<FunctionCall>,
    thought_signature: Option<String>,
}

impl Part {
    /// Reasoning, relayed as `reasoning_content` rather than content.
    fn is_thought(&self) -> bool {
        self.thought == Some(true)
    }
}

/// A function call; Gemini sends it whole, never in pieces.
#[derive(Debug, Deserialize)]
struct FunctionCall {
    id: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    name: String,
    args: Option<Value>,
}

impl FunctionCall {
    /// OpenAI's `arguments`: the args object as a JSON string.
    fn arguments(&self) -> String {
        match &self.args {
            Some(a @ Value::Object(_)) => a.to_string(),
            _ => "{}".into(),
        }
    }
}

/// Why the prompt was refused, when it was.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    block_reason: Option<String>,
    block_reason_message: Option<String>,
}

/// Token counts; thoughts are billed as output, so they count as completion tokens.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    #[serde(default, deserialize_with = "nullable")]
    prompt_token_count: u64,
    #[serde(default, deserialize_with = "nullable")]
    candidates_token_count: u64,
    thoughts_token_count: Option<u64>,
    cached_content_token_count: Option<u64>,
}

impl UsageMetadata {
    /// What stats and quotas count.
    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_token_count,
            completion_tokens: self.candidates_token_count + self.thoughts_token_count.unwrap_or(0),
        }
    }

    /// OpenAI's `usage` object.
    fn openai(&self, ctx: &ReplyCtx) -> Value {
        let u = self.usage();
        out::usage(
            ctx,
            u.prompt_tokens,
            u.completion_tokens,
            self.cached_content_token_count,
            self.thoughts_token_count,
        )
    }
}

/// OpenAI's finish reason for Gemini's; a malformed function call is an error, never a stop.
fn map_finish(reason: &str, has_calls: bool) -> Result<&'static str, String> {
    match reason {
        "MAX_TOKENS" => Ok("length"),
        "SAFETY"
        | "RECITATION"
        | "BLOCKLIST"
        | "PROHIBITED_CONTENT"
        | "SPII"
        | "IMAGE_SAFETY"
        | "IMAGE_PROHIBITED_CONTENT"
        | "IMAGE_RECITATION"
        | "LANGUAGE" => Ok("content_filter"),
        "MALFORMED_FUNCTION_CALL" | "UNEXPECTED_TOOL_CALL" => Err(format!(
            "the model produced a malformed function call (finishReason {reason})"
        )),
        // STOP, OTHER, unknown: Gemini says STOP after a function call (LiteLLM #21041).
        _ => Ok(if has_calls { "tool_calls" } else { "stop" }),
    }
}

/// A candidate's finish reason (STOP when absent: a unary answer is complete).
fn finish_reason(c: &Candidate, has_calls: bool) -> Result<&'static str, String> {
    let reason = c.finish_reason.as_deref().filter(|r| !r.is_empty());
    map_finish(reason.unwrap_or("STOP"), has_calls).map_err(|e| match &c.finish_message {
        Some(m) if !m.is_empty() => format!("{e}: {m}"),
        _ => e,
    })
}

/// `message (STATUS)` of a Google error object.
fn describe_error(e: &Value) -> String {
    let message = e
        .get("message")
        .and_then(Value::as_str)
        .or_else(|| e.as_str())
        .unwrap_or("no message");
    match e.get("status").and_then(Value::as_str) {
        Some(s) if !s.is_empty() => format!("{message} ({s})"),
        _ => message.to_owned(),
    }
}

/// The wait a 429 asks for in its `google.rpc.RetryInfo` detail, in whole seconds, rounded up.
fn retry_delay_secs(body: &[u8]) -> Option<u64> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let v = match &v {
        Value::Array(a) => a.first()?,
        v => v,
    };
    v.get("error")?
        .get("details")?
        .as_array()?
        .iter()
        .filter(|d| {
            d.get("@type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.ends_with("google.rpc.RetryInfo"))
        })
        .find_map(|d| d.get("retryDelay").and_then(Value::as_str))
        .and_then(cooldown::parse_duration)
        .map(|ms| ms.div_ceil(1000))
}

// ---------------------------------------------------------------------------------------------
// Streams

/// Translates `streamGenerateContent?alt=sse`: each event is a whole GenerateContentResponse,
/// parsed once; there is no terminator, the finishing chunk ends the answer.
#[derive(Debug)]
pub struct GeminiStream {
    framer: SseFramer,
    t: Translate,
}

/// The translation state apart from framing (so events can be handled while framing).
#[derive(Debug)]
struct Translate {
    ctx: ReplyCtx,
    state: StreamState,
    new_usage: Option<Usage>,
    /// The client has the first chunk (`role`).
    started: bool,
    /// Function calls relayed so far: the next one's `index`.
    calls: usize,
    /// The latest usageMetadata (Gemini repeats it, growing, on every event).
    usage: Option<UsageMetadata>,
}

impl StreamTranslator for GeminiStream {
    fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let t = &mut self.t;
        if t.stopped() {
            return;
        }
        let framed = self.framer.feed(chunk, |ev| {
            if ev.has_data && !t.stopped() {
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

    fn end(&mut self, failure: Option<&str>, out: &mut Vec<u8>) -> StreamEnd {
        if failure.is_none() && !self.t.stopped() && self.framer.has_partial() {
            // The body ended after an event without its blank line: complete it (a cut event
            // then fails to parse and the stream is judged broken).
            self.feed(b"\n\n", out);
        }
        let s = &self.t.state;
        if let Some(why) = failure.or(s.broken.as_deref()) {
            return StreamEnd::Interrupted(why.to_owned());
        }
        if s.done {
            StreamEnd::Complete
        } else if s.upstream_error {
            StreamEnd::UpstreamError
        } else {
            StreamEnd::Interrupted("it ended before the answer was complete".into())
        }
    }
}

impl Translate {
    /// Nothing more is relayed once the answer is finished, failed or untranslatable.
    fn stopped(&self) -> bool {
        self.state.done || self.state.upstream_error || self.state.broken.is_some()
    }

    /// Translates one event (one parse): deltas, then the finish or the error it carries.
    fn event(&mut self, data: &[u8], out: &mut Vec<u8>) {
        self.state.events += 1;
        let r: Response = match serde_json::from_slice(data) {
            Ok(r) => r,
            Err(e) => {
                self.state.broken = Some(format!(
                    "it sent an event that is not a Gemini response ({e})"
                ));
                return;
            }
        };
        if let Some(e) = r.error.as_ref().filter(|e| !e.is_null()) {
            let code = e
                .get("status")
                .and_then(Value::as_str)
                .map(str::to_ascii_lowercase);
            out::error_event(
                &format!("Gemini reported an error mid-stream: {}", describe_error(e)),
                "upstream_error",
                code.as_deref(),
                out,
            );
            self.state.upstream_error = true;
            return;
        }
        if let Some(u) = r.usage_metadata {
            self.usage = Some(u);
        }
        let blocked = r.prompt_blocked();
        let Some(c) = r.candidates.iter().find(|c| c.index.unwrap_or(0) == 0) else {
            if blocked {
                self.finish("content_filter", out);
            }
            return;
        };
        for p in c.parts() {
            if let Some(fc) = &p.function_call {
                let id = tool_call_id(&self.ctx, self.calls, fc, p.thought_signature.as_deref());
                let delta = json!({"tool_calls": [{
                    "index": self.calls,
                    "id": id,
                    "type": "function",
                    "function": {"name": fc.name, "arguments": fc.arguments()},
                }]});
                self.calls += 1;
                self.emit(delta, None, out);
            } else if let Some(t) = p.text.as_deref().filter(|t| !t.is_empty()) {
                let key = if p.is_thought() {
                    "reasoning_content"
                } else {
                    "content"
                };
                self.emit(json!({ key: t }), None, out);
            }
        }
        let Some(reason) = c.finish_reason.as_deref().filter(|r| !r.is_empty()) else {
            return;
        };
        match map_finish(reason, self.calls > 0) {
            Ok(f) => self.finish(f, out),
            Err(why) => {
                let why = match &c.finish_message {
                    Some(m) if !m.is_empty() => format!("{why}: {m}"),
                    _ => why,
                };
                out::error_event(
                    &format!("Gemini: {why}."),
                    "upstream_error",
                    Some("malformed_function_call"),
                    out,
                );
                self.state.upstream_error = true;
            }
        }
    }

    /// Appends one chunk, preceded (once) by the chunk that gives the role.
    fn emit(&mut self, delta: Value, finish: Option<&str>, out: &mut Vec<u8>) {
        if !self.started {
            self.started = true;
            // A continuation: the client has its role chunk from the stream this one rescues.
            if !self.ctx.continuation {
                let first = json!({"role": "assistant", "content": ""});
                out::chunk_event(&self.ctx, &first, None, out);
            }
        }
        super::note_delta(&mut self.state, &delta);
        out::chunk_event(&self.ctx, &delta, finish, out);
    }

    /// The answer is complete: its finish reason, the usage chunk if asked for, then `[DONE]`.
    fn finish(&mut self, reason: &'static str, out: &mut Vec<u8>) {
        self.emit(json!({}), Some(reason), out);
        if let Some(u) = self.usage {
            let usage = u.usage();
            self.state.usage = Some(usage);
            self.new_usage = Some(usage);
            if self.ctx.client_usage {
                out::event(&out::usage_chunk(&self.ctx, u.openai(&self.ctx)), out);
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
    use crate::catalog;

    const BASE: &str = "https://generativelanguage.googleapis.com/v1beta";

    fn target(model: &str) -> Target<'_> {
        let p = catalog::provider("gemini").unwrap();
        Target {
            provider: p,
            base_url: BASE,
            model,
            info: p.model_info(model),
        }
    }

    fn ctx(client_usage: bool) -> ReplyCtx {
        ReplyCtx {
            id: "chatcmpl-abc123".into(),
            created: 1_700_000_000,
            model: "gemini-2.5-flash".into(),
            client_usage,
            price: None,
            continuation: false,
            collect_text: false,
        }
    }

    fn build(model: &str, req: Value) -> Result<(UpstreamRequest, Value), ApiError> {
        let req = ChatRequest::parse(req.to_string().as_bytes()).unwrap();
        let up = Gemini.request(&target(model), &req)?;
        let body = serde_json::from_slice(&up.body).unwrap();
        Ok((up, body))
    }

    /// The body sent for `messages` plus `extra` fields, to gemini-2.5-flash.
    fn body(messages: Value, extra: Value) -> Value {
        body_for("gemini-2.5-flash", messages, extra)
    }

    fn body_for(model: &str, messages: Value, extra: Value) -> Value {
        let mut req = json!({"model": "m", "messages": messages});
        if let Value::Object(e) = extra {
            req.as_object_mut().unwrap().extend(e);
        }
        build(model, req).unwrap().1
    }

    fn err(messages: Value, extra: Value) -> ApiError {
        let mut req = json!({"model": "m", "messages": messages});
        if let Value::Object(e) = extra {
            req.as_object_mut().unwrap().extend(e);
        }
        build("gemini-2.5-flash", req).unwrap_err()
    }

    fn user(text: &str) -> Value {
        json!({"role": "user", "content": text})
    }

    // -- requests -----------------------------------------------------------------------------

    #[test]
    fn urls_headers_and_no_key() {
        let (up, _) = build(
            "gemini-2.5-flash",
            json!({"model":"m","messages":[user("hi")]}),
        )
        .unwrap();
        assert_eq!(
            up.url,
            format!("{BASE}/models/gemini-2.5-flash:generateContent")
        );
        assert!(up.headers.contains(&("accept", "application/json".into())));
        assert!(up.headers.iter().all(|(k, _)| *k != "x-goog-api-key"));
        let (up, _) = build(
            "gemini-2.5-flash",
            json!({"model":"m","stream":true,"messages":[user("hi")]}),
        )
        .unwrap();
        assert_eq!(
            up.url,
            format!("{BASE}/models/gemini-2.5-flash:streamGenerateContent?alt=sse")
        );
        assert!(up.headers.contains(&("accept", "text/event-stream".into())));
        assert!(up
            .headers
            .contains(&("content-type", "application/json".into())));
        // A model id stays one path segment: no query or path injection.
        let (up, _) = build("x?key=1/../y", json!({"model":"m","messages":[user("hi")]})).unwrap();
        assert_eq!(
            up.url,
            format!("{BASE}/models/x%3Fkey%3D1%2F..%2Fy:generateContent")
        );
        let (up, _) = build(
            "models/gemini-2.5-pro",
            json!({"model":"m","messages":[user("hi")]}),
        )
        .unwrap();
        assert!(up.url.ends_with("/models/gemini-2.5-pro:generateContent"));
    }

    #[test]
    fn system_and_developer_messages_become_the_system_instruction() {
        let b = body(
            json!([
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
                user("hi"),
            ]),
            json!({}),
        );
        assert_eq!(
            b["systemInstruction"],
            json!({"parts": [{"text": "Be brief.\n\nUse French."}]})
        );
        assert_eq!(
            b["contents"],
            json!([{"role": "user", "parts": [{"text": "hi"}]}])
        );
        // Nothing but a system prompt: Gemini cannot answer that.
        let e = err(json!([{"role": "system", "content": "x"}]), json!({}));
        assert_eq!(e.param.as_deref(), Some("messages"));
    }

    #[test]
    fn roles_map_and_same_role_turns_merge() {
        let b = body(
            json!([
                user("a"),
                user("b"),
                {"role": "assistant", "content": "c"},
                {"role": "assistant", "content": "d"},
                user("e"),
            ]),
            json!({}),
        );
        assert_eq!(
            b["contents"],
            json!([
                {"role": "user", "parts": [{"text": "a"}, {"text": "b"}]},
                {"role": "model", "parts": [{"text": "c"}, {"text": "d"}]},
                {"role": "user", "parts": [{"text": "e"}]},
            ])
        );
    }

    #[test]
    fn images_go_inline_or_by_url() {
        let b = body(
            json!([{"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.PNG?size=2"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/photo", "detail": "low"}},
            ]}]),
            json!({}),
        );
        assert_eq!(
            b["contents"][0]["parts"],
            json!([
                {"text": "What is this?"},
                {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
                {"fileData": {"mimeType": "image/png", "fileUri": "https://example.com/cat.PNG?size=2"}},
                {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/photo"}},
            ])
        );
        for bad in [
            json!({"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}),
            json!({"type": "image_url", "image_url": {"url": "data:image/png,notbase64"}}),
            json!({"type": "video_url", "video_url": "x"}),
        ] {
            let e = err(
                json!([user("x"), {"role": "user", "content": [bad]}]),
                json!({}),
            );
            assert_eq!(e.status, 400);
            assert_eq!(e.param.as_deref(), Some("messages[1].content"));
        }
    }

    #[test]
    fn tool_calls_and_results_with_names_looked_up() {
        let b = body(
            json!([
                user("Weather in Paris and Rome?"),
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "c2", "type": "function", "function": {"name": "forecast", "arguments": ""}},
                ]},
                {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 21}"},
                {"role": "tool", "tool_call_id": "c2", "content": "sunny"},
                user("Thanks"),
            ]),
            json!({}),
        );
        assert_eq!(
            b["contents"],
            json!([
                {"role": "user", "parts": [{"text": "Weather in Paris and Rome?"}]},
                {"role": "model", "parts": [
                    {"functionCall": {"name": "weather", "args": {"city": "Paris"}}},
                    {"functionCall": {"name": "forecast", "args": {}}},
                ]},
                {"role": "user", "parts": [
                    {"functionResponse": {"name": "weather", "response": {"temp": 21}}},
                    {"functionResponse": {"name": "forecast", "response": {"content": "sunny"}}},
                    {"text": "Thanks"},
                ]},
            ])
        );
        // Arguments that are not a JSON object, and results for unknown calls, are refused.
        let e = err(
            json!([user("x"), {"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]),
            json!({}),
        );
        assert_eq!(
            e.param.as_deref(),
            Some("messages[1].tool_calls[0].function.arguments")
        );
        let e = err(
            json!([user("x"), {"role": "tool", "tool_call_id": "nope", "content": "r"}]),
            json!({}),
        );
        assert_eq!(e.param.as_deref(), Some("messages[1].tool_call_id"));
    }

    #[test]
    fn a_trailing_assistant_message_becomes_an_instruction_to_continue() {
        let b = body(
            json!([
                {"role": "system", "content": "S"},
                user("Write a haiku"),
                {"role": "assistant", "content": "Autumn moonlight—"},
            ]),
            json!({}),
        );
        assert_eq!(b["contents"].as_array().unwrap().len(), 1);
        let sys = b["systemInstruction"]["parts"][0]["text"].as_str().unwrap();
        assert!(sys.starts_with("S\n\n"));
        assert!(sys.contains("<partial_reply>Autumn moonlight—</partial_reply>"));
        assert!(sys.contains("Continue exactly where it leaves off"));
        assert!(sys.contains("do not repeat"));
        // Not trailing: an ordinary model turn.
        let b = body(
            json!([user("a"), {"role": "assistant", "content": "b"}, user("c")]),
            json!({}),
        );
        assert!(b.get("systemInstruction").is_none());
        assert_eq!(b["contents"][1]["role"], "model");
    }

    #[test]
    fn tools_pass_their_schema_unchanged_and_every_tool_choice_maps() {
        let params = json!({
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"$ref": "#/$defs/unit"}},
            "required": ["city"],
            "$defs": {"unit": {"enum": ["c", "f"]}},
            "additionalProperties": false,
        });
        let tools = json!([{"type": "function", "function": {
            "name": "weather", "description": "Weather now", "parameters": params, "strict": true}}]);
        let b = body(json!([user("x")]), json!({"tools": tools}));
        assert_eq!(
            b["tools"],
            json!([{"functionDeclarations": [
                {"name": "weather", "description": "Weather now", "parametersJsonSchema": params}
            ]}])
        );
        assert!(b.get("toolConfig").is_none());
        let cases = [
            (json!("auto"), json!({"mode": "AUTO"})),
            (json!("none"), json!({"mode": "NONE"})),
            (json!("required"), json!({"mode": "ANY"})),
            (
                json!({"type": "function", "function": {"name": "weather"}}),
                json!({"mode": "ANY", "allowedFunctionNames": ["weather"]}),
            ),
        ];
        for (choice, expected) in cases {
            let b = body(
                json!([user("x")]),
                json!({"tools": tools, "tool_choice": choice}),
            );
            assert_eq!(b["toolConfig"]["functionCallingConfig"], expected);
        }
        let e = err(
            json!([user("x")]),
            json!({"tools": tools, "tool_choice": "sometimes"}),
        );
        assert_eq!(e.param.as_deref(), Some("tool_choice"));
    }

    #[test]
    fn generation_config_and_openai_only_fields() {
        let b = body(
            json!([user("x")]),
            json!({
                "temperature": 0.2, "top_p": 0.9, "top_k": 40, "n": 2,
                "presence_penalty": 0.5, "frequency_penalty": -0.5, "seed": 7,
                "max_tokens": 100,
                "stop": ["a", "b", "c", "d", "e", "f", "g"],
                "stream_options": {"include_usage": true}, "logprobs": true, "logit_bias": {"1": 2},
                "store": true, "metadata": {"a": "b"}, "user": "u", "service_tier": "auto",
                "parallel_tool_calls": false,
            }),
        );
        let keys: Vec<&String> = b.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["contents", "generationConfig"]);
        assert_eq!(
            b["generationConfig"],
            json!({
                "temperature": 0.2, "topP": 0.9, "topK": 40, "candidateCount": 2,
                "presencePenalty": 0.5, "frequencyPenalty": -0.5, "seed": 7,
                "maxOutputTokens": 100,
                "stopSequences": ["a", "b", "c", "d", "e"],
            })
        );
        let b = body(json!([user("x")]), json!({"stop": "END"}));
        assert_eq!(b["generationConfig"]["stopSequences"], json!(["END"]));
        let e = err(json!([user("x")]), json!({"temperature": "hot"}));
        assert_eq!(e.param.as_deref(), Some("temperature"));
        // One streamed candidate only.
        let e = err(json!([user("x")]), json!({"n": 2, "stream": true}));
        assert_eq!(e.param.as_deref(), Some("n"));
    }

    #[test]
    fn max_tokens_prefer_max_completion_tokens_and_are_clamped() {
        let max = target("gemini-2.5-flash").info.max_output;
        let b = body(
            json!([user("x")]),
            json!({"max_completion_tokens": 1_000_000, "max_tokens": 5}),
        );
        assert_eq!(b["generationConfig"]["maxOutputTokens"], json!(max));
        let b = body(json!([user("x")]), json!({"max_completion_tokens": 300}));
        assert_eq!(b["generationConfig"]["maxOutputTokens"], 300);
        let e = err(json!([user("x")]), json!({"max_tokens": 0}));
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
    }

    #[test]
    fn json_schema_goes_to_response_json_schema_recursive_refs_included() {
        let schema = json!({
            "type": "object",
            "properties": {"root": {"$ref": "#/$defs/node"}},
            "$defs": {"node": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                },
                "required": ["name", "children"],
            }},
            "required": ["root"],
        });
        let b = body(
            json!([user("x")]),
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "tree", "strict": true, "schema": schema}}}),
        );
        assert_eq!(
            b["generationConfig"]["responseMimeType"],
            "application/json"
        );
        assert_eq!(b["generationConfig"]["responseJsonSchema"], schema);
        assert!(b["generationConfig"].get("responseSchema").is_none());
        let b = body(
            json!([user("x")]),
            json!({"response_format": {"type": "json_object"}}),
        );
        assert_eq!(
            b["generationConfig"],
            json!({"responseMimeType": "application/json"})
        );
    }

    #[test]
    fn reasoning_effort_sets_a_thinking_budget_on_thinking_models() {
        for (effort, budget) in [
            ("minimal", 512),
            ("low", 1024),
            ("medium", 8192),
            ("high", 24576),
        ] {
            let b = body(json!([user("x")]), json!({"reasoning_effort": effort}));
            assert_eq!(
                b["generationConfig"]["thinkingConfig"],
                json!({"thinkingBudget": budget, "includeThoughts": true}),
                "{effort}"
            );
        }
        let b = body(json!([user("x")]), json!({"reasoning_effort": "none"}));
        assert_eq!(
            b["generationConfig"]["thinkingConfig"],
            json!({"thinkingBudget": 0})
        );
        // Gemma does not think: the hint is dropped.
        let b = body_for(
            "gemma-3-27b-it",
            json!([user("x")]),
            json!({"reasoning_effort": "high"}),
        );
        assert!(b.get("generationConfig").is_none());
        let e = err(json!([user("x")]), json!({"reasoning_effort": "max"}));
        assert_eq!(e.param.as_deref(), Some("reasoning_effort"));
    }

    #[test]
    fn thought_signatures_round_trip_through_tool_call_ids() {
        // Standard base64 with `+`, `/` and padding, as Gemini sends it.
        let sig = "CiIBVKhc7vB+vaaq6rA/KC79Ts7iXagIOA4EBOyBFDpl+pxPCg==";
        let answer = json!({"candidates": [{"content": {"role": "model", "parts": [
            {"functionCall": {"name": "now", "args": {}}, "thoughtSignature": sig},
            {"functionCall": {"name": "later", "args": {"x": 1}}},
        ]}, "finishReason": "STOP"}]});
        let a = Gemini
            .answer(answer.to_string().as_bytes(), &ctx(false))
            .unwrap();
        let v: Value = serde_json::from_slice(&a.body).unwrap();
        let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap();
        let id0 = calls[0]["id"].as_str().unwrap();
        let id1 = calls[1]["id"].as_str().unwrap();
        assert!(id0.starts_with("call_abc123_0__thought__"), "{id0}");
        assert_eq!(id1, "call_abc123_1");
        assert!(
            id0.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
            "ids keep to [A-Za-z0-9_-]: {id0}"
        );
        // The client sends the conversation back: the signature returns to its call.
        let b = body(
            json!([
                user("What time is it?"),
                {"role": "assistant", "content": null, "tool_calls": calls},
                {"role": "tool", "tool_call_id": id0, "content": "12:00"},
                {"role": "tool", "tool_call_id": id1, "content": "13:00"},
            ]),
            json!({}),
        );
        let parts = &b["contents"][1]["parts"];
        assert_eq!(parts[0]["thoughtSignature"], sig);
        assert_eq!(parts[0]["functionCall"]["name"], "now");
        assert!(parts[1].get("thoughtSignature").is_none());
        assert_eq!(
            b["contents"][2]["parts"][0]["functionResponse"]["name"],
            "now"
        );

        // History from elsewhere has no signature: Gemini 3 gets the documented placeholder on
        // the first call of the step; Gemini 2.5 (which does not require one) gets nothing.
        let history = json!([
            user("x"),
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "toolu_2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "r"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": "r"},
        ]);
        let b = body_for("gemini-3.1-flash-lite", history.clone(), json!({}));
        assert_eq!(
            b["contents"][1]["parts"][0]["thoughtSignature"],
            "skip_thought_signature_validator"
        );
        assert!(b["contents"][1]["parts"][1]
            .get("thoughtSignature")
            .is_none());
        let b = body(history, json!({}));
        assert!(b["contents"][1]["parts"][0]
            .get("thoughtSignature")
            .is_none());
    }

    #[test]
    fn signature_ids_parse_only_when_well_formed() {
        assert_eq!(
            split_signature("call_1__thought__ab-_c"),
            Some(("call_1", "ab+/c===".to_owned()))
        );
        // The first separator splits, even if the signature contains it.
        assert_eq!(
            split_signature("c__thought__a__thought__b"),
            Some(("c", "a//thought//b===".to_owned()))
        );
        assert_eq!(split_signature("call_1"), None);
        assert_eq!(split_signature("call_1__thought__"), None);
        assert_eq!(split_signature("call_1__thought__a+b"), None);
    }

    // -- answers ------------------------------------------------------------------------------

    fn answer(v: Value) -> Result<(Answer, Value), String> {
        let a = Gemini.answer(v.to_string().as_bytes(), &ctx(false))?;
        let body = serde_json::from_slice(&a.body).unwrap();
        Ok((a, body))
    }

    #[test]
    fn a_text_answer() {
        let (a, v) = answer(json!({
            "candidates": [{"content": {"role": "model", "parts": [{"text": "Hello"}, {"text": " there"}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 2, "totalTokenCount": 6},
        }))
        .unwrap();
        assert_eq!(v["id"], "chatcmpl-abc123");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["created"], 1_700_000_000);
        assert_eq!(v["model"], "gemini-2.5-flash");
        assert_eq!(
            v["choices"][0]["message"],
            json!({"role": "assistant", "content": "Hello there"})
        );
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6})
        );
        assert_eq!(a.finish_reason.as_deref(), Some("stop"));
        assert_eq!(
            a.usage,
            Some(Usage {
                prompt_tokens: 4,
                completion_tokens: 2
            })
        );
    }

    #[test]
    fn parallel_function_calls_are_tool_calls_even_though_gemini_says_stop() {
        let (a, v) = answer(
            json!({"candidates": [{"content": {"role": "model", "parts": [
            {"functionCall": {"name": "weather", "args": {"city": "Paris"}}},
            {"functionCall": {"id": "g-7", "name": "weather", "args": {"city": "Rome"}}},
        ]}, "finishReason": "STOP"}]}),
        )
        .unwrap();
        let m = &v["choices"][0]["message"];
        assert_eq!(m["content"], Value::Null);
        assert_eq!(
            m["tool_calls"],
            json!([
                {"id": "call_abc123_0", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "g-7", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Rome\"}"}},
            ])
        );
        assert_eq!(a.finish_reason.as_deref(), Some("tool_calls"));
    }

    #[test]
    fn thoughts_become_reasoning_content_and_count_as_completion() {
        let (a, v) = answer(json!({
            "candidates": [{"content": {"parts": [
                {"text": "**Thinking**\nHmm.", "thought": true},
                {"text": "42"},
            ]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 1,
                              "thoughtsTokenCount": 30, "cachedContentTokenCount": 8},
        }))
        .unwrap();
        let m = &v["choices"][0]["message"];
        assert_eq!(m["content"], "42");
        assert_eq!(m["reasoning_content"], "**Thinking**\nHmm.");
        assert_eq!(
            v["usage"],
            json!({
                "prompt_tokens": 10, "completion_tokens": 31, "total_tokens": 41,
                "prompt_tokens_details": {"cached_tokens": 8},
                "completion_tokens_details": {"reasoning_tokens": 30},
            })
        );
        assert_eq!(a.usage.unwrap().completion_tokens, 31);
    }

    #[test]
    fn finish_reasons_map() {
        let with = |reason: &str| {
            answer(json!({"candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": reason}]}))
                .map(|(a, _)| a.finish_reason.unwrap())
        };
        assert_eq!(with("MAX_TOKENS").unwrap(), "length");
        for r in [
            "SAFETY",
            "RECITATION",
            "BLOCKLIST",
            "PROHIBITED_CONTENT",
            "SPII",
            "IMAGE_SAFETY",
            "LANGUAGE",
        ] {
            assert_eq!(with(r).unwrap(), "content_filter", "{r}");
        }
        assert_eq!(with("OTHER").unwrap(), "stop");
        for r in ["MALFORMED_FUNCTION_CALL", "UNEXPECTED_TOOL_CALL"] {
            let e = with(r).unwrap_err();
            assert!(e.contains("malformed function call"), "{e}");
        }
        // The finish message says what was wrong with the call.
        let e = answer(
            json!({"candidates": [{"finishReason": "MALFORMED_FUNCTION_CALL",
            "finishMessage": "Malformed function call: print(default_api.f(x=)"}]}),
        )
        .unwrap_err();
        assert!(e.contains("print(default_api.f(x=)"), "{e}");
    }

    #[test]
    fn a_blocked_prompt_is_a_filtered_answer() {
        let (a, v) = answer(json!({
            "promptFeedback": {"blockReason": "SAFETY", "safetyRatings": []},
            "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
        }))
        .unwrap();
        assert_eq!(
            v["choices"],
            json!([{"index": 0, "message": {"role": "assistant", "content": null},
                    "finish_reason": "content_filter", "logprobs": null}])
        );
        assert_eq!(a.finish_reason.as_deref(), Some("content_filter"));
        assert_eq!(a.usage.unwrap().prompt_tokens, 9);
    }

    #[test]
    fn unusable_answers_are_errors() {
        assert!(
            answer(json!({"error": {"code": 500, "message": "boom", "status": "INTERNAL"}}))
                .unwrap_err()
                .contains("boom (INTERNAL)")
        );
        assert!(answer(json!({"candidates": []})).is_err());
        assert!(Gemini.answer(b"{\"candidates\": [", &ctx(false)).is_err());
    }

    #[test]
    fn several_candidates_are_several_choices() {
        let (_, v) = answer(json!({"candidates": [
            {"content": {"parts": [{"text": "a"}]}, "finishReason": "STOP", "index": 0},
            {"content": {"parts": [{"text": "b"}]}, "finishReason": "MAX_TOKENS", "index": 1},
        ]}))
        .unwrap();
        assert_eq!(v["choices"][1]["index"], 1);
        assert_eq!(v["choices"][1]["message"]["content"], "b");
        assert_eq!(v["choices"][1]["finish_reason"], "length");
    }

    // -- streams ------------------------------------------------------------------------------

    const STREAM: &str = "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"Let me think.\",\"thought\": true}],\"role\": \"model\"}}],\"usageMetadata\": {\"promptTokenCount\": 7,\"totalTokenCount\": 9,\"thoughtsTokenCount\": 2}}\r\n\r\n\
data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"The capital\"}],\"role\": \"model\"}}],\"usageMetadata\": {\"promptTokenCount\": 7,\"totalTokenCount\": 9,\"thoughtsTokenCount\": 2}}\r\n\r\n\
data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \" is Cheyenne.\"}],\"role\": \"model\"},\"finishReason\": \"STOP\"}],\"usageMetadata\": {\"promptTokenCount\": 7,\"candidatesTokenCount\": 5,\"totalTokenCount\": 14,\"thoughtsTokenCount\": 2}}\r\n\r\n";

    fn run(client_usage: bool, chunks: &[&[u8]]) -> (Vec<u8>, Box<dyn StreamTranslator>) {
        let mut t = Gemini.stream(ctx(client_usage));
        let mut out = Vec::new();
        for c in chunks {
            t.feed(c, &mut out);
        }
        (out, t)
    }

    fn run_whole(client_usage: bool, s: &str) -> (Vec<u8>, Box<dyn StreamTranslator>) {
        run(client_usage, &[s.as_bytes()])
    }

    fn events(out: &[u8]) -> Vec<Value> {
        String::from_utf8_lossy(out)
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
    fn streams_translate_identically_however_the_bytes_arrive() {
        let (whole, _) = run_whole(true, STREAM);
        for size in [1, 7] {
            let chunks: Vec<&[u8]> = STREAM.as_bytes().chunks(size).collect();
            let (out, mut t) = run(true, &chunks);
            assert_eq!(out, whole, "{size}-byte chunks");
            assert_eq!(t.end(None, &mut Vec::new()), StreamEnd::Complete);
        }
        let ev = events(&whole);
        assert_eq!(
            deltas(&whole),
            [
                json!({"role": "assistant", "content": ""}),
                json!({"reasoning_content": "Let me think."}),
                json!({"content": "The capital"}),
                json!({"content": " is Cheyenne."}),
                json!({}),
            ]
        );
        assert!(ev
            .iter()
            .all(|e| e["id"] == "chatcmpl-abc123" && e["object"] == "chat.completion.chunk"));
        assert_eq!(ev[4]["choices"][0]["finish_reason"], "stop");
        assert!(ev[..4]
            .iter()
            .all(|e| e["choices"][0]["finish_reason"].is_null()));
    }

    #[test]
    fn finish_then_usage_only_when_asked_then_done() {
        let (out, mut t) = run_whole(true, STREAM);
        let ev = events(&out);
        let last = ev.last().unwrap();
        assert_eq!(last["choices"], json!([]));
        assert_eq!(
            last["usage"],
            json!({"prompt_tokens": 7, "completion_tokens": 7, "total_tokens": 14,
                   "completion_tokens_details": {"reasoning_tokens": 2}})
        );
        assert!(out.ends_with(b"}\n\ndata: [DONE]\n\n"));
        let state = t.state();
        assert!(state.done);
        assert_eq!(state.finish_reason.as_deref(), Some("stop"));
        let usage = Usage {
            prompt_tokens: 7,
            completion_tokens: 7,
        };
        assert_eq!(state.usage, Some(usage));
        assert_eq!(t.take_new_usage(), Some(usage));
        assert_eq!(t.take_new_usage(), None);

        let (out, mut t) = run_whole(false, STREAM);
        assert!(!String::from_utf8_lossy(&out).contains("prompt_tokens"));
        assert!(out.ends_with(b"data: [DONE]\n\n"));
        assert_eq!(
            t.take_new_usage(),
            Some(usage),
            "recorded even when not relayed"
        );
        assert_eq!(
            out.windows(b"[DONE]".len())
                .filter(|w| w == b"[DONE]")
                .count(),
            1
        );
    }

    #[test]
    fn parallel_function_calls_get_indexes_and_finish_as_tool_calls() {
        let s = "data: {\"candidates\": [{\"content\": {\"parts\": [{\"functionCall\": {\"name\": \"weather\",\"args\": {\"city\": \"Paris\"}},\"thoughtSignature\": \"AB+/\"}],\"role\": \"model\"}}]}\r\n\r\n\
data: {\"candidates\": [{\"content\": {\"parts\": [{\"functionCall\": {\"name\": \"weather\",\"args\": {\"city\": \"Rome\"}}}],\"role\": \"model\"},\"finishReason\": \"STOP\"}],\"usageMetadata\": {\"promptTokenCount\": 3,\"candidatesTokenCount\": 4}}\r\n\r\n";
        let (out, t) = run_whole(false, s);
        let d = deltas(&out);
        assert_eq!(d[0], json!({"role": "assistant", "content": ""}));
        assert_eq!(
            d[1],
            json!({"tool_calls": [{"index": 0, "id": "call_abc123_0__thought__AB-_", "type": "function",
                    "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}}]})
        );
        assert_eq!(
            d[2],
            json!({"tool_calls": [{"index": 1, "id": "call_abc123_1", "type": "function",
                    "function": {"name": "weather", "arguments": "{\"city\":\"Rome\"}"}}]})
        );
        assert_eq!(events(&out)[3]["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(t.state().finish_reason.as_deref(), Some("tool_calls"));
    }

    #[test]
    fn a_mid_stream_error_is_relayed_as_an_openai_error() {
        let s = "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"Hel\"}]}}]}\r\n\r\n\
data: {\"error\": {\"code\": 503, \"message\": \"The model is overloaded.\", \"status\": \"UNAVAILABLE\"}}\r\n\r\n\
data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"lo\"}]},\"finishReason\": \"STOP\"}]}\r\n\r\n";
        let (out, mut t) = run_whole(false, s);
        let ev = events(&out);
        let e = &ev.last().unwrap()["error"];
        assert_eq!(e["type"], "upstream_error");
        assert_eq!(e["code"], "unavailable");
        assert!(e["message"]
            .as_str()
            .unwrap()
            .contains("The model is overloaded. (UNAVAILABLE)"));
        assert!(!String::from_utf8_lossy(&out).contains("[DONE]"));
        assert!(
            !String::from_utf8_lossy(&out).contains("lo\""),
            "nothing after the error"
        );
        assert!(t.state().upstream_error);
        assert_eq!(t.end(None, &mut Vec::new()), StreamEnd::UpstreamError);
    }

    #[test]
    fn a_malformed_function_call_is_an_error_not_a_stop() {
        let s = "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"\"}]},\"finishReason\": \"MALFORMED_FUNCTION_CALL\",\"finishMessage\": \"Malformed function call: f(\"}]}\r\n\r\n";
        let (out, mut t) = run_whole(false, s);
        let ev = events(&out);
        assert_eq!(ev.len(), 1, "only the error: {ev:?}");
        assert_eq!(ev[0]["error"]["code"], "malformed_function_call");
        assert_eq!(ev[0]["error"]["type"], "upstream_error");
        assert!(ev[0]["error"]["message"].as_str().unwrap().contains("f("));
        assert!(!String::from_utf8_lossy(&out).contains("[DONE]"));
        assert_eq!(t.state().finish_reason, None);
        assert_eq!(t.end(None, &mut Vec::new()), StreamEnd::UpstreamError);
    }

    #[test]
    fn a_body_that_ends_without_a_finish_reason_is_interrupted() {
        let cut = &STREAM[..STREAM.rfind("data: ").unwrap()];
        let (mut out, mut t) = run_whole(true, cut);
        let before = out.len();
        assert!(matches!(t.end(None, &mut out), StreamEnd::Interrupted(_)));
        assert_eq!(out.len(), before, "no [DONE] for a truncated answer");
        assert!(!t.state().done);
        // Cut inside an event: still interrupted, never a success.
        let cut = &STREAM[..STREAM.rfind("Cheyenne").unwrap()];
        let (mut out, mut t) = run_whole(true, cut);
        assert!(matches!(t.end(None, &mut out), StreamEnd::Interrupted(_)));
        assert!(!String::from_utf8_lossy(&out).contains("[DONE]"));
        // A transport failure wins.
        let (mut out, mut t) = run_whole(true, STREAM);
        assert!(
            matches!(t.end(Some("reset"), &mut out), StreamEnd::Interrupted(w) if w == "reset")
        );
    }

    #[test]
    fn a_last_event_without_its_blank_line_still_finishes() {
        let s = STREAM.trim_end();
        let (mut out, mut t) = run_whole(false, s);
        assert!(!t.state().done);
        assert_eq!(t.end(None, &mut out), StreamEnd::Complete);
        assert!(out.ends_with(b"data: [DONE]\n\n"));
    }

    #[test]
    fn events_after_the_finish_are_ignored_and_the_role_comes_once() {
        let extra =
            "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"late\"}]}}]}\r\n\r\n";
        let (out, _) = run(false, &[STREAM.as_bytes(), extra.as_bytes()]);
        let (whole, _) = run_whole(false, STREAM);
        assert_eq!(out, whole);
        let roles = deltas(&out)
            .iter()
            .filter(|d| d.get("role").is_some())
            .count();
        assert_eq!(roles, 1);
    }

    #[test]
    fn a_blocked_prompt_in_a_stream_finishes_filtered() {
        let s = "data: {\"promptFeedback\": {\"blockReason\": \"SAFETY\"},\"usageMetadata\": {\"promptTokenCount\": 5}}\r\n\r\n";
        let (out, mut t) = run_whole(false, s);
        assert_eq!(
            deltas(&out),
            [json!({"role": "assistant", "content": ""}), json!({})]
        );
        assert_eq!(t.state().finish_reason.as_deref(), Some("content_filter"));
        assert_eq!(t.end(None, &mut Vec::new()), StreamEnd::Complete);
    }

    #[test]
    fn an_event_that_is_not_json_breaks_the_stream() {
        let (_, mut t) = run_whole(false, "data: <html>\r\n\r\n");
        assert!(t.state().broken.is_some());
        assert!(matches!(
            t.end(None, &mut Vec::new()),
            StreamEnd::Interrupted(_)
        ));
    }

    // -- errors -------------------------------------------------------------------------------

    const RATE_LIMITED: &str = r#"{"error": {"code": 429, "message": "You exceeded your current quota.", "status": "RESOURCE_EXHAUSTED", "details": [
        {"@type": "type.googleapis.com/google.rpc.Help", "links": []},
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1.5s"}]}}"#;

    #[test]
    fn error_details_carry_the_status() {
        assert_eq!(
            Gemini.error_detail(RATE_LIMITED.as_bytes()).as_deref(),
            Some("You exceeded your current quota. (RESOURCE_EXHAUSTED)")
        );
        let wrapped = format!("[{RATE_LIMITED}]");
        assert!(Gemini
            .error_detail(wrapped.as_bytes())
            .unwrap()
            .starts_with("You exceeded"));
        assert_eq!(Gemini.error_detail(b"<html>"), None);
    }

    #[test]
    fn a_429_waits_for_the_retry_delay_in_its_body() {
        let f = Gemini.judge(
            "gemini",
            "key-123",
            429,
            Hints::default(),
            RATE_LIMITED.as_bytes(),
            1_000,
        );
        assert_eq!(f.cooldown.unwrap().until_ms, 3_000, "1.5s rounds up to 2s");
        assert_eq!((f.error.status, f.error.retry_after), (429, Some(2)));
        assert!(f.error.message.contains("RESOURCE_EXHAUSTED"));
        let body = RATE_LIMITED.replace("1.5s", "52s");
        let f = Gemini.judge("gemini", "k", 429, Hints::default(), body.as_bytes(), 0);
        assert_eq!(f.cooldown.unwrap().until_ms, 52_000);
        // A Retry-After header, when there is one, wins.
        let hints = Hints {
            retry_after: Some("7"),
            ..Hints::default()
        };
        let f = Gemini.judge("gemini", "k", 429, hints, RATE_LIMITED.as_bytes(), 0);
        assert_eq!(f.cooldown.unwrap().until_ms, 7_000);
        // Without RetryInfo: the default wait.
        let f = Gemini.judge("gemini", "k", 429, Hints::default(), b"{}", 0);
        assert_eq!(f.cooldown.unwrap().until_ms, cooldown::DEFAULT_MS);
    }

    #[test]
    fn an_invalid_key_is_judged_refused_not_a_bad_request() {
        let body = br#"{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","domain":"googleapis.com"}]}}"#;
        let f = Gemini.judge("gemini", "AIza-secret", 400, Hints::default(), body, 0);
        assert!(f.key_refused() && f.retryable);
        let other = br#"{"error":{"code":400,"message":"Invalid JSON payload","status":"INVALID_ARGUMENT"}}"#;
        let f = Gemini.judge("gemini", "AIza-secret", 400, Hints::default(), other, 0);
        assert!(!f.key_refused() && !f.retryable);
    }

    /// A real free-tier 429 (`tests/fixtures/gemini/error_429_page.json`): a per-day quota, with
    /// a `retryDelay` that only names the per-minute window.
    const DAILY_CAP: &str = r#"{"error": {"code": 429, "message": "You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.", "status": "RESOURCE_EXHAUSTED", "details": [
        {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests", "quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier", "quotaDimensions": {"location": "global", "model": "gemini-2.5-flash"}, "quotaValue": "250"}]},
        {"@type": "type.googleapis.com/google.rpc.Help", "links": [{"description": "Learn more about Gemini API quotas", "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "22s"}]}}"#;

    #[test]
    fn a_spent_daily_quota_cools_until_midnight_in_los_angeles() {
        // 2026-07-04 12:00 UTC (05:00 PDT): the reset is 2026-07-05 00:00 PDT, 07:00 UTC.
        let now = 1_783_166_400_000;
        let f = Gemini.judge(
            "gemini",
            "AIza-secret",
            429,
            Hints::default(),
            DAILY_CAP.as_bytes(),
            now,
        );
        assert_eq!((f.cause, f.retryable), (Cause::DailyCap, true));
        assert_eq!(f.cooldown.unwrap().until_ms, 1_783_234_800_000);
        assert_eq!(f.error.retry_after, Some(19 * 3_600));
        // 2026-01-15 12:00 UTC (04:00 PST): the reset is at 08:00 UTC the next day.
        let now = 1_768_478_400_000;
        let f = Gemini.judge(
            "gemini",
            "k",
            429,
            Hints::default(),
            DAILY_CAP.as_bytes(),
            now,
        );
        assert_eq!(f.cooldown.unwrap().until_ms, now + 20 * 3_600_000);
        // Wrapped in an array, as streaming endpoints send it.
        let wrapped = format!("[{DAILY_CAP}]");
        let f = Gemini.judge(
            "gemini",
            "k",
            429,
            Hints::default(),
            wrapped.as_bytes(),
            now,
        );
        assert_eq!(f.cause, Cause::DailyCap);
        // A per-minute quota stays a rate limit, with its retryDelay.
        let minute = DAILY_CAP.replace("PerDay", "PerMinute");
        let f = Gemini.judge("gemini", "k", 429, Hints::default(), minute.as_bytes(), now);
        assert_eq!(f.cause, Cause::RateLimited);
        assert_eq!(f.cooldown.unwrap().until_ms, now + 22_000);
    }

    #[test]
    fn overflows_and_unserved_locations() {
        let overflow = br#"{"error":{"code":400,"message":"The input token count (1300000) exceeds the maximum number of tokens allowed (1048575).","status":"INVALID_ARGUMENT"}}"#;
        let f = Gemini.judge("gemini", "k", 400, Hints::default(), overflow, 0);
        assert_eq!(
            (f.cause, f.retryable, f.cooldown),
            (Cause::ContextLength, true, None)
        );
        assert_eq!(
            (f.error.status, f.error.code),
            (400, Some("context_length_exceeded"))
        );
        let location = br#"{"error":{"code":400,"message":"User location is not supported for the API use.","status":"FAILED_PRECONDITION"}}"#;
        let f = Gemini.judge("gemini", "k", 400, Hints::default(), location, 0);
        assert_eq!(
            (f.cause, f.retryable, f.cooldown),
            (Cause::Unsupported, true, None)
        );
        let f = Gemini.judge("gemini", "k", 503, Hints::default(), br#"{"error":{"code":503,"message":"The model is overloaded. Please try again later.","status":"UNAVAILABLE"}}"#, 0);
        assert_eq!((f.cause, f.retryable), (Cause::Server, true));
    }
}
