//! The keys this server signs with and publishes.
//!
//! On the embedded store they are files in `<data_dir>/keys` (see
//! [`crate::keys`]) and never change while the server runs. On a shared
//! store every replica signs with the same key set, kept in the store with
//! the private halves sealed under the key-encryption key
//! ([`scrip_jose::Kek`], which never enters the store):
//!
//! - the first replica to start on an empty store creates the first signing
//!   key and the audit checkpoint key. The store adds a key only after the
//!   newest key of its purpose its writer saw, so replicas that start (or
//!   rotate) together add one between them, and a replica whose
//!   key-encryption key does not open the keys that won refuses to start;
//! - every `signing_key_rotation` a replica creates the next signing key,
//!   `active_at` = now + `signing_key_lead`. It is published (JWKS, and every
//!   replica's verification keys, which follow the store's change
//!   notifications and re-read it every [`POLL`]) from then on, and replicas
//!   switch to it at `active_at` by their own clocks, so no replica signs
//!   with a key the others do not know yet;
//! - once the successor is active the old key is retired: published until
//!   the last token it can have signed has expired
//!   ([`scrip_config::Config::longest_token_life`] after the switch), then
//!   dropped.
//!
//! - an operator may withdraw the signing keys at once, for one that leaked
//!   ([`withdraw_signing_keys`], `scrip key withdraw`): a new key signs
//!   from then on, and the others leave the set whatever they signed.
//!
//! Architecture invariant: a token is signed only with a key that is in the
//! published set, and a key leaves the set only after every token it signed
//! has expired, unless an operator withdrew it. A sealed key that does not
//! open is never used.

use std::sync::{Arc, RwLock};

use scrip_config::Config;
use scrip_jose::{Algorithm, Kek, KeySet, SharedKeySet, SigningAlgorithm, SigningKey};
use scrip_store::{Checkpoint, KeyPurpose, Store, StoreError, StoredKey, Write};

use crate::keys::{self, KeyError};

/// How often a replica re-reads the shared key set without being told.
pub const POLL: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a replica serves the shared key set it last read: past it (the
/// store out of its reach), `/jwks` answers 503 rather than a set that may
/// still list keys withdrawn since, and lack the key that signs now.
pub const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// The keys at one moment.
#[derive(Debug)]
struct Ring {
    /// Signing keys by `(active_at, kid)`, oldest first.
    signing: Vec<(u64, Arc<SigningKey>)>,
    checkpoint: Arc<SigningKey>,
    jwks_body: Arc<str>,
    audit_keys_body: Arc<str>,
    checkpoint_jwks: Vec<serde_json::Value>,
}

/// What a shared key set needs.
#[derive(Debug)]
struct Shared {
    kek: Kek,
    algorithm: SigningAlgorithm,
    rotation: u64,
    lead: u64,
    keep: u64,
}

/// The server's keys.
#[derive(Debug)]
pub struct Keyring {
    shared: Option<Shared>,
    ring: RwLock<Arc<Ring>>,
    verify: SharedKeySet,
    algorithms: Vec<Algorithm>,
    /// Counts the changed key sets put in use, each after its verification
    /// keys replaced the last: what was verified under an earlier count may
    /// have been verified with a key since withdrawn or retired.
    generation: Arc<std::sync::atomic::AtomicU64>,
    /// A file key set's keys of a former `signing_algorithm`: when each
    /// leaves the set (seconds) and its `kid`, soonest first. Dropped from
    /// the ring as their time comes ([`Keyring::expire_retired`]).
    retired: std::sync::Mutex<Vec<(u64, String)>>,
    /// When a shared key set was last read and put in use.
    read_at: std::sync::Mutex<std::time::Instant>,
}

fn jwks(keys: &[serde_json::Value]) -> Arc<str> {
    serde_json::json!({ "keys": keys }).to_string().into()
}

pub(crate) fn key_context(k: &StoredKey) -> String {
    format!("scrip-key/v1\n{}\n{}\n{}", k.kid, k.purpose.as_str(), k.alg)
}

fn parse_alg(alg: &str) -> Option<SigningAlgorithm> {
    [
        SigningAlgorithm::ES256,
        SigningAlgorithm::EdDSA,
        SigningAlgorithm::RS256,
    ]
    .into_iter()
    .find(|a| a.as_str() == alg)
}

/// What starting on the store created, for the audit.
#[derive(Debug, Default)]
pub struct Created {
    /// `(kid, what)` of every key created (or found not yet recorded).
    pub keys: Vec<(String, String)>,
    /// The key files among them (a file key set), which say they are not
    /// on the record until [`Created::recorded`] marks them. A start that
    /// stops before (its commit refused, a crash) leaves them so, and the
    /// next start records them. They are never removed: a commit that
    /// failed may still have taken effect, signed by the checkpoint key.
    pub files: Vec<std::path::PathBuf>,
}

impl Created {
    /// Marks the key files as recorded, once their audit records are
    /// committed. A file not marked is recorded again by the next start.
    pub fn recorded(&self) {
        for f in &self.files {
            if let Err(e) = keys::mark_recorded(f) {
                tracing::warn!(path = %f.display(), error = %e, "cannot note in a key file that it is recorded; the next start records it again");
            }
        }
    }

    /// Adds `loaded` if it is not on the record yet, as `what` created.
    fn add(&mut self, loaded: &keys::Loaded, what: &str) {
        if loaded.recorded {
            return;
        }
        let what = if loaded.created {
            format!("{what} created")
        } else {
            // Made by a start that stopped before it recorded it.
            format!("{what} created by an earlier start, which stopped before recording it")
        };
        self.keys.push((loaded.key.kid().to_owned(), what));
        self.files.push(loaded.path.clone());
    }
}

impl Keyring {
    /// The keys in `<data_dir>/keys`, created on first start. The signing
    /// key files of other algorithms (`signing_algorithm` was changed) are
    /// published, to verify what they signed, until every token they can
    /// have signed has expired ([`keys::retired_signing_keys`]).
    ///
    /// # Errors
    /// [`KeyError`] when a key file is unusable.
    pub fn from_files(config: &Config, now: u64) -> Result<(Self, Created), KeyError> {
        let loaded = keys::load_or_create(&config.data_dir, config.signing_algorithm, now)?;
        let checkpoint = keys::load_or_create_checkpoint_key(&config.data_dir, now)?;
        let retired = keys::retired_signing_keys(
            &config.data_dir,
            config.signing_algorithm,
            now,
            config.longest_token_life(),
            loaded.since,
        )?;
        let mut created = Created::default();
        created.add(&loaded, &format!("{} signing key", loaded.key.algorithm()));
        created.add(&checkpoint, "audit checkpoint key");
        // Verification only: the configured key, listed last, is the one
        // active (the newest `active_at`) whatever the clock says.
        let mut signing = Vec::new();
        let mut until = Vec::new();
        for r in retired {
            until.push((r.publish_until, r.key.kid().to_owned()));
            if !r.recorded {
                created.keys.push((
                    r.key.kid().to_owned(),
                    format!(
                        "{} signing key retired (signing_algorithm is now {}), published until {}",
                        r.key.algorithm(),
                        config.signing_algorithm,
                        r.publish_until
                    ),
                ));
                created.files.push(r.path);
            }
            signing.push((0, Arc::new(r.key)));
        }
        signing.push((1, Arc::new(loaded.key)));
        let ring = Ring::new(signing, vec![Arc::new(checkpoint.key)]).map_err(|message| {
            KeyError::Invalid {
                path: config.data_dir.join("keys"),
                message,
            }
        })?;
        let keyring = Self::with_ring(None, ring, config.signing_algorithm);
        until.sort();
        if let Ok(mut retired) = keyring.retired.lock() {
            *retired = until;
        }
        Ok((keyring, created))
    }

    /// The shared key set of the store, creating the first keys on an empty
    /// store.
    ///
    /// # Errors
    /// [`KeyError`] when the key-encryption key is missing, exposed or does
    /// not open the stored keys; [`StoreError`] (inside
    /// [`KeyError::Invalid`]) when the store cannot be read or written.
    ///
    /// The audit records of the keys it creates or retires are committed
    /// with them (named after `replica`): the returned [`Created`] is for
    /// the log only. The key set is `store`'s head signer from before that
    /// commit on (see [`Store::sign_heads_with`]), so the commit's records
    /// are signed in it: a crash right after leaves nothing unsigned.
    pub async fn shared(
        config: &Config,
        store: &dyn Store,
        now: u64,
        replica: &str,
    ) -> Result<(Arc<Self>, Created), KeyError> {
        let stored = store.keys(now).await.map_err(|e| store_error(config, &e))?;
        let kek = keys::store_kek(config, store).await?;
        let shared = Shared {
            kek,
            algorithm: config.signing_algorithm,
            rotation: config.signing_key_rotation,
            lead: config.signing_key_lead,
            keep: config.longest_token_life(),
        };
        shared.open_all(config, &stored)?;
        let (mut writes, mut created) = shared.plan(&stored, now)?;
        // The keys as they are once the plan is committed: its newest
        // checkpoint key signs that commit's chain head.
        let mut planned = stored.clone();
        planned.extend(writes.iter().filter_map(|w| match w {
            Write::InsertKey { key, .. } => Some(StoredKey::clone(key)),
            _ => None,
        }));
        let unusable = |message| KeyError::Invalid {
            path: config.key_encryption_key_path(),
            message,
        };
        let ring = shared.ring(&planned).map_err(unusable)?;
        let keyring = Arc::new(Self::with_ring(
            Some(shared),
            ring,
            config.signing_algorithm,
        ));
        store.sign_heads_with(keyring.clone());
        let shared = keyring
            .shared
            .as_ref()
            .ok_or_else(|| unusable("the shared key set is missing".into()))?;
        if !writes.is_empty() {
            // In the keys' own commit: audited in a second one, a crash or
            // a failed start between the two would leave keys nobody
            // recorded, and no later start would see them created.
            writes.extend(crate::key_audit(replica, &created));
            match store.commit(writes).await {
                Ok(()) => {}
                // Another replica wrote these keys first (the store refuses
                // a key that does not follow the newest it holds): use its.
                Err(StoreError::Conflict(message)) => {
                    tracing::info!(%message, "another replica changed the shared keys first; using its");
                    created = Created::default();
                }
                Err(e) => return Err(store_error(config, &e)),
            }
        }
        let stored = store.keys(now).await.map_err(|e| store_error(config, &e))?;
        // Again: a replica that started at the same moment, with a
        // key-encryption key of its own, may have created them (and then
        // this one's commit changed nothing: the keys it signs with from
        // now on are that replica's).
        shared.open_all(config, &stored)?;
        keyring.install(shared.ring(&stored).map_err(unusable)?);
        Ok((keyring, created))
    }

    /// Puts `ring` in use. When its signing keys differ from those in use,
    /// the verification keys are replaced, and then a new generation is
    /// counted (see [`Keyring::generation`]); a re-read that found the same
    /// keys (every few seconds) changes neither.
    fn install(&self, ring: Ring) {
        let kids = |r: &Ring| {
            r.signing
                .iter()
                .map(|(_, k)| k.kid().to_owned())
                .collect::<Vec<_>>()
        };
        let changed = kids(&self.ring()) != kids(&ring);
        if changed {
            self.verify.replace(ring.verify_set());
        }
        match self.ring.write() {
            Ok(mut r) => *r = Arc::new(ring),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(ring),
        }
        if changed {
            self.generation
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// The count of changed key sets put in use, raised only once the new
    /// set verifies: a token verified (and kept) under one count is verified
    /// again under the next, so none outlives a key's withdrawal in memory.
    #[must_use]
    pub fn generation(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.generation.clone()
    }

    fn with_ring(shared: Option<Shared>, ring: Ring, alg: SigningAlgorithm) -> Self {
        let verify = SharedKeySet::new(ring.verify_set());
        // Every algorithm scrip signs with, the configured one first: a
        // shared key set can change algorithm while this replica runs (one
        // restarted with another `signing_algorithm` rotates), and its keys
        // must verify here too. Each key verifies with its own algorithm
        // only, so the wider list admits no other algorithm for a key.
        let mut algorithms = vec![alg.to_jwt()];
        for a in SigningAlgorithm::ALL.map(SigningAlgorithm::to_jwt) {
            if !algorithms.contains(&a) {
                algorithms.push(a);
            }
        }
        Self {
            shared,
            ring: RwLock::new(Arc::new(ring)),
            verify,
            algorithms,
            generation: Arc::default(),
            retired: std::sync::Mutex::default(),
            read_at: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }

    /// How long ago a shared key set was last read, when that is more than
    /// [`STALE_AFTER`]: the replica cannot tell whether a key it publishes
    /// was withdrawn since. `None` for a file key set, which only this
    /// process changes.
    #[must_use]
    pub fn stale_for(&self) -> Option<std::time::Duration> {
        self.stale_at(std::time::Instant::now())
    }

    /// [`Keyring::stale_for`], at `now`.
    #[must_use]
    pub fn stale_at(&self, now: std::time::Instant) -> Option<std::time::Duration> {
        self.shared.as_ref()?;
        let read_at = *self
            .read_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Some(now.saturating_duration_since(read_at)).filter(|d| *d > STALE_AFTER)
    }

    fn mark_read(&self, at: std::time::Instant) {
        *self
            .read_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = at;
    }

    /// When the next key of a former `signing_algorithm` leaves a file key
    /// set (seconds); `None` when none is left.
    #[must_use]
    pub fn next_retired_expiry(&self) -> Option<u64> {
        self.retired.lock().ok()?.first().map(|(at, _)| *at)
    }

    /// Drops from a file key set the keys of a former `signing_algorithm`
    /// whose time is up at `now`: no longer published, and tokens they
    /// signed no longer verify (verified ones are verified again, under a
    /// new generation).
    pub fn expire_retired(&self, now: u64) {
        let gone: Vec<String> = match self.retired.lock() {
            Ok(mut retired) => {
                let due = retired.partition_point(|(at, _)| *at <= now);
                retired.drain(..due).map(|(_, kid)| kid).collect()
            }
            Err(_) => return,
        };
        if gone.is_empty() {
            return;
        }
        let ring = self.ring();
        let signing: Vec<(u64, Arc<SigningKey>)> = ring
            .signing
            .iter()
            .filter(|(_, k)| !gone.iter().any(|g| g == k.kid()))
            .cloned()
            .collect();
        match Ring::new(signing, vec![ring.checkpoint.clone()]) {
            Ok(next) => {
                self.install(next);
                tracing::info!(kids = ?gone, "signing keys of a former algorithm are past the life of their tokens: no longer published");
            }
            Err(message) => {
                tracing::error!(%message, "cannot drop retired signing keys; keeping the keys in use");
            }
        }
    }

    /// The algorithms of the signing keys published now, the one that
    /// signs first.
    #[must_use]
    pub fn published_algorithms(&self) -> Vec<&'static str> {
        let ring = self.ring();
        let mut algs: Vec<&'static str> = Vec::new();
        for (_, k) in ring.signing.iter().rev() {
            let alg = k.algorithm().as_str();
            if !algs.contains(&alg) {
                algs.push(alg);
            }
        }
        algs
    }

    fn ring(&self) -> Arc<Ring> {
        match self.ring.read() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The key to sign with at `now`: the newest active one.
    #[must_use]
    pub fn signer(&self, now: u64) -> Arc<SigningKey> {
        let ring = self.ring();
        ring.signing
            .iter()
            .rev()
            .find(|(active_at, _)| *active_at <= now)
            .or_else(|| ring.signing.first())
            .map_or_else(|| ring.checkpoint.clone(), |(_, k)| k.clone())
    }

    /// The key that signs audit checkpoints.
    #[must_use]
    pub fn checkpoint_key(&self) -> Arc<SigningKey> {
        self.ring().checkpoint.clone()
    }

    /// Public keys that verify scrip's own tokens (follows rotation).
    #[must_use]
    pub fn verify_keys(&self) -> &SharedKeySet {
        &self.verify
    }

    /// The algorithms scrip's own tokens may be signed with.
    #[must_use]
    pub fn algorithms(&self) -> &[Algorithm] {
        &self.algorithms
    }

    /// The published JWKS document.
    #[must_use]
    pub fn jwks_body(&self) -> Arc<str> {
        self.ring().jwks_body.clone()
    }

    /// The published audit checkpoint keys (a JWKS document).
    #[must_use]
    pub fn audit_keys_body(&self) -> Arc<str> {
        self.ring().audit_keys_body.clone()
    }

    /// The public JWKs of every audit checkpoint key.
    #[must_use]
    pub fn checkpoint_jwks(&self) -> Vec<serde_json::Value> {
        self.ring().checkpoint_jwks.clone()
    }

    /// When the shared key set next needs a [`Keyring::sync`] of its own
    /// accord (a rotation due, a successor to switch to), in seconds.
    #[must_use]
    pub fn next_due(&self, now: u64) -> Option<u64> {
        let shared = self.shared.as_ref()?;
        let ring = self.ring();
        let newest = ring.signing.last().map_or(now, |(at, _)| *at);
        let rotation = (shared.rotation > 0).then(|| newest.saturating_add(shared.rotation));
        let switch = ring.signing.iter().map(|(at, _)| *at).find(|at| *at > now);
        rotation.into_iter().chain(switch).min()
    }

    /// Whether the keys live in a shared store.
    #[must_use]
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// Re-reads a shared key set, rotating and retiring keys when due, and
    /// audits what it created or retired in the same commit (named after
    /// `replica`); returns that, for the log. A file key set never changes.
    ///
    /// # Errors
    /// [`StoreError`] when the store cannot be read or written, or
    /// [`StoreError::Corrupt`] when what it holds cannot be put in use;
    /// the keys in use stay as they were. What it created is logged once
    /// committed, either way.
    pub async fn sync(
        &self,
        store: &dyn Store,
        now: u64,
        replica: &str,
    ) -> Result<Created, StoreError> {
        let Some(shared) = &self.shared else {
            return Ok(Created::default());
        };
        let stored = store.keys(now).await?;
        let (mut writes, mut created) = shared
            .plan(&stored, now)
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let stored = if writes.is_empty() {
            stored
        } else {
            writes.extend(crate::key_audit(replica, &created));
            match store.commit(writes).await {
                // Logged once committed, whatever comes of reading the
                // keys again.
                Ok(()) => {
                    for (kid, what) in &created.keys {
                        tracing::info!(%kid, %what, "shared key set changed");
                    }
                }
                // Another replica rotated or retired first: its keys are
                // read next.
                Err(StoreError::Conflict(message)) => {
                    tracing::info!(%message, "another replica changed the shared keys first; using its");
                    created = Created::default();
                }
                Err(e) => return Err(e),
            }
            store.keys(now).await?
        };
        match shared.ring(&stored) {
            Ok(ring) => {
                self.install(ring);
                self.mark_read(std::time::Instant::now());
            }
            // Read, but not put in use: as a read that failed, for the
            // keys loop's pacing, and the set served goes stale.
            Err(message) => {
                return Err(StoreError::Corrupt(format!(
                    "the shared keys are unusable: {message}"
                )));
            }
        }
        Ok(created)
    }
}

/// Why [`withdraw_signing_keys`] withdrew nothing.
#[derive(Debug, thiserror::Error)]
pub enum WithdrawError {
    /// The embedded store's signing key is a file.
    #[error(
        "the embedded store's signing key is a file: stop scrip, move `{0}` away (and any other `signing-*.json` beside it: a key of another algorithm is published while tokens it signed may live), and start it again (a new key signs)"
    )]
    Embedded(std::path::PathBuf),
    /// The keys could not be read or opened.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The store could not be read or written.
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// What [`withdraw_signing_keys`] did.
#[derive(Debug)]
pub struct Withdrawn {
    /// The key that signs from now on.
    pub signing: String,
    /// The keys withdrawn.
    pub withdrawn: Vec<String>,
}

/// Withdraws every signing key of a shared key set at once, for a key that
/// leaked: a new key (active from `clock_skew` before `now`, for replicas
/// whose clocks are behind) signs, and the others leave the published set
/// at once, whatever they signed and whatever a replica's clock says.
/// Tokens they signed are refused from then on (tasks must be started
/// again), by every replica once it reads the key set: at once where the
/// store's notification arrives, within [`POLL`] otherwise (until then it
/// may still sign with and accept an old key). `scrip-verifier` resource
/// servers fetch the key set again when they first see a token of the new
/// key, or at their next refresh, whichever comes first, and the old keys
/// go with that fetch. Audited in the
/// same commit (`key.created`, `key.withdrawn`, with `reason`), named after
/// `replica`; the caller has the store sign that commit's head.
///
/// # Errors
/// [`WithdrawError`].
pub async fn withdraw_signing_keys(
    config: &Config,
    store: &dyn Store,
    now: u64,
    replica: &str,
    reason: &str,
) -> Result<Withdrawn, WithdrawError> {
    if config.database_url.is_none() {
        return Err(WithdrawError::Embedded(keys::signing_key_file(
            &config.data_dir,
            config.signing_algorithm,
        )));
    }
    let stored = store.keys(now).await?;
    let shared = Shared {
        kek: keys::store_kek(config, store).await?,
        algorithm: config.signing_algorithm,
        rotation: 0,
        lead: 0,
        keep: 0,
    };
    shared.open_all(config, &stored)?;
    let signing: Vec<&StoredKey> = stored
        .iter()
        .filter(|k| k.purpose == KeyPurpose::Signing)
        .collect();
    // Every signing key goes, a rotation's key not active yet included: the
    // new one signs from now.
    let newest = signing.iter().max_by_key(|k| (k.active_at, &k.kid));
    // Active from `clock_skew` ago: a replica whose clock is behind this
    // one's by as much signs with it at once too (the withdrawn keys leave
    // every replica's set at once, whatever its clock).
    let key = shared.new_key(
        KeyPurpose::Signing,
        config.signing_algorithm,
        now,
        now.saturating_sub(config.clock_skew),
    )?;
    let record = |event: &str, kid: &str, what: String| {
        let mut a = crate::audit_record(replica, event);
        a.jti = Some(kid.to_owned());
        a.reason = Some(what);
        Write::Audit(Box::new(a))
    };
    let signing_kid = key.kid.clone();
    let created = record(
        "key.created",
        &key.kid,
        format!(
            "{} signing key created, signs at once, for a withdrawal: {reason}",
            key.alg
        ),
    );
    // Before the withdrawals: it follows the newest key still published.
    let mut writes = vec![
        Write::InsertKey {
            key: Box::new(key),
            after: newest.map(|k| k.kid.clone()),
        },
        created,
    ];
    let withdrawn: Vec<String> = signing.iter().map(|k| k.kid.clone()).collect();
    for kid in &withdrawn {
        writes.push(Write::WithdrawKey {
            kid: kid.clone(),
            at: now,
        });
        writes.push(record(
            "key.withdrawn",
            kid,
            format!("signing key withdrawn: no longer published, its tokens refused: {reason}"),
        ));
    }
    store.commit(writes).await?;
    Ok(Withdrawn {
        signing: signing_kid,
        withdrawn,
    })
}

/// Why [`reseal`] could not finish.
#[derive(Debug, thiserror::Error)]
pub enum ResealError {
    /// The key-encryption keys could not be loaded, or open nothing stored.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The store could not be read or written.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// Other writers kept changing what was being sealed again.
    #[error(
        "the store's sealed values kept changing while they were sealed again ({0} tries); run it again"
    )]
    Busy(usize),
    /// Values that open under neither key: nothing was sealed again.
    #[error(
        "{} stored values open under neither the key-encryption key ({key}) nor {}: {}; nothing was sealed again. Give the key they were sealed under as previous_key_encryption_key_file, or check that this host has the new key every replica has (compare fingerprints)",
        .unopened.len(),
        .previous.as_deref().map_or_else(|| "a previous one (none is given)".to_owned(), |p| format!("the previous one ({p})")),
        keys::some_of(.unopened)
    )]
    Unopened {
        /// The current key's fingerprint.
        key: String,
        /// The previous key's.
        previous: Option<String>,
        /// The values, named.
        unopened: Vec<String>,
    },
}

/// What [`reseal`] did.
#[derive(Debug, Default)]
pub struct Resealed {
    /// The keys sealed again under the current key-encryption key, by `kid`.
    pub keys: Vec<String>,
    /// The secret versions sealed again, as `name/action vN`.
    pub secrets: Vec<String>,
    /// The values the current key opens, at the last read (those sealed
    /// again included): all the store holds.
    pub current: usize,
    /// The current key's fingerprint.
    pub key: String,
    /// The previous key's, when one is given.
    pub previous: Option<String>,
    /// Replaced secret versions that open under neither key, left as they
    /// were (the proxy passes over them; the next rotation purges them).
    pub skipped: Vec<String>,
}

/// How many times [`reseal`] reads and writes again when another writer
/// changed a row in between.
const RESEAL_TRIES: usize = 5;

/// Seals every value the store holds sealed (shared signing and checkpoint
/// keys, the proxy's secret versions) again under the current
/// key-encryption key, where only the previous one opens it (see
/// [`keys::load_kek`]): after it, the previous key may go. One commit,
/// audited (`kek.resealed`, with `reason`), named after `replica`; a value
/// changed by another writer since it was read is not overwritten, and the
/// whole is read and sealed again (up to [`RESEAL_TRIES`] times) until the
/// read finds nothing left to seal. Nothing is written while any value
/// opens under neither key (this host may hold another new key than the
/// replicas). The caller has the store sign that commit's head.
///
/// # Errors
/// [`ResealError`].
pub async fn reseal(
    config: &Config,
    store: &dyn Store,
    replica: &str,
    reason: &str,
) -> Result<Resealed, ResealError> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let kek = keys::store_kek(config, store).await?;
    let sealing = |e: &dyn std::fmt::Display| {
        ResealError::Key(KeyError::Invalid {
            path: config.key_encryption_key_path(),
            message: e.to_string(),
        })
    };
    let mut done = Resealed {
        key: kek.fingerprint().to_owned(),
        previous: kek.previous_fingerprint().map(str::to_owned),
        ..Resealed::default()
    };
    for _ in 0..RESEAL_TRIES {
        let rows = (store.keys(0).await?, store.secrets().await?);
        let standing = keys::standing(&kek, &rows);
        if !standing.unopened.is_empty() {
            return Err(ResealError::Unopened {
                key: done.key,
                previous: done.previous,
                unopened: standing.unopened,
            });
        }
        done.current = standing.current + standing.previous;
        done.skipped = standing.replaced_unopened;
        let mut writes = Vec::new();
        let mut keys_now = Vec::new();
        let mut secrets_now = Vec::new();
        for k in &rows.0 {
            let sealed = b64.decode(&k.sealed).map_err(|e| sealing(&e))?;
            if let Some(to) = kek
                .reseal(key_context(k).as_bytes(), &sealed)
                .map_err(|e| sealing(&e))?
            {
                writes.push(Write::ResealKey {
                    kid: k.kid.clone(),
                    from: k.sealed.clone(),
                    to: b64.encode(to),
                });
                keys_now.push(k.kid.clone());
            }
        }
        for r in &rows.1 {
            if scrip_proxy::secrets::sealed_under(&kek, r).is_none() {
                continue; // a replaced version, in `skipped`
            }
            if let Some(to) = scrip_proxy::secrets::reseal(&kek, r).map_err(|e| sealing(&e))? {
                writes.push(Write::ResealSecret {
                    name: r.name.clone(),
                    action: r.action.clone(),
                    version: r.version,
                    from: r.sealed.clone(),
                    to,
                });
                secrets_now.push(format!("{}/{} v{}", r.name, r.action, r.version));
            }
        }
        if writes.is_empty() {
            return Ok(done);
        }
        let mut record = crate::audit_record(replica, "kek.resealed");
        record.reason = Some(format!(
            "{} keys and {} secret versions sealed again under the key-encryption key {} (from {}): {reason}",
            keys_now.len(),
            secrets_now.len(),
            done.key,
            done.previous.as_deref().unwrap_or("none")
        ));
        writes.push(Write::Audit(Box::new(record)));
        match store.commit(writes).await {
            Ok(()) => {
                done.keys.extend(keys_now);
                done.secrets.extend(secrets_now);
            }
            // Another writer changed a row since the read: read again.
            Err(StoreError::Conflict(message)) => {
                tracing::info!(%message, "a sealed value changed while it was sealed again; reading again");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(ResealError::Busy(RESEAL_TRIES))
}

/// The store signs this process's chain head with the current checkpoint
/// key in every commit (see [`Store::sign_heads_with`]).
impl scrip_store::HeadSigner for Keyring {
    fn sign(&self, message: &[u8]) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
        Ok(self.checkpoint_key().sign_detached(message)?)
    }
}

/// Signs a store's chain heads with one checkpoint key, for the processes
/// other than `scrip serve` that write audit records (`scrip proxy`, the
/// `scrip secret` commands): see [`checkpoint_signer`].
#[derive(Debug)]
pub struct HeadKey(pub Arc<SigningKey>);

impl scrip_store::HeadSigner for HeadKey {
    fn sign(&self, message: &[u8]) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
        Ok(self.0.sign_detached(message)?)
    }
}

/// A shared store's audit checkpoint keys, oldest first, each opened with
/// the key-encryption key, so a key planted by someone who can write the
/// store is not trusted.
async fn stored_checkpoint_keys(
    config: &Config,
    store: &dyn Store,
    now: u64,
) -> Result<Vec<SigningKey>, KeyError> {
    let stored = store.keys(now).await.map_err(|e| store_error(config, &e))?;
    let shared = Shared {
        kek: keys::load_kek(config, false)?,
        algorithm: config.signing_algorithm,
        rotation: 0,
        lead: 0,
        keep: 0,
    };
    stored
        .iter()
        .filter(|k| k.purpose == KeyPurpose::Checkpoint)
        .map(|k| {
            shared.open(k).map_err(|message| KeyError::Invalid {
                path: config.key_encryption_key_path(),
                message: format!("stored checkpoint key `{}`: {message}", k.kid),
            })
        })
        .collect()
}

/// The public JWKs of a shared store's audit checkpoint keys, for
/// verifying its trail (see [`stored_checkpoint_keys`]).
///
/// # Errors
/// [`KeyError`] when the key-encryption key is missing or does not open a
/// stored checkpoint key, or the store cannot be read.
pub async fn shared_checkpoint_jwks(
    config: &Config,
    store: &dyn Store,
    now: u64,
) -> Result<Vec<serde_json::Value>, KeyError> {
    Ok(stored_checkpoint_keys(config, store, now)
        .await?
        .iter()
        .map(SigningKey::public_jwk)
        .collect())
}

/// The key this process signs audit checkpoints with, for the processes
/// that write to the store beside `scrip serve` (`scrip proxy`, the
/// `scrip secret` commands): on the embedded store the key file in
/// `data_dir` (created if `scrip serve` never ran), on a shared store the
/// newest stored checkpoint key, opened with the key-encryption key.
///
/// # Errors
/// [`KeyError`] when the key cannot be read, opened, or (shared) there is
/// none yet.
///
/// A key it creates is audited at once, named after `replica`.
pub async fn checkpoint_signer(
    config: &Config,
    store: &dyn Store,
    now: u64,
    replica: &str,
) -> Result<Arc<SigningKey>, KeyError> {
    if config.database_url.is_none() {
        checkpoint_key_kept(config, store).await?;
        let loaded = keys::load_or_create_checkpoint_key(&config.data_dir, now)?;
        let mut created = Created::default();
        created.add(&loaded, "audit checkpoint key");
        let key = Arc::new(loaded.key);
        if !created.keys.is_empty() {
            // Its record signed in its own commit, as the caller's later
            // commits will be.
            store.sign_heads_with(Arc::new(HeadKey(key.clone())));
            store
                .commit(crate::key_audit(replica, &created))
                .await
                .map_err(|e| store_error(config, &e))?;
            created.recorded();
        }
        return Ok(key);
    }
    stored_checkpoint_keys(config, store, now)
        .await?
        .pop()
        .map(Arc::new)
        .ok_or(KeyError::NoCheckpointKey)
}

/// Refuses to make the embedded store's checkpoint key anew beside a store
/// that holds audit records: its file is gone (the store restored or moved
/// without `data_dir/keys`), and a new key would have every chain it signed
/// reported as tampered with, for ever, by `scrip audit verify`. Refuses,
/// as much, a key file that signed none of the store's chain heads (a store
/// put back beside another store's key).
///
/// # Errors
/// [`KeyError::Invalid`] when the key file is missing and the store holds
/// records, when it signed none of the heads it holds, or the store cannot
/// say.
pub async fn checkpoint_key_kept(config: &Config, store: &dyn Store) -> Result<(), KeyError> {
    // The records first: one counted was signed under a key whose file
    // existed before it, so a file missing after the count is missing
    // indeed (another first start making both between a look at the file
    // and the count is not taken for that).
    let records = store
        .latest_audit_seq()
        .await
        .map_err(|e| store_error(config, &e))?;
    let path = keys::checkpoint_key_file(&config.data_dir);
    let exists = path.try_exists().map_err(|source| KeyError::Io {
        path: path.clone(),
        source,
    })?;
    let put_back = "put back `keys/audit-checkpoint.json` from the backup `scrip.db` came from (the two go together); if the key is lost for good, move `scrip.db` and its `-wal` and `-shm` files aside, and `keys/signing-*.json` too (the new store would not know what the old one revoked; docs/backups.md, step 4), and start on a new store (`scrip audit verify --public-key` with the old key's public JWK still checks the old one)";
    if !exists && records > 0 {
        return Err(KeyError::Invalid {
            path,
            message: format!(
                "missing, yet the store beside it holds {records} audit records signed with it: {put_back}"
            ),
        });
    }
    if exists && records > 0 {
        let jwk = keys::read_checkpoint_key(&config.data_dir)?.public_jwk();
        let heads = store
            .latest_checkpoints()
            .await
            .map_err(|e| store_error(config, &e))?;
        let signed = heads.iter().any(|c| {
            let message = Checkpoint::message(&c.chain_id, c.chain_seq, &c.hash, c.at_ms);
            scrip_jose::verify_detached(&jwk, &message, &c.signature)
        });
        if !heads.is_empty() && !signed {
            return Err(KeyError::Invalid {
                path,
                message: format!(
                    "signed none of the chain heads of the store beside it ({} signatures): it is another store's key, or the store's signatures were changed (`scrip audit verify --public-key` with the public JWK you kept tells which), and records signed with it would have `scrip audit verify` report every earlier chain as tampered with: {put_back}",
                    heads.len()
                ),
            });
        }
    }
    Ok(())
}

fn store_error(config: &Config, e: &StoreError) -> KeyError {
    KeyError::Invalid {
        path: config
            .database_url
            .as_deref()
            .map_or_else(|| config.data_dir.clone(), |_| "database_url".into()),
        message: format!("cannot read or write the shared keys: {e}"),
    }
}

/// Why a stored key does not open.
#[derive(Debug)]
enum Unopened {
    /// The key-encryption key does not open its seal.
    Seal(String),
    /// Anything else: an unknown algorithm, a malformed row, or a sealed key
    /// that is not the key its row names.
    Row(String),
}

impl std::fmt::Display for Unopened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Seal(why) | Self::Row(why) => f.write_str(why),
        }
    }
}

impl Shared {
    /// Refuses a key set with a key that does not open: it was sealed under
    /// another key-encryption key, and signing with a key set the other
    /// replicas do not share would split them.
    fn open_all(&self, config: &Config, stored: &[StoredKey]) -> Result<(), KeyError> {
        for k in stored {
            self.open(k).map_err(|e| KeyError::Invalid {
                path: config.key_encryption_key_path(),
                message: match e {
                    Unopened::Seal(why) => format!(
                        "stored key `{}` does not open ({why}): the store's keys were sealed under another key-encryption key (a replica that started at the same time may have made its own); give every replica the same key: this file, or {}",
                        k.kid,
                        keys::KEK_ENV
                    ),
                    Unopened::Row(why) => format!("stored key `{}`: {why}", k.kid),
                },
            })?;
        }
        Ok(())
    }

    /// Opens a stored key, checking that it is the key its row says.
    fn open(&self, k: &StoredKey) -> Result<SigningKey, Unopened> {
        let alg = parse_alg(&k.alg)
            .ok_or_else(|| Unopened::Row(format!("unknown algorithm `{}`", k.alg)))?;
        use base64::Engine as _;
        let sealed = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&k.sealed)
            .map_err(|_| Unopened::Row("the sealed key is not base64url".to_owned()))?;
        let der = self
            .kek
            .open(key_context(k).as_bytes(), &sealed)
            .map_err(|e| Unopened::Seal(e.to_string()))?;
        let key = SigningKey::from_pkcs8(alg, &der).map_err(|e| Unopened::Row(e.to_string()))?;
        if key.kid() != k.kid {
            return Err(Unopened::Row(
                "the sealed key is not the key its row names".into(),
            ));
        }
        Ok(key)
    }

    fn new_key(
        &self,
        purpose: KeyPurpose,
        alg: SigningAlgorithm,
        now: u64,
        active_at: u64,
    ) -> Result<StoredKey, KeyError> {
        let invalid = |message: String| KeyError::Invalid {
            path: "key-encryption key".into(),
            message,
        };
        let (key, pkcs8) = SigningKey::generate(alg).map_err(|e| invalid(e.to_string()))?;
        let mut stored = StoredKey {
            kid: key.kid().to_owned(),
            purpose,
            alg: alg.as_str().to_owned(),
            public_jwk: key.public_jwk().to_string(),
            sealed: String::new(),
            created_at: now,
            active_at,
            retired_at: None,
            publish_until: None,
        };
        stored.sealed = scrip_jose::b64(
            &self
                .kek
                .seal(key_context(&stored).as_bytes(), &pkcs8)
                .map_err(|e| invalid(e.to_string()))?,
        );
        Ok(stored)
    }

    /// What to write so the key set is complete and current at `now`.
    fn plan(&self, stored: &[StoredKey], now: u64) -> Result<(Vec<Write>, Created), KeyError> {
        let mut writes = Vec::new();
        let mut created = Created::default();
        let signing: Vec<&StoredKey> = stored
            .iter()
            .filter(|k| k.purpose == KeyPurpose::Signing)
            .collect();
        if !stored.iter().any(|k| k.purpose == KeyPurpose::Checkpoint) {
            let k = self.new_key(KeyPurpose::Checkpoint, SigningAlgorithm::EdDSA, now, now)?;
            created
                .keys
                .push((k.kid.clone(), "audit checkpoint key created".into()));
            writes.push(Write::InsertKey {
                key: Box::new(k),
                after: None,
            });
        }
        let newest = signing.iter().max_by_key(|k| (k.active_at, &k.kid));
        match newest {
            None => {
                // Nothing can have been signed yet: active at once.
                let k = self.new_key(KeyPurpose::Signing, self.algorithm, now, now)?;
                created
                    .keys
                    .push((k.kid.clone(), format!("{} signing key created", k.alg)));
                writes.push(Write::InsertKey {
                    key: Box::new(k),
                    after: None,
                });
            }
            Some(n)
                if self.rotation > 0
                    && n.active_at <= now
                    && now >= n.active_at.saturating_add(self.rotation) =>
            {
                // `now` is whole seconds: one more makes the lead at least
                // `lead` seconds of real time.
                let active_at = now.saturating_add(self.lead).saturating_add(1);
                let k = self.new_key(KeyPurpose::Signing, self.algorithm, now, active_at)?;
                created.keys.push((
                    k.kid.clone(),
                    format!("{} signing key created, signs from {}", k.alg, k.active_at),
                ));
                writes.push(Write::InsertKey {
                    key: Box::new(k),
                    after: Some(n.kid.clone()),
                });
            }
            Some(_) => {}
        }
        // Retire every key that an active successor replaced.
        let current = signing
            .iter()
            .filter(|k| k.active_at <= now)
            .max_by_key(|k| (k.active_at, &k.kid));
        if let Some(current) = current {
            for k in &signing {
                if k.kid != current.kid
                    && k.retired_at.is_none()
                    && k.active_at <= current.active_at
                {
                    let publish_until = current.active_at.saturating_add(self.keep);
                    created.keys.push((
                        k.kid.clone(),
                        format!("signing key retired, published until {publish_until}"),
                    ));
                    writes.push(Write::RetireKey {
                        kid: k.kid.clone(),
                        at: current.active_at,
                        publish_until,
                    });
                }
            }
        }
        Ok((writes, created))
    }

    /// The ring of the stored keys; keys that do not open are left out.
    fn ring(&self, stored: &[StoredKey]) -> Result<Ring, String> {
        let mut signing = Vec::new();
        let mut checkpoints = Vec::new();
        for k in stored {
            match self.open(k) {
                Ok(key) => match k.purpose {
                    KeyPurpose::Signing => signing.push((k.active_at, &k.kid, Arc::new(key))),
                    KeyPurpose::Checkpoint => {
                        checkpoints.push((k.created_at, &k.kid, Arc::new(key)))
                    }
                },
                Err(message) => {
                    tracing::error!(kid = %k.kid, %message, "a stored key does not open; not using it");
                }
            }
        }
        signing.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        checkpoints.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        Ring::new(
            signing.into_iter().map(|(at, _, k)| (at, k)).collect(),
            checkpoints.into_iter().map(|(_, _, k)| k).collect(),
        )
    }
}

impl Ring {
    /// `checkpoints` oldest first; the newest signs.
    fn new(
        signing: Vec<(u64, Arc<SigningKey>)>,
        checkpoints: Vec<Arc<SigningKey>>,
    ) -> Result<Self, String> {
        if signing.is_empty() {
            return Err("no usable signing key".into());
        }
        let checkpoint = checkpoints
            .last()
            .cloned()
            .ok_or_else(|| "no usable audit checkpoint key".to_owned())?;
        let published: Vec<serde_json::Value> =
            signing.iter().map(|(_, k)| k.public_jwk()).collect();
        // A set verifiers cannot load (more than 64 keys, when replicas
        // disagree on lifetimes or rotation) would verify nothing: refused
        // here, so that a replica keeps the ring it has, and says why.
        KeySet::from_public_jwks(&published).map_err(|e| {
            format!("the published key set cannot be used to verify ({e}); every replica needs the same token lifetimes and signing_key_rotation")
        })?;
        let checkpoint_jwks: Vec<serde_json::Value> =
            checkpoints.iter().map(|k| k.public_jwk()).collect();
        Ok(Self {
            jwks_body: jwks(&published),
            audit_keys_body: jwks(&checkpoint_jwks),
            checkpoint_jwks,
            signing,
            checkpoint,
        })
    }

    /// The keys that verify: [`Ring::new`] checked that they load.
    fn verify_set(&self) -> KeySet {
        let published: Vec<serde_json::Value> =
            self.signing.iter().map(|(_, k)| k.public_jwk()).collect();
        KeySet::from_public_jwks(&published).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;

    /// A running server drops a former algorithm's key at its time, without
    /// a restart: no longer published, its algorithm no longer named, and
    /// what was verified with it verified again.
    #[test]
    fn a_former_algorithms_key_leaves_a_running_file_key_set_at_its_time() {
        let dir = tempfile::tempdir().unwrap();
        let config = |alg| Config {
            data_dir: dir.path().to_path_buf(),
            signing_algorithm: alg,
            ..Config::default()
        };
        let (es, _) = Keyring::from_files(&config(SigningAlgorithm::ES256), 10).unwrap();
        assert_eq!(es.next_retired_expiry(), None);
        let old_kid = es.signer(10).kid().to_owned();
        let config = config(SigningAlgorithm::EdDSA);
        let (ring, created) = Keyring::from_files(&config, 50).unwrap();
        assert!(
            created
                .keys
                .iter()
                .any(|(kid, what)| *kid == old_kid && what.contains("retired"))
        );
        let until = 50 + config.longest_token_life();
        assert_eq!(ring.next_retired_expiry(), Some(until));
        assert_eq!(ring.signer(60).algorithm(), SigningAlgorithm::EdDSA);
        assert_eq!(ring.published_algorithms(), ["EdDSA", "ES256"]);
        let generation = ring.generation();
        let before = generation.load(std::sync::atomic::Ordering::SeqCst);
        ring.expire_retired(until - 1);
        assert!(ring.jwks_body().contains(&old_kid));
        ring.expire_retired(until);
        assert!(!ring.jwks_body().contains(&old_kid), "{}", ring.jwks_body());
        assert!(!ring.verify_keys().snapshot().contains_kid(&old_kid));
        assert_eq!(ring.published_algorithms(), ["EdDSA"]);
        assert_eq!(ring.next_retired_expiry(), None);
        assert!(generation.load(std::sync::atomic::Ordering::SeqCst) > before);
        assert_eq!(ring.signer(until).algorithm(), SigningAlgorithm::EdDSA);
    }

    fn shared() -> Shared {
        Shared {
            kek: Kek::generate().unwrap().0,
            algorithm: SigningAlgorithm::ES256,
            rotation: 0,
            lead: 0,
            keep: 0,
        }
    }

    /// Only a seal that does not open is blamed on another key-encryption
    /// key; a row that is wrong in itself says what is wrong with it.
    #[test]
    fn a_stored_key_that_does_not_open_says_why() {
        let ours = shared();
        let config = Config::default();
        let key = ours
            .new_key(KeyPurpose::Signing, SigningAlgorithm::ES256, 1, 1)
            .unwrap();
        ours.open_all(&config, std::slice::from_ref(&key)).unwrap();
        let theirs = shared().open_all(&config, std::slice::from_ref(&key));
        let message = theirs.unwrap_err().to_string();
        assert!(
            message.contains("sealed under another key-encryption key"),
            "{message}"
        );
        for (row, says) in [
            (
                StoredKey {
                    alg: "XS999".into(),
                    ..key.clone()
                },
                "unknown algorithm `XS999`",
            ),
            (
                StoredKey {
                    sealed: "%%".into(),
                    ..key.clone()
                },
                "not base64url",
            ),
        ] {
            let message = ours.open_all(&config, &[row]).unwrap_err().to_string();
            assert!(message.contains(says), "{message}");
            assert!(!message.contains("another key-encryption key"), "{message}");
        }
    }

    /// A ring of more keys than a verifier loads is refused, not made into
    /// one that verifies nothing.
    #[test]
    fn a_ring_too_large_to_verify_with_is_refused() {
        let key = || Arc::new(SigningKey::generate(SigningAlgorithm::EdDSA).unwrap().0);
        let many: Vec<(u64, Arc<SigningKey>)> = (0..=scrip_jose::MAX_JWKS_KEYS as u64)
            .map(|i| (i, key()))
            .collect();
        let e = Ring::new(many.clone(), vec![key()]).err().unwrap();
        assert!(e.contains("cannot be used to verify"), "{e}");
        let fits = many[..scrip_jose::MAX_JWKS_KEYS].to_vec();
        let ring = Ring::new(fits, vec![key()]).unwrap();
        assert_eq!(ring.verify_set().len(), scrip_jose::MAX_JWKS_KEYS);
    }
}
