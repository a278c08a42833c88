//! Which action a request is: the method and path of a proxied request
//! mapped to an action class, so that the token's scope and the secret
//! injected follow from what the request does, not from what it claims.
//!
//! Overrides (`[[upstreams.routes]]`) are tried in order; the first whose
//! method (or `*`) and path (exact, or a prefix when it ends with `*`) match
//! wins. Otherwise GET and HEAD are `read`, POST, PUT and PATCH `write`,
//! DELETE `delete`; any other method (OPTIONS, TRACE, CONNECT, ...) maps to
//! nothing and is refused.
//!
//! Paths are checked before mapping ([`check_path`]): a dot segment or an
//! encoded slash could make the upstream see another path than the one the
//! mapping and Cedar saw, so such a path is refused.

use http::Method;
use scrip_config::Route;
use scrip_token::ActionName;

/// One compiled override.
#[derive(Debug, Clone)]
struct Rule {
    method: Option<Method>,
    path: String,
    prefix: bool,
    action: ActionName,
}

/// The mapping of one upstream.
#[derive(Debug, Clone)]
pub struct ActionMap {
    rules: Vec<Rule>,
    read: ActionName,
    write: ActionName,
    delete: ActionName,
}

/// Why a path is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// A `.` or `..` segment, plain or percent-encoded.
    #[error("path must not contain `.` or `..` segments")]
    DotSegment,
    /// An encoded `/` or `\`, a backslash, or a control character.
    #[error("path must not contain encoded slashes, backslashes or control characters")]
    Ambiguous,
}

/// Refuses a path the upstream might read differently from scrip.
///
/// # Errors
/// [`PathError`] naming the problem.
pub fn check_path(path: &str) -> Result<(), PathError> {
    if path.bytes().any(|b| b == b'\\' || b.is_ascii_control()) {
        return Err(PathError::Ambiguous);
    }
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || lower.contains("%00") {
        return Err(PathError::Ambiguous);
    }
    for segment in lower.split('/') {
        let decoded = segment.replace("%2e", ".");
        if decoded == "." || decoded == ".." {
            return Err(PathError::DotSegment);
        }
    }
    Ok(())
}

fn action(name: &str) -> Option<ActionName> {
    ActionName::parse(name).ok()
}

impl ActionMap {
    /// Compiles the overrides of one upstream. Route values were checked by
    /// the configuration's validation; a method that does not parse never
    /// matches.
    #[must_use]
    pub fn new(routes: &[Route]) -> Option<Self> {
        let rules = routes
            .iter()
            .map(|r| Rule {
                method: (r.method != "*")
                    .then(|| Method::from_bytes(r.method.as_bytes()).unwrap_or(Method::CONNECT)),
                prefix: r.path.ends_with('*'),
                path: r.path.trim_end_matches('*').to_owned(),
                action: r.action.clone(),
            })
            .collect();
        Some(Self {
            rules,
            read: action("read")?,
            write: action("write")?,
            delete: action("delete")?,
        })
    }

    /// The action of `method path` (path below the upstream, no query), or
    /// `None` when nothing maps it.
    #[must_use]
    pub fn action(&self, method: &Method, path: &str) -> Option<&ActionName> {
        let matched = self.rules.iter().find(|r| {
            r.method.as_ref().is_none_or(|m| m == method)
                && if r.prefix {
                    path.starts_with(&r.path)
                } else {
                    path == r.path
                }
        });
        if let Some(rule) = matched {
            return Some(&rule.action);
        }
        match *method {
            Method::GET | Method::HEAD => Some(&self.read),
            Method::POST | Method::PUT | Method::PATCH => Some(&self.write),
            Method::DELETE => Some(&self.delete),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(method: &str, path: &str, action: &str) -> Route {
        Route {
            method: method.into(),
            path: path.into(),
            action: ActionName::parse(action).unwrap(),
        }
    }

    fn check(routes: &[Route], method: &str, path: &str, expected: Option<&str>) {
        let map = ActionMap::new(routes).unwrap();
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        assert_eq!(
            map.action(&m, path).map(ActionName::as_str),
            expected,
            "{method} {path}"
        );
    }

    #[test]
    fn default_mapping() {
        check(&[], "GET", "/x", Some("read"));
        check(&[], "HEAD", "/x", Some("read"));
        check(&[], "POST", "/x", Some("write"));
        check(&[], "PUT", "/x", Some("write"));
        check(&[], "PATCH", "/x", Some("write"));
        check(&[], "DELETE", "/x", Some("delete"));
        check(&[], "OPTIONS", "/x", None);
        check(&[], "TRACE", "/x", None);
        check(&[], "PROPFIND", "/x", None);
    }

    #[test]
    fn overrides_first_match_wins() {
        let routes = [
            route("POST", "/search*", "read"),
            route("*", "/admin", "delete"),
            route("*", "/admin/*", "delete"),
        ];
        check(&routes, "POST", "/search", Some("read"));
        check(&routes, "POST", "/search/users", Some("read"));
        check(&routes, "PUT", "/search", Some("write"));
        check(&routes, "GET", "/admin", Some("delete"));
        check(&routes, "GET", "/admin/x", Some("delete"));
        check(&routes, "GET", "/administrator", Some("read"));
        check(&routes, "OPTIONS", "/admin", Some("delete"));
    }

    #[test]
    fn paths() {
        let c = |p: &str, want: Result<(), PathError>| assert_eq!(check_path(p), want, "{p}");
        c("/", Ok(()));
        c("/a/b.txt", Ok(()));
        c("/a/..b", Ok(()));
        c("/a/../admin", Err(PathError::DotSegment));
        c("/a/%2e%2E/admin", Err(PathError::DotSegment));
        c("/a/.%2e", Err(PathError::DotSegment));
        c("/./a", Err(PathError::DotSegment));
        c("/..", Err(PathError::DotSegment));
        c("/a%2fb", Err(PathError::Ambiguous));
        c("/a%5Cb", Err(PathError::Ambiguous));
        c("/a\\b", Err(PathError::Ambiguous));
        c("/a%00", Err(PathError::Ambiguous));
    }
}
