//! The live Cedar policy set of a process, and its reload: on SIGHUP and
//! when a file in `policy_dir` changes (checked every
//! `policy_poll_interval` seconds, and read once it has stayed unchanged
//! for half a second, so a file being written is not read half-way).
//! `scrip serve` and `scrip proxy` share it.
//!
//! A reload validates the new set (including that every tool action is
//! declared) before swapping it in; an invalid set is rejected, audited and
//! the last good one stays. Every reload, accepted or not, is audited
//! (`policy.reloaded`, `policy.rejected`), but for a reload refused for
//! where the files are, retried at each poll with nothing changed, and
//! refused again for the same reason.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use scrip_config::{Config, Tool};
use scrip_policy::PolicyEngine;
use scrip_store::{AuditEvent, Store, Write};

/// The current policy set. Cheap to clone; every clone sees reloads.
#[derive(Clone)]
pub struct Policies(Arc<Inner>);

/// The `policy.loaded` record of a process's first policy set (`policy`,
/// from `dir`), committed before the set decides anything: how many
/// policies, and the set's digest ([`PolicyEngine::digest`]), which tells
/// replicas deciding by different files apart.
#[must_use]
pub fn loaded_record(replica: &str, policy: &PolicyEngine, dir: &Path) -> Write {
    let mut a = crate::audit_record(replica, "policy.loaded");
    a.reason = Some(format!(
        "{} policies from `{}`, set {}",
        policy.len(),
        dir.display(),
        policy.digest()
    ));
    Write::Audit(Box::new(a))
}

struct Inner {
    current: RwLock<Arc<PolicyEngine>>,
    /// The directory as it was just before `current` was first read.
    first_seen: DirState,
    dir: PathBuf,
    tools: Vec<Tool>,
    poll_interval: u64,
    store: Arc<dyn Store>,
    replica: String,
    /// Why the last reload was rejected, while the set on disk is not in
    /// force: a rejection retried for the same reason is not recorded or
    /// logged as an error again.
    rejected: std::sync::Mutex<Option<String>>,
}

/// How a reload went ([`Policies::reload_as_seen`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reload {
    /// The new set is in force.
    Installed,
    /// Refused for what the files say: kept refused until they change.
    Rejected,
    /// Refused for where they are (a file that cannot be read, a link to
    /// nothing, a directory others can write): read again at each poll,
    /// since fixing that may change none of the files.
    RejectedForNow,
    /// Not read to the end (a file changed meanwhile, the store could not
    /// record it): read again once the files settle.
    Again,
}

impl std::fmt::Debug for Policies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policies")
            .field("dir", &self.0.dir)
            .field("policies", &self.current().len())
            .finish_non_exhaustive()
    }
}

impl Policies {
    /// Starts from `engine`, already loaded from `config.policy_dir` and
    /// checked against its tools, after `seen` was taken
    /// ([`DirState::now`]): a file that changed while it was read is read
    /// again once it settles. Reloads are audited in `store` as `replica`.
    #[must_use]
    pub fn new(
        engine: PolicyEngine,
        seen: DirState,
        config: &Config,
        store: Arc<dyn Store>,
        replica: impl Into<String>,
    ) -> Self {
        Self(Arc::new(Inner {
            current: RwLock::new(Arc::new(engine)),
            first_seen: seen,
            dir: config.policy_dir.clone(),
            tools: config.tools.clone(),
            poll_interval: config.policy_poll_interval,
            store,
            replica: replica.into(),
            rejected: std::sync::Mutex::new(None),
        }))
    }

    /// The policy set in force now.
    #[must_use]
    pub fn current(&self) -> Arc<PolicyEngine> {
        match self.0.current.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Reloads the policies now. Returns whether the new set was accepted.
    pub async fn reload(&self, cause: &str) -> bool {
        self.reload_as_seen(cause, None, false).await == Reload::Installed
    }

    /// [`Self::reload`]; with `seen`, the directory as it was looked at
    /// before: if it is not so once the files have been read, a file
    /// changed while it was read (one caught half-written can parse, a cut
    /// between two policies dropping the `forbid` rules after it), so what
    /// was read is dropped, nothing is installed or audited, and
    /// [`Reload::Again`] says to read again once the files settle.
    ///
    /// A new set is put in force only once its `policy.reloaded` record is
    /// committed: the decisions it makes name its policies, and the trail
    /// must say where they came from. When the store cannot take the
    /// record, the last good set stays and [`Reload::Again`] says to read
    /// again.
    ///
    /// `retry`: a retry of a reload refused for where the files are
    /// ([`Reload::RejectedForNow`]) with the directory as it was then; a
    /// refusal for the same reason again is not recorded or logged as an
    /// error (it would be at every poll).
    async fn reload_as_seen(&self, cause: &str, seen: Option<&DirState>, retry: bool) -> Reload {
        let inner = &self.0;
        // A directory that is gone (moved, an unmounted volume) is not an
        // empty policy set: the last good set stays. (At start a missing
        // directory denies everything.)
        let result = load_checked(&inner.dir).and_then(|p| {
            let p = p.ok_or_else(|| scrip_policy::PolicyError::Io {
                path: inner.dir.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the policy directory is gone (to deny everything, leave it empty of policies)",
                ),
            })?;
            p.check_tools(&inner.tools)?;
            Ok(p)
        });
        if seen.is_some_and(|seen| DirState::now(&inner.dir) != *seen) {
            tracing::info!(
                cause,
                "policy files changed while they were read; reading them again once they settle"
            );
            return Reload::Again;
        }
        let record = |event: &str, reason: String| {
            vec![Write::Audit(Box::new(AuditEvent {
                at_ms: crate::state::now_ms(),
                event: event.to_owned(),
                replica: inner.replica.clone(),
                reason: Some(reason),
                ..AuditEvent::default()
            }))]
        };
        match result {
            Ok(engine) => {
                let n = engine.len();
                let reloaded = record(
                    "policy.reloaded",
                    format!("{n} policies, set {} ({cause})", engine.digest()),
                );
                if let Err(e) = inner.store.commit(reloaded).await {
                    tracing::error!(error = %e, cause, "could not record the policy reload; keeping the last good policies until it can be");
                    return Reload::Again;
                }
                match inner.current.write() {
                    Ok(mut slot) => *slot = Arc::new(engine),
                    Err(poisoned) => *poisoned.into_inner() = Arc::new(engine),
                }
                *self.rejected() = None;
                tracing::info!(policies = n, set = %self.current().digest(), cause, "policies reloaded");
                Reload::Installed
            }
            Err(e) => {
                let why = e.to_string();
                let outcome = if matches!(
                    e,
                    scrip_policy::PolicyError::Io { .. } | scrip_policy::PolicyError::Unsafe(_)
                ) {
                    Reload::RejectedForNow
                } else {
                    Reload::Rejected
                };
                if retry && self.rejected().as_deref() == Some(why.as_str()) {
                    tracing::debug!(error = %e, cause, "policy reload rejected again for the same reason");
                    return outcome;
                }
                tracing::error!(error = %e, cause, "policy reload rejected; keeping the last good policies");
                let rejected = record("policy.rejected", format!("{why} ({cause})"));
                if let Err(e) = inner.store.commit(rejected).await {
                    tracing::error!(error = %e, "could not record the rejected policy reload");
                    return outcome;
                }
                *self.rejected() = Some(why);
                outcome
            }
        }
    }

    fn rejected(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.0
            .rejected
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reloads on every `hangup` signal and whenever the directory's files
    /// change, until the task is aborted; a reload rejected for where the
    /// files are rather than what they say ([`Reload::RejectedForNow`]) is
    /// tried again at each poll.
    pub fn spawn_reloader(
        &self,
        hangup: Option<tokio::signal::unix::Signal>,
    ) -> tokio::task::JoinHandle<()> {
        scrip_vital::spawn("policy reloader", self.clone().reload_loop(hangup))
    }

    async fn reload_loop(self, mut hup: Option<tokio::signal::unix::Signal>) {
        let mut watch = Watch::new(self.0.first_seen.clone());
        // The directory as it was when a reload was refused for where the
        // files are (retried at each poll while it stays so).
        let mut refused: Option<DirState> = None;
        let interval = self.0.poll_interval;
        loop {
            let wait = if watch.settling() {
                SETTLE
            } else {
                Duration::from_secs(interval)
            };
            let by_signal = tokio::select! {
                () = async {
                    match hup.as_mut() {
                        Some(h) => { h.recv().await; }
                        None => std::future::pending::<()>().await,
                    }
                } => true,
                () = async {
                    if interval == 0 {
                        std::future::pending::<()>().await;
                    }
                    tokio::time::sleep(wait).await;
                } => false,
            };
            if by_signal {
                // Read now; a read that a change raced (a file caught
                // half-written can parse, and lose the `forbid` rules after
                // the cut) is dropped and read again once two looks at the
                // directory, `SETTLE` apart, agree.
                let mut current = DirState::now(&self.0.dir);
                let mut unrecorded = SETTLE;
                let outcome = loop {
                    let outcome = self.reload_as_seen("SIGHUP", Some(&current), false).await;
                    if outcome != Reload::Again {
                        break outcome;
                    }
                    let read = current.clone();
                    loop {
                        tokio::time::sleep(SETTLE).await;
                        let again = DirState::now(&self.0.dir);
                        if again == current {
                            break;
                        }
                        current = again;
                    }
                    // The files held still: the store could not take the
                    // reload's record. Tried again less often while it
                    // cannot (each try reads and compiles the set, and
                    // logs).
                    if current == read {
                        tokio::time::sleep(unrecorded).await;
                        unrecorded = (unrecorded * 2).min(UNRECORDED_WAIT);
                    }
                };
                refused = (outcome == Reload::RejectedForNow).then(|| current.clone());
                watch.loaded(current);
                if refused.is_some() {
                    watch.unread();
                }
                continue;
            }
            let current = DirState::now(&self.0.dir);
            if !watch.observe(current.clone()) {
                continue;
            }
            let retry = refused.as_ref() == Some(&current);
            let outcome = self
                .reload_as_seen("file change", Some(&current), retry)
                .await;
            if outcome != Reload::Again {
                refused = (outcome == Reload::RejectedForNow).then(|| current.clone());
            }
            if matches!(outcome, Reload::Again | Reload::RejectedForNow) {
                watch.unread();
            }
        }
    }
}

/// The longest wait between tries of a reload asked for by SIGHUP whose
/// record the store cannot take.
const UNRECORDED_WAIT: Duration = Duration::from_secs(30);

/// How many times the policies are read at start while their files keep
/// changing, [`SETTLE`] apart, before start-up gives up.
const START_READS: usize = 20;

/// Reads the policy set at start (`scrip serve`, `scrip proxy`), and the
/// directory as it was before the read. As with a reload, a file changed
/// while it was read (a deploy rewriting it in place: one caught
/// half-written can parse, a cut between two policies dropping the
/// `forbid` rules after it) means what was read is dropped and read again
/// once the files settle; otherwise, with polling off, a cut set would
/// stay in force until a SIGHUP.
///
/// # Errors
/// The read's own error once the files held still while they were read, or
/// that they never did.
pub async fn load_at_start(
    dir: &Path,
) -> Result<(DirState, PolicyEngine), scrip_policy::PolicyError> {
    read_settled(dir, || match load_checked(dir)? {
        Some(engine) => Ok(engine),
        // Denies everything.
        None => PolicyEngine::from_sources(None, &[]),
    })
    .await
}

/// Checks who can write `dir` and its files ([`check_writers`]) and loads
/// them; `None` when there is no directory. Whether there is one is decided
/// once, by the check: a directory missing when looked at and there when
/// read (another user's, made in a parent they can write) is never read
/// unchecked, and one there when checked and gone when read fails the read.
fn load_checked(dir: &Path) -> Result<Option<PolicyEngine>, scrip_policy::PolicyError> {
    if check_writers(dir)? {
        PolicyEngine::load_dir(dir).map(Some)
    } else {
        Ok(None)
    }
}

/// Refuses a policy directory, a policy or schema file in it, a directory
/// on the way to either (through any link), that others can write or that
/// belongs to another user than scrip's or root: whoever can change the
/// policies decides every request (and a reload takes their change within
/// seconds). What the group can write is logged: on systems whose users
/// each have a group of their own (umask 002) that is the norm. `false`
/// when there is no directory (nothing to check).
///
/// # Errors
/// [`scrip_policy::PolicyError::Unsafe`].
fn check_writers(dir: &Path) -> Result<bool, scrip_policy::PolicyError> {
    use scrip_config::trust::{GroupWrite, Stake, Untrusted, check_path};
    if !dir.exists() {
        return Ok(false);
    }
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| Untrusted::Io { path, source }
    };
    let check = |path: &Path| check_path(path, Stake::Policy, GroupWrite::Warn);
    check(dir)?;
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        if scrip_policy::is_policy_file(&path) {
            check(&path)?;
        }
    }
    Ok(true)
}

/// Reads with `read` once the files held still while they were read, and
/// for [`SETTLE`] before: files changed less than that before the read (a
/// deploy that pauses between two writes of one file, a start racing it)
/// are waited for first, once for each state of the directory, as a reload
/// waits for two looks that agree.
async fn read_settled<T>(
    dir: &Path,
    mut read: impl FnMut() -> Result<T, scrip_policy::PolicyError>,
) -> Result<(DirState, T), scrip_policy::PolicyError> {
    let mut waited: Option<DirState> = None;
    for _ in 0..START_READS {
        let mut seen = DirState::now(dir);
        if waited.as_ref() != Some(&seen)
            && let Some(wait) = seen.settling(std::time::SystemTime::now())
        {
            tracing::info!(
                dir = %dir.display(),
                "policy files changed just now; reading them once they settle"
            );
            tokio::time::sleep(wait).await;
            waited = Some(seen);
            seen = DirState::now(dir);
            if waited.as_ref() != Some(&seen) {
                continue;
            }
        }
        let read = read();
        if DirState::now(dir) == seen {
            return read.map(|r| (seen, r));
        }
        tracing::info!(
            dir = %dir.display(),
            "policy files changed while they were read; reading them again once they settle"
        );
        tokio::time::sleep(SETTLE).await;
    }
    Err(scrip_policy::PolicyError::Io {
        path: dir.to_owned(),
        source: std::io::Error::other(format!(
            "the policy files kept changing while they were read ({START_READS} reads, {} ms apart)",
            SETTLE.as_millis()
        )),
    })
}

/// How long the policy files must stay unchanged after a change is seen
/// before they are read: a file caught half-written can parse (a cut
/// between two policies) and would drop the `forbid` rules after the cut.
const SETTLE: Duration = Duration::from_millis(500);

/// The reload decision: a change is loaded once two looks at the
/// directory, [`SETTLE`] apart, agree on it.
#[derive(Debug)]
struct Watch {
    /// The directory as it was just before the last load; `None` when a
    /// load was dropped (a file changed while it was read), so whatever
    /// the directory holds next is read.
    loaded: Option<DirState>,
    /// A change seen but not yet loaded.
    pending: Option<DirState>,
}

impl Watch {
    fn new(loaded: DirState) -> Self {
        Self {
            loaded: Some(loaded),
            pending: None,
        }
    }

    /// The last load was dropped: read the directory again once it settles.
    fn unread(&mut self) {
        self.loaded = None;
        self.pending = None;
    }

    /// Whether a change is waiting to settle.
    fn settling(&self) -> bool {
        self.pending.is_some()
    }

    /// Records a load of `current` made for another reason (SIGHUP).
    fn loaded(&mut self, current: DirState) {
        self.loaded = Some(current);
        self.pending = None;
    }

    /// Takes a look at the directory; returns whether to reload now.
    fn observe(&mut self, current: DirState) -> bool {
        if self.loaded.as_ref() == Some(&current) {
            self.pending = None;
            return false;
        }
        if self.pending.as_ref() == Some(&current) {
            self.loaded(current);
            return true;
        }
        self.pending = Some(current);
        false
    }
}

/// What the policy directory holds, as far as a change to it shows: the
/// name of each file the loader reads (`*.cedar`, `*.cedarschema`; a log or
/// an editor's swap file beside them that keeps changing is no change) or
/// refuses ([`scrip_policy::nested_files`]: one put in a subdirectory, or
/// taken out of it, is a change), and
/// of what it names (symbolic links followed, as the loader follows them) its
/// size, modification and change times and inode. A copy that keeps the
/// modification time (`cp -p`, `rsync -a`) still changes the change time or
/// the inode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirState(Vec<(String, u64, Option<std::time::SystemTime>, i64, i64, u64)>);

impl DirState {
    /// The directory now. Take it before reading the policies.
    #[must_use]
    pub fn now(dir: &Path) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Self::default();
        };
        let mut out: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|path| scrip_policy::is_policy_file(path))
            .chain(scrip_policy::nested_files(dir).unwrap_or_else(|_| {
                // Too many entries to look through: the set is refused, and
                // this stands for them until they are fewer.
                vec![dir.join("..more than scrip looks through")]
            }))
            .map(|path| {
                let name = path
                    .strip_prefix(dir)
                    .unwrap_or(&path)
                    .to_string_lossy()
                    .into_owned();
                // A link to nothing (or a file that cannot be looked at) is
                // there too, as the link itself: a load fails on it, and
                // its removal must be a change that is read.
                match std::fs::metadata(&path).or_else(|_| std::fs::symlink_metadata(&path)) {
                    Ok(meta) => (
                        name,
                        meta.len(),
                        meta.modified().ok(),
                        meta.ctime(),
                        meta.ctime_nsec(),
                        meta.ino(),
                    ),
                    Err(_) => (name, 0, None, 0, 0, 0),
                }
            })
            .collect();
        out.sort();
        Self(out)
    }

    /// How long until [`SETTLE`] has passed since the latest change of its
    /// files (their change time), if it has not yet; a change time to come
    /// (a clock stepped back) counts as now.
    fn settling(&self, now: std::time::SystemTime) -> Option<Duration> {
        let latest = self
            .0
            .iter()
            .filter_map(|(_, _, _, secs, nsecs, _)| {
                let secs = u64::try_from(*secs).ok()?;
                let nsecs = u32::try_from(*nsecs).ok()?;
                std::time::UNIX_EPOCH.checked_add(Duration::new(secs, nsecs))
            })
            .max()?;
        let age = now.duration_since(latest).unwrap_or(Duration::ZERO);
        SETTLE.checked_sub(age).filter(|d| !d.is_zero())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(name: &str, len: u64) -> DirState {
        DirState(vec![(name.to_owned(), len, None, 0, 0, 0)])
    }

    #[test]
    fn a_change_is_loaded_only_once_two_looks_agree() {
        let mut w = Watch::new(fp("a.cedar", 10));
        assert!(!w.observe(fp("a.cedar", 10)), "nothing changed");
        assert!(!w.settling());

        // Half-written, then complete: neither look agrees with the one before.
        assert!(!w.observe(fp("a.cedar", 4)));
        assert!(w.settling());
        assert!(!w.observe(fp("a.cedar", 25)));
        assert!(w.settling());
        assert!(w.observe(fp("a.cedar", 25)), "a settled change is loaded");
        assert!(!w.settling());
        assert!(!w.observe(fp("a.cedar", 25)), "and loaded once");

        // A change undone before it settled needs no reload.
        assert!(!w.observe(fp("a.cedar", 3)));
        assert!(!w.observe(fp("a.cedar", 25)));
        assert!(!w.settling());
        assert!(!w.observe(fp("a.cedar", 25)));

        // SIGHUP loads whatever is there and drops a pending change.
        assert!(!w.observe(fp("b.cedar", 1)));
        w.loaded(fp("b.cedar", 1));
        assert!(!w.settling());
        assert!(!w.observe(fp("b.cedar", 1)));

        // A load dropped because a file changed while it was read: the
        // directory is read again once it settles, even as it was before.
        assert!(!w.observe(fp("b.cedar", 7)));
        assert!(w.observe(fp("b.cedar", 7)));
        w.unread();
        assert!(!w.observe(fp("b.cedar", 1)));
        assert!(w.observe(fp("b.cedar", 1)));
    }

    /// A file rewritten while the start-up read ran: what was read is
    /// dropped, and the files are read again once they held still.
    #[tokio::test]
    async fn a_start_up_read_that_a_change_raced_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.cedar");
        std::fs::write(&file, "half").unwrap();
        let mut reads = 0;
        let (seen, got) = read_settled(dir.path(), || {
            reads += 1;
            if reads == 1 {
                // Another writer finishes the file during the first read.
                std::fs::write(&file, "the whole file").unwrap();
            }
            Ok(reads)
        })
        .await
        .unwrap();
        assert_eq!(got, 2, "the raced read was used");
        assert_eq!(seen, DirState::now(dir.path()));

        // Another file beside them changing is no change.
        let log = dir.path().join("reload.log");
        let mut reads = 0;
        read_settled(dir.path(), || {
            reads += 1;
            std::fs::write(&log, "x".repeat(reads)).unwrap();
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(reads, 1);

        // Files that never hold still stop the start, rather than let a cut
        // set through.
        let mut n = 0u64;
        let e = read_settled(dir.path(), || {
            n += 1;
            std::fs::write(&file, "x".repeat(usize::try_from(n).unwrap())).unwrap();
            Ok(())
        });
        tokio::time::pause();
        let e = e.await.unwrap_err();
        assert!(e.to_string().contains("kept changing"), "{e}");
    }

    /// Files changed just before the start are read only once they held
    /// still for [`SETTLE`]: a deploy that pauses between two writes of a
    /// file, for less than that, is not read half-way; files older than
    /// that are read at once.
    #[tokio::test]
    async fn a_start_up_read_waits_for_files_changed_just_now() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.cedar");
        let before = std::time::Instant::now();
        std::fs::write(&file, "half").unwrap();
        let mut read_at = None;
        let (seen, ()) = read_settled(dir.path(), || {
            read_at = Some(before.elapsed());
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(seen, DirState::now(dir.path()));
        // Change times are coarse (a clock tick): a margin below SETTLE.
        let read_at = read_at.unwrap();
        assert!(
            read_at + Duration::from_millis(50) >= SETTLE,
            "read {read_at:?} after the write"
        );
        // Once settled, nothing to wait for.
        assert_eq!(
            DirState::now(dir.path()).settling(std::time::SystemTime::now()),
            None
        );
        // A change time to come counts as now.
        let ahead = std::time::SystemTime::now() + Duration::from_secs(3600);
        let state = DirState::now(dir.path());
        assert_eq!(state.settling(std::time::UNIX_EPOCH), Some(SETTLE));
        assert_eq!(state.settling(ahead), None);
    }

    /// What was read is installed only if the directory is still as it was
    /// seen before the read.
    #[tokio::test]
    async fn a_reload_of_files_changed_while_read_installs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let policies = dir.path().join("policies");
        std::fs::create_dir(&policies).unwrap();
        std::fs::write(
            policies.join("a.cedar"),
            "permit (principal, action, resource);\n",
        )
        .unwrap();
        let config = Config {
            policy_dir: policies.clone(),
            tools: Vec::new(),
            ..Config::default()
        };
        let store: Arc<dyn Store> = Arc::new(
            scrip_store::SqliteStore::open(&dir.path().join("scrip.db"))
                .await
                .unwrap(),
        );
        let seen = DirState::now(&policies);
        let engine = PolicyEngine::load(&policies).unwrap();
        let p = Policies::new(engine, seen.clone(), &config, store, "r1");
        assert_eq!(p.current().len(), 1);
        std::fs::write(
            policies.join("b.cedar"),
            "forbid (principal, action, resource);\n",
        )
        .unwrap();
        // Seen before `b.cedar` came: dropped.
        assert_eq!(
            p.reload_as_seen("file change", Some(&seen), false).await,
            Reload::Again
        );
        assert_eq!(p.current().len(), 1);
        let now = DirState::now(&policies);
        assert_eq!(
            p.reload_as_seen("file change", Some(&now), false).await,
            Reload::Installed
        );
        assert_eq!(p.current().len(), 2);
    }

    #[test]
    fn the_state_sees_a_copy_that_keeps_the_modification_time() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.cedar");
        std::fs::write(&file, "one").unwrap();
        let before = DirState::now(dir.path());
        let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
        // Same size, same modification time: a restore or `cp -p`.
        let other = dir.path().join("a.cedar.tmp");
        std::fs::write(&other, "two").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&other)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        std::fs::rename(&other, &file).unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().modified().unwrap(), mtime);
        assert_ne!(DirState::now(dir.path()), before);
    }

    #[test]
    fn the_state_follows_symbolic_links() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let target = elsewhere.path().join("real.cedar");
        std::fs::write(&target, "one").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("a.cedar")).unwrap();
        let before = DirState::now(dir.path());
        std::fs::write(&target, "three").unwrap();
        assert_ne!(DirState::now(dir.path()), before);
    }

    /// Policies others could change are refused (by the check a start and
    /// every reload make): a directory or file anyone can write, sticky or
    /// not, a directory a link leads into or one further up that anyone
    /// can write, one that belongs to another user. The group's write is
    /// allowed (logged).
    #[tokio::test]
    async fn policies_others_can_change_are_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        };
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("policies");
        std::fs::create_dir(&dir).unwrap();
        mode(&dir, 0o755);
        let file = dir.join("a.cedar");
        std::fs::write(&file, "permit(principal, action, resource) when { false };").unwrap();
        mode(&file, 0o644);
        load_at_start(&dir).await.unwrap();
        let refused = |why: &str| {
            let e = check_writers(&dir).unwrap_err();
            assert!(
                matches!(e, scrip_policy::PolicyError::Unsafe(_)) && e.to_string().contains(why),
                "{e}"
            );
        };
        mode(&dir, 0o777);
        refused("anyone on the host could change the policies");
        // Sticky, as /tmp: others still add files.
        mode(&dir, 0o1777);
        refused("anyone on the host");
        mode(&dir, 0o775);
        assert!(check_writers(&dir).unwrap());
        mode(&file, 0o646);
        refused("anyone on the host");
        mode(&file, 0o664);
        assert!(check_writers(&dir).unwrap());
        // A link into a directory anyone can write.
        let open = root.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::write(open.join("b.cedar"), "").unwrap();
        std::os::unix::fs::symlink(open.join("b.cedar"), dir.join("b.cedar")).unwrap();
        mode(&open, 0o777);
        refused(&format!("`{}` has mode 777", open.display()));
        mode(&open, 0o755);
        assert!(check_writers(&dir).unwrap());
        // A directory further up the way: anyone could rename the policy
        // directory away and put their own in its place.
        mode(root.path(), 0o777);
        refused(&format!("`{}` has mode 777", root.path().display()));
        mode(root.path(), 0o700);
        assert!(check_writers(&dir).unwrap());
        // Another user's (giving a file away takes root, as CI runs).
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(&file, Some(12_345), None).unwrap();
            refused("belongs to uid 12345");
            std::os::unix::fs::chown(&file, Some(0), None).unwrap();
        }
        let e = load_at_start(&root.path().join("nope")).await;
        assert!(
            e.is_ok(),
            "a missing directory denies everything, as before"
        );
        // Decided once: missing is no engine to read, and a directory gone
        // by the time it is read is an error, not an empty set.
        assert!(load_checked(&root.path().join("nope")).unwrap().is_none());
        assert!(PolicyEngine::load_dir(&root.path().join("nope")).is_err());
        mode(&dir, 0o777);
        assert!(matches!(
            load_at_start(&dir).await.unwrap_err(),
            scrip_policy::PolicyError::Unsafe(_)
        ));
    }
}
