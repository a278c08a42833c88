//! scrip's legacy bridge: a reverse proxy in front of APIs that only take a
//! static key. The agent calls `/proxy/<upstream>/<path>` with its scrip
//! access token; the proxy verifies the token (through `scrip-verifier`,
//! revocation included), maps the request to an action (GET → `read`, ...),
//! requires that action in the token's scope, asks Cedar about the concrete
//! request (method and path in the context), commits the audit record,
//! swaps the agent's credentials for that action's secret and streams the
//! request up and the response down, redacting any echo of the secret.
//!
//! [`Proxy::router`] is mounted by `scrip serve` and served alone by
//! `scrip proxy`.
//!
//! Architecture invariant: a request reaches the upstream only with a
//! verified token whose scope covers the mapped action, after Cedar allowed
//! it and its audit record is durable; only that action's secret is ever
//! injected; no byte of a secret reaches the agent, a log or the audit.

mod body;
mod forward;
pub mod headers;
pub mod metrics;
pub mod redact;
pub mod route;
pub mod secrets;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::{any, get};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use scrip_config::{Config, Injection, Tool};
use scrip_policy::PolicyEngine;
use scrip_store::{Store, TaskRecord};
use scrip_token::ActionName;
use scrip_verifier::Verifier;

/// Store failures each request meets: logged at most 10 a second, the rest
/// counted (the audit trail, not the log, is the record).
pub(crate) static STORE_LINES: scrip_vital::LogBudget = scrip_vital::LogBudget::new(10);

/// A secret not set, or unusable, which each request for its upstream
/// meets: as many.
pub(crate) static SECRET_LINES: scrip_vital::LogBudget = scrip_vital::LogBudget::new(10);

/// An upstream that fails, which each request to it meets: as many.
pub(crate) static UPSTREAM_LINES: scrip_vital::LogBudget = scrip_vital::LogBudget::new(10);

pub use secrets::{Kek, SecretCache, SecretError, SecretStatus, SecretValue};

/// The path every proxied request starts with.
pub const PREFIX: &str = "/proxy/";

/// The current policy set (the server's, which reloads).
pub type PolicySource = Arc<dyn Fn() -> Arc<PolicyEngine> + Send + Sync>;

/// Why the proxy could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// An upstream's configuration is unusable.
    #[error("upstream `{name}`: {message}")]
    Upstream {
        /// The upstream.
        name: String,
        /// Why.
        message: String,
    },
    /// The TLS client could not be built.
    #[error("cannot build the upstream TLS client: {0}")]
    Tls(String),
}

/// What the proxy is built from besides the configuration.
pub struct Parts {
    /// The store: secrets, tasks, and the audit record.
    pub store: Arc<dyn Store>,
    /// The policies.
    pub policy: PolicySource,
    /// A verifier of the trusted scrip (any audience; one per upstream is
    /// derived from it).
    pub verifier: Verifier,
    /// Opens the stored secrets.
    pub kek: Kek,
    /// The name this process writes audit records as.
    pub replica: String,
}

impl std::fmt::Debug for Parts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parts")
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

type Https = hyper_rustls::HttpsConnector<HttpConnector<PinnedLocalhost>>;

/// The system's resolver, but `localhost` is 127.0.0.1 only, never what the
/// resolver lists first: most hosts files also map it to `::1`, tried
/// first, where another local user could answer on the upstream's port
/// (and receive its key) while the real service listens on 127.0.0.1 only.
/// The request still names `localhost` (its `Host`, and TLS's server name).
#[derive(Clone, Debug)]
struct PinnedLocalhost(hyper_util::client::legacy::connect::dns::GaiResolver);

type Addrs = Box<dyn Iterator<Item = std::net::SocketAddr> + Send>;

impl tower::Service<hyper_util::client::legacy::connect::dns::Name> for PinnedLocalhost {
    type Response = Addrs;
    type Error = std::io::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Addrs, std::io::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, name: hyper_util::client::legacy::connect::dns::Name) -> Self::Future {
        if scrip_verifier::net::is_localhost(name.as_str()) {
            let only: Addrs = Box::new(std::iter::once(std::net::SocketAddr::from((
                std::net::Ipv4Addr::LOCALHOST,
                0,
            ))));
            return Box::pin(std::future::ready(Ok(only)));
        }
        let lookup = self.0.call(name);
        Box::pin(async move { lookup.await.map(|a| Box::new(a) as Addrs) })
    }
}

/// One upstream, ready to forward to.
struct Upstream {
    name: String,
    tool: Tool,
    /// `scheme://authority` and the base path without a trailing `/`.
    origin: String,
    base_path: String,
    injection: Injection,
    map: route::ActionMap,
    /// Actions with a configured secret.
    secret_actions: Vec<ActionName>,
    read_timeout: Duration,
    verifier: Verifier,
    client: Client<Https, body::CountingBody>,
    /// A client that keeps no connection: a request sent again after its
    /// pooled connection closed unanswered goes on a new one, not on
    /// another idle connection that may be closing too.
    fresh: Client<Https, body::CountingBody>,
}

/// Task records are reread at most this often (revocation is the
/// verifier's feed; the record gives Cedar the agent and the task).
const TASK_TTL: Duration = Duration::from_secs(1);
/// The most task records cached.
const TASK_CACHE: usize = 10_000;
/// `/metrics` rereads the secrets at most this often.
const METRICS_TTL: Duration = Duration::from_secs(5);

struct Inner {
    upstreams: HashMap<String, Upstream>,
    /// Answers requests for an upstream that is not here as one that is
    /// answers a token issued for another.
    no_upstream: Verifier,
    store: Arc<dyn Store>,
    policy: PolicySource,
    secrets: SecretCache,
    replica: String,
    metrics: metrics::Metrics,
    /// `(max_age, grace)` per `(upstream, action)`.
    limits: HashMap<(String, String), (u64, u64)>,
    tasks: Mutex<HashMap<String, (Instant, Arc<TaskRecord>)>>,
    /// How long past its `exp` a token may still pass a verifier: a claimed
    /// single use is kept that long.
    clock_skew: u64,
    /// Audit records being written in the background.
    pending: Arc<Pending>,
    /// The secret records `/metrics` last read, and when. `/metrics` needs
    /// no credentials, so scrapes read the store at most once per
    /// [`METRICS_TTL`], one at a time, however many come.
    metrics_records: tokio::sync::Mutex<Option<(Instant, Arc<Vec<scrip_store::SecretRecord>>)>>,
    /// The redaction patterns last built for each upstream and action.
    patterns: headers::PatternCache,
}

/// Refusal records written in the background at most at once (see
/// [`Pending::commit_refusal`]).
const PENDING: usize = 1024;

/// The refusals of requests no verified token stands behind (a missing or
/// invalid token, or one for another upstream) recorded one by
/// one in a second, per process; the rest of that second's are counted,
/// and recorded as one `proxy.refused` record per upstream. Anyone can
/// send such a request: one by one, a flood of them would grow the trail
/// without bound and hold up the store's commits of tokens. As few as the
/// other budgets a second: a client with no token at all gets the rows it
/// writes into the trail (which no one can prune without breaking its
/// chain) held to about a million a day per process, with one count record
/// a second per upstream beside them.
pub const UNVERIFIED_PER_SECOND: u32 = 10;

/// The refusals of one token that verified (revoked, used, out of scope,
/// refused by policy, or sent with a bad path or a method no action maps
/// to) recorded one by one in a second, per process, each
/// naming the token; the rest of that second's are counted, and recorded
/// as one `proxy.refused` record naming it. Its holder could otherwise
/// write attributed records as fast as the store takes them until the
/// token expires.
pub const PER_TOKEN_PER_SECOND: u32 = 10;

/// Background audit writes still running, so that [`Proxy::flush`] can
/// wait for them before the process exits.
#[derive(Debug)]
pub(crate) struct Pending {
    count: std::sync::atomic::AtomicUsize,
    ended: tokio::sync::Notify,
    /// Room for refusal records being written: anyone may send a refused
    /// request, so their records may not pile up without bound.
    refusals: Arc<tokio::sync::Semaphore>,
    /// Refusal records not written because the client went away while
    /// its refusal waited for room.
    dropped: std::sync::atomic::AtomicU64,
    /// This second's refusals (see [`UNVERIFIED_PER_SECOND`] and
    /// [`PER_TOKEN_PER_SECOND`]), and those counted.
    tally: scrip_store::Tally,
}

impl Default for Pending {
    fn default() -> Self {
        Self {
            count: std::sync::atomic::AtomicUsize::new(0),
            ended: tokio::sync::Notify::new(),
            refusals: Arc::new(tokio::sync::Semaphore::new(PENDING)),
            dropped: std::sync::atomic::AtomicU64::new(0),
            tally: scrip_store::Tally::default(),
        }
    }
}

/// See [`Pending::hold`].
pub(crate) struct Held(Arc<Pending>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.0.ended.notify_waiters();
    }
}

/// Counts a refusal record given up while it waited for room, unless
/// disarmed; logs the count at each power of two (a flood logs a few
/// lines, not one a request).
struct Lost<'a>(Option<&'a Pending>);

impl Drop for Lost<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            let n = p.dropped.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    total = n,
                    "proxy: refusal records not written: their clients went away while the store was behind"
                );
            }
        }
    }
}

impl Pending {
    /// Commits `record` in the background, counted until it is written.
    pub(crate) fn commit(self: &Arc<Self>, store: Arc<dyn Store>, record: scrip_store::AuditEvent) {
        self.commit_in(store, record, None);
    }

    /// [`Self::commit`], releasing `room` once the record is written.
    fn commit_in(
        self: &Arc<Self>,
        store: Arc<dyn Store>,
        record: scrip_store::AuditEvent,
        room: Option<tokio::sync::OwnedSemaphorePermit>,
    ) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let held = self.hold();
        runtime.spawn(async move {
            if let Err(e) = store
                .commit(vec![scrip_store::Write::Audit(Box::new(record))])
                .await
                && STORE_LINES.allow("proxy: store failures")
            {
                tracing::error!(error = %e, "proxy audit record could not be written");
            }
            drop(room);
            drop(held);
        });
    }

    /// Counts work in the background that writes records until the guard
    /// is dropped: a stop waits for it as for a record being written.
    pub(crate) fn hold(self: &Arc<Self>) -> Held {
        self.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Held(self.clone())
    }

    /// Commits a refusal's `record` in the background once there is room:
    /// at most [`PENDING`] are written at once, and past that the refusal
    /// waits (a client sending refusals faster than the store takes them
    /// is slowed down). A client that goes away while it waits leaves no
    /// record (counted and logged).
    pub(crate) async fn commit_refusal(
        self: &Arc<Self>,
        store: Arc<dyn Store>,
        record: scrip_store::AuditEvent,
    ) {
        let room = match self.refusals.clone().try_acquire_owned() {
            Ok(room) => room,
            Err(_) => {
                let mut lost = Lost(Some(self));
                let Ok(room) = self.refusals.clone().acquire_owned().await else {
                    return;
                };
                lost.0 = None;
                room
            }
        };
        self.commit_in(store, record, Some(room));
    }

    /// Commits the refusal `record` as [`Self::commit_refusal`] does,
    /// unless this second already recorded [`UNVERIFIED_PER_SECOND`]
    /// refusals no verified token stood behind (`record` names no `jti`),
    /// or [`PER_TOKEN_PER_SECOND`] of its token: then it is counted, and
    /// the second's counts are recorded once it ends.
    pub(crate) async fn commit_limited_refusal(
        self: &Arc<Self>,
        store: Arc<dyn Store>,
        record: scrip_store::AuditEvent,
    ) {
        use scrip_store::Admit;
        // Unverified ones share one budget (a `jti` is never empty);
        // counted per upstream and token.
        let budget = match &record.jti {
            None => ("", UNVERIFIED_PER_SECOND),
            Some(jti) => (jti.as_str(), PER_TOKEN_PER_SECOND),
        };
        let count_as = format!(
            "{}\n{}",
            record.tool.as_deref().unwrap_or_default(),
            record.jti.as_deref().unwrap_or_default()
        );
        match self.tally.admit(budget, &count_as, &record) {
            Admit::Record => self.commit_refusal(store, record).await,
            Admit::Counted { first: true } => self.record_counted_later(store),
            Admit::Counted { first: false } => {}
        }
    }

    /// Records the refusals counted this second once it ends: one
    /// `proxy.refused` record per upstream and token, with how many.
    /// Counted until written, so that [`Self::flush`] waits for it.
    fn record_counted_later(self: &Arc<Self>, store: Arc<dyn Store>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let held = self.hold();
        let this = self.clone();
        runtime.spawn(async move {
            let _held = held;
            let wait = 1000 - now_ms() % 1000;
            tokio::time::sleep(std::time::Duration::from_millis(wait + 10)).await;
            let counts = this.tally.take();
            let refusals: u64 = counts.iter().map(|c| c.n).sum();
            let writes = counts
                .into_iter()
                .map(|scrip_store::Count { n, first, .. }| {
                    let mut r = first;
                    r.event = "proxy.refused".into();
                    r.at_ms = now_ms();
                    r.reason = Some(match &r.jti {
                        None => format!(
                            "{n} more requests refused before a token was verified (a bad path, a method no action maps to, a missing or invalid token) in the second before, recorded as a count: over {UNVERIFIED_PER_SECOND} a second; the first of them is described here"
                        ),
                        Some(jti) => format!(
                            "{n} more requests with token {jti} refused in the second before, recorded as a count: over {PER_TOKEN_PER_SECOND} a second for one token; the first of them is described here: {}",
                            r.reason.as_deref().unwrap_or("no reason given")
                        ),
                    });
                    scrip_store::Write::Audit(Box::new(r))
                })
                .collect::<Vec<_>>();
            tracing::warn!(
                counts = writes.len(),
                "proxy: more than {UNVERIFIED_PER_SECOND} unverified requests, or {PER_TOKEN_PER_SECOND} of one token, refused in a second; recording the rest as counts"
            );
            if let Err(e) = store.commit(writes).await {
                // As a refusal's own record that cannot be written, it is
                // not tried again; how many it held is said.
                tracing::error!(error = %e, refusals, "proxy: counted refusals could not be recorded");
            }
        });
    }

    async fn flush(&self) {
        use std::sync::atomic::Ordering;
        loop {
            let ended = self.ended.notified();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            ended.await;
        }
    }
}

/// The proxy. Cheap to clone.
#[derive(Clone)]
pub struct Proxy(Arc<Inner>);

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("upstreams", &self.0.upstreams.len())
            .finish_non_exhaustive()
    }
}

fn https_connector(connect_timeout: Duration) -> Result<Https, SetupError> {
    let mut http = HttpConnector::new_with_resolver(PinnedLocalhost(
        hyper_util::client::legacy::connect::dns::GaiResolver::new(),
    ));
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_platform_verifier(rustls::crypto::aws_lc_rs::default_provider())
        .map_err(|e| SetupError::Tls(e.to_string()))?;
    Ok(builder.https_or_http().enable_http1().wrap_connector(http))
}

/// Checks, of the configuration alone, what [`Proxy::new`] would refuse
/// in its routes, so that a start refuses it before it changes anything
/// (keys, records).
///
/// # Errors
/// [`SetupError::Upstream`] naming the route at fault.
pub fn check_routes(config: &Config) -> Result<(), SetupError> {
    for u in &config.upstreams {
        check_routes_of(u).map_err(|message| SetupError::Upstream {
            name: u.name.to_string(),
            message,
        })?;
    }
    Ok(())
}

fn check_routes_of(u: &scrip_config::Upstream) -> Result<(), String> {
    // Requests are normalised before they are matched: a route
    // path that normalising would change (`/%61dmin`, `/a/../b`,
    // `/a;b`) could never match, and the override it was meant to
    // be would silently not apply.
    for r in &u.routes {
        // A prefix (`/.*`, for `/.env`) ends in an unfinished segment:
        // checked as the paths it matches would be, with a character
        // after it.
        let path = match r.path.strip_suffix('*') {
            Some(prefix) => format!("{prefix}x"),
            None => r.path.clone(),
        };
        let canonical =
            route::normalize(&path).map_err(|e| format!("route path `{}`: {e}", r.path))?;
        let canonical = route::match_form(&canonical).into_owned();
        if canonical != path {
            let (canonical, star) = match r.path.strip_suffix('*') {
                Some(_) => (canonical.strip_suffix('x').unwrap_or(&canonical), "*"),
                None => (canonical.as_str(), ""),
            };
            return Err(format!(
                "route path `{}` would never match: requests are normalised before they are matched, and it reads `{canonical}{star}` once normalised; write that",
                r.path
            ));
        }
    }
    Ok(())
}

impl Proxy {
    /// Builds the proxy for every `[[upstreams]]` of a validated `config`.
    ///
    /// # Errors
    /// [`SetupError`] when an upstream cannot be set up.
    pub fn new(config: &Config, parts: Parts) -> Result<Self, SetupError> {
        let mut upstreams = HashMap::new();
        let mut limits = HashMap::new();
        for u in &config.upstreams {
            let name = u.name.to_string();
            let fail = |message: String| SetupError::Upstream {
                name: name.clone(),
                message,
            };
            let tool = config
                .tool(&name)
                .cloned()
                .ok_or_else(|| fail("is not a configured tool".into()))?;
            let uri: http::Uri = u.url.parse().map_err(|e| fail(format!("url: {e}")))?;
            let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
                return Err(fail("url needs a scheme and a host".into()));
            };
            let injection = u.inject.injection(&name).map_err(|e| fail(e.to_string()))?;
            check_routes_of(u).map_err(fail)?;
            let map = route::ActionMap::new(&u.routes)
                .ok_or_else(|| fail("cannot build the action mapping".into()))?;
            for (action, spec) in &u.secrets {
                limits.insert(
                    (name.clone(), action.to_string()),
                    (spec.max_age, spec.grace),
                );
            }
            // Idle upstream connections kept at most 64 per host: each is a
            // descriptor the server's connection cap does not count.
            let connector = https_connector(Duration::from_secs(u.connect_timeout))?;
            let client = Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .pool_max_idle_per_host(64)
                .build(connector.clone());
            let fresh = Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build(connector);
            upstreams.insert(
                name.clone(),
                Upstream {
                    origin: format!("{scheme}://{authority}"),
                    base_path: uri.path().trim_end_matches('/').to_owned(),
                    tool,
                    injection,
                    map,
                    secret_actions: u.secrets.keys().cloned().collect(),
                    read_timeout: Duration::from_secs(u.read_timeout),
                    verifier: parts.verifier.for_audience(name.clone()),
                    client,
                    fresh,
                    name,
                },
            );
        }
        Ok(Self(Arc::new(Inner {
            upstreams,
            no_upstream: parts.verifier.for_no_tool(),
            secrets: SecretCache::new(
                parts.store.clone(),
                parts.kek,
                limits
                    .iter()
                    .map(|(key, (_, grace))| (key.clone(), *grace))
                    .collect(),
            ),
            store: parts.store,
            policy: parts.policy,
            replica: parts.replica,
            metrics: metrics::Metrics::default(),
            limits,
            tasks: Mutex::new(HashMap::new()),
            clock_skew: config.clock_skew,
            pending: Arc::new(Pending::default()),
            metrics_records: tokio::sync::Mutex::new(None),
            patterns: headers::PatternCache::default(),
        })))
    }

    /// Waits until the audit records written in the background (refusals,
    /// completed responses) are stored: call it once the server stopped
    /// taking requests, before signing the chain and exiting.
    pub async fn flush(&self) {
        self.0.pending.flush().await;
    }

    /// Whether tokens can be checked now: each verifier has read every
    /// revocation listed when it started, and its set is not stale. Until
    /// then every proxied request is refused with 503 and `Retry-After`.
    /// `scrip proxy`'s readiness.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.0.upstreams.values().all(|u| u.verifier.is_ready())
    }

    /// Whether each verifier has read every revocation listed when it
    /// started, stale since or not: the readiness of a `scrip serve` that
    /// mounts the proxy, whose other endpoints (key sets, metadata,
    /// revocation) serve without it and must stay reachable while its set
    /// is stale (the store down).
    #[must_use]
    pub fn has_caught_up(&self) -> bool {
        self.0
            .upstreams
            .values()
            .all(|u| u.verifier.has_caught_up())
    }

    /// Whether any upstream is configured.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.upstreams.is_empty()
    }

    /// `/proxy/<upstream>/<path>` (every method).
    pub fn router(&self) -> Router {
        Router::new()
            .route("/proxy/{*rest}", any(forward::handle))
            .with_state(self.clone())
    }

    /// `/metrics`, for `metrics_listen`: it names the upstreams and the
    /// age of their keys, so it is served apart from the API.
    pub fn metrics_router(&self) -> Router {
        Router::new()
            .route("/metrics", get(metrics_endpoint))
            .with_state(self.clone())
    }

    /// The state of every stored secret version.
    ///
    /// # Errors
    /// The store's error.
    pub async fn secret_statuses(&self) -> Result<Vec<SecretStatus>, scrip_store::StoreError> {
        let records = self.0.store.secrets().await?;
        Ok(self.statuses_of(&records))
    }

    fn statuses_of(&self, records: &[scrip_store::SecretRecord]) -> Vec<SecretStatus> {
        secrets::statuses(records, now(), |n, a| {
            self.0.limits.get(&(n.to_owned(), a.to_owned())).copied()
        })
    }

    /// The secret records for `/metrics`, reread at most every
    /// [`METRICS_TTL`].
    async fn metrics_records(
        &self,
    ) -> Result<Arc<Vec<scrip_store::SecretRecord>>, scrip_store::StoreError> {
        let mut cached = self.0.metrics_records.lock().await;
        if let Some((at, records)) = cached.as_ref()
            && at.elapsed() < METRICS_TTL
        {
            return Ok(records.clone());
        }
        let records = Arc::new(self.0.store.secrets().await?);
        *cached = Some((Instant::now(), records.clone()));
        Ok(records)
    }

    /// The task record of `id`, from the cache when fresh.
    async fn task(&self, id: &str) -> Result<Option<Arc<TaskRecord>>, scrip_store::StoreError> {
        if let Ok(tasks) = self.0.tasks.lock()
            && let Some((at, task)) = tasks.get(id)
            && at.elapsed() < TASK_TTL
        {
            return Ok(Some(task.clone()));
        }
        let Some(task) = self.0.store.task(id).await? else {
            return Ok(None);
        };
        let task = Arc::new(task);
        if let Ok(mut tasks) = self.0.tasks.lock() {
            if tasks.len() >= TASK_CACHE {
                tasks.retain(|_, (at, _)| at.elapsed() < TASK_TTL);
                if tasks.len() >= TASK_CACHE {
                    tasks.clear();
                }
            }
            tasks.insert(id.to_owned(), (Instant::now(), task.clone()));
        }
        Ok(Some(task))
    }
}

/// How long a scrape waits for the secrets' state.
const METRICS_READ: Duration = Duration::from_secs(2);

async fn metrics_endpoint(
    axum::extract::State(proxy): axum::extract::State<Proxy>,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    // A store that fails, or hangs, takes the secrets' state out of the
    // scrape, not the request counters: those show the failures it causes.
    let statuses = match tokio::time::timeout(METRICS_READ, proxy.metrics_records()).await {
        Ok(Ok(records)) => Some(proxy.statuses_of(&records)),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "metrics: cannot read secrets");
            None
        }
        Err(_) => {
            tracing::error!("metrics: the store did not answer for the secrets in time");
            None
        }
    };
    (
        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        proxy.0.metrics.render(statuses.as_deref()),
    )
        .into_response()
}

/// Seconds since the epoch.
fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Milliseconds since the epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod resolve_tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use std::str::FromStr as _;

    use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
    use tower::Service as _;

    use super::PinnedLocalhost;

    /// `localhost` (any case, with the root's dot) is 127.0.0.1 alone; any
    /// other name is the system resolver's.
    #[tokio::test]
    async fn localhost_is_127_0_0_1_only() {
        let mut resolver = PinnedLocalhost(GaiResolver::new());
        for name in ["localhost", "LocalHost", "localhost."] {
            let addrs: Vec<_> = resolver
                .call(Name::from_str(name).unwrap())
                .await
                .unwrap()
                .collect();
            assert_eq!(
                addrs,
                [std::net::SocketAddr::from(([127, 0, 0, 1], 0))],
                "{name}"
            );
        }
        let addrs: Vec<_> = resolver
            .call(Name::from_str("127.0.0.2").unwrap())
            .await
            .unwrap()
            .collect();
        assert_eq!(addrs, [std::net::SocketAddr::from(([127, 0, 0, 2], 0))]);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use std::time::Duration;

    use super::{Arc, PENDING, Pending, Store};

    /// Past [`PENDING`] refusal records being written, a refusal waits for
    /// room before it is answered, and one whose client goes away while it
    /// waits leaves nothing queued (counted).
    #[tokio::test]
    async fn past_the_bound_a_refusal_waits_for_room() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(scrip_store::SqliteStore::open_in(dir.path()).await.unwrap());
        let pending = Arc::new(Pending::default());
        let record = |reason: &str| scrip_store::AuditEvent {
            event: "proxy.request".into(),
            reason: Some(reason.into()),
            replica: "test".into(),
            ..scrip_store::AuditEvent::default()
        };
        // As if that many were being written.
        let full = pending
            .refusals
            .clone()
            .acquire_many_owned(u32::try_from(PENDING).unwrap())
            .await
            .unwrap();
        let waiting = tokio::spawn({
            let (pending, store) = (pending.clone(), store.clone());
            let r = record("waited for room");
            async move { pending.commit_refusal(store, r).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "a refusal past the bound waits");
        // One whose client goes away meanwhile is dropped, and counted.
        let gone = tokio::spawn({
            let (pending, store) = (pending.clone(), store.clone());
            let r = record("gone");
            async move { pending.commit_refusal(store, r).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        gone.abort();
        let _ = gone.await;
        assert_eq!(pending.dropped.load(Ordering::SeqCst), 1);
        drop(full);
        waiting.await.unwrap();
        pending.flush().await;
        let written: Vec<_> = store
            .audit(&scrip_store::AuditFilter::default())
            .await
            .unwrap()
            .into_iter()
            .filter_map(|a| a.reason)
            .collect();
        assert_eq!(written, ["waited for room"]);
        assert_eq!(pending.count.load(Ordering::SeqCst), 0);
        assert_eq!(pending.refusals.available_permits(), PENDING);
    }
}
