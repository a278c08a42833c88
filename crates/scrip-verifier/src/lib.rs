//! Verifies scrip access tokens in a Rust resource server.
//!
//! A [`Verifier`] is built from scrip's issuer URL and this server's tool
//! name. [`Verifier::discover`] reads the RFC 8414 metadata, fetches the JWKS
//! and reads the revocation feed once; from then on a background task follows
//! the feed, and [`Verifier::verify`] checks a token without a network call,
//! except a bounded JWKS refetch (at most one a `jwks_min_refetch`, waited
//! for by the call that makes it) when a token names a key not yet seen or
//! the keys are older than `jwks_refresh`. A token
//! presented again (each call an agent makes with it) skips the signature
//! check while the key set that verified it is current and it is within its
//! `exp`, `nbf` and `iat` ([`scrip_jose::Recent`]); revocation, scope and
//! single use are checked on every call.
//!
//! What a token must satisfy (RFC 9068, RFC 8725), all through
//! [`scrip_jose::verify`], the workspace's one JWT validation path: compact
//! JWS, `alg` on the allow-list and matching its key, no `crit` or
//! key-location headers, `typ` exactly `at+jwt`, the signature, `iss` exactly
//! the issuer, `aud` this tool, `exp`/`nbf`/`iat` with the leeway, and every
//! RFC 9068 claim present. Then its task and `jti` must not be revoked, and
//! the revocation set must be fresh: once it is older than `max_staleness`
//! (as of when the feed was last asked), every token is refused
//! ([`VerifyError::RevocationStale`]).
//!
//! [`VerifierLayer`] wraps an axum/hyper service: it reads
//! `Authorization: Bearer`, or `Authorization: DPoP` with a `DPoP` proof
//! (RFC 9449) for a token bound to a key, answers RFC 6750 (RFC 9449 §7.1)
//! errors, and puts the [`AccessToken`] in the request extensions.
//!
//! Architecture invariant: an [`AccessToken`] value exists only for a token
//! that passed every check above at the time it was built; it has no public
//! constructor. For a token verified before, the one kept then is returned
//! only after its time, key set, revocation, scope and single use are
//! checked again. The exceptions say so in their names:
//! [`Unspent::danger_caller_claims_use`] and
//! [`VerifierConfig::danger_caller_claims_single_use`], for a caller that
//! claims a single use in scrip's store itself.

mod error;
mod feed;
mod fetch;
mod keys;
mod layer;
pub mod net;

use std::sync::Arc;
use std::time::Duration;

use scrip_jose::dpop::{self, ProofCheck, ReplayCache};
use scrip_jose::{Algorithm, Expectations, JoseError, TypRule};
use scrip_token::{AccessClaims, ActionName, ActionSet};

pub use error::{SetupError, VerifyError};
pub use feed::{
    ClaimFuture, FeedConfig, FeedSource, FileIdentity, IdentityFuture, IdentitySource, PageFuture,
    StaticIdentity,
};
pub use layer::{Rejection, VerifierLayer, VerifierService};

/// The largest metadata document fetched.
const MAX_METADATA_BYTES: usize = 64 * 1024;
/// The most feed pages read at start before following in the background.
const MAX_INITIAL_PAGES: usize = 10_000;
/// Timeout of the metadata fetch.
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

/// When a new verifier reads the revocations listed at its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FirstRead {
    /// Before it is returned: a failed read is a setup error.
    Before,
    /// In the background, refusing every token until it is done.
    Background,
}

/// The least [`VerifierConfig::jwks_min_refetch`] accepted.
pub const MIN_JWKS_REFETCH: Duration = Duration::from_secs(1);
/// The largest `leeway` and `dpop_leeway`, in seconds: scrip's largest
/// `clock_skew`, past which it stops listing a revoked token.
pub const MAX_LEEWAY: u64 = 300;

/// How revocation is learned.
#[derive(Debug, Clone)]
pub enum Revocation {
    /// Follow scrip's revocation feed (the only safe choice).
    Follow(FeedConfig),
    /// Do not follow the feed: a revoked token stays accepted until it
    /// expires. Only for tests and for issuers without a feed.
    DangerIgnore,
}

/// What a verifier checks and how it keeps its state fresh.
#[derive(Debug, Clone)]
pub struct VerifierConfig {
    /// scrip's issuer URL, exactly as in its tokens' `iss`.
    pub issuer: String,
    /// This resource server's tool name: the `aud` its tokens carry.
    pub audience: String,
    /// The `alg` allow-list (asymmetric algorithms only).
    pub algorithms: Vec<Algorithm>,
    /// Clock leeway for `exp`, `nbf` and `iat`, in seconds.
    pub leeway: u64,
    /// How often the JWKS is refreshed.
    pub jwks_refresh: Duration,
    /// Least time between JWKS fetches (bounds refetches on unknown `kid`s);
    /// at least [`MIN_JWKS_REFETCH`], so that tokens with made-up `kid`s
    /// cannot make a fetch per request.
    pub jwks_min_refetch: Duration,
    /// How long the keys last fetched are trusted while refreshing them
    /// fails; past it every token is refused ([`VerifyError::KeysStale`])
    /// until a fetch succeeds, so a key scrip withdrew does not verify for
    /// as long as its JWKS cannot be read. At least `jwks_refresh` plus
    /// `jwks_min_refetch`.
    pub jwks_max_age: Duration,
    /// How revocation is learned.
    pub revocation: Revocation,
    /// The URL this resource server is reached at, as clients name it
    /// (`https://api.example`, with a path prefix if a gateway routes by
    /// one): a DPoP proof's `htu` must be this URL followed by the
    /// request's path. Without it, DPoP-bound tokens are refused by
    /// [`VerifierLayer`] and [`Verifier::authorize`].
    pub public_url: Option<String>,
    /// Clock leeway for a DPoP proof's `iat`, in seconds. The proof comes
    /// from the client's clock, so this stays when `leeway` is 0 for tokens
    /// of the verifier's own process.
    pub dpop_leeway: u64,
    /// Off (the default), the verifier claims a single-use token's one use
    /// itself. On, it claims none, and every single-use token passes as
    /// often as it is presented: only for a caller that claims the use
    /// itself, after its own later checks and atomically with what it
    /// records, in scrip's store (scrip's proxy claims it in the commit of
    /// its `allow` record, so a request its policy refuses does not spend a
    /// person's approval). A resource server has no way to do that.
    pub danger_caller_claims_single_use: bool,
}

impl VerifierConfig {
    /// A configuration that follows the revocation feed, presenting
    /// `identity`; algorithms ES256, EdDSA and RS256, 30 s leeway, JWKS
    /// refreshed every 5 min and refetched at most every 10 s.
    #[must_use]
    pub fn new(
        issuer: impl Into<String>,
        audience: impl Into<String>,
        identity: Arc<dyn IdentitySource>,
    ) -> Self {
        Self::with_revocation(
            issuer,
            audience,
            Revocation::Follow(FeedConfig::new(identity)),
        )
    }

    /// As [`VerifierConfig::new`], without following revocations.
    #[must_use]
    pub fn danger_without_revocation(
        issuer: impl Into<String>,
        audience: impl Into<String>,
    ) -> Self {
        Self::with_revocation(issuer, audience, Revocation::DangerIgnore)
    }

    fn with_revocation(
        issuer: impl Into<String>,
        audience: impl Into<String>,
        revocation: Revocation,
    ) -> Self {
        Self {
            issuer: issuer.into(),
            audience: audience.into(),
            algorithms: vec![Algorithm::ES256, Algorithm::EdDSA, Algorithm::RS256],
            leeway: 30,
            jwks_refresh: Duration::from_secs(300),
            jwks_min_refetch: Duration::from_secs(10),
            jwks_max_age: Duration::from_secs(3600),
            revocation,
            public_url: None,
            dpop_leeway: 30,
            danger_caller_claims_single_use: false,
        }
    }

    fn validate(&self) -> Result<(), SetupError> {
        let bad = |m: &str| Err(SetupError::Config(m.to_owned()));
        if self.issuer.is_empty() || self.issuer.ends_with('/') {
            return bad("issuer must be non-empty and must not end with `/`");
        }
        if self.audience.is_empty() {
            return bad("audience (the tool name) must be non-empty");
        }
        if self.algorithms.is_empty() {
            return bad("the algorithm allow-list is empty");
        }
        // scrip lists a revocation until `exp` plus its `clock_skew` (at
        // most 300 s): a verifier accepting tokens longer than that would
        // take a revoked one it no longer hears about. (Within the bound,
        // the leeway should still not pass the `clock_skew` scrip runs with.)
        if self.leeway > MAX_LEEWAY || self.dpop_leeway > MAX_LEEWAY {
            return bad(
                "leeway and dpop_leeway must be at most 300 s, scrip's largest clock_skew (and should not pass the clock_skew scrip runs with)",
            );
        }
        if let Some(u) = &self.public_url {
            let ok = url::Url::parse(u).is_ok_and(|p| {
                matches!(p.scheme(), "http" | "https")
                    && p.host_str().is_some()
                    && p.query().is_none()
                    && p.fragment().is_none()
                    && p.username().is_empty()
                    && p.password().is_none()
            });
            if !ok || u.ends_with('/') {
                return bad(
                    "public_url must be an http(s) URL without query, fragment, credentials or a final `/`",
                );
            }
        }
        if self.jwks_min_refetch < MIN_JWKS_REFETCH {
            return bad("jwks_min_refetch must be at least 1 s");
        }
        // One failed refresh must not make the keys stale at once.
        if self.jwks_max_age < self.jwks_refresh.saturating_add(self.jwks_min_refetch) {
            return bad("jwks_max_age must be at least jwks_refresh plus jwks_min_refetch");
        }
        if self
            .algorithms
            .iter()
            .any(|a| matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512))
        {
            return bad("symmetric algorithms are never accepted");
        }
        if let Revocation::Follow(feed) = &self.revocation {
            // Under a second the feed would answer at once (`wait` is sent
            // in whole seconds), and the follower would poll without pause.
            if feed.wait < Duration::from_secs(1) || feed.wait > feed::MAX_WAIT {
                return bad("feed wait must be 1 to 30 s");
            }
            // An idle long poll shows the set as of when it was asked for,
            // `wait` before it came; the next comes `wait` later still.
            if feed.max_staleness <= feed.wait.saturating_mul(2) {
                return bad(
                    "max_staleness must exceed twice the feed wait (a page shows the revocations as of when it was asked for, up to a wait before it comes): raise max_staleness or lower wait",
                );
            }
            if feed.retry_min.is_zero() || feed.retry_max < feed.retry_min {
                return bad("feed retries need 0 < retry_min <= retry_max");
            }
        }
        Ok(())
    }
}

/// A request's token verified by [`Verifier::authenticate`], whose single
/// use, if it has one, is not spent: whose the request is, but not leave to
/// serve it (that would let a single-use token be presented many times).
#[derive(Debug, Clone)]
pub struct Unspent(AccessToken);

impl Unspent {
    /// The verified claims.
    #[must_use]
    pub fn claims(&self) -> &AccessClaims {
        self.0.claims()
    }

    /// The actions the token grants at this tool.
    #[must_use]
    pub fn actions(&self) -> &ActionSet {
        self.0.actions()
    }

    /// The task the token belongs to (`txn`).
    #[must_use]
    pub fn task(&self) -> &str {
        self.0.task()
    }

    /// The token as an [`AccessToken`], for a caller that claims a
    /// single-use token's use itself, in scrip's store, before it serves
    /// the request (see [`VerifierConfig::danger_caller_claims_single_use`]).
    #[must_use]
    pub fn danger_caller_claims_use(self) -> AccessToken {
        self.0
    }
}

/// A verified scrip access token: the proof that every check passed.
#[derive(Debug, Clone)]
pub struct AccessToken {
    claims: AccessClaims,
    actions: ActionSet,
    kid: Option<String>,
    alg: Algorithm,
    proof: Option<ProofUse>,
}

/// The DPoP proof a bound token was presented with, which this verifier
/// took as its first use in this process: a caller whose replicas share a
/// store records it there too, in the commit of what the request does, so
/// that no other replica takes it again (as the proxy does,
/// `scrip_store::Write::SpendProof`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProofUse {
    /// [`scrip_jose::dpop::Proof::replay_id`]: its key's and `jti`'s digest.
    pub id: [u8; 32],
    /// Its `iat`: with `id`, what names it (the same proof has the same
    /// `iat` wherever it is presented).
    pub iat: u64,
    /// Until when (a Unix time) it could pass the `iat` check at a
    /// verifier with this one's `dpop_leeway` whose clock is within that
    /// leeway of this one's ([`scrip_jose::dpop::Proof::kept_until`]).
    /// `until - iat` is the same for every proof this verifier takes: a
    /// store keyed by `iat` can drop the proofs made more than that (and a
    /// margin) ago.
    pub until: u64,
}

impl AccessToken {
    /// The verified claims.
    #[must_use]
    pub fn claims(&self) -> &AccessClaims {
        &self.claims
    }

    /// The actions the token grants at this tool.
    #[must_use]
    pub fn actions(&self) -> &ActionSet {
        &self.actions
    }

    /// The task the token belongs to (`txn`).
    #[must_use]
    pub fn task(&self) -> &str {
        &self.claims.txn
    }

    /// The DPoP proof it was presented with, for a bound token; `None` for
    /// a bearer token.
    #[must_use]
    pub fn proof(&self) -> Option<ProofUse> {
        self.proof
    }

    /// The `kid` of the key that verified it.
    #[must_use]
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The algorithm that verified it.
    #[must_use]
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// Whether the scope covers `action`.
    #[must_use]
    pub fn allows(&self, action: &ActionName) -> bool {
        self.actions.contains(action)
    }

    /// Requires `action`.
    ///
    /// # Errors
    /// [`VerifyError::InsufficientScope`] when the scope lacks it.
    pub fn require(&self, action: &ActionName) -> Result<(), VerifyError> {
        if self.allows(action) {
            Ok(())
        } else {
            Err(VerifyError::InsufficientScope {
                required: action.to_string(),
            })
        }
    }
}

/// Aborts the feed-following task when the last verifier sharing it is
/// dropped.
#[derive(Debug)]
struct FeedTask(tokio::task::JoinHandle<()>);

impl Drop for FeedTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `jti`s of single-use tokens (issued on a person's approval) already
/// presented, with until when each is kept.
type UsedOnce = std::sync::Mutex<std::collections::HashMap<String, KeptUntil>>;

/// Until when a spent single-use `jti` is kept: while `verify` would still
/// accept the token (`exp` plus the leeway) by the wall clock, or by the
/// monotonic clock from when it was spent. Dropped only once both have
/// passed it, so a wall clock stepped ahead (and back) forgets no use.
#[derive(Debug, Clone, Copy)]
struct KeptUntil {
    wall: u64,
    mono: std::time::Instant,
}

impl KeptUntil {
    /// For a token of expiry `exp`, spent at `now` (wall clock) and
    /// `at` (monotonic).
    fn new(exp: u64, leeway: u64, now: u64, at: std::time::Instant) -> Self {
        let wall = exp.saturating_add(leeway);
        let left = std::time::Duration::from_secs(wall.saturating_sub(now));
        Self {
            wall,
            mono: at.checked_add(left).unwrap_or(at),
        }
    }

    fn live(&self, now: u64, at: std::time::Instant) -> bool {
        self.wall >= now || self.mono >= at
    }
}

/// Takes a single-use token's `jti` out of [`UsedOnce`] when dropped armed:
/// its use was marked here but never confirmed by scrip.
struct Unmark<'a> {
    used: &'a UsedOnce,
    jti: &'a str,
    armed: bool,
}

impl Drop for Unmark<'_> {
    fn drop(&mut self) {
        if self.armed
            && let Ok(mut used) = self.used.lock()
        {
            used.remove(self.jti);
        }
    }
}

struct Inner {
    issuer: String,
    audiences: Vec<String>,
    algorithms: Vec<Algorithm>,
    typ: TypRule,
    leeway: u64,
    keys: Arc<keys::Keys>,
    revocations: Option<Arc<feed::Revocations>>,
    feed_task: Option<Arc<FeedTask>>,
    used_once: Arc<UsedOnce>,
    /// Where a single-use token's one use is claimed for every verifier of
    /// the issuer (the feed's source); without it, per process only.
    claims: Option<Arc<dyn FeedSource>>,
    /// Tokens that passed every check of [`scrip_jose::verify`] and their
    /// scope parse, kept so that a token presented again (each call an agent
    /// makes with it) is not verified again while the key set that verified
    /// it is current and it is within its validity. Revocation, scope and
    /// single use are still checked on every use. One per audience: never
    /// shared by [`Verifier::for_audience`].
    recent: scrip_jose::Recent<AccessToken>,
    public_url: Option<String>,
    dpop_leeway: u64,
    claim_single_use: bool,
    /// DPoP proofs accepted, so each is accepted once; shared by
    /// [`Verifier::for_audience`].
    proofs: Arc<ReplayCache>,
}

/// The most DPoP proofs a verifier remembers; past that, proofs are
/// refused until old ones expire.
const PROOFS: usize = 1 << 20;

/// The most verified tokens a verifier keeps (all are forgotten when full).
const RECENT: usize = 10_000;

/// Verifies scrip access tokens for one tool. Cheap to clone; the background
/// feed task stops when the last clone (and the last verifier made by
/// [`Verifier::for_audience`]) is dropped.
#[derive(Clone)]
pub struct Verifier(Arc<Inner>);

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("issuer", &self.0.issuer)
            .field("audience", &self.0.audiences)
            .field("follows_revocations", &self.0.revocations.is_some())
            .finish_non_exhaustive()
    }
}

/// The metadata members the verifier uses.
#[derive(Debug, serde::Deserialize)]
struct Metadata {
    issuer: String,
    jwks_uri: String,
    #[serde(default)]
    scrip_revocation_feed_endpoint: Option<String>,
    #[serde(default)]
    introspection_endpoint: Option<String>,
}

/// Reads `issuer`'s metadata where RFC 8414 §3.1 puts it (the well-known
/// suffix between the host and the issuer's path) and, for an issuer with a
/// path, then where OpenID Connect Discovery puts its own (appended to the
/// issuer), which a front proxy that strips the issuer's path serves. Either
/// way the document must name `issuer` exactly (RFC 8414 §3.3).
async fn read_metadata(http: &reqwest::Client, issuer: &str) -> Result<Metadata, SetupError> {
    let rfc = scrip_token::metadata_url(issuer);
    let appended = format!("{}{}", issuer, scrip_token::METADATA_SUFFIX);
    let mut failures = Vec::new();
    for url in [rfc, appended] {
        if failures.iter().any(|(tried, _)| *tried == url) {
            continue;
        }
        let read = async {
            let body =
                fetch::get_bytes(http, &url, None, METADATA_TIMEOUT, MAX_METADATA_BYTES).await?;
            let metadata: Metadata =
                serde_json::from_slice(&body).map_err(|e| format!("`{url}`: {e}"))?;
            if metadata.issuer == issuer {
                Ok(metadata)
            } else {
                Err(format!(
                    "`{url}` names issuer `{}`, not `{issuer}`",
                    metadata.issuer
                ))
            }
        };
        match read.await {
            Ok(metadata) => return Ok(metadata),
            Err(e) => failures.push((url, e)),
        }
    }
    Err(SetupError::Metadata(
        failures
            .into_iter()
            .map(|(_, e)| e)
            .collect::<Vec<_>>()
            .join("; then "),
    ))
}

/// An absolute URL, `https` unless on a loopback host.
fn endpoint(what: &str, s: &str) -> Result<url::Url, SetupError> {
    let url = url::Url::parse(s)
        .map_err(|e| SetupError::Metadata(format!("{what} `{s}` is not a URL: {e}")))?;
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    match url.scheme() {
        "https" => Ok(url),
        "http" if loopback => Ok(url),
        _ => Err(SetupError::Metadata(format!(
            "{what} `{s}` must use https (http only on loopback)"
        ))),
    }
}

impl Verifier {
    /// Discovers scrip at `config.issuer` and makes a verifier ready to use:
    /// metadata read (its `issuer` must equal the configured one exactly,
    /// RFC 8414 §3.3), JWKS fetched, and — when following revocations — the
    /// feed read once, then followed by a background task (needs a Tokio
    /// runtime).
    ///
    /// # Errors
    /// [`SetupError`] naming what failed; nothing is retried here.
    pub async fn discover(config: VerifierConfig) -> Result<Self, SetupError> {
        config.validate()?;
        endpoint("issuer", &config.issuer)?;
        // Each request sets its own time limit; this one only bounds any
        // that would not.
        let http = net::http_client(&config.issuer, Duration::from_secs(300))
            .map_err(|e| SetupError::Http(e.to_string()))?;
        let metadata = read_metadata(&http, &config.issuer).await?;
        let jwks_uri = endpoint("jwks_uri", &metadata.jwks_uri)?;
        let keys = keys::JwksCache::new(
            http.clone(),
            jwks_uri.to_string(),
            config.jwks_refresh,
            config.jwks_min_refetch,
            config.jwks_max_age,
        )
        .await
        .map_err(SetupError::Jwks)?;
        let source = match &config.revocation {
            Revocation::DangerIgnore => None,
            Revocation::Follow(feed) => {
                let url = metadata.scrip_revocation_feed_endpoint.ok_or_else(|| {
                    SetupError::Metadata(
                        "metadata lists no `scrip_revocation_feed_endpoint`".into(),
                    )
                })?;
                let url = endpoint("scrip_revocation_feed_endpoint", &url)?;
                let introspection = metadata.introspection_endpoint.ok_or_else(|| {
                    SetupError::Metadata("metadata lists no `introspection_endpoint`".into())
                })?;
                let introspection = endpoint("introspection_endpoint", &introspection)?;
                let source: Arc<dyn FeedSource> = Arc::new(feed::HttpFeed {
                    http,
                    endpoint: url,
                    introspection,
                    identity: feed.identity.clone(),
                });
                Some(source)
            }
        };
        Self::assemble(
            config,
            keys::Keys::Fetched(Arc::new(keys)),
            source,
            FirstRead::Before,
        )
        .await
    }

    /// A verifier inside scrip itself: `keys` are scrip's own public keys
    /// and `feed` reads revocations from its store. Everything else — the
    /// checks, the revocation set, its staleness rule — is as with
    /// [`Verifier::discover`]; `config.revocation`'s timings apply and its
    /// identity is not used. It returns at once: the feed is read and then
    /// followed in the background (needs a Tokio runtime), and until every
    /// page listed at start has been read, every token is refused with
    /// [`VerifyError::RevocationStale`]. So a store with many revocations
    /// does not delay the start of the process around it.
    ///
    /// # Errors
    /// [`SetupError`] when the configuration is inconsistent.
    pub async fn local(
        config: VerifierConfig,
        keys: scrip_jose::SharedKeySet,
        feed: Arc<dyn FeedSource>,
    ) -> Result<Self, SetupError> {
        config.validate()?;
        let source = match config.revocation {
            Revocation::DangerIgnore => None,
            Revocation::Follow(_) => Some(feed),
        };
        Self::assemble(
            config,
            keys::Keys::Local(keys),
            source,
            FirstRead::Background,
        )
        .await
    }

    async fn assemble(
        config: VerifierConfig,
        keys: keys::Keys,
        source: Option<Arc<dyn FeedSource>>,
        first_read: FirstRead,
    ) -> Result<Self, SetupError> {
        let claims = source.clone();
        let (revocations, feed_task) = match (config.revocation, source) {
            (Revocation::Follow(feed), Some(source)) => {
                let revocations =
                    Arc::new(feed::Revocations::new(feed.max_staleness, config.leeway));
                // Every token is refused until every page of what is revoked
                // now has been read (the feed answers in pages; an empty one
                // ends). A discovered verifier reads them before it is
                // returned; a local one leaves that to the follower.
                if first_read == FirstRead::Before {
                    revocations
                        .catch_up(source.as_ref(), MAX_INITIAL_PAGES)
                        .await
                        .map_err(SetupError::Feed)?;
                }
                let task = scrip_vital::spawn(
                    "revocation feed follower",
                    feed::follow(revocations.clone(), source, feed),
                );
                (Some(revocations), Some(Arc::new(FeedTask(task))))
            }
            _ => {
                tracing::warn!(issuer = %config.issuer, "not following revocations: revoked tokens stay valid until they expire");
                (None, None)
            }
        };
        Ok(Self(Arc::new(Inner {
            issuer: config.issuer,
            audiences: vec![config.audience],
            algorithms: config.algorithms,
            typ: TypRule::exactly(scrip_token::typ::ACCESS),
            leeway: config.leeway,
            keys: Arc::new(keys),
            revocations,
            feed_task,
            used_once: Arc::new(std::sync::Mutex::new(std::collections::HashMap::new())),
            claims,
            recent: scrip_jose::Recent::new(RECENT),
            public_url: config.public_url,
            dpop_leeway: config.dpop_leeway,
            claim_single_use: !config.danger_caller_claims_single_use,
            proofs: Arc::new(ReplayCache::new(PROOFS)),
        })))
    }

    /// A verifier for another tool of the same scrip, sharing this one's
    /// keys, revocation set and feed task: one feed follower serves every
    /// tool a process fronts (the proxy's upstreams).
    #[must_use]
    pub fn for_audience(&self, audience: impl Into<String>) -> Self {
        let inner = &self.0;
        Self(Arc::new(Inner {
            issuer: inner.issuer.clone(),
            audiences: vec![audience.into()],
            algorithms: inner.algorithms.clone(),
            typ: inner.typ.clone(),
            leeway: inner.leeway,
            keys: inner.keys.clone(),
            revocations: inner.revocations.clone(),
            feed_task: inner.feed_task.clone(),
            used_once: inner.used_once.clone(),
            claims: inner.claims.clone(),
            recent: scrip_jose::Recent::new(RECENT),
            public_url: inner.public_url.clone(),
            dpop_leeway: inner.dpop_leeway,
            claim_single_use: inner.claim_single_use,
            proofs: inner.proofs.clone(),
        }))
    }

    /// Verifies a request's token as [`VerifierLayer`] does, requiring
    /// `required` when given: `Authorization: Bearer`, or `Authorization:
    /// DPoP` with its `DPoP` proof for this `method` and `uri`.
    ///
    /// # Errors
    /// The RFC 6750 (or RFC 9449 §7.1) [`Rejection`] to answer.
    pub async fn authorize(
        &self,
        method: &http::Method,
        uri: &http::Uri,
        headers: &http::HeaderMap,
        required: Option<&ActionName>,
    ) -> Result<AccessToken, Rejection> {
        let need = required.map_or(layer::Need::Any, layer::Need::Action);
        layer::authorize(self, self.audience(), need, method, uri, headers).await
    }

    /// Verifies a request's token as [`Verifier::authorize`] does, requiring
    /// no action and without spending a single-use token (one already
    /// spent here is refused): to learn whose a request is before it is
    /// refused for another reason (a method no action maps to), or before
    /// the caller spends a single-use token itself, as the proxy does. It
    /// must not be what admits a request to a resource server: that would
    /// let a single-use token be presented many times. So it answers an
    /// [`Unspent`], not an [`AccessToken`].
    ///
    /// # Errors
    /// The RFC 6750 (or RFC 9449 §7.1) [`Rejection`] to answer.
    pub async fn authenticate(
        &self,
        method: &http::Method,
        uri: &http::Uri,
        headers: &http::HeaderMap,
    ) -> Result<Unspent, Rejection> {
        layer::authorize(
            self,
            self.audience(),
            layer::Need::Unspent,
            method,
            uri,
            headers,
        )
        .await
        .map(Unspent)
    }

    /// A verifier of this scrip's tokens for no tool: every token fails
    /// its audience check, after its signature and every claim before, as
    /// at a tool it was not issued for. See [`Verifier::refuse_as`].
    #[must_use]
    pub fn for_no_tool(&self) -> Self {
        // No tool is named "": tool names are 1 to 64 characters.
        self.for_audience(String::new())
    }

    /// The answer, under `realm`, to a request for a tool that is not
    /// here, checked with a [`Verifier::for_no_tool`]: exactly what a tool
    /// that is here answers a request whose token was issued for another
    /// (or has none, or a bad one), so that callers without a token for a
    /// tool cannot tell whether it exists.
    pub async fn refuse_as(
        &self,
        realm: &str,
        method: &http::Method,
        uri: &http::Uri,
        headers: &http::HeaderMap,
    ) -> Rejection {
        match layer::authorize(self, realm, layer::Need::Unspent, method, uri, headers).await {
            Err(rejection) => rejection,
            // Only a verifier with an audience accepts a token.
            Ok(_) => Rejection::from_error(realm, &VerifyError::Token(JoseError::WrongAudience)),
        }
    }

    /// Checks again, while a request it allowed is still going on (a long
    /// upload, a streamed answer), that `token` has not been revoked since,
    /// its task included, and that the revocation set is still fresh: what
    /// [`Verifier::verify`] would say of it now, but for single use (spent
    /// by that request) and a grace on `exp`: a request allowed before the
    /// token expired may go on until `exp` plus the leeway and not after:
    /// scrip publishes no revocation of a task that ran out, so no request
    /// outlives its task's end by more than that. A
    /// single-use token's use is published as a revocation of its `jti`,
    /// so for one only its task is looked up. Cheap: no network call, one
    /// read lock.
    ///
    /// # Errors
    /// [`VerifyError::Revoked`]; [`VerifyError::RevocationStale`] when
    /// the revocation set is older than `max_staleness`; `Token(Expired)`
    /// past `exp` plus the leeway.
    pub fn recheck(&self, token: &AccessToken) -> Result<(), VerifyError> {
        if past_leeway(token.claims.exp, self.0.leeway, feed::unix_now()) {
            return Err(VerifyError::Token(JoseError::Expired));
        }
        let Some(revocations) = &self.0.revocations else {
            return Ok(());
        };
        let single_use = token.claims.approval.as_ref().is_some_and(|a| a.single_use);
        if single_use {
            revocations.check_task(&token.claims.txn)
        } else {
            revocations.check(&token.claims.txn, &token.claims.jti)
        }
    }

    /// The URL a request for `path` is made to, as a DPoP proof names it;
    /// `None` without [`VerifierConfig::public_url`].
    pub(crate) fn request_url(&self, path: &str) -> Option<String> {
        self.0
            .public_url
            .as_ref()
            .map(|base| format!("{base}{path}"))
    }

    /// Whether this verifier can accept tokens: it does not follow
    /// revocations, or it has read every revocation listed when it started
    /// (see [`Verifier::local`]) and its set is not stale (past
    /// `max_staleness` every token is refused, so a load balancer should
    /// send requests elsewhere).
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.0.revocations.as_ref().is_none_or(|r| r.fresh())
    }

    /// Whether this verifier does not follow revocations, or has read every
    /// revocation listed when it started, fresh now or not.
    #[must_use]
    pub fn has_caught_up(&self) -> bool {
        self.0.revocations.as_ref().is_none_or(|r| r.caught_up())
    }

    /// The tool name this verifier accepts tokens for.
    #[must_use]
    pub fn audience(&self) -> &str {
        self.0.audiences.first().map_or("", String::as_str)
    }

    /// Verifies an access token.
    ///
    /// # Errors
    /// [`VerifyError`] naming the first check that failed.
    pub async fn verify(&self, token: &str) -> Result<AccessToken, VerifyError> {
        self.check(token, layer::Need::Any, None).await
    }

    /// Verifies a DPoP-bound access token (RFC 9449 §7) with the request's
    /// `DPoP` proof: every check of [`Verifier::verify`], then the proof's
    /// signature, `htm` (`method`), `htu` (`url`, the request's URL as the
    /// client named it), `iat`, `ath`, that its key is the one the token is
    /// bound to, and that the proof was not presented before. `required`,
    /// when given, must be in the token's scope.
    ///
    /// # Errors
    /// As [`Verifier::verify`]; [`VerifyError::Proof`] for a bad proof and
    /// [`VerifyError::NotBound`] for a token not bound to a key.
    pub async fn verify_dpop(
        &self,
        token: &str,
        proof: &str,
        method: &str,
        url: &str,
        required: Option<&ActionName>,
    ) -> Result<AccessToken, VerifyError> {
        let need = required.map_or(layer::Need::Any, layer::Need::Action);
        self.check(token, need, Some((proof, method, url))).await
    }

    pub(crate) async fn check(
        &self,
        token: &str,
        need: layer::Need<'_>,
        dpop: Option<(&str, &str, &str)>,
    ) -> Result<AccessToken, VerifyError> {
        let inner = &self.0;
        let expectations = Expectations {
            issuer: &inner.issuer,
            audiences: &inner.audiences,
            algorithms: &inner.algorithms,
            typ: &inner.typ,
            leeway: inner.leeway,
        };
        let keys = inner.keys.current().await?;
        let digest = scrip_jose::token_digest(token);
        let mut accepted = match inner.recent.get(&digest, &keys, inner.leeway) {
            Some(kept) => kept,
            None => {
                let (verified, keys) =
                    match scrip_jose::verify::<AccessClaims>(token, &keys, &expectations) {
                        Err(JoseError::UnknownKey) => match inner.keys.refetch(&keys).await {
                            Some(fresh) => (
                                scrip_jose::verify::<AccessClaims>(token, &fresh, &expectations)?,
                                fresh,
                            ),
                            None => return Err(JoseError::UnknownKey.into()),
                        },
                        other => (other?, keys),
                    };
                let actions =
                    ActionSet::parse(&verified.claims.scope).map_err(|_| VerifyError::BadScope)?;
                let accepted = AccessToken {
                    claims: verified.claims,
                    actions,
                    kid: verified.kid,
                    alg: verified.alg,
                    proof: None,
                };
                inner
                    .recent
                    .put(digest, keys, verified.validity, accepted.clone());
                accepted
            }
        };
        // How the token is presented must fit it before anything else is
        // said about it: a bound token as a bearer token is a stolen one.
        match (&accepted.claims.cnf, dpop) {
            (Some(_), None) => return Err(VerifyError::ProofRequired),
            (None, Some(_)) => return Err(VerifyError::NotBound),
            _ => {}
        }
        // Then the proof of its key: one who cannot prove it learns
        // nothing more of the token, not even that it was revoked or what
        // it may not do (RFC 9449 §7.1).
        accepted.proof = self.check_binding(token, &accepted, dpop)?;
        if let Some(revocations) = &inner.revocations {
            revocations.check(&accepted.claims.txn, &accepted.claims.jti)?;
        }
        if let layer::Need::Action(action) = need
            && !accepted.actions.contains(action)
        {
            // Checked before a single-use token is spent.
            return Err(VerifyError::InsufficientScope {
                required: action.to_string(),
            });
        }
        let single_use = accepted
            .claims
            .approval
            .as_ref()
            .is_some_and(|a| a.single_use);
        if inner.claim_single_use && single_use && matches!(need, layer::Need::Unspent) {
            // Not spent by this presentation, but refused once spent here.
            let spent = inner
                .used_once
                .lock()
                .map_or(true, |used| used.contains_key(&accepted.claims.jti));
            if spent {
                return Err(VerifyError::AlreadyUsed);
            }
        } else if inner.claim_single_use && single_use {
            {
                let mut used = inner
                    .used_once
                    .lock()
                    .map_err(|_| VerifyError::AlreadyUsed)?;
                let (now, at) = (feed::unix_now(), std::time::Instant::now());
                if used.len() > 10_000 {
                    // Kept while `verify` would still accept the token, so
                    // it cannot be presented again.
                    used.retain(|_, kept| kept.live(now, at));
                }
                let kept = KeptUntil::new(accepted.claims.exp, inner.leeway, now, at);
                if used.insert(accepted.claims.jti.clone(), kept).is_some() {
                    return Err(VerifyError::AlreadyUsed);
                }
            }
            // This process has not seen it; scrip says whether another has
            // (another replica of this resource server, or of the proxy).
            if let Some(source) = &inner.claims {
                // Unmarked unless scrip answered: on a failure, or when
                // this request is dropped while it waits (its client went
                // away), the use was not confirmed and may be tried again.
                let mut mark = Unmark {
                    used: &inner.used_once,
                    jti: &accepted.claims.jti,
                    armed: true,
                };
                match source.claim_once(token).await {
                    Ok(true) => mark.armed = false,
                    Ok(false) => {
                        mark.armed = false;
                        return Err(VerifyError::AlreadyUsed);
                    }
                    Err(e) => {
                        tracing::warn!(jti = %accepted.claims.jti, error = %e, "cannot claim a single-use token's use");
                        return Err(VerifyError::UseUnconfirmed);
                    }
                }
            }
        }
        Ok(accepted)
    }

    /// Verifies an access token and requires `action` in its scope.
    ///
    /// # Errors
    /// As [`Verifier::verify`], and [`VerifyError::InsufficientScope`].
    pub async fn verify_for(
        &self,
        token: &str,
        action: &ActionName,
    ) -> Result<AccessToken, VerifyError> {
        self.check(token, layer::Need::Action(action), None).await
    }

    /// A DPoP-bound token's proof: by its key, for this request, once (in
    /// this process; the proof's use is given back to be recorded where
    /// other processes see it). That a bound token came with a proof and an
    /// unbound one without was checked already, in [`Verifier::check`].
    fn check_binding(
        &self,
        token: &str,
        accepted: &AccessToken,
        dpop: Option<(&str, &str, &str)>,
    ) -> Result<Option<ProofUse>, VerifyError> {
        let inner = &self.0;
        let (Some(cnf), Some((proof, method, url))) = (&accepted.claims.cnf, dpop) else {
            return Ok(None);
        };
        if !dpop::plain_target(url) {
            return Err(VerifyError::Proof(
                "DPoP proof cannot name this request: its path is not in normal form (`\\`, `.` or `..` segments)".into(),
            ));
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let check = ProofCheck {
            method,
            url,
            access_token: Some(token),
            now,
            max_age: dpop::MAX_PROOF_AGE,
            leeway: inner.dpop_leeway,
        };
        let proof =
            dpop::verify_proof(proof, &check).map_err(|e| VerifyError::Proof(e.to_string()))?;
        if proof.jkt != cnf.jkt {
            return Err(VerifyError::Proof(
                "DPoP proof is signed by another key than the token is bound to".into(),
            ));
        }
        inner
            .proofs
            .first_use(&proof, &check)
            .map_err(|e| VerifyError::Proof(e.to_string()))?;
        Ok(Some(ProofUse {
            id: proof.replay_id(),
            iat: proof.iat,
            until: proof.kept_until(&check),
        }))
    }
}

/// Whether a token of `exp` is past it and the `leeway` at `now` (whole
/// seconds, rounded down), as [`scrip_jose::verify`] judges it: at
/// `now == exp + leeway` the true time is already past.
fn past_leeway(exp: u64, leeway: u64, now: u64) -> bool {
    now >= exp.saturating_add(leeway)
}

#[cfg(test)]
mod tests {
    use super::KeptUntil;

    /// A stream is cut off in the second verification would refuse its
    /// token, not one later.
    #[test]
    fn a_recheck_ends_where_verification_does() {
        assert!(!super::past_leeway(1_000, 30, 1_029));
        assert!(super::past_leeway(1_000, 30, 1_030));
        assert!(super::past_leeway(1_000, 0, 1_000));
        assert!(!super::past_leeway(u64::MAX, 30, u64::MAX - 1));
    }
    use std::time::{Duration, Instant};

    /// A spent single-use `jti` is kept while either clock says its token
    /// may still pass: a wall clock stepped ahead does not free it to be
    /// presented again.
    #[test]
    fn a_spent_use_is_kept_by_either_clock() {
        let at = Instant::now();
        let secs = Duration::from_secs;
        // `exp` 1,000 with a 30 s leeway, spent at 900: 130 s to go.
        let kept = KeptUntil::new(1_000, 30, 900, at);
        assert!(kept.live(1_000, at));
        // The wall clock stepped far ahead: kept, by the monotonic clock.
        assert!(kept.live(u64::MAX, at + secs(129)));
        // The wall clock stepped back: kept, by the wall clock.
        assert!(kept.live(1_030, at + secs(1_000)));
        // Both past it: dropped.
        assert!(!kept.live(1_031, at + secs(131)));
        // Spent after it expired (a leeway of its own): kept no time.
        assert!(!KeptUntil::new(1_000, 0, 2_000, at).live(2_000, at + secs(1)));
    }
}
