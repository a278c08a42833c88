//! scrip's signing keys on disk.
//!
//! Keys live in `<data_dir>/keys/` (mode 0700) as `signing-<alg>.json`
//! (mode 0600), written atomically (temporary file, fsync, rename, fsync of
//! the directory). A key file that group or others can read is refused:
//! scrip will not sign with a key that may already have leaked.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
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
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))
}

/// The outcome of [`load_or_create`].
#[derive(Debug)]
pub struct Loaded {
    /// The active signing key.
    pub key: SigningKey,
    /// Whether it was created just now.
    pub created: bool,
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
    let name = format!("signing-{}", alg.as_str().to_ascii_lowercase());
    load_or_create_named(data_dir, &name, alg, now)
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
    read_key(
        &data_dir.join("keys/audit-checkpoint.json"),
        SigningAlgorithm::EdDSA,
    )
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
    if path.exists() {
        let key = read_key(&path, alg)?;
        return Ok(Loaded {
            key,
            created: false,
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
    };
    let json = serde_json::to_vec_pretty(&file).map_err(|e| KeyError::Invalid {
        path: path.clone(),
        message: e.to_string(),
    })?;
    write_private(&path, &json)?;
    Ok(Loaded { key, created: true })
}

fn read_key(path: &Path, alg: SigningAlgorithm) -> Result<SigningKey, KeyError> {
    let meta = fs::metadata(path).map_err(io(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Exposed {
            path: path.to_owned(),
            mode,
        });
    }
    let bytes = fs::read(path).map_err(io(path))?;
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
        .map_err(|_| invalid("key is not base64url".into()))?;
    let key = SigningKey::from_pkcs8(alg, &der).map_err(|e| invalid(e.to_string()))?;
    if key.kid() != file.kid {
        return Err(invalid("key id does not match the key".into()));
    }
    Ok(key)
}

/// Writes `data` to `path` with mode 0600, atomically and durably.
///
/// # Errors
/// [`KeyError::Io`] on failure.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), KeyError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(data).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io(path))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(())
}

/// The environment variable that may hold the proxy secrets' key-encryption
/// key (32 bytes, base64); it wins over the file.
pub const SECRET_KEY_ENV: &str = "SCRIP_SECRET_KEY";

/// The proxy secrets' key-encryption key: from [`SECRET_KEY_ENV`] when set,
/// else `<data_dir>/keys/secrets.key` (32 random bytes, base64, mode 0600),
/// created on first use when `create`. A file group or others can read is
/// refused.
///
/// # Errors
/// [`KeyError`] when the variable or the file does not hold 32 base64
/// bytes, the file is exposed, or it cannot be created.
pub fn load_secret_kek(
    data_dir: &Path,
    create: bool,
) -> Result<zeroize::Zeroizing<[u8; 32]>, KeyError> {
    use base64::Engine as _;
    let decode = |text: &str, path: &Path| {
        let invalid = || KeyError::Invalid {
            path: path.to_owned(),
            message: "must hold 32 bytes, base64".into(),
        };
        let t = text.trim();
        let bytes = zeroize::Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(t)
                .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(t))
                .map_err(|_| invalid())?,
        );
        let mut key = zeroize::Zeroizing::new([0u8; 32]);
        if bytes.len() != 32 {
            return Err(invalid());
        }
        key.copy_from_slice(&bytes);
        Ok(key)
    };
    if let Ok(text) = std::env::var(SECRET_KEY_ENV) {
        let text = zeroize::Zeroizing::new(text);
        return decode(&text, Path::new(SECRET_KEY_ENV));
    }
    let dir = data_dir.join("keys");
    let path = dir.join("secrets.key");
    if !path.exists() {
        if !create {
            return Err(KeyError::Io {
                path,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no key-encryption key yet; `scrip secret set` creates it",
                ),
            });
        }
        ensure_private_dir(&dir)?;
        let mut key = zeroize::Zeroizing::new([0u8; 32]);
        aws_lc_rs::rand::fill(key.as_mut()).map_err(|_| KeyError::Invalid {
            path: path.clone(),
            message: "random generator failed".into(),
        })?;
        let text =
            zeroize::Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(key.as_ref()));
        write_private(&path, text.as_bytes())?;
        return Ok(key);
    }
    let meta = fs::metadata(&path).map_err(io(&path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Exposed { path, mode });
    }
    let text = zeroize::Zeroizing::new(fs::read_to_string(&path).map_err(io(&path))?);
    decode(&text, &path)
}
