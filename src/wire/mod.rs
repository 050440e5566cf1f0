//! Wire formats. Each submodule owns one format's types and its translation to and from the
//! OpenAI shape the gateway speaks to clients.

pub mod openai;
pub mod sse;
