//! Wire formats the mock speaks. Each format module reads requests into the format-independent
//! [`ChatRequest`] and turns the engine's abstract [`Reply`] into bytes (JSON, stream events and
//! error bodies); the engine (`crate::mock`) decides what to answer and when.
//!
//! - [`openai`]: OpenAI chat completions (`POST …/chat/completions`).
//! - [`anthropic`]: Anthropic Messages (`POST …/messages`).
//! - [`gemini`]: Gemini `generateContent` / `streamGenerateContent`.

pub mod anthropic;
pub mod gemini;
pub mod openai;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The wire format of a request (chosen by its route).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenAi,
    Anthropic,
    Gemini,
}

impl Format {
    /// The `kind` a request of this format is recorded with.
    pub fn kind(self) -> &'static str {
        match self {
            Format::OpenAi => "chat",
            Format::Anthropic => "anthropic",
            Format::Gemini => "gemini",
        }
    }

    /// Every format's recorded `kind`: the chat-like requests.
    pub const CHAT_KINDS: [&'static str; 3] = ["chat", "anthropic", "gemini"];
}

/// Request checks that depend on how the mock is configured (which provider it stands in for).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Checks {
    /// Anthropic: a conversation ending with an assistant message is rejected (as newer Claude
    /// models do).
    pub reject_prefill: bool,
    /// OpenAI: any `stream_options` is rejected with 422 (as Mistral does).
    pub reject_stream_options: bool,
}

/// A request the format rejects before any behaviour applies.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestError {
    /// HTTP status (400 unless said otherwise).
    pub status: u16,
    pub message: String,
    pub param: Option<String>,
    /// A complete body replacing the format's usual error shape (e.g. Mistral's 422).
    pub body: Option<Value>,
}

impl RequestError {
    /// A 400 with the format's usual error shape.
    pub fn new(message: impl Into<String>, param: Option<&str>) -> Self {
        RequestError {
            status: 400,
            message: message.into(),
            param: param.map(str::to_string),
            body: None,
        }
    }
}

/// Whether the reply's thinking is shown, per the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thoughts {
    /// Shown (OpenAI `reasoning_content`; Anthropic with `thinking` enabled; Gemini with
    /// `includeThoughts`).
    Shown,
    /// Counted in usage but not shown (Gemini without `includeThoughts`).
    Hidden,
    /// The model does not think (Anthropic without `thinking` enabled).
    Off,
}

/// What the engine needs to know about a chat request, whatever its format.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub model: String,
    pub stream: bool,
    /// OpenAI `stream_options.include_usage`.
    pub include_usage: bool,
    /// Text of the last user message (text parts joined with a space); empty if none.
    pub last_user_text: String,
    /// Whitespace-separated words in every message's text (and the system prompt): the mock's
    /// prompt token count.
    pub prompt_tokens: u64,
    /// The declared (function) tools, in order.
    pub tools: Vec<ToolSpec>,
    /// The request's cap on output tokens, if any.
    pub max_tokens: Option<u64>,
    pub thoughts: Thoughts,
}

impl ChatRequest {
    /// The first declared tool.
    pub fn first_tool(&self) -> Option<&ToolSpec> {
        self.tools.first()
    }
}

/// A declared tool: its name and its parameters' JSON schema (`null` if none).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub parameters: Value,
}

impl ToolSpec {
    /// Name of the first declared parameter (`properties`, in key order), if any.
    pub fn first_param(&self) -> Option<&str> {
        self.parameters
            .get("properties")
            .and_then(Value::as_object)
            .and_then(|p| p.keys().next())
            .map(String::as_str)
    }
}

/// A tool call the mock makes.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// In the format's style (`call_…`, `toolu_…`); Gemini sends none.
    pub id: String,
    pub name: String,
    /// The arguments as a JSON object in text, as OpenAI carries them.
    pub arguments: String,
}

impl ToolCall {
    /// The arguments as a JSON value (an empty object if they do not parse).
    pub fn arguments_value(&self) -> Value {
        serde_json::from_str(&self.arguments).unwrap_or_else(|_| Value::Object(Default::default()))
    }
}

/// Why the reply ends, format-independently. A reply with tool calls that ends with `Stop`
/// reports the format's tool-use reason (`tool_calls`, `tool_use`; Gemini says `STOP`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    #[default]
    Stop,
    /// The output cap was reached: `length`, `max_tokens`, `MAX_TOKENS`.
    Length,
    /// Stopped by a safety system: `content_filter`, `refusal`, `SAFETY`.
    ContentFilter,
    /// Gemini's `MALFORMED_FUNCTION_CALL` (OpenAI says `stop`, Anthropic `end_turn`).
    MalformedFunctionCall,
}

/// A complete, format-independent reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// In the format's style (`chatcmpl-…`, `msg_…`, a Gemini `responseId`).
    pub id: String,
    pub created: u64,
    /// The model as the request named it.
    pub model: String,
    /// Thinking shown to the client (before the answer).
    pub thinking: Option<String>,
    pub text: Option<String>,
    pub tool_calls: Vec<ToolCall>,
    pub finish: Finish,
    pub prompt_tokens: u64,
    /// Visible output tokens: words of the text and of the tool calls' arguments.
    pub completion_tokens: u64,
    /// Thinking tokens (counted even when the thinking is not shown).
    pub thinking_tokens: u64,
}

impl Reply {
    /// A plain text reply that stops normally.
    pub fn text(id: &str, model: &str, text: &str, prompt_tokens: u64) -> Self {
        Reply {
            id: id.into(),
            created: 1_700_000_000,
            model: model.into(),
            thinking: None,
            text: Some(text.into()),
            tool_calls: Vec::new(),
            finish: Finish::Stop,
            prompt_tokens,
            completion_tokens: count_words(text),
            thinking_tokens: 0,
        }
    }
}

/// Whitespace-word count: the mock's notion of a token.
pub fn count_words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

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

/// The first `n` words of `text` (with the whitespace between them, none after).
pub fn first_words(text: &str, n: usize) -> String {
    word_pieces(text)
        .into_iter()
        .filter(|p| !p.trim().is_empty())
        .take(n)
        .collect::<String>()
        .trim_start()
        .to_string()
}

/// Splits a JSON text into pieces of at most 8 bytes (at least two pieces when it has two bytes
/// or more), as providers stream tool arguments.
pub fn json_pieces(args: &str) -> Vec<&str> {
    let size = if args.len() <= 8 {
        args.len().div_ceil(2).max(1)
    } else {
        8
    };
    let mut pieces = Vec::new();
    let mut rest = args;
    while !rest.is_empty() {
        let mut cut = rest.len().min(size);
        while !rest.is_char_boundary(cut) {
            cut += 1;
        }
        pieces.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    pieces
}

/// The text of a content value: a string, or the `text` of each text part joined with a single
/// space. Anything else has no text.
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

/// A JSON object written key by key, in the order the provider sends them (serde_json's own map
/// sorts its keys).
#[derive(Debug, Clone)]
pub struct Obj(String);

impl Default for Obj {
    fn default() -> Self {
        Obj::new()
    }
}

impl Obj {
    pub fn new() -> Self {
        Obj(String::from("{"))
    }

    fn key(&mut self, key: &str) {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        self.0
            .push_str(&serde_json::to_string(key).expect("key serialises"));
        self.0.push(':');
    }

    /// Adds a field with any serialisable value.
    pub fn put(mut self, key: &str, value: impl Serialize) -> Self {
        self.key(key);
        self.0
            .push_str(&serde_json::to_string(&value).expect("value serialises"));
        self
    }

    /// Adds a field whose value is already JSON text (a nested [`Obj`] or list).
    pub fn raw(mut self, key: &str, json: &str) -> Self {
        self.key(key);
        self.0.push_str(json);
        self
    }

    /// Adds a nested object.
    pub fn obj(self, key: &str, value: Obj) -> Self {
        let json = value.done();
        self.raw(key, &json)
    }

    /// Adds a list of nested objects.
    pub fn list(self, key: &str, items: Vec<Obj>) -> Self {
        let json = list(items);
        self.raw(key, &json)
    }

    pub fn done(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

/// A JSON list of objects.
pub fn list(items: Vec<Obj>) -> String {
    let mut out = String::from("[");
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&item.done());
    }
    out.push(']');
    out
}

/// Standard base64 (with padding), for signatures.
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
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
    fn first_words_keeps_inner_spacing() {
        assert_eq!(first_words("a b  c d", 3), "a b  c");
        assert_eq!(first_words("  a b", 1), "a");
        assert_eq!(first_words("a b", 5), "a b");
    }

    #[test]
    fn json_pieces_split_at_least_twice() {
        for text in [
            "{}",
            "{\"a\":1}",
            "{\"location\":\"Oslo\",\"unit\":\"celsius\"}",
        ] {
            let pieces = json_pieces(text);
            assert!(pieces.len() >= 2, "{text}: {pieces:?}");
            assert_eq!(pieces.concat(), text);
        }
    }

    #[test]
    fn objects_keep_their_order() {
        let o = Obj::new()
            .put("z", 1)
            .put("a", "x")
            .obj("m", Obj::new().put("k", Value::Null))
            .list("l", vec![Obj::new().put("b", true)]);
        assert_eq!(
            o.done(),
            r#"{"z":1,"a":"x","m":{"k":null},"l":[{"b":true}]}"#
        );
    }

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
