//! The router: per request, the provider-models allowed by mode, tenant policy, capabilities,
//! breakers, budgets and free quotas, ordered by expected utility — with the profile, every
//! candidate's score and the rules that fired kept for the audit.
//!
//! # The score
//!
//! For a candidate model `m` and a request profiled as family `f`:
//!
//! ```text
//! U(m) = P(m,f) · Q(m,f) · V  −  λ_cost · C(m)  −  λ_lat · L(m,f)  −  S(m)  −  R(m)  +  B(m)
//! ```
//!
//! in US dollars, so each term can be read against the others:
//!
//! * `V`, the value of a good answer: [`VALUE_BACKGROUND`] for a client's chores,
//!   [`VALUE_FREE`] when the profile says a free model serves it, [`VALUE_PAID`] when it would
//!   under-serve; × 0.5 / 1 / 2 for low / medium / high precision need; × (1 + tokens / 16k),
//!   at most ×8, because getting a large job right is worth more.
//! * `P` (success) and `Q` (quality, 0..1) are learned per model and family
//!   ([`crate::learn`]): priors from the catalogue worth 8 outcomes, then decayed outcomes.
//! * `C`, the expected price: prompt tokens × input price + expected output × output price.
//!   `λ_cost` is 1, or [`LEAN_COST_FACTOR`] while a budget is lean (spent budgets remove paid
//!   models altogether).
//! * `L`, the learned time to answer (s); `λ_lat` is [`LATENCY_USD_PER_S`] for the latency class
//!   (interactive > standard > background = 0).
//! * `S`, the shadow price of a free model: [`SHADOW_USD`] / requests left today on its quota,
//!   plus its list price for the request (what the provider's paid tier charges: the compute it
//!   burns) × [`LIST_PRICE_WEIGHT`]. A model with 14,400 requests a day costs nearly nothing to
//!   use; one with 50 a day is kept for work that needs it; a quota running low grows dearer
//!   (rate-limit headroom); chores, worth little, go to the smallest model.
//! * `R`, risk: prompts with personal data or secrets on a free tier that trains on prompts
//!   (½ V, or V for secrets); a window too small for the conversation (¼ V: it must be cut);
//!   a breaker probing (⅕ V).
//! * `B`, the UCB exploration bonus: [`EXPLORATION`] · V · √(ln(N + 1) / (n + 1)), N the outcomes
//!   learned over the candidates, n this model's: an unproven model is tried now and then, in
//!   proportion to what the request is worth, never enough to cross a price gap.
//!
//! Tenant policy comes first (`prefer` orders, `exclude` and `require` filter, `mode` forces),
//! then a sticky conversation's model, then the score.

use crate::breaker;
use crate::budget::{self, Health, Tenant};
use crate::catalog::{ModelInfo, Tier};
use crate::config::Config;
use crate::error::ApiError;
use crate::kv;
use crate::learn::{self, Estimate, Prior, Stats};
use crate::policy::{self, Effects};
use crate::profile::{self, Economic, Level, Profile};
use crate::quota::{self, Kind, QuotaRef};
use crate::route::{self, Candidate, Mode, Plan};
use crate::wire::openai::ChatRequest;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

pub const VALUE_BACKGROUND: f64 = 0.0001;
pub const VALUE_FREE: f64 = 0.002;
pub const VALUE_PAID: f64 = 0.05;
pub const LEAN_COST_FACTOR: f64 = 4.0;
pub const SHADOW_USD: f64 = 0.5;
/// A free model's list price (what its provider's paid tier charges) counts this much.
pub const LIST_PRICE_WEIGHT: f64 = 1.0;
pub const EXPLORATION: f64 = 0.05;
/// Dollars per second of waiting, by latency class: a person watching (interactive), a program
/// (standard), nobody (background).
pub const LATENCY_USD_PER_S: [f64; 3] = [0.001, 0.0003, 0.0];
/// Candidates handed to the gateway: more than `max_attempts` is never tried.
pub const MAX_PLAN: usize = 8;
/// Models of one provider in a plan for a virtual model.
pub const PER_PROVIDER: usize = 2;
/// Output tokens expected when `max_tokens` is not set.
pub const DEFAULT_OUTPUT_TOKENS: u32 = 400;
pub const BACKGROUND_OUTPUT_TOKENS: u32 = 40;

/// The variables that tune routing (README, "Routing").
pub const VARIABLES: &[&str] = &["router", "router_timeout_ms", "route_audit_entries"];

/// How the gateway reaches the router, and how long routes stay readable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Ask the router component over local service chaining (`router = component`, the
    /// default), or decide in the gateway's own instance (`router = local`).
    pub chained: bool,
    /// How long the gateway waits for the router before deciding locally.
    pub timeout_ms: u64,
    /// Slots of the audit ring (`route_audit_entries`).
    pub audit_entries: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            chained: true,
            timeout_ms: 1000,
            audit_entries: crate::audit::DEFAULT_ENTRIES,
        }
    }
}

impl Settings {
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let var = |n: &str| get(n).map(|v| v.trim().to_owned()).unwrap_or_default();
        let mut s = Self::default();
        match var("router").to_ascii_lowercase().as_str() {
            "" | "component" => {}
            "local" => s.chained = false,
            other => {
                return Err(format!(
                    "variable `router` must be `component` or `local`, got {other:?}"
                ))
            }
        }
        let whole = |n: &str, min: u64, max: u64| -> Result<Option<u64>, String> {
            match var(n).as_str() {
                "" => Ok(None),
                raw => match raw.parse::<u64>() {
                    Ok(v) if (min..=max).contains(&v) => Ok(Some(v)),
                    _ => Err(format!(
                        "variable `{n}` must be a whole number from {min} to {max}, got {raw:?}"
                    )),
                },
            }
        };
        if let Some(ms) = whole("router_timeout_ms", 1, 60_000)? {
            s.timeout_ms = ms;
        }
        if let Some(n) = whole("route_audit_entries", 1, 1_000_000)? {
            s.audit_entries = n as u32;
        }
        Ok(s)
    }
}

/// What the gateway knows that the body does not say (sent to the router component as JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Facts {
    /// `x-freerelay-mode` (`auto`, `free`, `paid`).
    pub mode: String,
    pub tenant: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The client's conversation id (`x-openwebui-chat-id`), if it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<String>,
    /// Random per request: which of a provider's keys goes first.
    pub rotation: u64,
    pub now_ms: u64,
}

impl Facts {
    pub fn tenant(&self) -> Tenant {
        Tenant {
            id: self.tenant.clone(),
            user: self.user.clone(),
        }
    }

    fn mode(&self) -> Mode {
        Mode::from_header(Some(&self.mode)).unwrap_or(Mode::Auto)
    }
}

/// The model a conversation was served by (`sticky:v1:<tenant>:<conversation>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sticky {
    pub provider: String,
    pub model: String,
    pub tier: Tier,
}

impl Sticky {
    pub fn decode(bytes: Option<&[u8]>) -> Option<Self> {
        bytes.and_then(|b| serde_json::from_slice(b).ok())
    }
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// `sticky:v1:<tenant>:<16 hex>` — the conversation's id (the client's, or the hash of its system
/// prompt and first user message), hashed so that it is bounded and says nothing.
pub fn sticky_key(tenant: &str, conversation: &str) -> String {
    let d = Sha256::digest(conversation.as_bytes());
    let hex: String = d[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("sticky:v1:{tenant}:{hex}")
}

/// What the router decided: the plan, and everything the gateway does with it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Decision {
    pub plan: Plan,
    /// The mode in force (the client's, or the one a policy forced).
    pub mode: String,
    /// The profile's family (the learned statistics it is kept under).
    pub family: String,
    /// A client's chore: the lower priority class.
    pub background: bool,
    /// Send to the first two candidates, keep the first good answer.
    pub hedge: bool,
    /// The policy's say on caching (`None`: the deployment's rule).
    #[serde(default)]
    pub cache: Option<bool>,
    #[serde(default)]
    pub max_temperature: Option<f64>,
    /// The sticky record to write once answered (absent: not a conversation).
    #[serde(default)]
    pub sticky_key: Option<String>,
    /// The sticky record as read.
    #[serde(default)]
    pub sticky: Option<Sticky>,
    /// JSON-mode or JSON-schema asked, and a tool call forced (for the quality signal).
    #[serde(default)]
    pub json_asked: bool,
    #[serde(default)]
    pub tool_forced: bool,
    /// The audit: a JSON object with `profile`, `mode`, `candidates` (each with its rank or why
    /// it was left out, and its score), `policy` (the effects and the rules that fired) and
    /// `sticky` — kept as JSON text, passed on and stored without being parsed again.
    pub audit: Box<serde_json::value::RawValue>,
}

/// A candidate, its score, why it was left out (if it was), and why it goes last (a breaker
/// open, a budget spent: state the gateway's admission judges again right before sending, after
/// the cache — so it is ordered last here, not removed).
type Judged = (Candidate, Option<Score>, Option<String>, Option<String>);

/// The audit, as serialised (see [`Decision::audit`]).
#[derive(Serialize)]
struct Audit<'a> {
    profile: &'a Profile,
    mode: &'static str,
    candidates: Vec<AuditCandidate<'a>>,
    policy: &'a Effects,
    sticky: Option<&'a Sticky>,
}

#[derive(Serialize)]
struct AuditCandidate<'a> {
    provider: &'a str,
    model: &'a str,
    tier: &'static str,
    rank: Option<usize>,
    excluded: Option<&'a str>,
    held: Option<&'a str>,
    score: Option<&'a Score>,
}

impl Decision {
    /// The audit as a JSON value (for tools and tests; the gateway passes the text on).
    pub fn audit_value(&self) -> Value {
        serde_json::from_str(self.audit.get()).unwrap_or(Value::Null)
    }
}

/// One candidate's score, as the audit shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Score {
    pub utility: f64,
    pub p_success: f64,
    pub quality: f64,
    pub value_usd: f64,
    pub expected_cost_usd: f64,
    pub latency_ms: f64,
    pub latency_cost_usd: f64,
    pub shadow_usd: f64,
    pub risk_usd: f64,
    pub bonus_usd: f64,
    pub learned_outcomes: f64,
}

/// A request being routed: its profile and candidate pool, then what to read for them.
pub struct Router<'a> {
    config: &'a Config,
    request: &'a ChatRequest,
    facts: &'a Facts,
    tenant: Tenant,
    pub profile: Profile,
    /// Everything that could serve it, before state and policy.
    pool: Vec<Candidate>,
    /// Virtual model: ordered by score. Otherwise the client's order stands.
    scored: bool,
    /// Background chores may leave a named model for a free one.
    free_pool: Vec<Candidate>,
    conversation: Option<String>,
    keys: Vec<String>,
    layout: Layout,
}

/// Where each value sits in [`Router::keys`].
#[derive(Default)]
struct Layout {
    sticky: Option<usize>,
    /// Per candidate: learned stats, breaker state, daily request counter (if limited).
    candidates: Vec<(usize, usize, Option<usize>)>,
    /// Per candidate, per key: where its cool-down keys start, and how many.
    cooldowns: Vec<Vec<(usize, usize)>>,
    /// Budget keys start here (if any paid candidate).
    budgets: Option<usize>,
}

impl<'a> Router<'a> {
    /// Profiles the request and lists its candidates; errors are the client's (unknown model,
    /// a mode that excludes everything).
    pub fn new(
        config: &'a Config,
        request: &'a ChatRequest,
        facts: &'a Facts,
    ) -> Result<Self, ApiError> {
        let mode = facts.mode();
        let profile = Profile::of(
            request,
            Economic {
                mode: mode_name(mode),
                ..Economic::default()
            },
        );
        let virtual_model = route::VIRTUAL_MODELS
            .iter()
            .any(|(v, _)| *v == request.model)
            && request.fallback_models.is_empty();
        // A policy may force a mode: the pool spans what any mode could use, filtered later.
        let (pool, scored) = if virtual_model {
            (expand(config, &request.model, facts.rotation), true)
        } else {
            let p = route::plan_request(
                config,
                &request.model,
                &request.fallback_models,
                mode,
                facts.rotation,
            )?;
            (p.candidates, false)
        };
        if pool.is_empty() {
            route::plan_request(config, &request.model, &[], mode, facts.rotation)?;
        }
        // A chore named on a paid model may leave it for a free one.
        let names_paid = pool.iter().any(|c| tier_of(config, c) == Tier::Paid);
        let free_pool = if !scored && profile.is_background() && mode != Mode::Paid && names_paid {
            expand(config, "free", facts.rotation)
        } else {
            Vec::new()
        };
        let conversation = conversation_id(request, facts);
        let tenant = facts.tenant();
        let mut r = Self {
            config,
            request,
            facts,
            tenant,
            profile,
            pool,
            scored,
            free_pool,
            conversation,
            keys: Vec::new(),
            layout: Layout::default(),
        };
        (r.keys, r.layout) = r.make_keys();
        Ok(r)
    }

    /// The keys to read, in one batch.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    fn all(&self) -> impl Iterator<Item = &Candidate> {
        self.pool.iter().chain(self.free_pool.iter())
    }

    fn make_keys(&self) -> (Vec<String>, Layout) {
        let family = self.profile.family.value;
        let mut keys = vec![policy::key(&self.tenant.id)];
        let mut layout = Layout::default();
        if let Some(c) = self.conversation.as_deref() {
            layout.sticky = Some(keys.len());
            keys.push(sticky_key(&self.tenant.id, c));
        }
        for c in self.all() {
            let learned = keys.len();
            keys.push(learn::key(&c.provider, &c.model, family));
            let state = keys.len();
            keys.push(crate::kv::keys::breaker_state(&c.provider, &c.model));
            let rpd = rpd_key(self.config, c).map(|k| {
                keys.push(k);
                keys.len() - 1
            });
            layout.candidates.push((learned, state, rpd));
            let class = if self.profile.is_background() {
                quota::Class::Background
            } else {
                quota::Class::Foreground
            };
            let mut per_key = Vec::with_capacity(c.keys.len());
            for k in &c.keys {
                let cd = c.cooldown_keys(k, class);
                per_key.push((keys.len(), cd.len()));
                keys.extend(cd);
            }
            layout.cooldowns.push(per_key);
        }
        if self.all().any(|c| tier_of(self.config, c) == Tier::Paid) {
            layout.budgets = Some(keys.len());
            keys.extend(budget::state_keys(&self.config.edge.budgets, &self.tenant));
        }
        (keys, layout)
    }

    /// Decides with the values of [`Self::keys`] (missing values: nothing learned, nothing
    /// spent, breakers closed).
    pub fn decide(mut self, values: &[Option<Vec<u8>>]) -> Result<Decision, ApiError> {
        let now = self.facts.now_ms;
        let get = |i: usize| values.get(i).and_then(Option::as_deref);
        let policy_text = get(0).and_then(|b| std::str::from_utf8(b).ok());
        let policy = policy_text.and_then(|t| policy::parse(t).ok());
        let sticky = self.layout.sticky.and_then(|i| Sticky::decode(get(i)));
        let health = self.layout.budgets.map(|at| {
            let budget_values: Vec<Option<Vec<u8>>> = (at..self.keys.len())
                .map(|i| get(i).map(<[u8]>::to_vec))
                .collect();
            Health::read(&self.config.edge.budgets, &self.tenant, &budget_values, now)
        });
        let spent = health.as_ref().is_some_and(|h| h.refusal(now).is_some());
        let lean = health.as_ref().is_some_and(Health::lean_free);
        self.profile.economic = profile::Dim::new(
            Economic {
                mode: mode_name(self.facts.mode()),
                budget: if spent {
                    profile::BudgetHealth::Spent
                } else if lean {
                    profile::BudgetHealth::Lean
                } else {
                    profile::BudgetHealth::Healthy
                },
                policy_mode: None,
            },
            self.profile.economic.reasons.clone(),
        );
        let effects = policy
            .as_ref()
            .map(|p| p.evaluate(&self.profile))
            .unwrap_or_default();
        let mut mode = self.facts.mode();
        if let Some(m) = effects.mode {
            mode = m;
            self.profile.economic.value.policy_mode = Some(mode_name(m));
            self.profile
                .economic
                .reasons
                .push(format!("policy: mode {}", mode_name(m)));
        }
        if spent {
            self.profile
                .economic
                .reasons
                .push("a budget is spent".into());
        } else if lean {
            self.profile
                .economic
                .reasons
                .push("a budget is lean".into());
        }
        let needs = Needs::of(self.request, &self.profile, &effects);
        let mut out: Vec<Judged> = Vec::new();
        let mut learned_total = 0.0;
        let mut est: Vec<(Estimate, Option<Stats>)> = Vec::new();
        let all: Vec<Candidate> = self.all().cloned().collect();
        for (i, c) in all.iter().enumerate() {
            let stats = Stats::decode(get(self.layout.candidates[i].0));
            let info = self.info(c);
            let prior = Prior::of(
                &info,
                tier_of(self.config, c) == Tier::Paid,
                self.config
                    .provider(&c.provider)
                    .map_or(1000, |p| p.provider.latency_ms),
                self.profile.family.value,
            );
            let e = learn::estimate(prior, stats, now);
            learned_total += e.n;
            est.push((e, stats));
        }
        for (i, c) in all.iter().enumerate() {
            let (_, state_at, rpd_at) = self.layout.candidates[i];
            let tier = tier_of(self.config, c);
            let info = self.info(c);
            let view = breaker::View::read(
                &c.provider,
                &c.model,
                &[get(state_at).map(<[u8]>::to_vec)],
                &self.config.edge.breaker,
            );
            let why_not = if !mode_allows(mode, tier) && (self.scored || i >= self.pool.len()) {
                Some(format!(
                    "mode `{}` excludes the {} tier",
                    mode_name(mode),
                    tier.as_str()
                ))
            } else if effects
                .exclude
                .iter()
                .any(|t| t.matches(&c.provider, &c.model))
            {
                Some("excluded by policy".into())
            } else {
                needs.missing(&info).map(|cap| format!("lacks {cap}"))
            };
            // Every key of the candidate cooling down (rate limited, refused): the gateway would
            // skip it without an attempt, so it must not take a place before usable ones.
            let cooling = !self.layout.cooldowns[i].is_empty()
                && self.layout.cooldowns[i].iter().all(|&(at, n)| {
                    (at..at + n).any(|j| {
                        get(j)
                            .and_then(crate::cooldown::Cooldown::decode)
                            .is_some_and(|cd| cd.is_active(now))
                    })
                });
            let day_spent = tier == Tier::Free
                && rpd_left(self.config, c, rpd_at.and_then(get), now) == Some(0);
            let held = if spent && tier == Tier::Paid {
                Some("a budget is spent".to_owned())
            } else if matches!(view.admits(now), breaker::Admission::Open { .. }) {
                Some("circuit breaker open".to_owned())
            } else if cooling {
                Some("cooling down (rate limited or key refused)".to_owned())
            } else if day_spent {
                Some("its daily requests are spent".to_owned())
            } else {
                None
            };
            let probing = matches!(view.admits(now), breaker::Admission::Probe);
            let rpd = rpd_at.and_then(get);
            let score = self.score(c, &info, tier, &est[i].0, learned_total, rpd, lean, probing);
            out.push((c.clone(), Some(score), why_not, held));
        }
        let pool_len = self.pool.len();
        // Order: policy preference, then the sticky model, then utility (scored pools only).
        let pref = |c: &Candidate| {
            effects
                .prefer
                .iter()
                .position(|t| t.matches(&c.provider, &c.model))
                .unwrap_or(usize::MAX)
        };
        let sticks = |c: &Candidate| {
            sticky.as_ref().is_some_and(|s| {
                s.provider == c.provider && s.model == c.model && s.tier == self.profile.tier.value
            }) && !self.profile.is_background()
        };
        let mut kept: Vec<(usize, &Judged)> = out
            .iter()
            .enumerate()
            .filter(|(_, (_, _, why, _))| why.is_none())
            .collect();
        let utility = |x: &Judged| x.1.as_ref().map_or(0.0, |s| s.utility);
        // On `auto`, the tier the profile calls for goes first: work a free model serves never
        // spends money while a free model is left, and work that needs a paid model gets one
        // before the free fallbacks. Within a tier, utility decides.
        let need = self.profile.tier.value;
        let tier_rank = |c: &Candidate| {
            usize::from(self.scored && mode == Mode::Auto && tier_of(self.config, c) != need)
        };
        kept.sort_by(|(ia, a), (ib, b)| {
            let background_first =
                |i: usize| usize::from(!(self.free_pool.is_empty() || i >= pool_len));
            a.3.is_some()
                .cmp(&b.3.is_some())
                .then(background_first(*ia).cmp(&background_first(*ib)))
                .then(pref(&a.0).cmp(&pref(&b.0)))
                .then(sticks(&b.0).cmp(&sticks(&a.0)))
                .then(tier_rank(&a.0).cmp(&tier_rank(&b.0)))
                .then(if self.scored || (*ia >= pool_len && *ib >= pool_len) {
                    utility(b).total_cmp(&utility(a))
                } else {
                    ia.cmp(ib)
                })
        });
        // Fallbacks spread over providers: a provider that fails a request (overloaded, down,
        // out of quota) usually fails its other models too, so each provider's best model comes
        // before any provider's second. Policy preferences and the sticky model keep their place.
        // (Within each group of the order: held candidates, the tier called for, the other.)
        if self.scored {
            let group = |item: &(usize, &Judged)| (item.1 .3.is_some(), tier_rank(&item.1 .0));
            let mut spread = Vec::with_capacity(kept.len());
            let mut rest = kept.into_iter().peekable();
            while let Some(head) = rest.next() {
                let g = group(&head);
                let mut run = vec![head];
                while let Some(next) = rest.next_if(|i| group(i) == g) {
                    run.push(next);
                }
                let mut seconds = Vec::new();
                let mut seen: Vec<&str> = Vec::new();
                for item in run {
                    let c = &item.1 .0;
                    let pinned = pref(c) != usize::MAX || sticks(c);
                    if pinned || !seen.contains(&c.provider.as_str()) {
                        seen.push(c.provider.as_str());
                        spread.push(item);
                    } else {
                        seconds.push(item);
                    }
                }
                spread.extend(seconds);
            }
            kept = spread;
        }
        // A chore on a named model goes to the best free models first, the named one after.
        let mut candidates: Vec<Candidate> = Vec::new();
        for (i, (c, _, _, held)) in &kept {
            if candidates.len() >= MAX_PLAN {
                break;
            }
            if candidates
                .iter()
                .any(|h| h.provider == c.provider && h.model == c.model)
            {
                continue;
            }
            // At most two models per provider: the plan's later places are for other providers
            // and the other tier (a paid plan keeps free fallbacks).
            let pinned = pref(c) != usize::MAX || sticks(c);
            if *i >= pool_len {
                let free_cap = MAX_PLAN.saturating_sub(pool_len.min(MAX_PLAN / 2));
                if candidates.len() >= free_cap {
                    continue;
                }
            }
            if (self.scored || *i >= pool_len)
                && !pinned
                && candidates
                    .iter()
                    .filter(|h| h.provider == c.provider)
                    .count()
                    >= PER_PROVIDER
            {
                continue;
            }
            let mut c = c.clone();
            if let Some(h) = held {
                c.reason = format!("{h}: last, for the gateway's admission to judge");
            } else if *i >= pool_len {
                c.reason = format!(
                    "background task ({}): a free model",
                    self.profile.background.map_or("chore", background_name)
                );
            } else if pref(&c) != usize::MAX {
                c.reason = "preferred by policy".into();
            } else if sticks(&c) {
                c.reason = "sticky conversation".into();
            } else if self.scored {
                c.reason = format!("`{}`: expected utility", self.request.model);
            }
            candidates.push(c);
        }
        if candidates.is_empty() {
            let reasons: Vec<String> = out
                .iter()
                .filter_map(|(c, _, why, _)| {
                    why.as_ref()
                        .map(|w| format!("{}/{} ({w})", c.provider, c.model))
                })
                .take(12)
                .collect();
            return Err(ApiError::invalid_request(
                format!(
                    "No configured model can serve this request: {}.",
                    reasons.join(", ")
                ),
                Some("model"),
            ));
        }
        let chosen: Vec<(String, String)> = candidates
            .iter()
            .map(|c| (c.provider.clone(), c.model.clone()))
            .collect();
        let audit_candidates: Vec<AuditCandidate> = out
            .iter()
            .map(|(c, score, why, held)| AuditCandidate {
                provider: &c.provider,
                model: &c.model,
                tier: tier_of(self.config, c).as_str(),
                rank: chosen
                    .iter()
                    .position(|(p, m)| *p == c.provider && *m == c.model)
                    .map(|r| r + 1),
                excluded: why.as_deref(),
                held: held.as_deref(),
                score: score.as_ref(),
            })
            .collect();
        let sticky_key = (!self.profile.is_background())
            .then(|| {
                self.conversation
                    .as_deref()
                    .map(|c| sticky_key(&self.tenant.id, c))
            })
            .flatten();
        let plan = Plan {
            virtual_model: self.scored || candidates.len() > 1,
            candidates,
        };
        // Serialised once, straight from typed values: the audit of ~40 candidates built as a
        // `serde_json::Value` tree cost more than the rest of the decision.
        let audit = serde_json::value::to_raw_value(&Audit {
            profile: &self.profile,
            mode: mode_name(mode),
            candidates: audit_candidates,
            policy: &effects,
            sticky: sticky.as_ref(),
        })
        .map_err(|e| ApiError::internal(format!("the route's audit: {e}")))?;
        Ok(Decision {
            plan,
            mode: mode_name(mode).to_owned(),
            family: self.profile.family.value.as_str().to_owned(),
            background: self.profile.is_background(),
            hedge: effects.hedge.unwrap_or(false),
            cache: effects.cache,
            max_temperature: effects.max_temperature,
            sticky_key,
            sticky,
            json_asked: self.profile.determinism.value.json,
            tool_forced: self.profile.tools.value.forced,
            audit,
        })
    }

    fn info(&self, c: &Candidate) -> ModelInfo {
        self.config.provider(&c.provider).map_or_else(
            || crate::catalog::PROVIDERS[0].unlisted(),
            |p| p.model_info(&c.model),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn score(
        &self,
        c: &Candidate,
        info: &ModelInfo,
        tier: Tier,
        e: &Estimate,
        learned_total: f64,
        rpd_value: Option<&[u8]>,
        lean: bool,
        probing: bool,
    ) -> Score {
        let p = &self.profile;
        let tokens = p.context.value.tokens.max(1);
        let value = value_of(p);
        let out_tokens = output_tokens(self.request, p);
        let price = self
            .config
            .provider(&c.provider)
            .and_then(|conf| conf.price(&c.model));
        let cost = price.map_or(0.0, |pr| {
            (tokens as f64 * pr.input + out_tokens as f64 * pr.output) / 1e6
        });
        let lambda_cost = if lean { LEAN_COST_FACTOR } else { 1.0 };
        let lat_class = match p.latency.value {
            profile::Latency::Interactive => 0,
            profile::Latency::Standard => 1,
            profile::Latency::Background => 2,
        };
        let latency_cost = LATENCY_USD_PER_S[lat_class] * e.latency_ms / 1000.0;
        // A free request is not free: it spends a daily quota, and the compute its list price
        // measures (a small model is the cheap one to spend on chores).
        let shadow = if tier == Tier::Free {
            let list = info.price.map_or(0.0, |pr| {
                (tokens as f64 * pr.input + out_tokens as f64 * pr.output) / 1e6
            });
            rpd_left(self.config, c, rpd_value, self.facts.now_ms)
                .map_or(0.0, |left| SHADOW_USD / left.max(1) as f64)
                + LIST_PRICE_WEIGHT * list
        } else {
            0.0
        };
        let mut risk = 0.0;
        let trains = self
            .config
            .provider(&c.provider)
            .is_some_and(|conf| conf.provider.trains_on_data && tier == Tier::Free);
        if trains {
            risk += match p.security.value {
                profile::Security::Secrets => value,
                profile::Security::Pii => value / 2.0,
                profile::Security::Public => 0.0,
            };
        }
        let reserve = out_tokens.min(info.max_output);
        if tokens.saturating_add(reserve) > info.context_window {
            risk += value / 4.0;
        }
        if probing {
            risk += value / 5.0;
        }
        let bonus = EXPLORATION * value * ((learned_total + 1.0).ln() / (e.n + 1.0)).sqrt();
        let utility =
            e.success * e.quality * value - lambda_cost * cost - latency_cost - shadow - risk
                + bonus;
        Score {
            utility,
            p_success: e.success,
            quality: e.quality,
            value_usd: value,
            expected_cost_usd: cost,
            latency_ms: e.latency_ms,
            latency_cost_usd: latency_cost,
            shadow_usd: shadow,
            risk_usd: risk,
            bonus_usd: bonus,
            learned_outcomes: e.n,
        }
    }
}

/// What the request needs of a model.
struct Needs {
    tools: bool,
    vision: bool,
    require: Vec<policy::Capability>,
}

impl Needs {
    fn of(request: &ChatRequest, p: &Profile, effects: &Effects) -> Self {
        let _ = request;
        Self {
            tools: p.tools.value.defined > 0 || p.tools.value.in_flight,
            vision: p.context.value.images > 0,
            require: effects.require.clone(),
        }
    }

    fn missing(&self, info: &ModelInfo) -> Option<String> {
        if self.tools && !info.caps.tools {
            return Some("tool calling".into());
        }
        if self.vision && !info.caps.vision {
            return Some("image input".into());
        }
        self.require
            .iter()
            .find(|c| !c.met_by(&info.caps))
            .map(|c| format!("{c:?} (required by policy)"))
    }
}

/// The value of a good answer (see the module doc).
pub fn value_of(p: &Profile) -> f64 {
    if p.is_background() {
        return VALUE_BACKGROUND;
    }
    let base = match p.tier.value {
        Tier::Free => VALUE_FREE,
        Tier::Paid => VALUE_PAID,
    };
    let precision = match p.precision.value {
        Level::Low => 0.5,
        Level::Medium => 1.0,
        Level::High => 2.0,
    };
    let size = (1.0 + p.context.value.tokens as f64 / 16_000.0).min(8.0);
    base * precision * size
}

fn output_tokens(request: &ChatRequest, p: &Profile) -> u32 {
    let asked = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|f| request.body().get(*f).and_then(Value::as_u64));
    match asked {
        Some(n) => n.min(u32::MAX as u64) as u32,
        None if p.is_background() => BACKGROUND_OUTPUT_TOKENS,
        None => DEFAULT_OUTPUT_TOKENS,
    }
}

fn background_name(b: profile::Background) -> &'static str {
    match b {
        profile::Background::Title => "title",
        profile::Background::Tags => "tags",
        profile::Background::FollowUps => "follow-ups",
        profile::Background::Autocomplete => "autocomplete",
        profile::Background::QueryGeneration => "query generation",
        profile::Background::Other => "chore",
    }
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Auto => "auto",
        Mode::Free => "free",
        Mode::Paid => "paid",
    }
}

fn mode_allows(m: Mode, tier: Tier) -> bool {
    match m {
        Mode::Auto => true,
        Mode::Free => tier == Tier::Free,
        Mode::Paid => tier == Tier::Paid,
    }
}

fn tier_of(config: &Config, c: &Candidate) -> Tier {
    config.provider(&c.provider).map_or(Tier::Free, |p| p.tier)
}

/// Every model of every configured provider a virtual model may use.
fn expand(config: &Config, virtual_model: &str, rotation: u64) -> Vec<Candidate> {
    let tiers: &[Tier] = route::VIRTUAL_MODELS
        .iter()
        .find(|(v, _)| *v == virtual_model)
        .map_or(&[Tier::Free, Tier::Paid], |(_, t)| t);
    let mut out = Vec::new();
    for c in config.providers.iter().filter(|c| tiers.contains(&c.tier)) {
        for m in c.model_ids() {
            out.push(route::candidate(c, m, String::new(), rotation));
        }
    }
    out
}

/// The key of a free candidate's daily request counter (its first key's).
fn rpd_key(config: &Config, c: &Candidate) -> Option<String> {
    let q = quota_of(config, c)?;
    q.limit(Kind::Rpd).map(|_| q.key(Kind::Rpd))
}

fn quota_of<'c>(config: &'c Config, c: &'c Candidate) -> Option<QuotaRef<'c>> {
    let key = c.keys.first()?;
    route::quota_ref(config, c, key)
}

/// Requests left today on a candidate's first key, when its provider documents a daily limit.
fn rpd_left(config: &Config, c: &Candidate, value: Option<&[u8]>, now_ms: u64) -> Option<u64> {
    let q = quota_of(config, c)?;
    let limit = q.limit(Kind::Rpd)? as u64;
    let used = value
        .and_then(kv::decode_counter)
        .and_then(quota::decode)
        .filter(|(w, _)| *w == q.window(Kind::Rpd, now_ms))
        .map_or(0, |(_, n)| n);
    Some(limit.saturating_sub(used))
}

/// The conversation a request belongs to: the client's id, or — for a follow-up turn — its
/// system prompt and first user message. `None` for a single-turn request without an id.
fn conversation_id(request: &ChatRequest, facts: &Facts) -> Option<String> {
    if let Some(id) = facts
        .conversation
        .as_deref()
        .filter(|s| !s.trim().is_empty())
    {
        return Some(format!("id:{id}"));
    }
    let messages = request.body().get("messages")?.as_array()?;
    if !messages
        .iter()
        .any(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
    {
        return None;
    }
    let first = |role: &str| {
        messages
            .iter()
            .find(|m| m.get("role").and_then(Value::as_str) == Some(role))
            .and_then(|m| m.get("content"))
            .map(Value::to_string)
            .unwrap_or_default()
    };
    Some(format!("h:{}\u{0}{}", first("system"), first("user")))
}

/// The whole decision without a store: priors only, nothing spent, no policy unless given —
/// what `freerelay explain` prints.
pub fn explain(
    config: &Config,
    request: &ChatRequest,
    facts: &Facts,
    policy_text: Option<&str>,
) -> Result<Decision, ApiError> {
    let router = Router::new(config, request, facts)?;
    let mut values: Vec<Option<Vec<u8>>> = vec![None; router.keys().len()];
    values[0] = policy_text.map(|t| t.as_bytes().to_vec());
    router.decide(&values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::config_of;
    use crate::learn::Outcome;
    use crate::profile::Family;
    use serde_json::json;

    const HARD: &str = "The service deadlocks under load.\n\n```python\nimport threading\n\nclass Ledger:\n    def __init__(self):\n        self.a = threading.Lock()\n        self.b = threading.Lock()\n\n    def transfer(self, src, dst, amount):\n        with self.a:\n            with self.b:\n                self.move(src, dst, amount)\n\n    def audit(self):\n        with self.b:\n            with self.a:\n                return self.total()\n```\n\nTraceback (most recent call last):\n  File \"/srv/app/worker.py\", line 88, in run\n    ledger.audit()\n  File \"/srv/app/ledger.py\", line 17, in audit\n    with self.a:\nRuntimeError: watchdog: thread blocked for 30.0s\n\nFind the root cause of this race condition, refactor the class so transfers stay atomic without deadlocks, prove your lock ordering cannot deadlock, and analyse the trade-offs step by step.";

    const TITLE: &str = "### Task:\nGenerate a concise, 3-5 word title with an emoji summarizing the chat history.\n### Guidelines:\n- The title should clearly represent the main theme.\n### Output:\nJSON format: { \"title\": \"your concise title here\" }\n### Chat History:\n<chat_history>\nUSER: How do I keep a sourdough starter alive?\nASSISTANT: Feed it and refrigerate it.\n</chat_history>";

    fn cfg() -> Config {
        config_of(&[
            ("groq_api_key", "gsk-secret"),
            ("gemini_api_key", "g"),
            ("openai_api_key", "sk-secret"),
            ("anthropic_api_key", "a"),
        ])
        .unwrap()
    }

    fn req(model: &str, text: &str) -> ChatRequest {
        let body = json!({"model": model, "messages": [{"role": "user", "content": text}]});
        ChatRequest::parse(&serde_json::to_vec(&body).unwrap()).unwrap()
    }

    fn facts(mode: &str) -> Facts {
        Facts {
            mode: mode.into(),
            tenant: "tabc".into(),
            user: None,
            conversation: None,
            rotation: 0,
            now_ms: 1_800_000_000_000,
        }
    }

    /// Decides with `set` applied to the store values (by key).
    fn decide_with(
        config: &Config,
        r: &ChatRequest,
        f: &Facts,
        set: &[(String, Vec<u8>)],
    ) -> Result<Decision, ApiError> {
        let router = Router::new(config, r, f)?;
        let values: Vec<Option<Vec<u8>>> = router
            .keys()
            .iter()
            .map(|k| set.iter().find(|(sk, _)| sk == k).map(|(_, v)| v.clone()))
            .collect();
        router.decide(&values)
    }

    fn first(d: &Decision) -> String {
        let c = &d.plan.candidates[0];
        format!("{}/{}", c.provider, c.model)
    }

    fn tier(config: &Config, c: &Candidate) -> Tier {
        tier_of(config, c)
    }

    #[test]
    fn simple_work_goes_free_and_hard_work_paid_with_free_fallbacks() {
        let c = cfg();
        let easy = decide_with(
            &c,
            &req("auto", "What is the capital of Portugal?"),
            &facts("auto"),
            &[],
        )
        .unwrap();
        assert_eq!(
            tier(&c, &easy.plan.candidates[0]),
            Tier::Free,
            "{}",
            first(&easy)
        );
        // Free candidates all come before the paid ones.
        let tiers: Vec<Tier> = easy.plan.candidates.iter().map(|x| tier(&c, x)).collect();
        assert!(
            tiers
                .windows(2)
                .all(|w| !(w[0] == Tier::Paid && w[1] == Tier::Free)),
            "{tiers:?}"
        );
        let hard = decide_with(&c, &req("auto", HARD), &facts("auto"), &[]).unwrap();
        assert_eq!(
            tier(&c, &hard.plan.candidates[0]),
            Tier::Paid,
            "{}",
            first(&hard)
        );
        assert!(hard
            .plan
            .candidates
            .iter()
            .any(|x| tier(&c, x) == Tier::Free));
        assert_eq!(hard.audit_value()["profile"]["tier"]["value"], "paid");
        // Modes restrict, whatever the profile says.
        let free = decide_with(&c, &req("auto", HARD), &facts("free"), &[]).unwrap();
        assert!(free
            .plan
            .candidates
            .iter()
            .all(|x| tier(&c, x) == Tier::Free));
        let paid = decide_with(&c, &req("auto", "hi"), &facts("paid"), &[]).unwrap();
        assert!(paid
            .plan
            .candidates
            .iter()
            .all(|x| tier(&c, x) == Tier::Paid));
    }

    #[test]
    fn the_decision_is_owned_serialisable_secret_free_and_explains_itself() {
        let c = cfg();
        let d = decide_with(&c, &req("auto", "hello"), &facts("auto"), &[]).unwrap();
        let text = serde_json::to_string(&d).unwrap();
        assert!(!text.contains("gsk-secret") && !text.contains("sk-secret"));
        let back: Decision = serde_json::from_str(&text).unwrap();
        assert_eq!(back.plan, d.plan);
        let audit = d.audit_value();
        for dim in [
            "family",
            "depth",
            "precision",
            "latency",
            "context",
            "tools",
            "determinism",
            "security",
            "output",
            "economic",
        ] {
            assert!(audit["profile"][dim]["reasons"].is_array(), "{dim}");
        }
        let ranked: Vec<&Value> = audit["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["rank"].is_u64())
            .collect();
        assert_eq!(ranked.len(), d.plan.candidates.len());
        assert!(d.plan.candidates.len() <= MAX_PLAN);
        for x in ranked {
            assert!(x["score"]["utility"].is_f64(), "{x}");
        }
    }

    #[test]
    fn each_providers_best_model_comes_before_any_providers_second() {
        let c = cfg();
        let d = decide_with(&c, &req("auto", "hello"), &facts("free"), &[]).unwrap();
        let providers: Vec<&str> = d
            .plan
            .candidates
            .iter()
            .map(|x| x.provider.as_str())
            .collect();
        // Two free providers configured: one model of each, then the seconds.
        assert_ne!(providers[0], providers[1], "{providers:?}");
        assert!(providers.len() > 2, "{providers:?}");
    }

    #[test]
    fn a_chore_on_a_paid_model_goes_to_the_smallest_free_model_first() {
        let c = cfg();
        let d = decide_with(&c, &req("openai/gpt-4o", TITLE), &facts("auto"), &[]).unwrap();
        assert!(d.background);
        // The cheapest free model: one with a large daily quota (14,400 requests), not a scarce
        // one kept for work that needs it.
        let top = &d.plan.candidates[0];
        assert_eq!(tier(&c, top), Tier::Free, "{}", first(&d));
        let q = route::quota_ref(&c, top, &top.keys[0]).unwrap();
        assert!(
            q.limit(Kind::Rpd).is_some_and(|l| l >= 14_400),
            "{}",
            first(&d)
        );
        assert!(d.plan.candidates[0].reason.contains("background"));
        // The named model stays as the last resort.
        assert!(d.plan.candidates.iter().any(|x| x.model == "gpt-4o"));
        // A chore on a free model keeps it; `paid` mode keeps the paid one.
        let own = decide_with(
            &c,
            &req("groq/llama-3.3-70b-versatile", TITLE),
            &facts("auto"),
            &[],
        )
        .unwrap();
        assert_eq!(own.plan.candidates.len(), 1);
        let paid = decide_with(&c, &req("openai/gpt-4o", TITLE), &facts("paid"), &[]).unwrap();
        assert_eq!(first(&paid), "openai/gpt-4o");
        // Chores are not conversations to stick to.
        assert!(d.sticky_key.is_none());
    }

    #[test]
    fn policies_exclude_prefer_force_and_are_reported() {
        let c = cfg();
        let policy = "exclude groq\nwhen family = code: prefer anthropic/claude-haiku-4-5\ncap temperature 0.2\nhedge on\ncache off\n";
        let set = vec![(policy::key("tabc"), policy.as_bytes().to_vec())];
        let d = decide_with(&c, &req("auto", "hello"), &facts("auto"), &set).unwrap();
        assert!(d.plan.candidates.iter().all(|x| x.provider != "groq"));
        assert_eq!(d.max_temperature, Some(0.2));
        assert!(d.hedge);
        assert_eq!(d.cache, Some(false));
        let fired: Vec<u64> = d.audit_value()["policy"]["fired"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["line"].as_u64().unwrap())
            .collect();
        assert_eq!(fired, vec![1, 3, 4, 5]);
        let code = decide_with(
            &c,
            &req("auto", "Write a Rust function that reverses a string."),
            &facts("auto"),
            &set,
        )
        .unwrap();
        assert_eq!(first(&code), "anthropic/claude-haiku-4-5");
        assert_eq!(code.plan.candidates[0].reason, "preferred by policy");
        // A forced mode.
        let forced = vec![(
            policy::key("tabc"),
            b"when family = chat: mode paid\n".to_vec(),
        )];
        let p = decide_with(&c, &req("auto", "hello there"), &facts("auto"), &forced).unwrap();
        assert!(p.plan.candidates.iter().all(|x| tier(&c, x) == Tier::Paid));
        assert_eq!(p.mode, "paid");
        // A policy that no longer parses is ignored, not fatal.
        let broken = vec![(policy::key("tabc"), b"prefer (\n".to_vec())];
        assert!(decide_with(&c, &req("auto", "hello"), &facts("auto"), &broken).is_ok());
    }

    #[test]
    fn learned_failures_move_a_model_down() {
        let c = cfg();
        let r = req("auto", "hello");
        let before = decide_with(&c, &r, &facts("free"), &[]).unwrap();
        let top = before.plan.candidates[0].clone();
        let family = Family::parse(&before.family).unwrap();
        let mut s = Stats::default();
        for _ in 0..20 {
            s = s.add(
                Outcome {
                    success: false,
                    quality: 0.0,
                    latency_ms: 0,
                },
                1.0,
                1_800_000_000_000,
            );
        }
        let set = vec![(learn::key(&top.provider, &top.model, family), s.encode())];
        let after = decide_with(&c, &r, &facts("free"), &set).unwrap();
        assert_ne!(after.plan.candidates[0], top);
        let scored = after.audit_value()["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["model"] == top.model.as_str())
            .unwrap()
            .clone();
        assert!(scored["score"]["p_success"].as_f64().unwrap() < 0.3);
        assert_eq!(
            scored["score"]["learned_outcomes"]
                .as_f64()
                .unwrap()
                .round(),
            20.0
        );
    }

    #[test]
    fn a_conversation_sticks_to_its_model_in_the_same_tier_only() {
        let c = cfg();
        let mut f = facts("auto");
        f.conversation = Some("chat-1".into());
        let r = req("auto", "And what about Porto?");
        let plain = decide_with(&c, &r, &f, &[]).unwrap();
        let key = plain.sticky_key.clone().unwrap();
        assert_eq!(key, sticky_key("tabc", "id:chat-1"));
        let other = plain.plan.candidates.last().unwrap().clone();
        let record = |tier| Sticky {
            provider: other.provider.clone(),
            model: other.model.clone(),
            tier,
        };
        let stuck = decide_with(&c, &r, &f, &[(key.clone(), record(Tier::Free).encode())]).unwrap();
        if tier(&c, &other) == Tier::Free {
            assert_eq!(
                stuck.plan.candidates[0],
                Candidate {
                    reason: "sticky conversation".into(),
                    ..other.clone()
                }
            );
        }
        // Recorded in another tier than the profile calls for: not sticky.
        let moved = decide_with(&c, &r, &f, &[(key, record(Tier::Paid).encode())]).unwrap();
        assert_eq!(moved.plan.candidates[0], plain.plan.candidates[0]);
        // A follow-up turn without a client id is a conversation by its first messages.
        let body = json!({"model": "auto", "messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "more"}]});
        let follow = ChatRequest::parse(&serde_json::to_vec(&body).unwrap()).unwrap();
        assert!(decide_with(&c, &follow, &facts("auto"), &[])
            .unwrap()
            .sticky_key
            .is_some());
        assert!(
            plain.sticky_key.is_some()
                && decide_with(&c, &r, &facts("auto"), &[])
                    .unwrap()
                    .sticky_key
                    .is_none()
        );
    }

    #[test]
    fn an_open_breaker_goes_last_and_a_scarce_quota_grows_dear() {
        let c = cfg();
        let r = req("auto", "hello");
        let d = decide_with(&c, &r, &facts("free"), &[]).unwrap();
        let top = d.plan.candidates[0].clone();
        let open = crate::breaker::State::Open {
            since_ms: 1_800_000_000_000,
            until_ms: 1_900_000_000_000,
            level: 0,
        };
        let set = vec![(
            crate::kv::keys::breaker_state(&top.provider, &top.model),
            open.encode(),
        )];
        let after = decide_with(&c, &r, &facts("free"), &set).unwrap();
        let last = after
            .plan
            .candidates
            .iter()
            .position(|x| x.model == top.model);
        assert!(
            last.is_none() || last == Some(after.plan.candidates.len() - 1),
            "{after:?}"
        );
        // Rate-limit headroom: the same model with its daily quota nearly spent scores lower.
        let q = route::quota_ref(&c, &top, &top.keys[0]).unwrap();
        if let Some(limit) = q.limit(Kind::Rpd) {
            let used = quota::encode(q.window(Kind::Rpd, 1_800_000_000_000), u64::from(limit) - 1);
            let set = vec![(
                q.key(Kind::Rpd),
                crate::kv::CounterEncoding::LittleEndian.encode(used),
            )];
            let scarce = decide_with(&c, &r, &facts("free"), &set).unwrap();
            let s = |d: &Decision| {
                d.audit_value()["candidates"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|x| x["model"] == top.model.as_str())
                    .unwrap()["score"]["shadow_usd"]
                    .as_f64()
                    .unwrap()
            };
            assert!(s(&scarce) > s(&d) * 100.0, "{} vs {}", s(&scarce), s(&d));
        }
    }

    #[test]
    fn a_cooling_candidate_goes_last_so_the_plan_keeps_usable_ones() {
        let c = cfg();
        let r = req("auto", "hello");
        let d = decide_with(&c, &r, &facts("auto"), &[]).unwrap();
        // Cool every free candidate's keys: the paid ones must lead the plan now.
        let until = crate::cooldown::Cooldown::until(1_800_000_000_000, 1_900_000_000_000, 429);
        let mut set = Vec::new();
        for x in d
            .plan
            .candidates
            .iter()
            .filter(|x| tier(&c, x) == Tier::Free)
        {
            for k in &x.keys {
                for key in x.cooldown_keys(k, quota::Class::Foreground) {
                    set.push((key, until.encode()));
                }
            }
        }
        let after = decide_with(&c, &r, &facts("auto"), &set).unwrap();
        assert_eq!(
            tier(&c, &after.plan.candidates[0]),
            Tier::Paid,
            "{}",
            first(&after)
        );
        assert!(after.plan.candidates[0].reason.contains("expected utility"));
        let audit = after.audit_value();
        assert!(audit["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["held"].as_str().is_some_and(|h| h.starts_with("cooling"))));
    }

    #[test]
    fn capabilities_filter_and_errors_are_the_clients() {
        let c = cfg();
        let body = json!({"model": "auto", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]});
        let r = ChatRequest::parse(&serde_json::to_vec(&body).unwrap()).unwrap();
        let d = decide_with(&c, &r, &facts("auto"), &[]).unwrap();
        for x in &d.plan.candidates {
            let info = c.provider(&x.provider).unwrap().model_info(&x.model);
            assert!(info.caps.vision, "{}/{}", x.provider, x.model);
        }
        assert!(Router::new(&c, &req("nope", "hi"), &facts("auto")).is_err());
        let e = decide_with(
            &c,
            &req("groq/llama-3.1-8b-instant", "hi"),
            &facts("paid"),
            &[],
        );
        assert_eq!(e.unwrap_err().status, 400);
    }

    #[test]
    fn explain_reads_a_policy_text_and_settings_parse_strictly() {
        let c = cfg();
        let d = explain(
            &c,
            &req("auto", "hello"),
            &facts("auto"),
            Some("exclude gemini\n"),
        )
        .unwrap();
        assert!(d.plan.candidates.iter().all(|x| x.provider != "gemini"));
        let s = Settings::from_vars(|n| match n {
            "router" => Some("local".into()),
            "router_timeout_ms" => Some("250".into()),
            _ => None,
        })
        .unwrap();
        assert!(!s.chained && s.timeout_ms == 250);
        assert!(Settings::from_vars(|n| (n == "router").then(|| "remote".into())).is_err());
        assert!(Settings::from_vars(|n| (n == "router_timeout_ms").then(|| "0".into())).is_err());
    }
}
