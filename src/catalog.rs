//! The provider catalogue: the one place that knows which providers exist, how to reach them and
//! what they serve. Routing reads it as data; no code is written per vendor.
//!
//! Kept as static Rust data (not a file parsed at start-up) because every request runs in a fresh
//! wasm instance: a parse per request would be pure overhead.

/// Whether a provider costs money per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Free,
    Paid,
}

/// How requests to a provider are encoded: selects the adapter (`crate::adapter::for_wire`).
/// Native Anthropic Messages and Gemini `generateContent` come with their own variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    OpenAi,
}

/// A model as listed by `/v1/models`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Model {
    /// The provider's own model id, sent upstream.
    pub id: &'static str,
    pub context_window: u32,
}

/// One provider: identity, endpoint, wire format and the models worth offering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Provider {
    /// Stable id: the prefix of Spin variables (`<id>_base_url`, `<id>_api_key`) and of model ids.
    pub id: &'static str,
    pub tier: Tier,
    pub wire: Wire,
    /// The origin used when `<id>_base_url` is not set (Spin's allowed hosts take no path).
    pub default_origin: &'static str,
    /// Path prefix of the OpenAI-compatible API under the origin.
    pub api_path: &'static str,
    /// The model `auto` picks on this provider.
    pub default_model: &'static str,
    pub models: &'static [Model],
    /// Accepts `stream_options` (Mistral answers 422 to it), so usage can be asked for.
    pub stream_options: bool,
}

const fn m(id: &'static str, context_window: u32) -> Model {
    Model { id, context_window }
}

/// Every provider, in the order `auto` tries them: free tiers first, then paid.
pub static PROVIDERS: &[Provider] = &[
    Provider {
        id: "groq",
        tier: Tier::Free,
        wire: Wire::OpenAi,
        default_origin: "https://api.groq.com",
        api_path: "/openai/v1",
        default_model: "llama-3.1-8b-instant",
        models: &[
            m("llama-3.1-8b-instant", 131_072),
            m("llama-3.3-70b-versatile", 131_072),
            m("openai/gpt-oss-120b", 131_072),
            m("openai/gpt-oss-20b", 131_072),
        ],
        stream_options: true,
    },
    Provider {
        id: "gemini",
        tier: Tier::Free,
        wire: Wire::OpenAi,
        default_origin: "https://generativelanguage.googleapis.com",
        api_path: "/v1beta/openai",
        default_model: "gemini-2.5-flash",
        models: &[
            m("gemini-2.5-flash", 1_048_576),
            m("gemini-2.5-flash-lite", 1_048_576),
            m("gemini-2.5-pro", 1_048_576),
        ],
        stream_options: true,
    },
    Provider {
        id: "openrouter",
        tier: Tier::Free,
        wire: Wire::OpenAi,
        default_origin: "https://openrouter.ai",
        api_path: "/api/v1",
        default_model: "meta-llama/llama-3.3-70b-instruct:free",
        models: &[
            m("meta-llama/llama-3.3-70b-instruct:free", 131_072),
            m("deepseek/deepseek-chat-v3-0324:free", 163_840),
            m("qwen/qwen3-coder:free", 262_144),
        ],
        stream_options: true,
    },
    Provider {
        id: "mistral",
        tier: Tier::Free,
        wire: Wire::OpenAi,
        default_origin: "https://api.mistral.ai",
        api_path: "/v1",
        default_model: "mistral-small-latest",
        models: &[
            m("mistral-small-latest", 131_072),
            m("mistral-large-latest", 131_072),
            m("codestral-latest", 262_144),
        ],
        stream_options: false,
    },
    Provider {
        id: "nvidia",
        tier: Tier::Free,
        wire: Wire::OpenAi,
        default_origin: "https://integrate.api.nvidia.com",
        api_path: "/v1",
        default_model: "meta/llama-3.3-70b-instruct",
        models: &[
            m("meta/llama-3.3-70b-instruct", 131_072),
            m("deepseek-ai/deepseek-r1", 131_072),
        ],
        stream_options: true,
    },
    Provider {
        id: "together",
        tier: Tier::Paid,
        wire: Wire::OpenAi,
        default_origin: "https://api.together.xyz",
        api_path: "/v1",
        default_model: "meta-llama/Llama-3.3-70B-Instruct-Turbo",
        models: &[
            m("meta-llama/Llama-3.3-70B-Instruct-Turbo", 131_072),
            m("deepseek-ai/DeepSeek-V3", 131_072),
        ],
        stream_options: true,
    },
    Provider {
        id: "openai",
        tier: Tier::Paid,
        wire: Wire::OpenAi,
        default_origin: "https://api.openai.com",
        api_path: "/v1",
        default_model: "gpt-4o-mini",
        models: &[
            m("gpt-4o-mini", 128_000),
            m("gpt-4o", 128_000),
            m("gpt-4.1", 1_047_576),
            m("gpt-4.1-mini", 1_047_576),
        ],
        stream_options: true,
    },
    Provider {
        id: "anthropic",
        tier: Tier::Paid,
        wire: Wire::OpenAi,
        default_origin: "https://api.anthropic.com",
        api_path: "/v1",
        default_model: "claude-haiku-4-5",
        models: &[
            m("claude-haiku-4-5", 200_000),
            m("claude-sonnet-4-5", 200_000),
            m("claude-opus-4-1", 200_000),
        ],
        stream_options: true,
    },
];

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
            assert!(p.models.iter().any(|m| m.id == p.default_model), "{}", p.id);
            assert!(!p.default_origin.ends_with('/'));
            assert!(p.api_path.starts_with('/') && !p.api_path.ends_with('/'));
        }
    }

    #[test]
    fn free_tiers_come_first() {
        let first_paid = PROVIDERS.iter().position(|p| p.tier == Tier::Paid).unwrap();
        assert!(PROVIDERS[first_paid..].iter().all(|p| p.tier == Tier::Paid));
        // Together dropped its free tier (FIELD-NOTES, Nov 2026).
        assert_eq!(provider("together").unwrap().tier, Tier::Paid);
    }
}
