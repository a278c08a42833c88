//! A private on-disk cache of access tokens, so that successive processes
//! of one task (each `scrip token` call) reuse a token until shortly before
//! it expires.
//!
//! Layout: `<dir>/<sha256(task token)>/<sha256(tool, actions)>.json`, the
//! directories `0700` and the files `0600`, written atomically. A directory
//! not owned by this user, or open to others, is not used. The cache is
//! best effort: any failure means a fresh exchange, never an error. When a
//! task's first token is stored, the tokens of other tasks that have
//! expired are removed (tasks this user's scrip never saw end: left to
//! their deadline, their `scrip run` killed), so the cache does not grow
//! without bound.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use crate::AccessToken;

/// A directory of cached access tokens.
#[derive(Debug, Clone)]
pub struct FileCache {
    dir: PathBuf,
}

fn hex_sha256(parts: &[&str]) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for p in parts {
        ctx.update(p.as_bytes());
        ctx.update(b"\0");
    }
    ctx.finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `name` is a name the cache gives: a SHA-256 in lowercase hex.
fn is_digest(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// This process's effective uid, from the kernel (not the owner of
/// `/proc/self`, which is root once a process is not dumpable, as `scrip
/// run` makes itself before it starts its command).
fn own_uid() -> Option<u32> {
    Some(rustix::process::geteuid().as_raw())
}

/// A private directory: created `0700` if missing, refused when another
/// user owns it or others may enter it.
fn private_dir(dir: &Path) -> Option<()> {
    let _ = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir);
    let meta = std::fs::symlink_metadata(dir).ok()?;
    (meta.is_dir() && Some(meta.uid()) == own_uid() && meta.mode() & 0o077 == 0).then_some(())
}

impl FileCache {
    /// The cache in `dir`, or `None` when `dir` is not private to this user.
    #[must_use]
    pub fn new(dir: PathBuf) -> Option<Self> {
        if private_dir(&dir).is_none() {
            // Said, not only skipped: in a shared temporary directory
            // another user may have taken the name first.
            tracing::warn!(dir = %dir.display(), "the token cache's directory could not be made, or is not this user's alone (another owner, open to others, not a directory): tokens are not cached");
            return None;
        }
        Some(Self { dir })
    }

    /// `$XDG_RUNTIME_DIR/scrip-tokens`, else `<temp dir>/scrip-tokens-<uid>`.
    /// A relative `XDG_RUNTIME_DIR` is ignored, as the XDG Base Directory
    /// specification says, and a relative temp dir (`TMPDIR=tmp`) means no
    /// cache: either would put tokens under the working directory, often a
    /// repository.
    #[must_use]
    pub fn default_location() -> Option<Self> {
        let dir = match std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|d| d.is_absolute())
        {
            Some(d) => d.join("scrip-tokens"),
            None => {
                let tmp = std::env::temp_dir();
                if !tmp.is_absolute() {
                    return None;
                }
                tmp.join(format!("scrip-tokens-{}", own_uid()?))
            }
        };
        Self::new(dir)
    }

    fn task_dir(&self, task_token: &str) -> PathBuf {
        self.dir.join(hex_sha256(&[task_token]))
    }

    fn entry(&self, task_token: &str, tool: &str, scope: &str) -> PathBuf {
        self.task_dir(task_token)
            .join(format!("{}.json", hex_sha256(&[tool, scope])))
    }

    /// The cached token, if any (fresh or not).
    #[must_use]
    pub fn get(&self, task_token: &str, tool: &str, scope: &str) -> Option<AccessToken> {
        let path = self.entry(task_token, tool, scope);
        let meta = std::fs::symlink_metadata(&path).ok()?;
        if !meta.is_file() || Some(meta.uid()) != own_uid() || meta.mode() & 0o077 != 0 {
            return None;
        }
        serde_json::from_slice(&std::fs::read(&path).ok()?).ok()
    }

    /// Stores a token (best effort).
    pub fn put(&self, task_token: &str, tool: &str, scope: &str, token: &AccessToken) {
        let dir = self.task_dir(task_token);
        if std::fs::symlink_metadata(&dir).is_err() {
            self.sweep(crate::now());
        }
        if private_dir(&dir).is_none() {
            return;
        }
        let Ok(bytes) = serde_json::to_vec(token) else {
            return;
        };
        let path = self.entry(task_token, tool, scope);
        // A name no other writer uses, in this process or another: only
        // the file this call created is renamed into place or removed.
        let mut nonce = [0u8; 8];
        if aws_lc_rs::rand::fill(&mut nonce).is_err() {
            return;
        }
        let tmp = path.with_extension(format!(
            "{}.{}.tmp",
            std::process::id(),
            nonce.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ));
        let Ok(mut file) = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
        else {
            return;
        };
        let written = file
            .write_all(&bytes)
            .and_then(|()| std::fs::rename(&tmp, &path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }

    /// Forgets every token of a task.
    pub fn remove_task(&self, task_token: &str) {
        let _ = std::fs::remove_dir_all(self.task_dir(task_token));
    }

    /// Removes the tokens that expired by `now`, files left half-written
    /// over a minute ago, and the task directories this empties. Only names
    /// of the cache's own layout are touched (the directory may be one the
    /// caller shares with other things), only this user's regular files and
    /// directories, and a symbolic link is never followed.
    fn sweep(&self, now: u64) {
        let Some(me) = own_uid() else {
            return;
        };
        let Ok(tasks) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for task in tasks.flatten() {
            if !is_digest(&task.file_name().to_string_lossy()) {
                continue;
            }
            let dir = task.path();
            let Ok(meta) = std::fs::symlink_metadata(&dir) else {
                continue;
            };
            if !meta.is_dir() || meta.uid() != me {
                continue;
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let token = name.strip_suffix(".json").is_some_and(is_digest);
                // `<digest>.<pid>.<nonce>.tmp`, as `put` names them.
                let temporary = name.strip_suffix(".tmp").is_some_and(|n| {
                    let mut parts = n.split('.');
                    parts.next().is_some_and(is_digest)
                        && parts
                            .next()
                            .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()))
                        && parts.next().is_some_and(|n| {
                            n.len() == 16 && n.bytes().all(|b| b.is_ascii_hexdigit())
                        })
                        && parts.next().is_none()
                });
                if !token && !temporary {
                    continue;
                }
                let path = entry.path();
                let Ok(meta) = std::fs::symlink_metadata(&path) else {
                    continue;
                };
                if !meta.is_file() || meta.uid() != me {
                    continue;
                }
                let stale = if token {
                    std::fs::read(&path)
                        .ok()
                        .and_then(|b| serde_json::from_slice::<AccessToken>(&b).ok())
                        .is_none_or(|t| t.expires_at <= now)
                } else {
                    // A temporary file (`….tmp`): a writer that died.
                    meta.modified()
                        .ok()
                        .and_then(|m| m.elapsed().ok())
                        .is_some_and(|age| age.as_secs() > 60)
                };
                if stale {
                    let _ = std::fs::remove_file(&path);
                }
            }
            // Only when nothing is left in it.
            let _ = std::fs::remove_dir(&dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn token() -> AccessToken {
        AccessToken {
            token: "t".into(),
            token_type: "Bearer".into(),
            scope: "read".into(),
            expires_at: 10,
            refresh_at: 5,
        }
    }

    #[test]
    fn round_trip_private_and_removable() {
        let root = tempfile::tempdir().unwrap();
        let cache = FileCache::new(root.path().join("c")).unwrap();
        assert_eq!(cache.get("task", "github", "read"), None);
        cache.put("task", "github", "read", &token());
        assert_eq!(cache.get("task", "github", "read"), Some(token()));
        assert_eq!(cache.get("task", "github", "write"), None);
        assert_eq!(cache.get("other", "github", "read"), None);
        let entry = cache.entry("task", "github", "read");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&entry), 0o600);
        assert_eq!(mode(&root.path().join("c")), 0o700);
        // Nothing in a file name reveals the task token.
        assert!(!entry.to_string_lossy().contains("task/"));
        cache.remove_task("task");
        assert_eq!(cache.get("task", "github", "read"), None);
    }

    /// A task's first token sweeps out the expired tokens of tasks whose
    /// end this cache never saw, and keeps the live ones.
    #[test]
    fn expired_tokens_of_other_tasks_are_swept() {
        let root = tempfile::tempdir().unwrap();
        let cache = FileCache::new(root.path().join("c")).unwrap();
        let now = crate::now();
        let at = |expires_at| AccessToken {
            expires_at,
            refresh_at: expires_at,
            ..token()
        };
        cache.put("ended", "github", "read", &at(now - 1));
        cache.put("live", "github", "read", &at(now + 600));
        cache.put("live", "github", "write", &at(now - 1));
        let left = cache
            .task_dir("live")
            .join(format!("{}.1.0011223344556677.tmp", hex_sha256(&["x"])));
        std::fs::write(&left, b"").unwrap();
        // What is not the cache's own is never touched, whatever its age.
        let other = root.path().join("c").join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("x.json"), b"{}").unwrap();
        let old = std::fs::File::create(other.join("keep.txt")).unwrap();
        old.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(3600))
            .unwrap();
        let unrelated = cache.task_dir("live").join("notes.json");
        std::fs::write(&unrelated, b"{}").unwrap();
        cache.put("new", "github", "read", &at(now + 600));
        assert!(
            !cache.task_dir("ended").exists(),
            "an expired task's tokens went"
        );
        assert_eq!(cache.get("live", "github", "read"), Some(at(now + 600)));
        assert_eq!(cache.get("live", "github", "write"), None);
        assert!(
            left.exists(),
            "a recent temporary file may still be written"
        );
        assert!(other.join("x.json").exists() && other.join("keep.txt").exists());
        assert!(unrelated.exists());
        assert_eq!(cache.get("new", "github", "read"), Some(at(now + 600)));
        // A token of a task seen before adds without a sweep.
        cache.put("ended", "github", "read", &at(now - 1));
        cache.put("new", "github", "write", &at(now + 600));
        assert!(cache.task_dir("ended").exists());
    }

    #[test]
    fn a_shared_directory_is_not_used() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("open");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(FileCache::new(dir).is_none());
    }
}
