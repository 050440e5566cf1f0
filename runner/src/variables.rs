//! Application and component variables, resolved the way Spin's env provider does.
//!
//! An application variable `foo_bar` takes its value from the environment variable
//! `SPIN_VARIABLE_FOO_BAR`, else from a `.env` file in the current directory (Spin's env
//! provider reads `.env` from the working directory), else from its manifest default.
//! Everything is resolved once at startup: the environment does not change at run time, and
//! a missing required variable must stop the runner before it serves anything.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Result};

use crate::manifest::Manifest;

/// Why a variable name is not acceptable (Spin's `spin_expressions::Key` rules).
pub fn validate_name(key: &str) -> Result<()> {
    let reason = if key.is_empty() {
        Some("must not be empty".to_string())
    } else if let Some(c) = key
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_'))
    {
        Some(format!(
            "invalid character {c:?}. Variable names may contain only lower-case letters, numbers, and underscores."
        ))
    } else if !key.starts_with(|c: char| c.is_ascii_lowercase()) {
        Some("must start with a lowercase ASCII letter".to_string())
    } else if !key.ends_with(|c: char| c.is_ascii_alphanumeric()) {
        Some("must end with a lowercase ASCII letter or digit".to_string())
    } else if key.contains("__") {
        Some("must not contain multiple consecutive underscores".to_string())
    } else {
        None
    };
    match reason {
        Some(r) => bail!("{key:?}: {r}"),
        None => Ok(()),
    }
}

/// One piece of a `{{ var }}` template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Literal text.
    Lit(String),
    /// A reference to an application variable.
    Expr(String),
}

/// Splits a Spin template (`"https://{{ host }}:8080"`) into literal and variable parts.
pub fn parse_template(template: &str) -> Result<Vec<Part>> {
    let mut parts = Vec::new();
    let mut rest = template;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("{{") {
            let Some((expr, tail)) = after.split_once("}}") else {
                bail!("invalid variable template: unmatched '{{{{' in template");
            };
            parts.push(Part::Expr(expr.trim().to_string()));
            rest = tail;
        } else if let Some(idx) = rest.find("{{") {
            parts.push(Part::Lit(rest[..idx].to_string()));
            rest = &rest[idx..];
        } else {
            parts.push(Part::Lit(rest.to_string()));
            rest = "";
        }
    }
    Ok(parts)
}

/// Whether a template has no `{{ }}` expressions.
pub fn is_literal(template: &str) -> Result<bool> {
    Ok(parse_template(template)?
        .iter()
        .all(|p| matches!(p, Part::Lit(_))))
}

/// Resolved application variables (name → value), plus which ones are secret.
#[derive(Debug, Clone, Default)]
pub struct AppVariables {
    values: HashMap<String, String>,
    secret: HashMap<String, bool>,
}

impl AppVariables {
    /// Resolves every manifest variable from `lookup` (the environment) or its default.
    ///
    /// `lookup` receives the full environment name (`SPIN_VARIABLE_<UPPER>`).
    pub fn resolve(manifest: &Manifest, lookup: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let mut values = HashMap::new();
        let mut secret = HashMap::new();
        for (name, decl) in &manifest.variables {
            let env_name = env_name(name);
            let value = match lookup(&env_name).or_else(|| decl.default.clone()) {
                Some(v) => v,
                None => bail!(
                    "no provider resolved required variable {name:?} (set the environment variable {env_name})"
                ),
            };
            values.insert(name.clone(), value);
            secret.insert(name.clone(), decl.secret);
        }
        Ok(Self { values, secret })
    }

    /// Builds from explicit pairs (tests and tools).
    pub fn from_pairs<I: IntoIterator<Item = (String, String)>>(pairs: I) -> Self {
        let values: HashMap<String, String> = pairs.into_iter().collect();
        let secret = values.keys().map(|k| (k.clone(), false)).collect();
        Self { values, secret }
    }

    /// The value of one application variable.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// Whether a variable is marked secret (its value must never be printed).
    pub fn is_secret(&self, name: &str) -> bool {
        self.secret.get(name).copied().unwrap_or(false)
    }

    /// Expands a template; every referenced variable must exist.
    pub fn render(&self, template: &str) -> Result<String> {
        let mut out = String::new();
        for part in parse_template(template)? {
            match part {
                Part::Lit(l) => out.push_str(&l),
                Part::Expr(name) => match self.values.get(&name) {
                    Some(v) => out.push_str(v),
                    None => bail!("invalid variable template: unknown variable {name:?}"),
                },
            }
        }
        Ok(out)
    }

    /// Resolves a component's variable templates into final values.
    pub fn component_values(
        &self,
        templates: &[(String, String)],
    ) -> Result<HashMap<String, String>> {
        templates
            .iter()
            .map(|(k, t)| Ok((k.clone(), self.render(t)?)))
            .collect()
    }
}

/// `SPIN_VARIABLE_<NAME in upper case>`, the environment name Spin reads for a variable.
pub fn env_name(var: &str) -> String {
    format!("SPIN_VARIABLE_{}", var.to_ascii_uppercase())
}

/// Looks a name up in the process environment, then in the `.env` file (as Spin does).
pub fn process_env_lookup(dotenv: HashMap<String, String>) -> impl Fn(&str) -> Option<String> {
    move |name: &str| match std::env::var(name) {
        Ok(v) => Some(v),
        Err(_) => dotenv.get(name).cloned(),
    }
}

/// Reads a dotenv file; a missing file is empty (Spin ignores a missing `.env`).
pub fn load_dotenv(path: &Path) -> Result<HashMap<String, String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_dotenv(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashMap::new()),
        Err(e) => bail!("cannot read {}: {e}", path.display()),
    }
}

/// Parses `KEY=VALUE` lines: `#` comments, optional `export`, single/double quotes.
pub fn parse_dotenv(text: &str) -> Result<HashMap<String, String>> {
    let mut map = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let Some((key, value)) = line.split_once('=') else {
            bail!(".env line {}: expected KEY=VALUE", n + 1);
        };
        let key = key.trim();
        if key.is_empty() || key.contains(char::is_whitespace) {
            bail!(".env line {}: invalid key {key:?}", n + 1);
        }
        let value = value.trim();
        let value = if let Some(inner) = value.strip_prefix('"') {
            let Some(end) = inner.rfind('"') else {
                bail!(".env line {}: unterminated double quote", n + 1);
            };
            inner[..end]
                .replace("\\n", "\n")
                .replace("\\\"", "\"")
                .replace("\\\\", "\\")
        } else if let Some(inner) = value.strip_prefix('\'') {
            let Some(end) = inner.rfind('\'') else {
                bail!(".env line {}: unterminated single quote", n + 1);
            };
            inner[..end].to_string()
        } else {
            match value.find(" #") {
                Some(i) => value[..i].trim_end().to_string(),
                None => value.to_string(),
            }
        };
        map.insert(key.to_string(), value);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Manifest;

    fn manifest() -> Manifest {
        Manifest::parse(
            r#"
spin_manifest_version = 2
[application]
name = "t"
[variables]
base = { default = "https://api.example.com" }
key = { required = true, secret = true }
[[trigger.http]]
route = "/..."
component = "c"
[component.c]
source = "c.wasm"
variables = { url = "{{ base }}/v1", k = "{{key}}" }
"#,
            Path::new("/"),
        )
        .unwrap()
    }

    #[test]
    fn env_beats_default_and_required_needs_a_value() {
        let m = manifest();
        let env: HashMap<&str, &str> = [
            ("SPIN_VARIABLE_BASE", "http://127.0.0.1:9"),
            ("SPIN_VARIABLE_KEY", "s3cret"),
        ]
        .into();
        let vars = AppVariables::resolve(&m, &|n| env.get(n).map(|s| s.to_string())).unwrap();
        assert_eq!(vars.get("base"), Some("http://127.0.0.1:9"));
        assert!(vars.is_secret("key") && !vars.is_secret("base"));
        let comp = vars.component_values(&m.components["c"].variables).unwrap();
        assert_eq!(comp["url"], "http://127.0.0.1:9/v1");
        assert_eq!(comp["k"], "s3cret");

        let only_key: HashMap<&str, &str> = [("SPIN_VARIABLE_KEY", "x")].into();
        let vars = AppVariables::resolve(&m, &|n| only_key.get(n).map(|s| s.to_string())).unwrap();
        assert_eq!(vars.get("base"), Some("https://api.example.com"));

        let err = AppVariables::resolve(&m, &|_| None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("required variable \"key\"") && err.contains("SPIN_VARIABLE_KEY"),
            "{err}"
        );
    }

    #[test]
    fn names_follow_spin_rules() {
        for good in ["a", "abc", "a1b2c3", "a_1", "a_1_b_3"] {
            validate_name(good).unwrap();
        }
        for bad in ["", "aX", "1bc", "_x", "x.y", "x_", "a__b", "x-y"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn templates_parse_and_render() {
        assert_eq!(
            parse_template("a-{{ x }}-b").unwrap(),
            vec![
                Part::Lit("a-".into()),
                Part::Expr("x".into()),
                Part::Lit("-b".into())
            ]
        );
        assert!(parse_template("{{ ok }} {{ open").is_err());
        let vars = AppVariables::from_pairs([("x".to_string(), "1".to_string())]);
        assert_eq!(vars.render("{{x}}{{ x }}").unwrap(), "11");
        assert!(vars
            .render("{{ y }}")
            .unwrap_err()
            .to_string()
            .contains("unknown variable"));
    }

    #[test]
    fn dotenv_parsing() {
        let m = parse_dotenv(
            "# c\nexport SPIN_VARIABLE_A=1\nB = \"two words\" \nC='x#y'\nD=v # comment\n\n",
        )
        .unwrap();
        assert_eq!(m["SPIN_VARIABLE_A"], "1");
        assert_eq!(m["B"], "two words");
        assert_eq!(m["C"], "x#y");
        assert_eq!(m["D"], "v");
        assert!(parse_dotenv("NOEQUALS").is_err());
    }
}

/// `fermyon:spin/variables@2.0.0` and `wasi:config/store` over the component's resolved values.
mod host {
    use crate::bindings::fermyon::spin::variables as spin_vars;
    use crate::bindings::wasi::config::store as wasi_config;
    use crate::runtime::HostState;

    impl HostState {
        /// Spin's lookup: invalid name → invalid-name; not a component variable → undefined.
        fn variable(&self, name: &str) -> Result<String, spin_vars::Error> {
            if let Err(e) = super::validate_name(name) {
                return Err(spin_vars::Error::InvalidName(e.to_string()));
            }
            match self.vars.values.get(name) {
                Some(v) => Ok(v.clone()),
                None => Err(spin_vars::Error::Undefined(format!(
                    "no variable for {:?}.{name:?}",
                    self.vars.component_id
                ))),
            }
        }
    }

    impl spin_vars::Host for HostState {
        async fn get(
            &mut self,
            name: String,
        ) -> wasmtime::Result<Result<String, spin_vars::Error>> {
            Ok(self.variable(&name))
        }
    }

    impl wasi_config::Host for HostState {
        async fn get(
            &mut self,
            key: String,
        ) -> wasmtime::Result<Result<Option<String>, wasi_config::Error>> {
            Ok(match self.variable(&key) {
                Ok(v) => Ok(Some(v)),
                // Spin maps undefined and invalid names to "absent" for wasi:config.
                Err(spin_vars::Error::Undefined(_) | spin_vars::Error::InvalidName(_)) => Ok(None),
                Err(spin_vars::Error::Provider(m)) => Err(wasi_config::Error::Upstream(m)),
                Err(spin_vars::Error::Other(m)) => Err(wasi_config::Error::Io(m)),
            })
        }

        async fn get_all(
            &mut self,
        ) -> wasmtime::Result<Result<Vec<(String, String)>, wasi_config::Error>> {
            let mut all: Vec<(String, String)> = self
                .vars
                .values
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            all.sort();
            Ok(Ok(all))
        }
    }
}
