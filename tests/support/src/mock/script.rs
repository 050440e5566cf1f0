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
    /// Send `after_chunks` stream events, then hang without closing.
    Stall {
        #[serde(default)]
        after_chunks: usize,
        #[serde(default)]
        latency_ms: u64,
        #[serde(default)]
        chunk_delay_ms: u64,
    },
    /// Send `after_chunks` stream events, then close the connection abruptly (no `[DONE]`, no
    /// chunked-encoding terminator).
    Drop {
        #[serde(default)]
        after_chunks: usize,
        #[serde(default)]
        latency_ms: u64,
        #[serde(default)]
        chunk_delay_ms: u64,
    },
    /// Accept the request, then close the connection without any response.
    Close,
}

impl Behaviour {
    /// The default reply.
    pub fn ok() -> Self {
        Behaviour::Ok {
            latency_ms: 0,
            chunk_delay_ms: 0,
            content: None,
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
                {"kind":"drop","after_chunks":1},{"kind":"close"}]"#,
        )
        .unwrap();
        assert_eq!(script.len(), 9);
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
    }
}
