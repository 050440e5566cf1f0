//! Spin manifest v2 (`spin.toml`) parsing and validation, limited to what `freerelay up` runs.
//!
//! Unknown fields are rejected (as Spin does with `deny_unknown_fields`) so a typo that Spin
//! would refuse never "works" locally; Spin features this runner cannot honour are refused
//! with a clear message instead of being silently ignored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// A parsed and validated application manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// Directory containing the manifest; component sources are relative to it.
    pub dir: PathBuf,
    /// `[application] name`.
    pub name: String,
    /// `[application] version`, if given.
    pub version: Option<String>,
    /// `[variables]`, in manifest order.
    pub variables: Vec<(String, VariableDecl)>,
    /// `[[trigger.http]]` entries, in manifest order.
    pub http_triggers: Vec<HttpTrigger>,
    /// `[component.<id>]` tables, keyed by id.
    pub components: BTreeMap<String, ComponentDecl>,
}

/// One application variable declaration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VariableDecl {
    /// Default value, if any (a variable has a default or is required).
    pub default: Option<String>,
    /// Whether a value must come from the environment.
    pub required: bool,
    /// Secret values are never printed.
    pub secret: bool,
}

/// The route of one HTTP trigger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A public route pattern such as `/...` or `/v1/models`.
    Public(String),
    /// `{ private = true }`: reachable only through service chaining.
    Private,
}

/// One `[[trigger.http]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTrigger {
    /// Where requests come from.
    pub route: Route,
    /// The component that handles them.
    pub component: String,
}

/// One `[component.<id>]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentDecl {
    /// Component id (kebab-case).
    pub id: String,
    /// Absolute path of the `.wasm` file.
    pub source: PathBuf,
    /// The source as written in the manifest (for error messages).
    pub source_display: String,
    /// Key-value store labels the component may open.
    pub key_value_stores: Vec<String>,
    /// `allowed_outbound_hosts` entries, unresolved (may contain `{{ var }}` templates).
    pub allowed_outbound_hosts: Vec<String>,
    /// Component variables: name → template over application variables.
    pub variables: Vec<(String, String)>,
    /// Environment variables given to the guest.
    pub environment: Vec<(String, String)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    spin_manifest_version: toml::Value,
    application: RawApplication,
    #[serde(default)]
    variables: toml::Table,
    #[serde(default)]
    trigger: BTreeMap<String, Vec<toml::Table>>,
    #[serde(default)]
    component: toml::Table,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // Fields are accepted for Spin compatibility; only `name` is used.
struct RawApplication {
    name: String,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    authors: Vec<String>,
    #[serde(default)]
    targets: Option<toml::Value>,
    #[serde(default)]
    trigger: Option<toml::Table>,
    #[serde(default)]
    tool: Option<toml::Table>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVariable {
    #[serde(default)]
    default: Option<String>,
    #[serde(default)]
    required: bool,
    #[serde(default)]
    secret: bool,
    #[serde(default)]
    #[allow(dead_code)] // Accepted for Spin compatibility.
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // Optional Spin fields are accepted, then checked for support below.
struct RawComponent {
    source: toml::Value,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    variables: BTreeMap<String, String>,
    #[serde(default)]
    environment: BTreeMap<String, String>,
    #[serde(default)]
    files: Vec<toml::Value>,
    #[serde(default)]
    exclude_files: Vec<String>,
    #[serde(default)]
    allowed_http_hosts: Vec<String>,
    #[serde(default)]
    allowed_outbound_hosts: Vec<String>,
    #[serde(default)]
    key_value_stores: Vec<String>,
    #[serde(default)]
    sqlite_databases: Vec<String>,
    #[serde(default)]
    ai_models: Vec<String>,
    #[serde(default)]
    build: Option<toml::Table>,
    #[serde(default)]
    tool: Option<toml::Table>,
    #[serde(default)]
    dependencies_inherit_configuration: bool,
    #[serde(default)]
    dependencies: Option<toml::Table>,
    #[serde(default)]
    profile: Option<toml::Table>,
}

impl Manifest {
    /// Reads and validates the manifest at `path` (a directory means its `spin.toml`, as in Spin).
    pub fn load(path: &Path) -> Result<Self> {
        let joined;
        let path = if path.is_dir() {
            joined = path.join("spin.toml");
            joined.as_path()
        } else {
            path
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read manifest {}", path.display()))?;
        let dir = path
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .unwrap_or(Path::new("."));
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        Self::parse(&text, &dir).with_context(|| format!("invalid manifest {}", path.display()))
    }

    /// Parses manifest text; `dir` is where relative component sources are resolved.
    pub fn parse(text: &str, dir: &Path) -> Result<Self> {
        let raw: RawManifest = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        match raw.spin_manifest_version.as_integer() {
            Some(2) => {}
            _ => match raw.spin_manifest_version.as_str() {
                Some("1") => bail!(
                    "spin_manifest_version 1 is not supported; use version 2 (`spin_manifest_version = 2`)"
                ),
                _ => bail!(
                    "unsupported spin_manifest_version {}; expected 2",
                    raw.spin_manifest_version
                ),
            },
        }

        let mut variables = Vec::new();
        for (name, value) in raw.variables {
            crate::variables::validate_name(&name)
                .with_context(|| format!("invalid application variable name {name:?}"))?;
            let var: RawVariable = value
                .try_into()
                .map_err(|e| anyhow::anyhow!("variable {name:?}: {e}"))?;
            if var.required && var.default.is_some() {
                bail!("variable {name:?}: cannot be both required and have a default");
            }
            if !var.required && var.default.is_none() {
                bail!("variable {name:?}: must either be required or have a default");
            }
            variables.push((
                name,
                VariableDecl {
                    default: var.default,
                    required: var.required,
                    secret: var.secret,
                },
            ));
        }

        let mut components = BTreeMap::new();
        for (id, value) in raw.component {
            validate_component_id(&id)?;
            let c: RawComponent = value
                .try_into()
                .map_err(|e| anyhow::anyhow!("component '{id}': {e}"))?;
            components.insert(id.clone(), convert_component(&id, c, dir)?);
        }

        let mut http_triggers = Vec::new();
        for (kind, triggers) in raw.trigger {
            if kind != "http" {
                bail!(
                    "trigger type '{kind}' is not supported by freerelay up (only [[trigger.http]])"
                );
            }
            for t in triggers {
                http_triggers.push(convert_http_trigger(t, &components)?);
            }
        }
        if http_triggers.is_empty() {
            bail!("the manifest has no [[trigger.http]] entries: nothing to serve");
        }

        Ok(Self {
            dir: dir.to_path_buf(),
            name: raw.application.name,
            version: raw.application.version,
            variables,
            http_triggers,
            components,
        })
    }

    /// Returns the component ids that have an HTTP trigger (public or private).
    pub fn triggered_components(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .http_triggers
            .iter()
            .map(|t| t.component.clone())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }
}

/// Spin component ids are kebab-case: lowercase words of letters and digits joined by `-`.
fn validate_component_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.split('-').all(|w| {
            !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        })
        && id.starts_with(|c: char| c.is_ascii_lowercase());
    if !ok {
        bail!("component id {id:?} must be kebab-case (lowercase letters, digits and '-')");
    }
    Ok(())
}

fn convert_component(id: &str, c: RawComponent, dir: &Path) -> Result<ComponentDecl> {
    let source_display = match &c.source {
        toml::Value::String(s) => s.clone(),
        toml::Value::Table(_) => bail!(
            "component '{id}': only local file sources (`source = \"path/to/file.wasm\"`) are supported by freerelay up"
        ),
        other => bail!("component '{id}': source must be a string path, got {other}"),
    };
    let unsupported = [
        ("files", !c.files.is_empty()),
        ("sqlite_databases", !c.sqlite_databases.is_empty()),
        ("ai_models", !c.ai_models.is_empty()),
        (
            "dependencies",
            c.dependencies.as_ref().is_some_and(|d| !d.is_empty()),
        ),
        ("allowed_http_hosts", !c.allowed_http_hosts.is_empty()),
    ];
    for (field, used) in unsupported {
        if used {
            bail!("component '{id}': `{field}` is not supported by freerelay up");
        }
    }
    for label in &c.key_value_stores {
        let ok = !label.is_empty()
            && label
                .chars()
                .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-' || ch == '_');
        if !ok {
            bail!("component '{id}': key_value_stores label {label:?}: expected kebab-case or snake_case");
        }
    }
    let mut variables = Vec::new();
    for (name, template) in c.variables {
        crate::variables::validate_name(&name)
            .with_context(|| format!("component '{id}': invalid variable name {name:?}"))?;
        variables.push((name, template));
    }
    let source = dir.join(&source_display);
    Ok(ComponentDecl {
        id: id.to_string(),
        source,
        source_display,
        key_value_stores: c.key_value_stores,
        allowed_outbound_hosts: c.allowed_outbound_hosts,
        variables,
        environment: c.environment.into_iter().collect(),
    })
}

fn convert_http_trigger(
    mut t: toml::Table,
    components: &BTreeMap<String, ComponentDecl>,
) -> Result<HttpTrigger> {
    let component = match t.remove("component") {
        Some(toml::Value::String(s)) => s,
        Some(toml::Value::Table(_)) => bail!(
            "inline components in [[trigger.http]] are not supported by freerelay up; use `component = \"<id>\"`"
        ),
        Some(other) => bail!("[[trigger.http]] component must be a string, got {other}"),
        None => bail!("[[trigger.http]] entry has no `component`"),
    };
    if !components.contains_key(&component) {
        bail!("[[trigger.http]] refers to unknown component '{component}' (no [component.{component}] table)");
    }
    let route = match t.remove("route") {
        Some(toml::Value::String(s)) => Route::Public(s),
        Some(toml::Value::Table(mut tbl)) => {
            let private = tbl.remove("private");
            if !tbl.is_empty() {
                bail!("component '{component}': route table may only contain `private`");
            }
            match private {
                Some(toml::Value::Boolean(true)) => Route::Private,
                _ => bail!(
                    "route must be a string pattern or '{{ private = true }}': component '{component}' has {{ private = false }}"
                ),
            }
        }
        Some(other) => bail!("component '{component}': route must be a string, got {other}"),
        None => bail!("[[trigger.http]] for component '{component}' has no `route`"),
    };
    t.remove("id");
    if let Some(exec) = t.remove("executor") {
        let kind = exec
            .as_table()
            .and_then(|e| e.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if kind != "http" && kind != "spin" {
            bail!("component '{component}': only the default HTTP executor is supported by freerelay up");
        }
    }
    if let Some((key, _)) = t.iter().next() {
        bail!("[[trigger.http]] for component '{component}': unknown field `{key}`");
    }
    Ok(HttpTrigger { route, component })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
spin_manifest_version = 2
[application]
name = "app"
[variables]
greeting = { default = "hi" }
token = { required = true, secret = true }
[[trigger.http]]
route = "/..."
component = "gateway"
[[trigger.http]]
route = { private = true }
component = "worker"
[component.gateway]
source = "target/gw.wasm"
key_value_stores = ["default"]
allowed_outbound_hosts = ["https://api.example.com", "{{ greeting }}"]
environment = { RUST_LOG = "info" }
[component.gateway.variables]
msg = "{{ greeting }} there"
[component.worker]
source = "w.wasm"
"#;

    #[test]
    fn parses_minimal_manifest() {
        let m = Manifest::parse(MINIMAL, Path::new("/app")).unwrap();
        assert_eq!(m.name, "app");
        assert_eq!(m.variables.len(), 2);
        assert_eq!(m.variables[1].0, "token");
        assert!(m.variables[1].1.required && m.variables[1].1.secret);
        assert_eq!(m.http_triggers[0].route, Route::Public("/...".into()));
        assert_eq!(m.http_triggers[1].route, Route::Private);
        let gw = &m.components["gateway"];
        assert_eq!(gw.source, Path::new("/app/target/gw.wasm"));
        assert_eq!(gw.key_value_stores, vec!["default"]);
        assert_eq!(
            gw.variables,
            vec![("msg".into(), "{{ greeting }} there".into())]
        );
        assert_eq!(gw.environment, vec![("RUST_LOG".into(), "info".into())]);
        assert_eq!(m.triggered_components(), vec!["gateway", "worker"]);
    }

    #[test]
    fn parses_the_repository_manifest() {
        let text = include_str!("../../spin.toml");
        let m = Manifest::parse(text, Path::new("/repo")).unwrap();
        assert_eq!(m.components["gateway"].key_value_stores, vec!["default"]);
        assert!(m
            .variables
            .iter()
            .any(|(n, v)| n == "groq_api_key" && v.secret));
    }

    fn err(text: &str) -> String {
        format!(
            "{:#}",
            Manifest::parse(text, Path::new("/app")).unwrap_err()
        )
    }

    #[test]
    fn rejects_malformed_toml() {
        assert!(err("spin_manifest_version = 2\n[application\n").contains("TOML parse error"));
    }

    #[test]
    fn rejects_unknown_component_in_trigger() {
        let text = MINIMAL.replace("component = \"worker\"", "component = \"nope\"");
        assert!(
            err(&text).contains("unknown component 'nope'"),
            "{}",
            err(&text)
        );
    }

    #[test]
    fn rejects_unknown_fields_like_spin() {
        let text = MINIMAL.replace("key_value_stores =", "key_value_store =");
        assert!(err(&text).contains("key_value_store"), "{}", err(&text));
    }

    #[test]
    fn rejects_wrong_version_and_bad_variables() {
        assert!(err(&MINIMAL.replace("= 2", "= 3")).contains("spin_manifest_version"));
        let both = MINIMAL.replace(
            "greeting = { default = \"hi\" }",
            "greeting = { default = \"hi\", required = true }",
        );
        assert!(err(&both).contains("cannot be both required"));
        let bad_name = MINIMAL.replace("greeting = {", "Greeting = {");
        assert!(err(&bad_name).contains("Greeting"));
    }

    #[test]
    fn rejects_private_false_and_missing_route() {
        let text = MINIMAL.replace("{ private = true }", "{ private = false }");
        assert!(err(&text).contains("private = false"));
        let text = MINIMAL.replace("route = \"/...\"\n", "");
        assert!(err(&text).contains("has no `route`"));
    }

    #[test]
    fn rejects_unsupported_features() {
        let text = MINIMAL.replace(
            "[component.worker]\n",
            "[component.worker]\nfiles = [\"a\"]\n",
        );
        assert!(err(&text).contains("`files` is not supported"));
        let text = MINIMAL.replace(
            "[[trigger.http]]\nroute = { private",
            "[[trigger.redis]]\nroute = { private",
        );
        assert!(err(&text).contains("trigger type 'redis'"));
    }
}
