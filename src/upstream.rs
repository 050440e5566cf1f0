//! Judging an upstream's answer: what the client sees, whether another provider should be
//! tried, and whether the provider should cool down. Provider keys never leave this judgement.
//!
//! A failure is judged from its status, its headers ([`Hints`]), the message of its body and
//! what the provider's adapter read in the body's codes ([`BodyHints`]). The wording the
//! providers use is matched here, provider-agnostically, so a provider that copies OpenAI's
//! error shape but not its codes is still judged right.

use crate::catalog::Reset;
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
    /// `retry-after`: seconds or an HTTP date.
    pub retry_after: Option<&'a str>,
    /// `x-ratelimit-reset-requests` (Groq, OpenAI: a duration such as `2m59.56s`), or where a
    /// provider has none, `anthropic-ratelimit-requests-reset` (an RFC 3339 timestamp).
    pub reset_requests: Option<&'a str>,
    /// `x-ratelimit-reset-tokens` (a duration such as `7.66s`), or where a provider has none,
    /// `anthropic-ratelimit-tokens-reset` (an RFC 3339 timestamp).
    pub reset_tokens: Option<&'a str>,
}

/// What a provider's adapter read in an error body beyond its message: the codes and numbers
/// only that provider's shape carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BodyHints {
    /// The kind of failure, when the body's codes name it (OpenAI's `code`, a Google quota id,
    /// a Google error reason): wins over the status and the message's wording.
    pub cause: Option<Cause>,
    /// How long the body asks a rate-limited caller to wait, in ms (Gemini's `RetryInfo`,
    /// OpenRouter's `metadata`): used when no header says.
    pub wait_ms: Option<u64>,
    /// When a spent daily cap comes back, as Unix ms, when the provider says (OpenRouter's
    /// `X-RateLimit-Reset`), or the next reset of its day.
    pub reset_at_ms: Option<u64>,
}

/// When the per-day limits of `provider` start again (the catalogue's `reset`; UTC midnight for
/// a provider it does not list).
pub fn day_reset(provider: &str) -> Reset {
    crate::catalog::provider(provider).map_or(Reset::UtcMidnight, |p| p.reset)
}

/// Judges a non-2xx status. `detail` is the message of the upstream's error body, read by the
/// provider's adapter. The same as [`judge_body`] with nothing read from the body's codes.
pub fn judge_status(
    provider: &str,
    api_key: &str,
    status: u16,
    hints: Hints<'_>,
    detail: Option<&str>,
    now_ms: u64,
) -> Failure {
    judge_body(
        provider,
        api_key,
        status,
        hints,
        detail,
        BodyHints::default(),
        now_ms,
    )
}

/// Judges a non-2xx status with what the adapter read in the body.
///
/// - The cause: the body's codes when they name it, else the status and the message's wording
///   ([`classify`]).
/// - A rate limit cools the key for the wait the headers ask (`Retry-After` in seconds or as a
///   date, else the reset headers), else the body's (`BodyHints::wait_ms`), else the one the
///   message states (`Please try again in 1m26.4s`), else [`cooldown::DEFAULT_MS`].
/// - A spent daily cap cools the key until the reset the body names, else for the wait its
///   message states (Groq and OpenAI count a day as a rolling window and say when the next
///   request fits), else until the next reset of the provider's day. Its headers are not used:
///   a per-minute `Retry-After` beside a spent daily cap is what causes retry storms.
/// - Context length and content filter: retryable elsewhere, no cool-down (the key is fine).
pub fn judge_body(
    provider: &str,
    api_key: &str,
    status: u16,
    hints: Hints<'_>,
    detail: Option<&str>,
    body: BodyHints,
    now_ms: u64,
) -> Failure {
    let cause = body
        .cause
        .unwrap_or_else(|| classify(status, detail.unwrap_or("")));
    let stated = detail.and_then(stated_wait_ms);
    let detail = detail
        .map(|m| scrub(m, api_key))
        .unwrap_or_else(|| format!("HTTP {status}"));
    match cause {
        Cause::RateLimited => {
            let resets: Vec<&str> = [hints.reset_requests, hints.reset_tokens]
                .into_iter()
                .flatten()
                .collect();
            let wait = cooldown::header_wait_ms(hints.retry_after, &resets, now_ms)
                .or(body.wait_ms)
                .or(stated)
                .unwrap_or(cooldown::DEFAULT_MS);
            let cd = Cooldown::new(now_ms, wait, status);
            Failure {
                error: ApiError::rate_limited(
                    format!("Provider `{provider}` is rate limited: {detail}"),
                    Some(cd.remaining_secs(now_ms)),
                ),
                retryable: true,
                cooldown: Some(cd),
                cause,
            }
        }
        Cause::DailyCap => {
            let until = body
                .reset_at_ms
                .filter(|&at| at > now_ms)
                .or_else(|| stated.map(|w| now_ms.saturating_add(w)))
                .unwrap_or_else(|| cooldown::next_reset_ms(day_reset(provider), now_ms));
            let cd = Cooldown::until(now_ms, until, status);
            let secs = cd.remaining_secs(now_ms);
            Failure {
                error: ApiError::rate_limited(
                    format!(
                        "Provider `{provider}` has spent its daily quota (back in {}): {detail}",
                        span(secs)
                    ),
                    Some(secs),
                ),
                retryable: true,
                cooldown: Some(cd),
                cause,
            }
        }
        Cause::KeyRefused => Failure {
            error: ApiError::upstream(format!(
                "Provider `{provider}` rejected the gateway's credentials (HTTP {status}): \
                 {detail}; check `{provider}_api_key`."
            )),
            retryable: true,
            cooldown: Some(Cooldown::new(now_ms, KEY_SET_ASIDE_MS, status)),
            cause,
        },
        Cause::ContextLength => {
            let mut error = ApiError::invalid_request(
                format!("Provider `{provider}` cannot fit the request in its context: {detail}"),
                Some("messages"),
            );
            error.code = Some("context_length_exceeded");
            Failure {
                error,
                retryable: true,
                cooldown: None,
                cause,
            }
        }
        Cause::ContentFilter => {
            let mut error = ApiError::invalid_request(
                format!(
                    "Provider `{provider}` refused the request by its content filter: {detail}"
                ),
                None,
            );
            error.code = Some("content_filter");
            Failure {
                error,
                retryable: true,
                cooldown: None,
                cause,
            }
        }
        Cause::Unsupported => Failure {
            error: if status == 404 {
                ApiError::relayed(404, format!("Provider `{provider}`: {detail}"))
            } else {
                ApiError::upstream(format!(
                    "Provider `{provider}` cannot serve this request (HTTP {status}): {detail}"
                ))
            },
            retryable: true,
            cooldown: None,
            cause,
        },
        Cause::Client => Failure {
            error: ApiError::relayed(
                if (400..500).contains(&status) {
                    status
                } else {
                    400
                },
                format!("Provider `{provider}`: {detail}"),
            ),
            retryable: false,
            cooldown: None,
            cause,
        },
        Cause::Server | Cause::Transport => Failure {
            error: if matches!(status, 408 | 504) {
                ApiError::upstream_timeout(format!("Provider `{provider}` timed out: {detail}"))
            } else {
                ApiError::upstream(format!(
                    "Provider `{provider}` failed with HTTP {status}: {detail}"
                ))
            },
            retryable: true,
            cooldown: None,
            cause,
        },
    }
}

/// The cause of a non-2xx answer from its status and its message alone.
///
/// - 429: a request too large for the key's per-minute budget (OpenAI) is a context problem (no
///   wait will fit it); a message naming a per-day limit is a daily cap; anything else a rate
///   limit.
/// - 401/403: the key refused, unless the message says a content filter refused (OpenRouter's
///   moderation answers 403).
/// - 404: unsupported here (an unknown model); 408: the provider's trouble.
/// - Other 4xx: a content filter or a context overflow when the message says so, else the
///   client's fault.
/// - Everything else (5xx, 529 overloaded, odd statuses): the provider's trouble.
pub fn classify(status: u16, message: &str) -> Cause {
    let m = message.to_ascii_lowercase();
    match status {
        429 if m.contains("request too large") => Cause::ContextLength,
        429 if names_daily_cap(&m) => Cause::DailyCap,
        429 => Cause::RateLimited,
        401 | 403 if names_content_filter(&m) => Cause::ContentFilter,
        401 | 403 => Cause::KeyRefused,
        404 => Cause::Unsupported,
        408 => Cause::Server,
        400..=499 if names_content_filter(&m) => Cause::ContentFilter,
        400..=499 if names_context_overflow(&m) => Cause::ContextLength,
        400..=499 => Cause::Client,
        _ => Cause::Server,
    }
}

/// How providers say a prompt does not fit (lowercase): OpenAI and vLLM-based hosts (NVIDIA,
/// Together) "This model's maximum context length is N tokens … Please reduce the length of the
/// messages", OpenAI/Groq/Cerebras code `context_length_exceeded`, Mistral "too large for model
/// with N maximum context length", Anthropic "prompt is too long: N tokens > M maximum" and
/// "input length and `max_tokens` exceed context limit", Gemini "The input token count (N)
/// exceeds the maximum number of tokens allowed (M)", TGI "`inputs` tokens + `max_new_tokens`
/// must be <= N", Groq's 413 "Request too large for model … please reduce your message size".
const CONTEXT_OVERFLOW: &[&str] = &[
    "context length",
    "context_length",
    "context window",
    "context limit",
    "maximum context",
    "reduce the length of the messages",
    "please reduce the length",
    "prompt is too long",
    "input is too long",
    "too many tokens",
    "exceeds the maximum number of tokens",
    "input token count",
    "`inputs` tokens + `max_new_tokens`",
    "maximum prompt length",
    "request too large",
];

/// How providers say their content filter refused (lowercase): OpenAI/Azure codes
/// `content_filter`, `content_policy_violation`, Azure "…triggering Azure OpenAI's content
/// management policy" (`ResponsibleAIPolicyViolation`), OpenAI "your prompt was flagged as
/// potentially violating our usage policy" and "rejected as a result of our safety system",
/// Anthropic "Output blocked by content filtering policy", OpenRouter's moderation "…was
/// flagged", Google's "Responsible AI practices".
const CONTENT_FILTER: &[&str] = &[
    "content_filter",
    "content filter",
    "content management policy",
    "content_policy",
    "content policy",
    "responsibleaipolicyviolation",
    "responsible ai",
    "flagged as potentially violating",
    "was flagged",
    "safety system",
];

/// How providers say a per-day limit is spent (lowercase): OpenRouter's `free-models-per-day`
/// (and `-high-balance`), Groq's and OpenAI's "on requests per day (RPD)", "tokens per day
/// (TPD)", "audio seconds per day (ASD)", Cerebras's "Tokens per day limit exceeded", a Google
/// quota id (`GenerateRequestsPerDayPerProjectPerModel-FreeTier`) quoted in a message.
const DAILY_CAP: &[&str] = &[
    "free-models-per-day",
    "per-day",
    "per day (",
    "per day limit",
    "perday",
    "daily limit",
    "daily quota",
];

/// Does the (lowercase) message say the prompt does not fit?
pub fn names_context_overflow(lowercase: &str) -> bool {
    CONTEXT_OVERFLOW.iter().any(|p| lowercase.contains(p))
}

/// Does the (lowercase) message say a content filter refused?
pub fn names_content_filter(lowercase: &str) -> bool {
    CONTENT_FILTER.iter().any(|p| lowercase.contains(p))
}

/// Does the (lowercase) message of a 429 say a per-day limit is spent?
pub fn names_daily_cap(lowercase: &str) -> bool {
    DAILY_CAP.iter().any(|p| lowercase.contains(p))
}

/// The wait a message states, in ms: Groq's and OpenAI's "Please try again in 6m54.72s" (also
/// `6m 11.52s`, `644ms`). Google's "Please retry in 24.79s" is not read: beside a spent daily
/// quota it only names the per-minute window.
pub fn stated_wait_ms(message: &str) -> Option<u64> {
    const PHRASE: &str = "try again in ";
    let lower = message.to_ascii_lowercase();
    let start = lower.find(PHRASE)? + PHRASE.len();
    let text: String = lower[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | 'h' | 'm' | 's' | 'u' | 'µ' | ' '))
        .filter(|c| *c != ' ')
        .collect();
    cooldown::parse_duration(text.trim_end_matches('.'))
}

/// `7 h 12 min`, `12 min`, `40 s`: how long a cool-down lasts, for a message.
fn span(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs} s"),
        60..=3_599 => format!("{} min", secs.div_ceil(60)),
        _ => format!("{} h {} min", secs / 3_600, secs % 3_600 / 60),
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

    /// Unix ms of 2026-11-21 07:28 UTC, a Saturday in PST.
    const NOW: u64 = 1_795_246_080_000;
    const DAY: u64 = 86_400_000;

    fn judge(provider: &str, status: u16, detail: &str) -> Failure {
        judge_status(
            provider,
            "sk-secret",
            status,
            Hints::default(),
            Some(detail),
            NOW,
        )
    }

    #[test]
    fn statuses_and_their_causes() {
        let j = |s: u16| judge_status("p", "key-123", s, Hints::default(), None, 0);
        for (status, cause, retryable, client_status) in [
            (500, Cause::Server, true, 502),
            (502, Cause::Server, true, 502),
            (503, Cause::Server, true, 502),
            (504, Cause::Server, true, 504),
            (529, Cause::Server, true, 502),
            (408, Cause::Server, true, 504),
            (404, Cause::Unsupported, true, 404),
            (401, Cause::KeyRefused, true, 502),
            (403, Cause::KeyRefused, true, 502),
            (400, Cause::Client, false, 400),
            (413, Cause::Client, false, 413),
            (422, Cause::Client, false, 422),
            (429, Cause::RateLimited, true, 429),
        ] {
            let f = j(status);
            assert_eq!(
                (f.cause, f.retryable, f.error.status),
                (cause, retryable, client_status),
                "HTTP {status}"
            );
            let cools = matches!(cause, Cause::KeyRefused | Cause::RateLimited);
            assert_eq!(f.cooldown.is_some(), cools, "HTTP {status}");
        }
        assert_eq!(j(401).cooldown.unwrap().until_ms, KEY_SET_ASIDE_MS);
        // Anthropic's overloaded 529 and a 429 that asks to shorten the prompt or wait.
        let f = judge("anthropic", 529, "Overloaded (overloaded_error)");
        assert_eq!(
            (f.cause, f.retryable, f.cooldown),
            (Cause::Server, true, None)
        );
        let f = judge(
            "anthropic",
            429,
            "Number of request tokens has exceeded your per-minute rate limit; Please reduce the \
             prompt length or the maximum tokens requested, or try again later. (rate_limit_error)",
        );
        assert_eq!(f.cause, Cause::RateLimited);
        assert_eq!(f.cooldown.unwrap().until_ms, NOW + cooldown::DEFAULT_MS);
    }

    #[test]
    fn a_rate_limit_waits_for_an_http_date() {
        let hints = Hints {
            retry_after: Some("Sat, 21 Nov 2026 07:29:30 GMT"),
            reset_requests: Some("5s"),
            ..Hints::default()
        };
        let f = judge_status("p", "k", 429, hints, None, NOW);
        assert_eq!(f.cause, Cause::RateLimited);
        assert_eq!(f.cooldown.unwrap().until_ms, NOW + 90_000);
        assert_eq!(f.error.retry_after, Some(90));
        // A date already past: the minimum, not the other hints.
        let hints = Hints {
            retry_after: Some("Sat, 21 Nov 2026 07:00:00 GMT"),
            reset_requests: Some("5s"),
            ..Hints::default()
        };
        let f = judge_status("p", "k", 429, hints, None, NOW);
        assert_eq!(f.cooldown.unwrap().until_ms, NOW + cooldown::MIN_MS);
    }

    #[test]
    fn a_rate_limit_takes_the_first_hint_there_is() {
        let body = BodyHints {
            wait_ms: Some(52_000),
            ..BodyHints::default()
        };
        let stated =
            Some("Rate limit reached on tokens per minute (TPM). Please try again in 7.66s.");
        let until = |hints: Hints<'_>, body: BodyHints, detail: Option<&str>| {
            judge_body("p", "k", 429, hints, detail, body, NOW)
                .cooldown
                .unwrap()
                .until_ms
                - NOW
        };
        let resets = Hints {
            reset_requests: Some("2m59.56s"),
            reset_tokens: Some("7.66s"),
            ..Hints::default()
        };
        let all = Hints {
            retry_after: Some("3"),
            ..resets
        };
        assert_eq!(until(all, body, stated), 3_000);
        assert_eq!(until(resets, body, stated), 179_560);
        // Anthropic's reset headers are RFC 3339 timestamps.
        let anthropic = Hints {
            reset_requests: Some("2026-11-21T07:28:40Z"),
            reset_tokens: Some("2026-11-21T07:28:05.5Z"),
            ..Hints::default()
        };
        assert_eq!(until(anthropic, body, stated), 40_000);
        assert_eq!(until(Hints::default(), body, stated), 52_000);
        assert_eq!(until(Hints::default(), BodyHints::default(), stated), 7_660);
        assert_eq!(
            until(Hints::default(), BodyHints::default(), None),
            cooldown::DEFAULT_MS
        );
    }

    #[test]
    fn a_spent_daily_cap_cools_until_the_reset() {
        let midnight_utc = 1_795_305_600_000; // 2026-11-22 00:00 UTC
                                              // OpenRouter: every `:free` model of the account, until UTC midnight; its per-minute
                                              // Retry-After is not a reason to come back sooner.
        let hints = Hints {
            retry_after: Some("60"),
            ..Hints::default()
        };
        let f = judge_status(
            "openrouter",
            "sk-or-secret",
            429,
            hints,
            Some("Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free model requests per day"),
            NOW,
        );
        assert_eq!((f.cause, f.retryable), (Cause::DailyCap, true));
        let cd = f.cooldown.unwrap();
        assert_eq!(cd.until_ms, midnight_utc);
        assert_eq!(
            (f.error.status, f.error.code),
            (429, Some("rate_limit_exceeded"))
        );
        assert_eq!(f.error.retry_after, Some((midnight_utc - NOW) / 1000));
        assert!(f
            .error
            .message
            .contains("daily quota (back in 16 h 32 min)"));
        let f = judge(
            "openrouter",
            429,
            "Rate limit exceeded: free-models-per-day-high-balance.",
        );
        assert_eq!(f.cause, Cause::DailyCap);
        // The body's own reset instant wins (when it is ahead).
        let body = |at| BodyHints {
            reset_at_ms: Some(at),
            ..BodyHints::default()
        };
        let detail = Some("Rate limit exceeded: free-models-per-day.");
        let f = judge_body(
            "openrouter",
            "k",
            429,
            hints,
            detail,
            body(NOW + 5_000_000),
            NOW,
        );
        assert_eq!(f.cooldown.unwrap().until_ms, NOW + 5_000_000);
        let f = judge_body("openrouter", "k", 429, hints, detail, body(NOW - 1), NOW);
        assert_eq!(f.cooldown.unwrap().until_ms, midnight_utc);
        // Groq counts a day as a rolling window and says when the next request fits.
        let f = judge(
            "groq",
            429,
            "Rate limit reached for model `llama-3.3-70b-versatile` in organization `org_x` \
             service tier `on_demand` on tokens per day (TPD): Limit 100000, Used 99996, \
             Requested 484. Please try again in 6m54.72s. Need more tokens?",
        );
        assert_eq!(f.cause, Cause::DailyCap);
        assert_eq!(f.cooldown.unwrap().until_ms, NOW + 414_720);
        // Without a stated wait: the next UTC midnight.
        let f = judge(
            "groq",
            429,
            "Rate limit reached for model `llama-3.1-8b-instant` on requests per day (RPD): \
             Limit 14400, Used 14400, Requested 1.",
        );
        assert_eq!(f.cause, Cause::DailyCap);
        assert_eq!(f.cooldown.unwrap().until_ms, midnight_utc);
        // Cerebras.
        let f = judge(
            "cerebras",
            429,
            "Tokens per day limit exceeded - too many tokens processed.",
        );
        assert_eq!(f.cause, Cause::DailyCap);
        // A provider whose day is Pacific (Gemini): the next midnight in Los Angeles, 32
        // minutes away (it is 23:28 PST).
        let f = judge(
            "gemini",
            429,
            "Quota exceeded for quota id GenerateRequestsPerDayPerProjectPerModel-FreeTier",
        );
        assert_eq!(f.cause, Cause::DailyCap);
        assert_eq!(f.cooldown.unwrap().until_ms, NOW + 32 * 60_000);
        // Per-minute limits stay rate limits.
        for m in [
            "Rate limit exceeded: free-models-per-min.",
            "Rate limit reached for model `x` on requests per minute (RPM): Limit 30, Used 30",
            "Tokens per minute limit exceeded - too many tokens processed.",
        ] {
            assert_eq!(judge("groq", 429, m).cause, Cause::RateLimited, "{m}");
        }
        assert!(midnight_utc - NOW < DAY);
    }

    #[test]
    fn context_overflows_are_retryable_elsewhere_without_a_cooldown() {
        for (provider, status, message) in [
            ("openai", 400, "This model's maximum context length is 128000 tokens. However, your messages resulted in 130000 tokens. Please reduce the length of the messages."),
            ("groq", 400, "Please reduce the length of the messages or completion."),
            ("groq", 413, "Request too large for model `llama-3.1-8b-instant` in organization `org_x` service tier `on_demand` on tokens per minute (TPM): Limit 6000, Requested 7000, please reduce your message size and try again."),
            ("openai", 429, "Request too large for gpt-4o in organization org-x on tokens per min (TPM): Limit 30000, Requested 30601. The input or output tokens must be reduced in order to run successfully."),
            ("mistral", 400, "Prompt contains 40000 tokens and 0 draft tokens, too large for model with 32768 maximum context length"),
            ("nvidia", 400, "'max_tokens' or 'max_completion_tokens' is too large: 4096. This model's maximum context length is 8192 tokens and your request has 5000 input tokens"),
            ("together", 422, "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 8193. Given: 8000 `inputs` tokens and 1000 `max_new_tokens`"),
            ("cerebras", 400, "Please reduce the length of the messages or completion. Current length is 9000 while limit is 8192"),
            ("anthropic", 400, "prompt is too long: 208310 tokens > 200000 maximum (invalid_request_error)"),
            ("anthropic", 400, "input length and `max_tokens` exceed context limit: 197444 + 8192 > 200000, decrease input length or `max_tokens` and try again (invalid_request_error)"),
            ("gemini", 400, "The input token count (1300000) exceeds the maximum number of tokens allowed (1048575). (INVALID_ARGUMENT)"),
            ("openrouter", 400, "This endpoint's maximum context length is 131072 tokens. However, you requested about 200000 tokens."),
        ] {
            let f = judge(provider, status, message);
            assert_eq!(
                (f.cause, f.retryable, f.cooldown),
                (Cause::ContextLength, true, None),
                "{provider}: {message}"
            );
            assert_eq!(
                (f.error.status, f.error.code, f.error.param.as_deref()),
                (400, Some("context_length_exceeded"), Some("messages"))
            );
            assert_eq!(f.error.kind, "invalid_request_error");
        }
        // The body's code alone says so too.
        let body = BodyHints {
            cause: Some(Cause::ContextLength),
            ..BodyHints::default()
        };
        let f = judge_body("openai", "k", 400, Hints::default(), None, body, NOW);
        assert_eq!(f.error.code, Some("context_length_exceeded"));
    }

    #[test]
    fn content_filters_are_retryable_elsewhere_without_a_cooldown() {
        for (provider, status, message) in [
            ("azure", 400, "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. Please modify your prompt and retry."),
            ("openai", 400, "Invalid prompt: your prompt was flagged as potentially violating our usage policy. Please try again with a different prompt."),
            ("openai", 400, "Your request was rejected as a result of our safety system."),
            ("anthropic", 400, "Output blocked by content filtering policy (invalid_request_error)"),
            ("openrouter", 403, "meta-llama/llama-guard-3-8b: your input was flagged for \"violence\""),
        ] {
            let f = judge(provider, status, message);
            assert_eq!(
                (f.cause, f.retryable, f.cooldown),
                (Cause::ContentFilter, true, None),
                "{provider}: {message}"
            );
            assert_eq!((f.error.status, f.error.code), (400, Some("content_filter")));
        }
    }

    #[test]
    fn the_bodys_codes_win_over_status_and_wording() {
        let f = judge_body(
            "openai",
            "k",
            429,
            Hints::default(),
            Some("You exceeded your current quota, please check your plan and billing details."),
            BodyHints {
                cause: Some(Cause::KeyRefused),
                ..BodyHints::default()
            },
            NOW,
        );
        assert!(f.key_refused() && f.retryable);
        assert_eq!(f.cooldown.unwrap().until_ms, NOW + KEY_SET_ASIDE_MS);
        assert!(f.error.message.contains("(HTTP 429)"));
        let f = judge_body(
            "gemini",
            "k",
            400,
            Hints::default(),
            Some("User location is not supported for the API use. (FAILED_PRECONDITION)"),
            BodyHints {
                cause: Some(Cause::Unsupported),
                ..BodyHints::default()
            },
            NOW,
        );
        assert_eq!(
            (f.cause, f.retryable, f.error.status),
            (Cause::Unsupported, true, 502)
        );
    }

    #[test]
    fn stated_waits() {
        for (message, ms) in [
            (
                "Please try again in 6m54.72s. Need more tokens?",
                Some(414_720),
            ),
            ("Please try again in 6m 11.52s.", Some(371_520)),
            ("Please try again in 644ms. Visit", Some(644)),
            ("Please try again in 1.984999999s", Some(1_985)),
            ("Please try again in 1h23m45.6s.", Some(5_025_600)),
            ("Please try again later.", None),
            ("Please retry in 24.79s.", None),
            ("slow down", None),
        ] {
            assert_eq!(stated_wait_ms(message), ms, "{message}");
        }
    }

    #[test]
    fn secrets_never_reach_any_message() {
        let key = "sk-live-abcdef";
        for (status, message) in [
            (
                429,
                "Rate limit exceeded: free-models-per-day for key sk-live-abcdef",
            ),
            (429, "slow down, sk-live-abcdef"),
            (400, "maximum context length exceeded for sk-live-abcdef"),
            (400, "content_filter: sk-live-abcdef"),
            (401, "Incorrect API key provided: sk-live-abcdef"),
            (500, "boom sk-live-abcdef"),
        ] {
            let f = judge_status(
                "openrouter",
                key,
                status,
                Hints::default(),
                Some(message),
                NOW,
            );
            assert!(
                !f.error.message.contains(key),
                "{status}: {}",
                f.error.message
            );
            assert!(f.error.message.contains("[redacted]"));
        }
    }
}
