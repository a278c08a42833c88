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
//! when notifications may have been missed). Verified tokens are stamped
//! with the key ring's generation instead, raised once a changed key set
//! is in use for verification (after the store said the keys changed, and
//! after they were read): a token verified with a key in the moment before
//! its withdrawal took effect is verified again after. An entry is stamped with the counter read *before*
//! the store was read, so a revocation that lands in between makes it stale.
//! A hit therefore never outlives a revocation on this replica, and lags one
//! on another replica by no more than its notification (see
//! docs/replicas.md). Whether
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
    /// The key ring's generation.
    keys: Arc<std::sync::atomic::AtomicU64>,
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
    pub(crate) fn new(
        changes: watch::Receiver<Changes>,
        keys: Arc<std::sync::atomic::AtomicU64>,
    ) -> Self {
        Self {
            changes,
            keys,
            tokens: Mutex::new(HashMap::new()),
            access: Mutex::new(HashMap::new()),
            tasks: Mutex::new(HashMap::new()),
        }
    }

    /// The key ring's generation: raised once a new key set verifies
    /// (see [`crate::keyring::Keyring::generation`]), not when the store
    /// says the keys changed, which is before.
    fn keys_stamp(&self) -> u64 {
        self.keys.load(std::sync::atomic::Ordering::SeqCst)
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// A token verified (and kept) under one key-set generation is verified
    /// again under the next: one verified with a key in the moment before
    /// its withdrawal took effect is not kept past it.
    #[test]
    fn verified_tokens_are_kept_for_one_key_set_generation() {
        let (_changes, seen) = watch::channel(Changes::default());
        let generation = Arc::new(AtomicU64::new(7));
        let cache = ExchangeCache::new(seen, generation.clone());
        let claims: AccessClaims = serde_json::from_value(serde_json::json!({
            "iss": "https://scrip.test", "sub": "a", "aud": "github", "iat": 1, "exp": 100,
            "jti": "j", "client_id": "a", "scope": "read", "txn": "t",
        }))
        .unwrap_or_else(|e| unreachable!("{e}"));
        let Err(stamp) = cache.verified::<AccessClaims>("token", 50) else {
            unreachable!("nothing kept yet");
        };
        cache.put_verified("token", stamp, Arc::new(claims));
        assert!(cache.verified::<AccessClaims>("token", 50).is_ok());
        generation.fetch_add(1, Ordering::SeqCst);
        assert!(cache.verified::<AccessClaims>("token", 50).is_err());
    }
}
