//! `scrip run`: run a command inside a task that ends when it exits.
//!
//! Order matters here: signal handlers are installed first, so an
//! interrupt at any point still ends whatever was started; the task is
//! ended (revoked) after the child exits, however it exits; SIGINT, SIGTERM,
//! SIGHUP and SIGQUIT are forwarded to the child, which gets [`GRACE`] to
//! exit before it is killed (a Ctrl-C at the terminal reached the child
//! already, and is the child's to handle). Only the child itself is
//! signalled and killed: processes it started and left running are its to
//! stop (their task token dies with the task all the same).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use scrip_client::{Client, Error, FileCache, Identity, Task, TaskRequest};
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::fail;

/// How long an interrupted child has to exit before it is killed.
const GRACE: Duration = Duration::from_secs(10);
/// Attempts at ending the task.
const END_ATTEMPTS: u32 = 3;

/// What a new task asks for and who asks: shared by `scrip run` and
/// `scrip task start` (each adds its own `--purpose`).
#[derive(Debug, clap::Args)]
pub struct TaskArgs {
    /// A grant the task asks for, `tool:action` (repeat, or separate with spaces).
    #[arg(long = "grant", value_name = "TOOL:ACTION", required = true)]
    grants: Vec<String>,
    /// The environment the task runs in: one of scrip's configured
    /// `environments` (by default dev, staging, prod). Required: policies
    /// treat environments differently (the shipped ones ask a person
    /// before a delete anywhere but dev), so none is assumed.
    #[arg(long = "env", value_name = "ENV", required = true)]
    environment: String,
    /// The task's lifetime in seconds (default: the server's task_ttl).
    #[arg(long, value_name = "SECONDS")]
    ttl: Option<u64>,
    /// A federated workload identity (a JWT) to use instead of local
    /// attestation; SCRIP_IDENTITY may hold the token itself.
    #[arg(long, value_name = "FILE")]
    identity_file: Option<PathBuf>,
    /// scrip's address.
    #[arg(long, value_name = "URL", env = "SCRIP_URL", default_value = scrip_client::DEFAULT_URL)]
    pub(crate) server: String,
    /// scrip's local attestation socket.
    #[arg(long, value_name = "PATH", env = "SCRIP_SOCKET", default_value = scrip_client::DEFAULT_SOCKET)]
    socket: PathBuf,
}

impl TaskArgs {
    /// The request, with `purpose`.
    pub(crate) fn request(&self, purpose: String) -> TaskRequest {
        TaskRequest {
            grants: self
                .grants
                .iter()
                .flat_map(|g| g.split_whitespace())
                .map(str::to_owned)
                .collect(),
            purpose,
            environment: self.environment.clone(),
            ttl: self.ttl,
        }
    }

    /// The identity: `--identity-file`, else `SCRIP_IDENTITY`, else local
    /// attestation on the socket.
    pub(crate) async fn identity(&self) -> Result<Identity, String> {
        load_identity(self.identity_file.as_deref(), &self.socket).await
    }
}

/// Headers whose value is a credential.
const SECRET_HEADERS: [&str; 6] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "x-api-key",
    "private-token",
    "x-auth-token",
];

/// Schemes an `Authorization` value may start with, shown before its
/// credentials.
const SCHEMES: [&str; 6] = ["bearer", "basic", "token", "digest", "negotiate", "dpop"];

/// Programs whose `-pVALUE` (no space) is a password.
const P_IS_PASSWORD: [&str; 5] = ["mysql", "mariadb", "mysqldump", "mysqladmin", "mysqlimport"];

/// The command line as the default purpose shows it, with common forms of
/// secrets masked (`***`), since the purpose is in the audit trail, the
/// task token, and what an approver reads: the value of an option named
/// for a password, secret or token (`--password X`, `-token X`,
/// `--api-key=X`), `NAME=value` where a part of NAME says password, secret,
/// token or credential, or its last part key (`DB_PASSWORD=x`, `API_KEY=x`,
/// `password=x` in a connection string), a `user:password` (`curl -u`), a
/// URL's user information and query, `mysql -pX`, `sshpass -p X`, and the
/// credentials of an `Authorization`, `Cookie`, `X-Api-Key` or like header,
/// in any argument, word by word (`sh -c "..."` included). Anything else
/// shows as it is: a purpose given with --purpose is taken as it is.
pub(crate) fn shown_command(args: &[std::ffi::OsString]) -> String {
    let program = args
        .first()
        .map(|a| {
            a.to_string_lossy()
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .unwrap_or_default();
    let mut shown = Vec::with_capacity(args.len());
    // The next word is a secret; or the whole next argument, when the
    // option ended its own.
    let mut mask_next = false;
    let mut mask_arg = false;
    let mut user_next = false;
    for arg in args {
        let arg = arg.to_string_lossy();
        if std::mem::take(&mut mask_arg) {
            shown.push("***".to_owned());
            continue;
        }
        let mut words = Vec::new();
        let mut header = false;
        let mut scheme_allowed = false;
        let count = arg.split(' ').count();
        for (i, word) in arg.split(' ').enumerate() {
            let last = i + 1 == count;
            if header {
                // After a credential header's name: its scheme, then the
                // rest of the argument, masked.
                if word.is_empty() {
                    words.push(String::new());
                } else if std::mem::take(&mut scheme_allowed)
                    && SCHEMES.contains(&bare(word).to_ascii_lowercase().as_str())
                {
                    words.push(word.to_owned());
                } else {
                    words.push("***".to_owned());
                }
                continue;
            }
            if word.is_empty() {
                words.push(String::new());
                continue;
            }
            if std::mem::take(&mut mask_next) {
                words.push("***".to_owned());
                continue;
            }
            if std::mem::take(&mut user_next) {
                // `-u alice:pw`: the password; `sudo -u root` stays.
                words.push(shown_user(word));
                continue;
            }
            let lower = bare(word).to_ascii_lowercase();
            // `-H 'Authorization: ...'`, `--header=Authorization: ...`.
            let name = lower
                .strip_prefix("--header=")
                .or_else(|| lower.strip_prefix("-h"))
                .unwrap_or(&lower);
            if let Some(h) = name.strip_suffix(':')
                && SECRET_HEADERS.contains(&h)
            {
                words.push(word.to_owned());
                header = true;
                scheme_allowed = true;
            } else if let Some((h, value)) = name.split_once(':')
                && SECRET_HEADERS.contains(&h)
                && !value.is_empty()
            {
                // `Authorization:Bearer` written without a space.
                let keep = word.len().saturating_sub(value.len());
                words.push(format!("{}***", word.get(..keep).unwrap_or_default()));
                header = true;
            } else if let Some((name, value)) = word.split_once('=') {
                if secret_name(bare(name)) {
                    words.push(format!("{name}=***"));
                } else if matches!(bare(name), "--user" | "-u") {
                    words.push(format!("{name}={}", shown_user(value)));
                } else {
                    words.push(shown_url(word));
                }
            } else if matches!(lower.as_str(), "-u" | "--user") {
                user_next = true;
                words.push(word.to_owned());
            } else if lower == "-p" && program == "sshpass" {
                mask_next = !last;
                mask_arg = last;
                words.push(word.to_owned());
            } else if lower.len() > 2
                && lower.starts_with("-p")
                && !lower.starts_with("--")
                && P_IS_PASSWORD.contains(&program.as_str())
            {
                words.push("-p***".to_owned());
            } else if lower.starts_with('-') && secret_name(lower.trim_start_matches('-')) {
                mask_next = !last;
                mask_arg = last;
                words.push(word.to_owned());
            } else {
                words.push(shown_url(word));
            }
        }
        shown.push(words.join(" "));
    }
    shown.join(" ")
}

/// `word` without the quotes a shell script around it leaves.
fn bare(word: &str) -> &str {
    word.trim_matches(|c| c == '\'' || c == '"')
}

/// `user:password` with the password masked; a plain user as it is.
fn shown_user(value: &str) -> String {
    match value.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => value.to_owned(),
    }
}

/// Whether a name (`DB_PASSWORD`, `api-key`, `apiKey`, `password` in a
/// connection string) names a secret: a part of it (split at `_`, `-`, `.`)
/// says password, secret, token, credential(s), auth or bearer, or its last
/// part is key (or apikey); not one that names where a secret is (`-file`,
/// `-id`, `-name`), nor a flag that turns one off (`--no-password`).
fn secret_name(name: &str) -> bool {
    let name = name.trim_start_matches('-');
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return false;
    }
    let upper = name.to_ascii_uppercase();
    let parts: Vec<&str> = upper.split(['_', '-', '.']).collect();
    let secret = parts.iter().any(|p| {
        matches!(
            *p,
            "PASSWORD"
                | "PASSWD"
                | "PWD"
                | "PASS"
                | "SECRET"
                | "TOKEN"
                | "CREDENTIAL"
                | "CREDENTIALS"
                | "AUTH"
                | "BEARER"
                | "APIKEY"
        )
    }) || parts.last().is_some_and(|p| matches!(*p, "KEY" | "APIKEY"));
    let names_a_place = parts.last().is_some_and(|p| {
        matches!(
            *p,
            "FILE"
                | "PATH"
                | "ENV"
                | "STDIN"
                | "ID"
                | "NAME"
                | "ARN"
                | "REF"
                | "CMD"
                | "COMMAND"
                | "HELPER"
                | "URL"
        )
    });
    secret && !names_a_place && parts.first() != Some(&"NO")
}

/// `s` with a URL's password (`user:***@`) and query (`?***`) masked, if
/// it holds one.
fn shown_url(s: &str) -> String {
    let Some(scheme_end) = s.find("://") else {
        return s.to_owned();
    };
    let (head, rest) = s.split_at(scheme_end + 3);
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    // A user and password, or a token alone (`https://ghp_x@github.com`).
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("***@{host}"),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, _)) => format!("{path}?***"),
        None => tail.to_owned(),
    };
    format!("{head}{authority}{tail}")
}

/// Arguments of `scrip run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    task: TaskArgs,
    /// Why the task runs (default: the command line, which the audit
    /// records and approvers see, with common forms of secrets masked: the
    /// values of options named for a password, secret or token, a URL's
    /// user information and query, the credentials of an Authorization or
    /// Cookie header, `DB_PASSWORD=...`; give --purpose whenever the
    /// arguments hold a secret: masking cannot know every program's).
    #[arg(long)]
    purpose: Option<String>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

/// The signals `scrip run` handles: each one that was not ignored when it
/// started. One ignored then (`nohup scrip run ...`, or `scrip run ... &`
/// in a script, where the shell ignores SIGINT and SIGQUIT) is left
/// ignored, so the command inherits that as it would without scrip.
struct Signals {
    int: Option<Signal>,
    term: Option<Signal>,
    hup: Option<Signal>,
    quit: Option<Signal>,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        let ignored = ignored_at_start();
        let handle = |kind: SignalKind| {
            let bit = u32::try_from(kind.as_raw_value().saturating_sub(1))
                .ok()
                .and_then(|n| 1_u64.checked_shl(n))
                .unwrap_or(0);
            if ignored & bit != 0 {
                Ok(None)
            } else {
                signal(kind).map(Some)
            }
        };
        Ok(Self {
            int: handle(SignalKind::interrupt())?,
            term: handle(SignalKind::terminate())?,
            hup: handle(SignalKind::hangup())?,
            quit: handle(SignalKind::quit())?,
        })
    }

    /// The next signal.
    async fn recv(&mut self) -> rustix::process::Signal {
        use rustix::process::Signal as S;
        async fn next(s: &mut Option<Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = next(&mut self.int) => S::INT,
            () = next(&mut self.term) => S::TERM,
            () = next(&mut self.hup) => S::HUP,
            () = next(&mut self.quit) => S::QUIT,
        }
    }

    /// A signal that already arrived, without waiting.
    async fn pending(&mut self) -> Option<rustix::process::Signal> {
        tokio::select! {
            biased;
            s = self.recv() => Some(s),
            () = std::future::ready(()) => None,
        }
    }
}

/// The signals this process ignores, as a mask (bit `n - 1` for signal
/// `n`), read from `/proc/self/status` before any handler is installed;
/// none when it cannot be read.
fn ignored_at_start() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("SigIgn:"))
                .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// The signal `scrip run` ends by, once everything is written (see
/// [`end_by_signal`]); 0 for none.
static ENDS_BY: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Notes that `scrip run` should end by `sig`, when that is a signal whose
/// default action ends a process without a core dump (a SIGQUIT or SIGKILL
/// is reported as 128+n only).
fn ends_by(sig: i32) {
    use rustix::process::Signal as S;
    if [S::INT, S::TERM, S::HUP, S::PIPE]
        .iter()
        .any(|s| s.as_raw() == sig)
    {
        ENDS_BY.store(sig, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Ends this process by the signal its command died of, or that stopped
/// `scrip run` before the command ran, as the command would have ended
/// without scrip: a shell stops a script or loop for a command that *died*
/// of SIGINT, not for one that exited 130. Called last, after the runtime
/// is gone and every line is written; returns when there is no such
/// signal.
pub fn end_by_signal() {
    use std::io::Write as _;
    let sig = ENDS_BY.load(std::sync::atomic::Ordering::Relaxed);
    // A namespace's first process (`scrip run` as a container's entry
    // point) cannot die of a signal it sends itself: the kernel drops it,
    // and the emulation would end in an abort. It exits 128+n instead.
    if sig != 0 && rustix::process::getpid() != rustix::process::Pid::INIT {
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // Restores the default action, unblocks the signal and raises it.
        let _ = signal_hook::low_level::emulate_default_handler(sig);
    }
}

/// The exit code of a process ended by `sig`, as shells report it; see
/// [`end_by_signal`].
fn signal_code(sig: rustix::process::Signal) -> ExitCode {
    ends_by(sig.as_raw());
    ExitCode::from(u8::try_from(128 + sig.as_raw()).unwrap_or(1))
}

/// Runs `scrip run`.
pub fn run(args: RunArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    runtime.block_on(run_async(args))
}

async fn run_async(args: RunArgs) -> ExitCode {
    let mut signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot handle signals: {e}")),
    };
    let client = match Client::new(&args.task.server) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let command_line = shown_command(&args.command);
    let purpose = args.purpose.clone().unwrap_or_else(|| {
        // A purpose is one line of visible text: newlines and tabs in the
        // arguments (`sh -c $'a\nb'`) and invisible characters (the joiners
        // and variation selectors of an emoji), which scrip refuses in a
        // purpose, become spaces.
        let mut p: String = format!("scrip run {command_line}")
            .chars()
            .map(|c| if scrip_token::is_deceptive(c) { ' ' } else { c })
            .collect();
        if p.len() > 200 {
            let mut end = 200;
            while !p.is_char_boundary(end) {
                end -= 1;
            }
            p.truncate(end);
        }
        p
    });
    let request = args.task.request(purpose);

    // Nothing is started yet: an interrupt here just exits.
    let identity = tokio::select! {
        r = args.task.identity() => match r {
            Ok(i) => i,
            Err(e) => return fail(e),
        },
        s = signals.recv() => return signal_code(s),
    };
    // Not cancelled by a signal: a task created server-side must be known
    // here so that it can be ended.
    let task = match client.start_task(&identity, &request).await {
        Ok(t) => t,
        Err(e) => return fail(format!("cannot start the task: {}", explain(&e))),
    };
    say_left_out(&request, &task);
    let cache = FileCache::default_location();
    // On every way out, a signal stops the retries of ending the task.
    if let Some(s) = signals.pending().await {
        end_task_unless_interrupted(&client, task, cache.as_ref(), &mut signals).await;
        return signal_code(s);
    }

    let Some((program, program_args)) = args.command.split_first() else {
        end_task_unless_interrupted(&client, task, cache.as_ref(), &mut signals).await;
        return fail("no command given after `--`");
    };
    // Attested and its task started: from here on nothing needs to read
    // this process, and its command must not (its parent's environment
    // holds what it is not given).
    crate::not_dumpable();
    let mut child = match crate::child_command(program)
        .args(program_args)
        .env("SCRIP_URL", client.url())
        .env("SCRIP_TASK_TOKEN", task.token())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            end_task_unless_interrupted(&client, task, cache.as_ref(), &mut signals).await;
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            let _ = fail(format!("cannot run `{}`: {e}", program.to_string_lossy()));
            return ExitCode::from(code);
        }
    };

    let status = supervise(&mut child, &mut signals).await;
    let ended = end_task_unless_interrupted(&client, task, cache.as_ref(), &mut signals).await;
    let code = match status {
        Ok(status) => exit_code(status),
        Err(e) => {
            let _ = fail(format!("lost track of the command: {e}"));
            ExitCode::FAILURE
        }
    };
    if ended || code != ExitCode::SUCCESS {
        code
    } else {
        ExitCode::FAILURE
    }
}

/// Waits for the child, forwarding signals; after the first forwarded one,
/// the child has [`GRACE`] to exit before it is killed. A Ctrl-C (or
/// Ctrl-\\) at the terminal reached the child already, from the terminal:
/// it is neither forwarded nor timed, since an interactive command (a shell,
/// a REPL) may take it as "stop this step", not "exit".
async fn supervise(
    child: &mut tokio::process::Child,
    signals: &mut Signals,
) -> std::io::Result<std::process::ExitStatus> {
    let pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(rustix::process::Pid::from_raw);
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let kill_at = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            status = child.wait() => return status,
            sig = signals.recv() => {
                if matches!(sig, rustix::process::Signal::INT | rustix::process::Signal::QUIT)
                    && terminal_delivered_it(pid)
                {
                    continue;
                }
                if let Some(pid) = pid {
                    let _ = rustix::process::kill_process(pid, sig);
                }
                deadline.get_or_insert_with(|| tokio::time::Instant::now() + GRACE);
            }
            () = kill_at => {
                let _ = child.start_kill();
                deadline = None;
            }
        }
    }
}

/// Whether a SIGINT (or SIGQUIT) came from the terminal, which already sent
/// it to the child too (same foreground process group): forwarding it again
/// would deliver it twice. A child that left the group (`setsid`,
/// `setpgid`) did not get it, and is sent it. The terminal is found
/// through whichever of standard input, output and error is one, else the
/// controlling terminal itself (`scrip run ... < prompt.txt` still runs in
/// one).
fn terminal_delivered_it(child: Option<rustix::process::Pid>) -> bool {
    let Some(fg) = foreground_group() else {
        return false;
    };
    fg == rustix::process::getpgrp()
        && child.is_none_or(|pid| rustix::process::getpgid(Some(pid)).is_ok_and(|g| g == fg))
}

/// The foreground process group of this process's terminal, if it has one.
fn foreground_group() -> Option<rustix::process::Pid> {
    use rustix::fs::{Mode, OFlags};
    if let Some(fg) = [
        rustix::termios::tcgetpgrp(std::io::stdin()),
        rustix::termios::tcgetpgrp(std::io::stdout()),
        rustix::termios::tcgetpgrp(std::io::stderr()),
    ]
    .into_iter()
    .find_map(Result::ok)
    {
        return Some(fg);
    }
    let tty = rustix::fs::open(
        "/dev/tty",
        OFlags::RDONLY | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    rustix::termios::tcgetpgrp(&tty).ok()
}

fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt as _;
    if let Some(code) = status.code() {
        return ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1));
    }
    match status.signal() {
        Some(sig) => {
            ends_by(sig);
            ExitCode::from(u8::try_from(128 + sig).unwrap_or(1))
        }
        None => ExitCode::FAILURE,
    }
}

/// How long after the command's end a signal is taken for the one it ended
/// with (a Ctrl-C reaches scrip too, and may be seen just after the
/// command's exit), not for a request to stop ending the task.
const SAME_SIGNAL: Duration = Duration::from_secs(1);

/// [`end_task`], which retries for a while against a scrip that does not
/// answer; a signal then (a second Ctrl-C, a stop) gives up at once.
async fn end_task_unless_interrupted(
    client: &Client,
    task: Task,
    cache: Option<&FileCache>,
    signals: &mut Signals,
) -> bool {
    let started = tokio::time::Instant::now();
    let ending = end_task(client, task, cache);
    tokio::pin!(ending);
    loop {
        tokio::select! {
            ended = &mut ending => return ended,
            _ = signals.recv() => {
                if started.elapsed() >= SAME_SIGNAL {
                    let _ = fail("interrupted while ending the task; it ends by itself at its deadline");
                    return false;
                }
            }
        }
    }
}

/// Ends the task, retrying briefly; reports and returns `false` if it could
/// not (the task then ends by itself at its deadline).
async fn end_task(client: &Client, task: Task, cache: Option<&FileCache>) -> bool {
    let token = task.into_token();
    let mut last = None;
    for attempt in 0..END_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(300 * u64::from(attempt))).await;
        }
        match client.revoke(&token).await {
            Ok(()) => {
                last = None;
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    // After the revocation, not before: a `scrip token` the command left
    // running could otherwise put a fresh token back in the cache between
    // the two, to be served after the task ended.
    if let Some(c) = cache {
        c.remove_task(&token);
    }
    if let Some(e) = last {
        let _ = fail(format!(
            "could not end the task ({e}); it ends by itself at its deadline"
        ));
        return false;
    }
    true
}

/// The grants asked for that the task does not hold, as they would be in
/// its scope: none when the server named no scope, or a grant does not
/// parse (the server took it, so it is not one the CLI can judge).
fn left_out(asked: &[String], scope: Option<&str>) -> Vec<String> {
    let (Some(scope), Ok(asked)) = (scope, scrip_token::GrantSet::parse(&asked.join(" "))) else {
        return Vec::new();
    };
    let Ok(held) = scrip_token::GrantSet::parse(scope) else {
        return Vec::new();
    };
    asked
        .iter()
        .filter(|g| !held.contains(g))
        .map(ToString::to_string)
        .collect()
}

/// Says on standard error which grants asked for the task does not hold:
/// a task starts with those policy permits, and the rest are left out
/// without an error (the audit trail's `task.grant` records say why). A
/// standard error that cannot be written to is no reason to stop: the
/// task has started.
pub(crate) fn say_left_out(request: &scrip_client::TaskRequest, task: &scrip_client::Task) {
    use std::io::Write as _;
    let left = left_out(&request.grants, task.scope());
    if !left.is_empty() {
        let _ = writeln!(
            std::io::stderr().lock(),
            "scrip: the task does not hold {}: policy refused {} for this task (its `task.grant` audit records say which policy, and why); it holds {}",
            left.join(" "),
            if left.len() == 1 { "it" } else { "them" },
            task.scope().unwrap_or_default()
        );
    }
}

/// An identity from `file`, else from `SCRIP_IDENTITY`, else from local
/// attestation on `socket`: how every command that acts as someone finds out
/// who.
pub(crate) async fn load_identity(
    file: Option<&std::path::Path>,
    socket: &std::path::Path,
) -> Result<Identity, String> {
    if let Some(file) = file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read the identity file `{}`: {e}", file.display()))?;
        return Identity::from_jwt(&text)
            .map_err(|e| format!("identity file `{}`: {e}", file.display()));
    }
    if let Some(token) = std::env::var_os("SCRIP_IDENTITY").filter(|t| !t.is_empty()) {
        return Identity::from_jwt(&token.to_string_lossy())
            .map_err(|e| format!("SCRIP_IDENTITY: {e}"));
    }
    scrip_client::attest(socket)
        .await
        .map_err(|e| e.to_string())
}

/// An error, with what to do about the common refusals.
pub(crate) fn explain(e: &Error) -> String {
    let hint = match e.oauth_code() {
        Some("invalid_scope") => {
            "; check each --grant against the tools and actions in scrip's configuration"
        }
        Some("access_denied") => "; no policy allows these grants for this workload here",
        // The identity is the subject token; other invalid requests (an
        // environment not configured, a purpose scrip refuses) say what
        // is wrong themselves.
        Some("invalid_request") if matches!(e, Error::OAuth { description, .. } if description.starts_with("subject_token")) => {
            "; check the identity (is it expired or from an untrusted issuer?)"
        }
        _ => "",
    };
    format!("{e}{hint}")
}

#[cfg(test)]
mod purpose_tests {
    use super::*;

    fn shown(args: &[&str]) -> String {
        let args: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
        shown_command(&args)
    }

    #[test]
    fn plain_secrets_in_the_command_line_are_masked() {
        for (args, expected) in [
            (&["git", "push"][..], "git push"),
            (
                &["psql", "postgres://app:S3cret@db:5432/x?sslmode=require"][..],
                "psql postgres://app:***@db:5432/x?***",
            ),
            (
                &["psql", "host=db password=S3cret"][..],
                "psql host=db password=***",
            ),
            (
                &["curl", "https://api.example/v1/items?api_key=abc&x=1"][..],
                "curl https://api.example/v1/items?***",
            ),
            (
                &["git", "clone", "https://ghp_abc@github.com/o/r"][..],
                "git clone https://***@github.com/o/r",
            ),
            (
                &["curl", "https://example.org/a#b"][..],
                "curl https://example.org/a#b",
            ),
            (
                &["tool", "--token", "abc", "--verbose"][..],
                "tool --token *** --verbose",
            ),
            (&["tool", "-password", "abc"][..], "tool -password ***"),
            (
                &["tool", "--access-token", "abc"][..],
                "tool --access-token ***",
            ),
            (&["tool", "--Password=abc"][..], "tool --Password=***"),
            (
                &["tool", "--password", "correct horse"][..],
                "tool --password ***",
            ),
            (
                &["tool", "--token-file", "/run/t"][..],
                "tool --token-file /run/t",
            ),
            (
                &["tool", "--token-file=/run/t"][..],
                "tool --token-file=/run/t",
            ),
            (
                &["psql", "--no-password", "-h", "db"][..],
                "psql --no-password -h db",
            ),
            (
                &[
                    "env",
                    "DB_PASSWORD=abc",
                    "GITHUB_TOKEN=x",
                    "API_KEY=k",
                    "MODE=fast",
                ][..],
                "env DB_PASSWORD=*** GITHUB_TOKEN=*** API_KEY=*** MODE=fast",
            ),
            (
                &["sh", "-c", "mysql --password=x -u root db"][..],
                "sh -c mysql --password=*** -u root db",
            ),
            (
                &["sh", "-c", "curl -H 'Authorization: Bearer x' h"][..],
                "sh -c curl -H 'Authorization: Bearer *** ***",
            ),
            (
                &[
                    "curl",
                    "-H",
                    "Authorization: Bearer eyJabc",
                    "-H",
                    "Accept: text/plain",
                ][..],
                "curl -H Authorization: Bearer *** -H Accept: text/plain",
            ),
            (&["curl", "-HX-Api-Key: k1"][..], "curl -HX-Api-Key: ***"),
            (
                &["curl", "-H", "Cookie: a=1; b=2"][..],
                "curl -H Cookie: *** ***",
            ),
            (
                &["curl", "-H", "authorization:Basic abc"][..],
                "curl -H authorization:*** ***",
            ),
            (
                &["wget", "--header=Authorization: Bearer sk-1", "u"][..],
                "wget --header=Authorization: Bearer *** u",
            ),
            (
                &["curl", "-u", "alice:pw", "https://h"][..],
                "curl -u alice:*** https://h",
            ),
            (&["curl", "--user=alice:pw"][..], "curl --user=alice:***"),
            (&["mysql", "-pS3cret", "db"][..], "mysql -p*** db"),
            (
                &["sshpass", "-p", "S3cret", "ssh", "h"][..],
                "sshpass -p *** ssh h",
            ),
            // What an approver must see is not masked.
            (
                &["sudo", "-u", "root", "rm", "-rf", "/x"][..],
                "sudo -u root rm -rf /x",
            ),
            (
                &["pip", "install", "--user", "pkg"][..],
                "pip install --user pkg",
            ),
            (&["find", ".", "-print"][..], "find . -print"),
            (
                &["docker", "run", "-p", "22:22", "img"][..],
                "docker run -p 22:22 img",
            ),
            (
                &["ssh", "-o", "StrictHostKeyChecking=no", "h"][..],
                "ssh -o StrictHostKeyChecking=no h",
            ),
            (
                &[
                    "aws",
                    "secretsmanager",
                    "get-secret-value",
                    "--secret-id",
                    "prod/db",
                ][..],
                "aws secretsmanager get-secret-value --secret-id prod/db",
            ),
            (
                &["git", "commit", "--author", "Eve <e@x>"][..],
                "git commit --author Eve <e@x>",
            ),
            (&["llm", "--max-tokens=100"][..], "llm --max-tokens=100"),
        ] {
            assert_eq!(shown(args), expected, "{args:?}");
        }
    }
}

#[cfg(test)]
mod left_out_tests {
    use super::left_out;

    #[test]
    fn the_grants_asked_for_and_not_held_are_named_once() {
        let asked = |g: &[&str]| g.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            left_out(
                &asked(&["github:read github:write", "jira:write"]),
                Some("github:read")
            ),
            ["github:write", "jira:write"]
        );
        assert!(left_out(&asked(&["github:read"]), Some("github:read")).is_empty());
        assert_eq!(
            left_out(&asked(&["github:write", "github:write"]), Some("jira:read")),
            ["github:write"]
        );
        // Without a scope, or with what the CLI cannot parse, it says
        // nothing rather than something wrong.
        assert!(left_out(&asked(&["github:write"]), None).is_empty());
        assert!(left_out(&asked(&["not a grant"]), Some("github:read")).is_empty());
    }
}
