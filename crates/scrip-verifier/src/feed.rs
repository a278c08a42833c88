//! Following scrip's revocation feed, so that a revoked task's tokens are
//! refused without a network call per request.
//!
//! A background task long-polls `GET <feed>?after=<cursor>&wait=<s>` with the
//! resource server's own workload identity as the bearer. Each answer adds
//! its events to an in-memory set (task ids and token ids, each kept until
//! its `exp`, after which the token is refused as expired anyway) and moves
//! the cursor. After an error the loop retries with backoff and resumes from
//! the last cursor, so nothing is missed. Every answer — even an empty one
//! after a long-poll — proves the set current as of when it was asked for
//! (scrip read its store after that; an answer held back on the way shows
//! nothing newer); once the set is older than `max_staleness`,
//! [`Revocations::check`] refuses every token.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;

use crate::VerifyError;
use crate::fetch::get_bytes;

/// The largest feed answer read.
const MAX_PAGE_BYTES: usize = 16 * 1024 * 1024;
/// How much longer than `wait` a poll may take before it counts as failed.
const POLL_GRACE: Duration = Duration::from_secs(10);
/// The longest `wait` scrip accepts.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// A future returned by a [`FeedSource`]: one page of the feed as the JSON
/// body `GET /revocations` answers.
pub type PageFuture<'a> = Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send + 'a>>;

/// A future returned by [`FeedSource::claim_once`]: whether this is the
/// token's first use anywhere.
pub type ClaimFuture<'a> = Pin<Box<dyn Future<Output = Result<bool, String>> + Send + 'a>>;

/// Where pages of the revocation feed come from: scrip's `/revocations`
/// endpoint over HTTP ([`Verifier::discover`](crate::Verifier::discover)), or,
/// inside scrip itself, its store ([`Verifier::local`](crate::Verifier::local)).
/// Either way the pages are applied by the same code.
pub trait FeedSource: Send + Sync + std::fmt::Debug {
    /// The revocations after cursor `after`, waiting up to `wait` for one;
    /// the JSON body of `GET /revocations?after=<after>&wait=<wait>`.
    fn page(&self, after: u64, wait: Duration) -> PageFuture<'_>;

    /// Records the one use of a single-use token (a step a person
    /// approved) where every verifier of this scrip sees it: `true` the
    /// first time, on any verifier, process or replica; `false` after. Over
    /// HTTP this is scrip's introspection, which answers such a token
    /// active once.
    fn claim_once<'a>(&'a self, token: &'a str) -> ClaimFuture<'a>;
}

/// The feed over HTTP, presenting the resource server's workload identity.
#[derive(Debug)]
pub(crate) struct HttpFeed {
    pub(crate) http: reqwest::Client,
    pub(crate) endpoint: url::Url,
    /// scrip's RFC 7662 introspection endpoint, which claims single use.
    pub(crate) introspection: url::Url,
    pub(crate) identity: Arc<dyn IdentitySource>,
}

/// How many events an older scrip's page (without `more`) holds when full:
/// a full one may have more behind it.
const OLD_PAGE: usize = 1_000;

/// How long an introspection that claims a single use may take.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest introspection answer read.
const MAX_CLAIM_BYTES: usize = 64 * 1024;

impl FeedSource for HttpFeed {
    fn page(&self, after: u64, wait: Duration) -> PageFuture<'_> {
        Box::pin(async move {
            // The identity source is the resource server's (a file on a
            // mount, a SPIFFE agent): it may stall too.
            let token = tokio::time::timeout(wait + POLL_GRACE, self.identity.identity())
                .await
                .map_err(|_| {
                    "no workload identity for the feed: its source did not answer in time"
                        .to_owned()
                })?
                .map_err(|e| format!("no workload identity for the feed: {e}"))?;
            let mut url = self.endpoint.clone();
            url.query_pairs_mut()
                .append_pair("after", &after.to_string())
                .append_pair("wait", &wait.as_secs().to_string());
            get_bytes(
                &self.http,
                url.as_str(),
                Some(&token),
                wait + POLL_GRACE,
                MAX_PAGE_BYTES,
            )
            .await
        })
    }

    fn claim_once<'a>(&'a self, token: &'a str) -> ClaimFuture<'a> {
        Box::pin(async move {
            // The whole claim, the identity included, within its time limit:
            // a presentation is answered (as unconfirmed) however the
            // identity source stalls.
            let started = tokio::time::Instant::now();
            let identity = tokio::time::timeout(CLAIM_TIMEOUT, self.identity.identity())
                .await
                .map_err(|_| {
                    "no workload identity for introspection: its source did not answer in time"
                        .to_owned()
                })?
                .map_err(|e| format!("no workload identity for introspection: {e}"))?;
            let left = CLAIM_TIMEOUT.saturating_sub(started.elapsed());
            let body = crate::fetch::post_form_bytes(
                &self.http,
                self.introspection.as_str(),
                &identity,
                &[("token", token)],
                left.max(Duration::from_millis(1)),
                MAX_CLAIM_BYTES,
            )
            .await?;
            let answer: Value = serde_json::from_slice(&body)
                .map_err(|_| "introspection answered no JSON".to_owned())?;
            answer
                .get("active")
                .and_then(Value::as_bool)
                .ok_or_else(|| "introspection answered no `active`".to_owned())
        })
    }
}

/// A future returned by an [`IdentitySource`].
pub type IdentityFuture<'a> = Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>>;

/// Where the resource server's own workload identity JWT comes from; asked
/// before every poll, so a rotating token (a Kubernetes projected token, a
/// SPIFFE JWT-SVID) is always current.
pub trait IdentitySource: Send + Sync + std::fmt::Debug {
    /// The identity JWT to present, or why there is none.
    fn identity(&self) -> IdentityFuture<'_>;
}

/// A fixed identity token (for tests and short-lived processes).
#[derive(Clone)]
pub struct StaticIdentity(String);

impl StaticIdentity {
    /// Wraps `token`.
    #[must_use]
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }
}

impl std::fmt::Debug for StaticIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StaticIdentity(..)")
    }
}

impl IdentitySource for StaticIdentity {
    fn identity(&self) -> IdentityFuture<'_> {
        Box::pin(async move { Ok(self.0.clone()) })
    }
}

/// An identity token read from a file before each use (a Kubernetes
/// projected service-account token, a SPIFFE helper's output).
#[derive(Debug, Clone)]
pub struct FileIdentity(PathBuf);

impl FileIdentity {
    /// Reads from `path`.
    #[must_use]
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self(path.into())
    }
}

impl IdentitySource for FileIdentity {
    fn identity(&self) -> IdentityFuture<'_> {
        Box::pin(async move {
            let text = tokio::fs::read_to_string(&self.0)
                .await
                .map_err(|e| format!("cannot read `{}`: {e}", self.0.display()))?;
            Ok(text.trim().to_owned())
        })
    }
}

/// How the feed is followed.
#[derive(Debug, Clone)]
pub struct FeedConfig {
    /// The resource server's workload identity, presented to the feed.
    pub identity: Arc<dyn IdentitySource>,
    /// How long one poll may wait for news (at most 30 s).
    pub wait: Duration,
    /// How old the revocation set may be before every token is refused:
    /// a page shows it as of when the page was asked for, so an idle long
    /// poll leaves it up to `wait` old when it comes, and twice that before
    /// the next one does. Must exceed twice `wait`.
    pub max_staleness: Duration,
    /// The first retry delay after an error; doubles up to `retry_max`.
    pub retry_min: Duration,
    /// The longest retry delay.
    pub retry_max: Duration,
}

impl FeedConfig {
    /// Defaults: `wait` 20 s, `max_staleness` 60 s, retries 250 ms to 5 s.
    #[must_use]
    pub fn new(identity: Arc<dyn IdentitySource>) -> Self {
        Self {
            identity,
            wait: Duration::from_secs(20),
            max_staleness: Duration::from_secs(60),
            retry_min: Duration::from_millis(250),
            retry_max: Duration::from_secs(5),
        }
    }
}

/// How often, at most, expired entries are dropped from the set.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// A revoked id as the set keeps it: the first 128 bits of its SHA-256.
/// Fixed-size keys keep the set to one allocation, its table, however many
/// ids it holds: 32 bytes a slot (the key and a [`Keep`]), where a `String`
/// key took 32 and an allocation of its own. Two ids sharing a key could only make a token
/// refused, never accepted, and by chance that takes about 2^64 ids.
type IdKey = [u8; 16];

fn id_key(id: &str) -> IdKey {
    let digest = scrip_jose::token_digest(id);
    let mut key = [0; 16];
    key.copy_from_slice(&digest[..16]);
    key
}

/// How long an entry is kept: until its `exp` plus the leeway has passed by
/// the wall clock (which `verify` judges `exp` by) and by the monotonic
/// clock. A wall clock stepped forward (a bad NTP answer, `date -s`) and
/// back would otherwise have dropped revocations whose tokens pass again
/// once it is back.
#[derive(Debug, Clone, Copy)]
struct Keep {
    /// The event's `exp` (seconds since the epoch).
    exp: u64,
    /// Seconds since [`Revocations::base`] until which the monotonic clock
    /// keeps the entry: its `exp` plus the leeway as the wall clock read
    /// when it arrived, and at least [`KEEP_AT_LEAST`].
    until: u64,
}

/// How long, at least, the monotonic clock keeps an entry after it arrived,
/// whatever the wall clock said then (it may have been running ahead): a
/// revoked access token lives 5 minutes by default, so its revocation
/// outlasts it.
const KEEP_AT_LEAST: u64 = 600;

#[derive(Debug, Default)]
struct State {
    /// Revoked task ids, with how long they must be kept.
    tasks: HashMap<IdKey, Keep>,
    /// Revoked token ids, likewise.
    tokens: HashMap<IdKey, Keep>,
    /// When expired entries were last dropped.
    pruned_at: Option<Instant>,
    cursor: u64,
    synced_at: Option<Instant>,
    /// `synced_at` by the wall clock: the monotonic clock stops while the
    /// machine is suspended, and staleness is real time.
    synced_wall: Option<std::time::SystemTime>,
    /// Set once the feed answered an empty page: every revocation listed
    /// when the verifier started has been read. Until then every token is
    /// refused, however fresh the pages read so far.
    caught_up: bool,
}

/// One answer of the feed.
#[derive(Debug, Deserialize)]
struct Page {
    cursor: u64,
    events: Vec<Value>,
    /// Whether events were left out of this page (a full one); without it
    /// (an older scrip), only an empty page says the follower caught up.
    #[serde(default)]
    more: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Event {
    Task { txn: String, exp: u64 },
    Token { jti: String, exp: u64 },
}

/// The clocks a page is taken at.
#[derive(Debug, Clone, Copy)]
struct Clocks {
    /// The wall clock, in seconds since the epoch.
    now: u64,
    /// Seconds since [`Revocations::base`].
    mono: u64,
    /// When the page was asked for: how current it proves the set.
    asked: Instant,
    /// The same by the wall clock.
    asked_wall: std::time::SystemTime,
}

/// The revocations known to this verifier.
#[derive(Debug)]
pub(crate) struct Revocations {
    state: RwLock<State>,
    /// What [`Keep::until`] counts from.
    base: Instant,
    max_staleness: Duration,
    /// Entries are kept this long past their `exp` (the verifier's leeway).
    leeway: u64,
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Revocations {
    pub(crate) fn new(max_staleness: Duration, leeway: u64) -> Self {
        Self {
            state: RwLock::new(State::default()),
            base: Instant::now(),
            max_staleness,
            leeway,
        }
    }

    /// Refuses a revoked token, and every token while the set is stale.
    pub(crate) fn check(&self, txn: &str, jti: &str) -> Result<(), VerifyError> {
        self.check_ids(txn, Some(jti))
    }

    /// Refuses a token of a revoked task, and every token while the set is
    /// stale; the token's own `jti` is not looked up (a single-use token's
    /// use is a revocation of it, and the request that used it may go on).
    pub(crate) fn check_task(&self, txn: &str) -> Result<(), VerifyError> {
        self.check_ids(txn, None)
    }

    fn check_ids(&self, txn: &str, jti: Option<&str>) -> Result<(), VerifyError> {
        let state = self
            .state
            .read()
            .map_err(|_| VerifyError::RevocationStale)?;
        if !self.fresh_in(&state) {
            return Err(VerifyError::RevocationStale);
        }
        if state.tasks.contains_key(&id_key(txn))
            || jti.is_some_and(|jti| state.tokens.contains_key(&id_key(jti)))
        {
            return Err(VerifyError::Revoked);
        }
        Ok(())
    }

    fn cursor(&self) -> u64 {
        self.state.read().map_or(0, |s| s.cursor)
    }

    /// As [`Self::apply_asked`], for a page asked for just now.
    #[cfg(test)]
    fn apply(&self, body: &[u8]) -> Result<usize, String> {
        self.apply_asked(body, Instant::now(), std::time::SystemTime::now())
    }

    /// Parses and applies one page, asked for at `asked` (and `asked_wall`
    /// by the wall clock); nothing changes when it is malformed.
    fn apply_asked(
        &self,
        body: &[u8],
        asked: Instant,
        asked_wall: std::time::SystemTime,
    ) -> Result<usize, String> {
        let page: Page =
            serde_json::from_slice(body).map_err(|e| format!("malformed feed answer: {e}"))?;
        let listed = page.events.len();
        let mut events = Vec::with_capacity(listed);
        for value in page.events {
            let kind = value
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            if !matches!(kind.as_str(), "task" | "token") {
                // It revokes something this verifier cannot tell: taking the
                // page would accept what it revokes (fail open). The page is
                // refused, the cursor stays, and past `max_staleness` every
                // token is refused until the verifier is upgraded.
                let shown: String = kind.chars().take(32).flat_map(char::escape_debug).collect();
                return Err(format!(
                    "revocation event of unknown type `{shown}`: this verifier is older than the scrip it follows; upgrade it (until then, tokens are refused once the revocation set is stale)"
                ));
            }
            let event: Event = serde_json::from_value(value)
                .map_err(|e| format!("malformed `{kind}` revocation event: {e}"))?;
            events.push(event);
        }
        let count = events.len();
        // Caught up once a page held everything there was: under a steady
        // stream of revocations an empty page may never come. A page that
        // says there is more is never the last, whatever it held (events of
        // a type this verifier does not know are still events).
        let done = match page.more {
            Some(more) => !more,
            None => listed == 0,
        };
        // A page that says there is more does not make the set current; any
        // other does, once caught up (an older scrip's pages carry no
        // `more`: after the first empty one, each is all there was).
        let current = done || (page.more.is_none() && listed < OLD_PAGE);
        self.take(
            events,
            page.cursor,
            done,
            current,
            Clocks {
                now: unix_now(),
                mono: self.base.elapsed().as_secs(),
                asked,
                asked_wall,
            },
        )?;
        Ok(count)
    }

    /// Takes a page's events, at `clocks`, and moves the cursor; `done` when
    /// the page held everything there was, `current` when it proves the set
    /// current once caught up (as of when it was asked for).
    fn take(
        &self,
        events: Vec<Event>,
        cursor: u64,
        done: bool,
        current: bool,
        clocks: Clocks,
    ) -> Result<(), String> {
        let Clocks { now, mono, .. } = clocks;
        let mut state = self
            .state
            .write()
            .map_err(|_| "revocation state poisoned".to_owned())?;
        // An entry is kept while a token it names could still pass `verify`
        // (`exp` plus the leeway), by either clock; past that the token is
        // refused as expired.
        let leeway = self.leeway;
        let keep = |exp: u64| {
            let left = exp
                .saturating_add(leeway)
                .saturating_sub(now)
                .max(KEEP_AT_LEAST);
            Keep {
                exp,
                until: mono.saturating_add(left),
            }
        };
        for event in events {
            match event {
                Event::Task { txn, exp } => state.tasks.insert(id_key(&txn), keep(exp)),
                Event::Token { jti, exp } => state.tokens.insert(id_key(&jti), keep(exp)),
            };
        }
        if state.pruned_at.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
            let live = |k: &Keep| k.exp.saturating_add(leeway) >= now || k.until >= mono;
            state.tasks.retain(|_, k| live(k));
            state.tokens.retain(|_, k| live(k));
            state.pruned_at = Some(Instant::now());
        }
        state.cursor = cursor;
        // After a page that says there is more, the events left for the
        // next page are not applied yet: if it cannot be read, the
        // staleness bound runs from the last page that held everything.
        state.caught_up |= done;
        // As of when it was asked for: scrip read its store after that, but
        // an answer held back on the way (up to `wait` and the grace) shows
        // nothing newer than the moment scrip sent it.
        if state.caught_up && current {
            state.synced_at = Some(clocks.asked);
            state.synced_wall = Some(clocks.asked_wall);
        }
        Ok(())
    }

    /// Whether the set is caught up and fresh: tokens are checked against
    /// it, not refused as [`VerifyError::RevocationStale`].
    pub(crate) fn fresh(&self) -> bool {
        self.state.read().is_ok_and(|s| self.fresh_in(&s))
    }

    /// Caught up, and fresh by both clocks (a wall clock that went back
    /// says nothing).
    fn fresh_in(&self, state: &State) -> bool {
        let wall_fresh = state.synced_wall.is_some_and(|at| {
            std::time::SystemTime::now()
                .duration_since(at)
                .map_or(true, |d| d <= self.max_staleness)
        });
        state.caught_up
            && wall_fresh
            && state
                .synced_at
                .is_some_and(|at| at.elapsed() <= self.max_staleness)
    }

    /// Whether every revocation listed at start has been read.
    pub(crate) fn caught_up(&self) -> bool {
        self.state.read().is_ok_and(|s| s.caught_up)
    }

    /// Reads page after page without waiting until one holds every event
    /// there was, at most `max_pages`. Returns whether it caught up.
    pub(crate) async fn catch_up(
        &self,
        source: &dyn FeedSource,
        max_pages: usize,
    ) -> Result<bool, String> {
        for _ in 0..max_pages {
            self.poll(source, Duration::ZERO).await?;
            if self.caught_up() {
                return Ok(true);
            }
        }
        Ok(self.caught_up())
    }

    /// Reads the feed once from the current cursor and applies the answer.
    pub(crate) async fn poll(
        &self,
        source: &dyn FeedSource,
        wait: Duration,
    ) -> Result<usize, String> {
        let asked = (Instant::now(), std::time::SystemTime::now());
        let body = source.page(self.cursor(), wait).await?;
        self.apply_asked(&body, asked.0, asked.1)
    }
}

/// Follows the feed until the task is aborted (when the verifier is dropped).
pub(crate) async fn follow(
    revocations: Arc<Revocations>,
    source: Arc<dyn FeedSource>,
    config: FeedConfig,
) {
    let mut backoff = config.retry_min;
    loop {
        let started = Instant::now();
        // Until the last page of the set, read without long-polling.
        let loading = !revocations.caught_up();
        let wait = if loading { Duration::ZERO } else { config.wait };
        match revocations.poll(source.as_ref(), wait).await {
            Ok(n) => {
                backoff = config.retry_min;
                if loading {
                    if revocations.caught_up() {
                        tracing::info!("revocation set loaded");
                    }
                } else if n > 0 {
                    tracing::debug!(events = n, "revocations received");
                } else if started.elapsed() < config.wait / 4 {
                    // An empty answer long before `wait`: the feed does not
                    // long-poll. Do not spin.
                    tokio::time::sleep(config.retry_min).await;
                }
            }
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "revocation feed unavailable; will resume from the last cursor");
                tokio::time::sleep(backoff).await;
                backoff = backoff.saturating_mul(2).min(config.retry_max);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The clocks at `now` and `mono`, the page asked for just now.
    fn clocks(now: u64, mono: u64) -> Clocks {
        Clocks {
            now,
            mono,
            asked: Instant::now(),
            asked_wall: std::time::SystemTime::now(),
        }
    }

    fn check(pages: &[&str], txn: &str, jti: &str, expected: Result<(), VerifyError>) {
        let r = Revocations::new(Duration::from_secs(60), 0);
        for page in pages {
            r.apply(page.as_bytes()).unwrap();
        }
        if !pages.is_empty() {
            // The empty page that ends the initial read.
            r.apply(br#"{"cursor":99,"events":[]}"#).unwrap();
        }
        assert_eq!(r.check(txn, jti), expected, "pages: {pages:?}");
    }

    #[test]
    fn a_page_that_holds_everything_catches_up_without_an_empty_one() {
        // Under a steady stream of revocations every page has events; a
        // page that left none out says the follower has caught up.
        let r = Revocations::new(Duration::from_secs(60), 0);
        let far = unix_now() + 600;
        // A page of events of a type this verifier does not know (a newer
        // scrip's) is refused whole, and is not the last one either.
        r.apply(br#"{"cursor":1,"events":[{"type":"subject","sub":"x"}],"more":false}"#)
            .unwrap_err();
        assert!(!r.caught_up());
        let page = |cursor: u64, more: bool| {
            format!(
                r#"{{"cursor":{cursor},"events":[{{"type":"task","txn":"t{cursor}","exp":{far}}}],"more":{more}}}"#
            )
        };
        r.apply(page(1, true).as_bytes()).unwrap();
        assert!(!r.caught_up());
        assert_eq!(r.check("t9", "j"), Err(VerifyError::RevocationStale));
        r.apply(page(2, false).as_bytes()).unwrap();
        assert!(r.caught_up());
        assert_eq!(r.check("t9", "j"), Ok(()));
        assert_eq!(r.check("t1", "j"), Err(VerifyError::Revoked));
        // A page without `more` (an older scrip) catches up only when empty.
        let old = Revocations::new(Duration::from_secs(60), 0);
        old.apply(
            format!(r#"{{"cursor":1,"events":[{{"type":"task","txn":"t1","exp":{far}}}]}}"#)
                .as_bytes(),
        )
        .unwrap();
        assert!(!old.caught_up());
    }

    #[test]
    fn a_wall_clock_stepped_forward_and_back_forgets_no_revocation() {
        let r = Revocations::new(Duration::from_secs(60), 30);
        let task = |txn: &str, exp: u64| Event::Task {
            txn: txn.into(),
            exp,
        };
        let prune_next = || r.state.write().unwrap().pruned_at = None;
        let w = unix_now();
        r.take(vec![task("t1", w + 600)], 1, true, true, clocks(w, 0))
            .unwrap();
        // The wall clock jumps 10,000 s ahead, 5 s later: by it, t1's tokens
        // are long expired, but they pass again once it is set back.
        prune_next();
        r.take(
            vec![task("t2", w + 600)],
            2,
            true,
            true,
            clocks(w + 10_000, 5),
        )
        .unwrap();
        assert_eq!(r.check("t1", "j"), Err(VerifyError::Revoked));
        // An event that arrived while it was ahead is kept as well.
        assert_eq!(r.check("t2", "j"), Err(VerifyError::Revoked));
        // Past `exp` plus the leeway by both clocks, entries go: t2 600 s
        // after it came, t1 630 s after (its `exp` plus the leeway).
        prune_next();
        r.take(Vec::new(), 3, true, true, clocks(w + 700, 620))
            .unwrap();
        assert_eq!(r.check("t2", "j"), Ok(()));
        assert_eq!(r.check("t1", "j"), Err(VerifyError::Revoked));
        prune_next();
        r.take(Vec::new(), 4, true, true, clocks(w + 700, 700))
            .unwrap();
        assert_eq!(r.check("t1", "j"), Ok(()));
        // A clock already 580 s ahead when an event came: by it the event
        // has 40 s to live, but it is kept 600 s, past the correction.
        r.take(
            vec![task("t3", w + 600)],
            5,
            true,
            true,
            clocks(w + 590, 2_000),
        )
        .unwrap();
        prune_next();
        r.take(Vec::new(), 6, true, true, clocks(w + 700, 2_100))
            .unwrap();
        assert_eq!(r.check("t3", "j"), Err(VerifyError::Revoked));
        // Staleness is real time: the monotonic clock stops while the
        // machine sleeps, the wall clock does not.
        r.state.write().unwrap().synced_wall =
            Some(std::time::SystemTime::now() - Duration::from_secs(120));
        assert_eq!(r.check("t9", "j"), Err(VerifyError::RevocationStale));
    }

    #[test]
    fn refuses_everything_until_the_first_empty_page() {
        let r = Revocations::new(Duration::from_secs(60), 0);
        let far = unix_now() + 600;
        r.apply(
            format!(r#"{{"cursor":1,"events":[{{"type":"task","txn":"t1","exp":{far}}}]}}"#)
                .as_bytes(),
        )
        .unwrap();
        // Fresh, but later pages may revoke any task: not yet trusted.
        assert_eq!(r.check("t2", "j"), Err(VerifyError::RevocationStale));
        assert!(!r.caught_up());
        r.apply(br#"{"cursor":1,"events":[]}"#).unwrap();
        assert!(r.caught_up());
        assert_eq!(r.check("t2", "j"), Ok(()));
        assert_eq!(r.check("t1", "j"), Err(VerifyError::Revoked));
        // Later pages with events do not undo it.
        r.apply(
            format!(r#"{{"cursor":2,"events":[{{"type":"token","jti":"j9","exp":{far}}}]}}"#)
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(r.check("t2", "j"), Ok(()));
    }

    #[test]
    fn applies_events() {
        let far = unix_now() + 600;
        let task = format!(r#"{{"cursor":1,"events":[{{"type":"task","txn":"t1","exp":{far}}}]}}"#);
        let token = format!(
            r#"{{"cursor":2,"events":[{{"type":"token","jti":"j1","txn":"t2","exp":{far}}}]}}"#
        );
        check(&[], "t1", "j0", Err(VerifyError::RevocationStale));
        check(&[r#"{"cursor":0,"events":[]}"#], "t1", "j0", Ok(()));
        check(&[&task], "t1", "j0", Err(VerifyError::Revoked));
        check(&[&task], "t2", "j0", Ok(()));
        check(&[&task, &token], "t2", "j1", Err(VerifyError::Revoked));
        check(&[&token], "t2", "j2", Ok(()));
    }

    /// An event of a type this verifier does not know revokes something it
    /// cannot tell: the page is refused, the cursor stays where it was, and
    /// once the set goes stale every token is refused.
    #[test]
    fn an_event_of_an_unknown_type_is_never_skipped() {
        let r = Revocations::new(Duration::from_secs(60), 0);
        let far = unix_now() + 600;
        r.apply(br#"{"cursor":2,"events":[]}"#).unwrap();
        let synced = |r: &Revocations| {
            let state = r.state.read().unwrap();
            (state.synced_at, state.synced_wall)
        };
        let before = synced(&r);
        let page = format!(
            r#"{{"cursor":4,"events":[{{"type":"task","txn":"t1","exp":{far}}},{{"type":"subject","sub":"x"}}],"more":false}}"#
        );
        let e = r.apply(page.as_bytes()).unwrap_err();
        assert_eq!(synced(&r), before, "a refused page counted as an answer");
        assert!(e.contains("unknown type `subject`"), "{e}");
        assert_eq!(r.cursor(), 2);
        // Nothing of the page was taken, the task event before it included.
        assert_eq!(r.check("t1", "j"), Ok(()));
        // 61 s on, with no page taken since the one before it, the set is
        // stale.
        r.state.write().unwrap().synced_at = Instant::now().checked_sub(Duration::from_secs(61));
        assert_eq!(r.check("t2", "j"), Err(VerifyError::RevocationStale));
    }

    /// A page that says there is more is applied, but it does not make the
    /// set current: until a page that holds the rest is read, staleness
    /// runs from the last page that held everything.
    #[test]
    fn a_page_with_more_to_come_proves_nothing_current() {
        let r = Revocations::new(Duration::from_secs(60), 0);
        let far = unix_now() + 600;
        r.apply(br#"{"cursor":2,"events":[],"more":false}"#)
            .unwrap();
        let old = Instant::now().checked_sub(Duration::from_secs(50));
        r.state.write().unwrap().synced_at = old;
        let page = format!(
            r#"{{"cursor":3,"events":[{{"type":"task","txn":"t1","exp":{far}}}],"more":true}}"#
        );
        r.apply(page.as_bytes()).unwrap();
        assert_eq!(r.cursor(), 3);
        assert_eq!(r.check("t1", "j"), Err(VerifyError::Revoked));
        assert_eq!(
            r.state.read().unwrap().synced_at,
            old,
            "a partial page counted as current"
        );
        // 61 s after the last complete page, with only partial ones since,
        // the set is stale.
        r.state.write().unwrap().synced_at = Instant::now().checked_sub(Duration::from_secs(61));
        r.apply(page.replace("\"cursor\":3", "\"cursor\":4").as_bytes())
            .unwrap();
        assert_eq!(r.check("t2", "j"), Err(VerifyError::RevocationStale));
        r.apply(br#"{"cursor":4,"events":[],"more":false}"#)
            .unwrap();
        assert_eq!(r.check("t2", "j"), Ok(()));
    }

    /// An older scrip's pages carry no `more`: once caught up, each of them
    /// proves the set current, events or not (revocations that keep coming
    /// must not make a current follower stale).
    #[test]
    fn pages_without_more_keep_a_caught_up_set_current() {
        let r = Revocations::new(Duration::from_secs(60), 0);
        let far = unix_now() + 600;
        r.apply(br#"{"cursor":2,"events":[]}"#).unwrap();
        // Well within the 60 s: the checks below have seconds to spare.
        let old = Instant::now().checked_sub(Duration::from_secs(50));
        r.state.write().unwrap().synced_at = old;
        let page = format!(r#"{{"cursor":3,"events":[{{"type":"task","txn":"t1","exp":{far}}}]}}"#);
        r.apply(page.as_bytes()).unwrap();
        assert!(
            r.state.read().unwrap().synced_at > old,
            "a caught-up page without `more` did not count as current"
        );
        assert_eq!(r.check("t1", "j"), Err(VerifyError::Revoked));
        // A full one may have more behind it: it is applied, not current.
        r.state.write().unwrap().synced_at = old;
        let events: Vec<String> = (0..OLD_PAGE)
            .map(|i| format!(r#"{{"type":"task","txn":"f{i}","exp":{far}}}"#))
            .collect();
        let full = format!(
            r#"{{"cursor":{},"events":[{}]}}"#,
            4 + OLD_PAGE,
            events.join(",")
        );
        r.apply(full.as_bytes()).unwrap();
        assert_eq!(
            r.state.read().unwrap().synced_at,
            old,
            "a full page counted as current"
        );
        assert_eq!(r.check("f999", "j"), Err(VerifyError::Revoked));
    }

    #[test]
    fn forgets_expired_entries_and_keeps_cursor_on_bad_pages() {
        let r = Revocations::new(Duration::from_secs(60), 0);
        let past = unix_now() - 10;
        r.apply(
            format!(r#"{{"cursor":7,"events":[{{"type":"task","txn":"old","exp":{past}}}]}}"#)
                .as_bytes(),
        )
        .unwrap();
        r.apply(br#"{"cursor":7,"events":[]}"#).unwrap();
        // scrip sends live events only: one that looks expired here says
        // this clock may run ahead, and it is kept a while by the other.
        assert_eq!(r.check("old", "j"), Err(VerifyError::Revoked));
        r.state.write().unwrap().pruned_at = None;
        r.take(
            Vec::new(),
            7,
            true,
            true,
            clocks(unix_now(), KEEP_AT_LEAST + 1),
        )
        .unwrap();
        assert_eq!(r.check("old", "j"), Ok(()));
        assert_eq!(r.cursor(), 7);
        for bad in [
            "not json",
            r#"{"events":[]}"#,
            r#"{"cursor":9,"events":[{"type":"task","exp":1}]}"#,
        ] {
            assert!(r.apply(bad.as_bytes()).is_err(), "{bad}");
            assert_eq!(r.cursor(), 7, "{bad}");
        }
    }

    /// A feed whose every answer arrives `delay` after it was asked for.
    #[derive(Debug)]
    struct Slow {
        delay: Duration,
    }

    impl FeedSource for Slow {
        fn page(&self, after: u64, _wait: Duration) -> PageFuture<'_> {
            Box::pin(async move {
                tokio::time::sleep(self.delay).await;
                Ok(format!(r#"{{"cursor":{after},"events":[],"more":false}}"#).into_bytes())
            })
        }

        fn claim_once<'a>(&'a self, _token: &'a str) -> ClaimFuture<'a> {
            Box::pin(async { Ok(false) })
        }
    }

    /// A page proves the set current as of when it was asked for, not when
    /// it arrived: an answer held back on the way (by the network, or by
    /// whoever sits on it) shows nothing revoked since scrip sent it.
    #[tokio::test]
    async fn a_page_held_back_on_the_way_is_as_old_as_its_question() {
        let r = Revocations::new(Duration::from_secs(1), 0);
        let held = Slow {
            delay: Duration::from_millis(1200),
        };
        r.poll(&held, Duration::ZERO).await.unwrap();
        assert!(r.caught_up());
        assert_eq!(r.check("t", "j"), Err(VerifyError::RevocationStale));
        let prompt = Slow {
            delay: Duration::ZERO,
        };
        r.poll(&prompt, Duration::ZERO).await.unwrap();
        assert_eq!(r.check("t", "j"), Ok(()));
    }

    #[test]
    fn stale_state_refuses_everything() {
        let r = Revocations::new(Duration::ZERO, 0);
        r.apply(br#"{"cursor":1,"events":[]}"#).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(r.check("t", "j"), Err(VerifyError::RevocationStale));
    }
}
