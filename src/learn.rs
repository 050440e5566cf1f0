//! What the router learns from outcomes, per provider-model and task family: the chance of
//! success, the time to answer and a quality signal, decayed so that yesterday's outage fades,
//! blended with the catalogue's priors until enough outcomes are seen.

use crate::catalog::ModelInfo;
use crate::kv::{self, Kv, KvResult};
use crate::profile::Family;
use serde::{Deserialize, Serialize};

/// Outcomes lose half their weight after this long: a provider that recovers is trusted again
/// within hours, and a day of traffic still outweighs a single bad minute.
pub const HALF_LIFE_MS: u64 = 6 * 3_600_000;

/// The priors count as this many outcomes: the first few real ones move the estimate, but one
/// failure cannot sink a model (Beta(α, β) with α + β = 8).
pub const PRIOR_WEIGHT: f64 = 8.0;

/// P(success) before anything is learned: free tiers fail more often (cold starts, overload).
pub const PRIOR_SUCCESS_FREE: f64 = 0.93;
pub const PRIOR_SUCCESS_PAID: f64 = 0.98;

/// Above this many (decayed) outcomes a success is recorded with probability 1/4 and weight 4:
/// the estimate stays unbiased while three successes in four write nothing.
pub const SAMPLE_ABOVE: f64 = 32.0;
pub const SAMPLE_EVERY: u64 = 4;

/// `learn:v1:<provider>:<model>:<family>` — JSON [`Stats`].
pub fn key(provider: &str, model: &str, family: Family) -> String {
    format!("learn:v1:{provider}:{model}:{}", family.as_str())
}

/// Decayed sums of outcomes, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Stats {
    /// Outcomes seen (decayed weight).
    pub n: f64,
    /// Of which successes.
    pub ok: f64,
    /// Sum of the quality signal over successes.
    pub q: f64,
    /// Sum of latency (ms) over successes.
    pub lat: f64,
    /// When the sums were last decayed (ms since the epoch).
    pub t: u64,
}

/// One request's outcome on one provider-model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    pub success: bool,
    /// 0..1: 1 for a complete answer that met the request's contract; lower for a truncated
    /// answer, an empty one, broken JSON where JSON was asked, a missing forced tool call.
    pub quality: f64,
    /// Time to the answer's head (ms).
    pub latency_ms: u64,
}

impl Stats {
    pub fn decode(bytes: Option<&[u8]>) -> Option<Self> {
        bytes.and_then(|b| serde_json::from_slice(b).ok())
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The sums as of `now_ms`.
    pub fn decayed(&self, now_ms: u64) -> Self {
        let dt = now_ms.saturating_sub(self.t) as f64;
        let f = 0.5f64.powf(dt / HALF_LIFE_MS as f64);
        Self {
            n: self.n * f,
            ok: self.ok * f,
            q: self.q * f,
            lat: self.lat * f,
            t: now_ms.max(self.t),
        }
    }

    /// Adds one outcome of weight `w` (pure: the caller stores the result).
    pub fn add(&self, o: Outcome, w: f64, now_ms: u64) -> Self {
        let mut s = self.decayed(now_ms);
        s.n += w;
        if o.success {
            s.ok += w;
            s.q += w * o.quality.clamp(0.0, 1.0);
            s.lat += w * o.latency_ms as f64;
        }
        s
    }
}

/// What the catalogue says before anything is learned.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Prior {
    pub success: f64,
    pub quality: f64,
    pub latency_ms: f64,
}

impl Prior {
    /// The prior of a model for a task family: its quality, +0.05 where it is strong.
    pub fn of(info: &ModelInfo, paid: bool, latency_ms: u32, family: Family) -> Self {
        let strong = info.strong.contains(&family.as_str());
        Self {
            success: if paid {
                PRIOR_SUCCESS_PAID
            } else {
                PRIOR_SUCCESS_FREE
            },
            quality: (info.quality as f64 + if strong { 0.05 } else { 0.0 }).min(1.0),
            latency_ms: latency_ms as f64,
        }
    }
}

/// The blended estimate the router scores with.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Estimate {
    pub success: f64,
    pub quality: f64,
    pub latency_ms: f64,
    /// Outcomes learned (decayed), for the exploration bonus.
    pub n: f64,
}

/// Blends the prior (worth [`PRIOR_WEIGHT`] outcomes) with what was learned.
pub fn estimate(prior: Prior, stats: Option<Stats>, now_ms: u64) -> Estimate {
    let s = stats.map(|s| s.decayed(now_ms)).unwrap_or_default();
    let k = PRIOR_WEIGHT;
    Estimate {
        success: (prior.success * k + s.ok) / (k + s.n),
        quality: (prior.quality * k + s.q) / (k + s.ok),
        latency_ms: (prior.latency_ms * k + s.lat) / (k + s.ok),
        n: s.n,
    }
}

/// The weight to record `o` with, or `None` to skip it (sampled successes, see
/// [`SAMPLE_ABOVE`]); `draw` is a random number.
pub fn weight(stats: Option<&Stats>, o: &Outcome, draw: u64) -> Option<f64> {
    let n = stats.map_or(0.0, |s| s.n);
    if !o.success || o.quality < 1.0 || n < SAMPLE_ABOVE {
        return Some(1.0);
    }
    (draw % SAMPLE_EVERY == 0).then_some(SAMPLE_EVERY as f64)
}

/// Records an outcome atomically (compare-and-swap on the model's record; a sampled-out
/// success reads and writes nothing more). Returns whether it wrote.
pub fn record(
    store: &(impl Kv + ?Sized),
    key: &str,
    o: Outcome,
    draw: u64,
    now_ms: u64,
) -> KvResult<bool> {
    kv::cas_update(store, key, |current| {
        let s = Stats::decode(current).unwrap_or(Stats {
            t: now_ms,
            ..Stats::default()
        });
        let w = weight(Some(&s), &o, draw)?;
        Some(s.add(o, w, now_ms).encode())
    })
}

/// The quality signal of an answer: what can be checked without a judge.
pub fn quality_signal(
    finish_reason: Option<&str>,
    text: &str,
    tool_calls: bool,
    json_asked: bool,
    tool_forced: bool,
) -> f64 {
    if tool_forced && !tool_calls {
        return 0.3;
    }
    if !tool_calls && text.trim().is_empty() {
        return 0.1;
    }
    if json_asked && !tool_calls && serde_json::from_str::<serde_json::Value>(text.trim()).is_err()
    {
        return 0.0;
    }
    match finish_reason {
        Some("length") => 0.4,
        Some("content_filter") => 0.2,
        _ => 1.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::MemKv;

    fn ok(ms: u64) -> Outcome {
        Outcome {
            success: true,
            quality: 1.0,
            latency_ms: ms,
        }
    }

    fn prior() -> Prior {
        Prior {
            success: 0.9,
            quality: 0.6,
            latency_ms: 1000.0,
        }
    }

    #[test]
    fn the_prior_alone_is_the_estimate_and_outcomes_move_it() {
        let e = estimate(prior(), None, 0);
        assert_eq!(
            (e.success, e.quality, e.latency_ms, e.n),
            (0.9, 0.6, 1000.0, 0.0)
        );
        let mut s = Stats::default();
        for _ in 0..8 {
            s = s.add(
                Outcome {
                    success: false,
                    quality: 0.0,
                    latency_ms: 0,
                },
                1.0,
                0,
            );
        }
        let e = estimate(prior(), Some(s), 0);
        assert!((e.success - 0.45).abs() < 1e-9, "{e:?}");
        // Latency and quality are learned from successes only.
        assert_eq!(e.latency_ms, 1000.0);
        let s = (0..24).fold(Stats::default(), |s, _| s.add(ok(200), 1.0, 0));
        let e = estimate(prior(), Some(s), 0);
        assert!((e.latency_ms - 400.0).abs() < 1e-9, "{e:?}");
        assert!(e.success > 0.97 && e.quality > 0.89);
    }

    #[test]
    fn outcomes_fade_with_the_half_life() {
        let s = Stats::default().add(ok(100), 10.0, 0);
        let later = s.decayed(HALF_LIFE_MS);
        assert!((later.n - 5.0).abs() < 1e-9);
        assert_eq!(later.t, HALF_LIFE_MS);
        // A clock that went back does not inflate the sums.
        assert_eq!(s.decayed(0).n, 10.0);
    }

    #[test]
    fn successes_are_sampled_once_well_known_and_failures_never() {
        let known = Stats {
            n: 100.0,
            ..Stats::default()
        };
        assert_eq!(weight(Some(&known), &ok(1), 4), Some(4.0));
        assert_eq!(weight(Some(&known), &ok(1), 5), None);
        let bad = Outcome {
            success: false,
            quality: 0.0,
            latency_ms: 0,
        };
        assert_eq!(weight(Some(&known), &bad, 5), Some(1.0));
        assert_eq!(weight(None, &ok(1), 5), Some(1.0));
    }

    #[test]
    fn record_is_a_compare_and_swap_that_keeps_concurrent_outcomes() {
        let kv = MemKv::default();
        let k = key("groq", "m", Family::Code);
        assert_eq!(k, "learn:v1:groq:m:code");
        for i in 0..5 {
            assert!(record(&kv, &k, ok(100 * (i + 1)), 1, 1000).unwrap());
        }
        let s = Stats::decode(kv.get(&k).unwrap().as_deref()).unwrap();
        assert_eq!((s.n, s.ok, s.lat), (5.0, 5.0, 1500.0));
    }

    #[test]
    fn the_quality_signal_checks_the_contract() {
        assert_eq!(quality_signal(Some("stop"), "hi", false, false, false), 1.0);
        assert_eq!(
            quality_signal(Some("length"), "hi", false, false, false),
            0.4
        );
        assert_eq!(quality_signal(Some("stop"), "  ", false, false, false), 0.1);
        assert_eq!(
            quality_signal(Some("stop"), "{\"a\":1}", false, true, false),
            1.0
        );
        assert_eq!(
            quality_signal(Some("stop"), "sure! {", false, true, false),
            0.0
        );
        assert_eq!(
            quality_signal(Some("stop"), "no call", false, false, true),
            0.3
        );
        assert_eq!(
            quality_signal(Some("tool_calls"), "", true, false, true),
            1.0
        );
    }
}
