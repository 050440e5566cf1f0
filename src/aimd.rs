//! AIMD congestion control, one window per provider: an allowed concurrency that rises
//! additively while the provider keeps up and halves when it pushes back (a 429, a timeout).
//! A request beyond it goes to the next candidate at once instead of queueing behind a
//! provider that is already saturated. Every request runs in a fresh instance, so the window
//! and the count of requests in flight live in the store.
//!
//! # The window
//!
//! `aimd:v1:<provider>:window` holds `{"limit": <f64>, "last_cut_ms": <unix ms>}` (absent:
//! `initial`, never cut). Admission allows `floor(limit)` requests in flight (at least one).
//!
//! - **Multiplicative decrease**: a congestion signal ([`is_congestion`]) sets
//!   `limit = max(limit / 2, min)` and `last_cut_ms = now` — but only if the request that met
//!   it was admitted *after* the last cut. Requests sent under the old window report the
//!   congestion that window caused, and the cut already answered it: a burst of 16 concurrent
//!   429s is one congestion event, one halving (TCP's "once per window of data"). Requests
//!   admitted under the reduced window that still meet 429s cut again. This needs no tuned
//!   interval: it adapts to however long the provider takes to answer.
//! - **Additive increase**: a whole window of successes adds 1 — sampled: each success adds 1
//!   with probability `1 / floor(limit)` (the caller's random draw), the expected growth of
//!   TCP's `1 / limit` per ack with one compare-and-swap per window of successes instead of one
//!   per success (at a full window every request succeeds near it, and a swap per success on
//!   one key is a contention storm). Only when the provider was near its window at admission
//!   (`in_flight ≥ floor(limit) − 1`, counted with the request itself) and the request was
//!   admitted after the last cut. An idle provider's window thus never grows on no information
//!   — ten sequential successes say nothing about 17 concurrent ones — and the common success
//!   path writes nothing.
//!
//! Both are compare-and-swap loops on the window key ([`kv::cas_update`]).
//!
//! # Requests in flight, with leases
//!
//! A plain counter of requests in flight would leak: an instance that dies (host restart, a
//! request cancelled with its client) never decrements, and the window would shrink for ever.
//! So each +1 is a lease that expires. Time is cut into lease periods
//! (`p = now / lease_period_ms`), and a request counts in the slot of its admission period,
//! `aimd:v1:<provider>:inflight:<p % slots>` with `slots = lease_periods + 2`, a counter tagged
//! with its period ([`counter::LEASE`]: `period × 2^24 + count`). Readers sum the slots tagged
//! with one of the last `lease_periods` periods; an older tag counts as zero, and the slot is
//! reused (reset by [`counter::perform`]) when its period comes round again, so the number of
//! keys is bounded without a TTL.
//!
//! A request adds 1 to its period's slot at admission and subtracts it from the same slot when
//! it ends — unless it outlived its lease (its period is no longer read), in which case it
//! skips the decrement: its count has aged out with the period, and subtracting it now would
//! take it from nobody. So:
//!
//! - a dead instance's +1 counts for at most `lease_periods × lease_period_ms` (2 min with the
//!   defaults), then ages out;
//! - a request counts for at least `(lease_periods − 1) × lease_period_ms` (90 s); one that runs
//!   longer (a long stream) stops counting unless the gateway calls [`renew`], which moves its
//!   +1 to the current period in its last counted period (two writes per 90 s of stream).
//!
//! The two spare slots keep a slot from being reused while a request from its period may still
//! decrement it, even with clocks a period apart between instances; a decrement that lands on
//! a reused slot anyway is detected (its tag is not the lease's) and undone.
//!
//! # Exactness
//!
//! Admission increments the current slot and reads the new count from the increment: across
//! any number of concurrent instances, each sees a different count, so no more than the limit
//! are admitted in a period. The older slots come from the gateway's batched read and only
//! shrink meanwhile (requests end), so using them is conservative. An admission whose count
//! is over the limit undoes its increment and is refused; a refusal can thus briefly make a
//! concurrent admission see one too many (refusing it too), never one too few.
//!
//! # Cost
//!
//! The gateway's batched read gains `1 + lease_periods` keys per provider ([`state_keys`]);
//! every admitted request writes two increments (admission, release); the first admission of a
//! period adds a compare-and-swap; a near-window success or a congestion signal adds a read and
//! a compare-and-swap.

use crate::counter::{self, Windowed, LEASE};
use crate::kv::{self, decode_counter, keys, Kv, KvResult};
use crate::upstream::Cause;
use serde::{Deserialize, Serialize};

pub const INITIAL_LIMIT: &str = "aimd_initial_limit";
pub const MIN_LIMIT: &str = "aimd_min_limit";
pub const MAX_LIMIT: &str = "aimd_max_limit";
pub const LEASE_PERIOD_MS: &str = "aimd_lease_period_ms";
pub const LEASE_PERIODS: &str = "aimd_lease_periods";

/// Every variable [`Settings::from_vars`] reads (each must be declared in `spin.toml`).
pub const VARIABLES: &[&str] = &[
    INITIAL_LIMIT,
    MIN_LIMIT,
    MAX_LIMIT,
    LEASE_PERIOD_MS,
    LEASE_PERIODS,
];

/// The most lease periods a setting may ask for: each is one more key in every request's read.
pub const MAX_LEASE_PERIODS: u32 = 16;

/// How the window moves and how long a request counts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// The window of a provider never cut: 16, what free tiers commonly take at once without a
    /// 429, so a new deployment is not throttled before it has learned anything.
    pub initial: f64,
    /// The floor: one request at a time always flows, so the window can learn to grow again.
    pub min: f64,
    /// The ceiling: bounds a window grown during a long quiet spell of success.
    pub max: f64,
    /// The length of a lease period.
    pub lease_period_ms: u64,
    /// How many periods a request's count lives (see the module doc).
    pub lease_periods: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            initial: 16.0,
            min: 1.0,
            max: 256.0,
            lease_period_ms: 30_000,
            lease_periods: 4,
        }
    }
}

impl Settings {
    /// Reads the `aimd_*` variables; an absent or empty one keeps its default. A bad value is an
    /// error naming the variable and what it accepts, for the operator's log.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let d = Self::default();
        let var = |name: &str| get(name).map(|v| v.trim().to_owned()).unwrap_or_default();
        let limit = |name: &str, default: f64| -> Result<f64, String> {
            let raw = var(name);
            if raw.is_empty() {
                return Ok(default);
            }
            match raw.parse::<f64>() {
                Ok(n) if n.is_finite() && (1.0..=1e6).contains(&n) => Ok(n),
                _ => Err(format!(
                    "variable `{name}` must be a number of concurrent requests from 1 to \
                     1000000, got {raw:?}"
                )),
            }
        };
        let whole = |name: &str, default: u64, range: std::ops::RangeInclusive<u64>| {
            let raw = var(name);
            if raw.is_empty() {
                return Ok(default);
            }
            match raw.parse::<u64>() {
                Ok(n) if range.contains(&n) => Ok(n),
                _ => Err(format!(
                    "variable `{name}` must be a whole number from {} to {}, got {raw:?}",
                    range.start(),
                    range.end()
                )),
            }
        };
        let min = limit(MIN_LIMIT, d.min)?;
        let max = limit(MAX_LIMIT, d.max.max(min))?;
        if max < min {
            return Err(format!(
                "variable `{MAX_LIMIT}` must be at least `{MIN_LIMIT}` ({min}), got {max}"
            ));
        }
        let initial = limit(INITIAL_LIMIT, d.initial.clamp(min, max))?;
        if !(min..=max).contains(&initial) {
            return Err(format!(
                "variable `{INITIAL_LIMIT}` must be between `{MIN_LIMIT}` ({min}) and \
                 `{MAX_LIMIT}` ({max}), got {initial}"
            ));
        }
        let periods = whole(
            LEASE_PERIODS,
            u64::from(d.lease_periods),
            1..=u64::from(MAX_LEASE_PERIODS),
        )?;
        Ok(Self {
            initial,
            min,
            max,
            lease_period_ms: whole(LEASE_PERIOD_MS, d.lease_period_ms, 1_000..=3_600_000)?,
            lease_periods: u32::try_from(periods).unwrap_or(d.lease_periods),
        })
    }

    /// Slots per provider: the live periods, and two spare (see the module doc).
    pub fn slots(&self) -> u64 {
        u64::from(self.lease_periods) + 2
    }

    /// The lease period `now_ms` falls in.
    pub fn period(&self, now_ms: u64) -> u64 {
        now_ms / self.lease_period_ms.max(1)
    }

    /// A count tagged `tag` is still read at `now_ms`: one of the last `lease_periods` periods
    /// (or the next: a clock a little ahead).
    fn live(&self, tag: u64, now_ms: u64) -> bool {
        let p = self.period(now_ms);
        tag + u64::from(self.lease_periods) > p && tag <= p + 1
    }
}

/// The stored window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub limit: f64,
    /// When the window was last halved (0: never): a congestion signal from a request admitted
    /// before it does not halve it again.
    pub last_cut_ms: u64,
}

impl Window {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The window a stored value means under `s`: absent or unreadable is `initial`, never cut;
    /// a limit outside the bounds (the settings changed) is brought within them.
    pub fn read(bytes: Option<&[u8]>, s: &Settings) -> Self {
        match bytes.and_then(|b| serde_json::from_slice::<Window>(b).ok()) {
            Some(w) if w.limit.is_finite() => Self {
                limit: w.limit.clamp(s.min, s.max),
                last_cut_ms: w.last_cut_ms,
            },
            _ => Self {
                limit: s.initial,
                last_cut_ms: 0,
            },
        }
    }
}

/// Whether a failure is the provider pushing back on load: a 429, or a timeout (no answer in
/// time, a stream stalled past its deadline: `timed_out`, which the gateway knows from
/// `upstream::Transport::Timeout` or a timed-out broken answer). A spent daily cap is not
/// concurrency, and a 5xx or a reset is the breaker's business.
pub fn is_congestion(cause: &Cause, timed_out: bool) -> bool {
    match cause {
        Cause::RateLimited => true,
        Cause::Server | Cause::Transport => timed_out,
        Cause::DailyCap
        | Cause::KeyRefused
        | Cause::ContextLength
        | Cause::ContentFilter
        | Cause::Client
        | Cause::Unsupported => false,
    }
}

/// The keys the gateway adds to its one batched read per provider: the window, then the slots
/// of the live periods at `now_ms`. [`View::read`] takes their values in this order, with the
/// same `now_ms`.
pub fn state_keys(provider: &str, now_ms: u64, s: &Settings) -> Vec<String> {
    let p = s.period(now_ms);
    let first = p.saturating_sub(u64::from(s.lease_periods) - 1);
    std::iter::once(keys::aimd_window(provider))
        .chain((first..=p).map(|period| keys::aimd_in_flight(provider, period % s.slots())))
        .collect()
}

/// A provider's window and load as read from the store.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub provider: String,
    pub limit: f64,
    pub last_cut_ms: u64,
    /// Requests in flight at the time of the read.
    pub in_flight: u64,
    /// (period, count) of each slot read.
    slots: Vec<(u64, u64)>,
    pub settings: Settings,
}

impl View {
    /// Reads a provider's state from the values of [`state_keys`] at `now_ms`.
    pub fn read(provider: &str, values: &[Option<Vec<u8>>], now_ms: u64, s: &Settings) -> Self {
        let window = Window::read(values.first().and_then(Option::as_deref), s);
        let slots: Vec<(u64, u64)> = values
            .iter()
            .skip(1)
            .filter_map(|v| LEASE.decode(decode_counter(v.as_deref()?)?))
            .collect();
        let mut view = Self {
            provider: provider.to_owned(),
            limit: window.limit,
            last_cut_ms: window.last_cut_ms,
            in_flight: 0,
            slots,
            settings: *s,
        };
        view.in_flight = view.counted(now_ms, None);
        view
    }

    /// The requests allowed in flight: the limit's whole part, at least one.
    pub fn allowed(&self) -> u64 {
        (self.limit.floor() as u64).max(1)
    }

    /// Another request fits (pure; [`admit`] decides with the store).
    pub fn has_room(&self) -> bool {
        self.in_flight < self.allowed()
    }

    /// The live counts read, except the slot `skip`'s.
    fn counted(&self, now_ms: u64, skip: Option<u64>) -> u64 {
        let s = &self.settings;
        self.slots
            .iter()
            .filter(|(tag, _)| s.live(*tag, now_ms) && Some(tag % s.slots()) != skip)
            .map(|(_, count)| count)
            .sum()
    }
}

/// A request's +1 in its admission period's slot. Serialisable, so a component can carry it
/// with the request's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub provider: String,
    pub slot: u64,
    pub period: u64,
    /// When it was admitted: a congestion signal or success is judged against the last cut.
    pub admitted_ms: u64,
}

/// An admitted request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub lease: Lease,
    /// Requests in flight with this one, as counted at admission.
    pub in_flight_after: u64,
    /// The allowed concurrency it was admitted under.
    pub allowed: u64,
}

impl Admitted {
    /// The provider was at (or one below) its window: this request's success says it can take
    /// more.
    pub fn near_window(&self) -> bool {
        self.in_flight_after + 1 >= self.allowed
    }
}

/// What admission decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Admitted(Admitted),
    /// The provider is at its window: try the next candidate.
    Refused {
        in_flight: u64,
        allowed: u64,
    },
}

/// Admits a request to `view`'s provider, or refuses it: nothing is written when the view
/// already shows the window full; else the current period's slot is incremented and the new
/// count, with the other live slots read, must stay within the window (an admission over it is
/// undone and refused). Release an admitted request with [`release`] when it ends, whatever
/// the outcome.
pub fn admit(kv: &(impl Kv + ?Sized), view: &View, now_ms: u64) -> KvResult<Admission> {
    let s = &view.settings;
    let allowed = view.allowed();
    if !view.has_room() {
        return Ok(Admission::Refused {
            in_flight: view.in_flight,
            allowed,
        });
    }
    let period = s.period(now_ms);
    let slot = period % s.slots();
    let count = counter::perform(
        kv,
        &Windowed {
            key: keys::aimd_in_flight(&view.provider, slot),
            delta: 1,
            window: period,
            layout: LEASE,
        },
    )?;
    let in_flight_after = count + view.counted(now_ms, Some(slot));
    let lease = Lease {
        provider: view.provider.clone(),
        slot,
        period,
        admitted_ms: now_ms,
    };
    if in_flight_after > allowed {
        release(kv, &lease, now_ms, s)?;
        return Ok(Admission::Refused {
            in_flight: in_flight_after - 1,
            allowed,
        });
    }
    Ok(Admission::Admitted(Admitted {
        lease,
        in_flight_after,
        allowed,
    }))
}

/// Ends a request's lease: −1 on its slot, unless the lease has aged out (its period is no
/// longer read: the count already stopped counting, and its slot may soon be reused). True if
/// it decremented. A decrement that finds the slot re-tagged (reused by a later period: clocks
/// far apart) is undone, so it never borrows from another period's count.
pub fn release(
    kv: &(impl Kv + ?Sized),
    lease: &Lease,
    now_ms: u64,
    s: &Settings,
) -> KvResult<bool> {
    if !s.live(lease.period, now_ms) {
        return Ok(false);
    }
    let key = keys::aimd_in_flight(&lease.provider, lease.slot);
    match LEASE.decode(kv.increment(&key, -1)?) {
        Some((tag, _)) if tag == lease.period => Ok(true),
        _ => {
            kv.increment(&key, 1)?;
            Ok(false)
        }
    }
}

/// Keeps a long request counted: in its lease's last counted period, adds +1 to the current
/// period's slot, then releases the old one, and moves the lease. Cheap to call often (on each
/// stream chunk): it writes only when due, about once per `(lease_periods − 1)` periods. True
/// if it moved the lease.
pub fn renew(
    kv: &(impl Kv + ?Sized),
    lease: &mut Lease,
    now_ms: u64,
    s: &Settings,
) -> KvResult<bool> {
    let p = s.period(now_ms);
    if p <= lease.period || p + 1 < lease.period + u64::from(s.lease_periods) {
        return Ok(false);
    }
    let slot = p % s.slots();
    // Count in the new period first: the request is never uncounted in between.
    counter::perform(
        kv,
        &Windowed {
            key: keys::aimd_in_flight(&lease.provider, slot),
            delta: 1,
            window: p,
            layout: LEASE,
        },
    )?;
    let old = std::mem::replace(
        lease,
        Lease {
            provider: lease.provider.clone(),
            slot,
            period: p,
            admitted_ms: lease.admitted_ms,
        },
    );
    release(kv, &old, now_ms, s)?;
    Ok(true)
}

/// A success: raises the window by 1 if the request was admitted near the window and after the
/// last cut, and its `draw` (a random number) falls on the one chance in `floor(limit)` (capped
/// at `max`). Nothing is read or written otherwise. Returns the new limit if it rose.
pub fn on_success(
    kv: &(impl Kv + ?Sized),
    admitted: &Admitted,
    s: &Settings,
    draw: u64,
) -> KvResult<Option<f64>> {
    if !admitted.near_window() || draw % admitted.allowed.max(1) != 0 {
        return Ok(None);
    }
    let mut raised = None;
    kv::cas_update(
        kv,
        &keys::aimd_window(&admitted.lease.provider),
        |current| {
            let w = Window::read(current, s);
            raised = None;
            if admitted.lease.admitted_ms <= w.last_cut_ms || w.limit >= s.max {
                return None;
            }
            let limit = (w.limit + 1.0).min(s.max);
            raised = Some(limit);
            Some(
                Window {
                    limit,
                    last_cut_ms: w.last_cut_ms,
                }
                .encode(),
            )
        },
    )?;
    Ok(raised)
}

/// A congestion signal ([`is_congestion`]) met by the request holding `lease`: halves the
/// window (not below `min`) unless it was already cut after this request was admitted.
/// Returns the new limit if it was cut.
pub fn on_congestion(
    kv: &(impl Kv + ?Sized),
    lease: &Lease,
    now_ms: u64,
    s: &Settings,
) -> KvResult<Option<f64>> {
    let mut cut = None;
    kv::cas_update(kv, &keys::aimd_window(&lease.provider), |current| {
        let w = Window::read(current, s);
        cut = None;
        if lease.admitted_ms <= w.last_cut_ms || w.limit <= s.min {
            return None;
        }
        let limit = (w.limit / 2.0).max(s.min);
        cut = Some(limit);
        Some(
            Window {
                limit,
                last_cut_ms: now_ms,
            }
            .encode(),
        )
    })?;
    Ok(cut)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::MemKv;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Barrier};

    const P: &str = "groq";
    /// 10 s into a 30 s lease period.
    const T0: u64 = 1_700_000_010_000;

    fn stores() -> [MemKv; 2] {
        [MemKv::default(), MemKv::redis_like()]
    }

    fn store(redis: bool) -> Arc<MemKv> {
        Arc::new(if redis {
            MemKv::redis_like()
        } else {
            MemKv::default()
        })
    }

    fn view(kv: &MemKv, now: u64, s: &Settings) -> View {
        View::read(P, &kv.get_many(&state_keys(P, now, s)).unwrap(), now, s)
    }

    fn admit_one(kv: &MemKv, now: u64, s: &Settings) -> Option<Admitted> {
        match admit(kv, &view(kv, now, s), now).unwrap() {
            Admission::Admitted(a) => Some(a),
            Admission::Refused { .. } => None,
        }
    }

    fn limit(kv: &MemKv, s: &Settings) -> f64 {
        view(kv, T0, s).limit
    }

    #[test]
    fn admission_never_exceeds_the_limit_under_16_threads() {
        let s = Settings {
            initial: 4.0,
            ..Settings::default()
        };
        for redis in [false, true] {
            let kv = store(redis);
            let active = Arc::new(AtomicU64::new(0));
            let peak = Arc::new(AtomicU64::new(0));
            let admitted = Arc::new(AtomicU64::new(0));
            let start = Arc::new(Barrier::new(16));
            let handles: Vec<_> = (0..16)
                .map(|_| {
                    let (kv, start) = (kv.clone(), start.clone());
                    let (active, peak, admitted) = (active.clone(), peak.clone(), admitted.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        for _ in 0..100 {
                            let Some(a) = admit_one(&kv, T0, &s) else {
                                continue;
                            };
                            admitted.fetch_add(1, Ordering::SeqCst);
                            let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                            peak.fetch_max(now, Ordering::SeqCst);
                            std::thread::yield_now();
                            active.fetch_sub(1, Ordering::SeqCst);
                            assert!(release(&*kv, &a.lease, T0, &s).unwrap());
                        }
                    })
                })
                .collect();
            handles.into_iter().for_each(|h| h.join().unwrap());
            let peak = peak.load(Ordering::SeqCst);
            assert!((1..=4).contains(&peak), "peak {peak}");
            assert!(admitted.load(Ordering::SeqCst) > 0);
            assert_eq!(view(&kv, T0, &s).in_flight, 0);
        }
    }

    #[test]
    fn a_full_window_refuses_and_a_refusal_leaves_no_count() {
        let s = Settings {
            initial: 2.0,
            ..Settings::default()
        };
        for kv in stores() {
            let a = admit_one(&kv, T0, &s).unwrap();
            assert_eq!((a.in_flight_after, a.allowed), (1, 2));
            // Read before the second admission: the view still shows room, the count decides.
            let stale = view(&kv, T0, &s);
            let b = admit_one(&kv, T0, &s).unwrap();
            assert_eq!(b.in_flight_after, 2);
            assert_eq!(
                admit(&kv, &stale, T0).unwrap(),
                Admission::Refused {
                    in_flight: 2,
                    allowed: 2
                }
            );
            // The full view refuses without writing.
            let full = view(&kv, T0, &s);
            assert!(!full.has_room());
            assert!(matches!(
                admit(&kv, &full, T0).unwrap(),
                Admission::Refused { .. }
            ));
            assert_eq!(view(&kv, T0, &s).in_flight, 2);
            release(&kv, &a.lease, T0, &s).unwrap();
            assert!(admit_one(&kv, T0, &s).is_some());
        }
    }

    #[test]
    fn a_burst_of_congestion_halves_once() {
        let s = Settings::default();
        for redis in [false, true] {
            let kv = store(redis);
            let leases: Vec<Lease> = (0..16)
                .map(|i| admit_one(&kv, T0 + i, &s).unwrap().lease)
                .collect();
            let start = Arc::new(Barrier::new(16));
            let handles: Vec<_> = leases
                .into_iter()
                .map(|lease| {
                    let (kv, start) = (kv.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        let cut = on_congestion(&*kv, &lease, T0 + 100, &s).unwrap();
                        release(&*kv, &lease, T0 + 100, &s).unwrap();
                        cut
                    })
                })
                .collect();
            let cuts: Vec<f64> = handles
                .into_iter()
                .filter_map(|h| h.join().unwrap())
                .collect();
            assert_eq!(cuts, [8.0]);
            assert_eq!(limit(&kv, &s), 8.0);
            // A request admitted under the new window that meets a 429 cuts again.
            let later = admit_one(&kv, T0 + 200, &s).unwrap();
            assert_eq!(
                on_congestion(&*kv, &later.lease, T0 + 300, &s).unwrap(),
                Some(4.0)
            );
            // And successes of requests sent before that cut do not undo it.
            let old = Admitted {
                lease: Lease {
                    admitted_ms: T0 + 250,
                    ..later.lease.clone()
                },
                in_flight_after: 8,
                allowed: 8,
            };
            assert_eq!(on_success(&*kv, &old, &s, 0).unwrap(), None);
            assert_eq!(limit(&kv, &s), 4.0);
        }
    }

    #[test]
    fn additive_increase_only_near_the_window() {
        let s = Settings {
            initial: 4.0,
            ..Settings::default()
        };
        for kv in stores() {
            // One request at a time: nothing learned, nothing written.
            for i in 0..20 {
                let a = admit_one(&kv, T0 + i, &s).unwrap();
                assert!(!a.near_window());
                assert_eq!(on_success(&kv, &a, &s, 0).unwrap(), None);
                release(&kv, &a.lease, T0 + i, &s).unwrap();
            }
            assert_eq!(kv.get(&keys::aimd_window(P)).unwrap(), None);
            // Three then four at once: a success whose draw falls on the one chance in
            // floor(limit) adds 1; the others write nothing.
            let held: Vec<Admitted> = (0..3).map(|_| admit_one(&kv, T0, &s).unwrap()).collect();
            assert!(held[2].near_window());
            assert_eq!(on_success(&kv, &held[2], &s, 1).unwrap(), None);
            assert_eq!(kv.get(&keys::aimd_window(P)).unwrap(), None);
            assert_eq!(on_success(&kv, &held[2], &s, 8).unwrap(), Some(5.0));
            let fourth = admit_one(&kv, T0, &s).unwrap();
            assert_eq!(fourth.in_flight_after, 4);
            for draw in 1..4 {
                assert_eq!(on_success(&kv, &fourth, &s, draw).unwrap(), None);
            }
            assert_eq!(limit(&kv, &s), 5.0);
            assert!(!held[0].near_window());
            // Over many draws, a window of successes adds 1 on average.
            let mut grew = 0;
            for draw in 0..400u64 {
                if on_success(
                    &kv,
                    &fourth,
                    &s,
                    draw.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 7,
                )
                .unwrap()
                .is_some()
                {
                    grew += 1;
                }
            }
            assert!((60..140).contains(&grew), "{grew}");
        }
    }

    #[test]
    fn the_window_stays_within_its_bounds() {
        let s = Settings {
            initial: 8.0,
            min: 2.0,
            max: 10.0,
            ..Settings::default()
        };
        for kv in stores() {
            for i in 1..10u64 {
                let lease = Lease {
                    provider: P.into(),
                    slot: 0,
                    period: 0,
                    admitted_ms: T0 + i * 10,
                };
                on_congestion(&kv, &lease, T0 + i * 10 + 5, &s).unwrap();
            }
            assert_eq!(limit(&kv, &s), 2.0);
            assert_eq!(view(&kv, T0, &s).allowed(), 2);
            let a = Admitted {
                lease: Lease {
                    provider: P.into(),
                    slot: 0,
                    period: 0,
                    admitted_ms: T0 + 1_000,
                },
                in_flight_after: 10,
                allowed: 10,
            };
            for _ in 0..200 {
                on_success(&kv, &a, &s, 0).unwrap();
            }
            assert_eq!(limit(&kv, &s), 10.0);
            assert_eq!(on_success(&kv, &a, &s, 0).unwrap(), None);
            // Stored values outside the bounds (the settings changed) are brought within them.
            let w = |limit: f64| {
                Window {
                    limit,
                    last_cut_ms: 0,
                }
                .encode()
            };
            assert_eq!(Window::read(Some(&w(500.0)), &s).limit, 10.0);
            assert_eq!(Window::read(Some(&w(0.1)), &s).limit, 2.0);
        }
    }

    #[test]
    fn a_dead_instances_lease_ages_out() {
        let s = Settings::default();
        for kv in stores() {
            for _ in 0..5 {
                admit_one(&kv, T0, &s).unwrap(); // never released
            }
            let period = s.lease_period_ms;
            let periods = u64::from(s.lease_periods);
            let last_counted = (s.period(T0) + periods) * period - 1;
            assert_eq!(view(&kv, last_counted, &s).in_flight, 5);
            assert!(last_counted - T0 >= (periods - 1) * period);
            assert_eq!(view(&kv, last_counted + 1, &s).in_flight, 0);
            // And the slot is reused, from zero, when its period comes round again.
            let again = T0 + s.slots() * period;
            let a = admit_one(&kv, again, &s).unwrap();
            assert_eq!(
                (a.in_flight_after, a.lease.slot),
                (1, s.period(T0) % s.slots())
            );
        }
    }

    #[test]
    fn a_release_after_the_lease_is_skipped() {
        let s = Settings::default();
        for kv in stores() {
            let a = admit_one(&kv, T0, &s).unwrap();
            let aged = (s.period(T0) + u64::from(s.lease_periods)) * s.lease_period_ms;
            let b = admit_one(&kv, aged, &s).unwrap();
            assert!(!release(&kv, &a.lease, aged, &s).unwrap());
            assert_eq!(view(&kv, aged, &s).in_flight, 1);
            assert!(release(&kv, &b.lease, aged, &s).unwrap());
            assert_eq!(view(&kv, aged, &s).in_flight, 0);
        }
    }

    #[test]
    fn a_decrement_on_a_reused_slot_is_undone() {
        let s = Settings::default();
        for kv in stores() {
            let a = admit_one(&kv, T0, &s).unwrap();
            // A clock far ahead reuses the slot for a later period.
            let ahead = T0 + s.slots() * s.lease_period_ms;
            let b = admit_one(&kv, ahead, &s).unwrap();
            assert_eq!(a.lease.slot, b.lease.slot);
            assert!(!release(&kv, &a.lease, T0 + 1, &s).unwrap());
            assert_eq!(view(&kv, ahead, &s).in_flight, 1);
        }
    }

    #[test]
    fn renew_keeps_a_long_request_counted() {
        let s = Settings::default();
        for kv in stores() {
            let mut lease = admit_one(&kv, T0, &s).unwrap().lease;
            let p0 = s.period(T0);
            // Not due before its last counted period.
            let early = (p0 + 2) * s.lease_period_ms;
            assert!(!renew(&kv, &mut lease, early, &s).unwrap());
            let due = (p0 + 3) * s.lease_period_ms + 5;
            assert!(renew(&kv, &mut lease, due, &s).unwrap());
            assert_eq!(lease.period, p0 + 3);
            assert_eq!(view(&kv, due, &s).in_flight, 1);
            let later = (p0 + 5) * s.lease_period_ms;
            assert_eq!(view(&kv, later, &s).in_flight, 1);
            assert!(release(&kv, &lease, later, &s).unwrap());
            assert_eq!(view(&kv, later, &s).in_flight, 0);
        }
    }

    #[test]
    fn concurrent_admissions_and_releases_across_periods_leave_nothing_in_flight() {
        let s = Settings {
            initial: 64.0,
            max: 64.0,
            ..Settings::default()
        };
        for redis in [false, true] {
            let kv = store(redis);
            let start = Arc::new(Barrier::new(16));
            let handles: Vec<_> = (0..16u64)
                .map(|t| {
                    let (kv, start) = (kv.clone(), start.clone());
                    std::thread::spawn(move || {
                        let mut refused = 0;
                        for i in 0..200u64 {
                            // Time moves on, for every thread alike: periods change (and
                            // slots are reused) mid-run.
                            start.wait();
                            let now = T0 + i * 7_000 + t;
                            match admit(&*kv, &view(&kv, now, &s), now).unwrap() {
                                Admission::Admitted(a) => {
                                    assert!(release(&*kv, &a.lease, now + 500, &s).unwrap())
                                }
                                Admission::Refused { .. } => refused += 1,
                            }
                        }
                        refused
                    })
                })
                .collect();
            let refused: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
            assert_eq!(refused, 0);
            for end in [T0 + 1_400_000, T0 + 1_500_000] {
                assert_eq!(view(&kv, end, &s).in_flight, 0);
            }
            for slot in 0..s.slots() {
                if let Some(v) = kv.get(&keys::aimd_in_flight(P, slot)).unwrap() {
                    let (_, count) = LEASE.decode(decode_counter(&v).unwrap()).unwrap();
                    assert_eq!(count, 0, "slot {slot}");
                }
            }
        }
    }

    #[test]
    fn garbage_reads_as_the_initial_window_and_nothing_in_flight() {
        let s = Settings::default();
        for kv in stores() {
            for key in state_keys(P, T0, &s) {
                kv.set(&key, b"junk").unwrap();
            }
            let v = view(&kv, T0, &s);
            assert_eq!((v.limit, v.in_flight, v.last_cut_ms), (16.0, 0, 0));
            assert_eq!(View::read(P, &[], T0, &s).limit, 16.0);
        }
    }

    #[test]
    fn congestion_is_429s_and_timeouts() {
        assert!(is_congestion(&Cause::RateLimited, false));
        assert!(is_congestion(&Cause::Transport, true));
        assert!(is_congestion(&Cause::Server, true));
        assert!(!is_congestion(&Cause::Transport, false));
        assert!(!is_congestion(&Cause::Server, false));
        assert!(!is_congestion(&Cause::DailyCap, false));
        assert!(!is_congestion(&Cause::Client, true));
    }

    #[test]
    fn settings_from_variables() {
        assert_eq!(Settings::from_vars(|_| None), Ok(Settings::default()));
        use crate::config::tests::vars;
        let s = Settings::from_vars(vars(&[
            (INITIAL_LIMIT, "8"),
            (MIN_LIMIT, "2"),
            (MAX_LIMIT, " 32 "),
            (LEASE_PERIOD_MS, "60000"),
            (LEASE_PERIODS, "5"),
        ]))
        .unwrap();
        assert_eq!(
            s,
            Settings {
                initial: 8.0,
                min: 2.0,
                max: 32.0,
                lease_period_ms: 60_000,
                lease_periods: 5,
            }
        );
        // A lower maximum pulls the default initial window down with it.
        let s = Settings::from_vars(vars(&[(MAX_LIMIT, "4")])).unwrap();
        assert_eq!((s.initial, s.max), (4.0, 4.0));
        for (name, bad) in [
            (INITIAL_LIMIT, "0"),
            (INITIAL_LIMIT, "many"),
            (INITIAL_LIMIT, "inf"),
            (MIN_LIMIT, "0.5"),
            (LEASE_PERIOD_MS, "10"),
            (LEASE_PERIODS, "0"),
            (LEASE_PERIODS, "17"),
        ] {
            let err =
                Settings::from_vars(|n: &str| (n == name).then(|| bad.to_string())).unwrap_err();
            assert!(err.contains(&format!("`{name}`")), "{err}");
        }
        for pairs in [
            &[(MIN_LIMIT, "8"), (MAX_LIMIT, "4")][..],
            &[(INITIAL_LIMIT, "300")],
        ] {
            assert!(Settings::from_vars(vars(pairs)).is_err());
        }
        assert!(VARIABLES.iter().all(|v| v.starts_with("aimd_")));
    }

    #[test]
    fn keys_are_bounded_and_documented() {
        let s = Settings::default();
        let keys_now = state_keys(P, T0, &s);
        assert_eq!(keys_now.len(), 1 + s.lease_periods as usize);
        assert_eq!(keys_now[0], "aimd:v1:groq:window");
        // Over any stretch of time, at most `slots` distinct counter keys.
        let mut all: Vec<String> = (0..1_000)
            .flat_map(|i| state_keys(P, T0 + i * 7_000, &s))
            .collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 1 + s.slots() as usize);
        for key in &all {
            assert!(keys::PREFIXES.iter().any(|p| key.starts_with(p)), "{key}");
        }
        let doc = include_str!("../kv-schema/README.md");
        assert!(doc.contains("`aimd:v1:<provider>:window`"));
        assert!(doc.contains("`aimd:v1:<provider>:inflight:<slot>`"));
        assert!(doc.contains("## AIMD"));
    }
}
