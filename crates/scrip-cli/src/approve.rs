//! `scrip approvals`, `scrip approve`, `scrip deny`: a person decides steps
//! that policy allows only with approval.
//!
//! The approver is authenticated without a static secret: by their own
//! identity token from a trusted issuer (`--identity-file` or
//! `SCRIP_IDENTITY`), or by local attestation over scrip's socket, which
//! identifies their uid.

use std::path::PathBuf;
use std::process::ExitCode;

use scrip_client::Identity;
use serde_json::Value;

use crate::fail;

/// How the approver reaches scrip and proves who they are.
#[derive(Debug, clap::Args)]
pub struct ApproverArgs {
    /// scrip's address.
    #[arg(long, value_name = "URL", env = "SCRIP_URL", default_value = scrip_client::DEFAULT_URL)]
    server: String,
    /// A file holding your identity token (JWT) from a trusted issuer;
    /// default: SCRIP_IDENTITY, else local attestation on the socket.
    #[arg(long, value_name = "FILE")]
    identity_file: Option<PathBuf>,
    /// scrip's local attestation socket. The default is relative to the
    /// working directory: give the server's `socket` (by default
    /// <data_dir>/scrip.sock) as an absolute path when running elsewhere.
    #[arg(long, value_name = "PATH", env = "SCRIP_SOCKET", default_value = scrip_client::DEFAULT_SOCKET)]
    socket: PathBuf,
}

async fn identity(args: &ApproverArgs) -> Result<Identity, String> {
    crate::run::load_identity(args.identity_file.as_deref(), &args.socket).await
}

/// Sends one request as the approver; returns the JSON answer, which must
/// be an object with the member `carries` (anything else, a web page say,
/// is not scrip's answer and is no answer: a list read as empty, or a step
/// decided unseen, would mislead), or the server's error description.
async fn call(
    args: &ApproverArgs,
    method: reqwest::Method,
    path: &str,
    form: Option<&[(&str, &str)]>,
    carries: &str,
) -> Result<Value, String> {
    let who = identity(args).await?;
    // As scrip-client's: a bounded wait, no redirect (which could take the
    // identity token elsewhere), no environment proxy for a local scrip.
    let http = scrip_client::http_client(&args.server, std::time::Duration::from_secs(30))
        .map_err(|e| e.to_string())?;
    let url = format!("{}{path}", args.server.trim_end_matches('/'));
    let mut req = http.request(method, &url).bearer_auth(who.token());
    if let Some(form) = form {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        req = req
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body);
    }
    let response = req.send().await.map_err(|e| {
        format!(
            "cannot reach scrip at {} ({}); is `scrip serve` running?",
            args.server,
            scrip_client::why_unsent(&e)
        )
    })?;
    let status = response.status();
    let body = scrip_client::read_at_most(response, MAX_ANSWER)
        .await
        .map_err(|e| format!("cannot read scrip's answer: {e}"))?
        .ok_or_else(|| {
            format!(
                "an answer larger than {} MiB; is --server a scrip?",
                MAX_ANSWER >> 20
            )
        })?;
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if status.is_success() {
        if body.get(carries).is_none_or(Value::is_null) {
            return Err(format!(
                "{path} answered {status} without `{carries}`, which is not scrip's answer; is {} a scrip server?",
                args.server
            ));
        }
        Ok(body)
    } else {
        let description = body
            .get("error_description")
            .and_then(Value::as_str)
            .unwrap_or("no description");
        Err(format!(
            "scrip refused ({status}): {}",
            crate::audit::printable(description)
        ))
    }
}

/// The most of an answer read. The list of waiting steps is the largest:
/// up to 1,000 steps, each with a purpose of up to 4 KiB (escaped as the
/// agent sent it) and the agent's claims, well within this.
const MAX_ANSWER: usize = 32 << 20;

fn block_on<T>(f: impl Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?
        .block_on(f)
}

/// A member of the server's answer, safe to print (see
/// [`crate::audit::printable`]).
fn text(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => crate::audit::printable(s),
        Some(Value::Null) | None => "-".into(),
        Some(other) => crate::audit::printable(&other.to_string()),
    }
}

/// When the step expires, in RFC 3339 as the other commands print times
/// (as it came when it is not a number of seconds).
fn expires_at(a: &Value) -> String {
    match a.get("expires_at").and_then(Value::as_u64) {
        Some(s) => crate::audit::when(s.saturating_mul(1000)),
        None => text(a, "expires_at"),
    }
}

/// `scrip approvals`: what waits for a decision.
pub fn list(args: &ApproverArgs, json: bool) -> ExitCode {
    match block_on(call(
        args,
        reqwest::Method::GET,
        "/approvals",
        None,
        "approvals",
    )) {
        Err(e) => fail(e),
        Ok(body) => {
            let items = body
                .get("approvals")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let more = body.get("more").and_then(Value::as_bool) == Some(true);
            if json {
                for a in &items {
                    out!("{a}");
                }
            } else if items.is_empty() && !more {
                out!("no pending approvals");
            } else {
                for (i, a) in items.iter().enumerate() {
                    if i > 0 {
                        out!("");
                    }
                    show(a);
                }
            }
            if more {
                #[expect(clippy::print_stderr, reason = "a note beside the output")]
                {
                    eprintln!(
                        "scrip: more steps wait than scrip reads at once (the oldest 1,000, less those a later denial answers); decide or let some expire to see the rest"
                    );
                }
            }
            ExitCode::SUCCESS
        }
    }
}

/// Refuses what cannot be an approval id.
fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "`{}` is not an approval id; see `scrip approvals`",
            crate::audit::printable(id)
        ));
    }
    Ok(())
}

/// Prints one approval as `scrip approvals` lists it.
fn show(a: &Value) {
    for line in step_lines(a) {
        out!("{line}");
    }
}

/// How many columns of the agent's words one line holds: with the marker
/// before them a line fits an 80-column terminal, which then wraps none of
/// them (a line the terminal wraps could start with anything).
const PURPOSE_COLUMNS: usize = 72;

/// How many columns of a field's value one line holds, after its label.
const VALUE_COLUMNS: usize = 63;

/// The lines of one approval. What an agent chose (its purpose, and in
/// part its identity: a branch name in a CI token's subject) is broken
/// into lines by scrip, none of which a terminal 80 columns wide wraps
/// and none of which starts where scrip's own lines do: so that padding
/// cannot put a line that looks like scrip's (`asks: read at ...`) among
/// them, or a whole step that looks like one. The purpose is shown last,
/// its runs of spaces made one, each of its lines after a `|`.
fn step_lines(a: &Value) -> Vec<String> {
    // The issuer too: two issuers may name different workloads alike.
    let (agent, issuer) = a.get("agent").map_or_else(Default::default, |g| {
        (identity_of(g, "subject"), identity_of(g, "issuer"))
    });
    // Each sub-agent with its issuer too, for the same reason (an older
    // scrip sends the subjects only).
    let actors = a
        .get("delegation_actors")
        .and_then(Value::as_array)
        .map(|c| {
            c.iter()
                .map(|g| match g.get("issuer") {
                    Some(Value::String(_)) => format!(
                        "{} (from {})",
                        identity_of(g, "subject"),
                        identity_of(g, "issuer")
                    ),
                    _ => identity_of(g, "subject"),
                })
                .collect::<Vec<_>>()
        });
    let subjects = || {
        a.get("delegation_chain")
            .and_then(Value::as_array)
            .map(|c| {
                c.iter()
                    .filter_map(Value::as_str)
                    .map(escaped_identity)
                    .collect::<Vec<_>>()
            })
    };
    let chain = actors
        .or_else(subjects)
        .map(|c| c.join(" <- "))
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "none".into());
    let asks = format!("{} at {}", text(a, "actions"), text(a, "tool"));
    let mut lines = vec![text(a, "auth_req_id")];
    for (label, value) in [
        ("agent", agent),
        ("issuer", issuer),
        ("task", text(a, "task")),
        ("environment", text(a, "environment")),
        ("asks", asks),
        ("delegation", chain),
        ("expires at", expires_at(a)),
    ] {
        for (i, line) in wrapped(&value, VALUE_COLUMNS).into_iter().enumerate() {
            let label = if i == 0 {
                format!("{label}:")
            } else {
                String::new()
            };
            lines.push(format!("  {label:<13}{line}"));
        }
    }
    // What a person denied the same agent at this tool lately, in any of
    // its tasks: a step asked again elsewhere after a no reads as such.
    let denials = a
        .get("recent_denials")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    for d in denials {
        let when = match d.get("decided_at").and_then(Value::as_u64) {
            Some(s) => crate::audit::when(s.saturating_mul(1000)),
            None => text(d, "decided_at"),
        };
        // A sub-agent acting for the agent was the one refused: named,
        // escaped as every identity a step shows.
        let by = match d.get("actor") {
            Some(actor @ Value::Object(_)) => format!(
                ", asked by {} (from {})",
                identity_of(actor, "subject"),
                identity_of(actor, "issuer")
            ),
            _ => String::new(),
        };
        let value = format!(
            "{} at {} by {} at {} (task {}{by}): {}",
            text(d, "actions"),
            text(a, "tool"),
            text(d, "decided_by"),
            when,
            text(d, "task"),
            text(d, "reason")
        );
        for (i, line) in wrapped(&value, VALUE_COLUMNS).into_iter().enumerate() {
            let label = if i == 0 { "denied:" } else { "" };
            lines.push(format!("  {label:<13}{line}"));
        }
    }
    // A delegated step's own purpose is the delegating agent's words: what
    // the root task's agent said, and each delegation since, come first.
    let ancestors = a
        .get("delegated_from")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    for (i, t) in ancestors.iter().enumerate() {
        let task = text(t, "task");
        if t.get("purpose").is_some_and(Value::is_string) {
            // The first is the root, unless the store lost a task above it.
            let whose = if i == 0 { "the root task" } else { "task" };
            lines.push(format!("  purpose of {whose} {task}:"));
            let purpose = wrapped(&text(t, "purpose"), PURPOSE_COLUMNS);
            lines.extend(purpose.iter().map(|l| format!("    | {l}")));
        } else {
            lines.push(format!(
                "  purpose of task {task}: not known (no such task)"
            ));
        }
    }
    lines.push("  purpose, in the agent's words:".to_owned());
    let purpose = wrapped(&text(a, "purpose"), PURPOSE_COLUMNS);
    lines.extend(purpose.iter().map(|l| format!("    | {l}")));
    lines
}

/// An identity (a subject, an issuer) as a step shows it: what is
/// deceptive, every blank (a space, U+00A0, U+3000) and the backslash
/// written as escapes. It then holds no blank to pad it or to break a line
/// at (its lines break only between the parts scrip joins, or where a line
/// is full), and two that differ in any character read apart.
fn escaped_identity(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if scrip_token::is_deceptive(c) || c.is_whitespace() || c == '\\' {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// The identity at `k` of `v`, as [`escaped_identity`] shows it.
fn identity_of(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => escaped_identity(s),
        _ => text(v, k),
    }
}

/// How many columns `c` may take on a terminal, counted high: any but
/// ASCII as two, as wide characters take, and as those of ambiguous width
/// (Cyrillic, Greek, box drawing) do where a terminal is set up for East
/// Asian text, which no table tells. A line counted high is only shorter
/// than it might have been.
fn columns_of(c: char) -> usize {
    if c.is_ascii() { 1 } else { 2 }
}

/// `words` in lines of at most `columns` columns on a terminal (as
/// [`columns_of`] counts them), broken between words where a word fits a
/// line, runs of spaces made one.
fn wrapped(words: &str, columns: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    let mut used = 0;
    for word in words.split_whitespace() {
        let width: usize = word.chars().map(columns_of).sum();
        if !line.is_empty() && used + 1 + width > columns {
            lines.push(std::mem::take(&mut line));
            used = 0;
        }
        if !line.is_empty() {
            line.push(' ');
            used += 1;
        }
        // A word longer than a line is cut where the line is full.
        for c in word.chars() {
            let w = columns_of(c);
            if !line.is_empty() && used + w > columns {
                lines.push(std::mem::take(&mut line));
                used = 0;
            }
            line.push(c);
            used += w;
        }
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

/// Asks the person at the terminal to confirm; `Err` when there is none.
#[expect(
    clippy::print_stderr,
    reason = "the question goes where a person reads it, apart from the output"
)]
fn confirm(question: &str) -> Result<bool, String> {
    let stdin = std::io::stdin();
    if !rustix::termios::isatty(&stdin) {
        return Err(
            "not approved: confirm in a terminal, or pass --yes once you have read the step above"
                .into(),
        );
    }
    eprint!("{question} [y/N] ");
    let mut answer = String::new();
    stdin
        .read_line(&mut answer)
        .map_err(|e| format!("cannot read the answer: {e}"))?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

/// `scrip approve ID [--yes]`: shows the step, asks, and approves exactly
/// that step.
pub fn approve(args: &ApproverArgs, id: &str, yes: bool) -> ExitCode {
    if let Err(e) = check_id(id) {
        return fail(e);
    }
    let step = match block_on(call(
        args,
        reqwest::Method::GET,
        &format!("/approvals/{id}"),
        None,
        "state",
    )) {
        Ok(step) => step,
        Err(e) => return fail(e),
    };
    let pending = step.get("state").and_then(Value::as_str) == Some("pending");
    if pending {
        show(&step);
        if !yes {
            match confirm("Approve this step?") {
                Ok(true) => {}
                Ok(false) => return fail("not approved".to_owned()),
                Err(e) => return fail(e),
            }
        }
    }
    // The step shown goes with the decision: if the id named another step,
    // scrip decides nothing (and a decided one answers that it is).
    let shown = |k: &str| {
        step.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let (task, tool, actions) = (shown("task"), shown("tool"), shown("actions"));
    let form = [
        ("task", task.as_str()),
        ("tool", tool.as_str()),
        ("actions", actions.as_str()),
    ];
    decided(
        id,
        block_on(call(
            args,
            reqwest::Method::POST,
            &format!("/approvals/{id}/approve"),
            Some(&form),
            "state",
        )),
    )
}

/// `scrip deny ID --reason TEXT`.
pub fn deny(args: &ApproverArgs, id: &str, reason: &str) -> ExitCode {
    if let Err(e) = check_id(id) {
        return fail(e);
    }
    decided(
        id,
        block_on(call(
            args,
            reqwest::Method::POST,
            &format!("/approvals/{id}/deny"),
            Some(&[("reason", reason)]),
            "state",
        )),
    )
}

/// Reports a decision's answer.
fn decided(id: &str, answer: Result<Value, String>) -> ExitCode {
    match answer {
        Err(e) => fail(e),
        Ok(body) => {
            out!(
                "{} {}: {} at {} for task {}",
                text(&body, "state"),
                id,
                text(&body, "actions"),
                text(&body, "tool"),
                text(&body, "task")
            );
            ExitCode::SUCCESS
        }
    }
}

/// `scrip introspect TOKEN`: asks scrip whether a token is active,
/// authenticated as you (RFC 7662).
pub fn introspect(args: &ApproverArgs) -> ExitCode {
    // Not a silent wait at a terminal.
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        return fail(
            "no token: standard input is a terminal; pipe one in (`scrip introspect < token.txt`)"
                .to_owned(),
        );
    }
    let mut from_stdin = String::new();
    if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut from_stdin) {
        return fail(format!("cannot read the token from standard input: {e}"));
    }
    let token = from_stdin.trim();
    if token.is_empty() {
        return fail("no token: pipe one in (`scrip introspect < token.txt`)".to_owned());
    }
    match block_on(call(
        args,
        reqwest::Method::POST,
        "/introspect",
        Some(&[("token", token)]),
        "active",
    )) {
        Err(e) => fail(e),
        Ok(body) => {
            out!("{body}");
            ExitCode::SUCCESS
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many columns `line` takes at most on a terminal set up for
    /// East Asian text, where characters of ambiguous width take two
    /// (Cyrillic and Greek among them, which `width_cjk` counts as one).
    fn on_a_cjk_terminal(line: &str) -> usize {
        line.chars()
            .map(|c| {
                let table = unicode_width::UnicodeWidthChar::width_cjk(c).unwrap_or(0);
                if ('\u{370}'..='\u{4ff}').contains(&c) {
                    2
                } else {
                    table
                }
            })
            .sum()
    }

    /// A purpose padded to wrap into lines that look like scrip's comes
    /// last, each of its lines after the marker: the step's own lines come
    /// first.
    #[test]
    fn a_padded_purpose_cannot_pass_for_the_step() {
        let pad = " ".repeat(100);
        let a = serde_json::json!({
            "auth_req_id": "r1",
            "agent": {"issuer": "https://k8s", "subject": "coder"},
            "task": "t1",
            "purpose": format!("docs{pad}environment: dev{pad}asks:        read at github\tnow"),
            "environment": "prod",
            "actions": "delete",
            "tool": "github",
            "expires_at": 1,
        });
        let lines = step_lines(&a);
        assert_eq!(lines[5], "  asks:        delete at github");
        // A time as the other commands print one.
        assert_eq!(lines[7], "  expires at:  1970-01-01T00:00:01.000Z");
        assert_eq!(
            lines[8..],
            [
                "  purpose, in the agent's words:",
                "    | docs environment: dev asks: read at github\\u{9}now"
            ]
        );
    }

    /// The same agent's recent denials at the tool come after the step's
    /// fields, each on lines of its own (the approver's reason wrapped
    /// under its label), before the agent's words.
    #[test]
    fn recent_denials_are_shown_before_the_purpose() {
        let a = serde_json::json!({
            "auth_req_id": "r2",
            "agent": {"issuer": "https://k8s", "subject": "coder"},
            "task": "t2",
            "purpose": "cleanup",
            "environment": "prod",
            "actions": "delete",
            "tool": "db",
            "expires_at": 1,
            "recent_denials": [{
                "auth_req_id": "r1",
                "task": "t1",
                "actor": null,
                "actions": "delete",
                "decided_by": "alice",
                "decided_at": 2,
                "reason": format!("not in prod{}\u{1b}[2J", " wait".repeat(12)),
            }, {
                "auth_req_id": "r0",
                "task": "t0",
                "actor": {"issuer": "https://k8s", "subject": "helper two"},
                "actions": "delete",
                "decided_by": "bob",
                "decided_at": 1,
                "reason": "no",
            }],
        });
        let lines = step_lines(&a);
        assert_eq!(
            lines[8..],
            [
                "  denied:      delete at db by alice at 1970-01-01T00:00:02.000Z (task t1):",
                "               not in prod wait wait wait wait wait wait wait wait wait wait",
                "               wait wait\\u{1b}[2J",
                "  denied:      delete at db by bob at 1970-01-01T00:00:01.000Z (task t0, asked",
                "               by helper\\u{20}two (from https://k8s)): no",
                "  purpose, in the agent's words:",
                "    | cleanup",
            ]
        );
    }

    /// A delegated step shows what the root task's agent said the work is
    /// for, and each delegation since, before the step's own purpose, each
    /// after the marker as the agent's words are.
    #[test]
    fn a_delegated_step_shows_the_purposes_it_came_from() {
        let a = serde_json::json!({
            "auth_req_id": "r3",
            "purpose": "approve the release",
            "delegated_from": [
                {"task": "t0", "purpose": "fix the flaky test"},
                {"task": "t1", "purpose": "check the build"},
            ],
        });
        let lines = step_lines(&a);
        assert_eq!(
            lines[lines.len() - 6..],
            [
                "  purpose of the root task t0:",
                "    | fix the flaky test",
                "  purpose of task t1:",
                "    | check the build",
                "  purpose, in the agent's words:",
                "    | approve the release",
            ]
        );
        // A task the store lost above the others: none is called the root.
        let a = serde_json::json!({
            "auth_req_id": "r4",
            "purpose": "approve",
            "delegated_from": [
                {"task": "t0", "purpose": null},
                {"task": "t1", "purpose": "fix"},
            ],
        });
        let lines = step_lines(&a);
        assert_eq!(
            lines[lines.len() - 5..],
            [
                "  purpose of task t0: not known (no such task)",
                "  purpose of task t1:",
                "    | fix",
                "  purpose, in the agent's words:",
                "    | approve",
            ]
        );
    }

    /// A purpose that draws a whole step of its own (an id, then lines like
    /// scrip's, each filled to a terminal's width with what shows as blank
    /// but is not a space) cannot start a line of its own, whatever it is
    /// made of: scrip breaks it into lines no 80-column terminal wraps,
    /// each after the marker.
    #[test]
    fn a_purpose_cannot_draw_a_step_of_its_own() {
        let blank = |s: &str| format!("{:\u{2800}<80}", s.replace(' ', "\u{2800}"));
        let fake = ["r1", "  environment: dev", "  asks:        read at github"]
            .map(blank)
            .concat();
        for purpose in [
            format!("cleanup{}{fake}", blank("")),
            // Wide characters take two columns each; those of ambiguous
            // width (Cyrillic, Greek) two on a terminal set up for East
            // Asian text.
            format!("{}{}", "中".repeat(100), "x".repeat(200)),
            format!("{}{}", "я".repeat(100), "ω".repeat(100)),
            format!("{}{}", "○".repeat(100), "─".repeat(100)),
            "y".repeat(1024),
        ] {
            let a = serde_json::json!({"auth_req_id": "r1", "purpose": purpose});
            let lines = step_lines(&a);
            let words = &lines[lines.len() - wrapped(&text(&a, "purpose"), 72).len()..];
            assert!(words.len() > 1, "{words:?}");
            for line in words {
                assert!(line.starts_with("    | "), "{line:?}");
                let columns = on_a_cjk_terminal(line);
                assert!(columns <= 78, "{columns}: {line:?}");
            }
        }
        // Words are kept whole where they fit a line.
        assert_eq!(
            wrapped("fix   the\tflaky test in JIRA-123", 12),
            ["fix the", "flaky test", "in JIRA-123"]
        );
        assert_eq!(wrapped("", 12), [""]);
        assert_eq!(wrapped("abcdefgh", 3), ["abc", "def", "gh"]);
    }

    /// A subject padded with blanks (a branch name in a CI token may hold
    /// no-break spaces) cannot wrap into lines of its own either: its
    /// blanks are escapes, and its lines start under the field's value.
    #[test]
    fn an_identity_cannot_draw_lines_of_its_own() {
        let padded = |blank: char| {
            format!(
                "repo:acme/app:ref:refs/heads/x{}r2{}  asks:        read at github",
                blank.to_string().repeat(60),
                blank.to_string().repeat(60)
            )
        };
        for blank in ['\u{a0}', '\u{3000}', ' '] {
            let a = serde_json::json!({
                "auth_req_id": "r1",
                "agent": {"issuer": "https://github", "subject": padded(blank)},
                "delegation_actors": [{"issuer": "https://k8s", "subject": padded(blank)}],
            });
            let lines = step_lines(&a);
            assert_eq!(lines[0], "r1");
            assert!(lines[1].starts_with("  agent:       repo:acme/app:ref:refs/heads/x"));
            for line in &lines[1..] {
                assert!(line.starts_with("  "), "{line:?}");
                assert!(
                    !line.trim_start().starts_with("asks:        read"),
                    "{line:?}"
                );
                let columns = on_a_cjk_terminal(line);
                assert!(columns <= 78, "{columns}: {line:?}");
            }
            assert_eq!(
                lines.iter().filter(|l| l.starts_with("  asks:")).count(),
                1,
                "{lines:#?}"
            );
        }
        // Two subjects that differ in their blanks, or in a backslash,
        // read apart, on the step's lines.
        let agent = |subject: &str| {
            let a = serde_json::json!({"agent": {"issuer": "https://idp", "subject": subject}});
            step_lines(&a)[1].clone()
        };
        for (one, other) in [
            ("alice", " alice"),
            ("alice", "alice "),
            ("a b", "a  b"),
            ("a\u{a0}b", "a\\u{a0}b"),
            ("a\u{a0}b", "a b"),
        ] {
            assert_ne!(agent(one), agent(other), "{one:?} {other:?}");
        }
        assert_eq!(agent("a b\\"), "  agent:       a\\u{20}b\\u{5c}");
        assert_eq!(escaped_identity("a\u{a0}b\u{202e}"), "a\\u{a0}b\\u{202e}");
    }
}
