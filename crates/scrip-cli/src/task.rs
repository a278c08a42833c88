//! `scrip task`: start, end and list tasks outside `scrip run`.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use scrip_client::{Client, FileCache};

use crate::audit::{agent_cell, cell, issuer_width, open, printable, runtime, when};
use crate::fail;
use crate::run::{TaskArgs, explain};

/// What `scrip task` does.
#[derive(Debug, clap::Subcommand)]
pub enum TaskCommand {
    /// Start a task and print its task token.
    ///
    /// Obtains an identity as `scrip run` does (--identity-file,
    /// SCRIP_IDENTITY, else local attestation on scrip's socket) and prints
    /// the task token on one line, for `export SCRIP_TASK_TOKEN=$(scrip
    /// task start ...)`. The task runs until `scrip task end` or its
    /// deadline; prefer `scrip run`, which ends it when the command exits.
    Start(StartArgs),
    /// End a task: revoke its task token, which ends the task, its
    /// sub-tasks and every token issued under them.
    ///
    /// The task token comes from SCRIP_TASK_TOKEN when set, else from
    /// standard input (`scrip task end < task.txt`); never from the command
    /// line, where other local users could read it. When the variable is
    /// set and standard input is a file holding another task token (`<
    /// sub.txt` under `scrip run`, which sets the variable), nothing is
    /// ended (exit 1); a pipe is not read then. Revocation answers the
    /// same for any token, so the token is checked first: anything but a
    /// task token signed by the scrip at --server (with a key it publishes
    /// at <server>/jwks) is refused (exit 1) rather than ended silently. Says on stderr which task is ended (whether by this command or before it), and where the token
    /// came from.
    End {
        /// scrip's address.
        #[arg(long, value_name = "URL", env = "SCRIP_URL", default_value = scrip_client::DEFAULT_URL)]
        server: String,
    },
    /// End tasks as the operator: every open task of an agent (a
    /// compromised workload), or tasks named by id.
    ///
    /// Needs no task token: it writes to the store of the configuration
    /// directly (database_url, else the embedded store in data_dir), like
    /// `scrip secret`, while scrip runs. Each task ends with its sub-tasks,
    /// as when its task token is revoked: every scrip serving the store
    /// stops exchanging it at once (an exchange is committed only while its
    /// task is open), introspection calls its access tokens inactive at
    /// once and its task token within about a second, and the revocation
    /// feed lists it, so resource servers and proxies refuse its
    /// access tokens within about a second. Each ending is recorded (`task.ended`, with
    /// this command and --reason) in an audit chain of its own, signed as
    /// `scrip secret`'s are. A task that has ended already is left as it
    /// is. Prints each task ended, one per line.
    Revoke(RevokeArgs),
    /// List the tasks still running, the soonest to end first.
    ///
    /// Reads the store of the configuration (database_url, else the embedded
    /// store in data_dir), like `scrip audit`, and works while the server
    /// runs. The table names each task's agent (the subject that started
    /// its tree) beside the issuer of that agent's identity, cut in their
    /// middle when long; --json gives both whole, and a sub-task's current
    /// actor with its issuer.
    List {
        /// The configuration file (to find the store).
        #[arg(long, short, env = "SCRIP_CONFIG")]
        config: Option<PathBuf>,
        /// Only the tasks this agent started, with their sub-tasks: the
        /// subject of the workload identity that started the task's tree,
        /// exactly, at any issuer (two trusted issuers may each have an
        /// agent of one subject: two clusters'
        /// `system:serviceaccount:ci:builder`; --issuer keeps one).
        #[arg(long, value_name = "SUBJECT")]
        agent: Option<String>,
        /// With --agent: only the tasks it started with an identity of this
        /// issuer (`iss`, exactly). Only beside --agent: the store finds
        /// open tasks by subject, not by issuer (to find an issuer's agents,
        /// list every task: the table and --json show each one's issuer).
        #[arg(long, value_name = "ISSUER", requires = "agent")]
        issuer: Option<String>,
        /// At most this many tasks, those that end soonest (a note on
        /// standard error says when more may be open).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Arguments of `scrip task revoke`.
#[derive(Debug, clap::Args)]
pub struct RevokeArgs {
    /// The configuration file (to find the store).
    #[arg(long, short, env = "SCRIP_CONFIG")]
    config: Option<PathBuf>,
    /// A task to end, by id (as `scrip task list` and `scrip audit query`
    /// show it); may be given more than once. One that reached its
    /// deadline less than `clock_skew` ago has its end published to the
    /// revocation feed (verifiers take its tokens that long past `exp`).
    #[arg(long = "id", value_name = "TASK", required_unless_present = "agent")]
    ids: Vec<String>,
    /// End every open task of this agent (the subject of a workload
    /// identity, exactly): the tasks it started (sub-tasks delegated from
    /// them end with them), then the sub-tasks it holds as a sub-agent,
    /// another agent's tasks delegated to it (what it delegated in turn
    /// ends with them). Each id ended is printed, the soonest deadline
    /// first; they are ended up to 250 at a time, pausing between, so that
    /// on the embedded store the running scrip goes on writing. Tasks that
    /// could not be ended are named at the end (exit status 1): run it
    /// again. Finding the sub-tasks it holds reads every open task.
    ///
    /// Two trusted issuers may each have a workload of one subject (two
    /// clusters' `system:serviceaccount:ci:builder`). Without --issuer,
    /// its open tasks are read first: when they are of identities of more
    /// than one issuer, nothing is ended and the command fails (exit 1),
    /// naming each issuer and how many tasks it has, for --issuer. Ending
    /// another cluster's sound workload with the compromised one cannot be
    /// undone; naming the issuer costs one more command. When they are of
    /// one issuer, only that issuer's are ended, even those started
    /// meanwhile.
    #[arg(long, value_name = "SUBJECT", conflicts_with = "ids")]
    agent: Option<String>,
    /// With --agent: only the tasks it started, and the sub-tasks it
    /// holds, with an identity of this issuer (`iss`, exactly). To end a
    /// subject's tasks at several issuers, run once for each.
    #[arg(long, value_name = "ISSUER", requires = "agent")]
    issuer: Option<String>,
    /// Why, for the audit trail (a ticket, an incident).
    #[arg(long)]
    reason: String,
}

/// Arguments of `scrip task start`.
#[derive(Debug, clap::Args)]
pub struct StartArgs {
    #[command(flatten)]
    task: TaskArgs,
    /// Why the task runs: a person approving a step sees it.
    #[arg(long)]
    purpose: String,
    /// Print a JSON object (task_token, scope, expires_at) instead of the
    /// bare token.
    #[arg(long)]
    json: bool,
}

/// Runs `scrip task`.
pub fn task(command: TaskCommand) -> ExitCode {
    match command {
        TaskCommand::Start(args) => start(&args),
        TaskCommand::End { server } => end(&server),
        TaskCommand::Revoke(args) => revoke(&args),
        TaskCommand::List {
            config,
            agent,
            issuer,
            limit,
            json,
        } => list(
            config.as_deref(),
            agent.as_deref(),
            issuer.as_deref(),
            limit,
            json,
        ),
    }
}

fn start(args: &StartArgs) -> ExitCode {
    let request = args.task.request(args.purpose.clone());
    let result = runtime().and_then(|rt| {
        rt.block_on(async {
            let client = Client::new(&args.task.server).map_err(|e| e.to_string())?;
            let identity = args.task.identity().await?;
            client
                .start_task(&identity, &request)
                .await
                .map_err(|e| format!("cannot start the task: {}", explain(&e)))
        })
    });
    match result {
        Err(e) => fail(e),
        Ok(task) => {
            crate::run::say_left_out(&request, &task);
            let (scope, expires_at) = (task.scope().map(str::to_owned), task.expires_at());
            // Printed, not ended: the task outlives this command.
            let token = task.into_token();
            if args.json {
                let body = serde_json::json!({
                    "task_token": token,
                    "scope": scope,
                    "expires_at": expires_at,
                });
                out!("{body}");
            } else {
                out!("{token}");
            }
            ExitCode::SUCCESS
        }
    }
}

/// The task token redirected in from a file (`scrip task end < sub.txt`),
/// read without moving the file's offset (a loop reading the same file goes
/// on as before): `None` for anything else (a terminal, a pipe, which could
/// only be read by waiting on it or consuming it) or for a file that does
/// not hold one token.
fn redirected_token() -> Option<String> {
    use std::os::unix::fs::FileExt as _;
    let stdin = std::io::stdin();
    let stat = rustix::fs::fstat(&stdin).ok()?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
        return None;
    }
    let at = rustix::fs::seek(&stdin, rustix::fs::SeekFrom::Current(0)).ok()?;
    let file = std::fs::File::from(rustix::io::dup(&stdin).ok()?);
    let mut buf = vec![0u8; 64 * 1024];
    let n = file.read_at(&mut buf, at).ok()?;
    let text = std::str::from_utf8(buf.get(..n)?).ok()?.trim();
    // One compact JWT: three base64url parts.
    let jwt = text.split('.').count() == 3
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    jwt.then(|| text.to_owned())
}

#[expect(clippy::print_stderr, reason = "what was ended")]
fn end(server: &str) -> ExitCode {
    let (token, from) = match std::env::var("SCRIP_TASK_TOKEN") {
        Ok(t) if !t.trim().is_empty() => {
            // A token redirected in from a file on purpose while the
            // variable holds another (inside `scrip run` it always does):
            // ending the variable's task would leave the one meant running.
            // (A pipe is not read: that would wait on it, or consume it.)
            if redirected_token().is_some_and(|redirected| redirected != t.trim()) {
                return fail(
                    "both SCRIP_TASK_TOKEN and standard input hold a task token, and they differ: run `env -u SCRIP_TASK_TOKEN scrip task end` to end the one on standard input, or do not redirect it",
                );
            }
            (t, "SCRIP_TASK_TOKEN")
        }
        _ => {
            // A person at a terminal would wait on a read they were not
            // told of: said, not waited for.
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                return fail(
                    "no task token: SCRIP_TASK_TOKEN is unset and standard input is a terminal; pipe the token in (`scrip task end < token.txt`)",
                );
            }
            let mut text = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut text) {
                return fail(format!(
                    "cannot read the task token from standard input: {e}"
                ));
            }
            (text, "standard input")
        }
    };
    let token = token.trim();
    if token.is_empty() {
        return fail(
            "no task token: set SCRIP_TASK_TOKEN or pipe one in (`scrip task end < task.txt`)",
        );
    }
    let result = runtime().and_then(|rt| {
        rt.block_on(async {
            let client = Client::new(server).map_err(|e| e.to_string())?;
            client
                .end_task(token)
                .await
                .map_err(|e| format!("cannot end the task (token from {from}): {e}"))
        })
    });
    match result {
        Err(e) => fail(e),
        Ok(ended) => {
            if let Some(cache) = FileCache::default_location() {
                cache.remove_task(token);
            }
            if ended.had_expired {
                eprintln!(
                    "task {} had already ended at its deadline (token from {from})",
                    ended.task
                );
            } else {
                // Revocation answers alike whether the task was open
                // (RFC 7009 §2.2): what holds either way is that it ended.
                eprintln!(
                    "task {} is ended, with every task and token under it, if it was not already (token from {from})",
                    ended.task
                );
            }
            ExitCode::SUCCESS
        }
    }
}

fn list(
    config: Option<&Path>,
    agent: Option<&str>,
    issuer: Option<&str>,
    limit: u32,
    json: bool,
) -> ExitCode {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let result = runtime().and_then(|rt| {
        rt.block_on(async {
            let (_, store) = open(config).await?;
            open_of(store.as_ref(), now, agent, issuer, limit)
                .await
                .map_err(|e| e.to_string())
        })
    });
    let tasks = match result {
        Err(e) => return fail(e),
        Ok(t) => t,
    };
    // Tasks come soonest to end first: say when later ones were left out.
    if u64::try_from(tasks.len()).unwrap_or(u64::MAX) >= u64::from(limit) {
        #[expect(clippy::print_stderr, reason = "a note beside the output")]
        {
            eprintln!(
                "scrip: showing the {} open tasks that end soonest; more may be open (narrow with --agent, or raise --limit)",
                tasks.len()
            );
        }
    }
    if json {
        for t in &tasks {
            let line = serde_json::json!({
                "id": t.id,
                "parent": t.parent,
                "agent": {"iss": t.agent.issuer, "sub": t.agent.subject},
                "actor": t.actor.as_ref().map(|a| a.sub.clone()),
                "actor_iss": t.actor.as_ref().and_then(|a| a.iss.clone()),
                "grants": t.grants,
                "purpose": t.purpose,
                "environment": t.environment,
                "depth": t.depth,
                "jti": t.token_jti,
                "created_at": t.created_at,
                "expires_at": t.expires_at,
            });
            out!("{line}");
        }
        return ExitCode::SUCCESS;
    }
    let iss = issuer_width(tasks.iter().map(|t| t.agent.issuer.as_str()));
    out!(
        "{:<22}  {:<24}  {:<28}  {:<iss$}  {:<22}  {:<6}  {:<24}  purpose",
        "task",
        "ends",
        "agent",
        "issuer",
        "parent",
        "env",
        "grants"
    );
    for t in &tasks {
        out!(
            "{:<22}  {:<24}  {:<28}  {:<iss$}  {:<22}  {:<6}  {:<24}  {}",
            t.id,
            when(t.expires_at.saturating_mul(1000)),
            agent_cell(Some(&t.agent.subject), 28),
            agent_cell(Some(&t.agent.issuer), iss),
            cell(t.parent.as_deref(), 22),
            cell(Some(&t.environment), 6),
            cell(Some(&t.grants), 24),
            cell(Some(&t.purpose), 80),
        );
    }
    ExitCode::SUCCESS
}

/// At most `limit` open tasks, the soonest to end first, of `agent` if
/// given, and then of `issuer` if given. The store finds an agent's open
/// tasks by subject (through its index of them), not by issuer: those of
/// the subject at other issuers are read and passed over, a page at a
/// time, until `limit` are found or none is left.
async fn open_of(
    store: &dyn scrip_store::Store,
    now: u64,
    agent: Option<&str>,
    issuer: Option<&str>,
    limit: u32,
) -> Result<Vec<scrip_store::TaskRecord>, scrip_store::StoreError> {
    let Some(issuer) = issuer else {
        return store.open_tasks(now, agent, None, limit).await;
    };
    let want = usize::try_from(limit).unwrap_or(usize::MAX);
    // Pages of at least `PAGE`: a small `--limit` behind many tasks of
    // the subject at other issuers is not a query a task.
    let page_size = limit.max(u32::try_from(PAGE).unwrap_or(u32::MAX));
    let read = usize::try_from(page_size).unwrap_or(usize::MAX);
    let mut found = Vec::new();
    let mut after: Option<(u64, String)> = None;
    loop {
        let next = after.as_ref().map(|(at, id)| (*at, id.as_str()));
        let page = store.open_tasks(now, agent, next, page_size).await?;
        let more = page.len() >= read;
        after = page.last().map(|t| (t.expires_at, t.id.clone()));
        found.extend(page.into_iter().filter(|t| t.agent.issuer == issuer));
        if found.len() >= want || !more {
            found.truncate(want);
            return Ok(found);
        }
    }
}

/// `scrip task revoke`.
fn revoke(args: &RevokeArgs) -> ExitCode {
    let result = (|| {
        let config =
            scrip_config::Config::load(args.config.as_deref()).map_err(|e| e.to_string())?;
        let reason = reason(&args.reason)?;
        runtime()?.block_on(async {
            let (_, store) = open(args.config.as_deref()).await?;
            // Which issuer's tasks of the agent to end, decided before
            // anything is written.
            let issuer = match (&args.agent, &args.issuer) {
                (Some(agent), None) => match the_one_issuer(store.as_ref(), agent).await? {
                    // Nothing open to end.
                    None => return Ok(0),
                    Some(issuer) => issuer,
                },
                (_, issuer) => issuer.clone(),
            };
            crate::secret::sign_heads(&config, store.as_ref()).await?;
            let ended = match &args.agent {
                Some(agent) => {
                    revoke_agent(&config, store.as_ref(), agent, issuer.as_deref(), reason).await?
                }
                None => {
                    let mut ended = 0;
                    for id in &args.ids {
                        match store.task(id).await.map_err(|e| e.to_string())? {
                            None => return Err(format!("no task `{id}`; nothing more was ended")),
                            Some(task) => {
                                if end_one(&config, store.as_ref(), &task, reason)
                                    .await
                                    .map_err(String::from)?
                                {
                                    out!("{id}");
                                    ended += 1;
                                }
                            }
                        }
                    }
                    ended
                }
            };
            Ok(ended)
        })
    })();
    match result {
        Err(e) => fail(e),
        Ok(0) => {
            #[expect(clippy::print_stderr, reason = "what was done")]
            {
                eprintln!("scrip: no open task was found to end");
            }
            ExitCode::SUCCESS
        }
        Ok(_) => ExitCode::SUCCESS,
    }
}

/// An operator's `--reason`, for the audit trail: one line of text, at
/// most 500 bytes (as a person's reason for a denial).
pub(crate) fn reason(text: &str) -> Result<&str, String> {
    let text = text.trim();
    if text.is_empty() || text.chars().any(char::is_control) || text.len() > 500 {
        return Err("--reason must be one line of text, at most 500 bytes".to_owned());
    }
    Ok(text)
}

/// How many tasks `scrip task revoke --agent` ends at once: at first, and
/// at most. Their endings are committed together: the store folds commits
/// made at the same time into one transaction (and isolates one that
/// conflicts), so ending thousands of tasks takes a few dozen transactions
/// rather than one each. The number doubles after endings that took less
/// than [`QUICK`], up to the most, and halves after endings the store could
/// not take (a transaction too long for its deadline: roots with large
/// trees of sub-tasks, or a distant database), which are then tried again.
const END_AT_ONCE: (usize, usize) = (16, 250);

/// Endings that took less than this may be joined by more next time.
const QUICK: std::time::Duration = std::time::Duration::from_millis(200);

/// The shortest and longest pause between endings of [`END_AT_ONCE`] tasks. On
/// the embedded store a running scrip writes to the same file, and SQLite
/// hands its write lock to whoever asks first once it is free: commits made
/// back to back would keep it from the server for as long as the command
/// runs (its batches failing with 503 after 5 s). Pausing as long as the
/// last endings took leaves the server about half the time.
const PAUSE: (std::time::Duration, std::time::Duration) = (
    std::time::Duration::from_millis(10),
    std::time::Duration::from_secs(1),
);

/// The one issuer of the identities with which `agent` holds open tasks,
/// for `revoke --agent` without `--issuer`: the issuer of those it started
/// (the roots: a sub-task names its root's agent), and of its own identity
/// in the sub-tasks it is the current actor of (`None` for one whose actor
/// records no issuer, which only a row not written by scrip lacks).
/// `Ok(None)` when it holds none; an error naming each issuer, and how many
/// tasks it has, when it holds them at more than one, so that a workload of
/// one subject at another issuer (another cluster's) is not ended with it.
/// Reads its open tasks as [`revoke_agent`] does, without ending any.
async fn the_one_issuer(
    store: &dyn scrip_store::Store,
    agent: &str,
) -> Result<Option<Option<String>>, String> {
    let now = crate::audit::now_s();
    let mut issuers: std::collections::BTreeMap<Option<String>, usize> =
        std::collections::BTreeMap::new();
    for held in [Held::Started, Held::ActedIn] {
        let mut after: Option<(u64, String)> = None;
        loop {
            let next = after.as_ref().map(|(at, id)| (*at, id.as_str()));
            let page = held
                .page(store, now, agent, next)
                .await
                .map_err(|e| e.to_string())?;
            let Some(last) = page.last() else {
                break;
            };
            after = Some((last.expires_at, last.id.clone()));
            for t in &page {
                let issuer = match held {
                    Held::Started if t.parent.is_none() => Some(t.agent.issuer.clone()),
                    Held::Started => continue,
                    Held::ActedIn => match &t.actor {
                        Some(a) => a.iss.clone(),
                        None => continue,
                    },
                };
                *issuers.entry(issuer).or_default() += 1;
            }
        }
    }
    if issuers.len() <= 1 {
        return Ok(issuers.into_keys().next());
    }
    let each: Vec<String> = issuers
        .iter()
        .map(|(issuer, n)| match issuer {
            Some(i) => format!("`{}` ({n} tasks)", printable(i)),
            None => format!("no issuer recorded ({n} tasks, reached only by --id)"),
        })
        .collect();
    let agent = printable(agent);
    Err(format!(
        "`{agent}` holds open tasks with identities of {} issuers, each a workload of its own: {}; nothing was ended. Run again with --issuer naming the compromised workload's issuer (once for each issuer, to end them all; `scrip task list --json` names each task's agent and actor with their issuers)",
        issuers.len(),
        each.join(", ")
    ))
}

/// Ends every open task of `agent` whose identity is of `issuer` (`None`:
/// sub-tasks whose actor records no issuer): how many.
/// Its tasks are read a page at a time, the soonest to end first, and the
/// roots among them ended, [`END_AT_ONCE`] at a time: a sub-task (which
/// names its root's agent) ends with its root. Then, likewise, the
/// sub-tasks whose current actor it is ([`Held::ActedIn`]): a compromised
/// sub-agent holds those, whatever agent started their tree. Each task ended is printed,
/// in that order (those tried again, after the rest of the endings they
/// were tried with). One tried again after the store could not confirm its
/// ending, and found ended then, counts as ended by this command when it
/// ended as revoked in the second the command began or after (another
/// revocation at that moment, its agent's or another operator's, looks the
/// same; the audit trail tells them apart). Tasks that cannot be ended are
/// named at the end, after every other was tried, and the command fails;
/// it stops early when [`GIVE_UP`] in a row fail because the store does
/// not answer.
async fn revoke_agent(
    config: &scrip_config::Config,
    store: &dyn scrip_store::Store,
    agent: &str,
    issuer: Option<&str>,
    reason: &str,
) -> Result<usize, String> {
    let now = crate::audit::now_s();
    let mut ended = 0;
    // How long the last endings took, to pause as long before the next.
    let mut took: Option<std::time::Duration> = None;
    let mut at_once = END_AT_ONCE.0;
    // Tasks tried again, the store unable to say whether the first try
    // ended them; tasks that could not be ended, and why; how many in a row
    // failed alone because the store did not answer.
    let mut retried: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut unended: Vec<(String, String)> = Vec::new();
    let mut in_a_row = 0;
    // First the tasks it started, then the sub-tasks it holds as a
    // sub-agent (another agent's, or its own delegated to itself).
    for held in [Held::Started, Held::ActedIn] {
        let mut after: Option<(u64, String)> = None;
        loop {
            let next = after.as_ref().map(|(at, id)| (*at, id.as_str()));
            let page = held.page(store, now, agent, next).await;
            let page = page.map_err(|e| {
                if unended.is_empty() {
                    e.to_string()
                } else {
                    not_all(
                        ended,
                        &unended,
                        &format!("reading the next page failed ({e}); stopped"),
                    )
                }
            })?;
            let Some(last) = page.last() else {
                break;
            };
            after = Some((last.expires_at, last.id.clone()));
            let mut roots: std::collections::VecDeque<_> = page
                .iter()
                .filter(|t| match held {
                    Held::Started => t.parent.is_none() && Some(t.agent.issuer.as_str()) == issuer,
                    Held::ActedIn => t.actor.as_ref().is_some_and(|a| a.iss.as_deref() == issuer),
                })
                .collect();
            while !roots.is_empty() {
                if let Some(last) = took.take() {
                    tokio::time::sleep(last.clamp(PAUSE.0, PAUSE.1)).await;
                }
                let together: Vec<_> = roots.drain(..at_once.min(roots.len())).collect();
                let began = std::time::Instant::now();
                let results = futures_util::future::join_all(
                    together
                        .iter()
                        .map(|task| end_one(config, store, task, reason)),
                )
                .await;
                took = Some(began.elapsed());
                let mut again = Vec::new();
                let mut failed = None;
                for (task, result) in together.iter().zip(results) {
                    match result {
                        Ok(true) => {
                            out!("{}", task.id);
                            ended += 1;
                            in_a_row = 0;
                        }
                        // Tried again after the store could not confirm the
                        // first try: ended by that try, as far as one can tell.
                        Ok(false) if retried.contains(task.id.as_str()) => {
                            in_a_row = 0;
                            match ended_since(store, &task.id, now).await {
                                Ok(true) => {
                                    out!("{}", task.id);
                                    ended += 1;
                                }
                                Ok(false) => {}
                                Err(e) => unended.push((task.id.clone(), e)),
                            }
                        }
                        Ok(false) => in_a_row = 0,
                        Err(Unended::Unavailable(e)) if together.len() > 1 => {
                            again.push(*task);
                            failed.get_or_insert(e);
                        }
                        Err(Unended::Unavailable(e)) => {
                            in_a_row += 1;
                            unended.push((task.id.clone(), e));
                        }
                        Err(Unended::Failed(e)) => {
                            in_a_row = 0;
                            unended.push((task.id.clone(), e));
                        }
                    }
                }
                if in_a_row >= GIVE_UP {
                    return Err(not_all(
                        ended,
                        &unended,
                        "the store does not answer; stopped",
                    ));
                }
                if again.is_empty() {
                    if took.is_some_and(|t| t < QUICK) {
                        at_once = (at_once * 2).min(END_AT_ONCE.1);
                    }
                } else {
                    // Fewer than were tried, and these first again.
                    at_once = (together.len() / 2).max(1);
                    if let Some(e) = failed {
                        tracing::warn!(error = %e, tasks = again.len(), at_once, "could not end tasks; trying again fewer at a time");
                    }
                    for task in again.into_iter().rev() {
                        retried.insert(task.id.clone());
                        roots.push_front(task);
                    }
                }
            }
        }
    }
    if unended.is_empty() {
        Ok(ended)
    } else {
        Err(not_all(ended, &unended, "the others were ended"))
    }
}

/// Which of an agent's tasks `revoke --agent` is ending.
#[derive(Clone, Copy)]
enum Held {
    /// The tasks it started (the roots: sub-tasks end with them).
    Started,
    /// The sub-tasks it is the current actor of, as a sub-agent.
    ActedIn,
}

impl Held {
    /// A page ([`PAGE`]) of the open tasks `agent` holds so, the soonest
    /// to end first, after `after`.
    async fn page(
        self,
        store: &dyn scrip_store::Store,
        now: u64,
        agent: &str,
        after: Option<(u64, &str)>,
    ) -> Result<Vec<scrip_store::TaskRecord>, scrip_store::StoreError> {
        let limit = u32::try_from(PAGE).unwrap_or(u32::MAX);
        match self {
            Held::Started => store.open_tasks(now, Some(agent), after, limit).await,
            Held::ActedIn => store.open_tasks_acted_by(now, agent, after, limit).await,
        }
    }
}

/// Whether task `id` ended as revoked at `since` (seconds) or later.
async fn ended_since(store: &dyn scrip_store::Store, id: &str, since: u64) -> Result<bool, String> {
    let task = store
        .task(id)
        .await
        .map_err(|e| format!("whether task `{id}` was ended is not known: {e}"))?;
    Ok(task.is_some_and(|t| {
        t.end_reason.as_deref() == Some("revoked") && t.ended_at.is_some_and(|at| at >= since)
    }))
}

/// The most tasks that may fail in a row, each alone, because the store
/// did not answer, before `revoke --agent` stops trying the rest.
const GIVE_UP: usize = 3;

/// A page of an agent's open tasks.
const PAGE: usize = 1000;

/// What `revoke --agent` says when it could not end every task.
fn not_all(ended: usize, unended: &[(String, String)], then: &str) -> String {
    let ids: Vec<&str> = unended.iter().map(|(id, _)| id.as_str()).collect();
    let first = unended.first().map_or("", |(_, e)| e.as_str());
    format!(
        "could not end {} tasks ({}): {first}; {then}; {ended} tasks were ended (listed above); run the command again to end what is left",
        ids.len(),
        ids.join(", ")
    )
}

/// Why a task was not ended.
enum Unended {
    /// The store could not say (it did not answer in time): worth trying
    /// again, fewer at a time.
    Unavailable(String),
    /// Anything else.
    Failed(String),
}

impl From<Unended> for String {
    fn from(e: Unended) -> Self {
        match e {
            Unended::Unavailable(e) | Unended::Failed(e) => e,
        }
    }
}

/// Publishes the end of `task`, which has ended, to the revocation feed
/// with `record` when it ended at its deadline less than `clock_skew` ago:
/// it ended without a feed event then (its tokens expire with it), while
/// verifiers still take its tokens up to their leeway past `exp`. As a
/// revocation of its token would; once (another publication, here or by
/// the server, leaves nothing to do).
async fn publish_if_just_past(
    config: &scrip_config::Config,
    store: &dyn scrip_store::Store,
    task: &scrip_store::TaskRecord,
    record: scrip_store::AuditEvent,
    now: u64,
) -> Result<(), Unended> {
    let at_deadline = task.ended_at.is_some_and(|e| e >= task.expires_at);
    if !at_deadline || now >= task.expires_at.saturating_add(config.clock_skew) {
        return Ok(());
    }
    let published = store
        .commit(vec![
            scrip_store::Write::AnnounceEnded {
                id: task.id.clone(),
                at: now,
                grace: config.clock_skew,
            },
            scrip_store::Write::Audit(Box::new(record)),
        ])
        .await;
    let failed =
        |e: scrip_store::StoreError| format!("cannot publish the end of task `{}`: {e}", task.id);
    match published {
        Ok(()) => {
            #[expect(clippy::print_stderr, reason = "what was done")]
            {
                eprintln!(
                    "scrip: task `{}` was not open: it reached its deadline {} s ago, and its end is published to the revocation feed",
                    task.id,
                    now.saturating_sub(task.expires_at)
                );
            }
            Ok(())
        }
        // Published before.
        Err(scrip_store::StoreError::Conflict(_)) => Ok(()),
        Err(e @ scrip_store::StoreError::Unavailable(_)) => Err(Unended::Unavailable(failed(e))),
        Err(e) => Err(Unended::Failed(failed(e))),
    }
}

/// Ends `task` and its open sub-tasks, recording why: whether it was open.
async fn end_one(
    config: &scrip_config::Config,
    store: &dyn scrip_store::Store,
    task: &scrip_store::TaskRecord,
    reason: &str,
) -> Result<bool, Unended> {
    let now = crate::audit::now_s();
    let user = rustix::process::geteuid().as_raw();
    let at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let record = |event: &str, done: &str, why: &str| scrip_store::AuditEvent {
        at_ms,
        event: event.into(),
        agent_iss: Some(task.agent.issuer.clone()),
        agent_sub: Some(task.agent.subject.clone()),
        task_id: Some(task.id.clone()),
        parent_id: task.parent.clone(),
        // As the server's records of the task name it.
        chain: task
            .actor
            .as_ref()
            .map(scrip_token::Actor::chain)
            .unwrap_or_default(),
        environment: Some(task.environment.clone()),
        purpose: Some(task.purpose.clone()),
        // The task's token, as when it is revoked.
        jti: Some(task.token_jti.clone()),
        reason: Some(format!(
            "{done} by the operator (scrip task revoke, uid {user}): {reason}; {why}"
        )),
        replica: crate::secret::replica(),
        ..scrip_store::AuditEvent::default()
    };
    let published = || {
        record(
            "task.end_published",
            "published",
            "it had just reached its deadline; its end and its sub-tasks' are published to the revocation feed",
        )
    };
    if task.state(now) == scrip_store::TaskState::Ended {
        publish_if_just_past(config, store, task, published(), now).await?;
        return Ok(false);
    }
    let record = record("task.ended", "ended", "every open sub-task ended with it");
    let ended = store
        .commit(vec![
            scrip_store::Write::EndOpenTask {
                id: task.id.clone(),
                at: now,
                reason: "revoked".into(),
                // Verifiers accept a token up to their leeway past its
                // `exp`: the task's event outlives it as long.
                grace: config.clock_skew,
            },
            scrip_store::Write::Audit(Box::new(record)),
        ])
        .await;
    match ended {
        Ok(()) => Ok(true),
        // Ended meanwhile (by its agent, its parent, its deadline), which
        // is read again to be sure: a conflict means nothing else.
        Err(scrip_store::StoreError::Conflict(why)) => {
            let read = store.task(&task.id).await.map_err(|e| match e {
                scrip_store::StoreError::Unavailable(_) => Unended::Unavailable(e.to_string()),
                e => Unended::Failed(e.to_string()),
            })?;
            let now = crate::audit::now_s();
            match read {
                // At its deadline, perhaps, by the sweep meanwhile.
                Some(t) if t.state(now) == scrip_store::TaskState::Ended => {
                    publish_if_just_past(config, store, &t, published(), now).await?;
                    Ok(false)
                }
                _ => Err(Unended::Failed(format!(
                    "cannot end task `{}`: {why}",
                    task.id
                ))),
            }
        }
        Err(e @ scrip_store::StoreError::Unavailable(_)) => Err(Unended::Unavailable(format!(
            "cannot end task `{}`: {e}",
            task.id
        ))),
        Err(e) => Err(Unended::Failed(format!(
            "cannot end task `{}`: {e}",
            task.id
        ))),
    }
}
