//! The HTTP surface: which endpoint a method and path name, and the bodies that need no
//! upstream (health, model list).

use crate::config::Config;
use crate::error::ApiError;
use crate::route::VIRTUAL_MODELS;
use serde_json::{json, Value};

/// An endpoint the gateway serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Health,
    Models,
    Model(String),
    ChatCompletions,
    Stats,
    /// Breakers, budgets, AIMD windows, quotas and cache counters: what the dashboard draws.
    State,
    /// One routing decision and its outcome (`/v1/freerelay/routes/{id}`), for its tenant.
    Route(String),
    /// The caller's routing policy: `GET` reads it, `PUT` replaces it, `DELETE` removes it.
    Policy(PolicyVerb),
}

/// What a request to `/v1/freerelay/policy` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyVerb {
    Get,
    Put,
    Delete,
}

impl Endpoint {
    /// Does this endpoint require a client key?
    pub fn needs_auth(&self) -> bool {
        !matches!(self, Endpoint::Health)
    }
}

/// Maps a method and path (query ignored) to an endpoint, or the 404/405 to send.
pub fn endpoint(method: &str, path_and_query: &str) -> Result<Endpoint, ApiError> {
    let path = path_and_query.split('?').next().unwrap_or("");
    let path = if path.len() > 1 {
        path.trim_end_matches('/')
    } else {
        path
    };
    let (endpoint, allowed) = match path {
        "/healthz" => (Endpoint::Health, "GET"),
        "/v1/models" => (Endpoint::Models, "GET"),
        "/v1/chat/completions" => (Endpoint::ChatCompletions, "POST"),
        "/v1/freerelay/stats" => (Endpoint::Stats, "GET"),
        "/v1/freerelay/state" => (Endpoint::State, "GET"),
        "/v1/freerelay/policy" => {
            return match method {
                "GET" | "HEAD" => Ok(Endpoint::Policy(PolicyVerb::Get)),
                "PUT" => Ok(Endpoint::Policy(PolicyVerb::Put)),
                "DELETE" => Ok(Endpoint::Policy(PolicyVerb::Delete)),
                _ => Err(ApiError::method_not_allowed(method, path)),
            }
        }
        p => match (
            p.strip_prefix("/v1/models/"),
            p.strip_prefix("/v1/freerelay/routes/"),
        ) {
            (Some(id), _) if !id.is_empty() => (Endpoint::Model(id.to_owned()), "GET"),
            (_, Some(id)) if !id.is_empty() && !id.contains('/') => {
                (Endpoint::Route(id.to_owned()), "GET")
            }
            _ => return Err(ApiError::not_found(path)),
        },
    };
    let method_ok = method == allowed || (allowed == "GET" && method == "HEAD");
    if method_ok {
        Ok(endpoint)
    } else {
        Err(ApiError::method_not_allowed(method, path))
    }
}

/// Every model a client may name: the virtual ones, then the configured providers' catalogues.
pub fn model_objects(config: &Config) -> Vec<Value> {
    let mut out = Vec::new();
    for (name, tiers) in VIRTUAL_MODELS {
        if config.providers.iter().any(|c| tiers.contains(&c.tier)) || *name == "auto" {
            out.push(json!({"id": name, "object": "model", "created": 0, "owned_by": "freerelay"}));
        }
    }
    for (name, members) in &config.model_groups {
        out.push(json!({
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "freerelay",
            "group": members,
        }));
    }
    for c in &config.providers {
        for id in c.model_ids() {
            let info = c.model_info(id);
            let caps = info.caps;
            let named = [
                (caps.tools, "tools"),
                (caps.json_mode, "json_mode"),
                (caps.json_schema, "json_schema"),
                (caps.vision, "vision"),
                (caps.reasoning, "reasoning"),
                (caps.prefill, "prefill"),
            ];
            let mut m = json!({
                "id": format!("{}/{}", c.provider.id, id),
                "object": "model",
                "created": 0,
                "owned_by": c.provider.id,
                "context_window": info.context_window,
                "max_output_tokens": info.max_output,
                "tier": c.tier.as_str(),
                "capabilities": named.iter().filter(|(on, _)| *on).map(|(_, n)| *n).collect::<Vec<_>>(),
            });
            if let Some(p) = c.price(id) {
                m["price_per_million_tokens"] = json!({"input": p.input, "output": p.output});
            }
            out.push(m);
        }
    }
    out
}

/// `GET /v1/models`.
pub fn models_body(config: &Config) -> Vec<u8> {
    serde_json::to_vec(&json!({"object": "list", "data": model_objects(config)}))
        .unwrap_or_default()
}

/// `GET /v1/models/{id}`.
pub fn model_body(config: &Config, id: &str) -> Result<Vec<u8>, ApiError> {
    model_objects(config)
        .into_iter()
        .find(|m| m["id"] == id)
        .map(|m| serde_json::to_vec(&m).unwrap_or_default())
        .ok_or_else(|| ApiError::model_not_found(format!("The model `{id}` does not exist.")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::config_of;

    #[test]
    fn routes_and_methods() {
        assert_eq!(endpoint("GET", "/healthz"), Ok(Endpoint::Health));
        assert_eq!(
            endpoint("POST", "/v1/chat/completions?x=1"),
            Ok(Endpoint::ChatCompletions)
        );
        assert_eq!(endpoint("GET", "/v1/models/"), Ok(Endpoint::Models));
        assert_eq!(
            endpoint("GET", "/v1/models/groq/llama"),
            Ok(Endpoint::Model("groq/llama".into()))
        );
        assert_eq!(
            endpoint("GET", "/v1/chat/completions").unwrap_err().status,
            405
        );
        assert_eq!(endpoint("GET", "/v2/x").unwrap_err().status, 404);
        assert!(!Endpoint::Health.needs_auth() && Endpoint::Models.needs_auth());
    }

    #[test]
    fn routes_and_policy_endpoints() {
        assert_eq!(
            endpoint("GET", "/v1/freerelay/routes/rt_00ff"),
            Ok(Endpoint::Route("rt_00ff".into()))
        );
        assert_eq!(
            endpoint("GET", "/v1/freerelay/routes/").unwrap_err().status,
            404
        );
        assert_eq!(
            endpoint("GET", "/v1/freerelay/routes/a/b")
                .unwrap_err()
                .status,
            404
        );
        assert_eq!(
            endpoint("POST", "/v1/freerelay/routes/rt_1")
                .unwrap_err()
                .status,
            405
        );
        for (m, v) in [
            ("GET", PolicyVerb::Get),
            ("PUT", PolicyVerb::Put),
            ("DELETE", PolicyVerb::Delete),
        ] {
            assert_eq!(endpoint(m, "/v1/freerelay/policy"), Ok(Endpoint::Policy(v)));
        }
        assert_eq!(
            endpoint("POST", "/v1/freerelay/policy").unwrap_err().status,
            405
        );
        assert!(Endpoint::Policy(PolicyVerb::Get).needs_auth());
    }

    #[test]
    fn models_list_only_configured_providers() {
        let c = config_of(&[("groq_api_key", "g")]).unwrap();
        let v: Value = serde_json::from_slice(&models_body(&c)).unwrap();
        let ids: Vec<&str> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert!(ids.contains(&"auto") && ids.contains(&"free") && !ids.contains(&"paid"));
        assert!(ids.contains(&"groq/llama-3.1-8b-instant"));
        assert!(!ids.iter().any(|i| i.starts_with("openai/")));
        assert!(model_body(&c, "groq/llama-3.1-8b-instant").is_ok());
        assert_eq!(model_body(&c, "x").unwrap_err().status, 404);
    }

    #[test]
    fn model_groups_are_listed() {
        let c = config_of(&[
            ("groq_api_key", "g"),
            ("model_groups", "fast=groq/llama-3.1-8b-instant"),
        ])
        .unwrap();
        let m: Value = serde_json::from_slice(&model_body(&c, "fast").unwrap()).unwrap();
        assert_eq!(m["owned_by"], "freerelay");
        assert_eq!(m["group"][0], "groq/llama-3.1-8b-instant");
    }
}
