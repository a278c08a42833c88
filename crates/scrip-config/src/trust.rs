//! Files scrip trusts (key-encryption keys, signing keys, `jwks_file`
//! trust anchors, policies) and the directories that lead to them: whoever
//! can change one, or rename a directory on the way to it and put another
//! in its place, changes what scrip trusts. One set of rules for all of
//! them, as `sshd`'s `StrictModes` checks every directory up to the root:
//!
//! - a file or directory must belong to scrip's user or root;
//! - nobody else may write it, unless it is on a read-only mount (a
//!   Kubernetes ConfigMap or Secret volume, whose root's bits say 0777 or
//!   1777 though nobody can write there);
//! - a directory on the way may also be sticky (`/tmp`): there only a
//!   name's owner may remove or rename it, and the next step on the way is
//!   checked in turn;
//! - write by the group is refused for the file and the directory that
//!   holds it, or only logged ([`GroupWrite::Warn`], for policies), and
//!   logged for the directories further up: on systems that give each user
//!   a group of their own (umask 002) the group is its user.
//!
//! The way is followed as the kernel follows it, link by link, so a
//! directory that holds a link on the way is checked as well as the one
//! the link leads into. With every directory on the way safe, nobody else
//! can swap the file between these checks and its read.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Component, Path, PathBuf};

/// Why a file, or a directory on the way to it, is not to be trusted.
#[derive(Debug, thiserror::Error)]
pub enum Untrusted {
    /// It belongs to another user than scrip's or root.
    #[error(
        "`{}` belongs to uid {owner}, neither scrip's user (uid {euid}) nor root: its owner could {change}; `chown` it",
        path.display(),
        change = what.change()
    )]
    Foreign {
        /// The file or directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// scrip's user.
        euid: u32,
        /// What is at stake.
        what: Stake,
    },
    /// Others than its owner may write it.
    #[error(
        "`{}` has mode {mode:o}: {by} could {change}; `chmod {fix}` it",
        path.display(),
        by = by.who(),
        change = what.change(),
        fix = by.fix()
    )]
    Writable {
        /// The file or directory.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
        /// Who, besides its owner.
        by: Writers,
        /// What is at stake.
        what: Stake,
    },
    /// Others than its owner and group may read it, and it holds a secret
    /// that can be given another way.
    #[error(
        "`{}` has mode {mode:o} and holds {what}: anyone on this host could read it; `chmod o-r` it, or {instead}",
        path.display()
    )]
    Readable {
        /// The file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
        /// What secret it holds.
        what: &'static str,
        /// How else to give the secret.
        instead: &'static str,
    },
    /// It, or a directory on the way, cannot be looked at.
    #[error("cannot look at `{}`: {source}", path.display())]
    Io {
        /// What could not be looked at.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Who besides a file's owner may write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writers {
    /// Members of its group.
    Group,
    /// Anyone on the host.
    Others,
}

impl Writers {
    fn who(self) -> &'static str {
        match self {
            Self::Group => "members of its group",
            Self::Others => "anyone on the host",
        }
    }
    fn fix(self) -> &'static str {
        match self {
            Self::Group => "g-w",
            Self::Others => "o-w",
        }
    }
}

/// What whoever could change a file would change: for the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stake {
    /// A key-encryption key or a signing key.
    Key,
    /// A `jwks_file`: a trust anchor for identities.
    TrustAnchor,
    /// A policy directory or file.
    Policy,
    /// The configuration file of `scrip serve` or `scrip proxy`.
    Configuration,
    /// The local attestation socket.
    Socket,
    /// A program scrip runs as its own user (a `mint_command`).
    Program,
}

impl Stake {
    fn change(self) -> &'static str {
        match self {
            Self::Key => "replace the key",
            Self::TrustAnchor => "add a key and sign any identity",
            Self::Policy => "change the policies",
            Self::Configuration => "change whom scrip trusts (issuers, approvers, upstreams)",
            Self::Socket => {
                "put a socket of their own in the attestation socket's place and answer scrip's clients"
            }
            Self::Program => {
                "change what scrip runs as its own user, which can read the key-encryption key and every proxied secret"
            }
        }
    }
}

/// What is done about write by the group on the file and the directory
/// that holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupWrite {
    /// It is refused.
    Refuse,
    /// It is logged.
    Warn,
}

/// Checks a file or directory by name: [`check_entry`] on what the name
/// leads to, and [`check_way`].
///
/// # Errors
/// [`Untrusted`].
pub fn check_path(path: &Path, what: Stake, group: GroupWrite) -> Result<(), Untrusted> {
    let meta = std::fs::metadata(path).map_err(|source| Untrusted::Io {
        path: path.to_owned(),
        source,
    })?;
    check_entry(path, &meta, what, group)?;
    check_way(path, what, group)
}

/// Checks the configuration file of a command that serves (`scrip serve`,
/// `scrip proxy`) or runs what it names (`scrip secret`'s `mint_command`)
/// as a trust anchor is checked: whoever can change it decides which
/// issuers, approvers and upstreams scrip trusts. A pipe of scrip's own,
/// named as one of its descriptors (`--config <(...)`, which the shell
/// gives as `/dev/fd/N`, or `/dev/stdin`), is on no file system and holds
/// what the invoking shell put there: it is not checked. Any other name is,
/// a named pipe on disk or a link to another process's descriptor
/// included.
///
/// # Errors
/// [`Untrusted`].
pub fn check_configuration(path: &Path) -> Result<(), Untrusted> {
    if own_pipe(path) {
        return Ok(());
    }
    check_path(path, Stake::Configuration, GroupWrite::Refuse)
}

/// Whether `path` names a pipe of scrip's own (see [`check_configuration`]).
fn own_pipe(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt as _;
    let own_descriptor = path == Path::new("/dev/stdin")
        || ["/dev/fd/", "/proc/self/fd/"].iter().any(|dir| {
            path.to_str()
                .and_then(|p| p.strip_prefix(dir))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        });
    own_descriptor && std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

/// Checks who may read the configuration file of a command that serves,
/// for the secrets `config` holds. A database password (in
/// `database_url`) others than the file's owner and group may read is
/// refused: the driver takes it from `PGPASSWORD` or a password file as
/// well. A group that may read it is logged (fine if the group is scrip's
/// user's alone), and so is an `approval_webhook` URL that others may
/// read when it may carry its receiver's secret (in its user info, path or
/// query), which has no other way in. A pipe of scrip's own is not
/// checked.
///
/// # Errors
/// [`Untrusted::Readable`], or [`Untrusted::Io`] when the file cannot be
/// looked at.
pub fn check_configuration_readers(path: &Path, config: &crate::Config) -> Result<(), Untrusted> {
    let password = config.holds_database_password();
    let webhook = config.webhook_may_hold_secret();
    if !(password || webhook) || own_pipe(path) {
        return Ok(());
    }
    let meta = std::fs::metadata(path).map_err(|source| Untrusted::Io {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.mode() & 0o7777;
    // Others read it only where they can reach it: a directory on the way
    // they may not pass through (`/etc/scrip` 0750) keeps them out.
    let others = mode & 0o004 != 0 && others_pass_to(path);
    const PASSWORD: &str = "a database password (in `database_url`)";
    if password && others {
        return Err(Untrusted::Readable {
            path: path.to_owned(),
            mode,
            what: PASSWORD,
            instead: "give the password in `PGPASSWORD` or a password file (`PGPASSFILE`, mode 0600) instead, and leave it out of the URL",
        });
    }
    for (held, what) in [
        (password, PASSWORD),
        (
            webhook,
            "the approval webhook's URL, whose user info, path or query may carry its receiver's secret",
        ),
    ] {
        if !held {
            continue;
        }
        if others {
            tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "anyone on this host could read {what}; `chmod o-r` the configuration if it does");
        } else if mode & 0o040 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "members of the configuration's group could read {what} (fine if the group is scrip's user's alone)");
        }
    }
    Ok(())
}

/// Whether others (neither owner nor group) may pass through every
/// directory on the way to `path`, as the kernel resolves it; `true` when
/// that cannot be told.
fn others_pass_to(path: &Path) -> bool {
    let Ok(real) = std::fs::canonicalize(path) else {
        return true;
    };
    real.ancestors()
        .skip(1)
        .all(|dir| std::fs::metadata(dir).map_or(true, |m| m.mode() & 0o001 != 0))
}

/// `Foreign` unless `uid` is scrip's user's or root's.
fn foreign(path: &Path, uid: u32, what: Stake) -> Result<(), Untrusted> {
    let euid = rustix::process::geteuid().as_raw();
    if uid == euid || uid == 0 {
        return Ok(());
    }
    Err(Untrusted::Foreign {
        path: path.to_owned(),
        owner: uid,
        euid,
        what,
    })
}

/// The most links followed on the way, as Linux's `ELOOP` limit.
const MAX_LINKS: usize = 40;

/// Checks every directory on the way to `path` (not `path` itself, which
/// the caller checks on the file it opened, with [`check_entry`]): each
/// directory one of its names or one of the links on the way is looked up
/// in, from the root.
///
/// # Errors
/// [`Untrusted`] for the first directory that fails, or one that cannot be
/// looked at (a missing `path` is an [`Untrusted::Io`] of kind `NotFound`).
pub fn check_way(path: &Path, what: Stake, group: GroupWrite) -> Result<(), Untrusted> {
    for (dir, holds_the_file) in way(path, what)? {
        let meta = std::fs::metadata(&dir).map_err(|source| Untrusted::Io {
            path: dir.clone(),
            source,
        })?;
        let sticky = meta.mode() & 0o1000 != 0;
        // A sticky directory's entries are replaced only by their owners,
        // and the entry on the way is checked in turn.
        let group = if holds_the_file {
            group
        } else {
            GroupWrite::Warn
        };
        check(&dir, &meta, what, group, sticky)?;
    }
    Ok(())
}

/// Checks a file or directory scrip trusts, by the metadata of what was
/// opened (so the checks are of what is read): its owner, and who else may
/// write it.
///
/// # Errors
/// [`Untrusted::Foreign`] or [`Untrusted::Writable`].
pub fn check_entry(
    path: &Path,
    meta: &Metadata,
    what: Stake,
    group: GroupWrite,
) -> Result<(), Untrusted> {
    check(path, meta, what, group, false)
}

fn check(
    path: &Path,
    meta: &Metadata,
    what: Stake,
    group: GroupWrite,
    sticky_ok: bool,
) -> Result<(), Untrusted> {
    foreign(path, meta.uid(), what)?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 == 0 || (sticky_ok && mode & 0o1000 != 0) || read_only_mount_root(path, meta) {
        return Ok(());
    }
    if mode & 0o002 != 0 {
        return Err(Untrusted::Writable {
            path: path.to_owned(),
            mode,
            by: Writers::Others,
            what,
        });
    }
    match group {
        GroupWrite::Refuse => Err(Untrusted::Writable {
            path: path.to_owned(),
            mode,
            by: Writers::Group,
            what,
        }),
        GroupWrite::Warn => {
            // Once a path and mode (the checks run again at every reload),
            // for so many of them at most.
            static WARNED: std::sync::Mutex<Vec<(PathBuf, u32)>> =
                std::sync::Mutex::new(Vec::new());
            let mut warned = WARNED
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if warned.iter().any(|(p, m)| p == path && *m == mode) {
                return Ok(());
            }
            if warned.len() < 256 {
                warned.push((path.to_owned(), mode));
            }
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "members of this directory's or file's group could {} (fine if the group is scrip's user's alone)",
                what.change()
            );
            Ok(())
        }
    }
}

/// Whether `path` is a directory at the root of a read-only mount (a
/// Kubernetes ConfigMap or Secret volume, whose root's mode bits say 0777
/// or 1777 though nobody can write there). Only a mount's root: the files
/// and directories inside keep the bits they were given, and a read-only
/// view of a file says nothing of who may write it through another mount
/// (`docker run -v /srv/x:/etc/x:ro`), so their own bits are checked. The
/// root of such a view is taken for a ConfigMap's: nothing here tells them
/// apart.
fn read_only_mount_root(path: &Path, meta: &Metadata) -> bool {
    use rustix::fs::{AtFlags, CWD, StatxAttributes, StatxFlags};
    if !meta.is_dir() {
        return false;
    }
    // A mount's root (the kernel says so, on Linux 5.8 and later) of
    // another file system than its parent's (`..` as the kernel resolves
    // it): a bind mount of the same one (`ReadOnlyPaths=` in a systemd
    // unit) is a read-only view of a directory others may write through
    // its other name.
    let kernel_says = match rustix::fs::statx(CWD, path, AtFlags::empty(), StatxFlags::BASIC_STATS)
    {
        Ok(s) if s.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT) => {
            s.stx_attributes.contains(StatxAttributes::MOUNT_ROOT)
        }
        _ => true,
    };
    let root =
        kernel_says && std::fs::metadata(path.join("..")).is_ok_and(|p| p.dev() != meta.dev());
    root && rustix::fs::statvfs(path)
        .is_ok_and(|s| s.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
}

/// The directories the kernel looks names up in on the way to `path`, in
/// order, each once, with whether the name looked up there was the file's
/// own (its last name, or a link's last name that leads to it). A link on
/// the way must be scrip's user's or root's: in a sticky directory anyone
/// may leave one, and the kernel follows it unless `protected_symlinks`
/// is set.
fn way(path: &Path, what: Stake) -> Result<Vec<(PathBuf, bool)>, Untrusted> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| Untrusted::Io { path, source }
    };
    let absolute = std::path::absolute(path).map_err(io(path))?;
    let mut todo: VecDeque<OsString> = VecDeque::new();
    push_front(&mut todo, &absolute);
    let mut at = PathBuf::from("/");
    let mut dirs: Vec<(PathBuf, bool)> = Vec::new();
    let mut links = 0;
    while let Some(name) = todo.pop_front() {
        match name.to_str() {
            Some("/") => {
                at = PathBuf::from("/");
                continue;
            }
            Some(".") => continue,
            Some("..") => {
                at.pop();
                continue;
            }
            _ => {}
        }
        let last = todo.is_empty();
        match dirs.iter_mut().find(|(d, _)| *d == at) {
            Some((_, holds)) => *holds |= last,
            None => dirs.push((at.clone(), last)),
        }
        let next = at.join(&name);
        let meta = std::fs::symlink_metadata(&next).map_err(io(&next))?;
        if meta.file_type().is_symlink() {
            foreign(&next, meta.uid(), what)?;
            links += 1;
            if links > MAX_LINKS {
                return Err(Untrusted::Io {
                    path: path.to_owned(),
                    source: std::io::Error::other(format!(
                        "more than {MAX_LINKS} links on the way"
                    )),
                });
            }
            let target = std::fs::read_link(&next).map_err(io(&next))?;
            push_front(&mut todo, &target);
        } else {
            at = next;
        }
    }
    Ok(dirs)
}

/// Puts `path`'s names before the ones still to look up (`/` first for an
/// absolute path).
fn push_front(todo: &mut VecDeque<OsString>, path: &Path) {
    for c in path.components().rev() {
        let name = match c {
            Component::RootDir => OsString::from("/"),
            Component::CurDir => OsString::from("."),
            Component::ParentDir => OsString::from(".."),
            Component::Normal(n) => n.to_owned(),
            // Not on Unix.
            Component::Prefix(_) => continue,
        };
        todo.push_front(name);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn mode(p: &Path, m: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }

    /// The way is followed as the kernel follows it: a link's own
    /// directory and the directories it leads through are on it, `..`
    /// steps back from where a link led, and a relative name starts at the
    /// working directory.
    #[test]
    fn the_way_is_every_directory_a_name_is_looked_up_in() {
        let root = tempfile::tempdir().unwrap();
        let r = std::fs::canonicalize(root.path()).unwrap();
        for d in ["a/b", "c/d", "e"] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        std::fs::write(r.join("c/d/f"), "").unwrap();
        // e/l -> ../c/x/../d (x is a link to d, so `..` leads to c)
        std::os::unix::fs::symlink(r.join("c/d"), r.join("c/x")).unwrap();
        std::os::unix::fs::symlink("../c/x/../d/f", r.join("e/l")).unwrap();
        std::os::unix::fs::symlink(r.join("e/l"), r.join("a/b/link")).unwrap();
        let found = way(&r.join("a/b/link"), Stake::Key).unwrap();
        let names: Vec<(String, bool)> = found
            .iter()
            .filter_map(|(d, last)| {
                d.strip_prefix(&r)
                    .ok()
                    .map(|p| (p.display().to_string(), *last))
            })
            .collect();
        assert_eq!(
            names,
            [
                (String::new(), false),
                ("a".into(), false),
                ("a/b".into(), true),
                ("e".into(), true),
                ("c".into(), false),
                ("c/d".into(), true),
            ],
            "{found:?}"
        );
        assert!(found.iter().any(|(d, _)| d == Path::new("/")));
        // Every directory of the temporary root's own way is on it too.
        assert!(found.iter().any(|(d, _)| Some(d.as_path()) == r.parent()));
        // A loop of links ends.
        std::os::unix::fs::symlink(r.join("loop2"), r.join("loop1")).unwrap();
        std::os::unix::fs::symlink(r.join("loop1"), r.join("loop2")).unwrap();
        let e = way(&r.join("loop1"), Stake::Key).unwrap_err();
        assert!(e.to_string().contains("links on the way"), "{e}");
        // A missing name is an error of kind NotFound.
        assert!(matches!(
            way(&r.join("a/none/f"), Stake::Key),
            Err(Untrusted::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound
        ));
    }

    /// A directory on the way that others can write refuses the file,
    /// however far up it is and whichever link leads through it, unless it
    /// is sticky; the group writing one is refused only where it holds the
    /// file (under [`GroupWrite::Refuse`]); another user's is refused.
    #[test]
    fn every_directory_on_the_way_must_be_safe() {
        let root = tempfile::tempdir().unwrap();
        let r = std::fs::canonicalize(root.path()).unwrap();
        std::fs::create_dir_all(r.join("up/keys")).unwrap();
        std::fs::create_dir_all(r.join("links")).unwrap();
        let file = r.join("up/keys/k");
        std::fs::write(&file, "").unwrap();
        std::os::unix::fs::symlink(r.join("up"), r.join("links/up")).unwrap();
        let via_link = r.join("links/up/keys/k");
        for d in ["up", "up/keys", "links"] {
            mode(&r.join(d), 0o755);
        }
        let refused = |path: &Path, group: GroupWrite| {
            check_way(path, Stake::Key, group)
                .err()
                .map(|e| e.to_string())
        };
        assert_eq!(refused(&file, GroupWrite::Refuse), None);
        assert_eq!(refused(&via_link, GroupWrite::Refuse), None);
        // Others writing two levels up.
        mode(&r.join("up"), 0o777);
        let e = refused(&file, GroupWrite::Refuse).unwrap();
        assert!(
            e.contains(&format!("`{}` has mode 777", r.join("up").display()))
                && e.contains("anyone on the host could replace the key"),
            "{e}"
        );
        mode(&r.join("up"), 0o1777);
        assert_eq!(refused(&file, GroupWrite::Refuse), None);
        // The group writing a directory further up is only logged.
        mode(&r.join("up"), 0o775);
        assert_eq!(refused(&file, GroupWrite::Refuse), None);
        mode(&r.join("up"), 0o755);
        // The group writing the directory that holds the file.
        mode(&r.join("up/keys"), 0o775);
        let e = refused(&file, GroupWrite::Refuse).unwrap();
        assert!(e.contains("members of its group could"), "{e}");
        assert_eq!(refused(&file, GroupWrite::Warn), None);
        mode(&r.join("up/keys"), 0o2770);
        assert!(refused(&file, GroupWrite::Refuse).is_some());
        mode(&r.join("up/keys"), 0o700);
        // The directory holding a link on the way.
        mode(&r.join("links"), 0o757);
        let e = refused(&via_link, GroupWrite::Refuse).unwrap();
        assert!(e.contains(&r.join("links").display().to_string()), "{e}");
        assert_eq!(refused(&file, GroupWrite::Refuse), None);
        mode(&r.join("links"), 0o755);
        // Another user's (giving a directory away takes root, as CI runs).
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(r.join("up"), Some(12_345), None).unwrap();
            let e = refused(&via_link, GroupWrite::Refuse).unwrap();
            assert!(e.contains("belongs to uid 12345"), "{e}");
            std::os::unix::fs::chown(r.join("up"), Some(0), None).unwrap();
            // A link on the way of another user's (left in a sticky
            // directory, say).
            std::os::unix::fs::lchown(r.join("links/up"), Some(12_345), None).unwrap();
            let e = refused(&via_link, GroupWrite::Refuse).unwrap();
            assert!(
                e.contains(&format!(
                    "`{}` belongs to uid 12345",
                    r.join("links/up").display()
                )),
                "{e}"
            );
            std::os::unix::fs::lchown(r.join("links/up"), Some(0), None).unwrap();
        }
        assert_eq!(refused(&via_link, GroupWrite::Refuse), None);
    }

    /// The root of a read-only mount passes whatever its bits (a ConfigMap
    /// volume's says 0777); a directory inside it keeps its own. Mounting
    /// takes root, as CI runs.
    #[test]
    fn only_a_read_only_mounts_root_is_exempt() {
        // Root with the right to mount (CAP_SYS_ADMIN, bit 21), as CI runs.
        let may_mount = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("CapEff:"))
                    .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            })
            .is_some_and(|caps| caps & (1 << 21) != 0);
        if !rustix::process::geteuid().is_root() || !may_mount {
            return;
        }
        /// Unmounts when dropped, however the test ends.
        struct Mounted(PathBuf);
        impl Drop for Mounted {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        let mount = |args: &[&str]| {
            let out = std::process::Command::new("mount")
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "mount {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let root = tempfile::tempdir().unwrap();
        let m = root.path().join("configmap");
        std::fs::create_dir(&m).unwrap();
        let at = m.to_str().unwrap();
        mount(&["-t", "tmpfs", "-o", "mode=0777", "scrip-test", at]);
        let _mounted = Mounted(m.clone());
        let inner = m.join("inner");
        std::fs::create_dir(&inner).unwrap();
        mode(&inner, 0o777);
        mount(&["-o", "remount,ro", at]);
        let check = |p: &Path| {
            check_entry(
                p,
                &std::fs::metadata(p).unwrap(),
                Stake::Policy,
                GroupWrite::Warn,
            )
            .map_err(|e| e.to_string())
        };
        check(&m).unwrap();
        let e = check(&inner).unwrap_err();
        assert!(e.contains("has mode 777"), "{e}");
        // Not read-only: refused.
        mount(&["-o", "remount,rw", at]);
        assert!(check(&m).unwrap_err().contains("has mode 777"));
    }

    /// A configuration on no file system (a pipe reached through
    /// `/dev/fd`) is not checked; a named pipe on disk is, as a file.
    #[test]
    fn a_configuration_is_checked_unless_it_is_on_no_file_system() {
        let root = tempfile::tempdir().unwrap();
        let fifo = root.path().join("scrip.toml");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        mode(&fifo, 0o666);
        let e = check_configuration(&fifo).unwrap_err().to_string();
        assert!(e.contains("has mode 666"), "{e}");
        mode(&fifo, 0o644);
        check_configuration(&fifo).unwrap();
        // An anonymous pipe, as `<(...)` gives.
        let (reader, _writer) = rustix::pipe::pipe().unwrap();
        use std::os::fd::AsRawFd as _;
        let fd = format!("/dev/fd/{}", reader.as_raw_fd());
        check_configuration(Path::new(&fd)).unwrap();
        // Not by another name: a link to it is followed, and leads
        // nowhere on disk.
        let link = root.path().join("linked.toml");
        std::os::unix::fs::symlink(&fd, &link).unwrap();
        assert!(check_configuration(&link).is_err());
        let missing = check_configuration(&root.path().join("none.toml")).unwrap_err();
        assert!(matches!(missing, Untrusted::Io { .. }), "{missing}");
    }

    /// A configuration holding a database password others may read is
    /// refused (the driver takes it from the environment or a password
    /// file too); one that holds none, or only a webhook's URL, is not.
    #[test]
    fn a_database_password_others_can_read_is_refused() {
        let root = tempfile::tempdir().unwrap();
        // Others may pass through to it (a temporary directory is 0700).
        mode(root.path(), 0o755);
        let file = root.path().join("scrip.toml");
        std::fs::write(&file, "").unwrap();
        let with = |url: Option<&str>, webhook: Option<&str>| crate::Config {
            database_url: url.map(str::to_owned),
            approval_webhook: webhook.map(str::to_owned),
            ..crate::Config::default()
        };
        for url in [
            "postgres://scrip:hunter2@db.example/scrip?sslmode=verify-full",
            "postgres://scrip@db.example/scrip?sslmode=verify-full&password=hunter2",
            "postgres://scrip@db.example/scrip?PASSWORD=hunter2",
        ] {
            let config = with(Some(url), None);
            for m in [0o644, 0o604, 0o444] {
                mode(&file, m);
                let e = check_configuration_readers(&file, &config).unwrap_err();
                assert!(matches!(e, Untrusted::Readable { .. }), "{url}: {e}");
                let e = e.to_string();
                assert!(e.contains("a database password"), "{e}");
                assert!(e.contains("PGPASSWORD"), "{e}");
                assert!(!e.contains("hunter2"), "{e}");
            }
            // Its owner and group alone: taken (the group logged).
            for m in [0o600, 0o640, 0o400] {
                mode(&file, m);
                check_configuration_readers(&file, &config).unwrap();
            }
        }
        // Others cannot pass through the directory that holds it: taken.
        let private = root.path().join("private");
        std::fs::create_dir(&private).unwrap();
        let inside = private.join("scrip.toml");
        std::fs::write(&inside, "").unwrap();
        mode(&inside, 0o644);
        let config = with(Some("postgres://scrip:hunter2@db.example/scrip"), None);
        mode(&private, 0o750);
        check_configuration_readers(&inside, &config).unwrap();
        mode(&private, 0o751);
        assert!(check_configuration_readers(&inside, &config).is_err());
        mode(&file, 0o644);
        for config in [
            with(
                Some("postgres://scrip@db.example/scrip?sslmode=verify-full"),
                None,
            ),
            with(Some("postgres://scrip:@db.example/scrip"), None),
            with(None, Some("https://hooks.example/T0/B0/secret")),
            with(None, None),
        ] {
            check_configuration_readers(&file, &config).unwrap();
        }
        assert!(!with(None, Some("https://hooks.example/")).webhook_may_hold_secret());
        for hook in [
            "https://hooks.example/T0/B0/secret",
            "https://hooks.example/?token=secret",
            "https://user:secret@hooks.example/",
        ] {
            assert!(with(None, Some(hook)).webhook_may_hold_secret(), "{hook}");
        }
    }

    /// A file itself: no sticky exemption (others could add files to a
    /// sticky directory), group write refused or logged.
    #[test]
    fn an_entry_is_checked_without_the_sticky_exemption() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("policies");
        std::fs::create_dir(&dir).unwrap();
        let check = |m: u32, group: GroupWrite| {
            mode(&dir, m);
            let meta = std::fs::metadata(&dir).unwrap();
            check_entry(&dir, &meta, Stake::Policy, group).map_err(|e| e.to_string())
        };
        assert!(check(0o755, GroupWrite::Refuse).is_ok());
        assert!(check(0o775, GroupWrite::Warn).is_ok());
        let e = check(0o775, GroupWrite::Refuse).unwrap_err();
        assert!(
            e.contains("members of its group could change the policies"),
            "{e}"
        );
        let e = check(0o1777, GroupWrite::Warn).unwrap_err();
        assert!(
            e.contains("anyone on the host could change the policies; `chmod o-w`"),
            "{e}"
        );
    }
}
