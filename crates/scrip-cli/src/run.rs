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
    /// The task's lifetime in seconds (default: the server's task_ttl; at
    /// most its max_task_ttl, to which a longer one is cut).
    #[arg(long, value_name = "SECONDS")]
    ttl: Option<u64>,
    /// A federated workload identity (a JWT) to use instead of local
    /// attestation; SCRIP_IDENTITY may hold the token itself.
    #[arg(long, value_name = "FILE")]
    identity_file: Option<PathBuf>,
    /// scrip's address.
    #[arg(long, value_name = "URL", env = "SCRIP_URL", default_value = scrip_client::DEFAULT_URL)]
    pub(crate) server: String,
    /// scrip's local attestation socket. The default is relative to the
    /// working directory: give the server's `socket` (by default
    /// <data_dir>/scrip.sock) as an absolute path when running elsewhere.
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

/// The tools of MySQL and MariaDB whose `-pVALUE` (no space) is a
/// password, by what follows `mysql` (`mysqldump`, `mysql_upgrade`) or
/// `mariadb-` (`mariadb-dump`) in their names; `mysql` and `mariadb`
/// themselves too. MySQL Shell's `mysqlsh -pX` is the same password.
const MYSQL_TOOLS: [&str; 14] = [
    "admin",
    "backup",
    "binlog",
    "check",
    "dump",
    "hotcopy",
    "import",
    "pump",
    "secure-installation",
    "sh",
    "show",
    "slap",
    "test",
    "upgrade",
];

/// curl's short options that take a value: in a cluster (`-sXPOST`,
/// `-su alice:pw`), the rest of the word, or else the next word, is that
/// value.
const CURL_VALUE_OPTIONS: &str = "AbcCdDeEFHKmoPQrtTuUwxXyYz";

/// Programs whose own short options say where a secret is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Program {
    /// mysql, mariadb or one of their tools: `-pVALUE` is a password.
    Mysql,
    /// sshpass: `-p VALUE` (and `-pVALUE`) is a password, once.
    Sshpass,
    /// curl: `-b VALUE` (and `-bVALUE`) is a cookie (or the file it is
    /// read from), `-U VALUE` the proxy's `user:password`.
    Curl,
}

/// What the value of a program's short option is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Value {
    /// A secret, masked whole.
    Secret,
    /// A `user:password`, whose password is masked.
    User,
}

/// Options whose value is `user:password`: the password is masked. Told
/// apart by case (`pip install -U` is no user; curl's `-U` is, see
/// [`secret_short_option`]).
const USER_OPTIONS: [&str; 3] = ["-u", "--user", "--proxy-user"];

/// The command line as the default purpose shows it, with common forms of
/// secrets masked (`***`), since the purpose is in the audit trail, the
/// task token, and what an approver reads:
/// - the value of an option, of `NAME=value` and of a JSON `"NAME":
///   value` named for a secret (see [`secret_name`]: a part of the name is
///   or ends in password, passwd, passphrase, secret, token, credential(s)
///   or creds, or is pass, pwd, auth, bearer, apikey or pat, or its last
///   part is or ends in key, jwt, cookie or authorization): `--password
///   X`, `-token X`, `--api-key=X`, `--creds X`, `--cookie X`,
///   `--authorization X`, `DB_PASSWORD=x`, `PGPASSWORD=x`, `GITHUB_PAT=x`,
///   `password=x` in a connection string, `{"password":"x"}`,
///   `{"Authorization": "x"}`, also where an option's value assigns it
///   (`--from-literal=password=x`, `--env=GITHUB_TOKEN=x`);
/// - a `user:password` (`curl -u`, `-uUSER:PW`, `--user=`,
///   `--proxy-user`, curl's `-U`), a URL's user information (a password
///   with `#` or `?` in it too) and query, OpenSSL's `pass:X`;
/// - `-pX` after mysql, mariadb or one of their tools (`mysqldump`,
///   `mariadb-dump`, `mysqlsh`), `-p X` (or `-pX`) once after sshpass,
///   `-b X` (or `-bX`) and `-U X` after curl, in a cluster too (`-sb X`),
///   wherever the program is named (`sudo sshpass`, `docker exec db
///   mysql`, `sh -c "cd /x; mysql"`) and up to the `;`, `&&`, `||`, `|`,
///   `&` or newline that ends its command in a script;
/// - the credentials of an `Authorization`, `Cookie`, `X-Api-Key` or like
///   header, or of one named for a secret (`X-Vault-Token`, `apikey`),
///   wherever its name starts (`-H`, `--header=`,
///   `http.extraheader=Authorization: ...`, a quote; not after a colon,
///   `session:cookie:42`): to the end of the argument; in a script, to the
///   close of the quote open at its name (`-H 'Authorization: Bearer x' &&
///   next` shows `next`), or, unquoted, over its word or the word after
///   its scheme (`Authorization: Bearer x`), unless it starts the script's
///   argument, then one value (`git -c http.extraheader=...`);
///
/// in any argument, word by word, words being split at spaces, tabs and
/// newlines (`sh -c "..."` included, where a secret quoted in its word
/// runs on to its closing quote, one that ends in an escaped space,
/// `correct\ horse`, on to the next word, and one inside a quote an
/// earlier word opened, `"host=db password=x"`, to the end of its word or
/// of that quote, unless it quotes itself in it, `"... password='a b'"`).
/// Anything else shows as it is: a purpose given with --purpose is taken
/// as it is.
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
            // Masked, it still names a program, as a masked word does.
            if let Some(named) = program_named(&arg) {
                program = Some(named);
            }
            shown.push("***".to_owned());
            continue;
        }
        // The next word is a secret, or a `user:password`. What an option
        // left for a next word its argument did not have (`"-u "`, `curl
        // -u "" h`) is no secret in the next argument.
        let mut mask_next = false;
        let mut user_next = std::mem::take(&mut user_arg);
        // The rest of the argument is masked: it is one value, which a
        // secret starts or a credential header is in.
        let mut mask_rest = false;
        // A header's scheme may show before its credentials.
        let mut scheme_allowed = false;
        // A masked secret, or a header's credentials, whose quote is open:
        // the words up to the one that closes it are its too. Quotes end
        // with the argument.
        let mut held: Option<Held> = None;
        // The quote open after each word, whatever it holds: a `;` inside
        // one ends no command.
        let mut open = None;
        let words = words(&arg);
        let count = words.len();
        let mut line = String::with_capacity(arg.len());
        for (i, &(word, sep)) in words.iter().enumerate() {
            let last = i + 1 == count;
            let before = open;
            open = open_quote(open, word);
            // Only a shell reads `;` as the end of a command: in other
            // arguments (`mysql -e "select 1; select 2" -pX`) it is text,
            // and so it is in a script's argument that is one value.
            let one_value = mask_rest;
            let operator = if script && !one_value {
                last_operator(before, word)
            } else {
                None
            };
            let shown_word = if word.is_empty() {
                held = held.and_then(|h| h.after(word));
                String::new()
            } else if operator
                .as_ref()
                .is_some_and(|r| r.start == 0 && r.end == word.len())
            {
                // `&&`, `;`: no secret's, and the end of a command (below).
                word.to_owned()
            } else if mask_rest || mask_next || held.is_some() {
                if std::mem::take(&mut scheme_allowed) && is_scheme(word) {
                    // `Authorization: Bearer x`: the credentials come next.
                    held = held.and_then(|h| h.after(word));
                    word.to_owned()
                } else {
                    held = match held {
                        Some(h) => h.after(word),
                        None if mask_next => Held::start(before).after(word),
                        None => None,
                    };
                    mask_next = false;
                    "***".to_owned()
                }
            } else {
                let option = bare(word);
                let lower = option.to_ascii_lowercase();
                let url_shown = shown_url(word);
                let header_at = header_value_start(&url_shown);
                let value_at = secret_value_start(&url_shown);
                // The word masked from byte `at` on.
                let masked_from =
                    |at: usize| format!("{}***", url_shown.get(..at).unwrap_or_default());
                // Where the credentials of a header in the word start.
                let mut header = None;
                // The word shown, and whether it holds a secret of its
                // own, masked.
                let (shown_word, secret) = if std::mem::take(&mut user_next) {
                    // `-u alice:pw`: the password; `sudo -u root` stays.
                    (shown_user(word), word.contains(':'))
                } else if let Some(at) = pass_value_start(&url_shown) {
                    // `-passin pass:x`.
                    (masked_from(at), true)
                } else if let Some(at) = value_at.filter(|&v| header_at.is_none_or(|h| v < h)) {
                    // `NAME=value`; a header in the value (`GIT_AUTH=Authorization:
                    // Bearer x`) has its credentials in the next words.
                    header = header_at;
                    // `"password": "x"`: the value is the next word.
                    if at == url_shown.len() && url_shown.ends_with(':') {
                        mask_next = !last;
                    }
                    (masked_from(at), true)
                } else if let Some(at) = header_at {
                    header = Some(at);
                    if at == url_shown.len() {
                        // `Authorization: Bearer x`: the scheme may show.
                        (url_shown.clone(), false)
                    } else {
                        // `Authorization:Bearer` written without a space.
                        (masked_from(at), false)
                    }
                } else if let Some((name, value)) = word.split_once('=')
                    && USER_OPTIONS.contains(&bare(name))
                {
                    (format!("{name}={}", shown_user(value)), value.contains(':'))
                } else if USER_OPTIONS.contains(&option) {
                    user_next = !last;
                    user_arg = last;
                    (word.to_owned(), false)
                } else if let Some(value) = word.strip_prefix("-u")
                    && value
                        .split_once(':')
                        .is_some_and(|(user, _)| !user.contains('='))
                {
                    // `curl -ualice:pw`, the user glued to the option; not a
                    // Go-style `-url=http://h:80`.
                    (format!("-u{}", shown_user(value)), true)
                } else if let Some((len, kind)) = secret_short_option(program, option) {
                    // sshpass has one password: an `ssh -p 22` after it is a
                    // port.
                    if program == Some(Program::Sshpass) {
                        program = None;
                    }
                    if len == option.len() {
                        match kind {
                            Value::Secret => (mask_next, mask_arg) = (!last, last),
                            Value::User => (user_next, user_arg) = (!last, last),
                        }
                        (word.to_owned(), false)
                    } else {
                        // After the quotes that open the word (`'-pcorrect horse'`).
                        let at = word.len() - word.trim_start_matches(['\'', '"']).len() + len;
                        let head = word.get(..at).unwrap_or_default();
                        match kind {
                            Value::Secret => (format!("{head}***"), true),
                            Value::User => {
                                let value = word.get(at..).unwrap_or_default();
                                (format!("{head}{}", shown_user(value)), value.contains(':'))
                            }
                        }
                    }
                } else if lower.starts_with('-') && secret_name(lower.trim_start_matches('-')) {
                    mask_next = !last;
                    mask_arg = last;
                    (word.to_owned(), false)
                } else {
                    (url_shown.clone(), false)
                };
                if let Some(at) = header {
                    // A plain argument is the header: its credentials run
                    // to its end (`-H "Cookie: a=1; b=2"`), and so they do
                    // in a script's argument that starts with one (`git -c
                    // http.extraheader=...`), one value. In a script, they
                    // run to the close of the quote open at the header's
                    // name (`-H 'Authorization: Bearer x' && next`), or,
                    // unquoted, over the word after it, past a scheme
                    // (`Authorization: Bearer x`).
                    let value = url_shown.get(at..).unwrap_or_default();
                    scheme_allowed = value.is_empty();
                    let quoted = Held::start(before).after(word);
                    if !script || (i == 0 && quoted.is_none()) {
                        mask_rest = true;
                    } else if quoted.is_some() {
                        held = quoted;
                    } else if value.is_empty() || is_scheme(value) {
                        mask_next = true;
                    }
                } else if secret {
                    // A quote the secret's name opened holds its value
                    // (`'{"password": "a b", ...}'`); else the value's
                    // own word says (`"{... \"password\": \"a b\"}"`).
                    held = Held::start(before).after(word);
                }
                // An argument that starts with a secret is that secret
                // whole (`env "PASSWORD=correct horse"`, `curl -u "alice:pw
                // x"`), unless it is a shell script, read word by word.
                mask_rest |= secret && i == 0 && !script;
                shown_word
            };
            line.push_str(&shown_word);
            // Masked words too: a command starts in one (`--token "a
            // b";mysql -pX`), or ends.
            if !one_value && let Some(named) = program_named(word) {
                program = Some(named);
            }
            let ends = operator.as_ref().is_some_and(|r| r.end == word.len());
            if let Some(r) = &operator
                && ends
                && r.start > 0
                && shown_word != word
            {
                // `--password=x;` shows where its command ends.
                line.push_str(word.get(r.start..).unwrap_or_default());
            }
            line.push_str(sep);
            // An unquoted newline ends a command as `;` does; an escaped
            // one (a `\` that ends the line) goes on with it.
            if ends || (script && !one_value && sep == "\n" && open.is_none()) {
                program = None;
                mask_next = false;
                user_next = false;
                scheme_allowed = false;
                held = None;
            }
        }
        shown.push(line);
    }
    shown.join(" ")
}

/// The words of `arg` split at ASCII whitespace (a space, a tab, a
/// newline), each with the character after it (none after the last):
/// quoted and escaped whitespace too, where a quoted secret runs on into
/// the next word (see [`Held`]).
fn words(arg: &str) -> Vec<(&str, &str)> {
    let mut words = Vec::new();
    let mut rest = arg;
    while let Some(at) = rest.find(|c: char| c.is_ascii_whitespace()) {
        let (word, tail) = rest.split_at(at);
        // An ASCII character: one byte.
        let (sep, tail) = tail.split_at(1);
        words.push((word, sep));
        rest = tail;
    }
    words.push((rest, ""));
    words
}

/// The program `word` names, of those whose options [`shown_command`]
/// reads: the last command in it (`cd /x;mysql`, `$(mysql`), by its file
/// name (`/usr/bin/mysql`), quotes aside.
fn program_named(word: &str) -> Option<Program> {
    let command = word
        .rsplit([';', '&', '|', '(', '`'])
        .next()
        .unwrap_or_default();
    match bare(command).rsplit('/').next().unwrap_or_default() {
        "sshpass" => Some(Program::Sshpass),
        "curl" => Some(Program::Curl),
        name => is_mysql_tool(name).then_some(Program::Mysql),
    }
}

/// Whether `name` is mysql, mariadb or one of their tools whose `-pVALUE`
/// is a password (see [`MYSQL_TOOLS`]): not the server (`mysqld`), nor a
/// container or an image named after one (`mysql-data`, `mysql:8`).
fn is_mysql_tool(name: &str) -> bool {
    let tool = match name {
        "mysql" | "mariadb" | "mariabackup" => return true,
        _ => name
            .strip_prefix("mysql")
            .map(|t| t.strip_prefix('_').unwrap_or(t))
            .or_else(|| name.strip_prefix("mariadb-")),
    };
    tool.is_some_and(|t| {
        MYSQL_TOOLS.iter().any(|k| {
            t.len() == k.len()
                && t.bytes()
                    .zip(k.bytes())
                    .all(|(a, b)| a == b || (a == b'_' && b == b'-'))
        })
    })
}

/// The byte range of the last run of `;`, `&` and `|` in `word` that ends
/// a command in a shell script (`;`, `&&`, `||`, `|`, `&`), given the
/// quote open before the word: not quoted, escaped (`find ... \;`) or part
/// of a redirection (`2>&1`, `&>/dev/null`, `>|f`).
fn last_operator(open: Option<char>, word: &str) -> Option<std::ops::Range<usize>> {
    let mut open = open.filter(|&q| q != '\\');
    let mut found: Option<std::ops::Range<usize>> = None;
    let mut escaped = false;
    let mut prev = None;
    let mut chars = word.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let before = prev.replace(c);
        if std::mem::take(&mut escaped) {
            continue;
        }
        match open {
            Some('\'') if c == '\'' => open = None,
            Some('\'') => {}
            Some(_) if c == '\\' => escaped = true,
            Some(q) if c == q => open = None,
            Some(_) => {}
            None => match c {
                '\\' => escaped = true,
                '\'' | '"' => open = Some(c),
                ';' | '&' | '|' => {
                    let redirect = matches!(before, Some('>' | '<'))
                        || c == '&' && chars.peek().is_some_and(|&(_, n)| n == '>');
                    if !redirect {
                        found = match found {
                            Some(r) if r.end == i => Some(r.start..i + 1),
                            _ => Some(i..i + 1),
                        };
                    }
                }
                _ => {}
            },
        }
    }
    found
}

/// The short option `option` starts with whose value is a secret for
/// `program`, as its length and what its value is: `-p` for mysql and its
/// tools only with the value glued to it (`-p` alone asks; `-P3306` is a
/// port), `-p` for sshpass, and curl's `-b` (a cookie) and `-U` (the
/// proxy's `user:password`, as `-u`) either way, also at the end of a
/// cluster of short options (`-sb`, `-sSU`, not `-XPOST`'s value).
fn secret_short_option(program: Option<Program>, option: &str) -> Option<(usize, Value)> {
    match program? {
        Program::Sshpass => option.starts_with("-p").then_some((2, Value::Secret)),
        Program::Mysql => {
            (option.starts_with("-p") && option.len() > 2).then_some((2, Value::Secret))
        }
        Program::Curl => {
            let letters = option.strip_prefix('-').filter(|l| !l.starts_with('-'))?;
            for (i, c) in letters.char_indices() {
                match c {
                    'u' | 'U' => return Some((i + 2, Value::User)),
                    'b' => return Some((i + 2, Value::Secret)),
                    // Another option's value follows.
                    c if CURL_VALUE_OPTIONS.contains(c) => return None,
                    c if c.is_ascii_alphanumeric() || matches!(c, '#' | ':') => {}
                    _ => return None,
                }
            }
            None
        }
    }
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

/// Whether `word` is an `Authorization` scheme (`Bearer`), quotes aside.
fn is_scheme(word: &str) -> bool {
    SCHEMES.contains(&bare(word).to_ascii_lowercase().as_str())
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

/// How far a masked secret (or a header's credentials) that runs past its
/// word goes. One that starts outside quotes runs to the close of a quote
/// it opens (`--password='correct horse'`), as the shell's word does. One
/// that starts inside a quote an earlier word opened (`psql "host=db
/// password=x" && next`) ends with its word, or where that quote closes,
/// unless it opens a quote of its own inside it: a `'` or a `\"` in double
/// quotes (`"... password='a b'"`, `"{\"password\": \"a b\"}"`), a `"` in
/// single ones. A backslash that ends the word escapes the space after it
/// (`correct\ horse`), for the shell or for one inside the quote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    /// The shell's quote the secret started inside, while it is open.
    within: Option<char>,
    /// The quote the secret opened (inside `within`, if any), or `\` for
    /// a backslash that escapes the space after the word.
    open: Option<char>,
}

impl Held {
    /// A secret starting in a word after which the shell's quote `open`
    /// was open.
    fn start(open: Option<char>) -> Self {
        Held {
            within: open.filter(|&q| q != '\\'),
            open: None,
        }
    }

    /// Where the secret is after `word`: `None` once it has ended.
    fn after(mut self, word: &str) -> Option<Self> {
        // A backslash that ended the last word escaped the space after it.
        self.open = self.open.filter(|&q| q != '\\');
        let mut chars = word.chars().peekable();
        while let Some(c) = chars.next() {
            let Some(within) = self.within else {
                // The shell's own quotes, as `open_quote` reads them.
                if c == '\\' && self.open != Some('\'') {
                    if chars.next().is_none() {
                        self.open = self.open.or(Some('\\'));
                    }
                    continue;
                }
                match self.open {
                    Some(q) if c == q => self.open = None,
                    None if matches!(c, '\'' | '"') => self.open = Some(c),
                    _ => {}
                }
                continue;
            };
            let inner = match c {
                '\\' => match chars.peek() {
                    None => {
                        self.open = self.open.or(Some('\\'));
                        continue;
                    }
                    // A single quote ends at the next one, backslash or
                    // not.
                    Some(&'\'') if within == '\'' => continue,
                    Some(&n) => {
                        chars.next();
                        // `\"` in double quotes is a quote inside them.
                        if within == '"' && n == '"' {
                            '"'
                        } else {
                            continue;
                        }
                    }
                },
                // The quote the secret started in closes: the secret ends
                // with it, unless the word opens another.
                c if c == within => {
                    self.within = None;
                    self.open = None;
                    continue;
                }
                '\'' | '"' => c,
                _ => continue,
            };
            match self.open {
                Some(q) if q == inner => self.open = None,
                None => self.open = Some(inner),
                Some(_) => {}
            }
        }
        self.open.is_some().then_some(self)
    }
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
/// (just past the colon after its name), where a name starts: the word's
/// start, `-H`, `--header=`, `http.extraheader=`, a quote; not after
/// another colon, where `cookie` (`session:cookie:42`) or `secret` (an
/// ARN's `...:secret:prod/db`) names no header. A header named for a
/// secret (`X-Vault-Token`, `apikey`, `X-Goog-Api-Key`, not
/// `X-Request-Id`) is one too.
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
            starts_a_name
                && (known(name)
                    || glued.is_some_and(known)
                    || secret_name(name)
                    || glued.is_some_and(secret_name))
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
/// `--jwt`, `--cookie`, `sessionCookie`, `AUTHORIZATION`,
/// `Proxy-Authorization`): in another part they say what a setting is
/// about (`KEY_ID`, `--jwt-issuer`, `--cookie-jar`, kube-apiserver's
/// `--authorization-mode`).
const LAST_SECRET_ENDINGS: [&str; 4] = ["KEY", "JWT", "COOKIE", "AUTHORIZATION"];

/// Whether a name (`DB_PASSWORD`, `PGPASSWORD`, `api-key`, `apiKey`,
/// `password` in a connection string) names a secret: a part of it (split
/// at `_`, `-`, `.`) is or ends in password, passwd, passphrase, secret,
/// token, credential(s) or creds, or is pass, pwd, auth, bearer, apikey
/// or pat, or its last part is or ends in key, jwt, cookie or
/// authorization; not one that names where a secret is (`-file`, `-id`, `-name`), nor a flag that
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
/// it holds one. A password may hold a `#` or `?`
/// (`postgres://app:Xy#9z@db/app`, as libpq reads it): where the
/// authority would end at one, after a `:`, and an `@` comes later but
/// before the first `/`, the authority runs to the last such `@`. An `@`
/// in the path (`/package/@scope/x`), or in the query of a URL with no
/// user (`https://h?to=a@b`), is no user's.
fn shown_url(s: &str) -> String {
    let Some(scheme_end) = s.find("://") else {
        return s.to_owned();
    };
    let (head, rest) = s.split_at(scheme_end + 3);
    let mut authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let first_slash = rest.find('/').unwrap_or(rest.len());
    if let Some(at) = rest.get(..first_slash).and_then(|r| r.rfind('@'))
        && at > authority_end
        && rest
            .get(..authority_end)
            .is_some_and(|a| a.contains(':') && !a.contains('@') && !a.starts_with('['))
    {
        let host_len = rest.get(at..).and_then(|r| r.find(['/', '?', '#']));
        authority_end = host_len.map_or(rest.len(), |len| at + len);
    }
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
    /// secret, token, key, cookie, authorization or credentials (`--api-key
    /// X`, `DB_PASSWORD=...`, `--env=GITHUB_TOKEN=...`), a URL's user
    /// information and query, a `user:password` (`-u`, `--user`, `curl
    /// -U`), `mysql -p...` (and its tools', MariaDB's), `sshpass -p`, `curl
    /// -b`, OpenSSL's `pass:...`, and the
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
                "sh -c curl -H 'Authorization: Bearer *** h",
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
                "sh -c wget --header=\"Authorization: Bearer *** u",
            ),
            (
                &["sh", "-c", "curl -H'Cookie: sid=1' h"],
                "sh -c curl -H'Cookie: *** h",
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
                "sh -c GIT_AUTH=*** Bearer *** *** ***",
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
                "sh -c curl -H 'X-Vault-Token: *** h",
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
    /// further than that argument; `-U` is a user option only curl's.
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

    /// Words are split at tabs and newlines as at spaces, and in a script
    /// an unquoted newline ends a command as `;` does: a quoted one, an
    /// escaped one (`\` at the end of a line), and one in an argument that
    /// is no script end none. Nor does an escaped `;` (`find -exec ...
    /// \;`) or a redirection (`2>&1`).
    #[test]
    fn words_split_at_tabs_and_newlines_which_end_a_command() {
        assert_shown(&[
            (
                &["bash", "-c", "cd /app\nmysql -uroot -phunter2 app"],
                "bash -c cd /app\nmysql -uroot -p*** app",
            ),
            (
                &["bash", "-c", "set -e\nsshpass -p hunter2 ssh h"],
                "bash -c set -e\nsshpass -p *** ssh h",
            ),
            (
                &[
                    "bash",
                    "-c",
                    "if true; then\n\tmysql -uroot -phunter2 db\nfi",
                ],
                "bash -c if true; then\n\tmysql -uroot -p*** db\nfi",
            ),
            (
                &["bash", "-c", "curl -s \\\n-u alice:pw https://h"],
                "bash -c curl -s \\\n-u alice:*** https://h",
            ),
            (
                &["bash", "-c", "tool\t--token\tabc"],
                "bash -c tool\t--token\t***",
            ),
            (
                &["tool", "--password\tabc", "-v"],
                "tool --password\t*** -v",
            ),
            // The command a newline ended no longer reads `-p`.
            (
                &["bash", "-c", "mysql -e 'x' db\ndocker run -p8080:80 img"],
                "bash -c mysql -e 'x' db\ndocker run -p8080:80 img",
            ),
            (
                &["bash", "-c", "sshpass -f /run/pw ssh h\nssh -p 22 h"],
                "bash -c sshpass -f /run/pw ssh h\nssh -p 22 h",
            ),
            // A quoted or escaped newline, or one in SQL, ends nothing.
            (
                &["bash", "-c", "mysql -e 'select 1;\nselect 2' -phunter2"],
                "bash -c mysql -e 'select 1;\nselect 2' -p***",
            ),
            (
                &["bash", "-c", "mysql -uroot \\\n  -phunter2 db"],
                "bash -c mysql -uroot \\\n  -p*** db",
            ),
            (
                &["mysql", "-e", "select 1;\nselect 2", "-phunter2"],
                "mysql -e select 1;\nselect 2 -p***",
            ),
            (
                &["sh", "-c", r"mysql -e select\ 1\; -phunter2"],
                r"sh -c mysql -e select\ 1\; -p***",
            ),
            (
                &[
                    "sh",
                    "-c",
                    "mysql -phunter2 2>&1 | tee log; docker run -p8080:80 img",
                ],
                "sh -c mysql -p*** 2>&1 | tee log; docker run -p8080:80 img",
            ),
        ]);
    }

    /// `Authorization` names a secret as a JSON member, `NAME=` or an
    /// option, as the header does; kube-apiserver's `--authorization-mode`
    /// and the like say how authorization works, and show.
    #[test]
    fn authorization_names_a_secret() {
        assert_shown(&[
            (
                &[
                    "mcp-remote",
                    "https://h/sse",
                    "--headers",
                    r#"{"Authorization": "Bearer sk-1"}"#,
                ],
                r#"mcp-remote https://h/sse --headers {"Authorization":*** *** ***"#,
            ),
            (
                &["env", "AUTHORIZATION=Bearer sk-1", "tool"],
                "env AUTHORIZATION=*** *** tool",
            ),
            (
                &["tool", "--authorization", "Bearer sk-1"],
                "tool --authorization ***",
            ),
            (
                &["tool", "--proxy-authorization=Basic YTpi", "-v"],
                "tool --proxy-authorization=*** *** -v",
            ),
            (
                &[
                    "sh",
                    "-c",
                    r#"tool --headers '{"Authorization": "Bearer sk-1"}' -v"#,
                ],
                r#"sh -c tool --headers '{"Authorization":*** *** *** -v"#,
            ),
            (
                &[
                    "kube-apiserver",
                    "--authorization-mode=Node,RBAC",
                    "--authorization-webhook-config-file",
                    "/etc/w.yaml",
                    "--authorization-mode",
                    "RBAC",
                ],
                "kube-apiserver --authorization-mode=Node,RBAC \
                 --authorization-webhook-config-file /etc/w.yaml --authorization-mode RBAC",
            ),
            (
                &["env", "AUTHORIZATION_MODE=rbac", "x"],
                "env AUTHORIZATION_MODE=rbac x",
            ),
        ]);
    }

    /// In a script, a credential header's value ends with the quote open
    /// at its name, or, unquoted, with its word or the one after its
    /// scheme, and at the end of its command: what comes after shows. A
    /// header name counts only where a name starts, not after a colon. A
    /// plain argument, or a script's argument that starts with a header
    /// (`git -c http.extraheader=...`), is one value, masked to its end.
    #[test]
    fn a_headers_credentials_end_with_their_quote_or_word() {
        assert_shown(&[
            (
                &[
                    "sh",
                    "-c",
                    "curl -fsS -H 'Authorization: Bearer $TOKEN' https://api/deploy \
                     && kubectl delete namespace prod",
                ],
                "sh -c curl -fsS -H 'Authorization: Bearer *** https://api/deploy \
                 && kubectl delete namespace prod",
            ),
            (
                &[
                    "sh",
                    "-c",
                    "redis-cli GET session:cookie:42 && ./migrate.sh prod",
                ],
                "sh -c redis-cli GET session:cookie:42 && ./migrate.sh prod",
            ),
            (
                &["sh", "-c", "redis-cli GET cookie:42 && ./migrate.sh prod"],
                "sh -c redis-cli GET cookie:*** && ./migrate.sh prod",
            ),
            (
                &["sh", "-c", "curl -H \"Authorization: Bearer a b\" h"],
                "sh -c curl -H \"Authorization: Bearer *** *** h",
            ),
            (
                &["sh", "-c", "curl -H Authorization: Bearer tok h"],
                "sh -c curl -H Authorization: Bearer *** h",
            ),
            (
                &["sh", "-c", "http h Authorization:Bearer tok x=1"],
                "sh -c http h Authorization:*** *** x=1",
            ),
            (
                &["sh", "-c", r"http h Authorization:\ Bearer\ tok x=1"],
                r"sh -c http h Authorization:*** *** *** x=1",
            ),
            (
                &["sh", "-c", "http POST h X-Api-Key:k1 x=1; ./next"],
                "sh -c http POST h X-Api-Key:*** x=1; ./next",
            ),
            (
                &["sh", "-c", "http h Authorization: && ./next"],
                "sh -c http h Authorization: && ./next",
            ),
            (
                &["sh", "-c", "curl -H Cookie:\n./next"],
                "sh -c curl -H Cookie:\n./next",
            ),
            (
                &[
                    "bash",
                    "-c",
                    r#"ssh h 'curl -H "Authorization: Bearer x" h2; rm -rf /tmp/y'"#,
                ],
                r#"bash -c ssh h 'curl -H "Authorization: Bearer *** h2; rm -rf /tmp/y'"#,
            ),
            (
                &["git", "-c", "http.extraheader=Cookie: a=1; b=2", "fetch"],
                "git -c http.extraheader=Cookie: *** *** fetch",
            ),
        ]);
    }

    /// A secret inside a quote an earlier word opened ends with its word,
    /// or where that quote closes, unless it quotes itself inside it
    /// (`'a b'`, `\"a b\"`); and the words it masks still name programs
    /// and end commands.
    #[test]
    fn a_secret_inside_a_quote_ends_with_its_word_or_that_quote() {
        assert_shown(&[
            (
                &[
                    "sh",
                    "-c",
                    r#"psql "host=db password=pw" && ./deploy.sh prod --force"#,
                ],
                r#"sh -c psql "host=db password=*** && ./deploy.sh prod --force"#,
            ),
            (
                &[
                    "sh",
                    "-c",
                    r#"psql "host=db password=pw" && mysql -e "select 1" -pX"#,
                ],
                r#"sh -c psql "host=db password=*** && mysql -e "select 1" -p***"#,
            ),
            (
                &[
                    "sh",
                    "-c",
                    r#"curl -d "{\"user\": \"a\", \"password\": \"correct horse\"}" h"#,
                ],
                r#"sh -c curl -d "{\"user\": \"a\", \"password\":*** *** *** h"#,
            ),
            (
                &[
                    "sh",
                    "-c",
                    r#"curl -d "{\"user\": \"a\", \"password\": \"a b\", \"team\": 7}" h"#,
                ],
                r#"sh -c curl -d "{\"user\": \"a\", \"password\":*** *** *** \"team\": 7}" h"#,
            ),
            (
                &[
                    "sh",
                    "-c",
                    r#"psql "host=db password='correct horse' dbname=app""#,
                ],
                r#"sh -c psql "host=db password=*** *** dbname=app""#,
            ),
            (
                &[
                    "sh",
                    "-c",
                    r#"psql "host=db password=pw dbname=app" -c "select 1""#,
                ],
                r#"sh -c psql "host=db password=*** dbname=app" -c "select 1""#,
            ),
            (
                &["sh", "-c", "ssh h 'mysql -pX db && rm -rf /tmp/x'"],
                "sh -c ssh h 'mysql -p*** db && rm -rf /tmp/x'",
            ),
            // Masked words name a program, and end a command.
            (
                &["sh", "-c", r#"tool --token "a b";mysql -pX db"#],
                "sh -c tool --token *** *** -p*** db",
            ),
            (
                &[
                    "sh",
                    "-c",
                    r#"mysql --password="a b"; docker run -p8080:80 img"#,
                ],
                "sh -c mysql --password=*** ***; docker run -p8080:80 img",
            ),
        ]);
    }

    /// `-pX` is a password for every MySQL and MariaDB client tool; a
    /// server, a container or an image named after one reads no `-p`.
    #[test]
    fn the_password_option_of_every_mysql_and_mariadb_tool_is_masked() {
        for tool in [
            "mariadb-dump",
            "mariadb-admin",
            "mariadb-import",
            "mariadb-check",
            "mariadb-backup",
            "mysqlcheck",
            "mysqlshow",
            "mysqlslap",
            "mysqlbinlog",
            "mysqlpump",
            "mysqlsh",
            "mysql_upgrade",
            "mysql_secure_installation",
        ] {
            assert_eq!(
                shown(&[tool, "-uroot", "-phunter2", "db"]),
                format!("{tool} -uroot -p*** db")
            );
        }
        assert_shown(&[
            (
                &[
                    "docker",
                    "exec",
                    "db",
                    "mariadb-dump",
                    "-uroot",
                    "-phunter2",
                    "app",
                ],
                "docker exec db mariadb-dump -uroot -p*** app",
            ),
            (
                &["mysqlcheck", "-uroot", "-phunter2", "--all-databases"],
                "mysqlcheck -uroot -p*** --all-databases",
            ),
            (
                &[
                    "docker",
                    "run",
                    "--name",
                    "mysql-test",
                    "-p3307:3306",
                    "mysql:8",
                ],
                "docker run --name mysql-test -p3307:3306 mysql:8",
            ),
            (
                &["docker", "run", "--name", "mysqld", "-p3306:3306", "img"],
                "docker run --name mysqld -p3306:3306 img",
            ),
        ]);
    }

    /// A URL password with `#` or `?` in it is masked whole; an `@` in a
    /// path, or in the query of a URL with no password, is no user's.
    #[test]
    fn a_url_password_with_a_hash_or_question_mark_is_masked() {
        assert_shown(&[
            (
                &["psql", "postgres://app:Xy#9z@db/app"],
                "psql postgres://app:***@db/app",
            ),
            (
                &["psql", "postgres://app:Xy?9z@db/app"],
                "psql postgres://app:***@db/app",
            ),
            (
                &["psql", "postgres://app:Xy#9z@db?sslmode=require"],
                "psql postgres://app:***@db?***",
            ),
            (&["curl", "https://h?to=a@b.com"], "curl https://h?***"),
            (&["curl", "https://h/a?to=a@b.com"], "curl https://h/a?***"),
            (
                &["curl", "https://u:pw@h?to=a@b"],
                "curl https://u:***@h?***",
            ),
            (
                &["curl", "https://registry.npmjs.org/@scope/pkg"],
                "curl https://registry.npmjs.org/@scope/pkg",
            ),
            (&["curl", "https://h/a#x@y"], "curl https://h/a#x@y"),
        ]);
    }

    /// curl's `-U` is its proxy's `user:password`, and `-u`, `-U` and `-b`
    /// end a cluster of its short options too (`-su`, `-sb`); after its
    /// command, they are another program's.
    #[test]
    fn curls_proxy_user_and_clustered_options_are_masked() {
        assert_shown(&[
            (
                &["curl", "-U", "bob:pw", "-x", "http://proxy", "https://h"],
                "curl -U bob:*** -x http://proxy https://h",
            ),
            (
                &["curl", "-su", "alice:pw", "https://h"],
                "curl -su alice:*** https://h",
            ),
            (
                &["curl", "-sb", "sid=abc", "https://h"],
                "curl -sb *** https://h",
            ),
            (
                &["curl", "-sSUbob:pw", "-sbsid=1", "h"],
                "curl -sSUbob:*** -sb*** h",
            ),
            (
                &["sh", "-c", "curl -sU bob:pw h"],
                "sh -c curl -sU bob:*** h",
            ),
            (
                &["curl", "-sSLo", "out.json", "-XPOST", "-d", "user=bob", "h"],
                "curl -sSLo out.json -XPOST -d user=bob h",
            ),
            (
                &["sh", "-c", "curl -s h; tool -su alice:x -U bob:y"],
                "sh -c curl -s h; tool -su alice:x -U bob:y",
            ),
        ]);
    }

    /// No input makes masking panic: quotes and backslashes left open,
    /// characters of several bytes next to what it looks for.
    #[test]
    fn masking_never_panics() {
        const PIECES: [&str; 34] = [
            " ",
            "\t",
            "\n",
            "\\",
            "'",
            "\"",
            ":",
            "=",
            "@",
            "/",
            "?",
            "#",
            ";",
            "&",
            "|",
            ">",
            "-",
            "-p",
            "-u",
            "-H",
            "é",
            "ß",
            "\u{1F600}",
            "://",
            "pass:",
            "password",
            "Authorization",
            "Bearer",
            "mysql",
            "curl",
            "sshpass",
            "{\"token\":",
            "x",
            "-sb",
        ];
        let mut state = 0x2545_f491_u32;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as usize % n
        };
        for _ in 0..20_000 {
            let arg: String = (0..next(12)).map(|_| PIECES[next(PIECES.len())]).collect();
            let other: String = (0..next(4)).map(|_| PIECES[next(PIECES.len())]).collect();
            let (arg, other) = (arg.as_str(), other.as_str());
            for args in [["sh", "-c", arg, other], ["curl", arg, "-u", other]] {
                let _ = shown(&args);
            }
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
