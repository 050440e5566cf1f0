//! Wire formats the mock speaks. Each format module turns the engine's abstract [`Reply`] into
//! bytes and reads requests into what the engine needs; the engine (`crate::mock`) decides what
//! to answer and when. Only OpenAI chat completions exist so far; Anthropic Messages and Gemini
//! `generateContent` come as sibling modules.

pub mod openai;

/// A request the format rejects before any behaviour applies (answered with 400).
#[derive(Debug, Clone, PartialEq)]
pub struct RequestError {
    pub message: String,
    pub param: Option<String>,
}

/// A tool call the mock makes.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as a JSON string, as the wire carries them.
    pub arguments: String,
}

/// What the assistant says.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyBody {
    Text(String),
    ToolCall(ToolCall),
}

/// A complete, format-independent reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub id: String,
    pub created: u64,
    /// The model as the request named it.
    pub model: String,
    pub body: ReplyBody,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}
