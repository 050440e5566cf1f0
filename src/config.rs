//! Gateway configuration, read from Spin variables once per request and validated in one place so
//! that a bad setting is reported by name instead of surfacing as an odd upstream failure.

use crate::adapter::Target;
use crate::catalog::{ModelInfo, Price, Provider, Tier, CUSTOM, PROVIDERS};

/// Variable names that are not per provider.
pub const CLIENT_KEYS: &str = "client_keys";
pub const MAX_BODY_BYTES: &str = "max_body_bytes";
pub const CONNECT_TIMEOUT_MS: &str = "upstream_connect_timeout_ms";
pub const FIRST_BYTE_TIMEOUT_MS: &str = "upstream_first_byte_timeout_ms";
pub const BETWEEN_BYTES_TIMEOUT_MS: &str = "upstream_between_bytes_timeout_ms";
pub const TOTAL_TIMEOUT_MS: &str = "upstream_total_timeout_ms";
pub const LOG_EVENTS: &str = "log_events";
pub const MODEL_GROUPS: &str = "model_groups";
pub const MAX_ATTEMPTS: &str = "max_attempts";
pub const FIRST_TOKEN_TIMEOUT_MS: &str = "first_token_timeout_ms";
pub const SHORT_RETRY_AFTER_MS: &str = "short_retry_after_ms";
pub const BACKGROUND_RESERVE: &str = "background_reserve";

/// Every variable that is not per provider (the manifest test checks each is declared).
pub const GLOBAL_VARIABLES: &[&str] = &[
    CLIENT_KEYS,
    MAX_BODY_BYTES,
    CONNECT_TIMEOUT_MS,
    FIRST_BYTE_TIMEOUT_MS,
    BETWEEN_BYTES_TIMEOUT_MS,
    TOTAL_TIMEOUT_MS,
    LOG_EVENTS,
    MODEL_GROUPS,
    MAX_ATTEMPTS,
    FIRST_TOKEN_TIMEOUT_MS,
    SHORT_RETRY_AFTER_MS,
    BACKGROUND_RESERVE,
];

/// Which requests leave their events on stderr (`log_events`). Every request's events are
/// recorded; this decides which are written, so a busy deployment can keep its log proportional
/// to its failures (under `spin up`, Spin appends component output to `.spin/logs/` unrotated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogEvents {
    /// Every request (the default).
    All,
    /// Only requests that met a failure (any non-2xx answer, a failed attempt or state write, an
    /// interrupted stream, a client gone) — with their whole trail, start included.
    Failures,
    Off,
}
/// Per-provider variables, as `<id>_<suffix>`.
pub const PROVIDER_VARIABLES: &[&str] =
    &["api_key", "base_url", "tier", "rpm", "rpd", "tpm", "tpd"];

/// Variables only the custom provider has, as `custom_<suffix>`.
pub const CUSTOM_VARIABLES: &[&str] = &[
    "models",
    "api_path",
    "price_input",
    "price_output",
    "context_window",
];

/// The request body limit when `max_body_bytes` is unset.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 4 * 1024 * 1024;

/// Upstream timeouts, in milliseconds. The first three are wasi:http's request options.
/// - `connect_ms`: TCP/TLS connect, per attempt.
/// - `first_byte_ms`: streams only — from sending to the response head; past it the attempt
///   fails and, under a virtual model, the next candidate is tried.
/// - `between_bytes_ms`: silence allowed between two pieces of a body (streams and JSON).
/// - `total_ms`: non-streaming only — the whole answer, head and body, per attempt; an upstream
///   sends a JSON answer's head only once it has generated it, so this, not `first_byte_ms`,
///   bounds long answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect_ms: u64,
    pub first_byte_ms: u64,
    pub between_bytes_ms: u64,
    pub total_ms: u64,
}

/// A deployment setting that cannot be used. The detail names the variable and is for the
/// operator's log only: clients get [`ApiError::misconfigured`], which carries nothing of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub detail: String,
}

impl ConfigError {
    fn new(detail: String) -> Self {
        Self { detail }
    }
}

/// The `log_events` setting, readable on its own: the component applies it before anything
/// else is known about the deployment.
pub fn log_events(get: impl Fn(&str) -> Option<String>) -> Result<LogEvents, ConfigError> {
    match get(LOG_EVENTS).unwrap_or_default().trim() {
        "" | "all" => Ok(LogEvents::All),
        "failures" => Ok(LogEvents::Failures),
        "off" => Ok(LogEvents::Off),
        other => Err(ConfigError::new(format!(
            "variable `{LOG_EVENTS}` must be `all`, `failures` or `off`, got {other:?}"
        ))),
    }
}

/// The accepted client-key digests, read apart from the rest of the configuration so that
/// authentication happens before any other setting is even looked at.
pub fn client_keys(get: impl Fn(&str) -> Option<String>) -> Result<Vec<String>, ConfigError> {
    let digests = get(CLIENT_KEYS)
        .unwrap_or_default()
        .split(',')
        .map(|d| d.trim().to_ascii_lowercase())
        .filter(|d| !d.is_empty())
        .collect::<Vec<_>>();
    match digests
        .iter()
        .position(|d| d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        Some(i) => Err(ConfigError::new(format!(
            "`client_keys` entry #{} is not a SHA-256 hex digest (use `freerelay keygen`)",
            i + 1
        ))),
        None => Ok(digests),
    }
}

/// One provider key. Its `Debug` shows only the fingerprint, so a key never reaches a log.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    secret: String,
    /// A fingerprint (`k` + 10 hex digits of the key's SHA-256): names the key in state, events
    /// and reports without revealing it.
    pub id: String,
}

impl ApiKey {
    pub fn new(secret: &str) -> Self {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(secret.as_bytes());
        let hex: String = digest[..5].iter().map(|b| format!("{b:02x}")).collect();
        Self {
            secret: secret.to_owned(),
            id: format!("k{hex}"),
        }
    }

    /// The key itself, for the request's credentials only.
    pub fn secret(&self) -> &str {
        &self.secret
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKey({})", self.id)
    }
}

/// A deployment's own limits for a provider (`<id>_rpm`, …); `None`: the catalogue's figure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitOverrides {
    pub rpm: Option<u32>,
    pub rpd: Option<u32>,
    pub tpm: Option<u32>,
    pub tpd: Option<u32>,
}

/// A provider the deployment can use: its endpoint, keys, tier and overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct Configured {
    pub provider: &'static Provider,
    /// Base of the API, without trailing slash (origin + API path).
    pub base_url: String,
    /// At least one; a keyless custom endpoint has one empty key.
    pub keys: Vec<ApiKey>,
    /// The catalogue's tier unless `<id>_tier` says otherwise.
    pub tier: Tier,
    pub limits: LimitOverrides,
    /// The custom provider's declared models (empty for catalogued providers).
    pub custom_models: Vec<String>,
    /// The custom provider's price and context window.
    pub custom_info: Option<ModelInfo>,
}

impl Configured {
    /// The model `auto` picks here.
    pub fn default_model(&self) -> &str {
        self.custom_models
            .first()
            .map_or(self.provider.default_model, String::as_str)
    }

    /// The models offered by `/v1/models`.
    pub fn model_ids(&self) -> Vec<&str> {
        if self.custom_info.is_some() {
            self.custom_models.iter().map(String::as_str).collect()
        } else {
            self.provider.models.iter().map(|m| m.id).collect()
        }
    }

    /// What is known of `model` here, with the deployment's limits applied.
    pub fn model_info(&self, model: &str) -> ModelInfo {
        let mut info = self
            .custom_info
            .unwrap_or_else(|| self.provider.model_info(model));
        let o = self.limits;
        let l = &mut info.limits;
        l.rpm = o.rpm.or(l.rpm);
        l.rpd = o.rpd.or(l.rpd);
        l.tpm = o.tpm.or(l.tpm);
        l.tpd = o.tpd.or(l.tpd);
        info
    }

    /// What tokens of `model` cost the deployment: nothing on a free tier.
    pub fn price(&self, model: &str) -> Option<Price> {
        match self.tier {
            Tier::Free => Some(Price {
                input: 0.0,
                output: 0.0,
                source: "free tier",
            }),
            Tier::Paid => self.model_info(model).price,
        }
    }

    /// Where an attempt at `model` goes.
    pub fn target<'a>(&'a self, model: &'a str) -> Target<'a> {
        Target {
            provider: self.provider,
            base_url: &self.base_url,
            model,
            info: self.model_info(model),
        }
    }

    /// The key with this fingerprint.
    pub fn key(&self, id: &str) -> Option<&ApiKey> {
        self.keys.iter().find(|k| k.id == id)
    }
}

/// Everything one request needs to know about the deployment (client keys apart: see
/// [`client_keys`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub max_body_bytes: u64,
    pub timeouts: Timeouts,
    /// Configured providers, in catalogue order.
    pub providers: Vec<Configured>,
    pub log_events: LogEvents,
    /// Named model groups (`model_groups`): a client names the group as its model.
    pub model_groups: Vec<(String, Vec<String>)>,
    /// Upstream attempts one request may make, retries included (`max_attempts`).
    pub max_attempts: u32,
    /// Streams: how long the first event may take once the head arrived, before the 200 is
    /// committed; past it the next candidate is tried (`first_token_timeout_ms`).
    pub first_token_timeout_ms: u64,
    /// A 429 asking for at most this wait, with nothing else left to try, is waited out and
    /// retried (`short_retry_after_ms`).
    pub short_retry_after_ms: u64,
    /// The fraction of every quota window kept from background requests
    /// (`background_reserve`, 0.0 to 0.9, default 0.25): they are admitted only while each
    /// counter stays within `(1 − reserve) × limit` ([`crate::quota::Share`]).
    pub background_reserve: f64,
    /// Breakers, AIMD, budgets and the cache ([`crate::edge::Settings`]).
    pub edge: crate::edge::Settings,
}

/// Most members a model group may have.
pub const MAX_GROUP_MEMBERS: usize = 16;

/// `model_groups`: `name=provider/model,provider/model;name2=…`.
fn model_groups(raw: &str) -> Result<Vec<(String, Vec<String>)>, ConfigError> {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for (i, part) in raw.split(';').map(str::trim).enumerate() {
        if part.is_empty() {
            continue;
        }
        let bad = |why: &str| {
            ConfigError::new(format!(
                "variable `{MODEL_GROUPS}`, group #{}: {why}",
                i + 1
            ))
        };
        let (name, members) = part
            .split_once('=')
            .ok_or_else(|| bad("expected name=members"))?;
        let name = name.trim();
        if name.is_empty()
            || name.contains('/')
            || !name.bytes().all(|b| b.is_ascii_graphic())
            || crate::route::VIRTUAL_MODELS.iter().any(|(v, _)| *v == name)
        {
            return Err(bad(&format!(
                "the name {name:?} must be printable ASCII without `/`, and not auto, free or paid"
            )));
        }
        if groups.iter().any(|(n, _)| n == name) {
            return Err(bad(&format!("the name {name:?} is used twice")));
        }
        let members: Vec<String> = members
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(str::to_owned)
            .collect();
        if members.is_empty() || members.len() > MAX_GROUP_MEMBERS {
            return Err(bad(&format!(
                "a group needs 1 to {MAX_GROUP_MEMBERS} comma-separated models"
            )));
        }
        if let Some(m) = members
            .iter()
            .find(|m| !m.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(bad(&format!("{m:?} is not a model name")));
        }
        groups.push((name.to_owned(), members));
    }
    Ok(groups)
}

impl Config {
    /// Builds the configuration from a variable lookup (Spin's `variables::get` in components,
    /// a map in tests). A missing variable counts as empty.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let var = |name: &str| get(name).map(|v| v.trim().to_owned()).unwrap_or_default();
        let number = |name: &str, default: u64| -> Result<u64, ConfigError> {
            let raw = var(name);
            if raw.is_empty() {
                return Ok(default);
            }
            match raw.parse::<u64>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(ConfigError::new(format!(
                    "variable `{name}` must be a positive whole number, got {raw:?}"
                ))),
            }
        };
        let mut providers = Vec::new();
        for p in PROVIDERS {
            if let Some(c) = configure(p, &var)? {
                providers.push(c);
            }
        }
        Ok(Self {
            max_body_bytes: number(MAX_BODY_BYTES, DEFAULT_MAX_BODY_BYTES)?,
            timeouts: Timeouts {
                connect_ms: number(CONNECT_TIMEOUT_MS, 5_000)?,
                first_byte_ms: number(FIRST_BYTE_TIMEOUT_MS, 60_000)?,
                between_bytes_ms: number(BETWEEN_BYTES_TIMEOUT_MS, 30_000)?,
                total_ms: number(TOTAL_TIMEOUT_MS, 300_000)?,
            },
            providers,
            log_events: log_events(&get)?,
            model_groups: model_groups(&var(MODEL_GROUPS))?,
            max_attempts: u32::try_from(number(MAX_ATTEMPTS, 6)?.min(64)).unwrap_or(64),
            first_token_timeout_ms: number(FIRST_TOKEN_TIMEOUT_MS, 10_000)?,
            short_retry_after_ms: match var(SHORT_RETRY_AFTER_MS).as_str() {
                "" => 5_000,
                raw => raw.parse::<u64>().map_err(|_| {
                    ConfigError::new(format!(
                        "variable `{SHORT_RETRY_AFTER_MS}` must be a whole number of \
                         milliseconds, got {raw:?}"
                    ))
                })?,
            },
            background_reserve: background_reserve(&var(BACKGROUND_RESERVE))?,
            edge: crate::edge::Settings::from_vars(&get).map_err(ConfigError::new)?,
        })
    }

    /// How much of each quota window a request of `class` may use ([`crate::quota::Share`]).
    pub fn share(&self, class: crate::quota::Class) -> crate::quota::Share {
        crate::quota::Share::new(class, self.background_reserve)
    }

    /// The configured provider with this id.
    pub fn provider(&self, id: &str) -> Option<&Configured> {
        self.providers.iter().find(|c| c.provider.id == id)
    }

    /// The members of the model group `name`.
    pub fn group(&self, name: &str) -> Option<&[String]> {
        self.model_groups
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, m)| m.as_slice())
    }
}

/// `background_reserve`: a plain decimal from 0 to 0.9 (empty: the default, 0.25). Strict: a
/// percentage, a negative or a reserve that would leave background requests nothing is refused
/// by name rather than read as something else.
fn background_reserve(raw: &str) -> Result<f64, ConfigError> {
    use crate::quota::{DEFAULT_BACKGROUND_RESERVE, MAX_BACKGROUND_RESERVE};
    if raw.is_empty() {
        return Ok(DEFAULT_BACKGROUND_RESERVE);
    }
    let plain = raw.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    match raw.parse::<f64>() {
        Ok(r) if plain && (0.0..=MAX_BACKGROUND_RESERVE).contains(&r) => Ok(r),
        _ => Err(ConfigError::new(format!(
            "variable `{BACKGROUND_RESERVE}` must be a fraction from 0 to \
             {MAX_BACKGROUND_RESERVE} (the part of every quota kept from background requests), \
             got {raw:?}"
        ))),
    }
}

/// One provider's configuration, or `None` when it is not turned on (no key; for the custom
/// provider, no models).
fn configure(
    p: &'static Provider,
    var: &impl Fn(&str) -> String,
) -> Result<Option<Configured>, ConfigError> {
    let id = p.id;
    let custom = id == CUSTOM;
    let mut keys: Vec<ApiKey> = Vec::new();
    for k in var(&format!("{id}_api_key")).split(',').map(str::trim) {
        if !k.is_empty() && !keys.iter().any(|have| have.secret == k) {
            keys.push(ApiKey::new(k));
        }
    }
    let custom_models: Vec<String> = if custom {
        let mut models: Vec<String> = Vec::new();
        for m in var("custom_models").split(',').map(str::trim) {
            if !m.is_empty() && !models.iter().any(|have| have == m) {
                models.push(m.to_owned());
            }
        }
        if models.is_empty() {
            return Ok(None);
        }
        if keys.is_empty() {
            // A local endpoint (Ollama, LM Studio) usually takes no key.
            keys.push(ApiKey::new(""));
        }
        models
    } else {
        if keys.is_empty() {
            return Ok(None);
        }
        Vec::new()
    };
    let tier = match var(&format!("{id}_tier")).as_str() {
        "" => p.tier,
        "free" => Tier::Free,
        "paid" => Tier::Paid,
        other => {
            return Err(ConfigError::new(format!(
                "variable `{id}_tier` must be `free` or `paid`, got {other:?}"
            )))
        }
    };
    let limit = |suffix: &str| -> Result<Option<u32>, ConfigError> {
        let name = format!("{id}_{suffix}");
        let raw = var(&name);
        if raw.is_empty() {
            return Ok(None);
        }
        match raw.parse::<u32>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(ConfigError::new(format!(
                "variable `{name}` must be a positive whole number, or empty for the \
                 documented limit; got {raw:?}"
            ))),
        }
    };
    let limits = LimitOverrides {
        rpm: limit("rpm")?,
        rpd: limit("rpd")?,
        tpm: limit("tpm")?,
        tpd: limit("tpd")?,
    };
    let api_path = if custom {
        let path = var("custom_api_path");
        let path = if path.is_empty() {
            p.api_path.to_owned()
        } else {
            path
        };
        if !path.starts_with('/') {
            return Err(ConfigError::new(format!(
                "variable `custom_api_path` must start with `/`, got {path:?}"
            )));
        }
        path.trim_end_matches('/').to_owned()
    } else {
        p.api_path.to_owned()
    };
    let custom_info = if custom {
        let price_of = |name: &str| -> Result<Option<f64>, ConfigError> {
            let raw = var(name);
            if raw.is_empty() {
                return Ok(None);
            }
            match raw.parse::<f64>() {
                Ok(x) if x.is_finite() && x >= 0.0 => Ok(Some(x)),
                _ => Err(ConfigError::new(format!(
                    "variable `{name}` must be a price in USD per million tokens, got {raw:?}"
                ))),
            }
        };
        let (input, output) = (
            price_of("custom_price_input")?,
            price_of("custom_price_output")?,
        );
        let mut info = p.unlisted();
        info.price = Some(Price {
            input: input.unwrap_or(0.0),
            output: output.unwrap_or(0.0),
            source: "custom_price_input/custom_price_output",
        });
        let raw = var("custom_context_window");
        if !raw.is_empty() {
            info.context_window = match raw.parse::<u32>() {
                Ok(n) if n > 0 => n,
                _ => {
                    return Err(ConfigError::new(format!(
                        "variable `custom_context_window` must be a positive whole number, got \
                         {raw:?}"
                    )))
                }
            };
        }
        Some(info)
    } else {
        None
    };
    let base_url = resolve_base_url(p, &var(&format!("{id}_base_url")), &api_path)?;
    Ok(Some(Configured {
        provider: p,
        base_url,
        keys,
        tier,
        limits,
        custom_models,
        custom_info,
    }))
}

/// `<id>_base_url` is an origin (Spin's allowed hosts reject paths); the catalogue adds the API
/// path. A URL that does carry a path is taken as the full base, for runners that allow it.
fn resolve_base_url(p: &Provider, configured: &str, api_path: &str) -> Result<String, ConfigError> {
    let raw = if configured.is_empty() {
        p.default_origin
    } else {
        configured
    };
    if raw.is_empty() {
        return Err(ConfigError::new(format!(
            "variable `{}_base_url` must be set",
            p.id
        )));
    }
    let url = url::Url::parse(raw).map_err(|e| {
        ConfigError::new(format!("`{}_base_url` is not a URL ({e}): {raw:?}", p.id))
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(ConfigError::new(format!(
            "`{}_base_url` must be an http(s) origin, got {raw:?}",
            p.id
        )));
    }
    let trimmed = raw.trim_end_matches('/');
    Ok(if url.path() == "/" || url.path().is_empty() {
        format!("{trimmed}{api_path}")
    } else {
        trimmed.to_owned()
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A variable lookup over `pairs` (absent names: `None`), as Spin's would be.
    pub(crate) fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    pub(crate) fn config_of(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(vars(pairs))
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
            c.provider("groq").unwrap().base_url,
            "http://127.0.0.1:9000/openai/v1"
        );
        assert_eq!(
            c.provider("openai").unwrap().base_url,
            "http://127.0.0.1:9001/custom/v1"
        );
    }

    #[test]
    fn bad_values_are_named_for_the_log_only() {
        let e = config_of(&[("max_body_bytes", "lots")]).unwrap_err();
        assert!(e.detail.contains("max_body_bytes"));
        let e = config_of(&[("upstream_total_timeout_ms", "0")]).unwrap_err();
        assert!(e.detail.contains("upstream_total_timeout_ms"));
        let e = config_of(&[("groq_api_key", "k"), ("groq_base_url", "ftp://x")]).unwrap_err();
        assert!(e.detail.contains("groq_base_url"));
        let secret = "0123456789abcdef-not-a-digest";
        let e =
            client_keys(|k| (k == CLIENT_KEYS).then(|| format!("{}, {secret}", "a".repeat(64))))
                .unwrap_err();
        assert!(e.detail.contains("client_keys") && e.detail.contains("#2"));
        assert!(
            !e.detail.contains(secret),
            "a key's value never reaches a log"
        );
    }

    #[test]
    fn client_keys_are_normalised() {
        let d = "AB".repeat(32);
        let keys = client_keys(|_| Some(format!(" {d} ,,"))).unwrap();
        assert_eq!(keys, vec!["ab".repeat(32)]);
        assert!(client_keys(|_| None).unwrap().is_empty());
    }

    #[test]
    fn defaults_apply() {
        let c = config_of(&[]).unwrap();
        assert_eq!(c.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        assert_eq!(c.timeouts.first_byte_ms, 60_000);
        assert_eq!(c.timeouts.total_ms, 300_000);
        assert_eq!(c.log_events, LogEvents::All);
        assert_eq!(
            config_of(&[("log_events", "failures")]).unwrap().log_events,
            LogEvents::Failures
        );
        assert!(config_of(&[("log_events", "verbose")])
            .unwrap_err()
            .detail
            .contains("log_events"));
        assert!(c.providers.is_empty());
    }

    #[test]
    fn key_pools_overrides_and_the_custom_provider() {
        let c = config_of(&[
            ("groq_api_key", " gsk-a , gsk-b,,gsk-a "),
            ("groq_rpd", "2000"),
            ("groq_tpm", ""),
            ("gemini_api_key", "g"),
            ("gemini_tier", "paid"),
        ])
        .unwrap();
        let groq = c.provider("groq").unwrap();
        assert_eq!(groq.keys.len(), 2, "split, trimmed, deduplicated");
        assert_ne!(groq.keys[0].id, groq.keys[1].id);
        assert!(
            !format!("{groq:?}").contains("gsk-a"),
            "Debug shows fingerprints only"
        );
        let info = groq.model_info("llama-3.3-70b-versatile");
        assert_eq!(
            (info.limits.rpd, info.limits.tpm),
            (Some(2000), Some(12_000))
        );
        assert_eq!(
            groq.price("llama-3.3-70b-versatile").unwrap().output,
            0.0,
            "free tier"
        );
        let gemini = c.provider("gemini").unwrap();
        assert_eq!(gemini.tier, Tier::Paid);
        assert_eq!(gemini.price("gemini-2.5-pro").unwrap().output, 10.0);
        assert_eq!(gemini.price("unknown-model"), None);

        for (name, value) in [
            ("groq_tier", "cheap"),
            ("groq_rpm", "-1"),
            ("groq_tpd", "lots"),
        ] {
            let e = config_of(&[("groq_api_key", "k"), (name, value)]).unwrap_err();
            assert!(e.detail.contains(name), "{}", e.detail);
        }
        // The custom provider is on once it has models; its settings are checked too.
        assert!(config_of(&[("custom_base_url", "http://h:1")])
            .unwrap()
            .providers
            .is_empty());
        let c = config_of(&[
            ("custom_models", "a,b"),
            ("custom_base_url", "http://127.0.0.1:8000"),
            ("custom_api_path", "/api/v1/"),
            ("custom_api_key", "sk-local"),
            ("custom_tier", "paid"),
            ("custom_price_input", "0.5"),
            ("custom_price_output", "1.5"),
            ("custom_context_window", "32768"),
        ])
        .unwrap();
        let custom = c.provider("custom").unwrap();
        assert_eq!(custom.base_url, "http://127.0.0.1:8000/api/v1");
        assert_eq!(custom.model_ids(), ["a", "b"]);
        assert_eq!(custom.default_model(), "a");
        assert_eq!(custom.price("b").unwrap().output, 1.5);
        assert_eq!(custom.model_info("b").context_window, 32_768);
        for (name, value) in [
            ("custom_price_input", "free"),
            ("custom_api_path", "v1"),
            ("custom_context_window", "0"),
        ] {
            let e = config_of(&[("custom_models", "a"), (name, value)]).unwrap_err();
            assert!(e.detail.contains(name), "{}", e.detail);
        }
    }

    #[test]
    fn model_groups_and_fallback_settings() {
        let c = config_of(&[(
            "model_groups",
            "fast=groq/llama-3.1-8b-instant, cerebras/gpt-oss-120b ; smart=openai/gpt-4o-mini;",
        )])
        .unwrap();
        assert_eq!(
            c.group("fast").unwrap(),
            ["groq/llama-3.1-8b-instant", "cerebras/gpt-oss-120b"]
        );
        assert_eq!(c.group("smart").unwrap(), ["openai/gpt-4o-mini"]);
        assert!(c.group("slow").is_none());
        assert_eq!((c.max_attempts, c.first_token_timeout_ms), (6, 10_000));
        assert_eq!(c.short_retry_after_ms, 5_000);
        for bad in ["fast", "auto=groq/x", "a/b=groq/x", "x=", "x=a;x=b"] {
            let e = config_of(&[("model_groups", bad)]).unwrap_err();
            assert!(e.detail.contains("model_groups"), "{bad}: {}", e.detail);
        }
        let c = config_of(&[("max_attempts", "3"), ("short_retry_after_ms", "0")]).unwrap();
        assert_eq!((c.max_attempts, c.short_retry_after_ms), (3, 0));
        assert!(config_of(&[("first_token_timeout_ms", "soon")]).is_err());
    }

    #[test]
    fn the_background_reserve_is_a_fraction_read_strictly() {
        use crate::quota::{Class, Share};
        let c = config_of(&[]).unwrap();
        assert_eq!(c.background_reserve, 0.25);
        assert_eq!(
            c.share(Class::Background),
            Share::new(Class::Background, 0.25)
        );
        assert_eq!(c.share(Class::Foreground).cap(100), 100);
        assert_eq!(c.share(Class::Background).cap(100), 75);
        for (raw, want) in [("0", 0.0), ("0.9", 0.9), (" .5 ", 0.5), ("0.10", 0.1)] {
            let c = config_of(&[("background_reserve", raw)]).unwrap();
            assert_eq!(c.background_reserve, want, "{raw}");
        }
        for bad in [
            "0.95", "1", "-0.1", "25%", "1e-1", "NaN", "inf", "quarter", "0.2.5",
        ] {
            let e = config_of(&[("background_reserve", bad)]).unwrap_err();
            assert!(
                e.detail.contains("background_reserve"),
                "{bad}: {}",
                e.detail
            );
        }
    }
}
