//! Which providers may answer a request, in which order. This is the walking skeleton of the
//! router: virtual models (`auto`, `free`, `paid`), explicit `<provider>/<model>` ids and bare
//! catalogue ids, minus providers that are cooling down.

use crate::catalog::{Tier, PROVIDERS};
use crate::config::{Config, Configured};
use crate::cooldown::Cooldown;
use crate::error::ApiError;
use crate::kv::keys;
use serde::{Deserialize, Serialize};

/// One provider-model pair to try. Owned and secret-free: it names the provider, and the
/// component looks up the endpoint and key in its own configuration when it sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// Catalogue id of the provider.
    pub provider: String,
    /// The model id sent upstream.
    pub model: String,
    /// Why it is in the plan, for the log and the audit.
    pub reason: String,
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

/// Resolves the requested model against the configured providers.
pub fn plan(config: &Config, model: &str) -> Result<Plan, ApiError> {
    if let Some((name, tiers)) = VIRTUAL_MODELS.iter().find(|(v, _)| *v == model) {
        let candidates: Vec<_> = config
            .providers
            .iter()
            .filter(|c| tiers.contains(&c.provider.tier))
            .map(|c| Candidate {
                provider: c.provider.id.to_owned(),
                model: c.provider.default_model.to_owned(),
                reason: format!(
                    "`{name}`: {} tier, catalogue order",
                    if c.provider.tier == Tier::Free {
                        "free"
                    } else {
                        "paid"
                    }
                ),
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
    // A bare catalogue id wins over a provider prefix: `openai/gpt-oss-20b` is a Groq model.
    if let Some(p) = PROVIDERS
        .iter()
        .find(|p| p.models.iter().any(|m| m.id == model))
    {
        let c = configured(config, p.id, model)?;
        return Ok(explicit(c, model));
    }
    if let Some((id, upstream_model)) = model.split_once('/') {
        if crate::catalog::provider(id).is_some() && !upstream_model.is_empty() {
            let c = configured(config, id, model)?;
            return Ok(explicit(c, upstream_model));
        }
    }
    Err(ApiError::model_not_found(format!(
        "The model `{model}` does not exist. Use `auto`, `free`, `paid`, `<provider>/<model>` \
         or an id from /v1/models."
    )))
}

fn explicit(c: &Configured, model: &str) -> Plan {
    Plan {
        candidates: vec![Candidate {
            provider: c.provider.id.to_owned(),
            model: model.to_owned(),
            reason: "named by the client".into(),
        }],
        virtual_model: false,
    }
}

fn configured<'a>(config: &'a Config, id: &str, model: &str) -> Result<&'a Configured, ApiError> {
    config.provider(id).ok_or_else(|| {
        ApiError::model_not_found(format!(
            "The model `{model}` is served by provider `{id}`, which has no API key configured."
        ))
    })
}

impl Plan {
    /// The cool-down keys of the candidates, read in one batch before the first attempt.
    pub fn cooldown_keys(&self) -> Vec<String> {
        self.candidates
            .iter()
            .map(|c| keys::cooldown(&c.provider))
            .collect()
    }

    /// Drops candidates that are cooling down (`values` in the order of [`Self::cooldown_keys`]).
    /// When none is left the client gets a 429 with the shortest remaining wait.
    pub fn without_cooling(
        self,
        values: &[Option<Vec<u8>>],
        now_ms: u64,
    ) -> Result<Self, ApiError> {
        let mut shortest: Option<u64> = None;
        let mut kept = Vec::with_capacity(self.candidates.len());
        for (c, v) in self
            .candidates
            .into_iter()
            .zip(values.iter().chain(std::iter::repeat(&None)))
        {
            match v.as_deref().and_then(Cooldown::decode) {
                Some(cd) if cd.is_active(now_ms) => {
                    let left = cd.remaining_secs(now_ms);
                    shortest = Some(shortest.map_or(left, |s| s.min(left)));
                }
                _ => kept.push(c),
            }
        }
        if kept.is_empty() {
            return Err(ApiError::rate_limited(
                "Every provider for this model is rate limited; retry after the indicated time.",
                shortest,
            ));
        }
        Ok(Self {
            candidates: kept,
            virtual_model: self.virtual_model,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::config_of;

    fn ids(p: &Plan) -> Vec<(String, String)> {
        p.candidates
            .iter()
            .map(|c| (c.provider.clone(), c.model.clone()))
            .collect()
    }

    #[test]
    fn plans_are_owned_serialisable_and_secret_free() {
        let c = config_of(&[("groq_api_key", "gsk-very-secret")]).unwrap();
        let p = plan(&c, "auto").unwrap();
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
        let p = plan(&c, "auto").unwrap();
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
            ids(&plan(&c, "paid").unwrap()),
            vec![pair("openai", "gpt-4o-mini")]
        );
        assert_eq!(plan(&c, "free").unwrap().candidates.len(), 2);
    }

    #[test]
    fn explicit_and_bare_ids() {
        let c = config_of(&[("groq_api_key", "g"), ("openai_api_key", "o")]).unwrap();
        assert_eq!(
            ids(&plan(&c, "groq/some-new-model").unwrap()),
            vec![pair("groq", "some-new-model")]
        );
        assert_eq!(
            ids(&plan(&c, "openai/gpt-oss-20b").unwrap()),
            vec![pair("groq", "openai/gpt-oss-20b")]
        );
        assert_eq!(
            ids(&plan(&c, "gpt-4o").unwrap()),
            vec![pair("openai", "gpt-4o")]
        );
        assert!(!plan(&c, "gpt-4o").unwrap().virtual_model);
    }

    #[test]
    fn unknown_or_unconfigured_is_404() {
        let c = config_of(&[("groq_api_key", "g")]).unwrap();
        for m in [
            "nope",
            "mistral/mistral-small-latest",
            "claude-haiku-4-5",
            "groq/",
            "acme/x",
        ] {
            let e = plan(&c, m).unwrap_err();
            assert_eq!((e.status, e.code), (404, Some("model_not_found")), "{m}");
        }
        let empty = config_of(&[]).unwrap();
        assert_eq!(plan(&empty, "auto").unwrap_err().status, 404);
    }

    #[test]
    fn cooling_providers_are_skipped_then_429() {
        let c = config_of(&[("groq_api_key", "g"), ("mistral_api_key", "m")]).unwrap();
        let p = plan(&c, "auto").unwrap();
        assert_eq!(
            p.cooldown_keys(),
            vec!["cooldown:v1:groq", "cooldown:v1:mistral"]
        );
        let groq_cool = Some(Cooldown::new(0, 5_000, 429).encode());
        let kept = p
            .clone()
            .without_cooling(&[groq_cool.clone(), None], 1_000)
            .unwrap();
        assert_eq!(ids(&kept), vec![pair("mistral", "mistral-small-latest")]);
        let expired = p
            .clone()
            .without_cooling(&[groq_cool.clone(), None], 9_000)
            .unwrap();
        assert_eq!(expired.candidates.len(), 2);
        let both = Some(Cooldown::new(0, 9_000, 429).encode());
        let e = p.without_cooling(&[groq_cool, both], 1_000).unwrap_err();
        assert_eq!((e.status, e.retry_after), (429, Some(4)));
    }
}
