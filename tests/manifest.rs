//! The catalogue, the configuration, `spin.toml` and `kv-schema/` must agree: a provider
//! without its variables or allowed host in the manifest cannot be configured under Spin, and a
//! key nobody documented is state nobody can operate.

use freerelay::catalog::CUSTOM;
use freerelay::catalog::PROVIDERS;
use freerelay::config::{CUSTOM_VARIABLES, GLOBAL_VARIABLES, PROVIDER_VARIABLES};
use freerelay::kv::keys;

fn manifest() -> toml::Table {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/spin.toml")).unwrap();
    text.parse().unwrap()
}

fn table<'a>(t: &'a toml::Table, path: &[&str]) -> &'a toml::Table {
    path.iter().fold(t, |t, k| {
        t.get(*k)
            .and_then(toml::Value::as_table)
            .unwrap_or_else(|| panic!("spin.toml lacks [{}]", path.join(".")))
    })
}

fn every_variable() -> Vec<String> {
    GLOBAL_VARIABLES
        .iter()
        .map(|v| (*v).to_owned())
        .chain(PROVIDERS.iter().flat_map(|p| {
            PROVIDER_VARIABLES
                .iter()
                .map(move |s| format!("{}_{s}", p.id))
        }))
        .chain(CUSTOM_VARIABLES.iter().map(|s| format!("{CUSTOM}_{s}")))
        .chain(freerelay::edge::Settings::variables().map(str::to_owned))
        .chain(freerelay::router::VARIABLES.iter().map(|v| (*v).to_owned()))
        .collect()
}

#[test]
fn every_variable_is_declared_and_passed_to_the_gateway() {
    let m = manifest();
    let app = table(&m, &["variables"]);
    let component = table(&m, &["component", "gateway", "variables"]);
    for v in every_variable() {
        assert!(app.contains_key(&v), "spin.toml [variables] lacks `{v}`");
        assert_eq!(
            component.get(&v).and_then(toml::Value::as_str),
            Some(format!("{{{{ {v} }}}}").as_str()),
            "[component.gateway.variables] must pass `{v}` through"
        );
    }
    for p in PROVIDERS {
        let key = &app[&format!("{}_api_key", p.id)];
        assert_eq!(
            key.get("secret").and_then(toml::Value::as_bool),
            Some(true),
            "{}",
            p.id
        );
        let origin = &app[&format!("{}_base_url", p.id)];
        assert_eq!(
            origin.get("default").and_then(toml::Value::as_str),
            Some(p.default_origin),
            "{}_base_url defaults to the catalogue's origin",
            p.id
        );
    }
}

#[test]
fn every_provider_origin_is_an_allowed_outbound_host() {
    let m = manifest();
    let hosts: Vec<&str> = table(&m, &["component", "gateway"])["allowed_outbound_hosts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(toml::Value::as_str)
        .collect();
    for p in PROVIDERS {
        let template = format!("{{{{ {}_base_url }}}}", p.id);
        assert!(
            hosts.contains(&template.as_str()),
            "allowed_outbound_hosts lacks {template}"
        );
    }
}

#[test]
fn every_key_is_documented_in_kv_schema() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/kv-schema/README.md"))
        .unwrap();
    for prefix in keys::PREFIXES {
        assert!(
            doc.contains(&format!("`{prefix}")),
            "kv-schema/README.md does not document `{prefix}…`"
        );
    }
    // Each builder's output starts with a listed prefix.
    for key in [
        keys::stat("groq", "requests"),
        keys::cooldown("groq", "k0", None),
    ] {
        assert!(keys::PREFIXES.iter().any(|p| key.starts_with(p)), "{key}");
    }
    for field in freerelay::stats::FIELDS
        .iter()
        .chain(&freerelay::stats::GATEWAY_FIELDS)
    {
        assert!(
            doc.contains(&format!(":{field}`")),
            "kv-schema/README.md does not document the `{field}` counter"
        );
    }
}
