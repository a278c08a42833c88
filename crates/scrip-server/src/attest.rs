//! Local workload attestation: a Unix socket in `data_dir` where a process
//! on the same host obtains a short-lived workload identity JWT, without any
//! identity provider.
//!
//! The kernel says who connected (`SO_PEERCRED`: uid, gid, pid at
//! `connect(2)`); `/proc/<pid>` says what it runs (the executable's path and
//! the SHA-256 of the file the process actually executes, read through
//! `/proc/<pid>/exe`). The `[[local_workloads]]` selectors map that to a
//! workload name; with none configured, a process of scrip's own user is
//! identified by uid and executable. The identity is signed with scrip's own
//! key (`typ` `wit+jwt`, `iss` `<issuer>/local`, `aud` the issuer, five
//! minutes) and the decision is audited before the token leaves.
//!
//! Protocol: the client sends `ATTEST\n` and reads one JSON line, or sends
//! `POST /attest HTTP/1.1` (so `curl --unix-socket` works) and reads an
//! HTTP/1.1 answer. Either way the body is `{"identity_token", "expires_in"}`
//! or `{"error", "error_description"}`.
//!
//! The pid-reuse race: the process is pinned by opening `/proc/<pid>` as a
//! directory and reading everything through that descriptor (a reused pid
//! is a different directory), its start time must precede the moment the
//! connection was accepted (a process started afterwards cannot be the one
//! that connected), and start time and executable are read again after
//! hashing and must not have changed. docs/local-attestation.md says what
//! remains.

use std::fs::File;
use std::io::Read as _;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{
    DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use scrip_config::{Config, LocalWorkload};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};

use crate::state::{AppState, Inner, now};

/// Lifetime of a local workload identity, seconds.
pub const IDENTITY_TTL: u64 = scrip_config::LOCAL_IDENTITY_TTL;
/// The `typ` of a local workload identity.
pub const IDENTITY_TYP: &str = scrip_identity::LOCAL_IDENTITY_TYP;
/// The largest request read from the socket.
const MAX_REQUEST: usize = 8 * 1024;
/// How long a client has to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Attestations hashed at once (each reads an executable).
const CONCURRENCY: usize = 8;
/// Of those, the most one uid takes: another uid's attestations always
/// have turns, whatever files one uid has scrip hash.
const TURNS_PER_UID: usize = CONCURRENCY / 2;
/// Connections open at once (reading their request or waiting their turn);
/// past this a new one is closed at once, so idle connections cannot use up
/// scrip's file descriptors.
const MAX_OPEN: usize = 256;
/// Connections one uid that an entry could serve may have open at once: one
/// that connects and says nothing holds at most these, not every place of
/// [`MAX_OPEN`], and the others' attestations go on.
const MAX_OPEN_PER_UID: usize = 64;
/// Connections one uid that no entry serves may have open at once (each
/// is only refused).
const MAX_OPEN_UNSERVED: usize = 4;
/// Connections of uids that no entry serves, all of them together: one
/// user with many uids (subordinate ones, in a user namespace) holds no
/// more.
const MAX_OPEN_UNSERVED_ALL: usize = 16;

/// The connections open by uid, and those of unserved uids together (see
/// [`MAX_OPEN_PER_UID`], [`MAX_OPEN_UNSERVED`],
/// [`MAX_OPEN_UNSERVED_ALL`]).
/// Each uid's entry holds its count and its turns ([`TURNS_PER_UID`]),
/// dropped with its last connection.
#[derive(Default)]
struct OpenByUid(std::sync::Mutex<(std::collections::HashMap<u32, UidEntry>, usize)>);

/// A uid's connections open and its turns.
type UidEntry = (usize, Arc<tokio::sync::Semaphore>);

/// One connection of a uid, counted while it is held.
struct UidSlot {
    open: Arc<OpenByUid>,
    uid: u32,
    served: bool,
    /// The uid's own turns, of which the connection takes one before one
    /// of all the turns.
    turns: Arc<tokio::sync::Semaphore>,
}

impl OpenByUid {
    /// A place for one more connection of `uid` (one an entry could serve,
    /// or not), unless it or the unserved together have all theirs.
    fn take(self: &Arc<Self>, uid: u32, served: bool) -> Option<UidSlot> {
        let mut guard = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (by_uid, unserved) = &mut *guard;
        if !served && *unserved >= MAX_OPEN_UNSERVED_ALL {
            return None;
        }
        let (n, turns) = by_uid
            .entry(uid)
            .or_insert_with(|| (0, Arc::new(tokio::sync::Semaphore::new(TURNS_PER_UID))));
        if *n >= most_open(served) {
            return None;
        }
        *n += 1;
        if !served {
            *unserved += 1;
        }
        Some(UidSlot {
            open: self.clone(),
            uid,
            served,
            turns: turns.clone(),
        })
    }
}

/// The connections one uid may have open (see [`OpenByUid`]).
fn most_open(served: bool) -> usize {
    if served {
        MAX_OPEN_PER_UID
    } else {
        MAX_OPEN_UNSERVED
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut guard = self
            .open
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (by_uid, unserved) = &mut *guard;
        if let Some((n, _)) = by_uid.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                by_uid.remove(&self.uid);
            }
        }
        if !self.served {
            *unserved = unserved.saturating_sub(1);
        }
    }
}

/// How long reading and hashing a process's executable may take: a file
/// system that does not answer (a FUSE mount whose daemon stalls) would
/// otherwise hold a turn for ever.
const OBSERVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Readings of executables still running, those given up on included, past
/// which attestation answers 503: one stalled file system cannot take every
/// thread of the blocking pool, which other work needs.
const MAX_OBSERVING: usize = 32;

/// Readings of executables running now (see [`MAX_OBSERVING`]).
static OBSERVING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts one reading while it runs, on its thread.
struct Observing;

impl Observing {
    fn start() -> Option<Self> {
        use std::sync::atomic::Ordering;
        let before = OBSERVING.fetch_add(1, Ordering::SeqCst);
        if before >= MAX_OBSERVING {
            OBSERVING.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Self)
    }
}

impl Drop for Observing {
    fn drop(&mut self) {
        OBSERVING.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Why the attestation socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Binding or preparing the socket failed.
    #[error("cannot listen on the local attestation socket `{path}`: {message}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// The longest path a Unix socket may have (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Refuses a socket directory where others could put a socket of their own
/// at the socket's name (see [`Socket::bind`]): the directories on the way
/// to `staging` (the socket's own among them) as trust anchors' are, and
/// the socket's own directory, `holder`, not even sticky.
fn check_socket_dir(staging: &Path, holder: &Path) -> Result<(), String> {
    use scrip_config::trust::{GroupWrite, Stake, Untrusted, check_entry, check_way};
    check_way(staging, Stake::Socket, GroupWrite::Refuse).map_err(|e| e.to_string())?;
    let meta = std::fs::metadata(holder)
        .map_err(|e| format!("cannot look at `{}`: {e}", holder.display()))?;
    match check_entry(holder, &meta, Stake::Socket, GroupWrite::Refuse) {
        Ok(()) => Ok(()),
        Err(Untrusted::Writable { .. }) => Err(format!(
            "the socket's directory `{}` has mode {:o}: others may make or rename entries there (sticky or not) and put a socket of their own at its name; put the socket in a directory only scrip's user may write (as the default, `<data_dir>/scrip.sock`)",
            holder.display(),
            meta.mode() & 0o7777
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// The bound attestation socket. Dropping it removes the socket file.
#[derive(Debug)]
pub struct Socket {
    listener: UnixListener,
    path: PathBuf,
    ino: u64,
}

impl Socket {
    /// Binds the socket at the configured path with the configured mode.
    /// A stale socket file (nobody listening) is replaced; a live one or
    /// any other file is an error. The socket is created under a temporary
    /// name, given its mode, then renamed into place, so it is never
    /// reachable with a wider mode.
    ///
    /// # Errors
    /// [`SocketError`] naming the problem.
    pub fn bind(config: &Config) -> Result<Self, SocketError> {
        let path = config.socket_path();
        let fail = |message: String| SocketError::Bind {
            path: path.clone(),
            message,
        };
        // A client connects by the path itself, which must fit in a socket
        // address (`sun_path`: 108 bytes with its terminating NUL).
        let len = path.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(fail(format!(
                "the path is {len} bytes, and a socket's may be {MAX_SOCKET_PATH} at most: set `socket` (or `data_dir`) to a shorter one"
            )));
        }
        match std::fs::symlink_metadata(&path) {
            Ok(m)
                if m.file_type().is_socket() && m.uid() != rustix::process::geteuid().as_raw() =>
            {
                return Err(fail(format!(
                    "a socket of uid {}, not scrip's user, is in the way: someone else may be answering scrip's clients there; remove it, and give `socket` a directory only scrip's user can write",
                    m.uid()
                )));
            }
            Ok(m) if m.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                    return Err(fail(
                        "another scrip is serving it; stop it or set `socket`".into(),
                    ));
                }
                std::fs::remove_file(&path).map_err(|e| fail(e.to_string()))?;
            }
            Ok(_) => return Err(fail("a file that is not a socket is in the way".into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(e.to_string())),
        }
        let dir = path.parent().unwrap_or_else(|| Path::new("."));
        let name = path
            .file_name()
            .ok_or_else(|| fail("not a file path".into()))?;
        // Bound and given its mode inside a new directory only scrip may
        // enter, then renamed into place: nobody connects before the mode is
        // set (whatever the umask), and nobody can swap the file for a
        // symlink that the chmod would follow. The directory is reached
        // through its descriptor, not its name, which someone who may
        // write where it is could swap for one of their own; and nobody
        // but scrip's user (or root) may write there, or they could take
        // the socket's name for a socket of their own.
        let mut staging_name = std::ffi::OsString::from(".");
        staging_name.push(name);
        staging_name.push(format!(
            ".{}.d",
            scrip_jose::random_id().map_err(|_| fail("no randomness".into()))?
        ));
        let staging = dir.join(staging_name);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(|e| fail(format!("cannot create `{}`: {e}", staging.display())))?;
        // The socket's own directory not even sticky: there, another user
        // could take the socket's name while scrip is stopped (it removes
        // the socket as it stops), and answer its clients meanwhile.
        let holder = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let staged = check_socket_dir(&staging, holder).and_then(|()| {
            std::fs::File::open(&staging)
                .map_err(|e| format!("cannot open `{}`: {e}", staging.display()))
        });
        let staged = match staged {
            Ok(d) => d,
            Err(e) => {
                let _ = std::fs::remove_dir(&staging);
                return Err(fail(e));
            }
        };
        // Through the directory's descriptor (the staging path is also
        // longer than the socket's own, and may not fit in a socket
        // address where the final path does).
        let tmp = PathBuf::from(format!("/proc/self/fd/{}/scrip.sock", staged.as_raw_fd()));
        let prepared = std::os::unix::net::UnixListener::bind(&tmp).and_then(|listener| {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(config.socket_mode))?;
            listener.set_nonblocking(true)?;
            put_in_place(&tmp, &path)?;
            Ok(listener)
        });
        if prepared.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        drop(staged);
        let _ = std::fs::remove_dir(&staging);
        let std_listener = prepared.map_err(|e| fail(e.to_string()))?;
        let ino = std::fs::symlink_metadata(&path)
            .map(|m| m.ino())
            .map_err(|e| fail(e.to_string()))?;
        let listener = UnixListener::from_std(std_listener).map_err(|e| fail(e.to_string()))?;
        Ok(Self {
            listener,
            path,
            ino,
        })
    }
}

/// Gives the staged socket `tmp` its name `path`, unless something took
/// that name since it was looked at (another scrip starting at the same
/// time): a rename would put this one in its place, and leave the other
/// serving a socket nobody reaches, without a word.
fn put_in_place(tmp: &Path, path: &Path) -> std::io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    let taken = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            std::io::Error::new(
                e.kind(),
                "another scrip started serving it meanwhile; stop it or set `socket`",
            )
        } else {
            e
        }
    };
    match renameat_with(CWD, tmp, CWD, path, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        // A file system without the flag: a second name, then the first
        // one gone (should that fail, the staging directory is left
        // behind; the socket serves all the same).
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
            std::fs::hard_link(tmp, path).map_err(taken)?;
            let _ = std::fs::remove_file(tmp);
            Ok(())
        }
        Err(e) => Err(taken(e.into())),
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // Remove the file only if it is still this socket's.
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The socket being served: [`Serving::stop`] ends it.
#[derive(Debug)]
pub struct Serving {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// How long a stop lets the socket's connections under way finish (their
/// identity's commit, its answer) before it stops them.
const DRAIN: Duration = Duration::from_secs(5);

impl Serving {
    /// Stops accepting (if the server's stop has not already) and removes
    /// the socket file, lets the connections still open finish for up to
    /// [`DRAIN`], and stops those left; once this returns, nothing served
    /// here commits again.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Serves the socket until [`Serving::stop`].
pub fn spawn(socket: Socket, state: AppState) -> Serving {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    // A stop begins as the server's does (when it stops taking
    // connections), not after its drain: a replacement may bind the socket
    // meanwhile, and this process would otherwise go on issuing
    // identities for an API that takes no more requests.
    let mut stopping = state.0.stopping.subscribe();
    let task = scrip_vital::spawn("attestation socket", async move {
        let limit = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
        let open = Arc::new(tokio::sync::Semaphore::new(MAX_OPEN));
        let by_uid = Arc::new(OpenByUid::default());
        let mut connections = tokio::task::JoinSet::new();
        tracing::info!(socket = %socket.path.display(), "local attestation listening");
        loop {
            while connections.try_join_next().is_some() {}
            let next = tokio::select! {
                next = socket.listener.accept() => next,
                _ = &mut stopped => break,
                _ = stopping.wait_for(|s| *s) => break,
            };
            let stream = match next {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "local attestation accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // The moment of acceptance bounds the start time of the process
            // that connected (see `observe`).
            let accepted = uptime_ticks();
            // Anyone the socket's mode lets connect can cause these lines.
            static FULL: crate::logs::Budget = crate::logs::Budget::new(1);
            static UID_FULL: crate::logs::Budget = crate::logs::Budget::new(1);
            // Without credentials (none here), counted as one unserved
            // uid together.
            let (uid, served) = match stream.peer_cred() {
                Ok(c) => {
                    let served =
                        could_match(&state.0.config.local_workloads, c.uid(), c.gid(), own_uid());
                    (c.uid(), served.is_ok())
                }
                Err(_) => (u32::MAX, false),
            };
            let Some(uid_slot) = by_uid.take(uid, served) else {
                if UID_FULL.allow("local attestation: a uid's connections") {
                    tracing::warn!(
                        uid,
                        served,
                        "local attestation: this uid (or the uids no entry serves, together) has all its connections open; answering a new one 503"
                    );
                }
                busy(&stream);
                continue;
            };
            let Ok(slot) = open.clone().try_acquire_owned() else {
                if FULL.allow("local attestation: too many open connections") {
                    tracing::warn!(
                        "local attestation: too many open connections; closing a new one"
                    );
                }
                busy(&stream);
                continue;
            };
            let state = state.clone();
            let limit = limit.clone();
            connections.spawn(async move {
                let turns = served.then_some([&*uid_slot.turns, &*limit]);
                connection(&state.0, stream, accepted, turns).await;
                drop((slot, uid_slot));
            });
        }
        // Closed and its file removed at once: a new process may take the
        // path. Those under way may finish (an identity being committed is
        // answered rather than cut off, and the client need not ask again),
        // for a while; the rest are stopped, and waited for: none of them
        // commits after the caller's final commit.
        drop(socket);
        let _ = tokio::time::timeout(DRAIN, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        connections.shutdown().await;
    });
    Serving { stop, task }
}

/// Tells a connection there is no place for it now, without waiting (a
/// fresh connection's buffer takes the answer): it reads what the request
/// has sent so far, so that closing it does not reset it before the answer
/// is read, and answers in HTTP if that began as HTTP, else in the line
/// form scrip's clients speak; its client asks again.
fn busy(stream: &UnixStream) {
    let mut sent = [0u8; 1024];
    let mut http = false;
    for i in 0..MAX_REQUEST / sent.len() {
        match stream.try_read(&mut sent) {
            Ok(n) if n > 0 => http |= i == 0 && sent.starts_with(b"POST "),
            _ => break,
        }
    }
    let body = Answer::error(
        503,
        "temporarily_unavailable",
        "too many connections open; try again",
    )
    .body
    .to_string();
    let answer = if http {
        format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncache-control: no-store\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        format!("{body}\n")
    };
    let _ = stream.try_write(answer.as_bytes());
}

/// How the client spoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Line,
    Http,
}

/// An answer: HTTP status and JSON body.
struct Answer {
    status: u16,
    body: Value,
}

impl Answer {
    fn error(status: u16, error: &str, description: impl Into<String>) -> Self {
        Self {
            status,
            body: json!({ "error": error, "error_description": description.into() }),
        }
    }
}

/// Answers one connection, in a turn when it has turns to take (its uid's,
/// then one of all: [`TURNS_PER_UID`]): a uid no entry serves has none (it
/// is refused before anything is read or hashed, and at most so many are
/// open: [`MAX_OPEN_UNSERVED_ALL`]), so that served ones never wait behind
/// its refusals' records.
async fn connection(
    st: &Inner,
    mut stream: UnixStream,
    accepted: Option<u64>,
    turns: Option<[&tokio::sync::Semaphore; 2]>,
) {
    // The request is read before a turn is taken: a client that connects and
    // says nothing holds no turn, only its own connection, until the timeout.
    let (dialect, answer) = match read_request(&mut stream).await {
        Ok(dialect) => match turns {
            Some([own, all]) => {
                let (Ok(_own), Ok(_all)) = (own.acquire().await, all.acquire().await) else {
                    return;
                };
                (dialect, attest(st, &stream, accepted).await)
            }
            None => (dialect, attest(st, &stream, accepted).await),
        },
        Err(refused) => refused,
    };
    let body = answer.body.to_string();
    let bytes = match dialect {
        Dialect::Line => format!("{body}\n"),
        Dialect::Http => {
            let reason = match answer.status {
                200 => "OK",
                400 => "Bad Request",
                403 => "Forbidden",
                404 => "Not Found",
                500 => "Internal Server Error",
                _ => "Service Unavailable",
            };
            format!(
                "HTTP/1.1 {} {reason}\r\ncontent-type: application/json\r\ncache-control: no-store\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                answer.status,
                body.len()
            )
        }
    };
    let _ = tokio::time::timeout(READ_TIMEOUT, stream.write_all(bytes.as_bytes())).await;
    let _ = stream.shutdown().await;
}

/// Reads `ATTEST\n` or an HTTP request for `POST /attest`; a refusal is
/// answered in the dialect the client spoke (an HTTP request for another
/// path gets an HTTP 404, which `curl` can read).
async fn read_request(stream: &mut UnixStream) -> Result<Dialect, (Dialect, Answer)> {
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 512];
        loop {
            let n = stream.read(&mut chunk).await.unwrap_or(0);
            buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
            let text = String::from_utf8_lossy(&buf);
            if text.starts_with("ATTEST\n") || text.starts_with("ATTEST\r\n") {
                return Some(Dialect::Line);
            }
            if text.contains("\r\n\r\n") {
                return Some(Dialect::Http);
            }
            if n == 0 || buf.len() > MAX_REQUEST || text.starts_with(|c| c != 'A' && c != 'P') {
                return None;
            }
        }
    };
    let bad = || {
        Answer::error(
            400,
            "invalid_request",
            "send `ATTEST` and a newline (or `POST /attest` over HTTP/1.1)",
        )
    };
    match tokio::time::timeout(READ_TIMEOUT, read).await {
        Ok(Some(Dialect::Line)) => Ok(Dialect::Line),
        Ok(Some(Dialect::Http)) => {
            let text = String::from_utf8_lossy(&buf);
            let line = text.lines().next().unwrap_or_default();
            let mut parts = line.split(' ');
            if parts.next() == Some("POST") && parts.next() == Some("/attest") {
                Ok(Dialect::Http)
            } else {
                Err((
                    Dialect::Http,
                    Answer::error(
                        404,
                        "invalid_request",
                        "the only endpoint on this socket is `POST /attest`",
                    ),
                ))
            }
        }
        _ => Err((Dialect::Line, bad())),
    }
}

/// What was observed about the process that connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Observed {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
    /// The executable's path, when readable (`" (deleted)"` appended by the
    /// kernel when the file was removed or replaced).
    pub exe: Option<String>,
    /// The SHA-256 of the executed file, lowercase hex, when readable.
    pub exe_sha256: Option<String>,
    /// The executed file itself (device, inode), when readable: the path
    /// above is as the process's mount namespace names it, which the
    /// process may have arranged, so an `exe` selector matches this.
    pub exe_file: Option<(u64, u64)>,
    /// Whether `exe` names, in scrip's own mount namespace, the very file
    /// the process runs. Only then is the path put in the identity, where
    /// policies read it as `principal.exe`: a process in a namespace of its
    /// own could otherwise claim any path by mounting its binary there.
    pub exe_verified: bool,
}

/// Whether `path`, as scrip's own mount namespace names it, is `file`
/// (device, inode).
fn names_file(path: &str, file: Option<(u64, u64)>) -> bool {
    file.is_some() && std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino())) == file
}

async fn attest(st: &Inner, stream: &UnixStream, accepted: Option<u64>) -> Answer {
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "no peer credentials on the attestation socket");
            return Answer::error(400, "invalid_request", "peer credentials are unavailable");
        }
    };
    let (uid, gid) = (cred.uid(), cred.gid());
    let Some(pid) = cred.pid().filter(|p| *p > 0) else {
        // On the record, with its uid: a process of another container or
        // of the host reaching a shared socket.
        let why = "the connecting process has no pid visible to scrip (another pid namespace?)";
        return refuse(st, None, (uid, gid), 0, why).await;
    };
    // Refused before its executable is read or hashed (up to 512 MiB) when
    // no entry could match its uid and gid: a user scrip does not serve
    // cannot make it hash files over and over.
    if let Err(why) = could_match(&st.config.local_workloads, uid, gid, own_uid()) {
        return refuse(st, None, (uid, gid), pid, &why).await;
    }
    let Some(observing) = Observing::start() else {
        tracing::warn!(
            "attestation: too many executables still being read (a file system that does not answer?)"
        );
        return Answer::error(503, "temporarily_unavailable", "try again");
    };
    let observed = tokio::time::timeout(
        OBSERVE_TIMEOUT,
        tokio::task::spawn_blocking(move || {
            let _observing = observing;
            observe(uid, gid, pid, accepted, &HASHES)
        }),
    )
    .await;
    let observed = match observed {
        Ok(Ok(Ok(o))) => o,
        Ok(Ok(Err(why))) => {
            return refuse(st, None, (uid, gid), pid, &why).await;
        }
        Ok(Err(_)) => return Answer::error(503, "temporarily_unavailable", "try again"),
        Err(_) => {
            let why = format!(
                "its executable could not be read within {} s (a file system that does not answer?)",
                OBSERVE_TIMEOUT.as_secs()
            );
            return refuse(st, None, (uid, gid), pid, &why).await;
        }
    };
    let workload = match select(
        &st.config.local_workloads,
        &observed,
        own_uid(),
        &configured_files(&st.config.local_workloads),
    ) {
        Ok(w) => w,
        Err(why) => return refuse(st, Some(&observed), (uid, gid), pid, &why).await,
    };
    issue(st, &observed, workload).await
}

/// The files the configured `exe` selectors name, as scrip sees them
/// (symlinks followed): (device, inode), read at each attestation so that
/// an upgraded binary is the one matched.
fn configured_files(workloads: &[LocalWorkload]) -> Vec<Option<(u64, u64)>> {
    workloads
        .iter()
        .map(|w| {
            w.exe
                .as_ref()
                .and_then(|e| std::fs::metadata(e).ok())
                .map(|m| (m.dev(), m.ino()))
        })
        .collect()
}

/// `<issuer>/local`, of the issuer actually served (the configured one, or
/// the bound address).
pub(crate) fn local_issuer(st: &Inner) -> String {
    format!("{}/local", st.issuer)
}

/// scrip's effective uid, from the kernel (the owner of `/proc/self` is
/// root when the process is not dumpable, as with file capabilities).
fn own_uid() -> Option<u32> {
    Some(rustix::process::geteuid().as_raw())
}

/// Whether any entry could match a process of `uid` and `gid`, whatever
/// it runs (with no entries: whether it is scrip's own user).
fn could_match(
    workloads: &[LocalWorkload],
    uid: u32,
    gid: u32,
    own_uid: Option<u32>,
) -> Result<(), String> {
    if workloads.is_empty() {
        return if Some(uid) == own_uid {
            Ok(())
        } else {
            Err(not_served(own_uid, uid))
        };
    }
    if workloads
        .iter()
        .any(|w| w.uid.is_none_or(|u| u == uid) && w.gid.is_none_or(|g| g == gid))
    {
        Ok(())
    } else {
        Err(format!(
            "no [[local_workloads]] entry matches this process (uid {uid}, gid {gid}); add one to scrip's configuration"
        ))
    }
}

/// Why a process of `uid` is refused when no `[[local_workloads]]` are set.
fn not_served(own_uid: Option<u32>, uid: u32) -> String {
    format!(
        "no [[local_workloads]] are configured, so only processes of scrip's own user (uid {}) may attest; this process runs as uid {uid}",
        own_uid.map_or_else(|| "?".to_owned(), |u| u.to_string()),
    )
}

/// The workload `observed` is: the first entry whose selectors all match,
/// or, with no entries, `None` for a process of scrip's own user. `files`
/// are the (device, inode) of each entry's `exe` as scrip sees it: an
/// `exe` selector matches the file the process executes, not the path its
/// own mount namespace reports (a user namespace can bind-mount any
/// binary over the configured path).
fn select<'a>(
    workloads: &'a [LocalWorkload],
    observed: &Observed,
    own_uid: Option<u32>,
    files: &[Option<(u64, u64)>],
) -> Result<Option<&'a LocalWorkload>, String> {
    if workloads.is_empty() {
        return if Some(observed.uid) == own_uid {
            Ok(None)
        } else {
            Err(not_served(own_uid, observed.uid))
        };
    }
    let found = workloads.iter().enumerate().find(|(i, w)| {
        w.uid.is_none_or(|u| u == observed.uid)
            && w.gid.is_none_or(|g| g == observed.gid)
            && w.exe.as_ref().is_none_or(|_| {
                observed.exe_file.is_some() && files.get(*i).copied().flatten() == observed.exe_file
            })
            && w.exe_sha256
                .as_ref()
                .is_none_or(|h| observed.exe_sha256.as_deref() == Some(h.as_str()))
    });
    match found {
        Some((_, w)) => Ok(Some(w)),
        None => Err(format!(
            "no [[local_workloads]] entry matches this process (uid {}, gid {}, {}, sha256 {}); add one to scrip's configuration",
            observed.uid,
            observed.gid,
            exe_said(observed),
            observed.exe_sha256.as_deref().unwrap_or("unknown"),
        )),
    }
}

/// The process's executable as a record names it: the path only as the
/// process's own namespace names it, and said so, unless it is the file
/// at that path in scrip's (a process that mounted its own binary over a
/// trusted one's path must not read as that one in the trail).
/// The path is the process's to choose, so what would forge or hide a line
/// where the record or the log is read is written as escapes.
fn exe_said(o: &Observed) -> String {
    match o.exe.as_deref().map(scrip_token::escape_deceptive) {
        Some(exe) if o.exe_verified => format!("exe `{exe}`"),
        Some(exe) => format!("exe `{exe}` (unverified: not that file in scrip's namespace)"),
        None => "exe unknown".to_owned(),
    }
}

/// The refusal budget every uid no entry serves shares.
pub(crate) const UNSERVED_UIDS: &str = "uids no entry serves";

/// The budget a refused attestation is charged to, and the kind it is
/// counted under past it (see [`refuse`]).
fn refusal_key(served: bool, uid: u32, gid: u32, exe: Option<&str>) -> (String, String) {
    let exe = exe.unwrap_or("not read");
    if served {
        (format!("uid {uid}"), format!("gid {gid} {exe}"))
    } else {
        (
            UNSERVED_UIDS.to_owned(),
            format!("uid {uid} gid {gid} {exe}"),
        )
    }
}

async fn refuse(
    st: &Inner,
    observed: Option<&Observed>,
    (uid, gid): (u32, u32),
    pid: i32,
    why: &str,
) -> Answer {
    let mut a = st.audit("identity.attest");
    a.decision = Some("deny".into());
    a.agent_iss = Some(local_issuer(st));
    a.client = Some(format!("unix:pid={pid},uid={uid}"));
    a.reason = Some(why.to_owned());
    if let Some(o) = observed {
        a.agent_sub = Some(format!("local:uid:{}", o.uid));
    }
    // Charged to the uid that asked (a process may ask as fast as it
    // can), counted apart by gid and executable (up to the kinds kept
    // apart), so that one process's flood does not readily hide another's
    // refusal under the same uid. Uids no entry serves share one budget,
    // as they share their connections: one user with many uids (its
    // subordinate ones, in a user namespace) writes no more records.
    let exe = observed.and_then(|o| o.exe_sha256.as_deref());
    let served = could_match(&st.config.local_workloads, uid, gid, own_uid()).is_ok();
    let (key, kind) = refusal_key(served, uid, gid, exe);
    if st.record_refusal(&key, &kind, a).await.is_err() {
        return Answer::error(
            503,
            "temporarily_unavailable",
            "scrip cannot record the decision; try again later",
        );
    }
    static REFUSED: crate::logs::Budget = crate::logs::Budget::new(100);
    if REFUSED.allow("local attestation refused") {
        tracing::info!(pid, uid, reason = why, "local attestation refused");
    }
    Answer::error(403, "access_denied", why)
}

async fn issue(st: &Inner, o: &Observed, workload: Option<&LocalWorkload>) -> Answer {
    let subject = match workload {
        Some(w) => format!("local:{}", w.name),
        None => format!("local:uid:{}", o.uid),
    };
    let Ok(jti) = scrip_jose::random_id() else {
        return Answer::error(503, "temporarily_unavailable", "try again");
    };
    let iat = now();
    let mut attestation = serde_json::Map::new();
    attestation.insert("uid".into(), json!(o.uid));
    attestation.insert("gid".into(), json!(o.gid));
    attestation.insert("pid".into(), json!(o.pid));
    if let Some(w) = workload {
        attestation.insert("workload".into(), json!(w.name));
    }
    if let Some(exe) = o.exe.as_ref().filter(|_| o.exe_verified) {
        attestation.insert("exe".into(), json!(exe));
    }
    if let Some(sha) = &o.exe_sha256 {
        attestation.insert("exe_sha256".into(), json!(sha));
    }
    let local_issuer = local_issuer(st);
    let claims = json!({
        "iss": local_issuer,
        "sub": subject,
        "aud": st.issuer,
        "iat": iat,
        "nbf": iat,
        "exp": iat + IDENTITY_TTL,
        "jti": jti,
        "scrip_attestation": attestation,
    });
    let token = match st
        .keyring
        .signer(crate::state::now())
        .sign_jwt(IDENTITY_TYP, &claims)
    {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "signing failed");
            return Answer::error(503, "temporarily_unavailable", "try again");
        }
    };
    let mut a = st.audit("identity.attest");
    a.decision = Some("allow".into());
    a.agent_iss = Some(local_issuer);
    a.agent_sub = Some(subject.clone());
    a.jti = Some(jti.clone());
    a.client = Some(format!("unix:pid={},uid={}", o.pid, o.uid));
    a.reason = Some(format!(
        "{} sha256 {}",
        exe_said(o),
        o.exe_sha256.as_deref().unwrap_or("unknown")
    ));
    if st
        .store
        .commit(vec![scrip_store::Write::Audit(Box::new(a))])
        .await
        .is_err()
    {
        return Answer::error(
            503,
            "temporarily_unavailable",
            "scrip cannot record the decision; try again later",
        );
    }
    tracing::info!(sub = %subject, pid = o.pid, %jti, "local workload identity issued");
    Answer {
        status: 200,
        body: json!({
            "identity_token": token,
            "token_type": "urn:ietf:params:oauth:token-type:jwt",
            "expires_in": IDENTITY_TTL,
            "sub": subject,
        }),
    }
}

/// Reads what the process is, pinned to the process that connected.
fn observe(
    uid: u32,
    gid: u32,
    pid: i32,
    accepted: Option<u64>,
    hashes: &Hashes,
) -> Result<Observed, String> {
    let gone = "the connecting process is gone";
    // A descriptor on the process's /proc directory: every later read goes
    // through it, so a pid reused from here on is not read by mistake.
    let dir = File::open(format!("/proc/{pid}")).map_err(|_| gone.to_owned())?;
    let base = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    let started = start_time(&base).ok_or_else(|| gone.to_owned())?;
    // The pid could have been reused between connect and the open above;
    // such a process started after the connection was accepted. Without
    // the time of acceptance that cannot be ruled out: refuse.
    let Some(accepted) = accepted else {
        return Err("scrip cannot read /proc/uptime to pin the connecting process".into());
    };
    if started > accepted {
        return Err("the connecting process is gone (its pid was reused)".into());
    }
    let exe = std::fs::read_link(base.join("exe"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned());
    // Identify and hash the file the process executes (through /proc, even
    // if the path was since replaced), not whatever the path names now.
    let file = File::open(base.join("exe")).ok();
    let exe_file = file
        .as_ref()
        .and_then(|f| f.metadata().ok())
        .map(|m| (m.dev(), m.ino()));
    let exe_sha256 = file.and_then(|f| hashes.sha256(&f, MAX_HASHED));
    let exe_after = std::fs::read_link(base.join("exe"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned());
    // The file itself, not only its name: a process that execs another
    // binary while it is hashed and then the first one again keeps its path.
    let file_after = File::open(base.join("exe"))
        .and_then(|f| f.metadata())
        .ok()
        .map(|m| (m.dev(), m.ino()));
    if start_time(&base) != Some(started) {
        return Err(gone.to_owned());
    }
    if exe_after != exe || file_after != exe_file {
        return Err(
            "the connecting process changed its executable while being attested; try again".into(),
        );
    }
    drop(dir);
    let exe_verified = exe.as_deref().is_some_and(|p| names_file(p, exe_file));
    Ok(Observed {
        uid,
        gid,
        pid,
        exe,
        exe_sha256,
        exe_file,
        exe_verified,
    })
}

/// Field 22 of `stat` (start time, clock ticks since boot).
fn start_time(proc_dir: &Path) -> Option<u64> {
    let stat = std::fs::read_to_string(proc_dir.join("stat")).ok()?;
    parse_start_time(&stat)
}

fn parse_start_time(stat: &str) -> Option<u64> {
    // `comm` (field 2) may hold spaces and parentheses: fields resume after
    // the last `)`, at field 3.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_ascii_whitespace().nth(22 - 3)?.parse().ok()
}

/// `/proc/uptime` in clock ticks (`USER_HZ`, 100 on Linux), the unit of
/// `stat`'s start time.
fn uptime_ticks() -> Option<u64> {
    parse_uptime(&std::fs::read_to_string("/proc/uptime").ok()?)
}

fn parse_uptime(text: &str) -> Option<u64> {
    let first = text.split_ascii_whitespace().next()?;
    let (secs, frac) = first.split_once('.').unwrap_or((first, "0"));
    let frac: String = frac.chars().chain(std::iter::repeat('0')).take(2).collect();
    Some(secs.parse::<u64>().ok()? * 100 + frac.parse::<u64>().ok()?)
}

/// The largest executable scrip hashes: a bigger one (a sparse file, say)
/// would hold one of the few attestation turns for seconds. It gets no
/// `exe_sha256`, so no `exe_sha256` selector matches it.
const MAX_HASHED: u64 = 512 * 1024 * 1024;

/// Executables' hashes kept, by the file and its state ([`FileState`]).
const HASHES_KEPT: usize = 256;
/// How long a file must have been left alone before its hash is kept: a
/// write within the same tick of the file system's clock as the last one
/// would leave its times as they were (git treats its index's "racy"
/// entries so).
const SETTLED: Duration = Duration::from_secs(2);

/// A hash kept, with the use count when it was last used.
type Kept = (String, u64);

/// The hashes of executables read by attestations.
static HASHES: std::sync::LazyLock<Hashes> =
    std::sync::LazyLock::new(|| Hashes::new(SETTLED, HASHES_KEPT));

/// A file and what says whether it changed: device, inode, size, and the
/// times of its last write and last change to the nanosecond. Anything
/// that writes to the file sets the change time to the present, which no
/// one but the clock's owner can set back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileState {
    dev: u64,
    ino: u64,
    size: u64,
    modified: i128,
    changed: i128,
}

impl FileState {
    fn of(m: &std::fs::Metadata) -> Self {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            modified: ns(m.mtime(), m.mtime_nsec()),
            changed: ns(m.ctime(), m.ctime_nsec()),
        }
    }

    /// Whether the file was last written or changed at least `settled`
    /// before `now` (nanoseconds since 1970).
    fn settled_by(&self, now: i128, settled: Duration) -> bool {
        self.modified.max(self.changed) + i128::try_from(settled.as_nanos()).unwrap_or(i128::MAX)
            <= now
    }
}

/// Executables' hashes by [`FileState`], so that attesting the same
/// unchanged binary again costs a `stat` rather than a read of it (an agent
/// started often, or one uid asking over and over). A hash is kept only
/// for a file left alone for [`SETTLED`] before it was read and unchanged
/// while it was; the oldest used is dropped past `kept`.
struct Hashes {
    settled: Duration,
    kept: usize,
    /// The hashes, each with when it was last used, and the use count.
    table: std::sync::Mutex<(std::collections::HashMap<FileState, Kept>, u64)>,
}

impl Hashes {
    fn new(settled: Duration, kept: usize) -> Self {
        Self {
            settled,
            kept,
            table: std::sync::Mutex::default(),
        }
    }

    /// The SHA-256 of `file` (see [`sha256_hex`]), from the table when its
    /// state is there; `None` as well when the file changed while it was
    /// read (the hash would be of neither version).
    fn sha256(&self, file: &File, limit: u64) -> Option<String> {
        let before = FileState::of(&file.metadata().ok()?);
        {
            let mut table = self
                .table
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let (hashes, uses) = &mut *table;
            *uses += 1;
            if let Some((hash, used)) = hashes.get_mut(&before) {
                *used = *uses;
                return Some(hash.clone());
            }
        }
        let began = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .and_then(|d| i128::try_from(d.as_nanos()).ok());
        let hash = sha256_hex(file, limit)?;
        if FileState::of(&file.metadata().ok()?) != before {
            return None;
        }
        if began.is_some_and(|now| before.settled_by(now, self.settled)) {
            let mut table = self
                .table
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let (hashes, uses) = &mut *table;
            if hashes.len() >= self.kept
                && let Some(oldest) = hashes
                    .iter()
                    .min_by_key(|(_, (_, used))| *used)
                    .map(|(k, _)| *k)
            {
                hashes.remove(&oldest);
            }
            hashes.insert(before, (hash.clone(), *uses));
        }
        Some(hash)
    }
}

/// The SHA-256 of `file`, or `None` if it cannot be read or holds more than
/// `limit` bytes.
fn sha256_hex(file: &File, limit: u64) -> Option<String> {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut file = file.take(limit.saturating_add(1));
    let mut total: u64 = 0;
    loop {
        let n = file.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        total = total.saturating_add(n as u64);
        if total > limit {
            return None;
        }
        ctx.update(buf.get(..n).unwrap_or_default());
    }
    Some(
        ctx.finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Uids no entry serves share one refusal budget, each counted apart;
    /// a served uid has its own.
    #[test]
    fn unserved_uids_share_a_refusal_budget() {
        let (a, kind_a) = refusal_key(false, 1001, 1001, None);
        let (b, kind_b) = refusal_key(false, 1002, 1001, None);
        assert_eq!(a, b);
        assert_ne!(kind_a, kind_b);
        let (served, _) = refusal_key(true, 1001, 1001, Some("abc"));
        assert_eq!(served, "uid 1001");
        assert_ne!(served, a);
    }

    /// A socket put in the name's place meanwhile (another scrip starting
    /// at the same time) is not replaced.
    #[test]
    fn a_name_taken_meanwhile_is_not_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let (tmp, path) = (dir.path().join("staged"), dir.path().join("scrip.sock"));
        let _theirs = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let _ours = std::os::unix::net::UnixListener::bind(&tmp).unwrap();
        let theirs = std::fs::symlink_metadata(&path).unwrap().ino();
        let e = put_in_place(&tmp, &path).unwrap_err();
        assert!(
            e.to_string().contains("another scrip started serving it"),
            "{e}"
        );
        assert_eq!(std::fs::symlink_metadata(&path).unwrap().ino(), theirs);
        // Free, it is taken, and the staged name is gone.
        std::fs::remove_file(&path).unwrap();
        put_in_place(&tmp, &path).unwrap();
        assert!(!tmp.exists());
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
    }

    /// Readings of executables still running, stalled ones included, are
    /// bounded: past the bound an attestation is answered 503 at once
    /// rather than taking another blocking thread.
    #[test]
    fn readings_still_running_are_bounded() {
        let mut held = Vec::new();
        while let Some(o) = Observing::start() {
            held.push(o);
            assert!(held.len() <= MAX_OBSERVING, "{} readings", held.len());
        }
        assert!(!held.is_empty());
        assert!(Observing::start().is_none());
        held.pop();
        assert!(Observing::start().is_some(), "one ended: one may start");
    }

    fn workload(
        name: &str,
        uid: Option<u32>,
        exe: Option<&str>,
        sha: Option<&str>,
    ) -> LocalWorkload {
        LocalWorkload {
            name: name.into(),
            uid,
            gid: None,
            exe: exe.map(PathBuf::from),
            exe_sha256: sha.map(str::to_owned),
        }
    }

    /// A uid past its connections is refused a place; another uid is not,
    /// and a place given back is taken again.
    #[test]
    fn a_uid_past_its_connections_leaves_the_others_theirs() {
        let open = Arc::new(OpenByUid::default());
        let held: Vec<_> = (0..MAX_OPEN_UNSERVED)
            .map(|_| open.take(1000, false).unwrap())
            .collect();
        assert!(open.take(1000, false).is_none());
        let other = open.take(1001, false).unwrap();
        drop(held);
        assert!(open.take(1000, false).is_some());
        drop(other);
        // Many unserved uids hold no more than so many together; a served
        // uid is not held up by them.
        let many: Vec<_> = (0..MAX_OPEN_UNSERVED_ALL)
            .map(|i| open.take(2000 + u32::try_from(i).unwrap(), false).unwrap())
            .collect();
        assert!(open.take(3000, false).is_none());
        let served: Vec<_> = (0..MAX_OPEN_PER_UID)
            .map(|_| open.take(1000, true).unwrap())
            .collect();
        assert!(open.take(1000, true).is_none());
        drop((many, served));
        let guard = open.0.lock().unwrap();
        assert!(guard.0.is_empty() && guard.1 == 0);
    }

    fn observed() -> Observed {
        Observed {
            uid: 1000,
            gid: 100,
            pid: 42,
            exe: Some("/usr/bin/agent".into()),
            exe_sha256: Some("ab".repeat(32)),
            exe_file: Some(AGENT_FILE),
            exe_verified: true,
        }
    }

    /// A process no entry could match by uid and gid is refused before its
    /// executable is read or hashed.
    #[test]
    fn who_could_match_is_known_before_anything_is_hashed() {
        let w = [
            workload("a", Some(1000), Some("/usr/bin/agent"), None),
            workload("b", None, None, Some(&"ab".repeat(32))),
        ];
        assert!(could_match(&w[..1], 1000, 100, None).is_ok());
        let err = could_match(&w[..1], 1001, 100, None).unwrap_err();
        assert!(err.contains("uid 1001, gid 100"), "{err}");
        // An entry without uid or gid could match anyone.
        assert!(could_match(&w, 1001, 100, None).is_ok());
        // Without entries, scrip's own user only.
        assert!(could_match(&[], 7, 7, Some(7)).is_ok());
        assert!(could_match(&[], 8, 7, Some(7)).is_err());
    }

    /// A path names the executed file only if, in scrip's own namespace, it
    /// is that very file.
    #[test]
    fn an_exe_path_names_the_file_only_if_it_is_that_file() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "a").unwrap();
        std::fs::write(&b, "b").unwrap();
        let id = |p: &std::path::Path| {
            let m = std::fs::metadata(p).unwrap();
            Some((m.dev(), m.ino()))
        };
        let a_path = a.to_str().unwrap();
        assert!(names_file(a_path, id(&a)));
        assert!(!names_file(a_path, id(&b)));
        assert!(!names_file(a_path, None));
        assert!(!names_file("/no/such/file", id(&a)));
    }

    /// The (device, inode) of `/usr/bin/agent` in these tests.
    const AGENT_FILE: (u64, u64) = (8, 4242);

    /// What scrip sees at each entry's `exe`: the agent's file for
    /// `/usr/bin/agent`, another file elsewhere.
    fn files(workloads: &[LocalWorkload]) -> Vec<Option<(u64, u64)>> {
        workloads
            .iter()
            .map(|w| {
                w.exe.as_ref().map(|e| {
                    if e == Path::new("/usr/bin/agent") {
                        AGENT_FILE
                    } else {
                        (8, 1)
                    }
                })
            })
            .collect()
    }

    fn check(workloads: &[LocalWorkload], expected: Result<Option<&str>, &str>) {
        let got = select(workloads, &observed(), Some(1000), &files(workloads));
        match (got, expected) {
            (Ok(w), Ok(want)) => assert_eq!(w.map(|w| w.name.as_str()), want),
            (Err(e), Err(want)) => assert!(e.contains(want), "{e}"),
            (got, want) => panic!("got {:?}, want {want:?}", got.map(|w| w.map(|w| &w.name))),
        }
    }

    #[test]
    fn selection() {
        let sha = "ab".repeat(32);
        check(&[], Ok(None));
        check(&[workload("a", Some(1000), None, None)], Ok(Some("a")));
        check(
            &[workload("a", Some(1), None, None)],
            Err(
                "no [[local_workloads]] entry matches this process (uid 1000, gid 100, exe `/usr/bin/agent`",
            ),
        );
        check(
            &[
                workload("a", Some(1000), Some("/usr/bin/other"), None),
                workload("b", None, Some("/usr/bin/agent"), None),
            ],
            Ok(Some("b")),
        );
        check(&[workload("a", None, None, Some(&sha))], Ok(Some("a")));
        check(
            &[workload("a", Some(1000), None, Some(&"cd".repeat(32)))],
            Err("no [[local_workloads]]"),
        );
        let other = select(&[], &observed(), Some(0), &[]);
        assert!(other.is_err_and(|e| e.contains("only processes of scrip's own user (uid 0)")));
        // A symlinked selector matches the file it resolves to.
        let w = [workload("a", None, Some("/usr/local/bin/agent-link"), None)];
        let got = select(&w, &observed(), None, &[Some(AGENT_FILE)]);
        assert!(got.is_ok_and(|w| w.is_some()));
        // The path the process reports is not enough: another file mounted
        // over it (in the process's own mount namespace) does not match,
        // and neither does a path scrip cannot read.
        let w = [workload("a", None, Some("/usr/bin/agent"), None)];
        let other_file = Observed {
            exe_file: Some((8, 1)),
            exe_verified: false,
            ..observed()
        };
        let err = select(&w, &other_file, None, &[Some(AGENT_FILE)]).unwrap_err();
        // The refusal (and its audit record) does not vouch for the path.
        assert!(
            err.contains("exe `/usr/bin/agent` (unverified: not that file in scrip's namespace)"),
            "{err}"
        );
        assert_eq!(exe_said(&observed()), "exe `/usr/bin/agent`");
        // A path the process chose to erase the lines above it where the
        // record is read (U+009B opens a terminal's control sequence).
        let forging = Observed {
            exe: Some("/tmp/a\u{9b}1A\u{9b}2K\u{202e}".into()),
            ..observed()
        };
        assert_eq!(
            exe_said(&forging),
            "exe `/tmp/a\\u{9b}1A\\u{9b}2K\\u{202e}`"
        );
        assert!(select(&w, &observed(), None, &[None]).is_err());
        let unreadable = Observed {
            exe_file: None,
            ..observed()
        };
        assert!(select(&w, &unreadable, None, &[None]).is_err());
    }

    #[test]
    fn proc_parsing() {
        assert_eq!(
            parse_start_time("42 (a) b) c) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 777 19"),
            Some(777)
        );
        assert_eq!(parse_start_time("42 (x) S"), None);
        assert_eq!(parse_uptime("3007.89 1580.32\n"), Some(300_789));
        assert_eq!(parse_uptime("5.1 1.0"), Some(510));
        assert_eq!(parse_uptime("12 1"), Some(1200));
        assert_eq!(parse_uptime(""), None);
    }

    #[test]
    fn observes_itself() {
        let me = i32::try_from(std::process::id()).unwrap();
        let hashes = Hashes::new(SETTLED, HASHES_KEPT);
        let o = observe(0, 0, me, uptime_ticks(), &hashes).unwrap();
        let exe = std::env::current_exe().unwrap();
        assert_eq!(o.exe.as_deref(), exe.to_str());
        let bytes = std::fs::read(&exe).unwrap();
        let want: String = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(o.exe_sha256, Some(want));
        let meta = std::fs::metadata(&exe).unwrap();
        assert_eq!(o.exe_file, Some((meta.dev(), meta.ino())));
        let w = [workload("self", None, exe.to_str(), None)];
        let got = select(&w, &o, None, &configured_files(&w));
        assert!(got.is_ok_and(|w| w.is_some()));
        // A connection accepted before this process started cannot be its.
        assert!(observe(0, 0, me, Some(0), &hashes).is_err_and(|e| e.contains("reused")));
        // Without the time of acceptance, that cannot be ruled out.
        assert!(observe(0, 0, me, None, &hashes).is_err_and(|e| e.contains("/proc/uptime")));
    }

    #[test]
    fn a_file_larger_than_the_limit_is_not_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exe");
        std::fs::write(&path, b"0123456789").unwrap();
        let open = || File::open(&path).unwrap();
        // sha256("0123456789")
        let want = "84d89877f0d4041efb6bf91a16f0248f2fd573e6af05c19f96bedb9f882f7882";
        assert_eq!(sha256_hex(&open(), 10).as_deref(), Some(want));
        assert_eq!(sha256_hex(&open(), 9), None);
        // A sparse file far past the limit is refused after reading only
        // the limit's worth.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(1 << 40)
            .unwrap();
        assert_eq!(sha256_hex(&open(), 1 << 20), None);
    }

    fn sha256_of(bytes: &[u8]) -> String {
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// A file's hash is kept while the file is as it was, and only then: a
    /// write (of the same length) is hashed anew, a file written too
    /// recently is not kept at all, and the table holds so many.
    #[test]
    fn a_hash_is_kept_only_for_a_file_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exe");
        std::fs::write(&path, b"first").unwrap();
        let open = || File::open(&path).unwrap();
        let state = || FileState::of(&open().metadata().unwrap());
        let table_of = |h: &Hashes| h.table.lock().unwrap().0.clone();

        let hashes = Hashes::new(Duration::ZERO, 2);
        assert_eq!(hashes.sha256(&open(), 1 << 20), Some(sha256_of(b"first")));
        assert_eq!(
            table_of(&hashes).keys().copied().collect::<Vec<_>>(),
            [state()]
        );
        // What is kept is what is answered while the file is unchanged
        // (a planted value shows the file is not read again)...
        hashes.table.lock().unwrap().0.get_mut(&state()).unwrap().0 = "kept".into();
        assert_eq!(hashes.sha256(&open(), 1 << 20).as_deref(), Some("kept"));
        // ...and not once it is written, even to the same length, past a
        // tick of the file system's clock.
        std::thread::sleep(Duration::from_millis(50));
        std::fs::write(&path, b"other").unwrap();
        assert_eq!(hashes.sha256(&open(), 1 << 20), Some(sha256_of(b"other")));

        // The oldest used is dropped past the bound.
        let other = dir.path().join("exe2");
        std::fs::write(&other, b"third").unwrap();
        let third = FileState::of(&std::fs::metadata(&other).unwrap());
        assert_eq!(hashes.sha256(&open(), 1 << 20), Some(sha256_of(b"other")));
        assert_eq!(
            hashes.sha256(&File::open(&other).unwrap(), 1 << 20),
            Some(sha256_of(b"third"))
        );
        let kept = table_of(&hashes);
        assert_eq!(kept.len(), 2);
        assert!(kept.contains_key(&state()) && kept.contains_key(&third));

        // A file written within the settling time is read every time.
        let racy = Hashes::new(Duration::from_secs(3600), 2);
        assert_eq!(racy.sha256(&open(), 1 << 20), Some(sha256_of(b"other")));
        assert!(table_of(&racy).is_empty());
    }

    /// Each uid has turns of its own, fewer than all of them: one uid's
    /// attestations leave turns to the others'.
    #[test]
    fn a_uid_takes_at_most_its_share_of_the_turns() {
        const { assert!(TURNS_PER_UID < CONCURRENCY) };
        let open = Arc::new(OpenByUid::default());
        let (a1, a2) = (
            open.take(1000, true).unwrap(),
            open.take(1000, true).unwrap(),
        );
        let b = open.take(1001, true).unwrap();
        assert!(Arc::ptr_eq(&a1.turns, &a2.turns));
        assert!(!Arc::ptr_eq(&a1.turns, &b.turns));
        let held = a1
            .turns
            .clone()
            .try_acquire_many_owned(TURNS_PER_UID.try_into().unwrap());
        assert!(held.is_ok());
        assert!(a2.turns.try_acquire().is_err());
        assert!(b.turns.try_acquire().is_ok());
    }
}
