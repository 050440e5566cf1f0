//! Edge state around one request: what its one batched read fetches (cool-downs and quota
//! counters, breakers, AIMD windows, budgets, the cache's index) and how that state shapes the
//! plan before the first attempt — and, at each attempt, whether the candidate may be sent now.
//!
//! Order of the shaping, each step narrowing what the next sees:
//! 1. budgets: a spent budget takes the paid candidates out (the `insufficient_quota` error if
//!    nothing free is left); under `auto`, a thin one takes them out while a free one remains;
//! 2. breakers: an open provider-model is passed over (503 with `Retry-After` if all are);
//! 3. cool-downs and quotas ([`Plan::usable`], applied by the caller on [`Snapshot::plan`]);
//! 4. AIMD: providers at their concurrency window go to the back of the plan, not out of it.

use crate::aimd;
use crate::breaker::{self, Admission};
use crate::budget::{self, Health, Tenant};
use crate::cache;
use crate::catalog::Tier;
use crate::config::Config;
use crate::error::ApiError;
use crate::event::Event;
use crate::kv::{Kv, KvResult};
use crate::quota::Class;
use crate::route::{Candidate, Mode, Plan};
use crate::{quota, stats};

/// The deployment's edge-state settings, read with the rest of the configuration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    pub breaker: breaker::Settings,
    pub aimd: aimd::Settings,
    pub budgets: budget::Budgets,
    pub cache: cache::Policy,
}

/// The cache's variables: `cache` (`off`, `exact` or `semantic`), `cache_ttl_s`,
/// `cache_similarity` (the semantic threshold, above 0 and at most 1), `cache_max_entries`.
pub const CACHE_VARIABLES: &[&str] = &[
    "cache",
    "cache_ttl_s",
    "cache_similarity",
    "cache_max_entries",
];

impl Settings {
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        Ok(Self {
            breaker: breaker::Settings::from_vars(&get)?,
            aimd: aimd::Settings::from_vars(&get)?,
            budgets: budget::Budgets::from_vars(&get)?,
            cache: cache_policy(&get)?,
        })
    }

    /// Every variable these settings read.
    pub fn variables() -> impl Iterator<Item = &'static str> {
        breaker::VARIABLES
            .iter()
            .chain(aimd::VARIABLES)
            .chain(budget::VARIABLES)
            .chain(CACHE_VARIABLES)
            .copied()
    }
}

fn cache_policy(get: impl Fn(&str) -> Option<String>) -> Result<cache::Policy, String> {
    let var = |n: &str| get(n).map(|v| v.trim().to_owned()).unwrap_or_default();
    let mode = match var("cache").to_ascii_lowercase().as_str() {
        "" | "semantic" => cache::Mode::Semantic,
        "exact" => cache::Mode::Exact,
        "off" => cache::Mode::Off,
        other => {
            return Err(format!(
                "variable `cache` must be `off`, `exact` or `semantic`, got {other:?}"
            ))
        }
    };
    let mut p = cache::Policy {
        mode,
        ..cache::Policy::default()
    };
    let whole = |n: &str, max: u64| -> Result<Option<u64>, String> {
        match var(n).as_str() {
            "" => Ok(None),
            raw => match raw.parse::<u64>() {
                Ok(v) if (1..=max).contains(&v) => Ok(Some(v)),
                _ => Err(format!(
                    "variable `{n}` must be a whole number from 1 to {max}, got {raw:?}"
                )),
            },
        }
    };
    if let Some(s) = whole("cache_ttl_s", 30 * 86_400)? {
        p.ttl_ms = s * 1000;
    }
    if let Some(n) = whole("cache_max_entries", 1_000_000)? {
        p.max_entries = n as u32;
    }
    match var("cache_similarity").as_str() {
        "" => {}
        raw => match raw.parse::<f64>() {
            Ok(t) if t > 0.0 && t <= 1.0 => p.threshold = t,
            _ => {
                return Err(format!(
                    "variable `cache_similarity` must be a number above 0 and at most 1, got \
                     {raw:?}"
                ))
            }
        },
    }
    Ok(p)
}

/// The keys of a request's one batched read, and where each part's values are.
#[derive(Debug, Clone)]
pub struct Reads {
    pub keys: Vec<String>,
    plan: usize,
    /// One breaker state key per distinct provider-model, in plan order.
    breakers: Vec<(String, String)>,
    /// One AIMD group of keys per distinct provider.
    providers: Vec<(String, usize)>,
    budget: usize,
    extra: usize,
}

impl Reads {
    /// Everything to read before the first attempt: the plan's cool-downs and quota counters
    /// ([`Plan::state_keys`]; a background request's own cool-downs too), then each
    /// provider-model's breaker, each provider's AIMD window and leases, the tenant's budgets,
    /// then `extra` (the cache's index key, when the request is cacheable). Pass the same
    /// `class` to [`Plan::usable`] with [`Snapshot::plan`].
    pub fn of(
        config: &Config,
        plan: &Plan,
        tenant: &Tenant,
        extra: &[String],
        class: Class,
        now_ms: u64,
    ) -> Self {
        let mut keys = plan.state_keys(config, class);
        let plan_n = keys.len();
        let mut breakers: Vec<(String, String)> = Vec::new();
        let mut providers: Vec<(String, usize)> = Vec::new();
        for c in &plan.candidates {
            if !breakers
                .iter()
                .any(|(p, m)| *p == c.provider && *m == c.model)
            {
                breakers.push((c.provider.clone(), c.model.clone()));
            }
        }
        for (p, m) in &breakers {
            keys.extend(breaker::state_keys(p, m));
        }
        for c in &plan.candidates {
            if !providers.iter().any(|(p, _)| *p == c.provider) {
                let k = aimd::state_keys(&c.provider, now_ms, &config.edge.aimd);
                providers.push((c.provider.clone(), k.len()));
                keys.extend(k);
            }
        }
        // Budgets only bear on paid candidates: a plan without one reads none.
        let paid = plan.candidates.iter().any(|c| {
            config
                .provider(&c.provider)
                .is_some_and(|p| p.tier == Tier::Paid)
        });
        let b = if paid {
            budget::state_keys(&config.edge.budgets, tenant)
        } else {
            Vec::new()
        };
        let budget = b.len();
        keys.extend(b);
        keys.extend(extra.iter().cloned());
        Self {
            keys,
            plan: plan_n,
            breakers,
            providers,
            budget,
            extra: extra.len(),
        }
    }

    /// Splits the values read (in the order of [`Self::keys`]; missing values — a store that
    /// could not be read — count as absent: closed breakers, initial windows, nothing spent).
    pub fn split(
        &self,
        config: &Config,
        tenant: &Tenant,
        values: Vec<Option<Vec<u8>>>,
        now_ms: u64,
    ) -> Snapshot {
        let mut values = values.into_iter().chain(std::iter::repeat(None));
        let mut take = |n: usize| -> Vec<Option<Vec<u8>>> { values.by_ref().take(n).collect() };
        let plan = take(self.plan);
        let s = &config.edge;
        let breakers = self
            .breakers
            .iter()
            .map(|(p, m)| {
                let v = take(breaker::state_keys(p, m).len());
                breaker::View::read(p, m, &v, &s.breaker)
            })
            .collect();
        let aimd = self
            .providers
            .iter()
            .map(|(p, n)| aimd::View::read(p, &take(*n), now_ms, &s.aimd))
            .collect();
        let health = if self.budget > 0 {
            Health::read(&s.budgets, tenant, &take(self.budget), now_ms)
        } else {
            Health::default()
        };
        let extra = take(self.extra);
        Snapshot {
            plan_keys: self.keys[..self.plan.min(self.keys.len())].to_vec(),
            plan,
            breakers,
            aimd,
            health,
            extra,
        }
    }
}

/// The state one request read before its first attempt.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// For [`Plan::usable`], in the order of the plan as read: after [`shape`] reorders it, use
    /// [`Snapshot::plan_values`].
    pub plan: Vec<Option<Vec<u8>>>,
    /// The keys of `plan`'s values.
    plan_keys: Vec<String>,
    pub breakers: Vec<breaker::View>,
    pub aimd: Vec<aimd::View>,
    pub health: Health,
    /// The values of the extra keys.
    pub extra: Vec<Option<Vec<u8>>>,
}

impl Snapshot {
    /// The values [`Plan::usable`] takes for `plan` (its keys' values as read, by key): a plan
    /// that [`shape`] reordered does not match the order the values were read in.
    pub fn plan_values(
        &self,
        plan: &Plan,
        config: &Config,
        class: quota::Class,
    ) -> Vec<Option<Vec<u8>>> {
        plan.state_keys(config, class)
            .iter()
            .map(|k| {
                self.plan_keys
                    .iter()
                    .position(|have| have == k)
                    .and_then(|i| self.plan.get(i).cloned().flatten())
            })
            .collect()
    }

    pub fn breaker(&self, provider: &str, model: &str) -> Option<&breaker::View> {
        self.breakers
            .iter()
            .find(|v| v.provider == provider && v.model == model)
    }

    pub fn aimd(&self, provider: &str) -> Option<&aimd::View> {
        self.aimd.iter().find(|v| v.provider == provider)
    }
}

/// Steps 1, 2 and 4 of the shaping (the module doc). `events` receives what was passed over
/// and why, whether the plan survives or not.
pub fn shape(
    mut plan: Plan,
    config: &Config,
    snap: &Snapshot,
    mode: Mode,
    now_ms: u64,
    events: &mut Vec<Event>,
) -> Result<Plan, ApiError> {
    let tier = |c: &Candidate| config.provider(&c.provider).map_or(Tier::Free, |p| p.tier);
    let skipped = |c: &Candidate, reason: &'static str| Event::Skipped {
        provider: c.provider.clone(),
        model: c.model.clone(),
        reason,
    };

    // 1. Budgets.
    let has_free = |p: &Plan| p.candidates.iter().any(|c| tier(c) == Tier::Free);
    let refusal = snap.health.refusal(now_ms);
    let drop_paid = match &refusal {
        Some(_) => Some("budget_spent"),
        None if mode == Mode::Auto && snap.health.lean_free() && has_free(&plan) => {
            Some("budget_thin")
        }
        None => None,
    };
    if let Some(reason) = drop_paid {
        plan.candidates.retain(|c| {
            let keep = tier(c) == Tier::Free;
            if !keep {
                events.push(skipped(c, reason));
            }
            keep
        });
        if plan.candidates.is_empty() {
            if let Some(e) = refusal {
                if let Some(b) = snap.health.budgets.iter().find(|b| b.exhausted) {
                    events.push(Event::BudgetExhausted {
                        scope: b.scope.clone(),
                        period: b.period.as_str().to_owned(),
                    });
                }
                return Err(e);
            }
        }
    }

    // 2. Breakers.
    let mut reopens: Option<u64> = None;
    plan.candidates
        .retain(|c| match snap.breaker(&c.provider, &c.model) {
            Some(v) => match v.admits(now_ms) {
                Admission::Open { until_ms } => {
                    reopens = Some(reopens.map_or(until_ms, |r| r.min(until_ms)));
                    events.push(skipped(c, "breaker_open"));
                    false
                }
                Admission::Closed | Admission::Probe => true,
            },
            None => true,
        });
    if plan.candidates.is_empty() {
        let secs = reopens.map(|u| u.saturating_sub(now_ms).div_ceil(1000).max(1));
        return Err(ApiError::unavailable(
            format!(
                "Every candidate for this request is failing: their circuit breakers are open \
                 after repeated upstream errors{}.",
                secs.map_or(String::new(), |s| format!(
                    "; the first may be tried again in {s} seconds"
                ))
            ),
            secs,
        ));
    }

    // 4. AIMD: candidates of providers at their window go last, in order.
    let (room, full): (Vec<Candidate>, Vec<Candidate>) = plan
        .candidates
        .into_iter()
        .partition(|c| snap.aimd(&c.provider).is_none_or(|v| v.has_room()));
    if !room.is_empty() {
        for c in &full {
            events.push(skipped(c, "aimd_full"));
        }
    }
    plan.candidates = room.into_iter().chain(full).collect();
    Ok(plan)
}

/// What an attempt on a candidate may do, decided right before it is sent.
#[derive(Debug)]
pub enum Gate {
    /// Send it. `probe`: it is its breaker's half-open probe. `lease`: its AIMD admission, to be
    /// released when the attempt ends (`None` when sent over the window as the last resort).
    Go {
        probe: bool,
        lease: Option<aimd::Admitted>,
    },
    /// Pass over it (the event says why) and try the next candidate; the error is what the
    /// client gets if nothing else is left.
    Pass(Box<(Event, ApiError)>),
}

/// Takes the candidate's breaker probe if it needs one, then its provider's AIMD admission. A
/// provider over its window is passed over while another candidate is left (`others_left`);
/// the last one is sent anyway: AIMD shapes traffic, it never refuses a request by itself.
pub fn gate(
    kv: &(impl Kv + ?Sized),
    snap: &Snapshot,
    c: &Candidate,
    others_left: bool,
    now_ms: u64,
) -> KvResult<Gate> {
    let pass = |reason: &'static str, error: ApiError| {
        Gate::Pass(Box::new((
            Event::Skipped {
                provider: c.provider.clone(),
                model: c.model.clone(),
                reason,
            },
            error,
        )))
    };
    let mut probe = false;
    if let Some(v) = snap.breaker(&c.provider, &c.model) {
        match v.admits(now_ms) {
            Admission::Closed => {}
            Admission::Probe => {
                if breaker::try_probe(kv, v, now_ms)? {
                    probe = true;
                } else {
                    let wait = v.settings.probe_lease_ms.div_ceil(1000).max(1);
                    return Ok(pass(
                        "probe_taken",
                        ApiError::unavailable(
                            format!(
                                "`{}/{}` is recovering from upstream errors and another \
                                 request is testing it; retry shortly.",
                                c.provider, c.model
                            ),
                            Some(wait.min(5)),
                        ),
                    ));
                }
            }
            Admission::Open { until_ms } => {
                let secs = until_ms.saturating_sub(now_ms).div_ceil(1000).max(1);
                return Ok(pass(
                    "breaker_open",
                    ApiError::unavailable(
                        format!(
                            "`{}/{}` is failing: its circuit breaker is open.",
                            c.provider, c.model
                        ),
                        Some(secs),
                    ),
                ));
            }
        }
    }
    let lease = match snap.aimd(&c.provider) {
        Some(v) => match aimd::admit(kv, v, now_ms)? {
            aimd::Admission::Admitted(a) => Some(a),
            aimd::Admission::Refused { .. } if others_left && !probe => {
                return Ok(pass(
                    "aimd_full",
                    ApiError::unavailable(
                        format!("`{}` is at its concurrency limit.", c.provider),
                        Some(1),
                    ),
                ))
            }
            aimd::Admission::Refused { .. } => None,
        },
        None => None,
    };
    Ok(Gate::Go { probe, lease })
}

/// Records an attempt's outcome on its provider-model's breaker (a request that was sent:
/// `failed` is [`breaker::is_failure`] of its cause, or a stream broken after its 200); the
/// event says when the breaker changed state.
pub fn breaker_outcome(
    kv: &(impl Kv + ?Sized),
    snap: &Snapshot,
    c: &Candidate,
    failed: bool,
    probe: bool,
    now_ms: u64,
) -> KvResult<Option<Event>> {
    let Some(v) = snap.breaker(&c.provider, &c.model) else {
        return Ok(None);
    };
    let t = breaker::record(kv, v, breaker::Outcome { failed, probe }, now_ms)?;
    let event = |transition: &'static str, until_ms: Option<u64>, level: Option<u32>| {
        Some(Event::Breaker {
            provider: c.provider.clone(),
            model: c.model.clone(),
            transition,
            until_ms,
            level,
        })
    };
    Ok(match t {
        breaker::Transition::None => None,
        breaker::Transition::Opened { until_ms, level } => {
            event("opened", Some(until_ms), Some(level))
        }
        breaker::Transition::Reopened { until_ms, level } => {
            event("reopened", Some(until_ms), Some(level))
        }
        breaker::Transition::Closed => event("closed", None, None),
    })
}

/// A 429 or a timeout met by a request sent without a lease (over the window, as the last
/// candidate): the window is halved all the same, once per congestion event as for leased ones
/// (`admitted_ms`: when the request was sent).
pub fn aimd_congestion_unleased(
    kv: &(impl Kv + ?Sized),
    settings: &aimd::Settings,
    provider: &str,
    admitted_ms: u64,
    now_ms: u64,
) -> KvResult<Option<Event>> {
    let lease = aimd::Lease {
        provider: provider.to_owned(),
        slot: 0,
        period: 0,
        admitted_ms,
    };
    Ok(
        aimd::on_congestion(kv, &lease, now_ms, settings)?.map(|limit| Event::Aimd {
            provider: provider.to_owned(),
            change: "cut",
            limit,
        }),
    )
}

/// Ends an attempt's AIMD lease: widens the window after a success near it, halves it on
/// congestion (a 429 or a timeout), and releases the lease. The event says when the window
/// moved.
#[allow(clippy::too_many_arguments)]
pub fn aimd_outcome(
    kv: &(impl Kv + ?Sized),
    settings: &aimd::Settings,
    held: &aimd::Admitted,
    success: bool,
    congestion: bool,
    draw: u64,
    now_ms: u64,
) -> KvResult<Option<Event>> {
    let moved = if success {
        aimd::on_success(kv, held, settings, draw)?.map(|l| ("grow", l))
    } else if congestion {
        aimd::on_congestion(kv, &held.lease, now_ms, settings)?.map(|l| ("cut", l))
    } else {
        None
    };
    aimd::release(kv, &held.lease, now_ms, settings)?;
    Ok(moved.map(|(change, limit)| Event::Aimd {
        provider: held.lease.provider.clone(),
        change,
        limit,
    }))
}

// ---------------------------------------------------------------------------------------------
// `GET /v1/freerelay/state`: what the dashboard and the CLI draw.

/// What the state endpoint reads, in one batch: every configured provider-model's breaker (state
/// and outcome window), every provider's AIMD window and leases, the caller's budgets, every key
/// ledger's quota counters, and the cache's counters.
pub fn state_keys(config: &Config, tenant: &Tenant, now_ms: u64) -> Vec<String> {
    let mut out = Vec::new();
    for (p, m) in provider_models(config) {
        out.extend(breaker::state_keys(p, m));
        out.extend(breaker::window_keys(p, m));
    }
    for c in &config.providers {
        out.extend(aimd::state_keys(c.provider.id, now_ms, &config.edge.aimd));
    }
    out.extend(budget::state_keys(&config.edge.budgets, tenant));
    for (c, key, _) in ledgers(config) {
        let q = quota::QuotaRef::of(c, &key.model, key.ledger.as_deref(), &key.key_id);
        out.extend(quota::counter_keys(&q).into_iter().map(|(_, k)| k));
    }
    out.extend(stats::cache_keys());
    out
}

fn provider_models(config: &Config) -> Vec<(&'static str, &str)> {
    config
        .providers
        .iter()
        .flat_map(|c| c.model_ids().into_iter().map(move |m| (c.provider.id, m)))
        .collect()
}

/// One quota ledger of one key, named for the report.
struct LedgerKey {
    key_id: String,
    model: String,
    ledger: Option<String>,
}

/// Every (provider, key, ledger) with a limit, each once (a pool's models share one ledger).
fn ledgers(config: &Config) -> Vec<(&crate::config::Configured, LedgerKey, ())> {
    let mut out: Vec<(&crate::config::Configured, LedgerKey, ())> = Vec::new();
    for c in &config.providers {
        for m in c.model_ids() {
            let cand = crate::route::candidate(c, m, String::new(), 0);
            for k in &c.keys {
                let seen = out.iter().any(|(o, l, _)| {
                    o.provider.id == c.provider.id && l.key_id == k.id && l.ledger == cand.ledger
                });
                let q = quota::QuotaRef::of(c, m, cand.ledger.as_deref(), &k.id);
                if !seen && q.limited().next().is_some() {
                    out.push((
                        c,
                        LedgerKey {
                            key_id: k.id.clone(),
                            model: m.to_owned(),
                            ledger: cand.ledger.clone(),
                        },
                        (),
                    ));
                }
            }
        }
    }
    out
}

/// The state endpoint's JSON from the values of [`state_keys`]:
/// `{now_ms, breakers: [{provider, model, state, samples, failures, until_ms?, level}],
/// aimd: [{provider, limit, allowed, in_flight}], budgets: {tenant, lean_free, scopes: [{scope:
/// global|tenant|user, id, period: day|month, limit_usd?, spent_usd, spent_micro_usd,
/// remaining_usd?, fraction_left?, resets_at, resets_at_ms, rate_usd_per_hour,
/// predicted_runout_at?, predicted_runout_ms?}]}, quotas: [{provider, key, ledger, kind, count,
/// limit, resets_at_ms, predicted_runout_ms?}], cache: {hits_exact, hits_semantic, misses,
/// stores, too_large}}`.
pub fn state_report(
    config: &Config,
    tenant: &Tenant,
    values: &[Option<Vec<u8>>],
    now_ms: u64,
) -> serde_json::Value {
    use serde_json::json;
    let mut values = values.iter().cloned().chain(std::iter::repeat(None));
    let mut take = |n: usize| -> Vec<Option<Vec<u8>>> { values.by_ref().take(n).collect() };
    let s = &config.edge;
    let mut breakers = Vec::new();
    for (p, m) in provider_models(config) {
        let n = breaker::state_keys(p, m).len() + breaker::window_keys(p, m).len();
        let v = breaker::View::read(p, m, &take(n), &s.breaker);
        let (state, until, level) = match &v.state {
            breaker::State::Closed { .. } => ("closed", None, 0),
            breaker::State::Open {
                until_ms, level, ..
            } => ("open", Some(*until_ms), *level),
            breaker::State::HalfOpen { level, .. } => ("half_open", None, *level),
        };
        let mut b = json!({
            "provider": p, "model": m, "state": state,
            "samples": v.samples(now_ms), "failures": v.failures(now_ms), "level": level,
        });
        if let Some(u) = until {
            b["until_ms"] = json!(u);
        }
        breakers.push(b);
    }
    let aimd: Vec<_> = config
        .providers
        .iter()
        .map(|c| {
            let n = aimd::state_keys(c.provider.id, now_ms, &s.aimd).len();
            let v = aimd::View::read(c.provider.id, &take(n), now_ms, &s.aimd);
            json!({"provider": c.provider.id, "limit": v.limit, "allowed": v.allowed(),
                   "in_flight": v.in_flight})
        })
        .collect();
    let health = Health::read(
        &s.budgets,
        tenant,
        &take(budget::state_keys(&s.budgets, tenant).len()),
        now_ms,
    );
    let usd = |m: u64| budget::format_usd(m);
    let scopes: Vec<_> = health
        .budgets
        .iter()
        .map(|b| {
            let mut o = json!({
                "scope": b.level, "id": b.scope, "period": b.period,
                "spent_usd": usd(b.spent_micro_usd), "spent_micro_usd": b.spent_micro_usd,
                "resets_at": b.resets_at, "resets_at_ms": b.resets_at_ms,
                "rate_usd_per_hour": b.rate_micro_usd_per_s * 3600.0 / 1e6,
                "exhausted": b.exhausted,
            });
            if let Some(l) = b.limit_micro_usd {
                o["limit_usd"] = json!(usd(l));
            }
            if let Some(r) = b.remaining_micro_usd {
                o["remaining_usd"] = json!(usd(r));
            }
            if let Some(f) = b.fraction_left {
                o["fraction_left"] = json!(f);
            }
            if let Some(t) = b.predicted_runout_ms {
                o["predicted_runout_ms"] = json!(t);
                o["predicted_runout_at"] = json!(budget::rfc3339(t));
            }
            o
        })
        .collect();
    let mut quotas = Vec::new();
    for (c, l, ()) in ledgers(config) {
        let q = quota::QuotaRef::of(c, &l.model, l.ledger.as_deref(), &l.key_id);
        let counters = quota::counter_keys(&q);
        let read = take(counters.len());
        for ((kind, _), value) in counters.iter().zip(&read) {
            let Some(limit) = q.limit(*kind) else {
                continue;
            };
            let window = q.window(*kind, now_ms);
            let count = crate::counter::QUOTA.count_in(window, value.as_deref());
            let resets = q.window_end_ms(*kind, now_ms);
            let mut o = json!({
                "provider": c.provider.id, "key": l.key_id,
                "ledger": l.ledger.as_deref().unwrap_or("*"), "kind": kind.as_str(),
                "count": count, "limit": limit, "resets_at_ms": resets,
            });
            if *kind == quota::Kind::Rpd {
                let start = quota::day_start_ms(c.provider.reset, now_ms);
                if let Some(t) = budget::rpd_runout(count, limit, start, resets, now_ms) {
                    o["predicted_runout_ms"] = json!(t);
                }
            }
            quotas.push(o);
        }
    }
    let cache = stats::cache_report(&take(stats::cache_keys().len()));
    json!({
        "now_ms": now_ms,
        "breakers": breakers,
        "aimd": aimd,
        "budgets": {"tenant": tenant.id, "lean_free": health.lean_free(), "scopes": scopes},
        "quotas": quotas,
        "cache": cache,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::MemKv;
    use crate::route::plan_request;

    fn config(extra: &[(&str, &str)]) -> Config {
        let mut pairs = vec![
            ("groq_api_key", "gk"),
            ("cerebras_api_key", "ck"),
            ("openai_api_key", "ok"),
        ];
        pairs.extend_from_slice(extra);
        crate::config::tests::config_of(&pairs).unwrap()
    }

    fn tenant() -> Tenant {
        Tenant::of(&"ab".repeat(32), None, None)
    }

    fn snapshot(config: &Config, plan: &Plan, kv: &MemKv, now: u64) -> Snapshot {
        let reads = Reads::of(config, plan, &tenant(), &[], Class::Foreground, now);
        let values = kv.get_many(&reads.keys).unwrap();
        reads.split(config, &tenant(), values, now)
    }

    fn names(p: &Plan) -> Vec<String> {
        p.candidates
            .iter()
            .map(|c| format!("{}/{}", c.provider, c.model))
            .collect()
    }

    #[test]
    fn an_open_breaker_takes_its_model_out_and_all_open_is_a_503() {
        let c = config(&[("breaker_min_samples", "2")]);
        let kv = MemKv::default();
        let plan = plan_request(&c, "auto", &[], Mode::Auto, 0).unwrap();
        let first = plan.candidates[0].clone();
        let now = 1_000_000;
        let snap = snapshot(&c, &plan, &kv, now);
        let v = snap.breaker(&first.provider, &first.model).unwrap();
        for _ in 0..2 {
            breaker::record(
                &kv,
                v,
                breaker::Outcome {
                    failed: true,
                    probe: false,
                },
                now,
            )
            .unwrap();
        }
        let snap = snapshot(&c, &plan, &kv, now + 1);
        let mut events = Vec::new();
        let shaped = shape(plan.clone(), &c, &snap, Mode::Auto, now + 1, &mut events).unwrap();
        assert!(!names(&shaped).contains(&format!("{}/{}", first.provider, first.model)));
        assert!(events.iter().any(|e| matches!(
            e,
            Event::Skipped {
                reason: "breaker_open",
                ..
            }
        )));
        // Only that model asked for: 503 with a Retry-After.
        let single = plan_request(
            &c,
            &format!("{}/{}", first.provider, first.model),
            &[],
            Mode::Auto,
            0,
        )
        .unwrap();
        let snap = snapshot(&c, &single, &kv, now + 1);
        let e = shape(single, &c, &snap, Mode::Auto, now + 1, &mut events).unwrap_err();
        assert_eq!(e.status, 503);
        assert!(e.retry_after.is_some_and(|s| s >= 1), "{e:?}");
    }

    #[test]
    fn a_background_requests_429s_never_open_a_breaker_and_its_read_has_its_cool_downs() {
        use crate::upstream::Cause;
        let c = config(&[("breaker_min_samples", "2")]);
        let kv = MemKv::default();
        let plan = plan_request(&c, "groq/llama-3.1-8b-instant", &[], Mode::Auto, 0).unwrap();
        let cand = plan.candidates[0].clone();
        let now = 1_000_000;
        // The background read adds the background-only cool-downs, nothing else.
        let fg = Reads::of(&c, &plan, &tenant(), &[], Class::Foreground, now);
        let bg = Reads::of(&c, &plan, &tenant(), &[], Class::Background, now);
        let extra: Vec<&String> = bg.keys.iter().filter(|k| !fg.keys.contains(k)).collect();
        assert_eq!(extra.len(), 2);
        assert!(extra.iter().all(|k| k.starts_with("cooldown:v1:bg:groq:")));
        // A 429 is the quota's business, whoever provoked it: a storm of them is recorded as
        // the provider answering, so the breaker stays closed for the foreground.
        for _ in 0..10 {
            let snap = snapshot(&c, &plan, &kv, now);
            let failed = breaker::is_failure(&Cause::RateLimited);
            breaker_outcome(&kv, &snap, &cand, failed, false, now).unwrap();
        }
        let snap = snapshot(&c, &plan, &kv, now + 1);
        let v = snap.breaker(&cand.provider, &cand.model).unwrap();
        assert_eq!(v.admits(now + 1), Admission::Closed);
        assert!(shape(plan, &c, &snap, Mode::Auto, now + 1, &mut Vec::new()).is_ok());
    }

    #[test]
    fn a_spent_budget_keeps_only_free_candidates_and_refuses_paid_only_requests() {
        let c = config(&[("budget_daily_usd", "0.000001")]);
        let kv = MemKv::default();
        let now = 1_000_000;
        budget::record_spend(&kv, &c.edge.budgets, &tenant(), 5, &Health::default(), now).unwrap();
        let plan = plan_request(&c, "auto", &[], Mode::Auto, 0).unwrap();
        assert!(names(&plan).iter().any(|n| n.starts_with("openai/")));
        let snap = snapshot(&c, &plan, &kv, now);
        let mut events = Vec::new();
        let shaped = shape(plan, &c, &snap, Mode::Auto, now, &mut events).unwrap();
        assert!(!names(&shaped).iter().any(|n| n.starts_with("openai/")));
        let paid = plan_request(&c, "paid", &[], Mode::Auto, 0).unwrap();
        let snap = snapshot(&c, &paid, &kv, now);
        let mut events = Vec::new();
        let e = shape(paid, &c, &snap, Mode::Auto, now, &mut events).unwrap_err();
        assert_eq!((e.status, e.kind), (429, "insufficient_quota"));
        assert!(events
            .iter()
            .any(|e| matches!(e, Event::BudgetExhausted { period, .. } if period == "day")));
    }

    #[test]
    fn aimd_full_providers_go_last_and_the_gate_passes_them_while_others_are_left() {
        let c = config(&[("aimd_initial_limit", "1"), ("aimd_max_limit", "4")]);
        let kv = MemKv::default();
        let now = 1_000_000;
        let plan = plan_request(&c, "free", &[], Mode::Auto, 0).unwrap();
        let first = plan.candidates[0].clone();
        let snap = snapshot(&c, &plan, &kv, now);
        // One request in flight on the first provider fills its window of 1.
        let Gate::Go { lease: Some(_), .. } = gate(&kv, &snap, &first, true, now).unwrap() else {
            panic!("first admission")
        };
        let stale = snap;
        let snap = snapshot(&c, &plan, &kv, now);
        let shaped = shape(plan, &c, &snap, Mode::Auto, now, &mut Vec::new()).unwrap();
        assert_eq!(shaped.candidates.last().unwrap().provider, first.provider);
        // A request that read before it is refused at the gate, and passes while others are left…
        assert!(matches!(
            gate(&kv, &stale, &first, true, now).unwrap(),
            Gate::Pass(p) if matches!(p.0, Event::Skipped { reason: "aimd_full", .. })
        ));
        // …and is sent anyway, unleased, as the last resort.
        assert!(matches!(
            gate(&kv, &stale, &first, false, now).unwrap(),
            Gate::Go { lease: None, .. }
        ));
    }

    #[test]
    fn a_plan_reordered_by_shaping_is_judged_with_its_own_state() {
        // The first provider is at its AIMD window (it goes last) and the second's quota is
        // spent: usable must see the spent quota on the second, not on the first.
        let c = config(&[
            ("aimd_initial_limit", "1"),
            ("groq_rpm", "1"),
            ("gemini_api_key", "g"),
        ]);
        let kv = MemKv::default();
        let now = 1_000_000;
        let plan = plan_request(
            &c,
            "gemini/gemini-2.5-flash",
            &["groq/llama-3.1-8b-instant".to_owned()],
            Mode::Auto,
            0,
        )
        .unwrap();
        let (gemini, groq) = (plan.candidates[0].clone(), plan.candidates[1].clone());
        let snap = snapshot(&c, &plan, &kv, now);
        let Gate::Go { lease: Some(_), .. } = gate(&kv, &snap, &gemini, true, now).unwrap() else {
            panic!("gemini admitted")
        };
        let q = crate::route::quota_ref(&c, &groq, &groq.keys[0]).unwrap();
        quota::admit_minute(&kv, &q, quota::Share::FOREGROUND, now).unwrap();
        let snap = snapshot(&c, &plan, &kv, now);
        let shaped = shape(plan, &c, &snap, Mode::Auto, now, &mut Vec::new()).unwrap();
        assert_eq!(shaped.candidates[0].provider, "groq");
        let values = snap.plan_values(&shaped, &c, quota::Class::Foreground);
        let (usable, _) = shaped
            .usable(&c, &values, 10, now, quota::Class::Foreground)
            .unwrap();
        let left: Vec<&str> = usable
            .candidates
            .iter()
            .map(|x| x.provider.as_str())
            .collect();
        assert_eq!(left, vec!["gemini"]);
    }

    #[test]
    fn one_probe_per_half_open_breaker() {
        let c = config(&[
            ("breaker_min_samples", "1"),
            ("breaker_cooldown_ms", "1000"),
        ]);
        let kv = MemKv::default();
        let now = 1_000_000;
        let plan = plan_request(&c, "groq/llama-3.1-8b-instant", &[], Mode::Auto, 0).unwrap();
        let cand = plan.candidates[0].clone();
        let snap = snapshot(&c, &plan, &kv, now);
        breaker::record(
            &kv,
            snap.breaker(&cand.provider, &cand.model).unwrap(),
            breaker::Outcome {
                failed: true,
                probe: false,
            },
            now,
        )
        .unwrap();
        let later = now + 1_500;
        let a = snapshot(&c, &plan, &kv, later);
        let b = snapshot(&c, &plan, &kv, later);
        assert!(matches!(
            gate(&kv, &a, &cand, false, later).unwrap(),
            Gate::Go { probe: true, .. }
        ));
        assert!(matches!(
            gate(&kv, &b, &cand, false, later).unwrap(),
            Gate::Pass(p) if matches!(p.0, Event::Skipped { reason: "probe_taken", .. }) && p.1.status == 503
        ));
    }
}
