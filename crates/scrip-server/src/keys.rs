//! scrip's signing keys on disk.
//!
//! Keys live in `<data_dir>/keys/` (mode 0700) as `signing-<alg>.json`
//! (mode 0600), written atomically (temporary file, fsync, rename, fsync of
//! the directory). A key file that group or others can read is refused:
//! scrip will not sign with a key that may already have leaked.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};

use scrip_jose::{SigningAlgorithm, SigningKey, b64};
use serde::{Deserialize, Serialize};

/// Why keys could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A file-system error.
    #[error("`{path}`: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A key file others can read.
    #[error(
        "key file `{path}` has mode {mode:o}: group or others can read it; fix it with `chmod 600 {path}` (and rotate the key if it may have leaked)"
    )]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A key file owned by another user (not root): its owner can read it
    /// or choose what it holds.
    #[error(
        "key file `{path}` is owned by uid {owner}, not by the user scrip runs as (uid {euid}) or root: its owner can read it or choose the key; `chown` it to scrip's user"
    )]
    ForeignOwner {
        /// The file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The user scrip runs as.
        euid: u32,
    },
    /// A data or key directory another user (not root) owns: its owner
    /// could swap the store or the keys in it.
    #[error(
        "directory `{path}` is owned by uid {owner}, not by the user scrip runs as (uid {euid}) or root: its owner could replace the store or the keys in it; run scrip as that user, or `chown` the directory to the user scrip runs as"
    )]
    ForeignDir {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The user scrip runs as.
        euid: u32,
    },
    /// A key directory others can write: they could swap its files.
    #[error(
        "directory `{path}` has mode {mode:o}: group or others can write it; fix it with `chmod 700 {path}`"
    )]
    ExposedDir {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A directory on the way to a key file, or to the store, that someone
    /// other than scrip's user could change.
    #[error(transparent)]
    Untrusted(#[from] scrip_config::trust::Untrusted),
    /// A shared store that holds no audit checkpoint key yet (no `scrip
    /// serve` has started on it).
    #[error(
        "`database_url`: the store holds no audit checkpoint key yet; start `scrip serve` on it first"
    )]
    NoCheckpointKey,
    /// No key-encryption key was given (neither its file nor the
    /// environment holds one), and none is to be made.
    #[error(
        "key file `{}` is invalid: missing: this store's secrets are sealed under a key-encryption key; give scrip the same key (this file, or {KEK_ENV})",
        path.display()
    )]
    MissingKek {
        /// The file it was looked for in.
        path: PathBuf,
    },
    /// The file does not hold a usable key.
    #[error("key file `{path}` is invalid: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

#[derive(Serialize, Deserialize)]
struct KeyFile {
    alg: SigningAlgorithm,
    kid: String,
    created_at: u64,
    pkcs8: String,
    /// `false` from the key's creation until its `key.created` audit
    /// record is committed ([`mark_recorded`]): a start that finds it
    /// `false` records the key (the start that made it stopped first).
    /// Absent in files that scrip wrote before it kept this, whose keys
    /// were recorded as they were made.
    #[serde(default = "recorded_before", skip_serializing_if = "is_recorded")]
    recorded: bool,
    /// When a changed `signing_algorithm` stopped this signing key (seconds);
    /// it stays published until every token it signed has expired
    /// ([`retired_signing_keys`]). Cleared when it signs again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retired_at: Option<u64>,
    /// `false` from `retired_at` being set until its `key.retired` audit
    /// record is committed ([`mark_recorded`]).
    #[serde(default = "recorded_before", skip_serializing_if = "is_recorded")]
    retirement_recorded: bool,
    /// When it last began signing, if not at `created_at`: the moment a
    /// changed-back `signing_algorithm` made it sign again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signing_since: Option<u64>,
}

/// What a key file says besides its key.
#[derive(Debug, Clone, Copy)]
struct FileState {
    recorded: bool,
    retired_at: Option<u64>,
    retirement_recorded: bool,
    /// When it last began signing.
    since: u64,
}

fn recorded_before() -> bool {
    true
}

#[expect(clippy::trivially_copy_pass_by_ref, reason = "serde's signature")]
fn is_recorded(recorded: &bool) -> bool {
    *recorded
}

/// The private key it holds is zeroed when it is dropped.
impl Drop for KeyFile {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.pkcs8);
    }
}

impl std::fmt::Debug for KeyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyFile")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Creates `dir` (and parents) with mode 0700 if missing; refuses an
/// existing directory that others can write.
///
/// # Errors
/// [`KeyError::Io`] on failure.
pub fn ensure_private_dir(dir: &Path) -> Result<(), KeyError> {
    // The directories made here, innermost first: each new entry is made
    // durable in its parent, or a crash soon after could lose a directory
    // with the keys in it (a key-encryption key lost for good).
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && fs::symlink_metadata(d).is_err())
        .collect();
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    for made in missing.iter().rev() {
        let parent = made
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| Path::new("."));
        fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io(parent))?;
    }
    check_private_dir(dir)
}

/// Refuses a directory of key files or of the store that group or others
/// can write, or that another user than scrip's or root owns: they could
/// remove a file, or put another (or a link to one) in its place; nor may
/// they rename a directory on the way to it and put another there
/// ([`scrip_config::trust::check_way`]).
fn check_private_dir(dir: &Path) -> Result<(), KeyError> {
    let meta = fs::metadata(dir).map_err(io(dir))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(KeyError::ExposedDir {
            path: dir.to_owned(),
            mode,
        });
    }
    let euid = rustix::process::geteuid().as_raw();
    if meta.uid() != euid && meta.uid() != 0 {
        return Err(KeyError::ForeignDir {
            path: dir.to_owned(),
            owner: meta.uid(),
            euid,
        });
    }
    use scrip_config::trust::{GroupWrite, Stake, check_way};
    Ok(check_way(dir, Stake::Key, GroupWrite::Warn)?)
}

/// The outcome of [`load_or_create`].
#[derive(Debug)]
pub struct Loaded {
    /// The active signing key.
    pub key: SigningKey,
    /// Whether it was created just now.
    pub created: bool,
    /// Whether its `key.created` audit record was committed: `false` for a
    /// key created just now, and for one whose creator stopped before
    /// recording it. Once the caller has committed the record, it calls
    /// [`mark_recorded`].
    pub recorded: bool,
    /// When it began signing (this time): its creation, or the start that
    /// made it sign again.
    pub since: u64,
    /// Its file.
    pub path: PathBuf,
}

/// Loads the signing key for `alg` from `<data_dir>/keys`, creating it on
/// first start.
///
/// # Errors
/// [`KeyError`] when a key file is unreadable, exposed or invalid, or a new
/// one cannot be written.
pub fn load_or_create(
    data_dir: &Path,
    alg: SigningAlgorithm,
    now: u64,
) -> Result<Loaded, KeyError> {
    load_or_create_named(data_dir, &signing_key_name(alg), alg, now)
}

/// The embedded store's signing key file for `alg`:
/// `<data_dir>/keys/signing-<alg>.json` (`signing-es256.json`).
#[must_use]
pub fn signing_key_file(data_dir: &Path, alg: SigningAlgorithm) -> std::path::PathBuf {
    data_dir
        .join("keys")
        .join(format!("{}.json", signing_key_name(alg)))
}

fn signing_key_name(alg: SigningAlgorithm) -> String {
    format!("signing-{}", alg.as_str().to_ascii_lowercase())
}

/// The audit checkpoint key (Ed25519), `<data_dir>/keys/audit-checkpoint.json`.
///
/// # Errors
/// As [`load_or_create`].
pub fn load_or_create_checkpoint_key(data_dir: &Path, now: u64) -> Result<Loaded, KeyError> {
    load_or_create_named(data_dir, "audit-checkpoint", SigningAlgorithm::EdDSA, now)
}

/// Reads the audit checkpoint key without creating it.
///
/// # Errors
/// As [`load_or_create`]; a missing file is [`KeyError::Io`].
pub fn read_checkpoint_key(data_dir: &Path) -> Result<SigningKey, KeyError> {
    read_key(&checkpoint_key_file(data_dir), SigningAlgorithm::EdDSA).map(|(key, _)| key)
}

/// The embedded store's audit checkpoint key file,
/// `<data_dir>/keys/audit-checkpoint.json`.
#[must_use]
pub fn checkpoint_key_file(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("keys/audit-checkpoint.json")
}

fn load_or_create_named(
    data_dir: &Path,
    name: &str,
    alg: SigningAlgorithm,
    now: u64,
) -> Result<Loaded, KeyError> {
    let dir = data_dir.join("keys");
    ensure_private_dir(&dir)?;
    let path = dir.join(format!("{name}.json"));
    remove_stale_temporaries(&path);
    if path.exists() {
        let (key, state) = read_key(&path, alg)?;
        let mut since = state.since;
        if state.retired_at.is_some() {
            // Signing again (`signing_algorithm` changed back): no longer
            // retired, so that a later change stamps it afresh, and signing
            // since now (the key that signed meanwhile is retired now).
            update_key_file(&path, |f| {
                f.retired_at = None;
                f.retirement_recorded = true;
                f.signing_since = Some(now);
            })?;
            since = now;
        }
        return Ok(Loaded {
            key,
            created: false,
            recorded: state.recorded,
            since,
            path,
        });
    }
    let (key, pkcs8) = SigningKey::generate(alg).map_err(|e| KeyError::Invalid {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let file = KeyFile {
        alg,
        kid: key.kid().to_owned(),
        created_at: now,
        pkcs8: b64(&pkcs8),
        recorded: false,
        retired_at: None,
        retirement_recorded: true,
        signing_since: None,
    };
    let json = serde_json::to_vec_pretty(&file)
        .map(zeroize::Zeroizing::new)
        .map_err(|e| KeyError::Invalid {
            path: path.clone(),
            message: e.to_string(),
        })?;
    if !create_private(&path, &json)? {
        // Another process created it first: use that one.
        let (key, state) = read_key(&path, alg)?;
        return Ok(Loaded {
            key,
            created: false,
            recorded: state.recorded,
            since: state.since,
            path,
        });
    }
    Ok(Loaded {
        key,
        created: true,
        recorded: false,
        since: now,
        path,
    })
}

/// Notes in the key file at `path` that its `key.created` audit record is
/// committed, so that later starts do not record it again. Until then the
/// file says it is not, and each start that loads it records it: a key
/// that signs is never off the record, at worst on it twice.
///
/// A file another user owns (a command run as root on scrip's files) is
/// left as it is: replaced, it would be that user's, and scrip's own user
/// could no longer read it. The next start as its owner marks it.
///
/// # Errors
/// [`KeyError`] when the file cannot be read or replaced.
pub fn mark_recorded(path: &Path) -> Result<(), KeyError> {
    update_key_file(path, |f| {
        f.recorded = true;
        f.retirement_recorded = true;
    })
    .map(|_| ())
}

/// Rewrites the key file at `path` as `change` leaves it (atomically, with
/// its mode); `false` when it was left alone: unchanged, or another user's
/// (a command run as root on scrip's files), which replaced would be that
/// user's and unreadable to scrip's own.
fn update_key_file(path: &Path, change: impl FnOnce(&mut KeyFile)) -> Result<bool, KeyError> {
    let owner = fs::metadata(path).map_err(io(path))?.uid();
    if owner != rustix::process::geteuid().as_raw() {
        return Ok(false);
    }
    let bytes = zeroize::Zeroizing::new(read_private(path)?);
    let mut file: KeyFile = serde_json::from_slice(&bytes).map_err(|_| KeyError::Invalid {
        path: path.to_owned(),
        message: "not a scrip key file".into(),
    })?;
    let state = |f: &KeyFile| {
        (
            f.recorded,
            f.retired_at,
            f.retirement_recorded,
            f.signing_since,
        )
    };
    let before = state(&file);
    change(&mut file);
    if state(&file) == before {
        return Ok(false);
    }
    let json = serde_json::to_vec_pretty(&file)
        .map(zeroize::Zeroizing::new)
        .map_err(|e| KeyError::Invalid {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    replace_private(path, &json)?;
    Ok(true)
}

/// A signing key file of another algorithm than the configured one (the
/// embedded store's `signing_algorithm` was changed): it signs no more, and
/// is published, to verify what it signed, until `publish_until`.
#[derive(Debug)]
pub struct Retired {
    /// The key.
    pub key: SigningKey,
    /// Its file.
    pub path: PathBuf,
    /// When it leaves the published set (seconds).
    pub publish_until: u64,
    /// Whether its `key.retired` audit record was committed; once the
    /// caller has committed it, it calls [`mark_recorded`].
    pub recorded: bool,
}

/// The embedded store's signing key files for algorithms other than `alg`
/// that are still to be published at `now`: each is stamped retired the
/// first time a start finds it so, at `since` (when the key of `alg` began
/// signing: the other stopped then at the latest), and kept `keep` seconds
/// from then (the longest a token it signed can live). Older ones are left
/// on disk, not published, and named in the log so they can be removed; so
/// is one that cannot be stamped (another user's), which would otherwise
/// be published afresh by every start.
///
/// # Errors
/// [`KeyError`] when such a file cannot be read or stamped, or is exposed:
/// a key that verifies scrip's tokens is held as one that signs them.
pub fn retired_signing_keys(
    data_dir: &Path,
    alg: SigningAlgorithm,
    now: u64,
    keep: u64,
    since: u64,
) -> Result<Vec<Retired>, KeyError> {
    let mut retired = Vec::new();
    for other in SigningAlgorithm::ALL {
        if other == alg {
            continue;
        }
        let path = signing_key_file(data_dir, other);
        remove_stale_temporaries(&path);
        if !path.try_exists().map_err(io(&path))? {
            continue;
        }
        let (key, state) = read_key(&path, other)?;
        let (retired_at, recorded) = match state.retired_at {
            // A stamp ahead of this clock (a clock that was ahead) counts
            // from now, never later.
            Some(at) => (at.min(now), state.retirement_recorded),
            None => {
                let at = since.min(now);
                let stamped = update_key_file(&path, |f| {
                    f.retired_at = Some(at);
                    f.retirement_recorded = false;
                })?;
                if !stamped {
                    tracing::warn!(path = %path.display(), kid = key.kid(), "a signing key of another algorithm, in a file another user owns, cannot be noted as retired: not published (tokens it signed are refused); chown the file to scrip's user, or remove it");
                    continue;
                }
                (at, false)
            }
        };
        let publish_until = retired_at.saturating_add(keep);
        if now >= publish_until {
            tracing::info!(path = %path.display(), kid = key.kid(), "a signing key of another algorithm is past the life of the tokens it signed: no longer published; the file may be removed");
            continue;
        }
        retired.push(Retired {
            key,
            path,
            publish_until,
            recorded,
        });
    }
    Ok(retired)
}

/// Reads a private file, refusing one that group or others can read.
///
/// # Errors
/// [`KeyError::Exposed`] for such a file, [`KeyError::Io`] when it cannot
/// be read.
pub fn read_private(path: &Path) -> Result<Vec<u8>, KeyError> {
    use std::io::Read as _;
    // The checks are of the file opened, which is the file read: a file
    // swapped for another between a check by name and the read would pass.
    let mut file = fs::File::open(path).map_err(io(path))?;
    let meta = file.metadata().map_err(io(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Exposed {
            path: path.to_owned(),
            mode,
        });
    }
    let euid = rustix::process::geteuid().as_raw();
    if meta.uid() != euid && meta.uid() != 0 {
        return Err(KeyError::ForeignOwner {
            path: path.to_owned(),
            owner: meta.uid(),
            euid,
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.read_to_end(&mut bytes).map_err(io(path))?;
    Ok(bytes)
}

/// The key in the file at `path`, and what the file says of it.
fn read_key(path: &Path, alg: SigningAlgorithm) -> Result<(SigningKey, FileState), KeyError> {
    let bytes = zeroize::Zeroizing::new(read_private(path)?);
    let invalid = |message: String| KeyError::Invalid {
        path: path.to_owned(),
        message,
    };
    let file: KeyFile =
        serde_json::from_slice(&bytes).map_err(|_| invalid("not a scrip key file".into()))?;
    if file.alg != alg {
        return Err(invalid(format!(
            "holds an {} key, expected {alg}",
            file.alg
        )));
    }
    use base64::Engine as _;
    let der = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(&file.pkcs8)
        .map(zeroize::Zeroizing::new)
        .map_err(|_| invalid("key is not base64url".into()))?;
    let key = SigningKey::from_pkcs8(alg, &der).map_err(|e| invalid(e.to_string()))?;
    if key.kid() != file.kid {
        return Err(invalid("key id does not match the key".into()));
    }
    Ok((
        key,
        FileState {
            recorded: file.recorded,
            retired_at: file.retired_at,
            retirement_recorded: file.retirement_recorded,
            since: file.signing_since.unwrap_or(file.created_at),
        },
    ))
}

/// Removes what a process stopped while [`create_private`] wrote `path`
/// left behind: its `<stem>.<22 random characters>.tmp` files (a whole
/// private key each) more than a minute old, a younger one being perhaps
/// another process's at work. Failures are ignored: this only tidies.
pub fn remove_stale_temporaries(path: &Path) {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
        return;
    };
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let prefix = format!("{stem}.");
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(random) = name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|n| n.strip_suffix(".tmp"))
        else {
            continue;
        };
        let ours = random.len() == 22
            && random
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
        let stale = entry.metadata().is_ok_and(|m| {
            m.is_file()
                && m.modified()
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > std::time::Duration::from_secs(60))
        });
        if ours && stale && fs::remove_file(entry.path()).is_ok() {
            tracing::warn!(path = %entry.path().display(), "removed a key file a stopped process left half made");
        }
    }
}

/// Creates `path` holding `data`, mode 0600, atomically and durably, unless
/// it exists: `Ok(false)` then, and the file is left as it is. Two processes
/// creating the same key at once therefore agree on one (the first to link
/// its file), and neither replaces a key the other already uses.
///
/// # Errors
/// [`KeyError::Io`] on failure.
pub fn create_private(path: &Path, data: &[u8]) -> Result<bool, KeyError> {
    let tmp = write_temporary(path, data)?;
    // A hard link fails on an existing name where a rename would replace it.
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(io(path)(e)),
    }
    sync_parent(path)?;
    Ok(true)
}

/// Replaces `path` with a file holding `data`, mode 0600, atomically and
/// durably: a crash leaves the old file or the new one.
fn replace_private(path: &Path, data: &[u8]) -> Result<(), KeyError> {
    let tmp = write_temporary(path, data)?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(io(path)(e));
    }
    sync_parent(path)
}

/// A new `<stem>.<random>.tmp` beside `path` holding `data`, mode 0600,
/// on disk (see [`remove_stale_temporaries`] for what a crash leaves).
fn write_temporary(path: &Path, data: &[u8]) -> Result<PathBuf, KeyError> {
    let suffix = scrip_jose::random_id().map_err(|e| KeyError::Invalid {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let tmp = path.with_extension(format!("{suffix}.tmp"));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    let written = f.write_all(data).and_then(|()| f.sync_all());
    drop(f);
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io(&tmp)(e));
    }
    Ok(tmp)
}

/// Makes the directory entries of `path`'s directory durable.
fn sync_parent(path: &Path) -> Result<(), KeyError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// The environment variable that may hold the key-encryption key (the
/// base64 of 32 random bytes); it wins over the file.
pub const KEK_ENV: &str = "SCRIP_KEY_ENCRYPTION_KEY";

/// The environment variable that may hold the key-encryption key being
/// replaced; it wins over `previous_key_encryption_key_file`.
pub const PREVIOUS_KEK_ENV: &str = "SCRIP_PREVIOUS_KEY_ENCRYPTION_KEY";

/// scrip's one key-encryption key, which seals what scrip keeps secret in
/// its store (the proxy's upstream keys; on a shared store, the signing
/// keys): from [`KEK_ENV`] when set, else the file
/// [`Config::key_encryption_key_path`] (mode 0600; one that group or others
/// can read is refused), created when missing if `create`. While it
/// replaces another, the key it replaces opens too (`scrip key reseal`):
/// from [`PREVIOUS_KEK_ENV`] when set, else
/// `previous_key_encryption_key_file`, which must then exist.
///
/// # Errors
/// [`KeyError`] when the variable or file does not hold such a key, the
/// file is exposed, missing (and not to be created), or cannot be written;
/// when the previous key is the current one.
pub fn load_kek(config: &scrip_config::Config, create: bool) -> Result<scrip_jose::Kek, KeyError> {
    let kek = load_current_kek(config, create)?;
    let Some((previous, from)) = load_previous_kek(config)? else {
        return Ok(kek);
    };
    if same_key(&kek, &previous) {
        return Err(KeyError::Invalid {
            path: from,
            message: "is the key-encryption key itself: give the key it replaces, or none once `scrip key reseal` is done".into(),
        });
    }
    Ok(kek.with_previous(previous))
}

/// The key being replaced, and where it came from; `None` when none is
/// given.
fn load_previous_kek(
    config: &scrip_config::Config,
) -> Result<Option<(scrip_jose::Kek, PathBuf)>, KeyError> {
    let path = config.previous_key_encryption_key_file.clone();
    if let Some(kek) = kek_from_env(PREVIOUS_KEK_ENV, path.as_deref())? {
        return Ok(Some((kek, PREVIOUS_KEK_ENV.into())));
    }
    let Some(path) = path else {
        return Ok(None);
    };
    match read_private_kek(&path)? {
        Some(kek) => Ok(Some((kek, path))),
        None => Err(KeyError::Invalid {
            path,
            message: "missing: previous_key_encryption_key_file names the key being replaced, which must be there until `scrip key reseal` is done".into(),
        }),
    }
}

/// The key in the variable `var`, `None` when it is not set; refused when
/// it is set but is not such a key, or is not the key in `file` when that
/// file exists.
fn kek_from_env(var: &str, file: Option<&Path>) -> Result<Option<scrip_jose::Kek>, KeyError> {
    let invalid = |message: String| KeyError::Invalid {
        path: var.into(),
        message,
    };
    match std::env::var(var) {
        Ok(text) => {
            let text = zeroize::Zeroizing::new(text);
            let kek = scrip_jose::Kek::from_text(&text).map_err(|e| invalid(e.to_string()))?;
            // A variable left from another installation beside this one's
            // file would seal what the servers reading the file cannot
            // open. (A file this user cannot read says nothing either way.)
            if let Some(path) = file
                && let Ok(Some(file)) = read_kek_file(path)
                && !same_key(&kek, &file)
            {
                return Err(invalid(format!(
                    "is not the key in `{}`: scrip would seal under one what those reading the other cannot open; keep one (unset the variable, or remove the file)",
                    path.display()
                )));
            }
            Ok(Some(kek))
        }
        // Set, but not text: never taken for "not set", which would fall
        // back to (or create) the file.
        Err(std::env::VarError::NotUnicode(_)) => Err(invalid(
            "is not text (a key-encryption key is base64)".into(),
        )),
        Err(std::env::VarError::NotPresent) => Ok(None),
    }
}

/// The key in the file at `path`, `None` when there is none; nobody else
/// may write the directory that holds it (unless it is sticky, as `/tmp`
/// or a Kubernetes Secret volume's root, where only a file's owner may
/// replace it) or any directory on the way to it.
fn read_private_kek(path: &Path) -> Result<Option<scrip_jose::Kek>, KeyError> {
    // A file that cannot be looked at (a directory this user may not
    // search) is not a missing one.
    let Some(kek) = read_kek_file(path)? else {
        return Ok(None);
    };
    use scrip_config::trust::{GroupWrite, Stake, check_way};
    check_way(path, Stake::Key, GroupWrite::Refuse)?;
    Ok(Some(kek))
}

/// The current key-encryption key alone.
fn load_current_kek(
    config: &scrip_config::Config,
    create: bool,
) -> Result<scrip_jose::Kek, KeyError> {
    let path = config.key_encryption_key_path();
    let invalid = |path: PathBuf, message: String| KeyError::Invalid { path, message };
    if let Some(kek) = kek_from_env(KEK_ENV, Some(&path))? {
        return Ok(kek);
    }
    // A second name for the key a crash left while creating it.
    remove_stale_temporaries(&path);
    if let Some(kek) = read_private_kek(&path)? {
        return Ok(kek);
    }
    if !create {
        return Err(KeyError::MissingKek { path });
    }
    if let Some(dir) = path.parent() {
        ensure_private_dir(dir)?;
    }
    let (kek, text) =
        scrip_jose::Kek::generate().map_err(|e| invalid(path.clone(), e.to_string()))?;
    if !create_private(&path, zeroize::Zeroizing::new(text).as_bytes())? {
        // Another process created it first: use that one.
        return load_current_kek(config, false);
    }
    tracing::warn!(path = %path.display(), "created the key-encryption key; keep it out of the store's backups, and give every replica the same key");
    Ok(kek)
}

/// The key in the file at `path`, `None` when there is none.
fn read_kek_file(path: &Path) -> Result<Option<scrip_jose::Kek>, KeyError> {
    let invalid = |message: String| KeyError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    // A file that cannot be looked at (a directory this user may not
    // search) is not a missing one.
    let exists = path
        .try_exists()
        .map_err(|e| invalid(format!("cannot be looked at: {e}")))?;
    if !exists {
        return Ok(None);
    }
    let bytes = zeroize::Zeroizing::new(read_private(path)?);
    let text = std::str::from_utf8(&bytes).map_err(|_| invalid("not base64 text".into()))?;
    scrip_jose::Kek::from_text(text)
        .map(Some)
        .map_err(|e| invalid(e.to_string()))
}

/// Whether `a` and `b` are one key: what one seals, the other opens.
fn same_key(a: &scrip_jose::Kek, b: &scrip_jose::Kek) -> bool {
    a.seal(b"scrip-kek-compare", b"")
        .is_ok_and(|sealed| b.open(b"scrip-kek-compare", &sealed).is_ok())
}

/// [`load_kek`] for a store: the key is created only while `store` holds
/// nothing sealed (no shared signing key, no proxy secret), so a missing key
/// file never has scrip seal new secrets under a key that opens none of the
/// old ones (and that no other replica has); and a key that opens nothing
/// the store holds is refused ([`verify_kek`]).
///
/// # Errors
/// As [`load_kek`] and [`verify_kek`].
pub async fn store_kek(
    config: &scrip_config::Config,
    store: &dyn scrip_store::Store,
) -> Result<scrip_jose::Kek, KeyError> {
    let sealed = sealed_rows(config, store).await?;
    if sealed.0.is_empty() && sealed.1.is_empty() {
        return load_kek(config, true);
    }
    let kek = load_kek(config, false)?;
    let standing = check_kek(config, &kek, &sealed)?;
    if let Some(previous) = kek.previous_fingerprint() {
        if standing.previous > 0 {
            tracing::warn!(
                values = standing.previous,
                key = kek.fingerprint(),
                previous,
                "values in the store are still sealed under the previous key-encryption key; run `scrip key reseal` once every replica has the new key (each logs its fingerprint)"
            );
        } else {
            tracing::info!(
                key = kek.fingerprint(),
                previous,
                "the previous key-encryption key opens nothing the store holds any more; remove it from every replica"
            );
        }
    }
    Ok(kek)
}

/// Refuses `kek` when the store holds something sealed and it opens none of
/// it: it is another key (a variable left from another installation), what
/// it sealed no one else could open, and a proxy secret sealed under it
/// would fail every request of its upstream. One row that opens is enough:
/// a row a mistake sealed under another key must not stop the right key
/// from sealing its successor. While a previous key is given, every row
/// must open under one of the two (see `check_kek`).
///
/// # Errors
/// [`KeyError::Invalid`] when `kek` opens nothing stored (or, with a
/// previous key, not everything), or the store cannot be read.
pub async fn verify_kek(
    config: &scrip_config::Config,
    kek: &scrip_jose::Kek,
    store: &dyn scrip_store::Store,
) -> Result<(), KeyError> {
    check_kek(config, kek, &sealed_rows(config, store).await?).map(|_| ())
}

/// Every sealed row the store keeps: keys (retired ones included) and
/// secret versions.
async fn sealed_rows(
    config: &scrip_config::Config,
    store: &dyn scrip_store::Store,
) -> Result<(Vec<scrip_store::StoredKey>, Vec<scrip_store::SecretRecord>), KeyError> {
    let unreadable = |e: scrip_store::StoreError| KeyError::Invalid {
        path: config.key_encryption_key_path(),
        message: format!("cannot tell whether the store holds secrets sealed under it: {e}"),
    };
    Ok((
        store.keys(0).await.map_err(unreadable)?,
        store.secrets().await.map_err(unreadable)?,
    ))
}

/// Where the sealed values of a store stand against a key-encryption key.
#[derive(Debug, Default)]
pub(crate) struct Standing {
    /// Values the current key opens.
    pub current: usize,
    /// Values only the previous key opens.
    pub previous: usize,
    /// Values in use (keys, current secret versions) neither opens, named
    /// (`key <kid>`, `secret <name>/<action> v<version>`).
    pub unopened: Vec<String>,
    /// Replaced secret versions neither opens, named: the proxy passes over
    /// them already (a rotation mends a bad version), so they stop nothing.
    pub replaced_unopened: Vec<String>,
}

/// Where each of `rows` stands against `kek`.
pub(crate) fn standing(
    kek: &scrip_jose::Kek,
    (keys, secrets): &(Vec<scrip_store::StoredKey>, Vec<scrip_store::SecretRecord>),
) -> Standing {
    use base64::Engine as _;
    let mut standing = Standing::default();
    let mut count =
        |under: Option<scrip_jose::Under>, replaced: bool, name: &dyn Fn() -> String| match under {
            Some(scrip_jose::Under::Current) => standing.current += 1,
            Some(scrip_jose::Under::Previous) => standing.previous += 1,
            None if replaced => standing.replaced_unopened.push(name()),
            None => standing.unopened.push(name()),
        };
    for k in keys {
        let under = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&k.sealed)
            .ok()
            .and_then(|sealed| {
                kek.sealed_under(crate::keyring::key_context(k).as_bytes(), &sealed)
            });
        count(under, false, &|| format!("key {}", k.kid));
    }
    for r in secrets {
        count(
            scrip_proxy::secrets::sealed_under(kek, r),
            r.retired_at.is_some(),
            &|| format!("secret {}/{} v{}", r.name, r.action, r.version),
        );
    }
    standing
}

/// `names` for a message: the first ten, and how many more.
pub(crate) fn some_of(names: &[String]) -> String {
    let mut text = names
        .iter()
        .take(10)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > 10 {
        text.push_str(&format!(" and {} more", names.len() - 10));
    }
    text
}

/// Refuses `kek` when the store holds something sealed and it opens none
/// of it; and, while a previous key is given (a replacement under way),
/// when any value in use (a key, a current secret version) opens under
/// neither key: the new key is then not the one the other replicas were
/// given, and what it sealed they could not open. A replaced secret version
/// that opens under neither stops nothing (the proxy passes over it).
fn check_kek(
    config: &scrip_config::Config,
    kek: &scrip_jose::Kek,
    rows: &(Vec<scrip_store::StoredKey>, Vec<scrip_store::SecretRecord>),
) -> Result<Standing, KeyError> {
    let (keys, secrets) = rows;
    let standing = standing(kek, rows);
    if keys.is_empty() && secrets.is_empty() {
        return Ok(standing);
    }
    if let Some(previous) = kek.previous_fingerprint()
        && !standing.unopened.is_empty()
    {
        return Err(KeyError::Invalid {
            path: config.key_encryption_key_path(),
            message: format!(
                "with the previous key-encryption key ({previous}), {} stored values open under neither it nor this one ({}): {}. This key is likely not the new key the other replicas were given: compare fingerprints (each replica logs its own) and give every replica the same one",
                standing.unopened.len(),
                kek.fingerprint(),
                some_of(&standing.unopened)
            ),
        });
    }
    if standing.current + standing.previous > 0 {
        return Ok(standing);
    }
    Err(KeyError::Invalid {
        path: config.key_encryption_key_path(),
        message: format!(
            "opens nothing this store holds sealed ({} keys, {} secret versions): it is not the key-encryption key they were sealed under (a replica that started at the same time may have made its own); give scrip that key, which every replica shares (this file, or {KEK_ENV}); while it replaces another, give that one as previous_key_encryption_key_file",
            keys.len(),
            secrets.len()
        ),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;

    /// A key that opens nothing the store holds sealed is refused; one
    /// that opens one row is taken, though another row does not open.
    #[tokio::test]
    async fn a_key_that_opens_nothing_stored_is_refused() {
        use scrip_store::{SecretRecord, Store as _, Write};
        let dir = tempfile::tempdir().unwrap();
        let store = scrip_store::SqliteStore::open_in(dir.path()).await.unwrap();
        let config = scrip_config::Config {
            data_dir: dir.path().to_path_buf(),
            ..scrip_config::Config::default()
        };
        let text = |k: u8| b64(&[k; 32]);
        let key = |k: u8| scrip_jose::Kek::from_text(&text(k)).unwrap();
        // Nothing sealed yet: any key.
        verify_kek(&config, &key(1), &store).await.unwrap();
        let put = |k: u8, version: u32| {
            let value = scrip_proxy::SecretValue::from_input(b"rk-value".to_vec()).unwrap();
            let sealed = scrip_proxy::Kek::new(key(k))
                .seal("legacy", "read", version, &value)
                .unwrap();
            Write::PutSecret {
                secret: Box::new(SecretRecord {
                    name: "legacy".into(),
                    action: "read".into(),
                    version,
                    sealed,
                    created_at: 100 + u64::from(version),
                    retired_at: None,
                }),
                purge_retired_before: 0,
            }
        };
        store.commit(vec![put(1, 1)]).await.unwrap();
        verify_kek(&config, &key(1), &store).await.unwrap();
        let err = verify_kek(&config, &key(2), &store).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("opens nothing this store holds sealed"),
            "{err}"
        );
        // A version a mistake sealed under another key does not lock out
        // the right one.
        store.commit(vec![put(2, 2)]).await.unwrap();
        verify_kek(&config, &key(1), &store).await.unwrap();
        // While a key replaces another, every value must open under one of
        // the two: a key that is not the replicas' new key is refused.
        verify_kek(&config, &key(2).with_previous(key(1)), &store)
            .await
            .unwrap();
        // A replaced version (v1 now) that opens under neither stops
        // nothing: the proxy passes over it.
        verify_kek(&config, &key(2).with_previous(key(3)), &store)
            .await
            .unwrap();
        let err = verify_kek(&config, &key(3).with_previous(key(1)), &store)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("1 stored values open under neither")
                && err.contains("secret legacy/read v2"),
            "{err}"
        );
        // Nor does `scrip key reseal` write anything then, though its key
        // alone opens a value.
        ensure_private_dir(&dir.path().join("keys")).unwrap();
        assert!(create_private(&config.key_encryption_key_path(), text(1).as_bytes()).unwrap());
        let before = store.secrets().await.unwrap();
        let err = crate::keyring::reseal(&config, &store, "test", "x")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("open under neither") && err.contains("nothing was sealed again"),
            "{err}"
        );
        assert_eq!(store.secrets().await.unwrap(), before);
    }

    /// The previous key-encryption key is read as the current one is (a
    /// private file), must be there once named, and must be another key;
    /// with it, both keys open and the current one seals.
    #[test]
    fn the_previous_key_encryption_key_is_another_private_key() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        ensure_private_dir(&keys).unwrap();
        let write = |name: &str, text: &str| {
            let path = keys.join(name);
            assert!(create_private(&path, text.as_bytes()).unwrap());
            path
        };
        let (old, old_text) = scrip_jose::Kek::generate().unwrap();
        let (_, new_text) = scrip_jose::Kek::generate().unwrap();
        let config = |previous: &str| scrip_config::Config {
            data_dir: dir.path().to_path_buf(),
            key_encryption_key_file: Some(keys.join("new.key")),
            previous_key_encryption_key_file: Some(keys.join(previous)),
            ..scrip_config::Config::default()
        };
        write("new.key", &new_text);
        let e = load_kek(&config("old.key"), false).unwrap_err().to_string();
        assert!(
            e.contains("missing: previous_key_encryption_key_file"),
            "{e}"
        );
        let old_file = write("old.key", &old_text);
        write("same.key", &new_text);
        let e = load_kek(&config("same.key"), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is the key-encryption key itself"), "{e}");
        let both = load_kek(&config("old.key"), false).unwrap();
        assert!(both.has_previous());
        let under_old = old.seal(b"row", b"value").unwrap();
        assert_eq!(both.open(b"row", &under_old).unwrap().as_slice(), b"value");
        let new_alone = scrip_jose::Kek::from_text(&new_text).unwrap();
        let under_new = both.seal(b"row", b"value").unwrap();
        assert!(new_alone.open(b"row", &under_new).is_ok());
        assert!(old.open(b"row", &under_new).is_err());
        fs::set_permissions(&old_file, fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_kek(&config("old.key"), false).unwrap_err().to_string();
        assert!(e.contains("group or others can read it"), "{e}");
        // None named: the current key alone.
        let alone = scrip_config::Config {
            previous_key_encryption_key_file: None,
            ..config("old.key")
        };
        assert!(!load_kek(&alone, false).unwrap().has_previous());
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let new = root.path().join("a/keys");
        ensure_private_dir(&new).unwrap();
        assert_eq!(
            fs::metadata(&new).unwrap().permissions().mode() & 0o777,
            0o700
        );
        for mode in [0o777, 0o770, 0o702] {
            fs::set_permissions(&new, fs::Permissions::from_mode(mode)).unwrap();
            assert!(
                matches!(ensure_private_dir(&new), Err(KeyError::ExposedDir { mode: m, .. }) if m == mode),
                "{mode:o}"
            );
        }
        // Readable by others is the operator's choice for a directory; the
        // key files themselves are checked for that.
        fs::set_permissions(&new, fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&new).unwrap();
    }

    /// An existing key-encryption key in a directory others can write is
    /// refused too, not only when scrip makes the directory.
    #[test]
    fn a_kek_in_a_directory_others_can_write_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let config = scrip_config::Config {
            key_encryption_key_file: Some(root.path().join("shared/kek")),
            ..scrip_config::Config::default()
        };
        load_kek(&config, true).unwrap();
        load_kek(&config, false).unwrap();
        let dir = root.path().join("shared");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o775)).unwrap();
        assert!(
            matches!(
                load_kek(&config, false),
                Err(KeyError::Untrusted(
                    scrip_config::trust::Untrusted::Writable { mode: 0o775, .. }
                ))
            ),
            "a KEK in a group-writable directory was read"
        );
        // Sticky (as `/tmp`, or a Kubernetes Secret volume's root): nobody
        // else can remove or replace the file there.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777)).unwrap();
        load_kek(&config, false).unwrap();
        // Nor in one anyone can write further up the way: they could
        // rename `shared` away and put their own key in its place.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        fs::set_permissions(root.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let e = load_kek(&config, false).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("`{}` has mode 777", root.path().display())),
            "{e}"
        );
        // The same for the store's own directories.
        let data = root.path().join("data");
        fs::create_dir(&data).unwrap();
        assert!(matches!(
            ensure_private_dir(&data.join("keys")),
            Err(KeyError::Untrusted(_))
        ));
        fs::set_permissions(root.path(), fs::Permissions::from_mode(0o700)).unwrap();
        load_kek(&config, false).unwrap();
        ensure_private_dir(&data.join("keys")).unwrap();
    }

    /// A key file is read only if scrip's user (or root) owns it and nobody
    /// else can read it, as the file opened, not as a name checked before.
    #[test]
    fn a_key_file_of_another_user_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("k");
        fs::write(&path, "key").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_private(&path).unwrap(), b"key");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            read_private(&path),
            Err(KeyError::Exposed { mode: 0o640, .. })
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        // Giving a file away takes root, which is how these tests and CI
        // run; as another user only the owner's own file can be made.
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(&path, Some(12_345), None).unwrap();
            assert!(matches!(
                read_private(&path),
                Err(KeyError::ForeignOwner {
                    owner: 12_345,
                    euid: 0,
                    ..
                })
            ));
            // Root's own files stay readable.
            std::os::unix::fs::chown(&path, Some(0), None).unwrap();
            assert_eq!(read_private(&path).unwrap(), b"key");
        }
    }

    /// A data or key directory another user (not root) owns is refused:
    /// its owner could swap the store or the keys in it.
    #[test]
    fn a_directory_of_another_user_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("data");
        ensure_private_dir(&dir).unwrap();
        // Giving a directory away takes root, which is how these tests and
        // CI run.
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(&dir, Some(12_345), None).unwrap();
            let err = ensure_private_dir(&dir).unwrap_err();
            assert!(
                matches!(
                    err,
                    KeyError::ForeignDir {
                        owner: 12_345,
                        euid: 0,
                        ..
                    }
                ),
                "{err:?}"
            );
            std::os::unix::fs::chown(&dir, Some(0), None).unwrap();
            ensure_private_dir(&dir).unwrap();
            // The key directory likewise.
            load_or_create(&dir, SigningAlgorithm::EdDSA, 1).unwrap();
            std::os::unix::fs::chown(dir.join("keys"), Some(12_345), None).unwrap();
            assert!(
                matches!(
                    load_or_create(&dir, SigningAlgorithm::EdDSA, 1),
                    Err(KeyError::ForeignDir { owner: 12_345, .. })
                ),
                "a key was read from another user's directory"
            );
        }
    }

    /// Processes creating the key-encryption key at once end up with one
    /// key between them: none seals under a key another has replaced.
    #[test]
    fn concurrent_creators_agree_on_one_key_encryption_key() {
        let root = tempfile::tempdir().unwrap();
        let config = scrip_config::Config {
            data_dir: root.path().join("data"),
            ..scrip_config::Config::default()
        };
        ensure_private_dir(&root.path().join("data/keys")).unwrap();
        for _ in 0..20 {
            let _ = fs::remove_file(config.key_encryption_key_path());
            let barrier = std::sync::Barrier::new(8);
            let keks: Vec<scrip_jose::Kek> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..8)
                    .map(|_| {
                        s.spawn(|| {
                            barrier.wait();
                            load_kek(&config, true).unwrap()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let on_disk = load_kek(&config, false).unwrap();
            let sealed = on_disk.seal(b"ctx", b"secret").unwrap();
            for kek in &keks {
                assert_eq!(kek.open(b"ctx", &sealed).unwrap().as_slice(), b"secret");
            }
        }
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(root.path().join("data/keys"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["key-encryption.key"]);
    }
}

#[cfg(test)]
mod stale_temporaries {
    use super::*;

    /// Only this key's own half-made files, and only old ones, go.
    #[test]
    fn only_old_half_made_files_of_this_key_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(600);
        let random = "A".repeat(22);
        let make = |name: &str, aged: bool| {
            let path = dir.path().join(name);
            let f = fs::File::create(&path).unwrap();
            if aged {
                f.set_modified(old).unwrap();
            }
            path
        };
        let stale = make(&format!("signing-es256.{random}.tmp"), true);
        let young = make(&format!("signing-es256.{}.tmp", "B".repeat(22)), false);
        let not_ours = make("signing-es256.backup.tmp", true);
        let other_key = make(&format!("signing-eddsa.{random}.tmp"), true);
        let key = make("signing-es256.json", true);
        remove_stale_temporaries(&dir.path().join("signing-es256.json"));
        assert!(!stale.exists());
        for kept in [young, not_ours, other_key, key] {
            assert!(kept.exists(), "{}", kept.display());
        }
    }

    /// A new key says it is not on the record until marked, and stays so
    /// for every later load; a file written before scrip kept the mark
    /// reads as recorded. Marking keeps the key and the file's mode.
    /// A signing key file of another algorithm (`signing_algorithm`
    /// changed) is stamped retired by the first start that finds it so,
    /// published for the longest token life from then, recorded once, and
    /// signs again, no longer retired, when the algorithm is changed back.
    #[test]
    fn a_key_of_a_former_algorithm_is_published_while_its_tokens_live() {
        let dir = tempfile::tempdir().unwrap();
        let es = load_or_create(dir.path(), SigningAlgorithm::ES256, 10).unwrap();
        mark_recorded(&es.path).unwrap();
        assert_eq!(es.since, 10);
        let retired =
            |alg, now, since| retired_signing_keys(dir.path(), alg, now, 100, since).unwrap();
        assert!(retired(SigningAlgorithm::ES256, 20, 10).is_empty());
        // Now EdDSA: the ES256 key is retired at 50, kept until 150.
        let ed = load_or_create(dir.path(), SigningAlgorithm::EdDSA, 50).unwrap();
        assert_eq!(ed.since, 50);
        let first = retired(SigningAlgorithm::EdDSA, 50, ed.since);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].key.kid(), es.key.kid());
        assert_eq!((first[0].publish_until, first[0].recorded), (150, false));
        // A later start keeps the first stamp; once recorded, it says so.
        let later = retired(SigningAlgorithm::EdDSA, 90, ed.since);
        assert_eq!((later[0].publish_until, later[0].recorded), (150, false));
        mark_recorded(&later[0].path).unwrap();
        let marked = retired(SigningAlgorithm::EdDSA, 91, ed.since);
        assert!(marked[0].recorded);
        assert!(retired(SigningAlgorithm::EdDSA, 150, ed.since).is_empty());
        assert!(es.path.exists(), "a key file is never removed");
        let meta = fs::metadata(&es.path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // Back to ES256: it signs, no longer retired, since 200; EdDSA is
        // retired at 200.
        let again = load_or_create(dir.path(), SigningAlgorithm::ES256, 200).unwrap();
        assert_eq!((again.key.kid(), again.since), (es.key.kid(), 200));
        assert!(again.recorded);
        let (_, state) = read_key(&es.path, SigningAlgorithm::ES256).unwrap();
        assert!(state.retired_at.is_none() && state.retirement_recorded);
        let back = retired(SigningAlgorithm::ES256, 200, again.since);
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].key.kid(), ed.key.kid());
        assert_eq!(back[0].publish_until, 300);
        // A stamp ahead of the clock counts from now.
        update_key_file(&ed.path, |f| f.retired_at = Some(10_000)).unwrap();
        assert_eq!(
            retired(SigningAlgorithm::ES256, 250, again.since)[0].publish_until,
            350
        );
        // A file left unstamped (by a release that did not stamp) stopped
        // signing when the configured key began: long ago, so not published.
        update_key_file(&ed.path, |f| f.retired_at = None).unwrap();
        assert!(retired(SigningAlgorithm::ES256, 500, 200).is_empty());
        assert!(
            retired(SigningAlgorithm::ES256, 501, 200).is_empty(),
            "stamped at 200"
        );
        // An exposed one is refused, as every key file is.
        fs::set_permissions(&ed.path, fs::Permissions::from_mode(0o644)).unwrap();
        let e =
            retired_signing_keys(dir.path(), SigningAlgorithm::ES256, 201, 100, 200).unwrap_err();
        assert!(matches!(e, KeyError::Exposed { .. }), "{e}");
    }

    #[test]
    fn a_key_is_unrecorded_until_marked() {
        let dir = tempfile::tempdir().unwrap();
        let made = load_or_create(dir.path(), SigningAlgorithm::ES256, 7).unwrap();
        assert!(made.created && !made.recorded);
        let again = load_or_create(dir.path(), SigningAlgorithm::ES256, 8).unwrap();
        assert!(!again.created && !again.recorded);
        assert_eq!(again.key.kid(), made.key.kid());
        mark_recorded(&made.path).unwrap();
        let marked = load_or_create(dir.path(), SigningAlgorithm::ES256, 9).unwrap();
        assert!(!marked.created && marked.recorded);
        assert_eq!(marked.key.kid(), made.key.kid());
        let meta = fs::metadata(&made.path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // The form of older files, without the field.
        let old: serde_json::Value =
            serde_json::from_slice(&fs::read(&made.path).unwrap()).unwrap();
        assert_eq!(old.get("recorded"), None, "{old}");
        assert_eq!(old["created_at"], 7);
        let unmarked = dir.path().join("keys/other.json");
        let mut file: KeyFile = serde_json::from_value(old).unwrap();
        file.recorded = false;
        assert!(create_private(&unmarked, &serde_json::to_vec(&file).unwrap()).unwrap());
        assert!(
            !read_key(&unmarked, SigningAlgorithm::ES256)
                .unwrap()
                .1
                .recorded
        );
    }
}
