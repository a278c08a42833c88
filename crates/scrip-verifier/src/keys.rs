//! scrip's signing keys, fetched from its `jwks_uri` and cached.
//!
//! The cache is refreshed when it is older than the refresh interval and when
//! a token names a `kid` it does not hold (scrip rotated its key); both are
//! bounded to one attempt per `min_refetch`, so a flood of tokens with made-up
//! `kid`s costs scrip at most one fetch per interval. A failed refresh keeps
//! the keys already held, for at most `max_age` since the last fetch that
//! succeeded (by the wall clock as well, which runs on while the host
//! sleeps); after that every token is refused until one does. A fetch that
//! returns the same document keeps the key set (and so every token verified
//! with it stays cached). Keys never come from a token's own headers.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use scrip_jose::{KeySet, Stamp};

use crate::VerifyError;
use crate::fetch::get_bytes;

/// The largest JWKS document fetched.
const MAX_JWKS_BYTES: usize = 256 * 1024;
/// Timeout of one JWKS fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

struct State {
    keys: Arc<KeySet>,
    /// The document `keys` came from.
    body: Vec<u8>,
    fetched_at: Stamp,
    attempted_at: Stamp,
}

/// Where a verifier's keys come from.
#[derive(Debug)]
pub(crate) enum Keys {
    /// Fetched from scrip's `jwks_uri` and cached.
    Fetched(Arc<JwksCache>),
    /// Inside scrip itself, which holds its own public keys (replaced as
    /// they rotate).
    Local(scrip_jose::SharedKeySet),
}

impl Keys {
    /// The keys to verify with.
    pub(crate) async fn current(&self) -> Result<Arc<KeySet>, VerifyError> {
        match self {
            Self::Fetched(cache) => cache.current().await,
            Self::Local(keys) => Ok(keys.snapshot()),
        }
    }

    /// Newer keys than `seen`, when there are any to try.
    pub(crate) async fn refetch(&self, seen: &Arc<KeySet>) -> Option<Arc<KeySet>> {
        match self {
            Self::Fetched(cache) => cache.refetch(seen).await,
            Self::Local(keys) => {
                let now = keys.snapshot();
                (!Arc::ptr_eq(&now, seen)).then_some(now)
            }
        }
    }
}

/// The cached JWKS of one issuer.
pub(crate) struct JwksCache {
    uri: String,
    http: reqwest::Client,
    refresh: Duration,
    min_refetch: Duration,
    max_age: Duration,
    state: RwLock<State>,
    fetching: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for JwksCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksCache")
            .field("uri", &self.uri)
            .finish_non_exhaustive()
    }
}

async fn fetch(http: &reqwest::Client, uri: &str) -> Result<Vec<u8>, String> {
    get_bytes(http, uri, None, FETCH_TIMEOUT, MAX_JWKS_BYTES).await
}

fn parse(uri: &str, body: &[u8]) -> Result<KeySet, String> {
    KeySet::from_jwks_json(body).map_err(|e| format!("`{uri}`: {e}"))
}

impl JwksCache {
    /// Fetches the JWKS once; the verifier does not start without keys.
    pub(crate) async fn new(
        http: reqwest::Client,
        uri: String,
        refresh: Duration,
        min_refetch: Duration,
        max_age: Duration,
    ) -> Result<Self, String> {
        let body = fetch(&http, &uri).await?;
        let keys = parse(&uri, &body)?;
        let now = Stamp::now();
        Ok(Self {
            uri,
            http,
            refresh,
            min_refetch,
            max_age,
            state: RwLock::new(State {
                keys: Arc::new(keys),
                body,
                fetched_at: now,
                attempted_at: now,
            }),
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    fn snapshot(&self) -> (Arc<KeySet>, Stamp, Stamp) {
        match self.state.read() {
            Ok(s) => (s.keys.clone(), s.fetched_at, s.attempted_at),
            Err(poisoned) => {
                let s = poisoned.into_inner();
                (s.keys.clone(), s.fetched_at, s.attempted_at)
            }
        }
    }

    /// The keys to verify with, refreshed first when due.
    pub(crate) async fn current(self: &Arc<Self>) -> Result<Arc<KeySet>, VerifyError> {
        let (keys, fetched_at, attempted_at) = self.snapshot();
        if fetched_at.elapsed() < self.refresh || attempted_at.elapsed() < self.min_refetch {
            return self.within_age(keys, fetched_at);
        }
        self.refetch(&keys).await;
        let (keys, fetched_at, _) = self.snapshot();
        self.within_age(keys, fetched_at)
    }

    fn within_age(&self, keys: Arc<KeySet>, fetched_at: Stamp) -> Result<Arc<KeySet>, VerifyError> {
        if fetched_at.elapsed() > self.max_age {
            return Err(VerifyError::KeysStale);
        }
        Ok(keys)
    }

    /// Called when `seen` lacks a token's `kid`: fetches again unless another
    /// caller already did or the last attempt was too recent. Returns newer
    /// keys, or `None` when there are none to try.
    ///
    /// The fetch runs on a task of its own, which the caller only waits for:
    /// a request dropped while it waits (its client went away) must not
    /// cancel it, or the attempt it recorded would hold off every other
    /// fetch for `min_refetch` with nothing fetched, and a client that did
    /// that every `min_refetch` would keep withdrawn keys trusted.
    pub(crate) async fn refetch(self: &Arc<Self>, seen: &Arc<KeySet>) -> Option<Arc<KeySet>> {
        let cache = Arc::clone(self);
        let seen = Arc::clone(seen);
        match tokio::spawn(async move { cache.refetch_now(&seen).await }).await {
            Ok(newer) => newer,
            Err(e) => {
                // A fetch that panicked leaves the keys as they were.
                tracing::error!(uri = %self.uri, error = %e, "scrip keys fetch failed");
                None
            }
        }
    }

    async fn refetch_now(&self, seen: &Arc<KeySet>) -> Option<Arc<KeySet>> {
        let _guard = self.fetching.lock().await;
        let (keys, _, attempted_at) = self.snapshot();
        if !Arc::ptr_eq(&keys, seen) {
            // Another caller fetched while this one waited.
            return Some(keys);
        }
        if attempted_at.elapsed() < self.min_refetch {
            return None;
        }
        if let Ok(mut s) = self.state.write() {
            s.attempted_at = Stamp::now();
        }
        let mut exposed = false;
        let mut withdrawn = false;
        match fetch(&self.http, &self.uri).await.and_then(|body| {
            exposed = scrip_jose::publishes_private_key(&body);
            parse(&self.uri, &body)
                .map(|fresh| (fresh, body.clone()))
                .inspect_err(|_| withdrawn = keys.still_listed_in(&body) == Some(false))
        }) {
            Ok((fresh, body)) => {
                let Ok(mut s) = self.state.write() else {
                    return None;
                };
                s.fetched_at = Stamp::now();
                if s.body == body {
                    // The same keys: nothing newer to try, and the tokens
                    // verified with them stay cached.
                    return None;
                }
                tracing::info!(uri = %self.uri, keys = fresh.len(), "scrip keys refreshed");
                let fresh = Arc::new(fresh);
                s.keys = fresh.clone();
                s.body = body;
                Some(fresh)
            }
            Err(error) if exposed => {
                // scrip's key is exposed: the keys held from before are no
                // more to be trusted than the new ones.
                tracing::error!(%error, "scrip published a private key; every token is refused until it publishes public keys only");
                if let Ok(mut s) = self.state.write() {
                    s.keys = Arc::new(KeySet::default());
                    s.body.clear();
                }
                None
            }
            Err(error) if withdrawn => {
                // A JWKS that cannot be used, and that no longer lists a key
                // held from before (withdrawn, perhaps exposed): that key is
                // not trusted on.
                tracing::error!(%error, "scrip keys could not be refreshed, and scrip no longer lists keys held from before; every token is refused until it publishes a usable JWKS");
                if let Ok(mut s) = self.state.write() {
                    s.keys = Arc::new(KeySet::default());
                    s.body.clear();
                }
                None
            }
            Err(error) => {
                tracing::warn!(%error, "scrip keys could not be refreshed; keeping the cached ones");
                None
            }
        }
    }
}
