//! `scrip audit`: verify, query and export the audit trail of a store.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use scrip_config::Config;
use std::sync::Arc;

use scrip_store::{AuditEvent, AuditFilter, Store};

use crate::fail;

/// Which records `query` shows.
#[derive(Debug, clap::Args)]
pub struct QueryArgs {
    /// Only this task id.
    #[arg(long)]
    pub task: Option<String>,
    /// Only this agent: the subject of the workload identity that started
    /// the task's tree (records of a sub-task are under it), exactly, at
    /// any issuer. Two trusted issuers may each have an agent of one
    /// subject (two clusters' `system:serviceaccount:ci:builder`): the
    /// table's issuer column tells their records apart; --issuer keeps one.
    #[arg(long)]
    pub agent: Option<String>,
    /// Only agents whose identity this issuer vouched for (`iss`, exactly):
    /// two issuers may each have an agent of the same subject.
    #[arg(long)]
    pub issuer: Option<String>,
    /// Only this tool.
    #[arg(long)]
    pub tool: Option<String>,
    /// Only records with this subject in their delegation chain: what it
    /// did as a sub-agent (recorded under the agent that started the
    /// task's tree, which --agent names), and what was done in the tasks
    /// delegated on from its own. The chain records subjects only, so the
    /// subject matches at any issuer; --issuer, which names the issuer of
    /// the agent that started the tree, is refused beside it. Each record
    /// is read for it (no index holds it): give --since, or another
    /// filter, on a large trail.
    #[arg(long, value_name = "SUBJECT", conflicts_with = "issuer")]
    pub actor: Option<String>,
    /// Only this decision.
    #[arg(long, value_parser = ["allow", "deny"])]
    pub decision: Option<String>,
    /// Only this event, exactly (`approval.granted`, `token.issued`; the
    /// events are listed in docs/audit.md). Read from each record (no
    /// index): give --since, or another filter, on a large trail.
    #[arg(long, value_name = "EVENT")]
    pub event: Option<String>,
    /// Only records naming this token id (`jti`): an access token's issue,
    /// its uses at the proxy and by introspection, its revocation (a task
    /// token's `jti` names its start; its task's records are --task). Read
    /// from each record (no index): give --since, or another filter, on a
    /// large trail.
    #[arg(long, value_name = "JTI")]
    pub jti: Option<String>,
    /// Only records at or after this time: RFC 3339 with its zone
    /// (`2026-11-24T10:00:00Z`, `2026-11-24T11:00:00+01:00`) or a duration
    /// ago (`15m`, `2h`, `3days`). The trail is read from the first record
    /// stamped at or after it, found through the index on time, not from
    /// its oldest.
    #[arg(long, value_parser = parse_time)]
    pub since: Option<u64>,
    /// Only records before this time (same forms as --since).
    #[arg(long, value_parser = parse_time)]
    pub until: Option<u64>,
    /// At most this many records, the oldest first (a note on stderr says
    /// when more matched).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: u32,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A time as milliseconds since the epoch.
fn parse_time(s: &str) -> Result<u64, String> {
    let at = match humantime::parse_duration(s) {
        Ok(ago) => SystemTime::now()
            .checked_sub(ago)
            .ok_or("duration reaches before the epoch")?,
        Err(_) => zoned_time(s)?,
    };
    let ms = at
        .duration_since(UNIX_EPOCH)
        .map_err(|_| "time before the epoch")?
        .as_millis();
    u64::try_from(ms).map_err(|_| "time too far ahead".to_owned())
}

/// An RFC 3339 time with its zone as milliseconds since the epoch; no
/// duration ago (for a bound that must not move on with each run).
pub(crate) fn parse_instant(s: &str) -> Result<u64, String> {
    if humantime::parse_duration(s).is_ok() {
        return Err(format!(
            "`{s}` is a duration, which would move on with each run: give the RFC 3339 time, with its zone, up to which the losses are known (the latest `found at` the report printed for them)"
        ));
    }
    let ms = zoned_time(s)
        .map_err(|_| {
            format!("`{s}` is not an RFC 3339 time with its zone, like `2026-11-24T10:00:00Z`")
        })?
        .duration_since(UNIX_EPOCH)
        .map_err(|_| "time before the epoch")?
        .as_millis();
    u64::try_from(ms).map_err(|_| "time too far ahead".to_owned())
}

/// An RFC 3339 time with its zone: `Z` or a numeric offset. One without a
/// zone is refused rather than taken as UTC (or as local time): the window
/// would be hours off without a word.
fn zoned_time(s: &str) -> Result<SystemTime, String> {
    let neither = || format!("`{s}` is neither an RFC 3339 time nor a duration like `15m`");
    let offset = |tail: &str| -> Option<i64> {
        let b = tail.as_bytes();
        let digit = |i: usize| {
            b.get(i)
                .filter(|c| c.is_ascii_digit())
                .map(|c| i64::from(c - b'0'))
        };
        let sign = match b.first() {
            Some(b'+') => 1,
            Some(b'-') => -1,
            _ => return None,
        };
        if b.len() != 6 || b.get(3) != Some(&b':') {
            return None;
        }
        let (hours, minutes) = (digit(1)? * 10 + digit(2)?, digit(4)? * 10 + digit(5)?);
        (hours < 24 && minutes < 60).then_some(sign * (hours * 3600 + minutes * 60))
    };
    let (local, east) = if let Some(base) = s.strip_suffix(['Z', 'z']) {
        (base, 0)
    } else if let Some((base, east)) = s
        .len()
        .checked_sub(6)
        .and_then(|at| Some((s.get(..at)?, offset(s.get(at..)?)?)))
    {
        (base, east)
    } else if humantime::parse_rfc3339_weak(s).is_ok() {
        return Err(format!(
            "`{s}` has no time zone: end it with `Z` (UTC) or an offset such as `+01:00`"
        ));
    } else {
        return Err(neither());
    };
    // RFC 3339 §5.6 allows a lowercase `t` between date and time.
    let local = match (local.get(..10), local.get(10..11), local.get(11..)) {
        (Some(date), Some("t"), Some(time)) => format!("{date}T{time}"),
        _ => local.to_owned(),
    };
    let t = humantime::parse_rfc3339_weak(&local).map_err(|_| neither())?;
    let shift = Duration::from_secs(east.unsigned_abs());
    // The local time is `east` ahead of UTC.
    if east >= 0 {
        t.checked_sub(shift)
    } else {
        t.checked_add(shift)
    }
    .ok_or_else(neither)
}

/// The store, for a command that only reads it: never created or migrated
/// (see [`scrip_store::open_existing`]).
pub(crate) async fn open(config: Option<&Path>) -> Result<(Config, Arc<dyn Store>), String> {
    let config = Config::load(config).map_err(|e| e.to_string())?;
    let path = config.data_dir.join("scrip.db");
    if config.database_url.is_none() && !path.exists() {
        return Err(format!(
            "no store at `{}`: is data_dir right?",
            path.display()
        ));
    }
    let store = scrip_store::open_existing(config.database_url.as_deref(), &path)
        .await
        .map_err(|e| e.to_string())?;
    Ok((config, store))
}

/// Seconds since the epoch.
pub(crate) fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Milliseconds since the epoch.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A single-threaded runtime for a command that talks to the store.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

/// `scrip migrate`: opening the store applies its migrations.
pub fn migrate(config: Option<&Path>) -> ExitCode {
    let result = runtime().and_then(|rt| {
        rt.block_on(async {
            let config = Config::load(config).map_err(|e| e.to_string())?;
            if config.database_url.is_none() {
                scrip_server::keys::ensure_private_dir(&config.data_dir)
                    .map_err(|e| e.to_string())?;
            }
            let path = config.data_dir.join("scrip.db");
            scrip_store::open(config.database_url.as_deref(), &path)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(if config.database_url.is_some() {
                "the PostgreSQL store".to_owned()
            } else {
                format!("`{}`", path.display())
            })
        })
    });
    match result {
        Ok(what) => {
            out!("ok: {what} is migrated to the current schema");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// The audit checkpoint keys (Ed25519 public JWKs, as `/audit/keys`
/// serves them) in `v`, a JWK or a JWKS. Anything else is refused: taken
/// as keys, another document (scrip's token keys from `/jwks`, an empty
/// set) would report every checkpoint as forged, a false alarm.
fn checkpoint_keys(v: serde_json::Value) -> Result<Vec<serde_json::Value>, String> {
    let keys = match v.get("keys") {
        Some(serde_json::Value::Array(keys)) => keys.clone(),
        Some(_) => return Err("is not a JWK or JWKS".into()),
        None => vec![v],
    };
    let is_checkpoint_key = |k: &serde_json::Value| {
        k.get("kty").and_then(|v| v.as_str()) == Some("OKP")
            && k.get("crv").and_then(|v| v.as_str()) == Some("Ed25519")
            && k.get("x").and_then(|v| v.as_str()).is_some()
            && k.get("d").is_none()
    };
    if keys.is_empty() || !keys.iter().all(is_checkpoint_key) {
        return Err(
            "holds no audit checkpoint keys (Ed25519 public keys, as `/audit/keys` serves them; `/jwks` holds scrip's token keys, which sign no checkpoint)"
                .into(),
        );
    }
    Ok(keys)
}

/// What `scrip audit verify` fails on besides tampering.
#[derive(Debug, Clone, Copy, Default)]
pub struct Demands {
    /// Records their own writer never signed.
    pub strict: bool,
    /// Not records lost to a rollback of the store that a chain found at or
    /// before this time (ms since the epoch; listed either way).
    pub allow_rolled_back_before: Option<u64>,
}

/// `scrip audit verify`.
pub fn verify(config: Option<&Path>, public_key: Option<&PathBuf>, demands: Demands) -> ExitCode {
    let result = runtime().and_then(|rt| {
        rt.block_on(async {
            let (config, store) = open(config).await?;
            let jwks = match public_key {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
                    let v: serde_json::Value = serde_json::from_str(&text)
                        .map_err(|_| format!("`{}` is not a JWK or JWKS", path.display()))?;
                    checkpoint_keys(v).map_err(|why| format!("`{}` {why}", path.display()))?
                }
                None if config.database_url.is_some() => {
                    scrip_server::keyring::shared_checkpoint_jwks(&config, store.as_ref(), now_s())
                        .await
                        .map_err(|e| match e {
                            // Verifying needs the public keys only: an
                            // auditor is not to be given this one.
                            scrip_server::keys::KeyError::MissingKek { .. } => format!(
                                "{e}; or, to verify without it, pass a copy of the server's /audit/keys as --public-key"
                            ),
                            e => e.to_string(),
                        })?
                }
                None => vec![
                    scrip_server::keys::read_checkpoint_key(&config.data_dir)
                        .map_err(|e| e.to_string())?
                        .public_jwk(),
                ],
            };
            let grace = scrip_server::audit::signature_grace_ms(&config);
            let kids: Vec<String> = jwks
                .iter()
                .map(|k| printable(k.get("kid").and_then(|v| v.as_str()).unwrap_or("(no kid)")))
                .collect();
            // Strict: recent records unsigned at a first reading must be
            // signed at a second.
            let report = if demands.strict {
                scrip_server::audit::verify_twice(store.as_ref(), &jwks, now_ms, grace).await
            } else {
                scrip_server::audit::verify(store.as_ref(), &jwks, now_ms(), grace).await
            }
            .map_err(|e| e.to_string())?;
            Ok::<_, String>((report, kids))
        })
    });
    match result {
        Err(e) => fail(e),
        Ok((report, kids)) => {
            let (lines, passed) = verify_report(&report, &kids, demands);
            for line in lines {
                out!("{line}");
            }
            // Not one checkpoint verifies with the keys given: more likely
            // the wrong file (with EdDSA signing, `/jwks` holds Ed25519
            // keys too) than every checkpoint forged.
            if public_key.is_some() && report.checkpoints == 0 && !report.problems.is_empty() {
                #[expect(clippy::print_stderr, reason = "a note beside the report")]
                {
                    eprintln!(
                        "scrip: no checkpoint verified with the keys in --public-key: check that it is a copy of `/audit/keys` (not of `/jwks`, scrip's token keys) before taking the trail for tampered"
                    );
                }
            }
            if passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The lines naming what a rollback of the store lost (none when nothing
/// was), the first saying `verdict`; with `allowed`, each loss found after
/// it says so.
fn lost_lines(report: &scrip_store::Report, verdict: &str, allowed: Option<u64>) -> Vec<String> {
    if report.lost.is_empty() && report.more_lost == 0 {
        return Vec::new();
    }
    let chains: std::collections::BTreeSet<&str> = report
        .lost
        .iter()
        .map(|(_, _, l)| l.chain_id.as_str())
        .collect();
    // Counts from the store: saturating, as whoever wrote it chose them.
    let records = report
        .lost
        .iter()
        .map(|(_, _, l)| l.to.saturating_add(1).saturating_sub(l.from))
        .fold(0u64, u64::saturating_add);
    let mut lines = vec![format!(
        "{verdict}: records a running scrip had committed are gone from the store ({records} of {} chain(s)), with whatever was committed with them (revocations, ended tasks, withdrawn keys): it was rolled back under it (a failover to a standby that had not received them, a backup restored in place) or someone deleted them; the next chain it started names them, found at the time given; --allow-rolled-back-before TIME passes those found at or before TIME once you know why:",
        chains.len()
    )];
    for (chain, at_ms, l) in &report.lost {
        let after = if allowed.is_some_and(|t| *at_ms > t) {
            " (found after the time given)"
        } else {
            ""
        };
        lines.push(format!(
            "  chain {} #{} to #{} (its last record's hash {}), found at {} by chain {}{after}",
            printable(&l.chain_id),
            l.from,
            l.to,
            printable(&l.hash),
            when(*at_ms),
            printable(chain)
        ));
    }
    if report.more_lost > 0 {
        lines.push(format!(
            "  and {} more, not listed (only the first {} are), which no time passes",
            report.more_lost,
            scrip_store::MAX_LOST
        ));
    }
    lines
}

/// What `scrip audit verify` prints of `report`, and whether it passed.
fn verify_report(
    report: &scrip_store::Report,
    kids: &[String],
    demands: Demands,
) -> (Vec<String>, bool) {
    let Demands {
        strict,
        allow_rolled_back_before,
    } = demands;
    // A loss passes only where the operator said it was known: one found
    // since (the tail of a live chain deleted, an older signed head put
    // back, looks the same) still fails.
    let allowed = |at_ms: u64| allow_rolled_back_before.is_some_and(|t| at_ms <= t);
    let trusted = format!("checkpoint keys trusted: {}", kids.join(", "));
    if !report.problems.is_empty() {
        let mut lines: Vec<String> = report
            .problems
            .iter()
            // A problem quotes what the store holds (a chain id), which
            // whoever tampered with it chose: escaped, so that it cannot
            // clear the screen and print an "ok" over the report.
            .map(|p| format!("TAMPERED {}", printable(&p.to_string())))
            .collect();
        if report.more_problems > 0 {
            lines.push(format!(
                "TAMPERED and {} more problems, not listed (only the first {} are)",
                report.more_problems,
                scrip_store::MAX_PROBLEMS
            ));
        }
        lines.extend(lost_lines(report, "also", None));
        lines.push(trusted);
        lines.push(format!(
            "{} problems in {} records ({} chains)",
            report.problems_found(),
            report.records,
            report.chains
        ));
        return (lines, false);
    }
    let mut lines = vec![
        format!(
            "ok: {} records in {} chains verified; {} signed checkpoints match",
            report.records, report.chains, report.checkpoints
        ),
        trusted,
    ];
    if report.unsigned > 0 {
        lines.push(format!(
            "{} recent records wait for their writers' next signed checkpoint",
            report.unsigned
        ));
    }
    let passed = report.lost.iter().all(|(_, at_ms, _)| allowed(*at_ms)) && report.more_lost == 0;
    lines.extend(lost_lines(
        report,
        if passed { "note" } else { "FAILED" },
        allow_rolled_back_before,
    ));
    if report.vouched.is_empty() {
        return (lines, passed);
    }
    let records = report
        .vouched
        .iter()
        .map(|(_, a, b)| b.saturating_add(1).saturating_sub(*a))
        .fold(0u64, u64::saturating_add);
    lines.push(format!(
        "{}: {records} records carry no signature of the process that wrote them (scrip signs each commit's records as it writes them: an older scrip that crashed first, or a `scrip secret`, `scrip key` or `scrip task revoke` command that warned it could not sign, wrote these; or someone else did, or deleted their signatures); a later process's signed start proves they existed then, not who wrote them; --strict fails on them:",
        if strict { "FAILED" } else { "note" }
    ));
    for (chain, from, to) in &report.vouched {
        lines.push(format!("  chain {} #{from} to #{to}", printable(chain)));
    }
    (lines, passed && !strict)
}

/// The last millisecond RFC 3339 can write (9999-12-31T23:59:59.999Z).
const LAST_RFC3339_MS: u64 = 253_402_300_799_999;

/// `ms` since the epoch in RFC 3339, or as the number when past what RFC
/// 3339 can write (a stored time is not trusted to be sane).
pub(crate) fn when(ms: u64) -> String {
    if ms > LAST_RFC3339_MS {
        return format!("{ms} ms");
    }
    let t = UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

/// `s` safe to print on a terminal: control characters (newlines, escape
/// sequences), line separators, bidirectional-format characters (which
/// reorder what follows) and invisible ones
/// ([`scrip_token::is_deceptive`]) are written as `\u{..}` escapes, so a
/// value from an agent or a token cannot forge or hide a line of what a
/// person reads.
pub(crate) fn printable(s: &str) -> String {
    scrip_token::escape_deceptive(s)
}

/// A column's text, printable, cut to `width` characters at its end.
pub(crate) fn cell(s: Option<&str>, width: usize) -> String {
    let s = printable(s.unwrap_or("-"));
    if s.chars().count() > width {
        let mut out: String = s.chars().take(width.saturating_sub(1)).collect();
        out.push('…');
        out
    } else {
        s
    }
}

/// An agent's column: cut in its middle, since subjects alike at their
/// start tell workloads apart at their end (`repo:acme/app:ref:refs/heads/main`
/// and `…/heads/evil`).
pub(crate) fn agent_cell(s: Option<&str>, width: usize) -> String {
    let s = printable(s.unwrap_or("-"));
    let count = s.chars().count();
    if count > width {
        let head = width.saturating_sub(1) / 2;
        let tail = width.saturating_sub(1) - head;
        let mut out: String = s.chars().take(head).collect();
        out.push('…');
        out.extend(s.chars().skip(count - tail));
        out
    } else {
        s
    }
}

/// The widest an issuer column is made when the issuers it shows need no
/// more to read apart: a GitHub Actions issuer fits whole.
const ISSUER_WIDTH: usize = 44;

/// The width of a column of `issuers`: the longest (at least the heading
/// `issuer`), up to [`ISSUER_WIDTH`], beyond which they are cut in their
/// middle as agents are ([`agent_cell`]: a cloud's cluster issuers differ
/// at their end); but never so narrow that two issuers shown read the
/// same, which would pin one cluster's workload's doings on another's.
pub(crate) fn issuer_width<'a>(issuers: impl IntoIterator<Item = &'a str>) -> usize {
    let issuers: std::collections::BTreeSet<&str> = issuers.into_iter().collect();
    let longest = issuers
        .iter()
        .map(|i| printable(i).chars().count())
        .max()
        .unwrap_or(0);
    let mut width = longest.min(ISSUER_WIDTH).max("issuer".len());
    while width < longest {
        let cut: std::collections::BTreeSet<String> =
            issuers.iter().map(|i| agent_cell(Some(i), width)).collect();
        if cut.len() == issuers.len() {
            break;
        }
        width += 1;
    }
    width
}

fn print_table(records: &[AuditEvent]) {
    let iss = issuer_width(records.iter().filter_map(|r| r.agent_iss.as_deref()));
    out!(
        "{:>8}  {:<24}  {:<16}  {:<5}  {:<28}  {:<iss$}  {:<22}  {:<10}  {:<16}  reason",
        "seq",
        "time",
        "event",
        "dec",
        "agent",
        "issuer",
        "task",
        "tool",
        "actions"
    );
    for r in records {
        out!(
            "{:>8}  {:<24}  {:<16}  {:<5}  {:<28}  {:<iss$}  {:<22}  {:<10}  {:<16}  {}",
            r.seq,
            when(r.at_ms),
            cell(Some(&r.event), 16),
            cell(r.decision.as_deref(), 5),
            agent_cell(r.agent_sub.as_deref(), 28),
            agent_cell(r.agent_iss.as_deref(), iss),
            cell(r.task_id.as_deref(), 22),
            cell(r.tool.as_deref(), 10),
            cell(r.actions.as_deref(), 16),
            cell(r.reason.as_deref(), 80),
        );
    }
}

/// `scrip audit query`.
pub fn query(config: Option<&Path>, args: &QueryArgs) -> ExitCode {
    let filter = AuditFilter {
        task_id: args.task.clone(),
        agent_sub: args.agent.clone(),
        agent_iss: args.issuer.clone(),
        tool: args.tool.clone(),
        actor: args.actor.clone(),
        decision: args.decision.clone(),
        event: args.event.clone(),
        jti: args.jti.clone(),
        since_ms: args.since,
        until_ms: args.until,
        after_seq: None,
        limit: Some(args.limit),
    };
    let result = runtime().and_then(|rt| {
        rt.block_on(async {
            let (_, store) = open(config).await?;
            store.audit(&filter).await.map_err(|e| e.to_string())
        })
    });
    match result {
        Err(e) => fail(e),
        Ok(records) => {
            if args.json {
                for r in &records {
                    out!("{}", serde_json::to_string(r).unwrap_or_default());
                }
            } else {
                print_table(&records);
            }
            // Records come oldest first: say when newer ones were left out.
            if u64::try_from(records.len()).unwrap_or(u64::MAX) >= u64::from(args.limit) {
                #[expect(clippy::print_stderr, reason = "a note beside the output")]
                {
                    eprintln!(
                        "scrip: showing the oldest {} matching records; later ones may exist (narrow with --since, or raise --limit)",
                        records.len()
                    );
                }
            }
            ExitCode::SUCCESS
        }
    }
}

/// `scrip audit export`: JSON lines from a cursor, optionally following.
/// Each line is the record exactly as it was hashed, with `seq` and `hash`
/// put first, so a copy kept elsewhere can be checked byte for byte; a
/// record that is not a JSON object is exported as a string and the
/// export goes on (a one-shot export then exits 1).
pub fn export(config: Option<&Path>, after: i64, follow: bool) -> ExitCode {
    let result = runtime().and_then(|rt| {
        rt.block_on(async {
            let (_, store) = open(config).await?;
            let mut cursor = after;
            let mut unreadable = 0_u64;
            past_the_newest(store.as_ref(), cursor).await?;
            loop {
                let page = store
                    .audit_rows(cursor, 5000)
                    .await
                    .map_err(|e| e.to_string())?;
                for r in &page {
                    let (line, readable) = export_line(r);
                    if !readable {
                        unreadable += 1;
                        #[expect(clippy::print_stderr, reason = "a note beside the output")]
                        {
                            eprintln!(
                                "scrip: record {} is not one JSON object as scrip writes them; exported as a string under `unreadable_record`",
                                r.seq
                            );
                        }
                    }
                    out!("{line}");
                    // A closed pipe (`| head`) ends the export (exit 141).
                    if crate::stdout_gone() {
                        return Ok(0);
                    }
                    cursor = r.seq;
                }
                if page.is_empty() {
                    if !follow {
                        return Ok(unreadable);
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    past_the_newest(store.as_ref(), cursor).await?;
                }
            }
        })
    });
    match result {
        Err(e) => fail(e),
        Ok(0) => ExitCode::SUCCESS,
        Ok(n) => fail(format!(
            "{n} records are not JSON objects as scrip writes them and were exported as strings under `unreadable_record`; run `scrip audit verify`"
        )),
    }
}

/// Refuses a cursor past the store's newest record: the store was restored
/// from a backup (or it is another store), and the numbers after its newest
/// will be given to other records than those exported under them.
async fn past_the_newest(store: &dyn scrip_store::Store, cursor: i64) -> Result<(), String> {
    if cursor <= 0 {
        return Ok(());
    }
    let newest = store.latest_audit_seq().await.map_err(|e| e.to_string())?;
    if cursor > newest {
        return Err(format!(
            "--after {cursor} is past this store's newest record ({newest}): it was restored from a backup, or it is another store, and its next records will be numbered as ones already exported; start a new export from --after {newest} and keep the earlier one apart (see docs/backups.md)"
        ));
    }
    Ok(())
}

/// One line of `audit export` and whether the record was a JSON object:
/// `{"seq":N,"hash":"…",` followed by the stored record after its `{`, so
/// that removing those two members gives back the bytes that were hashed.
/// A stored record that is not one JSON object on one line, or that has
/// its own `seq` or `hash`, is put whole in a string instead, so that no
/// line is malformed or says two things.
fn export_line(r: &scrip_store::StoredRecord) -> (String, bool) {
    let head = format!(
        "{{\"seq\":{},\"hash\":{}",
        r.seq,
        serde_json::Value::from(r.hash.as_str())
    );
    let object = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&r.record);
    let spliceable = matches!(&object, Ok(o) if !o.is_empty() && !o.contains_key("seq") && !o.contains_key("hash"))
        && r.record.starts_with('{')
        && !r.record.contains(['\n', '\r']);
    match r.record.strip_prefix('{') {
        Some(rest) if spliceable => (format!("{head},{rest}"), true),
        _ => (
            format!(
                "{head},\"chain_id\":{},\"chain_seq\":{},\"unreadable_record\":{}}}",
                serde_json::Value::from(r.chain_id.as_str()),
                r.chain_seq,
                serde_json::Value::from(r.record.as_str())
            ),
            false,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Times carry their zone: an offset is applied, none is refused.
    #[test]
    fn times_are_read_with_their_zone() {
        let utc = parse_time("2026-11-24T10:00:00Z").unwrap();
        assert_eq!(utc, 1_795_514_400_000);
        assert_eq!(parse_time("2026-11-24T11:00:00+01:00").unwrap(), utc);
        assert_eq!(parse_time("2026-11-24T04:30:00-05:30").unwrap(), utc);
        assert_eq!(parse_time("2026-11-24T10:00:00.250z").unwrap(), utc + 250);
        assert_eq!(
            parse_time("2026-11-24t11:00:00.250+01:00").unwrap(),
            utc + 250
        );
        let e = parse_time("2026-11-24T10:00:00").unwrap_err();
        assert!(e.contains("no time zone"), "{e}");
        let e = parse_time("2026-11-24 10:00:00").unwrap_err();
        assert!(e.contains("no time zone"), "{e}");
        for bad in [
            "2026-11-24T10:00:00+25:00",
            "yesterday",
            "2026-11-24T10:00:00+1:00",
        ] {
            let e = parse_time(bad).unwrap_err();
            assert!(e.contains("neither"), "{bad}: {e}");
        }
        let ago = parse_time("15m").unwrap();
        assert!(ago < now_ms() && ago > now_ms() - 16 * 60 * 1000);
    }

    /// Only checkpoint keys are trusted to verify checkpoints: any other
    /// document is refused, not read as a set that forges every one.
    #[test]
    fn a_key_file_must_hold_checkpoint_keys() {
        use serde_json::json;
        let key = json!({"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": "k1"});
        assert_eq!(checkpoint_keys(key.clone()).unwrap(), vec![key.clone()]);
        let set = json!({"keys": [key.clone(), key.clone()]});
        assert_eq!(checkpoint_keys(set).unwrap().len(), 2);
        for wrong in [
            json!({"keys": []}),
            json!([]),
            json!({"kty": "OKP"}),
            json!({"keys": "x"}),
            // scrip's token keys, from `/jwks`.
            json!({"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "kid": "t"}]}),
            json!({"keys": [key.clone(), {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]}),
            json!({"kty": "OKP", "crv": "Ed25519", "x": "AA", "d": "AA"}),
        ] {
            let e = checkpoint_keys(wrong.clone()).unwrap_err();
            assert!(
                e.contains("no audit checkpoint keys") || e.contains("not a JWK"),
                "{wrong}: {e}"
            );
        }
    }

    fn stored(record: &str) -> scrip_store::StoredRecord {
        scrip_store::StoredRecord {
            seq: 7,
            chain_id: "c1".into(),
            chain_seq: 3,
            hash: scrip_store::hash(record.as_bytes()),
            record: record.into(),
            columns: scrip_store::IndexedColumns::default(),
        }
    }

    /// An exported line gives back the hashed bytes, including members
    /// this scrip does not know, once `seq` and `hash` are taken off.
    #[test]
    fn an_exported_line_is_the_hashed_record() {
        let record = r#"{"chain_id":"c1","chain_seq":3,"event":"task.started","from_a_later_scrip":[1.50,"\u00e9"]}"#;
        let (line, readable) = export_line(&stored(record));
        assert!(readable);
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["seq"], 7);
        let hash = scrip_store::hash(record.as_bytes());
        assert_eq!(parsed["hash"], hash.as_str());
        let prefix = format!("{{\"seq\":7,\"hash\":\"{hash}\",");
        let rest = line.strip_prefix(&prefix).expect(&line);
        assert_eq!(format!("{{{rest}"), record);
    }

    /// What is not one JSON object on one line, or would say `seq` or
    /// `hash` twice, is exported whole as a string, on one valid line.
    #[test]
    fn a_record_that_is_no_json_object_is_exported_as_a_string() {
        for record in [
            "garbage",
            "",
            "{}",
            "[1,2]",
            "{\"event\":\"x\"",
            "{\"seq\":1,\"event\":\"x\"}",
            "{\"hash\":\"h\",\"event\":\"x\"}",
            "{\"event\":\n\"x\"}",
            " {\"event\":\"x\"}",
        ] {
            let (line, readable) = export_line(&stored(record));
            assert!(!readable, "{record:?}");
            assert!(!line.contains('\n'), "{line:?}");
            let parsed: serde_json::Value = serde_json::from_str(&line).expect(&line);
            assert_eq!(parsed["seq"], 7);
            assert_eq!(parsed["chain_id"], "c1");
            assert_eq!(parsed["chain_seq"], 3);
            assert_eq!(parsed["unreadable_record"], record, "{line}");
        }
    }

    /// The bound of `--allow-rolled-back-before` is a time, never a
    /// duration ago, which would move on with each run and pass every
    /// loss in time; the `found at` a report prints is taken as is.
    #[test]
    fn a_rollback_bound_is_a_fixed_time() {
        let e = parse_instant("2h").unwrap_err();
        assert!(e.contains("is a duration"), "{e}");
        let e = parse_instant("2023-11-14T22:13:20").unwrap_err();
        assert!(e.contains("not an RFC 3339 time with its zone"), "{e}");
        assert_eq!(
            parse_instant(&when(1_700_000_000_000)),
            Ok(1_700_000_000_000)
        );
    }

    const STRICT: Demands = Demands {
        strict: true,
        allow_rolled_back_before: None,
    };

    /// Records only a later start vouches for are listed apart, and fail
    /// the check with --strict only; the trusted keys are named either way.
    #[test]
    fn the_report_lists_what_its_writer_never_signed() {
        let kids = ["k1".to_owned(), "k2".to_owned()];
        let mut report = scrip_store::Report {
            records: 10,
            chains: 2,
            checkpoints: 2,
            unsigned: 4,
            ..scrip_store::Report::default()
        };
        let (lines, passed) = verify_report(&report, &kids, STRICT);
        assert!(passed);
        assert_eq!(
            lines,
            [
                "ok: 10 records in 2 chains verified; 2 signed checkpoints match",
                "checkpoint keys trusted: k1, k2",
                "4 recent records wait for their writers' next signed checkpoint",
            ]
        );
        report.vouched = vec![("c1".into(), 5, 7), ("c2".into(), 1, 1)];
        let (lines, passed) = verify_report(&report, &kids, Demands::default());
        assert!(passed);
        assert!(
            lines[3]
                .starts_with("note: 4 records carry no signature of the process that wrote them"),
            "{lines:?}"
        );
        assert_eq!(lines[4..], ["  chain c1 #5 to #7", "  chain c2 #1 to #1"]);
        let (lines, passed) = verify_report(&report, &kids, STRICT);
        assert!(!passed);
        assert!(lines[3].starts_with("FAILED: 4 records"), "{lines:?}");

        // A rollback: a failure, whatever --strict says, unless allowed.
        report.vouched.clear();
        report.lost = vec![(
            "c3".into(),
            1_700_000_000_000,
            scrip_store::Lost {
                chain_id: "c1\u{1b}[2J".into(),
                from: 9,
                to: 12,
                hash: "h12".into(),
            },
        )];
        let (lines, passed) = verify_report(&report, &kids, Demands::default());
        assert!(!passed);
        assert!(
            lines[3].starts_with(
                "FAILED: records a running scrip had committed are gone from the store (4 of 1 chain(s))"
            ),
            "{lines:?}"
        );
        assert_eq!(
            lines[4],
            "  chain c1\\u{1b}[2J #9 to #12 (its last record's hash h12), found at 2023-11-14T22:13:20.000Z by chain c3"
        );
        let allowed = Demands {
            allow_rolled_back_before: Some(1_700_000_000_000),
            ..Demands::default()
        };
        let (lines, passed) = verify_report(&report, &kids, allowed);
        assert!(passed);
        assert!(
            lines[3].starts_with("note: records a running scrip"),
            "{lines:?}"
        );
        // Only those found at or before the time given; one found after
        // says so.
        let before = Demands {
            allow_rolled_back_before: Some(1_699_999_999_999),
            ..Demands::default()
        };
        let (lines, passed) = verify_report(&report, &kids, before);
        assert!(!passed);
        assert!(
            lines[4].ends_with("by chain c3 (found after the time given)"),
            "{lines:?}"
        );
        // A start naming more than are listed: counted, and failed.
        report.more_lost = 2;
        let (lines, passed) = verify_report(&report, &kids, allowed);
        assert!(!passed);
        assert!(
            lines[5].starts_with("  and 2 more, not listed"),
            "{lines:?}"
        );
        report.more_lost = 0;
        // Listed beside tampering too, and counted without overflowing
        // whatever the store says.
        report.lost.push((
            "c4".into(),
            1,
            scrip_store::Lost {
                chain_id: "c5".into(),
                from: 0,
                to: u64::MAX,
                hash: "h".into(),
            },
        ));
        report.lost.push(report.lost[1].clone());
        report.problems.push(scrip_store::Problem {
            seq: Some(1),
            chain_id: "c1".into(),
            chain_seq: 1,
            what: "edited".into(),
        });
        let (lines, passed) = verify_report(&report, &kids, allowed);
        assert!(!passed);
        assert!(
            lines.iter().any(|l| l.starts_with(&format!(
                "also: records a running scrip had committed are gone from the store ({} of 2 chain(s))",
                u64::MAX
            ))),
            "{lines:?}"
        );
    }

    #[test]
    fn a_tampered_report_shows_no_control_character_the_store_held() {
        let report = scrip_store::Report {
            records: 3,
            chains: 1,
            problems: vec![scrip_store::Problem {
                seq: Some(1),
                chain_id: "\u{1b}[2J\u{1b}[Hok: 3 records in 1 chains verified\n\u{1b}[8m".into(),
                chain_seq: 1,
                what: "the row's chain is not the record's".into(),
            }],
            ..scrip_store::Report::default()
        };
        let (lines, passed) = verify_report(&report, &[], Demands::default());
        assert!(!passed);
        assert!(lines[0].starts_with("TAMPERED "), "{lines:?}");
        for line in &lines {
            assert!(!line.chars().any(char::is_control), "{line:?}");
        }
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(lines[2], "1 problems in 3 records (1 chains)");
    }

    /// Problems past those listed are said to be there, and counted.
    #[test]
    fn a_report_says_how_many_problems_it_does_not_list() {
        let report = scrip_store::Report {
            records: 30_000,
            chains: 1,
            problems: vec![scrip_store::Problem {
                seq: Some(1),
                chain_id: "c1".into(),
                chain_seq: 1,
                what: "content does not match its hash: edited".into(),
            }],
            more_problems: 20_000,
            ..scrip_store::Report::default()
        };
        let (lines, passed) = verify_report(&report, &[], Demands::default());
        assert!(!passed);
        assert_eq!(
            lines[1],
            "TAMPERED and 20000 more problems, not listed (only the first 10000 are)"
        );
        assert_eq!(lines[3], "20001 problems in 30000 records (1 chains)");
    }

    #[test]
    fn what_a_person_reads_cannot_be_forged() {
        assert_eq!(printable("a\nb"), "a\\u{a}b");
        assert_eq!(printable("x\u{1b}[2Jy"), "x\\u{1b}[2Jy");
        assert_eq!(printable("ab\u{202e}cd"), "ab\\u{202e}cd");
        assert_eq!(printable("système:agents"), "système:agents");
        assert_eq!(cell(Some("a\r\nb"), 80), "a\\u{d}\\u{a}b");
    }

    /// Two runs of one repository, from `main` and from another branch,
    /// read apart in the agent column.
    #[test]
    fn an_agent_column_keeps_both_ends() {
        let main = agent_cell(Some("repo:acme/infra:ref:refs/heads/main"), 28);
        let evil = agent_cell(Some("repo:acme/infra:ref:refs/heads/evil"), 28);
        assert_eq!(main, "repo:acme/inf…efs/heads/main");
        assert_eq!(main.chars().count(), 28);
        assert_ne!(main, evil);
        assert_eq!(agent_cell(Some("coder"), 28), "coder");
        assert_eq!(agent_cell(None, 28), "-");
    }

    /// An issuer column fits what it shows up to a width, beyond which
    /// issuers are cut in their middle; but it widens as far as two
    /// issuers shown need to read apart.
    #[test]
    fn an_issuer_column_never_shows_two_issuers_alike() {
        assert_eq!(issuer_width([]), "issuer".len());
        assert_eq!(issuer_width(["https://a.test"]), 14);
        let github = "https://token.actions.githubusercontent.com";
        assert_eq!(issuer_width([github, "https://a.test"]), github.len());
        let eks = "https://oidc.eks.us-east-1.amazonaws.com/id/EXAMPLED539D4633E53DE1B71EXAMPLE";
        assert_eq!(issuer_width([eks, eks]), ISSUER_WIDTH);
        // Alike at both ends, apart only in their middle.
        let (x, y) = (
            format!(
                "https://idp.example/{}-x-{}",
                "a".repeat(30),
                "b".repeat(30)
            ),
            format!(
                "https://idp.example/{}-y-{}",
                "a".repeat(30),
                "b".repeat(30)
            ),
        );
        let width = issuer_width([x.as_str(), y.as_str(), github]);
        assert!(width > ISSUER_WIDTH && width < x.len(), "{width}");
        assert_ne!(agent_cell(Some(&x), width), agent_cell(Some(&y), width));
        assert_eq!(
            agent_cell(Some(&x), width - 1),
            agent_cell(Some(&y), width - 1)
        );
    }

    #[test]
    fn times_past_rfc3339_are_numbers() {
        assert_eq!(when(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(when(LAST_RFC3339_MS), "9999-12-31T23:59:59.999Z");
        assert_eq!(when(LAST_RFC3339_MS + 1), "253402300800000 ms");
        assert_eq!(when(u64::MAX), format!("{} ms", u64::MAX));
    }
}
