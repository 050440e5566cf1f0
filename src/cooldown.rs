//! Provider cool-downs: after a 429 the provider is skipped until its Retry-After has passed, and
//! the deadline lives in the key-value store so every instance honours it, not only the one that
//! was told.

#[cfg(doc)]
use crate::kv::keys;
use crate::kv::KvOp;
use serde::{Deserialize, Serialize};

/// A cool-down is never shorter than this, so a missing or zero Retry-After still spreads load.
pub const MIN_MS: u64 = 1_000;
/// Used when a 429 carries no hint at all.
pub const DEFAULT_MS: u64 = 10_000;
/// Free tiers reset daily at worst; nothing should bench a provider for longer.
pub const MAX_MS: u64 = 24 * 3_600_000;

/// Skip a provider until `until_ms` (Unix milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cooldown {
    pub until_ms: u64,
    /// The upstream status that caused it.
    pub status: u16,
}

impl Cooldown {
    /// A cool-down starting now for `wait_ms`, clamped to sane bounds.
    pub fn new(now_ms: u64, wait_ms: u64, status: u16) -> Self {
        Self {
            until_ms: now_ms.saturating_add(wait_ms.clamp(MIN_MS, MAX_MS)),
            status,
        }
    }

    pub fn is_active(&self, now_ms: u64) -> bool {
        now_ms < self.until_ms
    }

    /// Whole seconds left, rounded up (for a client's `Retry-After`).
    pub fn remaining_secs(&self, now_ms: u64) -> u64 {
        self.until_ms.saturating_sub(now_ms).div_ceil(1000)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a stored cool-down; anything unreadable counts as none.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }

    /// The write that records this cool-down under `key` (a [`keys::cooldown`] name):
    /// compare-and-swap keeping the later `until`, so a late writer with a shorter wait never
    /// shortens a live cool-down.
    pub fn op(&self, key: String) -> KvOp {
        KvOp::CasMax {
            key,
            value: self.encode(),
            rank: until_rank,
        }
    }
}

/// A stored cool-down ranks by its deadline.
fn until_rank(bytes: &[u8]) -> Option<u64> {
    Cooldown::decode(bytes).map(|c| c.until_ms)
}

/// How long a 429 asks us to wait, in ms: `Retry-After` (seconds), else the providers'
/// `x-ratelimit-reset-*` durations (`6m30s`, `1.5s`, `120ms`), else the default.
pub fn wait_ms(retry_after: Option<&str>, ratelimit_resets: &[&str]) -> u64 {
    if let Some(ms) = retry_after.and_then(parse_seconds) {
        return ms;
    }
    ratelimit_resets
        .iter()
        .filter_map(|r| parse_duration(r))
        .max()
        .unwrap_or(DEFAULT_MS)
}

/// `Retry-After` as (possibly fractional) seconds. HTTP-dates are not used by the providers we
/// route to and fall through to the other hints.
fn parse_seconds(s: &str) -> Option<u64> {
    let secs: f64 = s.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| (secs * 1000.0).ceil() as u64)
}

/// Go-style durations as Groq and OpenAI send them: `1h2m3.5s`, `250ms`, `6m30s`.
pub fn parse_duration(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_len] {
            "h" => 3_600_000.0,
            "m" => 60_000.0,
            "s" => 1_000.0,
            "ms" => 1.0,
            "us" | "µs" => 0.001,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * factor;
    }
    Some(total.ceil() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        assert_eq!(wait_ms(Some("7"), &[]), 7_000);
        assert_eq!(wait_ms(Some(" 1.5 "), &[]), 1_500);
        assert_eq!(wait_ms(None, &["6m30s", "2s"]), 390_000);
        assert_eq!(
            wait_ms(Some("Wed, 21 Oct 2015 07:28:00 GMT"), &["250ms"]),
            250
        );
        assert_eq!(wait_ms(None, &["garbage"]), DEFAULT_MS);
        assert_eq!(parse_duration("1h2m3.5s"), Some(3_723_500));
        assert_eq!(parse_duration("5x"), None);
    }

    #[test]
    fn clamps_and_expires() {
        let c = Cooldown::new(1_000, 0, 429);
        assert_eq!(c.until_ms, 1_000 + MIN_MS);
        assert!(c.is_active(1_500) && !c.is_active(2_000));
        assert_eq!(Cooldown::new(0, u64::MAX, 429).until_ms, MAX_MS);
        assert_eq!(Cooldown::new(0, 7_000, 429).remaining_secs(100), 7);
        assert_eq!(Cooldown::decode(&c.encode()), Some(c));
        assert_eq!(Cooldown::decode(b"junk"), None);
    }

    #[test]
    fn a_late_shorter_cooldown_never_shortens_a_live_one() {
        use crate::kv::{apply, keys, Kv, MemKv};
        let kv = MemKv::default();
        let long = Cooldown::new(0, 60_000, 429);
        let short = Cooldown::new(1_000, 5_000, 429);
        apply(&kv, &long.op(keys::cooldown("groq", "k1", None))).unwrap();
        apply(&kv, &short.op(keys::cooldown("groq", "k1", None))).unwrap();
        let stored = Cooldown::decode(&kv.get("cooldown:v1:groq:k1").unwrap().unwrap()).unwrap();
        assert_eq!(stored, long);
        let longer = Cooldown::new(2_000, 90_000, 429);
        apply(&kv, &longer.op(keys::cooldown("groq", "k1", None))).unwrap();
        let stored = Cooldown::decode(&kv.get("cooldown:v1:groq:k1").unwrap().unwrap()).unwrap();
        assert_eq!(stored, longer);
    }
}
