//! Tokens verified recently, so that one presented again is not verified
//! again: an agent starts several tasks with one service-account token, and
//! calls a tool many times with one access token. A signature check (ES256
//! about 70 µs here) costs far more than the SHA-256 of the token (about
//! 1 µs) that finds it.
//!
//! Invariant: [`Recent::get`] returns what was kept for a token only when
//! the token is the very same bytes (its SHA-256), the key set it is asked
//! with is the very one that verified it (`Arc::ptr_eq`: a refetched or
//! rotated key set is a new one, so a removed key stops verifying at once),
//! and the token is still valid now by the same test [`crate::verify`]
//! applies to `exp`, `nbf` and `iat`. Only what passed [`crate::verify`] is
//! put; a failure is never kept. Everything else a caller checks per use
//! (revocation, scope, single use) it still checks on a hit. The map holds
//! at most its capacity: when full it is emptied.
//!
//! One `Recent` must serve one set of expectations (issuer, audiences,
//! algorithms, `typ`, leeway): a token verified for one audience is not
//! thereby valid for another.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::{KeySet, Validity};

/// SHA-256 of a compact token.
pub type TokenDigest = [u8; 32];

/// The SHA-256 of `token`.
#[must_use]
pub fn token_digest(token: &str) -> TokenDigest {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut out = [0; 32];
    out.copy_from_slice(d.as_ref());
    out
}

struct Entry<T> {
    value: T,
    keys: Arc<KeySet>,
    validity: Validity,
}

/// What was kept of tokens verified recently, by their SHA-256.
pub struct Recent<T> {
    capacity: usize,
    map: Mutex<HashMap<TokenDigest, Arc<Entry<T>>>>,
}

impl<T> std::fmt::Debug for Recent<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recent")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl<T: Clone> Recent<T> {
    /// An empty map holding at most `capacity` tokens.
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            map: Mutex::new(HashMap::new()),
        }
    }

    /// What was kept for the token with `digest`, if `keys` verified it and
    /// it is still valid with `leeway`.
    #[must_use]
    pub fn get(&self, digest: &TokenDigest, keys: &Arc<KeySet>, leeway: u64) -> Option<T> {
        let entry = self.map.lock().ok()?.get(digest).cloned()?;
        (Arc::ptr_eq(&entry.keys, keys) && entry.validity.holds(leeway))
            .then(|| entry.value.clone())
    }

    /// Keeps `value` for the token with `digest`, which `keys` verified
    /// with this `validity` (from [`crate::Verified`]).
    pub fn put(&self, digest: TokenDigest, keys: Arc<KeySet>, validity: Validity, value: T) {
        if let Ok(mut map) = self.map.lock() {
            if map.len() >= self.capacity {
                map.clear();
            }
            map.insert(
                digest,
                Arc::new(Entry {
                    value,
                    keys,
                    validity,
                }),
            );
        }
    }

    /// How many tokens are kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().map_or(0, |m| m.len())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;
    use crate::{SigningAlgorithm, SigningKey};

    fn now() -> f64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
            .floor()
    }

    fn key_set(key: &SigningKey) -> Arc<KeySet> {
        let jwks = serde_json::json!({ "keys": [key.public_jwk()] });
        Arc::new(KeySet::from_jwks_json(jwks.to_string().as_bytes()).unwrap())
    }

    fn valid_for(secs: f64) -> Validity {
        Validity {
            expiry: now() + secs,
            earliest: now() - 1.0,
        }
    }

    #[test]
    fn a_hit_needs_the_same_token_and_the_very_key_set() {
        let (key, _) = SigningKey::generate(SigningAlgorithm::ES256).unwrap();
        let keys = key_set(&key);
        let recent = Recent::new(10);
        recent.put(token_digest("a.b.c"), keys.clone(), valid_for(60.0), 7);
        assert_eq!(recent.get(&token_digest("a.b.c"), &keys, 0), Some(7));
        assert_eq!(recent.get(&token_digest("a.b.d"), &keys, 0), None);
        // The same keys, fetched again, are another set: verified again.
        let same_keys_again = key_set(&key);
        assert_eq!(
            recent.get(&token_digest("a.b.c"), &same_keys_again, 0),
            None
        );
    }

    #[test]
    fn a_hit_needs_the_token_valid_now() {
        let (key, _) = SigningKey::generate(SigningAlgorithm::EdDSA).unwrap();
        let keys = key_set(&key);
        let recent = Recent::new(10);
        let expired = Validity {
            expiry: now() - 5.0,
            earliest: now() - 60.0,
        };
        recent.put(token_digest("old"), keys.clone(), expired, 1);
        assert_eq!(recent.get(&token_digest("old"), &keys, 0), None);
        assert_eq!(recent.get(&token_digest("old"), &keys, 30), Some(1));
        let early = Validity {
            expiry: now() + 60.0,
            earliest: now() + 5.0,
        };
        recent.put(token_digest("early"), keys.clone(), early, 2);
        assert_eq!(recent.get(&token_digest("early"), &keys, 0), None);
        assert_eq!(recent.get(&token_digest("early"), &keys, 30), Some(2));
    }

    #[test]
    fn validity_has_the_bounds_verify_has() {
        let at = 1_000_000;
        #[expect(clippy::cast_precision_loss, reason = "a small whole number")]
        let t = at as f64;
        let v = |expiry: f64, earliest: f64| Validity { expiry, earliest };
        // verify refuses `exp <= now - leeway` (the current time must be
        // before `exp`), `nbf > now + leeway` and `iat > now + leeway`.
        assert!(v(t - 29.0, t + 30.0).holds_at(at, 30));
        assert!(!v(t - 30.0, t).holds_at(at, 30));
        assert!(!v(t + 60.0, t + 31.0).holds_at(at, 30));
        assert!(v(t + 1.0, f64::NEG_INFINITY).holds_at(at, 0));
        assert!(!v(t, f64::NEG_INFINITY).holds_at(at, 0));
    }

    #[test]
    fn a_full_map_is_emptied() {
        let (key, _) = SigningKey::generate(SigningAlgorithm::ES256).unwrap();
        let keys = key_set(&key);
        let recent = Recent::new(2);
        for t in ["a", "b", "c"] {
            recent.put(token_digest(t), keys.clone(), valid_for(60.0), t);
        }
        assert_eq!(recent.len(), 1);
        assert_eq!(recent.get(&token_digest("c"), &keys, 0), Some("c"));
        assert_eq!(recent.get(&token_digest("a"), &keys, 0), None);
    }
}
