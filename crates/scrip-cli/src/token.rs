//! `scrip token`: print an access token of the current task, for shells and
//! credential helpers. The task comes from `SCRIP_TASK_TOKEN` (set by
//! `scrip run`); tokens are cached privately and reused until shortly
//! before they expire. A step that a person must approve is waited for
//! (OpenID CIBA's poll), unless `--no-wait` says to print its id and stop.

use std::process::ExitCode;
use std::time::Duration;

use scrip_client::{Client, Error, FileCache};

use crate::fail;

/// The exit code when a step waits for a person and `--no-wait` was given
/// (`EX_TEMPFAIL`: try again later).
const PENDING: u8 = 75;

/// Seconds between polls for `--approval` (scrip's default; it answers
/// `slow_down` when that is too often, and the wait lengthens).
const DEFAULT_INTERVAL: u64 = 2;

/// How long `--approval` waits at most; scrip ends the request sooner, at
/// its `approval_ttl`.
const APPROVAL_WAIT: Duration = Duration::from_secs(24 * 3600);

/// Arguments of `scrip token`.
#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// The tool the token is for (its `aud`).
    #[arg(long, required_unless_present = "approval")]
    tool: Option<String>,
    /// An action the token carries (repeat; default: every action the task
    /// holds at the tool).
    #[arg(long = "action", value_name = "ACTION")]
    actions: Vec<String>,
    /// Print JSON (`access_token`, `token_type`, `expires_in`,
    /// `expires_at`, `scope`) instead of the bare token.
    #[arg(long)]
    json: bool,
    /// Always ask scrip, ignoring and bypassing the cache.
    #[arg(long)]
    no_cache: bool,
    /// When policy says a person must approve this step, print its
    /// auth_req_id on stderr and exit with 75 instead of waiting for the
    /// decision (collect the token later with --approval).
    #[arg(long, conflicts_with = "approval")]
    no_wait: bool,
    /// Collect the token of a step already waiting for a person, by its
    /// auth_req_id (it may start with `-`): waits for the decision. The
    /// token is single use, and for the tool and actions of that step:
    /// `--tool`, `--action` and `--no-cache` do not go with it.
    #[arg(
        long,
        value_name = "AUTH_REQ_ID",
        allow_hyphen_values = true,
        conflicts_with_all = ["tool", "actions", "no_cache"]
    )]
    approval: Option<String>,
    /// scrip's address.
    #[arg(long, value_name = "URL", env = "SCRIP_URL", default_value = scrip_client::DEFAULT_URL)]
    server: String,
}

/// Runs `scrip token`.
#[expect(
    clippy::print_stderr,
    reason = "the wait for a person is said on stderr"
)]
pub fn token(args: &TokenArgs) -> ExitCode {
    let Some(task_token) = std::env::var("SCRIP_TASK_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
    else {
        return fail(
            "SCRIP_TASK_TOKEN is not set; run this inside `scrip run`, or set it to a task token",
        );
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    // The step waited for, once a wait began: an answer lost after it (scrip
    // restarting, a gateway's 502) leaves the step to collect.
    let mut waited: Option<String> = None;
    let result = runtime.block_on(async {
        let client = Client::new(&args.server)?;
        let mut task = client.task_from_token(&task_token);
        if let Some(id) = &args.approval {
            return match task.poll_approval(id).await {
                Err(e) if matches!(e.oauth_code(), Some("authorization_pending" | "slow_down")) => {
                    eprintln!("scrip: nobody has decided yet; waiting (auth_req_id {id})");
                    waited = Some(id.clone());
                    task.wait_for_approval(id, DEFAULT_INTERVAL, APPROVAL_WAIT)
                        .await
                }
                other => other,
            };
        }
        if !args.no_cache
            && let Some(cache) = FileCache::default_location()
        {
            task = task.with_file_cache(cache);
        }
        let actions: Vec<&str> = args.actions.iter().map(String::as_str).collect();
        let tool = args.tool.as_deref().unwrap_or_default();
        match task.access_token(tool, &actions).await {
            // Approved already (asked again before its token was
            // collected): collected now, --no-wait or not.
            Err(Error::ApprovalPending {
                auth_req_id,
                interval,
                expires_in,
                approved: true,
            }) => {
                eprintln!(
                    "scrip: a person approved this step already; collecting its token (auth_req_id {auth_req_id})"
                );
                waited = Some(auth_req_id.clone());
                match task.poll_approval(&auth_req_id).await {
                    // Polled a moment ago: once more after the interval.
                    Err(e) if matches!(e.oauth_code(), Some("authorization_pending" | "slow_down")) => {
                        task.wait_for_approval(&auth_req_id, interval, Duration::from_secs(expires_in))
                            .await
                    }
                    other => other,
                }
            }
            Err(Error::ApprovalPending {
                auth_req_id,
                interval,
                expires_in,
                ..
            }) if !args.no_wait => {
                eprintln!(
                    "scrip: a person must approve this step; waiting up to {expires_in} s (auth_req_id {auth_req_id}: an approver runs `scrip approve {auth_req_id}`)"
                );
                waited = Some(auth_req_id.clone());
                task.wait_for_approval(&auth_req_id, interval, Duration::from_secs(expires_in))
                    .await
            }
            other => other,
        }
    });
    match result {
        Ok(t) if args.json => {
            let value = serde_json::json!({
                "access_token": t.token,
                "token_type": t.token_type,
                "expires_in": t.expires_in(),
                "expires_at": t.expires_at,
                "scope": t.scope,
            });
            out!("{value}");
            ExitCode::SUCCESS
        }
        Ok(t) => {
            out!("{}", t.token);
            ExitCode::SUCCESS
        }
        Err(e @ Error::ApprovalPending { .. }) => {
            let Error::ApprovalPending { auth_req_id, .. } = &e else {
                return ExitCode::from(PENDING);
            };
            eprintln!(
                "scrip: {e}; once approved, collect the token with `scrip token --approval {auth_req_id}`"
            );
            ExitCode::from(PENDING)
        }
        Err(e) => {
            let said = e.to_string();
            let hint = match e.oauth_code() {
                // The server said what happened, and what to do.
                _ if said.contains("has ended") || said.contains("ask again") => "",
                Some("invalid_target") => "; --tool must name a tool in scrip's configuration",
                Some("invalid_scope") => "; ask only for actions the task was granted",
                // Too many steps already wait for a person: the server says so.
                Some("invalid_request") if said.contains("wait for a person") => "",
                Some("invalid_request") => "; the task may have ended: start a new one",
                Some("expired_token") => "; nobody decided in time: ask again",
                Some("authorization_pending" | "slow_down") => {
                    "; nobody has decided yet: try again later"
                }
                Some("invalid_grant") => "; no step of this task waits under that auth_req_id",
                _ => "",
            };
            // Unless the step itself was answered (denied, expired, spent,
            // its task ended), it may still be approved, or approved
            // already: asking again would put a new step to the approvers.
            match waited {
                Some(id)
                    if !matches!(
                        e.oauth_code(),
                        Some(
                            "access_denied" | "expired_token" | "invalid_grant" | "invalid_request"
                        )
                    ) =>
                {
                    fail(format!(
                        "{e}; the step may be decided meanwhile: collect its token with `scrip token --approval {id}`"
                    ))
                }
                _ => fail(format!("{e}{hint}")),
            }
        }
    }
}
