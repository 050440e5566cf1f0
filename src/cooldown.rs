//! Provider cool-downs: after a 429 the provider is skipped until its Retry-After has passed, and
//! the deadline lives in the key-value store so every instance honours it, not only the one that
//! was told.
//!
//! The calendar arithmetic here (HTTP dates, RFC 3339 timestamps, the next reset of a provider's
//! day) is written by hand on purpose: the core is compiled to wasm and instantiated per request,
//! so it carries no date-time crate (chrono and friends would add size and start-up time for a
//! few lines of integer arithmetic). Days are counted with Howard Hinnant's `days_from_civil`.

use crate::catalog::Reset;
use crate::kv::{keys, KvOp};
use crate::quota::Class;
use serde::{Deserialize, Serialize};

/// A cool-down is never shorter than this, so a missing or zero Retry-After still spreads load.
pub const MIN_MS: u64 = 1_000;
/// Used when a 429 carries no hint at all.
pub const DEFAULT_MS: u64 = 10_000;
/// Free tiers reset daily at worst; nothing should bench a provider for longer. 25 hours, not
/// 24: the Pacific day that ends daylight saving time is 25 hours long, and a daily cap spent
/// at its first minute waits that long for Gemini's reset.
pub const MAX_MS: u64 = 25 * HOUR_MS;

const SECOND_MS: i64 = 1_000;
const HOUR_MS: u64 = 3_600_000;

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

    /// A cool-down until the instant `until_ms` (a daily reset), clamped like [`Cooldown::new`].
    pub fn until(now_ms: u64, until_ms: u64, status: u16) -> Self {
        Self::new(now_ms, until_ms.saturating_sub(now_ms), status)
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

/// The cool-down key a failure of a request of `class` writes: the shared one
/// ([`keys::cooldown`]) for a foreground request, the background-only one
/// ([`keys::cooldown_bg`]) for a background request, so a limit a client's housekeeping ran
/// into never refuses the user's own request locally (that request is sent, and a 429 it gets
/// cools the key for everyone). A refused key (401/403) is the key's fault, not the request's:
/// the caller writes it under the shared key whatever the class.
pub fn key(provider: &str, key_id: &str, ledger: Option<&str>, class: Class) -> String {
    match class {
        Class::Foreground => keys::cooldown(provider, key_id, ledger),
        Class::Background => keys::cooldown_bg(provider, key_id, ledger),
    }
}

/// The cool-down keys a request of `class` honours for `key_id` of `provider`: the shared ones
/// (the key's own, then its ledger's, when it has one), then, for a background request, the
/// background-only ones in the same order.
pub fn keys_read(provider: &str, key_id: &str, ledger: Option<&str>, class: Class) -> Vec<String> {
    let classes: &[Class] = match class {
        Class::Foreground => &[Class::Foreground],
        Class::Background => &[Class::Foreground, Class::Background],
    };
    classes
        .iter()
        .flat_map(|c| {
            std::iter::once(key(provider, key_id, None, *c))
                .chain(ledger.map(|l| key(provider, key_id, Some(l), *c)))
        })
        .collect()
}

/// A stored cool-down ranks by its deadline.
fn until_rank(bytes: &[u8]) -> Option<u64> {
    Cooldown::decode(bytes).map(|c| c.until_ms)
}

/// How long a 429 asks us to wait, in ms: its headers (see [`header_wait_ms`]), else the
/// default.
pub fn wait_ms(retry_after: Option<&str>, ratelimit_resets: &[&str], now_ms: u64) -> u64 {
    header_wait_ms(retry_after, ratelimit_resets, now_ms).unwrap_or(DEFAULT_MS)
}

/// The wait a 429's headers ask for, in ms, if they say: `Retry-After` (seconds or an HTTP
/// date; a date already past asks for no wait, which the cool-down raises to [`MIN_MS`]), else
/// the longest of the providers' reset headers ([`reset_wait_ms`]).
pub fn header_wait_ms(
    retry_after: Option<&str>,
    ratelimit_resets: &[&str],
    now_ms: u64,
) -> Option<u64> {
    if let Some(ms) = retry_after.and_then(|r| retry_after_ms(r, now_ms)) {
        return Some(ms);
    }
    ratelimit_resets
        .iter()
        .filter_map(|r| reset_wait_ms(r, now_ms))
        .max()
}

/// `Retry-After`: (possibly fractional) seconds, or an HTTP date (RFC 9110 §10.2.3), as the wait
/// from `now_ms` in ms.
pub fn retry_after_ms(value: &str, now_ms: u64) -> Option<u64> {
    parse_seconds(value).or_else(|| parse_http_date(value).map(|at| at.saturating_sub(now_ms)))
}

/// A reset header as the wait from `now_ms`, in ms: a Go-style duration (`6m30s`, Groq and
/// OpenAI's `x-ratelimit-reset-*`), an RFC 3339 timestamp (Anthropic's
/// `anthropic-ratelimit-*-reset`), or a bare number: a Unix time in ms or s when it is that
/// large (OpenRouter's `X-RateLimit-Reset` is ms), else seconds to wait.
pub fn reset_wait_ms(value: &str, now_ms: u64) -> Option<u64> {
    parse_duration(value)
        .or_else(|| parse_instant(value).map(|at| at.saturating_sub(now_ms)))
        .or_else(|| parse_seconds(value))
}

/// An absolute reset time as Unix ms: an RFC 3339 timestamp, or a bare Unix time in ms (13+
/// digits) or seconds (10+ digits). Smaller numbers are not instants.
pub fn parse_instant(value: &str) -> Option<u64> {
    let v = value.trim();
    if let Ok(n) = v.parse::<u64>() {
        return match n {
            1_000_000_000_000.. => Some(n),
            1_000_000_000.. => n.checked_mul(1_000),
            _ => None,
        };
    }
    parse_rfc3339(v)
}

/// (Possibly fractional) seconds as ms; negative, infinite or non-numeric: `None`.
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

// ---------------------------------------------------------------------------------------------
// Dates

/// An HTTP date (RFC 9110 §5.6.7) as Unix ms: the preferred IMF-fixdate
/// (`Sun, 06 Nov 1994 08:49:37 GMT`) and the two obsolete forms, RFC 850
/// (`Sunday, 06-Nov-94 08:49:37 GMT`, two-digit years below 70 read as 20xx) and asctime
/// (`Sun Nov  6 08:49:37 1994`). The weekday is not checked. Dates before 1970 read as 0.
pub fn parse_http_date(s: &str) -> Option<u64> {
    let (weekday, rest) = s.trim().split_once(' ')?;
    let weekday = weekday.strip_suffix(',').unwrap_or(weekday);
    if weekday.is_empty() || !weekday.bytes().all(|b| b.is_ascii_alphabetic()) {
        return None;
    }
    let parts: Vec<&str> = rest.split_whitespace().collect();
    let (year, month, day, time) = match parts.as_slice() {
        // IMF-fixdate: `06 Nov 1994 08:49:37 GMT`.
        [d, m, y, t, zone] if is_gmt(zone) && y.len() == 4 => {
            (y.parse().ok()?, month_number(m)?, number(d)?, *t)
        }
        // RFC 850: `06-Nov-94 08:49:37 GMT`.
        [dmy, t, zone] if is_gmt(zone) => {
            let mut f = dmy.split('-');
            let (d, m, y) = (f.next()?, f.next()?, f.next()?);
            if f.next().is_some() || y.len() != 2 {
                return None;
            }
            let y: i64 = y.parse().ok()?;
            (
                if y < 70 { 2000 + y } else { 1900 + y },
                month_number(m)?,
                number(d)?,
                *t,
            )
        }
        // asctime: `Nov  6 08:49:37 1994`.
        [m, d, t, y] if y.len() == 4 => (y.parse().ok()?, month_number(m)?, number(d)?, *t),
        _ => return None,
    };
    let mut hms = time.split(':');
    let (h, mi, sec) = (hms.next()?, hms.next()?, hms.next()?);
    if hms.next().is_some() || [h, mi, sec].iter().any(|f| f.len() != 2) {
        return None;
    }
    let ms = unix_ms(year, month, day, number(h)?, number(mi)?, number(sec)?)?;
    Some(ms.max(0) as u64)
}

fn is_gmt(zone: &str) -> bool {
    zone.eq_ignore_ascii_case("GMT") || zone.eq_ignore_ascii_case("UTC")
}

/// An RFC 3339 timestamp (`2026-11-21T07:28:00Z`, `…00.5+01:00`) as Unix ms; dates before 1970
/// read as 0.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let s = s.trim();
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let field = |r: std::ops::Range<usize>| s.get(r).and_then(number);
    let year = i64::from(field(0..4)?);
    let mut ms = unix_ms(
        year,
        field(5..7)?,
        field(8..10)?,
        field(11..13)?,
        field(14..16)?,
        field(17..19)?,
    )?;
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        // Milliseconds: the first three digits, padded ("5" is 500 ms).
        let kept = &frac[..digits.min(3)];
        ms += i64::from(number(kept)?) * 10_i64.pow(3 - kept.len() as u32);
        rest = &frac[digits..];
    }
    let offset_ms = if rest.eq_ignore_ascii_case("z") {
        0
    } else {
        let sign = match rest.as_bytes().first()? {
            b'+' => 1,
            b'-' => -1,
            _ => return None,
        };
        let (h, m) = rest[1..].split_once(':')?;
        if h.len() != 2 || m.len() != 2 {
            return None;
        }
        let (h, m) = (number(h)?, number(m)?);
        if h > 23 || m > 59 {
            return None;
        }
        sign * i64::from(h * 60 + m) * 60 * SECOND_MS
    };
    Some((ms - offset_ms).max(0) as u64)
}

/// A field of ASCII digits (no sign).
fn number(s: &str) -> Option<u32> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

fn month_number(name: &str) -> Option<u32> {
    const MONTHS: [&str; 12] = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    let i = MONTHS.iter().position(|m| m.eq_ignore_ascii_case(name))?;
    Some(i as u32 + 1)
}

/// A validated UTC calendar time as Unix ms (negative before 1970). A leap second (`:60`) reads
/// as the next second.
fn unix_ms(year: i64, month: u32, day: u32, h: u32, m: u32, s: u32) -> Option<i64> {
    if !(1..=12).contains(&month)
        || day == 0
        || day > days_in_month(year, month)
        || h > 23
        || m > 59
        || s > 60
    {
        return None;
    }
    let secs = crate::quota::days_from_civil(year, month, day) * 86_400
        + i64::from(h) * 3_600
        + i64::from(m) * 60
        + i64::from(s);
    Some(secs * SECOND_MS)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// The next reset of a provider's day strictly after `now_ms` (Unix ms): the next UTC midnight,
/// or the next midnight in America/Los_Angeles, daylight saving time included (so 07:00 or
/// 08:00 UTC) — the instant a spent daily cap comes back, for the cool-down. The quota module
/// counts the same days; it owns the calendar arithmetic.
pub fn next_reset_ms(reset: Reset, now_ms: u64) -> u64 {
    crate::quota::next_reset_ms(reset, now_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix ms of a UTC calendar time (checked against fixed values in `calendar_arithmetic`).
    fn utc(y: i64, mo: u32, d: u32, h: u32, mi: u32) -> u64 {
        unix_ms(y, mo, d, h, mi, 0).unwrap() as u64
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(wait_ms(Some("7"), &[], 0), 7_000);
        assert_eq!(wait_ms(Some(" 1.5 "), &[], 0), 1_500);
        assert_eq!(wait_ms(None, &["6m30s", "2s"], 0), 390_000);
        assert_eq!(wait_ms(None, &["garbage"], 0), DEFAULT_MS);
        assert_eq!(header_wait_ms(None, &[], 0), None);
        assert_eq!(parse_duration("1h2m3.5s"), Some(3_723_500));
        assert_eq!(parse_duration("5x"), None);
        assert_eq!(retry_after_ms("-3", 0), None);
    }

    #[test]
    fn retry_after_as_an_http_date_waits_until_that_instant() {
        let now = utc(2026, 10, 21, 7, 27);
        // IMF-fixdate, and the two obsolete forms (RFC 850, asctime).
        for date in [
            "Wed, 21 Oct 2026 07:28:00 GMT",
            "Wednesday, 21-Oct-26 07:28:00 GMT",
            "Wed Oct 21 07:28:00 2026",
        ] {
            assert_eq!(parse_http_date(date), Some(1_792_567_680_000), "{date}");
            assert_eq!(wait_ms(Some(date), &["250ms"], now), 60_000, "{date}");
        }
        assert_eq!(
            parse_http_date("Sun Nov  6 08:49:37 1994"),
            Some(784_111_777_000)
        );
        assert_eq!(
            parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"),
            Some(784_111_777_000)
        );
        // A date already past asks for no wait: the cool-down's minimum, not the other hints.
        let past = wait_ms(Some("Wed, 21 Oct 2015 07:28:00 GMT"), &["250ms"], now);
        assert_eq!(past, 0);
        assert_eq!(Cooldown::new(now, past, 429).until_ms, now + MIN_MS);
        // Not dates: fall through to the reset headers.
        for junk in [
            "Wed, 32 Oct 2026 07:28:00 GMT",
            "Wed, 29 Feb 2026 07:28:00 GMT",
            "Wed, 21 Foo 2026 07:28:00 GMT",
            "Wed, 21 Oct 2026 24:00:00 GMT",
            "Wed, 21 Oct 2026 07:28:00 CET",
            "Wed, 21 Oct 2026 7:28:00 GMT",
            "21 Oct 2026 07:28:00 GMT",
            "soon",
            "",
        ] {
            assert_eq!(parse_http_date(junk), None, "{junk}");
            assert_eq!(wait_ms(Some(junk), &["250ms"], now), 250, "{junk}");
        }
        assert_eq!(
            parse_http_date("Thu, 29 Feb 2024 00:00:00 GMT"),
            Some(utc(2024, 2, 29, 0, 0))
        );
    }

    #[test]
    fn reset_headers_take_durations_timestamps_and_unix_times() {
        let now = utc(2026, 11, 21, 7, 0);
        // Anthropic's anthropic-ratelimit-*-reset: RFC 3339.
        assert_eq!(reset_wait_ms("2026-11-21T07:00:30Z", now), Some(30_000));
        assert_eq!(
            reset_wait_ms("2026-11-21T08:00:30.25+01:00", now),
            Some(30_250)
        );
        assert_eq!(
            reset_wait_ms("2026-11-21t06:00:30.5-01:00", now),
            Some(30_500)
        );
        assert_eq!(reset_wait_ms("2026-11-21T06:59:00Z", now), Some(0));
        assert_eq!(wait_ms(None, &["2026-11-21T07:01:00Z", "20s"], now), 60_000);
        // Unix times (OpenRouter's X-RateLimit-Reset is ms), small numbers are seconds.
        assert_eq!(reset_wait_ms(&(now + 5_000).to_string(), now), Some(5_000));
        assert_eq!(
            reset_wait_ms(&(now / 1000 + 9).to_string(), now),
            Some(9_000)
        );
        assert_eq!(reset_wait_ms("12", now), Some(12_000));
        assert_eq!(parse_instant("12"), None);
        for junk in [
            "2026-11-21T07:00:30",
            "2026-13-21T07:00:30Z",
            "2026-11-21T07:00:30.Z",
            "2026-11-21T07:00:30+1:00",
            "2026-11-21 07:00",
        ] {
            assert_eq!(parse_rfc3339(junk), None, "{junk}");
        }
    }

    #[test]
    fn calendar_arithmetic() {
        assert_eq!(utc(2026, 3, 8, 8, 0), 1_772_956_800_000);
        assert_eq!(utc(2026, 11, 1, 7, 0), 1_793_516_400_000);
    }

    #[test]
    fn next_utc_midnight() {
        let r = |now| next_reset_ms(Reset::UtcMidnight, now);
        assert_eq!(r(utc(2026, 11, 21, 7, 28)), utc(2026, 11, 22, 0, 0));
        assert_eq!(r(utc(2026, 12, 31, 23, 59)), utc(2027, 1, 1, 0, 0));
        // At midnight exactly, the reset that just happened is not "next".
        assert_eq!(r(utc(2026, 11, 22, 0, 0)), utc(2026, 11, 23, 0, 0));
        assert_eq!(r(0), 86_400_000);
    }

    #[test]
    fn next_pacific_midnight_follows_daylight_saving_time() {
        let r = |now| next_reset_ms(Reset::PacificMidnight, now);
        // Summer (PDT, UTC-7) and winter (PST, UTC-8).
        assert_eq!(r(utc(2026, 7, 4, 12, 0)), utc(2026, 7, 5, 7, 0));
        assert_eq!(r(utc(2026, 1, 15, 12, 0)), utc(2026, 1, 16, 8, 0));
        // Late evening in California is already the next UTC day.
        assert_eq!(r(utc(2026, 12, 31, 23, 0)), utc(2027, 1, 1, 8, 0));
        assert_eq!(r(utc(2027, 1, 1, 7, 59)), utc(2027, 1, 1, 8, 0));
        // Spring forward, Sunday 8 March 2026: its midnight is still PST (08:00 UTC); the day is
        // 23 hours long and the next midnight is PDT (07:00 UTC).
        assert_eq!(r(utc(2026, 3, 8, 7, 59)), utc(2026, 3, 8, 8, 0));
        assert_eq!(r(utc(2026, 3, 8, 8, 0)), utc(2026, 3, 9, 7, 0));
        assert_eq!(r(utc(2026, 3, 8, 9, 59)), utc(2026, 3, 9, 7, 0));
        assert_eq!(r(utc(2026, 3, 8, 10, 0)), utc(2026, 3, 9, 7, 0));
        // Fall back, Sunday 1 November 2026: its midnight is still PDT (07:00 UTC); the day is
        // 25 hours long and the next midnight is PST (08:00 UTC).
        assert_eq!(r(utc(2026, 11, 1, 6, 59)), utc(2026, 11, 1, 7, 0));
        assert_eq!(r(utc(2026, 11, 1, 7, 0)), utc(2026, 11, 2, 8, 0));
        assert_eq!(r(utc(2026, 11, 1, 8, 30)), utc(2026, 11, 2, 8, 0));
        assert_eq!(r(utc(2026, 11, 1, 9, 30)), utc(2026, 11, 2, 8, 0));
        assert_eq!(r(utc(2026, 11, 2, 7, 59)), utc(2026, 11, 2, 8, 0));
        assert_eq!(r(utc(2026, 11, 2, 8, 0)), utc(2026, 11, 3, 8, 0));
        // 2027 moves the switches (14 March, 7 November).
        assert_eq!(r(utc(2027, 3, 8, 12, 0)), utc(2027, 3, 9, 8, 0));
        assert_eq!(r(utc(2027, 3, 14, 12, 0)), utc(2027, 3, 15, 7, 0));
        assert_eq!(r(utc(2027, 11, 2, 12, 0)), utc(2027, 11, 3, 7, 0));
        assert_eq!(r(utc(2027, 11, 7, 12, 0)), utc(2027, 11, 8, 8, 0));
        // The whole of 2026, every 10 minutes: the next midnight is ahead, at 07:00 or 08:00
        // UTC, never more than 25 hours away (so a cool-down until then is not clamped).
        let mut now = utc(2026, 1, 1, 0, 0);
        while now < utc(2027, 1, 1, 0, 0) {
            let next = r(now);
            assert!(next > now && next - now <= MAX_MS, "{now}");
            assert!(
                matches!(next % 86_400_000, 25_200_000 | 28_800_000),
                "{now}"
            );
            assert!(r(next - 1) == next && r(next) > next, "{now}");
            now += 600_000;
        }
        // 1970 (Gemini tests use tiny clocks): PST.
        assert_eq!(r(10_000), 8 * 3_600_000);
    }

    #[test]
    fn a_cooldown_until_an_instant() {
        assert_eq!(Cooldown::until(1_000, 90_000, 429).until_ms, 90_000);
        assert_eq!(Cooldown::until(1_000, 500, 429).until_ms, 1_000 + MIN_MS);
        let fall_back = utc(2026, 11, 1, 7, 0);
        let reset = next_reset_ms(Reset::PacificMidnight, fall_back);
        assert_eq!(Cooldown::until(fall_back, reset, 429).until_ms, reset);
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
    fn background_cool_downs_have_keys_of_their_own_read_by_background_requests_only() {
        let fg = keys_read("groq", "k1", Some("m:x"), Class::Foreground);
        assert_eq!(fg, ["cooldown:v1:groq:k1", "cooldown:v1:groq:k1:m:x"]);
        let bg = keys_read("groq", "k1", Some("m:x"), Class::Background);
        assert_eq!(
            bg,
            [
                "cooldown:v1:groq:k1",
                "cooldown:v1:groq:k1:m:x",
                "cooldown:v1:bg:groq:k1",
                "cooldown:v1:bg:groq:k1:m:x"
            ]
        );
        assert_eq!(
            keys_read("nvidia", "k1", None, Class::Background),
            ["cooldown:v1:nvidia:k1", "cooldown:v1:bg:nvidia:k1"]
        );
        assert_eq!(
            key("groq", "k1", None, Class::Background),
            keys::cooldown_bg("groq", "k1", None)
        );
        // A background key never equals a foreground one, whatever the model is called.
        for ledger in [None, Some("bg"), Some("x:bg"), Some("bg:groq:k1")] {
            let ours = key("groq", "k1", ledger, Class::Background);
            for l in [None, Some("bg"), Some("x:bg"), Some("bg:groq:k1")] {
                assert_ne!(ours, key("groq", "k1", l, Class::Foreground));
            }
        }
        let doc = include_str!("../kv-schema/README.md");
        assert!(doc.contains("`cooldown:v1:bg:<provider>:<key-id>:<ledger>`"));
        assert!(doc.contains("`cooldown:v1:bg:<provider>:<key-id>`"));
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
