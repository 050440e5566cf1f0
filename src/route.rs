//! Which providers may answer a request, in which order. This is the walking skeleton of the
//! router: virtual models (`auto`, `free`, `paid`), explicit `<provider>/<model>` ids and bare
//! catalogue ids, minus providers that are cooling down.

use crate::catalog::{Scope, Tier, PROVIDERS};
use crate::config::{Config, Configured};
use crate::cooldown::Cooldown;
use crate::error::ApiError;
use crate::kv::KvOp;
use crate::quota::{self, Class, QuotaRef};
use serde::{Deserialize, Serialize};

/// One provider-model pair to try, with the keys to try it with. Owned and secret-free: it
/// names the provider and the keys' fingerprints; the component looks up the endpoint and the
/// keys in its own configuration when it sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// Catalogue id of the provider.
    pub provider: String,
    /// The model id sent upstream.
    pub model: String,
    /// What a 429 cools down besides the key: the model id or `@<pool>` where the provider
    /// limits per model or per pool; `None` where it limits per key (the whole key cools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger: Option<String>,
    /// Fingerprints of the keys to try, in order (rotated per request; cooling keys removed).
    pub keys: Vec<String>,
    /// Why it is in the plan, for the log and the audit.
    pub reason: String,
    /// The model's context window, in tokens (a context-length failure moves to a larger one).
    #[serde(default)]
    pub context_window: u32,
    /// The model continues a trailing assistant message (a broken stream can be rescued on it).
    #[serde(default)]
    pub prefill: bool,
}

/// Which tiers a request may use: `x-freerelay-mode`, or the virtual model it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Auto,
    Free,
    Paid,
}

impl Mode {
    /// Reads the `x-freerelay-mode` header (absent: `auto`).
    pub fn from_header(value: Option<&str>) -> Result<Self, ApiError> {
        match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("") | Some("auto") => Ok(Mode::Auto),
            Some("free") => Ok(Mode::Free),
            Some("paid") => Ok(Mode::Paid),
            Some(_) => Err(ApiError::invalid_request(
                "The header `x-freerelay-mode` must be `auto`, `free` or `paid`.",
                None,
            )),
        }
    }

    fn allows(self, tier: Tier) -> bool {
        match self {
            Mode::Auto => true,
            Mode::Free => tier == Tier::Free,
            Mode::Paid => tier == Tier::Paid,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Free => "free",
            Mode::Paid => "paid",
        }
    }
}

/// The ordered candidates for one request: a value a router component can return over
/// service chaining as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub candidates: Vec<Candidate>,
    /// The client named a virtual model, so falling back to another provider is expected.
    pub virtual_model: bool,
}

/// The virtual models and the tiers each may use.
pub const VIRTUAL_MODELS: &[(&str, &[Tier])] = &[
    ("auto", &[Tier::Free, Tier::Paid]),
    ("free", &[Tier::Free]),
    ("paid", &[Tier::Paid]),
];

/// Resolves the requested model against the configured providers. `rotation` (random per
/// request) picks which of a provider's keys goes first, spreading load over a key pool
/// without a write.
pub fn plan(config: &Config, model: &str, rotation: u64) -> Result<Plan, ApiError> {
    plan_request(config, model, &[], Mode::Auto, rotation)
}

/// The plan for a request: its `model`, then its `models` fallback list (OpenRouter's
/// convention), each a virtual model, a model group (`model_groups`) or a model; candidates in
/// that order without repeats, restricted to the tiers `mode` allows.
pub fn plan_request(
    config: &Config,
    model: &str,
    fallbacks: &[String],
    mode: Mode,
    rotation: u64,
) -> Result<Plan, ApiError> {
    let mut candidates: Vec<Candidate> = Vec::new();
    let mut virtual_model = !fallbacks.is_empty();
    let mut excluded: Vec<String> = Vec::new();
    for (i, spec) in std::iter::once(model)
        .chain(fallbacks.iter().map(String::as_str))
        .enumerate()
    {
        let p = match resolve(config, spec, rotation) {
            Ok(p) => p,
            // A fallback on a provider this deployment has no key for is skipped, as a group's
            // member is: one list can serve deployments with different providers.
            Err(_) if i > 0 && names_a_catalogued_provider(spec) => continue,
            Err(e) => return Err(e),
        };
        virtual_model |= p.virtual_model;
        for c in p.candidates {
            let tier = config.provider(&c.provider).map_or(Tier::Free, |p| p.tier);
            if !mode.allows(tier) {
                excluded.push(format!(
                    "{}/{} ({} tier)",
                    c.provider,
                    c.model,
                    tier.as_str()
                ));
                continue;
            }
            if !candidates
                .iter()
                .any(|have| have.provider == c.provider && have.model == c.model)
            {
                candidates.push(c);
            }
        }
    }
    if candidates.is_empty() {
        return Err(ApiError::invalid_request(
            format!(
                "`x-freerelay-mode: {}` excludes every candidate for this request: {}.",
                mode.name(),
                excluded.join(", ")
            ),
            Some("model"),
        ));
    }
    Ok(Plan {
        virtual_model: virtual_model || candidates.len() > 1,
        candidates,
    })
}

/// Does `model` name a provider of the catalogue (`<provider>/<model>`, or a catalogue model)?
fn names_a_catalogued_provider(model: &str) -> bool {
    PROVIDERS
        .iter()
        .any(|p| p.models.iter().any(|m| m.id == model))
        || model
            .split_once('/')
            .is_some_and(|(id, _)| crate::catalog::provider(id).is_some())
}

/// The candidates one model name stands for.
fn resolve(config: &Config, model: &str, rotation: u64) -> Result<Plan, ApiError> {
    if let Some(members) = config.group(model) {
        let mut candidates = Vec::new();
        for m in members {
            // A member whose provider has no key is skipped: groups are operator data.
            if let Ok(p) = resolve_one(config, m, rotation) {
                candidates.extend(p.candidates.into_iter().map(|mut c| {
                    c.reason = format!("group `{model}`");
                    c
                }));
            }
        }
        if candidates.is_empty() {
            return Err(ApiError::model_not_found(format!(
                "The model group `{model}` has no member with a configured provider."
            )));
        }
        return Ok(Plan {
            candidates,
            virtual_model: true,
        });
    }
    resolve_one(config, model, rotation)
}

/// A virtual model or one model.
fn resolve_one(config: &Config, model: &str, rotation: u64) -> Result<Plan, ApiError> {
    if let Some((name, tiers)) = VIRTUAL_MODELS.iter().find(|(v, _)| *v == model) {
        let mut offered: Vec<&Configured> = config
            .providers
            .iter()
            .filter(|c| tiers.contains(&c.tier))
            .collect();
        // Free tiers first (a deployment may have moved a provider to another tier).
        offered.sort_by_key(|c| c.tier == Tier::Paid);
        let candidates: Vec<_> = offered
            .into_iter()
            .map(|c| {
                let reason = format!("`{name}`: {} tier, catalogue order", c.tier.as_str());
                candidate(c, c.default_model(), reason, rotation)
            })
            .collect();
        if candidates.is_empty() {
            return Err(ApiError::model_not_found(format!(
                "The model `{name}` has no provider to route to: configure at least one \
                 provider's API key (e.g. SPIN_VARIABLE_GROQ_API_KEY)."
            )));
        }
        return Ok(Plan {
            candidates,
            virtual_model: true,
        });
    }
    // A bare model id a configured provider offers wins over a provider prefix:
    // `openai/gpt-oss-20b` is a Groq model.
    if let Some(c) = config
        .providers
        .iter()
        .find(|c| c.model_ids().contains(&model))
    {
        return Ok(explicit(c, model, rotation));
    }
    if let Some(p) = PROVIDERS
        .iter()
        .find(|p| p.models.iter().any(|m| m.id == model))
    {
        return Err(unconfigured(p.id, model));
    }
    if let Some((id, upstream_model)) = model.split_once('/') {
        if crate::catalog::provider(id).is_some() && !upstream_model.is_empty() {
            let c = config.provider(id).ok_or_else(|| unconfigured(id, model))?;
            return Ok(explicit(c, upstream_model, rotation));
        }
    }
    Err(ApiError::model_not_found(format!(
        "The model `{model}` does not exist. Use `auto`, `free`, `paid`, `<provider>/<model>` \
         or an id from /v1/models."
    )))
}

/// The candidate `model` of a configured provider, its keys rotated to start at `rotation`.
pub fn candidate(c: &Configured, model: &str, reason: String, rotation: u64) -> Candidate {
    let n = c.keys.len().max(1);
    let start = (rotation % n as u64) as usize;
    let keys = (0..c.keys.len())
        .map(|i| c.keys[(start + i) % n].id.clone())
        .collect();
    let ledger = match c.model_info(model).limits.scope {
        Scope::Model => Some(model.to_owned()),
        Scope::Key => None,
        Scope::Pool(name) => Some(format!("@{name}")),
    };
    let info = c.model_info(model);
    Candidate {
        provider: c.provider.id.to_owned(),
        model: model.to_owned(),
        ledger,
        keys,
        reason,
        context_window: info.context_window,
        prefill: info.caps.prefill,
    }
}

/// The quota of one candidate's key, when the key's provider is configured.
pub fn quota_ref<'a>(
    config: &'a Config,
    c: &'a Candidate,
    key_id: &'a str,
) -> Option<QuotaRef<'a>> {
    let configured = config.provider(&c.provider)?;
    Some(QuotaRef::of(
        configured,
        &c.model,
        c.ledger.as_deref(),
        key_id,
    ))
}

fn explicit(c: &Configured, model: &str, rotation: u64) -> Plan {
    Plan {
        candidates: vec![candidate(c, model, "named by the client".into(), rotation)],
        virtual_model: false,
    }
}

fn unconfigured(id: &str, model: &str) -> ApiError {
    ApiError::model_not_found(format!(
        "The model `{model}` is served by provider `{id}`, which has no API key configured."
    ))
}

impl Candidate {
    /// The cool-down keys that can bench `key` for this candidate and a request of `class`: the
    /// key's own, then its ledger's; for a background request, then the background-only ones in
    /// the same order ([`crate::cooldown::keys_read`]).
    pub fn cooldown_keys(&self, key: &str, class: Class) -> Vec<String> {
        crate::cooldown::keys_read(&self.provider, key, self.ledger.as_deref(), class)
    }
}

impl Plan {
    /// Everything to read before the first attempt, in one batch: for each candidate and each
    /// of its keys, the key's cool-downs (a background request's own ones too:
    /// [`Candidate::cooldown_keys`]), then its quota counters.
    pub fn state_keys(&self, config: &Config, class: Class) -> Vec<String> {
        let mut out = Vec::new();
        for c in &self.candidates {
            for k in &c.keys {
                out.extend(c.cooldown_keys(k, class));
                if let Some(q) = quota_ref(config, c, k) {
                    out.extend(quota::counter_keys(&q).into_iter().map(|(_, key)| key));
                }
            }
        }
        out
    }

    /// Keeps the keys that may be used now (`values` in the order of [`Self::state_keys`] for
    /// the same `class`): not cooling down, and with quota left for a request of
    /// `estimated_tokens` — so a free tier's allowance is spent without ever being told 429. A
    /// quota found exhausted is also returned as a cool-down to write, so other instances skip
    /// the key without reading its counters (a background request writes it under its own key:
    /// [`crate::cooldown::key`]). A background request is held to its share of each quota
    /// ([`Config::share`]): a key whose counter is at that share but under the limit is skipped
    /// and nothing is written (foreground requests may still use it). When no key is left: a 429
    /// with the shortest wait (in the header and in words, saying when a spent background share
    /// frees), a 502 when every key was refused by its provider, or a 400 when the request is
    /// larger than every candidate's token limit (its share of it, for a background request).
    pub fn usable(
        self,
        config: &Config,
        values: &[Option<Vec<u8>>],
        estimated_tokens: u64,
        now_ms: u64,
        class: Class,
    ) -> Result<(Self, Vec<KvOp>), ApiError> {
        let share = config.share(class);
        let mut shortest: Option<u64> = None;
        let mut refused: Vec<String> = Vec::new();
        let mut too_large: Vec<String> = Vec::new();
        let mut share_spent = false;
        let mut ops = Vec::new();
        let mut values = values.iter().chain(std::iter::repeat(&None));
        let mut wait = |until_ms: u64| {
            let left = until_ms.saturating_sub(now_ms).div_ceil(1000).max(1);
            shortest = Some(shortest.map_or(left, |s: u64| s.min(left)));
        };
        let mut kept = Vec::with_capacity(self.candidates.len());
        for mut c in self.candidates {
            let mut usable = Vec::with_capacity(c.keys.len());
            for k in std::mem::take(&mut c.keys) {
                let mut cooling = None::<Cooldown>;
                for _ in c.cooldown_keys(&k, class) {
                    let v = values.next().and_then(|v| v.as_deref());
                    if let Some(cd) = v.and_then(Cooldown::decode) {
                        if cd.is_active(now_ms)
                            && cooling.is_none_or(|have| cd.until_ms > have.until_ms)
                        {
                            cooling = Some(cd);
                        }
                    }
                }
                let verdict = quota_ref(config, &c, &k).map(|q| {
                    let n = quota::counter_keys(&q).len();
                    let counters: Vec<Option<Vec<u8>>> =
                        (0..n).map(|_| values.next().cloned().flatten()).collect();
                    (
                        quota::check(&q, &counters, estimated_tokens, share, now_ms),
                        q.limits.scope,
                    )
                });
                match (cooling, verdict) {
                    (Some(cd), _) if cd.status == 429 => wait(cd.until_ms),
                    (Some(_), _) => {
                        if !refused.contains(&c.provider) {
                            refused.push(c.provider.clone());
                        }
                    }
                    (None, Some((v @ quota::Verdict::Exhausted { until_ms, .. }, scope))) => {
                        wait(until_ms);
                        if let Some(cd) = v.cooldown() {
                            let ledger = match scope {
                                Scope::Key => None,
                                _ => c.ledger.as_deref(),
                            };
                            let key = crate::cooldown::key(&c.provider, &k, ledger, class);
                            ops.push(cd.op(key));
                        }
                    }
                    (None, Some((quota::Verdict::ShareSpent { until_ms, .. }, _))) => {
                        share_spent = true;
                        wait(until_ms);
                    }
                    (None, Some((quota::Verdict::TooLarge { kind, until_ms }, _))) => {
                        match until_ms {
                            Some(u) => wait(u),
                            None => too_large.push(format!(
                                "{}/{} ({} {}{})",
                                c.provider,
                                c.model,
                                kind.as_str(),
                                quota_ref(config, &c, &k)
                                    .and_then(|q| q.limit(kind))
                                    .map_or(0, |l| share.cap(l)),
                                match class {
                                    Class::Foreground => "",
                                    Class::Background => " for background requests",
                                }
                            )),
                        }
                    }
                    _ => usable.push(k),
                }
            }
            if !usable.is_empty() {
                c.keys = usable;
                kept.push(c);
            }
        }
        if kept.is_empty() {
            let seconds = |secs: u64| if secs == 1 { "second" } else { "seconds" };
            return Err(match shortest {
                Some(secs) if share_spent => ApiError::rate_limited(
                    format!(
                        "This is a background request, which may use only {}% of each \
                         provider's quota (the rest is kept for foreground requests), and that \
                         share is spent (or the provider is rate limited) for every provider of \
                         this model; it frees in {secs} {}. Retry after {secs} {}.",
                        100 - (share.reserve * 100.0).round() as u64,
                        seconds(secs),
                        seconds(secs)
                    ),
                    shortest,
                ),
                Some(secs) => ApiError::rate_limited(
                    format!(
                        "Every provider for this model is rate limited or at its quota. Retry \
                         after {secs} {}.",
                        seconds(secs)
                    ),
                    shortest,
                ),
                None if !refused.is_empty() => ApiError::upstream(format!(
                    "Every key of the providers for this model was recently refused by its \
                     provider (HTTP 401/403) and is set aside for up to an hour; check {}.",
                    refused
                        .iter()
                        .map(|p| format!("`{p}_api_key`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
                None if !too_large.is_empty() => ApiError::invalid_request(
                    format!(
                        "This request (about {estimated_tokens} tokens) is larger than the token \
                         limit of every candidate: {}.",
                        too_large.join(", ")
                    ),
                    Some("messages"),
                ),
                None => ApiError::internal("The routing plan has no key to use."),
            });
        }
        Ok((
            Self {
                candidates: kept,
                virtual_model: self.virtual_model,
            },
            ops,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::config_of;
    use crate::config::ApiKey;

    fn ids(p: &Plan) -> Vec<(String, String)> {
        p.candidates
            .iter()
            .map(|c| (c.provider.clone(), c.model.clone()))
            .collect()
    }

    #[test]
    fn plans_are_owned_serialisable_and_secret_free() {
        let c = config_of(&[("groq_api_key", "gsk-very-secret")]).unwrap();
        let p = plan(&c, "auto", 0).unwrap();
        drop(c);
        let json = serde_json::to_string(&p).unwrap();
        assert!(!json.contains("gsk-very-secret"));
        let back: Plan = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
        assert!(back.candidates[0].reason.contains("free"));
    }

    fn pair(a: &str, b: &str) -> (String, String) {
        (a.into(), b.into())
    }

    #[test]
    fn auto_is_free_first_in_catalogue_order() {
        let c = config_of(&[
            ("openai_api_key", "o"),
            ("mistral_api_key", "m"),
            ("groq_api_key", "g"),
        ])
        .unwrap();
        let p = plan(&c, "auto", 0).unwrap();
        assert!(p.virtual_model);
        assert_eq!(
            ids(&p),
            vec![
                pair("groq", "llama-3.1-8b-instant"),
                pair("mistral", "mistral-small-latest"),
                pair("openai", "gpt-4o-mini")
            ]
        );
        assert_eq!(
            ids(&plan(&c, "paid", 0).unwrap()),
            vec![pair("openai", "gpt-4o-mini")]
        );
        assert_eq!(plan(&c, "free", 0).unwrap().candidates.len(), 2);
    }

    #[test]
    fn explicit_and_bare_ids() {
        let c = config_of(&[("groq_api_key", "g"), ("openai_api_key", "o")]).unwrap();
        assert_eq!(
            ids(&plan(&c, "groq/some-new-model", 0).unwrap()),
            vec![pair("groq", "some-new-model")]
        );
        assert_eq!(
            ids(&plan(&c, "openai/gpt-oss-20b", 0).unwrap()),
            vec![pair("groq", "openai/gpt-oss-20b")]
        );
        assert_eq!(
            ids(&plan(&c, "gpt-4o", 0).unwrap()),
            vec![pair("openai", "gpt-4o")]
        );
        assert!(!plan(&c, "gpt-4o", 0).unwrap().virtual_model);
    }

    #[test]
    fn unknown_or_unconfigured_is_404() {
        let c = config_of(&[("groq_api_key", "g")]).unwrap();
        for m in [
            "nope",
            "mistral/mistral-small-latest",
            "gemini-2.5-flash",
            "claude-haiku-4-5",
            "groq/",
            "acme/x",
        ] {
            let e = plan(&c, m, 0).unwrap_err();
            assert_eq!((e.status, e.code), (404, Some("model_not_found")), "{m}");
        }
        let empty = config_of(&[]).unwrap();
        assert_eq!(plan(&empty, "auto", 0).unwrap_err().status, 404);
    }

    #[test]
    fn cooling_keys_are_skipped_then_429() {
        use crate::kv::{Kv, MemKv};
        let c = config_of(&[("groq_api_key", "ga"), ("mistral_api_key", "m")]).unwrap();
        let p = plan(&c, "auto", 0).unwrap();
        let (ga, m) = (ApiKey::new("ga").id, ApiKey::new("m").id);
        let state = p.state_keys(&c, Class::Foreground);
        for k in [
            format!("cooldown:v1:groq:{ga}"),
            format!("cooldown:v1:groq:{ga}:llama-3.1-8b-instant"),
            format!("cooldown:v1:mistral:{m}"),
            format!("cooldown:v1:mistral:{m}:mistral-small-latest"),
        ] {
            assert!(state.contains(&k), "{k} is read");
        }
        let kv = MemKv::default();
        let usable = |now| {
            let values = kv.get_many(&p.state_keys(&c, Class::Foreground)).unwrap();
            p.clone().usable(&c, &values, 10, now, Class::Foreground)
        };
        let groq_model = format!("cooldown:v1:groq:{ga}:llama-3.1-8b-instant");
        kv.set(&groq_model, &Cooldown::new(0, 5_000, 429).encode())
            .unwrap();
        let (kept, ops) = usable(1_000).unwrap();
        assert_eq!(ids(&kept), vec![pair("mistral", "mistral-small-latest")]);
        assert!(ops.is_empty());
        assert_eq!(usable(9_000).unwrap().0.candidates.len(), 2, "expired");
        kv.set(
            &format!("cooldown:v1:mistral:{m}"),
            &Cooldown::new(0, 9_000, 429).encode(),
        )
        .unwrap();
        let e = usable(1_000).unwrap_err();
        assert_eq!((e.status, e.retry_after), (429, Some(4)));
        assert!(e.message.contains("Retry after 4 seconds."));
    }

    #[test]
    fn a_background_request_skips_a_key_at_its_share_without_cooling_it_for_anyone() {
        use crate::kv::{Kv, MemKv};
        // groq's rpm of 4: a background request's share is 3.
        let c = config_of(&[
            ("groq_api_key", "g"),
            ("groq_rpm", "4"),
            ("mistral_api_key", "m"),
        ])
        .unwrap();
        let p = plan(&c, "groq/llama-3.1-8b-instant", 0).unwrap();
        let g = ApiKey::new("g").id;
        let fg_keys = p.state_keys(&c, Class::Foreground);
        let bg_keys = p.state_keys(&c, Class::Background);
        let bg_only = [
            format!("cooldown:v1:bg:groq:{g}"),
            format!("cooldown:v1:bg:groq:{g}:llama-3.1-8b-instant"),
        ];
        for k in &bg_only {
            assert!(bg_keys.contains(k) && !fg_keys.contains(k), "{k}");
        }
        assert!(fg_keys.iter().all(|k| bg_keys.contains(k)));
        let kv = MemKv::default();
        let usable = |p: &Plan, class| {
            let values = kv.get_many(&p.state_keys(&c, class)).unwrap();
            p.clone().usable(&c, &values, 10, NOW, class)
        };
        const NOW: u64 = 60_000 * 100 + 15_000;
        let q = quota_ref(&c, &p.candidates[0], &g).unwrap();
        for _ in 0..3 {
            let share = c.share(Class::Background);
            assert!(quota::admit_minute(&kv, &q, share, NOW).unwrap().is_open());
        }
        // At the share: background refused with a 429 that says so and when it frees, and
        // nothing written; foreground still served.
        let e = usable(&p, Class::Background).unwrap_err();
        assert_eq!((e.status, e.retry_after), (429, Some(45)));
        assert!(
            e.message.contains("background request") && e.message.contains("75%"),
            "{}",
            e.message
        );
        assert!(e.message.contains("frees in 45 seconds"), "{}", e.message);
        let (kept, ops) = usable(&p, Class::Foreground).unwrap();
        assert_eq!(kept.candidates.len(), 1);
        assert!(ops.is_empty());
        // With another provider left, background moves to it and writes nothing either.
        let auto = plan(&c, "auto", 0).unwrap();
        let (kept, ops) = usable(&auto, Class::Background).unwrap();
        assert_eq!(ids(&kept), vec![pair("mistral", "mistral-small-latest")]);
        assert!(ops.is_empty());
        // At the limit: exhausted for everyone, and each class writes its own cool-down.
        let fg = quota::Share::FOREGROUND;
        assert!(quota::admit_minute(&kv, &q, fg, NOW).unwrap().is_open());
        let written = |class| -> Vec<String> {
            let (kept, ops) = usable(&auto, class).unwrap();
            assert_eq!(kept.candidates[0].provider, "mistral");
            ops.iter().map(|op| op.key().to_owned()).collect()
        };
        let ledger = "llama-3.1-8b-instant";
        assert_eq!(
            written(Class::Foreground),
            [format!("cooldown:v1:groq:{g}:{ledger}")]
        );
        assert_eq!(
            written(Class::Background),
            [format!("cooldown:v1:bg:groq:{g}:{ledger}")]
        );
    }

    #[test]
    fn a_background_cool_down_benches_background_requests_only() {
        use crate::kv::{Kv, MemKv};
        let c = config_of(&[("groq_api_key", "g")]).unwrap();
        let p = plan(&c, "auto", 0).unwrap();
        let g = ApiKey::new("g").id;
        let kv = MemKv::default();
        let usable = |class| {
            let values = kv.get_many(&p.state_keys(&c, class)).unwrap();
            p.clone().usable(&c, &values, 10, 1_000, class)
        };
        kv.set(
            &format!("cooldown:v1:bg:groq:{g}:llama-3.1-8b-instant"),
            &Cooldown::new(0, 30_000, 429).encode(),
        )
        .unwrap();
        assert!(usable(Class::Foreground).is_ok());
        let e = usable(Class::Background).unwrap_err();
        assert_eq!((e.status, e.retry_after), (429, Some(29)));
        assert!(!e.message.contains("background"), "{}", e.message);
        // A shared cool-down benches both.
        kv.set(
            &format!("cooldown:v1:groq:{g}"),
            &Cooldown::new(0, 40_000, 429).encode(),
        )
        .unwrap();
        assert_eq!(usable(Class::Foreground).unwrap_err().retry_after, Some(39));
        assert_eq!(usable(Class::Background).unwrap_err().retry_after, Some(39));
    }

    #[test]
    fn keys_rotate_per_request_and_tiers_can_be_overridden() {
        let c = config_of(&[
            ("groq_api_key", "a, b ,c,a"),
            ("openai_api_key", "o"),
            ("openai_tier", "free"),
            ("groq_tier", "paid"),
        ])
        .unwrap();
        let ids_of = |secrets: &[&str]| -> Vec<String> {
            secrets.iter().map(|s| ApiKey::new(s).id).collect()
        };
        let p = plan(&c, "groq/x", 1).unwrap();
        assert_eq!(
            p.candidates[0].keys,
            ids_of(&["b", "c", "a"]),
            "deduplicated, rotated"
        );
        assert_eq!(
            plan(&c, "groq/x", 3).unwrap().candidates[0].keys,
            ids_of(&["a", "b", "c"])
        );
        // Tier overrides move providers between `free` and `paid`, free first under `auto`.
        let auto: Vec<String> = plan(&c, "auto", 0)
            .unwrap()
            .candidates
            .into_iter()
            .map(|c| c.provider)
            .collect();
        assert_eq!(auto, ["openai", "groq"]);
        assert_eq!(ids(&plan(&c, "free", 0).unwrap())[0].0, "openai");
    }

    #[test]
    fn a_custom_provider_is_declared_by_variables_alone() {
        let c = config_of(&[
            ("custom_models", "llama3.2:3b, qwen2.5-coder:7b"),
            ("custom_base_url", "http://127.0.0.1:11434"),
        ])
        .unwrap();
        let p = plan(&c, "auto", 0).unwrap();
        assert_eq!(ids(&p), vec![pair("custom", "llama3.2:3b")]);
        assert_eq!(
            ids(&plan(&c, "qwen2.5-coder:7b", 0).unwrap()),
            vec![pair("custom", "qwen2.5-coder:7b")]
        );
        assert_eq!(
            ids(&plan(&c, "custom/other", 0).unwrap()),
            vec![pair("custom", "other")]
        );
        let custom = c.provider("custom").unwrap();
        assert_eq!(custom.base_url, "http://127.0.0.1:11434/v1");
        assert_eq!(custom.keys[0].secret(), "", "keyless");
        assert_eq!(custom.price("llama3.2:3b").unwrap().input, 0.0);
    }

    #[test]
    fn fallback_lists_groups_and_modes() {
        let c = config_of(&[
            ("groq_api_key", "g"),
            ("openai_api_key", "o"),
            (
                "model_groups",
                "fast=groq/llama-3.1-8b-instant,cerebras/gpt-oss-120b,openai/gpt-4o-mini",
            ),
        ])
        .unwrap();
        let p = plan_request(
            &c,
            "groq/llama-3.3-70b-versatile",
            &[
                "openai/gpt-4o-mini".into(),
                "groq/llama-3.3-70b-versatile".into(),
            ],
            Mode::Auto,
            0,
        )
        .unwrap();
        assert_eq!(
            ids(&p),
            vec![
                pair("groq", "llama-3.3-70b-versatile"),
                pair("openai", "gpt-4o-mini")
            ]
        );
        assert!(p.virtual_model);
        assert_eq!(p.candidates[0].context_window, 131_072);
        // A group: members in order, unconfigured ones (cerebras) skipped.
        let p = plan_request(&c, "fast", &[], Mode::Auto, 0).unwrap();
        assert_eq!(
            ids(&p),
            vec![
                pair("groq", "llama-3.1-8b-instant"),
                pair("openai", "gpt-4o-mini")
            ]
        );
        // Modes: free never reaches paid, paid never free.
        let p = plan_request(&c, "fast", &[], Mode::Free, 0).unwrap();
        assert_eq!(ids(&p), vec![pair("groq", "llama-3.1-8b-instant")]);
        let p = plan_request(&c, "auto", &[], Mode::Paid, 0).unwrap();
        assert_eq!(ids(&p), vec![pair("openai", "gpt-4o-mini")]);
        let e = plan_request(&c, "openai/gpt-4o-mini", &[], Mode::Free, 0).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("paid tier"));
        assert_eq!(Mode::from_header(Some(" FREE ")).unwrap(), Mode::Free);
        assert!(Mode::from_header(Some("cheap")).is_err());
        // An unknown fallback is the client's mistake; one on a provider without a key here is
        // skipped (the same list serves deployments with other providers).
        let e = plan_request(&c, "auto", &["nope".into()], Mode::Auto, 0).unwrap_err();
        assert_eq!(e.status, 404);
        let p = plan_request(
            &c,
            "groq/x",
            &["mistral/mistral-small-latest".into()],
            Mode::Auto,
            0,
        )
        .unwrap();
        assert_eq!(ids(&p), vec![pair("groq", "x")]);
        assert!(
            plan_request(&c, "mistral/m", &[], Mode::Auto, 0).is_err(),
            "the model itself"
        );
        // Prefill capability travels with the candidate (for stream rescue).
        let c = config_of(&[("mistral_api_key", "m")]).unwrap();
        assert!(plan(&c, "auto", 0).unwrap().candidates[0].prefill);
    }
}
