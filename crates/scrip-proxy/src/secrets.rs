//! The upstreams' static keys: sealed at rest, opened only to be injected.
//!
//! A value is sealed with AES-256-GCM under the key-encryption key (KEK),
//! with a fresh random 96-bit nonce, and with `name`, `action` and
//! `version` as associated data, so a sealed value copied to another row
//! (another upstream, another action class, an older version) fails to open.
//! The store holds only [`SecretRecord`]s (nonce, ciphertext, tag).
//!
//! [`SecretValue`] and [`Kek`] zero their memory on drop and print nothing
//! in `Debug`. [`SecretCache`] keeps opened values for a few seconds, so a
//! rotation by another process is seen within [`CACHE_TTL`].

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use scrip_store::{SecretRecord, Store, StoreError};
use zeroize::Zeroizing;

/// How long an opened secret is reused before the store is read again.
pub const CACHE_TTL: Duration = Duration::from_secs(2);
/// The largest secret value accepted.
pub const MAX_SECRET_BYTES: usize = 8 * 1024;
/// The KEK's length.
pub const KEK_LEN: usize = 32;

/// Why a secret could not be sealed, opened or read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The value is unusable as a secret.
    #[error("secret value {0}")]
    BadValue(&'static str),
    /// The sealed value does not open under this KEK for this row.
    #[error(
        "secret `{name}` `{action}` version {version} does not open with this key-encryption key"
    )]
    Open {
        /// The upstream.
        name: String,
        /// The action.
        action: String,
        /// The version.
        version: u32,
    },
    /// The crypto library failed.
    #[error("secret encryption failed")]
    Crypto,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The key-encryption key, as it seals secrets: scrip's one
/// key-encryption key ([`scrip_jose::Kek`]) with each value bound to its row.
pub struct Kek(scrip_jose::Kek);

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(..)")
    }
}

impl Kek {
    /// Seals secrets under `kek`.
    #[must_use]
    pub fn new(kek: scrip_jose::Kek) -> Self {
        Self(kek)
    }

    /// A KEK from its 32 bytes (which the caller should zero after).
    ///
    /// # Errors
    /// [`SecretError::Crypto`] when the bytes are not a key.
    pub fn from_bytes(bytes: &[u8; KEK_LEN]) -> Result<Self, SecretError> {
        scrip_jose::Kek::from_bytes(bytes)
            .map(Self)
            .map_err(|_| SecretError::Crypto)
    }

    /// Seals `value` as version `version` of `name`/`action`: nonce,
    /// ciphertext and tag.
    ///
    /// # Errors
    /// [`SecretError::Crypto`] on a crypto failure.
    pub fn seal(
        &self,
        name: &str,
        action: &str,
        version: u32,
        value: &SecretValue,
    ) -> Result<Vec<u8>, SecretError> {
        self.0
            .seal(&aad(name, action, version), &value.0)
            .map_err(|_| SecretError::Crypto)
    }

    /// Opens a stored version.
    ///
    /// # Errors
    /// [`SecretError::Open`] when it was sealed under another KEK or for
    /// another row, or was altered.
    pub fn open(&self, record: &SecretRecord) -> Result<SecretValue, SecretError> {
        self.0
            .open(
                &aad(&record.name, &record.action, record.version),
                &record.sealed,
            )
            .map(SecretValue)
            .map_err(|_| SecretError::Open {
                name: record.name.clone(),
                action: record.action.clone(),
                version: record.version,
            })
    }
}

/// Which of `kek`'s keys `record` was sealed under; `None` when neither.
#[must_use]
pub fn sealed_under(kek: &scrip_jose::Kek, record: &SecretRecord) -> Option<scrip_jose::Under> {
    kek.sealed_under(
        &aad(&record.name, &record.action, record.version),
        &record.sealed,
    )
}

/// `record`'s value sealed again under `kek`'s current key when only its
/// previous key opens it; `None` when the current key opens it already.
///
/// # Errors
/// [`SecretError::Open`] when neither key opens it; [`SecretError::Crypto`]
/// when sealing fails.
pub fn reseal(
    kek: &scrip_jose::Kek,
    record: &SecretRecord,
) -> Result<Option<Vec<u8>>, SecretError> {
    kek.reseal(
        &aad(&record.name, &record.action, record.version),
        &record.sealed,
    )
    .map_err(|e| match e {
        scrip_jose::JoseError::Key(_) => SecretError::Open {
            name: record.name.clone(),
            action: record.action.clone(),
            version: record.version,
        },
        _ => SecretError::Crypto,
    })
}

fn aad(name: &str, action: &str, version: u32) -> Vec<u8> {
    format!("scrip-secret-v1\0{name}\0{action}\0{version}").into_bytes()
}

/// A secret's plaintext. Zeroed on drop; `Debug` prints no byte of it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretValue(..)")
    }
}

impl SecretValue {
    /// A value read from a pipe or a mint command: one trailing newline
    /// (`\n` or `\r\n`) is dropped; the rest must be non-empty printable
    /// ASCII without spaces at either end, at most [`MAX_SECRET_BYTES`].
    ///
    /// # Errors
    /// [`SecretError::BadValue`] saying what is wrong (never the value).
    pub fn from_input(mut input: Vec<u8>) -> Result<Self, SecretError> {
        if input.last() == Some(&b'\n') {
            input.pop();
            if input.last() == Some(&b'\r') {
                input.pop();
            }
        }
        let value = Zeroizing::new(input);
        if value.is_empty() {
            return Err(SecretError::BadValue("is empty"));
        }
        if value.len() > MAX_SECRET_BYTES {
            return Err(SecretError::BadValue("is longer than 8 KiB"));
        }
        if !value.iter().all(|b| (0x20..0x7f).contains(b)) {
            return Err(SecretError::BadValue(
                "must be printable ASCII on one line (it goes into an HTTP header or query)",
            ));
        }
        if value.first() == Some(&b' ') || value.last() == Some(&b' ') {
            return Err(SecretError::BadValue("must not begin or end with a space"));
        }
        Ok(Self(value))
    }

    /// The bytes, for injection and redaction only.
    #[must_use]
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

/// One secret's state as `scrip secret list` and the metrics show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SecretStatus {
    /// The upstream.
    pub name: String,
    /// The action class.
    pub action: String,
    /// The version.
    pub version: u32,
    /// Seconds since it was set.
    pub age: u64,
    /// `current`, or `retiring` (replaced, still within its grace period)
    /// or `retired` (past it; dropped at the next rotation).
    pub state: &'static str,
    /// Whether the current version is older than `max_age`.
    pub overdue: bool,
}

/// The status of every stored version, given `(max_age, grace)` per
/// `(name, action)`.
#[must_use]
pub fn statuses(
    records: &[SecretRecord],
    now: u64,
    limits: impl Fn(&str, &str) -> Option<(u64, u64)>,
) -> Vec<SecretStatus> {
    records
        .iter()
        .map(|r| {
            let (max_age, grace) = limits(&r.name, &r.action).unwrap_or((u64::MAX, 0));
            let age = now.saturating_sub(r.created_at);
            let (state, overdue) = match r.retired_at {
                None => ("current", age > max_age),
                Some(at) if now < at.saturating_add(grace) => ("retiring", false),
                Some(_) => ("retired", false),
            };
            SecretStatus {
                name: r.name.clone(),
                action: r.action.clone(),
                version: r.version,
                age,
                state,
                overdue,
            }
        })
        .collect()
}

#[derive(Debug)]
struct Cached {
    value: Option<Arc<SecretValue>>,
    /// Versions replaced less than their grace ago, with when that ends.
    retiring: Vec<(u64, Arc<SecretValue>)>,
    fetched: Instant,
}

/// The versions of one secret the upstream may accept.
#[derive(Debug, Default)]
pub struct Accepted {
    /// The newest: the one injected.
    pub current: Option<Arc<SecretValue>>,
    /// Those replaced less than `grace` ago, which the upstream still
    /// accepts by convention: never injected, but redacted like the current.
    pub retiring: Vec<Arc<SecretValue>>,
}

/// Opened secrets, reread from the store every [`CACHE_TTL`].
pub struct SecretCache {
    store: Arc<dyn Store>,
    kek: Kek,
    /// The grace of each `(name, action)` (none: 0).
    grace: HashMap<(String, String), u64>,
    entries: RwLock<HashMap<(String, String), Cached>>,
}

impl std::fmt::Debug for SecretCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretCache").finish_non_exhaustive()
    }
}

impl SecretCache {
    /// A cache over `store`, opening with `kek`; `grace` is each `(name,
    /// action)`'s (`[upstreams.secrets.<action>] grace`).
    #[must_use]
    pub fn new(store: Arc<dyn Store>, kek: Kek, grace: HashMap<(String, String), u64>) -> Self {
        Self {
            store,
            kek,
            grace,
            entries: RwLock::new(HashMap::new()),
        }
    }

    /// The versions of `name`/`action` the upstream may accept at `now`
    /// (Unix seconds).
    ///
    /// # Errors
    /// [`SecretError`] when the store fails or a value does not open.
    pub async fn accepted(
        &self,
        name: &str,
        action: &str,
        now: u64,
    ) -> Result<Accepted, SecretError> {
        let key = (name.to_owned(), action.to_owned());
        let accepted = |c: &Cached| Accepted {
            current: c.value.clone(),
            retiring: c
                .retiring
                .iter()
                .filter(|(until, _)| now < *until)
                .map(|(_, v)| v.clone())
                .collect(),
        };
        if let Ok(entries) = self.entries.read()
            && let Some(c) = entries.get(&key)
            && c.fetched.elapsed() < CACHE_TTL
        {
            return Ok(accepted(c));
        }
        let grace = self.grace.get(&key).copied().unwrap_or(0);
        let versions = self.store.secret_versions(name, action).await?;
        let mut cached = Cached {
            value: None,
            retiring: Vec::new(),
            fetched: Instant::now(),
        };
        for r in &versions {
            match r.retired_at {
                None if cached.value.is_none() => {
                    cached.value = Some(Arc::new(self.kek.open(r)?));
                }
                None => {}
                // One that does not open (sealed under another key, or
                // altered) cannot be looked for; it was never injected, and
                // failing every request of the upstream over it would make a
                // rotation unable to mend a bad version until its grace ran
                // out.
                Some(at) if now < at.saturating_add(grace) => match self.kek.open(r) {
                    Ok(value) => cached
                        .retiring
                        .push((at.saturating_add(grace), Arc::new(value))),
                    Err(e) => tracing::warn!(
                        error = %e,
                        "a replaced secret version does not open; answers are not searched for it"
                    ),
                },
                Some(_) => {}
            }
        }
        let answer = accepted(&cached);
        if let Ok(mut entries) = self.entries.write() {
            entries.insert(key, cached);
        }
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The versions the upstream may accept: the current one, and those
    /// replaced less than their grace ago; one of those that does not open
    /// is left out rather than failing every request.
    #[tokio::test]
    async fn replaced_versions_are_accepted_for_their_grace() {
        use scrip_store::Write;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(scrip_store::SqliteStore::open_in(dir.path()).await.unwrap());
        let key = |k: u8| scrip_jose::Kek::from_bytes(&[k; 32]).unwrap();
        let put = |k: u8, version: u32, at: u64, value: &str| {
            let value = SecretValue::from_input(value.as_bytes().to_vec()).unwrap();
            Write::PutSecret {
                secret: Box::new(SecretRecord {
                    sealed: Kek::new(key(k))
                        .seal("legacy", "read", version, &value)
                        .unwrap(),
                    created_at: at,
                    ..record("legacy", "read", version, Vec::new())
                }),
                purge_retired_before: 0,
            }
        };
        // Version 2 was sealed under another key by mistake; 3 mends it.
        store.commit(vec![put(1, 1, 1_000, "v1")]).await.unwrap();
        store.commit(vec![put(2, 2, 2_000, "v2")]).await.unwrap();
        store.commit(vec![put(1, 3, 3_000, "v3")]).await.unwrap();
        let grace = HashMap::from([(("legacy".to_owned(), "read".to_owned()), 1_500)]);
        let values = |a: &Accepted| {
            a.retiring
                .iter()
                .map(|v| String::from_utf8(v.0.to_vec()).unwrap())
                .collect::<Vec<_>>()
        };
        let fresh = || SecretCache::new(store.clone(), Kek::new(key(1)), grace.clone());
        let a = fresh().accepted("legacy", "read", 3_100).await.unwrap();
        assert_eq!(
            a.current.as_ref().map(|v| v.0.to_vec()),
            Some(b"v3".to_vec())
        );
        // v1 was replaced at 2,000, within its 1,500 s; v2 does not open.
        assert_eq!(values(&a), ["v1"]);
        // Past v1's grace, nothing but the current (v2, in its grace until
        // 4,500, still does not open).
        let a = fresh().accepted("legacy", "read", 3_600).await.unwrap();
        assert!(values(&a).is_empty());
    }

    fn record(name: &str, action: &str, version: u32, sealed: Vec<u8>) -> SecretRecord {
        SecretRecord {
            name: name.into(),
            action: action.into(),
            version,
            sealed,
            created_at: 100,
            retired_at: None,
        }
    }

    #[test]
    fn seal_and_open_bound_to_the_row() {
        let kek = Kek::from_bytes(&[7; 32]).unwrap();
        let value = SecretValue::from_input(b"key-123\n".to_vec()).unwrap();
        let sealed = kek.seal("legacy", "read", 1, &value).unwrap();
        assert!(memchr::memmem::find(&sealed, b"key-123").is_none());
        let opened = kek
            .open(&record("legacy", "read", 1, sealed.clone()))
            .unwrap();
        assert_eq!(opened.expose(), b"key-123");
        for (n, a, v) in [
            ("legacy", "write", 1),
            ("other", "read", 1),
            ("legacy", "read", 2),
        ] {
            assert!(
                kek.open(&record(n, a, v, sealed.clone())).is_err(),
                "{n} {a} {v}"
            );
        }
        let other = Kek::from_bytes(&[8; 32]).unwrap();
        assert!(
            other
                .open(&record("legacy", "read", 1, sealed.clone()))
                .is_err()
        );
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(kek.open(&record("legacy", "read", 1, flipped)).is_err());
        assert!(kek.open(&record("legacy", "read", 1, vec![1, 2])).is_err());
        // A fresh nonce each time.
        assert_ne!(kek.seal("legacy", "read", 1, &value).unwrap(), sealed);
        // Rows whose fields run together alike are told apart.
        for ((n, a, v), (other_n, other_a, other_v)) in [
            (("legacy", "read1", 1), ("legacy", "read", 11)),
            (("legacy", "read", 11), ("legacy", "read1", 1)),
            (("legacy", "read", 1), ("legac", "yread", 1)),
        ] {
            let sealed = kek.seal(n, a, v, &value).unwrap();
            assert!(kek.open(&record(n, a, v, sealed.clone())).is_ok());
            assert!(
                kek.open(&record(other_n, other_a, other_v, sealed))
                    .is_err(),
                "{n} {a} {v} opened as {other_n} {other_a} {other_v}"
            );
        }
    }

    #[test]
    fn values() {
        let ok = |s: &[u8], want: &[u8]| {
            assert_eq!(SecretValue::from_input(s.to_vec()).unwrap().expose(), want)
        };
        ok(b"abc", b"abc");
        ok(b"abc\n", b"abc");
        ok(b"abc\r\n", b"abc");
        ok(b"a b", b"a b");
        for bad in [
            &b""[..],
            b"\n",
            b"a\nb",
            b"a\n\n",
            b"\tabc",
            b" abc",
            b"abc ",
            "é".as_bytes(),
        ] {
            assert!(SecretValue::from_input(bad.to_vec()).is_err(), "{bad:?}");
        }
        assert!(SecretValue::from_input(vec![b'a'; MAX_SECRET_BYTES + 1]).is_err());
        let v = SecretValue::from_input(b"hunter2".to_vec()).unwrap();
        assert_eq!(format!("{v:?}"), "SecretValue(..)");
        let kek = Kek::from_bytes(&[1; 32]).unwrap();
        assert_eq!(format!("{kek:?}"), "Kek(..)");
    }

    #[test]
    fn status() {
        let mut old = record("legacy", "read", 1, vec![]);
        old.retired_at = Some(1000);
        let new = SecretRecord {
            version: 2,
            created_at: 1000,
            ..record("legacy", "read", 2, vec![])
        };
        let limits = |_: &str, _: &str| Some((500, 100));
        let s = statuses(&[new.clone(), old.clone()], 1050, limits);
        assert_eq!((s[0].state, s[0].overdue, s[0].age), ("current", false, 50));
        assert_eq!(s[1].state, "retiring");
        let s = statuses(&[new, old], 1600, limits);
        assert_eq!((s[0].state, s[0].overdue), ("current", true));
        assert_eq!(s[1].state, "retired");
    }
}
