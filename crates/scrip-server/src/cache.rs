//! What the token endpoints keep in memory so that an agent exchanging one
//! task token many times pays for its verification and its task read once,
//! and a resource server introspecting one access token many times pays for
//! its signature check once: verified task and access tokens (by the
//! SHA-256 of the token) and task records.
//!
//! Invariant: an entry is used only while the store's change counter it was
//! stamped with is unchanged. The writer bumps `revocations` when it commits
//! an ended task or a revoked token, before it answers the commit, and a
//! shared store bumps it when another replica's notification arrives (or
//! when notifications may have been missed); `keys` is bumped when the
//! signing keys change. An entry is stamped with the counter read *before*
//! the store was read, so a revocation that lands in between makes it stale.
//! A hit therefore never outlives a revocation on this replica, and lags one
//! on another replica by no more than its notification (see
//! docs/replicas.md). Verified tokens are stamped with `keys` only: whether
//! a token is revoked, or its task ended, is never read from here for an
//! access token (introspection asks the store each time). Expiry is checked
//! on every hit. The maps are bounded: when one is full it is emptied.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use scrip_store::{Changes, TaskRecord};
use scrip_token::{AccessClaims, TaskClaims};
use tokio::sync::watch;

/// The most entries each map holds.
const CAPACITY: usize = 20_000;

/// Token digest: SHA-256 of the compact token.
type Digest = scrip_jose::TokenDigest;

pub(crate) struct ExchangeCache {
    changes: watch::Receiver<Changes>,
    tokens: Mutex<HashMap<Digest, (u64, Arc<TaskClaims>)>>,
    access: Mutex<HashMap<Digest, (u64, Arc<AccessClaims>)>>,
    tasks: Mutex<HashMap<String, (u64, Arc<TaskRecord>)>>,
}

/// The claims of a kind of token kept once verified, each kind in a map of
/// its own.
pub(crate) trait Kept: Sized {
    /// Where this kind is kept.
    fn map(cache: &ExchangeCache) -> &Mutex<HashMap<Digest, (u64, Arc<Self>)>>;
    /// Its expiry, seconds since the epoch.
    fn exp(&self) -> u64;
}

impl Kept for TaskClaims {
    fn map(cache: &ExchangeCache) -> &Mutex<HashMap<Digest, (u64, Arc<Self>)>> {
        &cache.tokens
    }
    fn exp(&self) -> u64 {
        self.exp
    }
}

impl Kept for AccessClaims {
    fn map(cache: &ExchangeCache) -> &Mutex<HashMap<Digest, (u64, Arc<Self>)>> {
        &cache.access
    }
    fn exp(&self) -> u64 {
        self.exp
    }
}

/// A stamp to give an entry that is about to be read from the source.
#[derive(Clone, Copy)]
pub(crate) struct Stamp(u64);

fn insert<K: std::hash::Hash + Eq, V>(map: &Mutex<HashMap<K, (u64, V)>>, key: K, stamp: u64, v: V) {
    if let Ok(mut m) = map.lock() {
        if m.len() >= CAPACITY {
            m.clear();
        }
        m.insert(key, (stamp, v));
    }
}

impl ExchangeCache {
    pub(crate) fn new(changes: watch::Receiver<Changes>) -> Self {
        Self {
            changes,
            tokens: Mutex::new(HashMap::new()),
            access: Mutex::new(HashMap::new()),
            tasks: Mutex::new(HashMap::new()),
        }
    }

    fn keys_stamp(&self) -> u64 {
        self.changes.borrow().keys
    }

    fn revocations_stamp(&self) -> u64 {
        self.changes.borrow().revocations
    }

    /// The claims of `token` if it was verified under the current keys and
    /// has not expired at `now`; otherwise the stamp to cache it with. For
    /// an access token this says nothing of revocation.
    pub(crate) fn verified<C: Kept>(&self, token: &str, now: u64) -> Result<Arc<C>, Stamp> {
        let stamp = self.keys_stamp();
        let key = scrip_jose::token_digest(token);
        if let Ok(m) = C::map(self).lock()
            && let Some((at, claims)) = m.get(&key)
            && *at == stamp
            && claims.exp() > now
        {
            return Ok(claims.clone());
        }
        Err(Stamp(stamp))
    }

    /// Remembers the claims of a verified token.
    pub(crate) fn put_verified<C: Kept>(&self, token: &str, stamp: Stamp, claims: Arc<C>) {
        insert(
            C::map(self),
            scrip_jose::token_digest(token),
            stamp.0,
            claims,
        );
    }

    /// The record of task `id` if no revocation was committed since it was
    /// read; otherwise the stamp to cache a fresh read with.
    pub(crate) fn task(&self, id: &str) -> Result<Arc<TaskRecord>, Stamp> {
        let stamp = self.revocations_stamp();
        if let Ok(m) = self.tasks.lock()
            && let Some((at, task)) = m.get(id)
            && *at == stamp
        {
            return Ok(task.clone());
        }
        Err(Stamp(stamp))
    }

    /// Remembers a task record read from the store.
    pub(crate) fn put_task(&self, stamp: Stamp, task: Arc<TaskRecord>) {
        insert(&self.tasks, task.id.clone(), stamp.0, task);
    }
}
