//! `[[upstreams]]` and `[proxy]`: the legacy APIs behind scrip's proxy, how
//! their static keys are injected, which action each request is, and where
//! the standalone proxy (`scrip proxy`) listens and whom it trusts.
//!
//! Kept apart from the rest of the configuration because only the proxy
//! reads it; [`crate::Config::validate`] calls [`validate`] with the tools.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;

use scrip_token::{ActionName, ToolName};
use serde::Deserialize;

use crate::{ConfigError, Tool, check_url, invalid};

/// A legacy API behind the proxy, one per tool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// The tool (a configured `[[tools]]` name): the `aud` of the tokens the
    /// proxy accepts for it and the `<upstream>` of `/proxy/<upstream>/...`.
    pub name: ToolName,
    /// The base URL requests are forwarded to (`http` or `https`; no query).
    pub url: String,
    /// How the secret is put into the forwarded request.
    #[serde(default)]
    pub inject: Inject,
    /// Overrides of the method → action mapping, first match wins.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// One secret per action class: `action → how it is kept`.
    pub secrets: BTreeMap<ActionName, SecretSpec>,
    /// Seconds to establish a connection to the upstream.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: u64,
    /// Seconds the upstream may stay silent (before its response head, and
    /// between body chunks) before the request fails.
    #[serde(default = "default_read_timeout")]
    pub read_timeout: u64,
}

fn default_connect_timeout() -> u64 {
    5
}
fn default_read_timeout() -> u64 {
    30
}

/// How the secret is injected: exactly one of `header`, `query`, `basic`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inject {
    /// A header to set (replacing any the agent sent).
    pub header: Option<String>,
    /// The header's value; `{secret}` marks where the secret goes.
    pub template: Option<String>,
    /// A query parameter to set (replacing any the agent sent).
    pub query: Option<String>,
    /// HTTP basic authentication with this user name and the secret as the
    /// password.
    pub basic: Option<String>,
}

impl Default for Inject {
    fn default() -> Self {
        Self {
            header: Some("Authorization".into()),
            template: Some("Bearer {secret}".into()),
            query: None,
            basic: None,
        }
    }
}

/// What [`Inject`] means, once validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Injection {
    /// `name: prefix SECRET suffix`.
    Header {
        /// The header name, lowercase.
        name: String,
        /// Before the secret.
        prefix: String,
        /// After the secret.
        suffix: String,
    },
    /// `?param=SECRET`.
    Query {
        /// The parameter.
        param: String,
    },
    /// `Authorization: Basic base64(user:SECRET)`.
    Basic {
        /// The user name.
        username: String,
    },
}

/// The placeholder in a header template.
pub const SECRET_PLACEHOLDER: &str = "{secret}";

impl Inject {
    /// The injection this describes.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] unless exactly one way is given, well-formed.
    pub fn injection(&self, who: &str) -> Result<Injection, ConfigError> {
        match (&self.header, &self.query, &self.basic) {
            (Some(name), None, None) => {
                let template = self.template.as_deref().unwrap_or(SECRET_PLACEHOLDER);
                let ok_name = !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
                if !ok_name {
                    return invalid(format!(
                        "{who}: inject.header `{name}` is not a header name"
                    ));
                }
                let lower = name.to_ascii_lowercase();
                if HOP_BY_HOP.contains(&lower.as_str()) || lower == "host" {
                    return invalid(format!(
                        "{who}: inject.header `{name}` is a hop-by-hop or routing header"
                    ));
                }
                let Some((prefix, suffix)) = template.split_once(SECRET_PLACEHOLDER) else {
                    return invalid(format!(
                        "{who}: inject.template must contain `{SECRET_PLACEHOLDER}`"
                    ));
                };
                if suffix.contains(SECRET_PLACEHOLDER) {
                    return invalid(format!(
                        "{who}: inject.template must contain `{SECRET_PLACEHOLDER}` once"
                    ));
                }
                if template.bytes().any(|b| b.is_ascii_control()) {
                    return invalid(format!(
                        "{who}: inject.template must not contain control characters"
                    ));
                }
                Ok(Injection::Header {
                    name: lower,
                    prefix: prefix.to_owned(),
                    suffix: suffix.to_owned(),
                })
            }
            (None, Some(param), None) if self.template.is_none() => {
                if param.is_empty() {
                    return invalid(format!("{who}: inject.query must be a parameter name"));
                }
                Ok(Injection::Query {
                    param: param.clone(),
                })
            }
            (None, None, Some(username)) if self.template.is_none() => {
                if username.contains(':') || username.bytes().any(|b| b.is_ascii_control()) {
                    return invalid(format!(
                        "{who}: inject.basic user name must not contain `:` or control characters"
                    ));
                }
                Ok(Injection::Basic {
                    username: username.clone(),
                })
            }
            _ => invalid(format!(
                "{who}: inject needs exactly one of `header` (with an optional `template`), `query` or `basic`"
            )),
        }
    }
}

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1),
/// lowercase.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// An override of the method → action mapping.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// The method (`GET`, `POST`, ...), or `*` for any.
    #[serde(default = "any_method")]
    pub method: String,
    /// The path below the upstream (`/search`, `/v1/*`): exact, or a prefix
    /// when it ends with `*`.
    pub path: String,
    /// The action requests matching it are.
    pub action: ActionName,
}

fn any_method() -> String {
    "*".into()
}

/// How one action's secret is kept.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSpec {
    /// Seconds after which the secret is overdue for rotation.
    #[serde(default = "default_max_age")]
    pub max_age: u64,
    /// Seconds the previous version stays stored (and accepted by the
    /// upstream, by convention) after a rotation.
    #[serde(default = "default_grace")]
    pub grace: u64,
    /// A command (argv, no shell) that mints a new value at the provider and
    /// prints it on standard output: what `scrip secret rotate` runs.
    #[serde(default)]
    pub mint_command: Vec<String>,
}

fn default_max_age() -> u64 {
    30 * 24 * 3600
}
fn default_grace() -> u64 {
    3600
}

/// The standalone proxy (`scrip proxy`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySettings {
    /// Where `scrip proxy` listens.
    pub listen: SocketAddr,
    /// The scrip whose access tokens it accepts (its issuer URL, discovered
    /// through RFC 8414 metadata). Defaults to the configuration's issuer.
    pub issuer: Option<String>,
    /// A file holding the proxy's own workload identity JWT, presented to
    /// scrip's revocation feed; read before every poll.
    pub identity_file: Option<PathBuf>,
    /// How old, in seconds, the revocations the proxy knows may be (as of
    /// when it last asked the feed) before every token is refused.
    pub max_staleness: u64,
    /// The URL agents reach `scrip proxy` at (`https://proxy.example`): a
    /// DPoP proof's `htu` is this URL followed by `/proxy/<upstream>/...`.
    /// Without it, DPoP-bound tokens are refused.
    pub public_url: Option<String>,
    /// Where `scrip proxy` serves `/metrics` (the top-level
    /// `metrics_listen` is `scrip serve`'s, so both may share one file).
    /// Unset: no `/metrics`.
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7071)),
            issuer: None,
            identity_file: None,
            max_staleness: 60,
            public_url: None,
            metrics_listen: None,
        }
    }
}

impl Upstream {
    fn validate(&self, tools: &[Tool]) -> Result<(), ConfigError> {
        let who = format!("upstream `{}`", self.name);
        let Some(tool) = tools.iter().find(|t| t.name == self.name) else {
            return invalid(format!(
                "{who} is not a configured tool; add a [[tools]] entry named `{}`",
                self.name
            ));
        };
        check_url(&format!("{who} url"), &self.url, true)?;
        if !self.url.starts_with("http://") && !self.url.starts_with("https://") {
            return invalid(format!("{who} url must be http or https"));
        }
        self.inject.injection(&who)?;
        let tool_has = |a: &ActionName| tool.actions.contains(a);
        if self.secrets.is_empty() {
            return invalid(format!(
                "{who} needs at least one secret ([upstreams.secrets.<action>])"
            ));
        }
        for (action, spec) in &self.secrets {
            if !tool_has(action) {
                return invalid(format!(
                    "{who} has a secret for `{action}`, which is not an action of tool `{}`",
                    self.name
                ));
            }
            if spec.max_age == 0 {
                return invalid(format!("{who} secret `{action}`: max_age must be positive"));
            }
            if spec.mint_command.first().is_some_and(String::is_empty) {
                return invalid(format!(
                    "{who} secret `{action}`: mint_command's program is empty"
                ));
            }
        }
        for route in &self.routes {
            let method_ok = route.method == "*"
                || (!route.method.is_empty()
                    && route.method.bytes().all(|b| b.is_ascii_uppercase()));
            if !method_ok {
                return invalid(format!(
                    "{who} route method `{}` must be an uppercase method or `*`",
                    route.method
                ));
            }
            let star = route.path.find('*');
            if !route.path.starts_with('/')
                || star.is_some_and(|i| i + 1 != route.path.len())
                || route.path.contains('?')
            {
                return invalid(format!(
                    "{who} route path `{}` must start with `/` and may only end with `*`",
                    route.path
                ));
            }
            if !tool_has(&route.action) {
                return invalid(format!(
                    "{who} route `{} {}` maps to `{}`, which is not an action of tool `{}`",
                    route.method, route.path, route.action, self.name
                ));
            }
        }
        if self.connect_timeout == 0 || self.read_timeout == 0 {
            return invalid(format!(
                "{who}: connect_timeout and read_timeout must be positive"
            ));
        }
        Ok(())
    }
}

/// Checks the upstreams against the tools, and the proxy settings.
///
/// # Errors
/// [`ConfigError::Invalid`] naming the first problem.
pub fn validate(
    upstreams: &[Upstream],
    proxy: &ProxySettings,
    tools: &[Tool],
) -> Result<(), ConfigError> {
    let mut names = HashSet::new();
    for u in upstreams {
        u.validate(tools)?;
        if !names.insert(u.name.as_str()) {
            return invalid(format!("upstream `{}` is listed twice", u.name));
        }
    }
    if let Some(issuer) = &proxy.issuer {
        check_url("proxy.issuer", issuer, true)?;
    }
    if let Some(u) = &proxy.public_url {
        let rest = u
            .strip_prefix("https://")
            .or_else(|| u.strip_prefix("http://"))
            .unwrap_or("");
        if rest.is_empty() || u.ends_with('/') || u.contains(['?', '#', '@']) {
            return invalid(
                "proxy.public_url must be an http(s) URL such as `https://proxy.example`, without a final `/`, query or credentials",
            );
        }
    }
    // The proxy long-polls the feed for at least a second; an answer shows
    // the revocations as of when it was asked for, and the next comes a
    // poll later: twice the poll must fit, with room for two round trips
    // (at 5 s, polls of 1 s leave 1.5 s to each).
    if proxy.max_staleness < 5 {
        return invalid("proxy.max_staleness must be at least 5 seconds");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::Config;

    fn check(toml: &str, expected_error: Option<&str>) {
        let base = "[[tools]]\nname = \"legacy\"\nresource = \"https://legacy.example\"\nactions = [\"read\", \"write\"]\n";
        let text = format!("{base}{toml}");
        let result = Config::from_toml(&text).and_then(|c| c.validate().map_err(|e| e.to_string()));
        match (result, expected_error) {
            (Ok(()), None) => {}
            (Err(e), Some(want)) => assert!(e.contains(want), "{e:?} does not contain {want:?}"),
            (got, want) => panic!("for {toml:?}: got {got:?}, want error {want:?}"),
        }
    }

    const OK: &str = "[[upstreams]]\nname = \"legacy\"\nurl = \"http://127.0.0.1:8080\"\n[upstreams.secrets.read]\n";

    #[test]
    fn upstreams() {
        check(OK, None);
        check(
            &format!(
                "{OK}[upstreams.secrets.write]\nmax_age = 86400\ngrace = 60\nmint_command = [\"/bin/mint\", \"write\"]\n"
            ),
            None,
        );
        check(
            "[[upstreams]]\nname = \"other\"\nurl = \"http://127.0.0.1:8080\"\n[upstreams.secrets.read]\n",
            Some("upstream `other` is not a configured tool"),
        );
        check(
            "[[upstreams]]\nname = \"legacy\"\nurl = \"http://example.com\"\n[upstreams.secrets.read]\n",
            Some("https"),
        );
        check(
            "[[upstreams]]\nname = \"legacy\"\nurl = \"http://127.0.0.1:1/?a=b\"\n[upstreams.secrets.read]\n",
            Some("query"),
        );
        // A key put in the URL, the natural mistake with a legacy API, is
        // never repeated in the error.
        for (url, want) in [
            ("https://legacy.example/api?api_key=SECRET", "query"),
            ("https://svc:SECRET@legacy.example/api?fmt=json", "query"),
            ("https://svc:SECRET@legacy.example/api", "credentials"),
            ("legacy.example/api?api_key=SECRET", "not an absolute URL"),
            ("https://legacy.example/api#SECRET", "fragment"),
        ] {
            let toml = format!(
                "[[tools]]\nname = \"legacy\"\nresource = \"https://legacy.example\"\nactions = [\"read\"]\n[[upstreams]]\nname = \"legacy\"\nurl = \"{url}\"\n[upstreams.secrets.read]\n"
            );
            let e = crate::Config::from_toml(&toml)
                .and_then(|c| c.validate().map_err(|e| e.to_string()))
                .unwrap_err();
            assert!(e.contains(want) && e.contains("legacy"), "{url}: {e}");
            assert!(!e.contains("SECRET"), "{e}");
        }
        check(
            "[[upstreams]]\nname = \"legacy\"\nurl = \"http://127.0.0.1:1\"\n",
            Some("missing field `secrets`"),
        );
        check(
            "[[upstreams]]\nname = \"legacy\"\nurl = \"http://127.0.0.1:1\"\nsecrets = {}\n",
            Some("at least one secret"),
        );
        check(
            &format!("{OK}[upstreams.secrets.delete]\n"),
            Some("secret for `delete`, which is not an action"),
        );
        check(
            &format!("{OK}[upstreams.secrets.write]\nmax_age = 0\n"),
            Some("max_age must be positive"),
        );
        check(
            &format!("{OK}[upstreams.secrets.write]\nmint_command = [\"\"]\n"),
            Some("mint_command's program is empty"),
        );
        check(
            &format!("{OK}[upstreams.secrets.write]\nvalue = \"x\"\n"),
            Some("unknown field `value`"),
        );
        check(
            &format!(
                "{OK}[[upstreams]]\nname = \"legacy\"\nurl = \"http://127.0.0.1:1\"\n[upstreams.secrets.read]\n"
            ),
            Some("listed twice"),
        );
        check(
            "[[upstreams]]\nname = \"legacy\"\nurl = \"http://127.0.0.1:1\"\nconnect_timeout = 0\n[upstreams.secrets.read]\n",
            Some("must be positive"),
        );
    }

    #[test]
    fn injection() {
        let with = |inject: &str| {
            format!(
                "[[upstreams]]\nname = \"legacy\"\nurl = \"http://127.0.0.1:1\"\ninject = {inject}\n[upstreams.secrets.read]\n"
            )
        };
        check(&with("{ header = \"X-Api-Key\" }"), None);
        check(
            &with("{ header = \"Authorization\", template = \"Token {secret}\" }"),
            None,
        );
        check(&with("{ query = \"api_key\" }"), None);
        check(&with("{ basic = \"svc\" }"), None);
        check(&with("{}"), Some("exactly one of"));
        check(
            &with("{ header = \"A\", query = \"b\" }"),
            Some("exactly one of"),
        );
        check(
            &with("{ query = \"k\", template = \"{secret}\" }"),
            Some("exactly one of"),
        );
        check(
            &with("{ header = \"X Key\" }"),
            Some("is not a header name"),
        );
        check(&with("{ header = \"Connection\" }"), Some("hop-by-hop"));
        check(&with("{ header = \"Host\" }"), Some("hop-by-hop"));
        check(
            &with("{ header = \"A\", template = \"Bearer\" }"),
            Some("must contain `{secret}`"),
        );
        check(
            &with("{ header = \"A\", template = \"{secret}{secret}\" }"),
            Some("once"),
        );
        check(&with("{ basic = \"a:b\" }"), Some("must not contain `:`"));
    }

    #[test]
    fn routes() {
        let with = |route: &str| {
            format!(
                "[[upstreams]]\nname = \"legacy\"\nurl = \"http://127.0.0.1:1\"\n[[upstreams.routes]]\n{route}\n[upstreams.secrets.read]\n"
            )
        };
        check(
            &with("method = \"POST\"\npath = \"/search*\"\naction = \"read\""),
            None,
        );
        check(&with("path = \"/graphql\"\naction = \"write\""), None);
        check(
            &with("method = \"post\"\npath = \"/a\"\naction = \"read\""),
            Some("uppercase method"),
        );
        check(
            &with("path = \"a\"\naction = \"read\""),
            Some("must start with `/`"),
        );
        check(
            &with("path = \"/a*/b\"\naction = \"read\""),
            Some("may only end with `*`"),
        );
        check(
            &with("path = \"/a\"\naction = \"delete\""),
            Some("maps to `delete`"),
        );
        check("[proxy]\nmax_staleness = 0\n", Some("max_staleness"));
        check("[proxy]\nmax_staleness = 4\n", Some("at least 5"));
        check("[proxy]\nmax_staleness = 5\n", None);
        check(
            "[proxy]\npublic_url = \"https://p.example/\"\n",
            Some("public_url"),
        );
        check("[proxy]\npublic_url = \"p.example\"\n", Some("public_url"));
        check("[proxy]\npublic_url = \"https://p.example\"\n", None);
        check(
            "[proxy]\nissuer = \"http://scrip.example\"\n",
            Some("https"),
        );
        check(
            "[proxy]\nlisten = \"127.0.0.1:9000\"\nidentity_file = \"id.jwt\"\n",
            None,
        );
    }
}
