//! Federated workload identity: which issuers scrip trusts, their keys, and
//! turning a presented JWT into a [`WorkloadIdentity`].
//!
//! Keys come only from configuration: a `jwks_uri` (fetched, cached,
//! refreshed on schedule and on an unknown `kid` at a bounded rate, served
//! from cache for at most `jwks_max_stale` while the issuer is unreachable,
//! then refused) or a `jwks_file`. Nothing in a token (`jku`, `x5u`, `jwk`,
//! `kid`) ever decides where keys come from.
//!
//! Architecture invariant: [`IdentityVerifier::verify`] is the only way to
//! obtain a [`WorkloadIdentity`] from a token, and it fails closed: no keys,
//! stale keys, an unknown issuer or any failed check is an error.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use scrip_config::{IssuerKind, TrustedIssuer};
use scrip_jose::{Algorithm, Expectations, JoseError, KeySet, SharedKeySet, Stamp, TypRule};
use scrip_token::{IdentityKind, WorkloadIdentity};
use serde_json::{Map, Value};

/// The largest JWKS document fetched.
const MAX_JWKS_BYTES: usize = 256 * 1024;
/// Timeout of one JWKS fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a workload identity was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The token failed a JOSE check.
    #[error(transparent)]
    Token(#[from] JoseError),
    /// Its `iss` is not a trusted issuer.
    #[error("token issuer is not a trusted workload identity issuer")]
    UntrustedIssuer,
    /// It is one of scrip's own tokens.
    #[error("a scrip {0} token is not a workload identity")]
    ScripToken(&'static str),
    /// The issuer's keys are not available (never fetched, or stale past the
    /// allowed time): fail closed.
    #[error("keys of the token's issuer are unavailable; try again later")]
    KeysUnavailable,
    /// The claims lack a subject.
    #[error("token has no subject")]
    NoSubject,
    /// The claims are not an identity of their issuer's declared kind.
    #[error(transparent)]
    Shape(scrip_token::ShapeError),
    /// A claim the issuer's `required_claims` names is missing, or has
    /// none of the values listed.
    #[error(
        "claim `{0}` is missing or has a value this issuer's identities may not have (required_claims)"
    )]
    ClaimNotAllowed(String),
    /// A local identity whose `exp` is further than
    /// [`scrip_config::LOCAL_IDENTITY_TTL`] from its `iat`, or that lacks
    /// either: scrip never issues one, so its key signed what it did not
    /// attest (a key that leaked would otherwise mint identities of any
    /// lifetime).
    #[error(
        "a local identity lives at most {} s from its `iat`",
        scrip_config::LOCAL_IDENTITY_TTL
    )]
    LocalLifetime,
}

/// A problem loading the trusted issuers at start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A `jwks_file` could not be read or parsed.
    #[error("trusted issuer `{issuer}`: {message}")]
    Jwks {
        /// The issuer.
        issuer: String,
        /// What went wrong.
        message: String,
    },
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Http(String),
}

enum Source {
    /// Fetched with the client (built only when an issuer needs one:
    /// building it reads the system's trusted certificates).
    Uri(String, reqwest::Client),
    File(std::path::PathBuf),
}

impl Source {
    /// The key set in `document`, read from here; an error names a
    /// `jwks_file`'s path (a `jwks_uri`'s errors come from the fetch, which
    /// names it).
    fn keys(&self, document: &[u8]) -> Result<KeySet, String> {
        KeySet::from_jwks_json(document).map_err(|e| match self {
            Self::Uri(..) => format!("JWKS: {e}"),
            Self::File(path) => format!("`{}`: {e}", path.display()),
        })
    }
}

#[derive(Default)]
struct Cache {
    keys: Option<Arc<KeySet>>,
    /// The document `keys` were read from: a refresh that reads the same
    /// keeps the very `keys` (and so what `Recent` verified with them).
    document: Vec<u8>,
    /// By both clocks: keys fetched before the host slept are as old as
    /// the wall clock says.
    fetched_at: Option<Stamp>,
    attempted_at: Option<Stamp>,
}

struct Issuer {
    issuer: String,
    /// The declared kind of its identities; `None`: their shape decides.
    kind: Option<IdentityKind>,
    trust_domain: Option<String>,
    audiences: Vec<String>,
    /// Claims every identity must carry, with one of these values.
    required: std::collections::BTreeMap<String, Vec<String>>,
    algorithms: Vec<Algorithm>,
    typ: TypRule,
    source: Source,
    refresh: Duration,
    max_stale: Duration,
    min_refetch: Duration,
    cache: RwLock<Cache>,
    fetching: tokio::sync::Mutex<()>,
}

/// scrip's own local attestation issuer: its tokens are signed with scrip's
/// own keys, typed `wit+jwt`, and addressed to scrip.
struct LocalIssuer {
    issuer: String,
    keys: SharedKeySet,
    algorithms: Vec<Algorithm>,
    audiences: Vec<String>,
    typ: TypRule,
}

/// The `typ` of a workload identity issued by local attestation.
pub const LOCAL_IDENTITY_TYP: &str = "wit+jwt";

/// Verifies workload identities against the trusted issuers.
pub struct IdentityVerifier {
    issuers: HashMap<String, Arc<Issuer>>,
    local: Option<LocalIssuer>,
    own_issuer: String,
    leeway: u64,
    /// Federated identity tokens that passed every check: presented again
    /// (an agent starts several tasks with one service-account token), one
    /// is accepted without verifying its signature again while its issuer's
    /// key set is the very one that verified it and it is within its
    /// validity (see [`scrip_jose::Recent`]).
    verified: scrip_jose::Recent<WorkloadIdentity>,
}

/// The most recently verified identity tokens kept (all are forgotten when
/// full).
const RECENT: usize = 10_000;

impl std::fmt::Debug for IdentityVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityVerifier")
            .field("issuers", &self.issuers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn parse_algorithms(names: &[String]) -> Vec<Algorithm> {
    // The configuration was validated against IDENTITY_ALGORITHMS.
    names.iter().filter_map(|n| n.parse().ok()).collect()
}

impl IdentityVerifier {
    /// Sets up the trusted issuers. `jwks_file` keys are read now (an
    /// unreadable file is an error); `jwks_uri` keys are fetched on first use
    /// and then kept fresh.
    ///
    /// # Errors
    /// [`SetupError`] when a JWKS file is unusable.
    pub fn new(
        trusted: &[TrustedIssuer],
        own_issuer: &str,
        leeway: u64,
    ) -> Result<Self, SetupError> {
        let mut http: Option<reqwest::Client> = None;
        let mut issuers = HashMap::new();
        for ti in trusted {
            let source = match (&ti.jwks_uri, &ti.jwks_file) {
                (Some(uri), _) => {
                    let client = if scrip_verifier::net::is_local(uri) {
                        // Its own client: see `scrip_verifier::net::http_client`.
                        scrip_verifier::net::http_client(uri, FETCH_TIMEOUT)
                    } else {
                        match &http {
                            Some(client) => Ok(client.clone()),
                            None => scrip_verifier::net::http_client(uri, FETCH_TIMEOUT)
                                .map(|c| http.insert(c).clone()),
                        }
                    }
                    .map_err(|e| SetupError::Http(e.to_string()))?;
                    Source::Uri(uri.clone(), client)
                }
                (None, Some(file)) => Source::File(file.clone()),
                (None, None) => continue,
            };
            let issuer = Issuer {
                issuer: ti.issuer.clone(),
                kind: ti.kind.map(IssuerKind::identity_kind),
                trust_domain: ti.trust_domain.clone(),
                audiences: ti.audiences.clone(),
                required: ti.required_claims.clone(),
                algorithms: parse_algorithms(&ti.algorithms),
                typ: TypRule::any_of(ti.allow_untyped, ti.token_types.iter().map(String::as_str)),
                source,
                refresh: Duration::from_secs(ti.jwks_refresh),
                max_stale: Duration::from_secs(ti.jwks_max_stale),
                min_refetch: Duration::from_secs(ti.jwks_min_refetch),
                cache: RwLock::new(Cache::default()),
                fetching: tokio::sync::Mutex::new(()),
            };
            if let Source::File(path) = &issuer.source {
                let jwks = |message: String| SetupError::Jwks {
                    issuer: ti.issuer.clone(),
                    message,
                };
                let document = read_file(path).map_err(jwks)?;
                let keys = issuer.source.keys(&document).map_err(jwks)?;
                issuer.store(keys, document, Stamp::now());
            }
            issuers.insert(ti.issuer.clone(), Arc::new(issuer));
        }
        let undeclared: Vec<&str> = trusted
            .iter()
            .filter(|ti| ti.kind.is_none())
            .map(|ti| ti.issuer.as_str())
            .collect();
        for ti in trusted.iter().filter(|ti| ti.required_claims.is_empty()) {
            // A GitHub Actions issuer by its kind too (GitHub Enterprise
            // Server's are named otherwise).
            let github = ti.kind == Some(scrip_config::IssuerKind::GithubActions);
            let claim = scrip_config::MULTI_TENANT_ISSUERS
                .iter()
                .find(|(issuer, _)| *issuer == ti.issuer)
                .map(|(_, claim)| *claim)
                .or(github.then_some("repository_owner_id"));
            if let Some(claim) = claim {
                tracing::warn!(
                    issuer = %ti.issuer,
                    "anyone on this platform (on GitHub, any repository's workflow) can obtain a token from this issuer for any audience, so every one of its users passes as a trusted workload (policy still decides what it gets); set `required_claims` (e.g. `{claim} = [\"<yours>\"]`) to trust only yours"
                );
            }
        }
        for ti in trusted
            .iter()
            .filter(|ti| ti.audiences.contains(&ti.issuer))
        {
            tracing::warn!(
                issuer = %ti.issuer,
                "an audience is the issuer itself: a Kubernetes API server's default, which every pod's mounted token carries, and which the API server and any service that reviews tokens receive and could replay; give scrip an audience of its own (a projected token with `audience: scrip`)"
            );
        }
        if trusted.len() > 1 && !undeclared.is_empty() {
            tracing::warn!(
                issuers = ?undeclared,
                "several issuers are trusted and these have no `kind`: the shape of their tokens' claims decides which attributes policies see, so one issuer's tokens could carry what policies expect of another (a Kubernetes `namespace`, a GitHub `repository`); set `kind` on each"
            );
        }
        Ok(Self {
            issuers,
            local: None,
            own_issuer: own_issuer.to_owned(),
            leeway,
            verified: scrip_jose::Recent::new(RECENT),
        })
    }

    /// Also accepts the identities of scrip's local attestation: `iss`
    /// exactly `issuer`, signed by one of `keys` (scrip's own public keys,
    /// replaced as they rotate)
    /// with one of `algorithms`, `typ` exactly `wit+jwt`, `aud` containing
    /// `audience` (scrip's issuer). scrip's task and access tokens stay
    /// refused: they have scrip's issuer itself, not this one.
    #[must_use]
    pub fn with_local(
        mut self,
        issuer: &str,
        keys: SharedKeySet,
        algorithms: Vec<Algorithm>,
        audience: &str,
    ) -> Self {
        self.local = Some(LocalIssuer {
            issuer: issuer.to_owned(),
            keys,
            algorithms,
            audiences: vec![audience.to_owned()],
            typ: TypRule::exactly(LOCAL_IDENTITY_TYP),
        });
        self
    }

    /// Verifies `token` as a workload identity.
    ///
    /// # Errors
    /// [`IdentityError`] naming why it was refused.
    pub async fn verify(&self, token: &str) -> Result<WorkloadIdentity, IdentityError> {
        if token.len() > scrip_jose::MAX_TOKEN_BYTES {
            return Err(JoseError::TooLarge.into());
        }
        let (typ, kid, iss) = peek(token)?;
        if iss == self.own_issuer {
            let kind = match typ.as_deref().map(str::to_ascii_lowercase).as_deref() {
                Some("txntoken+jwt") => "task",
                Some("at+jwt") => "access",
                _ => "issued",
            };
            return Err(IdentityError::ScripToken(kind));
        }
        if let Some(local) = self.local.as_ref().filter(|l| l.issuer == iss) {
            let keys = local.keys.snapshot();
            let verify = |leeway| {
                scrip_jose::verify::<Map<String, Value>>(
                    token,
                    &keys,
                    &Expectations {
                        issuer: &local.issuer,
                        audiences: &local.audiences,
                        algorithms: &local.algorithms,
                        typ: &local.typ,
                        leeway,
                    },
                )
            };
            // No leeway on `exp`: scrip issued it. But another replica,
            // whose clock runs ahead of this one's, may have: its `iat` and
            // `nbf` get the leeway (`exp`, checked first, passed without).
            let verified = match verify(0) {
                Err(JoseError::IssuedInFuture | JoseError::NotYetValid) => verify(self.leeway),
                other => other,
            }?;
            let claim = |name| verified.claims.get(name).and_then(Value::as_u64);
            let lifetime = claim("exp")
                .zip(claim("iat"))
                .map(|(exp, iat)| exp.saturating_sub(iat));
            if lifetime.is_none_or(|l| l > scrip_config::LOCAL_IDENTITY_TTL) {
                return Err(IdentityError::LocalLifetime);
            }
            return WorkloadIdentity::from_local_claims(&local.issuer, &verified.claims)
                .ok_or(IdentityError::NoSubject);
        }
        let issuer = self
            .issuers
            .get(&iss)
            .ok_or(IdentityError::UntrustedIssuer)?;
        let keys = self.keys(issuer, kid.as_deref()).await?;
        let digest = scrip_jose::token_digest(token);
        if let Some(identity) = self.verified.get(&digest, &keys, self.leeway) {
            return Ok(identity);
        }
        let expectations = Expectations {
            issuer: &issuer.issuer,
            audiences: &issuer.audiences,
            algorithms: &issuer.algorithms,
            typ: &issuer.typ,
            leeway: self.leeway,
        };
        let verified = scrip_jose::verify::<Map<String, Value>>(token, &keys, &expectations)?;
        check_required(&issuer.required, &verified.claims)?;
        let identity = WorkloadIdentity::from_claims_of(
            &issuer.issuer,
            &verified.claims,
            issuer.kind,
            issuer.trust_domain.as_deref(),
        )
        .map_err(|e| match e {
            scrip_token::ShapeError::NoSubject => IdentityError::NoSubject,
            other => IdentityError::Shape(other),
        })?;
        self.verified
            .put(digest, keys, verified.validity, identity.clone());
        Ok(identity)
    }

    async fn keys(
        &self,
        issuer: &Arc<Issuer>,
        kid: Option<&str>,
    ) -> Result<Arc<KeySet>, IdentityError> {
        if issuer.needs_fetch(kid) {
            // The fetch runs on a task of its own, which this request only
            // waits for. A request dropped while it waits (its client went
            // away) must not cancel the fetch: the attempt it recorded would
            // hold off every other fetch for `min_refetch` with nothing
            // fetched, and a client that did that every `min_refetch` would
            // keep the keys from ever being refreshed.
            let fetching = Arc::clone(issuer);
            let kid = kid.map(str::to_owned);
            let fetch = tokio::spawn(async move {
                let _guard = fetching.fetching.lock().await;
                // Another request may have fetched while this one waited.
                if fetching.needs_fetch(kid.as_deref()) {
                    fetching.fetch().await;
                }
            });
            // A fetch that panicked leaves the keys as they were.
            if let Err(e) = fetch.await {
                tracing::error!(issuer = %issuer.issuer, error = %e, "trusted issuer keys fetch failed");
            }
        } else if issuer.lacks(kid) {
            // Not to be fetched again so soon, but a fetch may be under way
            // (one that a token signed by the issuer's new key started):
            // its answer, not the keys from before it, decides.
            drop(issuer.fetching.lock().await);
        }
        let cache = issuer
            .cache
            .read()
            .map_err(|_| IdentityError::KeysUnavailable)?;
        match (&cache.keys, cache.fetched_at) {
            (Some(keys), Some(at)) if at.elapsed() <= issuer.refresh + issuer.max_stale => {
                Ok(keys.clone())
            }
            _ => Err(IdentityError::KeysUnavailable),
        }
    }
}

/// Each claim `required` names is in `claims`, with one of its values (a
/// number or boolean as written). A name that starts with `/` is an RFC
/// 6901 JSON Pointer into the claims (`/kubernetes.io/namespace`).
fn check_required(
    required: &std::collections::BTreeMap<String, Vec<String>>,
    claims: &Map<String, Value>,
) -> Result<(), IdentityError> {
    for (claim, allowed) in required {
        let found = match claim.strip_prefix('/') {
            None => claims.get(claim),
            Some(path) => {
                // The first token names a claim; the rest points into it.
                let (first, rest) = path.find('/').map_or((path, ""), |i| path.split_at(i));
                claims
                    .get(&first.replace("~1", "/").replace("~0", "~"))
                    .and_then(|v| v.pointer(rest))
            }
        };
        let ok = match found {
            Some(Value::String(s)) => allowed.iter().any(|a| a == s),
            Some(v @ (Value::Number(_) | Value::Bool(_))) => allowed.contains(&v.to_string()),
            _ => false,
        };
        if !ok {
            return Err(IdentityError::ClaimNotAllowed(claim.clone()));
        }
    }
    Ok(())
}

impl Issuer {
    /// Fetches (or reads) the issuer's JWKS and keeps what can be trusted.
    async fn fetch(&self) {
        if let Ok(mut cache) = self.cache.write() {
            cache.attempted_at = Some(Stamp::now());
        }
        let result = match &self.source {
            Source::Uri(uri, http) => fetch_uri(http, uri).await,
            Source::File(path) => read_file(path),
        };
        match result {
            Ok(document) if self.refreshed_unchanged(&document, Stamp::now()) => {
                tracing::debug!(issuer = %self.issuer, "trusted issuer keys unchanged");
            }
            Ok(document) => match self.source.keys(&document) {
                Ok(keys) => {
                    tracing::info!(issuer = %self.issuer, keys = keys.len(), "trusted issuer keys refreshed");
                    self.store(keys, document, Stamp::now());
                }
                Err(message) if scrip_jose::publishes_private_key(&document) => {
                    // The issuer's key is exposed: the keys held from before
                    // are no more to be trusted than the new ones.
                    tracing::error!(issuer = %self.issuer, error = %message, "trusted issuer published a private key; its tokens are refused");
                    self.forget_keys();
                }
                Err(message) => {
                    // The issuer answered with a JWKS this verifier cannot
                    // use: a key it no longer lists (withdrawn, perhaps
                    // exposed) is not trusted on from before.
                    let withdrawn = self.cache.read().is_ok_and(|cache| {
                        cache
                            .keys
                            .as_ref()
                            .is_some_and(|k| k.still_listed_in(&document) == Some(false))
                    });
                    if withdrawn {
                        tracing::error!(issuer = %self.issuer, error = %message, "trusted issuer keys could not be refreshed, and the issuer no longer lists keys held from before; its tokens are refused until it publishes a usable JWKS");
                        self.forget_keys();
                    } else {
                        tracing::warn!(issuer = %self.issuer, error = %message, "trusted issuer keys could not be refreshed");
                    }
                }
            },
            Err(message) => {
                tracing::warn!(issuer = %self.issuer, error = %message, "trusted issuer keys could not be refreshed");
            }
        }
    }

    fn store(&self, keys: KeySet, document: Vec<u8>, at: Stamp) {
        if let Ok(mut cache) = self.cache.write() {
            cache.keys = Some(Arc::new(keys));
            cache.document = document;
            cache.fetched_at = Some(at);
        }
    }

    /// When `document` is the one the keys in use were read from: counts it
    /// as a refresh and returns `true`.
    fn refreshed_unchanged(&self, document: &[u8], at: Stamp) -> bool {
        let Ok(mut cache) = self.cache.write() else {
            return false;
        };
        if cache.keys.is_none() || cache.document != document {
            return false;
        }
        cache.fetched_at = Some(at);
        true
    }

    /// Drops the keys held: the issuer's tokens are refused until a fetch
    /// brings keys that can be trusted.
    fn forget_keys(&self) {
        if let Ok(mut cache) = self.cache.write() {
            cache.keys = None;
            cache.document.clear();
        }
    }

    /// Whether the keys held lack this `kid`, or there are none.
    fn lacks(&self, kid: Option<&str>) -> bool {
        self.cache.read().is_ok_and(|cache| match &cache.keys {
            Some(keys) => kid.is_some_and(|k| !keys.contains_kid(k)),
            None => true,
        })
    }

    /// Whether to fetch now: never fetched, due for a refresh, or an unknown
    /// `kid` — each bounded by `min_refetch` since the last attempt.
    fn needs_fetch(&self, kid: Option<&str>) -> bool {
        let Ok(cache) = self.cache.read() else {
            return false;
        };
        let recently_tried = cache
            .attempted_at
            .is_some_and(|at| at.elapsed() < self.min_refetch);
        if recently_tried {
            return false;
        }
        match (&cache.keys, cache.fetched_at) {
            (Some(keys), Some(at)) => {
                at.elapsed() >= self.refresh || kid.is_some_and(|k| !keys.contains_kid(k))
            }
            _ => true,
        }
    }
}

/// Reads `typ`, `kid` (header) and `iss` (payload) before verification, only
/// to choose the issuer and its keys; everything is verified afterwards.
fn peek(token: &str) -> Result<(Option<String>, Option<String>, String), IdentityError> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        if token.split('.').count() == 5 {
            return Err(JoseError::Encrypted.into());
        }
        return Err(JoseError::Malformed("not a compact JWS").into());
    };
    let decode = |s: &str| -> Result<Map<String, Value>, IdentityError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| JoseError::Malformed("a part is not base64url"))?;
        if !scrip_jose::plain_json(&bytes) {
            return Err(JoseError::Malformed(
                "a part is not plain JSON (malformed, or naming a reserved member)",
            )
            .into());
        }
        serde_json::from_slice(&bytes)
            .map_err(|_| JoseError::Malformed("a part is not a JSON object").into())
    };
    let header = decode(h)?;
    let payload = decode(p)?;
    let text =
        |m: &Map<String, Value>, k: &str| m.get(k).and_then(Value::as_str).map(str::to_owned);
    let iss = text(&payload, "iss").ok_or_else(|| JoseError::MissingClaim("iss".into()))?;
    Ok((text(&header, "typ"), text(&header, "kid"), iss))
}

/// The largest `jwks_file` read, as for a fetched key set.
const MAX_JWKS_FILE: u64 = 256 * 1024;

/// Reads a `jwks_file`. It is a trust anchor: whoever can write it can put
/// in a key and sign any identity, so a file that group or others may
/// write, or that belongs to a user other than scrip's or root, is refused.
fn read_file(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let shown = path.display();
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read `{shown}`: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read `{shown}`: {e}"))?;
    // Checked as opened; nor may anyone else replace it: every directory
    // on the way to it, through any link, is checked too.
    use scrip_config::trust::{GroupWrite, Stake, check_entry, check_way};
    check_entry(path, &meta, Stake::TrustAnchor, GroupWrite::Refuse)
        .and_then(|()| check_way(path, Stake::TrustAnchor, GroupWrite::Refuse))
        .map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    file.take(MAX_JWKS_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read `{shown}`: {e}"))?;
    if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > MAX_JWKS_FILE {
        return Err(format!("`{shown}` is larger than {MAX_JWKS_FILE} bytes"));
    }
    Ok(bytes)
}

async fn fetch_uri(http: &reqwest::Client, uri: &str) -> Result<Vec<u8>, String> {
    let mut response = http
        .get(uri)
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| format!("fetch failed: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("fetch answered {}", response.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("fetch failed: {e}"))?
    {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_JWKS_BYTES {
            return Err(format!("JWKS is larger than {MAX_JWKS_BYTES} bytes"));
        }
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    /// A required claim named by a JSON Pointer is looked up inside the
    /// claims, with `~1` and `~0` unescaped in every token; a plain name is
    /// a top-level claim, dots and slashes included.
    #[test]
    fn required_claims_may_point_into_nested_claims() {
        let claims: Map<String, Value> = serde_json::from_value(serde_json::json!({
            "kubernetes.io": { "namespace": "agents", "serviceaccount": { "name": "coder" } },
            "a/b": { "c~d": 7 },
            "https://acme.example/team": "core",
            "groups": ["x", "y"],
        }))
        .unwrap();
        let check = |claim: &str, value: &str| {
            check_required(
                &[(claim.to_owned(), vec![value.to_owned()])].into(),
                &claims,
            )
            .is_ok()
        };
        assert!(check("/kubernetes.io/namespace", "agents"));
        assert!(!check("/kubernetes.io/namespace", "ci"));
        assert!(check("/kubernetes.io/serviceaccount/name", "coder"));
        assert!(
            !check("/kubernetes.io/serviceaccount", "coder"),
            "an object"
        );
        assert!(check("/a~1b/c~0d", "7"));
        assert!(!check("/a/b/c~d", "7"));
        assert!(check("https://acme.example/team", "core"));
        assert!(check("/groups/1", "y"));
        assert!(!check("/groups", "y"), "an array is no value");
        assert!(!check("/kubernetes.io/nope", "agents"));
        assert!(!check("kubernetes.io", "agents"));
    }

    /// JSON nested `rounds` times past serde_json's nesting limit (128
    /// levels) by way of the member name it reserves: at each round the
    /// inner text is held as that member's string, which `Value` reads
    /// again with a fresh limit.
    fn nested_past_the_limit(rounds: usize) -> String {
        let mut text = format!("{}{}", "[".repeat(127), "]".repeat(127));
        for _ in 0..rounds {
            text = format!(
                "{}{{\"$serde_json::private::RawValue\":{}}}{}",
                "[".repeat(126),
                serde_json::to_string(&text).unwrap(),
                "]".repeat(126)
            );
        }
        text
    }

    /// A token is looked at before it is verified (its issuer, `typ` and
    /// `kid` choose the keys): a part naming a member that serde_json
    /// reserves is refused there too, however deep it nests behind it,
    /// rather than read into a stack it could exhaust.
    #[test]
    fn a_peek_at_a_token_refuses_a_reserved_member() {
        let b64 = |s: &str| URL_SAFE_NO_PAD.encode(s);
        let header = b64(r#"{"alg":"ES256","typ":"JWT"}"#);
        let plain = format!("{header}.{}.c2ln", b64(r#"{"iss":"https://idp"}"#));
        assert_eq!(peek(&plain).unwrap().2, "https://idp");
        for payload in [
            r#"{"iss":{"$serde_json::private::RawValue":"\"https://idp\""}}"#.to_owned(),
            format!(
                r#"{{"iss":"https://idp","x":{}}}"#,
                nested_past_the_limit(18)
            ),
        ] {
            let token = format!("{header}.{}.c2ln", b64(&payload));
            assert!(
                matches!(
                    peek(&token),
                    Err(IdentityError::Token(JoseError::Malformed(_)))
                ),
                "{}",
                payload.get(..80).unwrap_or(&payload)
            );
        }
        let nested_header = format!(r#"{{"alg":"ES256","x":{}}}"#, nested_past_the_limit(18));
        let token = format!(
            "{}.{}.c2ln",
            b64(&nested_header),
            b64(r#"{"iss":"https://idp"}"#)
        );
        assert!(peek(&token).is_err());
    }
    use scrip_jose::{SigningAlgorithm, SigningKey};

    /// A refresh that reads the same document keeps the very key set, so
    /// what `Recent` verified with it stays answered from memory: anyone may
    /// cause a refetch (a token naming an unknown `kid`, at a bounded rate).
    #[tokio::test]
    async fn a_refresh_that_reads_the_same_keys_keeps_them() {
        let key = SigningKey::generate(SigningAlgorithm::ES256).unwrap().0;
        let added = SigningKey::generate(SigningAlgorithm::ES256).unwrap().0;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        let write = |keys: &[&SigningKey]| {
            let keys: Vec<Value> = keys.iter().map(|k| k.public_jwk()).collect();
            std::fs::write(
                &path,
                serde_json::to_vec(&serde_json::json!({"keys": keys})).unwrap(),
            )
            .unwrap();
        };
        write(&[&key]);
        let trusted = TrustedIssuer {
            issuer: "https://idp.example".into(),
            jwks_uri: None,
            jwks_file: Some(path.clone()),
            audiences: vec!["scrip".into()],
            algorithms: vec!["ES256".into()],
            token_types: vec!["JWT".into()],
            allow_untyped: true,
            jwks_refresh: 60,
            jwks_max_stale: 60,
            jwks_min_refetch: 1,
            kind: None,
            trust_domain: None,
            required_claims: Default::default(),
        };
        let v = IdentityVerifier::new(&[trusted], "https://scrip.example", 30).unwrap();
        let issuer = v.issuers.get("https://idp.example").unwrap();
        let first = v.keys(issuer, None).await.unwrap();
        issuer.fetch().await;
        assert!(Arc::ptr_eq(&first, &v.keys(issuer, None).await.unwrap()));
        write(&[&key, &added]);
        issuer.fetch().await;
        let changed = v.keys(issuer, None).await.unwrap();
        assert!(!Arc::ptr_eq(&first, &changed));
        assert_eq!(changed.len(), 2);

        // An issuer whose key set now publishes a private key: the keys held
        // from before are dropped too, and its tokens refused.
        let mut leaked = key.public_jwk();
        leaked["d"] = Value::String("AAAA".into());
        std::fs::write(
            &path,
            serde_json::to_vec(&serde_json::json!({"keys": [leaked]})).unwrap(),
        )
        .unwrap();
        issuer.fetch().await;
        assert!(matches!(
            v.keys(issuer, None).await,
            Err(IdentityError::KeysUnavailable)
        ));
        write(&[&key, &added]);
        issuer.fetch().await;
        assert_eq!(v.keys(issuer, None).await.unwrap().len(), 2);

        // Keys fetched before the host slept for two hours are as old as
        // the wall clock says: due for a refresh, and past `refresh +
        // max_stale` if it fails (here: the file is gone).
        let slept = |at: Stamp| Stamp {
            mono: at.mono,
            wall: at.wall.checked_sub(Duration::from_secs(7200)).unwrap(),
        };
        {
            let mut cache = issuer.cache.write().unwrap();
            cache.fetched_at = cache.fetched_at.map(slept);
            cache.attempted_at = cache.attempted_at.map(slept);
        }
        assert!(
            issuer.needs_fetch(None),
            "keys from before the sleep looked fresh"
        );
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            v.keys(issuer, None).await,
            Err(IdentityError::KeysUnavailable)
        ));
    }
}
