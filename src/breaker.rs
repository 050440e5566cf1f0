//! Circuit breakers, one per (provider, model): a model whose provider keeps failing stops
//! receiving traffic within a few requests, and gets it back with one successful probe once it
//! recovers. Every request runs in a fresh instance, so the breaker lives in the store: a state
//! key changed only by compare-and-swap, and two window-tagged outcome counters per time bucket.
//!
//! # States
//!
//! - **Closed**: requests flow. Each outcome is counted; a failure re-reads the window and, when
//!   at least `min_samples` outcomes were seen and `failures ≥ failure_rate × samples`, swaps
//!   the state to Open (`Transition::Opened`).
//! - **Open** until `until_ms = since + min(cooldown_ms × 2^level, max_cooldown_ms)`: nothing is
//!   sent. `level` is the back-off: 0 when tripped from Closed, +1 for each failed probe, so a
//!   provider that stays down is probed at 10 s, 20 s, 40 s… then every 5 min (defaults).
//! - **HalfOpen**: up to `probes` requests hold a probe lease (an expiry time in the state). A
//!   request that finds the cool-down over, or a free or expired lease, must win
//!   [`try_probe`] — a compare-and-swap from exactly the bytes it read to a state holding its
//!   lease — so two instances never both own the same probe; the loser treats the breaker as
//!   open. A probe's success closes the breaker (level back to 0); its failure re-opens it one
//!   level up. A prober that dies leaves a lease that expires after `probe_lease_ms`, and the
//!   next request probes instead: an instance crash never wedges a breaker half-open.
//!
//! # The rolling window
//!
//! Time is cut into buckets of `window_ms / 2`; bucket `b = now / (window_ms / 2)` counts in
//! slot `b % 2`, so the two slots hold the current and the previous bucket. Each slot has two
//! counters, successes and failures, tagged with their bucket ([`counter::LEASE`] layout:
//! `bucket × 2^24 + count`), reused when the bucket comes round again: the number of keys is
//! bounded without a TTL. The rate is over both buckets, unweighted: an outcome counts for
//! between `window_ms / 2` and `window_ms`, then is forgotten. (Weighting the previous bucket by
//! its overlap would smooth the edge, but a breaker deciding on 4 samples gains nothing from
//! fractional ones, and "forgotten after at most `window_ms`" is easier to reason about.)
//!
//! Successes and failures are separate counters, not attempts and failures, so every outcome
//! costs exactly one increment. A non-failure counts as a success: a 429 or a 400 proves the
//! provider is up and answering ([`is_failure`] says which causes are the provider's trouble).
//!
//! Counts from before the last close must not re-trip a breaker that a probe just closed (the
//! failures that opened it are usually still in the window). A close records the counts of
//! its current bucket as a baseline in the state: buckets before it are ignored, and its own
//! counts are taken net of the baseline. No counter is rewritten, so closing costs no more than
//! the swap of the state.
//!
//! # Reads and writes
//!
//! The gateway's one batched read per request holds only the state key of each candidate
//! ([`state_keys`]): admission ([`View::admits`]) needs nothing else. Counters are read only
//! where they decide something: after a failure, fresh, together with the state the swap starts
//! from ([`record`]). A request answered by a closed breaker's provider costs one increment; a
//! failure one increment and one batched read (and a swap when it trips); a probe a swap to take
//! the lease, and a batched read and a swap to close or re-open.
//!
//! # Keys
//!
//! `breaker:v1:<provider>:state:<model>` (JSON [`State`]), and the counters
//! `breaker:v1:<provider>:s<slot>:<model>` (successes) and `breaker:v1:<provider>:f<slot>:<model>`
//! (failures). Model ids contain `/` and `:`, so the model is always last: split a key on its
//! first four `:` — `breaker`, `v1`, the provider (catalogue ids have no `:`), the kind
//! (`state`, `s0`, `s1`, `f0`, `f1`) — and the rest is the model. With the kind before the
//! model, no model id can make one key look like another's.

use crate::counter::{self, Windowed, LEASE};
use crate::kv::{self, decode_counter, keys, Kv, KvError, KvResult};
use crate::upstream::Cause;
use serde::{Deserialize, Serialize};

/// Outcome slots per (provider, model): the current bucket and the previous one.
pub const SLOTS: u64 = 2;

/// The highest back-off level stored: 2^32 cool-downs are far past any cap.
const MAX_LEVEL: u32 = 32;

pub const FAILURE_RATE: &str = "breaker_failure_rate";
pub const MIN_SAMPLES: &str = "breaker_min_samples";
pub const WINDOW_MS: &str = "breaker_window_ms";
pub const COOLDOWN_MS: &str = "breaker_cooldown_ms";
pub const MAX_COOLDOWN_MS: &str = "breaker_max_cooldown_ms";
pub const PROBES: &str = "breaker_probes";
pub const PROBE_LEASE_MS: &str = "breaker_probe_lease_ms";

/// Every variable [`Settings::from_vars`] reads (each must be declared in `spin.toml`).
pub const VARIABLES: &[&str] = &[
    FAILURE_RATE,
    MIN_SAMPLES,
    WINDOW_MS,
    COOLDOWN_MS,
    MAX_COOLDOWN_MS,
    PROBES,
    PROBE_LEASE_MS,
];

/// How quickly a breaker opens and how cautiously it closes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// Failures / samples at or above which a closed breaker opens. 0.5: a provider failing
    /// one request in two is worse than skipping to the next candidate.
    pub failure_rate: f64,
    /// Outcomes needed before the rate means anything. 4: one unlucky 502 never opens a
    /// breaker, and a dead provider costs at most 4 failed requests (fewer across instances
    /// already in flight).
    pub min_samples: u32,
    /// How long an outcome counts (between half and all of it: see the module doc).
    pub window_ms: u64,
    /// The first cool-down after opening; it doubles with each failed probe.
    pub cooldown_ms: u64,
    /// The cap of the doubling: a provider down for hours is still probed every 5 minutes.
    pub max_cooldown_ms: u64,
    /// Probes in flight at once while half-open. 1: one request risks the failure; its success
    /// is enough evidence to close.
    pub probes: u32,
    /// How long a probe owns its lease. Past it, the prober is presumed dead and another
    /// request may probe. Record a probe's outcome as soon as it is known (a stream's first
    /// token) so a long answer does not outlive its lease.
    pub probe_lease_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            failure_rate: 0.5,
            min_samples: 4,
            window_ms: 30_000,
            cooldown_ms: 10_000,
            max_cooldown_ms: 300_000,
            probes: 1,
            probe_lease_ms: 30_000,
        }
    }
}

impl Settings {
    /// Reads the `breaker_*` variables; an absent or empty one keeps its default. A bad value is
    /// an error naming the variable and what it accepts, for the operator's log.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let d = Self::default();
        let var = |name: &str| get(name).map(|v| v.trim().to_owned()).unwrap_or_default();
        let whole = |name: &str, default: u64, min: u64| -> Result<u64, String> {
            let raw = var(name);
            if raw.is_empty() {
                return Ok(default);
            }
            match raw.parse::<u64>() {
                Ok(n) if n >= min => Ok(n),
                _ => Err(format!(
                    "variable `{name}` must be a whole number of at least {min}, got {raw:?}"
                )),
            }
        };
        let failure_rate = match var(FAILURE_RATE).as_str() {
            "" => d.failure_rate,
            raw => match raw.parse::<f64>() {
                Ok(r) if r > 0.0 && r <= 1.0 => r,
                _ => {
                    return Err(format!(
                        "variable `{FAILURE_RATE}` must be a number above 0 and at most 1 \
                         (a share of failed requests, e.g. 0.5), got {raw:?}"
                    ))
                }
            },
        };
        let small = |name: &str, default: u32| -> Result<u32, String> {
            let n = whole(name, u64::from(default), 1)?;
            u32::try_from(n)
                .ok()
                .filter(|&n| n <= 1_000)
                .ok_or_else(|| format!("variable `{name}` must be at most 1000, got {n}"))
        };
        let cooldown_ms = whole(COOLDOWN_MS, d.cooldown_ms, 1)?;
        let max_cooldown_ms = whole(MAX_COOLDOWN_MS, d.max_cooldown_ms.max(cooldown_ms), 1)?;
        if max_cooldown_ms < cooldown_ms {
            return Err(format!(
                "variable `{MAX_COOLDOWN_MS}` must be at least `{COOLDOWN_MS}` ({cooldown_ms}), \
                 got {max_cooldown_ms}"
            ));
        }
        Ok(Self {
            failure_rate,
            min_samples: small(MIN_SAMPLES, d.min_samples)?,
            window_ms: whole(WINDOW_MS, d.window_ms, 2)?,
            cooldown_ms,
            max_cooldown_ms,
            probes: small(PROBES, d.probes)?,
            probe_lease_ms: whole(PROBE_LEASE_MS, d.probe_lease_ms, 1)?,
        })
    }

    /// The length of a bucket: half the window, so the two slots cover it.
    pub fn bucket_ms(&self) -> u64 {
        (self.window_ms / 2).max(1)
    }

    /// The bucket `now_ms` falls in.
    pub fn bucket(&self, now_ms: u64) -> u64 {
        now_ms / self.bucket_ms()
    }

    /// The cool-down of an opening at back-off `level`: `cooldown_ms × 2^level`, capped.
    pub fn cooldown_for(&self, level: u32) -> u64 {
        let factor = 1u64.checked_shl(level.min(63)).unwrap_or(u64::MAX);
        self.cooldown_ms
            .saturating_mul(factor)
            .min(self.max_cooldown_ms)
    }
}

/// The counts of a closed breaker's first bucket at the moment it closed: what came before
/// the close, never counted again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Baseline {
    pub bucket: u64,
    pub ok: u64,
    pub failed: u64,
}

/// The stored state: JSON such as `{"state":"open","since_ms":…,"until_ms":…,"level":1}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    Closed {
        since_ms: u64,
        #[serde(default)]
        base: Baseline,
        /// The last failure counted while closed. Successes are counted only within a window of
        /// it: with no failure in the window there is no rate to dilute, and a success then
        /// costs no write (see [`record`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        failed_ms: Option<u64>,
    },
    Open {
        since_ms: u64,
        until_ms: u64,
        level: u32,
    },
    HalfOpen {
        since_ms: u64,
        level: u32,
        /// When each probe in flight loses its lease (Unix ms); expired ones are dropped by
        /// the next swap.
        leases: Vec<u64>,
    },
}

impl Default for State {
    /// A breaker never written is closed since ever, with nothing before it.
    fn default() -> Self {
        State::Closed {
            since_ms: 0,
            base: Baseline::default(),
            failed_ms: None,
        }
    }
}

impl State {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A stored state; `None` when unreadable (readers then take it as closed: a breaker fails
    /// open, never blocking a provider on a value nobody can interpret).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }

    /// The state a stored value means: absent or unreadable is closed.
    pub fn read(bytes: Option<&[u8]>) -> Self {
        bytes.and_then(Self::decode).unwrap_or_default()
    }
}

/// What the breaker lets a request do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Send it; record its outcome as a sample.
    Closed,
    /// It may be a probe: send it only if [`try_probe`] wins, else treat as open.
    Probe,
    /// Skip this candidate. `until_ms`: when a probe may next be sent (the end of the
    /// cool-down, or of the earliest probe lease held).
    Open { until_ms: u64 },
}

/// How an attempt ended, for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The provider's trouble ([`is_failure`], or a stream broken after its 200).
    pub failed: bool,
    /// The attempt was a probe (it won [`try_probe`]).
    pub probe: bool,
}

/// What an outcome did to the breaker, for the gateway's event log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    /// A closed breaker tripped.
    Opened {
        until_ms: u64,
        level: u32,
    },
    /// A probe succeeded.
    Closed,
    /// A probe failed: open again, one level further back.
    Reopened {
        until_ms: u64,
        level: u32,
    },
}

/// Whether a failure counts against the provider's health. Exhaustive on purpose: a new
/// [`Cause`] must be decided here.
///
/// - `Server` (5xx, 408, 529, a broken, unreadable or timed-out answer) and `Transport`
///   (timeout, reset, unreachable): the provider's trouble — failures.
/// - `RateLimited`, `DailyCap`: the provider is up and says "not now"; the quota and the
///   cool-downs deal with it. Counting them would open breakers on healthy providers at every
///   free-tier limit.
/// - `KeyRefused`: one key's trouble; its cool-down covers it, and other keys may work.
/// - `Client`, `ContextLength`, `ContentFilter`: the request's fault, whichever provider.
/// - `Unsupported`: this provider cannot serve this request (a wire format, an unknown model):
///   routing's business, not health.
///
/// A stream that breaks after its 200 is a failure too; the gateway passes `failed: true`
/// for it directly (it has no `Cause`).
pub fn is_failure(cause: &Cause) -> bool {
    match cause {
        Cause::Server | Cause::Transport => true,
        Cause::RateLimited
        | Cause::DailyCap
        | Cause::KeyRefused
        | Cause::Client
        | Cause::ContextLength
        | Cause::ContentFilter
        | Cause::Unsupported => false,
    }
}

/// The keys the gateway adds to its one batched read per candidate: the state alone
/// (admission needs nothing else). [`View::read`] takes their values in this order.
pub fn state_keys(provider: &str, model: &str) -> Vec<String> {
    vec![keys::breaker_state(provider, model)]
}

/// The outcome counters: successes then failures of slot 0, then of slot 1. Read after a
/// failure, with the state, by [`record`]; [`View::read`] accepts their values after the
/// state's.
pub fn window_keys(provider: &str, model: &str) -> Vec<String> {
    (0..SLOTS)
        .flat_map(|slot| {
            [false, true].map(|failed| keys::breaker_outcomes(provider, model, failed, slot))
        })
        .collect()
}

/// A breaker as read from the store.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub provider: String,
    pub model: String,
    pub state: State,
    /// The state's bytes exactly as read: what [`try_probe`]'s compare-and-swap expects.
    raw: Option<Vec<u8>>,
    /// (bucket, count) of each counter read, `[slot][0: successes, 1: failures]`.
    window: [[Option<(u64, u64)>; 2]; SLOTS as usize],
    pub settings: Settings,
}

impl View {
    /// Reads a breaker from the values of [`state_keys`], optionally followed by those of
    /// [`window_keys`] (without them, [`Self::samples`] and [`Self::failures`] are 0).
    /// Anything absent or unreadable reads as closed and uncounted.
    pub fn read(
        provider: &str,
        model: &str,
        values: &[Option<Vec<u8>>],
        settings: &Settings,
    ) -> Self {
        let raw = values.first().cloned().flatten();
        let counter = |i: usize| {
            values
                .get(i)
                .and_then(Option::as_deref)
                .and_then(decode_counter)
                .and_then(|v| LEASE.decode(v))
        };
        let mut window = [[None; 2]; SLOTS as usize];
        for (slot, kinds) in window.iter_mut().enumerate() {
            for (kind, entry) in kinds.iter_mut().enumerate() {
                *entry = counter(1 + slot * 2 + kind);
            }
        }
        Self {
            provider: provider.to_owned(),
            model: model.to_owned(),
            state: State::read(raw.as_deref()),
            raw,
            window,
            settings: *settings,
        }
    }

    /// Outcomes in the rolling window at `now_ms` since the breaker last closed.
    pub fn samples(&self, now_ms: u64) -> u64 {
        let [ok, failed] = self.counts(now_ms);
        ok + failed
    }

    /// Failures among [`Self::samples`].
    pub fn failures(&self, now_ms: u64) -> u64 {
        self.counts(now_ms)[1]
    }

    /// [successes, failures] in the buckets of the window (the current one and the previous,
    /// or the next: a clock a little ahead) that are not from before the last close.
    fn counts(&self, now_ms: u64) -> [u64; 2] {
        let b = self.settings.bucket(now_ms);
        let base = match &self.state {
            State::Closed { base, .. } => *base,
            _ => Baseline::default(),
        };
        let mut totals = [0u64; 2];
        for (slot, kinds) in self.window.iter().enumerate() {
            for (kind, entry) in kinds.iter().enumerate() {
                let Some((tag, count)) = *entry else { continue };
                let live = tag % SLOTS == slot as u64
                    && tag + 1 >= b
                    && tag <= b + 1
                    && tag >= base.bucket;
                if !live {
                    continue;
                }
                let before = match (tag == base.bucket, kind) {
                    (false, _) => 0,
                    (true, 0) => base.ok,
                    (true, _) => base.failed,
                };
                totals[kind] += count.saturating_sub(before);
            }
        }
        totals
    }

    /// A closed breaker whose window has enough samples at or above the failure rate.
    pub fn trips(&self, now_ms: u64) -> bool {
        let [ok, failed] = self.counts(now_ms);
        let n = ok + failed;
        matches!(self.state, State::Closed { .. })
            && n >= u64::from(self.settings.min_samples)
            && failed as f64 >= self.settings.failure_rate * n as f64
    }

    /// What the breaker lets a request do at `now_ms` (pure: a [`Admission::Probe`] must then
    /// win [`try_probe`]).
    pub fn admits(&self, now_ms: u64) -> Admission {
        match &self.state {
            State::Closed { .. } => Admission::Closed,
            State::Open { until_ms, .. } if now_ms < *until_ms => Admission::Open {
                until_ms: *until_ms,
            },
            State::Open { .. } => Admission::Probe,
            State::HalfOpen { leases, .. } => {
                let live = leases.iter().filter(|&&l| l > now_ms);
                if (live.clone().count() as u64) < u64::from(self.settings.probes) {
                    Admission::Probe
                } else {
                    Admission::Open {
                        until_ms: live.min().copied().unwrap_or(now_ms),
                    }
                }
            }
        }
    }

    /// The state's key.
    fn key(&self) -> String {
        keys::breaker_state(&self.provider, &self.model)
    }

    /// Reads the state and the window fresh.
    fn reread(&self, kv: &(impl Kv + ?Sized)) -> KvResult<Self> {
        let mut all = state_keys(&self.provider, &self.model);
        all.extend(window_keys(&self.provider, &self.model));
        let values = kv.get_many(&all)?;
        Ok(Self::read(
            &self.provider,
            &self.model,
            &values,
            &self.settings,
        ))
    }
}

/// Takes a probe lease: a compare-and-swap from exactly the state `view` read to HalfOpen with
/// this probe's lease (expired leases dropped). True: this request is the probe, send it and
/// record its outcome with `probe: true`. False: another instance changed the state first
/// (most likely took the probe) — treat the breaker as open. Call it right before sending, once
/// the candidate is otherwise certain to be tried, so a lease is never taken for nothing.
pub fn try_probe(kv: &(impl Kv + ?Sized), view: &View, now_ms: u64) -> KvResult<bool> {
    if view.admits(now_ms) != Admission::Probe {
        return Ok(false);
    }
    let lease = now_ms.saturating_add(view.settings.probe_lease_ms);
    let half_open = match &view.state {
        State::Open { level, .. } => State::HalfOpen {
            since_ms: now_ms,
            level: *level,
            leases: vec![lease],
        },
        State::HalfOpen {
            since_ms,
            level,
            leases,
        } => State::HalfOpen {
            since_ms: *since_ms,
            level: *level,
            leases: leases
                .iter()
                .copied()
                .filter(|&l| l > now_ms)
                .chain([lease])
                .collect(),
        },
        State::Closed { .. } => return Ok(false),
    };
    kv.compare_and_swap(&view.key(), view.raw.as_deref(), &half_open.encode())
}

/// Records an attempt's outcome. `view` is the breaker as read before the attempt (for its
/// names and settings; what is decided here is decided on fresh reads).
///
/// - Not a probe: one increment of this bucket's success or failure counter. A failure then
///   reads the state and window fresh and, if the breaker is closed and [`View::trips`], swaps
///   it to Open from exactly the state read (re-reading when another writer got in between;
///   concurrent failures open it once, the others find it open).
/// - A probe's success: HalfOpen → Closed, with the current bucket's counts as the baseline, so
///   the failures that opened it never re-open it. Nothing if the state is no longer half-open
///   (another probe failed and re-opened it: the newer evidence of trouble wins).
/// - A probe's failure: HalfOpen → Open one back-off level up.
///
/// Probes are not counted in the window: they decide the state directly.
pub fn record(
    kv: &(impl Kv + ?Sized),
    view: &View,
    outcome: Outcome,
    now_ms: u64,
) -> KvResult<Transition> {
    let s = &view.settings;
    if outcome.probe {
        return if outcome.failed {
            reopen(kv, view, now_ms)
        } else {
            close(kv, view, now_ms)
        };
    }
    // A success with no failure in the window changes nothing a trip could be judged on.
    if let State::Closed { failed_ms, .. } = &view.state {
        let recent = failed_ms.is_some_and(|f| now_ms.saturating_sub(f) < s.window_ms);
        if !outcome.failed && !recent {
            return Ok(Transition::None);
        }
    }
    let bucket = s.bucket(now_ms);
    counter::perform(
        kv,
        &Windowed {
            key: keys::breaker_outcomes(
                &view.provider,
                &view.model,
                outcome.failed,
                bucket % SLOTS,
            ),
            delta: 1,
            window: bucket,
            layout: LEASE,
        },
    )?;
    if !outcome.failed {
        return Ok(Transition::None);
    }
    for _ in 0..kv::CAS_ATTEMPTS {
        let fresh = view.reread(kv)?;
        if !fresh.trips(now_ms) {
            // Successes count from now on (one try: a writer in between wrote a state as
            // recent, or an open one).
            if let State::Closed {
                since_ms,
                base,
                failed_ms,
            } = &fresh.state
            {
                if failed_ms.is_none_or(|f| f < now_ms) {
                    let marked = State::Closed {
                        since_ms: *since_ms,
                        base: *base,
                        failed_ms: Some(now_ms),
                    };
                    kv.compare_and_swap(&view.key(), fresh.raw.as_deref(), &marked.encode())?;
                }
            }
            return Ok(Transition::None);
        }
        let (level, until_ms) = (0, now_ms.saturating_add(s.cooldown_for(0)));
        let open = State::Open {
            since_ms: now_ms,
            until_ms,
            level,
        };
        if kv.compare_and_swap(&view.key(), fresh.raw.as_deref(), &open.encode())? {
            return Ok(Transition::Opened { until_ms, level });
        }
    }
    Err(lost(&view.key()))
}

fn close(kv: &(impl Kv + ?Sized), view: &View, now_ms: u64) -> KvResult<Transition> {
    let bucket = view.settings.bucket(now_ms);
    let slot = bucket % SLOTS;
    let names = [
        view.key(),
        keys::breaker_outcomes(&view.provider, &view.model, false, slot),
        keys::breaker_outcomes(&view.provider, &view.model, true, slot),
    ];
    for _ in 0..kv::CAS_ATTEMPTS {
        let values = kv.get_many(&names)?;
        if !matches!(State::read(values[0].as_deref()), State::HalfOpen { .. }) {
            return Ok(Transition::None);
        }
        let count = |v: &Option<Vec<u8>>| match v
            .as_deref()
            .and_then(decode_counter)
            .and_then(|v| LEASE.decode(v))
        {
            Some((tag, count)) if tag == bucket => count,
            _ => 0,
        };
        let closed = State::Closed {
            since_ms: now_ms,
            base: Baseline {
                bucket,
                ok: count(&values[1]),
                failed: count(&values[2]),
            },
            failed_ms: None,
        };
        if kv.compare_and_swap(&names[0], values[0].as_deref(), &closed.encode())? {
            return Ok(Transition::Closed);
        }
    }
    Err(lost(&names[0]))
}

fn reopen(kv: &(impl Kv + ?Sized), view: &View, now_ms: u64) -> KvResult<Transition> {
    let mut transition = Transition::None;
    kv::cas_update(kv, &view.key(), |current| {
        transition = Transition::None;
        let State::HalfOpen { level, .. } = State::read(current) else {
            return None;
        };
        let level = (level + 1).min(MAX_LEVEL);
        let until_ms = now_ms.saturating_add(view.settings.cooldown_for(level));
        transition = Transition::Reopened { until_ms, level };
        Some(
            State::Open {
                since_ms: now_ms,
                until_ms,
                level,
            }
            .encode(),
        )
    })?;
    Ok(transition)
}

fn lost(key: &str) -> KvError {
    KvError(format!(
        "{key}: compare-and-swap lost {} times in a row",
        kv::CAS_ATTEMPTS
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::MemKv;
    use std::sync::{Arc, Barrier};

    const P: &str = "openrouter";
    /// A model id with both `/` and `:`, as OpenRouter's are.
    const M: &str = "meta-llama/llama-3.3-70b-instruct:free";
    /// 10 s into a 15 s bucket (the defaults): a 10 s cool-down ends in the next bucket.
    const T0: u64 = 1_700_000_020_000;

    fn stores() -> [MemKv; 2] {
        [MemKv::default(), MemKv::redis_like()]
    }

    fn view(kv: &MemKv, s: &Settings) -> View {
        let values = kv.get_many(&state_keys(P, M)).unwrap();
        View::read(P, M, &values, s)
    }

    fn full_view(kv: &MemKv, s: &Settings) -> View {
        let mut all = state_keys(P, M);
        all.extend(window_keys(P, M));
        View::read(P, M, &kv.get_many(&all).unwrap(), s)
    }

    fn outcome(kv: &MemKv, s: &Settings, failed: bool, now: u64) -> Transition {
        let v = view(kv, s);
        assert_eq!(v.admits(now), Admission::Closed, "{:?}", v.state);
        record(
            kv,
            &v,
            Outcome {
                failed,
                probe: false,
            },
            now,
        )
        .unwrap()
    }

    /// Trips the breaker with `min_samples` failures at `now`.
    fn trip(kv: &MemKv, s: &Settings, now: u64) -> u64 {
        for i in 1..s.min_samples {
            assert_eq!(outcome(kv, s, true, now), Transition::None, "failure {i}");
        }
        match outcome(kv, s, true, now) {
            Transition::Opened { until_ms, level: 0 } => until_ms,
            t => panic!("not opened: {t:?}"),
        }
    }

    /// Waits out the cool-down and takes the probe; returns the view it was taken with.
    fn probe(kv: &MemKv, s: &Settings, now: u64) -> View {
        let v = view(kv, s);
        assert_eq!(v.admits(now), Admission::Probe, "{:?}", v.state);
        assert!(try_probe(kv, &v, now).unwrap());
        v
    }

    fn probe_outcome(kv: &MemKv, v: &View, failed: bool, now: u64) -> Transition {
        record(
            kv,
            v,
            Outcome {
                failed,
                probe: true,
            },
            now,
        )
        .unwrap()
    }

    #[test]
    fn opens_within_min_samples_failures() {
        let s = Settings::default();
        for kv in stores() {
            let until = trip(&kv, &s, T0);
            assert_eq!(until, T0 + s.cooldown_ms);
            let v = full_view(&kv, &s);
            assert_eq!(v.admits(T0 + 1), Admission::Open { until_ms: until });
            assert_eq!((v.samples(T0), v.failures(T0)), (4, 4));
        }
    }

    #[test]
    fn successes_keep_the_rate_below_the_threshold() {
        let s = Settings::default();
        for kv in stores() {
            for _ in 0..4 {
                outcome(&kv, &s, false, T0);
            }
            // 3 of 7 < 0.5.
            for _ in 0..3 {
                assert_eq!(outcome(&kv, &s, true, T0), Transition::None);
            }
            assert_eq!(full_view(&kv, &s).failures(T0), 3);
            // 4 of 8 reaches it.
            assert!(matches!(
                outcome(&kv, &s, true, T0),
                Transition::Opened { .. }
            ));
        }
    }

    #[test]
    fn rate_limits_and_client_errors_never_open_it() {
        let s = Settings::default();
        for cause in [
            Cause::RateLimited,
            Cause::DailyCap,
            Cause::KeyRefused,
            Cause::Client,
            Cause::ContextLength,
            Cause::ContentFilter,
            Cause::Unsupported,
        ] {
            assert!(!is_failure(&cause), "{cause:?}");
            for kv in stores() {
                for _ in 0..50 {
                    assert_eq!(outcome(&kv, &s, is_failure(&cause), T0), Transition::None);
                }
                assert_eq!(view(&kv, &s).admits(T0), Admission::Closed);
            }
        }
        assert!(is_failure(&Cause::Server));
        assert!(is_failure(&Cause::Transport));
        // What upstream judges for a 503, a timeout and a 429.
        use crate::upstream::{judge_status, judge_transport, Hints, Transport};
        assert!(is_failure(
            &judge_status(P, "k", 503, Hints::default(), None, T0).cause
        ));
        assert!(is_failure(
            &judge_transport(P, "k", &Transport::Timeout).cause
        ));
        assert!(!is_failure(
            &judge_status(P, "k", 429, Hints::default(), None, T0).cause
        ));
    }

    #[test]
    fn stays_open_during_the_cooldown() {
        let s = Settings::default();
        for kv in stores() {
            let until = trip(&kv, &s, T0);
            for t in [T0, T0 + 1, until - 1] {
                let v = view(&kv, &s);
                assert_eq!(v.admits(t), Admission::Open { until_ms: until });
                assert!(!try_probe(&kv, &v, t).unwrap());
            }
            assert_eq!(view(&kv, &s).admits(until), Admission::Probe);
        }
    }

    #[test]
    fn exactly_one_of_eight_threads_wins_the_probe() {
        let s = Settings::default();
        for redis in [false, true] {
            for round in 0..10 {
                let kv = Arc::new(if redis {
                    MemKv::redis_like()
                } else {
                    MemKv::default()
                });
                let until = trip(&kv, &s, T0);
                let start = Arc::new(Barrier::new(8));
                let handles: Vec<_> = (0..8)
                    .map(|_| {
                        let (kv, start) = (kv.clone(), start.clone());
                        std::thread::spawn(move || {
                            start.wait();
                            let v = view(&kv, &s);
                            match v.admits(until) {
                                Admission::Probe => try_probe(&*kv, &v, until).unwrap(),
                                _ => false,
                            }
                        })
                    })
                    .collect();
                let won = handles
                    .into_iter()
                    .map(|h| h.join().unwrap())
                    .filter(|w| *w)
                    .count();
                assert_eq!(won, 1, "round {round}");
                // Everyone after sees the lease taken.
                assert_eq!(
                    view(&kv, &s).admits(until + 1),
                    Admission::Open {
                        until_ms: until + s.probe_lease_ms
                    }
                );
            }
        }
    }

    #[test]
    fn a_probe_success_closes_and_old_failures_do_not_reopen_it() {
        let s = Settings::default();
        for kv in stores() {
            let until = trip(&kv, &s, T0);
            let v = probe(&kv, &s, until);
            assert_eq!(
                probe_outcome(&kv, &v, false, until + 500),
                Transition::Closed
            );
            let v = full_view(&kv, &s);
            assert_eq!(v.admits(until + 500), Admission::Closed);
            // The 4 failures are still within the window, but from before the close.
            assert_eq!(v.samples(until + 500), 0);
            assert_eq!(outcome(&kv, &s, true, until + 600), Transition::None);
            assert_eq!(full_view(&kv, &s).failures(until + 600), 1);
            // New failures do open it again, at level 0.
            outcome(&kv, &s, true, until + 700);
            outcome(&kv, &s, true, until + 800);
            assert_eq!(
                outcome(&kv, &s, true, until + 900),
                Transition::Opened {
                    until_ms: until + 900 + s.cooldown_ms,
                    level: 0
                }
            );
        }
    }

    #[test]
    fn closing_forgets_what_came_before_in_its_own_bucket_too() {
        // Trip and close in the same bucket: the trip's failures are in the close's bucket,
        // taken net of the baseline.
        let s = Settings {
            cooldown_ms: 1_000,
            ..Settings::default()
        };
        let start = s.bucket(T0) * s.bucket_ms();
        for kv in stores() {
            let until = trip(&kv, &s, start);
            assert_eq!(s.bucket(until), s.bucket(start));
            let v = probe(&kv, &s, until);
            assert_eq!(probe_outcome(&kv, &v, false, until + 1), Transition::Closed);
            assert_eq!(full_view(&kv, &s).samples(until + 1), 0);
            assert_eq!(trip(&kv, &s, until + 2), until + 2 + s.cooldown_ms);
        }
        // Close in the next bucket, after a straggler (a request admitted before the trip)
        // failed there: the trip's bucket is ignored, the straggler taken net.
        let s = Settings::default();
        for kv in stores() {
            let until = trip(&kv, &s, T0);
            assert_eq!(s.bucket(until), s.bucket(T0) + 1);
            let straggler = View::read(P, M, &[], &s);
            let o = Outcome {
                failed: true,
                probe: false,
            };
            assert_eq!(
                record(&kv, &straggler, o, until - 1).unwrap(),
                Transition::None
            );
            let v = probe(&kv, &s, until);
            assert_eq!(probe_outcome(&kv, &v, false, until + 1), Transition::Closed);
            assert_eq!(full_view(&kv, &s).samples(until + 1), 0);
            assert_eq!(trip(&kv, &s, until + 2), until + 2 + s.cooldown_ms);
        }
    }

    #[test]
    fn a_probe_failure_reopens_with_a_doubled_cooldown_up_to_the_cap() {
        let s = Settings::default();
        for kv in stores() {
            let mut now = trip(&kv, &s, T0);
            let mut expected = Vec::new();
            for level in 1..=7u32 {
                let v = probe(&kv, &s, now);
                let cd = (s.cooldown_ms << level).min(s.max_cooldown_ms);
                expected.push(cd);
                match probe_outcome(&kv, &v, true, now + 1) {
                    Transition::Reopened { until_ms, level: l } => {
                        assert_eq!((until_ms, l), (now + 1 + cd, level));
                        assert_eq!(
                            view(&kv, &s).admits(until_ms - 1),
                            Admission::Open { until_ms }
                        );
                        now = until_ms;
                    }
                    t => panic!("level {level}: {t:?}"),
                }
            }
            assert_eq!(
                expected,
                [20_000, 40_000, 80_000, 160_000, 300_000, 300_000, 300_000]
            );
            // Recovery resets the back-off.
            let v = probe(&kv, &s, now);
            assert_eq!(probe_outcome(&kv, &v, false, now), Transition::Closed);
            assert_eq!(trip(&kv, &s, now + 1), now + 1 + s.cooldown_ms);
        }
    }

    #[test]
    fn a_late_probe_result_does_not_override_a_newer_state() {
        let s = Settings {
            probes: 2,
            ..Settings::default()
        };
        let kv = MemKv::default();
        let until = trip(&kv, &s, T0);
        let a = probe(&kv, &s, until);
        let b = probe(&kv, &s, until + 1);
        assert_eq!(
            view(&kv, &s).admits(until + 2),
            Admission::Open {
                until_ms: until + s.probe_lease_ms
            }
        );
        assert!(matches!(
            probe_outcome(&kv, &a, true, until + 3),
            Transition::Reopened { level: 1, .. }
        ));
        // The other probe succeeds afterwards: the breaker stays open.
        assert_eq!(probe_outcome(&kv, &b, false, until + 4), Transition::None);
        assert!(matches!(view(&kv, &s).state, State::Open { level: 1, .. }));
    }

    #[test]
    fn the_rolling_window_forgets_old_failures() {
        let s = Settings::default();
        for kv in stores() {
            for _ in 0..3 {
                outcome(&kv, &s, true, T0);
            }
            // Half a window later they still count: one more trips it.
            assert_eq!(full_view(&kv, &s).failures(T0 + s.window_ms / 2), 3);
            // A whole window later they are gone.
            let later = T0 + s.window_ms;
            assert_eq!(full_view(&kv, &s).samples(later), 0);
            for i in 0..3 {
                assert_eq!(outcome(&kv, &s, true, later), Transition::None, "{i}");
            }
            assert!(matches!(
                outcome(&kv, &s, true, later),
                Transition::Opened { .. }
            ));
        }
    }

    #[test]
    fn concurrent_failures_open_it_once() {
        let s = Settings::default();
        for redis in [false, true] {
            let kv = Arc::new(if redis {
                MemKv::redis_like()
            } else {
                MemKv::default()
            });
            let start = Arc::new(Barrier::new(8));
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let (kv, start) = (kv.clone(), start.clone());
                    std::thread::spawn(move || {
                        let v = view(&kv, &s);
                        start.wait();
                        let o = Outcome {
                            failed: true,
                            probe: false,
                        };
                        record(&*kv, &v, o, T0).unwrap()
                    })
                })
                .collect();
            let opened = handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .filter(|t| matches!(t, Transition::Opened { .. }))
                .count();
            assert_eq!(opened, 1);
            assert_eq!(full_view(&kv, &s).failures(T0), 8);
        }
    }

    #[test]
    fn an_expired_probe_lease_lets_another_instance_probe() {
        let s = Settings::default();
        for kv in stores() {
            let until = trip(&kv, &s, T0);
            let dead = probe(&kv, &s, until);
            let expiry = until + s.probe_lease_ms;
            assert_eq!(
                view(&kv, &s).admits(expiry - 1),
                Admission::Open { until_ms: expiry }
            );
            let v = probe(&kv, &s, expiry);
            // One lease only: the expired one was dropped.
            assert_eq!(
                v.state,
                State::HalfOpen {
                    since_ms: until,
                    level: 0,
                    leases: vec![expiry]
                }
            );
            assert!(matches!(
                view(&kv, &s).state,
                State::HalfOpen { ref leases, .. } if leases == &[expiry + s.probe_lease_ms]
            ));
            assert_eq!(
                probe_outcome(&kv, &v, false, expiry + 1),
                Transition::Closed
            );
            // The dead prober's late word changes nothing.
            assert_eq!(
                probe_outcome(&kv, &dead, true, expiry + 2),
                Transition::None
            );
            assert_eq!(view(&kv, &s).admits(expiry + 2), Admission::Closed);
        }
    }

    #[test]
    fn several_probes_when_configured() {
        let s = Settings {
            probes: 3,
            ..Settings::default()
        };
        let kv = MemKv::default();
        let until = trip(&kv, &s, T0);
        for i in 0..3 {
            probe(&kv, &s, until + i);
        }
        assert_eq!(
            view(&kv, &s).admits(until + 3),
            Admission::Open {
                until_ms: until + s.probe_lease_ms
            }
        );
    }

    /// A closed breaker with no failure in its window writes nothing for a success; the first
    /// failure marks the state, and the successes after it dilute the rate as usual.
    #[test]
    fn quiet_successes_write_nothing_and_count_after_a_failure() {
        let s = Settings::default();
        for kv in stores() {
            for i in 0..5 {
                assert_eq!(outcome(&kv, &s, false, T0 + i), Transition::None);
            }
            let counters = kv.get_many(&window_keys(P, M)).unwrap();
            assert!(counters.iter().all(Option::is_none), "{counters:?}");
            assert_eq!(outcome(&kv, &s, true, T0 + 10), Transition::None);
            assert!(matches!(
                view(&kv, &s).state,
                State::Closed {
                    failed_ms: Some(t),
                    ..
                } if t == T0 + 10
            ));
            for i in 0..6 {
                assert_eq!(outcome(&kv, &s, false, T0 + 20 + i), Transition::None);
            }
            // 1 failure in 7 samples; three more failures make 4 in 10: under the rate.
            for i in 0..3 {
                assert_eq!(outcome(&kv, &s, true, T0 + 30 + i), Transition::None);
            }
            assert_eq!(full_view(&kv, &s).samples(T0 + 40), 10);
            // A window later, with no failure since, successes write nothing again.
            let later = T0 + 2 * s.window_ms;
            let before = kv.get_many(&window_keys(P, M)).unwrap();
            assert_eq!(outcome(&kv, &s, false, later), Transition::None);
            assert_eq!(kv.get_many(&window_keys(P, M)).unwrap(), before);
        }
    }

    #[test]
    fn the_state_survives_a_round_trip_through_bytes() {
        for state in [
            State::default(),
            State::Closed {
                since_ms: 5,
                failed_ms: Some(7),
                base: Baseline {
                    bucket: 9,
                    ok: 3,
                    failed: 4,
                },
            },
            State::Open {
                since_ms: 1,
                until_ms: 2,
                level: 3,
            },
            State::HalfOpen {
                since_ms: 1,
                level: 2,
                leases: vec![7, 8],
            },
        ] {
            let bytes = state.encode();
            assert_eq!(State::decode(&bytes), Some(state.clone()));
            assert_eq!(
                View::read(P, M, &[Some(bytes)], &Settings::default()).state,
                state
            );
        }
        assert_eq!(
            String::from_utf8(
                State::Open {
                    since_ms: 1,
                    until_ms: 2,
                    level: 3
                }
                .encode()
            )
            .unwrap(),
            r#"{"state":"open","since_ms":1,"until_ms":2,"level":3}"#
        );
        // A closed state written without a baseline reads with none.
        assert_eq!(
            State::decode(br#"{"state":"closed","since_ms":3}"#),
            Some(State::Closed {
                since_ms: 3,
                base: Baseline::default(),
                failed_ms: None,
            })
        );
    }

    #[test]
    fn garbage_reads_as_closed_and_is_replaced_when_it_trips() {
        let s = Settings::default();
        for kv in stores() {
            for junk in [&b"junk"[..], b"", b"{\"state\":\"open\"}", &[0xff; 8]] {
                kv.set(&state_keys(P, M)[0], junk).unwrap();
                for key in window_keys(P, M) {
                    kv.set(&key, b"not a counter").unwrap();
                }
                let v = full_view(&kv, &s);
                assert_eq!(v.admits(T0), Admission::Closed);
                assert_eq!(v.samples(T0), 0);
                assert!(!try_probe(&kv, &v, T0).unwrap());
                for key in window_keys(P, M) {
                    kv.delete(&key).unwrap();
                }
                trip(&kv, &s, T0);
                kv.delete(&state_keys(P, M)[0]).unwrap();
                for key in window_keys(P, M) {
                    kv.delete(&key).unwrap();
                }
            }
        }
        // Missing values read as closed too.
        assert_eq!(View::read(P, M, &[], &s).admits(T0), Admission::Closed);
    }

    #[test]
    fn settings_from_variables() {
        let none = |_: &str| None;
        assert_eq!(Settings::from_vars(none), Ok(Settings::default()));
        use crate::config::tests::vars;
        let s = Settings::from_vars(vars(&[
            (FAILURE_RATE, " 0.25 "),
            (MIN_SAMPLES, "10"),
            (WINDOW_MS, "60000"),
            (COOLDOWN_MS, "5000"),
            (MAX_COOLDOWN_MS, ""),
            (PROBES, "2"),
            (PROBE_LEASE_MS, "9000"),
        ]))
        .unwrap();
        assert_eq!(
            s,
            Settings {
                failure_rate: 0.25,
                min_samples: 10,
                window_ms: 60_000,
                cooldown_ms: 5_000,
                max_cooldown_ms: 300_000,
                probes: 2,
                probe_lease_ms: 9_000,
            }
        );
        // A long cool-down lifts the default cap with it.
        let s = Settings::from_vars(vars(&[(COOLDOWN_MS, "600000")])).unwrap();
        assert_eq!(s.max_cooldown_ms, 600_000);
        for (name, bad) in [
            (FAILURE_RATE, "0"),
            (FAILURE_RATE, "1.5"),
            (FAILURE_RATE, "half"),
            (FAILURE_RATE, "NaN"),
            (MIN_SAMPLES, "0"),
            (MIN_SAMPLES, "-1"),
            (WINDOW_MS, "1"),
            (COOLDOWN_MS, "0"),
            (PROBES, "0"),
            (PROBES, "100000"),
            (PROBE_LEASE_MS, "soon"),
        ] {
            let err =
                Settings::from_vars(|n: &str| (n == name).then(|| bad.to_string())).unwrap_err();
            assert!(err.contains(&format!("`{name}`")), "{err}");
        }
        let err = Settings::from_vars(vars(&[(COOLDOWN_MS, "5000"), (MAX_COOLDOWN_MS, "10")]))
            .unwrap_err();
        assert!(err.contains(MAX_COOLDOWN_MS), "{err}");
        assert_eq!(VARIABLES.len(), 7);
        assert!(VARIABLES.iter().all(|v| v.starts_with("breaker_")));
    }

    #[test]
    fn keys_put_the_model_last_and_are_documented() {
        let doc = include_str!("../kv-schema/README.md");
        let state = &state_keys(P, M)[0];
        assert_eq!(state, &format!("breaker:v1:{P}:state:{M}"));
        let window = window_keys(P, M);
        assert_eq!(
            window,
            ["s0", "f0", "s1", "f1"].map(|k| format!("breaker:v1:{P}:{k}:{M}"))
        );
        for key in window.iter().chain([state]) {
            assert!(keys::PREFIXES.iter().any(|p| key.starts_with(p)), "{key}");
            let parts: Vec<&str> = key.splitn(5, ':').collect();
            assert_eq!((parts[2], parts[4]), (P, M), "{key}");
        }
        assert!(doc.contains("`breaker:v1:<provider>:state:<model>`"));
        assert!(doc.contains("`breaker:v1:<provider>:s<slot>:<model>`"));
        assert!(doc.contains("`breaker:v1:<provider>:f<slot>:<model>`"));
        assert!(doc.contains("## Circuit breakers"));
    }
}
