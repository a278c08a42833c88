//! The scrip token service: an axum application serving the OAuth token
//! endpoint (RFC 8693), revocation (RFC 7009), introspection (RFC 7662),
//! metadata (RFC 8414) and the JWKS, plus the background work that keeps it
//! honest: policy reload and task expiry.
//!
//! [`router`] is separate from [`Server::run`] so that tests can drive the
//! application in-process; [`Server::bind`] does every start-up check and
//! refuses to start on any problem.
//!
//! Architecture invariant: no handler returns a credential before the
//! store has durably committed the audit record of the decision that issued
//! it; an unavailable store answers 503 `temporarily_unavailable`, and
//! stored data that cannot be read back 500 `server_error`.

mod approval;
pub mod attest;
pub mod audit;
mod background;
mod cache;
mod delegate;
mod error;
mod exchange;
mod feed;
mod form;
pub mod http;
mod introspect;
pub mod keyring;
pub mod keys;
mod limits;
mod logs;
pub mod policies;
mod refusals;
mod revoke;
mod state;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use scrip_config::Config;
use scrip_identity::IdentityVerifier;
use scrip_jose::TypRule;
use scrip_store::Write;
use scrip_token::{TOKEN_EXCHANGE_GRANT, typ};

pub use error::OAuthError;
pub use refusals::PER_SECOND as REFUSALS_PER_SECOND;
pub use state::AppState;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] scrip_config::ConfigError),
    /// The listen address could not be bound.
    #[error("cannot listen on `{addr}`: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The data directory or a key is unusable.
    #[error(transparent)]
    Keys(#[from] keys::KeyError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] scrip_store::StoreError),
    /// The policies are invalid.
    #[error(transparent)]
    Policy(#[from] scrip_policy::PolicyError),
    /// A trusted issuer is unusable.
    #[error(transparent)]
    Identity(#[from] scrip_identity::SetupError),
    /// The local attestation socket is unusable.
    #[error(transparent)]
    Socket(#[from] attest::SocketError),
    /// The proxy (`[[upstreams]]`) could not be set up.
    #[error("proxy: {0}")]
    Proxy(String),
    /// The server failed while running.
    #[error("server error: {0}")]
    Serve(std::io::Error),
}

/// Paths of the endpoints, relative to the issuer.
pub mod paths {
    /// RFC 8414 metadata.
    pub const METADATA: &str = "/.well-known/oauth-authorization-server";
    /// The token endpoint.
    pub const TOKEN: &str = "/token";
    /// The revocation endpoint.
    pub const REVOKE: &str = "/revoke";
    /// The introspection endpoint.
    pub const INTROSPECT: &str = "/introspect";
    /// The JWKS.
    pub const JWKS: &str = "/jwks";
    /// Pending approvals (for approvers).
    pub const APPROVALS: &str = "/approvals";
    /// The revocation feed.
    pub const REVOCATIONS: &str = "/revocations";
    /// The public key of the audit checkpoints (a JWKS).
    pub const AUDIT_KEYS: &str = "/audit/keys";
}

/// A bound, fully checked server, ready to [`run`](Server::run).
#[derive(Debug)]
pub struct Server {
    listener: tokio::net::TcpListener,
    /// `metrics_listen`'s, when a proxy is mounted.
    metrics: Option<tokio::net::TcpListener>,
    attest: attest::Socket,
    state: AppState,
    /// The legacy bridge, when `[[upstreams]]` are configured.
    proxy: Option<scrip_proxy::Proxy>,
    /// The reload signal, taken at the end of bind (a SIGHUP before that
    /// ends the process unless the caller took it over first, as the CLI
    /// does from its start).
    hangup: Option<tokio::signal::unix::Signal>,
}

/// RFC 8414 metadata. It names no tool or action (`scopes_supported` is
/// left out, as RFC 8414 §2 allows): the configured tools, actions and
/// environments are for trusted workloads only, whom the token endpoint
/// tells what they may ask.
fn metadata(issuer: &str, config: &Config, keyring: &keyring::Keyring) -> serde_json::Value {
    serde_json::json!({
        "issuer": issuer,
        "token_endpoint": format!("{issuer}{}", paths::TOKEN),
        "jwks_uri": format!("{issuer}{}", paths::JWKS),
        "introspection_endpoint": format!("{issuer}{}", paths::INTROSPECT),
        "revocation_endpoint": format!("{issuer}{}", paths::REVOKE),
        "grant_types_supported": [TOKEN_EXCHANGE_GRANT, approval::CIBA_GRANT],
        "response_types_supported": [],
        "token_endpoint_auth_methods_supported": ["none"],
        "revocation_endpoint_auth_methods_supported": ["none"],
        "introspection_endpoint_auth_methods_supported": ["bearer"],
        "token_exchange_subject_token_types_supported": [
            scrip_token::token_type::JWT,
            scrip_token::token_type::TXN_TOKEN,
        ],
        // On a shared store the key set rotates to the algorithm of the
        // replica that rotates it, so any of them may sign.
        "access_token_signing_alg_values_supported": if config.database_url.is_some() {
            let mut algs = vec![config.signing_algorithm.as_str()];
            algs.extend(
                scrip_jose::SigningAlgorithm::ALL
                    .iter()
                    .map(|a| a.as_str())
                    .filter(|a| *a != config.signing_algorithm.as_str()),
            );
            algs
        } else {
            // With a former algorithm's key still published (its tokens
            // still valid), that algorithm too.
            keyring.published_algorithms()
        },
        // Only CIBA's poll grant is borrowed (a step is asked through the
        // token exchange): no CIBA delivery modes, which a CIBA client would
        // read as a provider with a backchannel authentication endpoint.
        "dpop_signing_alg_values_supported": scrip_jose::dpop::DPOP_ALGORITHMS
            .iter()
            .map(|a| format!("{a:?}"))
            .collect::<Vec<_>>(),
        "scrip_audit_checkpoint_keys_uri": format!("{issuer}{}", paths::AUDIT_KEYS),
        "scrip_revocation_feed_endpoint": format!("{issuer}{}", paths::REVOCATIONS),
    })
}

impl Server {
    /// Checks everything and binds the listen address: configuration, data
    /// directory, signing key (created on first start), store, policies
    /// (validated, and every tool action declared), trusted issuers.
    ///
    /// # Errors
    /// [`StartError`] naming the first problem.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        config.validate()?;
        for warning in config.cleartext_warnings(false) {
            tracing::warn!("{warning}");
        }
        // People, not entries: one person may be listed by a uid and by
        // an issuer and subject.
        let people: std::collections::BTreeSet<&str> =
            config.approvers.iter().map(|a| a.name.as_str()).collect();
        if !config.separation_of_duties && people.len() > 1 {
            tracing::warn!(
                approvers = people.len(),
                "separation_of_duties is off with several approvers: a person whose identity is also an agent's (or in its delegation chain) may approve that agent's own step; turn it off only where one person runs everything"
            );
        }
        // What the proxy would refuse of the configuration alone, before
        // anything (a key, a record) is written.
        scrip_proxy::check_routes(&config).map_err(|e| StartError::Proxy(e.to_string()))?;
        keys::ensure_private_dir(&config.data_dir)?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.listen,
                source,
            })?;
        let local = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let issuer = config
            .issuer
            .clone()
            .unwrap_or_else(|| format!("http://{local}"));
        // What can refuse the start comes before the keys are made: keys
        // made by a start that fails stay, and their records with them, in
        // commits no later commit of that process signs. What needs no
        // store comes before the store is opened, which migrates it: a
        // start refused for its policies, its issuers or a socket another
        // scrip serves leaves the schema as it was, so the version it
        // replaces can still start.
        let (policy_seen, policy) = policies::load_at_start(&config.policy_dir).await?;
        policy.check_tools(&config.tools)?;
        let identities =
            IdentityVerifier::new(&config.trusted_issuers, &issuer, config.clock_skew)?;
        let attest = attest::Socket::bind(&config)?;
        let store = scrip_store::open(
            config.database_url.as_deref(),
            &config.data_dir.join("scrip.db"),
        )
        .await?;
        let replica = replica_name(local);
        // The proxy's key-encryption key (refused when it opens none of
        // the store's secrets) and its metrics listener (refused when the
        // address is taken).
        let proxy_kek = if config.upstreams.is_empty() {
            None
        } else {
            Some(keys::store_kek(&config, store.as_ref()).await?)
        };
        let metrics_listener = match (&proxy_kek, config.metrics_listen) {
            (Some(_), Some(addr)) => Some(bind_metrics(addr).await?),
            _ => None,
        };
        // Every commit from here on signs this process's chain head in the
        // same transaction (the shared keys' own commit too: the key set
        // that signs is made ready to before it).
        let keyring = if config.database_url.is_some() {
            // Audited in the commit that stored them.
            keyring::Keyring::shared(&config, store.as_ref(), state::now(), &replica)
                .await?
                .0
        } else {
            keyring::checkpoint_key_kept(&config, store.as_ref()).await?;
            let (keyring, created) = keyring::Keyring::from_files(&config, state::now())?;
            let keyring = std::sync::Arc::new(keyring);
            store.sign_heads_with(keyring.clone());
            // On the record before they sign anything; until the files are
            // marked, every start records them.
            if !created.keys.is_empty() {
                store.commit(key_audit(&replica, &created)).await?;
                created.recorded();
            }
            keyring
        };
        // Local attestation identities are signed with the same keys.
        let identities = identities.with_local(
            &format!("{issuer}/local"),
            keyring.verify_keys().clone(),
            keyring.algorithms().to_vec(),
            &issuer,
        );

        store
            .commit(vec![policies::loaded_record(
                &replica,
                &policy,
                &config.policy_dir,
            )])
            .await?;
        if policy.is_empty() {
            tracing::warn!(dir = %config.policy_dir.display(), "no policies loaded: every request will be denied");
        }
        if config.tools.is_empty() {
            tracing::warn!(
                "no [[tools]] configured: every task asking for a grant is refused (unknown tool); see docs/configuration.md, or examples/quickstart.toml"
            );
        }
        tracing::info!(issuer = %issuer, kid = %keyring.signer(state::now()).kid(), store = if keyring.is_shared() { "postgres" } else { "sqlite" }, policies = policy.len(), policy_set = %policy.digest(), tools = config.tools.len(), "scrip ready");

        let generation = keyring.generation();
        let inner = state::Inner {
            stopping: tokio::sync::watch::Sender::new(false),
            feed: feed::Head::new(),
            self_audience: vec![issuer.clone()],
            keyring,
            polls: approval::Polls::default(),
            refusals: Arc::default(),
            limits: limits::Limits::new(&config.limits),
            dpop_proofs: scrip_jose::dpop::ReplayCache::new(exchange::DPOP_PROOFS),
            used_once: std::sync::Mutex::new(std::collections::HashMap::new()),
            announced: std::sync::Mutex::new(std::collections::HashMap::new()),
            webhook: config
                .approval_webhook
                .clone()
                .map(|url| {
                    // The URL's path or query may be the receiver's secret:
                    // never through a proxy when it is on this machine.
                    let http =
                        scrip_verifier::net::http_client(&url, std::time::Duration::from_secs(5))
                            .map_err(|e| StartError::Serve(std::io::Error::other(e.to_string())))?;
                    Ok::<_, StartError>(Arc::new(state::Webhook {
                        url,
                        http,
                        sending: Arc::new(tokio::sync::watch::Sender::new(0)),
                        announcing: Arc::new(tokio::sync::watch::Sender::new(0)),
                    }))
                })
                .transpose()?,
            identities,
            policy: policies::Policies::new(
                policy,
                policy_seen,
                &config,
                store.clone(),
                replica.clone(),
            ),
            replica,
            task_typ: TypRule::exactly(typ::TASK),
            access_typ: TypRule::exactly(typ::ACCESS),
            cache: cache::ExchangeCache::new(store.changes(), generation),
            store,
            issuer,
            config,
        };
        let state = AppState(Arc::new(inner));
        let proxy = match proxy_kek {
            Some(kek) => Some(mount_proxy(&state, kek).await?),
            None => None,
        };
        let metrics = match (&proxy, state.0.config.metrics_listen) {
            (Some(_), Some(_)) => metrics_listener,
            (None, Some(_)) => {
                tracing::warn!(
                    "metrics_listen is set, but no [[upstreams]] are: there are no metrics to serve"
                );
                None
            }
            (Some(_), None) => {
                tracing::info!(
                    "the proxy's /metrics is not served: set metrics_listen to serve it (apart from the API)"
                );
                None
            }
            (None, None) => None,
        };
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        Ok(Self {
            listener,
            metrics,
            attest,
            state,
            proxy,
            hangup,
        })
    }

    /// Reloads on `hangup` rather than on the SIGHUP listener taken at the
    /// end of bind: one taken before start-up began also answers a SIGHUP
    /// that came during it (a listener remembers one signal).
    #[must_use]
    pub fn reload_on(mut self, hangup: Option<tokio::signal::unix::Signal>) -> Self {
        if hangup.is_some() {
            self.hangup = hangup;
        }
        self
    }

    /// The bound address.
    ///
    /// # Errors
    /// The socket's error.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The issuer this server signs as.
    #[must_use]
    pub fn issuer(&self) -> &str {
        &self.state.0.issuer
    }

    /// The policy directory.
    #[must_use]
    pub fn policy_dir(&self) -> PathBuf {
        self.state.0.config.policy_dir.clone()
    }

    /// Serves until `shutdown` completes, with policy reload (SIGHUP and
    /// file changes) and task expiry running beside.
    ///
    /// # Errors
    /// [`StartError::Serve`] if the listener fails.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        self.run_until(shutdown, std::future::pending()).await
    }

    /// [`Server::run`], with a second future that, once `shutdown` has
    /// begun, ends the wait for requests still at work (the rest of the
    /// shutdown, the final commit included, still happens).
    ///
    /// # Errors
    /// As [`Server::run`].
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
        hurry: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let background = background::spawn(self.state.clone(), self.hangup);
        let metrics = match (self.metrics, &self.proxy) {
            (Some(listener), Some(proxy)) => Some(serve_metrics(
                listener,
                proxy,
                self.state.0.config.http_header_timeout,
            )),
            _ => None,
        };
        let attest = attest::spawn(self.attest, self.state.clone());
        let state = self.state.clone();
        let mut app = router(self.state);
        let proxy = self.proxy.clone();
        app = app.route(
            "/readyz",
            get(move || {
                // Caught up, not fresh: a store down takes the proxied
                // requests (503) but not this whole replica out of service.
                let ready = proxy.as_ref().is_none_or(scrip_proxy::Proxy::has_caught_up);
                async move { readiness(ready) }
            }),
        );
        if let Some(proxy) = &self.proxy {
            app = app.merge(proxy.router());
        }
        let app = with_fallbacks(app);
        let mut limits = http::Limits::new(state.0.config.http_header_timeout);
        if self.proxy.is_some() {
            limits = limits.proxying();
        }
        let stopping = state.clone();
        let shutdown = async move {
            shutdown.await;
            stopping.0.stopping.send_replace(true);
        };
        let result = http::serve_until(self.listener, app, limits, shutdown, hurry)
            .await
            .map_err(StartError::Serve);
        background.abort();
        if let Some(metrics) = metrics {
            metrics.abort();
        }
        attest.stop().await;
        state.0.stopping.send_replace(true);
        // The refusals counted past their budget (the stop woke their
        // writers).
        if tokio::time::timeout(
            std::time::Duration::from_secs(5),
            state.0.refusals.flush(state.0.store.as_ref()),
        )
        .await
        .is_err()
        {
            state.0.refusals.abandon();
        }
        // Store what the proxy writes in the background (each commit signs
        // this process's chain head).
        if let Some(proxy) = &self.proxy {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), proxy.flush()).await;
        }
        // Approvers told of a step just asked: a stop (a rolling deploy)
        // would otherwise cut the call or its retries short, and nobody
        // would call again.
        if let Some(webhook) = &state.0.webhook {
            webhook.finish(WEBHOOK_FINISH).await;
        }
        // An empty commit waits for the batches queued before it (and
        // starts and signs a replacing chain after a commit whose outcome
        // was unknown, linking what that commit left).
        let _ = state.0.store.commit(Vec::new()).await;
        result
    }
}

/// The most connections `metrics_listen` keeps open.
const METRICS_CONNECTIONS: usize = 16;

/// Binds `metrics_listen`.
///
/// # Errors
/// [`StartError::Bind`] when the address cannot be listened on.
pub async fn bind_metrics(addr: SocketAddr) -> Result<tokio::net::TcpListener, StartError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

/// Serves `proxy`'s `/metrics` on `listener` (with the API's limits, and
/// [`METRICS_CONNECTIONS`] connections at most) until
/// the task is aborted: a scrape is only a read, so a stop need not wait.
pub fn serve_metrics(
    listener: tokio::net::TcpListener,
    proxy: &scrip_proxy::Proxy,
    header_timeout: u64,
) -> tokio::task::JoinHandle<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics listening");
    }
    let app = with_fallbacks(proxy.metrics_router());
    // A scraper needs a connection or two: the descriptors stay the API's.
    let limits = http::Limits::new(header_timeout).at_most(METRICS_CONNECTIONS);
    scrip_vital::spawn("metrics listener", async move {
        let _ = http::serve_until(
            listener,
            app,
            limits,
            std::future::pending(),
            std::future::pending(),
        )
        .await;
    })
}

/// How long a stop waits for approval webhook calls under way.
const WEBHOOK_FINISH: std::time::Duration = std::time::Duration::from_secs(5);

/// The proxy of `[[upstreams]]`, verifying tokens with scrip's own keys and
/// following revocations straight from the store (the verifier's code path,
/// without HTTP to itself).
async fn mount_proxy(
    state: &AppState,
    kek: scrip_jose::Kek,
) -> Result<scrip_proxy::Proxy, StartError> {
    let st = &state.0;
    let config = &st.config;
    let kek = scrip_proxy::Kek::new(kek);
    let first = config
        .upstreams
        .first()
        .map(|u| u.name.to_string())
        .unwrap_or_default();
    // The identity is not used: the feed is read from the store.
    let identity = Arc::new(scrip_verifier::StaticIdentity::new(""));
    let mut vc = scrip_verifier::VerifierConfig::new(st.issuer.clone(), first, identity);
    vc.algorithms = st.keyring.algorithms().to_vec();
    // Another replica's clock issued some of these tokens: allow the skew
    // between clocks, as resource servers do. (The task must still be
    // active, which is checked against this replica's clock.)
    vc.leeway = config.clock_skew;
    // The proxy is at `<issuer>/proxy/...`: DPoP proofs name that URL.
    vc.public_url = Some(st.issuer.clone());
    // A DPoP proof comes from the agent's clock.
    vc.dpop_leeway = config.clock_skew;
    // The proxy claims a single use itself, with its `allow` record.
    vc.danger_caller_claims_single_use = true;
    let verifier = scrip_verifier::Verifier::local(
        vc,
        st.keyring.verify_keys().clone(),
        Arc::new(feed::LocalFeed(state.clone())),
    )
    .await
    .map_err(|e| StartError::Proxy(e.to_string()))?;
    let policy_state = state.clone();
    let proxy = scrip_proxy::Proxy::new(
        config,
        scrip_proxy::Parts {
            store: st.store.clone(),
            policy: Arc::new(move || policy_state.0.policy()),
            verifier,
            kek,
            replica: st.replica.clone(),
        },
    )
    .map_err(|e| StartError::Proxy(e.to_string()))?;
    tracing::info!(
        upstreams = config.upstreams.len(),
        "proxy mounted at /proxy/<upstream>/"
    );
    Ok(proxy)
}

/// `GET /readyz`: 200 once every part of this process serves (the token
/// endpoints do from the start; a mounted proxy once its revocation set is
/// loaded), 503 with `Retry-After` before. `/healthz` only says it is alive.
#[must_use]
pub fn readiness(ready: bool) -> axum::response::Response {
    if ready {
        (axum::http::StatusCode::OK, "ready").into_response()
    } else {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, HeaderValue::from_static("1"))],
            "loading the revocation set",
        )
            .into_response()
    }
}

fn replica_name(addr: SocketAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}:{}:{}", addr.port(), std::process::id())
}

/// The audit records of keys created or retired.
fn key_audit(replica: &str, created: &keyring::Created) -> Vec<Write> {
    created
        .keys
        .iter()
        .map(|(kid, what)| {
            let event = if what.contains("retired") {
                "key.retired"
            } else {
                "key.created"
            };
            let mut a = audit_record(replica, event);
            a.jti = Some(kid.clone());
            a.reason = Some(what.clone());
            Write::Audit(Box::new(a))
        })
        .collect()
}

fn audit_record(replica: &str, event: &str) -> scrip_store::AuditEvent {
    scrip_store::AuditEvent {
        at_ms: state::now_ms(),
        event: event.to_owned(),
        replica: replica.to_owned(),
        ..Default::default()
    }
}

/// A JSON document that caches (an HTTP cache in front of scrip, a client
/// that honours `Cache-Control`) may keep `max_age` seconds.
fn json_body(body: String, max_age: u64) -> axum::response::Response {
    let cache = HeaderValue::from_str(&format!("max-age={max_age}"))
        .unwrap_or_else(|_| HeaderValue::from_static("no-cache"));
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::CACHE_CONTROL, cache),
        ],
        body,
    )
        .into_response()
}

/// How long the metadata may be cached.
const METADATA_MAX_AGE: u64 = 300;

/// How long key sets may be cached: no longer than a new key is published
/// before it signs (`signing_key_lead`), or a cache would still serve the
/// set without it when tokens signed by it arrive.
fn keys_max_age(config: &Config) -> u64 {
    config.signing_key_lead.min(METADATA_MAX_AGE)
}

/// The HTTP application.
pub fn router(state: AppState) -> Router {
    // Made for each request (they are few): the algorithms it names follow
    // the key set, which drops a former algorithm's key once its tokens
    // have expired.
    let metadata_body = |st: &AppState| {
        json_body(
            metadata(&st.0.issuer, &st.0.config, &st.0.keyring).to_string(),
            METADATA_MAX_AGE,
        )
    };
    // RFC 8414 §3.1: an issuer with a path (`https://host/tenant`) has its
    // metadata at `/.well-known/oauth-authorization-server/tenant`. A front
    // proxy that strips the issuer's path sends the rest to the plain path;
    // one that forwards the well-known path as it is, to this one. The raw
    // path is compared, as a client builds it from the issuer's text.
    let at_issuer_path = format!(
        "{}{}",
        paths::METADATA,
        scrip_token::issuer_path(&state.0.issuer)
    );
    Router::new()
        .route(
            paths::METADATA,
            get(move |State(st): State<AppState>| async move { metadata_body(&st) }),
        )
        .route(
            "/.well-known/oauth-authorization-server/{*path}",
            get(
                move |State(st): State<AppState>, uri: axum::http::Uri| async move {
                    if uri.path() == at_issuer_path {
                        metadata_body(&st)
                    } else {
                        not_found().into_response()
                    }
                },
            ),
        )
        .route(
            paths::JWKS,
            get(|State(st): State<AppState>| async move {
                // A shared key set not read for a while (the store out of
                // this replica's reach) may still list keys withdrawn since:
                // a resource server is sent elsewhere, or keeps its own.
                if let Some(stale) = st.0.keyring.stale_for() {
                    static STALE: logs::Budget = logs::Budget::new(1);
                    if STALE.allow("key set stale") {
                        tracing::warn!(
                            stale_s = stale.as_secs(),
                            "the shared key set has not been read for {} s: /jwks answers 503 until it is",
                            stale.as_secs()
                        );
                    }
                    return error::OAuthError::unavailable_for(
                        "this replica has not read the key set for a while, and cannot vouch for it; try again shortly (or another replica)",
                        5,
                    )
                    .into_response();
                }
                json_body(
                    st.0.keyring.jwks_body().to_string(),
                    keys_max_age(&st.0.config),
                )
            }),
        )
        .route(
            paths::AUDIT_KEYS,
            get(|State(st): State<AppState>| async move {
                json_body(
                    st.0.keyring.audit_keys_body().to_string(),
                    keys_max_age(&st.0.config),
                )
            }),
        )
        .route(
            paths::TOKEN,
            post(exchange::token_endpoint).layer(axum::middleware::from_fn(to_the_end)),
        )
        .route(
            paths::REVOKE,
            post(revoke::revoke_endpoint).layer(axum::middleware::from_fn(to_the_end)),
        )
        .route(paths::REVOCATIONS, get(feed::feed_endpoint))
        .route(paths::APPROVALS, get(approval::list_endpoint))
        .route("/approvals/{id}", get(approval::show_endpoint))
        .route(
            "/approvals/{id}/approve",
            post(approval::approve_endpoint).layer(axum::middleware::from_fn(to_the_end)),
        )
        .route(
            "/approvals/{id}/deny",
            post(approval::deny_endpoint).layer(axum::middleware::from_fn(to_the_end)),
        )
        .route(
            paths::INTROSPECT,
            post(introspect::introspect_endpoint).layer(axum::middleware::from_fn(to_the_end)),
        )
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state)
}

/// A layer that runs an endpoint's handler on a task of its own, which the
/// connection only waits for. A client that goes away mid-request makes
/// hyper drop what answers it; the handler is not cut off with it, between
/// a decision and its record, or between a commit and what follows it
/// (the recorded refusal after a commit that found the task ended, the
/// decisions of an approval after its reads). Every decision an endpoint
/// makes is thus recorded whether or not anyone reads the answer. A
/// handler's panic (a bug) answers `server_error`.
async fn to_the_end(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let handlers = request.extensions().get::<http::Handlers>().cloned();
    let response = match handlers {
        Some(handlers) => handlers.run(next.run(request)).await,
        // Not served by `http::serve`: on a task of the runtime's own.
        None => tokio::spawn(next.run(request)).await.ok(),
    };
    // A handler that did not end: a panic (a bug, logged by the panic
    // hook), or a stop that could not wait for it.
    response.unwrap_or_else(|| error::OAuthError::server_error().into_response())
}

/// The answers for a wrong method and for a path that is no endpoint, for
/// `app` once every route is in it (axum gives them only to the routes
/// added before): RFC 6749 §5.2 JSON, not to be cached (axum adds the
/// `Allow` header to the first).
pub fn with_fallbacks(app: Router) -> Router {
    app.method_not_allowed_fallback(|| async { error::OAuthError::method_not_allowed() })
        .fallback(|| async { not_found() })
}

/// The answer for a path that is no endpoint.
fn not_found() -> error::OAuthError {
    error::OAuthError::not_found("no such endpoint; see /.well-known/oauth-authorization-server")
}
