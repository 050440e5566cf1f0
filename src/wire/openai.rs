//! The OpenAI chat-completions request as the gateway needs it: validated once, everything the
//! client sent kept verbatim (unknown fields included) so forwarding loses nothing.

use crate::error::ApiError;
use serde_json::{Map, Value};

const ROLES: &[&str] = &[
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

/// A validated chat-completions request.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// The model the client asked for (`auto`, `<provider>/<model>` or a catalogue model id).
    pub model: String,
    pub stream: bool,
    /// `stream_options.include_usage`: the client expects a final usage chunk.
    pub include_usage: bool,
    /// OpenRouter's per-request fallback list (`models`): tried after `model`, in order.
    pub fallback_models: Vec<String>,
    /// The body, without the fields only FreeRelay reads (they never go upstream).
    body: Map<String, Value>,
}

/// Body fields FreeRelay reads and removes before anything goes upstream (OpenRouter's
/// convention: `models` is the fallback list, `route: "fallback"` its switch).
pub const GATEWAY_ONLY_FIELDS: &[&str] = &["models", "route"];

/// Most models a `models` fallback list may name.
pub const MAX_FALLBACK_MODELS: usize = 16;

impl ChatRequest {
    /// Parses and validates a request body; errors name the offending field in `param`.
    pub fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            ApiError::invalid_request(
                format!("We could not parse the JSON body of your request: {e}."),
                None,
            )
        })?;
        let Value::Object(mut body) = value else {
            return Err(ApiError::invalid_request(
                "The request body must be a JSON object.",
                None,
            ));
        };
        let model = match body.get("model") {
            Some(Value::String(m)) if valid_model(m.trim()) => m.trim().to_owned(),
            Some(Value::String(m)) if !m.trim().is_empty() => {
                return Err(ApiError::invalid_request(
                    format!(
                        "Invalid `model`: use at most {MAX_MODEL_LEN} printable ASCII characters \
                         without spaces (got {} bytes).",
                        m.len()
                    ),
                    Some("model"),
                ))
            }
            Some(Value::String(_)) | None => {
                return Err(ApiError::invalid_request(
                    "You must provide a model parameter.",
                    Some("model"),
                ))
            }
            Some(_) => {
                return Err(ApiError::invalid_request(
                    "`model` must be a string.",
                    Some("model"),
                ))
            }
        };
        validate_messages(body.get("messages"))?;
        let stream = match body.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(ApiError::invalid_request(
                    "`stream` must be a boolean.",
                    Some("stream"),
                ))
            }
        };
        let include_usage = match body.get("stream_options") {
            None | Some(Value::Null) => false,
            Some(Value::Object(o)) => match o.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(ApiError::invalid_request(
                        "`stream_options.include_usage` must be a boolean.",
                        Some("stream_options.include_usage"),
                    ))
                }
            },
            Some(_) => {
                return Err(ApiError::invalid_request(
                    "`stream_options` must be an object.",
                    Some("stream_options"),
                ))
            }
        };
        let fallback_models = match body.get("models") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(list)) if list.len() <= MAX_FALLBACK_MODELS => {
                let mut out = Vec::with_capacity(list.len());
                for (i, m) in list.iter().enumerate() {
                    match m.as_str().map(str::trim) {
                        Some(m) if valid_model(m) => out.push(m.to_owned()),
                        _ => {
                            return Err(ApiError::invalid_request(
                                format!(
                                    "`models[{i}]` must be a model name (printable ASCII without \
                                     spaces, at most {MAX_MODEL_LEN} bytes)."
                                ),
                                Some(&format!("models[{i}]")),
                            ))
                        }
                    }
                }
                out
            }
            Some(_) => {
                return Err(ApiError::invalid_request(
                    format!(
                        "`models` must be an array of at most {MAX_FALLBACK_MODELS} model names."
                    ),
                    Some("models"),
                ))
            }
        };
        for f in GATEWAY_ONLY_FIELDS {
            body.remove(*f);
        }
        Ok(Self {
            model,
            stream,
            include_usage,
            fallback_models,
            body,
        })
    }

    /// The same request with `text` as the start of the assistant's answer (a prefill): to
    /// continue an answer that broke off. A client's own trailing prefill is extended.
    pub fn with_prefill(&self, text: &str) -> Self {
        let mut r = self.clone();
        if let Some(Value::Array(messages)) = r.body.get_mut("messages") {
            let own = messages
                .last_mut()
                .and_then(Value::as_object_mut)
                .filter(|m| {
                    m.get("role").and_then(Value::as_str) == Some("assistant")
                        && m.get("content").is_some_and(Value::is_string)
                        && m.get("tool_calls").is_none_or(Value::is_null)
                });
            match own {
                Some(m) => {
                    let have = m.get("content").and_then(Value::as_str).unwrap_or("");
                    let joined = format!("{have}{text}");
                    m.insert("content".into(), Value::String(joined));
                }
                None => messages.push(serde_json::json!({"role": "assistant", "content": text})),
            }
        }
        r
    }

    /// The same request with a rewritten body, for the gateway's own rewrites (the context
    /// optimizer, prompt shaping): `f` gets a copy of every body field but `messages` to change
    /// in place, and returns the new `messages` (build them from `self.body()["messages"]`),
    /// so a rewrite that keeps part of a long conversation never copies the rest.
    ///
    /// Nothing is validated again: the messages must stay as [`ChatRequest::parse`] requires
    /// (objects with a known role and content), and the fields read at parse time (`model`,
    /// `stream`, `stream_options`, `models`) keep their parsed values whatever `f` does to the
    /// body; gateway-only fields `f` adds are removed, as at parse time.
    pub fn with_body(&self, f: impl FnOnce(&mut Map<String, Value>) -> Vec<Value>) -> Self {
        let mut body: Map<String, Value> = self
            .body
            .iter()
            .filter(|(k, _)| k.as_str() != "messages")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let messages = f(&mut body);
        debug_assert!(!messages.is_empty(), "a request needs a message");
        body.insert("messages".into(), Value::Array(messages));
        for field in GATEWAY_ONLY_FIELDS {
            body.remove(*field);
        }
        Self {
            model: self.model.clone(),
            stream: self.stream,
            include_usage: self.include_usage,
            fallback_models: self.fallback_models.clone(),
            body,
        }
    }

    /// The body as the client sent it (validated), for translators to read.
    pub fn body(&self) -> &Map<String, Value> {
        &self.body
    }

    /// The body to send upstream: the client's, with `model` replaced and `stream_options`
    /// as `options` says.
    pub fn upstream_body(&self, upstream_model: &str, options: StreamOptions) -> Vec<u8> {
        let mut body = self.body.clone();
        body.insert("model".into(), Value::String(upstream_model.to_owned()));
        match options {
            StreamOptions::Keep => {}
            StreamOptions::Remove => {
                body.remove("stream_options");
            }
            StreamOptions::AskUsage => {
                let so = body
                    .entry("stream_options")
                    .or_insert_with(|| Value::Object(Map::new()));
                if !so.is_object() {
                    *so = Value::Object(Map::new());
                }
                if let Value::Object(o) = so {
                    o.insert("include_usage".into(), Value::Bool(true));
                }
            }
        }
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

/// What to do with `stream_options` upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamOptions {
    /// As the client sent it.
    Keep,
    /// Always ask for the usage chunk (stats and budgets must never see 0 tokens for a stream).
    AskUsage,
    /// The provider rejects the field.
    Remove,
}

/// Longest accepted `model` string, in bytes.
pub const MAX_MODEL_LEN: usize = 256;

/// A model name goes upstream and into response headers: printable ASCII, no spaces, bounded.
fn valid_model(m: &str) -> bool {
    !m.is_empty() && m.len() <= MAX_MODEL_LEN && m.bytes().all(|b| b.is_ascii_graphic())
}

fn validate_messages(messages: Option<&Value>) -> Result<(), ApiError> {
    let list = match messages {
        Some(Value::Array(list)) if !list.is_empty() => list,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid_request(
                "`messages` must contain at least one message.",
                Some("messages"),
            ))
        }
        None => {
            return Err(ApiError::invalid_request(
                "Missing required parameter: 'messages'.",
                Some("messages"),
            ))
        }
        Some(_) => {
            return Err(ApiError::invalid_request(
                "`messages` must be an array.",
                Some("messages"),
            ))
        }
    };
    for (i, m) in list.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(ApiError::invalid_request(
                format!("messages[{i}] must be an object."),
                Some(&format!("messages[{i}]")),
            ));
        };
        let role = match m.get("role") {
            Some(Value::String(r)) if ROLES.contains(&r.as_str()) => r.as_str(),
            Some(Value::String(r)) => {
                return Err(ApiError::invalid_request(
                    format!(
                        "Invalid value {r:?} for messages[{i}].role: expected one of {}.",
                        ROLES.join(", ")
                    ),
                    Some(&format!("messages[{i}].role")),
                ))
            }
            _ => {
                return Err(ApiError::invalid_request(
                    format!("Missing required parameter: 'messages[{i}].role'."),
                    Some(&format!("messages[{i}].role")),
                ))
            }
        };
        let content_ok = match m.get("content") {
            Some(Value::String(_)) | Some(Value::Array(_)) => true,
            // An assistant turn that only calls tools carries no content.
            Some(Value::Null) | None => role == "assistant",
            Some(_) => false,
        };
        if !content_ok {
            return Err(ApiError::invalid_request(
                format!("messages[{i}].content must be a string or an array of content parts."),
                Some(&format!("messages[{i}].content")),
            ));
        }
    }
    Ok(())
}

/// Token usage reported by an upstream, from a response or a stream's usage chunk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Usage {
    /// Reads `usage` from a chat completion (or chunk) object, if it carries one.
    pub fn from_object(v: &Value) -> Option<Self> {
        let u = v.get("usage")?.as_object()?;
        let field = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
        Some(Self {
            prompt_tokens: field("prompt_tokens"),
            completion_tokens: field("completion_tokens"),
        })
    }

    /// Reads `usage` from a whole JSON response body.
    pub fn from_body(body: &[u8]) -> Option<Self> {
        serde_json::from_slice::<Value>(body)
            .ok()
            .as_ref()
            .and_then(Self::from_object)
    }
}

/// Extracts a human-readable message from an upstream error body (OpenAI-shaped or not).
pub fn error_message(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let e = v.get("error")?;
    match e {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("message").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ChatRequest, ApiError> {
        ChatRequest::parse(s.as_bytes())
    }

    #[test]
    fn keeps_unknown_fields_and_replaces_model() {
        let r = parse(r#"{"model":"auto","messages":[{"role":"user","content":"hi"}],"x_vendor":{"a":1},"temperature":0.2}"#).unwrap();
        assert_eq!(r.model, "auto");
        assert!(!r.stream);
        let up: Value =
            serde_json::from_slice(&r.upstream_body("llama", StreamOptions::Keep)).unwrap();
        assert_eq!(up["model"], "llama");
        assert_eq!(up["x_vendor"]["a"], 1);
        assert_eq!(up["temperature"], 0.2);
    }

    #[test]
    fn overlong_models_are_refused() {
        let long = "m".repeat(MAX_MODEL_LEN + 1);
        let body = format!(r#"{{"model":"{long}","messages":[{{"role":"user","content":"x"}}]}}"#);
        assert_eq!(parse(&body).unwrap_err().param.as_deref(), Some("model"));
        let ok = "m".repeat(MAX_MODEL_LEN);
        let body = format!(r#"{{"model":"{ok}","messages":[{{"role":"user","content":"x"}}]}}"#);
        assert!(parse(&body).is_ok());
    }

    #[test]
    fn stream_flags() {
        let r = parse(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#).unwrap();
        assert!(r.stream && r.include_usage);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("{", None),
            ("[1]", None),
            (
                r#"{"messages":[{"role":"user","content":"x"}]}"#,
                Some("model"),
            ),
            (
                r#"{"model":"","messages":[{"role":"user","content":"x"}]}"#,
                Some("model"),
            ),
            (
                r#"{"model":"a\r\nx-evil: 1","messages":[{"role":"user","content":"x"}]}"#,
                Some("model"),
            ),
            (
                r#"{"model":"gpt 4","messages":[{"role":"user","content":"x"}]}"#,
                Some("model"),
            ),
            (
                r#"{"model":"modèle","messages":[{"role":"user","content":"x"}]}"#,
                Some("model"),
            ),
            (r#"{"model":"m"}"#, Some("messages")),
            (r#"{"model":"m","messages":[]}"#, Some("messages")),
            (r#"{"model":"m","messages":"hi"}"#, Some("messages")),
            (
                r#"{"model":"m","messages":[{"content":"x"}]}"#,
                Some("messages[0].role"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#,
                Some("messages[0].role"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user"}]}"#,
                Some("messages[0].content"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":1}]}"#,
                Some("messages[0].content"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":"yes"}"#,
                Some("stream"),
            ),
        ];
        for (body, param) in cases {
            let e = parse(body).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), param, "{body}");
        }
    }

    #[test]
    fn assistant_tool_call_turn_needs_no_content() {
        assert!(parse(r#"{"model":"m","messages":[{"role":"user","content":"x"},{"role":"assistant","content":null,"tool_calls":[]},{"role":"tool","tool_call_id":"1","content":"r"}]}"#).is_ok());
    }

    #[test]
    fn usage_and_error_messages() {
        let u = Usage::from_body(
            br#"{"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#,
        );
        assert_eq!(
            u,
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 5
            })
        );
        assert_eq!(Usage::from_body(br#"{"usage":null}"#), None);
        assert_eq!(
            error_message(br#"{"error":{"message":"bad"}}"#).as_deref(),
            Some("bad")
        );
        assert_eq!(
            error_message(br#"{"error":"worse"}"#).as_deref(),
            Some("worse")
        );
        assert_eq!(error_message(b"<html>"), None);
    }

    #[test]
    fn the_fallback_list_is_read_and_never_forwarded() {
        let r = parse(r#"{"model":"groq/a","models":["openai/b"," fast "],"route":"fallback","messages":[{"role":"user","content":"x"}]}"#).unwrap();
        assert_eq!(r.fallback_models, ["openai/b", "fast"]);
        let up: Value = serde_json::from_slice(&r.upstream_body("a", StreamOptions::Keep)).unwrap();
        assert!(up.get("models").is_none() && up.get("route").is_none());
        assert!(r.body().get("models").is_none());
        for bad in [r#""models":"x""#, r#""models":[1]"#, r#""models":["a b"]"#] {
            let body =
                format!(r#"{{"model":"m",{bad},"messages":[{{"role":"user","content":"x"}}]}}"#);
            assert!(
                parse(&body)
                    .unwrap_err()
                    .param
                    .unwrap()
                    .starts_with("models"),
                "{bad}"
            );
        }
    }

    #[test]
    fn with_body_rewrites_a_copy() {
        let r = parse(r#"{"model":"m","stream":true,"messages":[{"role":"system","content":"s"},{"role":"user","content":"x"}],"temperature":0.5,"response_format":{"type":"json_object"}}"#).unwrap();
        let w = r.with_body(|body| {
            assert!(body.get("messages").is_none(), "messages are not copied");
            body.remove("response_format");
            body.insert("models".into(), serde_json::json!(["x"]));
            r.body()["messages"].as_array().unwrap()[1..].to_vec()
        });
        assert_eq!(
            w.body()["messages"],
            serde_json::json!([{"role": "user", "content": "x"}])
        );
        assert_eq!(w.body()["temperature"], 0.5);
        assert!(w.body().get("response_format").is_none());
        assert!(
            w.body().get("models").is_none(),
            "gateway-only fields never go upstream"
        );
        assert_eq!((w.model.as_str(), w.stream), ("m", true));
        assert_eq!(r.body()["messages"].as_array().unwrap().len(), 2);
        assert!(
            r.body().get("response_format").is_some(),
            "the original is unchanged"
        );
    }

    #[test]
    fn a_prefill_continues_the_answer() {
        let r = parse(r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#).unwrap();
        let p = r.with_prefill("Once upon");
        assert_eq!(
            p.body()["messages"][1],
            serde_json::json!({"role": "assistant", "content": "Once upon"})
        );
        let own = parse(r#"{"model":"m","messages":[{"role":"user","content":"x"},{"role":"assistant","content":"def f("}]}"#).unwrap();
        assert_eq!(
            own.with_prefill("a, b)").body()["messages"][1]["content"],
            "def f(a, b)"
        );
        assert_eq!(
            r.body()["messages"].as_array().unwrap().len(),
            1,
            "the original is unchanged"
        );
    }
}
