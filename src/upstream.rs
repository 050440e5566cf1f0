//! Judging an upstream's answer: what the client sees, whether another provider should be
//! tried, and whether the provider should cool down. Provider keys never leave this judgement.

use crate::cooldown::{self, Cooldown};
use crate::error::ApiError;

/// A failure below HTTP, as the host reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// Connect, first-byte or between-bytes timeout.
    Timeout,
    /// Refused, reset, DNS failure: nobody answered.
    Unreachable,
    /// The runtime refused the destination (`allowed_outbound_hosts`).
    Denied,
    Other(String),
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What the client gets if no other provider answers.
    pub error: ApiError,
    /// Another provider may well succeed (rate limit, outage); false for the client's own faults.
    pub retryable: bool,
    /// Store this so every instance skips the key (and model, per the provider's scope) for a
    /// while.
    pub cooldown: Option<Cooldown>,
    /// What kind of failure it was: decides what is tried next.
    pub cause: Cause,
}

/// What kind of failure an attempt met: what the fallback does next depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// 429 or quota exhaustion: the key (and model, per the scope) cools; another key or
    /// candidate is tried at once.
    RateLimited,
    /// A per-day cap is spent: the key cools until the provider's daily reset.
    DailyCap,
    /// The provider refused the key itself (401/403): the cool-down covers the whole key.
    KeyRefused,
    /// The prompt does not fit the model's window: only a larger window can serve it.
    ContextLength,
    /// The provider's content filter refused the request: never sent to the same model again.
    ContentFilter,
    /// 5xx, 408, a broken or unreadable answer: the provider's trouble.
    Server,
    /// No answer at all (timeout, reset, unreachable).
    Transport,
    /// The client's own fault (400, 422…): retrying elsewhere will not help.
    Client,
    /// This provider cannot serve the request (its wire format cannot carry it, or it does not
    /// know the model): another provider may.
    Unsupported,
}

impl Failure {
    /// The provider refused the key itself.
    pub fn key_refused(&self) -> bool {
        self.cause == Cause::KeyRefused
    }
}

/// How long a key the provider refused is set aside: long enough that no request loops on it,
/// short enough that a key fixed on the provider's side (billing, permissions) comes back
/// without a redeploy.
pub const KEY_SET_ASIDE_MS: u64 = 3_600_000;

/// Response headers that matter to the judgement.
#[derive(Debug, Clone, Copy, Default)]
pub struct Hints<'a> {
    pub retry_after: Option<&'a str>,
    pub reset_requests: Option<&'a str>,
    pub reset_tokens: Option<&'a str>,
}

/// Judges a non-2xx status. `detail` is the message of the upstream's error body, read by the
/// provider's adapter.
pub fn judge_status(
    provider: &str,
    api_key: &str,
    status: u16,
    hints: Hints<'_>,
    detail: Option<&str>,
    now_ms: u64,
) -> Failure {
    let detail = detail
        .map(|m| scrub(m, api_key))
        .unwrap_or_else(|| format!("HTTP {status}"));
    match status {
        429 => {
            let resets: Vec<&str> = [hints.reset_requests, hints.reset_tokens]
                .into_iter()
                .flatten()
                .collect();
            let wait = cooldown::wait_ms(hints.retry_after, &resets);
            let cd = Cooldown::new(now_ms, wait, status);
            Failure {
                error: ApiError::rate_limited(
                    format!("Provider `{provider}` is rate limited: {detail}"),
                    Some(cd.remaining_secs(now_ms)),
                ),
                retryable: true,
                cooldown: Some(cd),
                cause: Cause::RateLimited,
            }
        }
        401 | 403 => Failure {
            error: ApiError::upstream(format!(
                "Provider `{provider}` rejected the gateway's credentials (HTTP {status}): \
                 {detail}; check `{provider}_api_key`."
            )),
            retryable: true,
            cooldown: Some(Cooldown::new(now_ms, KEY_SET_ASIDE_MS, status)),
            cause: Cause::KeyRefused,
        },
        404 => Failure {
            error: ApiError::relayed(404, format!("Provider `{provider}`: {detail}")),
            retryable: true,
            cooldown: None,
            cause: Cause::Unsupported,
        },
        408 => Failure {
            error: ApiError::upstream_timeout(format!("Provider `{provider}` timed out: {detail}")),
            retryable: true,
            cooldown: None,
            cause: Cause::Server,
        },
        400..=499 => Failure {
            error: ApiError::relayed(status, format!("Provider `{provider}`: {detail}")),
            retryable: false,
            cooldown: None,
            cause: Cause::Client,
        },
        _ => Failure {
            error: ApiError::upstream(format!(
                "Provider `{provider}` failed with HTTP {status}: {detail}"
            )),
            retryable: true,
            cooldown: None,
            cause: Cause::Server,
        },
    }
}

/// Judges a failure to get any response at all.
pub fn judge_transport(provider: &str, api_key: &str, t: &Transport) -> Failure {
    let error = match t {
        Transport::Timeout => {
            ApiError::upstream_timeout(format!("Provider `{provider}` did not answer in time."))
        }
        Transport::Unreachable => {
            ApiError::upstream(format!("Provider `{provider}` could not be reached."))
        }
        Transport::Denied => ApiError::upstream(format!(
            "The runtime refused to connect to provider `{provider}`: its base URL is not in \
             allowed_outbound_hosts."
        )),
        Transport::Other(m) => ApiError::upstream(format!(
            "Request to provider `{provider}` failed: {}",
            scrub(m, api_key)
        )),
    };
    Failure {
        error,
        retryable: true,
        cooldown: None,
        cause: Cause::Transport,
    }
}

/// A 2xx answer that broke before it was complete (nothing reached the client yet, so another
/// provider may still answer).
pub fn broken_answer(provider: &str, why: &str, timed_out: bool) -> Failure {
    let error = if timed_out {
        ApiError::upstream_timeout(format!(
            "Provider `{provider}` did not finish its answer in time: {why}."
        ))
    } else {
        ApiError::upstream(format!(
            "Provider `{provider}` sent a broken answer: {why}."
        ))
    };
    Failure {
        error,
        retryable: true,
        cooldown: None,
        cause: Cause::Server,
    }
}

/// The error event for a stream that broke after its 200 was sent.
pub fn stream_interrupted(provider: &str, why: &str) -> ApiError {
    let mut e = ApiError::upstream(format!(
        "The stream from provider `{provider}` was interrupted: {why}. The answer is incomplete."
    ));
    e.code = Some("upstream_stream_interrupted");
    e
}

/// Removes a secret from text that may be shown to a client.
pub fn scrub(text: &str, secret: &str) -> String {
    if secret.len() < 4 {
        return text.to_owned();
    }
    text.replace(secret, "[redacted]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_sets_a_cooldown_from_retry_after() {
        let f = judge_status(
            "groq",
            "sk-secret",
            429,
            Hints {
                retry_after: Some("7"),
                ..Default::default()
            },
            Some("slow down"),
            1_000,
        );
        assert!(f.retryable);
        assert_eq!(f.cooldown.unwrap().until_ms, 8_000);
        assert_eq!((f.error.status, f.error.retry_after), (429, Some(7)));
        assert!(f.error.message.contains("slow down"));
    }

    #[test]
    fn status_mapping() {
        let j = |s: u16| judge_status("p", "key-123", s, Hints::default(), None, 0);
        assert_eq!((j(500).error.status, j(500).retryable), (502, true));
        assert_eq!(
            (j(503).error.status, j(503).error.kind),
            (502, "upstream_error")
        );
        assert_eq!((j(401).error.status, j(401).retryable), (502, true));
        assert_eq!((j(400).error.status, j(400).retryable), (400, false));
        assert_eq!((j(422).error.status, j(422).retryable), (422, false));
        assert_eq!(j(408).error.code, Some("upstream_timeout"));
    }

    #[test]
    fn secrets_never_reach_messages() {
        let f = judge_status(
            "openai",
            "sk-live-abcdef",
            400,
            Hints::default(),
            Some("Incorrect API key provided: sk-live-abcdef"),
            0,
        );
        assert!(!f.error.message.contains("sk-live-abcdef"));
        let t = judge_transport(
            "openai",
            "sk-live-abcdef",
            &Transport::Other("sk-live-abcdef".into()),
        );
        assert!(!t.error.message.contains("sk-live-abcdef"));
        assert_eq!(
            judge_transport("p", "k", &Transport::Timeout).error.status,
            504
        );
    }
}
