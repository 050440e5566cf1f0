//! Per-provider counters (requests, errors, tokens, clients gone) and the gateway's own (requests
//! refused locally), kept as atomic increments in the store so concurrent instances never lose a
//! count. Each is decided by a function here and written by the component when it happens.

use crate::catalog::PROVIDERS;
use crate::config::Config;
use crate::cooldown::Cooldown;
use crate::kv::{decode_counter, keys, KvOp};
use crate::wire::openai::Usage;
use serde_json::{json, Map, Value};

pub const FIELDS: [&str; 5] = [
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "client_gone",
];

/// Counters of requests that reached no provider.
pub const GATEWAY: &str = "gateway";
pub const GATEWAY_FIELDS: [&str; 1] = ["refused"];

fn add(scope: &str, field: &str, delta: i64) -> KvOp {
    KvOp::Increment {
        key: keys::stat(scope, field),
        delta,
    }
}

/// An upstream attempt starts: counted before it is sent, so it is never lost.
pub fn attempt_started(provider: &str) -> KvOp {
    add(provider, "requests", 1)
}

/// An attempt failed (status, transport, broken answer or stream).
pub fn attempt_failed(provider: &str) -> KvOp {
    add(provider, "errors", 1)
}

/// The client left before its answer was complete.
pub fn client_gone(provider: &str) -> KvOp {
    add(provider, "client_gone", 1)
}

/// Token counts, when the usage is known; zero counts are not written.
pub fn usage(provider: &str, usage: Usage) -> Vec<KvOp> {
    [
        ("prompt_tokens", usage.prompt_tokens),
        ("completion_tokens", usage.completion_tokens),
    ]
    .into_iter()
    .filter(|(_, n)| *n > 0)
    .map(|(f, n)| add(provider, f, i64::try_from(n).unwrap_or(i64::MAX)))
    .collect()
}

/// Every candidate was cooling down: refused without an upstream.
pub fn refused() -> KvOp {
    add(GATEWAY, "refused", 1)
}

/// Every stats key, provider-major, in [`FIELDS`] order: one batched read serves the report.
/// The gateway's own counters follow.
pub fn all_keys() -> Vec<String> {
    PROVIDERS
        .iter()
        .flat_map(|p| FIELDS.iter().map(move |f| keys::stat(p.id, f)))
        .chain(GATEWAY_FIELDS.iter().map(|f| keys::stat(GATEWAY, f)))
        .collect()
}

/// The `/v1/freerelay/stats` body from the values of [`all_keys`]; providers never used are
/// left out.
pub fn report(values: &[Option<Vec<u8>>]) -> Value {
    let n = |v: Option<&Option<Vec<u8>>>| {
        v.and_then(|v| v.as_deref())
            .and_then(decode_counter)
            .unwrap_or(0)
    };
    let split = PROVIDERS.len() * FIELDS.len();
    let (per_provider, own) = values.split_at(split.min(values.len()));
    let mut gateway = Map::new();
    for (i, f) in GATEWAY_FIELDS.iter().enumerate() {
        gateway.insert((*f).into(), json!(n(own.get(i))));
    }
    let mut providers = Map::new();
    for (p, chunk) in PROVIDERS.iter().zip(per_provider.chunks(FIELDS.len())) {
        if chunk.iter().all(Option::is_none) {
            continue;
        }
        let mut fields = Map::new();
        for (f, v) in FIELDS.iter().zip(chunk) {
            fields.insert((*f).into(), json!(n(Some(v))));
        }
        providers.insert(p.id.into(), Value::Object(fields));
    }
    json!({ "object": "freerelay.stats", "providers": providers, "gateway": gateway })
}

/// The cache's counters (`stats:v1:cache:<field>`, incremented by the ops `cache` returns).
pub const CACHE: &str = "cache";
pub const CACHE_FIELDS: [&str; 5] = [
    "hits_exact",
    "hits_semantic",
    "misses",
    "stores",
    "too_large",
];

pub fn cache_keys() -> Vec<String> {
    CACHE_FIELDS.iter().map(|f| keys::stat(CACHE, f)).collect()
}

/// `{hits_exact, hits_semantic, misses, stores, too_large}` from the values of [`cache_keys`].
pub fn cache_report(values: &[Option<Vec<u8>>]) -> Value {
    let mut o = Map::new();
    for (i, f) in CACHE_FIELDS.iter().enumerate() {
        let n = values
            .get(i)
            .and_then(|v| v.as_deref())
            .and_then(decode_counter)
            .unwrap_or(0);
        o.insert((*f).into(), json!(n));
    }
    Value::Object(o)
}

/// Each configured key's own cool-down key, provider by provider, for [`keys_report`].
pub fn key_state_keys(config: &Config) -> Vec<String> {
    config
        .providers
        .iter()
        .flat_map(|c| {
            c.keys
                .iter()
                .map(move |k| keys::cooldown(c.provider.id, &k.id, None))
        })
        .collect()
}

/// Which keys can be used right now (from the values of [`key_state_keys`]): a key set aside
/// after its provider refused it is reported here, by fingerprint, until it comes back.
pub fn keys_report(config: &Config, values: &[Option<Vec<u8>>], now_ms: u64) -> Value {
    let mut values = values.iter();
    let mut out = Map::new();
    for c in &config.providers {
        let list: Vec<Value> = c
            .keys
            .iter()
            .map(|k| {
                let cd = values
                    .next()
                    .and_then(|v| v.as_deref())
                    .and_then(Cooldown::decode)
                    .filter(|cd| cd.is_active(now_ms));
                match cd {
                    None => json!({"key": k.id, "state": "ok"}),
                    Some(cd) => json!({
                        "key": k.id,
                        "state": if cd.status == 429 { "rate_limited" } else { "set_aside" },
                        "status": cd.status,
                        "until_ms": cd.until_ms,
                    }),
                }
            })
            .collect();
        out.insert(c.provider.id.into(), Value::Array(list));
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{apply, Kv, MemKv};

    #[test]
    fn operations_accumulate_into_the_report() {
        let kv = MemKv::default();
        let mut ops = vec![
            attempt_started("groq"),
            attempt_started("groq"),
            attempt_failed("groq"),
            client_gone("groq"),
            refused(),
        ];
        ops.extend(usage(
            "groq",
            Usage {
                prompt_tokens: 3,
                completion_tokens: 4,
            },
        ));
        for op in &ops {
            apply(&kv, op).unwrap();
        }
        let report = report(&kv.get_many(&all_keys()).unwrap());
        assert_eq!(
            report["providers"]["groq"],
            json!({"requests": 2, "errors": 1, "prompt_tokens": 3, "completion_tokens": 4, "client_gone": 1})
        );
        assert!(report["providers"].get("mistral").is_none());
        assert_eq!(report["gateway"]["refused"], 1);
    }

    #[test]
    fn zero_usage_writes_no_key() {
        assert!(usage("groq", Usage::default()).is_empty());
    }

    #[test]
    fn refused_keys_are_reported_by_fingerprint_only() {
        let config = crate::config::tests::config_of(&[("groq_api_key", "sk-one,sk-two")]).unwrap();
        let kv = MemKv::default();
        let two = crate::config::ApiKey::new("sk-two").id;
        let set_aside = Cooldown::new(0, 3_600_000, 401);
        apply(&kv, &set_aside.op(keys::cooldown("groq", &two, None))).unwrap();
        let r = keys_report(
            &config,
            &kv.get_many(&key_state_keys(&config)).unwrap(),
            1_000,
        );
        assert_eq!(r["groq"][0]["state"], "ok");
        assert_eq!(r["groq"][1]["state"], "set_aside");
        assert_eq!(r["groq"][1]["key"], two);
        assert!(!r.to_string().contains("sk-"));
        let later = keys_report(
            &config,
            &kv.get_many(&key_state_keys(&config)).unwrap(),
            4_000_000,
        );
        assert_eq!(later["groq"][1]["state"], "ok");
    }
}
