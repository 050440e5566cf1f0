//! Outbound networking rules: Spin's `allowed_outbound_hosts` syntax and matching, and the
//! `*.spin.internal` service-chaining host names.
//!
//! Entries are `scheme://host[:port]` with `*` wildcards, `*.domain` subdomain wildcards,
//! port ranges `a..b` (end exclusive, as Spin), CIDR hosts, and `{{ var }}` templates that are
//! resolved against application variables once at startup. Error texts follow Spin's.

use std::net::IpAddr;

use anyhow::{bail, Context, Result};

use crate::variables::{is_literal, AppVariables};

/// The domain under which components reach each other in-process.
pub const SERVICE_CHAINING_DOMAIN: &str = "spin.internal";

/// The allowed outbound hosts of one component.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedHosts {
    hosts: Vec<AllowedHost>,
}

/// One parsed `allowed_outbound_hosts` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost {
    original: String,
    scheme: Option<String>,
    host: HostRule,
    port: PortRule,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostRule {
    Any,
    AnySubdomain(String),
    ToSelf,
    Exact(String),
    Cidr(IpAddr, u8),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PortRule {
    Any,
    Port(u16),
    Range(u16, u16),
}

fn well_known_port(scheme: &str) -> Option<u16> {
    match scheme {
        "postgres" => Some(5432),
        "mysql" => Some(3306),
        "redis" => Some(6379),
        "mqtt" => Some(1883),
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

const LEARN_MORE: &str =
    "Learn more: https://spinframework.dev/v3/http-outbound#granting-http-permissions-to-components";

impl AllowedHost {
    /// Parses one literal (template-free) entry.
    pub fn parse(entry: &str) -> Result<Self> {
        let url = entry.trim();
        let Some((scheme, rest)) = url.split_once("://") else {
            match url {
                "*" | ":" | "" | "?" => bail!(
                    "{url:?} is not an allowed outbound host format.\nHosts must be in the form <scheme>://<host>[:<port>], with '*' wildcards allowed for each.\nIf you intended to allow all outbound networking, you can use '*://*:*' - this will obviate all network sandboxing.\n{LEARN_MORE}"
                ),
                _ => bail!(
                    "{url:?} does not contain a scheme (e.g., 'http://' or '*://')\n{LEARN_MORE}"
                ),
            }
        };
        let (host, port_part) = rest.rsplit_once(':').unwrap_or((rest, ""));
        let port_str = match port_part.split_once('/') {
            Some((port, path)) => {
                if !path.is_empty() {
                    bail!("{url:?} has a path but is not allowed to");
                }
                port
            }
            None => port_part,
        };
        let scheme_rule = if scheme == "*" {
            None
        } else if scheme.starts_with('{') {
            bail!("scheme lists are not yet supported")
        } else if scheme.chars().any(|c| !c.is_alphabetic()) {
            bail!(" scheme {scheme:?} contains non alphabetic character")
        } else {
            Some(scheme.to_string())
        };
        let host_rule = parse_host(host)?;
        let port_rule = if port_str.is_empty() {
            let p = well_known_port(scheme).with_context(|| {
                format!("no port was provided and the scheme {scheme:?} does not have a known default port number")
            })?;
            PortRule::Port(p)
        } else if port_str == "*" {
            PortRule::Any
        } else if port_str.starts_with('{') {
            bail!("port lists are not yet supported")
        } else if let Some((a, b)) = port_str.split_once("..") {
            let a = a
                .parse()
                .with_context(|| format!("port range {port_str:?} contains non-number"))?;
            let b = b
                .parse()
                .with_context(|| format!("port range {port_str:?} contains non-number"))?;
            PortRule::Range(a, b)
        } else {
            PortRule::Port(
                port_str
                    .parse()
                    .with_context(|| format!("port {port_str:?} is not a number"))?,
            )
        };
        Ok(Self {
            original: entry.to_string(),
            scheme: scheme_rule,
            host: host_rule,
            port: port_rule,
        })
    }

    /// Whether a request to `scheme://host[:port]` is allowed by this entry.
    pub fn allows(&self, scheme: &str, host: &str, port: Option<u16>) -> bool {
        let scheme_ok = self.scheme.as_deref().is_none_or(|s| s == scheme);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let host_ok = match &self.host {
            HostRule::Any => true,
            HostRule::AnySubdomain(suffix) => host.ends_with(suffix.as_str()),
            HostRule::ToSelf => false,
            HostRule::Exact(h) => h == host,
            HostRule::Cidr(net, prefix) => host
                .parse::<IpAddr>()
                .is_ok_and(|ip| cidr_contains(*net, *prefix, ip)),
        };
        let port_ok = match &self.port {
            PortRule::Any => true,
            rule => match port.or_else(|| well_known_port(scheme)) {
                None => false,
                Some(p) => match rule {
                    PortRule::Port(x) => *x == p,
                    PortRule::Range(a, b) => (*a..*b).contains(&p),
                    PortRule::Any => true,
                },
            },
        };
        scheme_ok && host_ok && port_ok
    }

    /// Whether this entry permits relative ("self") requests.
    fn allows_relative(&self) -> bool {
        let scheme_ok = self
            .scheme
            .as_deref()
            .is_none_or(|s| s == "http" || s == "https");
        scheme_ok && matches!(self.host, HostRule::Any | HostRule::ToSelf)
    }
}

impl std::fmt::Display for AllowedHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.original)
    }
}

fn parse_host(host: &str) -> Result<HostRule> {
    let host = host.trim();
    if host == "*" {
        return Ok(HostRule::Any);
    }
    if host == "self" || host == "self.alt" {
        return Ok(HostRule::ToSelf);
    }
    if host.starts_with('{') {
        bail!("host lists are not yet supported");
    }
    if let Some(cidr) = parse_cidr(host) {
        return Ok(cidr);
    }
    if matches!(host.split('/').nth(1), Some(path) if !path.is_empty()) {
        bail!("hosts must not contain paths");
    }
    if let Some(domain) = host.strip_prefix("*.") {
        if domain.contains('*') {
            bail!("Invalid allowed host {host}: wildcards are allowed only as prefixes");
        }
        return Ok(HostRule::AnySubdomain(format!(".{domain}")));
    }
    if host.contains('*') {
        bail!("Invalid allowed host {host}: wildcards are allowed only as subdomains");
    }
    Ok(HostRule::Exact(host.trim_end_matches('/').to_string()))
}

/// Parses `ip` or `ip/prefix` (IPv4 or bracket-free IPv6) as a network.
fn parse_cidr(s: &str) -> Option<HostRule> {
    let (ip, prefix) = match s.split_once('/') {
        Some((ip, p)) => (ip, Some(p.parse::<u8>().ok()?)),
        None => (s, None),
    };
    let ip: IpAddr = ip
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = prefix.unwrap_or(max);
    (prefix <= max).then_some(HostRule::Cidr(ip, prefix))
}

fn cidr_contains(net: IpAddr, prefix: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - prefix)
            };
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - prefix)
            };
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

impl AllowedHosts {
    /// Parses a component's entries, expanding `{{ var }}` templates with `vars`.
    pub fn parse(entries: &[String], vars: &AppVariables) -> Result<Self> {
        if entries.len() == 1 && entries[0] == "insecure:allow-all" {
            bail!("'insecure:allow-all' is not allowed - use '*://*:*' instead if you really want to allow all outbound traffic'");
        }
        let mut hosts = Vec::with_capacity(entries.len());
        for entry in entries {
            let literal = if is_literal(entry)? {
                entry.clone()
            } else {
                vars.render(entry)?
            };
            hosts.push(AllowedHost::parse(&literal)?);
        }
        Ok(Self { hosts })
    }

    /// Whether `scheme://host[:port]` may be called.
    pub fn allows(&self, scheme: &str, host: &str, port: Option<u16>) -> bool {
        self.hosts.iter().any(|h| h.allows(scheme, host, port))
    }

    /// Whether relative (self) requests are permitted (`*` or `self` hosts).
    pub fn allows_relative(&self) -> bool {
        self.hosts.iter().any(AllowedHost::allows_relative)
    }

    /// The entries, for diagnostics.
    pub fn entries(&self) -> impl Iterator<Item = &AllowedHost> {
        self.hosts.iter()
    }
}

/// Returns the component id when `host` (optionally with `:port`) is `<id>.spin.internal`.
pub fn service_chaining_target(host: &str) -> Option<&str> {
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let (first, rest) = host.split_once('.')?;
    (rest == SERVICE_CHAINING_DOMAIN).then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(entries: &[&str]) -> AllowedHosts {
        let vars = AppVariables::from_pairs([
            ("groq".to_string(), "https://api.groq.com".to_string()),
            ("local".to_string(), "http://127.0.0.1:8089".to_string()),
            (
                "with_path".to_string(),
                "https://example.com/v1".to_string(),
            ),
        ]);
        let entries: Vec<String> = entries.iter().map(|s| s.to_string()).collect();
        AllowedHosts::parse(&entries, &vars).unwrap()
    }

    #[test]
    fn exact_hosts_use_default_ports() {
        let h = hosts(&["https://api.example.com"]);
        assert!(h.allows("https", "api.example.com", None));
        assert!(h.allows("https", "api.example.com", Some(443)));
        assert!(!h.allows("https", "api.example.com", Some(8443)));
        assert!(!h.allows("http", "api.example.com", None));
        assert!(!h.allows("https", "evil.example.com", None));
    }

    #[test]
    fn wildcards_subdomains_and_ranges() {
        let h = hosts(&[
            "https://*.example.com",
            "http://localhost:8000..8010",
            "*://*:*",
        ]);
        assert!(h.allows("ftp", "anything", Some(1)));
        let h = hosts(&["https://*.example.com", "http://localhost:8000..8010"]);
        assert!(h.allows("https", "a.b.example.com", None));
        assert!(!h.allows("https", "example.com", None));
        assert!(h.allows("http", "localhost", Some(8009)));
        assert!(!h.allows("http", "localhost", Some(8010)));
        let h = hosts(&["http://10.0.0.0/8:*"]);
        assert!(h.allows("http", "10.1.2.3", Some(99)));
        assert!(!h.allows("http", "11.1.2.3", Some(99)));
    }

    #[test]
    fn templates_resolve_against_application_variables() {
        let h = hosts(&["{{ groq }}", "{{ local }}"]);
        assert!(h.allows("https", "api.groq.com", None));
        assert!(h.allows("http", "127.0.0.1", Some(8089)));
        assert!(!h.allows("http", "127.0.0.1", Some(8090)));
    }

    #[test]
    fn rejects_bad_entries_with_spins_messages() {
        let vars = AppVariables::from_pairs([(
            "with_path".to_string(),
            "https://example.com/v1".to_string(),
        )]);
        let e = |s: &str| {
            AllowedHosts::parse(&[s.to_string()], &vars)
                .unwrap_err()
                .to_string()
        };
        assert!(e("{{ with_path }}").contains("hosts must not contain paths"));
        assert!(e("https://example.com/v1").contains("hosts must not contain paths"));
        assert!(e("example.com").contains("does not contain a scheme"));
        assert!(e("*").contains("is not an allowed outbound host format"));
        assert!(e("https://ex*ample.com").contains("wildcards are allowed only as subdomains"));
        assert!(e("foo://example.com").contains("does not have a known default port"));
        assert!(e("https://example.com:http").contains("is not a number"));
        assert!(e("insecure:allow-all").contains("insecure:allow-all"));
        assert!(e("{{ nope }}").contains("unknown variable"));
    }

    #[test]
    fn service_chaining_hosts() {
        assert_eq!(
            service_chaining_target("worker.spin.internal"),
            Some("worker")
        );
        assert_eq!(
            service_chaining_target("worker.spin.internal:80"),
            Some("worker")
        );
        assert_eq!(service_chaining_target("a.b.spin.internal"), None);
        assert_eq!(service_chaining_target("example.com"), None);
        let h = hosts(&["http://*.spin.internal"]);
        assert!(h.allows("http", "worker.spin.internal", None));
        assert!(!h.allows("https", "worker.spin.internal", None));
        let h = hosts(&["http://worker.spin.internal"]);
        assert!(h.allows("http", "worker.spin.internal", None));
        assert!(!h.allows("http", "other.spin.internal", None));
    }

    #[test]
    fn relative_requests_need_self_or_any() {
        assert!(hosts(&["http://self"]).allows_relative());
        assert!(hosts(&["*://*:*"]).allows_relative());
        assert!(!hosts(&["https://api.example.com"]).allows_relative());
    }
}
