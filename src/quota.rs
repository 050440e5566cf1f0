//! Free-tier quotas spent without ever being told 429: for every provider key and ledger, the
//! documented (or overridden) requests and tokens per minute and per day are counted in the
//! key-value store with its atomic increment, and a key at its limit is skipped before any
//! request is sent.
//!
//! # Counters
//!
//! One counter per limit kind ([`Kind`]) and per (provider, key, ledger), named by
//! [`keys::quota`]: `quota:v1:<provider>:<key-id>:<ledger>:<kind>`. Its value is the store's i64
//! counter, **tagged with its window**: `window × 2^36 + count` ([`encode`]), where the window is
//! the minute index (`now_ms / 60_000`) for `rpm`/`tpm` and the provider's day index
//! ([`day_index`]) for `rpd`/`tpd`. A value whose tag is older than the current window counts as
//! zero, and the first increment of a new window, which lands on it, replaces it with a
//! compare-and-swap ([`perform`]).
//!
//! The window is in the value rather than in the key name so that the number of keys is bounded
//! by construction: at most four per key and ledger, each overwritten, never accumulated. (With
//! one key per window, a window followed by two idle ones is never cleaned up by a
//! "delete window − 2 at the next window's first request" rule, and sparse traffic — the usual
//! free-tier pattern — would leave an orphan per active minute forever.)
//!
//! # Exactness
//!
//! Request counters (`rpm`, `rpd`) are reserved before an attempt is sent: the component
//! increments them and sends only if every new count is within its limit ([`admit`]). Because the
//! increment is atomic, no more than the limit are ever admitted in one window, across any number
//! of concurrent instances (the stale-window reset preserves this: see [`perform`]). Token
//! counters (`tpm`, `tpd`) are best effort: a request's estimate is checked against what has been
//! counted ([`check`]), and the real usage is counted when the answer reports it
//! ([`record_usage`]), so requests in flight at the same time do not see each other's tokens. The
//! provider's own 429 (and the cool-down it causes) remains the backstop for those.
//!
//! Windows are fixed and aligned to the clock; a provider that counts over a sliding minute may
//! still refuse a burst that straddles a minute boundary (the cool-down handles it).
//!
//! # Classes
//!
//! A request is [`Class::Foreground`] (the user's own message) or [`Class::Background`] (a
//! client's housekeeping: titles, tags, follow-ups, autocomplete). A background request may use
//! only part of each window: it is admitted only while every counter stays within
//! `(1 − reserve) × limit`, rounded down ([`Share::cap`]; `reserve` is `background_reserve`,
//! 0.25 by default), so the rest of every quota is kept for foreground requests. A background
//! request that finds a counter at its share but under the limit gets
//! [`Verdict::ShareSpent`]: it skips the key and writes no cool-down (the key is still open to
//! foreground requests). A background reservation refused at its share is undone at once
//! ([`admit_minute`]), so refused background requests never spend the reserve; in the instant
//! between its increment and its undo it is counted, so at a window's very last foreground
//! requests a racing foreground reservation can be told the window is full, the same race two
//! foreground requests have with each other.

use crate::catalog::{Limits, Reset};
use crate::config::Configured;
use crate::cooldown::Cooldown;
use crate::counter;
use crate::kv::{keys, Kv, KvOp, KvResult};
use serde::{Deserialize, Serialize};

/// A request's priority class: the user's own request, or a client's housekeeping that must
/// never starve it. Decided by the profiler; the quota share ([`Share`]) and the cool-down keys
/// a failure writes ([`crate::cooldown::key`]) follow it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// The user's own request: the whole of every quota, the shared cool-downs.
    #[default]
    Foreground,
    /// A client's housekeeping (title, tags, follow-ups, autocomplete, query generation): part
    /// of every quota, and cool-downs of its own.
    Background,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Foreground => "foreground",
            Class::Background => "background",
        }
    }
}

/// `background_reserve` when unset: a quarter of every window is kept for foreground requests.
pub const DEFAULT_BACKGROUND_RESERVE: f64 = 0.25;
/// The largest `background_reserve` accepted: background requests keep at least a tenth.
pub const MAX_BACKGROUND_RESERVE: f64 = 0.9;

/// How much of each quota window a request may use: its class, and the fraction of every limit
/// kept from background requests (`background_reserve`; see
/// [`crate::config::Config::share`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Share {
    pub class: Class,
    /// In 0..=1; only background requests are held to it.
    pub reserve: f64,
}

impl Share {
    /// A foreground request: the whole of every limit.
    pub const FOREGROUND: Share = Share {
        class: Class::Foreground,
        reserve: 0.0,
    };

    pub fn new(class: Class, reserve: f64) -> Self {
        Self { class, reserve }
    }

    /// The most a counter may hold, this request included, for the request to be admitted:
    /// `limit` for a foreground request; `(1 − reserve) × limit` rounded down for a background
    /// one (so a limit of 1 keeps its one request for the foreground).
    pub fn cap(self, limit: u32) -> u64 {
        let limit = u64::from(limit);
        match self.class {
            Class::Foreground => limit,
            Class::Background => {
                let kept = (1.0 - self.reserve.clamp(0.0, 1.0)) * limit as f64;
                // The epsilon keeps 0.7 × 100 at 70 despite binary fractions.
                ((kept + 1e-9).floor() as u64).min(limit)
            }
        }
    }
}

/// What a counter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Requests per minute.
    Rpm,
    /// Requests per day.
    Rpd,
    /// Tokens (prompt + completion) per minute.
    Tpm,
    /// Tokens per day.
    Tpd,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Rpm, Kind::Rpd, Kind::Tpm, Kind::Tpd];

    /// The `<kind>` segment of the counter's key.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Rpm => "rpm",
            Kind::Rpd => "rpd",
            Kind::Tpm => "tpm",
            Kind::Tpd => "tpd",
        }
    }

    /// Counted over the provider's day (else over the minute).
    pub fn per_day(self) -> bool {
        matches!(self, Kind::Rpd | Kind::Tpd)
    }

    /// Counts tokens (else requests).
    pub fn counts_tokens(self) -> bool {
        matches!(self, Kind::Tpm | Kind::Tpd)
    }
}

/// One quota ledger of one provider key: what is counted, against which limits, when days start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaRef<'a> {
    /// Catalogue id of the provider.
    pub provider: &'a str,
    /// The key's fingerprint ([`crate::config::ApiKey::id`]), never the key.
    pub key_id: &'a str,
    /// The model id or `@<pool>` where the provider limits per model or per pool; `None` where
    /// it limits per key (written `*` in the key name). As `route::Candidate::ledger`.
    pub ledger: Option<&'a str>,
    /// The limits with the deployment's overrides applied ([`Configured::model_info`]).
    pub limits: Limits,
    pub reset: Reset,
}

impl<'a> QuotaRef<'a> {
    /// The ledger `ledger` of key `key_id` for `model` on a configured provider (limits with the
    /// deployment's `<id>_rpm`… overrides).
    pub fn of(c: &'a Configured, model: &str, ledger: Option<&'a str>, key_id: &'a str) -> Self {
        Self {
            provider: c.provider.id,
            key_id,
            ledger,
            limits: c.model_info(model).limits,
            reset: c.provider.reset,
        }
    }

    /// The limit of this kind, if any is documented or configured.
    pub fn limit(&self, kind: Kind) -> Option<u32> {
        match kind {
            Kind::Rpm => self.limits.rpm,
            Kind::Rpd => self.limits.rpd,
            Kind::Tpm => self.limits.tpm,
            Kind::Tpd => self.limits.tpd,
        }
    }

    /// The kinds that have a limit, with it, in [`Kind::ALL`] order.
    pub fn limited(&self) -> impl Iterator<Item = (Kind, u32)> + '_ {
        Kind::ALL
            .into_iter()
            .filter_map(|k| self.limit(k).map(|l| (k, l)))
    }

    /// The counter's key ([`keys::quota`]).
    pub fn key(&self, kind: Kind) -> String {
        keys::quota(self.provider, self.key_id, self.ledger, kind.as_str())
    }

    /// The window `now_ms` falls in for this kind: the minute index, or the provider's day index.
    pub fn window(&self, kind: Kind, now_ms: u64) -> u64 {
        if kind.per_day() {
            day_index(self.reset, now_ms)
        } else {
            now_ms / MINUTE_MS
        }
    }

    /// When the window `now_ms` falls in ends (Unix ms): the next minute, or the provider's next
    /// midnight ([`next_reset_ms`]).
    pub fn window_end_ms(&self, kind: Kind, now_ms: u64) -> u64 {
        if kind.per_day() {
            next_reset_ms(self.reset, now_ms)
        } else {
            (now_ms / MINUTE_MS + 1) * MINUTE_MS
        }
    }
}

/// The counters to read before the first attempt (in the same batched `get_many` as the
/// cool-downs), for the kinds that have a limit only; [`check`] takes their values in this order.
/// Kinds without a limit are neither read nor written, and never exhaust.
pub fn counter_keys(q: &QuotaRef) -> Vec<(Kind, String)> {
    q.limited().map(|(k, _)| (k, q.key(k))).collect()
}

/// Whether a request may be sent on a key and ledger, judged from its counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Open,
    /// A counter is at its limit: no request at all fits until `until_ms`, the end of its window.
    /// This holds for every request, so it may be recorded as a cool-down ([`Self::cooldown`]).
    Exhausted {
        kind: Kind,
        until_ms: u64,
    },
    /// This request's token estimate does not fit in what is left of a token limit; a smaller
    /// request might. Skip the key for this request only: never record it as a cool-down.
    /// `until_ms` is the end of the window, or `None` when the estimate alone exceeds the limit
    /// (it will never fit on this key and ledger). For a background request, the limit is its
    /// share ([`Share::cap`]).
    TooLarge {
        kind: Kind,
        until_ms: Option<u64>,
    },
    /// Background requests only: a counter is at the background share of its limit
    /// ([`Share::cap`]) but under the limit itself. Background requests skip the key until
    /// `until_ms`, the end of the window; foreground requests may still use it, so this is
    /// never recorded as a cool-down.
    ShareSpent {
        kind: Kind,
        until_ms: u64,
    },
}

impl Verdict {
    pub fn is_open(&self) -> bool {
        matches!(self, Verdict::Open)
    }

    /// The cool-down other instances can honour without reading the counters: only for
    /// [`Verdict::Exhausted`], which holds for every request. Written under the ledger's
    /// cool-down key (`keys::cooldown(provider, key_id, ledger)`), like a 429 — or its
    /// background-only twin when a background request found it ([`crate::cooldown::key`]). Never
    /// for [`Verdict::ShareSpent`], which foreground requests must not honour.
    pub fn cooldown(&self) -> Option<Cooldown> {
        match *self {
            Verdict::Exhausted { until_ms, .. } => Some(Cooldown {
                until_ms,
                status: 429,
            }),
            _ => None,
        }
    }

    /// How bad a verdict is: exhausted beats a spent background share beats too large beats
    /// open; then the later end.
    fn severity(&self) -> (u8, u64) {
        match *self {
            Verdict::Open => (0, 0),
            Verdict::TooLarge { until_ms, .. } => (1, until_ms.unwrap_or(u64::MAX)),
            Verdict::ShareSpent { until_ms, .. } => (2, until_ms),
            Verdict::Exhausted { until_ms, .. } => (3, until_ms),
        }
    }

    fn worst(self, other: Verdict) -> Verdict {
        if other.severity() > self.severity() {
            other
        } else {
            self
        }
    }
}

/// Judges a key and ledger before an attempt. `values` are the stored values of
/// [`counter_keys`], in its order (a missing or unreadable value counts as zero, as does a value
/// from an earlier window). A request counts 1 against `rpm`/`rpd`; `estimated_tokens` must fit
/// under `tpm`/`tpd` with what is already counted. The caller computes the estimate: the prompt
/// estimate ([`estimate_prompt_tokens`]), plus the requested maximum output where the provider
/// debits it up front (Cerebras debits input + `max_completion_tokens`). The worst verdict wins:
/// an exhausted counter over one the request does not fit, then the later end.
///
/// `share` holds a background request to its part of each limit ([`Share::cap`]): a counter at
/// the share but under the limit is [`Verdict::ShareSpent`], and its tokens must fit under the
/// share. A foreground request's share is the whole limit.
pub fn check(
    q: &QuotaRef,
    values: &[Option<Vec<u8>>],
    estimated_tokens: u64,
    share: Share,
    now_ms: u64,
) -> Verdict {
    q.limited()
        .enumerate()
        .map(|(i, (kind, limit))| {
            let cap = share.cap(limit);
            let limit = u64::from(limit);
            let stored = values.get(i).and_then(Option::as_deref);
            let count = count_in(q.window(kind, now_ms), stored);
            let until_ms = q.window_end_ms(kind, now_ms);
            if count >= limit {
                Verdict::Exhausted { kind, until_ms }
            } else if count >= cap {
                Verdict::ShareSpent { kind, until_ms }
            } else if !kind.counts_tokens() {
                Verdict::Open
            } else if estimated_tokens > cap {
                Verdict::TooLarge {
                    kind,
                    until_ms: None,
                }
            } else if count + estimated_tokens > cap {
                Verdict::TooLarge {
                    kind,
                    until_ms: Some(until_ms),
                }
            } else {
                Verdict::Open
            }
        })
        .fold(Verdict::Open, Verdict::worst)
}

/// A rough token count for a request body of `body_len_bytes`: one token per 4 bytes, rounded
/// up. No tokenizer runs in the gateway; English text averages about 4 characters a token and the
/// JSON envelope (keys, roles, quotes, escapes) is counted too, so this leans towards
/// over-estimating, which makes the gateway skip a key slightly early rather than be told 429.
/// (Base64 images are over-counted badly: providers bill images by size, not by bytes.)
pub fn estimate_prompt_tokens(body_len_bytes: usize) -> u64 {
    (body_len_bytes as u64).div_ceil(4)
}

/// One counter increment for the component to perform ([`perform`]): the key, the amount, and
/// what the new value means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Increment {
    pub kind: Kind,
    pub key: String,
    pub delta: i64,
    /// The window the increment belongs to.
    pub window: u64,
    /// The limit the new count must stay within to admit the request (`None` for usage, which
    /// is counted whatever it is).
    pub limit: Option<u32>,
}

/// What an increment's new value says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    pub kind: Kind,
    /// The count in the window, this increment included.
    pub count: u64,
    /// Within the limit (always true without one).
    pub admitted: bool,
}

impl Increment {
    /// Reads the value `Kv::increment` returned. `None`: the increment landed on a counter of an
    /// earlier window (or on garbage); perform [`Self::reset`] and increment again.
    pub fn settle(&self, new_value: i64) -> Option<Counted> {
        let count = self.windowed().settle(new_value)?;
        Some(Counted {
            kind: self.kind,
            count,
            admitted: self.limit.is_none_or(|l| count <= u64::from(l)),
        })
    }

    /// Starts this increment's window on the counter ([`counter::Windowed::reset`]).
    pub fn reset(&self) -> KvOp {
        self.windowed().reset()
    }

    fn windowed(&self) -> counter::Windowed {
        counter::Windowed {
            key: self.key.clone(),
            delta: self.delta,
            window: self.window,
            layout: counter::QUOTA,
        }
    }
}

/// The request counters to increment before an attempt on this key and ledger: `rpm` then `rpd`,
/// those with a limit, by 1 each. The attempt may be sent only if every one is admitted.
pub fn reserve(q: &QuotaRef, now_ms: u64) -> Vec<Increment> {
    q.limited()
        .filter(|(k, _)| !k.counts_tokens())
        .map(|(kind, limit)| Increment {
            kind,
            key: q.key(kind),
            delta: 1,
            window: q.window(kind, now_ms),
            limit: Some(limit),
        })
        .collect()
}

/// The token counters to increment once an answer reports its usage: `tpm` and `tpd` (those with
/// a limit) by the real total, prompt + completion, in the windows of `now_ms` (the answer's
/// time). Real usage rather than the up-front estimate: it is what the provider ends up
/// counting, and a failed attempt that reports no usage then costs no tokens. Empty when the
/// total is 0.
pub fn usage(
    q: &QuotaRef,
    prompt_tokens: u64,
    completion_tokens: u64,
    now_ms: u64,
) -> Vec<Increment> {
    let total = prompt_tokens.saturating_add(completion_tokens);
    if total == 0 {
        return Vec::new();
    }
    let delta = i64::try_from(total).unwrap_or(i64::MAX);
    q.limited()
        .filter(|(k, _)| k.counts_tokens())
        .map(|(kind, _)| Increment {
            kind,
            key: q.key(kind),
            delta,
            window: q.window(kind, now_ms),
            limit: None,
        })
        .collect()
}

/// Performs one increment ([`counter::perform`]): `Kv::increment`, and if it landed on an
/// earlier window's value (the first request of a window, or the first ever), the window is
/// started by [`Increment::reset`] and the increment made again. Each request is counted exactly
/// once in its window, across instances.
pub fn perform(kv: &(impl Kv + ?Sized), inc: &Increment) -> KvResult<Counted> {
    let count = counter::perform(kv, &inc.windowed())?;
    Ok(Counted {
        kind: inc.kind,
        count,
        admitted: inc.limit.is_none_or(|l| count <= u64::from(l)),
    })
}

/// Reserves one request on a key and ledger ([`reserve`], [`perform`]): [`Verdict::Open`] if the
/// attempt may be sent, else [`Verdict::Exhausted`] for the first counter over its limit, or, for
/// a background request, [`Verdict::ShareSpent`] for the first over its share ([`Share::cap`]).
///
/// A foreground request's refused reservation stays counted. Undoing it would cost a write on
/// the path of a key that is already full and gain nothing: a count goes over the limit only
/// when the window was already full, so the verdict is the same until the window ends. Counters
/// are incremented in order and the first refusal stops: a full minute never spends from the
/// day. The one leftover is an `rpm` count for a request refused by `rpd` — on a key exhausted
/// for the day anyway — so the gateway is at most slightly conservative, never over the limit.
///
/// A background request's refused reservation is undone, every counter this call incremented
/// ([`undo`]): over its share the window is not full for foreground requests, and a count left
/// there would spend the reserve kept for them.
pub fn admit(
    kv: &(impl Kv + ?Sized),
    q: &QuotaRef,
    share: Share,
    now_ms: u64,
) -> KvResult<Verdict> {
    reserve_kinds(kv, q, share, now_ms, |_| true)
}

/// [`admit`], split for speed: reserves only what must be exact before the request leaves —
/// the per-minute count, the one concurrent bursts race for. The per-day count is then added
/// by [`count_in_flight`] while the request is on its way (its limit was checked against the
/// counters read before the first attempt, so at a day's last requests a burst can pass the
/// daily limit by the requests racing for it; the provider's 429 then cools the key until its
/// reset). Saves a store round trip before every request. A background request is held to its
/// share, and its refused reservation undone, as in [`admit`].
pub fn admit_minute(
    kv: &(impl Kv + ?Sized),
    q: &QuotaRef,
    share: Share,
    now_ms: u64,
) -> KvResult<Verdict> {
    reserve_kinds(kv, q, share, now_ms, |k| !k.per_day())
}

/// Performs the request reservations of the kinds `which` keeps, in order, and judges each.
fn reserve_kinds(
    kv: &(impl Kv + ?Sized),
    q: &QuotaRef,
    share: Share,
    now_ms: u64,
    which: impl Fn(Kind) -> bool,
) -> KvResult<Verdict> {
    let mut done: Vec<Increment> = Vec::new();
    for inc in reserve(q, now_ms).into_iter().filter(|i| which(i.kind)) {
        let counted = perform(kv, &inc)?;
        let cap = inc.limit.map_or(u64::MAX, |l| share.cap(l));
        let until_ms = q.window_end_ms(inc.kind, now_ms);
        let verdict = if !counted.admitted {
            Verdict::Exhausted {
                kind: inc.kind,
                until_ms,
            }
        } else if counted.count > cap {
            Verdict::ShareSpent {
                kind: inc.kind,
                until_ms,
            }
        } else {
            done.push(inc);
            continue;
        };
        if share.class == Class::Background {
            done.push(inc);
            for inc in &done {
                undo(kv, inc)?;
            }
        }
        return Ok(verdict);
    }
    Ok(Verdict::Open)
}

/// Takes back an increment [`perform`]ed in its window: `−delta`, unless the window has moved
/// on since (another instance started the next one on the same key), in which case the
/// decrement would borrow from the new window's count and is itself undone. The value before the
/// decrement tells: it must still carry the increment's window with at least `delta` counted.
pub fn undo(kv: &(impl Kv + ?Sized), inc: &Increment) -> KvResult<()> {
    let after = kv.increment(&inc.key, -inc.delta)?;
    let intact = decode(after.saturating_add(inc.delta))
        .is_some_and(|(w, count)| w == inc.window && count >= inc.delta.unsigned_abs());
    if !intact {
        kv.increment(&inc.key, inc.delta)?;
    }
    Ok(())
}

/// The rest of [`admit_minute`]'s reservation: the per-day request count.
pub fn count_in_flight(kv: &(impl Kv + ?Sized), q: &QuotaRef, now_ms: u64) -> KvResult<()> {
    for inc in reserve(q, now_ms).iter().filter(|i| i.kind.per_day()) {
        perform(kv, inc)?;
    }
    Ok(())
}

/// Counts an answer's tokens ([`usage`], [`perform`]).
pub fn record_usage(
    kv: &(impl Kv + ?Sized),
    q: &QuotaRef,
    prompt_tokens: u64,
    completion_tokens: u64,
    now_ms: u64,
) -> KvResult<()> {
    for inc in usage(q, prompt_tokens, completion_tokens, now_ms) {
        perform(kv, &inc)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Counter encoding.

/// Bits of a stored value that hold the count; the bits above hold the window.
pub const COUNT_BITS: u32 = counter::QUOTA_BITS;
/// The largest window a tag holds (27 bits: minute indices until the year 2225).
pub const MAX_WINDOW: u64 = counter::QUOTA.max_window();

/// A stored counter value: `window × 2^36 + count` (non-negative; a count past 2^36 ≈ 6.9e10 in
/// one window would spill into the tag, far beyond any limit).
pub fn encode(window: u64, count: u64) -> i64 {
    counter::QUOTA.encode(window, count)
}

/// (window, count) of a stored counter value; `None` for a negative value (never written by us).
pub fn decode(value: i64) -> Option<(u64, u64)> {
    counter::QUOTA.decode(value)
}

/// The count a stored value holds for `window`: zero when absent, unreadable or from an earlier
/// window.
fn count_in(window: u64, stored: Option<&[u8]>) -> u64 {
    counter::QUOTA.count_in(window, stored)
}

// ---------------------------------------------------------------------------------------------
// Days.

const MINUTE_MS: u64 = 60_000;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;
/// Times are clamped to 0000-01-01..10000-01-01 so the date arithmetic cannot overflow.
const MAX_MS: i64 = 253_402_300_800_000;

/// The index of the provider's day containing `now_ms`: days since 1970-01-01 in the zone where
/// its daily limits reset (UTC, or America/Los_Angeles). Instants before the first Pacific
/// midnight after the epoch count as day 0.
pub fn day_index(reset: Reset, now_ms: u64) -> u64 {
    local_day(reset, clamp(now_ms)).max(0) as u64
}

/// When the provider's day containing `now_ms` began (Unix ms): the last midnight of its zone at
/// or before `now_ms`.
pub fn day_start_ms(reset: Reset, now_ms: u64) -> u64 {
    day_start(reset, local_day(reset, clamp(now_ms))).max(0) as u64
}

/// The provider's next midnight strictly after `now_ms` (Unix ms): when its per-day limits
/// start again.
pub fn next_reset_ms(reset: Reset, now_ms: u64) -> u64 {
    day_start(reset, local_day(reset, clamp(now_ms)) + 1).max(0) as u64
}

fn clamp(now_ms: u64) -> i64 {
    i64::try_from(now_ms).unwrap_or(i64::MAX).min(MAX_MS)
}

/// The local date index of the instant `t`.
fn local_day(reset: Reset, t: i64) -> i64 {
    match reset {
        Reset::UtcMidnight => t.div_euclid(DAY_MS),
        Reset::PacificMidnight => (t + pacific_offset_ms(t)).div_euclid(DAY_MS),
    }
}

/// The instant (Unix ms) local date `day` begins.
fn day_start(reset: Reset, day: i64) -> i64 {
    match reset {
        Reset::UtcMidnight => day * DAY_MS,
        Reset::PacificMidnight => {
            // Clocks change at 02:00, so a midnight is daylight time exactly on the days after
            // the spring change up to and including the autumn change day.
            let (y, _, _) = civil_from_days(day);
            let dst = nth_sunday(y, 3, 2) < day && day <= nth_sunday(y, 11, 1);
            day * DAY_MS + if dst { 7 * HOUR_MS } else { 8 * HOUR_MS }
        }
    }
}

/// The offset of Pacific time from UTC at the instant `t`: −7 h during daylight saving time,
/// else −8 h.
///
/// The US rule (since 2007) is written out by hand: daylight time from the second Sunday of
/// March at 02:00 standard time (10:00 UTC) to the first Sunday of November at 02:00 daylight time
/// (09:00 UTC). A time zone database is too heavy for a wasm component instantiated per request,
/// and one zone's rule is all the catalogue needs; should Congress change it, this is the place.
fn pacific_offset_ms(t: i64) -> i64 {
    // The changes are far from New Year, so the year in standard time is the year that matters.
    let (y, _, _) = civil_from_days((t - 8 * HOUR_MS).div_euclid(DAY_MS));
    let start = nth_sunday(y, 3, 2) * DAY_MS + 10 * HOUR_MS;
    let end = nth_sunday(y, 11, 1) * DAY_MS + 9 * HOUR_MS;
    if (start..end).contains(&t) {
        -7 * HOUR_MS
    } else {
        -8 * HOUR_MS
    }
}

/// The day index of the `n`th Sunday of month `m` of year `y`.
fn nth_sunday(y: i64, m: u32, n: i64) -> i64 {
    let first = days_from_civil(y, m, 1);
    let weekday = (first + 4).rem_euclid(7); // 1970-01-01 was a Thursday; 0 = Sunday
    first + (7 - weekday) % 7 + 7 * (n - 1)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let (m, d) = (i64::from(m), i64::from(d));
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date (year, month, day) of a day index (Howard Hinnant's `civil_from_days`).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Scope;
    use crate::kv::{self, decode_counter, testing, MemKv};
    use std::collections::BTreeSet;
    use std::sync::{Arc, Mutex};

    const H: u64 = 3_600_000;
    const FG: Share = Share::FOREGROUND;

    /// Unix ms of a UTC date and time.
    fn utc(y: i64, m: u32, d: u32, h: u64, min: u64) -> u64 {
        days_from_civil(y, m, d) as u64 * 86_400_000 + h * H + min * 60_000
    }

    fn limits(rpm: Option<u32>, rpd: Option<u32>, tpm: Option<u32>, tpd: Option<u32>) -> Limits {
        Limits {
            rpm,
            rpd,
            tpm,
            tpd,
            scope: Scope::Model,
            source: None,
        }
    }

    fn quota(l: Limits) -> QuotaRef<'static> {
        QuotaRef {
            provider: "groq",
            key_id: "k0123456789",
            ledger: Some("llama-3.3-70b-versatile"),
            limits: l,
            reset: Reset::UtcMidnight,
        }
    }

    fn value(window: u64, count: u64) -> Option<Vec<u8>> {
        Some(encode(window, count).to_le_bytes().to_vec())
    }

    #[test]
    fn hinnant_dates_round_trip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
        for z in -800_000..800_000 {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
        // Verified against the tz database (`TZ=America/Los_Angeles date`).
        assert_eq!(nth_sunday(2026, 3, 2), days_from_civil(2026, 3, 8));
        assert_eq!(nth_sunday(2026, 11, 1), days_from_civil(2026, 11, 1));
        assert_eq!(nth_sunday(2027, 3, 2), days_from_civil(2027, 3, 14));
        assert_eq!(nth_sunday(2027, 11, 1), days_from_civil(2027, 11, 7));
    }

    #[test]
    fn utc_days_and_minutes() {
        let r = Reset::UtcMidnight;
        let midnight = utc(2026, 5, 4, 0, 0);
        assert_eq!(day_start_ms(r, midnight), midnight);
        assert_eq!(next_reset_ms(r, midnight), midnight + 24 * H);
        assert_eq!(day_start_ms(r, midnight - 1), midnight - 24 * H);
        assert_eq!(next_reset_ms(r, midnight - 1), midnight);
        assert_eq!(day_index(r, midnight), days_from_civil(2026, 5, 4) as u64);
        let q = quota(limits(Some(1), Some(1), None, None));
        assert_eq!(q.window(Kind::Rpm, 125_000), 2);
        assert_eq!(q.window_end_ms(Kind::Rpm, 125_000), 180_000);
        assert_eq!(q.window_end_ms(Kind::Rpm, 120_000), 180_000);
        assert_eq!(q.window_end_ms(Kind::Rpd, midnight + 5), midnight + 24 * H);
    }

    #[test]
    fn pacific_days_follow_daylight_saving_time() {
        let r = Reset::PacificMidnight;
        // Winter: midnight PST is 08:00 UTC.
        let jan = utc(2026, 1, 15, 8, 0);
        assert_eq!(jan / 1000, 1_768_464_000);
        assert_eq!(day_start_ms(r, jan), jan);
        assert_eq!(day_start_ms(r, jan - 1), jan - 24 * H);
        assert_eq!(next_reset_ms(r, jan), jan + 24 * H);
        assert_eq!(next_reset_ms(r, jan - 1), jan);
        // 07:59 UTC on Jan 15 is still Jan 14 in Los Angeles; the UTC day has already changed.
        assert_eq!(day_index(r, jan - 1) + 1, day_index(r, jan));
        assert_eq!(
            day_index(Reset::UtcMidnight, jan - 1),
            day_index(Reset::UtcMidnight, jan)
        );
        // Summer: midnight PDT is 07:00 UTC (2026-07-04 00:00 PDT = 1783148400).
        let jul = utc(2026, 7, 4, 7, 0);
        assert_eq!(jul / 1000, 1_783_148_400);
        assert_eq!(day_start_ms(r, jul + 3 * H), jul);
        assert_eq!(next_reset_ms(r, jul), jul + 24 * H);
        // New Year: 2026-01-01 00:00 PST = 1767254400.
        let ny = 1_767_254_400_000;
        assert_eq!(day_start_ms(r, ny + 1), ny);
        assert_eq!(next_reset_ms(r, ny - 1), ny);
        assert_eq!(day_index(r, ny), days_from_civil(2026, 1, 1) as u64);

        // Spring forward, 2026-03-08: a 23-hour day. Midnight PST (1772956800) to the next
        // midnight, PDT (1773039600).
        let mar8 = 1_772_956_800_000;
        let mar9 = 1_773_039_600_000;
        assert_eq!(mar9 - mar8, 23 * H);
        for t in [mar8, mar8 + 1, mar8 + 2 * H, mar8 + 3 * H, mar9 - 1] {
            assert_eq!(day_start_ms(r, t), mar8, "{t}");
            assert_eq!(next_reset_ms(r, t), mar9, "{t}");
        }
        assert_eq!(day_start_ms(r, mar9), mar9);
        assert_eq!(next_reset_ms(r, mar9), mar9 + 24 * H);
        assert_eq!(next_reset_ms(r, mar8 - 1), mar8);
        assert_eq!(day_index(r, mar9 - 1) + 1, day_index(r, mar9));

        // Fall back, 2026-11-01: a 25-hour day. Midnight PDT (1793516400) to the next midnight,
        // PST (1793606400).
        let nov1 = 1_793_516_400_000;
        let nov2 = 1_793_606_400_000;
        assert_eq!(nov2 - nov1, 25 * H);
        for t in [nov1, nov1 + H, nov1 + 2 * H, nov1 + 3 * H, nov2 - 1] {
            assert_eq!(day_start_ms(r, t), nov1, "{t}");
            assert_eq!(next_reset_ms(r, t), nov2, "{t}");
        }
        assert_eq!(day_start_ms(r, nov1 - 1), nov1 - 24 * H);
        assert_eq!(day_start_ms(r, nov2), nov2);
        assert_eq!(next_reset_ms(r, nov2), nov2 + 24 * H);
        assert_eq!(
            day_index(r, nov1 + 24 * H),
            days_from_civil(2026, 11, 1) as u64
        );

        // Every hour of several years: days are 23, 24 or 25 hours long, the next reset is
        // strictly later, and consecutive days have consecutive indices.
        let mut t = utc(2025, 1, 1, 0, 30);
        while t < utc(2029, 1, 1, 0, 0) {
            let (start, next) = (day_start_ms(r, t), next_reset_ms(r, t));
            assert!(start <= t && t < next, "{t}");
            assert!([23 * H, 24 * H, 25 * H].contains(&(next - start)), "{t}");
            assert_eq!(day_index(r, next), day_index(r, t) + 1);
            assert_eq!(day_start_ms(r, next), next);
            t += H;
        }
    }

    #[test]
    fn check_judges_each_limit() {
        let now = 10 * 60_000 + 5;
        let day = day_index(Reset::UtcMidnight, now);
        let q = quota(limits(Some(5), Some(100), Some(6_000), Some(50_000)));
        let keys = counter_keys(&q);
        assert_eq!(
            keys.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            Kind::ALL.to_vec()
        );
        assert_eq!(
            keys[0].1,
            "quota:v1:groq:k0123456789:llama-3.3-70b-versatile:rpm"
        );
        let read = |rpm, rpd, tpm, tpd| {
            [
                value(10, rpm),
                value(day, rpd),
                value(10, tpm),
                value(day, tpd),
            ]
        };

        assert_eq!(check(&q, &read(4, 99, 0, 0), 6_000, FG, now), Verdict::Open);
        assert_eq!(
            check(&q, &read(5, 0, 0, 0), 1, FG, now),
            Verdict::Exhausted {
                kind: Kind::Rpm,
                until_ms: 11 * 60_000
            }
        );
        let next_day = next_reset_ms(Reset::UtcMidnight, now);
        assert_eq!(
            check(&q, &read(0, 100, 0, 0), 1, FG, now),
            Verdict::Exhausted {
                kind: Kind::Rpd,
                until_ms: next_day
            }
        );
        // The day outlasts the minute, and exhaustion outranks a request that does not fit.
        assert_eq!(
            check(&q, &read(5, 100, 5_999, 0), 10, FG, now),
            Verdict::Exhausted {
                kind: Kind::Rpd,
                until_ms: next_day
            }
        );
        assert_eq!(
            check(&q, &read(0, 0, 5_000, 0), 1_001, FG, now),
            Verdict::TooLarge {
                kind: Kind::Tpm,
                until_ms: Some(11 * 60_000)
            }
        );
        assert_eq!(
            check(&q, &read(0, 0, 5_000, 0), 1_000, FG, now),
            Verdict::Open
        );
        assert_eq!(
            check(&q, &read(0, 0, 0, 0), 6_001, FG, now),
            Verdict::TooLarge {
                kind: Kind::Tpm,
                until_ms: None
            }
        );
        assert_eq!(
            check(&q, &read(0, 0, 6_000, 0), 0, FG, now),
            Verdict::Exhausted {
                kind: Kind::Tpm,
                until_ms: 11 * 60_000
            }
        );
        assert_eq!(
            check(&q, &read(0, 0, 0, 49_000), 1_001, FG, now),
            Verdict::TooLarge {
                kind: Kind::Tpd,
                until_ms: Some(next_day)
            }
        );
        // Counts of an earlier window are spent; a later window (a clock ahead) still counts.
        assert_eq!(
            check(&q, &[value(9, 5), None, None, None], 1, FG, now),
            Verdict::Open
        );
        assert!(!check(&q, &[value(11, 5), None, None, None], 1, FG, now).is_open());
        // Missing and unreadable values count as zero.
        assert_eq!(check(&q, &[], 1, FG, now), Verdict::Open);
        assert_eq!(
            check(&q, &[Some(b"junk".to_vec())], 1, FG, now),
            Verdict::Open
        );
        // Only an exhausted counter becomes a cool-down.
        let full = check(&q, &read(5, 0, 0, 0), 1, FG, now);
        assert_eq!(full.cooldown().map(|c| c.until_ms), Some(11 * 60_000));
        assert_eq!(
            check(&q, &read(0, 0, 0, 0), 7_000, FG, now).cooldown(),
            None
        );
    }

    const BG: Share = Share {
        class: Class::Background,
        reserve: 0.25,
    };

    #[test]
    fn a_background_share_is_the_limit_less_the_reserve_rounded_down() {
        assert_eq!(FG.cap(7), 7);
        assert_eq!(BG.cap(4), 3);
        assert_eq!(BG.cap(30), 22);
        assert_eq!(BG.cap(1), 0, "a limit of one is kept for the foreground");
        let bg = |reserve| Share::new(Class::Background, reserve);
        assert_eq!(bg(0.0).cap(30), 30);
        assert_eq!(bg(0.3).cap(100), 70);
        assert_eq!(bg(0.29).cap(100), 71);
        assert_eq!(bg(0.9).cap(10), 1);
        assert_eq!(bg(0.1).cap(u32::MAX), 3_865_470_565);
        assert_eq!(Class::default(), Class::Foreground);
        assert_eq!(
            serde_json::to_string(&[Class::Foreground, Class::Background]).unwrap(),
            r#"["foreground","background"]"#
        );
        assert_eq!(
            serde_json::from_str::<Class>(r#""background""#).unwrap(),
            Class::Background
        );
    }

    #[test]
    fn a_background_request_is_held_to_its_share_of_every_limit() {
        let now = 10 * 60_000 + 5;
        let day = day_index(Reset::UtcMidnight, now);
        let next_day = next_reset_ms(Reset::UtcMidnight, now);
        // Shares: rpm 3 of 4, rpd 75 of 100, tpm 4 500 of 6 000, tpd 37 500 of 50 000.
        let q = quota(limits(Some(4), Some(100), Some(6_000), Some(50_000)));
        let read = |rpm, rpd, tpm, tpd| {
            [
                value(10, rpm),
                value(day, rpd),
                value(10, tpm),
                value(day, tpd),
            ]
        };
        let both = |values: &[Option<Vec<u8>>], tokens| {
            (
                check(&q, values, tokens, FG, now),
                check(&q, values, tokens, BG, now),
            )
        };
        // Below the share: both admitted.
        let (fg, bg) = both(&read(2, 74, 4_000, 37_000), 500);
        assert_eq!((fg, bg), (Verdict::Open, Verdict::Open));
        // Between the share and the limit: background skips the key, foreground does not, and
        // nothing is to be written as a cool-down.
        for (values, kind, until_ms) in [
            (read(3, 0, 0, 0), Kind::Rpm, 11 * 60_000),
            (read(0, 75, 0, 0), Kind::Rpd, next_day),
            (read(0, 0, 4_500, 0), Kind::Tpm, 11 * 60_000),
            (read(0, 0, 0, 37_500), Kind::Tpd, next_day),
        ] {
            let (fg, bg) = both(&values, 1);
            assert_eq!(fg, Verdict::Open, "{kind:?}");
            assert_eq!(bg, Verdict::ShareSpent { kind, until_ms }, "{kind:?}");
            assert_eq!(bg.cooldown(), None);
            assert!(!bg.is_open());
        }
        // At the limit: exhausted for both, and exhaustion outranks a spent share.
        let (fg, bg) = both(&read(4, 75, 0, 0), 1);
        assert_eq!(fg, bg);
        assert_eq!(
            bg,
            Verdict::Exhausted {
                kind: Kind::Rpm,
                until_ms: 11 * 60_000
            }
        );
        assert!(bg.cooldown().is_some());
        // Tokens must fit under the share.
        let (fg, bg) = both(&read(0, 0, 4_000, 0), 501);
        assert_eq!(fg, Verdict::Open);
        assert_eq!(
            bg,
            Verdict::TooLarge {
                kind: Kind::Tpm,
                until_ms: Some(11 * 60_000)
            }
        );
        let (fg, bg) = both(&read(0, 0, 0, 0), 4_501);
        assert_eq!(fg, Verdict::Open);
        assert_eq!(
            bg,
            Verdict::TooLarge {
                kind: Kind::Tpm,
                until_ms: None
            }
        );
    }

    #[test]
    fn a_background_reservation_over_its_share_is_undone_and_the_reserve_stays_foregrounds() {
        let kv = MemKv::default();
        let q = quota(limits(Some(4), None, None, None));
        let now = 5 * 60_000;
        let rpm = |kv: &MemKv| count_in(5, kv.get(&q.key(Kind::Rpm)).unwrap().as_deref());
        for i in 0..3 {
            assert_eq!(
                admit_minute(&kv, &q, BG, now).unwrap(),
                Verdict::Open,
                "{i}"
            );
        }
        let spent = Verdict::ShareSpent {
            kind: Kind::Rpm,
            until_ms: 6 * 60_000,
        };
        for _ in 0..5 {
            assert_eq!(admit_minute(&kv, &q, BG, now).unwrap(), spent);
        }
        assert_eq!(rpm(&kv), 3, "refused background reservations are undone");
        // The reserve is the foreground's, whole.
        assert_eq!(admit_minute(&kv, &q, FG, now).unwrap(), Verdict::Open);
        let exhausted = Verdict::Exhausted {
            kind: Kind::Rpm,
            until_ms: 6 * 60_000,
        };
        assert_eq!(admit_minute(&kv, &q, FG, now).unwrap(), exhausted);
        assert_eq!(admit_minute(&kv, &q, BG, now).unwrap(), exhausted);
        assert_eq!(
            rpm(&kv),
            5,
            "a foreground refusal stays counted, a background one not"
        );
        // The next minute starts again.
        assert_eq!(
            admit_minute(&kv, &q, BG, now + 60_000).unwrap(),
            Verdict::Open
        );

        // The whole reservation: a background request refused by the day takes back its minute.
        let kv = MemKv::default();
        let q = quota(limits(Some(100), Some(4), None, None));
        for _ in 0..3 {
            assert!(admit(&kv, &q, BG, now).unwrap().is_open());
        }
        assert_eq!(
            admit(&kv, &q, BG, now).unwrap(),
            Verdict::ShareSpent {
                kind: Kind::Rpd,
                until_ms: 86_400_000
            }
        );
        assert_eq!(rpm(&kv), 3);
        assert_eq!(
            count_in(0, kv.get(&q.key(Kind::Rpd)).unwrap().as_deref()),
            3
        );
        assert!(admit(&kv, &q, FG, now).unwrap().is_open());
    }

    #[test]
    fn an_undo_never_borrows_from_a_window_started_since() {
        let kv = MemKv::default();
        let inc = Increment {
            kind: Kind::Rpm,
            key: "k".into(),
            delta: 1,
            window: 7,
            limit: Some(4),
        };
        kv.set("k", &encode(7, 3).to_le_bytes()).unwrap();
        undo(&kv, &inc).unwrap();
        assert_eq!(
            decode_counter(&kv.get("k").unwrap().unwrap()),
            Some(encode(7, 2))
        );
        // Another instance started minute 8 (and counted two) before the undo.
        for stored in [encode(8, 2), encode(8, 0)] {
            kv.set("k", &stored.to_le_bytes()).unwrap();
            undo(&kv, &inc).unwrap();
            assert_eq!(decode_counter(&kv.get("k").unwrap().unwrap()), Some(stored));
        }
    }

    #[test]
    fn concurrent_background_reservations_take_exactly_their_share() {
        // Share: 15 of 20.
        let q = quota(limits(Some(20), None, None, None));
        for round in 0..20 {
            let kv = Arc::new(MemKv::default());
            let start = Arc::new(std::sync::Barrier::new(40));
            let admitted = (0..40)
                .map(|_| {
                    let (kv, start) = (kv.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        admit_minute(&*kv, &q, BG, 60_000).unwrap().is_open()
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap())
                .filter(|open| *open)
                .count();
            assert_eq!(admitted, 15, "round {round}");
            let stored = kv.get(&q.key(Kind::Rpm)).unwrap();
            assert_eq!(count_in(1, stored.as_deref()), 15, "round {round}");
            for _ in 0..5 {
                assert!(admit_minute(&*kv, &q, FG, 60_000).unwrap().is_open());
            }
            assert!(!admit_minute(&*kv, &q, FG, 60_000).unwrap().is_open());
        }
    }

    #[test]
    fn absent_limits_are_neither_read_nor_written_and_never_exhaust() {
        let kv = MemKv::default();
        let q = quota(limits(None, Some(2), None, None));
        assert_eq!(
            counter_keys(&q),
            vec![(
                Kind::Rpd,
                "quota:v1:groq:k0123456789:llama-3.3-70b-versatile:rpd".to_owned()
            )]
        );
        assert_eq!(check(&q, &[value(0, 1)], u64::MAX, FG, 0), Verdict::Open);
        assert!(usage(&q, 1_000, 1_000, 0).is_empty());
        let none = quota(limits(None, None, None, None));
        assert!(counter_keys(&none).is_empty() && reserve(&none, 0).is_empty());
        for _ in 0..100 {
            assert_eq!(admit(&kv, &none, FG, 0).unwrap(), Verdict::Open);
        }
        record_usage(&kv, &none, 10, 10, 0).unwrap();
        assert_eq!(check(&none, &[], u64::MAX, FG, 0), Verdict::Open);
        assert!(!kv.exists(&none.key(Kind::Rpm)).unwrap());
    }

    #[test]
    fn the_ledger_is_the_model_the_pool_or_a_star() {
        let mut q = quota(limits(Some(1), None, None, None));
        q.ledger = Some("@free");
        assert_eq!(q.key(Kind::Rpm), "quota:v1:groq:k0123456789:@free:rpm");
        q.ledger = None;
        assert_eq!(q.key(Kind::Tpd), "quota:v1:groq:k0123456789:*:tpd");
    }

    #[test]
    fn the_limits_come_from_the_configuration_with_its_overrides() {
        let config =
            crate::config::tests::config_of(&[("groq_api_key", "a"), ("groq_rpm", "3")]).unwrap();
        let groq = config.provider("groq").unwrap();
        let key = groq.keys[0].id.clone();
        let q = QuotaRef::of(
            groq,
            "llama-3.3-70b-versatile",
            Some("llama-3.3-70b-versatile"),
            &key,
        );
        assert_eq!(
            (q.limits.rpm, q.limits.tpd, q.reset),
            (Some(3), Some(100_000), Reset::UtcMidnight)
        );
        let gemini = crate::catalog::provider("gemini").unwrap();
        assert_eq!(gemini.reset, Reset::PacificMidnight);
    }

    #[test]
    fn reservation_admits_up_to_the_limit_and_counts_every_request_once() {
        let kv = MemKv::default();
        let q = quota(limits(Some(2), Some(3), None, None));
        let now = 5 * 60_000;
        assert_eq!(admit(&kv, &q, FG, now).unwrap(), Verdict::Open);
        assert_eq!(admit(&kv, &q, FG, now + 1).unwrap(), Verdict::Open);
        // The minute is full: refused, and the day is not spent.
        assert_eq!(
            admit(&kv, &q, FG, now + 2).unwrap(),
            Verdict::Exhausted {
                kind: Kind::Rpm,
                until_ms: 6 * 60_000
            }
        );
        let day = |kv: &MemKv| decode_counter(&kv.get(&q.key(Kind::Rpd)).unwrap().unwrap());
        assert_eq!(day(&kv), Some(encode(0, 2)));
        // What was read agrees with what was admitted.
        let values = kv
            .get_many(
                &counter_keys(&q)
                    .into_iter()
                    .map(|(_, k)| k)
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        assert!(!check(&q, &values, 1, FG, now + 3).is_open());
        // Next minute: one more for the day, then the day is full.
        assert_eq!(admit(&kv, &q, FG, now + 60_000).unwrap(), Verdict::Open);
        assert_eq!(
            admit(&kv, &q, FG, now + 60_001).unwrap(),
            Verdict::Exhausted {
                kind: Kind::Rpd,
                until_ms: 86_400_000
            }
        );
        // A new day starts from zero on the same keys.
        assert_eq!(admit(&kv, &q, FG, 86_400_000).unwrap(), Verdict::Open);
        assert_eq!(day(&kv), Some(encode(1, 1)));
    }

    fn hammer(kv: &Arc<MemKv>, q: QuotaRef<'static>, threads: usize, now: u64) -> usize {
        let start = Arc::new(std::sync::Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (kv, start) = (kv.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    admit(&*kv, &q, FG, now).unwrap().is_open()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|open| *open)
            .count()
    }

    #[test]
    fn concurrent_reservations_never_exceed_the_limit() {
        let q = quota(limits(Some(5), None, None, None));
        for round in 0..20 {
            let kv = Arc::new(MemKv::default());
            assert_eq!(hammer(&kv, q, 32, 60_000), 5, "round {round}");
            // Refused reservations stay counted.
            let stored = kv.get(&q.key(Kind::Rpm)).unwrap();
            assert_eq!(
                stored.as_deref().and_then(decode_counter),
                Some(encode(1, 32))
            );
        }
    }

    #[test]
    fn concurrent_reservations_on_a_stale_window_count_each_request_once() {
        let q = quota(limits(Some(5), None, None, None));
        for round in 0..20 {
            let kv = Arc::new(MemKv::default());
            // The counter is full from a minute long gone.
            kv.set(&q.key(Kind::Rpm), &encode(3, 5).to_le_bytes())
                .unwrap();
            assert_eq!(hammer(&kv, q, 32, 10 * 60_000), 5, "round {round}");
            let stored = kv.get(&q.key(Kind::Rpm)).unwrap();
            assert_eq!(
                stored.as_deref().and_then(decode_counter),
                Some(encode(10, 32))
            );
        }
    }

    #[test]
    fn a_stale_value_is_reset_once_and_a_current_one_never() {
        let inc = Increment {
            kind: Kind::Rpm,
            key: "k".into(),
            delta: 1,
            window: 7,
            limit: Some(2),
        };
        assert_eq!(inc.settle(encode(6, 9)), None);
        assert_eq!(inc.settle(-1), None);
        assert_eq!(
            inc.settle(encode(7, 3)),
            Some(Counted {
                kind: Kind::Rpm,
                count: 3,
                admitted: false
            })
        );
        assert!(inc.settle(encode(8, 2)).unwrap().admitted);
        let kv = MemKv::default();
        for (stored, after) in [
            (encode(6, 9), encode(7, 0)),
            (encode(7, 4), encode(7, 4)),
            (encode(8, 1), encode(8, 1)),
            (-5, encode(7, 0)),
        ] {
            kv.set("k", &stored.to_le_bytes()).unwrap();
            kv::apply(&kv, &inc.reset()).unwrap();
            assert_eq!(decode_counter(&kv.get("k").unwrap().unwrap()), Some(after));
        }
    }

    /// Records the calls that matter; once armed, another instance's increment lands between
    /// a read and the compare-and-swap after it.
    #[derive(Default)]
    struct Meddling {
        armed: Mutex<bool>,
        ops: Mutex<Vec<&'static str>>,
    }

    impl testing::Hook for Meddling {
        fn before(&self, op: &'static str, key: &str, inner: &MemKv) -> KvResult<()> {
            if matches!(op, "get" | "increment" | "cas") {
                self.ops.lock().unwrap().push(op);
            }
            if op == "cas" && std::mem::take(&mut *self.armed.lock().unwrap()) {
                inner.increment(key, 1)?;
            }
            Ok(())
        }
    }

    #[test]
    fn a_window_starts_with_a_reset_and_a_second_increment_even_under_contention() {
        let inc = Increment {
            kind: Kind::Rpm,
            key: "k".into(),
            delta: 1,
            window: 7,
            limit: Some(2),
        };
        let kv = testing::Hooked::<Meddling>::default();
        kv.inner.set("k", &encode(6, 9).to_le_bytes()).unwrap();
        assert_eq!(perform(&kv, &inc).unwrap().count, 1);
        assert_eq!(
            *kv.hook.ops.lock().unwrap(),
            ["increment", "get", "cas", "increment"]
        );
        assert_eq!(perform(&kv, &inc).unwrap().count, 2);
        // Contended: another increment lands between the read and the swap; the reset reads
        // again and swaps, and this increment is made once in the new window.
        kv.inner.set("k", &encode(6, 9).to_le_bytes()).unwrap();
        kv.hook.ops.lock().unwrap().clear();
        *kv.hook.armed.lock().unwrap() = true;
        let c = perform(&kv, &inc).unwrap();
        assert_eq!((c.count, c.admitted), (1, true));
        assert_eq!(
            *kv.hook.ops.lock().unwrap(),
            ["increment", "get", "cas", "get", "cas", "increment"]
        );
        assert_eq!(
            decode_counter(&kv.inner.get("k").unwrap().unwrap()),
            Some(encode(7, 1))
        );
    }

    /// A store whose compare-and-swap writes but reports failure, as Spin's Redis store does
    /// (its `UNWATCH <key>` is refused after a successful `EXEC`): counting stays exact.
    struct Lying;

    impl testing::Hook for Lying {
        fn reports(&self, _written: bool) -> bool {
            false
        }
    }

    #[test]
    fn counts_stay_exact_on_a_store_that_misreports_its_swaps() {
        let kv = Arc::new(testing::Hooked::new(MemKv::redis_like(), Lying));
        let inc = |window: u64| Increment {
            kind: Kind::Tpd,
            key: "k".into(),
            delta: 7,
            window,
            limit: None,
        };
        perform(&*kv, &inc(1)).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let kv = kv.clone();
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        perform(&*kv, &inc(2)).unwrap();
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let stored = decode_counter(&kv.inner.get("k").unwrap().unwrap()).unwrap();
        assert_eq!(decode(stored), Some((2, 8 * 50 * 7)));
    }

    #[test]
    fn usage_counts_real_tokens_in_the_answer_window() {
        let kv = MemKv::default();
        let q = quota(limits(Some(100), None, Some(6_000), Some(10_000)));
        let incs = usage(&q, 1_200, 300, 60_000);
        assert_eq!(
            incs.iter().map(|i| (i.kind, i.delta)).collect::<Vec<_>>(),
            vec![(Kind::Tpm, 1_500), (Kind::Tpd, 1_500)]
        );
        assert!(usage(&q, 0, 0, 60_000).is_empty());
        record_usage(&kv, &q, 1_200, 300, 60_000).unwrap();
        record_usage(&kv, &q, 4_000, 0, 61_000).unwrap();
        let keys: Vec<String> = counter_keys(&q).into_iter().map(|(_, k)| k).collect();
        let values = kv.get_many(&keys).unwrap();
        assert_eq!(check(&q, &values, 500, FG, 62_000), Verdict::Open);
        assert_eq!(
            check(&q, &values, 501, FG, 62_000),
            Verdict::TooLarge {
                kind: Kind::Tpm,
                until_ms: Some(120_000)
            }
        );
        // A new minute frees the minute but not the day.
        record_usage(&kv, &q, 4_000, 0, 120_000).unwrap();
        let values = kv.get_many(&keys).unwrap();
        assert_eq!(
            check(&q, &values, 1_000, FG, 121_000),
            Verdict::TooLarge {
                kind: Kind::Tpd,
                until_ms: Some(86_400_000)
            }
        );
        assert_eq!(
            decode_counter(&kv.get(&q.key(Kind::Tpm)).unwrap().unwrap()),
            Some(encode(2, 4_000))
        );
    }

    /// Records every key written, to show the key count stays bounded.
    #[derive(Default)]
    struct Recording {
        written: Mutex<BTreeSet<String>>,
    }

    impl testing::Hook for Recording {
        fn wrote(&self, key: &str, _value: &[u8]) {
            self.written.lock().unwrap().insert(key.to_owned());
        }
    }

    #[test]
    fn keys_stay_bounded_over_sparse_traffic() {
        let kv = testing::Hooked::<Recording>::default();
        let q = quota(limits(Some(30), Some(1_000), Some(6_000), Some(100_000)));
        // A request every 7 minutes for 20 days, with gaps: windows are never revisited soon.
        let mut now = utc(2026, 3, 1, 0, 0);
        for i in 0..4_000u64 {
            assert!(admit(&kv, &q, FG, now).unwrap().is_open(), "{i}");
            record_usage(&kv, &q, 100, 20, now + 1_000).unwrap();
            now += 7 * 60_000;
        }
        let written = kv.hook.written.lock().unwrap().clone();
        let expected: BTreeSet<String> = Kind::ALL.iter().map(|k| q.key(*k)).collect();
        assert_eq!(written, expected);
        // And each holds the current window only.
        let rpm = decode_counter(&kv.get(&q.key(Kind::Rpm)).unwrap().unwrap()).unwrap();
        assert_eq!(decode(rpm), Some(((now - 7 * 60_000) / 60_000, 1)));
    }

    #[test]
    fn quota_keys_are_documented() {
        let doc = include_str!("../kv-schema/README.md");
        let key = keys::quota("groq", "k0", Some("m"), "rpm");
        assert!(keys::PREFIXES.iter().any(|p| key.starts_with(p)), "{key}");
        assert!(doc.contains("`quota:v1:<provider>:<key-id>:<ledger>:<kind>`"));
        for kind in Kind::ALL {
            assert!(doc.contains(&format!("`{}`", kind.as_str())), "{kind:?}");
        }
    }

    #[test]
    fn estimate_is_a_quarter_of_the_bytes_rounded_up() {
        assert_eq!(estimate_prompt_tokens(0), 0);
        assert_eq!(estimate_prompt_tokens(1), 1);
        assert_eq!(estimate_prompt_tokens(4_000), 1_000);
        assert_eq!(estimate_prompt_tokens(4_001), 1_001);
    }

    #[test]
    fn encoding_keeps_window_and_count_apart() {
        let v = encode(29_600_000, 123_456);
        assert!(v > 0);
        assert_eq!(decode(v), Some((29_600_000, 123_456)));
        assert_eq!(decode(encode(MAX_WINDOW + 5, 1)), Some((MAX_WINDOW, 1)));
        assert_eq!(decode(-1), None);
        // Incrementing the stored value increments the count.
        assert_eq!(decode(encode(9, 41) + 1), Some((9, 42)));
    }

    #[test]
    fn the_minute_is_reserved_before_sending_and_the_day_in_flight() {
        use crate::kv::{Kv, MemKv};
        let limits = Limits {
            rpm: Some(2),
            rpd: Some(10),
            tpm: None,
            tpd: None,
            scope: Scope::Model,
            source: None,
        };
        let q = QuotaRef {
            provider: "groq",
            key_id: "k1",
            ledger: Some("m"),
            limits,
            reset: Reset::UtcMidnight,
        };
        let kv = MemKv::default();
        assert!(admit_minute(&kv, &q, FG, 0).unwrap().is_open());
        let values = kv.get_many(&[q.key(Kind::Rpm), q.key(Kind::Rpd)]).unwrap();
        assert!(
            values[0].is_some() && values[1].is_none(),
            "only the minute before sending"
        );
        count_in_flight(&kv, &q, 0).unwrap();
        assert!(kv.get(&q.key(Kind::Rpd)).unwrap().is_some());
        assert!(admit_minute(&kv, &q, FG, 1).unwrap().is_open());
        assert!(matches!(
            admit_minute(&kv, &q, FG, 2).unwrap(),
            Verdict::Exhausted {
                kind: Kind::Rpm,
                ..
            }
        ));
    }
}
