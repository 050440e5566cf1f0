//! Compiles `src/catalog.toml` into static Rust data (`$OUT_DIR/catalog_data.rs`), so a request
//! never parses the catalogue, and a malformed entry fails the build with its name.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Catalogue {
    sources: BTreeMap<String, Source>,
    provider: Vec<Provider>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Source {
    url: String,
    as_of: String,
    via: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Provider {
    id: String,
    name: String,
    tier: String,
    wire: String,
    auth: String,
    origin: String,
    api_path: String,
    default_model: String,
    reset: String,
    scope: String,
    quirks: Quirks,
    /// The router's prior for the time to a short answer, in ms (learned online after).
    latency_ms: u32,
    /// The free tier may use prompts for training: a risk for prompts with personal data.
    #[serde(default)]
    trains_on_data: bool,
    #[serde(default)]
    model: Vec<Model>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Quirks {
    stream_options: bool,
    max_tokens: String,
    max_stop: Option<u8>,
    #[serde(default)]
    drop: Vec<String>,
    #[serde(default)]
    rename: BTreeMap<String, String>,
    #[serde(default)]
    prefix_flag: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Model {
    id: String,
    context: u32,
    max_output: u32,
    #[serde(default)]
    caps: Vec<String>,
    price: Option<Price>,
    limits: Option<Limits>,
    scope: Option<String>,
    /// The router's prior quality in 0..1 (editorial; learned online after).
    quality: f32,
    /// Task families it is better than its quality at.
    #[serde(default)]
    strong: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Price {
    input: f64,
    output: f64,
    source: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Limits {
    rpm: Option<u32>,
    rpd: Option<u32>,
    tpm: Option<u32>,
    tpd: Option<u32>,
    source: String,
}

const FAMILIES: &[&str] = &[
    "chat",
    "code",
    "math",
    "extraction",
    "summarisation",
    "translation",
    "creative",
    "reasoning",
    "classification",
    "tool_use",
    "background",
];

const CAPS: &[&str] = &[
    "tools",
    "json_mode",
    "json_schema",
    "vision",
    "reasoning",
    "prefill",
];

fn main() {
    let path = "src/catalog.toml";
    println!("cargo:rerun-if-changed={path}");
    println!("cargo:rerun-if-changed=build.rs");
    let text = std::fs::read_to_string(path).expect("read src/catalog.toml");
    let cat: Catalogue = toml::from_str(&text).unwrap_or_else(|e| panic!("src/catalog.toml: {e}"));
    let code = generate(&cat).unwrap_or_else(|e| panic!("src/catalog.toml: {e}"));
    let out = std::path::Path::new(&std::env::var("OUT_DIR").unwrap()).join("catalog_data.rs");
    std::fs::write(out, code).unwrap();
}

fn generate(cat: &Catalogue) -> Result<String, String> {
    let mut s = String::from("/// Every provider, in the order `auto` tries them.\n");
    s.push_str("pub static PROVIDERS: &[Provider] = &[\n");
    let mut ids = Vec::new();
    for p in &cat.provider {
        let at = |what: &str| format!("provider `{}`: {what}", p.id);
        if ids.contains(&p.id) {
            return Err(at("duplicate id"));
        }
        ids.push(p.id.clone());
        if p.id.is_empty()
            || !p
                .id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(at(
                "id must be lower-case letters and digits (it prefixes variables)",
            ));
        }
        if p.origin.ends_with('/') || !p.api_path.starts_with('/') || p.api_path.ends_with('/') {
            return Err(at("origin without trailing slash, api_path as /path"));
        }
        if !p.default_model.is_empty() && !p.model.iter().any(|m| m.id == p.default_model) {
            return Err(at("default_model is not listed"));
        }
        let tier = variant(&p.tier, &[("free", "Free"), ("paid", "Paid")]).ok_or(at("tier"))?;
        let wire = variant(
            &p.wire,
            &[
                ("openai", "OpenAi"),
                ("anthropic", "Anthropic"),
                ("gemini", "Gemini"),
            ],
        )
        .ok_or(at("wire"))?;
        let auth = variant(
            &p.auth,
            &[
                ("bearer", "Bearer"),
                ("x-api-key", "XApiKey"),
                ("x-goog-api-key", "XGoogApiKey"),
            ],
        )
        .ok_or(at("auth"))?;
        let reset = variant(
            &p.reset,
            &[
                ("utc-midnight", "UtcMidnight"),
                ("pacific-midnight", "PacificMidnight"),
            ],
        )
        .ok_or(at("reset"))?;
        let max_tokens = variant(
            &p.quirks.max_tokens,
            &[
                ("any", "Any"),
                ("max_tokens", "MaxTokens"),
                ("max_completion_tokens", "MaxCompletionTokens"),
            ],
        )
        .ok_or(at("quirks.max_tokens"))?;
        let q = &p.quirks;
        writeln!(
            s,
            "    Provider {{ id: {:?}, name: {:?}, tier: Tier::{tier}, wire: Wire::{wire}, \
             auth: Auth::{auth}, default_origin: {:?}, api_path: {:?}, default_model: {:?}, \
             reset: Reset::{reset},\n        quirks: Quirks {{ stream_options: {}, max_tokens: \
             MaxTokensField::{max_tokens}, max_stop: {:?}, drop: &{:?}, rename: &{:?}, \
             prefix_flag: {} }},\n        latency_ms: {}, trains_on_data: {},\n        models: &[",
            p.id,
            p.name,
            p.origin,
            p.api_path,
            p.default_model,
            q.stream_options,
            q.max_stop,
            q.drop,
            q.rename
                .iter()
                .map(|(a, b)| (a.as_str(), b.as_str()))
                .collect::<Vec<_>>(),
            q.prefix_flag,
            p.latency_ms,
            p.trains_on_data,
        )
        .unwrap();
        let mut model_ids = Vec::new();
        for m in &p.model {
            let at = |what: &str| format!("provider `{}`, model `{}`: {what}", p.id, m.id);
            if model_ids.contains(&&m.id) {
                return Err(at("duplicate model"));
            }
            model_ids.push(&m.id);
            if m.context == 0 || m.max_output == 0 {
                return Err(at("context and max_output must be positive"));
            }
            let mut caps = Vec::new();
            for c in &m.caps {
                if !CAPS.contains(&c.as_str()) {
                    return Err(at(&format!("unknown capability `{c}`")));
                }
                caps.push(c.as_str());
            }
            let caps = CAPS
                .iter()
                .map(|c| format!("{c}: {}", caps.contains(c)))
                .collect::<Vec<_>>()
                .join(", ");
            let price = match &m.price {
                Some(pr) => {
                    check_source(cat, &pr.source).map_err(|e| at(&e))?;
                    if !(pr.input >= 0.0 && pr.output >= 0.0) {
                        return Err(at("prices must be non-negative"));
                    }
                    format!(
                        "Some(Price {{ input: {:?}, output: {:?}, source: {:?} }})",
                        pr.input, pr.output, pr.source
                    )
                }
                None => "None".into(),
            };
            if !(0.0..=1.0).contains(&m.quality) {
                return Err(at("quality must be in 0..1"));
            }
            if let Some(f) = m.strong.iter().find(|f| !FAMILIES.contains(&f.as_str())) {
                return Err(at(&format!("unknown task family `{f}` in strong")));
            }
            let scope = scope(m.scope.as_deref().unwrap_or(&p.scope)).ok_or(at("scope"))?;
            let limits = match &m.limits {
                Some(l) => {
                    check_source(cat, &l.source).map_err(|e| at(&e))?;
                    if [l.rpm, l.rpd, l.tpm, l.tpd].iter().all(Option::is_none) {
                        return Err(at("limits without any figure"));
                    }
                    format!(
                        "Limits {{ rpm: {:?}, rpd: {:?}, tpm: {:?}, tpd: {:?}, scope: {scope}, \
                         source: Some({:?}) }}",
                        l.rpm, l.rpd, l.tpm, l.tpd, l.source
                    )
                }
                None => format!(
                    "Limits {{ rpm: None, rpd: None, tpm: None, tpd: None, scope: {scope}, \
                     source: None }}"
                ),
            };
            writeln!(
                s,
                "            Model {{ id: {:?}, info: ModelInfo {{ context_window: {}, \
                 max_output: {}, price: {price}, caps: Caps {{ {caps} }}, limits: {limits}, \
                 quality: {:?}, strong: &{:?} }} }},",
                m.id, m.context, m.max_output, m.quality, m.strong
            )
            .unwrap();
        }
        s.push_str("        ] },\n");
    }
    s.push_str("];\n\n/// Where each figure came from: (key, url, as of).\n");
    s.push_str("pub static SOURCES: &[(&str, &str, &str)] = &[\n");
    for (k, v) in &cat.sources {
        writeln!(s, "    ({k:?}, {:?}, {:?}),", v.url, v.as_of).unwrap();
    }
    s.push_str("];\n");
    Ok(s)
}

fn variant(value: &str, table: &[(&str, &'static str)]) -> Option<&'static str> {
    table.iter().find(|(k, _)| *k == value).map(|(_, v)| *v)
}

fn scope(value: &str) -> Option<String> {
    match value {
        "model" => Some("Scope::Model".into()),
        "key" => Some("Scope::Key".into()),
        v => v
            .strip_prefix("pool:")
            .filter(|n| !n.is_empty())
            .map(|n| format!("Scope::Pool({n:?})")),
    }
}

fn check_source(cat: &Catalogue, key: &str) -> Result<(), String> {
    if cat.sources.contains_key(key) {
        Ok(())
    } else {
        Err(format!("source `{key}` is not in [sources]"))
    }
}
