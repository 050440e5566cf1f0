//! The provider catalogue: the one place that knows which providers exist, how to reach them,
//! what each model costs and allows. Routing, quotas and translators read it as data; no code is
//! written per vendor.
//!
//! The data lives in `src/catalog.toml` (with the source and date of every figure) and is
//! compiled into static Rust by `build.rs`: every request runs in a fresh wasm instance, and a
//! parse per request would be pure overhead.

/// Whether a provider costs money per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Free,
    Paid,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Free => "free",
            Tier::Paid => "paid",
        }
    }
}

/// How requests to a provider are encoded: selects the adapter (`crate::adapter::for_wire`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// OpenAI chat completions (and the many providers that copy it).
    OpenAi,
    /// Anthropic Messages (`POST /v1/messages`).
    Anthropic,
    /// Gemini `generateContent` / `streamGenerateContent?alt=sse`.
    Gemini,
}

/// How the provider key is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// `Authorization: Bearer <key>`.
    Bearer,
    /// `x-api-key: <key>` (Anthropic).
    XApiKey,
    /// `x-goog-api-key: <key>` (Gemini).
    XGoogApiKey,
}

/// When per-day limits start again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reset {
    UtcMidnight,
    /// Midnight in America/Los_Angeles (Gemini), daylight saving time included.
    PacificMidnight,
}

/// What one set of limits is counted over, per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Each model has its own allowance (Groq, Gemini, OpenAI).
    Model,
    /// One allowance for every model of the provider.
    Key,
    /// One allowance shared by every model in the named pool (OpenRouter's `:free` models).
    Pool(&'static str),
}

/// Which token-limit field a provider reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxTokensField {
    /// Either, as the client sent it.
    Any,
    MaxTokens,
    MaxCompletionTokens,
}

/// What an OpenAI-compatible provider does differently, as data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quirks {
    /// Accepts `stream_options` (Mistral answers 422), so the usage chunk can be asked for;
    /// otherwise the field is dropped and the usage chunk synthesised.
    pub stream_options: bool,
    pub max_tokens: MaxTokensField,
    /// Most `stop` strings accepted; extra ones are dropped (Continue sends 7, OpenAI takes 4).
    pub max_stop: Option<u8>,
    /// Parameters it rejects: removed from the request.
    pub drop: &'static [&'static str],
    /// Parameters it names differently: (OpenAI name, its name).
    pub rename: &'static [(&'static str, &'static str)],
    /// A trailing assistant message continues only with `"prefix": true` (Mistral).
    pub prefix_flag: bool,
}

/// Price in USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    pub source: &'static str,
}

/// What a model can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Caps {
    pub tools: bool,
    pub json_mode: bool,
    pub json_schema: bool,
    pub vision: bool,
    pub reasoning: bool,
    /// Continues a trailing assistant message (a prefill) instead of rejecting it.
    pub prefill: bool,
}

/// Documented limits (`None`: not documented) and what they are counted over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub rpm: Option<u32>,
    pub rpd: Option<u32>,
    pub tpm: Option<u32>,
    pub tpd: Option<u32>,
    pub scope: Scope,
    pub source: Option<&'static str>,
}

/// Everything known about one model, apart from its id.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelInfo {
    pub context_window: u32,
    pub max_output: u32,
    pub price: Option<Price>,
    pub caps: Caps,
    pub limits: Limits,
    /// The router's prior quality in 0..1: an editorial judgement from public leaderboards,
    /// replaced by what is learned from outcomes as they come.
    pub quality: f32,
    /// Task families (`profile::Family::as_str`) it does better than `quality` says.
    pub strong: &'static [&'static str],
}

/// A catalogued model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Model {
    /// The provider's own model id, sent upstream.
    pub id: &'static str,
    pub info: ModelInfo,
}

/// One provider: identity, endpoint, wire format, quirks and the models worth offering.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Provider {
    /// Stable id: the prefix of Spin variables (`<id>_base_url`, `<id>_api_key`) and of model ids.
    pub id: &'static str,
    pub name: &'static str,
    pub tier: Tier,
    pub wire: Wire,
    pub auth: Auth,
    /// The origin used when `<id>_base_url` is not set ("" when it must be set).
    pub default_origin: &'static str,
    /// Path of the API under the origin.
    pub api_path: &'static str,
    /// The model `auto` picks on this provider ("" for the custom provider: its first model).
    pub default_model: &'static str,
    pub reset: Reset,
    pub quirks: Quirks,
    /// The router's prior for the time to a short answer, in ms.
    pub latency_ms: u32,
    /// Its free tier may train on prompts (a risk for personal data and secrets).
    pub trains_on_data: bool,
    pub models: &'static [Model],
}

impl Provider {
    /// What is known of `model` here: its catalogue entry, or conservative defaults for a model
    /// the catalogue does not list (price unknown, limits undocumented).
    pub fn model_info(&self, model: &str) -> ModelInfo {
        self.models
            .iter()
            .find(|m| m.id == model)
            .map(|m| m.info)
            .unwrap_or_else(|| self.unlisted())
    }

    /// Defaults for a model the catalogue does not list.
    pub fn unlisted(&self) -> ModelInfo {
        ModelInfo {
            context_window: 8_192,
            max_output: 4_096,
            price: None,
            caps: Caps {
                tools: true,
                json_mode: true,
                ..Caps::default()
            },
            limits: Limits {
                rpm: None,
                rpd: None,
                tpm: None,
                tpd: None,
                scope: self
                    .models
                    .first()
                    .map_or(Scope::Model, |m| m.info.limits.scope),
                source: None,
            },
            quality: 0.5,
            strong: &[],
        }
    }
}

include!(concat!(env!("OUT_DIR"), "/catalog_data.rs"));

/// The id of the provider declared only by variables (`custom_base_url`, `custom_models`, …).
pub const CUSTOM: &str = "custom";

/// The provider with this id.
pub fn provider(id: &str) -> Option<&'static Provider> {
    PROVIDERS.iter().find(|p| p.id == id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_defaults_are_listed() {
        for (i, p) in PROVIDERS.iter().enumerate() {
            assert!(PROVIDERS[i + 1..].iter().all(|q| q.id != p.id), "{}", p.id);
            assert!(
                p.id == CUSTOM || p.models.iter().any(|m| m.id == p.default_model),
                "{}",
                p.id
            );
            assert!(!p.default_origin.ends_with('/'));
            assert!(p.api_path.starts_with('/') && !p.api_path.ends_with('/'));
        }
    }

    #[test]
    fn free_tiers_come_first_and_sources_are_known() {
        let listed: Vec<_> = PROVIDERS.iter().filter(|p| p.id != CUSTOM).collect();
        let first_paid = listed.iter().position(|p| p.tier == Tier::Paid).unwrap();
        assert!(listed[first_paid..].iter().all(|p| p.tier == Tier::Paid));
        // Together dropped its free tier (FIELD-NOTES, Nov 2026).
        assert_eq!(provider("together").unwrap().tier, Tier::Paid);
        for p in PROVIDERS {
            for m in p.models {
                let cited = [m.info.price.map(|p| p.source), m.info.limits.source];
                for s in cited.into_iter().flatten() {
                    assert!(SOURCES.iter().any(|(k, url, as_of)| *k == s
                        && url.starts_with("https://")
                        && as_of.len() >= 7));
                }
            }
        }
    }

    #[test]
    fn the_catalogue_carries_what_routing_needs() {
        let gemini = provider("gemini").unwrap();
        assert_eq!(
            (gemini.wire, gemini.auth),
            (Wire::Gemini, Auth::XGoogApiKey)
        );
        assert_eq!(gemini.reset, Reset::PacificMidnight);
        let or = provider("openrouter").unwrap();
        assert!(or
            .models
            .iter()
            .all(|m| m.info.limits.scope == Scope::Pool("free") && m.info.limits.rpd == Some(50)));
        let groq = provider("groq")
            .unwrap()
            .model_info("llama-3.3-70b-versatile");
        assert_eq!(
            (groq.limits.rpm, groq.limits.tpd, groq.limits.scope),
            (Some(30), Some(100_000), Scope::Model)
        );
        let mistral = provider("mistral").unwrap();
        assert!(!mistral.quirks.stream_options && mistral.quirks.prefix_flag);
        assert_eq!(mistral.quirks.rename, &[("seed", "random_seed")]);
        let haiku = provider("anthropic")
            .unwrap()
            .model_info("claude-haiku-4-5");
        assert!(haiku.caps.prefill && haiku.price.unwrap().output == 5.0);
        assert!(
            !provider("anthropic")
                .unwrap()
                .model_info("claude-opus-4-6")
                .caps
                .prefill
        );
        let unknown = provider("groq").unwrap().model_info("brand-new");
        assert_eq!((unknown.price, unknown.limits.rpm), (None, None));
    }
}
