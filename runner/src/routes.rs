//! HTTP route matching with Spin's rules: exact routes beat wildcards, the longest wildcard
//! prefix wins, `:name` segments match one segment, private routes are never served.

use anyhow::{bail, Result};

use crate::manifest::{HttpTrigger, Route};

/// One public route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    /// The route as written in the manifest (`/...`, `/v1/models`).
    pub raw: String,
    /// Route segments before any trailing wildcard.
    segments: Vec<Segment>,
    /// Whether the route ends in `/...` (or `/*`).
    wildcard: bool,
    /// The handling component.
    pub component: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Lit(String),
    Param(String),
}

/// The result of routing a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatch {
    /// The handling component.
    pub component: String,
    /// `spin-matched-route` / `spin-raw-component-route`: the route as written.
    pub raw_route: String,
    /// `spin-component-route`: the route without its trailing `/...`.
    pub component_route: String,
    /// `spin-path-info`: the part of the path matched by the trailing wildcard.
    pub path_info: String,
    /// Named `:param` captures (header `spin-path-match-<name>`).
    pub params: Vec<(String, String)>,
}

impl RouteMatch {
    /// The match Spin synthesises for a service-chaining request: route `/...`, whole path as info.
    pub fn synthetic(component: &str, path: &str) -> Self {
        Self {
            component: component.to_string(),
            raw_route: "/...".to_string(),
            component_route: String::new(),
            path_info: path.to_string(),
            params: Vec::new(),
        }
    }
}

/// Match preference: (exact?, segment count, literal segment count); higher wins.
type Rank = (u8, usize, usize);
/// Named captures of a match.
type Params = Vec<(String, String)>;

/// The router over all public routes.
#[derive(Debug, Clone, Default)]
pub struct Router {
    routes: Vec<RouteEntry>,
}

/// Spin's route normalisation: absolute, with one trailing slash removed.
fn normalise(route: &str) -> String {
    let abs = if route.starts_with('/') {
        route.to_string()
    } else {
        format!("/{route}")
    };
    abs.strip_suffix('/').map(str::to_string).unwrap_or(abs)
}

fn split_segments(path: &str) -> Vec<&str> {
    path.split('/').filter(|s| !s.is_empty()).collect()
}

impl Router {
    /// Builds the router from the manifest's triggers; a later duplicate route replaces an earlier one.
    pub fn build(triggers: &[HttpTrigger]) -> Result<Self> {
        let mut routes: Vec<RouteEntry> = Vec::new();
        for t in triggers {
            let Route::Public(raw) = &t.route else {
                continue;
            };
            let based = normalise(raw);
            let (prefix, wildcard) = if let Some(p) = based.strip_suffix("/...") {
                (p.to_string(), true)
            } else if let Some(p) = based.strip_suffix("/*") {
                (p.to_string(), true)
            } else if based == "/..." || raw == "..." {
                (String::new(), true)
            } else {
                (based.clone(), false)
            };
            let mut segments = Vec::new();
            for seg in split_segments(&prefix) {
                if seg == "..." || seg == "*" {
                    bail!("Error parsing route {raw} associated with component {}: wildcards are only allowed at the end", t.component);
                }
                segments.push(match seg.strip_prefix(':') {
                    Some(name) => Segment::Param(name.to_string()),
                    None => Segment::Lit(seg.to_string()),
                });
            }
            let entry = RouteEntry {
                raw: raw.clone(),
                segments,
                wildcard,
                component: t.component.clone(),
            };
            if let Some(existing) = routes.iter_mut().find(|r| r.raw == entry.raw) {
                eprintln!(
                    "warning: route {} of component '{}' duplicates component '{}' and will never be used",
                    existing.raw, existing.component, entry.component
                );
                *existing = entry;
            } else {
                routes.push(entry);
            }
        }
        Ok(Self { routes })
    }

    /// The public routes, in manifest order.
    pub fn routes(&self) -> &[RouteEntry] {
        &self.routes
    }

    /// Finds the best route for `path`, or `None` (→ 404).
    pub fn route(&self, path: &str) -> Option<RouteMatch> {
        let parts = split_segments(path);
        let mut best: Option<(&RouteEntry, Rank, Params)> = None;
        for r in &self.routes {
            if r.wildcard {
                if parts.len() < r.segments.len() {
                    continue;
                }
            } else if parts.len() != r.segments.len() {
                continue;
            }
            let mut params = Vec::new();
            let mut literal = 0;
            let ok = r.segments.iter().zip(&parts).all(|(s, p)| match s {
                Segment::Lit(l) => {
                    literal += 1;
                    l == p
                }
                Segment::Param(name) => {
                    params.push((name.clone(), (*p).to_string()));
                    true
                }
            });
            if !ok {
                continue;
            }
            // Exact beats wildcard; then more segments (longer prefix); then more literal segments.
            let rank = (u8::from(!r.wildcard), r.segments.len(), literal);
            if best.as_ref().is_none_or(|(_, b, _)| rank > *b) {
                best = Some((r, rank, params));
            }
        }
        let (r, _, params) = best?;
        let path_info = if r.wildcard {
            let rest = parts[r.segments.len()..].join("/");
            match (rest.is_empty(), path.ends_with('/')) {
                (true, false) => String::new(),
                (true, true) => "/".to_string(),
                (false, false) => format!("/{rest}"),
                (false, true) => format!("/{rest}/"),
            }
        } else {
            String::new()
        };
        let component_route = r
            .raw
            .strip_suffix("/...")
            .or_else(|| r.raw.strip_suffix("/*"))
            .unwrap_or(&r.raw)
            .to_string();
        Some(RouteMatch {
            component: r.component.clone(),
            raw_route: r.raw.clone(),
            component_route,
            path_info,
            params,
        })
    }
}

impl std::fmt::Display for RouteEntry {
    /// Spin's display form: the prefix, with ` (wildcard)` for trailing wildcards.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut prefix = String::new();
        for s in &self.segments {
            prefix.push('/');
            match s {
                Segment::Lit(l) => prefix.push_str(l),
                Segment::Param(p) => {
                    prefix.push(':');
                    prefix.push_str(p)
                }
            }
        }
        if self.wildcard {
            write!(f, "{prefix} (wildcard)")
        } else if prefix.is_empty() {
            write!(f, "/")
        } else {
            write!(f, "{prefix}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(routes: &[(&str, &str)]) -> Router {
        let triggers: Vec<HttpTrigger> = routes
            .iter()
            .map(|(r, c)| HttpTrigger {
                route: Route::Public(r.to_string()),
                component: c.to_string(),
            })
            .collect();
        Router::build(&triggers).unwrap()
    }

    fn comp(r: &Router, p: &str) -> Option<String> {
        r.route(p).map(|m| m.component)
    }

    #[test]
    fn exact_beats_wildcard_and_longest_prefix_wins() {
        let r = router(&[
            ("/...", "all"),
            ("/one", "one_exact"),
            ("/one/...", "one_wild"),
            ("/one/two/...", "onetwo_wild"),
        ]);
        assert_eq!(comp(&r, "/one").as_deref(), Some("one_exact"));
        assert_eq!(comp(&r, "/one/x").as_deref(), Some("one_wild"));
        assert_eq!(comp(&r, "/one/two/three").as_deref(), Some("onetwo_wild"));
        assert_eq!(comp(&r, "/").as_deref(), Some("all"));
        assert_eq!(comp(&r, "/other").as_deref(), Some("all"));
    }

    #[test]
    fn order_does_not_matter_and_misses_are_none() {
        let r = router(&[("/one/two/...", "deep"), ("/one/...", "shallow")]);
        assert_eq!(comp(&r, "/one/two/x").as_deref(), Some("deep"));
        assert_eq!(comp(&r, "/nope"), None);
        let r = router(&[("/foo", "foo")]);
        assert_eq!(comp(&r, "/foo/bar"), None);
        assert_eq!(comp(&r, "/foo/").as_deref(), Some("foo"));
    }

    #[test]
    fn path_info_and_header_values_like_spin() {
        let r = router(&[("/foo/...", "c"), ("/...", "root")]);
        let m = r.route("/foo/bar").unwrap();
        assert_eq!(m.path_info, "/bar");
        assert_eq!(m.raw_route, "/foo/...");
        assert_eq!(m.component_route, "/foo");
        assert_eq!(r.route("/foo").unwrap().path_info, "");
        assert_eq!(r.route("/foo/").unwrap().path_info, "/");
        assert_eq!(r.route("/foo/a/b/").unwrap().path_info, "/a/b/");
        let root = r.route("/v1/models").unwrap();
        assert_eq!(
            (root.path_info.as_str(), root.component_route.as_str()),
            ("/v1/models", "")
        );
    }

    #[test]
    fn named_params_and_private_routes() {
        let r = router(&[("/users/:id/...", "u")]);
        let m = r.route("/users/42/posts").unwrap();
        assert_eq!(m.params, vec![("id".to_string(), "42".to_string())]);
        assert_eq!(m.path_info, "/posts");
        let triggers = vec![HttpTrigger {
            route: Route::Private,
            component: "hidden".into(),
        }];
        let r = Router::build(&triggers).unwrap();
        assert!(r.routes().is_empty());
        assert_eq!(r.route("/"), None);
    }

    #[test]
    fn display_like_spin() {
        let r = router(&[("/...", "a"), ("/whee/...", "b"), ("/foo", "c")]);
        let shown: Vec<String> = r.routes().iter().map(|e| e.to_string()).collect();
        assert_eq!(shown, vec![" (wildcard)", "/whee (wildcard)", "/foo"]);
    }
}
