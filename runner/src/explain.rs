//! `freerelay explain`: the routing decision for a request body, made offline — the app's
//! variables resolved as `up` resolves them, the router's logic from the core, no store (priors
//! only, nothing spent), nothing sent anywhere.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context, Result};
use freerelay::config::Config;
use freerelay::router::{self, Decision, Facts};
use freerelay::wire::openai::ChatRequest;
use serde_json::{json, Value};

use crate::manifest::Manifest;
use crate::variables::{load_dotenv, process_env_lookup, AppVariables};

/// The variables the router component sees (the gateway's when the app has no router).
pub fn component_variables(manifest_path: &Path) -> Result<HashMap<String, String>> {
    let manifest = Manifest::load(manifest_path)
        .with_context(|| format!("cannot load {}", manifest_path.display()))?;
    let dir = manifest_path.parent().unwrap_or(Path::new("."));
    let dotenv = load_dotenv(&dir.join(".env"))?;
    let variables = AppVariables::resolve(&manifest, &process_env_lookup(dotenv))?;
    let component = ["router", "gateway"]
        .iter()
        .find_map(|id| manifest.components.get(*id))
        .context("the manifest has neither a `router` nor a `gateway` component")?;
    variables.component_values(&component.variables)
}

/// The decision for `body`, as JSON (`profile`, `mode`, `plan`, `candidates`, `policy`).
pub fn decide(
    vars: &HashMap<String, String>,
    body: &[u8],
    mode: &str,
    policy_text: Option<&str>,
    now_ms: u64,
) -> Result<Value> {
    let config = Config::from_vars(|n| vars.get(n).cloned())
        .map_err(|e| anyhow::anyhow!("configuration: {}", e.detail))?;
    let request = match ChatRequest::parse(body) {
        Ok(r) => r,
        Err(e) => bail!("the request is not valid: {}", e.message),
    };
    let facts = Facts {
        mode: mode.to_owned(),
        tenant: "t-explain".into(),
        user: None,
        conversation: None,
        rotation: 0,
        now_ms,
    };
    let decision = match router::explain(&config, &request, &facts, policy_text) {
        Ok(d) => d,
        Err(e) => bail!("no route: {} (HTTP {})", e.message, e.status),
    };
    Ok(as_json(&decision))
}

fn as_json(d: &Decision) -> Value {
    let mut v = d.audit_value();
    v["plan"] = json!(d
        .plan
        .candidates
        .iter()
        .map(|c| json!({"provider": c.provider, "model": c.model, "reason": c.reason}))
        .collect::<Vec<_>>());
    v["hedge"] = json!(d.hedge);
    v["background"] = json!(d.background);
    v
}

/// The decision in words: the profile, the plan with each score's terms, what was left out.
pub fn text(v: &Value) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "profile");
    if let Some(p) = v["profile"].as_object() {
        for (dim, d) in p {
            let value = match &d["value"] {
                Value::String(x) => x.clone(),
                Value::Null => continue,
                other if d.get("value").is_some() => other.to_string(),
                _ => d.to_string(),
            };
            let reasons: Vec<&str> = d["reasons"]
                .as_array()
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if reasons.is_empty() {
                let _ = writeln!(s, "  {dim:<12} {value}");
            } else {
                let _ = writeln!(s, "  {dim:<12} {value}  ({})", reasons.join("; "));
            }
        }
    }
    let _ = writeln!(s, "\nplan (mode {})", v["mode"].as_str().unwrap_or("auto"));
    let mut ranked: Vec<&Value> = v["candidates"]
        .as_array()
        .map(|c| c.iter().filter(|c| c["rank"].is_u64()).collect())
        .unwrap_or_default();
    ranked.sort_by_key(|c| c["rank"].as_u64());
    for c in ranked {
        let sc = &c["score"];
        let f = |k: &str| sc[k].as_f64().unwrap_or(0.0);
        let _ = writeln!(
            s,
            "  {}. {}/{} [{}]  utility {:.5} = p {:.2} × q {:.2} × value ${:.4} − cost ${:.5} \
             − latency ${:.5} − shadow ${:.5} − risk ${:.5} + bonus ${:.5}",
            c["rank"],
            c["provider"].as_str().unwrap_or(""),
            c["model"].as_str().unwrap_or(""),
            c["tier"].as_str().unwrap_or(""),
            f("utility"),
            f("p_success"),
            f("quality"),
            f("value_usd"),
            f("expected_cost_usd"),
            f("latency_cost_usd"),
            f("shadow_usd"),
            f("risk_usd"),
            f("bonus_usd"),
        );
    }
    let excluded: Vec<String> = v["candidates"]
        .as_array()
        .map(|c| {
            c.iter()
                .filter_map(|c| {
                    c["excluded"].as_str().map(|why| {
                        format!(
                            "  {}/{}: {why}",
                            c["provider"].as_str().unwrap_or(""),
                            c["model"].as_str().unwrap_or("")
                        )
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    if !excluded.is_empty() {
        let _ = writeln!(s, "\nleft out\n{}", excluded.join("\n"));
    }
    let fired = v["policy"]["fired"].as_array().map_or(0, Vec::len);
    if fired > 0 {
        let _ = writeln!(s, "\npolicy rules fired");
        for f in v["policy"]["fired"].as_array().into_iter().flatten() {
            let _ = writeln!(
                s,
                "  line {}: {}",
                f["line"],
                f["rule"].as_str().unwrap_or("")
            );
        }
    }
    s
}
