//! The `scrip` binary: parses the command line, dispatches to the library
//! crates and maps their errors to exit codes. No logic lives here.
//!
//! Exit codes: 0 success, 1 failure (a refused configuration, a failed policy
//! test, a server error), 2 a usage error (from clap); `scrip token
//! --no-wait` exits 75 while a step waits for a person, and `scrip run` with
//! its command's code (126 cannot run, 127 not found), or dies of the signal
//! its command died of (SIGINT, SIGTERM, SIGHUP, SIGPIPE; 128 + another, and
//! 128 + any as a PID namespace's first process).

/// Prints a line on standard output, as `println!` does, but never panics:
/// once standard output is closed (`| head`) the rest is dropped, and the
/// command exits 141, as one killed by SIGPIPE would (Rust ignores SIGPIPE,
/// so the write fails instead).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::write_out(format_args!($($arg)*))
    };
}

mod approve;
mod audit;
mod key;
mod log;
mod proxy;
mod run;
mod secret;
mod task;
mod token;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use scrip_config::Config;
use scrip_policy::PolicyEngine;

/// mimalloc instead of glibc's allocator: the request path allocates many
/// small, short-lived values across threads, where glibc spent about a
/// tenth of the server's CPU in `malloc` and `free`; with mimalloc, exchanges
/// and task starts are 30-50 % faster (BENCHMARKS.md). Built without
/// transparent huge pages (`no_thp`), which kept 2 MiB pages resident and
/// put idle RSS past 50 MB.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// scrip: a credential broker for AI agents.
///
/// Agents prove which workload they are with a federated identity, open a
/// task, and exchange it (OAuth 2.0 Token Exchange) for access tokens that
/// live minutes, name one tool and a narrow set of actions, and die when the
/// task ends. A Cedar policy decides every exchange.
#[derive(Debug, Parser)]
#[command(
    name = "scrip",
    version,
    propagate_version = true,
    after_long_help = "Exit status: 0 on success; 1 when the command failed (the reason is on standard error); 2 for a usage error; 141 when whatever read standard output closed it. Commands say in their own help when they use others (`scrip run`: the command's; `scrip token`: 75 when a step waits for a person)."
)]
struct Cli {
    /// Log format on standard error. `serve` and `proxy` log from `info`
    /// up, every other command its warnings only; SCRIP_LOG sets the level
    /// (for example `SCRIP_LOG=debug`).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "SCRIP_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the token service.
    ///
    /// Without --config it runs on defaults: listens on 127.0.0.1:7070, keeps
    /// its store and signing key in ./.scrip and reads policies from
    /// ./policies. The signing key is created on first start (mode 0600).
    /// SIGHUP, or a change in the policy directory, reloads the policies; an
    /// invalid set is refused and the last good one kept. Log verbosity
    /// follows SCRIP_LOG (for example `SCRIP_LOG=debug`). SIGTERM or SIGINT
    /// stops it: requests at work get up to 35 s to finish (a second signal
    /// stops waiting for them, a third exits at once, with status 1), and
    /// what was committed stays.
    Serve {
        /// The configuration file (TOML). See docs/configuration.md.
        #[arg(long, short, env = "SCRIP_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Run a command inside a task that ends when it exits.
    ///
    /// Obtains an identity (local attestation on scrip's socket, or a
    /// federated identity from --identity-file or SCRIP_IDENTITY), starts a
    /// task with the given grants, and runs COMMAND with SCRIP_URL and
    /// SCRIP_TASK_TOKEN set (so `scrip token` works inside it). When COMMAND
    /// exits, however it exits, the task is ended. SIGINT, SIGTERM, SIGHUP and SIGQUIT
    /// are forwarded to it (one ignored when scrip run started, as under
    /// nohup, stays ignored), and it gets 5 s (--grace) to exit; a Ctrl-C typed at the
    /// terminal reaches it directly and is left to it. The exit code is COMMAND's; when SIGINT,
    /// SIGTERM, SIGHUP or SIGPIPE killed it (or stopped scrip run before it
    /// ran), scrip run dies of the same signal, so a shell script or loop
    /// stops on a Ctrl-C (128+signal for another signal, and for any as a
    /// PID namespace's first process, a container's entry point, which
    /// cannot die of its own signal). 127 when COMMAND is
    /// not found, 126 when it cannot be run, and 1 when COMMAND succeeded but
    /// the task could not be ended.
    /// COMMAND never inherits SCRIP_IDENTITY, SCRIP_KEY_ENCRYPTION_KEY or
    /// SCRIP_PREVIOUS_KEY_ENCRYPTION_KEY.
    Run(run::RunArgs),
    /// Print an access token of the current task (SCRIP_TASK_TOKEN).
    ///
    /// For shells and credential helpers, keeping the token off any command
    /// line (which other local users can read): `scrip token --tool github
    /// --action read | sed 's/^/Authorization: Bearer /' | curl -H @- ...`.
    /// Tokens are cached privately and reused until shortly before they
    /// expire.
    ///
    /// When policy says a person must approve the step, it waits for their
    /// decision (an approver runs `scrip approve <auth_req_id>`) and prints
    /// the step's single-use token. Exit codes: 0 a token was printed; 75 the
    /// step waits for a person and --no-wait was given; 1 anything else
    /// (refused, denied, expired, scrip unreachable).
    Token(token::TokenArgs),
    /// Start, end and list tasks (`scrip run` starts and ends one around a
    /// command).
    Task {
        #[command(subcommand)]
        command: task::TaskCommand,
    },
    /// Check and test Cedar policies.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Ask scrip whether a token is active (RFC 7662 introspection).
    ///
    /// Reads the token from standard input (`scrip introspect < token.txt`)
    /// and prints scrip's answer: the token's claims with `"active": true`,
    /// or exactly `{"active":false}`; both exit 0, so read the answer, not
    /// the exit status. You are identified by your workload identity
    /// (--identity-file or SCRIP_IDENTITY, or local attestation on scrip's
    /// host); any identity from a trusted issuer may ask, but a tool that
    /// lists `introspectors` has its access tokens shown active to those
    /// alone, and a task token is shown active to its agent and the
    /// sub-agents in its chain alone (to anyone else, `{"active":false}`
    /// whatever their state).
    ///
    /// A single-use token (an approved step's) is spent by its first
    /// introspection, as by its first use: introspecting it yourself leaves
    /// the resource server an inactive token, and the step to approve again.
    ///
    /// There is no argument that takes the token: on the command line it
    /// would be visible to every local user in the process list, and stay
    /// in shell history.
    Introspect {
        #[command(flatten)]
        approver: approve::ApproverArgs,
    },
    /// List the steps waiting for a person's approval.
    ///
    /// Shows, for each, everything asked: the agent, the task and its
    /// purpose, the environment, the tool and actions, the delegation chain.
    /// You are identified by your identity token (--identity-file or
    /// SCRIP_IDENTITY) or, on scrip's host, by local attestation of your uid;
    /// you must be one of the configuration's [[approvers]].
    Approvals {
        #[command(flatten)]
        approver: approve::ApproverArgs,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Approve a pending step: the agent then gets one single-use token for
    /// exactly that step.
    ///
    /// Shows the step (agent, task purpose, environment, tool, actions,
    /// delegation chain) and asks you to confirm it in the terminal; the
    /// approval applies only to the step shown. The id usually reaches you
    /// through the agent that asks: read what it is for before approving.
    Approve {
        /// The approval id (auth_req_id), from `scrip approvals` (it may
        /// start with `-`).
        #[arg(allow_hyphen_values = true)]
        id: String,
        /// Approve without asking (for scripts): the step is still shown,
        /// and the approval still applies only to it.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        approver: approve::ApproverArgs,
    },
    /// Deny a pending step.
    Deny {
        /// The approval id (auth_req_id), from `scrip approvals` (it may
        /// start with `-`).
        #[arg(allow_hyphen_values = true)]
        id: String,
        /// Why: the agent sees it.
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        approver: approve::ApproverArgs,
    },
    /// Apply the store's schema migrations and exit.
    ///
    /// `scrip serve`, `scrip proxy`, `scrip secret set` and `rotate` apply
    /// them too at start (a newer scrip running one of those beside an
    /// older server upgrades the schema under it); run this first when
    /// replicas on a shared PostgreSQL store (database_url) should start on
    /// a schema that is already current. On the embedded store it creates
    /// or upgrades `<data_dir>/scrip.db`.
    Migrate {
        /// The configuration file (to find the store).
        #[arg(long, short, env = "SCRIP_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Replace scrip's own keys after a leak: the signing keys (`withdraw`),
    /// the key-encryption key (`reseal`).
    ///
    /// These write to the configuration's store (PostgreSQL with
    /// database_url, else the one in data_dir) and work while the server
    /// runs. See docs/incident-response.md.
    Key {
        /// The configuration file (to find the store and the key-encryption
        /// key).
        #[arg(long, short, global = true, env = "SCRIP_CONFIG")]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Manage the static keys the proxy injects for legacy upstreams.
    ///
    /// These read and write the configuration's store (PostgreSQL with
    /// database_url, else the one in data_dir) and work while the server
    /// runs.
    Secret {
        /// The configuration file (its [[upstreams]] and data_dir).
        #[arg(long, short, global = true, env = "SCRIP_CONFIG")]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: SecretCommand,
    },
    /// Run the legacy bridge on its own, in front of the configuration's
    /// [[upstreams]].
    ///
    /// Listens on [proxy] listen (default 127.0.0.1:7071) for
    /// /proxy/<upstream>/<path>; trusts the scrip at [proxy] issuer
    /// (default: the configuration's issuer), discovered through its
    /// metadata; follows its revocation feed presenting the workload
    /// identity in [proxy] identity_file. Secrets, tasks and the audit
    /// record are in the configuration's store. Policies reload on SIGHUP
    /// and when a file in policy_dir changes. SIGTERM or SIGINT stops it as
    /// it stops `scrip serve`. `scrip serve` mounts the same
    /// proxy itself when [[upstreams]] are configured. See docs/proxy.md.
    Proxy {
        /// The configuration file (TOML).
        #[arg(long, short, env = "SCRIP_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Verify, query and export the audit trail.
    ///
    /// These read the store of the configuration (database_url, else the
    /// embedded store in data_dir) and work while the server runs.
    Audit {
        /// The configuration file (to find the store).
        #[arg(long, short, global = true, env = "SCRIP_CONFIG")]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: AuditCommand,
    },
}

/// What `scrip key` does.
#[derive(Debug, clap::Subcommand)]
enum KeyCommand {
    /// Withdraw every signing key now; a new one signs.
    ///
    /// With database_url (a shared key set): a new key signs from now on and
    /// every other signing key leaves the published set at once, whatever
    /// it signed, so every task and access token signed before is refused
    /// (tasks must be started again). Every replica follows at once where
    /// PostgreSQL's notification arrives, within 5 s otherwise;
    /// scrip-verifier resource servers drop the old keys when they fetch the
    /// key set again: on the first token of the new key they see, or at
    /// their next refresh (jwks_refresh, 5 min by default). Audited
    /// (`key.created`, `key.withdrawn`, with --reason). Prints the keys
    /// withdrawn and the one that signs. On the embedded store the key is a
    /// file: the command refuses (exit 1), naming the file to move away
    /// with scrip stopped.
    Withdraw {
        /// Why, for the audit trail (an incident).
        #[arg(long)]
        reason: String,
    },
    /// Seal everything the store keeps sealed again under a new
    /// key-encryption key.
    ///
    /// The store keeps the proxy's upstream keys and, with database_url,
    /// the shared signing and checkpoint keys sealed under the
    /// key-encryption key. To replace that key (one that leaked, or on a
    /// schedule):
    ///
    /// 1. Make a new key: `(umask 077; head -c 32 /dev/urandom | base64 >
    ///    new.key)`.
    ///
    /// 2. Give every replica (and `scrip proxy`, and wherever other scrip
    ///    commands run) the new key as key_encryption_key_file (or
    ///    SCRIP_KEY_ENCRYPTION_KEY) and the old one as
    ///    previous_key_encryption_key_file (or
    ///    SCRIP_PREVIOUS_KEY_ENCRYPTION_KEY), and restart each: they open
    ///    values sealed under either and seal new ones under the new key.
    ///    Each start logs both keys' fingerprints: check that every replica
    ///    logs the same new one.
    ///
    /// 3. Run `scrip key reseal --reason TEXT` with that configuration: each
    ///    value only the old key opens is sealed again under the new one, in
    ///    one commit, audited (`kek.resealed`). It prints what it sealed
    ///    again and the new key's fingerprint. If a key or a secret's
    ///    current version opens under neither key (this host may hold
    ///    another new key than the replicas), it writes nothing and exits 1;
    ///    a replaced version that opens under neither is left as it was,
    ///    and said so.
    ///
    /// 4. Run it again: only once it seals nothing more, remove the old key
    ///    from every replica's configuration, restart them one at a time,
    ///    and destroy it.
    ///
    /// Running it again does nothing once all is sealed under the new key.
    /// Against someone who also holds a copy of the store taken before,
    /// follow it with `scrip key withdraw` and `scrip secret rotate`: the
    /// copy holds the old values.
    Reseal {
        /// Why, for the audit trail (an incident, a schedule).
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
enum SecretCommand {
    /// Store the static key an upstream's proxied requests of one action
    /// class carry.
    ///
    /// The value is read from standard input (typed without echo on a
    /// terminal, where Ctrl-C cancels, or piped: `vault read ... | scrip
    /// secret set legacy --action read`); there is no flag that takes it. One trailing newline is
    /// dropped; an empty value is refused. It is sealed (AES-256-GCM) under
    /// the key-encryption key: SCRIP_KEY_ENCRYPTION_KEY, else
    /// key_encryption_key_file (default <data_dir>/keys/key-encryption.key,
    /// created on first use, mode 0600). Setting
    /// a secret that exists makes a new version, like `rotate`.
    Set {
        /// The upstream (its [[upstreams]] name).
        name: String,
        /// The action class this key serves (`read`, `write`, ...).
        #[arg(long)]
        action: String,
    },
    /// List the stored secrets: names, actions, versions, ages and state,
    /// never values.
    ///
    /// A state is `current`, `retiring` (replaced, within its grace period),
    /// or `retired`; `OVERDUE` marks a current version older than its
    /// max_age.
    List {
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Swap in a new version of a secret; the previous one stays stored for
    /// the configured grace period.
    ///
    /// The new value comes from the secret's mint_command (run without a
    /// shell; it prints the value on standard output) when one is
    /// configured, else from standard input. Without --action, every action
    /// of NAME is rotated, which needs a mint_command for each. The proxy
    /// injects the new version within 2 seconds.
    Rotate {
        /// The upstream.
        name: String,
        /// Only this action class.
        #[arg(long)]
        action: Option<String>,
    },
    /// Delete every stored version of a secret.
    ///
    /// For an upstream taken out of service, or a key revoked at its
    /// provider that must not be injected again. Without --action, every
    /// action of NAME goes. The proxy stops injecting it within 2 seconds:
    /// requests that need it are refused (503) until `scrip secret set`.
    /// Redaction of a deleted key in upstream answers stops with it, so
    /// revoke it at the provider first. NAME need not be configured any
    /// more. Audited (`secret.deleted`); exits 1 when nothing of NAME is
    /// stored.
    Delete {
        /// The upstream.
        name: String,
        /// Only this action class.
        #[arg(long)]
        action: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the hash chains and signed checkpoints of the audit trail.
    ///
    /// Detects an edited, deleted, inserted, reordered or truncated record
    /// and names it, and records older than the signing grace (two
    /// audit_checkpoint_interval and a minute) that no signature covers (rewritten with their signatures deleted). Exits
    /// 0 when everything verifies, 1 otherwise.
    ///
    /// scrip signs each commit's records as it writes them. Records that
    /// carry no signature of their writer (an older scrip that crashed
    /// before signing, a `scrip secret`, `scrip key` or `scrip task revoke`
    /// command that warned it could not sign, records someone else added,
    /// or whose signatures and the
    /// records after them someone deleted) but that a later process's
    /// signed start links are vouched for only by that start, which proves
    /// they existed then, not who wrote them: they are listed, and fail the
    /// check with --strict. Records a running scrip had committed and the
    /// store no longer holds (it was rolled back under it: a failover to a
    /// standby that had not received them, a backup restored in place, or
    /// someone deleting a live chain's tail) are named by the next chain
    /// that scrip started, and fail the check unless that chain found them
    /// at or before --allow-rolled-back-before. The report names the checkpoint keys it
    /// trusted; compare them with a copy of /audit/keys kept elsewhere, or
    /// pass that copy as --public-key.
    Verify {
        /// The checkpoint public key (a JWK or JWKS, as served at
        /// /audit/keys); default: with database_url, the shared checkpoint
        /// keys in the store, which takes the key-encryption key to open,
        /// else derived from the private key file in data_dir. An auditor
        /// without either passes a copy of /audit/keys here (never the
        /// key-encryption key, which opens every secret).
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// Also fail (exit 1) on records their own writer never signed,
        /// reading the trail twice when the first reading finds recent
        /// records unsigned: scrip signs as it writes, so each must be
        /// signed by the second.
        #[arg(long)]
        strict: bool,
        /// Pass although the store was rolled back under a running scrip
        /// and lost records it had committed, for the losses found at or
        /// before this time (RFC 3339 with its zone, e.g. the latest `found
        /// at` the report printed for the losses you know; not a duration,
        /// which would move on with each run; every loss is listed either
        /// way): once you know those were a failover or a restore, and
        /// re-applied what was lost with them. A loss found since still
        /// fails.
        #[arg(long, value_parser = audit::parse_instant, value_name = "TIME")]
        allow_rolled_back_before: Option<u64>,
    },
    /// Show audit records, filtered, as a table or JSON lines.
    Query(Box<audit::QueryArgs>),
    /// Stream audit records as JSON lines from a cursor, for a SIEM.
    ///
    /// Each line has a `seq`; pass the last one seen as --after to resume.
    /// A line is the record exactly as hashed with `seq` and `hash` put
    /// first, so a copy kept elsewhere can be checked. A damaged record is
    /// exported as a string under `unreadable_record`, noted on stderr, and
    /// the export goes on (without --follow it then exits 1).
    Export {
        /// Only records after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// Keep waiting for new records.
        #[arg(long)]
        follow: bool,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate the policies and schema of a directory.
    ///
    /// Parses every *.cedar file and the *.cedarschema file (or the built-in
    /// schema), validates the policies against the schema, and with --config
    /// also checks that every configured tool action is declared.
    Check {
        /// The policy directory.
        dir: PathBuf,
        /// Also check the tools of this configuration (never taken from
        /// SCRIP_CONFIG: what is checked is the directory named).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run a file of request → expected decision cases.
    ///
    /// Exits 1 if any case gets another decision than expected. The file
    /// format is described in docs/policy-tests.md.
    Test {
        /// The test file (TOML).
        file: PathBuf,
        /// The policy directory (default: the configuration's, else ./policies).
        #[arg(long, short)]
        policies: Option<PathBuf>,
        /// A configuration whose tools the cases may name (never taken from
        /// SCRIP_CONFIG, whose policy directory would replace ./policies
        /// unnoticed).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

/// Logs to standard error from `level` up (SCRIP_LOG overrides it): the
/// servers log what they do, the other commands warn (a checkpoint that
/// could not be signed, a key-encryption key just created) and say nothing
/// else. A line that cannot be written (standard error on a full disk, or
/// a pipe nobody reads) is dropped: the subscriber would otherwise report
/// it with `eprintln!`, which panics when that write fails too, killing the
/// thread that logged (the store's writer, on its first failed commit).
/// Logs to standard error: for a server (`queued`), through a thread of
/// its own, which the returned [`log::Lines`] waits for at exit.
/// Set when the log is JSON lines: [`fail`] says why in one too.
static JSON_LOG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn init_logging(format: LogFormat, level: &str, queued: bool) -> Option<log::Lines> {
    JSON_LOG.store(
        matches!(format, LogFormat::Json),
        std::sync::atomic::Ordering::Relaxed,
    );
    let filter = tracing_subscriber::EnvFilter::try_from_env("SCRIP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colours only for a person at a terminal, and not when `NO_COLOR` asks
    // for none: a log file or collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .log_internal_errors(false);
    // Without its thread (it could not start), a server logs as the
    // other commands do.
    let lines = queued
        .then(|| log::Lines::start(std::io::stderr(), log::QUEUED).ok())
        .flatten();
    if let Some(lines) = &lines {
        lines.install();
    }
    match (format, lines.clone()) {
        (LogFormat::Text, Some(lines)) => builder.with_writer(lines).init(),
        (LogFormat::Json, Some(lines)) => builder.json().with_writer(lines).init(),
        (LogFormat::Text, None) => builder.with_writer(std::io::stderr).init(),
        (LogFormat::Json, None) => builder.json().with_writer(std::io::stderr).init(),
    }
    lines
}

/// Credentials of scrip's own that a program scrip starts (a `scrip run`
/// command, a `mint_command`) never inherits: the key-encryption key that
/// opens every stored secret (and the one it replaces), and the identity and
/// task tokens of the process that started scrip.
const NOT_INHERITED: [&str; 4] = [
    scrip_server::keys::KEK_ENV,
    scrip_server::keys::PREVIOUS_KEK_ENV,
    "SCRIP_IDENTITY",
    "SCRIP_TASK_TOKEN",
];

/// Keeps this process's memory (keys, secrets, tokens) out of core dumps
/// and away from other processes of its uid, a program it started among
/// them (`ptrace`, `/proc/<pid>/mem`, `/proc/<pid>/environ`, which hold
/// what [`NOT_INHERITED`] keeps from the program's own environment):
/// `PR_SET_DUMPABLE` 0. A program it starts is dumpable again (`execve`
/// resets it).
pub(crate) fn not_dumpable() {
    use rustix::process::{DumpableBehavior, set_dumpable_behavior};
    if let Err(e) = set_dumpable_behavior(DumpableBehavior::NotDumpable) {
        tracing::warn!(error = %e, "cannot keep this process out of core dumps (PR_SET_DUMPABLE)");
    }
}

/// A command for `program` with the rest of scrip's environment but
/// [`NOT_INHERITED`].
pub(crate) fn child_command(program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    for name in NOT_INHERITED {
        cmd.env_remove(name);
    }
    cmd
}

/// Set once a write to standard output failed: later lines are dropped.
static STDOUT_GONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Set when that failure was anything but a closed pipe (a full disk, an
/// I/O error): the command fails with 1, whatever it did.
static STDOUT_BROKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The exit status of a command that succeeded but whose reader closed
/// standard output: 128 + SIGPIPE, what a shell reports for a command a
/// closed pipe killed.
const STDOUT_GONE_EXIT: u8 = 141;

/// Whether a write to standard output has failed.
pub(crate) fn stdout_gone() -> bool {
    STDOUT_GONE.load(std::sync::atomic::Ordering::Relaxed)
}

/// One line on standard output (see `out!`).
#[expect(
    clippy::print_stderr,
    reason = "standard output failed: said on stderr"
)]
pub(crate) fn write_out(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    use std::sync::atomic::Ordering;
    if STDOUT_GONE.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(line).and_then(|()| out.write_all(b"\n")) {
        STDOUT_GONE.store(true, Ordering::Relaxed);
        // A closed pipe is the reader's choice (`| head`): nothing to say.
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            STDOUT_BROKEN.store(true, Ordering::Relaxed);
            eprintln!("scrip: cannot write to standard output: {e}");
        }
    }
}

#[expect(
    clippy::print_stderr,
    reason = "the binary reports fatal errors on stderr"
)]
pub(crate) fn fail(message: impl std::fmt::Display) -> ExitCode {
    // In a JSON log, the reason a command stopped is a JSON line too, as
    // the log's own error events are, so that a pipeline reading the log
    // finds it (a pod crash-looping says why).
    let line = if JSON_LOG.load(std::sync::atomic::Ordering::Relaxed) {
        let event = serde_json::json!({
            "timestamp": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            "level": "ERROR",
            "fields": { "message": message.to_string() },
            "target": "scrip",
        });
        format!("{event}\n")
    } else {
        format!("scrip: {message}\n")
    };
    // A server's goes after its log lines, through their queue: a stalled
    // standard error does not hold up its exit either.
    if !log::say(&line) {
        eprint!("{line}");
    }
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let serves = matches!(cli.command, Command::Serve { .. } | Command::Proxy { .. });
    let lines = init_logging(cli.log_format, if serves { "info" } else { "warn" }, serves);
    // The commands that hold keys, the key-encryption key, proxy secrets or
    // the store's credentials. (Those that attest themselves at scrip's
    // socket must stay readable until they have: `scrip run` turns this on
    // before it starts its command.)
    if serves
        || matches!(
            cli.command,
            Command::Secret { .. }
                | Command::Key { .. }
                | Command::Migrate { .. }
                | Command::Audit { .. }
                | Command::Task {
                    command: task::TaskCommand::Revoke(_) | task::TaskCommand::List { .. },
                }
        )
    {
        not_dumpable();
    }
    if serves {
        // A panic (a bug) is logged as the rest is, in the log's format,
        // naming its thread, with a backtrace when `RUST_BACKTRACE` asks
        // for one; where the log's filter leaves errors out, as before. A
        // request's panic fails that request; a long-lived task's stops
        // the server (see `scrip-vital`).
        let before = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !tracing::enabled!(tracing::Level::ERROR) {
                return before(info);
            }
            let thread = std::thread::current();
            let trace = std::backtrace::Backtrace::capture();
            let trace = (trace.status() == std::backtrace::BacktraceStatus::Captured)
                .then(|| trace.to_string());
            tracing::error!(
                thread = thread.name().unwrap_or("unnamed"),
                backtrace = trace,
                "{info}"
            );
        }));
    }
    // What is queued is written (for up to a second) even when a bug
    // panics out of the command.
    let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| command(cli.command)));
    if let Some(lines) = lines {
        lines.finish(log::FINISH);
    }
    let code = code.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    // A failure the command found (a tampered trail) is said as such; a
    // write that failed (a full disk under `> file`) fails the command; a
    // reader that went away (`| head`) is 141.
    if STDOUT_BROKEN.load(std::sync::atomic::Ordering::Relaxed) {
        ExitCode::FAILURE
    } else if stdout_gone() && code == ExitCode::SUCCESS {
        ExitCode::from(STDOUT_GONE_EXIT)
    } else {
        // `scrip run` ends as its command did: by its signal (else `code`).
        run::end_by_signal();
        code
    }
}

fn command(command: Command) -> ExitCode {
    match command {
        Command::Serve { config } => serve(config.as_deref()),
        Command::Run(args) => run::run(args),
        Command::Token(args) => token::token(&args),
        Command::Policy { command } => policy(command),
        Command::Approvals { approver, json } => approve::list(&approver, json),
        Command::Task { command } => task::task(command),
        Command::Introspect { approver } => approve::introspect(&approver),
        Command::Approve { id, yes, approver } => approve::approve(&approver, &id, yes),
        Command::Deny {
            id,
            reason,
            approver,
        } => approve::deny(&approver, &id, &reason),
        Command::Migrate { config } => audit::migrate(config.as_deref()),
        Command::Key { config, command } => match command {
            KeyCommand::Withdraw { reason } => key::withdraw(config.as_deref(), &reason),
            KeyCommand::Reseal { reason } => key::reseal(config.as_deref(), &reason),
        },
        Command::Secret { config, command } => match command {
            SecretCommand::Set { name, action } => secret::set(config.as_deref(), &name, &action),
            SecretCommand::List { json } => secret::list(config.as_deref(), json),
            SecretCommand::Rotate { name, action } => {
                secret::rotate(config.as_deref(), &name, action.as_deref())
            }
            SecretCommand::Delete { name, action } => {
                secret::delete(config.as_deref(), &name, action.as_deref())
            }
        },
        Command::Proxy { config } => proxy::proxy(config.as_deref()),
        Command::Audit { config, command } => match command {
            AuditCommand::Verify {
                public_key,
                strict,
                allow_rolled_back_before,
            } => audit::verify(
                config.as_deref(),
                public_key.as_ref(),
                audit::Demands {
                    strict,
                    allow_rolled_back_before,
                },
            ),
            AuditCommand::Query(args) => audit::query(config.as_deref(), &args),
            AuditCommand::Export { after, follow } => {
                audit::export(config.as_deref(), after, follow)
            }
        },
    }
}

/// The configuration at `path` (the defaults without one), for a command
/// that trusts what it names (`serve`, `proxy`, `secret rotate`): whoever
/// can change the file decides whom scrip trusts, so it is checked as a
/// trust anchor is.
pub(crate) fn load_trusted(path: Option<&Path>) -> Result<Config, String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    if let Some(path) = path {
        scrip_config::trust::check_configuration(path).map_err(|e| e.to_string())?;
        scrip_config::trust::check_configuration_readers(path, &config)
            .map_err(|e| e.to_string())?;
    }
    Ok(config)
}

/// The configuration and a multi-threaded runtime, for the commands that
/// serve until stopped (`serve`, `proxy`).
pub(crate) fn server_setup(
    config: Option<&Path>,
) -> Result<(Config, tokio::runtime::Runtime), ExitCode> {
    let config = load_trusted(config).map_err(fail)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(format!("cannot start the runtime: {e}")))?;
    Ok((config, runtime))
}

fn serve(config: Option<&Path>) -> ExitCode {
    let (config, runtime) = match server_setup(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let code = runtime.block_on(async {
        let mut stop = Stop::new();
        let server = match stop.starting(scrip_server::Server::bind(config)).await {
            None => return fail("stopped during start-up"),
            Some(Ok(s)) => s.reload_on(stop.take_hangup()),
            Some(Err(e)) => return fail(e),
        };
        if let Ok(addr) = server.local_addr() {
            tracing::info!(%addr, issuer = server.issuer(), "listening");
        }
        let (stopped, hurry) = stop.stages();
        match server.run_until(stopped, hurry).await {
            Ok(()) => stopped_whole(),
            Err(e) => fail(e),
        }
    });
    leave(runtime);
    code
}

/// The exit of a server that stopped without an error of its own: a
/// failure when a long-lived task panicked (see `scrip-vital`).
pub(crate) fn stopped_whole() -> ExitCode {
    match scrip_vital::failed() {
        None => ExitCode::SUCCESS,
        Some(task) => fail(format!(
            "stopped because its {task} task failed (a bug: please report it with the log)"
        )),
    }
}

/// Drops a server's runtime without waiting on its blocking pool: an
/// executable read for attestation that a stalled file system never
/// answers (given up on after its timeout) would otherwise keep the
/// process from exiting. Everything that matters was committed by then.
pub(crate) fn leave(runtime: tokio::runtime::Runtime) {
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
}

/// SIGTERM and SIGINT, taken over when made, not when first awaited: made
/// before start-up, a stop that comes during it (or as soon as the server
/// answers) is graceful (requests drained, the store closed), rather than a kill.
pub(crate) struct Stop {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
    /// Taken over from the start: SIGHUP's default action ends the
    /// process, and one during start-up (a reload while the store or the
    /// revocation feed is slow to answer) must not. Handed to the policy
    /// reloader once up ([`Stop::take_hangup`]), which then answers one
    /// that came during start-up too.
    hangup: Option<tokio::signal::unix::Signal>,
    /// A signal came during start-up.
    pending: bool,
}

impl Stop {
    pub(crate) fn new() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        Self {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
            hangup: signal(SignalKind::hangup()).ok(),
            pending: false,
        }
    }

    /// The SIGHUP listener, for the policy reloader.
    pub(crate) fn take_hangup(&mut self) -> Option<tokio::signal::unix::Signal> {
        self.hangup.take()
    }

    /// The next SIGTERM or SIGINT (never, for one that could not be taken
    /// over: it keeps its default, which ends the process).
    async fn next(&mut self) {
        let term = async {
            match &mut self.term {
                Some(s) => drop(s.recv().await),
                None => std::future::pending().await,
            }
        };
        let int = async {
            match &mut self.int {
                Some(s) => drop(s.recv().await),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = term => {}
            () = int => {}
        }
    }

    /// Runs `start` to its end even when a signal comes (the server then
    /// stops as soon as it has started); a second signal abandons it
    /// (`None`), for a start-up that waits on something that never comes,
    /// such as another process's migration lock.
    pub(crate) async fn starting<T>(
        &mut self,
        start: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        let mut start = std::pin::pin!(start);
        loop {
            tokio::select! {
                out = &mut start => return Some(out),
                () = self.next() => {
                    if self.pending {
                        return None;
                    }
                    self.pending = true;
                    tracing::warn!("stopping once start-up is done; signal again to stop at once");
                }
            }
        }
    }

    /// Two futures: the first resolves on the first signal (at once if one
    /// came during start-up), and shutdown begins; the second on the next,
    /// which ends the wait for requests still at work (the store is still
    /// closed properly: what was committed stays, and no credential left
    /// without its record).
    pub(crate) fn stages(
        mut self,
    ) -> (
        impl Future<Output = ()> + Send + 'static,
        impl Future<Output = ()> + Send + 'static,
    ) {
        let (count, seen) = tokio::sync::watch::channel(u8::from(self.pending));
        scrip_vital::spawn("signal handler", async move {
            // A long-lived task that panicked (see `scrip-vital`) stops the
            // process as a first signal does: it would otherwise go on
            // answering half alive (every write refused, or revocations
            // no longer followed).
            let mut failure = std::pin::pin!(scrip_vital::failure());
            let mut failed = false;
            // Signals, not a failure's stop: the third ends the process.
            let mut received = u8::from(self.pending);
            while *count.borrow() < 2 {
                tokio::select! {
                    () = self.next() => {
                        received = received.saturating_add(1);
                        count.send_modify(|n| *n = n.saturating_add(1));
                        // Said here, not where the wait for requests ends:
                        // a stop past that wait says it too.
                        if *count.borrow() >= 2 {
                            tracing::warn!(
                                "stopping at once: requests still at work are cut off; signal a third time to exit without finishing the stop"
                            );
                        }
                    }
                    task = &mut failure, if !failed => {
                        failed = true;
                        tracing::error!(task, "stopping: a long-lived task failed");
                        count.send_modify(|n| *n = (*n).max(1));
                    }
                }
            }
            // A third: the rest of the stop (closing connections, storing
            // what is queued, announcing steps) is abandoned, as a kill
            // would; what was committed stays.
            while received < 3 {
                self.next().await;
                received = received.saturating_add(1);
            }
            fail(
                "a third signal: exiting now, without finishing the stop (what was committed stays)",
            );
            log::Lines::finish_queued(log::FINISH);
            #[expect(
                clippy::disallowed_methods,
                reason = "asked to stop now: nothing more is waited for, as after a kill"
            )]
            std::process::exit(1);
        });
        let after = move |n: u8| {
            let mut seen = seen.clone();
            async move {
                // The sender goes only after the second signal.
                let _ = seen.wait_for(|v| *v >= n).await;
            }
        };
        let first = after(1);
        let second = after(2);
        (
            async move {
                first.await;
                tracing::info!("shutting down; signal again to stop waiting for requests at work");
            },
            second,
        )
    }
}

fn policy(command: PolicyCommand) -> ExitCode {
    match command {
        PolicyCommand::Check { dir, config } => {
            let config = match config.as_deref().map(|c| Config::load(Some(c))).transpose() {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            if !dir.is_dir() {
                return fail(format!("`{}` is not a directory", dir.display()));
            }
            let engine = match PolicyEngine::load(&dir) {
                Ok(e) => e,
                Err(e) => return fail(e),
            };
            if let Some(config) = &config
                && let Err(e) = engine.check_tools(&config.tools)
            {
                return fail(e);
            }
            out!(
                "ok: {} policies in `{}` validate (set {}, as `policy.loaded` and `policy.reloaded` records name it)",
                engine.len(),
                dir.display(),
                engine.digest()
            );
            ExitCode::SUCCESS
        }
        PolicyCommand::Test {
            file,
            policies,
            config,
        } => {
            let config = match config.as_deref().map(|c| Config::load(Some(c))).transpose() {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            let dir = policies
                .or_else(|| config.as_ref().map(|c| c.policy_dir.clone()))
                .unwrap_or_else(|| PathBuf::from("policies"));
            // No directory would be no policies, which deny everything: a
            // suite of cases that must be denied would pass on a typo.
            if !dir.is_dir() {
                return fail(format!("`{}` is not a directory", dir.display()));
            }
            let engine = match PolicyEngine::load(&dir) {
                Ok(e) => e,
                Err(e) => return fail(e),
            };
            let text = match std::fs::read_to_string(&file) {
                Ok(t) => t,
                Err(e) => return fail(format!("cannot read `{}`: {e}", file.display())),
            };
            // With a configuration, the set must also be one `scrip serve`
            // would load with it (a forbid at a tool it does not configure
            // is refused there).
            if let Some(config) = &config
                && let Err(e) = engine.check_tools(&config.tools)
            {
                return fail(e);
            }
            let tools = config.map(|c| c.tools).unwrap_or_default();
            let results = match scrip_policy::run_test_file(&engine, &text, &tools) {
                Ok(r) => r,
                Err(e) => return fail(e),
            };
            let failed = results.iter().filter(|r| !r.passed).count();
            for r in &results {
                let mark = if r.passed { "ok  " } else { "FAIL" };
                let got = if r.allowed { "allow" } else { "deny" };
                out!("{mark} {} -> {got} ({})", r.name, r.reason);
            }
            out!("{} passed, {failed} failed", results.len() - failed);
            if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A long-lived task that panics stops a server as a first signal
    /// does (requests drained), and its exit is a failure.
    #[tokio::test]
    async fn a_failed_long_lived_task_stops_the_server_with_a_failure() {
        let (stopped, hurry) = Stop::new().stages();
        let stopped = tokio::spawn(stopped);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!stopped.is_finished());
        assert_eq!(stopped_whole(), ExitCode::SUCCESS);
        // The real thing: a task of `scrip-vital` that panics.
        #[allow(clippy::panic, reason = "the panic is what is tested")]
        let task = scrip_vital::spawn("sweep", async { panic!("a bug") });
        assert!(task.await.is_ok());
        let done = tokio::time::timeout(std::time::Duration::from_secs(10), stopped).await;
        assert!(matches!(done, Ok(Ok(()))), "{done:?}");
        // The drain is not cut short: that takes a second signal.
        let hurry = tokio::spawn(hurry);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!hurry.is_finished());
        assert_eq!(stopped_whole(), ExitCode::FAILURE);
    }
}
