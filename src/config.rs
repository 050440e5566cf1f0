//! Gateway configuration, read from Spin variables once per request and validated in one place so
//! that a bad setting is reported by name instead of surfacing as an odd upstream failure.

use crate::catalog::{Provider, PROVIDERS};
use crate::error::ApiError;

/// Variable names that are not per provider.
pub const CLIENT_KEYS: &str = "client_keys";
pub const MAX_BODY_BYTES: &str = "max_body_bytes";
pub const CONNECT_TIMEOUT_MS: &str = "upstream_connect_timeout_ms";
pub const FIRST_BYTE_TIMEOUT_MS: &str = "upstream_first_byte_timeout_ms";
pub const BETWEEN_BYTES_TIMEOUT_MS: &str = "upstream_between_bytes_timeout_ms";

/// The request body limit when `max_body_bytes` is unset.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 4 * 1024 * 1024;

/// Upstream timeouts, in milliseconds, handed to wasi:http's request options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect_ms: u64,
    pub first_byte_ms: u64,
    pub between_bytes_ms: u64,
}

/// A provider that has an API key, with its resolved endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Configured {
    pub provider: &'static Provider,
    /// Base of the OpenAI-compatible API, without trailing slash (origin + api path).
    pub base_url: String,
    pub api_key: String,
}

impl Configured {
    /// The chat-completions endpoint.
    pub fn chat_url(&self) -> String {
        format!("{}/chat/completions", self.base_url)
    }
}

/// Everything one request needs to know about the deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Lower-case SHA-256 hex digests of accepted client keys.
    pub client_key_digests: Vec<String>,
    pub max_body_bytes: u64,
    pub timeouts: Timeouts,
    /// Configured providers, in catalogue order.
    pub providers: Vec<Configured>,
}

impl Config {
    /// Builds the configuration from a variable lookup (Spin's `variables::get` in components,
    /// a map in tests). A missing variable counts as empty.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, ApiError> {
        let var = |name: &str| get(name).map(|v| v.trim().to_owned()).unwrap_or_default();
        let number = |name: &str, default: u64| -> Result<u64, ApiError> {
            let raw = var(name);
            if raw.is_empty() {
                return Ok(default);
            }
            raw.parse::<u64>().map_err(|_| {
                ApiError::internal(format!(
                    "gateway misconfigured: variable `{name}` must be a whole number, got {raw:?}"
                ))
            })
        };
        let client_key_digests = var(CLIENT_KEYS)
            .split(',')
            .map(|d| d.trim().to_ascii_lowercase())
            .filter(|d| !d.is_empty())
            .collect::<Vec<_>>();
        if let Some(bad) = client_key_digests
            .iter()
            .find(|d| d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(ApiError::internal(format!(
                "gateway misconfigured: `client_keys` holds {bad:?}, which is not a SHA-256 hex \
                 digest (use `freerelay keygen`)"
            )));
        }
        let mut providers = Vec::new();
        for p in PROVIDERS {
            let api_key = var(&format!("{}_api_key", p.id));
            if api_key.is_empty() {
                continue;
            }
            let origin = var(&format!("{}_base_url", p.id));
            let base_url = resolve_base_url(p, &origin)?;
            providers.push(Configured {
                provider: p,
                base_url,
                api_key,
            });
        }
        Ok(Self {
            client_key_digests,
            max_body_bytes: number(MAX_BODY_BYTES, DEFAULT_MAX_BODY_BYTES)?,
            timeouts: Timeouts {
                connect_ms: number(CONNECT_TIMEOUT_MS, 5_000)?,
                first_byte_ms: number(FIRST_BYTE_TIMEOUT_MS, 60_000)?,
                between_bytes_ms: number(BETWEEN_BYTES_TIMEOUT_MS, 30_000)?,
            },
            providers,
        })
    }

    /// The configured provider with this id.
    pub fn provider(&self, id: &str) -> Option<&Configured> {
        self.providers.iter().find(|c| c.provider.id == id)
    }
}

/// `<id>_base_url` is an origin (Spin's allowed hosts reject paths); the catalogue adds the API
/// path. A URL that does carry a path is taken as the full base, for runners that allow it.
fn resolve_base_url(p: &Provider, configured: &str) -> Result<String, ApiError> {
    let raw = if configured.is_empty() {
        p.default_origin
    } else {
        configured
    };
    let url = url::Url::parse(raw).map_err(|e| {
        ApiError::internal(format!(
            "gateway misconfigured: `{}_base_url` is not a URL ({e}): {raw:?}",
            p.id
        ))
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(ApiError::internal(format!(
            "gateway misconfigured: `{}_base_url` must be an http(s) origin, got {raw:?}",
            p.id
        )));
    }
    let trimmed = raw.trim_end_matches('/');
    Ok(if url.path() == "/" || url.path().is_empty() {
        format!("{trimmed}{}", p.api_path)
    } else {
        trimmed.to_owned()
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;

    pub(crate) fn config_of(pairs: &[(&str, &str)]) -> Result<Config, ApiError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn providers_without_keys_are_not_offered() {
        let c = config_of(&[("mistral_api_key", "m"), ("groq_base_url", "http://x:1")]).unwrap();
        assert_eq!(c.providers.len(), 1);
        assert_eq!(c.providers[0].provider.id, "mistral");
        assert_eq!(c.providers[0].base_url, "https://api.mistral.ai/v1");
    }

    #[test]
    fn origin_gets_the_catalogue_path_and_a_full_url_is_kept() {
        let c = config_of(&[
            ("groq_api_key", "g"),
            ("groq_base_url", "http://127.0.0.1:9000/"),
            ("openai_api_key", "o"),
            ("openai_base_url", "http://127.0.0.1:9001/custom/v1/"),
        ])
        .unwrap();
        assert_eq!(
            c.provider("groq").unwrap().chat_url(),
            "http://127.0.0.1:9000/openai/v1/chat/completions"
        );
        assert_eq!(
            c.provider("openai").unwrap().base_url,
            "http://127.0.0.1:9001/custom/v1"
        );
    }

    #[test]
    fn bad_values_are_named() {
        let e = config_of(&[("max_body_bytes", "lots")]).unwrap_err();
        assert!(e.message.contains("max_body_bytes"));
        let e = config_of(&[("groq_api_key", "k"), ("groq_base_url", "ftp://x")]).unwrap_err();
        assert!(e.message.contains("groq_base_url"));
        let e = config_of(&[("client_keys", "abc")]).unwrap_err();
        assert!(e.message.contains("client_keys"));
    }

    #[test]
    fn defaults_apply() {
        let c = config_of(&[]).unwrap();
        assert_eq!(c.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        assert_eq!(c.timeouts.first_byte_ms, 60_000);
        assert!(c.providers.is_empty() && c.client_key_digests.is_empty());
    }
}
