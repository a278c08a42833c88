//! `scrip run`: run a command inside a task that ends when it exits.
//!
//! Order matters here: signal handlers are installed first, so an
//! interrupt at any point still ends whatever was started; the task is
//! ended (revoked) after the child exits, however it exits; SIGINT, SIGTERM,
//! SIGHUP and SIGQUIT are forwarded to the child, which gets `--grace`
//! seconds to exit before it is killed (a Ctrl-C at the terminal reached the child
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

/// How long an interrupted child has to exit before it is killed, unless
/// `--grace` says: well under the 10 s that `docker stop` and Podman give
/// a container before they kill it, so that the task is ended first.
const GRACE: u64 = 5;
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

/// Headers whose value is a credential, whatever their name says; a
/// header named for a secret (`X-Vault-Token`, `apikey`, `X-Goog-Api-Key`)
/// is one too (see [`header_value_start`]).
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

/// The program whose `-p VALUE` (and `-pVALUE`) is a password, once.
const SSHPASS: &str = "sshpass";

/// The program whose `-b VALUE` (and `-bVALUE`) is a cookie (or the file
/// it is read from).
const CURL: &str = "curl";

/// Options whose value is `user:password`: the password is masked. Told
/// apart by case (`pip install -U` is no user).
const USER_OPTIONS: [&str; 3] = ["-u", "--user", "--proxy-user"];

/// The command line as the default purpose shows it, with common forms of
/// secrets masked (`***`), since the purpose is in the audit trail, the
/// task token, and what an approver reads:
/// - the value of an option, of `NAME=value` and of a JSON `"NAME":
///   value` named for a secret (see [`secret_name`]: a part of the name is
///   or ends in password, passwd, passphrase, secret, token, credential(s)
///   or creds, or is pass, pwd, auth, bearer, apikey or pat, or its last
///   part is or ends in key, jwt or cookie): `--password X`, `-token X`,
///   `--api-key=X`, `--creds X`, `--cookie X`, `DB_PASSWORD=x`,
///   `PGPASSWORD=x`, `GITHUB_PAT=x`, `password=x` in a connection string,
///   `{"password":"x"}`, also where an option's value assigns it
///   (`--from-literal=password=x`, `--env=GITHUB_TOKEN=x`);
/// - a `user:password` (`curl -u`, `-uUSER:PW`, `--user=`,
///   `--proxy-user`), a URL's user information and query, OpenSSL's
///   `pass:X`;
/// - `-pX` after mysql or one of its tools, `-p X` (or `-pX`) once after
///   sshpass, `-b X` (or `-bX`) after curl, wherever the program is named
///   (`sudo sshpass`, `docker exec db mysql`, `sh -c "cd /x; mysql"`) and
///   up to the `;`, `&&`, `||`, `|` or `&` that ends its command in a
///   script;
/// - the credentials of an `Authorization`, `Cookie`, `X-Api-Key` or like
///   header, or of one named for a secret (`X-Vault-Token`, `apikey`),
///   wherever its name starts (`-H`, `--header=`,
///   `http.extraheader=Authorization: ...`);
///
/// in any argument, word by word (`sh -c "..."` included, where a secret
/// quoted in a word runs on to its closing quote, and one that ends in an
/// escaped space, `correct\ horse`, on to the next word). Anything else
/// shows as it is: a purpose given with --purpose is taken as it is.
pub(crate) fn shown_command(args: &[std::ffi::OsString]) -> String {
    let mut shown = Vec::with_capacity(args.len());
    // The program last named (`sudo sshpass`, `docker exec db mysql`),
    // whose own options say where a secret is. The arguments are one
    // command line: a program named in one reads the ones after it.
    let mut program = None;
    // The next argument is a secret, or a `user:password`: the option
    // ended its own.
    let mut mask_arg = false;
    let mut user_arg = false;
    let mut script_next = false;
    for arg in args {
        let arg = arg.to_string_lossy();
        let script = std::mem::replace(&mut script_next, runs_a_script(&arg));
        if std::mem::take(&mut mask_arg) {
            shown.push("***".to_owned());
            continue;
        }
        // The next word is a secret, or a `user:password`. What an option
        // left for a next word its argument did not have (`"-u "`, `curl
        // -u "" h`) is no secret in the next argument.
        let mut mask_next = false;
        let mut user_next = std::mem::take(&mut user_arg);
        let mut words = Vec::new();
        // After a credential header's name, or a secret that starts the
        // argument: the rest of the argument is masked.
        let mut mask_rest = false;
        let mut scheme_allowed = false;
        // The quote a masked secret opened: the words up to the one that
        // closes it are the secret's too. Quotes end with the argument.
        let mut quote = None;
        // The quote open after each word, whatever it holds: a `;` inside
        // one ends no command.
        let mut open = None;
        let count = arg.split(' ').count();
        for (i, word) in arg.split(' ').enumerate() {
            let last = i + 1 == count;
            open = open_quote(open, word);
            if mask_rest {
                // A header's scheme may show.
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
            if quote.is_some() {
                // The quote holds what a `"password":` left for the next
                // word, too.
                mask_next = false;
                words.push("***".to_owned());
                quote = open_quote(quote, word);
                continue;
            }
            if std::mem::take(&mut mask_next) {
                words.push("***".to_owned());
                quote = open_quote(None, word);
                continue;
            }
            let option = bare(word);
            let lower = option.to_ascii_lowercase();
            let url_shown = shown_url(word);
            let header_at = header_value_start(&url_shown);
            let value_at = secret_value_start(&url_shown);
            // Whether the word shows a secret of its own, masked.
            let secret = if std::mem::take(&mut user_next) {
                // `-u alice:pw`: the password; `sudo -u root` stays.
                words.push(shown_user(word));
                word.contains(':')
            } else if let Some(at) = pass_value_start(&url_shown) {
                // `-passin pass:x`.
                words.push(format!("{}***", url_shown.get(..at).unwrap_or_default()));
                true
            } else if let Some(at) = value_at.filter(|&v| header_at.is_none_or(|h| v < h)) {
                // `NAME=value`; a header in the value (`GIT_AUTH=Authorization:
                // Bearer x`) has its credentials in the next words.
                words.push(format!("{}***", url_shown.get(..at).unwrap_or_default()));
                mask_rest = header_at.is_some();
                // `"password": "x"`: the value is the next word.
                if at == url_shown.len() && url_shown.ends_with(':') {
                    mask_next = !last;
                }
                true
            } else if let Some(at) = header_at {
                mask_rest = true;
                if at == url_shown.len() {
                    // `Authorization: Bearer x`: the scheme may show.
                    words.push(url_shown);
                    scheme_allowed = true;
                } else {
                    // `Authorization:Bearer` written without a space.
                    words.push(format!("{}***", url_shown.get(..at).unwrap_or_default()));
                }
                false
            } else if let Some((name, value)) = word.split_once('=')
                && USER_OPTIONS.contains(&bare(name))
            {
                words.push(format!("{name}={}", shown_user(value)));
                value.contains(':')
            } else if USER_OPTIONS.contains(&option) {
                user_next = !last;
                user_arg = last;
                words.push(word.to_owned());
                false
            } else if let Some(value) = word.strip_prefix("-u")
                && value
                    .split_once(':')
                    .is_some_and(|(user, _)| !user.contains('='))
            {
                // `curl -ualice:pw`, the user glued to the option; not a
                // Go-style `-url=http://h:80`.
                words.push(format!("-u{}", shown_user(value)));
                true
            } else if let Some(short) = secret_short_option(program, option) {
                // sshpass has one password: an `ssh -p 22` after it is a
                // port.
                if program == Some(SSHPASS) {
                    program = None;
                }
                if short.len() == option.len() {
                    mask_next = !last;
                    mask_arg = last;
                    words.push(word.to_owned());
                    false
                } else {
                    // After the quotes that open the word (`'-pcorrect horse'`).
                    let at = word.len() - word.trim_start_matches(['\'', '"']).len();
                    let head = word.get(..at + short.len()).unwrap_or_default();
                    words.push(format!("{head}***"));
                    true
                }
            } else if lower.starts_with('-') && secret_name(lower.trim_start_matches('-')) {
                mask_next = !last;
                mask_arg = last;
                words.push(word.to_owned());
                false
            } else {
                words.push(url_shown);
                false
            };
            if secret {
                quote = open_quote(None, word);
                // An argument that starts with a secret is that secret
                // whole (`env "PASSWORD=correct horse"`, `curl -u "alice:pw
                // x"`), unless it is a shell script, read word by word.
                mask_rest |= i == 0 && !script;
            }
            if let Some(named) = program_named(word) {
                program = Some(named);
            }
            // Only a shell reads `;` as the end of a command: in other
            // arguments (`mysql -e "select 1; select 2" -pX`) it is text.
            if script && open.is_none() && ends_a_command(word) {
                program = None;
            }
        }
        shown.push(words.join(" "));
    }
    shown.join(" ")
}

/// The program `word` names, of those whose options [`shown_command`]
/// reads: the last command in it (`cd /x;mysql`, `$(mysql`), by its file
/// name (`/usr/bin/mysql`), quotes aside.
fn program_named(word: &str) -> Option<&'static str> {
    let command = word
        .rsplit([';', '&', '|', '(', '`'])
        .next()
        .unwrap_or_default();
    let name = bare(command).rsplit('/').next().unwrap_or_default();
    P_IS_PASSWORD
        .iter()
        .copied()
        .chain([SSHPASS, CURL])
        .find(|&p| p == name)
}

/// Whether `word` ends a command in a shell script: it is, or ends in,
/// `;`, `&&`, `||`, `|` or `&`.
fn ends_a_command(word: &str) -> bool {
    word.ends_with([';', '&', '|'])
}

/// The short option `option` starts with whose value is a secret for
/// `program`: `-p` for mysql and its tools only with the value glued to it
/// (`-p` alone asks; `-P3306` is a port), `-p` for sshpass and `-b` for
/// curl either way.
fn secret_short_option(program: Option<&str>, option: &str) -> Option<&'static str> {
    let short = match program? {
        SSHPASS => "-p",
        CURL => "-b",
        p if P_IS_PASSWORD.contains(&p) && option.len() > 2 => "-p",
        _ => return None,
    };
    option.starts_with(short).then_some(short)
}

/// Whether `arg` is a shell's option whose value is a script (`-c`,
/// `bash -lc`, `sh -ec`): the next argument is a command line, whose
/// words are masked one by one, not a value that may hold spaces.
fn runs_a_script(arg: &str) -> bool {
    arg.strip_prefix('-')
        .is_some_and(|f| f.ends_with('c') && f.bytes().all(|b| b.is_ascii_alphabetic()))
}

/// `word` without the quotes a shell script around it leaves.
fn bare(word: &str) -> &str {
    word.trim_matches(|c| c == '\'' || c == '"')
}

/// The quote still open after `word`, given the one open before it: a
/// shell word goes on past a space inside quotes (`--password='correct
/// horse'`, `-u"alice:pw x"`), and so does a secret in it. A backslash
/// escapes the next character (`"a\" b"` is one word), but inside single
/// quotes; one that ends the word escapes the space after it
/// (`correct\ horse` is one word), which this says as an open `\`.
fn open_quote(open: Option<char>, word: &str) -> Option<char> {
    let mut open = open.filter(|&q| q != '\\');
    let mut chars = word.chars();
    while let Some(c) = chars.next() {
        if c == '\\' && open != Some('\'') {
            if chars.next().is_none() {
                return open.or(Some('\\'));
            }
            continue;
        }
        match open {
            Some(q) if c == q => open = None,
            None if matches!(c, '\'' | '"') => open = Some(c),
            _ => {}
        }
    }
    open
}

/// `user:password` with the password masked; a plain user as it is.
fn shown_user(value: &str) -> String {
    match value.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => value.to_owned(),
    }
}

/// The name that ends at byte `end` of `word`: the longest run of the
/// characters `is_name` takes before it. A name is found wherever it
/// starts: after an option's `=`, a quote, a `,`.
fn name_before(word: &str, end: usize, is_name: fn(u8) -> bool) -> &str {
    let head = word.get(..end).unwrap_or_default();
    let len = head.bytes().rev().take_while(|&b| is_name(b)).count();
    head.get(head.len() - len..).unwrap_or_default()
}

/// Where in `word` the value of the first `NAME=`, or JSON `"NAME":`,
/// that names a secret starts (just past its `=` or `:`): at the start
/// (`DB_PASSWORD=x`) or inside an option's value
/// (`--from-literal=password=x`, `--env=GITHUB_TOKEN=x`,
/// `--set=replicas=2,db.password=x`, `-d {"user":"a","password":"x"}`),
/// where the option's own name says nothing.
fn secret_value_start(word: &str) -> Option<usize> {
    let bytes = word.as_bytes();
    word.char_indices()
        .filter_map(|(i, c)| match c {
            '=' => Some((i, i)),
            // The name ends at its closing quote, escaped in a script's
            // double quotes (`"{\"password\":\"x\"}"`).
            ':' if i.checked_sub(1).and_then(|j| bytes.get(j)) == Some(&b'"') => {
                let end = i - 1;
                match end.checked_sub(1).and_then(|j| bytes.get(j)) {
                    Some(b'\\') => Some((end - 1, i)),
                    _ => Some((end, i)),
                }
            }
            _ => None,
        })
        .find(|&(end, _)| {
            secret_name(name_before(word, end, |b| {
                b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')
            }))
        })
        .map(|(_, i)| i + 1)
}

/// Where in `word` the password of OpenSSL's `pass:PASSWORD` starts
/// (`-passin pass:x`, `-passout 'pass:x'`); its other forms (`env:VAR`,
/// `file:PATH`) say where the password is, and show.
fn pass_value_start(word: &str) -> Option<usize> {
    let quotes = word.len() - word.trim_start_matches(['\'', '"']).len();
    word.get(quotes..)?
        .starts_with("pass:")
        .then_some(quotes + "pass:".len())
}

/// Where in `word` the credentials of the first credential header start
/// (just past the colon after its name), wherever its name starts: the
/// word's start, `-H`, `--header=`, `http.extraheader=`, a quote. A
/// header named for a secret (`X-Vault-Token`, `apikey`, `X-Goog-Api-Key`,
/// not `X-Request-Id`) counts only there, not after another colon: the
/// `secret` in an ARN (`arn:aws:secretsmanager:...:secret:prod/db`) names
/// no header.
fn header_value_start(word: &str) -> Option<usize> {
    word.match_indices(':')
        .map(|(i, _)| i)
        .find(|&i| {
            let name = name_before(word, i, |b| b.is_ascii_alphanumeric() || b == b'-');
            let glued = name.strip_prefix("-H").or_else(|| name.strip_prefix("-h"));
            let known = |h: &str| SECRET_HEADERS.contains(&h.to_ascii_lowercase().as_str());
            let starts_a_name = matches!(
                word.get(..i - name.len()).and_then(|h| h.bytes().last()),
                None | Some(b'=' | b'\'' | b'"')
            );
            known(name)
                || glued.is_some_and(known)
                || starts_a_name && (secret_name(name) || glued.is_some_and(secret_name))
        })
        .map(|i| i + 1)
}

/// Parts of a name that name a secret only whole: short words that end
/// harmless ones (`BYPASS`, `OAUTH`, `OLDPWD`, `PATH`). `SSHPASS` is the
/// password `sshpass -e` reads, `PAT` a personal access token
/// (`GITHUB_PAT`).
const SECRET_PARTS: [&str; 7] = ["PASS", "PWD", "AUTH", "BEARER", "APIKEY", "SSHPASS", "PAT"];

/// Words a part of a name names a secret by ending in: alone
/// (`DB_PASSWORD`) or glued to what says whose (`PGPASSWORD`,
/// `accessToken`, `clientSecret`, `--src-creds`). Not a part that only
/// starts with one (`tokenizer`, `max-tokens`, `passwordless`).
const SECRET_ENDINGS: [&str; 8] = [
    "PASSWORD",
    "PASSWD",
    "PASSPHRASE",
    "SECRET",
    "TOKEN",
    "CREDENTIAL",
    "CREDENTIALS",
    "CREDS",
];

/// Words the last part of a name names a secret by ending in (`API_KEY`,
/// `--jwt`, `--cookie`, `sessionCookie`): in another part they say what a
/// setting is about (`KEY_ID`, `--jwt-issuer`, `--cookie-jar`).
const LAST_SECRET_ENDINGS: [&str; 3] = ["KEY", "JWT", "COOKIE"];

/// Whether a name (`DB_PASSWORD`, `PGPASSWORD`, `api-key`, `apiKey`,
/// `password` in a connection string) names a secret: a part of it (split
/// at `_`, `-`, `.`) is or ends in password, passwd, passphrase, secret,
/// token, credential(s) or creds, or is pass, pwd, auth, bearer, apikey
/// or pat, or its last part is or ends in key, jwt or cookie; not one that
/// names where a secret is (`-file`, `-id`, `-name`), nor a flag that
/// turns one off (`--no-password`).
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
    let secret = parts
        .iter()
        .any(|p| SECRET_PARTS.contains(p) || SECRET_ENDINGS.iter().any(|e| p.ends_with(e)))
        || parts
            .last()
            .is_some_and(|p| LAST_SECRET_ENDINGS.iter().any(|e| p.ends_with(e)));
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
    /// records and approvers see, with common forms of secrets masked,
    /// word by word in any argument, `sh -c "..."` too: the values of
    /// options, of `NAME=...` and of JSON `"NAME":` named for a password,
    /// secret, token, key, cookie or credentials (`--api-key X`,
    /// `DB_PASSWORD=...`, `--env=GITHUB_TOKEN=...`), a URL's user
    /// information and query, a `user:password` (`-u`, `--user`), `mysql
    /// -p...`, `sshpass -p`, `curl -b`, OpenSSL's `pass:...`, and the
    /// credentials of an Authorization, Cookie or like header, or of one
    /// named for a secret (`-H "X-Vault-Token: ..."`,
    /// `http.extraheader=Authorization: ...`); give --purpose whenever the
    /// arguments hold a secret: masking cannot know every program's).
    #[arg(long)]
    purpose: Option<String>,
    /// Seconds COMMAND has to exit after a forwarded signal before it is
    /// killed; the task is ended after. Keep it a few seconds under what
    /// stops scrip run gives it before SIGKILL (`docker stop`: 10 s,
    /// Kubernetes: terminationGracePeriodSeconds, 30 s), or the task
    /// outlives the kill, live until its deadline.
    #[arg(long, value_name = "SECONDS", default_value_t = GRACE,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    grace: u64,
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

    let status = supervise(&mut child, &mut signals, Duration::from_secs(args.grace)).await;
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
/// the child has `grace` to exit before it is killed. A Ctrl-C (or
/// Ctrl-\\) at the terminal reached the child already, from the terminal:
/// it is neither forwarded nor timed, since an interactive command (a shell,
/// a REPL) may take it as "stop this step", not "exit".
async fn supervise(
    child: &mut tokio::process::Child,
    signals: &mut Signals,
    grace: Duration,
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
                deadline.get_or_insert_with(|| tokio::time::Instant::now() + grace);
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

    fn assert_shown(cases: &[(&[&str], &str)]) {
        for (args, expected) in cases {
            assert_eq!(shown(args), *expected, "{args:?}");
        }
    }

    /// `--opt=NAME=value`: the option's own name says nothing, the name
    /// its value assigns does.
    #[test]
    fn a_secret_assigned_inside_an_options_value_is_masked() {
        assert_shown(&[
            (
                &[
                    "kubectl",
                    "create",
                    "secret",
                    "generic",
                    "x",
                    "--from-literal=password=hunter2",
                ],
                "kubectl create secret generic x --from-literal=password=***",
            ),
            (
                &["docker", "run", "--env=GITHUB_TOKEN=ghp_x", "img"],
                "docker run --env=GITHUB_TOKEN=*** img",
            ),
            (
                &["helm", "install", "--set=replicas=2,db.password=pw", "c"],
                "helm install --set=replicas=2,db.password=*** c",
            ),
            // What it assigns to a harmless name shows.
            (
                &["docker", "run", "--env=PATH=/usr/bin", "img"],
                "docker run --env=PATH=/usr/bin img",
            ),
            (
                &["kubectl", "--from-literal=user=alice"],
                "kubectl --from-literal=user=alice",
            ),
        ]);
    }

    /// A credential header is found wherever its name ends, not only at the
    /// start of a word: after `NAME=` (`git -c http.extraheader=...`) or
    /// after a quote inside a shell word.
    #[test]
    fn a_secret_header_after_a_name_or_a_quote_is_masked() {
        assert_shown(&[
            (
                &[
                    "git",
                    "-c",
                    "http.extraheader=Authorization: Bearer ghp_x",
                    "fetch",
                ],
                "git -c http.extraheader=Authorization: Bearer *** fetch",
            ),
            (
                &["sh", "-c", "wget --header=\"Authorization: Bearer x\" u"],
                "sh -c wget --header=\"Authorization: Bearer *** ***",
            ),
            (
                &["sh", "-c", "curl -H'Cookie: sid=1' h"],
                "sh -c curl -H'Cookie: *** ***",
            ),
            // A header that is not a credential shows.
            (
                &["git", "-c", "http.extraheader=Accept: text/plain", "fetch"],
                "git -c http.extraheader=Accept: text/plain fetch",
            ),
        ]);
    }

    /// A secret quoted in a shell word (`--password='correct horse'`) is
    /// masked up to its closing quote, not only up to the first space; so
    /// is a credential header whose value comes in the same word as a
    /// secret name.
    #[test]
    fn a_quoted_secret_is_masked_to_its_closing_quote() {
        assert_shown(&[
            (
                &["sh", "-c", "mysql --password='correct horse' db"],
                "sh -c mysql --password=*** *** db",
            ),
            (
                &["sh", "-c", "tool --token \"a b c\" --verbose"],
                "sh -c tool --token *** *** *** --verbose",
            ),
            (
                &["sh", "-c", "GIT_AUTH=Authorization: Bearer x git fetch"],
                "sh -c GIT_AUTH=*** *** *** *** ***",
            ),
            (
                &["sh", "-c", "tool --password=\"a\\\" b\" -v"],
                "sh -c tool --password=*** *** -v",
            ),
            // A quoted harmless value, and a closed quoted secret, leave
            // the next words as they are.
            (
                &["sh", "-c", "tool --token 'ab' --name 'a b'"],
                "sh -c tool --token *** --name 'a b'",
            ),
        ]);
    }

    /// An argument that starts with a secret is that secret whole, spaces
    /// and all, unless it is a shell's script (`sh -c`, `bash -lc`), whose
    /// words are masked one by one so that the command still shows.
    #[test]
    fn an_argument_that_starts_with_a_secret_is_masked_whole() {
        assert_shown(&[
            (
                &["env", "PASSWORD=correct horse", "x"],
                "env PASSWORD=*** *** x",
            ),
            (
                &["tool", "--password=correct horse", "-v"],
                "tool --password=*** *** -v",
            ),
            (
                &["curl", "-u", "alice:correct horse", "h"],
                "curl -u alice:*** *** h",
            ),
            (&["mysql", "-pcorrect horse", "db"], "mysql -p*** *** db"),
            // A script's command shows, a user without a password too.
            (
                &["bash", "-lc", "PGPASSWORD=x psql -h db"],
                "bash -lc PGPASSWORD=*** psql -h db",
            ),
            (&["sudo", "-u", "Eve Smith", "ls"], "sudo -u Eve Smith ls"),
        ]);
    }

    /// A name whose last word is glued to what comes before it
    /// (`PGPASSWORD`, `accessToken`, `--authkey`) names a secret.
    #[test]
    fn names_that_end_in_a_secret_word_are_secret() {
        assert_shown(&[
            (
                &["env", "PGPASSWORD=s3cret", "psql"],
                "env PGPASSWORD=*** psql",
            ),
            (
                &[
                    "env",
                    "SSHPASS=pw",
                    "accessToken=t",
                    "clientSecret=c",
                    "VAULT_ROOTTOKEN=r",
                    "sshpass",
                ],
                "env SSHPASS=*** accessToken=*** clientSecret=*** VAULT_ROOTTOKEN=*** sshpass",
            ),
            (
                &["tailscale", "up", "--authkey=tskey-x"],
                "tailscale up --authkey=***",
            ),
            (
                &["gpg", "--passphrase", "pw", "-d", "f"],
                "gpg --passphrase *** -d f",
            ),
            (&["tool", "--apikey", "k"], "tool --apikey ***"),
        ]);
    }

    /// Names that only look like secrets show: a word that merely starts
    /// with a secret one (`tokenizer`, `tokens`, `password-less`), a name
    /// for where a secret is kept (`PASSWORD_FILE`, `PGPASSFILE`,
    /// `--keyfile`), and short words (`pass`, `auth`) glued into longer
    /// ones (`BYPASS`, `OAUTH2`).
    #[test]
    fn names_that_only_look_like_secrets_show() {
        assert_shown(&[
            (
                &["train", "--tokenizer=bert", "--tokenizer", "gpt2"],
                "train --tokenizer=bert --tokenizer gpt2",
            ),
            (
                &[
                    "env",
                    "PASSWORD_FILE=/run/pw",
                    "PGPASSFILE=/run/pgpass",
                    "x",
                ],
                "env PASSWORD_FILE=/run/pw PGPASSFILE=/run/pgpass x",
            ),
            (
                &["tool", "--keyfile=/k", "--passwordless=true", "--tokens=5"],
                "tool --keyfile=/k --passwordless=true --tokens=5",
            ),
            (
                &[
                    "env",
                    "BYPASS_CACHE=1",
                    "COMPASS=n",
                    "OAUTH2_FLOW=code",
                    "x",
                ],
                "env BYPASS_CACHE=1 COMPASS=n OAUTH2_FLOW=code x",
            ),
        ]);
    }

    /// `-uUSER:PASSWORD` with no space (curl), and curl's proxy user.
    #[test]
    fn a_password_attached_to_its_user_option_is_masked() {
        assert_shown(&[
            (
                &["curl", "-ualice:pw", "https://h"],
                "curl -ualice:*** https://h",
            ),
            (
                &["curl", "--proxy-user=bob:pw", "--proxy-user", "eve:pw"],
                "curl --proxy-user=bob:*** --proxy-user eve:***",
            ),
            (
                &["sh", "-c", "curl -u'alice:correct horse' h"],
                "sh -c curl -u'alice:*** *** h",
            ),
            // A user alone shows, and so does a Go-style `-url=` option.
            (&["sudo", "-uroot", "ls"], "sudo -uroot ls"),
            (
                &["probe", "-url=http://h:8080/x", "-upstream=h:80"],
                "probe -url=http://h:8080/x -upstream=h:80",
            ),
        ]);
    }

    /// `mysql -pX` and `sshpass -p X` are read after the program wherever
    /// it is named: first, after another program (`sudo`, `docker exec`,
    /// `kubectl exec --`), or in a script; and only up to the end of its
    /// command there.
    #[test]
    fn a_programs_password_option_is_masked_wherever_the_program_is_named() {
        assert_shown(&[
            (
                &["sh", "-c", "mysql -uroot -phunter2 db"],
                "sh -c mysql -uroot -p*** db",
            ),
            (
                &[
                    "docker",
                    "exec",
                    "db",
                    "mysql",
                    "-uroot",
                    "-phunter2",
                    "app",
                ],
                "docker exec db mysql -uroot -p*** app",
            ),
            (
                &["kubectl", "exec", "pod", "--", "mysqldump", "-phunter2"],
                "kubectl exec pod -- mysqldump -p***",
            ),
            (
                &["sudo", "sshpass", "-p", "hunter2", "ssh", "h"],
                "sudo sshpass -p *** ssh h",
            ),
            (
                &[
                    "sh",
                    "-c",
                    "cd /x;/usr/bin/mysql -phunter2 && echo $(mariadb '-phunter 2')",
                ],
                "sh -c cd /x;/usr/bin/mysql -p*** && echo $(mariadb '-p*** ***",
            ),
            (
                &["env", "sshpass", "-phunter2", "ssh", "-p", "22", "h"],
                "env sshpass -p*** ssh -p 22 h",
            ),
            // `-c` is mysqldump's --complete-insert, no script; a `;` in
            // SQL ends no command.
            (
                &["mysqldump", "-c", "-phunter2", "db"],
                "mysqldump -c -p*** db",
            ),
            (
                &["mysql", "-e", "select 1; select 2", "-phunter2"],
                "mysql -e select 1; select 2 -p***",
            ),
            (
                &["sh", "-c", "mysql -e 'select 1; select 2' -phunter2"],
                "sh -c mysql -e 'select 1; select 2' -p***",
            ),
            // A port (`-P`), and `-p` after the command ends, show.
            (
                &["mysql", "-h", "db", "-P3306", "-p", "app"],
                "mysql -h db -P3306 -p app",
            ),
            (
                &["sh", "-c", "mysql -e 'x' db; docker run -p8080:80 img"],
                "sh -c mysql -e 'x' db; docker run -p8080:80 img",
            ),
            (
                &["sh", "-c", "sshpass -f /run/pw ssh h | ssh -p 22 h"],
                "sh -c sshpass -f /run/pw ssh h | ssh -p 22 h",
            ),
            (
                &["docker", "run", "-p", "3306:3306", "mysql"],
                "docker run -p 3306:3306 mysql",
            ),
        ]);
    }

    /// A header named for a secret (`X-Vault-Token`, `apikey`) is a
    /// credential header too; one that names something else shows.
    #[test]
    fn a_header_named_for_a_secret_is_masked() {
        assert_shown(&[
            (
                &["curl", "-H", "X-Vault-Token: hvs.abc", "h"],
                "curl -H X-Vault-Token: *** h",
            ),
            (&["curl", "-H", "apikey: k1", "h"], "curl -H apikey: *** h"),
            (
                &["curl", "--header=X-Goog-Api-Key: k1", "h"],
                "curl --header=X-Goog-Api-Key: *** h",
            ),
            (
                &["http", "GET", "h", "X-API-Token:abc"],
                "http GET h X-API-Token:***",
            ),
            (
                &["curl", "-HX-Vault-Token:abc", "-HAuth: x"],
                "curl -HX-Vault-Token:*** -HAuth: ***",
            ),
            (
                &["sh", "-c", "curl -H 'X-Vault-Token: hvs.abc' h"],
                "sh -c curl -H 'X-Vault-Token: *** ***",
            ),
            (
                &[
                    "curl",
                    "-H",
                    "X-Request-Id: 42",
                    "-H",
                    "Content-Type: application/json",
                    "-H",
                    "Accept: */*",
                    "-H",
                    "X-Api-Key-Id: k7",
                ],
                "curl -H X-Request-Id: 42 -H Content-Type: application/json \
                 -H Accept: */* -H X-Api-Key-Id: k7",
            ),
            // `secret` in an ARN, after a colon, names no header.
            (
                &[
                    "aws",
                    "--secret-id",
                    "arn:aws:secretsmanager:us-east-1:1:secret:prod/db",
                ],
                "aws --secret-id arn:aws:secretsmanager:us-east-1:1:secret:prod/db",
            ),
        ]);
    }

    /// Cookies (`curl -b`, `--cookie`), registry credentials (`--creds`),
    /// OpenSSL's `pass:`, a personal access token, a JWT, and a password
    /// in a JSON body.
    #[test]
    fn cookies_creds_pass_phrases_and_json_passwords_are_masked() {
        assert_shown(&[
            (
                &["curl", "-b", "sessionid=abc", "-bsid=abc", "h"],
                "curl -b *** -b*** h",
            ),
            (
                &["curl", "--cookie", "sid=abc", "--cookie=sid=abc", "h"],
                "curl --cookie *** --cookie=*** h",
            ),
            (
                &["sh", "-c", "curl -b 'a=1; b=2' h && git checkout -b main"],
                "sh -c curl -b *** *** h && git checkout -b main",
            ),
            (
                &[
                    "skopeo",
                    "copy",
                    "--creds",
                    "alice:pw",
                    "--src-creds",
                    "bob:pw",
                    "a",
                ],
                "skopeo copy --creds *** --src-creds *** a",
            ),
            (
                &["podman", "login", "--creds=alice:pw", "r"],
                "podman login --creds=*** r",
            ),
            (
                &[
                    "openssl",
                    "pkcs12",
                    "-passin",
                    "pass:hunter2",
                    "-passout",
                    "pass:x",
                ],
                "openssl pkcs12 -passin pass:*** -passout pass:***",
            ),
            (
                &[
                    "sh",
                    "-c",
                    "openssl rsa -passin 'pass:correct horse' -out k",
                ],
                "sh -c openssl rsa -passin 'pass:*** *** -out k",
            ),
            (
                &["env", "GITHUB_PAT=ghp_x", "tool", "--jwt", "eyJx"],
                "env GITHUB_PAT=*** tool --jwt ***",
            ),
            (
                &[
                    "curl",
                    "-d",
                    r#"{"username":"a","password":"hunter2"}"#,
                    "h",
                ],
                r#"curl -d {"username":"a","password":*** h"#,
            ),
            (
                &[
                    "curl",
                    "-d",
                    r#"{"user": "a", "password": "correct horse"}"#,
                ],
                r#"curl -d {"user": "a", "password":*** *** ***"#,
            ),
            (
                &["sh", "-c", r#"curl -d '{"password": "correct horse"}' h"#],
                r#"sh -c curl -d '{"password":*** *** *** h"#,
            ),
            (
                &["sh", "-c", r#"curl -d "{\"token\":\"t1\"}" h"#],
                r#"sh -c curl -d "{\"token\":*** h"#,
            ),
            // Where a secret is kept, what a name is about, and SQL show.
            (
                &[
                    "curl",
                    "--cookie-jar",
                    "/tmp/j",
                    "-c",
                    "/tmp/j",
                    "--jwt-issuer",
                    "https://i",
                ],
                "curl --cookie-jar /tmp/j -c /tmp/j --jwt-issuer https://i",
            ),
            (
                &[
                    "openssl",
                    "rsa",
                    "-passin",
                    "env:PW",
                    "-passout",
                    "file:/run/pw",
                ],
                "openssl rsa -passin env:PW -passout file:/run/pw",
            ),
            (
                &["env", "PATH=/bin", "PAT_FILE=/run/pat", "x"],
                "env PATH=/bin PAT_FILE=/run/pat x",
            ),
            (
                &["psql", "-c", "select password from users; select 1"],
                "psql -c select password from users; select 1",
            ),
        ]);
    }

    /// A secret whose space is escaped with a backslash (`correct\ horse`)
    /// is masked on into the next word; an escaped backslash, or one in
    /// single quotes, escapes no space.
    #[test]
    fn a_secret_with_an_escaped_space_is_masked_on() {
        assert_shown(&[
            (
                &["sh", "-c", r"mysql --password=correct\ horse db"],
                r"sh -c mysql --password=*** *** db",
            ),
            (
                &["sh", "-c", r"tool --token a\ b\ c -v"],
                r"sh -c tool --token *** *** *** -v",
            ),
            (
                &["sh", "-c", r"mysql -pcorrect\ horse db"],
                r"sh -c mysql -p*** *** db",
            ),
            (
                &["sh", "-c", r"tool --password=pw\\ -v"],
                r"sh -c tool --password=*** -v",
            ),
            (
                &["sh", "-c", r"tool --password='pw\' -v"],
                r"sh -c tool --password=*** -v",
            ),
        ]);
    }

    /// A `-u` whose argument has no word (`curl -u "" h`) reaches no
    /// further than that argument; `-U` is no user option.
    #[test]
    fn a_user_option_reaches_only_its_own_value() {
        assert_shown(&[
            (&["curl", "-u", "", "https://h"], "curl -u  https://h"),
            (&["curl", "-u ", "https://h"], "curl -u  https://h"),
            (&["curl", "--token ", "x"], "curl --token  x"),
            (
                &["pip", "install", "-U", "git+https://u:tok@github.com/o/r"],
                "pip install -U git+https://u:***@github.com/o/r",
            ),
            (&["tool", "-U", "alice:x"], "tool -U alice:x"),
        ]);
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
