//! scrip's configuration: one TOML file, every key with a default, checked
//! whole before anything starts.
//!
//! Relative paths in a configuration file are resolved against the file's own
//! directory; without a file they are relative to the working directory.
//!
//! Architecture invariant: a [`Config`] value has passed [`Config::validate`];
//! the rest of scrip never re-checks what is checked here (unique tool names,
//! an asymmetric algorithm allow-list per issuer, ttl ordering, ...).

pub mod trust;
mod upstream;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use scrip_jose::SigningAlgorithm;
use scrip_token::{ActionName, ToolName};
use serde::Deserialize;

pub use upstream::{
    HOP_BY_HOP, Inject, Injection, ProxySettings, Route, SECRET_PLACEHOLDER, SecretSpec, Upstream,
};

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration `{path}`: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for scrip.
    #[error("configuration `{path}` is invalid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A value is out of range or inconsistent with another.
    #[error("configuration is invalid: {0}")]
    Invalid(String),
}

fn invalid<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid(msg.into()))
}

/// How long a local workload identity (scrip's own attestation) lives, in
/// seconds.
pub const LOCAL_IDENTITY_TTL: u64 = 300;

/// The longest `approval_ttl` accepted, in seconds: a day.
pub const MAX_APPROVAL_TTL: u64 = 86_400;

/// The longest `access_token_ttl` accepted, in seconds.
pub const MAX_ACCESS_TOKEN_TTL: u64 = 3600;

/// The longest `max_task_ttl` accepted, in seconds (30 days).
pub const MAX_TASK_TTL: u64 = 30 * 86_400;

/// A year, in seconds: the longest key rotation period accepted.
const ONE_YEAR: u64 = 365 * 86_400;

/// The largest `max_delegation_depth` accepted: each level nests one more
/// `act` claim in every token below it (a delegation whose token would
/// grow past what verifiers take is refused, whatever its depth).
pub const MAX_DELEGATION_DEPTH: u32 = 16;

/// The longest `approved_token_ttl` accepted, in seconds.
pub const MAX_APPROVED_TOKEN_TTL: u64 = 300;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the HTTP API.
    pub listen: SocketAddr,
    /// Seconds a client has to send a request head, counted from when its
    /// connection is ready for one (so also the idle time between requests).
    pub http_header_timeout: u64,
    /// The `iss` of every token scrip signs. Defaults to `http://<listen>`.
    pub issuer: Option<String>,
    /// Embedded store, keys and local socket.
    pub data_dir: PathBuf,
    /// `*.cedar` policies and the Cedar schema.
    pub policy_dir: PathBuf,
    /// A shared store for several replicas (PostgreSQL).
    pub database_url: Option<String>,
    /// The algorithm of scrip's signing key.
    pub signing_algorithm: SigningAlgorithm,
    /// Default task lifetime, seconds.
    pub task_ttl: u64,
    /// Longest task lifetime a client may ask for, seconds.
    pub max_task_ttl: u64,
    /// Access token lifetime, seconds (never past the task's end).
    pub access_token_ttl: u64,
    /// Clock leeway when checking `exp`, `nbf` and `iat`, seconds.
    pub clock_skew: u64,
    /// Deepest delegation chain.
    pub max_delegation_depth: u32,
    /// The environments a task may name: an agent claims its task's
    /// environment, so a name outside this list (`production`, `Prod`)
    /// cannot slip past a policy written for `prod`.
    pub environments: Vec<String>,
    /// Seconds between checks of `policy_dir` for changes (0: only SIGHUP).
    pub policy_poll_interval: u64,
    /// The signing grace of `scrip audit verify`, in seconds: a record no
    /// signature covers is reported once older than two of these and a
    /// minute. (scrip signs each commit's records as it writes them;
    /// earlier versions signed every this many seconds.)
    pub audit_checkpoint_interval: u64,
    /// Federated workload identity issuers.
    pub trusted_issuers: Vec<TrustedIssuer>,
    /// Tools agents may get tokens for.
    pub tools: Vec<Tool>,
    /// People who may approve steps that policy allows only with approval.
    pub approvers: Vec<Approver>,
    /// Seconds a pending approval waits for a decision.
    pub approval_ttl: u64,
    /// Least seconds between two polls of one approval (`slow_down` below).
    pub approval_poll_interval: u64,
    /// Lifetime of the single-use token of an approved step, seconds.
    pub approved_token_ttl: u64,
    /// Whether nobody may approve a step of a task they started or act in.
    pub separation_of_duties: bool,
    /// Called (JSON POST, with retries) when an approval is pending.
    pub approval_webhook: Option<String>,
    /// The local attestation socket. Defaults to `<data_dir>/scrip.sock`.
    pub socket: Option<PathBuf>,
    /// The socket's file mode (default `0o600`: only scrip's own user).
    pub socket_mode: u32,
    /// Local processes that may obtain a workload identity on the socket.
    pub local_workloads: Vec<LocalWorkload>,
    /// With `database_url`: the file holding the key-encryption key that
    /// seals the shared signing keys in the store (default
    /// `<data_dir>/keys/key-encryption.key`; `SCRIP_KEY_ENCRYPTION_KEY`
    /// overrides it). Every replica needs the same key.
    pub key_encryption_key_file: Option<PathBuf>,
    /// While the key-encryption key is replaced: the file holding the key
    /// it replaces, which opens what the store still holds sealed under it
    /// (`SCRIP_PREVIOUS_KEY_ENCRYPTION_KEY` overrides it) until `scrip key
    /// reseal` has sealed all of it again under the new key. No default.
    pub previous_key_encryption_key_file: Option<PathBuf>,
    /// With `database_url`: seconds a shared signing key signs before the
    /// next one takes over (0: never rotate).
    pub signing_key_rotation: u64,
    /// With `database_url`: seconds a new signing key is published before
    /// any replica signs with it.
    pub signing_key_lead: u64,
    /// Legacy APIs behind the proxy, with their static keys.
    pub upstreams: Vec<Upstream>,
    /// The standalone proxy (`scrip proxy`).
    pub proxy: ProxySettings,
    /// Where `scrip serve` with `[[upstreams]]` serves the proxy's
    /// `/metrics` (`scrip proxy` at `[proxy] metrics_listen`): an address
    /// of its own, kept off the API, since it names the tools behind the
    /// proxy and the age of each of their keys. Unset: no `/metrics`.
    pub metrics_listen: Option<SocketAddr>,
    /// How much one workload identity may ask of one replica (`[limits]`).
    pub limits: Limits,
}

/// The most a `[limits]` rate may be, a minute: a million a second.
pub const MAX_PER_MINUTE: u64 = 60_000_000;

/// The most a `[limits]` burst may be.
pub const MAX_BURST: u64 = 1_000_000;

/// `[limits]`: how fast one workload identity may ask one replica for tasks
/// and access tokens, so that one agent (a runaway loop, a stolen identity,
/// any workflow of an issuer trusted too widely) cannot take the token
/// service, its store and its audit trail from the rest. Each is a rate
/// with a burst: `burst` requests at once, then one every minute's
/// `per_minute`th part (the generic cell rate algorithm, as a token bucket
/// of `burst` refilled at the rate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Task starts and delegations a minute, charged to the identity that
    /// asks: the agent for a task start, the parent task's holder (its
    /// current sub-agent, else its agent) for a delegation.
    pub tasks_per_minute: u64,
    /// Task starts and delegations at once.
    pub task_burst: u64,
    /// Access tokens (token exchanges of a task token) a minute, charged to
    /// the task token's holder: its current sub-agent, else its agent.
    pub access_tokens_per_minute: u64,
    /// Access tokens at once.
    pub access_token_burst: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            tasks_per_minute: 600,
            task_burst: 100,
            access_tokens_per_minute: 30_000,
            access_token_burst: 1_000,
        }
    }
}

impl Limits {
    fn validate(&self) -> Result<(), ConfigError> {
        for (name, value, most) in [
            ("tasks_per_minute", self.tasks_per_minute, MAX_PER_MINUTE),
            ("task_burst", self.task_burst, MAX_BURST),
            (
                "access_tokens_per_minute",
                self.access_tokens_per_minute,
                MAX_PER_MINUTE,
            ),
            ("access_token_burst", self.access_token_burst, MAX_BURST),
        ] {
            if !(1..=most).contains(&value) {
                return invalid(format!("limits.{name} must be 1 to {most}"));
            }
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            http_header_timeout: 30,
            issuer: None,
            data_dir: PathBuf::from(".scrip"),
            policy_dir: PathBuf::from("policies"),
            database_url: None,
            signing_algorithm: SigningAlgorithm::ES256,
            task_ttl: 3600,
            max_task_ttl: 8 * 3600,
            access_token_ttl: 300,
            clock_skew: 30,
            max_delegation_depth: 3,
            environments: vec!["dev".into(), "staging".into(), "prod".into()],
            policy_poll_interval: 2,
            audit_checkpoint_interval: 5,
            trusted_issuers: Vec::new(),
            tools: Vec::new(),
            approvers: Vec::new(),
            approval_ttl: 600,
            approval_poll_interval: 2,
            approved_token_ttl: 60,
            separation_of_duties: true,
            approval_webhook: None,
            socket: None,
            socket_mode: 0o600,
            local_workloads: Vec::new(),
            key_encryption_key_file: None,
            previous_key_encryption_key_file: None,
            signing_key_rotation: 30 * 24 * 3600,
            signing_key_lead: 60,
            upstreams: Vec::new(),
            proxy: ProxySettings::default(),
            metrics_listen: None,
            limits: Limits::default(),
        }
    }
}

/// A local workload: the processes that match every selector given receive
/// a workload identity named `local:<name>` on the attestation socket.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalWorkload {
    /// The workload's name (`sub` = `local:<name>`).
    pub name: String,
    /// The process's user id.
    pub uid: Option<u32>,
    /// The process's group id.
    pub gid: Option<u32>,
    /// The absolute path of the process's executable.
    pub exe: Option<PathBuf>,
    /// The SHA-256 of the executable, 64 lowercase hex digits.
    pub exe_sha256: Option<String>,
}

impl LocalWorkload {
    fn validate(&self) -> Result<(), ConfigError> {
        let who = format!("local workload `{}`", self.name);
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !name_ok {
            return invalid(format!("{who}: a name is 1-64 of `A-Z a-z 0-9 - _ .`"));
        }
        if self.uid.is_none()
            && self.gid.is_none()
            && self.exe.is_none()
            && self.exe_sha256.is_none()
        {
            return invalid(format!(
                "{who} needs at least one selector: uid, gid, exe or exe_sha256"
            ));
        }
        if let Some(exe) = &self.exe
            && !exe.is_absolute()
        {
            return invalid(format!(
                "{who}: exe `{}` must be an absolute path",
                exe.display()
            ));
        }
        if let Some(h) = &self.exe_sha256
            && (h.len() != 64 || !h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        {
            return invalid(format!(
                "{who}: exe_sha256 must be 64 lowercase hex digits (as `sha256sum` prints)"
            ));
        }
        Ok(())
    }
}

/// A federated identity issuer whose JWTs are accepted as workload identities.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedIssuer {
    /// The exact `iss`.
    pub issuer: String,
    /// Where its JWKS is fetched from.
    pub jwks_uri: Option<String>,
    /// Or a local JWKS file.
    pub jwks_file: Option<PathBuf>,
    /// `aud` must contain one of these.
    pub audiences: Vec<String>,
    /// The `alg` allow-list (asymmetric algorithms only).
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// Accepted `typ` headers, besides none at all when `allow_untyped`.
    #[serde(default = "default_token_types")]
    pub token_types: Vec<String>,
    /// Whether a token without `typ` is accepted.
    #[serde(default = "yes")]
    pub allow_untyped: bool,
    /// Seconds between JWKS refreshes.
    #[serde(default = "default_jwks_refresh")]
    pub jwks_refresh: u64,
    /// How long a cached JWKS is still used while the issuer is unreachable.
    #[serde(default = "default_jwks_max_stale")]
    pub jwks_max_stale: u64,
    /// Least seconds between fetches triggered by an unknown `kid`.
    #[serde(default = "default_jwks_min_refetch")]
    pub jwks_min_refetch: u64,
    /// What the issuer is. Set, its identities are of this kind whatever
    /// their claims look like, and draw only this kind's attributes; unset,
    /// the claims' shape decides, so another trusted issuer's tokens could
    /// carry the attributes policies test (a `namespace`, a `repository`).
    #[serde(default)]
    pub kind: Option<IssuerKind>,
    /// Required with `kind = "spiffe"`: the one trust domain the issuer's keys speak
    /// for; an SVID of another trust domain is refused.
    #[serde(default)]
    pub trust_domain: Option<String>,
    /// Claims each of the issuer's identities must carry, each with one of
    /// the values listed (a string, or a number or boolean as written).
    /// Where anyone may obtain a token for the audience (GitHub Actions:
    /// any repository's workflow chooses its own `aud`), these say whose
    /// tokens are trusted at all (`repository_owner_id = ["123"]`).
    #[serde(default)]
    pub required_claims: BTreeMap<String, Vec<String>>,
}

/// GitHub Actions' OIDC issuer.
pub const GITHUB_ACTIONS_ISSUER: &str = "https://token.actions.githubusercontent.com";

/// Issuers where anyone (any project, pipeline, workspace or account on the
/// platform) can obtain a token for an audience of their choosing, with
/// the claim that names whose it is: trusted without `required_claims`,
/// each lets the whole platform in as trusted workloads.
pub const MULTI_TENANT_ISSUERS: &[(&str, &str)] = &[
    (GITHUB_ACTIONS_ISSUER, "repository_owner_id"),
    ("https://gitlab.com", "namespace_id"),
    ("https://agent.buildkite.com", "organization_id"),
    ("https://app.terraform.io", "terraform_organization_id"),
    ("https://accounts.google.com", "email"),
];

/// The kinds of federated issuer, as Cedar names their identities' `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IssuerKind {
    /// A Kubernetes cluster's service-account token issuer.
    Kubernetes,
    /// GitHub Actions' OIDC issuer.
    GithubActions,
    /// A SPIFFE JWT-SVID issuer.
    Spiffe,
    /// Any other issuer: its identities get no well-known attributes.
    Jwt,
}

impl IssuerKind {
    /// The kind of the identities such an issuer vouches for.
    #[must_use]
    pub fn identity_kind(self) -> scrip_token::IdentityKind {
        use scrip_token::IdentityKind;
        match self {
            Self::Kubernetes => IdentityKind::Kubernetes,
            Self::GithubActions => IdentityKind::GithubActions,
            Self::Spiffe => IdentityKind::Spiffe,
            Self::Jwt => IdentityKind::Generic,
        }
    }
}

fn default_algorithms() -> Vec<String> {
    vec!["RS256".into(), "ES256".into()]
}
fn default_token_types() -> Vec<String> {
    vec!["JWT".into()]
}
fn yes() -> bool {
    true
}
fn default_jwks_refresh() -> u64 {
    300
}
fn default_jwks_max_stale() -> u64 {
    3600
}
fn default_jwks_min_refetch() -> u64 {
    10
}

/// The file name of the local attestation socket in `data_dir`.
pub const DEFAULT_SOCKET_NAME: &str = "scrip.sock";

/// The asymmetric algorithms a trusted issuer may use.
pub const IDENTITY_ALGORITHMS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];

/// A person who may approve steps: matched by the identity they present
/// (`issuer` + `subject` of a trusted issuer's token), or by the uid of a
/// process attested over the local socket.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approver {
    /// The person's name, recorded in audit records and tokens.
    pub name: String,
    /// The issuer of their identity token.
    pub issuer: Option<String>,
    /// Its subject.
    pub subject: Option<String>,
    /// Or: their local user id.
    pub uid: Option<u32>,
}

/// A tool agents may get access tokens for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tool {
    /// The tool's name: the `aud` of its access tokens.
    pub name: ToolName,
    /// The tool's URI, accepted as the RFC 8707 `resource`.
    pub resource: String,
    /// The actions agents may ask for.
    pub actions: Vec<ActionName>,
    /// Free-form labels, visible to Cedar as the tool's tags.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The workload identities of the tool's resource servers: when any
    /// are listed, introspection answers the tool's access tokens active to
    /// them only (RFC 7662 §4), and `{"active":false}` to anyone else.
    #[serde(default)]
    pub introspectors: Vec<Introspector>,
}

/// A resource server, by the workload identity it introspects with.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Introspector {
    /// The exact `iss` of its identity.
    pub issuer: String,
    /// The exact `sub` of its identity.
    pub subject: String,
}

impl Config {
    /// Reads and validates a configuration file, or the defaults when `path`
    /// is `None`.
    ///
    /// # Errors
    /// [`ConfigError`] when the file cannot be read or parsed or is invalid.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else {
            let config = Self::default();
            config.validate()?;
            return Ok(config);
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        config.resolve_paths(base);
        // Named by its file, whichever way it was found (`--config`,
        // `SCRIP_CONFIG`).
        config.validate().map_err(|e| match e {
            ConfigError::Invalid(message) => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Parses TOML text (no validation, paths unresolved).
    ///
    /// # Errors
    /// The parser's message.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.message().to_owned() + &location(text, e.span()))
    }

    fn resolve_paths(&mut self, base: &Path) {
        let join = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        join(&mut self.data_dir);
        join(&mut self.policy_dir);
        if let Some(socket) = self.socket.as_mut() {
            join(socket);
        }
        if let Some(kek) = self.key_encryption_key_file.as_mut() {
            join(kek);
        }
        if let Some(kek) = self.previous_key_encryption_key_file.as_mut() {
            join(kek);
        }
        for ti in &mut self.trusted_issuers {
            if let Some(f) = ti.jwks_file.as_mut() {
                join(f);
            }
        }
        if let Some(f) = self.proxy.identity_file.as_mut() {
            join(f);
        }
        // A mint command's program named by a relative path (`./mint.sh`,
        // `bin/mint`) is the configuration's, not whatever the current
        // directory of `scrip secret rotate` holds; a bare name is looked
        // up in PATH, as the shell would.
        for upstream in &mut self.upstreams {
            for spec in upstream.secrets.values_mut() {
                if let Some(program) = spec.mint_command.first_mut()
                    && program.contains('/')
                    && Path::new(program.as_str()).is_relative()
                {
                    *program = base.join(program.as_str()).to_string_lossy().into_owned();
                }
            }
        }
    }

    /// The issuer: the configured one, else `http://<listen>`.
    #[must_use]
    pub fn issuer(&self) -> String {
        self.issuer
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.listen))
    }

    /// The local attestation socket: `socket`, else `<data_dir>/scrip.sock`.
    #[must_use]
    pub fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join(DEFAULT_SOCKET_NAME))
    }

    /// The key-encryption key file: `key_encryption_key_file`, else
    /// `<data_dir>/keys/key-encryption.key`.
    #[must_use]
    pub fn key_encryption_key_path(&self) -> PathBuf {
        self.key_encryption_key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("keys/key-encryption.key"))
    }

    /// The longest any token scrip signs can live, with the clock leeway
    /// verifiers allow: how long a retired signing key stays published.
    /// Local workload identities count too: scrip signs them with the same
    /// key.
    #[must_use]
    pub fn longest_token_life(&self) -> u64 {
        self.max_task_ttl
            .max(self.access_token_ttl)
            .max(self.approved_token_ttl)
            .max(LOCAL_IDENTITY_TTL)
            .saturating_add(self.clock_skew)
    }

    /// The issuer of local workload identities: `<issuer>/local`.
    #[must_use]
    pub fn local_issuer(&self) -> String {
        format!("{}/local", self.issuer())
    }

    /// Whether `database_url` holds a password (in its user info, or a
    /// `password` parameter).
    #[must_use]
    pub fn holds_database_password(&self) -> bool {
        self.database_url
            .as_deref()
            .and_then(|u| url::Url::parse(u).ok())
            .is_some_and(|u| {
                u.password().is_some()
                    || u.query_pairs()
                        .any(|(k, v)| k.eq_ignore_ascii_case("password") && !v.is_empty())
            })
    }

    /// Whether `approval_webhook` may carry its receiver's secret: a URL
    /// with user info, a path other than `/`, or a query.
    #[must_use]
    pub fn webhook_may_hold_secret(&self) -> bool {
        self.approval_webhook
            .as_deref()
            .and_then(|u| url::Url::parse(u).ok())
            .is_some_and(|u| {
                !u.username().is_empty()
                    || u.password().is_some()
                    || u.path() != "/"
                    || u.query().is_some()
            })
    }

    /// The tool with this name.
    #[must_use]
    pub fn tool(&self, name: &str) -> Option<&Tool> {
        self.tools.iter().find(|t| t.name.as_str() == name)
    }

    /// The upstream with this name.
    #[must_use]
    pub fn upstream(&self, name: &str) -> Option<&Upstream> {
        self.upstreams.iter().find(|u| u.name.as_str() == name)
    }

    /// The tool with this resource URI: the one whose `resource` is this
    /// very string or, failing that, one whose `resource` is the same URI
    /// spelt otherwise (see [`resource_key`]).
    #[must_use]
    pub fn tool_by_resource(&self, resource: &str) -> Option<&Tool> {
        if let Some(tool) = self.tools.iter().find(|t| t.resource == resource) {
            return Some(tool);
        }
        let key = resource_key(resource)?;
        self.tools
            .iter()
            .find(|t| resource_key(&t.resource).as_deref() == Some(key.as_str()))
    }

    /// What this configuration sends in clear text off the host, for the
    /// start to warn about. `scrip serve` listening beyond loopback while
    /// the issuer is `http`: tokens cross the network unencrypted unless
    /// TLS is put in front, which scrip cannot see. With `proxy`, `scrip
    /// proxy` listening beyond loopback while the URL agents reach it at
    /// (`[proxy] public_url`) is not `https`, or is not given.
    #[must_use]
    pub fn cleartext_warnings(&self, proxy: bool) -> Vec<String> {
        let http = |url: &str| {
            url.get(..7)
                .is_some_and(|s| s.eq_ignore_ascii_case("http://"))
        };
        if proxy {
            let listen = self.proxy.listen;
            if listen.ip().is_loopback()
                || self.proxy.public_url.as_deref().is_some_and(|u| !http(u))
            {
                return Vec::new();
            }
            let said = self.proxy.public_url.as_deref().map_or_else(
                || " is not given".to_owned(),
                |u| format!("{} is http", shown_url(u)),
            );
            return vec![format!(
                "[proxy] listening on {listen}, beyond this host, and [proxy] public_url{said}: agents' tokens reach the proxy in clear text unless TLS is put in front; give an https public_url"
            )];
        }
        let issuer = self.issuer();
        if http(&issuer) && !self.listen.ip().is_loopback() {
            return vec![format!(
                "listening on {}, beyond this host, while the issuer{} is http: tokens cross the network in clear text unless TLS is put in front; give an https issuer",
                self.listen,
                shown_url(&issuer)
            )];
        }
        Vec::new()
    }

    /// Checks every value and every relation between values.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let issuer = self.issuer();
        check_url("issuer", &issuer, true)?;
        if issuer.ends_with('/') {
            return invalid(format!("issuer `{issuer}` must not end with `/`"));
        }
        if self.task_ttl == 0 || self.access_token_ttl == 0 {
            return invalid("task_ttl and access_token_ttl must be positive");
        }
        if self.task_ttl > self.max_task_ttl {
            return invalid("task_ttl must not exceed max_task_ttl");
        }
        if self.max_task_ttl > MAX_TASK_TTL {
            return invalid(format!(
                "max_task_ttl must be at most {MAX_TASK_TTL} seconds (30 days): a task is one piece of work"
            ));
        }
        // Access tokens live minutes (SPEC): one that leaks is good for
        // no longer, however its holder is verified.
        if self.access_token_ttl > MAX_ACCESS_TOKEN_TTL {
            return invalid(format!(
                "access_token_ttl must be at most {MAX_ACCESS_TOKEN_TTL} seconds: access tokens live minutes"
            ));
        }
        if self.max_delegation_depth > MAX_DELEGATION_DEPTH {
            return invalid(format!(
                "max_delegation_depth must be at most {MAX_DELEGATION_DEPTH}: each level nests one more `act` claim in every token below it"
            ));
        }
        // Records no signature covers are reported once two intervals and a
        // minute old: a long interval would keep that check from ever
        // reporting.
        if !(1..=3600).contains(&self.audit_checkpoint_interval) {
            return invalid("audit_checkpoint_interval must be 1 to 3600 seconds");
        }
        if self.clock_skew > 300 {
            return invalid("clock_skew must be at most 300 seconds");
        }
        if self.previous_key_encryption_key_file.as_deref()
            == Some(self.key_encryption_key_path().as_path())
        {
            return invalid(
                "previous_key_encryption_key_file names the key-encryption key's own file: give the key it replaces",
            );
        }
        if self.environments.is_empty() {
            return invalid("environments must name at least one environment");
        }
        let mut seen = std::collections::BTreeSet::new();
        for env in &self.environments {
            if !is_environment(env) {
                return invalid(format!(
                    "environment `{env}` must be 1 to 64 letters, digits, `-`, `_` or `.`"
                ));
            }
            if !seen.insert(env.as_str()) {
                return invalid(format!("environment `{env}` is listed twice"));
            }
        }
        if let Some(url) = &self.database_url {
            let scheme = url.split_once("://").map(|(s, _)| s);
            if !matches!(scheme, Some("postgres" | "postgresql")) {
                return invalid(
                    "database_url must be a PostgreSQL URL (`postgres://user@host:5432/database`)",
                );
            }
        }
        if self.signing_key_rotation != 0 && self.signing_key_rotation <= self.signing_key_lead {
            return invalid("signing_key_rotation must be longer than signing_key_lead (or 0)");
        }
        if self.signing_key_rotation > ONE_YEAR {
            return invalid(format!(
                "signing_key_rotation must be at most {ONE_YEAR} seconds (a year), or 0"
            ));
        }
        if self.database_url.is_some() && self.signing_key_rotation != 0 {
            // A replaced key stays published for the longest token life;
            // with the key signing now and its successor, the JWKS must stay
            // within what verifiers load.
            let keep = self.longest_token_life();
            let published = keep.div_ceil(self.signing_key_rotation).saturating_add(2);
            let most = u64::try_from(scrip_jose::MAX_JWKS_KEYS).unwrap_or(u64::MAX);
            if published > most {
                return invalid(format!(
                    "signing_key_rotation = {} would keep about {published} signing keys published (each stays {keep} s after it is replaced: the longest token life plus clock_skew), more than the {most} a verifier loads; rotate every {} s or more, or shorten the token lifetimes",
                    self.signing_key_rotation,
                    keep.div_ceil(most - 2)
                ));
            }
        }
        let mut issuers = HashSet::new();
        let local_issuer = self.local_issuer();
        for ti in &self.trusted_issuers {
            ti.validate()?;
            if ti.issuer == local_issuer {
                return invalid(format!(
                    "trusted issuer `{}` is scrip's local attestation issuer; local identities are trusted already",
                    ti.issuer
                ));
            }
            if ti.issuer == issuer {
                return invalid(format!(
                    "trusted issuer `{}` is scrip's own issuer: scrip's tokens are never workload identities",
                    ti.issuer
                ));
            }
            if !issuers.insert(ti.issuer.as_str()) {
                return invalid(format!("trusted issuer `{}` is listed twice", ti.issuer));
            }
        }
        // An identity's issuer must be one whose identities are accepted.
        let untrusted = |who: &str, i: &str| {
            if issuers.contains(i) || i == local_issuer {
                return Ok(());
            }
            let mut trusted: Vec<String> = issuers.iter().map(|t| format!("`{t}`")).collect();
            trusted.sort();
            invalid(format!(
                "{who} has issuer `{i}`, which is neither a trusted issuer ({}) nor scrip's local issuer `{local_issuer}`; it must be one of them exactly",
                if trusted.is_empty() {
                    "there are none".to_owned()
                } else {
                    trusted.join(", ")
                }
            ))
        };
        for a in &self.approvers {
            let by_identity = a.issuer.is_some() && a.subject.is_some();
            if a.name.is_empty()
                || !(by_identity || a.uid.is_some())
                || a.issuer.is_some() != a.subject.is_some()
            {
                return invalid(format!(
                    "approver `{}` needs a name and either `issuer` with `subject`, or `uid`",
                    a.name
                ));
            }
            // An identity from any other issuer is never accepted, so such
            // an approver could never approve, and every step put to them
            // would wait until it expired.
            if let Some(i) = &a.issuer {
                untrusted(&format!("approver `{}`", a.name), i)?;
            }
        }
        if !(1..=600).contains(&self.http_header_timeout) {
            return invalid("http_header_timeout must be 1 to 600 seconds");
        }
        if self.approval_ttl == 0
            || self.approved_token_ttl == 0
            || self.approval_poll_interval == 0
        {
            return invalid(
                "approval_ttl, approval_poll_interval and approved_token_ttl must be positive",
            );
        }
        // An agent polling at the interval must be able to ask at least
        // twice within an approval's life, or an approved step could never
        // be collected; and an approval (and a denial's refusal) lives
        // within a day.
        if self.approval_ttl > MAX_APPROVAL_TTL {
            return invalid(format!(
                "approval_ttl must be at most {MAX_APPROVAL_TTL} seconds (a day)"
            ));
        }
        if self.approval_poll_interval.saturating_mul(2) > self.approval_ttl {
            return invalid(format!(
                "approval_poll_interval ({}) must be at most half of approval_ttl ({}): an agent polling at that pace must be able to collect an approved step before it expires",
                self.approval_poll_interval, self.approval_ttl
            ));
        }
        // Single use only where the use is claimed (a verifier, the proxy,
        // introspection): an offline verifier takes it again until it
        // expires, so it lives seconds (SPEC).
        if self.approved_token_ttl > MAX_APPROVED_TOKEN_TTL {
            return invalid(format!(
                "approved_token_ttl must be at most {MAX_APPROVED_TOKEN_TTL} seconds: an approved step's token lives seconds"
            ));
        }
        if let Some(url) = &self.approval_webhook {
            check_webhook_url("approval_webhook", url)?;
        }
        let mut names = HashSet::new();
        let mut resources = HashSet::new();
        for tool in &self.tools {
            check_url(
                &format!("tool `{}` resource", tool.name),
                &tool.resource,
                false,
            )?;
            if !names.insert(tool.name.as_str()) {
                return invalid(format!("tool `{}` is listed twice", tool.name));
            }
            if !resources
                .insert(resource_key(&tool.resource).unwrap_or_else(|| tool.resource.clone()))
            {
                return invalid(format!(
                    "tool resource `{}` is listed twice (perhaps spelt otherwise: URIs are compared with their scheme and host in lower case, without a default port, and with `/` for an empty path)",
                    tool.resource
                ));
            }
            if tool.actions.is_empty() {
                return invalid(format!("tool `{}` has no actions", tool.name));
            }
            let mut actions = HashSet::new();
            if let Some(dup) = tool.actions.iter().find(|a| !actions.insert(a.as_str())) {
                return invalid(format!("tool `{}` lists action `{dup}` twice", tool.name));
            }
            for i in &tool.introspectors {
                let who = format!("tool `{}` introspector `{}`", tool.name, i.subject);
                if i.subject.is_empty() {
                    return invalid(format!(
                        "tool `{}` introspector needs a `subject`",
                        tool.name
                    ));
                }
                untrusted(&who, &i.issuer)?;
            }
        }
        if self.socket_mode & !0o666 != 0 || self.socket_mode & 0o600 != 0o600 {
            return invalid(format!(
                "socket_mode `{:o}` must give the owner read and write and nobody execute (e.g. 0o600 or 0o660)",
                self.socket_mode
            ));
        }
        if let Some(socket) = &self.socket
            && socket.as_os_str().is_empty()
        {
            return invalid("socket must be a path");
        }
        let mut workloads = HashSet::new();
        for w in &self.local_workloads {
            w.validate()?;
            // With the socket open to other users, an executable is no
            // proof across uids: anyone who can run it can connect, exec it
            // (or run it under LD_PRELOAD) and read the answer.
            if self.socket_mode & 0o066 != 0
                && w.uid.is_none()
                && (w.exe.is_some() || w.exe_sha256.is_some())
            {
                return invalid(format!(
                    "local workload `{}` names an executable but no uid, and socket_mode `{:o}` lets other users connect: any of them could run that executable under their own control and take its identity; add `uid`",
                    w.name, self.socket_mode
                ));
            }
            if !workloads.insert(w.name.as_str()) {
                return invalid(format!("local workload `{}` is listed twice", w.name));
            }
        }
        upstream::validate(&self.upstreams, &self.proxy, &self.tools)?;
        self.limits.validate()
    }
}

impl TrustedIssuer {
    fn validate(&self) -> Result<(), ConfigError> {
        let who = format!("trusted issuer `{}`", self.issuer);
        if self.issuer.is_empty() {
            return invalid("a trusted issuer has an empty `issuer`");
        }
        match (&self.jwks_uri, &self.jwks_file) {
            (Some(uri), None) => check_url(&format!("{who} jwks_uri"), uri, true)?,
            (None, Some(_)) => {}
            _ => return invalid(format!("{who} needs exactly one of jwks_uri and jwks_file")),
        }
        if self.audiences.is_empty() || self.audiences.iter().any(String::is_empty) {
            return invalid(format!("{who} needs at least one non-empty audience"));
        }
        if self.algorithms.is_empty() {
            return invalid(format!("{who} needs at least one algorithm"));
        }
        if let Some(bad) = self
            .algorithms
            .iter()
            .find(|a| !IDENTITY_ALGORITHMS.contains(&a.as_str()))
        {
            return invalid(format!(
                "{who} algorithm `{bad}` is not allowed; use one of {}",
                IDENTITY_ALGORITHMS.join(", ")
            ));
        }
        for typ in &self.token_types {
            let t = typ.to_ascii_lowercase();
            if t.ends_with("txntoken+jwt") {
                return invalid(format!(
                    "{who} token type `{typ}` is not a workload identity"
                ));
            }
        }
        if self.jwks_refresh == 0 || self.jwks_min_refetch == 0 {
            return invalid(format!(
                "{who} jwks_refresh and jwks_min_refetch must be positive"
            ));
        }
        if self.jwks_refresh > 86_400
            || self.jwks_min_refetch > 86_400
            || self.jwks_max_stale > 86_400
        {
            return invalid(format!(
                "{who} jwks_refresh, jwks_min_refetch and jwks_max_stale must be at most 86400 seconds (a day)"
            ));
        }
        // Keys are served until `jwks_refresh + jwks_max_stale` after a
        // fetch, and no fetch is made within `jwks_min_refetch` of the last
        // one: past the one before the other, every identity of a healthy
        // issuer would be refused until the next fetch is allowed.
        if self.jwks_min_refetch > self.jwks_refresh.saturating_add(self.jwks_max_stale) {
            return invalid(format!(
                "{who} jwks_min_refetch ({}) is longer than jwks_refresh plus jwks_max_stale ({}): its keys would be dropped before scrip may fetch them again; shorten jwks_min_refetch",
                self.jwks_min_refetch,
                self.jwks_refresh.saturating_add(self.jwks_max_stale)
            ));
        }
        if self.kind == Some(IssuerKind::Spiffe) && self.trust_domain.is_none() {
            return invalid(format!(
                "{who} kind = \"spiffe\" needs trust_domain: the issuer's keys speak for one trust domain (a SPIFFE bundle is one trust domain's), and without it an SVID of any domain it signed would pass"
            ));
        }
        for (claim, values) in &self.required_claims {
            if claim.is_empty() || values.is_empty() {
                return invalid(format!(
                    "{who} required_claims: each entry names a claim and at least one value it may have"
                ));
            }
            // A JSON Pointer's `~` escapes only `~0` and `~1` (RFC 6901).
            if claim.starts_with('/')
                && claim
                    .split('~')
                    .skip(1)
                    .any(|after| !after.starts_with(['0', '1']))
            {
                return invalid(format!(
                    "{who} required_claims: `{claim}` is not a JSON Pointer: in one, `~` is written `~0` and `/` inside a name `~1`"
                ));
            }
        }
        if let Some(domain) = &self.trust_domain {
            if self.kind != Some(IssuerKind::Spiffe) {
                return invalid(format!(
                    "{who} trust_domain is for a SPIFFE issuer; add kind = \"spiffe\""
                ));
            }
            // SPIFFE ID standard §2.1: lowercase letters, digits, `.`, `-`, `_`.
            if domain.is_empty()
                || domain.len() > 255
                || !domain
                    .bytes()
                    .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_'))
            {
                return invalid(format!(
                    "{who} trust_domain `{domain}` is not a SPIFFE trust domain (lowercase letters, digits, `.`, `-` and `_`, without `spiffe://`)"
                ));
            }
        }
        Ok(())
    }
}

/// Whether `name` is a well-formed environment name: 1 to 64 ASCII letters,
/// digits, `-`, `_` or `.`.
#[must_use]
pub fn is_environment(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// An absolute http(s) URL; `https` unless the host is a loopback address
/// when `require_https_off_loopback`.
fn check_url(what: &str, s: &str, require_https_off_loopback: bool) -> Result<(), ConfigError> {
    check_url_as(what, s, &shown_url(s), false, require_https_off_loopback)
}

/// An `http` or `https` resource URI as two spellings of the same URI
/// share it, after the normalisation RFC 3986 §6.2.2 and §6.2.3 describe:
/// the scheme and host in lower case, no port where it is the scheme's
/// default, `/` for an empty path (`HTTPS://API.GitHub.com:443` and
/// `https://api.github.com/` are one URI), dot segments removed. Anything
/// else, a trailing `/` after a path included, tells URIs apart (a
/// fragment is kept, so a URI with one names no tool). `None` for another
/// scheme, and for what is not plainly such a URI, which a lenient parser
/// would read more into than RFC 3986 does: non-ASCII, spaces, controls or
/// a backslash, an authority not written after `//`, or a host the parser
/// would rewrite (`0x7f.1` for `127.0.0.1`, an escaped or international
/// name). User information is kept, so a URI with any names no tool.
#[must_use]
pub fn resource_key(s: &str) -> Option<String> {
    if !s.bytes().all(|b| b.is_ascii_graphic()) || s.contains('\\') {
        return None;
    }
    let url = url::Url::parse(s).ok()?;
    if !matches!(url.scheme(), "http" | "https") {
        return None;
    }
    let rest = s.get(url.scheme().len()..)?.strip_prefix("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    // The host as written, without a port (an IPv6 literal keeps its
    // brackets, as `host_str` gives it): the parser's must be the same but
    // for case. (User information is kept in the key, so a URI with it,
    // even empty, names no tool: a tool's `resource` has none.)
    let host = match authority.rfind(':') {
        Some(i) if !authority.ends_with(']') => authority.get(..i)?,
        _ => authority,
    };
    if url.host_str() != Some(host.to_ascii_lowercase().as_str()) {
        return None;
    }
    Some(url.into())
}

/// A URL as an error message may show it. Credentials (`user:key@`) and a
/// query (`?api_key=...`) are refused in most URLs here, and are exactly
/// what a mistake puts there: the URL is then shown by scheme and host only,
/// and text that is not a URL only when it has none of `@`, `?`, `#`.
fn shown_url(s: &str) -> String {
    match url::Url::parse(s) {
        Ok(u)
            if u.username().is_empty()
                && u.password().is_none()
                && u.query().is_none()
                && u.fragment().is_none() =>
        {
            format!(" `{s}`")
        }
        Ok(u) => format!(" `{}://{}/…`", u.scheme(), u.host_str().unwrap_or("")),
        Err(_) if s.len() <= 200 && !s.contains(['@', '?', '#']) => format!(" `{s}`"),
        Err(_) => String::new(),
    }
}

/// A webhook URL: as [`check_url`] with https required off loopback, but
/// its path and query may hold the secret the receiver checks (Slack puts
/// it in the path, Google Chat in the query): a query is allowed, and a
/// message names the scheme and host only.
fn check_webhook_url(what: &str, s: &str) -> Result<(), ConfigError> {
    let shown = url::Url::parse(s).ok().map_or_else(String::new, |u| {
        format!(" `{}://{}/…`", u.scheme(), u.host_str().unwrap_or(""))
    });
    check_url_as(what, s, &shown, true, true)
}

/// [`check_url`], showing the URL as `shown` in a message.
fn check_url_as(
    what: &str,
    s: &str,
    shown: &str,
    allow_query: bool,
    require_https_off_loopback: bool,
) -> Result<(), ConfigError> {
    // The parser drops outer spaces and inner tabs and newlines; the URL
    // is used as written (an issuer is every token's `iss`).
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return invalid(format!(
            "{what} must not contain spaces or control characters"
        ));
    }
    let Ok(url) = url::Url::parse(s) else {
        return invalid(format!("{what}{shown} is not an absolute URL"));
    };
    if url.fragment().is_some() || (url.query().is_some() && !allow_query) {
        return invalid(format!(
            "{what}{shown} must not have a {}",
            if allow_query {
                "fragment"
            } else {
                "query or fragment"
            }
        ));
    }
    if url.username() != "" || url.password().is_some() {
        return invalid(format!("{what} must not carry credentials"));
    }
    if require_https_off_loopback {
        let loopback = matches!(url.host(), Some(url::Host::Domain("localhost")))
            || matches!(url.host(), Some(url::Host::Ipv4(ip)) if ip.is_loopback())
            || matches!(url.host(), Some(url::Host::Ipv6(ip)) if ip.is_loopback());
        match url.scheme() {
            "https" => {}
            "http" if loopback => {}
            _ => {
                return invalid(format!(
                    "{what}{shown} must use https (http only on loopback)"
                ));
            }
        }
    } else if !url.has_host() && url.scheme() != "urn" {
        return invalid(format!("{what}{shown} is not a URI with a host"));
    }
    Ok(())
}

fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return String::new();
    };
    let line = text
        .get(..span.start)
        .map_or(0, |before| before.matches('\n').count() + 1);
    format!(" (line {line})")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(toml: &str, expected_error: Option<&str>) {
        let result = Config::from_toml(toml).and_then(|c| c.validate().map_err(|e| e.to_string()));
        match (result, expected_error) {
            (Ok(()), None) => {}
            (Err(e), Some(want)) => assert!(e.contains(want), "{e:?} does not contain {want:?}"),
            (got, want) => panic!("for {toml:?}: got {got:?}, want error {want:?}"),
        }
    }

    /// RFC 8707 `resource`: the tool whose URI is the one asked for, spelt
    /// as configured or otherwise (RFC 3986 §6.2.2-6.2.3); no other.
    #[test]
    fn a_resource_names_its_tool_however_its_uri_is_spelt() {
        let c = Config::from_toml(
            "[[tools]]\nname = \"gh\"\nresource = \"https://api.github.com\"\nactions = [\"read\"]\n\
             [[tools]]\nname = \"mcp\"\nresource = \"https://mcp.example.com/mcp\"\nactions = [\"read\"]\n\
             [[tools]]\nname = \"urn\"\nresource = \"urn:example:tool\"\nactions = [\"read\"]\n\
             [[tools]]\nname = \"local\"\nresource = \"https://127.0.0.1:8443\"\nactions = [\"read\"]\n\
             [[tools]]\nname = \"v6\"\nresource = \"https://[::1]:8443\"\nactions = [\"read\"]",
        )
        .unwrap();
        c.validate().unwrap();
        let named = |r: &str| c.tool_by_resource(r).map(|t| t.name.as_str().to_owned());
        for same in [
            "https://api.github.com",
            "https://api.github.com/",
            "HTTPS://API.GitHub.com",
            "https://api.github.com:443/",
            "https://api.github.com/./",
        ] {
            assert_eq!(named(same).as_deref(), Some("gh"), "{same}");
        }
        for same in [
            "https://mcp.example.com/mcp",
            "https://MCP.example.com:443/mcp",
        ] {
            assert_eq!(named(same).as_deref(), Some("mcp"), "{same}");
        }
        assert_eq!(named("urn:example:tool").as_deref(), Some("urn"));
        assert_eq!(named("https://127.0.0.1:8443/").as_deref(), Some("local"));
        assert_eq!(named("https://[::1]:8443").as_deref(), Some("v6"));
        assert_eq!(named("https://[::1]:8443/").as_deref(), Some("v6"));
        for other in [
            "https://api.github.com/repos",
            "https://api.github.com:8443",
            "http://api.github.com",
            "https://api.github.com.evil.example",
            "https://mcp.example.com/mcp/",
            "https://mcp.example.com/MCP",
            "https://mcp.example.com",
            "https://api.github.com/#x",
            "https://user@api.github.com",
            "https://@api.github.com",
            "https://:@api.github.com",
            "https:///api.github.com",
            "https:////api.github.com",
            "https://api%2Egithub.com",
            "https://0x7f.0.0.1:8443",
            "https://2130706433:8443",
            "https:api.github.com",
            "https:\\\\api.github.com",
            "https://api.github.com\\",
            " https://api.github.com",
            "https://api.github.com\t",
            "https://api.gith\u{fc}b.com",
            "https://аpi.github.com",
            "URN:example:TOOL",
            "api.github.com",
            "",
        ] {
            assert_eq!(named(other), None, "{other:?}");
        }
        // Two tools whose URIs are one, spelt two ways, are refused.
        check(
            "[[tools]]\nname = \"a\"\nresource = \"https://x.example\"\nactions = [\"read\"]\n\
             [[tools]]\nname = \"b\"\nresource = \"HTTPS://X.example:443/\"\nactions = [\"read\"]",
            Some("listed twice (perhaps spelt otherwise"),
        );
    }

    /// `[limits]`: every key from 1 to its most, defaults when left out,
    /// no unknown key.
    #[test]
    fn limits_are_rates_and_bursts_within_range() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.limits, Limits::default());
        assert_eq!((c.limits.tasks_per_minute, c.limits.task_burst), (600, 100));
        let c =
            Config::from_toml("[limits]\ntask_burst = 5\naccess_tokens_per_minute = 60").unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.limits,
            Limits {
                task_burst: 5,
                access_tokens_per_minute: 60,
                ..Limits::default()
            }
        );
        for key in [
            "tasks_per_minute",
            "task_burst",
            "access_tokens_per_minute",
            "access_token_burst",
        ] {
            check(
                &format!("[limits]\n{key} = 0"),
                Some(&format!("limits.{key} must be 1 to")),
            );
        }
        check(
            "[limits]\ntasks_per_minute = 60000000\naccess_token_burst = 1000000",
            None,
        );
        check(
            "[limits]\ntasks_per_minute = 60000001",
            Some("limits.tasks_per_minute must be 1 to 60000000"),
        );
        check(
            "[limits]\naccess_token_burst = 1000001",
            Some("limits.access_token_burst must be 1 to 1000000"),
        );
        check("[limits]\ntasks_per_second = 5", Some("unknown field"));
        check("[limits]\ntask_burst = -1", Some("invalid value"));
    }

    /// A loaded file's invalid value names the file, as a parse error does.
    #[test]
    fn an_invalid_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scrip.toml");
        std::fs::write(&path, "task_ttl = 0\n").unwrap();
        let e = Config::load(Some(&path)).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains("task_ttl"), "{e}");
    }

    #[test]
    fn an_issuer_may_declare_its_kind_and_a_spiffe_one_its_trust_domain() {
        let issuer = |extra: &str| {
            format!(
                "[[trusted_issuers]]\nissuer = \"https://i\"\njwks_file = \"k.json\"\naudiences = [\"scrip\"]\n{extra}"
            )
        };
        for kind in ["kubernetes", "github_actions", "jwt"] {
            check(&issuer(&format!("kind = \"{kind}\"")), None);
        }
        // A SPIFFE issuer's keys speak for one trust domain: it must be
        // named, or any SVID it signs, of any domain, would pass.
        check(&issuer("kind = \"spiffe\""), Some("needs trust_domain"));
        check(
            &issuer("jwks_refresh = 86400\njwks_max_stale = 86400"),
            None,
        );
        for key in ["jwks_refresh", "jwks_min_refetch", "jwks_max_stale"] {
            check(&issuer(&format!("{key} = 86401")), Some("at most 86400"));
        }
        // Keys dropped before they may be fetched again.
        check(
            &issuer("jwks_refresh = 60\njwks_max_stale = 0\njwks_min_refetch = 300"),
            Some("jwks_min_refetch (300) is longer than jwks_refresh plus jwks_max_stale (60)"),
        );
        check(
            &issuer("jwks_refresh = 60\njwks_max_stale = 240\njwks_min_refetch = 300"),
            None,
        );
        check(
            &issuer("required_claims = { repository_owner_id = [\"123\"], ref = [\"a\", \"b\"] }"),
            None,
        );
        check(
            &issuer("required_claims = { \"/a~2b\" = [\"x\"] }"),
            Some("is not a JSON Pointer"),
        );
        check(
            &issuer(
                "required_claims = { \"/kubernetes.io/namespace\" = [\"x\"], \"/a~1b~0\" = [\"y\"] }",
            ),
            None,
        );
        check(
            &issuer("required_claims = { repository_owner_id = [] }"),
            Some("at least one value"),
        );
        check(
            &issuer("required_claims = { repository_owner_id = \"123\" }"),
            Some("invalid type"),
        );
        check(&issuer("kind = \"local\""), Some("unknown variant `local`"));
        check(
            &issuer("kind = \"spiffe\"\ntrust_domain = \"prod.acme-1.example_x\""),
            None,
        );
        check(
            &issuer("trust_domain = \"prod.acme.com\""),
            Some("add kind = \"spiffe\""),
        );
        check(
            &issuer("kind = \"kubernetes\"\ntrust_domain = \"prod.acme.com\""),
            Some("add kind = \"spiffe\""),
        );
        for bad in [
            "",
            "spiffe://prod.acme.com",
            "Prod.acme.com",
            "prod.acme.com/x",
        ] {
            check(
                &issuer(&format!("kind = \"spiffe\"\ntrust_domain = \"{bad}\"")),
                Some("is not a SPIFFE trust domain"),
            );
        }
    }

    #[test]
    fn the_shipped_example_is_valid_and_declares_its_issuers() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/scrip.toml");
        let c = Config::load(Some(&path)).unwrap();
        assert_eq!(c.trusted_issuers.len(), 2);
        assert!(c.trusted_issuers.iter().all(|t| t.kind.is_some()));
    }

    #[test]
    fn environments_are_a_non_empty_list_of_names() {
        assert_eq!(Config::default().environments, ["dev", "staging", "prod"]);
        check("environments = [\"dev\", \"qa-1\", \"eu.prod_2\"]", None);
        check("environments = []", Some("at least one environment"));
        check("environments = [\"dev\", \"dev\"]", Some("listed twice"));
        for bad in ["", "pro d", "dév", "../x"] {
            check(
                &format!("environments = [\"{bad}\"]"),
                Some("must be 1 to 64 letters"),
            );
        }
    }

    #[test]
    fn defaults_are_valid() {
        check("", None);
        let c = Config::default();
        assert_eq!(c.issuer(), "http://127.0.0.1:7070");
        assert_eq!(c.task_ttl, 3600);
        assert_eq!(c.access_token_ttl, 300);
    }

    #[test]
    fn a_retired_key_outlives_every_token_it_signed() {
        let mut c = Config::default();
        (c.max_task_ttl, c.access_token_ttl, c.approved_token_ttl) = (60, 60, 60);
        // Local identities (300 s) are signed with the same key.
        assert_eq!(c.longest_token_life(), LOCAL_IDENTITY_TTL + c.clock_skew);
        c.max_task_ttl = 7200;
        assert_eq!(c.longest_token_life(), 7200 + c.clock_skew);
    }

    /// A webhook's path or query often is its secret: it may have a query,
    /// and a refusal names its scheme and host only.
    #[test]
    fn a_webhook_url_is_checked_without_being_shown() {
        check(
            "approval_webhook = \"https://chat.example/v1/spaces/X/messages?key=K&token=T\"",
            None,
        );
        for (url, want) in [
            (
                "http://hooks.example/services/T0/B0/SECRETPATH",
                "must use https",
            ),
            (
                "https://hooks.example/services/SECRETPATH#SECRETFRAG",
                "fragment",
            ),
            ("https://u:SECRETPASS@hooks.example/x", "credentials"),
            ("hooks.example/SECRETPATH", "not an absolute URL"),
        ] {
            let toml = format!("approval_webhook = \"{url}\"");
            let e = Config::from_toml(&toml)
                .and_then(|c| c.validate().map_err(|e| e.to_string()))
                .unwrap_err();
            assert!(e.contains(want), "{e}");
            assert!(!e.contains("SECRET"), "{e}");
        }
    }

    #[test]
    fn refuses_bad_values() {
        check("lisen = \"x\"", Some("unknown field `lisen`"));
        check("task_ttl = 0", Some("positive"));
        check("task_ttl = 100000", Some("max_task_ttl"));
        check("access_token_ttl = 3600", None);
        check("approval_ttl = 86400", None);
        check("approval_ttl = 86401", Some("at most 86400"));
        check("approval_ttl = 4\napproval_poll_interval = 2", None);
        check(
            "approval_ttl = 3\napproval_poll_interval = 2",
            Some("at most half of approval_ttl"),
        );
        check("access_token_ttl = 3601", Some("at most 3600"));
        check("approved_token_ttl = 300", None);
        check("approved_token_ttl = 301", Some("at most 300"));
        check("max_delegation_depth = 16", None);
        check("max_task_ttl = 2592000", None);
        check("max_task_ttl = 2592001", Some("at most 2592000"));
        check("audit_checkpoint_interval = 3600", None);
        check("audit_checkpoint_interval = 3601", Some("1 to 3600"));
        check("signing_key_rotation = 31536001", Some("at most 31536000"));
        check("issuer = \"https://scrip.example.com \"", Some("spaces"));
        check("issuer = \"https://scrip.exam\tple.com\"", Some("spaces"));
        check("max_delegation_depth = 17", Some("at most 16"));
        check("issuer = \"ftp://x\"", Some("https"));
        check("issuer = \"http://example.com\"", Some("https"));
        check("issuer = \"https://scrip.example/\"", Some("must not end"));
        check("database_url = \"mysql://x\"", Some("PostgreSQL URL"));
        check("database_url = \"x\"", Some("PostgreSQL URL"));
        check("database_url = \"postgres://scrip@db:5432/scrip\"", None);
        check("database_url = \"postgresql://db/scrip\"", None);
        check(
            "signing_key_rotation = 60\nsigning_key_lead = 60",
            Some("signing_key_rotation"),
        );
        check("signing_key_rotation = 0\nsigning_key_lead = 60", None);
        // The default lifetimes keep a replaced key 28,830 s: 62 of them
        // (and the current key and its successor) fill a verifier's JWKS.
        let shared = "database_url = \"postgres://db/scrip\"\nsigning_key_lead = 60\n";
        check(
            &format!("{shared}signing_key_rotation = 464"),
            Some("rotate every 465 s or more"),
        );
        check(&format!("{shared}signing_key_rotation = 465"), None);
        // Without a shared store no key rotates.
        check("signing_key_rotation = 464\nsigning_key_lead = 60", None);
        check(
            "[[tools]]\nname = \"GitHub\"\nresource = \"https://x\"\nactions = [\"read\"]",
            Some(
                "tool name must start with a lowercase letter or digit and hold only a-z, 0-9, `.`, `_` and `-` (character 1 is an uppercase letter) (line 2)",
            ),
        );
        check(
            "[[tools]]\nname = \"gh\"\nresource = \"https://x\"\nactions = []",
            Some("no actions"),
        );
        check(
            "[[tools]]\nname = \"gh\"\nresource = \"https://x\"\nactions = [\"read\"]\n[[tools]]\nname = \"gh\"\nresource = \"https://y\"\nactions = [\"read\"]",
            Some("listed twice"),
        );
        check(
            "[[trusted_issuers]]\nissuer = \"https://i\"\njwks_file = \"k.json\"\naudiences = [\"scrip\"]\nalgorithms = [\"HS256\"]",
            Some("`HS256` is not allowed"),
        );
        check(
            "[[trusted_issuers]]\nissuer = \"https://i\"\naudiences = [\"scrip\"]",
            Some("exactly one of jwks_uri and jwks_file"),
        );
        check(
            "[[trusted_issuers]]\nissuer = \"https://i\"\njwks_file = \"k.json\"\naudiences = []",
            Some("audience"),
        );
        check(
            "[[trusted_issuers]]\nissuer = \"http://127.0.0.1:7070\"\njwks_file = \"k.json\"\naudiences = [\"a\"]",
            Some("own issuer"),
        );
        check(
            "[[trusted_issuers]]\nissuer = \"https://i\"\njwks_uri = \"http://example.com/jwks\"\naudiences = [\"a\"]",
            Some("https"),
        );
    }

    /// A tool's introspector must be an identity scrip accepts.
    #[test]
    fn a_tools_introspectors_must_be_trusted_identities() {
        let issuer = "[[trusted_issuers]]\nissuer = \"https://id.example\"\njwks_file = \"/dev/null\"\naudiences = [\"scrip\"]\n";
        let tool = |introspector: &str| {
            format!(
                "[[tools]]\nname = \"github\"\nresource = \"https://api.github.com\"\nactions = [\"read\"]\nintrospectors = [{introspector}]\n"
            )
        };
        check(
            &format!(
                "{issuer}{}",
                tool(r#"{ issuer = "https://id.example", subject = "rs" }"#)
            ),
            None,
        );
        check(
            &format!(
                "{issuer}{}",
                tool(r#"{ issuer = "https://other.example", subject = "rs" }"#)
            ),
            Some(
                "tool `github` introspector `rs` has issuer `https://other.example`, which is neither a trusted issuer",
            ),
        );
        check(
            &format!(
                "{issuer}{}",
                tool(r#"{ issuer = "https://id.example", subject = "" }"#)
            ),
            Some("introspector needs a `subject`"),
        );
        check(
            &format!("{issuer}{}", tool(r#"{ issuer = "https://id.example" }"#)),
            Some("subject"),
        );
    }

    /// An approver whose issuer nobody trusts could never approve: refused,
    /// naming the issuers that are trusted.
    #[test]
    fn an_approvers_issuer_must_be_trusted() {
        let issuer = "[[trusted_issuers]]\nissuer = \"https://id.example\"\njwks_file = \"k.json\"\naudiences = [\"scrip\"]\n";
        let approver = |iss: &str| {
            format!("[[approvers]]\nname = \"alice\"\nissuer = \"{iss}\"\nsubject = \"alice\"\n")
        };
        check(&format!("{issuer}{}", approver("https://id.example")), None);
        check(
            &format!("{issuer}{}", approver("https://id.example/")),
            Some(
                "approver `alice` has issuer `https://id.example/`, which is neither a trusted issuer (`https://id.example`) nor scrip's local issuer `http://127.0.0.1:7070/local`",
            ),
        );
        check(&approver("https://id.example"), Some("(there are none)"));
        check(&approver("http://127.0.0.1:7070/local"), None);
        check("[[approvers]]\nname = \"bob\"\nuid = 1001\n", None);
    }

    #[test]
    fn local_workloads() {
        let sha = "a".repeat(64);
        check("[[local_workloads]]\nname = \"coder\"\nuid = 1000", None);
        check(
            &format!(
                "[[local_workloads]]\nname = \"c\"\nuid = 1\ngid = 2\nexe = \"/usr/bin/agent\"\nexe_sha256 = \"{sha}\""
            ),
            None,
        );
        check(
            "[[local_workloads]]\nname = \"coder\"",
            Some("at least one selector"),
        );
        check(
            "[[local_workloads]]\nname = \"\"\nuid = 1",
            Some("a name is 1-64"),
        );
        check(
            "[[local_workloads]]\nname = \"a b\"\nuid = 1",
            Some("a name is 1-64"),
        );
        check(
            "[[local_workloads]]\nname = \"c\"\nexe = \"bin/agent\"",
            Some("absolute path"),
        );
        check(
            "[[local_workloads]]\nname = \"c\"\nexe_sha256 = \"ABC\"",
            Some("64 lowercase hex"),
        );
        check(
            &format!(
                "[[local_workloads]]\nname = \"c\"\nexe_sha256 = \"{}\"",
                "A".repeat(64)
            ),
            Some("64 lowercase hex"),
        );
        check(
            "[[local_workloads]]\nname = \"c\"\nuid = -1",
            Some("expected u32"),
        );
        check(
            "[[local_workloads]]\nname = \"c\"\nuser = 1",
            Some("unknown field `user`"),
        );
        check(
            "[[local_workloads]]\nname = \"c\"\nuid = 1\n[[local_workloads]]\nname = \"c\"\ngid = 1",
            Some("listed twice"),
        );
        check(
            "[[trusted_issuers]]\nissuer = \"http://127.0.0.1:7070/local\"\njwks_file = \"k.json\"\naudiences = [\"a\"]",
            Some("local attestation issuer"),
        );
    }

    #[test]
    fn socket() {
        let c = Config::default();
        assert_eq!(c.socket_path(), PathBuf::from(".scrip/scrip.sock"));
        assert_eq!(c.socket_mode, 0o600);
        assert_eq!(c.local_issuer(), "http://127.0.0.1:7070/local");
        check("socket_mode = 0o660", None);
        check("socket_mode = 0o666", None);
        check("socket_mode = 0o700", Some("socket_mode `700`"));
        check("socket_mode = 0o400", Some("socket_mode"));
        check("socket_mode = 0o4600", Some("socket_mode"));
        // Open to other users, an executable alone is no proof.
        let exe_only = "[[local_workloads]]\nname = \"coder\"\nexe = \"/usr/bin/agent\"\n";
        check(exe_only, None);
        check(
            &format!("socket_mode = 0o660\n{exe_only}"),
            Some("names an executable but no uid"),
        );
        check(
            &format!("socket_mode = 0o666\n{exe_only}gid = 100\n"),
            Some("add `uid`"),
        );
        check(
            &format!("socket_mode = 0o660\n{exe_only}uid = 1000\n"),
            None,
        );
        check(
            "socket_mode = 0o660\n[[local_workloads]]\nname = \"team\"\ngid = 100\n",
            None,
        );
        check("socket = \"\"", Some("socket must be a path"));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scrip.toml");
        std::fs::write(&path, "data_dir = \"state\"\n").unwrap();
        let c = Config::load(Some(&path)).unwrap();
        assert_eq!(c.socket_path(), dir.path().join("state/scrip.sock"));
        std::fs::write(&path, "socket = \"run/s.sock\"\n").unwrap();
        let c = Config::load(Some(&path)).unwrap();
        assert_eq!(c.socket_path(), dir.path().join("run/s.sock"));
    }

    /// Clear text off the host is warned about: a wide listen with an http
    /// issuer, a wide proxy listen whose public_url is http or not given;
    /// loopback and https are quiet.
    #[test]
    fn clear_text_off_the_host_is_warned_about() {
        let config = |toml: &str| Config::from_toml(toml).unwrap();
        assert!(config("").cleartext_warnings(false).is_empty());
        let wide = config("listen = \"0.0.0.0:7070\"\nissuer = \"http://localhost:7070\"\n");
        let w = wide.cleartext_warnings(false);
        assert!(w.len() == 1 && w[0].contains("in clear text"), "{w:?}");
        assert!(
            config("listen = \"0.0.0.0:7070\"\nissuer = \"https://scrip.example\"\n")
                .cleartext_warnings(false)
                .is_empty()
        );
        let proxy = |public: &str| {
            config(&format!(
                "issuer = \"https://scrip.example\"\n[proxy]\nlisten = \"[::]:7071\"\nissuer = \"http://127.0.0.1:7070\"\n{public}"
            ))
        };
        let w = proxy("public_url = \"http://proxy.example\"\n").cleartext_warnings(true);
        assert!(
            w.len() == 1 && w[0].contains("public_url `http://proxy.example` is http"),
            "{w:?}"
        );
        let w = proxy("").cleartext_warnings(true);
        assert!(
            w.len() == 1 && w[0].contains("public_url is not given"),
            "{w:?}"
        );
        // Reached over https, with an http issuer on loopback: quiet.
        assert!(
            proxy("public_url = \"https://proxy.example\"\n")
                .cleartext_warnings(true)
                .is_empty()
        );
        assert!(proxy("").cleartext_warnings(false).is_empty());
        assert!(
            config("[proxy]\npublic_url = \"http://127.0.0.1:7071\"\n")
                .cleartext_warnings(true)
                .is_empty()
        );
    }

    #[test]
    fn relative_paths_follow_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scrip.toml");
        std::fs::write(&path, "data_dir = \"state\"\n").unwrap();
        let c = Config::load(Some(&path)).unwrap();
        assert_eq!(c.data_dir, dir.path().join("state"));
        assert_eq!(c.policy_dir, dir.path().join("policies"));
    }

    /// The previous key-encryption key's file follows the configuration
    /// file, and may not be the current key's own (default or given).
    #[test]
    fn the_previous_key_encryption_key_is_another_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scrip.toml");
        std::fs::write(&path, "previous_key_encryption_key_file = \"old.key\"\n").unwrap();
        let c = Config::load(Some(&path)).unwrap();
        assert_eq!(
            c.previous_key_encryption_key_file,
            Some(dir.path().join("old.key"))
        );
        for text in [
            "previous_key_encryption_key_file = \".scrip/keys/key-encryption.key\"\n",
            "key_encryption_key_file = \"k\"\nprevious_key_encryption_key_file = \"k\"\n",
        ] {
            std::fs::write(&path, text).unwrap();
            let e = Config::load(Some(&path)).unwrap_err().to_string();
            assert!(e.contains("names the key-encryption key's own file"), "{e}");
        }
    }

    /// A mint command's program given by a relative path is the one beside
    /// the configuration, not the one in the current directory; a bare name
    /// stays for PATH, and an absolute path as it is.
    #[test]
    fn a_mint_programs_relative_path_follows_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scrip.toml");
        let mint = |program: &str| {
            std::fs::write(
                &path,
                format!(
                    "[[tools]]\nname = \"legacy\"\nresource = \"http://127.0.0.1:8080\"\nactions = [\"read\"]\n\
                     [[upstreams]]\nname = \"legacy\"\nurl = \"http://127.0.0.1:8080\"\n\
                     [upstreams.secrets.read]\nmint_command = [\"{program}\", \"./arg\"]\n"
                ),
            )
            .unwrap();
            let c = Config::load(Some(&path)).unwrap();
            c.upstreams[0]
                .secrets
                .values()
                .next()
                .unwrap()
                .mint_command
                .clone()
        };
        let beside = dir.path().join("./mint.sh").to_string_lossy().into_owned();
        assert_eq!(mint("./mint.sh"), [beside.as_str(), "./arg"]);
        assert_eq!(mint("mint-key"), ["mint-key", "./arg"]);
        assert_eq!(mint("/usr/bin/mint"), ["/usr/bin/mint", "./arg"]);
    }
}
