//! Per-provider counters (requests, errors, tokens), kept as atomic increments in the store so
//! concurrent instances never lose a count.

use crate::catalog::PROVIDERS;
use crate::kv::{decode_counter, keys};
use crate::wire::openai::Usage;
use serde_json::{json, Map, Value};

pub const FIELDS: [&str; 4] = ["requests", "errors", "prompt_tokens", "completion_tokens"];

/// What one upstream attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome<'a> {
    pub provider: &'a str,
    pub ok: bool,
    pub usage: Option<Usage>,
}

impl Outcome<'_> {
    /// The counter updates this outcome makes; zero deltas are left out (no needless writes).
    pub fn increments(&self) -> Vec<(String, i64)> {
        let usage = self.usage.unwrap_or_default();
        let deltas = [
            ("requests", 1),
            ("errors", i64::from(!self.ok)),
            ("prompt_tokens", usage.prompt_tokens as i64),
            ("completion_tokens", usage.completion_tokens as i64),
        ];
        deltas
            .into_iter()
            .filter(|(_, d)| *d != 0)
            .map(|(f, d)| (keys::stat(self.provider, f), d))
            .collect()
    }
}

/// Every stats key, provider-major, in [`FIELDS`] order: one batched read serves the report.
pub fn all_keys() -> Vec<String> {
    PROVIDERS
        .iter()
        .flat_map(|p| FIELDS.iter().map(move |f| keys::stat(p.id, f)))
        .collect()
}

/// The `/v1/freerelay/stats` body from the values of [`all_keys`]; providers never used are
/// left out.
pub fn report(values: &[Option<Vec<u8>>]) -> Value {
    let mut providers = Map::new();
    for (p, chunk) in PROVIDERS.iter().zip(values.chunks(FIELDS.len())) {
        if chunk.iter().all(Option::is_none) {
            continue;
        }
        let mut fields = Map::new();
        for (f, v) in FIELDS.iter().zip(chunk) {
            let n = v.as_deref().and_then(decode_counter).unwrap_or(0);
            fields.insert((*f).into(), json!(n));
        }
        providers.insert(p.id.into(), Value::Object(fields));
    }
    json!({ "object": "freerelay.stats", "providers": providers })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{Kv, MemKv};

    #[test]
    fn outcomes_accumulate_into_the_report() {
        let kv = MemKv::default();
        let outcomes = [
            Outcome {
                provider: "groq",
                ok: true,
                usage: Some(Usage {
                    prompt_tokens: 3,
                    completion_tokens: 4,
                }),
            },
            Outcome {
                provider: "groq",
                ok: false,
                usage: None,
            },
        ];
        for o in outcomes {
            for (k, d) in o.increments() {
                kv.increment(&k, d).unwrap();
            }
        }
        let report = report(&kv.get_many(&all_keys()).unwrap());
        assert_eq!(
            report["providers"]["groq"],
            json!({"requests": 2, "errors": 1, "prompt_tokens": 3, "completion_tokens": 4})
        );
        assert!(report["providers"].get("mistral").is_none());
    }

    #[test]
    fn a_clean_request_without_usage_writes_one_key() {
        let o = Outcome {
            provider: "groq",
            ok: true,
            usage: None,
        };
        assert_eq!(o.increments(), vec![("stats:v1:groq:requests".into(), 1)]);
    }
}
