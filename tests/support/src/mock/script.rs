//! Scripted behaviours: what the mock does with the next chat request. Independent of any wire
//! format; the engine applies them to whatever the format module renders.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::wire::Finish;

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
        /// Streams: end the body cleanly but without the final event (OpenAI `data: [DONE]`,
        /// Anthropic `message_stop`, Gemini the chunk with `finishReason`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        omit_done: bool,
        /// Make this many parallel calls (at least 1) to the request's declared tools, cycling
        /// through them, with arguments built from each tool's parameter schema. A request
        /// without tools gets the text reply instead.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tool_calls: Option<usize>,
        /// Think this text first (OpenAI `reasoning_content`, an Anthropic thinking block when
        /// the request enables thinking, a Gemini `thought` part with `includeThoughts`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        thinking: Option<String>,
        /// How the reply ends (default `stop`). `content_filter` and `malformed_function_call`
        /// say nothing unless `content` is given. A request whose max tokens is below the
        /// reply's word count ends with `length` anyway, its text cut to that many words.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        finish: Option<Finish>,
    },
    /// An error status with a body in the route's format (or `body` verbatim).
    Status {
        status: u16,
        /// `retry-after` header value (string or number of seconds).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after: Option<Value>,
        /// Gemini 429: the `google.rpc.RetryInfo` `retryDelay` (such as `"7s"`) in the body.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_delay: Option<String>,
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
    /// Streams: send `after_chunks` events (at most all but the final one), then the
    /// provider's mid-stream error event, then end the body cleanly. A JSON request gets the
    /// error as an error status instead.
    StreamError {
        #[serde(default)]
        after_chunks: usize,
        /// The error message (default: the provider's usual one).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
        /// OpenAI `error.type` (default `server_error`), Anthropic `error.type` (default
        /// `overloaded_error`), Gemini `error.status` (default `INTERNAL`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error_type: Option<String>,
        #[serde(default)]
        latency_ms: u64,
        #[serde(default)]
        chunk_delay_ms: u64,
    },
}

/// Where a `stall` or `drop` cuts the answer, from the behaviour's fields. The response head
/// (200) is always sent.
///
/// Streams: `after_chunks` whole events (default 0), or with `before_done` every event but the
/// last (OpenAI: all but `data: [DONE]`, finish and usage chunks included; Anthropic: all but
/// `message_stop`; Gemini SSE: all but the chunk with `finishReason`; a Gemini JSON array: all
/// but its closing `]`); then, with `mid_event`, the first half of the next event's bytes (inside
/// its `data: {...` line, no newline). Events are counted as sent: Anthropic's `ping` is one, a
/// Gemini JSON array's pieces are `[`+first chunk, `,\r\n`+each next, `]`. JSON answers:
/// nothing with `after_chunks: 0`, the first half of the JSON otherwise. For both, `after_bytes`
/// instead cuts the body after that many bytes (always inside the body: at most its length minus
/// one). A JSON answer announces its full `content-length`, as a real one would.
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
            tool_calls: None,
            thinking: None,
            finish: None,
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
            retry_delay: None,
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
            retry_delay: None,
            body: None,
            headers: BTreeMap::new(),
            latency_ms: 0,
        }
    }
}

/// A standing rule: every chat request it matches gets its behaviour, before the FIFO script
/// is consulted (the first matching rule wins). `model` matches the requested model exactly
/// (Gemini: the model in the path), `contains` any substring of the raw request body; both
/// absent = every request. `times`: the rule applies to that many requests, then is dropped
/// ("fail the next N, then succeed"); absent = until the rules are replaced or reset.
///
/// JSON: `{"model": "m", "contains": "FAIL", "times": 3, "behaviour": {"kind": "status",
/// "status": 500}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contains: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub times: Option<u64>,
    pub behaviour: Behaviour,
}

impl Rule {
    /// True if the rule applies to a request for `model` with this raw `body`.
    pub fn matches(&self, model: &str, body: &[u8]) -> bool {
        self.model.as_deref().is_none_or(|m| m == model)
            && self.contains.as_deref().is_none_or(|needle| {
                needle.is_empty() || body.windows(needle.len()).any(|w| w == needle.as_bytes())
            })
            && self.times != Some(0)
    }
}

/// Takes the behaviour of the first rule matching (`model`, `body`), counting one use of it and
/// dropping a rule whose `times` are used up.
pub fn take_rule(rules: &mut Vec<Rule>, model: &str, body: &[u8]) -> Option<Behaviour> {
    let i = rules.iter().position(|r| r.matches(model, body))?;
    let behaviour = rules[i].behaviour.clone();
    if let Some(t) = rules[i].times.as_mut() {
        *t -= 1;
        if *t == 0 {
            rules.remove(i);
        }
    }
    Some(behaviour)
}

/// Reads rules: a JSON list of rules, or a single rule.
pub fn parse_rules(body: &[u8]) -> Result<Vec<Rule>, serde_json::Error> {
    let value: Value = serde_json::from_slice(body)?;
    match value {
        Value::Array(_) => serde_json::from_value(value),
        other => Ok(vec![serde_json::from_value(other)?]),
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
                {"kind":"ok","pause_after_chunks":2},{"kind":"ok","omit_done":true},
                {"kind":"ok","tool_calls":2,"thinking":"hmm","finish":"content_filter"},
                {"kind":"stream_error","after_chunks":3,"message":"boom","error_type":"api_error"},
                {"kind":"status","status":429,"retry_delay":"7s"}]"#,
        )
        .unwrap();
        assert_eq!(script.len(), 18);
        assert!(matches!(
            script[15],
            Behaviour::Ok {
                tool_calls: Some(2),
                finish: Some(Finish::ContentFilter),
                ..
            }
        ));
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
        assert!(parse_script(br#"[{"kind":"ok","finish":"done"}]"#).is_err());
        assert!(parse_script(br#"[{"kind":"stream_error","after":1}]"#).is_err());
    }

    #[test]
    fn rules_match_by_model_and_body_and_count_down() {
        let mut rules = parse_rules(
            br#"[{"model":"a","times":2,"behaviour":{"kind":"status","status":500}},
                {"contains":"SLOW","behaviour":{"kind":"ok","latency_ms":5}},
                {"model":"b","contains":"x","behaviour":{"kind":"close"}}]"#,
        )
        .unwrap();
        assert_eq!(rules.len(), 3);
        assert_eq!(
            take_rule(&mut rules, "a", b"{}"),
            Some(Behaviour::status(500))
        );
        assert_eq!(rules[0].times, Some(1));
        assert_eq!(
            take_rule(&mut rules, "a", b"{}"),
            Some(Behaviour::status(500))
        );
        // Used up: dropped, the other rules stay.
        assert_eq!(rules.len(), 2);
        assert_eq!(take_rule(&mut rules, "a", b"{}"), None);
        assert!(matches!(
            take_rule(&mut rules, "a", b"{\"m\":\"SLOW\"}"),
            Some(Behaviour::Ok { latency_ms: 5, .. })
        ));
        // Both matchers must hold; a standing rule is never used up.
        assert_eq!(take_rule(&mut rules, "b", b"{}"), None);
        assert_eq!(take_rule(&mut rules, "c", b"x"), None);
        for _ in 0..3 {
            assert_eq!(take_rule(&mut rules, "b", b"x"), Some(Behaviour::Close));
        }
        assert_eq!(rules.len(), 2);
        assert_eq!(
            parse_rules(br#"{"behaviour":{"kind":"close"}}"#).unwrap()[0].model,
            None
        );
        assert!(parse_rules(br#"[{"model":"a"}]"#).is_err());
        assert!(parse_rules(br#"[{"behavior":{"kind":"close"}}]"#).is_err());
        assert!(parse_rules(br#"[{"behaviour":{"kind":"nope"}}]"#).is_err());
    }
}
