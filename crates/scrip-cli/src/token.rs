//! `scrip token`: print an access token of the current task, for shells and
//! credential helpers. The task comes from `SCRIP_TASK_TOKEN` (set by
//! `scrip run`); tokens are cached privately and reused until shortly
//! before they expire.

use std::process::ExitCode;

use scrip_client::{Client, FileCache};

use crate::fail;

/// Arguments of `scrip token`.
#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// The tool the token is for (its `aud`).
    #[arg(long)]
    tool: String,
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
    /// scrip's address.
    #[arg(long, value_name = "URL", env = "SCRIP_URL", default_value = scrip_client::DEFAULT_URL)]
    server: String,
}

/// Runs `scrip token`.
#[expect(clippy::print_stdout, reason = "the token is the command's output")]
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
    let result = runtime.block_on(async {
        let client = Client::new(&args.server)?;
        let mut task = client.task_from_token(&task_token);
        if !args.no_cache
            && let Some(cache) = FileCache::default_location()
        {
            task = task.with_file_cache(cache);
        }
        let actions: Vec<&str> = args.actions.iter().map(String::as_str).collect();
        task.access_token(&args.tool, &actions).await
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
            println!("{value}");
            ExitCode::SUCCESS
        }
        Ok(t) => {
            println!("{}", t.token);
            ExitCode::SUCCESS
        }
        Err(e) => {
            let hint = match e.oauth_code() {
                Some("invalid_target") => "; --tool must name a tool in scrip's configuration",
                Some("invalid_scope") => "; ask only for actions the task was granted",
                Some("invalid_request") => "; the task may have ended: start a new one",
                _ => "",
            };
            fail(format!("{e}{hint}"))
        }
    }
}
