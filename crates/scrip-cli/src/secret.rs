//! `scrip secret set|list|rotate|delete`: the upstreams' static keys, sealed in the
//! store. A value is read from standard input (or from the configured mint
//! command's output), never from the command line, and never printed.

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use scrip_config::{Config, SecretSpec, Upstream};
use scrip_proxy::{Kek, SecretValue};
use scrip_store::{AuditEvent, SecretRecord, Store, StoreError, Write};
use zeroize::Zeroizing;

use crate::fail;

/// The longest a mint command may run.
const MINT_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a new value comes from.
enum Source {
    Stdin,
    Mint(Vec<String>),
}

use crate::audit::{now_s as now, runtime};

fn spec<'a>(
    config: &'a Config,
    name: &str,
    action: &str,
) -> Result<(&'a Upstream, &'a SecretSpec), String> {
    let upstream = config.upstream(name).ok_or_else(|| {
        format!("no upstream `{name}` in the configuration; add an [[upstreams]] entry")
    })?;
    let spec = upstream
        .secrets
        .iter()
        .find(|(a, _)| a.as_str() == action)
        .map(|(_, s)| s)
        .ok_or_else(|| {
            format!("upstream `{name}` has no secret for action `{action}`; add [upstreams.secrets.{action}]")
        })?;
    Ok((upstream, spec))
}

/// The store and the key-encryption key; `create_key` allows creating the
/// key, and then only while the store holds nothing sealed under one. A
/// key that opens nothing the store holds is refused either way.
async fn open(config: &Config, create_key: bool) -> Result<(Arc<dyn Store>, Kek), String> {
    scrip_server::keys::ensure_private_dir(&config.data_dir).map_err(|e| e.to_string())?;
    let store = scrip_store::open(
        config.database_url.as_deref(),
        &config.data_dir.join("scrip.db"),
    )
    .await
    .map_err(|e| e.to_string())?;
    let kek = if create_key {
        scrip_server::keys::store_kek(config, store.as_ref()).await
    } else {
        match scrip_server::keys::load_kek(config, false) {
            Ok(kek) => scrip_server::keys::verify_kek(config, &kek, store.as_ref())
                .await
                .map(|()| kek),
            Err(e) => Err(e),
        }
    };
    Ok((store, Kek::new(kek.map_err(|e| e.to_string())?)))
}

/// Reads the value from standard input: a whole pipe, or one line typed
/// without echo on a terminal.
fn read_stdin(prompt: &str) -> Result<SecretValue, String> {
    let stdin = std::io::stdin();
    let buf = if rustix::termios::isatty(&stdin) {
        read_typed(&stdin, prompt)?.to_vec()
    } else {
        let limit = scrip_proxy::secrets::MAX_SECRET_BYTES + 3;
        // Sized for all that is read, so never grown: a grown buffer would
        // free the one before it, holding part of the secret, unzeroed.
        let mut buf = Zeroizing::new(Vec::with_capacity(limit));
        stdin
            .lock()
            .take(u64::try_from(limit).unwrap_or(u64::MAX))
            .read_to_end(&mut buf)
            .map_err(|e| format!("cannot read standard input: {e}"))?;
        std::mem::take(&mut *buf)
    };
    SecretValue::from_input(buf).map_err(|e| format!("{e} (it is read from standard input)"))
}

/// The longest line a terminal passes on in canonical mode (Linux keeps
/// 4096 bytes, one of them for the newline); a longer paste is cut there
/// without a word, so a line this long may not be what was pasted.
const MAX_TYPED_LINE: usize = 4095;

/// Puts the terminal back as it was when dropped, discarding what was typed
/// and not read (the rest of a multi-line paste stays out of the shell).
struct RestoreTerminal<'a> {
    tty: &'a std::io::Stdin,
    old: rustix::termios::Termios,
}

impl Drop for RestoreTerminal<'_> {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            self.tty,
            rustix::termios::OptionalActions::Flush,
            &self.old,
        );
        let _ = std::io::stderr().write_all(b"\n");
    }
}

/// Reads one line typed on the terminal, without echo, as `getpass(3)` does.
/// Signals from the keyboard are off while it reads, so Ctrl-C cannot kill
/// the process with echo still off: the interrupt character ends the line
/// instead (it is made an end-of-line character) and cancels. The terminal
/// is restored whatever happens, a panic included; the line is read
/// straight from the descriptor into a buffer wiped when dropped.
fn read_typed(stdin: &std::io::Stdin, prompt: &str) -> Result<Zeroizing<Vec<u8>>, String> {
    use rustix::termios::{LocalModes, OptionalActions, SpecialCodeIndex, tcgetattr, tcsetattr};
    let old = tcgetattr(stdin).map_err(|e| format!("terminal: {e}"))?;
    let mut quiet = old.clone();
    quiet
        .local_modes
        .remove(LocalModes::ECHO | LocalModes::ISIG);
    quiet.local_modes.insert(LocalModes::ICANON);
    // 0 is "disabled" on Linux; Ctrl-C (ETX) then.
    let interrupt = match old.special_codes[SpecialCodeIndex::VINTR] {
        0 => 0x03,
        c => c,
    };
    quiet.special_codes[SpecialCodeIndex::VEOL] = interrupt;
    let restore = RestoreTerminal { tty: stdin, old };
    tcsetattr(stdin, OptionalActions::Now, &quiet).map_err(|e| format!("terminal: {e}"))?;
    let _ = std::io::stderr().write_all(prompt.as_bytes());
    let mut buf = Zeroizing::new(vec![0u8; MAX_TYPED_LINE + 1]);
    let mut len = 0;
    let read = loop {
        let Some(room) = buf.get_mut(len..).filter(|r| !r.is_empty()) else {
            break Ok(());
        };
        match rustix::io::read(stdin, room) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                len += n;
                match len.checked_sub(1).and_then(|i| buf.get(i)) {
                    Some(b'\n') => break Ok(()),
                    Some(&c) if c == interrupt => {
                        break Err("cancelled; nothing was stored".to_owned());
                    }
                    _ => {}
                }
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => break Err(format!("cannot read standard input: {e}")),
        }
    };
    drop(restore);
    read?;
    buf.truncate(len);
    let typed = buf.strip_suffix(b"\n").map_or(buf.len(), <[u8]>::len);
    if typed >= MAX_TYPED_LINE {
        return Err(format!(
            "a value typed on a terminal is at most {} characters (a longer paste is cut); pipe it on standard input instead",
            MAX_TYPED_LINE - 1
        ));
    }
    Ok(buf)
}

/// Refuses a mint command's program, named by a path, that another user
/// could change (its file, or a directory on the way to it), as the
/// configuration that names it is refused: it runs as scrip's user, which
/// reads the key-encryption key. A bare name is looked up in `PATH`, as the
/// shell would, and trusted as `PATH` is.
fn check_program(argv: &[String]) -> Result<(), String> {
    use scrip_config::trust::{GroupWrite, Stake, check_path};
    match argv.first() {
        Some(program) if program.contains('/') => {
            check_path(Path::new(program), Stake::Program, GroupWrite::Refuse)
                .map_err(|e| format!("mint_command: {e}"))
        }
        _ => Ok(()),
    }
}

/// Runs the mint command and reads the new value from its standard output.
async fn mint(argv: &[String], name: &str, action: &str) -> Result<SecretValue, String> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| "mint_command is empty".to_owned())?;
    use tokio::io::AsyncReadExt as _;
    use tokio::signal::unix::{SignalKind, signal};
    // Taken before the command starts: a Ctrl-C the moment it starts must
    // be scrip's to handle, not kill scrip and leave the command running.
    let signals = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    );
    // Its own process group, so that what it started goes with it.
    let mut child = crate::child_command(program)
        .args(args)
        // The shared store's password, which the driver reads from the
        // environment, is not handed over. (The command runs as scrip's
        // user, and can read what that user can: it is trusted as scrip
        // is.)
        .env_remove("PGPASSWORD")
        .env("SCRIP_SECRET_NAME", name)
        .env("SCRIP_SECRET_ACTION", action)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run mint command `{program}`: {e}"))?;
    let group = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(rustix::process::Pid::from_raw);
    let kill_group = || {
        if let Some(group) = group {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
    };
    let failed = |e: std::io::Error| format!("mint command `{program}` failed: {e}");
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| format!("mint command `{program}`: no output"))?;
    // A value and its newline at most: more is read no further.
    let limit = u64::try_from(scrip_proxy::secrets::MAX_SECRET_BYTES + 2).unwrap_or(u64::MAX);
    let mut reader = stdout.take(limit + 1);
    let run = async {
        // All it may read, at once: a buffer that grew would leave copies
        // of the value behind.
        let mut out = Zeroizing::new(Vec::with_capacity(
            usize::try_from(limit + 1).unwrap_or(usize::MAX),
        ));
        let exited = {
            let read = reader.read_to_end(&mut out);
            tokio::select! {
                r = read => {
                    r.map_err(failed)?;
                    None
                }
                s = child.wait() => Some(s.map_err(failed)?),
            }
        };
        let status = match exited {
            // It exited: what it left running (and holding its output
            // open) goes, and the rest of its output is read.
            Some(status) => {
                kill_group();
                reader.read_to_end(&mut out).await.map_err(failed)?;
                status
            }
            None => {
                if u64::try_from(out.len()).unwrap_or(u64::MAX) > limit {
                    return Err(format!(
                        "mint command `{program}` printed more than a secret (8 KiB)"
                    ));
                }
                child.wait().await.map_err(failed)?
            }
        };
        if u64::try_from(out.len()).unwrap_or(u64::MAX) > limit {
            return Err(format!(
                "mint command `{program}` printed more than a secret (8 KiB)"
            ));
        }
        if !status.success() {
            return Err(format!("mint command `{program}` exited with {status}"));
        }
        Ok(out)
    };
    // In a process group of its own the command gets no Ctrl-C from the
    // terminal: scrip takes it (and a stop, a hangup), and the group goes.
    let interrupted = async {
        let (Ok(mut int), Ok(mut term), Ok(mut hup)) = signals else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
            _ = hup.recv() => {}
        }
    };
    let result = tokio::select! {
        r = tokio::time::timeout(MINT_TIMEOUT, run) => match r {
            Ok(r) => r,
            Err(_) => Err(format!("mint command `{program}` did not finish within 60 s")),
        },
        () = interrupted => Err(format!(
            "interrupted: mint command `{program}` was stopped"
        )),
    };
    // Whatever it left running goes (the command itself has exited, or is
    // killed on drop).
    kill_group();
    // Once it ran, it may have minted a key at the provider, whatever went
    // wrong after.
    let out = result.map_err(|e| format!("{e}; {NOT_STORED}"))?;
    SecretValue::from_input(out.to_vec())
        .map_err(|e| format!("mint command `{program}`'s output: {e}; {NOT_STORED}"))
}

/// Who wrote this command's audit records.
pub(crate) fn replica() -> String {
    format!("scrip-cli:{}", std::process::id())
}

/// Said of every failure once a mint command ran.
const NOT_STORED: &str =
    "a key it may have minted at the provider was not stored: revoke it there if it was";

/// Seals and stores a new version, with its audit record, in one commit.
/// Rotates each planned secret in turn, pushing what was rotated to `done`;
/// stops at the first failure.
async fn rotate_each(
    store: &dyn Store,
    kek: &Kek,
    name: &str,
    values: Vec<(String, u64, Source, Option<SecretValue>)>,
    done: &mut Vec<(String, u32, u64)>,
) -> Result<(), String> {
    // Every action is looked at before any mint command runs: one not set
    // yet would otherwise stop the rotation after the others had minted
    // (and a run again once it is set would mint them again).
    for (a, ..) in &values {
        if store
            .secret_versions(name, a)
            .await
            .map_err(|e| e.to_string())?
            .is_empty()
        {
            return Err(format!(
                "secret `{name}` `{a}` is not set yet; use `scrip secret set`"
            ));
        }
    }
    for (a, grace, source, value) in values {
        let value = match (value, &source) {
            (Some(v), _) => v,
            (None, Source::Mint(argv)) => mint(argv, name, &a).await?,
            (None, Source::Stdin) => return Err("no value".into()),
        };
        let version = put(store, kek, name, &a, grace, &value, "secret.rotated")
            .await
            .map_err(|e| match source {
                Source::Mint(_) => format!(
                    "{e}; the key the mint command made at the provider may not have been stored: if `scrip secret list` does not show a new version of `{name}` `{a}`, revoke it there"
                ),
                Source::Stdin => e,
            })?;
        done.push((a, version, grace));
    }
    Ok(())
}

/// Has the store sign the audit records this command writes (its own
/// chain) in the commits that write them, as `scrip serve` does. On a
/// shared store, where this host was given no key-encryption key (which
/// opens the checkpoint key), or the store holds no checkpoint key and no
/// signed chain head (no `scrip serve` has started on it yet), the change
/// is still made, its record unsigned, and a warning says so: `scrip audit
/// verify` reports such records. Any other failure to get the key refuses
/// the change: a key row someone made unreadable, or took away beside the
/// heads it signed, must not buy them an unsigned record to rewrite.
///
/// # Errors
/// When the key cannot be had (but for the cases above): on the embedded
/// store, when the key file cannot be read or made, or the record of a key
/// just made cannot be committed; on a shared store, when a stored
/// checkpoint key does not open or is missing beside signed heads, or the
/// store cannot be read. Nothing is changed then.
/// (The store may already sign with that key, whose file is removed again,
/// so nothing more may be written in this run.)
#[expect(
    clippy::print_stderr,
    reason = "a warning for the person running the command"
)]
pub(crate) async fn sign_heads(config: &Config, store: &dyn Store) -> Result<(), String> {
    use scrip_server::keys::KeyError;
    let refused = |why: &dyn std::fmt::Display| {
        format!("cannot sign the audit record of this change: {why}; nothing was changed")
    };
    // Heads seen beside no key: the first `scrip serve` may have stored
    // both between the two reads, so the key is read once more.
    let mut heads_seen = false;
    loop {
        let failed = match scrip_server::keyring::checkpoint_signer(
            config,
            store,
            now(),
            &replica(),
        )
        .await
        {
            Ok(key) => {
                store.sign_heads_with(Arc::new(scrip_server::keyring::HeadKey(key)));
                return Ok(());
            }
            Err(e) => e,
        };
        let unsigned = match &failed {
            KeyError::MissingKek { .. } => config.database_url.is_some(),
            KeyError::NoCheckpointKey if heads_seen => {
                return Err(refused(
                    &"the store holds signed audit chain heads but no checkpoint key to sign with (someone removed or hid it; `scrip audit verify` reports what it can)",
                ));
            }
            KeyError::NoCheckpointKey => {
                heads_seen = !store
                    .latest_checkpoints()
                    .await
                    .map_err(|e| refused(&e))?
                    .is_empty();
                if heads_seen {
                    continue;
                }
                true
            }
            _ => false,
        };
        if !unsigned {
            return Err(refused(&failed));
        }
        eprintln!(
            "scrip: warning: the audit record of this change cannot be signed ({failed}); `scrip audit verify` will report it"
        );
        return Ok(());
    }
}

async fn put(
    store: &dyn Store,
    kek: &Kek,
    name: &str,
    action: &str,
    grace: u64,
    value: &SecretValue,
    event: &str,
) -> Result<u32, String> {
    let versions = store
        .secret_versions(name, action)
        .await
        .map_err(|e| e.to_string())?;
    let version = match versions.first() {
        None => 1,
        Some(r) => r.version.checked_add(1).ok_or_else(|| {
            format!("`{name}` ({action}) has used up its version numbers; `scrip secret delete` it and set it again")
        })?,
    };
    let sealed = kek
        .seal(name, action, version, value)
        .map_err(|e| e.to_string())?;
    let at = now();
    let audit = AuditEvent {
        at_ms: at * 1000,
        event: event.to_owned(),
        tool: Some(name.to_owned()),
        actions: Some(action.to_owned()),
        reason: Some(format!("version {version}")),
        replica: replica(),
        ..AuditEvent::default()
    };
    store
        .commit(vec![
            Write::PutSecret {
                secret: Box::new(SecretRecord {
                    name: name.to_owned(),
                    action: action.to_owned(),
                    version,
                    sealed,
                    created_at: at,
                    retired_at: None,
                }),
                purge_retired_before: at.saturating_sub(grace),
            },
            Write::Audit(Box::new(audit)),
        ])
        .await
        .map_err(|e| match e {
            StoreError::Conflict(why) => {
                format!("{why}; nothing was stored: run the command again")
            }
            e => e.to_string(),
        })?;
    Ok(version)
}

/// `scrip secret set NAME --action A`.
pub fn set(config: Option<&Path>, name: &str, action: &str) -> ExitCode {
    let result = (|| {
        let config = Config::load(config).map_err(|e| e.to_string())?;
        let (_, spec) = spec(&config, name, action)?;
        let value = read_stdin(&format!("secret value for `{name}` `{action}`: "))?;
        runtime()?.block_on(async {
            let (store, kek) = open(&config, true).await?;
            sign_heads(&config, store.as_ref()).await?;
            let version = put(
                store.as_ref(),
                &kek,
                name,
                action,
                spec.grace,
                &value,
                "secret.set",
            )
            .await?;
            Ok::<u32, String>(version)
        })
    })();
    match result {
        Ok(version) => {
            out!("set `{name}` `{action}` version {version}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// `scrip secret rotate NAME [--action A]`.
pub fn rotate(config: Option<&Path>, name: &str, action: Option<&str>) -> ExitCode {
    let result = (|| {
        // It names the programs that mint the new values, run as this user.
        let config = crate::load_trusted(config)?;
        let upstream = config.upstream(name).ok_or_else(|| {
            format!("no upstream `{name}` in the configuration; add an [[upstreams]] entry")
        })?;
        let mut plan = Vec::new();
        match action {
            Some(a) => {
                let (_, spec) = spec(&config, name, a)?;
                let source = if spec.mint_command.is_empty() {
                    Source::Stdin
                } else {
                    Source::Mint(spec.mint_command.clone())
                };
                plan.push((a.to_owned(), spec.grace, source));
            }
            None => {
                for (a, spec) in &upstream.secrets {
                    if spec.mint_command.is_empty() {
                        return Err(format!(
                            "secret `{name}` `{a}` has no mint_command; rotate it with --action {a}, the new value on standard input"
                        ));
                    }
                    plan.push((
                        a.to_string(),
                        spec.grace,
                        Source::Mint(spec.mint_command.clone()),
                    ));
                }
            }
        }
        // Every program is checked before anything runs or changes.
        for (_, _, source) in &plan {
            if let Source::Mint(argv) = source {
                check_program(argv)?;
            }
        }
        // Stdin is read before anything changes.
        let mut values = Vec::new();
        for (a, grace, source) in plan {
            let value = match &source {
                Source::Stdin => Some(read_stdin(&format!(
                    "new secret value for `{name}` `{a}`: "
                ))?),
                Source::Mint(_) => None,
            };
            values.push((a, grace, source, value));
        }
        runtime()?.block_on(async {
            let (store, kek) = open(&config, false).await?;
            sign_heads(&config, store.as_ref()).await?;
            let mut done = Vec::new();
            let rotated = rotate_each(store.as_ref(), &kek, name, values, &mut done).await;
            Ok((done, rotated))
        })
    })();
    // What was rotated is said, even when a later action failed.
    let (done, rotated) = match result {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    for (a, version, grace) in done {
        out!(
            "rotated `{name}` `{a}` to version {version}; the previous version stays for {}",
            humantime::format_duration(Duration::from_secs(grace))
        );
    }
    match rotated {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

/// `scrip secret delete NAME [--action A]`.
pub fn delete(config: Option<&Path>, name: &str, action: Option<&str>) -> ExitCode {
    let result = (|| {
        runtime()?.block_on(async {
            // Opens nothing sealed: no key-encryption key is needed.
            let (config, store) = crate::audit::open(config).await?;
            let stored = store.secrets().await.map_err(|e| e.to_string())?;
            let mut actions: Vec<(String, Vec<u32>)> = Vec::new();
            for r in stored
                .iter()
                .filter(|r| r.name == name && action.is_none_or(|a| r.action == a))
            {
                match actions.iter_mut().find(|(a, _)| *a == r.action) {
                    Some((_, versions)) => versions.push(r.version),
                    None => actions.push((r.action.clone(), vec![r.version])),
                }
            }
            if actions.is_empty() {
                return Err(match action {
                    Some(a) => format!(
                        "no secret `{name}` `{a}` is stored; `scrip secret list` shows what is"
                    ),
                    None => format!(
                        "no secret of `{name}` is stored; `scrip secret list` shows what is"
                    ),
                });
            }
            sign_heads(&config, store.as_ref()).await?;
            let at = now();
            let mut writes = Vec::new();
            for (a, versions) in &mut actions {
                versions.sort_unstable();
                writes.push(Write::DeleteSecret {
                    name: name.to_owned(),
                    action: a.clone(),
                    through: versions.last().copied().unwrap_or(0),
                });
                writes.push(Write::Audit(Box::new(AuditEvent {
                    at_ms: at * 1000,
                    event: "secret.deleted".to_owned(),
                    tool: Some(name.to_owned()),
                    actions: Some(a.clone()),
                    reason: Some(format!(
                        "every version deleted ({})",
                        versions_text(versions)
                    )),
                    replica: replica(),
                    ..AuditEvent::default()
                })));
            }
            store.commit(writes).await.map_err(|e| match e {
                StoreError::Conflict(why) => {
                    format!("{why}; nothing was deleted: run the command again")
                }
                e => e.to_string(),
            })?;
            Ok::<_, String>((actions, config.upstream(name).is_some()))
        })
    })();
    match result {
        Err(e) => fail(e),
        Ok((actions, configured)) => {
            for (a, versions) in &actions {
                out!("deleted `{name}` `{a}` ({})", versions_text(versions));
            }
            if configured {
                out!(
                    "the proxy refuses `{name}` requests that need a deleted secret until `scrip secret set` stores one"
                );
            }
            ExitCode::SUCCESS
        }
    }
}

/// `versions 1, 2` or `version 3`.
fn versions_text(versions: &[u32]) -> String {
    let list: Vec<String> = versions.iter().map(u32::to_string).collect();
    match list.as_slice() {
        [one] => format!("version {one}"),
        _ => format!("versions {}", list.join(", ")),
    }
}

/// `scrip secret list [--json]`.
pub fn list(config: Option<&Path>, json: bool) -> ExitCode {
    let result = (|| {
        runtime()?.block_on(async {
            // Never creates a store: an empty list from a wrong `data_dir`
            // would mislead.
            let (config, store) = crate::audit::open(config).await?;
            let records = store.secrets().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(scrip_proxy::secrets::statuses(&records, now(), |n, a| {
                spec(&config, n, a).ok().map(|(_, s)| (s.max_age, s.grace))
            }))
        })
    })();
    let statuses = match result {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    if json {
        for s in &statuses {
            out!("{}", serde_json::to_string(s).unwrap_or_default());
        }
    } else {
        out!(
            "{:<20} {:<10} {:>7} {:>14}  STATE",
            "NAME",
            "ACTION",
            "VERSION",
            "AGE"
        );
        for s in &statuses {
            let age = humantime::format_duration(Duration::from_secs(s.age)).to_string();
            let age = age.split(' ').take(2).collect::<Vec<_>>().join(" ");
            let state = if s.overdue {
                "current OVERDUE"
            } else {
                s.state
            };
            out!(
                "{:<20} {:<10} {:>7} {:>14}  {state}",
                s.name,
                s.action,
                s.version,
                age
            );
        }
    }
    ExitCode::SUCCESS
}
