//! Scripted behaviours: what the mock does with the next chat request. Independent of any wire
//! format; the engine applies them to whatever the format module renders.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One scripted behaviour, consumed by one chat request (FIFO). JSON: `{"kind": "...", ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Behaviour {
    /// The normal reply, optionally slowed down or with other content.
    Ok {
        /// Delay before the response headers.
        #[serde(default)]
        latency_ms: u64,
        /// Delay between stream chunks (after the first).
        #[serde(default)]
        chunk_delay_ms: u64,
        /// Reply text instead of the default `mock(<name>): <last user message>`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content: Option<String>,
        /// Send this many stream events (for a JSON answer: 0 = the head only, 1 or more = the
        /// head and the first half of the JSON), then wait for a `POST /_mock/release` before
        /// sending the rest. Lets a test act while the answer is provably unfinished.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pause_after_chunks: Option<usize>,
        /// Streams: end the body cleanly but without the final `data: [DONE]` event.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        omit_done: bool,
    },
    /// An error status with an OpenAI-shaped body (or `body` verbatim).
    Status {
        status: u16,
        /// `retry-after` header value (string or number of seconds).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body: Option<Value>,
        /// Extra response headers.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        headers: BTreeMap<String, String>,
        #[serde(default)]
        latency_ms: u64,
    },
    /// Send part of the answer (see [`Cut`]), then hang without closing.
    Stall {
        #[serde(default)]
        after_chunks: usize,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        before_done: bool,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        mid_event: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after_bytes: Option<usize>,
        #[serde(default)]
        latency_ms: u64,
        #[serde(default)]
        chunk_delay_ms: u64,
    },
    /// Send part of the answer (see [`Cut`]), then close the connection abruptly (no chunked
    /// terminator, or fewer bytes than the `content-length` announced).
    Drop {
        #[serde(default)]
        after_chunks: usize,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        before_done: bool,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        mid_event: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after_bytes: Option<usize>,
        #[serde(default)]
        latency_ms: u64,
        #[serde(default)]
        chunk_delay_ms: u64,
    },
    /// Accept the request, then close the connection without any response.
    Close,
}

/// Where a `stall` or `drop` cuts the answer, from the behaviour's fields. The response head
/// (200) is always sent.
///
/// Streams: `after_chunks` whole events (default 0), or with `before_done` every event but
/// `data: [DONE]` (finish and usage chunks included); then, with `mid_event`, the first half of
/// the next event's bytes (inside its `data: {...` line, no newline). JSON answers: nothing with
/// `after_chunks: 0`, the first half of the JSON otherwise. For both, `after_bytes` instead cuts
/// the body after that many bytes (always inside the body: at most its length minus one). A JSON
/// answer announces its full `content-length`, as a real one would.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cut {
    pub after_chunks: usize,
    pub before_done: bool,
    pub mid_event: bool,
    pub after_bytes: Option<usize>,
}

impl Behaviour {
    /// The default reply.
    pub fn ok() -> Self {
        Behaviour::Ok {
            latency_ms: 0,
            chunk_delay_ms: 0,
            content: None,
            pause_after_chunks: None,
            omit_done: false,
        }
    }

    /// Where a `stall` or `drop` cuts the answer; `None` for the other kinds.
    pub fn cut(&self) -> Option<Cut> {
        match *self {
            Behaviour::Stall {
                after_chunks,
                before_done,
                mid_event,
                after_bytes,
                ..
            }
            | Behaviour::Drop {
                after_chunks,
                before_done,
                mid_event,
                after_bytes,
                ..
            } => Some(Cut {
                after_chunks,
                before_done,
                mid_event,
                after_bytes,
            }),
            _ => None,
        }
    }

    /// A bare error status.
    pub fn status(status: u16) -> Self {
        Behaviour::Status {
            status,
            retry_after: None,
            body: None,
            headers: BTreeMap::new(),
            latency_ms: 0,
        }
    }

    /// A 429 with `retry-after: <secs>`.
    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Behaviour::Status {
            status: 429,
            retry_after: Some(Value::String(retry_after_secs.to_string())),
            body: None,
            headers: BTreeMap::new(),
            latency_ms: 0,
        }
    }
}

/// Reads a script: a JSON list of behaviours, or a single behaviour.
pub fn parse_script(body: &[u8]) -> Result<Vec<Behaviour>, serde_json::Error> {
    let value: Value = serde_json::from_slice(body)?;
    match value {
        Value::Array(_) => serde_json::from_value(value),
        other => Ok(vec![serde_json::from_value(other)?]),
    }
}

/// A header value from a JSON string or number.
pub fn header_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind() {
        let script = parse_script(
            br#"[{"kind":"ok"},{"kind":"ok","latency_ms":5},{"kind":"ok","chunk_delay_ms":3},
                {"kind":"status","status":429,"retry_after":"7"},{"kind":"status","status":429,"retry_after":7},
                {"kind":"status","status":500,"body":{"x":1}},{"kind":"stall","after_chunks":2},
                {"kind":"drop","after_chunks":1},{"kind":"close"},
                {"kind":"drop","after_chunks":2,"mid_event":true},{"kind":"drop","before_done":true},
                {"kind":"drop","after_bytes":10},{"kind":"stall","mid_event":true},
                {"kind":"ok","pause_after_chunks":2},{"kind":"ok","omit_done":true}]"#,
        )
        .unwrap();
        assert_eq!(script.len(), 15);
        assert_eq!(
            script[9].cut(),
            Some(Cut {
                after_chunks: 2,
                mid_event: true,
                ..Cut::default()
            })
        );
        assert_eq!(script[11].cut().unwrap().after_bytes, Some(10));
        assert_eq!(script[0].cut(), None);
        assert_eq!(script[0], Behaviour::ok());
        assert_eq!(
            parse_script(br#"{"kind":"close"}"#).unwrap(),
            vec![Behaviour::Close]
        );
    }

    #[test]
    fn rejects_typos() {
        assert!(parse_script(br#"[{"kind":"ok","latency":5}]"#).is_err());
        assert!(parse_script(br#"[{"kind":"nope"}]"#).is_err());
        assert!(parse_script(br#"[{"kind":"status"}]"#).is_err());
        assert!(parse_script(br#"[{"kind":"drop","mid_events":true}]"#).is_err());
        assert!(parse_script(br#"[{"kind":"ok","after_bytes":3}]"#).is_err());
    }
}
