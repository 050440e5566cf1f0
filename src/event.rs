//! One structured event type for everything the gateway decides or observes: the log line today,
//! and the source for metrics, traces and the audit later. Each event is written once, when it
//! happens, so a request whose client goes away (and whose instance is then aborted) still leaves
//! what happened up to that point.

use serde::Serialize;

/// What happened. Serialised as one JSON object with an `event` tag.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A request arrived (before authentication, so it carries nothing the client claims).
    RequestStart { method: String, path: String },
    /// The request was answered locally or by an upstream; the last event of a request that
    /// ran to its end.
    Response {
        status: u16,
        #[serde(skip_serializing_if = "Option::is_none")]
        code: Option<&'static str>,
        ms: u64,
    },
    /// Refused before any upstream: every candidate was cooling down.
    Refused {
        model: String,
        retry_after_s: Option<u64>,
    },
    /// An upstream attempt started (its counter is written just before).
    AttemptStart {
        attempt: u32,
        provider: String,
        model: String,
        /// The key's fingerprint (never the key).
        key: String,
    },
    /// A provider refused a key (401/403): it is set aside until `until_ms` — by every instance,
    /// since the deadline is in the store — and never retried in a loop.
    KeySetAside {
        provider: String,
        key: String,
        status: u16,
        until_ms: u64,
    },
    /// An upstream attempt failed before any byte reached the client.
    AttemptFailed {
        attempt: u32,
        provider: String,
        model: String,
        /// Upstream HTTP status, when it answered at all.
        #[serde(skip_serializing_if = "Option::is_none")]
        upstream_status: Option<u16>,
        /// The status the client would get if nothing else answers.
        status: u16,
        reason: String,
        retryable: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        cooldown_until_ms: Option<u64>,
        ms: u64,
    },
    /// The next candidate is tried after a failure.
    Fallback {
        from: String,
        to: String,
        reason: String,
    },
    /// An upstream answered 2xx: the head arrived after `ttfb_ms`.
    AttemptAnswered {
        attempt: u32,
        provider: String,
        model: String,
        upstream_status: u16,
        ttfb_ms: u64,
        stream: bool,
    },
    /// A JSON answer is being returned: what it was and what it cost.
    Answer {
        provider: String,
        model: String,
        finish_reason: Option<String>,
        prompt_tokens: Option<u64>,
        completion_tokens: Option<u64>,
        /// USD from the catalogue's price and the real usage (0 on a free tier; absent when
        /// the price or the usage is unknown).
        cost_usd: Option<f64>,
    },
    /// A streamed answer ended (cleanly or not).
    StreamEnd {
        provider: String,
        model: String,
        ok: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        why: Option<String>,
        finish_reason: Option<String>,
        cost_usd: Option<f64>,
        events: u64,
        prompt_tokens: Option<u64>,
        completion_tokens: Option<u64>,
        ms: u64,
    },
    /// A provider-model's circuit breaker changed state (`opened`, `closed`, `reopened`), or
    /// this request took its half-open probe (`probe`).
    Breaker {
        provider: String,
        model: String,
        transition: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        until_ms: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        level: Option<u32>,
    },
    /// A candidate was passed over before any request: its breaker is open (`breaker_open`), it
    /// is over its provider's AIMD concurrency (`aimd_full`), another instance holds its probe
    /// (`probe_taken`), or a budget forbids paid routes (`budget_spent`, `budget_thin`).
    Skipped {
        provider: String,
        model: String,
        reason: &'static str,
    },
    /// A provider's AIMD concurrency window moved (`cut` on a 429 or a timeout, `grow`).
    Aimd {
        provider: String,
        change: &'static str,
        limit: f64,
    },
    /// A budget refused the request's paid routes and nothing free was left.
    BudgetExhausted { scope: String, period: String },
    /// The cache answered (`exact` or `semantic`, with the similarity), or stored an answer.
    Cache {
        outcome: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        similarity: Option<f64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    /// The router decided: the profile's family, whether it is a client's chore, the plan in
    /// order, and whether the router component (`component`) or this instance (`local`) decided.
    Routed {
        family: String,
        background: bool,
        candidates: Vec<String>,
        via: &'static str,
    },
    /// The router component did not answer (unreachable, failed, too slow): the gateway
    /// planned locally, with the same logic and state.
    RouterFallback { reason: String },
    /// The context optimizer cut a conversation to fit a candidate's window, or shaped the
    /// prompt for it (system placement, JSON instructions).
    Context {
        provider: String,
        model: String,
        notes: Vec<String>,
    },
    /// The request was sent to two candidates at once; `winner` answered first.
    Hedged { winner: String, loser: String },
    /// The client stopped reading (closed the connection) before the answer was complete.
    ClientGone { provider: String, ms: u64 },
    /// A key-value operation failed; serving went on without it.
    StateWriteFailed { key: String, error: String },
    /// The store could not be opened or read; routing went on without state.
    StateUnavailable { error: String },
    /// The deployment's variables are invalid; the detail is for the operator only.
    ConfigError { detail: String },
    /// A response could not be built (for example an invalid header value).
    Internal { detail: String },
}

impl Event {
    /// Does this event mean the request met a failure (for `log_events = "failures"`)?
    pub fn is_failure(&self) -> bool {
        match self {
            Event::Response { status, .. } => *status >= 400,
            Event::StreamEnd { ok, .. } => !ok,
            Event::Refused { .. }
            | Event::AttemptFailed { .. }
            | Event::KeySetAside { .. }
            | Event::ClientGone { .. }
            | Event::StateWriteFailed { .. }
            | Event::StateUnavailable { .. }
            | Event::ConfigError { .. }
            | Event::Internal { .. }
            | Event::BudgetExhausted { .. } => true,
            Event::RequestStart { .. }
            | Event::AttemptStart { .. }
            | Event::Fallback { .. }
            | Event::AttemptAnswered { .. }
            | Event::Answer { .. }
            | Event::Breaker { .. }
            | Event::Skipped { .. }
            | Event::Aimd { .. }
            | Event::Cache { .. }
            | Event::Routed { .. }
            | Event::Context { .. }
            | Event::Hedged { .. } => false,
            Event::RouterFallback { .. } => true,
        }
    }
}

/// One log line: `{"ts_ms":…,"request_id":…,"event":…,…}` and a newline, ready for one write.
pub fn line(ts_ms: u64, request_id: &str, event: &Event) -> Vec<u8> {
    #[derive(Serialize)]
    struct Envelope<'a> {
        ts_ms: u64,
        request_id: &'a str,
        #[serde(flatten)]
        event: &'a Event,
    }
    let mut out = serde_json::to_vec(&Envelope {
        ts_ms,
        request_id,
        event,
    })
    .unwrap_or_default();
    out.push(b'\n');
    out
}

/// Longest accepted incoming `x-request-id`.
pub const MAX_REQUEST_ID: usize = 128;

/// The request id to use: the client's `x-request-id` when it is a sane token (so a caller's
/// trace id follows the request), else a new one made from 16 random bytes.
pub fn request_id(incoming: Option<&str>, random: [u8; 16]) -> String {
    if let Some(id) = incoming.map(str::trim) {
        let sane = !id.is_empty()
            && id.len() <= MAX_REQUEST_ID
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(&b));
        if sane {
            return id.to_owned();
        }
    }
    let mut out = String::with_capacity(35);
    out.push_str("fr-");
    for b in random {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_echoed_only_when_sane() {
        let r = [0xab; 16];
        assert_eq!(request_id(Some("abc-123"), r), "abc-123");
        assert_eq!(request_id(Some(" trace:9 "), r), "trace:9");
        let made = request_id(None, r);
        assert_eq!(made.len(), 35);
        assert!(made.starts_with("fr-abab"));
        for bad in ["", "a b", "x\r\ny: z", "é", &"x".repeat(MAX_REQUEST_ID + 1)] {
            assert_eq!(request_id(Some(bad), r), made, "{bad:?}");
        }
    }

    #[test]
    fn failures_are_told_apart() {
        let ok = Event::Response {
            status: 200,
            code: None,
            ms: 1,
        };
        let bad = Event::Response {
            status: 429,
            code: None,
            ms: 1,
        };
        assert!(!ok.is_failure() && bad.is_failure());
        assert!(Event::ClientGone {
            provider: "p".into(),
            ms: 1
        }
        .is_failure());
    }

    #[test]
    fn a_line_is_one_json_object_with_the_envelope() {
        let e = Event::AttemptStart {
            attempt: 1,
            provider: "groq".into(),
            model: "m".into(),
            key: "k0123456789".into(),
        };
        let l = line(5, "fr-1", &e);
        assert_eq!(*l.last().unwrap(), b'\n');
        let v: serde_json::Value = serde_json::from_slice(&l).unwrap();
        assert_eq!(v["event"], "attempt_start");
        assert_eq!(v["request_id"], "fr-1");
        assert_eq!(v["ts_ms"], 5);
        assert_eq!(v["provider"], "groq");
    }
}
